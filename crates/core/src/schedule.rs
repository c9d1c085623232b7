//! What to attempt next, and when: pure logic, no I/O.
//!
//! The durable due index in the store is the source of truth. [`Queue`] holds
//! in memory only the entries due within a window ahead (at most `capacity`
//! of them) plus the keys of attempts in flight, and asks to be refilled from
//! the store as time moves on. Its invariant: every stored due entry below
//! `cursor` is in memory (ready, held, or in flight) or, for a webhook that
//! spilled, at or after that webhook's `spilled` mark; nothing at or above
//! `cursor` is in memory. So a backlog of a million deliveries waiting hours
//! for a retry costs no memory until their time comes close.
//!
//! A new delivery's entry is not in the store's index yet (the store's
//! `unindexed` module explains why): it arrives with [`Queue::insert_unindexed`] and lives only
//! here until its first outcome is stored. Wherever the queue would leave an
//! entry to the store, an unindexed one is *let go* instead: the dispatcher
//! takes it ([`Queue::take_let_go`]), has the store index it, and inserts it
//! again once that is done, by which time the store has it.
//!
//! Isolation: at most `per_webhook` attempts of one webhook are in flight
//! (handed to a worker and not yet answered; waiting for the outcome to be
//! stored does not count, it holds no worker), or the webhook's own
//! [`Limits`]: its `in_flight`, and its `rate` of attempts per second, a
//! token bucket holding a second's worth (at least one). An entry over
//! either limit waits; it never fails.
//! Due entries of a webhook at that limit are *held* aside (at most
//! [`HELD_MAX`] per webhook; the rest stay in the store and are read back
//! as the held ones drain), so a hanging or dead endpoint never takes the
//! workers or the memory that other webhooks need.
//!
//! [`after_attempt`] is the retry policy: which status an attempt leads to and
//! when the next one is due. An attempt that never reached the receiver
//! because this machine ran short of a resource is put back instead: due
//! again after [`PUT_BACK`], no retry used, nothing held against the
//! receiver.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use uuid::Uuid;

use crate::delivery::{DeliveryKey, Due, Status};

/// Most due entries held in memory for one webhook at its in-flight limit.
pub const HELD_MAX: usize = 1024;

/// A read of the due index the queue needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refill {
    /// Entries `from..`, due no later than `until_ms`, at most `limit`.
    Window { from: Due, until_ms: u64, limit: usize },
    /// Entries of `webhook` in `from..until`, at most `limit`, looking at no
    /// more than `scan` entries in all.
    Webhook { webhook: Uuid, from: Due, until: Due, limit: usize, scan: usize },
}

/// A webhook's own limits, where its config sets them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// Most attempts in flight, instead of the queue's `per_webhook`.
    pub in_flight: Option<usize>,
    /// Most attempts started per second.
    pub rate: Option<f64>,
    /// In order, one at a time: the dispatcher's, not the queue's to
    /// attempt (the queue lets its entries go).
    pub fifo: bool,
}

/// A token bucket: `rate` tokens a second, holding at most a second's
/// worth (and at least one), full at first.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    fn new(rate: f64, now_ms: u64) -> Bucket {
        Bucket { rate, tokens: rate.max(1.0), at_ms: now_ms }
    }

    fn refill(&mut self, now_ms: u64) {
        let earned = now_ms.saturating_sub(self.at_ms) as f64 * self.rate / 1000.0;
        self.tokens = (self.tokens + earned).min(self.rate.max(1.0));
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// Takes a token if there is one at `now_ms`.
    fn take(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        let ok = self.tokens >= 1.0;
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }

    /// When the next token will be there.
    fn next_token_ms(&self) -> u64 {
        self.at_ms + ((1.0 - self.tokens).max(0.0) * 1000.0 / self.rate).ceil() as u64
    }
}

#[derive(Default)]
struct Held {
    set: BTreeSet<Due>,
    /// Entries of this webhook at or after this mark (and below the cursor)
    /// were let go to the store and must be read back.
    spilled: Option<Due>,
}

pub struct Queue {
    ready: BTreeSet<Due>,
    held: HashMap<Uuid, Held>,
    /// Handed out and not yet finished (stored): never handed out twice.
    in_flight: HashSet<DeliveryKey>,
    /// A second entry that came for a delivery in flight, kept until the
    /// attempt lands: the attempt may have read the delivery before an
    /// operator made it due again (a resume, a redelivery), and then reports
    /// it settled. Going through it once more costs a read if it is stale;
    /// dropping it would leave a waiting delivery out of memory.
    later: HashMap<DeliveryKey, Due>,
    /// Deliveries whose entry here is not in the store's index.
    unindexed: HashSet<DeliveryKey>,
    /// Unindexed entries no longer held here, for the store to index.
    let_go: Vec<Due>,
    /// The part of `in_flight` whose HTTP attempt is not over, per webhook.
    attempting: HashSet<DeliveryKey>,
    flying: HashMap<Uuid, usize>,
    per_webhook: usize,
    /// Webhooks with limits of their own (usually none).
    limits: HashMap<Uuid, Limits>,
    buckets: HashMap<Uuid, Bucket>,
    /// Webhooks with entries held for want of a token, and when the next
    /// token comes.
    rate_waiting: HashMap<Uuid, u64>,
    cursor: Due,
    /// Due time of the earliest stored entry at or above `cursor`, if any is known.
    beyond: Option<u64>,
    window_ms: u64,
    capacity: usize,
}

impl Queue {
    /// An empty queue that will load everything due from the store.
    pub fn new(window: Duration, capacity: usize, per_webhook: usize) -> Queue {
        Queue {
            ready: BTreeSet::new(),
            held: HashMap::new(),
            in_flight: HashSet::new(),
            later: HashMap::new(),
            unindexed: HashSet::new(),
            let_go: Vec::new(),
            attempting: HashSet::new(),
            flying: HashMap::new(),
            per_webhook: per_webhook.max(1),
            limits: HashMap::new(),
            buckets: HashMap::new(),
            rate_waiting: HashMap::new(),
            cursor: Due::at(0),
            beyond: Some(0),
            window_ms: window.as_millis() as u64,
            capacity: capacity.max(2),
        }
    }

    /// A due entry was just stored (a new delivery or a retry); `false` if
    /// its delivery is in flight (and so the entry waits for the attempt to
    /// land).
    pub fn insert(&mut self, d: Due) -> bool {
        // A window read may already have loaded it (the store shows a batch
        // before its sync answers), and it may even be in flight by now.
        if self.in_flight.contains(&d.key) {
            self.keep_for_later(d);
            return false;
        }
        if d < self.cursor {
            self.ready.insert(d);
            self.trim();
        } else {
            self.note_beyond(d.at_ms);
            self.leave(d);
        }
        true
    }

    /// A new delivery's entry, not in the store's index; `false` (and
    /// ignored) if its delivery is in flight.
    pub fn insert_unindexed(&mut self, d: Due) -> bool {
        if self.in_flight.contains(&d.key) {
            self.keep_for_later(d);
            return false;
        }
        self.unindexed.insert(d.key);
        self.insert(d)
    }

    /// `d` came while its delivery is in flight: the earliest such entry
    /// goes back in when the attempt lands.
    fn keep_for_later(&mut self, d: Due) {
        let kept = self.later.entry(d.key).or_insert(d);
        *kept = (*kept).min(d);
    }

    /// `d` is no longer held here: fine if the store has it, let go if not.
    fn leave(&mut self, d: Due) {
        if self.unindexed.remove(&d.key) {
            self.let_go.push(d);
        }
    }

    /// The entries let go since the last call: they must be indexed, then
    /// inserted again.
    pub fn take_let_go(&mut self) -> Vec<Due> {
        std::mem::take(&mut self.let_go)
    }

    /// Entries taken with [`Queue::take_let_go`] that the store could not
    /// index: to be taken again later.
    pub fn let_go_again(&mut self, due: Vec<Due>) {
        self.let_go.extend(due);
    }

    fn note_beyond(&mut self, at_ms: u64) {
        self.beyond = Some(self.beyond.map_or(at_ms, |b| b.min(at_ms)));
    }

    /// Keeps memory bounded: the latest ready entries go back to living only
    /// in the store, and the cursor moves down to them (held entries above
    /// the new cursor go too, to keep the invariant).
    fn trim(&mut self) {
        if self.ready.len() <= self.capacity {
            return;
        }
        let mut last = self.cursor;
        while self.ready.len() > self.capacity - self.capacity / 10 {
            last = self.ready.pop_last().expect("non-empty");
            self.leave(last);
        }
        self.lower_cursor(last);
    }

    /// Moves the cursor down to `cursor`: what is kept at or above it goes
    /// back to living only in the store (or is let go), and is read again
    /// when the window gets there.
    fn lower_cursor(&mut self, cursor: Due) {
        self.cursor = cursor;
        self.note_beyond(cursor.at_ms);
        let mut gone: Vec<Due> = self.ready.split_off(&cursor).into_iter().collect();
        for h in self.held.values_mut() {
            gone.extend(h.set.split_off(&cursor));
            // Spilled entries at or above the cursor are the window's to read.
            if h.spilled.is_some_and(|s| s >= cursor) {
                h.spilled = None;
            }
        }
        self.held.retain(|_, h| !h.set.is_empty() || h.spilled.is_some());
        for d in gone {
            self.leave(d);
        }
    }

    /// Sets the webhooks' own limits (those not named have none). A webhook
    /// whose rate limit goes gets the entries it held for tokens back.
    pub fn set_limits(&mut self, limits: HashMap<Uuid, Limits>) {
        // Entries of a webhook that is no longer in order were let go
        // below the cursor: read everything again.
        let unordered = self.limits.iter().any(|(w, l)| l.fifo && !limits.get(w).is_some_and(|l| l.fifo));
        if unordered {
            self.forget_all();
        }
        self.buckets.retain(|w, b| limits.get(w).and_then(|l| l.rate) == Some(b.rate));
        let freed: Vec<Uuid> =
            self.rate_waiting.keys().filter(|w| !self.buckets.contains_key(*w)).copied().collect();
        self.limits = limits;
        for webhook in freed {
            self.rate_waiting.remove(&webhook);
            self.release_held(webhook, self.free_slots(&webhook));
        }
    }

    /// Forgets every entry not in flight and reads the index again from the
    /// start (unindexed entries are let go, to be indexed first).
    fn forget_all(&mut self) {
        let ready = std::mem::take(&mut self.ready);
        let held: Vec<Due> = std::mem::take(&mut self.held).into_values().flat_map(|h| h.set).collect();
        for d in ready.into_iter().chain(held) {
            self.leave(d);
        }
        self.cursor = Due::at(0);
        self.beyond = Some(0);
    }

    /// Forgets `webhook`'s entries not in flight: their deliveries were
    /// just held in the store (a pause, a webhook disabled), and entries
    /// kept from before would otherwise spend its tokens on nothing now and
    /// jump ahead of the rest once they are released.
    /// Whatever the store still has due of them (an outcome stored after
    /// the hold, say) is read again: the cursor goes back to the earliest.
    pub fn forget_webhook(&mut self, webhook: &Uuid) {
        let (mut gone, kept): (BTreeSet<Due>, BTreeSet<Due>) =
            std::mem::take(&mut self.ready).into_iter().partition(|d| d.key.webhook == *webhook);
        self.ready = kept;
        let spilled = self.held.remove(webhook).and_then(|h| {
            gone.extend(h.set);
            h.spilled
        });
        self.rate_waiting.remove(webhook);
        let earliest = gone.first().copied().into_iter().chain(spilled).min();
        if let Some(first) = earliest.filter(|first| *first < self.cursor) {
            self.lower_cursor(first);
        }
        for d in gone {
            self.leave(d);
        }
    }

    fn is_fifo(&self, webhook: &Uuid) -> bool {
        !self.limits.is_empty() && self.limits.get(webhook).is_some_and(|l| l.fifo)
    }

    /// Most attempts of `webhook` in flight at once.
    fn cap(&self, webhook: &Uuid) -> usize {
        if self.limits.is_empty() {
            return self.per_webhook;
        }
        self.limits.get(webhook).and_then(|l| l.in_flight).unwrap_or(self.per_webhook).max(1)
    }

    /// How many more attempts of `webhook` may be in flight now.
    fn free_slots(&self, webhook: &Uuid) -> usize {
        self.cap(webhook).saturating_sub(self.flying.get(webhook).copied().unwrap_or(0))
    }

    /// Takes one of `webhook`'s tokens at `now_ms`; `true` if it has no rate limit.
    fn take_token(&mut self, webhook: Uuid, now_ms: u64) -> bool {
        if self.limits.is_empty() {
            return true;
        }
        let Some(rate) = self.limits.get(&webhook).and_then(|l| l.rate) else { return true };
        let bucket = self.buckets.entry(webhook).or_insert_with(|| Bucket::new(rate, now_ms));
        let took = bucket.take(now_ms);
        // Entries held back wait for the next token, which nothing else
        // would wake the queue for.
        let more = self.held.get(&webhook).is_some_and(|h| !h.set.is_empty());
        if !took || more {
            self.rate_waiting.insert(webhook, bucket.next_token_ms());
        }
        took
    }

    /// The webhook's earliest `n` held entries become ready.
    fn release_held(&mut self, webhook: Uuid, n: usize) {
        if let Some(h) = self.held.get_mut(&webhook) {
            for _ in 0..n {
                let Some(d) = h.set.pop_first() else { break };
                self.ready.insert(d);
            }
            if h.set.is_empty() && h.spilled.is_none() {
                self.held.remove(&webhook);
            }
        }
    }

    /// The next delivery due at `now_ms` whose webhook may take another
    /// attempt, now counted as in flight.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<Due> {
        if !self.rate_waiting.is_empty() {
            let due: Vec<Uuid> =
                self.rate_waiting.iter().filter(|(_, at)| **at <= now_ms).map(|(w, _)| *w).collect();
            for webhook in due {
                self.rate_waiting.remove(&webhook);
                self.release_held(webhook, 1);
            }
        }
        loop {
            let first = *self.ready.first()?;
            if first.at_ms > now_ms {
                return None;
            }
            self.ready.pop_first();
            // A second entry for a delivery in flight is stale or early; the
            // attempt in flight reports the delivery's real next entry (or
            // read it too soon: see `later`).
            if self.in_flight.contains(&first.key) {
                self.keep_for_later(first);
                continue;
            }
            let webhook = first.key.webhook;
            if self.is_fifo(&webhook) {
                self.leave(first);
                continue;
            }
            let flying = self.flying.get(&webhook).copied().unwrap_or(0);
            if flying < self.cap(&webhook) && self.take_token(webhook, now_ms) {
                *self.flying.entry(webhook).or_default() += 1;
                self.in_flight.insert(first.key);
                self.attempting.insert(first.key);
                return Some(first);
            }
            let held = self.held.entry(webhook).or_default();
            // Once a webhook has spilled, its newer entries wait in the store
            // behind the spilled ones, so it is served oldest first.
            if held.spilled.is_some_and(|s| first >= s) {
                self.leave(first);
                continue;
            }
            held.set.insert(first);
            if held.set.len() > HELD_MAX {
                let last = held.set.pop_last().expect("non-empty");
                held.spilled = Some(held.spilled.map_or(last, |s| s.min(last)));
                self.leave(last);
            }
        }
    }

    /// The HTTP attempt of `key` is over (its outcome is not stored yet): the
    /// webhook's earliest held entry, if any, becomes ready.
    pub fn attempted(&mut self, key: DeliveryKey) {
        if !self.attempting.remove(&key) {
            return;
        }
        if let Some(n) = self.flying.get_mut(&key.webhook) {
            *n -= 1;
            if *n == 0 {
                self.flying.remove(&key.webhook);
            }
        }
        self.release_held(key.webhook, 1);
    }

    /// `key` is over and stored; `next` is its stored next due entry, if any.
    pub fn finished(&mut self, key: DeliveryKey, next: Option<Due>) {
        self.unindexed.remove(&key);
        self.land(key, next);
    }

    /// The outcome of `key` could not be stored, so the store's index is as
    /// before (an unindexed delivery stays so); try again at `retry`.
    pub fn unrecorded(&mut self, key: DeliveryKey, retry: Due) {
        self.land(key, Some(retry));
    }

    /// `key` is no longer in flight; `next` is its entry from now on, if any.
    fn land(&mut self, key: DeliveryKey, next: Option<Due>) {
        self.attempted(key);
        self.in_flight.remove(&key);
        for d in next.into_iter().chain(self.later.remove(&key)) {
            self.insert(d);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    #[cfg(test)]
    fn ready(&self) -> usize {
        self.ready.len()
    }

    #[cfg(test)]
    fn pop_key(&mut self, now_ms: u64) -> Option<DeliveryKey> {
        self.pop_due(now_ms).map(|d| d.key)
    }

    /// What to read from the store now, if anything: a webhook whose held
    /// entries ran low while more of its entries wait in the store first,
    /// then the window.
    pub fn refill(&self, now_ms: u64) -> Option<Refill> {
        let drained = self.held.iter().find(|(_, h)| h.set.len() < HELD_MAX / 2 && h.spilled.is_some());
        if let Some((webhook, h)) = drained {
            return Some(Refill::Webhook {
                webhook: *webhook,
                from: h.spilled.expect("filtered on"),
                until: self.cursor,
                limit: HELD_MAX - h.set.len(),
                scan: self.capacity,
            });
        }
        let beyond = self.beyond?;
        let room = self.capacity - self.ready.len().min(self.capacity);
        if room < self.capacity / 2 || beyond > now_ms + self.window_ms / 2 {
            return None;
        }
        Some(Refill::Window { from: self.cursor, until_ms: now_ms + self.window_ms, limit: room })
    }

    fn in_memory(&self, d: &Due) -> bool {
        self.in_flight.contains(&d.key)
            || self.ready.contains(d)
            || self.held.get(&d.key.webhook).is_some_and(|h| h.set.contains(d))
    }

    /// The store answered `r` with `entries`. For a window read, `next` is
    /// the first stored entry after `until_ms` (looked up only when fewer than
    /// `limit` came back); for a webhook read, `next` is where to go on from
    /// (`None` when the range is exhausted).
    pub fn refilled(&mut self, r: Refill, entries: Vec<Due>, next: Option<Due>) {
        match r {
            Refill::Window { until_ms, limit, .. } => {
                let full = entries.len() >= limit;
                let last = entries.last().copied();
                for d in entries {
                    if !self.in_memory(&d) {
                        self.ready.insert(d);
                    }
                }
                match (full, last) {
                    (true, Some(last)) => {
                        self.cursor = last.successor();
                        self.beyond = Some(self.cursor.at_ms);
                    }
                    _ => {
                        self.cursor = Due::at(until_ms + 1);
                        self.beyond = next.map(|d| d.at_ms);
                    }
                }
                self.trim();
            }
            Refill::Webhook { webhook, .. } => {
                let fresh: Vec<Due> = entries.into_iter().filter(|d| !self.in_memory(d)).collect();
                let h = self.held.entry(webhook).or_default();
                h.set.extend(fresh);
                h.spilled = next;
                // Whatever the webhook can take now moves to ready at once.
                self.release_held(webhook, self.free_slots(&webhook));
            }
        }
    }

    /// When the dispatcher must look again (ms since epoch), if ever by itself.
    /// `can_start` says whether a worker is free to take a due delivery.
    pub fn next_wake(&self, can_start: bool) -> Option<u64> {
        let first_due = self.ready.first().filter(|_| can_start).map(|d| d.at_ms);
        let refill_at = self.beyond.map(|b| b.saturating_sub(self.window_ms / 2));
        let token_at = self.rate_waiting.values().min().copied().filter(|_| can_start);
        [first_due, refill_at, token_at].into_iter().flatten().min()
    }
}

/// How the retry policy is configured.
pub struct Policy<'a> {
    /// `retry_schedule[i]` is the delay before retry `i + 1`.
    pub retry_schedule: &'a [Duration],
    /// Each delay is stretched by a random fraction of itself below this.
    pub jitter: f64,
    /// The most a receiver's `Retry-After` may push a retry back.
    pub max_retry_after: Duration,
}

/// How an attempt ended, as the retry policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Succeeded,
    /// The receiver or the way to it failed it: an error status, a timeout,
    /// a refused or reset connection, a TLS error, a blocked address.
    Failed,
    /// It never reached the receiver: this machine ran short of descriptors,
    /// socket buffers or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM). Not the
    /// receiver's doing, so it neither uses up a retry nor counts as the
    /// receiver's failure.
    ShortOfResources,
}

impl Ended {
    /// Whether the attempt goes into the delivery's log, where it counts
    /// against the retry schedule and the webhook's health.
    pub fn counts(self) -> bool {
        self != Ended::ShortOfResources
    }
}

/// How soon a delivery put back for want of a local resource is due again:
/// a passing shortage delays it by about this, a lasting one costs one try
/// per delivery this often (descriptors free up as connections close).
pub const PUT_BACK: Duration = Duration::from_secs(1);

/// The retry policy. `status_before` is the delivery's status and
/// `attempts_before` the attempts of this round made before this one. A
/// failed attempt is retried after its scheduled delay (measured from the
/// end of the attempt, stretched by up to `jitter` times itself using
/// `random` in `[0, 1)`) or after the receiver's `Retry-After` (capped),
/// whichever is later; the number of attempts never changes. One that ran
/// short of a local resource is put back: same status, due [`PUT_BACK`]
/// after it ended, with its schedule untouched.
pub fn after_attempt(
    ended: Ended,
    status_before: Status,
    attempts_before: usize,
    policy: &Policy,
    retry_after: Option<Duration>,
    ended_at_ms: i64,
    random: f64,
) -> (Status, Option<i64>) {
    match ended {
        Ended::Succeeded => return (Status::Succeeded, None),
        Ended::ShortOfResources => return (status_before, Some(ended_at_ms + PUT_BACK.as_millis() as i64)),
        Ended::Failed => {}
    }
    match policy.retry_schedule.get(attempts_before) {
        Some(delay) => {
            let scheduled = delay.mul_f64(1.0 + policy.jitter * random);
            let asked = retry_after.unwrap_or_default().min(policy.max_retry_after);
            (Status::Retrying, Some(ended_at_ms + scheduled.max(asked).as_millis() as i64))
        }
        None => (Status::Failed, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn due(at_ms: u64, seq: u64) -> Due {
        due_to(at_ms, seq, 1)
    }

    fn due_to(at_ms: u64, seq: u64, webhook: u8) -> Due {
        Due { at_ms, key: DeliveryKey { seq, webhook: Uuid::from_bytes([webhook; 16]) } }
    }

    /// A stand-in for the store's due index: a sorted set, read the way the
    /// dispatcher reads the store.
    struct Index(BTreeSet<Due>);

    impl Index {
        fn serve(&self, q: &mut Queue, now: u64) {
            while let Some(r) = q.refill(now) {
                match r {
                    Refill::Window { from, until_ms, limit } => {
                        let entries: Vec<Due> = self
                            .0
                            .range(from..)
                            .take_while(|d| d.at_ms <= until_ms)
                            .take(limit)
                            .copied()
                            .collect();
                        let next = self.0.range(Due::at(until_ms + 1)..).next().copied();
                        q.refilled(r, entries, next);
                    }
                    Refill::Webhook { webhook, from, until, limit, .. } => {
                        let entries: Vec<Due> = self
                            .0
                            .range(from..until)
                            .filter(|d| d.key.webhook == webhook)
                            .take(limit)
                            .copied()
                            .collect();
                        let next = (entries.len() == limit).then(|| entries.last().unwrap().successor());
                        q.refilled(r, entries, next);
                    }
                }
            }
        }

        /// What the dispatcher does with let-go entries: the store indexes
        /// them, then they are inserted as stored entries.
        fn index_let_go(&mut self, q: &mut Queue) {
            for d in q.take_let_go() {
                assert!(self.0.insert(d), "{d:?} let go twice");
                q.insert(d);
            }
        }

        /// An attempt finished: its entry leaves the index (no retry).
        fn done(&mut self, q: &mut Queue, key: DeliveryKey) {
            self.0.retain(|d| d.key != key);
            q.finished(key, None);
        }
    }

    const POLICY: Policy = Policy {
        retry_schedule: &[Duration::from_millis(100), Duration::from_millis(200)],
        jitter: 0.0,
        max_retry_after: Duration::from_secs(3600),
    };

    #[test]
    fn retry_policy_follows_the_schedule_then_fails() {
        assert_eq!(
            after_attempt(Ended::Failed, Status::Retrying, 0, &POLICY, None, 1000, 0.5),
            (Status::Retrying, Some(1100))
        );
        assert_eq!(
            after_attempt(Ended::Failed, Status::Retrying, 1, &POLICY, None, 1000, 0.5),
            (Status::Retrying, Some(1200))
        );
        assert_eq!(
            after_attempt(Ended::Failed, Status::Retrying, 2, &POLICY, None, 1000, 0.5),
            (Status::Failed, None)
        );
        assert_eq!(
            after_attempt(Ended::Succeeded, Status::Retrying, 2, &POLICY, None, 1000, 0.5),
            (Status::Succeeded, None)
        );
        let none = Policy { retry_schedule: &[], ..POLICY };
        assert_eq!(
            after_attempt(Ended::Failed, Status::Retrying, 0, &none, None, 1000, 0.5),
            (Status::Failed, None)
        );
    }

    #[test]
    fn a_local_shortage_puts_the_delivery_back_without_using_a_retry() {
        let short = |before, attempts| {
            after_attempt(Ended::ShortOfResources, before, attempts, &POLICY, None, 1000, 0.5)
        };
        // Whatever its place in the schedule, even past the last retry, it
        // keeps its status and is due again shortly.
        for attempts in 0..=3 {
            assert_eq!(short(Status::Pending, attempts), (Status::Pending, Some(2000)), "{attempts}");
            assert_eq!(short(Status::Retrying, attempts), (Status::Retrying, Some(2000)), "{attempts}");
        }
        let none = Policy { retry_schedule: &[], ..POLICY };
        let put_back = after_attempt(Ended::ShortOfResources, Status::Pending, 0, &none, None, 1000, 0.0);
        assert_eq!(put_back, (Status::Pending, Some(1000 + PUT_BACK.as_millis() as i64)));
        // Not recorded: the attempts the schedule counts stay as they were.
        assert!(!Ended::ShortOfResources.counts());
        assert!(Ended::Failed.counts() && Ended::Succeeded.counts());
    }

    #[test]
    fn retry_after_can_only_delay_and_is_capped() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(
            after_attempt(Ended::Failed, Status::Retrying, 0, &POLICY, secs(5), 1000, 0.0),
            (Status::Retrying, Some(6000))
        );
        // Shorter than the schedule: the schedule wins.
        let short = Some(Duration::from_millis(10));
        assert_eq!(
            after_attempt(Ended::Failed, Status::Retrying, 0, &POLICY, short, 1000, 0.0),
            (Status::Retrying, Some(1100))
        );
        let capped = Policy { max_retry_after: Duration::from_secs(2), ..POLICY };
        assert_eq!(
            after_attempt(Ended::Failed, Status::Retrying, 0, &capped, secs(3600), 1000, 0.0),
            (Status::Retrying, Some(3000))
        );
        // The last attempt stays the last, whatever the receiver asks.
        assert_eq!(
            after_attempt(Ended::Failed, Status::Retrying, 2, &POLICY, secs(5), 1000, 0.0),
            (Status::Failed, None)
        );
    }

    #[test]
    fn jitter_only_stretches_within_its_fraction() {
        let jittery = Policy { jitter: 0.5, ..POLICY };
        assert_eq!(
            after_attempt(Ended::Failed, Status::Retrying, 0, &jittery, None, 0, 0.0),
            (Status::Retrying, Some(100))
        );
        assert_eq!(
            after_attempt(Ended::Failed, Status::Retrying, 0, &jittery, None, 0, 0.999),
            (Status::Retrying, Some(149))
        );
    }

    #[test]
    fn one_webhook_never_takes_more_than_its_share_of_attempts() {
        // Webhook 1 has 10 due entries, webhook 2 has 3, all due at once.
        let index =
            Index((0..10).map(|i| due_to(5, i, 1)).chain((10..13).map(|i| due_to(6, i, 2))).collect());
        let mut q = Queue::new(Duration::from_secs(30), 100, 2);
        index.serve(&mut q, 10);
        let mut started = Vec::new();
        while let Some(k) = q.pop_key(10) {
            started.push(k.webhook.as_bytes()[0]);
        }
        assert_eq!(started, vec![1, 1, 2, 2], "two each, though webhook 1's entries are older");
        // Webhook 1 finishing one lets its next held entry go.
        let first = DeliveryKey { seq: 0, webhook: Uuid::from_bytes([1; 16]) };
        q.finished(first, None);
        assert_eq!(q.pop_key(10).map(|k| k.seq), Some(2));
        assert_eq!(q.pop_key(10), None);
    }

    #[test]
    fn a_rate_limited_webhook_waits_for_tokens_while_others_go_on() {
        // Webhook 1: 2 attempts a second; webhook 2: no limit of its own,
        // webhook 3: one in flight at a time. Six entries each, all due.
        let index = Index(
            (0..6)
                .map(|i| due_to(5, i, 1))
                .chain((10..16).map(|i| due_to(6, i, 2)))
                .chain((20..26).map(|i| due_to(7, i, 3)))
                .collect(),
        );
        let mut q = Queue::new(Duration::from_secs(30), 100, 10);
        let w = |n: u8| Uuid::from_bytes([n; 16]);
        let limits = HashMap::from([
            (w(1), Limits { rate: Some(2.0), ..Limits::default() }),
            (w(3), Limits { in_flight: Some(1), ..Limits::default() }),
        ]);
        q.set_limits(limits);
        index.serve(&mut q, 1000);
        let mut started = Vec::new();
        while let Some(k) = q.pop_key(1000) {
            started.push(k.webhook.as_bytes()[0]);
        }
        // A second's worth of tokens for webhook 1, one in flight for 3.
        assert_eq!(started.iter().filter(|&&n| n == 1).count(), 2, "{started:?}");
        assert_eq!(started.iter().filter(|&&n| n == 2).count(), 6, "{started:?}");
        assert_eq!(started.iter().filter(|&&n| n == 3).count(), 1, "{started:?}");
        // The next token comes 500 ms on; the queue wakes for it.
        assert_eq!(q.next_wake(true), Some(1500));
        assert_eq!(q.pop_key(1499), None);
        assert_eq!(q.pop_key(1500).map(|k| (k.webhook.as_bytes()[0], k.seq)), Some((1, 2)));
        assert_eq!(q.pop_key(1500), None);
        assert_eq!(q.next_wake(true), Some(2000));
        // A second later, one more (the bucket holds no more than a second's
        // worth while entries wait): deliveries over the limit wait in order.
        assert_eq!(q.pop_key(2000).map(|k| k.seq), Some(3));
        // Lifting the limit lets the rest go at once.
        q.set_limits(HashMap::new());
        let rest: Vec<u64> = std::iter::from_fn(|| q.pop_key(2000)).map(|k| k.seq).collect();
        assert_eq!(rest, [4, 5]);
    }

    #[test]
    fn a_lone_entry_over_the_rate_wakes_the_queue_at_its_token() {
        let index = Index((0..3).map(|i| due_to(1000, i, 1)).collect());
        let mut q = Queue::new(Duration::from_secs(30), 100, 10);
        let limit = Limits { rate: Some(2.0), ..Limits::default() };
        q.set_limits(HashMap::from([(Uuid::from_bytes([1; 16]), limit)]));
        index.serve(&mut q, 1000);
        // Due exactly now: popped now.
        assert_eq!(q.pop_key(1000).map(|k| k.seq), Some(0));
        assert_eq!(q.pop_key(1000).map(|k| k.seq), Some(1));
        // The third waits alone, and the queue wakes for its token.
        assert_eq!(q.pop_key(1000), None);
        assert_eq!(q.next_wake(true), Some(1500));
        // Half a token later another comes: its wait is the other half.
        q.insert(due_to(1250, 3, 1));
        assert_eq!(q.pop_key(1250), None);
        assert_eq!(q.next_wake(true), Some(1500));
        assert_eq!(q.pop_key(1500).map(|k| k.seq), Some(2));
    }

    #[test]
    fn a_token_taken_with_nothing_behind_it_sets_no_wake() {
        // The same single entry, with a rate limit and without: the same wake.
        let wake_after_one = |limits: HashMap<Uuid, Limits>| {
            let mut q = Queue::new(Duration::from_secs(30), 100, 10);
            q.set_limits(limits);
            Index([due_to(1000, 0, 1)].into()).serve(&mut q, 1000);
            assert_eq!(q.pop_key(1000).map(|k| k.seq), Some(0));
            q.next_wake(true)
        };
        let limit = Limits { rate: Some(2.0), ..Limits::default() };
        assert_eq!(
            wake_after_one(HashMap::from([(Uuid::from_bytes([1; 16]), limit)])),
            wake_after_one(HashMap::new()),
            "no wake for a token nothing waits for"
        );
    }

    #[test]
    fn a_late_notice_of_a_delivery_already_in_flight_is_ignored() {
        let index = Index([due(5, 1)].into_iter().collect());
        let mut q = Queue::new(Duration::from_secs(30), 100, 10);
        index.serve(&mut q, 10);
        let k = q.pop_key(10).unwrap();
        // The ingest's own notice, after the window read: refused, so the
        // dispatcher does not take it for a delivery never attempted.
        assert!(!q.insert(due(5, 1)));
        assert_eq!(q.pop_key(10), None, "{k:?} handed out twice");
    }

    #[test]
    fn a_second_entry_for_a_delivery_in_flight_waits_for_its_report() {
        let mut q = Queue::new(Duration::from_secs(30), 100, 10);
        Index(BTreeSet::new()).serve(&mut q, 0);
        q.insert(due(5, 1)); // stale: the delivery's retry is really due at 8
        q.insert(due(8, 1));
        let k = q.pop_key(10).unwrap();
        assert_eq!(q.pop_key(10), None, "not handed out twice");
        // The worker finds the stored retry later than the entry it got and reports it.
        q.finished(k, Some(due(8, 1)));
        assert_eq!(q.pop_key(10), Some(k));
    }

    #[test]
    fn an_entry_made_due_again_while_its_attempt_is_in_flight_outlives_a_settled_report() {
        // The attempt read the delivery as held; a resume then made it due
        // again, and its entry came while the attempt was still in flight.
        let mut q = Queue::new(Duration::from_secs(30), 100, 10);
        Index(BTreeSet::new()).serve(&mut q, 0);
        q.insert(due(5, 1));
        let k = q.pop_key(10).unwrap();
        assert!(!q.insert(due(9, 1)));
        assert_eq!(q.pop_key(10), None, "not handed out twice");
        q.finished(k, None);
        assert_eq!(q.pop_due(10), Some(due(9, 1)));
        // The same when the second entry was already waiting when the first popped.
        q.finished(k, None);
        q.insert(due(12, 1));
        q.insert(due(13, 1));
        assert_eq!(q.pop_key(20), Some(k));
        assert_eq!(q.pop_key(20), None, "not handed out twice");
        q.finished(k, None);
        assert_eq!(q.pop_due(20), Some(due(13, 1)));
        q.finished(k, None);
        assert_eq!(q.pop_key(20), None, "each kept entry goes back once");
    }

    #[test]
    fn a_webhook_forgotten_after_a_pause_keeps_nothing_that_could_jump_the_line() {
        let w = |n: u8| Uuid::from_bytes([n; 16]);
        let mut q = Queue::new(Duration::from_secs(30), 100, 10);
        q.set_limits(HashMap::from([(w(1), Limits { rate: Some(1.0), ..Limits::default() })]));
        // Each webhook has one more entry, due later.
        let later = [due_to(3000, 20, 1), due_to(3000, 21, 2)];
        let mut index =
            Index((0..4).map(|i| due_to(5, i, 1)).chain([due_to(6, 10, 2)]).chain(later).collect());
        index.serve(&mut q, 1000);
        q.insert_unindexed(due_to(7, 4, 1));
        let started: Vec<u64> = std::iter::from_fn(|| q.pop_key(1000)).map(|k| k.seq).collect();
        assert_eq!(started, [0, 10], "one token for webhook 1, the rest held");
        assert_eq!(q.next_wake(true), Some(2000), "webhook 1's next token");
        // The store holds webhook 1's waiting deliveries; one outcome
        // stored just after (and heard of) is due again all the same.
        index.0.retain(|d| d.key.webhook != w(1));
        index.0.insert(due_to(2500, 30, 1));
        q.insert(due_to(2500, 30, 1));
        q.forget_webhook(&w(1));
        // The unindexed entry is let go, for the store to index if it still waits.
        assert_eq!(q.take_let_go(), vec![due_to(7, 4, 1)]);
        // Read again from the store: webhook 1's stale entries are gone, the
        // one the store still has is back, and webhook 2 goes on.
        index.serve(&mut q, 1000);
        let started: Vec<u64> = std::iter::from_fn(|| q.pop_key(5000)).map(|k| k.seq).collect();
        assert_eq!(started, [30, 21]);
        assert_eq!(q.next_wake(true), None, "nothing else kept, nothing waiting for a token");
        // Entries made due again come in behind nothing stale.
        q.finished(DeliveryKey { seq: 0, webhook: w(1) }, None);
        q.finished(DeliveryKey { seq: 30, webhook: w(1) }, None);
        for seq in 1..4 {
            q.insert(due_to(6000 + seq, seq, 1));
        }
        assert_eq!(q.pop_key(7000).map(|k| k.seq), Some(1));
    }

    #[test]
    fn forgetting_a_webhook_keeps_the_others_entries() {
        // Webhook 1's entry is the earlier, webhook 2's the later; only
        // webhook 2's is still in the store after webhook 1's hold.
        let (stale, other) = (due_to(100, 1, 1), due_to(3000, 2, 2));
        let mut index = Index([stale, other].into_iter().collect());
        let mut q = Queue::new(Duration::from_secs(30), 100, 10);
        index.serve(&mut q, 50);
        index.0.remove(&stale);
        q.forget_webhook(&Uuid::from_bytes([1; 16]));
        index.serve(&mut q, 50);
        let started: Vec<Due> = std::iter::from_fn(|| q.pop_due(5000)).collect();
        assert_eq!(started, [other]);
    }

    #[test]
    fn a_busy_webhook_is_served_oldest_first_while_new_entries_keep_coming() {
        let w = 1u8;
        let mut index = Index((0..(HELD_MAX * 3) as u64).map(|i| due_to(5 + i, i, w)).collect());
        let mut q = Queue::new(Duration::from_secs(30), 100_000, 2);
        let mut served = Vec::new();
        let mut flying = std::collections::VecDeque::new();
        for next_seq in (HELD_MAX * 3) as u64..(HELD_MAX * 7) as u64 {
            index.serve(&mut q, 1_000_000);
            // Take everything the limit allows; the rest is held or spilled.
            while let Some(k) = q.pop_key(1_000_000) {
                served.push(k.seq);
                flying.push_back(k);
            }
            // New traffic keeps arriving for the same webhook.
            let fresh = due_to(500_000 + next_seq, next_seq, w);
            index.0.insert(fresh);
            q.insert(fresh);
            // Attempts end faster than new ones arrive, so the held entries drain.
            for _ in 0..2 {
                let Some(k) = flying.pop_front() else { break };
                q.attempted(k);
                index.done(&mut q, k);
            }
        }
        assert!(served.len() >= HELD_MAX * 3);
        let oldest_first = served.windows(2).filter(|p| p[1] < p[0]).count();
        assert_eq!(oldest_first, 0, "an older entry was served after a newer one");
    }

    #[test]
    fn waiting_for_the_disk_does_not_count_against_a_webhook() {
        let index = Index((0..3).map(|i| due_to(5, i, 1)).collect());
        let mut q = Queue::new(Duration::from_secs(30), 100, 1);
        index.serve(&mut q, 10);
        let a = q.pop_key(10).unwrap();
        assert_eq!(q.pop_key(10), None, "one attempt at a time");
        q.attempted(a);
        let b = q.pop_key(10).unwrap();
        assert_ne!(a, b);
        assert_eq!(q.in_flight(), 2, "a is still in flight until stored");
        q.finished(a, None);
        q.finished(b, None);
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn a_dead_webhooks_backlog_spills_to_the_store_and_comes_back() {
        let n = (HELD_MAX * 3) as u64;
        let mut index = Index((0..n).map(|i| due_to(5, i, 1)).chain([due_to(7, n, 2)]).collect());
        let mut q = Queue::new(Duration::from_secs(30), 100_000, 1);
        index.serve(&mut q, 10);
        // Webhook 1 takes its one slot; its backlog is held up to HELD_MAX; webhook 2 still gets through.
        let a = q.pop_key(10).unwrap();
        let b = q.pop_key(10).unwrap();
        assert_eq!((a.webhook.as_bytes()[0], b.webhook.as_bytes()[0]), (1, 2));
        assert!(q.held[&a.webhook].set.len() <= HELD_MAX);
        assert!(q.held[&a.webhook].spilled.is_some());
        index.done(&mut q, b);
        // The endpoint comes back: every entry is attempted exactly once.
        let mut seen = HashSet::from([a]);
        index.done(&mut q, a);
        loop {
            index.serve(&mut q, 10);
            let Some(k) = q.pop_key(10) else { break };
            assert!(seen.insert(k), "{k:?} twice");
            index.done(&mut q, k);
        }
        assert_eq!(seen.len() as u64, n);
        assert!(index.0.is_empty());
    }

    #[test]
    fn loads_only_the_window_and_wakes_for_the_rest() {
        let index = Index((0..10).map(|i| due(1_000 + i * 60_000, i)).collect());
        let mut q = Queue::new(Duration::from_secs(30), 100, 1000);
        index.serve(&mut q, 1_000);
        assert_eq!(q.ready(), 1, "only the entry due now is in memory");
        assert_eq!(q.pop_key(1_000), Some(due(1_000, 0).key));
        assert_eq!(q.pop_key(1_000), None);
        // Next wake is when the next entry (61_000) comes within half a window.
        assert_eq!(q.next_wake(true), Some(61_000 - 15_000));
        index.serve(&mut q, 46_000);
        assert_eq!(q.ready(), 1);
        assert_eq!(q.next_wake(true), Some(61_000));
        assert_eq!(q.pop_key(60_999), None);
        assert_eq!(q.pop_key(61_000), Some(due(61_000, 1).key));
    }

    #[test]
    fn memory_stays_bounded_under_a_backlog() {
        let index = Index((0..1000).map(|i| due(5, i)).collect());
        let mut q = Queue::new(Duration::from_secs(30), 64, 1000);
        index.serve(&mut q, 10);
        assert!(q.ready() <= 64);
        let mut seen = HashSet::new();
        // Drain everything, with at most 8 in flight, refilling as a dispatcher would.
        let mut flying = Vec::new();
        loop {
            index.serve(&mut q, 10);
            while q.in_flight() < 8 {
                match q.pop_key(10) {
                    Some(k) => flying.push(k),
                    None => break,
                }
            }
            if flying.is_empty() {
                break;
            }
            for k in flying.drain(..) {
                assert!(seen.insert(k), "{k:?} handed out twice");
                q.finished(k, None);
            }
            assert!(q.ready() <= 64);
        }
        assert_eq!(seen.len(), 1000);
    }

    #[test]
    fn inserts_below_the_cursor_keep_memory_bounded() {
        let mut q = Queue::new(Duration::from_secs(30), 10, 1000);
        Index(BTreeSet::new()).serve(&mut q, 0);
        for i in 0..100 {
            q.insert(due(5 + i, i));
            assert!(q.ready() <= 10, "{} ready after {} inserts", q.ready(), i + 1);
        }
        // The earliest stayed; the later ones live in the store alone.
        assert_eq!(q.pop_key(5).map(|k| k.seq), Some(0));
    }

    #[test]
    fn a_trim_keeps_what_a_busy_webhook_holds_below_the_new_cursor() {
        // Webhook 1 may have one attempt in flight: of its three entries,
        // one goes, two are held. Then webhook 2's retries crowd memory.
        let mut q = Queue::new(Duration::from_secs(30), 10, 1);
        Index(BTreeSet::new()).serve(&mut q, 0);
        for i in 0..3 {
            q.insert(due_to(5, i, 1));
        }
        let first = q.pop_key(5).unwrap();
        assert_eq!(q.pop_key(5), None, "two held");
        for i in 0..20 {
            q.insert(due_to(100 + i, 100 + i, 2));
        }
        q.finished(first, None);
        let rest: Vec<u64> = std::iter::from_fn(|| {
            let k = q.pop_key(5)?;
            q.finished(k, None);
            Some(k.seq)
        })
        .collect();
        assert_eq!(rest, [1, 2], "the held entries outlive the trim");
    }

    #[test]
    fn inserts_above_the_cursor_wait_in_the_store() {
        let mut q = Queue::new(Duration::from_secs(30), 4, 1000);
        Index(BTreeSet::new()).serve(&mut q, 0);
        assert_eq!(q.next_wake(true), None, "nothing stored: no wake-ups at all");
        q.insert(due(10, 1));
        assert_eq!(q.ready(), 1);
        q.insert(due(3_600_000, 2));
        assert_eq!(q.ready(), 1, "an hour ahead stays in the store");
        assert_eq!(q.next_wake(false), Some(3_600_000 - 15_000));
        // Over capacity: the latest go back to the store and the cursor follows.
        for i in 0..10 {
            q.insert(due(20 + i, 10 + i));
        }
        assert_eq!(q.ready(), 4);
        assert!(q.refill(100).is_none(), "no room yet");
    }

    #[test]
    fn in_flight_entries_are_not_loaded_twice() {
        let mut index = Index([due(5, 1)].into_iter().collect());
        let mut q = Queue::new(Duration::from_secs(30), 4, 1000);
        index.serve(&mut q, 5);
        let k = q.pop_key(5).unwrap();
        // A restart-like reload while the attempt is in flight.
        q.cursor = Due::at(0);
        q.beyond = Some(0);
        index.serve(&mut q, 5);
        assert_eq!(q.pop_key(5), None);
        index.0.clear();
        q.finished(k, Some(due(7, 1)));
        assert_eq!(q.pop_key(7), Some(k));
    }

    #[test]
    fn new_deliveries_beyond_what_memory_holds_are_let_go_for_indexing() {
        // Too many to stay ready: capacity 64.
        attempt_new_deliveries(64, 2);
        // Too many to hold for a webhook taking one at a time (HELD_MAX).
        attempt_new_deliveries(100_000, 1);
    }

    /// Inserts 3,000 new deliveries for two webhooks and attempts them as a
    /// dispatcher would, indexing what the queue lets go: each exactly once.
    fn attempt_new_deliveries(capacity: usize, per_webhook: usize) {
        let mut index = Index(BTreeSet::new());
        let mut q = Queue::new(Duration::from_secs(30), capacity, per_webhook);
        index.serve(&mut q, 10);
        for i in 0..3_000 {
            assert!(q.insert_unindexed(due_to(5, i, (i % 2) as u8)));
        }
        let mut seen = HashSet::new();
        let mut flying = Vec::new();
        let mut let_go = 0;
        loop {
            let_go += q.let_go.len();
            index.index_let_go(&mut q);
            index.serve(&mut q, 10);
            while let Some(k) = q.pop_key(10) {
                flying.push(k);
            }
            let_go += q.let_go.len();
            index.index_let_go(&mut q);
            if flying.is_empty() {
                break;
            }
            for k in flying.drain(..) {
                assert!(seen.insert(k), "{k:?} handed out twice");
                index.done(&mut q, k);
            }
            assert!(q.ready() <= capacity);
            assert!(q.held.values().all(|h| h.set.len() <= HELD_MAX));
        }
        assert_eq!(seen.len(), 3_000, "every new delivery attempted once");
        assert!(let_go > 0, "nothing was let go");
        assert!(q.unindexed.is_empty() && q.let_go.is_empty());
    }

    #[test]
    fn an_unrecorded_outcome_keeps_a_new_delivery_unindexed() {
        let mut q = Queue::new(Duration::from_secs(30), 64, 10);
        Index(BTreeSet::new()).serve(&mut q, 0);
        let later = 3_600_000;
        q.insert_unindexed(due(5, 1));
        let k = q.pop_key(10).unwrap();
        // Its retry lies beyond the window: it must be let go, not left to the store.
        q.unrecorded(k, due(later, 1));
        assert_eq!(q.take_let_go(), [due(later, 1)]);
        // Once the outcome is stored, the store has whatever comes next.
        q.insert_unindexed(due(5, 2));
        let k = q.pop_key(10).unwrap();
        q.finished(k, Some(due(later, 2)));
        assert_eq!(q.take_let_go(), []);
    }

    #[test]
    fn successor_carries() {
        let max = Due { at_ms: 1, key: DeliveryKey { seq: 2, webhook: Uuid::from_bytes([0xff; 16]) } };
        assert_eq!(max.successor(), Due { at_ms: 1, key: DeliveryKey { seq: 3, webhook: Uuid::nil() } });
        assert!(due(1, 1).successor() > due(1, 1));
    }
}
