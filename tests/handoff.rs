//! Hitless restarts (issue 11): keep-alive clients that idle between requests and never retry,
//! over a network with latency (a loopback proxy that delays bytes and closes), keep their
//! connections across restarts. Real processes, real signals, a real `NOTIFY_SOCKET`.
//!
//! Until established connections are handed over, the old process closes its idle ones after
//! the restart keep-alive grace, and a client that sends within one round trip of that close
//! loses its request (sent, then EOF): the test is ignored, and measures that loss when run with
//! `--ignored`.

mod support;

// The support's own tests (the proxy, the workload) run here, once, rather than in every test
// crate that shares `support`.
#[path = "support/idle_tests.rs"]
mod idle_tests;
#[path = "support/proxy_tests.rs"]
mod proxy_tests;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Instant;

use rustix::process::Signal;
use support::idle::{IdleClients, IdleConfig, IdleReport};
use support::proxy::Proxy;
use support::*;

const CLIENTS: usize = 60;
const RESTARTS: usize = 6;

/// The hello example on a free loopback port, reporting to `notify`, once it is ready.
fn ready_hello(notify: &NotifySocket) -> (Proc, SocketAddr) {
    let port = free_port();
    let server = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path)
        .start();
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);
    (server, addr)
}

/// Stops the workload and fails with what it saw so far.
fn give_up(load: IdleClients, why: String) -> ! {
    let report = load.stop();
    panic!("{why}\n{}", report.summary());
}

/// What must hold for every client: one connection all along (same client-side port), and
/// answers from each process in turn on it. One line per client that fails it.
fn per_client_problems(report: &IdleReport, pids: &[u32]) -> Vec<String> {
    let mut problems = Vec::new();
    for client in 0..CLIENTS {
        let sent = report.of(client);
        let mut wrong = Vec::new();
        let ports: BTreeSet<u16> = sent.iter().map(|r| r.local_port).collect();
        if ports.len() != 1 {
            wrong.push(format!(
                "{} connections (client-side ports {ports:?}), expected 1",
                ports.len()
            ));
        }
        let mut answered_by: Vec<u32> = sent.iter().filter_map(|r| r.pid()).collect();
        answered_by.dedup();
        if answered_by != pids {
            wrong.push(format!(
                "answered by {answered_by:?}, expected {pids:?} in turn"
            ));
        }
        if !wrong.is_empty() {
            problems.push(format!("client {client}: {}", wrong.join("; ")));
        }
    }
    problems
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
        signal(old, Signal::USR1);
        let handed = notify.wait_nth(i, SOON, |n| n.has("READY=1") && n.text.contains("MAINPID="));
        assert_eq!(
            handed.pid, old,
            "the old main process announces its successor"
        );
        let new = mainpid(&handed);
        assert_ne!(new, old);
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
    let problems = per_client_problems(&report, &pids);
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
