//! TLS listeners (feature `rustls`): the handshake, under the drain's rules, then the same
//! HTTP/1 and HTTP/2 serving as plaintext.
//!
//! # Why the handshake cannot hold a drain or a restart
//! A connection is registered (counted, drained, cut at the deadline) when it is accepted, before
//! its handshake, in the phase `Handshake`, which the sweeper times out with the
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

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::accept::ServeConn;
use crate::error::Error;
use crate::listen::Listener;

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
                Some((_, config)) => (
                    listener,
                    inner.with_tls(TlsAcceptor::from(Arc::clone(config))),
                ),
            },
        )
        .collect();
    Ok(wrapped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accept::HttpService;
    use bytes::Bytes;
    use hyper::body::Incoming;
    use hyper::{Request, Response};

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
