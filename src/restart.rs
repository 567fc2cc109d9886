//! Restart: start the new binary, hand it the listeners, and wait until it says it is ready.
//!
//! # The hand-off
//! 1. The child is the executable recorded at start-up, with the same arguments, working
//!    directory and environment, stdio inherited, the listeners at 3, 4, ... with
//!    `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` = the child's own pid, exactly what
//!    systemd would give it, and one more fd right after them: its end of a private channel to
//!    us (a `SOCK_SEQPACKET` socketpair), named by `HANDOVER_CHANNEL_FD`. The child runs the
//!    same code path as under systemd.
//! 2. The child reports `READY=1` on the channel. Its `NOTIFY_SOCKET` is a datagram socket of
//!    ours too (abstract namespace), for children that do not know the channel (older handover
//!    builds, other programs); there we accept `READY=1` only from the child's pid, checked
//!    with `SCM_CREDENTIALS`. Anyone who can see the abstract name can fill that socket's
//!    queue, nobody but the child can write to the channel. `HANDOVER_NOTIFY_SOCKET` is the
//!    service manager's socket, which the child uses after its `READY=1`.
//! 3. Until then we keep accepting. If the child exits, or is not ready within the timeout
//!    (counted from the start of the restart, the spawn included), or a close signal arrives,
//!    it is stopped (and reaped if it is ours), and we carry on as before.
//! 4. Once ready, we tell the service manager `MAINPID=<child>` and `READY=1` in **one**
//!    datagram: systemd checks the sender against the main pid before applying any of it, so a
//!    second datagram from us would already be refused under `NotifyAccess=main`. The hand-off
//!    has happened only once that datagram is *delivered* (in the manager's queue): while the
//!    queue is full we wait, until the same deadline (but at least a second). Not delivered in
//!    time, the child is stopped and we carry on: a manager that never heard `MAINPID=` would
//!    consider the service gone when we exit, and kill the child with it.
//!
//! The child is started directly as our *sibling* (`sys::spawn`, `CLONE_PARENT`): it is the
//! service manager's child (or init's, or a subreaper's) from the start, which reaps it
//! whatever happens, and which systemd needs to stop it gracefully later. We watch and signal
//! it through a pidfd. As PID 1 of a PID namespace (a container without an init) the kernel
//! refuses siblings: the child is ours, we reap it, and after the hand-off this process stays
//! on as its init (see [`crate::keeper`]).
//!
//! # Who may still act once the restart is abandoned
//! A [`Restarting`] dropped before the outcome (the server future dropped, a runtime shutting
//! down) kills the child at once and aborts the task. The decision "hand over" or "abandoned"
//! is taken under one lock ([`Gate`]), right around the send of the hand-off datagram, so after
//! the drop returns no `MAINPID=` can go out, and a child that was handed over is never killed.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{ChildExit, RestartFailure};
use crate::keeper;
use crate::listen::PassedListener;
use crate::notify::{self, Connected, MIN_PATIENCE, Notifier, NotifyState};
use crate::startup::{self, CHANNEL_VAR, EXCLUSIVE_VAR, PROTOCOL_VARS, UPSTREAM_NOTIFY_VAR};
use crate::sys::{self, ExecPlan, Placement};

/// A successful hand-off: the new process is ready and the service manager has been told.
#[derive(Debug)]
pub(crate) struct HandedOver {
    pub(crate) pid: u32,
    pub(crate) ready_after: Duration,
    /// The new process's pidfd, to forward a close signal that raced with the hand-off.
    pub(crate) pidfd: Arc<OwnedFd>,
    /// Our end of the private channel to the new process, kept open: established connections
    /// go over it (`handoff`), if the new process takes them.
    pub(crate) channel: Connected,
    /// The new process said, with its `READY=1`, that it takes connections
    /// ([`crate::handoff::ACCEPTS_CONNECTIONS`]).
    pub(crate) accepts_connections: bool,
    /// And upgraded connections ([`crate::handoff::ACCEPTS_UPGRADED`]).
    pub(crate) accepts_upgraded: bool,
    /// Started as our own child (as PID 1): the keeper, whose signal handlers run from the
    /// hand-off on, forwards close signals to it; forwarding here too would send one twice.
    pub(crate) keeper_forwards: bool,
}

impl HandedOver {
    /// Forwards `sig` to the new process: a close signal that arrived while the hand-off was
    /// being completed was meant for the service, which the new process is now.
    pub(crate) fn forward_signal(&self, sig: i32) {
        if self.keeper_forwards {
            return;
        }
        match sys::pidfd_signal(self.pidfd.as_fd(), sig) {
            Ok(()) => tracing::info!(
                pid = self.pid,
                signal = %crate::signals::name(sig),
                "the close signal raced with the hand-off: forwarded to the new process"
            ),
            Err(e) => tracing::error!(
                pid = self.pid,
                error = %e,
                "could not forward the close signal to the new process"
            ),
        }
    }
}

impl HandedOver {
    /// What the application learns of it.
    pub(crate) fn restarted(&self) -> crate::handle::Restarted {
        crate::handle::Restarted {
            pid: self.pid,
            ready_after: self.ready_after,
        }
    }
}

/// A restart in progress, on a task of its own.
///
/// Dropping it aborts the task, kills the child (and reaps it, if it is ours), and guarantees
/// that no `MAINPID=` is sent afterwards, unless the hand-off had already happened (then the
/// child is the service and is left alone).
#[derive(Debug)]
pub(crate) struct Restarting {
    cancel: CancellationToken,
    task: JoinHandle<Result<HandedOver, Failed>>,
    gate: Arc<Gate>,
}

/// A restart that did not happen: why, and the child to stop, if one was started.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) failure: RestartFailure,
    /// The child, still to be stopped: on a task of the caller's, so that the caller goes on
    /// handling events while it finishes its requests.
    pub(crate) rollback: Option<Rollback>,
}

/// A child whose restart was rolled back. It may have accepted connections already (it
/// serves from its start): it gets the same drain deadline as any handover process.
/// Dropped before [`Rollback::stop`] completes, it is killed at once.
#[derive(Debug)]
pub(crate) struct Rollback {
    child: Child,
    grace: Duration,
}

impl Rollback {
    /// The rollback still to run, or `None` if the child has exited already: then it is reaped
    /// (if ours) and its pidfd closed now, before the failure is reported (whoever learns of it
    /// may count this process's fds, or restart again at once).
    pub(crate) fn still_running(self) -> Option<Rollback> {
        let exited =
            self.child.exited.load(Ordering::Relaxed) || self.child.exit_status_now().is_some();
        (!exited).then_some(self)
    }

    /// Stops it: SIGTERM, SIGKILL only once `grace` (its drain deadline) and a second more
    /// have passed; reaped if it is ours.
    pub(crate) async fn stop(self) {
        self.child.stop(self.grace).await;
    }

    /// Its pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.pid
    }
}

impl Restarting {
    /// Starts a restart that hands over `listeners` (fd, name, exclusive). The fds are the restart's
    /// own (duplicates), closed once the child has them.
    pub(crate) fn start(
        listeners: Vec<PassedListener>,
        notifier: Arc<Notifier>,
        ready_timeout: Duration,
        watchdog_usec: Option<u64>,
        stop_grace: Duration,
    ) -> Restarting {
        let cancel = CancellationToken::new();
        let gate = Arc::new(Gate::default());
        let plan = Plan {
            listeners,
            notifier,
            ready_timeout,
            watchdog_usec,
            stop_grace,
        };
        let task = tokio::spawn(run(plan, cancel.clone(), Arc::clone(&gate)));
        Restarting { cancel, task, gate }
    }

    /// Waits for the outcome. Cancel safe (the restart goes on; await again).
    pub(crate) async fn outcome(&mut self) -> Result<HandedOver, Failed> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(Failed {
                failure: RestartFailure::Io {
                    context: "the restart task failed",
                    source: io::Error::other(e.to_string()),
                },
                rollback: None,
            }),
        }
    }

    /// Cancels: returns at once with the child, if started and not handed over to, to stop
    /// ([`Failed::rollback`]). `Ok` if the hand-off had happened already: forward the reason
    /// for cancelling to the new process ([`HandedOver::forward_signal`]).
    pub(crate) async fn cancel(mut self) -> Result<HandedOver, Failed> {
        self.cancel.cancel();
        self.outcome().await
    }
}

impl Drop for Restarting {
    fn drop(&mut self) {
        let child = {
            let mut gate = self.gate.lock();
            if gate.handed_over {
                None
            } else {
                gate.abandoned = true;
                gate.child.take()
            }
        };
        self.task.abort();
        if let Some(child) = child {
            tracing::warn!(
                pid = child.pid,
                "restart abandoned: killing the new process"
            );
            child.kill_now();
        }
    }
}

/// The one place where "hand over" and "abandon" are decided, under one lock.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    /// The [`Restarting`] was dropped: nothing may be sent from now on.
    abandoned: bool,
    /// The hand-off datagram was delivered: the child is the service now.
    handed_over: bool,
    /// The child, once started and until it is stopped or handed over to.
    child: Option<ChildRef>,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Enough of the child to kill it synchronously.
#[derive(Debug, Clone)]
struct ChildRef {
    pid: u32,
    pidfd: Arc<OwnedFd>,
    placement: Placement,
}

impl ChildRef {
    /// SIGKILL, and if it is our own child, reap it (bounded: a process stuck in the kernel is
    /// left as a zombie for the keeper or the kernel).
    fn kill_now(&self) {
        let _ = sys::pidfd_signal(self.pidfd.as_fd(), libc::SIGKILL);
        if self.placement == Placement::Child {
            let mut fds = [rustix::event::PollFd::new(
                &*self.pidfd,
                rustix::event::PollFlags::IN,
            )];
            let second = rustix::event::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            let _ = rustix::event::poll(&mut fds, Some(&second));
            let _ = sys::reap(self.pidfd.as_fd());
        }
    }
}

static HANDSHAKE_SEQ: AtomicU64 = AtomicU64::new(0);

/// What a restart hands over, and how long it waits.
struct Plan {
    listeners: Vec<PassedListener>,
    notifier: Arc<Notifier>,
    ready_timeout: Duration,
    /// The watchdog duty passes to the child with the listeners.
    watchdog_usec: Option<u64>,
    /// How long a rolled-back child may take to finish its requests.
    stop_grace: Duration,
}

async fn run(plan: Plan, cancel: CancellationToken, gate: Arc<Gate>) -> Result<HandedOver, Failed> {
    let stop_grace = plan.stop_grace;
    let mut child = None;
    let result = attempt(plan, cancel, Arc::clone(&gate), &mut child).await;
    match result {
        Ok(handed) => Ok(handed),
        Err(failure) => {
            tracing::error!(error = %failure, "restart failed; this process keeps serving");
            // The caller stops it from now on (dropping the rollback kills it).
            gate.lock().child = None;
            Err(Failed {
                failure,
                rollback: child.map(|child| Rollback {
                    child,
                    grace: stop_grace,
                }),
            })
        }
    }
}

/// One restart attempt. Whatever fails after the child was started, the child is left in
/// `rolled_back`, to be stopped.
async fn attempt(
    plan: Plan,
    cancel: CancellationToken,
    gate: Arc<Gate>,
    rolled_back: &mut Option<Child>,
) -> Result<HandedOver, RestartFailure> {
    let Plan {
        listeners,
        notifier,
        ready_timeout,
        watchdog_usec,
        stop_grace: _,
    } = plan;
    let started = Instant::now();
    // One deadline for the whole restart: spawn, exec, READY=1.
    let deadline = crate::instant_after(started, ready_timeout);
    let startup = startup::get();
    let exe = startup.exe.clone().map_err(|msg| RestartFailure::Io {
        context: "the executable to restart is unknown",
        source: io::Error::other(msg),
    })?;
    let mut reloading = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        reloading.push(now);
    }
    let status = format!("Restarting: starting {}", exe.display());
    reloading.push(NotifyState::Status(&status));
    notifier.notify(&reloading);
    tracing::info!(exe = %exe.display(), listeners = listeners.len(), "restart: starting the new process");

    // As PID 1 the successor is our own child, and we are its service manager afterwards.
    let placement = match keeper::is_pid1() {
        true => Placement::Child,
        false => Placement::Sibling,
    };
    let io_err = |context| move |source| RestartFailure::Io { context, source };
    let (handshake, handshake_name) = bind_handshake()?;
    let (channel, child_end) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
    .map_err(io_err("could not create the channel to the new process"))?;
    // The TLS session ticket keys go first, before the child runs: it takes them at start-up,
    // before its first handshake (`tickets`). The queue is empty, so this never blocks.
    #[cfg(feature = "rustls")]
    if let Some(keys) = crate::tickets::message_for_successor() {
        notify::send_now(channel.as_fd(), &keys).map_err(io_err(
            "could not send the TLS session ticket keys to the new process",
        ))?;
    }
    let channel = Connected::new(channel)
        .map_err(io_err("could not register the channel to the new process"))?;

    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !PROTOCOL_VARS.iter().any(|v| k.as_bytes() == v.as_bytes()))
        .collect();
    env.push(("LISTEN_FDS".into(), listeners.len().to_string().into()));
    env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
    env.push(("NOTIFY_SOCKET".into(), handshake_name.clone()));
    // Always set, empty meaning "no service manager": the child must know that NOTIFY_SOCKET is
    // only the hand-off socket, which is gone once we exit.
    let upstream = match placement {
        Placement::Child => keeper::notify_socket_name()
            .map_err(io_err("could not bind the keeper's notify socket"))?,
        Placement::Sibling => notifier.upstream_name().unwrap_or_default().to_owned(),
    };
    env.push((UPSTREAM_NOTIFY_VAR.into(), upstream));
    // The channel goes right after the listeners, outside the LISTEN_FDS range.
    env.push((CHANNEL_VAR.into(), (3 + listeners.len()).to_string().into()));
    // Which of them are the service's alone (at 3, 4, ... in the child).
    let exclusive: Vec<String> = (3..)
        .zip(&listeners)
        .filter(|(_, l)| l.exclusive)
        .map(|(fd, _)| fd.to_string())
        .collect();
    env.push((EXCLUSIVE_VAR.into(), exclusive.join(",").into()));
    // No WATCHDOG_PID: the interval is for whoever reads it, the child.
    if let Some(usec) = watchdog_usec {
        env.push(("WATCHDOG_USEC".into(), usec.to_string().into()));
    }
    let mut fds: Vec<OwnedFd> = listeners.into_iter().map(|l| l.fd).collect();
    fds.push(child_end);
    let plan = ExecPlan::new(
        &exe,
        &startup.args,
        env,
        fds,
        startup.cwd.as_deref(),
        startup.signals,
    )
    .map_err(|source| RestartFailure::Spawn {
        exe: exe.clone(),
        source,
    })?;
    // Returns at once; the plan (our copies of the child's fds) is closed inside.
    let spawned = sys::spawn(plan, placement).map_err(|source| RestartFailure::Start { source })?;
    let pid = spawned.pid;
    let child_ref = ChildRef {
        pid,
        pidfd: Arc::new(spawned.pidfd),
        placement,
    };
    {
        let mut state = gate.lock();
        if state.abandoned {
            drop(state);
            child_ref.kill_now();
            return Err(RestartFailure::Cancelled { pid });
        }
        state.child = Some(child_ref.clone());
    }
    tracing::info!(pid, "restart: new process started; waiting for its READY=1");
    let child = match Child::new(&child_ref) {
        Ok(child) => child,
        Err(failure) => {
            child_ref.kill_now();
            gate.lock().child = None;
            return Err(failure);
        }
    };
    let report = match sys::register(spawned.report, Interest::READABLE) {
        Ok(fd) => ExecReport { fd },
        Err((_, source)) => {
            *rolled_back = Some(child);
            return Err(RestartFailure::Io {
                context: "could not watch the exec report pipe",
                source,
            });
        }
    };

    // Biased, in this order: a child that died is never handed over to, even if its READY=1
    // is also waiting; a child that is ready is handed over to even if a close signal came at
    // the same moment (it is serving already; killing it would reset its connections).
    let mut accepts_connections = false;
    let mut accepts_upgraded = false;
    // The child's own word on why it fails, if it says it before it exits (`reason`).
    let said = Mutex::new(None);
    let exited = |status| RestartFailure::Exited {
        pid,
        status,
        reason: crate::reason::drain(channel.fd())
            .or_else(|| said.lock().unwrap_or_else(|p| p.into_inner()).take()),
    };
    let outcome = tokio::select! {
        biased;
        status = child.exited() => Err(match report.errno_now() {
            Some(source) => RestartFailure::Spawn { exe: exe.clone(), source },
            None => exited(status),
        }),
        source = report.failed() => Err(RestartFailure::Spawn { exe: exe.clone(), source }),
        ready = wait_ready(&channel, &handshake, pid, &said) => ready.map(|(status, accepts, upgraded)| {
            accepts_connections = accepts;
            accepts_upgraded = upgraded;
            status
        }),
        () = cancel.cancelled() => Err(RestartFailure::Cancelled { pid }),
        () = tokio::time::sleep_until(deadline) => Err(RestartFailure::Timeout { pid, after: ready_timeout }),
    };
    // READY=1 and then an immediate exit: look once more before handing over.
    let outcome = match outcome {
        Ok(child_status) => match child.exit_status_now() {
            Some(status) => Err(exited(status)),
            None => Ok(child_status),
        },
        Err(failure) => Err(failure),
    };
    let outcome = match outcome {
        Ok(child_status) => {
            // The new process's own status: it is what `systemctl status` should show from now
            // on, and the new process cannot tell systemd itself before it is the main pid.
            let status = child_status.unwrap_or_else(|| format!("Serving as pid {pid}"));
            // One datagram: see the module docs. The watchdog ping covers the moment the duty
            // changes hands, since the child's own pings before MAINPID= were not accepted.
            // As PID 1 we stay the manager's main process (and become the child's manager), so
            // there is no MAINPID= to tell.
            let mut handoff = Vec::new();
            if placement == Placement::Sibling {
                handoff.push(NotifyState::MainPid(pid));
            }
            handoff.push(NotifyState::Ready);
            handoff.push(NotifyState::Status(&status));
            if watchdog_usec.is_some() {
                handoff.push(NotifyState::Watchdog);
            }
            let what = match placement {
                Placement::Sibling => format!("MAINPID={pid}"),
                Placement::Child => "READY=1".to_string(),
            };
            let message = notify::format_states(&handoff);
            let delivery_deadline = deadline.max(Instant::now() + MIN_PATIENCE);
            let handoff = HandOff {
                notifier: &notifier,
                message: &message,
                what,
                deadline: delivery_deadline,
                gate: &gate,
                placement,
                pid,
            };
            handoff.deliver(&child, &cancel).await
        }
        Err(failure) => Err(failure),
    };
    match outcome {
        Ok(()) => {
            child.release();
            gate.lock().child = None;
            let ready_after = started.elapsed();
            tracing::info!(
                pid,
                ?ready_after,
                "restart: new process is ready and the service manager knows; handing over"
            );
            Ok(HandedOver {
                pid,
                ready_after,
                pidfd: child_ref.pidfd,
                channel,
                accepts_connections,
                accepts_upgraded,
                keeper_forwards: placement == Placement::Child,
            })
        }
        Err(failure) => {
            *rolled_back = Some(child);
            Err(failure)
        }
    }
}

/// The hand-off datagram, and what may stop it.
struct HandOff<'a> {
    notifier: &'a Arc<Notifier>,
    message: &'a str,
    /// What the manager must learn, for the error message: `MAINPID=N`.
    what: String,
    deadline: Instant,
    gate: &'a Gate,
    placement: Placement,
    pid: u32,
}

impl HandOff<'_> {
    /// Delivers the message (waiting while the manager's queue is full) and marks the hand-off
    /// done under the gate's lock, unless the child dies, the restart is cancelled or
    /// abandoned, or the deadline passes first.
    async fn deliver(
        &self,
        child: &Child,
        cancel: &CancellationToken,
    ) -> Result<(), RestartFailure> {
        let pid = self.pid;
        let waiting_since = Instant::now();
        let undelivered = |source: io::Error| RestartFailure::Undelivered {
            what: self.what.clone(),
            source,
        };
        let connected = self.notifier.connect_upstream().map_err(undelivered)?;
        tracing::info!(
            pid,
            "restart: new process is ready; telling the service manager {}",
            self.what
        );
        // Bounded by the deadline: each turn waits for the manager to read (or for the child,
        // the cancel, the deadline).
        loop {
            let attempt = async {
                match &connected {
                    Some(c) => {
                        c.when_writable(|fd| {
                            self.commit(|| notify::send_now(fd, self.message.as_bytes()))
                        })
                        .await
                    }
                    // No service manager: nobody to tell, the hand-off is ours to decide.
                    None => self.commit(|| Ok(0)).map(Some),
                }
            };
            tokio::select! {
                biased;
                sent = attempt => match sent {
                    Ok(Some(())) => return Ok(()),
                    Ok(None) => continue,
                    Err(_) if self.gate.lock().abandoned => return Err(RestartFailure::Cancelled { pid }),
                    Err(e) => return Err(undelivered(e)),
                },
                status = child.exited() => return Err(RestartFailure::Exited { pid, status, reason: None }),
                () = cancel.cancelled() => return Err(RestartFailure::Cancelled { pid }),
                () = tokio::time::sleep_until(self.deadline) => {
                    return Err(undelivered(notify::queue_full(waiting_since.elapsed())));
                }
            }
        }
    }

    /// Sends (with `send`), and if it went out, marks the hand-off as done: both under the
    /// gate's lock, so that a [`Restarting`] dropped meanwhile either comes first (and nothing
    /// is sent) or finds the child handed over (and leaves it alone).
    fn commit(&self, send: impl FnOnce() -> io::Result<usize>) -> io::Result<()> {
        let mut state = self.gate.lock();
        if state.abandoned {
            return Err(io::Error::other("the restart was abandoned"));
        }
        // As PID 1, the keeper's handlers exist before the commit: see `keeper::prepare`.
        let prepared = (self.placement == Placement::Child).then(keeper::prepare);
        send()?;
        state.handed_over = true;
        if let Some(prepared) = prepared {
            keeper::adopt(self.pid, Arc::clone(self.notifier), prepared);
        }
        Ok(())
    }
}

/// The read end of the exec report pipe: 4 bytes of errno if the child failed before or in
/// `execve`, EOF once it executed.
struct ExecReport {
    fd: AsyncFd<OwnedFd>,
}

impl ExecReport {
    /// Resolves only if the child reported a failure; pends forever once it executed (EOF).
    async fn failed(&self) -> io::Error {
        let mut got = [0u8; 4];
        let mut len = 0;
        // Bounded: at most 4 bytes come before EOF, each turn reads at least one or ends.
        loop {
            let read = self
                .fd
                .async_io(Interest::READABLE, |fd| {
                    rustix::io::read(fd, &mut got[len..]).map_err(io::Error::from)
                })
                .await;
            match read {
                Ok(0) if len == 0 => {
                    tracing::debug!("restart: the new process executed");
                    return std::future::pending().await;
                }
                Ok(0) => return truncated(len),
                Ok(k) => {
                    len += k;
                    if len == got.len() {
                        return io::Error::from_raw_os_error(i32::from_ne_bytes(got));
                    }
                }
                Err(e) => {
                    return io::Error::new(
                        e.kind(),
                        format!("could not read the exec report pipe: {e}"),
                    );
                }
            }
        }
    }

    /// The errno the child reported, if it did, without waiting (the child has exited: what
    /// it wrote is in the pipe by now).
    fn errno_now(&self) -> Option<io::Error> {
        let mut got = [0u8; 4];
        match rustix::io::read(self.fd.get_ref(), &mut got) {
            Ok(4) => Some(io::Error::from_raw_os_error(i32::from_ne_bytes(got))),
            Ok(0) | Err(_) => None,
            Ok(k) => Some(truncated(k)),
        }
    }
}

/// A report shorter than an errno. Never "Success (os error 0)": say what happened.
fn truncated(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "the new process failed before execve, but its report was cut short ({len} of 4 bytes)"
        ),
    )
}

/// Binds the datagram socket a child that does not know the channel reports `READY=1` on:
/// abstract, unique, with `SO_PASSCRED` so every message carries its sender's pid.
fn bind_handshake() -> Result<(tokio::net::UnixDatagram, OsString), RestartFailure> {
    let io_err = |context| move |source| RestartFailure::Io { context, source };
    let seq = HANDSHAKE_SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("handover/{}/{seq}/{nanos:08x}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(io_err("could not name the hand-off socket"))?;
    let socket =
        UnixDatagram::bind_addr(&addr).map_err(io_err("could not bind the hand-off socket"))?;
    rustix::net::sockopt::set_socket_passcred(&socket, true)
        .map_err(io::Error::from)
        .map_err(io_err(
            "could not enable SO_PASSCRED on the hand-off socket",
        ))?;
    socket
        .set_nonblocking(true)
        .map_err(io_err("could not make the hand-off socket non-blocking"))?;
    let socket = tokio::net::UnixDatagram::from_std(socket)
        .map_err(io_err("could not register the hand-off socket"))?;
    Ok((socket, format!("@{name}").into()))
}

/// Waits for `READY=1` from the child: on the channel, or in a datagram from `pid` on the
/// hand-off socket. Returns the last `STATUS=` the process sent, if any, and whether it takes
/// connections, and upgraded ones too (said on the channel with its `READY=1`). Other messages are
/// logged (messages from other senders at debug level only after the first, so a local process
/// cannot flood the log).
async fn wait_ready(
    channel: &Connected,
    socket: &tokio::net::UnixDatagram,
    pid: u32,
    said: &Mutex<Option<String>>,
) -> Result<(Option<String>, bool, bool), RestartFailure> {
    let mut channel_buf = vec![0u8; 4096];
    let mut socket_buf = vec![0u8; 4096];
    let mut status = None;
    let mut strangers = 0u32;
    let mut channel_open = true;
    let read_err = |context| move |source| RestartFailure::Io { context, source };
    // Bounded in time by the caller's deadline; each turn handles one message.
    loop {
        let mut on_channel = false;
        let text = tokio::select! {
            got = channel.recv(&mut channel_buf), if channel_open => {
                on_channel = true;
                let len = got.map_err(read_err("could not read the channel to the new process"))?;
                if len == 0 {
                    // The child closed its end (a program that does not know the channel, or
                    // one that exits): listen on the socket only.
                    channel_open = false;
                    continue;
                }
                // A message of its own kind, not `KEY=value` lines: kept for the error.
                if let Some(reason) = crate::reason::parse(&channel_buf[..len]) {
                    tracing::debug!(pid, reason, "the new process says why it fails");
                    *said.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                    continue;
                }
                String::from_utf8_lossy(&channel_buf[..len]).into_owned()
            }
            got = socket.async_io(Interest::READABLE, || {
                sys::recv_with_credentials(socket.as_fd(), &mut socket_buf)
            }) => {
                let (len, credentials) = got.map_err(read_err("could not read the hand-off socket"))?;
                let text = String::from_utf8_lossy(&socket_buf[..len]).into_owned();
                let sender = credentials.map(|c| c.pid);
                if sender != Some(pid) {
                    strangers += 1;
                    // pid 0: a sender in a PID namespace we cannot see.
                    if strangers == 1 {
                        tracing::warn!(?sender, expected = pid, message = ?text.trim_end(), "ignoring a hand-off message not sent by the new process");
                    } else {
                        tracing::debug!(?sender, "ignoring a hand-off message not sent by the new process");
                    }
                    continue;
                }
                text
            }
        };
        for line in text.lines() {
            tracing::debug!(pid, line, "message from the new process");
            if let Some(s) = line.strip_prefix("STATUS=") {
                status = Some(s.to_string());
            }
        }
        if text.lines().any(|l| l == "READY=1") {
            let accepts = on_channel
                && text
                    .lines()
                    .any(|l| l == crate::handoff::ACCEPTS_CONNECTIONS);
            let upgraded = accepts && text.lines().any(|l| l == crate::handoff::ACCEPTS_UPGRADED);
            return Ok((status, accepts, upgraded));
        }
    }
}

/// The new process during the hand-off, watched and signalled through its pidfd. Until
/// [`Child::release`] it is ours to stop: dropped any other way (a failure, or the restart
/// future dropped with the server), it is killed, never left running with our listeners.
/// Reaped here only if it is our own child ([`Placement::Child`]); a sibling is its parent's.
#[derive(Debug)]
struct Child {
    pid: u32,
    placement: Placement,
    pidfd: Option<AsyncFd<Arc<OwnedFd>>>,
    exited: AtomicBool,
    /// How it ended, once known (an own child can be reaped only once).
    status: Mutex<Option<ChildExit>>,
}

impl Child {
    fn new(child: &ChildRef) -> Result<Child, RestartFailure> {
        match sys::register_shared(Arc::clone(&child.pidfd), Interest::READABLE) {
            Ok(pidfd) => Ok(Child {
                pid: child.pid,
                placement: child.placement,
                pidfd: Some(pidfd),
                exited: AtomicBool::new(false),
                status: Mutex::new(None),
            }),
            Err((_, source)) => Err(RestartFailure::Io {
                context: "could not watch the new process",
                source,
            }),
        }
    }

    /// Waits until the process has exited (a pidfd becomes readable then) and describes how.
    async fn exited(&self) -> ChildExit {
        let Some(pidfd) = &self.pidfd else {
            return std::future::pending().await;
        };
        if let Err(e) = pidfd.readable().await {
            tracing::warn!(pid = self.pid, error = %e, "the new process could not be watched");
            return ChildExit::Unknown;
        }
        self.exited.store(true, Ordering::Relaxed);
        self.describe()
    }

    /// Whether the process has exited by now, without waiting.
    fn exit_status_now(&self) -> Option<ChildExit> {
        let pidfd = self.pidfd.as_ref()?;
        let mut fds = [rustix::event::PollFd::new(
            &**pidfd.get_ref(),
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(n) if n > 0 => {
                self.exited.store(true, Ordering::Relaxed);
                Some(self.describe())
            }
            _ => None,
        }
    }

    /// How it ended: our own child is reaped (its real status); a sibling's status is read from
    /// its pidfd (Linux 6.15 and later keep it there after the reaping), else from /proc while
    /// it is a zombie, best effort (its parent may have reaped it already).
    fn describe(&self) -> ChildExit {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = status.as_ref() {
            return s.clone();
        }
        let found = match (self.placement, &self.pidfd) {
            (Placement::Child, Some(pidfd)) => sys::reap(pidfd.get_ref().as_fd()),
            (_, Some(pidfd)) => sys::pidfd_exit(pidfd.get_ref().as_fd())
                .or_else(|| sys::exit_description(self.pid))
                .or_else(|| sys::pidfd_exit(pidfd.get_ref().as_fd())),
            _ => sys::exit_description(self.pid),
        };
        let exit = found.unwrap_or(ChildExit::Unknown);
        *status = Some(exit.clone());
        exit
    }

    /// Stops it: SIGTERM, so a process that already accepts can finish what it accepted
    /// within its drain deadline (`grace`); SIGKILL a second after that. Bounded: a process
    /// stuck in the kernel is left to its parent.
    async fn stop(&self, grace: Duration) {
        let Some(pidfd) = &self.pidfd else { return };
        if self.exited.load(Ordering::Relaxed) {
            return;
        }
        let _ = sys::pidfd_signal(pidfd.get_ref().as_fd(), libc::SIGTERM);
        let until =
            crate::instant_after(Instant::now(), grace.saturating_add(Duration::from_secs(1)));
        if let Ok(how) = tokio::time::timeout_at(until, self.exited()).await {
            tracing::info!(pid = self.pid, %how, "restart: the new process was stopped");
            return;
        }
        let _ = sys::pidfd_signal(pidfd.get_ref().as_fd(), libc::SIGKILL);
        match tokio::time::timeout(Duration::from_secs(5), self.exited()).await {
            Ok(how) => tracing::info!(pid = self.pid, %how, "restart: the new process was killed"),
            Err(_) => tracing::error!(
                pid = self.pid,
                "restart: the new process did not die within 5 s of SIGKILL"
            ),
        }
    }

    /// The hand-off succeeded: the process is the service now, not ours to stop.
    fn release(mut self) {
        self.pidfd = None;
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd.take() {
            if !self.exited.load(Ordering::Relaxed) {
                // Usually killed already by `Restarting::drop`, which logged it.
                tracing::debug!(pid = self.pid, "restart abandoned: killing the new process");
                ChildRef {
                    pid: self.pid,
                    pidfd: Arc::clone(pidfd.get_ref()),
                    placement: self.placement,
                }
                .kill_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_of(bytes: &[u8]) -> io::Error {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (read, write) = rustix::pipe::pipe_with(
                rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
            )
            .expect("pipe");
            rustix::io::write(&write, bytes).expect("write");
            drop(write);
            let report = ExecReport {
                fd: sys::register(read, Interest::READABLE).expect("register"),
            };
            tokio::time::timeout(Duration::from_secs(5), report.failed())
                .await
                .expect("a failure is reported")
        })
    }

    #[test]
    fn an_errno_report_is_the_errno() {
        let err = report_of(&libc::ENOENT.to_ne_bytes());
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn a_short_report_never_says_success() {
        for len in 1..4 {
            let err = report_of(&[0u8; 4][..len]);
            let text = err.to_string();
            assert!(!text.contains("Success"), "{text}");
            assert!(text.contains(&format!("{len} of 4 bytes")), "{text}");
        }
    }
}
