//! The open actor connections of a server, by actor: what the inspector lists, and the
//! source of the `keel_connections_open` gauge.
//!
//! What must stay true: a connection is listed from before its actor admits it (the actor
//! sends `ready` itself, so a client that heard `ready` finds itself listed) until its socket
//! task lets go of the guard, however the socket ends; the gauge moves with the list.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;

use crate::metrics::Metrics;

/// Open actor connections, by actor: what the inspector lists, and the source of the
/// `keel_connections_open` gauge. The connection layer holds the guard [`Connections::open`]
/// returns for as long as a connection is admitted, so however it ends, it leaves.
pub(crate) struct Connections {
    by_actor: Mutex<HashMap<Arc<str>, Vec<ConnectionInfo>>>,
    metrics: Arc<Metrics>,
}

/// What the inspector shows of one open connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionInfo {
    /// The connection's id, unique within its actor.
    pub(crate) id: String,
    /// When it opened, in epoch milliseconds.
    pub(crate) opened_at_ms: i64,
    /// Whatever the connection layer wants shown (its params, say), as JSON; shared, since
    /// many connections show the same.
    pub(crate) details: Arc<Value>,
}

impl Connections {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Connections {
        Connections {
            by_actor: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Records an open connection of `actor_id` until the returned guard drops.
    pub(crate) fn open(
        self: &Arc<Self>,
        actor_id: Arc<str>,
        info: ConnectionInfo,
    ) -> OpenConnection {
        let id = info.id.clone();
        self.opened(actor_id.clone(), info);
        OpenConnection {
            connections: self.clone(),
            actor_id,
            id,
        }
    }

    /// Records an open connection of `actor_id`; pair it with [`Connections::closed`].
    pub(crate) fn opened(&self, actor_id: Arc<str>, info: ConnectionInfo) {
        self.by_actor.lock().entry(actor_id).or_default().push(info);
        self.metrics.connection_opened();
    }

    /// Forgets a connection; a connection that was never recorded is ignored.
    pub(crate) fn closed(&self, actor_id: &str, id: &str) {
        let mut by_actor = self.by_actor.lock();
        let Some(open) = by_actor.get_mut(actor_id) else {
            return;
        };
        let before = open.len();
        open.retain(|info| info.id != id);
        let removed = before - open.len();
        if open.is_empty() {
            by_actor.remove(actor_id);
        }
        drop(by_actor);
        for _ in 0..removed {
            self.metrics.connection_closed();
        }
    }

    /// The open connections of `actor_id`, oldest first.
    pub(crate) fn of(&self, actor_id: &str) -> Vec<ConnectionInfo> {
        self.by_actor
            .lock()
            .get(actor_id)
            .cloned()
            .unwrap_or_default()
    }
}

/// An admitted connection, listed until this guard drops.
pub(crate) struct OpenConnection {
    connections: Arc<Connections>,
    actor_id: Arc<str>,
    id: String,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.connections.closed(&self.actor_id, &self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_feed_the_gauge() {
        let metrics = Arc::new(Metrics::default());
        let connections = Connections::new(metrics.clone());
        let info = |id: &str| ConnectionInfo {
            id: id.into(),
            opened_at_ms: 1,
            details: Arc::new(Value::Null),
        };
        let actor: Arc<str> = Arc::from("a");
        connections.opened(actor.clone(), info("1"));
        connections.opened(actor.clone(), info("2"));
        assert!(metrics.render().contains("keel_connections_open 2\n"));
        connections.closed("a", "1");
        connections.closed("a", "1");
        connections.closed("b", "1");
        assert_eq!(connections.of("a").len(), 1);
        assert!(metrics.render().contains("keel_connections_open 1\n"));
        connections.closed("a", "2");
        assert!(connections.of("a").is_empty());
        assert!(metrics.render().contains("keel_connections_open 0\n"));
    }
}
