//! Which actor a request names: by id, or by type name and key with a resolve mode.
//!
//! The ingress names an actor with these two types, so what a request may ask for is defined
//! once. What must stay true: a `Target` is only a name; resolving it, and so creating an
//! actor, is the directory's (`runtime/directory.rs`), under the mode the request carries.

use crate::host::Payload;

/// How a request by key finds its actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resolve {
    /// The actor must exist (`actor.not_found` otherwise).
    Get,
    /// The actor must not exist (`actor.already_exists` otherwise).
    Create,
    /// Use the existing actor or create it.
    #[default]
    GetOrCreate,
}

/// Which actor a request is for.
#[derive(Debug, Clone)]
pub enum Target {
    /// By type name and key.
    Key {
        /// The actor type's name.
        name: String,
        /// The actor's key segments.
        key: Vec<String>,
        /// Whether the actor may, must or must not exist already.
        mode: Resolve,
        /// Creation input, used only if this request creates the actor.
        input: Option<Payload>,
    },
    /// By the actor's id.
    Id(String),
}
