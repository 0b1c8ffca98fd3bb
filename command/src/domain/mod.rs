//! The domain: aggregates decide which events a command produces, and nothing else.
//! No I/O happens here; tests are given/when/then on events.

use cqrs_es::Aggregate;
use ledger_events::{DecodeError, RecordedEvent};

pub use account::{Account, AccountCommand, AccountError, AccountStatus};
pub use transfer::{Transfer, TransferCommand, TransferError, TransferStatus};

/// An aggregate as the command side drives it: decide on the current state, fold the
/// decided events in. cqrs-es's `handle`/`apply` are written on top of these.
pub trait Decider:
    Aggregate<Command: Clone + Send + Sync + 'static, Error: Send + Sync + 'static> + Clone + 'static
{
    /// The events `command` produces from this state (none when it is already done), or
    /// the rule it breaks.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Folds one event into the state. Events are facts: this never fails.
    fn fold(&mut self, event: &Self::Event);

    /// Reads one of its stored events through the contract's upcasters (the one place
    /// upcasting happens: [`RecordedEvent`]).
    fn read(event: &RecordedEvent) -> Result<Self::Event, DecodeError>;
}

/// Implements cqrs-es's `Aggregate` for a [`Decider`]: `handle` writes what `decide`
/// decided, `apply` folds.
macro_rules! aggregate_via_decider {
    ($aggregate:ty, $type_name:expr, $command:ty, $event:ty, $error:ty) => {
        impl cqrs_es::Aggregate for $aggregate {
            const TYPE: &'static str = $type_name;
            type Command = $command;
            type Event = $event;
            type Error = $error;
            type Services = ();

            async fn handle(
                &mut self,
                command: Self::Command,
                _services: &Self::Services,
                sink: &cqrs_es::event_sink::EventSink<Self>,
            ) -> Result<(), Self::Error> {
                for event in $crate::domain::Decider::decide(self, command)? {
                    sink.write(event, self).await;
                }
                Ok(())
            }

            fn apply(&mut self, event: Self::Event) {
                $crate::domain::Decider::fold(self, &event);
            }
        }
    };
}
pub(crate) use aggregate_via_decider;

pub mod account;
pub mod transfer;
