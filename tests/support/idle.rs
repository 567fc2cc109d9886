//! Idle keep-alive HTTP/1.1 clients, the workload of issue 11: N clients, one connection each
//! (hyper's client connection, no pool), that idle between requests (some a random time, some
//! polling on a fixed period like a health checker) and never retry a request they sent.
//!
//! For every request it records the client-side local port of the connection it went out on,
//! the `x-pid` of the answer, and the outcome: answered, or failed (written, then EOF, reset or
//! no answer). A connection found closed by the server before a request was written on it is
//! replaced and the request goes out on the new one, as a pool would do silently; that is not a
//! retry (nothing was sent), but it is counted, as are connections the server ended with
//! `Connection: close`: with connections handed over (issue 11) there must be none of either.
//!
//! Bounded: requests per client, the whole run's time, each request's time. Runs on a runtime
//! of its own thread; [`IdleClients::stop`] (or dropping it) ends the run.
//!
//! Self-contained (std, tokio, hyper), so that a benchmark can include it with `#[path]`. Its
//! tests are in `idle_tests.rs`, run by `tests/handoff.rs`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use tokio::sync::watch;

/// What the workload does. [`IdleConfig::new`] gives issue 11's.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    pub clients: usize,
    /// The first `pollers` clients send every `poll_every` (at a random phase); the others
    /// idle a random time in `[0, max_idle)` before each request.
    pub pollers: usize,
    pub poll_every: Duration,
    pub max_idle: Duration,
    /// Requests per client, at most.
    pub max_requests: usize,
    /// The whole run, at most.
    pub max_time: Duration,
    /// A request not answered within this is a failure.
    pub request_timeout: Duration,
    pub path: String,
    /// Seed of the idle times and poll phases; printed in the report to replay a run
    /// (`HANDOVER_TEST_SEED=N`).
    pub seed: u64,
}

impl IdleConfig {
    /// `clients` clients, half polling every second, the others idling 0–3 s; at most 1000
    /// requests each and two minutes in all; `GET /`.
    pub fn new(clients: usize) -> IdleConfig {
        IdleConfig {
            clients,
            pollers: clients / 2,
            poll_every: Duration::from_secs(1),
            max_idle: Duration::from_secs(3),
            max_requests: 1000,
            max_time: Duration::from_secs(120),
            request_timeout: Duration::from_secs(10),
            path: "/".to_string(),
            seed: default_seed(),
        }
    }
}

fn default_seed() -> u64 {
    if let Some(seed) = std::env::var("HANDOVER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return seed;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    now ^ u64::from(std::process::id()).rotate_left(32)
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered `200`; `pid` from `x-pid` (0 if absent); whether it said `Connection: close`.
    Ok { pid: u32, connection_close: bool },
    /// Written, and no complete `200` answer: EOF, reset, timeout or another status.
    Failed(String),
}

/// One request a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub client: usize,
    /// The client-side local port of the connection it went out on.
    pub local_port: u16,
    /// When it was sent, from the start of the run.
    pub at: Duration,
    pub outcome: Outcome,
}

impl Sent {
    pub fn pid(&self) -> Option<u32> {
        match self.outcome {
            Outcome::Ok { pid, .. } => Some(pid),
            Outcome::Failed(_) => None,
        }
    }
}

/// What a run saw.
#[derive(Debug, Clone, Default)]
pub struct IdleReport {
    /// Every request sent, client by client, each client's in the order it sent them.
    pub requests: Vec<Sent>,
    /// Connections found closed by the server before a request was written on them, and
    /// replaced (a pool does this silently).
    pub found_closed: usize,
    /// Connections the server ended with `Connection: close` on an answer, and replaced.
    pub told_to_close: usize,
    /// Connections opened, in all (one per client when none was closed).
    pub opened: usize,
    /// Connections that could not be opened, and why (the request then was not sent).
    pub open_errors: Vec<String>,
    pub seed: u64,
    pub elapsed: Duration,
}

impl IdleReport {
    pub fn ok(&self) -> usize {
        self.requests
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Ok { .. }))
            .count()
    }

    pub fn failed(&self) -> Vec<&Sent> {
        self.requests
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .collect()
    }

    /// One client's requests, in the order it sent them.
    pub fn of(&self, client: usize) -> Vec<&Sent> {
        self.requests
            .iter()
            .filter(|r| r.client == client)
            .collect()
    }

    /// Connections the server closed, either way.
    pub fn closed_by_server(&self) -> usize {
        self.found_closed + self.told_to_close
    }

    /// What must hold for each of `clients` clients across restarts that hand connections
    /// over: one connection all along (the same client-side port), answered by each of `pids`
    /// in turn. One line per client that fails it.
    pub fn per_client_problems(&self, clients: usize, pids: &[u32]) -> Vec<String> {
        let mut problems = Vec::new();
        for client in 0..clients {
            let sent = self.of(client);
            let mut wrong = Vec::new();
            let ports: BTreeSet<u16> = sent.iter().map(|r| r.local_port).collect();
            if ports.len() != 1 {
                wrong.push(format!(
                    "{} connections (client-side ports {ports:?}), expected 1",
                    ports.len()
                ));
            }
            let mut answered_by: Vec<u32> = sent.iter().filter_map(|r| r.pid()).collect();
            answered_by.dedup();
            if answered_by != pids {
                wrong.push(format!(
                    "answered by {answered_by:?}, expected {pids:?} in turn"
                ));
            }
            if !wrong.is_empty() {
                problems.push(format!("client {client}: {}", wrong.join("; ")));
            }
        }
        problems
    }

    pub fn summary(&self) -> String {
        format!(
            "{} requests: {} ok, {} failed; connections: {} opened, {} found closed by the server, {} told to close, {} not opened; {:.1} s, seed {}",
            self.requests.len(),
            self.ok(),
            self.failed().len(),
            self.opened,
            self.found_closed,
            self.told_to_close,
            self.open_errors.len(),
            self.elapsed.as_secs_f64(),
            self.seed,
        )
    }
}

/// Per-client progress, shared with the test's thread.
#[derive(Debug, Default)]
struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct ProgressState {
    /// The pids that answered each client.
    answered: Vec<BTreeSet<u32>>,
    /// The last pid that answered each client.
    last: Vec<Option<u32>>,
    /// Clients whose run is over (bounds reached, or stopped).
    finished: Vec<bool>,
}

impl Progress {
    fn new(clients: usize) -> Progress {
        Progress {
            state: Mutex::new(ProgressState {
                answered: vec![BTreeSet::new(); clients],
                last: vec![None; clients],
                finished: vec![false; clients],
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Waits until `done` holds; `Err` with `why`'s text at the deadline or as soon as
    /// `hopeless` holds.
    fn wait(
        &self,
        timeout: Duration,
        done: impl Fn(&ProgressState) -> bool,
        hopeless: impl Fn(&ProgressState) -> bool,
        why: impl Fn(&ProgressState) -> String,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if done(&state) {
                return Ok(());
            }
            let now = Instant::now();
            if hopeless(&state) || now >= deadline {
                return Err(why(&state));
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A running workload.
#[derive(Debug)]
pub struct IdleClients {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<IdleReport>>,
    progress: Arc<Progress>,
}

impl IdleClients {
    /// Starts `config.clients` clients against `addr` (typically a proxy's).
    pub fn start(addr: SocketAddr, config: IdleConfig) -> IdleClients {
        let (stop, stopped) = watch::channel(false);
        let progress = Arc::new(Progress::new(config.clients));
        let shared = Arc::clone(&progress);
        let thread = std::thread::Builder::new()
            .name("idle clients".to_string())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("idle clients runtime")
                    .block_on(run(addr, Arc::new(config), stopped, shared))
            })
            .expect("spawn the idle clients thread");
        IdleClients {
            stop,
            thread: Some(thread),
            progress,
        }
    }

    /// Waits until every client has had an answer from `pid`. `Err` names the clients that
    /// have not (and who answered them last) at the deadline, or as soon as one of them can
    /// no longer get one (its run is over).
    pub fn wait_all_answered_by(&self, pid: u32, timeout: Duration) -> Result<(), String> {
        self.progress.wait(
            timeout,
            |s| s.answered.iter().all(|a| a.contains(&pid)),
            |s| {
                s.answered
                    .iter()
                    .zip(&s.finished)
                    .any(|(a, f)| *f && !a.contains(&pid))
            },
            |s| {
                let missing: Vec<String> = (0..s.answered.len())
                    .filter(|&c| !s.answered[c].contains(&pid))
                    .map(|c| {
                        format!(
                            "client {c} (last answered by {:?}{})",
                            s.last[c],
                            if s.finished[c] { ", finished" } else { "" }
                        )
                    })
                    .collect();
                format!(
                    "{} of {} clients not answered by pid {pid} within {timeout:?}: {}",
                    missing.len(),
                    s.answered.len(),
                    missing.join(", ")
                )
            },
        )
    }

    /// Waits until every client's run is over by its bounds (requests or time).
    pub fn wait_finished(&self, timeout: Duration) -> Result<(), String> {
        self.progress.wait(
            timeout,
            |s| s.finished.iter().all(|f| *f),
            |_| false,
            |s| {
                let running = s.finished.iter().filter(|f| !**f).count();
                format!("{running} client(s) still running after {timeout:?}")
            },
        )
    }

    /// Ends the run: idle clients stop at once, a request in flight gets its answer (or its
    /// timeout) first. Returns what the run saw.
    pub fn stop(mut self) -> IdleReport {
        self.stop.send_replace(true);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(report)) => report,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => IdleReport::default(),
        }
    }
}

impl Drop for IdleClients {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How a client idles between requests.
#[derive(Debug, Clone, Copy)]
enum Idle {
    /// A random time in `[0, max)`.
    Random(Duration),
    /// Every period, from a random phase.
    Poll(Duration),
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientReport {
    requests: Vec<Sent>,
    found_closed: usize,
    told_to_close: usize,
    opened: usize,
    open_errors: Vec<String>,
}

async fn run(
    addr: SocketAddr,
    config: Arc<IdleConfig>,
    stopped: watch::Receiver<bool>,
    progress: Arc<Progress>,
) -> IdleReport {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + config.max_time;
    let mut seeds = SplitMix(config.seed);
    let clients: Vec<_> = (0..config.clients)
        .map(|i| {
            let idle = if i < config.pollers {
                Idle::Poll(config.poll_every)
            } else {
                Idle::Random(config.max_idle)
            };
            let client = Client {
                index: i,
                addr,
                idle,
                rng: SplitMix(seeds.next()),
                config: Arc::clone(&config),
                start,
                deadline,
                conn: None,
                report: ClientReport::default(),
            };
            tokio::spawn(client.run(stopped.clone(), Arc::clone(&progress)))
        })
        .collect();
    let mut total = IdleReport {
        seed: config.seed,
        ..IdleReport::default()
    };
    for client in clients {
        match client.await {
            Ok(r) => {
                total.requests.extend(r.requests);
                total.found_closed += r.found_closed;
                total.told_to_close += r.told_to_close;
                total.opened += r.opened;
                total.open_errors.extend(r.open_errors);
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// An open connection of a client.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    local_port: u16,
}

struct Client {
    index: usize,
    addr: SocketAddr,
    idle: Idle,
    rng: SplitMix,
    config: Arc<IdleConfig>,
    start: Instant,
    deadline: tokio::time::Instant,
    conn: Option<Conn>,
    report: ClientReport,
}

/// How one attempt to send went.
enum Attempt {
    Answered {
        pid: u32,
        connection_close: bool,
    },
    /// hyper gave the request back: the connection closed before it was written.
    NotWritten,
    Failed(String),
}

impl Client {
    async fn run(
        mut self,
        mut stopped: watch::Receiver<bool>,
        progress: Arc<Progress>,
    ) -> ClientReport {
        let mut next_poll = match self.idle {
            Idle::Poll(period) => tokio::time::Instant::now() + self.rng.below(period),
            Idle::Random(_) => tokio::time::Instant::now(),
        };
        for _ in 0..self.config.max_requests {
            let wake = match self.idle {
                Idle::Random(max) => tokio::time::Instant::now() + self.rng.below(max),
                Idle::Poll(period) => {
                    // A poller that fell behind sends at once and keeps its phase.
                    let wake = next_poll;
                    next_poll += period;
                    wake
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(wake.min(self.deadline)) => {}
                _ = stopped.wait_for(|stop| *stop) => break,
            }
            if *stopped.borrow() || tokio::time::Instant::now() >= self.deadline {
                break;
            }
            let Some(sent) = self.request().await else {
                continue;
            };
            if let Some(pid) = sent.pid() {
                progress.update(|s| {
                    s.answered[self.index].insert(pid);
                    s.last[self.index] = Some(pid);
                });
            }
            self.report.requests.push(sent);
        }
        // The connection closes as its sender drops (hyper's connection task then ends).
        self.conn = None;
        progress.update(|s| s.finished[self.index] = true);
        self.report
    }

    /// Sends one request, on the open connection if the server did not close it, else on a
    /// new one. `None` if no connection could be opened (nothing was sent).
    async fn request(&mut self) -> Option<Sent> {
        // A request hyper gave back was not written: sending it on a new connection is what a
        // pool does, not a retry. Bounded, for a server that closes every connection at once.
        for _ in 0..3 {
            if let Some(conn) = &mut self.conn {
                let ready = tokio::time::timeout(self.config.request_timeout, conn.sender.ready());
                if !matches!(ready.await, Ok(Ok(()))) {
                    self.report.found_closed += 1;
                    self.conn = None;
                }
            }
            if self.conn.is_none() {
                match open(self.addr, self.config.request_timeout).await {
                    Ok(conn) => {
                        self.report.opened += 1;
                        self.conn = Some(conn);
                    }
                    Err(e) => {
                        self.report.open_errors.push(e);
                        return None;
                    }
                }
            }
            let conn = self.conn.as_mut()?;
            let local_port = conn.local_port;
            let at = self.start.elapsed();
            let attempt = tokio::time::timeout(
                self.config.request_timeout,
                send(&mut conn.sender, self.addr, &self.config.path),
            )
            .await
            .unwrap_or_else(|_| {
                Attempt::Failed(format!(
                    "no answer within {:?}",
                    self.config.request_timeout
                ))
            });
            let outcome = match attempt {
                Attempt::NotWritten => {
                    self.report.found_closed += 1;
                    self.conn = None;
                    continue;
                }
                Attempt::Answered {
                    pid,
                    connection_close,
                } => {
                    if connection_close {
                        self.report.told_to_close += 1;
                        self.conn = None;
                    }
                    Outcome::Ok {
                        pid,
                        connection_close,
                    }
                }
                Attempt::Failed(why) => {
                    // Never sent again; the next request goes out on a new connection.
                    self.conn = None;
                    Outcome::Failed(why)
                }
            };
            return Some(Sent {
                client: self.index,
                local_port,
                at,
                outcome,
            });
        }
        Some(Sent {
            client: self.index,
            local_port: 0,
            at: self.start.elapsed(),
            outcome: Outcome::Failed(
                "never written: three connections in a row closed before it went out".into(),
            ),
        })
    }
}

async fn open(addr: SocketAddr, timeout: Duration) -> Result<Conn, String> {
    let connect = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let local_port = stream
            .local_addr()
            .map_err(|e| format!("local address of a connection to {addr}: {e}"))?
            .port();
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP/1 handshake with {addr}: {e}"))?;
        // Ends when the connection closes or its sender is dropped.
        tokio::spawn(connection);
        Ok(Conn { sender, local_port })
    };
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| Err(format!("connect to {addr}: not within {timeout:?}")))
}

async fn send(sender: &mut SendRequest<Empty<Bytes>>, addr: SocketAddr, path: &str) -> Attempt {
    let request = match hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
    {
        Ok(r) => r,
        Err(e) => return Attempt::Failed(format!("building GET {path}: {e}")),
    };
    let response = match sender.try_send_request(request).await {
        Ok(r) => r,
        Err(e) if e.message().is_some() => return Attempt::NotWritten,
        Err(e) => return Attempt::Failed(chain(e.error())),
    };
    let status = response.status();
    let pid = response
        .headers()
        .get("x-pid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let connection_close = response
        .headers()
        .get(hyper::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    if let Err(e) = response.into_body().collect().await {
        return Attempt::Failed(format!("body from pid {pid}: {}", chain(&e)));
    }
    if status != hyper::StatusCode::OK {
        return Attempt::Failed(format!("status {status} from pid {pid}"));
    }
    Attempt::Answered {
        pid,
        connection_close,
    }
}

/// An error with its sources: hyper's own text ("connection closed before message completed")
/// and the I/O error under it ("Connection reset by peer").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// SplitMix64: small, seedable, good enough for idle times (no dependency for it).
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A duration in `[0, max)` (zero if `max` is).
    fn below(&mut self, max: Duration) -> Duration {
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next() % nanos)
    }
}
