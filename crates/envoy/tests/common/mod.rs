//! A real Rivet Engine for tests: the binary from the npm devDependency
//! `@rivetkit/engine-cli-linux-x64-musl`, on loopback-only random ports with a temp data dir
//! and telemetry off, killed when the test ends (even by a panic).

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_envoy::{EngineConfig, EngineEvent};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

/// The namespace every engine bootstraps.
pub const NAMESPACE: &str = "default";

/// How long a harness step (engine start, runner config, an engine event) may take before
/// the test fails: a bound on a hang, not a measurement.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the engine binary is: `KEEL_RIVET_ENGINE`, or the devDependency under
/// `node_modules`.
pub fn engine_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KEEL_RIVET_ENGINE") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../node_modules/@rivetkit/engine-cli-linux-x64-musl/rivet-engine")
}

/// One engine process and its data dir.
pub struct TestEngine {
    child: Option<Child>,
    dir: tempfile::TempDir,
    guard_port: u16,
    api_peer_port: u16,
    metrics_port: u16,
}

impl TestEngine {
    /// Starts an engine and waits until it answers `/health` and `pool` has a runner config.
    pub async fn start(pool: &str) -> TestEngine {
        TestEngine::start_with(pool, json!({})).await
    }

    /// Like [`TestEngine::start`], with `pegboard` settings (the engine's actor scheduler).
    pub async fn start_with(pool: &str, pegboard: Value) -> TestEngine {
        let binary = engine_binary();
        assert!(
            binary.is_file(),
            "the Rivet Engine binary is missing at {}: run `npm install` in the repository root \
             (it is the devDependency @rivetkit/engine-cli-linux-x64-musl), or set KEEL_RIVET_ENGINE",
            binary.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let [guard_port, api_peer_port, metrics_port] = free_ports();
        // Every listener on 127.0.0.1 (the engine binds all interfaces by default), no
        // telemetry (on by default), and no load shedding: by default the engine's workflow
        // worker skips a growing share of due workflows (actor creation and start among them)
        // once the CPU of its whole cgroup, other processes included, passes 70%.
        let config = json!({
            "guard": { "host": "127.0.0.1", "port": guard_port },
            "api_peer": { "host": "127.0.0.1", "port": api_peer_port },
            "metrics": { "host": "127.0.0.1", "port": metrics_port },
            "telemetry": { "enabled": false },
            "runtime": { "worker_load_shedding_curve": [[999, 1000], [1000, 999]] },
            "pegboard": pegboard,
            "file_system": { "path": dir.path().join("db") },
        });
        std::fs::write(dir.path().join("engine.json"), config.to_string()).expect("config");
        let mut engine = TestEngine {
            child: None,
            dir,
            guard_port,
            api_peer_port,
            metrics_port,
        };
        engine.spawn();
        engine.wait_healthy().await;
        engine.upsert_runner_config(pool).await;
        engine
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("engine.log"))
            .expect("engine log");
        let mut command = Command::new(engine_binary());
        command
            .arg("start")
            .arg("--config")
            .arg(self.dir.path().join("engine.json"))
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("engine log"))
            .stderr(log);
        // If this test process dies without running destructors (SIGKILL, abort), the kernel
        // kills the engine too, so no engine outlives its test.
        // SAFETY: `prctl` is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(command.spawn().expect("start the engine"));
    }

    /// The guard address, what an envoy connects to and clients call.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.guard_port)
    }

    /// The guard's port on 127.0.0.1.
    pub fn guard_port(&self) -> u16 {
        self.guard_port
    }

    /// An envoy config for this engine and `pool`.
    pub fn config(&self, pool: &str) -> EngineConfig {
        EngineConfig {
            endpoint: self.endpoint(),
            namespace: NAMESPACE.to_string(),
            pool: pool.to_string(),
            token: None,
        }
    }

    /// Kills the engine as a crash would (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // Already exited is fine: it is gone either way.
            let _ = child.wait();
        }
    }

    /// Starts the engine again on the same data dir and ports, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_healthy().await;
    }

    /// Waits for `/health`. The engine is another process with no readiness signal besides
    /// answering, so this polls, with a deadline.
    async fn wait_healthy(&self) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Ok((200, _)) = self.request("GET", "/health", None).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the engine did not answer /health within {STEP_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Upserts `pool`'s runner config, retrying while the namespace is still being
    /// bootstrapped (`/health` answers before it exists).
    async fn upsert_runner_config(&self, pool: &str) {
        let body = json!({ "datacenters": { "default": { "normal": {}, "drain_on_version_upgrade": true } } });
        let path = format!("/runner-configs/{pool}?namespace={NAMESPACE}");
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match self.request("PUT", &path, Some(&body)).await {
                Ok((200, _)) => return,
                other => assert!(
                    Instant::now() < deadline,
                    "the runner config upsert kept failing: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates an actor through the engine's API and returns its id.
    pub async fn create_actor(&self, name: &str, key: &str, pool: &str, input: &[u8]) -> String {
        use base64::Engine as _;
        let body = json!({
            "name": name,
            "key": key,
            "input": base64::engine::general_purpose::STANDARD.encode(input),
            "runner_name_selector": pool,
            "crash_policy": "sleep",
        });
        let (status, reply) = self
            .request(
                "POST",
                &format!("/actors?namespace={NAMESPACE}"),
                Some(&body),
            )
            .await
            .expect("POST /actors");
        assert_eq!(status, 200, "POST /actors answered {reply}");
        reply["actor"]["actor_id"]
            .as_str()
            .expect("actor_id")
            .to_string()
    }

    /// One HTTP/1.1 request to the guard; the body, if any, is JSON. Returns the status and
    /// the body parsed as JSON (`Null` if it is not JSON).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<(u16, Value)> {
        http(self.guard_port, method, path, body).await
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("engine.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = writeln!(std::io::stderr(), "engine log tail:\n{}", self.log_tail());
        }
        self.kill();
    }
}

/// Three distinct free loopback ports. They are free when returned; the engine binds them a
/// moment later.
fn free_ports() -> [u16; 3] {
    let listeners: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect();
    [ports[0], ports[1], ports[2]]
}

/// A minimal HTTP/1.1 client (one request per connection) for 127.0.0.1.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let mut payload = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        payload = dechunk(&payload);
    }
    Ok((
        status,
        serde_json::from_slice(&payload).unwrap_or(Value::Null),
    ))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// The next engine event, failing the test if none comes within [`STEP_TIMEOUT`].
pub async fn next_event(events: &mut mpsc::Receiver<EngineEvent>) -> EngineEvent {
    tokio::time::timeout(STEP_TIMEOUT, events.recv())
        .await
        .expect("an engine event within the step timeout")
        .expect("the event channel is open")
}
