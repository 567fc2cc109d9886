//! A loopback TCP proxy that puts a slow network between a client and a server.
//!
//! On loopback the idle keep-alive race of a restart is a few microseconds wide; over a real
//! network it is one round trip (see PITFALLS.md). This proxy makes loopback behave like that
//! network: every chunk of bytes is released one latency after it arrived (not batched into a
//! later flush), in order, and so is every close. A FIN from one side becomes a FIN
//! (`shutdown(SHUT_WR)`) on the other, so a half-close stays a half-close; a reset becomes a
//! reset (`SO_LINGER` 0, then close). Writing to a side that is gone, or a reset that follows
//! a FIN (a peer that closed its socket and then got data), is brought to the other side as a
//! reset, as the network would.
//!
//! Bounded: each connection is one task that ends when both FINs were delivered or a reset was;
//! dropping the [`Proxy`] stops its runtime, which drops every task and closes their sockets.
//!
//! It records, per connection, the client's port (what the client sees as its local port) and
//! which side the proxy saw close first, so a test can tell a connection closed by the server
//! from one the client ended.
//!
//! Self-contained (std, tokio, rustix), so that a benchmark can include it with `#[path]`. Its
//! tests are in `proxy_tests.rs`, run by `tests/handoff.rs`.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// The delay the issue 11 measurements use, each way.
pub const DEFAULT_LATENCY: Duration = Duration::from_millis(15);

/// Bytes read at once; each read is one chunk, released as a whole.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction. When full, the proxy stops reading that side, and TCP flow
/// control pushes back on the sender, as a slow link would.
const QUEUE: usize = 64;

/// One-way delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// From the client to the server.
    pub to_server: Duration,
    /// From the server to the client.
    pub to_client: Duration,
}

impl Latency {
    pub fn each_way(delay: Duration) -> Latency {
        Latency {
            to_server: delay,
            to_client: delay,
        }
    }
}

impl Default for Latency {
    fn default() -> Latency {
        Latency::each_way(DEFAULT_LATENCY)
    }
}

/// A side of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// How a side closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// An orderly end of its sending direction (it may still read).
    Fin,
    /// A reset, or an error that means the side is gone.
    Reset,
}

/// A close as the proxy saw it: by whom, how, and when it reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub by: Side,
    pub how: How,
    pub at: Instant,
}

/// What the proxy knows about one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConn {
    /// The client's port: the proxy's peer port on the client side, the client's local port.
    pub client_port: u16,
    /// The proxy's local port toward the server (what the server sees as its peer's port);
    /// `None` until the proxy bound it.
    pub upstream_port: Option<u16>,
    pub opened: Instant,
    /// The first close the proxy saw, from either side; `None` while neither closed.
    pub first_close: Option<Close>,
    /// When the proxy let go of both sockets; `None` while it relays.
    pub ended: Option<Instant>,
}

impl ProxyConn {
    /// Whether the server side closed (FIN or reset) before the client side did.
    pub fn server_closed_first(&self) -> bool {
        self.first_close.is_some_and(|c| c.by == Side::Server)
    }
}

#[derive(Debug, Default)]
struct Shared {
    conns: Mutex<Vec<ProxyConn>>,
    /// Notified when a connection ends.
    ended: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ProxyConn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running proxy: listens on a loopback port of its own and relays each connection to
/// `upstream` on a runtime of its own thread, so that tests of any kind (sync or async) can
/// use it. Dropping it ends every connection and the thread.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    latency: Latency,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to `upstream` with [`DEFAULT_LATENCY`] each way.
    pub fn start(upstream: SocketAddr) -> Proxy {
        Proxy::with_latency(upstream, Latency::default())
    }

    pub fn with_latency(upstream: SocketAddr, latency: Latency) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("proxy: set the listener non-blocking (tokio requires it)");
        let addr = listener.local_addr().expect("proxy: listener address");
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = oneshot::channel();
        let state = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("proxy {addr}->{upstream}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(async {
                    let listener =
                        TcpListener::from_std(listener).expect("proxy: listener to tokio");
                    tokio::select! {
                        _ = stopped => {}
                        never = accept(listener, upstream, latency, &state) => match never {},
                    }
                });
                // Drops every relay task, and with it every socket they hold.
                drop(runtime);
                let now = Instant::now();
                for conn in state.lock().iter_mut() {
                    conn.ended.get_or_insert(now);
                }
                state.ended.notify_all();
            })
            .expect("spawn the proxy thread");
        Proxy {
            addr,
            latency,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn latency(&self) -> Latency {
        self.latency
    }

    /// Every connection so far, in the order they were accepted.
    pub fn connections(&self) -> Vec<ProxyConn> {
        self.shared.lock().clone()
    }

    /// Connections the proxy still relays.
    pub fn open(&self) -> usize {
        self.shared
            .lock()
            .iter()
            .filter(|c| c.ended.is_none())
            .count()
    }

    /// Waits until the proxy relays no connection any more (both ends closed, or one reset).
    pub fn wait_all_ended(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut conns = self.shared.lock();
        loop {
            let open: Vec<&ProxyConn> = conns.iter().filter(|c| c.ended.is_none()).collect();
            if open.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "proxy: {} connection(s) still open after {timeout:?}, expected none: {open:#?}",
                    open.len()
                ));
            }
            conns = self
                .shared
                .ended
                .wait_timeout(conns, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The runtime stops at once: its tasks are only dropped, none is awaited.
            let _ = thread.join();
        }
    }
}

/// Accepts until the proxy stops (this future is then dropped).
async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    latency: Latency,
    shared: &Arc<Shared>,
) -> Infallible {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let log = ConnLog::new(shared, peer.port());
                tokio::spawn(relay(client, upstream, latency, log));
            }
            // EMFILE and the like: back off rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One connection's entry in the shared log.
struct ConnLog {
    shared: Arc<Shared>,
    index: usize,
}

impl ConnLog {
    fn new(shared: &Arc<Shared>, client_port: u16) -> ConnLog {
        let mut conns = shared.lock();
        conns.push(ProxyConn {
            client_port,
            upstream_port: None,
            opened: Instant::now(),
            first_close: None,
            ended: None,
        });
        ConnLog {
            shared: Arc::clone(shared),
            index: conns.len() - 1,
        }
    }

    fn with(&self, f: impl FnOnce(&mut ProxyConn)) {
        if let Some(conn) = self.shared.lock().get_mut(self.index) {
            f(conn);
        }
    }

    /// Records a close; only the first one counts as "first".
    fn closed(&self, by: Side, how: How) {
        let at = Instant::now();
        self.with(|c| {
            c.first_close.get_or_insert(Close { by, how, at });
        });
    }
}

impl Drop for ConnLog {
    /// The relay ended (or its task was dropped): its sockets are closed with it.
    fn drop(&mut self) {
        let now = Instant::now();
        self.with(|c| {
            c.ended.get_or_insert(now);
        });
        self.shared.ended.notify_all();
    }
}

/// What travels through the proxy in one direction, stamped with when it reached the proxy.
struct Timed {
    at: tokio::time::Instant,
    event: Event,
}

enum Event {
    Data(Vec<u8>),
    Fin,
    Reset,
}

impl Timed {
    fn now(event: Event) -> Timed {
        Timed {
            at: tokio::time::Instant::now(),
            event,
        }
    }
}

/// One connection's task: the log records its end once both sockets are closed.
async fn relay(client: TcpStream, upstream: SocketAddr, latency: Latency, log: ConnLog) {
    relay_sockets(client, upstream, latency, &log).await;
}

/// Relays one connection until both FINs were delivered or a reset was. All four halves run
/// in this one task (no task of their own to outlive it), borrowing the two sockets, which
/// close when it returns: cleanly after two FINs (nothing is left unread on either side), with
/// a reset on the side a reset was brought to (its linger was set to 0).
async fn relay_sockets(client: TcpStream, upstream: SocketAddr, latency: Latency, log: &ConnLog) {
    let server = match connect(upstream, log).await {
        Ok(s) => s,
        Err(_) => {
            // Refused (no listener) or unreachable: the client sees a reset, one delay later.
            log.closed(Side::Server, How::Reset);
            tokio::time::sleep(latency.to_client).await;
            let _ = client.set_zero_linger();
            return;
        }
    };
    // Small writes go out as they are released, not held back by Nagle's algorithm.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (to_server, for_server) = mpsc::channel(QUEUE);
    let (to_client, for_client) = mpsc::channel(QUEUE);
    let fins = AtomicU8::new(0);
    let to_server_writer = Writer {
        dst: &server,
        side: Side::Server,
        latency: latency.to_server,
        reverse: to_client.clone(),
        fins: &fins,
        log,
    };
    let to_client_writer = Writer {
        dst: &client,
        side: Side::Client,
        latency: latency.to_client,
        reverse: to_server.clone(),
        fins: &fins,
        log,
    };
    tokio::select! {
        never = read_side(&client, Side::Client, to_server, log) => match never {},
        never = read_side(&server, Side::Server, to_client, log) => match never {},
        () = to_server_writer.run(for_server) => {}
        () = to_client_writer.run(for_client) => {}
    }
}

/// Connects to the server from a port bound first, so that the port is known even when the
/// server resets the connection at once (a reset socket no longer has a local address).
async fn connect(upstream: SocketAddr, log: &ConnLog) -> io::Result<TcpStream> {
    let (socket, local) = match upstream {
        SocketAddr::V4(_) => (
            tokio::net::TcpSocket::new_v4()?,
            SocketAddr::from(([127, 0, 0, 1], 0)),
        ),
        SocketAddr::V6(_) => (
            tokio::net::TcpSocket::new_v6()?,
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
        ),
    };
    socket.bind(local)?;
    let port = socket.local_addr()?.port();
    log.with(|c| c.upstream_port = Some(port));
    socket.connect(upstream).await
}

/// Reads `src` until it closes, queueing each chunk with the moment it arrived, then the
/// close. After a FIN the side can still reset (it closed its socket, then got data): it is
/// watched for an error until the relay ends. Never returns; the relay drops it.
async fn read_side(
    src: &TcpStream,
    side: Side,
    queue: mpsc::Sender<Timed>,
    log: &ConnLog,
) -> Infallible {
    let mut buf = vec![0u8; CHUNK];
    let how = loop {
        let read = match src.readable().await {
            Ok(()) => src.try_read(&mut buf),
            Err(e) => Err(e),
        };
        match read {
            Ok(0) => break How::Fin,
            Ok(n) => {
                // A send fails only once the relay is ending: nothing to do then.
                let _ = queue.send(Timed::now(Event::Data(buf[..n].to_vec()))).await;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => break How::Reset,
        }
    };
    log.closed(side, how);
    let event = match how {
        How::Fin => Event::Fin,
        How::Reset => Event::Reset,
    };
    let _ = queue.send(Timed::now(event)).await;
    if how == How::Fin && src.ready(Interest::ERROR).await.is_ok() {
        log.closed(side, How::Reset);
        let _ = queue.send(Timed::now(Event::Reset)).await;
    }
    std::future::pending().await
}

/// Releases what one direction carries to `dst`, each item one latency after it arrived.
struct Writer<'a> {
    dst: &'a TcpStream,
    /// Which side `dst` is.
    side: Side,
    latency: Duration,
    /// The other direction's queue: where a failure of `dst` goes, to reach the other side.
    reverse: mpsc::Sender<Timed>,
    /// FINs delivered, both directions: at 2 the connection is over.
    fins: &'a AtomicU8,
    log: &'a ConnLog,
}

impl Writer<'_> {
    /// Returns when the relay is over: both FINs delivered, or a reset delivered to `dst`.
    async fn run(self, mut queue: mpsc::Receiver<Timed>) {
        while let Some(Timed { at, event }) = queue.recv().await {
            tokio::time::sleep_until(at + self.latency).await;
            let fin = matches!(event, Event::Fin);
            let delivered = match event {
                Event::Data(bytes) => write_all(self.dst, &bytes).await,
                Event::Fin => rustix::net::shutdown(self.dst, rustix::net::Shutdown::Write)
                    .map_err(io::Error::from),
                Event::Reset => {
                    // Closing with a zero linger sends RST; the relay closes it on return.
                    let _ = self.dst.set_zero_linger();
                    return;
                }
            };
            match delivered {
                Ok(()) if fin => {
                    if self.fins.fetch_add(1, Ordering::AcqRel) + 1 == 2 {
                        return;
                    }
                }
                Ok(()) => {}
                Err(_) => {
                    // `dst` is gone (reset, or closed and then sent data): on a network its
                    // reset would reach the other side, after the other direction's delay.
                    self.log.closed(self.side, How::Reset);
                    let _ = self.reverse.send(Timed::now(Event::Reset)).await;
                    break;
                }
            }
        }
        // The other direction's writer ends the relay when it delivers that reset.
        std::future::pending().await
    }
}

async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
