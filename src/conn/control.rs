//! One connection's control block: its **phase** (where it is between two requests, with the
//! coarse time that phase began) and the **directives** the server raised on it.
//!
//! Depends on nothing else in the crate. Three sides use it, each through a few methods:
//! - the registry raises directives ([`Control::raise`], [`Control::withdraw`]) and reads the
//!   phase (the sweeper);
//! - the connection's IO reports what it saw ([`Control::note_read`], [`Control::note_write`]);
//! - the serve path sets the phase ([`Control::set_phase`] and the request hooks) and acts on
//!   the directives ([`Control::poll_directives`]).
//!
//! # Encoding
//! The directives are bits of one `AtomicU32`, raised with `fetch_or` (`Release`) and read with
//! `Acquire`, then the task's waker is woken; only [`Directive::HandOff`] is ever withdrawn (a
//! hand-off that failed). The waker stays registered when woken (`wake_by_ref`), so the task
//! registers it once, not at every poll: a poll that finds the same waker registered costs two
//! loads (see [`Control::poll_directives`]). The phase is one `AtomicU64`: the phase in the low 8 bits, the coarse
//! tick it began in the high 32, written and read `Relaxed` (it is advice for the sweeper and
//! for the task that owns the connection, which writes it itself).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, RawWakerVTable, Waker};
use std::time::{Duration, Instant};

/// What the server can ask of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Directive {
    /// Drop the connection now (closing the socket).
    Cut = 1 << 0,
    /// Stop keep-alive: HTTP/2 gets GOAWAY at once.
    Drain = 1 << 1,
    /// The keep-alive grace is over: close HTTP/1 connections at their next request boundary.
    CloseIdle = 1 << 2,
    /// Take HTTP/1 connections apart at their next request boundary and pass them on.
    HandOff = 1 << 3,
    /// HTTP/1 responses carry `Connection: close`.
    CloseResponses = 1 << 4,
    /// The server is shutting down: requests are counted (the lame duck's counter).
    Stopping = 1 << 5,
    /// An HTTP/2 connection idle for too long: GOAWAY (its open streams, if any, finish).
    GoAwayIdle = 1 << 6,
}

/// A set of [`Directive`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Directives(u32);

impl Directives {
    /// No directive.
    pub(crate) const NONE: Directives = Directives(0);

    /// The set of `list`.
    pub(crate) const fn of(list: &[Directive]) -> Directives {
        let mut bits = 0;
        let mut i = 0;
        while i < list.len() {
            bits |= list[i] as u32;
            i += 1;
        }
        Directives(bits)
    }

    pub(crate) fn contains(self, d: Directive) -> bool {
        self.0 & d as u32 != 0
    }

    pub(crate) fn with(self, d: Directive) -> Directives {
        Directives(self.0 | d as u32)
    }

    pub(crate) fn without(self, d: Directive) -> Directives {
        Directives(self.0 & !(d as u32))
    }

    pub(crate) fn without_all(self, other: Directives) -> Directives {
        Directives(self.0 & !other.0)
    }

    pub(crate) fn intersection(self, other: Directives) -> Directives {
        Directives(self.0 & other.0)
    }

    pub(crate) fn intersects(self, other: Directives) -> bool {
        self.0 & other.0 != 0
    }

    pub(crate) fn union(self, other: Directives) -> Directives {
        Directives(self.0 | other.0)
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The raw bits (for a registry that packs two sets in one atomic).
    pub(crate) fn bits(self) -> u32 {
        self.0
    }

    pub(crate) fn from_bits(bits: u32) -> Directives {
        Directives(bits)
    }
}

impl From<Directive> for Directives {
    fn from(d: Directive) -> Directives {
        Directives(d as u32)
    }
}

/// Where a connection is. Packed with the coarse time it began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Nothing of a next request received or buffered, the last response written: the only
    /// phase in which an HTTP/1 connection may be closed or passed on.
    Idle = 0,
    /// Bytes of a request head received (or replayed), head not complete yet; also while the
    /// protocol is told apart (the HTTP/2 preface and first SETTINGS frame included).
    Reading = 1,
    /// A request is being served.
    Busy = 2,
    /// The response is written, but the request had a body that hyper may still be reading:
    /// busy until hyper parses the next head (or the connection ends). Timed by silence: every
    /// byte received restarts its clock.
    BodyPending = 3,
    /// HTTP/2 without an open stream.
    H2Idle = 4,
    /// HTTP/2 with at least one open stream.
    H2Busy = 5,
    /// Upgraded (WebSocket, CONNECT): the application owns the bytes.
    Upgraded = 6,
    /// A TLS handshake is in progress.
    Handshake = 7,
}

impl Phase {
    fn from_bits(bits: u64) -> Phase {
        match bits & 0xff {
            0 => Phase::Idle,
            1 => Phase::Reading,
            2 => Phase::Busy,
            3 => Phase::BodyPending,
            4 => Phase::H2Idle,
            5 => Phase::H2Busy,
            6 => Phase::Upgraded,
            _ => Phase::Handshake,
        }
    }

    /// What the sweeper does to a connection that stayed in this phase past the header-read
    /// timeout.
    pub(crate) fn on_timeout(self) -> Option<Directive> {
        match self {
            Phase::Idle | Phase::Reading | Phase::Handshake | Phase::BodyPending => {
                Some(Directive::Cut)
            }
            // GOAWAY first; cut a timeout later if the client ignores it.
            Phase::H2Idle => Some(Directive::GoAwayIdle),
            Phase::Busy | Phase::H2Busy | Phase::Upgraded => None,
        }
    }
}

/// The coarse clock shared by every connection: units of [`TICK`] since [`EPOCH`], advanced by
/// the sweepers (`fetch_max`, so several servers agree). Reading it costs one relaxed load
/// instead of a clock read per request.
static COARSE_NOW: AtomicU32 = AtomicU32::new(0);
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// The unit of the coarse clock.
pub(crate) const TICK: Duration = Duration::from_millis(100);

#[inline]
pub(crate) fn coarse_now() -> u32 {
    COARSE_NOW.load(Ordering::Relaxed)
}

/// Advances the coarse clock to now, and returns it.
pub(crate) fn advance_coarse_clock() -> u32 {
    let epoch = EPOCH.get_or_init(Instant::now);
    let ticks = epoch.elapsed().as_millis() / TICK.as_millis();
    let ticks = u32::try_from(ticks).unwrap_or(u32::MAX);
    COARSE_NOW.fetch_max(ticks, Ordering::Relaxed).max(ticks)
}

fn pack(phase: Phase, tick: u32) -> u64 {
    (u64::from(tick) << 32) | phase as u64
}

/// The control block of one connection, shared by its task, its IO, its service wrapper and
/// the server's registry.
#[derive(Debug)]
pub(crate) struct Control {
    directives: AtomicU32,
    phase: AtomicU64,
    /// Whether the last write or flush of the socket returned `Pending`: hyper may then hold
    /// bytes it has not written, and the connection must not be taken apart.
    pending_write: AtomicBool,
    /// HTTP/2 streams open (requests whose response body is not done).
    streams: AtomicU32,
    /// On its way to the successor: neither cut nor timed out here (a shutdown would end it
    /// for the successor too).
    in_flight: AtomicBool,
    /// The waker of the task that acts on the directives: kept when woken, replaced when the
    /// task polls with another one.
    waker: Mutex<Option<Waker>>,
    /// Which waker is in `waker` (its data and vtable pointers), so that a poll with the same
    /// one skips the lock. Written under the lock, by the polling task only.
    registered: (AtomicPtr<()>, AtomicPtr<RawWakerVTable>),
    /// A plaintext connection, which a successor can take over.
    passable: bool,
}

impl Control {
    pub(crate) fn new(passable: bool, initial: Directives) -> Control {
        Control {
            directives: AtomicU32::new(initial.0),
            phase: AtomicU64::new(pack(Phase::Idle, coarse_now())),
            pending_write: AtomicBool::new(false),
            streams: AtomicU32::new(0),
            in_flight: AtomicBool::new(false),
            waker: Mutex::new(None),
            registered: (
                AtomicPtr::new(std::ptr::null_mut()),
                AtomicPtr::new(std::ptr::null_mut()),
            ),
            passable,
        }
    }

    pub(crate) fn passable(&self) -> bool {
        self.passable
    }

    // -- directives ---------------------------------------------------------------------------

    /// Raises `ds`; wakes the connection's task if any of them is new. Returns whether one was.
    pub(crate) fn raise(&self, ds: impl Into<Directives>) -> bool {
        let ds = ds.into();
        let before = self.directives.fetch_or(ds.0, Ordering::Release);
        let new = before & ds.0 != ds.0;
        if new {
            // Under the lock, after the bits: a task registering at the same time either sees
            // the bits when it loads them after registering, or is woken here.
            let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(w) = waker.as_ref() {
                w.wake_by_ref();
            }
        }
        new
    }

    /// Withdraws `d` (a hand-off that failed: from now on the connection is served here).
    pub(crate) fn withdraw(&self, d: Directive) {
        self.directives.fetch_and(!(d as u32), Ordering::Release);
    }

    /// The directives raised so far.
    pub(crate) fn directives(&self) -> Directives {
        Directives(self.directives.load(Ordering::Acquire))
    }

    /// The directives raised so far; the task in `cx` is woken when one is raised. Register,
    /// then load: a directive raised in between is seen now or wakes the task.
    ///
    /// A waker stays registered once woken, so a task polled with the waker already there (a
    /// task's waker does not change) registers nothing: two relaxed loads instead of a lock.
    #[inline]
    pub(crate) fn poll_directives(&self, cx: &mut Context<'_>) -> Directives {
        let w = cx.waker();
        if self.registered.0.load(Ordering::Relaxed) != w.data().cast_mut()
            || self.registered.1.load(Ordering::Relaxed)
                != std::ptr::from_ref(w.vtable()).cast_mut()
        {
            self.register(w);
        }
        self.directives()
    }

    /// Puts `w` in the waker slot: at a task's first poll (a task's waker does not change).
    #[cold]
    #[inline(never)]
    fn register(&self, w: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(w.clone());
        self.registered
            .0
            .store(w.data().cast_mut(), Ordering::Relaxed);
        self.registered
            .1
            .store(std::ptr::from_ref(w.vtable()).cast_mut(), Ordering::Relaxed);
    }

    // -- phase --------------------------------------------------------------------------------

    pub(crate) fn phase(&self) -> (Phase, u32) {
        let bits = self.phase.load(Ordering::Relaxed);
        (Phase::from_bits(bits), (bits >> 32) as u32)
    }

    #[inline]
    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase
            .store(pack(phase, coarse_now()), Ordering::Relaxed);
    }

    /// Bytes arrived (from the socket, or replayed from a buffer): an idle connection is
    /// reading a request from now on; one with a request body pending made progress.
    #[inline]
    pub(crate) fn note_read(&self) {
        // The phase's byte compared as it is: every read of a request passes here.
        let phase = self.phase.load(Ordering::Relaxed) as u8;
        if phase == Phase::Idle as u8 {
            self.set_phase(Phase::Reading);
        } else if phase == Phase::BodyPending as u8 {
            self.set_phase(Phase::BodyPending);
        }
    }

    /// A write or flush returned (`pending`: it returned `Pending`).
    #[inline]
    pub(crate) fn note_write(&self, pending: bool) {
        // Written only when it changes: the common case (writes that complete) stays a load.
        if self.pending_write.load(Ordering::Relaxed) != pending {
            self.pending_write.store(pending, Ordering::Relaxed);
        }
    }

    /// hyper parsed a request head (HTTP/1): the previous request is over, body included.
    pub(crate) fn request_started(&self) {
        self.set_phase(Phase::Busy);
    }

    /// hyper is done with an HTTP/1 response; `body_pending`: the request had a body that may
    /// still be arriving.
    pub(crate) fn response_done(&self, body_pending: bool) {
        if self.phase().0 == Phase::Busy {
            self.set_phase(if body_pending {
                Phase::BodyPending
            } else {
                Phase::Idle
            });
        }
    }

    /// An HTTP/2 stream opened.
    pub(crate) fn stream_opened(&self) {
        if self.streams.fetch_add(1, Ordering::Relaxed) == 0 {
            self.set_phase(Phase::H2Busy);
        }
    }

    /// An HTTP/2 stream's response is done.
    pub(crate) fn stream_closed(&self) {
        if self.streams.fetch_sub(1, Ordering::Relaxed) == 1 && self.phase().0 == Phase::H2Busy {
            self.set_phase(Phase::H2Idle);
        }
    }

    /// Idle between two requests, with everything hyper wrote flushed to the socket.
    pub(crate) fn at_request_boundary(&self) -> bool {
        self.phase().0 == Phase::Idle && !self.pending_write.load(Ordering::Relaxed)
    }

    // -- hand-off -----------------------------------------------------------------------------

    pub(crate) fn mark_in_flight(&self, in_flight: bool) {
        self.in_flight.store(in_flight, Ordering::Release);
    }

    pub(crate) fn is_in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (Arc::clone(&c), Waker::from(c))
    }

    #[test]
    fn a_raised_directive_wakes_the_registered_task_once() {
        let c = Control::new(true, Directives::NONE);
        let (count, w) = waker();
        let mut cx = Context::from_waker(&w);
        assert_eq!(c.poll_directives(&mut cx), Directives::NONE);
        assert!(c.raise(Directive::CloseIdle));
        assert!(!c.raise(Directive::CloseIdle), "raised twice: not new");
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let ds = c.poll_directives(&mut cx);
        assert!(ds.contains(Directive::CloseIdle) && !ds.contains(Directive::Cut));
    }

    #[test]
    fn a_waker_stays_registered_when_woken_until_another_replaces_it() {
        let c = Control::new(true, Directives::NONE);
        let (first, w1) = waker();
        c.poll_directives(&mut Context::from_waker(&w1));
        // Two raises, no poll in between: both wake the task (the waker is kept).
        c.raise(Directive::Drain);
        c.raise(Directive::CloseIdle);
        assert_eq!(first.0.load(Ordering::SeqCst), 2);
        // A poll with the same waker registers nothing new; one with another replaces it.
        c.poll_directives(&mut Context::from_waker(&w1));
        let (second, w2) = waker();
        c.poll_directives(&mut Context::from_waker(&w2));
        c.raise(Directive::HandOff);
        assert_eq!(
            first.0.load(Ordering::SeqCst),
            2,
            "the replaced waker is not woken"
        );
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_withdrawn_hand_off_is_gone_and_others_stay() {
        let c = Control::new(
            true,
            Directives::of(&[Directive::HandOff, Directive::Drain]),
        );
        c.withdraw(Directive::HandOff);
        assert_eq!(c.directives(), Directives::from(Directive::Drain));
    }

    #[test]
    fn replayed_or_fresh_bytes_make_an_idle_connection_reading() {
        let c = Control::new(true, Directives::NONE);
        assert!(c.at_request_boundary());
        c.note_read();
        assert_eq!(c.phase().0, Phase::Reading);
        assert!(!c.at_request_boundary());
        c.request_started();
        c.note_read();
        assert_eq!(
            c.phase().0,
            Phase::Busy,
            "body bytes do not change a busy phase"
        );
    }

    #[test]
    fn a_request_with_a_body_is_not_idle_when_its_response_is_done() {
        let c = Control::new(true, Directives::NONE);
        c.request_started();
        c.response_done(true);
        assert_eq!(c.phase().0, Phase::BodyPending);
        assert!(!c.at_request_boundary());
        c.note_read();
        assert_eq!(c.phase().0, Phase::BodyPending);
        // The next head proves the body over.
        c.request_started();
        c.response_done(false);
        assert!(c.at_request_boundary());
    }

    #[test]
    fn a_pending_write_is_no_boundary() {
        let c = Control::new(true, Directives::NONE);
        c.note_write(true);
        assert!(!c.at_request_boundary());
        c.note_write(false);
        assert!(c.at_request_boundary());
    }

    #[test]
    fn http2_is_idle_only_without_open_streams() {
        let c = Control::new(false, Directives::NONE);
        c.set_phase(Phase::H2Idle);
        c.stream_opened();
        c.stream_opened();
        c.stream_closed();
        assert_eq!(c.phase().0, Phase::H2Busy);
        c.stream_closed();
        assert_eq!(c.phase().0, Phase::H2Idle);
        assert_eq!(Phase::H2Idle.on_timeout(), Some(Directive::GoAwayIdle));
        assert_eq!(Phase::H2Busy.on_timeout(), None);
        assert_eq!(Phase::BodyPending.on_timeout(), Some(Directive::Cut));
    }
}
