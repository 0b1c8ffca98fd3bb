//! The events table as every part reads it: the log in commit-safe order, positions, lag.
//! postgres-es owns the writes; every other SQL on `events` lives here.
//!
//! # Layout
//!
//! - [`log`]: [`LogCursor`], [`read_after`] (the commit-safe read), [`lag`], and
//!   [`LogNotifications`] (wake-ups on new commits).
//! - [`positions`]: look-ups by aggregate and sequence.
//!
//! # The ordering guarantee
//!
//! `global_position` is taken at insert, before commit, so transactions can commit out of
//! position order: reading "everything after position P" could skip an event whose
//! transaction was still open. The log is therefore read in `(transaction_id,
//! global_position)` order and only up to the oldest transaction still running
//! (`pg_snapshot_xmin(pg_current_snapshot())`): every transaction below that watermark has
//! ended, so no event can ever appear behind a reader's cursor. One aggregate's events keep
//! their sequence order in this order too (sequence n+1 is written by a later transaction).

pub mod log;
pub mod positions;

pub use log::{
    event_by_id, events_by_ids, events_of, head, lag, read_after, read_positions, waiting_in, Lag,
    LogCursor, LogEntry, LogNotifications,
};
