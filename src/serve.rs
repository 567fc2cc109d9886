//! Serve: accept on every listener, react to signals, restart, and shut down in order.
//!
//! The lifecycle, in the order data flows through the crate:
//! 1. listeners ([`crate::Listeners`]) are registered with the runtime and accepted on;
//! 2. `READY=1` is reported once they are;
//! 3. close signals end serving; restart signals start a [`crate::restart`] hand-off, which
//!    either hands over (and serving ends) or fails (and serving goes on untouched);
//! 4. shutdown: stop accepting, `STOPPING=1` (not after a hand-off: the new process is the
//!    service now), run the hooks in order, drain the connections, return.
//!
//! Hooks and drain share one deadline, [`Serve::drain_timeout`] after the shutdown started. A
//! second close signal during shutdown cuts everything at once.

use std::future::{Future, IntoFuture};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::BoxError;
use crate::drain::Connections;
use crate::error::Error;
use crate::hooks::{self, Hook, HooksReport};
use crate::listen::{self, Listener, Listeners, Socket};
use crate::notify::{Notifier, NotifyState};
use crate::restart::Restarting;
use crate::signals::{self, Event, SignalEvents};
use crate::startup;

/// Serves `service` on `listeners` until a close signal, or until a restart has handed the
/// listeners to a new process; then drains and returns.
///
/// The close and restart signals are handled from the moment serving starts (before that,
/// they have their default action: `SIGUSR1` would end the process). Once handled they stay
/// handled by the process, also after `serve` returns (signal-hook does not restore default
/// dispositions), so return from `main` once it is done.
///
/// As PID 1 of a PID namespace (a container without an init), a hand-off does not end the
/// process: after the drain, `serve` never returns, and the process stays on as its
/// successors' init, exiting with the serving process's exit status.
///
/// `service` is any `tower::Service` (an `axum::Router`, a `tower::service_fn`, ...) that can
/// be cloned per connection. HTTP/1.1 and HTTP/2 (prior knowledge) are served on the same
/// listeners. Configure with the builder methods of [`Serve`], then `.await` it.
///
/// # Example
/// ```no_run
/// use std::convert::Infallible;
/// use std::time::Duration;
///
/// # async fn example(listeners: handover::Listeners) -> Result<(), handover::Error> {
/// let app = tower::service_fn(|_req| async {
///     Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
///         bytes::Bytes::from("Hello world"),
///     )))
/// });
/// let shutdown = handover::serve(listeners, app)
///     .drain_timeout(Duration::from_secs(3))
///     .on_shutdown(|| println!("closing the database"))
///     .await?;
/// println!("server closed: {:?}", shutdown.reason);
/// # Ok(())
/// # }
/// ```
pub fn serve<S>(listeners: impl Into<Listeners>, service: S) -> Serve<S> {
    Serve {
        listeners: listeners.into(),
        service,
        close_signals: vec![libc::SIGINT, libc::SIGTERM],
        restart_signals: vec![libc::SIGUSR1, libc::SIGUSR2],
        drain_timeout: Duration::from_secs(5),
        ready_timeout: Duration::from_secs(10),
        keep_alive_grace: Duration::from_millis(100),
        restart_keep_alive_grace: Duration::from_secs(1),
        header_read_timeout: Duration::from_secs(30),
        fd_store: false,
        hooks: Vec::new(),
        shutdown_signal: None,
    }
}

/// A server being configured; `.await` it to run. Made by [`serve`].
#[must_use = "a Serve does nothing until it is awaited"]
pub struct Serve<S> {
    listeners: Listeners,
    service: S,
    close_signals: Vec<i32>,
    restart_signals: Vec<i32>,
    drain_timeout: Duration,
    ready_timeout: Duration,
    keep_alive_grace: Duration,
    restart_keep_alive_grace: Duration,
    header_read_timeout: Duration,
    fd_store: bool,
    hooks: Vec<Hook>,
    shutdown_signal: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<S> std::fmt::Debug for Serve<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve")
            .field("listeners", &self.listeners)
            .field("close_signals", &self.close_signals)
            .field("restart_signals", &self.restart_signals)
            .field("drain_timeout", &self.drain_timeout)
            .field("ready_timeout", &self.ready_timeout)
            .field("keep_alive_grace", &self.keep_alive_grace)
            .field("restart_keep_alive_grace", &self.restart_keep_alive_grace)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("fd_store", &self.fd_store)
            .field("with_graceful_shutdown", &self.shutdown_signal.is_some())
            .field("hooks", &self.hooks.len())
            .finish_non_exhaustive()
    }
}

/// Why serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// A close signal (its number) was received.
    Signal(i32),
    /// The future given to [`Serve::with_graceful_shutdown`] completed.
    Requested,
    /// A restart handed the listeners over to the new process with this pid.
    HandedOver {
        /// The pid of the new process, now serving.
        pid: u32,
    },
}

/// A graceful end: what the Go original calls `ErrServerClosed`, with what happened.
///
/// Returned only once draining is over, so returning from `main` after it loses nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Shutdown {
    /// Why serving ended.
    pub reason: Reason,
    /// How the shutdown hooks went.
    pub hooks: HooksReport,
    /// Connections open when the drain started.
    pub drained: usize,
    /// Connections cut at the deadline (or by a second close signal) instead of finishing.
    pub cut: usize,
    /// Whether a second close signal forced the shutdown.
    pub forced: bool,
    /// From the start of the shutdown to the last connection closed.
    pub elapsed: Duration,
}

impl<S> Serve<S> {
    /// The signals that shut down (default `SIGINT`, `SIGTERM`). Replaces the previous set. A
    /// signal in both sets shuts down. Under systemd keep `SIGTERM` here (or set `KillSignal=`
    /// to one of these): an unhandled `SIGTERM` kills the process without a drain.
    pub fn close_signals(mut self, signals: impl IntoIterator<Item = i32>) -> Self {
        self.close_signals = signals.into_iter().collect();
        self
    }

    /// The signals that restart (default `SIGUSR1`, `SIGUSR2`). Replaces the previous set;
    /// an empty set disables restarts.
    pub fn restart_signals(mut self, signals: impl IntoIterator<Item = i32>) -> Self {
        self.restart_signals = signals.into_iter().collect();
        self
    }

    /// How long the shutdown may take, hooks and drain together (default 5 s). At the end,
    /// connections still open are cut, and counted in [`Shutdown::cut`].
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How long a restarted process has to report `READY=1` (default 10 s) before it is killed
    /// and this one carries on.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long an HTTP/1 keep-alive connection that is idle when a shutdown's drain starts is
    /// kept open, in case its client is sending a request right now (default 100 ms). Busy
    /// connections are closed after their next response instead, which carries
    /// `Connection: close`. Short, because a stopping service should stop quickly.
    pub fn keep_alive_grace(mut self, grace: Duration) -> Self {
        self.keep_alive_grace = grace;
        self
    }

    /// The same after a hand-off to a new process (default 1 s): nothing hurries the old
    /// process then, and every keep-alive client that sends within the grace is answered and
    /// moves to the new process without ever seeing a closed connection. Clients idle for
    /// longer must retry their next request (HTTP/1 cannot do better; see the crate docs).
    pub fn restart_keep_alive_grace(mut self, grace: Duration) -> Self {
        self.restart_keep_alive_grace = grace;
        self
    }

    /// How long a client may take to send a request head (default 30 s); a slow client
    /// cannot hold a connection open longer than this, nor a drain longer than its deadline.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Also hand the listeners this process bound itself to systemd's fd store (`FDSTORE=1`,
    /// `FDNAME=` the listener's name), so that a `systemctl restart` or a crash does not close
    /// them: the next start gets them back through `LISTEN_FDS`. Needs
    /// `FileDescriptorStoreMax=` in the service. Inherited listeners are never stored: they
    /// belong to a socket unit, or came out of the store already. Default off.
    pub fn fd_store(mut self, enabled: bool) -> Self {
        self.fd_store = enabled;
        self
    }

    /// Adds a shutdown hook. Hooks run in the order they were added, each to completion, after
    /// the listeners stop accepting and before the connections are drained (as in the Go
    /// original: requests already being served go on meanwhile, so release what they still
    /// need after `serve(..).await` returns, not here). They also run in the old process after
    /// a hand-off (see [`Shutdown::reason`]), so they must not undo what the new process
    /// uses (a pid file, a registration). A sync hook runs on a thread of its own, inside the
    /// serving runtime's context.
    pub fn on_shutdown(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.hooks.push(Hook::sync(hook));
        self
    }

    /// Adds an async shutdown hook; see [`Serve::on_shutdown`].
    pub fn on_shutdown_async<F, Fut>(mut self, hook: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.hooks.push(Hook::future(hook));
        self
    }

    /// Also shut down when `signal` completes, as with axum's `with_graceful_shutdown`.
    pub fn with_graceful_shutdown(
        mut self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        self.shutdown_signal = Some(Box::pin(signal));
        self
    }
}

impl<S, B> IntoFuture for Serve<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Result<Shutdown, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Shutdown, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl<S, B> Serve<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    async fn run(self) -> Result<Shutdown, Error> {
        let Serve {
            listeners,
            service,
            close_signals,
            restart_signals,
            drain_timeout,
            ready_timeout,
            keep_alive_grace,
            restart_keep_alive_grace,
            header_read_timeout,
            fd_store,
            hooks,
            shutdown_signal,
        } = self;
        let startup = startup::get();
        let listeners = listeners.into_vec();
        if listeners.is_empty() {
            return Err(Error::io(
                "nothing to serve",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no listeners were given"),
            ));
        }
        let mut signals = SignalEvents::new(&close_signals, &restart_signals)?;
        crate::keeper::forward_signals(&close_signals, &restart_signals);
        let notifier = Arc::new(Notifier::from_startup(startup));

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            // A client may close its sending side once its request is out, and wait for the
            // answer (some proxies and tools do): answer it, do not drop the request.
            .half_close(true);
        builder.http2().timer(TokioTimer::new());
        let builder = Arc::new(builder);
        let connections = Arc::new(Connections::new());

        // Accept loops work on duplicates of the listening fds, so that `listeners` keeps the
        // originals open for a restart until serving ends, whatever the loops do.
        // All registered before any loop starts, so an error here leaves nothing running.
        let acceptors = listeners
            .iter()
            .map(Acceptor::new)
            .collect::<Result<Vec<_>, _>>()?;
        let stop_accepting = CancellationToken::new();
        let mut accepting = Vec::with_capacity(listeners.len());
        let (dead_tx, mut dead_rx) = tokio::sync::mpsc::unbounded_channel();
        for acceptor in acceptors {
            accepting.push(tokio::spawn(accept_loop(
                acceptor,
                service.clone(),
                Arc::clone(&builder),
                Arc::clone(&connections),
                stop_accepting.clone(),
                dead_tx.clone(),
            )));
        }
        drop(dead_tx);
        let mut dead_listeners = 0;
        let mut failure = None;
        let urls: Vec<String> = listeners.iter().map(Listener::url).collect();
        for url in &urls {
            tracing::info!(url, pid = startup.pid, "accepting");
        }
        if fd_store {
            let bound: Vec<_> = listeners
                .iter()
                .filter(|l| l.origin() == crate::Origin::Bound)
                .map(|l| (std::os::fd::AsFd::as_fd(l), l.name()))
                .collect();
            notifier.store_fds(&bound);
        }
        notifier
            .ready(&format!("Listening on {}", urls.join(", ")), ready_timeout)
            .await;
        tracing::info!(pid = startup.pid, "ready");
        let watchdog_usec = crate::notify::watchdog_usec(startup);
        let watchdog = watchdog_usec
            .map(|usec| WatchdogTask(crate::notify::spawn_watchdog(Arc::clone(&notifier), usec)));

        // Serve until a close signal, a requested shutdown, or a hand-off.
        let mut restart: Option<Restarting> = None;
        let mut requested = shutdown_signal;
        // The deadline counts from when the shutdown began: cancelling a restart in progress is
        // part of the shutdown.
        let (reason, started) = loop {
            tokio::select! {
                event = signals.next() => match event {
                    Some(Event::Close(sig)) => {
                        tracing::info!(signal = %signals::name(sig), "close signal received; shutting down");
                        let began = Instant::now();
                        if let Some(r) = restart.take() {
                            if let Ok(h) = r.cancel().await {
                                // The child became ready just as the signal came: it serves
                                // now, and the signal was meant for the service.
                                h.forward_signal(sig);
                                break (Reason::HandedOver { pid: h.pid }, began);
                            }
                        }
                        break (Reason::Signal(sig), began);
                    }
                    Some(Event::Restart(sig)) => {
                        if restart.is_some() {
                            tracing::info!(signal = %signals::name(sig), "restart signal received while a restart is in progress; coalesced");
                        } else {
                            tracing::info!(signal = %signals::name(sig), "restart signal received");
                            match listen::dup_fds(&listeners) {
                                Ok(fds) => restart = Some(Restarting::start(
                                    fds,
                                    Arc::clone(&notifier),
                                    ready_timeout,
                                    watchdog_usec,
                                )),
                                Err(e) => tracing::error!(error = %e, "restart failed: could not duplicate the listeners; still serving"),
                            }
                        }
                    }
                    None => {
                        return Err(Error::io("signal handling stopped", std::io::Error::other("the signal stream ended")));
                    }
                },
                outcome = restart_outcome(&mut restart) => {
                    restart = None;
                    match outcome {
                        Ok(h) => {
                            tracing::info!(pid = h.pid, ready_after = ?h.ready_after, "handed over");
                            break (Reason::HandedOver { pid: h.pid }, Instant::now());
                        }
                        Err(failure) => {
                            // Reported only now that a new restart signal would be accepted, so
                            // whoever waits for this message may restart again at once.
                            let status = format!("Restart failed: {failure}; still serving as pid {}", startup.pid);
                            notifier.notify_patiently(&[NotifyState::Ready, NotifyState::Status(&status)], ready_timeout);
                            tracing::info!(pid = startup.pid, "still serving after the failed restart");
                        }
                    }
                }
                Some(e) = dead_rx.recv() => {
                    dead_listeners += 1;
                    if dead_listeners == listeners.len() {
                        tracing::error!("no listener can accept any more; shutting down after the drain");
                        if let Some(r) = restart.take() {
                            let _ = r.cancel().await;
                        }
                        failure = Some(e);
                        break (Reason::Requested, Instant::now());
                    }
                }
                () = requested_shutdown(&mut requested) => {
                    tracing::info!("shutdown requested");
                    let began = Instant::now();
                    if let Some(r) = restart.take() {
                        if let Ok(h) = r.cancel().await {
                            break (Reason::HandedOver { pid: h.pid }, began);
                        }
                    }
                    break (Reason::Requested, began);
                }
            }
        };

        // Shut down: stop accepting, hooks, drain; a second close signal forces.
        let deadline = started + drain_timeout;
        stop_accepting.cancel();
        for task in accepting {
            let _ = task.await;
        }
        drop(listeners);
        let handed_over = matches!(reason, Reason::HandedOver { .. });
        if handed_over {
            // The new process is the service now, and pings the watchdog itself.
            drop(watchdog);
            tracing::info!("stopped accepting; the new process accepts now");
        } else {
            let status = format!("Stopping: draining {} connections", connections.open());
            notifier.notify(&[NotifyState::Stopping, NotifyState::Status(&status)]);
            tracing::info!("stopped accepting");
        }

        let force = connections.force().clone();
        let progress_notifier = Arc::clone(&notifier);
        let sequence = async {
            let hooks = hooks::run(hooks, deadline, &force).await;
            let grace = match handed_over {
                true => restart_keep_alive_grace,
                false => keep_alive_grace,
            };
            let drained = connections
                .drain(deadline, grace, |open| {
                    tracing::info!(open, "draining");
                    if !handed_over {
                        // Tell systemd how long we still need, so that neither a healthy drain
                        // is killed at TimeoutStopSec nor a hung one waited on blindly.
                        let left = deadline.saturating_duration_since(Instant::now())
                            + Duration::from_secs(1);
                        let extend = u32::try_from(left.as_micros()).unwrap_or(u32::MAX);
                        let status = format!("Stopping: draining {open} connections");
                        progress_notifier.notify(&[
                            NotifyState::ExtendTimeoutUsec(extend),
                            NotifyState::Status(&status),
                        ]);
                    }
                })
                .await;
            (hooks, drained)
        };
        let mut sequence = pin!(sequence);
        let mut forced = false;
        let mut signals_open = true;
        // Only a close signal *after* a close signal forces: after a hand-off or a requested
        // shutdown, the first one (systemd's stop reaching a draining old process, Ctrl-C to
        // the process group) just confirms the shutdown under way.
        let mut close_seen = matches!(reason, Reason::Signal(_));
        let (hooks, drained) = loop {
            tokio::select! {
                out = &mut sequence => break out,
                event = signals.next(), if signals_open => match event {
                    Some(Event::Close(sig)) if !close_seen => {
                        tracing::info!(signal = %signals::name(sig), "close signal received while already shutting down; the drain goes on (a second one cuts)");
                        close_seen = true;
                    }
                    Some(Event::Close(sig)) => {
                        tracing::warn!(signal = %signals::name(sig), "second close signal: cutting all connections now");
                        forced = true;
                        connections.cut();
                    }
                    Some(Event::Restart(sig)) => {
                        tracing::info!(signal = %signals::name(sig), "restart signal ignored: shutting down");
                    }
                    None => signals_open = false,
                },
            }
        };
        let elapsed = started.elapsed();
        tracing::info!(
            drained = drained.open_at_start,
            cut = drained.cut,
            ?elapsed,
            "server closed"
        );
        if handed_over {
            // As PID 1 this process stays on as its successor's init (never returns).
            crate::keeper::after_shutdown().await;
        }
        if let Some(e) = failure {
            // Drained like any shutdown, but it is not one anybody asked for: an error, so the
            // process exits non-zero and its supervisor restarts it.
            return Err(Error::io(
                "every listener failed; the server drained and stopped",
                e,
            ));
        }
        Ok(Shutdown {
            reason,
            hooks,
            drained: drained.open_at_start,
            cut: drained.cut,
            forced,
            elapsed,
        })
    }
}

/// Stops the watchdog pings when dropped.
struct WatchdogTask(tokio::task::JoinHandle<()>);

impl Drop for WatchdogTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn restart_outcome(
    restart: &mut Option<Restarting>,
) -> Result<crate::restart::HandedOver, crate::error::RestartFailure> {
    match restart {
        Some(r) => r.outcome().await,
        None => std::future::pending().await,
    }
}

async fn requested_shutdown(signal: &mut Option<Pin<Box<dyn Future<Output = ()> + Send>>>) {
    match signal {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The runtime side of one listener.
enum Acceptor {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Acceptor {
    fn new(listener: &Listener) -> Result<Acceptor, Error> {
        let register = |e| Error::io("could not register a listener with the runtime", e);
        Ok(match &listener.socket {
            Socket::Tcp(l) => {
                let dup = l.try_clone().map_err(register)?;
                Acceptor::Tcp(tokio::net::TcpListener::from_std(dup).map_err(register)?)
            }
            Socket::Unix(l) => {
                let dup = l.try_clone().map_err(register)?;
                Acceptor::Unix(tokio::net::UnixListener::from_std(dup).map_err(register)?)
            }
        })
    }
}

/// Accepts until `stop`, handing each connection to `connections`. Errors that concern one
/// connection are skipped; others (EMFILE, ENFILE, ENOBUFS, ...) back off instead of spinning.
/// A listener that can no longer accept (closed or shut down under us: `EBADF`, `EINVAL`,
/// `ENOTSOCK`) ends its loop and is reported on `dead`.
async fn accept_loop<S, B>(
    acceptor: Acceptor,
    service: S,
    builder: Arc<auto::Builder<TokioExecutor>>,
    connections: Arc<Connections>,
    stop: CancellationToken,
    dead: tokio::sync::mpsc::UnboundedSender<std::io::Error>,
) where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = accept(&acceptor) => accepted,
        };
        match accepted {
            Ok(stream) => {
                backoff = Duration::from_millis(5);
                match stream {
                    Stream::Tcp(s) => {
                        let _ = s.set_nodelay(true);
                        connections.spawn(s, service.clone(), &builder);
                    }
                    Stream::Unix(s) => connections.spawn(s, service.clone(), &builder),
                }
            }
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(error = %e, "accept: connection failed before it was accepted");
            }
            Err(e) if is_listener_gone(&e) => {
                tracing::error!(error = %e, "this listener can no longer accept (closed or shut down under us)");
                let _ = dead.send(e);
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, ?backoff, "accept failed; backing off");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(acceptor: &Acceptor) -> std::io::Result<Stream> {
    match acceptor {
        Acceptor::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
        Acceptor::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
    }
}

fn is_listener_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP)
    )
}

fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}
