//! SIGHUP: swapping the config in force for the file's current contents.
//!
//! A good file replaces the whole running config at once ([`config::Shared`]):
//! webhooks added, changed, removed or disabled take effect at once, and so
//! do the other settings but the restart-only ones
//! ([`Config::needs_restart`]), which are logged and stay as the process
//! started with them. The bound address is one of those, so the rule that an
//! API off loopback needs a token is checked against the address the daemon
//! listens on, not the file's. Deliveries waiting for a webhook that is gone
//! or disabled are held, and are due again when it comes back. A file that
//! is empty, does not validate, would remove every webhook or would open the
//! API is refused whole: logged and counted, it changes nothing (the
//! running config stays, no delivery is held or released).
//!
//! It must not cancel or otherwise destroy a delivery (a file caught
//! half-written would; only an operator cancels), write to the store but
//! through the committer, read it but through [`Store::read`], or block the
//! runtime's threads: the file is read on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{self, Config};
use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;
use crate::store::Store;

/// What a reload needs, gathered at start.
pub struct Reloader {
    path: PathBuf,
    config: config::Shared,
    /// What the process started with: restart-only settings (the bound
    /// address among them) stay as they were, whatever later files say.
    started: Arc<Config>,
    store: Store,
    dispatcher: Dispatcher,
    metrics: Metrics,
}

impl Reloader {
    /// Takes the config in force now as the one the process started with.
    pub fn new(
        path: &Path,
        config: config::Shared,
        store: Store,
        dispatcher: Dispatcher,
        metrics: Metrics,
    ) -> Reloader {
        let started = config.get();
        Reloader { path: path.to_owned(), config, started, store, dispatcher, metrics }
    }

    /// Reads the file and, unless it is refused, puts it in force, holding
    /// and releasing deliveries of the webhooks it stops and brings back.
    pub async fn reload(&self) {
        let old = self.config.get();
        let checked = self
            .read()
            .await
            .and_then(|new| refusal(&self.path, &old, &self.started, &new).map_or(Ok(new), Err));
        let new = match checked {
            Ok(new) => new,
            Err(e) => {
                self.metrics.reload_refused();
                tracing::error!("reload refused, the running config stays:\n{e}");
                return;
            }
        };
        new.warnings.iter().for_each(|w| tracing::warn!("{w}"));
        let restart = self.started.needs_restart(&new);
        if !restart.is_empty() {
            tracing::warn!(
                settings = restart.join(", "),
                "reload: these changes take effect only after a restart"
            );
        }
        let stopped = old.stopped_in(&new);
        let resumed = old.resumed_in(&new);
        let webhooks = new.webhooks().len();
        let turn = self.dispatcher.changing().await;
        self.config.set(new);
        if !stopped.is_empty() {
            match self.dispatcher.hold_waiting(&turn, &self.store, &stopped).await {
                Ok(n) => tracing::info!(held = n, "reload: deliveries to removed or disabled webhooks held"),
                Err(e) => tracing::error!(error = %e, "reload: cannot hold deliveries of removed webhooks"),
            }
        }
        // A paused webhook's deliveries stay held until it is resumed.
        for webhook in resumed.into_iter().filter(|w| self.store.paused(w).is_none()) {
            match self.dispatcher.release_held(&turn, &self.store, webhook).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(webhook_id = %webhook, released = n, "reload: held deliveries due again")
                }
                Err(e) => {
                    tracing::error!(webhook_id = %webhook, error = %e, "reload: cannot release held deliveries")
                }
            }
        }
        tracing::info!(webhooks, "config reloaded");
    }

    /// The file, read and validated on the blocking pool (reading it and
    /// the secret files it names is file I/O, which may block). One that
    /// validates but is empty is an editor or tool caught mid-write.
    async fn read(&self) -> Result<Config, String> {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let loaded = config::load(&path).map_err(|e| e.to_string())?;
            if std::fs::read(&path).is_ok_and(|b| b.iter().all(u8::is_ascii_whitespace)) {
                return Err(format!("{} is empty (caught while being written?)", path.display()));
            }
            Ok(loaded)
        });
        read.await.unwrap_or_else(|e| Err(format!("cannot read {}: {e}", self.path.display())))
    }
}

/// Why a file that validates must still not replace the running config:
/// it would remove every webhook (a file caught mid-write, more likely than
/// an operator's wish), or it has no API token while the socket the daemon
/// started on is off loopback (the file's own `listen` takes a restart, so
/// validating the token against it would open the API).
fn refusal(path: &Path, old: &Config, started: &Config, new: &Config) -> Option<String> {
    if new.webhooks().is_empty() && !old.webhooks().is_empty() {
        return Some(format!(
            "{} has no webhooks, and would remove all {} (caught while being written?); \
             to stop every webhook, disable them one by one",
            path.display(),
            old.webhooks().len()
        ));
    }
    let bound = started.server.listen;
    if new.server.api_token.is_none() && !bound.ip().is_loopback() {
        return Some(format!(
            "{} has no api_token, but the daemon listens on {bound}, which is not a loopback address: \
             the API would be open to the network",
            path.display()
        ));
    }
    None
}
