//! The lifecycle's edges: a request head that is half received when the drain starts, durations
//! too large to add to a clock, a serve future dropped half-way, and signals after serving.
//! Real processes, real sockets, real signals.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::*;

/// u64::MAX milliseconds: `Instant + Duration` would overflow.
const HUGE_MS: &str = "18446744073709551615";

#[test]
fn a_half_received_request_head_is_answered_during_the_drain() {
    let port = free_port();
    let mut server = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .start();
    let addr = addr_in(&server.listen_line());
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(SOON)).expect("timeout");
    // First request answered: the connection is a keep-alive connection between requests.
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let first = read_response(&mut s);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Half of the second head, then the shutdown, then the rest (after the keep-alive grace,
    // which an idle connection would not survive).
    s.write_all(b"GET /?second HTTP/1.1\r\nHo").expect("write");
    server.signal(Signal::TERM);
    server.lines.wait_for("stopped accepting", SOON);
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"st: x\r\n\r\n").expect("write the rest");
    let second = read_response(&mut s);
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(
        second.to_ascii_lowercase().contains("connection: close"),
        "{second}"
    );
    assert_eq!(server.wait(SOON), Some(0));
    let closed = server.lines.wait_for("reason: Signal(15)", SOON);
    assert!(closed.contains("cut: 0"), "nothing was cut: {closed}");
    assert_none_left([server.pid]);
}

/// Reads one response (head and `Hello world` body) from a keep-alive connection.
fn read_response(s: &mut std::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + SOON;
    while !String::from_utf8_lossy(&got).ends_with("Hello world") {
        assert!(Instant::now() < deadline, "no full response: {got:?}");
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e} after {:?}", String::from_utf8_lossy(&got)),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn durations_too_large_for_a_clock_are_accepted() {
    let notify = NotifySocket::new();
    let port = free_port();
    let server = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("HANDOVER_DRAIN_TIMEOUT_MS", HUGE_MS)
        .env("HANDOVER_READY_TIMEOUT_MS", HUGE_MS)
        .start();
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);
    // A restart with a ready timeout of "never", then an idle shutdown with a drain timeout of
    // "never": neither panics, both finish as usual.
    signal(server.pid, Signal::USR1);
    let new = mainpid(&notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID=")));
    assert_eq!(wait_exit(server.pid, SOON), Some(0));
    assert_eq!(get(addr, "/").expect("new process").pid, new);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
    drop(server);
}

#[cfg(feature = "axum")]
#[test]
fn a_lame_duck_of_a_huge_delay_ends_with_the_next_close_signal() {
    let mut server = Spawn::new(example("axum"))
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("HANDOVER_SHUTDOWN_DELAY_MS", HUGE_MS)
        .start();
    let web = addr_in(&listen_line_of(&server.lines, "web"));
    server.lines.wait_for("ready", SOON);
    server.signal(Signal::TERM);
    server.lines.wait_for("lame duck: still accepting", SOON);
    assert_eq!(get(web, "/healthz").expect("lame duck serves").status, 503);
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
}

#[test]
fn dropping_the_serve_future_stops_accepting_cuts_connections_and_kills_a_starting_child() {
    let notify = NotifySocket::new();
    let dir = scratch_dir("dropped-future");
    let exe = deploy_copy("faults", &dir);
    let port = free_port();
    let mut server = Spawn::new(&exe)
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("HANDOVER_SERVE_FOR_MS", "2000")
        .env("HANDOVER_LINGER_MS", "4000")
        .env("HANDOVER_READY_TIMEOUT_MS", "60000")
        .start();
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);
    let slow = get_in_background(addr, "/?sleep_ms=30000", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    // A restart that is still waiting for its child when the future is dropped.
    replace_with_script(&exe, "exec sleep 30");
    server.signal(Signal::USR1);
    let waiting = server.lines.wait_for("waiting for its READY=1 pid=", SOON);
    let child: u32 = waiting
        .rsplit("pid=")
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("child pid");

    server
        .lines
        .wait_for("serve future dropped by a timeout", SOON);
    assert!(
        slow.join().expect("thread").is_err(),
        "the slow request is cut"
    );
    assert_eq!(
        wait_exit(child, SOON),
        None,
        "the starting child is killed (and reaped by its parent)"
    );
    // Neither this process nor the killed child holds the listener any more: the accept
    // loops' copies close as their aborted tasks are dropped by the runtime, moments after the
    // future (a bounded wait, long before the process lingers out).
    let until = Instant::now() + SOON;
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < until, "nothing accepts any more");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        notify.all().iter().all(|n| !n.text.contains("MAINPID=")),
        "no hand-off after the drop: {:?}",
        notify.all()
    );
    server.lines.wait_for("linger over", SOON);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid, child]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn after_serving_a_close_signal_has_its_default_action_again() {
    let port = free_port();
    let mut server = Spawn::new(example("faults"))
        .arg(format!("127.0.0.1:{port}"))
        .env("AFTER_SERVE_MS", "60000")
        .start();
    server.listen_line();
    server.lines.wait_for("ready", SOON);
    server.signal(Signal::TERM);
    server.lines.wait_for("after serve: cleaning up", SOON);
    // serve returned: SIGTERM ends the process, as before serving.
    let sent = Instant::now();
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), None, "killed by SIGTERM, not exited");
    assert!(sent.elapsed() < Duration::from_secs(5));
    assert!(
        server
            .lines
            .position("after serve: clean-up done")
            .is_none(),
        "the clean-up was interrupted"
    );
    assert_none_left([server.pid]);
}
