//! The connections of one server, and the switches that drain, pass or cut them.
//!
//! # The rule
//! After [`Connections::drain`] starts, every request the server has begun to read gets its
//! response (unless the deadline passes first), and a busy keep-alive client is never cut
//! between two requests:
//! - HTTP/1 responses carry `Connection: close` from then on, so a busy keep-alive client gets
//!   the answer to the request it sent, and sends its next request on a new connection (to the
//!   new process, after a restart).
//! - Connections idle at drain start get a grace ([`crate::Server::keep_alive_grace`], longer
//!   after a hand-off), then the ones still idle are closed: *idle* meaning nothing received
//!   since their last response. A connection with part of a request head received is not idle:
//!   it gets the rest of its head within the header-read timeout and the deadline, and its
//!   answer (with `Connection: close`). Bytes hyper had read ahead (pipelining) are answered
//!   too. What HTTP/1 leaves open (RFC 9112 9.3.1) is a request that is on the wire, not yet
//!   received, at the moment an idle connection is closed: the grace makes it rare, and after
//!   a restart with connection hand-off it cannot happen (the connection moves instead).
//! - HTTP/2 connections get GOAWAY at once (the protocol lets in-flight streams finish and tells
//!   the client which ones to retry).
//! - At the deadline every connection still open is cut: its task drops it, and its socket is
//!   shut down, which also reaches connections the application owns after an upgrade.
//!
//! Open connections are the live sockets of a [`TaskTracker`] (each holds a token): state is
//! derived, not counted by hand, and waiting for the last one is an event, not a poll loop.
//!
//! # The header-read timeout
//! hyper's own header-read timeout arms a timer for every request head. Here one sweeper task
//! per server looks at every connection about once a second instead: a connection that is idle,
//! receiving a head, or in a TLS handshake for longer than the timeout is cut. Keep-alive
//! connections idle for that long are closed the same way.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use slab::Slab;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

use crate::conn::{
    self, CLOSE_IDLE, CLOSE_RESPONSES, CUT, Conn, DRAIN, HAND_OFF, STOPPING, Sock, TrackedIo,
};
use crate::conn_info::ConnectionInfo;

/// The connections of one server.
#[derive(Debug, Clone)]
pub(crate) struct Connections {
    shared: Arc<Shared>,
}

/// What the connections of a server share with it.
#[derive(Debug)]
pub(crate) struct Shared {
    registry: Mutex<Registry>,
    tracker: TaskTracker,
    /// Cancelled when what is left must be cut now.
    force: CancellationToken,
    /// 0: no header-read timeout.
    header_timeout: Duration,
    /// Whether requests carry their `ConnectionInfo`.
    pub(crate) connection_info: bool,
    /// Requests begun while the `STOPPING` bit was set.
    while_stopping: AtomicU64,
    /// Connections cut by the header-read timeout.
    timed_out: AtomicU64,
    /// The keep-alive grace of a drain with a successor that takes connections, in
    /// milliseconds: what a connection that could not be passed gets.
    fallback_grace_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct Registry {
    conns: Slab<Arc<Conn>>,
    /// The bits every new connection starts with: what the server asked of all so far.
    ctl_passable: u32,
    ctl_other: u32,
    /// How many connections the cut found open; `None` until it happened.
    cut: Option<usize>,
}

/// A connection's place in the registry; removes it when dropped.
///
/// Invariant (kept by its one owner, [`TrackedIo`], which declares it before the socket): the
/// entry is removed *before* the socket closes, so every fd the registry holds is open and is
/// the connection it was registered for. The cut and the sweeper use the fds under the lock.
#[derive(Debug)]
pub(crate) struct Registration {
    key: usize,
    shared: Arc<Shared>,
    _token: TaskTrackerToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.lock().conns.try_remove(self.key);
        crate::metrics::connection_closed();
    }
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    pub(crate) open_at_start: usize,
    pub(crate) cut: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn fallback_grace(&self) -> Duration {
        Duration::from_millis(self.fallback_grace_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn count_request_while_stopping(&self) {
        self.while_stopping.fetch_add(1, Ordering::Relaxed);
    }
}

impl Connections {
    /// `header_timeout`: how long a connection may go without a complete request head
    /// (`Duration::ZERO`: no limit).
    pub(crate) fn new(header_timeout: Duration, connection_info: bool) -> Connections {
        Connections {
            shared: Arc::new(Shared {
                registry: Mutex::new(Registry::default()),
                tracker: TaskTracker::new(),
                force: CancellationToken::new(),
                header_timeout,
                connection_info,
                while_stopping: AtomicU64::new(0),
                timed_out: AtomicU64::new(0),
                fallback_grace_ms: AtomicU64::new(1000),
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Registers an accepted socket: from now on it is counted, drained and cut with the
    /// others. `passable`: a plaintext connection a successor could take over.
    pub(crate) fn register(&self, sock: Sock, info: ConnectionInfo, passable: bool) -> TrackedIo {
        let fd = sock.as_fd().as_raw_fd();
        let token = self.shared.tracker.token();
        let mut registry = self.shared.lock();
        let ctl = match passable {
            true => registry.ctl_passable,
            false => registry.ctl_other,
        };
        let conn = Arc::new(Conn::new(fd, passable, info, ctl));
        let key = registry.conns.insert(Arc::clone(&conn));
        drop(registry);
        let registration = Registration {
            key,
            shared: Arc::clone(&self.shared),
            _token: token,
        };
        crate::metrics::connection_opened();
        TrackedIo::new(registration, conn, sock)
    }

    /// Raises `passable` on every plaintext connection and `other` on every other one (and on
    /// those accepted from now on), and wakes them all to act on it.
    pub(crate) fn command(&self, passable: u32, other: u32) {
        let mut registry = self.shared.lock();
        registry.ctl_passable |= passable;
        registry.ctl_other |= other;
        for (_, conn) in registry.conns.iter() {
            let bits = if conn.passable { passable } else { other };
            if conn.ctl.fetch_or(bits, Ordering::Release) & bits != bits {
                conn.waker.wake();
            }
        }
    }

    /// The same bits for every connection.
    pub(crate) fn command_all(&self, bits: u32) {
        self.command(bits, bits);
    }

    /// Cancelled once [`Connections::cut`] has happened.
    pub(crate) fn force(&self) -> &CancellationToken {
        &self.shared.force
    }

    /// Cuts every open connection now, upgraded ones included, and returns how many there
    /// were. Counted at the moment of the cut; later calls change nothing and return the same
    /// number.
    pub(crate) fn cut(&self) -> usize {
        let mut registry = self.shared.lock();
        if let Some(n) = registry.cut {
            return n;
        }
        registry.ctl_passable |= CUT;
        registry.ctl_other |= CUT;
        let mut n = 0;
        for (_, conn) in registry.conns.iter() {
            // One given back after the cut is dropped at once (the bit), but the socket of one
            // in flight is not shut down: it is the successor's now, or about to be.
            conn.ctl.fetch_or(CUT, Ordering::Release);
            conn.waker.wake();
            if conn.is_in_flight() {
                continue;
            }
            n += 1;
            // SAFETY: registered fds are open while registered (see `Registration`), and the
            // lock we hold keeps their owners from deregistering, hence from closing them.
            unsafe { crate::sys::shutdown_registered(conn.fd) };
        }
        registry.cut = Some(n);
        drop(registry);
        // Hooks still running are abandoned; tasks still holding a connection drop it now.
        self.shared.force.cancel();
        n
    }

    /// Serving again after a drain was given up (the successor died): connections accepted
    /// from now on start with no directive, and are waited for by the next drain. Those open
    /// keep the directives they got, and are told to move on.
    pub(crate) fn resume(&self) {
        let mut registry = self.shared.lock();
        // The clients of the drain given up move on (as in a lame duck): their next response
        // says `Connection: close`, HTTP/2 gets GOAWAY.
        for (_, conn) in registry.conns.iter() {
            let bits = CLOSE_RESPONSES | DRAIN;
            if conn.ctl.fetch_or(bits, Ordering::Release) & bits != bits {
                conn.waker.wake();
            }
        }
        registry.ctl_passable = 0;
        registry.ctl_other = 0;
        drop(registry);
        self.shared.tracker.reopen();
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.shared.tracker.len()
    }

    /// Requests begun since the `STOPPING` bit was raised.
    pub(crate) fn requests_while_stopping(&self) -> u64 {
        self.shared.while_stopping.load(Ordering::Relaxed)
    }

    /// Connections closed by the header-read timeout so far.
    pub(crate) fn timed_out(&self) -> u64 {
        self.shared.timed_out.load(Ordering::Relaxed)
    }

    /// The lame duck: keep serving, but HTTP/1 responses say `Connection: close` and HTTP/2
    /// connections get GOAWAY, so clients move away; requests are counted.
    pub(crate) fn lame_duck(&self) {
        self.command_all(CLOSE_RESPONSES | DRAIN | STOPPING);
    }

    /// The sweeper: enforces the header-read timeout, about once a second. Runs until aborted.
    pub(crate) fn sweeper(&self) -> impl Future<Output = ()> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        async move {
            let timeout = shared.header_timeout;
            if timeout.is_zero() {
                return std::future::pending().await;
            }
            let limit = u32::try_from(timeout.as_millis().div_ceil(conn::TICK.as_millis()))
                .unwrap_or(u32::MAX);
            let period = (timeout / 4).clamp(conn::TICK, Duration::from_secs(1));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = conn::advance_coarse_clock();
                let registry = shared.lock();
                for (_, conn) in registry.conns.iter() {
                    let (phase, since) = conn.phase();
                    if phase.is_timed()
                        && now.wrapping_sub(since) > limit
                        && !conn.is_in_flight()
                        && conn.ctl.fetch_or(CUT, Ordering::Release) & CUT == 0
                    {
                        shared.timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            ?phase,
                            ?timeout,
                            "no complete request head within the header-read timeout: closing"
                        );
                        conn.waker.wake();
                    }
                }
            }
        }
    }

    /// Drains: stops keep-alive, sends GOAWAY, closes idle connections after `grace`, waits for
    /// the last connection to close, and cuts what is left at `deadline` (or as soon as
    /// [`Connections::force`] is cancelled). `progress` is called about once a second with
    /// the number of connections left.
    pub(crate) async fn drain(
        &self,
        deadline: Instant,
        grace: Duration,
        progress: impl FnMut(usize),
    ) -> Drained {
        self.command_all(CLOSE_RESPONSES | DRAIN | STOPPING);
        self.wait(deadline, grace, (CLOSE_IDLE, CLOSE_IDLE), None, progress)
            .await
    }

    /// Drains after a hand-off to a successor that takes connections (`handoff`): plaintext
    /// HTTP/1 connections are passed at their next request boundary (plaintext HTTP/2 gets
    /// GOAWAY); the others (TLS) drain as [`Connections::drain`] does. If passing fails
    /// (`failed` is cancelled), the plaintext ones fall back to `Connection: close` and the
    /// grace.
    pub(crate) async fn drain_handing_off(
        &self,
        deadline: Instant,
        grace: Duration,
        failed: CancellationToken,
        progress: impl FnMut(usize),
    ) -> Drained {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.shared
            .fallback_grace_ms
            .store(grace_ms, Ordering::Relaxed);
        // Counted before the command: idle connections are passed (and gone) at once after it.
        let open_at_start = self.open();
        self.command(HAND_OFF, CLOSE_RESPONSES | DRAIN);
        let drained = self
            .wait(deadline, grace, (0, CLOSE_IDLE), Some(failed), progress)
            .await;
        Drained {
            open_at_start,
            ..drained
        }
    }

    /// Waits until every connection has closed (or was passed), raising the `after_grace`
    /// bits (for plaintext connections, for the others) once `grace` is over, and cutting what
    /// is left at `deadline` (or on a forced cut). When `fallback` is cancelled, plaintext
    /// connections get `Connection: close`, and are closed when idle a grace later.
    async fn wait(
        &self,
        deadline: Instant,
        grace: Duration,
        after_grace: (u32, u32),
        fallback: Option<CancellationToken>,
        mut progress: impl FnMut(usize),
    ) -> Drained {
        let open_at_start = self.shared.tracker.len();
        self.shared.tracker.close();
        let mut tick = tokio::time::interval_at(
            Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let mut grace_over = crate::instant_after(Instant::now(), grace);
        let mut after_grace = Some(after_grace);
        let fallback = fallback.unwrap_or_default();
        let mut fallback_pending = true;
        let mut wait = pin!(self.shared.tracker.wait());
        // After a cut, connection tasks end at their next poll; one that does not (a handler
        // blocking its thread) must not hold the process past its deadline for ever.
        let mut give_up = None;
        loop {
            tokio::select! {
                biased;
                () = &mut wait => break,
                () = self.shared.force.cancelled(), if give_up.is_none() => {
                    give_up = Some(Instant::now() + Duration::from_secs(1));
                }
                () = tokio::time::sleep_until(deadline), if give_up.is_none() => {
                    tracing::warn!(open = self.shared.tracker.len(), "drain timeout reached: cutting the connections still open");
                    self.cut();
                }
                () = fallback.cancelled(), if fallback_pending => {
                    fallback_pending = false;
                    // The successor does not take them after all: what a drain without one
                    // does, from now on.
                    self.command(CLOSE_RESPONSES | DRAIN, 0);
                    grace_over = crate::instant_after(Instant::now(), grace);
                    after_grace = Some((CLOSE_IDLE, CLOSE_IDLE));
                }
                () = tokio::time::sleep_until(grace_over), if after_grace.is_some() => {
                    if let Some((passable, other)) = after_grace.take() {
                        self.command(passable, other);
                    }
                }
                () = sleep_until_some(give_up) => {
                    tracing::error!(
                        stuck = self.shared.tracker.len(),
                        "connections still not closed 1 s after being cut (a handler blocking its thread?); not waiting for them"
                    );
                    break;
                }
                _ = tick.tick() => progress(self.shared.tracker.len()),
            }
        }
        let cut = self.shared.lock().cut.unwrap_or(0);
        Drained { open_at_start, cut }
    }
}

async fn sleep_until_some(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

/// Dropped with the server (its future completed, or was dropped): cuts what is still open,
/// so no connection outlives the server that accepted it.
#[derive(Debug)]
pub(crate) struct CutOnDrop(pub(crate) Connections);

impl Drop for CutOnDrop {
    fn drop(&mut self) {
        if self.0.open() > 0 {
            let n = self.0.cut();
            tracing::warn!(cut = n, "server dropped: its connections were cut");
        }
    }
}
