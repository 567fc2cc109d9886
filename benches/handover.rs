//! Benchmarks of `handover` (the `hello` example) against a plain hyper server (the `plain`
//! example: same handler, no handover), each number next to its reference from the same run.
//!
//! Run with `cargo bench --bench handover`; `HANDOVER_BENCH_QUICK=1` for a smoke run of a few
//! seconds (`tests/bench_smoke.rs` runs it so, in the test profile). Both examples are built
//! with escargot in the bench's profile (release, under `cargo bench`) and run as processes;
//! all traffic is over loopback. What is measured:
//!
//! 1. **Instructions per request** (the headline: repeatable to about 1 %, unlike wall-clock
//!    time on a shared machine): each server under `valgrind --tool=callgrind`, the marginal cost of
//!    `HANDOVER_BENCH_CG_REQUESTS` requests after `HANDOVER_BENCH_CG_BASE` (callgrind dumps
//!    between the phases, so start-up and shutdown cancel out; see `handover/instr.rs`), for
//!    HTTP/1.1 keep-alive, HTTP/2 (prior knowledge, several streams per connection) and a new
//!    connection per request (`Connection: close`). Ratio plain/hello (target: ≥ 0.97 for
//!    HTTP/1.1 keep-alive). Valgrind is installed with apt-get if missing and we are root;
//!    otherwise, and in quick mode without valgrind, the scenario prints `SKIPPED:` and why.
//! 2. **Throughput**: requests/s of `hello` and `plain` under the same HTTP/1.1 keep-alive
//!    load, in interleaved pairs of short runs (which server goes first alternates), the
//!    hello/plain ratio taken within each pair: median and spread of those ratios (target:
//!    ≥ 0.97). Also the server CPU time per request. The same with a new connection per
//!    request (`2c.`: each request says `Connection: close`, the client reconnects): what a
//!    new connection costs (accept, registration, close) on top of the request (target ≥ 0.97;
//!    the issue measured 0.87 on 16 cores).
//! 3. **Restarts under load**: failed requests over N restarts (SIGUSR1, wait for the
//!    `MAINPID=`+`READY=1` datagram, wait for the old process to exit, next) under keep-alive
//!    load, with the instant handler and with `/?sleep_ms=200` (target: 0 failed).
//! 4. **Restart latency**: SIGUSR1 → `MAINPID`/`READY=1` received, against the time a fresh
//!    `hello` takes from spawn to `READY=1` in the same conditions (target: within process
//!    start + 20 ms): idle, and under load (a fresh `hello` on another port is started and
//!    stopped right before each restart); and from the last connection to the old process seen
//!    closed to that process's exit.
//! 5. **Idle shutdown**: SIGTERM → exit, `hello` and `plain`.
//! 6. **Drain at scale**: RSS per idle keep-alive connection with 10,000 of them (target: less
//!    than 1 KiB more than `plain`), then SIGTERM → exit of `hello` (target: < 250 ms).
//! 7. **Connection hand-off** (issue 11): keep-alive clients that idle between requests and
//!    never retry (`tests/support/idle.rs`), over a loopback proxy that delays bytes and closes
//!    by 15 ms each way (`tests/support/proxy.rs`), across restarts, with the hand-off and
//!    without it (`HANDOVER_CONNECTION_HANDOFF=0` for every process of that run): failed
//!    requests and connections closed by the server, per restart (target with the hand-off:
//!    0). And the time to move N idle keep-alive connections in one restart: the old process's
//!    own drain time from its `Shutdown` line (hand-off done → the last connection
//!    acknowledged by the new process; `passed` must be N), and `MAINPID=` received → old
//!    process exited; then one request on each connection, answered by the new pid.
//! 8. **Registry contention** (a stand-in for a many-core machine, which a 2-core one cannot
//!    show in throughput; see `handover/registry.rs`): N threads registering and
//!    deregistering connections in a model of the connection registry (its parts as in
//!    `drain.rs`: one `Mutex<Slab>`, a `TaskTracker` token each), on-CPU ns per connection for
//!    each N, against a model with one lock per thread.
//! 9. **WebSockets moved** (issue 20): N idle WebSockets (`examples/websocket.rs`'s `/ws`, a
//!    tokio-tungstenite client each, named and answered once) moved in one restart: SIGUSR1 →
//!    the old process exited (it exits once every one was handed over and acknowledged), median
//!    over rounds; then one message on each, which must be answered by the new pid on the same
//!    connection with the state it carried (its name, its message count going on): failures
//!    counted (target: 0).
//!
//! Sizes come from the environment (defaults in brackets, quick mode in braces):
//! `HANDOVER_BENCH_CG_BASE` [5000] {100} and `HANDOVER_BENCH_CG_REQUESTS` [20000] {200}
//! requests before and between the callgrind dumps, `HANDOVER_BENCH_CG_CONNS` [10] {4}
//! keep-alive connections (and concurrent `Connection: close` clients),
//! `HANDOVER_BENCH_CG_H2_CONNS` [2] × `HANDOVER_BENCH_CG_H2_STREAMS` [5] concurrent HTTP/2
//! streams, `HANDOVER_BENCH_CG_SCENARIOS` [h1,h2,close] {h1},
//! `HANDOVER_BENCH_CG_RUNS` [3] {1} runs of each server for keep-alive and HTTP/2 (how the
//! runtime's workers interleave the connections moves the count a little between runs; the
//! median is reported), `HANDOVER_BENCH_CG_CLOSE_RUNS` [3] {1} runs of each server for
//! `Connection: close` (its per-connection buffer growth costs what glibc's heap layout makes
//! it, which varies between runs; the median is reported), `HANDOVER_BENCH_CG_DIR`
//! [target/callgrind] {target/callgrind-quick} where the callgrind files are kept for
//! `callgrind_annotate`,
//! `HANDOVER_BENCH_CG_TIMEOUT_S` [300] bound on each phase;
//! `HANDOVER_BENCH_CONNS` [50] {8} keep-alive connections (and `Connection: close` clients)
//! for throughput,
//! `HANDOVER_BENCH_WARMUP_MS` [300] {100} and `HANDOVER_BENCH_WINDOW_MS` [2000] {200} per run,
//! `HANDOVER_BENCH_PAIRS` [9] {2} pairs of runs, `HANDOVER_BENCH_MAX_PER_CONN` [10000000]
//! {20000} requests per connection and run, `HANDOVER_BENCH_RESTARTS` [20] {2},
//! `HANDOVER_BENCH_RESTART_CONNS` [50] {10}, `HANDOVER_BENCH_SLEEP_MS` [200] {200},
//! `HANDOVER_BENCH_STARTS` [20] {3} start/restart/stop cycles at idle,
//! `HANDOVER_BENCH_IDLE_CONNS` [10000] {100}, `HANDOVER_BENCH_SCALE_ROUNDS` [3] {1} (each
//! server, alternating; medians reported), `HANDOVER_BENCH_HANDOFF_CLIENTS` [60] {10} idle
//! clients (quick mode: polling every 200 ms, idling up to 300 ms, instead of 1 s and 3 s) over
//! `HANDOVER_BENCH_HANDOFF_RESTARTS` [6] {2} restarts, `HANDOVER_BENCH_HANDOFF_MOVE`
//! [1000,10000] {50,200} idle connections moved, `HANDOVER_BENCH_HANDOFF_ROUNDS` [3] {1} times
//! each (medians reported), `HANDOVER_BENCH_NOFILE` [30000] (`RLIMIT_NOFILE`
//! set here and inherited by the servers), `HANDOVER_BENCH_CLIENT_THREADS` [2] load generator
//! threads, `HANDOVER_BENCH_REGISTRY_THREADS` [1,2,4,8,16] {1,4} and
//! `HANDOVER_BENCH_REGISTRY_OPS` [200000] {2000} connections per thread for the registry
//! model, `HANDOVER_BENCH_WEBSOCKET_MOVE` [10000] {200} idle WebSockets moved,
//! `HANDOVER_BENCH_WEBSOCKET_ROUNDS` [3] {1} times (median reported), `HANDOVER_BENCH_LOG` [info] the servers' `RUST_LOG`, `HANDOVER_BENCH_ONLY`
//! (comma-separated subset of
//! `instructions,throughput,throughput-close,restart,startstop,scale,handoff,registry,websocket`),
//! `HANDOVER_BENCH_ECHO=1` to echo the servers' output,
//! `HANDOVER_BENCH_EXAMPLES_DIR` a folder of prebuilt examples (instead of building them with
//! cargo), `HANDOVER_BENCH_SERVER_CPUS` CPUs to pin the servers to (`taskset -c` syntax; run
//! the bench itself pinned to the others) for a many-core machine.
//!
//! Every loop is bounded in count and time; every process started (or taken over by restart)
//! is tracked by pidfd, ended at the end of its scenario, and checked gone at the end.

#[path = "handover/instr.rs"]
mod instr;
#[path = "handover/load.rs"]
mod load;
#[path = "handover/procs.rs"]
mod procs;
#[path = "handover/registry.rs"]
mod registry;
#[path = "handover/ws.rs"]
mod ws;
// The tests' idle keep-alive workload and delaying proxy (self-contained for this use).
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/idle.rs"]
mod idle;
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/proxy.rs"]
mod proxy;

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use load::{Load, Spec};
use procs::{NotifySocket, Proc, Registry, SOON, Server};

// ---------------------------------------------------------------------------------------------
// Configuration.

/// Sizes and switches, from the environment.
pub(crate) struct Config {
    quick: bool,
    only: Option<Vec<String>>,
    conns: usize,
    warmup: Duration,
    window: Duration,
    pairs: usize,
    max_per_conn: u64,
    restarts: usize,
    restart_conns: usize,
    sleep_ms: u64,
    starts: usize,
    idle_conns: usize,
    scale_rounds: usize,
    handoff_clients: usize,
    handoff_restarts: usize,
    handoff_moves: Vec<usize>,
    handoff_rounds: usize,
    websocket_move: usize,
    websocket_rounds: usize,
    nofile: u64,
    client_threads: usize,
    log: String,
    instr: instr::Settings,
    registry: registry::Settings,
}

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("warning: {name}={v:?} is not a valid number; ignored");
            default
        }),
        Err(_) => default,
    }
}

impl Config {
    /// The configuration from the environment; quick mode if `HANDOVER_BENCH_QUICK` is set, or
    /// if `force_quick`.
    pub(crate) fn from_env(force_quick: bool) -> Config {
        let quick = force_quick
            || std::env::var("HANDOVER_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let q = |full: u64, small: u64| if quick { small } else { full };
        let ms = |name, full, small| Duration::from_millis(env_or(name, q(full, small)));
        Config {
            quick,
            only: std::env::var("HANDOVER_BENCH_ONLY")
                .ok()
                .map(|v| v.split(',').map(|s| s.trim().to_string()).collect()),
            conns: env_or("HANDOVER_BENCH_CONNS", q(50, 8) as usize),
            warmup: ms("HANDOVER_BENCH_WARMUP_MS", 300, 100),
            window: ms("HANDOVER_BENCH_WINDOW_MS", 2000, 200),
            pairs: env_or("HANDOVER_BENCH_PAIRS", q(9, 2) as usize).max(1),
            max_per_conn: env_or("HANDOVER_BENCH_MAX_PER_CONN", q(10_000_000, 20_000)),
            restarts: env_or("HANDOVER_BENCH_RESTARTS", q(20, 2) as usize),
            restart_conns: env_or("HANDOVER_BENCH_RESTART_CONNS", q(50, 10) as usize),
            sleep_ms: env_or("HANDOVER_BENCH_SLEEP_MS", 200),
            starts: env_or("HANDOVER_BENCH_STARTS", q(20, 3) as usize).max(1),
            idle_conns: env_or("HANDOVER_BENCH_IDLE_CONNS", q(10_000, 100) as usize).max(1),
            scale_rounds: env_or("HANDOVER_BENCH_SCALE_ROUNDS", q(3, 1) as usize).max(1),
            handoff_clients: env_or("HANDOVER_BENCH_HANDOFF_CLIENTS", q(60, 10) as usize).max(1),
            handoff_restarts: env_or("HANDOVER_BENCH_HANDOFF_RESTARTS", q(6, 2) as usize).max(1),
            handoff_moves: std::env::var("HANDOVER_BENCH_HANDOFF_MOVE")
                .unwrap_or_else(|_| if quick { "50,200" } else { "1000,10000" }.into())
                .split(',')
                .filter_map(|n| match n.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => {
                        eprintln!(
                            "warning: HANDOVER_BENCH_HANDOFF_MOVE: {n:?} is not a number of \
                             connections; ignored"
                        );
                        None
                    }
                })
                .collect(),
            handoff_rounds: env_or("HANDOVER_BENCH_HANDOFF_ROUNDS", q(3, 1) as usize).max(1),
            websocket_move: env_or("HANDOVER_BENCH_WEBSOCKET_MOVE", q(10_000, 200) as usize).max(1),
            websocket_rounds: env_or("HANDOVER_BENCH_WEBSOCKET_ROUNDS", q(3, 1) as usize).max(1),
            nofile: env_or("HANDOVER_BENCH_NOFILE", 30_000),
            client_threads: env_or("HANDOVER_BENCH_CLIENT_THREADS", 2),
            log: std::env::var("HANDOVER_BENCH_LOG").unwrap_or_else(|_| "info".into()),
            instr: instr::Settings {
                base: env_or("HANDOVER_BENCH_CG_BASE", q(5_000, 100)),
                marginal: env_or("HANDOVER_BENCH_CG_REQUESTS", q(20_000, 200)).max(1),
                conns: env_or("HANDOVER_BENCH_CG_CONNS", q(10, 4) as usize).max(1),
                h2_conns: env_or("HANDOVER_BENCH_CG_H2_CONNS", 2).max(1),
                h2_streams: env_or("HANDOVER_BENCH_CG_H2_STREAMS", 5).max(1),
                scenarios: std::env::var("HANDOVER_BENCH_CG_SCENARIOS")
                    .unwrap_or_else(|_| if quick { "h1" } else { "h1,h2,close" }.into())
                    .split(',')
                    .filter_map(|k| {
                        let k = k.trim();
                        let s = instr::Scenario::parse(k);
                        if s.is_none() {
                            eprintln!(
                                "warning: HANDOVER_BENCH_CG_SCENARIOS: unknown {k:?} \
                                 (known: h1, h2, close); ignored"
                            );
                        }
                        s
                    })
                    .collect(),
                runs: env_or("HANDOVER_BENCH_CG_RUNS", q(3, 1) as usize).max(1),
                close_runs: env_or("HANDOVER_BENCH_CG_CLOSE_RUNS", q(3, 1) as usize).max(1),
                dir: std::env::var_os("HANDOVER_BENCH_CG_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        // Quick runs (debug builds) must not overwrite a full run's files.
                        let dir = if quick {
                            "callgrind-quick"
                        } else {
                            "callgrind"
                        };
                        Path::new(env!("CARGO_MANIFEST_DIR"))
                            .join("target")
                            .join(dir)
                    }),
                timeout: Duration::from_secs(env_or("HANDOVER_BENCH_CG_TIMEOUT_S", 300)),
                install: !quick,
            },
            registry: registry::Settings {
                threads: std::env::var("HANDOVER_BENCH_REGISTRY_THREADS")
                    .unwrap_or_else(|_| if quick { "1,4" } else { "1,2,4,8,16" }.into())
                    .split(',')
                    .filter_map(|n| match n.trim().parse::<usize>() {
                        Ok(n) if n > 0 => Some(n),
                        _ => {
                            eprintln!(
                                "warning: HANDOVER_BENCH_REGISTRY_THREADS: {n:?} is not a \
                                 number of threads; ignored"
                            );
                            None
                        }
                    })
                    .collect(),
                ops: env_or("HANDOVER_BENCH_REGISTRY_OPS", q(200_000, 2_000)).max(1),
            },
        }
    }

    fn enabled(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == scenario))
    }
}

/// What every scenario needs.
struct Ctx {
    cfg: Config,
    hello: PathBuf,
    plain: PathBuf,
    /// `examples/websocket.rs`, built only if the `websocket` scenario runs.
    websocket: Option<PathBuf>,
    procs: Registry,
    notify: NotifySocket,
    nofile: u64,
}

impl Ctx {
    /// Starts a server on a free loopback port; with `notify`, with our `NOTIFY_SOCKET`.
    fn start(&self, program: &Path, notify: bool) -> Result<Server, String> {
        let socket = self.notify.path.as_os_str();
        let env: &[(&str, &OsStr)] = if notify {
            &[("NOTIFY_SOCKET", socket)]
        } else {
            &[]
        };
        self.procs.start_server(program, env, &self.cfg.log)
    }

    /// The `MAINPID=` + `READY=1` datagram `old` sends once its successor is ready.
    fn handed_over(&self, old: u32, since: Instant) -> Result<procs::Notice, String> {
        self.notify
            .wait(SOON, |n| {
                n.at >= since && n.pid == old && n.has("READY=1") && n.mainpid().is_some()
            })
            .ok_or_else(|| format!("pid {old} reported no MAINPID=/READY=1 within {SOON:?}"))
    }

    /// The `READY=1` a freshly started (not restarted) server sends.
    fn ready(&self, server: &Server, since: Instant) -> Result<procs::Notice, String> {
        let pid = server.proc.pid;
        self.notify
            .wait(SOON, |n| n.at >= since && n.pid == pid && n.has("READY=1"))
            .ok_or_else(|| {
                format!(
                    "pid {pid} reported no READY=1 within {SOON:?}; it said:\n{}",
                    server.lines.tail(20)
                )
            })
    }
}

/// SIGTERM, then wait for the exit: how long it took, and the exit code.
fn terminate(proc: &Proc) -> Result<(Duration, Option<i32>), String> {
    let sent = Instant::now();
    proc.signal(Signal::TERM)?;
    let exit = proc.wait_exit(SOON)?;
    Ok((exit.at.saturating_duration_since(sent), exit.code))
}

fn expect_exit_0(what: &str, pid: u32, code: Option<i32>) -> Result<(), String> {
    match code {
        Some(0) => Ok(()),
        other => Err(format!(
            "{what} (pid {pid}) exited with {other:?}, expected 0"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics.

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn median(values: &[f64]) -> f64 {
    let v = sorted(values);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank 99th percentile (with 20 samples, the largest).
fn p99(values: &[f64]) -> f64 {
    let v = sorted(values);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((v.len() as f64) * 0.99).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `a - b` in ms, negative if `a` came first.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b { ms(a - b) } else { -ms(b - a) }
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Row {
    metric: String,
    handover: String,
    reference: String,
    target: String,
    met: Option<bool>,
}

fn row(
    metric: impl Into<String>,
    handover: impl Into<String>,
    reference: impl Into<String>,
    target: impl Into<String>,
    met: Option<bool>,
) -> Row {
    Row {
        metric: metric.into(),
        handover: handover.into(),
        reference: reference.into(),
        target: target.into(),
        met,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput.

struct Sample {
    rps: f64,
    cpu_us_per_request: f64,
    failed: u64,
    errors: Vec<String>,
}

/// Paired throughput, hello vs plain: with keep-alive connections, or (`close`) with a new
/// connection per request (`Connection: close`), what accepting, registering and closing a
/// connection costs on top of the request.
fn throughput(ctx: &Ctx, close: bool) -> Result<Vec<Row>, String> {
    let cfg = &ctx.cfg;
    let servers = [ctx.start(&ctx.hello, false)?, ctx.start(&ctx.plain, false)?];
    let names = ["hello", "plain"];
    for s in &servers {
        procs::get(s.addr)?;
    }
    // Pairs of back-to-back runs, one of each server, which goes first alternating: a change in
    // the machine's load (other tenants of the two shared CPUs) hits both runs of a pair alike,
    // and the ratio within a pair is what is compared, not the absolute rates.
    let mut rps: [Vec<f64>; 2] = Default::default();
    let mut cpu: [Vec<f64>; 2] = Default::default();
    let (mut ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
    let mut failed = [0u64; 2];
    for pair in 0..cfg.pairs {
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut got: [Option<Sample>; 2] = [None, None];
        for k in order {
            let s = measure(ctx, &servers[k], close)?;
            for e in &s.errors {
                eprintln!("  {}: failed request: {e}", names[k]);
            }
            failed[k] += s.failed;
            got[k] = Some(s);
        }
        let [Some(h), Some(p)] = got else {
            unreachable!("both servers were measured in this pair")
        };
        let ratio = h.rps / p.rps;
        let cpu_ratio = p.cpu_us_per_request / h.cpu_us_per_request;
        eprintln!(
            "  pair {}/{} ({} first): hello {:>7.0} req/s ({:.2} µs CPU/request), plain {:>7.0} \
             req/s ({:.2} µs): hello/plain {ratio:.3}",
            pair + 1,
            cfg.pairs,
            names[order[0]],
            h.rps,
            h.cpu_us_per_request,
            p.rps,
            p.cpu_us_per_request,
        );
        for (k, s) in [h, p].into_iter().enumerate() {
            rps[k].push(s.rps);
            cpu[k].push(s.cpu_us_per_request);
        }
        ratios.push(ratio);
        cpu_ratios.push(cpu_ratio);
    }
    for (s, name) in servers.iter().zip(names) {
        let (_, code) = terminate(&s.proc)?;
        expect_exit_0(name, s.proc.pid, code)?;
    }

    let spread = |v: &[f64]| {
        let v = sorted(v);
        format!(
            "{:.3}..{:.3}",
            v.first().copied().unwrap_or(f64::NAN),
            v.last().copied().unwrap_or(f64::NAN)
        )
    };
    let ratio = median(&ratios);
    let (pairs, conns, window) = (cfg.pairs, cfg.conns, ms(cfg.window));
    // The keep-alive rows keep their names (earlier reports compare by them).
    let (n, kind) = match close {
        false => ("2.", "keep-alive conns"),
        true => (
            "2c.",
            "clients, Connection: close (a new connection per request)",
        ),
    };
    Ok(vec![
        row(
            format!(
                "{n} throughput, req/s ({conns} {kind}; {pairs} interleaved pairs of \
                 {window:.0} ms runs, medians)"
            ),
            format!("{:.0}", median(&rps[0])),
            format!("{:.0} (plain)", median(&rps[1])),
            format!(
                "hello/plain median of pairs {ratio:.3} (pairs {}; ≥ 0.97)",
                spread(&ratios)
            ),
            Some(ratio >= 0.97),
        ),
        row(
            format!("{n} server CPU time per request, µs (medians)"),
            format!("{:.2}", median(&cpu[0])),
            format!("{:.2} (plain)", median(&cpu[1])),
            format!(
                "plain/hello median of pairs {:.3} (pairs {}; info)",
                median(&cpu_ratios),
                spread(&cpu_ratios)
            ),
            None,
        ),
        row(
            format!("{n} failed requests in the throughput runs"),
            failed[0].to_string(),
            format!("{} (plain)", failed[1]),
            "0",
            Some(failed[0] == 0),
        ),
    ])
}

fn measure(ctx: &Ctx, server: &Server, close: bool) -> Result<Sample, String> {
    let cfg = &ctx.cfg;
    let pid = server.proc.pid;
    let load = Load::start(&Spec {
        addr: server.addr,
        connections: cfg.conns,
        path: "/".into(),
        max_time: cfg.warmup + cfg.window + SOON,
        max_per_conn: cfg.max_per_conn,
        threads: cfg.client_threads,
        close,
    })?;
    std::thread::sleep(cfg.warmup);
    let (n0, cpu0, t0) = (load.ok(), procs::cpu_ns(pid), Instant::now());
    std::thread::sleep(cfg.window);
    let (n1, cpu1, t1) = (load.ok(), procs::cpu_ns(pid), Instant::now());
    let report = load.stop();
    let requests = n1.saturating_sub(n0);
    if requests == 0 {
        return Err(format!(
            "no request answered by pid {pid} during the window; errors: {:?}",
            report.errors
        ));
    }
    let cpu_us_per_request = match (cpu0, cpu1) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e3 / requests as f64,
        _ => f64::NAN,
    };
    Ok(Sample {
        rps: requests as f64 / (t1 - t0).as_secs_f64(),
        cpu_us_per_request,
        failed: report.failed,
        errors: report.errors,
    })
}

// ---------------------------------------------------------------------------------------------
// 2 and 3. Restarts under load.

#[derive(Default)]
struct Restarts {
    done: usize,
    /// SIGUSR1 sent → `MAINPID=`/`READY=1` received.
    latency: Vec<f64>,
    /// `MAINPID=`/`READY=1` received → old process exited (its drain).
    drain: Vec<f64>,
    /// Last connection to the old process seen closed → old process exited.
    close_to_exit: Vec<f64>,
    /// Restarts where no connection could be attributed to the old process.
    unattributed: usize,
    /// Spawn → `READY=1` of a fresh hello on another port, under the same load, before each
    /// restart: the reference for `latency`.
    start: Vec<f64>,
    report: load::Report,
}

fn restarts(ctx: &Ctx, path: &str) -> Result<Restarts, String> {
    let cfg = &ctx.cfg;
    let since = Instant::now();
    let server = ctx.start(&ctx.hello, true)?;
    ctx.ready(&server, since)?;
    let load = Load::start(&Spec {
        addr: server.addr,
        connections: cfg.restart_conns,
        path: path.into(),
        max_time: SOON * (cfg.restarts as u32 + 2),
        max_per_conn: u64::MAX,
        threads: cfg.client_threads,
        close: false,
    })?;
    let mut current = server.proc.clone();
    let mut out = Restarts::default();
    let looped = restart_loop(ctx, &load, &mut current, &mut out);
    out.report = load.stop();
    let ended = terminate(&current);
    if let Err(e) = looped {
        return Err(format!(
            "after {} restarts: {e}; the servers said:\n{}",
            out.done,
            server.lines.tail(30)
        ));
    }
    let (_, code) = ended?;
    expect_exit_0("the last hello", current.pid, code)?;
    Ok(out)
}

fn restart_loop(
    ctx: &Ctx,
    load: &Load,
    current: &mut Proc,
    out: &mut Restarts,
) -> Result<(), String> {
    if !load.wait_pid(current.pid, SOON) {
        return Err(format!("no response from pid {}", current.pid));
    }
    for i in 1..=ctx.cfg.restarts {
        // The reference: how long a process start takes right now, under this load.
        let spawned = Instant::now();
        let probe = ctx.start(&ctx.hello, true)?;
        let ready = ctx.ready(&probe, spawned);
        let stopped = terminate(&probe.proc);
        out.start.push(ms(ready?.at - spawned));
        expect_exit_0("the probe hello", probe.proc.pid, stopped?.1)?;

        let old = current.clone();
        let sent = Instant::now();
        old.signal(Signal::USR1)?;
        let handed = ctx.handed_over(old.pid, sent)?;
        let new = handed.mainpid().unwrap_or(0);
        *current = ctx.procs.track(new)?;
        let exit = old.wait_exit(SOON)?;
        expect_exit_0("the old hello", old.pid, exit.code)?;
        out.latency.push(ms(handed.at - sent));
        out.drain.push(signed_ms(exit.at, handed.at));
        let close_to_exit = load
            .last_close(old.pid, Duration::from_secs(2))
            .map(|closed| signed_ms(exit.at, closed));
        match close_to_exit {
            Some(ms) => out.close_to_exit.push(ms),
            None => out.unattributed += 1,
        }
        if !load.wait_pid(new, SOON) {
            return Err(format!("no response from the new pid {new}"));
        }
        out.done = i;
        eprintln!(
            "  restart {i}/{}: {} -> {new}: ready after {:.1} ms (a fresh start: {:.1} ms), \
             old drained in {:.1} ms, its last conn closed → its exit {}",
            ctx.cfg.restarts,
            old.pid,
            out.latency[i - 1],
            out.start[i - 1],
            out.drain[i - 1],
            close_to_exit.map_or("unattributed".into(), |ms| format!("{ms:.2} ms"))
        );
    }
    Ok(())
}

fn restart_rows(r: &Restarts, label: &str, n: usize, conns: usize) -> Vec<Row> {
    let failed = r.report.failed;
    for e in &r.report.errors {
        eprintln!("  {label}: failed request: {e}");
    }
    let mut rows = vec![row(
        format!("3. failed requests over {n} restarts, {conns} keep-alive conns, {label}"),
        format!("{failed} (of {} ok, {} restarts done)", r.report.ok, r.done),
        "—",
        "0",
        Some(failed == 0 && r.done == n),
    )];
    rows.extend(latency_rows(
        &r.latency,
        label,
        &r.start,
        "process start under this load",
    ));
    rows.push(row(
        format!("4. last conn to old pid closed → old pid exited, ms, median / p99 ({label})"),
        format!(
            "{:.2} / {:.2}{}",
            median(&r.close_to_exit),
            p99(&r.close_to_exit),
            if r.unattributed > 0 {
                format!(" ({} restarts unattributed)", r.unattributed)
            } else {
                String::new()
            }
        ),
        "—",
        "info",
        None,
    ));
    rows.push(row(
        format!("4. MAINPID received → old pid exited (drain), ms, median / p99 ({label})"),
        format!("{:.1} / {:.1}", median(&r.drain), p99(&r.drain)),
        "—",
        "info",
        None,
    ));
    rows
}

/// Restart latency (median, p99) against process start (`start`, described by `what`) + 20 ms.
fn latency_rows(latency: &[f64], label: &str, start: &[f64], what: &str) -> Vec<Row> {
    let (m, p) = (median(latency), p99(latency));
    let (sm, sp) = (median(start), p99(start));
    let judge = |v: f64, s: f64| (!start.is_empty()).then_some(v <= s + 20.0);
    vec![
        row(
            format!("4. restart latency SIGUSR1 → MAINPID+READY, ms, median ({label})"),
            format!("{m:.1}"),
            format!("{sm:.1} ({what}, median)"),
            format!("≤ {:.1} (start + 20)", sm + 20.0),
            judge(m, sm),
        ),
        row(
            format!("4. restart latency SIGUSR1 → MAINPID+READY, ms, p99 ({label})"),
            format!("{p:.1}"),
            format!("{sp:.1} ({what}, p99)"),
            format!("≤ {:.1} (start + 20)", sp + 20.0),
            judge(p, sp),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// 3 and 4. Start, idle restart, idle shutdown.

#[derive(Default)]
struct StartStop {
    /// Spawn → `READY=1` of a fresh hello.
    start: Vec<f64>,
    /// SIGUSR1 → `MAINPID=`/`READY=1`, idle server.
    restart: Vec<f64>,
    /// SIGTERM → exit, idle.
    stop_hello: Vec<f64>,
    stop_plain: Vec<f64>,
}

/// Cycles of: spawn a fresh hello → its `READY=1`; one request; SIGUSR1 → `MAINPID=`, the old
/// process exits, the new one answers; SIGTERM to the new one → exit. Then the same start and
/// SIGTERM for plain.
fn start_stop(ctx: &Ctx) -> Result<StartStop, String> {
    let settle = Duration::from_millis(20);
    let mut out = StartStop::default();
    for i in 0..ctx.cfg.starts {
        let spawned = Instant::now();
        let server = ctx.start(&ctx.hello, true)?;
        let ready = ctx.ready(&server, spawned)?;
        out.start.push(ms(ready.at - spawned));
        procs::get(server.addr)?;
        std::thread::sleep(settle);

        let sent = Instant::now();
        server.proc.signal(Signal::USR1)?;
        let handed = ctx.handed_over(server.proc.pid, sent)?;
        out.restart.push(ms(handed.at - sent));
        let new = ctx.procs.track(handed.mainpid().unwrap_or(0))?;
        let exit = server.proc.wait_exit(SOON)?;
        expect_exit_0("the old hello", server.proc.pid, exit.code)?;
        let answered = procs::get(server.addr)?;
        if answered != new.pid {
            return Err(format!(
                "after the restart pid {answered} answered, not {}",
                new.pid
            ));
        }
        std::thread::sleep(settle);
        let (took, code) = terminate(&new)?;
        expect_exit_0("hello", new.pid, code)?;
        out.stop_hello.push(ms(took));

        let plain = ctx.start(&ctx.plain, false)?;
        procs::get(plain.addr)?;
        std::thread::sleep(settle);
        let (took, code) = terminate(&plain.proc)?;
        expect_exit_0("plain", plain.proc.pid, code)?;
        out.stop_plain.push(ms(took));
        eprintln!(
            "  cycle {}/{}: start {:.1} ms, idle restart {:.1} ms, stop {:.1} ms (plain {:.1} ms)",
            i + 1,
            ctx.cfg.starts,
            out.start[i],
            out.restart[i],
            out.stop_hello[i],
            out.stop_plain[i]
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// 5. Idle connections at scale.

/// Per server (index 0: hello, 1: plain), one value per round.
#[derive(Default)]
struct Scale {
    /// RSS growth per connection, bytes.
    per_conn: [Vec<f64>; 2],
    /// SIGTERM → exit with the connections open, ms.
    stop: [Vec<f64>; 2],
    /// hello's `server closed` log line, last round.
    hello_closed: Option<String>,
}

fn scale(ctx: &Ctx) -> Result<Scale, String> {
    let n = ctx.cfg.idle_conns;
    let needed = n as u64 + 200;
    if ctx.nofile < needed {
        return Err(format!(
            "RLIMIT_NOFILE is {} but {n} connections need about {needed}; lower \
             HANDOVER_BENCH_IDLE_CONNS or raise the hard limit",
            ctx.nofile
        ));
    }
    let sources = loopback_sources(n);
    let mut out = Scale::default();
    for round in 0..ctx.cfg.scale_rounds {
        let order = if round % 2 == 0 { [1, 0] } else { [0, 1] };
        for k in order {
            let program = [&ctx.hello, &ctx.plain][k];
            let server = ctx.start(program, false)?;
            let pid = server.proc.pid;
            procs::get(server.addr)?;
            std::thread::sleep(Duration::from_millis(300));
            let before = procs::rss_kib(pid)?;
            let opening = Instant::now();
            let conns = match load::open_idle(server.addr, n, &sources) {
                Ok(c) => c,
                Err(e) => {
                    let _ = terminate(&server.proc);
                    return Err(e);
                }
            };
            let opened = opening.elapsed();
            std::thread::sleep(Duration::from_millis(300));
            let after = procs::rss_kib(pid)?;
            let fds = procs::fd_count(pid).unwrap_or(0);
            let (took, code) = terminate(&server.proc)?;
            drop(conns);
            expect_exit_0("server", pid, code)?;
            let per_conn = after.saturating_sub(before) as f64 * 1024.0 / n as f64;
            out.per_conn[k].push(per_conn);
            out.stop[k].push(ms(took));
            if k == 0 {
                out.hello_closed = server
                    .lines
                    .wait_for("server closed", Duration::from_secs(1));
            }
            eprintln!(
                "  round {}/{} {}: RSS {before} -> {after} KiB ({per_conn:.0} B/conn) with {n} \
                 connections ({fds} fds, opened in {:.2} s); SIGTERM -> exit {:.1} ms",
                round + 1,
                ctx.cfg.scale_rounds,
                ["hello", "plain"][k],
                opened.as_secs_f64(),
                ms(took)
            );
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// 7. Connection hand-off.

/// What idle clients saw over the delaying proxy across restarts.
struct IdleRun {
    restarts: usize,
    report: idle::IdleReport,
    /// Connections the proxy saw closed by the server side first.
    server_closed: usize,
}

impl IdleRun {
    fn per_restart(&self, n: usize) -> f64 {
        n as f64 / self.restarts.max(1) as f64
    }
}

/// `hello` behind the delaying proxy, `cfg.handoff_clients` idle clients, and
/// `cfg.handoff_restarts` restarts, each done when every client has been answered by the new
/// process. `handoff: false` runs every process with `HANDOVER_CONNECTION_HANDOFF=0`.
fn idle_restarts(ctx: &Ctx, handoff: bool) -> Result<IdleRun, String> {
    let cfg = &ctx.cfg;
    let mut env: Vec<(&str, &OsStr)> = vec![("NOTIFY_SOCKET", ctx.notify.path.as_os_str())];
    if !handoff {
        env.push(("HANDOVER_CONNECTION_HANDOFF", OsStr::new("0")));
    }
    let since = Instant::now();
    let server = ctx.procs.start_server(&ctx.hello, &env, &cfg.log)?;
    ctx.ready(&server, since)?;
    let proxy = proxy::Proxy::start(server.addr);
    let mut workload = idle::IdleConfig::new(cfg.handoff_clients);
    if cfg.quick {
        workload.poll_every = Duration::from_millis(200);
        workload.max_idle = Duration::from_millis(300);
    }
    workload.max_time = SOON * (cfg.handoff_restarts as u32 + 2);
    let load = idle::IdleClients::start(proxy.addr(), workload);
    let mut current = server.proc.clone();
    let mut done = 0;
    let looped = idle_restart_loop(ctx, &load, &mut current, &mut done);
    let report = load.stop();
    // The clients closed their connections: the proxy sees every close soon.
    let ended = proxy.wait_all_ended(SOON);
    let server_closed = proxy
        .connections()
        .iter()
        .filter(|c| c.server_closed_first())
        .count();
    let stopped = terminate(&current);
    if let Err(e) = looped {
        return Err(format!(
            "after {done} restarts: {e}\n{}; the servers said:\n{}",
            report.summary(),
            server.lines.tail(30)
        ));
    }
    ended?;
    expect_exit_0("the last hello", current.pid, stopped?.1)?;
    Ok(IdleRun {
        restarts: done,
        report,
        server_closed,
    })
}

fn idle_restart_loop(
    ctx: &Ctx,
    load: &idle::IdleClients,
    current: &mut Proc,
    done: &mut usize,
) -> Result<(), String> {
    load.wait_all_answered_by(current.pid, SOON)?;
    for i in 1..=ctx.cfg.handoff_restarts {
        let old = current.clone();
        let sent = Instant::now();
        old.signal(Signal::USR1)?;
        let handed = ctx.handed_over(old.pid, sent)?;
        *current = ctx.procs.track(handed.mainpid().unwrap_or(0))?;
        let exit = old.wait_exit(SOON)?;
        expect_exit_0("the old hello", old.pid, exit.code)?;
        // Every client has had its turn with the new process before the next restart.
        load.wait_all_answered_by(current.pid, SOON)?;
        *done = i;
    }
    Ok(())
}

/// One move of idle connections: the old process's own drain time (from its `Shutdown` line)
/// and `MAINPID=` received → the old process's exit, in ms.
struct Moved {
    drain: f64,
    exit: f64,
}

/// `n` idle keep-alive connections to a fresh `hello`, one restart, then one request on each,
/// which the new process must answer.
fn move_idle(ctx: &Ctx, n: usize) -> Result<Moved, String> {
    let needed = n as u64 + 200;
    if ctx.nofile < needed {
        return Err(format!(
            "RLIMIT_NOFILE is {} but {n} connections need about {needed}; lower \
             HANDOVER_BENCH_HANDOFF_MOVE or raise the hard limit",
            ctx.nofile
        ));
    }
    let since = Instant::now();
    let server = ctx.start(&ctx.hello, true)?;
    let pid = server.proc.pid;
    ctx.ready(&server, since)?;
    let mut conns = match load::open_idle(server.addr, n, &loopback_sources(n)) {
        Ok(c) => c,
        Err(e) => {
            let _ = terminate(&server.proc);
            return Err(e);
        }
    };
    let sent = Instant::now();
    server.proc.signal(Signal::USR1)?;
    let handed = ctx.handed_over(pid, sent)?;
    let new = ctx.procs.track(handed.mainpid().unwrap_or(0))?;
    let exit = server.proc.wait_exit(SOON * 2)?;
    expect_exit_0("the old hello", pid, exit.code)?;
    let closed = server
        .lines
        .wait_for(
            &format!("[{pid}]  INFO hello: server closed shutdown="),
            SOON,
        )
        .ok_or_else(|| format!("pid {pid} logged no Shutdown line"))?;
    let passed = shutdown_field(&closed, "passed")?;
    let drain = shutdown_field(&closed, "elapsed")?;
    // Still usable, and the new process's.
    let usable = load::request_each(&mut conns, new.pid);
    // The server closes first: the clients' ports are not left in TIME_WAIT for the next round.
    let (_, code) = terminate(&new)?;
    drop(conns);
    usable?;
    expect_exit_0("the new hello", new.pid, code)?;
    if passed != format!("{n}") {
        return Err(format!(
            "pid {pid} passed {passed} connections, expected {n}: {closed}"
        ));
    }
    Ok(Moved {
        drain: parse_debug_ms(&drain)
            .ok_or_else(|| format!("no duration in elapsed: {drain:?}"))?,
        exit: signed_ms(exit.at, handed.at),
    })
}

/// Loopback source addresses for `n` connections: none (the default one) if it has enough
/// ephemeral ports, else 127.0.0.1, 127.0.0.2, ... (beyond one source's share).
fn loopback_sources(n: usize) -> Vec<Ipv4Addr> {
    let per_source = (procs::ephemeral_ports() as usize)
        .saturating_sub(2_000)
        .max(1_000);
    if n <= per_source {
        return Vec::new();
    }
    (1..=n.div_ceil(per_source) as u8)
        .map(|i| Ipv4Addr::new(127, 0, 0, i))
        .collect()
}

/// The value after `field: ` in a `Shutdown { .. }` log line, as written there.
fn shutdown_field(line: &str, field: &str) -> Result<String, String> {
    line.split_once(&format!(" {field}: "))
        .and_then(|(_, rest)| rest.split([',', ' ']).next())
        .map(str::to_string)
        .ok_or_else(|| format!("no {field} in {line:?}"))
}

/// A `Duration` as `Debug` prints it (`435.367µs`, `12.5ms`, `2.0001s`), in ms.
fn parse_debug_ms(text: &str) -> Option<f64> {
    let units = [("ns", 1e-6), ("µs", 1e-3), ("ms", 1.0), ("s", 1e3)];
    units.iter().find_map(|(unit, scale)| {
        let number = text.strip_suffix(unit)?;
        number.parse::<f64>().ok().map(|v| v * scale)
    })
}

fn handoff_rows(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let cfg = &ctx.cfg;
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for handoff in [true, false] {
        let label = if handoff { "with" } else { "without" };
        eprintln!(
            "  {} idle clients over a {:?} proxy, {} restarts, {label} connection hand-off",
            cfg.handoff_clients,
            proxy::DEFAULT_LATENCY,
            cfg.handoff_restarts
        );
        let run = idle_restarts(ctx, handoff)?;
        eprintln!(
            "    {}; proxy: {} closed by the server first",
            run.report.summary(),
            run.server_closed
        );
        for f in run.report.failed() {
            eprintln!(
                "    failed: client {} port {} at {:.3} s: {:?}",
                f.client,
                f.local_port,
                f.at.as_secs_f64(),
                f.outcome
            );
        }
        runs.push(run);
    }
    let (with, without) = (&runs[0], &runs[1]);
    let what = format!(
        "{} idle keep-alive clients (never retrying) over a {} ms proxy, {} restarts",
        cfg.handoff_clients,
        proxy::DEFAULT_LATENCY.as_millis(),
        with.restarts
    );
    let failed = |r: &IdleRun| r.report.failed().len();
    rows.push(row(
        format!("7. failed requests per restart, {what}"),
        format!(
            "{:.2} ({} of {} requests)",
            with.per_restart(failed(with)),
            failed(with),
            with.report.requests.len()
        ),
        format!(
            "{:.2} ({} of {}; without hand-off)",
            without.per_restart(failed(without)),
            failed(without),
            without.report.requests.len()
        ),
        "0",
        Some(failed(with) == 0 && with.restarts == cfg.handoff_restarts),
    ));
    let closed = |r: &IdleRun| r.report.closed_by_server();
    rows.push(row(
        format!("7. connections closed by the server per restart, {what}"),
        format!(
            "{:.2} ({}; proxy: {} closed by the server first)",
            with.per_restart(closed(with)),
            closed(with),
            with.server_closed
        ),
        format!(
            "{:.2} ({}; proxy: {}; without hand-off)",
            without.per_restart(closed(without)),
            closed(without),
            without.server_closed
        ),
        "0",
        Some(closed(with) == 0 && with.server_closed == 0),
    ));
    for &n in &cfg.handoff_moves {
        let mut drains = Vec::new();
        let mut exits = Vec::new();
        for round in 0..cfg.handoff_rounds {
            let m = move_idle(ctx, n)?;
            eprintln!(
                "  moving {n} idle connections, round {}/{}: the old process's drain {:.1} ms, \
                 MAINPID → its exit {:.1} ms; each connection answered by the new process",
                round + 1,
                cfg.handoff_rounds,
                m.drain,
                m.exit
            );
            drains.push(m.drain);
            exits.push(m.exit);
        }
        let values = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.push(row(
            format!(
                "7. moving {n} idle keep-alive conns in one restart: the old pid's drain \
                 (hand-off → last conn acknowledged by the new pid), ms, median of {}",
                cfg.handoff_rounds
            ),
            format!("{:.1} ({})", median(&drains), values(&drains)),
            format!(
                "MAINPID received → old pid exited: {:.1} ({})",
                median(&exits),
                values(&exits)
            ),
            "info (all passed, each then answered by the new pid)",
            None,
        ));
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// 9. WebSockets moved.

/// One move of idle WebSockets: SIGUSR1 → the old process's exit, and the connections the new
/// process did not answer as it should have.
struct WsMoved {
    exit: f64,
    failures: Vec<String>,
}

/// `n` idle WebSockets to a fresh `websocket` example, one restart, then one message on each,
/// which the new process must answer on the same connection, counting on.
fn move_websockets(ctx: &Ctx, program: &Path, n: usize) -> Result<WsMoved, String> {
    // This process holds the n client sockets, each server its n.
    let needed = n as u64 + 200;
    if ctx.nofile < needed {
        return Err(format!(
            "RLIMIT_NOFILE is {} but {n} WebSockets need about {needed}; lower \
             HANDOVER_BENCH_WEBSOCKET_MOVE or raise the hard limit",
            ctx.nofile
        ));
    }
    let since = Instant::now();
    let server = ctx.start(program, true)?;
    let pid = server.proc.pid;
    ctx.ready(&server, since)?;
    let mut clients = match ws::Clients::open(server.addr, n, &loopback_sources(n), pid) {
        Ok(c) => c,
        Err(e) => {
            let _ = terminate(&server.proc);
            return Err(format!("{e}; the server said:\n{}", server.lines.tail(20)));
        }
    };
    let sent = Instant::now();
    server.proc.signal(Signal::USR1)?;
    let handed = ctx.handed_over(pid, sent)?;
    let new = ctx.procs.track(handed.mainpid().unwrap_or(0))?;
    // It exits once every WebSocket was handed over and acknowledged (or at its drain deadline).
    let exit = server.proc.wait_exit(SOON * 4)?;
    expect_exit_0("the old websocket server", pid, exit.code)?;
    let failures = clients.answered_by(new.pid);
    // The clients close first, then the new process is stopped.
    drop(clients);
    let (_, code) = terminate(&new)?;
    expect_exit_0("the new websocket server", new.pid, code)?;
    Ok(WsMoved {
        exit: ms(exit.at.saturating_duration_since(sent)),
        failures,
    })
}

fn websocket_rows(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let cfg = &ctx.cfg;
    let program = ctx
        .websocket
        .as_deref()
        .ok_or("the websocket example was not built")?;
    let (n, rounds) = (cfg.websocket_move, cfg.websocket_rounds);
    let mut exits = Vec::new();
    let mut failed = 0;
    for round in 0..rounds {
        let m = move_websockets(ctx, program, n)?;
        eprintln!(
            "  moving {n} idle WebSockets, round {}/{rounds}: SIGUSR1 → old process exited \
             {:.1} ms; {} of {n} not answered as they should have been by the new process",
            round + 1,
            m.exit,
            m.failures.len()
        );
        for f in m.failures.iter().take(5) {
            eprintln!("    {f}");
        }
        failed += m.failures.len();
        exits.push(m.exit);
    }
    let values = exits
        .iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(vec![row(
        format!(
            "9. moving {n} idle WebSockets in one restart: SIGUSR1 → old pid exited, ms, \
             median of {rounds}"
        ),
        format!("{:.1} ({values})", median(&exits)),
        format!(
            "then answered by the new pid on the same connection: {} of {} failed",
            failed,
            n * rounds
        ),
        "0 failed (time: info)",
        Some(failed == 0),
    )])
}

// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    if run(Config::from_env(false)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs the scenarios `cfg` enables and prints the report. Returns whether all of them ran to
/// the end and no process was left behind (targets missed do not count: they are reported).
pub(crate) fn run(cfg: Config) -> bool {
    let nofile = procs::raise_nofile(cfg.nofile);
    if nofile < cfg.nofile {
        eprintln!(
            "note: RLIMIT_NOFILE could only be raised to {nofile} (wanted {})",
            cfg.nofile
        );
    }
    procs::become_subreaper();
    eprintln!(
        "handover bench{}: {}",
        if cfg.quick { " (quick)" } else { "" },
        procs::machine()
    );
    eprintln!("building the examples...");
    let hello = procs::build_example("hello");
    let plain = procs::build_example("plain");
    // The features tests/support builds it with (`features_of`), so that the build is shared.
    let websocket = cfg
        .enabled("websocket")
        .then(|| procs::build_example_with("websocket", "axum rustls"));
    let ctx = Ctx {
        cfg,
        hello,
        plain,
        websocket,
        procs: Registry::default(),
        notify: NotifySocket::new(),
        nofile,
    };
    let load_before = procs::loadavg();
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut fail = |what: &str, e: String| {
        eprintln!("ERROR in {what}: {e}");
        errors.push(format!("{what}: {e}"));
    };

    if ctx.cfg.enabled("instructions") {
        eprintln!("1. instructions per request under callgrind, hello vs plain");
        match instr::rows(&ctx, &ctx.cfg.instr) {
            Ok(r) => rows.extend(r),
            Err(e) => fail("instructions", e),
        }
    }

    if ctx.cfg.enabled("throughput") {
        eprintln!("2. throughput, hello vs plain (interleaved pairs)");
        match throughput(&ctx, false) {
            Ok(r) => rows.extend(r),
            Err(e) => fail("throughput", e),
        }
    }

    if ctx.cfg.enabled("throughput-close") {
        eprintln!(
            "2c. throughput with a new connection per request, hello vs plain (interleaved pairs)"
        );
        match throughput(&ctx, true) {
            Ok(r) => rows.extend(r),
            Err(e) => fail("throughput (Connection: close)", e),
        }
    }

    if ctx.cfg.enabled("restart") {
        let (n, conns) = (ctx.cfg.restarts, ctx.cfg.restart_conns);
        let slow = format!("/?sleep_ms={}", ctx.cfg.sleep_ms);
        for (label, path) in [("instant handler", "/"), (slow.as_str(), slow.as_str())] {
            eprintln!("3/4. {n} restarts under load, {label}");
            match restarts(&ctx, path) {
                Ok(r) => rows.extend(restart_rows(&r, label, n, conns)),
                Err(e) => fail(&format!("restarts ({label})"), e),
            }
        }
    }

    if ctx.cfg.enabled("startstop") {
        eprintln!("4/5. start, idle restart and idle shutdown cycles");
        match start_stop(&ctx) {
            Ok(s) => {
                rows.push(row(
                    "4. process start, idle: spawn → READY=1, ms, median / p99 (reference)",
                    format!("{:.1} / {:.1}", median(&s.start), p99(&s.start)),
                    "—",
                    "info",
                    None,
                ));
                rows.extend(latency_rows(
                    &s.restart,
                    "idle",
                    &s.start,
                    "process start, idle",
                ));
                let (h, p) = (median(&s.stop_hello), median(&s.stop_plain));
                rows.push(row(
                    "5. idle shutdown SIGTERM → exit, ms, median",
                    format!("{h:.2} (p99 {:.2})", p99(&s.stop_hello)),
                    format!("{p:.2} (plain, p99 {:.2})", p99(&s.stop_plain)),
                    format!("ratio {:.2} (info)", h / p),
                    None,
                ));
            }
            Err(e) => fail("start/stop", e),
        }
    }

    if ctx.cfg.enabled("scale") {
        let n = ctx.cfg.idle_conns;
        eprintln!("6. {n} idle keep-alive connections");
        match scale(&ctx) {
            Ok(s) => {
                let rounds = ctx.cfg.scale_rounds;
                let (h, p) = (median(&s.per_conn[0]), median(&s.per_conn[1]));
                let diff = h - p;
                let values = |v: &[f64]| {
                    v.iter()
                        .map(|x| format!("{x:.0}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                rows.push(row(
                    format!(
                        "6. RSS per idle keep-alive conn, bytes ({n} conns, median of {rounds})"
                    ),
                    format!("{h:.0} ({})", values(&s.per_conn[0])),
                    format!("{p:.0} (plain: {})", values(&s.per_conn[1])),
                    format!("{diff:+.0} B/conn (< +1024)"),
                    Some(diff < 1024.0),
                ));
                let (h, p) = (median(&s.stop[0]), median(&s.stop[1]));
                rows.push(row(
                    format!(
                        "6. SIGTERM → exit with {n} idle conns (drain), ms, median of {rounds}"
                    ),
                    format!("{h:.1} (max {:.1})", p99(&s.stop[0])),
                    format!("{p:.1} (plain, no drain; max {:.1})", p99(&s.stop[1])),
                    "< 250",
                    Some(h < 250.0),
                ));
                if let Some(line) = &s.hello_closed {
                    eprintln!("  hello's last words: {}", line.trim());
                }
            }
            Err(e) => fail("scale", e),
        }
    }

    if ctx.cfg.enabled("handoff") {
        eprintln!("7. connection hand-off");
        match handoff_rows(&ctx) {
            Ok(r) => rows.extend(r),
            Err(e) => fail("handoff", e),
        }
    }

    if ctx.cfg.enabled("registry") {
        eprintln!("8. contention on the connection registry (a stand-in for many cores)");
        match registry::measure(&ctx.cfg.registry) {
            Ok(runs) => {
                let one = runs.first().map(|(_, g, _)| g.cpu_ns_per_conn);
                for (n, g, s) in runs {
                    rows.push(row(
                        format!(
                            "8. registry model: CPU ns per connection registered and \
                             deregistered, {n} threads at once (today's one lock; stand-in for \
                             many cores)"
                        ),
                        format!("{:.0} ({:.2} M/s)", g.cpu_ns_per_conn, g.per_second / 1e6),
                        format!(
                            "{:.0} (one lock per thread; {:.2} M/s)",
                            s.cpu_ns_per_conn,
                            s.per_second / 1e6
                        ),
                        format!(
                            "x{:.2} of {} thread(s) (info)",
                            g.cpu_ns_per_conn / one.unwrap_or(f64::NAN),
                            ctx.cfg.registry.threads.first().copied().unwrap_or(1)
                        ),
                        None,
                    ));
                }
            }
            Err(e) => fail("registry", e),
        }
    }

    if ctx.cfg.enabled("websocket") {
        eprintln!("9. idle WebSockets moved in one restart");
        match websocket_rows(&ctx) {
            Ok(r) => rows.extend(r),
            Err(e) => fail("websocket", e),
        }
    }

    let load_after = procs::loadavg();
    let mut left = ctx.procs.cleanup();
    // Children re-parented to us that were never tracked (none, unless a restart went astray).
    let orphans = procs::live_children();
    for pid in &orphans {
        if ctx.procs.track(*pid).is_ok() {
            left.extend(ctx.procs.cleanup());
        }
    }
    drop(ctx);

    println!();
    println!("## handover bench results");
    println!();
    println!("{}", procs::machine());
    println!(
        "load average before {load_before}, after {load_after}; {:.0} s; RLIMIT_NOFILE {nofile}",
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("| metric | handover | reference | ratio/target | met? |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**NO**",
            None => "—",
        };
        println!(
            "| {} | {} | {} | {} | {met} |",
            r.metric, r.handover, r.reference, r.target
        );
    }
    println!();
    println!(
        "p99 is nearest-rank: with fewer than 100 samples, the largest. Load generator and \
         servers share the machine's CPUs: numbers are noisy on small or busy machines."
    );
    if cfg!(debug_assertions) {
        println!("- built without optimizations (test profile): these numbers mean little");
    }
    for e in &errors {
        println!("- ERROR: {e}");
    }
    if left.is_empty() && orphans.is_empty() {
        println!("- processes left behind: none");
    } else {
        println!("- processes left behind (killed): {left:?}; untracked children: {orphans:?}");
    }
    errors.is_empty() && left.is_empty() && orphans.is_empty()
}
