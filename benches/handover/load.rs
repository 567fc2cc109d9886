//! Load over loopback: keep-alive HTTP/1.1 clients (hyper on tokio) that count what they get
//! and note which process answered on each connection and when that connection closed (or, with
//! [`Spec::close`], a new connection per request); and idle keep-alive connections in bulk.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, HeaderValue};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;

use super::procs::SOON;

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) addr: SocketAddr,
    /// Keep-alive connections, each sending its next request when it got the last response.
    pub(crate) connections: usize,
    /// Request path and query, e.g. `/` or `/?sleep_ms=200`.
    pub(crate) path: String,
    /// Bound on the run's duration, whatever happens.
    pub(crate) max_time: Duration,
    /// Bound on the requests each connection slot sends.
    pub(crate) max_per_conn: u64,
    /// Worker threads of the client runtime.
    pub(crate) threads: usize,
    /// Each request says `Connection: close`: the server closes the connection after its
    /// answer, and the client opens a new one for the next request (what a new connection
    /// costs, handshake and accept included).
    pub(crate) close: bool,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) ok: u64,
    /// Requests sent that got no complete, correct response.
    pub(crate) failed: u64,
    /// The first few failures.
    pub(crate) errors: Vec<String>,
    /// Connections opened.
    pub(crate) connections: u64,
}

const KEEP_ERRORS: usize = 20;

impl Report {
    fn fail(&mut self, error: String) {
        self.failed += 1;
        if self.errors.len() < KEEP_ERRORS {
            self.errors.push(error);
        }
    }

    fn add(&mut self, other: Report) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.connections += other.connections;
        for e in other.errors {
            if self.errors.len() < KEEP_ERRORS {
                self.errors.push(e);
            }
        }
    }
}

/// Keep-alive clients sending requests until stopped (or their bounds are reached).
///
/// Like a real client pool: a connection closed by the server after a `Connection: close`
/// response, or found closed before a request was written, is reopened without counting a
/// failure; any request that was sent and got no complete response is a failure.
pub(crate) struct Load {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Report>>,
}

struct Shared {
    stop: AtomicBool,
    ok: AtomicU64,
    book: Mutex<Book>,
    changed: Condvar,
}

/// Which process answered on which connections, and when they closed.
#[derive(Default)]
struct Book {
    /// Pids that answered at least once.
    seen: BTreeSet<u32>,
    /// Connections still open, per pid that answered on them.
    open: HashMap<u32, usize>,
    /// When the last connection of each pid was seen closed.
    last_close: HashMap<u32, Instant>,
}

struct Target {
    addr: SocketAddr,
    uri: Uri,
    host: HeaderValue,
    /// Send `Connection: close` with every request.
    close: bool,
}

impl Load {
    pub(crate) fn start(spec: &Spec) -> Result<Load, String> {
        let target = Arc::new(Target {
            addr: spec.addr,
            uri: spec
                .path
                .parse()
                .map_err(|e| format!("bad path {:?}: {e}", spec.path))?,
            host: HeaderValue::from_str(&spec.addr.to_string())
                .map_err(|e| format!("bad host: {e}"))?,
            close: spec.close,
        });
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            ok: AtomicU64::new(0),
            book: Mutex::default(),
            changed: Condvar::new(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(spec.threads.max(1))
            .enable_all()
            .build()
            .map_err(|e| format!("load runtime: {e}"))?;
        let (s, spec) = (Arc::clone(&shared), spec.clone());
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let deadline = Instant::now() + spec.max_time;
                let tasks: Vec<_> = (0..spec.connections)
                    .map(|_| {
                        tokio::spawn(client(
                            Arc::clone(&s),
                            Arc::clone(&target),
                            deadline,
                            spec.max_per_conn,
                        ))
                    })
                    .collect();
                let mut total = Report::default();
                for t in tasks {
                    match t.await {
                        Ok(r) => total.add(r),
                        Err(e) => total.fail(format!("client task failed: {e}")),
                    }
                }
                total
            })
        });
        Ok(Load {
            shared,
            thread: Some(thread),
        })
    }

    /// Responses received so far.
    pub(crate) fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    /// Waits until some response came from `pid`.
    pub(crate) fn wait_pid(&self, pid: u32, timeout: Duration) -> bool {
        self.wait_book(timeout, |b| b.seen.contains(&pid)).is_some()
    }

    /// Waits until no connection answered by `pid` is open (bounded by `timeout`); returns when
    /// the last of them was seen closed (or answered by another process: passed to it).
    pub(crate) fn last_close(&self, pid: u32, timeout: Duration) -> Option<Instant> {
        self.wait_book(timeout, |b| b.open.get(&pid).is_none_or(|n| *n == 0))?;
        let book = self.shared.book.lock().unwrap_or_else(|p| p.into_inner());
        book.last_close.get(&pid).copied()
    }

    fn wait_book(&self, timeout: Duration, done: impl Fn(&Book) -> bool) -> Option<()> {
        let deadline = Instant::now() + timeout;
        let mut book = self.shared.book.lock().unwrap_or_else(|p| p.into_inner());
        while !done(&book) {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            book = self
                .shared
                .changed
                .wait_timeout(book, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Some(())
    }

    /// Stops the clients (each finishes the request it is waiting for) and sums up.
    pub(crate) fn stop(mut self) -> Report {
        self.shared.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(report)) => report,
            _ => {
                let mut r = Report::default();
                r.fail("the load thread panicked".into());
                r
            }
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn running(&self, deadline: Instant, sent: u64, max: u64) -> bool {
        !self.stop.load(Ordering::Relaxed) && sent < max && Instant::now() < deadline
    }

    fn opened(&self, pid: u32) {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        book.seen.insert(pid);
        *book.open.entry(pid).or_default() += 1;
        drop(book);
        self.changed.notify_all();
    }

    fn closed(&self, pid: u32, at: Instant) {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = book.open.get_mut(&pid) {
            *n = n.saturating_sub(1);
        }
        let last = book.last_close.entry(pid).or_insert(at);
        *last = (*last).max(at);
        drop(book);
        self.changed.notify_all();
    }
}

/// One client slot: a keep-alive connection at a time, reopened when the server closes it.
async fn client(shared: Arc<Shared>, target: Arc<Target>, deadline: Instant, max: u64) -> Report {
    let mut report = Report::default();
    let mut sent = 0u64;
    while shared.running(deadline, sent, max) {
        let stream = match tokio::net::TcpStream::connect(target.addr).await {
            Ok(s) => s,
            Err(e) => {
                report.fail(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => {
                    report.fail(format!("handshake: {e}"));
                    continue;
                }
            };
        report.connections += 1;
        // The connection task ends when the connection is closed: that is when we see it close.
        let conn = tokio::spawn(async move {
            let _ = conn.await;
            Instant::now()
        });
        let mut pid = 0;
        while shared.running(deadline, sent, max) {
            // Closed cleanly before anything was sent: reopen, nothing lost.
            if sender.ready().await.is_err() {
                break;
            }
            sent += 1;
            match send(&mut sender, &target).await {
                Ok(r) if r.ok => {
                    report.ok += 1;
                    shared.ok.fetch_add(1, Ordering::Relaxed);
                    if r.pid != 0 && r.pid != pid {
                        // A connection passed to the new process at a restart (connection
                        // hand-off) has left the old one when the new one first answers on it.
                        if pid != 0 {
                            shared.closed(pid, Instant::now());
                        }
                        pid = r.pid;
                        shared.opened(pid);
                    }
                    if r.close {
                        break;
                    }
                }
                Ok(r) => report.fail(format!("bad reply: {r:?}")),
                Err(e) => {
                    report.fail(e);
                    break;
                }
            }
        }
        drop(sender);
        let closed = match tokio::time::timeout(SOON, conn).await {
            Ok(Ok(at)) => at,
            _ => Instant::now(),
        };
        if pid != 0 {
            shared.closed(pid, closed);
        }
    }
    report
}

#[derive(Debug)]
struct Reply {
    ok: bool,
    pid: u32,
    close: bool,
}

async fn send(sender: &mut SendRequest<Empty<Bytes>>, target: &Target) -> Result<Reply, String> {
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.uri_mut() = target.uri.clone();
    req.headers_mut().insert(HOST, target.host.clone());
    if target.close {
        req.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let headers = resp.headers();
    let pid = headers
        .get("x-pid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let close = headers
        .get(hyper::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply {
        ok: status == hyper::StatusCode::OK && body == "Hello world",
        pid,
        close,
    })
}

// ---------------------------------------------------------------------------------------------
// Idle connections.

/// Opens `n` keep-alive connections to `addr` and sends one request on each (so that each is a
/// real, idle, keep-alive HTTP/1.1 connection), in batches small enough for the listen backlog.
/// With `sources`, connections are bound round-robin to those loopback addresses first (when
/// one source address has too few ephemeral ports).
pub(crate) fn open_idle(
    addr: SocketAddr,
    n: usize,
    sources: &[Ipv4Addr],
) -> Result<Vec<TcpStream>, String> {
    const BATCH: usize = 100;
    let mut conns: Vec<TcpStream> = Vec::with_capacity(n);
    while conns.len() < n {
        let start = conns.len();
        for i in start..n.min(start + BATCH) {
            let mut s = match sources.get(i % sources.len().max(1)) {
                Some(src) => connect_from(*src, addr),
                None => TcpStream::connect(addr).map_err(|e| format!("connect: {e}")),
            }
            .map_err(|e| format!("connection #{i}: {e}"))?;
            let _ = s.set_nodelay(true);
            s.write_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
                .map_err(|e| format!("connection #{i}: write: {e}"))?;
            conns.push(s);
        }
        for (i, s) in conns.iter_mut().enumerate().skip(start) {
            read_hello(s).map_err(|e| format!("connection #{i}: {e}"))?;
        }
    }
    Ok(conns)
}

fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> Result<TcpStream, String> {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)
        .map_err(|e| format!("socket: {e}"))?;
    rustix::net::bind(&fd, &SocketAddrV4::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    rustix::net::connect(&fd, &addr).map_err(|e| format!("connect from {source}: {e}"))?;
    Ok(TcpStream::from(fd))
}

/// Reads one `Hello world` response (the body comes last and nothing follows it).
fn read_hello(s: &mut TcpStream) -> Result<(), String> {
    s.set_read_timeout(Some(SOON))
        .map_err(|e| format!("read timeout: {e}"))?;
    let mut got = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"Hello world") {
        let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 || got.len() > 16 * 1024 {
            return Err(format!(
                "no complete response: {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        got.extend_from_slice(&buf[..n]);
    }
    if got.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("bad response: {:?}", String::from_utf8_lossy(&got)))
    }
}

/// Sends one `GET /` on each of `conns` (a batch at a time) and checks that each is answered,
/// `200 Hello world`, by `pid`: the connections are still usable, and are that process's.
pub(crate) fn request_each(conns: &mut [TcpStream], pid: u32) -> Result<(), String> {
    const BATCH: usize = 100;
    for (b, batch) in conns.chunks_mut(BATCH).enumerate() {
        for (i, s) in batch.iter_mut().enumerate() {
            s.write_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
                .map_err(|e| format!("connection #{}: write: {e}", b * BATCH + i))?;
        }
        for (i, s) in batch.iter_mut().enumerate() {
            let n = b * BATCH + i;
            let answered = read_hello_from(s).map_err(|e| format!("connection #{n}: {e}"))?;
            if answered != pid {
                return Err(format!(
                    "connection #{n} answered by pid {answered}, expected {pid}"
                ));
            }
        }
    }
    Ok(())
}

/// Reads one `Hello world` response; returns its `x-pid`.
fn read_hello_from(s: &mut TcpStream) -> Result<u32, String> {
    s.set_read_timeout(Some(SOON))
        .map_err(|e| format!("read timeout: {e}"))?;
    let mut got = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"Hello world") {
        let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 || got.len() > 16 * 1024 {
            return Err(format!(
                "no complete response: {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("bad response: {text:?}"));
    }
    text.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-pid")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| format!("no x-pid in {text:?}"))
}
