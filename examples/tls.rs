//! Run with: `cargo run --example tls --features rustls -- --cert CERT.pem --key KEY.pem`
//!
//! HTTPS on the listener named `web` (HTTP/2 and HTTP/1.1 by ALPN), plain HTTP on the listener
//! named `health`: `/healthz` answers there (503 once shutting down), every other path is
//! redirected to https. Under systemd the listeners are the socket unit's, by
//! `FileDescriptorName=web` and `health`; without, `--web ADDR` (default `127.0.0.1:8443`) and
//! `--health ADDR` (default `127.0.0.1:8080`) are bound.
//!
//! The certificate chain and its private key are PEM files, `--cert PATH` and `--key PATH` (or
//! `HANDOVER_TLS_CERT`, `HANDOVER_TLS_KEY`), read once at start-up. With `--client-ca PATH` (or
//! `HANDOVER_TLS_CLIENT_CA`), clients must present a certificate signed by a CA of that file
//! (mutual TLS), and `/client-cert` answers with the client's certificate (DER), as
//! `ConnectionInfo::tls` gives it. `POST /restart` on the health listener (from a loopback
//! address) restarts through the handle and answers with the outcome. To rotate them, replace the
//! files and restart (`kill -USR1 <pid>`, `systemctl reload`): the new process serves the new
//! certificate, the old one finishes its connections with the old one. If the new files are
//! broken (unreadable, not PEM, a key that does not match the certificate), the new process
//! exits 1 before `READY=1` with an error naming the file and the problem, and the old process
//! keeps serving (`STATUS=Restart failed: ...`).
//!
//! ```text
//! curl --cacert CERT.pem https://localhost:8443/      # Hello world
//! curl --cacert CERT.pem https://localhost:8443/tls   # what was negotiated
//! curl -i http://127.0.0.1:8080/anything              # 308 to https://127.0.0.1:8443/anything
//! ```
//!
//! For the tests: every response carries `x-pid`; `?sleep_ms=N` delays `/` by N ms;
//! `HANDOVER_DRAIN_TIMEOUT_MS`, `HANDOVER_READY_TIMEOUT_MS` and
//! `HANDOVER_HEADER_READ_TIMEOUT_MS` override those timeouts, `HANDOVER_TICKET_ROTATION_MS` the
//! session ticket key's rotation period (default 6 h). `HANDOVER_FD_STORE=1` hands the listeners
//! it binds and the ticket keys to systemd's fd store (`FileDescriptorStoreMax=3`), so that TLS
//! sessions survive `systemctl restart` and crashes too.
//!
//! TLS sessions survive restarts: a client that resumes with a ticket from before a
//! `kill -USR1` resumes with the new process (`openssl s_client -sess_out s.pem`, restart,
//! `openssl s_client -sess_in s.pem` says `Reused`).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use handover::rustls::{
    self,
    pki_types::{CertificateDer, pem::PemObject},
};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

/// What the command line and the environment say.
struct Args {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    web: SocketAddr,
    health: SocketAddr,
}

fn main() -> ExitCode {
    common::init_tracing();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    // Before anything is served: a broken certificate must stop this process before it reports
    // READY=1, so that a restart rolls back and the old process keeps serving.
    let config = match load_tls(&args.cert, &args.key, args.client_ca.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };

    let mut listeners = match handover::Listeners::from_env() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (web, health) = match (
        listeners.take_or_bind("web", args.web),
        listeners.take_or_bind("health", args.health),
    ) {
        (Ok(w), Ok(h)) => (w, h),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(web_addr) = web.local_addr() else {
        tracing::error!("the `web` listener is not a TCP socket: {}", web.url());
        return ExitCode::FAILURE;
    };
    let pid = std::process::id();
    println!("listen on: https://{web_addr} (web), pid: {pid}");
    println!("listen on: {} (health), pid: {pid}", health.url());

    let server = handover::Server::new([web, health]);
    let handle = server.handle();
    let mut server = server
        .service("web", tower::service_fn(web_route))
        .service(
            "health",
            tower::service_fn(move |req| health_route(req, web_addr.port(), handle.clone())),
        )
        .tls("web", Arc::new(config));
    if let Some(t) = common::env_ms("HANDOVER_DRAIN_TIMEOUT_MS") {
        server = server.drain_timeout(t);
    }
    if let Some(t) = common::env_ms("HANDOVER_READY_TIMEOUT_MS") {
        server = server.ready_timeout(t);
    }
    if let Some(t) = common::env_ms("HANDOVER_HEADER_READ_TIMEOUT_MS") {
        server = server.header_read_timeout(t);
    }
    if let Some(t) = common::env_ms("HANDOVER_TICKET_ROTATION_MS") {
        server = server.session_ticket_rotation(t);
    }
    if std::env::var_os("HANDOVER_FD_STORE").is_some_and(|v| v == "1") {
        // The listeners it binds and the session ticket keys go to systemd's fd store.
        server = server.fd_store(true);
    }
    common::run(server)
}

fn parse_args() -> Result<Args, String> {
    let mut cert = std::env::var_os("HANDOVER_TLS_CERT").map(PathBuf::from);
    let mut key = std::env::var_os("HANDOVER_TLS_KEY").map(PathBuf::from);
    let mut client_ca = std::env::var_os("HANDOVER_TLS_CLIENT_CA").map(PathBuf::from);
    let mut web = "127.0.0.1:8443".to_string();
    let mut health = "127.0.0.1:8080".to_string();
    let mut args = std::env::args_os().skip(1);
    while let Some(flag) = args.next() {
        let flag = flag.to_string_lossy().into_owned();
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--cert" => cert = Some(value.into()),
            "--key" => key = Some(value.into()),
            "--client-ca" => client_ca = Some(value.into()),
            "--web" => web = value.to_string_lossy().into_owned(),
            "--health" => health = value.to_string_lossy().into_owned(),
            _ => {
                return Err(format!(
                    "unknown argument {flag:?}; expected --cert PATH, --key PATH, --client-ca PATH, --web ADDR, --health ADDR"
                ));
            }
        }
    }
    let addr = |flag: &str, a: &str| {
        a.parse::<SocketAddr>()
            .map_err(|e| format!("{flag} {a:?} is not an address like 127.0.0.1:8443: {e}"))
    };
    Ok(Args {
        cert: cert.ok_or("no certificate: give --cert PATH (or HANDOVER_TLS_CERT)")?,
        key: key.ok_or("no private key: give --key PATH (or HANDOVER_TLS_KEY)")?,
        client_ca,
        web: addr("--web", &web)?,
        health: addr("--health", &health)?,
    })
}

/// The server's TLS configuration from a PEM certificate chain and a PEM private key (and the
/// CA certificates that sign client certificates, for mutual TLS). Every error names the file
/// and what is wrong with it; in a restarted process, handover also tells the old process
/// (the restart's `RestartError::reason`, `STATUS=`).
fn load_tls(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, String> {
    // Checks that the key is the certificate's.
    let certificate = handover::TlsCertificate::load_pem(cert, key).map_err(|e| e.to_string())?;
    let Some(path) = client_ca else {
        return certificate.server_config().map_err(|e| e.to_string());
    };
    let fail = |e: String| {
        handover::report_start_failure(&e);
        e
    };
    // Mutual TLS: the same, with a client certificate verifier. Explicitly ring, the provider
    // handover's `rustls` feature enables: `builder()` would panic if another crate of the
    // application also enabled aws-lc-rs.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(path).map_err(fail)? {
        roots
            .add(ca)
            .map_err(|e| fail(format!("TLS client CA file {}: {e}", path.display())))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.into(),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| fail(format!("TLS client CA file {}: {e}", path.display())))?;
    let (chain, key) = certificate.into_parts();
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
        })
        .map_err(|e| fail(format!("TLS configuration: {e}")))
}

/// The CA certificates of a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("TLS client CA file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS client CA file {}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The HTTPS listener: `Hello world` (the tests' load), `/tls`: what the handshake agreed, and
/// `/client-cert`: the client's certificate.
async fn web_route(
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let tls = req
        .extensions()
        .get::<handover::ConnectionInfo>()
        .and_then(|c| c.tls())
        .cloned();
    match req.uri().path() {
        "/tls" => {}
        "/client-cert" => {
            let client = tls.and_then(|t| t.peer_certificates()?.first().cloned());
            let response = match client {
                Some(der) => Response::new(Full::new(Bytes::copy_from_slice(&der))),
                None => {
                    let mut r = Response::new(Full::new(Bytes::from("no client certificate\n")));
                    *r.status_mut() = StatusCode::NOT_FOUND;
                    r
                }
            };
            return Ok(with_pid(response));
        }
        _ => return common::hello(req).await,
    }
    let body = match tls {
        Some(tls) => format!(
            "sni={} alpn={} version={:?} suite={} client_certs={}\n",
            tls.server_name().unwrap_or("-"),
            tls.alpn_protocol()
                .map_or("-".into(), String::from_utf8_lossy),
            tls.protocol_version(),
            tls.cipher_suite_name(),
            tls.peer_certificates().map_or(0, <[_]>::len),
        ),
        None => "not TLS\n".to_string(),
    };
    Ok(with_pid(Response::new(Full::new(Bytes::from(body)))))
}

/// The plain HTTP listener: `/healthz`, and a redirect to https for everything else.
async fn health_route(
    req: Request<hyper::body::Incoming>,
    https_port: u16,
    handle: handover::Handle,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/restart" && req.method() == hyper::Method::POST {
        return Ok(with_pid(restart(&req, &handle).await));
    }
    if req.uri().path() == "/healthz" {
        let state = req
            .extensions()
            .get::<handover::ConnectionInfo>()
            .map(|c| c.state());
        let (status, body) = match state {
            Some(s) if s.is_shutting_down() => (StatusCode::SERVICE_UNAVAILABLE, s.as_str()),
            Some(s) => (StatusCode::OK, s.as_str()),
            None => (StatusCode::OK, "ok"),
        };
        let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
        *response.status_mut() = status;
        return Ok(with_pid(response));
    }
    // The host the client asked for, without its port; the address it connected to otherwise.
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<hyper::http::uri::Authority>().ok())
        .map(|a| a.host().to_string())
        .or_else(|| {
            req.extensions()
                .get::<handover::ConnectionInfo>()
                .and_then(|c| c.local_addr())
                .map(|a| match a {
                    SocketAddr::V4(a) => a.ip().to_string(),
                    SocketAddr::V6(a) => format!("[{}]", a.ip()),
                })
        })
        .unwrap_or_else(|| "localhost".to_string());
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let location = format!("https://{host}:{https_port}{path}");
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    match hyper::header::HeaderValue::try_from(location) {
        Ok(v) => {
            response.headers_mut().insert(hyper::header::LOCATION, v);
        }
        Err(_) => *response.status_mut() = StatusCode::BAD_REQUEST,
    }
    Ok(with_pid(response))
}

/// `POST /restart` (from a loopback address only): restarts through the handle; 200 with the
/// new pid, or 500 with why not: the new process's pid, how it ended and what it said (a broken
/// certificate file: which file and what is wrong with it).
async fn restart(
    req: &Request<hyper::body::Incoming>,
    handle: &handover::Handle,
) -> Response<Full<Bytes>> {
    let local = req
        .extensions()
        .get::<handover::ConnectionInfo>()
        .and_then(|c| c.peer_addr())
        .is_some_and(|a| a.ip().is_loopback());
    let (status, body) = if !local {
        (
            StatusCode::FORBIDDEN,
            "restart: loopback clients only\n".to_string(),
        )
    } else {
        match handle.restart().await {
            Ok(r) => (
                StatusCode::OK,
                format!("restarted: pid {} serves now\n", r.pid),
            ),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("restart failed: {e}\n"),
            ),
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn with_pid(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert("x-pid", std::process::id().into());
    response
}
