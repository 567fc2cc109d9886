//! All `unsafe` and raw-fd work of the crate, in one place.
//!
//! What needs it:
//! - adopting the fds a service manager (or a restarting parent) handed us by number
//!   ([`adopt_inherited`], [`adopt_channel`]);
//! - shutting down connection sockets by number at a forced cut ([`shutdown_registered`]);
//! - duplicating the channel to a handover parent by number ([`dup_raw`]);
//! - reading a signal's disposition ([`has_default_disposition`]);
//! - removing environment variables, sound only while the process has one thread;
//! - starting the restart child with the listeners at fds 3.. and `LISTEN_PID` set to the
//!   child's *own* pid ([`spawn`]), which has to happen between `clone` and `execve`, where
//!   only async-signal-safe calls are allowed;
//! - reading `SCM_CREDENTIALS` as raw numbers ([`recv_with_credentials`]), signalling and
//!   reaping processes by pidfd or, for the keeper, by pid.
//!
//! Everything else in the crate works with `OwnedFd`/`BorrowedFd` and safe wrappers.

use std::ffi::{CString, OsStr, OsString, c_char, c_int};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::FileType;
use rustix::net::{AddressFamily, SocketType, sockopt};

/// Removes `vars` from the environment if, and only if, this process has exactly one thread.
/// Returns whether it did.
pub(crate) fn remove_vars_if_single_threaded(vars: &[&str]) -> bool {
    // /proc/self/task has one entry per thread. If it cannot be read we cannot prove the
    // process is single-threaded, so we leave the environment alone.
    let threads = match std::fs::read_dir("/proc/self/task") {
        Ok(dir) => dir.count(),
        Err(_) => return false,
    };
    if threads != 1 {
        return false;
    }
    for var in vars {
        // SAFETY: `remove_var` is unsound only when another thread may read or write the
        // environment at the same time. We just counted the threads of this process: there is
        // one, the caller, and no thread can be created while it is busy here.
        unsafe { std::env::remove_var(var) };
    }
    true
}

/// Whether two paths name the same file (same device and inode, symlinks followed).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Sets close-on-exec on a raw fd number that may or may not be open.
///
/// Used at start-up on every fd the protocol says we inherited, including ones we will not
/// take, so none of them leaks into programs the application starts.
pub(crate) fn set_cloexec_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFD/F_SETFD) on an integer touches no memory of ours; on an fd number
    // that is not open it fails with EBADF, which we report.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::FD_CLOEXEC == 0 {
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A close-on-exec duplicate of a raw fd number that may or may not be open (above 2), for a
/// copy of our own that outlives whoever owns the original.
///
/// Used at start-up on the private channel to a handover parent (`HANDOVER_CHANNEL_FD`), so
/// that a failure reason can still be sent after the notifier that owns the original has gone
/// ([`crate::reason`]).
pub(crate) fn dup_raw(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an integer touches no memory of ours; on an fd number that is
    // not open it fails with EBADF, which we report. The result is a new fd, ours alone.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just created by F_DUPFD_CLOEXEC and nobody else has its number.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Registers an owned fd (a pidfd, a socket, a pipe end) with the tokio reactor. On failure
/// the fd is given back with the error.
pub(crate) fn register(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> Result<tokio::io::unix::AsyncFd<OwnedFd>, (OwnedFd, io::Error)> {
    // SAFETY: an OwnedFd is open for as long as it lives and always returns the same number
    // from as_raw_fd; the AsyncFd owns it until it is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| e.into_parts())
}

/// The same for a shared fd (a pidfd that a [`crate::restart::Restarting`] also holds, to kill
/// the child synchronously when dropped).
pub(crate) fn register_shared(
    fd: std::sync::Arc<OwnedFd>,
    interest: tokio::io::Interest,
) -> Result<tokio::io::unix::AsyncFd<std::sync::Arc<OwnedFd>>, (std::sync::Arc<OwnedFd>, io::Error)>
{
    // SAFETY: the fd stays open while any clone of the Arc lives, and the AsyncFd holds one
    // until it is dropped; the number never changes.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| e.into_parts())
}

/// `shutdown(SHUT_RDWR)` on a connection's socket by number: whoever reads or writes it gets
/// EOF or an error and lets go. The fd stays open (its owner closes it).
///
/// # Safety
/// `fd` must be open, and stay open for the duration of the call: the caller holds the lock of
/// the registry the fd was taken from, whose entries are removed before their sockets close
/// (see `registry::Registration`).
pub(crate) unsafe fn shutdown_registered(fd: RawFd) {
    // SAFETY: the caller guarantees the fd is open for the duration of this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
}

/// The door of a listening TCP socket: a classic BPF socket filter that drops every segment
/// with SYN set and ACK clear (a new client's first segment) and lets everything else through.
///
/// Shut, no new connection enters the socket's queues (the client's SYN is dropped, so it
/// retries a second later and is refused once the socket is gone), while a handshake already
/// answered with SYN-ACK still completes into the accept queue: its final ACK passes. The
/// kernel runs a TCP socket's filter on each segment with the data at the TCP header (after
/// the IP header), so byte 13 is the flags byte, for IPv4 and IPv6 alike.
const SYN_DOOR: [libc::sock_filter; 5] = {
    const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }
    [
        op(LD_B_ABS, 0, 0, 13),
        op(AND_K, 0, 0, SYN | ACK),
        op(JEQ_K, 0, 1, SYN),
        op(RET_K, 0, 0, 0),        // SYN without ACK: dropped
        op(RET_K, 0, 0, u32::MAX), // anything else: kept whole
    ]
};

/// Shuts the door of a listening TCP socket ([`SYN_DOOR`]). The filter belongs to the socket,
/// not to this fd: every process holding the socket is affected, and it stays after this
/// process closes its copy if another process holds one. So only for a socket no process
/// outside this service's own handover processes holds; those reopen it ([`open_door`]) if
/// they serve on it again.
pub(crate) fn shut_door(listener: BorrowedFd<'_>) -> io::Result<()> {
    attach_filter(listener, &SYN_DOOR)
}

/// Attaches the classic BPF `program` to `socket` (`SO_ATTACH_FILTER`), replacing any.
fn attach_filter(socket: BorrowedFd<'_>, program: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?;
    let fprog = libc::sock_fprog {
        len,
        // The kernel copies the program during the call and never writes through the pointer.
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: SO_ATTACH_FILTER reads a `sock_fprog` of the given size, and the `len`
    // instructions it points to, during the call only; both outlive the call.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Opens the door of a listening socket if [`shut_door`] shut it (its filter is exactly
/// [`SYN_DOOR`]); a filter of anyone else is left alone. Returns whether it was shut.
pub(crate) fn open_door(listener: BorrowedFd<'_>) -> io::Result<bool> {
    let mut attached = [libc::sock_filter {
        code: 0,
        jt: 0,
        jf: 0,
        k: 0,
    }; 8];
    // SO_GET_FILTER counts in instructions, not bytes: room for 8, and it says how many.
    let mut len = attached.len() as libc::socklen_t;
    // SAFETY: SO_GET_FILTER writes at most `len` instructions into `attached` (it fails with
    // EINVAL if the program is longer) and the count into `len`, both ours for the call.
    let r = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_GET_FILTER,
            attached.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        // Longer than 8 instructions: not ours.
        return match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(false),
            _ => Err(e),
        };
    }
    let ours = len as usize == SYN_DOOR.len()
        && attached
            .iter()
            .zip(&SYN_DOOR)
            .all(|(a, b)| (a.code, a.jt, a.jf, a.k) == (b.code, b.jt, b.jf, b.k));
    if !ours {
        return Ok(false);
    }
    // SO_DETACH_FILTER ignores its value, but the kernel wants one of at least an int's size.
    let unused: c_int = 0;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `unused`, ours for the call.
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_FILTER,
            (&raw const unused).cast(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        )
    };
    match r {
        0 => Ok(true),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Whether `sig` has its default disposition (not ignored, no handler installed).
pub(crate) fn has_default_disposition(sig: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `current`,
    // a plain-data struct we own.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_DFL
    }
}

/// What kind of listening socket an inherited fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamFamily {
    Inet,
    Unix,
}

/// Takes ownership of an inherited fd that is a regular file (a memfd of the fd store: the TLS
/// session ticket keys, `tickets`), without further checks; the caller checks its seals.
///
/// The caller must own the fd number, as for [`adopt_inherited`].
pub(crate) fn adopt_inherited_file(fd: RawFd) -> Result<OwnedFd, String> {
    let (_, file_type) = inspect_inherited(fd)?;
    if file_type != FileType::RegularFile {
        return Err(format!(
            "is a {}; expected a memfd (regular file)",
            describe_file_type(file_type)
        ));
    }
    // SAFETY: as above; the OwnedFd is its only owner from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of an inherited fd after checking that it is an open, listening stream
/// socket of family INET, INET6 or UNIX. On error the fd is left as it was (open, and
/// close-on-exec), and the message says what it is instead.
///
/// The caller must own the fd number: [`crate::startup::Startup::take_fds`] guarantees that
/// only one caller per process adopts the `LISTEN_FDS` range.
/// The first step of adopting an inherited fd: close-on-exec set, and what kind of file it is.
///
/// The caller must own the fd number, as for [`adopt_inherited`], for as long as it uses the
/// borrow (`'fd`).
fn inspect_inherited<'fd>(fd: RawFd) -> Result<(BorrowedFd<'fd>, FileType), String> {
    set_cloexec_raw(fd).map_err(|e| match e.raw_os_error() {
        Some(libc::EBADF) => "is not open".to_string(),
        _ => format!("cannot be inspected: {e}"),
    })?;
    // SAFETY: the fd is open (F_GETFD just succeeded) and stays open for the lifetime of this
    // borrow: the inherited range belongs to this one caller
    // ([`crate::startup::Startup::take_fds`]), and nothing else closes it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let stat = rustix::fs::fstat(borrowed).map_err(|e| format!("cannot be inspected: {e}"))?;
    Ok((borrowed, FileType::from_raw_mode(stat.st_mode)))
}

pub(crate) fn adopt_inherited(fd: RawFd) -> Result<(OwnedFd, StreamFamily), String> {
    let (borrowed, file_type) = inspect_inherited(fd)?;
    if file_type != FileType::Socket {
        return Err(format!(
            "is a {}, not a socket; expected a listening TCP or Unix stream socket",
            describe_file_type(file_type)
        ));
    }
    let socket_type = sockopt::socket_type(borrowed).map_err(|e| format!("SO_TYPE failed: {e}"))?;
    if socket_type != SocketType::STREAM {
        return Err(format!(
            "is a {} socket; expected a stream (SOCK_STREAM) socket",
            match socket_type {
                SocketType::DGRAM => "datagram (UDP or SOCK_DGRAM)",
                SocketType::SEQPACKET => "SOCK_SEQPACKET",
                _ => "non-stream",
            }
        ));
    }
    let family = rustix::net::getsockname(borrowed)
        .map_err(|e| format!("getsockname failed: {e}"))?
        .address_family();
    let family = match family {
        AddressFamily::INET | AddressFamily::INET6 => StreamFamily::Inet,
        AddressFamily::UNIX => StreamFamily::Unix,
        other => {
            return Err(format!(
                "has address family {}; expected AF_INET, AF_INET6 or AF_UNIX",
                other.as_raw()
            ));
        }
    };
    let listening =
        sockopt::socket_acceptconn(borrowed).map_err(|e| format!("SO_ACCEPTCONN failed: {e}"))?;
    if !listening {
        return Err(
            "is a stream socket that is not listening (a connected socket, as with \
                    Accept=yes?); expected a listening socket (Accept=no)"
                .to_string(),
        );
    }
    // SAFETY: the fd is open and owned by this caller alone (see above); from here on the
    // OwnedFd is its only owner and closes it on drop.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((owned, family))
}

/// Takes ownership of the private channel a handover parent passed at `fd`
/// (`HANDOVER_CHANNEL_FD`), after checking that it is a Unix `SOCK_SEQPACKET` socket. Close-on-
/// exec is set first, so a program the application runs never sees it. On error the fd is left
/// as it was (open, close-on-exec).
///
/// The caller must own the fd number: [`crate::startup::Startup::take_channel`] lets only one
/// caller per process adopt it, and the parent placed it there for us alone.
pub(crate) fn adopt_channel(fd: RawFd) -> Result<OwnedFd, String> {
    set_cloexec_raw(fd).map_err(|e| match e.raw_os_error() {
        Some(libc::EBADF) => "is not open".to_string(),
        _ => format!("cannot be inspected: {e}"),
    })?;
    // SAFETY: open (F_GETFD just succeeded) and owned by this one caller, as above.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let stat = rustix::fs::fstat(borrowed).map_err(|e| format!("cannot be inspected: {e}"))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Socket {
        return Err("is not a socket; expected a Unix SOCK_SEQPACKET socket".to_string());
    }
    let socket_type = sockopt::socket_type(borrowed).map_err(|e| format!("SO_TYPE failed: {e}"))?;
    let family = rustix::net::getsockname(borrowed)
        .map_err(|e| format!("getsockname failed: {e}"))?
        .address_family();
    if socket_type != SocketType::SEQPACKET || family != AddressFamily::UNIX {
        return Err("is not a Unix SOCK_SEQPACKET socket".to_string());
    }
    // SAFETY: open and ours alone (see above); the OwnedFd is its only owner from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn describe_file_type(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Fifo => "pipe (FIFO)",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Symlink => "symlink",
        _ => "non-socket file",
    }
}

/// How to start the restart child, prepared entirely before the clone so that the child needs
/// no allocation between `clone` and `execve`.
pub(crate) struct ExecPlan {
    path: CString,
    // The CStrings own the bytes the pointer arrays point into.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _env: Vec<Vec<u8>>,
    envp_ptrs: Vec<*const c_char>,
    /// Points at the first digit of the `LISTEN_PID=` entry, which has room for any pid.
    listen_pid_digits: *mut u8,
    /// The fds to pass, in order: child fd 3 + i gets `fds[i]` (the listeners, then the
    /// channel). Owned (duplicates of the server's), so they stay open until the clone is done
    /// whatever the server does meanwhile.
    fds: Vec<OwnedFd>,
    /// Room for the temporary copies of `fds` made in the child.
    scratch: Vec<RawFd>,
    cwd: Option<CString>,
    /// The signal state to give the new program.
    signals: SignalState,
}

// SAFETY: the raw pointers point into heap buffers owned by this same struct (`_argv`, `_env`);
// moving the struct to another thread does not move or free those buffers.
unsafe impl Send for ExecPlan {}

impl std::fmt::Debug for ExecPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecPlan")
            .field("path", &self.path)
            .field("fds", &self.fds)
            .finish_non_exhaustive()
    }
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl ExecPlan {
    /// Prepares `execve(path, args, env + LISTEN_PID=<child pid>)` with `fds` at 3, 4, ...
    ///
    /// `env` must not contain `LISTEN_PID`; it is added here.
    pub(crate) fn new(
        path: &Path,
        args: &[OsString],
        env: Vec<(OsString, OsString)>,
        fds: Vec<OwnedFd>,
        cwd: Option<&Path>,
        signals: SignalState,
    ) -> io::Result<ExecPlan> {
        let nul = |s: &OsStr| {
            CString::new(s.as_bytes()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{s:?} contains a NUL byte"),
                )
            })
        };
        let path = nul(path.as_os_str())?;
        let argv: Vec<CString> = args.iter().map(|a| nul(a)).collect::<Result<_, _>>()?;
        let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());

        let mut env: Vec<Vec<u8>> = env
            .into_iter()
            .map(|(k, v)| {
                let mut entry = Vec::with_capacity(k.len() + v.len() + 2);
                entry.extend_from_slice(k.as_bytes());
                entry.push(b'=');
                entry.extend_from_slice(v.as_bytes());
                nul(OsStr::from_bytes(&entry)).map(CString::into_bytes_with_nul)
            })
            .collect::<Result<_, _>>()?;
        // "LISTEN_PID=" + room for 20 digits + NUL, all NUL for now.
        let mut pid_entry = LISTEN_PID_PREFIX.to_vec();
        pid_entry.resize(LISTEN_PID_PREFIX.len() + 21, 0);
        env.push(pid_entry);
        let last = env.len() - 1;
        // Raw pointers only, no `&mut [u8]` in between: this pointer and the ones in envp_ptrs
        // stay valid side by side, and the heap buffer never moves (no push after this point).
        // SAFETY: the entry is LISTEN_PID_PREFIX.len() + 21 bytes long.
        let listen_pid_digits = unsafe { env[last].as_mut_ptr().add(LISTEN_PID_PREFIX.len()) };
        let mut envp_ptrs: Vec<*const c_char> =
            env.iter().map(|e| e.as_ptr().cast::<c_char>()).collect();
        envp_ptrs.push(std::ptr::null());

        let cwd = cwd.map(|c| nul(c.as_os_str())).transpose()?;
        let scratch = vec![-1; fds.len()];
        Ok(ExecPlan {
            path,
            _argv: argv,
            argv_ptrs,
            _env: env,
            envp_ptrs,
            listen_pid_digits,
            fds,
            scratch,
            cwd,
            signals,
        })
    }
}

/// Where the new process goes in the process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Our sibling (`CLONE_PARENT`): the child of our own parent (the service manager, init,
    /// a subreaper, a shell), which reaps it and which systemd needs for a graceful stop.
    Sibling,
    /// Our own child: the init of a PID namespace may not create siblings (the kernel refuses
    /// `CLONE_PARENT` there), so it starts its successor as a child and reaps it itself.
    Child,
}

/// A started child: its pid, a pidfd to watch and signal it without pid-reuse races, and the
/// read end of its exec report pipe.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    /// Non-blocking, close-on-exec. The new process writes 4 bytes (an errno) if a step up to
    /// and including `execve` failed; EOF once every copy of the write end is closed, which
    /// means "executed" unless a concurrent fork elsewhere in this process holds a copy: so
    /// read it with a deadline, never wait for EOF alone.
    pub(crate) report: OwnedFd,
}

/// The `clone_args` of `clone3(2)`, version 0 (64 bytes, Linux 5.3).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// Starts `plan` as a new process, directly where it belongs in the process tree (see
/// [`Placement`]), and returns at once: whether `execve` worked comes later on
/// [`Spawned::report`].
///
/// One syscall creates the process and its pidfd: `clone3(CLONE_PIDFD [| CLONE_PARENT])`, or
/// where that is refused (`ENOSYS`, `EPERM`: an old kernel, or a seccomp profile such as
/// Docker's default that returns `ENOSYS` for `clone3`), the legacy `clone` syscall with the
/// same flags. No intermediate process, no pipe to learn the pid, no window in which the pid
/// could be reused before we hold its pidfd. If both are refused the error names both errnos.
///
/// Why a sibling: systemd treats a `MAINPID=` that is not its own child as "alien" and, on
/// `systemctl stop`, SIGKILLs it right after SIGTERM instead of waiting for its drain. As
/// systemd's child from the start, the new process gets the full graceful stop, and its exit
/// status goes to systemd, which reaps it.
///
/// On error no process is left: none was created, or (a clone without a pidfd, which a
/// kernel that accepts `CLONE_PIDFD` does not do) it was killed at once.
pub(crate) fn spawn(mut plan: ExecPlan, placement: Placement) -> io::Result<Spawned> {
    let n = plan.fds.len();
    let floor = c_int::try_from(3 + n)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many fds to pass"))?;
    // execve's errno comes back on it; EOF means exec succeeded (close-on-exec). The write end
    // lives at >= 3 + n, so the child's dup2 onto 3..3+n cannot clobber it.
    let (report_read, report_write) = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )
    .map_err(|e| context(e.into(), "could not create the exec report pipe"))?;
    let report_write = move_above(report_write, floor)
        .map_err(|e| context(e, "could not place the exec report pipe"))?;

    let sibling = placement == Placement::Sibling;
    let flags = libc::CLONE_PIDFD as u64
        | if sibling {
            libc::CLONE_PARENT as u64
        } else {
            0
        };
    // The kernel writes the pidfd here, in our memory only (the child's copy was made before).
    let mut pidfd: c_int = -1;

    // Block every signal across the clone, so that no handler of ours runs in the child before
    // it has reset them all to their defaults (a signal-hook handler would write into our
    // self-pipe). The child unblocks after the reset; we restore our mask right away.
    let mut all: libc::sigset_t = zeroed_sigset();
    let mut old: libc::sigset_t = zeroed_sigset();
    // SAFETY: sigfillset/pthread_sigmask write only into the sigset_t values passed.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let mut args = CloneArgs {
        flags,
        pidfd: (&raw mut pidfd) as u64,
        // With CLONE_PARENT the kernel requires 0 here (the parent's own exit signal is used);
        // our own child signals us with SIGCHLD like any fork.
        exit_signal: if sibling { 0 } else { libc::SIGCHLD as u64 },
        ..CloneArgs::default()
    };
    // SAFETY: a fork-like clone (no CLONE_VM, no new stack): the child gets a copy of our
    // memory and returns 0 here, on its copy of this stack. `args` and `pidfd` outlive the
    // call. What the child may do from here is the point: see `exec_child`.
    let ret3 = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw mut args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    let errno3 = io::Error::last_os_error();
    let (ret, legacy) =
        if ret3 < 0 && matches!(errno3.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
            // SAFETY: as above; the legacy clone returns the pidfd through its parent_tid argument.
            (
                unsafe { legacy_clone(flags, &mut pidfd) },
                Some(io::Error::last_os_error()),
            )
        } else {
            (ret3, None)
        };
    if ret == 0 {
        // SAFETY: we are the new process, every signal blocked, the report's write end at or
        // above `floor`: exactly what `exec_child` requires.
        unsafe { exec_child(&mut plan, report_write.as_raw_fd(), floor) }
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    // Our copies of what the child needed: the report's write end must go, or we would never
    // see EOF; the plan's fds (duplicates of the listeners, the child's channel end) too.
    drop(report_write);
    drop(plan);
    if ret < 0 {
        return Err(match legacy {
            None => context(errno3, "clone3 failed"),
            Some(errno) => io::Error::new(
                errno.kind(),
                format!(
                    "clone3 failed with {} and the legacy clone fallback with {}",
                    describe_errno(&errno3),
                    describe_errno(&errno)
                ),
            ),
        });
    }
    let pid = u32::try_from(ret).map_err(|_| io::Error::other(format!("clone returned {ret}")))?;
    if pidfd < 0 {
        // Not expected of a kernel that took CLONE_PIDFD; but a process we cannot watch must
        // not go on with our listeners. It has just been created and is not reaped before it
        // exits, so its pid is still its own.
        // SAFETY: kill(2) touches no memory of ours.
        unsafe { libc::kill(ret as libc::pid_t, libc::SIGKILL) };
        return Err(io::Error::other(format!(
            "clone created process {pid} but returned no pidfd (CLONE_PIDFD needs Linux >= 5.2); it was killed"
        )));
    }
    // SAFETY: the kernel just installed this fd (close-on-exec) for us; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Spawned {
        pid,
        pidfd,
        report: report_read,
    })
}

// The legacy clone's argument order differs per architecture; parent_tid (where CLONE_PIDFD
// writes the pidfd) is the third argument on every architecture Rust targets (only
// CLONE_BACKWARDS3, microblaze, differs).
/// The legacy `clone` syscall with `flags | SIGCHLD`, no new stack, the pidfd written to
/// `pidfd` (`CLONE_PIDFD` uses the parent_tid argument). Returns what the syscall returns.
///
/// # Safety
/// As for a fork: the child returns 0 and must only make async-signal-safe calls.
unsafe fn legacy_clone(flags: u64, pidfd: &mut c_int) -> libc::c_long {
    let flags = (flags | libc::SIGCHLD as u64) as libc::c_ulong;
    let pidfd: *mut c_int = pidfd;
    // The argument order differs per architecture: s390 takes the stack first
    // (CLONE_BACKWARDS2); everywhere else the flags come first and parent_tid third (x86-64:
    // flags, stack, parent_tid, child_tid, tls; CLONE_BACKWARDS arm/aarch64/riscv/..: flags,
    // stack, parent_tid, tls, child_tid; both of the last two are 0 here anyway).
    // SAFETY: per the caller; `pidfd` is valid for a write of a c_int.
    unsafe {
        #[cfg(target_arch = "s390x")]
        {
            libc::syscall(
                libc::SYS_clone,
                0 as libc::c_ulong,
                flags,
                pidfd,
                0usize,
                0usize,
            )
        }
        #[cfg(not(target_arch = "s390x"))]
        {
            libc::syscall(
                libc::SYS_clone,
                flags,
                0 as libc::c_ulong,
                pidfd,
                0usize,
                0usize,
            )
        }
    }
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {}", describe_errno(&e)))
}

/// `ENOSYS (Function not implemented)`: the name the man pages use, then the text.
pub(crate) fn describe_errno(e: &io::Error) -> String {
    let Some(code) = e.raw_os_error() else {
        return e.to_string();
    };
    let name = match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOSYS => "ENOSYS",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::E2BIG => "E2BIG",
        libc::ENOEXEC => "ENOEXEC",
        _ => return format!("errno {code} ({})", strip_os_error(e)),
    };
    format!("{name} ({})", strip_os_error(e))
}

/// "Function not implemented" out of "Function not implemented (os error 38)".
fn strip_os_error(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// How our own child (a [`Placement::Child`]) ended, reaping it; `None` if it has not exited
/// yet, or was reaped already. `waitid(P_PIDFD)` (Linux 5.4) waits for exactly this process,
/// never for one of the application's own children.
pub(crate) fn reap(pidfd: BorrowedFd<'_>) -> Option<crate::error::ChildExit> {
    use crate::error::ChildExit;
    use rustix::process::{WaitId, WaitIdOptions};
    loop {
        match rustix::process::waitid(
            WaitId::PidFd(pidfd),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(status)) => {
                return Some(match (status.exit_status(), status.terminating_signal()) {
                    (Some(code), _) => ChildExit::Code(code),
                    (None, Some(sig)) => ChildExit::Signal(sig),
                    (None, None) => ChildExit::Unknown,
                });
            }
            Err(rustix::io::Errno::INTR) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Sends `sig` through a pidfd (no pid-reuse race). Any signal number, also real-time ones,
/// which rustix's `Signal` does not name.
pub(crate) fn pidfd_signal(pidfd: BorrowedFd<'_>, sig: c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(fd, sig, NULL, 0) reads no memory of ours (info is NULL); on a
    // fd that is not a pidfd it fails with EBADF.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `sig` to a child of ours by pid. Sound only for our own children: their pid cannot be
/// reused before we reap them, and the only reaper of the keeper's children is the caller.
pub(crate) fn signal_child(pid: u32, sig: c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) touches no memory of ours.
    if unsafe { libc::kill(pid, sig) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `pid` is a child of this process (alive, or a zombie not yet reaped). Does not reap.
pub(crate) fn is_our_child(pid: u32) -> bool {
    use rustix::process::{WaitId, WaitIdOptions};
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    rustix::process::waitid(
        WaitId::Pid(pid),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
    )
    .is_ok()
}

/// Reaps one exited child of ours, any; `None` when none has exited (or we have none).
/// Returns the pid and the exit code a shell would report (128 + signal when killed).
pub(crate) fn reap_any() -> io::Result<Option<(u32, i32)>> {
    loop {
        match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                let code = match (status.exit_status(), status.terminating_signal()) {
                    (Some(code), _) => code,
                    (None, Some(sig)) => 128 + sig,
                    (None, None) => 1,
                };
                return Ok(Some((pid.as_raw_nonzero().get() as u32, code)));
            }
            Ok(None) => return Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::CHILD) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The credentials the kernel attached to a message (`SCM_CREDENTIALS`), as raw numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// 0 when the sender is in a PID namespace we cannot see (a sidecar in the host namespace
    /// sending to a container, say): never a pid of ours, never matched.
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// Receives one datagram (or seqpacket message) without blocking, with the sender's
/// credentials if the kernel attached them (`SO_PASSCRED`). Any fds that came with it
/// (`SCM_RIGHTS`) are closed. Parsed here from the raw `ucred`, because rustix's `UCred` holds
/// a non-zero `Pid` and a pid of 0 is what a sender in another PID namespace shows up as.
///
/// On a connected `SOCK_SEQPACKET` socket a length of 0 is EOF (the peer closed its end).
pub(crate) fn recv_with_credentials(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Option<Credentials>)> {
    // Room for one ucred and a few fds; more fds than fit are discarded by the kernel
    // (MSG_CTRUNC), which closes them.
    const CONTROL: usize = 128;
    #[repr(C, align(8))]
    struct Control([u8; CONTROL]);
    let mut control = Control([0; CONTROL]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL as _;
    // SAFETY: `msg` points at `iov` (into `buf`) and `control`, all valid for writes of the
    // lengths given, and alive for the call.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut credentials = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled, bounded by
    // msg_controllen; each header is checked for its level and type before its data is read,
    // and the data is read unaligned as the type it has for that (level, type).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            let len = (*cmsg).cmsg_len as usize;
            let header = libc::CMSG_LEN(0) as usize;
            let payload = len.saturating_sub(header);
            if (*cmsg).cmsg_level == libc::SOL_SOCKET {
                if (*cmsg).cmsg_type == libc::SCM_CREDENTIALS
                    && payload >= std::mem::size_of::<libc::ucred>()
                {
                    let cred = data.cast::<libc::ucred>().read_unaligned();
                    credentials = Some(Credentials {
                        pid: u32::try_from(cred.pid).unwrap_or(0),
                        uid: cred.uid,
                        gid: cred.gid,
                    });
                } else if (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let count = payload / std::mem::size_of::<c_int>();
                    for i in 0..count {
                        let raw = data.cast::<c_int>().add(i).read_unaligned();
                        // The kernel installed these fds for us (close-on-exec): we own them
                        // and close them at once.
                        drop(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, credentials))
}

/// The pid and a pidfd of the process at the other end of a Unix socket (`SO_PEERCRED`: for a socketpair,
/// the process that made it), taken while that process is known to live; `None` if it cannot
/// be had (gone already, another PID namespace, no pidfd support).
pub(crate) fn peer_pidfd(socket: BorrowedFd<'_>) -> Option<(u32, OwnedFd)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes, a `ucred`, into `cred`, ours for the call.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    // Pid 0: the peer is in a PID namespace we cannot see.
    let pid = rustix::process::Pid::from_raw(cred.pid)?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
    Some((pid.as_raw_nonzero().get().unsigned_abs(), pidfd))
}

/// Whether the process behind `pidfd` has exited (its pidfd polls readable).
pub(crate) fn has_exited(pidfd: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    matches!(rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())), Ok(n) if n > 0)
}

/// How the process behind `pidfd` ended, from the pidfd itself (`PIDFD_GET_INFO` with
/// `PIDFD_INFO_EXIT`, Linux 6.15 and later): unlike `/proc/PID/stat`, it is still there after
/// whoever is its parent reaped it (systemd, at once), for as long as the pidfd is held. `None`
/// while it runs, and on an older kernel.
pub(crate) fn pidfd_exit(pidfd: BorrowedFd<'_>) -> Option<crate::error::ChildExit> {
    use crate::error::ChildExit;
    /// `struct pidfd_info` as of its first version (64 bytes, `PIDFD_INFO_SIZE_VER0`).
    #[repr(C)]
    #[derive(Default)]
    struct PidfdInfo {
        mask: u64,
        cgroupid: u64,
        ids: [u32; 11], // pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid
        exit_code: i32,
    }
    const _: () = assert!(std::mem::size_of::<PidfdInfo>() == 64);
    const PIDFD_INFO_EXIT: u64 = 1 << 3;
    // _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info): the size is part of the request.
    const PIDFD_GET_INFO: u32 = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..PidfdInfo::default()
    };
    // SAFETY: PIDFD_GET_INFO reads and writes at most the 64 bytes its request number encodes,
    // the size of `info`, which is ours for the call. Kernels without it fail (ENOTTY, EINVAL).
    let r = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            PIDFD_GET_INFO as _,
            (&raw mut info).cast::<libc::c_void>(),
        )
    };
    if r != 0 || info.mask & PIDFD_INFO_EXIT == 0 {
        return None;
    }
    let status = info.exit_code;
    Some(if status & 0x7f == 0 {
        ChildExit::Code((status >> 8) & 0xff)
    } else {
        ChildExit::Signal(status & 0x7f)
    })
}

/// How a process that is not our child ended, if it is still a zombie: `/proc/PID/stat`
/// field 52 holds its wait status until its parent reaps it. Best effort: a parent that reaps
/// at once (systemd does) leaves nothing to read.
pub(crate) fn exit_description(pid: u32) -> Option<crate::error::ChildExit> {
    use crate::error::ChildExit;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    // fields[0] is field 3 (state); field 52 (exit_code) is fields[49].
    if fields.first() != Some(&"Z") {
        return None;
    }
    let status: i32 = fields.get(49)?.trim().parse().ok()?;
    Some(if status & 0x7f == 0 {
        ChildExit::Code((status >> 8) & 0xff)
    } else {
        ChildExit::Signal(status & 0x7f)
    })
}

/// Whether process `pid` has `socket` open: `None` if its fds cannot be read (another user's,
/// gone). From `/proc/PID/fd`.
pub(crate) fn holds_socket(pid: u32, socket: BorrowedFd<'_>) -> Option<bool> {
    let inode = format!("socket:[{}]", rustix::fs::fstat(socket).ok()?.st_ino);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    // Bounded by the process's fds, read once. An fd listed but not readable (a process that
    // is not dumpable) could be it: then it is not known.
    let mut unreadable = false;
    for fd in fds.flatten() {
        match std::fs::read_link(fd.path()) {
            Ok(target) if target.as_os_str() == inode.as_str() => return Some(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => unreadable = true,
        }
    }
    (!unreadable).then_some(false)
}

/// Who else has one of a set of sockets open, as far as `/proc` tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holders {
    /// Provably nobody: every other process's fds could be read.
    Nobody,
    /// None found, but some processes' fds could not be read (another user's, or a process
    /// that is not dumpable): one of them may hold it.
    Unknown,
    /// This process (found first) holds one.
    Found(u32),
}

/// Whether a later process of the service has one of `sockets` open, and can still accept on
/// it: a sibling of this process (or, as PID 1, a child) running as the same user. Not this
/// process's ancestors (a service manager holding a socket unit's socket or its fd store is
/// one of them: PID 1, a user manager, systemfd), nor strays that merely inherited the socket.
/// Read from `/proc/PID/fd`.
pub(crate) fn held_elsewhere(sockets: &[BorrowedFd<'_>]) -> Holders {
    let Ok(inodes) = sockets
        .iter()
        .map(|fd| rustix::fs::fstat(fd).map(|st| format!("socket:[{}]", st.st_ino)))
        .collect::<Result<Vec<_>, _>>()
    else {
        return Holders::Unknown;
    };
    let me = std::process::id();
    let my_uid = rustix::process::geteuid().as_raw();
    let my_parent = parent_of(me).unwrap_or(0);
    let ancestors = ancestors_of(me);
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Holders::Unknown;
    };
    let mut unreadable = false;
    // Bounded by the processes and their fds, read once.
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me || pid == 1 || ancestors.contains(&pid) {
            continue;
        }
        // A later process of the service runs as this one does: another user's process is
        // not one (and its fds could not be read anyway). And it is a sibling of this one
        // (restarts start the new process as the old one's sibling) or, as PID 1, its child:
        // a process that merely inherited the socket (a wrapper's background job) is not one.
        if effective_uid_of(pid).is_none_or(|uid| uid != my_uid) {
            continue;
        }
        if parent_of(pid).is_none_or(|parent| parent != my_parent && parent != me) {
            continue;
        }
        let fds = match std::fs::read_dir(entry.path().join("fd")) {
            Ok(fds) => fds,
            // Gone meanwhile: holds nothing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => {
                unreadable = true;
                continue;
            }
        };
        for fd in fds.flatten() {
            match std::fs::read_link(fd.path()) {
                Ok(target) if inodes.iter().any(|i| target.as_os_str() == i.as_str()) => {
                    return Holders::Found(pid);
                }
                Ok(_) => {}
                // Closed meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Listed but not readable (a process that is not dumpable).
                Err(_) => unreadable = true,
            }
        }
    }
    match unreadable {
        true => Holders::Unknown,
        false => Holders::Nobody,
    }
}

/// The effective uid of `pid` (`/proc/PID/status`, readable for every process, dumpable or
/// not); `None` once it is gone.
fn effective_uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// The parent of `pid` (`/proc/PID/stat`); `None` once it is gone.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    // Fields after the name: state, ppid.
    rest.split(' ').nth(1)?.parse::<u32>().ok()
}

/// The parent, grandparent, ... of `pid` (at most 64, from `/proc/PID/stat`).
fn ancestors_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut at = pid;
    while out.len() < 64 {
        let Some(parent) = parent_of(at) else {
            break;
        };
        if parent <= 1 {
            break;
        }
        out.push(parent);
        at = parent;
    }
    out
}

/// Moves `fd` to a number >= `floor` (close-on-exec). The original is closed: a pipe end left
/// open twice would keep its reader from ever seeing EOF.
fn move_above(fd: OwnedFd, floor: c_int) -> io::Result<OwnedFd> {
    let moved = rustix::io::fcntl_dupfd_cloexec(&fd, floor)?;
    drop(fd);
    Ok(moved)
}

/// The signal state a process started with: which signals were ignored, and its signal mask.
/// A successor gets it back (see [`exec_child`]): handover installs handlers of its own, which
/// an exec would reset to the default, not to "ignored" (`nohup`, a background job's
/// `SIGINT`), and it blocks every signal around the clone.
#[derive(Clone, Copy)]
pub(crate) struct SignalState {
    /// Bit `n - 1` set: signal `n` was ignored.
    ignored: u64,
    mask: libc::sigset_t,
}

impl std::fmt::Debug for SignalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalState")
            .field("ignored", &format_args!("{:#x}", self.ignored))
            .finish_non_exhaustive()
    }
}

impl SignalState {
    /// The calling thread's signal state now (at start-up: the process's, as it was given).
    pub(crate) fn capture() -> SignalState {
        let mut ignored = 0u64;
        for sig in 1..=64 {
            // SAFETY: sigaction with a null new action only reads the current one into
            // `current`, a zeroed plain-data struct of ours.
            let is_ignored = unsafe {
                let mut current: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut current) == 0
                    && current.sa_sigaction == libc::SIG_IGN
            };
            if is_ignored {
                ignored |= 1 << (sig - 1);
            }
        }
        let mut mask = zeroed_sigset();
        // SAFETY: a null new set only reads the thread's mask into `mask`, ours.
        let read = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut mask) };
        if read != 0 {
            // Nothing blocked: what a child got before this was recorded.
            // SAFETY: `mask` is ours; sigemptyset only writes it.
            unsafe { libc::sigemptyset(&mut mask) };
        }
        SignalState { ignored, mask }
    }

    fn was_ignored(&self, sig: c_int) -> bool {
        (1..=64).contains(&sig) && self.ignored & (1 << (sig - 1)) != 0
    }
}

fn zeroed_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; all-zero is a valid (empty) value on Linux.
    unsafe { std::mem::zeroed() }
}

/// The child side of [`spawn`]: between `clone` and `execve`.
///
/// # Safety
/// Must only be called in the new process right after the clone, with `err_fd` the write end
/// of the report pipe placed at or above `floor` = 3 + number of fds passed, and every signal
/// blocked. Only async-signal-safe syscalls follow, and no allocation: the parent may have had
/// other threads, whose locks (the allocator's among them) are frozen in our copy of memory.
unsafe fn exec_child(plan: &mut ExecPlan, err_fd: RawFd, floor: c_int) -> ! {
    // SAFETY (whole function): only async-signal-safe syscalls; every pointer passed points into
    // `plan`, which was fully built before the clone and is not reallocated here.
    unsafe {
        // The signal state this process was started with, for the new program: what was
        // ignored then is ignored again (our handlers replaced it), everything else back to
        // its default (SIGPIPE too, which the Rust runtime ignores for itself: it was not
        // given so); then the original mask instead of our all-blocked one.
        for sig in 1..=64 {
            // 64 = _NSIG - 1 on Linux. glibc reserves 32 and 33: sigaction refuses them.
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let want = match plan.signals.was_ignored(sig) && sig != libc::SIGPIPE {
                true => libc::SIG_IGN,
                false => libc::SIG_DFL,
            };
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut current) == 0
                && current.sa_sigaction != want
            {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = want;
                libc::sigaction(sig, &action, std::ptr::null_mut());
            }
        }
        libc::sigprocmask(libc::SIG_SETMASK, &plan.signals.mask, std::ptr::null_mut());

        // The listeners must end up at 3, 4, ... but a source may sit on another's target (or
        // on its own). First copy every source above all targets, then dup2 the copies down:
        // dup2 clears close-on-exec on the target only, so exactly the listeners survive
        // execve; the copies are close-on-exec and vanish.
        for (i, src) in plan.fds.iter().enumerate() {
            let tmp = libc::fcntl(src.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor);
            if tmp < 0 {
                fail(err_fd);
            }
            *plan.scratch.as_mut_ptr().add(i) = tmp;
        }
        for i in 0..plan.fds.len() {
            if libc::dup2(*plan.scratch.as_ptr().add(i), 3 + i as c_int) < 0 {
                fail(err_fd);
            }
        }
        // Anything else this process holds above the listeners (fds a parent of ours leaked
        // to us without close-on-exec) must not reach the child either. Errors are ignored:
        // kernels before 5.11 lack CLOSE_RANGE_CLOEXEC, and every fd handover makes is
        // close-on-exec already.
        libc::syscall(
            libc::SYS_close_range,
            floor as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );

        if let Some(cwd) = &plan.cwd {
            if libc::chdir(cwd.as_ptr()) < 0 {
                fail(err_fd);
            }
        }

        // LISTEN_PID is the pid of the process that will read it: ours, which execve keeps.
        write_decimal(plan.listen_pid_digits, libc::getpid() as u32);

        libc::execve(
            plan.path.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        fail(err_fd)
    }
}

/// Reports errno on the pipe and exits without running any destructor or atexit handler.
///
/// # Safety
/// The new process of [`spawn`] only.
unsafe fn fail(err_fd: RawFd) -> ! {
    // SAFETY: errno location, write and _exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(err_fd, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// Writes `n` in decimal followed by NUL at `out`, which has room for 21 bytes.
///
/// # Safety
/// `out` must be valid for 21 bytes of writes.
unsafe fn write_decimal(out: *mut u8, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: len <= 10 < 21, within the buffer the caller vouches for.
        unsafe { *out.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: as above.
    unsafe { *out.add(len) = 0 };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A connect that does not complete within `wait`: its SYN was dropped.
    fn connect_blocked(addr: std::net::SocketAddr, wait: std::time::Duration) -> bool {
        match std::net::TcpStream::connect_timeout(&addr, wait) {
            Err(e) => e.kind() == io::ErrorKind::TimedOut,
            Ok(_) => false,
        }
    }

    #[test]
    fn a_shut_door_keeps_new_clients_out_and_lets_queued_ones_be_accepted() {
        let wait = std::time::Duration::from_millis(300);
        for any in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(any) else {
                continue; // no IPv6 loopback here
            };
            let addr = listener.local_addr().expect("address");
            let queued = std::net::TcpStream::connect(addr).expect("queued before the door");
            assert!(!open_door(listener.as_fd()).expect("no filter yet"));
            shut_door(listener.as_fd()).expect("door shut");
            assert!(connect_blocked(addr, wait), "{addr}: a new client got in");
            // The one queued before is still there, whole.
            let (accepted, peer) = listener.accept().expect("the queued connection");
            assert_eq!(peer, queued.local_addr().expect("client address"));
            drop(accepted);
            assert!(open_door(listener.as_fd()).expect("ours, detached"));
            let late = std::net::TcpStream::connect_timeout(&addr, wait).expect("open again");
            let (_, peer) = listener.accept().expect("accepted after reopening");
            assert_eq!(peer, late.local_addr().expect("client address"));
        }
    }

    #[test]
    fn a_pidfd_tells_how_its_process_ended_even_after_the_reaping() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read _; exit 3"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .expect("pidfd_open");
        assert_eq!(pidfd_exit(pidfd.as_fd()), None, "still running");
        drop(child.stdin.take());
        assert_eq!(child.wait().expect("reaped").code(), Some(3));
        let Some(exit) = pidfd_exit(pidfd.as_fd()) else {
            // Before Linux 6.15: nothing to read once reaped.
            eprintln!("PIDFD_INFO_EXIT not supported by this kernel");
            return;
        };
        assert_eq!(exit, crate::error::ChildExit::Code(3));
    }

    #[test]
    fn open_door_leaves_a_filter_of_someone_else_alone() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        // Accept everything: one instruction, not the door.
        let accept_all = [libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        }];
        attach_filter(listener.as_fd(), &accept_all).expect("attached");
        assert!(!open_door(listener.as_fd()).expect("not ours"));
        let mut len: libc::socklen_t = 0;
        // SAFETY: with a length of 0, SO_GET_FILTER writes only the count into `len`.
        let r = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_GET_FILTER,
                std::ptr::null_mut(),
                &mut len,
            )
        };
        assert_eq!((r, len), (0, 1), "still attached");
    }

    #[test]
    fn decimal_digits() {
        for n in [0u32, 7, 10, 4_194_304, u32::MAX] {
            let mut buf = [0xffu8; 21];
            // SAFETY: buf has 21 bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), n) };
            let end = buf.iter().position(|&b| b == 0).expect("NUL written");
            assert_eq!(
                std::str::from_utf8(&buf[..end]).expect("ascii"),
                n.to_string()
            );
        }
    }

    #[test]
    fn credentials_are_read_raw_and_passed_fds_closed() {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair");
        rustix::net::sockopt::set_socket_passcred(&b, true).expect("SO_PASSCRED");
        // A message with an fd attached: the receiver must not keep it.
        let path = std::env::temp_dir().join(format!("handover-sys-test-{}", std::process::id()));
        let passed = std::fs::File::create(&path).expect("create");
        let fds = [passed.as_fd()];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            &a,
            &[io::IoSlice::new(b"READY=1\n")],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .expect("sendmsg");
        drop(passed);
        let mut buf = [0u8; 64];
        let (len, credentials) = recv_with_credentials(b.as_fd(), &mut buf).expect("recv");
        let still_open = std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == path));
        let _ = std::fs::remove_file(&path);
        assert_eq!(&buf[..len], b"READY=1\n");
        let credentials = credentials.expect("credentials");
        assert_eq!(credentials.pid, std::process::id());
        assert!(!still_open, "the passed fd was closed");
    }

    #[test]
    fn errnos_are_named() {
        let text = describe_errno(&io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(text.starts_with("ENOSYS ("), "{text}");
        assert!(!text.contains("os error"), "{text}");
    }

    #[test]
    fn not_a_socket_is_named() {
        let file = std::fs::File::open("/proc/self/status").expect("open");
        let fd = file.as_raw_fd();
        let err = adopt_inherited(fd).expect_err("a file is not a listener");
        assert!(err.contains("regular file"), "{err}");
        drop(file);
    }
}
