//! Operational notifications: when a webhook is paused or resumed, the
//! `[notify]` endpoint gets a `webhook.paused` or `webhook.resumed` event,
//! enveloped and signed as deliveries are, so that an admin hears of it.
//!
//! Best effort, off every hot path: each notification is sent by a thread
//! of its own, tried a few times over about half a minute, and logged if it
//! never got through. It is not stored: the pause itself is, and
//! `GET /v1/webhooks` shows it. Must not touch storage or the dispatcher.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::clock;
use crate::config::{self, Config};
use crate::deliver::{signed_headers, Class, Sender};
use crate::sign;
use crate::store::Paused;

/// Waits before each try: at once, then after a second, five, thirty.
const TRIES: [Duration; 4] =
    [Duration::ZERO, Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)];

/// What happened to a webhook.
#[derive(Clone, Copy, Debug)]
pub enum Change {
    Paused(Paused),
    Resumed,
}

/// Tells the `[notify]` endpoint, if there is one, that `webhook` changed.
pub fn send(config: &config::Shared, webhook: Uuid, change: Change) {
    let config = config.get();
    if config.notify.is_none() {
        return;
    }
    let spawned =
        std::thread::Builder::new().name("notify".into()).spawn(move || deliver(&config, webhook, change));
    if let Err(e) = spawned {
        tracing::error!(webhook_id = %webhook, error = %e, "cannot start sending a notification");
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
fn envelope(config: &Config, webhook: Uuid, change: Change, delivery_id: Uuid, now_ms: i64) -> Vec<u8> {
    let w = config.webhook(&webhook);
    let url = w.map(|w| w.url.as_str());
    let data = match change {
        Change::Paused(p) => {
            json!({ "url": url, "reason": p.reason.as_str(), "paused_at": clock::format_ms(p.at_ms) })
        }
        Change::Resumed => json!({ "url": url }),
    };
    json!({
        "event_type": change.event_type(),
        "event_id": Uuid::new_v4(),
        "webhook_id": webhook,
        "delivery_id": delivery_id,
        "timestamp": clock::format_ms(now_ms),
        "client_id": w.map(|w| w.client_id),
        "test": false,
        "data": data,
    })
    .to_string()
    .into_bytes()
}

fn deliver(config: &Config, webhook: Uuid, change: Change) {
    let Some(notify) = &config.notify else { return };
    let sender = Sender::new(&config.delivery, 1);
    let mut last = None;
    for wait in TRIES {
        std::thread::sleep(wait);
        let delivery_id = Uuid::new_v4();
        let now_ms = clock::now_ms();
        let body = envelope(config, webhook, change, delivery_id, now_ms);
        let ts = (now_ms / 1000).to_string();
        let signature = sign::header([notify.secret.expose().as_str()], now_ms / 1000, &body);
        let did = delivery_id.to_string();
        let wid = webhook.to_string();
        let event = change.event_type();
        let headers = signed_headers(event, &did, &ts, &wid, &signature);
        let answer = sender.post(&notify.url, &headers, &body, None);
        if answer.class == Class::Success {
            tracing::info!(webhook_id = %webhook, event, "notification sent");
            return;
        }
        last = answer.error;
    }
    tracing::error!(webhook_id = %webhook, error = last.as_deref(), "notification not delivered; giving up");
}
