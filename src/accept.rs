//! Accept connections on a listener and hand each, with what is known about it, to the
//! listener's service.
//!
//! Each listener has one accept loop. Errors that concern one connection are skipped; resource
//! errors (`EMFILE`, `ENFILE`, `ENOBUFS`, ...) back off from 5 ms to 1 s instead of spinning;
//! a listener that can no longer accept (closed or shut down under the server: `EBADF`,
//! `EINVAL`, `ENOTSOCK`) ends its loop and is reported, so the lifecycle can react.
//!
//! # Stopping without resets
//! When this process holds the only copy of a listening socket (a bound address, or
//! `systemd-socket-activate`), closing it resets every connection the kernel has queued on
//! it, after those clients sent their request. So a loop told to stop first accepts what is
//! queued, until the queue is empty (`EAGAIN`), and serves each of those connections like the
//! others of the drain (its request answered with `Connection: close`); the lifecycle closes
//! the listener right after.
//!
//! That alone leaves a window: a client whose handshake completes between the last `accept`
//! and the close is reset. So when the service stops for good, a TCP listener that only this
//! service's handover processes hold (one a handover process bound, and never gave to the
//! service manager's fd store) first has its *door* shut ([`Stopped::shut_door`]): a socket
//! filter drops every new client's SYN, so no new connection enters its queues (the client
//! retries a second later and is refused, or reaches whoever listens then), while handshakes
//! already answered still complete. The listener then accepts for [`HANDSHAKE_GRACE`], a
//! round trip's worth, and closes ([`Stopped::last_handshakes`]).
//!
//! The door is a property of the socket, not of this process's fd: it would outlive this
//! process in any other holder. So a socket someone else may hold (a socket unit's, one
//! systemfd or the fd store keeps, one inherited from any service manager) never gets one:
//! there, closing our copy resets nothing (the other copy keeps the queue for the next
//! start), or, under `systemd-socket-activate`, the window of one task switch remains. Nor
//! does a process whose handover parent still holds the socket (it serves on it if this
//! process was a restart being rolled back); if that parent drains instead, it closes its own
//! copies the same way once this process is gone and the service stops (a parent that stays
//! on as PID 1's keeper lets them go after its drain). A process that serves again on a
//! listener whose door a successor shut opens it again.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::conn::service::AppService;
use crate::conn::{self, Sock, Tls, TrackedIo};
use crate::conn_info::{ConnectionInfo, Local, Peer, PeerCredentials};
use crate::error::Error;
use crate::listen::{Listener, Socket};

pub(crate) use crate::conn::ConnContext;

/// A service handover can serve: a `tower::Service` of HTTP requests (an `axum::Router`, a
/// `tower::service_fn`, ...), cloned per connection.
///
/// Implemented for every type with the right bounds; it exists so that a wrong type is
/// reported where it is passed to [`crate::serve`] or [`crate::Server::service`], with the bounds
/// spelled out, not later as "is not a future".
///
/// # What works
/// - `axum::Router` (an `axum::Router<()>`: call `.with_state(state)` first if it has state);
/// - `tower::service_fn(|req: hyper::Request<hyper::body::Incoming>| async { .. })`;
/// - any `tower::Service<http::Request<hyper::body::Incoming>>` returning
///   `http::Response<B>` for an `http_body::Body` `B`.
///
/// Not: `Router::into_make_service()` and other make-services (pass the router itself; the
/// peer address is in every request's [`ConnectionInfo`], and, with the `axum` feature, in
/// axum's `ConnectInfo<SocketAddr>`).
///
/// # Examples
/// ```no_run
/// # fn demo(listeners: handover::Listeners) {
/// #[derive(Clone)]
/// struct AppState {
///     greeting: &'static str,
/// }
/// let app = axum::Router::<AppState>::new()
///     .route(
///         "/",
///         axum::routing::get(|axum::extract::State(s): axum::extract::State<AppState>| async move {
///             s.greeting
///         }),
///     )
///     .with_state(AppState { greeting: "hi" }); // now an axum::Router<()>: a service
/// let server = handover::serve(listeners, app);
/// # drop(server);
/// # }
/// ```
/// A wrong type is an error where it is passed. rustc 1.95 prints, for axum's
/// `into_make_service()` (and the same for `into_make_service_with_connect_info::<SocketAddr>()`
/// or a router whose state is not given yet):
/// ```text
/// error[E0277]: `IntoMakeService<Router>` is not a service handover can serve
///  --> src/main.rs:5:46
///   |
/// 5 |     let _server = handover::serve(listeners, app.into_make_service());
///   |                                              ^^^^^^^^^^^^^^^^^^^^^^^ handover cannot serve this
///   |
///   = help: the trait `HttpService` is not implemented for `IntoMakeService<Router>`
///   = note: handover serves a `tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>` [...]
///   = note: an `axum::Router` qualifies once its state is given (`.with_state(..)`); a make-service does not
///           (`into_make_service()`, `into_make_service_with_connect_info::<SocketAddr>()`): pass the router itself. [...]
/// note: required by a bound in `handover::serve`
/// ```
/// (`tests/compile_errors.rs` checks these texts.)
/// ```compile_fail,E0277
/// # fn demo(listeners: handover::Listeners) {
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
/// let server = handover::serve(listeners, app.into_make_service()); // pass `app` itself
/// # }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a service handover can serve",
    label = "handover cannot serve this",
    note = "handover serves a `tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>` that is `Clone + Send + 'static`, whose `Future` is `Send + 'static` and whose `Error` converts into `Box<dyn std::error::Error + Send + Sync>`; `B` is an `http_body::Body + Send + 'static` with `Send` data",
    note = "an `axum::Router` qualifies once its state is given (`.with_state(..)`); a make-service does not (`into_make_service()`, `into_make_service_with_connect_info::<SocketAddr>()`): pass the router itself. The peer address is in every request: `ConnectInfo<SocketAddr>` with handover's `axum` feature, and `Extension<handover::ConnectionInfo>`"
)]
pub trait HttpService: private::Sealed {
    #[doc(hidden)]
    fn into_handler(self) -> BoxedService;
}

/// A service with its type erased (what [`HttpService`] turns a service into).
#[doc(hidden)]
#[derive(Debug)]
pub struct BoxedService(pub(crate) Box<dyn ServeConn>);

mod private {
    pub trait Sealed {}
}

// `do_not_recommend` on both blanket impls: when a type does not qualify, rustc reports
// "`X` is not a service handover can serve" with the notes above, instead of the first of
// the bounds of `AppService` that failed deep inside (`Service::Response == Response<_>` for
// axum's `into_make_service()`, E0271; `SocketAddr: Connected<Request<Incoming>>` for
// `into_make_service_with_connect_info::<SocketAddr>()`), which never mentions handover.
#[diagnostic::do_not_recommend]
impl<S: AppService> private::Sealed for S {}

#[diagnostic::do_not_recommend]
impl<S: AppService> HttpService for S {
    fn into_handler(self) -> BoxedService {
        BoxedService(Box::new(Handler {
            service: self,
            tls: None,
        }))
    }
}

/// A service with its type erased: what the accept loops (and the receiver of handed-over
/// connections) call for each connection.
pub(crate) trait ServeConn: Send + 'static {
    /// Serves one connection; `read` holds bytes already read from it.
    fn serve(
        &self,
        io: TrackedIo,
        read: Bytes,
        cx: &ConnContext,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;

    /// A copy for another accept loop.
    fn clone_box(&self) -> Box<dyn ServeConn>;

    /// The same service, over TLS: each connection's handshake first.
    #[cfg(feature = "rustls")]
    fn with_tls(self: Box<Self>, acceptor: tokio_rustls::TlsAcceptor) -> Box<dyn ServeConn>;

    /// Whether its connections can be passed to a successor (plaintext ones can).
    fn passable(&self) -> bool;

    /// The listener's address, for logs and `STATUS=`.
    fn url(&self, listener: &Listener) -> String {
        let url = listener.url();
        match self.passable() {
            true => url,
            false => match url.strip_prefix("http://") {
                Some(rest) => format!("https://{rest}"),
                None => format!("{url} (TLS)"),
            },
        }
    }
}

impl std::fmt::Debug for dyn ServeConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServeConn")
    }
}

struct Handler<S> {
    service: S,
    tls: Tls,
}

impl<S: AppService> ServeConn for Handler<S> {
    fn serve(
        &self,
        io: TrackedIo,
        read: Bytes,
        cx: &ConnContext,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        if self.tls.is_some() {
            // Set before the task runs: from accept on, the sweeper times the handshake.
            io.control().set_phase(conn::control::Phase::Handshake);
        }
        conn::serve::serve(io, read, self.service.clone(), self.tls.clone(), cx.clone())
    }

    fn clone_box(&self) -> Box<dyn ServeConn> {
        Box::new(Handler {
            service: self.service.clone(),
            tls: self.tls.clone(),
        })
    }

    #[cfg(feature = "rustls")]
    fn with_tls(self: Box<Self>, acceptor: tokio_rustls::TlsAcceptor) -> Box<dyn ServeConn> {
        Box::new(Handler {
            service: self.service,
            tls: Some(acceptor),
        })
    }

    fn passable(&self) -> bool {
        self.tls.is_none()
    }
}

/// The runtime side of one listener.
#[derive(Debug)]
pub(crate) enum Acceptor {
    Tcp {
        listener: tokio::net::TcpListener,
        /// The listener's address, when it is the local address of every connection (not a
        /// wildcard address).
        local: Option<SocketAddr>,
        /// Only this service's handover processes hold the socket: its door may be shut.
        exclusive: bool,
    },
    Unix {
        listener: tokio::net::UnixListener,
        path: Option<std::path::PathBuf>,
    },
}

impl Acceptor {
    /// Registers a duplicate of the listener's fd with the runtime, so that the original stays
    /// open for a restart whatever the loop does.
    pub(crate) fn new(listener: &Listener) -> Result<Acceptor, Error> {
        let register = |e| Error::io("could not register a listener with the runtime", e);
        Ok(match &listener.socket {
            Socket::Tcp(l) => {
                let local = l.local_addr().ok().filter(|a| !a.ip().is_unspecified());
                let dup = l.try_clone().map_err(register)?;
                Acceptor::Tcp {
                    listener: tokio::net::TcpListener::from_std(dup).map_err(register)?,
                    local,
                    exclusive: listener.is_exclusive(),
                }
            }
            Socket::Unix(l) => {
                let path = l
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(std::path::Path::to_path_buf));
                let dup = l.try_clone().map_err(register)?;
                Acceptor::Unix {
                    listener: tokio::net::UnixListener::from_std(dup).map_err(register)?,
                    path,
                }
            }
        })
    }

    /// The next connection, once one is there. A poll of the listener's readiness, not
    /// `accept().await`: that future queues a waiter with the runtime for each connection.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<(Sock, Peer, Local)>> {
        match self {
            Acceptor::Tcp {
                listener, local, ..
            } => {
                let (s, peer) = ready!(listener.poll_accept(cx))?;
                let _ = s.set_nodelay(true);
                let local = match local {
                    Some(addr) => *addr,
                    None => s.local_addr()?,
                };
                Poll::Ready(Ok((Either::Left(s), Peer::Tcp(peer), Local::Tcp(local))))
            }
            Acceptor::Unix { listener, path } => {
                let (s, peer) = ready!(listener.poll_accept(cx))?;
                let peer = unix_peer(&s, peer.as_pathname());
                Poll::Ready(Ok((Either::Right(s), peer, Local::Unix(path.clone()))))
            }
        }
    }

    async fn accept(&self) -> std::io::Result<(Sock, Peer, Local)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }
}

/// The peer of a Unix connection: its path, and its credentials as the kernel saw them.
pub(crate) fn unix_peer(s: &tokio::net::UnixStream, path: Option<&std::path::Path>) -> Peer {
    let credentials = s.peer_cred().ok().map(|c| PeerCredentials {
        pid: c
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p > 0),
        uid: c.uid(),
        gid: c.gid(),
    });
    Peer::unix(path, credentials)
}

/// A connection the previous process passed (see `handoff`), ready to be served like one
/// accepted here: registered, with what is known about it.
pub(crate) fn adopt_passed(
    fd: std::os::fd::OwnedFd,
    listener: Arc<str>,
    cx: &ConnContext,
) -> std::io::Result<TrackedIo> {
    let family = rustix::net::getsockname(&fd)?.address_family();
    let (sock, peer, local) = if family == rustix::net::AddressFamily::UNIX {
        let s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(true)?;
        let s = tokio::net::UnixStream::from_std(s)?;
        let peer_path = s.peer_addr().ok();
        let peer = unix_peer(&s, peer_path.as_ref().and_then(|a| a.as_pathname()));
        let local = Local::Unix(
            s.local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(std::path::Path::to_path_buf)),
        );
        (Either::Right(s), peer, local)
    } else {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)?;
        let s = tokio::net::TcpStream::from_std(s)?;
        let (peer, local) = (s.peer_addr()?, s.local_addr()?);
        (Either::Left(s), Peer::Tcp(peer), Local::Tcp(local))
    };
    let info = ConnectionInfo::new(listener, peer, local, cx.handle.clone());
    Ok(TrackedIo::register(&cx.connections, sock, info, true))
}

/// An accept loop that stopped: what it needs to take the connections still queued, right
/// before the listener closes ([`Stopped::accept_queued`]).
#[derive(Debug)]
pub(crate) struct Stopped {
    acceptor: Acceptor,
    name: Arc<str>,
    service: Box<dyn ServeConn>,
    cx: ConnContext,
}

impl Stopped {
    /// A listener that no loop accepts on, to be closed as a stopped loop's is: for a process
    /// that kept its copies while it drained, and now holds the last ones.
    pub(crate) fn idle(
        acceptor: Acceptor,
        name: Arc<str>,
        service: Box<dyn ServeConn>,
        cx: ConnContext,
    ) -> Stopped {
        Stopped {
            acceptor,
            name,
            service,
            cx,
        }
    }

    /// Accepts and serves every connection queued on the listener now (see the module's docs):
    /// call it right before closing the listener. Returns how many.
    pub(crate) fn accept_queued(&self) -> usize {
        let passable = self.service.passable();
        let queued = self.acceptor.accept_queued(|accepted| {
            serve_accepted(
                &*self.service,
                passable,
                true,
                &self.name,
                &self.cx,
                accepted,
            );
        });
        if queued > 0 {
            tracing::debug!(listener = %self.name, queued, "accepted the connections queued when accepting stopped");
        }
        queued
    }
}

/// How long a listener whose door is shut still accepts before it closes: a handshake
/// answered (SYN-ACK) before the door shut completes one round trip later, and should be
/// accepted, not reset. A tenth of a second covers any client in the same region; a client
/// further away whose handshake is that moment in flight is the one still reset.
pub(crate) const HANDSHAKE_GRACE: Duration = Duration::from_millis(100);

impl Stopped {
    /// Shuts the listener's door (see the module's docs) if it is a TCP listener only this
    /// service's handover processes hold; returns whether it did. For a service that stops
    /// for good: a successor would inherit the shut door.
    pub(crate) fn shut_door(&self) -> bool {
        let Acceptor::Tcp {
            listener,
            exclusive: true,
            ..
        } = &self.acceptor
        else {
            return false;
        };
        use std::os::fd::AsFd;
        if crate::startup::get().predecessor_may_hold(listener.as_fd()) {
            // The handover parent holds the socket too, and may be serving on it (this process
            // was a restart that is being rolled back): a door would shut its clients out. If
            // it is draining instead, it closes the socket itself once this process is gone.
            return false;
        }
        match crate::sys::shut_door(listener.as_fd()) {
            Ok(()) => true,
            Err(e) => {
                // Seccomp, most likely: the window of one task switch stays.
                tracing::warn!(listener = %self.name, error = %e, "could not keep new clients out of the listener before closing it (SO_ATTACH_FILTER); a client that connects at the moment it closes may be reset");
                false
            }
        }
    }

    /// After [`Stopped::shut_door`]: accepts the handshakes that complete within
    /// [`HANDSHAKE_GRACE`] (or until `deadline`, if sooner), then what is queued, then closes
    /// the listener (this copy; the caller has closed the others).
    pub(crate) async fn last_handshakes(self, deadline: tokio::time::Instant) {
        let until = deadline.min(tokio::time::Instant::now() + HANDSHAKE_GRACE);
        let passable = self.service.passable();
        loop {
            let accepted = tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                accepted = self.acceptor.accept() => accepted,
            };
            match accepted {
                Ok(accepted) => serve_accepted(
                    &*self.service,
                    passable,
                    true,
                    &self.name,
                    &self.cx,
                    accepted,
                ),
                Err(e) if is_per_connection(&e) => {}
                Err(_) => break,
            }
        }
        self.accept_queued();
    }
}

/// [`Stopped::last_handshakes`] for each of `doors`, at the same time.
pub(crate) async fn last_handshakes(doors: Vec<Stopped>, deadline: tokio::time::Instant) {
    let mut all: tokio::task::JoinSet<()> = doors
        .into_iter()
        .map(|d| d.last_handshakes(deadline))
        .collect();
    while all.join_next().await.is_some() {}
}

// A plain function, not a closure kept across the loop's awaits: `service` is `Send`, not
// `Sync`.
fn serve_accepted(
    service: &dyn ServeConn,
    passable: bool,
    queued: bool,
    name: &Arc<str>,
    cx: &ConnContext,
    (sock, peer, local): (Sock, Peer, Local),
) {
    let info = ConnectionInfo::new(Arc::clone(name), peer, local, cx.handle.clone());
    let io = TrackedIo::register(&cx.connections, sock, info, passable);
    if queued {
        // Its client connected to a listener that was open, and sends its request now: it is
        // awaited (bounded by the header-read timeout and the drain's deadline), not closed
        // as idle at the end of the keep-alive grace.
        io.control().set_phase(conn::control::Phase::Reading);
    }
    tokio::spawn(service.serve(io, Bytes::new(), cx));
}

/// Accepts until `stop`, serving each connection with `service` on a task of its own; then
/// accepts what is queued (see the module's docs), and returns what the lifecycle needs to
/// take what is queued again right before it closes the listener.
pub(crate) async fn accept_loop(
    acceptor: Acceptor,
    name: Arc<str>,
    service: Box<dyn ServeConn>,
    cx: ConnContext,
    stop: CancellationToken,
    dead: tokio::sync::mpsc::UnboundedSender<std::io::Error>,
) -> Stopped {
    let mut backoff = Duration::from_millis(5);
    let passable = service.passable();
    // One wait for the stop, for the whole loop: polled only when no connection is waiting
    // (a `select!` per connection would queue and unqueue a waiter on the token each time).
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        let accepted = std::future::poll_fn(|cx| {
            // Checked first: a connection accepted after the stop is a queued one, which
            // `accept_queued` below takes (and marks as such).
            if stop.is_cancelled() {
                return Poll::Ready(None);
            }
            match acceptor.poll_accept(cx) {
                Poll::Ready(accepted) => Poll::Ready(Some(accepted)),
                Poll::Pending => stopped.as_mut().poll(cx).map(|()| None),
            }
        })
        .await;
        let Some(accepted) = accepted else { break };
        match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(5);
                serve_accepted(&*service, passable, false, &name, &cx, accepted);
            }
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(error = %e, "accept: connection failed before it was accepted");
            }
            Err(e) if is_listener_gone(&e) => {
                tracing::error!(listener = %name, error = %e, "this listener can no longer accept (closed or shut down under us)");
                let _ = dead.send(e);
                break;
            }
            Err(e) => {
                tracing::error!(listener = %name, error = %e, ?backoff, "accept failed; backing off");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    let stopped = Stopped {
        acceptor,
        name,
        service,
        cx,
    };
    stopped.accept_queued();
    stopped
}

/// At most this many queued connections are taken when accepting stops: a backlog's worth
/// (`somaxconn`'s default), so that a flood cannot keep a stopping loop going.
const MAX_QUEUED: usize = 4096;

impl Acceptor {
    /// Accepts, without waiting, every connection queued on the listener (at most
    /// [`MAX_QUEUED`]), passing each to `serve`; returns how many.
    fn accept_queued(&self, mut serve: impl FnMut((Sock, Peer, Local))) -> usize {
        let mut n = 0;
        while n < MAX_QUEUED {
            match self.try_accept() {
                Ok(Some(accepted)) => {
                    n += 1;
                    serve(accepted);
                }
                Ok(None) => break,
                Err(e) if is_per_connection(&e) => {}
                Err(_) => break,
            }
        }
        n
    }

    /// One `accept4` on the listener, now: `None` when the queue is empty. A direct call, not
    /// the runtime's readiness (which may not have seen the latest arrivals yet).
    fn try_accept(&self) -> std::io::Result<Option<(Sock, Peer, Local)>> {
        use rustix::net::SocketFlags;
        let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
        let fd = match self {
            Acceptor::Tcp { listener, .. } => rustix::net::accept_with(listener, flags),
            Acceptor::Unix { listener, .. } => rustix::net::accept_with(listener, flags),
        };
        let fd = match fd {
            Ok(fd) => fd,
            Err(rustix::io::Errno::AGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(match self {
            Acceptor::Tcp { local, .. } => {
                let s = tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))?;
                let _ = s.set_nodelay(true);
                let peer = s.peer_addr()?;
                let local = match local {
                    Some(addr) => *addr,
                    None => s.local_addr()?,
                };
                (Either::Left(s), Peer::Tcp(peer), Local::Tcp(local))
            }
            Acceptor::Unix { path, .. } => {
                let s = tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?;
                let peer_path = s.peer_addr().ok();
                let peer = unix_peer(&s, peer_path.as_ref().and_then(|a| a.as_pathname()));
                (Either::Right(s), peer, Local::Unix(path.clone()))
            }
        }))
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
