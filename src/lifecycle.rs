//! The lifecycle of a server: explicit stages, and the events that move between them.
//!
//! ```text
//!             restart (signal | handle)        successor READY=1 + MAINPID= delivered
//!  Serving ────────────────────────▶ Serving ─────────────────────────────▶ HandedOver ──▶ Done
//!    │  ▲                          + restart                                 │  (draining,
//!    │  ├────────────────────────────┘ failed / timed out: rolled back       │  listeners kept,
//!    │  └───────────────────────────────────────────────────────────────────┘  successor watched)
//!    │        the successor died before this process's drain ended: serving again
//!    │ close (signal | handle | with_graceful_shutdown)
//!    ├──▶ LameDuck (shutdown_delay; still accepting) ──(delay over | close)──▶ Draining ──▶ Done
//!    └──(no delay)──────────────────────────────────────────────────────────▶ Draining
//!       every listener lost ─────────────────────────────────────────────────▶ Draining (error)
//! ```
//! - Signals, the [`Handle`], the accept loops, a restart in progress, the lame duck's timer,
//!   the successor's pidfd and the drain only produce [`Event`]s ([`Lifecycle::next_event`]);
//!   each event is handled by one short method, which may change the [`Stage`]
//!   ([`Lifecycle::step`]). What belongs to one stage lives in that stage's data.
//! - The handle's [`State`] is derived from the stage ([`Lifecycle::state`]) and published
//!   after every step, for handlers (`/healthz`).
//! - A close signal moves the shutdown one step on: serving → lame duck → draining → cut.
//!   After a hand-off or a requested shutdown, the first close signal only confirms the drain
//!   under way (systemd's stop reaching a draining old process, Ctrl-C to a process group).
//! - Draining: stop accepting, run the hooks in order, then drain the connections; one
//!   deadline, [`Server::drain_timeout`] after accepting stopped, bounds both. Without a
//!   successor this process's copies of the listeners are closed when accepting stops.
//! - Handed over: as long as one process of the service lives, the service answers. The old
//!   process keeps its copies of the listeners and the successor's pidfd until it exits; if
//!   the successor dies first (nobody asked the service to stop, it did not exit 0, and no
//!   later process holds the listeners), it serves again: accepts,
//!   tells the service manager `MAINPID=` itself, `READY=1` and a `STATUS=` that says what
//!   happened, and its state is [`State::Serving`] again.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::accept::{self, Acceptor, ConnContext, ServeConn};
use crate::error::Error;
use crate::handle::{Command, Handle, RestartError, RestartErrorKind, Restarted, State};
use crate::handoff::{self, Sent};
use crate::hooks::{self, Hook, HooksReport};
use crate::listen::{self, Listener};
use crate::notify::{Notifier, NotifyState};
use crate::registry::{CutOnDrop, Drained};
use crate::restart::{Failed, HandedOver, Restarting, Rollback};
use crate::server::{Config, Reason, Server, Shutdown};
use crate::signals::{self, SignalEvents};
use crate::startup::{self, Startup};
use crate::sys::Holders;

/// Runs `server` to the end of its life.
pub(crate) async fn run(server: Server) -> Result<Shutdown, Error> {
    let mut life = match Lifecycle::start(server).await {
        Ok(life) => life,
        Err(e) => {
            // A restarted process that cannot start serving says why to its parent.
            crate::reason::report(&e);
            return Err(e);
        }
    };
    let end = loop {
        let event = life.next_event().await;
        if let Some(end) = life.step(event).await {
            crate::metrics::ended(&end);
            break end;
        }
        life.publish();
    };
    // As PID 1 after a hand-off, this process stays on as its successors' init: with nothing of
    // the server left (its channel to the successor, its tasks, its listeners).
    let keeper = life.stays_on_as_keeper();
    drop(life);
    if keeper {
        crate::keeper::after_shutdown().await;
    }
    end
}

/// What can happen to a server.
#[derive(Debug)]
pub(crate) enum Event {
    /// A close signal.
    Close(i32),
    /// A restart signal.
    RestartSignal(i32),
    /// The signal stream ended (it should not).
    SignalsEnded,
    /// A [`Handle`] asked for something (`with_graceful_shutdown`'s futures ask through it).
    Command(Command),
    /// The restart in progress ended.
    RestartDone(Result<HandedOver, Failed>),
    /// A listener can no longer accept.
    ListenerLost(std::io::Error),
    /// The lame duck's delay is over.
    DelayOver,
    /// The successor this process handed over to has exited.
    SuccessorExited,
    /// Hooks and drain are done (and every rolled-back child has stopped).
    Drained,
    /// A rolled-back child has stopped.
    RollbackStopped,
}

/// Where the server is; what it does now, with what belongs to that stage only.
enum Stage {
    /// Accepting and serving; possibly with a successor starting.
    Serving {
        restart: Option<InFlight>,
        duties: Duties,
    },
    /// Shutting down, still accepting until `until`.
    LameDuck {
        reason: Reason,
        began: Instant,
        until: Instant,
        duties: Duties,
    },
    /// A successor serves; this process drains, keeping its listeners and watching it.
    HandedOver { drain: Drain, successor: Successor },
    /// No longer accepting, for good; hooks, then connections.
    Draining(Drain),
}

/// What this process owes the service while it is its main process and has not drained yet:
/// the hooks to run when it drains, and the watchdog's pings. A hand-off gives both up (the
/// hooks run in the drain that follows it; the new process pings); a drain for good takes the
/// hooks and keeps the pings going.
#[derive(Default)]
struct Duties {
    hooks: Vec<Hook>,
    watchdog: Option<AbortOnDropHandle<()>>,
}

impl Stage {
    /// What the handle shows for this stage.
    fn state(&self) -> State {
        match self {
            Stage::Serving { restart: None, .. } => State::Serving,
            Stage::Serving {
                restart: Some(_), ..
            } => State::Restarting,
            Stage::LameDuck { .. } => State::LameDuck,
            Stage::HandedOver { successor, .. } => State::HandedOver { pid: successor.pid },
            Stage::Draining(_) => State::Draining,
        }
    }
}

struct InFlight {
    restarting: Restarting,
    /// [`Handle::restart`] calls waiting for the outcome.
    waiters: Vec<oneshot::Sender<Result<Restarted, RestartError>>>,
}

/// A drain under way: its hooks and connections, and what is reported at its end.
struct Drain {
    reason: Reason,
    /// When the shutdown began (the lame duck included).
    began: Instant,
    lame_duck: Duration,
    lame_duck_requests: u64,
    /// A close signal has been seen: the next one cuts.
    close_seen: bool,
    forced: bool,
    /// Connections passed to the successor, if it takes them.
    sent: Option<Arc<Sent>>,
    /// Why serving failed, if every listener was lost.
    failure: Option<std::io::Error>,
    work: Pin<Box<dyn Future<Output = (HooksReport, Drained)> + Send>>,
    /// The hooks, running: what a drain given up for serving again leaves to go on.
    hooks: HooksRun,
    /// The work's outcome, once done.
    done: Option<(HooksReport, Drained)>,
    /// The watchdog's pings, while this process drains as the service's main process (none
    /// after a hand-off: the new process pings).
    _watchdog: Option<AbortOnDropHandle<()>>,
    /// When the drain's time is over (`drain_timeout` after it began): what this process does
    /// for the service ends there.
    deadline: Instant,
}

/// The hooks of a drain, running on a task of their own, and their report once they are over.
struct HooksRun {
    /// Held so that dropping the server stops them.
    _task: AbortOnDropHandle<()>,
    report: tokio::sync::watch::Receiver<Option<HooksReport>>,
}

/// What drains given up for serving again did: counted into the final report.
#[derive(Default)]
struct GivenUp {
    /// Their hooks, which run on (to their end, once) and are counted when serving is over.
    hooks: Vec<HooksRun>,
    passed: usize,
    kept: usize,
}

/// The process a hand-off went to, watched while this one drains.
struct Successor {
    pid: u32,
    pidfd: Arc<OwnedFd>,
    /// Readable once it exited; `None` once that was handled (or if it cannot be watched).
    watch: Option<AsyncFd<Arc<OwnedFd>>>,
    /// Our own child (as PID 1): reaped here if it dies; the keeper forwards signals to it.
    ours: bool,
    /// The service was asked to stop (a close signal or shutdown reached this process, or was
    /// forwarded to the successor): its end is no reason to serve again.
    stopping: bool,
}

struct Lifecycle {
    config: Config,
    startup: &'static Startup,
    handle: Handle,
    commands: mpsc::UnboundedReceiver<Command>,
    signals: SignalEvents,
    signals_open: bool,
    notifier: Arc<Notifier>,
    /// What every connection of this server shares (its registry among it).
    cx: ConnContext,
    /// This process's copies of the listeners, for restarts and for serving again after a
    /// successor died; `None` once serving is over for good.
    listeners: Option<Vec<Listener>>,
    /// The service of each listener, in the same order.
    services: Vec<Box<dyn ServeConn>>,
    /// The accept loops, while accepting.
    accepting: Option<Accepting>,
    /// Where connection tasks pass connections, once a successor takes them.
    switch: Arc<handoff::Switch>,
    watchdog_usec: Option<u64>,
    /// Children of failed restarts, finishing their requests before they stop.
    rollbacks: JoinSet<()>,
    given_up: GivenUp,
    stage: Stage,
    // Dropped last, in this order: tasks first, then what they use.
    _tasks: Vec<AbortOnDropHandle<()>>,
    _cut_on_drop: CutOnDrop,
    _claim: Option<RestartClaim>,
}

impl Lifecycle {
    /// Validates the configuration, starts accepting, reports `READY=1`. An error here leaves
    /// nothing running.
    async fn start(server: Server) -> Result<Lifecycle, Error> {
        let Server {
            listeners,
            services,
            config,
            http,
            handle,
            commands,
            hooks,
            shutdown_signals,
            #[cfg(feature = "rustls")]
            tls,
        } = server;
        let startup = startup::get();
        #[cfg(feature = "rustls")]
        let serves_tls = !tls.is_empty();
        let bound = bind_services(listeners.into_vec(), services)?;
        listen::check_untaken()?;
        #[cfg(feature = "rustls")]
        let bound = crate::tls::apply(bound, tls)?;
        let claim = match config.restarts {
            true => Some(RestartClaim::take()?),
            false => None,
        };
        // Caught even with restarts off: ignored then, rather than ending the process.
        let restart_signals: &[i32] = &config.restart_signals;
        let signals = SignalEvents::new(&config.close_signals, restart_signals)?;
        // As PID 1, what to forward to the successor once this process is its keeper.
        crate::keeper::forward_signals(&config.close_signals, restart_signals);
        let notifier = Arc::new(Notifier::from_startup(startup));
        // The TLS session ticket keys go to the fd store too, and again at each rotation.
        #[cfg(feature = "rustls")]
        if config.fd_store && serves_tls {
            let store_now = !notifier.has_parent_channel();
            crate::tickets::keep_in_fd_store(Arc::clone(&notifier), store_now);
        }
        let connections =
            crate::registry::Connections::new(config.header_read_timeout, config.connection_info);
        let (mut listeners, services): (Vec<Listener>, Vec<Box<dyn ServeConn>>) =
            bound.into_iter().unzip();
        if config.fd_store {
            // Stored below: the service manager holds them too from then on.
            for l in listeners
                .iter_mut()
                .filter(|l| l.origin() == crate::Origin::Bound)
            {
                l.share();
            }
        }
        // Registered before any loop starts, so an error here leaves nothing running.
        let acceptors = listeners
            .iter()
            .map(Acceptor::new)
            .collect::<Result<Vec<_>, _>>()?;

        let switch = Arc::new(handoff::Switch::default());
        // The handle's slot: an upgraded connection finds the switch through its handle
        // (`upgrade`).
        let slot = Arc::clone(handle.hand_off_slot());
        let _ = slot.set(Arc::clone(&switch) as Arc<dyn crate::conn::HandOff>);
        let cx = ConnContext::new(http, connections.clone(), handle.clone(), slot);
        let mut tasks = vec![AbortOnDropHandle::new(tokio::spawn(connections.sweeper()))];
        if let Some(exit) = startup.predecessor_exit() {
            tasks.push(AbortOnDropHandle::new(tokio::spawn(exit)));
        }
        // `with_graceful_shutdown`: each future, once complete, asks as the handle would.
        for signal in shutdown_signals {
            let handle = handle.clone();
            tasks.push(AbortOnDropHandle::new(tokio::spawn(async move {
                signal.await;
                tracing::info!("shutdown requested");
                handle.shutdown();
            })));
        }
        let accepting = Accepting::start(&listeners, &services, acceptors, &cx);
        let urls: Vec<String> = listeners
            .iter()
            .zip(&services)
            .map(|(l, s)| s.url(l))
            .collect();
        for (l, url) in listeners.iter().zip(&urls) {
            tracing::info!(url = %url, listener = l.name(), pid = startup.pid, "accepting");
        }
        if config.fd_store {
            let stored: Vec<_> = listeners
                .iter()
                .filter(|l| l.origin() == crate::Origin::Bound)
                .map(|l| (l.as_fd(), l.name()))
                .collect();
            notifier.store_fds(&stored);
        }
        if config.connection_handoff && notifier.has_parent_channel() {
            notifier.offer_connections();
            if config.resume_upgraded.is_some() {
                notifier.offer_upgraded();
            }
        }
        let by_name: Vec<(Arc<str>, Box<dyn ServeConn>)> = listeners
            .iter()
            .zip(&services)
            .map(|(l, s)| (Arc::from(l.name()), s.clone_box()))
            .collect();
        let watchdog_usec = crate::notify::watchdog_usec(startup);
        let mut life = Lifecycle {
            config,
            startup,
            handle,
            commands,
            signals,
            signals_open: true,
            notifier,
            cx,
            listeners: Some(listeners),
            services,
            accepting: Some(accepting),
            switch,
            watchdog_usec,
            rollbacks: JoinSet::new(),
            given_up: GivenUp::default(),
            stage: Stage::Serving {
                restart: None,
                // The watchdog starts once READY=1 is out.
                duties: Duties {
                    hooks,
                    watchdog: None,
                },
            },
            _tasks: tasks,
            _cut_on_drop: CutOnDrop(connections),
            _claim: claim,
        };
        // Accepting already: what a request sees from now on.
        life.publish();
        let listening = format!("Listening on {}", urls.join(", "));
        // Recorded before READY=1 leaves, so that whoever hears it can already read it.
        crate::metrics::ready();
        life.notifier
            .ready(&listening, life.config.ready_timeout)
            .await;
        tracing::info!(pid = startup.pid, "ready");
        life.receive_connections(by_name, listening);
        life.start_watchdog();
        Ok(life)
    }

    /// The previous process passes its connections now, if it has any and we said we take
    /// them.
    fn receive_connections(
        &mut self,
        by_name: Vec<(Arc<str>, Box<dyn ServeConn>)>,
        listening: String,
    ) {
        let Some(channel) = self.notifier.take_parent_channel() else {
            return;
        };
        if !self.config.connection_handoff {
            return;
        }
        let notifier = Arc::clone(&self.notifier);
        let cx = self.cx.clone();
        let resume_upgraded = self.config.resume_upgraded.clone();
        self._tasks
            .push(AbortOnDropHandle::new(tokio::spawn(async move {
                let taken = handoff::receive(channel, by_name, cx, resume_upgraded).await;
                if taken > 0 {
                    // What `systemctl status` shows: this process serves the previous one's
                    // clients too.
                    let status = format!(
                        "{listening}; took over {} from the previous process",
                        plural_connections(taken)
                    );
                    notifier.notify(&[NotifyState::Status(&status)]);
                }
            })));
    }

    /// Starts the watchdog's pings (if the service manager asked for them) for the serving
    /// stage.
    fn start_watchdog(&mut self) {
        let watchdog = self.watchdog_usec.map(|usec| {
            AbortOnDropHandle::new(crate::notify::spawn_watchdog(
                Arc::clone(&self.notifier),
                usec,
            ))
        });
        if let Stage::Serving { duties, .. } = &mut self.stage {
            duties.watchdog = watchdog;
        }
    }

    /// Takes the duties of the main process out of the stage (serving or lame duck), for the
    /// next stage; none from the others.
    fn take_duties(&mut self) -> Duties {
        match &mut self.stage {
            Stage::Serving { duties, .. } | Stage::LameDuck { duties, .. } => {
                std::mem::take(duties)
            }
            Stage::HandedOver { .. } | Stage::Draining(_) => Duties::default(),
        }
    }

    /// The next thing that happened. Every source is cancel safe: dropping this future loses
    /// nothing.
    async fn next_event(&mut self) -> Event {
        let Lifecycle {
            signals,
            signals_open,
            commands,
            accepting,
            rollbacks,
            stage,
            ..
        } = self;
        let rollbacks_left = !rollbacks.is_empty();
        tokio::select! {
            event = signals.next(), if *signals_open => match event {
                Some(signals::Event::Close(sig)) => Event::Close(sig),
                Some(signals::Event::Restart(sig)) => Event::RestartSignal(sig),
                None => Event::SignalsEnded,
            },
            Some(command) = commands.recv() => Event::Command(command),
            Some(e) = listener_lost(accepting) => Event::ListenerLost(e),
            Some(_) = rollbacks.join_next(), if rollbacks_left => Event::RollbackStopped,
            event = stage_event(stage, rollbacks_left) => event,
        }
    }

    /// Handles one event. `Some` when serving is over.
    async fn step(&mut self, event: Event) -> Option<Result<Shutdown, Error>> {
        match event {
            Event::Close(sig) => self.on_close(sig).await,
            Event::RestartSignal(sig) => self.on_restart_signal(sig),
            Event::SignalsEnded => {
                self.signals_open = false;
                tracing::error!("signal handling stopped; only the handle can stop this server");
            }
            Event::Command(Command::Restart(reply)) => self.on_restart_command(reply),
            Event::Command(Command::Shutdown { force }) => self.on_shutdown_command(force).await,
            Event::RestartDone(outcome) => self.on_restart_done(outcome).await,
            Event::ListenerLost(e) => self.on_listener_lost(e).await,
            Event::DelayOver => self.end_lame_duck(false, None).await,
            Event::SuccessorExited => self.on_successor_exited(),
            Event::RollbackStopped => {}
            Event::Drained => {
                self.leave_no_queue().await;
                // Hooks of a drain given up for serving again, if still running: they end by
                // that drain's deadline, which came before this one's.
                for h in &mut self.given_up.hooks {
                    let _ = h.report.wait_for(Option::is_some).await;
                }
                return Some(self.finish());
            }
        }
        None
    }

    /// The public state, derived from the stage.
    fn state(&self) -> State {
        self.stage.state()
    }

    /// Publishes the state on the handle's watch (only a change wakes the watchers).
    fn publish(&self) {
        self.handle.set_state(self.state());
    }

    /// As PID 1 with a successor: this process stays on as its init once serving is over.
    fn stays_on_as_keeper(&self) -> bool {
        matches!(
            &self.stage,
            Stage::HandedOver {
                successor: Successor { ours: true, .. },
                ..
            }
        )
    }

    // -----------------------------------------------------------------------------------------
    // Transitions.

    async fn on_close(&mut self, sig: i32) {
        let name = signals::name(sig);
        match &mut self.stage {
            Stage::Serving { .. } => {
                tracing::info!(signal = %name, "close signal received; shutting down");
                if let Some(handed) = self.cancel_restart().await {
                    // The successor became ready just as the signal came: it is the service
                    // now, and the signal was meant for the service.
                    handed.forward_signal(sig);
                    return self.hand_over(handed, true).await;
                }
                self.begin_shutdown(Reason::Signal(sig)).await;
            }
            Stage::LameDuck { .. } => {
                tracing::info!(signal = %name, "close signal during the lame duck: draining now (another one cuts)");
                self.end_lame_duck(true, None).await;
            }
            Stage::HandedOver { drain, successor } => {
                // A stop of the service (systemd's reaching this process too): the successor's
                // end is no reason to serve again.
                successor.stopping = true;
                drain.close_signal(&name, &self.cx);
            }
            Stage::Draining(drain) => drain.close_signal(&name, &self.cx),
        }
    }

    fn on_restart_signal(&mut self, sig: i32) {
        let name = signals::name(sig);
        match &self.stage {
            _ if !self.config.restarts => {
                tracing::info!(signal = %name, "restart signal ignored: restarts are disabled for this server");
            }
            Stage::Serving { restart: None, .. } => {
                tracing::info!(signal = %name, "restart signal received");
                self.start_restart(None);
            }
            Stage::Serving {
                restart: Some(_), ..
            } => {
                tracing::info!(signal = %name, "restart signal received while a restart is in progress; coalesced");
            }
            Stage::HandedOver { successor, .. } => {
                tracing::info!(signal = %name, pid = successor.pid, "restart signal ignored: this process has handed over");
            }
            _ => tracing::info!(signal = %name, "restart signal ignored: shutting down"),
        }
    }

    fn on_restart_command(&mut self, reply: oneshot::Sender<Result<Restarted, RestartError>>) {
        let refusal = match &self.stage {
            _ if !self.config.restarts => RestartError::new(
                RestartErrorKind::Disabled,
                "restarts are disabled for this server (Server::restarts(false))",
            ),
            Stage::Serving { restart: None, .. } => {
                tracing::info!("restart requested through the handle");
                return self.start_restart(Some(reply));
            }
            Stage::Serving {
                restart: Some(_), ..
            } => RestartError::new(
                RestartErrorKind::AlreadyRestarting,
                "already restarting: a restart is in progress",
            ),
            Stage::HandedOver { successor, .. } => RestartError::new(
                RestartErrorKind::HandedOver,
                format!(
                    "this process has handed over to pid {}: the service runs there; restart it there",
                    successor.pid
                ),
            ),
            Stage::LameDuck { .. } | Stage::Draining(_) => RestartError::new(
                RestartErrorKind::ShuttingDown,
                "the server is shutting down; it does not restart any more",
            ),
        };
        let _ = reply.send(Err(refusal));
    }

    async fn on_shutdown_command(&mut self, force: bool) {
        match &mut self.stage {
            Stage::Serving { .. } => {
                if let Some(handed) = self.cancel_restart().await {
                    if let Some(&sig) = self.config.close_signals.first() {
                        handed.forward_signal(sig);
                    }
                    self.hand_over(handed, true).await;
                } else if force {
                    self.begin_drain(Reason::Requested, None, None).await;
                } else {
                    self.begin_shutdown(Reason::Requested).await;
                }
            }
            Stage::LameDuck { .. } if force => self.end_lame_duck(true, None).await,
            Stage::HandedOver { successor, .. } => successor.stopping = true,
            Stage::LameDuck { .. } | Stage::Draining(_) => {}
        }
        if force {
            if let Some(drain) = self.drain_mut() {
                tracing::warn!("forced shutdown: cutting all connections now");
                drain.forced = true;
                drain.close_seen = true;
                self.cx.connections.cut();
            }
        }
    }

    async fn on_restart_done(&mut self, outcome: Result<HandedOver, Failed>) {
        let Stage::Serving { restart, .. } = &mut self.stage else {
            return;
        };
        let Some(in_flight) = restart.take() else {
            return;
        };
        match outcome {
            Ok(handed) => {
                tracing::info!(pid = handed.pid, ready_after = ?handed.ready_after, "handed over");
                crate::metrics::handed_over(handed.ready_after);
                in_flight.reply(Ok(handed.restarted()));
                self.hand_over(handed, false).await;
            }
            Err(Failed { failure, rollback }) => {
                self.roll_back(rollback);
                // Reported only now that a new restart would be accepted, so whoever waits for
                // this message may restart again at once.
                let pid = self.startup.pid;
                crate::metrics::restart_failed();
                let status = format!("Restart failed: {failure}; still serving as pid {pid}");
                self.notifier.notify_patiently(
                    &[NotifyState::Ready, NotifyState::Status(&status)],
                    self.config.ready_timeout,
                );
                tracing::info!(pid, "still serving after the failed restart");
                in_flight.reply(Err(RestartError::failed(&failure, pid)));
            }
        }
    }

    async fn on_listener_lost(&mut self, e: std::io::Error) {
        let Some(accepting) = &mut self.accepting else {
            return;
        };
        accepting.lost += 1;
        if accepting.lost < accepting.total {
            return;
        }
        tracing::error!("no listener can accept any more; shutting down after the drain");
        match &self.stage {
            Stage::Serving { .. } => match self.cancel_restart().await {
                Some(handed) => self.hand_over(handed, false).await,
                None => self.begin_drain(Reason::ListenersLost, None, Some(e)).await,
            },
            Stage::LameDuck { .. } => self.end_lame_duck(false, Some(e)).await,
            Stage::HandedOver { .. } | Stage::Draining(_) => {}
        }
    }

    /// The successor exited while this process drains: unless the service was asked to stop
    /// (here, or as far as its exit status 0 tells, there) or a later process serves (the
    /// successor had handed over in its turn: another process holds the listeners), this
    /// process serves again, so that the service never goes dark while one of its processes
    /// lives.
    fn on_successor_exited(&mut self) {
        let Stage::HandedOver { successor, .. } = &mut self.stage else {
            return;
        };
        successor.watch = None;
        let pid = successor.pid;
        // From the pidfd (recent kernels keep it there after the reaping), else read while it
        // is a zombie (our own child is reaped by the keeper, with its status, unless this
        // process serves again); the pidfd again, in case its parent reaped it in between.
        let pidfd = successor.pidfd.as_fd();
        let exit = crate::sys::pidfd_exit(pidfd)
            .or_else(|| crate::sys::exit_description(pid))
            .or_else(|| crate::sys::pidfd_exit(pidfd))
            .unwrap_or(crate::error::ChildExit::Unknown);
        let how = exit.to_string();
        let stopping = successor.stopping;
        let holders = self.listeners.as_ref().map(|listeners| {
            let fds: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
            crate::sys::held_elsewhere(&fds)
        });
        if let Some(Holders::Found(holder)) = holders {
            // It had handed over in its turn: a later process serves.
            tracing::info!(
                pid,
                %how,
                holder,
                "the new process ended while this one drains, but another process holds the listeners (it had handed over in its turn): not serving again"
            );
            return;
        }
        if stopping || exit == crate::error::ChildExit::Code(0) {
            // Asked to stop (here, or, for an exit 0, a stop that reached only the main
            // process, `KillMode=mixed`; or its application decided to): not a death to make
            // up for. This process holds the last copies of the listeners now, as far as it
            // can tell: a door only if nobody else can.
            let deadline = match &self.stage {
                Stage::HandedOver { drain, .. } => drain.deadline,
                _ => Instant::now(),
            };
            let last = self.close_last_copies(holders == Some(Holders::Nobody), deadline);
            // Stopped with the server, like everything it started.
            self._tasks.push(AbortOnDropHandle::new(tokio::spawn(last)));
            tracing::info!(
                pid,
                %how,
                "the new process ended in order while this one drains: not serving again; closed this process's copies of the listeners"
            );
            return;
        }
        tracing::warn!(
            pid,
            %how,
            "the new process died while this one drains: serving again"
        );
        self.serve_again(pid, &how);
    }

    /// This process holds the last copies of the listeners (its successor ended, the service
    /// stops, and no other process holds them): they are closed as a stopping server closes
    /// its own (`accept`), so that no client queued on them since the successor closed its
    /// copies is reset: what is queued is accepted and answered, and a TCP listener only the
    /// service holds has its door shut first.
    ///
    /// `doors`: whether a door may be shut, as far as this process can tell nobody else holds
    /// them. Returns the last handshakes' future (a tenth of a second) to run.
    fn close_last_copies(
        &mut self,
        doors: bool,
        deadline: Instant,
    ) -> impl Future<Output = ()> + Send + 'static {
        let listeners = self.listeners.take().unwrap_or_default();
        let stopped: Vec<accept::Stopped> = listeners
            .iter()
            .zip(&self.services)
            .filter_map(|(l, service)| match Acceptor::new(l) {
                Ok(acceptor) => Some(accept::Stopped::idle(
                    acceptor,
                    Arc::from(l.name()),
                    service.clone_box(),
                    self.cx.clone(),
                )),
                Err(e) => {
                    tracing::warn!(listener = l.name(), error = %e, "cannot accept what is queued on the listener before closing it");
                    None
                }
            })
            .collect();
        let (doors, others): (Vec<_>, Vec<_>) =
            stopped.into_iter().partition(|s| doors && s.shut_door());
        for s in doors.iter().chain(&others) {
            s.accept_queued();
        }
        drop(listeners);
        drop(others);
        accept::last_handshakes(doors, deadline)
    }

    /// The drain after a hand-off is over, and the successor still lives: if it no longer
    /// holds the listeners (it stopped for good, and closed its copies, while this process
    /// drained), this process holds the last copies, and clients queued on them since; they
    /// are accepted and answered, and the copies closed as a stopping server closes its own,
    /// before this process exits (which would reset them).
    async fn leave_no_queue(&mut self) {
        let Stage::HandedOver { successor, drain } = &self.stage else {
            return;
        };
        let Some(listeners) = &self.listeners else {
            return;
        };
        let Some(first) = listeners.first() else {
            return;
        };
        // Within the drain's time only: past it (the drain was cut), what is queued would be
        // cut as soon as accepted; this process exits now, as promised.
        let deadline = drain.deadline;
        if Instant::now() >= deadline || self.cx.connections.force().is_cancelled() {
            return;
        }
        if crate::sys::holds_socket(successor.pid, first.as_fd()) == Some(true) {
            // It serves on them: dropping our copies loses nothing.
            return;
        }
        let fds: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
        let holders = crate::sys::held_elsewhere(&fds);
        if let Holders::Found(_) = holders {
            return;
        }
        let pid = successor.pid;
        let before = self.cx.connections.open();
        self.close_last_copies(holders == Holders::Nobody, deadline)
            .await;
        let taken = self.cx.connections.open().saturating_sub(before);
        if taken == 0 {
            return;
        }
        tracing::info!(
            pid,
            taken,
            "the new process no longer holds the listeners (it stops), and this process held the last copies: answering the clients queued on them before exiting"
        );
        // Still a drain: bounded by its deadline, and a close signal is heard (the second one
        // cuts, as in any drain).
        let grace = self.config.keep_alive_grace;
        let connections = self.cx.connections.clone();
        let wait = connections.drain(deadline, grace, std::future::ready(()), |_| {});
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => return,
                event = self.signals.next(), if self.signals_open => match event {
                    Some(signals::Event::Close(sig)) => {
                        let name = signals::name(sig);
                        if let Stage::HandedOver { drain, .. } = &mut self.stage {
                            drain.close_signal(&name, &self.cx);
                        }
                    }
                    Some(signals::Event::Restart(sig)) => {
                        tracing::info!(signal = %signals::name(sig), "restart signal ignored: this process is handing over its last clients before it exits");
                    }
                    None => self.signals_open = false,
                },
            }
        }
    }

    /// Shutting down: a lame duck first if there is a delay, else straight to the drain.
    async fn begin_shutdown(&mut self, reason: Reason) {
        let delay = self.config.shutdown_delay;
        if delay.is_zero() {
            return self.begin_drain(reason, None, None).await;
        }
        self.send_stopping(&format!(
            "Stopping: lame duck for {delay:?}, still accepting; then draining (at most {:?})",
            self.config.drain_timeout
        ));
        let began = Instant::now();
        self.extend_timeout(delay.saturating_add(self.config.drain_timeout));
        self.cx.connections.lame_duck();
        let duties = self.take_duties();
        self.stage = Stage::LameDuck {
            reason,
            began,
            until: crate::instant_after(began, delay),
            duties,
        };
        // Readiness fails from now on: published before anything else can see the lame duck.
        self.publish();
        tracing::info!(
            ?delay,
            "lame duck: still accepting and serving, with Connection: close and GOAWAY, until the delay is over"
        );
    }

    /// The lame duck is over (its delay, a further close signal, or every listener lost):
    /// drain now.
    async fn end_lame_duck(&mut self, close_seen: bool, failure: Option<std::io::Error>) {
        let Stage::LameDuck { reason, began, .. } = self.stage else {
            return;
        };
        let lame_duck = began.elapsed();
        tracing::info!(
            ?lame_duck,
            requests = self.cx.connections.requests_while_stopping(),
            "lame duck over: no longer accepting"
        );
        let over = LameDuckOver {
            began,
            lame_duck,
            close_seen,
        };
        self.begin_drain(reason, Some(over), failure).await;
    }

    /// The successor is the service now: stop accepting (keeping the listeners), pass the
    /// connections if it takes them, drain the rest, and watch it. `stopping`: the service was
    /// asked to stop at this very moment (the request was forwarded to the successor).
    async fn hand_over(&mut self, handed: HandedOver, stopping: bool) {
        let pid = handed.pid;
        // The listeners stay open here (their queues are the new process's too): the accept
        // loops' duplicates close, the originals are kept in case the new process dies.
        drop(self.stop_accepting().await);
        tracing::info!(
            pid,
            "stopped accepting; the new process accepts now (this process keeps its copies of the listeners while it drains, in case the new one dies first)"
        );
        // The new process is the service now, and pings the watchdog itself; the hooks run in
        // the drain below.
        let Duties { hooks, watchdog } = self.take_duties();
        drop(watchdog);
        let sent = match handed.accepts_connections && self.config.connection_handoff {
            true => {
                let (outbox, sent) = handoff::send(
                    handed.channel,
                    pid,
                    Arc::clone(&handed.pidfd),
                    handed.accepts_upgraded,
                );
                self.switch.set(Some(outbox));
                tracing::info!(
                    pid,
                    "the new process takes connections: plaintext HTTP/1 connections move to it at their next request boundary"
                );
                Some(sent)
            }
            false => None,
        };
        let watch = match crate::sys::register_shared(Arc::clone(&handed.pidfd), Interest::READABLE)
        {
            Ok(watch) => Some(watch),
            Err((_, e)) => {
                tracing::warn!(pid, error = %e, "cannot watch the new process: this process will not serve again if it dies");
                None
            }
        };
        let drain = self.drain(
            Reason::HandedOver { pid },
            None,
            sent,
            None,
            Vec::new(),
            Duties {
                hooks,
                watchdog: None,
            },
        );
        self.stage = Stage::HandedOver {
            drain,
            successor: Successor {
                pid,
                pidfd: handed.pidfd,
                watch,
                ours: handed.keeper_forwards,
                stopping,
            },
        };
    }

    /// Enters the drain for good: stop accepting, close this process's copies of the
    /// listeners (a bound address refuses new clients from then on; a socket unit queues
    /// them), then the hooks, then the connections, under one deadline.
    async fn begin_drain(
        &mut self,
        reason: Reason,
        after: Option<LameDuckOver>,
        failure: Option<std::io::Error>,
    ) {
        let stopped = self.stop_accepting().await;
        // A listener only this service holds gets its door shut first: no new client enters
        // its queue, and those whose handshake is under way are still accepted, for a round
        // trip, before it closes (`accept`). The others close now.
        let (doors, others): (Vec<_>, Vec<_>) = stopped.into_iter().partition(|s| s.shut_door());
        // What entered the listeners' queues meanwhile is taken now, right before they close
        // (closing the only copy of a listener resets what is queued on it).
        for s in doors.iter().chain(&others) {
            s.accept_queued();
        }
        // Closed now: the originals, and the accept loops' duplicates of the listeners without
        // a door (those with one close at the end of the drain's first step).
        self.listeners = None;
        drop(others);
        tracing::info!("stopped accepting");
        let status = format!(
            "Stopping: draining {}",
            plural_connections(self.cx.connections.open())
        );
        self.send_stopping(&status);
        let duties = self.take_duties();
        let drain = self.drain(reason, after, None, failure, doors, duties);
        self.stage = Stage::Draining(drain);
    }

    /// The successor died during this process's drain: accept again on the listeners kept,
    /// and tell the service manager. Connections the drain had left are served on (those told
    /// `Connection: close` close after their next response); the new ones as usual.
    fn serve_again(&mut self, pid: u32, how: &str) {
        let Some(listeners) = &self.listeners else {
            return;
        };
        for l in listeners {
            // The successor may have shut the door of a listener it stopped on (`accept`).
            match crate::sys::open_door(l.as_fd()) {
                Ok(true) => tracing::info!(
                    listener = l.name(),
                    "opened the door the new process had shut"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(listener = l.name(), error = %e, "cannot tell whether the new process shut the listener's door (SO_GET_FILTER); new clients may not get in")
                }
            }
        }
        let acceptors = match listeners
            .iter()
            .map(Acceptor::new)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(acceptors) => acceptors,
            Err(e) => {
                tracing::error!(error = %e, "cannot accept again; the drain goes on");
                return;
            }
        };
        // The drain's remaining work stops here (its hooks have run); its connections stay.
        // No hooks any more: they ran when that drain began. The watchdog starts below.
        let serving = Stage::Serving {
            restart: None,
            duties: Duties::default(),
        };
        let given_up = std::mem::replace(&mut self.stage, serving);
        let Stage::HandedOver { successor, drain } = given_up else {
            unreachable!("BUG: serving again from a stage other than handed over");
        };
        // What it did stays in the final report: the hooks it ran (they do not run again) and
        // the connections it passed or kept.
        self.given_up.hooks.push(drain.hooks);
        if let Some(sent) = &drain.sent {
            self.given_up.passed += sent.passed.load(Ordering::Relaxed);
            self.given_up.kept += sent.kept.load(Ordering::Relaxed);
        }
        let ours = successor.ours;
        if ours {
            // Our own child: no keeper any more, so it is ours to reap.
            crate::keeper::stand_down();
            let _ = crate::sys::reap(successor.pidfd.as_fd());
        }
        self.switch.set(None);
        self.cx.connections.resume();
        self.accepting = Some(Accepting::start(
            listeners,
            &self.services,
            acceptors,
            &self.cx,
        ));
        self.start_watchdog();
        // What a request sees before the service manager hears of it.
        self.publish();
        let me = self.startup.pid;
        let status = format!(
            "Serving again as pid {me}: the new process (pid {pid}) {how} right after the hand-off"
        );
        // As PID 1 this process was the main process all along.
        let mut states = Vec::with_capacity(3);
        if !ours {
            states.push(NotifyState::MainPid(me));
        }
        states.push(NotifyState::Ready);
        states.push(NotifyState::Status(&status));
        self.notifier
            .notify_patiently(&states, self.config.ready_timeout);
    }

    /// Stops the accept loops (the listeners themselves stay open).
    /// Stops the accept loops (the listeners themselves stay open): what each loop left, to
    /// take what is queued on its listener before that closes.
    async fn stop_accepting(&mut self) -> Vec<accept::Stopped> {
        match self.accepting.take() {
            Some(mut accepting) => {
                accepting.stop.cancel();
                accepting.join().await
            }
            None => Vec::new(),
        }
    }

    /// Serving is over: the outcome for the application.
    fn finish(&mut self) -> Result<Shutdown, Error> {
        let (d, handed_over) = match &mut self.stage {
            Stage::HandedOver { drain, .. } => (drain, true),
            Stage::Draining(drain) => (drain, false),
            _ => unreachable!("BUG: drained outside a draining stage"),
        };
        let (hooks, drained) = d.done.take().expect("BUG: drained before the drain's end");
        let elapsed = d.began.elapsed();
        let (passed, kept) = d.sent.as_ref().map_or((0, 0), |s| {
            (
                s.passed.load(Ordering::Relaxed),
                s.kept.load(Ordering::Relaxed),
            )
        });
        // Drains given up for serving again count too (their hooks are over by now: their
        // deadline came first; one still running is abandoned with this process).
        let hooks = self
            .given_up
            .hooks
            .iter()
            .filter_map(|h| *h.report.borrow())
            .fold(hooks, add_hooks);
        let (passed, kept) = (passed + self.given_up.passed, kept + self.given_up.kept);
        // Losing every listener is not a reason anybody asked for: named as what it is.
        let reason = match &d.failure {
            Some(_) => "every listener lost".to_string(),
            None => format!("{:?}", d.reason),
        };
        tracing::info!(
            %reason,
            drained = drained.open_at_start,
            passed,
            kept,
            cut = drained.cut,
            forced = d.forced,
            hooks_completed = hooks.completed,
            hooks_panicked = hooks.panicked,
            hooks_abandoned = hooks.abandoned,
            hooks_skipped = hooks.skipped,
            lame_duck = ?d.lame_duck,
            lame_duck_requests = d.lame_duck_requests,
            timed_out = self.cx.connections.timed_out(),
            ?elapsed,
            "server closed"
        );
        if !handed_over {
            // After a hand-off the state stays `HandedOver`: the service goes on elsewhere.
            self.handle.set_state(State::Stopped);
        }
        if let Some(e) = d.failure.take() {
            // Drained like any shutdown, but it is not one anybody asked for: an error, so the
            // process exits non-zero and its supervisor restarts it.
            return Err(Error::io(
                "every listener failed; the server drained and stopped",
                e,
            ));
        }
        Ok(Shutdown {
            reason: d.reason,
            hooks,
            lame_duck: d.lame_duck,
            lame_duck_requests: d.lame_duck_requests,
            drained: drained.open_at_start,
            passed,
            kept,
            cut: drained.cut,
            forced: d.forced,
            elapsed,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Helpers of the transitions.

    /// A drain: the hooks, then the connections (passing them to the successor if `sent`),
    /// under one deadline from now.
    fn drain(
        &mut self,
        reason: Reason,
        after: Option<LameDuckOver>,
        sent: Option<Arc<Sent>>,
        failure: Option<std::io::Error>,
        doors: Vec<accept::Stopped>,
        duties: Duties,
    ) -> Drain {
        let handed_over = matches!(reason, Reason::HandedOver { .. });
        let (began, lame_duck, close_seen) = match after {
            Some(l) => (l.began, l.lame_duck, l.close_seen),
            None => (
                Instant::now(),
                Duration::ZERO,
                matches!(reason, Reason::Signal(_)),
            ),
        };
        let connections = self.cx.connections.clone();
        let lame_duck_requests = connections.requests_while_stopping();
        let deadline = crate::instant_after(Instant::now(), self.config.drain_timeout);
        let grace = match handed_over {
            true => self.config.restart_keep_alive_grace,
            false => self.config.keep_alive_grace,
        };
        let Duties { hooks, watchdog } = duties;
        let notifier = Arc::clone(&self.notifier);
        let failed = sent.as_ref().map(|s| s.failed.clone());
        // The hooks run on a task of their own: if this drain is given up (the successor died,
        // this process serves again), they still run to their end, once, and their report
        // still reaches the final one.
        let (hooks_done, hooks_report) = tokio::sync::watch::channel(None);
        let force = connections.force().clone();
        let hooks_task = AbortOnDropHandle::new(tokio::spawn(async move {
            let report = hooks::run(hooks, deadline, &force).await;
            hooks_done.send_replace(Some(report));
        }));
        let mut hooks_awaited = hooks_report.clone();
        // The listeners with a shut door take their last handshakes from now on, while the
        // hooks run and then while the connections drain (its keep-alive grace runs at the same
        // time); the drain waits for every connection they accepted. Stopped with the drain.
        let handshakes =
            AbortOnDropHandle::new(tokio::spawn(accept::last_handshakes(doors, deadline)));
        let work = async move {
            let hooks = match hooks_awaited.wait_for(Option::is_some).await {
                Ok(report) => report.unwrap_or_default(),
                // The task ended without a report: it panicked or was aborted.
                Err(_) => HooksReport::default(),
            };
            let accepting = async {
                // Ended either way: done, or gone (aborted, panicked) with its listeners.
                let _ = handshakes.await;
            };
            let progress = |open| {
                tracing::info!(open, "draining");
                if !handed_over {
                    // Tell systemd how long we still need, so that neither a healthy drain
                    // is killed at TimeoutStopSec nor a hung one waited on blindly.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let status = format!("Stopping: draining {}", plural_connections(open));
                    notifier.notify(&[extend_timeout_usec(left), NotifyState::Status(&status)]);
                }
            };
            let drained = match failed {
                Some(failed) => {
                    connections
                        .drain_handing_off(deadline, grace, failed, progress)
                        .await
                }
                None => {
                    connections
                        .drain(deadline, grace, accepting, progress)
                        .await
                }
            };
            (hooks, drained)
        };
        Drain {
            reason,
            began,
            lame_duck,
            lame_duck_requests,
            close_seen,
            forced: false,
            sent,
            failure,
            work: Box::pin(work),
            hooks: HooksRun {
                _task: hooks_task,
                report: hooks_report,
            },
            done: None,
            _watchdog: watchdog,
            deadline,
        }
    }

    fn drain_mut(&mut self) -> Option<&mut Drain> {
        match &mut self.stage {
            Stage::HandedOver { drain, .. } | Stage::Draining(drain) => Some(drain),
            Stage::Serving { .. } | Stage::LameDuck { .. } => None,
        }
    }

    fn start_restart(&mut self, waiter: Option<oneshot::Sender<Result<Restarted, RestartError>>>) {
        let Some(listeners) = &self.listeners else {
            return;
        };
        match listen::dup_fds(listeners) {
            Ok(fds) => {
                let restarting = Restarting::start(
                    fds,
                    Arc::clone(&self.notifier),
                    self.config.ready_timeout,
                    self.watchdog_usec,
                    self.config.drain_timeout,
                );
                if let Stage::Serving { restart, .. } = &mut self.stage {
                    *restart = Some(InFlight {
                        restarting,
                        waiters: waiter.into_iter().collect(),
                    });
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "restart failed: could not duplicate the listeners; still serving");
                if let Some(w) = waiter {
                    let _ = w.send(Err(RestartError::new(
                        RestartErrorKind::Failed,
                        format!(
                            "could not duplicate the listeners: {e}; this process keeps serving"
                        ),
                    )));
                }
            }
        }
    }

    /// Cancels the restart in progress, if any: the child is stopped in the background,
    /// unless it became ready at this very moment, in which case it is returned (it serves
    /// now). Returns at once either way.
    async fn cancel_restart(&mut self) -> Option<HandedOver> {
        let Stage::Serving { restart, .. } = &mut self.stage else {
            return None;
        };
        let InFlight {
            restarting,
            waiters,
        } = restart.take()?;
        let outcome = restarting.cancel().await;
        let reply = match &outcome {
            Ok(handed) => Ok(handed.restarted()),
            Err(_) => Err(RestartError::new(
                RestartErrorKind::ShuttingDown,
                "the restart was cancelled: the server is shutting down",
            )),
        };
        for w in waiters {
            let _ = w.send(reply.clone());
        }
        match outcome {
            Ok(handed) => Some(handed),
            Err(failed) => {
                self.roll_back(failed.rollback);
                None
            }
        }
    }

    /// Stops a rolled-back child on a task of its own: it may serve connections already, and
    /// gets its drain deadline; meanwhile this process goes on handling events. Serving is not
    /// over before it has stopped.
    fn roll_back(&mut self, rollback: Option<Rollback>) {
        // One that exited already is reaped, and its pidfd closed, here and now.
        if let Some(rollback) = rollback.and_then(Rollback::still_running) {
            tracing::info!(
                pid = rollback.pid(),
                "stopping the new process of the failed restart: SIGTERM, then SIGKILL only after its drain deadline"
            );
            self.rollbacks.spawn(rollback.stop());
        }
    }

    /// `STOPPING=1` with `status`, once per shutdown (the lame duck sent it already, if there
    /// was one); later, the status alone.
    fn send_stopping(&mut self, status: &str) {
        let sent = matches!(self.stage, Stage::LameDuck { .. } | Stage::Draining(_));
        if !sent {
            self.notifier
                .notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
        } else {
            self.notifier.notify(&[NotifyState::Status(status)]);
        }
    }

    fn extend_timeout(&self, total: Duration) {
        self.notifier.notify(&[extend_timeout_usec(total)]);
    }
}

impl Drain {
    /// A close signal while draining: the first confirms the drain, the next cuts.
    fn close_signal(&mut self, name: &str, cx: &ConnContext) {
        if !self.close_seen {
            tracing::info!(signal = %name, "close signal received while already shutting down; the drain goes on (another one cuts)");
            self.close_seen = true;
        } else {
            tracing::warn!(signal = %name, "second close signal: cutting all connections now");
            self.forced = true;
            cx.connections.cut();
        }
    }

    /// Completes once the work is done (kept, so that this is cancel safe) and no rolled-back
    /// child is left.
    async fn finished(&mut self, rollbacks_left: bool) {
        if self.done.is_none() {
            self.done = Some(self.work.as_mut().await);
        }
        if rollbacks_left {
            std::future::pending::<()>().await;
        }
    }
}

impl Successor {
    /// Completes once the successor has exited; never if it is not watched.
    async fn exited(&self) {
        match &self.watch {
            Some(watch) => {
                if watch.readable().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// "1 connection", "3 connections".
fn plural_connections(n: usize) -> String {
    match n {
        1 => "1 connection".to_string(),
        n => format!("{n} connections"),
    }
}

/// `EXTEND_TIMEOUT_USEC=` for `left`, plus a second of margin.
fn extend_timeout_usec(left: Duration) -> NotifyState<'static> {
    let usec = left.saturating_add(Duration::from_secs(1)).as_micros();
    NotifyState::ExtendTimeoutUsec(u32::try_from(usec).unwrap_or(u32::MAX))
}

/// How the lame duck went, for the drain after it.
struct LameDuckOver {
    began: Instant,
    lame_duck: Duration,
    close_seen: bool,
}

impl InFlight {
    fn reply(self, outcome: Result<Restarted, RestartError>) {
        for w in self.waiters {
            let _ = w.send(outcome.clone());
        }
    }
}

/// The event the current stage waits for, if any.
async fn stage_event(stage: &mut Stage, rollbacks_left: bool) -> Event {
    match stage {
        Stage::Serving {
            restart: Some(in_flight),
            ..
        } => Event::RestartDone(in_flight.restarting.outcome().await),
        Stage::Serving { restart: None, .. } => std::future::pending().await,
        Stage::LameDuck { until, .. } => {
            tokio::time::sleep_until(*until).await;
            Event::DelayOver
        }
        Stage::HandedOver { drain, successor } => tokio::select! {
            biased;
            () = successor.exited() => Event::SuccessorExited,
            () = drain.finished(rollbacks_left) => Event::Drained,
        },
        Stage::Draining(drain) => {
            drain.finished(rollbacks_left).await;
            Event::Drained
        }
    }
}

async fn listener_lost(accepting: &mut Option<Accepting>) -> Option<std::io::Error> {
    match accepting {
        Some(a) => a.dead.recv().await,
        None => std::future::pending().await,
    }
}

/// A listener with the service that serves it.
type Bound = (Listener, Box<dyn ServeConn>);

/// Pairs every listener with its service, by name: each listener must be claimed by exactly
/// one named service or by the default one, and each named service must have a listener.
fn bind_services(
    listeners: Vec<Listener>,
    services: Vec<(Option<String>, Box<dyn ServeConn>)>,
) -> Result<Vec<Bound>, Error> {
    if listeners.is_empty() {
        return Err(Error::config(
            "nothing to serve: no listeners were given (none inherited through LISTEN_FDS, none bound)",
        ));
    }
    let describe = |ls: &[Listener]| {
        ls.iter()
            .map(|l| format!("{:?} ({})", l.name(), l.url()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut default = None;
    let mut named: Vec<(String, Box<dyn ServeConn>)> = Vec::new();
    for (name, service) in services {
        match name {
            None if default.is_some() => {
                return Err(Error::config(
                    "two default services: give default_service once",
                ));
            }
            None => default = Some(service),
            Some(name) if named.iter().any(|(n, _)| *n == name) => {
                return Err(Error::config(format!(
                    "listener name {name:?} is claimed by two services: give one service per listener"
                )));
            }
            Some(name) => {
                if !listeners.iter().any(|l| l.name() == name) {
                    return Err(Error::config(format!(
                        "a service is given for the listener {name:?}, but no listener has that name; the listeners are: {}",
                        describe(&listeners)
                    )));
                }
                named.push((name, service));
            }
        }
    }
    let mut bound = Vec::with_capacity(listeners.len());
    let mut unclaimed = Vec::new();
    for listener in listeners {
        let service = named
            .iter()
            .find(|(n, _)| n == listener.name())
            .map(|(_, s)| s.clone_box())
            .or_else(|| default.as_ref().map(|s| s.clone_box()));
        match service {
            Some(s) => bound.push((listener, s)),
            None => unclaimed.push(listener),
        }
    }
    if !unclaimed.is_empty() {
        return Err(Error::config(format!(
            "no service for the listener(s) {}: add .service(NAME, ..) for each, or a .default_service(..)",
            describe(&unclaimed)
        )));
    }
    Ok(bound)
}

/// The accept loops of a server.
struct Accepting {
    stop: CancellationToken,
    loops: Vec<AbortOnDropHandle<accept::Stopped>>,
    dead: mpsc::UnboundedReceiver<std::io::Error>,
    lost: usize,
    total: usize,
}

impl Accepting {
    fn start(
        listeners: &[Listener],
        services: &[Box<dyn ServeConn>],
        acceptors: Vec<Acceptor>,
        cx: &ConnContext,
    ) -> Accepting {
        let stop = CancellationToken::new();
        let (dead_tx, dead) = mpsc::unbounded_channel();
        let loops = listeners
            .iter()
            .zip(services)
            .zip(acceptors)
            .map(|((listener, service), acceptor)| {
                AbortOnDropHandle::new(tokio::spawn(accept::accept_loop(
                    acceptor,
                    Arc::from(listener.name()),
                    service.clone_box(),
                    cx.clone(),
                    stop.clone(),
                    dead_tx.clone(),
                )))
            })
            .collect();
        Accepting {
            stop,
            loops,
            dead,
            lost: 0,
            total: listeners.len(),
        }
    }

    async fn join(&mut self) -> Vec<accept::Stopped> {
        let mut stopped = Vec::with_capacity(self.loops.len());
        for l in self.loops.drain(..) {
            if let Ok(s) = l.await {
                stopped.push(s);
            }
        }
        stopped
    }
}

/// The one restart-capable server of the process, while it runs.
struct RestartClaim;

static RESTART_CLAIMED: AtomicBool = AtomicBool::new(false);

impl RestartClaim {
    fn take() -> Result<RestartClaim, Error> {
        if RESTART_CLAIMED.swap(true, Ordering::AcqRel) {
            return Err(Error::config(format!(
                "another restart-capable handover server is already running in this process (pid {}): \
                 a restart hands over the listeners of one server only. Serve every listener through \
                 one Server (a service per listener name), or disable restarts on this one with \
                 .restarts(false)",
                std::process::id()
            )));
        }
        Ok(RestartClaim)
    }
}

impl Drop for RestartClaim {
    fn drop(&mut self) {
        RESTART_CLAIMED.store(false, Ordering::Release);
    }
}

/// Two hooks reports as one.
fn add_hooks(a: HooksReport, b: HooksReport) -> HooksReport {
    let mut sum = a;
    sum.completed += b.completed;
    sum.panicked += b.panicked;
    sum.abandoned += b.abandoned;
    sum.skipped += b.skipped;
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain_of(work: impl Future<Output = (HooksReport, Drained)> + Send + 'static) -> Drain {
        Drain {
            reason: Reason::Requested,
            began: Instant::now(),
            lame_duck: Duration::ZERO,
            lame_duck_requests: 0,
            close_seen: false,
            forced: false,
            sent: None,
            failure: None,
            work: Box::pin(work),
            hooks: HooksRun {
                _task: AbortOnDropHandle::new(tokio::spawn(async {})),
                report: tokio::sync::watch::channel(None).1,
            },
            done: None,
            _watchdog: None,
            deadline: Instant::now(),
        }
    }

    fn done() -> (HooksReport, Drained) {
        (
            HooksReport::default(),
            Drained {
                open_at_start: 3,
                cut: 1,
            },
        )
    }

    /// A successor that is this test process's own child, watched through its pidfd.
    fn successor_of(child: &std::process::Child) -> Successor {
        let pid = rustix::process::Pid::from_child(child);
        let pidfd = Arc::new(
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                .expect("pidfd_open"),
        );
        let watch = crate::sys::register_shared(Arc::clone(&pidfd), Interest::READABLE)
            .map_err(|(_, e)| e)
            .expect("register the pidfd");
        Successor {
            pid: child.id(),
            pidfd,
            watch: Some(watch),
            ours: false,
            stopping: false,
        }
    }

    #[tokio::test]
    async fn the_state_is_derived_from_the_stage() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        let now = Instant::now();
        let stages = [
            (
                Stage::Serving {
                    restart: None,
                    duties: Duties::default(),
                },
                State::Serving,
            ),
            (
                Stage::LameDuck {
                    reason: Reason::Requested,
                    began: now,
                    until: now,
                    duties: Duties::default(),
                },
                State::LameDuck,
            ),
            (
                Stage::HandedOver {
                    drain: drain_of(async { done() }),
                    successor: successor_of(&child),
                },
                State::HandedOver { pid },
            ),
            (Stage::Draining(drain_of(async { done() })), State::Draining),
        ];
        for (stage, state) in &stages {
            assert_eq!(stage.state(), *state);
        }
        let _ = child.wait();
    }

    #[tokio::test]
    async fn a_drain_keeps_its_outcome_across_given_up_waits_and_waits_for_rolled_back_children() {
        let (tx, rx) = oneshot::channel::<()>();
        let mut drain = drain_of(async move {
            let _ = rx.await;
            done()
        });
        let short = Duration::from_millis(20);
        // Not done: a wait given up (another event came first) loses nothing.
        assert!(
            tokio::time::timeout(short, drain.finished(false))
                .await
                .is_err()
        );
        tx.send(()).expect("the drain waits");
        // Done, but a rolled-back child is still stopping: not finished yet.
        assert!(
            tokio::time::timeout(short, drain.finished(true))
                .await
                .is_err()
        );
        assert_eq!(drain.done.map(|(_, d)| d), Some(done().1));
        tokio::time::timeout(Duration::from_secs(5), drain.finished(false))
            .await
            .expect("finished once no child is left");
    }

    #[tokio::test]
    async fn the_death_of_a_successor_is_an_event() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.05")
            .spawn()
            .expect("spawn");
        let successor = successor_of(&child);
        tokio::time::timeout(Duration::from_secs(10), successor.exited())
            .await
            .expect("its pidfd became readable");
        assert!(child.try_wait().expect("wait").is_some());
    }
}
