//! Faults real installs meet: each kind of failing receiver, Retry-After,
//! one hanging endpoint among healthy ones, a full disk.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(20);

fn hook_id(i: usize) -> String {
    format!("{i:08}-0000-4000-8000-000000000000")
}

fn attempts_of<'a>(event: &'a Value, webhook: &str) -> &'a Vec<Value> {
    let d = event["deliveries"].as_array().unwrap().iter().find(|d| d["webhook_id"] == webhook).unwrap();
    d["attempts"].as_array().unwrap()
}

#[test]
fn every_kind_of_failure_is_explained_and_retried_on_schedule() {
    let rx = Receiver::start();
    let tls = openssl_server();
    let mut targets: Vec<(String, &str)> = vec![
        (rx.url("/code/404/a"), "HTTP 404"),
        (rx.url("/code/500/b"), "HTTP 500"),
        (rx.url("/code/429/c"), "HTTP 429"),
        (rx.url("/hang/d"), "timed out after 1s"),
        (format!("http://127.0.0.1:{}/e", free_port()), "connection refused"),
        ("http://nonexistent.invalid/f".to_owned(), "host not found"),
    ];
    match &tls {
        Some((_, url, _)) => targets.push((url.clone(), "TLS error")),
        None => eprintln!("skipped the TLS case: openssl is not installed"),
    }
    let hooks: String = targets
        .iter()
        .enumerate()
        .map(|(i, (url, _))| webhook(&hook_id(i), CLIENT_A, url, r#"["*"]"#))
        .collect();
    let cfg = format!(
        "[delivery]\ntimeout = \"1s\"\nretry_schedule = [\"200ms\"]\nallow_private_targets = true\n\n{hooks}"
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let ev = d.wait_settled(body["event_id"].as_str().unwrap(), &["failed"], SETTLE);
    for (i, (url, reason)) in targets.iter().enumerate() {
        let attempts = attempts_of(&ev, &hook_id(i));
        assert_eq!(attempts.len(), 2, "{url}: one attempt and one retry: {attempts:?}");
        for a in attempts {
            let error = a["error"].as_str().unwrap();
            assert!(error.starts_with(reason), "{url}: {error:?} should start with {reason:?}");
        }
        let gap = clock_ms(&attempts[1]["started_at"]) - clock_ms(&attempts[0]["started_at"]);
        let first_took = attempts[0]["duration_ms"].as_i64().unwrap();
        assert!(
            gap >= 200 + first_took,
            "{url}: retried {gap} ms after the start of an attempt that took {first_took} ms"
        );
    }
    if let Some((mut server, _, _)) = tls {
        server.kill().unwrap();
        server.wait().unwrap();
    }
}

fn clock_ms(v: &Value) -> i64 {
    let t = time::OffsetDateTime::parse(v.as_str().unwrap(), &time::format_description::well_known::Rfc3339)
        .unwrap();
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

#[test]
fn retry_after_is_honoured_in_seconds_and_as_a_date() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = [\"100ms\"]\nallow_private_targets = true\n\n{}{}",
        webhook(&hook_id(1), CLIENT_A, &rx.url("/retry-secs/2/x"), r#"["*"]"#),
        webhook(&hook_id(2), CLIENT_A, &rx.url("/retry-date/3/y"), r#"["*"]"#),
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let ev = d.wait_settled(body["event_id"].as_str().unwrap(), &["failed"], SETTLE);
    let gap = |w: &str| {
        let a = attempts_of(&ev, w);
        assert_eq!(a.len(), 2, "the number of attempts does not change");
        clock_ms(&a[1]["started_at"]) - clock_ms(&a[0]["started_at"])
    };
    assert!(gap(&hook_id(1)) >= 2000, "Retry-After: 2 waited {} ms", gap(&hook_id(1)));
    // An HTTP-date has whole seconds: 3 s ahead is at least 2 s later.
    assert!(gap(&hook_id(2)) >= 2000, "Retry-After date waited {} ms", gap(&hook_id(2)));
}

#[test]
fn a_hanging_endpoint_does_not_hold_up_a_healthy_one() {
    let rx = Receiver::start();
    let (hanging, healthy) = (hook_id(1), hook_id(2));
    let cfg = format!(
        "[delivery]\ntimeout = \"3s\"\nretry_schedule = []\nallow_private_targets = true\nworkers = 4\nper_webhook_in_flight = 2\n\n{}{}",
        webhook(&hanging, CLIENT_A, &rx.url("/hang/iso"), r#"["*"]"#),
        webhook(&healthy, CLIENT_A, &rx.url("/ok/iso"), r#"["*"]"#),
    );
    let d = Daemon::start("", &cfg);
    let ids: Vec<String> = (0..40)
        .map(|_| d.send("meeting.scheduled", CLIENT_A, "{}").1["event_id"].as_str().unwrap().to_owned())
        .collect();
    wait_for("every healthy delivery", SETTLE, || rx.hits_on("/ok/iso").len() == ids.len());
    // All 40 arrived while the first hanging attempts were still waiting for
    // their 3 s timeout: the hanging webhook held at most 2 of the 4 workers.
    let first = d.event(&ids[0]);
    assert!(attempts_of(&first, &hanging).is_empty(), "healthy deliveries waited behind the hanging ones");
}

#[test]
fn a_full_disk_answers_503_and_recovers_by_itself() {
    let Some(mnt) = Tmpfs::mount("8m") else { return };
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\n\n{}",
        webhook(&hook_id(1), CLIENT_A, &rx.url("/ok/disk"), r#"["*"]"#)
    );
    let d = Daemon::start("max_body = 4194304", &cfg);
    // Point the storage at the tmpfs: restart the daemon there.
    let mut d = d;
    d.kill9();
    let text = std::fs::read_to_string(d.config_path()).unwrap();
    let data_line = text.lines().find(|l| l.starts_with("path = ")).unwrap().to_owned();
    let on_tmpfs = format!("path = \"{}/data\"\nmin_free_space = 2097152", mnt.path().display());
    std::fs::write(d.config_path(), text.replace(&data_line, &on_tmpfs)).unwrap();
    d.start_again();
    // Fill the rest of the disk with a ballast file we can delete later.
    let ballast = mnt.path().join("ballast");
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", ballast.display()))
        .args(["bs=64k"])
        .stderr(Stdio::null())
        .status();
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(512 * 1024));
    let mut saw_503 = false;
    for _ in 0..40 {
        let (status, body) = d.send("meeting.scheduled", CLIENT_A, &big);
        assert!(status == 202 || status == 503, "{status} {body}");
        if status == 503 {
            assert_eq!(body["error"]["code"], "storage_unavailable");
            assert!(body["error"]["message"].as_str().unwrap().contains("nearly full"), "{body}");
            saw_503 = true;
            break;
        }
    }
    assert!(saw_503, "a full disk must refuse writes");
    assert_eq!(d.get("/healthz").0, 200, "the daemon stays up");
    std::fs::remove_file(&ballast).unwrap();
    let recovered = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        d.send("meeting.scheduled", CLIENT_A, "{}").0 == 202
    });
    assert!(recovered, "ingest did not recover once space returned:\n{}", d.log());
    let (status, body) = d.send("meeting.scheduled", CLIENT_A, r#"{"after":"recovery"}"#);
    assert_eq!(status, 202);
    d.wait_settled(body["event_id"].as_str().unwrap(), &["succeeded"], SETTLE);
}

/// Gives the stopped daemon's first delivery record an unknown format
/// version: what a future version's record looks like to this build.
fn damage_first_delivery(d: &Daemon) {
    let db = sled::open(d.dir.path().join("data")).unwrap();
    let (key, _) = db.scan_prefix(b"D").next().unwrap().unwrap();
    db.insert(key, vec![99u8, 1, 2, 3]).unwrap();
    db.flush().unwrap();
}

#[test]
fn an_unreadable_record_is_set_aside_not_a_crash_loop() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = [\"300ms\", \"300ms\", \"300ms\", \"300ms\"]\nallow_private_targets = true\n\n{}",
        webhook(&hook_id(1), CLIENT_A, &rx.url("/flaky/3/aside"), r#"["*"]"#)
    );
    let mut d = Daemon::start("", &cfg);
    let first = d.send("meeting.scheduled", CLIENT_A, "{}").1["event_id"].as_str().unwrap().to_owned();
    let second = d.send("meeting.scheduled", CLIENT_A, "{}").1["event_id"].as_str().unwrap().to_owned();
    wait_for("both to be retrying", SETTLE, || {
        [&first, &second].iter().all(|id| d.event(id)["deliveries"][0]["status"] == "retrying")
    });
    d.kill9();
    // Damage the first event's delivery record the way a future version's
    // record would look to this build: an unknown format version.
    damage_first_delivery(&d);
    d.start_again();
    d.wait_settled(&second, &["succeeded"], SETTLE);
    let metrics =
        || ureq::get(format!("{}/metrics", d.base)).call().unwrap().body_mut().read_to_string().unwrap();
    wait_for("the damaged delivery to be set aside", SETTLE, || {
        metrics().contains("nexor_webhookd_deliveries_set_aside 1")
    });
    let seen = metrics();
    assert!(seen.contains("nexor_webhookd_undecodable_records_total 1"), "{seen}\n{}", d.log());
    assert!(d.log().contains("setting it aside"));
    // Set aside once, not retried on every restart: after a restart, a new
    // event goes through and the damaged one is not looked at again.
    d.restart();
    let third = d.send("meeting.scheduled", CLIENT_A, "{}").1["event_id"].as_str().unwrap().to_owned();
    d.wait_settled(&third, &["succeeded"], SETTLE);
    assert_eq!(d.log().matches("setting it aside").count(), 1);
}

#[test]
fn storage_that_cannot_be_used_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "a file where the storage directory should be").unwrap();
    let config = dir.path().join("c.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[storage]\npath = \"{}/data\"\n",
            blocker.display()
        ),
    )
    .unwrap();
    let out = Command::new(bin()).args(["run", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot create") && stderr.contains("not-a-dir/data"), "{stderr}");
}

/// Opens more idle connections than the daemon has descriptors, and waits
/// until it has taken all it will; they stay open while the result lives.
fn flood(d: &Daemon) -> Vec<Conn> {
    let fillers: Vec<Conn> = (0..300).map(|_| Conn::open(&d.base)).collect();
    let mut last = (0, 0);
    wait_for("the daemon to stop taking connections", SETTLE, || {
        let now = open_fds(d.pid());
        last = if now == last.0 { (now, last.1 + 1) } else { (now, 0) };
        std::thread::sleep(Duration::from_millis(40));
        last.1 >= 5
    });
    fillers
}

#[test]
fn idle_connections_at_the_cap_leave_descriptors_for_delivery_and_storage() {
    raise_own_nofile();
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\nworkers = 2\n\n{}",
        webhook(&hook_id(1), CLIENT_A, &rx.url("/ok/reserve"), r#"["*"]"#)
    );
    let mut d = Daemon::configured(None, "header_timeout = \"60s\"\nidle_timeout = \"60s\"", &cfg);
    d.nofile = Some((200, 300));
    d.start_again();
    d.wait_log("open files limit raised from 200 to 300", 1);
    // A client connected before the flood, as an application would be.
    let mut app = Conn::open(&d.base);
    assert_eq!(app.request("GET", "/healthz", "", SETTLE).map(|a| a.0), Some(200));
    let fillers = flood(&d);
    let body = format!(r#"{{"event_type":"meeting.scheduled","client_id":"{CLIENT_A}","data":{{}}}}"#);
    let (status, answer) = app.request("POST", "/v1/events", &body, SETTLE).expect("an answer to the ingest");
    assert_eq!(status, 202, "{answer}");
    let id = answer["event_id"].as_str().unwrap().to_owned();
    let mut event = Value::Null;
    wait_for("the delivery to settle", SETTLE, || {
        event = app.request("GET", &format!("/v1/events/{id}"), "", SETTLE).expect("an answer").1;
        event["deliveries"][0]["status"] != "pending"
    });
    assert_eq!(event["deliveries"][0]["status"], "succeeded", "{event}");
    assert_eq!(attempts_of(&event, &hook_id(1)).len(), 1, "{event}");
    assert_eq!(rx.hits_on("/ok/reserve").len(), 1);
    assert!(d.exited().is_none(), "the daemon stopped:\n{}", d.log());
    drop(fillers);
}

/// Out of file descriptors while a batch is synced (the connection cap
/// lifted far past the limit, so connections take them all): the sync
/// waits for descriptors to come free instead of ending the process, and
/// the event is acknowledged once they do.
#[test]
fn a_sync_short_of_descriptors_waits_instead_of_stopping_the_daemon() {
    raise_own_nofile();
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\nworkers = 2\n\n{}",
        webhook(&hook_id(1), CLIENT_A, &rx.url("/ok/patient"), r#"["*"]"#)
    );
    let mut d = Daemon::configured(
        None,
        "header_timeout = \"60s\"\nidle_timeout = \"60s\"\nmax_connections = 5000",
        &cfg,
    );
    d.nofile = Some((200, 200));
    d.start_again();
    let mut app = Conn::open(&d.base);
    assert_eq!(app.request("GET", "/healthz", "", SETTLE).map(|a| a.0), Some(200));
    let fillers = flood(&d);
    let body = format!(r#"{{"event_type":"meeting.scheduled","client_id":"{CLIENT_A}","data":{{}}}}"#);
    std::thread::scope(|s| {
        let ingest = s.spawn(move || app.request("POST", "/v1/events", &body, Duration::from_secs(30)));
        d.wait_log("out of file descriptors while syncing storage", 1);
        assert!(d.exited().is_none(), "the daemon stopped:\n{}", d.log());
        drop(fillers);
        let (status, answer) = ingest.join().unwrap().expect("an answer to the ingest");
        assert_eq!(status, 202, "{answer}");
    });
    wait_for("the delivery", SETTLE, || rx.hits_on("/ok/patient").len() == 1);
    assert!(d.exited().is_none(), "the daemon stopped:\n{}", d.log());
}

#[test]
fn an_unreadable_delivery_never_attempted_is_set_aside_at_start_and_counted() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nallow_private_targets = true\n\n{}",
        webhook(&hook_id(1), CLIENT_A, &rx.url("/gate/never"), r#"["*"]"#)
    );
    let mut d = Daemon::start("", &cfg);
    d.send("meeting.scheduled", CLIENT_A, "{}");
    // In flight behind the closed gate, never recorded: unindexed, under an
    // open F range that the next start indexes.
    wait_for("the attempt", SETTLE, || rx.arrivals("/gate/never") == 1);
    d.kill9();
    damage_first_delivery(&d);
    d.start_again();
    let (_, metrics) = d.get("/metrics");
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(metrics.contains("nexor_webhookd_deliveries_set_aside 1"), "{metrics}");
    assert!(metrics.contains("nexor_webhookd_undecodable_records_total 1"), "{metrics}");
    rx.set_gate(true);
}
