//! Turn Unix signals into lifecycle events: close or restart.
//!
//! The handlers are installed when serving starts and stay installed until serving returns,
//! so a signal that arrives during a restart or a drain is seen (and coalesced, or turned into
//! "force now") instead of killing the process with the default action.
//!
//! When the last server ends, the signals that had their default disposition before get its
//! effect back: a `SIGTERM` after `serve(..).await` returned ends the process, as it would
//! have before serving. (signal-hook cannot uninstall its handler; it emulates the default
//! action instead, through `register_conditional_default`, armed only while no server runs.)

use std::collections::BTreeSet;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

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
        let mut defaults = DEFAULTS.lock().unwrap_or_else(|p| p.into_inner());
        for &sig in &all {
            // Not as PID 1: the kernel ignores default-action signals sent to the init of a
            // PID namespace, and emulating the action (raise, then abort) would crash it. The
            // do-nothing handler left behind gives init its real default: ignored.
            if !crate::keeper::is_pid1()
                && !defaults.armed.contains(&sig)
                && crate::sys::has_default_disposition(sig)
            {
                // Registered once per process and signal, before our own handler exists: it
                // does nothing while a server runs (`no_server` is false), and the default
                // action otherwise.
                if signal_hook::flag::register_conditional_default(sig, Arc::clone(no_server()))
                    .is_ok()
                {
                    defaults.armed.insert(sig);
                }
            }
        }
        let signals = Signals::new(&all).map_err(|source| {
            Error::new(Inner::Signal {
                signal: all.first().copied().unwrap_or(0),
                source,
            })
        })?;
        defaults.servers += 1;
        no_server().store(false, std::sync::atomic::Ordering::SeqCst);
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
        let mut defaults = DEFAULTS.lock().unwrap_or_else(|p| p.into_inner());
        defaults.servers = defaults.servers.saturating_sub(1);
        if defaults.servers == 0 {
            no_server().store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Which signals have their default action emulated when no server runs, and how many
/// servers run.
#[derive(Default)]
struct Defaults {
    armed: BTreeSet<i32>,
    servers: usize,
}

static DEFAULTS: Mutex<Defaults> = Mutex::new(Defaults {
    armed: BTreeSet::new(),
    servers: 0,
});

/// True while no server runs: the emulated default actions are armed.
fn no_server() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(true)))
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
