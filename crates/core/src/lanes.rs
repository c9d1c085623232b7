//! In-order webhooks (`ordering = "fifo"`): one delivery at a time, in the
//! order the events came in. Pure logic, no I/O.
//!
//! Each such webhook has a [`Lane`] whose *head* is its oldest delivery
//! waiting for an attempt (pending or retrying): the store finds it by
//! going through the webhook's delivery log from the lane's `mark`, below
//! which every delivery is settled. Only the head is attempted, when it is
//! due; a retry keeps it the head (so the ones after wait: head-of-line
//! blocking, by design), and only its final outcome (or its being held or
//! cancelled) moves the lane on. The queue in [`crate::schedule`] lets
//! these webhooks' entries go; a lane needs no window or capacity: it holds
//! one entry.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::delivery::{DeliveryKey, Due};

#[derive(Debug, Default)]
struct Lane {
    /// Every delivery of the webhook below this sequence number is settled.
    mark: u64,
    /// The head and when it is due, once read; `None` when nothing waits.
    head: Option<Due>,
    /// The head must be read (again) from the store.
    stale: bool,
    /// The head is handed to a worker and its outcome not stored yet.
    flying: bool,
}

/// The in-order webhooks' lanes.
#[derive(Debug, Default)]
pub struct Lanes(HashMap<Uuid, Lane>);

impl Lanes {
    /// These webhooks are in order from now on; lanes of the others go.
    pub fn set(&mut self, webhooks: &HashSet<Uuid>) {
        self.0.retain(|w, _| webhooks.contains(w));
        for w in webhooks {
            self.0.entry(*w).or_insert_with(|| Lane { stale: true, ..Lane::default() });
        }
    }

    /// Whether `webhook`'s deliveries are a lane's, not the queue's.
    pub fn owns(&self, webhook: &Uuid) -> bool {
        // Asked for every delivery: with no lane, not even a hash.
        !self.0.is_empty() && self.0.contains_key(webhook)
    }

    /// Whether some lane's head must be read.
    pub fn need_reading(&self) -> bool {
        self.0.values().any(|l| l.stale && !l.flying)
    }

    /// Lanes whose head must be read, each with where to start: the
    /// webhook's first delivery from that sequence number on that waits.
    pub fn to_read(&self) -> Vec<(Uuid, u64)> {
        self.0.iter().filter(|(_, l)| l.stale && !l.flying).map(|(w, l)| (*w, l.mark)).collect()
    }

    /// The store's answer for `webhook`'s lane: its head, if any waits.
    pub fn read(&mut self, webhook: Uuid, head: Option<Due>) {
        if let Some(lane) = self.0.get_mut(&webhook) {
            lane.stale = false;
            lane.head = head;
            if let Some(h) = head {
                lane.mark = h.key.seq;
            }
        }
    }

    /// Heads due at `now_ms` and not in flight, now counted as in flight.
    pub fn pop_due(&mut self, now_ms: u64) -> Vec<Due> {
        let mut due = Vec::new();
        for lane in self.0.values_mut() {
            if let Some(h) = lane.head.filter(|h| !lane.flying && !lane.stale && h.at_ms <= now_ms) {
                lane.flying = true;
                due.push(h);
            }
        }
        due
    }

    /// When the earliest head not in flight is due.
    pub fn next_wake(&self) -> Option<u64> {
        self.0.values().filter(|l| !l.flying && !l.stale).filter_map(|l| l.head.map(|h| h.at_ms)).min()
    }

    /// A delivery of an in-order webhook was stored as due (new, or made
    /// due again by an operator, perhaps below the mark): read the head
    /// again.
    pub fn scheduled(&mut self, key: DeliveryKey) {
        if let Some(lane) = self.0.get_mut(&key.webhook) {
            lane.mark = lane.mark.min(key.seq);
            lane.stale = true;
        }
    }

    /// The outcome of `key` is stored: due again at `next` (a retry: it
    /// stays the head), or settled (the lane moves on past it). `false` if
    /// `key` is not a lane's head in flight.
    pub fn finished(&mut self, key: DeliveryKey, next: Option<Due>) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let Some(lane) = self.0.get_mut(&key.webhook) else { return false };
        if !(lane.flying && lane.head.is_some_and(|h| h.key == key)) {
            return false;
        }
        lane.flying = false;
        match next {
            Some(next) => lane.head = Some(next),
            None => {
                lane.head = None;
                // Unless an operator made an older one due meanwhile.
                if lane.mark == key.seq {
                    lane.mark = key.seq + 1;
                }
                lane.stale = true;
            }
        }
        true
    }

    /// `key`'s outcome could not be stored: it is still the head, due again
    /// at `retry`.
    pub fn unrecorded(&mut self, key: DeliveryKey, retry: Due) -> bool {
        self.finished(key, Some(retry))
    }

    /// Something changed `webhook`'s deliveries wholesale (a pause held
    /// them): read its head again once nothing is in flight.
    pub fn reread(&mut self, webhook: &Uuid) {
        if let Some(lane) = self.0.get_mut(webhook) {
            lane.stale = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: u64) -> DeliveryKey {
        DeliveryKey { seq, webhook: Uuid::from_bytes([1; 16]) }
    }

    fn due(at_ms: u64, seq: u64) -> Due {
        Due { at_ms, key: key(seq) }
    }

    #[test]
    fn one_at_a_time_and_a_retrying_head_holds_the_rest_back() {
        let w = Uuid::from_bytes([1; 16]);
        let mut lanes = Lanes::default();
        lanes.set(&HashSet::from([w]));
        assert!(lanes.owns(&w));
        assert_eq!(lanes.to_read(), [(w, 0)]);
        assert!(lanes.need_reading());
        lanes.read(w, Some(due(10, 5)));
        assert_eq!(lanes.to_read(), []);
        assert!(!lanes.need_reading());
        assert_eq!(lanes.next_wake(), Some(10));
        assert_eq!(lanes.pop_due(9), []);
        assert_eq!(lanes.pop_due(10), [due(10, 5)]);
        assert_eq!(lanes.pop_due(100), [], "one in flight at most");
        // A new delivery meanwhile waits for the head's outcome.
        lanes.scheduled(key(7));
        assert_eq!(lanes.to_read(), []);
        // The head failed and is retried at 500: still the head.
        assert!(lanes.finished(key(5), Some(due(500, 5))));
        // (Read again, for the new one: the head is still the oldest.)
        assert_eq!(lanes.to_read(), [(w, 5)]);
        lanes.read(w, Some(due(500, 5)));
        assert_eq!(lanes.pop_due(499), []);
        assert_eq!(lanes.pop_due(500), [due(500, 5)]);
        // It succeeds: the lane reads on from past it.
        assert!(lanes.finished(key(5), None));
        assert_eq!(lanes.to_read(), [(w, 6)]);
        lanes.read(w, Some(due(20, 7)));
        assert_eq!(lanes.pop_due(600), [due(20, 7)]);
        // An outcome of a delivery that is not the head is not the lane's.
        assert!(!lanes.finished(key(3), None));
        assert!(lanes.finished(key(7), None));
        lanes.read(w, None);
        assert_eq!((lanes.next_wake(), lanes.pop_due(u64::MAX)), (None, vec![]));
        // An operator makes an old one due again: the mark goes back.
        lanes.scheduled(key(2));
        assert_eq!(lanes.to_read(), [(w, 2)]);
        lanes.set(&HashSet::new());
        assert!(!lanes.owns(&w));
    }

    #[test]
    fn a_lane_waits_for_its_head_in_flight_and_rereads_after_a_hold() {
        let (w, other) = (Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16]));
        let mut lanes = Lanes::default();
        lanes.set(&HashSet::from([w]));
        assert!(!lanes.owns(&other), "another webhook's deliveries stay the queue's");
        lanes.read(w, Some(due(10, 5)));
        assert_eq!(lanes.pop_due(10), [due(10, 5)]);
        // In flight: no wake for it, and a stale read waits for its outcome.
        assert_eq!(lanes.next_wake(), None);
        lanes.reread(&w);
        assert_eq!(lanes.to_read(), []);
        // Its outcome could not be stored: still the head, due at the retry.
        assert!(lanes.unrecorded(key(5), due(1010, 5)));
        assert!(!lanes.unrecorded(key(5), due(1010, 5)), "not in flight any more");
        // The reread asked for above happens now; until it has, nothing goes.
        assert_eq!((lanes.to_read(), lanes.next_wake()), (vec![(w, 5)], None));
        lanes.read(w, Some(due(1010, 5)));
        assert_eq!(lanes.next_wake(), Some(1010));
    }
}
