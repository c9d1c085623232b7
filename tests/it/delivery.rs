//! Delivery end to end: fan-out, envelope, headers, signature, retries,
//! failure reasons, the test endpoint.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::*;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const W2: &str = "22222222-2222-4222-8222-222222222222";
const W3: &str = "33333333-3333-4333-8333-333333333333";
const W4: &str = "44444444-4444-4444-8444-444444444444";
const W5: &str = "55555555-5555-4555-8555-555555555555";

const FAST: &str = "[delivery]\ntimeout = \"2s\"\nretry_schedule = [\"100ms\", \"200ms\", \"400ms\"]\nallow_private_targets = true\n\n";
const SETTLE: Duration = Duration::from_secs(15);

fn hmac_hex(secret: &str, message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

#[test]
fn fans_out_to_exactly_the_subscribed_enabled_webhooks_of_the_client() {
    let rx = Receiver::start();
    let hooks = [
        webhook(W1, CLIENT_A, &rx.url("/ok/w1"), r#"["meeting.scheduled"]"#),
        webhook(W2, CLIENT_A, &rx.url("/ok/w2"), r#"["*"]"#),
        webhook(W3, CLIENT_A, &rx.url("/ok/w3"), r#"["meeting.cancelled", "meeting.no_show"]"#),
        webhook(W4, CLIENT_B, &rx.url("/ok/w4"), r#"["*"]"#),
        webhook(W5, CLIENT_A, &rx.url("/ok/w5"), r#"["*"]"#).replace("events", "enabled = false\nevents"),
    ]
    .concat();
    let d = Daemon::start("", &format!("{FAST}{hooks}"));
    let (status, body) = d.send("meeting.scheduled", CLIENT_A, r#"{"meeting_id":"m-1"}"#);
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["deliveries"], 2);
    let id = body["event_id"].as_str().unwrap().to_owned();
    let ev = d.wait_settled(&id, &["succeeded"], SETTLE);
    let targets: HashSet<_> =
        ev["deliveries"].as_array().unwrap().iter().map(|d| d["webhook_id"].as_str().unwrap()).collect();
    assert_eq!(targets, HashSet::from([W1, W2]));
    let paths: HashSet<_> = rx.hits().into_iter().map(|h| h.path).collect();
    assert_eq!(paths, HashSet::from(["/ok/w1".to_owned(), "/ok/w2".to_owned()]));

    // No subscriber at all is still an accepted event, with no deliveries.
    let (status, body) = d.send("meeting.completed", CLIENT_B.replace('0', "9").as_str(), "{}");
    assert_eq!((status, body["deliveries"].as_u64()), (202, Some(0)));
}

#[test]
fn delivery_has_the_envelope_headers_and_a_verifiable_signature() {
    let rx = Receiver::start();
    let d = Daemon::start("", &format!("{FAST}{}", webhook(W1, CLIENT_A, &rx.url("/ok/sig"), r#"["*"]"#)));
    let data = r#"{"lead": {"id": "l-9", "status": "qualified"}, "n": [1, 2.5, null], "s": "é\"\\"}"#;
    let body = format!(
        r#"{{"event_type":"workflow_run.status_changed","client_id":"{CLIENT_A}","data":{data},"event_id":"550e8400-e29b-41d4-a716-446655440000","timestamp":"2026-04-17T18:30:00.5+02:00"}}"#
    );
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (status, answer) = d.post("/v1/events", &body);
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["event_id"], "550e8400-e29b-41d4-a716-446655440000");
    wait_for("the delivery", SETTLE, || rx.hits().len() == 1);
    let hit = &rx.hits()[0];

    let env = hit.json();
    let keys: HashSet<_> = env.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        HashSet::from([
            "event_type",
            "event_id",
            "webhook_id",
            "delivery_id",
            "timestamp",
            "client_id",
            "test",
            "data"
        ])
    );
    assert_eq!(env["event_type"], "workflow_run.status_changed");
    assert_eq!(env["event_id"], "550e8400-e29b-41d4-a716-446655440000");
    assert_eq!(env["webhook_id"], W1);
    assert_eq!(env["client_id"], CLIENT_A);
    assert_eq!(env["timestamp"], "2026-04-17T16:30:00.500Z");
    assert_eq!(env["test"], false);
    // `data` arrives as the bytes the application sent.
    assert!(String::from_utf8_lossy(&hit.body).contains(&format!("\"data\":{data}")));

    assert_eq!(hit.header("content-type"), "application/json");
    assert_eq!(hit.header("x-nexor-event"), "workflow_run.status_changed");
    assert_eq!(hit.header("x-nexor-delivery-id"), env["delivery_id"].as_str().unwrap());
    assert_eq!(hit.header("x-nexor-webhook-id"), W1);
    assert_eq!(hit.header("user-agent"), format!("nexor-webhookd/{}", env!("CARGO_PKG_VERSION")));
    let ts: u64 = hit.header("x-nexor-timestamp").parse().unwrap();
    assert!(ts >= before && ts <= before + 60, "timestamp {ts} is the send time");

    let mut message = format!("{ts}.").into_bytes();
    message.extend_from_slice(&hit.body);
    let expected = format!("v1={}", hmac_hex(&format!("whsec_{W1}"), &message));
    assert_eq!(hit.header("x-nexor-signature"), expected);
}

#[test]
fn retries_follow_the_schedule_then_fail_with_distinct_delivery_ids() {
    let rx = Receiver::start();
    let d = Daemon::start("", &format!("{FAST}{}", webhook(W1, CLIENT_A, &rx.url("/fail/r"), r#"["*"]"#)));
    let (_, body) = d.send("meeting.cancelled", CLIENT_A, "{}");
    let id = body["event_id"].as_str().unwrap();
    let ev = d.wait_settled(id, &["failed"], SETTLE);
    let hits = rx.hits_on("/fail/r");
    assert_eq!(hits.len(), 4, "1 attempt + 3 retries");
    for (i, want) in [100u128, 200, 400].into_iter().enumerate() {
        let gap = hits[i + 1].at.duration_since(hits[i].at).as_millis();
        assert!(gap >= want, "gap {i} was {gap} ms, schedule says {want} ms");
        assert!(gap < want + 1000, "gap {i} was {gap} ms, far past the {want} ms schedule");
    }
    let delivery_ids: HashSet<_> =
        hits.iter().map(|h| h.json()["delivery_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(delivery_ids.len(), 4);
    assert!(hits.iter().all(|h| h.json()["event_id"] == id));

    let dl = &ev["deliveries"][0];
    assert_eq!(dl["status"], "failed");
    assert_eq!(dl["next_attempt_at"], Value::Null);
    let attempts = dl["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 4);
    for a in attempts {
        assert_eq!(a["status_code"], 500);
        assert_eq!(a["error"], "HTTP 500");
        assert_eq!(a["response_body"], "answer 500 Internal Server Error");
        assert!(delivery_ids.contains(a["delivery_id"].as_str().unwrap()));
        assert!(a["started_at"].as_str().unwrap().ends_with('Z'));
    }
}

#[test]
fn succeeds_after_transient_failures_and_shows_retrying_meanwhile() {
    let rx = Receiver::start();
    let slow = "[delivery]\nretry_schedule = [\"100ms\", \"2s\"]\nallow_private_targets = true\n\n";
    let d = Daemon::start("", &format!("{slow}{}", webhook(W1, CLIENT_A, &rx.url("/flaky/2/t"), r#"["*"]"#)));
    let (_, body) = d.send("meeting.confirmed", CLIENT_A, "{}");
    let id = body["event_id"].as_str().unwrap();
    // After two failures the delivery waits 2 s: visible as retrying, with a due time.
    let ev = d.wait_settled(id, &["retrying"], SETTLE);
    wait_for("second attempt", SETTLE, || {
        d.event(id)["deliveries"][0]["attempts"].as_array().unwrap().len() == 2
    });
    let ev2 = d.event(id);
    let dl = &ev2["deliveries"][0];
    assert_eq!(dl["status"], "retrying", "{ev}");
    assert!(dl["next_attempt_at"].as_str().unwrap().ends_with('Z'));
    let ev = d.wait_settled(id, &["succeeded"], SETTLE);
    let attempts = ev["deliveries"][0]["attempts"].as_array().unwrap();
    let codes: Vec<_> = attempts.iter().map(|a| a["status_code"].as_u64().unwrap()).collect();
    assert_eq!(codes, vec![503, 503, 200]);
    assert!(attempts[2].get("error").is_none());
    assert_eq!(rx.hits_on("/flaky/2/t").len(), 3);
}

#[test]
fn failures_get_reasons_a_person_understands() {
    let rx = Receiver::start();
    let closed = format!("http://127.0.0.1:{}/gone", free_port());
    let cfg = format!(
        "[delivery]\ntimeout = \"300ms\"\nretry_schedule = []\nallow_private_targets = true\n\n{}{}{}",
        webhook(W1, CLIENT_A, &closed, r#"["*"]"#),
        webhook(W2, CLIENT_A, &rx.url("/hang/x"), r#"["*"]"#),
        webhook(W3, CLIENT_A, &rx.url("/redirect/x"), r#"["*"]"#),
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let ev = d.wait_settled(body["event_id"].as_str().unwrap(), &["failed"], SETTLE);
    let reason = |w: &str| -> Value {
        let dl = ev["deliveries"].as_array().unwrap().iter().find(|d| d["webhook_id"] == w).unwrap();
        dl["attempts"][0].clone()
    };
    assert_eq!(reason(W1)["error"], "connection refused");
    assert!(reason(W1).get("status_code").is_none());
    assert_eq!(reason(W2)["error"], "timed out after 300ms");
    assert_eq!(reason(W3)["status_code"], 302);
    assert_eq!(reason(W3)["error"], "HTTP 302");
    assert!(rx.hits_on("/ok/redirected").is_empty(), "redirects are never followed");
}

#[test]
fn private_targets_are_blocked_by_default_even_through_a_hostname() {
    let rx = Receiver::start();
    let url = rx.url("/ok/blocked").replace("127.0.0.1", "localhost");
    let cfg = format!("[delivery]\nretry_schedule = []\n\n{}", webhook(W1, CLIENT_A, &url, r#"["*"]"#));
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let ev = d.wait_settled(body["event_id"].as_str().unwrap(), &["failed"], SETTLE);
    let error = ev["deliveries"][0]["attempts"][0]["error"].as_str().unwrap().to_owned();
    assert!(
        error == "blocked: 127.0.0.1 is a loopback address" || error == "blocked: ::1 is a loopback address",
        "{error}"
    );
    assert!(rx.hits().is_empty());
}

#[test]
fn test_endpoint_sends_a_test_delivery_to_that_webhook_only() {
    let rx = Receiver::start();
    let cfg = format!(
        "{FAST}{}{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/t1"), r#"["meeting.scheduled"]"#),
        webhook(W2, CLIENT_A, &rx.url("/ok/t2"), r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    let (status, body) =
        d.post(&format!("/v1/webhooks/{W1}/test"), r#"{"event_type":"meeting.no_show","data":{"x":1}}"#);
    assert_eq!(status, 202, "{body}");
    let id = body["event_id"].as_str().unwrap();
    let ev = d.wait_settled(id, &["succeeded"], SETTLE);
    assert_eq!(ev["test"], true);
    let hits = rx.hits();
    assert_eq!(hits.len(), 1);
    let env = hits[0].json();
    assert_eq!(
        (env["test"].clone(), env["event_type"].clone(), env["data"]["x"].clone()),
        (true.into(), "meeting.no_show".into(), 1.into())
    );
    assert_eq!(hits[0].path, "/ok/t1");

    // No body at all is fine too; an unknown webhook is a 404.
    assert_eq!(d.post(&format!("/v1/webhooks/{W2}/test"), "").0, 202);
    let (status, body) = d.post(&format!("/v1/webhooks/{W3}/test"), "");
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
}

#[test]
fn standard_webhooks_headers_verify_and_keep_their_id_across_retries() {
    use base64::Engine;
    let rx = Receiver::start();
    let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let hook = webhook(W1, CLIENT_A, &rx.url("/flaky/1/std"), r#"["*"]"#)
        .replace(&format!("whsec_{W1}"), secret)
        .replace("events =", "standard_webhooks = true\nevents =");
    let d = Daemon::start("", &format!("{FAST}{hook}"));
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, r#"{"k":"v"}"#);
    let id = body["event_id"].as_str().unwrap();
    d.wait_settled(id, &["succeeded"], SETTLE);
    let hits = rx.hits_on("/flaky/1/std");
    assert_eq!(hits.len(), 2);
    let key = base64::engine::general_purpose::STANDARD.decode(&secret["whsec_".len()..]).unwrap();
    for hit in &hits {
        assert_eq!(hit.header("webhook-id"), id, "webhook-id is the event_id on every attempt");
        let ts = hit.header("webhook-timestamp");
        assert_eq!(ts, hit.header("x-nexor-timestamp"));
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(&hit.body);
        let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(hit.header("webhook-signature"), format!("v1,{expected}"));
        // The Nexor signature is still there, keyed by the secret as text.
        let mut message = format!("{ts}.").into_bytes();
        message.extend_from_slice(&hit.body);
        assert_eq!(hit.header("x-nexor-signature"), format!("v1={}", hmac_hex(secret, &message)));
    }

    // `verify --msg-id` checks the Standard Webhooks headers of a real delivery.
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    std::fs::write(&body, &hits[0].body).unwrap();
    let verify = |msg_id: &str| {
        let out = std::process::Command::new(bin())
            .args(["verify", "--secret", secret, "--msg-id", msg_id, "--timestamp"])
            .arg(hits[0].header("webhook-timestamp"))
            .arg("--signature")
            .arg(hits[0].header("webhook-signature"))
            .arg("--body")
            .arg(&body)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    assert_eq!(verify(id), (Some(0), "valid".into()));
    assert_eq!(verify("another-id"), (Some(1), "invalid: no signature matches the secret".into()));
}
