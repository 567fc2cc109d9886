//! Run with: `cargo run --example hello [ADDR]`
//!
//! The Go original's example 1: answers `Hello world` to every request, shuts down gracefully
//! on SIGINT/SIGTERM and restarts without dropping a request on SIGUSR1/SIGUSR2.
//!
//! It listens on the socket it inherits (systemd, systemfd, a restarting parent), or binds
//! ADDR (first argument, else `$HANDOVER_ADDR`, else `127.0.0.1:8877`).
//!
//! ```text
//! kill -USR1 <pid>   # restart: a new process takes over the same socket
//! kill <pid>         # shut down after the requests in flight
//! ```
//!
//! For experiments and the tests: `?sleep_ms=N` delays the answer by N ms; every response
//! carries `x-pid` (the pid that answered); `HANDOVER_DRAIN_TIMEOUT_MS` and
//! `HANDOVER_READY_TIMEOUT_MS` override the drain and restart-readiness timeouts.

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let addr = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("HANDOVER_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:8877".to_string());
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{addr:?} is not an address like 127.0.0.1:8877: {e}");
            return ExitCode::from(2);
        }
    };

    // Before the runtime starts: the process has one thread, so handover can also remove the
    // LISTEN_* variables from the environment.
    let listeners = match handover::Listeners::from_env_or_bind(addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for l in listeners.iter() {
        println!("listen on: {}, pid: {}", l.url(), std::process::id());
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut server = handover::serve(listeners, tower::service_fn(hello));
    if let Some(ms) = env_ms("HANDOVER_DRAIN_TIMEOUT_MS") {
        server = server.drain_timeout(ms);
    }
    if let Some(ms) = env_ms("HANDOVER_READY_TIMEOUT_MS") {
        server = server.ready_timeout(ms);
    }
    match runtime.block_on(server.into_future()) {
        Ok(shutdown) => {
            tracing::info!(?shutdown, "server closed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("server error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn hello(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let sleep_ms = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("sleep_ms=")))
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = sleep_ms {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let mut response = Response::new(Full::new(Bytes::from_static(b"Hello world")));
    response.headers_mut().insert("x-pid", std::process::id().into());
    Ok(response)
}

fn env_ms(var: &str) -> Option<Duration> {
    let value = std::env::var(var).ok()?;
    match value.parse() {
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => {
            tracing::warn!("{var}={value:?} is not a number of milliseconds; ignored");
            None
        }
    }
}
