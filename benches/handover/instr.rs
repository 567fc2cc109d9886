//! Instructions per request: the server process under `valgrind --tool=callgrind`, driven by a
//! client that sends an exact number of requests, and the *marginal* cost between two request
//! counts, so that start-up, connection set-up, warm-up and shutdown cancel out.
//!
//! How the marginal cost is taken: one server process per (server, scenario). The client sends
//! `base` requests and waits for every response; `callgrind_control --dump` then writes the
//! counts so far to part 1 and zeroes them. The client sends `marginal` more requests on the
//! same connections (HTTP/1.1 and HTTP/2; new ones for `Connection: close`), and a second dump
//! writes part 2: exactly Ir(base + marginal requests) − Ir(base requests), whatever start-up
//! cost. SIGTERM then ends the server and callgrind writes the rest (shutdown) to the last
//! file. One process instead of two runs of different lengths: start-up is not subtracted
//! (and its own variation, thread scheduling during start, does not enter the difference),
//! and it takes one valgrind start instead of two.
//!
//! Only the server is counted: valgrind runs it in place (`--trace-children=no`; the pid it
//! prints is checked against the one started), the client runs natively in this process. All
//! threads of the server are counted together (callgrind's default).

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HOST, HeaderValue};
use hyper::{Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Ctx, Row, expect_exit_0, median, row, sorted, terminate};

/// The load shapes measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// HTTP/1.1 keep-alive, one request at a time per connection.
    KeepAlive,
    /// HTTP/2 with prior knowledge, several concurrent streams per connection.
    H2,
    /// A new connection per request (`Connection: close`), several at a time.
    Close,
}

impl Scenario {
    /// The name used in `HANDOVER_BENCH_CG_SCENARIOS` and in the output file names.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Scenario::KeepAlive => "h1",
            Scenario::H2 => "h2",
            Scenario::Close => "close",
        }
    }

    pub(crate) fn parse(key: &str) -> Option<Scenario> {
        [Scenario::KeepAlive, Scenario::H2, Scenario::Close]
            .into_iter()
            .find(|s| s.key() == key)
    }

    fn label(self, s: &Settings) -> String {
        match self {
            Scenario::KeepAlive => format!("HTTP/1.1 keep-alive, {} conns", s.conns),
            Scenario::H2 => format!("HTTP/2, {} conns × {} streams", s.h2_conns, s.h2_streams),
            Scenario::Close => format!(
                "new conn per request (Connection: close), {} at a time",
                s.conns
            ),
        }
    }
}

/// Sizes of the instruction counts (from the environment, see the bench's docs).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Requests before the first dump.
    pub(crate) base: u64,
    /// Requests between the two dumps: the divisor of the marginal cost.
    pub(crate) marginal: u64,
    /// Keep-alive connections (HTTP/1.1), and concurrent clients for `Connection: close`.
    pub(crate) conns: usize,
    pub(crate) h2_conns: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub(crate) h2_streams: usize,
    pub(crate) scenarios: Vec<Scenario>,
    /// Runs of each server for HTTP/1.1 keep-alive and HTTP/2 (median reported).
    pub(crate) runs: usize,
    /// Runs of each server for `Connection: close` (median reported).
    pub(crate) close_runs: usize,
    /// Where callgrind writes its files (kept for `callgrind_annotate`).
    pub(crate) dir: PathBuf,
    /// Bound on each phase of requests (the server runs some 50 times slower under valgrind).
    pub(crate) timeout: Duration,
    /// Install valgrind with apt-get when it is missing (and we are root).
    pub(crate) install: bool,
}

/// The instruction rows: for each scenario, hello's and plain's marginal instructions per
/// request and their ratio; or one row saying why the scenario was skipped.
pub(crate) fn rows(ctx: &Ctx, s: &Settings) -> Result<Vec<Row>, String> {
    if let Err(why) = ensure_valgrind(s.install) {
        eprintln!("SKIPPED: instructions per request: {why}");
        return Ok(vec![row(
            "1. instructions per request (callgrind)",
            format!("SKIPPED: {why}"),
            "—",
            "plain/hello ≥ 0.97 (HTTP/1.1 keep-alive)",
            None,
        )]);
    }
    std::fs::create_dir_all(&s.dir)
        .map_err(|e| format!("cannot create {}: {e}", s.dir.display()))?;
    let mut rows = Vec::new();
    let mut plain_h1 = None;
    for &scenario in &s.scenarios {
        // Per-connection costs include glibc's realloc of hyper's read buffer, which is cheap or
        // a copy depending on the heap's layout, which differs from run to run; and how the
        // runtime's two workers interleave the connections' tasks (wake-ups and polls per
        // request) moves HTTP/2's count by up to ±0.3 % between runs: several runs, interleaved.
        let runs = if scenario == Scenario::Close {
            s.close_runs
        } else {
            s.runs
        };
        let mut per_request: [Vec<f64>; 2] = Default::default();
        for run in 0..runs {
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                let (name, program) = [("hello", &ctx.hello), ("plain", &ctx.plain)][k];
                let tag = match runs {
                    1 => scenario.key().to_string(),
                    _ => format!("{}-{}", scenario.key(), run + 1),
                };
                let c = count(ctx, s, program, name, &tag, scenario)?;
                eprintln!(
                    "  {name:5} {tag:7}: {:>6.0} instructions/request ({} Ir over {} requests; \
                     {} Ir before; {:.1} s under valgrind) in {}",
                    c.per_request,
                    c.marginal_ir,
                    s.marginal,
                    c.base_ir,
                    c.took.as_secs_f64(),
                    c.file.display()
                );
                per_request[k].push(c.per_request);
            }
        }
        let (h, p) = (median(&per_request[0]), median(&per_request[1]));
        let shown = |v: &[f64]| match v.len() {
            1 => format!("{:.0}", v[0]),
            n => {
                let v = sorted(v);
                format!(
                    "{:.0} (median of {n}: {:.0}..{:.0})",
                    median(&v),
                    v[0],
                    v[n - 1]
                )
            }
        };
        let ratio = p / h;
        let headline = scenario == Scenario::KeepAlive;
        if headline {
            plain_h1 = Some(p);
        }
        rows.push(row(
            format!(
                "1. instructions per request, {} (marginal, {}→{} requests)",
                scenario.label(s),
                s.base,
                s.base + s.marginal
            ),
            shown(&per_request[0]),
            format!("{} (plain)", shown(&per_request[1])),
            if headline {
                format!("plain/hello {ratio:.3} (≥ 0.97)")
            } else {
                format!("plain/hello {ratio:.3} (info)")
            },
            headline.then_some(ratio >= 0.97),
        ));
    }
    // What the lifecycle costs without the per-request `ConnectionInfo` (an `http::Extensions`
    // insert, which any server that puts connection data in requests pays, axum's ConnectInfo
    // too): hello with `Server::connection_info(false)`, HTTP/1.1 keep-alive.
    if s.scenarios.contains(&Scenario::KeepAlive) {
        let env = [("HANDOVER_CONNECTION_INFO", OsStr::new("0"))];
        let c = count_with(
            ctx,
            s,
            &ctx.hello,
            "hello-noinfo",
            "h1",
            Scenario::KeepAlive,
            &env,
        )?;
        let plain = plain_h1;
        eprintln!(
            "  hello without ConnectionInfo h1: {:>6.0} instructions/request in {}",
            c.per_request,
            c.file.display()
        );
        if let Some(p) = plain {
            let ratio = p / c.per_request;
            rows.push(row(
                format!(
                    "1. instructions per request, {}, hello with `connection_info(false)`",
                    Scenario::KeepAlive.label(s)
                ),
                format!("{:.0}", c.per_request),
                format!("{p:.0} (plain)"),
                format!("plain/hello {ratio:.3} (≥ 0.97)"),
                Some(ratio >= 0.97),
            ));
        }
    }
    Ok(rows)
}

/// One measured server run.
struct Count {
    /// Instructions of part 1: start-up and the first `base` requests.
    base_ir: u64,
    /// Instructions of part 2: the `marginal` requests.
    marginal_ir: u64,
    per_request: f64,
    /// Part 2's callgrind file.
    file: PathBuf,
    /// How long the marginal phase took under valgrind.
    took: Duration,
}

fn count(
    ctx: &Ctx,
    s: &Settings,
    program: &Path,
    name: &str,
    tag: &str,
    scenario: Scenario,
) -> Result<Count, String> {
    count_with(ctx, s, program, name, tag, scenario, &[])
}

fn count_with(
    ctx: &Ctx,
    s: &Settings,
    program: &Path,
    name: &str,
    tag: &str,
    scenario: Scenario,
    env: &[(&str, &OsStr)],
) -> Result<Count, String> {
    let out = s.dir.join(format!("callgrind.{name}.{tag}.out"));
    let part = |n: u32| PathBuf::from(format!("{}.{n}", out.display()));
    for f in [out.clone(), part(1), part(2)] {
        let _ = std::fs::remove_file(f);
    }
    let out_arg = format!("--callgrind-out-file={}", out.display());
    let wrapper: [&OsStr; 4] = [
        "valgrind".as_ref(),
        "--tool=callgrind".as_ref(),
        // The server only: a restart child (not used here) would run natively.
        "--trace-children=no".as_ref(),
        out_arg.as_ref(),
    ];
    let server = ctx
        .procs
        .start_server_under(&wrapper, program, env, &ctx.cfg.log)?;
    let pid = server.proc.pid;
    let driven = (|| {
        let mut client = Client::connect(scenario, server.addr, s)?;
        client.run(s.base, s.timeout)?;
        dump(pid, &part(1))?;
        let started = Instant::now();
        client.run(s.marginal, s.timeout)?;
        let took = started.elapsed();
        dump(pid, &part(2))?;
        Ok::<_, String>(took)
    })();
    // Ends the server cleanly (callgrind writes its last part at exit) in every case.
    let ended = terminate(&server.proc);
    let took = driven.map_err(|e| format!("{name} under callgrind: {e}"))?;
    let (_, code) = ended?;
    expect_exit_0(&format!("{name} under callgrind"), pid, code)?;

    let first = read_part(&part(1), pid, 1)?;
    let second = read_part(&part(2), pid, 2)?;
    // callgrind_annotate must see the same total: the file is what we think it is.
    let annotated = annotate_total(&part(2))?;
    if annotated != second {
        return Err(format!(
            "callgrind_annotate says {} has {annotated} Ir in total, its summary line {second}",
            part(2).display()
        ));
    }
    Ok(Count {
        base_ir: first,
        marginal_ir: second,
        per_request: second as f64 / s.marginal.max(1) as f64,
        file: part(2),
        took,
    })
}

/// Asks callgrind in `pid` to write its counts so far to `file` (its next part) and zero them.
fn dump(pid: u32, file: &Path) -> Result<(), String> {
    let out = Command::new("callgrind_control")
        .arg("--dump")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running callgrind_control: {e}"))?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !said.contains("OK") {
        return Err(format!(
            "callgrind_control --dump {pid} failed ({}): {said}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // callgrind_control returns once the dump is written: the file must be complete now.
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("callgrind_control reported OK but {}: {e}", file.display()))?;
    if !text.lines().any(|l| l.starts_with("totals:")) {
        return Err(format!(
            "{} is incomplete (no totals: line)",
            file.display()
        ));
    }
    Ok(())
}

/// The total Ir of a callgrind dump, after checking it is part `part` of process `pid`.
fn read_part(file: &Path, pid: u32, part: u32) -> Result<u64, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let expect = |name: &str, want: String| match field(name) {
        Some(v) if v == want => Ok(()),
        other => Err(format!(
            "{}: {name} is {other:?}, expected {want:?}",
            file.display()
        )),
    };
    expect("pid:", pid.to_string())?;
    expect("part:", part.to_string())?;
    expect("events:", "Ir".into())?;
    field("summary:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{}: no numeric summary: line", file.display()))
}

/// The `PROGRAM TOTALS` line of `callgrind_annotate FILE`.
fn annotate_total(file: &Path) -> Result<u64, String> {
    let out = Command::new("callgrind_annotate")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running callgrind_annotate: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("PROGRAM TOTALS"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.replace(',', "").parse().ok())
        .ok_or_else(|| {
            format!(
                "callgrind_annotate {} printed no PROGRAM TOTALS ({}): {}",
                file.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Whether valgrind (callgrind and its `callgrind_control`/`callgrind_annotate` scripts) can
/// run here; with `install`, installs Debian's `valgrind` package when it is missing and we
/// are root. `Err` is the reason the scenario is skipped.
fn ensure_valgrind(install: bool) -> Result<(), String> {
    let present = || {
        ["valgrind", "callgrind_control", "callgrind_annotate"]
            .into_iter()
            .find(|tool| {
                let status = Command::new(tool)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                // callgrind_annotate 3.19 exits 255 after printing its version: for the
                // scripts, that they run at all is the test.
                match status {
                    Ok(s) => *tool == "valgrind" && !s.success(),
                    Err(_) => true,
                }
            })
    };
    let Some(missing) = present() else {
        return Ok(());
    };
    if !install {
        return Err(format!(
            "{missing} is not installed (quick mode does not install packages; the full bench \
             installs Debian's valgrind when run as root)"
        ));
    }
    if !rustix::process::geteuid().is_root() {
        return Err(format!(
            "{missing} is not installed and we are not root to install it (apt-get install \
             valgrind)"
        ));
    }
    eprintln!("  {missing} is missing: apt-get install valgrind");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = [
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "valgrind",
    ];
    // The package lists may be missing or stale on a fresh machine: update once, try again.
    let installed = apt(&install) || (apt(&["update", "-qq"]) && apt(&install));
    if !installed {
        return Err("valgrind is not installed and apt-get install valgrind failed".into());
    }
    match present() {
        None => Ok(()),
        Some(missing) => Err(format!("{missing} still missing after installing valgrind")),
    }
}

// ---------------------------------------------------------------------------------------------
// The client: an exact number of requests per phase, every one checked.

/// Connections kept open across phases (none for `Connection: close`), on a single-threaded
/// runtime: the server under valgrind is the bottleneck by far, one client thread keeps it busy.
struct Client {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    work: Work,
}

enum Work {
    H1(Vec<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>),
    /// One sender per stream (clones of their connection's).
    H2(Vec<hyper::client::conn::http2::SendRequest<Empty<Bytes>>>),
    Close(usize),
}

impl Client {
    fn connect(scenario: Scenario, addr: SocketAddr, s: &Settings) -> Result<Client, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("client runtime: {e}"))?;
        let work = runtime.block_on(async {
            tokio::time::timeout(s.timeout, async {
                Ok::<_, String>(match scenario {
                    Scenario::KeepAlive => {
                        let mut senders = Vec::with_capacity(s.conns);
                        for _ in 0..s.conns.max(1) {
                            let io = TokioIo::new(tcp(addr).await?);
                            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                                .await
                                .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
                            tokio::spawn(conn);
                            senders.push(sender);
                        }
                        Work::H1(senders)
                    }
                    Scenario::H2 => {
                        let mut senders = Vec::new();
                        for _ in 0..s.h2_conns.max(1) {
                            let io = TokioIo::new(tcp(addr).await?);
                            let (sender, conn) =
                                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                                    .await
                                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                            tokio::spawn(conn);
                            for _ in 0..s.h2_streams.max(1) {
                                senders.push(sender.clone());
                            }
                        }
                        Work::H2(senders)
                    }
                    Scenario::Close => Work::Close(s.conns.max(1)),
                })
            })
            .await
            .map_err(|_| format!("connecting to {addr} took more than {:?}", s.timeout))?
        })?;
        Ok(Client {
            runtime,
            addr,
            work,
        })
    }

    /// Sends exactly `n` requests (split over the connections or streams) and checks every
    /// response; an error if any fails or the phase outlasts `timeout`.
    fn run(&mut self, n: u64, timeout: Duration) -> Result<(), String> {
        let addr = self.addr;
        let share = |i: usize, of: usize| n / of as u64 + u64::from((i as u64) < n % of as u64);
        self.runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::<TaskResult>::new();
            match &mut self.work {
                Work::H1(senders) => {
                    let of = senders.len();
                    for (i, mut sender) in std::mem::take(senders).into_iter().enumerate() {
                        let k = share(i, of);
                        tasks.spawn(async move {
                            for _ in 0..k {
                                sender
                                    .ready()
                                    .await
                                    .map_err(|e| format!("connection closed: {e}"))?;
                                let req = request(Uri::from_static("/"), addr)?;
                                check(sender.send_request(req).await).await?;
                            }
                            Ok(Some(Ok(sender)))
                        });
                    }
                }
                Work::H2(senders) => {
                    let of = senders.len();
                    for (i, mut sender) in std::mem::take(senders).into_iter().enumerate() {
                        let k = share(i, of);
                        let uri: Uri = format!("http://{addr}/")
                            .parse()
                            .map_err(|e| format!("uri: {e}"))?;
                        tasks.spawn(async move {
                            for _ in 0..k {
                                sender
                                    .ready()
                                    .await
                                    .map_err(|e| format!("connection closed: {e}"))?;
                                let req = request(uri.clone(), addr)?;
                                check(sender.send_request(req).await).await?;
                            }
                            Ok(Some(Err(sender)))
                        });
                    }
                }
                Work::Close(of) => {
                    let of = *of;
                    for i in 0..of {
                        let k = share(i, of);
                        tasks.spawn(async move {
                            for _ in 0..k {
                                close_request(addr).await?;
                            }
                            Ok(None)
                        });
                    }
                }
            }
            let all = async {
                let mut back = Vec::new();
                let mut first_error = None;
                while let Some(joined) = tasks.join_next().await {
                    match joined
                        .map_err(|e| format!("client task: {e}"))
                        .and_then(|r| r)
                    {
                        Ok(Some(sender)) => back.push(sender),
                        Ok(None) => {}
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                match first_error {
                    Some(e) => Err(e),
                    None => Ok(back),
                }
            };
            let back = tokio::time::timeout(timeout, all)
                .await
                .map_err(|_| format!("{n} requests took more than {timeout:?}"))??;
            // The connections go back for the next phase.
            for sender in back {
                match (&mut self.work, sender) {
                    (Work::H1(v), Ok(s)) => v.push(s),
                    (Work::H2(v), Err(s)) => v.push(s),
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

type Sender = Result<
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
>;
/// What a client task returns: its connection's sender to keep for the next phase, if any.
type TaskResult = Result<Option<Sender>, String>;

async fn tcp(addr: SocketAddr) -> Result<tokio::net::TcpStream, String> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

fn request(uri: Uri, addr: SocketAddr) -> Result<Request<Empty<Bytes>>, String> {
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.uri_mut() = uri;
    let host = HeaderValue::from_str(&addr.to_string()).map_err(|e| format!("host: {e}"))?;
    req.headers_mut().insert(HOST, host);
    Ok(req)
}

async fn check(
    resp: Result<hyper::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<(), String> {
    let resp = resp.map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if status != hyper::StatusCode::OK || body != "Hello world" {
        return Err(format!("bad response: {status} {body:?}"));
    }
    Ok(())
}

/// One `GET /` with `Connection: close` on a new connection, read to the server's close.
async fn close_request(addr: SocketAddr) -> Result<(), String> {
    let mut s = tcp(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::with_capacity(256);
    (&mut s)
        .take(64 * 1024)
        .read_to_end(&mut got)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if !got.starts_with(b"HTTP/1.1 200") || !got.ends_with(b"Hello world") {
        return Err(format!("bad response: {:?}", String::from_utf8_lossy(&got)));
    }
    Ok(())
}
