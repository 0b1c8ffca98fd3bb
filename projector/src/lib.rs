//! Projector processes: consume the log and build the read models in PostgreSQL.
//!
//! Not built yet. This crate holds its place in the workspace layout fixed by
//! `DESIGN.md`; the read-side issue fills it (consumer group over the Kafka topic, read-model
//! tables with the checkpoint in the same transaction, dead letters, status endpoint).
