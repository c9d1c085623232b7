//! The local HTTP API (axum): ingest, inspection, redelivery, test sends,
//! health and metrics.
//!
//! Handlers validate input with [`crate::event`], hand writes to the
//! [`Store`] and newly due deliveries to the [`Dispatcher`]; they never touch
//! sled or make outbound requests themselves. They read only through
//! [`Store::read`], off the runtime's threads, so a stuck store holds up the
//! requests that wait for it and nothing else; `/healthz` touches no state.
//! Every error answer has the contract's shape `{"error": {"code",
//! "message"}}`. [`events`] serves the event calls, [`webhooks`] the
//! per-webhook ones, [`storage`] the backup.

mod events;
mod overview;
mod storage;
mod webhooks;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::clock;
use crate::config::{self, Config, Webhook};
use crate::dispatch::Dispatcher;
use crate::event::IngestError;
use crate::metrics::{Metrics, Snapshot};
use crate::notify::Notifier;
use crate::store::{Attempt, DeliveryRecord, Status, Store, StoreError};

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: config::Shared,
    pub dispatcher: Dispatcher,
    pub metrics: Metrics,
    pub notifier: Notifier,
}

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/events", post(events::ingest).get(events::list))
        .route("/events/{event_id}", get(events::show))
        .route("/events/{event_id}/redeliver", post(events::redeliver))
        .route("/webhooks", get(webhooks::list))
        .route("/webhooks/{id}", get(webhooks::show))
        .route("/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route("/webhooks/{id}/recover", post(webhooks::recover))
        .route("/webhooks/{id}/cancel", post(webhooks::cancel))
        .route("/webhooks/{id}/pause", post(webhooks::pause))
        .route("/webhooks/{id}/resume", post(webhooks::resume))
        .route("/webhooks/{id}/test", post(events::test_send))
        .route("/storage/backup", post(storage::backup))
        .route("/overview", get(overview::overview))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    // The body limit is fixed at start; a reload that changes it says so.
    let max_body = state.config.get().server.max_body;
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(crate::ui::router())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        // Answers carry event data and state: no cache may keep them.
        .layer(middleware::map_response(|mut r: Response| async {
            crate::ui::no_store(r.headers_mut());
            r
        }))
        .layer(DefaultBodyLimit::max(max_body))
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
        ApiError { status, code, message: message.into() }
    }

    fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        IngestError::Invalid { field, message: message.into() }.into()
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
            IngestError::Unparseable(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", m),
            IngestError::Invalid { field, message } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                format!("{field}: {message}"),
            ),
            IngestError::Missing { field } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "missing_field",
                format!("{field}: missing field `{field}`"),
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage error answering a request");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", e.to_string())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::invalid("query", r.body_text())
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
    let Some(token) = &state.config.get().server.api_token else {
        if let Err(refused) = from_this_machine(req.headers()) {
            return refused.into_response();
        }
        return next.run(req).await;
    };
    // The scheme's name is case-insensitive (RFC 9110 section 11.1).
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token);
    if !bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong bearer token")
            .into_response();
    }
    next.run(req).await
}

/// Without a token (loopback only) the API answers whoever can reach it:
/// this machine. A web page open in a browser here can reach it too, so a
/// request the browser marks as another site's (an `Origin` that is not
/// this daemon's, `Sec-Fetch-Site` other than `same-origin` or `none`) is
/// refused, and so is one for a host name that is not loopback (DNS
/// rebinding points a site's own name at 127.0.0.1). Clients that are not
/// browsers send neither header.
fn from_this_machine(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let refuse = |why: String| Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", why));
    let text = |name| headers.get(name).map(|v: &header::HeaderValue| v.to_str().unwrap_or("\u{fffd}"));
    let Some(host) = text(header::HOST) else { return Ok(()) };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return refuse(format!(
            "without api_token the API answers only requests for a loopback host (127.0.0.1, [::1], localhost), not {host:?}"
        ));
    }
    if let Some(origin) = text(header::ORIGIN).filter(|o| *o != format!("http://{host}")) {
        return refuse(format!("a request from the web page of {origin:?} is refused (set api_token to use the API from other origins)"));
    }
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site"))
        .filter(|s| !matches!(*s, "same-origin" | "none"))
    {
        return refuse(format!("a {site} request from a web page is refused"));
    }
    Ok(())
}

/// `GET /healthz`: the process answers HTTP. It takes no state and must
/// never touch storage, so it answers even while the store is stuck.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /metrics`: Prometheus text format. Outside `/v1`, so it needs no token.
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let now = clock::now_ms().max(0) as u64;
    let config = state.config.get();
    let set_aside_this_run = state.store.set_aside_this_run();
    let snapshot = state
        .store
        .read(move |store| {
            let mut waiting = 0;
            let mut webhooks = Vec::new();
            for w in config.webhooks() {
                let s = store.webhook_stats(&w.id)?;
                waiting += s.count(Status::Pending) + s.count(Status::Retrying);
                let last_success = s.last_success_ms.map(|t| t as f64 / 1000.0);
                webhooks.push((w.id, s.consecutive_failures, last_success, s.paused.is_some()));
            }
            let oldest = store.oldest_due_ms(now)?;
            let due_now = store.count_due(now)?;
            Ok(Snapshot {
                due_now,
                scheduled_later: waiting.saturating_sub(due_now),
                oldest_due_age_seconds: oldest.map_or(0.0, |at| now.saturating_sub(at) as f64 / 1000.0),
                storage_bytes: store.size_on_disk(),
                set_aside: store.set_aside_count() as u64,
                set_aside_this_run,
                webhooks,
            })
        })
        .await?;
    let body = state.metrics.render(snapshot);
    // prometheus-client renders OpenMetrics text (`# EOF`, `_total` and
    // `# UNIT` rules), which the 0.0.4 text type does not announce.
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
        .into_response())
}

fn parse_id(text: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .ok()
        .filter(|_| text.len() == 36)
        .ok_or_else(|| ApiError::not_found(format!("no {what} {text:?}")))
}

const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;

/// A page's `limit`: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] if not given.
fn limit(given: Option<&str>) -> Result<usize, ApiError> {
    let Some(l) = given else { return Ok(DEFAULT_PAGE) };
    l.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| ApiError::invalid("limit", format!("limit must be 1 to {MAX_PAGE}")))
}

/// A page's `cursor`: a `next_cursor` this API gave out.
fn cursor(given: Option<&str>) -> Result<Option<u64>, ApiError> {
    given
        .map(|c| {
            c.parse::<u64>().map_err(|_| ApiError::invalid("cursor", "cursor is not one this API gave out"))
        })
        .transpose()
}

/// An id given as query parameter `field` (a malformed one is bad input,
/// not a missing thing).
fn query_id(given: Option<&str>, field: &'static str) -> Result<Option<Uuid>, ApiError> {
    given
        .map(|s| Uuid::parse_str(s).map_err(|_| ApiError::invalid(field, format!("{s:?} is not a UUID"))))
        .transpose()
}

/// A `status` filter: one of the delivery statuses.
fn status(given: Option<&str>) -> Result<Option<Status>, ApiError> {
    given
        .map(|s| {
            Status::parse(s).ok_or_else(|| {
                let known = Status::ALL.map(Status::as_str).join(", ");
                ApiError::invalid("status", format!("{s:?} is not one of {known}"))
            })
        })
        .transpose()
}

/// The configured webhook with this id, or a 404.
fn configured<'a>(config: &'a Config, id: &Uuid) -> Result<&'a Webhook, ApiError> {
    config.webhook(id).ok_or_else(|| ApiError::not_found(format!("no webhook {id}")))
}

/// The configured webhook with this id, or a 404; a 409 if it is disabled.
fn enabled<'a>(config: &'a Config, id: &Uuid) -> Result<&'a Webhook, ApiError> {
    let w = configured(config, id)?;
    if !w.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "webhook_disabled",
            format!("webhook {id} is disabled"),
        ));
    }
    Ok(w)
}

fn attempt_json(a: &Attempt) -> Value {
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
}

/// A delivery as the contract shows it inside an event.
fn delivery_json(d: &DeliveryRecord) -> Value {
    json!({
        "webhook_id": d.webhook_id,
        "status": d.status.as_str(),
        "next_attempt_at": d.next_attempt_at.map(clock::format_ms),
        "attempts": d.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
    })
}
