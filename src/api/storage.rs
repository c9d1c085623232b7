//! The store as a whole: `POST /v1/storage/backup`.

use std::path::PathBuf;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::store::StoreError;

#[derive(Deserialize)]
pub struct BackupQuery {
    to: Option<PathBuf>,
}

/// `POST /v1/storage/backup?to=<absolute path>`: copies the whole store, as
/// it stands after everything acknowledged so far, into a new store
/// directory there (absent or empty, writable by the daemon). Ingest waits
/// while the copy is written.
pub async fn backup(
    State(state): State<AppState>,
    query: Result<Query<BackupQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let to =
        q.to.ok_or_else(|| ApiError::invalid("to", "missing query parameter `to` (an absolute path)"))?;
    if !to.is_absolute() {
        return Err(ApiError::invalid("to", format!("{} is not an absolute path", to.display())));
    }
    let copied = state.store.backup(to).await.map_err(|e| match e {
        StoreError::Target(why) => ApiError::new(StatusCode::CONFLICT, "unusable_target", why),
        e @ StoreError::DiskFull { .. } => {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", e.to_string())
        }
        e => e.into(),
    })?;
    tracing::info!(to = %copied.path.display(), events = copied.events, "backup written");
    Ok(Json(json!({
        "path": copied.path,
        "events": copied.events,
        "keys": copied.keys,
        "bytes": copied.bytes,
    })))
}
