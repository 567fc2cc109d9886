//! The lifecycle of a server: explicit stages, and the events that move between them.
//!
//! ```text
//!             restart (signal | handle)          successor READY=1 + MAINPID= delivered
//!  Serving ────────────────────────▶ Serving ─────────────────────────────▶ Draining ─┐
//!    │  ▲                          + restart      (reason: HandedOver)                │
//!    │  └────────────────────────────┘ failed / timed out: rolled back                │
//!    │ close (signal | handle | with_graceful_shutdown)                              ▼
//!    ├──▶ LameDuck (shutdown_delay; still accepting) ──(delay over | close)──▶ Draining ──▶ Done
//!    └──(no delay)──────────────────────────────────────────────────────────▶ Draining
//!       every listener lost ─────────────────────────────────────────────────▶ Draining (error)
//! ```
//! - Signals, the [`Handle`], the accept loops, a restart in progress, the lame duck's timer and
//!   the drain only produce [`Event`]s ([`Lifecycle::next_event`]); each event is handled by one
//!   short method, which may change the [`Stage`] ([`Lifecycle::step`]).
//! - The stage is published on the handle's watch as a [`State`] for handlers (`/healthz`).
//! - A close signal moves the shutdown one step on: serving → lame duck → draining → cut.
//!   After a hand-off or a requested shutdown, the first close signal only confirms the drain
//!   under way (systemd's stop reaching a draining old process, Ctrl-C to a process group).
//! - Draining: stop accepting (the listeners' copies in this process are closed), run the
//!   hooks in order, then drain the connections; one deadline, [`Server::drain_timeout`] after
//!   accepting stopped, bounds both.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::accept::{self, Acceptor, ConnContext, ServeConn};
use crate::drain::{Connections, CutOnDrop, Drained};
use crate::error::Error;
use crate::handle::{Command, Handle, RestartError, RestartErrorKind, Restarted, State};
use crate::hooks::{self, Hook, HooksReport};
use crate::listen::{self, Listener};
use crate::notify::{Notifier, NotifyState};
use crate::restart::{HandedOver, Restarting};
use crate::server::{Config, Reason, Server, Shutdown};
use crate::signals::{self, SignalEvents};
use crate::startup::{self, Startup};

/// Runs `server` to the end of its life.
pub(crate) async fn run(server: Server) -> Result<Shutdown, Error> {
    let mut life = Lifecycle::start(server).await?;
    loop {
        let event = life.next_event().await;
        if let Some(end) = life.step(event).await {
            return end;
        }
    }
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
    /// A [`Handle`] asked for something.
    Command(Command),
    /// The restart in progress ended.
    RestartDone(Result<HandedOver, crate::error::RestartFailure>),
    /// A listener can no longer accept.
    ListenerLost(std::io::Error),
    /// A future given to `with_graceful_shutdown` completed.
    Requested,
    /// The lame duck's delay is over.
    DelayOver,
    /// Hooks and drain are done.
    Drained(HooksReport, Drained),
}

/// Where the server is; what it does now.
enum Stage {
    /// Accepting and serving; possibly with a successor starting.
    Serving { restart: Option<InFlight> },
    /// Shutting down, still accepting until `until`.
    LameDuck {
        reason: Reason,
        began: Instant,
        until: Instant,
    },
    /// No longer accepting; hooks, then connections.
    Draining(Draining),
}

struct InFlight {
    restarting: Restarting,
    /// [`Handle::restart`] calls waiting for the outcome.
    waiters: Vec<oneshot::Sender<Result<Restarted, RestartError>>>,
}

struct Draining {
    reason: Reason,
    /// When the shutdown began (the lame duck included).
    began: Instant,
    lame_duck: Duration,
    lame_duck_requests: u64,
    /// A close signal has been seen: the next one cuts.
    close_seen: bool,
    forced: bool,
    /// Connections passed to the successor, if it takes them.
    sent: Option<Arc<crate::handoff::Sent>>,
    work: Pin<Box<dyn Future<Output = (HooksReport, Drained)> + Send>>,
}

struct Lifecycle {
    config: Config,
    startup: &'static Startup,
    handle: Handle,
    commands: Option<mpsc::UnboundedReceiver<Command>>,
    signals: SignalEvents,
    signals_open: bool,
    notifier: Arc<Notifier>,
    connections: Connections,
    /// The originals of the listeners, for restarts; `None` once accepting stopped.
    listeners: Option<Vec<Listener>>,
    accepting: Accepting,
    hooks: Vec<Hook>,
    requested: Vec<Pin<Box<dyn Future<Output = ()> + Send>>>,
    watchdog_usec: Option<u64>,
    watchdog: Option<AbortOnDrop>,
    stopping_sent: bool,
    /// Why serving failed, if every listener was lost.
    failure: Option<std::io::Error>,
    stage: Stage,
    /// What every connection of this server shares (the hand-off slot among it).
    cx: ConnContext,
    // Dropped last, in this order: tasks first, then what they use.
    _receiver: Option<AbortOnDrop>,
    _sweeper: AbortOnDrop,
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
        let bound = bind_services(listeners.into_vec(), services)?;
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
        let connections = Connections::new(config.header_read_timeout, config.connection_info);
        // Registered before any loop starts, so an error here leaves nothing running.
        let acceptors = bound
            .iter()
            .map(|(l, _)| Acceptor::new(l))
            .collect::<Result<Vec<_>, _>>()?;

        let cx = ConnContext {
            http: Arc::new(http),
            connections: connections.clone(),
            handle: handle.clone(),
            // The handle's: an upgraded connection finds it through its handle (`upgrade`).
            hand_off: Arc::clone(handle.hand_off_slot()),
        };
        let sweeper = AbortOnDrop(tokio::spawn(connections.sweeper()));
        let accepting = Accepting::start(&bound, acceptors, &cx);
        let by_name: Vec<(Arc<str>, Box<dyn ServeConn>)> = bound
            .iter()
            .map(|(l, s)| (Arc::from(l.name()), s.clone_box()))
            .collect();
        let cx_for_receiver = cx.clone();
        let resume_upgraded = config.resume_upgraded.clone();
        let urls: Vec<String> = bound.iter().map(|(l, s)| s.url(l)).collect();
        for ((l, _), url) in bound.iter().zip(&urls) {
            tracing::info!(url = %url, listener = l.name(), pid = startup.pid, "accepting");
        }
        let listeners: Vec<Listener> = bound.into_iter().map(|(l, _)| l).collect();
        if config.fd_store {
            let stored: Vec<_> = listeners
                .iter()
                .filter(|l| l.origin() == crate::Origin::Bound)
                .map(|l| (std::os::fd::AsFd::as_fd(l), l.name()))
                .collect();
            notifier.store_fds(&stored);
        }
        if config.connection_handoff && notifier.has_parent_channel() {
            notifier.offer_connections();
            if config.resume_upgraded.is_some() {
                notifier.offer_upgraded();
            }
        }
        // Accepting already: what a request sees from now on.
        handle.set_state(State::Serving);
        notifier
            .ready(
                &format!("Listening on {}", urls.join(", ")),
                config.ready_timeout,
            )
            .await;
        tracing::info!(pid = startup.pid, "ready");
        // The previous process passes its connections now, if it has any and we said we take
        // them.
        let receiver = match notifier.take_parent_channel() {
            Some(channel) if config.connection_handoff => {
                let notifier = Arc::clone(&notifier);
                let listening = format!("Listening on {}", urls.join(", "));
                Some(AbortOnDrop(tokio::spawn(async move {
                    let taken =
                        crate::handoff::receive(channel, by_name, cx_for_receiver, resume_upgraded)
                            .await;
                    if taken > 0 {
                        // What `systemctl status` shows: this process serves the previous
                        // one's clients too.
                        let status = format!(
                            "{listening}; took over {} from the previous process",
                            plural_connections(taken)
                        );
                        notifier.notify(&[NotifyState::Status(&status)]);
                    }
                })))
            }
            _ => None,
        };
        handle.set_state(State::Serving);
        let watchdog_usec = crate::notify::watchdog_usec(startup);
        let watchdog = watchdog_usec
            .map(|usec| AbortOnDrop(crate::notify::spawn_watchdog(Arc::clone(&notifier), usec)));
        Ok(Lifecycle {
            config,
            startup,
            handle,
            commands: Some(commands),
            signals,
            signals_open: true,
            notifier,
            connections: connections.clone(),
            listeners: Some(listeners),
            accepting,
            hooks,
            requested: shutdown_signals,
            watchdog_usec,
            watchdog,
            stopping_sent: false,
            failure: None,
            stage: Stage::Serving { restart: None },
            cx,
            _receiver: receiver,
            _sweeper: sweeper,
            _cut_on_drop: CutOnDrop(connections),
            _claim: claim,
        })
    }

    /// The next thing that happened. Every source is cancel safe: dropping this future loses
    /// nothing.
    async fn next_event(&mut self) -> Event {
        let Lifecycle {
            signals,
            signals_open,
            commands,
            accepting,
            requested,
            stage,
            ..
        } = self;
        tokio::select! {
            event = signals.next(), if *signals_open => match event {
                Some(signals::Event::Close(sig)) => Event::Close(sig),
                Some(signals::Event::Restart(sig)) => Event::RestartSignal(sig),
                None => Event::SignalsEnded,
            },
            Some(command) = recv(commands) => Event::Command(command),
            Some(e) = accepting.dead.recv() => Event::ListenerLost(e),
            () = any_of(requested) => Event::Requested,
            event = stage_event(stage) => event,
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
            Event::Requested => {
                tracing::info!("shutdown requested");
                self.requested.clear();
                self.on_shutdown_command(false).await;
            }
            Event::DelayOver => self.end_lame_duck(false).await,
            Event::Drained(hooks, drained) => {
                if matches!(self.handle.state(), State::HandedOver { .. }) {
                    // As PID 1, this process stays on as its successors' init: never returns.
                    crate::keeper::after_shutdown().await;
                }
                return Some(self.finish(hooks, drained));
            }
        }
        None
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
                    return self.drain_handed_over(handed).await;
                }
                self.begin_shutdown(Reason::Signal(sig)).await;
            }
            Stage::LameDuck { .. } => {
                tracing::info!(signal = %name, "close signal during the lame duck: draining now (another one cuts)");
                self.end_lame_duck(true).await;
            }
            Stage::Draining(d) if !d.close_seen => {
                tracing::info!(signal = %name, "close signal received while already shutting down; the drain goes on (another one cuts)");
                d.close_seen = true;
            }
            Stage::Draining(d) => {
                tracing::warn!(signal = %name, "second close signal: cutting all connections now");
                d.forced = true;
                self.connections.cut();
            }
        }
    }

    fn on_restart_signal(&mut self, sig: i32) {
        let name = signals::name(sig);
        match &self.stage {
            _ if !self.config.restarts => {
                tracing::info!(signal = %name, "restart signal ignored: restarts are disabled for this server");
            }
            Stage::Serving { restart: None } => {
                tracing::info!(signal = %name, "restart signal received");
                self.start_restart(None);
            }
            Stage::Serving { restart: Some(_) } => {
                tracing::info!(signal = %name, "restart signal received while a restart is in progress; coalesced");
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
            Stage::Serving { restart: None } => {
                tracing::info!("restart requested through the handle");
                return self.start_restart(Some(reply));
            }
            Stage::Serving { restart: Some(_) } => RestartError::new(
                RestartErrorKind::AlreadyRestarting,
                "already restarting: a restart is in progress",
            ),
            Stage::Draining(Draining {
                reason: Reason::HandedOver { pid },
                ..
            }) => RestartError::new(
                RestartErrorKind::HandedOver,
                format!(
                    "this process has handed over to pid {pid}: the service runs there; restart it there"
                ),
            ),
            _ => RestartError::new(
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
                    self.drain_handed_over(handed).await;
                } else if force {
                    self.begin_drain(Reason::Requested, None).await;
                } else {
                    self.begin_shutdown(Reason::Requested).await;
                }
            }
            Stage::LameDuck { .. } if force => self.end_lame_duck(true).await,
            Stage::LameDuck { .. } | Stage::Draining(_) => {}
        }
        if force {
            if let Stage::Draining(d) = &mut self.stage {
                tracing::warn!("forced shutdown: cutting all connections now");
                d.forced = true;
                d.close_seen = true;
                self.connections.cut();
            }
        }
    }

    async fn on_restart_done(&mut self, outcome: Result<HandedOver, crate::error::RestartFailure>) {
        let Stage::Serving { restart } = &mut self.stage else {
            return;
        };
        let Some(in_flight) = restart.take() else {
            return;
        };
        match outcome {
            Ok(handed) => {
                tracing::info!(pid = handed.pid, ready_after = ?handed.ready_after, "handed over");
                in_flight.reply(Ok(handed.restarted()));
                self.drain_handed_over(handed).await;
            }
            Err(failure) => {
                // Reported only now that a new restart would be accepted, so whoever waits for
                // this message may restart again at once.
                let pid = self.startup.pid;
                let status = format!("Restart failed: {failure}; still serving as pid {pid}");
                self.notifier.notify_patiently(
                    &[NotifyState::Ready, NotifyState::Status(&status)],
                    self.config.ready_timeout,
                );
                tracing::info!(pid, "still serving after the failed restart");
                in_flight.reply(Err(RestartError::new(
                    RestartErrorKind::Failed,
                    format!("restart failed: {failure}; this process (pid {pid}) keeps serving"),
                )));
                self.handle.set_state(State::Serving);
            }
        }
    }

    async fn on_listener_lost(&mut self, e: std::io::Error) {
        self.accepting.lost += 1;
        if self.accepting.lost < self.accepting.total || self.failure.is_some() {
            return;
        }
        tracing::error!("no listener can accept any more; shutting down after the drain");
        self.failure = Some(e);
        match &self.stage {
            Stage::Serving { .. } => match self.cancel_restart().await {
                Some(handed) => self.drain_handed_over(handed).await,
                None => self.begin_drain(Reason::Requested, None).await,
            },
            Stage::LameDuck { .. } => self.end_lame_duck(false).await,
            Stage::Draining(_) => {}
        }
    }

    /// Shutting down: a lame duck first if there is a delay, else straight to the drain.
    async fn begin_shutdown(&mut self, reason: Reason) {
        let delay = self.config.shutdown_delay;
        if delay.is_zero() {
            return self.begin_drain(reason, None).await;
        }
        self.send_stopping(&format!(
            "Stopping: lame duck for {delay:?}, still accepting; then draining (at most {:?})",
            self.config.drain_timeout
        ));
        let began = Instant::now();
        self.extend_timeout(delay.saturating_add(self.config.drain_timeout));
        self.connections.lame_duck();
        self.handle.set_state(State::LameDuck);
        tracing::info!(
            ?delay,
            "lame duck: still accepting and serving, with Connection: close and GOAWAY, until the delay is over"
        );
        self.stage = Stage::LameDuck {
            reason,
            began,
            until: crate::instant_after(began, delay),
        };
    }

    /// The lame duck is over (its delay, or a further close signal): drain now.
    async fn end_lame_duck(&mut self, close_seen: bool) {
        let Stage::LameDuck { reason, began, .. } = self.stage else {
            return;
        };
        let lame_duck = began.elapsed();
        tracing::info!(
            ?lame_duck,
            requests = self.connections.requests_while_stopping(),
            "lame duck over: no longer accepting"
        );
        let over = LameDuckOver {
            began,
            lame_duck,
            close_seen,
        };
        self.begin_drain(reason, Some(over)).await;
    }

    /// Drains after a hand-off: passing connections to the new process if it takes them.
    async fn drain_handed_over(&mut self, handed: HandedOver) {
        let pid = handed.pid;
        let sent = match handed.accepts_connections && self.config.connection_handoff {
            true => {
                let (outbox, sent) =
                    crate::handoff::send(handed.channel, pid, handed.accepts_upgraded);
                let _ = self.cx.hand_off.set(outbox);
                tracing::info!(
                    pid,
                    "the new process takes connections: plaintext HTTP/1 connections move to it at their next request boundary"
                );
                Some(sent)
            }
            false => None,
        };
        self.begin_drain_with(Reason::HandedOver { pid }, None, sent)
            .await;
    }

    /// Enters the drain: stop accepting, then the hooks, then the connections, under one
    /// deadline.
    async fn begin_drain(&mut self, reason: Reason, after: Option<LameDuckOver>) {
        self.begin_drain_with(reason, after, None).await;
    }

    async fn begin_drain_with(
        &mut self,
        reason: Reason,
        after: Option<LameDuckOver>,
        sent: Option<Arc<crate::handoff::Sent>>,
    ) {
        self.stop_accepting(matches!(reason, Reason::HandedOver { .. }))
            .await;
        let handed_over = matches!(reason, Reason::HandedOver { .. });
        let (began, lame_duck, close_seen) = match after {
            Some(l) => (l.began, l.lame_duck, l.close_seen),
            None => (
                Instant::now(),
                Duration::ZERO,
                matches!(reason, Reason::Signal(_)),
            ),
        };
        let lame_duck_requests = self.connections.requests_while_stopping();
        match reason {
            Reason::HandedOver { pid } => {
                // The new process is the service now, and pings the watchdog itself.
                self.watchdog = None;
                self.handle.set_state(State::HandedOver { pid });
            }
            _ => {
                let status = format!(
                    "Stopping: draining {}",
                    plural_connections(self.connections.open())
                );
                self.send_stopping(&status);
                self.handle.set_state(State::Draining);
            }
        }
        let deadline = crate::instant_after(Instant::now(), self.config.drain_timeout);
        let grace = match handed_over {
            true => self.config.restart_keep_alive_grace,
            false => self.config.keep_alive_grace,
        };
        let hooks = std::mem::take(&mut self.hooks);
        let connections = self.connections.clone();
        let notifier = Arc::clone(&self.notifier);
        let failed = sent.as_ref().map(|s| s.failed.clone());
        let work = async move {
            let hooks = hooks::run(hooks, deadline, connections.force()).await;
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
                None => connections.drain(deadline, grace, progress).await,
            };
            (hooks, drained)
        };
        self.stage = Stage::Draining(Draining {
            reason,
            began,
            lame_duck,
            lame_duck_requests,
            close_seen,
            forced: false,
            sent,
            work: Box::pin(work),
        });
    }

    /// Stops the accept loops, then closes this process's copies of the listeners (a bound
    /// address refuses new clients from then on; a socket unit queues them).
    async fn stop_accepting(&mut self, handed_over: bool) {
        self.accepting.stop.cancel();
        self.accepting.join().await;
        self.listeners = None;
        match handed_over {
            true => tracing::info!("stopped accepting; the new process accepts now"),
            false => tracing::info!("stopped accepting"),
        }
    }

    /// Serving is over: the outcome for the application.
    fn finish(&mut self, hooks: HooksReport, drained: Drained) -> Result<Shutdown, Error> {
        let Stage::Draining(d) = &self.stage else {
            unreachable!("BUG: drained outside the draining stage");
        };
        let elapsed = d.began.elapsed();
        let (passed, kept) = d.sent.as_ref().map_or((0, 0), |s| {
            (
                s.passed.load(std::sync::atomic::Ordering::Relaxed),
                s.kept.load(std::sync::atomic::Ordering::Relaxed),
            )
        });
        tracing::info!(
            reason = ?d.reason,
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
            timed_out = self.connections.timed_out(),
            ?elapsed,
            "server closed"
        );
        if !matches!(d.reason, Reason::HandedOver { .. }) {
            // After a hand-off the state stays `HandedOver`: the service goes on elsewhere.
            self.handle.set_state(State::Stopped);
        }
        if let Some(e) = self.failure.take() {
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
                );
                self.stage = Stage::Serving {
                    restart: Some(InFlight {
                        restarting,
                        waiters: waiter.into_iter().collect(),
                    }),
                };
                self.handle.set_state(State::Restarting);
            }
            Err(e) => {
                tracing::error!(error = %e, "restart failed: could not duplicate the listeners; still serving");
                if let Some(w) = waiter {
                    let _ = w.send(Err(RestartError::new(
                        RestartErrorKind::Failed,
                        format!("restart failed: could not duplicate the listeners: {e}"),
                    )));
                }
            }
        }
    }

    /// Cancels the restart in progress, if any: the child is killed and reaped, unless it
    /// became ready at this very moment, in which case it is returned (it serves now).
    async fn cancel_restart(&mut self) -> Option<HandedOver> {
        let Stage::Serving { restart } = &mut self.stage else {
            return None;
        };
        let in_flight = restart.take()?;
        let InFlight {
            restarting,
            waiters,
        } = in_flight;
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
        outcome.ok()
    }

    fn send_stopping(&mut self, status: &str) {
        if !self.stopping_sent {
            self.stopping_sent = true;
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
async fn stage_event(stage: &mut Stage) -> Event {
    match stage {
        Stage::Serving {
            restart: Some(in_flight),
        } => Event::RestartDone(in_flight.restarting.outcome().await),
        Stage::Serving { restart: None } => std::future::pending().await,
        Stage::LameDuck { until, .. } => {
            tokio::time::sleep_until(*until).await;
            Event::DelayOver
        }
        Stage::Draining(d) => {
            let (hooks, drained) = d.work.as_mut().await;
            Event::Drained(hooks, drained)
        }
    }
}

async fn recv<T>(rx: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Completes when the first of `futures` completes; never if there are none.
async fn any_of(futures: &mut [Pin<Box<dyn Future<Output = ()> + Send>>]) {
    std::future::poll_fn(|cx| {
        for f in futures.iter_mut() {
            if f.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    })
    .await
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
    loops: Vec<JoinHandle<()>>,
    dead: mpsc::UnboundedReceiver<std::io::Error>,
    lost: usize,
    total: usize,
}

impl Accepting {
    fn start(bound: &[Bound], acceptors: Vec<Acceptor>, cx: &ConnContext) -> Accepting {
        let stop = CancellationToken::new();
        let (dead_tx, dead) = mpsc::unbounded_channel();
        let loops = bound
            .iter()
            .zip(acceptors)
            .map(|((listener, service), acceptor)| {
                tokio::spawn(accept::accept_loop(
                    acceptor,
                    Arc::from(listener.name()),
                    service.clone_box(),
                    cx.clone(),
                    stop.clone(),
                    dead_tx.clone(),
                ))
            })
            .collect();
        Accepting {
            stop,
            loops,
            dead,
            lost: 0,
            total: bound.len(),
        }
    }

    async fn join(&mut self) {
        for l in self.loops.drain(..) {
            let _ = l.await;
        }
    }
}

impl Drop for Accepting {
    fn drop(&mut self) {
        for l in &self.loops {
            l.abort();
        }
    }
}

/// Aborts a task when dropped (the server's future dropped, or the task no longer needed).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
