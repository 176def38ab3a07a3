//! The actor directory: which actor a type name and key resolve to, creating it when asked.
//!
//! What must stay true:
//! - A key resolves to at most one actor id at a time. A key whose actor is being destroyed
//!   is marked dying before the destroying call's reply is released; a request by that key
//!   waits until the dying task has left, then resolves afresh (to a new actor, or none).
//! - The map holds only keys of live (or just-resolved) actors: an actor's key is forgotten
//!   when its task leaves, so memory follows the live actors, not every actor ever touched.
//! - No lock is held across an `.await`; storage is read through the `Storage` seam.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::actor::signals::TaskSignals;
use crate::actor_type::ActorTypes;
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::host::{ActorInfo, Payload};
use crate::key;
use crate::runtime::target::Resolve;
use crate::storage::seam::ActorRecord;
use crate::storage::seam::CreateMode;
use crate::storage::seam::Storage;

/// Resolved actors of one type, by canonical key.
type KnownByKey = HashMap<String, Known>;

/// A resolved key in the directory.
#[derive(Clone)]
struct Known {
    info: Arc<ActorInfo>,
    /// Set once the actor is being destroyed: becomes `true` when its task has left, after
    /// its row was deleted. A request by key that meets it waits for that, then resolves
    /// afresh, so the key is free as soon as the destroying call's reply is out.
    dying: Option<Arc<TaskSignals>>,
}

/// Resolved keys of live (or just-resolved) actors, by type name then canonical key.
pub(crate) struct Directory {
    /// Resolved keys, by type name then canonical key.
    known: Mutex<HashMap<Arc<str>, KnownByKey>>,
    /// Where unknown keys are looked up, and new actors created.
    storage: Arc<dyn Storage>,
    /// The registered types, which a key's type name must be one of.
    types: Arc<ActorTypes>,
    /// The key limits every key is checked against.
    limits: Limits,
}

impl Directory {
    pub(crate) fn new(storage: Arc<dyn Storage>, types: Arc<ActorTypes>, limits: Limits) -> Self {
        Directory {
            known: Mutex::new(HashMap::new()),
            storage,
            types,
            limits,
        }
    }

    /// Finds the actor for a request by key, creating it when the mode allows. A key whose
    /// actor is being destroyed is resolved again once that actor has left.
    pub(crate) async fn resolve(
        &self,
        name: &str,
        key: &[String],
        mode: Resolve,
        input: Option<Payload>,
    ) -> Result<Arc<ActorInfo>> {
        let actor_type = self.types.get(name)?;
        key::validate(key, &self.limits)?;
        let key_string = key::encode(key);
        loop {
            let known = self
                .known
                .lock()
                .get(name)
                .and_then(|by_key| by_key.get(&key_string))
                .cloned();
            if let Some(known) = known {
                if let Some(dying) = known.dying {
                    self.wait_gone(&known.info, dying).await;
                    continue;
                }
                return match mode {
                    Resolve::Create => Err(Error::ActorAlreadyExists),
                    _ => Ok(known.info),
                };
            }
            let record = match mode {
                Resolve::Get => self
                    .storage
                    .find_by_key(name, &key_string)
                    .await?
                    .ok_or(Error::ActorNotFound)?,
                // No lookup first: the creation finds the key's row itself (the embedded
                // writer answers an existing one without a commit), one hop fewer per new actor.
                Resolve::Create | Resolve::GetOrCreate => {
                    let record = ActorRecord {
                        id: new_actor_id(),
                        name: actor_type.name.clone(),
                        key: key_string.clone(),
                    };
                    let create_mode = match mode {
                        Resolve::Create => CreateMode::Create,
                        _ => CreateMode::GetOrCreate,
                    };
                    let (record, created) = self
                        .storage
                        .create(record, input.clone(), create_mode)
                        .await?;
                    if created {
                        tracing::debug!(actor_id = %record.id, name, key = %key_string, "actor created");
                    }
                    record
                }
            };
            let info = Arc::new(ActorInfo {
                id: Arc::from(record.id),
                name: Arc::from(actor_type.name.as_str()),
                key: key.to_vec(),
                key_string: key_string.clone(),
            });
            // The row read above may belong to an actor whose destroy began meanwhile.
            let dying = {
                let mut known = self.known.lock();
                let by_key = known.entry(info.name.clone()).or_default();
                match by_key.get(&key_string) {
                    Some(Known {
                        info: dying_info,
                        dying: Some(dying),
                    }) if dying_info.id == info.id => Some(dying.clone()),
                    _ => {
                        let entry = Known {
                            info: info.clone(),
                            dying: None,
                        };
                        by_key.insert(key_string.clone(), entry);
                        None
                    }
                }
            };
            match dying {
                Some(dying) => self.wait_gone(&info, dying).await,
                None => return Ok(info),
            }
        }
    }

    /// Finds an actor by id in storage (the caller looks among the live actors first).
    pub(crate) async fn resolve_stored_id(&self, id: &str) -> Result<Arc<ActorInfo>> {
        let record = self
            .storage
            .find_by_id(id)
            .await?
            .ok_or(Error::ActorNotFound)?;
        let actor_type = self.types.get(&record.name)?;
        Ok(Arc::new(ActorInfo {
            id: Arc::from(record.id),
            name: Arc::from(actor_type.name.as_str()),
            key: key::decode(&record.key)?,
            key_string: record.key,
        }))
    }

    /// Waits until a dying actor's task has left, and forgets its key (it has normally done
    /// so itself; not if its task died in a panic).
    async fn wait_gone(&self, info: &ActorInfo, dying: Arc<TaskSignals>) {
        dying.wait_stopped().await;
        self.forget_key(info);
    }

    /// Marks a key whose actor is being destroyed, before the destroying call's reply is
    /// released: requests by key wait until `stopped` says the task has left.
    pub(crate) fn mark_dying(&self, info: &Arc<ActorInfo>, stopped: Arc<TaskSignals>) {
        let entry = Known {
            info: info.clone(),
            dying: Some(stopped),
        };
        self.known
            .lock()
            .entry(info.name.clone())
            .or_default()
            .insert(info.key_string.clone(), entry);
    }

    /// Forgets a resolved key (after its actor stopped or was deleted).
    pub(crate) fn forget_key(&self, info: &ActorInfo) {
        let mut known = self.known.lock();
        if let Some(by_key) = known.get_mut(&*info.name) {
            if by_key
                .get(&info.key_string)
                .is_some_and(|k| k.info.id == info.id)
            {
                by_key.remove(&info.key_string);
            }
        }
    }
}

/// A generated actor id: 128 random bits in hex.
fn new_actor_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
