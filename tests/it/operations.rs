//! Running it: live reload, graceful stop, metrics, the delivery log,
//! redelivery and recovery, retention, and the CLI client.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const W2: &str = "22222222-2222-4222-8222-222222222222";
const W3: &str = "33333333-3333-4333-8333-333333333333";
const SETTLE: Duration = Duration::from_secs(15);

fn delivery_to<'a>(event: &'a Value, webhook: &str) -> &'a Value {
    event["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["webhook_id"] == webhook)
        .expect("delivery to webhook")
}

fn delivery_ids(event: &Value, webhook: &str) -> Vec<String> {
    delivery_to(event, webhook)["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["delivery_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn sighup_applies_webhook_changes_live_and_survives_a_bad_file() {
    let rx = Receiver::start();
    let delivery = "[delivery]\nretry_schedule = [\"100ms\", \"1h\"]\nallow_private_targets = true\n\n";
    let before = format!(
        "{delivery}{}{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/before"), r#"["*"]"#),
        webhook(W2, CLIENT_A, &rx.url("/fail/w2"), r#"["*"]"#)
    );
    let d = Daemon::start("", &before);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let first = body["event_id"].as_str().unwrap().to_owned();
    // W2 fails twice, then waits an hour for its last retry.
    wait_for("W2 to wait for its retry", SETTLE, || {
        let ev = d.event(&first);
        delivery_to(&ev, W2)["attempts"].as_array().unwrap().len() == 2
    });

    // W1 moves, W2 goes, W3 arrives.
    let after = format!(
        "{delivery}{}{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/after"), r#"["*"]"#),
        webhook(W3, CLIENT_A, &rx.url("/ok/w3"), r#"["meeting.scheduled"]"#)
    );
    d.write_config(&after);
    d.signal(Signal::HUP);
    d.wait_log("config reloaded", 1);
    let ev = d.event(&first);
    assert_eq!(delivery_to(&ev, W2)["status"], "held", "{ev}");
    assert_eq!(delivery_to(&ev, W2)["next_attempt_at"], Value::Null);

    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let second = body["event_id"].as_str().unwrap().to_owned();
    assert_eq!(body["deliveries"], 2);
    d.wait_settled(&second, &["succeeded"], SETTLE);
    assert_eq!(rx.hits_on("/ok/after").len(), 1);
    assert_eq!(rx.hits_on("/ok/w3").len(), 1);

    // A broken file is refused; the running config keeps working.
    d.write_config("[delivery]\nretry_schedule = [\"soon\"]\n");
    d.signal(Signal::HUP);
    d.wait_log("reload refused", 1);
    assert!(d.log().contains("retry_schedule: \"soon\" is not a duration"));
    let (status, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    assert_eq!((status, body["deliveries"].as_u64()), (202, Some(2)));
    d.wait_settled(body["event_id"].as_str().unwrap(), &["succeeded"], SETTLE);

    // A changed listen address is reported as needing a restart.
    d.write_config(&after.replace("[delivery]", "[delivery]\ntimeout = \"3s\""));
    std::fs::write(
        d.config_path(),
        std::fs::read_to_string(d.config_path())
            .unwrap()
            .replace("listen = \"127.0.0.1:", "listen = \"127.0.0.2:"),
    )
    .unwrap();
    d.signal(Signal::HUP);
    d.wait_log("config reloaded", 2);
    assert!(d.log().contains("take effect only after a restart"));
    assert_eq!(d.get("/healthz").0, 200, "still serving on the old address");

    // W2 back, mended: its held delivery is due again, and goes out.
    let back = format!("{after}{}", webhook(W2, CLIENT_A, &rx.url("/ok/w2-back"), r#"["*"]"#));
    d.write_config(&back);
    d.signal(Signal::HUP);
    d.wait_log("config reloaded", 3);
    // Its listen is the one the daemon runs on again: nothing waits for a
    // restart (compared with what runs, not with the last file).
    assert_eq!(d.log().matches("take effect only after a restart").count(), 1, "{}", d.log());
    let ev = d.wait_settled(&first, &["succeeded"], SETTLE);
    assert_eq!(delivery_to(&ev, W2)["attempts"].as_array().unwrap().len(), 3, "{ev}");
    assert_eq!(rx.hits_on("/ok/w2-back").len(), 1);
}

/// A config caught half-written (an editor truncating then writing, a tool
/// mid-copy) must never destroy deliveries: an empty file and one without
/// webhooks are refused; one that drops a webhook holds its deliveries
/// until the whole file is back.
#[test]
fn a_config_caught_half_written_destroys_nothing() {
    let rx = Receiver::start();
    let delivery = "[delivery]\nretry_schedule = [\"1h\"]\nallow_private_targets = true\n\n";
    let good = format!(
        "{delivery}{}{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/w1"), r#"["*"]"#),
        webhook(W2, CLIENT_A, &rx.url("/fail/w2"), r#"["*"]"#)
    );
    let d = Daemon::start("", &good);
    let waiting: Vec<String> = (0..20)
        .map(|_| d.send("meeting.scheduled", CLIENT_A, "{}").1["event_id"].as_str().unwrap().to_owned())
        .collect();
    for id in &waiting {
        d.wait_settled(id, &["succeeded", "retrying"], SETTLE);
    }
    let refused = |n: usize| {
        d.wait_log("reload refused", n);
        let (_, m) = d.request("GET", "/metrics", None, None);
        let text = m.as_str().unwrap_or_default().to_owned();
        assert!(text.contains(&format!("nexor_webhookd_config_reloads_refused_total {n}")), "{text}");
    };
    // Empty.
    std::fs::write(d.config_path(), "").unwrap();
    d.signal(Signal::HUP);
    refused(1);
    assert!(d.log().contains("is empty"));
    // Only its first section: valid, but without a single webhook.
    d.write_config(delivery);
    d.signal(Signal::HUP);
    refused(2);
    assert!(d.log().contains("would remove all 2"));
    let (status, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    assert_eq!((status, body["deliveries"].as_u64()), (202, Some(2)), "the running config stays");
    let mut waiting = waiting;
    waiting.push(body["event_id"].as_str().unwrap().to_owned());
    d.wait_settled(waiting.last().unwrap(), &["succeeded", "retrying"], SETTLE);

    // Cut inside the second webhook's table: W2 gone for now, held.
    let cut = &good[..good.rfind("[[webhooks]]").unwrap()];
    d.write_config(cut);
    d.signal(Signal::HUP);
    d.wait_log("config reloaded", 1);
    for id in &waiting {
        assert_eq!(delivery_to(&d.event(id), W2)["status"], "held");
    }
    // The whole file back (W2 mended meanwhile): everything is delivered.
    d.write_config(&good.replace("/fail/w2", "/ok/w2"));
    d.signal(Signal::HUP);
    d.wait_log("config reloaded", 2);
    for id in &waiting {
        d.wait_settled(id, &["succeeded"], SETTLE);
    }
    assert_eq!(rx.hits_on("/ok/w2").len(), waiting.len());
}

/// Held deliveries of a webhook the operator removed for good are cancelled
/// by the operator, not by a reload.
#[test]
fn held_deliveries_are_cancelled_on_request_only() {
    let rx = Receiver::start();
    let delivery = "[delivery]\nretry_schedule = [\"1h\"]\nallow_private_targets = true\n\n";
    let d = Daemon::start(
        "",
        &format!(
            "{delivery}{}{}",
            webhook(W1, CLIENT_A, &rx.url("/ok/w1"), r#"["*"]"#),
            webhook(W2, CLIENT_A, &rx.url("/fail/w2"), r#"["*"]"#)
        ),
    );
    let id = d.send("meeting.scheduled", CLIENT_A, "{}").1["event_id"].as_str().unwrap().to_owned();
    d.wait_settled(&id, &["succeeded", "retrying"], SETTLE);
    d.write_config(&format!("{delivery}{}", webhook(W1, CLIENT_A, &rx.url("/ok/w1"), r#"["*"]"#)));
    d.signal(Signal::HUP);
    d.wait_log("config reloaded", 1);
    assert_eq!(delivery_to(&d.event(&id), W2)["status"], "held");
    let out = std::process::Command::new(bin())
        .args(["cancel", "--webhook-id", W2, "--config"])
        .arg(d.config_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""cancelled":1"#));
    assert_eq!(delivery_to(&d.event(&id), W2)["status"], "cancelled");
    // Nothing else was touched: W1's delivery is as it was.
    assert_eq!(delivery_to(&d.event(&id), W1)["status"], "succeeded");
}

/// Deliveries never attempted live in the dispatcher's memory, not in the
/// stored due index: a reload that removes their webhook holds them too,
/// and they go out once it is back.
#[test]
fn a_reload_holds_deliveries_never_attempted_too() {
    let rx = Receiver::start();
    let delivery = "[delivery]\nper_webhook_in_flight = 1\nallow_private_targets = true\n\n";
    let d =
        Daemon::start("", &format!("{delivery}{}", webhook(W1, CLIENT_A, &rx.url("/gate/w1"), r#"["*"]"#)));
    // The first is held at the receiver's gate; the other two wait their turn.
    let ids: Vec<String> = (0..3)
        .map(|_| d.send("meeting.scheduled", CLIENT_A, "{}").1["event_id"].as_str().unwrap().to_owned())
        .collect();
    d.write_config(&format!("{delivery}{}", webhook(W2, CLIENT_A, &rx.url("/ok/w2"), r#"["*"]"#)));
    d.signal(Signal::HUP);
    d.wait_log("config reloaded", 1);
    let statuses: Vec<Value> = ids.iter().map(|id| delivery_to(&d.event(id), W1)["status"].clone()).collect();
    let held = statuses.iter().filter(|s| *s == "held").count();
    assert!(held >= 2, "the two waiting deliveries are held at reload: {statuses:?}");
    rx.set_gate(true);
    // The one in flight ends at its attempt: the webhook is gone by then or the receiver answers.
    for id in &ids {
        d.wait_settled(id, &["held", "succeeded"], SETTLE);
    }
    assert!(rx.hits_on("/gate/w1").len() <= 1, "nothing held was sent");
    // W1 back: every one of them is delivered.
    d.write_config(&format!("{delivery}{}", webhook(W1, CLIENT_A, &rx.url("/gate/w1"), r#"["*"]"#)));
    d.signal(Signal::HUP);
    d.wait_log("config reloaded", 2);
    for id in &ids {
        d.wait_settled(id, &["succeeded"], SETTLE);
    }
}

#[test]
fn sigterm_during_deliveries_loses_nothing() {
    let rx = Receiver::start();
    let cfg = format!(
        "[server]\n\n[delivery]\nretry_schedule = [\"100ms\"]\nallow_private_targets = true\nworkers = 4\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/slow/term"), r#"["*"]"#)
    )
    .replace("[server]\n\n", "");
    let mut d = Daemon::start("shutdown_grace = \"5s\"", &cfg);
    let ids: Vec<String> = (0..20)
        .map(|_| d.send("meeting.scheduled", CLIENT_A, "{}").1["event_id"].as_str().unwrap().to_owned())
        .collect();
    wait_for("attempts in flight", SETTLE, || !rx.hits_on("/slow/term").is_empty());
    assert_eq!(d.terminate(), Some(0), "clean exit:\n{}", d.log());
    assert!(d.log().contains("stopped"));
    d.start_again();
    for id in &ids {
        d.wait_settled(id, &["succeeded"], SETTLE);
    }
    let arrived: HashSet<String> =
        rx.hits_on("/slow/term").iter().map(|h| h.json()["event_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(arrived.len(), ids.len());
}

#[test]
fn metrics_are_prometheus_text_and_counters_move() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\n\n{}{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/m"), r#"["*"]"#),
        webhook(W2, CLIENT_A, &rx.url("/fail/m"), r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.completed", CLIENT_A, "{}");
    d.wait_settled(body["event_id"].as_str().unwrap(), &["succeeded", "failed"], SETTLE);
    let text = ureq::get(format!("{}/metrics", d.base)).call().unwrap().body_mut().read_to_string().unwrap();
    let mut samples = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample line: {line}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in: {line}"));
        samples.insert(name.to_owned(), v);
    }
    assert!(text.ends_with("# EOF\n"));
    let get = |k: &str| samples.get(k).copied().unwrap_or_else(|| panic!("no sample {k} in\n{text}"));
    assert_eq!(get(r#"nexor_webhookd_events_accepted_total{event_type="meeting.completed"}"#), 1.0);
    assert_eq!(get(r#"nexor_webhookd_attempts_total{outcome="2xx"}"#), 1.0);
    assert_eq!(get(r#"nexor_webhookd_attempts_total{outcome="5xx"}"#), 1.0);
    assert_eq!(get("nexor_webhookd_attempt_duration_seconds_count"), 2.0);
    assert_eq!(get(&format!(r#"nexor_webhookd_webhook_consecutive_failures{{webhook_id="{W2}"}}"#)), 1.0);
    assert_eq!(get(&format!(r#"nexor_webhookd_webhook_consecutive_failures{{webhook_id="{W1}"}}"#)), 0.0);
    assert!(
        get(&format!(r#"nexor_webhookd_webhook_last_success_timestamp_seconds{{webhook_id="{W1}"}}"#))
            > 1.7e9
    );
    assert_eq!(get("nexor_webhookd_deliveries_due"), 0.0);
    assert!(get("nexor_webhookd_storage_bytes") > 0.0);
}

#[test]
fn webhook_health_and_the_delivery_log_paginate_newest_first() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/flaky/2/log"), r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
        let id = body["event_id"].as_str().unwrap().to_owned();
        d.wait_settled(&id, &["succeeded", "failed"], SETTLE);
        ids.push(id);
    }
    let (status, w) = d.get(&format!("/v1/webhooks/{W1}"));
    assert_eq!(status, 200);
    assert_eq!(w["secret"], "<redacted>");
    assert!(!w.to_string().contains(&format!("whsec_{W1}")));
    assert_eq!(w["health"]["deliveries"]["failed"], 2);
    assert_eq!(w["health"]["deliveries"]["succeeded"], 3);
    assert_eq!(w["health"]["consecutive_failures"], 0);
    assert_eq!(w["health"]["last_failure"], "HTTP 503");
    let (_, all) = d.get("/v1/webhooks");
    assert_eq!(all["webhooks"].as_array().unwrap().len(), 1);

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
        let (status, page) = d.get(&format!("/v1/webhooks/{W1}/deliveries?limit=2{q}"));
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["deliveries"].as_array().unwrap().iter().map(|x| x["event_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
    let (_, failed) = d.get(&format!("/v1/webhooks/{W1}/deliveries?status=failed"));
    let failed: Vec<_> =
        failed["deliveries"].as_array().unwrap().iter().map(|x| x["event_id"].clone()).collect();
    assert_eq!(failed, vec![Value::from(ids[1].clone()), Value::from(ids[0].clone())]);
    let (status, bad) = d.get(&format!("/v1/webhooks/{W1}/deliveries?status=lost"));
    assert_eq!((status, bad["error"]["code"].as_str()), (422, Some("invalid_field")));
    assert_eq!(d.get(&format!("/v1/webhooks/{W1}/deliveries?limit=0")).0, 422);
}

/// W1 for client A, whose first delivery fails (no retries), and W2 for
/// client B; both take every event.
fn two_clients(rx: &Receiver) -> Daemon {
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\n\n{}{}",
        webhook(W1, CLIENT_A, &rx.url("/flaky/1/a"), r#"["*"]"#),
        webhook(W2, CLIENT_B, &rx.url("/ok/b"), r#"["*"]"#),
    );
    Daemon::start("", &cfg)
}

#[test]
fn events_are_listed_newest_first_with_filters_and_cursors() {
    let rx = Receiver::start();
    let d = two_clients(&rx);
    // A's first event fails (its only try), the rest succeed.
    let sends = [
        ("meeting.scheduled", CLIENT_A),
        ("meeting.cancelled", CLIENT_B),
        ("meeting.scheduled", CLIENT_A),
        ("meeting.cancelled", CLIENT_A),
    ];
    let mut ids = Vec::new();
    for (t, client) in sends {
        let (_, body) = d.send(t, client, "{}");
        let id = body["event_id"].as_str().unwrap().to_owned();
        d.wait_settled(&id, &["succeeded", "failed"], SETTLE);
        ids.push(id);
    }
    let listed = |q: &str| -> (Vec<String>, Value) {
        let (status, page) = d.get(&format!("/v1/events?{q}"));
        assert_eq!(status, 200, "{q}: {page}");
        let ids =
            page["events"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned());
        (ids.collect(), page)
    };
    let (first, page) = listed("limit=3");
    assert_eq!(first, [&*ids[3], &ids[2], &ids[1]]);
    let row = &page["events"][0];
    assert_eq!(
        (row["event_type"].as_str(), row["client_id"].as_str()),
        (Some("meeting.cancelled"), Some(CLIENT_A))
    );
    assert_eq!(
        (row["deliveries"][0]["webhook_id"].as_str(), row["deliveries"][0]["status"].as_str()),
        (Some(W1), Some("succeeded"))
    );
    let (rest, page) = listed(&format!("limit=3&cursor={}", page["next_cursor"].as_str().unwrap()));
    assert_eq!((rest, &page["next_cursor"]), (vec![ids[0].clone()], &Value::Null));
    assert_eq!(listed(&format!("client_id={CLIENT_B}")).0, [&*ids[1]]);
    assert_eq!(listed("event_type=meeting.scheduled").0, [&*ids[2], &ids[0]]);
    assert_eq!(listed("status=failed").0, [&*ids[0]]);
    assert_eq!(listed(&format!("event_id={}", ids[2])).0, [&*ids[2]]);
    assert!(listed(&format!("event_id={}&client_id={CLIENT_B}", ids[2])).0.is_empty());
    assert!(listed("event_id=99999999-9999-4999-8999-999999999999").0.is_empty());
    // Bad input is named, and changes nothing.
    for (q, field) in [
        ("status=lost", "status"),
        ("event_type=meeting.lost", "event_type"),
        ("client_id=acme", "client_id"),
        ("event_id=x", "event_id"),
        ("cursor=abc", "cursor"),
        ("limit=0", "limit"),
    ] {
        let (status, body) = d.get(&format!("/v1/events?{q}"));
        assert_eq!(status, 422, "{q}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().starts_with(&format!("{field}: ")), "{q}: {body}");
    }
}

#[test]
fn the_overview_counts_the_last_hour_and_shows_what_is_due_and_paused() {
    let rx = Receiver::start();
    let d = two_clients(&rx);
    let (status, empty) = d.get("/v1/overview");
    assert_eq!(status, 200, "{empty}");
    assert_eq!(empty["last_hour"]["success_rate"], Value::Null);
    for client in [CLIENT_A, CLIENT_A, CLIENT_B] {
        let (_, body) = d.send("meeting.scheduled", client, "{}");
        d.wait_settled(body["event_id"].as_str().unwrap(), &["succeeded", "failed"], SETTLE);
    }
    let (status, _) = d.post(&format!("/v1/webhooks/{W2}/pause"), "");
    assert_eq!(status, 200);
    // A's first delivery failed for good; the other two were delivered.
    let (_, o) = d.get("/v1/overview");
    let hour = &o["last_hour"];
    assert_eq!(
        (hour["accepted"].as_u64(), hour["delivered"].as_u64(), hour["failed"].as_u64()),
        (Some(3), Some(2), Some(1)),
        "{o}"
    );
    assert!((hour["success_rate"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9, "{o}");
    let minutes = o["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    let accepted: u64 = minutes.iter().map(|m| m["accepted"].as_u64().unwrap()).sum();
    assert_eq!(accepted, 3, "the minutes add up to the hour");
    assert!(minutes[59]["start"].as_str().unwrap() > minutes[0]["start"].as_str().unwrap());
    assert_eq!(
        (o["deliveries_due"].as_u64(), o["webhooks"].as_u64(), o["paused_webhooks"].as_u64()),
        (Some(0), Some(2), Some(1)),
        "{o}"
    );
}

#[test]
fn redeliver_and_recover_resend_with_fresh_delivery_ids() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\n\n{}{}",
        webhook(W1, CLIENT_A, &rx.url("/flaky/1/one"), r#"["meeting.scheduled"]"#),
        webhook(W2, CLIENT_A, &rx.url("/flaky/3/many"), r#"["meeting.cancelled"]"#)
    );
    let d = Daemon::start("", &cfg);

    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let id = body["event_id"].as_str().unwrap().to_owned();
    d.wait_settled(&id, &["failed"], SETTLE);
    let (status, answer) = d.post(&format!("/v1/events/{id}/redeliver"), "");
    assert_eq!((status, answer["requeued"].as_u64()), (200, Some(1)), "{answer}");
    let ev = d.wait_settled(&id, &["succeeded"], SETTLE);
    let ids = delivery_ids(&ev, W1);
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    let hits = rx.hits_on("/flaky/1/one");
    assert!(hits.iter().all(|h| h.json()["event_id"] == id.as_str()));
    // Nothing left to redeliver.
    assert_eq!(d.post(&format!("/v1/events/{id}/redeliver"), "").1["requeued"], 0);

    let since = "2020-01-01T00:00:00Z";
    let events: Vec<String> = (0..3)
        .map(|_| {
            let (_, body) = d.send("meeting.cancelled", CLIENT_A, "{}");
            let id = body["event_id"].as_str().unwrap().to_owned();
            d.wait_settled(&id, &["failed"], SETTLE);
            id
        })
        .collect();
    let (status, answer) = d.post(&format!("/v1/webhooks/{W2}/recover?since={since}"), "");
    assert_eq!((status, answer["requeued"].as_u64()), (200, Some(3)), "{answer}");
    for id in &events {
        let ev = d.wait_settled(id, &["succeeded"], SETTLE);
        assert_eq!(delivery_ids(&ev, W2).iter().collect::<HashSet<_>>().len(), 2);
    }
    let (status, answer) = d.post(&format!("/v1/webhooks/{W2}/recover"), "");
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("invalid_field")));
}

#[test]
fn retention_prunes_final_deliveries_and_their_events() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = [\"1h\"]\nallow_private_targets = true\n\n{}{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/ret"), r#"["meeting.scheduled"]"#),
        webhook(W2, CLIENT_A, &rx.url("/fail/ret"), r#"["meeting.cancelled"]"#)
    );
    let d = Daemon::start("", &cfg);
    // Retention is in [storage]: set it by rewriting the file before a restart.
    let (_, done) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let (_, waiting) = d.send("meeting.cancelled", CLIENT_A, "{}");
    let done = done["event_id"].as_str().unwrap().to_owned();
    let waiting = waiting["event_id"].as_str().unwrap().to_owned();
    d.wait_settled(&done, &["succeeded"], SETTLE);
    d.wait_settled(&waiting, &["retrying"], SETTLE);
    let text = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(d.config_path(), text.replace("[storage]\n", "[storage]\nretention = \"1s\"\n")).unwrap();
    d.signal(Signal::HUP);
    wait_for("the finished event to be pruned", SETTLE, || d.get(&format!("/v1/events/{done}")).0 == 404);
    assert_eq!(d.get(&format!("/v1/events/{waiting}")).0, 200, "a delivery still retrying is kept");
    let (_, w) = d.get(&format!("/v1/webhooks/{W1}"));
    assert_eq!(w["health"]["deliveries"]["succeeded"], 0);
}

#[test]
fn cli_sends_shows_status_and_redelivers() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/flaky/1/cli"), r#"["*"]"#)
    );
    let d = Daemon::start("api_token = \"cli-token\"", &cfg);
    let cli = |args: &[&str]| {
        let out = Command::new(bin()).args(args).arg("--config").arg(d.config_path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let data = d.dir.path().join("data.json");
    // Sent as written: key order, spacing, escapes and number forms.
    let raw = r#"{"z": 1.50, "meeting_id": "m-\u0037"}"#;
    std::fs::write(&data, format!("{raw}\n")).unwrap();
    let sent = cli(&[
        "send",
        "meeting.scheduled",
        "--client-id",
        CLIENT_A,
        "--data",
        &format!("@{}", data.display()),
    ]);
    let sent: Value = serde_json::from_str(sent.trim()).unwrap();
    let id = sent["event_id"].as_str().unwrap().to_owned();
    let get_event = || d.request("GET", &format!("/v1/events/{id}"), Some("cli-token"), None).1;
    wait_for("the attempt to fail", SETTLE, || get_event()["deliveries"][0]["status"] == "failed");
    let status = cli(&["status"]);
    assert!(status.contains(W1) && status.contains("failing (1)"), "{status}");
    cli(&["redeliver", &id]);
    wait_for("the redelivery to succeed", SETTLE, || get_event()["deliveries"][0]["status"] == "succeeded");
    let hit = &rx.hits_on("/flaky/1/cli")[1];
    assert_eq!(hit.json()["data"]["meeting_id"], "m-7");
    assert!(String::from_utf8_lossy(&hit.body).contains(&format!(r#""data":{raw}"#)), "{:?}", hit.body);
    let status = cli(&["status"]);
    assert!(status.contains(" ok "), "{status}");
}

#[test]
fn a_reload_cannot_open_an_api_bound_off_loopback() {
    let rx = Receiver::start();
    let hooks = format!(
        "[delivery]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/ok"), r#"["*"]"#)
    );
    let mut d = Daemon::configured(None, "api_token = \"t0ken-off-loopback\"", &hooks);
    let edit = |d: &Daemon, from: &str, to: &str| {
        let text = std::fs::read_to_string(d.config_path()).unwrap();
        assert!(text.contains(from), "{text}");
        std::fs::write(d.config_path(), text.replace(from, to)).unwrap();
    };
    edit(&d, "listen = \"127.0.0.1:", "listen = \"0.0.0.0:");
    d.start_again();
    let event =
        br#"{"event_type":"meeting.scheduled","client_id":"6f1c1a3e-2b6e-4c1e-9d55-0c8a3f7e9b10","data":{}}"#;
    let shut = |d: &Daemon| {
        assert_eq!(d.get("/v1/webhooks").0, 401);
        assert_eq!(d.request("POST", "/v1/events", None, Some(event)).0, 401);
    };
    shut(&d);

    // The token gone, listen back on loopback in the file: the socket is
    // still on every address, so the file is refused. So is an empty one.
    d.write_config(&hooks.replace("[delivery]", "[delivery]\ntimeout = \"3s\""));
    edit(&d, "api_token = \"t0ken-off-loopback\"", "");
    d.signal(Signal::HUP);
    d.wait_log("reload refused", 1);
    assert!(d.log().contains("the API would be open"), "{}", d.log());
    shut(&d);
    std::fs::write(d.config_path(), "").unwrap();
    d.signal(Signal::HUP);
    d.wait_log("reload refused", 2);
    shut(&d);

    // A new token is taken, and only it opens the API.
    d.write_config(&hooks);
    edit(&d, "[server]\n", "[server]\napi_token = \"t0ken-rotated\"\n");
    edit(&d, "api_token = \"t0ken-off-loopback\"", "");
    d.signal(Signal::HUP);
    d.wait_log("config reloaded", 1);
    shut(&d);
    assert_eq!(d.request("GET", "/v1/webhooks", Some("t0ken-off-loopback"), None).0, 401);
    assert_eq!(d.request("GET", "/v1/webhooks", Some("t0ken-rotated"), None).0, 200);
}

/// `/metrics` says it is OpenMetrics, and a strict OpenMetrics parser (the
/// Python client's, from Debian's python3-prometheus-client) takes it.
#[test]
fn metrics_are_openmetrics_by_type_and_by_a_strict_parser() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = [\"1h\"]\nallow_private_targets = true\n\n{}{}",
        webhook(W1, CLIENT_A, &rx.url("/ok"), r#"["*"]"#),
        webhook(W2, CLIENT_A, &rx.url("/code/500/w2"), r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    d.wait_settled(body["event_id"].as_str().unwrap(), &["succeeded", "retrying"], SETTLE);
    let mut resp = agent(SETTLE).get(format!("{}/metrics", d.base)).call().unwrap();
    let kind = resp.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
    assert_eq!(kind, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    let text = resp.body_mut().read_to_string().unwrap();
    let script =
        "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
                  n = sum(1 for _ in p(sys.stdin.read()))\nprint(n)\n";
    let mut python = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (CI installs python3-prometheus-client)");
    use std::io::Write;
    python.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = python.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused it: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.parse::<u32>().unwrap() >= 10, "{said} families:\n{text}");
}

#[test]
fn a_webhook_enabled_while_the_daemon_was_stopped_gets_its_held_deliveries_at_start() {
    let rx = Receiver::start();
    let hook = |path: &str, enabled: bool| {
        format!(
            "[delivery]\nretry_schedule = [\"1h\"]\nallow_private_targets = true\n\n{}\nenabled = {enabled}\n\n{}",
            webhook(W1, CLIENT_A, &rx.url(path), r#"["*"]"#).trim_end(),
            webhook(W2, CLIENT_A, &rx.url("/ok/w2"), r#"["*"]"#)
        )
    };
    let mut d = Daemon::start("", &hook("/fail/w1", true));
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let event = body["event_id"].as_str().unwrap().to_owned();
    wait_for("W1's first attempt", SETTLE, || delivery_to(&d.event(&event), W1)["status"] == "retrying");
    // Disabled by a reload: its delivery is held.
    d.write_config(&hook("/fail/w1", false));
    d.signal(Signal::HUP);
    d.wait_log("config reloaded", 1);
    assert_eq!(delivery_to(&d.event(&event), W1)["status"], "held");
    assert_eq!(d.terminate(), Some(0));
    // Enabled in the file while the daemon was stopped: the start releases it.
    d.write_config(&hook("/ok/back", true));
    d.start_again();
    d.wait_settled(&event, &["succeeded"], SETTLE);
    assert_eq!(rx.hits_on("/ok/back").len(), 1);
}

#[test]
fn a_delivery_cancelled_while_its_attempt_is_in_flight_stays_cancelled() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\ntimeout = \"1s\"\nretry_schedule = [\"100ms\", \"100ms\"]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/hang/cancelled"), r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.scheduled", CLIENT_A, "{}");
    let event = body["event_id"].as_str().unwrap().to_owned();
    wait_for("the attempt to be under way", SETTLE, || rx.arrivals("/hang/cancelled") == 1);
    let (status, answer) = d.post(&format!("/v1/webhooks/{W1}/cancel"), "");
    assert_eq!((status, answer["cancelled"].as_u64()), (200, Some(1)), "{answer}");
    // The attempt times out after the cancel: kept in the log, not retried.
    wait_for("the attempt to be recorded", SETTLE, || {
        delivery_to(&d.event(&event), W1)["attempts"].as_array().unwrap().len() == 1
    });
    assert_eq!(delivery_to(&d.event(&event), W1)["status"], "cancelled");
}
