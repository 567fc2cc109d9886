//! Real parts for the integration tests: example binaries as processes, a real `NOTIFY_SOCKET`
//! receiver that records the sender's pid, HTTP/1.1 and HTTP/2 clients over loopback, a bounded
//! keep-alive load, and process bookkeeping so that no test leaves a process behind.
//!
//! The test process makes itself a child subreaper: a server that restarts hands over to a
//! child and exits, and that child is re-parented to the test, which can then wait for it and
//! check its exit status like any other child.

#![allow(dead_code)] // each test file uses a different part
#![allow(unreachable_pub)] // a module shared by test crates, not an API

pub mod idle;
pub mod proxy;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

/// Generous bound for anything that should take milliseconds.
pub const SOON: Duration = Duration::from_secs(15);

/// Path of a built example binary (built once per test process).
pub fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<std::collections::HashMap<String, PathBuf>>> = OnceLock::new();
    let map = BUILT.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(name) {
        return p.clone();
    }
    let mut build = escargot::CargoBuild::new()
        .example(name)
        .current_release()
        .current_target();
    if let Some(features) = features_of(name) {
        build = build.features(features);
    }
    let built = build
        .run()
        .unwrap_or_else(|e| panic!("building example {name}: {e}"));
    let path = built.path().to_path_buf();
    map.insert(name.to_string(), path.clone());
    path
}

/// The cargo features an example needs (its `required-features`).
fn features_of(example: &str) -> Option<&'static str> {
    match example {
        // The metrics feature too: tests/metrics.rs reads the example's /metrics.
        "axum" => Some("axum metrics"),
        "tls" => Some("rustls"),
        "websocket" => Some("axum rustls"),
        _ => None,
    }
}

/// Makes the test process a child subreaper (once).
pub fn subreaper() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .expect("PR_SET_CHILD_SUBREAPER");
    });
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "handover-test-{}-{}-{tag}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------------------------------------
// Lines printed by a process.

/// Lines a process printed (stdout and stderr, ANSI colours removed), awaited by condition.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Lines {
    fn collect(&self, stream: impl Read + Send + 'static) {
        let lines = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let clean = strip_ansi(&line);
                if std::env::var_os("HANDOVER_TEST_ECHO").is_some() {
                    eprintln!("| {clean}");
                }
                let (m, cv) = &*lines.0;
                m.lock().unwrap_or_else(|p| p.into_inner()).push(clean);
                cv.notify_all();
            }
        });
    }

    pub fn all(&self) -> Vec<String> {
        self.0.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for a line containing `needle`; returns it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_count(needle, 1, timeout)
    }

    /// Waits until `count` lines contain `needle`; returns the last.
    pub fn wait_count(&self, needle: &str, count: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut lines = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let found: Vec<&String> = lines.iter().filter(|l| l.contains(needle)).collect();
            if found.len() >= count {
                return found[count - 1].clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out waiting for {count} line(s) containing {needle:?}; got:\n{}",
                    lines.join("\n")
                );
            }
            lines = cv
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Whether a line containing `needle` shows up within `timeout` (no panic).
    pub fn eventually(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut lines = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if lines.iter().any(|l| l.contains(needle)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            lines = cv
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Index of the first line containing `needle`.
    pub fn position(&self, needle: &str) -> Option<usize> {
        self.all().iter().position(|l| l.contains(needle))
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// A process started by a test, in a process group of its own. Dropping it kills the whole
/// group (the process and every successor a restart started, which inherit the group) and
/// reaps them, so even a failing test leaves nothing behind.
pub struct Proc {
    pub pid: u32,
    pub lines: Lines,
    reaped: bool,
}

/// How to start a server process.
pub struct Spawn {
    cmd: Command,
}

impl Spawn {
    pub fn new(program: impl AsRef<std::ffi::OsStr>) -> Spawn {
        subreaper();
        let mut cmd = Command::new(program);
        cmd.env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        Spawn { cmd }
    }

    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Spawn {
        self.cmd.arg(a);
        self
    }

    pub fn env(mut self, k: impl AsRef<std::ffi::OsStr>, v: impl AsRef<std::ffi::OsStr>) -> Spawn {
        self.cmd.env(k, v);
        self
    }

    pub fn env_remove(mut self, k: &str) -> Spawn {
        self.cmd.env_remove(k);
        self
    }

    /// Places `fd` at fd 3 in the child (for feeding hand-made "inherited" fds).
    pub fn fd3(mut self, fd: OwnedFd) -> Spawn {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        // SAFETY: dup2 is async-signal-safe; `fd` is moved into the closure and stays open
        // until the Command is dropped, after the fork.
        unsafe {
            self.cmd.pre_exec(move || {
                let _keep = &fd;
                // dup2(3, 3) would keep close-on-exec set: clear it instead.
                let r = if raw == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(raw, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self
    }

    /// Places `fds` at 3, 4, ... in the child, as a service manager passes `LISTEN_FDS`.
    pub fn fds_from_3(mut self, fds: Vec<OwnedFd>) -> Spawn {
        let raws: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        // SAFETY: fcntl and dup2 are async-signal-safe; `fds` is moved into the closure and
        // stays open until the Command is dropped, after the fork. Every source is first moved
        // above the targets, so that placing one never overwrites another.
        unsafe {
            self.cmd.pre_exec(move || {
                let _keep = &fds;
                let mut high = [0i32; 16];
                assert!(raws.len() <= high.len(), "at most 16 fds");
                for (i, raw) in raws.iter().enumerate() {
                    high[i] = libc::fcntl(*raw, libc::F_DUPFD, 100);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, h) in high[..raws.len()].iter().enumerate() {
                    if libc::dup2(*h, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(*h);
                }
                Ok(())
            });
        }
        self
    }

    /// Sets the child's `RLIMIT_NOFILE` (to provoke `EMFILE`).
    pub fn nofile(mut self, limit: u64) -> Spawn {
        // SAFETY: setrlimit is a plain syscall, async-signal-safe.
        unsafe {
            self.cmd.pre_exec(move || {
                let rl = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self
    }

    /// Starts the process with the signals `ignore` ignored and `block` blocked, as `nohup`,
    /// a background job or a parent's mask would leave them.
    pub fn signal_state(mut self, ignore: &[i32], block: &[i32]) -> Spawn {
        let (ignore, block) = (ignore.to_vec(), block.to_vec());
        // SAFETY: signal, sigemptyset, sigaddset and sigprocmask are async-signal-safe; the
        // vectors were allocated before the fork and are only read.
        unsafe {
            self.cmd.pre_exec(move || {
                for &sig in &ignore {
                    if libc::signal(sig, libc::SIG_IGN) == libc::SIG_ERR {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for &sig in &block {
                    libc::sigaddset(&mut set, sig);
                }
                if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self
    }

    pub fn start(mut self) -> Proc {
        // Not waited for through `Child`: `Proc` reaps it by pid (see `wait_exit`), including
        // when it is dropped.
        #[allow(clippy::zombie_processes)]
        let mut child = self.cmd.spawn().expect("spawn test process");
        let lines = Lines::default();
        lines.collect(child.stdout.take().expect("stdout"));
        lines.collect(child.stderr.take().expect("stderr"));
        Proc {
            pid: child.id(),
            lines,
            reaped: false,
        }
    }
}

impl Proc {
    pub fn signal(&self, sig: Signal) {
        signal(self.pid, sig);
    }

    /// Waits for the process to exit and returns its exit code (None: killed by a signal).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let status = wait_exit(self.pid, timeout);
        self.reaped = true;
        status
    }

    /// The pid from the `listen on: ..., pid: N` line, once printed.
    pub fn listen_line(&self) -> String {
        self.lines.wait_for("listen on:", SOON)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The group id is the first process's pid. Successors re-parented to the test (we are
        // a subreaper) are reaped; others are at least killed.
        let members = group_members(self.pid);
        let _ = rustix::process::kill_process_group(pid(self.pid), Signal::KILL);
        if !self.reaped {
            let _ = wait_exit(self.pid, Duration::from_secs(5));
        }
        for member in members {
            if member != self.pid {
                let _ = std::panic::catch_unwind(|| wait_exit(member, Duration::from_secs(5)));
            }
        }
    }
}

/// The pids of the processes in process group `pgid` (from /proc).
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // After "comm)": state ppid pgrp ...
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) {
            out.push(p);
        }
    }
    out
}

fn pid(p: u32) -> Pid {
    Pid::from_raw(p as i32).expect("pid > 0")
}

pub fn signal(p: u32, sig: Signal) {
    rustix::process::kill_process(pid(p), sig).unwrap_or_else(|e| panic!("kill -{sig:?} {p}: {e}"));
}

/// `systemd-socket-activate -l LISTEN [--fdname=NAME] -E NOTIFY_SOCKET=.. -E VAR=.. PROGRAM ARG`,
/// once it listens. The program starts at the first connection and keeps the tool's pid.
pub fn socket_activate(
    listen: impl AsRef<std::ffi::OsStr>,
    fdname: Option<&str>,
    notify: &NotifySocket,
    env: &[&str],
    program: &str,
    arg: &str,
) -> Proc {
    let mut spawn = Spawn::new("systemd-socket-activate").arg("-l").arg(listen);
    if let Some(name) = fdname {
        spawn = spawn.arg(format!("--fdname={name}"));
    }
    spawn = spawn
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify.path.display()));
    for var in ["RUST_LOG=info"].iter().chain(env) {
        spawn = spawn.arg("-E").arg(var);
    }
    let activator = spawn.arg(example(program)).arg(arg).start();
    activator.lines.wait_for("Listening on", SOON);
    activator
}

/// Waits (event-driven, through a pidfd) for `p` to exit; reaps it if it is our child (direct,
/// or re-parented to us as subreaper). Returns the exit code; None if killed by a signal or not
/// ours to reap.
pub fn wait_exit(p: u32, timeout: Duration) -> Option<i32> {
    let fd = match rustix::process::pidfd_open(pid(p), rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return None, // already gone and reaped
        Err(e) => panic!("pidfd_open({p}): {e}"),
    };
    let ts = rustix::event::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as i64,
    };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let ready = rustix::event::poll(&mut fds, Some(&ts)).expect("poll pidfd");
    if ready == 0 {
        panic!("process {p} did not exit within {timeout:?}");
    }
    reap(&fd)
}

fn reap(fd: &OwnedFd) -> Option<i32> {
    match rustix::process::waitid(WaitId::PidFd(fd.as_fd()), WaitIdOptions::EXITED) {
        Ok(Some(status)) => status.exit_status(),
        _ => None,
    }
}

/// Whether `p` is alive (a zombie of ours counts as gone, and is reaped).
pub fn alive(p: u32) -> bool {
    let Ok(fd) = rustix::process::pidfd_open(pid(p), rustix::process::PidfdFlags::empty()) else {
        return false;
    };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    if rustix::event::poll(&mut fds, Some(&zero)).unwrap_or(0) > 0 {
        let _ = reap(&fd);
        return false;
    }
    true
}

/// Asserts that none of `pids` is still running (killing any that is, so nothing leaks).
pub fn assert_none_left(pids: impl IntoIterator<Item = u32>) {
    let mut left = Vec::new();
    for p in pids {
        if alive(p) {
            left.push(p);
            let _ = rustix::process::kill_process(pid(p), Signal::KILL);
            let _ = wait_exit(p, Duration::from_secs(5));
        }
    }
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// CPU time (user + system) a process has used, from /proc/PID/stat.
pub fn cpu_time(p: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).expect("read stat");
    // Fields after the command (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Open fds of a process, as `fd -> link target`.
pub fn fds_of(p: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let dir = format!("/proc/{p}/fd");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let Ok(entry) = entry else { continue };
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let target = std::fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((fd, target));
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// NOTIFY_SOCKET.

/// One sd_notify datagram, with the pid the kernel says sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub pid: u32,
    pub text: String,
    /// How many fds came with it (`SCM_RIGHTS`); they are closed on receipt.
    pub fds: usize,
}

impl Notice {
    pub fn lines(&self) -> Vec<&str> {
        self.text.lines().collect()
    }
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }
}

/// A real `NOTIFY_SOCKET`: a datagram socket with `SO_PASSCRED`, recording every message.
/// [`NotifySocket::pause`] stops it reading (a busy service manager), so that its kernel
/// queue fills; [`NotifySocket::resume`] reads on.
pub struct NotifySocket {
    pub path: PathBuf,
    got: Arc<(Mutex<Vec<Notice>>, Condvar)>,
    stop: Arc<AtomicBool>,
    pause: Arc<(Mutex<Pause>, Condvar)>,
}

/// The reader's pause switch: `paused` is the request, `parked` the reader's answer (it is
/// not inside `recvmsg`, and will not read until resumed).
#[derive(Default)]
struct Pause {
    paused: bool,
    parked: bool,
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let dir = scratch_dir("notify");
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        rustix::net::sockopt::set_socket_passcred(&sock, true).expect("SO_PASSCRED");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let got: Arc<(Mutex<Vec<Notice>>, Condvar)> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let pause: Arc<(Mutex<Pause>, Condvar)> = Default::default();
        let (g, s, p) = (got.clone(), stop.clone(), pause.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                {
                    let (m, cv) = &*p;
                    let mut state = m.lock().unwrap_or_else(|e| e.into_inner());
                    while state.paused && !s.load(Ordering::Relaxed) {
                        state.parked = true;
                        cv.notify_all();
                        // Timed, so that a dropped socket (`stop`) ends the thread.
                        state = cv
                            .wait_timeout(state, Duration::from_millis(100))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    state.parked = false;
                }
                let mut space = [std::mem::MaybeUninit::uninit();
                    rustix::cmsg_space!(ScmCredentials(1), ScmRights(16))];
                let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
                let msg = match rustix::net::recvmsg(
                    &sock,
                    &mut [std::io::IoSliceMut::new(&mut buf)],
                    &mut control,
                    rustix::net::RecvFlags::empty(),
                ) {
                    Ok(m) => m,
                    Err(_) => continue, // timeout: check `stop`
                };
                let mut pid = 0;
                let mut fds = 0;
                for c in control.drain() {
                    match c {
                        rustix::net::RecvAncillaryMessage::ScmCredentials(cred) => {
                            pid = cred.pid.as_raw_nonzero().get() as u32;
                        }
                        rustix::net::RecvAncillaryMessage::ScmRights(received) => {
                            fds += received.count(); // each OwnedFd closes as it is dropped
                        }
                        _ => {}
                    }
                }
                let text = String::from_utf8_lossy(&buf[..msg.bytes]).into_owned();
                let (m, cv) = &*g;
                m.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Notice { pid, text, fds });
                cv.notify_all();
            }
        });
        NotifySocket {
            path,
            got,
            stop,
            pause,
        }
    }

    /// Stops reading; returns once the reader is parked (so nothing more is read until
    /// [`NotifySocket::resume`]).
    pub fn pause(&self) {
        let (m, cv) = &*self.pause;
        let mut state = m.lock().unwrap_or_else(|e| e.into_inner());
        state.paused = true;
        let deadline = Instant::now() + SOON;
        while !state.parked {
            let now = Instant::now();
            assert!(now < deadline, "the notify reader did not park");
            state = cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reads on, the queued messages first.
    pub fn resume(&self) {
        let (m, cv) = &*self.pause;
        m.lock().unwrap_or_else(|e| e.into_inner()).paused = false;
        cv.notify_all();
    }

    /// Fills the (paused) socket's kernel queue from another socket of the test's, with
    /// `FILLER=1` datagrams, until the kernel refuses more (`EAGAIN`:
    /// `net.unix.max_dgram_qlen` reached). Returns how many went in.
    pub fn fill(&self) -> usize {
        let filler = UnixDatagram::unbound().expect("filler socket");
        filler.set_nonblocking(true).expect("non-blocking");
        for sent in 0..100_000 {
            match filler.send_to(b"FILLER=1\n", &self.path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(sent > 0, "the queue was full before any filler");
                    return sent;
                }
                Err(e) => panic!("filling the notify queue: {e}"),
            }
        }
        panic!("the notify queue never filled");
    }

    /// Sends a marker datagram and waits until it is read: everything queued before it has
    /// been read too (a datagram queue is FIFO).
    pub fn sync(&self) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let marker = format!("MARKER={}\n", SEQ.fetch_add(1, Ordering::Relaxed));
        let sender = UnixDatagram::unbound().expect("marker socket");
        sender.set_write_timeout(Some(SOON)).expect("write timeout");
        sender
            .send_to(marker.as_bytes(), &self.path)
            .expect("send marker");
        self.wait_nth(1, SOON, |n| n.text == marker);
    }

    pub fn all(&self) -> Vec<Notice> {
        self.got.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for the `n`-th (1-based) message that satisfies `pred`.
    pub fn wait_nth(&self, n: usize, timeout: Duration, pred: impl Fn(&Notice) -> bool) -> Notice {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.got;
        let mut got = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let found: Vec<&Notice> = got.iter().filter(|x| pred(x)).collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out waiting for sd_notify message #{n}; got: {:#?}",
                    *got
                );
            }
            got = cv
                .wait_timeout(got, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for a message containing the line `line`.
    pub fn wait_line(&self, line: &str, timeout: Duration) -> Notice {
        self.wait_nth(1, timeout, |n| n.has(line))
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.resume();
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP clients.

/// A response as the tests see it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub pid: u32,
    pub body: String,
    pub connection_close: bool,
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("test runtime")
}

/// One HTTP/1.1 GET on a new connection.
pub fn get(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    runtime().block_on(async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        get_on(stream, addr, path).await
    })
}

/// One HTTP/1.1 request with `method` on a new connection.
pub fn request(addr: SocketAddr, method: &str, path: &str) -> Result<Reply, String> {
    let method = hyper::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    runtime().block_on(async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        reply(resp).await
    })
}

/// `GET path` over a plain socket with `Connection: close`; returns the client's local port,
/// the status code and the body (for checks against what the server saw of the client).
pub fn get_from_port(addr: SocketAddr, path: &str) -> Result<(u16, u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(SOON)).map_err(|e| e.to_string())?;
    let port = s.local_addr().map_err(|e| e.to_string())?.port();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {answer:?}"))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((port, status, body))
}

/// One HTTP/1.1 GET on a new connection to a Unix socket.
pub fn get_unix(socket: &Path, path: &str) -> Result<Reply, String> {
    runtime().block_on(async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        get_on(stream, SocketAddr::from(([127, 0, 0, 1], 80)), path).await
    })
}

async fn get_on<S>(stream: S, addr: SocketAddr, path: &str) -> Result<Reply, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    send(&mut sender, addr, path).await
}

/// Sends one request on an HTTP/1 connection.
pub async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> Result<Reply, String> {
    let req = hyper::Request::get(format!("http://{addr}{path}"))
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    reply(resp).await
}

async fn reply(resp: hyper::Response<hyper::body::Incoming>) -> Result<Reply, String> {
    let status = resp.status().as_u16();
    let pid = resp
        .headers()
        .get("x-pid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let connection_close = resp
        .headers()
        .get("connection")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status,
        pid,
        body: String::from_utf8_lossy(&body).into_owned(),
        connection_close,
    })
}

/// One HTTP/2 (prior knowledge) GET on a new connection.
pub fn get_h2(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    runtime().block_on(async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = hyper::Request::get(format!("http://{addr}{path}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if resp.version() != hyper::Version::HTTP_2 {
            return Err(format!("expected HTTP/2, got {:?}", resp.version()));
        }
        reply(resp).await
    })
}

/// Starts a GET on a thread and returns its handle (for requests in flight across a signal).
pub fn get_in_background(
    addr: SocketAddr,
    path: &str,
    h2: bool,
) -> std::thread::JoinHandle<Result<Reply, String>> {
    let path = path.to_string();
    std::thread::spawn(move || {
        if h2 {
            get_h2(addr, &path)
        } else {
            get(addr, &path)
        }
    })
}

/// Raw TCP: sends `bytes` and keeps the connection open (slowloris and friends).
pub fn raw_connect(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(bytes).expect("write");
    s
}

// ---------------------------------------------------------------------------------------------
// Load.

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    pub pids: BTreeSet<u32>,
    pub reconnects: u64,
    /// Requests never written because their connection ended first, sent again.
    pub retried: u64,
}

/// Keep-alive clients that send requests until stopped (bounded by `max_per_conn` requests and
/// `max_time`). A connection closed by the server *after* a `Connection: close` response, or
/// found closed before a request was written, is reopened without counting a failure, as a
/// real client pool does; any request that was sent and got no complete response is a failure.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<LoadReport>,
    seen: Seen,
}

type Seen = Arc<(Mutex<BTreeSet<u32>>, Condvar)>;

impl Load {
    pub fn start(
        addr: SocketAddr,
        connections: usize,
        path: &'static str,
        max_time: Duration,
    ) -> Load {
        Load::start_with(addr, connections, path, max_time, false)
    }

    /// The same over HTTP/2 (prior knowledge): a connection that got GOAWAY is not ready for
    /// new streams and is replaced; a stream that was sent and failed is a failure.
    pub fn start_h2(
        addr: SocketAddr,
        connections: usize,
        path: &'static str,
        max_time: Duration,
    ) -> Load {
        Load::start_with(addr, connections, path, max_time, true)
    }

    fn start_with(
        addr: SocketAddr,
        connections: usize,
        path: &'static str,
        max_time: Duration,
        h2: bool,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Seen = Default::default();
        let (s, seen2) = (stop.clone(), seen.clone());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("load runtime");
            rt.block_on(async move {
                let deadline = tokio::time::Instant::now() + max_time;
                let mut tasks = Vec::new();
                for _ in 0..connections {
                    let (s, seen) = (s.clone(), seen2.clone());
                    if h2 {
                        tasks.push(tokio::spawn(client_h2(addr, path, s, deadline, seen)));
                    } else {
                        tasks.push(tokio::spawn(client(addr, path, s, deadline, seen)));
                    }
                }
                let mut total = LoadReport::default();
                for t in tasks {
                    if let Ok(r) = t.await {
                        total.ok += r.ok;
                        total.failed += r.failed;
                        total.reconnects += r.reconnects;
                        total.retried += r.retried;
                        total.errors.extend(r.errors);
                        total.pids.extend(r.pids);
                    }
                }
                total
            })
        });
        Load { stop, handle, seen }
    }

    /// Waits until some response came from `pid`.
    pub fn wait_pid(&self, pid: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.seen;
        let mut seen = m.lock().unwrap_or_else(|p| p.into_inner());
        while !seen.contains(&pid) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "no response from pid {pid} within {timeout:?}"
            );
            seen = cv
                .wait_timeout(seen, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("load thread")
    }
}

const MAX_PER_CONN: u64 = 200_000;

async fn client(
    addr: SocketAddr,
    path: &'static str,
    stop: Arc<AtomicBool>,
    deadline: tokio::time::Instant,
    seen: Seen,
) -> LoadReport {
    let mut report = LoadReport::default();
    let mut sent = 0u64;
    'outer: while !stop.load(Ordering::Relaxed)
        && tokio::time::Instant::now() < deadline
        && sent < MAX_PER_CONN
    {
        let stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                report.failed += 1;
                report.errors.push(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
            {
                Ok(x) => x,
                Err(e) => {
                    report.failed += 1;
                    report.errors.push(format!("handshake: {e}"));
                    continue;
                }
            };
        tokio::spawn(conn);
        report.reconnects += 1;
        while !stop.load(Ordering::Relaxed)
            && tokio::time::Instant::now() < deadline
            && sent < MAX_PER_CONN
        {
            // A connection the server closed cleanly is not ready: reconnect, nothing was sent.
            if sender.ready().await.is_err() {
                continue 'outer;
            }
            sent += 1;
            match send(&mut sender, addr, path).await {
                Ok(r) if r.status == 200 && r.body == "Hello world" => {
                    report.ok += 1;
                    if report.pids.insert(r.pid) {
                        seen.0
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(r.pid);
                        seen.1.notify_all();
                    }
                    if r.connection_close {
                        continue 'outer;
                    }
                }
                Ok(r) => {
                    report.failed += 1;
                    report.errors.push(format!("bad reply: {r:?}"));
                }
                Err(e) => {
                    report.failed += 1;
                    report.errors.push(e);
                    continue 'outer;
                }
            }
        }
        break;
    }
    report
}

async fn client_h2(
    addr: SocketAddr,
    path: &'static str,
    stop: Arc<AtomicBool>,
    deadline: tokio::time::Instant,
    seen: Seen,
) -> LoadReport {
    let mut report = LoadReport::default();
    let mut sent = 0u64;
    'outer: while !stop.load(Ordering::Relaxed)
        && tokio::time::Instant::now() < deadline
        && sent < MAX_PER_CONN
    {
        let stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                report.failed += 1;
                report.errors.push(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (mut sender, conn) = match hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                report.failed += 1;
                report.errors.push(format!("handshake: {e}"));
                continue;
            }
        };
        tokio::spawn(conn);
        report.reconnects += 1;
        while !stop.load(Ordering::Relaxed)
            && tokio::time::Instant::now() < deadline
            && sent < MAX_PER_CONN
        {
            if sender.ready().await.is_err() {
                continue 'outer; // GOAWAY or closed: nothing was sent
            }
            let req = hyper::Request::get(format!("http://{addr}{path}"))
                .body(Empty::<Bytes>::new())
                .expect("request");
            sent += 1;
            let result = match sender.send_request(req).await {
                Ok(resp) => reply(resp).await,
                // Canceled: the connection ended before the request was written (GOAWAY raced
                // with it). Nothing reached the server; hyper-util's pooled client retries these
                // (`retry_canceled_requests`), and so do we, on a new connection.
                Err(e) if e.is_canceled() || unprocessed(&e) => {
                    sent -= 1;
                    report.retried += 1;
                    continue 'outer;
                }
                Err(e) => Err(format!(
                    "request: {e} ({:?})",
                    std::error::Error::source(&e)
                )),
            };
            match result {
                Ok(r) if r.status == 200 && r.body == "Hello world" => {
                    report.ok += 1;
                    if report.pids.insert(r.pid) {
                        seen.0
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(r.pid);
                        seen.1.notify_all();
                    }
                }
                Ok(r) => {
                    report.failed += 1;
                    report.errors.push(format!("bad reply: {r:?}"));
                }
                Err(e) => {
                    report.failed += 1;
                    report.errors.push(e);
                    continue 'outer;
                }
            }
        }
        break;
    }
    report
}

/// A stream the server's GOAWAY declared unprocessed (its id above the last stream id, reason
/// NO_ERROR): RFC 9113 section 8.7 guarantees the server did not act on it, and clients retry
/// it on a new connection. This happens when the client opened the stream after the server's
/// first GOAWAY had been sent but before it arrived.
pub fn unprocessed(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h| {
            h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR)
        })
}

/// Environment for a process: the current one plus `extra`.
pub fn envs(extra: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    extra.iter().map(|(k, v)| (k.into(), v.into())).collect()
}

/// Copies the hello example to a directory of its own, so a test can replace or delete "the
/// deployed binary" without touching the build.
pub fn deploy_copy(name: &str, dir: &Path) -> PathBuf {
    let src = example(name);
    let dst = dir.join(name);
    std::fs::copy(&src, &dst).expect("copy example");
    dst
}

/// Atomically replaces `path` with a shell script (as a deploy would, by rename).
pub fn replace_with_script(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("#!/bin/sh\n{script}\n")).expect("write script");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename over binary");
}

/// Atomically puts a copy of the real example back at `path`.
pub fn restore_binary(name: &str, path: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(example(name), &tmp).expect("copy example");
    std::fs::rename(&tmp, path).expect("rename over binary");
}

/// Waits for the `listen on:` line of the listener named `name` (`listen on: URL (NAME), pid:
/// N`, as the axum example prints them); returns the line.
pub fn listen_line_of(lines: &Lines, name: &str) -> String {
    lines.wait_for(&format!("({name}), pid:"), SOON)
}

/// The hello example on a free loopback port, reporting to `notify`, once it is ready.
pub fn ready_hello(notify: &NotifySocket) -> (Proc, SocketAddr) {
    ready_server(&example("hello"), notify)
}

/// `program` (the hello example, or a copy of it) on a free loopback port, reporting to
/// `notify`, once it is ready.
pub fn ready_server(program: &Path, notify: &NotifySocket) -> (Proc, SocketAddr) {
    let port = free_port();
    let server = Spawn::new(program)
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path)
        .start();
    let addr = addr_in(&server.listen_line());
    notify.wait_line("READY=1", SOON);
    (server, addr)
}

/// Sends `SIGUSR1` to the main process `old` and waits for the `nth` hand-off datagram, which
/// `old` must have sent; returns the new main pid it names.
pub fn restart_once(notify: &NotifySocket, old: u32, nth: usize) -> u32 {
    signal(old, rustix::process::Signal::USR1);
    let handed = notify.wait_nth(nth, SOON, |n| {
        n.has("READY=1") && n.text.contains("MAINPID=")
    });
    assert_eq!(
        handed.pid, old,
        "the old main process announces its successor"
    );
    let new = mainpid(&handed);
    assert_ne!(new, old);
    new
}

/// The `MAINPID=` of a hand-off datagram.
pub fn mainpid(notice: &Notice) -> u32 {
    notice
        .lines()
        .iter()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {notice:?}"))
}

/// Parses `pid: N` out of a `listen on:` line.
pub fn pid_in(line: &str) -> u32 {
    line.rsplit("pid: ")
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// Parses `http://IP:PORT` out of a `listen on:` line.
pub fn addr_in(line: &str) -> SocketAddr {
    let start = line
        .find("http://")
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        + 7;
    let rest = &line[start..];
    let end = rest.find([',', ' ']).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Never dark (issue 14): seccomp wrapper, socket holders, PID namespaces. In never_dark.rs.

mod never_dark;
#[allow(unused_imports)] // not every test file uses them
pub use never_dark::*;

// ---------------------------------------------------------------------------------------------
// openssl s_client, saving and resuming TLS sessions (issue 19). In openssl.rs.

mod openssl;
#[allow(unused_imports)] // not every test file uses them
pub use openssl::*;

/// Raises `RLIMIT_NOFILE` to `want` for this process and the servers it starts from now on
/// (they inherit it), or as far as the hard limit allows; returns the soft limit in force. The
/// same as the bench's `HANDOVER_BENCH_NOFILE`.
pub fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let current = now.current.unwrap_or(u64::MAX);
    if current >= want {
        return current;
    }
    let wanted = Rlimit {
        current: Some(want),
        maximum: Some(now.maximum.map_or(want, |m| m.max(want))),
    };
    if setrlimit(Resource::Nofile, wanted).is_ok() {
        return want;
    }
    // Not allowed to raise the hard limit: go up to it.
    let capped = Rlimit {
        current: now.maximum,
        maximum: now.maximum,
    };
    match setrlimit(Resource::Nofile, capped) {
        Ok(()) => now.maximum.unwrap_or(u64::MAX),
        Err(_) => current,
    }
}
