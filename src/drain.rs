//! Serve connections so that they can be drained: finished gracefully, or cut at a deadline.
//!
//! # The rule
//! After [`Connections::drain`] starts, every request a server has begun to read gets its
//! response (unless the deadline passes first), and a busy keep-alive client is never cut
//! between two requests:
//! - HTTP/1 responses carry `Connection: close` from then on, so a busy keep-alive client gets
//!   the answer to the request it sent, and sends its next request on a new connection (to the
//!   new process, after a restart). Calling hyper's `graceful_shutdown` at once would instead
//!   close a connection that *looks* idle while the client's next request is already on the wire.
//! - Connections idle at drain start get a grace ([`crate::Serve::keep_alive_grace`], longer
//!   after a hand-off: [`crate::Serve::restart_keep_alive_grace`]), then hyper's graceful
//!   shutdown, which closes them if still idle. A client that sends within the grace gets its
//!   answer (with `Connection: close`). This is the one race HTTP/1 leaves open (RFC 9112
//!   9.3.1): a client that sends on a connection idle for the whole grace, at the very moment
//!   it is closed, must retry; the grace makes it rare, not impossible.
//! - HTTP/2 connections get GOAWAY at once (the protocol lets in-flight streams finish and tells
//!   the client which ones to retry).
//! - At the deadline every connection task still running is dropped, which closes its socket,
//!   and counted as cut. This also covers what ignores graceful shutdown (a connection still
//!   sending its request head, a client that never reads).
//!
//! Open connections are the live sockets of a [`TaskTracker`] (each holds a token): state is
//! derived, not counted by hand, waiting for the last one is an event, not a poll loop, and a
//! connection upgraded to WebSocket still counts, and is still cut at the deadline.

use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

use crate::sys::SocketRegistry;

use crate::BoxError;

/// The connections of one server, and the switches that drain them.
#[derive(Debug)]
pub(crate) struct Connections {
    tracker: TaskTracker,
    shared: Arc<Shared>,
    /// Cancelled when draining starts.
    drain: CancellationToken,
    /// Cancelled when what is left must be cut now.
    force: CancellationToken,
}

#[derive(Debug, Default)]
struct Shared {
    /// Set when draining starts; read by every HTTP/1 response on its way out.
    draining: AtomicBool,
    /// Every open connection's socket, upgraded ones included: what a forced cut shuts down.
    sockets: SocketRegistry,
    /// How many connections the cut found open; `None` until it happened.
    cut: std::sync::Mutex<Option<usize>>,
    /// The keep-alive grace of this drain, in microseconds; set before `drain` is cancelled.
    grace_us: std::sync::atomic::AtomicU64,
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    pub(crate) open_at_start: usize,
    pub(crate) cut: usize,
}

impl Connections {
    pub(crate) fn new() -> Connections {
        Connections {
            tracker: TaskTracker::new(),
            shared: Arc::new(Shared::default()),
            drain: CancellationToken::new(),
            force: CancellationToken::new(),
        }
    }

    /// Cancelled once [`Connections::cut`] has happened.
    pub(crate) fn force(&self) -> &CancellationToken {
        &self.force
    }

    /// Cuts every open connection now, upgraded ones included, and returns how many there
    /// were. Counted at the moment of the cut, before any connection task can react to it;
    /// later calls change nothing and return the same number.
    pub(crate) fn cut(&self) -> usize {
        let mut cut = self.shared.cut.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = *cut {
            return n;
        }
        let n = self.shared.sockets.shutdown_all();
        *cut = Some(n);
        // Tasks still holding a connection drop it at their next poll.
        self.force.cancel();
        n
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.tracker.len()
    }

    /// Serves one accepted connection on a task of its own.
    pub(crate) fn spawn<I, S, B>(
        &self,
        io: I,
        service: S,
        builder: &Arc<auto::Builder<hyper_util::rt::TokioExecutor>>,
    ) where
        I: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let builder = Arc::clone(builder);
        let conn = Arc::new(ConnFlags {
            h2: AtomicBool::new(false),
            shared: Arc::clone(&self.shared),
        });
        let drain = self.drain.clone();
        let force = self.force.clone();
        let io = TrackedIo {
            registration: Registration {
                id: self.shared.sockets.register(io.as_fd()),
                shared: Arc::clone(&self.shared),
                _token: self.tracker.token(),
            },
            io,
        };
        // The task is not tracked itself: its socket is (the token in `TrackedIo`), which
        // counts each connection once, and keeps counting it after an upgrade.
        tokio::spawn(async move {
            let service = DrainAware {
                inner: TowerToHyperService::new(service),
                conn: Arc::clone(&conn),
            };
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut connection = pin!(connection);
            // A forced cut drops the connection (closing its socket); it is counted by
            // `Connections::cut_all`, which also reaches upgraded connections.
            tokio::select! {
                result = connection.as_mut() => return log_end(result),
                () = force.cancelled() => return,
                () = drain.cancelled() => {}
            }
            if !conn.h2.load(Ordering::Relaxed) {
                // HTTP/1 (or nothing read yet): responses now say `Connection: close`; give an
                // idle keep-alive client a moment to send what it may be sending.
                tokio::select! {
                    result = connection.as_mut() => return log_end(result),
                    () = force.cancelled() => return,
                    () = tokio::time::sleep(conn.shared.grace()) => {}
                }
            }
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => log_end(result),
                () = force.cancelled() => {}
            }
        });
    }

    /// Drains: stops keep-alive, sends GOAWAY, waits for the last connection to close, and cuts
    /// what is left at `deadline` (or as soon as [`Connections::force`] is cancelled).
    /// `progress` is called about once a second with the number of connections left.
    pub(crate) async fn drain(
        &self,
        deadline: Instant,
        keep_alive_grace: Duration,
        mut progress: impl FnMut(usize),
    ) -> Drained {
        let open_at_start = self.tracker.len();
        let grace_us = u64::try_from(keep_alive_grace.as_micros()).unwrap_or(u64::MAX);
        // Ordered before the cancel below, which is what the connection tasks wait on.
        self.shared.grace_us.store(grace_us, Ordering::Release);
        self.shared.draining.store(true, Ordering::Relaxed);
        self.tracker.close();
        self.drain.cancel();
        let mut tick = tokio::time::interval_at(
            Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let mut wait = pin!(self.tracker.wait());
        // After a cut, connection tasks end at their next poll; one that does not (a handler
        // blocking its thread) must not hold the process past its deadline for ever.
        let mut give_up = None;
        loop {
            tokio::select! {
                biased;
                () = &mut wait => break,
                () = self.force.cancelled(), if give_up.is_none() => {
                    give_up = Some(Instant::now() + Duration::from_secs(1));
                }
                () = tokio::time::sleep_until(deadline), if give_up.is_none() => {
                    tracing::warn!(open = self.tracker.len(), "drain timeout reached: cutting the connections still open");
                    self.cut();
                }
                () = sleep_until_some(give_up) => {
                    tracing::error!(
                        stuck = self.tracker.len(),
                        "connections still not closed 1 s after being cut (a handler blocking its thread?); not waiting for them"
                    );
                    break;
                }
                _ = tick.tick() => progress(self.tracker.len()),
            }
        }
        let cut = self
            .shared
            .cut
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(0);
        Drained { open_at_start, cut }
    }
}

impl Shared {
    fn grace(&self) -> Duration {
        Duration::from_micros(self.grace_us.load(Ordering::Acquire))
    }
}

async fn sleep_until_some(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

fn log_end(result: Result<(), BoxError>) {
    if let Err(e) = result {
        // Clients resetting or timing out is routine; it is not the server's error.
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Per-connection state shared between the connection task and its service.
#[derive(Debug)]
struct ConnFlags {
    /// Set by the first HTTP/2 request: the connection can be sent GOAWAY at once.
    h2: AtomicBool,
    shared: Arc<Shared>,
}

/// The user's service, adding `Connection: close` to HTTP/1 responses once draining started.
#[derive(Debug)]
struct DrainAware<S> {
    inner: TowerToHyperService<S>,
    conn: Arc<ConnFlags>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for DrainAware<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future =
        DrainAwareFuture<hyper_util::service::TowerToHyperServiceFuture<S, Request<Incoming>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let http1 = req.version() < Version::HTTP_2;
        if !http1 {
            self.conn.h2.store(true, Ordering::Relaxed);
        }
        DrainAwareFuture {
            connect: req.method() == Method::CONNECT,
            inner: self.inner.call(req),
            // Only HTTP/1 responses need the check; HTTP/2 has GOAWAY instead.
            conn: http1.then(|| Arc::clone(&self.conn)),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`DrainAware`].
    struct DrainAwareFuture<F> {
        #[pin]
        inner: F,
        conn: Option<Arc<ConnFlags>>,
        connect: bool,
    }
}

impl<F, B, E> Future for DrainAwareFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx));
        if let (Ok(response), Some(conn)) = (&mut result, this.conn.as_ref()) {
            // Not on an upgrade (101, or a CONNECT tunnel): `Connection: close` there would
            // contradict `Connection: upgrade`, and the client must reject it (RFC 6455 4.1).
            // Upgraded connections are tracked anyway and cut at the deadline.
            let upgrade = response.status() == StatusCode::SWITCHING_PROTOCOLS
                || (*this.connect && response.status().is_success());
            if !upgrade && conn.shared.draining.load(Ordering::Relaxed) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        Poll::Ready(result)
    }
}

pin_project_lite::pin_project! {
    /// A connection's socket, registered for a forced cut and counted by the tracker for as long
    /// as it exists: in hyper's hands, or in the application's after an upgrade.
    struct TrackedIo<I> {
        // Declared first, so dropped first: deregistered before the socket closes (the
        // registry's invariant).
        registration: Registration,
        #[pin]
        io: I,
    }
}

#[derive(Debug)]
struct Registration {
    id: u64,
    shared: Arc<Shared>,
    _token: TaskTrackerToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.sockets.deregister(self.id);
    }
}

impl<I: AsyncRead> AsyncRead for TrackedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for TrackedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

impl<I: AsFd> AsFd for TrackedIo<I> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.io.as_fd()
    }
}
