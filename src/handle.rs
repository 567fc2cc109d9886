//! Drive a server from code: restart it, shut it down, watch its lifecycle state.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

/// Where a server is in its life. Published to every [`Handle`] (and every request, through
/// [`crate::ConnectionInfo::state`]) as it changes.
///
/// ```text
///  Starting ─▶ Serving ◀──────────▶ Restarting ──(successor ready)──▶ HandedOver ─▶ Stopped
///                 │                     │
///                 └──(close)──▶ LameDuck ─▶ Draining ─▶ Stopped
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// The server has not reported `READY=1` yet.
    Starting,
    /// Accepting and serving.
    Serving,
    /// Serving, while a new process starts to take over.
    Restarting,
    /// A shutdown began ([`crate::Server::shutdown_delay`]): still accepting and serving, so
    /// that load balancers can notice (health checks should fail now) and move traffic away.
    LameDuck,
    /// No longer accepting; finishing the requests already accepted.
    Draining,
    /// The successor with this pid serves now; this process finishes what it accepted. If the
    /// successor dies before that is done, this process serves again ([`State::Serving`]).
    HandedOver {
        /// The pid of the process that serves now.
        pid: u32,
    },
    /// Serving is over.
    Stopped,
}

impl State {
    /// Whether the *service* is going away: a lame duck, draining or stopped server without a
    /// successor. A readiness check (`/healthz`) should fail from the moment this is true. Not
    /// true after a hand-off: the service goes on in the new process.
    pub fn is_shutting_down(&self) -> bool {
        matches!(self, State::LameDuck | State::Draining | State::Stopped)
    }

    /// Whether this process still accepts new connections.
    pub fn is_accepting(&self) -> bool {
        matches!(self, State::Serving | State::Restarting | State::LameDuck)
    }

    /// A short lower-case name: `serving`, `lame duck`, ...
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Restarting => "restarting",
            State::LameDuck => "lame duck",
            State::Draining => "draining",
            State::HandedOver { .. } => "handed over",
            State::Stopped => "stopped",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::HandedOver { pid } => write!(f, "handed over to pid {pid}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// A restart that handed over: the new process serves now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Restarted {
    /// The pid of the new process.
    pub pid: u32,
    /// From the start of the restart to the new process's `READY=1` being relayed.
    pub ready_after: Duration,
}

/// Why [`Handle::restart`] did not hand over. In every case this process keeps doing what it
/// did: serving (or shutting down, if it was).
///
/// For a new process that failed ([`RestartErrorKind::Failed`]): its pid ([`RestartError::pid`]),
/// how it ended ([`RestartError::exit_status`]), and the reason it gave
/// ([`RestartError::reason`]): a process started by a handover restart that fails before it
/// reports `READY=1` sends the old one a short reason (at most 1 KiB) before it exits: the
/// message of a panic, of an error from [`crate::Listeners::from_env`], from the server
/// (`serve(..).await`), from `TlsCertificate::load_pem` (feature `rustls`), or what the application
/// passes to [`crate::report_start_failure`]. The `Display` says all of it in one sentence
/// (it does not start with "restart failed").
///
/// ```
/// fn describe(e: &handover::RestartError) -> String {
///     match (e.pid(), e.reason()) {
///         (Some(pid), Some(why)) => format!("restart failed: pid {pid} said: {why}"),
///         _ => format!("restart failed: {e}"),
///     }
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartError {
    kind: RestartErrorKind,
    message: String,
    pid: Option<u32>,
    exit_status: Option<std::process::ExitStatus>,
    reason: Option<String>,
}

/// The class of a [`RestartError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestartErrorKind {
    /// A restart is already under way (asked for by a signal or another handle call).
    AlreadyRestarting,
    /// The server is shutting down; it does not restart any more.
    ShuttingDown,
    /// The server is not running (it stopped, or its future was dropped).
    NotServing,
    /// Restarts are disabled for this server ([`crate::Server::restarts`]).
    Disabled,
    /// This process has handed over already: the service runs in the new process (restart it
    /// there).
    HandedOver,
    /// The new process could not be started, failed, or was not ready in time; it was killed.
    Failed,
}

impl RestartError {
    pub(crate) fn new(kind: RestartErrorKind, message: impl Into<String>) -> RestartError {
        RestartError {
            kind,
            message: message.into(),
            pid: None,
            exit_status: None,
            reason: None,
        }
    }

    /// A failed restart, as this process (pid `own_pid`) reports it: the failure, and that this
    /// process keeps serving.
    pub(crate) fn failed(failure: &crate::error::RestartFailure, own_pid: u32) -> RestartError {
        let (exit_status, reason) = match failure {
            crate::error::RestartFailure::Exited { status, reason, .. } => {
                (status.exit_status(), reason.clone())
            }
            _ => (None, None),
        };
        RestartError {
            kind: RestartErrorKind::Failed,
            message: format!("{failure}; this process (pid {own_pid}) keeps serving"),
            pid: failure.pid(),
            exit_status,
            reason,
        }
    }

    /// The class of the error.
    pub fn kind(&self) -> RestartErrorKind {
        self.kind
    }

    /// The pid of the new process, if one was started.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// How the new process ended, if it exited (or was killed by a signal) before it was
    /// ready: [`std::process::ExitStatus::code`], or with
    /// [`std::os::unix::process::ExitStatusExt::signal`] the signal. `None` when it was
    /// stopped by this process (a timeout, a close signal), or how it ended is not known.
    pub fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.exit_status
    }

    /// What the new process said about why it failed, if it said anything before it exited:
    /// one line, at most 1 KiB.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }
}

impl fmt::Display for RestartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RestartError {}

/// What a handle asks of the server.
#[derive(Debug)]
pub(crate) enum Command {
    Restart(oneshot::Sender<Result<Restarted, RestartError>>),
    Shutdown { force: bool },
}

/// Restart, shut down, or watch a server from code.
///
/// A [`Handle`] is obtained from a [`crate::Server`] before it is awaited, is cheap to clone,
/// and is `Send`, so it can go into application state (an admin endpoint that restarts the
/// service) or another task. The handle, the signals and a lost listener all drive one and the
/// same lifecycle: a restart asked for through the handle while one runs is refused with
/// [`RestartErrorKind::AlreadyRestarting`], exactly as a second `SIGUSR1` is coalesced.
///
/// Commands sent before the server runs wait for it: they are acted upon once it is serving.
///
/// # Example
/// ```no_run
/// # async fn example(listeners: handover::Listeners) -> Result<(), handover::Error> {
/// # let app = tower::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
/// #     Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
/// # });
/// let server = handover::serve(listeners, app);
/// let handle = server.handle();
/// tokio::spawn(async move {
///     // e.g. after a deploy: start the new binary, learn whether it took over.
///     match handle.restart().await {
///         Ok(restarted) => println!("pid {} serves now", restarted.pid),
///         Err(e) => eprintln!("still serving here: {e}"),
///     }
/// });
/// server.await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Sender<State>,
}

impl Handle {
    /// A handle, and the receiving end of its commands, which the server keeps: dropping the
    /// server (run or not) ends the commands, and a restart asked for then says `NotServing`.
    pub(crate) fn new() -> (Handle, mpsc::UnboundedReceiver<Command>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let handle = Handle {
            inner: Arc::new(Inner {
                commands,
                state: watch::Sender::new(State::Starting),
            }),
        };
        (handle, receiver)
    }

    /// Starts a restart and waits for its outcome: `Ok` once the new process is ready and the
    /// service manager knows it as the main process (this process then drains and stops), or
    /// why it did not happen (this process keeps serving).
    ///
    /// # Cancel safety
    /// Dropping the future does not cancel the restart; only its outcome is not reported.
    pub async fn restart(&self) -> Result<Restarted, RestartError> {
        let (tx, rx) = oneshot::channel();
        if self.inner.commands.send(Command::Restart(tx)).is_err() {
            return Err(not_serving());
        }
        rx.await.unwrap_or_else(|_| Err(not_serving()))
    }

    /// Shuts the server down gracefully, as a close signal does (including the
    /// [`crate::Server::shutdown_delay`]). Returns at once; watch the state, or await the
    /// server's future, to know when it is done. Does nothing if it is already shutting down.
    pub fn shutdown(&self) {
        let _ = self.inner.commands.send(Command::Shutdown { force: false });
    }

    /// Shuts the server down now: stops accepting and cuts every connection, as a second
    /// close signal does. Hooks still run, within the drain deadline.
    pub fn shutdown_now(&self) {
        let _ = self.inner.commands.send(Command::Shutdown { force: true });
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.inner.state.borrow()
    }

    /// A receiver that sees every state change, for a task that waits for one (for example
    /// `watch.wait_for(|s| s.is_shutting_down())`).
    pub fn watch(&self) -> watch::Receiver<State> {
        self.inner.state.subscribe()
    }

    pub(crate) fn set_state(&self, state: State) {
        self.inner.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

fn not_serving() -> RestartError {
    RestartError::new(
        RestartErrorKind::NotServing,
        "the server is not running (it stopped, or its future was dropped)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_restart_carries_the_pid_the_exit_status_and_the_reason() {
        use crate::error::{ChildExit, RestartFailure};
        use std::os::unix::process::ExitStatusExt;
        let failure = RestartFailure::Exited {
            pid: 42,
            status: ChildExit::Code(1),
            reason: Some("TLS certificate file /x.pem: not PEM".to_string()),
        };
        let e = RestartError::failed(&failure, 7);
        assert_eq!(e.kind(), RestartErrorKind::Failed);
        assert_eq!(e.pid(), Some(42));
        assert_eq!(e.exit_status().and_then(|s| s.code()), Some(1));
        assert_eq!(e.reason(), Some("TLS certificate file /x.pem: not PEM"));
        assert_eq!(
            e.to_string(),
            "new process 42 exited with status 1 before it reported READY=1: TLS certificate file /x.pem: not PEM; this process (pid 7) keeps serving"
        );
        let killed = RestartFailure::Exited {
            pid: 43,
            status: ChildExit::Signal(libc::SIGKILL),
            reason: None,
        };
        let e = RestartError::failed(&killed, 7);
        assert_eq!(
            e.exit_status().and_then(|s| s.signal()),
            Some(libc::SIGKILL)
        );
        assert_eq!(e.reason(), None);
        assert!(
            e.to_string().starts_with(
                "new process 43 was killed by signal 9 (SIGKILL) before it reported READY=1;"
            ),
            "{e}"
        );
        let timeout = RestartFailure::Timeout {
            pid: 44,
            after: Duration::from_secs(1),
        };
        let e = RestartError::failed(&timeout, 7);
        assert_eq!(
            (e.pid(), e.exit_status(), e.reason()),
            (Some(44), None, None)
        );
    }

    #[tokio::test]
    async fn a_restart_asked_of_a_server_dropped_unrun_says_not_serving() {
        let server = crate::Server::new(crate::Listeners::default());
        let handle = server.handle();
        drop(server);
        let err = handle.restart().await.expect_err("no server");
        assert_eq!(err.kind(), RestartErrorKind::NotServing);
        assert_eq!(handle.state(), State::Starting);
    }
}
