//! Egress through an HTTP proxy: plain http in absolute form, https in a
//! `CONNECT` tunnel to the address the SSRF check allowed; the check still
//! refuses what it refuses without a proxy.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const W2: &str = "22222222-2222-4222-8222-222222222222";
const SETTLE: Duration = Duration::from_secs(15);

/// A forwarding proxy on loopback, as small as one can be: it records each
/// connection's first request line, then relays bytes both ways, to the
/// tunnel's target for `CONNECT` or to the absolute URI's host otherwise.
struct Proxy {
    addr: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || relay(client, &log));
            }
        });
        Proxy { addr, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn relay(mut client: TcpStream, log: &Mutex<Vec<String>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let line = text.lines().next().unwrap_or("").to_owned();
    log.lock().unwrap().push(line.clone());
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let upstream = if method == "CONNECT" {
        let Ok(up) = TcpStream::connect(target) else { return };
        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
        up
    } else {
        let authority = target.trim_start_matches("http://").split('/').next().unwrap_or("");
        let Ok(mut up) = TcpStream::connect(authority) else { return };
        // Receivers take the absolute form too (RFC 9112 3.2.2).
        up.write_all(&head).unwrap();
        up
    };
    let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    std::thread::spawn(move || drop(std::io::copy(&mut u2, &mut c2)));
    let (mut client, mut upstream) = (client, upstream);
    let _ = std::io::copy(&mut client, &mut upstream);
}

#[test]
fn every_attempt_goes_through_the_proxy_and_the_ssrf_check_still_holds() {
    let rx = Receiver::start();
    let proxy = Proxy::start();
    let port = rx.base.rsplit(':').next().unwrap().to_owned();
    let mut hooks = webhook(W1, CLIENT_A, &rx.url("/ok/proxied"), r#"["*"]"#);
    let tls = openssl_server();
    if let Some((_, url, _)) = &tls {
        hooks += &webhook(W2, CLIENT_A, url, r#"["*"]"#);
    } else {
        eprintln!("skipped the https case: openssl is not installed");
    }
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\nproxy = \"http://{}\"\n\n{hooks}",
        proxy.addr
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let ev = d.wait_settled(body["event_id"].as_str().unwrap(), &["succeeded", "failed"], SETTLE);
    let hit = &rx.hits_on("/ok/proxied")[0];
    assert_eq!(hit.header("host"), format!("127.0.0.1:{port}"));
    assert!(!hit.header("x-nexor-signature").is_empty());
    let seen = proxy.seen();
    assert!(seen.contains(&format!("POST http://127.0.0.1:{port}/ok/proxied HTTP/1.1")), "{seen:?}");
    if let Some((mut server, url, _)) = tls {
        // Tunnelled to the address itself; the self-signed certificate then
        // fails TLS, which shows the tunnel reached the server.
        let authority = url.trim_start_matches("https://").trim_end_matches('/');
        assert!(seen.contains(&format!("CONNECT {authority} HTTP/1.1")), "{seen:?}");
        let to_w2 = ev["deliveries"].as_array().unwrap().iter().find(|x| x["webhook_id"] == W2).unwrap();
        assert!(to_w2["attempts"][0]["error"].as_str().unwrap().starts_with("TLS error"), "{ev}");
        server.kill().unwrap();
        server.wait().unwrap();
    }

    // Without allow_private_targets, a name that resolves to loopback is
    // refused before the proxy hears of it.
    let before = proxy.seen().len();
    let guarded = format!(
        "[delivery]\nretry_schedule = []\nproxy = \"http://{}\"\n\n{}",
        proxy.addr,
        webhook(W1, CLIENT_A, &format!("http://localhost:{port}/ok/private"), r#"["*"]"#)
    );
    let d = Daemon::start("", &guarded);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let ev = d.wait_settled(body["event_id"].as_str().unwrap(), &["failed"], SETTLE);
    let error = ev["deliveries"][0]["attempts"][0]["error"].as_str().unwrap().to_owned();
    assert!(error.starts_with("blocked"), "{error}");
    assert_eq!(proxy.seen().len(), before);
    assert!(rx.hits_on("/ok/private").is_empty());
}

#[test]
fn a_proxy_that_is_down_fails_the_attempt_which_is_retried() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = [\"100ms\"]\nallow_private_targets = true\nproxy = \"http://127.0.0.1:{}\"\n\n{}",
        free_port(),
        webhook(W1, CLIENT_A, &rx.url("/ok/never"), r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let ev = d.wait_settled(body["event_id"].as_str().unwrap(), &["failed"], SETTLE);
    let attempts = ev["deliveries"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{ev}");
    assert!(attempts[0]["error"].as_str().unwrap().starts_with("connection refused"), "{ev}");
    assert!(rx.hits().is_empty());
}

/// tinyproxy on a free loopback port, its log (stdout) in `dir`; `None`
/// where it is not installed (CI installs it).
fn tinyproxy(dir: &std::path::Path) -> Option<(std::process::Child, u16)> {
    let port = free_port();
    let conf = dir.join("tinyproxy.conf");
    // No ConnectPort line: CONNECT to any port (the test's TLS server has
    // a random one).
    std::fs::write(
        &conf,
        format!("Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\nLogLevel Info\n"),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("tinyproxy.log")).unwrap();
    let child =
        std::process::Command::new("tinyproxy").arg("-d").arg("-c").arg(&conf).stdout(log).spawn().ok()?;
    wait_for("tinyproxy", SETTLE, || TcpStream::connect(("127.0.0.1", port)).is_ok());
    Some((child, port))
}

#[test]
fn deliveries_go_through_a_real_proxy_process() {
    let dir = tempfile::tempdir().unwrap();
    let Some((mut proxy, port)) = tinyproxy(dir.path()) else {
        eprintln!("skipped: tinyproxy is not installed");
        return;
    };
    let rx = Receiver::start();
    let tls = openssl_server().expect("openssl (CI installs it)");
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\nproxy = \"http://127.0.0.1:{port}\"\n\n{}{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/tiny"), r#"["*"]"#),
        webhook(W2, CLIENT_A, &tls.1, r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let ev = d.wait_settled(body["event_id"].as_str().unwrap(), &["succeeded", "failed"], SETTLE);
    assert_eq!(rx.hits_on("/ok/tiny").len(), 1, "{ev}");
    let to_w2 = ev["deliveries"].as_array().unwrap().iter().find(|x| x["webhook_id"] == W2).unwrap();
    assert!(to_w2["attempts"][0]["error"].as_str().unwrap().starts_with("TLS error"), "{ev}");
    let log = std::fs::read_to_string(dir.path().join("tinyproxy.log")).unwrap();
    let tls_authority = tls.1.trim_start_matches("https://").trim_end_matches('/').to_owned();
    assert!(log.contains(&format!("CONNECT {tls_authority} HTTP/1.1")), "{log}");
    assert!(log.contains("POST http://127.0.0.1:"), "{log}");
    proxy.kill().unwrap();
    proxy.wait().unwrap();
    let (mut server, _, _) = tls;
    server.kill().unwrap();
    server.wait().unwrap();
}
