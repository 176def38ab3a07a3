//! The storage layer: the SQLite file, the group-commit writer and the damage checks.

pub mod integrity;
pub mod store;
pub mod writer;
