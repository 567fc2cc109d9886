//! TLS listeners (feature `rustls`): the handshake, under the drain's rules, then the same
//! HTTP/1 and HTTP/2 serving as plaintext.
//!
//! # Why the handshake cannot hold a drain or a restart
//! A connection is registered (counted, drained, cut at the deadline) when it is accepted, before
//! its handshake, in the phase [`Phase::Handshake`], which the sweeper times out with the
//! header-read timeout like a request head. The handshake future is dropped as soon as the
//! connection is cut: a client that opens TCP and sends half a `ClientHello`, or nothing, is
//! closed by the header-read timeout while serving, and at the drain's deadline (counted in
//! [`crate::Shutdown::cut`]) while draining.
//!
//! A handshake in progress when the drain starts is not closed early: its client has sent (or is
//! sending) a `ClientHello` to a listener that was open, and will send its first request right
//! after. Once the handshake is done, the connection is idle like a new plaintext one (closed at
//! the end of the keep-alive grace if no request comes), except when it ends after the grace:
//! then its first request is awaited and answered, with `Connection: close` (HTTP/1) or GOAWAY
//! (HTTP/2), so the client reconnects, to the new process after a restart.
//!
//! # Not passed to a successor
//! A TLS session's keys and sequence numbers live in this process's memory: its connection is
//! registered as not passable, so after a hand-off it is drained like a shutdown's connections
//! (keep-alive grace, `Connection: close`, GOAWAY). Its client reconnects and resumes the session
//! (TLS session tickets) with the new process.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use rustls::pki_types::CertificateDer;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::accept::{ConnContext, HandOffSlot, ServeConn};
use crate::conn::{self, CLOSE_IDLE, CUT, Conn, Http, Phase, TrackedIo, Transport};
use crate::drain::Shared;
use crate::error::{BoxError, Error};
use crate::listen::Listener;

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
    peer_certificates: Option<Box<[CertificateDer<'static>]>>,
}

impl TlsInfo {
    fn from_session(session: &rustls::ServerConnection) -> TlsInfo {
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
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer_certificates.as_deref()
    }
}

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

/// The ALPN protocols handover serves, in the server's order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// `config`, with ALPN set to `h2`, `http/1.1` if it has none.
pub(crate) fn with_default_alpn(config: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    if !config.alpn_protocols.is_empty() {
        return config;
    }
    let mut config = Arc::unwrap_or_clone(config);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A listener with its service, as the lifecycle pairs them.
type Bound = (Listener, Box<dyn ServeConn>);

/// Serves the listeners named in `tls` over TLS. A name no listener has, or a name given twice,
/// is an error (at start-up, before `READY=1`).
pub(crate) fn apply(
    bound: Vec<Bound>,
    tls: Vec<(String, Arc<rustls::ServerConfig>)>,
) -> Result<Vec<Bound>, Error> {
    for (i, (name, _)) in tls.iter().enumerate() {
        if tls[..i].iter().any(|(n, _)| n == name) {
            return Err(Error::config(format!(
                "TLS is configured twice for the listener {name:?}: give one Server::tls per listener"
            )));
        }
        if !bound.iter().any(|(l, _)| l.name() == name) {
            let listeners = bound
                .iter()
                .map(|(l, _)| format!("{:?} ({})", l.name(), l.url()))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::config(format!(
                "TLS is configured for the listener {name:?}, but no listener has that name; the listeners are: {listeners}"
            )));
        }
    }
    let wrapped = bound
        .into_iter()
        .map(
            |(listener, inner)| match tls.iter().find(|(n, _)| n == listener.name()) {
                None => (listener, inner),
                Some((_, config)) => {
                    let acceptor = TlsAcceptor::from(Arc::clone(config));
                    let tls: Box<dyn ServeConn> = Box::new(TlsServeConn { inner, acceptor });
                    (listener, tls)
                }
            },
        )
        .collect();
    Ok(wrapped)
}

/// Serves each connection of a TLS listener: handshake, then the inner service.
struct TlsServeConn {
    inner: Box<dyn ServeConn>,
    acceptor: TlsAcceptor,
}

impl ServeConn for TlsServeConn {
    fn serve(
        &self,
        io: TrackedIo,
        read: Bytes,
        cx: &ConnContext,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        // Bytes read before the handshake would be a plaintext connection's: none come here,
        // because TLS connections are never passed on.
        debug_assert!(read.is_empty(), "BUG: read-ahead bytes on a TLS connection");
        // Set before the task runs: from accept on, the sweeper times the handshake.
        io.conn().set_phase(Phase::Handshake);
        self.inner.serve_tls(io, self.acceptor.clone(), cx)
    }

    fn serve_tls(
        &self,
        io: TrackedIo,
        acceptor: TlsAcceptor,
        cx: &ConnContext,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.inner.serve_tls(io, acceptor, cx)
    }

    fn clone_box(&self) -> Box<dyn ServeConn> {
        Box::new(TlsServeConn {
            inner: self.inner.clone_box(),
            acceptor: self.acceptor.clone(),
        })
    }

    fn passable(&self) -> bool {
        false
    }

    fn url(&self, listener: &Listener) -> String {
        let url = listener.url();
        match url.strip_prefix("http://") {
            Some(rest) => format!("https://{rest}"),
            None => format!("{url} (TLS)"),
        }
    }
}

/// Serves a TLS connection until it ends or is cut: the handshake (cut with the connection),
/// then HTTP/2 if ALPN agreed on `h2`, else HTTP/1.1.
pub(crate) async fn serve<S, B>(
    io: TrackedIo,
    acceptor: TlsAcceptor,
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
    let handshake = UntilCut {
        conn: &conn,
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
    let info = TlsInfo::from_session(stream.get_ref().1);
    let h2 = info.alpn_protocol() == Some(b"h2".as_slice());
    conn.info.set_tls(info);
    // Idle from here, as a plaintext connection before its first bytes: closed at the end of a
    // drain's keep-alive grace if no request comes. But a handshake that ends after the grace
    // was under way when the listener closed, and its client is sending its first request right
    // now: it is answered (with `Connection: close`), not closed under the client. Timed by the
    // header-read timeout, and cut at the deadline, either way.
    let late = conn.ctl.load(Ordering::Acquire) & CLOSE_IDLE != 0;
    conn.set_phase(if late { Phase::Reading } else { Phase::Idle });
    conn::serve_known(stream, Bytes::new(), h2, service, http, shared, hand_off).await;
}

impl Transport for TlsStream<TrackedIo> {
    fn conn(&self) -> &Arc<Conn> {
        self.get_ref().0.conn()
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
        // this process), so the server sends them no `HAND_OFF`.
        std::future::ready(Err((self, read)))
    }
}

/// Polls `inner` until it completes, or until the connection is cut (`None`).
struct UntilCut<'a, F> {
    conn: &'a Conn,
    inner: F,
}

impl<F: Future + Unpin> Future for UntilCut<'_, F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.conn.waker.register(cx.waker());
        if self.conn.ctl.load(Ordering::Acquire) & CUT != 0 {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll(cx).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accept::HttpService;

    fn config(alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let cert =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key.into())
            .expect("config");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    fn bound(names: &[&str]) -> Vec<Bound> {
        let service = tower::service_fn(|_req: Request<Incoming>| async {
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
        });
        names
            .iter()
            .map(|name| {
                let listener = crate::Listeners::bind(([127, 0, 0, 1], 0).into())
                    .expect("bind")
                    .into_vec()
                    .remove(0)
                    .with_name(*name);
                (listener, service.into_handler().0)
            })
            .collect()
    }

    #[test]
    fn alpn_defaults_to_h2_then_http1_and_a_given_list_is_kept() {
        let set = with_default_alpn(config(&[]));
        assert_eq!(
            set.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let given = with_default_alpn(config(&[b"http/1.1"]));
        assert_eq!(given.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn only_the_named_listener_is_served_over_tls_and_its_connections_are_not_passable() {
        let wrapped =
            apply(bound(&["web", "health"]), vec![("web".into(), config(&[]))]).expect("apply");
        let passable: Vec<(&str, bool)> = wrapped
            .iter()
            .map(|(l, s)| (l.name(), s.passable()))
            .collect();
        assert_eq!(passable, vec![("web", false), ("health", true)]);
        let urls: Vec<String> = wrapped.iter().map(|(l, s)| s.url(l)).collect();
        assert!(urls[0].starts_with("https://127.0.0.1:"), "{urls:?}");
        assert!(urls[1].starts_with("http://127.0.0.1:"), "{urls:?}");
    }

    #[test]
    fn a_name_without_listener_or_given_twice_is_a_start_up_error() {
        let e = apply(bound(&["web"]), vec![("wbe".into(), config(&[]))])
            .expect_err("no listener named wbe");
        let text = e.to_string();
        assert!(
            text.contains(r#"TLS is configured for the listener "wbe", but no listener has that name; the listeners are: "web" (http://127.0.0.1:"#),
            "{text}"
        );
        let e = apply(
            bound(&["web"]),
            vec![("web".into(), config(&[])), ("web".into(), config(&[]))],
        )
        .expect_err("twice");
        assert!(
            e.to_string()
                .contains("TLS is configured twice for the listener \"web\""),
            "{e}"
        );
    }
}
