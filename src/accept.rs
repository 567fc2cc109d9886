//! Accept connections on a listener and hand each, with what is known about it, to the
//! listener's service.
//!
//! Each listener has one accept loop. Errors that concern one connection are skipped; resource
//! errors (`EMFILE`, `ENFILE`, `ENOBUFS`, ...) back off from 5 ms to 1 s instead of spinning;
//! a listener that can no longer accept (closed or shut down under the server: `EBADF`,
//! `EINVAL`, `ENOTSOCK`) ends its loop and is reported, so the lifecycle can react.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio_util::sync::CancellationToken;

use crate::conn::{self, HandOff, Http, Sock, TrackedIo};
use crate::conn_info::{ConnectionInfo, Local, Peer, PeerCredentials};
use crate::drain::Connections;
use crate::error::{BoxError, Error};
use crate::handle::Handle;
use crate::listen::{Listener, Socket};

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
// these bounds that failed deep inside (`Service::Response == Response<_>` for axum's
// `into_make_service()`, E0271; `SocketAddr: Connected<Request<Incoming>>` for
// `into_make_service_with_connect_info::<SocketAddr>()`), which never mentions handover.
#[diagnostic::do_not_recommend]
impl<S, B> private::Sealed for S
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
}

#[diagnostic::do_not_recommend]
impl<S, B> HttpService for S
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn into_handler(self) -> BoxedService {
        BoxedService(Box::new(Handler { service: self }))
    }
}

/// Where a server passes connections it hands over, once a successor takes them.
pub(crate) type HandOffSlot = Arc<OnceLock<Arc<dyn HandOff>>>;

/// What every connection of a server needs besides its service.
#[derive(Debug, Clone)]
pub(crate) struct ConnContext {
    pub(crate) http: Arc<Http>,
    pub(crate) connections: Connections,
    pub(crate) handle: Handle,
    pub(crate) hand_off: HandOffSlot,
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

    /// Serves one connection of a TLS listener: the handshake, then HTTP.
    #[cfg(feature = "rustls")]
    fn serve_tls(
        &self,
        io: TrackedIo,
        acceptor: tokio_rustls::TlsAcceptor,
        cx: &ConnContext,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;

    /// A copy for another accept loop.
    fn clone_box(&self) -> Box<dyn ServeConn>;

    /// Whether its connections can be passed to a successor (plaintext ones can).
    fn passable(&self) -> bool {
        true
    }

    /// The listener's address, for logs and `STATUS=`.
    fn url(&self, listener: &Listener) -> String {
        listener.url()
    }
}

impl std::fmt::Debug for dyn ServeConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServeConn")
    }
}

struct Handler<S> {
    service: S,
}

impl<S, B> ServeConn for Handler<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn serve(
        &self,
        io: TrackedIo,
        read: Bytes,
        cx: &ConnContext,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(conn::serve_plain(
            io,
            read,
            self.service.clone(),
            Arc::clone(&cx.http),
            Arc::clone(cx.connections.shared()),
            Arc::clone(&cx.hand_off),
        ))
    }

    #[cfg(feature = "rustls")]
    fn serve_tls(
        &self,
        io: TrackedIo,
        acceptor: tokio_rustls::TlsAcceptor,
        cx: &ConnContext,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(crate::tls::serve(
            io,
            acceptor,
            self.service.clone(),
            Arc::clone(&cx.http),
            Arc::clone(cx.connections.shared()),
            Arc::clone(&cx.hand_off),
        ))
    }

    fn clone_box(&self) -> Box<dyn ServeConn> {
        Box::new(Handler {
            service: self.service.clone(),
        })
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

    async fn accept(&self) -> std::io::Result<(Sock, Peer, Local)> {
        match self {
            Acceptor::Tcp { listener, local } => {
                let (s, peer) = listener.accept().await?;
                let _ = s.set_nodelay(true);
                let local = match local {
                    Some(addr) => *addr,
                    None => s.local_addr()?,
                };
                Ok((Sock::Tcp(s), Peer::Tcp(peer), Local::Tcp(local)))
            }
            Acceptor::Unix { listener, path } => {
                let (s, peer) = listener.accept().await?;
                let peer = unix_peer(&s, peer.as_pathname());
                Ok((Sock::Unix(s), peer, Local::Unix(path.clone())))
            }
        }
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
        (Sock::Unix(s), peer, local)
    } else {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)?;
        let s = tokio::net::TcpStream::from_std(s)?;
        let (peer, local) = (s.peer_addr()?, s.local_addr()?);
        (Sock::Tcp(s), Peer::Tcp(peer), Local::Tcp(local))
    };
    let info = ConnectionInfo::new(listener, peer, local, cx.handle.clone());
    Ok(cx.connections.register(sock, info, true))
}

/// Accepts until `stop`, serving each connection with `service` on a task of its own.
pub(crate) async fn accept_loop(
    acceptor: Acceptor,
    name: Arc<str>,
    service: Box<dyn ServeConn>,
    cx: ConnContext,
    stop: CancellationToken,
    dead: tokio::sync::mpsc::UnboundedSender<std::io::Error>,
) {
    let mut backoff = Duration::from_millis(5);
    let passable = service.passable();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        match accepted {
            Ok((sock, peer, local)) => {
                backoff = Duration::from_millis(5);
                let info = ConnectionInfo::new(Arc::clone(&name), peer, local, cx.handle.clone());
                let io = cx.connections.register(sock, info, passable);
                tokio::spawn(service.serve(io, Bytes::new(), &cx));
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
