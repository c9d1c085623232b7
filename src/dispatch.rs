//! The delivery engine: turns due entries into attempts and attempts into
//! stored outcomes.
//!
//! One async task owns the [`schedule::Queue`]. It sleeps until the earliest
//! due time, a refill point, or a message (new deliveries from ingest,
//! finished attempts from workers), whichever comes first: a timer, not a
//! polling loop. Due deliveries go to a bounded pool of plain threads that
//! run the blocking HTTP attempt ([`deliver`]), record the outcome through the
//! store's committer and report back. A delivery stays waiting in the store
//! (in the due index, or unindexed under an `F` range if never attempted)
//! until its outcome is recorded, so one in flight when the process dies is
//! attempted again after restart (at-least-once). New deliveries arrive
//! unindexed; those the queue lets go are sent back to the store to be
//! indexed, and come back as ordinary entries.
//!
//! The task runs on the async runtime, so it never calls sled itself: its
//! reads of the due index go through [`Store::read`] (tokio's blocking pool)
//! and are awaited in turn, like a message. The workers are plain threads
//! and read with a [`Reader`] of their own.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock;
use crate::config::{self, Config};
use crate::deliver::{self, Class, Sender};
use crate::event::{self, Envelope};
use crate::lanes::Lanes;
use crate::metrics::Metrics;
use crate::notify::{self, Notifier};
use crate::schedule::{self, Ended, Limits, Policy, Queue, Refill};
use crate::sign;
use crate::store::{
    Attempt, DeliveryKey, Due, EventRecord, Outcome, PauseRule, Reader, Status, Store, StoreError,
};

/// How far ahead due entries are held in memory.
const WINDOW: Duration = Duration::from_secs(30);
/// Most due entries held in memory at once.
const CAPACITY: usize = 50_000;
/// How soon to retry after storage failed to record an outcome.
const STORE_RETRY_MS: u64 = 1_000;

enum Msg {
    /// New due entries; with the event when they are its first deliveries.
    Scheduled(Vec<Due>, Option<Arc<EventRecord>>),
    /// The HTTP attempt is over; its outcome is on its way to disk.
    Attempted(DeliveryKey),
    /// The outcome is stored (or the delivery was skipped).
    Finished(DeliveryKey, Option<Due>),
    /// The outcome (or set-aside) could not be stored: the store still has
    /// the delivery as it was, with this entry; try it again.
    Unrecorded(DeliveryKey, Due),
    /// These entries, let go by the queue, could not be indexed.
    NotIndexed(Vec<Due>),
    /// The outcome of this delivery is stored and paused its webhook: the
    /// webhook's other waiting deliveries are to be held.
    Paused(DeliveryKey),
    /// These webhooks' waiting deliveries were just held in the store: the
    /// entries kept in memory for them are stale.
    Forget(HashSet<Uuid>),
}

/// Cheap-to-clone handle for telling the engine about new due deliveries.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::UnboundedSender<Msg>,
    changes: Arc<tokio::sync::Mutex<()>>,
}

/// Proof that the caller holds the one lock under which webhooks are
/// paused, resumed, stopped or brought back together with the holding or
/// releasing of their deliveries. Without it a hold could land after the
/// resume that should have followed it, leaving an active webhook's
/// deliveries held for good (both take several store requests).
pub struct Changing<'a> {
    _held: tokio::sync::MutexGuard<'a, ()>,
}

impl Dispatcher {
    /// Waits for the turn to change webhooks' states; see [`Changing`].
    pub async fn changing(&self) -> Changing<'_> {
        Changing { _held: self.changes.lock().await }
    }

    /// Queues those of `keys` whose status is in `from` for an attempt now,
    /// a thousand per store request (one request for a big backlog's keys
    /// would make one huge batch), and schedules them; returns how many.
    pub async fn requeue(
        &self,
        store: &Store,
        keys: &[DeliveryKey],
        from: &'static [Status],
    ) -> Result<usize, StoreError> {
        let mut requeued = 0;
        for chunk in keys.chunks(1000) {
            let due = store.requeue(chunk.to_vec(), from).await?;
            requeued += due.len();
            self.scheduled(due);
        }
        Ok(requeued)
    }

    /// Holds every delivery waiting for one of `webhooks`: those in the due
    /// index, and those never attempted, which the committer knows. Then
    /// the engine forgets what it kept for them.
    pub async fn hold_waiting(
        &self,
        _turn: &Changing<'_>,
        store: &Store,
        webhooks: &HashSet<Uuid>,
    ) -> Result<usize, StoreError> {
        let wanted = webhooks.clone();
        let keys = store.read(move |r| r.waiting_deliveries(|w| wanted.contains(w))).await?;
        let held = store.hold(keys, webhooks.iter().copied().collect()).await?;
        self.send(Msg::Forget(webhooks.clone()));
        Ok(held)
    }

    /// Makes a webhook's held deliveries due now, oldest first. Held ones
    /// have no due entry: they are found among the webhook's deliveries,
    /// which only a webhook that has some held needs to go through.
    pub async fn release_held(
        &self,
        _turn: &Changing<'_>,
        store: &Store,
        webhook: Uuid,
    ) -> Result<usize, StoreError> {
        let keys = store
            .read(move |r| {
                if r.webhook_stats(&webhook)?.count(Status::Held) == 0 {
                    return Ok(Vec::new());
                }
                r.webhook_delivery_keys_since(webhook, 0)
            })
            .await?;
        self.requeue(store, &keys, &[Status::Held]).await
    }

    /// `due` was just stored; attempt it when its time comes.
    pub fn scheduled(&self, due: Vec<Due>) {
        self.send(Msg::Scheduled(due, None));
    }

    /// `event` and its deliveries `due` were just stored. Must be called from
    /// the store's answer to the ingest (see [`Fresh`]).
    pub fn ingested(&self, event: Arc<EventRecord>, due: Vec<Due>) {
        self.send(Msg::Scheduled(due, Some(event)));
    }

    fn send(&self, msg: Msg) {
        // A closed channel means the engine is stopping; the entries are
        // stored and will be picked up at the next start.
        let _ = self.tx.send(msg);
    }
}

/// The running engine, for an orderly stop.
pub struct Engine {
    pub handle: Dispatcher,
    task: tokio::task::JoinHandle<()>,
    workers: Vec<thread::JoinHandle<()>>,
}

/// One delivery thread's state. Each has its own HTTP agent (and so its own
/// keep-alive connections), rebuilt when a reload brings a new config.
struct Worker {
    /// For writes, through the committer.
    store: Store,
    reader: Reader,
    config: config::Shared,
    metrics: Metrics,
    notifier: Notifier,
    sender: Option<(Arc<Config>, Sender)>,
    done: mpsc::UnboundedSender<Msg>,
}

/// Deliveries in flight per worker thread.
const IN_FLIGHT_PER_WORKER: usize = 4;

/// Idle keep-alive connections each worker keeps.
const POOL_PER_WORKER: usize = 8;

/// Descriptors one worker may hold at once: its pool's idle connections,
/// the one an attempt opens, and one a DNS lookup opens meanwhile. The API's
/// connection cap keeps this much per worker free (`server`).
pub const FDS_PER_WORKER: u64 = POOL_PER_WORKER as u64 + 2;

/// Starts the engine; it hands out work until `stop` is cancelled (then see
/// [`Engine::finish`]).
pub fn start(
    store: Store,
    config: config::Shared,
    metrics: Metrics,
    notifier: Notifier,
    stop: CancellationToken,
) -> Engine {
    let n = config.get().delivery.workers;
    let (tx, rx) = mpsc::unbounded_channel();
    // Workers hand an outcome to the committer and move on, so more
    // deliveries than workers are in flight: some waiting for a worker, some
    // for their outcome to be stored.
    let max_in_flight = n * IN_FLIGHT_PER_WORKER;
    let jobs = Arc::new(Jobs::default());
    let workers = (0..n)
        .map(|i| {
            let (store, config, metrics, done) = (store.clone(), config.clone(), metrics.clone(), tx.clone());
            let (jobs, notifier) = (jobs.clone(), notifier.clone());
            thread::Builder::new()
                .name(format!("deliver-{i}"))
                .spawn(move || {
                    // Taken on this thread: a reader is not for the runtime's.
                    let reader = store.reader();
                    let mut w = Worker { store, reader, config, metrics, notifier, sender: None, done };
                    while let Some((due, fresh)) = jobs.take() {
                        w.attempt(due, fresh);
                    }
                })
                .expect("spawn delivery worker")
        })
        .collect();
    let per_webhook = config.get().delivery.per_webhook_in_flight;
    let handle = Dispatcher { tx, changes: Arc::default() };
    let task = tokio::spawn(run(store, config, (handle.clone(), rx), jobs, max_in_flight, per_webhook, stop));
    Engine { handle, task, workers }
}

impl Engine {
    /// Once `start`'s `stop` is cancelled: waits for the engine to hand out
    /// its last work, lets attempts in flight finish for up to `grace`, and
    /// returns. Whatever did not finish stays due in the store.
    pub async fn finish(self, grace: Duration) {
        let _ = self.task.await;
        let workers = self.workers;
        let joined = tokio::task::spawn_blocking(move || workers.into_iter().for_each(|w| drop(w.join())));
        if tokio::time::timeout(grace, joined).await.is_err() {
            tracing::warn!(
                "attempts still in flight after {grace:?}; they will be retried at the next start"
            );
        }
    }
}

async fn run(
    store: Store,
    config: config::Shared,
    (engine, mut rx): (Dispatcher, mpsc::UnboundedReceiver<Msg>),
    jobs: Arc<Jobs>,
    max_in_flight: usize,
    per_webhook: usize,
    stop: CancellationToken,
) {
    // However this task ends, idle workers must wake up and exit.
    let _close = CloseOnDrop(jobs.clone());
    let mut queue = Queue::new(WINDOW, CAPACITY, per_webhook);
    let mut lanes = Lanes::default();
    let mut fresh = Fresh::default();
    let mut store_failing_until = 0;
    let mut limits_from: Option<Arc<Config>> = None;
    loop {
        // The webhooks' own limits, from the config in force (a reload
        // swaps it whole).
        let current = config.get();
        if !limits_from.as_ref().is_some_and(|c| Arc::ptr_eq(c, &current)) {
            queue.set_limits(limits(&current));
            lanes.set(&current.webhooks().iter().filter(|w| w.fifo).map(|w| w.id).collect());
            limits_from = Some(current);
        }
        let mut now = clock::now_ms() as u64;
        if now >= store_failing_until && queue.refill(now).is_some() {
            // Nothing else happens meanwhile (messages wait in the channel),
            // but a stop need not wait for a store that does not answer.
            let refilled = tokio::select! {
                refilled = refill(&store, &mut queue, now) => refilled,
                _ = stop.cancelled() => return,
            };
            now = clock::now_ms() as u64;
            if let Err(e) = refilled {
                tracing::error!(error = %e, "cannot read the due index; retrying in 1s");
                store_failing_until = now + STORE_RETRY_MS;
            }
        }
        // While the store fails writes, attempts wait too: their outcomes
        // could not be recorded.
        let store_ok = now >= store_failing_until;
        if store_ok && lanes.need_reading() {
            let read = tokio::select! {
                read = read_heads(&store, &mut lanes) => read,
                _ = stop.cancelled() => return,
            };
            if let Err(e) = read {
                tracing::error!(error = %e, "cannot read an in-order webhook's next delivery; retrying in 1s");
                store_failing_until = now + STORE_RETRY_MS;
            }
        }
        let store_ok = now >= store_failing_until;
        if store_ok {
            for due in lanes.pop_due(now) {
                jobs.give((due, None));
            }
        }
        while store_ok && queue.in_flight() < max_in_flight {
            let Some(due) = queue.pop_due(now) else { break };
            jobs.give((due, fresh.0.remove(&due.key)));
        }
        if store_ok {
            index(&store, &engine.tx, queue.take_let_go());
        }
        let mut wake = queue.next_wake(store_ok && queue.in_flight() < max_in_flight);
        wake = [wake, lanes.next_wake()].into_iter().flatten().min();
        if store_failing_until > now {
            wake = Some(wake.map_or(store_failing_until, |w| w.min(store_failing_until)));
        }
        let sleep_for = wake.map(|w| Duration::from_millis(w.saturating_sub(now)));
        let deadline = Instant::now() + sleep_for.unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                let mut store_failed = handle(&mut queue, &mut lanes, &mut fresh, (&store, &engine), msg);
                while let Ok(msg) = rx.try_recv() {
                    store_failed |= handle(&mut queue, &mut lanes, &mut fresh, (&store, &engine), msg);
                }
                if store_failed {
                    store_failing_until = clock::now_ms() as u64 + STORE_RETRY_MS;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The limits of the webhooks that set their own.
fn limits(config: &Config) -> HashMap<Uuid, Limits> {
    config
        .webhooks()
        .iter()
        .filter(|w| w.rate_limit.is_some() || w.max_in_flight.is_some() || w.fifo)
        .map(|w| (w.id, Limits { in_flight: w.max_in_flight, rate: w.rate_limit, fifo: w.fifo }))
        .collect()
}

/// Reads the head of every lane that needs it, one blocking-pool hop each.
async fn read_heads(store: &Store, lanes: &mut Lanes) -> Result<(), StoreError> {
    for (webhook, from) in lanes.to_read() {
        let head = store.read(move |r| r.first_waiting(webhook, from)).await?;
        lanes.read(webhook, head);
    }
    Ok(())
}

/// A job: a due entry, and its event if this is the delivery's first attempt.
type Job = (Due, Option<Arc<EventRecord>>);

/// Events of deliveries not attempted yet, so that a first attempt need not
/// read back what ingest just wrote (sled reads wait while the committer
/// applies a batch: two per attempt were a good part of the delivery
/// threads' context switches). Such a delivery is `pending` with no
/// attempts, and stays so until its first attempt, which only the entry's
/// first pop makes: an entry is added only when the queue takes the key (not
/// while it is in flight), and ingest announces its deliveries from the
/// store's answer, on the thread that later answers their outcomes, so no
/// outcome of a delivery can arrive before its announcement. A delivery
/// cancelled meanwhile is caught by the webhook check at attempt time.
/// Bounded: beyond `FRESH_MAX` the oldest fall back to reading the store.
#[derive(Default)]
struct Fresh(BTreeMap<DeliveryKey, Arc<EventRecord>>);

const FRESH_MAX: usize = 8192;

impl Fresh {
    fn put(&mut self, key: DeliveryKey, event: &Arc<EventRecord>) {
        self.0.insert(key, event.clone());
        if self.0.len() > FRESH_MAX {
            self.0.pop_first();
        }
    }
}

/// Due entries waiting for a delivery thread. Idle threads sleep on the
/// condvar at once: a spinning channel (crossbeam's) had 64 idle threads
/// yielding the CPU back and forth, a third of the delivery threads' time.
#[derive(Default)]
struct Jobs {
    queue: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

impl Jobs {
    fn give(&self, job: Job) {
        self.queue.lock().expect("jobs lock").0.push_back(job);
        self.ready.notify_one();
    }

    /// The next job; `None` once the queue is closed and empty.
    fn take(&self) -> Option<Job> {
        let mut q = self.queue.lock().expect("jobs lock");
        loop {
            if let Some(job) = q.0.pop_front() {
                return Some(job);
            }
            if q.1 {
                return None;
            }
            q = self.ready.wait(q).expect("jobs lock");
        }
    }
}

struct CloseOnDrop(Arc<Jobs>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.queue.lock().expect("jobs lock").1 = true;
        self.0.ready.notify_all();
    }
}

/// Applies `msg`; `true` if it says the store failed a write.
fn handle(
    queue: &mut Queue,
    lanes: &mut Lanes,
    fresh: &mut Fresh,
    (store, engine): (&Store, &Dispatcher),
    msg: Msg,
) -> bool {
    match msg {
        // An in-order webhook's deliveries are its lane's: the lane reads
        // its head again. (A new one stays unindexed until its outcome.)
        Msg::Scheduled(due, event) => {
            for d in due {
                if lanes.owns(&d.key.webhook) {
                    lanes.scheduled(d.key);
                } else if let Some(event) = &event {
                    if queue.insert_unindexed(d) {
                        fresh.put(d.key, event);
                    }
                } else {
                    queue.insert(d);
                }
            }
        }
        Msg::Attempted(key) => queue.attempted(key),
        Msg::Finished(key, next) => {
            if !lanes.finished(key, next) {
                queue.finished(key, next);
            }
        }
        Msg::Unrecorded(key, retry) => {
            if !lanes.unrecorded(key, retry) {
                queue.unrecorded(key, retry);
            }
            return true;
        }
        Msg::NotIndexed(due) => {
            queue.let_go_again(due);
            return true;
        }
        Msg::Paused(key) => {
            if !lanes.finished(key, None) {
                queue.finished(key, None);
            }
            lanes.reread(&key.webhook);
            // Off this task: it reads the webhook's waiting deliveries.
            let (store, engine) = (store.clone(), engine.clone());
            tokio::spawn(async move {
                let turn = engine.changing().await;
                // Resumed meanwhile: the resume released what was held.
                if store.paused(&key.webhook).is_none() {
                    return;
                }
                match engine.hold_waiting(&turn, &store, &HashSet::from([key.webhook])).await {
                    Ok(held) => {
                        tracing::info!(webhook_id = %key.webhook, held, "paused webhook's deliveries held")
                    }
                    Err(e) => {
                        // Each is held at its attempt instead.
                        tracing::error!(webhook_id = %key.webhook, error = %e, "cannot hold a paused webhook's deliveries")
                    }
                }
            });
        }
        Msg::Forget(webhooks) => {
            for webhook in &webhooks {
                queue.forget_webhook(webhook);
                lanes.reread(webhook);
            }
        }
    }
    false
}

/// At start: the held deliveries of every webhook the config enables and
/// no pause holds are due now. A webhook enabled while the daemon was
/// stopped, or a resume cut short by a crash (the pause was lifted, the
/// deliveries not yet released), would otherwise leave them held for good.
pub async fn release_at_start(store: Store, engine: Dispatcher, config: Arc<Config>) {
    let turn = engine.changing().await;
    let active = config.webhooks().iter().filter(|w| w.enabled && store.paused(&w.id).is_none());
    for webhook in active.map(|w| w.id) {
        match engine.release_held(&turn, &store, webhook).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(webhook_id = %webhook, released = n, "held deliveries of an active webhook due again")
            }
            Err(e) => tracing::error!(webhook_id = %webhook, error = %e, "cannot release held deliveries"),
        }
    }
}

/// Has the store index the entries the queue let go; they come back as
/// ordinary stored entries once that is on disk.
fn index(store: &Store, tx: &mpsc::UnboundedSender<Msg>, let_go: Vec<Due>) {
    if let_go.is_empty() {
        return;
    }
    let tx = tx.clone();
    let keys = let_go.iter().map(|d| d.key).collect();
    store.index_then(keys, move |indexed| {
        let _ = tx.send(match indexed {
            Ok(due) => Msg::Scheduled(due, None),
            Err(e) => {
                tracing::error!(error = %e, "cannot index deliveries waiting for a first attempt; retrying in 1s");
                Msg::NotIndexed(let_go)
            }
        });
    });
}

/// Reads what the queue asks for until it asks for nothing more, one
/// blocking-pool hop per read. The queue is this task's alone, so it sees
/// each answer as if read in place.
async fn refill(store: &Store, queue: &mut Queue, now: u64) -> Result<(), StoreError> {
    while let Some(r) = queue.refill(now) {
        let (entries, next) = store.read(move |store| read_refill(store, r)).await?;
        queue.refilled(r, entries, next);
    }
    Ok(())
}

/// The store's answer to `r`, as [`Queue::refilled`] takes it.
fn read_refill(store: &Reader, r: Refill) -> Result<(Vec<Due>, Option<Due>), StoreError> {
    match r {
        Refill::Window { from, until_ms, limit } => {
            let entries = store.scan_due(from, until_ms, limit)?;
            let next =
                if entries.len() < limit { store.first_due_from(Due::at(until_ms + 1))? } else { None };
            Ok((entries, next))
        }
        Refill::Webhook { webhook, from, until, limit, scan } => {
            store.scan_webhook_due(webhook, from, until, limit, scan)
        }
    }
}

impl Worker {
    /// The config in force and an agent built from it.
    fn current(&mut self) -> (Arc<Config>, Sender) {
        let config = self.config.get();
        if !self.sender.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, &config)) {
            let d = &config.delivery;
            self.sender = Some((config.clone(), Sender::new(d, POOL_PER_WORKER)));
        }
        (config, self.sender.as_ref().expect("just set").1.clone())
    }

    /// The event of a due delivery, its status and the attempts made in its
    /// current round, or `None` if it is not to be attempted now (the
    /// dispatcher has been told).
    fn load(&mut self, due: Due) -> Option<(Arc<EventRecord>, Status, usize)> {
        let key = due.key;
        let (event, delivery) = match (self.reader.event(key.seq), self.reader.delivery(key)) {
            (Ok(Some(e)), Ok(Some(d))) => (e, d),
            (e, d) => {
                // Written by another version, or damaged: keep it, but out of
                // the due index, so it is not tried (and logged) forever.
                tracing::error!(event = ?e.err(), delivery = ?d.err(), seq = key.seq, webhook_id = %key.webhook, "cannot load a due delivery; setting it aside");
                let done = self.done.clone();
                self.store.set_aside(due, move |r| {
                    let _ = done.send(match r {
                        Ok(()) => Msg::Finished(key, None),
                        Err(_) => Msg::Unrecorded(key, due),
                    });
                });
                return None;
            }
        };
        // A stale entry (the delivery finished, or its retry is now due
        // later than this entry says) must not cause an early attempt.
        if !matches!(delivery.status, Status::Pending | Status::Retrying) {
            let _ = self.done.send(Msg::Finished(key, None));
            return None;
        }
        let stored_next = delivery.next_attempt_at.map(|at| Due { at_ms: at.max(0) as u64, key });
        if stored_next.is_some_and(|next| next.at_ms > due.at_ms) {
            let _ = self.done.send(Msg::Finished(key, stored_next));
            return None;
        }
        Some((Arc::new(event), delivery.status, delivery.attempts_in_round()))
    }

    /// Makes one attempt of `due` (or holds it) and records the outcome;
    /// the dispatcher hears of it once it is stored. `fresh`: its event, if
    /// this is the delivery's first attempt.
    fn attempt(&mut self, due: Due, fresh: Option<Arc<EventRecord>>) {
        let key = due.key;
        let loaded = fresh.map(|e| (e, Status::Pending, 0)).or_else(|| self.load(due));
        let Some((event, status_before, attempts_in_round)) = loaded else {
            return;
        };
        let (config, sender) = self.current();
        let webhook = config.webhook(&key.webhook).filter(|w| w.enabled);
        let paused = self.store.paused(&key.webhook);
        let (attempt, status, next_attempt_at, pause) = match (webhook, paused) {
            (None, _) => {
                tracing::info!(webhook_id = %key.webhook, event_id = %event.event_id, "webhook removed or disabled; delivery held until it is back");
                (None, Status::Held, None, None)
            }
            (Some(_), Some(p)) => {
                tracing::info!(webhook_id = %key.webhook, event_id = %event.event_id, reason = p.reason.as_str(), "webhook paused; delivery held until it is resumed");
                // Put back as it was: the committer holds it if the webhook
                // is still paused when this is stored, and if a resume came
                // in between it is due again now. (Stored as held, it could
                // land after the resume released the rest, and stay held.)
                (None, status_before, Some(clock::now_ms()), None)
            }
            (Some(webhook), None) => {
                let delivery_id = Uuid::new_v4();
                let body = event::envelope(&Envelope {
                    event_type: event.event_type,
                    event_id: event.event_id,
                    webhook_id: webhook.id,
                    delivery_id,
                    timestamp_ms: event.timestamp_ms,
                    client_id: event.client_id,
                    test: event.test,
                    data: &event.data,
                });
                let started_at_ms = clock::now_ms();
                let ts = (started_at_ms / 1000).to_string();
                let signature =
                    sign::header(webhook.signing_secrets(started_at_ms), started_at_ms / 1000, &body);
                let (did, wid, eid) =
                    (delivery_id.to_string(), webhook.id.to_string(), event.event_id.to_string());
                let mut headers =
                    deliver::signed_headers(event.event_type.as_str(), &did, &ts, &wid, &signature).to_vec();
                // Standard Webhooks' id must be stable across retries: the event_id.
                let standard = webhook
                    .standard_key
                    .as_ref()
                    .map(|key| sign::standard_signature(key.expose(), &eid, started_at_ms / 1000, &body));
                if let Some(sig) = &standard {
                    headers.extend([
                        ("webhook-id", eid.as_str()),
                        ("webhook-timestamp", ts.as_str()),
                        ("webhook-signature", sig.as_str()),
                    ]);
                }
                // The webhook's own headers; its User-Agent replaces ours.
                if webhook.headers.iter().any(|(name, _)| name == "user-agent") {
                    headers.retain(|(name, _)| *name != "User-Agent");
                }
                headers.extend(webhook.headers.iter().map(|(n, v)| (n.as_str(), v.expose().as_str())));
                let answer = sender.post(&webhook.url, &headers, &body, webhook.timeout);
                self.metrics.attempt(answer.outcome_label(), answer.duration.as_secs_f64());
                let duration_ms = answer.duration.as_millis() as u64;
                let policy = Policy {
                    retry_schedule: &config.delivery.retry_schedule,
                    jitter: config.delivery.retry_jitter,
                    max_retry_after: config.delivery.max_retry_after,
                };
                let ended = match answer.class {
                    Class::Success => Ended::Succeeded,
                    Class::ShortOfResources => Ended::ShortOfResources,
                    _ => Ended::Failed,
                };
                let (status, next) = schedule::after_attempt(
                    ended,
                    status_before,
                    attempts_in_round,
                    &policy,
                    answer.retry_after,
                    started_at_ms + duration_ms as i64,
                    if policy.jitter > 0.0 { fastrand::f64() } else { 0.0 },
                );
                tracing::info!(
                    webhook_id = %webhook.id,
                    event_id = %event.event_id,
                    delivery_id = %delivery_id,
                    status_code = answer.status_code,
                    error = answer.error.as_deref(),
                    duration_ms,
                    outcome = if ended.counts() { status.as_str() } else { "put back" },
                    "attempt"
                );
                let attempt = Attempt {
                    delivery_id,
                    started_at_ms,
                    duration_ms,
                    status_code: answer.status_code,
                    error: answer.error,
                    response_body: answer.response_body,
                };
                // 410 Gone: the receiver says the endpoint is gone for good
                // (Standard Webhooks: disable it). Otherwise a long enough
                // run of failures pauses it.
                let pause = match answer.status_code {
                    Some(410) => Some(PauseRule::Gone),
                    _ => webhook.pause_after.map(|after| PauseRule::Failing {
                        for_ms: after.as_millis() as i64,
                        attempts: config.delivery.pause_min_failures,
                    }),
                };
                // A put-back attempt is logged above and counted in the
                // metrics, but not kept: it would count against the retry
                // schedule and the webhook's health.
                (ended.counts().then_some(attempt), status, next, pause)
            }
        };
        let _ = self.done.send(Msg::Attempted(key));
        // The worker moves on at once; the dispatcher hears of the attempt
        // only once its outcome is on disk, so the delivery stays in flight
        // (and is not handed out again) until then.
        let done = self.done.clone();
        let (store, shared, notifier) = (self.store.clone(), self.config.clone(), self.notifier.clone());
        let metrics = self.metrics.clone();
        let outcome = Outcome { key, attempt, status, next_attempt_at, pause };
        self.store.record_then(outcome, move |written| {
            if written.is_ok() {
                metrics.settled(status);
            }
            let _ = done.send(match written {
                Ok(Some(paused)) => {
                    tracing::warn!(webhook_id = %key.webhook, reason = paused.reason.as_str(), "webhook paused: its deliveries are held until it is resumed");
                    notifier.send(&shared, key.webhook, notify::Change::Paused(paused));
                    Msg::Paused(key)
                }
                // Held by the store, not retried, if its webhook is paused.
                Ok(None) if store.paused(&key.webhook).is_some() => Msg::Finished(key, None),
                Ok(None) => Msg::Finished(key, next_attempt_at.map(|at| Due { at_ms: at as u64, key })),
                Err(e) => {
                    tracing::error!(error = %e, "cannot record an attempt; it will be made again");
                    Msg::Unrecorded(key, due)
                }
            });
        });
    }
}
