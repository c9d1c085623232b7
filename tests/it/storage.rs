//! Damaged storage is found and refused, never served short: a cut or
//! emptied sled log, a missing one, a segment of zeros. The daemon keeps a
//! ledger of what it acknowledged and compares it with what sled recovers.

use std::time::Duration;

use crate::common::*;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const EVENTS: usize = 300;

/// A config whose one webhook fails, so that every event stays stored,
/// waiting an hour for its retry.
fn waiting(rx: &Receiver) -> String {
    format!(
        "[delivery]\nretry_schedule = [\"1h\"]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/code/500/w"), r#"["*"]"#)
    )
}

/// A daemon holding `EVENTS` acknowledged events that wait for a retry an
/// hour away, stopped in order.
fn stopped_with_waiting_events() -> (Daemon, Receiver) {
    let rx = Receiver::start();
    let cfg = waiting(&rx);
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

/// Every file under `dir` with its bytes, to show a command changed nothing.
fn files(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut all = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.extend(files(&path));
        } else {
            all.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    all
}

#[test]
fn a_backup_under_load_restores_one_moment_whole() {
    let rx = Receiver::start();
    let cfg = waiting(&rx);
    let mut d = Daemon::start("", &cfg);
    let backup = d.dir.path().join("backup");
    let acked = std::sync::Mutex::new(Vec::<(String, std::time::Instant)>::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    let (started, answered, answer) = std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, v) = d.send("meeting.scheduled", CLIENT_A, r#"{"n":1}"#);
                    assert_eq!(status, 202, "{v}");
                    let id = v["event_id"].as_str().unwrap().to_owned();
                    acked.lock().unwrap().push((id, std::time::Instant::now()));
                }
            });
        }
        wait_for("events before the backup", Duration::from_secs(30), || acked.lock().unwrap().len() >= 200);
        let started = std::time::Instant::now();
        let (code, out, err) = d.cli(&["backup", "--to", backup.to_str().unwrap()]);
        let answered = std::time::Instant::now();
        let n = acked.lock().unwrap().len();
        wait_for("events after the backup", Duration::from_secs(30), || {
            acked.lock().unwrap().len() >= n + 100
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(code, Some(0), "{out}{err}");
        (started, answered, serde_json::from_str::<serde_json::Value>(&out).unwrap())
    });
    assert_eq!(d.terminate(), Some(0));
    let acked = acked.into_inner().unwrap();

    // Into a new daemon's empty storage: whole, and exactly what the copy says.
    let mut r = Daemon::configured(None, "", &cfg);
    let (code, out, err) = r.cli(&["restore", "--from", backup.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = r.cli(&["check-storage"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(": ok: "), "{out}");
    r.start_again();
    // Each event of the copy with its one delivery, in whatever state the
    // copy caught it.
    let (status, v) = r.get("/v1/webhooks");
    assert_eq!(status, 200, "{v}");
    let deliveries: u64 = v["webhooks"][0]["health"]["deliveries"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(deliveries, answer["events"].as_u64().unwrap(), "{answer}\n{v}");
    for (id, at) in &acked {
        let (status, _) = r.get(&format!("/v1/events/{id}"));
        if *at < started {
            assert_eq!(status, 200, "event {id}, acknowledged before the backup, is not in it");
        } else if *at > answered {
            assert_eq!(status, 404, "event {id}, acknowledged after the backup, is in it");
        }
    }
}

#[test]
fn backup_and_restore_refuse_targets_that_are_not_empty() {
    let rx = Receiver::start();
    let cfg = waiting(&rx);
    let mut d = Daemon::start("", &cfg);
    assert_eq!(d.send("meeting.scheduled", CLIENT_A, "{}").0, 202);
    let (status, v) = d.post("/v1/storage/backup?to=relative/dir", "");
    assert_eq!(status, 422, "{v}");
    let occupied = d.dir.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("keep"), "mine").unwrap();
    let (code, _, err) = d.cli(&["backup", "--to", occupied.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("409") && err.contains("is not empty"), "{err}");
    assert_eq!(std::fs::read_dir(&occupied).unwrap().count(), 1, "the occupied target changed");
    let backup = d.dir.path().join("backup");
    let (code, _, err) = d.cli(&["backup", "--to", backup.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(d.terminate(), Some(0));

    // The store in use is not empty: a restore over it is refused, untouched.
    let before = files(&d.storage);
    let (code, _, err) = d.cli(&["restore", "--from", backup.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(files(&d.storage), before, "a refused restore changed the store");
    // Nor is a directory without a ledger taken for a backup.
    let fresh = Daemon::configured(None, "", &cfg);
    let (code, _, err) = fresh.cli(&["restore", "--from", occupied.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("holds no backup"), "{err}");
    assert!(!fresh.storage.exists(), "a refused restore made the storage directory");
}

#[test]
fn check_storage_changes_nothing_and_names_a_broken_reference() {
    let (mut d, _rx) = stopped_with_waiting_events();
    let before = files(&d.storage);
    let (code, out, err) = d.cli(&["check-storage"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("ok: {EVENTS} events, {EVENTS} deliveries ({EVENTS} waiting)")), "{out}");
    assert_eq!(files(&d.storage), before, "check-storage changed the store");

    d.start_again();
    let (code, _, err) = d.cli(&["check-storage"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("already using"), "{err}");
    assert_eq!(d.terminate(), Some(0));

    // One event gone behind the daemon's back: its delivery points at nothing.
    let seq = {
        let db = sled::open(&d.storage).unwrap();
        let (key, _) = db.scan_prefix(b"E").next().unwrap().unwrap();
        db.remove(&key).unwrap();
        db.flush().unwrap();
        u64::from_be_bytes(key[1..9].try_into().unwrap())
    };
    let (code, out, err) = d.cli(&["check-storage"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains(&format!("its event {seq} is not stored")), "{out}");

    // A cut log: short of the ledger, said before anything else.
    let file = std::fs::OpenOptions::new().write(true).open(db_file(&d)).unwrap();
    file.set_len(file.metadata().unwrap().len() / 2).unwrap();
    let before = files(&d.storage);
    let (code, out, err) = d.cli(&["check-storage"]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(out.contains("short of what was acknowledged") || err.contains("is damaged"), "{out}{err}");
    assert_eq!(files(&d.storage), before, "check-storage changed a damaged store");
}

/// Every path under `dir` (itself included) with its permission bits.
fn modes(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut all = vec![(dir.to_owned(), std::fs::metadata(dir).unwrap().permissions().mode() & 0o777)];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.extend(modes(&path));
        } else {
            all.push((path.clone(), std::fs::metadata(&path).unwrap().permissions().mode() & 0o777));
        }
    }
    all
}

#[test]
fn storage_is_private_to_the_daemons_user() {
    use std::os::unix::fs::PermissionsExt;
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/w"), r#"["*"]"#)
    );
    let mut d = Daemon::start("", &cfg);
    // A blob too: sled writes events over ~128 KiB to files of their own.
    let (status, v) =
        d.send("meeting.scheduled", CLIENT_A, &format!(r#"{{"pad":"{}"}}"#, "x".repeat(300_000)));
    assert_eq!(status, 202, "{v}");
    let backup = d.dir.path().join("backup");
    assert_eq!(d.cli(&["backup", "--to", backup.to_str().unwrap()]).0, Some(0));
    assert_eq!(d.terminate(), Some(0));
    for dir in [&d.storage, &backup] {
        let open: Vec<_> = modes(dir).into_iter().filter(|(_, m)| m & 0o077 != 0).collect();
        assert!(open.is_empty(), "open to others: {open:?}");
    }
    assert!(d.storage.join("blobs").read_dir().unwrap().next().is_some(), "no blob was written");

    // A storage directory others can read is said so at start.
    std::fs::set_permissions(&d.storage, std::fs::Permissions::from_mode(0o755)).unwrap();
    d.start_again();
    assert!(d.log().contains("is open to its group or other users"), "{}", d.log());
}
