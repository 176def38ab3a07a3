//! The storage floor: durable state, below every other layer but the base modules.
//!
//! - [`seam`]: the `Storage` trait, the contract the layers above rely on.
//! - [`embedded`]: today's implementation of it, over the two modules below.
//! - [`store`]: the SQLite file, its lock, schema migrations and reads.
//! - [`writer`]: the group-commit writer, which is also the output gate.
//! - `queue`: the writer's queue, and when a commit to an idle writer skips it.
//! - [`integrity`]: the checks that keep damage on disk from being served as data.
//!
//! Rule: modules here use only each other and the base modules; nothing here knows of
//! actors' tasks, the runtime or the server.

pub mod actor_db;
pub(crate) mod embedded;
pub mod integrity;
mod queue;
pub(crate) mod seam;
pub mod store;
pub mod writer;
