//! Restart: start the new binary, hand it the listeners, and wait until it says it is ready.
//!
//! # The hand-off
//! 1. The child is the executable recorded at start-up, with the same arguments, working
//!    directory and environment, stdio inherited, and *only* the listeners as further fds: at
//!    3, 4, ... with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` = the child's own pid,
//!    exactly what systemd would give it. The child runs the same code path as under systemd.
//! 2. Its `NOTIFY_SOCKET` is a datagram socket of ours (abstract namespace, so it needs no
//!    writable directory), `HANDOVER_NOTIFY_SOCKET` the service manager's. We accept `READY=1`
//!    only from the child's pid, checked with `SCM_CREDENTIALS`.
//! 3. Until then we keep accepting. If the child exits, or is not ready within the timeout, or
//!    a close signal arrives, it is killed and reaped, and we carry on as before.
//! 4. Once ready, we tell the service manager `MAINPID=<child>` and `READY=1` in **one**
//!    datagram: systemd checks the sender against the main pid before applying any of it, so a
//!    second datagram from us would already be refused under `NotifyAccess=main`.
//!
//! The child is not reaped by us after a successful hand-off: we exit after draining, and it is
//! re-parented to the service manager (or to init, or a subreaper), which reaps it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use rustix::process::{Signal, WaitId, WaitIdOptions};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::RestartFailure;
use crate::notify::{Notifier, NotifyState, monotonic_now};
use crate::startup::{self, PROTOCOL_VARS, UPSTREAM_NOTIFY_VAR};
use crate::sys::{self, ExecPlan};

/// A successful hand-off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HandedOver {
    pub(crate) pid: u32,
    pub(crate) ready_after: Duration,
}

/// A restart in progress, on a task of its own.
#[derive(Debug)]
pub(crate) struct Restarting {
    cancel: CancellationToken,
    task: JoinHandle<Result<HandedOver, RestartFailure>>,
}

impl Restarting {
    /// Starts a restart that hands over `listeners` (fd and name). The fds must stay open until
    /// the restart has finished.
    pub(crate) fn start(
        listeners: Vec<(OwnedFd, String)>,
        notifier: Arc<Notifier>,
        ready_timeout: Duration,
        watchdog_usec: Option<u64>,
    ) -> Restarting {
        let cancel = CancellationToken::new();
        let plan = Plan {
            listeners,
            notifier,
            ready_timeout,
            watchdog_usec,
        };
        let task = tokio::spawn(run(plan, cancel.clone()));
        Restarting { cancel, task }
    }

    /// Waits for the outcome. Cancel safe (the restart goes on; await again).
    pub(crate) async fn outcome(&mut self) -> Result<HandedOver, RestartFailure> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(RestartFailure::Io {
                context: "the restart task failed",
                source: io::Error::other(e.to_string()),
            }),
        }
    }

    /// Cancels: the child, if started, is killed and reaped before this returns.
    pub(crate) async fn cancel(mut self) -> Result<HandedOver, RestartFailure> {
        self.cancel.cancel();
        self.outcome().await
    }
}

static HANDSHAKE_SEQ: AtomicU64 = AtomicU64::new(0);

/// What a restart hands over, and how long it waits.
struct Plan {
    listeners: Vec<(OwnedFd, String)>,
    notifier: Arc<Notifier>,
    ready_timeout: Duration,
    /// The watchdog duty passes to the child with the listeners.
    watchdog_usec: Option<u64>,
}

async fn run(plan: Plan, cancel: CancellationToken) -> Result<HandedOver, RestartFailure> {
    let result = attempt(plan, cancel).await;
    if let Err(failure) = &result {
        tracing::error!(error = %failure, "restart failed; this process keeps serving");
    }
    result
}

/// One restart attempt. Whatever fails after the child was started, the child is killed and
/// reaped before this returns.
async fn attempt(plan: Plan, cancel: CancellationToken) -> Result<HandedOver, RestartFailure> {
    let Plan {
        listeners,
        notifier,
        ready_timeout,
        watchdog_usec,
    } = plan;
    let started = Instant::now();
    let startup = startup::get();
    let exe = startup.exe.clone().map_err(|msg| RestartFailure::Io {
        context: "the executable to restart is unknown",
        source: io::Error::other(msg),
    })?;
    let mut reloading = vec![NotifyState::Reloading];
    if let Ok(now) = monotonic_now() {
        reloading.push(now);
    }
    let status = format!("Restarting: starting {}", exe.display());
    reloading.push(NotifyState::Status(&status));
    notifier.notify(&reloading);
    tracing::info!(exe = %exe.display(), listeners = listeners.len(), "restart: starting the new process");

    let (handshake, handshake_name) = bind_handshake()?;
    let names: Vec<String> = listeners.iter().map(|(_, n)| n.clone()).collect();
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !PROTOCOL_VARS.iter().any(|v| k.as_bytes() == v.as_bytes()))
        .collect();
    env.push(("LISTEN_FDS".into(), listeners.len().to_string().into()));
    env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
    env.push(("NOTIFY_SOCKET".into(), handshake_name.clone()));
    // Always set, empty meaning "no service manager": the child must know that NOTIFY_SOCKET is
    // only the hand-off socket, which is gone once we exit.
    let upstream = notifier.upstream_name().unwrap_or_default().to_owned();
    env.push((UPSTREAM_NOTIFY_VAR.into(), upstream));
    // No WATCHDOG_PID: the interval is for whoever reads it, the child.
    if let Some(usec) = watchdog_usec {
        env.push(("WATCHDOG_USEC".into(), usec.to_string().into()));
    }
    let fds = listeners.into_iter().map(|(fd, _)| fd).collect();
    let plan =
        ExecPlan::new(&exe, &startup.args, env, fds, startup.cwd.as_deref()).map_err(|source| {
            RestartFailure::Spawn {
                exe: exe.clone(),
                source,
            }
        })?;
    let spawned = tokio::task::spawn_blocking(move || sys::spawn(plan))
        .await
        .map_err(|e| RestartFailure::Io {
            context: "the spawning thread failed",
            source: io::Error::other(e.to_string()),
        })?
        .map_err(|source| RestartFailure::Spawn {
            exe: exe.clone(),
            source,
        })?;
    let pid = spawned.pid;
    tracing::info!(pid, "restart: new process started; waiting for its READY=1");
    let child = Child::new(pid, spawned.pidfd)?;

    // Biased, in this order: a child that died is never handed over to, even if its READY=1
    // is also waiting; a child that is ready is handed over to even if a close signal came at
    // the same moment (it is serving already; killing it would reset its connections).
    let outcome = tokio::select! {
        biased;
        status = child.exited() => Err(RestartFailure::Exited { pid, status }),
        ready = wait_ready(&handshake, pid) => ready,
        () = cancel.cancelled() => Err(RestartFailure::Cancelled { pid }),
        () = tokio::time::sleep(ready_timeout) => Err(RestartFailure::Timeout { pid, after: ready_timeout }),
    };
    // READY=1 and then an immediate exit: look once more before handing over.
    let outcome = match outcome {
        Ok(()) => match child.exit_status_now() {
            Some(status) => Err(RestartFailure::Exited { pid, status }),
            None => Ok(()),
        },
        failure => failure,
    };
    match outcome {
        Ok(()) => {
            let status = format!("Handed over to pid {pid}; draining");
            // One datagram: see the module docs. The watchdog ping covers the moment the duty
            // changes hands, since the child's own pings before MAINPID= were not accepted.
            let mut handoff = vec![
                NotifyState::MainPid(pid),
                NotifyState::Ready,
                NotifyState::Status(&status),
            ];
            if watchdog_usec.is_some() {
                handoff.push(NotifyState::Watchdog);
            }
            notifier.notify_upstream(&handoff);
            child.release();
            let ready_after = started.elapsed();
            tracing::info!(
                pid,
                ?ready_after,
                "restart: new process is ready; handing over"
            );
            Ok(HandedOver { pid, ready_after })
        }
        Err(failure) => {
            child.kill_and_reap().await;
            Err(failure)
        }
    }
}

/// Binds the datagram socket the child reports `READY=1` on: abstract, unique, with
/// `SO_PASSCRED` so every message carries its sender's pid.
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

/// Waits for a datagram from `pid` containing the line `READY=1`. Other messages are logged.
async fn wait_ready(socket: &tokio::net::UnixDatagram, pid: u32) -> Result<(), RestartFailure> {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, sender) = socket
            .async_io(Interest::READABLE, || recv_with_pid(socket, &mut buf))
            .await
            .map_err(|source| RestartFailure::Io {
                context: "could not read the hand-off socket",
                source,
            })?;
        let text = String::from_utf8_lossy(&buf[..len]);
        if sender != Some(pid) {
            tracing::warn!(?sender, expected = pid, message = %text.trim_end(), "ignoring a hand-off message not sent by the new process");
            continue;
        }
        for line in text.lines() {
            tracing::debug!(pid, line, "message from the new process");
        }
        if text.lines().any(|l| l == "READY=1") {
            return Ok(());
        }
    }
}

fn recv_with_pid(
    socket: &tokio::net::UnixDatagram,
    buf: &mut [u8],
) -> io::Result<(usize, Option<u32>)> {
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        socket.as_fd(),
        &mut [io::IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut sender = None;
    for cmsg in control.drain() {
        if let RecvAncillaryMessage::ScmCredentials(cred) = cmsg {
            sender = Some(cred.pid.as_raw_nonzero().get() as u32);
        }
    }
    Ok((msg.bytes, sender))
}

/// The child during the hand-off, watched through its pidfd. Until [`Child::release`] it is
/// ours: dropped any other way (a failure, or the restart future dropped with the server), it
/// is killed and reaped, never left running with our listeners.
struct Child {
    pid: u32,
    pidfd: Option<AsyncFd<OwnedFd>>,
    reaped: AtomicBool,
}

impl Child {
    fn new(pid: u32, pidfd: OwnedFd) -> Result<Child, RestartFailure> {
        match sys::register_readable(pidfd) {
            Ok(pidfd) => Ok(Child {
                pid,
                pidfd: Some(pidfd),
                reaped: AtomicBool::new(false),
            }),
            Err((pidfd, source)) => {
                kill_and_reap_blocking(pidfd);
                Err(RestartFailure::Io {
                    context: "could not watch the new process",
                    source,
                })
            }
        }
    }

    fn fd(&self) -> Option<&AsyncFd<OwnedFd>> {
        self.pidfd.as_ref()
    }

    /// Waits until the child has exited, reaps it, and describes how it ended.
    async fn exited(&self) -> String {
        let Some(pidfd) = self.fd() else {
            return std::future::pending().await;
        };
        loop {
            let mut guard = match pidfd.readable().await {
                Ok(g) => g,
                Err(e) => return format!("could not be watched ({e})"),
            };
            match self.try_reap() {
                Some(how) => return how,
                None => guard.clear_ready(),
            }
        }
    }

    /// Reaps the child if it has exited; describes how.
    fn try_reap(&self) -> Option<String> {
        let pidfd = self.fd()?;
        match rustix::process::waitid(
            WaitId::PidFd(pidfd.get_ref().as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(status)) => {
                self.reaped.store(true, Ordering::Relaxed);
                Some(if let Some(code) = status.exit_status() {
                    format!("exited with status {code}")
                } else if let Some(sig) = status.terminating_signal() {
                    format!("was killed by signal {sig}")
                } else {
                    "ended".to_string()
                })
            }
            Ok(None) => None,
            Err(e) => {
                self.reaped.store(true, Ordering::Relaxed);
                Some(format!("could not be waited for ({e})"))
            }
        }
    }

    /// Whether the child has exited by now (reaping it if so), without waiting.
    fn exit_status_now(&self) -> Option<String> {
        self.try_reap()
    }

    /// Stops it: SIGTERM, so a child that already accepts can finish what it accepted; SIGKILL
    /// after a second; then reap. Bounded: a process stuck in the kernel is left to init.
    async fn kill_and_reap(&self) {
        let Some(pidfd) = self.fd() else { return };
        if self.reaped.load(Ordering::Relaxed) {
            return;
        }
        let _ = rustix::process::pidfd_send_signal(pidfd.get_ref(), Signal::TERM);
        if let Ok(how) = tokio::time::timeout(Duration::from_secs(1), self.exited()).await {
            tracing::info!(
                pid = self.pid,
                how,
                "restart: the new process was stopped and reaped"
            );
            return;
        }
        let _ = rustix::process::pidfd_send_signal(pidfd.get_ref(), Signal::KILL);
        match tokio::time::timeout(Duration::from_secs(5), self.exited()).await {
            Ok(how) => tracing::info!(
                pid = self.pid,
                how,
                "restart: the new process was killed and reaped"
            ),
            Err(_) => tracing::error!(
                pid = self.pid,
                "restart: the new process did not die within 5 s of SIGKILL"
            ),
        }
    }

    /// The hand-off succeeded: the child is the service now, not ours to stop.
    fn release(mut self) {
        self.pidfd = None;
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd.take() {
            if !self.reaped.load(Ordering::Relaxed) {
                tracing::warn!(pid = self.pid, "restart abandoned: killing the new process");
                kill_and_reap_blocking(pidfd.into_inner());
            }
        }
    }
}

/// SIGKILL through the pidfd, then reap on a thread of its own (waiting is blocking, and this
/// may run in a destructor on the runtime).
fn kill_and_reap_blocking(pidfd: OwnedFd) {
    let _ = rustix::process::pidfd_send_signal(&pidfd, Signal::KILL);
    let reaper = std::thread::Builder::new()
        .name("handover-reap".into())
        .spawn(move || {
            let _ = rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED);
        });
    if let Err(e) = reaper {
        tracing::error!(error = %e, "could not start a thread to reap the killed process");
    }
}
