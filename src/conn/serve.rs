//! One path for every connection, plaintext or TLS: (TLS handshake,) tell the protocol,
//! then drive hyper's HTTP/1 or HTTP/2 connection until it ends, a directive ends it, or it is
//! taken apart at a request boundary (to be closed, served again, or passed to the successor).
//!
//! Every wait here is for an event: readiness of the socket, hyper's own wake-ups, or a
//! directive (which wakes the task). Nothing re-polls on a timer; how long a connection may sit
//! in a phase is the sweeper's business (see `registry`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use super::control::{Control, Directive, Directives, Phase};
use super::io::{Peeked, Replay, Tracked, TrackedIo};
use super::service::{AppService, DrainAware};
use crate::conn_info::ConnectionInfo;
use crate::error::BoxError;
use crate::handle::Handle;
use crate::registry::Connections;

/// The hyper builders every connection of a server uses.
#[derive(Debug)]
pub(crate) struct Http {
    pub(crate) h1: hyper::server::conn::http1::Builder,
    pub(crate) h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

/// Where a connection goes once taken apart for a hand-off (`handoff::Outbox`).
pub(crate) trait HandOff: Send + Sync + 'static {
    /// Takes the connection on its way to the successor; the outcome comes once the successor
    /// acknowledged it (`Passed`), or it is given back (`Kept`: serve it here).
    fn pass(&self, io: TrackedIo, read: Bytes) -> tokio::sync::oneshot::Receiver<PassOutcome>;

    /// Whether a successor that takes upgraded connections is there now (see `upgrade`).
    fn takes_upgraded(&self) -> bool {
        false
    }

    /// Takes an upgraded connection on its way to the successor, with the bytes read and not
    /// consumed and the application's `state` (see `upgrade`); the outcome as for
    /// [`HandOff::pass`]. By default, given back at once.
    fn pass_upgraded(
        &self,
        io: TrackedIo,
        read: Bytes,
        state: Bytes,
    ) -> tokio::sync::oneshot::Receiver<PassOutcome> {
        let _ = state;
        let (done, outcome) = tokio::sync::oneshot::channel();
        let _ = done.send(PassOutcome::Kept(io, read));
        outcome
    }
}

/// How passing a connection ended.
#[derive(Debug)]
pub(crate) enum PassOutcome {
    /// The successor has it.
    Passed,
    /// It is still ours: serve it here (with `Connection: close`).
    Kept(TrackedIo, Bytes),
}

impl std::fmt::Debug for dyn HandOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandOff")
    }
}

/// Where a server passes connections it hands over, once a successor takes them.
pub(crate) type HandOffSlot = Arc<OnceLock<Arc<dyn HandOff>>>;

/// What every connection of a server needs besides its service: one `Arc`, so that a new
/// connection takes one reference to it (one atomic on a line all workers share), not one per
/// part.
#[derive(Debug, Clone)]
pub(crate) struct ConnContext(Arc<ConnContextParts>);

/// The parts of a [`ConnContext`].
#[derive(Debug)]
pub(crate) struct ConnContextParts {
    pub(crate) http: Http,
    pub(crate) connections: Connections,
    pub(crate) handle: Handle,
    pub(crate) hand_off: HandOffSlot,
}

impl ConnContext {
    pub(crate) fn new(
        http: Http,
        connections: Connections,
        handle: Handle,
        hand_off: HandOffSlot,
    ) -> ConnContext {
        ConnContext(Arc::new(ConnContextParts {
            http,
            connections,
            handle,
            hand_off,
        }))
    }
}

impl std::ops::Deref for ConnContext {
    type Target = ConnContextParts;

    fn deref(&self) -> &ConnContextParts {
        &self.0
    }
}

/// The TLS side of a listener, if it has one.
#[cfg(feature = "rustls")]
pub(crate) type Tls = Option<tokio_rustls::TlsAcceptor>;
/// The TLS side of a listener: none without the `rustls` feature.
#[cfg(not(feature = "rustls"))]
pub(crate) type Tls = Option<NoTls>;

/// No TLS acceptor can exist without the `rustls` feature.
#[cfg(not(feature = "rustls"))]
#[derive(Debug, Clone)]
pub(crate) enum NoTls {}

/// Serves one connection until it ends, is cut, or is passed on. `read`: bytes already read
/// from it (by the previous process), which means HTTP/1 in plaintext.
///
/// The task's future is the plaintext or the TLS path itself, boxed here, not one future
/// that holds either: each wake-up of a connection resumes one state machine less, and a
/// plaintext connection's box is not sized for a TLS session.
pub(crate) fn serve<S: AppService>(
    io: TrackedIo,
    read: Bytes,
    service: S,
    tls: Tls,
    cx: ConnContext,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    match tls {
        #[cfg(feature = "rustls")]
        Some(acceptor) => {
            // Bytes read before the handshake would be a plaintext connection's: none come
            // here, because TLS connections are never passed on.
            debug_assert!(read.is_empty(), "BUG: read-ahead bytes on a TLS connection");
            Box::pin(serve_tls(io, acceptor, service, cx))
        }
        #[cfg(not(feature = "rustls"))]
        Some(never) => match never {},
        None => Box::pin(serve_conn(io, read, service, cx)),
    }
}

/// Serves a connection until it ends, is cut, or is passed on: tells its protocol (unless
/// `read`, bytes already read from it by the previous process, says HTTP/1), then drives
/// hyper's HTTP/1 or HTTP/2 connection.
///
/// One state machine for a connection's whole life, plaintext or TLS: a wake-up resumes it and
/// polls hyper's connection, with no nested state machine in between (each costs every
/// request of the connection a few dozen instructions).
async fn serve_conn<T: Transport, S: AppService>(
    mut io: T,
    mut read: Bytes,
    service: S,
    cx: ConnContext,
) {
    let control = Arc::clone(io.control());
    let shared = cx.connections.shared();
    // Withdrawn here once a hand-off of this connection failed.
    let mut ignore = ignore_for(&control);
    let h2 = loop {
        if !read.is_empty() {
            break false;
        }
        match io.detect(ignore).await {
            Detected::Gone => return,
            Detected::H1(head) => {
                read = head;
                break false;
            }
            Detected::H2(preface) => {
                read = preface;
                break true;
            }
            Detected::Idle(ds) if ds.contains(Directive::HandOff) => {
                match io.pass(&cx.hand_off, Bytes::new()).await {
                    Ok(()) => return,
                    Err((back, back_read)) => {
                        // Served here after all, as without a successor that takes
                        // connections: the keep-alive grace, then closed if still idle.
                        ignore = ignore.with(Directive::HandOff);
                        fall_back(&control, &cx);
                        (io, read) = (back, back_read);
                    }
                }
            }
            Detected::Idle(_) => return close(io).await,
        }
    };
    if h2 {
        let svc = DrainAware::new(service, Arc::clone(&control), io.info(), Arc::clone(shared));
        control.set_phase(Phase::H2Idle);
        let c = cx
            .http
            .h2
            .serve_connection(TokioIo::new(io.into_h2(read)), svc);
        return DriveH2::new(c, &control).await;
    }
    let mut io = Replay::new(read, io);
    loop {
        let svc = DrainAware::new(
            service.clone(),
            Arc::clone(&control),
            io.inner().info(),
            Arc::clone(shared),
        );
        let c = cx
            .http
            .h1
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        let drive = DriveH1 {
            control: &control,
            c: Some(c),
            ignore,
        };
        let Some((taken, hyper_read, ds)) = drive.await else {
            return;
        };
        let (transport, replay_rest) = taken.into_parts();
        let read = join(replay_rest, hyper_read);
        if ds.contains(Directive::HandOff) {
            match transport.pass(&cx.hand_off, read).await {
                Ok(()) => return,
                Err((back, read)) => {
                    // Not passed after all (the successor's channel failed, or too much
                    // read-ahead): served here to the end, as without a successor that takes
                    // connections.
                    ignore = ignore.with(Directive::HandOff);
                    fall_back(&control, &cx);
                    io = Replay::new(read, back);
                    continue;
                }
            }
        }
        let mut transport = transport;
        if read.is_empty() && !transport.bytes_waiting() {
            return close(transport).await;
        }
        // A request is on its way after all: answer it (with `Connection: close`). It is
        // `Reading` from now on (the replay does that for bytes hyper had read), so it is not
        // taken apart again before: bytes still in the socket may not have reached the
        // runtime's readiness yet (its driver runs between polls), and hyper would then see
        // none, and the connection be taken apart again at once, in a loop that never yields.
        control.note_read();
        io = Replay::new(read, transport);
    }
}

/// What a connection task does not act upon: `HandOff` where the connection cannot be passed.
fn ignore_for(control: &Control) -> Directives {
    match control.passable() {
        true => Directives::NONE,
        false => Directive::HandOff.into(),
    }
}

/// A pass failed: `Connection: close` from now on, and closed when idle a grace later.
fn fall_back(control: &Arc<Control>, cx: &ConnContext) {
    control.raise(Directive::CloseResponses);
    let grace = cx.connections.shared().fallback_grace();
    let control = Arc::clone(control);
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        control.raise(Directive::CloseIdle);
    });
}

#[cfg(feature = "rustls")]
async fn serve_tls<S: AppService>(
    io: TrackedIo,
    acceptor: tokio_rustls::TlsAcceptor,
    service: S,
    cx: ConnContext,
) {
    let control = Arc::clone(io.control());
    control.set_phase(Phase::Handshake);
    let handshake = UntilCut {
        control: &control,
        inner: acceptor.accept(io),
    };
    let stream = match handshake.await {
        // Cut (deadline, forced shutdown, header-read timeout): dropping the handshake closes
        // the socket.
        None => return,
        Some(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Some(Ok(stream)) => stream,
    };
    let info = crate::conn_info::TlsInfo::from_session(stream.get_ref().1);
    stream.get_ref().0.info().set_tls(info);
    // Idle from here, as a plaintext connection before its first bytes: closed at the end of a
    // drain's keep-alive grace if no request comes. But a handshake that ends after the grace
    // was under way when the listener closed, and its client is sending its first request right
    // now: it is answered (with `Connection: close`), not closed under the client. Timed by the
    // header-read timeout, and cut at the deadline, either way.
    let late = control.directives().contains(Directive::CloseIdle);
    control.set_phase(if late { Phase::Reading } else { Phase::Idle });
    serve_conn(stream, Bytes::new(), service, cx).await;
}

/// What sits under hyper: the tracked socket, or a TLS session over it.
trait Transport: AsyncRead + AsyncWrite + Tracked + Unpin + Send + 'static {
    /// What hyper's HTTP/2 serves: the transport, with the bytes read to tell the protocol
    /// replayed first if there are any.
    type H2Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn info(&self) -> &ConnectionInfo;

    /// Tells the protocol of a connection nothing was read from yet.
    fn detect(&mut self, ignore: Directives) -> impl Future<Output = Detected> + Send;

    /// The IO for hyper's HTTP/2, `read` (what [`Transport::detect`] read) replayed first.
    fn into_h2(self, read: Bytes) -> Self::H2Io;

    /// Whether bytes wait that nobody has read yet: in the socket, or, for TLS, decrypted by
    /// the session and not yet read by hyper.
    fn bytes_waiting(&mut self) -> bool;

    /// Passes the connection to the successor, or gives it back.
    fn pass(
        self,
        slot: &HandOffSlot,
        read: Bytes,
    ) -> impl Future<Output = Result<(), (Self, Bytes)>> + Send
    where
        Self: Sized;
}

impl Transport for TrackedIo {
    // The socket itself: plaintext HTTP/2 is told by peeking, so hyper reads the preface from
    // the socket, with nothing in between.
    type H2Io = TrackedIo;

    fn info(&self) -> &ConnectionInfo {
        TrackedIo::info(self)
    }

    fn detect(&mut self, ignore: Directives) -> impl Future<Output = Detected> + Send {
        detect_plain(self, ignore)
    }

    fn into_h2(self, read: Bytes) -> TrackedIo {
        // Only a connection passed by the previous process comes with bytes read, and those
        // are served as HTTP/1.
        debug_assert!(read.is_empty(), "BUG: plaintext HTTP/2 with bytes read");
        self
    }

    fn bytes_waiting(&mut self) -> bool {
        TrackedIo::bytes_waiting(self)
    }

    fn pass(
        self,
        slot: &HandOffSlot,
        read: Bytes,
    ) -> impl Future<Output = Result<(), (TrackedIo, Bytes)>> + Send {
        pass(slot, self, read)
    }
}

#[cfg(feature = "rustls")]
impl Tracked for tokio_rustls::server::TlsStream<TrackedIo> {
    fn control(&self) -> &Arc<Control> {
        self.get_ref().0.control()
    }
}

#[cfg(feature = "rustls")]
impl Transport for tokio_rustls::server::TlsStream<TrackedIo> {
    type H2Io = Replay<Self>;

    fn info(&self) -> &ConnectionInfo {
        self.get_ref().0.info()
    }

    fn detect(&mut self, ignore: Directives) -> impl Future<Output = Detected> + Send {
        let h2 = self.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        async move {
            match h2 {
                // HTTP/2 by ALPN: its preface and first SETTINGS are read here too (decrypted
                // bytes cannot be peeked at), bounded by the header-read timeout; whatever
                // they are, hyper's HTTP/2 gets them, replayed.
                true => detect(self, ignore).await,
                // No prior knowledge over TLS: HTTP/1 unless ALPN said otherwise.
                false => Detected::H1(Bytes::new()),
            }
        }
    }

    fn into_h2(self, read: Bytes) -> Replay<Self> {
        Replay::new(read, self)
    }

    fn bytes_waiting(&mut self) -> bool {
        let (io, session) = self.get_mut();
        // Records already read from the socket, decrypted and not yet read by hyper; an
        // error means the session is broken, and the connection is closed anyway.
        let decrypted = session
            .process_new_packets()
            .is_ok_and(|state| state.plaintext_bytes_to_read() > 0);
        decrypted || io.bytes_waiting()
    }

    fn pass(
        self,
        _: &HandOffSlot,
        read: Bytes,
    ) -> impl Future<Output = Result<(), (Self, Bytes)>> + Send {
        // Never asked: TLS connections are registered as not passable (their session lives in
        // this process), so `HandOff` is ignored for them.
        std::future::ready(Err((self, read)))
    }
}

/// Passes `io` to the successor if one takes connections; gives it back otherwise.
async fn pass(slot: &HandOffSlot, io: TrackedIo, read: Bytes) -> Result<(), (TrackedIo, Bytes)> {
    let Some(h) = slot.get() else {
        return Err((io, read));
    };
    match h.pass(io, read).await {
        Ok(PassOutcome::Passed) => Ok(()),
        Ok(PassOutcome::Kept(io, read)) => Err((io, read)),
        // The hand-off task is gone without a word; the connection went with it.
        Err(_) => Ok(()),
    }
}

fn join(a: Bytes, b: Bytes) -> Bytes {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b,
        (_, true) => a,
        _ => {
            let mut v = Vec::with_capacity(a.len() + b.len());
            v.extend_from_slice(&a);
            v.extend_from_slice(&b);
            v.into()
        }
    }
}

/// Closes a connection between requests: FIN after everything written, bounded.
async fn close<T: AsyncWrite + Unpin>(mut io: T) {
    let mut shutdown = std::pin::pin!(tokio::io::AsyncWriteExt::shutdown(&mut io));
    // Done at once for a socket (a FIN); no timer for that, as a drain closes thousands. Only a
    // TLS session whose close_notify waits behind a full socket needs the bound.
    let first = std::future::poll_fn(|cx| Poll::Ready(shutdown.as_mut().poll(cx))).await;
    if first.is_pending() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), shutdown).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Telling the protocol.

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/2 frame header: length (24 bits), type, flags, stream id.
const FRAME_HEADER: usize = 9;
const SETTINGS: u8 = 0x4;
/// The largest first frame read here (HTTP/2's default maximum frame size); a larger one is
/// hyper's to refuse.
const MAX_FIRST_FRAME: usize = 16_384;

#[derive(Debug)]
enum Detected {
    /// HTTP/1, with the bytes read to tell it (none when they were only peeked at).
    H1(Bytes),
    /// HTTP/2 (prior knowledge), with the preface and the first frame (the client's SETTINGS)
    /// if they were read (not when they were only peeked at).
    H2(Bytes),
    /// Closed, or cut.
    Gone,
    /// Still nothing received, and the server wants idle connections closed or passed.
    Idle(Directives),
}

/// The protocol a connection's first bytes show, or how many bytes it takes to tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    H1,
    H2,
    /// Not yet: this many bytes are needed to tell.
    Need(usize),
}

/// What the first bytes of a connection say.
fn tell(buf: &[u8]) -> Told {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] != H2_PREFACE[..n] {
        return Told::H1;
    }
    // `PRI * HTTP/2.0` is no HTTP/1 request (RFC 9113 3.4 reserves `PRI`); but the preface and
    // the client's first SETTINGS are awaited here, so that the header-read timeout bounds them
    // (hyper has none for HTTP/2).
    let Some(header) = buf.get(H2_PREFACE.len()..H2_PREFACE.len() + FRAME_HEADER) else {
        return Told::Need(H2_PREFACE.len() + FRAME_HEADER);
    };
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    if header[3] != SETTINGS || len > MAX_FIRST_FRAME {
        // Not what a client must send first; hyper's HTTP/2 takes it from here (an oversized
        // frame gets a GOAWAY; h2 serves a HEADERS frame sent before any SETTINGS). From here on
        // the connection is HTTP/2's, bounded by its idle timeout, not the header-read timeout.
        return Told::H2;
    }
    let need = H2_PREFACE.len() + FRAME_HEADER + len;
    if buf.len() < need {
        return Told::Need(need);
    }
    Told::H2
}

/// How much one read or peek takes while the protocol is told: the preface and a usual first
/// SETTINGS frame (a larger one gets a buffer of its size).
const FIRST_READ: usize = 64;

/// Whether a connection that has shown no byte yet is to be closed or passed as idle now: the
/// server asks (`ds`), and it is `Idle`. `Reading` without a byte means a request is known to
/// be on its way (a connection taken from the queue as the listener closed); and bytes in the
/// socket that the runtime has not reported yet (its driver runs between polls, and a
/// directive's wake-up can come first) are one too: the connection is `Reading` from then on.
fn idle_now<T: Transport>(io: &mut T, ds: Directives) -> bool {
    let wanted = Directives::of(&[Directive::CloseIdle, Directive::HandOff]);
    if !ds.intersects(wanted) || io.control().phase().0 != Phase::Idle {
        return false;
    }
    if io.bytes_waiting() {
        io.control().note_read();
        return false;
    }
    true
}

/// Tells a plaintext connection's protocol by peeking at its first bytes, without reading
/// any: hyper reads them itself, from the socket, with no buffer in between (an HTTP/2
/// connection's preface included). Bytes that cannot tell yet (`P`, the preface without its
/// SETTINGS frame) make the connection `Reading` (so the sweeper bounds them) and wait for more
/// to arrive: readiness, not a re-peek of the same bytes (see [`TrackedIo::poll_peek_until`]).
async fn detect_plain(io: &mut TrackedIo, ignore: Directives) -> Detected {
    let mut heap = Vec::new();
    std::future::poll_fn(|cx| {
        let ds = io.control().poll_directives(cx).without_all(ignore);
        if ds.contains(Directive::Cut) {
            return Poll::Ready(Detected::Gone);
        }
        loop {
            let mut stack = [0u8; FIRST_READ];
            let buf: &mut [u8] = match heap.is_empty() {
                true => &mut stack,
                false => &mut heap,
            };
            let room = buf.len();
            let control = io.control();
            let peeked = io.poll_peek_until(cx, buf, |seen| match tell(seen) {
                Told::H1 => Some(Ok(false)),
                Told::H2 => Some(Ok(true)),
                // The buffer cannot hold what is needed: a larger one (bounded by
                // `MAX_FIRST_FRAME`).
                Told::Need(need) if need > room => Some(Err(need)),
                Told::Need(_) => {
                    control.note_read();
                    None
                }
            });
            return match peeked {
                Poll::Ready(Ok(Peeked::Told(Ok(false)))) => Poll::Ready(Detected::H1(Bytes::new())),
                Poll::Ready(Ok(Peeked::Told(Ok(true)))) => Poll::Ready(Detected::H2(Bytes::new())),
                Poll::Ready(Ok(Peeked::Told(Err(need)))) => {
                    heap = vec![0; need];
                    continue;
                }
                Poll::Ready(Ok(Peeked::Eof) | Err(_)) => Poll::Ready(Detected::Gone),
                Poll::Pending => match idle_now(io, ds) {
                    true => Poll::Ready(Detected::Idle(ds)),
                    false => Poll::Pending,
                },
            };
        }
    })
    .await
}

/// Reads a TLS connection's first (decrypted) bytes until its protocol is told. A partial
/// prefix (`P`, `PR`) waits for the socket's readiness like any read: no timer; the sweeper
/// bounds it (the bytes make the connection `Reading`).
#[cfg(feature = "rustls")]
async fn detect<T: Transport>(io: &mut T, ignore: Directives) -> Detected {
    let mut buf = bytes::BytesMut::new();
    std::future::poll_fn(|cx| {
        let ds = io.control().poll_directives(cx).without_all(ignore);
        if ds.contains(Directive::Cut) {
            return Poll::Ready(Detected::Gone);
        }
        loop {
            let filled = buf.len();
            buf.resize(filled + FIRST_READ.max(filled), 0);
            let mut rb = tokio::io::ReadBuf::new(&mut buf[filled..]);
            let polled = Pin::new(&mut *io).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            buf.truncate(filled + n);
            match polled {
                Poll::Ready(Ok(())) if n == 0 => return Poll::Ready(Detected::Gone),
                Poll::Ready(Ok(())) => match tell(&buf) {
                    Told::H1 => {
                        return Poll::Ready(Detected::H1(std::mem::take(&mut buf).freeze()));
                    }
                    Told::H2 => {
                        return Poll::Ready(Detected::H2(std::mem::take(&mut buf).freeze()));
                    }
                    Told::Need(_) => {}
                },
                Poll::Ready(Err(_)) => return Poll::Ready(Detected::Gone),
                Poll::Pending if buf.is_empty() => {
                    if idle_now(io, ds) {
                        return Poll::Ready(Detected::Idle(ds));
                    }
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Driving hyper.

/// hyper's HTTP/1 connection, as a connection task drives it and takes it apart.
trait H1: Future<Output = hyper::Result<()>> + Unpin {
    type Io;
    /// The transport and the bytes hyper had read that no request consumed; `None` if the
    /// connection was upgraded.
    fn into_parts(self) -> Option<(Self::Io, Bytes)>;
}

impl<T, S> H1
    for hyper::server::conn::http1::UpgradeableConnection<TokioIo<Replay<T>>, DrainAware<S>>
where
    T: Transport,
    S: AppService,
{
    type Io = Replay<T>;

    fn into_parts(self) -> Option<(Replay<T>, Bytes)> {
        hyper::server::conn::http1::UpgradeableConnection::into_parts(self)
            .map(|parts| (parts.io.into_inner(), parts.read_buf))
    }
}

/// Drives an HTTP/1 connection; takes it apart at a request boundary when the server asks
/// (`CloseIdle` or `HandOff`), returning the transport, the bytes hyper had read, and the
/// directives that asked.
struct DriveH1<'a, C> {
    control: &'a Control,
    c: Option<C>,
    /// Directives not to act upon.
    ignore: Directives,
}

impl<C: H1> Future for DriveH1<'_, C> {
    type Output = Option<(C::Io, Bytes, Directives)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let ds = this.control.poll_directives(cx).without_all(this.ignore);
        if ds.contains(Directive::Cut) {
            return Poll::Ready(None);
        }
        let Some(c) = this.c.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(result) = Pin::new(c).poll(cx) {
            if let Err(e) = result {
                log_end(e.into());
            }
            return Poll::Ready(None);
        }
        let want = ds.intersection(Directives::of(&[Directive::CloseIdle, Directive::HandOff]));
        if !want.is_empty() && this.control.at_request_boundary() {
            return Poll::Ready(
                this.c
                    .take()
                    .and_then(H1::into_parts)
                    .map(|(io, read)| (io, read, want)),
            );
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// Drives an HTTP/2 connection: GOAWAY (hyper's graceful shutdown) as soon as the server
    /// drains or the connection idled too long, dropped when it is cut.
    struct DriveH2<'a, C> {
        #[pin]
        c: C,
        control: &'a Control,
        shutting_down: bool,
    }
}

impl<'a, C> DriveH2<'a, C> {
    fn new(c: C, control: &'a Control) -> DriveH2<'a, C> {
        DriveH2 {
            c,
            control,
            shutting_down: false,
        }
    }
}

impl<C> Future for DriveH2<'_, C>
where
    C: Future<Output = hyper::Result<()>> + GracefulShutdown,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        const GO_AWAY: Directives = Directives::of(&[
            Directive::Drain,
            Directive::CloseIdle,
            Directive::HandOff,
            Directive::GoAwayIdle,
        ]);
        let mut this = self.project();
        let ds = this.control.poll_directives(cx);
        if ds.contains(Directive::Cut) {
            return Poll::Ready(());
        }
        if !*this.shutting_down && ds.intersects(GO_AWAY) {
            *this.shutting_down = true;
            this.c.as_mut().graceful_shutdown();
        }
        match this.c.poll(cx) {
            Poll::Ready(Err(e)) => {
                log_end(e.into());
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// hyper's graceful shutdown, for the connection types that have one.
trait GracefulShutdown {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B, E> GracefulShutdown for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

/// Polls `inner` until it completes, or until the connection is cut (`None`).
#[cfg(feature = "rustls")]
struct UntilCut<'a, F> {
    control: &'a Control,
    inner: F,
}

#[cfg(feature = "rustls")]
impl<F: Future + Unpin> Future for UntilCut<'_, F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.control.poll_directives(cx).contains(Directive::Cut) {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll(cx).map(Some)
    }
}

pub(crate) fn log_end(e: BoxError) {
    // Clients resetting or timing out is routine; it is not the server's error.
    tracing::debug!(error = %e, "connection ended with an error");
}
