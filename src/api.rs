//! The local HTTP API (axum): ingest, inspection, test sends, health.
//!
//! Handlers validate input with [`event`], hand writes to the [`Store`] and
//! newly due deliveries to the [`Dispatcher`]; they never touch sled or make
//! outbound requests themselves. Every error answer has the contract's shape
//! `{"error": {"code", "message"}}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::clock;
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::event::{self, EventType, IngestError};
use crate::store::{EventRecord, Ingested, NewEvent, Store, StoreError};

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<Config>,
    pub dispatcher: Dispatcher,
}

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/events", post(ingest))
        .route("/events/{event_id}", get(show_event))
        .route("/webhooks/{id}/test", post(test_send))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(healthz))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(state.config.server.max_body))
        .with_state(state)
}

/// An error answer in the contract's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Unparseable(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", m)
            }
            IngestError::Invalid { field, message } => {
                let code = if message.starts_with("missing field") {
                    "missing_field"
                } else {
                    "invalid_field"
                };
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    code,
                    format!("{field}: {message}"),
                )
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage error answering a request");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            e.to_string(),
        )
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body exceeds [server] max_body",
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", r.body_text())
        }
    }
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.config.server.api_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn ingest(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let input = event::parse_ingest(&body?)?;
    let now = clock::now_ms();
    let record = EventRecord {
        event_id: input.event_id.unwrap_or_else(Uuid::new_v4),
        event_type: input.event_type,
        client_id: input.client_id,
        timestamp_ms: input.timestamp_ms.unwrap_or(now),
        timestamp_given: input.timestamp_ms.is_some(),
        test: false,
        data: input.data,
    };
    let webhooks = state
        .config
        .subscribers(&record.client_id, record.event_type)
        .map(|w| w.id)
        .collect();
    store_event(&state, record, webhooks).await
}

async fn store_event(
    state: &AppState,
    record: EventRecord,
    webhooks: Vec<Uuid>,
) -> Result<Response, ApiError> {
    let event_id = record.event_id;
    match state.store.ingest(NewEvent { record, webhooks }).await? {
        Ingested::Accepted(due) => {
            let deliveries = due.len();
            state.dispatcher.scheduled(due);
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "event_id": event_id, "deliveries": deliveries })),
            )
                .into_response())
        }
        Ingested::Duplicate => Ok((
            StatusCode::OK,
            Json(json!({ "event_id": event_id, "duplicate": true })),
        )
            .into_response()),
        Ingested::Conflict => Err(ApiError::new(
            StatusCode::CONFLICT,
            "event_id_conflict",
            format!("event_id {event_id} was already used for an event with different content"),
        )),
    }
}

fn parse_id(text: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .ok()
        .filter(|_| text.len() == 36)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no {what} {text:?}"),
            )
        })
}

async fn show_event(
    State(state): State<AppState>,
    Path(event_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&event_id, "event")?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no event {id}"));
    let seq = state.store.find_event(&id)?.ok_or_else(not_found)?;
    let event = state.store.event(seq)?.ok_or_else(not_found)?;
    let deliveries: Vec<Value> = state
        .store
        .deliveries(seq)?
        .into_iter()
        .map(|(_, d)| {
            let attempts: Vec<Value> = d
                .attempts
                .iter()
                .map(|a| {
                    let mut v = json!({
                        "delivery_id": a.delivery_id,
                        "started_at": clock::format_ms(a.started_at_ms),
                        "duration_ms": a.duration_ms,
                        "response_body": a.response_body,
                    });
                    if let Some(code) = a.status_code {
                        v["status_code"] = json!(code);
                    }
                    if let Some(e) = &a.error {
                        v["error"] = json!(e);
                    }
                    v
                })
                .collect();
            json!({
                "webhook_id": d.webhook_id,
                "status": d.status.as_str(),
                "next_attempt_at": d.next_attempt_at.map(clock::format_ms),
                "attempts": attempts,
            })
        })
        .collect();
    let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
    Ok(Json(json!({
        "event_id": event.event_id,
        "event_type": event.event_type.as_str(),
        "client_id": event.client_id,
        "timestamp": clock::format_ms(event.timestamp_ms),
        "test": event.test,
        "data": data,
        "deliveries": deliveries,
    })))
}

/// `POST /v1/webhooks/{id}/test`: one `test: true` event to this webhook only.
/// Optional body `{"event_type": …, "data": {…}}`.
async fn test_send(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "webhook")?;
    let webhook = state.config.webhook(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no webhook {id}"),
        )
    })?;
    if !webhook.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "webhook_disabled",
            format!("webhook {id} is disabled"),
        ));
    }
    let body = body?;
    let (event_type, data) = parse_test_body(&body)?;
    let record = EventRecord {
        event_id: Uuid::new_v4(),
        event_type,
        client_id: webhook.client_id,
        timestamp_ms: clock::now_ms(),
        timestamp_given: false,
        test: true,
        data,
    };
    store_event(&state, record, vec![id]).await
}

fn parse_test_body(body: &[u8]) -> Result<(EventType, String), ApiError> {
    #[derive(serde::Deserialize)]
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
        serde_json::error::Category::Data => IngestError::Invalid {
            field: "body",
            message: e.to_string(),
        },
        _ => IngestError::Unparseable(e.to_string()),
    })?;
    let event_type = match t.event_type {
        None => EventType::MeetingScheduled,
        Some(name) => EventType::parse(&name).ok_or_else(|| IngestError::Invalid {
            field: "event_type",
            message: format!("unknown event type {name:?}"),
        })?,
    };
    let data = match t.data {
        None => "{}".to_owned(),
        Some(d) if d.get().starts_with('{') => d.get().to_owned(),
        Some(_) => {
            return Err(IngestError::Invalid {
                field: "data",
                message: "`data` must be a JSON object".into(),
            }
            .into())
        }
    };
    Ok((event_type, data))
}
