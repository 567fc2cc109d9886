//! The one error type of the crate.
//!
//! Every error says *what* was wrong and *what was expected*: the variable and its value, the fd
//! number, the address, the path of the new binary. The kinds are private so that cases can be
//! added without breaking users; [`Error::kind`] gives a coarse, stable classification.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// The error type services and bodies may return.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error from acquiring listeners, serving, or restarting.
///
/// Convert it into an [`io::Error`] with `From` when a function of yours returns `io::Result`.
/// Its `Debug` output is its message, so `fn main() -> Result<(), Box<dyn Error>>` prints
/// something a person can read.
pub struct Error {
    inner: Inner,
}

/// A coarse classification of an [`Error`], stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A `LISTEN_*` variable, or another variable of the systemd protocols, is malformed.
    Environment,
    /// An inherited file descriptor is not what the protocol promised (not open, not a
    /// socket, not listening, wrong type or family).
    InheritedFd,
    /// Binding the configured address failed.
    Bind,
    /// Registering a signal handler failed (for example a forbidden signal like `SIGKILL`).
    Signal,
    /// The server is configured in a way that cannot work: a listener no service claims, a
    /// service for a listener that does not exist, two services for one listener, a second
    /// restart-capable server in the process.
    Config,
    /// Any other I/O error.
    Io,
}

#[derive(Debug)]
pub(crate) enum Inner {
    /// An environment variable has a value that cannot be used.
    BadVar {
        var: &'static str,
        value: OsString,
        expected: &'static str,
    },
    /// The fd named by `LISTEN_FDS` is unusable.
    BadFd {
        fd: RawFd,
        name: String,
        problem: String,
    },
    Bind {
        addr: String,
        source: io::Error,
        /// What to do about it, when known.
        hint: Option<String>,
    },
    Signal {
        signal: i32,
        source: io::Error,
    },
    Io {
        context: &'static str,
        source: io::Error,
    },
    Config(String),
}

/// Why a restart did not hand over. Not an [`Error`]: a failed restart is logged and reported
/// in `STATUS=`, and serving carries on.
#[derive(Debug)]
pub(crate) enum RestartFailure {
    /// `execve` (or the preparation around it) failed: missing, not executable, ...
    Spawn { exe: PathBuf, source: io::Error },
    /// No new process could be created (`clone3`/`clone` refused, out of fds or memory).
    Start { source: io::Error },
    /// The child was ready, but the service manager could not be told (its queue stayed full,
    /// or it is gone); the child was stopped.
    Undelivered { what: String, source: io::Error },
    /// The child exited before it reported `READY=1`, saying why if it did
    /// ([`crate::reason`]).
    Exited {
        pid: u32,
        status: ChildExit,
        reason: Option<String>,
    },
    /// The child did not report `READY=1` in time.
    Timeout {
        pid: u32,
        after: std::time::Duration,
    },
    /// A close signal arrived while the child was starting.
    Cancelled { pid: u32 },
    /// Something around the hand-off itself failed (socket, pidfd, ...).
    Io {
        context: &'static str,
        source: io::Error,
    },
}

/// How a restart's new process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChildExit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It is gone, and how is not known (a sibling its parent reaped first).
    Unknown,
}

impl ChildExit {
    /// As the standard library describes a wait status.
    pub(crate) fn exit_status(&self) -> Option<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        match *self {
            ChildExit::Code(code) => Some(std::process::ExitStatus::from_raw((code & 0xff) << 8)),
            ChildExit::Signal(sig) => Some(std::process::ExitStatus::from_raw(sig & 0x7f)),
            ChildExit::Unknown => None,
        }
    }
}

impl fmt::Display for ChildExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ChildExit::Code(code) => write!(f, "exited with status {code}"),
            ChildExit::Signal(sig) => {
                let name = match sig {
                    libc::SIGABRT => "SIGABRT",
                    libc::SIGBUS => "SIGBUS",
                    libc::SIGFPE => "SIGFPE",
                    libc::SIGILL => "SIGILL",
                    libc::SIGINT => "SIGINT",
                    libc::SIGKILL => "SIGKILL",
                    libc::SIGSEGV => "SIGSEGV",
                    libc::SIGTERM => "SIGTERM",
                    _ => return write!(f, "was killed by signal {sig}"),
                };
                write!(f, "was killed by signal {sig} ({name})")
            }
            ChildExit::Unknown => f.write_str("exited"),
        }
    }
}

impl RestartFailure {
    /// The new process's pid, if one was started.
    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            RestartFailure::Exited { pid, .. }
            | RestartFailure::Timeout { pid, .. }
            | RestartFailure::Cancelled { pid } => Some(*pid),
            _ => None,
        }
    }
}

impl Error {
    pub(crate) fn new(inner: Inner) -> Error {
        Error { inner }
    }

    pub(crate) fn bad_var(
        var: &'static str,
        value: impl Into<OsString>,
        expected: &'static str,
    ) -> Error {
        Error::new(Inner::BadVar {
            var,
            value: value.into(),
            expected,
        })
    }

    pub(crate) fn io(context: &'static str, source: io::Error) -> Error {
        Error::new(Inner::Io { context, source })
    }

    /// The same error with `hint` on a bind error whose address was in use; others as they
    /// are.
    pub(crate) fn hint_if_in_use(mut self, hint: impl FnOnce() -> Option<String>) -> Error {
        if let Inner::Bind {
            source, hint: h, ..
        } = &mut self.inner
        {
            if source.kind() == io::ErrorKind::AddrInUse {
                *h = hint();
            }
        }
        self
    }

    pub(crate) fn config(message: impl Into<String>) -> Error {
        Error::new(Inner::Config(message.into()))
    }

    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self.inner {
            Inner::BadVar { .. } => ErrorKind::Environment,
            Inner::BadFd { .. } => ErrorKind::InheritedFd,
            Inner::Bind { .. } => ErrorKind::Bind,
            Inner::Signal { .. } => ErrorKind::Signal,
            Inner::Io { .. } => ErrorKind::Io,
            Inner::Config(_) => ErrorKind::Config,
        }
    }

    /// The environment variable this error is about, if any.
    pub fn variable(&self) -> Option<&'static str> {
        match self.inner {
            Inner::BadVar { var, .. } => Some(var),
            _ => None,
        }
    }

    /// The inherited file descriptor this error is about, if any.
    pub fn fd(&self) -> Option<RawFd> {
        match self.inner {
            Inner::BadFd { fd, .. } => Some(fd),
            _ => None,
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self} ({:?})", self.kind())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::BadVar {
                var,
                value,
                expected,
            } => write!(f, "{var}={value:?} is malformed: expected {expected}"),
            Inner::BadFd { fd, name, problem } => write!(
                f,
                "inherited fd {fd} (LISTEN_FDNAMES name {name:?}) {problem}"
            ),
            Inner::Bind {
                addr,
                source,
                hint: None,
            } => write!(f, "could not bind {addr}: {source}"),
            Inner::Bind {
                addr,
                source,
                hint: Some(hint),
            } => write!(f, "could not bind {addr}: {source}; {hint}"),
            Inner::Signal { signal, source } => {
                write!(f, "could not listen for signal {signal}: {source}")
            }
            Inner::Io { context, source } => write!(f, "{context}: {source}"),
            Inner::Config(msg) => f.write_str(msg),
        }
    }
}

impl fmt::Display for RestartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartFailure::Spawn { exe, source } => {
                write!(
                    f,
                    "could not execute the new binary {}: {source}",
                    exe.display()
                )
            }
            RestartFailure::Start { source } => {
                write!(f, "could not start a new process: {source}")
            }
            RestartFailure::Undelivered { what, source } => write!(
                f,
                "could not deliver {what} to the service manager ({source}); the new process was stopped"
            ),
            RestartFailure::Exited {
                pid,
                status,
                reason: None,
            } => {
                write!(f, "new process {pid} {status} before it reported READY=1")
            }
            RestartFailure::Exited {
                pid,
                status,
                reason: Some(reason),
            } => {
                write!(
                    f,
                    "new process {pid} {status} before it reported READY=1: {reason}"
                )
            }
            RestartFailure::Timeout { pid, after } => write!(
                f,
                "new process {pid} did not report READY=1 within {after:?}; it was killed"
            ),
            RestartFailure::Cancelled { pid } => write!(
                f,
                "a close signal arrived while new process {pid} was starting; it was killed"
            ),
            RestartFailure::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.inner {
            Inner::Bind { source, .. }
            | Inner::Signal { source, .. }
            | Inner::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        let kind = match err.kind() {
            ErrorKind::Environment | ErrorKind::InheritedFd | ErrorKind::Config => {
                io::ErrorKind::InvalidInput
            }
            ErrorKind::Bind => match &err.inner {
                Inner::Bind { source, .. } => source.kind(),
                _ => io::ErrorKind::Other,
            },
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, err)
    }
}
