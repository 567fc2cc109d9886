//! WebSocket clients of `examples/websocket.rs` for the `websocket` scenario (issue 20), with
//! tokio-tungstenite as in `tests/websocket.rs`: many idle connections to `/ws`, each named
//! (`nick wI`) and answered once; after a restart, one more message on each, which the new
//! process must answer on the same connection, counting on from the state it carried over.

use std::net::{Ipv4Addr, SocketAddr};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::procs::SOON;

type Ws = WebSocketStream<TcpStream>;

/// Connections opened (and checked) at a time: a batch fits in the listen backlog (128).
const BATCH: usize = 100;

/// An echo as the example writes it: `echo pid=P session=S nick=N count=C: TEXT`.
#[derive(Debug)]
struct Echo {
    pid: u32,
    nick: String,
    count: u64,
    text: String,
}

fn parse_echo(line: &str) -> Option<Echo> {
    let (head, text) = line.split_once(": ")?;
    let field = |name: &str| head.split(' ').find_map(|w| w.strip_prefix(name));
    Some(Echo {
        pid: field("pid=")?.parse().ok()?,
        nick: field("nick=")?.to_string(),
        count: field("count=")?.parse().ok()?,
        text: text.to_string(),
    })
}

/// Sends `text`, returns its echo (pings and pongs skipped).
async fn roundtrip(ws: &mut Ws, text: &str) -> Result<Echo, String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        match tokio::time::timeout(SOON, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let echo = parse_echo(t.as_str()).ok_or_else(|| format!("not an echo: {t:?}"))?;
                return if echo.text == text {
                    Ok(echo)
                } else {
                    Err(format!("expected the echo of {text:?}, got {echo:?}"))
                };
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => return Err(format!("expected the echo of {text:?}, got {other:?}")),
            Err(_) => return Err(format!("no echo of {text:?} within {SOON:?}")),
        }
    }
}

/// One WebSocket to `addr` (from `source`, if given), named `nick`, answered by `pid`.
async fn connect(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    nick: String,
    pid: u32,
) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(src) = source {
        socket
            .bind(SocketAddr::from((src, 0)))
            .map_err(|e| format!("bind {src}: {e}"))?;
    }
    let tcp = tokio::time::timeout(SOON, socket.connect(addr))
        .await
        .map_err(|_| format!("no connection within {SOON:?}"))?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut ws, _) = tokio::time::timeout(
        SOON,
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp),
    )
    .await
    .map_err(|_| format!("no WebSocket handshake within {SOON:?}"))?
    .map_err(|e| format!("WebSocket handshake: {e}"))?;
    ws.send(Message::text(format!("nick {nick}")))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let echo = roundtrip(&mut ws, "hello").await?;
    if (echo.pid, echo.nick.as_str(), echo.count) != (pid, nick.as_str(), 1) {
        return Err(format!(
            "expected pid {pid}, nick {nick}, count 1, got {echo:?}"
        ));
    }
    Ok(ws)
}

/// Open, idle WebSockets (connection `i` named `wI`), and the runtime they live on.
pub(crate) struct Clients {
    rt: tokio::runtime::Runtime,
    conns: Vec<Ws>,
}

impl Clients {
    /// `n` WebSockets to `addr`'s `/ws`, each answered once by `pid`; from `sources` in turn
    /// (none: the default one).
    pub(crate) fn open(
        addr: SocketAddr,
        n: usize,
        sources: &[Ipv4Addr],
        pid: u32,
    ) -> Result<Clients, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("client runtime: {e}"))?;
        let conns = rt.block_on(async {
            let mut conns = Vec::with_capacity(n);
            for batch in 0..n.div_ceil(BATCH) {
                let mut set = tokio::task::JoinSet::new();
                for i in batch * BATCH..((batch + 1) * BATCH).min(n) {
                    let source = sources.get(i % sources.len().max(1)).copied();
                    set.spawn(async move {
                        let ws = connect(addr, source, format!("w{i}"), pid).await;
                        (i, ws)
                    });
                }
                let mut got = Vec::with_capacity(BATCH);
                while let Some(joined) = set.join_next().await {
                    let (i, ws) = joined.map_err(|e| format!("client task: {e}"))?;
                    got.push((i, ws.map_err(|e| format!("WebSocket #{i}: {e}"))?));
                }
                // In the order of their names: connection `i` is `w{i}`.
                got.sort_by_key(|(i, _)| *i);
                conns.extend(got.into_iter().map(|(_, ws)| ws));
            }
            Ok::<_, String>(conns)
        })?;
        Ok(Clients { rt, conns })
    }

    /// One more message on each connection, which must be answered by `pid` with the
    /// connection's own state (its name, and the count going on: 2). The failures, one line
    /// each.
    pub(crate) fn answered_by(&mut self, pid: u32) -> Vec<String> {
        let conns = std::mem::take(&mut self.conns);
        let (conns, failures) = self.rt.block_on(async {
            let mut kept = Vec::with_capacity(conns.len());
            let mut failures = Vec::new();
            let mut conns = conns.into_iter().enumerate();
            loop {
                let batch: Vec<(usize, Ws)> = conns.by_ref().take(BATCH).collect();
                if batch.is_empty() {
                    break;
                }
                let mut set = tokio::task::JoinSet::new();
                for (i, mut ws) in batch {
                    set.spawn(async move {
                        let echo = roundtrip(&mut ws, "after").await;
                        let checked = echo.and_then(|e| {
                            if (e.pid, e.nick.as_str(), e.count)
                                == (pid, format!("w{i}").as_str(), 2)
                            {
                                Ok(())
                            } else {
                                Err(format!("expected pid {pid}, nick w{i}, count 2, got {e:?}"))
                            }
                        });
                        (i, ws, checked)
                    });
                }
                while let Some(joined) = set.join_next().await {
                    match joined {
                        Ok((i, ws, checked)) => {
                            if let Err(e) = checked {
                                failures.push(format!("WebSocket #{i}: {e}"));
                            }
                            kept.push(ws);
                        }
                        Err(e) => failures.push(format!("client task: {e}")),
                    }
                }
            }
            (kept, failures)
        });
        self.conns = conns;
        failures
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        // Closed by dropping, in the runtime's context (their sockets are registered with it).
        let _guard = self.rt.enter();
        self.conns.clear();
    }
}
