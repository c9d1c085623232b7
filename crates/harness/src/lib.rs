//! Driving the real `nexor-webhookd` binary from outside, for the
//! integration tests and the benchmark alike: [`Process`], the daemon as a
//! child process (started, waited for until healthy, signalled, stopped or
//! killed), and [`Server`], a loopback HTTP server for a receiver's routes.
//!
//! It knows nothing of what a test checks or a benchmark measures: how a
//! receiver answers, what the config says and what to do about a failure
//! are the caller's. Errors are returned, never panicked on, so the
//! benchmark can report them and a test can panic with its own context.

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::Pid;
pub use rustix::process::Signal;

/// How often a start or a stop looks at the child again.
const LOOK_EVERY: Duration = Duration::from_millis(10);

/// The daemon as a child process. Dropping it kills the process (SIGKILL),
/// so a failed test or benchmark leaves nothing running.
pub struct Process {
    child: Option<Child>,
}

/// Why a start did not end healthy.
#[derive(Debug)]
pub enum StartError {
    /// The process could not be spawned.
    Spawn(std::io::Error),
    /// It exited first, with this status.
    Exited(ExitStatus),
    /// It neither answered `/healthz` nor exited within the limit.
    NotHealthy(Duration),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Spawn(e) => write!(f, "cannot start the daemon: {e}"),
            StartError::Exited(s) => write!(f, "the daemon exited with {s} while starting"),
            StartError::NotHealthy(limit) => write!(f, "the daemon was not healthy after {limit:?}"),
        }
    }
}

impl std::error::Error for StartError {}

/// How a stop went.
#[derive(Debug)]
pub struct Stopped {
    pub took: Duration,
    pub status: ExitStatus,
    /// Whether it outlasted the limit and was killed.
    pub killed: bool,
}

impl Process {
    /// Runs `command` (the daemon's `run`, set up by the caller) with its
    /// stderr appended to `log`, and waits until `health` answers 200;
    /// returns the process and how long that took.
    pub fn start(
        mut command: Command,
        log: &Path,
        health: &str,
        limit: Duration,
    ) -> Result<(Process, Duration), StartError> {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(StartError::Spawn)?;
        let started = Instant::now();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(StartError::Spawn)?;
        let mut process = Process { child: Some(child) };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .new_agent();
        loop {
            if let Some(status) = process.exited() {
                return Err(StartError::Exited(status));
            }
            if agent.get(health).call().is_ok_and(|r| r.status() == 200) {
                return Ok((process, started.elapsed()));
            }
            if started.elapsed() > limit {
                return Err(StartError::NotHealthy(limit));
            }
            std::thread::sleep(LOOK_EVERY);
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` to the process, if it runs. Its pid cannot be
    /// someone else's: a reaped child is `None` here.
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.as_ref().map(Pid::from_child) {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    /// Its exit status once it has exited (reaping it), else `None`.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// SIGTERM, then waits for the exit; SIGKILL if it outlasts `limit`.
    pub fn stop(mut self, limit: Duration) -> std::io::Result<Stopped> {
        let started = Instant::now();
        self.signal(Signal::TERM);
        let mut child = self.child.take().ok_or_else(|| std::io::Error::other("not running"))?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Stopped { took: started.elapsed(), status, killed: false });
            }
            if started.elapsed() > limit {
                child.kill()?;
                return Ok(Stopped { took: started.elapsed(), status: child.wait()?, killed: true });
            }
            std::thread::sleep(LOOK_EVERY);
        }
    }

    /// SIGTERM, then waits for the exit however long it takes.
    pub fn terminate(mut self) -> std::io::Result<ExitStatus> {
        self.signal(Signal::TERM);
        self.child.take().ok_or_else(|| std::io::Error::other("not running"))?.wait()
    }

    /// SIGKILL and reap: no chance to flush or finish anything.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// A loopback HTTP server for a receiver's routes, on a runtime of its own
/// (`threads` worker threads), so it never waits for the caller's threads.
/// Dropping it stops the runtime without waiting for requests held open.
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    pub fn start(app: axum::Router, threads: usize) -> std::io::Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("receiver")
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let base = format!("http://{}", listener.local_addr()?);
        runtime.spawn(async move {
            let served = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => axum::serve(l, app).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                eprintln!("receiver stopped: {e}");
            }
        });
        Ok(Server { base, runtime: Some(runtime) })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
