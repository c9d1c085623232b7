//! The single writer. It drains waiting requests and applies them as one
//! atomic sled batch; a second thread, the syncer, flushes sled and
//! `fdatasync`s its data file and only then answers every request applied
//! before that flush began (group commit, pipelined: the next batch is built
//! while the previous one syncs). Being the only writer, the committer also
//! owns sequence numbering, the `event_id` uniqueness check and the
//! read-modify-write of deliveries, webhook stats and the per-second counts
//! of the due index, all without locks.
//!
//! A new delivery gets no due entry (`Q`) but is *unindexed*, covered by its
//! batch's `F` range: why, and the rules the committer keeps for it, are in
//! [`unindexed`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock, RwLock};

use uuid::Uuid;

use super::copy::{self, Copied};
use super::durable::{Mark, Syncer};
use super::records::*;
use super::unindexed::{self, Unindexed};
use super::{codec, keys, Pruned, StoreError};
use crate::clock;

/// About how many writes one batch takes before it is applied (the request
/// that crosses it still goes in). sled keeps every node copy a batch makes
/// until the batch ends, and the allocator keeps that peak, so this bound
/// sets the daemon's memory under fan-out and backlog; the figures behind
/// 256 are in BENCHMARKS.md ("Fanout memory", and session 4's item 7).
const MAX_BATCH_WRITES: usize = 256;

/// A request to the committer, carrying the callback its answer goes to,
/// typed by what the request answers.
pub enum Request {
    /// A write, applied with whatever else is waiting as one batch.
    Write(Op),
    /// Copy the whole store, as every batch before has left it, into a new
    /// store directory at this path: a turn of its own, between two batches.
    Backup(PathBuf, Then<Copied>),
}

/// The writes a batch is made of, each with its callback.
pub enum Op {
    Ingest(NewEvent, Then<Ingested>),
    /// Answers the webhook's pause if this outcome paused it.
    Record(Outcome, Then<Option<Paused>>),
    /// Pause the webhook (`Some`) or make it active; answers the pause it
    /// had before.
    SetPaused(Uuid, Option<Paused>, Then<Option<Paused>>),
    /// Queue these deliveries for an attempt now, if their status is in `from`.
    Requeue {
        keys: Vec<DeliveryKey>,
        from: &'static [Status],
        then: Then<Vec<Due>>,
    },
    /// Stop these deliveries, and the unindexed ones of these webhooks, if
    /// they are still waiting for an attempt: `to` is `Held` (their webhook
    /// is gone for now) or `Cancelled` (which also ends held ones).
    Stop {
        keys: Vec<DeliveryKey>,
        webhooks: Vec<Uuid>,
        to: Status,
        then: Then<usize>,
    },
    /// Delete these events, where every delivery of one is final; stops
    /// early, after a whole event, once it has made a batch's writes.
    Prune(Vec<u64>, Then<Pruned>),
    /// Take this entry out of the due index and note it in the set-aside list.
    SetAside(Due, Then<()>),
    /// Give these deliveries their due entries if they are still unindexed;
    /// answers the entry of every one still waiting.
    Index(Vec<DeliveryKey>, Then<Vec<Due>>),
}

/// Called once with the request's answer: after its batch is on disk, or
/// with the error that kept it from being applied or synced.
pub type Then<T> = Box<dyn FnOnce(Result<T, StoreError>) + Send>;

/// An applied request's answer bound to its callback, given once its batch's
/// sync is over: `None` if the sync succeeded, else its error, which every
/// request the sync covered gets instead of its own answer.
type Answer = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// Whether the op was applied (so it takes its share of free space), and
/// its answer.
fn applied<T: Send + 'static>(result: Result<T, StoreError>, then: Then<T>) -> (bool, Answer) {
    (result.is_ok(), answer(result, then))
}

/// `result` as the answer `then` gets once the batch is synced. The one
/// allocation the committer adds to a request (its caller's callback is the
/// other): typed answers of every kind wait in one list, in order.
fn answer<T: Send + 'static>(result: Result<T, StoreError>, then: Then<T>) -> Answer {
    Box::new(move |failed| {
        then(match failed {
            Some(e) => Err(e.clone()),
            None => result,
        })
    })
}

impl From<Op> for Request {
    fn from(op: Op) -> Request {
        Request::Write(op)
    }
}

impl Request {
    /// Answers `e` at once, applying nothing (the committer is gone).
    pub fn refuse(self, e: StoreError) {
        match self {
            Request::Backup(_, then) => then(Err(e)),
            Request::Write(op) => op.refused(e)(None),
        }
    }
}

impl Op {
    /// About how many keys this op writes (pruning: at least).
    fn writes(&self) -> usize {
        match self {
            // The event, then per webhook its delivery and (once a batch) its stats.
            Op::Ingest(e, _) => 2 + 2 * e.record.webhooks.len(),
            Op::Record(..) | Op::SetAside(..) => 2,
            Op::SetPaused(..) => 1,
            Op::Requeue { keys, .. } | Op::Stop { keys, .. } | Op::Index(keys, _) => 2 * keys.len(),
            Op::Prune(seqs, _) => (2 * seqs.len()).min(MAX_BATCH_WRITES),
        }
    }

    /// This op's answer when it is not applied: `e`.
    fn refused(self, e: StoreError) -> Answer {
        match self {
            Op::Ingest(_, then) => answer(Err(e), then),
            Op::Record(_, then) | Op::SetPaused(_, _, then) => answer(Err(e), then),
            Op::SetAside(_, then) => answer(Err(e), then),
            Op::Requeue { then, .. } | Op::Index(_, then) => answer(Err(e), then),
            Op::Stop { then, .. } => answer(Err(e), then),
            Op::Prune(_, then) => answer(Err(e), then),
        }
    }
}

/// What sled may put on disk for one written key beyond its value: the key,
/// the log record's header, and the share of a rewritten index node.
const DISK_BYTES_PER_WRITE: u64 = 512;
/// What sled may put on disk for an attempt's outcome: the attempt (at most
/// 4 KiB of answer, a short error) in a delivery record that is rewritten
/// whole, with every earlier attempt.
const DISK_BYTES_PER_OUTCOME: u64 = 64 * 1024;
/// Disk bytes per byte of value: sled writes a value once into its log, and
/// again when the node holding it is consolidated or its segment cleaned,
/// before the old copy's space comes back; a big value also goes to a blob
/// file of its own.
const DISK_AMPLIFICATION: u64 = 3;

impl Op {
    /// A bound on the disk bytes applying this op may take (before sled
    /// reclaims anything), for the free-space check of each write.
    fn disk_bytes(&self) -> u64 {
        let values = match self {
            Op::Ingest(e, _) => {
                let r = &e.record;
                (r.data.len() + 256 + 64 * r.webhooks.len()) as u64
            }
            Op::Record(..) => DISK_BYTES_PER_OUTCOME,
            _ => 0,
        };
        values * DISK_AMPLIFICATION + self.writes() as u64 * DISK_BYTES_PER_WRITE
    }
}

pub struct Committer {
    pub db: sled::Db,
    pub last_seq: u64,
    /// The storage directory, to check its free space before each batch.
    pub dir: PathBuf,
    /// Ingest is refused below this many free bytes; other writes (attempt
    /// outcomes, redelivery, pruning) below a quarter of it. sled must never
    /// meet a full disk itself: after a failed write it stops answering.
    pub min_free: u64,
    /// Every webhook's stats, loaded on first use and written with each batch.
    pub stats: HashMap<Uuid, WebhookStats>,
    /// Due-index entries per second of due time, loaded on first use and
    /// written with each batch; a second is forgotten once it holds none.
    pub due_counts: HashMap<u64, u64>,
    /// The new deliveries without a due entry (see [`unindexed`]).
    pub unindexed: Unindexed,
    /// Batches applied so far and the last event seq, written as `C` with
    /// each batch (see `durable`).
    pub mark: Mark,
    pub liveness: Arc<super::Liveness>,
    pub failure: Failure,
    /// The paused webhooks, for readers that must not wait for sled.
    pub paused: Arc<PausedWebhooks>,
    /// Deliveries set aside in this run, by either path (a worker's that
    /// could not load one, or the committer's own reads).
    pub set_aside_count: Arc<AtomicU64>,
}

/// The paused webhooks as the committer last changed them, for readers on
/// any thread (the delivery workers ask before each attempt): a lock held
/// for a lookup, never across a sled call.
#[derive(Default)]
pub struct PausedWebhooks(RwLock<HashMap<Uuid, Paused>>);

impl PausedWebhooks {
    pub fn get(&self, webhook: &Uuid) -> Option<Paused> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(webhook).copied()
    }

    pub fn all(&self) -> HashMap<Uuid, Paused> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, webhook: Uuid, paused: Option<Paused>) {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        match paused {
            Some(p) => map.insert(webhook, p),
            None => map.remove(&webhook),
        };
    }
}

/// The first failure sled does not come back from, shared by the committer
/// and the syncer: reported once (`Options::on_failure`), then every
/// request is refused with it, never applied or synced.
#[derive(Clone)]
pub struct Failure {
    pub first: Arc<OnceLock<StoreError>>,
    pub report: fn(&str, &StoreError),
}

impl Failure {
    fn happened(&self, what: &str, e: &StoreError) {
        if self.first.set(e.clone()).is_ok() {
            tracing::error!(error = %e, "{what}; stopping, so that a fresh start reads what is on disk");
            (self.report)(what, e);
        }
    }
}

/// Writes of one batch, readable before they are applied so that later
/// requests in the same batch see earlier ones.
#[derive(Default)]
struct Pending {
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Webhooks whose stats changed in this batch.
    stats: HashSet<Uuid>,
    /// Seconds whose due count changed in this batch.
    due_counts: HashSet<u64>,
    /// What this batch did to the unindexed deliveries.
    unindexed: unindexed::Changes,
}

impl Pending {
    fn insert(&mut self, key: &[u8], value: Vec<u8>) {
        self.overlay.insert(key.to_vec(), Some(value));
    }

    fn remove(&mut self, key: &[u8]) {
        self.overlay.insert(key.to_vec(), None);
    }

    fn get(&self, db: &sled::Db, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(db.get(key)?.map(|v| v.to_vec())),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        db: &sled::Db,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        self.get(db, key)?.map(|v| codec::decode(key, &v)).transpose()
    }
}

impl Committer {
    /// Applies requests until every sender is gone; the syncer thread makes
    /// each applied batch durable with `syncer` before it is answered.
    pub fn run(mut self, rx: mpsc::Receiver<Request>, syncer: Syncer) {
        let (to_sync, applied) = mpsc::sync_channel(SYNC_QUEUE);
        let db = self.db.clone();
        let failure = self.failure.clone();
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("syncer".into())
                .spawn_scoped(scope, move || sync_loop(db, syncer, applied, failure))
                .expect("spawn the syncer");
            // A backup met while gathering a batch waits for the next turn.
            let mut held_back: Option<Request> = None;
            while let Some(first) = held_back.take().or_else(|| rx.recv().ok()) {
                let first = match first {
                    Request::Backup(to, then) => {
                        // Every batch before is applied (if not yet synced: the
                        // copy syncs itself); none after is, until this returns.
                        let copied = match self.failure.first.get() {
                            Some(e) => Err(e.clone()),
                            None => copy::copy(&self.db, &to, &self.liveness.copied),
                        };
                        if let Err(e) = &copied {
                            tracing::error!(error = %e, to = %to.display(), "backup failed");
                        }
                        then(copied);
                        continue;
                    }
                    Request::Write(op) => op,
                };
                let mut writes = first.writes();
                let mut ops = vec![first];
                while writes < MAX_BATCH_WRITES {
                    match rx.try_recv() {
                        Ok(Request::Write(op)) => {
                            writes += op.writes();
                            ops.push(op);
                        }
                        Ok(backup) => {
                            held_back = Some(backup);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let answers = self.commit(ops);
                if let Err(mpsc::SendError((answers, _))) = to_sync.send((answers, self.mark)) {
                    let gone = StoreError::Unavailable("the syncer is gone".into());
                    for answer in answers {
                        answer(Some(&gone));
                    }
                }
            }
            drop(to_sync);
        });
    }

    /// Applies `ops` as one batch; returns their answers, to be given once
    /// the batch is synced.
    fn commit(&mut self, ops: Vec<Op>) -> Vec<Answer> {
        if let Some(e) = self.failure.first.get() {
            return ops.into_iter().map(|op| op.refused(e.clone())).collect();
        }
        let mut p = Pending::default();
        let seq_before = self.last_seq;
        // Each write must fit on its own, counting what the batch has taken
        // so far: one check per batch with a fixed margin let eight 900 KB
        // events overshoot a 4 MiB margin together, and sled wedges on ENOSPC.
        let mut free = free_bytes(&self.dir);
        let answers: Vec<_> = ops
            .into_iter()
            .map(|op| {
                let floor = if matches!(op, Op::Ingest(..)) { self.min_free } else { self.min_free / 4 };
                let takes = op.disk_bytes();
                let (applied, answer) = match room(free, floor.saturating_add(takes)) {
                    Ok(()) => self.apply(&mut p, op),
                    Err(e) => (false, op.refused(e)),
                };
                if applied {
                    free = free.map(|f| f.saturating_sub(takes));
                }
                answer
            })
            .collect();
        match self.write(p) {
            Ok(()) => answers,
            Err(e) => {
                // Nothing of this batch is applied or acknowledged. But sled
                // is unusable after a failed write: seen with ENOSPC, its
                // next flush waits forever, and so would every request after
                // it. Refuse this batch and report: the daemon stops, and
                // systemd starts it again, on what is on disk.
                self.last_seq = seq_before;
                for answer in answers {
                    answer(Some(&e));
                }
                self.failure.happened("storage write failed", &e);
                Vec::new()
            }
        }
    }

    /// Applies `p` as one sled batch, with the stats, due counts and `F`
    /// ranges it changed; on failure, forgets those changes.
    fn write(&mut self, p: Pending) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for w in &p.stats {
            batch.insert(&keys::stats(w)[..], codec::encode(&self.stats[w]));
        }
        for second in &p.due_counts {
            match self.due_counts[second] {
                0 => batch.remove(&keys::due_count(*second)[..]),
                n => batch.insert(&keys::due_count(*second)[..], &n.to_be_bytes()[..]),
            }
        }
        let ranges = self.unindexed.write(p.unindexed, &mut batch);
        for (k, v) in p.overlay {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        let mark = Mark { commits: self.mark.commits + 1, last_seq: self.last_seq };
        batch.insert(&keys::MARK[..], &mark.encode()[..]);
        if let Err(e) = self.db.apply_batch(batch) {
            let e = StoreError::from(e);
            tracing::error!(error = %e, "storage write failed");
            for w in &p.stats {
                self.stats.remove(w);
            }
            for second in &p.due_counts {
                self.due_counts.remove(second);
            }
            return Err(e);
        }
        self.mark = mark;
        // Only this batch's seconds can have dropped to none: a walk of the
        // whole map per batch would cost as many seconds as retries wait in.
        for second in &p.due_counts {
            if self.due_counts.get(second) == Some(&0) {
                self.due_counts.remove(second);
            }
        }
        self.unindexed.applied(ranges);
        Ok(())
    }

    /// Gives every delivery that the last run left unindexed its due entry,
    /// one `F` range per batch; returns how many. Called once, before the
    /// committer runs (see [`unindexed`]).
    pub fn index_leftovers(&mut self) -> Result<usize, StoreError> {
        let mut indexed = 0;
        for (first, last) in unindexed::left_open(&self.db)? {
            // sled must not meet a full disk, here either.
            room(free_bytes(&self.dir), self.min_free / 4)?;
            let mut p = Pending::default();
            for kv in self.db.range(keys::event(first)..=keys::event(last)) {
                let (k, v) = kv?;
                let seq = keys::u64_at(&k, 1);
                let webhooks = match codec::decode::<EventRecord>(&k, &v) {
                    Ok(event) => event.webhooks,
                    // Its deliveries are found through every webhook that has
                    // stats; their attempts will find the event unreadable and
                    // set them aside.
                    Err(_) => self.known_webhooks()?,
                };
                for webhook in webhooks {
                    let key = DeliveryKey { seq, webhook };
                    let Some(due) = self.waiting_entry(&mut p, key)? else { continue };
                    if self.db.get(keys::due(due))?.is_none() {
                        self.add_due(&mut p, due)?;
                        indexed += 1;
                    }
                }
            }
            p.remove(&keys::fresh_range(first));
            self.write(p)?;
        }
        Ok(indexed)
    }

    /// Every webhook that ever had a delivery (each has a `W` key).
    fn known_webhooks(&self) -> Result<Vec<Uuid>, StoreError> {
        let keys = self.db.scan_prefix([keys::STATS]).keys();
        keys.map(|k| Ok(Uuid::from_slice(&k?[1..]).expect("16 bytes after the prefix"))).collect()
    }

    /// Applies `op` to `p`; whether it was applied, and its answer.
    fn apply(&mut self, p: &mut Pending, op: Op) -> (bool, Answer) {
        match op {
            Op::Ingest(ev, then) => applied(self.ingest(p, ev), then),
            Op::Record(o, then) => applied(self.record(p, o), then),
            Op::SetPaused(webhook, paused, then) => applied(self.set_paused(p, webhook, paused), then),
            Op::Requeue { keys, from, then } => applied(self.requeue(p, keys, from), then),
            Op::Stop { mut keys, webhooks, to, then } => {
                keys.extend(self.unindexed.to_webhooks(&p.unindexed, &webhooks));
                applied(self.stop(p, keys, to), then)
            }
            Op::Prune(seqs, then) => applied(self.prune(p, seqs), then),
            Op::Index(keys, then) => applied(self.index(p, keys), then),
            Op::SetAside(due, then) => applied(self.set_aside(p, due), then),
        }
    }

    fn set_aside(&mut self, p: &mut Pending, due: Due) -> Result<(), StoreError> {
        // The dispatcher's entry may be stale (gone from the index).
        if !self.unindexed.settle(&mut p.unindexed, due.key) && p.get(&self.db, &keys::due(due))?.is_some() {
            self.remove_due(p, due)?;
        }
        self.note_set_aside(p, due.key, due.at_ms)
    }

    /// Lists `key` under `Z`, counting it if it was not there yet.
    fn note_set_aside(&mut self, p: &mut Pending, key: DeliveryKey, at_ms: u64) -> Result<(), StoreError> {
        if p.get(&self.db, &keys::set_aside(key))?.is_none() {
            self.set_aside_count.fetch_add(1, Ordering::Relaxed);
        }
        p.insert(&keys::set_aside(key), at_ms.to_be_bytes().to_vec());
        Ok(())
    }

    fn next_seq(&mut self) -> u64 {
        // Milliseconds in the high bits keep keys time-ordered across restarts;
        // the low 16 bits number events within a millisecond.
        self.last_seq = (self.last_seq + 1).max(first_seq_at(clock::now_ms()));
        self.last_seq
    }

    fn ingest(&mut self, p: &mut Pending, ev: NewEvent) -> Result<Ingested, StoreError> {
        let NewEvent { mut record, id_given } = ev;
        if id_given {
            if let Some(stored) = self.stored_event(p, &record.event_id)? {
                let same = same_content(&stored, &record);
                return Ok(if same { Ingested::Duplicate } else { Ingested::Conflict });
            }
        }
        let seq = self.next_seq();
        if id_given {
            p.insert(&keys::index(&record.event_id), seq.to_be_bytes().to_vec());
        } else {
            // Found through its own sequence number: no index entry to write.
            record.event_id = event_id_for(seq);
        }
        let now = clock::now_ms();
        p.insert(&keys::event(seq), codec::encode(&record));
        let mut due = Vec::with_capacity(record.webhooks.len());
        for &webhook in &record.webhooks {
            let key = DeliveryKey { seq, webhook };
            // A paused webhook's new delivery is held at once: never due,
            // it spends none of the webhook's rate and waits with the
            // others for the resume, which sends them oldest first.
            let held = self.paused.get(&webhook).is_some();
            let (status, next_attempt_at) =
                if held { (Status::Held, None) } else { (Status::Pending, Some(now)) };
            let record = DeliveryRecord {
                webhook_id: webhook,
                status,
                next_attempt_at,
                attempts: Vec::new(),
                round_start: 0,
            };
            p.insert(&keys::delivery(key), codec::encode(&record));
            if !held {
                p.unindexed.stored(key);
                due.push(Due { at_ms: now.max(0) as u64, key });
            }
            self.update_stats(p, &webhook, |s| s.moved(None, Some(status)))?;
        }
        Ok(Ingested::Accepted { event: Arc::new(record), due })
    }

    /// The stored event with this id, whichever way it is found: through its
    /// embedded sequence number (daemon-made ids) or the index.
    fn stored_event(&self, p: &Pending, id: &Uuid) -> Result<Option<EventRecord>, StoreError> {
        if let Some(seq) = seq_in_event_id(id) {
            let own: Option<EventRecord> = p.decode(&self.db, &keys::event(seq))?;
            if let Some(e) = own.filter(|e| e.event_id == *id) {
                return Ok(Some(e));
            }
        }
        let Some(seq) = p.get(&self.db, &keys::index(id))? else { return Ok(None) };
        // Stored data: a short value is an error for this request, never a
        // panic of the only writer.
        let seq = keys::u64_value(&keys::index(id), &seq)?;
        p.decode(&self.db, &keys::event(seq))?.map(Some).ok_or_else(|| StoreError::Corrupt {
            key: format!("event {seq}"),
            reason: "index points at nothing".into(),
        })
    }

    /// Records an attempt's outcome and counts it in its webhook's health;
    /// answers the webhook's pause if this outcome paused it. A delivery of
    /// a paused webhook that still waits is held instead of retried.
    fn record(&mut self, p: &mut Pending, o: Outcome) -> Result<Option<Paused>, StoreError> {
        let Outcome { key, attempt, mut status, mut next_attempt_at, pause } = o;
        let now = clock::now_ms();
        let mut newly = None;
        if let Some(a) = &attempt {
            let failure = if status == Status::Succeeded { Ok(()) } else { Err(a.error.clone()) };
            let at = a.started_at_ms;
            let was_paused = self.stats_of(&key.webhook)?.paused.is_some();
            self.update_stats(p, &key.webhook, |s| {
                s.attempted(at, failure);
                // The run's length is measured to this attempt's start.
                if let Some(reason) = pause.and_then(|rule| s.pauses(rule, at)).filter(|_| !was_paused) {
                    let paused = Paused { reason, at_ms: now };
                    s.paused = Some(paused);
                    newly = Some(paused);
                }
            })?;
            if let Some(paused) = newly {
                self.paused.set(key.webhook, Some(paused));
            }
        }
        if !status.is_final() && self.stats_of(&key.webhook)?.paused.is_some() {
            (status, next_attempt_at) = (Status::Held, None);
        }
        self.update_delivery(p, key, |r| {
            r.attempts.extend(attempt);
            // Cancelled while its attempt was in flight: the attempt is
            // kept, and a success recorded, but it is not retried.
            if !(r.status == Status::Cancelled && status != Status::Succeeded) {
                r.status = status;
                r.next_attempt_at = next_attempt_at;
            }
            true
        })?;
        Ok(newly)
    }

    /// Pauses a webhook or makes it active; answers its pause before.
    fn set_paused(
        &mut self,
        p: &mut Pending,
        webhook: Uuid,
        paused: Option<Paused>,
    ) -> Result<Option<Paused>, StoreError> {
        let before = self.stats_of(&webhook)?.paused;
        // Pausing again keeps the first reason and time.
        let after = paused.map(|p| before.unwrap_or(p));
        if after != before {
            self.update_stats(p, &webhook, |s| s.paused = after)?;
            self.paused.set(webhook, after);
        }
        Ok(before)
    }

    fn requeue(
        &mut self,
        p: &mut Pending,
        keys: Vec<DeliveryKey>,
        from: &[Status],
    ) -> Result<Vec<Due>, StoreError> {
        let now = clock::now_ms();
        let mut due = Vec::new();
        for key in keys {
            let changed = self.update_delivery(p, key, |r| {
                if !from.contains(&r.status) {
                    return false;
                }
                r.status = Status::Pending;
                r.next_attempt_at = Some(now);
                r.round_start = r.attempts.len() as u32;
                true
            })?;
            if changed {
                due.push(Due { at_ms: now.max(0) as u64, key });
            }
        }
        Ok(due)
    }

    /// Indexes those of `keys` still unindexed, and answers the due entry
    /// of every one still waiting, indexed just now or before (the caller
    /// let go of them all, and an entry it missed meanwhile may lie behind
    /// its window).
    fn index(&mut self, p: &mut Pending, keys: Vec<DeliveryKey>) -> Result<Vec<Due>, StoreError> {
        let mut due = Vec::new();
        for key in keys {
            let entry = self.waiting_entry(p, key)?;
            let unindexed = self.unindexed.settle(&mut p.unindexed, key);
            let Some(entry) = entry else { continue };
            if unindexed {
                self.add_due(p, entry)?;
            }
            due.push(entry);
        }
        Ok(due)
    }

    /// The due entry a delivery should have: `None` if it is not waiting
    /// for an attempt, gone, or set aside (now, if its record cannot be read:
    /// it is kept and counted under `Z`, as a dispatcher would).
    fn waiting_entry(&mut self, p: &mut Pending, key: DeliveryKey) -> Result<Option<Due>, StoreError> {
        let record = match p.decode::<DeliveryRecord>(&self.db, &keys::delivery(key)) {
            Ok(record) => record,
            Err(e @ StoreError::Corrupt { .. }) => {
                tracing::error!(error = %e, seq = key.seq, webhook_id = %key.webhook, "cannot read a waiting delivery; setting it aside");
                self.note_set_aside(p, key, 0)?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if p.get(&self.db, &keys::set_aside(key))?.is_some() {
            return Ok(None);
        }
        let at = record.and_then(|d| d.next_attempt_at.filter(|_| !d.status.is_final()));
        Ok(at.map(|at| Due { at_ms: at.max(0) as u64, key }))
    }

    fn stop(&mut self, p: &mut Pending, keys: Vec<DeliveryKey>, to: Status) -> Result<usize, StoreError> {
        let mut n = 0;
        for key in keys {
            let changed = self.update_delivery(p, key, |r| {
                if r.status.is_final() || r.status == to {
                    return false;
                }
                r.status = to;
                r.next_attempt_at = None;
                true
            })?;
            n += changed as usize;
        }
        Ok(n)
    }

    fn prune(&mut self, p: &mut Pending, seqs: Vec<u64>) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned { deleted: 0, through: 0 };
        let mut writes = 0;
        for seq in seqs {
            if writes >= MAX_BATCH_WRITES {
                break;
            }
            pruned.through = seq;
            let Some(event) = p.decode::<EventRecord>(&self.db, &keys::event(seq))? else { continue };
            let mut deliveries = Vec::with_capacity(event.webhooks.len());
            for &webhook in &event.webhooks {
                let key = DeliveryKey { seq, webhook };
                if let Some(d) = p.decode::<DeliveryRecord>(&self.db, &keys::delivery(key))? {
                    deliveries.push((key, d));
                }
            }
            if !deliveries.iter().all(|(_, d)| d.status.is_settled()) {
                continue;
            }
            writes += 2 + deliveries.len();
            for (key, d) in deliveries {
                p.remove(&keys::delivery(key));
                self.update_stats(p, &key.webhook, |s| s.moved(Some(d.status), None))?;
            }
            if seq_in_event_id(&event.event_id) != Some(seq) {
                p.remove(&keys::index(&event.event_id));
            }
            p.remove(&keys::event(seq));
            pruned.deleted += 1;
        }
        Ok(pruned)
    }

    /// Loads a delivery and lets `change` edit it (returning whether it did);
    /// keeps its due entry and its webhook's status counts in step.
    fn update_delivery(
        &mut self,
        p: &mut Pending,
        key: DeliveryKey,
        change: impl FnOnce(&mut DeliveryRecord) -> bool,
    ) -> Result<bool, StoreError> {
        let dkey = keys::delivery(key);
        let mut record: DeliveryRecord =
            p.decode(&self.db, &dkey)?.ok_or(StoreError::UnknownDelivery(key))?;
        let (old_status, old_next) = (record.status, record.next_attempt_at);
        if !change(&mut record) {
            return Ok(false);
        }
        if old_next != record.next_attempt_at {
            let due = |at: i64| Due { at_ms: at.max(0) as u64, key };
            if let Some(at) = old_next {
                if !self.unindexed.settle(&mut p.unindexed, key) {
                    self.remove_due(p, due(at))?;
                }
            }
            if let Some(at) = record.next_attempt_at {
                self.add_due(p, due(at))?;
            }
        }
        p.insert(&dkey, codec::encode(&record));
        if old_status != record.status {
            self.update_stats(p, &key.webhook, |s| s.moved(Some(old_status), Some(record.status)))?;
        }
        Ok(true)
    }

    /// Adds `d` to the due index (and to its second's count).
    fn add_due(&mut self, p: &mut Pending, d: Due) -> Result<(), StoreError> {
        p.insert(&keys::due(d), Vec::new());
        *self.due_count(p, d.at_ms / 1000)? += 1;
        Ok(())
    }

    /// Takes `d`, which must be there, out of the due index.
    fn remove_due(&mut self, p: &mut Pending, d: Due) -> Result<(), StoreError> {
        p.remove(&keys::due(d));
        let n = self.due_count(p, d.at_ms / 1000)?;
        *n = n.saturating_sub(1);
        Ok(())
    }

    fn due_count(&mut self, p: &mut Pending, second: u64) -> Result<&mut u64, StoreError> {
        if !self.due_counts.contains_key(&second) {
            let key = keys::due_count(second);
            let stored = self.db.get(key)?.map(|v| keys::u64_value(&key, &v)).transpose()?.unwrap_or(0);
            self.due_counts.insert(second, stored);
        }
        p.due_counts.insert(second);
        Ok(self.due_counts.get_mut(&second).expect("just loaded"))
    }

    fn update_stats(
        &mut self,
        p: &mut Pending,
        webhook: &Uuid,
        change: impl FnOnce(&mut WebhookStats),
    ) -> Result<(), StoreError> {
        self.stats_of(webhook)?;
        change(self.stats.get_mut(webhook).expect("just loaded"));
        p.stats.insert(*webhook);
        Ok(())
    }

    /// A webhook's stats as the batch so far leaves them, loaded on first use.
    fn stats_of(&mut self, webhook: &Uuid) -> Result<&WebhookStats, StoreError> {
        if !self.stats.contains_key(webhook) {
            let key = keys::stats(webhook);
            let stored = self.db.get(key)?.map(|v| codec::decode(&key, &v)).transpose()?;
            self.stats.insert(*webhook, stored.unwrap_or_default());
        }
        Ok(&self.stats[webhook])
    }
}

/// Applied batches that may wait for the syncer: none. The committer hands
/// a batch over as the syncer starts its next sync, so it is never more than
/// one batch ahead, and what arrives meanwhile waits for it and goes into
/// one bigger batch. Each `apply_batch` costs sled IO-buffer writes of its
/// own, so fewer, bigger batches cost less: measured against a queue of 16
/// in BENCHMARKS.md ("What changed in session 4", the rendezvous).
const SYNC_QUEUE: usize = 0;

/// Syncs and answers: every batch waiting when a sync begins is covered by
/// it, and the ledger records the last of them (`mark`) once it is durable.
/// A failed sync fails every request it covered, and is reported so that
/// the daemon stops (systemd starts it again). What a failed `fdatasync` left on disk is
/// unknown, while the batches it covered are applied in memory: going on
/// would serve state that may not be on disk (a retried event_id found as a
/// duplicate though it was never stored) and leave applied deliveries that
/// nobody was told of. A fresh start reads back only what is on disk and
/// indexes what waits.
fn sync_loop(
    db: sled::Db,
    mut syncer: Syncer,
    applied: mpsc::Receiver<(Vec<Answer>, Mark)>,
    failure: Failure,
) {
    while let Ok((first, mut mark)) = applied.recv() {
        let mut answers = first;
        while let Ok((more, later)) = applied.try_recv() {
            answers.extend(more);
            mark = later;
        }
        let synced = match failure.first.get() {
            Some(e) => Err(e.clone()),
            None => syncer.sync(&db, mark),
        };
        for answer in answers {
            answer(synced.as_ref().err());
        }
        if let Err(e) = synced {
            failure.happened("storage sync failed", &e);
        }
    }
}

/// Whether `free` bytes (if known) leave the `needed` room for a write.
pub(super) fn room(free: Option<u64>, needed: u64) -> Result<(), StoreError> {
    match free {
        Some(free) if free < needed => Err(StoreError::DiskFull { free, needed }),
        _ => Ok(()),
    }
}

/// Free bytes for unprivileged writers on the filesystem holding `dir`.
pub(super) fn free_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether a repeated event_id carries the same event. `data` is compared as
/// JSON values (key order and spacing do not matter) when both parse as
/// such, and byte for byte otherwise: JSON that serde_json cannot represent
/// (`1e400`, a lone surrogate `"\ud800"`) must never make two different
/// payloads look alike. The timestamp counts only when both requests gave one.
pub fn same_content(a: &EventRecord, b: &EventRecord) -> bool {
    let data = |r: &EventRecord| serde_json::from_str::<serde_json::Value>(&r.data).ok();
    let same_data = match (data(a), data(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a.data == b.data,
    };
    a.event_type == b.event_type
        && a.client_id == b.client_id
        && a.test == b.test
        && (!a.timestamp_given || !b.timestamp_given || a.timestamp_ms == b.timestamp_ms)
        && same_data
}
