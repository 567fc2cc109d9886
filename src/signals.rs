//! Turn Unix signals into lifecycle events: close or restart.
//!
//! The handlers are installed when serving starts and stay installed until serving returns,
//! so a signal that arrives during a restart or a drain is seen (and coalesced, or turned into
//! "force now") instead of killing the process with the default action.

use std::future::poll_fn;
use std::pin::Pin;

use futures_core::Stream;
use signal_hook_tokio::Signals;

use crate::error::{Error, Inner};

/// What a received signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Close(i32),
    Restart(i32),
}

pub(crate) struct SignalEvents {
    signals: Signals,
    close: Vec<i32>,
}

impl std::fmt::Debug for SignalEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalEvents")
            .field("close", &self.close)
            .finish_non_exhaustive()
    }
}

impl SignalEvents {
    /// Installs handlers for the close and restart signals. A signal in both lists closes.
    pub(crate) fn new(close: &[i32], restart: &[i32]) -> Result<SignalEvents, Error> {
        let mut all: Vec<i32> = close.iter().chain(restart).copied().collect();
        all.sort_unstable();
        all.dedup();
        // Register one by one to name the signal that failed (e.g. SIGKILL is forbidden).
        for &sig in &all {
            if signal_hook::consts::FORBIDDEN.contains(&sig) {
                return Err(Error::new(Inner::Signal {
                    signal: sig,
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "this signal cannot be handled (SIGKILL, SIGSTOP, SIGILL, SIGFPE and SIGSEGV are reserved)",
                    ),
                }));
            }
        }
        let signals = Signals::new(&all).map_err(|source| {
            Error::new(Inner::Signal {
                signal: all.first().copied().unwrap_or(0),
                source,
            })
        })?;
        Ok(SignalEvents {
            signals,
            close: close.to_vec(),
        })
    }

    /// The next signal, as an event. Cancel safe: a signal is never lost by dropping this
    /// future (it stays queued in the stream).
    pub(crate) async fn next(&mut self) -> Option<Event> {
        let sig = poll_fn(|cx| Pin::new(&mut self.signals).poll_next(cx)).await?;
        Some(if self.close.contains(&sig) {
            Event::Close(sig)
        } else {
            Event::Restart(sig)
        })
    }
}

impl Drop for SignalEvents {
    fn drop(&mut self) {
        self.signals.handle().close();
    }
}

/// The conventional name of a signal number, for logs.
pub(crate) fn name(sig: i32) -> String {
    let known = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGWINCH, "SIGWINCH"),
    ];
    known
        .iter()
        .find(|(n, _)| *n == sig)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("signal {sig}"))
}
