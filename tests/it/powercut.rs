//! Power cuts: "a 202 means the event is on disk" must hold when the machine
//! loses power, not only when the process dies (`kill -9` keeps the kernel's
//! page cache). The daemon's storage lives on LazyFS (tests/lazyfs), which
//! keeps only what was fsynced: file contents as of their last fsync,
//! directory entries as of their directory's last fsync.
//!
//! Needs root and /dev/fuse (CI has both); fails, saying so, without them.
//! `POWERCUT_SEED` repeats a run's choices (sizes, moments, reloads; thread
//! timing still varies), `POWERCUT_MAX_BODY` caps the event bodies.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::lazyfs::LazyFs;

const W1: &str = "11111111-1111-4111-8111-111111111111";

fn sync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// The model itself: what survives a cut and what does not.
#[test]
fn lazyfs_keeps_only_what_was_synced() {
    let mut lfs = LazyFs::mount();
    let root = lfs.path().to_owned();
    let (a, b) = (root.join("a"), root.join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    fs::write(a.join("kept"), "v1").unwrap();
    File::open(a.join("kept")).unwrap().sync_all().unwrap();
    fs::write(a.join("to-rename"), "r").unwrap();
    File::open(a.join("to-rename")).unwrap().sync_data().unwrap();
    fs::write(a.join("to-unlink"), "u").unwrap();
    File::open(a.join("to-unlink")).unwrap().sync_data().unwrap();
    fs::write(b.join("moved"), "m").unwrap();
    File::open(b.join("moved")).unwrap().sync_data().unwrap();
    sync_dir(&a);
    sync_dir(&b);
    sync_dir(&root);
    let report = lfs.power_cut();
    assert!(report.lost.is_empty() && report.reverted.is_empty(), "all was durable: {report}");
    assert_eq!(read(&a.join("kept")).as_deref(), Some("v1"));

    // Not durable: a write without fsync, a new file fsynced in a directory
    // that was not, a rename, an unlink, a mkdir.
    let mut f = OpenOptions::new().append(true).open(a.join("kept")).unwrap();
    f.write_all(b"v2").unwrap();
    drop(f);
    assert_eq!(read(&a.join("kept")).as_deref(), Some("v1v2"), "writes are visible at once");
    fs::write(a.join("new"), "n").unwrap();
    File::open(a.join("new")).unwrap().sync_all().unwrap();
    fs::rename(a.join("to-rename"), a.join("renamed")).unwrap();
    fs::remove_file(a.join("to-unlink")).unwrap();
    fs::create_dir(root.join("c")).unwrap();
    // Durable: a rename whose directory is then fsynced, and a write fdatasynced.
    fs::rename(b.join("moved"), b.join("moved2")).unwrap();
    sync_dir(&b);
    fs::write(b.join("moved2"), "m2").unwrap();
    File::open(b.join("moved2")).unwrap().sync_data().unwrap();
    // Created after its directory's fsync, and never synced.
    fs::write(b.join("late"), "l").unwrap();

    let report = lfs.power_cut();
    eprintln!("self-test cut: {report}");
    assert_eq!(read(&a.join("kept")).as_deref(), Some("v1"), "unsynced append lost");
    assert_eq!(read(&a.join("new")), None, "a new file fsynced, its directory not: gone");
    assert_eq!(read(&a.join("to-rename")).as_deref(), Some("r"), "rename without dir fsync reverts");
    assert_eq!(read(&a.join("renamed")), None);
    assert_eq!(read(&a.join("to-unlink")).as_deref(), Some("u"), "unlink without dir fsync reverts");
    assert!(!root.join("c").exists(), "mkdir without parent fsync: gone");
    assert_eq!(read(&b.join("moved")), None, "rename with dir fsync kept");
    assert_eq!(read(&b.join("moved2")).as_deref(), Some("m2"));
    assert_eq!(read(&b.join("late")), None, "created after the dir fsync: gone");
    let mut names: Vec<_> = fs::read_dir(&a).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["kept", "to-rename", "to-unlink"]);

    // Truncation, and a new directory made durable level by level: a file
    // in it is there only once every directory on its path was fsynced.
    let f = OpenOptions::new().write(true).open(a.join("kept")).unwrap();
    f.set_len(1).unwrap();
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::write(root.join("d/e/f"), "f").unwrap();
    File::open(root.join("d/e/f")).unwrap().sync_all().unwrap();
    sync_dir(&root.join("d/e"));
    sync_dir(&root.join("d"));
    drop(f);
    lfs.power_cut();
    assert_eq!(read(&a.join("kept")).as_deref(), Some("v1"), "truncation without fsync reverts");
    assert!(!root.join("d").exists(), "d's own name was never synced in the root");
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::write(root.join("d/e/f"), "f").unwrap();
    File::open(root.join("d/e/f")).unwrap().sync_all().unwrap();
    sync_dir(&root.join("d/e"));
    sync_dir(&root.join("d"));
    sync_dir(&root);
    let f = OpenOptions::new().write(true).open(a.join("kept")).unwrap();
    f.set_len(1).unwrap();
    f.sync_data().unwrap();
    drop(f);
    lfs.power_cut();
    assert_eq!(read(&root.join("d/e/f")).as_deref(), Some("f"));
    assert_eq!(read(&a.join("kept")).as_deref(), Some("v"), "fdatasync keeps a truncation");
}

// ---------------------------------------------------------------------------
// The daemon under power cuts.

const HEALTHY: &str = "11111111-1111-4111-8111-111111111111";
const FAILING: &str = "22222222-2222-4222-8222-222222222222";
const CUTS: usize = 20;
const CLIENTS: usize = 4;
/// `[server] max_body`'s default (src/config.rs), which bounds the whole request body.
const MAX_BODY: usize = 1024 * 1024;
/// Acknowledgements each run of the daemon gets before its cut's random moment.
const ACKS_PER_RUN: usize = 20;
const EVENT_TYPES: [&str; 3] = ["meeting.scheduled", "meeting.confirmed", "workflow_run.status_changed"];

/// splitmix64: small, seedable, good enough to pick sizes and moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn bytes16(&mut self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.next().to_le_bytes());
        b[8..].copy_from_slice(&self.next().to_le_bytes());
        b
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo) as u64) as usize
    }
}

/// One acknowledged event: what the test sent, and in which run of the daemon.
#[derive(Clone)]
struct Acked {
    id: String,
    body_len: usize,
    pad: char,
    pad_len: usize,
    run: usize,
}

/// The request body of an event of exactly `len` bytes: `data` is `{"pad": "ccc…"}`.
fn event_body(id: &str, event_type: &str, pad: char, len: usize) -> (String, usize) {
    let head = format!(
        r#"{{"event_type":"{event_type}","client_id":"{CLIENT_A}","event_id":"{id}","data":{{"pad":""#
    );
    let tail = r#""}}"#;
    let pad_len = len - head.len() - tail.len();
    let mut body = String::with_capacity(len);
    body.push_str(&head);
    body.extend(std::iter::repeat_n(pad, pad_len));
    body.push_str(tail);
    assert_eq!(body.len(), len);
    (body, pad_len)
}

/// A body size from 200 bytes to just under `max_body`: mostly small; about
/// one in six from 100 KB up, around and above the ~128 KiB from which sled
/// writes an item to a file of its own under `blobs/`; a few at `max_body - 1`.
fn body_size(rng: &mut Rng, cap: usize) -> usize {
    let size = match rng.below(100) {
        0..=54 => rng.range(200, 2_000),
        55..=81 => rng.range(2_000, 100_000),
        82..=96 => rng.range(100_000, MAX_BODY),
        _ => MAX_BODY - 1,
    };
    size.min(cap - 1)
}

/// Checks that the daemon has the event, with the data it was sent.
fn check_event(d: &Daemon, e: &Acked) -> Result<(), String> {
    let (status, v) = d.get(&format!("/v1/events/{}", e.id));
    let shown = |v: &serde_json::Value| {
        let s = v.to_string();
        if s.len() > 300 {
            format!("{}… ({} bytes)", &s[..300], s.len())
        } else {
            s
        }
    };
    if status != 200 {
        return Err(format!("{} ({} byte body): GET -> {status} {}", e.id, e.body_len, shown(&v)));
    }
    let pad = v["data"]["pad"].as_str().unwrap_or("");
    if pad.len() != e.pad_len || pad.chars().any(|c| c != e.pad) {
        return Err(format!(
            "{} ({} byte body): stored data differs: {} bytes of pad, expected {} x {:?}",
            e.id,
            e.body_len,
            pad.len(),
            e.pad_len,
            e.pad
        ));
    }
    Ok(())
}

/// The end of the daemon's log, without its line per delivery attempt.
fn log_tail(d: &Daemon, lines: usize) -> String {
    let log = d.log();
    let all: Vec<&str> = log.lines().filter(|l| !l.contains("dispatch: attempt")).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The event_id of a delivery, read from the front of its envelope (which
/// starts with event_type then event_id) without parsing a megabyte.
fn delivered_id(body: &[u8]) -> Option<String> {
    let head = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    let at = head.find(r#""event_id":""#)? + 12;
    head.get(at..at + 36).map(str::to_owned)
}

#[test]
fn every_acknowledged_event_survives_power_cuts() {
    let started = Instant::now();
    let seed: u64 = match std::env::var("POWERCUT_SEED") {
        Ok(s) => s.parse().expect("POWERCUT_SEED is a number"),
        Err(_) => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        }
    };
    // POWERCUT_MAX_BODY=N keeps every body below N bytes. Small events alone do
    // not keep sled from writing blobs: a leaf node holds up to 16 values, and
    // a node over ~128 KiB is a blob too (bodies below ~4 KB make none).
    let cap: usize = std::env::var("POWERCUT_MAX_BODY").map_or(MAX_BODY, |s| s.parse().unwrap());
    eprintln!("power cuts: seed {seed} (POWERCUT_SEED={seed} repeats its choices), bodies below {cap} bytes");
    let mut rng = Rng(seed);

    let mut lfs = LazyFs::mount();
    // The daemon creates its storage directory and the one above it.
    let storage = lfs.path().join("nexor").join("data");
    let healthy = Receiver::start();
    let failing = Receiver::start();
    let cfg = format!(
        "[delivery]\ntimeout = \"2s\"\nretry_schedule = [\"100ms\", \"200ms\"]\nallow_private_targets = true\n\n{}{}",
        webhook(HEALTHY, CLIENT_A, &healthy.url("/ok/healthy"), r#"["*"]"#),
        webhook(FAILING, CLIENT_A, &failing.url("/code/500/failing"), r#"["*"]"#),
    );
    let mut d = Daemon::start_with_storage(Some(&storage), "", &cfg);

    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let unexpected = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let run = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (acked, unexpected, stop, run) =
                (acked.clone(), unexpected.clone(), stop.clone(), run.clone());
            let base = d.base.clone();
            let mut rng = Rng(seed ^ (c as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            std::thread::spawn(move || {
                let agent = agent(Duration::from_secs(30));
                while !stop.load(Ordering::Relaxed) {
                    // About 10 posts a second per client: enough in flight at
                    // any moment, few enough to check them all in time.
                    std::thread::sleep(Duration::from_millis(rng.below(200)));
                    let id = uuid::Builder::from_random_bytes(rng.bytes16()).into_uuid().to_string();
                    let len = body_size(&mut rng, cap);
                    let pad = (b'a' + rng.below(26) as u8) as char;
                    let event_type = EVENT_TYPES[rng.below(EVENT_TYPES.len() as u64) as usize];
                    let (body, pad_len) = event_body(&id, event_type, pad, len);
                    let sent = agent
                        .post(format!("{base}/v1/events"))
                        .header("content-type", "application/json")
                        .send(body.as_bytes());
                    match sent {
                        Ok(r) if r.status() == 202 => acked.lock().unwrap().push(Acked {
                            id,
                            body_len: len,
                            pad,
                            pad_len,
                            run: run.load(Ordering::SeqCst),
                        }),
                        // The storage refused it (not acknowledged, so nothing is promised).
                        Ok(r) if r.status() == 503 => {}
                        Ok(mut r) => unexpected.lock().unwrap().push(format!(
                            "{} for a {len} byte body: {}",
                            r.status(),
                            r.body_mut().read_to_string().unwrap_or_default()
                        )),
                        // Refused or reset while the daemon is down: not acknowledged.
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        })
        .collect();

    let mut reloads = 0;
    let mut seen = 0; // acked[..seen] are checked or in `pending`
    let mut pending: Vec<Acked> = Vec::new();
    let mut worst_restart = Duration::ZERO;
    let mut dropped_paths = 0;
    for cut in 1..=CUTS {
        let before = acked.lock().unwrap().len();
        wait_for(
            &format!("{ACKS_PER_RUN} acknowledgements before cut {cut}"),
            Duration::from_secs(60),
            || acked.lock().unwrap().len() >= before + ACKS_PER_RUN,
        );
        if cut % 5 == 3 || rng.below(6) == 0 {
            // A reload (the same file again) in between: the cut may follow it closely.
            d.write_config(&cfg);
            d.signal(Signal::HUP);
            reloads += 1;
            d.wait_log("config reloaded", reloads);
        }
        // The random moment: mid-ingest, mid-retry.
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        run.fetch_add(1, Ordering::SeqCst);
        d.kill9();
        let report = lfs.power_cut();
        dropped_paths += report.lost.len();
        let (file_syncs, dir_syncs) = {
            let s = lfs.state();
            (s.file_syncs, s.dir_syncs)
        };
        // Those acknowledged by the run just cut short (or earlier), not checked yet.
        {
            let acked = acked.lock().unwrap();
            pending.extend(acked[seen..].iter().cloned());
            seen = acked.len();
        }
        let (to_check, later): (Vec<Acked>, Vec<Acked>) = pending.drain(..).partition(|e| e.run < cut);
        pending = later;
        let large = to_check.iter().filter(|e| e.body_len >= 100_000).count();
        eprintln!(
            "cut {cut:2} at {:5.1}s: {} acknowledged before it not checked yet ({large} of >= 100 KB); {file_syncs} file and {dir_syncs} directory fsyncs so far; the cut dropped {report}",
            started.elapsed().as_secs_f64(),
            to_check.len(),
        );
        let restart = Instant::now();
        d.start_again(); // fails the test, with the log, if the daemon cannot start
        let restart = restart.elapsed();
        worst_restart = worst_restart.max(restart);
        // Every event acknowledged before the cut is there, with its data.
        let wrong: Vec<String> = to_check.iter().filter_map(|e| check_event(&d, e).err()).collect();
        eprintln!(
            "       restarted in {} ms; {} of {} missing",
            restart.as_millis(),
            wrong.len(),
            to_check.len()
        );
        assert!(
            wrong.is_empty(),
            "cut {cut} (seed {seed}): {} of the {} events acknowledged before the cut are not there after it:\n  {}\nLazyFS at the cut: {report}\ndaemon log (end):\n{}",
            wrong.len(),
            to_check.len(),
            wrong.iter().take(5).cloned().collect::<Vec<_>>().join("\n  "),
            log_tail(&d, 40),
        );
    }
    stop.store(true, Ordering::Relaxed);
    clients.into_iter().for_each(|c| c.join().unwrap());
    let unexpected = unexpected.lock().unwrap().clone();
    assert!(unexpected.is_empty(), "unexpected answers to ingest: {unexpected:?}");

    // In the end every acknowledged event is stored, and was delivered to
    // the healthy webhook (at least once).
    let acked = acked.lock().unwrap().clone();
    let wrong: Vec<String> = acked.iter().filter_map(|e| check_event(&d, e).err()).collect();
    assert!(wrong.is_empty(), "after the last cut, {} acknowledged events are gone: {wrong:?}", wrong.len());
    let mut delivered: HashMap<String, usize> = HashMap::new();
    let mut missing: Vec<&Acked> = acked.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() && Instant::now() < deadline {
        delivered.clear();
        for h in healthy.hits_on("/ok/healthy").iter().filter(|h| h.answered == 200) {
            *delivered.entry(delivered_id(&h.body).unwrap_or_default()).or_default() += 1;
        }
        missing.retain(|e| !delivered.contains_key(&e.id));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events never reached the healthy webhook; first: {}",
        missing.len(),
        acked.len(),
        d.get(&format!("/v1/events/{}", missing[0].id)).1
    );
    let failures = failing.hits_on("/code/500/failing").len();
    assert!(failures > 0, "the failing webhook was tried");
    let ids: HashSet<&str> = acked.iter().map(|e| e.id.as_str()).collect();
    let large = acked.iter().filter(|e| e.body_len >= 100_000).count();
    let bytes: usize = acked.iter().map(|e| e.body_len).sum();
    eprintln!(
        "power cuts: seed {seed}, {CUTS} cuts, {} events acknowledged ({large} of >= 100 KB, {} MB in all), all there and delivered ({} deliveries to the healthy webhook, {} attempts at the failing one), {reloads} reloads, {dropped_paths} paths dropped by the cuts, worst restart {} ms, {:.1}s",
        ids.len(),
        bytes / 1_000_000,
        delivered.values().sum::<usize>(),
        failures,
        worst_restart.as_millis(),
        started.elapsed().as_secs_f64()
    );
}

/// A daemon (not started) with its storage on `fs` and one webhook to `rx`.
fn on_lazyfs(fs: &LazyFs, rx: &Receiver) -> Daemon {
    let cfg = format!(
        "[delivery]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/ok"), r#"["*"]"#)
    );
    Daemon::configured(Some(&fs.path().join("data")), "", &cfg)
}

/// A disk that stops answering without an error: nothing is acknowledged
/// meanwhile, and the daemon stops telling systemd's watchdog it is alive,
/// so that systemd restarts it; once the disk answers, both come back.
#[test]
fn a_store_that_stops_answering_stops_the_watchdog() {
    let fs = LazyFs::mount();
    let rx = Receiver::start();
    let mut d = on_lazyfs(&fs, &rx);
    let socket_path = d.dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let pinged = || {
        let mut buf = [0; 256];
        let mut any = false;
        while let Ok(n) = socket.recv(&mut buf) {
            any |= String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "WATCHDOG=1");
        }
        any
    };
    d.env = vec![
        ("NOTIFY_SOCKET".into(), socket_path.to_str().unwrap().into()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    d.start_again();
    wait_for("watchdog pings", Duration::from_secs(10), pinged);

    let held = fs.hold_syncs();
    std::thread::scope(|s| {
        let sent = s.spawn(|| d.send("meeting.scheduled", CLIENT_A, "{}").0);
        d.wait_log("storage has finished nothing", 1);
        pinged();
        // Two and a half watchdog intervals without a ping.
        let quiet_until = Instant::now() + Duration::from_millis(1000);
        while Instant::now() < quiet_until {
            assert!(!pinged(), "pinged the watchdog with a write stuck:\n{}", d.log());
        }
        assert!(!sent.is_finished(), "a write was answered while the disk did not answer");
        assert!(held.resume() > 0, "no sync was held");
        assert_eq!(sent.join().unwrap(), 202);
    });
    wait_for("watchdog pings again", Duration::from_secs(10), pinged);
    assert_eq!(d.terminate(), Some(0));
}

/// Without systemd's watchdog, a store stuck with writes waiting for
/// `stall_limit` ends the daemon with a clear line (exit 1), and a fresh
/// start serves what was acknowledged.
#[test]
fn a_store_stuck_past_its_stall_limit_ends_the_daemon() {
    let fs = LazyFs::mount();
    let rx = Receiver::start();
    let mut d = on_lazyfs(&fs, &rx);
    let text = fs::read_to_string(d.config_path()).unwrap();
    fs::write(d.config_path(), text.replace("[storage]\n", "[storage]\nstall_limit = \"1s\"\n")).unwrap();
    d.start_again();
    let (status, before) = d.send("meeting.scheduled", CLIENT_A, "{}");
    assert_eq!(status, 202, "{before}");
    {
        let held = fs.hold_syncs();
        std::thread::scope(|s| {
            s.spawn(|| d.send("meeting.scheduled", CLIENT_A, "{}"));
            d.wait_log("storage has finished nothing for", 1);
            // The process can finish exiting only once its sync is answered.
            drop(held);
        });
    }
    let mut code = None;
    wait_for("the daemon to end", Duration::from_secs(10), || {
        code = d.exited();
        code.is_some()
    });
    assert_eq!(code, Some(Some(1)), "{}", d.log());
    d.start_again();
    d.event(before["event_id"].as_str().unwrap());
    assert_eq!(d.terminate(), Some(0));
}
