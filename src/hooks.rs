//! Shutdown hooks: run one after another, in registration order, each awaited, under the
//! shutdown deadline.
//!
//! A hook that panics is logged and the next one runs. A hook still running at the deadline is
//! abandoned (logged) and the hooks after it are skipped: the deadline bounds the whole
//! shutdown, so that `systemctl stop` is never held past `TimeoutStopSec` by a hook.
//!
//! Synchronous hooks run on a thread of their own, not on the runtime: a hook that blocks for
//! ever must neither stall the runtime nor keep the process from exiting.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

pub(crate) enum Hook {
    Sync(Box<dyn FnOnce() + Send + 'static>),
    Async(Box<dyn FnOnce() -> BoxFuture + Send + 'static>),
}

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Sync(_) => "Hook::Sync",
            Hook::Async(_) => "Hook::Async",
        })
    }
}

impl Hook {
    pub(crate) fn sync(f: impl FnOnce() + Send + 'static) -> Hook {
        Hook::Sync(Box::new(f))
    }

    pub(crate) fn future<F, Fut>(f: F) -> Hook
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Hook::Async(Box::new(move || Box::pin(f())))
    }
}

/// How the hooks went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HooksReport {
    /// Hooks that ran to completion.
    pub completed: usize,
    /// Hooks that panicked.
    pub panicked: usize,
    /// Hooks abandoned at the deadline (or by a forced shutdown).
    pub abandoned: usize,
    /// Hooks not started because the deadline had passed.
    pub skipped: usize,
}

enum Outcome {
    Done,
    Panicked(String),
}

/// Runs `hooks` in order. Returns early (abandoning the running hook) at `deadline` or when
/// `force` is cancelled.
pub(crate) async fn run(
    hooks: Vec<Hook>,
    deadline: Instant,
    force: &CancellationToken,
) -> HooksReport {
    let total = hooks.len();
    let mut report = HooksReport::default();
    for (index, hook) in hooks.into_iter().enumerate() {
        let position = index + 1;
        if Instant::now() >= deadline || force.is_cancelled() {
            report.skipped = total - index;
            tracing::warn!(
                skipped = report.skipped,
                "shutdown deadline passed: remaining shutdown hooks are skipped"
            );
            break;
        }
        tracing::info!(hook = position, of = total, "shutdown hook started");
        let mut running = start(hook, position);
        tokio::select! {
            outcome = &mut running => match outcome {
                Outcome::Done => {
                    report.completed += 1;
                    tracing::info!(hook = position, of = total, "shutdown hook finished");
                }
                Outcome::Panicked(msg) => {
                    report.panicked += 1;
                    tracing::error!(hook = position, panic = %msg, "shutdown hook panicked; running the next one");
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                report.abandoned += 1;
                report.skipped = total - position;
                tracing::error!(hook = position, skipped = report.skipped, "shutdown hook still running at the shutdown deadline; abandoned");
                break;
            }
            () = force.cancelled() => {
                report.abandoned += 1;
                report.skipped = total - position;
                tracing::warn!(hook = position, "forced shutdown: shutdown hook abandoned");
                break;
            }
        }
    }
    report
}

/// Starts a hook off the current task and returns a future of its outcome. Dropping the
/// future abandons the hook: an async hook is aborted, a sync one is left to finish on its own
/// thread (a thread cannot be stopped from outside).
fn start(hook: Hook, position: usize) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
    match hook {
        Hook::Sync(f) => {
            let (tx, rx) = oneshot::channel();
            // The hook may use tokio (Handle::current(), block_on a client call): give its
            // thread the serving runtime's context.
            let runtime = tokio::runtime::Handle::current();
            let spawned = std::thread::Builder::new()
                .name(format!("handover-hook-{position}"))
                .spawn(move || {
                    let _context = runtime.enter();
                    let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(f)));
                });
            Box::pin(async move {
                match spawned {
                    Err(e) => Outcome::Panicked(format!("could not start a thread: {e}")),
                    Ok(_) => match rx.await {
                        Ok(result) => outcome(result),
                        Err(_) => {
                            Outcome::Panicked("the hook thread ended without a result".into())
                        }
                    },
                }
            })
        }
        Hook::Async(f) => {
            // `f` is called inside the task, so a panic while creating the future is caught too.
            let handle =
                tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move { f().await }));
            Box::pin(async move {
                match handle.await {
                    Ok(()) => Outcome::Done,
                    Err(e) if e.is_panic() => outcome(Err(e.into_panic())),
                    Err(e) => Outcome::Panicked(e.to_string()),
                }
            })
        }
    }
}

fn outcome(result: std::thread::Result<()>) -> Outcome {
    match result {
        Ok(()) => Outcome::Done,
        Err(payload) => Outcome::Panicked(
            payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string panic payload)".to_string()),
        ),
    }
}
