//! Run with: `cargo run --features axum --example websocket [ADDR] [WSS_ADDR]` (TLS: add `rustls`)
//!
//! Long-lived connections across restarts and shutdowns: a chat-like WebSocket echo with
//! per-connection state, and a server-sent-events stream.
//!
//! At a restart, each `/ws` connection moves to the new process with its state, at a message
//! boundary ([`handover::upgrade`]): the client sees nothing, the new process answers its next
//! message and counts on. Every other long-lived connection (and a `/ws` one that cannot move:
//! at a shutdown, or if the new process does not take it) says goodbye when this process goes
//! away ([`handover::ConnectionInfo::going_away`]), so that its client reconnects to the
//! process that serves now, and this one exits as soon as the last of them is closed instead of
//! at the drain deadline.
//!
//! It listens on the socket it inherits (named `web`, or the one on ADDR), or binds ADDR
//! (default `127.0.0.1:8879`). With the `rustls` feature and `WS_TLS_CERT`/`WS_TLS_KEY` (PEM
//! files), the same routes are also served over TLS on the listener `wss` (bound on the second
//! argument, default `127.0.0.1:8880`): a TLS WebSocket cannot move, and says goodbye at a
//! restart.
//!
//! ```text
//! GET /ws        WebSocket (tokio-tungstenite over handover's `WebSocketIo`): a text message
//!                `nick NAME` sets the connection's nickname, `pad N` adds N bytes to its
//!                state (to try the bound); any other text comes back as
//!                `echo pid=PID session=ID nick=NAME count=N: TEXT`, N counting the
//!                connection's messages. At a restart: handed over with its state. Going
//!                away otherwise: Close 1001 ("going away").
//! GET /axum-ws   the same echo with axum's own WebSocket type.
//! GET /events    server-sent events, one every 100 ms (`?every_ms=N`): `id: N`,
//!                `data: tick N pid=PID`, numbered on from the `Last-Event-ID` header. Going
//!                away: the stream ends, and an `EventSource` reconnects with `Last-Event-ID`.
//! GET /          Hello world
//! POST /restart  restart through the handle: "restarted: pid N", or why not (500)
//! ```
//! Every HTTP response carries `x-pid`. `HANDOVER_DRAIN_TIMEOUT_MS` overrides the drain
//! timeout; `WS_HANDOFF=0` makes the process take no WebSocket from its predecessor (as an
//! older build would), so that they say goodbye instead.
//!
//! Why tokio-tungstenite over the raw stream for `/ws`, not axum's `WebSocket`: only a stream
//! that can be taken apart (socket, bytes read and not consumed) can move to another process;
//! see [`handover::upgrade`].

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{self, WebSocketUpgrade};
use axum::extract::{Extension, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, Stream, StreamExt};
use handover::ConnectionInfo;
use handover::upgrade::{Resumed, WebSocketIo};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

/// How long a goodbye waits for the client's Close in return.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    common::init_tracing();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8879".to_string());
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{addr:?} is not an address like 127.0.0.1:8879: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = tls::from_env();
    let listeners = match listeners(addr, tls.is_some()) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for l in listeners.iter() {
        println!(
            "listen on: {} ({}), pid: {}",
            l.url(),
            l.name(),
            std::process::id()
        );
    }
    let app = Router::new()
        .route("/", get(common::hello::<Body>))
        .route("/ws", get(chat))
        .route("/axum-ws", get(axum_chat))
        .route("/events", get(events))
        .route("/restart", axum::routing::post(restart))
        .layer(axum::middleware::map_response(with_pid));
    let mut server = handover::Server::new(listeners).default_service(app);
    match tls {
        Some(Ok(config)) => server = tls::serve(server, config),
        Some(Err(e)) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
        None => {}
    }
    if let Some(d) = common::env_ms("HANDOVER_DRAIN_TIMEOUT_MS") {
        server = server.drain_timeout(d);
    }
    if std::env::var_os("WS_HANDOFF").is_none_or(|v| v != "0") {
        // The WebSockets the previous process hands over: resumed where they were.
        server = server.resume_upgraded(resume_chat);
    }
    common::run(server)
}

/// `web` (inherited by name, or on `addr`, or bound there), and with TLS `wss` (inherited, or
/// bound on the second argument, default `127.0.0.1:8880`).
fn listeners(addr: SocketAddr, tls: bool) -> Result<handover::Listeners, String> {
    let mut inherited = handover::Listeners::from_env().map_err(|e| e.to_string())?;
    let web = inherited
        .take_or_bind("web", addr)
        .map_err(|e| e.to_string())?;
    if !tls {
        return Ok([web].into());
    }
    let wss = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "127.0.0.1:8880".to_string());
    let wss: SocketAddr = wss
        .parse()
        .map_err(|e| format!("{wss:?} is not an address like 127.0.0.1:8880: {e}"))?;
    let wss = inherited
        .take_or_bind("wss", wss)
        .map_err(|e| e.to_string())?;
    Ok([web, wss].into())
}

/// WebSockets over TLS (with the `rustls` feature): the listener `wss`, when `WS_TLS_CERT` and
/// `WS_TLS_KEY` name a PEM certificate chain and its key. A TLS connection cannot move to the
/// new process (its session would have to move too): at a restart it says goodbye.
#[cfg(feature = "rustls")]
mod tls {
    use std::sync::Arc;

    use handover::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };

    pub(crate) type Config = Arc<rustls::ServerConfig>;

    pub(crate) fn from_env() -> Option<Result<Config, String>> {
        let cert = std::env::var_os("WS_TLS_CERT")?;
        let key = std::env::var_os("WS_TLS_KEY")?;
        Some(load(cert.as_ref(), key.as_ref()))
    }

    fn load(cert: &std::path::Path, key: &std::path::Path) -> Result<Config, String> {
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("WS_TLS_CERT {}: {e}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("WS_TLS_KEY {}: {e}", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS protocol versions: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("WS_TLS_CERT with WS_TLS_KEY: {e}"))?;
        // WebSockets are HTTP/1.1 upgrades.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    pub(crate) fn serve(server: handover::Server, config: Config) -> handover::Server {
        server.tls("wss", config)
    }
}

/// Without the `rustls` feature: no TLS listener.
#[cfg(not(feature = "rustls"))]
mod tls {
    pub(crate) type Config = std::convert::Infallible;

    pub(crate) fn from_env() -> Option<Result<Config, String>> {
        std::env::var_os("WS_TLS_CERT")
            .map(|_| Err("WS_TLS_CERT is set, but this build has no TLS (feature rustls)".into()))
    }

    pub(crate) fn serve(_: handover::Server, config: Config) -> handover::Server {
        match config {}
    }
}

/// What one WebSocket connection remembers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    id: u64,
    nick: String,
    count: u64,
    /// Bytes that only make the state larger (`pad N`).
    padding: usize,
}

impl Session {
    fn new() -> Session {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        // Unique across restarts too: the pid of the process that opened it, and a counter.
        let id = u64::from(std::process::id()) << 32 | NEXT.fetch_add(1, Ordering::Relaxed);
        Session {
            id,
            nick: "anonymous".to_string(),
            count: 0,
            padding: 0,
        }
    }

    /// What moves with the connection: `ID COUNT NICK`, and the padding.
    fn encode(&self) -> Vec<u8> {
        let mut state = format!("{} {} {}", self.id, self.count, self.nick).into_bytes();
        state.resize(state.len() + self.padding, b' ');
        state
    }

    fn decode(state: &[u8]) -> Option<Session> {
        let text = std::str::from_utf8(state).ok()?;
        let trimmed = text.trim_end_matches(' ');
        let mut words = trimmed.splitn(3, ' ');
        Some(Session {
            id: words.next()?.parse().ok()?,
            count: words.next()?.parse().ok()?,
            nick: words.next()?.to_string(),
            padding: text.len() - trimmed.len(),
        })
    }

    /// The answer to one text message, if it has one.
    fn answer(&mut self, text: &str) -> Option<String> {
        if let Some(nick) = text.strip_prefix("nick ") {
            // One word: the state is `ID COUNT NICK`.
            self.nick = nick.trim().replace(' ', "_");
            return None;
        }
        if let Some(n) = text.strip_prefix("pad ") {
            self.padding = n.trim().parse().unwrap_or(0);
            return None;
        }
        self.count += 1;
        Some(format!(
            "echo pid={} session={} nick={} count={}: {text}",
            std::process::id(),
            self.id,
            self.nick,
            self.count
        ))
    }
}

/// `GET /ws`: the WebSocket handshake by hand (it is short), then tokio-tungstenite over
/// handover's `WebSocketIo`, which can be handed over.
async fn chat(Extension(conn): Extension<ConnectionInfo>, mut req: Request) -> Response {
    let Some(accept) = websocket_accept(req.headers()) else {
        return (StatusCode::BAD_REQUEST, "a WebSocket upgrade expected\n").into_response();
    };
    // Taken before answering: hyper hands the connection over once the 101 is written.
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let io = WebSocketIo::new(upgraded);
                serve_chat(io, Session::new(), conn).await;
            }
            Err(e) => tracing::warn!(error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// `Sec-WebSocket-Accept` for a valid WebSocket upgrade request (RFC 6455 4.2.1).
fn websocket_accept(headers: &HeaderMap) -> Option<HeaderValue> {
    let has = |name, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return None;
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION)? != "13" {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    HeaderValue::from_str(&accept).ok()
}

/// In the new process: a WebSocket the previous one handed over, resumed with its session.
async fn resume_chat(resumed: Resumed) {
    let conn = resumed.connection_info().clone();
    let (io, state) = resumed.into_parts();
    match Session::decode(&state) {
        Some(session) => {
            tracing::info!(
                session = session.id,
                count = session.count,
                "WebSocket resumed"
            );
            serve_chat(io, session, conn).await;
        }
        None => {
            // Not ours to understand: say goodbye rather than guess.
            tracing::warn!("a WebSocket arrived with a state this build cannot read");
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
            goodbye(ws, &handover::State::Serving).await;
        }
    }
}

/// tungstenite's settings: a read buffer of 4 KiB instead of 128 KiB, as a service with many
/// mostly idle connections wants (a message larger than the buffer is still read whole).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

/// Echoes until the client closes, or this process goes away: then the connection moves to
/// the new process with its session if it can, and gets Close 1001 if not.
async fn serve_chat(io: WebSocketIo, mut session: Session, conn: ConnectionInfo) {
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
    let going_away = conn.going_away();
    tokio::pin!(going_away);
    loop {
        tokio::select! {
            // A message already read is answered before the goodbye.
            biased;
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if let Some(answer) = session.answer(text.as_str()) {
                        if ws.send(Message::text(answer)).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => return,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "WebSocket ended");
                    return;
                }
            },
            state = &mut going_away => {
                // A message boundary: every message read was answered. What was written goes
                // out before the socket moves.
                if ws.flush().await.is_err() {
                    return;
                }
                let io = ws.into_inner();
                let io = match io.hand_off(session.encode()).await {
                    Ok(()) => {
                        tracing::debug!(session = session.id, "WebSocket handed over");
                        return;
                    }
                    Err(e) => {
                        if matches!(state, handover::State::HandedOver { .. }) {
                            tracing::info!(session = session.id, why = %e, "WebSocket not handed over: going away (Close 1001)");
                        }
                        e.into_io()
                    }
                };
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
                return goodbye(ws, &state).await;
            }
        }
    }
}

/// Close 1001, then read until the client's Close in return (bounded), so that the
/// connection ends cleanly on both sides.
async fn goodbye<S>(mut ws: WebSocketStream<S>, state: &handover::State)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::Away,
        reason: reason(state).into(),
    };
    if ws.close(Some(frame)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

fn reason(state: &handover::State) -> &'static str {
    match state {
        handover::State::HandedOver { .. } => "server restarting; reconnect",
        _ => "server shutting down",
    }
}

/// `GET /axum-ws`: the same echo with axum's WebSocket type, for an application that uses it.
async fn axum_chat(
    Extension(conn): Extension<ConnectionInfo>,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade.on_upgrade(move |mut socket| async move {
        let mut session = Session::new();
        let going_away = conn.going_away();
        tokio::pin!(going_away);
        loop {
            tokio::select! {
                biased;
                msg = socket.recv() => match msg {
                    Some(Ok(ws::Message::Text(text))) => {
                        if let Some(answer) = session.answer(text.as_str()) {
                            if socket.send(ws::Message::Text(answer.into())).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Ok(ws::Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
                state = &mut going_away => {
                    let frame = ws::CloseFrame {
                        code: ws::close_code::AWAY,
                        reason: reason(&state).into(),
                    };
                    if socket.send(ws::Message::Close(Some(frame))).await.is_ok() {
                        let _ = tokio::time::timeout(CLOSE_WAIT, async {
                            while let Some(Ok(_)) = socket.recv().await {}
                        })
                        .await;
                    }
                    return;
                }
            }
        }
    })
}

/// `GET /events`: server-sent events, numbered on from `Last-Event-ID`, until this process goes
/// away.
async fn events(Extension(conn): Extension<ConnectionInfo>, req: Request) -> impl IntoResponse {
    let last: u64 = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let every = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("every_ms=")))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_millis(100), Duration::from_millis)
        .max(Duration::from_millis(1));
    Sse::new(ticks(last + 1, every, conn))
}

fn ticks(
    first: u64,
    every: Duration,
    conn: ConnectionInfo,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let going_away = Box::pin(conn.going_away());
    futures_util::stream::unfold(
        (first, interval, going_away),
        |(n, mut interval, mut going_away)| async move {
            tokio::select! {
                biased;
                state = &mut going_away => {
                    // The end of the stream: the client reconnects, with `Last-Event-ID: n - 1`.
                    tracing::info!(%state, last = n - 1, "event stream: going away");
                    None
                }
                _ = interval.tick() => {
                    let event = Event::default()
                        .id(n.to_string())
                        .data(format!("tick {n} pid={}", std::process::id()));
                    Some((Ok(event), (n + 1, interval, going_away)))
                }
            }
        },
    )
}

async fn restart(Extension(conn): Extension<ConnectionInfo>) -> Response {
    match conn.handle().restart().await {
        Ok(r) => format!("restarted: pid {} serves now\n", r.pid).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn with_pid(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert("x-pid", HeaderValue::from(std::process::id()));
    response
}
