//! The rest of the sd_notify protocol: watchdog pings and their hand-off, drain-time
//! EXTEND_TIMEOUT_USEC, and the fd store. A real NOTIFY_SOCKET records every message with its
//! sender's pid (and the fds attached).

mod support;

use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::*;

fn hello(port: u16, notify: &NotifySocket) -> Spawn {
    Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path)
}

#[test]
fn watchdog_pings_at_half_the_interval_and_pass_to_the_new_process() {
    let notify = NotifySocket::new();
    let port = free_port();
    // Our pid is not known before the start; WATCHDOG_PID unset means "for whoever reads it".
    let mut server = hello(port, &notify).env("WATCHDOG_USEC", "400000").start();
    server.listen_line();
    let first = notify.wait_nth(1, SOON, |n| n.text == "WATCHDOG=1\n");
    let third = notify.wait_nth(3, SOON, |n| n.text == "WATCHDOG=1\n");
    assert_eq!((first.pid, third.pid), (server.pid, server.pid));

    server.signal(Signal::USR1);
    let handed = notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID="));
    let new: u32 = handed.lines()[0]["MAINPID=".len()..].parse().expect("pid");
    assert_eq!(server.wait(SOON), Some(0));
    // The new process pings once it is the main process; the old one stopped at the hand-off.
    notify.wait_nth(1, SOON, |n| n.text == "WATCHDOG=1\n" && n.pid == new);
    let all = notify.all();
    let handed_at = all
        .iter()
        .position(|n| n.text.contains("MAINPID="))
        .expect("hand-off");
    assert!(
        !all[handed_at + 1..]
            .iter()
            .any(|n| n.pid == server.pid && n.text == "WATCHDOG=1\n"),
        "the old process pinged after the hand-off: {all:#?}"
    );
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
}

#[test]
fn watchdog_of_another_pid_or_malformed_is_not_used() {
    for (env, log) in [
        (
            &[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")][..],
            None,
        ),
        (
            &[("WATCHDOG_USEC", "soon")][..],
            Some(r#"WATCHDOG_USEC="soon" is malformed: expected microseconds"#),
        ),
        (
            &[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "me")][..],
            Some(r#"WATCHDOG_PID="me" is malformed"#),
        ),
    ] {
        let notify = NotifySocket::new();
        let port = free_port();
        let mut spawn = hello(port, &notify);
        for (k, v) in env {
            spawn = spawn.env(k, v);
        }
        let mut server = spawn.start();
        let addr = addr_in(&server.listen_line());
        if let Some(log) = log {
            server.lines.wait_for(log, SOON);
        }
        // Time is the point here: 5 intervals with no ping.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(get(addr, "/").expect("serving").status, 200);
        server.signal(Signal::TERM);
        assert_eq!(server.wait(SOON), Some(0));
        let pings = notify
            .all()
            .iter()
            .filter(|n| n.text.contains("WATCHDOG=1"))
            .count();
        assert_eq!(pings, 0, "{env:?}");
        assert_none_left([server.pid]);
    }
}

#[test]
fn a_long_drain_extends_the_stop_timeout_and_reports_what_is_left() {
    let notify = NotifySocket::new();
    let port = free_port();
    let mut server = hello(port, &notify).start();
    let addr = addr_in(&server.listen_line());
    let slow = get_in_background(addr, "/?sleep_ms=2500", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    let sent = Instant::now();
    server.signal(Signal::TERM);
    let extend = notify.wait_nth(1, SOON, |n| n.text.contains("EXTEND_TIMEOUT_USEC="));
    assert_eq!(extend.pid, server.pid);
    let usec: u64 = extend.lines()[0]["EXTEND_TIMEOUT_USEC=".len()..]
        .parse()
        .expect("usec");
    // The deadline is 5 s after the signal; the extension covers what is left of it, plus 1 s.
    let left = Duration::from_secs(6).saturating_sub(sent.elapsed());
    assert!(
        usec >= 1_000_000 && Duration::from_micros(usec) <= left + Duration::from_millis(100),
        "{extend:?}"
    );
    assert_eq!(extend.lines()[1], "STATUS=Stopping: draining 1 connection");
    assert_eq!(
        slow.join().expect("client").expect("slow request").status,
        200
    );
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
}

#[test]
fn bound_listeners_go_to_the_fd_store_once() {
    let notify = NotifySocket::new();
    let port = free_port();
    let mut server = hello(port, &notify).env("HANDOVER_FD_STORE", "1").start();
    server.listen_line();
    let stored = notify.wait_line("FDSTORE=1", SOON);
    assert_eq!(stored.pid, server.pid);
    assert_eq!(stored.text, format!("FDSTORE=1\nFDNAME=127.0.0.1_{port}\n"));
    assert_eq!(stored.fds, 1, "the listening socket is attached");
    // Stored before READY=1, so a crash right after readiness cannot lose it.
    notify.wait_line("READY=1", SOON);
    let all = notify.all();
    let ready = all.iter().position(|n| n.has("READY=1")).expect("ready");
    let fdstore = all.iter().position(|n| n.has("FDSTORE=1")).expect("stored");
    assert!(fdstore < ready, "{all:#?}");

    // The restarted process inherits the listener: it must not store it a second time.
    server.signal(Signal::USR1);
    let handed = notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID="));
    let new: u32 = handed.lines()[0]["MAINPID=".len()..].parse().expect("pid");
    assert_eq!(server.wait(SOON), Some(0));
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    let stores = notify.all().iter().filter(|n| n.has("FDSTORE=1")).count();
    assert_eq!(stores, 1);
    assert_none_left([server.pid, new]);
}
