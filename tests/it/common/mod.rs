//! Test harness: the real daemon binary on a temp sled directory, and real
//! HTTP receivers on loopback that record every request they get.
#![allow(dead_code)] // each test file uses its own part of the harness

pub mod browser;

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
pub use nexor_webhookd_harness::Signal;
use nexor_webhookd_harness::{Process, Server, StartError};
use serde_json::Value;

pub const CLIENT_A: &str = "6f1c1a3e-2b6e-4c1e-9d55-0c8a3f7e9b10";
pub const CLIENT_B: &str = "0d2b7f4c-93a1-4b0e-8f7d-2e5c9a1b3c4d";

/// Waits until `cond` holds, or panics after `limit` saying what was awaited.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One request as a receiver saw it.
#[derive(Clone, Debug)]
pub struct Hit {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
    pub answered: u16,
}

impl Hit {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("delivery body is JSON")
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str).unwrap_or("")
    }
}

/// A loopback HTTP receiver. How it answers depends on the path's first
/// segment: `/ok/…` 200, `/fail/…` 500, `/flaky/N/…` 503 for the first N
/// requests on that path then 200, `/each/N/…` 500 for the first N requests
/// of each event_id on that path,
/// `/hang/…` waits 5 s, `/slow/…` waits 300 ms then 200, `/gate/…` waits
/// until the gate is open ([`Receiver::set_gate`]) then 200, `/redirect/…` 302
/// to `/ok/redirected`, `/code/N/…` answers N, `/once/N/…` answers N to
/// the first request on that path and 200 after (`/once/N/gate/…` waits for
/// the gate first), `/retry-secs/N/…` 429 with
/// `Retry-After: N`, `/retry-date/N/…` 503 with `Retry-After` N seconds
/// ahead as an HTTP-date.
#[derive(Clone)]
pub struct Receiver {
    pub base: String,
    server: Arc<Server>,
    seen: Seen,
}

/// What the receiver has seen, and its gate: the handler's state.
#[derive(Clone)]
struct Seen {
    hits: Arc<Mutex<Vec<Hit>>>,
    counts: Arc<Mutex<HashMap<String, u64>>>,
    /// Per path: requests waiting at the gate now, and the most at once.
    at_gate: Arc<Mutex<HashMap<String, (u64, u64)>>>,
    gate: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let gate = Arc::new(tokio::sync::watch::Sender::new(false));
        let seen =
            Seen { hits: Default::default(), counts: Default::default(), at_gate: Default::default(), gate };
        let app = axum::Router::new().fallback(answer).with_state(seen.clone());
        let server = Arc::new(Server::start(app, 1).expect("start a receiver"));
        Receiver { base: server.base.clone(), server, seen }
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// Opens or closes the gate `/gate/…` requests wait for.
    pub fn set_gate(&self, open: bool) {
        self.seen.gate.send_replace(open);
    }

    /// Requests that arrived on `path` so far, answered or not.
    pub fn arrivals(&self, path: &str) -> u64 {
        self.seen.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// The most requests on `path` that waited at the gate at once.
    pub fn gate_peak(&self, path: &str) -> u64 {
        self.seen.at_gate.lock().unwrap().get(path).map_or(0, |g| g.1)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.seen.hits.lock().unwrap().clone()
    }

    pub fn hits_on(&self, path: &str) -> Vec<Hit> {
        self.hits().into_iter().filter(|h| h.path == path).collect()
    }
}

async fn answer(State(r): State<Seen>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let n = {
        let mut counts = r.counts.lock().unwrap();
        let c = counts.entry(path.clone()).or_default();
        *c += 1;
        *c
    };
    let mut parts = path.trim_start_matches('/').split('/');
    let n_arg =
        |parts: &mut std::str::Split<'_, char>| parts.next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(1);
    let retry_date;
    let retry_secs;
    let (status, extra): (u16, Option<(&str, &str)>) = match parts.next() {
        Some("code") => (n_arg(&mut parts) as u16, None),
        Some("retry-secs") => {
            retry_secs = n_arg(&mut parts).to_string();
            (429, Some(("retry-after", retry_secs.as_str())))
        }
        Some("retry-date") => {
            let at = std::time::SystemTime::now() + Duration::from_secs(n_arg(&mut parts));
            retry_date = httpdate::fmt_http_date(at);
            (503, Some(("retry-after", retry_date.as_str())))
        }
        Some("fail") => (500, None),
        Some("once") => {
            let code = n_arg(&mut parts) as u16;
            // `/once/N/gate/…` waits at the gate first.
            if parts.next() == Some("gate") {
                let _ = r.gate.subscribe().wait_for(|open| *open).await;
            }
            (if n == 1 { code } else { 200 }, None)
        }
        Some("flaky") => {
            let first_failures: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(1);
            (if n <= first_failures { 503 } else { 200 }, None)
        }
        Some("each") => {
            let first_failures: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(1);
            let event_id = serde_json::from_slice::<Value>(&body).ok().map(|v| v["event_id"].to_string());
            let mut counts = r.counts.lock().unwrap();
            let c = counts.entry(format!("{path} {}", event_id.unwrap_or_default())).or_default();
            *c += 1;
            (if *c <= first_failures { 500 } else { 200 }, None)
        }
        Some("hang") => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            (200, None)
        }
        Some("gate") => {
            {
                let mut at_gate = r.at_gate.lock().unwrap();
                let g = at_gate.entry(path.clone()).or_default();
                g.0 += 1;
                g.1 = g.1.max(g.0);
            }
            let _ = r.gate.subscribe().wait_for(|open| *open).await;
            r.at_gate.lock().unwrap().get_mut(&path).expect("counted on arrival").0 -= 1;
            (200, None)
        }
        Some("slow") => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            (200, None)
        }
        Some("redirect") => (302, Some(("location", "/ok/redirected"))),
        _ => (200, None),
    };
    r.hits.lock().unwrap().push(Hit {
        path,
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body: body.to_vec(),
        at: Instant::now(),
        answered: status,
    });
    let status = StatusCode::from_u16(status).unwrap();
    match extra {
        Some((k, v)) => (status, [(k, v)], format!("answer {status}")).into_response(),
        None => (status, format!("answer {status}")).into_response(),
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `[[webhooks]]` table.
pub fn webhook(id: &str, client: &str, url: &str, events: &str) -> String {
    format!(
        "[[webhooks]]\nid = \"{id}\"\nclient_id = \"{client}\"\nurl = \"{url}\"\nsecret = \"whsec_{id}\"\nevents = {events}\n\n"
    )
}

/// An HTTP client for the daemon's API: statuses are answers, not errors,
/// and no request waits longer than `timeout`.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .new_agent()
}

/// The real `nexor-webhookd` binary running on a temp directory.
pub struct Daemon {
    pub base: String,
    pub dir: tempfile::TempDir,
    server_extra: String,
    /// The sled directory: `dir/data` unless the test chose another place.
    pub storage: PathBuf,
    /// Extra arguments after `run --config FILE`.
    pub run_args: Vec<String>,
    /// Extra environment variables for the daemon.
    pub env: Vec<(String, String)>,
    /// The daemon's `RLIMIT_NOFILE` (soft, hard), when the test sets one.
    pub nofile: Option<(u64, u64)>,
    process: Option<Process>,
    agent: ureq::Agent,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nexor-webhookd")
}

impl Daemon {
    /// Starts the daemon with `[server]` and `[storage]` filled in and `rest`
    /// (delivery settings, webhooks) appended.
    pub fn start(server_extra: &str, rest: &str) -> Daemon {
        Daemon::start_with_storage(None, server_extra, rest)
    }

    /// Like [`Daemon::start`], with the sled directory at `storage` (on a
    /// filesystem the test controls) instead of in the temp directory.
    pub fn start_with_storage(storage: Option<&Path>, server_extra: &str, rest: &str) -> Daemon {
        let mut d = Daemon::configured(storage, server_extra, rest);
        d.spawn();
        d
    }

    /// The daemon's temp directory and config file, not started yet.
    pub fn configured(storage: Option<&Path>, server_extra: &str, rest: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let agent = agent(Duration::from_secs(30));
        let storage = storage.map(Path::to_owned).unwrap_or_else(|| dir.path().join("data"));
        let d = Daemon {
            base: format!("http://127.0.0.1:{port}"),
            dir,
            server_extra: server_extra.to_owned(),
            storage,
            run_args: Vec::new(),
            env: Vec::new(),
            nofile: None,
            process: None,
            agent,
        };
        d.write_config(rest);
        d
    }

    /// Writes the config file: `[server]` and `[storage]` as at start, then `rest`.
    pub fn write_config(&self, rest: &str) {
        let text = format!(
            "[server]\nlisten = \"{}\"\n{}\n\n[storage]\npath = \"{}\"\n\n{rest}",
            self.base.trim_start_matches("http://"),
            self.server_extra,
            self.storage.display()
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Drops the test's pooled keep-alive connections to the daemon, for
    /// tests that count the daemon's connections.
    pub fn forget_connections(&mut self) {
        self.agent = agent(Duration::from_secs(30));
    }

    /// Sends a signal to the running daemon.
    pub fn signal(&self, sig: Signal) {
        self.process.as_ref().expect("daemon running").signal(sig);
    }

    /// Waits until the daemon's log contains `text` `count` times in all.
    pub fn wait_log(&self, text: &str, count: usize) {
        wait_for(&format!("{count}x {text:?} in the log"), Duration::from_secs(15), || {
            self.log().matches(text).count() >= count
        });
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        if let Err(code) = self.try_spawn(Duration::from_secs(20)) {
            panic!("daemon exited with {code:?} during start:\n{}", self.log());
        }
    }

    /// Starts the daemon and waits until it is healthy; its exit code if it
    /// exits first. Panics if neither happens within `limit`.
    fn try_spawn(&mut self, limit: Duration) -> Result<(), Option<i32>> {
        // systemd's watchdog variables name the daemon's own pid, known only
        // once it runs: a shell sets WATCHDOG_PID to its pid and execs the
        // daemon in its place.
        let mut command = if self.env.iter().any(|(k, _)| k == "WATCHDOG_USEC") {
            let mut sh = Command::new("sh");
            sh.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", bin()]);
            sh
        } else {
            Command::new(bin())
        };
        command
            .args(["run", "--config"])
            .arg(self.config_path())
            .args(&self.run_args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            // SAFETY: setrlimit is async-signal-safe, as a pre_exec hook must be.
            unsafe {
                command.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                });
            }
        }
        let log = self.dir.path().join("daemon.log");
        match Process::start(command, &log, &format!("{}/healthz", self.base), limit) {
            Ok((process, _)) => {
                self.process = Some(process);
                Ok(())
            }
            Err(StartError::Exited(status)) => Err(status.code()),
            Err(e) => panic!("{e}:\n{}", self.log()),
        }
    }

    /// SIGKILL: no chance to flush or finish anything.
    pub fn kill9(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.process.take()?.terminate().unwrap().code()
    }

    /// Starts the daemon again after `terminate` or `kill9`.
    pub fn start_again(&mut self) {
        assert!(self.process.is_none(), "still running");
        self.spawn();
    }

    /// Starts the daemon expecting it to fail: returns its exit code and
    /// what it logged during this start.
    pub fn start_failing(&mut self, limit: Duration) -> (Option<i32>, String) {
        match self.start_failing_or_ready(limit) {
            (None, _) => panic!("the daemon started:\n{}", self.log()),
            failed => failed,
        }
    }

    /// Starts the daemon: `(None, "")` once it is healthy (and running), or
    /// its exit code and what it logged during this start if it exits first.
    pub fn start_failing_or_ready(&mut self, limit: Duration) -> (Option<i32>, String) {
        assert!(self.process.is_none(), "still running");
        let before = self.log().len();
        match self.try_spawn(limit) {
            Ok(()) => (None, String::new()),
            Err(code) => (code, self.log()[before..].to_owned()),
        }
    }

    /// Runs the binary's command `args` with this daemon's config; its exit
    /// code, stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = std::process::Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .output()
            .unwrap();
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (out.status.code(), text(out.stdout), text(out.stderr))
    }

    /// The running daemon's process id.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().and_then(Process::pid).expect("daemon running")
    }

    /// Whether the daemon process has exited (reaping it if so); its exit code.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let status = self.process.as_mut()?.exited()?;
        self.process = None;
        Some(status.code())
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        let auth = token.map(|t| format!("Bearer {t}"));
        let result = match method {
            "GET" => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = self.agent.post(&url).header("content-type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.send(body.unwrap_or(b""))
            }
        };
        match result {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let text = resp.body_mut().read_to_string().unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
            }
            Err(_) => (0, Value::Null),
        }
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None, None)
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.request("POST", path, None, Some(body.as_bytes()))
    }

    /// Posts an event for `client`; returns the status and the answer.
    pub fn send(&self, event_type: &str, client: &str, data: &str) -> (u16, Value) {
        self.post(
            "/v1/events",
            &format!(r#"{{"event_type":"{event_type}","client_id":"{client}","data":{data}}}"#),
        )
    }

    pub fn event(&self, event_id: &str) -> Value {
        let (status, v) = self.get(&format!("/v1/events/{event_id}"));
        assert_eq!(status, 200, "GET event {event_id}: {v}");
        v
    }

    /// Waits until every delivery of the event has one of `statuses`.
    pub fn wait_settled(&self, event_id: &str, statuses: &[&str], limit: Duration) -> Value {
        let mut last = Value::Null;
        wait_for(&format!("event {event_id} to settle"), limit, || {
            last = self.event(event_id);
            last["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| statuses.contains(&d["status"].as_str().unwrap()))
        });
        last
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The `v1=` signature of `body` sent at `timestamp` (unix seconds, as
/// text) with `secret`, as the contract defines it.
pub fn v1_signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Runs `nexor-webhookd verify`; returns its exit code and first line of output.
pub fn verify_cli(
    secret: &str,
    timestamp: &str,
    signature: &str,
    body: &Path,
    tolerance: &str,
) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(["verify", "--secret", secret, "--timestamp", timestamp, "--signature", signature])
        .args(["--tolerance", tolerance, "--body"])
        .arg(body)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn write_file(path: &Path, text: &str) {
    std::fs::File::create(path).unwrap().write_all(text.as_bytes()).unwrap();
}

/// A tmpfs of `size` (mount's syntax, e.g. "20m") on a temp directory,
/// unmounted when dropped; `None` where mounting is not allowed (not root).
/// CI runs as root: there it must work.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root and must be able to mount a tmpfs");
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Grows (or shrinks) the filesystem in place.
    pub fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot resize the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// The descriptors a process has open (from /proc).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Raises this test process's soft `RLIMIT_NOFILE` to its hard limit: the
/// tests that open hundreds of connections must not run out themselves.
pub fn raise_own_nofile() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// A raw keep-alive connection to the daemon, for tests about connections
/// themselves (the HTTP agent would hide them in its pool).
pub struct Conn(pub std::net::TcpStream);

impl Conn {
    pub fn open(base: &str) -> Conn {
        let s = std::net::TcpStream::connect(base.trim_start_matches("http://")).unwrap();
        s.set_nodelay(true).unwrap();
        Conn(s)
    }

    /// Writes `bytes` as they are (a partial request head, say).
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes)
    }

    /// Sends one request; its status and body, or `None` if no whole answer
    /// came within `limit` (the connection was closed, or nothing came).
    pub fn request(&mut self, method: &str, path: &str, body: &str, limit: Duration) -> Option<(u16, Value)> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.0.peer_addr().unwrap(),
            body.len()
        );
        self.write(format!("{head}{body}").as_bytes()).ok()?;
        self.answer(limit)
    }

    /// Reads one answer (with a `content-length`); `None` if none came in
    /// full within `limit`.
    pub fn answer(&mut self, limit: Duration) -> Option<(u16, Value)> {
        use std::io::Read;
        let deadline = Instant::now() + limit;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let end = buf.windows(4).position(|w| w == b"\r\n\r\n");
            if let Some(end) = end {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let status = head.split(' ').nth(1)?.parse().ok()?;
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    let body = &buf[end + 4..end + 4 + len];
                    let text = String::from_utf8_lossy(body).into_owned();
                    return Some((status, serde_json::from_str(&text).unwrap_or(Value::String(text))));
                }
            }
            let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
            self.0.set_read_timeout(Some(left)).unwrap();
            match self.0.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether the daemon has closed this connection: a read sees the end
    /// (or a reset) within `wait`. Bytes that come meanwhile are dropped.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        use std::io::{ErrorKind, Read};
        let deadline = Instant::now() + wait;
        let mut chunk = [0u8; 4096];
        loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                return false;
            };
            self.0.set_read_timeout(Some(left)).unwrap();
            match self.0.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
                Err(_) => return true,
            }
        }
    }
}

/// `openssl s_server` with a fresh self-signed certificate, if openssl exists.
pub fn openssl_server() -> Option<(Child, String, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-keyout", "key.pem", "-out", "cert.pem"])
        .current_dir(dir.path())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    if !made.success() {
        return None;
    }
    let port = free_port();
    let server = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-www",
            "-cert",
            "cert.pem",
            "-key",
            "key.pem",
            "-accept",
            &port.to_string(),
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_for("openssl s_server", Duration::from_secs(15), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Some((server, format!("https://127.0.0.1:{port}/"), dir))
}
