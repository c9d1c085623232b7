//! The TOML configuration: parsing and validation only.
//!
//! [`parse`] turns the file's text into a [`Config`] or into the list of
//! every problem, each with its line; the daemon's `config::load` reads the
//! file and makes that a [`ConfigError`] (`FILE:LINE: reason`). Whatever
//! validation needs from outside the text — a secret kept in a file or an
//! environment variable, whether a log filter parses — it asks of an
//! [`Outside`] it is given, so parsing is a function of its inputs. The
//! daemon refuses to start unless this module is satisfied, and
//! `check-config` runs exactly the same code.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;
use uuid::Uuid;

use crate::event::EventType;
use crate::target;
use crate::{clock, sign};

const DEFAULT_LISTEN: &str = "127.0.0.1:8088";
const DEFAULT_STORAGE: &str = "/var/lib/nexor-webhookd";
const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SCHEDULE: [Duration; 3] =
    [Duration::from_secs(60), Duration::from_secs(300), Duration::from_secs(1800)];
const DEFAULT_WORKERS: u64 = 64;
const DEFAULT_CACHE: u64 = 16 * 1024 * 1024;
/// Where the API token comes from when the file names none.
pub const TOKEN_ENV: &str = "NEXOR_WEBHOOKD_API_TOKEN";
const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
const DEFAULT_MIN_FREE: u64 = 64 * 1024 * 1024;
const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Svix disables an endpoint after five days of failures; a small install
/// has an admin who reads the notification sooner, and holding a day's
/// deliveries costs little.
const DEFAULT_PAUSE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// So that one failure after a long quiet spell does not pause at once.
const DEFAULT_PAUSE_MIN_FAILURES: u64 = 5;
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Things worth an admin's attention that do not stop the daemon.
    pub warnings: Vec<String>,
    pub server: Server,
    pub storage: Storage,
    pub delivery: Delivery,
    /// Where operational events (a webhook paused or resumed) go.
    pub notify: Option<Notify>,
    webhooks: Vec<Webhook>,
    /// Whether any secret is written in the file itself.
    inline_secrets: bool,
    by_id: HashMap<Uuid, usize>,
    by_client: HashMap<Uuid, Vec<usize>>,
}

#[derive(Debug)]
pub struct Server {
    pub listen: SocketAddr,
    pub api_token: Option<Secret>,
    pub max_body: usize,
    /// How long a stop waits for requests and attempts in flight.
    pub shutdown_grace: Duration,
    /// The log filter when `RUST_LOG` is not set.
    pub log_level: String,
    /// A request head must arrive whole within this of a connection opening,
    /// or of its first byte on a kept-alive connection.
    pub header_timeout: Duration,
    /// A kept-alive connection with no request under way is closed after this.
    pub idle_timeout: Duration,
    /// Most API connections open at once; `None`: derived at start from the
    /// open-files limit (see `server`).
    pub max_connections: Option<usize>,
}

#[derive(Debug)]
pub struct Storage {
    pub path: PathBuf,
    pub cache_capacity: u64,
    /// Final deliveries and their events are deleted this long after ingest.
    pub retention: Duration,
    /// Ingest answers 503 while the disk has less free space than this.
    pub min_free_space: u64,
    /// Writes waiting this long with nothing done end the process.
    pub stall_limit: Duration,
}

#[derive(Debug)]
pub struct Delivery {
    pub timeout: Duration,
    pub retry_schedule: Vec<Duration>,
    pub allow_private_targets: bool,
    /// Non-public ranges webhooks may reach even when private targets are not allowed.
    pub allowed_cidrs: Vec<IpNet>,
    /// Refuse plain `http://` webhook URLs.
    pub https_only: bool,
    pub workers: usize,
    /// Most attempts of one webhook in flight at once.
    pub per_webhook_in_flight: usize,
    /// Retry delays are stretched by a random fraction of themselves below this.
    pub retry_jitter: f64,
    /// The most a receiver's `Retry-After` may push a retry back.
    pub max_retry_after: Duration,
    /// A webhook whose attempts have all failed for this long (and at least
    /// `pause_min_failures` times) is paused; `None`: never.
    pub pause_after: Option<Duration>,
    pub pause_min_failures: u32,
    /// Every attempt goes through this HTTP proxy (host, port).
    pub proxy: Option<(String, u16)>,
}

/// `[notify]`: an endpoint that gets operational events, signed as
/// deliveries are.
#[derive(Debug)]
pub struct Notify {
    pub url: String,
    pub secret: Secret,
}

#[derive(Debug)]
pub struct Webhook {
    pub id: Uuid,
    pub client_id: Uuid,
    pub url: String,
    pub secret: Secret,
    /// Secrets being rotated out, each signing until its expiry (ms since the epoch).
    pub previous_secrets: Vec<(Secret, i64)>,
    pub events: Events,
    pub enabled: bool,
    /// Also send the Standard Webhooks headers, keyed by this (decoded) key.
    pub standard_key: Option<Secret<Vec<u8>>>,
    /// This webhook's `pause_after` (see [`Delivery::pause_after`]).
    pub pause_after: Option<Duration>,
    /// Most attempts per second (a token bucket holding a second's worth,
    /// at least one); over it deliveries wait, they do not fail.
    pub rate_limit: Option<f64>,
    /// Overrides `[delivery] per_webhook_in_flight`.
    pub max_in_flight: Option<usize>,
    /// Overrides `[delivery] timeout`.
    pub timeout: Option<Duration>,
    /// `ordering = "fifo"`: one delivery at a time, in the order the events
    /// came in; the next waits until the one before succeeds or finally
    /// fails.
    pub fifo: bool,
    /// Static extra headers sent with every attempt, names in lower case;
    /// a value may be a credential (`Authorization`), so it is a secret.
    pub headers: Vec<(String, Secret)>,
}

/// A string that never shows itself in `Debug` output or logs.
#[derive(Clone)]
pub struct Secret<T = String>(T);

impl<T> Secret<T> {
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Events {
    All,
    Only(Vec<EventType>),
}

impl Webhook {
    /// The secrets that sign a delivery sent at `now_ms`: the current one
    /// first, then each previous one until it expires.
    pub fn signing_secrets(&self, now_ms: i64) -> impl Iterator<Item = &str> {
        std::iter::once(self.secret.expose().as_str()).chain(
            self.previous_secrets
                .iter()
                .filter(move |(_, exp)| *exp > now_ms)
                .map(|(s, _)| s.expose().as_str()),
        )
    }

    pub fn subscribes_to(&self, t: EventType) -> bool {
        match &self.events {
            Events::All => true,
            Events::Only(list) => list.contains(&t),
        }
    }
}

impl Config {
    pub fn webhook(&self, id: &Uuid) -> Option<&Webhook> {
        self.by_id.get(id).map(|&i| &self.webhooks[i])
    }

    pub fn webhooks(&self) -> &[Webhook] {
        &self.webhooks
    }

    /// Whether any secret is written in the file itself (not a file of its
    /// own or the environment), which makes the file's mode matter.
    pub fn has_inline_secrets(&self) -> bool {
        self.inline_secrets
    }

    /// The enabled webhooks of `client` subscribed to `t`: an event's fan-out.
    pub fn subscribers(&self, client: &Uuid, t: EventType) -> impl Iterator<Item = &Webhook> {
        self.by_client
            .get(client)
            .into_iter()
            .flatten()
            .map(|&i| &self.webhooks[i])
            .filter(move |w| w.enabled && w.subscribes_to(t))
    }
}

impl Config {
    /// Settings of `self` that differ in `new` but only take effect at start.
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |differs: bool, name| {
            if differs {
                changed.push(name)
            }
        };
        check(self.server.listen != new.server.listen, "[server] listen");
        check(self.server.max_body != new.server.max_body, "[server] max_body");
        check(self.server.log_level != new.server.log_level, "[server] log_level");
        check(self.server.max_connections != new.server.max_connections, "[server] max_connections");
        check(self.storage.path != new.storage.path, "[storage] path");
        check(self.storage.cache_capacity != new.storage.cache_capacity, "[storage] cache_capacity");
        check(self.delivery.workers != new.delivery.workers, "[delivery] workers");
        check(
            self.delivery.per_webhook_in_flight != new.delivery.per_webhook_in_flight,
            "[delivery] per_webhook_in_flight",
        );
        changed
    }

    /// Webhooks enabled in `new` that are gone or disabled in `self`.
    pub fn resumed_in(&self, new: &Config) -> HashSet<Uuid> {
        new.stopped_in(self)
    }

    /// Webhooks of `self` that are gone or disabled in `new`.
    pub fn stopped_in(&self, new: &Config) -> HashSet<Uuid> {
        self.webhooks
            .iter()
            .filter(|w| w.enabled && !new.webhook(&w.id).is_some_and(|n| n.enabled))
            .map(|w| w.id)
            .collect()
    }
}

/// Every problem found in one file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

#[derive(Debug)]
pub struct Problem {
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, p.message)?,
                None => write!(f, "{}: {}", self.file.display(), p.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A store stuck this long with writes waiting is taken for wedged (sled,
/// after a write failed inside its own threads, hangs without an error).
const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(60);

/// What marks the example config's secret as a placeholder.
const PLACEHOLDER_SECRET: &str = "change_me";

/// What validation needs from outside the config's text. The daemon's
/// implementation reads the files and the environment; tests give a table.
pub trait Outside {
    /// The contents of the file at `path` (a secret kept in its own file).
    fn read_file(&self, path: &Path) -> std::io::Result<String>;
    /// The value of the environment variable `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
    /// Why `filter` is not a log level or filter the daemon's logger takes.
    fn log_filter_error(&self, filter: &str) -> Option<String>;
}

/// Reads a secret kept in its own file (trailing newline trimmed).
fn read_secret_file(c: &mut Checker, v: &Spanned<String>, base: &Path, key: &str) -> Option<String> {
    let path = base.join(v.get_ref());
    match c.outside.read_file(&path) {
        Ok(s) if !s.trim_end_matches(['\n', '\r']).is_empty() => {
            Some(s.trim_end_matches(['\n', '\r']).to_owned())
        }
        Ok(_) => c.fail(v.span(), format!("{key}: {} is empty", path.display())),
        Err(e) => c.fail(v.span(), format!("{key}: cannot read {}: {e}", path.display())),
    }
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    delivery: RawDelivery,
    notify: Option<RawNotify>,
    #[serde(default)]
    webhooks: Vec<RawWebhook>,
}

#[derive(Deserialize)]
struct RawNotify {
    url: Spanned<String>,
    secret: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    secret_env: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
struct RawServer {
    listen: Option<Spanned<String>>,
    api_token: Option<Spanned<String>>,
    api_token_file: Option<Spanned<String>>,
    max_body: Option<Spanned<u64>>,
    shutdown_grace: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    header_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
struct RawStorage {
    path: Option<Spanned<String>>,
    cache_capacity: Option<Spanned<u64>>,
    retention: Option<Spanned<String>>,
    min_free_space: Option<Spanned<u64>>,
    stall_limit: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
struct RawDelivery {
    timeout: Option<Spanned<String>>,
    retry_schedule: Option<Vec<Spanned<String>>>,
    allow_private_targets: Option<bool>,
    allowed_cidrs: Option<Vec<Spanned<String>>>,
    https_only: Option<bool>,
    workers: Option<Spanned<u64>>,
    per_webhook_in_flight: Option<Spanned<u64>>,
    retry_jitter: Option<Spanned<f64>>,
    max_retry_after: Option<Spanned<String>>,
    pause_after: Option<Spanned<String>>,
    pause_min_failures: Option<Spanned<u64>>,
    proxy: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawWebhook {
    id: Spanned<String>,
    client_id: Spanned<String>,
    url: Spanned<String>,
    secret: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    secret_env: Option<Spanned<String>>,
    #[serde(default)]
    previous_secrets: Vec<RawPrevious>,
    events: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    standard_webhooks: bool,
    pause_after: Option<Spanned<String>>,
    rate_limit: Option<Spanned<f64>>,
    max_in_flight: Option<Spanned<u64>>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, Spanned<String>>,
    ordering: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawPrevious {
    secret: Spanned<String>,
    expires: Spanned<String>,
}

fn yes() -> bool {
    true
}

/// Collects problems with their line numbers while validation goes on, so one
/// run reports everything that is wrong.
struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
    outside: &'a dyn Outside,
}

impl Checker<'_> {
    fn line_of(&self, span: Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())].matches('\n').count() + 1
    }

    fn fail<T>(&mut self, span: Range<usize>, message: impl Into<String>) -> Option<T> {
        let line = Some(self.line_of(span));
        self.problems.push(Problem { line, message: message.into() });
        None
    }

    fn duration(&mut self, v: &Spanned<String>, key: &str) -> Option<Duration> {
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => self.fail(v.span(), format!("{key} must be longer than zero")),
            Err(e) => self.fail(
                v.span(),
                format!("{key}: {:?} is not a duration like \"10s\" or \"5m\" ({e})", v.get_ref()),
            ),
        }
    }

    /// A duration, or `"never"`: `Some(None)`.
    fn duration_or_never(&mut self, v: &Spanned<String>, key: &str) -> Option<Option<Duration>> {
        if v.get_ref() == "never" {
            return Some(None);
        }
        self.duration(v, key).map(Some)
    }

    fn uuid(&mut self, v: &Spanned<String>, key: &str) -> Option<Uuid> {
        match Uuid::parse_str(v.get_ref()) {
            Ok(id) if v.get_ref().len() == 36 => Some(id),
            _ => self.fail(v.span(), format!("{key}: {:?} is not a uuid", v.get_ref())),
        }
    }

    fn positive(&mut self, v: &Spanned<u64>, key: &str) -> Option<u64> {
        if *v.get_ref() == 0 {
            return self.fail(v.span(), format!("{key} must be at least 1"));
        }
        Some(*v.get_ref())
    }
}

/// Whether the value at byte `at` belongs to a key that holds a secret: a
/// key named like one (`secret`, `previous_secrets`, `api_token`) between
/// the start of the entry holding `at` (its line, or the line of the key a
/// multi-line array starts on) and `at`.
fn about_a_secret(text: &str, at: usize) -> bool {
    let at = at.min(text.len());
    let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1));
    let entry_start = line_starts
        .take_while(|&i| i <= at)
        .filter(|&i| {
            let line = text[i..].lines().next().unwrap_or("").trim_start();
            line.starts_with(|ch: char| ch.is_ascii_alphabetic()) && line.contains('=')
        })
        .last()
        .unwrap_or(0);
    // The entry's own key, and whatever lies between it and the value.
    let key_end = text[entry_start..].find('=').map_or(at, |i| entry_start + i);
    let entry = text[entry_start..at.max(key_end)].to_ascii_lowercase();
    entry.contains("secret") || entry.contains("token")
}

/// The line of `key` in the table at `table` (serde_ignored's path, like
/// `storage` or `webhooks.2`): the first line after the table's header that
/// sets it.
fn line_of_key(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut parts = table.split('.');
    let name = parts.next().unwrap_or("");
    let index: usize = parts.next().and_then(|i| i.parse().ok()).unwrap_or(0);
    let lines: Vec<&str> = text.lines().collect();
    let header = |l: &str| {
        let l = l.trim();
        l == format!("[{name}]") || l == format!("[[{name}]]")
    };
    let start = match name {
        "" => 0,
        _ => lines.iter().enumerate().filter(|(_, l)| header(l)).nth(index).map(|(i, _)| i + 1)?,
    };
    lines[start..]
        .iter()
        .position(|l| l.trim_start().strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('=')))
        .map(|i| start + i + 1)
}

/// A parser message with every quoted value (`"…"` or `` `…` ``) replaced:
/// serde echoes the value it could not take, and for a secret that would put
/// it in `check-config` output and the log of a refused reload.
fn redact_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest[open..].chars().next().expect("found");
        out.push_str(&rest[..=open]);
        match rest[open + 1..].find(quote) {
            Some(close) => {
                out.push_str("<redacted>");
                out.push(quote);
                rest = &rest[open + 1 + close + 1..];
            }
            None => {
                out.push_str("<redacted>");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Validates the config `text`; relative paths in it (storage, secret
/// files) are taken relative to `base`, the directory holding the file.
pub fn parse(text: &str, base: &Path, outside: &dyn Outside) -> Result<Config, Vec<Problem>> {
    let mut c = Checker { text, problems: Vec::new(), outside };
    // Unknown keys are collected, not fatal, so that one run names them
    // all along with every other problem.
    let mut unknown = Vec::new();
    let parsed: Result<RawConfig, toml::de::Error> =
        serde_ignored::deserialize(toml::Deserializer::new(text), |path| unknown.push(path.to_string()));
    for path in &unknown {
        let (table, key) = path.rsplit_once('.').unwrap_or(("", path));
        let line = line_of_key(text, table, key);
        let place = if table.is_empty() { String::new() } else { format!(" in {table}") };
        c.problems.push(Problem { line, message: format!("unknown field `{key}`{place}") });
    }
    let raw = match parsed {
        Ok(raw) => raw,
        Err(e) => {
            let line = e.span().map(|s| c.line_of(s.clone()));
            let mut message = e.message().trim().to_owned();
            if message.is_empty() {
                // toml says nothing for some errors, `A=` for one.
                message = "not valid TOML here (a value missing or malformed?)".into();
            }
            if e.span().is_some_and(|s| about_a_secret(text, s.start)) {
                message = redact_values(&message);
            }
            c.problems.push(Problem { line, message });
            return Err(c.problems);
        }
    };

    let listen = match &raw.server.listen {
        None => Some(DEFAULT_LISTEN.parse().expect("valid default")),
        Some(v) => v.get_ref().parse::<SocketAddr>().ok().or_else(|| {
            c.fail(v.span(), format!("listen: {:?} is not an address like \"127.0.0.1:8088\"", v.get_ref()))
        }),
    };
    let mut inline_secrets = raw.server.api_token.is_some();
    let mut placeholders = false;
    let api_token = match (&raw.server.api_token, &raw.server.api_token_file) {
        (Some(_), Some(f)) => c.fail(f.span(), "set api_token or api_token_file, not both"),
        (Some(v), None) if v.get_ref().is_empty() => {
            c.fail(v.span(), "api_token is empty; remove the key or set a token")
        }
        (Some(v), None) => Some(Secret(v.get_ref().clone())),
        (None, Some(f)) => read_secret_file(&mut c, f, base, "api_token_file").map(Secret),
        (None, None) => c.outside.var(TOKEN_ENV).filter(|t| !t.is_empty()).map(Secret),
    };
    // It travels in an HTTP header, which carries ASCII: `tök` could never
    // match what a client sends. (The token itself is never echoed.)
    let api_token = api_token.and_then(|t| {
        let text = t.expose();
        if text.bytes().all(|b| (0x20..0x7f).contains(&b)) && text.trim() == text {
            return Some(t);
        }
        let span = (raw.server.api_token.as_ref().map(|v| v.span()))
            .or_else(|| raw.server.api_token_file.as_ref().map(|f| f.span()))
            .unwrap_or(0..0);
        c.fail(span, "the API token may hold only printable ASCII, with no space at either end (it travels in an HTTP header)")
    });
    if let (Some(addr), None) = (listen, &api_token) {
        if !addr.ip().is_loopback() {
            let span = raw.server.listen.as_ref().map(|v| v.span()).unwrap_or(0..0);
            c.fail::<()>(
                span,
                format!("listen = {addr} is not a loopback address, so [server] api_token is required"),
            );
        }
    }
    let max_body = match &raw.server.max_body {
        None => Some(DEFAULT_MAX_BODY),
        Some(v) => c.positive(v, "max_body"),
    };

    let storage_path = match &raw.storage.path {
        None => Some(PathBuf::from(DEFAULT_STORAGE)),
        Some(v) if v.get_ref().is_empty() => c.fail(v.span(), "storage path is empty"),
        Some(v) => Some(base.join(v.get_ref())),
    };
    let cache_capacity = match &raw.storage.cache_capacity {
        None => Some(DEFAULT_CACHE),
        Some(v) => c.positive(v, "cache_capacity"),
    };
    let min_free_space = raw.storage.min_free_space.as_ref().map_or(DEFAULT_MIN_FREE, |v| *v.get_ref());
    let stall_limit = match &raw.storage.stall_limit {
        None => Some(DEFAULT_STALL_LIMIT),
        Some(v) => c.duration(v, "stall_limit"),
    };
    let retention = match &raw.storage.retention {
        None => Some(DEFAULT_RETENTION),
        Some(v) => c.duration(v, "retention"),
    };
    let shutdown_grace = match &raw.server.shutdown_grace {
        None => Some(DEFAULT_GRACE),
        Some(v) => c.duration(v, "shutdown_grace"),
    };
    let header_timeout = match &raw.server.header_timeout {
        None => Some(DEFAULT_HEADER_TIMEOUT),
        Some(v) => c.duration(v, "header_timeout"),
    };
    let idle_timeout = match &raw.server.idle_timeout {
        None => Some(DEFAULT_IDLE_TIMEOUT),
        Some(v) => c.duration(v, "idle_timeout"),
    };
    let max_connections = match &raw.server.max_connections {
        None => Some(None),
        Some(v) => c.positive(v, "max_connections").map(|n| Some(n as usize)),
    };
    let log_level = match &raw.server.log_level {
        None => Some("info".to_owned()),
        Some(v) => match c.outside.log_filter_error(v.get_ref()) {
            None => Some(v.get_ref().clone()),
            Some(e) => {
                c.fail(v.span(), format!("log_level: {:?} is not a level or filter ({e})", v.get_ref()))
            }
        },
    };

    let timeout = match &raw.delivery.timeout {
        None => Some(DEFAULT_TIMEOUT),
        Some(v) => c.duration(v, "timeout"),
    };
    let retry_schedule: Vec<Option<Duration>> = match &raw.delivery.retry_schedule {
        None => DEFAULT_SCHEDULE.iter().copied().map(Some).collect(),
        Some(list) => list.iter().map(|v| c.duration(v, "retry_schedule")).collect(),
    };
    let allow_private_targets = raw.delivery.allow_private_targets.unwrap_or(false);
    let https_only = raw.delivery.https_only.unwrap_or(false);
    let allowed_cidrs: Vec<IpNet> = raw
        .delivery
        .allowed_cidrs
        .iter()
        .flatten()
        .filter_map(|v| match target::parse_cidr(v.get_ref()) {
            Ok(cidr) => Some(cidr),
            Err(e) => c.fail(v.span(), format!("allowed_cidrs: {e}")),
        })
        .collect();
    let workers = match &raw.delivery.workers {
        None => Some(DEFAULT_WORKERS),
        Some(v) => c.positive(v, "workers"),
    };
    let per_webhook_in_flight = match &raw.delivery.per_webhook_in_flight {
        None => workers.map(|w| (w / 4).max(1)),
        Some(v) => c.positive(v, "per_webhook_in_flight"),
    };
    let retry_jitter = match &raw.delivery.retry_jitter {
        None => Some(0.0),
        Some(v) if (0.0..=1.0).contains(v.get_ref()) => Some(*v.get_ref()),
        Some(v) => c.fail(v.span(), "retry_jitter must be a fraction from 0 to 1"),
    };
    let max_retry_after = match &raw.delivery.max_retry_after {
        None => Some(DEFAULT_MAX_RETRY_AFTER),
        Some(v) => c.duration(v, "max_retry_after"),
    };
    let pause_after = match &raw.delivery.pause_after {
        None => Some(Some(DEFAULT_PAUSE_AFTER)),
        Some(v) => c.duration_or_never(v, "pause_after"),
    };
    let pause_min_failures = match &raw.delivery.pause_min_failures {
        None => Some(DEFAULT_PAUSE_MIN_FAILURES),
        Some(v) => c.positive(v, "pause_min_failures"),
    };
    let proxy = match &raw.delivery.proxy {
        None => Some(None),
        Some(v) => check_proxy(&mut c, v).map(Some),
    };
    let policy = TargetPolicy { allow_private: allow_private_targets, allowed: &allowed_cidrs, https_only };

    let notify = raw.notify.as_ref().map(|n| {
        inline_secrets |= n.secret.is_some();
        let url = check_url(&mut c, &n.url, &policy);
        let secret =
            secret_from(&mut c, (&n.secret, &n.secret_file, &n.secret_env), base, n.url.span(), "[notify]");
        Some(Notify { url: url?, secret: secret? })
    });
    let mut seen = HashSet::new();
    let mut webhooks = Vec::new();
    for w in &raw.webhooks {
        let id = c.uuid(&w.id, "id");
        if let Some(id) = id {
            if !seen.insert(id) {
                c.fail::<()>(w.id.span(), format!("duplicate webhook id {id}"));
            }
        }
        let client_id = c.uuid(&w.client_id, "client_id");
        let url = check_url(&mut c, &w.url, &policy);
        // The example's placeholder is published in the README: no secret
        // to keep from other users (a checkout makes the file 0644), but no
        // secret to serve the network with either.
        let placeholder = w.secret.as_ref().is_some_and(|s| s.get_ref().contains(PLACEHOLDER_SECRET));
        inline_secrets |= (w.secret.is_some() && !placeholder) || !w.previous_secrets.is_empty();
        placeholders |= placeholder;
        let secret = webhook_secret(&mut c, w, base);
        let previous_secrets: Vec<(Secret, i64)> = w
            .previous_secrets
            .iter()
            .filter_map(|p| {
                let expires = clock::parse_rfc3339_ms(p.expires.get_ref()).or_else(|| {
                    c.fail(
                        p.expires.span(),
                        format!("expires: {:?} is not an RFC 3339 timestamp", p.expires.get_ref()),
                    )
                })?;
                if p.secret.get_ref().is_empty() {
                    return c.fail(p.secret.span(), "previous secret is empty");
                }
                Some((Secret(p.secret.get_ref().clone()), expires))
            })
            .collect();
        let events = check_events(&mut c, &w.events);
        let webhook_pause_after = match &w.pause_after {
            None => pause_after,
            Some(v) => c.duration_or_never(v, "pause_after"),
        };
        let rate_limit = match &w.rate_limit {
            None => Some(None),
            Some(v) if v.get_ref().is_finite() && *v.get_ref() > 0.0 => Some(Some(*v.get_ref())),
            Some(v) => c.fail(v.span(), "rate_limit must be a number of attempts per second above 0"),
        };
        let max_in_flight = match &w.max_in_flight {
            None => Some(None),
            Some(v) => c.positive(v, "max_in_flight").map(|n| Some(n as usize)),
        };
        let webhook_timeout = match &w.timeout {
            None => Some(None),
            Some(v) => c.duration(v, "timeout").map(Some),
        };
        let headers = check_headers(&mut c, &w.headers);
        let fifo = match w.ordering.as_ref().map(|v| (v.get_ref().as_str(), v.span())) {
            None | Some(("any", _)) => Some(false),
            Some(("fifo", _)) => Some(true),
            Some((other, span)) => c.fail(span, format!("ordering: {other:?} is not \"any\" or \"fifo\"")),
        };
        inline_secrets |= !w.headers.is_empty();
        let standard_key = match (w.standard_webhooks, &secret) {
            (false, _) | (true, None) => Some(None),
            (true, Some(s)) => match sign::standard_key(s.expose()) {
                Some(key) => Some(Some(Secret(key))),
                None => {
                    let span = w.secret.as_ref().map_or(w.id.span(), |s| s.span());
                    c.fail(span, "standard_webhooks = true needs a secret of the form whsec_<base64>")
                }
            },
        };
        if let (
            Some(id),
            Some(client_id),
            Some(url),
            Some(secret),
            Some(events),
            Some(standard_key),
            Some(pause_after),
            (Some(rate_limit), Some(max_in_flight), Some(timeout), Some(headers), Some(fifo)),
        ) = (
            id,
            client_id,
            url,
            secret,
            events,
            standard_key,
            webhook_pause_after,
            (rate_limit, max_in_flight, webhook_timeout, headers, fifo),
        ) {
            webhooks.push(Webhook {
                id,
                client_id,
                url,
                secret,
                previous_secrets,
                events,
                enabled: w.enabled,
                standard_key,
                pause_after,
                rate_limit,
                max_in_flight,
                timeout,
                headers,
                fifo,
            });
        }
    }

    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    let mut by_id = HashMap::new();
    let mut by_client: HashMap<Uuid, Vec<usize>> = HashMap::new();
    for (i, w) in webhooks.iter().enumerate() {
        by_id.insert(w.id, i);
        by_client.entry(w.client_id).or_default().push(i);
    }
    // Every Option below is Some: each None pushed a problem above.
    Ok(Config {
        notify: notify.map(Option::unwrap),
        server: Server {
            listen: listen.unwrap(),
            api_token,
            max_body: max_body.unwrap() as usize,
            shutdown_grace: shutdown_grace.unwrap(),
            log_level: log_level.unwrap(),
            header_timeout: header_timeout.unwrap(),
            idle_timeout: idle_timeout.unwrap(),
            max_connections: max_connections.unwrap(),
        },
        storage: Storage {
            path: storage_path.unwrap(),
            cache_capacity: cache_capacity.unwrap(),
            retention: retention.unwrap(),
            min_free_space,
            stall_limit: stall_limit.unwrap(),
        },
        delivery: Delivery {
            timeout: timeout.unwrap(),
            retry_schedule: retry_schedule.into_iter().map(Option::unwrap).collect(),
            allow_private_targets,
            allowed_cidrs,
            https_only,
            workers: workers.unwrap() as usize,
            per_webhook_in_flight: per_webhook_in_flight.unwrap() as usize,
            retry_jitter: retry_jitter.unwrap(),
            max_retry_after: max_retry_after.unwrap(),
            pause_after: pause_after.unwrap(),
            pause_min_failures: pause_min_failures.unwrap() as u32,
            proxy: proxy.unwrap(),
        },
        warnings: match listen {
            Some(addr) if placeholders && !addr.ip().is_loopback() => vec![format!(
                "a webhook still has the example's secret ({PLACEHOLDER_SECRET}), published in the README, \
                 while the API listens on {addr}; give it a secret of its own"
            )],
            _ => Vec::new(),
        },
        webhooks,
        inline_secrets,
        by_id,
        by_client,
    })
}

/// What webhook URLs may point at.
struct TargetPolicy<'a> {
    allow_private: bool,
    allowed: &'a [IpNet],
    https_only: bool,
}

/// The webhook's secret from exactly one of `secret`, `secret_file`, `secret_env`.
fn webhook_secret(c: &mut Checker, w: &RawWebhook, base: &Path) -> Option<Secret> {
    secret_from(c, (&w.secret, &w.secret_file, &w.secret_env), base, w.id.span(), "this webhook")
}

/// A table's `secret`, `secret_file` and `secret_env`.
type SecretKeys<'a> = (&'a Option<Spanned<String>>, &'a Option<Spanned<String>>, &'a Option<Spanned<String>>);

/// A secret from exactly one of `secret`, `secret_file`, `secret_env`; a
/// missing or doubled one is reported at `at`, naming `whose`.
fn secret_from(
    c: &mut Checker,
    (secret, file, env): SecretKeys,
    base: &Path,
    at: Range<usize>,
    whose: &str,
) -> Option<Secret> {
    match (secret, file, env) {
        (Some(v), None, None) if v.get_ref().is_empty() => c.fail(v.span(), "secret is empty"),
        (Some(v), None, None) => Some(Secret(v.get_ref().clone())),
        (None, Some(f), None) => read_secret_file(c, f, base, "secret_file").map(Secret),
        (None, None, Some(e)) => match c.outside.var(e.get_ref()) {
            Some(s) if !s.is_empty() => Some(Secret(s)),
            _ => c.fail(e.span(), format!("secret_env: the environment variable {} is not set", e.get_ref())),
        },
        (None, None, None) => c.fail(at, format!("{whose} needs one of secret, secret_file or secret_env")),
        _ => c.fail(at, "set only one of secret, secret_file or secret_env"),
    }
}

fn check_url(c: &mut Checker, v: &Spanned<String>, policy: &TargetPolicy) -> Option<String> {
    let text = v.get_ref();
    let url = match url::Url::parse(text) {
        Ok(u) => u,
        Err(e) => return c.fail(v.span(), format!("url: {text:?} is not a URL ({e})")),
    };
    if url.scheme() != "http" && url.scheme() != "https" {
        return c.fail(v.span(), format!("url: {text:?} must start with http:// or https://"));
    }
    if policy.https_only && url.scheme() != "https" {
        return c.fail(v.span(), format!("url: {text:?} is plain http and [delivery] https_only is set"));
    }
    let ip = match url.host() {
        None => return c.fail(v.span(), format!("url: {text:?} has no host")),
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => None,
    };
    if !url.username().is_empty() || url.password().is_some() {
        return c.fail(
            v.span(),
            "url: credentials in the URL are not supported; use the signature to authenticate",
        );
    }
    if let Some(why) = ip.and_then(|ip| target::refused(ip, policy.allow_private, policy.allowed)) {
        return c.fail(
            v.span(),
            format!(
                "url: {} is {why}; list it in [delivery] allowed_cidrs or set allow_private_targets = true",
                ip.expect("refused only with an ip")
            ),
        );
    }
    // Deliveries go through another parser (ureq's, the `http` crate's),
    // which refuses some text the WHATWG parser here takes: `\` in
    // `http://example.com\@127.0.0.1/` passed this check and then failed
    // every attempt. What is kept, checked and dialled is the normalised
    // form, which both parsers read alike.
    let normalised = url.to_string();
    if let Err(e) = normalised.parse::<http::Uri>() {
        return c.fail(v.span(), format!("url: {text:?} is not a URL the HTTP client takes ({e})"));
    }
    Some(normalised)
}

/// `[delivery] proxy`: `http://host:port`, nothing more.
fn check_proxy(c: &mut Checker, v: &Spanned<String>) -> Option<(String, u16)> {
    // The value is not echoed: it may hold a password.
    let fail = |c: &mut Checker, why: &str| {
        c.fail(v.span(), format!("proxy: {why}; write it as \"http://host:port\""))
    };
    let Ok(url) = url::Url::parse(v.get_ref()) else { return fail(c, "not a URL") };
    if url.scheme() != "http" {
        return fail(c, "not an http:// proxy (https targets go through it in a CONNECT tunnel)");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return fail(c, "credentials in the URL are not supported");
    }
    if url.path() != "/" || url.query().is_some() {
        return fail(c, "a proxy URL has no path");
    }
    match (url.host_str(), url.port_or_known_default()) {
        (Some(host), Some(port)) => {
            Some((host.trim_start_matches('[').trim_end_matches(']').to_owned(), port))
        }
        _ => fail(c, "no host"),
    }
}

/// Headers a webhook's `headers` may not set besides `X-Nexor-*` and
/// `webhook-*`: the daemon's own, and those that frame the request or the
/// connection.
const RESERVED_HEADERS: [&str; 11] = [
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
];

/// A webhook's static headers, names in lower case; every refused one is
/// named.
fn check_headers(
    c: &mut Checker,
    headers: &std::collections::BTreeMap<String, Spanned<String>>,
) -> Option<Vec<(String, Secret)>> {
    let mut out: Vec<(String, Secret)> = Vec::new();
    let mut ok = true;
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if out.iter().any(|(n, _)| *n == lower) {
            ok = false;
            c.fail::<()>(value.span(), format!("headers: {name} is given twice (header names ignore case)"));
            continue;
        }
        let reserved = lower.starts_with("x-nexor-")
            || lower.starts_with("webhook-")
            || RESERVED_HEADERS.contains(&lower.as_str());
        let why = if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            Some(format!("headers: {name:?} is not a header name"))
        } else if reserved {
            Some(format!("headers: {name} is set by the daemon and may not be overridden"))
        } else if http::HeaderValue::from_str(value.get_ref()).is_err() {
            Some(format!("headers: the value of {name} is not a header value (control characters?)"))
        } else {
            None
        };
        match why {
            Some(why) => {
                ok = false;
                c.fail::<()>(value.span(), why);
            }
            None => out.push((lower, Secret(value.get_ref().clone()))),
        }
    }
    ok.then_some(out)
}

fn check_events(c: &mut Checker, v: &Spanned<Vec<Spanned<String>>>) -> Option<Events> {
    let list = v.get_ref();
    if list.is_empty() {
        return c.fail(v.span(), "events is empty; list event types or use [\"*\"]");
    }
    if list.iter().any(|e| e.get_ref() == "*") {
        if list.len() > 1 {
            return c
                .fail(v.span(), "events: \"*\" already means every event type; list nothing else with it");
        }
        return Some(Events::All);
    }
    let mut types = Vec::new();
    for e in list {
        match EventType::parse(e.get_ref()) {
            Some(t) => types.push(t),
            None => {
                let known = EventType::ALL.map(EventType::as_str).join(", ");
                c.fail::<()>(
                    e.span(),
                    format!("unknown event type {:?}; known: {known}, or \"*\"", e.get_ref()),
                );
            }
        }
    }
    (types.len() == list.len()).then_some(Events::Only(types))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8088"

[storage]
path = "data"

[delivery]
timeout = "5s"
retry_schedule = ["100ms", "2m"]
allow_private_targets = true

[[webhooks]]
id = "0b7d9c3a-4a57-4d2e-9a51-5f0b6f2a8c01"
client_id = "6f1c1a3e-2b6e-4c1e-9d55-0c8a3f7e9b10"
url = "http://127.0.0.1:9000/hook"
secret = "whsec_x"
events = ["meeting.scheduled"]
"#;

    /// What a test's config finds outside its text: these files (by full
    /// path) and variables; a log filter is a bare level or has a `=`.
    #[derive(Default)]
    struct Table {
        files: Vec<(&'static str, &'static str)>,
        vars: Vec<(&'static str, &'static str)>,
    }

    impl Outside for Table {
        fn read_file(&self, path: &Path) -> std::io::Result<String> {
            self.files
                .iter()
                .find(|(p, _)| Path::new(p) == path)
                .map(|(_, text)| text.to_string())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory"))
        }

        fn var(&self, name: &str) -> Option<String> {
            self.vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
        }

        fn log_filter_error(&self, filter: &str) -> Option<String> {
            let level = ["error", "warn", "info", "debug", "trace"].contains(&filter);
            (!level && !filter.contains('=')).then(|| "not a level".to_owned())
        }
    }

    /// Parses with nothing outside the text.
    fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
        super::parse(text, base, &Table::default())
    }

    fn errors(text: &str) -> Vec<(Option<usize>, String)> {
        parse(text, Path::new("/etc"))
            .expect_err("config should be rejected")
            .into_iter()
            .map(|p| (p.line, p.message))
            .collect()
    }

    #[test]
    fn parses_the_contract_shape() {
        let c = parse(GOOD, Path::new("/etc/nexor")).unwrap();
        assert_eq!(c.storage.path, PathBuf::from("/etc/nexor/data"));
        assert_eq!(c.delivery.retry_schedule, vec![Duration::from_millis(100), Duration::from_secs(120)]);
        assert_eq!(c.delivery.timeout, Duration::from_secs(5));
        assert_eq!(c.server.max_body, 1024 * 1024);
        let w = &c.webhooks()[0];
        assert!(w.enabled);
        assert!(w.subscribes_to(EventType::MeetingScheduled));
        assert!(!w.subscribes_to(EventType::MeetingCancelled));
        assert_eq!(c.subscribers(&w.client_id, EventType::MeetingScheduled).count(), 1);
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = parse("", Path::new("/")).unwrap();
        assert_eq!(c.delivery.retry_schedule, DEFAULT_SCHEDULE.to_vec());
        assert_eq!(c.delivery.timeout, Duration::from_secs(10));
        assert!(!c.delivery.allow_private_targets);
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.server.header_timeout, Duration::from_secs(10));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.server.max_connections, None, "derived from the open-files limit at start");
    }

    #[test]
    fn connection_limits_parse_and_are_checked() {
        let with = |lines: &str| GOOD.replace("[server]\n", &format!("[server]\n{lines}\n"));
        let c = parse(
            &with("header_timeout = \"300ms\"\nidle_timeout = \"2m\"\nmax_connections = 20"),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(c.server.header_timeout, Duration::from_millis(300));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.server.max_connections, Some(20));
        let e = errors(&with("header_timeout = \"0s\"\nidle_timeout = \"soon\"\nmax_connections = 0"));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].1.contains("header_timeout must be longer than zero"), "{e:?}");
        assert!(e[1].1.contains("idle_timeout: \"soon\" is not a duration"), "{e:?}");
        assert!(e[2].1.contains("max_connections must be at least 1"), "{e:?}");
        let old = parse(GOOD, Path::new("/")).unwrap();
        let new = parse(&with("max_connections = 20\nidle_timeout = \"5s\""), Path::new("/")).unwrap();
        assert_eq!(old.needs_restart(&new), vec!["[server] max_connections"]);
    }

    #[test]
    fn a_key_without_a_value_is_named_not_left_blank() {
        let e = errors("A=");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, Some(1));
        assert!(e[0].1.contains("not valid TOML"), "{e:?}");
    }

    #[test]
    fn unknown_key_names_its_line() {
        let text = GOOD.replace("timeout = \"5s\"", "timeout = \"5s\"\nretries = 3");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, Some(10));
        assert!(e[0].1.contains("unknown field `retries`"), "{}", e[0].1);
    }

    #[test]
    fn unknown_keys_are_reported_with_every_other_problem() {
        let text = GOOD
            .replace("timeout = \"5s\"", "timeout = \"5s\"\nretries = 3")
            .replace("\"meeting.scheduled\"]", "\"meeting.eaten\"]")
            .replace("[server]", "colour = 1\n[server]\nflavour = 2");
        let e = errors(&text);
        let said: Vec<&str> = e.iter().map(|(_, m)| m.as_str()).collect();
        assert!(said.iter().any(|m| m.contains("unknown field `retries` in delivery")), "{said:?}");
        assert!(said.iter().any(|m| m.contains("unknown field `flavour` in server")), "{said:?}");
        assert!(said.iter().any(|m| m.contains("unknown field `colour`")), "{said:?}");
        assert!(said.iter().any(|m| m.contains("meeting.eaten")), "{said:?}");
        assert!(e.iter().all(|(line, _)| line.is_some()), "{e:?}");
    }

    #[test]
    fn reports_every_bad_field_with_its_line() {
        let text = GOOD
            .replace("\"meeting.scheduled\"]", "\"meeting.eaten\"]")
            .replace("http://127.0.0.1:9000/hook", "not a url")
            .replace("0b7d9c3a-4a57-4d2e-9a51-5f0b6f2a8c01", "nope");
        let e = errors(&text);
        let lines: Vec<_> = e.iter().map(|p| p.0.unwrap()).collect();
        assert_eq!(lines, vec![14, 16, 18], "{e:?}");
        assert!(e[0].1.contains("not a uuid"));
        assert!(e[1].1.contains("not a URL"));
        assert!(e[2].1.contains("unknown event type \"meeting.eaten\""));
    }

    #[test]
    fn duplicate_ids_and_bad_durations() {
        let dup = format!("{GOOD}{}", &GOOD[GOOD.find("[[webhooks]]").unwrap()..]);
        let e = errors(&dup);
        assert_eq!(e.len(), 1);
        assert!(e[0].1.starts_with("duplicate webhook id"), "{e:?}");
        assert_eq!(e[0].0, Some(20));

        let e = errors(&GOOD.replace("\"2m\"", "\"soon\""));
        assert_eq!(e[0].0, Some(10));
        assert!(e[0].1.contains("not a duration"));
    }

    #[test]
    fn private_literal_needs_opt_in_and_public_listen_needs_token() {
        let e = errors(&GOOD.replace("allow_private_targets = true", ""));
        assert!(e[0].1.contains("127.0.0.1 is a loopback address"), "{e:?}");
        let e = errors(&GOOD.replace("127.0.0.1:8088", "0.0.0.0:8088"));
        assert!(e[0].1.contains("api_token is required"), "{e:?}");
        assert_eq!(e[0].0, Some(3));
    }

    #[test]
    fn standard_webhooks_needs_a_base64_secret() {
        let text = GOOD.replace("enabled", "x").replace("events = [", "standard_webhooks = true\nevents = [");
        let e = errors(&text);
        assert_eq!(e[0].0, Some(17));
        assert!(e[0].1.contains("whsec_<base64>"), "{e:?}");
        let ok = text.replace("whsec_x", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        let c = parse(&ok, Path::new("/")).unwrap();
        assert_eq!(c.webhooks()[0].standard_key.as_ref().unwrap().expose().len(), 24);
    }

    #[test]
    fn reload_diff_names_restart_settings_and_stopped_webhooks() {
        let old = parse(GOOD, Path::new("/")).unwrap();
        let new = parse(
            &GOOD.replace("8088", "8089").replace("events = [", "enabled = false\nevents = ["),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(old.needs_restart(&new), vec!["[server] listen"]);
        assert_eq!(old.stopped_in(&new).len(), 1);
        assert!(new.stopped_in(&old).is_empty());
        let gone = parse(&GOOD[..GOOD.find("[[webhooks]]").unwrap()], Path::new("/")).unwrap();
        assert_eq!(old.stopped_in(&gone).len(), 1);
    }

    #[test]
    fn secrets_come_from_exactly_one_source() {
        let outside = Table {
            files: vec![("/etc/nexor/hook.secret", "from-file\n")],
            vars: vec![("HOOK_SECRET", "from-env")],
        };
        let parse = |text: &str| super::parse(text, Path::new("/etc/nexor"), &outside);
        let with = |line: &str| GOOD.replace("secret = \"whsec_x\"", line);
        let c = parse(&with("secret_file = \"hook.secret\"")).unwrap();
        assert_eq!(c.webhooks()[0].secret.expose(), "from-file");
        assert!(!c.inline_secrets);
        let c = parse(&with("secret_env = \"HOOK_SECRET\"")).unwrap();
        assert_eq!(c.webhooks()[0].secret.expose(), "from-env");
        let e = parse(&with("secret = \"a\"\nsecret_file = \"hook.secret\"")).unwrap_err();
        assert!(e[0].message.contains("only one of"), "{}", e[0].message);
        let e = parse(&with("")).unwrap_err();
        assert!(e[0].message.contains("needs one of secret"), "{}", e[0].message);
        let e = parse(&with("secret_file = \"missing\"")).unwrap_err();
        assert!(e[0].message.contains("cannot read"), "{}", e[0].message);
        assert_eq!(e[0].line, Some(17));
        let e = parse(&with("secret_env = \"NEXOR_TEST_UNSET_VAR\"")).unwrap_err();
        assert!(e[0].message.contains("is not set"), "{}", e[0].message);
    }

    #[test]
    fn previous_secrets_sign_until_they_expire() {
        let text = GOOD.replace(
            "secret = \"whsec_x\"",
            "secret = \"new\"\nprevious_secrets = [{ secret = \"old\", expires = \"2026-05-01T00:00:00Z\" }]",
        );
        let c = parse(&text, Path::new("/")).unwrap();
        let w = &c.webhooks()[0];
        let before = clock::parse_rfc3339_ms("2026-04-30T23:59:59Z").unwrap();
        let after = clock::parse_rfc3339_ms("2026-05-01T00:00:00Z").unwrap();
        assert_eq!(w.signing_secrets(before).collect::<Vec<_>>(), vec!["new", "old"]);
        assert_eq!(w.signing_secrets(after).collect::<Vec<_>>(), vec!["new"]);
        let e = parse(&text.replace("2026-05-01T00:00:00Z", "May 1st"), Path::new("/")).unwrap_err();
        assert!(e[0].message.contains("expires"), "{}", e[0].message);
    }

    #[test]
    fn target_policy_https_only_and_allowed_cidrs() {
        let e = errors(
            &GOOD.replace("allow_private_targets = true", "https_only = true\nallow_private_targets = true"),
        );
        assert!(e[0].1.contains("plain http"), "{e:?}");
        let no_private = GOOD.replace("allow_private_targets = true", "allowed_cidrs = [\"127.0.0.0/8\"]");
        assert!(parse(&no_private, Path::new("/")).is_ok(), "an allowed range may be named literally");
        let e = errors(&GOOD.replace("allow_private_targets = true", "allowed_cidrs = [\"10.0.0.0/8\"]"));
        assert!(e[0].1.contains("127.0.0.1 is a loopback address"), "{e:?}");
        let e = errors(&GOOD.replace("allow_private_targets = true", "allowed_cidrs = [\"10.0.0.1/8\"]"));
        assert!(e[0].1.contains("host bits"), "{e:?}");
        for literal in
            ["10.0.0.1", "[::1]", "[fd00::1]", "169.254.169.254", "100.64.0.1", "[::ffff:127.0.0.1]"]
        {
            let text = GOOD.replace("allow_private_targets = true", "").replace("127.0.0.1:9000", literal);
            let e = errors(&text);
            assert!(e[0].1.contains(" is a") || e[0].1.contains(" is an"), "{literal}: {e:?}");
        }
    }

    #[test]
    fn parser_messages_about_secrets_do_not_echo_them() {
        let cases = [
            "[server]\napi_token = 12345678\n",
            "[[webhooks]]\nid = \"x\"\nprevious_secrets = [\"whsec_leak12345678\"]\n",
            "[[webhooks]]\nid = \"x\"\nprevious_secrets = [\n  \"whsec_leak12345678\",\n]\n",
            "[[webhooks]]\nsecret = [\"whsec_leak12345678\"]\n",
            "[[webhooks]]\nprevious_secrets = [{ secret = 12345678, expires = \"2026-01-01T00:00:00Z\" }]\n",
        ];
        for text in cases {
            let Err(e) = parse(text, Path::new(".")) else { panic!("{text} parsed") };
            let shown = format!("{e:?}");
            assert!(!shown.contains("12345678"), "{text}: {shown}");
        }
        // Other values are still quoted, which helps find them, even right
        // after a secret.
        let e = parse("[server]\nmax_body = \"big\"\n", Path::new(".")).err().unwrap();
        assert!(format!("{e:?}").contains("big"), "{e:?}");
        let e = parse("[server]\napi_token = \"t\"\nlisten = \"a\"\nlisten = \"b\"\n", Path::new("."))
            .err()
            .unwrap();
        assert!(format!("{e:?}").contains("`listen`"), "{e:?}");
    }

    #[test]
    fn urls_are_kept_as_the_http_client_reads_them() {
        let url_of = |u: &str| {
            let text = GOOD.replace("http://127.0.0.1:9000/hook", u);
            parse(&text, Path::new(".")).map(|c| c.webhooks()[0].url.clone()).ok()
        };
        // A backslash (escaped once for TOML) is a path separator to the
        // WHATWG parser: the host is example.com, and that is what the
        // client is given, in a form its own parser takes.
        let tricky = url_of("http://example.com\\\\@127.0.0.1/").unwrap();
        assert_eq!(tricky, "http://example.com/@127.0.0.1/");
        assert!(tricky.parse::<http::Uri>().is_ok());
        assert_eq!(url_of("HTTP://Example.COM:80/a b").as_deref(), Some("http://example.com/a%20b"));
    }

    #[test]
    fn an_api_token_that_no_http_header_can_carry_is_refused_without_echoing_it() {
        for token in ["t\u{f6}k-secret", " padded-secret", "tab\\there-secret"] {
            let text = GOOD.replace("[server]\n", &format!("[server]\napi_token = \"{token}\"\n"));
            let all = format!("{:?}", parse(&text, Path::new(".")).unwrap_err());
            assert!(all.contains("printable ASCII"), "{token:?}: {all}");
            assert!(!all.contains("secret"), "the token is not echoed: {all}");
        }
    }

    #[test]
    fn api_token_from_a_file_or_the_environment() {
        let outside = Table { files: vec![("/etc/token", "t0ken\n")], vars: vec![(TOKEN_ENV, "env-t0ken")] };
        let parse = |text: &str| super::parse(text, Path::new("/etc"), &outside);
        let text = GOOD.replace("[server]\n", "[server]\napi_token_file = \"token\"\n");
        let c = parse(&text).unwrap();
        assert_eq!(c.server.api_token.as_ref().unwrap().expose(), "t0ken");
        let both = text.replace("[server]\n", "[server]\napi_token = \"x\"\n");
        assert!(parse(&both).unwrap_err()[0].message.contains("not both"));
        assert_eq!(parse(GOOD).unwrap().server.api_token.as_ref().unwrap().expose(), "env-t0ken");
    }

    #[test]
    fn pausing_a_failing_webhook_has_a_default_a_per_webhook_value_and_never() {
        let c = parse(GOOD, Path::new("/")).unwrap();
        assert_eq!(c.delivery.pause_after, Some(Duration::from_secs(24 * 3600)));
        assert_eq!(c.delivery.pause_min_failures, 5);
        assert_eq!(c.webhooks()[0].pause_after, c.delivery.pause_after);
        let text = GOOD
            .replace("[delivery]\n", "[delivery]\npause_after = \"never\"\npause_min_failures = 2\n")
            .replace("events = [", "pause_after = \"10m\"\nevents = [");
        let c = parse(&text, Path::new("/")).unwrap();
        assert_eq!((c.delivery.pause_after, c.delivery.pause_min_failures), (None, 2));
        assert_eq!(c.webhooks()[0].pause_after, Some(Duration::from_secs(600)));
        let bad = GOOD.replace("events = [", "pause_after = \"soon\"\nevents = [");
        assert_eq!(errors(&bad)[0].0, Some(18));
        assert!(
            errors(&bad)[0].1.starts_with("pause_after: \"soon\" is not a duration"),
            "{:?}",
            errors(&bad)
        );
    }

    #[test]
    fn per_webhook_controls_parse_and_reserved_headers_are_named() {
        let text = GOOD.replace(
            "events = [",
            "rate_limit = 2.5\nmax_in_flight = 3\ntimeout = \"2s\"\nheaders = { \"X-Tenant\" = \"acme\", Authorization = \"Bearer t\" }\nevents = [",
        );
        let c = parse(&text, Path::new("/")).unwrap();
        let w = &c.webhooks()[0];
        assert_eq!(
            (w.rate_limit, w.max_in_flight, w.timeout),
            (Some(2.5), Some(3), Some(Duration::from_secs(2)))
        );
        let headers: Vec<_> = w.headers.iter().map(|(n, v)| (n.as_str(), v.expose().as_str())).collect();
        assert_eq!(headers, [("authorization", "Bearer t"), ("x-tenant", "acme")]);
        assert!(c.has_inline_secrets(), "a header may be a credential");
        assert!(!format!("{w:?}").contains("Bearer t"));
        let bad = GOOD.replace(
            "events = [",
            "rate_limit = 0\nheaders = { \"X-Nexor-Signature\" = \"v1=x\", \"webhook-id\" = \"1\", \"Content-Length\" = \"9\", \"Bad Name\" = \"x\", \"X-Ok\" = \"a\\nb\" }\nevents = [",
        );
        let messages: Vec<String> = errors(&bad).into_iter().map(|(_, m)| m).collect();
        for expected in [
            "rate_limit must be a number of attempts per second above 0",
            "headers: \"Bad Name\" is not a header name",
            "headers: Content-Length is set by the daemon and may not be overridden",
            "headers: X-Nexor-Signature is set by the daemon and may not be overridden",
            "headers: the value of X-Ok is not a header value (control characters?)",
            "headers: webhook-id is set by the daemon and may not be overridden",
        ] {
            assert!(messages.iter().any(|m| m == expected), "{expected:?} not in {messages:?}");
        }
        assert!(!messages.iter().any(|m| m.contains("v1=x")), "values are never echoed: {messages:?}");
        let twice =
            GOOD.replace("events = [", "headers = { \"X-Dup\" = \"a\", \"x-dup\" = \"b\" }\nevents = [");
        assert_eq!(errors(&twice)[0].1, "headers: x-dup is given twice (header names ignore case)");
    }

    #[test]
    fn the_proxy_is_an_http_host_and_port_and_its_password_is_never_echoed() {
        let with = |p: &str| GOOD.replace("[delivery]\n", &format!("[delivery]\nproxy = \"{p}\"\n"));
        let c = parse(&with("http://proxy.internal:3128"), Path::new("/")).unwrap();
        assert_eq!(c.delivery.proxy, Some(("proxy.internal".to_owned(), 3128)));
        assert_eq!(
            parse(&with("http://[::1]"), Path::new("/")).unwrap().delivery.proxy,
            Some(("::1".into(), 80))
        );
        for (bad, why) in [
            ("socks5://p:1080", "not an http:// proxy"),
            ("http://user:hunter2@p:3128", "credentials in the URL are not supported"),
            ("http://p:3128/x", "a proxy URL has no path"),
            ("proxy:3128", "not an http:// proxy"),
        ] {
            let e = &errors(&with(bad))[0].1;
            assert!(e.starts_with(&format!("proxy: {why}")), "{bad}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn notify_takes_a_url_under_the_target_rules_and_one_secret() {
        let with = |t: &str| format!("[notify]\n{t}\n{GOOD}");
        let c = parse(&with("url = \"https://ops.example.com/h\"\nsecret = \"whsec_ops\""), Path::new("/"))
            .unwrap();
        let n = c.notify.as_ref().unwrap();
        assert_eq!((n.url.as_str(), n.secret.expose().as_str()), ("https://ops.example.com/h", "whsec_ops"));
        assert!(parse(GOOD, Path::new("/")).unwrap().notify.is_none());
        let e = errors(&with("url = \"https://ops.example.com/h\""));
        assert_eq!(e[0].1, "[notify] needs one of secret, secret_file or secret_env");
        let e = errors(
            &with("url = \"http://10.0.0.1/h\"\nsecret = \"s\"")
                .replace("allow_private_targets = true\n", ""),
        );
        assert!(e[0].1.starts_with("url: 10.0.0.1 is a private address"), "{e:?}");
    }

    #[test]
    fn ordering_is_any_or_fifo() {
        let with = |o: &str| GOOD.replace("events = [", &format!("ordering = \"{o}\"\nevents = ["));
        assert!(!parse(GOOD, Path::new("/")).unwrap().webhooks()[0].fifo);
        assert!(!parse(&with("any"), Path::new("/")).unwrap().webhooks()[0].fifo);
        assert!(parse(&with("fifo"), Path::new("/")).unwrap().webhooks()[0].fifo);
        assert_eq!(errors(&with("lifo"))[0].1, "ordering: \"lifo\" is not \"any\" or \"fifo\"");
    }

    #[test]
    fn log_level_is_checked_by_the_logger_it_is_for() {
        let text = GOOD.replace("[server]\n", "[server]\nlog_level = \"loud\"\n");
        assert_eq!(
            errors(&text),
            [(Some(3), "log_level: \"loud\" is not a level or filter (not a level)".into())]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Arbitrary text never panics the config parser; a rejection always
        /// says why, with a line when it can.
        #[test]
        fn config_parser_never_panics(text in "(\\PC|\n){0,400}") {
            if let Err(problems) = parse(&text, Path::new("/")) {
                proptest::prop_assert!(!problems.is_empty());
                proptest::prop_assert!(problems.iter().all(|p| !p.message.is_empty()));
            }
        }

        /// Mutations of a valid config (a line dropped or duplicated, a value
        /// changed) are either valid or rejected with reasons; never a panic.
        #[test]
        fn mutated_configs_never_panic(drop_line in 0usize..20, dup_line in 0usize..20, junk in "[a-z0-9\"=\\[\\]., -]{0,12}") {
            let mut lines: Vec<String> = GOOD.lines().map(str::to_owned).collect();
            if drop_line < lines.len() { lines.remove(drop_line); }
            if dup_line < lines.len() { let l = lines[dup_line].clone(); lines.insert(dup_line, l); }
            if let Some(l) = lines.get_mut(drop_line.min(dup_line)) { l.push_str(&junk); }
            let _ = parse(&lines.join("\n"), Path::new("/"));
        }
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = errors("[server]\nlisten = \n");
        assert_eq!(e[0].0, Some(2));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = parse(GOOD, Path::new("/")).unwrap();
        assert!(!format!("{c:?}").contains("whsec_x"));
    }
}
