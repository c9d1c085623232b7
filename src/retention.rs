//! Retention: deletes events whose deliveries are all final (succeeded,
//! failed or cancelled) once they are older than `[storage] retention`.
//!
//! Runs as a background task in small batches through the store's committer,
//! so ingest and delivery are never held up for long. Events are keyed by
//! time, so "older than the cutoff" is a range scan from the start; an event
//! still waiting for a retry is skipped until it is final.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock;
use crate::config;
use crate::store::{first_seq_at, Store, StoreError};

/// Events examined per committer request.
const BATCH: usize = 512;

/// Prunes in the background until `stop` is cancelled.
pub fn spawn(store: Store, config: config::Shared, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reloads = config.subscribe();
        loop {
            let retention = config.get().storage.retention;
            // A stop must not wait for a pass the store holds up.
            let pruned = tokio::select! {
                pruned = prune_once(&store, retention) => pruned,
                _ = stop.cancelled() => return,
            };
            match pruned {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "retention: deleted old events"),
                Err(e) => tracing::error!(error = %e, "retention: cannot prune; will try again"),
            }
            // Check ten times per retention period, between 50 ms and 10 min.
            let pause = (retention / 10).clamp(Duration::from_millis(50), Duration::from_secs(600));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                // A reload may have shortened the retention: look again now.
                changed = reloads.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    })
}

/// One pass over everything older than the cutoff; returns events deleted.
async fn prune_once(store: &Store, retention: Duration) -> Result<usize, StoreError> {
    let cutoff = first_seq_at(clock::now_ms() - retention.as_millis() as i64);
    let (mut after, mut deleted) = (0, 0);
    loop {
        let seqs = store.read(move |store| store.events_between(after, cutoff, BATCH)).await?;
        if seqs.is_empty() {
            return Ok(deleted);
        }
        let pruned = store.prune(seqs).await?;
        after = pruned.through;
        deleted += pruned.deleted;
    }
}
