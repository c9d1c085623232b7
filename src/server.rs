//! The API's connections: the accept loop and everything that bounds what a
//! client can hold. It owns the listening socket, the cap on connections
//! open at once (`[server] max_connections`, by default what the open-files
//! limit leaves after a reserve for delivery and storage), the two
//! per-connection clocks (`header_timeout` for a request head to arrive
//! whole, `idle_timeout` for a kept-alive connection with nothing under
//! way), the back-off after a failed `accept`, the raising of the
//! open-files limit at start, and the graceful stop: on the stop signal it
//! takes no new connections, lets requests under way finish, and returns
//! once every connection is closed. HTTP itself is hyper's (HTTP/1.1, as
//! `axum::serve` spoke it); the routes are [`crate::api`]'s.
//!
//! The clocks are ours, not hyper's `header_read_timeout`: since hyper 1.6
//! (PR #3828) that timer restarts when a kept-alive connection goes idle, so
//! it also cuts idle connections at the header timeout and one setting
//! cannot be 10 s for a head and 60 s for idleness. Here a [`Clock`] follows
//! each connection from the bytes it reads and the requests it hands to the
//! API, and a [`Watchdog`] around the connection's future drops it (closing
//! the socket) when its current deadline passes: a fresh connection's head
//! must arrive whole within `header_timeout` of the accept, a kept-alive
//! connection may wait `idle_timeout` for the next request's first byte and
//! then has `header_timeout` for the rest of the head; while a request is
//! being served no clock runs.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::dispatch;

/// Connections the kernel holds for us, handshake done, while the daemon is
/// at `max_connections` (or cannot accept): they wait there and are served
/// as slots free up. The kernel caps it at `net.core.somaxconn` (4096 by
/// default since Linux 5.4). std's and mio's 128 is soon full under a
/// flood, and a full backlog drops new clients' SYNs, which then retry only
/// after a second or more.
const BACKLOG: u32 = 1024;

/// The most API connections by default, however many descriptors there are:
/// the API serves one application (and monitoring), not the public.
const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
/// The fewest by default, however few descriptors there are.
const MIN_MAX_CONNECTIONS: u64 = 16;
/// Descriptors kept for storage and the runtime, besides delivery's: sled's
/// data file and the blob files it opens for each read or write of a large
/// value, the syncer's handles and the directory listings it opens for each
/// sync, a backup's copies, the runtime's epoll, eventfd and signal pipe,
/// the listener, stdio. Counted generously: a sync that cannot open what it
/// needs stops the daemon (`store::committer`).
const STORAGE_AND_RUNTIME_FDS: u64 = 64;
/// Descriptors one API connection may take: its socket, and a blob file a
/// request reading a large event opens for the time of the read.
const FDS_PER_CONNECTION: u64 = 2;

/// After a failed accept (EMFILE and the like), how long until the next
/// try. Such a failure lasts until a descriptor is freed; a short pause
/// keeps the loop from spinning yet takes a freed slot soon (axum waited a
/// whole second, with new clients waiting all that time).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// A persisting condition (accept failing, connections at the cap) is
/// logged at most this often, with a count of what happened meanwhile.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Raises the soft limit on open files to the hard limit, so that the
/// daemon can use every descriptor the administrator allows (systemd's
/// default soft limit is 1024, its hard limit 524288). Nothing in the daemon
/// uses `select(2)`, which fails above 1024. Returns the soft limit before
/// and after.
pub fn raise_open_files_limit() -> io::Result<(u64, u64)> {
    let limit = getrlimit(Resource::Nofile);
    // The kernel caps descriptors at fs.nr_open whatever the limit says,
    // and refuses a soft limit above it: an unlimited hard limit means that.
    let hard = match limit.maximum {
        None => std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20),
        Some(hard) => hard,
    };
    let before = limit.current.unwrap_or(u64::MAX);
    if before >= hard {
        return Ok((before, before));
    }
    // rustix makes this the prlimit64 system call, which the systemd unit's
    // filter allows (the `@resources` set it denies has only setrlimit).
    setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: limit.maximum })?;
    Ok((before, hard))
}

/// Descriptors kept from API connections for delivery and storage.
pub fn reserved_fds(workers: usize) -> u64 {
    workers as u64 * dispatch::FDS_PER_WORKER + STORAGE_AND_RUNTIME_FDS
}

/// The default `max_connections` under an open-files limit of `nofile`:
/// what is left after the reserve for delivery and storage, at
/// [`FDS_PER_CONNECTION`] each, between 16 and 1024. With `workers = 64`
/// that is 1024 from a limit of 2,752 up, and 160 under a limit of 1024.
pub fn default_max_connections(nofile: u64, workers: usize) -> usize {
    let left = nofile.saturating_sub(reserved_fds(workers)) / FDS_PER_CONNECTION;
    left.clamp(MIN_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS) as usize
}

/// Whether `max_connections` connections fit in `nofile` descriptors beside
/// the reserve.
pub fn fits(max_connections: usize, nofile: u64, workers: usize) -> bool {
    max_connections as u64 * FDS_PER_CONNECTION + reserved_fds(workers) <= nofile
}

/// The listening socket, with a backlog of [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As std and mio do: a restart can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `app` on `listener`, at most `max_connections` connections at
/// once, until `stop` is cancelled; then takes no new connection and returns
/// once the open ones have finished their requests and closed (the caller
/// bounds that wait). Timeouts are read from `config` for each connection,
/// so a reload applies them to connections accepted after it.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: config::Shared,
    max_connections: usize,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let graceful = GracefulShutdown::new();
    let mut at_cap = Report::default();
    let mut failed = Report::default();
    loop {
        // A slot first: at the cap, new connections wait in the kernel's
        // backlog and are taken in turn as connections close, rather than
        // being accepted only to be closed. A client that is not a
        // slowloris is then served as soon as the timeouts have freed a
        // slot, without having to try again.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if let Some(since) = at_cap.note() {
                    tracing::warn!(
                        max_connections,
                        count = since,
                        "API connections at max_connections; new ones wait in the listen backlog"
                    );
                }
                tokio::select! {
                    permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    _ = stop.cancelled() => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    if let Some(since) = failed.note() {
                        tracing::error!(error = %e, count = since, "accept error; retrying every {ACCEPT_BACKOFF:?}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        _ = stop.cancelled() => break,
                    }
                }
            },
            _ = stop.cancelled() => break,
        };
        let server = &config.get().server;
        let limits = Limits { header: server.header_timeout, idle: server.idle_timeout };
        tokio::spawn(connection(stream, permit, app.clone(), limits, graceful.watcher()));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Errors of one connection that went away before it was accepted; the
/// next one is taken at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Rate-limits the log lines of a condition that persists.
#[derive(Default)]
struct Report {
    last: Option<Instant>,
    /// Occurrences since the last line, that one included.
    since: u64,
}

impl Report {
    /// Counts an occurrence; `Some(occurrences since the last line)` when
    /// this one is to be logged.
    fn note(&mut self) -> Option<u64> {
        self.since += 1;
        let now = Instant::now();
        if self.last.is_some_and(|at| now < at + REPORT_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// One connection's timeouts.
#[derive(Clone, Copy, Debug)]
struct Limits {
    header: Duration,
    idle: Duration,
}

/// Serves one connection until the client closes it, a deadline passes, or
/// the graceful stop has let its request finish; then frees its slot.
async fn connection(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    app: Router,
    limits: Limits,
    watcher: Watcher,
) {
    let clock = Arc::new(Clock::new(limits));
    let io = TokioIo::new(Watched { stream, clock: clock.clone() });
    let service = Api { app, clock: clock.clone() };
    // No hyper timer: the header timeout is the Clock's (see the module's
    // comment). Without a timer hyper would warn about its 30 s default.
    let conn =
        hyper::server::conn::http1::Builder::new().header_read_timeout(None).serve_connection(io, service);
    match Watchdog::new(watcher.watch(conn), clock).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "API connection ended with an error"),
        Err(why) => tracing::debug!("API connection closed: {why}"),
    }
    drop(permit);
}

/// Where a connection is, as its clocks see it.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// No request under way since `since`, and no byte of the next one
    /// read yet; `fresh` until the connection has served a request.
    Waiting { since: Instant, fresh: bool },
    /// The bytes of a request head are arriving; its clock started at
    /// `since` (the accept, for a fresh connection).
    Head { since: Instant },
    /// This many requests handed to the API and not yet answered whole.
    Busy(usize),
}

/// One connection's phase, moved on by its reads ([`Watched`]) and its
/// requests ([`Api`]); all of that happens while the connection's future
/// is polled, so the [`Watchdog`] sees every change when the poll returns.
struct Clock {
    phase: Mutex<Phase>,
    limits: Limits,
}

/// Why a connection was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expired {
    Header,
    Idle,
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expired::Header => "no whole request head within header_timeout",
            Expired::Idle => "idle for idle_timeout",
        })
    }
}

impl Clock {
    fn new(limits: Limits) -> Clock {
        Clock { phase: Mutex::new(Phase::Waiting { since: Instant::now(), fresh: true }), limits }
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        // Nothing panics while holding it; a poisoned lock still holds a phase.
        self.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// When the connection is to be closed, and why; `None` while a
    /// request is being served.
    fn deadline(&self) -> Option<(Instant, Expired)> {
        match *self.phase() {
            Phase::Waiting { since, fresh: true } | Phase::Head { since } => {
                Some((since + self.limits.header, Expired::Header))
            }
            Phase::Waiting { since, fresh: false } => Some((since + self.limits.idle, Expired::Idle)),
            Phase::Busy(_) => None,
        }
    }

    /// Bytes arrived: between requests, the next head has begun.
    fn read_some(&self) {
        let mut phase = self.phase();
        if let Phase::Waiting { since, fresh } = *phase {
            *phase = Phase::Head { since: if fresh { since } else { Instant::now() } };
        }
    }

    /// A request goes to the API; the connection is busy until the
    /// returned guard is dropped (its answer is sent, or abandoned).
    fn request(self: &Arc<Self>) -> Busy {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        };
        Busy(self.clone())
    }
}

/// A request being served; see [`Clock::request`].
struct Busy(Arc<Clock>);

impl Busy {
    /// For the closure that holds it: the guard lives as long as the body.
    fn keep(&self) {}
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut phase = self.0.phase();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Waiting { since: Instant::now(), fresh: false },
        };
    }
}

/// The connection's socket, telling its clock when bytes arrive.
struct Watched {
    stream: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.clock.read_some();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The API's router as hyper's service for one connection, keeping the
/// connection busy from a request's arrival until its answer is sent.
#[derive(Clone)]
struct Api {
    app: Router,
    clock: Arc<Clock>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Api {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        use tower_service::Service;
        let busy = self.clock.request();
        // A Router is always ready.
        let answer = self.app.clone().call(request.map(Body::new));
        Box::pin(async move {
            let response = answer.await?;
            // Busy until hyper has taken the last of the body and drops it.
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    busy.keep();
                    frame
                }))
            }))
        })
    }
}

/// A connection's future, dropped (and so its socket closed) once its
/// clock's deadline passes. The deadline is looked at after every poll of
/// the connection, which is where its phase changes, so a sleep is armed
/// only for the deadline in force and reset when that moves.
struct Watchdog<F> {
    conn: Pin<Box<F>>,
    clock: Arc<Clock>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl<F: Future> Watchdog<F> {
    fn new(conn: F, clock: Arc<Clock>) -> Watchdog<F> {
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        Watchdog { conn: Box::pin(conn), clock, sleep: Box::pin(tokio::time::sleep_until(far)), armed: None }
    }
}

impl<F: Future> Future for Watchdog<F> {
    type Output = Result<F::Output, Expired>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(done) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(Ok(done));
        }
        loop {
            let Some((deadline, why)) = this.clock.deadline() else { return Poll::Pending };
            if Instant::now() >= deadline {
                return Poll::Ready(Err(why));
            }
            if this.armed != Some(deadline) {
                this.sleep.as_mut().reset(deadline);
                this.armed = Some(deadline);
            }
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_the_reserve_and_stays_within_bounds() {
        // systemd's soft limit, when it cannot be raised: 64 workers keep 704.
        assert_eq!(reserved_fds(64), 704);
        assert_eq!(default_max_connections(1024, 64), 160);
        assert!(fits(160, 1024, 64) && !fits(161, 1024, 64));
        // Plenty of descriptors: the cap's own bound.
        assert_eq!(default_max_connections(524_288, 64), 1024);
        assert_eq!(default_max_connections(2_752, 64), 1024);
        // Too few for the reserve: still a usable API, and it does not fit.
        assert_eq!(default_max_connections(256, 64), 16);
        assert!(!fits(16, 256, 64));
        assert_eq!(default_max_connections(300, 2), 108);
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_times_a_fresh_head_then_idleness_then_each_head() {
        let limits = Limits { header: Duration::from_secs(10), idle: Duration::from_secs(60) };
        let clock = Arc::new(Clock::new(limits));
        let opened = Instant::now();
        assert_eq!(clock.deadline(), Some((opened + limits.header, Expired::Header)));
        // The first head's bytes do not restart its clock: it counts from the accept.
        tokio::time::advance(Duration::from_secs(3)).await;
        clock.read_some();
        clock.read_some();
        assert_eq!(clock.deadline(), Some((opened + limits.header, Expired::Header)));
        let busy = clock.request();
        assert_eq!(clock.deadline(), None, "no clock while a request is served");
        let second = clock.request();
        drop(busy);
        assert_eq!(clock.deadline(), None, "a pipelined request keeps it busy");
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(second);
        let idle_from = Instant::now();
        assert_eq!(clock.deadline(), Some((idle_from + limits.idle, Expired::Idle)));
        // The next head's first byte starts its header clock.
        tokio::time::advance(Duration::from_secs(50)).await;
        clock.read_some();
        let head_from = idle_from + Duration::from_secs(50);
        assert_eq!(clock.deadline(), Some((head_from + limits.header, Expired::Header)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_drops_a_connection_whose_deadline_passed() {
        let limits = Limits { header: Duration::from_secs(1), idle: Duration::from_secs(5) };
        let clock = Arc::new(Clock::new(limits));
        let started = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(Watchdog::new(never, clock.clone()).await, Err(Expired::Header));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        // A connection that ends by itself is not cut short.
        let clock = Arc::new(Clock::new(limits));
        let done = Watchdog::new(async { tokio::time::sleep(Duration::from_millis(500)).await }, clock);
        assert_eq!(done.await, Ok(()));
    }

    #[test]
    fn a_persisting_condition_is_reported_once_per_interval() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build();
        rt.unwrap().block_on(async {
            let mut r = Report::default();
            assert_eq!(r.note(), Some(1));
            for _ in 0..99 {
                assert_eq!(r.note(), None);
            }
            tokio::time::advance(REPORT_EVERY).await;
            assert_eq!(r.note(), Some(100), "the next line counts what was not logged");
        });
    }
}
