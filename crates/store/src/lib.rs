//! Durable state: one sled database, written only by one committer thread.
//!
//! Every mutation is a request to the [`committer`], which applies whatever
//! requests are waiting as one atomic batch and answers only after flush and
//! `fdatasync` (group commit). An answer therefore means "on disk", which is
//! what lets the API acknowledge an event. Reads go straight to sled, but
//! never on the async runtime's threads: a sled call can block (behind a
//! batch being applied, or for good once a failing disk wedges sled), and a
//! runtime thread stuck in one would stall the HTTP server, timers and
//! signal handling with it. So the reads are methods of [`Reader`], not of
//! [`Store`]: async code reads through [`Store::read`], which runs a closure
//! on tokio's blocking pool; a plain thread of its own (a delivery worker)
//! uses [`Store::reader`]. The keyspace is described in [`keys`]; values go
//! through [`codec`].
//!
//! This module knows nothing of HTTP, configuration or scheduling policy.

#![forbid(unsafe_code)]

mod check;
mod codec;
mod committer;
mod copy;
mod durable;
mod keys;
mod records;
mod unindexed;

use nexor_webhookd_core::{clock, event};

use std::fs::File;

use rustix::fs::{flock, FlockOperation};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use uuid::Uuid;

pub use check::check_storage;
use committer::{Committer, Failure, Op, PausedWebhooks, Request, Then};
pub use copy::Copied;
pub use records::*;
use unindexed::Unindexed;

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another nexor-webhookd is already using the storage directory {0}")]
    Locked(PathBuf),
    #[error("storage cannot take writes: {0}")]
    Unavailable(String),
    #[error("stored record {key} cannot be decoded: {reason}")]
    Corrupt { key: String, reason: String },
    /// sled found a damaged page when it read it (it reads pages lazily,
    /// so a zeroed segment can pass its open and show here).
    #[error("sled read damaged data: {0}")]
    SledCorruption(String),
    #[error("no delivery {0:?}")]
    UnknownDelivery(DeliveryKey),
    #[error("the disk holding storage is nearly full ({free} bytes free, {needed} needed); free some space")]
    DiskFull { free: u64, needed: u64 },
    #[error("storage is shut down")]
    Closed,
    /// A backup or restore target that cannot take a copy.
    #[error("{0}")]
    Target(String),
    #[error(
        "the storage directory {path} holds {found}, but this build reads layout {}; \
         start it with the build that wrote it, or move the directory aside",
        keys::LAYOUT_VERSION
    )]
    Layout { path: PathBuf, found: String },
    #[error(
        "the storage directory {path} is damaged: {detail}. The daemon changed nothing (sled's recovery \
         cut its log at the damage, as any open does); restore a backup, or start with \
         --accept-data-loss to run on what is left"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error(
        "the storage directory {path} is damaged: sled cannot read it ({detail}). The daemon changed \
         nothing; restore a backup, or move the directory aside to start empty"
    )]
    Unreadable { path: PathBuf, detail: String },
}

/// How to open the store.
pub struct Options {
    pub cache_capacity: u64,
    /// Ingest is refused while the disk has less free space than this.
    pub min_free_space: u64,
    /// Open a store that holds less than was acknowledged (logging what is
    /// missing) instead of refusing it.
    pub accept_data_loss: bool,
    /// Called once, from the store's own thread, when storage fails in a way
    /// sled does not come back from: a failed write or sync. Nothing the
    /// failure covered was acknowledged, but the batches it covered may be
    /// applied in memory and not on disk, so only a fresh start (which reads
    /// the disk) knows what to serve: the daemon ends the process here. If
    /// it returns, the store refuses every request from then on.
    pub on_failure: fn(what: &str, e: &StoreError),
}

impl StoreError {
    /// Damage met while reading the whole of the store under `path`, as
    /// the one line that names it; other errors as they are.
    fn found_in(self, path: &Path) -> StoreError {
        match self {
            StoreError::SledCorruption(_) | StoreError::Corrupt { .. } => {
                StoreError::Unreadable { path: path.to_owned(), detail: self.to_string() }
            }
            e => e,
        }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StoreError::SledCorruption(e.to_string()),
            e => StoreError::Unavailable(e.to_string()),
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Cheap-to-clone handle on the database and its committer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    data_file: File,
    // Options only so that Drop can close the channel and then join.
    requests: Option<mpsc::Sender<Request>>,
    committer: Option<thread::JoinHandle<()>>,
    /// Deliveries without a due entry yet (see [`unindexed`]), counted by
    /// the committer.
    unindexed: Arc<unindexed::Gauge>,
    liveness: Arc<Liveness>,
    paused: Arc<PausedWebhooks>,
    set_aside_count: Arc<AtomicU64>,
    /// Declared last, so that it is dropped after `db`.
    _unlocked: WaitForUnlock,
}

impl Drop for Inner {
    /// The last handle gone: let the committer finish what it holds, so the
    /// database is closed (and, once the fields are dropped, its lock
    /// released) when this returns.
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(c) = self.committer.take() {
            let _ = c.join();
        }
    }
}

/// Counts that show whether the store gets through its work: a sled flush
/// that hangs without an error (a disk that stops answering) leaves a
/// process that looks alive and acknowledges nothing, which only these
/// show (see [`Store::progress`]).
#[derive(Default)]
pub(crate) struct Liveness {
    asked: AtomicU64,
    answered: AtomicU64,
    /// Batches of keys a backup has copied: progress that answers nobody.
    pub(crate) copied: AtomicU64,
}

/// A reading of [`Liveness`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Requests handed to the committer and not answered yet.
    pub waiting: u64,
    /// Requests answered, and backup batches copied, so far.
    pub done: u64,
}

/// How long a dropped store waits for sled to let go of its lock.
const UNLOCK_WAIT: Duration = Duration::from_secs(2);

/// Waits, when dropped, until sled has let go of the directory's lock. sled's
/// IO threads can hold its data file, and with it the lock, for a moment
/// after the last handle is gone, so a store reopened at once (the tests do)
/// could find it locked. `flock` on a descriptor of our own for that file
/// succeeds once sled's is closed.
struct WaitForUnlock(File);

impl Drop for WaitForUnlock {
    fn drop(&mut self) {
        let deadline = Instant::now() + UNLOCK_WAIT;
        while flock(&self.0, FlockOperation::NonBlockingLockExclusive).is_err() {
            if Instant::now() >= deadline {
                return;
            }
            thread::sleep(Duration::from_millis(1));
        }
        let _ = flock(&self.0, FlockOperation::Unlock);
    }
}

/// Opens sled under `path`. A database sled cannot read makes it panic
/// (seen with a zeroed segment); that becomes [`StoreError::Unreadable`], one
/// clear line instead of a backtrace.
fn open_sled(path: &Path, cache_capacity: u64) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new().path(path).cache_capacity(cache_capacity);
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()));
    std::panic::set_hook(quiet);
    let unreadable = |detail: String| StoreError::Unreadable { path: path.to_owned(), detail };
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(io))) if io.to_string().contains("could not acquire lock") => {
            Err(StoreError::Locked(path.to_owned()))
        }
        Ok(Err(e @ sled::Error::Corruption { .. })) => Err(StoreError::from(e)),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!("cannot open {}: {e}", path.display()))),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no reason given");
            Err(unreadable(format!("it failed with: {why}")))
        }
    }
}

/// Copies the backup at `from` into the stopped store's directory `to`,
/// which must be absent or empty. A backup short of its own ledger, or of
/// another layout, is refused.
pub fn restore(from: &Path, to: &Path) -> Result<Copied, StoreError> {
    if let Some(why) = copy::unusable_target(to) {
        return Err(StoreError::Target(why));
    }
    if !from.join(durable::LEDGER).is_file() {
        return Err(StoreError::Target(format!(
            "{} holds no backup (it has no {})",
            from.display(),
            durable::LEDGER
        )));
    }
    let db = open_sled(from, 64 << 20)?;
    if let Some(loss) = durable::check(from, durable::Mark::stored(&db)?)? {
        return Err(StoreError::Damaged { path: from.to_owned(), detail: loss.to_string() });
    }
    match db.get(keys::LAYOUT)? {
        Some(v) if *v == [keys::LAYOUT_VERSION] => copy::copy(&db, to, &AtomicU64::new(0)),
        found => Err(StoreError::Layout {
            path: from.to_owned(),
            found: format!("layout {}", found.and_then(|v| v.first().copied()).unwrap_or(0)),
        }),
    }
}

/// Marks a new database with this build's layout, brings one of layout 2
/// to 5 up to it; refuses one of another.
fn check_layout(db: &sled::Db, path: &Path) -> Result<(), StoreError> {
    let found = match db.get(keys::LAYOUT)? {
        Some(v) if *v == [keys::LAYOUT_VERSION] => return Ok(()),
        Some(v) if (2..=5).contains(&v[0]) && v.len() == 1 => return upgrade(db, v[0]),
        Some(v) => Some(format!("layout {}", v.first().copied().unwrap_or(0))),
        None if db.is_empty() => None,
        None => Some("data of an earlier development build (layout 1)".into()),
    };
    match found {
        Some(found) => Err(StoreError::Layout { path: path.to_owned(), found }),
        None => {
            db.insert(keys::LAYOUT, &[keys::LAYOUT_VERSION])?;
            db.flush()?;
            Ok(())
        }
    }
}

/// Brings a database of layout 2 to 5 up to 6, in one batch. Layout 2
/// lacks the per-second counts of the due index (`H`); layout 3 lacks
/// nothing else (layout 4's `F` ranges are only ever made by layout 4 and
/// later builds); layouts 2 to 4 store webhook stats without a `held`
/// count, and layouts 2 to 5 without the pause state and recent attempts.
fn upgrade(db: &sled::Db, from: u8) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    if from == 2 {
        let mut counts = std::collections::BTreeMap::<u64, u64>::new();
        for k in db.scan_prefix([keys::DUE]).keys() {
            *counts.entry(keys::parse_due(&k?).at_ms / 1000).or_default() += 1;
        }
        for (second, n) in counts {
            batch.insert(&keys::due_count(second)[..], &n.to_be_bytes()[..]);
        }
    }
    for kv in db.scan_prefix([keys::STATS]) {
        let (k, v) = kv?;
        let old: WebhookStatsV5 = match from {
            5 => codec::decode(&k, &v)?,
            _ => codec::decode::<WebhookStatsV4>(&k, &v)?.into(),
        };
        batch.insert(k, codec::encode(&WebhookStats::from(old)));
    }
    batch.insert(&keys::LAYOUT[..], &[keys::LAYOUT_VERSION][..]);
    db.apply_batch(batch)?;
    db.flush()?;
    Ok(())
}

/// What one prune request did.
#[derive(Debug, PartialEq, Eq)]
pub struct Pruned {
    pub deleted: usize,
    /// Every given sequence number up to this one was looked at; the rest
    /// were left for another request (a batch's worth of writes was made).
    pub through: u64,
}

/// One page of a webhook's deliveries, newest first.
pub struct Page {
    pub deliveries: Vec<(DeliveryKey, DeliveryRecord)>,
    /// Pass as `before` to get the next page; `None` on the last page.
    pub next: Option<u64>,
}

/// What an operator looks for among events; `None` matches anything.
#[derive(Clone, Copy, Debug, Default)]
pub struct EventFilter {
    pub client_id: Option<Uuid>,
    pub event_type: Option<event::EventType>,
    /// Some delivery of the event has this status.
    pub status: Option<Status>,
}

impl EventFilter {
    fn wants_event(&self, e: &EventRecord) -> bool {
        self.client_id.is_none_or(|c| c == e.client_id) && self.event_type.is_none_or(|t| t == e.event_type)
    }
}

/// One page of events with their deliveries (in webhook-id order), newest
/// first.
#[derive(Default)]
pub struct EventPage {
    pub events: Vec<(EventRecord, Vec<(DeliveryKey, DeliveryRecord)>)>,
    /// Where to go on from (pass as `before`); `None` once the oldest event
    /// was looked at.
    pub next: Option<u64>,
    /// The oldest event this page looked at: with a rare filter the page
    /// may be short, and says how far back it searched.
    pub searched_to: Option<u64>,
}

impl Store {
    /// Opens (or creates) the database under `path` and starts the committer.
    /// Damage found on the way (sled's or a record's) refuses the start in
    /// one line that names the directory.
    pub fn open(path: &Path, options: &Options) -> Result<Store, StoreError> {
        Self::start(path, options).map_err(|e| e.found_in(path))
    }

    fn start(path: &Path, options: &Options) -> Result<Store, StoreError> {
        std::fs::create_dir_all(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", path.display())))?;
        let db = open_sled(path, options.cache_capacity)?;
        let stored = durable::Mark::stored(&db)?;
        // Before anything is written: an emptied database must not pass for
        // a new one.
        if let Some(loss) = durable::check(path, stored)? {
            if !options.accept_data_loss {
                return Err(StoreError::Damaged { path: path.to_owned(), detail: loss.to_string() });
            }
            tracing::error!(storage = %path.display(), "starting on damaged storage, as --accept-data-loss asks: {loss}");
        }
        check_layout(&db, path)?;
        let mut syncer = durable::Syncer::new(path, stored)?;
        let data_file = syncer.db_file()?;
        let last_seq = match db.scan_prefix([keys::EVENT]).keys().next_back() {
            Some(k) => keys::u64_at(&k?, 1),
            None => 0,
        };
        let (requests, rx) = mpsc::channel();
        let unindexed = Arc::new(unindexed::Gauge::default());
        let liveness = Arc::new(Liveness::default());
        let paused = Arc::new(PausedWebhooks::default());
        let set_aside_count = Arc::new(AtomicU64::new(0));
        for kv in db.scan_prefix([keys::STATS]) {
            let (k, v) = kv?;
            if let (Some(p), Ok(webhook)) =
                (codec::decode::<WebhookStats>(&k, &v)?.paused, Uuid::from_slice(&k[1..]))
            {
                paused.set(webhook, Some(p));
            }
        }
        let mut committer = Committer {
            db: db.clone(),
            last_seq,
            dir: path.to_owned(),
            min_free: options.min_free_space,
            stats: Default::default(),
            due_counts: Default::default(),
            unindexed: Unindexed::new(unindexed.clone()),
            mark: durable::Mark { commits: stored.commits, last_seq },
            liveness: liveness.clone(),
            failure: Failure { first: Default::default(), report: options.on_failure },
            paused: paused.clone(),
            set_aside_count: set_aside_count.clone(),
        };
        // Before anything reads the due index, it must hold every delivery
        // waiting for an attempt.
        let leftovers = committer.index_leftovers()?;
        // Also makes the ledger agree with what was found (after an
        // accepted loss, or for a store from a build before the ledger).
        syncer.sync(&db, committer.mark)?;
        if leftovers > 0 {
            tracing::info!(deliveries = leftovers, "indexed the deliveries the last run had not attempted");
        }
        let committer =
            thread::Builder::new().name("committer".into()).spawn(move || committer.run(rx, syncer))?;
        let unlocked = WaitForUnlock(data_file.try_clone()?);
        let inner = Inner {
            db,
            data_file,
            requests: Some(requests),
            committer: Some(committer),
            unindexed,
            liveness,
            paused,
            set_aside_count,
            _unlocked: unlocked,
        };
        Ok(Store { inner: Arc::new(inner) })
    }

    /// Hands the request `ask` makes to the committer; `then` is always
    /// called, exactly once, with its answer.
    fn send<T, R: Into<Request>>(
        &self,
        ask: impl FnOnce(Then<T>) -> R,
        then: impl FnOnce(Result<T, StoreError>) + Send + 'static,
    ) {
        let live = self.inner.liveness.clone();
        live.asked.fetch_add(1, Ordering::Relaxed);
        let request = ask(Box::new(move |r| {
            live.answered.fetch_add(1, Ordering::Relaxed);
            then(r)
        }))
        .into();
        let unsent = match &self.inner.requests {
            Some(requests) => requests.send(request).err().map(|e| e.0),
            None => Some(request),
        };
        if let Some(r) = unsent {
            r.refuse(StoreError::Closed);
        }
    }

    /// [`Store::send`], waiting for the answer.
    async fn call<T: Send + 'static, R: Into<Request>>(
        &self,
        request: impl FnOnce(Then<T>) -> R,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(request, move |r| drop(tx.send(r)));
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores an event and its deliveries; answers once they are on disk.
    #[cfg(test)]
    pub async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        self.call(|then| Op::Ingest(event, then)).await
    }

    /// Like [`Store::ingest`], but `then` is called (on the committer's
    /// side, so it must be quick) in the order answers are given: before the
    /// answer to anything written after this event's batch.
    pub fn ingest_then(
        &self,
        event: NewEvent,
        then: impl FnOnce(Result<Ingested, StoreError>) + Send + 'static,
    ) {
        self.send(|t| Op::Ingest(event, t), then);
    }

    /// Records an attempt's outcome without waiting: `then` is called (on the
    /// committer's thread, so it must be quick) once it is on disk or failed.
    pub fn record_then(
        &self,
        outcome: Outcome,
        then: impl FnOnce(Result<Option<Paused>, StoreError>) + Send + 'static,
    ) {
        self.send(|t| Op::Record(outcome, t), then);
    }

    /// Pauses `webhook` (its deliveries are held from now on: those that
    /// wait are the caller's to hold, see [`Store::hold`]); answers the
    /// pause it had before, which stays if it had one.
    pub async fn pause(&self, webhook: Uuid, paused: Paused) -> Result<Option<Paused>, StoreError> {
        self.call(|then| Op::SetPaused(webhook, Some(paused), then)).await
    }

    /// Makes `webhook` active again (its held deliveries are the caller's to
    /// release, see [`Store::requeue`]); answers the pause it had.
    pub async fn resume(&self, webhook: Uuid) -> Result<Option<Paused>, StoreError> {
        self.call(|then| Op::SetPaused(webhook, None, then)).await
    }

    /// Whether `webhook` is paused, and why: from memory, never waiting for
    /// sled, so any thread may ask.
    pub fn paused(&self, webhook: &Uuid) -> Option<Paused> {
        self.inner.paused.get(webhook)
    }

    /// Deliveries set aside since the store was opened: records that could
    /// not be decoded (or whose event is gone), met by a worker or by the
    /// committer itself.
    pub fn set_aside_this_run(&self) -> u64 {
        self.inner.set_aside_count.load(Ordering::Relaxed)
    }

    /// Every paused webhook.
    pub fn paused_webhooks(&self) -> std::collections::HashMap<Uuid, Paused> {
        self.inner.paused.all()
    }

    /// Takes a due entry whose records cannot be read out of the due index
    /// (they stay stored, listed under `Z`); `then` runs once that is on disk.
    pub fn set_aside(&self, due: Due, then: impl FnOnce(Result<(), StoreError>) + Send + 'static) {
        self.send(|t| Op::SetAside(due, t), then);
    }

    /// Gives those of `keys` that have no due entry yet (deliveries never
    /// attempted, see `committer`) their entry; `then` gets the entries
    /// written, once they are on disk.
    pub fn index_then(
        &self,
        keys: Vec<DeliveryKey>,
        then: impl FnOnce(Result<Vec<Due>, StoreError>) + Send + 'static,
    ) {
        self.send(|t| Op::Index(keys, t), then);
    }

    /// Queues the deliveries among `keys` whose status is in `from` for an
    /// attempt now, with a fresh retry schedule; returns their due entries.
    pub async fn requeue(
        &self,
        keys: Vec<DeliveryKey>,
        from: &'static [Status],
    ) -> Result<Vec<Due>, StoreError> {
        self.call(|then| Op::Requeue { keys, from, then }).await
    }

    /// Cancels those of `keys` still waiting for an attempt or held, and
    /// every delivery to `webhooks` never attempted (which has no due entry
    /// to find it by); returns how many.
    pub async fn cancel(&self, keys: Vec<DeliveryKey>, webhooks: Vec<Uuid>) -> Result<usize, StoreError> {
        self.stop(keys, webhooks, Status::Cancelled).await
    }

    /// Holds those of `keys` still waiting for an attempt, and every
    /// delivery to `webhooks` never attempted, until their webhook comes
    /// back ([`Store::requeue`] from `Held`); returns how many.
    pub async fn hold(&self, keys: Vec<DeliveryKey>, webhooks: Vec<Uuid>) -> Result<usize, StoreError> {
        self.stop(keys, webhooks, Status::Held).await
    }

    /// [`Op::Stop`] a thousand keys per request: one request for a big
    /// backlog's keys would make one huge batch (and sled holds a batch's
    /// node copies until it ends). The webhooks' unindexed deliveries,
    /// which only the committer knows, go in a request of their own.
    async fn stop(
        &self,
        keys: Vec<DeliveryKey>,
        webhooks: Vec<Uuid>,
        to: Status,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for chunk in keys.chunks(1000) {
            n += self.call(|then| Op::Stop { keys: chunk.to_vec(), webhooks: Vec::new(), to, then }).await?;
        }
        Ok(n + self.call(|then| Op::Stop { keys: Vec::new(), webhooks, to, then }).await?)
    }

    /// Deletes the events among `seqs` (ascending) whose deliveries are all
    /// final, as far as one batch's writes go: see [`Pruned::through`].
    pub async fn prune(&self, seqs: Vec<u64>) -> Result<Pruned, StoreError> {
        self.call(|then| Op::Prune(seqs, then)).await
    }

    /// Copies the whole store, as it stands after every batch acknowledged
    /// so far, into a new store directory at `to` (absolute; absent or
    /// empty). Ingest waits while the copy is written.
    pub async fn backup(&self, to: PathBuf) -> Result<Copied, StoreError> {
        self.call(|then| Request::Backup(to, then)).await
    }

    /// Runs `f` on tokio's blocking pool and waits for its answer without
    /// holding a runtime thread. The only way async code reads the store: a
    /// sled call can block, behind a batch being applied or for good on a
    /// failing disk, and on a runtime thread that would stall every task
    /// scheduled there (HTTP, timers, signals). Make all the reads one answer
    /// needs in one call: each call is a hop to another thread.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.new_reader();
        match tokio::task::spawn_blocking(move || f(&reader)).await {
            Ok(answer) => answer,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// A reader for a plain OS thread of the caller's own (the delivery
    /// workers), which may block in it. Never for the async runtime's
    /// threads, nor for a task on tokio's blocking pool (that is what
    /// [`Store::read`] is for): panics when called on a thread inside a tokio
    /// runtime, so get it on the thread that will use it.
    pub fn reader(&self) -> Reader {
        assert!(
            tokio::runtime::Handle::try_current().is_err(),
            "Store::reader on a tokio thread: read through Store::read instead"
        );
        self.new_reader()
    }

    fn new_reader(&self) -> Reader {
        Reader { db: self.inner.db.clone(), unindexed: self.inner.unindexed.clone() }
    }

    /// How far the store has got with what it was asked (for the systemd
    /// watchdog: writes waiting while `done` stands still mean it is stuck).
    pub fn progress(&self) -> Progress {
        let live = &self.inner.liveness;
        // `answered` first: read the other way, a request asked and answered
        // between the two loads would count as waiting.
        let answered = live.answered.load(Ordering::Relaxed);
        let asked = live.asked.load(Ordering::Relaxed);
        Progress {
            waiting: asked.saturating_sub(answered),
            done: answered + live.copied.load(Ordering::Relaxed),
        }
    }

    /// Flushes and syncs everything written so far (for a clean stop).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.inner.db.flush()?;
        self.inner.data_file.sync_data()?;
        Ok(())
    }
}

/// Every read of the database, as synchronous sled calls that can block for
/// as long as sled does (behind a batch being applied; for good on a failing
/// disk). Cheap to clone: a handle on the database, not on the committer,
/// so a reader stuck in sled keeps no one from stopping the store. Kept off
/// the async runtime's threads: async code gets one only inside
/// [`Store::read`], a thread of its own from [`Store::reader`].
#[derive(Clone)]
pub struct Reader {
    db: sled::Db,
    /// Deliveries without a due entry yet, counted by the committer.
    unindexed: Arc<unindexed::Gauge>,
}

impl Reader {
    /// How many deliveries have been set aside as unreadable.
    pub fn set_aside_count(&self) -> usize {
        self.db.scan_prefix([keys::SET_ASIDE]).count()
    }

    /// The sequence number of the event with this id.
    pub fn find_event(&self, event_id: &Uuid) -> Result<Option<u64>, StoreError> {
        if let Some(seq) = seq_in_event_id(event_id) {
            if self.event(seq)?.is_some_and(|e| e.event_id == *event_id) {
                return Ok(Some(seq));
            }
        }
        let key = keys::index(event_id);
        self.db.get(key)?.map(|v| keys::u64_value(&key, &v)).transpose()
    }

    pub fn event(&self, seq: u64) -> Result<Option<EventRecord>, StoreError> {
        self.get(&keys::event(seq))
    }

    pub fn delivery(&self, key: DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        self.get(&keys::delivery(key))
    }

    pub fn webhook_stats(&self, webhook: &Uuid) -> Result<WebhookStats, StoreError> {
        Ok(self.get(&keys::stats(webhook))?.unwrap_or_default())
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.db.get(key)?.map(|v| codec::decode(key, &v)).transpose()
    }

    /// Every delivery of one event, in webhook-id order.
    pub fn deliveries(&self, seq: u64) -> Result<Vec<(DeliveryKey, DeliveryRecord)>, StoreError> {
        let Some(event) = self.event(seq)? else { return Ok(Vec::new()) };
        self.deliveries_of(seq, &event)
    }

    fn deliveries_of(
        &self,
        seq: u64,
        event: &EventRecord,
    ) -> Result<Vec<(DeliveryKey, DeliveryRecord)>, StoreError> {
        let mut out = Vec::with_capacity(event.webhooks.len());
        for &webhook in &event.webhooks {
            let key = DeliveryKey { seq, webhook };
            if let Some(d) = self.delivery(key)? {
                out.push((key, d));
            }
        }
        out.sort_by_key(|(k, _)| k.webhook);
        Ok(out)
    }

    /// A webhook's deliveries of events stored before sequence `before`
    /// (all, if `None`), newest first, only those with `status` if given.
    pub fn webhook_deliveries(
        &self,
        webhook: Uuid,
        before: Option<u64>,
        status: Option<Status>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let start = keys::delivery(DeliveryKey { seq: 0, webhook });
        let end = keys::delivery(DeliveryKey { seq: before.unwrap_or(u64::MAX), webhook });
        let mut deliveries = Vec::new();
        for kv in self.db.range(start..end).rev() {
            let (k, v) = kv?;
            let (key, record): (_, DeliveryRecord) = (keys::parse_delivery(&k), codec::decode(&k, &v)?);
            if status.is_none_or(|s| s == record.status) {
                if deliveries.len() == limit {
                    return Ok(Page {
                        next: deliveries.last().map(|(k, _): &(DeliveryKey, _)| k.seq),
                        deliveries,
                    });
                }
                deliveries.push((key, record));
            }
        }
        Ok(Page { deliveries, next: None })
    }

    /// Events stored before sequence `before` (all, if `None`), newest
    /// first: up to `limit` that `filter` wants, looking at no more than
    /// `scan` events, so that a page costs the same however rare its
    /// filter's matches are (a short page says where to go on from).
    pub fn events_before(
        &self,
        before: Option<u64>,
        filter: &EventFilter,
        limit: usize,
        scan: usize,
    ) -> Result<EventPage, StoreError> {
        let range = keys::event(0)..keys::event(before.unwrap_or(u64::MAX));
        let mut page = EventPage { events: Vec::new(), next: None, searched_to: None };
        for (looked, kv) in self.db.range(range).rev().enumerate() {
            let (k, v) = kv?;
            let seq = keys::u64_at(&k, 1);
            if page.events.len() == limit || looked == scan {
                page.next = page.searched_to;
                break;
            }
            page.searched_to = Some(seq);
            let event: EventRecord = codec::decode(&k, &v)?;
            if !filter.wants_event(&event) {
                continue;
            }
            let deliveries = self.deliveries_of(seq, &event)?;
            if filter.status.is_none_or(|s| deliveries.iter().any(|(_, d)| d.status == s)) {
                page.events.push((event, deliveries));
            }
        }
        Ok(page)
    }

    /// Keys of a webhook's deliveries of events stored at or after `since_seq`.
    pub fn webhook_delivery_keys_since(
        &self,
        webhook: Uuid,
        since_seq: u64,
    ) -> Result<Vec<DeliveryKey>, StoreError> {
        let start = keys::delivery(DeliveryKey { seq: since_seq, webhook });
        let end = keys::delivery(DeliveryKey { seq: u64::MAX, webhook });
        self.db.range(start..end).keys().map(|k| Ok(keys::parse_delivery(&k?))).collect()
    }

    /// The oldest delivery of `webhook` from `from_seq` on that waits for
    /// an attempt (pending or retrying), and when it is due: the head of an
    /// in-order webhook. Goes through the webhook's delivery log, which is
    /// kept in sequence order; a record that cannot be decoded is passed
    /// over (the delivery is set aside when it comes due).
    pub fn first_waiting(&self, webhook: Uuid, from_seq: u64) -> Result<Option<Due>, StoreError> {
        let start = keys::delivery(DeliveryKey { seq: from_seq, webhook });
        let end = keys::delivery(DeliveryKey { seq: u64::MAX, webhook });
        for kv in self.db.range(start..end) {
            let (k, v) = kv?;
            let Ok(d) = codec::decode::<DeliveryRecord>(&k, &v) else { continue };
            if let (Status::Pending | Status::Retrying, Some(at)) = (d.status, d.next_attempt_at) {
                return Ok(Some(Due { at_ms: at.max(0) as u64, key: keys::parse_delivery(&k) }));
            }
        }
        Ok(None)
    }

    /// Every delivery in the due index whose webhook `wanted` selects.
    pub fn waiting_deliveries(&self, wanted: impl Fn(&Uuid) -> bool) -> Result<Vec<DeliveryKey>, StoreError> {
        let mut out = Vec::new();
        for k in self.db.scan_prefix([keys::DUE]).keys() {
            let d = keys::parse_due(&k?);
            if wanted(&d.key.webhook) {
                out.push(d.key);
            }
        }
        Ok(out)
    }

    /// Sequence numbers of up to `limit` events stored after `after` and
    /// before `before`, oldest first.
    pub fn events_between(&self, after: u64, before: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let range = keys::event(after.saturating_add(1))..keys::event(before);
        self.db.range(range).keys().take(limit).map(|k| Ok(keys::u64_at(&k?, 1))).collect()
    }

    /// Up to `limit` due-index entries from `from` (inclusive) that are due
    /// no later than `until_ms`.
    pub fn scan_due(&self, from: Due, until_ms: u64, limit: usize) -> Result<Vec<Due>, StoreError> {
        let end = keys::due(Due::at(until_ms.saturating_add(1)));
        self.db.range(keys::due(from)..end).keys().take(limit).map(|k| Ok(keys::parse_due(&k?))).collect()
    }

    /// How many deliveries are due at or before `now_ms`: those never
    /// attempted and not indexed yet (all due), the counts of the seconds
    /// before this one, then this second's due-index entries one by one.
    pub fn count_due(&self, now_ms: u64) -> Result<u64, StoreError> {
        let second = now_ms / 1000;
        let mut n = self.unindexed.count();
        for kv in self.db.range(keys::due_count(0)..keys::due_count(second)) {
            let (k, v) = kv?;
            n += keys::u64_value(&k, &v)?;
        }
        let this_second = keys::due(Due::at(second * 1000))..keys::due(Due::at(now_ms.saturating_add(1)));
        for k in self.db.range(this_second).keys() {
            k?;
            n += 1;
        }
        Ok(n)
    }

    /// Up to `limit` due-index entries of `webhook` in `from..until`, looking
    /// at no more than `scan` entries; also where to go on from (`None` once
    /// the range is exhausted).
    pub fn scan_webhook_due(
        &self,
        webhook: Uuid,
        from: Due,
        until: Due,
        limit: usize,
        scan: usize,
    ) -> Result<(Vec<Due>, Option<Due>), StoreError> {
        let mut found = Vec::new();
        for (examined, k) in self.db.range(keys::due(from)..keys::due(until)).keys().enumerate() {
            let d = keys::parse_due(&k?);
            if d.key.webhook == webhook {
                found.push(d);
            }
            if found.len() == limit || examined + 1 == scan {
                return Ok((found, Some(d.successor())));
            }
        }
        Ok((found, None))
    }

    /// About when the longest-waiting due delivery became due (ms since the
    /// epoch), if any is due by `now_ms`: the first due-index entry, or the
    /// oldest delivery not indexed yet, whichever is older.
    pub fn oldest_due_ms(&self, now_ms: u64) -> Result<Option<u64>, StoreError> {
        let indexed = self.first_due_from(Due::at(0))?.map(|d| d.at_ms).filter(|at| *at <= now_ms);
        Ok(indexed.into_iter().chain(self.unindexed.oldest_ms()).min())
    }

    /// The first due-index entry at or after `from`.
    pub fn first_due_from(&self, from: Due) -> Result<Option<Due>, StoreError> {
        let start = keys::due(from).to_vec();
        match self.db.range(start..vec![keys::DUE + 1]).keys().next() {
            Some(k) => Ok(Some(keys::parse_due(&k?))),
            None => Ok(None),
        }
    }

    /// Bytes sled's files take on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock;
    use crate::event::EventType;

    const OPTIONS: Options = Options {
        cache_capacity: 1 << 20,
        min_free_space: 0,
        accept_data_loss: false,
        on_failure: |_, _| {},
    };

    fn record(data: &str, ts: Option<i64>) -> EventRecord {
        EventRecord {
            event_id: Uuid::nil(),
            event_type: EventType::MeetingScheduled,
            client_id: Uuid::nil(),
            timestamp_ms: ts.unwrap_or(99),
            timestamp_given: ts.is_some(),
            test: false,
            data: data.into(),
            webhooks: Vec::new(),
        }
    }

    #[test]
    fn repeated_event_ids_compare_content_not_bytes() {
        use committer::same_content;
        assert!(same_content(&record(r#"{"a":1,"b":2}"#, None), &record(r#"{ "b":2, "a":1 }"#, Some(5))));
        assert!(!same_content(&record(r#"{"a":1}"#, None), &record(r#"{"a":2}"#, None)));
        assert!(!same_content(&record("{}", Some(1)), &record("{}", Some(2))));
    }

    fn new(id: u8, data: &str, webhooks: &[Uuid]) -> NewEvent {
        NewEvent {
            record: EventRecord {
                event_id: Uuid::from_bytes([id; 16]),
                webhooks: webhooks.to_vec(),
                ..record(data, None)
            },
            id_given: true,
        }
    }

    /// The store's reads, made in place: unlike the daemon's, a test's
    /// runtime has nothing else to do while sled answers.
    fn reads(store: &Store) -> Reader {
        store.new_reader()
    }

    async fn record_outcome(store: &Store, o: Outcome) -> Option<Paused> {
        let (tx, rx) = oneshot::channel();
        store.record_then(o, move |r| drop(tx.send(r)));
        rx.await.unwrap().unwrap()
    }

    /// Works on the database under `dir` with sled directly; returns once
    /// sled has let go of its lock, so that the store can open it at once.
    fn raw<T>(dir: &Path, f: impl FnOnce(&sled::Db) -> T) -> T {
        let db = sled::open(dir).unwrap();
        let unlocked = WaitForUnlock(File::open(dir.join("db")).unwrap());
        let out = f(&db);
        drop(db);
        drop(unlocked);
        out
    }

    /// Ingests events 1, 2 and 3, each to every one of `webhooks`; their
    /// deliveries' due entries, in order.
    async fn ingest_three(store: &Store, webhooks: &[Uuid]) -> Vec<Due> {
        let mut due = Vec::new();
        for id in 1..=3 {
            let Ingested::Accepted { due: d, .. } = store.ingest(new(id, "{}", webhooks)).await.unwrap()
            else {
                panic!("event {id} not accepted")
            };
            due.extend(d);
        }
        due
    }

    /// Records an outcome without an attempt to show for it.
    async fn record_status(store: &Store, key: DeliveryKey, status: Status, next_attempt_at: Option<i64>) {
        record_outcome(store, Outcome { key, attempt: None, status, next_attempt_at, pause: None }).await;
    }

    #[tokio::test]
    async fn events_are_listed_newest_first_filtered_and_each_page_looks_at_a_bounded_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        let (w, other) = (Uuid::from_bytes([7; 16]), Uuid::from_bytes([8; 16]));
        // Events 1..=9; every third is client 8's; event 5's delivery failed.
        let mut keys = Vec::new();
        for id in 1..=9u8 {
            let mut e = new(id, "{}", &[w]);
            if id % 3 == 0 {
                e.record.client_id = other;
            }
            let Ingested::Accepted { due, .. } = store.ingest(e).await.unwrap() else { panic!("accepted") };
            keys.push(due[0].key);
        }
        record_status(&store, keys[4], Status::Failed, None).await;
        let r = reads(&store);
        let ids =
            |page: &EventPage| page.events.iter().map(|(e, _)| e.event_id.as_bytes()[0]).collect::<Vec<_>>();
        let all = EventFilter::default();
        let first = r.events_before(None, &all, 4, 100).unwrap();
        assert_eq!(ids(&first), [9, 8, 7, 6]);
        assert_eq!(first.events[0].1.len(), 1, "with its deliveries");
        let second = r.events_before(first.next, &all, 4, 100).unwrap();
        assert_eq!(ids(&second), [5, 4, 3, 2]);
        let last = r.events_before(second.next, &all, 4, 100).unwrap();
        assert_eq!((ids(&last), last.next), (vec![1], None));
        // A filter looks at no more than `scan` events per page, and says
        // how far back it got.
        let theirs = EventFilter { client_id: Some(other), ..EventFilter::default() };
        let page = r.events_before(None, &theirs, 10, 4).unwrap();
        assert_eq!(
            (ids(&page), page.next, page.searched_to),
            (vec![9, 6], Some(keys[5].seq), Some(keys[5].seq))
        );
        let page = r.events_before(page.next, &theirs, 10, 4).unwrap();
        assert_eq!((ids(&page), page.next), (vec![3], Some(keys[1].seq)));
        let page = r.events_before(page.next, &theirs, 10, 4).unwrap();
        assert_eq!((ids(&page), page.next, page.searched_to), (vec![], None, Some(keys[0].seq)));
        let failed = EventFilter { status: Some(Status::Failed), ..EventFilter::default() };
        assert_eq!(ids(&r.events_before(None, &failed, 10, 100).unwrap()), [5]);
        let typed = EventFilter { event_type: Some(EventType::MeetingCancelled), ..EventFilter::default() };
        assert_eq!(ids(&r.events_before(None, &typed, 10, 100).unwrap()), Vec::<u8>::new());
    }

    #[test]
    fn a_database_of_another_layout_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), &OPTIONS).unwrap());
        let reopen = || Store::open(dir.path(), &OPTIONS).map(drop);
        reopen().expect("its own layout opens");
        let on_disk = |f: &dyn Fn(&sled::Db)| raw(dir.path(), f);
        // Layout 3 lacks only `F` ranges, which it cannot have: upgraded as is.
        on_disk(&|db| drop(db.insert(keys::LAYOUT, &[3]).unwrap()));
        reopen().expect("layout 3 opens");
        on_disk(&|db| assert_eq!(db.get(keys::LAYOUT).unwrap().unwrap(), [keys::LAYOUT_VERSION]));
        on_disk(&|db| drop(db.insert(keys::LAYOUT, &[keys::LAYOUT_VERSION + 1]).unwrap()));
        let e = reopen().unwrap_err();
        let newer = format!("layout {}", keys::LAYOUT_VERSION + 1);
        assert!(matches!(&e, StoreError::Layout { found, .. } if *found == newer), "{e}");
        // Data without any marker is an earlier build's: refused, and left as it was.
        on_disk(&|db| {
            db.remove(keys::LAYOUT).unwrap();
            db.insert(b"D-older", &[1]).unwrap();
        });
        assert!(matches!(reopen(), Err(StoreError::Layout { .. })));
        on_disk(&|db| assert!(db.get(keys::LAYOUT).unwrap().is_none() && db.len() == 1));
    }

    #[tokio::test]
    async fn a_layout_4_database_keeps_its_stats_through_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let w = Uuid::from_bytes([7; 16]);
        {
            let store = Store::open(dir.path(), &OPTIONS).unwrap();
            for id in 1..=3 {
                store.ingest(new(id, "{}", &[w])).await.unwrap();
            }
        }
        // Stats as layout 4 stored them: five counts, no `held`.
        let old = (Some(11i64), None::<i64>, Some("HTTP 500".to_owned()), 4u32, [3u64, 0, 0, 0, 0]);
        raw(dir.path(), |db| {
            db.insert(keys::stats(&w), codec::encode(&old)).unwrap();
            db.insert(keys::LAYOUT, &[4]).unwrap();
        });
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        let stats = reads(&store).webhook_stats(&w).unwrap();
        assert_eq!(
            (stats.last_success_ms, stats.consecutive_failures, stats.count(Status::Pending)),
            (Some(11), 4, 3)
        );
        assert_eq!(stats.count(Status::Held), 0);
        drop(store);
        raw(dir.path(), |db| assert_eq!(db.get(keys::LAYOUT).unwrap().unwrap(), [keys::LAYOUT_VERSION]));
    }

    /// A failed attempt of `key` at `at_ms`, retried later, under `pause`.
    fn failed_at(key: DeliveryKey, at_ms: i64, pause: Option<PauseRule>) -> Outcome {
        let attempt = Attempt {
            delivery_id: Uuid::new_v4(),
            started_at_ms: at_ms,
            duration_ms: 1,
            status_code: Some(500),
            error: Some("HTTP 500".into()),
            response_body: String::new(),
        };
        Outcome {
            key,
            attempt: Some(attempt),
            status: Status::Retrying,
            next_attempt_at: Some(clock::now_ms() + 60_000),
            pause,
        }
    }

    #[tokio::test]
    async fn a_failure_streak_or_a_gone_answer_pauses_and_holds_what_waits() {
        let dir = tempfile::tempdir().unwrap();
        let (w, gone) = (Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16]));
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        let mut keys = Vec::new();
        for id in 1..=4 {
            let Ingested::Accepted { due, .. } = store.ingest(new(id, "{}", &[w, gone])).await.unwrap()
            else {
                panic!("a new event")
            };
            keys.push(due.iter().map(|d| d.key).collect::<Vec<_>>());
        }
        let now = clock::now_ms();
        let rule = Some(PauseRule::Failing { for_ms: 10_000, attempts: 3 });
        // Three failures, but within 10 s of the first: not yet.
        for k in &keys[..3] {
            assert_eq!(record_outcome(&store, failed_at(k[0], now - 5_000, rule)).await, None);
        }
        // A fourth, with the run now 10 s long and 4 failures: paused.
        let paused = record_outcome(&store, failed_at(keys[3][0], now + 5_000, rule)).await;
        assert_eq!(paused.map(|p| p.reason), Some(PauseReason::Failing));
        assert_eq!(store.paused(&w), paused);
        let delivery = |k| reads(&store).delivery(k).unwrap().unwrap();
        assert_eq!((delivery(keys[3][0]).status, delivery(keys[3][0]).next_attempt_at), (Status::Held, None));
        assert_eq!(delivery(keys[2][0]).status, Status::Retrying, "the rest are the caller's to hold");
        // Another outcome of the paused webhook: held too, no second pause.
        assert_eq!(record_outcome(&store, failed_at(keys[2][0], now + 6_000, rule)).await, None);
        assert_eq!(delivery(keys[2][0]).status, Status::Held);
        let stats = reads(&store).webhook_stats(&w).unwrap();
        assert_eq!((stats.consecutive_failures, stats.failing_since_ms), (5, Some(now - 5_000)));
        assert_eq!(stats.success_rate(), Some((0.0, 5)));
        assert_eq!(stats.count(Status::Held), 2);

        // 410 Gone pauses at once, on the first attempt.
        let paused = record_outcome(&store, failed_at(keys[0][1], now, Some(PauseRule::Gone))).await;
        assert_eq!(paused.map(|p| p.reason), Some(PauseReason::Gone));
        assert_eq!(delivery(keys[0][1]).status, Status::Held);

        // An operator's pause keeps the first reason; resuming answers it.
        let again = Paused { reason: PauseReason::Operator, at_ms: now };
        assert_eq!(store.pause(w, again).await.unwrap(), store.paused(&w));
        assert_eq!(store.paused(&w).map(|p| p.reason), Some(PauseReason::Failing));
        assert_eq!(store.resume(w).await.unwrap().map(|p| p.reason), Some(PauseReason::Failing));
        assert_eq!((store.paused(&w), store.resume(w).await.unwrap()), (None, None));
        assert_eq!(store.pause(w, again).await.unwrap(), None);
        drop(store);
        // The pause is stored: a new start knows it.
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        assert_eq!(store.paused(&w), Some(again));
        assert_eq!(store.paused_webhooks().len(), 2);
    }

    #[tokio::test]
    async fn a_layout_5_database_keeps_its_stats_and_starts_active() {
        let dir = tempfile::tempdir().unwrap();
        let w = Uuid::from_bytes([7; 16]);
        drop(Store::open(dir.path(), &OPTIONS).unwrap());
        // Stats as layout 5 stored them: six counts, no pause or recent attempts.
        let old = (None::<i64>, Some(20i64), Some("HTTP 500".to_owned()), 2u32, [1u64, 2, 0, 0, 0, 5]);
        raw(dir.path(), |db| {
            db.insert(keys::stats(&w), codec::encode(&old)).unwrap();
            db.insert(keys::LAYOUT, &[5]).unwrap();
        });
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        let stats = reads(&store).webhook_stats(&w).unwrap();
        assert_eq!((stats.consecutive_failures, stats.failing_since_ms, stats.paused), (2, Some(20), None));
        assert_eq!((stats.count(Status::Retrying), stats.count(Status::Held)), (2, 5));
        assert_eq!(stats.success_rate(), None);
        assert_eq!(store.paused(&w), None);
        drop(store);
        raw(dir.path(), |db| assert_eq!(db.get(keys::LAYOUT).unwrap().unwrap(), [keys::LAYOUT_VERSION]));
    }

    /// The due index counted entry by entry, as `count_due` did before the
    /// per-second counts.
    fn counted(store: &Store, now_ms: u64) -> u64 {
        let end = keys::due(Due::at(now_ms + 1));
        store.inner.db.range(keys::due(Due::at(0))..end).count() as u64
    }

    #[tokio::test]
    async fn counting_what_is_due_agrees_with_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let webhooks = [Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16]), Uuid::from_bytes([3; 16])];
        let later = 1u64 << 50;
        let moments = [0, later - 1, later, later + 999, later + 1000, u64::MAX / 2];
        {
            let store = Store::open(dir.path(), &OPTIONS).unwrap();
            let due = ingest_three(&store, &webhooks).await;
            let now = clock::now_ms() as u64;
            assert_eq!(reads(&store).count_due(now).unwrap(), 9);
            assert_eq!(counted(&store, now), 0, "new deliveries have no due entries");
            // One succeeds, two are retried later, one of them twice.
            record_status(&store, due[0].key, Status::Succeeded, None).await;
            record_status(&store, due[1].key, Status::Retrying, Some(later as i64)).await;
            record_status(&store, due[2].key, Status::Retrying, Some(later as i64 + 5)).await;
            record_status(&store, due[2].key, Status::Retrying, Some(later as i64 + 1500)).await;
            // Setting aside an entry no longer in the index changes no count.
            let (tx, rx) = oneshot::channel();
            store.set_aside(due[0], move |r| drop(tx.send(r)));
            rx.await.unwrap().unwrap();
            assert_eq!(reads(&store).count_due(now).unwrap(), 6);
            assert_eq!(counted(&store, u64::MAX / 2), 2);
            // Indexing the six never attempted moves them into the index, once.
            let waiting: Vec<_> = due[3..].iter().map(|d| d.key).collect();
            assert_eq!(index(&store, waiting.clone()).await, due[3..]);
            assert_eq!(index(&store, waiting).await, due[3..], "the same entries, written once");
            assert_eq!(counted(&store, u64::MAX / 2), 8);
            assert_eq!(reads(&store).count_due(now).unwrap(), 6);
            for t in moments.into_iter().chain([now]) {
                assert_eq!(reads(&store).count_due(t).unwrap(), counted(&store, t), "at {t}");
            }
        }
        // Counts of a layout 2 database (which had none) are made at open.
        raw(dir.path(), |db| {
            for k in db.scan_prefix([keys::DUE_COUNT]).keys() {
                db.remove(k.unwrap()).unwrap();
            }
            db.insert(keys::LAYOUT, &[2]).unwrap();
            db.flush().unwrap();
        });
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        for t in moments {
            assert_eq!(reads(&store).count_due(t).unwrap(), counted(&store, t), "at {t} after the upgrade");
        }
        assert_eq!(reads(&store).count_due(u64::MAX / 2).unwrap(), 8);
    }

    async fn index(store: &Store, keys: Vec<DeliveryKey>) -> Vec<Due> {
        let (tx, rx) = oneshot::channel();
        store.index_then(keys, move |r| drop(tx.send(r)));
        rx.await.unwrap().unwrap()
    }

    fn ranges(dir: &Path) -> usize {
        raw(dir, |db| db.scan_prefix([keys::FRESH_RANGE]).count())
    }

    #[tokio::test]
    async fn deliveries_never_attempted_are_indexed_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let webhooks = [Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16])];
        let due;
        {
            let store = Store::open(dir.path(), &OPTIONS).unwrap();
            due = ingest_three(&store, &webhooks).await;
            // The first event's deliveries are over: its range is dropped.
            for d in &due[..2] {
                record_status(&store, d.key, Status::Succeeded, None).await;
            }
            record_status(&store, due[2].key, Status::Retrying, Some(1 << 50)).await;
            assert_eq!(reads(&store).count_due(clock::now_ms() as u64).unwrap(), 3);
            assert_eq!(counted(&store, u64::MAX / 2), 1);
        }
        // As after a crash: the store stopped with three never attempted,
        // one of which was set aside as unreadable meanwhile.
        assert_eq!(ranges(dir.path()), 2);
        raw(dir.path(), |db| db.insert(keys::set_aside(due[5].key), &0u64.to_be_bytes()).unwrap());
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        let now = clock::now_ms() as u64;
        assert_eq!(reads(&store).scan_due(Due::at(0), now, 100).unwrap(), due[3..5]);
        assert_eq!(reads(&store).first_due_from(Due::at(now + 1)).unwrap().map(|d| d.key), Some(due[2].key));
        assert_eq!(reads(&store).count_due(now).unwrap(), 2);
        assert_eq!(reads(&store).count_due(u64::MAX / 2).unwrap(), 3);
        // Nothing is left unindexed; the entries of those waiting are as stored.
        let retry = Due { at_ms: 1 << 50, key: due[2].key };
        assert_eq!(index(&store, due.iter().map(|d| d.key).collect()).await, [retry, due[3], due[4]]);
        assert_eq!(reads(&store).count_due(u64::MAX / 2).unwrap(), 3);
        drop(store);
        assert_eq!(ranges(dir.path()), 0);
    }

    #[tokio::test]
    async fn the_oldest_due_counts_deliveries_never_indexed_until_they_are_settled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        let before = clock::now_ms() as u64;
        let due = ingest_three(&store, &[Uuid::from_bytes([1; 16])]).await;
        let now = clock::now_ms() as u64;
        let oldest = reads(&store).oldest_due_ms(now).unwrap().expect("never attempted, so due");
        assert!((before..=now).contains(&oldest), "{before} <= {oldest} <= {now}");
        for d in &due {
            record_status(&store, d.key, Status::Succeeded, None).await;
        }
        assert_eq!(reads(&store).oldest_due_ms(u64::MAX / 2).unwrap(), None);
    }

    #[tokio::test]
    async fn a_full_check_names_each_kind_of_broken_record_or_reference() {
        let dir = tempfile::tempdir().unwrap();
        let webhooks = [Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16])];
        let due;
        {
            let store = Store::open(dir.path(), &OPTIONS).unwrap();
            due = ingest_three(&store, &webhooks).await;
            record_status(&store, due[0].key, Status::Retrying, Some(1 << 50)).await;
            record_status(&store, due[1].key, Status::Succeeded, None).await;
        }
        let problems = |dir: &Path| raw(dir, |db| check::walk(db).unwrap().problems);
        assert_eq!(problems(dir.path()), Vec::<String>::new(), "a sound store");
        let retry = Due { at_ms: 1 << 50, key: due[0].key };
        raw(dir.path(), |db| {
            db.remove(keys::due(retry)).unwrap();
            db.remove(keys::event(due[4].key.seq)).unwrap();
            db.insert(keys::due(Due { at_ms: 5000, key: due[1].key }), &[]).unwrap();
            db.insert(keys::due_count(5), &1u64.to_be_bytes()).unwrap();
            db.insert(keys::delivery(DeliveryKey { seq: 2, webhook: Uuid::from_bytes([3; 16]) }), &[9])
                .unwrap();
            db.insert(b"X", &[]).unwrap();
            let mut stats: WebhookStats =
                codec::decode(b"W", &db.get(keys::stats(&webhooks[1])).unwrap().unwrap()).unwrap();
            stats.moved(None, Some(Status::Failed));
            db.insert(keys::stats(&webhooks[1]), codec::encode(&stats)).unwrap();
        });
        let found = problems(dir.path()).join("\n");
        for expected in [
            "waits for an attempt but is in no due index",
            &format!("due count of second {}: 1 counted, 0 entries", retry.at_ms / 1000),
            &format!("delivery of event {} to webhook {}: its event", due[4].key.seq, webhooks[0]),
            &format!("delivery of event {} to webhook {}: its event", due[5].key.seq, webhooks[1]),
            "due entry at 5000 ms",
            "cannot be decoded",
            "a key of no known kind",
            &format!("webhook {}: its stats count 1 failed deliveries, 0 are stored", webhooks[1]),
        ] {
            assert!(found.contains(expected), "{expected:?} not in:\n{found}");
        }
    }

    #[tokio::test]
    async fn a_short_id_index_value_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::from_bytes([7; 16]);
        drop(Store::open(dir.path(), &OPTIONS).unwrap());
        raw(dir.path(), |db| db.insert(keys::index(&id), &[1, 2, 3]).unwrap());
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        assert!(matches!(reads(&store).find_event(&id), Err(StoreError::Corrupt { .. })));
        let Err(e) = store.ingest(new(7, "{}", &[])).await else { panic!("a short index value was taken") };
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        // The writer lives on.
        assert!(store.ingest(new(8, "{}", &[])).await.is_ok());
    }

    #[tokio::test]
    async fn an_unreadable_event_left_unindexed_still_has_its_deliveries_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let webhooks = [Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16])];
        let due = {
            let store = Store::open(dir.path(), &OPTIONS).unwrap();
            let Ingested::Accepted { due, .. } = store.ingest(new(1, "{}", &webhooks)).await.unwrap() else {
                panic!()
            };
            due
        };
        // Damaged while the daemon was down: found through the webhooks
        // instead, to be set aside at their attempts.
        raw(dir.path(), |db| db.insert(keys::event(due[0].key.seq), &[0xff]).unwrap());
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        assert_eq!(reads(&store).scan_due(Due::at(0), clock::now_ms() as u64, 100).unwrap(), due);
        drop(store);
        assert_eq!(ranges(dir.path()), 0);
    }

    #[tokio::test]
    async fn cancelling_a_webhooks_deliveries_reaches_those_never_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16]));
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        for id in 1..=3 {
            store.ingest(new(id, "{}", &[a, b])).await.unwrap();
        }
        let now = clock::now_ms() as u64;
        assert_eq!(reads(&store).count_due(now).unwrap(), 6);
        assert_eq!(store.cancel(Vec::new(), vec![a]).await.unwrap(), 3);
        assert_eq!(reads(&store).count_due(now).unwrap(), 3);
        assert_eq!(reads(&store).webhook_stats(&a).unwrap().count(Status::Cancelled), 3);
        assert_eq!(store.cancel(Vec::new(), vec![a]).await.unwrap(), 0, "nothing left to cancel");
    }

    #[tokio::test]
    async fn reads_leave_the_runtime_threads_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        // This test's runtime has one thread: a read made on it would hold
        // it, and the answer it waits for could never be sent.
        let (tx, rx) = mpsc::channel::<()>();
        let read = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .read(move |r| {
                        rx.recv_timeout(Duration::from_secs(10)).expect("the runtime went on meanwhile");
                        Ok(r.set_aside_count())
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        tx.send(()).unwrap();
        assert_eq!(read.await.unwrap().unwrap(), 0);
        // A reader of its own is for a plain thread only.
        let here = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.reader()));
        assert!(here.is_err(), "refused on a runtime thread");
        let s = store.clone();
        assert_eq!(thread::spawn(move || s.reader().set_aside_count()).join().unwrap(), 0);
    }

    #[tokio::test]
    async fn ingest_is_durable_idempotent_and_time_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let webhooks = [Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16])];
        {
            let store = Store::open(dir.path(), &OPTIONS).unwrap();
            assert!(matches!(Store::open(dir.path(), &OPTIONS), Err(StoreError::Locked(_))));
            let Ingested::Accepted { due: first, .. } = store.ingest(new(1, "{}", &webhooks)).await.unwrap()
            else {
                panic!()
            };
            assert_eq!(first.len(), 2);
            assert!(matches!(store.ingest(new(1, "{ }", &webhooks)).await.unwrap(), Ingested::Duplicate));
            assert!(matches!(
                store.ingest(new(1, r#"{"x":1}"#, &webhooks)).await.unwrap(),
                Ingested::Conflict
            ));
            let Ingested::Accepted { due: second, .. } = store.ingest(new(2, "{}", &webhooks)).await.unwrap()
            else {
                panic!()
            };
            assert!(second[0].key.seq > first[0].key.seq);
            record_status(&store, first[0].key, Status::Retrying, Some(1 << 50)).await;
        }
        // Reopened: everything acknowledged is there, the due index moved.
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        let seq = reads(&store).find_event(&Uuid::from_bytes([1; 16])).unwrap().unwrap();
        assert_eq!(reads(&store).deliveries(seq).unwrap().len(), 2);
        let due_now = reads(&store).scan_due(Due::at(0), clock::now_ms() as u64, 100).unwrap();
        assert_eq!(due_now.len(), 3);
        let later = reads(&store).first_due_from(Due::at(clock::now_ms() as u64 + 1)).unwrap().unwrap();
        assert_eq!(later.at_ms, 1 << 50);
        let Ingested::Accepted { due: third, .. } = store.ingest(new(3, "{}", &webhooks)).await.unwrap()
        else {
            panic!()
        };
        assert!(third[0].key.seq > seq);
    }

    #[tokio::test]
    async fn daemon_made_ids_need_no_index_and_still_deduplicate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        let mut event = new(0, r#"{"a":1}"#, &[]);
        event.id_given = false;
        let Ingested::Accepted { event, .. } = store.ingest(event).await.unwrap() else { panic!() };
        let event_id = event.event_id;
        let seq = reads(&store).find_event(&event_id).unwrap().expect("found by its own id");
        assert_eq!(reads(&store).event(seq).unwrap().unwrap().event_id, event_id);
        assert!(store.inner.db.get(keys::index(&event_id)).unwrap().is_none(), "no index entry");
        // The application may send that id back: the same content is the same event.
        let again =
            |data: &str| NewEvent { record: EventRecord { event_id, ..record(data, None) }, id_given: true };
        assert!(matches!(store.ingest(again(r#"{"a":1}"#)).await.unwrap(), Ingested::Duplicate));
        assert!(matches!(store.ingest(again(r#"{"a":2}"#)).await.unwrap(), Ingested::Conflict));
        // A look-alike id that no event carries is found nowhere.
        assert_eq!(reads(&store).find_event(&event_id_for(seq + 1)).unwrap(), None);
        assert_eq!(store.prune(vec![seq]).await.unwrap(), Pruned { deleted: 1, through: seq });
        assert_eq!(reads(&store).find_event(&event_id).unwrap(), None);
    }

    #[tokio::test]
    async fn stats_listing_requeue_cancel_and_prune_stay_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        let w = Uuid::from_bytes([9; 16]);
        let mut keys = Vec::new();
        for id in 1..=5 {
            let Ingested::Accepted { due, .. } = store.ingest(new(id, "{}", &[w])).await.unwrap() else {
                panic!()
            };
            keys.push(due[0].key);
        }
        let attempt = |error: Option<&str>| Attempt {
            delivery_id: Uuid::new_v4(),
            started_at_ms: 7,
            duration_ms: 1,
            status_code: None,
            error: error.map(str::to_owned),
            response_body: String::new(),
        };
        let fail = |key| Outcome {
            key,
            attempt: Some(attempt(Some("HTTP 500"))),
            status: Status::Failed,
            next_attempt_at: None,
            pause: None,
        };
        record_outcome(&store, fail(keys[0])).await;
        record_outcome(&store, fail(keys[1])).await;
        let ok = Outcome {
            key: keys[2],
            attempt: Some(attempt(None)),
            status: Status::Succeeded,
            next_attempt_at: None,
            pause: None,
        };
        record_outcome(&store, ok).await;
        let stats = reads(&store).webhook_stats(&w).unwrap();
        assert_eq!(
            (stats.count(Status::Failed), stats.count(Status::Succeeded), stats.count(Status::Pending)),
            (2, 1, 2)
        );
        assert_eq!(stats.consecutive_failures, 0);
        assert_eq!(stats.last_failure.as_deref(), Some("HTTP 500"));

        // Newest first, paginated, filtered.
        let page = reads(&store).webhook_deliveries(w, None, None, 2).unwrap();
        assert_eq!(page.deliveries.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![keys[4], keys[3]]);
        let page = reads(&store).webhook_deliveries(w, page.next, None, 2).unwrap();
        assert_eq!(page.deliveries.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![keys[2], keys[1]]);
        let page = reads(&store).webhook_deliveries(w, page.next, None, 2).unwrap();
        assert_eq!((page.deliveries.len(), page.next), (1, None));
        let failed = reads(&store).webhook_deliveries(w, None, Some(Status::Failed), 10).unwrap();
        assert_eq!(failed.deliveries.len(), 2);

        // Requeue only what is failed; it starts a new round.
        let due = store.requeue(keys.clone(), &[Status::Failed]).await.unwrap();
        assert_eq!(due.iter().map(|d| d.key).collect::<Vec<_>>(), vec![keys[0], keys[1]]);
        let d = reads(&store).delivery(keys[0]).unwrap().unwrap();
        assert_eq!((d.status, d.attempts_in_round(), d.attempts.len()), (Status::Pending, 0, 1));

        // Hold two (their webhook went away), cancel one of those and one
        // more; one stays pending. Held and cancelled leave the due index.
        assert_eq!(
            store.hold(vec![keys[0], keys[1], keys[2]], Vec::new()).await.unwrap(),
            2,
            "not the succeeded"
        );
        assert_eq!(store.hold(vec![keys[0]], Vec::new()).await.unwrap(), 0, "held already");
        assert_eq!(store.cancel(vec![keys[0], keys[4]], Vec::new()).await.unwrap(), 2);
        // (keys[3] was never attempted: due, but not in the index.)
        assert!(reads(&store).scan_due(Due::at(0), u64::MAX - 1, 100).unwrap().is_empty());
        assert_eq!(reads(&store).count_due(u64::MAX / 2).unwrap(), 1);
        let stats = reads(&store).webhook_stats(&w).unwrap();
        assert_eq!(
            [Status::Pending, Status::Held, Status::Cancelled, Status::Succeeded].map(|s| stats.count(s)),
            [1, 1, 2, 1]
        );

        // Prune: the settled (final or held) go, the pending one stays.
        let seqs = reads(&store).events_between(0, u64::MAX, 100).unwrap();
        let last = *seqs.last().unwrap();
        assert_eq!(store.prune(seqs.clone()).await.unwrap(), Pruned { deleted: 4, through: last });
        assert_eq!(reads(&store).events_between(0, u64::MAX, 100).unwrap(), vec![keys[3].seq]);
        assert!(reads(&store).find_event(&Uuid::from_bytes([1; 16])).unwrap().is_none());
        assert_eq!(store.cancel(vec![keys[3]], Vec::new()).await.unwrap(), 1);
        assert_eq!(
            store.prune(vec![keys[3].seq]).await.unwrap(),
            Pruned { deleted: 1, through: keys[3].seq }
        );
        assert!(reads(&store).webhook_deliveries(w, None, None, 10).unwrap().deliveries.is_empty());
        let stats = reads(&store).webhook_stats(&w).unwrap();
        assert!(Status::ALL.iter().all(|s| stats.count(*s) == 0));
    }

    #[tokio::test]
    async fn pruning_stops_after_a_batchs_worth_of_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &OPTIONS).unwrap();
        // Each event deletes 102 keys: past the 256-write bound after the third.
        let webhooks: Vec<Uuid> = (0..100u128).map(Uuid::from_u128).collect();
        let mut keys = Vec::new();
        for id in 1..=4 {
            let Ingested::Accepted { due, .. } = store.ingest(new(id, "{}", &webhooks)).await.unwrap() else {
                panic!()
            };
            keys.extend(due.iter().map(|d| d.key));
        }
        assert_eq!(store.cancel(keys, Vec::new()).await.unwrap(), 400);
        let seqs = reads(&store).events_between(0, u64::MAX, 100).unwrap();
        let first = store.prune(seqs.clone()).await.unwrap();
        assert_eq!(first, Pruned { deleted: 3, through: seqs[2] });
        let rest = reads(&store).events_between(first.through, u64::MAX, 100).unwrap();
        assert_eq!(rest, seqs[3..]);
        assert_eq!(store.prune(rest).await.unwrap(), Pruned { deleted: 1, through: seqs[3] });
        assert!(reads(&store).events_between(0, u64::MAX, 100).unwrap().is_empty());
        let stats = reads(&store).webhook_stats(&webhooks[7]).unwrap();
        assert!(Status::ALL.iter().all(|s| stats.count(*s) == 0));
    }
}
