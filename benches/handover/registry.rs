//! 8. Contention on the connection registry: a stand-in for a many-core machine.
//!
//! Every connection a server accepts is registered in the server's registry (so that a drain
//! can reach it, the cut can shut it down, and the count of open connections is known) and
//! deregistered when it ends. With a new connection per request, every request pays both, from
//! whichever worker thread accepted or ended it. On a many-core machine (the issue measured 16
//! cores: `Connection: close` throughput 0.87x plain) a registry behind one lock makes the
//! workers queue on it; this machine has too few cores to show that in throughput.
//!
//! So this measures the registry's data structure itself, with N threads each registering and
//! deregistering connections as fast as they can (a window of 64 live connections per thread),
//! and reports the CPU time each connection costs (the threads' own on-CPU time,
//! `CLOCK_THREAD_CPUTIME_ID`, so that oversubscribing the cores does not count, only the
//! work and the waiting on the lock): flat as N grows when connections do not contend, rising
//! when they do. The registry is the crate's private type, so it is modelled here with the same
//! parts it is made of today (`drain.rs`: `std::sync::Mutex<slab::Slab<Arc<_>>>`, and a
//! `tokio_util::task::TaskTracker` token per connection), next to a sharded model (one lock per
//! shard, shards picked by thread) as the reference of what a registry without a global lock
//! costs.
//!
//! Read the rows up to the machine's core count: beyond it the threads take turns on the
//! cores, fewer of them touch the lock at the same instant, and the cost per connection falls
//! back (on 2 cores: ×3.5 with 2 threads, ×1.6 with 16). A many-core server runs as many
//! workers as cores, all of them accepting and closing connections at once.

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use slab::Slab;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// Sizes.
pub(crate) struct Settings {
    /// Thread counts to measure.
    pub(crate) threads: Vec<usize>,
    /// Register + deregister pairs per thread.
    pub(crate) ops: u64,
}

/// One connection's entry: what the registry holds of it.
#[allow(dead_code)] // the fields stand for the real entry's size; nothing reads them
struct Entry {
    fd: i32,
    ctl: std::sync::atomic::AtomicU32,
}

/// A connection registry, as the benchmark drives it.
trait Registry: Send + Sync {
    type Key;
    fn register(&self, thread: usize) -> Self::Key;
    fn deregister(&self, key: Self::Key);
}

/// Today's shape: one lock around one slab, and a tracker token per connection.
struct Global {
    conns: Mutex<Slab<Arc<Entry>>>,
    tracker: TaskTracker,
}

impl Registry for Global {
    type Key = (usize, TaskTrackerToken);

    fn register(&self, _thread: usize) -> Self::Key {
        let token = self.tracker.token();
        let entry = Arc::new(Entry {
            fd: 0,
            ctl: Default::default(),
        });
        let key = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry);
        (key, token)
    }

    fn deregister(&self, (key, token): Self::Key) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_remove(key);
        drop(token);
    }
}

/// A lock on a cache line of its own.
#[repr(align(128))]
struct Shard(Mutex<Slab<Arc<Entry>>>);

/// The reference: one lock per shard, the shard picked by thread (as a worker would use its
/// own), and the same tracker token.
struct Sharded {
    shards: Vec<Shard>,
    tracker: TaskTracker,
}

impl Registry for Sharded {
    type Key = (usize, usize, TaskTrackerToken);

    fn register(&self, thread: usize) -> Self::Key {
        let token = self.tracker.token();
        let entry = Arc::new(Entry {
            fd: 0,
            ctl: Default::default(),
        });
        let shard = thread % self.shards.len();
        let key = self.shards[shard]
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry);
        (shard, key, token)
    }

    fn deregister(&self, (shard, key, token): Self::Key) {
        self.shards[shard]
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_remove(key);
        drop(token);
    }
}

/// On-CPU time of the calling thread, in ns (`CLOCK_THREAD_CPUTIME_ID`: exact, not rounded to
/// the scheduler's tick as `/proc` is).
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// What one run measured.
pub(crate) struct Run {
    /// On-CPU time per register + deregister pair, summed over the threads, in ns.
    pub(crate) cpu_ns_per_conn: f64,
    /// Pairs per second, all threads together (wall clock).
    pub(crate) per_second: f64,
}

/// `threads` threads, each doing `ops` register + deregister pairs on `registry`.
fn drive<R: Registry + 'static>(registry: Arc<R>, threads: usize, ops: u64) -> Result<Run, String> {
    const LIVE: usize = 64;
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (registry, start) = (Arc::clone(&registry), Arc::clone(&start));
            std::thread::spawn(move || {
                let mut live = std::collections::VecDeque::with_capacity(LIVE);
                start.wait();
                let cpu0 = thread_cpu_ns();
                for _ in 0..ops {
                    if live.len() == LIVE
                        && let Some(key) = live.pop_front()
                    {
                        registry.deregister(key);
                    }
                    live.push_back(registry.register(t));
                }
                for key in live.drain(..) {
                    registry.deregister(key);
                }
                thread_cpu_ns().saturating_sub(cpu0)
            })
        })
        .collect();
    let began = std::time::Instant::now();
    start.wait();
    let mut cpu = 0u64;
    for h in handles {
        cpu += h
            .join()
            .map_err(|_| "a registry thread panicked".to_string())?;
    }
    let elapsed = began.elapsed().max(Duration::from_nanos(1));
    let total = threads as u64 * ops;
    Ok(Run {
        cpu_ns_per_conn: cpu as f64 / total as f64,
        per_second: total as f64 / elapsed.as_secs_f64(),
    })
}

/// Per thread count: (today's shape, the sharded reference).
pub(crate) fn measure(settings: &Settings) -> Result<Vec<(usize, Run, Run)>, String> {
    let mut out = Vec::new();
    for &n in &settings.threads {
        let global = Arc::new(Global {
            conns: Mutex::new(Slab::new()),
            tracker: TaskTracker::new(),
        });
        let sharded = Arc::new(Sharded {
            shards: (0..n.max(1))
                .map(|_| Shard(Mutex::new(Slab::new())))
                .collect(),
            tracker: TaskTracker::new(),
        });
        // Alternating, warm first, so that neither always runs on a cold cache.
        drive(Arc::clone(&global), n, settings.ops / 10 + 1)?;
        let g = drive(global, n, settings.ops)?;
        let s = drive(sharded, n, settings.ops)?;
        out.push((n, g, s));
    }
    Ok(out)
}
