//! Event calls: ingest, inspection, redelivery and test sends.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{cursor, delivery_json, enabled, limit, parse_id, query_id, status, ApiError, AppState};
use crate::clock;
use crate::event::{self, EventType, IngestError};
use crate::store::{
    seq_time_ms, DeliveryKey, DeliveryRecord, EventFilter, EventPage, EventRecord, Ingested, NewEvent,
    Status, StoreError,
};

/// `POST /v1/events`.
pub async fn ingest(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let input = event::parse_ingest(&body?)?;
    let now = clock::now_ms();
    let record = EventRecord {
        // Replaced by the store with one it can find without an index.
        event_id: input.event_id.unwrap_or_else(Uuid::nil),
        event_type: input.event_type,
        client_id: input.client_id,
        timestamp_ms: input.timestamp_ms.unwrap_or(now),
        timestamp_given: input.timestamp_ms.is_some(),
        test: false,
        data: input.data,
        webhooks: state.config.get().subscribers(&input.client_id, input.event_type).map(|w| w.id).collect(),
    };
    store_event(&state, NewEvent { record, id_given: input.event_id.is_some() }).await
}

async fn store_event(state: &AppState, event: NewEvent) -> Result<Response, ApiError> {
    let (event_id, event_type) = (event.record.event_id, event.record.event_type);
    let (tx, rx) = oneshot::channel();
    let dispatcher = state.dispatcher.clone();
    state.store.ingest_then(event, move |r| {
        // Announced from the store's answer, not from this task: see
        // dispatch's `Fresh` for why the order matters.
        if let Ok(Ingested::Accepted { event, due }) = &r {
            dispatcher.ingested(event.clone(), due.clone());
        }
        let _ = tx.send(r);
    });
    match rx.await.map_err(|_| StoreError::Closed)?? {
        Ingested::Accepted { event, .. } => {
            // Held ones (a paused webhook's) too.
            let (event_id, deliveries) = (event.event_id, event.webhooks.len());
            state.metrics.event_accepted(event_type);
            Ok((StatusCode::ACCEPTED, Json(json!({ "event_id": event_id, "deliveries": deliveries })))
                .into_response())
        }
        Ingested::Duplicate => {
            Ok((StatusCode::OK, Json(json!({ "event_id": event_id, "duplicate": true }))).into_response())
        }
        Ingested::Conflict => Err(ApiError::new(
            StatusCode::CONFLICT,
            "event_id_conflict",
            format!("event_id {event_id} was already used for an event with different content"),
        )),
    }
}

/// The event with this id and its deliveries (in webhook-id order), or a 404.
async fn find(
    state: &AppState,
    event_id: &str,
) -> Result<(EventRecord, Vec<(DeliveryKey, DeliveryRecord)>), ApiError> {
    let id = parse_id(event_id, "event")?;
    let found = state
        .store
        .read(move |store| {
            let Some(seq) = store.find_event(&id)? else { return Ok(None) };
            let Some(event) = store.event(seq)? else { return Ok(None) };
            Ok(Some((event, store.deliveries(seq)?)))
        })
        .await?;
    found.ok_or_else(|| ApiError::not_found(format!("no event {id}")))
}

#[derive(Deserialize)]
pub struct ListQuery {
    event_id: Option<String>,
    client_id: Option<String>,
    event_type: Option<String>,
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// Events one page looks at, at most, whatever its filters: so a page
/// costs about the same however rare its matches are, and a filter that
/// matches little answers short pages that say how far back they searched.
/// Measured in BENCHMARKS.md ("The console").
pub const SCAN: usize = 2_000;

/// `GET /v1/events?event_id=&client_id=&event_type=&status=&limit=&cursor=`:
/// newest first, each with its deliveries' statuses; `status` keeps events
/// with some delivery in that status.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let event_type = q
        .event_type
        .as_deref()
        .map(|t| {
            EventType::parse(t)
                .ok_or_else(|| ApiError::invalid("event_type", format!("unknown event type {t:?}")))
        })
        .transpose()?;
    let filter = EventFilter {
        client_id: query_id(q.client_id.as_deref(), "client_id")?,
        event_type,
        status: status(q.status.as_deref())?,
    };
    let (limit, before) = (limit(q.limit.as_deref())?, cursor(q.cursor.as_deref())?);
    let event_id = query_id(q.event_id.as_deref(), "event_id")?;
    let page = state
        .store
        .read(move |store| match event_id {
            // One event, if it is there and the other filters keep it.
            Some(id) => {
                let Some(seq) = store.find_event(&id)? else { return Ok(EventPage::default()) };
                let page = store.events_before(Some(seq + 1), &filter, 1, 1)?;
                Ok(EventPage { next: None, ..page })
            }
            None => store.events_before(before, &filter, limit, SCAN),
        })
        .await?;
    let events: Vec<Value> = page
        .events
        .iter()
        .map(|(e, deliveries)| {
            let deliveries: Vec<Value> = deliveries
                .iter()
                .map(|(_, d)| {
                    json!({
                        "webhook_id": d.webhook_id,
                        "status": d.status.as_str(),
                        "attempts": d.attempts.len(),
                        "next_attempt_at": d.next_attempt_at.map(clock::format_ms),
                    })
                })
                .collect();
            json!({
                "event_id": e.event_id,
                "event_type": e.event_type.as_str(),
                "client_id": e.client_id,
                "timestamp": clock::format_ms(e.timestamp_ms),
                "test": e.test,
                "deliveries": deliveries,
            })
        })
        .collect();
    Ok(Json(json!({
        "events": events,
        "next_cursor": page.next.map(|c| c.to_string()),
        "searched_to": page.searched_to.map(|s| clock::format_ms(seq_time_ms(s))),
    })))
}

/// `GET /v1/events/{event_id}`.
pub async fn show(State(state): State<AppState>, Path(event_id): Path<String>) -> Result<Response, ApiError> {
    let (event, deliveries) = find(&state, &event_id).await?;
    /// The event as stored: `data` is the application's text, as delivered
    /// (read into a JSON value it could change: `1e400` became `null`, long
    /// integers floats, and a repeated key lost one of its values).
    #[derive(Serialize)]
    struct Shown<'a> {
        event_id: Uuid,
        event_type: &'static str,
        client_id: Uuid,
        timestamp: String,
        test: bool,
        data: &'a RawValue,
        deliveries: Vec<Value>,
    }
    let data: &RawValue = serde_json::from_str(&event.data).map_err(|e| StoreError::Corrupt {
        key: format!("event {}", event.event_id),
        reason: format!("data is not JSON: {e}"),
    })?;
    let shown = Shown {
        event_id: event.event_id,
        event_type: event.event_type.as_str(),
        client_id: event.client_id,
        timestamp: clock::format_ms(event.timestamp_ms),
        test: event.test,
        data,
        deliveries: deliveries.iter().map(|(_, d)| delivery_json(d)).collect(),
    };
    Ok(Json(shown).into_response())
}

#[derive(Deserialize)]
pub struct RedeliverQuery {
    webhook_id: Option<String>,
}

/// `POST /v1/events/{event_id}/redeliver[?webhook_id=]`: every failed or
/// cancelled delivery of the event (to enabled webhooks) is attempted again
/// now, with a fresh retry schedule.
pub async fn redeliver(
    State(state): State<AppState>,
    Path(event_id): Path<String>,
    query: Result<Query<RedeliverQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let (event, deliveries) = find(&state, &event_id).await?;
    let only = query.webhook_id.as_deref().map(|w| parse_id(w, "webhook")).transpose()?;
    let config = state.config.get();
    let keys: Vec<_> =
        deliveries.into_iter().map(|(k, _)| k).filter(|k| only.is_none_or(|w| w == k.webhook)).collect();
    if let (Some(w), true) = (only, keys.is_empty()) {
        return Err(ApiError::not_found(format!("event {} has no delivery to webhook {w}", event.event_id)));
    }
    // A webhook that is gone or disabled would only cancel the attempt again.
    let (live, skipped): (Vec<_>, Vec<_>) =
        keys.into_iter().partition(|k| config.webhook(&k.webhook).is_some_and(|w| w.enabled));
    let requeued =
        state.dispatcher.requeue(&state.store, &live, &[Status::Failed, Status::Cancelled]).await?;
    Ok(Json(json!({ "event_id": event.event_id, "requeued": requeued, "skipped_disabled": skipped.len() })))
}

/// `POST /v1/webhooks/{id}/test`: one `test: true` event to this webhook only.
/// Optional body `{"event_type": …, "data": {…}}`.
pub async fn test_send(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "webhook")?;
    let config = state.config.get();
    let webhook = enabled(&config, &id)?;
    let (event_type, data) = parse_test_body(&body?)?;
    let record = EventRecord {
        event_id: Uuid::nil(),
        event_type,
        client_id: webhook.client_id,
        timestamp_ms: clock::now_ms(),
        timestamp_given: false,
        test: true,
        data,
        webhooks: vec![id],
    };
    store_event(&state, NewEvent { record, id_given: false }).await
}

fn parse_test_body(body: &[u8]) -> Result<(EventType, String), ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TestBody<'a> {
        event_type: Option<String>,
        #[serde(borrow)]
        data: Option<&'a serde_json::value::RawValue>,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((EventType::MeetingScheduled, "{}".into()));
    }
    let t: TestBody = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => IngestError::Invalid { field: "body", message: e.to_string() },
        _ => IngestError::Unparseable(e.to_string()),
    })?;
    let event_type = match t.event_type {
        None => EventType::MeetingScheduled,
        Some(name) => EventType::parse(&name)
            .ok_or_else(|| ApiError::invalid("event_type", format!("unknown event type {name:?}")))?,
    };
    let data = t.data.map(event::data_object).transpose()?.unwrap_or_else(|| "{}".to_owned());
    Ok((event_type, data))
}
