//! nexor-webhookd: the command line and the daemon's lifecycle.
//!
//! `run` wires the pieces in the order data flows — config, store, delivery
//! engine, retention, HTTP API — tells systemd it is ready, hands SIGHUP to
//! [`reload`], and takes everything down in reverse on SIGTERM or SIGINT. `check-config` runs the same validation as `run`. `send`,
//! `status`, `redeliver`, `cancel` and `backup` talk to a running daemon;
//! `restore` and `check-storage` work on a stopped one's storage; `receive`
//! and `verify` are tools for the receiving side.

#![forbid(unsafe_code)]

mod api;
mod client;
mod config;
mod deliver;
mod dispatch;
mod metrics;
mod notify;
mod receive;
mod reload;
mod retention;
mod server;
mod tcp;
mod ui;

use nexor_webhookd_core::{clock, event, lanes, recent, schedule, sign, target};
use nexor_webhookd_store as store;

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rustix::process::Resource;
use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

// mimalloc: fewer instructions and less CPU per event than glibc's malloc,
// which stalls in `malloc_consolidate`, for some more RSS; built without
// transparent huge pages, which multiplied its RSS. The figures are in
// BENCHMARKS.md ("What changed in session 4", item 1).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "nexor-webhookd", version, about = "Durable, signed webhook delivery for Nexor events")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The config file, for commands that talk to a running daemon.
#[derive(clap::Args)]
struct ConfigArg {
    #[arg(
        long,
        value_name = "FILE",
        env = "NEXOR_WEBHOOKD_CONFIG",
        default_value = "/etc/nexor-webhookd/config.toml"
    )]
    config: PathBuf,
}

/// The webhook secret of `receive` and `verify`. On the command line it is
/// in `ps` for every local user to see; the file or the environment
/// variable keeps it out.
#[derive(clap::Args)]
struct SecretArg {
    /// The webhook's secret (visible to other users in `ps`; prefer
    /// --secret-file or the environment variable).
    #[arg(
        long,
        env = "NEXOR_WEBHOOKD_SECRET",
        hide_env_values = true,
        required_unless_present = "secret_file"
    )]
    secret: Option<String>,
    /// A file holding the webhook's secret (a trailing newline is ignored).
    #[arg(long, value_name = "FILE", conflicts_with = "secret")]
    secret_file: Option<PathBuf>,
}

impl SecretArg {
    fn read(self) -> anyhow::Result<String> {
        match (self.secret, self.secret_file) {
            (_, Some(file)) => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read the secret from {}", file.display()))?;
                let secret = text.trim_end_matches(['\n', '\r']);
                anyhow::ensure!(!secret.is_empty(), "{} is empty", file.display());
                Ok(secret.to_owned())
            }
            (Some(secret), None) => Ok(secret),
            (None, None) => anyhow::bail!("give --secret-file, NEXOR_WEBHOOKD_SECRET or --secret"),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Start even if storage holds less than was acknowledged (damage
        /// found at start), logging what is missing; without it such a
        /// store is refused.
        #[arg(long)]
        accept_data_loss: bool,
    },
    /// Validate a config file and exit (non-zero with the reasons if it is bad).
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Send one event to the running daemon.
    Send {
        /// One of the six event types.
        event_type: String,
        #[arg(long)]
        client_id: String,
        /// The event's data: JSON text, or @FILE.
        #[arg(long, default_value = "{}")]
        data: String,
        #[arg(long)]
        event_id: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show each webhook's delivery health.
    Status {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Attempt an event's failed or cancelled deliveries again.
    Redeliver {
        event_id: String,
        /// Only the delivery to this webhook.
        #[arg(long)]
        webhook_id: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Pause a webhook: its deliveries are held, not attempted, until it is
    /// resumed.
    Pause {
        #[arg(long)]
        webhook_id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Resume a paused webhook: its held deliveries are due now, oldest first.
    Resume {
        #[arg(long)]
        webhook_id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Cancel every delivery to a webhook that is waiting or held (held: its
    /// webhook was removed or disabled by a reload).
    Cancel {
        #[arg(long)]
        webhook_id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Copy the running daemon's whole store into a new directory (absent or
    /// empty, writable by the daemon), consistent as of one moment.
    Backup {
        /// Where the copy goes.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Copy a backup into the storage directory of a stopped daemon; the
    /// directory must be absent or empty.
    Restore {
        /// The backup's directory.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Read a stopped daemon's whole store, without changing it: exit 0 when
    /// every record decodes and every index entry points at something, 1
    /// with the problems found.
    CheckStorage {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run a local receiver that verifies and prints each delivery.
    Receive {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        secret: SecretArg,
        /// Largest accepted distance between X-Nexor-Timestamp and this clock.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        tolerance: Duration,
        /// Also print each envelope as pretty JSON.
        #[arg(long)]
        verbose: bool,
        /// Answer every verified delivery with this status.
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// Answer this fraction (0 to 1) of verified deliveries with 503.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
    },
    /// Check one delivery's signature: exit 0 when valid, 1 with the reason when not.
    Verify {
        #[command(flatten)]
        secret: SecretArg,
        /// The X-Nexor-Timestamp header.
        #[arg(long)]
        timestamp: String,
        /// The X-Nexor-Signature header (one or more comma-separated v1=
        /// entries), or with --msg-id the webhook-signature header (one or
        /// more space-separated v1, entries).
        #[arg(long)]
        signature: String,
        /// Check a Standard Webhooks signature: the message id (the
        /// webhook-id header); --timestamp is then webhook-timestamp.
        #[arg(long, value_name = "ID")]
        msg_id: Option<String>,
        /// The raw request body: a file, or - for standard input.
        #[arg(long, default_value = "-")]
        body: String,
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        tolerance: Duration,
    },
}

fn main() -> ExitCode {
    let command = Cli::parse().command;
    if matches!(command, Command::Run { .. } | Command::Restore { .. }) {
        // Events carry personal data: whatever the daemon or a restore
        // creates (the storage directory, sled's files, blobs, the ledger,
        // backups) is for the daemon's user alone.
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    }
    match command {
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(c) => {
                c.warnings.iter().for_each(|w| eprintln!("warning: {w}"));
                println!("{}: ok ({} webhooks)", config.display(), c.webhooks().len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config, accept_data_loss } => {
            let loaded = match config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&loaded.server.log_level);
            loaded.warnings.iter().for_each(|w| tracing::warn!("{w}"));
            report(run(&config, loaded, accept_data_loss), "run")
        }
        Command::Send { event_type, client_id, data, event_id, config } => report(
            client(&config).and_then(|c| c.send(&event_type, &client_id, &data, event_id.as_deref())),
            "send",
        ),
        Command::Status { config } => report(client(&config).and_then(|c| c.status()), "status"),
        Command::Redeliver { event_id, webhook_id, config } => {
            report(client(&config).and_then(|c| c.redeliver(&event_id, webhook_id.as_deref())), "redeliver")
        }
        Command::Pause { webhook_id, config } => {
            report(client(&config).and_then(|c| c.set_paused(&webhook_id, true)), "pause")
        }
        Command::Resume { webhook_id, config } => {
            report(client(&config).and_then(|c| c.set_paused(&webhook_id, false)), "resume")
        }
        Command::Cancel { webhook_id, config } => {
            report(client(&config).and_then(|c| c.cancel(&webhook_id)), "cancel")
        }
        Command::Backup { to, config } => report(client(&config).and_then(|c| c.backup(&to)), "backup"),
        Command::Restore { from, config } => report(restore(&config, &from), "restore"),
        Command::CheckStorage { config } => match check_storage(&config) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("nexor-webhookd check-storage: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Receive { listen, secret, tolerance, verbose, status, fail_rate } => {
            let run = || {
                let opts = receive::Options {
                    listen,
                    secret: secret.read()?,
                    tolerance,
                    verbose,
                    status,
                    fail_rate,
                };
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(receive::run(opts))
            };
            report(run(), "receive")
        }
        Command::Verify { secret, timestamp, signature, msg_id, body, tolerance } => {
            let secret = match secret.read() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("nexor-webhookd verify: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let bytes = match read_body(&body) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("cannot read the body from {body}: {e}");
                    return ExitCode::from(2);
                }
            };
            let now = clock::now_ms() / 1000;
            let verdict = match &msg_id {
                Some(id) => {
                    sign::verify_standard(&secret, id, &signature, &timestamp, &bytes, tolerance, now)
                }
                None => sign::verify(&secret, &signature, &timestamp, &bytes, tolerance, now),
            };
            match verdict {
                Ok(()) => {
                    println!("valid");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("invalid: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn report(result: anyhow::Result<()>, command: &str) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("nexor-webhookd {command}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn client(arg: &ConfigArg) -> anyhow::Result<client::Client> {
    Ok(client::Client::new(&config::load(&arg.config)?))
}

fn restore(config: &ConfigArg, from: &Path) -> anyhow::Result<()> {
    let to = config::load(&config.config)?.storage.path;
    let copied = store::restore(from, &to)?;
    println!(
        "restored {} events ({} keys) from {} into {}",
        copied.events,
        copied.keys,
        from.display(),
        to.display()
    );
    Ok(())
}

/// Prints what the check found; whether the store is sound.
fn check_storage(config: &ConfigArg) -> anyhow::Result<bool> {
    let path = config::load(&config.config)?.storage.path;
    let report = store::check_storage(&path)?;
    let ledger = match report.acknowledged {
        Some(n) => format!("{n} acknowledged"),
        None => "no ledger".into(),
    };
    let summary = format!(
        "{} events, {} deliveries ({} waiting), {} batches committed, {ledger}",
        report.events, report.deliveries, report.waiting, report.commits
    );
    if report.problems.is_empty() {
        println!("{}: ok: {summary}", path.display());
        return Ok(true);
    }
    println!("{}: {} problems: {summary}", path.display(), report.problems.len());
    for p in &report.problems {
        println!("  {p}");
    }
    Ok(false)
}

fn read_body(source: &str) -> std::io::Result<Vec<u8>> {
    if source == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(source)
    }
}

/// `RUST_LOG` when set, else the config's `log_level`; plain text without
/// colours unless stderr is a terminal (journald stores it as is).
fn init_logging(level: &str) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Whatever the filter says (a directive for one of its modules would
    // beat a directive for the crate), the HTTP client's lines below info
    // are dropped: they print request headers such as User-Agent and Accept
    // in clear, or the whole request in hex, and a webhook's own header
    // values are secrets like its signing key.
    // A second global filter of static targets, so each callsite's
    // interest is still decided once, not on every event.
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let quiet_client = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("ureq", LevelFilter::INFO)
        .with_target("ureq_proto", LevelFilter::INFO);
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry().with(filter).with(quiet_client).with(output).init();
}

fn run(config_path: &Path, config: config::Config, accept_data_loss: bool) -> anyhow::Result<()> {
    let nofile = open_files_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config_path, config, accept_data_loss, nofile))
}

/// Raises the open-files limit as far as allowed, says so, and returns it.
fn open_files_limit() -> u64 {
    match server::raise_open_files_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!("open files limit raised from {before} to {after}");
            after
        }
        Ok((_, limit)) => {
            tracing::info!("open files limit {limit} (already the hard limit)");
            limit
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open files limit");
            rustix::process::getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
        }
    }
}

/// `[server] max_connections`, or the default the open-files limit leaves
/// room for; warns when it leaves too little for delivery and storage.
fn max_connections(server: &config::Server, workers: usize, nofile: u64) -> usize {
    let max = server.max_connections.unwrap_or_else(|| server::default_max_connections(nofile, workers));
    if !server::fits(max, nofile, workers) {
        tracing::warn!(
            max_connections = max,
            open_files_limit = nofile,
            reserved = server::reserved_fds(workers),
            "API connections may leave too few descriptors for delivery and storage; \
             raise the open files limit (LimitNOFILE=) or lower max_connections"
        );
    }
    max
}

/// The store's report of a failure sled does not come back from (a failed
/// write or sync, already logged): the process ends, and a fresh start
/// (systemd's) reads what is on disk. Nothing the failure covered was
/// acknowledged.
fn stop_on_storage_failure(what: &str, e: &store::StoreError) {
    eprintln!("nexor-webhookd: {what}: {e}; stopped, so that a fresh start reads what is on disk");
    std::process::exit(1)
}

async fn serve(
    config_path: &Path,
    config: config::Config,
    accept_data_loss: bool,
    nofile: u64,
) -> anyhow::Result<()> {
    let options = store::Options {
        cache_capacity: config.storage.cache_capacity,
        min_free_space: config.storage.min_free_space,
        accept_data_loss,
        on_failure: stop_on_storage_failure,
    };
    // Opening reads and may index the whole store: off the runtime's threads.
    let path = config.storage.path.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&path, &options)).await??;
    let listen = config.server.listen;
    let max_connections = max_connections(&config.server, config.delivery.workers, nofile);
    let shared = config::Shared::new(config);
    let metrics = metrics::Metrics::new();
    // Cancelled by the stop path only once the API's requests are done:
    // those finishing meanwhile still hand their deliveries to the engine.
    let stop_background = CancellationToken::new();
    let notifier = notify::Notifier::start().context("starting the notification thread")?;
    let engine = dispatch::start(
        store.clone(),
        shared.clone(),
        metrics.clone(),
        notifier.clone(),
        stop_background.clone(),
    );
    let retention = retention::spawn(store.clone(), shared.clone(), stop_background.clone());
    tokio::spawn(dispatch::release_at_start(store.clone(), engine.handle.clone(), shared.get()));
    let state = api::AppState {
        store: store.clone(),
        config: shared.clone(),
        dispatcher: engine.handle.clone(),
        metrics: metrics.clone(),
        notifier,
    };
    let listener = server::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let stop_api = CancellationToken::new();
    let server = tokio::spawn(server::serve(
        listener,
        api::router(state),
        shared.clone(),
        max_connections,
        stop_api.clone(),
    ));
    let config = shared.get();
    tracing::info!(
        listen = %listen,
        max_connections,
        storage = %config.storage.path.display(),
        webhooks = config.webhooks().len(),
        "nexor-webhookd ready"
    );
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    // Not stopped with the background tasks: it watches the store through
    // the final sync too.
    watch_store(store.clone(), config.storage.stall_limit);

    let reloader =
        reload::Reloader::new(config_path, shared.clone(), store.clone(), engine.handle.clone(), metrics);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break }
            _ = hup.recv() => reloader.reload().await,
        }
    }

    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    let grace = shared.get().server.shutdown_grace;
    stop_api.cancel();
    if tokio::time::timeout(grace, server).await.is_err() {
        tracing::warn!("requests still open after {grace:?}; closing them");
    }
    stop_background.cancel();
    let _ = retention.await;
    engine.finish(grace).await;
    // Everything acknowledged is synced already; this is for the rest. A
    // store that hangs (sled after a failed write) must not keep the
    // process from stopping.
    let syncing = tokio::task::spawn_blocking(move || store.sync());
    match tokio::time::timeout(grace, syncing).await {
        Ok(Ok(synced)) => synced.context("syncing storage on stop")?,
        Ok(Err(e)) => anyhow::bail!("syncing storage on stop: {e}"),
        Err(_) => anyhow::bail!("storage did not finish syncing within {grace:?}; stopped without it"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Watches that the store gets through its work. While it does, pings the
/// systemd watchdog (when there is one) at half its interval. A store stuck
/// with writes waiting (a sync that hangs without an error: nothing is
/// acknowledged, yet the process looks alive) stops the pings once it has
/// been stuck for the whole watchdog interval, so that systemd restarts the
/// daemon; and once it has been stuck for `stall_limit`, the daemon ends
/// itself with a clear line, systemd or not, and a fresh start reads what
/// is on disk.
fn watch_store(store: store::Store, stall_limit: Duration) {
    let mut usec = 0;
    let watchdog = sd_notify::watchdog_enabled(false, &mut usec) && usec > 0;
    let stuck_after = if watchdog { Duration::from_micros(usec) } else { stall_limit };
    let every = (stuck_after / 2).min(Duration::from_secs(1));
    tokio::spawn(async move {
        let mut last = store.progress();
        let mut moved = std::time::Instant::now();
        let mut said = false;
        loop {
            let now = store.progress();
            if now.waiting == 0 || now.done != last.done {
                moved = std::time::Instant::now();
                said = false;
            }
            last = now;
            let stuck = moved.elapsed();
            if stuck >= stall_limit {
                tracing::error!(waiting = now.waiting, "storage has finished nothing for {stuck:?} with writes waiting; stopping, so that a fresh start reads what is on disk");
                eprintln!(
                    "nexor-webhookd: storage has finished nothing for {stuck:?} with writes waiting; stopped"
                );
                std::process::exit(1);
            }
            if stuck < stuck_after {
                if watchdog {
                    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                }
            } else if !said && watchdog {
                tracing::error!(
                    waiting = now.waiting,
                    "storage has finished nothing for {stuck_after:?} with writes waiting; \
                     no longer telling systemd the daemon is alive, so that it restarts it"
                );
                said = true;
            }
            tokio::time::sleep(every).await;
        }
    });
}
