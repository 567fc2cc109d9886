//! Hostile clients (issue 17): what a client can do to the connection layer with legal bytes,
//! tried against real processes (the `hello` and `tls` examples), real signals and real
//! sockets on loopback. One test (or a few variants) per point of the issue:
//!
//! 1. a keep-alive client that pipelines a request and the first bytes of a second head in
//!    one write cannot make a drain spin or outlive its deadline (SIGTERM; a restart with
//!    `connection_handoff(false)`; a restart with the client on a TLS listener; a
//!    current-thread runtime);
//! 2. a request body still arriving after an early answer is never parsed as a request
//!    (request smuggling), across a SIGTERM or a restart;
//! 3. HTTP/2 connections that never finish their preface or SETTINGS, or idle with no stream
//!    open, are closed by the timeouts, without a drain;
//! 4. a thousand connections that sent only `P` do not busy the server;
//! 5. after a hand-off whose pass failed, a connection given back gets the keep-alive grace,
//!    not a close at once;
//! 6. connections queued in the listen backlog when the lame duck ends are answered, not
//!    reset (a bound address, and `systemd-socket-activate`).
//!
//! Every wait is bounded: a server that does not exit in time is killed by its pid, checked
//! gone, and the test fails saying so (never a hung test run).

mod support;

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::*;

/// The drain deadline the servers of these tests get.
const DRAIN: Duration = Duration::from_millis(3000);
/// Slack for a shared, loaded machine on top of any deadline the server promises.
const MARGIN: Duration = Duration::from_secs(5);
/// The header-read timeout of the HTTP/2 tests.
const HEADER_READ: Duration = Duration::from_millis(1000);

// ---------------------------------------------------------------------------------------------
// Servers.

/// The hello example (with its `POST /early` route) on a free loopback port with `env`, once it
/// reported `READY=1`.
fn hello(notify: &NotifySocket, env: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let mut spawn = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("HELLO_EARLY_ROUTE", "1")
        .env("HANDOVER_DRAIN_TIMEOUT_MS", DRAIN.as_millis().to_string());
    for (k, v) in env {
        spawn = spawn.env(k, v);
    }
    let server = spawn.start();
    let addr = addr_in(&server.listen_line());
    let ready = notify.wait_line("READY=1", SOON);
    assert_eq!(ready.pid, server.pid);
    (server, addr)
}

/// CPU time (user + system) of `pid`; `None` once it is gone.
fn cpu_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// Time the threads of `pid` were runnable: on a CPU, or waiting in a run queue for one
/// (`/proc/PID/task/*/schedstat`). Unlike CPU time, it does not shrink when other processes
/// crowd the machine: a process that spins is runnable all the time, one that waits almost
/// never. `None` once it is gone.
fn runnable_of(pid: u32) -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue; // a thread that just ended
        };
        let mut fields = stat
            .split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0));
        total += fields.next().unwrap_or(0) + fields.next().unwrap_or(0);
    }
    Some(Duration::from_nanos(total))
}

/// Kills `pid` (it outlived what the test allows) and checks it is gone.
fn kill_and_check_gone(pid: u32) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("pid > 0"),
        Signal::KILL,
    );
    let _ = wait_exit(pid, SOON);
    assert_none_left([pid]);
}

/// Waits for `pid` to exit within `limit` of `since`, sampling its CPU time. Fails (after
/// killing it by its pid and checking it gone) if it spins (over a second or more, more than
/// 8 % of a core, or runnable more than a third of the time: a draining server waits for
/// events, it has nothing to compute) or is still running at the limit. Returns its exit code (reaped).
fn exits_calmly(pid: u32, since: Instant, limit: Duration, what: &str) -> Option<i32> {
    let fd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).expect("pid > 0"),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap_or_else(|e| panic!("pidfd_open({pid}): {e}"));
    // Samples of the last second or so: the test is for a spin at any moment, not on average.
    let mut samples = std::collections::VecDeque::from([(
        Instant::now(),
        cpu_of(pid).unwrap_or_default(),
        runnable_of(pid).unwrap_or_default(),
    )]);
    loop {
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let tick = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 250_000_000,
        };
        if rustix::event::poll(&mut fds, Some(&tick)).unwrap_or(0) > 0 {
            return wait_exit(pid, SOON);
        }
        let (Some(cpu), Some(runnable)) = (cpu_of(pid), runnable_of(pid)) else {
            return wait_exit(pid, SOON);
        };
        samples.push_back((Instant::now(), cpu, runnable));
        while samples.len() > 2 && samples[1].0.elapsed() >= Duration::from_secs(1) {
            samples.pop_front();
        }
        let elapsed = samples[0].0.elapsed();
        let used = cpu.saturating_sub(samples[0].1);
        let ran = runnable.saturating_sub(samples[0].2);
        if elapsed >= Duration::from_secs(1)
            && (used > elapsed / 20 + Duration::from_millis(30) || ran > elapsed / 3)
        {
            kill_and_check_gone(pid);
            panic!(
                "{what}: process {pid} spins: {} ms of CPU ({:.0} % of a core) and {} ms runnable \
                 in {} ms while it should only wait; killed",
                used.as_millis(),
                100.0 * used.as_secs_f64() / elapsed.as_secs_f64(),
                ran.as_millis(),
                elapsed.as_millis(),
            );
        }
        if since.elapsed() > limit {
            kill_and_check_gone(pid);
            panic!(
                "{what}: process {pid} still running {} ms after the signal (allowed: {} ms; it \
                 used {} ms of CPU in the last {} ms); killed",
                since.elapsed().as_millis(),
                limit.as_millis(),
                used.as_millis(),
                elapsed.as_millis()
            );
        }
    }
}

/// Stops `pid` with SIGTERM and waits for it, bounded.
fn stop(pid: u32) {
    signal(pid, Signal::TERM);
    let code = exits_calmly(pid, Instant::now(), DRAIN + MARGIN, "stopping");
    assert_eq!(code, Some(0), "exit code of {pid}");
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1 client: the bytes as the test writes them, the answers as they come.

/// One response, as these tests need it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    pid: u32,
    tag: String,
    close: bool,
}

/// A connection written byte by byte (plain TCP, or TLS over it).
struct Raw<S> {
    stream: S,
    buf: Vec<u8>,
    label: String,
}

impl Raw<TcpStream> {
    fn connect(addr: SocketAddr) -> Raw<TcpStream> {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream.set_read_timeout(Some(SOON)).expect("read timeout");
        let label = format!(
            "connection from port {}",
            stream.local_addr().expect("local address").port()
        );
        Raw {
            stream,
            buf: Vec::new(),
            label,
        }
    }

    fn port(&self) -> u16 {
        self.stream.local_addr().expect("local address").port()
    }
}

impl<S: Read + Write> Raw<S> {
    /// Writes `bytes` in one write (one segment, one TLS record).
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| format!("{}: write: {e}", self.label))
    }

    /// The next complete answer (`Content-Length` bodies, as the examples send). `Err` says
    /// what came instead: EOF, a reset, a timeout.
    fn answer(&mut self) -> Result<Answer, String> {
        loop {
            if let Some(answer) = self.parse()? {
                return Ok(answer);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(format!(
                        "{}: EOF before a complete answer ({} bytes of one received)",
                        self.label,
                        self.buf.len()
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("{}: read: {e}", self.label)),
            }
        }
    }

    /// Every answer until the server closes the connection (a clean EOF or a reset), bounded
    /// by the read timeout; `Err` if it is still open then.
    fn answers_until_closed(&mut self) -> Result<Vec<Answer>, String> {
        let mut out = Vec::new();
        loop {
            while let Some(a) = self.parse()? {
                out.push(a);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(out),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                // A reset, or (TLS) a close without close_notify: closed all the same.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
                    ) =>
                {
                    return Ok(out);
                }
                Err(e) => return Err(format!("{}: read: {e} (after {out:?})", self.label)),
            }
        }
    }

    fn parse(&mut self) -> Result<Option<Answer>, String> {
        let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.strip_prefix("HTTP/1.1 "))
            .and_then(|l| l.get(..3))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("{}: not an HTTP/1.1 answer: {head:?}", self.label))?;
        let mut answer = Answer {
            status,
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
}

/// Whether the server closed `s` (EOF or reset) within `within`; `false` if it is still open
/// then. Bytes the server sends first (HTTP/2 SETTINGS) are read and dropped.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("read timeout");
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true, // a reset
        }
    }
}

/// The server-side socket inodes of the connections to `port` from `client_ports`.
fn server_sides(port: u16, client_ports: &BTreeSet<u16>) -> BTreeSet<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port_of = |addr: &str| {
        addr.split_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote) = (port_of(f.get(1)?)?, port_of(f.get(2)?)?);
            let inode = f.get(9)?;
            (local == port && client_ports.contains(&remote)).then(|| format!("socket:[{inode}]"))
        })
        .collect()
}

/// Waits until process `pid` holds the server side of every connection from `client_ports`
/// (it accepted them). Polled, bounded: there is no event for an accept.
fn wait_accepted(pid: u32, port: u16, client_ports: &BTreeSet<u16>) {
    let deadline = Instant::now() + SOON;
    loop {
        let sides = server_sides(port, client_ports);
        let held: BTreeSet<String> = fds_of(pid).into_iter().map(|(_, t)| t).collect();
        let accepted = sides.iter().filter(|s| held.contains(*s)).count();
        if sides.len() == client_ports.len() && accepted == sides.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} accepted {accepted} of {} connections within {SOON:?}",
            client_ports.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A pipelined request with the first bytes of the next head, then a drain.

/// One request and, in the same write, the start of the next head (legal pipelining).
const PIPELINED: &[u8] = b"GET /?tag=1 HTTP/1.1\r\nHost: a\r\n\r\nGET /?tag=2 HTTP/1.1\r\nHos";

/// Sends [`PIPELINED`] on `c` and checks the first request is answered by `pid`.
fn pipeline_half_a_head<S: Read + Write>(c: &mut Raw<S>, pid: u32) {
    c.write(PIPELINED).expect("write");
    let first = c.answer().expect("the first request's answer");
    assert_eq!((first.status, first.tag.as_str()), (200, "1"), "{first:?}");
    assert_eq!(first.pid, pid, "{first:?}");
}

/// The old process, with a half-received head on a connection, must exit within its drain
/// deadline without spinning; the client's connection then ends (cut at the deadline, or
/// closed by the header-read timeout), without an answer it did not ask for.
fn half_head_must_not_hold(old: u32, signalled: Instant, what: &str) {
    let code = exits_calmly(old, signalled, DRAIN + MARGIN, what);
    assert_eq!(code, Some(0), "{what}: exit code of {old}");
}

#[test]
fn a_half_received_pipelined_head_does_not_hold_a_sigterm_drain() {
    let notify = NotifySocket::new();
    let (server, addr) = hello(&notify, &[]);
    let mut c = Raw::connect(addr);
    pipeline_half_a_head(&mut c, server.pid);
    let signalled = Instant::now();
    server.signal(Signal::TERM);
    half_head_must_not_hold(server.pid, signalled, "SIGTERM");
    let rest = c.answers_until_closed().expect("closed by the server");
    assert!(rest.is_empty(), "no answer to half a head: {rest:?}");
    assert_none_left([server.pid]);
}

#[test]
fn a_half_received_pipelined_head_does_not_hold_a_restart_without_connection_hand_off() {
    let notify = NotifySocket::new();
    let (server, addr) = hello(&notify, &[("HANDOVER_CONNECTION_HANDOFF", "0")]);
    let old = server.pid;
    let mut c = Raw::connect(addr);
    pipeline_half_a_head(&mut c, old);
    let signalled = Instant::now();
    let new = restart_once(&notify, old, 1);
    // The restart keep-alive grace (1 s) comes on top of the drain's deadline.
    half_head_must_not_hold(
        old,
        signalled,
        "restart with connection_handoff(false), old process",
    );
    let rest = c.answers_until_closed().expect("closed by the old process");
    assert!(rest.is_empty(), "no answer to half a head: {rest:?}");
    assert_eq!(get(addr, "/").expect("the new process serves").pid, new);
    stop(new);
    assert_none_left([old, new]);
}

#[test]
fn a_half_received_pipelined_head_does_not_hold_a_current_thread_runtime() {
    let notify = NotifySocket::new();
    let (server, addr) = hello(&notify, &[("HANDOVER_CURRENT_THREAD", "1")]);
    let mut c = Raw::connect(addr);
    pipeline_half_a_head(&mut c, server.pid);
    let signalled = Instant::now();
    server.signal(Signal::TERM);
    half_head_must_not_hold(server.pid, signalled, "SIGTERM, current-thread runtime");
    let rest = c.answers_until_closed().expect("closed by the server");
    assert!(rest.is_empty(), "no answer to half a head: {rest:?}");
    assert_none_left([server.pid]);
}

#[cfg(feature = "rustls")]
mod tls {
    use super::*;
    use std::sync::Arc;
    use tokio_rustls::rustls::{self, ClientConfig, pki_types::ServerName};

    /// A CA, and a certificate it signed for `localhost`, as PEM files in `dir`; returns the
    /// CA certificate (DER) and the paths of the certificate and key.
    fn certificates(
        dir: &std::path::Path,
    ) -> (
        rustls::pki_types::CertificateDer<'static>,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(
            params,
            rcgen::KeyPair::generate().expect("CA key"),
        )
        .expect("CA certificate");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".into()]).expect("leaf params");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &ca).expect("leaf certificate");
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (ca.der().clone(), cert_path, key_path)
    }

    type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

    fn connect(addr: SocketAddr, ca: &rustls::pki_types::CertificateDer<'static>) -> Raw<Tls> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).expect("trust the test CA");
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        tcp.set_read_timeout(Some(SOON)).expect("read timeout");
        let label = format!(
            "TLS connection from port {}",
            tcp.local_addr().expect("local").port()
        );
        let name = ServerName::try_from("localhost").expect("server name");
        let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
        Raw {
            stream: rustls::StreamOwned::new(conn, tcp),
            buf: Vec::new(),
            label,
        }
    }

    #[test]
    fn a_half_received_pipelined_head_over_tls_does_not_hold_a_restart() {
        let dir = scratch_dir("hostile-tls");
        let (ca, cert, key) = certificates(&dir);
        let notify = NotifySocket::new();
        let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let server = Spawn::new(example("tls"))
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--web")
            .arg(web.to_string())
            .arg("--health")
            .arg(format!("127.0.0.1:{}", free_port()))
            .env("NOTIFY_SOCKET", &notify.path)
            .env("HANDOVER_DRAIN_TIMEOUT_MS", DRAIN.as_millis().to_string())
            .start();
        let old = server.pid;
        assert_eq!(notify.wait_line("READY=1", SOON).pid, old);
        let mut c = connect(web, &ca);
        pipeline_half_a_head(&mut c, old);
        let signalled = Instant::now();
        let new = restart_once(&notify, old, 1);
        half_head_must_not_hold(old, signalled, "restart, client on a TLS listener");
        let rest = c.answers_until_closed().expect("closed by the old process");
        assert!(rest.is_empty(), "no answer to half a head: {rest:?}");
        stop(new);
        assert_none_left([old, new]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Request smuggling: a body still arriving after an early answer.

/// `POST /early` whose handler answers 202 at once and reads the body 1.5 s later; the body is
/// sent in two parts, the second (after the 202, and after `trigger`) looking like a request;
/// then a real request. The next answer after the 202 must be the real request's, never one
/// to the body's bytes.
fn early_answer_then(trigger: impl FnOnce(&NotifySocket, u32) -> Vec<u32>) {
    let notify = NotifySocket::new();
    let (server, addr) = hello(&notify, &[]);
    let old = server.pid;
    let part1: &[u8] = b"0123456789abcdef";
    let part2: &[u8] = b"GET /?tag=smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let head = format!(
        "POST /early?tag=early&read_after_ms=1500 HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        part1.len() + part2.len()
    );
    let mut c = Raw::connect(addr);
    c.write(&[head.as_bytes(), part1].concat()).expect("write");
    let early = c.answer().expect("the early answer");
    assert_eq!((early.status, early.tag.as_str()), (202, "early"));
    assert_eq!(early.pid, old);

    let pids = trigger(&notify, old);
    c.write(&[part2, b"GET /?tag=after HTTP/1.1\r\nHost: a\r\n\r\n"].concat())
        .expect("the rest of the body, and the next request");
    let mut answers = Vec::new();
    let outcome = loop {
        match c.answer() {
            Ok(a) if a.tag == "after" => {
                answers.push(a);
                break Ok(());
            }
            Ok(a) => answers.push(a),
            Err(e) => break Err(e),
        }
    };
    assert!(
        !answers.iter().any(|a| a.tag == "smuggled"),
        "bytes of a request body were parsed and answered as a request (request smuggling): \
         {answers:?}"
    );
    outcome.unwrap_or_else(|e| panic!("the request after the body: {e} (answers: {answers:?})"));
    assert_eq!(answers.len(), 1, "{answers:?}");
    drop(c);
    for pid in pids.iter().rev() {
        if *pid == old {
            // Already shutting down (the SIGTERM, or handed over): it ends by itself. Another
            // SIGTERM could arrive after serving ended, when the signal has its default action
            // again, and kill it.
            let code = exits_calmly(old, Instant::now(), DRAIN + MARGIN, "draining");
            assert_eq!(code, Some(0), "exit code of {old}");
        } else if alive(*pid) {
            stop(*pid);
        }
    }
    assert_none_left(pids);
}

#[test]
fn a_request_body_still_arriving_at_a_sigterm_is_never_parsed_as_a_request() {
    early_answer_then(|_, old| {
        signal(old, Signal::TERM);
        vec![old]
    });
}

#[test]
fn a_request_body_still_arriving_at_a_restart_is_never_parsed_as_a_request() {
    early_answer_then(|notify, old| vec![old, restart_once(notify, old, 1)]);
}

// ---------------------------------------------------------------------------------------------
// 3. HTTP/2 connections that never start, or idle.

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection that sent `bytes` and nothing more must be closed by the server within the
/// header-read timeout + margin, the server serving on (no drain).
fn h2_start_is_timed_out(bytes: &[u8]) {
    let notify = NotifySocket::new();
    let timeout = HEADER_READ.as_millis().to_string();
    let (server, addr) = hello(&notify, &[("HANDOVER_HEADER_READ_TIMEOUT_MS", &timeout)]);
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(bytes).expect("write");
    let start = Instant::now();
    let closed = closed_within(&mut s, HEADER_READ + MARGIN);
    assert!(
        closed,
        "a connection that sent {:?} was still open {} ms later (header-read timeout {} ms)",
        String::from_utf8_lossy(bytes),
        start.elapsed().as_millis(),
        HEADER_READ.as_millis()
    );
    assert!(alive(server.pid), "closed by a timeout, not by a shutdown");
    assert_eq!(get(addr, "/").expect("still serving").pid, server.pid);
    stop(server.pid);
    assert_none_left([server.pid]);
}

#[test]
fn an_http2_connection_that_sent_only_pri_is_closed_by_the_header_read_timeout() {
    h2_start_is_timed_out(b"PRI");
}

#[test]
fn an_http2_preface_without_settings_is_closed_by_the_header_read_timeout() {
    h2_start_is_timed_out(H2_PREFACE);
}

/// The idle timeout of HTTP/2 connections is taken to be the header-read timeout, the bound
/// an idle HTTP/1 keep-alive connection has (README: "idle keep-alive connections close after
/// it").
#[test]
fn an_idle_http2_connection_is_closed_by_the_idle_timeout() {
    let notify = NotifySocket::new();
    let timeout = HEADER_READ.as_millis().to_string();
    let (server, addr) = hello(&notify, &[("HANDOVER_HEADER_READ_TIMEOUT_MS", &timeout)]);
    let pid = server.pid;
    let outcome: Result<Duration, String> = runtime().block_on(async move {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .map_err(|e| format!("handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get(format!("http://{addr}/"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if resp.status() != 200 {
            return Err(format!("status {}", resp.status()));
        }
        drop(resp);
        // Idle from now on: no stream open.
        let idle = Instant::now();
        match tokio::time::timeout(HEADER_READ + MARGIN, conn).await {
            Ok(_) => Ok(idle.elapsed()),
            Err(_) => Err(format!(
                "an idle HTTP/2 connection (no stream open) was still open {} ms later \
                 (header-read timeout {} ms)",
                idle.elapsed().as_millis(),
                HEADER_READ.as_millis()
            )),
        }
    });
    let took = outcome.unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "idle HTTP/2 connection closed after {} ms",
        took.as_millis()
    );
    assert!(alive(pid), "closed by a timeout, not by a shutdown");
    stop(pid);
    assert_none_left([pid]);
}

// ---------------------------------------------------------------------------------------------
// 4. Busy polling.

#[test]
fn a_thousand_connections_that_sent_only_p_do_not_busy_the_server() {
    const N: usize = 1000;
    let limit = raise_nofile(N as u64 + 1024);
    assert!(
        limit >= N as u64 + 256,
        "{N} connections need RLIMIT_NOFILE {}, and it could only be raised to {limit}",
        N + 256
    );
    let notify = NotifySocket::new();
    let (server, addr) = hello(&notify, &[]);
    let mut conns = Vec::with_capacity(N);
    let mut ports = BTreeSet::new();
    // In batches that fit the listen backlog.
    for _ in 0..N / 100 {
        for _ in 0..100 {
            let mut c = Raw::connect(addr);
            c.write(b"P").expect("write P");
            ports.insert(c.port());
            conns.push(c);
        }
        wait_accepted(server.pid, addr.port(), &ports);
    }
    let window = Duration::from_secs(3);
    let before = cpu_of(server.pid).expect("server running");
    let measured = Instant::now();
    // A measurement window: the server is to do nothing in it, and there is no event for
    // "nothing happened".
    std::thread::sleep(window);
    let used = cpu_of(server.pid).expect("server running") - before;
    let elapsed = measured.elapsed();
    // And everyone else is still served.
    let served = Instant::now();
    assert_eq!(get(addr, "/").expect("served").pid, server.pid);
    let latency = served.elapsed();
    eprintln!(
        "{N} connections that sent `P`: the server used {} ms of CPU in {} ms; a request took {} ms",
        used.as_millis(),
        elapsed.as_millis(),
        latency.as_millis()
    );
    assert!(
        used < elapsed / 10,
        "{N} connections that sent only `P` busy the server: {} ms of CPU in {} ms ({:.0} % of a \
         core; allowed < 10 %)",
        used.as_millis(),
        elapsed.as_millis(),
        100.0 * used.as_secs_f64() / elapsed.as_secs_f64()
    );
    drop(conns);
    stop(server.pid);
    assert_none_left([server.pid]);
}

// ---------------------------------------------------------------------------------------------
// 5. A failed pass: connections given back keep their grace.

/// A successor that says it is ready and takes connections (on the channel a handover parent
/// gives it, fd 4 for hello's one listener), reads the first batch of connections (discarding
/// its sockets), acknowledges nothing, and exits 3: it dies while connections are passed.
const DIES_WHILE_PASSED: &str = r#"[ "$HANDOVER_CHANNEL_FD" = 4 ] || { echo "expected HANDOVER_CHANNEL_FD=4, got '$HANDOVER_CHANNEL_FD'" >&2; exit 9; }
printf 'READY=1\nX_HANDOVER_CONNECTIONS=1\n' >&4
dd bs=65536 count=1 <&4 >/dev/null 2>&1
exit 3"#;

#[test]
fn fresh_connections_given_back_after_a_failed_pass_get_the_keep_alive_grace() {
    let dir = scratch_dir("hostile-failed-pass");
    let deployed = deploy_copy("hello", &dir);
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_server(&deployed, &notify);
    let old = server.pid;
    // Fresh connections: accepted, nothing sent yet (a client that connected a moment before
    // the restart, its request about to leave).
    let mut fresh: Vec<Raw<TcpStream>> = (0..4).map(|_| Raw::connect(addr)).collect();
    let ports: BTreeSet<u16> = fresh.iter().map(Raw::port).collect();
    wait_accepted(old, addr.port(), &ports);

    replace_with_script(&deployed, DIES_WHILE_PASSED);
    signal(old, Signal::USR1);
    let handed = notify.wait_nth(1, SOON, |n| n.has("READY=1") && n.text.contains("MAINPID="));
    let new = mainpid(&handed);
    assert_eq!(
        wait_exit(new, SOON),
        Some(3),
        "the new process {new} read a batch of connections and exited"
    );
    // The channel closed unacknowledged: every connection of the batch is given back.
    server.lines.wait_for("connection hand-off finished", SOON);
    // Given back, the old process serves them until they close: a request sent now, within
    // the restart keep-alive grace (1 s), is answered (with `Connection: close`).
    let mut failures = Vec::new();
    for (i, c) in fresh.iter_mut().enumerate() {
        let tag = format!("fresh-{i}");
        let got = c
            .write(format!("GET /?tag={tag} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .and_then(|()| c.answer());
        match got {
            Ok(a) if (a.status, a.pid, a.tag.as_str(), a.close) == (200, old, &tag, true) => {}
            Ok(a) => failures.push(format!("{tag}: unexpected answer {a:?}")),
            Err(e) => failures.push(format!("{tag}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "fresh connections given back after a failed pass were closed without the keep-alive \
         grace: {failures:#?}"
    );
    // The successor died after its READY=1, so the old process serves again (issue 18): it
    // ends at a close signal, in order.
    signal(old, Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    assert_none_left([old, new]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 6. The end of the lame duck: queued connections are answered, not reset.

/// What the probes saw.
#[derive(Debug, Default)]
struct Probes {
    answered: usize,
    refused: usize,
    /// Connected and sent a request, and got no complete answer: what must never happen.
    failed: Vec<String>,
}

/// Probe clients from `threads` threads, each in a loop until its connection is refused (or
/// `until`): connect, send a whole request with `Connection: close`, and go on to the next
/// without waiting (open loop: as many connections as possible arrive around the moment the
/// listener closes); the answers are read once every thread is done.
fn probe_until_refused(addr: SocketAddr, threads: usize, until: Instant) -> Probes {
    /// Connections per thread, at most: a bound on the fds and the work of one test.
    const MAX_PER_THREAD: usize = 20_000;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut seen = Probes::default();
                let mut sent = Vec::new();
                for i in 0..MAX_PER_THREAD {
                    if Instant::now() > until {
                        break;
                    }
                    let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(s) => s,
                        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                            seen.refused += 1;
                            break;
                        }
                        Err(_) => continue, // not connected: nothing was sent
                    };
                    s.set_read_timeout(Some(SOON)).expect("read timeout");
                    let label = format!(
                        "probe {t}.{i} from port {}",
                        s.local_addr().map(|a| a.port()).unwrap_or(0)
                    );
                    let mut c = Raw {
                        stream: s,
                        buf: Vec::new(),
                        label,
                    };
                    match c
                        .write(b"GET /?tag=probe HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    {
                        Ok(()) => sent.push(c),
                        Err(e) => seen.failed.push(e),
                    }
                    // Keep the fds bounded: the oldest are answered by now, most likely.
                    if sent.len() >= 64 {
                        for mut c in sent.drain(..32) {
                            seen.read_answer(&mut c);
                        }
                    }
                }
                for mut c in sent {
                    seen.read_answer(&mut c);
                }
                seen
            })
        })
        .collect();
    let mut all = Probes::default();
    for h in handles {
        let p = h.join().expect("probe thread");
        all.answered += p.answered;
        all.refused += p.refused;
        all.failed.extend(p.failed);
    }
    all
}

impl Probes {
    fn read_answer(&mut self, c: &mut Raw<TcpStream>) {
        match c.answer() {
            Ok(a) if a.status == 200 && a.tag == "probe" => self.answered += 1,
            Ok(a) => self.failed.push(format!("{}: {a:?}", c.label)),
            Err(e) => self.failed.push(e),
        }
    }
}

/// SIGTERM to `pid` (serving `addr`, with a lame duck of `delay`), then probes from a little
/// before the lame duck ends until the listener refuses: every probe that connected is
/// answered.
fn lame_duck_end_loses_no_queued_client(pid: u32, addr: SocketAddr, notify: &NotifySocket) {
    let delay = Duration::from_millis(LAME_DUCK_MS);
    signal(pid, Signal::TERM);
    let stopping = notify.wait_line("STOPPING=1", SOON);
    assert_eq!(stopping.pid, pid);
    let ends = Instant::now() + delay;
    std::thread::sleep(delay.saturating_sub(Duration::from_millis(300)));
    let probes = probe_until_refused(addr, 6, ends + SOON);
    eprintln!(
        "probes around the end of the lame duck: {} answered, {} refused, {} failed",
        probes.answered,
        probes.refused,
        probes.failed.len()
    );
    assert!(
        probes.failed.is_empty(),
        "clients that connected and sent a request when the lame duck ended got no answer \
         ({} of {}): {:#?}",
        probes.failed.len(),
        probes.failed.len() + probes.answered,
        probes.failed
    );
    assert!(probes.answered > 0, "{probes:?}");
    assert!(probes.refused > 0, "the listener closed: {probes:?}");
    assert_eq!(
        exits_calmly(pid, Instant::now(), DRAIN + MARGIN, "after the lame duck"),
        Some(0)
    );
}

/// The service is stopped right after a restart, while the old process still drains a slow
/// request: the new process stops for good and closes its copy of the listener, and the old
/// one holds the last copy, accepting no more. A client that connects then must not be left
/// queued on a copy nobody accepts from (it would send its request and be reset when the old
/// process exits). The old process learns at once that its successor ended in order (its
/// pidfd, and its exit status 0, read from the pidfd even after the test reaped it), and
/// closes the listener as a stopping server does: what is queued is answered, and the door is
/// shut first (the socket is the service's alone: the old process bound it), so a client that
/// connects afterwards is kept out (its SYN dropped, its connect unanswered), then refused.
#[test]
fn a_client_arriving_after_the_last_accepting_process_stopped_is_answered_or_kept_out_not_reset() {
    let notify = NotifySocket::new();
    let (server, addr) = hello(&notify, &[("HANDOVER_DRAIN_TIMEOUT_MS", "30000")]);
    let old = server.pid;
    let mut slow = Raw::connect(addr);
    slow.write(b"GET /?tag=slow&sleep_ms=4000 HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("the slow request");
    server.lines.wait_for("slow request: sleeping", SOON);
    let new = restart_once(&notify, old, 1);
    signal(new, Signal::TERM);
    // Meanwhile, clients: each is answered (by the old process, which accepts what was queued
    // on its copy before it closed it) or kept out; none is reset.
    let early = probe_until_refused(addr, 2, Instant::now() + Duration::from_millis(300));
    assert!(early.failed.is_empty(), "{:#?}", early.failed);
    assert_eq!(wait_exit(new, SOON), Some(0), "the new process stopped");
    server.lines.wait_for(
        "the new process ended in order while this one drains: not serving again; closed this process's copies of the listeners",
        SOON,
    );
    assert!(
        std::fs::metadata(format!("/proc/{old}")).is_ok(),
        "the old process still drains its slow request"
    );
    // Kept out by the door while the old process takes its last handshakes, then refused.
    match TcpStream::connect_timeout(&addr, Duration::from_millis(700)) {
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::ConnectionRefused) => {}
        Err(e) => panic!("expected the connect to be kept out or refused, got {e}"),
        Ok(s) => panic!(
            "a client got into a listener nobody accepts from (port {}); it would be reset",
            s.local_addr().map(|a| a.port()).unwrap_or(0)
        ),
    }
    let a = slow
        .answer()
        .expect("the slow request, answered by the old process");
    assert_eq!(
        (a.status, a.pid, a.tag.as_str()),
        (200, old, "slow"),
        "{a:?}"
    );
    drop(slow);
    assert_eq!(
        exits_calmly(old, Instant::now(), MARGIN, "after its drain"),
        Some(0)
    );
    // Nobody holds the socket any more: refused at once.
    let refused = TcpStream::connect_timeout(&addr, SOON).map(|_| ());
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused)
    );
    assert_none_left([old, new]);
}

/// The new process stops for good while the old one still drains (its slow request outlasts
/// it, and the new one's own slow request keeps it alive longer still): the new process
/// closes its copies without a door (the old one holds the socket too, and might be serving
/// on it), so clients that connect now queue on the old process's copy, which nobody accepts
/// from. When the old process's drain is over it holds the last copies: it must answer them
/// before it exits, not reset them by exiting.
#[test]
fn an_old_process_that_outlives_its_stopped_successor_answers_the_clients_queued_on_its_copy() {
    let notify = NotifySocket::new();
    let (server, addr) = hello(&notify, &[("HANDOVER_DRAIN_TIMEOUT_MS", "30000")]);
    let old = server.pid;
    let mut slow_old = Raw::connect(addr);
    slow_old
        .write(b"GET /?tag=slow-old&sleep_ms=2500 HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("the old process's slow request");
    server.lines.wait_for("slow request: sleeping", SOON);
    let new = restart_once(&notify, old, 1);
    server.lines.wait_for(
        &format!("[{old}]  INFO handover::lifecycle: stopped accepting"),
        SOON,
    );
    let mut slow_new = Raw::connect(addr);
    slow_new
        .write(b"GET /?tag=slow-new&sleep_ms=6000 HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("the new process's slow request");
    server.lines.wait_for(
        &format!("[{new}]  INFO hello::common: slow request: sleeping"),
        SOON,
    );
    signal(new, Signal::TERM);
    server.lines.wait_for(
        &format!("[{new}]  INFO handover::lifecycle: stopped accepting"),
        SOON,
    );
    // Only the old process's copy is left, and it does not accept: these queue on it.
    let queued: Vec<Raw<TcpStream>> = (0..4)
        .map(|i| {
            let mut c = Raw::connect(addr);
            c.write(
                format!("GET /?tag=queued-{i} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .expect("a queued request");
            c
        })
        .collect();
    let a = slow_old.answer().expect("the old process's slow request");
    assert_eq!((a.status, a.pid), (200, old), "{a:?}");
    drop(slow_old);
    for (i, mut c) in queued.into_iter().enumerate() {
        let a = c
            .answer()
            .unwrap_or_else(|e| panic!("queued client {i}, on the old process's last copy: {e}"));
        assert_eq!(
            (a.status, a.pid, a.tag.as_str()),
            (200, old, format!("queued-{i}").as_str()),
            "{a:?}"
        );
    }
    assert_eq!(
        exits_calmly(old, Instant::now(), MARGIN, "after its drain"),
        Some(0)
    );
    let b = slow_new.answer().expect("the new process's slow request");
    assert_eq!((b.status, b.pid), (200, new), "{b:?}");
    drop(slow_new);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([old, new]);
}

const LAME_DUCK_MS: u64 = 1500;

#[test]
fn connections_queued_when_the_lame_duck_ends_are_answered_on_a_bound_address() {
    let notify = NotifySocket::new();
    let delay = LAME_DUCK_MS.to_string();
    let (server, addr) = hello(&notify, &[("HANDOVER_SHUTDOWN_DELAY_MS", &delay)]);
    lame_duck_end_loses_no_queued_client(server.pid, addr, &notify);
    assert_none_left([server.pid]);
}

#[test]
fn connections_queued_when_the_lame_duck_ends_are_answered_under_systemd_socket_activate() {
    let notify = NotifySocket::new();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let delay = format!("HANDOVER_SHUTDOWN_DELAY_MS={LAME_DUCK_MS}");
    let drain = format!("HANDOVER_DRAIN_TIMEOUT_MS={}", DRAIN.as_millis());
    let activator = socket_activate(
        addr.to_string(),
        None,
        &notify,
        &[&delay, &drain],
        "hello",
        &addr.to_string(),
    );
    // systemd-socket-activate starts the server (in its own process) at the first connection.
    let first = get(addr, "/").expect("the first connection starts the server");
    assert_eq!(first.pid, activator.pid);
    notify.wait_line("READY=1", SOON);
    lame_duck_end_loses_no_queued_client(activator.pid, addr, &notify);
    assert_none_left([activator.pid]);
}
