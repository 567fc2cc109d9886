//! What a request knows about its connection.
//!
//! Every request handover serves carries a [`ConnectionInfo`] in its extensions: the peer, the
//! local address, the name of the listener it came in on, and a [`Handle`] to the server (its
//! lifecycle [`State`], for a `/healthz`). It is made once per connection, at accept (or when a
//! connection handed over by the previous process arrives), and shared by the connection's
//! requests: each request gets a clone of one `Arc`.
//!
//! With the `axum` feature, requests on TCP connections also carry
//! `axum::extract::ConnectInfo<SocketAddr>`, so an axum handler that extracts
//! `ConnectInfo<SocketAddr>` works unchanged.
//!
//! # Example
//! ```
//! use handover::ConnectionInfo;
//!
//! async fn whoami(req: hyper::Request<hyper::body::Incoming>) -> String {
//!     match req.extensions().get::<ConnectionInfo>() {
//!         Some(conn) => format!("{:?} on {}", conn.peer(), conn.listener()),
//!         None => "not served by handover".to_string(),
//!     }
//! }
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::handle::{Handle, State, StateReached};

/// The connection a request came in on; in the extensions of every request.
///
/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct ConnectionInfo {
    inner: Arc<Inner>,
}

struct Inner {
    listener: Arc<str>,
    peer: Peer,
    local: Local,
    handle: Handle,
    /// Set once, when the handshake is complete, before any request is served.
    #[cfg(feature = "rustls")]
    tls: std::sync::OnceLock<TlsInfo>,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Peer {
    /// A TCP peer (IPv4 or IPv6).
    Tcp(SocketAddr),
    /// A Unix-socket peer.
    Unix {
        /// The peer's socket path, if it bound one (clients usually do not).
        path: Option<PathBuf>,
        /// The peer's credentials at connect time (`SO_PEERCRED`), if the kernel gave them.
        credentials: Option<PeerCredentials>,
    },
}

/// The credentials of a Unix-socket peer, as the kernel recorded them when it connected
/// (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// The peer's process id, if it is visible from this PID namespace.
    pub pid: Option<u32>,
    /// The peer's effective user id.
    pub uid: u32,
    /// The peer's effective group id.
    pub gid: u32,
}

/// Where a connection arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Local {
    /// A TCP address of this host.
    Tcp(SocketAddr),
    /// A Unix socket path (`None` for an abstract or unnamed socket).
    Unix(Option<PathBuf>),
}

impl ConnectionInfo {
    pub(crate) fn new(listener: Arc<str>, peer: Peer, local: Local, handle: Handle) -> Self {
        ConnectionInfo {
            inner: Arc::new(Inner {
                listener,
                peer,
                local,
                handle,
                #[cfg(feature = "rustls")]
                tls: std::sync::OnceLock::new(),
            }),
        }
    }

    #[cfg(feature = "rustls")]
    pub(crate) fn set_tls(&self, tls: TlsInfo) {
        let _ = self.inner.tls.set(tls);
    }

    /// The name of the listener the connection came in on (see [`crate::Listener::name`]).
    pub fn listener(&self) -> &str {
        &self.inner.listener
    }

    /// The peer.
    pub fn peer(&self) -> &Peer {
        &self.inner.peer
    }

    /// The peer's TCP address, for TCP connections.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match self.inner.peer {
            Peer::Tcp(addr) => Some(addr),
            Peer::Unix { .. } => None,
        }
    }

    /// Where the connection arrived.
    pub fn local(&self) -> &Local {
        &self.inner.local
    }

    /// The local TCP address, for TCP connections.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self.inner.local {
            Local::Tcp(addr) => Some(addr),
            Local::Unix(_) => None,
        }
    }

    /// The TLS session, on a connection of a TLS listener ([`crate::Server::tls`]): server
    /// name (SNI), ALPN protocol, version, cipher suite, client certificates. `None` on
    /// plaintext connections. Available with the `rustls` feature.
    #[cfg(feature = "rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
    pub fn tls(&self) -> Option<&crate::TlsInfo> {
        self.inner.tls.get()
    }

    /// The server's lifecycle state now: a `/healthz` answers 503 once
    /// [`State::is_shutting_down`] is true.
    pub fn state(&self) -> State {
        self.inner.handle.state()
    }

    /// A handle to the server that serves this connection (restart or shut it down from a
    /// request handler, watch its state).
    pub fn handle(&self) -> &Handle {
        &self.inner.handle
    }

    /// Resolves once the process serving this connection is going away (handed over, or
    /// draining): see [`Handle::going_away`]. What a WebSocket or server-sent-events handler
    /// awaits to say goodbye; `Send + 'static`.
    ///
    /// # Example
    /// A stream of events that ends when the process goes away, so that the client reconnects
    /// (an `EventSource` does, with `Last-Event-ID`) to the process that serves now:
    /// ```
    /// use handover::ConnectionInfo;
    ///
    /// async fn events(conn: ConnectionInfo, mut next: tokio::sync::mpsc::Receiver<String>) {
    ///     let going_away = conn.going_away();
    ///     tokio::pin!(going_away);
    ///     loop {
    ///         tokio::select! {
    ///             state = &mut going_away => {
    ///                 println!("{state}: ending the stream");
    ///                 break;
    ///             }
    ///             event = next.recv() => match event {
    ///                 Some(event) => println!("data: {event}"),
    ///                 None => break,
    ///             },
    ///         }
    ///     }
    /// }
    /// ```
    pub fn going_away(&self) -> StateReached {
        self.inner.handle.going_away()
    }

    /// Resolves once the service is shutting down: see [`Handle::shutting_down`].
    pub fn shutting_down(&self) -> StateReached {
        self.inner.handle.shutting_down()
    }

    /// Resolves once this process has handed over to a successor: see
    /// [`Handle::handed_over`].
    pub fn handed_over(&self) -> StateReached {
        self.inner.handle.handed_over()
    }
}

impl fmt::Debug for ConnectionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ConnectionInfo");
        d.field("listener", &self.inner.listener)
            .field("peer", &self.inner.peer)
            .field("local", &self.inner.local);
        #[cfg(feature = "rustls")]
        d.field("tls", &self.inner.tls.get());
        d.finish_non_exhaustive()
    }
}

impl Peer {
    pub(crate) fn unix(path: Option<&Path>, credentials: Option<PeerCredentials>) -> Peer {
        Peer::Unix {
            path: path.map(Path::to_path_buf),
            credentials,
        }
    }
}

#[cfg(feature = "rustls")]
/// The TLS session of a connection, as negotiated by its handshake: in
/// [`crate::ConnectionInfo::tls`] for every request on a TLS listener ([`crate::Server::tls`]).
///
/// Available with the `rustls` feature.
///
/// # Example
/// ```
/// async fn who(req: hyper::Request<hyper::body::Incoming>) -> String {
///     let tls = req
///         .extensions()
///         .get::<handover::ConnectionInfo>()
///         .and_then(|c| c.tls());
///     match tls {
///         Some(tls) => format!(
///             "{} via {:?}, {}",
///             tls.server_name().unwrap_or("(no SNI)"),
///             tls.protocol_version(),
///             tls.cipher_suite_name(),
///         ),
///         None => "plaintext".to_string(),
///     }
/// }
/// ```
#[derive(Clone)]
pub struct TlsInfo {
    server_name: Option<Box<str>>,
    alpn_protocol: Option<Box<[u8]>>,
    protocol_version: rustls::ProtocolVersion,
    cipher_suite: rustls::CipherSuite,
    peer_certificates: Option<Box<[rustls::pki_types::CertificateDer<'static>]>>,
}

#[cfg(feature = "rustls")]
impl TlsInfo {
    pub(crate) fn from_session(session: &rustls::ServerConnection) -> TlsInfo {
        TlsInfo {
            server_name: session.server_name().map(Box::from),
            alpn_protocol: session.alpn_protocol().map(Box::from),
            // Both are known once the handshake is complete, which it is here.
            protocol_version: session
                .protocol_version()
                .unwrap_or(rustls::ProtocolVersion::Unknown(0)),
            cipher_suite: session
                .negotiated_cipher_suite()
                .map_or(rustls::CipherSuite::Unknown(0), |s| s.suite()),
            peer_certificates: session.peer_certificates().map(Box::from),
        }
    }

    /// The server name the client asked for (SNI), if it sent one (clients do not for an IP
    /// address).
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The application protocol agreed by ALPN (`b"h2"`, `b"http/1.1"`), if the client offered
    /// one the server has. Without one the connection is served as HTTP/1.1.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn_protocol.as_deref()
    }

    /// The TLS version (`rustls::ProtocolVersion::TLSv1_3`, `TLSv1_2`).
    pub fn protocol_version(&self) -> rustls::ProtocolVersion {
        self.protocol_version
    }

    /// The cipher suite.
    pub fn cipher_suite(&self) -> rustls::CipherSuite {
        self.cipher_suite
    }

    /// The cipher suite's IANA name, as rustls spells it: `TLS13_AES_128_GCM_SHA256`.
    pub fn cipher_suite_name(&self) -> &'static str {
        self.cipher_suite.as_str().unwrap_or("unknown")
    }

    /// The client's certificate chain (DER, its own certificate first), when the server's
    /// config asks for client certificates (`with_client_cert_verifier`) and the client sent
    /// one; the verifier has accepted it.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.peer_certificates.as_deref()
    }
}

#[cfg(feature = "rustls")]
impl fmt::Debug for TlsInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsInfo")
            .field("server_name", &self.server_name)
            .field(
                "alpn_protocol",
                &self.alpn_protocol.as_deref().map(String::from_utf8_lossy),
            )
            .field("protocol_version", &self.protocol_version)
            .field("cipher_suite", &self.cipher_suite)
            .field(
                "peer_certificates",
                &self.peer_certificates.as_ref().map(|c| c.len()),
            )
            .finish()
    }
}
