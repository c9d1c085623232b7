//! A full disk never wedges the daemon: writes that would not fit are
//! refused with 503 while reads, /healthz, /metrics and SIGTERM go on
//! working, and nothing acknowledged is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;

const W1: &str = "11111111-1111-4111-8111-111111111111";

/// The outside review's run: 8 clients posting 900 KB events at a 20 MiB
/// disk with a 4 MiB margin. A per-batch check let a batch overshoot; sled
/// met ENOSPC and every request, /healthz and SIGTERM hung from then on.
#[test]
fn big_events_at_a_nearly_full_disk_get_503_and_the_daemon_stays_responsive() {
    let Some(disk) = Tmpfs::mount("20m") else { return };
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = [\"1h\"]\nallow_private_targets = true\n\n{}",
        // Failing, so that every event stays stored and waiting.
        webhook(W1, CLIENT_A, &rx.url("/code/500/full"), r#"["*"]"#)
    );
    let storage = disk.path().join("data");
    let mut d = Daemon::configured(Some(&storage), "max_body = 1048576", &cfg);
    let text = std::fs::read_to_string(d.config_path()).unwrap();
    // A store that still wedges (sled meeting ENOSPC in its own threads
    // hangs without an error) ends the daemon after 5 s, with a line.
    std::fs::write(
        d.config_path(),
        text.replace("[storage]\n", "[storage]\nmin_free_space = 4194304\nstall_limit = \"5s\"\n"),
    )
    .unwrap();
    d.start_again();

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (acked, refused, stop, base) = (acked.clone(), refused.clone(), stop.clone(), d.base.clone());
            std::thread::spawn(move || {
                let agent = agent(Duration::from_secs(20));
                let pad = "x".repeat(900 * 1000);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = uuid::Uuid::new_v4().to_string();
                    let body = format!(
                        r#"{{"event_type":"meeting.scheduled","client_id":"{CLIENT_A}","event_id":"{id}","data":{{"c":{c},"n":{n},"pad":"{pad}"}}}}"#
                    );
                    let answer = agent.post(format!("{base}/v1/events")).send(body.as_bytes());
                    match answer {
                        Ok(r) if r.status() == 202 => acked.lock().unwrap().push(id),
                        Ok(r) if r.status() == 503 => *refused.lock().unwrap() += 1,
                        Ok(r) => panic!("unexpected answer {}", r.status()),
                        Err(ureq::Error::Timeout(_)) => panic!("no answer to an ingest in 20 s: the daemon hangs"),
                        // The daemon stopped on a failed write: not acknowledged.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    // Either ingest refuses what would not fit and the daemon goes on, or
    // sled met ENOSPC anyway and the daemon stopped, saying why (systemd
    // starts it again): at once on a failed write, or after stall_limit if
    // sled hung instead. Never a hang.
    let mut stopped = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stopped.is_none() && *refused.lock().unwrap() < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "ingest neither refused events for want of space nor stopped in 60 s; acked {}:\n{}",
            acked.lock().unwrap().len(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
        stopped = d.exited();
    }
    match stopped {
        Some(code) => {
            assert_eq!(code, Some(1), "{}", d.log());
            let log = d.log();
            let failed = log.contains("storage write failed") && log.contains("No space left on device");
            assert!(failed || log.contains("storage has finished nothing for"), "{log}");
        }
        None => {
            // While the disk is full: reads, health and metrics answer.
            assert_eq!(d.get("/healthz").0, 200);
            assert_eq!(d.get("/metrics").0, 200);
            let first = acked.lock().unwrap().first().cloned().expect("some events fitted");
            d.event(&first);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    if stopped.is_none() {
        // SIGTERM stops it, in order.
        assert_eq!(d.terminate(), Some(0), "{}", d.log());
    }
    // Nothing acknowledged was lost, on the same disk made bigger.
    disk.resize("64m");
    d.start_again();
    for id in &acked {
        d.event(id);
    }
}
