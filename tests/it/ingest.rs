//! The ingest API: validation, error bodies, idempotency, auth, limits; and
//! the command line's config checking.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const EID: &str = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
const SETTLE: Duration = Duration::from_secs(15);

fn daemon(rx: &Receiver, server_extra: &str) -> Daemon {
    let cfg = format!(
        "[delivery]\nretry_schedule = [\"100ms\"]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/i"), r#"["*"]"#)
    );
    Daemon::start(server_extra, &cfg)
}

fn event_json(event_id: &str, data: &str) -> String {
    format!(
        r#"{{"event_type":"meeting.scheduled","client_id":"{CLIENT_A}","event_id":"{event_id}","data":{data}}}"#
    )
}

fn assert_error(answer: &(u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{}", answer.1);
    assert!(!answer.1["error"]["message"].as_str().unwrap_or("").is_empty(), "{}", answer.1);
}

#[test]
fn same_event_id_is_one_event_and_different_content_is_a_conflict() {
    let rx = Receiver::start();
    let d = daemon(&rx, "");
    let first = d.post("/v1/events", &event_json(EID, r#"{"a":1,"b":[1,2]}"#));
    assert_eq!(first.0, 202, "{}", first.1);
    assert_eq!(first.1["event_id"], EID);
    // Same content, other spacing and key order: the same event.
    let again = d.post("/v1/events", &event_json(EID, r#"{ "b":[1,2], "a":1 }"#));
    assert_eq!(again.0, 200, "{}", again.1);
    assert_eq!(again.1["event_id"], EID);
    let conflict = d.post("/v1/events", &event_json(EID, r#"{"a":2}"#));
    assert_error(&conflict, 409, "event_id_conflict");

    let ev = d.wait_settled(EID, &["succeeded"], SETTLE);
    assert_eq!(ev["deliveries"].as_array().unwrap().len(), 1);
    assert_eq!(ev["data"]["a"], 1, "the first content stays");
    assert_eq!(rx.hits().len(), 1);
}

#[test]
fn data_that_json_values_cannot_hold_is_never_taken_for_a_duplicate() {
    let rx = Receiver::start();
    let d = daemon(&rx, "");
    // serde_json cannot parse these into values, so comparing parsed values
    // once took any two of them for the same event.
    let cases = [
        ("8a3c1e52-0001-4a1e-9d55-0c8a3f7e9b10", r#"{"x":1e400}"#, r#"{"x":2e400}"#),
        ("8a3c1e52-0002-4a1e-9d55-0c8a3f7e9b10", r#"{"x":"\ud800"}"#, r#"{"x":"\udbff"}"#),
        ("8a3c1e52-0003-4a1e-9d55-0c8a3f7e9b10", r#"{"x":1e400}"#, r#"{"x":1}"#),
    ];
    for (id, first, other) in cases {
        let stored = d.post("/v1/events", &event_json(id, first));
        assert_eq!(stored.0, 202, "{first}: {}", stored.1);
        assert_error(&d.post("/v1/events", &event_json(id, other)), 409, "event_id_conflict");
        let again = d.post("/v1/events", &event_json(id, first));
        assert_eq!(again.0, 200, "the same bytes again are the same event: {}", again.1);
        // Shown as stored (and delivered), not as a JSON value would hold it.
        let mut shown = ureq::get(format!("{}/v1/events/{id}", d.base)).call().unwrap();
        let text = shown.body_mut().read_to_string().unwrap();
        assert!(text.contains(&format!(r#""data":{first}"#)), "{first} shown as {text}");
    }
    let (_, sent) =
        d.post("/v1/events", &event_json(EID, r#"{"i":123456789012345678901234567890,"a":1,"a":2}"#));
    let mut shown =
        ureq::get(format!("{}/v1/events/{}", d.base, sent["event_id"].as_str().unwrap())).call().unwrap();
    let text = shown.body_mut().read_to_string().unwrap();
    assert!(text.contains(r#""data":{"i":123456789012345678901234567890,"a":1,"a":2}"#), "{text}");
}

#[test]
fn bad_input_gets_its_code_and_stores_nothing() {
    let rx = Receiver::start();
    let d = daemon(&rx, "max_body = 2048");
    let with = |field: &str, value: &str| {
        let mut v: serde_json::Map<String, Value> = serde_json::from_str(&event_json(EID, "{}")).unwrap();
        match value {
            "<absent>" => drop(v.remove(field)),
            _ => drop(v.insert(field.into(), serde_json::from_str(value).unwrap())),
        }
        serde_json::to_string(&v).unwrap()
    };
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"event_type\": ".into(), 400, "invalid_json"),
        ("not json".into(), 400, "invalid_json"),
        (with("event_type", "<absent>"), 422, "missing_field"),
        (with("event_type", r#""meeting.eaten""#), 422, "invalid_field"),
        (with("client_id", "<absent>"), 422, "missing_field"),
        (with("client_id", r#""not-a-uuid""#), 422, "invalid_field"),
        (with("data", "<absent>"), 422, "missing_field"),
        (with("data", "[1,2]"), 422, "invalid_field"),
        (with("data", r#""text""#), 422, "invalid_field"),
        (with("event_id", r#""1234""#), 422, "invalid_field"),
        (with("timestamp", r#""yesterday""#), 422, "invalid_field"),
        (with("timestamp", "17"), 422, "invalid_field"),
        ("[]".into(), 422, "invalid_field"),
        (event_json(EID, &format!(r#"{{"pad":"{}"}}"#, "x".repeat(4096))), 413, "body_too_large"),
    ];
    for (body, status, code) in &cases {
        let answer = d.post("/v1/events", body);
        assert_error(&answer, *status, code);
        let missing = d.get(&format!("/v1/events/{EID}"));
        assert_error(&missing, 404, "not_found");
    }
    assert!(rx.hits().is_empty(), "nothing from a rejected request is delivered");
    // The same id is still free: a good request now stores it.
    assert_eq!(d.post("/v1/events", &event_json(EID, "{}")).0, 202);
}

#[test]
fn api_token_guards_every_v1_call() {
    let rx = Receiver::start();
    let d = daemon(&rx, "api_token = \"s3cret-token\"");
    let body = event_json(EID, "{}");
    assert_error(&d.post("/v1/events", &body), 401, "unauthorized");
    assert_error(&d.request("POST", "/v1/events", Some("wrong"), Some(body.as_bytes())), 401, "unauthorized");
    assert_error(&d.get(&format!("/v1/events/{EID}")), 401, "unauthorized");
    assert_error(&d.post(&format!("/v1/webhooks/{W1}/test"), ""), 401, "unauthorized");
    assert_eq!(d.get("/healthz").0, 200, "health needs no token");
    let ok = d.request("POST", "/v1/events", Some("s3cret-token"), Some(body.as_bytes()));
    assert_eq!(ok.0, 202);
    assert_eq!(d.request("GET", &format!("/v1/events/{EID}"), Some("s3cret-token"), None).0, 200);
    assert!(!d.log().contains("s3cret-token"));
}

#[test]
fn unknown_ids_and_paths_are_json_404s() {
    let rx = Receiver::start();
    let d = daemon(&rx, "");
    assert_error(&d.get(&format!("/v1/events/{EID}")), 404, "not_found");
    assert_error(&d.get("/v1/events/not-a-uuid"), 404, "not_found");
    assert_error(&d.get("/v1/nothing"), 404, "not_found");
}

#[test]
fn a_second_daemon_on_the_same_storage_is_refused() {
    let rx = Receiver::start();
    let d = daemon(&rx, "");
    let text = std::fs::read_to_string(d.config_path())
        .unwrap()
        .replace(&d.base.replace("http://", ""), &format!("127.0.0.1:{}", free_port()));
    let other = d.dir.path().join("second.toml");
    write_file(&other, &text);
    let out = Command::new(bin()).args(["run", "--config"]).arg(&other).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another nexor-webhookd is already using the storage directory"), "{stderr}");
}

#[test]
fn check_config_names_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    write_file(
        &good,
        &format!("[storage]\npath = \"d\"\n\n{}", webhook(W1, CLIENT_A, "https://example.com/h", r#"["*"]"#)),
    );
    let out = Command::new(bin()).args(["check-config", "--config"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.path().join("bad.toml");
    write_file(
        &bad,
        &format!(
            "[storage]\npath = \"d\"\nflavour = 1\n\n{}",
            webhook(W1, CLIENT_A, "https://example.com/h", r#"["*"]"#)
        ),
    );
    let out = Command::new(bin()).args(["check-config", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}:3: unknown field `flavour`", bad.display())), "{stderr}");

    // `run` refuses the same file and never opens storage.
    let out = Command::new(bin()).args(["run", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `flavour`"));
    assert!(!dir.path().join("d").exists());
}
