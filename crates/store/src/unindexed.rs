//! The unindexed deliveries, store side: new deliveries that get no due
//! entry (`Q`), and the `F` ranges that stand in for those entries on disk.
//! Other modules' comments on the subject point here.
//!
//! Why: a new delivery is handed to the dispatcher from the ingest's answer
//! and held in its memory, and most have their first outcome recorded
//! milliseconds later, which would delete the entry again; leaving out
//! those two writes and their `H` count changes cut the daemon's CPU per
//! event by about a tenth at full speed. What stands in for them: each
//! batch that stores new deliveries writes one `F first_seq` key holding
//! its last seq, covering its events, and the committer keeps the
//! deliveries in memory ([`Unindexed`]), each with its range, and per
//! range how many are left. So every delivery that waits for an attempt
//! has a due entry, is set aside (`Z`), or is covered by an open `F` range:
//! none is lost to a crash.
//!
//! A delivery stops being unindexed, in the batch that records it, at its
//! first outcome, a cancellation or hold, a set-aside, or when the
//! dispatcher *lets it go*: where its in-memory queue would drop an entry
//! (capacity, a webhook's held limit, beyond its cursor) it has the
//! committer index an unindexed one instead (`Op::Index`), which writes its
//! entry at the stored `next_attempt_at`. A range's `F` key goes in the
//! batch where the last of its deliveries stops being unindexed. Whatever
//! counts these deliveries cannot find them in the due index, so the
//! committer publishes how many there are and the oldest range ([`Gauge`])
//! for the reads that count what is due.
//!
//! At start, before the committer runs and anything reads the due index,
//! every delivery of a range the last run left open that still waits (and
//! is not set aside) gets its due entry, and the range goes, one range per
//! batch (`Committer::index_leftovers`, with [`left_open`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use uuid::Uuid;

use super::records::{seq_time_ms, DeliveryKey};
use super::{keys, StoreError};

/// What readers may know of the unindexed deliveries: they are due, but
/// not in the due index.
#[derive(Default)]
pub struct Gauge {
    count: AtomicUsize,
    /// The first seq of the oldest `F` range still open, 0 if none: about
    /// when the oldest of them was stored.
    oldest_seq: AtomicU64,
}

impl Gauge {
    /// How many deliveries are unindexed (all due).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed) as u64
    }

    /// About when the oldest unindexed delivery was stored (ms since the
    /// epoch), if there is one.
    pub fn oldest_ms(&self) -> Option<u64> {
        let oldest_seq = self.oldest_seq.load(Ordering::Relaxed);
        (oldest_seq > 0).then(|| seq_time_ms(oldest_seq).max(0) as u64)
    }
}

/// The committer's memory of the unindexed deliveries.
pub struct Unindexed {
    /// Each with the first seq of its `F` range.
    deliveries: HashMap<DeliveryKey, u64>,
    /// How many unindexed deliveries each `F` range (by first seq) still has.
    ranges: BTreeMap<u64, usize>,
    gauge: Arc<Gauge>,
}

/// What one batch does to the unindexed deliveries, gathered as its
/// requests are applied, so that later ones see earlier ones.
#[derive(Default)]
pub struct Changes {
    /// Deliveries of this batch's events, stored without a due entry.
    new: HashSet<DeliveryKey>,
    /// Deliveries that stopped being unindexed in this batch.
    settled: HashSet<DeliveryKey>,
}

impl Changes {
    /// A new delivery, stored in this batch without a due entry.
    pub fn stored(&mut self, key: DeliveryKey) {
        self.new.insert(key);
    }
}

/// A batch's [`Changes`] as the `F` keys it writes, kept until the batch
/// is applied ([`Unindexed::applied`]).
pub struct Written {
    settled: HashSet<DeliveryKey>,
    /// By first seq: unindexed deliveries left, for the ranges it touched.
    left: HashMap<u64, usize>,
    /// The range of the batch's own events, if any of their deliveries is
    /// still unindexed at its end: first seq and those deliveries.
    new: Option<(u64, HashSet<DeliveryKey>)>,
}

impl Unindexed {
    /// None yet; what the last run left is indexed before the committer
    /// runs. The committer keeps `gauge` up to date.
    pub fn new(gauge: Arc<Gauge>) -> Unindexed {
        Unindexed { deliveries: HashMap::new(), ranges: BTreeMap::new(), gauge }
    }

    /// Whether `key` has no due entry because it was never indexed; if so,
    /// it stops being unindexed with this batch (the caller gives it an
    /// entry, or it no longer needs one).
    pub fn settle(&self, c: &mut Changes, key: DeliveryKey) -> bool {
        let unindexed =
            !c.settled.contains(&key) && (self.deliveries.contains_key(&key) || c.new.contains(&key));
        if unindexed {
            c.settled.insert(key);
        }
        unindexed
    }

    /// The unindexed deliveries (as of `c`'s batch so far, settled or not)
    /// to `webhooks`, which have no due entry to find them by.
    pub fn to_webhooks<'a>(
        &'a self,
        c: &'a Changes,
        webhooks: &'a [Uuid],
    ) -> impl Iterator<Item = DeliveryKey> + 'a {
        let all = self.deliveries.keys().chain(&c.new);
        all.filter(|k| webhooks.contains(&k.webhook)).copied()
    }

    /// Adds to `batch` what `c` does to the `F` ranges: removes each range
    /// whose last unindexed delivery it settled, writes the range of its
    /// own events if it leaves any of theirs unindexed.
    pub fn write(&self, mut c: Changes, batch: &mut sled::Batch) -> Written {
        let mut left = HashMap::new();
        for key in &c.settled {
            if let Some(first) = self.deliveries.get(key) {
                *left.entry(*first).or_insert(self.ranges[first]) -= 1;
            }
        }
        for (first, left) in &left {
            if *left == 0 {
                batch.remove(&keys::fresh_range(*first)[..]);
            }
        }
        c.new.retain(|k| !c.settled.contains(k));
        let seqs = c.new.iter().map(|k| k.seq);
        let new = match (seqs.clone().min(), seqs.max()) {
            (Some(first), Some(last)) => {
                batch.insert(&keys::fresh_range(first)[..], &last.to_be_bytes()[..]);
                Some((first, c.new))
            }
            _ => None,
        };
        Written { settled: c.settled, left, new }
    }

    /// Takes in what a batch wrote, once it is applied (a batch that fails
    /// to apply leaves everything as it was).
    pub fn applied(&mut self, w: Written) {
        for key in &w.settled {
            self.deliveries.remove(key);
        }
        for (first, left) in w.left {
            match left {
                0 => self.ranges.remove(&first),
                n => self.ranges.insert(first, n),
            };
        }
        if let Some((first, new)) = w.new {
            self.ranges.insert(first, new.len());
            self.deliveries.extend(new.into_iter().map(|k| (k, first)));
        }
        self.gauge.count.store(self.deliveries.len(), Ordering::Relaxed);
        self.gauge.oldest_seq.store(self.ranges.keys().next().copied().unwrap_or(0), Ordering::Relaxed);
    }
}

/// The `F` ranges the last run left open, as first and last seq.
pub fn left_open(db: &sled::Db) -> Result<Vec<(u64, u64)>, StoreError> {
    db.scan_prefix([keys::FRESH_RANGE])
        .map(|kv| {
            let (k, v) = kv?;
            Ok((keys::u64_at(&k, 1), keys::u64_value(&k, &v)?))
        })
        .collect()
}
