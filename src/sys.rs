//! All `unsafe` and raw-fd work of the crate, in one place.
//!
//! What needs it:
//! - adopting the fds a service manager handed us by number ([`adopt_inherited`]);
//! - shutting down connection sockets by number at a forced cut ([`shutdown_registered`]);
//! - reading a signal's disposition ([`has_default_disposition`]);
//! - removing environment variables, sound only while the process has one thread;
//! - starting the restart child with the listeners at fds 3.. and `LISTEN_PID` set to the
//!   child's *own* pid ([`spawn`]), which has to happen between `fork` and `execve`, where only
//!   async-signal-safe calls are allowed.
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

/// Registers an owned fd (a pidfd) with the tokio reactor for readability. On failure the fd is
/// given back with the error.
pub(crate) fn register_readable(
    fd: OwnedFd,
) -> Result<tokio::io::unix::AsyncFd<OwnedFd>, (OwnedFd, io::Error)> {
    register(fd, tokio::io::Interest::READABLE)
}

/// Registers an owned fd with the tokio reactor for `interest`. On failure the fd is given back
/// with the error.
pub(crate) fn register(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> Result<tokio::io::unix::AsyncFd<OwnedFd>, (OwnedFd, io::Error)> {
    // SAFETY: an OwnedFd is open for as long as it lives and always returns the same number
    // from as_raw_fd; the AsyncFd owns it until it is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| e.into_parts())
}

/// `shutdown(SHUT_RDWR)` on a connection's socket by number: whoever reads or writes it gets
/// EOF or an error and lets go. The fd stays open (its owner closes it).
///
/// # Safety
/// `fd` must be open, and stay open for the duration of the call: the caller holds the lock of
/// the registry the fd was taken from, whose entries are removed before their sockets close
/// (see `drain::Registration`).
pub(crate) unsafe fn shutdown_registered(fd: RawFd) {
    // SAFETY: the caller guarantees the fd is open for the duration of this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
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

/// Takes ownership of an inherited fd after checking that it is an open, listening stream
/// socket of family INET, INET6 or UNIX. On error the fd is left as it was (open, and
/// close-on-exec), and the message says what it is instead.
///
/// The caller must own the fd number: [`crate::startup::Startup::take_fds`] guarantees that
/// only one caller per process adopts the `LISTEN_FDS` range.
pub(crate) fn adopt_inherited(fd: RawFd) -> Result<(OwnedFd, StreamFamily), String> {
    set_cloexec_raw(fd).map_err(|e| match e.raw_os_error() {
        Some(libc::EBADF) => "is not open".to_string(),
        _ => format!("cannot be inspected: {e}"),
    })?;
    // SAFETY: the fd is open (F_GETFD just succeeded) and stays open for the lifetime of this
    // borrow: the inherited range belongs to this one caller, and nothing else closes it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let stat = rustix::fs::fstat(borrowed).map_err(|e| format!("cannot be inspected: {e}"))?;
    let file_type = FileType::from_raw_mode(stat.st_mode);
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

/// How to start the restart child, prepared entirely before `fork` so that the child needs no
/// allocation between `fork` and `execve`.
pub(crate) struct ExecPlan {
    path: CString,
    // The CStrings own the bytes the pointer arrays point into.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _env: Vec<Vec<u8>>,
    envp_ptrs: Vec<*const c_char>,
    /// Points at the first digit of the `LISTEN_PID=` entry, which has room for any pid.
    listen_pid_digits: *mut u8,
    /// The listeners, in order: child fd 3 + i gets `fds[i]`. Owned (duplicates of the
    /// server's), so they stay open until the fork is done whatever the server does meanwhile.
    fds: Vec<OwnedFd>,
    /// Room for the temporary copies of `fds` made in the child.
    scratch: Vec<RawFd>,
    cwd: Option<CString>,
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
        })
    }
}

/// A started child: its pid and a pidfd to wait for it or signal it without pid-reuse races.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
}

/// Starts `plan` as a grandchild (fork, fork, execve) and returns once `execve` has succeeded,
/// or the error it failed with. Blocks until then: call it from a blocking thread.
///
/// Why a grandchild: the intermediate process exits at once, so the new process is re-parented
/// to the service manager (PID 1, or the nearest subreaper, such as a `systemd --user`
/// manager) before anyone hears of it. systemd treats a `MAINPID=` that is not its own child as
/// "alien" and, on `systemctl stop`, does not wait for it after SIGTERM but SIGKILLs at once,
/// cutting its requests; as its child, the new process gets the full graceful stop. Its exit
/// status goes to its new parent, which reaps it: we never leave a zombie, and watch it (and
/// signal it) through the pidfd only.
pub(crate) fn spawn(mut plan: ExecPlan) -> io::Result<Spawned> {
    let n = plan.fds.len();
    let floor = c_int::try_from(3 + n)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many listeners"))?;
    // The child ends of the pipes live at >= 3 + n, so the child's dup2 onto 3..3+n cannot
    // clobber them.
    //
    // `report`: execve's errno comes back on it; EOF means exec succeeded (close-on-exec).
    let (report_read, report_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let report_write = move_above(report_write, floor)?;
    // `go`: the new process waits on it until we hold its pidfd. Until then it is alive, so
    // nothing can reap it and free its pid before pidfd_open.
    let (go_read, go_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let go_read = move_above(go_read, floor)?;
    // `pid`: the intermediate process tells us the new process's pid (or -errno of its fork).
    let (pid_read, pid_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;

    // Block every signal across the forks, so that no handler of ours runs in a child before
    // it has reset them all to their defaults (a signal-hook handler would write into our
    // self-pipe). The new process unblocks after the reset; we restore our mask right away.
    let mut all: libc::sigset_t = zeroed_sigset();
    let mut old: libc::sigset_t = zeroed_sigset();
    // SAFETY: sigfillset/pthread_sigmask write only into the sigset_t values passed.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: fork() is safe to call; what matters is what the children do before execve. In a
    // multi-threaded parent they may only use async-signal-safe functions: the intermediate
    // forks, writes 4 bytes and _exits; `exec_child` only makes raw syscalls (sigaction,
    // sigprocmask, read, fcntl, dup2, close_range, chdir, getpid, execve, write, _exit) and
    // writes into memory prepared before the fork.
    let mid = unsafe { libc::fork() };
    if mid == 0 {
        // SAFETY: we are the intermediate child; the same rules apply.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                exec_child(
                    &mut plan,
                    report_write.as_raw_fd(),
                    go_read.as_raw_fd(),
                    floor,
                )
            }
            let value: i32 = if pid < 0 {
                -*libc::__errno_location()
            } else {
                pid
            };
            let bytes = value.to_ne_bytes();
            libc::write(pid_write.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0)
        }
    }
    let fork_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if mid < 0 {
        return Err(fork_error);
    }
    drop(report_write);
    drop(go_read);
    drop(pid_write);
    // The intermediate is our child and exits at once: reap it.
    if let Some(mid) = rustix::process::Pid::from_raw(mid) {
        let _ = rustix::process::waitpid(Some(mid), rustix::process::WaitOptions::empty());
    }
    let mut value = [0u8; 4];
    read_full(&pid_read, &mut value)?;
    let pid = i32::from_ne_bytes(value);
    let Some(child) = rustix::process::Pid::from_raw(pid).filter(|_| pid > 0) else {
        return Err(io::Error::from_raw_os_error(-pid));
    };

    // The new process is blocked on `go`, so `pid` is still it.
    let pidfd = match rustix::process::pidfd_open(child, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            // Closing `go` without a byte tells it to exit without executing anything; its new
            // parent reaps it.
            return Err(io::Error::new(
                e.kind(),
                format!("pidfd_open failed (Linux >= 5.3 is required): {e}"),
            ));
        }
    };
    let kill = |pidfd: &OwnedFd| {
        let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL);
    };
    if let Err(e) = rustix::io::write(&go_write, b"1") {
        kill(&pidfd);
        return Err(e.into());
    }
    drop(go_write);

    let mut errno = [0u8; 4];
    match read_full(&report_read, &mut errno) {
        Ok(0) => Ok(Spawned {
            pid: pid as u32,
            pidfd,
        }),
        // It wrote execve's errno and exits.
        Ok(_) => Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno))),
        Err(e) => {
            kill(&pidfd);
            Err(e)
        }
    }
}

/// Reads until `buf` is full or EOF; returns how many bytes came.
fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// How a process that is not our child ended, if it is still a zombie: `/proc/PID/stat`
/// field 52 holds its wait status until its parent reaps it. Best effort: a parent that reaps
/// at once (systemd does) leaves nothing to read.
pub(crate) fn exit_description(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    // fields[0] is field 3 (state); field 52 (exit_code) is fields[49].
    if fields.first() != Some(&"Z") {
        return None;
    }
    let status: i32 = fields.get(49)?.trim().parse().ok()?;
    Some(if status & 0x7f == 0 {
        format!("exited with status {}", (status >> 8) & 0xff)
    } else {
        format!("was killed by signal {}", status & 0x7f)
    })
}

/// Moves `fd` to a number >= `floor` (close-on-exec). The original is closed: a pipe end left
/// open twice would keep its reader from ever seeing EOF.
fn move_above(fd: OwnedFd, floor: c_int) -> io::Result<OwnedFd> {
    let moved = rustix::io::fcntl_dupfd_cloexec(&fd, floor)?;
    drop(fd);
    Ok(moved)
}

fn zeroed_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; all-zero is a valid (empty) value on Linux.
    unsafe { std::mem::zeroed() }
}

/// The child side of [`spawn`]: between `fork` and `execve`.
///
/// # Safety
/// Must only be called in the child of `fork`, with `err_fd` the write end of the report pipe
/// and `go_fd` the read end of the go pipe, both placed at or above `floor` = 3 + number of
/// listeners, and every signal blocked.
unsafe fn exec_child(plan: &mut ExecPlan, err_fd: RawFd, go_fd: RawFd, floor: c_int) -> ! {
    // SAFETY (whole function): only async-signal-safe syscalls; every pointer passed points into
    // `plan`, which was fully built before the fork and is not reallocated here.
    unsafe {
        // A clean signal state for the new program: handlers back to their defaults (ignored
        // signals stay ignored, as across any exec, except SIGPIPE, which the Rust runtime
        // ignores for itself), then nothing blocked.
        for sig in 1..=64 {
            // 64 = _NSIG - 1 on Linux. glibc reserves 32 and 33: sigaction refuses them.
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut current) == 0
                && (current.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
                && current.sa_sigaction != libc::SIG_DFL
            {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &default, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        // Wait until the parent holds our pidfd; EOF without the byte means it gave up.
        let mut go = 0u8;
        loop {
            let r = libc::read(go_fd, (&mut go as *mut u8).cast(), 1);
            if r == 1 {
                break;
            }
            if r < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            libc::_exit(127);
        }

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
/// Child of `fork` only.
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
    fn not_a_socket_is_named() {
        let file = std::fs::File::open("/proc/self/status").expect("open");
        let fd = file.as_raw_fd();
        let err = adopt_inherited(fd).expect_err("a file is not a listener");
        assert!(err.contains("regular file"), "{err}");
        drop(file);
    }
}
