//! Why a new process failed before `READY=1`, told to the process that started it.
//!
//! A process started by a handover restart that exits before it is ready (an `Err` from `main`,
//! a panic, listeners it could not adopt, a certificate file it could not load) would leave its
//! parent with nothing but an exit status: the reason is in its stderr alone. So, until it has
//! reported `READY=1`, it sends a short reason over the private channel to its parent, a message
//! of its own kind:
//!
//! ```text
//! X_HANDOVER_FAILED\n<reason, UTF-8, at most MAX_REASON bytes>
//! ```
//!
//! The parent keeps the last one it read and puts it in the [`crate::RestartError`], the
//! `STATUS=` line and the log. What is sent is only what the reason's `Display` says (an error
//! message, a panic's message and location), never the environment or the arguments; it is
//! cut to [`MAX_REASON`] bytes.
//!
//! The channel's fd is owned by the notifier; this module keeps a duplicate of its own
//! (close-on-exec), taken at start-up and closed once `READY=1` is sent, so that a reason can
//! still go out after a failed start dropped the notifier (and with it the original).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, Once};

use rustix::net::{RecvAncillaryBuffer, RecvFlags, SendFlags};

/// The first line of a failure message on the channel.
pub(crate) const FAILED: &[u8] = b"X_HANDOVER_FAILED\n";

/// The most bytes of reason sent (and accepted): a reason is a sentence or two, not a log.
pub(crate) const MAX_REASON: usize = 1024;

/// Our duplicate of the channel to the parent, until `READY=1` has been sent.
static CHANNEL: Mutex<Option<OwnedFd>> = Mutex::new(None);

static PANIC_HOOK: Once = Once::new();

/// Called once at start-up (from the start-up capture) in a process started by a handover
/// restart: keeps a duplicate of the channel at `fd`, and installs a panic hook that reports a
/// panic before `READY=1` (then calls the hook that was installed before).
pub(crate) fn arm(fd: RawFd) {
    match crate::sys::dup_raw(fd) {
        Ok(dup) => *lock() = Some(dup),
        Err(e) => {
            tracing::debug!(fd, error = %e, "cannot keep a copy of the channel to the parent");
            return;
        }
    }
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(a panic without a message)");
            match info.location() {
                Some(at) => send(&format_args!("panicked at {at}: {message}")),
                None => send(&format_args!("panicked: {message}")),
            }
            previous(info);
        }));
    });
}

/// Tells the process that started this one by a handover restart why this one is about to exit
/// before it is ready; does nothing in any other process, or once this one has reported
/// `READY=1`.
///
/// The old process puts `reason` (its `Display`, on one line, cut to 1 KiB) in the restart's
/// [`crate::RestartError::reason`], its `STATUS=` and its log. handover already does this for
/// its own errors before `READY=1` (from [`crate::Listeners::from_env`], from the server's
/// start, from `TlsCertificate::load_pem`) and for a panic (a panic hook, installed at
/// the first handover call in a restarted process, then calling the previous hook): call it for
/// the application's own errors, such as a configuration file that does not parse. Never
/// blocks; the last reason sent before the exit is the one reported. Keep secrets out of it.
///
/// # Example
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     let config = match std::fs::read_to_string("/etc/myapp/config.toml") {
///         Ok(c) => c,
///         Err(e) => {
///             let e = format!("cannot read /etc/myapp/config.toml: {e}");
///             handover::report_start_failure(&e);
///             eprintln!("{e}");
///             return std::process::ExitCode::FAILURE;
///         }
///     };
///     # let _ = config;
///     // ... serve
///     std::process::ExitCode::SUCCESS
/// }
/// ```
pub fn report_start_failure(reason: &dyn fmt::Display) {
    report(reason);
}

/// `READY=1` went out: the parent no longer waits for a reason. Closes our duplicate.
pub(crate) fn disarm() {
    lock().take();
}

/// Sends `reason` to the parent if this process was started by a handover restart and has not
/// reported `READY=1` yet; does nothing otherwise. Never blocks, never fails.
pub(crate) fn report(reason: &dyn fmt::Display) {
    // Makes sure the start-up capture (which arms the channel) happened.
    let _ = crate::startup::get();
    send(reason);
}

fn send(reason: &dyn fmt::Display) {
    // `try_lock`: a panic hook must never wait (a panic while the lock is held, on this thread,
    // would deadlock).
    let Ok(guard) = CHANNEL.try_lock() else {
        return;
    };
    let Some(fd) = guard.as_ref() else {
        return;
    };
    let mut msg = FAILED.to_vec();
    msg.extend_from_slice(bounded(&reason.to_string()).as_bytes());
    match rustix::net::send(fd, &msg, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "could not tell the parent why this process fails"),
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<OwnedFd>> {
    CHANNEL.lock().unwrap_or_else(|p| p.into_inner())
}

/// At most [`MAX_REASON`] bytes (cut at a character boundary, with `…`), control characters
/// (newlines among them) as spaces.
pub(crate) fn bounded(text: &str) -> String {
    let clean: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= MAX_REASON {
        return clean;
    }
    let ellipsis = '…';
    let mut end = MAX_REASON - ellipsis.len_utf8();
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = clean[..end].to_string();
    cut.push(ellipsis);
    cut
}

/// The reason in a message from the child, if it is a failure message.
pub(crate) fn parse(msg: &[u8]) -> Option<String> {
    let rest = msg.strip_prefix(FAILED)?;
    let rest = &rest[..rest.len().min(MAX_REASON * 4)];
    Some(bounded(&String::from_utf8_lossy(rest)))
}

/// The last failure reason among the messages still queued on `channel` (the child has exited:
/// everything it sent is there by now), without waiting. Other messages are dropped: a child
/// that exited is not handed over to.
pub(crate) fn drain(channel: BorrowedFd<'_>) -> Option<String> {
    let mut buf = vec![0u8; MAX_REASON * 4 + FAILED.len()];
    let mut reason = None;
    // Bounded: the queue of a socket pair holds a bounded number of messages, and the child is
    // gone, so no more come.
    for _ in 0..1024 {
        match recv(channel, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(r) = parse(&buf[..n]) {
                    reason = Some(r);
                }
            }
        }
    }
    reason
}

fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // Room for fds a message might carry: they are closed with the buffer.
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        fd.as_fd(),
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    // Fds a message carried are closed as they are dropped.
    control.drain().for_each(drop);
    Ok(msg.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever the child sends: at most MAX_REASON bytes, one line, never a panic.
        #[test]
        fn any_reason_is_bounded_and_on_one_line(text in ".{0,1500}", raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            let cut = bounded(&text);
            proptest::prop_assert!(cut.len() <= MAX_REASON);
            proptest::prop_assert!(!cut.contains('\n'));
            let mut msg = FAILED.to_vec();
            msg.extend_from_slice(&raw);
            let parsed = parse(&msg).expect("a failure message");
            proptest::prop_assert!(parsed.len() <= MAX_REASON && !parsed.contains('\n'));
        }
    }

    #[test]
    fn a_reason_is_bounded_on_one_line_and_parsed_back() {
        let long = "é".repeat(MAX_REASON);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_REASON, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(bounded("a\nb\r\nc\t"), "a b  c");
        let mut msg = FAILED.to_vec();
        msg.extend_from_slice(b"TLS certificate file /x: not PEM");
        assert_eq!(
            parse(&msg).as_deref(),
            Some("TLS certificate file /x: not PEM")
        );
        assert_eq!(parse(b"READY=1\nSTATUS=x\n"), None);
    }

    #[test]
    fn the_last_queued_reason_is_read_after_the_child_is_gone() {
        let (parent, child) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair");
        for m in [
            &b"STATUS=starting\n"[..],
            b"X_HANDOVER_FAILED\nfirst",
            b"X_HANDOVER_FAILED\nsecond",
        ] {
            rustix::net::send(&child, m, SendFlags::empty()).expect("send");
        }
        drop(child);
        assert_eq!(drain(parent.as_fd()).as_deref(), Some("second"));
        assert_eq!(drain(parent.as_fd()), None);
    }
}
