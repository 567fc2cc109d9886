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
//! The child is started as a grandchild (`sys::spawn`): it is the service manager's child (or
//! init's, or a subreaper's) from the start, which reaps it whatever happens, and which
//! systemd needs to stop it gracefully later. We watch and signal it through a pidfd.

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
use rustix::process::Signal;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::RestartFailure;
use crate::notify::{Notifier, NotifyState};
use crate::startup::{self, PROTOCOL_VARS, UPSTREAM_NOTIFY_VAR};
use crate::sys::{self, ExecPlan};

/// A successful hand-off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HandedOver {
    pub(crate) pid: u32,
    pub(crate) ready_after: Duration,
}

impl HandedOver {
    /// What the application learns of it.
    pub(crate) fn restarted(&self) -> crate::handle::Restarted {
        crate::handle::Restarted {
            pid: self.pid,
            ready_after: self.ready_after,
        }
    }

    /// Sends `sig` to the new process: a close signal that raced with the hand-off was meant
    /// for the service, which is the new process now.
    pub(crate) fn forward_signal(&self, sig: i32) {
        let (Some(pid), Some(signal)) = (
            rustix::process::Pid::from_raw(self.pid as i32),
            Signal::from_named_raw(sig),
        ) else {
            return;
        };
        tracing::info!(pid = self.pid, signal = %crate::signals::name(sig), "forwarding the close signal to the new process");
        if let Err(e) = rustix::process::kill_process(pid, signal) {
            tracing::error!(pid = self.pid, error = %e, "could not forward the close signal");
        }
    }
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
    if let Ok(now) = NotifyState::monotonic_usec_now() {
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
        Ok(child_status) => match child.exit_status_now() {
            Some(status) => Err(RestartFailure::Exited { pid, status }),
            None => Ok(child_status),
        },
        Err(failure) => Err(failure),
    };
    match outcome {
        Ok(child_status) => {
            // The new process's own status: it is what `systemctl status` should show from now
            // on, and the new process cannot tell systemd itself before it is the main pid.
            let status = child_status.unwrap_or_else(|| format!("Serving as pid {pid}"));
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
            child.stop().await;
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

/// Waits for a datagram from `pid` containing the line `READY=1`; returns the last `STATUS=`
/// the process sent, if any. Other messages are logged (messages from other senders at debug
/// level only after the first, so a local process cannot flood the log).
async fn wait_ready(
    socket: &tokio::net::UnixDatagram,
    pid: u32,
) -> Result<Option<String>, RestartFailure> {
    let mut buf = vec![0u8; 4096];
    let mut status = None;
    let mut strangers = 0u32;
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
            strangers += 1;
            if strangers == 1 {
                tracing::warn!(?sender, expected = pid, message = %text.trim_end(), "ignoring a hand-off message not sent by the new process");
            } else {
                tracing::debug!(
                    ?sender,
                    "ignoring a hand-off message not sent by the new process"
                );
            }
            continue;
        }
        for line in text.lines() {
            tracing::debug!(pid, line, "message from the new process");
            if let Some(s) = line.strip_prefix("STATUS=") {
                status = Some(s.to_string());
            }
        }
        if text.lines().any(|l| l == "READY=1") {
            return Ok(status);
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

/// The new process during the hand-off, watched and signalled through its pidfd only: it is
/// not our child (see `sys::spawn`), its new parent reaps it. Until [`Child::release`] it is
/// ours to stop: dropped any other way (a failure, or the restart future dropped with the
/// server), it is killed, never left running with our listeners.
struct Child {
    pid: u32,
    pidfd: Option<AsyncFd<OwnedFd>>,
    exited: AtomicBool,
}

impl Child {
    fn new(pid: u32, pidfd: OwnedFd) -> Result<Child, RestartFailure> {
        match sys::register_readable(pidfd) {
            Ok(pidfd) => Ok(Child {
                pid,
                pidfd: Some(pidfd),
                exited: AtomicBool::new(false),
            }),
            Err((pidfd, source)) => {
                let _ = rustix::process::pidfd_send_signal(&pidfd, Signal::KILL);
                Err(RestartFailure::Io {
                    context: "could not watch the new process",
                    source,
                })
            }
        }
    }

    /// Waits until the process has exited (a pidfd becomes readable then) and describes how.
    async fn exited(&self) -> String {
        let Some(pidfd) = &self.pidfd else {
            return std::future::pending().await;
        };
        if let Err(e) = pidfd.readable().await {
            return format!("could not be watched ({e})");
        }
        self.exited.store(true, Ordering::Relaxed);
        self.describe()
    }

    /// Whether the process has exited by now, without waiting.
    fn exit_status_now(&self) -> Option<String> {
        let pidfd = self.pidfd.as_ref()?;
        let mut fds = [rustix::event::PollFd::new(
            pidfd.get_ref(),
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

    fn describe(&self) -> String {
        sys::exit_description(self.pid).unwrap_or_else(|| "exited".to_string())
    }

    /// Stops it: SIGTERM, so a process that already accepts can finish what it accepted;
    /// SIGKILL after a second. Bounded: a process stuck in the kernel is left to its parent.
    async fn stop(&self) {
        let Some(pidfd) = &self.pidfd else { return };
        if self.exited.load(Ordering::Relaxed) {
            return;
        }
        let _ = rustix::process::pidfd_send_signal(pidfd.get_ref(), Signal::TERM);
        if let Ok(how) = tokio::time::timeout(Duration::from_secs(1), self.exited()).await {
            tracing::info!(pid = self.pid, how, "restart: the new process was stopped");
            return;
        }
        let _ = rustix::process::pidfd_send_signal(pidfd.get_ref(), Signal::KILL);
        match tokio::time::timeout(Duration::from_secs(5), self.exited()).await {
            Ok(how) => tracing::info!(pid = self.pid, how, "restart: the new process was killed"),
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
                tracing::warn!(pid = self.pid, "restart abandoned: killing the new process");
                let _ = rustix::process::pidfd_send_signal(pidfd.get_ref(), Signal::KILL);
            }
        }
    }
}
