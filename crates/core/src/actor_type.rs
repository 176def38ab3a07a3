//! Actor type definitions: what core knows about each registered type.
//!
//! The host owns the behaviour (state, actions, hooks); core keeps just enough to route,
//! validate and time requests without a round trip into user code.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};

/// One registered actor type.
#[derive(Debug, Clone)]
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
    /// Which connection hooks the type has; core calls the host only for those.
    pub hooks: Hooks,
    /// The events whose subscriptions the host must allow (`canSubscribe`): a connection's
    /// `sub` of one of them reaches the actor's mailbox and is granted only if
    /// [`Host::can_subscribe`](crate::host::Host::can_subscribe) agrees. Other events are
    /// subscribed to without asking.
    pub guarded_events: HashSet<String>,
    /// Hibernatable connections: the type's actors may sleep while connections are open
    /// (and idle); the sockets stay open, `conn.state` is durable, and the next message on
    /// any of them wakes the actor with its connections restored.
    pub hibernatable_conns: bool,
    /// With hibernatable connections: how long a connection restored after a restart
    /// (its socket closed by the shutdown) may take to resume before it is closed for good.
    pub reconnect_window: Duration,
}

/// The default [`ActorType::reconnect_window`].
pub const DEFAULT_RECONNECT_WINDOW: Duration = Duration::from_secs(30);

/// Which of its optional connection hooks a type defines. Core asks the host to run a hook
/// only when the type has it: a connection to a type with none of `onBeforeConnect`,
/// `createConnState` and `onConnect` is admitted without calling the host, and a close
/// without `onDisconnect` calls no hook either; the host is told of both with
/// [`Host::connected`](crate::host::Host::connected) and
/// [`Host::disconnected`](crate::host::Host::disconnected), which run no user code and are
/// not waited for. (`onRequest` and `onWebSocket` are [`ActorType::raw_requests`] and
/// [`ActorType::raw_sockets`]. The start and stop calls always reach the host, whatever
/// lifecycle hooks the type has, because the host builds and tears down the instance there.)
///
/// The default is every hook present, so a host that does not say calls are made as always.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hooks {
    /// `onBeforeConnect`: may reject a connection.
    pub on_before_connect: bool,
    /// `createConnState`: builds a connection's state.
    pub create_conn_state: bool,
    /// `onConnect`: runs once a connection is admitted.
    pub on_connect: bool,
    /// `onDisconnect`: runs when a connection closes.
    pub on_disconnect: bool,
}

impl Hooks {
    /// Every connection hook present.
    pub const ALL: Hooks = Hooks {
        on_before_connect: true,
        create_conn_state: true,
        on_connect: true,
        on_disconnect: true,
    };

    /// No connection hook.
    pub const NONE: Hooks = Hooks {
        on_before_connect: false,
        create_conn_state: false,
        on_connect: false,
        on_disconnect: false,
    };

    /// Whether admitting a connection runs user code.
    pub fn on_connecting(&self) -> bool {
        self.on_before_connect || self.create_conn_state || self.on_connect
    }
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks::ALL
    }
}

impl Default for ActorType {
    fn default() -> Self {
        ActorType::new(String::new(), Vec::<String>::new())
    }
}

impl ActorType {
    /// A type with the given actions and default options, without raw routes, with every
    /// connection hook.
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
            hooks: Hooks::ALL,
            guarded_events: HashSet::new(),
            hibernatable_conns: false,
            reconnect_window: DEFAULT_RECONNECT_WINDOW,
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

    /// Every registered type, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ActorType>> {
        self.types.values()
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
