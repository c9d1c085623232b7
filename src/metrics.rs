//! Prometheus metrics (`GET /metrics`, text format).
//!
//! Counters and the latency histogram are updated where things happen
//! (ingest, attempts); gauges that describe stored state (what is due, per
//! webhook health, bytes on disk) are set from a [`Snapshot`] taken at scrape
//! time, so they cost nothing between scrapes. Per-webhook series are rebuilt
//! on every scrape from the configured webhooks, which bounds cardinality.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use uuid::Uuid;

use crate::event::EventType;
use crate::recent::{Minute, Recent, Seen, MINUTES};
use crate::store::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    event_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabel {
    webhook_id: String,
}

/// Stored state read at scrape time.
pub struct Snapshot {
    pub due_now: u64,
    pub scheduled_later: u64,
    pub oldest_due_age_seconds: f64,
    pub storage_bytes: u64,
    pub set_aside: u64,
    /// Deliveries set aside since start (the store counts them).
    pub set_aside_this_run: u64,
    /// Per configured webhook: id, consecutive failures, last success (unix
    /// seconds), whether it is paused.
    pub webhooks: Vec<(Uuid, u32, Option<f64>, bool)>,
}

/// Cheap-to-clone handle on the registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    events: Family<TypeLabel, Counter>,
    attempts: Family<OutcomeLabel, Counter>,
    latency: Histogram,
    due_now: Gauge,
    scheduled_later: Gauge,
    oldest_due_age: Gauge<f64, AtomicU64>,
    storage_bytes: Gauge,
    set_aside: Gauge,
    consecutive_failures: Family<WebhookLabel, Gauge>,
    last_success: Family<WebhookLabel, Gauge<f64, AtomicU64>>,
    webhooks: Family<StateLabel, Gauge>,
    undecodable: Counter,
    reloads_refused: Counter,
    /// The console's last hour, in minutes since `started`.
    recent: Mutex<Recent>,
    started: Instant,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("nexor_webhookd");
        let inner = Inner {
            events: Family::default(),
            attempts: Family::default(),
            // 1 ms to ~16 s.
            latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            due_now: Gauge::default(),
            scheduled_later: Gauge::default(),
            oldest_due_age: Gauge::default(),
            storage_bytes: Gauge::default(),
            set_aside: Gauge::default(),
            consecutive_failures: Family::default(),
            last_success: Family::default(),
            webhooks: Family::default(),
            undecodable: Counter::default(),
            reloads_refused: Counter::default(),
            recent: Mutex::default(),
            started: Instant::now(),
            registry: Registry::default(),
        };
        registry.register("events_accepted", "Events stored and acknowledged, by type", inner.events.clone());
        registry.register(
            "attempts",
            "Delivery attempts by outcome class (2xx, 3xx, 4xx, 5xx, timeout, connect, blocked, other)",
            inner.attempts.clone(),
        );
        registry.register("attempt_duration_seconds", "Duration of delivery attempts", inner.latency.clone());
        registry.register("deliveries_due", "Deliveries due now and not yet finished", inner.due_now.clone());
        registry.register(
            "deliveries_scheduled",
            "Deliveries waiting for a later retry",
            inner.scheduled_later.clone(),
        );
        registry.register(
            "oldest_due_age_seconds",
            "How long the oldest due delivery has been waiting",
            inner.oldest_due_age.clone(),
        );
        registry.register("storage_bytes", "Bytes of the sled database on disk", inner.storage_bytes.clone());
        registry.register(
            "webhook_consecutive_failures",
            "Failed attempts since the webhook's last success",
            inner.consecutive_failures.clone(),
        );
        registry.register(
            "webhook_last_success_timestamp_seconds",
            "When the webhook last answered 2xx",
            inner.last_success.clone(),
        );
        registry.register(
            "webhooks",
            "Configured webhooks by state: active, or paused (deliveries held)",
            inner.webhooks.clone(),
        );
        registry.register(
            "deliveries_set_aside",
            "Deliveries taken out of the due index because their records could not be read",
            inner.set_aside.clone(),
        );
        registry.register(
            "undecodable_records",
            "Stored records this build could not decode (skipped)",
            inner.undecodable.clone(),
        );
        registry.register(
            "config_reloads_refused",
            "SIGHUP reloads refused (a file empty, invalid, or removing every webhook); the running config stayed",
            inner.reloads_refused.clone(),
        );
        Metrics { inner: Arc::new(Inner { registry, ..inner }) }
    }

    pub fn event_accepted(&self, t: EventType) {
        self.inner.events.get_or_create(&TypeLabel { event_type: t.as_str() }).inc();
        self.count(Seen::Accepted);
    }

    /// A delivery's outcome is stored with this status: counted in the
    /// last hour if it is final.
    pub fn settled(&self, status: Status) {
        match status {
            Status::Succeeded => self.count(Seen::Delivered),
            Status::Failed => self.count(Seen::Failed),
            _ => {}
        }
    }

    fn minute(&self) -> u64 {
        self.inner.started.elapsed().as_secs() / 60
    }

    fn count(&self, seen: Seen) {
        let minute = self.minute();
        self.inner.recent.lock().expect("recent lock").add(minute, seen);
    }

    /// The last hour, oldest minute first, and how long ago (in
    /// milliseconds) the current minute began.
    pub fn last_hour(&self) -> ([Minute; MINUTES], u64) {
        let elapsed = self.inner.started.elapsed();
        let into = elapsed.as_millis() as u64 % 60_000;
        (self.inner.recent.lock().expect("recent lock").hour(elapsed.as_secs() / 60), into)
    }

    pub fn attempt(&self, outcome: &'static str, seconds: f64) {
        self.inner.attempts.get_or_create(&OutcomeLabel { outcome }).inc();
        self.inner.latency.observe(seconds);
    }

    pub fn reload_refused(&self) {
        self.inner.reloads_refused.inc();
    }

    /// The text exposition, with the stored-state gauges set from `s`.
    pub fn render(&self, s: Snapshot) -> String {
        let i = &self.inner;
        i.due_now.set(s.due_now as i64);
        i.scheduled_later.set(s.scheduled_later as i64);
        i.oldest_due_age.set(s.oldest_due_age_seconds);
        i.storage_bytes.set(s.storage_bytes as i64);
        i.set_aside.set(s.set_aside as i64);
        // A counter: it moves on by what the store counted since the last scrape.
        let counted = i.undecodable.get();
        i.undecodable.inc_by(s.set_aside_this_run.saturating_sub(counted));
        i.consecutive_failures.clear();
        i.last_success.clear();
        let paused = s.webhooks.iter().filter(|w| w.3).count() as i64;
        i.webhooks.get_or_create(&StateLabel { state: "paused" }).set(paused);
        i.webhooks.get_or_create(&StateLabel { state: "active" }).set(s.webhooks.len() as i64 - paused);
        for (id, failures, last_success, _) in s.webhooks {
            let label = WebhookLabel { webhook_id: id.to_string() };
            i.consecutive_failures.get_or_create(&label).set(failures as i64);
            if let Some(t) = last_success {
                i.last_success.get_or_create(&label).set(t);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &i.registry).expect("writing to a String");
        out
    }
}
