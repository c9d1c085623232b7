//! `GET /v1/overview`: the last hour at a glance, for the console's first
//! page: what was accepted, delivered and failed (minute by minute, since
//! the daemon started at most an hour ago), what is due, what is paused.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::clock;
use crate::recent::MINUTES;

pub async fn overview(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let now_ms = clock::now_ms();
    let due = state.store.read(move |store| store.count_due(now_ms.max(0) as u64)).await?;
    let config = state.config.get();
    let paused = config.webhooks().iter().filter(|w| state.store.paused(&w.id).is_some()).count();
    let (hour, into_ms) = state.metrics.last_hour();
    // The current minute began `into_ms` ago; the one before, a minute earlier.
    let minute_start = |i: usize| now_ms - into_ms as i64 - (MINUTES - 1 - i) as i64 * 60_000;
    let minutes: Vec<Value> = hour
        .iter()
        .enumerate()
        .map(|(i, m)| {
            json!({
                "start": clock::format_ms(minute_start(i)),
                "accepted": m.accepted,
                "delivered": m.delivered,
                "failed": m.failed,
            })
        })
        .collect();
    let sum = |f: fn(&crate::recent::Minute) -> u64| hour.iter().map(f).sum::<u64>();
    let (delivered, failed) = (sum(|m| m.delivered), sum(|m| m.failed));
    let settled = delivered + failed;
    Ok(Json(json!({
        "last_hour": {
            "accepted": sum(|m| m.accepted),
            "delivered": delivered,
            "failed": failed,
            "success_rate": (settled > 0).then(|| delivered as f64 / settled as f64),
        },
        "minutes": minutes,
        "deliveries_due": due,
        "webhooks": config.webhooks().len(),
        "paused_webhooks": paused,
    })))
}
