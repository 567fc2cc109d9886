//! Faults: hooks that panic or hang, signals at awkward moments, running out of fds.
//! Each leaves the server serving, or shuts it down cleanly within its bound.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::*;

fn faults(port: u16, hooks: &str) -> Spawn {
    Spawn::new(example("faults"))
        .arg(format!("127.0.0.1:{port}"))
        .env("HOOKS", hooks)
}

fn position(lines: &Lines, needle: &str) -> usize {
    lines.wait_for(needle, SOON);
    lines
        .position(needle)
        .unwrap_or_else(|| panic!("no {needle:?} in {:#?}", lines.all()))
}

#[test]
fn hooks_run_in_order_and_a_panicking_hook_does_not_stop_the_others() {
    let port = free_port();
    let mut server = faults(port, "ok,panic,async-ok,async-panic,ok").start();
    server.lines.wait_for("accepting", SOON);
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    let lines = &server.lines;
    let order = [
        position(lines, "hook 1 (ok) done"),
        position(lines, "shutdown hook panicked; running the next one hook=2"),
        position(lines, "hook 3 (async-ok) done"),
        position(lines, "shutdown hook panicked; running the next one hook=4"),
        position(lines, "hook 5 (ok) done"),
        position(lines, "server closed"),
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "{order:?}: {:#?}",
        lines.all()
    );
    let closed = lines.wait_for("reason: Signal(15)", SOON);
    assert!(
        closed.contains("completed: 3, panicked: 2, abandoned: 0, skipped: 0"),
        "{closed}"
    );
}

#[test]
fn a_hanging_hook_is_abandoned_at_the_deadline() {
    for hang in ["hang", "async-hang"] {
        let port = free_port();
        let mut server = faults(port, &format!("ok,{hang},ok"))
            .env("HANDOVER_DRAIN_TIMEOUT_MS", "1000")
            .start();
        server.lines.wait_for("accepting", SOON);
        let sent = Instant::now();
        server.signal(Signal::TERM);
        assert_eq!(server.wait(SOON), Some(0), "{hang}");
        let took = sent.elapsed();
        assert!(
            took < Duration::from_secs(4),
            "{hang}: took {took:?} with a 1 s deadline"
        );
        server.lines.wait_for("abandoned", SOON);
        server.lines.wait_for("reason: Signal(15)", SOON); // the last line: all are in
        assert!(
            server.lines.position("hook 3").is_none(),
            "hook 3 must be skipped"
        );
        let closed = server.lines.wait_for("reason: Signal(15)", SOON);
        assert!(
            closed.contains("completed: 1, panicked: 0, abandoned: 1, skipped: 1"),
            "{hang}: {closed}"
        );
        assert_none_left([server.pid]);
    }
}

#[test]
fn a_second_close_signal_during_the_drain_cuts_at_once() {
    let port = free_port();
    let mut server = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .start();
    let addr = addr_in(&server.listen_line());
    let slow = get_in_background(addr, "/?sleep_ms=20000", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    server.signal(Signal::TERM);
    server.lines.wait_for("stopped accepting", SOON);
    let second = Instant::now();
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    let took = second.elapsed();
    assert!(took < Duration::from_secs(2), "forced exit took {took:?}");
    assert!(
        slow.join().expect("client").is_err(),
        "the cut request fails"
    );
    server
        .lines
        .wait_for("second close signal: cutting all connections now", SOON);
    let closed = server.lines.wait_for("reason: Signal(15)", SOON);
    assert!(
        closed.contains("cut: 1") && closed.contains("forced: true"),
        "{closed}"
    );
    assert_none_left([server.pid]);
}

#[test]
fn a_second_close_signal_during_the_hooks_abandons_them() {
    let port = free_port();
    let mut server = faults(port, "sleep:20000,ok").start();
    server.lines.wait_for("accepting", SOON);
    server.signal(Signal::TERM);
    server.lines.wait_for("hook 1 (sleep) sleeping", SOON);
    let second = Instant::now();
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "{:?}",
        second.elapsed()
    );
    let closed = server.lines.wait_for("reason: Signal(15)", SOON);
    assert!(
        closed.contains("abandoned: 1, skipped: 1") && closed.contains("forced: true"),
        "{closed}"
    );
    assert_none_left([server.pid]);
}

#[test]
fn restart_signals_during_shutdown_are_ignored() {
    let port = free_port();
    let mut server = faults(port, "sleep:500").start();
    server.lines.wait_for("accepting", SOON);
    server.signal(Signal::TERM);
    server.lines.wait_for("hook 1 (sleep) sleeping", SOON);
    server.signal(Signal::USR1);
    server.signal(Signal::USR2);
    assert_eq!(server.wait(SOON), Some(0));
    server
        .lines
        .wait_for("restart signal ignored: shutting down", SOON);
    assert!(server.lines.position("restart: starting").is_none());
    assert_none_left([server.pid]);
}

#[test]
fn running_out_of_fds_backs_off_without_spinning_and_recovers() {
    let port = free_port();
    let mut server = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .nofile(48)
        .start();
    let addr: SocketAddr = addr_in(&server.listen_line());
    server.lines.wait_for("accepting", SOON);
    // Hold more connections than the server has fds for.
    let held: Vec<_> = (0..80).map(|_| raw_connect(addr, b"")).collect();
    server.lines.wait_for("accept failed; backing off", SOON);
    let cpu_before = cpu_time(server.pid);
    std::thread::sleep(Duration::from_secs(1)); // time is the point: is it spinning meanwhile?
    let spent = cpu_time(server.pid) - cpu_before;
    assert!(
        spent < Duration::from_millis(300),
        "{spent:?} of CPU in 1 s while out of fds"
    );
    drop(held);
    let reply = get(addr, "/").expect("serves again once fds are free");
    assert_eq!(reply.status, 200);
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
}

#[test]
fn an_upgraded_connection_is_drained_and_cut_at_the_deadline() {
    use std::io::{Read, Write};
    let port = free_port();
    let mut server = faults(port, "")
        .env("HANDOVER_DRAIN_TIMEOUT_MS", "1000")
        .start();
    let addr = addr_in(&server.listen_line());
    server.lines.wait_for("accepting", SOON);
    let mut ws = raw_connect(
        addr,
        b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
    );
    ws.set_read_timeout(Some(SOON)).expect("timeout");
    let mut head = [0u8; 512];
    let n = ws.read(&mut head).expect("101 response");
    let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    server.lines.wait_for("upgraded: echoing", SOON);
    ws.write_all(b"ping").expect("write");
    let mut echo = [0u8; 4];
    ws.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"ping");

    let sent = Instant::now();
    server.signal(Signal::TERM);
    // The upgraded connection keeps the drain waiting (it is a live connection) until the
    // deadline, then it is cut: the client sees the end of the stream.
    let mut rest = Vec::new();
    let _ = ws.read_to_end(&mut rest);
    let cut_after = sent.elapsed();
    assert!(
        cut_after >= Duration::from_millis(900),
        "cut after {cut_after:?}, before the deadline"
    );
    assert_eq!(server.wait(SOON), Some(0));
    assert!(sent.elapsed() < Duration::from_secs(4));
    let closed = server.lines.wait_for("reason: Signal(15)", SOON);
    assert!(
        closed.contains("drained: 1,") && closed.contains("cut: 1,"),
        "{closed}"
    );
    assert_none_left([server.pid]);
}

/// Programs the application starts do not see the service-manager protocol variables, neither
/// in a process started by systemd-socket-activate nor in one started by a restart.
#[test]
fn programs_the_server_starts_do_not_inherit_the_protocol_variables() {
    let notify = NotifySocket::new();
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut activator = socket_activate(
        addr.to_string(),
        Some("web"),
        &notify,
        &["WATCHDOG_USEC=30000000"],
        "faults",
        &addr.to_string(),
    );
    let check = |env: &str, who: &str| {
        for var in [
            "LISTEN_FDS=",
            "LISTEN_PID=",
            "LISTEN_FDNAMES=",
            "NOTIFY_SOCKET=",
            "HANDOVER_NOTIFY_SOCKET=",
            "HANDOVER_CHANNEL_FD=",
            "WATCHDOG_USEC=",
            "WATCHDOG_PID=",
        ] {
            assert!(
                !env.lines().any(|l| l.starts_with(var)),
                "{who}: a subprocess sees {var}:\n{env}"
            );
        }
        assert!(env.contains("PATH="), "{who}: {env}");
    };
    let env = get(addr, "/env").expect("first process").body;
    check(&env, "the process systemd-socket-activate started");
    notify.wait_line("READY=1", SOON);

    activator.signal(Signal::USR1);
    let handed = notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID="));
    let new: u32 = handed.lines()[0]["MAINPID=".len()..].parse().expect("pid");
    assert_eq!(activator.wait(SOON), Some(0));
    let env = get(addr, "/env").expect("restarted process").body;
    check(&env, "the restarted process");
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([activator.pid, new]);
}

/// A client that sends its request and then closes its sending side (a half-close, as
/// `curl`-like tools and some proxies do) still gets its response, also while draining.
#[test]
fn half_closed_clients_get_their_response_during_the_drain() {
    use std::io::Read;
    let port = free_port();
    let mut server = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .start();
    let addr = addr_in(&server.listen_line());
    server.lines.wait_for("accepting", SOON);
    let mut client = raw_connect(addr, b"GET /?sleep_ms=700 HTTP/1.1\r\nHost: x\r\n\r\n");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    server.lines.wait_for("slow request: sleeping", SOON);
    server.signal(Signal::TERM);
    client.set_read_timeout(Some(SOON)).expect("timeout");
    let mut response = String::new();
    let _ = client.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");
    assert!(response.ends_with("Hello world"), "{response:?}");
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
}

/// The listening socket shut down under the server (through another process's copy of it):
/// no busy loop; the server drains what it has and exits non-zero, so that its supervisor
/// restarts it.
#[test]
fn a_listener_shut_down_under_the_server_ends_it_cleanly() {
    let port = free_port();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let ours = listener.try_clone().expect("dup");
    let mut server = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .env("LISTEN_FDS", "1")
        .fd3(listener.into())
        .start();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    server.lines.wait_for("accepting", SOON);
    assert_eq!(get(addr, "/").expect("served").status, 200);
    rustix::net::shutdown(&ours, rustix::net::Shutdown::Both).expect("shutdown");
    assert_eq!(
        server.wait(SOON),
        Some(1),
        "a failed listener is an error exit"
    );
    server
        .lines
        .wait_for("this listener can no longer accept", SOON);
    server.lines.wait_for(
        "every listener failed; the server drained and stopped",
        SOON,
    );
    assert_none_left([server.pid]);
}
