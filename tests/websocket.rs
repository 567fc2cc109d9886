//! Long-lived connections at a shutdown and a restart (issue 20): WebSocket clients (a real
//! client library, tokio-tungstenite) and server-sent-events clients of `examples/websocket.rs`
//! get a clean goodbye (Close 1001, the end of the stream), reconnect to the process that serves
//! now, and the old process exits as soon as they are closed, not at its drain deadline. Real
//! processes, real signals, loopback only.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use rustix::process::Signal;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The drain deadline of the servers under test: far longer than a goodbye takes, so that an
/// exit well before it shows the drain ended because the connections were closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// The 10,000-connection test takes both cores for seconds; the others' timing-sensitive steps
/// (a held notify queue, a stopped successor) wait for it instead of racing it: it takes this
/// lock for writing, every other test for reading.
static HEAVY: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn light() -> std::sync::RwLockReadGuard<'static, ()> {
    HEAVY.read().unwrap_or_else(|p| p.into_inner())
}
/// What "promptly" means on a loaded two-core machine: well under [`DRAIN_TIMEOUT`].
const PROMPTLY: Duration = Duration::from_secs(40);

fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime")
}

/// The websocket example on a free loopback port, reporting to `notify`, once it is ready.
fn ready_websocket(notify: &NotifySocket, env: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let mut spawn = Spawn::new(example("websocket"))
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &notify.path)
        .env(
            "HANDOVER_DRAIN_TIMEOUT_MS",
            DRAIN_TIMEOUT.as_millis().to_string(),
        );
    for (k, v) in env {
        spawn = spawn.env(k, v);
    }
    let server = spawn.start();
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);
    (server, addr)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An echo as the example writes it: `echo pid=P session=S nick=N count=C: TEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Echo {
    pid: u32,
    session: u64,
    nick: String,
    count: u64,
    text: String,
}

fn parse_echo(line: &str) -> Echo {
    let parsed = (|| {
        let (head, text) = line.split_once(": ")?;
        let field = |name: &str| head.split(' ').find_map(|w| w.strip_prefix(name));
        Some(Echo {
            pid: field("pid=")?.parse().ok()?,
            session: field("session=")?.parse().ok()?,
            nick: field("nick=")?.to_string(),
            count: field("count=")?.parse().ok()?,
            text: text.to_string(),
        })
    })();
    parsed.unwrap_or_else(|| panic!("not an echo: {line:?}"))
}

/// Connects to `path`, names itself `nick`, and checks one echo.
async fn ws_connect(addr: SocketAddr, path: &str, nick: &str) -> (Ws, Echo) {
    let (mut ws, _) = tokio::time::timeout(
        SOON,
        tokio_tungstenite::connect_async(format!("ws://{addr}{path}")),
    )
    .await
    .expect("connected in time")
    .expect("WebSocket handshake");
    ws.send(Message::text(format!("nick {nick}")))
        .await
        .expect("send");
    let echo = ws_roundtrip(&mut ws, "hello").await;
    assert_eq!((echo.nick.as_str(), echo.count), (nick, 1), "{echo:?}");
    (ws, echo)
}

async fn ws_roundtrip(ws: &mut Ws, text: &str) -> Echo {
    ws.send(Message::text(text)).await.expect("send");
    loop {
        match tokio::time::timeout(SOON, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let echo = parse_echo(t.as_str());
                assert_eq!(echo.text, text);
                return echo;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("expected the echo of {text:?}, got {other:?}"),
        }
    }
}

/// Reads until the server's Close; returns its code and reason (the client answers the Close,
/// as tungstenite does while reading).
async fn ws_await_close(mut ws: Ws) -> (CloseCode, String) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                // Read on until the end, so the close handshake completes.
                while let Ok(Some(Ok(_))) = tokio::time::timeout(SOON, ws.next()).await {}
                return (frame.code, frame.reason.to_string());
            }
            Ok(Some(Ok(Message::Text(t)))) => panic!("unexpected message {t:?}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}

/// A server-sent-events stream, read until it ends.
struct Sse {
    body: hyper::body::Incoming,
    pending: String,
    /// `(id, pid)` of each event received.
    events: Vec<(u64, u32)>,
}

async fn sse_connect(addr: SocketAddr, last_event_id: Option<u64>) -> Sse {
    let stream = tokio::time::timeout(SOON, tokio::net::TcpStream::connect(addr))
        .await
        .expect("connected in time")
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::get("/events?every_ms=50").header("host", addr.to_string());
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = tokio::time::timeout(SOON, sender.send_request(req))
        .await
        .expect("answered in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut sse = Sse {
        body: response.into_body(),
        pending: String::new(),
        events: Vec::new(),
    };
    sse.until(|events| !events.is_empty()).await;
    sse
}

impl Sse {
    /// Reads events until `done` says so; false if the stream ended first.
    async fn until(&mut self, done: impl Fn(&[(u64, u32)]) -> bool) -> bool {
        while !done(&self.events) {
            let frame = tokio::time::timeout(DRAIN_TIMEOUT, self.body.frame())
                .await
                .expect("an event or the end in time");
            match frame {
                None => return false,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.push_str(&String::from_utf8_lossy(&data));
                        self.parse();
                    }
                }
                Some(Err(e)) => panic!("the event stream failed: {e}"),
            }
        }
        true
    }

    fn parse(&mut self) {
        while let Some(end) = self.pending.find("\n\n") {
            let event: String = self.pending.drain(..end + 2).collect();
            let id = event
                .lines()
                .find_map(|l| l.strip_prefix("id:"))
                .and_then(|v| v.trim().parse().ok());
            let pid = event
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .and_then(|d| d.split("pid=").nth(1))
                .and_then(|p| p.trim().parse().ok());
            if let (Some(id), Some(pid)) = (id, pid) {
                self.events.push((id, pid));
            }
        }
    }

    /// Reads to the end of the stream; the events must be numbered without a gap.
    async fn until_end(mut self) -> Vec<(u64, u32)> {
        assert!(!self.until(|_| false).await, "BUG: never done");
        for pair in self.events.windows(2) {
            assert_eq!(pair[1].0, pair[0].0 + 1, "events numbered in order");
        }
        self.events
    }
}

#[test]
fn at_sigterm_every_websocket_gets_close_1001_every_event_stream_ends_and_the_process_exits_at_once()
 {
    let _light = light();
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_websocket(&notify, &[]);
    let rt = multi_thread_runtime();
    let (clients, sse) = rt.block_on(async {
        let mut clients = Vec::new();
        for (i, path) in ["/ws", "/ws", "/ws", "/axum-ws", "/axum-ws"]
            .into_iter()
            .enumerate()
        {
            let (ws, echo) = ws_connect(addr, path, &format!("c{i}")).await;
            assert_eq!(echo.pid, server.pid);
            clients.push(tokio::spawn(ws_await_close(ws)));
        }
        let sse = sse_connect(addr, None).await;
        (clients, tokio::spawn(sse.until_end()))
    });
    let began = Instant::now();
    server.signal(Signal::TERM);
    rt.block_on(async {
        for client in clients {
            let (code, reason) = client.await.expect("client task");
            assert_eq!(code, CloseCode::Away, "Close 1001 ({reason})");
            assert_eq!(reason, "server shutting down");
        }
        let events = sse.await.expect("event stream task");
        assert!(events.iter().all(|&(_, pid)| pid == server.pid));
    });
    assert_eq!(server.wait(DRAIN_TIMEOUT), Some(0), "exit code");
    let took = began.elapsed();
    assert!(
        took < PROMPTLY,
        "the process exited {took:?} after SIGTERM: it waited for the drain deadline ({DRAIN_TIMEOUT:?}) instead of the connections"
    );
    assert_none_left([server.pid]);
}

#[test]
fn at_a_restart_websockets_get_close_1001_reconnect_to_the_new_process_and_the_old_one_exits_at_once()
 {
    let _light = light();
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_websocket(&notify, &[("WS_HANDOFF", "0")]);
    let old = server.pid;
    let rt = multi_thread_runtime();
    let (clients, sse) = rt.block_on(async {
        let mut clients = Vec::new();
        for (i, path) in ["/ws", "/ws", "/axum-ws"].into_iter().enumerate() {
            let (ws, echo) = ws_connect(addr, path, &format!("c{i}")).await;
            assert_eq!(echo.pid, old);
            clients.push((path, tokio::spawn(ws_await_close(ws))));
        }
        let sse = sse_connect(addr, None).await;
        (clients, tokio::spawn(sse.until_end()))
    });
    let began = Instant::now();
    let new = restart_once(&notify, old, 1);
    rt.block_on(async {
        for (i, (path, client)) in clients.into_iter().enumerate() {
            let (code, reason) = client.await.expect("client task");
            assert_eq!(code, CloseCode::Away, "Close 1001 ({reason})");
            assert_eq!(reason, "server restarting; reconnect");
            // Reconnecting reaches the new process.
            let (_ws, echo) = ws_connect(addr, path, &format!("c{i}")).await;
            assert_eq!(echo.pid, new, "{path}");
        }
        let events = sse.await.expect("event stream task");
        let &(last, pid) = events.last().expect("events");
        assert_eq!(pid, old);
        // An EventSource reconnects with Last-Event-ID: the new process numbers on.
        let mut again = sse_connect(addr, Some(last)).await;
        again.until(|e| e.len() >= 3).await;
        assert_eq!(again.events[0], (last + 1, new));
        assert!(again.events.iter().all(|&(_, p)| p == new));
    });
    assert_eq!(server.wait(DRAIN_TIMEOUT), Some(0), "old process exit code");
    let took = began.elapsed();
    assert!(
        took < PROMPTLY,
        "the old process exited {took:?} after the restart: it waited for the drain deadline ({DRAIN_TIMEOUT:?}) instead of its connections"
    );
    assert!(alive(new));
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, DRAIN_TIMEOUT), Some(0));
    assert_none_left([old, new]);
}

// ---------------------------------------------------------------------------------------------
// Hand-off of WebSockets to the new process.

/// The latest pid that answered each client (0: the client failed), awaited by the test.
#[derive(Clone, Default)]
struct Board(std::sync::Arc<(std::sync::Mutex<Vec<u32>>, std::sync::Condvar)>);

impl Board {
    fn new(clients: usize) -> Board {
        let board = Board::default();
        *board.0.0.lock().expect("board") = vec![u32::MAX; clients];
        board
    }

    fn set(&self, client: usize, pid: u32) {
        let mut latest = self.0.0.lock().expect("board");
        if latest[client] != pid {
            latest[client] = pid;
            self.0.1.notify_all();
        }
    }

    /// Waits until every client was answered by `pid`.
    fn wait_all(&self, pid: u32, timeout: Duration) {
        let latest = self.0.0.lock().expect("board");
        let (latest, _) = self
            .0
            .1
            .wait_timeout_while(latest, timeout, |l| {
                !l.iter().all(|&p| p == pid) && !l.contains(&0)
            })
            .expect("board");
        assert!(
            !latest.contains(&0),
            "a client failed (see its error at the end): {latest:?}"
        );
        assert!(
            latest.iter().all(|&p| p == pid),
            "not every client was answered by pid {pid} within {timeout:?}: {latest:?}"
        );
    }
}

/// A client that sends `m N` every 100 ms (N = 0, 1, ...) until told to stop, and checks each
/// echo as it comes: in order, once each, counted on by the same session. Returns the echoes.
async fn chatty_client(
    addr: SocketAddr,
    client: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
    board: Board,
) -> Result<Vec<Echo>, String> {
    let result = async {
        let (mut ws, first) = ws_connect(addr, "/ws", &format!("c{client}")).await;
        board.set(client, first.pid);
        let mut echoes: Vec<Echo> = Vec::new();
        let mut sent = 0u64;
        let mut stopping = false;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !(stopping && echoes.len() as u64 == sent) {
            tokio::select! {
                _ = tick.tick(), if !stopping => {
                    ws.send(Message::text(format!("m {sent}")))
                        .await
                        .map_err(|e| format!("send m {sent}: {e}"))?;
                    sent += 1;
                }
                _ = stop.changed(), if !stopping => stopping = true,
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        let echo = parse_echo(t.as_str());
                        let n = echoes.len() as u64;
                        if echo.text != format!("m {n}") || echo.count != n + 2 {
                            return Err(format!("expected the echo of m {n} (count {}), got {echo:?}", n + 2));
                        }
                        if (echo.session, &echo.nick) != (first.session, &first.nick) {
                            return Err(format!("the session changed: {first:?}, then {echo:?}"));
                        }
                        board.set(client, echo.pid);
                        echoes.push(echo);
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => {
                        return Err(format!("after {} echoes of {sent} sent: {other:?}", echoes.len()));
                    }
                },
            }
        }
        let _ = ws.close(None).await;
        Ok(echoes)
    }
    .await;
    if result.is_err() {
        board.set(client, 0);
    }
    result.map_err(|e| format!("client {client}: {e}"))
}

#[test]
fn fifty_websockets_move_across_five_restarts_with_their_state_and_no_message_lost_duplicated_or_reordered()
 {
    let _light = light();
    const CLIENTS: usize = 50;
    const RESTARTS: usize = 5;
    let notify = NotifySocket::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let drain = format!("HANDOVER_DRAIN_TIMEOUT_MS={}", DRAIN_TIMEOUT.as_millis());
    let mut server = socket_activate(&listen, None, &notify, &[&drain], "websocket", &listen);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // The first connection starts the program.
    assert_eq!(get(addr, "/").expect("activation request").pid, server.pid);
    notify.wait_line("READY=1", SOON);

    let rt = multi_thread_runtime();
    let board = Board::new(CLIENTS);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| rt.spawn(chatty_client(addr, i, stopped.clone(), board.clone())))
        .collect();
    board.wait_all(server.pid, SOON);

    let mut pids = vec![server.pid];
    for i in 1..=RESTARTS {
        let old = *pids.last().expect("a pid");
        let began = Instant::now();
        let new = if i % 2 == 1 {
            restart_once(&notify, old, i)
        } else {
            let reply = request(addr, "POST", "/restart").expect("restart through the handle");
            assert_eq!((reply.status, reply.pid), (200, old), "{reply:?}");
            let new = mainpid(
                &notify.wait_nth(i, SOON, |n| n.has("READY=1") && n.text.contains("MAINPID=")),
            );
            assert_eq!(
                reply.body.trim(),
                format!("restarted: pid {new} serves now")
            );
            new
        };
        // Every client is answered by the new process, on the same connection.
        board.wait_all(new, SOON);
        let code = match i {
            1 => server.wait(DRAIN_TIMEOUT),
            _ => wait_exit(old, DRAIN_TIMEOUT),
        };
        assert_eq!(code, Some(0), "old process {old} exit code");
        let took = began.elapsed();
        assert!(
            took < PROMPTLY,
            "restart {i}: the old process exited {took:?} after it (drain deadline {DRAIN_TIMEOUT:?})"
        );
        pids.push(new);
    }

    stop.send(true).expect("clients listening");
    let mut total = 0;
    for (i, client) in clients.into_iter().enumerate() {
        let echoes = rt
            .block_on(client)
            .expect("client task")
            .unwrap_or_else(|e| panic!("{e}"));
        total += echoes.len();
        // Answered by each process in turn, never by an older one again.
        let mut seen: Vec<u32> = echoes.iter().map(|e| e.pid).collect();
        seen.dedup();
        let first = pids
            .iter()
            .position(|&p| p == seen[0])
            .unwrap_or_else(|| panic!("client {i}: unknown pid {}", seen[0]));
        assert_eq!(
            seen,
            pids[first..],
            "client {i}: the pids that answered, in order"
        );
    }
    assert!(total >= CLIENTS * RESTARTS, "{total} echoes in all");
    let last = *pids.last().expect("a pid");
    signal(last, Signal::TERM);
    assert_eq!(wait_exit(last, DRAIN_TIMEOUT), Some(0));
    assert_none_left(pids);
}

#[test]
fn a_websocket_whose_state_is_over_the_bound_gets_close_1001_and_the_others_move_one_with_a_state_near_the_bound()
 {
    let _light = light();
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_websocket(&notify, &[]);
    let old = server.pid;
    let rt = multi_thread_runtime();
    let (big, small) = rt.block_on(async {
        let (mut big, _) = ws_connect(addr, "/ws", "big").await;
        // 70,000 bytes of state: over handover::upgrade::MAX_STATE (64 KiB).
        big.send(Message::text("pad 70000")).await.expect("send");
        let echo = ws_roundtrip(&mut big, "after pad").await;
        assert_eq!(echo.count, 2);
        let (small, _) = ws_connect(addr, "/ws", "small").await;
        let (mut medium, _) = ws_connect(addr, "/ws", "medium").await;
        // 60,000 bytes: under the bound, so it moves (one message of ~60 KiB on the channel).
        medium.send(Message::text("pad 60000")).await.expect("send");
        assert_eq!(ws_roundtrip(&mut medium, "after pad").await.count, 2);
        (tokio::spawn(ws_await_close(big)), (small, medium))
    });
    let (mut small, mut medium) = small;
    let began = Instant::now();
    let new = restart_once(&notify, old, 1);
    rt.block_on(async {
        let (code, reason) = big.await.expect("client task");
        assert_eq!(code, CloseCode::Away, "Close 1001 ({reason})");
        assert_eq!(reason, "server restarting; reconnect");
        // The other one moved: same session, counted on, answered by the new process.
        let echo = ws_roundtrip(&mut small, "still here").await;
        assert_eq!(
            (echo.pid, echo.nick.as_str(), echo.count),
            (new, "small", 2)
        );
        let echo = ws_roundtrip(&mut medium, "still here").await;
        assert_eq!(
            (echo.pid, echo.nick.as_str(), echo.count),
            (new, "medium", 3)
        );
    });
    assert_eq!(server.wait(DRAIN_TIMEOUT), Some(0), "old process exit code");
    assert!(began.elapsed() < PROMPTLY, "{:?}", began.elapsed());
    drop((small, medium));
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, DRAIN_TIMEOUT), Some(0));
    assert_none_left([old, new]);
}

#[test]
fn a_message_half_received_at_the_restart_moves_with_its_connection_and_is_answered_whole() {
    let _light = light();
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let notify = NotifySocket::new();
    let (mut server, addr) = ready_websocket(&notify, &[]);
    let old = server.pid;
    let rt = multi_thread_runtime();
    let mut ws = rt.block_on(async {
        let (mut ws, _) = ws_connect(addr, "/ws", "frag").await;
        // The first fragment of a text message, then a ping: its pong says the server has read
        // the fragment (frames are read in order), which its tungstenite now holds, unfinished.
        let first = Frame::message("first half, ", OpCode::Data(Data::Text), false);
        ws.send(Message::Frame(first)).await.expect("send");
        ws.send(Message::Ping("after the first half".into()))
            .await
            .expect("send");
        match tokio::time::timeout(SOON, ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"after the first half"),
            other => panic!("expected the pong, got {other:?}"),
        }
        ws
    });
    let new = restart_once(&notify, old, 1);
    assert_eq!(server.wait(DRAIN_TIMEOUT), Some(0), "old process exit code");
    rt.block_on(async {
        let last = Frame::message("second half", OpCode::Data(Data::Continue), true);
        ws.send(Message::Frame(last)).await.expect("send");
        loop {
            match tokio::time::timeout(SOON, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let echo = parse_echo(t.as_str());
                    assert_eq!(echo.text, "first half, second half");
                    assert_eq!((echo.pid, echo.nick.as_str(), echo.count), (new, "frag", 2));
                    break;
                }
                // The new process reads the ping again, with the message it is inside.
                Ok(Some(Ok(Message::Pong(_)))) => {}
                other => panic!("expected the echo of the whole message, got {other:?}"),
            }
        }
    });
    drop(ws);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, DRAIN_TIMEOUT), Some(0));
    assert_none_left([old, new]);
}

#[test]
fn ten_thousand_idle_websockets_move_in_one_restart_and_stay_usable() {
    let _heavy = HEAVY.write().unwrap_or_else(|p| p.into_inner());
    const N: usize = 10_000;
    // This process holds the N client sockets, each server its N: with room for the rest.
    let want = N as u64 + 5_000;
    let limit = raise_nofile(want);
    if limit < want {
        eprintln!(
            "SKIPPED: {N} connections need RLIMIT_NOFILE {want}, and it could only be raised to \
             {limit} (raise the hard limit to run this test)"
        );
        return;
    }
    let started = Instant::now();
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_websocket(&notify, &[]);
    let old = server.pid;
    let rt = multi_thread_runtime();
    // In batches that fit in the listen backlog (128), each connection named and answered once.
    const BATCH: usize = 100;
    let mut clients: Vec<Ws> = Vec::with_capacity(N);
    rt.block_on(async {
        for batch in 0..N.div_ceil(BATCH) {
            let mut set = tokio::task::JoinSet::new();
            for i in batch * BATCH..((batch + 1) * BATCH).min(N) {
                set.spawn(async move { ws_connect(addr, "/ws", &format!("w{i}")).await });
            }
            while let Some(joined) = set.join_next().await {
                let (ws, echo) = joined.expect("client task");
                assert_eq!(echo.pid, old);
                clients.push(ws);
            }
        }
    });
    let opened = started.elapsed();

    let signalled = Instant::now();
    let new = restart_once(&notify, old, 1);
    // The old process exits once every WebSocket was handed over and acknowledged.
    assert_eq!(server.wait(DRAIN_TIMEOUT), Some(0), "old process exit code");
    let moved = signalled.elapsed();

    // Every one still open, the same connection, its session counted on by the new process.
    rt.block_on(async {
        let mut clients = clients.into_iter();
        loop {
            let batch: Vec<Ws> = clients.by_ref().take(BATCH).collect();
            if batch.is_empty() {
                break;
            }
            let mut set = tokio::task::JoinSet::new();
            for mut ws in batch {
                set.spawn(async move {
                    let echo = ws_roundtrip(&mut ws, "after").await;
                    (echo, ws)
                });
            }
            while let Some(joined) = set.join_next().await {
                let (echo, _ws) = joined.expect("client task");
                assert_eq!((echo.pid, echo.count), (new, 2), "{echo:?}");
            }
        }
    });
    eprintln!(
        "{N} idle WebSockets: opened in {:.1} s; SIGUSR1 -> old process exited, all handed over, \
         in {:.2} s; each answered by the new process; test {:.1} s",
        opened.as_secs_f64(),
        moved.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, DRAIN_TIMEOUT), Some(0));
    assert_none_left([old, new]);
}

/// A TLS WebSocket cannot move (its session would have to move too): at a restart it gets
/// Close 1001, while a plaintext one of the same process moves.
#[cfg(feature = "rustls")]
#[test]
fn at_a_restart_a_tls_websocket_gets_close_1001_and_a_plaintext_one_moves() {
    let _light = light();
    use std::sync::Arc;
    use tokio_rustls::rustls::{self, ClientConfig, pki_types::ServerName};

    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("test certificate");
    let dir = scratch_dir("websocket-tls");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, key.cert.pem()).expect("write the certificate");
    std::fs::write(&key_path, key.signing_key.serialize_pem()).expect("write the key");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(key.cert.der().clone()).expect("trust it");
    let client_config = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    let notify = NotifySocket::new();
    let wss_port = free_port();
    let mut server = Spawn::new(example("websocket"))
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg(format!("127.0.0.1:{wss_port}"))
        .env("NOTIFY_SOCKET", &notify.path)
        .env(
            "HANDOVER_DRAIN_TIMEOUT_MS",
            DRAIN_TIMEOUT.as_millis().to_string(),
        )
        .env("WS_TLS_CERT", &cert_path)
        .env("WS_TLS_KEY", &key_path)
        .start();
    let addr = addr_in(&listen_line_of(&server.lines, "web"));
    let wss = SocketAddr::from(([127, 0, 0, 1], wss_port));
    notify.wait_line("READY=1", SOON);
    let old = server.pid;
    let rt = multi_thread_runtime();
    let (tls_client, mut plain) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(wss).await.expect("connect");
        let tls = tokio_rustls::TlsConnector::from(client_config)
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("TLS handshake");
        let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
            .await
            .expect("WebSocket handshake over TLS");
        ws.send(Message::text("hello")).await.expect("send");
        match tokio::time::timeout(SOON, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => assert_eq!(parse_echo(t.as_str()).pid, old),
            other => panic!("expected an echo over TLS, got {other:?}"),
        }
        let tls_client = tokio::spawn(async move {
            loop {
                match tokio::time::timeout(DRAIN_TIMEOUT, ws.next()).await {
                    Ok(Some(Ok(Message::Close(Some(frame))))) => {
                        while let Ok(Some(Ok(_))) = tokio::time::timeout(SOON, ws.next()).await {}
                        return (frame.code, frame.reason.to_string());
                    }
                    Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                    other => panic!("expected a Close frame over TLS, got {other:?}"),
                }
            }
        });
        let (plain, _) = ws_connect(addr, "/ws", "plain").await;
        (tls_client, plain)
    });
    let began = Instant::now();
    let new = restart_once(&notify, old, 1);
    rt.block_on(async {
        let (code, reason) = tls_client.await.expect("client task");
        assert_eq!(code, CloseCode::Away, "Close 1001 ({reason})");
        assert_eq!(reason, "server restarting; reconnect");
        let echo = ws_roundtrip(&mut plain, "moved").await;
        assert_eq!(
            (echo.pid, echo.nick.as_str(), echo.count),
            (new, "plain", 2)
        );
    });
    assert_eq!(server.wait(DRAIN_TIMEOUT), Some(0), "old process exit code");
    assert!(began.elapsed() < PROMPTLY, "{:?}", began.elapsed());
    drop(plain);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, DRAIN_TIMEOUT), Some(0));
    assert_none_left([old, new]);
}

/// The new process dies after its `READY=1` with the WebSocket sent to it but not acknowledged:
/// the old process takes it back (the channel's end is the successor's proven death) and says
/// goodbye on it; nothing the client sent is lost before the Close. Then it serves again (its
/// successor died), and the client reconnects to it.
#[test]
fn a_new_process_that_dies_before_acknowledging_a_websocket_leaves_it_with_the_old_one() {
    let _light = light();
    let notify = NotifySocket::new();
    // The hand-off's own record of each batch it sent: the successor must be killed after the
    // WebSocket went to it, not before (then it would never leave, which is the old process
    // serving on, not the take-back this test is about).
    let (mut server, addr) =
        ready_websocket(&notify, &[("RUST_LOG", "info,handover::handoff=debug")]);
    let old = server.pid;
    let rt = multi_thread_runtime();
    let ws = rt.block_on(async {
        let (mut ws, _) = ws_connect(addr, "/ws", "orphan").await;
        assert_eq!(ws_roundtrip(&mut ws, "before").await.count, 2);
        ws
    });
    let client = rt.spawn(ws_await_close(ws));
    // Hold the hand-off at its last step: the service manager's queue is full, so the old
    // process waits to deliver MAINPID= (and only then passes connections).
    notify.pause();
    notify.fill();
    signal(old, Signal::USR1);
    let new = pid_in(&server.lines.wait_count("listen on:", 2, SOON));
    // Ready (its READY=1 went to the old process on their channel); now it cannot answer.
    server
        .lines
        .wait_for(&format!("handover::lifecycle: ready pid={new}"), SOON);
    signal(new, Signal::STOP);
    notify.resume();
    // MAINPID= delivered: the old process passes the WebSocket to a process that cannot
    // acknowledge it. It dies.
    let handed = notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID="));
    assert_eq!(mainpid(&handed), new);
    let sent = server
        .lines
        .wait_for("passing connections to the new process", SOON);
    assert!(
        sent.contains("connections=1") && sent.contains(&format!("to_pid={new}")),
        "{sent}"
    );
    signal(new, Signal::KILL);
    assert_eq!(wait_exit(new, SOON), None, "killed");
    rt.block_on(async {
        let (code, reason) = client.await.expect("client task");
        assert_eq!(code, CloseCode::Away, "Close 1001 ({reason})");
        assert_eq!(reason, "server restarting; reconnect");
    });
    // Its successor died while it drained: the old process serves again (issue 18), and the
    // client that reconnects reaches it.
    notify.wait_nth(1, SOON, |n| {
        n.pid == old && n.has(&format!("MAINPID={old}")) && n.has("READY=1")
    });
    rt.block_on(async {
        let (mut ws, echo) = ws_connect(addr, "/ws", "back").await;
        assert_eq!(echo.pid, old, "{echo:?}");
        let _ = ws.close(None).await;
    });
    signal(old, Signal::TERM);
    assert_eq!(
        server.wait(DRAIN_TIMEOUT),
        Some(0),
        "the old process exits in order"
    );
    assert_none_left([old, new]);
}
