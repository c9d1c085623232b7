//! Per-webhook calls: configuration and health, the delivery log, recovery,
//! cancelling what waits.

use std::collections::HashSet;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{attempt_json, configured, cursor, enabled, limit, parse_id, status, ApiError, AppState};
use crate::clock;
use crate::config::{Events, Webhook};
use crate::notify;
use crate::store::{first_seq_at, seq_time_ms, PauseReason, Paused, Status, WebhookStats};

/// The delivery stats of these webhooks, in their order.
async fn stats_of(state: &AppState, ids: Vec<Uuid>) -> Result<Vec<WebhookStats>, ApiError> {
    Ok(state.store.read(move |store| ids.iter().map(|id| store.webhook_stats(id)).collect()).await?)
}

/// A webhook's configuration (secret redacted) and its delivery health.
fn webhook_json(w: &Webhook, stats: &WebhookStats) -> Value {
    let events: Vec<&str> = match &w.events {
        Events::All => vec!["*"],
        Events::Only(list) => list.iter().map(|t| t.as_str()).collect(),
    };
    let counts: serde_json::Map<String, Value> =
        Status::ALL.iter().map(|s| (s.as_str().to_owned(), json!(stats.count(*s)))).collect();
    json!({
        "id": w.id,
        "client_id": w.client_id,
        "url": w.url,
        "events": events,
        "enabled": w.enabled,
        "standard_webhooks": w.standard_key.is_some(),
        "secret": "<redacted>",
        "state": if stats.paused.is_some() { "paused" } else { "active" },
        "paused_reason": stats.paused.map(|p| p.reason.as_str()),
        "paused_at": stats.paused.map(|p| clock::format_ms(p.at_ms)),
        "health": {
            "last_success_at": stats.last_success_ms.map(clock::format_ms),
            "last_failure_at": stats.last_failure_ms.map(clock::format_ms),
            "last_failure": stats.last_failure,
            "consecutive_failures": stats.consecutive_failures,
            "failing_since": stats.failing_since_ms.map(clock::format_ms),
            "recent_attempts": stats.success_rate().map_or(0, |(_, n)| n),
            "recent_success_rate": stats.success_rate().map(|(rate, _)| rate),
            "deliveries": counts,
        },
    })
}

/// `POST /v1/webhooks/{id}/pause`: its deliveries are held, not attempted,
/// until it is resumed. Pausing a paused webhook keeps its first reason.
pub async fn pause(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "webhook")?;
    let config = state.config.get();
    let webhook = configured(&config, &id)?;
    let paused = Paused { reason: PauseReason::Operator, at_ms: clock::now_ms() };
    let turn = state.dispatcher.changing().await;
    if state.store.pause(id, paused).await?.is_none() {
        state.notifier.send(&state.config, id, notify::Change::Paused(paused));
        let held = state.dispatcher.hold_waiting(&turn, &state.store, &HashSet::from([id])).await?;
        tracing::info!(webhook_id = %id, held, "webhook paused by an operator");
    }
    let stats = stats_of(&state, vec![id]).await?;
    Ok(Json(webhook_json(webhook, &stats[0])))
}

/// `POST /v1/webhooks/{id}/resume`: the webhook is active again, and its
/// held deliveries are due now, oldest first (if it is enabled: a disabled
/// one's stay held until a reload enables it).
pub async fn resume(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "webhook")?;
    let turn = state.dispatcher.changing().await;
    // The config in force once it is this call's turn (a reload may have
    // disabled the webhook meanwhile).
    let config = state.config.get();
    let webhook = configured(&config, &id)?;
    let was = state.store.resume(id).await?;
    let released = match webhook.enabled {
        true => state.dispatcher.release_held(&turn, &state.store, id).await?,
        false => 0,
    };
    drop(turn);
    if let Some(was) = was {
        state.notifier.send(&state.config, id, notify::Change::Resumed);
        tracing::info!(webhook_id = %id, released, paused = was.reason.as_str(), "webhook resumed");
    }
    let stats = stats_of(&state, vec![id]).await?;
    let mut answer = webhook_json(webhook, &stats[0]);
    answer["released"] = json!(released);
    Ok(Json(answer))
}

/// `GET /v1/webhooks`.
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let config = state.config.get();
    let stats = stats_of(&state, config.webhooks().iter().map(|w| w.id).collect()).await?;
    let webhooks: Vec<Value> =
        config.webhooks().iter().zip(&stats).map(|(w, s)| webhook_json(w, s)).collect();
    Ok(Json(json!({ "webhooks": webhooks })))
}

/// `GET /v1/webhooks/{id}`.
pub async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "webhook")?;
    let config = state.config.get();
    let webhook = configured(&config, &id)?;
    let stats = stats_of(&state, vec![id]).await?;
    Ok(Json(webhook_json(webhook, &stats[0])))
}

#[derive(Deserialize)]
pub struct DeliveriesQuery {
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /v1/webhooks/{id}/deliveries?status=&limit=&cursor=`: newest first.
/// The cursor is the position after the page's last delivery, so pages stay
/// stable while new events arrive. Works for webhooks no longer configured.
pub async fn deliveries(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let id = parse_id(&id, "webhook")?;
    let (status, limit, before) =
        (status(q.status.as_deref())?, limit(q.limit.as_deref())?, cursor(q.cursor.as_deref())?);
    let (page, events) = state
        .store
        .read(move |store| {
            let page = store.webhook_deliveries(id, before, status, limit)?;
            let events: Result<Vec<_>, _> =
                page.deliveries.iter().map(|(key, _)| store.event(key.seq)).collect();
            Ok((page, events?))
        })
        .await?;
    let mut out = Vec::with_capacity(page.deliveries.len());
    for ((key, d), event) in page.deliveries.iter().zip(events) {
        let Some(event) = event else { continue };
        out.push(json!({
            "event_id": event.event_id,
            "event_type": event.event_type.as_str(),
            "created_at": clock::format_ms(seq_time_ms(key.seq)),
            "test": event.test,
            "status": d.status.as_str(),
            "next_attempt_at": d.next_attempt_at.map(clock::format_ms),
            "attempts": d.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
        }));
    }
    Ok(Json(json!({ "deliveries": out, "next_cursor": page.next.map(|c| c.to_string()) })))
}

#[derive(Deserialize)]
pub struct RecoverQuery {
    since: Option<String>,
}

/// `POST /v1/webhooks/{id}/recover?since=<RFC 3339>`: every failed delivery
/// to this webhook of an event received since then is attempted again now.
pub async fn recover(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<RecoverQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let id = parse_id(&id, "webhook")?;
    let config = state.config.get();
    enabled(&config, &id)?;
    let since =
        q.since.ok_or_else(|| ApiError::invalid("since", "missing query parameter `since` (RFC 3339)"))?;
    let since_ms = clock::parse_rfc3339_ms(&since)
        .ok_or_else(|| ApiError::invalid("since", format!("{since:?} is not an RFC 3339 timestamp")))?;
    let keys =
        state.store.read(move |store| store.webhook_delivery_keys_since(id, first_seq_at(since_ms))).await?;
    let requeued = state.dispatcher.requeue(&state.store, &keys, &[Status::Failed]).await?;
    Ok(Json(json!({ "webhook_id": id, "since": clock::format_ms(since_ms), "requeued": requeued })))
}

/// `POST /v1/webhooks/{id}/cancel`: every delivery to this webhook still
/// waiting for an attempt, or held because a reload removed or disabled the
/// webhook, is cancelled. The webhook need not be configured any more: held
/// deliveries of a removed webhook are what this is for.
pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "webhook")?;
    let keys = state
        .store
        .read(move |store| {
            let page = store.webhook_deliveries(id, None, None, usize::MAX)?;
            Ok(page
                .deliveries
                .into_iter()
                .filter(|(_, d)| !d.status.is_final())
                .map(|(k, _)| k)
                .collect::<Vec<_>>())
        })
        .await?;
    let cancelled = state.store.cancel(keys, vec![id]).await?;
    Ok(Json(json!({ "webhook_id": id, "cancelled": cancelled })))
}
