//! PID 1 mode: the old process stays on as a minimal init ("keeper") for its successors.
//!
//! # Why
//! In a container without an init (`docker run` without `--init`, a Kubernetes pod without a
//! shared process namespace), the server is PID 1 of its PID namespace. The kernel refuses to
//! let PID 1 create siblings, so its successor is its own child; and when PID 1 exits, the
//! kernel kills every process in the namespace, the successor included. A restart that simply
//! exited after the hand-off would take the service down.
//!
//! # What the keeper does
//! As PID 1 (`getpid() == 1`), a restart starts the successor as a direct child, and after the
//! drain [`after_shutdown`] never returns: the process becomes the successors' init.
//! - It reaps every child (a `waitpid(-1)` loop on `SIGCHLD`), but only from then on: while it
//!   serves, it never steals the exit statuses of the application's own children.
//! - It forwards the close and restart signals to the process that serves now, so `docker
//!   stop` (SIGTERM to PID 1) drains the service, and a restart signal restarts it. It does so
//!   from the hand-off on, also while its own drain is still going (the old process takes a
//!   close signal then as a confirmation of its own shutdown, as any handover process does).
//! - It is the successors' service manager: their `HANDOVER_NOTIFY_SOCKET` is a socket of its
//!   own (bound at the first restart), so it learns of later hand-offs from the `MAINPID=` the
//!   serving process sends when *it* restarts. `MAINPID=` is accepted only from the current
//!   serving process (`SCM_CREDENTIALS`) and only naming a child of ours (later successors are
//!   started as siblings of the serving process, that is, as our children). Everything else
//!   the serving process says is relayed to our own service manager, if there is one (for it,
//!   we stay the main process throughout).
//! - When the serving process exits, it exits with the same status (128 + signal if it was
//!   killed). Pending notify messages are read before a child's exit is judged, so a
//!   successor's `MAINPID=` is never overtaken by the exit of the process that sent it.
//!
//! tini and dumb-init (`docker run --init` runs tini) exit as soon as the one child they
//! started exits: under them the server is not PID 1, its successor is the init's child (a
//! sibling, as anywhere), and the first hand-off ends the container all the same. With the
//! keeper no init is needed; otherwise use one that outlives its first child.

use std::ffi::OsString;
use std::future::poll_fn;
use std::io;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_core::Stream;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::{Cause, Origin};
use signal_hook_tokio::SignalsInfo;

/// Signals with who sent them.
type Signals = SignalsInfo<WithOrigin>;
use tokio::io::Interest;
use tokio::sync::oneshot;

use crate::notify::Notifier;
use crate::sys;

/// Whether this process is the init of its PID namespace, which may not create siblings.
pub(crate) fn is_pid1() -> bool {
    std::process::id() == 1
}

/// The process-wide keeper state: there is one PID 1.
struct Keeper {
    /// `@name` of the successors' notify socket.
    name: OsString,
    /// The socket, until the keeper task takes it at the hand-off.
    socket: Option<UnixDatagram>,
    /// Tells the keeper task that serving is over.
    become_keeper: Option<oneshot::Sender<()>>,
}

static KEEPER: Mutex<Option<Keeper>> = Mutex::new(None);

/// The close and restart signals of the `serve` that may hand over: the ones to forward.
static SIGNALS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn keeper() -> std::sync::MutexGuard<'static, Option<Keeper>> {
    KEEPER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records the close and restart signals of the `serve` that is starting: as PID 1, these are
/// forwarded to the serving process once a hand-off has made this process its keeper.
pub(crate) fn forward_signals(close: &[i32], restart: &[i32]) {
    if !is_pid1() {
        return;
    }
    let mut signals = SIGNALS.lock().unwrap_or_else(|p| p.into_inner());
    signals.clear();
    signals.extend(close.iter().chain(restart));
}

/// The notify socket the successors report to, as their `HANDOVER_NOTIFY_SOCKET` (`@name`).
/// Bound on first use, with `SO_PASSCRED`; later restarts reuse it.
pub(crate) fn notify_socket_name() -> io::Result<OsString> {
    let mut keeper = keeper();
    if let Some(k) = keeper.as_ref() {
        return Ok(k.name.clone());
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("handover/keeper/{}/{nanos:08x}", std::process::id());
    let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
    rustix::net::sockopt::set_socket_passcred(&socket, true)?;
    socket.set_nonblocking(true)?;
    let name: OsString = format!("@{name}").into();
    *keeper = Some(Keeper {
        name: name.clone(),
        socket: Some(socket),
        become_keeper: None,
    });
    Ok(name)
}

/// The keeper's signal handlers, registered *before* the hand-off is committed: a close
/// signal that arrives between the commit and the keeper task's first run is then queued for
/// the keeper (which forwards it), instead of reaching nobody (the lifecycle leaves forwarding
/// to the keeper once it has handed over to its own child). Dropped unused if the hand-off does
/// not happen.
pub(crate) struct Prepared {
    signals: Option<Signals>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("signals", &self.signals.is_some())
            .finish()
    }
}

/// Registers the keeper's signal handlers: the forwarded signals and `SIGCHLD`.
pub(crate) fn prepare() -> Prepared {
    let mut all: Vec<i32> = SIGNALS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    all.push(libc::SIGCHLD);
    all.sort_unstable();
    all.dedup();
    let signals = match Signals::new(&all) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "keeper: cannot handle signals; reaping every second, forwarding nothing");
            None
        }
    };
    Prepared { signals }
}

/// This process serves again (its successor, our child, died while we drained): the keeper
/// task for it ends, and the next hand-off sets up a new one.
pub(crate) fn stand_down() {
    // Dropping `become_keeper` ends the task; the next restart binds a new notify socket.
    *keeper() = None;
}

/// The hand-off to our own child `pid` is done (called once, by the restart that committed
/// it, with the handlers it [prepared](prepare) before the commit): from now on `pid` is the
/// serving process. Starts the task that reads the successors' notify socket; it becomes the
/// keeper at [`after_shutdown`].
pub(crate) fn adopt(pid: u32, notifier: Arc<Notifier>, prepared: Prepared) {
    let mut keeper = keeper();
    let Some(k) = keeper.as_mut() else {
        tracing::error!(
            "keeper: a hand-off without a notify socket; later hand-offs will be missed"
        );
        return;
    };
    let Some(socket) = k.socket.take() else {
        return;
    };
    let (tx, rx) = oneshot::channel();
    k.become_keeper = Some(tx);
    tokio::spawn(keep(pid, socket, notifier, prepared.signals, rx));
}

/// The end of `serve` after a hand-off. As PID 1 with a successor, this never returns: the
/// process reaps children, goes on forwarding the signals of [`forward_signals`] to the
/// serving process, and exits with its exit status when it exits. Otherwise it returns at once.
pub(crate) async fn after_shutdown() {
    let Some(tx) = keeper().as_mut().and_then(|k| k.become_keeper.take()) else {
        return;
    };
    if tx.send(()).is_err() {
        tracing::error!("keeper: the keeper task is gone; exiting");
        std::process::exit(1);
    }
    std::future::pending::<()>().await;
}

/// What the keeper knows.
struct State {
    /// The process serving now (our child).
    main: u32,
    notifier: Arc<Notifier>,
    strangers: u64,
    buf: Vec<u8>,
}

async fn keep(
    main: u32,
    socket: UnixDatagram,
    notifier: Arc<Notifier>,
    mut signals: Option<Signals>,
    become_keeper: oneshot::Receiver<()>,
) {
    let socket = match tokio::net::UnixDatagram::from_std(socket) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "keeper: cannot watch the notify socket; later hand-offs will be missed");
            None
        }
    };
    let mut state = State {
        main,
        notifier,
        strangers: 0,
        buf: vec![0; 4096],
    };
    tracing::info!(pid = main, "keeper: the serving process is now pid {main}");
    let mut become_keeper = Some(become_keeper);
    // Registered before the hand-off (`prepare`): a `docker stop` during our own drain must
    // reach the serving process. SIGCHLD is only acted on once we keep (before, children are
    // the application's business), then by a full reaping pass.
    // Only while the signals could not be registered: reap on a timer instead.
    let mut fallback = tokio::time::interval(Duration::from_secs(1));
    let mut keeping = false;
    loop {
        tokio::select! {
            got = recv(socket.as_ref(), &mut state.buf) => match got {
                Ok((len, sender)) => state.handle(len, sender),
                Err(e) => tracing::warn!(error = %e, "keeper: could not read the notify socket"),
            },
            done = async { become_keeper.as_mut().expect("guarded by the if").await }, if become_keeper.is_some() => {
                become_keeper = None;
                if done.is_err() {
                    // serve was dropped, not finished: nothing to keep.
                    return;
                }
                keeping = true;
                tracing::info!(pid = state.main, "keeper: serving is over; staying on as init for pid {}", state.main);
                state.drain(socket.as_ref());
                state.reap();
            }
            sig = next_signal(&mut signals), if signals.is_some() => match sig {
                Some(origin) if origin.signal == libc::SIGCHLD => {
                    if keeping {
                        state.drain(socket.as_ref());
                        state.reap();
                    }
                }
                Some(Origin { cause: Cause::Kernel, signal, .. }) => {
                    // From the kernel, not sent: a terminal's Ctrl-C (`docker run -it`) goes to
                    // the whole foreground process group, the serving process included, which
                    // has it already; a second one would cut its connections.
                    tracing::info!(signal = %crate::signals::name(signal), "keeper: a signal from the terminal reaches the serving process itself; not forwarded");
                }
                Some(origin) => {
                    // What the serving process has said so far (a MAINPID= naming its own
                    // successor) decides who gets the signal.
                    state.drain(socket.as_ref());
                    state.forward(origin.signal);
                }
                None => signals = None,
            },
            _ = fallback.tick(), if keeping && signals.is_none() => {
                state.drain(socket.as_ref());
                state.reap();
            }
        }
    }
}

async fn next_signal(signals: &mut Option<Signals>) -> Option<Origin> {
    match signals {
        Some(s) => poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await,
        None => std::future::pending().await,
    }
}

async fn recv(
    socket: Option<&tokio::net::UnixDatagram>,
    buf: &mut [u8],
) -> io::Result<(usize, Option<u32>)> {
    let Some(socket) = socket else {
        return std::future::pending().await;
    };
    socket
        .async_io(Interest::READABLE, || {
            sys::recv_with_credentials(socket.as_fd(), buf)
        })
        .await
        .map(|(len, credentials)| (len, credentials.map(|c| c.pid)))
}

impl State {
    /// One message on the notify socket. Only the serving process is listened to: it may name
    /// its successor (`MAINPID=`, a child of ours), and the rest goes to our manager.
    fn handle(&mut self, len: usize, sender: Option<u32>) {
        let text = String::from_utf8_lossy(&self.buf[..len]).into_owned();
        if sender != Some(self.main) {
            self.strangers += 1;
            if self.strangers == 1 {
                tracing::warn!(?sender, main = self.main, message = ?text.trim_end(), "keeper: ignoring a message not sent by the serving process");
            }
            return;
        }
        let mut relay = String::new();
        for line in text.lines() {
            match line.strip_prefix("MAINPID=").map(str::parse::<u32>) {
                Some(Ok(pid)) if sys::is_our_child(pid) => {
                    tracing::info!(
                        from = self.main,
                        pid,
                        "keeper: the serving process handed over; it is now pid {pid}"
                    );
                    self.main = pid;
                }
                Some(_) => tracing::warn!(
                    line,
                    "keeper: ignoring a MAINPID= that does not name a child of ours"
                ),
                None => {
                    relay.push_str(line);
                    relay.push('\n');
                }
            }
        }
        if !relay.is_empty() {
            // For our manager we stay the main process: everything but MAINPID= goes on.
            self.notifier.relay_upstream(&relay);
        }
    }

    /// Reads what is queued on the notify socket, without waiting: before an exit is judged,
    /// the `MAINPID=` its sender delivered before exiting must be known.
    fn drain(&mut self, socket: Option<&tokio::net::UnixDatagram>) {
        let Some(socket) = socket else { return };
        // Bounded: the queue holds net.unix.max_dgram_qlen messages, a stranger may refill it.
        for _ in 0..1000 {
            match sys::recv_with_credentials(socket.as_fd(), &mut self.buf) {
                Ok((len, credentials)) => self.handle(len, credentials.map(|c| c.pid)),
                Err(_) => break,
            }
        }
    }

    /// Reaps every exited child; exits with the serving process's status if it is among them.
    fn reap(&mut self) {
        // Bounded: each turn reaps one child.
        for _ in 0..100_000 {
            match sys::reap_any() {
                Ok(Some((pid, code))) if pid == self.main => {
                    tracing::info!(
                        pid,
                        code,
                        "keeper: the serving process exited; exiting with its status"
                    );
                    std::process::exit(code);
                }
                Ok(Some((pid, code))) => {
                    tracing::info!(pid, code, "keeper: reaped a child");
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "keeper: waitpid failed");
                    break;
                }
            }
        }
        if !sys::is_our_child(self.main) {
            tracing::error!(
                pid = self.main,
                "keeper: the serving process is not a child of ours any more; exiting"
            );
            std::process::exit(1);
        }
    }

    fn forward(&self, sig: i32) {
        let name = crate::signals::name(sig);
        match sys::signal_child(self.main, sig) {
            Ok(()) => tracing::info!(
                pid = self.main,
                signal = %name,
                "keeper: forwarded to the serving process"
            ),
            Err(e) => {
                tracing::error!(pid = self.main, signal = %name, error = %e, "keeper: could not forward")
            }
        }
    }
}
