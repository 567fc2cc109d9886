//! The lame duck (`shutdown_delay`): behind a load balancer or in Kubernetes, a stopping
//! server keeps accepting for a while, with its readiness check failing, so that traffic moves
//! away before the listener closes. The `axum` example as a real process.

#![cfg(feature = "axum")]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::*;

/// The axum example with a lame duck of `delay_ms`, once ready; its `web` address.
fn lame_duck_app(notify: &NotifySocket, delay_ms: u64) -> (Proc, SocketAddr) {
    let server = Spawn::new(example("axum"))
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("HANDOVER_SHUTDOWN_DELAY_MS", delay_ms.to_string())
        .start();
    let web = addr_in(&listen_line_of(&server.lines, "web"));
    notify.wait_line("READY=1", SOON);
    (server, web)
}

#[test]
fn a_lame_duck_keeps_accepting_fails_readiness_then_drains() {
    let notify = NotifySocket::new();
    let (mut server, web) = lame_duck_app(&notify, 1000);
    assert_eq!(get(web, "/healthz").expect("healthz").status, 200);
    let slow = get_in_background(web, "/slow?ms=2500", false);
    server.lines.wait_for("slow request: sleeping", SOON);

    let term = Instant::now();
    server.signal(Signal::TERM);
    // At once: STOPPING=1, a STATUS that says so, and a stop timeout covering delay + drain.
    let stopping = notify.wait_line("STOPPING=1", SOON);
    assert_eq!(stopping.pid, server.pid);
    assert!(
        stopping
            .text
            .contains("STATUS=Stopping: lame duck for 1s, still accepting"),
        "{stopping:?}"
    );
    let extend = notify.wait_nth(1, SOON, |n| n.text.contains("EXTEND_TIMEOUT_USEC="));
    let usec: u64 = extend
        .lines()
        .iter()
        .find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
        .and_then(|v| v.parse().ok())
        .expect("EXTEND_TIMEOUT_USEC value");
    assert!(usec >= 6_000_000, "delay 1 s + drain 5 s: {usec}");
    server.lines.wait_for("lame duck: still accepting", SOON);
    // New connections are accepted and served; readiness fails, liveness does not; answers
    // carry Connection: close so that keep-alive clients move away.
    let health = get(web, "/healthz").expect("a new connection during the lame duck");
    assert_eq!((health.status, health.body.as_str()), (503, "lame duck\n"));
    assert_eq!(get(web, "/livez").expect("livez").status, 200);
    let hello = get(web, "/").expect("served during the lame duck");
    assert_eq!((hello.status, hello.body.as_str()), (200, "Hello world"));
    assert!(hello.connection_close, "{hello:?}");
    assert!(
        term.elapsed() < Duration::from_millis(900),
        "checked within the delay"
    );

    // After the delay: no longer accepting (a bound address refuses), the slow request still
    // finishes, the process exits 0 with the counters.
    server
        .lines
        .wait_for("lame duck over: no longer accepting", SOON);
    assert!(term.elapsed() >= Duration::from_secs(1));
    server.lines.wait_for("stopped accepting", SOON);
    assert!(
        std::net::TcpStream::connect(web).is_err(),
        "refused after the lame duck"
    );
    let slow = slow
        .join()
        .expect("thread")
        .expect("the slow request completes");
    assert_eq!((slow.status, slow.body.as_str()), (200, "slow answer"));
    assert_eq!(server.wait(SOON), Some(0));
    let closed = server.lines.wait_for("server closed", SOON);
    assert!(
        closed.contains("lame_duck=1.") && closed.contains("lame_duck_requests=3"),
        "{closed}"
    );
    let shutdown = server.lines.wait_for("reason: Signal(15)", SOON);
    assert!(
        shutdown.contains("lame_duck_requests: 3") && shutdown.contains("cut: 0"),
        "{shutdown}"
    );
    assert_none_left([server.pid]);
}

#[test]
fn a_second_close_signal_ends_the_lame_duck_and_a_third_cuts() {
    let notify = NotifySocket::new();
    let (mut server, web) = lame_duck_app(&notify, 30_000);
    let slow = get_in_background(web, "/slow?ms=20000", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    server.signal(Signal::TERM);
    server.lines.wait_for("lame duck: still accepting", SOON);
    let second = Instant::now();
    server.signal(Signal::TERM);
    server
        .lines
        .wait_for("lame duck over: no longer accepting", SOON);
    assert!(second.elapsed() < Duration::from_secs(2), "ended at once");
    server.lines.wait_for("stopped accepting", SOON);
    // Draining the slow request now; a third close signal cuts it.
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert!(slow.join().expect("thread").is_err(), "cut");
    let shutdown = server.lines.wait_for("reason: Signal(15)", SOON);
    assert!(
        shutdown.contains("forced: true") && shutdown.contains("cut: 1"),
        "{shutdown}"
    );
    assert_none_left([server.pid]);
}

#[test]
fn the_handle_state_watch_sees_each_step() {
    // The admin listener's /state, read through a lame duck: serving → lame duck → gone.
    let notify = NotifySocket::new();
    let server = Spawn::new(example("axum"))
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("HANDOVER_SHUTDOWN_DELAY_MS", "1000")
        .start();
    let admin = addr_in(&listen_line_of(&server.lines, "admin"));
    notify.wait_line("READY=1", SOON);
    assert_eq!(get(admin, "/state").expect("state").body, "serving");
    signal(server.pid, Signal::TERM);
    server.lines.wait_for("lame duck: still accepting", SOON);
    assert_eq!(get(admin, "/state").expect("state").body, "lame duck");
    assert_eq!(wait_exit(server.pid, SOON), Some(0));
    assert_none_left([server.pid]);
    drop(server);
}
