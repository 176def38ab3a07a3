//! The sockets of sleeping actors: where a type with hibernatable connections leaves its
//! open connections when it sleeps, and where its next task finds them.
//!
//! A hibernated connection costs its socket's two tasks and their buffers, and one entry
//! here; the actor's instance and its JS objects are gone. The socket's reader keeps
//! reading: its next call (or subscription) is dispatched as any other, which wakes the
//! actor, and the new task takes the actor's connections from here before it serves
//! anything.
//!
//! What must stay true: a stopping task puts its connections here before it leaves the live
//! set, so the task started after it always finds them; once the drain has begun nothing is
//! kept here any more (every socket kept is closed with 1001, and later puts are refused, so
//! the stopping task closes them itself).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::actor::conn::{close, ConnHandle};

/// The open connections of sleeping actors, by actor id. One per runtime, shared by every
/// actor task.
#[derive(Default)]
pub(crate) struct Hibernated {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Set once the drain has begun: nothing more is kept.
    closed: bool,
    by_actor: HashMap<Arc<str>, Vec<ConnHandle>>,
}

impl Hibernated {
    /// Keeps a sleeping actor's connections until its next task takes them; hands them
    /// back if the drain has begun.
    pub(crate) fn put(
        &self,
        actor_id: Arc<str>,
        conns: Vec<ConnHandle>,
    ) -> Result<(), Vec<ConnHandle>> {
        if conns.is_empty() {
            return Ok(());
        }
        let mut inner = self.inner.lock();
        if inner.closed {
            return Err(conns);
        }
        inner.by_actor.entry(actor_id).or_default().extend(conns);
        Ok(())
    }

    /// Takes the connections an actor left here when it slept.
    pub(crate) fn take(&self, actor_id: &str) -> Vec<ConnHandle> {
        self.inner
            .lock()
            .by_actor
            .remove(actor_id)
            .unwrap_or_default()
    }

    /// The number of connections kept for sleeping actors.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().by_actor.values().map(Vec::len).sum()
    }

    /// The drain has begun: closes every kept socket with 1001 and keeps nothing more.
    /// Their durable records stay, so clients can resume after the restart.
    pub(crate) fn close(&self) {
        let kept = {
            let mut inner = self.inner.lock();
            inner.closed = true;
            std::mem::take(&mut inner.by_actor)
        };
        for conn in kept.into_values().flatten() {
            conn.close(close::GOING_AWAY, "server shutting down");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Encoding;

    #[test]
    fn kept_until_taken_and_closed_by_the_drain() {
        let hibernated = Hibernated::default();
        let conn = |id: &str| ConnHandle::new(Arc::from(id), Encoding::Json);
        let (a, b) = (conn("a"), conn("b"));
        assert!(hibernated.put(Arc::from("x"), vec![a.clone()]).is_ok());
        assert!(hibernated.put(Arc::from("y"), vec![b.clone()]).is_ok());
        assert_eq!(hibernated.len(), 2);
        let taken = hibernated.take("x");
        assert!(taken.len() == 1 && taken[0].same(&a));
        assert!(hibernated.take("x").is_empty(), "taken once");
        hibernated.close();
        assert!(b.is_closing(), "the drain closes what is kept");
        assert_eq!(b.close_frame().0, close::GOING_AWAY);
        assert!(
            hibernated.put(Arc::from("x"), vec![a]).is_err(),
            "nothing is kept once the drain has begun"
        );
        assert_eq!(hibernated.len(), 0);
    }
}
