//! The TCP transport the delivery agent sends through (ureq's `Transport`),
//! made for many small requests on keep-alive connections.
//!
//! ureq's own TCP transport spends 12 system calls on a delivery over a
//! pooled connection: the request head and body go out in two writes (two
//! segments, so the receiver often wakes twice), every phase sets its socket
//! timeout again because the remaining budget changed by microseconds, and
//! the liveness probe run as a connection enters and leaves the pool toggles
//! the socket's blocking mode around a read. This one spends 4: a request
//! leaves in one write when ureq starts waiting for the answer, a socket
//! timeout is set only when the budget, rounded up to [`TIMEOUT_GRAIN`],
//! changes, and the probe is one non-blocking peek. Timeouts keep their
//! meaning: each phase still ends within its budget (plus at most one grain).
//!
//! Through an HTTP proxy (`[delivery] proxy`), when one is set: an https
//! target through a `CONNECT` tunnel to the very address the resolver
//! allowed (so the SSRF check holds for what the proxy dials), a plain
//! http one in absolute form (`POST http://host:port/path`), which is what
//! proxies take for http; the proxy resolves that host itself. ureq knows
//! nothing of the proxy (the agent is built with `proxy(None)`): its own
//! would tunnel http too, which proxies commonly refuse outside port 443.
//! TLS is ureq's rustls connector, chained after [`Dialer`] by `deliver`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, ShutdownHandle, Transport,
};
use ureq::Timeout;

/// Socket timeouts are rounded up to this, so that consecutive phases with
/// the same configured budget leave the socket's timeout alone.
pub const TIMEOUT_GRAIN: Duration = Duration::from_millis(10);

/// Output held back beyond this is sent at once (a large body streams).
const HOLD_MAX: usize = 64 * 1024;

/// Opens plain TCP connections to the addresses the resolver allowed, or
/// through the proxy to them.
#[derive(Debug, Default)]
pub struct Dialer {
    pub proxy: Option<Proxy>,
}

/// An HTTP proxy: `host:port`, as the config names it.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
}

impl Connector<()> for Dialer {
    type Out = Link;

    fn connect(&self, details: &ConnectionDetails, _: Option<()>) -> Result<Option<Link>, ureq::Error> {
        let budget = details.timeout.not_zero().map(|d| *d);
        let started = Instant::now();
        let Some(proxy) = &self.proxy else {
            let stream = dial(&details.addrs, budget, started)?;
            return self.link(details, stream, None).map(Some);
        };
        let addrs: Vec<SocketAddr> = (proxy.host.as_str(), proxy.port).to_socket_addrs()?.collect();
        let mut stream = dial(&addrs, budget, started)?;
        let uri = details.uri;
        let authority = |host: &str| {
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            format!("{host}:{port}")
        };
        if uri.scheme_str() == Some("https") {
            // The address the resolver allowed, not the name: the proxy must
            // not resolve it to another (DNS rebinding).
            let target = details.addrs.first().ok_or(ureq::Error::HostNotFound)?;
            let left = budget.map(|b| b.saturating_sub(started.elapsed()));
            tunnel(&mut stream, *target, left)?;
            self.link(details, stream, None).map(Some)
        } else {
            let host = uri.host().ok_or(ureq::Error::HostNotFound)?;
            self.link(details, stream, Some(format!("http://{}", authority(host)))).map(Some)
        }
    }
}

impl Dialer {
    fn link(
        &self,
        details: &ConnectionDetails,
        stream: TcpStream,
        absolute: Option<String>,
    ) -> Result<Link, ureq::Error> {
        stream.set_nodelay(details.config.no_delay())?;
        let config = details.config;
        let mut link = Link::new(stream, config.input_buffer_size(), config.output_buffer_size());
        link.absolute = absolute;
        (details.register_shutdown)(Arc::downgrade(&link.stream) as Weak<dyn ShutdownHandle>)?;
        Ok(link)
    }
}

/// Most bytes of a proxy's answer to `CONNECT` read.
const TUNNEL_ANSWER_MAX: usize = 8 * 1024;

/// Asks the proxy on `stream` for a tunnel to `target`; fails unless it
/// answers 2xx. Reads the answer byte by byte, so that nothing the target
/// sends after it is taken from the tunnel.
fn tunnel(stream: &mut TcpStream, target: SocketAddr, budget: Option<Duration>) -> Result<(), ureq::Error> {
    let timed = |e: io::Error| match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => ureq::Error::Timeout(Timeout::Connect),
        _ => e.into(),
    };
    stream.set_write_timeout(budget.map(round_up))?;
    stream.set_read_timeout(budget.map(round_up))?;
    write!(stream, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").map_err(timed)?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= TUNNEL_ANSWER_MAX || stream.read(&mut byte).map_err(timed)? == 0 {
            return Err(
                io::Error::other("the proxy closed the connection instead of answering CONNECT").into()
            );
        }
        answer.push(byte[0]);
    }
    let status =
        answer.split(|b| *b == b' ').nth(1).and_then(|s| std::str::from_utf8(s).ok()?.parse::<u16>().ok());
    match status {
        Some(200..=299) => Ok(()),
        Some(code) => Err(io::Error::other(format!("the proxy answered {code} to CONNECT")).into()),
        None => Err(io::Error::other("the proxy's answer to CONNECT is not HTTP").into()),
    }
}

/// Connects to the first of `addrs` that answers within the budget.
fn dial(addrs: &[SocketAddr], budget: Option<Duration>, started: Instant) -> Result<TcpStream, ureq::Error> {
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        // Each address left gets an equal share of what remains of the budget.
        let attempt = match budget {
            None => TcpStream::connect(addr),
            Some(budget) => {
                let left = budget.saturating_sub(started.elapsed());
                if left.is_zero() {
                    break;
                }
                let share = (left / (addrs.len() - i) as u32).max(Duration::from_millis(10));
                TcpStream::connect_timeout(addr, share)
            }
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) if !matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => e.into(),
        _ => ureq::Error::Timeout(Timeout::Connect),
    })
}

/// One connection. I/O goes through `&TcpStream`, so that the agent's
/// shutdown handle (a `Weak` of the same `Arc`) can interrupt it.
pub struct Link {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
    /// Output ureq has handed over and that is not sent yet.
    held: Vec<u8>,
    /// The budget of the latest write into `held`, used when it is sent.
    held_timeout: Option<NextTimeout>,
    /// The socket's timeouts in force (`None`: none set, blocking forever).
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// Through a proxy, for plain http: `http://host:port`, which goes
    /// before the path of every request line.
    absolute: Option<String>,
    /// Whether the next output begins a request (with its request line).
    request_start: bool,
}

impl Link {
    fn new(stream: TcpStream, input: usize, output: usize) -> Link {
        Link {
            stream: Arc::new(stream),
            buffers: LazyBuffers::new(input, output),
            held: Vec::new(),
            held_timeout: None,
            read_timeout: None,
            write_timeout: None,
            absolute: None,
            request_start: true,
        }
    }

    /// Sends everything held back, within the budget it was handed over with.
    fn send_held(&mut self) -> Result<(), ureq::Error> {
        let Some(timeout) = self.held_timeout.take() else { return Ok(()) };
        let deadline = Deadline::start(timeout)?;
        let result = loop {
            set_timeout(
                &self.stream,
                &mut self.write_timeout,
                deadline.left()?,
                TcpStream::set_write_timeout,
            )?;
            // write_all would retry an interrupted write with the whole timeout again.
            match (&*self.stream).write(&self.held) {
                Ok(0) => break Err(ErrorKind::WriteZero.into()),
                Ok(n) if n == self.held.len() => break Ok(()),
                Ok(n) => drop(self.held.drain(..n)),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.held.clear();
        result.map_err(|e| deadline.error(e))
    }
}

impl Transport for Link {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let output = &self.buffers.output()[..amount];
        match (&self.absolute, self.request_start) {
            // `POST /path HTTP/1.1` becomes `POST http://host:port/path HTTP/1.1`.
            (Some(prefix), true) => match output.iter().position(|b| *b == b' ') {
                Some(space) => {
                    self.held.extend_from_slice(&output[..=space]);
                    self.held.extend_from_slice(prefix.as_bytes());
                    self.held.extend_from_slice(&output[space + 1..]);
                }
                None => self.held.extend_from_slice(output),
            },
            _ => self.held.extend_from_slice(output),
        }
        self.request_start = false;
        self.held_timeout = Some(timeout);
        if self.held.len() >= HOLD_MAX {
            self.send_held()?;
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        // ureq waits for an answer only once the request is complete: send it now, whole.
        self.send_held()?;
        self.request_start = true;
        let deadline = Deadline::start(timeout.for_read())?;
        loop {
            set_timeout(&self.stream, &mut self.read_timeout, deadline.left()?, TcpStream::set_read_timeout)?;
            match (&*self.stream).read(self.buffers.input_append_buf()) {
                Ok(n) => {
                    self.buffers.input_appended(n);
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(deadline.error(e)),
            }
        }
    }

    /// Open and quiet: no end of stream and no bytes nobody asked for.
    fn is_open(&mut self) -> bool {
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        matches!(rustix::net::recv(&self.stream, &mut [0u8; 1], flags), Err(rustix::io::Errno::WOULDBLOCK))
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("peer", &self.stream.peer_addr().ok()).finish()
    }
}

/// One I/O step's budget, as an instant.
struct Deadline {
    at: Option<Instant>,
    reason: Timeout,
}

impl Deadline {
    fn start(timeout: NextTimeout) -> Result<Deadline, ureq::Error> {
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let at = timeout.not_zero().and_then(|after| Instant::now().checked_add(*after));
        Ok(Deadline { at, reason: timeout.reason })
    }

    /// What is left, or the timeout error once nothing is.
    fn left(&self) -> Result<Option<Duration>, ureq::Error> {
        let Some(at) = self.at else { return Ok(None) };
        match at.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(Some(left)),
            _ => Err(ureq::Error::Timeout(self.reason)),
        }
    }

    /// A failed read or write: a socket timeout is this step's timeout.
    fn error(&self, e: io::Error) -> ureq::Error {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ureq::Error::Timeout(self.reason),
            _ => e.into(),
        }
    }
}

/// Sets a socket timeout to `left` rounded up to [`TIMEOUT_GRAIN`], unless
/// that is what `current` says is in force already.
fn set_timeout(
    stream: &TcpStream,
    current: &mut Option<Duration>,
    left: Option<Duration>,
    set: fn(&TcpStream, Option<Duration>) -> io::Result<()>,
) -> io::Result<()> {
    let wanted = left.map(round_up);
    if wanted != *current {
        set(stream, wanted)?;
        *current = wanted;
    }
    Ok(())
}

fn round_up(d: Duration) -> Duration {
    let grain = TIMEOUT_GRAIN.as_nanos();
    let grains = d.as_nanos().div_ceil(grain).max(1);
    Duration::from_nanos((grains * grain) as u64)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;

    use ureq::unversioned::transport::time;

    use super::*;

    /// A link and the accepted other end of its connection.
    fn pair() -> (Link, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (Link::new(stream, 4096, 4096), listener.accept().unwrap().0)
    }

    fn budget(after: Duration, reason: Timeout) -> NextTimeout {
        NextTimeout { after: time::Duration::Exact(after), reason, per_read: None, per_write: None }
    }

    fn transmit(link: &mut Link, bytes: &[u8]) {
        link.buffers().output()[..bytes.len()].copy_from_slice(bytes);
        link.transmit_output(bytes.len(), budget(Duration::from_secs(5), Timeout::SendBody)).unwrap();
    }

    #[test]
    fn a_request_leaves_in_one_write_once_the_answer_is_awaited() {
        let (mut link, mut peer) = pair();
        transmit(&mut link, b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\n");
        transmit(&mut link, b"body");
        peer.set_nonblocking(true).unwrap();
        let e = peer.read(&mut [0; 64]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WouldBlock, "nothing sent before the answer is awaited");
        peer.set_nonblocking(false).unwrap();

        let receiver = thread::spawn(move || {
            let mut buf = [0; 256];
            // One write is one segment on loopback: the first read gets it all.
            let n = peer.read(&mut buf).unwrap();
            peer.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
            buf[..n].to_vec()
        });
        assert!(link.await_input(budget(Duration::from_secs(5), Timeout::RecvResponse)).unwrap());
        assert_eq!(link.buffers().input(), b"HTTP/1.1 200 OK\r\n");
        assert_eq!(receiver.join().unwrap(), b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nbody");
    }

    #[test]
    fn the_probe_tells_a_quiet_connection_from_a_closed_or_chatty_one() {
        let (mut link, mut peer) = pair();
        assert!(link.is_open());
        peer.write_all(b"x").unwrap();
        wait_until(|| !link.is_open());
        let mut byte = [0];
        assert_eq!((&*link.stream).read(&mut byte).unwrap(), 1, "the probe only peeks");

        let (mut link, peer) = pair();
        drop(peer);
        wait_until(|| !link.is_open());
    }

    #[test]
    fn a_silent_peer_is_a_timeout_of_the_phase_waited_in() {
        let (mut link, _peer) = pair();
        transmit(&mut link, b"GET / HTTP/1.1\r\n\r\n");
        let started = Instant::now();
        let e = link.await_input(budget(Duration::from_millis(100), Timeout::RecvResponse)).unwrap_err();
        assert!(matches!(e, ureq::Error::Timeout(Timeout::RecvResponse)), "{e:?}");
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn a_socket_timeout_is_set_again_only_when_its_rounded_value_changes() {
        let (link, _peer) = pair();
        let mut current = None;
        let set = TcpStream::set_read_timeout;
        set_timeout(&link.stream, &mut current, Some(Duration::from_micros(9_999_990)), set).unwrap();
        assert_eq!(current, Some(Duration::from_secs(10)));
        assert_eq!(link.stream.read_timeout().unwrap(), Some(Duration::from_secs(10)));
        // Changed behind its back: a budget that rounds the same must not touch the socket.
        link.stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        set_timeout(&link.stream, &mut current, Some(Duration::from_micros(9_999_001)), set).unwrap();
        assert_eq!(link.stream.read_timeout().unwrap(), Some(Duration::from_secs(1)));
        // (The kernel keeps timeouts in clock ticks: 9.96 s is whole ticks at HZ 100, 250, 300 and 1000.)
        set_timeout(&link.stream, &mut current, Some(Duration::from_millis(9_955)), set).unwrap();
        assert_eq!(link.stream.read_timeout().unwrap(), Some(Duration::from_millis(9_960)));
    }

    #[test]
    fn budgets_round_up_to_the_grain() {
        assert_eq!(round_up(Duration::from_nanos(1)), TIMEOUT_GRAIN);
        assert_eq!(round_up(Duration::from_millis(20)), Duration::from_millis(20));
        assert_eq!(round_up(Duration::from_micros(20_001)), Duration::from_millis(30));
    }

    fn wait_until(mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "condition not reached in 5 s");
            thread::yield_now();
        }
    }
}
