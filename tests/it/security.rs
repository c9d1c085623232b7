//! Safe by default: blocked targets, hostile receivers, the API token, secret
//! handling and rotation.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const W2: &str = "22222222-2222-4222-8222-222222222222";
const W3: &str = "33333333-3333-4333-8333-333333333333";
const W4: &str = "44444444-4444-4444-8444-444444444444";
const SETTLE: Duration = Duration::from_secs(20);

/// A TCP server on loopback that treats every connection with `serve`.
fn raw_server(serve: fn(TcpStream)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
    format!("http://{addr}/")
}

fn read_request(conn: &mut TcpStream) {
    let mut buf = [0u8; 8192];
    let _ = conn.read(&mut buf);
}

fn drip_headers(mut conn: TcpStream) {
    read_request(&mut conn);
    for b in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" {
        if conn.write_all(&[*b]).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn garbage(mut conn: TcpStream) {
    read_request(&mut conn);
    let _ = conn.write_all(b"THIS IS NOT HTTP\r\n\r\n");
}

fn reset(mut conn: TcpStream) {
    read_request(&mut conn);
    // SO_LINGER 0: closing sends RST instead of FIN.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

fn huge(mut conn: TcpStream) {
    read_request(&mut conn);
    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n");
    let chunk = vec![b'x'; 65536];
    for _ in 0..1600 {
        if conn.write_all(&chunk).is_err() {
            return;
        }
    }
}

#[test]
fn hostile_receivers_cost_one_bounded_attempt() {
    let cfg = format!(
        "[delivery]\ntimeout = \"500ms\"\nretry_schedule = []\nallow_private_targets = true\nworkers = 4\n\n{}{}{}{}",
        webhook(W1, CLIENT_A, &raw_server(drip_headers), r#"["*"]"#),
        webhook(W2, CLIENT_A, &raw_server(garbage), r#"["*"]"#),
        webhook(W3, CLIENT_A, &raw_server(reset), r#"["*"]"#),
        webhook(W4, CLIENT_A, &raw_server(huge), r#"["*"]"#),
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let ev = d.wait_settled(body["event_id"].as_str().unwrap(), &["succeeded", "failed"], SETTLE);
    let attempt = |w: &str| -> Value {
        let dl = ev["deliveries"].as_array().unwrap().iter().find(|d| d["webhook_id"] == w).unwrap();
        assert_eq!(dl["attempts"].as_array().unwrap().len(), 1, "{dl}");
        dl["attempts"][0].clone()
    };
    let drip = attempt(W1);
    assert_eq!(drip["error"], "timed out after 500ms", "{drip}");
    assert!(drip["duration_ms"].as_u64().unwrap() < 5_000, "a dripping receiver is cut off: {drip}");
    let g = attempt(W2);
    assert!(g.get("status_code").is_none() && !g["error"].as_str().unwrap().is_empty(), "{g}");
    let r = attempt(W3);
    let reason = r["error"].as_str().unwrap();
    assert!(reason == "connection reset" || reason == "connection closed before a response", "{r}");
    let h = attempt(W4);
    assert_eq!(h["status_code"], 200, "{h}");
    assert!(h["response_body"].as_str().unwrap().len() <= 1024, "only the first bytes are kept");
    assert!(h["duration_ms"].as_u64().unwrap() < 5_000, "a 100 MB answer is not read: {h}");
}

#[test]
fn rotation_signs_with_every_unexpired_secret() {
    let rx = Receiver::start();
    let hook = webhook(W1, CLIENT_A, &rx.url("/ok/rot"), r#"["*"]"#).replace(
        &format!("secret = \"whsec_{W1}\""),
        "secret = \"whsec_new\"\nprevious_secrets = [\n  { secret = \"whsec_old\", expires = \"2100-01-01T00:00:00Z\" },\n  { secret = \"whsec_gone\", expires = \"2020-01-01T00:00:00Z\" },\n]",
    );
    let d = Daemon::start("", &format!("[delivery]\nallow_private_targets = true\n\n{hook}"));
    assert_eq!(d.send("meeting.scheduled", CLIENT_A, "{}").0, 202);
    wait_for("the delivery", SETTLE, || rx.hits().len() == 1);
    let hit = &rx.hits()[0];
    let ts = hit.header("x-nexor-timestamp");
    let sign = |secret: &str| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&hit.body);
        format!("v1={}", hex::encode(mac.finalize().into_bytes()))
    };
    assert_eq!(hit.header("x-nexor-signature"), format!("{},{}", sign("whsec_new"), sign("whsec_old")));
    // The CLI verifier accepts the header with either key, and not the expired one.
    let body_file = d.dir.path().join("body");
    std::fs::write(&body_file, &hit.body).unwrap();
    for (secret, ok) in [("whsec_new", true), ("whsec_old", true), ("whsec_gone", false)] {
        let (code, _) = verify_cli(secret, ts, hit.header("x-nexor-signature"), &body_file, "5m");
        assert_eq!(code == Some(0), ok, "{secret}");
    }
}

/// Extra headers, among them two the HTTP client logs in clear at debug.
const HEADERS: &str = r#""User-Agent" = "ua-secret-9c4d", "Accept" = "accept-secret-1b7e", "Authorization" = "Bearer auth-secret-62f0""#;

#[test]
fn secrets_never_appear_in_logs_api_or_metrics() {
    let rx = Receiver::start();
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), "file-secret-3f9a\n").unwrap();
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\n\n{}{}{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/s1"), r#"["*"]"#)
            .replace(&format!("secret = \"whsec_{W1}\""), "secret = \"inline-secret-51be\"")
            .replacen("events =", &format!("headers = {{ {HEADERS} }}\nevents ="), 1),
        webhook(W2, CLIENT_A, &rx.url("/fail/s2"), r#"["*"]"#).replace(
            &format!("secret = \"whsec_{W2}\""),
            &format!("secret_file = \"{}\"", secret_file.path().display())
        ),
        webhook(W3, CLIENT_A, &rx.url("/ok/s3"), r#"["*"]"#)
            .replace(&format!("secret = \"whsec_{W3}\""), "secret_env = \"NEXOR_TEST_ENV_SECRET\""),
    );
    // The daemon's environment only: setting the test process's own would
    // race every other test's reads of it.
    let mut d = Daemon::configured(None, "api_token = \"token-secret-0d2e\"", &cfg);
    d.env.push(("NEXOR_TEST_ENV_SECRET".into(), "env-secret-77c1".into()));
    // Everything logged, the HTTP client's own request logs too.
    d.env.push(("RUST_LOG".into(), "trace,ureq=trace,ureq::run=trace,ureq_proto::util=trace".into()));
    d.start_again();
    let token = Some("token-secret-0d2e");
    let (status, body) = d.request(
        "POST",
        "/v1/events",
        token,
        Some(
            format!(r#"{{"event_type":"meeting.scheduled","client_id":"{CLIENT_A}","data":{{}}}}"#)
                .as_bytes(),
        ),
    );
    assert_eq!(status, 202);
    let id = body["event_id"].as_str().unwrap();
    wait_for("all three attempts", SETTLE, || rx.hits().len() == 3);
    // The env and file secrets signed their deliveries.
    let hit = rx.hits_on("/ok/s3").remove(0);
    let mut mac = Hmac::<Sha256>::new_from_slice(b"env-secret-77c1").unwrap();
    mac.update(format!("{}.", hit.header("x-nexor-timestamp")).as_bytes());
    mac.update(&hit.body);
    assert_eq!(hit.header("x-nexor-signature"), format!("v1={}", hex::encode(mac.finalize().into_bytes())));

    let mut seen = d.log();
    for path in [
        "/v1/webhooks".to_owned(),
        format!("/v1/webhooks/{W2}"),
        format!("/v1/events/{id}"),
        format!("/v1/webhooks/{W2}/deliveries"),
    ] {
        seen.push_str(&d.request("GET", &path, token, None).1.to_string());
    }
    seen.push_str(
        &ureq::get(format!("{}/metrics", d.base)).call().unwrap().body_mut().read_to_string().unwrap(),
    );
    seen.push_str(&d.request("GET", "/v1/webhooks", Some("wrong"), None).1.to_string());
    // The extra headers arrived, and each value is as secret as the rest.
    let hit = rx.hits_on("/ok/s1").remove(0);
    assert_eq!(
        (hit.header("user-agent"), hit.header("accept"), hit.header("authorization")),
        ("ua-secret-9c4d", "accept-secret-1b7e", "Bearer auth-secret-62f0")
    );
    for secret in [
        "inline-secret-51be",
        "file-secret-3f9a",
        "env-secret-77c1",
        "token-secret-0d2e",
        "ua-secret-9c4d",
        "accept-secret-1b7e",
        "auth-secret-62f0",
    ] {
        assert!(!seen.contains(secret), "{secret} leaked");
    }
    assert!(seen.contains("<redacted>"));
}

#[test]
fn an_api_off_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let port = free_port();
    let base = format!("[server]\nlisten = \"0.0.0.0:{port}\"\n\n[storage]\npath = \"data\"\n");
    std::fs::write(&path, &base).unwrap();
    let out = Command::new(bin()).args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api_token is required"));
    assert!(!dir.path().join("data").exists(), "nothing was started");

    // With a token from a file it starts, and every /v1 call needs it.
    std::fs::write(dir.path().join("token"), "file-token\n").unwrap();
    std::fs::write(&path, base.replace("[server]\n", "[server]\napi_token_file = \"token\"\n")).unwrap();
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let url = format!("http://127.0.0.1:{port}/v1/webhooks");
    wait_for("the daemon", SETTLE, || agent.get(&url).call().is_ok());
    assert_eq!(agent.get(&url).call().unwrap().status(), 401);
    assert_eq!(agent.get(&url).header("Authorization", "Bearer file-token").call().unwrap().status(), 200);
    // The scheme's name in any case; the token exactly.
    assert_eq!(agent.get(&url).header("Authorization", "bearer file-token").call().unwrap().status(), 200);
    for wrong in ["Bearer File-token", "Bearer  file-token", "Basic file-token", "file-token"] {
        assert_eq!(agent.get(&url).header("Authorization", wrong).call().unwrap().status(), 401, "{wrong}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn allowed_cidrs_open_a_range_without_allowing_all_private_targets() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallowed_cidrs = [\"127.0.0.0/8\"]\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/cidr"), r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    d.wait_settled(body["event_id"].as_str().unwrap(), &["succeeded"], SETTLE);

    // An IPv6 literal outside the range is refused before anything starts.
    let bad = d.dir.path().join("bad.toml");
    std::fs::write(&bad, cfg.replace(&rx.base, "http://[::1]:9")).unwrap();
    let out = Command::new(bin()).args(["check-config", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("::1 is a loopback address"));
}

#[test]
fn check_config_refuses_every_target_that_is_not_global_unicast() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    // Documentation (RFC 9637), unallocated, SRv6 SIDs, and the SIIT
    // (::ffff:0:0:0/96) forms of 127.0.0.1 and 169.254.169.254: none of them
    // is globally routable unicast, yet a deny-list let them all through.
    for (host, why) in [
        ("[3fff::1]", "3fff::1 is a documentation address"),
        ("[4000::1]", "4000::1 is an unallocated address (outside 2000::/3)"),
        ("[5f00::1]", "5f00::1 is an SRv6 segment identifier"),
        ("[::ffff:0:7f00:1]", "::ffff:0:7f00:1 is a loopback address"),
        ("[::ffff:0:a9fe:a9fe]", "::ffff:0:a9fe:a9fe is a link-local address"),
    ] {
        let url = format!("http://{host}/x");
        std::fs::write(
            &path,
            format!("[storage]\npath = \"d\"\n\n{}", webhook(W1, CLIENT_A, &url, r#"["*"]"#)),
        )
        .unwrap();
        let out = Command::new(bin()).args(["check-config", "--config"]).arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url} was accepted");
        assert!(stderr.contains(why), "{url}: {stderr}");
    }
}
/// Opens a connection that sends the start of a request head and stalls.
fn stalled_head(base: &str) -> Conn {
    let mut c = Conn::open(base);
    c.write(b"GET /healthz HTTP/1.1\r\nhost: test\r\n").unwrap();
    c
}

#[test]
fn slow_request_heads_are_closed_after_header_timeout() {
    raise_own_nofile();
    let d = Daemon::start("header_timeout = \"300ms\"\nidle_timeout = \"60s\"", "");
    let opened = std::time::Instant::now();
    let mut stalled: Vec<Conn> = (0..50).map(|_| stalled_head(&d.base)).collect();
    // One more that keeps sending a byte every 50 ms: trickling does not
    // restart the clock.
    let dripping = {
        let base = d.base.clone();
        std::thread::spawn(move || {
            let mut c = stalled_head(&base);
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if c.write(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            start.elapsed()
        })
    };
    wait_for("every stalled head to be closed by the daemon", Duration::from_secs(5), || {
        stalled.retain_mut(|c| !c.closed_within(Duration::from_millis(1)));
        stalled.is_empty()
    });
    assert!(opened.elapsed() >= Duration::from_millis(300), "closed before header_timeout");
    let dripped = dripping.join().unwrap();
    assert!(dripped < Duration::from_secs(5), "a head trickling in stayed open for {dripped:?}");
    let mut fresh = Conn::open(&d.base);
    assert_eq!(fresh.request("GET", "/healthz", "", Duration::from_secs(5)).map(|a| a.0), Some(200));
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_idle_timeout_not_header_timeout() {
    let d = Daemon::start("header_timeout = \"300ms\"\nidle_timeout = \"1s\"", "");
    let mut c = Conn::open(&d.base);
    assert_eq!(c.request("GET", "/healthz", "", Duration::from_secs(5)).map(|a| a.0), Some(200));
    // Idle for twice header_timeout: hyper's own header timer, restarted
    // when a connection goes idle, would have closed it by now.
    assert!(!c.closed_within(Duration::from_millis(600)), "an idle connection closed before idle_timeout");
    assert_eq!(
        c.request("GET", "/healthz", "", Duration::from_secs(5)).map(|a| a.0),
        Some(200),
        "a kept-alive connection serves its next request"
    );
    let idle_from = std::time::Instant::now();
    assert!(c.closed_within(Duration::from_secs(5)), "an idle connection stayed open");
    let idle = idle_from.elapsed();
    // Measured from when the answer was read, a little after the daemon's
    // clock started: well past header_timeout is what counts.
    assert!(idle >= Duration::from_millis(600), "closed after {idle:?} idle, before idle_timeout");
}

#[test]
fn at_max_connections_a_new_client_waits_in_the_backlog_and_is_answered_once_idle_ones_are_closed() {
    let mut d = Daemon::start("max_connections = 20\nidle_timeout = \"3s\"\nheader_timeout = \"3s\"", "");
    d.forget_connections();
    let mut held: Vec<Conn> = (0..20)
        .map(|i| {
            let mut c = Conn::open(&d.base);
            let answer = c.request("GET", "/healthz", "", Duration::from_secs(5));
            assert_eq!(answer.map(|a| a.0), Some(200), "connection {i} of 20");
            c
        })
        .collect();
    // The 21st: the kernel completes its handshake, the daemon does not
    // take it while 20 are open...
    let mut waiting = Conn::open(&d.base);
    let sent = std::time::Instant::now();
    waiting.write(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n").unwrap();
    assert!(waiting.answer(Duration::from_millis(500)).is_none(), "answered a 21st connection at the cap");
    // ...and answers it once idle_timeout has closed the idle ones.
    let answer = waiting.answer(Duration::from_secs(10));
    assert_eq!(answer.map(|a| a.0), Some(200), "the waiting client was not answered");
    assert!(sent.elapsed() >= Duration::from_millis(1500), "answered after {:?}", sent.elapsed());
    for c in &mut held {
        assert!(c.closed_within(Duration::from_secs(5)), "an idle connection at the cap stayed open");
    }
}

#[test]
fn accept_errors_back_off_and_are_logged_once_per_interval() {
    raise_own_nofile();
    let mut d = Daemon::configured(
        None,
        "max_connections = 1000\nheader_timeout = \"60s\"\nidle_timeout = \"60s\"",
        "",
    );
    d.nofile = Some((64, 64));
    d.start_again();
    // More connections than descriptors: the daemon takes what it can, then
    // accept fails with EMFILE while the rest wait in the backlog.
    let fillers: Vec<Conn> = (0..100).map(|_| Conn::open(&d.base)).collect();
    d.wait_log("Too many open files", 1);
    let first = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    let logged = d.log().matches("accept error").count();
    assert_eq!(logged, 1, "accept errors logged {logged} times in {:?}:\n{}", first.elapsed(), d.log());
    drop(fillers);
    let mut fresh = Conn::open(&d.base);
    assert_eq!(
        fresh.request("GET", "/healthz", "", Duration::from_secs(5)).map(|a| a.0),
        Some(200),
        "a new client once descriptors are free again"
    );
}

#[test]
fn without_a_token_other_sites_and_rebound_host_names_are_refused() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/w1"), r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    let port = d.base.rsplit(':').next().unwrap().to_owned();
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let pause = format!("{}/v1/webhooks/{W1}/pause", d.base);
    let post = |headers: &[(&str, String)]| {
        let mut r = agent.post(&pause);
        for (name, value) in headers {
            r = r.header(*name, value);
        }
        r.send_empty().unwrap().status().as_u16()
    };
    // What a page on another site makes the browser send, and a host name
    // rebound to 127.0.0.1: refused, and nothing changes.
    for headers in [
        vec![("origin", "http://localhost:19200".to_owned())],
        vec![("origin", "null".to_owned())],
        vec![("sec-fetch-site", "cross-site".to_owned())],
        vec![("sec-fetch-site", "same-site".to_owned())],
        vec![("host", format!("attacker.example:{port}"))],
    ] {
        assert_eq!(post(&headers), 403, "{headers:?}");
    }
    let (_, w) = d.get(&format!("/v1/webhooks/{W1}"));
    assert_eq!(w["state"], "active");
    let read = agent.get(format!("{}/v1/webhooks", d.base)).header("host", "rebound.example").call().unwrap();
    assert_eq!(read.status(), 403);
    // The console's own requests, and clients that are not browsers, go through.
    let own =
        vec![("origin", format!("http://127.0.0.1:{port}")), ("sec-fetch-site", "same-origin".to_owned())];
    assert_eq!(post(&own), 200);
    assert_eq!(post(&[("host", format!("localhost:{port}"))]), 200);
    assert_eq!(d.post(&format!("/v1/webhooks/{W1}/resume"), "").0, 200);
}
