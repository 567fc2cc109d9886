//! Zero-downtime restart: the hand-off of the listeners to a new process, its readiness
//! handshake, rollback, and what systemd is told. Real processes, real signals, loopback only.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use rustix::process::Signal;
use support::*;

const RESTARTS: usize = 5;
const LOAD_CONNECTIONS: usize = 16;

/// Restarts the server `restarts` times under a keep-alive load and checks every request was
/// answered, each restart moved to a new pid, and one server is left, then none. Returns the
/// fd count and RSS (KiB) of each serving process, taken once it answered.
fn restart_under_load(
    notify: &NotifySocket,
    server: Proc,
    addr: SocketAddr,
    restarts: usize,
) -> Vec<(usize, u64)> {
    let mut usage = Vec::new();
    let mut pids = vec![server.pid];
    let load = Load::start(addr, LOAD_CONNECTIONS, "/", Duration::from_secs(300));
    load.wait_pid(server.pid, SOON);
    // Kept to the end: dropping a Proc kills its process group, which the successors share.
    let mut server = server;
    for i in 1..=restarts {
        let old = *pids.last().expect("a pid");
        let new = restart_once(notify, old, i);
        load.wait_pid(new, SOON);
        usage.push((fds_of(new).len(), rss_kib(new)));
        // The old process drains and exits 0; only then is the next restart sent.
        let code = if i == 1 {
            server.wait(SOON)
        } else {
            wait_exit(old, SOON)
        };
        assert_eq!(code, Some(0), "old process {old} exit code");
        pids.push(new);
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.errors);
    assert!(report.ok > 0);
    let last = *pids.last().expect("a pid");
    for p in &pids {
        assert!(
            report.pids.contains(p),
            "pid {p} never answered: {report:?}"
        );
    }
    // Exactly one server process is left: the last one.
    assert!(alive(last));
    assert_none_left(pids[..pids.len() - 1].iter().copied());
    signal(last, Signal::TERM);
    assert_eq!(wait_exit(last, SOON), Some(0));
    assert_none_left(pids);
    usage
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The soak: 200 restarts under load. Ignored by `cargo test` (it takes a while); `.ci/run`
/// runs it with `cargo test --test restart -- --ignored`.
#[test]
#[ignore = "soak test: run with --ignored"]
fn soak_200_restarts_under_load_stay_flat() {
    let notify = NotifySocket::new();
    let (server, addr) = ready_hello(&notify);
    let usage = restart_under_load(&notify, server, addr, 200);
    let (fds_first, rss_first) = usage[0];
    let (fds_last, rss_last) = usage[usage.len() - 1];
    let fds_max = usage.iter().map(|u| u.0).max().unwrap_or(0);
    let rss_max = usage.iter().map(|u| u.1).max().unwrap_or(0);
    eprintln!(
        "soak: fds first {fds_first} last {fds_last} max {fds_max}; RSS KiB first {rss_first} last {rss_last} max {rss_max}"
    );
    // Each generation is a fresh process: nothing may accumulate from one to the next. The fd
    // count moves with the 16 load connections a process holds at the moment it is read.
    let fds_min = usage.iter().map(|u| u.0).min().unwrap_or(0);
    assert!(
        fds_max <= fds_min + LOAD_CONNECTIONS + 2,
        "fd count grows: {usage:?}"
    );
    let half = usage.len() / 2;
    let early = usage[..half].iter().map(|u| u.0).max().unwrap_or(0);
    let late = usage[half..].iter().map(|u| u.0).max().unwrap_or(0);
    assert!(late <= early + 2, "fd count grows: {usage:?}");
    assert!(rss_max <= rss_first * 2, "RSS grows: {usage:?}");
}

#[test]
fn restarts_on_a_bound_address_under_load_lose_no_request() {
    let notify = NotifySocket::new();
    let (server, addr) = ready_hello(&notify);
    restart_under_load(&notify, server, addr, RESTARTS);
}

#[test]
fn restarts_under_systemd_socket_activate_under_load_lose_no_request() {
    let notify = NotifySocket::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = socket_activate(&listen, Some("web"), &notify, &[], "hello", &listen);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // The first connection starts the program.
    assert_eq!(get(addr, "/").expect("activation request").pid, server.pid);
    notify.wait_line("READY=1", SOON);
    restart_under_load(&notify, server, addr, RESTARTS);
}

#[test]
fn http2_clients_move_to_the_new_process_without_failures() {
    let notify = NotifySocket::new();
    let (server, addr) = ready_hello(&notify);
    let load = Load::start_h2(addr, 4, "/", Duration::from_secs(60));
    load.wait_pid(server.pid, SOON);
    // Kept to the end: dropping a Proc kills its process group, which the successors share.
    let mut server = server;
    let mut pids = vec![server.pid];
    for i in 1..=3 {
        let old = *pids.last().expect("pid");
        signal(old, Signal::USR1);
        let new = mainpid(&notify.wait_nth(i, SOON, |n| n.text.contains("MAINPID=")));
        load.wait_pid(new, SOON);
        let code = if i == 1 {
            server.wait(SOON)
        } else {
            wait_exit(old, SOON)
        };
        assert_eq!(code, Some(0));
        pids.push(new);
    }
    let report = load.stop();
    assert_eq!(
        report.failed, 0,
        "failed HTTP/2 requests: {:?}",
        report.errors
    );
    let last = *pids.last().expect("pid");
    signal(last, Signal::TERM);
    assert_eq!(wait_exit(last, SOON), Some(0));
    assert_none_left(pids);
}

#[test]
fn slow_request_started_before_the_restart_completes_on_the_old_process() {
    let notify = NotifySocket::new();
    let port = free_port();
    let mut server = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path)
        .start();
    let addr = addr_in(&server.listen_line());
    let slow = get_in_background(addr, "/?sleep_ms=1000", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    server.signal(Signal::USR1);
    let new = mainpid(&notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID=")));
    // Both processes accept until the old one has seen the hand-off; after that only the new.
    server.lines.wait_for("stopped accepting", SOON);
    let reply = get(addr, "/").expect("request after the hand-off");
    assert_eq!(reply.pid, new, "new connections go to the new process");
    let slow = slow.join().expect("client thread").expect("slow request");
    assert_eq!(
        (slow.status, slow.body.as_str(), slow.pid),
        (200, "Hello world", server.pid)
    );
    assert_eq!(server.wait(SOON), Some(0));
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
}

#[test]
fn sd_notify_messages_of_a_restart_in_order_with_sender_pids() {
    let notify = NotifySocket::new();
    let (mut server, _) = ready_hello(&notify);
    server.signal(Signal::USR1);
    let handed = notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID="));
    let new = mainpid(&handed);
    assert_eq!(server.wait(SOON), Some(0));
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));

    let all = notify.all();
    let old = server.pid;
    let shape: Vec<(u32, Vec<String>)> = all
        .iter()
        .map(|n| {
            (
                n.pid,
                n.lines()
                    .iter()
                    .map(|l| match l.split_once('=') {
                        Some(("MONOTONIC_USEC", v)) => {
                            assert!(v.parse::<u64>().is_ok(), "{l}");
                            "MONOTONIC_USEC=<now>".to_string()
                        }
                        Some(("STATUS", _)) => "STATUS=<text>".to_string(),
                        _ => l.to_string(),
                    })
                    .collect(),
            )
        })
        .collect();
    let expected: Vec<(u32, Vec<String>)> = vec![
        (old, vec!["READY=1".into(), "STATUS=<text>".into()]),
        (
            old,
            vec![
                "RELOADING=1".into(),
                "MONOTONIC_USEC=<now>".into(),
                "STATUS=<text>".into(),
            ],
        ),
        // One datagram: systemd authorises it against the main pid before applying MAINPID.
        (
            old,
            vec![
                format!("MAINPID={new}"),
                "READY=1".into(),
                "STATUS=<text>".into(),
            ],
        ),
        // The new process speaks for itself from now on; the old one never says STOPPING=1.
        (new, vec!["STOPPING=1".into(), "STATUS=<text>".into()]),
    ];
    assert_eq!(shape, expected, "{all:#?}");
    assert_none_left([old, new]);
}

#[test]
fn failed_restarts_roll_back_and_the_old_process_keeps_serving() {
    let notify = NotifySocket::new();
    let dir = scratch_dir("rollback");
    let exe = deploy_copy("hello", &dir);
    let port = free_port();
    let mut server = Spawn::new(&exe)
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("HANDOVER_READY_TIMEOUT_MS", "1000")
        .start();
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);

    type Break = fn(&std::path::Path);
    let cases: [(&str, Break, &str); 7] = [
        (
            "binary deleted",
            |p| std::fs::remove_file(p).expect("rm"),
            "No such file or directory",
        ),
        (
            "binary not executable",
            |p| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).expect("chmod")
            },
            "Permission denied",
        ),
        (
            "binary exits 1",
            |p| replace_with_script(p, "exit 1"),
            "exited with status 1",
        ),
        (
            "binary never ready",
            |p| replace_with_script(p, "exec sleep 30"),
            "did not report READY=1 within 1s",
        ),
        (
            "binary crashes (SIGSEGV)",
            |p| replace_with_script(p, "kill -SEGV $$"),
            "killed by signal 11",
        ),
        (
            "binary reports READY=1, then exits",
            |p| replace_with_script(p, "exec systemd-notify --ready"),
            "exited with status 0 before",
        ),
        (
            "binary aborts after a ready-less start",
            |p| replace_with_script(p, "sleep 0.2; kill -ABRT $$"),
            "killed by signal 6",
        ),
    ];
    let mut children = Vec::new();
    for (i, (name, breaks, why)) in cases.iter().enumerate() {
        restore_binary("hello", &exe);
        breaks(&exe);
        server.signal(Signal::USR1);
        let failed = notify.wait_nth(i + 1, SOON, |n| n.text.contains("STATUS=Restart failed"));
        assert_eq!(failed.pid, server.pid, "{name}");
        assert!(failed.has("READY=1"), "{name}: the reload ends: {failed:?}");
        assert!(failed.text.contains(why), "{name}: {failed:?}");
        assert!(
            failed
                .text
                .contains(&format!("still serving as pid {}", server.pid)),
            "{name}: {failed:?}"
        );
        let reply = get(addr, "/").unwrap_or_else(|e| panic!("{name}: not serving: {e}"));
        assert_eq!((reply.status, reply.pid), (200, server.pid), "{name}");
        for line in server.lines.all() {
            if let Some(rest) = line.split("waiting for its READY=1 pid=").nth(1) {
                children.push(rest.trim().parse::<u32>().expect("child pid"));
            }
        }
    }
    // Every failed process was stopped, and none is the server's to reap: they belong to the
    // service manager from the start (here the test process, a subreaper), which reaps them.
    for child in &children {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) {
            let rest = &stat[stat.rfind(')').expect("comm") + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            assert_eq!(
                fields[0], "Z",
                "failed process {child} still running: {stat}"
            );
            assert_eq!(fields[1], std::process::id().to_string(), "{stat}");
        }
    }
    assert_none_left(children.iter().copied());

    // A later restart with a good binary succeeds.
    restore_binary("hello", &exe);
    server.signal(Signal::USR1);
    let new = mainpid(&notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID=")));
    assert_eq!(server.wait(SOON), Some(0));
    assert_eq!(get(addr, "/").expect("new process serves").pid, new);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_storm_of_restart_signals_starts_exactly_one_child() {
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_hello(&notify);
    for _ in 0..50 {
        server.signal(Signal::USR1);
    }
    let new = mainpid(&notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID=")));
    assert_eq!(server.wait(SOON), Some(0));
    assert_eq!(get(addr, "/").expect("served").pid, new);
    server.lines.wait_for("reason: HandedOver", SOON); // the last line: all are in
    let started = server
        .lines
        .all()
        .iter()
        .filter(|l| l.contains("restart: starting the new process"))
        .count();
    assert_eq!(started, 1, "{:#?}", server.lines.all());
    let mainpids = notify
        .all()
        .iter()
        .filter(|n| n.text.contains("MAINPID="))
        .count();
    assert_eq!(mainpids, 1);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
}

#[test]
fn close_signal_during_a_restart_kills_the_child_and_leaves_nothing() {
    let dir = scratch_dir("close-during-restart");
    let exe = deploy_copy("hello", &dir);
    let port = free_port();
    let mut server = Spawn::new(&exe).arg(format!("127.0.0.1:{port}")).start();
    // Signal handlers are installed by `serve`, which logs "accepting" after them.
    server.lines.wait_for("accepting", SOON);
    replace_with_script(&exe, "exec sleep 30");
    server.signal(Signal::USR1);
    let line = server.lines.wait_for("waiting for its READY=1 pid=", SOON);
    let child: u32 = line
        .rsplit("pid=")
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("child pid");
    assert!(alive(child));
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    server
        .lines
        .wait_for("a close signal arrived while new process", SOON);
    assert_none_left([server.pid, child]);
    let _ = std::fs::remove_dir_all(dir);
}

/// What the new process inherits, exactly: stdio, the listener at fd 3 (`LISTEN_FDS=1`), and
/// at fd 4 its end of the private channel to the parent (`HANDOVER_CHANNEL_FD=4`), which it
/// sets close-on-exec at start-up so that programs it runs do not see it. Nothing else the
/// parent holds.
#[test]
fn the_child_inherits_only_stdio_the_listeners_and_its_channel() {
    let notify = NotifySocket::new();
    let (mut server, _) = ready_hello(&notify);
    let parent_fds = fds_of(server.pid);
    server.signal(Signal::USR1);
    let new = mainpid(&notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID=")));
    let child_fds = fds_of(new);
    let channel_flags = std::fs::read_to_string(format!("/proc/{new}/fdinfo/4"))
        .expect("the child has fd 4")
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .expect("fdinfo flags");
    assert_eq!(server.wait(SOON), Some(0));

    // The listening socket: what the child has at fd 3.
    let target = |fd: u32| {
        child_fds
            .iter()
            .find(|(n, _)| *n == fd)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("the child has no fd {fd}: {child_fds:?}"))
    };
    let listener = target(3);
    assert!(listener.starts_with("socket:"), "fd 3 is {listener}");
    assert!(
        parent_fds.iter().any(|(_, t)| *t == listener),
        "child fd 3 ({listener}) is the parent's listener: {parent_fds:?}"
    );
    // The channel: a socket of the child's own (the parent holds the other end), set
    // close-on-exec by the child at start-up (the parent passed it without).
    let channel = target(4);
    assert!(channel.starts_with("socket:"), "fd 4 is {channel}");
    assert!(
        !parent_fds.iter().any(|(_, t)| *t == channel),
        "the child's channel end is not the parent's: {parent_fds:?}"
    );
    assert_ne!(
        channel_flags & libc::O_CLOEXEC as u32,
        0,
        "the channel is close-on-exec in the child (flags {channel_flags:o})"
    );
    // Apart from stdio, the listener and the channel, nothing the parent holds. Sockets and
    // pipes have an identity (their inode) in the link; anonymous inodes (epoll, eventfd) and
    // /dev/null do not, and are the child's own.
    for (fd, target) in &child_fds {
        let identifiable = target.starts_with("socket:") || target.starts_with("pipe:");
        if *fd <= 2 || *target == listener || *fd == 4 || !identifiable {
            continue;
        }
        assert!(
            !parent_fds.iter().any(|(_, t)| t == target),
            "child fd {fd} ({target}) leaked from the parent; parent: {parent_fds:?}, child: {child_fds:?}"
        );
    }
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
}

#[test]
fn fd_count_is_flat_after_50_failed_restarts() {
    let notify = NotifySocket::new();
    let dir = scratch_dir("fd-count");
    let exe = deploy_copy("hello", &dir);
    let port = free_port();
    let mut server = Spawn::new(&exe)
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path)
        .start();
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);
    replace_with_script(&exe, "exit 1");
    // One failed restart first, so lazily created fds (the blocking pool's) exist before counting.
    server.signal(Signal::USR1);
    notify.wait_nth(1, SOON, |n| n.text.contains("Restart failed"));
    let before = fds_of(server.pid);
    for i in 2..=51 {
        server.signal(Signal::USR1);
        notify.wait_nth(i, SOON, |n| n.text.contains("Restart failed"));
    }
    let after = fds_of(server.pid);
    assert_eq!(
        before.len(),
        after.len(),
        "before: {before:?}\nafter: {after:?}"
    );
    assert_eq!(get(addr, "/").expect("still serving").pid, server.pid);
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_close_signal_to_the_draining_old_process_does_not_cut_its_requests() {
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_hello(&notify);
    let slow = get_in_background(addr, "/?sleep_ms=1500", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    server.signal(Signal::USR1);
    let new = mainpid(&notify.wait_nth(1, SOON, |n| n.text.contains("MAINPID=")));
    server.lines.wait_for("stopped accepting", SOON);
    // As systemd's stop with KillMode=control-group, or Ctrl-C to the process group, would.
    server.signal(Signal::TERM);
    let reply = slow
        .join()
        .expect("client")
        .expect("the slow request completes");
    assert_eq!((reply.status, reply.pid), (200, server.pid));
    assert_eq!(server.wait(SOON), Some(0));
    let closed = server.lines.wait_for("reason: HandedOver", SOON);
    assert!(
        closed.contains("cut: 0") && closed.contains("forced: false"),
        "{closed}"
    );
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
}

/// A keep-alive client that pauses between requests and never retries (like Python's
/// `http.client`): after a restart, its next request, sent within the restart keep-alive grace,
/// is answered by the old process with `Connection: close`, and the one after goes to the new
/// process. No request fails.
#[test]
fn an_idle_keep_alive_client_that_never_retries_loses_nothing_across_restarts() {
    let notify = NotifySocket::new();
    let (mut server, addr) = ready_hello(&notify);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let client = std::thread::spawn(move || {
        runtime().block_on(async move {
            let (mut ok, mut failed, mut pids) =
                (0u32, Vec::new(), std::collections::BTreeSet::new());
            let mut sender = None;
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !stop2.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < deadline
            {
                if sender.is_none() {
                    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
                    let (s, conn) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                            .await
                            .expect("handshake");
                    tokio::spawn(conn);
                    sender = Some(s);
                }
                let Some(s) = sender.as_mut() else { continue };
                // No ready() check, no retry: a naive client sends on whatever it holds.
                match send(s, addr, "/").await {
                    Ok(r) => {
                        ok += 1;
                        pids.insert(r.pid);
                        if r.connection_close {
                            sender = None;
                        }
                    }
                    Err(e) => {
                        failed.push(e);
                        sender = None;
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            (ok, failed, pids)
        })
    });
    let mut pids = vec![server.pid];
    for i in 1..=3 {
        let old = *pids.last().expect("pid");
        signal(old, Signal::USR1);
        let new = mainpid(&notify.wait_nth(i, SOON, |n| n.text.contains("MAINPID=")));
        let code = if i == 1 {
            server.wait(SOON)
        } else {
            wait_exit(old, SOON)
        };
        assert_eq!(code, Some(0));
        pids.push(new);
    }
    // Let the client make a few more requests on the last process.
    assert_eq!(
        get(addr, "/").expect("served").pid,
        *pids.last().expect("pid")
    );
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, seen) = client.join().expect("client thread");
    assert!(failed.is_empty(), "failed: {failed:?} ({ok} ok)");
    assert!(
        seen.len() >= 2,
        "the client moved between processes: {seen:?}"
    );
    let last = *pids.last().expect("pid");
    signal(last, Signal::TERM);
    assert_eq!(wait_exit(last, SOON), Some(0));
    assert_none_left(pids);
}
