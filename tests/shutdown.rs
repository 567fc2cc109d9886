//! Graceful shutdown, listeners and sd_notify, with the example binaries as real processes.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::*;

fn hello_on(port: u16) -> Spawn {
    Spawn::new(example("hello")).arg(format!("127.0.0.1:{port}"))
}

#[test]
fn bound_address_serves_then_idle_server_exits_promptly_with_exact_notify_messages() {
    let notify = NotifySocket::new();
    let port = free_port();
    let mut server = hello_on(port).env("NOTIFY_SOCKET", &notify.path).start();
    let line = server.listen_line();
    assert_eq!(pid_in(&line), server.pid);
    let addr = addr_in(&line);
    assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));

    let ready = notify.wait_line("READY=1", SOON);
    assert_eq!(
        ready.pid, server.pid,
        "READY=1 must come from the server itself"
    );
    assert_eq!(
        ready.text,
        format!("READY=1\nSTATUS=Listening on http://127.0.0.1:{port}\n")
    );

    let reply = get(addr, "/").expect("HTTP/1.1 request");
    assert_eq!(
        (reply.status, reply.body.as_str(), reply.pid),
        (200, "Hello world", server.pid)
    );
    let reply = get_h2(addr, "/").expect("HTTP/2 request");
    assert_eq!((reply.status, reply.body.as_str()), (200, "Hello world"));

    let sent = Instant::now();
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0), "exit code after SIGTERM");
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(2), "idle shutdown took {took:?}");

    let all = notify.all();
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_eq!(all[1].pid, server.pid);
    assert_eq!(all[1].lines()[0], "STOPPING=1");
    assert!(
        all[1].lines()[1].starts_with("STATUS=Stopping: draining "),
        "{all:#?}"
    );
    assert_none_left([server.pid]);
}

#[test]
fn in_flight_request_completes_and_hooks_run_in_order_before_the_drain() {
    let port = free_port();
    let mut server = Spawn::new(example("custom_signals"))
        .arg(format!("127.0.0.1:{port}"))
        .start();
    let addr = addr_in(&server.listen_line());
    let slow = get_in_background(addr, "/?sleep_ms=1500", false);
    server.lines.wait_for("slow request: sleeping", SOON);

    server.signal(Signal::INT);
    let reply = slow
        .join()
        .expect("client thread")
        .expect("slow request must complete");
    assert_eq!((reply.status, reply.body.as_str()), (200, "Hello world"));
    assert!(
        reply.connection_close,
        "a response sent while draining closes its connection"
    );
    assert_eq!(server.wait(SOON), Some(0), "exit code after SIGINT");

    let lines = server.lines.clone();
    lines.wait_for("reason=Signal(2)", SOON); // the last line: all are in
    let at = |s: &str| {
        lines
            .position(s)
            .unwrap_or_else(|| panic!("no {s:?} in {:#?}", lines.all()))
    };
    let stopped = at("stopped accepting");
    let hook1 = at("shutdown hook 1: closing the database");
    let hook2 = at("shutdown hook 2: flushing the logs");
    let closed = at("server closed");
    assert!(
        stopped < hook1 && hook1 < hook2 && hook2 < closed,
        "{:#?}",
        lines.all()
    );
    // The drain waited for the slow request instead of cutting it.
    let summary = &lines.all()[closed];
    assert!(
        summary.contains("drained=1") && summary.contains("cut=0"),
        "{summary}"
    );
    assert_none_left([server.pid]);
}

#[test]
fn http2_request_in_flight_is_drained() {
    let port = free_port();
    let mut server = hello_on(port).start();
    let addr = addr_in(&server.listen_line());
    let slow = get_in_background(addr, "/?sleep_ms=800", true);
    server.lines.wait_for("slow request: sleeping", SOON);
    server.signal(Signal::TERM);
    let reply = slow
        .join()
        .expect("client thread")
        .expect("HTTP/2 request must complete");
    assert_eq!((reply.status, reply.body.as_str()), (200, "Hello world"));
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
}

#[test]
fn slowloris_and_silent_clients_cannot_hold_shutdown_past_the_timeout() {
    let port = free_port();
    let mut server = hello_on(port)
        .env("HANDOVER_DRAIN_TIMEOUT_MS", "1000")
        .start();
    let addr = addr_in(&server.listen_line());
    let _half_head = raw_connect(addr, b"GET / HTTP/1.1\r\nHost: x\r\n");
    let _silent = raw_connect(addr, b"");
    // A request that outlives the drain timeout: cut, counted, logged.
    let too_slow = get_in_background(addr, "/?sleep_ms=20000", false);
    server.lines.wait_for("slow request: sleeping", SOON);

    let sent = Instant::now();
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "shutdown took {took:?} with a 1 s drain timeout"
    );
    assert!(
        too_slow.join().expect("client thread").is_err(),
        "the cut request fails"
    );
    let closed = server.lines.wait_for("server closed", SOON);
    // The slow request and the half-sent head are cut at the deadline; the silent connection
    // may already have been closed by the keep-alive grace.
    assert!(
        closed.contains("cut=2") || closed.contains("cut=3"),
        "{closed}"
    );
    assert_none_left([server.pid]);
}

#[test]
fn socket_activated_by_systemd_socket_activate_with_fdname() {
    let notify = NotifySocket::new();
    let port = free_port();
    // The address argument is the same port: binding it would fail, so a served request proves
    // the inherited socket was used.
    let listen = format!("127.0.0.1:{port}");
    let mut activator = socket_activate(&listen, Some("web"), &notify, &[], "hello", &listen);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let reply = get(addr, "/").expect("request through the activated socket");
    assert_eq!((reply.status, reply.body.as_str()), (200, "Hello world"));
    // systemd-socket-activate execs the program: same pid.
    assert_eq!(reply.pid, activator.pid);
    let inherited = activator.lines.wait_for("inherited listener", SOON);
    assert!(
        inherited.contains("fd=3") && inherited.contains("name=web"),
        "{inherited}"
    );
    assert_eq!(notify.wait_line("READY=1", SOON).pid, activator.pid);

    activator.signal(Signal::TERM);
    assert_eq!(activator.wait(SOON), Some(0));
    assert_none_left([activator.pid]);
}

/// A `LISTEN_*` or `NOTIFY_SOCKET` value, or an inherited fd, and what must come of it.
struct Case {
    name: &'static str,
    env: &'static [(&'static str, &'static str)],
    fd3: Option<fn() -> OwnedFd>,
    /// `Some(text)`: the process exits 1 and its log contains `text`.
    /// `None`: documented fallback, the server serves.
    error: Option<&'static str>,
    /// A log line the fallback must print.
    log: Option<&'static str>,
}

fn udp_socket() -> OwnedFd {
    UdpSocket::bind("127.0.0.1:0").expect("udp").into()
}

fn unlistening_tcp() -> OwnedFd {
    let s = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .expect("socket");
    rustix::net::bind(&s, &SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    s
}

fn regular_file() -> OwnedFd {
    std::fs::File::open("/proc/self/status")
        .expect("open")
        .into()
}

fn listening_tcp() -> OwnedFd {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("listen")
        .into()
}

#[test]
fn malformed_environment_and_bad_inherited_fds() {
    let cases = [
        Case {
            name: "LISTEN_FDS not a number",
            env: &[("LISTEN_FDS", "abc")],
            fd3: None,
            error: Some(r#"LISTEN_FDS="abc" is malformed: expected a count of fds"#),
            log: None,
        },
        Case {
            name: "LISTEN_FDS negative",
            env: &[("LISTEN_FDS", "-1")],
            fd3: None,
            error: Some(r#"LISTEN_FDS="-1" is malformed"#),
            log: None,
        },
        Case {
            name: "LISTEN_PID not a number",
            env: &[("LISTEN_FDS", "1"), ("LISTEN_PID", "12ab")],
            fd3: None,
            error: Some(r#"LISTEN_PID="12ab" is malformed: expected a process id"#),
            log: None,
        },
        Case {
            name: "LISTEN_FDNAMES count mismatch",
            env: &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "a:b")],
            fd3: Some(listening_tcp),
            error: Some(
                r#"LISTEN_FDNAMES="a:b" is malformed: expected one colon-separated name per fd"#,
            ),
            log: None,
        },
        Case {
            name: "LISTEN_FDS_FIRST_FD on stdio",
            env: &[("LISTEN_FDS", "1"), ("LISTEN_FDS_FIRST_FD", "1")],
            fd3: None,
            error: Some(r#"LISTEN_FDS_FIRST_FD="1" is malformed"#),
            log: None,
        },
        Case {
            name: "fd 3 not open",
            env: &[("LISTEN_FDS", "1")],
            fd3: None,
            error: Some("inherited fd 3 (LISTEN_FDNAMES name \"unknown\") is not open"),
            log: None,
        },
        Case {
            name: "fd 3 a regular file",
            env: &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "web")],
            fd3: Some(regular_file),
            error: Some(
                "inherited fd 3 (LISTEN_FDNAMES name \"web\") is a regular file, not a socket",
            ),
            log: None,
        },
        Case {
            name: "fd 3 a UDP socket",
            env: &[("LISTEN_FDS", "1")],
            fd3: Some(udp_socket),
            error: Some("is a datagram (UDP or SOCK_DGRAM) socket; expected a stream"),
            log: None,
        },
        Case {
            name: "fd 3 a TCP socket that is not listening",
            env: &[("LISTEN_FDS", "1")],
            fd3: Some(unlistening_tcp),
            error: Some("not listening"),
            log: None,
        },
        Case {
            name: "LISTEN_PID of another process",
            env: &[("LISTEN_FDS", "1"), ("LISTEN_PID", "1")],
            fd3: None,
            error: None,
            log: Some("LISTEN_PID is not our pid"),
        },
        Case {
            name: "NOTIFY_SOCKET relative",
            env: &[("NOTIFY_SOCKET", "run/notify")],
            fd3: None,
            error: None,
            log: Some(r#"NOTIFY_SOCKET="run/notify" is malformed: expected an absolute path"#),
        },
        Case {
            name: "NOTIFY_SOCKET unreachable",
            env: &[("NOTIFY_SOCKET", "/nonexistent/handover/notify")],
            fd3: None,
            error: None,
            log: Some("sd_notify message could not be sent"),
        },
        Case {
            name: "NOTIFY_SOCKET vsock",
            env: &[("NOTIFY_SOCKET", "vsock:2:1234")],
            fd3: None,
            error: None,
            log: Some("NOTIFY_SOCKET"),
        },
    ];
    let mut failures = Vec::new();
    for case in cases {
        let port = free_port();
        let mut spawn = hello_on(port);
        for (k, v) in case.env {
            spawn = spawn.env(k, v);
        }
        if let Some(make) = case.fd3 {
            spawn = spawn.fd3(make());
        }
        let mut server = spawn.start();
        match case.error {
            Some(text) => {
                let code = server.wait(SOON);
                // The exit can overtake the last lines through the pipe: wait for them.
                let found = server.lines.eventually(text, SOON);
                let log = server.lines.all().join("\n");
                if code != Some(1) || !found {
                    failures.push(format!(
                        "{}: exit {code:?}, wanted 1 and {text:?} in:\n{log}",
                        case.name
                    ));
                }
                if log.contains("panicked") {
                    failures.push(format!("{}: panicked:\n{log}", case.name));
                }
            }
            None => {
                let addr = addr_in(&server.listen_line());
                match get(addr, "/") {
                    Ok(r) if r.status == 200 => {}
                    other => failures.push(format!("{}: not serving: {other:?}", case.name)),
                }
                if let Some(text) = case.log {
                    server.lines.wait_for(text, SOON);
                }
                server.signal(Signal::TERM);
                let code = server.wait(SOON);
                if code != Some(0) {
                    failures.push(format!("{}: exit {code:?} after SIGTERM", case.name));
                }
            }
        }
        assert_none_left([server.pid]);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut server = hello_on(port).start();
    assert_eq!(server.wait(SOON), Some(1));
    server.lines.wait_for(
        &format!("could not bind 127.0.0.1:{port}: Address already in use"),
        SOON,
    );
}

#[test]
fn ipv6_loopback_is_served() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: this machine has no IPv6 loopback");
        return;
    }
    let port = free_port();
    let mut server = Spawn::new(example("hello"))
        .arg(format!("[::1]:{port}"))
        .start();
    let line = server.listen_line();
    assert!(line.contains(&format!("http://[::1]:{port}")), "{line}");
    let addr: SocketAddr = format!("[::1]:{port}").parse().expect("addr");
    assert_eq!(get(addr, "/").expect("IPv6 request").body, "Hello world");
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
}

#[test]
fn unix_socket_from_systemd_socket_activate_is_served_and_restarted() {
    let notify = NotifySocket::new();
    let dir = scratch_dir("unix");
    let path = dir.join("hello.sock");
    let port = free_port(); // only for the fallback address, which must not be used
    let fallback = format!("127.0.0.1:{port}");
    let mut activator = socket_activate(&path, None, &notify, &[], "hello", &fallback);
    let first = get_unix(&path, "/").expect("request over the Unix socket");
    assert_eq!(
        (first.status, first.body.as_str(), first.pid),
        (200, "Hello world", activator.pid)
    );
    let line = activator.lines.wait_for("listen on:", SOON);
    assert!(line.contains(&format!("unix:{}", path.display())), "{line}");
    notify.wait_line("READY=1", SOON);

    activator.signal(Signal::USR1);
    let handed = notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID="));
    let new: u32 = handed.lines()[0]["MAINPID=".len()..].parse().expect("pid");
    assert_eq!(activator.wait(SOON), Some(0));
    assert_eq!(get_unix(&path, "/").expect("after the restart").pid, new);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([activator.pid, new]);
    let _ = std::fs::remove_dir_all(dir);
}
