//! The event store: every statement on `events` and `snapshots` lives here. The command
//! side loads and appends aggregates through [`aggregates`]; the relay, the projector and
//! the operator tools read the log through [`log`].
//!
//! # Layout
//!
//! - [`aggregates`]: load many aggregates (latest snapshot plus the events after it),
//!   their current versions, append a batch of events and snapshots in one statement, and
//!   find out whether a batch whose commit was not acknowledged is in.
//! - [`log`]: [`LogCursor`], [`read_after`] (the commit-safe read), [`lag`], and
//!   [`LogNotifications`] (wake-ups on new commits).
//!
//! - [`legacy`]: the statements of the one sanctioned rewrite of stored payloads, moving
//!   personal data written in clear before data subjects into ciphertext (ADR 0019).
//!
//! Payloads are stored as written; reading them through the contract's upcasters is
//! [`ledger_events::RecordedEvent`]'s job, the one place upcasting happens.
//!
//! # The ordering guarantee
//!
//! `global_position` is taken at insert, before commit, so transactions can commit out of
//! position order: reading "everything after position P" could skip an event whose
//! transaction was still open. The log is therefore read in `(transaction_id,
//! global_position)` order and only up to a watermark ([`log::watermark`], ADR 0017): the
//! oldest transaction still running that writes to `events` (or, with none, the next
//! transaction id). Every transaction below it has ended or never writes events, so no
//! event can ever appear behind a reader's cursor. Transactions that write only elsewhere,
//! such as the projector's batches, do not hold readers back; a trigger refuses an append
//! by a transaction that wrote elsewhere first, which is what makes that safe. One
//! aggregate's events keep their sequence order in this order too (sequence n+1 is written
//! by a later transaction).

pub mod aggregates;
pub mod legacy;
pub mod log;

pub use log::{
    event_by_id, events_by_ids, events_of, head, lag, read_after, read_positions, waiting_in,
    watermark, Lag, LogCursor, LogEntry, LogNotifications,
};
