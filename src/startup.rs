//! What the process was given when it started, captured once.
//!
//! The systemd protocols speak through process-global state: environment variables
//! (`LISTEN_*`, `NOTIFY_SOCKET`, `WATCHDOG_*`) and inherited file descriptors. This module
//! reads all of it exactly once, the first time any part of handover needs it, and keeps the
//! values here so the rest of the crate never touches the environment again.
//!
//! It also records what a restart needs to start "the same program again": the path of the
//! executable, the arguments and the working directory, *as they were at start-up*, because a
//! deploy may replace the file (then `/proc/self/exe` names "... (deleted)") and the application
//! may change directory.
//!
//! Removing the variables keeps them from leaking into programs the application starts, but
//! `remove_var` is only sound while the process has a single thread. So the variables are removed
//! only when that is true (the usual case when [`crate::Listeners::from_env`] is the first thing
//! `main` calls); otherwise they are left in place and handover's own children get a clean,
//! explicitly built environment anyway.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::sys;

/// Environment variables that belong to the service-manager protocols. They are consumed at
/// start-up and never passed on as they were.
pub(crate) const PROTOCOL_VARS: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_FDS_FIRST_FD",
    "LISTEN_PIDFDID",
    "NOTIFY_SOCKET",
    UPSTREAM_NOTIFY_VAR,
    CHANNEL_VAR,
    EXCLUSIVE_VAR,
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Set by a handover parent for its restart child: the service manager's own `NOTIFY_SOCKET`,
/// which the child uses once it has reported `READY=1` to its parent on `NOTIFY_SOCKET`.
pub(crate) const UPSTREAM_NOTIFY_VAR: &str = "HANDOVER_NOTIFY_SOCKET";

/// Set by a handover parent for its restart child: the fd number (3 + `LISTEN_FDS`) of the
/// child's end of the private channel to the parent, a `SOCK_SEQPACKET` socket. The child
/// reports `READY=1` on it. Set close-on-exec at start-up, so programs the child runs do not
/// inherit it.
pub(crate) const CHANNEL_VAR: &str = "HANDOVER_CHANNEL_FD";

/// Set by a handover parent for its restart child: the fd numbers (comma-separated) of the
/// listeners that no process outside the service's own handover processes holds, because a
/// handover process bound them and never gave them to a service manager. Only those may have
/// their door shut when the service stops (see `accept`): a socket a service manager also
/// holds keeps queueing for the next start, and a door would outlive us there.
pub(crate) const EXCLUSIVE_VAR: &str = "HANDOVER_EXCLUSIVE_FDS";

/// What is known of the handover parent that started this process.
#[derive(Debug)]
enum Predecessor {
    /// Started by no handover parent.
    None,
    /// Started by one, whose pidfd could not be had: it may live.
    Unknown,
    /// Its pid, and its pidfd, taken at start-up while it waited for our `READY=1`.
    Alive(u32, OwnedFd),
    /// It exited.
    Gone,
}

/// Everything captured at start-up.
#[derive(Debug)]
pub(crate) struct Startup {
    pub(crate) pid: u32,
    /// The program to execute on restart; `Err` holds why it could not be determined.
    pub(crate) exe: Result<PathBuf, String>,
    pub(crate) args: Vec<OsString>,
    pub(crate) cwd: Option<PathBuf>,
    pub(crate) listen_fds: Option<OsString>,
    pub(crate) listen_pid: Option<OsString>,
    pub(crate) listen_fdnames: Option<OsString>,
    pub(crate) listen_fds_first_fd: Option<OsString>,
    pub(crate) notify_socket: Option<OsString>,
    pub(crate) upstream_notify_socket: Option<OsString>,
    pub(crate) watchdog_usec: Option<OsString>,
    pub(crate) watchdog_pid: Option<OsString>,
    /// The channel to a handover parent, if one passed it (`HANDOVER_CHANNEL_FD`): the fd
    /// number, or why the value is unusable.
    pub(crate) channel_fd: Option<Result<RawFd, String>>,
    /// The inherited listeners only this service's handover processes hold
    /// (`HANDOVER_EXCLUSIVE_FDS`), by fd number.
    pub(crate) exclusive_fds: Vec<RawFd>,
    /// The handover parent (the other end of the channel): while it lives, it holds the
    /// listeners too, and may serve on them (a restart rolled back) or serve again.
    predecessor: Mutex<Predecessor>,
    /// Whether the protocol variables were removed from the process environment.
    pub(crate) scrubbed: bool,
    /// The signals ignored and the signal mask as given, before handover's handlers: what a
    /// successor gets again.
    pub(crate) signals: sys::SignalState,
    /// Whether the inherited fds have been taken (they can be taken once per process).
    fds_taken: AtomicBool,
    /// The same for the channel.
    channel_taken: AtomicBool,
}

static STARTUP: OnceLock<Startup> = OnceLock::new();

/// The start-up capture, made on first use.
pub(crate) fn get() -> &'static Startup {
    STARTUP.get_or_init(capture)
}

impl Startup {
    /// Returns `true` exactly once per process: the caller now owns the inherited fds.
    pub(crate) fn take_fds(&self) -> bool {
        !self.fds_taken.swap(true, Ordering::AcqRel)
    }

    /// Whether the handover parent that started this process may still hold `socket`: then
    /// it may serve on it (a restart rolled back) or serve again, and no door may be shut on
    /// it (`accept`). It holds it while it drains after the hand-off; as PID 1 it stays on as
    /// the keeper, and lets the listeners go once its drain is over. `true` when it is not
    /// known.
    pub(crate) fn predecessor_may_hold(&self, socket: std::os::fd::BorrowedFd<'_>) -> bool {
        let mut p = self.predecessor.lock().unwrap_or_else(|p| p.into_inner());
        match &*p {
            Predecessor::None | Predecessor::Gone => false,
            Predecessor::Unknown => true,
            Predecessor::Alive(_, pidfd) if sys::has_exited(pidfd.as_fd()) => {
                *p = Predecessor::Gone;
                false
            }
            // Alive (its pidfd says so, so the pid is still its own): unreadable fds count as
            // held.
            Predecessor::Alive(pid, _) => sys::holds_socket(*pid, socket) != Some(false),
        }
    }

    /// Forgets the handover parent once its pidfd says it exited.
    fn note_predecessor_exit(&self) {
        let mut p = self.predecessor.lock().unwrap_or_else(|p| p.into_inner());
        if let Predecessor::Alive(_, pidfd) = &*p {
            if sys::has_exited(pidfd.as_fd()) {
                *p = Predecessor::Gone;
            }
        }
    }

    /// Resolves once the handover parent exited, then lets its pidfd go (a server holds no fd
    /// of the restart that started it for longer than that); `None` if there is none to watch.
    pub(crate) fn predecessor_exit(
        &'static self,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let watched = match &*self.predecessor.lock().unwrap_or_else(|p| p.into_inner()) {
            Predecessor::Alive(_, pidfd) => pidfd.try_clone().ok()?,
            _ => return None,
        };
        let watched = sys::register(watched, tokio::io::Interest::READABLE).ok()?;
        Some(async move {
            let _ = watched.readable().await;
            drop(watched);
            self.note_predecessor_exit();
        })
    }

    /// Returns the channel fd number exactly once per process (the caller then owns it), if
    /// the parent passed a usable one.
    pub(crate) fn take_channel(&self) -> Option<RawFd> {
        match &self.channel_fd {
            Some(Ok(fd)) if !self.channel_taken.swap(true, Ordering::AcqRel) => Some(*fd),
            _ => None,
        }
    }
}

fn capture() -> Startup {
    let var = |name: &str| std::env::var_os(name);
    let args: Vec<OsString> = std::env::args_os().collect();
    let cwd = working_dir();
    let exe = resolve_exe(args.first().map(OsString::as_os_str), cwd.as_deref());
    // The handover-private variables are for the process a restart started, which always has
    // `LISTEN_PID` = its own pid; anything else inherited them (a program the application
    // started, with an environment that could not be scrubbed) and must not act on them.
    let pid = std::process::id();
    // First, before any handler of ours exists.
    let signals = sys::SignalState::capture();
    let from_handover_parent =
        var("LISTEN_PID").and_then(|v| v.to_str().and_then(|v| v.parse::<u32>().ok())) == Some(pid);
    let handover_var = |name: &str| var(name).filter(|_| from_handover_parent);
    let channel_fd = handover_var(CHANNEL_VAR).map(|raw| parse_channel_fd(&raw));
    if let Some(Ok(fd)) = channel_fd {
        // First of all, so that nothing the application starts from now on inherits it.
        if let Err(e) = sys::set_cloexec_raw(fd) {
            tracing::warn!(fd, error = %e, "{CHANNEL_VAR} names an fd that is not open");
        } else {
            // Until READY=1, a failure (an error, a panic) is told to the parent.
            crate::reason::arm(fd);
            // The parent's TLS session ticket keys, queued before we started: taken now, before
            // any handshake, and off the channel whatever this build does with them.
            let keys = take_message(fd, TICKETS_KIND);
            #[cfg(feature = "rustls")]
            if let Some(keys) = keys {
                crate::tickets::adopt(&keys);
            }
            #[cfg(not(feature = "rustls"))]
            drop(keys);
        }
    }
    let startup = Startup {
        pid,
        exe,
        args,
        cwd,
        listen_fds: var("LISTEN_FDS"),
        listen_pid: var("LISTEN_PID"),
        listen_fdnames: var("LISTEN_FDNAMES"),
        listen_fds_first_fd: var("LISTEN_FDS_FIRST_FD"),
        notify_socket: var("NOTIFY_SOCKET"),
        upstream_notify_socket: handover_var(UPSTREAM_NOTIFY_VAR),
        watchdog_usec: var("WATCHDOG_USEC"),
        watchdog_pid: var("WATCHDOG_PID"),
        predecessor: Mutex::new(match &channel_fd {
            Some(Ok(fd)) => sys::dup_raw(*fd)
                .ok()
                .and_then(|dup| sys::peer_pidfd(dup.as_fd()))
                .map_or(Predecessor::Unknown, |(pid, pidfd)| {
                    Predecessor::Alive(pid, pidfd)
                }),
            Some(Err(_)) => Predecessor::Unknown,
            None => Predecessor::None,
        }),
        channel_fd,
        exclusive_fds: handover_var(EXCLUSIVE_VAR)
            .map(|raw| parse_exclusive_fds(&raw))
            .unwrap_or_default(),
        scrubbed: sys::remove_vars_if_single_threaded(PROTOCOL_VARS),
        signals,
        fds_taken: AtomicBool::new(false),
        channel_taken: AtomicBool::new(false),
    };
    if !startup.scrubbed {
        tracing::debug!(
            "other threads exist, so the LISTEN_*/NOTIFY_SOCKET/WATCHDOG_* variables stay in \
             the environment; call handover::Listeners::from_env() before starting a runtime to \
             remove them"
        );
    }
    startup
}

/// The name (`FDNAME=`) of the TLS session ticket keys in the service manager's fd store,
/// and so in `LISTEN_FDNAMES` when it gives them back (see `tickets`).
pub(crate) const TICKETS_FDNAME: &str = "handover-tickets";

/// The first line of the TLS session ticket keys message a parent queues on the channel (see
/// `tickets`).
const TICKETS_KIND: &[u8] = b"X_HANDOVER_TICKETS\n";

/// The first message queued on the channel at `fd`, taken off it if it starts with `kind`;
/// without waiting. Read through a duplicate of our own, since the channel is not owned yet.
fn take_message(fd: RawFd, kind: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    use rustix::net::RecvFlags;
    let dup = sys::dup_raw(fd).ok()?;
    let mut buf = zeroize::Zeroizing::new(vec![0u8; 512]);
    let peeked =
        rustix::net::recv(&dup, &mut buf[..], RecvFlags::DONTWAIT | RecvFlags::PEEK).ok()?;
    if !buf[..peeked.0.min(buf.len())].starts_with(kind) {
        return None;
    }
    let (len, _) = rustix::net::recv(&dup, &mut buf[..], RecvFlags::DONTWAIT).ok()?;
    buf.truncate(len);
    Some(buf)
}

/// `HANDOVER_CHANNEL_FD`: an fd number above stdio.
fn parse_channel_fd(raw: &OsStr) -> Result<RawFd, String> {
    raw.to_str()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse::<RawFd>().ok())
        .filter(|&fd| fd >= 3)
        .ok_or_else(|| {
            format!("{CHANNEL_VAR}={raw:?} is malformed: expected an fd number (decimal, >= 3)")
        })
}

/// `HANDOVER_EXCLUSIVE_FDS`: fd numbers, comma-separated (empty: none). Anything malformed
/// counts as none: a door is only ever shut on a socket known to be ours alone.
fn parse_exclusive_fds(raw: &OsStr) -> Vec<RawFd> {
    let parsed: Option<Vec<RawFd>> = raw.to_str().and_then(|t| {
        t.split(',')
            .filter(|f| !f.is_empty())
            .map(|f| f.parse::<RawFd>().ok().filter(|&fd| fd >= 3))
            .collect()
    });
    parsed.unwrap_or_else(|| {
        tracing::warn!(
            "{EXCLUSIVE_VAR}={raw:?} is malformed (expected fd numbers >= 3, comma-separated); \
             every inherited listener counts as shared"
        );
        Vec::new()
    })
}

/// The working directory as the shell names it (`$PWD`, which keeps symlinks, so a
/// `current -> release-N` deploy is followed) when that is the same directory as `getcwd()`;
/// otherwise `getcwd()`.
fn working_dir() -> Option<PathBuf> {
    let resolved = std::env::current_dir().ok()?;
    match std::env::var_os("PWD").map(PathBuf::from) {
        Some(pwd) if pwd.is_absolute() && sys::same_file(&pwd, &resolved) => Some(pwd),
        _ => Some(resolved),
    }
}

/// The executable to run on restart.
///
/// `argv[0]` is preferred when it names this very file (same device and inode as
/// `/proc/self/exe`), made absolute against the start-up directory: it keeps symlinks, so a
/// deploy that swaps a `current -> release-N` link is picked up. Otherwise the resolved
/// `current_exe()` is used. Both are fixed now, at start-up.
fn resolve_exe(argv0: Option<&OsStr>, cwd: Option<&Path>) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot resolve /proc/self/exe: {e}"))?;
    let Some(argv0) = argv0.filter(|a| a.as_bytes().contains(&b'/')) else {
        return Ok(exe);
    };
    // Components, collected again: `./target/app` under `/srv` is `/srv/target/app`.
    let candidate: PathBuf = match cwd {
        Some(cwd) => cwd.join(argv0),
        None => PathBuf::from(argv0),
    }
    .components()
    .collect();
    if candidate.is_absolute() && sys::same_file(&candidate, Path::new("/proc/self/exe")) {
        Ok(candidate)
    } else {
        Ok(exe)
    }
}
