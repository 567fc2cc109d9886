//! Talk to the service manager with `sd_notify(3)` datagrams.
//!
//! Messages are formatted with the `sd-notify` crate's [`NotifyState`]; they are sent here
//! rather than with `sd_notify::notify` because that function re-reads `NOTIFY_SOCKET` from the
//! environment on every call (handover removes it at start-up), cannot reach an abstract
//! (`@name`) socket, and blocks when the manager's queue is full.
//!
//! Where the messages go:
//! - normally, to `NOTIFY_SOCKET` (systemd), or nowhere when it is unset;
//! - in a process started by a handover restart, `NOTIFY_SOCKET` is the *parent's* hand-off
//!   socket and `HANDOVER_NOTIFY_SOCKET` the service manager's. Everything up to and including
//!   `READY=1` goes to the parent (which then tells the manager `MAINPID=` + `READY=1`, since
//!   only the main pid may speak under `NotifyAccess=main`); everything after goes to the
//!   manager, so the new process can do its own next restart.

use std::ffi::{OsStr, OsString};
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix};

pub(crate) use sd_notify::NotifyState;

use crate::error::Error;
use crate::startup::Startup;

/// Where notifications go, and whether the hand-off to our parent is still pending.
#[derive(Debug)]
pub(crate) struct Notifier {
    /// The service manager's socket (systemd's `NOTIFY_SOCKET`), if any.
    upstream: Option<Target>,
    /// The parent's hand-off socket, until `READY=1` has been sent there.
    parent: Mutex<Option<Target>>,
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
                parent: Mutex::new(open("NOTIFY_SOCKET", &startup.notify_socket)),
            },
            None => Notifier {
                upstream: open("NOTIFY_SOCKET", &startup.notify_socket),
                parent: Mutex::new(None),
            },
        }
    }

    /// The service manager's socket address as given, to pass on to a restart child.
    pub(crate) fn upstream_name(&self) -> Option<&OsStr> {
        self.upstream.as_ref().map(Target::name)
    }

    /// Sends `states` to whoever should hear them now. Failures are logged, never fatal.
    pub(crate) fn notify(&self, states: &[NotifyState<'_>]) {
        let msg = format_states(states);
        let parent = self.parent.lock().unwrap_or_else(|p| p.into_inner());
        let target = match parent.as_ref() {
            Some(p) => Some(p),
            None => self.upstream.as_ref(),
        };
        if let Some(target) = target {
            send(target, &msg);
        }
    }

    /// Reports readiness: to the parent if a hand-off is pending (and from then on to the
    /// service manager), otherwise to the service manager.
    pub(crate) fn ready(&self, status: &str) {
        let states = [NotifyState::Ready, NotifyState::Status(status)];
        let mut parent = self.parent.lock().unwrap_or_else(|p| p.into_inner());
        match parent.take() {
            Some(p) => {
                tracing::info!("reporting READY=1 to the parent process, which hands over to us");
                send(&p, &format_states(&states));
            }
            None => {
                drop(parent);
                self.notify(&states);
            }
        }
    }

    /// Sends to the service manager only, never to a parent: for what the *main* process says
    /// on behalf of a child (`MAINPID=`).
    pub(crate) fn notify_upstream(&self, states: &[NotifyState<'_>]) {
        if let Some(t) = &self.upstream {
            send(t, &format_states(states));
        }
    }
}

impl Notifier {
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
