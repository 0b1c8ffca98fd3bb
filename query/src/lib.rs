//! Query API: serves the read models (balances, statements, transfer status).
//!
//! Not built yet. This crate holds its place in the workspace layout fixed by `DESIGN.md`;
//! the read-side issue fills it (axum over the read models, moka cache, read-your-writes).
