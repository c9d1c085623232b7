//! nexor-webhookd: the command line and the daemon's lifecycle.
//!
//! `run` wires the pieces in the order data flows — config, store, delivery
//! engine, HTTP API — and takes them down in reverse on SIGTERM or SIGINT.
//! `check-config` runs the same validation as `run` and exits. `receive` and
//! `verify` are tools for the receiving side.

mod api;
mod clock;
mod config;
mod deliver;
mod dispatch;
mod event;
mod receive;
mod schedule;
mod sign;
mod store;
mod target;

use std::io::{IsTerminal, Read};
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
    /// Run a local receiver that verifies and prints each delivery.
    Receive {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        /// The webhook's secret.
        #[arg(long)]
        secret: String,
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
        #[arg(long)]
        secret: String,
        /// The X-Nexor-Timestamp header.
        #[arg(long)]
        timestamp: String,
        /// The X-Nexor-Signature header (one or more comma-separated v1= entries).
        #[arg(long)]
        signature: String,
        /// The raw request body: a file, or - for standard input.
        #[arg(long, default_value = "-")]
        body: String,
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        tolerance: Duration,
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
        Command::Receive {
            listen,
            secret,
            tolerance,
            verbose,
            status,
            fail_rate,
        } => {
            let opts = receive::Options {
                listen,
                secret,
                tolerance,
                verbose,
                status,
                fail_rate,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(receive::run(opts)))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nexor-webhookd receive: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Verify {
            secret,
            timestamp,
            signature,
            body,
            tolerance,
        } => {
            let bytes = match read_body(&body) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("cannot read the body from {body}: {e}");
                    return ExitCode::from(2);
                }
            };
            match sign::verify(
                &secret,
                &signature,
                &timestamp,
                &bytes,
                tolerance,
                clock::now_ms() / 1000,
            ) {
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

fn read_body(source: &str) -> std::io::Result<Vec<u8>> {
    if source == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(source)
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
