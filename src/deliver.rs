//! One HTTP attempt: POST a signed body to a URL and say how it went.
//!
//! Blocking (ureq), meant to run on the dispatcher's worker threads, never on
//! the async runtime. Knows nothing of storage or scheduling. The agent is
//! configured the way a webhook sender needs: no redirects followed, no
//! proxy from the environment, per-phase timeouts (a global timeout makes
//! ureq resolve on a fresh thread per request), a keep-alive pool, and a
//! resolver that refuses non-public addresses unless allowed, so the check
//! applies to the addresses actually dialled. ureq resolves the host before
//! every request, pooled connection or not, so that resolver also keeps
//! what it allowed for [`RESOLVED_FOR`]. Connections are `tcp`'s (a third of
//! the system calls of ureq's own), with ureq's rustls on top for HTTPS.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{Connector, NextTimeout, RustlsConnector};

use crate::config::Delivery;
use crate::target;
use crate::tcp::{Dialer, Proxy};

/// Bytes of a response body read (and so the most a receiver can make us read).
const READ_CAP: u64 = 4096;
/// Bytes of a response body kept in the attempt log.
const KEEP_CAP: usize = 1024;

pub const USER_AGENT: &str = concat!("nexor-webhookd/", env!("CARGO_PKG_VERSION"));

/// How an attempt ended, coarsely: for logs, metrics and the retry decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Success,
    HttpStatus,
    Timeout,
    Connect,
    Blocked,
    /// This machine ran short of descriptors, socket buffers or memory
    /// before the request could go out: not the receiver's doing.
    ShortOfResources,
    Other,
}

/// Whether `e` says this machine ran short of a resource: descriptors
/// (EMFILE for the process, ENFILE for the system), socket buffers
/// (ENOBUFS) or memory (ENOMEM). Such an error passes once resources free
/// up, and says nothing about the other end.
pub fn short_of_resources(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
        || e.kind() == std::io::ErrorKind::OutOfMemory
}

#[derive(Debug)]
pub struct Answer {
    pub class: Class,
    pub status_code: Option<u16>,
    /// A reason a person understands, for every failure.
    pub error: Option<String>,
    pub response_body: String,
    pub duration: Duration,
    /// The receiver's `Retry-After` on a 429 or 503 (seconds or HTTP-date).
    pub retry_after: Option<Duration>,
}

impl Answer {
    /// The outcome class used as a metrics label.
    pub fn outcome_label(&self) -> &'static str {
        match (self.class, self.status_code) {
            (Class::Success, _) => "2xx",
            (Class::HttpStatus, Some(300..=399)) => "3xx",
            (Class::HttpStatus, Some(400..=499)) => "4xx",
            (Class::HttpStatus, Some(500..=599)) => "5xx",
            (Class::Timeout, _) => "timeout",
            (Class::Connect, _) => "connect",
            (Class::Blocked, _) => "blocked",
            (Class::ShortOfResources, _) => "local",
            _ => "other",
        }
    }
}

/// Cheap to clone: the agent and its connection pool are shared.
#[derive(Clone)]
pub struct Sender {
    agent: ureq::Agent,
    timeout: Duration,
}

impl Sender {
    /// An agent for the delivery settings of `d`, keeping `pool_size` idle
    /// keep-alive connections in all, at most 4 to one host.
    pub fn new(d: &Delivery, pool_size: usize) -> Sender {
        let timeout = d.timeout;
        let t = Some(timeout);
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .https_only(d.https_only)
            .http_status_as_error(false)
            .proxy(None)
            .user_agent(USER_AGENT)
            .max_idle_connections(pool_size)
            .max_idle_connections_per_host(pool_size.min(4))
            .timeout_connect(t)
            .timeout_send_request(t)
            .timeout_send_body(t)
            .timeout_recv_response(t)
            .timeout_recv_body(t)
            .build();
        let resolver = GuardedResolver {
            allow_private: d.allow_private_targets,
            allowed: d.allowed_cidrs.clone(),
            inner: DefaultResolver::default(),
            keep_for: RESOLVED_FOR,
            resolved: Mutex::default(),
        };
        let proxy = d.proxy.as_ref().map(|(host, port)| Proxy { host: host.clone(), port: *port });
        let connector = Dialer { proxy }.chain(RustlsConnector::default());
        Sender { agent: ureq::Agent::with_parts(config, connector, resolver), timeout }
    }

    /// POSTs `body` with `headers`; any 2xx is success. `timeout`, if
    /// given, bounds each phase instead of the agent's.
    pub fn post(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Option<Duration>,
    ) -> Answer {
        let start = Instant::now();
        let mut req = self.agent.post(url);
        if let Some(t) = timeout {
            req = req
                .config()
                .timeout_connect(Some(t))
                .timeout_send_request(Some(t))
                .timeout_send_body(Some(t))
                .timeout_recv_response(Some(t))
                .timeout_recv_body(Some(t))
                .build();
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let mut retry_after = None;
        let (class, status_code, error, response_body) = match req.send(body) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                if status == 429 || status == 503 {
                    let header = resp.headers().get("retry-after").and_then(|v| v.to_str().ok());
                    retry_after = header.and_then(|h| parse_retry_after(h, SystemTime::now()));
                }
                let mut buf = Vec::new();
                // The status decides the outcome; a body that fails to arrive
                // in full only shortens what we keep of it.
                let _ = resp.body_mut().as_reader().take(READ_CAP).read_to_end(&mut buf);
                buf.truncate(KEEP_CAP);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if (200..300).contains(&status) {
                    (Class::Success, Some(status), None, text)
                } else {
                    (Class::HttpStatus, Some(status), Some(format!("HTTP {status}")), text)
                }
            }
            Err(e) => {
                let (class, reason) = explain(&e, timeout.unwrap_or(self.timeout));
                (class, None, Some(reason), String::new())
            }
        };
        Answer { class, status_code, error, response_body, duration: start.elapsed(), retry_after }
    }
}

fn is_tls(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["certificate", "handshake", "tls", "alert"].iter().any(|w| m.contains(w))
}

/// `Retry-After`: delay-seconds or an HTTP-date, as a delay from `now`.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// The resolver's refusal of an address the target policy does not allow;
/// carried through ureq inside an `io::Error`, and recognised by its type.
#[derive(Debug)]
struct Blocked {
    ip: std::net::IpAddr,
    why: &'static str,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "blocked: {} is {}", self.ip, self.why)
    }
}

impl std::error::Error for Blocked {}

/// Turns a ureq error into words for the attempt log.
fn explain(e: &ureq::Error, timeout: Duration) -> (Class, String) {
    use std::io::ErrorKind;
    let timed_out = || (Class::Timeout, format!("timed out after {}", humantime::format_duration(timeout)));
    match e {
        ureq::Error::Timeout(_) => timed_out(),
        ureq::Error::Io(io) if short_of_resources(io) => {
            (Class::ShortOfResources, format!("short of local resources: {io}"))
        }
        ureq::Error::Io(io) => match io.kind() {
            _ if io.get_ref().is_some_and(|e| e.is::<Blocked>()) => (Class::Blocked, io.to_string()),
            ErrorKind::ConnectionRefused => (Class::Connect, "connection refused".into()),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                (Class::Connect, "connection reset".into())
            }
            ErrorKind::UnexpectedEof => (Class::Connect, "connection closed before a response".into()),
            ErrorKind::TimedOut | ErrorKind::WouldBlock => timed_out(),
            // rustls reports handshake failures (bad certificate, alerts) as InvalidData.
            ErrorKind::InvalidData if is_tls(&io.to_string()) => (Class::Connect, format!("TLS error: {io}")),
            _ => (Class::Connect, io.to_string()),
        },
        ureq::Error::HostNotFound => (Class::Connect, "host not found".into()),
        ureq::Error::ConnectionFailed => (Class::Connect, "connection failed".into()),
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => (Class::Connect, format!("TLS error: {e}")),
        _ => (Class::Other, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Answers every lookup with `answer`, counting them.
    #[derive(Debug)]
    struct Counting {
        lookups: AtomicUsize,
        answer: SocketAddr,
    }

    impl Resolver for Counting {
        fn resolve(
            &self,
            _: &Uri,
            _: &ureq::config::Config,
            _: NextTimeout,
        ) -> Result<ResolvedSocketAddrs, ureq::Error> {
            self.lookups.fetch_add(1, Ordering::Relaxed);
            let mut addrs = self.empty();
            addrs.push(self.answer);
            Ok(addrs)
        }
    }

    fn guarded(answer: &str, keep_for: Duration) -> GuardedResolver<Counting> {
        GuardedResolver {
            allow_private: false,
            allowed: Vec::new(),
            inner: Counting { lookups: AtomicUsize::new(0), answer: answer.parse().unwrap() },
            keep_for,
            resolved: Mutex::default(),
        }
    }

    fn lookup(r: &GuardedResolver<Counting>, url: &str) -> Result<Vec<SocketAddr>, ureq::Error> {
        let config = ureq::Agent::config_builder().build();
        r.resolve(&url.parse().unwrap(), &config, NextTimeout::default()).map(|a| a.to_vec())
    }

    #[test]
    fn allowed_addresses_are_kept_for_a_while_refused_ones_never() {
        let r = guarded("93.184.216.34:443", RESOLVED_FOR);
        for _ in 0..3 {
            assert_eq!(
                lookup(&r, "https://hooks.example/a").unwrap(),
                ["93.184.216.34:443".parse().unwrap()]
            );
        }
        lookup(&r, "https://hooks.example/other/path").unwrap();
        assert_eq!(r.inner.lookups.load(Ordering::Relaxed), 1, "one lookup per host");
        // Another port or scheme is another entry.
        lookup(&r, "https://hooks.example:8443/a").unwrap();
        lookup(&r, "http://hooks.example/a").unwrap();
        assert_eq!(r.inner.lookups.load(Ordering::Relaxed), 3);

        let expired = guarded("93.184.216.34:443", Duration::ZERO);
        lookup(&expired, "https://hooks.example/").unwrap();
        lookup(&expired, "https://hooks.example/").unwrap();
        assert_eq!(expired.inner.lookups.load(Ordering::Relaxed), 2, "asked again once expired");

        // A refusal is checked afresh each time: nothing of it is kept.
        let private = guarded("10.0.0.1:443", RESOLVED_FOR);
        for _ in 0..2 {
            let e = lookup(&private, "https://internal.example/").unwrap_err();
            assert!(e.to_string().contains("blocked: 10.0.0.1"), "{e}");
        }
        assert_eq!(private.inner.lookups.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_local_shortage_is_told_apart_from_the_receivers_failures() {
        let timeout = Duration::from_secs(1);
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let e = ureq::Error::Io(std::io::Error::from_raw_os_error(errno));
            let (class, reason) = explain(&e, timeout);
            assert_eq!(class, Class::ShortOfResources, "{errno}: {reason}");
            assert!(reason.starts_with("short of local resources: "), "{reason}");
        }
        for errno in [libc::ECONNREFUSED, libc::ECONNRESET, libc::EHOSTUNREACH, libc::EACCES] {
            let e = ureq::Error::Io(std::io::Error::from_raw_os_error(errno));
            assert_ne!(explain(&e, timeout).0, Class::ShortOfResources, "{errno}");
        }
        assert_ne!(explain(&ureq::Error::HostNotFound, timeout).0, Class::ShortOfResources);

        // The resolver keeps a shortage as it is; other lookup failures
        // become "host not found".
        #[derive(Debug)]
        struct Failing(i32);
        impl Resolver for Failing {
            fn resolve(
                &self,
                _: &Uri,
                _: &ureq::config::Config,
                _: NextTimeout,
            ) -> Result<ResolvedSocketAddrs, ureq::Error> {
                Err(ureq::Error::Io(std::io::Error::from_raw_os_error(self.0)))
            }
        }
        let resolver = |errno| GuardedResolver {
            allow_private: false,
            allowed: Vec::new(),
            inner: Failing(errno),
            keep_for: RESOLVED_FOR,
            resolved: Mutex::default(),
        };
        let config = ureq::Agent::config_builder().build();
        let uri: Uri = "https://hooks.example/".parse().unwrap();
        let e = resolver(libc::EMFILE).resolve(&uri, &config, NextTimeout::default()).unwrap_err();
        assert_eq!(explain(&e, timeout).0, Class::ShortOfResources, "{e}");
        let e = resolver(libc::EINVAL).resolve(&uri, &config, NextTimeout::default()).unwrap_err();
        assert!(matches!(e, ureq::Error::HostNotFound), "{e}");
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2026 07:30:00 GMT", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "past: no wait"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}

/// The headers every signed POST carries (deliveries and notifications
/// alike), the contract's `X-Nexor-*` set: `event` is the event type,
/// `timestamp` unix seconds, `signature` the `v1=` header value.
pub fn signed_headers<'a>(
    event: &'a str,
    delivery_id: &'a str,
    timestamp: &'a str,
    webhook_id: &'a str,
    signature: &'a str,
) -> [(&'static str, &'a str); 7] {
    [
        ("Content-Type", "application/json"),
        ("X-Nexor-Event", event),
        ("X-Nexor-Delivery-ID", delivery_id),
        ("X-Nexor-Timestamp", timestamp),
        ("X-Nexor-Webhook-ID", webhook_id),
        ("X-Nexor-Signature", signature),
        ("User-Agent", USER_AGENT),
    ]
}

/// How long a host's allowed addresses are used without asking DNS again.
/// Without this every attempt waits for a lookup (glibc keeps no cache): a
/// round trip to the DNS server per delivery (BENCHMARKS.md, "Before and
/// after, one fix at a time"). A config reload builds new agents, and so an
/// empty cache.
pub const RESOLVED_FOR: Duration = Duration::from_secs(30);

/// Resolves as usual, then refuses to hand the connector any address that is
/// not public (unless allowed). Checking here, not on the URL, closes the
/// DNS-rebinding gap: the connector dials only what this returns. Allowed
/// answers are kept for `keep_for`; refusals and failures are not.
#[derive(Debug)]
struct GuardedResolver<R = DefaultResolver> {
    allow_private: bool,
    allowed: Vec<IpNet>,
    inner: R,
    keep_for: Duration,
    /// By `scheme://authority`: when resolved, and the addresses.
    resolved: Mutex<HashMap<String, (Instant, ResolvedSocketAddrs)>>,
}

impl<R: Resolver> Resolver for GuardedResolver<R> {
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let key =
            format!("{}://{}", uri.scheme_str().unwrap_or(""), uri.authority().map_or("", |a| a.as_str()));
        if let Some((at, addrs)) = self.resolved.lock().expect("resolver cache").get(&key) {
            if at.elapsed() < self.keep_for {
                return Ok(addrs.clone());
            }
        }
        // A failed lookup is an io::Error carrying getaddrinfo's wording; say
        // it plainly, unless it is this machine that ran short (getaddrinfo's
        // EAI_SYSTEM with EMFILE, say), which is no fault of the host.
        let addrs = self.inner.resolve(uri, config, timeout).map_err(|e| match e {
            ureq::Error::Io(io) if short_of_resources(&io) => ureq::Error::Io(io),
            ureq::Error::Io(_) => ureq::Error::HostNotFound,
            e => e,
        })?;
        let refused =
            |a: &SocketAddr| Some((a.ip(), target::refused(a.ip(), self.allow_private, &self.allowed)?));
        if let Some((ip, why)) = addrs.iter().find_map(refused) {
            let blocked = Blocked { ip, why };
            return Err(ureq::Error::Io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, blocked)));
        }
        self.resolved.lock().expect("resolver cache").insert(key, (Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}
