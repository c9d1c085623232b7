//! `check-storage`: one full read of a stopped store, which says whether
//! every record decodes and every index entry points at what it indexes.
//!
//! It never opens the store itself: sled's open runs its recovery, which
//! zeroes a damaged log's tail and deletes blobs past it. The files are
//! copied (under the same lock a daemon takes, so a running one is refused)
//! into a scratch directory, and the copy is opened and read. What is
//! checked follows the key table in `keys`; the walk is in key order and
//! keeps only keys and small numbers in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;

use uuid::Uuid;

use super::records::{DeliveryRecord, EventRecord, Status, WebhookStats};
use super::{codec, durable, keys, open_sled, DeliveryKey, StoreError};

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    pub events: u64,
    pub deliveries: u64,
    /// Deliveries waiting for an attempt.
    pub waiting: u64,
    /// Batches the store holds, and the ledger's count of those acknowledged.
    pub commits: u64,
    pub acknowledged: Option<u64>,
    /// One line per problem found, in key order.
    pub problems: Vec<String>,
}

/// Copies the stopped store under `path` to a scratch directory and checks
/// the copy. Fails (rather than reporting) only when the check cannot run:
/// the store is in use, missing, or unreadable to sled altogether.
pub fn check_storage(path: &Path) -> Result<Report, StoreError> {
    check_copy(path).map_err(|e| match e {
        StoreError::Unreadable { detail, .. } => StoreError::Unreadable { path: path.to_owned(), detail },
        e => e.found_in(path),
    })
}

fn check_copy(path: &Path) -> Result<Report, StoreError> {
    let db_file = path.join("db");
    let lock = File::open(&db_file)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", db_file.display())))?;
    // sled takes the same exclusive flock for as long as a daemon runs on
    // the directory.
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(StoreError::Locked(path.to_owned()));
    }
    let scratch = tempfile::Builder::new().prefix("nexor-webhookd-check-").tempdir()?;
    copy_tree(path, scratch.path())?;
    drop(lock);
    let db = open_sled(scratch.path(), 64 << 20)?;
    let mut report = walk(&db)?;
    let found = durable::Mark::stored(&db)?;
    report.commits = found.commits;
    report.acknowledged = durable::read_ledger(scratch.path())?.map(|a| a.mark.commits);
    if let Some(loss) = durable::check(scratch.path(), found)? {
        report.problems.insert(0, format!("the store is short of what was acknowledged: {loss}"));
    }
    Ok(report)
}

/// Copies what makes up a store in `from` into `to`: its regular files
/// (sled's and the ledger) and sled's `blobs/`; nothing else kept beside
/// them (a backup, say).
fn copy_tree(from: &Path, to: &Path) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        } else if kind.is_dir() && entry.file_name() == "blobs" {
            std::fs::create_dir(&target)?;
            copy_tree(&entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Per-webhook delivery counts by status, to compare with its `W` stats.
type Counts = HashMap<Uuid, [u64; Status::ALL.len()]>;

/// What the walk keeps of the records it has passed, for the cross-checks
/// at the end (keys sort `D` < `E` < `F` < `H` < `I` < `Q` < `W` < `Z`, so
/// each reference is checked once both sides are seen).
#[derive(Default)]
struct Seen {
    /// Delivery → its due time, for those waiting for an attempt.
    waiting: BTreeMap<DeliveryKey, u64>,
    deliveries: BTreeSet<DeliveryKey>,
    /// Event seq → its webhooks.
    events: BTreeMap<u64, Vec<Uuid>>,
    ranges: Vec<(u64, u64)>,
    counted_due: BTreeMap<u64, u64>,
    due: BTreeSet<(u64, DeliveryKey)>,
    set_aside: BTreeSet<DeliveryKey>,
    counts: Counts,
    stats: HashMap<Uuid, WebhookStats>,
}

/// Reads every key of `db` once and cross-checks what it found.
pub(super) fn walk(db: &sled::Db) -> Result<Report, StoreError> {
    let mut seen = Seen::default();
    let mut problems = Vec::new();
    for kv in db.iter() {
        let (k, v) = kv?;
        let name = describe(&k);
        let wrong = |what: String| format!("{name}: {what}");
        match (k.first().copied(), k.len()) {
            (Some(keys::DELIVERY), 25) => match codec::decode::<DeliveryRecord>(&k, &v) {
                Ok(d) => {
                    let key = keys::parse_delivery(&k);
                    if d.webhook_id != key.webhook {
                        problems.push(wrong(format!("its record names webhook {}", d.webhook_id)));
                    }
                    seen.counts.entry(key.webhook).or_default()[d.status.index()] += 1;
                    if let Some(at) = d.next_attempt_at.filter(|_| !d.status.is_final()) {
                        seen.waiting.insert(key, at.max(0) as u64);
                    }
                    seen.deliveries.insert(key);
                }
                Err(e) => problems.push(wrong(e.to_string())),
            },
            (Some(keys::EVENT), 9) => match codec::decode::<EventRecord>(&k, &v) {
                Ok(e) => {
                    seen.events.insert(keys::u64_at(&k, 1), e.webhooks);
                }
                Err(e) => problems.push(wrong(e.to_string())),
            },
            (Some(keys::FRESH_RANGE), 9) => match keys::u64_value(&k, &v) {
                Ok(last) => seen.ranges.push((keys::u64_at(&k, 1), last)),
                Err(e) => problems.push(wrong(e.to_string())),
            },
            (Some(keys::DUE_COUNT), 9) => match keys::u64_value(&k, &v) {
                Ok(n) => {
                    seen.counted_due.insert(keys::u64_at(&k, 1), n);
                }
                Err(e) => problems.push(wrong(e.to_string())),
            },
            (Some(keys::INDEX), 17) => match keys::u64_value(&k, &v) {
                Ok(seq) if !seen.events.contains_key(&seq) => {
                    problems.push(wrong(format!("points at event {seq}, which is not stored")))
                }
                Ok(_) => {}
                Err(e) => problems.push(wrong(e.to_string())),
            },
            (Some(keys::DUE), 33) => {
                let due = keys::parse_due(&k);
                seen.due.insert((due.at_ms, due.key));
            }
            (Some(keys::STATS), 17) => match codec::decode::<WebhookStats>(&k, &v) {
                Ok(s) => {
                    seen.stats.insert(Uuid::from_slice(&k[1..]).expect("16 bytes, by the match"), s);
                }
                Err(e) => problems.push(wrong(e.to_string())),
            },
            (Some(keys::SET_ASIDE), 25) => {
                seen.set_aside.insert(keys::parse_delivery(&k));
            }
            (Some(b'C'), 1) => {}
            (Some(b'V'), 1) if *v == [keys::LAYOUT_VERSION] => {}
            (Some(b'V'), 1) => problems.push(wrong(format!("layout {v:?}, not {}", keys::LAYOUT_VERSION))),
            _ => problems.push(wrong("a key of no known kind".into())),
        }
    }
    cross_check(&seen, &mut problems);
    Ok(Report {
        events: seen.events.len() as u64,
        deliveries: seen.deliveries.len() as u64,
        waiting: seen.waiting.len() as u64,
        problems,
        ..Report::default()
    })
}

/// The references between records: each delivery's event, each event's
/// deliveries, each due entry's delivery, each waiting delivery's due entry
/// (or the batch range standing for it), the due counts and the stats.
fn cross_check(seen: &Seen, problems: &mut Vec<String>) {
    for key in &seen.deliveries {
        match seen.events.get(&key.seq) {
            None => problems.push(format!("{}: its event {} is not stored", delivery_name(*key), key.seq)),
            Some(webhooks) if !webhooks.contains(&key.webhook) => {
                problems.push(format!("{}: its event does not fan out to that webhook", delivery_name(*key)))
            }
            Some(_) => {}
        }
    }
    for (seq, webhooks) in &seen.events {
        for &webhook in webhooks {
            let key = DeliveryKey { seq: *seq, webhook };
            if !seen.deliveries.contains(&key) {
                problems.push(format!("event {seq}: its delivery to webhook {webhook} is not stored"));
            }
        }
    }
    for (at, key) in &seen.due {
        if seen.waiting.get(key) != Some(at) {
            problems
                .push(format!("due entry at {at} ms: {} is not waiting for that time", delivery_name(*key)));
        }
    }
    let in_range = |seq: u64| seen.ranges.iter().any(|&(first, last)| (first..=last).contains(&seq));
    for (key, at) in &seen.waiting {
        if !seen.due.contains(&(*at, *key)) && !in_range(key.seq) && !seen.set_aside.contains(key) {
            problems.push(format!("{}: waits for an attempt but is in no due index", delivery_name(*key)));
        }
    }
    let mut per_second = BTreeMap::<u64, u64>::new();
    for (at, _) in &seen.due {
        *per_second.entry(at / 1000).or_default() += 1;
    }
    let seconds: BTreeSet<u64> = per_second.keys().chain(seen.counted_due.keys()).copied().collect();
    for second in seconds {
        let (found, counted) = (per_second.get(&second), seen.counted_due.get(&second));
        if found != counted {
            problems.push(format!(
                "due count of second {second}: {} counted, {} entries",
                counted.unwrap_or(&0),
                found.unwrap_or(&0)
            ));
        }
    }
    for key in &seen.set_aside {
        if !seen.deliveries.contains(key) {
            problems.push(format!("set-aside entry for {}: no such delivery", delivery_name(*key)));
        }
    }
    let webhooks: BTreeSet<&Uuid> = seen.counts.keys().chain(seen.stats.keys()).collect();
    for webhook in webhooks {
        let stats = seen.stats.get(webhook);
        for status in Status::ALL {
            let counted = stats.map_or(0, |s| s.count(status));
            let found = seen.counts.get(webhook).map_or(0, |c| c[status.index()]);
            if counted != found {
                problems.push(format!(
                    "webhook {webhook}: its stats count {counted} {} deliveries, {found} are stored",
                    status.as_str()
                ));
            }
        }
    }
}

fn delivery_name(key: DeliveryKey) -> String {
    format!("delivery of event {} to webhook {}", key.seq, key.webhook)
}

/// A key as a human reads it: its kind letter, then hex.
fn describe(k: &[u8]) -> String {
    match k.split_first() {
        Some((kind, rest)) if kind.is_ascii_uppercase() => {
            format!("key {}{}", *kind as char, hex::encode(rest))
        }
        _ => format!("key {}", hex::encode(k)),
    }
}
