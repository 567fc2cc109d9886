//! Processes and what the kernel says about them: building and starting the example servers,
//! pidfds (signal, wait, reap without pid reuse races), a real `NOTIFY_SOCKET` receiver that
//! timestamps every datagram, `/proc` readings (RSS, CPU time), and resource limits.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

/// Generous bound for anything that should take milliseconds.
pub(crate) const SOON: Duration = Duration::from_secs(15);

/// Builds an example in release mode (when the bench itself is built so, as by `cargo bench`)
/// and returns its path. Same profile and target directory as the bench: the dependencies
/// `cargo bench` just built are reused.
pub(crate) fn build_example(name: &str) -> PathBuf {
    // Prebuilt examples (a machine without cargo: a many-core box the release binaries were
    // copied to).
    if let Some(dir) = std::env::var_os("HANDOVER_BENCH_EXAMPLES_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let built = escargot::CargoBuild::new()
        .example(name)
        .current_release()
        .run()
        .unwrap_or_else(|e| panic!("building example {name}: {e}"));
    built.path().to_path_buf()
}

/// Like [`build_example`], for an example that needs cargo `features` (space-separated: its
/// `required-features` and what it is used with).
pub(crate) fn build_example_with(name: &str, features: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("HANDOVER_BENCH_EXAMPLES_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let mut build = escargot::CargoBuild::new()
        .example(name)
        .current_release()
        .features(features);
    // Under `cargo test` (`tests/bench_smoke.rs`), built as `tests/support` builds it (for the
    // current target, with the same features), so that the build `tests/websocket.rs` made is
    // reused instead of compiling the crate once more; under `cargo bench`, in the release tree
    // the other examples were built in (a `--target` build would compile every dependency again).
    if cfg!(debug_assertions) {
        build = build.current_target();
    }
    let built = build
        .run()
        .unwrap_or_else(|e| panic!("building example {name} with features {features:?}: {e}"));
    built.path().to_path_buf()
}

/// Makes this process a child subreaper: a server that restarts hands over to its child and
/// exits, and the child is re-parented to us, so we can wait for it and reap it.
pub(crate) fn become_subreaper() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .expect("PR_SET_CHILD_SUBREAPER");
}

/// Raises `RLIMIT_NOFILE` to `want` (children inherit it), or as far as the hard limit allows.
/// Returns the soft limit now in force.
pub(crate) fn raise_nofile(want: u64) -> u64 {
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

// ---------------------------------------------------------------------------------------------
// Processes.

/// Every process the bench started or learned about (restart children), each with a pidfd, so
/// that signalling and reaping can never hit a recycled pid, and nothing is left behind.
#[derive(Default)]
pub(crate) struct Registry {
    procs: Mutex<Vec<Proc>>,
}

/// A process we track, through its pidfd.
#[derive(Clone)]
pub(crate) struct Proc {
    pub(crate) pid: u32,
    fd: Arc<OwnedFd>,
}

/// How and when a process ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exit {
    /// When the pidfd reported the exit.
    pub(crate) at: Instant,
    /// The exit code; `None` if killed by a signal or not ours to reap.
    pub(crate) code: Option<i32>,
}

/// A server process started by the bench, with its output and address.
pub(crate) struct Server {
    pub(crate) proc: Proc,
    pub(crate) lines: Lines,
    pub(crate) addr: SocketAddr,
}

impl Registry {
    /// Starts `program` with `args`, extra `env`, and servers' log level `log`; returns once it
    /// printed its `listen on: http://ADDR, pid: PID` line.
    pub(crate) fn start_server(
        &self,
        program: &Path,
        env: &[(&str, &OsStr)],
        log: &str,
    ) -> Result<Server, String> {
        // `HANDOVER_BENCH_SERVER_CPUS=0-7`: servers pinned to those CPUs (with `taskset`, which
        // execs the server in the same process), the load generator left to the others.
        match std::env::var("HANDOVER_BENCH_SERVER_CPUS") {
            Ok(cpus) if !cpus.is_empty() => {
                let wrapper = [OsStr::new("taskset"), OsStr::new("-c"), OsStr::new(&cpus)];
                self.start_server_under(&wrapper, program, env, log)
            }
            _ => self.start_server_under(&[], program, env, log),
        }
    }

    /// Like [`Registry::start_server`], with `program` run by `wrapper` (a command and its
    /// arguments, e.g. `valgrind --tool=callgrind`), which must exec it in the same process:
    /// the pid we track and signal is the server's.
    pub(crate) fn start_server_under(
        &self,
        wrapper: &[&OsStr],
        program: &Path,
        env: &[(&str, &OsStr)],
        log: &str,
    ) -> Result<Server, String> {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.arg("127.0.0.1:0")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("HANDOVER_NOTIFY_SOCKET")
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Not waited for through `Child`: the pidfd opened right away (the child cannot be
        // reaped before that, so its pid is still its own) is used to wait and reap.
        #[allow(clippy::zombie_processes)]
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        let proc = match self.track(child.id()) {
            Ok(p) => p,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let lines = Lines::default();
        if let Some(out) = child.stdout.take() {
            lines.collect(out);
        }
        if let Some(err) = child.stderr.take() {
            lines.collect(err);
        }
        let line = lines.wait_for("listen on:", SOON).ok_or_else(|| {
            format!(
                "{} (pid {}) printed no `listen on:` line; it said:\n{}",
                program.display(),
                proc.pid,
                lines.tail(20)
            )
        })?;
        let addr = addr_in(&line)?;
        // Under a wrapper, the pid the server prints must be the one we track (the wrapper
        // exec'd it in place), or we would signal and measure the wrong process.
        if let Some(printed) = pid_in(&line) {
            if printed != proc.pid {
                return Err(format!(
                    "{} says it is pid {printed}, but the process started is pid {}",
                    program.display(),
                    proc.pid
                ));
            }
        }
        Ok(Server { proc, lines, addr })
    }

    /// Opens a pidfd for `pid` and tracks it. The caller must know `pid` cannot have been
    /// reaped yet (our unreaped child, or the announced successor of a live process).
    pub(crate) fn track(&self, pid: u32) -> Result<Proc, String> {
        let raw = Pid::from_raw(pid as i32).ok_or_else(|| format!("bad pid {pid}"))?;
        let fd = rustix::process::pidfd_open(raw, PidfdFlags::empty())
            .map_err(|e| format!("pidfd_open({pid}): {e}"))?;
        let proc = Proc {
            pid,
            fd: Arc::new(fd),
        };
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(proc.clone());
        Ok(proc)
    }

    /// Kills (SIGKILL) and reaps every tracked process still running; returns their pids,
    /// which should be none: every scenario ends its own processes.
    pub(crate) fn cleanup(&self) -> Vec<u32> {
        let procs = std::mem::take(&mut *self.procs.lock().unwrap_or_else(|p| p.into_inner()));
        let mut left = Vec::new();
        for p in procs {
            if !p.has_exited() {
                left.push(p.pid);
                let _ = p.signal(Signal::KILL);
            }
            // Reaps it (a no-op if already reaped, or not ours).
            let _ = p.wait_exit(Duration::from_secs(5));
        }
        left
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let left = self.cleanup();
        if !left.is_empty() {
            eprintln!("killed processes left behind: {left:?}");
        }
    }
}

impl Proc {
    pub(crate) fn signal(&self, sig: Signal) -> Result<(), String> {
        rustix::process::pidfd_send_signal(self.fd.as_fd(), sig)
            .map_err(|e| format!("signal {sig:?} to pid {}: {e}", self.pid))
    }

    /// Waits (event-driven, on the pidfd) for the process to exit, and reaps it if it is our
    /// child (directly, or re-parented to us as subreaper).
    pub(crate) fn wait_exit(&self, timeout: Duration) -> Result<Exit, String> {
        if !poll_in(&self.fd, timeout) {
            return Err(format!(
                "process {} did not exit within {timeout:?}",
                self.pid
            ));
        }
        let at = Instant::now();
        let code = match rustix::process::waitid(
            WaitId::PidFd(self.fd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(status)) => status.exit_status(),
            _ => None,
        };
        Ok(Exit { at, code })
    }

    /// Whether the process has exited (without reaping it).
    pub(crate) fn has_exited(&self) -> bool {
        poll_in(&self.fd, Duration::ZERO)
    }
}

/// Polls `fd` for readability (a pidfd: the process exited) for up to `timeout`.
fn poll_in(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Live (not zombie) processes whose parent is this process, e.g. a restarted server that was
/// re-parented to us and never tracked. Zombies among them are reaped.
pub(crate) fn live_children() -> Vec<u32> {
    let me = std::process::id();
    let mut live = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return live;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        if field("PPid:").parse::<u32>().ok() != Some(me) {
            continue;
        }
        if field("State:").starts_with('Z') {
            if let Some(raw) = Pid::from_raw(pid as i32) {
                let _ = rustix::process::waitpid(Some(raw), rustix::process::WaitOptions::NOHANG);
            }
        } else {
            live.push(pid);
        }
    }
    live
}

// ---------------------------------------------------------------------------------------------
// Output of a process.

/// The last lines a process printed (stdout and stderr, ANSI colours removed).
#[derive(Clone, Default)]
pub(crate) struct Lines(Arc<(Mutex<VecDeque<String>>, Condvar)>);

const KEEP_LINES: usize = 5_000;

impl Lines {
    fn collect(&self, stream: impl Read + Send + 'static) {
        let lines = self.clone();
        // Ends when every process holding the pipe (restart children inherit it) has exited.
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let clean = strip_ansi(&line);
                if std::env::var_os("HANDOVER_BENCH_ECHO").is_some() {
                    eprintln!("| {clean}");
                }
                let (m, cv) = &*lines.0;
                let mut kept = m.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() == KEEP_LINES {
                    kept.pop_front();
                }
                kept.push_back(clean);
                cv.notify_all();
            }
        });
    }

    /// Waits for a line containing `needle`; returns it, or `None` at the timeout.
    pub(crate) fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut lines = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = cv
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The last `n` lines, one per line, for error messages.
    pub(crate) fn tail(&self, n: usize) -> String {
        let lines = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        let skip = lines.len().saturating_sub(n);
        lines
            .iter()
            .skip(skip)
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
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

/// Parses the `pid: PID` of a `listen on:` line.
fn pid_in(line: &str) -> Option<u32> {
    line.rsplit_once("pid:")?.1.trim().parse().ok()
}

/// Parses `http://IP:PORT` out of a `listen on:` line.
fn addr_in(line: &str) -> Result<SocketAddr, String> {
    let start = line
        .find("http://")
        .ok_or_else(|| format!("no address in {line:?}"))?
        + "http://".len();
    let rest = &line[start..];
    // `http://IP:PORT, pid: N`, or `http://IP:PORT (NAME), pid: N`.
    let end = rest.find([',', ' ']).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .map_err(|e| format!("bad address in {line:?}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// NOTIFY_SOCKET.

/// One sd_notify datagram: who sent it (`SCM_CREDENTIALS`), what it said, when it arrived.
#[derive(Debug, Clone)]
pub(crate) struct Notice {
    pub(crate) pid: u32,
    pub(crate) text: String,
    pub(crate) at: Instant,
}

impl Notice {
    pub(crate) fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    pub(crate) fn mainpid(&self) -> Option<u32> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix("MAINPID="))
            .and_then(|p| p.parse().ok())
    }
}

type Notices = Arc<(Mutex<Vec<Notice>>, Condvar)>;

/// A real `NOTIFY_SOCKET` (a datagram socket with `SO_PASSCRED`) that records every message
/// with the time it was received.
pub(crate) struct NotifySocket {
    pub(crate) path: PathBuf,
    got: Notices,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotifySocket {
    pub(crate) fn new() -> NotifySocket {
        let dir = std::env::temp_dir().join(format!("handover-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the notify socket directory");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        rustix::net::sockopt::set_socket_passcred(&sock, true).expect("SO_PASSCRED");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("notify socket read timeout");
        let got: Notices = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (Arc::clone(&got), Arc::clone(&stop));
        let thread = std::thread::spawn(move || receive(&sock, &g, &s));
        NotifySocket {
            path,
            got,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits for the first message (received so far or later) that satisfies `pred`.
    pub(crate) fn wait(&self, timeout: Duration, pred: impl Fn(&Notice) -> bool) -> Option<Notice> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.got;
        let mut got = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(n) = got.iter().find(|n| pred(n)) {
                return Some(n.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            got = cv
                .wait_timeout(got, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn receive(sock: &UnixDatagram, got: &Notices, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
        let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let msg = match rustix::net::recvmsg(
            sock,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            rustix::net::RecvFlags::empty(),
        ) {
            Ok(m) => m,
            Err(_) => continue, // the read timeout: check `stop`
        };
        let at = Instant::now();
        let mut pid = 0;
        for c in control.drain() {
            if let rustix::net::RecvAncillaryMessage::ScmCredentials(cred) = c {
                pid = cred.pid.as_raw_nonzero().get() as u32;
            }
        }
        let text = String::from_utf8_lossy(&buf[..msg.bytes]).into_owned();
        let (m, cv) = &**got;
        m.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Notice { pid, text, at });
        cv.notify_all();
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A single request, and /proc readings.

/// One `GET /` on a new connection (`Connection: close`); returns the `x-pid` that answered.
pub(crate) fn get(addr: SocketAddr) -> Result<u32, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(SOON))
        .map_err(|e| format!("read timeout: {e}"))?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .map_err(|e| format!("write to {addr}: {e}"))?;
    let mut response = String::new();
    s.read_to_string(&mut response)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    if !response.starts_with("HTTP/1.1 200") || !response.ends_with("Hello world") {
        return Err(format!("unexpected response from {addr}: {response:?}"));
    }
    response
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-pid")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| format!("no x-pid in {response:?}"))
}

/// Resident set size of `pid`, in KiB (`VmRSS` in `/proc/PID/status`).
pub(crate) fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS for pid {pid}"))
}

/// CPU time used so far by the live threads of `pid`, in ns (`/proc/PID/task/*/schedstat`).
pub(crate) fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Open file descriptors of `pid`.
pub(crate) fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// nproc, CPU model and kernel, for the report.
pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("nproc {cpus}, CPU {model}, Linux {kernel}")
}

/// The load average line, to judge how busy the machine was.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// How many ephemeral ports `connect` can pick from.
pub(crate) fn ephemeral_ports() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| {
            let mut it = r.split_whitespace().map(|v| v.parse::<u32>().ok());
            let (lo, hi) = (it.next()??, it.next()??);
            Some(hi.saturating_sub(lo) + 1)
        })
        .unwrap_or(28_232)
}
