//! A loopback relay between the envoy client and the engine, so that the time keel takes to
//! reconnect after an engine outage is decided here and not by the client's backoff.
//!
//! The pinned client reconnects after a dropped socket with a backoff it does not let anyone
//! set: 1 s, then 2, 4, 8, ... up to 30 s (plus 0-25% jitter), counting every failed attempt
//! and reset only after a connection that lasted a minute. Against an engine that takes a few
//! seconds to restart, its attempts at about 1 s and 3 s after the drop are refused and the
//! next one is 4 s (or 8 s) away, while the engine has been answering for seconds.
//!
//! So the client connects to this relay instead (`http://127.0.0.1:<port>`, the engine's path
//! kept), which is always there: an attempt of the client never fails while the engine is
//! down, it waits here. For each connection the relay reads the client's WebSocket upgrade
//! request and offers it to the engine; while the engine does not answer (refused, reset, or
//! `5xx` while it starts), it offers it again every [`RETRY_INTERVAL`], so the client's
//! attempt goes through as soon as the engine accepts. Once the engine answers `101` the
//! relay copies bytes both ways until either side closes, and the engine's close is the
//! client's close: the client sees every drop as it did, with its own consequences (requests
//! in flight fail as indeterminate, its lost timeout runs, events are replayed on `Init`).
//!
//! What must stay true:
//! - The relay is a byte pipe once connected: it never reads, drops or reorders a frame, so
//!   fencing, generations and acknowledgements are the client's and the engine's as before.
//! - It relays only the envoy's own `.../envoys/connect` upgrades, to the configured engine.
//! - An answer of the engine other than `101` or `5xx` (a refused token, an unknown
//!   namespace) reaches the client unchanged: the relay retries only an engine that is not
//!   there yet.
//! - Nothing of the relay outlives [`Relay::stop`] but the connections already relayed, which
//!   end with their socket.
//!
//! Only `http://` endpoints go through it: the client checks a `https://` engine's certificate
//! against the host it dials, so it dials the engine itself and keeps its own backoff.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// How long the relay waits before offering a held connection to the engine again. The
/// engine is another process with nothing to wait on but its answer, so this is a poll: a
/// refused connect costs both sides next to nothing.
pub(crate) const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// The most one attempt to reach the engine (TCP connect, then its answer to the upgrade)
/// may take before it is abandoned and made again: an engine that accepted the connection
/// but is still starting may not answer it at all.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client may take to send its upgrade request after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest request or response head the relay reads: an upgrade's is well under 1 KiB.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The engine's address as the relay needs it.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port`, what the relay dials (a name is resolved on each attempt).
    address: String,
    /// The `Host` header the engine is sent: the endpoint's authority as written.
    authority: String,
    /// The endpoint's path, without a trailing `/` (usually empty).
    base_path: String,
}

impl Target {
    /// The target of an `http://host[:port][/path]` endpoint; `None` for any other.
    fn parse(endpoint: &str) -> Option<Target> {
        let rest = endpoint.trim().strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        // A port follows the last `:` unless that is inside an IPv6 literal (`[::1]`).
        let has_port = authority
            .rfind(':')
            .is_some_and(|at| !authority[at..].contains(']'));
        let address = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Some(Target {
            address,
            authority: authority.to_string(),
            base_path: path.trim_end_matches('/').to_string(),
        })
    }
}

/// A running relay. Dropping it does not stop it: [`Relay::stop`] does.
pub(crate) struct Relay {
    /// The endpoint the client is given instead of the engine's.
    endpoint: String,
    /// Cancelled by [`Relay::stop`]: the accept loop ends and so does every connection still
    /// waiting for the engine. Relayed connections do not watch it.
    stop: CancellationToken,
}

impl Relay {
    /// Starts a relay to the engine at `endpoint` on a free loopback port. `None` if the
    /// endpoint is not `http://` (the client then dials the engine itself).
    pub(crate) async fn start(endpoint: &str) -> io::Result<Option<Relay>> {
        let Some(target) = Target::parse(endpoint) else {
            return Ok(None);
        };
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let local = listener.local_addr()?;
        let stop = CancellationToken::new();
        let relay = Relay {
            endpoint: format!("http://{local}{}", target.base_path),
            stop: stop.clone(),
        };
        let span = tracing::debug_span!("engine_relay", engine = %target.authority, %local);
        tokio::spawn(accept_loop(listener, target, stop).instrument(span));
        Ok(Some(relay))
    }

    /// The endpoint to give the client: this relay's address with the engine's path.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Stops accepting and drops every connection still waiting for the engine. Connections
    /// already relayed go on until either side closes them.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, target: Target, stop: CancellationToken) {
    loop {
        tokio::select! {
            // Stopped: the listener closes with this task.
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let connection = relay_connection(client, target.clone(), stop.clone());
                    let span = tracing::debug_span!("relayed_connection", %peer);
                    tokio::spawn(connection.instrument(span));
                }
                Err(err) => {
                    // Out of file descriptors, typically: the client's next attempt retries.
                    tracing::warn!(error = %err, "the engine relay could not accept a connection");
                    tokio::time::sleep(RETRY_INTERVAL).await;
                }
            },
        }
    }
}

/// One client connection: its upgrade offered to the engine until the engine takes it, then
/// bytes copied both ways.
async fn relay_connection(mut client: TcpStream, target: Target, stop: CancellationToken) {
    let _ = client.set_nodelay(true); // Best effort: only latency depends on it.
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(head)) => head,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "the engine relay got no upgrade request");
            return;
        }
        Err(_) => {
            tracing::debug!("the engine relay got no upgrade request in time");
            return;
        }
    };
    let Some(request) = rewrite_request(&request.head, &target) else {
        tracing::warn!("the engine relay refused a request that is not the envoy's upgrade");
        let _ = client
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        return;
    };
    let started = Instant::now();
    let mut failed_attempts = 0u32;
    let (mut engine, response) = loop {
        let attempt = tokio::select! {
            // Stopped while waiting for the engine: the client sees its attempt fail.
            () = stop.cancelled() => return,
            attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, offer(&target, &request)) => attempt,
        };
        let why = match attempt {
            Ok(Ok((engine, response))) if retry_status(&response.head).is_none() => {
                break (engine, response);
            }
            Ok(Ok((_, response))) => {
                format!("answered {}", retry_status(&response.head).unwrap_or(0))
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
        };
        if failed_attempts == 0 {
            tracing::info!(
                reason = %why,
                retry_ms = RETRY_INTERVAL.as_millis() as u64,
                "the engine is not answering; offering the envoy's connection again until it does"
            );
        }
        failed_attempts += 1;
        tokio::select! {
            // Stopped while waiting for the engine: the client sees its attempt fail.
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RETRY_INTERVAL) => {}
        }
    };
    if failed_attempts > 0 {
        tracing::info!(
            waited_ms = started.elapsed().as_millis() as u64,
            attempts = failed_attempts + 1,
            "the engine answers again"
        );
    }
    // The engine's answer (and whatever followed it in the same read) goes to the client as
    // it came; from here the relay is a pipe.
    if client.write_all(&response.head).await.is_err()
        || client.write_all(&response.rest).await.is_err()
    {
        return;
    }
    match tokio::io::copy_bidirectional(&mut client, &mut engine).await {
        Ok((sent, received)) => {
            tracing::debug!(sent, received, "a relayed engine connection closed");
        }
        Err(err) => {
            tracing::debug!(error = %err, "a relayed engine connection ended");
        }
    }
}

/// One attempt: connects to the engine and sends it the upgrade request; returns the socket
/// and the engine's answer.
async fn offer(target: &Target, request: &[u8]) -> io::Result<(TcpStream, Head)> {
    let mut engine = TcpStream::connect(&target.address).await?;
    let _ = engine.set_nodelay(true); // Best effort: only latency depends on it.
    engine.write_all(request).await?;
    let response = read_head(&mut engine).await?;
    Ok((engine, response))
}

/// An HTTP head read off a socket, and the bytes read after it.
struct Head {
    /// The head, through its blank line.
    head: Vec<u8>,
    /// What came after it in the same reads.
    rest: Vec<u8>,
}

/// Reads until the end of an HTTP head (`\r\n\r\n`), at most [`MAX_HEAD_BYTES`].
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the end of the HTTP head",
            ));
        }
        let searched_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf[searched_from..]
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
        {
            let end = searched_from + at + 4;
            let rest = buf.split_off(end);
            return Ok(Head { head: buf, rest });
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP head too long",
            ));
        }
    }
}

/// The client's upgrade request as the engine is sent it: its `Host` the engine's. `None` if
/// it is not a `GET` of `<base path>/envoys/connect`.
fn rewrite_request(head: &[u8], target: &Target) -> Option<Vec<u8>> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?;
    let mut parts = request_line.split(' ');
    let (method, path) = (parts.next()?, parts.next()?);
    let expected = format!("{}/envoys/connect", target.base_path);
    let path_only = path.split('?').next().unwrap_or(path);
    if method != "GET" || path_only != expected {
        return None;
    }
    let mut out = String::with_capacity(head.len() + target.authority.len());
    out.push_str(request_line);
    out.push_str("\r\n");
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let is_host = line
            .split_once(':')
            .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("host"));
        if is_host {
            out.push_str("Host: ");
            out.push_str(&target.authority);
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    Some(out.into_bytes())
}

/// The status of an engine's answer that means "not there yet, ask again": any `5xx` (a
/// guard whose services are still starting), or a head that is not an HTTP answer. `None`
/// for an answer the client must see (`101`, or the engine refusing it).
fn retry_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let status = std::str::from_utf8(line)
        .ok()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|status| status.parse::<u16>().ok());
    match status {
        Some(status) if status >= 500 => Some(status),
        Some(_) => None,
        None => Some(0),
    }
}

/// The relay's local address, for tests of this module.
#[cfg(test)]
fn local_addr(relay: &Relay) -> std::net::SocketAddr {
    relay
        .endpoint
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|address| address.parse().ok())
        .expect("the relay's endpoint names its address")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_endpoints_only() {
        let target = Target::parse("http://127.0.0.1:6420").unwrap();
        assert_eq!(
            (target.address.as_str(), target.authority.as_str()),
            ("127.0.0.1:6420", "127.0.0.1:6420")
        );
        assert_eq!(target.base_path, "");
        let target = Target::parse("http://engine.internal/rivet/").unwrap();
        assert_eq!(target.address, "engine.internal:80");
        assert_eq!(target.base_path, "/rivet");
        assert_eq!(Target::parse("http://[::1]").unwrap().address, "[::1]:80");
        assert_eq!(
            Target::parse("http://[::1]:7000").unwrap().address,
            "[::1]:7000"
        );
        assert!(Target::parse("https://engine.example").is_none());
        assert!(Target::parse("http://user@engine").is_none());
    }

    #[test]
    fn rewrites_the_host_of_the_envoy_s_upgrade_and_refuses_anything_else() {
        let target = Target::parse("http://engine:6420").unwrap();
        let head = b"GET /envoys/connect?namespace=default HTTP/1.1\r\nHost: 127.0.0.1:1\r\nUpgrade: websocket\r\n\r\n";
        let rewritten = String::from_utf8(rewrite_request(head, &target).unwrap()).unwrap();
        assert_eq!(
            rewritten,
            "GET /envoys/connect?namespace=default HTTP/1.1\r\nHost: engine:6420\r\nUpgrade: websocket\r\n\r\n"
        );
        assert!(rewrite_request(b"GET /actors HTTP/1.1\r\nHost: x\r\n\r\n", &target).is_none());
        assert!(
            rewrite_request(b"POST /envoys/connect HTTP/1.1\r\nHost: x\r\n\r\n", &target).is_none()
        );
    }

    #[test]
    fn retries_only_an_engine_that_is_not_there_yet() {
        assert_eq!(
            retry_status(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            None
        );
        assert_eq!(retry_status(b"HTTP/1.1 403 Forbidden\r\n\r\n"), None);
        assert_eq!(
            retry_status(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
            Some(503)
        );
        assert_eq!(retry_status(b"garbage\r\n\r\n"), Some(0));
    }

    /// A fake engine on `port` that answers each upgrade with `status`, then echoes.
    async fn engine_answering(listener: TcpListener, status: &'static str) {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let head = read_head(&mut socket).await.expect("a request");
                assert!(String::from_utf8_lossy(&head.head).contains("Host: 127.0.0.1:"));
                socket
                    .write_all(format!("HTTP/1.1 {status}\r\n\r\nhello").as_bytes())
                    .await
                    .expect("answer");
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    }

    async fn upgrade(relay: &Relay) -> TcpStream {
        let mut client = TcpStream::connect(local_addr(relay)).await.unwrap();
        client
            .write_all(b"GET /envoys/connect?x=1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
            .await
            .unwrap();
        client
    }

    /// A relay to a port that is free now, where nobody listens yet.
    async fn relay_to_nobody() -> (u16, Relay) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let relay = Relay::start(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap()
            .unwrap();
        (port, relay)
    }

    #[tokio::test]
    async fn holds_a_connection_until_the_engine_listens_then_pipes_it() {
        let (port, relay) = relay_to_nobody().await;
        let mut client = upgrade(&relay).await;
        // Several attempts are refused meanwhile; the client's connection stays open.
        tokio::time::sleep(RETRY_INTERVAL * 4).await;
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let listening = Instant::now();
        tokio::spawn(engine_answering(listener, "101 Switching Protocols"));
        let head = read_head(&mut client).await.expect("the engine's answer");
        assert!(listening.elapsed() < RETRY_INTERVAL * 3);
        assert!(head.head.starts_with(b"HTTP/1.1 101"));
        let mut greeting = head.rest;
        while greeting.len() < 5 {
            let mut byte = [0u8; 8];
            let n = client.read(&mut byte).await.unwrap();
            greeting.extend_from_slice(&byte[..n]);
        }
        assert_eq!(greeting, b"hello");
        client.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        client.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        relay.stop();
        // A relayed connection outlives the stop; new ones are not accepted.
        client.write_all(b"more").await.unwrap();
        client.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"more");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(local_addr(&relay)).await.is_err());
    }

    #[tokio::test]
    async fn passes_an_engine_s_refusal_through_and_stops_holding_when_stopped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(engine_answering(listener, "403 Forbidden"));
        let relay = Relay::start(&endpoint).await.unwrap().unwrap();
        let mut client = upgrade(&relay).await;
        let head = read_head(&mut client).await.expect("the engine's answer");
        assert!(head.head.starts_with(b"HTTP/1.1 403"));
        relay.stop();

        // A connection held for an engine that is not there ends at the stop.
        let (_, relay) = relay_to_nobody().await;
        let mut client = upgrade(&relay).await;
        tokio::time::sleep(RETRY_INTERVAL * 2).await;
        relay.stop();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("closed at the stop")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
