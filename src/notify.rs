//! Operational notifications: when a webhook is paused or resumed, the
//! `[notify]` endpoint gets a `webhook.paused` or `webhook.resumed` event,
//! enveloped and signed as deliveries are, so that an admin hears of it.
//!
//! Best effort, off every hot path: one thread sends them one at a time,
//! tries each a few times over about half a minute, and logs one that
//! never got through. A failed one waits for its next try without holding
//! up the rest. At most [`MAX_WAITING`] wait to be sent and as many for a
//! retry; beyond that a new one is dropped and logged, so an endpoint that
//! hangs costs one thread and bounded memory. Notifications are not
//! stored: the pause itself is, and `GET /v1/webhooks` shows it. Must not
//! touch storage or the dispatcher.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::clock;
use crate::config::{self, Config};
use crate::deliver::{signed_headers, Class, Sender};
use crate::sign;
use crate::store::Paused;

/// Waits before the second, third and fourth tries.
const RETRY_AFTER: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)];

/// Notifications that may wait for the thread, and again for a retry.
pub const MAX_WAITING: usize = 64;

/// What happened to a webhook.
#[derive(Clone, Copy, Debug)]
pub enum Change {
    Paused(Paused),
    Resumed,
}

/// One notification, with the config in force when it was made. Its
/// `event_id` and time stay the same across tries, as a delivery's do, so
/// that a receiver can tell a retry from a second change.
struct Notice {
    config: Arc<Config>,
    webhook: Uuid,
    change: Change,
    event_id: Uuid,
    at_ms: i64,
}

/// Cheap-to-clone handle to the notification thread, which ends once every
/// handle is gone (the daemon stopping; retries still waiting are dropped).
#[derive(Clone)]
pub struct Notifier {
    tx: SyncSender<Notice>,
}

impl Notifier {
    pub fn start() -> std::io::Result<Notifier> {
        let (tx, rx) = mpsc::sync_channel(MAX_WAITING);
        std::thread::Builder::new().name("notify".into()).spawn(move || run(rx))?;
        Ok(Notifier { tx })
    }

    /// Tells the `[notify]` endpoint, if there is one, that `webhook`
    /// changed. Never waits.
    pub fn send(&self, config: &config::Shared, webhook: Uuid, change: Change) {
        let config = config.get();
        if config.notify.is_none() {
            return;
        }
        let event = change.event_type();
        let notice = Notice { config, webhook, change, event_id: Uuid::new_v4(), at_ms: clock::now_ms() };
        match self.tx.try_send(notice) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => tracing::error!(
                webhook_id = %webhook,
                event,
                "notification dropped: {MAX_WAITING} are waiting for the [notify] endpoint already"
            ),
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!(webhook_id = %webhook, event, "notification dropped: its thread is gone")
            }
        }
    }
}

/// A notice's next try: when, and how many were made.
struct Retry {
    at: Instant,
    made: usize,
    notice: Notice,
}

/// The notification thread: takes new notices while fewer than
/// [`MAX_WAITING`] wait for a retry, and makes each try when it is due.
fn run(rx: Receiver<Notice>) {
    let mut retries: Vec<Retry> = Vec::new();
    loop {
        let next = retries.iter().map(|r| r.at).min();
        let wait = next.map(|at| at.saturating_duration_since(Instant::now()));
        let received = match wait {
            Some(wait) if retries.len() >= MAX_WAITING => {
                std::thread::sleep(wait);
                None
            }
            Some(wait) => match rx.recv_timeout(wait) {
                Ok(notice) => Some(notice),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(notice) => Some(notice),
                Err(_) => return,
            },
        };
        if let Some(notice) = received {
            try_once(notice, 0, &mut retries);
        }
        let now = Instant::now();
        while let Some(i) = retries.iter().position(|r| r.at <= now) {
            let r = retries.swap_remove(i);
            try_once(r.notice, r.made, &mut retries);
        }
    }
}

/// Makes try number `made + 1` of `notice`; a failed one goes back into
/// `retries` unless it was the last.
fn try_once(notice: Notice, made: usize, retries: &mut Vec<Retry>) {
    let Some(error) = deliver(&notice) else { return };
    let event = notice.change.event_type();
    match RETRY_AFTER.get(made) {
        Some(after) => retries.push(Retry { at: Instant::now() + *after, made: made + 1, notice }),
        None => {
            tracing::error!(webhook_id = %notice.webhook, event, error, "notification not delivered; giving up")
        }
    }
}

impl Change {
    fn event_type(self) -> &'static str {
        match self {
            Change::Paused(_) => "webhook.paused",
            Change::Resumed => "webhook.resumed",
        }
    }
}

/// The notification's envelope: a delivery's keys, with the webhook's
/// client and the change as `data`.
fn envelope(notice: &Notice, delivery_id: Uuid) -> Vec<u8> {
    let Notice { config, webhook, change, event_id, at_ms } = notice;
    let w = config.webhook(webhook);
    let url = w.map(|w| w.url.as_str());
    let data = match *change {
        Change::Paused(p) => {
            json!({ "url": url, "reason": p.reason.as_str(), "paused_at": clock::format_ms(p.at_ms) })
        }
        Change::Resumed => json!({ "url": url }),
    };
    json!({
        "event_type": change.event_type(),
        "event_id": event_id,
        "webhook_id": webhook,
        "delivery_id": delivery_id,
        "timestamp": clock::format_ms(*at_ms),
        "client_id": w.map(|w| w.client_id),
        "test": false,
        "data": data,
    })
    .to_string()
    .into_bytes()
}

/// One try; `None` if it got through, else why not.
fn deliver(notice: &Notice) -> Option<String> {
    let Notice { config, webhook, change, .. } = notice;
    let notify = config.notify.as_ref()?;
    let sender = Sender::new(&config.delivery, 1);
    let delivery_id = Uuid::new_v4();
    let now_ms = clock::now_ms();
    let body = envelope(notice, delivery_id);
    let ts = (now_ms / 1000).to_string();
    let signature = sign::header([notify.secret.expose().as_str()], now_ms / 1000, &body);
    let (did, wid, event) = (delivery_id.to_string(), webhook.to_string(), change.event_type());
    let headers = signed_headers(event, &did, &ts, &wid, &signature);
    let answer = sender.post(&notify.url, &headers, &body, None);
    if answer.class == Class::Success {
        tracing::info!(webhook_id = %webhook, event, "notification sent");
        return None;
    }
    Some(answer.error.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notice for an endpoint that refuses connections at once.
    fn refused() -> Notice {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let text = r#"
[delivery]
allow_private_targets = true

[notify]
url = "http://127.0.0.1:1/refused"
secret = "whsec_n"

[[webhooks]]
id = "0b7d9c3a-4a57-4d2e-9a51-5f0b6f2a8c01"
client_id = "6f1c1a3e-2b6e-4c1e-9d55-0c8a3f7e9b10"
url = "http://127.0.0.1:1/hook"
secret = "whsec_x"
events = ["meeting.scheduled"]
"#;
        std::fs::write(&path, text).unwrap();
        let config = Arc::new(config::load(&path).unwrap());
        let webhook = config.webhooks()[0].id;
        Notice { config, webhook, change: Change::Resumed, event_id: Uuid::new_v4(), at_ms: 0 }
    }

    #[test]
    fn a_failed_try_is_retried_later_until_the_fourth() {
        let mut retries = Vec::new();
        let before = Instant::now();
        try_once(refused(), 0, &mut retries);
        assert_eq!(retries.len(), 1);
        let r = retries.pop().unwrap();
        assert_eq!(r.made, 1);
        assert!(r.at >= before + RETRY_AFTER[0], "the second try waits a second");
        try_once(r.notice, RETRY_AFTER.len(), &mut retries);
        assert!(retries.is_empty(), "no fifth try");
    }
}
