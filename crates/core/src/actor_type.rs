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
    /// Whether the type answers raw HTTP requests (has `onRequest`). Without it, the raw
    /// route answers `request.route_not_found` before any actor is looked up or created.
    pub raw_requests: bool,
    /// Whether the type accepts raw WebSockets (has `onWebSocket`). Without it, an upgrade
    /// on the raw route answers `request.route_not_found` and creates nothing.
    pub raw_sockets: bool,
}

impl ActorType {
    /// A type with the given actions and default options, without raw routes.
    pub fn new(
        name: impl Into<String>,
        actions: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ActorType {
            name: name.into(),
            actions: actions.into_iter().map(Into::into).collect(),
            action_timeout: None,
            sleep_timeout: None,
            raw_requests: false,
            raw_sockets: false,
        }
    }

    /// Fails with `request.route_not_found` unless the type handles this raw route: a
    /// WebSocket upgrade when `upgrade` is set, a plain request otherwise.
    pub fn check_raw(&self, upgrade: bool, method: &str, path: &str) -> Result<()> {
        if (upgrade && self.raw_sockets) || (!upgrade && self.raw_requests) {
            Ok(())
        } else {
            Err(Error::RouteNotFound {
                method: method.to_string(),
                path: path.to_string(),
            })
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
