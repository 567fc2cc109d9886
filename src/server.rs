//! The server as the application configures it: listeners, a service per listener, signals,
//! timeouts, hooks, hyper's settings. Awaiting it runs the [lifecycle](crate::lifecycle).

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::accept::{HttpService, ServeConn};
use crate::conn::Http;
use crate::error::Error;
use crate::handle::Handle;
use crate::hooks::{Hook, HooksReport};
use crate::listen::Listeners;

/// Serves `service` on every listener of `listeners` until a close signal, or until a restart
/// has handed the listeners to a new process; then drains and returns.
///
/// The same as `Server::new(listeners).default_service(service)`; see [`Server`] for several
/// listeners with a service each, a [`Handle`], and every setting.
///
/// The close and restart signals are handled from the moment serving starts (before that, they
/// have their default action: `SIGUSR1` would end the process), until it returns.
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
pub fn serve<S: HttpService>(listeners: impl Into<Listeners>, service: S) -> Server {
    Server::new(listeners).default_service(service)
}

/// A server being configured; `.await` it to run.
///
/// One server serves several listeners, each with its own service, chosen by the listener's
/// name ([`crate::Listener::name`]: its `LISTEN_FDNAMES` entry under systemd, or the name given
/// to [`Listeners::take_or_bind`]). All of them are handed over together by one restart and
/// drained together by one shutdown. Only one server per process can restart (a restart hands
/// over the listeners of one server): starting a second one with restarts enabled is an error.
///
/// # Example
/// ```no_run
/// # use std::convert::Infallible;
/// # fn router(body: &'static str) -> impl handover::HttpService {
/// #     tower::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| async move {
/// #         Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body))))
/// #     })
/// # }
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     // Before the runtime starts: inherited by name (systemd's FileDescriptorName=), or bound.
///     let mut listeners = handover::Listeners::from_env()?;
///     let web = listeners.take_or_bind("web", "127.0.0.1:8080".parse()?)?;
///     let admin = listeners.take_or_bind_unix("admin", "/run/myapp/admin.sock")?;
///
///     let server = handover::Server::new([web, admin])
///         .service("web", router("public"))
///         .service("admin", router("admin"));
///     let handle = server.handle(); // restart or shut down from code
///     let runtime = tokio::runtime::Runtime::new()?;
///     let shutdown = runtime.block_on(async move { server.await })?;
///     println!("{:?} ({})", shutdown.reason, handle.state());
///     Ok(())
/// }
/// ```
#[must_use = "a Server does nothing until it is awaited"]
pub struct Server {
    pub(crate) listeners: Listeners,
    pub(crate) services: Vec<(Option<String>, Box<dyn ServeConn>)>,
    pub(crate) config: Config,
    pub(crate) http: Http,
    pub(crate) handle: Handle,
    pub(crate) commands: tokio::sync::mpsc::UnboundedReceiver<crate::handle::Command>,
    pub(crate) hooks: Vec<Hook>,
    pub(crate) shutdown_signals: Vec<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The listeners served over TLS, by name.
    #[cfg(feature = "rustls")]
    pub(crate) tls: Vec<(String, std::sync::Arc<rustls::ServerConfig>)>,
}

/// The settings, with their defaults.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) close_signals: Vec<i32>,
    pub(crate) restart_signals: Vec<i32>,
    pub(crate) restarts: bool,
    pub(crate) drain_timeout: Duration,
    pub(crate) shutdown_delay: Duration,
    pub(crate) ready_timeout: Duration,
    pub(crate) keep_alive_grace: Duration,
    pub(crate) restart_keep_alive_grace: Duration,
    pub(crate) header_read_timeout: Duration,
    pub(crate) fd_store: bool,
    pub(crate) connection_handoff: bool,
    pub(crate) connection_info: bool,
    /// Takes the upgraded connections a previous process hands over (`upgrade`).
    pub(crate) resume_upgraded: Option<crate::upgrade::ResumeHandler>,
}

impl Default for Http {
    fn default() -> Http {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            // handover enforces the header-read timeout itself, once a second for all
            // connections, instead of arming a timer for every request head.
            .header_read_timeout(None)
            // A client may close its sending side once its request is out, and wait for the
            // answer (some proxies and tools do): answer it, do not drop the request.
            .half_close(true);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        Http { h1, h2 }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            close_signals: vec![libc::SIGINT, libc::SIGTERM],
            restart_signals: vec![libc::SIGUSR1, libc::SIGUSR2],
            restarts: true,
            drain_timeout: Duration::from_secs(5),
            shutdown_delay: Duration::ZERO,
            ready_timeout: Duration::from_secs(10),
            keep_alive_grace: Duration::from_millis(100),
            restart_keep_alive_grace: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(30),
            fd_store: false,
            connection_handoff: true,
            connection_info: true,
            resume_upgraded: None,
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let services: Vec<&str> = self
            .services
            .iter()
            .map(|(name, _)| name.as_deref().unwrap_or("(default)"))
            .collect();
        f.debug_struct("Server")
            .field("listeners", &self.listeners)
            .field("services", &services)
            .field("config", &self.config)
            .field("hooks", &self.hooks.len())
            .field("with_graceful_shutdown", &self.shutdown_signals.len())
            .finish_non_exhaustive()
    }
}

/// Why serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// A close signal (its number) was received.
    Signal(i32),
    /// The future given to [`Server::with_graceful_shutdown`] completed, or
    /// [`Handle::shutdown`] was called.
    Requested,
    /// A restart handed the listeners over to the new process with this pid.
    HandedOver {
        /// The pid of the new process, now serving.
        pid: u32,
    },
    /// Every listener stopped accepting (closed or shut down under the server). `serve` then
    /// returns an error after the drain, so that the service manager restarts the service;
    /// this reason is what the drain's log line and metrics say.
    ListenersLost,
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
    /// How long the lame duck lasted ([`Server::shutdown_delay`]; zero without one).
    pub lame_duck: Duration,
    /// Requests begun while the server was a lame duck.
    pub lame_duck_requests: u64,
    /// Connections open when the drain started.
    pub drained: usize,
    /// Connections passed to the new process after a hand-off (plaintext HTTP/1, at a request
    /// boundary; see [`Server::connection_handoff`]).
    pub passed: usize,
    /// Connections that could not be passed after all (the new process's channel failed, it
    /// refused them, or one had too many bytes read ahead to carry), and were served here to
    /// the end, with `Connection: close`.
    pub kept: usize,
    /// Connections cut at the deadline (or by a forced shutdown) instead of finishing.
    pub cut: usize,
    /// Whether the shutdown was forced (a further close signal, or
    /// [`Handle::shutdown_now`]).
    pub forced: bool,
    /// From the start of the shutdown (the lame duck included) to the last connection closed.
    pub elapsed: Duration,
}

impl Server {
    /// A server for `listeners`, with no service yet: add one per listener name with
    /// [`Server::service`], or one for all with [`Server::default_service`].
    pub fn new(listeners: impl Into<Listeners>) -> Server {
        let (handle, commands) = Handle::new();
        Server {
            listeners: listeners.into(),
            services: Vec::new(),
            config: Config::default(),
            http: Http::default(),
            handle,
            commands,
            hooks: Vec::new(),
            shutdown_signals: Vec::new(),
            #[cfg(feature = "rustls")]
            tls: Vec::new(),
        }
    }

    /// Serves the listener named `listener` with `service`. A name with no listener, or two
    /// services for one name, is an error when the server starts (before `READY=1`).
    pub fn service<S: HttpService>(mut self, listener: impl Into<String>, service: S) -> Self {
        self.services
            .push((Some(listener.into()), service.into_handler().0));
        self
    }

    /// Serves every listener that no [`Server::service`] names with `service`. Without one, a
    /// listener no service claims is an error when the server starts.
    pub fn default_service<S: HttpService>(mut self, service: S) -> Self {
        self.services.push((None, service.into_handler().0));
        self
    }

    /// Serves the listener named `listener` over TLS with `config` (feature `rustls`); its
    /// service is chosen as for any listener ([`Server::service`], [`Server::default_service`]).
    /// A name with no listener, or TLS given twice for one name, is an error when the server
    /// starts (before `READY=1`).
    ///
    /// - **ALPN**: if `config.alpn_protocols` is empty, handover sets it to `h2`, `http/1.1`
    ///   (in that order of preference). A connection that agrees on `h2` is served as HTTP/2,
    ///   every other one (`http/1.1`, or no ALPN) as HTTP/1.1. Set your own list to restrict it
    ///   (`vec![b"http/1.1".to_vec()]`: no HTTP/2).
    /// - **Certificates** come with `config`, read once: build it from the files at start-up,
    ///   and rotate them by replacing the files and restarting (`SIGUSR1`, `systemctl reload`).
    ///   A new process whose files are broken fails before `READY=1`, and the old one keeps
    ///   serving (see `examples/tls.rs`).
    /// - **Handshakes** count as connections from accept on: they are timed out by
    ///   [`Server::header_read_timeout`], drained, and cut at the drain's deadline; a client
    ///   that never finishes its handshake cannot hold a shutdown or a restart.
    /// - **Restarts** hand over the listener, not established TLS sessions (their keys live in
    ///   this process): after a hand-off they are drained like a shutdown's connections
    ///   (`Connection: close`, GOAWAY), and their clients reconnect to the new process and
    ///   resume their sessions (an abbreviated handshake) with a session ticket.
    /// - **Session tickets**: handover sets `config.ticketer` to its own (unless the config has
    ///   an enabled ticketer of its own, which is then kept as it is): rustls's scheme
    ///   (ChaCha20-Poly1305, a new key every period, the previous one still accepted), with keys
    ///   that a restart passes to the new process over its private channel, so a ticket issued
    ///   before a restart resumes after it, TLS 1.3 and 1.2 alike
    ///   ([`Server::session_ticket_rotation`]). Nothing else of the config is changed:
    ///   `send_tls13_tickets` (rustls: 2 per handshake), `session_storage`, `max_early_data_size`
    ///   (0-RTT: off unless you turn it on) stay as given.
    ///
    /// The request's [`crate::ConnectionInfo::tls`] tells what was negotiated.
    ///
    /// # Example
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use std::convert::Infallible;
    /// use handover::rustls::{self, pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject}};
    ///
    /// # fn app() -> impl handover::HttpService {
    /// #     tower::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
    /// #         Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("hi"))))
    /// #     })
    /// # }
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let certs = CertificateDer::pem_file_iter("/etc/myapp/cert.pem")?.collect::<Result<Vec<_>, _>>()?;
    /// let key = PrivateKeyDer::from_pem_file("/etc/myapp/key.pem")?;
    /// let config = rustls::ServerConfig::builder_with_provider(Arc::new(
    ///     rustls::crypto::ring::default_provider(),
    /// ))
    /// .with_safe_default_protocol_versions()?
    /// .with_no_client_auth()
    /// .with_single_cert(certs, key)?; // fails if the key does not match the certificate
    ///
    /// let mut listeners = handover::Listeners::from_env()?;
    /// let web = listeners.take_or_bind("web", "127.0.0.1:8443".parse()?)?;
    /// let server = handover::Server::new([web])
    ///     .service("web", app())
    ///     .tls("web", Arc::new(config));
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
    pub fn tls(
        mut self,
        listener: impl Into<String>,
        config: std::sync::Arc<rustls::ServerConfig>,
    ) -> Self {
        let mut config = std::sync::Arc::unwrap_or_clone(config);
        crate::tickets::apply(&mut config);
        self.tls.push((
            listener.into(),
            crate::tls::with_default_alpn(std::sync::Arc::new(config)),
        ));
        self
    }

    /// How often the TLS session ticket key changes (feature `rustls`; default 6 hours, as
    /// rustls's own `Ticketer`; at least a second). A ticket is accepted while its key is the
    /// current or the previous one: for at least one period and at most two, across restarts
    /// too (the keys go to the new process, see [`Server::tls`]), and refused after that. The
    /// period is the process's: every TLS listener shares one set of keys.
    #[cfg(feature = "rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
    pub fn session_ticket_rotation(self, period: std::time::Duration) -> Self {
        crate::tickets::ticketer().set_period(period);
        self
    }

    /// A handle to restart or shut down this server from code, and to watch its state. Every
    /// call returns a handle to the same server; commands sent before it runs wait for it.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The signals that shut down (default `SIGINT`, `SIGTERM`). Replaces the previous set. A
    /// signal in both sets shuts down. Under systemd keep `SIGTERM` here (or set `KillSignal=`
    /// to one of these): an unhandled `SIGTERM` kills the process without a drain.
    pub fn close_signals(mut self, signals: impl IntoIterator<Item = i32>) -> Self {
        self.config.close_signals = signals.into_iter().collect();
        self
    }

    /// The signals that restart (default `SIGUSR1`, `SIGUSR2`). Replaces the previous set; an
    /// empty set leaves restarts to [`Handle::restart`]. A signal in neither set keeps its
    /// default action, and `SIGUSR1`'s and `SIGUSR2`'s end the process: the shipped units send
    /// `SIGUSR1` on `systemctl reload`.
    pub fn restart_signals(mut self, signals: impl IntoIterator<Item = i32>) -> Self {
        self.config.restart_signals = signals.into_iter().collect();
        self
    }

    /// Whether this server can restart at all (default `true`). `false`: the restart signals
    /// are still caught but ignored (logged), so a `systemctl reload` does not kill the
    /// process; [`Handle::restart`] is refused; and another server of the process may restart
    /// (only one per process can).
    pub fn restarts(mut self, enabled: bool) -> Self {
        self.config.restarts = enabled;
        self
    }

    /// How long the drain may take, hooks and connections together (default 5 s), counted from
    /// when accepting stops. At the end, connections still open are cut, and counted in
    /// [`Shutdown::cut`]. Any value is accepted (`Duration::MAX` means "no deadline").
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// The lame duck (default zero: none). On a close signal or [`Handle::shutdown`], the
    /// server reports `STOPPING=1` and [`crate::State::LameDuck`] at once, but **keeps
    /// accepting and serving** for `delay` (HTTP/1 responses carry `Connection: close`,
    /// HTTP/2 connections get GOAWAY, so clients move away), so that a load balancer or
    /// Kubernetes has time to stop sending traffic; then it stops accepting and drains as
    /// usual, with its own [`Server::drain_timeout`]. A second close signal during the delay
    /// ends it at once (a third cuts). Restarts are not delayed.
    pub fn shutdown_delay(mut self, delay: Duration) -> Self {
        self.config.shutdown_delay = delay;
        self
    }

    /// How long a restarted process has to report `READY=1` (default 10 s), the start of the
    /// process included, before it is killed and this one carries on.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.config.ready_timeout = timeout;
        self
    }

    /// How long an HTTP/1 keep-alive connection that is idle when a shutdown's drain starts is
    /// kept open, in case its client is sending a request right now (default 100 ms). Busy
    /// connections are closed after their next response instead, which carries
    /// `Connection: close`. Short, because a stopping service should stop quickly.
    pub fn keep_alive_grace(mut self, grace: Duration) -> Self {
        self.config.keep_alive_grace = grace;
        self
    }

    /// The same after a hand-off to a new process (default 1 s), for the connections that stay
    /// in the old process: TLS ones, and every HTTP/1 one when the new process does not take
    /// connections ([`Server::connection_handoff`]) or passing them failed. Nothing hurries the
    /// old process then, and a keep-alive client that sends within the grace is answered (with
    /// `Connection: close`) and reconnects to the new process without seeing a closed
    /// connection.
    pub fn restart_keep_alive_grace(mut self, grace: Duration) -> Self {
        self.config.restart_keep_alive_grace = grace;
        self
    }

    /// How long a connection may go without a complete request head (default 30 s): from
    /// accept to its first request, and from each response to the next request. A slow client
    /// cannot hold a connection open longer than this, nor a drain longer than its deadline;
    /// idle keep-alive connections are closed after it. HTTP/2 too: its preface and first
    /// SETTINGS frame must come within it, and a connection without an open stream for that
    /// long gets GOAWAY. Checked about once a second for all connections (not with a timer per
    /// request); `Duration::ZERO` disables it.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.config.header_read_timeout = timeout;
        self
    }

    /// Also hand the listeners this process bound itself to systemd's fd store (`FDSTORE=1`,
    /// `FDNAME=` the listener's name), so that a `systemctl restart` or a crash does not close
    /// them: the next start gets them back through `LISTEN_FDS`. Needs
    /// `FileDescriptorStoreMax=` in the service. Inherited listeners are never stored: they
    /// belong to a socket unit, or came out of the store already. Default off.
    pub fn fd_store(mut self, enabled: bool) -> Self {
        self.config.fd_store = enabled;
        self
    }

    /// Whether established connections move to the new process after a restart (default
    /// `true`). A restart then passes every plaintext HTTP/1 connection to the new process at
    /// its next request boundary (at once if idle, right after its response if busy), with
    /// the bytes already read from it, so an idle keep-alive client never finds its connection
    /// closed. It takes effect only between two handover processes that both have it on; with
    /// a new binary that does not take connections (or when passing fails) connections drain
    /// as without it: `Connection: close`, then the keep-alive grace. HTTP/2 (GOAWAY), TLS
    /// (`Connection: close`) and upgraded connections stay in the old process, except
    /// WebSockets the application hands over itself ([`crate::upgrade`]). On the new
    /// process's side, `false` refuses connections from the previous one.
    pub fn connection_handoff(mut self, enabled: bool) -> Self {
        self.config.connection_handoff = enabled;
        self
    }

    /// Takes the upgraded connections (WebSockets) the previous process hands over after a
    /// restart ([`crate::upgrade::WebSocketIo::hand_off`]): `handler` is called, on a task of
    /// its own, with each one (its stream, the bytes read and not consumed, the application's
    /// state) and resumes serving it. Without a handler, this process tells the previous one
    /// that it takes none, and they stay there (to say goodbye). Needs
    /// [`Server::connection_handoff`] on (the default). See [`crate::upgrade`].
    pub fn resume_upgraded<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(crate::upgrade::Resumed) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.config.resume_upgraded = Some(crate::upgrade::ResumeHandler::new(handler));
        self
    }

    /// Whether every request carries its [`crate::ConnectionInfo`] (and, with the `axum`
    /// feature, axum's `ConnectInfo<SocketAddr>`) in its extensions (default `true`).
    ///
    /// Putting a value in a request's extensions allocates its map (`http::Extensions`): about
    /// 700 instructions per request with glibc's allocator, some 8 % of what hyper spends on a
    /// minimal request (see docs/benchmarks.md; axum's `ConnectInfo` costs the same). A service that never looks
    /// at the connection can save that with `false`; handlers then find no `ConnectionInfo`.
    pub fn connection_info(mut self, enabled: bool) -> Self {
        self.config.connection_info = enabled;
        self
    }

    /// Configures hyper's HTTP/1 connections (header limits, `max_buf_size`, ...).
    ///
    /// handover has set, before `configure` runs: a tokio timer, `half_close(true)`, and
    /// `header_read_timeout(None)`, because [`Server::header_read_timeout`] is enforced by
    /// handover (setting hyper's arms a timer per request on top of it).
    pub fn http1(
        mut self,
        configure: impl FnOnce(&mut hyper::server::conn::http1::Builder),
    ) -> Self {
        configure(&mut self.http.h1);
        self
    }

    /// Configures hyper's HTTP/2 connections (stream limits, keep-alive pings, window sizes,
    /// ...). handover has set a tokio timer, which keep-alive pings need.
    pub fn http2(
        mut self,
        configure: impl FnOnce(&mut hyper::server::conn::http2::Builder<TokioExecutor>),
    ) -> Self {
        configure(&mut self.http.h2);
        self
    }

    /// Adds a shutdown hook. Hooks run in the order they were added, each to completion, after
    /// the listeners stop accepting and before the connections are drained (as in the Go
    /// original: requests already being served go on meanwhile, so release what they still
    /// need after the server's future returns, not here). They also run in the old process
    /// after a hand-off (see [`Shutdown::reason`]), so they must not undo what the new process
    /// uses (a pid file, a registration): `handle.state()` tells, in the hook, whether the
    /// process handed over ([`crate::State::HandedOver`]) or the service stops
    /// ([`crate::State::Draining`]). A sync hook runs on a thread of its own, inside the
    /// serving runtime's context.
    pub fn on_shutdown(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.hooks.push(Hook::sync(hook));
        self
    }

    /// Adds an async shutdown hook; see [`Server::on_shutdown`].
    pub fn on_shutdown_async<F, Fut>(mut self, hook: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.hooks.push(Hook::future(hook));
        self
    }

    /// Also shut down (as [`Handle::shutdown`] does) when `signal` completes, as with axum's
    /// `with_graceful_shutdown`. Called several times, the first future to complete counts.
    pub fn with_graceful_shutdown(
        mut self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        self.shutdown_signals.push(Box::pin(signal));
        self
    }
}

impl IntoFuture for Server {
    type Output = Result<Shutdown, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Shutdown, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(crate::lifecycle::run(self))
    }
}
