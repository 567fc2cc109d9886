//! What the examples share: logging set-up and the `Hello world` handler of the Go original.

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

/// Logs to stderr; `RUST_LOG` filters (default `info`). Every line carries the pid (an old and
/// a new process share one stderr during a restart); colours only on a terminal (not in the
/// journal, nor in a file).
pub(crate) fn init_tracing() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_timer(WithPid(tracing_subscriber::fmt::time::SystemTime))
        .with_writer(std::io::stderr)
        .init();
}

/// The time of each log line, followed by the pid of the process that wrote it.
struct WithPid<T>(T);

impl<T: tracing_subscriber::fmt::time::FormatTime> tracing_subscriber::fmt::time::FormatTime
    for WithPid<T>
{
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        self.0.format_time(w)?;
        write!(w, " [{}]", std::process::id())
    }
}

/// Answers `Hello world`. For experiments and tests: `?sleep_ms=N` delays the answer by N ms
/// (at most 60 s), `?tag=T` is echoed in an `x-tag` header (to tell pipelined answers apart),
/// and the `x-pid` header tells which process answered.
pub(crate) async fn hello<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name));
    let sleep_ms = param("sleep_ms=").and_then(|v| v.parse::<u64>().ok());
    let tag = param("tag=").and_then(|t| hyper::header::HeaderValue::from_str(t).ok());
    if let Some(ms) = sleep_ms {
        tracing::info!(ms, "slow request: sleeping");
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let mut response = Response::new(Full::new(Bytes::from_static(b"Hello world")));
    let headers = response.headers_mut();
    headers.insert("x-pid", std::process::id().into());
    if let Some(tag) = tag {
        headers.insert("x-tag", tag);
    }
    Ok(response)
}

/// A duration in milliseconds from the environment, if set and valid.
#[allow(dead_code)] // not every example uses it
pub(crate) fn env_ms(var: &str) -> Option<Duration> {
    let value = std::env::var(var).ok()?;
    match value.parse() {
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => {
            tracing::warn!("{var}={value:?} is not a number of milliseconds; ignored");
            None
        }
    }
}

/// The listeners of the examples other than `hello` (which spells this out): inherited, or
/// bound on the first argument (default `127.0.0.1:8877`). Prints the Go original's log line.
#[allow(dead_code)] // not every example uses it
pub(crate) fn listen() -> Result<handover::Listeners, ExitCode> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8877".to_string());
    let addr: SocketAddr = addr.parse().map_err(|e| {
        tracing::error!("{addr:?} is not an address like 127.0.0.1:8877: {e}");
        ExitCode::from(2)
    })?;
    let listeners = handover::Listeners::from_env_or_bind(addr).map_err(|e| {
        tracing::error!("{e}");
        ExitCode::FAILURE
    })?;
    for l in listeners.iter() {
        println!("listen on: {}, pid: {}", l.url(), std::process::id());
    }
    Ok(listeners)
}

/// Runs `server` on a new multi-threaded runtime and turns the outcome into an exit code.
#[allow(dead_code)] // not every example uses it
pub(crate) fn run<F>(server: F) -> ExitCode
where
    F: IntoFuture<Output = Result<handover::Shutdown, handover::Error>>,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(server.into_future());
    // Serving is over (drained): exit without waiting for idle runtime threads to wind down,
    // each of which waits for a CPU on a busy machine.
    runtime.shutdown_background();
    match outcome {
        Ok(shutdown) => {
            tracing::info!(reason = ?shutdown.reason, ?shutdown, "server closed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("server error: {e}");
            ExitCode::FAILURE
        }
    }
}
