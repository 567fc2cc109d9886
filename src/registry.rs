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
//!   since their last response, nothing of a next request buffered, and the last request's body
//!   over. A connection with part of a request head received is not idle:
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
//! receiving a head (the HTTP/2 preface and first SETTINGS frame included), in a TLS handshake,
//! or silent with a request body pending, for longer than the timeout, is cut. Keep-alive
//! connections idle for that long are closed the same way; an HTTP/2 connection without an
//! open stream gets GOAWAY, and is cut a timeout later if it is still there.
//!
//! # Sharded
//! Connections register in one of several shards, chosen by the accepting thread, so that new
//! connections on different workers do not contend for one lock; a broadcast walks them all.

use std::cell::Cell;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use slab::Slab;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

use crate::conn::control::{self, Control, Directive, Directives};

/// How many independent parts the registry has: connections accepted on different threads
/// register (and deregister) under different locks, so that a new connection on one worker
/// does not wait for one on another.
const SHARDS: usize = 16;

/// The connections of one server.
#[derive(Debug, Clone)]
pub(crate) struct Connections {
    shared: Arc<Shared>,
}

/// What the connections of a server share with it.
#[derive(Debug)]
pub(crate) struct Shared {
    shards: [Mutex<Shard>; SHARDS],
    /// The directives every new connection starts with (what the server asked of all so far),
    /// and how many connections the cut found (`None` until it happened).
    state: Mutex<State>,
    tracker: TaskTracker,
    /// Cancelled when what is left must be cut now.
    force: CancellationToken,
    /// 0: no header-read timeout.
    header_timeout: Duration,
    /// Whether requests carry their `ConnectionInfo`.
    pub(crate) connection_info: bool,
    /// Requests begun while `Stopping` was raised.
    while_stopping: AtomicU64,
    /// Connections cut by the header-read timeout.
    timed_out: AtomicU64,
    /// The keep-alive grace of a drain with a successor that takes connections, in
    /// milliseconds: what a connection that could not be passed gets.
    fallback_grace_ms: AtomicU64,
    /// The directives of new connections, `passable` in the low 32 bits, the others' in the
    /// high 32: read without a lock by [`Connections::register`].
    initial: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    conns: Slab<(Arc<Control>, RawFd)>,
}

#[derive(Debug, Default)]
struct State {
    passable: Directives,
    other: Directives,
    cut: Option<usize>,
}

/// A connection's place in the registry; [`Registration::remove`] (or dropping it) removes it.
///
/// Invariant (kept by its owner, `conn::io::TrackedIo`, which removes it in its `Drop` before
/// its socket closes): every fd the registry holds is open and is the connection it was
/// registered for. The cut and the sweeper use the fds under the shard's lock.
#[derive(Debug)]
pub(crate) struct Registration {
    shard: usize,
    key: Option<usize>,
    shared: Arc<Shared>,
    _token: TaskTrackerToken,
}

impl Registration {
    /// Removes the connection from the registry (once; later calls do nothing).
    pub(crate) fn remove(&mut self) {
        if let Some(key) = self.key.take() {
            self.shared.shard(self.shard).conns.try_remove(key);
            crate::metrics::connection_closed();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.remove();
    }
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    pub(crate) open_at_start: usize,
    pub(crate) cut: usize,
}

/// The shard of the calling thread: assigned round-robin on its first connection.
fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        s.get()
    })
}

fn pack(passable: Directives, other: Directives) -> u64 {
    u64::from(passable.bits()) | (u64::from(other.bits()) << 32)
}

impl Shared {
    fn shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn fallback_grace(&self) -> Duration {
        Duration::from_millis(self.fallback_grace_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn count_request_while_stopping(&self) {
        self.while_stopping.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls `f` on every registered connection, shard by shard, under the shard's lock.
    fn for_each(&self, mut f: impl FnMut(&Control, RawFd)) {
        for i in 0..SHARDS {
            let shard = self.shard(i);
            for (_, (control, fd)) in shard.conns.iter() {
                f(control, *fd);
            }
        }
    }
}

impl Connections {
    /// `header_timeout`: how long a connection may go without a complete request head
    /// (`Duration::ZERO`: no limit).
    pub(crate) fn new(header_timeout: Duration, connection_info: bool) -> Connections {
        Connections {
            shared: Arc::new(Shared {
                shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
                state: Mutex::new(State::default()),
                tracker: TaskTracker::new(),
                force: CancellationToken::new(),
                header_timeout,
                connection_info,
                while_stopping: AtomicU64::new(0),
                timed_out: AtomicU64::new(0),
                fallback_grace_ms: AtomicU64::new(1000),
                initial: AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Registers an accepted socket (by its fd, which the caller keeps open while registered):
    /// from now on it is counted, drained and cut with the others. `passable`: a plaintext
    /// connection a successor could take over.
    pub(crate) fn register(&self, fd: RawFd, passable: bool) -> (Arc<Control>, Registration) {
        let token = self.shared.tracker.token();
        let shard = my_shard();
        let mut conns = self.shared.shard(shard);
        // Read under the shard's lock: a broadcast raises on the initial set first, then on
        // every shard under its lock, so a connection registered meanwhile gets it either way.
        let initial = self.shared.initial.load(Ordering::Acquire);
        let initial = match passable {
            true => Directives::from_bits(initial as u32),
            false => Directives::from_bits((initial >> 32) as u32),
        };
        let control = Arc::new(Control::new(passable, initial));
        let key = conns.conns.insert((Arc::clone(&control), fd));
        drop(conns);
        crate::metrics::connection_opened();
        let registration = Registration {
            shard,
            key: Some(key),
            shared: Arc::clone(&self.shared),
            _token: token,
        };
        (control, registration)
    }

    /// Raises `passable` on every plaintext connection and `other` on every other one (and on
    /// those registered from now on), waking each to act on it.
    pub(crate) fn broadcast(&self, passable: Directives, other: Directives) {
        let mut state = self.shared.state();
        state.passable = state.passable.union(passable);
        state.other = state.other.union(other);
        self.shared
            .initial
            .store(pack(state.passable, state.other), Ordering::Release);
        drop(state);
        self.shared.for_each(|control, _| {
            control.raise(if control.passable() { passable } else { other });
        });
    }

    /// The same directives for every connection.
    pub(crate) fn broadcast_all(&self, ds: Directives) {
        self.broadcast(ds, ds);
    }

    /// A hand-off failed: no connection is to be passed any more, the ones registered from now
    /// on included (they get the keep-alive grace instead).
    pub(crate) fn withdraw_hand_off(&self) {
        let mut state = self.shared.state();
        state.passable = state.passable.without(Directive::HandOff);
        state.other = state.other.without(Directive::HandOff);
        self.shared
            .initial
            .store(pack(state.passable, state.other), Ordering::Release);
        drop(state);
        self.shared
            .for_each(|control, _| control.withdraw(Directive::HandOff));
    }

    /// Cancelled once [`Connections::cut`] has happened.
    pub(crate) fn force(&self) -> &CancellationToken {
        &self.shared.force
    }

    /// Cuts every open connection now, upgraded ones included, and returns how many there
    /// were. Counted at the moment of the cut; later calls change nothing and return the same
    /// number.
    pub(crate) fn cut(&self) -> usize {
        let mut state = self.shared.state();
        if let Some(n) = state.cut {
            return n;
        }
        state.passable = state.passable.with(Directive::Cut);
        state.other = state.other.with(Directive::Cut);
        self.shared
            .initial
            .store(pack(state.passable, state.other), Ordering::Release);
        let mut n = 0;
        self.shared.for_each(|control, fd| {
            // One given back after the cut is dropped at once (the directive), but the socket
            // of one in flight is not shut down: it is the successor's now, or about to be.
            control.raise(Directive::Cut);
            if control.is_in_flight() {
                return;
            }
            n += 1;
            // SAFETY: registered fds are open while registered (see `Registration`), and the
            // shard's lock we hold keeps their owners from deregistering, hence from closing
            // them.
            unsafe { crate::sys::shutdown_registered(fd) };
        });
        state.cut = Some(n);
        drop(state);
        // Hooks still running are abandoned; tasks still holding a connection drop it now.
        self.shared.force.cancel();
        n
    }

    /// Serving again after a drain was given up (the successor died): connections accepted
    /// from now on start with no directive, and are waited for by the next drain. Those open
    /// keep the directives they got, and are told to move on.
    pub(crate) fn resume(&self) {
        let mut state = self.shared.state();
        state.passable = Directives::NONE;
        state.other = Directives::NONE;
        self.shared
            .initial
            .store(pack(state.passable, state.other), Ordering::Release);
        drop(state);
        // The clients of the drain given up move on, as that drain would have had them do:
        // their next response says `Connection: close`, HTTP/2 gets GOAWAY, and the ones still
        // idle a grace later are closed (the drain's own timer stopped with it).
        let bits = Directives::NONE
            .with(Directive::CloseResponses)
            .with(Directive::Drain);
        let mut given_up = Vec::new();
        for i in 0..SHARDS {
            for (_, (control, _)) in self.shared.shard(i).conns.iter() {
                control.raise(bits);
                given_up.push(Arc::clone(control));
            }
        }
        if !given_up.is_empty() {
            let grace = self.shared.fallback_grace();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                for control in given_up {
                    control.raise(Directive::CloseIdle);
                }
            });
        }
        self.shared.tracker.reopen();
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.shared.tracker.len()
    }

    /// Requests begun since `Stopping` was raised.
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
        self.broadcast_all(STOPPING);
    }

    /// The sweeper: enforces the header-read timeout (and the idle timeouts, which are the
    /// same), about once a second. Runs until aborted.
    pub(crate) fn sweeper(&self) -> impl Future<Output = ()> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        async move {
            let timeout = shared.header_timeout;
            if timeout.is_zero() {
                return std::future::pending().await;
            }
            let limit = u32::try_from(timeout.as_millis().div_ceil(control::TICK.as_millis()))
                .unwrap_or(u32::MAX);
            let period = (timeout / 4).clamp(control::TICK, Duration::from_secs(1));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = control::advance_coarse_clock();
                shared.for_each(|control, _| sweep(&shared, control, now, limit, timeout));
            }
        }
    }

    /// Drains: stops keep-alive, sends GOAWAY, closes idle connections after `grace`, waits for
    /// the last connection to close, and cuts what is left at `deadline` (or as soon as
    /// [`Connections::force`] is cancelled). `progress` is called about once a second with
    /// the number of connections left.
    ///
    /// `accepting`: done when no connection can be registered any more (the listeners' last
    /// handshakes, see `accept`); the drain ends only after it, once every connection closed,
    /// so that it also waits for those accepted meanwhile. The keep-alive grace runs at the same
    /// time.
    pub(crate) async fn drain(
        &self,
        deadline: Instant,
        grace: Duration,
        accepting: impl Future<Output = ()>,
        progress: impl FnMut(usize),
    ) -> Drained {
        self.broadcast_all(STOPPING);
        let close_idle = Directives::from(Directive::CloseIdle);
        self.wait(
            deadline,
            grace,
            (close_idle, close_idle),
            None,
            accepting,
            progress,
        )
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
        self.broadcast(
            Directive::HandOff.into(),
            Directives::of(&[Directive::CloseResponses, Directive::Drain]),
        );
        let drained = self
            .wait(
                deadline,
                grace,
                (Directives::NONE, Directive::CloseIdle.into()),
                Some(failed),
                std::future::ready(()),
                progress,
            )
            .await;
        Drained {
            open_at_start,
            ..drained
        }
    }

    /// Waits until every connection has closed (or was passed), raising the `after_grace`
    /// bits (for plaintext connections, for the others) once `grace` is over, and cutting what
    /// is left at `deadline` (or on a forced cut). When `fallback` is cancelled, plaintext
    /// connections get `Connection: close`, and are closed when idle a grace later. Not before
    /// `accepting` is done: connections registered until then are waited for too.
    async fn wait(
        &self,
        deadline: Instant,
        grace: Duration,
        after_grace: (Directives, Directives),
        fallback: Option<CancellationToken>,
        accepting: impl Future<Output = ()>,
        mut progress: impl FnMut(usize),
    ) -> Drained {
        let open_at_start = self.shared.tracker.len();
        let mut accepting = pin!(accepting);
        let mut accepting_done = false;
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
                () = &mut accepting, if !accepting_done => {
                    accepting_done = true;
                    // The tracker's wait ends once it is closed and empty.
                    self.shared.tracker.close();
                }
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
                    self.withdraw_hand_off();
                    self.broadcast(
                        Directives::of(&[Directive::CloseResponses, Directive::Drain]),
                        Directives::NONE,
                    );
                    grace_over = crate::instant_after(Instant::now(), grace);
                    let close_idle = Directives::from(Directive::CloseIdle);
                    after_grace = Some((close_idle, close_idle));
                }
                () = tokio::time::sleep_until(grace_over), if after_grace.is_some() => {
                    if let Some((passable, other)) = after_grace.take() {
                        self.broadcast(passable, other);
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
        let cut = self.shared.state().cut.unwrap_or(0);
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

/// What the lame duck and the drain raise on every connection first.
const STOPPING: Directives = Directives::of(&[
    Directive::CloseResponses,
    Directive::Drain,
    Directive::Stopping,
]);

/// One connection, as the sweeper sees it at tick `now`.
fn sweep(shared: &Shared, control: &Control, now: u32, limit: u32, timeout: Duration) {
    let (phase, since) = control.phase();
    let Some(action) = phase.on_timeout() else {
        return;
    };
    let late = now.wrapping_sub(since);
    if late <= limit || control.is_in_flight() {
        return;
    }
    // An HTTP/2 connection told GOAWAY for being idle that is still there a timeout later
    // ignores it: cut.
    let action = match action {
        Directive::GoAwayIdle
            if control.directives().contains(Directive::GoAwayIdle)
                && late > limit.saturating_mul(2) =>
        {
            Directive::Cut
        }
        other => other,
    };
    if control.raise(action) {
        if action == Directive::Cut {
            shared.timed_out.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(
            ?phase,
            ?timeout,
            ?action,
            "no complete request head (or no request) within the header-read timeout"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> (std::os::unix::net::UnixStream, RawFd) {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        (a, fd)
    }

    #[test]
    fn a_broadcast_reaches_open_and_later_connections_by_kind() {
        let c = Connections::new(Duration::ZERO, false);
        let (_s1, fd1) = fd();
        let (plain, _r1) = c.register(fd1, true);
        let (_s2, fd2) = fd();
        let (tls, _r2) = c.register(fd2, false);
        c.broadcast(Directive::HandOff.into(), Directive::CloseResponses.into());
        assert_eq!(plain.directives(), Directive::HandOff.into());
        assert_eq!(tls.directives(), Directive::CloseResponses.into());
        let (_s3, fd3) = fd();
        let (later, _r3) = c.register(fd3, true);
        assert_eq!(later.directives(), Directive::HandOff.into());
        assert_eq!(c.open(), 3);
    }

    #[test]
    fn a_withdrawn_hand_off_is_gone_for_open_and_later_connections() {
        let c = Connections::new(Duration::ZERO, false);
        let (_s1, fd1) = fd();
        let (open, _r1) = c.register(fd1, true);
        c.broadcast(Directive::HandOff.into(), Directives::NONE);
        c.withdraw_hand_off();
        assert!(!open.directives().contains(Directive::HandOff));
        let (_s2, fd2) = fd();
        let (later, _r2) = c.register(fd2, true);
        assert!(!later.directives().contains(Directive::HandOff));
    }

    #[test]
    fn the_cut_counts_once_skips_connections_in_flight_and_removed_ones_are_gone() {
        let c = Connections::new(Duration::ZERO, false);
        let (_s1, fd1) = fd();
        let (a, _r1) = c.register(fd1, true);
        let (_s2, fd2) = fd();
        let (b, _r2) = c.register(fd2, true);
        let (_s3, fd3) = fd();
        let (_gone, mut r3) = c.register(fd3, true);
        r3.remove();
        b.mark_in_flight(true);
        assert_eq!(c.cut(), 1);
        assert_eq!(c.cut(), 1, "later calls return the same count");
        assert!(a.directives().contains(Directive::Cut) && b.directives().contains(Directive::Cut));
        assert!(c.force().is_cancelled());
    }

    #[test]
    fn connections_registered_on_many_threads_are_all_counted_and_all_removed() {
        let c = Connections::new(Duration::ZERO, false);
        std::thread::scope(|s| {
            for _ in 0..8 {
                let c = c.clone();
                s.spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..50 {
                        let (sock, fd) = fd();
                        held.push((sock, c.register(fd, true)));
                    }
                    held
                });
            }
        });
        // Every registration was dropped with its thread's vector.
        assert_eq!(c.open(), 0);
        let mut n = 0;
        c.shared.for_each(|_, _| n += 1);
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn the_sweeper_cuts_a_silent_connection_and_goes_away_an_idle_http2_one_first() {
        let c = Connections::new(Duration::from_millis(400), false);
        let (_s1, fd1) = fd();
        let (h1, _r1) = c.register(fd1, true);
        let (_s2, fd2) = fd();
        let (h2, _r2) = c.register(fd2, false);
        h2.set_phase(control::Phase::H2Idle);
        let (_s3, fd3) = fd();
        let (busy, _r3) = c.register(fd3, true);
        busy.request_started();
        let sweeper = tokio::spawn(c.sweeper());
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while !h1.directives().contains(Directive::Cut) && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(h1.directives().contains(Directive::Cut), "idle HTTP/1 cut");
        assert!(
            h2.directives().contains(Directive::GoAwayIdle),
            "idle HTTP/2 told GOAWAY"
        );
        assert!(
            !busy.directives().contains(Directive::Cut),
            "a request being served is not"
        );
        assert_eq!(c.timed_out(), 1);
        sweeper.abort();
    }
}
