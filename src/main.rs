//! nexor-webhookd: the command line and the daemon's lifecycle.
//!
//! `run` wires the pieces in the order data flows — config, store, delivery
//! engine, HTTP API — and takes them down in reverse on SIGTERM or SIGINT.
//! `check-config` runs the same validation as `run` and exits.

mod api;
mod clock;
mod config;
mod deliver;
mod dispatch;
mod event;
mod schedule;
mod sign;
mod store;
mod target;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

/// How long requests in flight and attempts in flight get to finish on stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "nexor-webhookd",
    version,
    about = "Durable, signed webhook delivery for Nexor events"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file and exit (non-zero with the reasons if it is bad).
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(c) => {
                println!("{}: ok ({} webhooks)", config.display(), c.webhooks().len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            init_logging();
            match run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("nexor-webhookd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Arc::new(config::load(config_path)?);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config))
}

async fn serve(config: Arc<config::Config>) -> anyhow::Result<()> {
    let store = store::Store::open(&config.storage.path, config.storage.cache_capacity)?;
    let engine = dispatch::start(store.clone(), config.clone());
    let state = api::AppState {
        store: store.clone(),
        config: config.clone(),
        dispatcher: engine.handle.clone(),
    };
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        storage = %config.storage.path.display(),
        webhooks = config.webhooks().len(),
        "nexor-webhookd ready"
    );

    let stop = Arc::new(tokio::sync::Notify::new());
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, api::router(state))
                .with_graceful_shutdown(async move { stop.notified().await })
                .await
        })
    };
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    stop.notify_one();
    if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
        tracing::warn!("requests still open after {SHUTDOWN_GRACE:?}; closing them");
    }
    engine.stop(SHUTDOWN_GRACE).await;
    store.sync().context("syncing storage on stop")?;
    tracing::info!("stopped");
    Ok(())
}
