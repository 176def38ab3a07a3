//! The inspector: an HTTP API under `/v1/inspector/` for looking into a running runtime.
//!
//! It lists actors (awake and asleep, from the database), reads an actor's committed state,
//! KV entries, schedules and open connections, and calls actions. It reads without waking
//! anyone: a sleeping actor stays asleep. Values that the host encodes (state, KV values,
//! schedule arguments) leave as base64 with the host's encoding named, for a client that knows
//! the encoding (keel's TypeScript inspector client) to decode. KV keys leave decoded by core's
//! KV key codec (`kv_key.rs`): a string key as its text, a byte key as base64, each with its
//! `keyType`.
//!
//! Who may use it (see [`InspectorConfig`]):
//! - With a configured token, or in dev mode (which generates one and prints it once on
//!   stderr), every request must carry `Authorization: Bearer <token>`; anything else gets
//!   `401 auth.unauthorized`. Without a token outside dev mode the routes do not exist
//!   (`404 request.route_not_found`).
//! - Only loopback peers are answered (`403 auth.forbidden` otherwise) unless `allow_remote`
//!   is set. A serverless request has no peer address, so it too needs `allow_remote`.
//!
//! What must stay true:
//! - The token never reaches a log line, an error message or a `Debug` form, and is compared
//!   in time that does not depend on how much of it a guess got right.
//! - The peer check runs before the token check, so a remote peer learns nothing about the
//!   token.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{InspectorConfig, RuntimeConfig};
use crate::error::{Error, Result};
use crate::key;
use crate::kv_key::{self, KvKey, StoredKey};
use crate::server::shared::{error_response, PeerAddr, Server};
use crate::storage::seam::ActorListing;

/// The most items one inspector page holds.
pub const MAX_PAGE_LEN: usize = 1000;
/// Items per page when `limit` is not given.
pub const DEFAULT_PAGE_LEN: usize = 100;
/// The `WWW-Authenticate` challenge of a `401`.
const CHALLENGE: &str = "Bearer realm=\"keel-inspector\"";

/// The inspector's routes over `server`, or no routes at all when the inspector is off.
/// `call` is the route that calls an action by id (the public one, behind the inspector's
/// guard here).
pub(crate) fn routes(
    server: &Arc<Server>,
    call: axum::routing::MethodRouter<Arc<Server>>,
) -> Router<Arc<Server>> {
    let Some(auth) = Auth::from_config(&server.config) else {
        return Router::new();
    };
    Router::new()
        .route("/v1/inspector/actors", get(list_actors))
        .route("/v1/inspector/actors/{id}", get(actor))
        .route("/v1/inspector/actors/{id}/state", get(state))
        .route("/v1/inspector/actors/{id}/kv", get(kv))
        .route("/v1/inspector/actors/{id}/schedules", get(schedules))
        .route("/v1/inspector/actors/{id}/connections", get(connections))
        .route("/v1/inspector/actors/{id}/actions/{action}", call)
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::new(auth),
            authorize,
        ))
}

/// Who may use the inspector.
struct Auth {
    /// The token requests must carry.
    token: Vec<u8>,
    /// Whether peers off the loopback interface (and unknown peers) are answered.
    allow_remote: bool,
}

impl Auth {
    /// The configured token, or in dev mode a generated one, announced once; `None` when the
    /// inspector is off.
    fn from_config(config: &RuntimeConfig) -> Option<Auth> {
        let InspectorConfig {
            token,
            allow_remote,
        } = &config.inspector;
        let token = match token {
            Some(token) => token.expose().as_bytes().to_vec(),
            None if config.dev => {
                let token = generate_token();
                tracing::info!(
                    "inspector enabled with a generated token; it is printed once on stderr and never logged"
                );
                // Deliberately not a log line: logs are shipped and stored, the token must not be.
                eprintln!("keel inspector token (dev mode, generated for this run): {token}");
                token.into_bytes()
            }
            None => return None,
        };
        Some(Auth {
            token,
            allow_remote: *allow_remote,
        })
    }

    fn peer_allowed(&self, peer: Option<SocketAddr>) -> bool {
        self.allow_remote || peer.is_some_and(|peer| peer.ip().to_canonical().is_loopback())
    }

    fn token_presented(&self, headers: &HeaderMap) -> bool {
        bearer_token(headers).is_some_and(|presented| tokens_match(presented, &self.token))
    }
}

/// 32 random bytes as 64 hex digits.
fn generate_token() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The credentials of an `Authorization: Bearer <token>` header (scheme in any case).
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let scheme = b"bearer ";
    if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return None;
    }
    let credentials = value[scheme.len()..].trim_ascii();
    (!credentials.is_empty()).then_some(credentials)
}

/// Compares a presented token with the expected one in constant time (`subtle`). The
/// presented bytes are read cyclically up to the expected length, so the comparison always
/// runs over every byte of the expected token; which presented byte it reads depends only on
/// the position and on the presented length, which the caller already knows. So the time
/// taken tells nothing about how many bytes were right, nor the expected token's length.
fn tokens_match(presented: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let len = presented.len().max(1);
    let cycled: Vec<u8> = (0..expected.len())
        .map(|i| presented.get(i % len).copied().unwrap_or(0))
        .collect();
    let same_len = (presented.len() as u64).ct_eq(&(expected.len() as u64));
    (cycled.ct_eq(expected) & same_len).into()
}

/// The route layer in front of every inspector route: peer check, then token check.
async fn authorize(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<PeerAddr>().map(|peer| peer.0);
    if !auth.peer_allowed(peer) {
        let err = Error::Forbidden {
            message:
                "the inspector answers only loopback peers unless inspector.allowRemote is set"
                    .into(),
        };
        return error_response(&err, false);
    }
    if !auth.token_presented(request.headers()) {
        let mut response = error_response(&Error::Unauthorized, false);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(CHALLENGE),
        );
        return response;
    }
    next.run(request).await
}

/// Query parameters of the listing routes.
#[derive(Deserialize, Default)]
struct PageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    /// `actors`: only this actor type.
    name: Option<String>,
    /// `kv`: only string keys that start with this text.
    prefix: Option<String>,
    /// `kv`: only byte keys that start with these bytes (base64url).
    #[serde(rename = "bytesPrefix")]
    bytes_prefix: Option<String>,
}

impl PageQuery {
    fn limit(&self) -> Result<usize> {
        match self.limit {
            None => Ok(DEFAULT_PAGE_LEN),
            Some(limit) if (1..=MAX_PAGE_LEN).contains(&limit) => Ok(limit),
            Some(_) => Err(Error::malformed(format!(
                "limit must be from 1 to {MAX_PAGE_LEN}"
            ))),
        }
    }
}

type QueryResult = std::result::Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>;
type IdPath = std::result::Result<Path<String>, axum::extract::rejection::PathRejection>;

/// Renders a handler's result: the JSON value, or the error with its status.
fn reply(server: &Server, result: Result<Value>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(err) => error_response(&err, server.config.dev),
    }
}

fn listing_json(server: &Server, listing: &ActorListing) -> Result<Value> {
    Ok(json!({
        "actorId": listing.id,
        "name": listing.name,
        "key": key::decode(&listing.key)?,
        "createdAt": listing.created_at_ms,
        "awake": server.is_awake(&listing.id),
    }))
}

/// The actor's listing, or `actor.not_found`.
async fn find(server: &Arc<Server>, id: &str) -> Result<ActorListing> {
    server.settle_commits(id).await?;
    server
        .storage
        .actor_listing(id)
        .await?
        .ok_or(Error::ActorNotFound)
}

async fn list_actors(State(server): State<Arc<Server>>, query: QueryResult) -> Response {
    let result = async {
        let Query(query) = query?;
        let limit = query.limit()?;
        let after = query.cursor.as_deref().map(decode_cursor).transpose()?;
        let name = query.name.clone();
        let listings = server.storage.list_actors(name, after, limit).await?;
        let next = (listings.len() == limit)
            .then(|| listings.last().map(encode_cursor))
            .flatten();
        let actors = listings
            .iter()
            .map(|listing| listing_json(&server, listing))
            .collect::<Result<Vec<_>>>()?;
        Ok(json!({ "actors": actors, "nextCursor": next }))
    }
    .await;
    reply(&server, result)
}

async fn actor(State(server): State<Arc<Server>>, id: IdPath) -> Response {
    let result = async {
        let Path(id) = id?;
        listing_json(&server, &find(&server, &id).await?)
    }
    .await;
    reply(&server, result)
}

async fn state(State(server): State<Arc<Server>>, id: IdPath) -> Response {
    let result = async {
        let Path(id) = id?;
        server.settle_commits(&id).await?;
        let snapshot = server
            .storage
            .load(&id)
            .await?
            .ok_or(Error::ActorNotFound)?;
        Ok(json!({
            "actorId": id,
            "encoding": server.host.state_encoding().as_str(),
            "state": snapshot.state.as_deref().map(base64::encode),
        }))
    }
    .await;
    reply(&server, result)
}

async fn kv(State(server): State<Arc<Server>>, id: IdPath, query: QueryResult) -> Response {
    let result = async {
        let Path(id) = id?;
        let Query(query) = query?;
        let limit = query.limit()?;
        let prefix = match (&query.prefix, &query.bytes_prefix) {
            (Some(_), Some(_)) => {
                return Err(Error::malformed(
                    "give prefix (string keys) or bytesPrefix (byte keys), not both",
                ))
            }
            (Some(text), None) => kv_key::encode(&KvKey::Text(text.clone())),
            (None, Some(bytes)) => kv_key::encode(&KvKey::Bytes(
                base64::decode(bytes)
                    .ok_or_else(|| Error::malformed("bytesPrefix must be base64url"))?,
            )),
            (None, None) => Vec::new(),
        };
        let after = match &query.cursor {
            Some(cursor) => {
                Some(base64::decode(cursor).ok_or_else(|| Error::malformed("invalid cursor"))?)
            }
            None => None,
        };
        find(&server, &id).await?;
        server.settle_commits(&id).await?;
        let entries = server.storage.kv_page(&id, prefix, after, limit).await?;
        let next = (entries.len() == limit)
            .then(|| entries.last().map(|(key, _)| base64::encode_url(key)))
            .flatten();
        let entries: Vec<Value> = entries
            .iter()
            .map(|(key, value)| {
                let (key, key_type) = match kv_key::decode(key) {
                    StoredKey::Key(KvKey::Text(text)) => (text, "string"),
                    StoredKey::Key(KvKey::Bytes(bytes)) => (base64::encode(&bytes), "bytes"),
                    StoredKey::Raw(raw) => (base64::encode(&raw), "raw"),
                };
                json!({ "key": key, "keyType": key_type, "value": base64::encode(value) })
            })
            .collect();
        Ok(json!({
            "actorId": id,
            "encoding": server.host.state_encoding().as_str(),
            "entries": entries,
            "nextCursor": next,
        }))
    }
    .await;
    reply(&server, result)
}

async fn schedules(State(server): State<Arc<Server>>, id: IdPath) -> Response {
    let result = async {
        let Path(id) = id?;
        find(&server, &id).await?;
        server.settle_commits(&id).await?;
        let stored = server.storage.schedules_of(&id).await?;
        let schedules: Vec<Value> = stored
            .iter()
            .map(|stored| {
                json!({
                    "id": stored.schedule.id,
                    "at": stored.schedule.at_ms,
                    "action": stored.schedule.action,
                    "args": base64::encode(&stored.schedule.args),
                    "attempts": stored.attempts,
                })
            })
            .collect();
        Ok(json!({ "actorId": id, "encoding": "cbor", "schedules": schedules }))
    }
    .await;
    reply(&server, result)
}

async fn connections(State(server): State<Arc<Server>>, id: IdPath) -> Response {
    let result = async {
        let Path(id) = id?;
        find(&server, &id).await?;
        let connections: Vec<Value> = server
            .connections
            .of(&id)
            .into_iter()
            .map(|info| {
                json!({
                    "id": info.id,
                    "openedAt": info.opened_at_ms,
                    "details": &*info.details,
                })
            })
            .collect();
        Ok(json!({ "actorId": id, "connections": connections }))
    }
    .await;
    reply(&server, result)
}

/// An actors cursor: the last listed `(name, key)` as a JSON pair, base64url.
fn encode_cursor(listing: &ActorListing) -> String {
    base64::encode_url(json!([listing.name, listing.key]).to_string().as_bytes())
}

fn decode_cursor(cursor: &str) -> Result<(String, String)> {
    base64::decode(cursor)
        .and_then(|bytes| serde_json::from_slice::<(String, String)>(&bytes).ok())
        .ok_or_else(|| Error::malformed("invalid cursor"))
}

/// Base64 (RFC 4648), by the `base64` crate: the standard alphabet with padding for bodies,
/// the URL alphabet without padding for query parameters; decoding takes either alphabet,
/// padded or not, and refuses non-canonical text (stray bits after the last byte).
mod base64 {
    use base64::alphabet;
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
    use base64::engine::{DecodePaddingMode, Engine as _};

    /// URL alphabet, written unpadded.
    const URL: GeneralPurpose = GeneralPurpose::new(
        &alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    /// Standard alphabet, read padded or not.
    const STANDARD_ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );

    /// Standard alphabet, padded.
    pub(super) fn encode(bytes: &[u8]) -> String {
        STANDARD.encode(bytes)
    }

    /// URL alphabet, unpadded.
    pub(super) fn encode_url(bytes: &[u8]) -> String {
        URL.encode(bytes)
    }

    /// Decodes either alphabet, padded or not; `None` for anything malformed.
    pub(super) fn decode(text: &str) -> Option<Vec<u8>> {
        STANDARD_ANY_PADDING
            .decode(text)
            .or_else(|_| URL.decode(text))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_when_equal() {
        let expected = b"0123456789abcdef0123456789abcdef";
        assert!(tokens_match(expected, expected));
        assert!(!tokens_match(b"", expected));
        assert!(!tokens_match(b"0123456789abcdef", expected), "a prefix");
        assert!(!tokens_match(
            b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            expected
        ));
        let mut wrong = *expected;
        wrong[31] ^= 1;
        assert!(!tokens_match(&wrong, expected), "the last byte counts");
        wrong = *expected;
        wrong[0] ^= 0x80;
        assert!(!tokens_match(&wrong, expected), "the first byte counts");
    }

    #[test]
    fn bearer_credentials_are_read_in_any_case() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bEaReR  abc "),
        );
        assert_eq!(bearer_token(&headers), Some(&b"abc"[..]));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), None);
    }

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let (a, b) = (generate_token(), generate_token());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn loopback_peers_only_unless_remote_is_allowed() {
        let auth = Auth {
            token: b"x".to_vec(),
            allow_remote: false,
        };
        let peer = |text: &str| Some(text.parse::<SocketAddr>().unwrap());
        assert!(auth.peer_allowed(peer("127.0.0.1:1")));
        assert!(auth.peer_allowed(peer("[::1]:1")));
        assert!(auth.peer_allowed(peer("[::ffff:127.0.0.1]:1")));
        assert!(!auth.peer_allowed(peer("10.0.0.1:1")));
        assert!(!auth.peer_allowed(None), "no peer address: serverless");
        let open = Auth {
            allow_remote: true,
            ..auth
        };
        assert!(open.peer_allowed(peer("10.0.0.1:1")) && open.peer_allowed(None));
    }

    #[test]
    fn base64_round_trips_in_both_alphabets() {
        for len in 0..70u8 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37) ^ 0xfa).collect();
            assert_eq!(base64::decode(&base64::encode(&bytes)).unwrap(), bytes);
            assert_eq!(base64::decode(&base64::encode_url(&bytes)).unwrap(), bytes);
        }
        assert_eq!(base64::encode(b"hello"), "aGVsbG8=");
        assert_eq!(base64::encode_url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64::decode("a"), None);
        assert_eq!(base64::decode("a*=="), None);
        assert_eq!(base64::decode("aGVsbG9="), None, "non-zero leftover bits");
        assert_eq!(base64::decode("aGVsbG8").unwrap(), b"hello", "unpadded");
        assert_eq!(base64::decode("-_8").unwrap(), [0xfb, 0xff], "URL alphabet");
        assert_eq!(
            base64::decode("+/8=").unwrap(),
            [0xfb, 0xff],
            "standard alphabet"
        );
    }
}
