//! The workload's own tests: a tiny HTTP/1.1 server with one behaviour each, behind the proxy,
//! and what the workload must make of it.
//!
//! Included by `tests/handoff.rs` only: in `support/mod.rs` they would run again in every test
//! crate that shares the support.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::support::idle::*;
use crate::support::proxy::Proxy;

const SOON: Duration = Duration::from_secs(10);
const PID: u32 = 42;

#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Answers every request, keeps the connection.
    KeepAlive,
    /// Answers, then closes (FIN) without saying so.
    CloseAfterAnswer,
    /// Answers with `Connection: close`, then closes.
    ConnectionClose,
    /// Reads the request, closes without an answer.
    CloseUnanswered,
}

/// A server on a thread, a thread per connection (each ends with its connection).
struct TinyHttp {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TinyHttp {
    fn start(behaviour: Behaviour) -> TinyHttp {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (Arc::clone(&requests), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let count = Arc::clone(&count);
                conns.push(std::thread::spawn(move || serve(stream, behaviour, &count)));
            }
            for c in conns {
                let _ = c.join();
            }
        });
        TinyHttp {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for TinyHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut stream: TcpStream, behaviour: Behaviour, requests: &AtomicUsize) {
    let _ = stream.set_read_timeout(Some(SOON));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..end);
        requests.fetch_add(1, Ordering::SeqCst);
        let close = match behaviour {
            Behaviour::CloseUnanswered => return,
            Behaviour::ConnectionClose => "connection: close\r\n",
            Behaviour::KeepAlive | Behaviour::CloseAfterAnswer => "",
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\nx-pid: {PID}\r\ncontent-length: 11\r\n{close}\r\nHello world"
        );
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
        if !matches!(behaviour, Behaviour::KeepAlive) {
            return;
        }
    }
}

/// Short idles, so that a test takes a fraction of a second. Pollers send every 150 ms:
/// ten times the proxy's latency, so a close the server made is seen before the next one.
fn quick(clients: usize, pollers: usize, max_requests: usize) -> IdleConfig {
    IdleConfig {
        clients,
        pollers,
        poll_every: Duration::from_millis(150),
        max_idle: Duration::from_millis(100),
        max_requests,
        max_time: SOON,
        request_timeout: Duration::from_secs(5),
        ..IdleConfig::new(clients)
    }
}

fn ports(report: &IdleReport, client: usize) -> BTreeSet<u16> {
    report.of(client).iter().map(|r| r.local_port).collect()
}

#[test]
fn keep_alive_clients_keep_one_connection_each_the_proxy_sees_the_same_ports() {
    let server = TinyHttp::start(Behaviour::KeepAlive);
    let proxy = Proxy::start(server.addr);
    let load = IdleClients::start(proxy.addr(), quick(4, 2, 4));
    load.wait_all_answered_by(PID, SOON).expect("all answered");
    load.wait_finished(SOON).expect("all finished");
    let never = load
        .wait_all_answered_by(7, SOON)
        .expect_err("no pid 7 here");
    assert!(never.contains("4 of 4 clients"), "{never}");
    let report = load.stop();
    let summary = report.summary();
    assert_eq!(report.requests.len(), 16, "{summary}");
    assert!(report.failed().is_empty(), "{summary}");
    assert_eq!(
        (report.opened, report.found_closed, report.told_to_close),
        (4, 0, 0),
        "{summary}"
    );
    assert!(report.requests.iter().all(|r| r.pid() == Some(PID)));
    let mut client_ports = BTreeSet::new();
    for c in 0..4 {
        let p = ports(&report, c);
        assert_eq!(p.len(), 1, "client {c} kept its connection: {p:?}");
        client_ports.extend(p);
    }
    assert_eq!(server.requests(), 16);
    proxy.wait_all_ended(SOON).expect("the clients closed");
    let conns = proxy.connections();
    let proxied: BTreeSet<u16> = conns.iter().map(|c| c.client_port).collect();
    assert_eq!(proxied, client_ports);
    assert!(conns.iter().all(|c| !c.server_closed_first()), "{conns:#?}");
}

#[test]
fn connections_the_server_closed_while_idle_are_counted_and_replaced() {
    let server = TinyHttp::start(Behaviour::CloseAfterAnswer);
    let proxy = Proxy::start(server.addr);
    let load = IdleClients::start(proxy.addr(), quick(3, 3, 3));
    load.wait_finished(SOON).expect("all finished");
    let report = load.stop();
    let summary = report.summary();
    assert_eq!(report.requests.len(), 9, "{summary}");
    assert!(report.failed().is_empty(), "{:#?}", report.failed());
    // Each request after a client's first found its connection closed.
    assert_eq!(
        (report.opened, report.found_closed, report.told_to_close),
        (9, 6, 0),
        "{summary}"
    );
    for c in 0..3 {
        assert_eq!(ports(&report, c).len(), 3, "client {c}: {summary}");
    }
    proxy.wait_all_ended(SOON).expect("all closed");
    let conns = proxy.connections();
    assert_eq!(conns.len(), 9);
    assert!(conns.iter().all(|c| c.server_closed_first()), "{conns:#?}");
}

#[test]
fn a_request_the_server_read_and_dropped_fails_and_is_never_sent_again() {
    let server = TinyHttp::start(Behaviour::CloseUnanswered);
    let proxy = Proxy::start(server.addr);
    let load = IdleClients::start(proxy.addr(), quick(2, 1, 3));
    load.wait_finished(SOON).expect("all finished");
    let report = load.stop();
    let summary = report.summary();
    let failed = report.failed();
    assert_eq!(failed.len(), 6, "{summary}");
    for f in &failed {
        assert!(
            matches!(&f.outcome, Outcome::Failed(why) if why.contains("closed before message completed")),
            "{f:?}"
        );
    }
    // As many requests reached the server as the clients recorded: none was resent.
    assert_eq!(server.requests(), 6, "{summary}");
    assert_eq!(
        (report.opened, report.found_closed, report.told_to_close),
        (6, 0, 0),
        "{summary}"
    );
}

#[test]
fn connection_close_answers_are_counted_apart() {
    let server = TinyHttp::start(Behaviour::ConnectionClose);
    let proxy = Proxy::start(server.addr);
    let load = IdleClients::start(proxy.addr(), quick(2, 1, 3));
    load.wait_finished(SOON).expect("all finished");
    let report = load.stop();
    let summary = report.summary();
    assert_eq!(report.ok(), 6, "{summary}");
    assert!(report.requests.iter().all(|r| matches!(
        r.outcome,
        Outcome::Ok {
            connection_close: true,
            ..
        }
    )));
    assert_eq!(
        (report.opened, report.found_closed, report.told_to_close),
        (6, 0, 6),
        "{summary}"
    );
    assert_eq!(report.closed_by_server(), 6);
}
