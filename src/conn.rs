//! Serving one connection so that it can be drained, taken apart at a request boundary, or
//! cut.
//!
//! # What is tracked, and why
//! hyper knows whether an HTTP/1 connection is between requests, but only tells through
//! `graceful_shutdown`, which closes a connection whose next request head is half received
//! (hyper marks a connection busy only once a head is complete). So every connection has a
//! [`Conn`] control block with its **phase**, kept by three cheap hooks on the request path:
//! - the socket wrapper ([`TrackedIo`]) marks `Reading` when bytes arrive on an `Idle`
//!   connection;
//! - the service wrapper ([`DrainAware`]) marks `Busy` when hyper hands it a request head;
//! - the response body wrapper ([`TrackedBody`]) marks `Idle` when hyper is done with the body.
//!
//! The phase (with the coarse time it began) serves three purposes: the header-read timeout is
//! enforced by one server-wide sweeper instead of a timer per request; a drain closes only
//! connections that are really idle; and a connection can be taken apart between two
//! requests (hyper's `into_parts`: the socket and the bytes hyper read that no request
//! consumed) to be closed, served again, or passed to the successor.
//!
//! # Commands
//! The server steers connections through the bits of [`Conn::ctl`] (set for every connection
//! at once by [`crate::drain::Connections`], which wakes each task). The connection task reads
//! them on each poll: one relaxed load, no `select!`, no timer.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::accept::HandOffSlot;
use crate::conn_info::ConnectionInfo;
use crate::drain::{Registration, Shared};
use crate::error::BoxError;

// ---------------------------------------------------------------------------------------------
// Control bits.

/// Cut now: drop the connection (closing the socket).
pub(crate) const CUT: u32 = 1 << 0;
/// Stop keep-alive: HTTP/2 gets GOAWAY at once.
pub(crate) const DRAIN: u32 = 1 << 1;
/// The keep-alive grace is over: close HTTP/1 connections that are idle.
pub(crate) const CLOSE_IDLE: u32 = 1 << 2;
/// Take idle HTTP/1 connections apart and pass them to the successor.
pub(crate) const HAND_OFF: u32 = 1 << 3;
/// HTTP/1 responses carry `Connection: close` (the client reconnects, elsewhere).
pub(crate) const CLOSE_RESPONSES: u32 = 1 << 4;
/// The server is shutting down: requests are counted (the lame duck's counter).
pub(crate) const STOPPING: u32 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Phases.

/// Where a connection is between two requests. Packed with the coarse time it began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Nothing received since the last response (or since accept).
    Idle = 0,
    /// Bytes of a request head received, head not complete yet.
    Reading = 1,
    /// A request is being served.
    Busy = 2,
    /// HTTP/2: hyper's own stream accounting applies; no head timeout.
    H2 = 3,
    /// Upgraded (WebSocket, CONNECT): the application owns the bytes.
    Upgraded = 4,
    /// A TLS handshake is in progress.
    Handshake = 5,
}

impl Phase {
    fn from_bits(bits: u64) -> Phase {
        match bits & 0xff {
            0 => Phase::Idle,
            1 => Phase::Reading,
            2 => Phase::Busy,
            3 => Phase::H2,
            4 => Phase::Upgraded,
            _ => Phase::Handshake,
        }
    }

    /// Whether the header-read timeout runs in this phase.
    pub(crate) fn is_timed(self) -> bool {
        matches!(self, Phase::Idle | Phase::Reading | Phase::Handshake)
    }
}

/// The coarse clock shared by every connection: units of [`TICK`] since [`EPOCH`], advanced by
/// the sweepers (`fetch_max`, so several servers agree). Reading it costs one relaxed load
/// instead of a clock read per request.
static COARSE_NOW: AtomicU32 = AtomicU32::new(0);
static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// The unit of the coarse clock.
pub(crate) const TICK: std::time::Duration = std::time::Duration::from_millis(100);

pub(crate) fn coarse_now() -> u32 {
    COARSE_NOW.load(Ordering::Relaxed)
}

/// Advances the coarse clock to now, and returns it.
pub(crate) fn advance_coarse_clock() -> u32 {
    let epoch = EPOCH.get_or_init(std::time::Instant::now);
    let ticks = epoch.elapsed().as_millis() / TICK.as_millis();
    let ticks = u32::try_from(ticks).unwrap_or(u32::MAX);
    COARSE_NOW.fetch_max(ticks, Ordering::Relaxed).max(ticks)
}

/// The control block of one connection, shared by its task, its socket wrapper, its service
/// and the server's registry.
#[derive(Debug)]
pub(crate) struct Conn {
    /// Command and flag bits (see the constants above). Only ever raised.
    pub(crate) ctl: AtomicU32,
    /// The phase (low 8 bits) and the coarse time it began (high 32 bits).
    phase: AtomicU64,
    /// Whether the last write or flush of the socket returned `Pending`: hyper may then hold
    /// bytes it has not written, and the connection must not be taken apart.
    pending_write: AtomicBool,
    /// The connection task's waker, woken when `ctl` changes.
    pub(crate) waker: AtomicWaker,
    /// The socket, for the forced cut and the sweeper. Valid while the connection is in the
    /// registry (see `drain::Registration`).
    pub(crate) fd: RawFd,
    /// A plaintext connection, which a successor can take over.
    pub(crate) passable: bool,
    /// On its way to the successor: neither cut nor timed out here (a shutdown would end it
    /// for the successor too).
    in_flight: AtomicBool,
    pub(crate) info: ConnectionInfo,
}

impl Conn {
    pub(crate) fn new(fd: RawFd, passable: bool, info: ConnectionInfo, ctl: u32) -> Conn {
        Conn {
            ctl: AtomicU32::new(ctl),
            phase: AtomicU64::new(pack(Phase::Idle, coarse_now())),
            pending_write: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            fd,
            passable,
            in_flight: AtomicBool::new(false),
            info,
        }
    }

    pub(crate) fn mark_in_flight(&self, in_flight: bool) {
        self.in_flight.store(in_flight, Ordering::Release);
    }

    pub(crate) fn is_in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Acquire)
    }

    pub(crate) fn phase(&self) -> (Phase, u32) {
        let bits = self.phase.load(Ordering::Relaxed);
        (Phase::from_bits(bits), (bits >> 32) as u32)
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase
            .store(pack(phase, coarse_now()), Ordering::Relaxed);
    }

    fn ctl(&self) -> u32 {
        self.ctl.load(Ordering::Acquire)
    }

    /// Idle between two requests, with everything hyper wrote flushed to the socket.
    fn at_request_boundary(&self) -> bool {
        self.phase().0 == Phase::Idle && !self.pending_write.load(Ordering::Relaxed)
    }
}

fn pack(phase: Phase, tick: u32) -> u64 {
    (u64::from(tick) << 32) | phase as u64
}

// ---------------------------------------------------------------------------------------------
// The socket.

/// An accepted stream socket.
#[derive(Debug)]
pub(crate) enum Sock {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
        }
    }
}

impl Sock {
    /// Peeks at the first bytes without consuming them.
    fn poll_peek(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        match self {
            Sock::Tcp(s) => {
                let mut rb = ReadBuf::new(buf);
                ready!(s.poll_peek(cx, &mut rb))?;
                Poll::Ready(Ok(rb.filled().len()))
            }
            Sock::Unix(s) => loop {
                ready!(s.poll_read_ready(cx))?;
                let peeked = s.try_io(tokio::io::Interest::READABLE, || {
                    rustix::net::recv(s, &mut *buf, rustix::net::RecvFlags::PEEK)
                        .map(|(n, _)| n)
                        .map_err(std::io::Error::from)
                });
                match peeked {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
        }
    }
}

/// A connection's socket: registered for the forced cut and the sweeper, counted by the
/// server's tracker for as long as it exists (in hyper's hands, or the application's after an
/// upgrade), and marking the connection `Reading` when bytes arrive.
#[derive(Debug)]
pub(crate) struct TrackedIo {
    // Declared first, so dropped first: out of the registry before the socket closes (the
    // registry's invariant).
    _registration: Registration,
    conn: Arc<Conn>,
    sock: Sock,
}

impl TrackedIo {
    pub(crate) fn new(registration: Registration, conn: Arc<Conn>, sock: Sock) -> TrackedIo {
        TrackedIo {
            _registration: registration,
            conn,
            sock,
        }
    }

    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Whether bytes wait in the socket's receive queue that nobody has read yet.
    pub(crate) fn bytes_waiting(&self) -> bool {
        rustix::io::ioctl_fionread(&self.sock).is_ok_and(|n| n > 0)
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = match &mut this.sock {
            Sock::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Sock::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        if buf.filled().len() > before && this.conn.phase().0 == Phase::Idle {
            this.conn.set_phase(Phase::Reading);
        }
        result
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = match &mut this.sock {
            Sock::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Sock::Unix(s) => Pin::new(s).poll_write(cx, buf),
        };
        this.conn.note_write(result.is_pending());
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = match &mut this.sock {
            Sock::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Sock::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        };
        this.conn.note_write(result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        match &self.sock {
            Sock::Tcp(s) => s.is_write_vectored(),
            Sock::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let result = match &mut this.sock {
            Sock::Tcp(s) => Pin::new(s).poll_flush(cx),
            Sock::Unix(s) => Pin::new(s).poll_flush(cx),
        };
        this.conn.note_write(result.is_pending());
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.sock {
            Sock::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Sock::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Conn {
    fn note_write(&self, pending: bool) {
        // Written only when it changes: the common case (writes that complete) stays a load.
        if self.pending_write.load(Ordering::Relaxed) != pending {
            self.pending_write.store(pending, Ordering::Relaxed);
        }
    }
}

impl AsFd for TrackedIo {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// What sits under hyper: the tracked socket, or a TLS session over it.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The connection's control block.
    fn conn(&self) -> &Arc<Conn>;

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
    fn conn(&self) -> &Arc<Conn> {
        &self.conn
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

/// A transport with bytes to deliver before its own: what hyper had read on a connection taken
/// apart, or what the previous process had read on a connection it passed over.
#[derive(Debug)]
pub(crate) struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub(crate) fn new(prefix: Bytes, inner: T) -> Prefixed<T> {
        Prefixed { prefix, inner }
    }

    /// The bytes not delivered yet, and the transport.
    pub(crate) fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// The service and body wrappers.

/// The application's service, as hyper calls it: marks the connection busy, puts the
/// connection's information in the request, and gives HTTP/1 responses `Connection: close`
/// when the server asks for it.
pub(crate) struct DrainAware<S> {
    // Boxed so that this type is `Unpin` whatever the service is: hyper's connection must be
    // `Unpin` to be taken apart (`into_parts` takes it by value).
    inner: Box<S>,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
    /// What every request of the connection carries, made once: a request gets a clone (a copy
    /// of a one-entry table), cheaper than building the map anew for each. `None`: nothing
    /// (`Server::connection_info(false)`).
    extensions: Option<hyper::http::Extensions>,
}

impl<S> DrainAware<S> {
    pub(crate) fn new(service: S, conn: Arc<Conn>, shared: Arc<Shared>) -> DrainAware<S> {
        let extensions = shared.connection_info.then(|| {
            let mut extensions = hyper::http::Extensions::new();
            #[cfg(feature = "axum")]
            if let Some(addr) = conn.info.peer_addr() {
                extensions.insert(axum::extract::ConnectInfo(addr));
            }
            extensions.insert(conn.info.clone());
            extensions
        });
        DrainAware {
            inner: Box::new(service),
            conn,
            shared,
            extensions,
        }
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for DrainAware<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = BoxError;
    type Future = DrainAwareFuture<Call<S>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let http1 = req.version() < Version::HTTP_2;
        if http1 {
            self.conn.set_phase(Phase::Busy);
        }
        if self.conn.ctl.load(Ordering::Relaxed) & STOPPING != 0 {
            self.shared.count_request_while_stopping();
        }
        if let Some(extensions) = &self.extensions {
            req.extensions_mut().extend(extensions.clone());
        }
        DrainAwareFuture {
            connect: req.method() == Method::CONNECT,
            inner: Call::new((*self.inner).clone(), req),
            // Only HTTP/1 responses need the check and the body tracking; HTTP/2 has GOAWAY.
            conn: http1.then(|| Arc::clone(&self.conn)),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call of a tower service: `poll_ready`, then `call`, as tower's contract asks.
    ///
    /// Most services are always ready (a router, a `service_fn`): their readiness is asked
    /// at once, with a waker that does nothing, and the call made on the spot, so that the
    /// request is not stored and moved in a future of ours first (`tower::util::Oneshot` moves
    /// it several times per request). A service that is not ready is asked again from this
    /// future, with the task's waker (the state for that rare case is boxed, so it does not
    /// make every call's future larger).
    #[project = CallProj]
    pub(crate) enum Call<S>
    where
        S: tower_service::Service<Request<Incoming>>,
    {
        Called { #[pin] fut: S::Future },
        NotReady { state: Option<Box<(S, Request<Incoming>)>> },
        Failed { error: Option<BoxError> },
    }
}

impl<S> Call<S>
where
    S: tower_service::Service<Request<Incoming>>,
    S::Error: Into<BoxError>,
{
    fn new(mut svc: S, req: Request<Incoming>) -> Call<S> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match svc.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Call::Called { fut: svc.call(req) },
            Poll::Ready(Err(e)) => Call::Failed {
                error: Some(e.into()),
            },
            Poll::Pending => Call::NotReady {
                state: Some(Box::new((svc, req))),
            },
        }
    }
}

impl<S> Future for Call<S>
where
    S: tower_service::Service<Request<Incoming>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                CallProj::Called { fut } => return fut.poll(cx).map_err(Into::into),
                CallProj::Failed { error } => match error.take() {
                    Some(e) => return Poll::Ready(Err(e)),
                    None => return Poll::Pending,
                },
                CallProj::NotReady { state } => {
                    let Some(pending) = state.as_mut() else {
                        return Poll::Pending;
                    };
                    if let Err(e) = ready!(pending.0.poll_ready(cx)) {
                        self.set(Call::Failed {
                            error: Some(e.into()),
                        });
                        continue;
                    }
                    let Some(pending) = state.take() else {
                        return Poll::Pending;
                    };
                    let (mut svc, req) = *pending;
                    let fut = svc.call(req);
                    self.set(Call::Called { fut });
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`DrainAware`].
    pub(crate) struct DrainAwareFuture<F> {
        #[pin]
        inner: F,
        conn: Option<Arc<Conn>>,
        connect: bool,
    }
}

impl<F, B, E> Future for DrainAwareFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            Err(e) => {
                // hyper closes the connection on a service error; no phase to keep.
                return Poll::Ready(Err(e));
            }
        };
        let conn = this.conn.take();
        if let Some(conn) = &conn {
            // Not on an upgrade (101, or a CONNECT tunnel): `Connection: close` there would
            // contradict `Connection: upgrade`, and the client must reject it (RFC 6455 4.1).
            // Upgraded connections are tracked anyway and cut at the deadline.
            let upgrade = response.status() == StatusCode::SWITCHING_PROTOCOLS
                || (*this.connect && response.status().is_success());
            if upgrade {
                conn.set_phase(Phase::Upgraded);
            } else if conn.ctl.load(Ordering::Relaxed) & CLOSE_RESPONSES != 0 {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        Poll::Ready(Ok(response.map(|inner| TrackedBody {
            inner,
            done: BodyDone(conn),
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body; marks the connection idle when hyper is done with it.
    pub(crate) struct TrackedBody<B> {
        #[pin]
        inner: B,
        done: BodyDone,
    }
}

/// Marks the connection idle when dropped (hyper drops a response body once it has written
/// it, or when the connection ends).
pub(crate) struct BodyDone(Option<Arc<Conn>>);

impl Drop for BodyDone {
    fn drop(&mut self) {
        if let Some(conn) = &self.0 {
            if conn.phase().0 == Phase::Busy {
                conn.set_phase(Phase::Idle);
            }
        }
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------------------------
// Driving a connection.

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

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves a plaintext connection until it ends, is cut, or is passed on: HTTP/2 (prior
/// knowledge) or HTTP/1 by its first bytes; `read` are bytes already read from it (by the
/// previous process), which means HTTP/1.
pub(crate) async fn serve_plain<S, B>(
    io: TrackedIo,
    read: Bytes,
    service: S,
    http: Arc<Http>,
    shared: Arc<Shared>,
    hand_off: HandOffSlot,
) where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let conn = Arc::clone(io.conn());
    let h2 = if read.is_empty() {
        match (Detect {
            io: &io,
            retry: None,
        })
        .await
        {
            Detected::H1 => false,
            Detected::H2 => true,
            Detected::Gone => return,
            Detected::Idle(bits) => {
                // Nothing was sent on it yet: pass it on as it is, or close it.
                if bits & HAND_OFF != 0 && conn.passable {
                    match pass(&hand_off, io, Bytes::new()).await {
                        Ok(()) => return,
                        Err((back, _)) => return close(back).await,
                    }
                }
                return close(io).await;
            }
        }
    } else {
        false
    };
    serve_known(io, read, h2, service, http, shared, hand_off).await;
}

/// Serves a connection whose protocol is known (HTTP/2 if `h2`, else HTTP/1), over any
/// transport, until it ends, is cut, or is passed on: the part plaintext and TLS connections
/// share. `read` are bytes already read from it, to deliver first (HTTP/1 only).
pub(crate) async fn serve_known<T, S, B>(
    io: T,
    read: Bytes,
    h2: bool,
    service: S,
    http: Arc<Http>,
    shared: Arc<Shared>,
    hand_off: HandOffSlot,
) where
    T: Transport,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let conn = Arc::clone(io.conn());
    if h2 {
        debug_assert!(read.is_empty(), "BUG: read-ahead bytes are HTTP/1's");
        conn.set_phase(Phase::H2);
        let svc = DrainAware::new(service, Arc::clone(&conn), shared);
        let c = http.h2.serve_connection(TokioIo::new(io), svc);
        return drive_h2(c, &conn).await;
    }
    let mut io = Prefixed::new(read, io);
    // Cleared once a hand-off of this connection failed: it is then served here to the end.
    let mut ignore = if conn.passable { 0 } else { HAND_OFF };
    loop {
        let svc = DrainAware::new(service.clone(), Arc::clone(&conn), Arc::clone(&shared));
        let c = http
            .h1
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        let drive = DriveH1 {
            conn: &conn,
            c: Some(c),
            ignore,
        };
        let Some((taken, read, bits)) = drive.await else {
            return;
        };
        let mut transport = taken.inner;
        let read = join(taken.prefix, read);
        if bits & HAND_OFF != 0 {
            match transport.pass(&hand_off, read).await {
                Ok(()) => return,
                Err((back, read)) => {
                    // Not passed after all (the successor's channel failed, or too much
                    // read-ahead): served here to the end, as without a successor that takes
                    // connections: `Connection: close` now, closed when idle a grace later.
                    ignore |= HAND_OFF;
                    conn.ctl.fetch_or(CLOSE_RESPONSES, Ordering::Release);
                    close_idle_later(&conn, shared.fallback_grace());
                    io = Prefixed::new(read, back);
                    continue;
                }
            }
        }
        if read.is_empty() && !transport.bytes_waiting() {
            return close(transport).await;
        }
        // A request is on its way after all: answer it (with `Connection: close`).
        io = Prefixed::new(read, transport);
    }
}

/// Raises `CLOSE_IDLE` on `conn` once `grace` is over.
fn close_idle_later(conn: &Arc<Conn>, grace: std::time::Duration) {
    let conn = Arc::clone(conn);
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        conn.ctl.fetch_or(CLOSE_IDLE, Ordering::Release);
        conn.waker.wake();
    });
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

enum Detected {
    H1,
    H2,
    /// Closed, or cut.
    Gone,
    /// Still nothing received, and the server wants idle connections closed or passed.
    Idle(u32),
}

/// Waits for the first bytes of a connection to tell HTTP/2's preface from HTTP/1.
struct Detect<'a> {
    io: &'a TrackedIo,
    /// Set while the first bytes are a strict prefix of the preface (`P`, `PR`): the socket
    /// stays readable then, so wait a little instead of spinning.
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for Detect<'_> {
    type Output = Detected;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Detected> {
        let conn = self.io.conn();
        conn.waker.register(cx.waker());
        let bits = conn.ctl();
        if bits & CUT != 0 {
            return Poll::Ready(Detected::Gone);
        }
        if let Some(retry) = self.retry.as_mut() {
            ready!(retry.as_mut().poll(cx));
            self.retry = None;
        }
        let mut buf = [0u8; 3];
        match self.io.sock.poll_peek(cx, &mut buf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Detected::Gone),
            Poll::Ready(Ok(n)) if buf[..n] != H2_PREFACE[..n] => Poll::Ready(Detected::H1),
            // `PRI` is no HTTP/1 method (RFC 9113 3.4 reserves it): the rest of the preface is
            // hyper's to read and check.
            Poll::Ready(Ok(3)) => Poll::Ready(Detected::H2),
            Poll::Ready(Ok(_)) => {
                let mut retry = Box::pin(tokio::time::sleep(std::time::Duration::from_millis(5)));
                if retry.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                }
                self.retry = Some(retry);
                Poll::Pending
            }
            Poll::Pending if bits & (CLOSE_IDLE | HAND_OFF) != 0 => {
                Poll::Ready(Detected::Idle(bits))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// hyper's HTTP/1 connection, as a connection task drives it and takes it apart.
trait H1: Future<Output = hyper::Result<()>> + Unpin {
    type Io;
    /// The transport and the bytes hyper had read that no request consumed; `None` if the
    /// connection was upgraded.
    fn into_parts(self) -> Option<(Self::Io, Bytes)>;
}

impl<T, S, B> H1
    for hyper::server::conn::http1::UpgradeableConnection<TokioIo<Prefixed<T>>, DrainAware<S>>
where
    T: Transport,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Io = Prefixed<T>;

    fn into_parts(self) -> Option<(Prefixed<T>, Bytes)> {
        hyper::server::conn::http1::UpgradeableConnection::into_parts(self)
            .map(|parts| (parts.io.into_inner(), parts.read_buf))
    }
}

/// Drives an HTTP/1 connection; takes it apart at a request boundary when the server asks
/// (`CLOSE_IDLE` or `HAND_OFF`), returning the transport, the bytes hyper had read, and the
/// bits that asked.
struct DriveH1<'a, C> {
    conn: &'a Conn,
    c: Option<C>,
    /// Bits not to act upon (`HAND_OFF` where the connection cannot be passed).
    ignore: u32,
}

impl<C: H1> Future for DriveH1<'_, C> {
    type Output = Option<(C::Io, Bytes, u32)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        this.conn.waker.register(cx.waker());
        let bits = this.conn.ctl();
        if bits & CUT != 0 {
            return Poll::Ready(None);
        }
        let want = bits & (CLOSE_IDLE | HAND_OFF) & !this.ignore;
        let Some(c) = this.c.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(result) = Pin::new(c).poll(cx) {
            if let Err(e) = result {
                log_end(e.into());
            }
            return Poll::Ready(None);
        }
        if want != 0 && this.conn.at_request_boundary() {
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

/// Drives an HTTP/2 connection: GOAWAY (hyper's graceful shutdown) as soon as the server
/// drains, dropped when it cuts.
async fn drive_h2<C>(c: C, conn: &Conn)
where
    C: Future<Output = hyper::Result<()>> + GracefulShutdown,
{
    let mut c = std::pin::pin!(c);
    let mut shutting_down = false;
    std::future::poll_fn(|cx| {
        conn.waker.register(cx.waker());
        let bits = conn.ctl();
        if bits & CUT != 0 {
            return Poll::Ready(());
        }
        if !shutting_down && bits & (DRAIN | CLOSE_IDLE | HAND_OFF) != 0 {
            shutting_down = true;
            c.as_mut().graceful_shutdown();
        }
        match c.as_mut().poll(cx) {
            Poll::Ready(Err(e)) => {
                log_end(e.into());
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// hyper's graceful shutdown, for the connection types that have one.
pub(crate) trait GracefulShutdown {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B, E> GracefulShutdown for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

pub(crate) fn log_end(e: BoxError) {
    // Clients resetting or timing out is routine; it is not the server's error.
    tracing::debug!(error = %e, "connection ended with an error");
}

impl AsRawFd for TrackedIo {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_fd().as_raw_fd()
    }
}
