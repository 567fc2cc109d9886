//! Talk to the service manager with `sd_notify(3)` datagrams.
//!
//! Messages are formatted with the `sd-notify` crate's [`NotifyState`]; they are sent here
//! rather than with `sd_notify::notify` because that function re-reads `NOTIFY_SOCKET` from the
//! environment on every call (handover removes it at start-up), cannot reach an abstract
//! (`@name`) socket, and blocks when the manager's queue is full.
//!
//! Where the messages go:
//! - normally, to `NOTIFY_SOCKET` (systemd), or nowhere when it is unset;
//! - in a process started by a handover restart, everything up to and including `READY=1`
//!   goes to the *parent* (which then tells the manager `MAINPID=` + `READY=1`, since only the
//!   main pid may speak under `NotifyAccess=main`): on the private channel the parent passed
//!   (`HANDOVER_CHANNEL_FD`), or, from a parent that passed none, on `NOTIFY_SOCKET`, the
//!   parent's hand-off socket. `HANDOVER_NOTIFY_SOCKET` is the service manager's socket, and
//!   everything after `READY=1` goes there, so the new process can do its own next restart.
//!
//! # Delivery
//! Most messages are best effort: sent without blocking, and a full queue drops them with a
//! warning, so a busy manager never stalls the server. The few that must arrive (the first
//! `READY=1`, the hand-off's `MAINPID=` + `READY=1`, a failed restart's `READY=1`) are sent on
//! a *connected* socket: when the receiver's queue is full the send fails with `EAGAIN`, and
//! Linux wakes a connected datagram sender once the receiver reads, so we wait for writability
//! (with a deadline) instead of polling, and know when the message is in the queue.

use std::ffi::{OsStr, OsString};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

pub(crate) use sd_notify::NotifyState;

use crate::error::Error;
use crate::startup::Startup;
use crate::sys;

/// Where notifications go, and whether the hand-off to our parent is still pending.
#[derive(Debug)]
pub(crate) struct Notifier {
    /// The service manager's socket (systemd's `NOTIFY_SOCKET`), if any.
    upstream: Option<Target>,
    /// The parent, until `READY=1` has been sent there.
    parent: Mutex<Option<Parent>>,
    /// Our end of the channel to the parent, kept open after `READY=1`: the parent keeps its
    /// end too, and later messages (passed connections) will come this way.
    channel: Mutex<Option<Arc<Connected>>>,
    /// Whether our `READY=1` to a parent says we take its connections.
    offers_connections: AtomicBool,
    /// Whether it also takes upgraded connections (`upgrade`).
    offers_upgraded: AtomicBool,
}

/// How to reach a handover parent.
#[derive(Debug)]
enum Parent {
    /// The private `SOCK_SEQPACKET` channel it passed (`HANDOVER_CHANNEL_FD`).
    Channel(Arc<Connected>),
    /// Its hand-off socket (`NOTIFY_SOCKET`): a parent that passed no channel.
    Socket(Target),
}

#[derive(Debug)]
pub(crate) struct Target {
    /// The value as given, for messages.
    name: OsString,
    addr: SocketAddrUnix,
    socket: UnixDatagram,
}

impl Target {
    pub(crate) fn name(&self) -> &OsStr {
        &self.name
    }
}

impl Notifier {
    /// Builds the notifier from the start-up capture. Malformed values are logged (naming the
    /// variable and what was expected) and disable notifications to that target; serving goes
    /// on.
    pub(crate) fn from_startup(startup: &Startup) -> Notifier {
        let open = |var: &'static str, value: &Option<OsString>| match value {
            None => None,
            Some(v) => match Target::parse(v) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        "{var} is unusable; sd_notify messages to it are disabled"
                    );
                    None
                }
            },
        };
        match &startup.upstream_notify_socket {
            // Started by a handover parent: NOTIFY_SOCKET is the parent's, and the service
            // manager's is this variable (empty: there is none).
            Some(upstream) => Notifier {
                upstream: match upstream.is_empty() {
                    true => None,
                    false => open(
                        crate::startup::UPSTREAM_NOTIFY_VAR,
                        &startup.upstream_notify_socket,
                    ),
                },
                parent: Mutex::new(match take_channel(startup) {
                    Some(channel) => Some(Parent::Channel(Arc::new(channel))),
                    None => open("NOTIFY_SOCKET", &startup.notify_socket).map(Parent::Socket),
                }),
                channel: Mutex::new(None),
                offers_connections: AtomicBool::new(false),
                offers_upgraded: AtomicBool::new(false),
            },
            None => Notifier {
                upstream: open("NOTIFY_SOCKET", &startup.notify_socket),
                parent: Mutex::new(None),
                channel: Mutex::new(None),
                offers_connections: AtomicBool::new(false),
                offers_upgraded: AtomicBool::new(false),
            },
        }
    }

    /// The service manager's socket address as given, to pass on to a restart child.
    pub(crate) fn upstream_name(&self) -> Option<&OsStr> {
        self.upstream.as_ref().map(Target::name)
    }

    /// Sends `states` to whoever should hear them now, without blocking. Failures are logged,
    /// never fatal.
    pub(crate) fn notify(&self, states: &[NotifyState<'_>]) {
        self.send_routed(&format_states(states));
    }

    fn send_routed(&self, msg: &str) {
        let parent = self.parent.lock().unwrap_or_else(|p| p.into_inner());
        match parent.as_ref() {
            Some(Parent::Channel(channel)) => {
                if let Err(e) = send_now(channel.fd(), msg.as_bytes()) {
                    tracing::warn!(error = %e, message = msg.trim_end(), "message to the parent process could not be sent");
                }
            }
            Some(Parent::Socket(target)) => send(target, msg),
            None => {
                if let Some(target) = &self.upstream {
                    send(target, msg);
                }
            }
        }
    }

    /// The same, but a message that matters (a failed restart's `READY=1`, which a manager in
    /// `RELOADING=1` waits for): delivered in the background, waiting while the receiver's
    /// queue is full, for up to `patience`. It may arrive after messages sent later.
    pub(crate) fn notify_patiently(
        self: &Arc<Self>,
        states: &[NotifyState<'_>],
        patience: Duration,
    ) {
        let msg = format_states(states);
        let notifier = Arc::clone(self);
        let deadline = deadline_after(patience);
        tokio::spawn(async move {
            if notifier.parent_pending() {
                notifier.send_routed(&msg);
                return;
            }
            let Some(target) = &notifier.upstream else {
                return;
            };
            // Usually there is room: one send on the socket we have, no new fd. Only a full
            // queue (or another error) needs a connected socket to wait on.
            if target.try_send(&msg).is_ok() {
                return;
            }
            match target.connect() {
                Ok(connected) => {
                    if let Err(e) = connected.deliver(msg.as_bytes(), deadline).await {
                        tracing::warn!(to = ?target.name, error = %e, message = msg.trim_end(), "sd_notify message could not be delivered");
                    }
                }
                // No socket to wait on (out of fds, say): one try without waiting.
                Err(e) => {
                    tracing::debug!(to = ?target.name, error = %e, "cannot connect to wait for delivery; sending once");
                    send(target, &msg);
                }
            }
        });
    }

    fn parent_pending(&self) -> bool {
        self.parent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Reports readiness, and waits (up to `patience`) until the report is delivered: to the
    /// parent if a hand-off is pending (and from then on to the service manager), otherwise to
    /// the service manager. A report that cannot be delivered is logged as an error: a parent
    /// then gives up on us and kills us; a service manager may consider the start failed.
    pub(crate) async fn ready(&self, status: &str, patience: Duration) {
        // From now on a failure is not the start's: no reason may follow READY=1 on the
        // channel (the parent reads acknowledgements there then).
        crate::reason::disarm();
        let mut msg = format_states(&[NotifyState::Ready, NotifyState::Status(status)]);
        let deadline = deadline_after(patience.max(MIN_PATIENCE));
        let parent = self.parent.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (delivered, to) = match parent {
            Some(Parent::Channel(channel)) => {
                tracing::info!(
                    "reporting READY=1 to the parent process (on its channel), which hands over to us"
                );
                if self.offers_connections.load(Ordering::Relaxed) {
                    msg.push_str(crate::handoff::ACCEPTS_CONNECTIONS);
                    msg.push('\n');
                }
                if self.offers_upgraded.load(Ordering::Relaxed) {
                    msg.push_str(crate::handoff::ACCEPTS_UPGRADED);
                    msg.push('\n');
                }
                let delivered = channel.deliver(msg.as_bytes(), deadline).await;
                *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = Some(channel);
                (delivered, "the parent process")
            }
            Some(Parent::Socket(target)) => {
                tracing::info!("reporting READY=1 to the parent process, which hands over to us");
                let delivered = match target.connect() {
                    Ok(connected) => connected.deliver(msg.as_bytes(), deadline).await,
                    Err(e) => Err(e),
                };
                (delivered, "the parent process")
            }
            None => match &self.upstream {
                Some(target) => {
                    let delivered = match target.connect() {
                        Ok(connected) => connected.deliver(msg.as_bytes(), deadline).await,
                        Err(e) => Err(e),
                    };
                    (delivered, "the service manager")
                }
                None => (Ok(()), "nobody"),
            },
        };
        if let Err(e) = delivered {
            tracing::error!(error = %e, "sd_notify message could not be sent: READY=1 did not reach {to}");
        }
    }

    /// Says, with the `READY=1` to a parent on its channel, that this process takes the
    /// connections the parent has (`handoff`).
    pub(crate) fn offer_connections(&self) {
        self.offers_connections.store(true, Ordering::Relaxed);
    }

    /// Says, with the same `READY=1`, that this process also takes upgraded connections.
    pub(crate) fn offer_upgraded(&self) {
        self.offers_upgraded.store(true, Ordering::Relaxed);
    }

    /// Whether a parent waits for our `READY=1` on its channel.
    pub(crate) fn has_parent_channel(&self) -> bool {
        matches!(
            *self.parent.lock().unwrap_or_else(|p| p.into_inner()),
            Some(Parent::Channel(_))
        )
    }

    /// The channel to the parent, once `READY=1` went over it: the parent passes its
    /// connections on it. Once.
    pub(crate) fn take_parent_channel(&self) -> Option<Arc<Connected>> {
        self.channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Passes a message on to the service manager, best effort, as it is (already `KEY=value`
    /// lines): for the keeper, which speaks for its successors.
    pub(crate) fn relay_upstream(&self, msg: &str) {
        if let Some(t) = &self.upstream {
            send(t, msg);
        }
    }

    /// A connected socket to the service manager, for a message that must be delivered
    /// ([`Connected::deliver`]); `Ok(None)` if there is no manager.
    pub(crate) fn connect_upstream(&self) -> io::Result<Option<Connected>> {
        self.upstream.as_ref().map(Target::connect).transpose()
    }
}

impl Notifier {
    /// Removes what the service manager's fd store holds under `name` (`FDSTOREREMOVE=1`),
    /// best effort: before storing a new fd under the same name.
    #[cfg_attr(not(feature = "rustls"), allow(dead_code))]
    pub(crate) fn remove_stored(&self, name: &str) {
        if let Some(target) = &self.upstream {
            send(target, &format!("FDSTOREREMOVE=1\nFDNAME={name}\n"));
        }
    }

    /// Replaces what the fd store holds under `name` with `fd` (`FDSTOREREMOVE=1`, then
    /// `FDSTORE=1`), best effort; `what` says what it is, for the log.
    #[cfg_attr(not(feature = "rustls"), allow(dead_code))]
    pub(crate) fn replace_stored(&self, fd: BorrowedFd<'_>, name: &str, what: &str) {
        let Some(target) = &self.upstream else {
            return;
        };
        self.remove_stored(name);
        tracing::info!(name, "handing {what} to the service manager's fd store");
        send_with_fds(
            target,
            &format!("FDSTORE=1\nFDNAME={name}\n"),
            std::slice::from_ref(&fd),
        );
    }

    /// Hands `fds` to the service manager's fd store (`FDSTORE=1`, one message per fd so each
    /// keeps its own `FDNAME=`). Only the service manager is asked, never a parent.
    pub(crate) fn store_fds(&self, fds: &[(BorrowedFd<'_>, &str)]) {
        let Some(target) = &self.upstream else {
            return;
        };
        for (fd, name) in fds {
            let msg = format!("FDSTORE=1\nFDNAME={name}\n");
            tracing::info!(
                name,
                "handing the listener to the service manager's fd store"
            );
            send_with_fds(target, &msg, std::slice::from_ref(fd));
        }
    }
}

/// The watchdog interval asked of this process (`WATCHDOG_USEC`, for us if `WATCHDOG_PID` is
/// unset or ours). Malformed values are logged and disable the watchdog.
pub(crate) fn watchdog_usec(startup: &Startup) -> Option<u64> {
    match parse_watchdog(
        startup.watchdog_usec.as_deref(),
        startup.watchdog_pid.as_deref(),
        startup.pid,
    ) {
        Ok(usec) => usec,
        Err(e) => {
            tracing::error!("{e}; the watchdog is disabled");
            None
        }
    }
}

/// `Ok(None)`: no watchdog for us. `Ok(Some(usec))`: ping within `usec`.
pub(crate) fn parse_watchdog(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    our_pid: u32,
) -> Result<Option<u64>, Error> {
    let Some(raw) = usec else {
        return Ok(None);
    };
    let usec = decimal(raw)
        .filter(|&u| u > 0)
        .ok_or_else(|| Error::bad_var("WATCHDOG_USEC", raw, "microseconds: decimal digits, > 0"))?;
    if let Some(pid_raw) = pid {
        let pid = decimal(pid_raw).filter(|&p| p > 0).ok_or_else(|| {
            Error::bad_var("WATCHDOG_PID", pid_raw, "a process id: decimal digits")
        })?;
        if pid != u64::from(our_pid) {
            tracing::debug!(
                pid,
                "WATCHDOG_PID is another process: the watchdog is not ours"
            );
            return Ok(None);
        }
    }
    Ok(Some(usec))
}

fn decimal(raw: &OsStr) -> Option<u64> {
    raw.to_str()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
}

/// The least time a message that must be delivered is given, whatever the caller's deadline:
/// a manager that reads within this is not a manager that is gone.
pub(crate) const MIN_PATIENCE: Duration = Duration::from_secs(1);

/// `now + d`, saturated far in the future (a `Duration::MAX` timeout means "no limit").
fn deadline_after(d: Duration) -> Instant {
    crate::instant_after(Instant::now(), d)
}

/// The channel end the parent passed, if any and usable (close-on-exec, non-blocking).
fn take_channel(startup: &Startup) -> Option<Connected> {
    let fd = startup.take_channel()?;
    let owned = match sys::adopt_channel(fd) {
        Ok(owned) => owned,
        Err(problem) => {
            tracing::error!(
                fd,
                "{} fd {fd} {problem}; reporting READY=1 on NOTIFY_SOCKET instead",
                crate::startup::CHANNEL_VAR
            );
            return None;
        }
    };
    match Connected::new(owned) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "the channel to the parent process is unusable; reporting READY=1 on NOTIFY_SOCKET instead");
            None
        }
    }
}

/// A connected socket (datagram or seqpacket) registered with the runtime, for messages that
/// must be delivered.
#[derive(Debug)]
pub(crate) struct Connected {
    fd: AsyncFd<OwnedFd>,
}

impl Connected {
    /// Makes `fd` non-blocking and registers it. The fd must be a connected socket.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Connected> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        let fd = sys::register(fd, Interest::WRITABLE | Interest::READABLE).map_err(|(_, e)| e)?;
        Ok(Connected { fd })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// The registered socket, for messages with fds attached (`handoff`).
    pub(crate) fn async_fd(&self) -> &AsyncFd<OwnedFd> {
        &self.fd
    }

    /// Waits until the socket may have room for a message, then calls `send` once (which
    /// should send with [`send_now`], under whatever lock it needs). `Ok(None)`: there was no
    /// room after all (`send` returned `WouldBlock`); call again.
    pub(crate) async fn when_writable<R>(
        &self,
        send: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>,
    ) -> io::Result<Option<R>> {
        let mut ready = self.fd.writable().await?;
        match ready.try_io(|fd| send(fd.get_ref().as_fd())) {
            Ok(result) => result.map(Some),
            Err(_would_block) => Ok(None),
        }
    }

    /// Receives one message from the peer; 0 is EOF on a connected seqpacket socket (where
    /// nobody sends empty messages).
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::READABLE, |fd| {
                sys::recv_with_credentials(fd.as_fd(), buf).map(|(n, _)| n)
            })
            .await
    }

    /// Sends `msg`, waiting while the receiver's queue is full, until `deadline`.
    pub(crate) async fn deliver(&self, msg: &[u8], deadline: Instant) -> io::Result<()> {
        let started = Instant::now();
        // Bounded by the deadline: each turn waits for a wake-up from the receiver reading.
        loop {
            match tokio::time::timeout_at(deadline, self.when_writable(|fd| send_now(fd, msg)))
                .await
            {
                Ok(Ok(Some(_))) => return Ok(()),
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(queue_full(started.elapsed())),
            }
        }
    }
}

/// The error of a delivery that ran out of time.
pub(crate) fn queue_full(waited: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the receiver's queue stayed full for {:?} (it is not reading)",
            Duration::from_millis(waited.as_millis() as u64)
        ),
    )
}

/// One non-blocking send on a connected socket. `WouldBlock` when the receiver's queue (or our
/// send buffer) is full.
pub(crate) fn send_now(fd: BorrowedFd<'_>, msg: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(
        fd,
        msg,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?)
}

/// Pings the watchdog at half its interval until dropped. It runs as a task of the runtime
/// that serves, so a runtime that stops making progress stops the pings, and systemd notices.
pub(crate) fn spawn_watchdog(
    notifier: std::sync::Arc<Notifier>,
    usec: u64,
) -> tokio::task::JoinHandle<()> {
    let period = Duration::from_micros(usec / 2).max(Duration::from_millis(1));
    tracing::info!(?period, "watchdog enabled: pinging at half WATCHDOG_USEC");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            notifier.notify(&[NotifyState::Watchdog]);
        }
    })
}

/// One `KEY=value` line per state. A newline inside a value (an error text, a path) would start
/// a new assignment, so an error message could smuggle in `MAINPID=`: values are kept on their
/// line.
pub(crate) fn format_states(states: &[NotifyState<'_>]) -> String {
    let mut msg = String::new();
    for s in states {
        msg.push_str(&s.to_string().replace(['\n', '\r'], " "));
        msg.push('\n');
    }
    msg
}

fn send(target: &Target, msg: &str) {
    send_with_fds(target, msg, &[]);
}

/// Sends one datagram, with `fds` attached (`SCM_RIGHTS`) if any. Never blocks: a full queue
/// drops the message with a warning rather than stalling the server.
fn send_with_fds(target: &Target, msg: &str, fds: &[BorrowedFd<'_>]) {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        tracing::error!("too many fds for one sd_notify message");
        return;
    }
    let sent = rustix::net::sendmsg_addr(
        &target.socket,
        &target.addr,
        &[IoSlice::new(msg.as_bytes())],
        &mut control,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    );
    match sent {
        Ok(_) => tracing::trace!(to = ?target.name, msg, "sd_notify"),
        Err(e) => tracing::warn!(
            to = ?target.name,
            error = %e,
            message = msg.trim_end(),
            "sd_notify message could not be sent"
        ),
    }
}

impl Target {
    /// One datagram, without blocking, on the socket we have.
    fn try_send(&self, msg: &str) -> io::Result<()> {
        rustix::net::sendto(
            &self.socket,
            msg.as_bytes(),
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            &self.addr,
        )?;
        Ok(())
    }

    /// A new socket connected to this target, for a message that must be delivered.
    pub(crate) fn connect(&self) -> io::Result<Connected> {
        let fd = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::connect(&fd, &self.addr).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!(
                    "cannot connect to {:?}: {}",
                    self.name,
                    sys::describe_errno(&e.into())
                ),
            )
        })?;
        Connected::new(fd)
    }

    /// Parses a `NOTIFY_SOCKET` value: an absolute path, or `@name` for the abstract namespace.
    pub(crate) fn parse(value: &OsStr) -> Result<Target, Error> {
        const EXPECTED: &str =
            "an absolute path (/run/...) or an abstract socket name (@name) of at most 107 bytes";
        let bytes = value.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') if bytes.len() < 108 => SocketAddrUnix::new(value),
            Some(b'@') if bytes.len() > 1 => SocketAddrUnix::new_abstract_name(&bytes[1..]),
            _ => return Err(Error::bad_var("NOTIFY_SOCKET", value, EXPECTED)),
        }
        .map_err(|_| Error::bad_var("NOTIFY_SOCKET", value, EXPECTED))?;
        let socket = UnixDatagram::unbound()
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|e| Error::io("could not create the sd_notify socket", e))?;
        Ok(Target {
            name: value.to_owned(),
            addr,
            socket,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn notify_socket_parsing_never_panics(value in proptest::collection::vec(any::<u8>(), 0..200)) {
            let value = OsStr::from_bytes(&value);
            if let Ok(target) = Target::parse(value) {
                let first = value.as_bytes()[0];
                prop_assert!(first == b'/' || first == b'@');
                prop_assert_eq!(target.name(), value);
            }
        }

        #[test]
        fn watchdog_parsing_never_panics(
            usec in proptest::option::of("[0-9a-z -]{0,24}"),
            pid in proptest::option::of("[0-9a-z -]{0,12}"),
        ) {
            let got = parse_watchdog(usec.as_deref().map(OsStr::new), pid.as_deref().map(OsStr::new), 42);
            match got {
                Ok(Some(u)) => prop_assert!(u > 0),
                Ok(None) => {}
                Err(e) => prop_assert!(matches!(e.variable(), Some("WATCHDOG_USEC" | "WATCHDOG_PID"))),
            }
        }
    }

    #[test]
    fn watchdog_values() {
        let os = |s: &'static str| Some(OsStr::new(s));
        assert_eq!(parse_watchdog(None, None, 42).ok(), Some(None));
        assert_eq!(
            parse_watchdog(os("500000"), None, 42).ok(),
            Some(Some(500_000))
        );
        assert_eq!(
            parse_watchdog(os("500000"), os("42"), 42).ok(),
            Some(Some(500_000))
        );
        assert_eq!(parse_watchdog(os("500000"), os("41"), 42).ok(), Some(None));
        for (usec, pid, var) in [
            ("0", None, "WATCHDOG_USEC"),
            ("", None, "WATCHDOG_USEC"),
            ("1e6", None, "WATCHDOG_USEC"),
            ("-5", None, "WATCHDOG_USEC"),
            ("5", Some("x"), "WATCHDOG_PID"),
            ("5", Some(""), "WATCHDOG_PID"),
        ] {
            let err = parse_watchdog(os(usec), pid.map(OsStr::new), 42).expect_err(usec);
            assert_eq!(err.variable(), Some(var));
        }
    }

    #[test]
    fn malformed_notify_socket_is_named() {
        for bad in [
            "",
            "relative/path",
            "@",
            "vsock:2:1234",
            &format!("/{}", "x".repeat(200)),
        ] {
            let err = Target::parse(OsStr::new(bad)).expect_err(bad);
            assert_eq!(err.variable(), Some("NOTIFY_SOCKET"), "{bad:?}: {err}");
        }
        assert!(Target::parse(OsStr::new("/run/systemd/notify")).is_ok());
        assert!(Target::parse(OsStr::new("@handover/1")).is_ok());
    }
}
