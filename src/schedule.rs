//! What to attempt next, and when: pure logic, no I/O.
//!
//! The durable due index in the store is the source of truth. [`Queue`] holds
//! in memory only the entries due within a window ahead (at most `capacity`
//! of them) plus the keys of attempts in flight, and asks to be refilled from
//! the store as time moves on. Its one invariant: every stored due entry below
//! `cursor` is either in `ready` or in flight; nothing at or above `cursor` is
//! in memory. So a backlog of a million deliveries waiting hours for a retry
//! costs no memory until their time comes close.
//!
//! [`after_attempt`] is the retry policy: which status an attempt leads to and
//! when the next one is due.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use crate::store::{DeliveryKey, Due, Status};

/// A request to read due entries `from..` up to `until_ms`, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    pub from: Due,
    pub until_ms: u64,
    pub limit: usize,
}

pub struct Queue {
    ready: BTreeSet<Due>,
    in_flight: HashSet<DeliveryKey>,
    cursor: Due,
    /// Due time of the earliest stored entry at or above `cursor`, if any is known.
    beyond: Option<u64>,
    window_ms: u64,
    capacity: usize,
}

impl Queue {
    /// An empty queue that will load everything due from the store.
    pub fn new(window: Duration, capacity: usize) -> Queue {
        Queue {
            ready: BTreeSet::new(),
            in_flight: HashSet::new(),
            cursor: Due::at(0),
            beyond: Some(0),
            window_ms: window.as_millis() as u64,
            capacity: capacity.max(2),
        }
    }

    /// A due entry was just stored (a new delivery or a retry).
    pub fn insert(&mut self, d: Due) {
        if d < self.cursor {
            self.ready.insert(d);
            self.trim();
        } else {
            self.note_beyond(d.at_ms);
        }
    }

    fn note_beyond(&mut self, at_ms: u64) {
        self.beyond = Some(self.beyond.map_or(at_ms, |b| b.min(at_ms)));
    }

    /// Keeps memory bounded: the latest entries go back to living only in the
    /// store, and the cursor moves down to them.
    fn trim(&mut self) {
        while self.ready.len() > self.capacity {
            let last = self.ready.pop_last().expect("non-empty");
            self.cursor = last;
            self.note_beyond(last.at_ms);
        }
    }

    /// The next delivery due at `now_ms`, now counted as in flight.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<DeliveryKey> {
        let first = *self.ready.first()?;
        if first.at_ms > now_ms {
            return None;
        }
        self.ready.pop_first();
        self.in_flight.insert(first.key);
        Some(first.key)
    }

    /// An attempt is over; `next` is its stored next due entry, if any.
    pub fn finished(&mut self, key: DeliveryKey, next: Option<Due>) {
        self.in_flight.remove(&key);
        if let Some(d) = next {
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

    /// What to read from the store now, if anything.
    pub fn refill(&self, now_ms: u64) -> Option<Refill> {
        let beyond = self.beyond?;
        let room = self.capacity - self.ready.len().min(self.capacity);
        if room < self.capacity / 2 || beyond > now_ms + self.window_ms / 2 {
            return None;
        }
        Some(Refill { from: self.cursor, until_ms: now_ms + self.window_ms, limit: room })
    }

    /// The store answered `r` with `entries`; `next` is the first stored entry
    /// after `r.until_ms` (only looked up when fewer than `r.limit` came back).
    pub fn refilled(&mut self, r: Refill, entries: Vec<Due>, next: Option<Due>) {
        let full = entries.len() >= r.limit;
        let last = entries.last().copied();
        for d in entries {
            if !self.in_flight.contains(&d.key) {
                self.ready.insert(d);
            }
        }
        match (full, last) {
            (true, Some(last)) => {
                self.cursor = successor(last);
                self.beyond = Some(self.cursor.at_ms);
            }
            _ => {
                self.cursor = Due::at(r.until_ms + 1);
                self.beyond = next.map(|d| d.at_ms);
            }
        }
        self.trim();
    }

    /// When the dispatcher must look again (ms since epoch), if ever by itself.
    /// `can_start` says whether a worker is free to take a due delivery.
    pub fn next_wake(&self, can_start: bool) -> Option<u64> {
        let first_due = self.ready.first().filter(|_| can_start).map(|d| d.at_ms);
        let refill_at = self.beyond.map(|b| b.saturating_sub(self.window_ms / 2));
        match (first_due, refill_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The smallest entry after `d` in key order.
fn successor(d: Due) -> Due {
    let w = u128::from_be_bytes(*d.key.webhook.as_bytes());
    let (webhook, carry) = w.overflowing_add(1);
    let (seq, carry) = if carry { d.key.seq.overflowing_add(1) } else { (d.key.seq, false) };
    let at_ms = if carry { d.at_ms + 1 } else { d.at_ms };
    Due { at_ms, key: DeliveryKey { seq, webhook: uuid::Uuid::from_bytes(webhook.to_be_bytes()) } }
}

/// The retry policy. `attempts_before` counts attempts made before this one;
/// `retry_schedule[i]` is the delay before retry `i + 1`, measured from the end
/// of the failed attempt.
pub fn after_attempt(
    succeeded: bool,
    attempts_before: usize,
    retry_schedule: &[Duration],
    ended_at_ms: i64,
) -> (Status, Option<i64>) {
    if succeeded {
        return (Status::Succeeded, None);
    }
    match retry_schedule.get(attempts_before) {
        Some(delay) => (Status::Retrying, Some(ended_at_ms + delay.as_millis() as i64)),
        None => (Status::Failed, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn due(at_ms: u64, seq: u64) -> Due {
        Due { at_ms, key: DeliveryKey { seq, webhook: Uuid::from_bytes([1; 16]) } }
    }

    /// A stand-in for the store's due index: a sorted set, read the same way.
    struct Index(BTreeSet<Due>);

    impl Index {
        fn serve(&self, q: &mut Queue, now: u64) {
            while let Some(r) = q.refill(now) {
                let entries: Vec<Due> = self
                    .0
                    .range(r.from..)
                    .take_while(|d| d.at_ms <= r.until_ms)
                    .take(r.limit)
                    .copied()
                    .collect();
                let next = self.0.range(Due::at(r.until_ms + 1)..).next().copied();
                q.refilled(r, entries, next);
            }
        }
    }

    #[test]
    fn retry_policy_follows_the_schedule_then_fails() {
        let s = [Duration::from_millis(100), Duration::from_millis(200)];
        assert_eq!(after_attempt(false, 0, &s, 1000), (Status::Retrying, Some(1100)));
        assert_eq!(after_attempt(false, 1, &s, 1000), (Status::Retrying, Some(1200)));
        assert_eq!(after_attempt(false, 2, &s, 1000), (Status::Failed, None));
        assert_eq!(after_attempt(true, 2, &s, 1000), (Status::Succeeded, None));
        assert_eq!(after_attempt(false, 0, &[], 1000), (Status::Failed, None));
    }

    #[test]
    fn loads_only_the_window_and_wakes_for_the_rest() {
        let index = Index((0..10).map(|i| due(1_000 + i * 60_000, i)).collect());
        let mut q = Queue::new(Duration::from_secs(30), 100);
        index.serve(&mut q, 1_000);
        assert_eq!(q.ready(), 1, "only the entry due now is in memory");
        assert_eq!(q.pop_due(1_000), Some(due(1_000, 0).key));
        assert_eq!(q.pop_due(1_000), None);
        // Next wake is when the next entry (61_000) comes within half a window.
        assert_eq!(q.next_wake(true), Some(61_000 - 15_000));
        index.serve(&mut q, 46_000);
        assert_eq!(q.ready(), 1);
        assert_eq!(q.next_wake(true), Some(61_000));
        assert_eq!(q.pop_due(60_999), None);
        assert_eq!(q.pop_due(61_000), Some(due(61_000, 1).key));
    }

    #[test]
    fn memory_stays_bounded_under_a_backlog() {
        let index = Index((0..1000).map(|i| due(5, i)).collect());
        let mut q = Queue::new(Duration::from_secs(30), 64);
        index.serve(&mut q, 10);
        assert!(q.ready() <= 64);
        let mut seen = HashSet::new();
        // Drain everything, with at most 8 in flight, refilling as a dispatcher would.
        let mut flying = Vec::new();
        loop {
            index.serve(&mut q, 10);
            while q.in_flight() < 8 {
                match q.pop_due(10) {
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
    fn inserts_above_the_cursor_wait_in_the_store() {
        let mut q = Queue::new(Duration::from_secs(30), 4);
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
        let mut q = Queue::new(Duration::from_secs(30), 4);
        index.serve(&mut q, 5);
        let k = q.pop_due(5).unwrap();
        // A restart-like reload while the attempt is in flight.
        q.cursor = Due::at(0);
        q.beyond = Some(0);
        index.serve(&mut q, 5);
        assert_eq!(q.pop_due(5), None);
        index.0.clear();
        q.finished(k, Some(due(7, 1)));
        assert_eq!(q.pop_due(7), Some(k));
    }

    #[test]
    fn successor_carries() {
        let max = Due { at_ms: 1, key: DeliveryKey { seq: 2, webhook: Uuid::from_bytes([0xff; 16]) } };
        assert_eq!(successor(max), Due { at_ms: 1, key: DeliveryKey { seq: 3, webhook: Uuid::nil() } });
        assert!(successor(due(1, 1)) > due(1, 1));
    }
}
