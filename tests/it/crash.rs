//! At-least-once across `kill -9`: every acknowledged event reaches every
//! matching webhook, even when the process dies mid-ingest and mid-retry.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const W2: &str = "22222222-2222-4222-8222-222222222222";
const ROUNDS: usize = 20;
const PER_ROUND: usize = 100;

#[test]
fn every_acknowledged_event_is_delivered_after_kill_9() {
    let rx = Receiver::start();
    // One receiver fails each event's first two attempts, so retries are always pending.
    let cfg = format!(
        "[delivery]\ntimeout = \"2s\"\nretry_schedule = [\"50ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\"]\nallow_private_targets = true\n\n{}{}",
        webhook(W1, CLIENT_A, &rx.url("/each/2/c1"), r#"["*"]"#),
        webhook(W2, CLIENT_A, &rx.url("/ok/c2"), r#"["meeting.scheduled"]"#),
    );
    let mut d = Daemon::start("", &cfg);
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (acked, stop, base) = (acked.clone(), stop.clone(), d.base.clone());
            std::thread::spawn(move || {
                let agent = agent(Duration::from_secs(10));
                while !stop.load(Ordering::Relaxed) {
                    let id = uuid::Uuid::new_v4().to_string();
                    let body = format!(
                        r#"{{"event_type":"meeting.scheduled","client_id":"{CLIENT_A}","event_id":"{id}","data":{{"n":1}}}}"#
                    );
                    let sent = agent.post(format!("{base}/v1/events")).send(body.as_bytes());
                    match sent {
                        Ok(r) if r.status() == 202 => acked.lock().unwrap().push(id),
                        Ok(r) => assert!(r.status() == 503, "unexpected answer {}", r.status()),
                        // Refused or reset while the daemon is down: not acknowledged.
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        })
        .collect();

    let mut worst_restart = Duration::ZERO;
    for round in 1..=ROUNDS {
        let target = round * PER_ROUND;
        wait_for("events to be acknowledged", Duration::from_secs(60), || {
            acked.lock().unwrap().len() >= target
        });
        // A random moment within the next 200 ms, mid-ingest and mid-retry.
        std::thread::sleep(Duration::from_millis((uuid::Uuid::new_v4().as_u128() % 200) as u64));
        d.kill9();
        let started = std::time::Instant::now();
        d.start_again(); // returns once /healthz answers
        worst_restart = worst_restart.max(started.elapsed());
    }
    wait_for("more events after the last restart", Duration::from_secs(60), || {
        acked.lock().unwrap().len() >= (ROUNDS + 1) * PER_ROUND
    });
    stop.store(true, Ordering::Relaxed);
    senders.into_iter().for_each(|s| s.join().unwrap());

    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let delivered = |path: &str| -> HashSet<String> {
        rx.hits_on(path)
            .into_iter()
            .filter(|h| h.answered == 200)
            .map(|h| h.json()["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let missing = || -> Vec<String> {
        let (c1, c2) = (delivered("/each/2/c1"), delivered("/ok/c2"));
        acked.iter().filter(|id| !(c1.contains(*id) && c2.contains(*id))).cloned().collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !missing().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let lost = missing();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events not delivered everywhere; first: {}",
        lost.len(),
        acked.len(),
        d.get(&format!("/v1/events/{}", lost[0])).1
    );
    let failures = rx.hits_on("/each/2/c1").iter().filter(|h| h.answered != 200).count();
    assert!(failures > 0, "retries were exercised");
    let successes: Vec<_> = rx
        .hits()
        .into_iter()
        .filter(|h| h.answered == 200)
        .map(|h| (h.path.clone(), h.json()["event_id"].to_string()))
        .collect();
    let distinct: HashSet<_> = successes.iter().collect();
    eprintln!(
        "crash loop: {ROUNDS} kill -9 rounds, {} events acknowledged, {} deliveries of them expected (all made), {} distinct deliveries made (some of events stored but killed before their 202), {} duplicates, worst restart to healthy {} ms",
        acked.len(),
        acked.len() * 2,
        distinct.len(),
        successes.len() - distinct.len(),
        worst_restart.as_millis()
    );
    // And the daemon agrees: every acknowledged event is stored and shows
    // both deliveries succeeded.
    for id in &acked {
        d.wait_settled(id, &["succeeded"], Duration::from_secs(30));
    }
}

/// New deliveries have no due entry in storage until their first outcome:
/// the dispatcher holds them. Here one webhook takes one attempt at a time
/// and its receiver holds that attempt, so most of 1,500 new deliveries
/// cannot stay in memory and are handed back to storage to be indexed; and
/// a `kill -9` meanwhile leaves them to be found at the next start.
#[test]
fn first_attempts_a_busy_webhook_cannot_take_survive_spilling_and_kill_9() {
    const EVENTS: usize = 1_500;
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\ntimeout = \"60s\"\nper_webhook_in_flight = 1\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/gate/c1"), r#"["*"]"#),
    );
    let mut d = Daemon::start("", &cfg);
    let send_all = |d: &Daemon| -> HashSet<String> {
        (0..EVENTS)
            .map(|_| {
                let (status, v) = d.send("meeting.scheduled", CLIENT_A, r#"{"n":1}"#);
                assert_eq!(status, 202, "{v}");
                v["event_id"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let arrived = |ids: &HashSet<String>| -> Vec<String> {
        rx.hits_on("/gate/c1")
            .into_iter()
            .map(|h| h.json()["event_id"].as_str().unwrap().to_owned())
            .filter(|id| ids.contains(id))
            .collect()
    };

    // Spilled while the daemon runs: each delivered exactly once.
    let first = send_all(&d);
    rx.set_gate(true);
    wait_for("the first batch to arrive", Duration::from_secs(60), || arrived(&first).len() >= EVENTS);
    let got = arrived(&first);
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), EVENTS, "every event once");
    assert_eq!(got.len(), EVENTS, "no duplicates without a crash");

    // Killed while they wait: each delivered at least once after the restart.
    rx.set_gate(false);
    let second = send_all(&d);
    d.kill9();
    d.start_again();
    rx.set_gate(true);
    wait_for("the second batch to arrive", Duration::from_secs(60), || {
        arrived(&second).into_iter().collect::<HashSet<_>>().len() >= EVENTS
    });
    // Nothing is left due, in the index or in memory, once the outcomes are stored.
    let due = || {
        let text =
            ureq::get(format!("{}/metrics", d.base)).call().unwrap().body_mut().read_to_string().unwrap();
        let line = text.lines().find(|l| l.starts_with("nexor_webhookd_deliveries_due ")).map(str::to_owned);
        line.unwrap_or_else(|| panic!("no nexor_webhookd_deliveries_due in {text}"))
    };
    wait_for("nothing due", Duration::from_secs(30), || due() == "nexor_webhookd_deliveries_due 0");
}
