//! The TOML configuration: parsing and validation only.
//!
//! [`load`] turns a file into a [`Config`] or into a [`ConfigError`] listing
//! every problem as `FILE:LINE: reason`. Nothing here opens sockets or
//! storage; the daemon refuses to start unless this module is satisfied, and
//! `check-config` runs exactly the same code.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use uuid::Uuid;

use crate::event::EventType;
use crate::{sign, target};

const DEFAULT_LISTEN: &str = "127.0.0.1:8088";
const DEFAULT_STORAGE: &str = "/var/lib/nexor-webhookd";
const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SCHEDULE: [Duration; 3] =
    [Duration::from_secs(60), Duration::from_secs(300), Duration::from_secs(1800)];
const DEFAULT_WORKERS: u64 = 64;
const DEFAULT_CACHE: u64 = 64 * 1024 * 1024;
const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    pub server: Server,
    pub storage: Storage,
    pub delivery: Delivery,
    webhooks: Vec<Webhook>,
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
}

#[derive(Debug)]
pub struct Storage {
    pub path: PathBuf,
    pub cache_capacity: u64,
    /// Final deliveries and their events are deleted this long after ingest.
    pub retention: Duration,
}

#[derive(Debug)]
pub struct Delivery {
    pub timeout: Duration,
    pub retry_schedule: Vec<Duration>,
    pub allow_private_targets: bool,
    pub workers: usize,
}

#[derive(Debug)]
pub struct Webhook {
    pub id: Uuid,
    pub client_id: Uuid,
    pub url: String,
    pub secret: Secret,
    pub events: Events,
    pub enabled: bool,
    /// Also send the Standard Webhooks headers, keyed by this (decoded) key.
    pub standard_key: Option<Secret<Vec<u8>>>,
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
        check(self.storage.path != new.storage.path, "[storage] path");
        check(self.storage.cache_capacity != new.storage.cache_capacity, "[storage] cache_capacity");
        check(self.delivery.workers != new.delivery.workers, "[delivery] workers");
        changed
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

/// The configuration in force: a cheap-to-clone handle whose contents are
/// swapped whole on reload, so every reader sees one consistent version;
/// background tasks can wait for the next swap.
#[derive(Clone)]
pub struct Shared(Arc<tokio::sync::watch::Sender<Arc<Config>>>);

impl Shared {
    pub fn new(config: Config) -> Shared {
        Shared(Arc::new(tokio::sync::watch::Sender::new(Arc::new(config))))
    }

    pub fn get(&self) -> Arc<Config> {
        self.0.borrow().clone()
    }

    pub fn set(&self, config: Config) {
        self.0.send_replace(Arc::new(config));
    }

    /// A receiver whose `changed()` completes at the next reload.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Config>> {
        self.0.subscribe()
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

/// Reads and validates the file at `path`. A relative `[storage] path` is
/// taken relative to the directory holding the file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        problems: vec![Problem { line: None, message: format!("cannot read: {e}") }],
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base).map_err(|problems| ConfigError { file: path.to_owned(), problems })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    delivery: RawDelivery,
    #[serde(default)]
    webhooks: Vec<RawWebhook>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    api_token: Option<Spanned<String>>,
    max_body: Option<Spanned<u64>>,
    shutdown_grace: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    path: Option<Spanned<String>>,
    cache_capacity: Option<Spanned<u64>>,
    retention: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    timeout: Option<Spanned<String>>,
    retry_schedule: Option<Vec<Spanned<String>>>,
    allow_private_targets: Option<bool>,
    workers: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    id: Spanned<String>,
    client_id: Spanned<String>,
    url: Spanned<String>,
    secret: Spanned<String>,
    events: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    standard_webhooks: bool,
}

fn yes() -> bool {
    true
}

/// Collects problems with their line numbers while validation goes on, so one
/// run reports everything that is wrong.
struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
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

fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    let mut c = Checker { text, problems: Vec::new() };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let line = e.span().map(|s| c.line_of(s));
            return Err(vec![Problem { line, message: e.message().trim().to_owned() }]);
        }
    };

    let listen = match &raw.server.listen {
        None => Some(DEFAULT_LISTEN.parse().expect("valid default")),
        Some(v) => v.get_ref().parse::<SocketAddr>().ok().or_else(|| {
            c.fail(v.span(), format!("listen: {:?} is not an address like \"127.0.0.1:8088\"", v.get_ref()))
        }),
    };
    let api_token = match &raw.server.api_token {
        Some(v) if v.get_ref().is_empty() => {
            c.fail(v.span(), "api_token is empty; remove the key or set a token")
        }
        v => v.as_ref().map(|v| Secret(v.get_ref().clone())),
    };
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
    let retention = match &raw.storage.retention {
        None => Some(DEFAULT_RETENTION),
        Some(v) => c.duration(v, "retention"),
    };
    let shutdown_grace = match &raw.server.shutdown_grace {
        None => Some(DEFAULT_GRACE),
        Some(v) => c.duration(v, "shutdown_grace"),
    };
    let log_level = match &raw.server.log_level {
        None => Some("info".to_owned()),
        Some(v) => match tracing_subscriber::EnvFilter::try_new(v.get_ref()) {
            Ok(_) => Some(v.get_ref().clone()),
            Err(e) => {
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
    let workers = match &raw.delivery.workers {
        None => Some(DEFAULT_WORKERS),
        Some(v) => c.positive(v, "workers"),
    };

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
        let url = check_url(&mut c, &w.url, allow_private_targets);
        let secret = if w.secret.get_ref().is_empty() {
            c.fail(w.secret.span(), "secret is empty")
        } else {
            Some(Secret(w.secret.get_ref().clone()))
        };
        let events = check_events(&mut c, &w.events);
        let standard_key = match w.standard_webhooks {
            false => Some(None),
            true => match sign::standard_key(w.secret.get_ref()) {
                Some(key) => Some(Some(Secret(key))),
                None => c.fail(
                    w.secret.span(),
                    "standard_webhooks = true needs a secret of the form whsec_<base64>",
                ),
            },
        };
        if let (Some(id), Some(client_id), Some(url), Some(secret), Some(events), Some(standard_key)) =
            (id, client_id, url, secret, events, standard_key)
        {
            webhooks.push(Webhook { id, client_id, url, secret, events, enabled: w.enabled, standard_key });
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
        server: Server {
            listen: listen.unwrap(),
            api_token,
            max_body: max_body.unwrap() as usize,
            shutdown_grace: shutdown_grace.unwrap(),
            log_level: log_level.unwrap(),
        },
        storage: Storage {
            path: storage_path.unwrap(),
            cache_capacity: cache_capacity.unwrap(),
            retention: retention.unwrap(),
        },
        delivery: Delivery {
            timeout: timeout.unwrap(),
            retry_schedule: retry_schedule.into_iter().map(Option::unwrap).collect(),
            allow_private_targets,
            workers: workers.unwrap() as usize,
        },
        webhooks,
        by_id,
        by_client,
    })
}

fn check_url(c: &mut Checker, v: &Spanned<String>, allow_private: bool) -> Option<String> {
    let text = v.get_ref();
    let url = match url::Url::parse(text) {
        Ok(u) => u,
        Err(e) => return c.fail(v.span(), format!("url: {text:?} is not a URL ({e})")),
    };
    if url.scheme() != "http" && url.scheme() != "https" {
        return c.fail(v.span(), format!("url: {text:?} must start with http:// or https://"));
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
    if let (false, Some(ip)) = (allow_private, ip) {
        if let Some(why) = target::blocked_reason(ip) {
            return c.fail(
                v.span(),
                format!("url: {ip} is {why}; set [delivery] allow_private_targets = true to allow it"),
            );
        }
    }
    Some(text.clone())
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
