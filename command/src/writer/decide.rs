//! The pure step of group commit: commands and what is known of their aggregates in,
//! answers and the rows to append out. No I/O happens here, so every rule of the batch
//! (commands on one aggregate build on each other, a refusal on an unconfirmed entry is
//! checked, a broken aggregate fails only its own commands, one snapshot per aggregate) is
//! tested given/when/then below without a database.

use std::collections::{HashMap, HashSet};

use cqrs_es::DomainEvent;
use ledger_store::aggregates::{Batch, NewEvent, StoredAggregate};
use uuid::Uuid;

use crate::domain::Decider;
use crate::ledger::{Intent, LedgerError, Outcome};

/// The answer to one command.
pub(crate) type Reply<A> = Result<Outcome<A>, LedgerError<<A as cqrs_es::Aggregate>::Error>>;

/// What is known about one aggregate.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry<A> {
    pub(crate) state: A,
    /// Sequence of its last event (0: no events).
    pub(crate) version: i64,
    /// Global position of its last event (0: no events).
    pub(crate) position: i64,
}

impl<A: Default> Default for Entry<A> {
    fn default() -> Self {
        Self {
            state: A::default(),
            version: 0,
            position: 0,
        }
    }
}

/// Restores an aggregate from what the store holds: its snapshot, then the events after
/// it through the contract's upcasters. `Err` says why it cannot be read.
pub(crate) fn restore<A: Decider>(stored: &StoredAggregate) -> Result<Entry<A>, String> {
    let mut state = match &stored.snapshot {
        Some(snapshot) => serde_json::from_value(snapshot.payload.clone()).map_err(|err| {
            format!(
                "snapshot of {} at {}: {err}",
                stored.aggregate_id, snapshot.sequence
            )
        })?,
        None => A::default(),
    };
    for recorded in &stored.events {
        let event = A::read(recorded).map_err(|err| {
            format!(
                "event {} of {}: {err}",
                recorded.sequence, recorded.aggregate_id
            )
        })?;
        state.fold(&event);
    }
    Ok(Entry {
        state,
        version: stored.version,
        position: stored.position,
    })
}

/// What the writer knows of a batch's aggregates when it decides.
#[derive(Debug)]
pub(crate) struct Known<A> {
    /// The latest known entry of each aggregate (cached or loaded); an aggregate absent
    /// here and not broken has no events.
    pub(crate) entries: HashMap<Uuid, Entry<A>>,
    /// Aggregates read from the store during this batch, or confirmed current there.
    pub(crate) fresh: HashSet<Uuid>,
    /// Aggregates that cannot be read, with the reason: only their commands fail.
    pub(crate) broken: HashMap<Uuid, String>,
}

impl<A> Default for Known<A> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            fresh: HashSet::new(),
            broken: HashMap::new(),
        }
    }
}

/// What became of one command of a batch.
pub(crate) enum Decision<A: Decider> {
    /// Answered without writing (a refusal, or nothing left to do).
    Done(Reply<A>),
    /// Appends events; answered with the position of the last one once committed.
    Append {
        aggregate_id: Uuid,
        state: A,
        version: i64,
        appended: usize,
    },
}

/// The outcome of deciding a batch.
pub(crate) struct Decided<A: Decider> {
    /// One per command, in order.
    pub(crate) decisions: Vec<Decision<A>>,
    /// The events and snapshots to append, in one statement.
    pub(crate) batch: Batch,
    /// Aggregates whose refusals or no-ops rest on an entry not yet confirmed current: to be
    /// checked against the store before anyone is answered.
    pub(crate) unconfirmed: HashSet<Uuid>,
}

/// Decides each command on the state the commands before it left, starting from `known`.
/// A snapshot is taken whenever an aggregate crosses a multiple of `snapshot_every`. `Err`
/// when an event, its metadata or a state cannot be serialized.
pub(crate) fn decide<'a, A, I>(
    intents: I,
    known: &Known<A>,
    snapshot_every: i64,
) -> Result<Decided<A>, String>
where
    A: Decider,
    I: IntoIterator<Item = &'a Intent<A>>,
{
    let snapshot_every = snapshot_every.max(1);
    let mut working: HashMap<Uuid, Entry<A>> = HashMap::new();
    let mut batch = Batch::default();
    let mut decisions = Vec::new();
    let mut unconfirmed = HashSet::new();
    for intent in intents {
        let id = intent.aggregate_id;
        if let Some(reason) = known.broken.get(&id) {
            decisions.push(Decision::Done(Err(LedgerError::Internal(reason.clone()))));
            continue;
        }
        let entry = working
            .entry(id)
            .or_insert_with(|| known.entries.get(&id).cloned().unwrap_or_default());
        let events = match entry.state.decide(intent.command.clone()) {
            Ok(events) => events,
            Err(rule) => {
                if !known.fresh.contains(&id) {
                    unconfirmed.insert(id);
                }
                decisions.push(Decision::Done(Err(LedgerError::Rejected(rule))));
                continue;
            }
        };
        if events.is_empty() {
            if !known.fresh.contains(&id) {
                unconfirmed.insert(id);
            }
            decisions.push(Decision::Done(Ok(Outcome {
                aggregate_id: id,
                state: entry.state.clone(),
                version: entry.version,
                position: entry.position,
                appended: 0,
            })));
            continue;
        }

        if intent.event_id.is_some() && events.len() != 1 {
            // The id is bound to one ciphertext of one event: two events cannot share it,
            // and guessing which one it belongs to could store a value under another id.
            decisions.push(Decision::Done(Err(LedgerError::Internal(format!(
                "a command with a preset event id decided {} events",
                events.len()
            )))));
            continue;
        }
        let mut metadata = intent.metadata.clone();
        let command_id = Uuid::now_v7().to_string();
        metadata
            .causation_id
            .get_or_insert_with(|| command_id.clone());
        metadata.command_id = Some(command_id.clone());
        let metadata =
            serde_json::to_string(&metadata.to_map()).map_err(|err| format!("metadata: {err}"))?;
        let before = entry.version;
        for event in &events {
            entry.version += 1;
            batch.push_event(NewEvent {
                event_id: intent.event_id.unwrap_or_else(NewEvent::fresh_id),
                aggregate_id: id.to_string(),
                sequence: entry.version,
                event_type: event.event_type(),
                event_version: event.event_version(),
                payload: serde_json::to_string(event).map_err(|err| format!("event: {err}"))?,
                metadata: metadata.clone(),
                command_id: command_id.clone(),
            });
            entry.state.fold(event);
        }
        if before / snapshot_every != entry.version / snapshot_every {
            let state =
                serde_json::to_string(&entry.state).map_err(|err| format!("snapshot: {err}"))?;
            batch.push_snapshot(&id.to_string(), entry.version, state);
        }
        decisions.push(Decision::Append {
            aggregate_id: id,
            state: entry.state.clone(),
            version: entry.version,
            appended: events.len(),
        });
    }
    Ok(Decided {
        decisions,
        batch,
        unconfirmed,
    })
}

impl<A: Decider> Decision<A> {
    /// The answer of a decision that appended nothing.
    pub(crate) fn into_reply(self) -> Reply<A> {
        match self {
            Self::Done(reply) => reply,
            Self::Append { .. } => Err(LedgerError::Internal("events were not appended".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use ledger_events::{AccountEvent, Amount, Currency, Metadata, RecordedEvent};
    use ledger_store::aggregates::Snapshot;
    use serde_json::json;

    use super::*;
    use crate::domain::{Account, AccountCommand, AccountError, Transfer, TransferCommand};

    fn eur() -> Currency {
        "EUR".parse().unwrap()
    }

    fn amount(n: i64) -> Amount {
        Amount::new(n).unwrap()
    }

    fn intent(id: Uuid, command: AccountCommand) -> Intent<Account> {
        Intent::new(id, command, Metadata::default())
    }

    fn deposit(id: Uuid, n: i64) -> Intent<Account> {
        intent(
            id,
            AccountCommand::Deposit {
                amount: amount(n),
                currency: eur(),
                reference: None,
            },
        )
    }

    fn withdraw(id: Uuid, n: i64) -> Intent<Account> {
        intent(
            id,
            AccountCommand::Withdraw {
                amount: amount(n),
                currency: eur(),
                reference: None,
            },
        )
    }

    /// Given: an open EUR account at `version` holding `balance`, as the writer knows it.
    fn open_account(balance: i64, version: i64) -> Entry<Account> {
        let mut state = Account::default();
        state.fold(&AccountEvent::AccountOpened {
            subject_id: Uuid::from_u128(0xa11ce),
            currency: eur(),
            legacy_owner: None,
        });
        if balance > 0 {
            state.fold(&AccountEvent::MoneyDeposited {
                amount: amount(balance),
                currency: eur(),
                reference: None,
            });
        }
        Entry {
            state,
            version,
            position: 100 + version,
        }
    }

    fn known(entries: Vec<(Uuid, Entry<Account>)>, fresh: bool) -> Known<Account> {
        Known {
            fresh: if fresh {
                entries.iter().map(|(id, _)| *id).collect()
            } else {
                HashSet::new()
            },
            entries: entries.into_iter().collect(),
            broken: HashMap::new(),
        }
    }

    fn appended(decision: &Decision<Account>) -> (i64, usize, i64) {
        match decision {
            Decision::Append {
                version,
                appended,
                state,
                ..
            } => (*version, *appended, state.balance),
            Decision::Done(reply) => panic!("expected an append, got {reply:?}"),
        }
    }

    #[test]
    fn commands_on_one_aggregate_in_one_batch_build_on_each_other() {
        let id = Uuid::new_v4();
        let given = known(vec![(id, open_account(10, 2))], true);
        let when = [deposit(id, 5), withdraw(id, 15), withdraw(id, 1)];
        let then = decide(&when, &given, 100).unwrap();
        // The withdrawal of 15 sees the deposit of 5; the last one sees an empty account.
        assert_eq!(appended(&then.decisions[0]), (3, 1, 15));
        assert_eq!(appended(&then.decisions[1]), (4, 1, 0));
        assert!(matches!(
            &then.decisions[2],
            Decision::Done(Err(LedgerError::Rejected(
                AccountError::InsufficientFunds { .. }
            )))
        ));
        assert_eq!(then.batch.sequences(), [3, 4]);
        assert_eq!(then.batch.aggregate_ids(), [id.to_string(), id.to_string()]);
        assert!(then.unconfirmed.is_empty(), "decided on fresh state");
    }

    #[test]
    fn a_refusal_or_no_op_on_a_cached_entry_is_to_be_confirmed_a_fresh_one_is_not() {
        let cached = Uuid::new_v4();
        let fresh = Uuid::new_v4();
        let mut given = known(
            vec![(cached, open_account(0, 1)), (fresh, open_account(0, 1))],
            false,
        );
        given.fresh.insert(fresh);
        let open_again = |id| {
            intent(
                id,
                AccountCommand::Open {
                    subject_id: Uuid::from_u128(0xa11ce),
                    currency: eur(),
                },
            )
        };
        let when = [
            withdraw(cached, 1),
            withdraw(fresh, 1),
            open_again(cached),
            open_again(fresh),
        ];
        let then = decide(&when, &given, 100).unwrap();
        assert_eq!(then.unconfirmed, HashSet::from([cached]));
        assert!(then.batch.is_empty());
        assert!(then
            .decisions
            .iter()
            .all(|d| matches!(d, Decision::Done(Err(LedgerError::Rejected(_))))));
    }

    #[test]
    fn a_command_already_carried_out_is_answered_with_the_aggregates_current_place() {
        let id = Uuid::new_v4();
        let mut state = Transfer::default();
        let start = TransferCommand::Request {
            from: Uuid::new_v4(),
            to: Uuid::new_v4(),
            amount: amount(5),
            currency: eur(),
        };
        for event in state.decide(start).unwrap() {
            state.fold(&event);
        }
        let mut given = Known::default();
        given.entries.insert(
            id,
            Entry {
                state,
                version: 1,
                position: 77,
            },
        );
        let when = Intent::new(
            id,
            TransferCommand::Fail {
                code: "insufficient_funds".into(),
                reason: "refused".into(),
            },
            Metadata::default(),
        );
        // Failing it twice: the second finds it failed and has nothing left to do.
        let then = decide([&when, &when], &given, 100).unwrap();
        assert!(matches!(
            &then.decisions[0],
            Decision::Append { version: 2, .. }
        ));
        match &then.decisions[1] {
            Decision::Done(Ok(outcome)) => {
                assert_eq!(
                    (outcome.version, outcome.position, outcome.appended),
                    (2, 77, 0)
                );
            }
            _ => panic!("expected a no-op answer"),
        }
        assert_eq!(then.batch.len(), 1);
        assert!(then.unconfirmed.contains(&id), "decided on a cached entry");
    }

    #[test]
    fn an_aggregate_that_cannot_be_read_fails_its_own_commands_only() {
        let broken = Uuid::new_v4();
        let healthy = Uuid::new_v4();
        let mut given = known(vec![(healthy, open_account(0, 1))], true);
        given
            .broken
            .insert(broken, "event 2 of it: unknown type".into());
        let then = decide(&[deposit(broken, 1), deposit(healthy, 1)], &given, 100).unwrap();
        assert!(matches!(
            &then.decisions[0],
            Decision::Done(Err(LedgerError::Internal(reason))) if reason.contains("unknown type")
        ));
        assert_eq!(appended(&then.decisions[1]), (2, 1, 1));
        assert_eq!(then.batch.aggregate_ids(), [healthy.to_string()]);
    }

    #[test]
    fn a_snapshot_is_written_when_a_boundary_is_crossed_once_per_aggregate() {
        let id = Uuid::new_v4();
        let given = known(vec![(id, open_account(0, 3))], true);
        // Versions 4..=9 with snapshots every 2: boundaries 4, 6, 8; only the last is kept.
        let when: Vec<_> = (0..6).map(|_| deposit(id, 1)).collect();
        let then = decide(&when, &given, 2).unwrap();
        let snapshots: Vec<_> = then.batch.snapshots().collect();
        assert_eq!(snapshots.len(), 1);
        let (aggregate, sequence, payload) = snapshots[0];
        assert_eq!((aggregate, sequence), (id.to_string().as_str(), 8));
        let state: Account = serde_json::from_str(payload).unwrap();
        assert_eq!(state.balance, 5, "the state after event 8");
    }

    #[test]
    fn every_event_of_a_command_carries_its_command_id_and_causation() {
        let id = Uuid::new_v4();
        let given = known(vec![], true);
        let then = decide(
            &[intent(
                id,
                AccountCommand::Open {
                    subject_id: Uuid::from_u128(0xb0b),
                    currency: eur(),
                },
            )],
            &given,
            100,
        )
        .unwrap();
        assert_eq!(appended(&then.decisions[0]), (1, 1, 0));
        assert_eq!(then.batch.len(), 1);
        let metadata: serde_json::Value = serde_json::from_str(&then.batch.metadata()[0]).unwrap();
        let command_id = &then.batch.command_ids()[0];
        assert_eq!(metadata["command_id"], command_id.as_str());
        assert_eq!(
            metadata["causation_id"],
            command_id.as_str(),
            "a request without a cause"
        );
    }

    #[test]
    fn a_preset_event_id_is_the_id_of_the_commands_event_and_the_others_get_fresh_ones() {
        let id = Uuid::new_v4();
        let given = known(vec![(id, open_account(0, 1))], true);
        let preset = Uuid::now_v7();
        let mut bound = deposit(id, 5);
        bound.event_id = Some(preset);
        let then = decide(&[deposit(id, 1), bound, deposit(id, 2)], &given, 100).unwrap();
        let ids = then.batch.event_ids();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[1], preset);
        assert!(
            ids[0] != preset && ids[2] != preset && ids[0] != ids[2],
            "{ids:?}"
        );
        assert_eq!(ids[0].get_version_num(), 7);
    }

    /// An aggregate whose one command decides two events: no ledger command does, so the
    /// rule for preset event ids is shown on this one.
    #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Twice {
        happened: u32,
    }

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Happened;

    impl DomainEvent for Happened {
        fn event_type(&self) -> String {
            "Happened".into()
        }
        fn event_version(&self) -> String {
            "1".into()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    impl Decider for Twice {
        fn decide(&self, (): ()) -> Result<Vec<Happened>, Never> {
            Ok(vec![Happened, Happened])
        }
        fn fold(&mut self, _: &Happened) {
            self.happened += 1;
        }
        fn read(event: &RecordedEvent) -> Result<Happened, ledger_events::DecodeError> {
            Err(ledger_events::DecodeError::UnknownType(
                event.event_type.clone(),
            ))
        }
    }

    crate::domain::aggregate_via_decider!(Twice, "twice", (), Happened, Never);

    #[test]
    fn a_command_with_a_preset_event_id_that_decides_two_events_is_refused_as_a_defect() {
        let id = Uuid::new_v4();
        let mut bound = Intent::<Twice>::new(id, (), Metadata::default());
        bound.event_id = Some(Uuid::now_v7());
        let free = Intent::<Twice>::new(Uuid::new_v4(), (), Metadata::default());
        let then = decide(&[bound, free], &Known::default(), 100).unwrap();
        assert!(matches!(
            &then.decisions[0],
            Decision::Done(Err(LedgerError::Internal(reason))) if reason.contains("preset event id")
        ));
        assert!(matches!(
            &then.decisions[1],
            Decision::Append { appended: 2, .. }
        ));
        assert_eq!(then.batch.len(), 2, "only the free command's events");
    }

    fn recorded(
        id: Uuid,
        sequence: i64,
        event_type: &str,
        version: &str,
        payload: serde_json::Value,
    ) -> RecordedEvent {
        RecordedEvent {
            event_id: Uuid::new_v4(),
            aggregate_type: "account".into(),
            aggregate_id: id.to_string(),
            sequence,
            global_position: sequence * 10,
            recorded_at: Utc::now(),
            event_type: event_type.into(),
            event_version: version.into(),
            payload,
            metadata: Metadata::default(),
        }
    }

    #[test]
    fn restore_reads_the_snapshot_then_upcasts_the_events_after_it() {
        let id = Uuid::new_v4();
        let snapshot = serde_json::to_value(open_account(40, 5).state).unwrap();
        let stored = StoredAggregate {
            aggregate_id: id.to_string(),
            snapshot: Some(Snapshot {
                sequence: 5,
                payload: snapshot,
            }),
            // Written by version 1 of the contract: no `reference`.
            events: vec![recorded(
                id,
                6,
                "MoneyWithdrawn",
                "1",
                json!({"type": "MoneyWithdrawn", "amount": 15, "currency": "EUR"}),
            )],
            version: 6,
            position: 60,
        };
        let entry: Entry<Account> = restore(&stored).unwrap();
        assert_eq!(
            (entry.state.balance, entry.version, entry.position),
            (25, 6, 60)
        );

        let mut unreadable = stored.clone();
        unreadable.events[0].event_type = "MoneyTeleported".into();
        let reason = restore::<Account>(&unreadable).unwrap_err();
        assert!(reason.contains("event 6"), "{reason}");
    }
}
