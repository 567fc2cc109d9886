//! Serve connections so that they can be drained: finished gracefully, or cut at a deadline.
//!
//! # The rule
//! After [`Connections::drain`] starts, no request that a client has sent is left without a
//! response, unless the deadline passes first:
//! - HTTP/1 responses carry `Connection: close` from then on, so a busy keep-alive client gets
//!   the answer to the request it sent, and sends its next request on a new connection (to the
//!   new process, after a restart). Calling hyper's `graceful_shutdown` at once would instead
//!   close a connection that *looks* idle while the client's next request is already on the wire.
//! - Connections idle at drain start get a short grace ([`crate::Serve::keep_alive_grace`]),
//!   then hyper's graceful shutdown, which closes them if still idle.
//! - HTTP/2 connections get GOAWAY at once (the protocol lets in-flight streams finish and tells
//!   the client which ones to retry).
//! - At the deadline every connection task still running is dropped, which closes its socket,
//!   and counted as cut. This also covers what ignores graceful shutdown (a connection still
//!   sending its request head, a client that never reads).
//!
//! Open connections are the live tasks of a [`TaskTracker`]: state is derived, not counted by
//! hand, and waiting for the last one is an event, not a poll loop.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue};
use hyper::{Request, Response, Version};
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    keep_alive_grace: Duration,
}

#[derive(Debug, Default)]
struct Shared {
    /// Set when draining starts; read by every HTTP/1 response on its way out.
    draining: AtomicBool,
    /// Connection tasks that were still running when they were cut.
    cut: AtomicUsize,
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    pub(crate) open_at_start: usize,
    pub(crate) cut: usize,
}

impl Connections {
    pub(crate) fn new(keep_alive_grace: Duration) -> Connections {
        Connections {
            tracker: TaskTracker::new(),
            shared: Arc::new(Shared::default()),
            drain: CancellationToken::new(),
            force: CancellationToken::new(),
            keep_alive_grace,
        }
    }

    /// The token that cuts every connection when cancelled.
    pub(crate) fn force(&self) -> &CancellationToken {
        &self.force
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
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
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
        let grace = self.keep_alive_grace;
        self.tracker.spawn(async move {
            let service = DrainAware {
                inner: TowerToHyperService::new(service),
                conn: Arc::clone(&conn),
            };
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut connection = pin!(connection);
            tokio::select! {
                biased;
                () = force.cancelled() => return conn.shared.cut(),
                result = connection.as_mut() => return log_end(result),
                () = drain.cancelled() => {}
            }
            if !conn.h2.load(Ordering::Relaxed) {
                // HTTP/1 (or nothing read yet): responses now say `Connection: close`; give an
                // idle keep-alive client a moment to send what it may be sending.
                tokio::select! {
                    biased;
                    () = force.cancelled() => return conn.shared.cut(),
                    result = connection.as_mut() => return log_end(result),
                    () = tokio::time::sleep(grace) => {}
                }
            }
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                biased;
                () = force.cancelled() => conn.shared.cut(),
                result = connection.as_mut() => log_end(result),
            }
        });
    }

    /// Drains: stops keep-alive, sends GOAWAY, waits for the last connection to close, and cuts
    /// what is left at `deadline` (or when [`Connections::force`] is cancelled).
    /// `progress` is called about once a second with the number of connections left.
    pub(crate) async fn drain(
        &self,
        deadline: Instant,
        mut progress: impl FnMut(usize),
    ) -> Drained {
        let open_at_start = self.tracker.len();
        self.shared.draining.store(true, Ordering::Relaxed);
        self.tracker.close();
        self.drain.cancel();
        let mut tick = tokio::time::interval_at(
            Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let mut wait = pin!(self.tracker.wait());
        loop {
            tokio::select! {
                () = &mut wait => break,
                () = tokio::time::sleep_until(deadline), if !self.force.is_cancelled() => {
                    tracing::warn!(open = self.tracker.len(), "drain timeout reached: cutting the connections still open");
                    self.force.cancel();
                }
                _ = tick.tick() => progress(self.tracker.len()),
            }
        }
        let cut = self.shared.cut.load(Ordering::Relaxed);
        Drained { open_at_start, cut }
    }
}

impl Shared {
    fn cut(&self) {
        self.cut.fetch_add(1, Ordering::Relaxed);
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
            if conn.shared.draining.load(Ordering::Relaxed) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        Poll::Ready(result)
    }
}
