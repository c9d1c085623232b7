//! The stored records and the values passed to and from the committer.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::EventType;
pub use nexor_webhookd_core::delivery::{DeliveryKey, Due, Status};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventRecord {
    pub event_id: Uuid,
    pub event_type: EventType,
    pub client_id: Uuid,
    pub timestamp_ms: i64,
    /// Whether the application supplied `timestamp` (else it is the ingest time).
    pub timestamp_given: bool,
    pub test: bool,
    /// The application's `data` object, as the bytes it sent.
    pub data: String,
    /// The webhooks it fans out to: the keys of its deliveries.
    pub webhooks: Vec<Uuid>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub webhook_id: Uuid,
    pub status: Status,
    pub next_attempt_at: Option<i64>,
    pub attempts: Vec<Attempt>,
    /// Index in `attempts` where the current round began: 0, or where an
    /// operator's redelivery restarted the retry schedule.
    pub round_start: u32,
}

impl DeliveryRecord {
    /// Attempts made in the current round (what the retry schedule counts).
    pub fn attempts_in_round(&self) -> usize {
        self.attempts.len().saturating_sub(self.round_start as usize)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub delivery_id: Uuid,
    pub started_at_ms: i64,
    pub duration_ms: u64,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub response_body: String,
}

/// A webhook's state and delivery health, kept up to date by the
/// committer in the same batch as the deliveries they describe.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WebhookStats {
    pub last_success_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    pub last_failure: Option<String>,
    pub consecutive_failures: u32,
    by_status: [u64; 6],
    /// When the current unbroken run of failed attempts began.
    pub failing_since_ms: Option<i64>,
    /// The last `recent_attempts` attempts (at most [`RECENT`]), newest in
    /// bit 0: a set bit succeeded.
    recent: u64,
    recent_attempts: u8,
    /// Set while the webhook is paused: its deliveries are held.
    pub paused: Option<Paused>,
}

/// How many of a webhook's latest attempts its success rate covers.
pub const RECENT: u8 = 64;

/// Why and since when a webhook is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    pub reason: PauseReason,
    pub at_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PauseReason {
    /// The receiver answered `410 Gone`.
    Gone,
    /// Its attempts failed without a break for longer than its `pause_after`.
    Failing,
    /// An operator paused it.
    Operator,
}

impl PauseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Gone => "gone",
            PauseReason::Failing => "failing",
            PauseReason::Operator => "operator",
        }
    }
}

/// When recording an attempt's outcome pauses its webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseRule {
    /// At once: the receiver answered `410 Gone`.
    Gone,
    /// Once failures have run unbroken for at least `for_ms` and number at
    /// least `attempts`.
    Failing { for_ms: i64, attempts: u32 },
}

/// [`WebhookStats`] as layout 5 stored it, before pausing and the recent
/// attempts: read only by the upgrade to layout 6.
#[derive(Deserialize)]
pub struct WebhookStatsV5 {
    last_success_ms: Option<i64>,
    last_failure_ms: Option<i64>,
    last_failure: Option<String>,
    consecutive_failures: u32,
    by_status: [u64; 6],
}

/// [`WebhookStats`] as layouts 2 to 4 stored it, before `held`: read only
/// by the upgrade.
#[derive(Deserialize)]
pub struct WebhookStatsV4 {
    last_success_ms: Option<i64>,
    last_failure_ms: Option<i64>,
    last_failure: Option<String>,
    consecutive_failures: u32,
    by_status: [u64; 5],
}

impl From<WebhookStatsV4> for WebhookStatsV5 {
    fn from(old: WebhookStatsV4) -> Self {
        let mut by_status = [0; 6];
        by_status[..5].copy_from_slice(&old.by_status);
        WebhookStatsV5 {
            last_success_ms: old.last_success_ms,
            last_failure_ms: old.last_failure_ms,
            last_failure: old.last_failure,
            consecutive_failures: old.consecutive_failures,
            by_status,
        }
    }
}

impl From<WebhookStatsV5> for WebhookStats {
    fn from(old: WebhookStatsV5) -> Self {
        WebhookStats {
            last_success_ms: old.last_success_ms,
            last_failure_ms: old.last_failure_ms,
            last_failure: old.last_failure,
            consecutive_failures: old.consecutive_failures,
            by_status: old.by_status,
            // The run's start is unknown: the last failure stands in, so a
            // streak counts from no earlier than the upgrade knows of.
            failing_since_ms: old.last_failure_ms.filter(|_| old.consecutive_failures > 0),
            ..Default::default()
        }
    }
}

impl WebhookStats {
    pub fn count(&self, s: Status) -> u64 {
        self.by_status[s.index()]
    }

    /// Counts an attempt made at `at_ms`: its success, or its failure and
    /// why.
    pub(super) fn attempted(&mut self, at_ms: i64, failure: Result<(), Option<String>>) {
        self.recent = (self.recent << 1) | failure.is_ok() as u64;
        self.recent_attempts = (self.recent_attempts + 1).min(RECENT);
        match failure {
            Ok(()) => {
                self.last_success_ms = Some(at_ms);
                self.consecutive_failures = 0;
                self.failing_since_ms = None;
            }
            Err(error) => {
                self.last_failure_ms = Some(at_ms);
                self.last_failure = error;
                self.consecutive_failures += 1;
                self.failing_since_ms.get_or_insert(at_ms);
            }
        }
    }

    /// Whether `rule` pauses the webhook after its last attempt, made at
    /// `now_ms`.
    pub(super) fn pauses(&self, rule: PauseRule, now_ms: i64) -> Option<PauseReason> {
        match rule {
            PauseRule::Gone => Some(PauseReason::Gone),
            PauseRule::Failing { for_ms, attempts } => {
                let since = self.failing_since_ms?;
                (self.consecutive_failures >= attempts && now_ms.saturating_sub(since) >= for_ms)
                    .then_some(PauseReason::Failing)
            }
        }
    }

    /// The share of the recent attempts that succeeded, and how many
    /// attempts that is; `None` before the first attempt.
    pub fn success_rate(&self) -> Option<(f64, u8)> {
        let n = self.recent_attempts;
        let mask = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        (n > 0).then(|| ((self.recent & mask).count_ones() as f64 / n as f64, n))
    }

    pub(super) fn moved(&mut self, from: Option<Status>, to: Option<Status>) {
        if let Some(f) = from {
            self.by_status[f.index()] = self.by_status[f.index()].saturating_sub(1);
        }
        if let Some(t) = to {
            self.by_status[t.index()] += 1;
        }
    }
}

/// Marks a daemon-made event_id (byte 9) so that lookups know to try it.
const OWN_ID_MARK: u8 = 0x4e;

/// A daemon-made event_id: an RFC 9562 version-8 uuid carrying the event's
/// sequence number (so it sorts by time, like v7, and needs no index entry to
/// be found) and 48 random bits.
pub fn event_id_for(seq: u64) -> Uuid {
    let random = Uuid::new_v4();
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&(seq >> 16).to_be_bytes()[2..]);
    b[6] = 0x80 | ((seq >> 12) & 0x0f) as u8;
    b[7] = (seq >> 4) as u8;
    b[8] = 0x80 | (seq & 0x0f) as u8;
    b[9] = OWN_ID_MARK;
    b[10..].copy_from_slice(&random.as_bytes()[10..]);
    Uuid::from_bytes(b)
}

/// The sequence number inside a daemon-made event_id. Anyone can send an id
/// of this shape, so callers check that the event found carries this id.
pub fn seq_in_event_id(id: &Uuid) -> Option<u64> {
    let b = id.as_bytes();
    if b[6] >> 4 != 8 || b[8] & 0xf0 != 0x80 || b[9] != OWN_ID_MARK {
        return None;
    }
    let mut high = [0u8; 8];
    high[2..].copy_from_slice(&b[..6]);
    Some(
        u64::from_be_bytes(high) << 16
            | ((b[6] & 0x0f) as u64) << 12
            | (b[7] as u64) << 4
            | (b[8] & 0x0f) as u64,
    )
}

/// The time (ms since the epoch) an event was stored, from its sequence number.
pub fn seq_time_ms(seq: u64) -> i64 {
    (seq >> 16) as i64
}

/// The smallest sequence number of an event stored at or after `ms`.
pub fn first_seq_at(ms: i64) -> u64 {
    (ms.max(0) as u64) << 16
}

/// A new event and the webhooks it fans out to.
pub struct NewEvent {
    pub record: EventRecord,
    /// Whether the application chose `record.event_id`; if not, the store
    /// replaces it with one derived from the event's sequence number.
    pub id_given: bool,
}

#[derive(Debug)]
pub enum Ingested {
    /// Stored now (with its final event_id); these of its deliveries are
    /// due (a paused webhook's are held instead).
    Accepted { event: Arc<EventRecord>, due: Vec<Due> },
    /// The same event_id with the same content was stored before.
    Duplicate,
    /// The same event_id with different content was stored before.
    Conflict,
}

/// What happens to a delivery after an attempt (or instead of one).
#[derive(Debug)]
pub struct Outcome {
    pub key: DeliveryKey,
    pub attempt: Option<Attempt>,
    pub status: Status,
    /// When the next attempt is due; `Some` exactly when `status` is waiting
    /// for one (`Retrying`, or `Pending` for a delivery put back before any
    /// attempt counted).
    pub next_attempt_at: Option<i64>,
    /// What would pause the webhook after this attempt. Once it is paused
    /// (by this outcome or before), a delivery still waiting is held.
    pub pause: Option<PauseRule>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_counts_the_run_of_failures_and_the_last_64_attempts() {
        let mut s = WebhookStats::default();
        assert_eq!(s.success_rate(), None);
        // Failed, failed, succeeded, failed: newest in bit 0.
        s.attempted(10, Err(Some("HTTP 500".into())));
        s.attempted(20, Err(None));
        assert_eq!((s.consecutive_failures, s.failing_since_ms, s.last_failure.clone()), (2, Some(10), None));
        s.attempted(30, Ok(()));
        assert_eq!((s.consecutive_failures, s.failing_since_ms, s.last_success_ms), (0, None, Some(30)));
        s.attempted(40, Err(Some("timed out".into())));
        assert_eq!(s.success_rate(), Some((0.25, 4)));
        assert_eq!((s.failing_since_ms, s.last_failure_ms), (Some(40), Some(40)));
        // Past 64 attempts the oldest fall out: 60 successes then 8
        // failures leave 56 of 64.
        let mut s = WebhookStats::default();
        (0..60).for_each(|t| s.attempted(t, Ok(())));
        (60..68).for_each(|t| s.attempted(t, Err(None)));
        assert_eq!(s.success_rate(), Some((56.0 / 64.0, 64)));
        // The pause rule counts both the run's length and its attempts.
        let rule = PauseRule::Failing { for_ms: 7, attempts: 8 };
        assert_eq!(s.pauses(rule, 66), None, "6 ms of failures");
        assert_eq!(s.pauses(rule, 67), Some(PauseReason::Failing));
        assert_eq!(s.pauses(PauseRule::Failing { for_ms: 7, attempts: 9 }, 100), None, "8 failures");
        assert_eq!(s.pauses(PauseRule::Gone, 0), Some(PauseReason::Gone));
        let names = [PauseReason::Gone, PauseReason::Failing, PauseReason::Operator].map(PauseReason::as_str);
        assert_eq!(names, ["gone", "failing", "operator"]);
    }

    #[test]
    fn stats_of_layout_5_keep_their_health() {
        let failing = WebhookStatsV5 {
            last_success_ms: Some(1),
            last_failure_ms: Some(9),
            last_failure: Some("HTTP 503".into()),
            consecutive_failures: 1,
            by_status: [1, 2, 3, 4, 5, 6],
        };
        let s = WebhookStats::from(failing);
        assert_eq!(
            (s.last_success_ms, s.last_failure_ms, s.last_failure.as_deref()),
            (Some(1), Some(9), Some("HTTP 503"))
        );
        assert_eq!((s.consecutive_failures, s.failing_since_ms, s.paused), (1, Some(9), None));
        assert_eq!(Status::ALL.map(|st| s.count(st)), [1, 2, 3, 4, 5, 6]);
        let healthy = WebhookStatsV5 {
            consecutive_failures: 0,
            ..WebhookStatsV5::from(WebhookStatsV4 {
                last_success_ms: None,
                last_failure_ms: Some(9),
                last_failure: None,
                consecutive_failures: 0,
                by_status: [0; 5],
            })
        };
        assert_eq!(WebhookStats::from(healthy).failing_since_ms, None, "no run of failures");
    }

    #[test]
    fn own_event_ids_carry_their_sequence_and_sort_by_it() {
        let seqs = [0u64, 1, 0xffff, 1 << 16, 1_776_443_400_012 << 16 | 0x1234, u64::MAX];
        let mut last = None;
        for seq in seqs {
            let id = event_id_for(seq);
            assert_eq!(id.get_version_num(), 8);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            assert_eq!(seq_in_event_id(&id), Some(seq));
            if let Some(prev) = last {
                assert!(id > prev, "ids sort by sequence");
            }
            last = Some(id);
        }
        assert_eq!(seq_in_event_id(&Uuid::new_v4()), None);
        assert_eq!(seq_in_event_id(&Uuid::nil()), None);
    }
}
