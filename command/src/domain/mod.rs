//! The domain: aggregates decide which events a command produces, and nothing else.
//! No I/O happens here; tests are given/when/then on events.

pub mod account;

pub use account::{Account, AccountCommand, AccountError, AccountStatus};
