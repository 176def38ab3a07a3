//! Actors calling actors in process: `c.client()` in TypeScript reaches core's dispatch here,
//! with no HTTP hop.
//!
//! What must stay true: the call carries the chain of actors whose calls await it, so core
//! refuses a call that would wait on a mailbox one of them holds (`actor.call_cycle`); the
//! reply comes back only once the callee's effects are durable, as for any client call.
//! `c.keepAwake`'s holds reach the actor's task here too: they are the other thing an actor's
//! background work asks of core.

use keel_core::{Encoding, Payload, Resolve, Target};
use napi::bindgen_prelude::Buffer;
use napi_derive::napi;

use crate::convert::ErrorInfo;
use crate::CoreRegistry;

/// One call from an actor to an actor, as `c.client()` sends it.
#[napi(object)]
pub struct ActorCallJs {
    /// The target actor type's name (with `key`); absent when calling by `id`.
    pub name: Option<String>,
    /// The target's key segments (with `name`).
    pub key: Option<Vec<String>>,
    /// `get`, `create` or `getOrCreate` (the default), for a call by key.
    pub mode: Option<String>,
    /// Creation input, CBOR-encoded, used only if this call creates the actor.
    pub input: Option<Buffer>,
    /// The target actor's id, instead of `name` and `key`.
    pub id: Option<String>,
    /// The action's name; absent to only resolve the target (and create it, by its mode).
    pub action: Option<String>,
    /// The arguments, a CBOR-encoded array.
    pub args: Buffer,
    /// The ids of the actors whose calls await this one, nearest caller last.
    pub chain: Vec<String>,
}

/// The settled result of an actor-to-actor call: exactly one of `error` and `output` is set.
#[napi(object, object_from_js = false)]
pub struct ActorCallResult {
    /// The failure, if any.
    pub error: Option<ErrorInfo>,
    /// The action's CBOR-encoded return value.
    pub output: Option<Buffer>,
    /// The target's id, for a call that only resolved it.
    pub actor_id: Option<String>,
}

fn target_of(call: &mut ActorCallJs) -> keel_core::Result<Target> {
    if let Some(id) = call.id.take() {
        return Ok(Target::Id(id));
    }
    let name = call
        .name
        .take()
        .ok_or_else(|| keel_core::Error::malformed("an actor call names an actor type or an id"))?;
    let mode = match call.mode.as_deref() {
        None | Some("getOrCreate") => Resolve::GetOrCreate,
        Some("get") => Resolve::Get,
        Some("create") => Resolve::Create,
        Some(other) => {
            return Err(keel_core::Error::malformed(format!(
                "unknown resolve mode {other:?}"
            )))
        }
    };
    Ok(Target::Key {
        name,
        key: call.key.take().unwrap_or_default(),
        mode,
        input: call.input.take().map(|bytes| Payload::cbor(bytes.to_vec())),
    })
}

#[napi]
impl CoreRegistry {
    /// Calls an action of an actor of this registry on behalf of an actor's call (see the
    /// module doc); resolves once the callee's effects are durable. Without an action it only
    /// resolves the target to its id.
    #[napi]
    pub async fn call_actor(&self, mut call: ActorCallJs) -> ActorCallResult {
        let runtime = match self.running() {
            Ok(runtime) => runtime,
            Err(err) => return ActorCallResult::failed(&err, false),
        };
        let dev = runtime.config().dev;
        let target = match target_of(&mut call) {
            Ok(target) => target,
            Err(err) => return ActorCallResult::failed(&err, dev),
        };
        let Some(action) = call.action else {
            return match runtime.resolve(target).await {
                Ok(info) => ActorCallResult {
                    error: None,
                    output: None,
                    actor_id: Some(info.id.to_string()),
                },
                Err(err) => ActorCallResult::failed(&err, dev),
            };
        };
        let args = Payload::cbor(call.args.to_vec());
        match runtime
            .call_from(target, &action, args, Encoding::Cbor, call.chain)
            .await
        {
            Ok(output) => ActorCallResult {
                error: None,
                output: Some(Buffer::from(output.bytes)),
                actor_id: None,
            },
            Err(err) => ActorCallResult::failed(&err, dev),
        }
    }
}

#[napi]
impl CoreRegistry {
    /// Opens (`held`) or closes a keep-awake hold on a live actor, for `c.keepAwake`. Returns
    /// an error object instead of throwing (`actor.stopped` if the actor is not awake).
    #[napi]
    pub fn keep_awake(&self, actor_id: String, held: bool) -> Option<ErrorInfo> {
        self.running()
            .and_then(|runtime| runtime.keep_awake(&actor_id, held))
            .err()
            .map(|err| ErrorInfo::from_error(&err, false))
    }
}

impl ActorCallResult {
    fn failed(err: &keel_core::Error, dev: bool) -> ActorCallResult {
        ActorCallResult {
            error: Some(ErrorInfo::from_error(err, dev)),
            output: None,
            actor_id: None,
        }
    }
}
