//! The storage floor: durable state, below every other layer but the base modules.
//!
//! - [`seam`]: the `Storage` trait, the contract the layers above rely on.
//! - [`embedded`]: today's implementation of it, over the two modules below.
//! - [`store`]: the SQLite file, its lock, schema migrations and reads.
//! - [`writer`]: the group-commit writer, which is also the output gate.
//! - [`integrity`]: the checks that keep damage on disk from being served as data.
//!
//! Rule: modules here use only each other and the base modules; nothing here knows of
//! actors' tasks, the runtime or the server.

pub mod actor_db;
pub(crate) mod embedded;
pub mod integrity;
pub(crate) mod seam;
pub mod store;
pub mod writer;
