//! Issue 14: a restart must never leave the service dark. Each test starts real processes and
//! provokes one failure path of the hand-off: a refused syscall (seccomp), running out of fds,
//! a service manager that does not read, a close signal racing with the hand-off, PID 1 of a
//! namespace, strangers on the hand-off socket. Whatever happens, one process serves, nothing
//! else holds the listener, and a stop frees the port.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use rustix::process::Signal;
use support::*;

fn mainpid(notice: &Notice) -> u32 {
    notice
        .lines()
        .iter()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {notice:?}"))
}

/// Whether a message announces a main pid (a `MAINPID=` line, not a status quoting one).
fn announces_mainpid(notice: &Notice) -> bool {
    notice.lines().iter().any(|l| l.starts_with("MAINPID="))
}

/// The pids the server logged as started restart children ("waiting for its READY=1 pid=N").
fn started_children(lines: &Lines) -> Vec<u32> {
    lines
        .all()
        .iter()
        .filter_map(|l| l.split("waiting for its READY=1 pid=").nth(1))
        .filter_map(|rest| rest.trim().parse().ok())
        .collect()
}

/// A hello server from `spawn`, once it has reported READY=1 to `notify`: its address and the
/// inode of its listening socket.
fn ready(spawn: Spawn, notify: &NotifySocket, port: u16) -> (Proc, SocketAddr, u64) {
    let server = spawn
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path)
        .start();
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);
    let inode = listening_inode(port).expect("the server listens");
    (server, addr, inode)
}

fn under_seccomp(mode: &str) -> Spawn {
    Spawn::new(seccomp_wrapper())
        .arg(mode)
        .arg(example("hello"))
}

/// Three restarts in a row under `mode`, each hand-off confirmed by MAINPID=, each old process
/// exiting 0, each new one serving; then a stop that frees the port.
fn restarts_succeed_under(mode: &str) {
    let notify = NotifySocket::new();
    let port = free_port();
    let (mut server, addr, inode) = ready(under_seccomp(mode), &notify, port);
    let mut pids = vec![server.pid];
    for i in 1..=3 {
        let old = *pids.last().expect("a pid");
        signal(old, Signal::USR1);
        let handed = notify.wait_nth(i, SOON, announces_mainpid);
        assert_eq!(
            handed.pid, old,
            "{mode}: the old main process announces its successor"
        );
        let new = mainpid(&handed);
        let code = if i == 1 {
            server.wait(SOON)
        } else {
            wait_exit(old, SOON)
        };
        assert_eq!(code, Some(0), "{mode}: old process {old}");
        assert_eq!(get(addr, "/").expect("served").pid, new, "{mode}");
        pids.push(new);
    }
    let last = *pids.last().expect("a pid");
    signal(last, Signal::TERM);
    assert_eq!(wait_exit(last, SOON), Some(0), "{mode}");
    assert_none_left(pids);
    assert_port_released(port, inode);
}

/// Kernels before 5.3 and strict container profiles have no `pidfd_open`. The spawn does not
/// need it (clone3 returns the pidfd); before, the grandchild was left blocked holding the
/// listeners, one more per SIGUSR1, and the port stayed taken after SIGTERM.
#[test]
fn restarts_work_without_pidfd_open() {
    restarts_succeed_under("no-pidfd-open");
}

/// Docker's default seccomp profile answers `clone3` with ENOSYS: the legacy `clone` syscall
/// with the same flags takes over.
#[test]
fn restarts_work_when_clone3_is_refused() {
    restarts_succeed_under("no-clone3");
}

/// Neither `clone3` nor `clone(CLONE_PARENT)`: the restart fails cleanly, says why (both
/// errnos), and the old process keeps serving; a stop frees the port.
#[test]
fn a_refused_clone_fails_the_restart_cleanly() {
    let notify = NotifySocket::new();
    let port = free_port();
    let (mut server, addr, inode) =
        ready(under_seccomp("no-clone3-no-clone-parent"), &notify, port);
    for i in 1..=3 {
        server.signal(Signal::USR1);
        let failed = notify.wait_nth(i, SOON, |n| n.text.contains("STATUS=Restart failed"));
        assert_eq!(failed.pid, server.pid);
        assert!(failed.has("READY=1"), "{failed:?}");
        assert!(
            failed.text.contains("clone3 failed with ENOSYS")
                && failed.text.contains("clone fallback with EPERM"),
            "the status names both refusals: {failed:?}"
        );
        assert_eq!(get(addr, "/").expect("still serving").pid, server.pid);
    }
    assert!(
        started_children(&server.lines).is_empty(),
        "no process was started: {:#?}",
        server.lines.all()
    );
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
    assert_port_released(port, inode);
}

/// `EMFILE` at every step of the spawn: the server's fd limit is set (prlimit) to what it uses
/// plus 0, 1, 2, ... before each restart, so the restart runs out of fds one step later each
/// time, until one succeeds. Each failure is clean (the server serves once the limit is back),
/// and whatever the step, a final stop frees the port: no process is left with the listener.
#[test]
fn running_out_of_fds_at_any_step_of_a_restart_fails_cleanly() {
    let notify = NotifySocket::new();
    let port = free_port();
    let (server, addr, inode) = ready(Spawn::new(example("hello")), &notify, port);
    // Kept to the end: dropping a Proc kills its process group, which successors share.
    let mut server = server;
    let mut current = server.pid;
    let mut outcomes = Vec::new();
    let mut handed_over = false;
    for extra in 0..16 {
        set_nofile(current, Some(nofile_for_extra(current, extra)));
        let before = server.lines.count();
        signal(current, Signal::USR1);
        // The outcome, from the log: failed (at whatever step; logged with the reason, then
        // "still serving" once a new restart would be accepted), or handed over.
        let line = server.lines.wait_any_after(
            before,
            &[
                "still serving after the failed restart",
                "could not duplicate the listeners",
                "handed over",
            ],
            SOON,
        );
        let outcome = if line.contains("handed over") {
            "handed over".to_string()
        } else if line.contains("could not duplicate") {
            format!("failed: {line}")
        } else {
            format!(
                "failed: {}",
                server
                    .lines
                    .wait_any_after(before, &["restart failed"], SOON)
            )
        };
        outcomes.push((extra, outcome.clone()));
        if outcome == "handed over" {
            let handed = notify.wait_nth(1, SOON, announces_mainpid);
            let new = mainpid(&handed);
            assert_eq!(server.wait(SOON), Some(0));
            current = new;
            handed_over = true;
            break;
        }
        set_nofile(current, None);
        assert_eq!(
            get(addr, "/")
                .unwrap_or_else(|e| panic!("not serving after {outcome}: {e}"))
                .pid,
            current
        );
    }
    eprintln!("outcomes by extra fds: {outcomes:#?}");
    assert!(
        outcomes
            .iter()
            .filter(|(_, o)| o.starts_with("failed"))
            .count()
            >= 3,
        "the sweep hit several steps: {outcomes:#?}"
    );
    if handed_over {
        assert_eq!(get(addr, "/").expect("served").pid, current);
    }
    let children = started_children(&server.lines);
    signal(current, Signal::TERM);
    assert_eq!(wait_exit(current, SOON), Some(0));
    assert_none_left(children.into_iter().chain([server.pid, current]));
    assert_port_released(port, inode);
}

// ---------------------------------------------------------------------------------------------
// Item 2: the hand-off datagram is delivered, or the restart is rolled back.

/// The pid in a "telling the service manager MAINPID=N" line.
fn announced_pid(line: &str) -> u32 {
    line.split("MAINPID=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID= in {line:?}"))
}

/// The service manager is busy: its queue is full (`net.unix.max_dgram_qlen`, 10) and it
/// reads nothing for a second. The old process keeps serving meanwhile, waits until its
/// `MAINPID=` is in the queue, and only then stops; the new process serves.
#[test]
fn the_handoff_waits_until_a_busy_service_manager_has_the_message() {
    let notify = NotifySocket::new();
    let port = free_port();
    let (mut server, addr, inode) = ready(Spawn::new(example("hello")), &notify, port);
    notify.pause();
    let filled = notify.fill();
    server.signal(Signal::USR1);
    let new = announced_pid(
        &server
            .lines
            .wait_for("telling the service manager MAINPID=", SOON),
    );
    // Time is the point here: the manager does not read for a second.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        alive(server.pid),
        "the old process stopped before the manager could know its successor"
    );
    assert!(
        !server.lines.all().iter().any(|l| l.contains("handed over")),
        "handed over before the message was delivered: {:#?}",
        server.lines.all()
    );
    notify.resume();
    let handed = notify.wait_nth(1, SOON, announces_mainpid);
    assert_eq!((handed.pid, mainpid(&handed)), (server.pid, new));
    assert!(handed.has("READY=1"), "{handed:?}");
    assert_eq!(server.wait(SOON), Some(0));
    assert_eq!(get(addr, "/").expect("the new process serves").pid, new);
    // The fillers were all read, before the hand-off message: nothing was dropped for it.
    let all = notify.all();
    let fillers = all.iter().filter(|n| n.text == "FILLER=1\n").count();
    assert_eq!(fillers, filled);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
    assert_port_released(port, inode);
}

/// The manager does not read within the restart's deadline: the restart is rolled back (the
/// ready child is stopped), the old process keeps serving, and once the manager reads again
/// it learns why, with the `READY=1` that ends its reload. No `MAINPID=` ever arrives.
#[test]
fn an_undeliverable_handoff_is_rolled_back() {
    let notify = NotifySocket::new();
    let port = free_port();
    let spawn = Spawn::new(example("hello")).env("HANDOVER_READY_TIMEOUT_MS", "3000");
    let (mut server, addr, inode) = ready(spawn, &notify, port);
    notify.pause();
    notify.fill();
    server.signal(Signal::USR1);
    let child = announced_pid(
        &server
            .lines
            .wait_for("telling the service manager MAINPID=", SOON),
    );
    server
        .lines
        .wait_for("still serving after the failed restart", SOON);
    // Stopped with SIGTERM: a ready handover server drains and exits 0.
    assert_eq!(wait_exit(child, SOON), Some(0), "the child was stopped");
    assert_eq!(get(addr, "/").expect("still serving").pid, server.pid);
    notify.resume();
    let failed = notify.wait_nth(1, SOON, |n| n.text.contains("STATUS=Restart failed"));
    assert_eq!(failed.pid, server.pid);
    assert!(failed.has("READY=1"), "{failed:?}");
    assert!(
        failed.text.contains(&format!(
            "could not deliver MAINPID={child} to the service manager"
        )),
        "{failed:?}"
    );
    notify.sync();
    assert!(
        !notify.all().iter().any(announces_mainpid),
        "{:#?}",
        notify.all()
    );
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid, child]);
    assert_port_released(port, inode);
}

// ---------------------------------------------------------------------------------------------
// Item 4: a close signal racing with the hand-off.

/// A hello server with a slow request in flight on it and a restart whose hand-off is held up
/// by a full manager queue: returns the server, the request, the child and the inode.
fn handoff_in_progress(
    notify: &NotifySocket,
    port: u16,
) -> (
    Proc,
    std::thread::JoinHandle<Result<Reply, String>>,
    u32,
    u64,
) {
    let (server, addr, inode) = ready(Spawn::new(example("hello")), notify, port);
    let slow = get_in_background(addr, "/?sleep_ms=1500", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    notify.pause();
    notify.fill();
    server.signal(Signal::USR1);
    let child = announced_pid(
        &server
            .lines
            .wait_for("telling the service manager MAINPID=", SOON),
    );
    (server, slow, child, inode)
}

/// SIGTERM while the ready child's hand-off waits for the manager: the restart is cancelled
/// (the child is stopped, gracefully), the old process drains, nobody is left, no request is
/// lost, and the manager never hears of the child.
#[test]
fn a_close_signal_while_the_handoff_waits_cancels_the_restart() {
    let notify = NotifySocket::new();
    let port = free_port();
    let (mut server, slow, child, inode) = handoff_in_progress(&notify, port);
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_eq!(wait_exit(child, SOON), Some(0), "the child was stopped");
    let reply = slow.join().expect("client").expect("the slow request");
    assert_eq!((reply.status, reply.pid), (200, server.pid));
    notify.resume();
    notify.sync();
    assert!(
        !notify.all().iter().any(announces_mainpid),
        "{:#?}",
        notify.all()
    );
    server
        .lines
        .wait_for("a close signal arrived while new process", SOON);
    assert_none_left([server.pid, child]);
    assert_port_released(port, inode);
}

/// SIGTERM at the very moment the manager reads again, three ways it can go:
/// - the restart is cancelled first: the child is stopped, the old process drains;
/// - the hand-off completes while the signal is being handled: the signal is forwarded to the
///   new process, which was meant to get it (it is the service now);
/// - the old process already knew it had handed over: the signal only confirms its shutdown
///   (as for a stop that reaches both processes), and the new one goes on serving until the
///   manager, which knows its pid by then, stops it.
///
/// Whichever way, every process exits 0, the request in flight is answered, nothing is left.
#[test]
fn a_close_signal_racing_with_the_handoff_stops_whichever_process_serves() {
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..5 {
        let notify = NotifySocket::new();
        let port = free_port();
        let (mut server, slow, child, inode) = handoff_in_progress(&notify, port);
        notify.resume();
        server.signal(Signal::TERM);
        assert_eq!(server.wait(SOON), Some(0), "round {round}");
        let way = server.lines.wait_any_after(
            0,
            &[
                "a close signal arrived while new process",
                "forwarded to the new process",
                "close signal received while already shutting down",
            ],
            SOON,
        );
        notify.sync();
        let handed = notify.all().iter().any(announces_mainpid);
        let way = if way.contains("arrived while new process") {
            assert!(!handed, "round {round}: cancelled, yet MAINPID= was sent");
            "cancelled"
        } else if way.contains("forwarded") {
            assert!(handed, "round {round}");
            "forwarded"
        } else {
            assert!(handed, "round {round}");
            // What the manager does once it knows the new main pid.
            signal(child, Signal::TERM);
            "confirmed the old process's shutdown"
        };
        seen.insert(way);
        assert_eq!(
            wait_exit(child, SOON),
            Some(0),
            "round {round} ({way}): the child"
        );
        let reply = slow.join().expect("client").expect("the slow request");
        assert_eq!(
            (reply.status, reply.pid),
            (200, server.pid),
            "round {round}"
        );
        assert_none_left([server.pid, child]);
        assert_port_released(port, inode);
    }
    eprintln!("ways seen: {seen:?}");
}

// ---------------------------------------------------------------------------------------------
// Item 3: PID 1 of a PID namespace (a container without an init).

/// `unshare -p -f --mount-proc PROGRAM ARGS`: PROGRAM is PID 1 of a new PID namespace. Returns
/// the unshare process and the outer pid of PID 1 once it serves on `addr`.
fn as_pid1(program: &std::path::Path, addr: SocketAddr, env: &[(&str, &str)]) -> (Proc, u32) {
    let mut spawn = Spawn::new("unshare")
        .arg("-p")
        .arg("-f")
        .arg("--mount-proc")
        .arg(program)
        .arg(addr.to_string());
    for (k, v) in env {
        spawn = spawn.env(k, v);
    }
    let unshare = spawn.start();
    let line = unshare.listen_line();
    assert_eq!(pid_in(&line), 1, "PID 1 inside: {line}");
    let inside = descendants(unshare.pid);
    assert_eq!(inside.len(), 1, "one process in the namespace: {inside:?}");
    let pid1 = inside[0];
    assert_eq!(ns_pid(pid1), Some(1));
    unshare.lines.wait_for("ready pid=1", SOON);
    assert_eq!(get(addr, "/").expect("PID 1 serves").pid, 1);
    (unshare, pid1)
}

/// Waits until a new connection is answered by a process other than `old` (the old one
/// accepts until it has seen the hand-off); returns its pid (inside the namespace).
fn served_by_successor_of(addr: SocketAddr, old: u32) -> u32 {
    let deadline = std::time::Instant::now() + SOON;
    // Bounded: each turn is one request, and the old process stops accepting right after
    // the hand-off.
    loop {
        let pid = get(addr, "/").expect("served").pid;
        if pid != old {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pid {old} still answers"
        );
    }
}

/// As PID 1, a restart hands over to a child, and the old process stays on as its init:
/// two restarts in a row (the second one forwarded by the keeper to the serving process, which
/// hands over to a sibling, another child of the keeper), then SIGTERM to PID 1: forwarded,
/// the serving process drains, and PID 1 exits with its status, 0. Nothing is left.
#[test]
fn as_pid1_the_old_process_stays_on_as_init_for_its_successors() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (mut unshare, pid1) = as_pid1(&example("hello"), addr, &[]);
    let inode = listening_inode(port).expect("listening");
    signal(pid1, Signal::USR1);
    unshare.lines.wait_count("handed over", 1, SOON);
    let first = served_by_successor_of(addr, 1);
    // The keeper forwards signals only once its own drain is over.
    unshare
        .lines
        .wait_for("keeper: serving is over; staying on as init", SOON);
    assert!(alive(pid1), "PID 1 is still there");

    let outer = |ns: u32| {
        descendants(unshare.pid)
            .into_iter()
            .find(|p| ns_pid(*p) == Some(ns))
            .unwrap_or_else(|| panic!("no process with pid {ns} in the namespace"))
    };
    let first_outer = outer(first);
    signal(pid1, Signal::USR1);
    unshare
        .lines
        .wait_for("keeper: forwarded to the serving process", SOON);
    unshare.lines.wait_count("handed over", 2, SOON);
    let second = served_by_successor_of(addr, first);
    unshare.lines.wait_for(
        &format!("keeper: the serving process handed over; it is now pid {second}"),
        SOON,
    );
    assert!(
        1 < first && first < second,
        "successive pids: 1, {first}, {second}"
    );
    // The first successor drains and exits, and is reaped by the keeper: only PID 1 and the
    // second are left in the namespace.
    wait_exit(first_outer, SOON);
    unshare
        .lines
        .wait_for(&format!("keeper: reaped a child pid={first}"), SOON);
    let inside = descendants(unshare.pid);
    let inside_ns: Vec<Option<u32>> = inside.iter().map(|p| ns_pid(*p)).collect();
    assert_eq!(inside.len(), 2, "{inside_ns:?}");

    signal(pid1, Signal::TERM);
    assert_eq!(
        unshare.wait(SOON),
        Some(0),
        "PID 1 exits with the serving process's status"
    );
    unshare.lines.wait_for(
        "keeper: the serving process exited; exiting with its status",
        SOON,
    );
    assert_none_left(inside.into_iter().chain([unshare.pid]));
    assert_port_released(port, inode);
}

/// `docker stop` (SIGTERM to PID 1) at each step of a restart as PID 1 (issue 18, point 5):
/// while the new process starts, once it is ready (the keeper's handlers are registered before
/// the hand-off is committed: a signal in between reaches the keeper, not nobody), once the
/// old process handed over, and once it is the keeper. Each time the signal is acted on: the
/// restart is cancelled, or the signal is forwarded to the serving process; whatever serves
/// drains and exits 0, and PID 1 exits 0 with it, with nothing left (no SIGKILL needed).
#[test]
fn as_pid1_a_stop_at_any_step_of_a_restart_stops_the_service() {
    for step in [
        "restart: new process started",
        "restart: new process is ready and the service manager knows; handing over",
        "handed over pid=",
        "keeper: the serving process is now pid",
    ] {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (mut unshare, pid1) = as_pid1(&example("hello"), addr, &[]);
        signal(pid1, Signal::USR1);
        unshare.lines.wait_for(step, SOON);
        let inside = descendants(unshare.pid);
        signal(pid1, Signal::TERM);
        assert_eq!(
            unshare.wait(SOON),
            Some(0),
            "SIGTERM to PID 1 after {step:?}: PID 1's exit code"
        );
        assert_none_left(inside.into_iter().chain([unshare.pid]));
    }
}

/// `docker stop` (SIGTERM to PID 1) right after a hand-off, while PID 1 still drains a slow
/// request: the request is answered by PID 1, the signal is forwarded to the serving process,
/// which drains and exits 0, and PID 1 then exits 0 with it.
#[test]
fn as_pid1_a_stop_during_its_own_drain_reaches_the_successor() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (mut unshare, pid1) = as_pid1(&example("hello"), addr, &[]);
    let inode = listening_inode(port).expect("listening");
    let slow = get_in_background(addr, "/?sleep_ms=1500", false);
    unshare.lines.wait_for("slow request: sleeping", SOON);
    signal(pid1, Signal::USR1);
    unshare.lines.wait_count("handed over", 1, SOON);
    let successor = served_by_successor_of(addr, 1);
    let inside = descendants(unshare.pid);
    signal(pid1, Signal::TERM);
    unshare
        .lines
        .wait_for("keeper: forwarded to the serving process", SOON);
    let reply = slow.join().expect("client").expect("the slow request");
    assert_eq!((reply.status, reply.pid), (200, 1));
    assert_eq!(unshare.wait(SOON), Some(0));
    unshare.lines.wait_for(
        &format!(
            "keeper: the serving process exited; exiting with its status pid={successor} code=0"
        ),
        SOON,
    );
    assert_none_left(inside.into_iter().chain([unshare.pid]));
    assert_port_released(port, inode);
}

// ---------------------------------------------------------------------------------------------
// Item 9: strangers on the hand-off socket.

/// A deployed copy of `name` whose file is then replaced by a script that waits `delay` before
/// executing the real binary (kept next to it): a restart child that reports READY=1 late.
/// Returns the deployed path (what the server records as its executable).
fn slow_starting_copy(name: &str, dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let exe = deploy_copy(name, dir);
    let real = dir.join(format!("{name}.real"));
    std::fs::copy(&exe, &real).expect("copy the real binary");
    (exe, format!("exec {} \"$@\"", real.display()))
}

/// The only hand-off socket `server` (pid as it names itself) has bound, from /proc/net/unix.
fn handoff_socket(server: u32) -> std::os::unix::net::SocketAddr {
    use std::os::linux::net::SocketAddrExt;
    let names = abstract_sockets(&format!("handover/{server}/"));
    assert_eq!(names.len(), 1, "one hand-off socket: {names:?}");
    std::os::unix::net::SocketAddr::from_abstract_name(names[0].as_bytes()).expect("name")
}

/// A sender the server cannot see (another PID namespace: here the server runs in a new one,
/// the test in the parent) shows up in `SCM_CREDENTIALS` with pid 0, which rustix's `UCred`
/// cannot hold. Its `READY=1` is ignored (logged with sender 0), and the restart completes
/// with the real child.
#[test]
fn a_handoff_message_from_another_pid_namespace_is_ignored() {
    let dir = scratch_dir("pid0");
    let (exe, exec_real) = slow_starting_copy("hello", &dir);
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // sh is PID 1 (and the parent of both servers), so hello is an ordinary process here.
    let mut unshare = Spawn::new("unshare")
        .arg("-p")
        .arg("-f")
        .arg("--mount-proc")
        .arg("sh")
        .arg("-c")
        .arg(r#""$0" "$1"; exec sleep 600"#)
        .arg(&exe)
        .arg(addr.to_string())
        .start();
    let first = pid_in(&unshare.listen_line());
    assert_ne!(first, 1);
    assert_eq!(get(addr, "/").expect("serving").pid, first);
    let outer = |ns: u32| {
        descendants(unshare.pid)
            .into_iter()
            .find(|p| ns_pid(*p) == Some(ns))
            .unwrap_or_else(|| panic!("no process with pid {ns} in the namespace"))
    };
    let (first_outer, pid1) = (outer(first), outer(1));
    replace_with_script(&exe, &format!("sleep 1\n{exec_real}"));
    signal(first_outer, Signal::USR1);
    unshare.lines.wait_for("waiting for its READY=1 pid=", SOON);
    let socket = handoff_socket(first);
    let stranger = std::os::unix::net::UnixDatagram::unbound().expect("socket");
    for _ in 0..3 {
        stranger
            .send_to_addr(b"READY=1\nSTATUS=impostor\n", &socket)
            .expect("send to the hand-off socket");
    }
    let ignored = unshare.lines.wait_for(
        "ignoring a hand-off message not sent by the new process",
        SOON,
    );
    assert!(ignored.contains("sender=Some(0)"), "{ignored}");
    unshare.lines.wait_for("handed over", SOON);
    let second = served_by_successor_of(addr, first);
    let second_outer = outer(second);
    assert!(
        !unshare
            .lines
            .all()
            .iter()
            .any(|l| l.contains("impostor") && !l.contains("ignoring")),
        "{:#?}",
        unshare.lines.all()
    );
    wait_exit(first_outer, SOON);
    signal(second_outer, Signal::TERM);
    wait_exit(second_outer, SOON);
    unshare.lines.wait_for("reason: Signal(15)", SOON);
    // PID 1 (sh, then sleep) goes last; its end ends the namespace.
    signal(pid1, Signal::KILL);
    unshare.wait(SOON);
    assert_none_left([unshare.pid, pid1, first_outer, second_outer]);
    let _ = std::fs::remove_dir_all(dir);
}

/// Anyone who can read /proc/net/unix can find the abstract hand-off socket and fill its
/// queue. The child reports on its private channel instead, so a flood does not stop the
/// restart (before, its one non-blocking datagram was lost to the flood, and the restart timed
/// out).
#[test]
fn a_flood_on_the_handoff_socket_does_not_stop_a_restart() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let notify = NotifySocket::new();
    let dir = scratch_dir("flood");
    let (exe, exec_real) = slow_starting_copy("hello", &dir);
    let port = free_port();
    let spawn = Spawn::new(&exe).env("HANDOVER_READY_TIMEOUT_MS", "10000");
    let (mut server, addr, inode) = ready(spawn, &notify, port);
    replace_with_script(&exe, &format!("sleep 0.5\n{exec_real}"));
    server.signal(Signal::USR1);
    server.lines.wait_for("waiting for its READY=1 pid=", SOON);
    let socket = handoff_socket(server.pid);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let full = std::sync::Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (0..16)
        .map(|_| {
            let (stop, full, socket) = (stop.clone(), full.clone(), socket.clone());
            std::thread::spawn(move || {
                let s = std::os::unix::net::UnixDatagram::unbound().expect("socket");
                s.set_write_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                let deadline = std::time::Instant::now() + SOON;
                // Bounded by `stop` and the deadline.
                while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                    if s.send_to_addr(b"STATUS=flood\n", &socket).is_err() {
                        full.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let handed = notify.wait_nth(1, SOON, announces_mainpid);
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().expect("flooder");
    }
    let new = mainpid(&handed);
    assert!(
        full.load(Ordering::Relaxed) > 0,
        "the flood never found the queue full"
    );
    assert_eq!(server.wait(SOON), Some(0));
    assert_eq!(get(addr, "/").expect("served").pid, new);
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([server.pid, new]);
    assert_port_released(port, inode);
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------------
// Item 7 (the restart's half): a dropped server future.

/// `tokio::time::timeout(.., serve(..))` fires while a restart child is starting (it reports
/// READY=1 only after the drop): the child is killed at the drop, and no `MAINPID=` is ever
/// sent, although the runtime runs on (before, the restart task went on by itself, and told
/// the manager about a process nobody was watching any more).
#[test]
fn a_dropped_server_future_kills_its_restart_child_and_sends_no_mainpid() {
    let notify = NotifySocket::new();
    let dir = scratch_dir("dropped");
    let (exe, exec_real) = slow_starting_copy("faults", &dir);
    let port = free_port();
    let spawn = Spawn::new(&exe)
        .env("HANDOVER_SERVE_FOR_MS", "1000")
        .env("HANDOVER_LINGER_MS", "3000");
    let (mut server, _, inode) = ready(spawn, &notify, port);
    replace_with_script(&exe, &format!("sleep 1.5\n{exec_real}"));
    server.signal(Signal::USR1);
    let child: u32 = server
        .lines
        .wait_for("waiting for its READY=1 pid=", SOON)
        .rsplit("pid=")
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("child pid");
    server
        .lines
        .wait_for("serve future dropped by a timeout", SOON);
    // Killed (SIGKILL) at the drop, while still in its `sleep`: no exit status.
    assert_eq!(wait_exit(child, SOON), None, "the child was killed");
    assert!(
        !server.lines.all().iter().any(|l| l.contains("linger over")),
        "the child was killed at the drop, not when the process ended"
    );
    assert_eq!(server.wait(SOON), Some(0));
    server.lines.wait_for("linger over", SOON);
    notify.sync();
    assert!(
        !notify.all().iter().any(announces_mainpid),
        "{:#?}",
        notify.all()
    );
    assert_none_left([server.pid, child]);
    assert_port_released(port, inode);
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------------
// Also fixed.

/// `bind_unix` probes an existing socket file to tell a stale one from a live one. A live
/// server with a full backlog made the old blocking probe wait forever; now the probe sees
/// `EAGAIN` (alive, busy) at once, and the bind fails with "address in use".
#[test]
fn bind_unix_on_a_live_socket_with_a_full_backlog_fails_at_once() {
    let dir = scratch_dir("busy-unix");
    let path = dir.join("busy.sock");
    // A live listener with a backlog of 0 that never accepts, filled with pending connects.
    let listener = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        None,
    )
    .expect("socket");
    let addr = rustix::net::SocketAddrUnix::new(&path).expect("path");
    rustix::net::bind(&listener, &addr).expect("bind");
    rustix::net::listen(&listener, 0).expect("listen");
    let mut pending = Vec::new();
    for _ in 0..64 {
        let c = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .expect("socket");
        match rustix::net::connect(&c, &addr) {
            Ok(()) => pending.push(c),
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("connect: {e}"),
        }
    }
    assert!(!pending.is_empty());
    let (tx, rx) = std::sync::mpsc::channel();
    let probe_path = path.clone();
    std::thread::spawn(move || {
        let _ = tx.send(handover::Listeners::bind_unix(&probe_path).map(|_| ()));
    });
    let result = rx.recv_timeout(Duration::from_secs(5));
    // Unblock an old-style probe before asserting, so its thread ends either way.
    drop(pending);
    drop(listener);
    let result = result.expect("bind_unix did not return within 5 s (a blocking probe)");
    let err = result.expect_err("a live socket must not be replaced");
    assert!(
        err.to_string().contains("Address in use") || err.to_string().contains("in use"),
        "{err}"
    );
    assert!(path.exists(), "the live socket's file was removed");
    let _ = std::fs::remove_dir_all(dir);
}

/// `LISTEN_FDS=0` with names is "no fds" for systemd's `sd_listen_fds`; handover agrees (with
/// a warning) and binds its address, instead of refusing to start.
#[test]
fn listen_fds_zero_with_names_means_no_fds() {
    let port = free_port();
    let mut server = Spawn::new(example("hello"))
        .arg(format!("127.0.0.1:{port}"))
        .env("LISTEN_FDS", "0")
        .env("LISTEN_FDNAMES", "web")
        .start();
    let addr = addr_in(&server.listen_line());
    server
        .lines
        .wait_for("LISTEN_FDS=0 with a non-empty LISTEN_FDNAMES", SOON);
    assert_eq!(get(addr, "/").expect("serving").pid, server.pid);
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([server.pid]);
}
