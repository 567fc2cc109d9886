//! Drive a server from code: restart it, shut it down, watch its lifecycle state.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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

    /// Whether this process is going away: it stopped accepting for good, because it handed
    /// over to a successor ([`State::HandedOver`]) or the service is draining or stopped. The
    /// moment for a long-lived connection (a WebSocket, a server-sent-events stream) to say
    /// goodbye: a client that reconnects now reaches the process that serves from now on.
    ///
    /// Not true for a [`State::LameDuck`]: it still accepts, so a client told to go away would
    /// likely reconnect to it, only to be told again when the drain begins.
    pub fn is_going_away(&self) -> bool {
        matches!(
            self,
            State::HandedOver { .. } | State::Draining | State::Stopped
        )
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
    /// Where the server passes connections once it handed over to a successor that takes
    /// them: here, so that an upgraded connection, which knows its handle, can find it.
    hand_off: crate::conn::serve::HandOffSlot,
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
                hand_off: Arc::default(),
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

    /// A [`tokio::sync::watch::Receiver`] that sees every state change.
    ///
    /// To wait for a moment from a spawned task, prefer [`Handle::going_away`],
    /// [`Handle::shutting_down`] or [`Handle::handed_over`]: their futures are `Send`. The
    /// receiver's `wait_for` returns a [`tokio::sync::watch::Ref`], which is not `Send`: held
    /// across an `.await` in a spawned task, it does not compile.
    pub fn watch(&self) -> watch::Receiver<State> {
        self.inner.state.subscribe()
    }

    /// Resolves once this process is going away ([`State::is_going_away`]: handed over, or
    /// draining, or stopped), with the state that made it so; at once if it already is. What a
    /// WebSocket or server-sent-events handler awaits to say goodbye (a WebSocket Close with
    /// code 1001, "going away"), so that the client reconnects to the process that serves now,
    /// and this one exits as soon as its last connection is closed instead of at the drain
    /// deadline.
    ///
    /// The future is `Send + 'static`: it can be awaited in a spawned task, in a `select!`
    /// with the connection's reads, or kept in a struct.
    ///
    /// # Example
    /// ```
    /// # async fn example(handle: handover::Handle) {
    /// let going_away = handle.going_away();
    /// let task = tokio::spawn(async move {
    ///     let state = going_away.await;
    ///     // e.g. send a WebSocket Close frame with code 1001 here.
    ///     println!("saying goodbye: {state}");
    /// });
    /// # drop(task);
    /// # }
    /// ```
    ///
    /// # Cancel safety
    /// Dropping it changes nothing; a new one sees the current state first.
    pub fn going_away(&self) -> StateReached {
        self.reached("going away", State::is_going_away)
    }

    /// Resolves once the service is shutting down ([`State::is_shutting_down`]: the lame duck,
    /// draining, or stopped), with that state; at once if it already is. Not after a hand-off
    /// (the service goes on in the new process): see [`Handle::going_away`] for both.
    /// `Send + 'static`, like [`Handle::going_away`].
    pub fn shutting_down(&self) -> StateReached {
        self.reached("shutting down", State::is_shutting_down)
    }

    /// Resolves once this process has handed over to a successor ([`State::HandedOver`],
    /// which carries its pid); at once if it already has. Stays pending if the service shuts
    /// down instead: see [`Handle::going_away`] for both. `Send + 'static`, like
    /// [`Handle::going_away`].
    pub fn handed_over(&self) -> StateReached {
        self.reached("handed over", |s| matches!(s, State::HandedOver { .. }))
    }

    fn reached(&self, what: &'static str, done: fn(&State) -> bool) -> StateReached {
        let mut receiver = self.inner.state.subscribe();
        StateReached {
            what,
            inner: Box::pin(async move {
                loop {
                    // Copied out at once: a `watch::Ref` held across the `.await` below would
                    // make this future `!Send`.
                    let state = *receiver.borrow_and_update();
                    if done(&state) {
                        return state;
                    }
                    if receiver.changed().await.is_err() {
                        // Every handle is gone, so the state cannot change any more: the server
                        // is gone with them. Report the last state rather than hang for ever.
                        return *receiver.borrow();
                    }
                }
            }),
        }
    }

    pub(crate) fn hand_off_slot(&self) -> &crate::conn::serve::HandOffSlot {
        &self.inner.hand_off
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

/// A moment of a server's life, awaited: returned by [`Handle::going_away`],
/// [`Handle::shutting_down`] and [`Handle::handed_over`] (and the same methods of
/// [`crate::ConnectionInfo`]). Resolves to the [`State`] that reached it.
///
/// `Send + 'static`, unlike waiting on a [`tokio::sync::watch::Receiver`] with `wait_for`
/// (whose `Ref` is not `Send`): it can be awaited in a spawned task. It also resolves, with the
/// last state, if the server and every handle to it are gone, rather than hang for ever.
#[must_use = "futures do nothing unless awaited"]
pub struct StateReached {
    what: &'static str,
    inner: Pin<Box<dyn Future<Output = State> + Send + 'static>>,
}

impl Future for StateReached {
    type Output = State;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<State> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for StateReached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateReached")
            .field("waiting_for", &self.what)
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

    fn assert_send_static<T: Send + 'static>(_: &T) {}

    /// Polls `fut` once, without a runtime's help.
    fn poll_once(fut: &mut StateReached) -> Poll<State> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(fut).poll(&mut cx)
    }

    #[test]
    fn going_away_means_no_longer_accepting_for_good() {
        let going = [
            State::HandedOver { pid: 7 },
            State::Draining,
            State::Stopped,
        ];
        let staying = [
            State::Starting,
            State::Serving,
            State::Restarting,
            State::LameDuck,
        ];
        assert!(going.iter().all(State::is_going_away));
        assert!(!staying.iter().any(State::is_going_away));
    }

    #[tokio::test]
    async fn each_moment_resolves_on_its_states_only_and_with_the_state() {
        let (handle, _commands) = Handle::new();
        let mut going = handle.going_away();
        let mut shutting = handle.shutting_down();
        let mut handed = handle.handed_over();
        assert_send_static(&going);
        for state in [State::Serving, State::Restarting, State::Serving] {
            handle.set_state(state);
            assert!(poll_once(&mut going).is_pending(), "{state}");
            assert!(poll_once(&mut shutting).is_pending(), "{state}");
            assert!(poll_once(&mut handed).is_pending(), "{state}");
        }
        handle.set_state(State::LameDuck);
        assert_eq!(poll_once(&mut shutting), Poll::Ready(State::LameDuck));
        assert!(
            poll_once(&mut going).is_pending(),
            "a lame duck still accepts"
        );
        handle.set_state(State::Draining);
        assert_eq!(poll_once(&mut going), Poll::Ready(State::Draining));
        assert!(poll_once(&mut handed).is_pending());
    }

    #[tokio::test]
    async fn a_spawned_task_sees_the_hand_off_and_its_pid() {
        let (handle, _commands) = Handle::new();
        handle.set_state(State::Serving);
        let handed = handle.handed_over();
        let going = handle.going_away();
        let task = tokio::spawn(async move { (handed.await, going.await) });
        handle.set_state(State::Restarting);
        handle.set_state(State::HandedOver { pid: 42 });
        let (handed, going) = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("resolved within 10 s")
            .expect("task ran");
        assert_eq!(handed, State::HandedOver { pid: 42 });
        assert_eq!(going, State::HandedOver { pid: 42 });
    }

    #[tokio::test]
    async fn a_moment_already_reached_resolves_at_once() {
        let (handle, _commands) = Handle::new();
        handle.set_state(State::Stopped);
        assert_eq!(
            poll_once(&mut handle.going_away()),
            Poll::Ready(State::Stopped)
        );
        assert_eq!(
            poll_once(&mut handle.shutting_down()),
            Poll::Ready(State::Stopped)
        );
    }

    #[tokio::test]
    async fn a_moment_of_a_server_gone_with_every_handle_resolves_with_the_last_state() {
        let (handle, commands) = Handle::new();
        handle.set_state(State::Serving);
        let mut handed = handle.handed_over();
        assert!(poll_once(&mut handed).is_pending());
        drop((handle, commands));
        assert_eq!(poll_once(&mut handed), Poll::Ready(State::Serving));
    }
}
