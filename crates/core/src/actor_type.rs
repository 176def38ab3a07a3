//! Actor type definitions: what core knows about each registered type.
//!
//! The host owns the behaviour (state, actions, hooks); core keeps just enough to route,
//! validate and time requests without a round trip into user code.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};

/// One registered actor type.
#[derive(Debug, Clone, Default)]
pub struct ActorType {
    /// The type's name, as used in URLs and clients.
    pub name: String,
    /// The names of its actions.
    pub actions: HashSet<String>,
    /// Overrides the runtime's default action timeout.
    pub action_timeout: Option<Duration>,
    /// Overrides the runtime's default idle time before sleep.
    pub sleep_timeout: Option<Duration>,
}

impl ActorType {
    /// A type with the given actions and default options.
    pub fn new(
        name: impl Into<String>,
        actions: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ActorType {
            name: name.into(),
            actions: actions.into_iter().map(Into::into).collect(),
            action_timeout: None,
            sleep_timeout: None,
        }
    }

    /// Fails with `actor.action_not_found` unless the type has `action`.
    pub fn check_action(&self, action: &str) -> Result<()> {
        if self.actions.contains(action) {
            Ok(())
        } else {
            Err(Error::ActionNotFound {
                actor_type: self.name.clone(),
                action: action.to_string(),
            })
        }
    }
}

/// Every registered type, by name. Frozen once the registry leaves `Idle`.
#[derive(Debug, Clone, Default)]
pub struct ActorTypes {
    types: BTreeMap<String, Arc<ActorType>>,
}

impl ActorTypes {
    /// Adds a type; a duplicate name is `registry.duplicate_actor_type`.
    pub fn add(&mut self, actor_type: ActorType) -> Result<()> {
        if actor_type.name.is_empty() {
            return Err(Error::config("an actor type name must not be empty"));
        }
        if self.types.contains_key(&actor_type.name) {
            return Err(Error::DuplicateActorType {
                name: actor_type.name,
            });
        }
        self.types
            .insert(actor_type.name.clone(), Arc::new(actor_type));
        Ok(())
    }

    /// Finds a type; an unknown name is `actor.type_not_found`.
    pub fn get(&self, name: &str) -> Result<&Arc<ActorType>> {
        self.types
            .get(name)
            .ok_or_else(|| Error::ActorTypeNotFound {
                name: name.to_string(),
            })
    }

    /// The number of registered types.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// Whether no type is registered.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }
}
