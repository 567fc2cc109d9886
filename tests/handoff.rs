//! Hitless restarts (issue 11): established HTTP/1 connections move to the new process at a
//! request boundary. Real processes, real signals, a real `NOTIFY_SOCKET`.
//!
//! - Keep-alive clients that idle between requests and never retry, over a network with
//!   latency (a loopback proxy that delays bytes and closes), keep their connections across
//!   restarts, answered by each process in turn.
//! - Request boundaries: pipelined requests and a head in pieces across the hand-off moment
//!   are answered once each, in order, by the old process for what it started and by the new
//!   one after, on the same connection (including bytes the old process had read ahead).
//! - Fallback: a new binary without connection hand-off, a new process that dies right after
//!   `READY=1` or while connections are passed: the connections stay with the old process and
//!   drain as they did before hand-off existed; no fd leaked, nothing left running.
//! - Scale: 10,000 idle connections moved in one restart, each still usable.
//!
//! Connections the tests drive byte by byte are plain sockets ([`Raw`]); where the outcome
//! depends on when the server has read something, or when a socket has moved, the tests wait
//! for that in the kernel's tables (`/proc/net/tcp`, `/proc/PID/fd`), bounded in time.

mod support;

// The support's own tests (the proxy, the workload) run here, once, rather than in every test
// crate that shares `support`.
#[path = "support/idle_tests.rs"]
mod idle_tests;
#[path = "support/proxy_tests.rs"]
mod proxy_tests;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::idle::{IdleClients, IdleConfig};
use support::proxy::Proxy;
use support::*;

const CLIENTS: usize = 60;
const RESTARTS: usize = 6;

/// Stops the workload and fails with what it saw so far.
fn give_up(load: IdleClients, why: String) -> ! {
    let report = load.stop();
    panic!("{why}\n{}", report.summary());
}

#[test]
fn idle_keep_alive_clients_over_a_real_network_lose_nothing_across_restarts() {
    let started = Instant::now();
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_hello(&notify);
    let proxy = Proxy::start(addr);
    let load = IdleClients::start(proxy.addr(), IdleConfig::new(CLIENTS));
    if let Err(e) = load.wait_all_answered_by(server.pid, SOON) {
        give_up(load, e);
    }

    let mut pids = vec![server.pid];
    for i in 1..=RESTARTS {
        let old = *pids.last().expect("a pid");
        let new = restart_once(&notify, old, i);
        let code = if i == 1 {
            server.wait(SOON)
        } else {
            wait_exit(old, SOON)
        };
        assert_eq!(code, Some(0), "old process {old} exit code");
        pids.push(new);
        // Every client has had its turn with the new process before the next restart.
        if let Err(e) = load.wait_all_answered_by(new, SOON) {
            give_up(load, format!("restart {i}: {e}"));
        }
    }

    let report = load.stop();
    // The clients closed their connections; the proxy has seen every close by now.
    proxy.wait_all_ended(SOON).expect("proxy connections end");
    let conns = proxy.connections();
    let last = *pids.last().expect("a pid");
    signal(last, Signal::TERM);
    assert_eq!(wait_exit(last, SOON), Some(0));
    assert_none_left(pids.iter().copied());

    let server_closed: Vec<_> = conns.iter().filter(|c| c.server_closed_first()).collect();
    let server_resets = server_closed
        .iter()
        .filter(|c| {
            c.first_close
                .is_some_and(|f| f.how == support::proxy::How::Reset)
        })
        .count();
    let failed = report.failed();
    eprintln!(
        "{CLIENTS} idle clients over {:?} each way, {RESTARTS} restarts: {}; proxy: {} connections, {} closed by the server first ({server_resets} of them reset); run {:.1} s",
        proxy.latency().to_server,
        report.summary(),
        conns.len(),
        server_closed.len(),
        started.elapsed().as_secs_f64()
    );

    let mut wrong = Vec::new();
    if !failed.is_empty() {
        let list: Vec<String> = failed
            .iter()
            .map(|f| {
                format!(
                    "client {} port {} at {:.3} s: {:?}",
                    f.client,
                    f.local_port,
                    f.at.as_secs_f64(),
                    f.outcome
                )
            })
            .collect();
        wrong.push(format!(
            "{} failed requests, expected 0:\n  {}",
            failed.len(),
            list.join("\n  ")
        ));
    }
    if report.closed_by_server() > 0 {
        wrong.push(format!(
            "{} connections closed by the server ({} found closed before a request, {} with Connection: close), expected 0",
            report.closed_by_server(),
            report.found_closed,
            report.told_to_close
        ));
    }
    if !server_closed.is_empty() || conns.len() != CLIENTS {
        wrong.push(format!(
            "the proxy saw {} connections ({} closed by the server first), expected {CLIENTS}, all ended by their client",
            conns.len(),
            server_closed.len()
        ));
    }
    let problems = report.per_client_problems(CLIENTS, &pids);
    if !problems.is_empty() {
        wrong.push(format!(
            "{} of {CLIENTS} clients did not keep one connection answered by each process in turn; first ones:\n  {}",
            problems.len(),
            problems
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }
    assert!(
        wrong.is_empty(),
        "{}\n({}; pids {pids:?})",
        wrong.join("\n"),
        report.summary()
    );
}

// ---------------------------------------------------------------------------------------------
// Connections driven byte by byte.

/// A plain HTTP/1.1 connection written and read by hand: the test decides exactly what the
/// server has received, and when (a head in pieces, requests pipelined in one write).
struct Raw {
    stream: TcpStream,
    /// Bytes received and not yet parsed as an answer.
    buf: Vec<u8>,
    /// The client-side port: the connection's identity for the test.
    port: u16,
}

/// One answer, as the test needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    pid: u32,
    /// `x-tag`: which request it answers.
    tag: String,
    /// `Connection: close`.
    close: bool,
}

/// `GET /?tag=TAG` (plus `query`), one whole request head.
fn req(tag: &str, query: &str) -> Vec<u8> {
    format!("GET /?tag={tag}{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes()
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream.set_read_timeout(Some(SOON)).expect("read timeout");
        let port = stream.local_addr().expect("local address").port();
        Raw {
            stream,
            buf: Vec::new(),
            port,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("connection from port {}: write: {e}", self.port));
    }

    /// One request, and its answer.
    fn get(&mut self, tag: &str) -> Result<Answer, String> {
        self.write(&req(tag, ""));
        self.answer()
    }

    /// Reads the next answer (a `200` with a `Content-Length` body, as `hello` sends). `Err`
    /// says what came instead: EOF, a reset, a timeout, another status.
    fn answer(&mut self) -> Result<Answer, String> {
        loop {
            if let Some(answer) = self.parse()? {
                return Ok(answer);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(format!(
                        "port {}: EOF before a complete answer ({} bytes of one received)",
                        self.port,
                        self.buf.len()
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("port {}: read: {e}", self.port)),
            }
        }
    }

    /// A complete answer at the front of `buf`, taken off it.
    fn parse(&mut self) -> Result<Option<Answer>, String> {
        let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("");
        if !status.starts_with("HTTP/1.1 200 ") {
            return Err(format!("port {}: expected a 200, got {head:?}", self.port));
        }
        let mut answer = Answer {
            pid: 0,
            tag: String::new(),
            close: false,
        };
        let mut length = 0;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "x-pid" => answer.pid = value.parse().unwrap_or(0),
                "x-tag" => answer.tag = value.to_string(),
                "connection" => answer.close = value.eq_ignore_ascii_case("close"),
                "content-length" => length = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        let total = end + 4 + length;
        if self.buf.len() < total {
            return Ok(None);
        }
        self.buf.drain(..total);
        Ok(Some(answer))
    }

    /// Whether bytes (or an EOF) are waiting to be read, without waiting or reading them.
    fn has_bytes(&self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        self.stream.set_nonblocking(true).expect("non-blocking");
        let peeked = self.stream.peek(&mut probe);
        self.stream.set_nonblocking(false).expect("blocking");
        !matches!(peeked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Waits for the server to close the connection: `Ok` on a clean EOF with nothing unread,
    /// `Err` on bytes, a reset, or nothing within the timeout.
    fn closed_by_server(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 256];
        match self.stream.read(&mut chunk) {
            Ok(0) if self.buf.is_empty() => Ok(()),
            Ok(0) => Err(format!(
                "port {}: EOF after {} unparsed bytes",
                self.port,
                self.buf.len()
            )),
            Ok(n) => Err(format!(
                "port {}: expected a close, got {:?}",
                self.port,
                String::from_utf8_lossy(&chunk[..n])
            )),
            Err(e) => Err(format!("port {}: expected a clean close: {e}", self.port)),
        }
    }
}

/// `n` connections to `addr`, each with one request answered by `pid`: idle keep-alive
/// connections.
fn idle_conns(addr: SocketAddr, n: usize, pid: u32) -> Vec<Raw> {
    (0..n)
        .map(|i| {
            let mut c = Raw::connect(addr);
            let a = c.get(&format!("idle-{i}")).expect("first answer");
            assert_eq!(a.pid, pid, "{a:?}");
            c
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// What the kernel says.

/// One line of `/proc/net/tcp` (IPv4): the ports, the state, the receive queue and the inode.
struct TcpEntry {
    local_port: u16,
    remote_port: u16,
    /// `0A`: listening, `01`: established.
    state: u8,
    rx_queue: u64,
    inode: u64,
}

fn tcp_table() -> Vec<TcpEntry> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port = |addr: &str| {
        addr.split_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let (_, rx) = f.get(4)?.split_once(':')?;
            Some(TcpEntry {
                local_port: port(f.get(1)?)?,
                remote_port: port(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                rx_queue: u64::from_str_radix(rx, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Waits until the server side of the connection from `client_port` has read everything the
/// client sent (its receive queue is empty). There is no event for this; the kernel's table
/// is polled, bounded in time.
fn wait_server_read(server_port: u16, client_port: u16) {
    let deadline = Instant::now() + SOON;
    loop {
        let queued = tcp_table()
            .into_iter()
            .find(|e| e.local_port == server_port && e.remote_port == client_port && e.state == 1)
            .map(|e| e.rx_queue);
        if queued == Some(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not read what the client on port {client_port} sent within {SOON:?} (receive queue: {queued:?})"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The inode of the server side of the connection from `client_port` to `server_port`.
fn server_side_inode(server_port: u16, client_port: u16) -> u64 {
    tcp_table()
        .into_iter()
        .find(|e| e.local_port == server_port && e.remote_port == client_port && e.state == 1)
        .map(|e| e.inode)
        .unwrap_or_else(|| panic!("no connection from port {client_port} to port {server_port}"))
}

/// Waits until the server side of the connection from `client_port` is an fd of process `pid`
/// (the same socket: passed, not reopened). Polled, bounded in time: there is no event.
fn wait_moved(server_port: u16, client_port: u16, pid: u32) {
    let socket = format!("socket:[{}]", server_side_inode(server_port, client_port));
    let deadline = Instant::now() + SOON;
    while !fds_of(pid).iter().any(|(_, target)| *target == socket) {
        assert!(
            Instant::now() < deadline,
            "the connection from port {client_port} ({socket}) did not move to pid {pid} within {SOON:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The inode of the socket listening on `port`.
fn listener_inode(port: u16) -> u64 {
    let inodes: Vec<u64> = tcp_table()
        .into_iter()
        .filter(|e| e.local_port == port && e.state == 0x0A)
        .map(|e| e.inode)
        .collect();
    assert_eq!(
        inodes.len(),
        1,
        "sockets listening on port {port}: {inodes:?}"
    );
    inodes[0]
}

/// What a process's fds point to, counted: `socket:[N]`, `anon_inode:[eventpoll]`, pipes...
fn fd_targets(pid: u32) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (_, target) in fds_of(pid) {
        *out.entry(target).or_default() += 1;
    }
    out
}

/// `after` against `before`: what appeared and what went, one line each.
fn fd_changes(before: &BTreeMap<String, usize>, after: &BTreeMap<String, usize>) -> Vec<String> {
    let mut changes = Vec::new();
    for (target, &n) in after {
        let was = before.get(target).copied().unwrap_or(0);
        if n > was {
            changes.push(format!("+{} {target}", n - was));
        }
    }
    for (target, &n) in before {
        let now = after.get(target).copied().unwrap_or(0);
        if n > now {
            changes.push(format!("-{} {target}", n - now));
        }
    }
    changes
}

/// The number after `field: ` in the `Shutdown { .. }` line process `pid` logged.
fn shutdown_field(lines: &Lines, pid: u32, field: &str) -> usize {
    let needle = format!("[{pid}]");
    let line = lines
        .all()
        .into_iter()
        .find(|l| l.contains(&needle) && l.contains("Shutdown {"))
        .unwrap_or_else(|| panic!("pid {pid} logged no Shutdown line"));
    line.split_once(&format!(" {field}: "))
        .and_then(|(_, rest)| rest.split([',', ' ']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {line:?}"))
}

/// Waits for the `MAINPID=` + `READY=1` datagram of the `n`-th hand-off; returns the new pid.
fn handed_over(notify: &NotifySocket, n: usize, old: u32) -> u32 {
    let handed = notify.wait_nth(n, SOON, |m| m.has("READY=1") && m.text.contains("MAINPID="));
    assert_eq!(
        handed.pid, old,
        "the old main process announces its successor"
    );
    let new = mainpid(&handed);
    assert_ne!(new, old);
    new
}

/// Ends `pid` (the last server of a test) with SIGTERM: exit code 0.
fn stop_server(pid: u32) {
    signal(pid, Signal::TERM);
    assert_eq!(wait_exit(pid, SOON), Some(0), "pid {pid} exit code");
}

// ---------------------------------------------------------------------------------------------
// Request boundaries: pipelining and a head in pieces across the hand-off moment.

/// `n` requests written in one write on a keep-alive connection, the first one slow, and a
/// restart while it is being answered (the hand-off of the connections happens while the
/// others wait behind it). Checks what must hold for any `n`, and returns the old pid, the new
/// pid and the answers, in the order received.
fn pipeline_across_the_hand_off(n: usize) -> (u32, u32, Vec<Answer>) {
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_hello(&notify);
    let old = server.pid;
    let mut conn = Raw::connect(addr);
    assert_eq!(conn.get("warm-up").expect("warm-up").pid, old);
    // An idle connection, the witness: it moves as soon as the old process hands its
    // connections over.
    let mut witness = Raw::connect(addr);
    assert_eq!(witness.get("witness").expect("witness").pid, old);

    let pipelined: Vec<u8> = (1..=n)
        .flat_map(|i| req(&i.to_string(), if i == 1 { "&sleep_ms=1000" } else { "" }))
        .collect();
    conn.write(&pipelined);
    server.lines.wait_for("slow request: sleeping", SOON);
    signal(old, Signal::USR1);
    let new = handed_over(&notify, 1, old);
    wait_moved(addr.port(), witness.port, new);
    assert!(
        !conn.has_bytes(),
        "the first pipelined request was answered before the connections moved: the machine \
         is too slow for this test's 1 s request"
    );

    let answers: Vec<Answer> = (1..=n)
        .map(|i| {
            conn.answer()
                .unwrap_or_else(|e| panic!("pipelined request {i} of {n}: {e}"))
        })
        .collect();
    // The old process has let go of the connection at a request boundary by now: it is the
    // new process's.
    wait_moved(addr.port(), conn.port, new);
    let last = conn
        .get("last")
        .expect("a request after the pipelined ones");
    let witnessed = witness.get("witness-after").expect("the witness, moved");
    let pids: Vec<u32> = answers.iter().map(|a| a.pid).collect();
    let by_old = pids.iter().take_while(|&&p| p == old).count();
    eprintln!(
        "{n} pipelined requests across the hand-off {old} -> {new}: {by_old} answered by the old \
         process, {} by the new one; then {last:?}",
        n - by_old
    );

    let tags: Vec<String> = answers.iter().map(|a| a.tag.clone()).collect();
    let expected: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    assert_eq!(tags, expected, "each request answered once, in order");
    assert!(
        by_old >= 1,
        "the old process answers what it started: {pids:?}"
    );
    // The old process answers a prefix (what it had started to read when it let go of the
    // connection), the new one the rest: never old after new.
    assert!(
        pids[by_old..].iter().all(|&p| p == new),
        "answered by {pids:?}: the old process {old}, then the new one {new}"
    );
    assert!(
        answers.iter().all(|a| !a.close),
        "no answer says Connection: close: {answers:?}"
    );
    assert_eq!(last.pid, new, "the connection moved to the new process");
    assert!(!last.close);
    assert_eq!(witnessed.pid, new);

    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    assert_eq!(shutdown_field(&server.lines, old, "passed"), 2);
    assert_eq!(shutdown_field(&server.lines, old, "kept"), 0);
    assert_eq!(shutdown_field(&server.lines, old, "cut"), 0);
    drop((conn, witness));
    stop_server(new);
    assert_none_left([old, new]);
    (old, new, answers)
}

#[test]
fn three_pipelined_requests_across_the_hand_off_are_answered_in_order_on_the_same_connection() {
    // hyper answers pipelined requests it has read without stopping in between: the old
    // process answers all three, then lets go of the connection.
    pipeline_across_the_hand_off(3);
}

#[test]
fn a_long_pipeline_is_split_between_the_processes_with_the_bytes_already_read() {
    // hyper answers at most 16 pipelined requests per poll, then yields: a request boundary
    // with the rest of the pipeline in its read buffer. The old process lets go of the
    // connection there and passes those bytes with it; the new process answers them first.
    let n = 40;
    let (old, new, answers) = pipeline_across_the_hand_off(n);
    let by_new = answers.iter().filter(|a| a.pid == new).count();
    assert!(
        by_new > 0,
        "all {n} answered by the old process {old}: the bytes it had read ahead were not carried \
         over (or hyper no longer yields after 16 pipelined requests)"
    );
}

#[test]
fn a_request_head_in_pieces_across_the_hand_off_is_answered_by_the_old_process_then_moves() {
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_hello(&notify);
    let old = server.pid;
    let mut conn = Raw::connect(addr);
    assert_eq!(conn.get("warm-up").expect("warm-up").pid, old);
    let mut witness = Raw::connect(addr);
    assert_eq!(witness.get("witness").expect("witness").pid, old);

    // The first half of a head, read by the old process before the restart: it has started
    // that request, so it must answer it (and must not pass the connection before).
    let head = req("split", "");
    let (first, rest) = head.split_at(head.len() / 2);
    conn.write(first);
    wait_server_read(addr.port(), conn.port);
    signal(old, Signal::USR1);
    let new = handed_over(&notify, 1, old);
    // The new process has taken over: the idle witness has moved to it already.
    wait_moved(addr.port(), witness.port, new);

    conn.write(rest);
    let split = conn.answer().expect("the request sent in two pieces");
    wait_moved(addr.port(), conn.port, new);
    let after = conn
        .get("after")
        .expect("the next request on the same connection");
    eprintln!("head in pieces across the hand-off {old} -> {new}: {split:?}, then {after:?}");
    assert_eq!(split.tag, "split");
    assert_eq!(
        split.pid, old,
        "the old process answers the request it started to read"
    );
    assert!(
        !split.close,
        "no Connection: close: the connection moves instead"
    );
    assert_eq!(after.tag, "after");
    assert_eq!(after.pid, new, "then the connection is the new process's");
    assert_eq!(witness.get("witness-after").expect("witness").pid, new);

    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    assert_eq!(shutdown_field(&server.lines, old, "passed"), 2);
    assert_eq!(shutdown_field(&server.lines, old, "cut"), 0);
    drop((conn, witness));
    stop_server(new);
    assert_none_left([old, new]);
}

// ---------------------------------------------------------------------------------------------
// Fallback: a successor that does not take connections, or dies while they are passed.

/// The kind of each fd a process opened itself (`socket`, `pipe`, `anon_inode:[eventpoll]`,
/// ...), counted: what two processes of the same program should share, whatever their inode
/// numbers. Not stdio, nor what the test process itself passed down to the first server (fds
/// it inherited without close-on-exec, like a jobserver pipe: a restart does not pass those on).
fn own_fd_kinds(pid: u32) -> BTreeMap<String, usize> {
    // Inherited: the same fd number, open on the same file (a pipe or socket inode, or
    // /dev/null). Not an anonymous inode: those strings name no particular file.
    let ours: BTreeSet<(u32, String)> = fds_of(std::process::id())
        .into_iter()
        .filter(|(_, target)| {
            target.contains(":[") && !target.starts_with("anon_inode:") || target == "/dev/null"
        })
        .collect();
    let mut out = BTreeMap::new();
    for (fd, target) in fds_of(pid) {
        if fd < 3 || ours.contains(&(fd, target.clone())) {
            continue;
        }
        let kind = match target.split_once(":[") {
            Some((kind @ ("socket" | "pipe"), _)) => kind.to_string(),
            _ => target,
        };
        *out.entry(kind).or_default() += 1;
    }
    out
}

/// The socket inodes among the fds of process `pid`.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    fds_of(pid)
        .into_iter()
        .filter_map(|(_, t)| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// The inodes of every Unix `SOCK_SEQPACKET` socket (type 0005 in `/proc/net/unix`).
fn unix_seqpacket_inodes() -> BTreeSet<u64> {
    let table = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(4) == Some(&"0005")).then(|| f.get(6)?.parse().ok())?
        })
        .collect()
}

/// `n` connections, each with a request of `ms` milliseconds in flight (tags `busy-0`, ...),
/// once the server has started every one of them.
fn busy_conns(server: &Proc, addr: SocketAddr, n: usize, ms: u64) -> Vec<Raw> {
    let before = server
        .lines
        .all()
        .iter()
        .filter(|l| l.contains("slow request: sleeping"))
        .count();
    let conns = (0..n)
        .map(|i| {
            let mut c = Raw::connect(addr);
            c.write(&req(&format!("busy-{i}"), &format!("&sleep_ms={ms}")));
            c
        })
        .collect();
    server
        .lines
        .wait_count("slow request: sleeping", before + n, SOON);
    conns
}

/// Waits until the changes the fds of the old process show, against `before` (taken with the
/// same connections open, before the restart), are exactly `expected`: after a hand-off, the
/// successor's pidfd (the old process watches it while it drains, and keeps its copies of the
/// listener); once it serves again, none. The connections it keeps are the same sockets (none
/// duplicated, none lost), and nothing else of the restart (channel, hand-off socket) stays
/// open. Polled, bounded: the process closes those fds a moment after the hand-off, with no
/// event to wait for.
fn assert_fd_changes(before: &BTreeMap<String, usize>, pid: u32, expected: &[&str]) {
    let expected: Vec<String> = expected.iter().map(|e| e.to_string()).collect();
    let deadline = Instant::now() + SOON;
    let mut first = None;
    loop {
        let changes = fd_changes(before, &fd_targets(pid));
        if changes == expected {
            return;
        }
        let first = first.get_or_insert_with(|| changes.clone());
        assert!(
            Instant::now() < deadline && alive(pid),
            "fds of the old process {pid} after the hand-off, against before it: {first:?} at \
             first, {changes:?} at the end (alive: {}); expected {expected:?}",
            alive(pid)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_new_binary_without_connection_hand_off_gets_the_drain_of_today() {
    let dir = scratch_dir("no-handoff");
    let deployed = deploy_copy("hello", &dir);
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_server(&deployed, &notify);
    let old = server.pid;
    let old_alone = own_fd_kinds(old);
    let listener = listener_inode(addr.port());
    let mut idle = idle_conns(addr, 6, old);
    let mut busy = busy_conns(&server, addr, 2, 1000);
    let before = fd_targets(old);

    // The next binary does not take connections, as an older build would not: the deployed
    // file becomes a wrapper that switches the hand-off off for the new process only (a
    // restart gives the new process the old one's environment, so the switch cannot come
    // from there).
    replace_with_script(
        &deployed,
        &format!(
            "HANDOVER_CONNECTION_HANDOFF=0 exec '{}' \"$@\"",
            example("hello").display()
        ),
    );
    signal(old, Signal::USR1);
    let new = handed_over(&notify, 1, old);
    let accepted_on = format!("-1 socket:[{listener}]");
    assert_fd_changes(&before, old, &[WATCHING_THE_SUCCESSOR, &accepted_on]);
    // The old process no longer accepts (it keeps its copy of the listener, in case the new one
    // dies first, but no longer accepts on it): the new one does.
    assert_eq!(get(addr, "/").expect("a new connection").pid, new);

    // Today's drain. Idle connections: a request within the grace is answered by the old
    // process (with `Connection: close` once its drain has begun, a moment after the
    // hand-off), then the connection is closed, ...
    for (i, c) in idle[..3].iter_mut().enumerate() {
        let a = c
            .get(&format!("in-grace-{i}"))
            .expect("a request in the grace");
        assert_eq!(a.pid, old, "{a:?}");
        c.closed_by_server()
            .expect("closed after the answer, or the grace");
    }
    // ... the others are closed once the grace is over (a FIN: nothing was sent on them).
    for c in &mut idle[3..] {
        c.closed_by_server()
            .expect("an idle connection closed after the grace");
    }
    // Busy ones: answered, with `Connection: close`.
    for c in &mut busy {
        let a = c.answer().expect("the request in flight");
        assert_eq!((a.pid, a.close), (old, true), "{a:?}");
        c.closed_by_server()
            .expect("closed after Connection: close");
    }
    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    assert_eq!(shutdown_field(&server.lines, old, "drained"), 8);
    assert_eq!(shutdown_field(&server.lines, old, "passed"), 0);
    assert_eq!(shutdown_field(&server.lines, old, "kept"), 0);
    assert_eq!(shutdown_field(&server.lines, old, "cut"), 0);
    assert!(
        !server
            .lines
            .all()
            .iter()
            .any(|l| l.contains("took over connections")),
        "the new process took no connection"
    );

    // The new process holds no fd of the restart: of its TCP sockets only the listener (the
    // connections it served are closed, none came from the old process), no channel (the one
    // `SOCK_SEQPACKET` socket a restart makes), and the same runtime fds (epoll, eventfd; no
    // pidfd) as the old process had before any client came. Polled: the server side of a
    // connection a client just closed goes a moment later.
    let not_sockets = |kinds: BTreeMap<String, usize>| {
        kinds
            .into_iter()
            .filter(|(kind, _)| kind != "socket")
            .collect::<BTreeMap<_, _>>()
    };
    let expected = (BTreeSet::from([listener]), 0, not_sockets(old_alone));
    let held = || {
        let sockets = socket_inodes(new);
        let tcp: BTreeSet<u64> = tcp_table()
            .into_iter()
            .map(|e| e.inode)
            .filter(|i| sockets.contains(i))
            .collect();
        let seqpacket = unix_seqpacket_inodes()
            .iter()
            .filter(|i| sockets.contains(i))
            .count();
        (tcp, seqpacket, not_sockets(own_fd_kinds(new)))
    };
    let deadline = Instant::now() + SOON;
    while held() != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        held(),
        expected,
        "the new process {new}: (TCP socket inodes, SEQPACKET sockets, other fds), against \
         (its listener, none, the old process's before any client came)"
    );
    stop_server(new);
    assert_none_left([old, new]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fd the old process holds after a hand-off: the successor's pidfd. (It also closes the
/// copy of the listener its accept loop had: the listener itself it keeps.)
const WATCHING_THE_SUCCESSOR: &str = "+1 anon_inode:[pidfd]";

/// A successor that says it is ready and takes connections, on the channel a handover parent
/// gives it (fd 3 + LISTEN_FDS = 4 for hello's one listener), as a handover process would.
const READY_TAKING_CONNECTIONS: &str = r#"[ "$HANDOVER_CHANNEL_FD" = 4 ] || { echo "expected HANDOVER_CHANNEL_FD=4, got '$HANDOVER_CHANNEL_FD'" >&2; exit 9; }
printf 'READY=1\nX_HANDOVER_CONNECTIONS=1\n' >&4"#;

#[test]
fn a_new_process_that_dies_right_after_ready_leaves_the_connections_with_the_old_one() {
    let dir = scratch_dir("dies-after-ready");
    let deployed = deploy_copy("hello", &dir);
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_server(&deployed, &notify);
    let old = server.pid;
    let listener = listener_inode(addr.port());
    // Only busy connections: nothing is passed before their answers, long after the new
    // process died.
    let n = 4;
    let mut busy = busy_conns(&server, addr, n, 1000);
    // And a longer one, which keeps the old process alive while the test looks at its fds.
    let mut holder = busy_conns(&server, addr, 1, 3000).remove(0);
    let sockets: Vec<u64> = busy
        .iter()
        .map(|c| server_side_inode(addr.port(), c.port))
        .collect();
    let before = fd_targets(old);

    // The successor says READY=1 (taking connections), and is killed as soon as the service
    // manager has heard of it: it dies right after its READY=1, with nothing passed yet.
    replace_with_script(
        &deployed,
        &format!("{READY_TAKING_CONNECTIONS}\nexec sleep 60"),
    );
    signal(old, Signal::USR1);
    let new = handed_over(&notify, 1, old);
    signal(new, Signal::KILL);
    assert_eq!(
        wait_exit(new, SOON),
        None,
        "the new process {new} was killed"
    );

    // The old process learns of the death from the successor's pidfd at once, and serves
    // again (issue 18), on the listener it kept. Each request in flight is answered by it:
    // with `Connection: close` once it knows (the clients of the drain it gave up move on, to
    // it now); an answer written before that (a slow start under load) is a keep-alive one, and
    // that connection is still the old process's (given back, if it was passed meanwhile).
    server.lines.wait_for(
        "the new process died while this one drains: serving again",
        SOON,
    );
    let answers: Vec<Answer> = busy
        .iter_mut()
        .map(|c| c.answer().expect("the request in flight"))
        .collect();
    eprintln!("a successor dead right after READY=1: {answers:?}");
    assert!(answers.iter().all(|a| a.pid == old), "{answers:?}");
    let kept: Vec<usize> = (0..n).filter(|&i| !answers[i].close).collect();
    // The next request on a kept connection: answered with `Connection: close`.
    for &i in &kept {
        let a = busy[i].get("kept").expect("a request on a kept connection");
        assert_eq!((a.pid, a.close), (old, true), "{a:?}");
    }
    // Those connections closed after their `Connection: close`; nothing of the restart is
    // left open, and the listener is accepted on again.
    let mut closed = before.clone();
    for socket in &sockets {
        closed.remove(&format!("socket:[{socket}]"));
    }
    assert_fd_changes(&closed, old, &[]);
    assert_eq!(get(addr, "/").expect("a new connection").pid, old);
    let a = holder.answer().expect("the longer request in flight");
    assert_eq!((a.pid, a.close), (old, true), "{a:?}");
    for c in busy.iter_mut().chain([&mut holder]) {
        c.closed_by_server()
            .expect("closed after Connection: close, or the grace");
    }
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    assert_eq!(shutdown_field(&server.lines, old, "cut"), 0);
    assert_none_left([old, new]);
    let _ = listener;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_process_that_dies_while_connections_are_passed_leaves_them_with_the_old_one() {
    let dir = scratch_dir("dies-while-passed");
    let deployed = deploy_copy("hello", &dir);
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_server(&deployed, &notify);
    let old = server.pid;
    let listener = listener_inode(addr.port());
    let mut idle = idle_conns(addr, 8, old);
    let before = fd_targets(old);

    // The successor says READY=1 (taking connections), reads the first message on the channel
    // (a batch of connections: its sockets are discarded with it), acknowledges nothing, and
    // exits 3. Deterministic: it dies with connections in flight.
    replace_with_script(
        &deployed,
        &format!("{READY_TAKING_CONNECTIONS}\ndd bs=65536 count=1 <&4 >/dev/null 2>&1\nexit 3"),
    );
    signal(old, Signal::USR1);
    let new = handed_over(&notify, 1, old);
    assert_eq!(
        wait_exit(new, SOON),
        Some(3),
        "the new process {new} read a batch of connections and exited"
    );
    server.lines.wait_for(
        "the connections it had not acknowledged are served here",
        SOON,
    );
    server.lines.wait_for(
        "the new process died while this one drains: serving again",
        SOON,
    );
    // Not acknowledged, so still the old process's: the same sockets, nothing more.
    assert_fd_changes(&before, old, &[]);
    let _ = listener;

    // Served here from now on: a request is answered with `Connection: close`; the idle ones
    // are closed after the grace, as without a successor.
    for (i, c) in idle[..4].iter_mut().enumerate() {
        let a = c
            .get(&format!("kept-{i}"))
            .expect("a request on a kept connection");
        assert_eq!((a.pid, a.close), (old, true), "{a:?}");
    }
    for c in &mut idle {
        c.closed_by_server()
            .expect("a kept connection closed after Connection: close, or the grace");
    }
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    assert_eq!(shutdown_field(&server.lines, old, "cut"), 0);
    assert_none_left([old, new]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Scale.

/// Sends one request (tagged with its index) on each of `conns`, a batch at a time, and
/// returns the answers in order.
fn one_request_each(conns: &mut [Raw], tag: &str) -> Vec<Answer> {
    const BATCH: usize = 200;
    let mut answers = Vec::with_capacity(conns.len());
    for (b, batch) in conns.chunks_mut(BATCH).enumerate() {
        for (i, c) in batch.iter_mut().enumerate() {
            c.write(&req(&format!("{tag}-{}", b * BATCH + i), ""));
        }
        for (i, c) in batch.iter_mut().enumerate() {
            let n = b * BATCH + i;
            answers.push(
                c.answer()
                    .unwrap_or_else(|e| panic!("connection #{n} ({tag}): {e}")),
            );
        }
    }
    answers
}

#[test]
fn ten_thousand_idle_connections_move_in_one_restart_and_stay_usable() {
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
    let (mut server, addr) = ready_hello(&notify);
    let old = server.pid;
    // In batches: connect, request, answer. A batch fits in the listen backlog (128): the
    // connects of a bigger one would overflow it, and those dropped would wait for a SYN
    // retransmission (1 s, then 3 s...).
    const BATCH: usize = 100;
    let mut conns = Vec::with_capacity(N);
    for batch in 0..N.div_ceil(BATCH) {
        let mut opened: Vec<Raw> = (0..BATCH.min(N - batch * BATCH))
            .map(|_| Raw::connect(addr))
            .collect();
        for a in one_request_each(&mut opened, "before") {
            assert_eq!(a.pid, old, "{a:?}");
        }
        conns.append(&mut opened);
    }
    let opened = started.elapsed();

    let signalled = Instant::now();
    signal(old, Signal::USR1);
    let new = handed_over(&notify, 1, old);
    // The old process exits once every connection was passed and acknowledged.
    assert_eq!(
        server.wait(SOON * 4),
        Some(0),
        "old process {old} exit code"
    );
    let moved = signalled.elapsed();
    // None closed by the header-read timeout (30 s idle) before the restart: had opening them
    // taken that long, the first ones would be gone, and the counts below short.
    let closed = server.lines.wait_for(
        &format!("[{old}]  INFO handover::lifecycle: server closed"),
        SOON,
    );
    assert!(closed.contains(" timed_out=0 "), "{closed}");
    assert_eq!(shutdown_field(&server.lines, old, "drained"), N);
    assert_eq!(shutdown_field(&server.lines, old, "passed"), N);
    assert_eq!(shutdown_field(&server.lines, old, "kept"), 0);
    assert_eq!(shutdown_field(&server.lines, old, "cut"), 0);
    let took = server.lines.wait_for(
        &format!("[{new}]  INFO handover::handoff: took over connections"),
        SOON,
    );
    assert!(took.ends_with(&format!("connections={N}")), "{took}");

    // Every one still usable: the same socket, answered by the new process.
    let answers = one_request_each(&mut conns, "after");
    for (n, a) in answers.iter().enumerate() {
        assert_eq!(
            (a.pid, a.tag.as_str(), a.close),
            (new, format!("after-{n}").as_str(), false),
            "connection #{n} after the restart"
        );
    }
    eprintln!(
        "{N} idle connections: opened in {:.1} s; SIGUSR1 -> old process exited, all passed, \
         in {:.2} s; each answered by the new process; test {:.1} s",
        opened.as_secs_f64(),
        moved.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    // The server closes first: the clients' ports are not left in TIME_WAIT, where they would
    // slow down the next run's 10,000 connects.
    stop_server(new);
    for c in &mut conns {
        c.closed_by_server().expect("closed by the server's drain");
    }
    drop(conns);
    assert_none_left([old, new]);
}
