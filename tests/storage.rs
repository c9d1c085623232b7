//! Damaged storage is found and refused, never served short: a cut or
//! emptied sled log, a missing one, a segment of zeros. The daemon keeps a
//! ledger of what it acknowledged and compares it with what sled recovers.

mod common;

use std::time::Duration;

use common::*;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const EVENTS: usize = 300;

/// A daemon holding `EVENTS` acknowledged events that wait for a retry an
/// hour away, stopped in order.
fn stopped_with_waiting_events() -> (Daemon, Receiver) {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = [\"1h\"]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/code/500/w"), r#"["*"]"#)
    );
    let mut d = Daemon::start("", &cfg);
    for i in 0..EVENTS {
        let (status, v) =
            d.send("meeting.scheduled", CLIENT_A, &format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(3000)));
        assert_eq!(status, 202, "{v}");
    }
    wait_for("every first attempt", Duration::from_secs(30), || rx.hits().len() >= EVENTS);
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    (d, rx)
}

fn db_file(d: &Daemon) -> std::path::PathBuf {
    d.storage.join("db")
}

/// Starts the daemon expecting a refusal that names the missing batches
/// and the way to start anyway.
fn refused(d: &mut Daemon, what: &str) -> String {
    let line = damaged(d, what);
    assert!(line.contains("--accept-data-loss"), "{what}: says no way forward: {line}");
    line
}

/// Starts the daemon expecting a refusal that says, in one line and without
/// a panic's backtrace, that storage is damaged; returns that line.
fn damaged(d: &mut Daemon, what: &str) -> String {
    let (code, stderr) = d.start_failing(Duration::from_secs(30));
    assert_ne!(code, Some(0), "{what}: started:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{what}: a panic, not a clear refusal:\n{stderr}");
    let line = stderr
        .lines()
        .find_map(|l| l.find("the storage directory").map(|at| &l[at..]))
        .filter(|l| l.contains("is damaged"))
        .unwrap_or_else(|| panic!("{what}: no line names the damage:\n{stderr}"))
        .to_owned();
    line
}

fn retrying(d: &Daemon) -> u64 {
    let (status, v) = d.get("/v1/webhooks");
    assert_eq!(status, 200, "{v}");
    v["webhooks"][0]["health"]["deliveries"]["retrying"]
        .as_u64()
        .unwrap_or_else(|| panic!("no retrying count: {v}"))
}

#[test]
fn a_log_cut_in_half_is_refused_untouched() {
    let (mut d, _rx) = stopped_with_waiting_events();
    let file = std::fs::OpenOptions::new().write(true).open(db_file(&d)).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len / 2).unwrap();
    drop(file);
    // sled either recovers the records before the cut and says nothing (the
    // ledger finds the batches missing), or panics, depending on where its
    // segments' records fall: either way, one clear line, and again.
    let line = damaged(&mut d, "half the log");
    assert_eq!(damaged(&mut d, "half the log, again"), line, "refusing changed something");
}

#[test]
fn an_emptied_or_missing_log_is_damage_not_a_new_database() {
    let (mut d, _rx) = stopped_with_waiting_events();
    let saved = std::fs::read(db_file(&d)).unwrap();
    std::fs::remove_file(db_file(&d)).unwrap();
    refused(&mut d, "no db");
    std::fs::File::create(db_file(&d)).unwrap();
    let line = refused(&mut d, "an empty db");
    assert!(line.contains("0 committed batches"), "{line}");
    // The real log back: everything is there.
    std::fs::write(db_file(&d), &saved).unwrap();
    d.start_again();
    assert_eq!(retrying(&d), EVENTS as u64);
    assert_eq!(d.terminate(), Some(0));

    // Accepting the loss starts on what is left, and says what was lost.
    // (With sled's snapshot left behind, an empty log is unreadable to sled
    // instead: a refusal that accepting loss cannot pass.)
    for f in std::fs::read_dir(&d.storage).unwrap() {
        let f = f.unwrap();
        if f.file_name().to_string_lossy().starts_with("snap.") {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    std::fs::File::create(db_file(&d)).unwrap();
    d.run_args = vec!["--accept-data-loss".into()];
    d.start_again();
    assert!(d.log().contains("starting on damaged storage"), "{}", d.log());
    assert!(d.log().contains("batches are missing, with every event stored after the start"), "{}", d.log());
    assert_eq!(retrying(&d), 0);
    // From then on, what is left is the baseline: a plain start works.
    assert_eq!(d.terminate(), Some(0));
    d.run_args.clear();
    d.start_again();
}

#[test]
fn a_segment_of_zeros_is_refused_in_one_line_or_loses_nothing() {
    let (mut d, _rx) = stopped_with_waiting_events();
    let pristine = std::fs::read(db_file(&d)).unwrap();
    // sled's log is made of 512 KiB segments. Zeroed, one may hold nothing
    // still needed; otherwise sled panics at open ("tried to serialize
    // Uninitialized") or recovers up to the last good record.
    const SEGMENT: usize = 512 * 1024;
    assert!(pristine.len() > 2 * SEGMENT, "the log spans one segment only: {} bytes", pristine.len());
    let mut refusals = 0;
    for start in (0..pristine.len()).step_by(SEGMENT) {
        let mut bytes = pristine.clone();
        let end = (start + SEGMENT).min(bytes.len());
        bytes[start..end].iter_mut().for_each(|b| *b = 0);
        std::fs::write(db_file(&d), bytes).unwrap();
        let (code, stderr) = d.start_failing_or_ready(Duration::from_secs(30));
        match code {
            None => {
                assert_eq!(retrying(&d), EVENTS as u64, "started short with segment at {start} zeroed");
                assert_eq!(d.terminate(), Some(0));
            }
            Some(_) => {
                assert!(!stderr.contains("panicked"), "a panic, not a clear refusal:\n{stderr}");
                assert!(stderr.contains("is damaged"), "{stderr}");
                refusals += 1;
            }
        }
    }
    assert!(refusals > 0, "no zeroed segment was found to be damage");
}
