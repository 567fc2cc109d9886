//! TLS listeners (feature `rustls`): HTTPS with real TLS clients (rustls, and curl where it is
//! installed), HTTP/1.1 and HTTP/2 by ALPN, the negotiated details in `ConnectionInfo::tls`,
//! keep-alive TLS load across restarts, certificate rotation by restart, rollback on a broken
//! certificate, and handshakes that cannot hold a shutdown or a restart. Real processes (the
//! `tls` example), real signals, loopback only; the certificates are made here, by `rcgen`.

#![cfg(feature = "rustls")]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Version;
use rustix::process::Signal;
use support::*;
use tokio_rustls::rustls::{
    self, ClientConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};

const RESTARTS: usize = 5;

// ---------------------------------------------------------------------------------------------
// Certificates.

/// A test CA, and the certificates it signs.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate with its key, as PEM (for the server's files) and DER (for comparisons).
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "handover test CA");
        let key = rcgen::KeyPair::generate().expect("CA key");
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A server certificate for `localhost` and 127.0.0.1, with a key of its own.
    fn server(&self) -> Leaf {
        self.leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate (mutual TLS).
    fn client(&self) -> Leaf {
        self.leaf(
            vec!["client.test".into()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn leaf(&self, names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = rcgen::CertificateParams::new(names).expect("leaf params");
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

/// Where the server reads its certificate and key; replaced atomically (a rename), as a
/// certificate renewal does.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        Files {
            dir: scratch_dir(tag),
        }
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn install(&self, leaf: &Leaf) {
        replace_file(&self.cert(), &leaf.cert_pem);
        replace_file(&self.key(), &leaf.key_pem);
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

// ---------------------------------------------------------------------------------------------
// The server.

struct Server {
    proc: Proc,
    web: SocketAddr,
    health: SocketAddr,
}

/// The `tls` example on free loopback ports with the certificate in `files`, once it is ready.
fn start(notify: &NotifySocket, files: &Files, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut spawn = Spawn::new(example("tls"))
        .arg("--cert")
        .arg(files.cert())
        .arg("--key")
        .arg(files.key())
        .arg("--web")
        .arg(web.to_string())
        .arg("--health")
        .arg(health.to_string())
        .env("NOTIFY_SOCKET", &notify.path);
    for a in extra {
        spawn = spawn.arg(a);
    }
    for (k, v) in env {
        spawn = spawn.env(k, v);
    }
    let proc = spawn.start();
    let line = listen_line_of(&proc.lines, "web");
    assert!(line.contains(&format!("https://{web}")), "{line}");
    let ready = notify.wait_line("READY=1", SOON);
    assert_eq!(ready.pid, proc.pid);
    assert!(
        ready.text.contains(&format!("https://{web}")),
        "STATUS= names the HTTPS listener: {ready:?}"
    );
    Server { proc, web, health }
}

// ---------------------------------------------------------------------------------------------
// TLS clients.

/// A rustls client that trusts `ca`, offering `alpn`.
fn client_config(ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    client_config_with(ca, alpn, rustls::DEFAULT_VERSIONS, None)
}

fn client_config_with(
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
    client: Option<&Leaf>,
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("trust the test CA");
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der.clone()],
                PrivateKeyDer::from(PrivatePkcs8KeyDer::from(leaf.key_der.clone())),
            )
            .expect("client certificate"),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// `config` with no session resumption: every handshake is a full one, and shows the
/// certificate the server has now.
fn without_resumption(config: Arc<ClientConfig>) -> Arc<ClientConfig> {
    let mut config = Arc::unwrap_or_clone(config);
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Connects to `addr` as `localhost` (the SNI name); returns the stream and the certificate the
/// server presented.
async fn connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> Result<(TlsStream, CertificateDer<'static>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("localhost").expect("server name");
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or("the server presented no certificate")?;
    Ok((stream, leaf))
}

/// A response as these tests see it.
#[derive(Debug)]
struct Answer {
    status: u16,
    version: Version,
    pid: u32,
    body: Bytes,
    close: bool,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn answer(resp: hyper::Response<hyper::body::Incoming>) -> Result<Answer, String> {
    let status = resp.status().as_u16();
    let version = resp.version();
    let pid = resp
        .headers()
        .get("x-pid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let close = resp
        .headers()
        .get("connection")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Answer {
        status,
        version,
        pid,
        body,
        close,
    })
}

fn request(path: &str, close: bool) -> hyper::Request<Empty<Bytes>> {
    let mut req = hyper::Request::get(format!("https://localhost{path}"));
    if close {
        req = req.header("connection", "close");
    }
    req.body(Empty::new()).expect("request")
}

/// One GET on a new TLS connection, HTTP/2 if ALPN agreed on it, else HTTP/1.1; with the
/// certificate the server presented. With `close`, HTTP/1.1 asks for `Connection: close` and
/// waits until the server has closed the connection.
fn get_tls(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    path: &str,
    close: bool,
) -> Result<(Answer, CertificateDer<'static>), String> {
    runtime().block_on(async {
        let (stream, leaf) = connect(addr, config).await?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        let io = hyper_util::rt::TokioIo::new(stream);
        let got = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            let resp = sender
                .send_request(request(path, false))
                .await
                .map_err(|e| format!("request: {e}"))?;
            answer(resp).await?
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let conn = tokio::spawn(conn);
            let resp = sender
                .send_request(request(path, close))
                .await
                .map_err(|e| format!("request: {e}"))?;
            let got = answer(resp).await?;
            if close {
                drop(sender);
                tokio::time::timeout(SOON, conn)
                    .await
                    .map_err(|_| "the server did not close the connection".to_string())?
                    .map_err(|e| format!("connection task: {e}"))?
                    .map_err(|e| format!("connection: {e}"))?;
            }
            got
        };
        Ok((got, leaf))
    })
}

// ---------------------------------------------------------------------------------------------
// Keep-alive load over TLS.

/// What a TLS load saw: as [`LoadReport`], plus which certificates each pid presented.
#[derive(Debug, Default)]
struct TlsReport {
    ok: u64,
    failed: u64,
    errors: Vec<String>,
    pids: BTreeSet<u32>,
    retried: u64,
    /// For each pid that answered, the certificates (DER) of the connections it answered on.
    certs: BTreeMap<u32, BTreeSet<Vec<u8>>>,
}

/// Keep-alive clients over TLS, with the criteria of the plain load (`support::Load`): a
/// request that was sent and got no complete response is a failure; a connection closed after
/// a `Connection: close` response, or found closed (GOAWAY) before a request was written, is
/// reopened; an HTTP/2 stream the server's GOAWAY declared unprocessed is sent again.
struct TlsLoad {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<TlsReport>,
    seen: Seen,
}

/// Answers so far, by pid.
type Seen = Arc<(Mutex<BTreeMap<u32, u64>>, Condvar)>;

const MAX_PER_CONN: u64 = 100_000;

impl TlsLoad {
    /// `h1` HTTP/1.1 and `h2` HTTP/2 connections to `addr`, for at most `max_time`; with
    /// `resume`, a reconnecting client resumes its TLS session.
    fn start(
        addr: SocketAddr,
        ca: &CertificateDer<'static>,
        h1: usize,
        h2: usize,
        max_time: Duration,
        resume: bool,
    ) -> TlsLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Seen = Default::default();
        let (mut h1_config, mut h2_config) = (
            client_config(ca, &[b"http/1.1"]),
            client_config(ca, &[b"h2"]),
        );
        if !resume {
            h1_config = without_resumption(h1_config);
            h2_config = without_resumption(h2_config);
        }
        let (s, seen2) = (stop.clone(), seen.clone());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("load runtime");
            rt.block_on(async move {
                let deadline = tokio::time::Instant::now() + max_time;
                let mut tasks = Vec::new();
                for i in 0..h1 + h2 {
                    let config = if i < h1 { &h1_config } else { &h2_config };
                    tasks.push(tokio::spawn(tls_client(
                        addr,
                        Arc::clone(config),
                        i >= h1,
                        s.clone(),
                        deadline,
                        seen2.clone(),
                    )));
                }
                let mut total = TlsReport::default();
                for t in tasks {
                    match t.await {
                        Ok(r) => {
                            total.ok += r.ok;
                            total.failed += r.failed;
                            total.retried += r.retried;
                            total.errors.extend(r.errors);
                            total.pids.extend(r.pids);
                            for (pid, certs) in r.certs {
                                total.certs.entry(pid).or_default().extend(certs);
                            }
                        }
                        Err(e) => {
                            total.failed += 1;
                            total.errors.push(format!("client task: {e}"));
                        }
                    }
                }
                total
            })
        });
        TlsLoad { stop, handle, seen }
    }

    /// Waits until some response came from `pid`.
    fn wait_pid(&self, pid: u32, timeout: Duration) {
        self.wait_answers(pid, 1, timeout);
    }

    /// Waits until `n` responses came from `pid`.
    fn wait_answers(&self, pid: u32, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.seen;
        let mut seen = m.lock().unwrap_or_else(|p| p.into_inner());
        while seen.get(&pid).copied().unwrap_or(0) < n {
            let now = Instant::now();
            assert!(
                now < deadline,
                "not {n} responses from pid {pid} within {timeout:?}: {seen:?}"
            );
            seen = cv
                .wait_timeout(seen, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn stop(self) -> TlsReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("load thread")
    }
}

/// The sending side of one keep-alive connection, HTTP/1.1 or HTTP/2.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn tls_client(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    h2: bool,
    stop: Arc<AtomicBool>,
    deadline: tokio::time::Instant,
    seen: Seen,
) -> TlsReport {
    let mut report = TlsReport::default();
    let mut sent = 0u64;
    let running = |sent: u64| {
        !stop.load(Ordering::Relaxed)
            && tokio::time::Instant::now() < deadline
            && sent < MAX_PER_CONN
    };
    'outer: while running(sent) {
        let (stream, leaf) = match connect(addr, &config).await {
            Ok(s) => s,
            Err(e) => {
                report.failed += 1;
                report.errors.push(e);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let io = hyper_util::rt::TokioIo::new(stream);
        let mut sender = if h2 {
            match hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
            {
                Ok((s, conn)) => {
                    tokio::spawn(conn);
                    Sender::H2(s)
                }
                Err(e) => {
                    report.failed += 1;
                    report.errors.push(format!("h2 handshake: {e}"));
                    continue;
                }
            }
        } else {
            match hyper::client::conn::http1::handshake(io).await {
                Ok((s, conn)) => {
                    tokio::spawn(conn);
                    Sender::H1(s)
                }
                Err(e) => {
                    report.failed += 1;
                    report.errors.push(format!("handshake: {e}"));
                    continue;
                }
            }
        };
        while running(sent) {
            // A connection the server closed (HTTP/1) or sent GOAWAY on (HTTP/2) is not ready:
            // reconnect, nothing was sent.
            let ready = match &mut sender {
                Sender::H1(s) => s.ready().await.is_ok(),
                Sender::H2(s) => s.ready().await.is_ok(),
            };
            if !ready {
                continue 'outer;
            }
            sent += 1;
            let result = match &mut sender {
                Sender::H1(s) => s.send_request(request("/", false)).await,
                Sender::H2(s) => s.send_request(request("/", false)).await,
            };
            let result = match result {
                Ok(resp) => answer(resp).await,
                // HTTP/2 only: the stream never reached the server (GOAWAY raced with it), or
                // the server's GOAWAY declared it unprocessed (RFC 9113 8.7): sent again, on a
                // new connection, as hyper-util's pooled client does.
                Err(e) if h2 && (e.is_canceled() || unprocessed(&e)) => {
                    sent -= 1;
                    report.retried += 1;
                    continue 'outer;
                }
                Err(e) => Err(format!(
                    "request: {e} ({:?})",
                    std::error::Error::source(&e)
                )),
            };
            match result {
                Ok(a) if a.status == 200 && a.body.as_ref() == b"Hello world" => {
                    report.ok += 1;
                    report.certs.entry(a.pid).or_default().insert(leaf.to_vec());
                    report.pids.insert(a.pid);
                    *seen
                        .0
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(a.pid)
                        .or_default() += 1;
                    seen.1.notify_all();
                    if a.close {
                        continue 'outer;
                    }
                }
                Ok(a) => {
                    report.failed += 1;
                    report.errors.push(format!("bad answer: {a:?}"));
                }
                Err(e) => {
                    report.failed += 1;
                    report.errors.push(e);
                    continue 'outer;
                }
            }
        }
        break;
    }
    report
}

/// Restarts `server` once (SIGUSR1 to `old`, the `n`-th hand-off seen on `notify`): returns
/// the new pid once the old process has exited 0.
fn restart(notify: &NotifySocket, server: &mut Proc, old: u32, n: usize) -> u32 {
    signal(old, Signal::USR1);
    let handed = notify.wait_nth(n, SOON, |m| m.has("READY=1") && m.text.contains("MAINPID="));
    assert_eq!(
        handed.pid, old,
        "the old main process announces its successor"
    );
    let new = mainpid(&handed);
    assert_ne!(new, old);
    let code = if old == server.pid {
        server.wait(SOON)
    } else {
        wait_exit(old, SOON)
    };
    assert_eq!(code, Some(0), "old process {old} exit code");
    new
}

fn stop(last: u32, pids: &[u32]) {
    signal(last, Signal::TERM);
    assert_eq!(wait_exit(last, SOON), Some(0));
    assert_none_left(pids.iter().copied());
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// ALPN picks the protocol (HTTP/2 for `h2`, HTTP/1.1 for `http/1.1` and for no ALPN), and the
/// handler sees what the handshake agreed: SNI, ALPN, version (TLS 1.3, and 1.2 for a client
/// that offers only 1.2), cipher suite. The plain listener serves `/healthz` and redirects the
/// rest to https.
#[test]
fn https_serves_http2_and_http1_by_alpn_and_the_handler_sees_the_session() {
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let files = Files::new("tls-alpn");
    files.install(&ca.server());
    let mut server = start(&notify, &files, &[], &[]);
    let pid = server.proc.pid;

    let cases: [(&[&[u8]], Version, &str); 4] = [
        (&[b"h2", b"http/1.1"], Version::HTTP_2, "alpn=h2 "),
        (&[b"h2"], Version::HTTP_2, "alpn=h2 "),
        (&[b"http/1.1"], Version::HTTP_11, "alpn=http/1.1 "),
        (&[], Version::HTTP_11, "alpn=- "),
    ];
    for (alpn, version, says) in cases {
        let config = client_config(&ca.der(), alpn);
        let (a, _) = get_tls(server.web, &config, "/tls", false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (a.status, a.version, a.pid),
            (200, version, pid),
            "{alpn:?}: {a:?}"
        );
        let text = a.text();
        assert!(text.contains(says), "{alpn:?}: {text}");
        assert!(text.starts_with("sni=localhost "), "{text}");
        assert!(text.contains("version=TLSv1_3 suite=TLS13_"), "{text}");
        assert!(text.contains("client_certs=0"), "{text}");
        let (hello, _) = get_tls(server.web, &config, "/", false).expect("GET /");
        assert_eq!((hello.status, hello.text().as_str()), (200, "Hello world"));
    }
    let tls12 = client_config_with(&ca.der(), &[b"h2"], &[&rustls::version::TLS12], None);
    let (a, _) = get_tls(server.web, &tls12, "/tls", false).expect("TLS 1.2");
    assert_eq!(a.version, Version::HTTP_2);
    assert!(
        a.text().contains("version=TLSv1_2 suite=TLS_ECDHE_"),
        "{}",
        a.text()
    );

    // The plain listener.
    let health = get(server.health, "/healthz").expect("/healthz");
    assert_eq!(
        (health.status, health.body.as_str(), health.pid),
        (200, "serving\n", pid)
    );
    let raw = raw_get(server.health, "/x?y=1");
    assert!(raw.starts_with("HTTP/1.1 308 "), "{raw}");
    assert!(
        raw.contains(&format!("location: https://{}/x?y=1", server.web)),
        "{raw}"
    );
    // Plain HTTP on the TLS port is not served: the handshake fails, the connection closes.
    assert!(get(server.web, "/").is_err());

    server.proc.signal(Signal::TERM);
    assert_eq!(server.proc.wait(SOON), Some(0));
    assert_none_left([pid]);
}

/// `GET path` over a plain socket with `Connection: close`; the whole answer, headers included.
fn raw_get(addr: SocketAddr, path: &str) -> String {
    use std::io::Write;
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(SOON)).expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    answer
}

/// With client authentication on, the client's certificate reaches the handler, byte for byte;
/// a client without one is refused.
#[test]
fn client_certificates_reach_the_handler() {
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let files = Files::new("tls-mtls");
    files.install(&ca.server());
    replace_file(&files.ca(), &ca.pem());
    let ca_arg = files.ca().display().to_string();
    let mut server = start(&notify, &files, &["--client-ca", &ca_arg], &[]);

    let client = ca.client();
    let config = client_config_with(&ca.der(), &[b"h2"], rustls::DEFAULT_VERSIONS, Some(&client));
    let (a, _) = get_tls(server.web, &config, "/client-cert", false).expect("with a certificate");
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.body.as_ref(),
        client.der.as_ref(),
        "the client's own certificate"
    );
    let (a, _) = get_tls(server.web, &config, "/tls", false).expect("/tls");
    assert!(a.text().contains("client_certs=1"), "{}", a.text());

    let anonymous = client_config(&ca.der(), &[b"h2"]);
    let refused = get_tls(server.web, &anonymous, "/", false);
    assert!(refused.is_err(), "no client certificate, yet: {refused:?}");

    server.proc.signal(Signal::TERM);
    assert_eq!(server.proc.wait(SOON), Some(0));
    assert_none_left([server.proc.pid]);
}

/// curl (OpenSSL, nghttp2) with `--cacert`: HTTP/2 and HTTP/1.1 by ALPN, and the plain
/// listener's redirect followed to https.
#[test]
fn curl_with_cacert_over_http2_and_http1() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "curl is not installed, and CI must run this test (.ci/run installs it)"
        );
        eprintln!("SKIPPED: curl_with_cacert_over_http2_and_http1 (curl is not installed)");
        return;
    }
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let files = Files::new("tls-curl");
    files.install(&ca.server());
    replace_file(&files.ca(), &ca.pem());
    let mut server = start(&notify, &files, &[], &[]);
    let (web, health) = (server.web.port(), server.health.port());
    let curl = |args: &[&str]| -> String {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "15", "--cacert"])
            .arg(files.ca())
            .arg("--resolve")
            .arg(format!("localhost:{web}:127.0.0.1"))
            .arg("--resolve")
            .arg(format!("localhost:{health}:127.0.0.1"))
            .args(args)
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let url = format!("https://localhost:{web}/tls");
    let h2 = curl(&["--http2", "-w", "%{http_version}", &url]);
    assert!(h2.contains("sni=localhost alpn=h2 "), "{h2}");
    assert!(h2.ends_with('2'), "HTTP/2: {h2}");
    let h1 = curl(&["--http1.1", "-w", "%{http_version}", &url]);
    assert!(h1.contains("alpn=http/1.1 "), "{h1}");
    assert!(h1.ends_with("1.1"), "HTTP/1.1: {h1}");
    let followed = curl(&["-L", &format!("http://localhost:{health}/")]);
    assert_eq!(followed, "Hello world");

    server.proc.signal(Signal::TERM);
    assert_eq!(server.proc.wait(SOON), Some(0));
    assert_none_left([server.proc.pid]);
}

/// Keep-alive TLS load (HTTP/1.1 and HTTP/2) across five restarts: no failed request, every
/// process answered, and each old process drained and exited 0.
#[test]
fn keep_alive_tls_load_across_restarts_loses_no_request() {
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let files = Files::new("tls-load");
    files.install(&ca.server());
    let Server { mut proc, web, .. } = start(&notify, &files, &[], &[]);
    let load = TlsLoad::start(web, &ca.der(), 6, 2, Duration::from_secs(120), true);
    load.wait_answers(proc.pid, 200, SOON);
    let mut pids = vec![proc.pid];
    for i in 1..=RESTARTS {
        let old = *pids.last().expect("a pid");
        let new = restart(&notify, &mut proc, old, i);
        // Every generation serves the load for a while, on connections of its own.
        load.wait_answers(new, 200, SOON);
        pids.push(new);
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.errors);
    assert!(report.ok > 0);
    for p in &pids {
        assert!(
            report.pids.contains(p),
            "pid {p} never answered: {report:?}"
        );
    }
    eprintln!(
        "TLS load: {} ok, {} HTTP/2 streams sent again after GOAWAY, pids {:?}",
        report.ok, report.retried, report.pids
    );
    let last = *pids.last().expect("a pid");
    stop(last, &pids);
}

/// Rotation: the files are replaced, then a restart: under keep-alive load, the old process
/// answered only with certificate A, the new one only with B, and no request failed.
#[test]
fn a_restart_after_replacing_the_files_serves_the_new_certificate() {
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let (a, b) = (ca.server(), ca.server());
    let files = Files::new("tls-rotate");
    files.install(&a);
    let Server { mut proc, web, .. } = start(&notify, &files, &[], &[]);
    let old = proc.pid;
    let config = without_resumption(client_config(&ca.der(), &[b"h2"]));
    let (_, seen) = get_tls(web, &config, "/", false).expect("before");
    assert_eq!(seen, a.der, "certificate A before the restart");

    // Full handshakes only: a resumed session shows the certificate of the handshake that made
    // it (a session from the old process resumes with the new one, see the test below).
    let load = TlsLoad::start(web, &ca.der(), 4, 1, Duration::from_secs(60), false);
    load.wait_pid(old, SOON);
    files.install(&b);
    let new = restart(&notify, &mut proc, old, 1);
    load.wait_pid(new, SOON);
    let (answer, seen) = get_tls(web, &config, "/", false).expect("after");
    assert_eq!(answer.pid, new);
    assert_eq!(seen, b.der, "certificate B after the restart");

    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.errors);
    let only = |leaf: &Leaf| BTreeSet::from([leaf.der.to_vec()]);
    assert_eq!(
        report.certs.get(&old),
        Some(&only(&a)),
        "the old process served A only"
    );
    assert_eq!(
        report.certs.get(&new),
        Some(&only(&b)),
        "the new process serves B only"
    );
    stop(new, &[old, new]);
}

/// A broken new certificate (a key that does not match, a missing file, a file that is not
/// PEM, a key file without a key) makes the new process exit 1 before `READY=1`, naming the
/// file and the problem: the restart rolls back; the new process's reason (the file and the
/// problem) reaches the old one, which says it in `STATUS=` and in the handle's error (the
/// example's `POST /restart`); certificate A is still served, by the old process, without a
/// failed request.
#[test]
fn a_broken_certificate_rolls_back_and_the_old_one_is_still_served() {
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let (a, other) = (ca.server(), ca.server());
    let files = Files::new("tls-broken");
    files.install(&a);
    let Server {
        mut proc,
        web,
        health,
    } = start(&notify, &files, &[], &[]);
    let pid = proc.pid;
    let config = client_config(&ca.der(), &[b"http/1.1"]);
    let load = TlsLoad::start(web, &ca.der(), 4, 1, Duration::from_secs(60), true);
    load.wait_pid(pid, SOON);

    let (cert, key) = (
        files.cert().display().to_string(),
        files.key().display().to_string(),
    );
    type Break<'a> = Box<dyn Fn(&Files) + 'a>;
    let cases: Vec<(&str, Break<'_>, String)> = vec![
        (
            "a key that does not match the certificate",
            Box::new(|f: &Files| replace_file(&f.key(), &other.key_pem)),
            format!("TLS private key file {key}: does not match the certificate in {cert}"),
        ),
        (
            "a missing certificate file",
            Box::new(|f: &Files| std::fs::remove_file(f.cert()).expect("rm cert")),
            format!("TLS certificate file {cert}: cannot read it: "),
        ),
        (
            "a certificate file that is not PEM",
            Box::new(|f: &Files| replace_file(&f.cert(), "not a certificate\n")),
            format!("TLS certificate file {cert}: not PEM: no \"-----BEGIN ...-----\" block in it"),
        ),
        (
            "a key file with no key",
            Box::new(|f: &Files| replace_file(&f.key(), &a.cert_pem)),
            format!("TLS private key file {key}: no private key in it (it holds CERTIFICATE;"),
        ),
    ];
    for (i, (name, breaks, why)) in cases.iter().enumerate() {
        files.install(&a);
        breaks(&files);
        // Through the handle (the example's `POST /restart`) and through the signal, in turn.
        let answer = if i % 2 == 0 {
            let answer = support::request(health, "POST", "/restart").expect("POST /restart");
            assert_eq!(answer.status, 500, "{name}: {answer:?}");
            Some(answer.body)
        } else {
            proc.signal(Signal::USR1);
            None
        };
        let failed = notify.wait_nth(i + 1, SOON, |n| n.text.contains("STATUS=Restart failed"));
        assert_eq!(failed.pid, pid, "{name}");
        assert!(failed.has("READY=1"), "{name}: the reload ends: {failed:?}");
        assert!(
            failed
                .text
                .contains("exited with status 1 before it reported READY=1: "),
            "{name}: {failed:?}"
        );
        // The new process's own words: the file and the problem, in STATUS= and the answer.
        assert!(failed.text.contains(why.as_str()), "{name}: {failed:?}");
        if let Some(body) = answer {
            assert!(
                body.starts_with("restart failed: new process ")
                    && body.contains("exited with status 1 before it reported READY=1: ")
                    && body.contains(why.as_str())
                    && body.ends_with(&format!("this process (pid {pid}) keeps serving\n")),
                "{name}: {body}"
            );
            assert!(!body.contains("restart failed: restart failed"), "{body}");
        }
        assert!(
            failed.text.contains(&format!("still serving as pid {pid}")),
            "{name}: {failed:?}"
        );
        // The new process said why, in the log the two processes share.
        proc.lines.wait_for(why, SOON);
        let (answer, seen) = get_tls(web, &config, "/", false)
            .unwrap_or_else(|e| panic!("{name}: not serving: {e}"));
        assert_eq!((answer.status, answer.pid), (200, pid), "{name}");
        assert_eq!(seen, a.der, "{name}: certificate A is still served");
    }
    assert!(
        notify.all().iter().all(|n| !n.text.contains("MAINPID=")),
        "no hand-off happened: {:#?}",
        notify.all()
    );
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.errors);
    assert_eq!(report.pids, BTreeSet::from([pid]));
    proc.signal(Signal::TERM);
    assert_eq!(proc.wait(SOON), Some(0));
    assert_none_left([pid]);
}

/// The first bytes a rustls client sends: its `ClientHello`.
fn client_hello(ca: &CertificateDer<'static>) -> Vec<u8> {
    let name = ServerName::try_from("localhost").expect("name");
    let mut client =
        rustls::ClientConnection::new(client_config(ca, &[b"h2"]), name).expect("client");
    let mut hello = Vec::new();
    client.write_tls(&mut hello).expect("ClientHello");
    assert!(hello.len() > 100, "a ClientHello: {} bytes", hello.len());
    hello
}

/// Connections that hold nothing up: one that sends nothing, one that sends half a
/// `ClientHello`, and an idle keep-alive TLS connection (one request answered, then nothing).
/// Returned once the third one's request was answered: the server has then accepted the first
/// two (one accept loop takes them in order).
struct Stalled {
    silent: TcpStream,
    half: TcpStream,
    idle: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

fn stalled(server: &Server, ca: &Ca) -> Stalled {
    let hello = client_hello(&ca.der());
    let silent = TcpStream::connect(server.web).expect("connect");
    let half = raw_connect(server.web, &hello[..hello.len() / 2]);
    let name = ServerName::try_from("localhost").expect("name");
    let client = rustls::ClientConnection::new(client_config(&ca.der(), &[b"http/1.1"]), name)
        .expect("client");
    let tcp = TcpStream::connect(server.web).expect("connect");
    tcp.set_read_timeout(Some(SOON)).expect("timeout");
    let mut idle = rustls::StreamOwned::new(client, tcp);
    std::io::Write::write_all(&mut idle, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"Hello world") {
        let n = idle.read(&mut buf).expect("response");
        assert_ne!(n, 0, "closed before the response: {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    }
    Stalled { silent, half, idle }
}

impl Stalled {
    /// Asserts that the server has closed all three.
    fn assert_closed(mut self) {
        for (name, s) in [("silent", &mut self.silent), ("half", &mut self.half)] {
            assert!(closed(s), "the {name} connection is closed");
        }
        let mut buf = [0u8; 256];
        loop {
            match self.idle.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue, // session tickets
                Err(e) => {
                    assert!(
                        !matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ),
                        "the idle TLS connection is closed: {e}"
                    );
                    break;
                }
            }
        }
    }
}

/// Whether the server closed `s` (end of stream, or reset) within [`SOON`].
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(SOON)).expect("timeout");
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // an alert, if any: read on to the end
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    }
}

/// The `Shutdown { .. }` the example logs when serving is over.
fn shutdown_line(proc: &Proc) -> String {
    proc.lines.wait_for("shutdown=Shutdown {", SOON)
}

/// A client that opens TCP and sends nothing, and one that sends half a `ClientHello`, do not
/// keep a shutdown past the drain timeout: they are counted as open when the drain starts, cut
/// at the deadline, and counted as cut. An idle keep-alive TLS connection is closed at the end
/// of the keep-alive grace, as a plaintext one is (not cut).
#[test]
fn stalled_handshakes_are_cut_at_the_drain_deadline() {
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let files = Files::new("tls-stall");
    files.install(&ca.server());
    let drain = Duration::from_millis(1000);
    let mut server = start(
        &notify,
        &files,
        &[],
        &[("HANDOVER_DRAIN_TIMEOUT_MS", "1000")],
    );
    let stalled = stalled(&server, &ca);

    let began = Instant::now();
    server.proc.signal(Signal::TERM);
    assert_eq!(server.proc.wait(SOON), Some(0));
    let took = began.elapsed();
    assert!(
        took >= drain - Duration::from_millis(100),
        "the drain waited for the handshakes (they are connections): {took:?}"
    );
    assert!(
        took < drain + Duration::from_millis(1500),
        "the handshakes held the shutdown past the drain timeout: {took:?}"
    );
    let stopping = notify.wait_line("STOPPING=1", SOON);
    assert!(
        stopping.has("STATUS=Stopping: draining 3 connections"),
        "{stopping:?}"
    );
    let line = shutdown_line(&server.proc);
    assert!(
        line.contains("drained: 3,") && line.contains("cut: 2,"),
        "{line}"
    );
    stalled.assert_closed();
    assert_none_left([server.proc.pid]);
}

/// The same after a restart: the old process's stalled handshakes do not keep it past its
/// drain timeout (they are not passed to the new process, which serves on).
#[test]
fn stalled_handshakes_do_not_keep_the_old_process_after_a_restart() {
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let files = Files::new("tls-stall-restart");
    files.install(&ca.server());
    // Longer than the restart keep-alive grace (1 s), which closes the idle connection first.
    let drain = Duration::from_millis(2000);
    let server = start(
        &notify,
        &files,
        &[],
        &[("HANDOVER_DRAIN_TIMEOUT_MS", "2000")],
    );
    let stalled = stalled(&server, &ca);
    let Server { mut proc, web, .. } = server;
    let old = proc.pid;

    proc.signal(Signal::USR1);
    let handed = notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID="));
    let began = Instant::now();
    let new = mainpid(&handed);
    assert_eq!(proc.wait(SOON), Some(0));
    let took = began.elapsed();
    assert!(
        took < drain + Duration::from_millis(1500),
        "the handshakes held the old process past its drain timeout: {took:?}"
    );
    let line = shutdown_line(&proc);
    assert!(line.contains("HandedOver"), "{line}");
    assert!(
        line.contains("drained: 3,") && line.contains("cut: 2,"),
        "{line}"
    );
    stalled.assert_closed();
    let config = client_config(&ca.der(), &[b"h2"]);
    let (a, _) = get_tls(web, &config, "/", false).expect("the new process serves");
    assert_eq!(a.pid, new);
    stop(new, &[old, new]);
}

/// While serving, a handshake that stalls is closed by the header-read timeout (the sweeper
/// times the handshake phase), and counted as timed out, as is an idle keep-alive TLS
/// connection; the server serves on.
#[test]
fn a_stalled_handshake_is_closed_by_the_header_read_timeout() {
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let files = Files::new("tls-header-timeout");
    files.install(&ca.server());
    let mut server = start(
        &notify,
        &files,
        &[],
        &[("HANDOVER_HEADER_READ_TIMEOUT_MS", "500")],
    );
    let began = Instant::now();
    let stalled = stalled(&server, &ca);
    stalled.assert_closed();
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "not before the timeout: {took:?}"
    );
    let config = client_config(&ca.der(), &[b"h2"]);
    let (a, _) = get_tls(server.web, &config, "/", false).expect("still serving");
    assert_eq!(a.pid, server.proc.pid);

    server.proc.signal(Signal::TERM);
    assert_eq!(server.proc.wait(SOON), Some(0));
    let closed = server.proc.lines.wait_for("lifecycle: server closed", SOON);
    assert!(closed.contains("timed_out=3"), "{closed}");
    assert_none_left([server.proc.pid]);
}

// ---------------------------------------------------------------------------------------------
// TLS sessions across restarts.

/// The `tls` example under `systemd-socket-activate` (the listeners `web` and `health` are the
/// tool's, by name), with the certificate in `files` and `env` (`VAR=value`); started by a
/// first connection, once it is ready.
fn activated(notify: &NotifySocket, files: &Files, env: &[&str]) -> Server {
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut spawn = Spawn::new("systemd-socket-activate")
        .arg("-l")
        .arg(web.to_string())
        .arg("-l")
        .arg(health.to_string())
        .arg("--fdname=web:health")
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify.path.display()))
        .arg("-E")
        .arg("RUST_LOG=info")
        .arg("-E")
        .arg(format!("HANDOVER_TLS_CERT={}", files.cert().display()))
        .arg("-E")
        .arg(format!("HANDOVER_TLS_KEY={}", files.key().display()));
    for var in env {
        spawn = spawn.arg("-E").arg(var);
    }
    let proc = spawn.arg(example("tls")).start();
    proc.lines.wait_for("Listening on", SOON);
    // The first connection starts the program (it keeps the tool's pid).
    let first = get(health, "/healthz").expect("the first connection starts the server");
    assert_eq!(first.pid, proc.pid);
    let ready = notify.wait_line("READY=1", SOON);
    assert_eq!(ready.pid, proc.pid);
    Server { proc, web, health }
}

/// One `GET /` on a new connection with a rustls client whose session cache is `config`'s:
/// the pid that answered, and whether the handshake resumed a session.
fn resumed_get(addr: SocketAddr, config: &Arc<ClientConfig>) -> (u32, bool) {
    runtime().block_on(async {
        let (stream, _) = connect(addr, config).await.expect("connect");
        let kind = stream.get_ref().1.handshake_kind();
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("handshake");
        let conn = tokio::spawn(conn);
        let resp = sender
            .send_request(request("/", true))
            .await
            .expect("request");
        let got = answer(resp).await.expect("answer");
        drop(sender);
        // Read to the end: TLS 1.3 tickets arrive after the handshake.
        let _ = tokio::time::timeout(SOON, conn).await;
        assert_eq!((got.status, got.body.as_ref()), (200, &b"Hello world"[..]));
        (got.pid, kind == Some(rustls::HandshakeKind::Resumed))
    })
}

/// A client that saved its TLS session (a ticket) with one process resumes it with the next,
/// after a `SIGUSR1` restart under `systemd-socket-activate`: `openssl s_client -sess_in` says
/// `Reused` for TLS 1.3 and 1.2, and a rustls client's handshake is a resumption, for both
/// versions, answered by the new process. Two restarts: keys made by the second process work
/// with the third.
#[test]
fn tls_sessions_resume_after_a_restart_openssl_and_rustls_tls13_and_tls12() {
    let openssl = have_openssl();
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let files = Files::new("tls-sessions");
    files.install(&ca.server());
    let Server { mut proc, web, .. } = activated(&notify, &files, &[]);
    let first = proc.pid;
    let rustls_clients = [
        client_config_with(&ca.der(), &[b"http/1.1"], &[&rustls::version::TLS13], None),
        client_config_with(&ca.der(), &[b"http/1.1"], &[&rustls::version::TLS12], None),
    ];
    let versions = ["-tls1_3", "-tls1_2"];
    let session = |v: &str| files.dir.join(format!("session{v}.pem"));

    let mut pids = vec![first];
    for round in [1, 2] {
        let old = *pids.last().expect("a pid");
        // Sessions made with the old process.
        if openssl {
            for v in versions {
                let got = s_client(web, v, &session(v), false);
                assert_eq!((got.reused, got.pid), (false, old), "{v}: {got:?}");
            }
        }
        for config in &rustls_clients {
            let (pid, _) = resumed_get(web, config);
            assert_eq!(pid, old);
            // The same process resumes, of course.
            assert_eq!(resumed_get(web, config), (old, true));
        }
        let new = restart(&notify, &mut proc, old, round);
        pids.push(new);
        // The new process resumes them.
        if openssl {
            for v in versions {
                let got = s_client(web, v, &session(v), true);
                let expected = if v == "-tls1_3" { "TLSv1.3" } else { "TLSv1.2" };
                assert_eq!(
                    (got.reused, got.version.as_str(), got.pid),
                    (true, expected, new),
                    "round {round}, {v}: the session made with pid {old} resumes with pid {new}"
                );
            }
        }
        for (config, v) in rustls_clients.iter().zip(versions) {
            assert_eq!(
                resumed_get(web, config),
                (new, true),
                "round {round}, rustls {v}: resumed with the new process"
            );
        }
        assert!(proc.lines.eventually(
            "took the TLS session ticket keys of the previous process",
            SOON
        ));
    }
    let last = *pids.last().expect("a pid");
    stop(last, &pids);
}

/// A ticket is refused once its key is two rotation periods old (here 2 s each), across a
/// restart too: `openssl s_client -sess_in` (TLS 1.2, whose client offers a ticket whatever
/// its age) resumes at once, and gets a full handshake (`New`) after the window; a new session
/// with the new process resumes again.
#[test]
fn a_ticket_older_than_the_rotation_window_is_refused() {
    if !have_openssl() {
        eprintln!("SKIPPED: a_ticket_older_than_the_rotation_window_is_refused (no openssl)");
        return;
    }
    let notify = NotifySocket::new();
    let ca = Ca::new();
    let files = Files::new("tls-expiry");
    files.install(&ca.server());
    let Server { mut proc, web, .. } =
        activated(&notify, &files, &["HANDOVER_TICKET_ROTATION_MS=2000"]);
    let old = proc.pid;
    let session = files.dir.join("session.pem");
    let before = Instant::now();
    assert!(!s_client(web, "-tls1_2", &session, false).reused);
    // The ticket's key was made with it (the first ticket of the service), in between.
    let made = Instant::now();
    // Within the window (at least one period): resumes.
    let again = s_client(web, "-tls1_2", &session, true);
    assert!(
        again.reused || before.elapsed() >= Duration::from_secs(2),
        "resumes within the window: {again:?}"
    );
    let new = restart(&notify, &mut proc, old, 1);
    // The window (two periods from the key's making) is over 4 s after `made` at the latest.
    let wait = Duration::from_millis(4500).saturating_sub(made.elapsed());
    std::thread::sleep(wait);
    let late = s_client(web, "-tls1_2", &session, true);
    assert_eq!(
        (late.reused, late.pid),
        (false, new),
        "a ticket older than two periods gets a full handshake"
    );
    // The full handshake made a new session, with a current key: it resumes.
    let fresh = files.dir.join("fresh.pem");
    assert!(!s_client(web, "-tls1_2", &fresh, false).reused);
    assert!(s_client(web, "-tls1_2", &fresh, true).reused);
    stop(new, &[old, new]);
}

// ---------------------------------------------------------------------------------------------
// The fd store, as systemd keeps it across `systemctl restart` and crashes.

/// A service manager's notify socket that keeps what `FDSTORE=1` hands it, as systemd's fd
/// store does: the last fd stored under each name (`FDSTOREREMOVE=1` drops one).
struct FdStore {
    path: PathBuf,
    socket: std::os::unix::net::UnixDatagram,
    stored: BTreeMap<String, std::os::fd::OwnedFd>,
    /// Every message's text, with the pid of its sender.
    seen: Vec<(u32, String)>,
}

impl FdStore {
    fn new(dir: &Path) -> FdStore {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        rustix::net::sockopt::set_socket_passcred(&socket, true).expect("SO_PASSCRED");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        FdStore {
            path,
            socket,
            stored: BTreeMap::new(),
            seen: Vec::new(),
        }
    }

    /// Reads messages until one from `pid` contains `line`, within `timeout`.
    fn wait_for(&mut self, pid: u32, line: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self
            .seen
            .iter()
            .any(|(p, t)| *p == pid && t.lines().any(|l| l == line))
        {
            assert!(
                Instant::now() < deadline,
                "no {line:?} from pid {pid} within {timeout:?}: {:?}",
                self.seen
            );
            self.read_one();
        }
    }

    /// One message, if one comes within the socket's read timeout.
    fn read_one(&mut self) {
        use std::mem::MaybeUninit;
        let mut buf = [0u8; 4096];
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1), ScmRights(4))];
        let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let msg = match rustix::net::recvmsg(
            &self.socket,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return,
            Err(e) => panic!("recvmsg: {e}"),
        };
        let mut fds = Vec::new();
        let mut pid = 0;
        for c in control.drain() {
            match c {
                rustix::net::RecvAncillaryMessage::ScmRights(r) => fds.extend(r),
                rustix::net::RecvAncillaryMessage::ScmCredentials(c) => {
                    pid = c.pid.as_raw_nonzero().get() as u32;
                }
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&buf[..msg.bytes]).into_owned();
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .map(str::to_string);
        if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
            if let Some(name) = &name {
                self.stored.remove(name);
            }
        }
        if text.lines().any(|l| l == "FDSTORE=1") {
            if let (Some(name), Some(fd)) = (name, fds.pop()) {
                self.stored.insert(name, fd);
            }
        }
        self.seen.push((pid, text));
    }
}

/// `systemctl restart` (or a crash) of a service with `FileDescriptorStoreMax=`: the process
/// stores the listeners it bound and its session ticket keys (a sealed memfd) in the fd store,
/// stops, and the next process gets all of them back in `LISTEN_FDS`: a session saved with the
/// first process resumes with the second (`openssl s_client -sess_in`: `Reused`, TLS 1.3 and
/// 1.2).
#[test]
fn tls_sessions_resume_after_a_restart_through_the_fd_store() {
    if !have_openssl() {
        eprintln!("SKIPPED: tls_sessions_resume_after_a_restart_through_the_fd_store (no openssl)");
        return;
    }
    let ca = Ca::new();
    let files = Files::new("tls-fdstore");
    files.install(&ca.server());
    let mut store = FdStore::new(&files.dir);
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let notify_path = store.path.clone();
    let spawn = |fds: Vec<std::os::fd::OwnedFd>, names: &str| {
        let mut spawn = Spawn::new(example("tls"))
            .arg("--cert")
            .arg(files.cert())
            .arg("--key")
            .arg(files.key())
            .arg("--web")
            .arg(web.to_string())
            .arg("--health")
            .arg(health.to_string())
            .env("NOTIFY_SOCKET", &notify_path)
            .env("HANDOVER_FD_STORE", "1");
        if !fds.is_empty() {
            spawn = spawn
                .env("LISTEN_FDS", fds.len().to_string())
                .env("LISTEN_FDNAMES", names)
                .fds_from_3(fds);
        }
        spawn.start()
    };
    let mut a = spawn(Vec::new(), "");
    store.wait_for(a.pid, "READY=1", SOON);
    assert_eq!(
        store.stored.keys().collect::<Vec<_>>(),
        ["handover-tickets", "health", "web"],
        "{:?}",
        store.seen
    );
    let session = |v: &str| files.dir.join(format!("session{v}.pem"));
    for v in ["-tls1_3", "-tls1_2"] {
        let got = s_client(web, v, &session(v), false);
        assert_eq!((got.reused, got.pid), (false, a.pid), "{v}");
    }
    // `systemctl restart`: SIGTERM, and the next process once this one is gone.
    a.signal(Signal::TERM);
    assert_eq!(a.wait(SOON), Some(0));
    let order = ["web", "health", "handover-tickets"];
    let fds = order
        .iter()
        .map(|n| store.stored.remove(*n).expect("stored"))
        .collect();
    let b = spawn(fds, &order.join(":"));
    store.wait_for(b.pid, "READY=1", SOON);
    assert!(
        b.lines
            .eventually("took the TLS session ticket keys from the fd store", SOON)
    );
    for v in ["-tls1_3", "-tls1_2"] {
        let got = s_client(web, v, &session(v), true);
        assert_eq!(
            (got.reused, got.pid),
            (true, b.pid),
            "{v}: the session of pid {} resumes with pid {} after a restart through the fd store",
            a.pid,
            b.pid
        );
    }
    b.signal(Signal::TERM);
    let (a_pid, b_pid) = (a.pid, b.pid);
    let mut b = b;
    assert_eq!(b.wait(SOON), Some(0));
    assert_none_left([a_pid, b_pid]);
}
