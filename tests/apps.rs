//! What real applications need: the peer address through axum's own `ConnectInfo` extractor,
//! several listeners with a router each, a handle that restarts and stops the server from a
//! request handler, hyper's settings, and start-up errors for a configuration that cannot work.
//! The `axum` example (and `faults` for the misconfigurations) as real processes.

#![cfg(feature = "axum")]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::*;

/// The axum example on two free ports (web, admin), reporting to `notify`, once ready.
fn axum_app(notify: &NotifySocket, exe: &Path, admin: Option<&str>) -> (Proc, SocketAddr, String) {
    let admin = admin
        .map(str::to_string)
        .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
    let server = Spawn::new(exe)
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg(&admin)
        .env("NOTIFY_SOCKET", &notify.path)
        .start();
    let web = addr_in(&listen_line_of(&server.lines, "web"));
    listen_line_of(&server.lines, "admin");
    notify.wait_line("READY=1", SOON);
    (server, web, admin)
}

fn admin_addr(admin: &str) -> SocketAddr {
    admin.parse().expect("a TCP admin address")
}

#[test]
fn axum_connect_info_works_unchanged_and_each_listener_has_its_own_routes() {
    let notify = NotifySocket::new();
    let (mut server, web, admin) = axum_app(&notify, &example("axum"), None);
    let admin = admin_addr(&admin);

    // axum's own ConnectInfo<SocketAddr> extractor sees the client's real address.
    let (port, status, body) = get_from_port(web, "/whoami").expect("whoami");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, format!("peer=127.0.0.1:{port} listener=web"));

    // Admin routes answer on the admin listener only, and public ones on the public one only.
    let on_web = request(web, "POST", "/restart").expect("POST /restart on web");
    assert_eq!(on_web.status, 404, "{on_web:?}");
    assert_eq!(request(web, "GET", "/state").expect("web").status, 404);
    assert_eq!(get(admin, "/").expect("admin").status, 404);
    assert_eq!(get(admin, "/healthz").expect("admin").status, 404);
    let ping = get(admin, "/ping").expect("admin ping");
    assert_eq!((ping.status, ping.body.as_str()), (200, "Hello world"));
    let state = get(admin, "/state").expect("admin state");
    assert_eq!((state.status, state.body.as_str()), (200, "serving"));
    let (port, _, whoami) = get_from_port(admin, "/whoami").expect("admin whoami");
    assert!(
        whoami.contains("listener=admin")
            && whoami.contains(&format!("Tcp(127.0.0.1:{port})"))
            && whoami.contains(&format!("local=Tcp({admin})")),
        "{whoami}"
    );

    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
}

#[test]
fn a_unix_admin_listener_tells_the_peer_credentials() {
    let notify = NotifySocket::new();
    let dir = scratch_dir("unix-admin");
    let sock = dir.join("admin.sock");
    let admin = format!("unix:{}", sock.display());
    let (mut server, _web, _) = axum_app(&notify, &example("axum"), Some(&admin));
    let whoami = get_unix(&sock, "/whoami").expect("whoami over the Unix socket");
    assert_eq!(whoami.status, 200);
    // The kernel's SO_PEERCRED of the connecting process: this test.
    assert!(
        whoami.body.contains("listener=admin")
            && whoami
                .body
                .contains(&format!("pid: Some({})", std::process::id()))
            && whoami
                .body
                .contains(&format!("uid: {}", rustix::process::getuid().as_raw())),
        "{}",
        whoami.body
    );
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn both_listeners_survive_restarts_by_signal_and_by_the_admin_endpoint_under_load() {
    let notify = NotifySocket::new();
    let (server, web, admin) = axum_app(&notify, &example("axum"), None);
    let admin = admin_addr(&admin);
    let web_load = Load::start(web, 8, "/", Duration::from_secs(120));
    let admin_load = Load::start(admin, 4, "/ping", Duration::from_secs(120));
    web_load.wait_pid(server.pid, SOON);
    admin_load.wait_pid(server.pid, SOON);

    // First restart: the signal.
    signal(server.pid, Signal::USR1);
    let first = notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID="));
    let pid1 = mainpid(&first);
    assert_eq!(wait_exit(server.pid, SOON), Some(0));
    web_load.wait_pid(pid1, SOON);
    admin_load.wait_pid(pid1, SOON);

    // Second restart: from a request handler, through the handle; the answer is the outcome.
    let answer = request(admin, "POST", "/restart").expect("POST /restart");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.pid, pid1, "answered by the process that restarted");
    let second = notify.wait_nth(2, SOON, |n| n.text.contains("MAINPID="));
    let pid2 = mainpid(&second);
    assert_eq!(answer.body, format!("restarted: pid {pid2} serves now\n"));
    assert_eq!(wait_exit(pid1, SOON), Some(0));
    web_load.wait_pid(pid2, SOON);
    admin_load.wait_pid(pid2, SOON);

    for (name, load) in [("web", web_load), ("admin", admin_load)] {
        let report = load.stop();
        assert_eq!(report.failed, 0, "{name}: {:?}", report.errors);
        assert_eq!(
            report.pids,
            [server.pid, pid1, pid2].into_iter().collect(),
            "{name}"
        );
    }
    signal(pid2, Signal::TERM);
    assert_eq!(wait_exit(pid2, SOON), Some(0));
    assert_none_left([server.pid, pid1, pid2]);
    drop(server);
}

#[test]
fn the_restart_endpoint_reports_failure_and_refuses_a_second_restart_meanwhile() {
    let notify = NotifySocket::new();
    let dir = scratch_dir("restart-endpoint");
    let exe = deploy_copy("axum", &dir);
    let (server, web, admin) = axum_app(&notify, &exe, None);
    let admin = admin_addr(&admin);

    // A broken deploy: the new binary fails after a second. Two restarts asked meanwhile.
    replace_with_script(&exe, "sleep 1; exit 1");
    let first = std::thread::spawn(move || request(admin, "POST", "/restart"));
    server.lines.wait_for("waiting for its READY=1", SOON);
    let second = request(admin, "POST", "/restart").expect("second POST /restart");
    assert_eq!(second.status, 409, "{second:?}");
    assert_eq!(
        second.body,
        "already restarting: a restart is in progress\n"
    );
    let first = first.join().expect("thread").expect("first POST /restart");
    assert_eq!(first.status, 500, "{first:?}");
    assert!(
        first.body.starts_with("restart failed: new process ")
            && first
                .body
                .contains("exited with status 1 before it reported READY=1")
            && first
                .body
                .contains(&format!("this process (pid {}) keeps serving", server.pid)),
        "{}",
        first.body
    );
    assert_eq!(get(web, "/").expect("still serving").pid, server.pid);

    // Fixed: the same endpoint hands over.
    restore_binary("axum", &exe);
    let ok = request(admin, "POST", "/restart").expect("POST /restart");
    let new = mainpid(&notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID=")));
    assert_eq!(
        (ok.status, ok.body.as_str()),
        (200, format!("restarted: pid {new} serves now\n").as_str())
    );
    assert_eq!(wait_exit(server.pid, SOON), Some(0));
    assert_eq!(get(web, "/").expect("new process").pid, new);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_handle_shuts_down_gracefully_or_at_once() {
    let notify = NotifySocket::new();
    let (mut server, web, admin) = axum_app(&notify, &example("axum"), None);
    let admin = admin_addr(&admin);
    // Graceful: the slow request finishes.
    let slow = get_in_background(web, "/slow?ms=1000", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    let answer = request(admin, "POST", "/shutdown").expect("POST /shutdown");
    assert_eq!(answer.status, 200);
    let slow = slow.join().expect("thread").expect("slow request answered");
    assert_eq!((slow.status, slow.body.as_str()), (200, "slow answer"));
    assert_eq!(server.wait(SOON), Some(0));
    let closed = server.lines.wait_for("reason: Requested", SOON);
    assert!(closed.contains("forced: false"), "{closed}");
    assert_none_left([server.pid]);

    // At once: the slow request is cut.
    let (mut server, web, admin) = axum_app(&notify, &example("axum"), None);
    let admin = admin_addr(&admin);
    let slow = get_in_background(web, "/slow?ms=20000", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    let started = Instant::now();
    let _ = request(admin, "POST", "/shutdown?now");
    assert_eq!(server.wait(SOON), Some(0));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        slow.join().expect("thread").is_err(),
        "the slow request is cut"
    );
    let closed = server.lines.wait_for("reason: Requested", SOON);
    assert!(closed.contains("forced: true"), "{closed}");
    assert_none_left([server.pid]);
}

#[test]
fn two_named_sockets_from_systemd_socket_activate_are_routed_by_name_and_handed_over() {
    let notify = NotifySocket::new();
    let (web_port, admin_port) = (free_port(), free_port());
    let (web, admin) = (
        SocketAddr::from(([127, 0, 0, 1], web_port)),
        SocketAddr::from(([127, 0, 0, 1], admin_port)),
    );
    // The arguments name the same ports: binding them would fail, so serving proves the
    // inherited sockets were used, by name.
    let mut activator = activate_axum(web, admin, Some("web:admin"), &notify);
    for (fd, name) in [(3, "web"), (4, "admin")] {
        let line = activator
            .lines
            .wait_for(&format!("inherited listener fd={fd}"), SOON);
        assert!(line.contains(&format!("name={name}")), "{line}");
    }
    assert_eq!(get(admin, "/ping").expect("admin").body, "Hello world");
    assert_eq!(get(web, "/ping").expect("web").status, 404);

    let answer = request(admin, "POST", "/restart").expect("restart");
    assert_eq!(answer.status, 200, "{answer:?}");
    let new = mainpid(&notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID=")));
    assert_eq!(activator.wait(SOON), Some(0));
    // The new process got both, under their names, and routes them the same way.
    let (port, _, body) = get_from_port(web, "/whoami").expect("whoami");
    assert_eq!(body, format!("peer=127.0.0.1:{port} listener=web"));
    let ping = get(admin, "/ping").expect("admin after the restart");
    assert_eq!((ping.pid, ping.body.as_str()), (new, "Hello world"));
    assert_eq!(get(web, "/ping").expect("web").status, 404);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([activator.pid, new]);
}

#[test]
fn with_restarts_off_a_restart_signal_is_ignored_not_deadly() {
    let notify = NotifySocket::new();
    let server = Spawn::new(example("axum"))
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("HANDOVER_RESTARTS", "0")
        .start();
    let web = addr_in(&listen_line_of(&server.lines, "web"));
    let admin = addr_in(&listen_line_of(&server.lines, "admin"));
    notify.wait_line("READY=1", SOON);
    signal(server.pid, Signal::USR1);
    server
        .lines
        .wait_for("restart signal ignored: restarts are disabled", SOON);
    assert_eq!(get(web, "/").expect("still serving").pid, server.pid);
    let refused = request(admin, "POST", "/restart").expect("POST /restart");
    assert!(
        refused.status == 500 && refused.body.contains("restarts are disabled"),
        "{refused:?}"
    );
    signal(server.pid, Signal::TERM);
    assert_eq!(wait_exit(server.pid, SOON), Some(0));
    assert_none_left([server.pid]);
    drop(server);
}

#[test]
fn unnamed_inherited_sockets_are_taken_by_their_address() {
    // systemd-socket-activate without --fdname (or systemfd, which cannot name sockets): both
    // fds are named "unknown"; take_or_bind finds each by its address.
    let notify = NotifySocket::new();
    let (web, admin) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let mut activator = activate_axum(web, admin, None, &notify);
    for fd in [3, 4] {
        let line = activator
            .lines
            .wait_for(&format!("inherited listener fd={fd}"), SOON);
        assert!(line.contains("name=unknown"), "{line}");
    }
    assert_eq!(get(admin, "/ping").expect("admin").body, "Hello world");
    assert_eq!(get(web, "/ping").expect("web").status, 404);
    let (port, _, body) = get_from_port(web, "/whoami").expect("whoami");
    assert_eq!(body, format!("peer=127.0.0.1:{port} listener=web"));
    activator.signal(Signal::TERM);
    assert_eq!(activator.wait(SOON), Some(0));
    assert_none_left([activator.pid]);
}

/// The axum example under `systemd-socket-activate` on `web` and `admin` (the arguments name
/// the same addresses: binding them would fail, so serving proves the inherited sockets were
/// used), started by a first request, once it reported `READY=1`.
fn activate_axum(
    web: SocketAddr,
    admin: SocketAddr,
    fdnames: Option<&str>,
    notify: &NotifySocket,
) -> Proc {
    let mut spawn = Spawn::new("systemd-socket-activate")
        .arg("-l")
        .arg(web.to_string())
        .arg("-l")
        .arg(admin.to_string());
    if let Some(names) = fdnames {
        spawn = spawn.arg(format!("--fdname={names}"));
    }
    let activator = spawn
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify.path.display()))
        .arg("-E")
        .arg("RUST_LOG=info")
        .arg(example("axum"))
        .arg(web.to_string())
        .arg(admin.to_string())
        .start();
    activator.lines.wait_for("Listening on", SOON);
    assert_eq!(get(web, "/").expect("web").body, "Hello world");
    notify.wait_line("READY=1", SOON);
    activator
}

/// The faults example with `env`, on a free port; returns it and its listener's name.
fn misconfigured(env: &[(&str, &str)], notify: &NotifySocket) -> (Proc, String) {
    let port = free_port();
    let mut spawn = Spawn::new(example("faults"))
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path);
    for (k, v) in env {
        spawn = spawn.env(k, v);
    }
    (spawn.start(), format!("127.0.0.1_{port}"))
}

#[test]
fn a_configuration_that_cannot_work_is_an_error_at_start_up() {
    let notify = NotifySocket::new();
    // Each case: its name, the SERVICES value for a listener name, the error it must give.
    type Case = (&'static str, fn(&str) -> String, fn(&str) -> String);
    let cases: [Case; 3] = [
        (
            "unclaimed listener",
            |_| String::new(),
            |listener| format!("no service for the listener(s) {listener:?}"),
        ),
        (
            "a name claimed twice",
            |listener| format!("{listener},{listener}"),
            |listener| format!("listener name {listener:?} is claimed by two services"),
        ),
        (
            "a service for no listener",
            |_| "metrics,*".to_string(),
            |_| {
                "a service is given for the listener \"metrics\", but no listener has that name"
                    .to_string()
            },
        ),
    ];
    for (case, services, error) in cases {
        let port = free_port();
        let listener = format!("127.0.0.1_{port}");
        let mut server = Spawn::new(example("faults"))
            .arg(format!("127.0.0.1:{port}"))
            .env("NOTIFY_SOCKET", &notify.path)
            .env("SERVICES", services(&listener))
            .start();
        assert_eq!(server.wait(SOON), Some(1), "{case}: exit status");
        let logged = server.lines.wait_for("server error", SOON);
        assert!(logged.contains(&error(&listener)), "{case}: {logged}");
    }
    assert!(
        notify.all().iter().all(|n| !n.has("READY=1")),
        "nothing may report READY=1: {:?}",
        notify.all()
    );

    // A second restart-capable server in the same process: refused, the first one serves on.
    let (mut server, _) = misconfigured(&[("SECOND_SERVER", "1")], &notify);
    let addr = addr_in(&server.listen_line());
    let refused = server.lines.wait_for("second server:", SOON);
    assert!(
        refused
            .contains("another restart-capable handover server is already running in this process")
            && refused.contains(".restarts(false)"),
        "{refused}"
    );
    assert_eq!(get(addr, "/").expect("the first serves").status, 200);
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
}

#[test]
fn hyper_settings_reach_the_connections() {
    let notify = NotifySocket::new();
    let (mut server, _) = misconfigured(&[("MAX_HEADERS", "8")], &notify);
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let mut head = "GET / HTTP/1.1\r\nHost: x\r\n".to_string();
    for i in 0..20 {
        head.push_str(&format!("X-Header-{i}: {i}\r\n"));
    }
    head.push_str("\r\n");
    use std::io::{Read, Write};
    s.write_all(head.as_bytes()).expect("write");
    s.set_read_timeout(Some(SOON)).expect("timeout");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "20 headers with max_headers(8): {answer:?}"
    );
    assert_eq!(get(addr, "/").expect("a normal request").status, 200);
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
}
