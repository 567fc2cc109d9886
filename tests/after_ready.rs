//! Issue 18: after the successor's `READY=1`. Every connection is owned by exactly one process
//! at every moment; a process gives one up only on the other side's word or its proven death,
//! never on a timeout; as long as one process of the service lives, the service answers. Each
//! test starts real processes: a successor that stops (`SIGSTOP`), dies on cue, or is rolled
//! back with requests in flight; PID 1 of a namespace; a process started with signals ignored
//! and blocked.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::*;

/// A keep-alive HTTP/1.1 connection written and read by hand.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    port: u16,
}

/// One answer: which process, and whether it said `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    pid: u32,
    close: bool,
    body: String,
}

impl Conn {
    fn connect(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream.set_read_timeout(Some(SOON)).expect("read timeout");
        let port = stream.local_addr().expect("local address").port();
        Conn {
            stream,
            buf: Vec::new(),
            port,
        }
    }

    /// Sends `GET path` without waiting for the answer.
    fn send(&mut self, path: &str) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        self.stream
            .write_all(req.as_bytes())
            .unwrap_or_else(|e| panic!("port {}: write: {e}", self.port));
    }

    fn get(&mut self, path: &str) -> Result<Answer, String> {
        self.send(path);
        self.answer()
    }

    /// The next answer; `Err` says what came instead (EOF, a reset, a timeout).
    fn answer(&mut self) -> Result<Answer, String> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let mut answer = Answer {
                    pid: 0,
                    close: false,
                    body: String::new(),
                };
                let mut length = 0;
                for line in head.split("\r\n").skip(1) {
                    let Some((name, value)) = line.split_once(':') else {
                        continue;
                    };
                    let value = value.trim();
                    match name.to_ascii_lowercase().as_str() {
                        "x-pid" => answer.pid = value.parse().unwrap_or(0),
                        "connection" => answer.close = value.eq_ignore_ascii_case("close"),
                        "content-length" => length = value.parse().unwrap_or(0),
                        _ => {}
                    }
                }
                if self.buf.len() >= end + 4 + length {
                    answer.body =
                        String::from_utf8_lossy(&self.buf[end + 4..end + 4 + length]).into_owned();
                    self.buf.drain(..end + 4 + length);
                    return Ok(answer);
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(format!(
                        "port {}: EOF before a complete answer ({} bytes of one)",
                        self.port,
                        self.buf.len()
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("port {}: read: {e}", self.port)),
            }
        }
    }
}

/// The faults example deployed to a directory of its own (so that the test can replace the
/// file with a wrapper for the successor), started with `env` on a free port, once ready.
fn deployed_faults(
    dir: &Path,
    notify: &NotifySocket,
    env: &[(&str, &str)],
) -> (Proc, SocketAddr, PathBuf) {
    let exe = deploy_copy("faults", dir);
    let mut spawn = Spawn::new(&exe)
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &notify.path);
    for (k, v) in env {
        spawn = spawn.env(k, v);
    }
    let server = spawn.start();
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);
    (server, addr, exe)
}

/// Makes the next restart start the real faults example with `vars` set (for it only).
fn successor_with(exe: &Path, vars: &str) {
    replace_with_script(
        exe,
        &format!("{vars} exec '{}' \"$@\"", example("faults").display()),
    );
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `T` for stopped, `Z`...).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// Waits until `pid` is stopped (`SIGSTOP`). Polled, bounded: there is no event for it.
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + SOON;
    while proc_state(pid) != Some('T') {
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A field of `/proc/PID/status` (`SigIgn`, `SigBlk`...), as a number.
fn status_mask(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

fn bit(sig: i32) -> u64 {
    1 << (sig - 1)
}

// ---------------------------------------------------------------------------------------------
// Points 1 and 2: a passed connection is never served by nobody.

/// The successor stops (`SIGSTOP`) right after its `READY=1`, before a busy connection is
/// passed to it. The old process passes it at the end of its response, gets no
/// acknowledgement, stops passing (a later connection stays with it, answered with
/// `Connection: close`), and exits at its drain deadline, closing only its copy. Once the
/// successor runs again, it serves the connection it was passed: the client's next request
/// is answered. (Before, the old process closed its copy after 4 s of silence, the successor's
/// late acknowledgement failed with EPIPE, and it dropped the connection: EOF.)
#[test]
fn a_successor_stopped_after_ready_keeps_the_connection_it_was_passed() {
    let dir = scratch_dir("stopped-successor");
    let notify = NotifySocket::new();
    let (mut server, addr, exe) =
        deployed_faults(&dir, &notify, &[("HANDOVER_DRAIN_TIMEOUT_MS", "7000")]);
    let old = server.pid;
    let mut passed = Conn::connect(addr);
    passed.send("/?sleep_ms=2000");
    let mut kept = Conn::connect(addr);
    kept.send("/?sleep_ms=5500");
    server.lines.wait_count("slow request: sleeping", 2, SOON);

    successor_with(&exe, "STOP_AFTER_READY_MS=50");
    let new = restart_once(&notify, old, 1);
    wait_stopped(new);
    // Answered by the old process, before any failure: keep-alive; then passed (in flight).
    let a = passed.answer().expect("the first slow request");
    assert_eq!((a.pid, a.close), (old, false), "{a:?}");
    assert_eq!(proc_state(new), Some('T'), "still stopped when passed");
    // Silence: nothing more is passed; the later answer says Connection: close.
    server
        .lines
        .wait_for("did not acknowledge passed connections within", SOON);
    let b = kept.answer().expect("the second slow request");
    assert_eq!((b.pid, b.close), (old, true), "{b:?}");
    // The old process exits at its drain deadline, the passed connection still in flight.
    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    assert!(
        !server.lines.all().iter().any(|l| l.contains("left to it")),
        "never given up on a timeout"
    );

    signal(new, Signal::CONT);
    let c = passed
        .get("/?after=cont")
        .expect("the passed connection, once its new owner runs again");
    assert_eq!((c.pid, c.close), (new, false), "{c:?}");
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([old, new]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The successor is stopped with a batch unread in its queue, and killed after the old process
/// stopped passing: its end closes with unread data, so the old process reads `ECONNRESET`.
/// That is a closed channel (the successor is provably gone, and never acknowledged the
/// batch): the connection is the old process's again and its next request is answered there.
/// (Before, `ECONNRESET` counted as silence, and the connection was closed.)
#[test]
fn a_successor_killed_with_connections_unread_gives_them_back() {
    let dir = scratch_dir("killed-successor");
    let notify = NotifySocket::new();
    let (mut server, addr, exe) = deployed_faults(&dir, &notify, &[]);
    let old = server.pid;
    let mut conn = Conn::connect(addr);
    conn.send("/?sleep_ms=1500");
    server.lines.wait_for("slow request: sleeping", SOON);

    successor_with(&exe, "STOP_AFTER_READY_MS=50");
    let new = restart_once(&notify, old, 1);
    wait_stopped(new);
    let a = conn.answer().expect("the slow request");
    assert_eq!((a.pid, a.close), (old, false), "{a:?}");
    server
        .lines
        .wait_for("did not acknowledge passed connections within", SOON);
    signal(new, Signal::KILL);
    assert_eq!(wait_exit(new, SOON), None, "killed");
    server.lines.wait_for(
        "the connections it had not acknowledged are served here",
        SOON,
    );
    let b = conn.get("/?after=kill").expect("the connection given back");
    assert_eq!((b.pid, b.close), (old, true), "{b:?}");
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([old, new]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Point 3: a rolled-back successor finishes what it accepted.

/// The faults example with `env`, restarted with the service manager's queue full (it does not
/// read): the hand-off waits to deliver `MAINPID=` after the child's `READY=1`, while the child
/// already accepts. The old process is then stopped (`SIGSTOP`), so that the child accepts every
/// new connection. Returns the server, its address and the child's pid.
fn restart_held_at_mainpid(notify: &NotifySocket, env: &[(&str, &str)]) -> (Proc, SocketAddr, u32) {
    let mut spawn = Spawn::new(example("faults"))
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &notify.path);
    for (k, v) in env {
        spawn = spawn.env(k, v);
    }
    let server = spawn.start();
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);
    notify.pause();
    notify.fill();
    signal(server.pid, Signal::USR1);
    let child: u32 = server
        .lines
        .wait_for("waiting for its READY=1 pid=", SOON)
        .rsplit("pid=")
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("child pid");
    server.lines.wait_for(
        "restart: new process is ready; telling the service manager",
        SOON,
    );
    signal(server.pid, Signal::STOP);
    wait_stopped(server.pid);
    (server, addr, child)
}

/// The hand-off cannot be delivered (the service manager's queue is full and it does not
/// read), so the restart is rolled back after the child has been accepting for a while. The
/// child gets its drain deadline, not a SIGKILL a second after SIGTERM: every request it
/// accepted (4.5 s long, each) is answered. Meanwhile the old process serves.
#[test]
fn a_rolled_back_successor_finishes_its_requests() {
    let notify = NotifySocket::new();
    // The old process stopped for a moment, so that the child accepts every request.
    let (mut server, addr, child) = restart_held_at_mainpid(
        &notify,
        &[
            ("HANDOVER_READY_TIMEOUT_MS", "1500"),
            ("HANDOVER_DRAIN_TIMEOUT_MS", "8000"),
        ],
    );
    let old = server.pid;
    let requests: Vec<_> = (0..12)
        .map(|_| get_in_background(addr, "/?sleep_ms=4500", false))
        .collect();
    server.lines.wait_count(
        &format!("[{child}]  INFO faults::common: slow request: sleeping"),
        12,
        SOON,
    );
    signal(old, Signal::CONT);
    server.lines.wait_for("restart failed", SOON);
    let answers: Vec<Reply> = requests
        .into_iter()
        .map(|r| r.join().expect("client").expect("a slow request"))
        .collect();
    assert!(
        answers.iter().all(|r| (r.status, r.pid) == (200, child)),
        "{answers:?}"
    );
    server
        .lines
        .wait_for("restart: the new process was stopped", SOON);
    assert!(!alive(child), "the rolled-back child {child} is gone");
    notify.resume();
    assert_eq!(get(addr, "/").expect("still served").pid, old);
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([old, child]);
}

/// A close signal cancels a restart whose child already serves a request: the child is stopped
/// in the background, with its drain deadline, and the old process goes on handling events at
/// once (a second close signal cuts its own connections right away, while the child still
/// finishes its request); the old process exits only once the child is gone. (Before, the
/// close signal's handler awaited the child's stop, up to 6 s, and killed it after 1 s.)
#[test]
fn a_close_signal_during_a_restart_leaves_the_child_its_drain_and_the_old_process_responsive() {
    let notify = NotifySocket::new();
    // The child accepts a 3 s request (the old process is stopped meanwhile).
    let (mut server, addr, child) =
        restart_held_at_mainpid(&notify, &[("HANDOVER_READY_TIMEOUT_MS", "20000")]);
    let old = server.pid;
    let request = get_in_background(addr, "/?sleep_ms=3000", false);
    server.lines.wait_for(
        &format!("[{child}]  INFO faults::common: slow request: sleeping"),
        SOON,
    );
    signal(old, Signal::CONT);
    signal(old, Signal::TERM);
    server
        .lines
        .wait_for("close signal received; shutting down", SOON);
    signal(old, Signal::TERM);
    let cut = server
        .lines
        .wait_for("second close signal: cutting all connections now", SOON);
    let reply = request
        .join()
        .expect("client")
        .expect("the child's request");
    assert_eq!((reply.status, reply.pid), (200, child));
    server
        .lines
        .wait_for("restart: the new process was stopped", SOON);
    let cut_at = server.lines.all().iter().position(|l| *l == cut);
    let stopped_at = server
        .lines
        .position("restart: the new process was stopped");
    assert!(
        cut_at.is_some() && cut_at < stopped_at,
        "the second signal was handled while the child still finished its request"
    );
    // The old process exits only once the child is gone.
    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    notify.resume();
    assert_none_left([old, child]);
}

// ---------------------------------------------------------------------------------------------
// Point 4: never dark.

/// The successor dies 300 ms after its `READY=1`, while the old process still drains a slow
/// request. The old process kept its listener and watched the successor: it serves again,
/// tells the service manager `MAINPID=` itself with `READY=1` and a `STATUS=` saying why, and
/// its state is `serving` again. (Before, it had closed its listener: the port refused.)
#[test]
fn the_old_process_serves_again_when_its_successor_dies_after_ready() {
    let dir = scratch_dir("dies-after-ready");
    let notify = NotifySocket::new();
    let (mut server, addr, exe) = deployed_faults(&dir, &notify, &[("HOOKS", "ok")]);
    let old = server.pid;
    let slow = get_in_background(addr, "/?sleep_ms=3000", false);
    server.lines.wait_for("slow request: sleeping", SOON);

    successor_with(&exe, "DIE_AFTER_READY_MS=300");
    let new = restart_once(&notify, old, 1);
    assert_eq!(wait_exit(new, SOON), Some(7), "the successor died on cue");
    let again = notify.wait_nth(1, SOON, |n| {
        n.pid == old && n.has(&format!("MAINPID={old}")) && n.has("READY=1")
    });
    let status = again
        .lines()
        .into_iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= in {again:?}"))
        .to_string();
    assert!(
        status.contains(&format!("Serving again as pid {old}"))
            && status.contains(&format!("(pid {new})")),
        "{status}"
    );
    let state = get(addr, "/state").expect("a new connection");
    assert_eq!((state.pid, state.body.as_str()), (old, "serving"));
    let reply = slow.join().expect("client").expect("the slow request");
    assert_eq!((reply.status, reply.pid), (200, old));
    // Serving as before: a restart works again.
    successor_with(&exe, "");
    // The third datagram with MAINPID= and READY=1: the first hand-off, serving again, this.
    let third = restart_once(&notify, old, 3);
    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    // Its report counts the hook that ran in the drain it gave up (hooks run once).
    let closed = server
        .lines
        .all()
        .into_iter()
        .find(|l| {
            l.contains(&format!("[{old}]"))
                && l.contains("server closed")
                && l.contains("hooks_completed=")
        })
        .unwrap_or_else(|| panic!("pid {old} logged no report"));
    assert!(closed.contains("hooks_completed=1"), "{closed}");
    assert_eq!(get(addr, "/").expect("served").pid, third);
    signal(third, Signal::TERM);
    assert_eq!(wait_exit(third, SOON), Some(0));
    assert_none_left([old, new, third]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The successor dies while the old process's drain runs its hooks (the first one sleeps):
/// the old process serves again at once, and the hooks still run to their end, each once: the
/// second one too, and neither again at the final stop. (Before, the drain's hooks were dropped
/// with the drain given up: the second hook never ran.)
#[test]
fn hooks_interrupted_by_serving_again_still_run_once_each() {
    let dir = scratch_dir("hooks-serve-again");
    let notify = NotifySocket::new();
    let (mut server, addr, exe) = deployed_faults(
        &dir,
        &notify,
        &[
            ("HOOKS", "sleep:1500,ok"),
            ("HANDOVER_DRAIN_TIMEOUT_MS", "10000"),
        ],
    );
    let old = server.pid;
    let slow = get_in_background(addr, "/?sleep_ms=2500", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    successor_with(&exe, "");
    let new = restart_once(&notify, old, 1);
    server.lines.wait_for(
        &format!("[{old}]  INFO faults: hook 1 (sleep) sleeping"),
        SOON,
    );
    signal(new, Signal::KILL);
    assert_eq!(wait_exit(new, SOON), None, "killed");
    server.lines.wait_for(
        "the new process died while this one drains: serving again",
        SOON,
    );
    server
        .lines
        .wait_for(&format!("[{old}]  INFO faults: hook 2 (ok) done"), SOON);
    assert_eq!(get(addr, "/").expect("served again").pid, old);
    let reply = slow.join().expect("client").expect("the slow request");
    assert_eq!((reply.status, reply.pid), (200, old));
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    let ran = |n: &str| {
        server
            .lines
            .all()
            .iter()
            .filter(|l| {
                l.contains(&format!("[{old}]  INFO faults: hook {n}")) && l.ends_with("done")
            })
            .count()
    };
    assert_eq!(
        (ran("1 (sleep)"), ran("2 (ok)")),
        (1, 1),
        "each hook ran once"
    );
    let closed = server
        .lines
        .all()
        .into_iter()
        .find(|l| l.contains(&format!("[{old}]")) && l.contains("hooks_completed="))
        .unwrap_or_else(|| panic!("pid {old} logged no report"));
    assert!(closed.contains("hooks_completed=2"), "{closed}");
    assert_none_left([old, new]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The listener comes from a socket manager that keeps its own copy (here the test process, as
/// a `systemd --user` socket unit or systemfd would: an ancestor of the server). A successor
/// killed after `READY=1` leaves the old process to serve again: the manager's copy is not
/// "a later process of the service holding the listeners". (Before, any holder but PID 1
/// counted as one, and the service stayed dark while the old process lived.)
#[test]
fn a_socket_its_manager_also_holds_does_not_keep_the_old_process_from_serving_again() {
    let manager = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = manager.local_addr().expect("address");
    let notify = NotifySocket::new();
    let mut server = Spawn::new(example("hello"))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("LISTEN_FDS", "1")
        .env("HANDOVER_DRAIN_TIMEOUT_MS", "30000")
        .fds_from_3(vec![manager.try_clone().expect("dup").into()])
        .start();
    notify.wait_line("READY=1", SOON);
    let old = server.pid;
    let slow = get_in_background(addr, "/?sleep_ms=3000", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    let new = restart_once(&notify, old, 1);
    signal(new, Signal::KILL);
    assert_eq!(wait_exit(new, SOON), None, "killed");
    server.lines.wait_for(
        "the new process died while this one drains: serving again",
        SOON,
    );
    assert_eq!(get(addr, "/").expect("served again").pid, old);
    let reply = slow.join().expect("client").expect("the slow request");
    assert_eq!((reply.status, reply.pid), (200, old));
    server.signal(Signal::TERM);
    assert_eq!(server.wait(SOON), Some(0));
    assert_none_left([old, new]);
}

/// A successor that exits 0 has stopped in order (asked to, by a stop that reached only the main
/// process with `KillMode=mixed`, or by its application): the old process finishes its drain
/// and exits, it does not serve again.
#[test]
fn a_successor_that_stops_in_order_is_not_replaced() {
    let dir = scratch_dir("stops-in-order");
    let notify = NotifySocket::new();
    let (mut server, addr, exe) = deployed_faults(&dir, &notify, &[]);
    let old = server.pid;
    let slow = get_in_background(addr, "/?sleep_ms=2000", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    successor_with(&exe, "DIE_AFTER_READY_MS=300 DIE_WITH=0");
    let new = restart_once(&notify, old, 1);
    server.lines.wait_for(
        "the new process ended in order while this one drains: not serving again",
        SOON,
    );
    assert_eq!(wait_exit(new, SOON), Some(0));
    let reply = slow.join().expect("client").expect("the slow request");
    assert_eq!((reply.status, reply.pid), (200, old));
    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    notify.sync();
    assert!(
        !notify
            .all()
            .iter()
            .any(|n| n.has(&format!("MAINPID={old}"))),
        "{:#?}",
        notify.all()
    );
    assert_none_left([old, new]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The successor hands over in its turn, to a third process, and is killed while it drains and
/// the first one still drains: a later process serves (it holds the listener), so the first one
/// does not serve again; it finishes its drain and exits.
#[test]
fn a_successor_that_handed_over_in_its_turn_is_not_replaced() {
    let dir = scratch_dir("handed-on");
    let notify = NotifySocket::new();
    let (mut server, addr, _) = deployed_faults(&dir, &notify, &[]);
    let old = server.pid;
    let slow = get_in_background(addr, "/?sleep_ms=4000", false);
    server.lines.wait_for("slow request: sleeping", SOON);
    let second = restart_once(&notify, old, 1);
    // A request that keeps the second one draining (it is killed before answering it), sent
    // once the first one no longer accepts.
    server.lines.wait_for(
        &format!("[{old}]  INFO handover::lifecycle: stopped accepting"),
        SOON,
    );
    let cut = get_in_background(addr, "/?sleep_ms=5000", false);
    server.lines.wait_for(
        &format!("[{second}]  INFO faults::common: slow request: sleeping"),
        SOON,
    );
    let third = restart_once(&notify, second, 2);
    signal(second, Signal::KILL);
    server.lines.wait_for(
        "another process holds the listeners (it had handed over in its turn): not serving again",
        SOON,
    );
    assert_eq!(wait_exit(second, SOON), None, "killed");
    let _ = cut.join();
    let reply = slow.join().expect("client").expect("the slow request");
    assert_eq!((reply.status, reply.pid), (200, old));
    assert_eq!(server.wait(SOON), Some(0), "old process {old} exit code");
    assert_eq!(get(addr, "/").expect("served").pid, third);
    notify.sync();
    assert!(
        !notify
            .all()
            .iter()
            .any(|n| n.has(&format!("MAINPID={old}"))),
        "{:#?}",
        notify.all()
    );
    signal(third, Signal::TERM);
    assert_eq!(wait_exit(third, SOON), Some(0));
    assert_none_left([old, second, third]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same as PID 1 of a namespace (a container without an init): the successor is PID 1's
/// own child. When it dies during PID 1's drain, PID 1 reaps it, serves again (no `MAINPID=`:
/// it was the main process all along), and a later restart hands over again, to a keeper of
/// its own; a stop then reaches the new serving process.
#[test]
fn as_pid1_the_old_process_serves_again_when_its_successor_dies() {
    let dir = scratch_dir("pid1-dies-after-ready");
    let exe = deploy_copy("faults", &dir);
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut unshare = Spawn::new("unshare")
        .arg("-p")
        .arg("-f")
        .arg("--mount-proc")
        .arg(&exe)
        .arg(addr.to_string())
        .start();
    assert_eq!(pid_in(&unshare.listen_line()), 1);
    unshare.lines.wait_for("ready pid=1", SOON);
    let pid1 = descendants(unshare.pid)
        .into_iter()
        .find(|p| ns_pid(*p) == Some(1))
        .expect("PID 1");
    let slow = get_in_background(addr, "/?sleep_ms=3000", false);
    unshare.lines.wait_for("slow request: sleeping", SOON);
    successor_with(&exe, "DIE_AFTER_READY_MS=300");
    signal(pid1, Signal::USR1);
    unshare.lines.wait_for(
        "the new process died while this one drains: serving again",
        SOON,
    );
    let state = get(addr, "/state").expect("a new connection");
    assert_eq!((state.pid, state.body.as_str()), (1, "serving"));
    let reply = slow.join().expect("client").expect("the slow request");
    assert_eq!((reply.status, reply.pid), (200, 1));
    // The dead child was reaped: PID 1 is alone in the namespace.
    assert_eq!(descendants(unshare.pid), vec![pid1]);

    successor_with(&exe, "");
    signal(pid1, Signal::USR1);
    unshare
        .lines
        .wait_for("keeper: serving is over; staying on as init", SOON);
    let deadline = Instant::now() + SOON;
    let serving = loop {
        let pid = get(addr, "/").expect("served").pid;
        if pid != 1 {
            break pid;
        }
        assert!(Instant::now() < deadline, "PID 1 still answers");
    };
    let inside = descendants(unshare.pid);
    signal(pid1, Signal::TERM);
    assert_eq!(unshare.wait(SOON), Some(0));
    unshare.lines.wait_for(
        &format!(
            "keeper: the serving process exited; exiting with its status pid={serving} code=0"
        ),
        SOON,
    );
    assert_none_left(inside.into_iter().chain([unshare.pid]));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Points 5 and 6: PID 1.

/// The socket inodes among the fds of `pid`.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    fds_of(pid)
        .into_iter()
        .filter_map(|(_, target)| {
            target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse().ok())
        })
        .collect()
}

/// Inodes of the Unix sockets of `kind` (`0005`: `SOCK_SEQPACKET`) in `/proc/PID/net/unix`
/// (the namespace of `pid`).
fn unix_inodes(pid: u32, kind: &str) -> BTreeSet<u64> {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).expect("net/unix");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4) == Some(&kind)).then(|| f.get(6)?.parse().ok())?
        })
        .collect()
}

/// As PID 1, once serving is over after a hand-off the keeper holds nothing of the server:
/// no channel to the successor (its connection hand-off is over), no listener. (Before, the
/// lifecycle stayed alive under the keeper: the channel, the sender task and the sweeper for
/// the container's life.)
#[test]
fn as_pid1_the_keeper_keeps_nothing_of_the_server() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut unshare = Spawn::new("unshare")
        .arg("-p")
        .arg("-f")
        .arg("--mount-proc")
        .arg(example("hello"))
        .arg(addr.to_string())
        .start();
    assert_eq!(pid_in(&unshare.listen_line()), 1);
    unshare.lines.wait_for("ready pid=1", SOON);
    let pid1 = descendants(unshare.pid)
        .into_iter()
        .find(|p| ns_pid(*p) == Some(1))
        .expect("PID 1");
    // An idle keep-alive connection, passed to the successor over the channel.
    let mut idle = Conn::connect(addr);
    assert_eq!(idle.get("/").expect("served").pid, 1);
    signal(pid1, Signal::USR1);
    unshare
        .lines
        .wait_for("keeper: serving is over; staying on as init", SOON);
    let a = idle.get("/").expect("the passed connection");
    assert_ne!(a.pid, 1, "{a:?}");
    let listener = listening_inode(port).expect("listening");
    let held = |kind: &str| {
        let mine = socket_inodes(pid1);
        unix_inodes(pid1, kind)
            .into_iter()
            .filter(|i| mine.contains(i))
            .count()
    };
    // Polled, bounded: the fds go a moment after the log line.
    let deadline = Instant::now() + SOON;
    while (held("0005") > 0 || socket_inodes(pid1).contains(&listener)) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(held("0005"), 0, "PID 1 keeps a SEQPACKET channel");
    assert!(
        !socket_inodes(pid1).contains(&listener),
        "PID 1 keeps the listener"
    );
    let inside = descendants(unshare.pid);
    signal(pid1, Signal::TERM);
    assert_eq!(unshare.wait(SOON), Some(0));
    assert_none_left(inside.into_iter().chain([unshare.pid]));
}

// ---------------------------------------------------------------------------------------------
// Point 7: the signal state crosses a restart unchanged.

/// Started with `SIGINT` ignored (a background job's) and `SIGALRM` blocked, the server
/// handles `SIGINT` itself; its successor still starts with `SIGINT` ignored and the same mask
/// (before: `SIGINT` reset to its default, the mask emptied).
#[test]
fn a_signal_ignored_or_blocked_at_start_is_so_in_the_successor() {
    let dir = scratch_dir("signal-state");
    let notify = NotifySocket::new();
    let exe = deploy_copy("hello", &dir);
    let server = Spawn::new(&exe)
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &notify.path)
        .signal_state(&[libc::SIGINT], &[libc::SIGALRM])
        .start();
    server.listen_line();
    notify.wait_line("READY=1", SOON);
    let old = server.pid;
    let status = std::fs::read_to_string(format!("/proc/{old}/status")).expect("status");
    let blocked = status_mask(&status, "SigBlk");
    assert_ne!(blocked & bit(libc::SIGALRM), 0, "{status}");
    assert_ne!(
        status_mask(&status, "SigCgt") & bit(libc::SIGINT),
        0,
        "handover handles SIGINT: {status}"
    );
    // The successor's mask, from the successor itself.
    let new = restart_once(&notify, old, 1);
    let status = std::fs::read_to_string(format!("/proc/{new}/status")).expect("status");
    assert_eq!(
        status_mask(&status, "SigBlk"),
        blocked,
        "the successor's mask: {status}"
    );
    // Its own successor records the state it was started with (a shell keeps a signal ignored
    // on entry ignored; it may clear its mask), then runs the real binary: SIGINT is still
    // ignored after two restarts.
    let record = dir.join("successor-status");
    replace_with_script(
        &exe,
        &format!(
            "cat /proc/$$/status > '{}'\nexec '{}' \"$@\"",
            record.display(),
            example("hello").display()
        ),
    );
    let third = restart_once(&notify, new, 2);
    let recorded = std::fs::read_to_string(&record).expect("the successor's status");
    assert_ne!(
        status_mask(&recorded, "SigIgn") & bit(libc::SIGINT),
        0,
        "SIGINT ignored in the successor: {recorded}"
    );
    wait_exit(new, SOON);
    let new = third;
    signal(new, Signal::TERM);
    assert_eq!(wait_exit(new, SOON), Some(0));
    assert_none_left([old, new]);
    let _ = std::fs::remove_dir_all(&dir);
}
