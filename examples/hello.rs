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
//! For experiments and the tests: `?sleep_ms=N` delays the answer by N ms, `?tag=T` comes back
//! in `x-tag` (to tell pipelined answers apart); every response carries `x-pid` (the pid that
//! answered); `HANDOVER_DRAIN_TIMEOUT_MS` and `HANDOVER_READY_TIMEOUT_MS` override the drain
//! and restart-readiness timeouts;
//! `HANDOVER_FD_STORE=1` hands the bound listener to systemd's fd store;
//! `HANDOVER_CONNECTION_HANDOFF=0` keeps established connections in the old process after a
//! restart (closing idle ones), as a build without connection hand-off would;
//! `HANDOVER_CONNECTION_INFO=0` leaves `ConnectionInfo` out of the requests;
//! `HANDOVER_HEADER_READ_TIMEOUT_MS` and `HANDOVER_SHUTDOWN_DELAY_MS` set the header-read
//! timeout and the lame duck; `HANDOVER_CURRENT_THREAD=1` serves on a current-thread runtime.
//! With `HELLO_EARLY_ROUTE=1`, `POST /early` answers `202` at once, before its body has
//! arrived, and reads the body only afterwards (after `?read_after_ms=N`), as a streaming proxy
//! or an upload queue does.

mod common;

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

fn main() -> ExitCode {
    common::init_tracing();
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

    let runtime = match std::env::var_os("HANDOVER_CURRENT_THREAD").is_some_and(|v| v == "1") {
        true => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        false => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `common::hello` itself unless the test route is asked for: the benchmark compares this
    // example with `plain`, which serves `common::hello`, and a route in front of it moves
    // each request into one more future.
    let mut server = match std::env::var_os("HELLO_EARLY_ROUTE").is_some_and(|v| v == "1") {
        true => handover::serve(listeners, tower::service_fn(route)),
        false => handover::serve(listeners, tower::service_fn(common::hello)),
    };
    if let Some(t) = common::env_ms("HANDOVER_DRAIN_TIMEOUT_MS") {
        server = server.drain_timeout(t);
    }
    if let Some(t) = common::env_ms("HANDOVER_READY_TIMEOUT_MS") {
        server = server.ready_timeout(t);
    }
    if let Some(t) = common::env_ms("HANDOVER_HEADER_READ_TIMEOUT_MS") {
        server = server.header_read_timeout(t);
    }
    if let Some(t) = common::env_ms("HANDOVER_SHUTDOWN_DELAY_MS") {
        server = server.shutdown_delay(t);
    }
    if std::env::var_os("HANDOVER_FD_STORE").is_some_and(|v| v == "1") {
        server = server.fd_store(true);
    }
    if std::env::var_os("HANDOVER_CONNECTION_HANDOFF").is_some_and(|v| v == "0") {
        server = server.connection_handoff(false);
    }
    if std::env::var_os("HANDOVER_CONNECTION_INFO").is_some_and(|v| v == "0") {
        server = server.connection_info(false);
    }
    let outcome = runtime.block_on(server.into_future());
    // Serving is over (drained): exit without waiting for idle runtime threads to wind down,
    // each of which waits for a CPU on a busy machine.
    runtime.shutdown_background();
    match outcome {
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

/// `Hello world`, and `POST /early` (with `HELLO_EARLY_ROUTE=1`).
async fn route(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/early" {
        return Ok(early(req));
    }
    common::hello(req).await
}
/// Answers `202 Accepted` before the request body has arrived, then reads the body in a task of
/// its own, after `?read_after_ms=N` (at most 60 s): the connection is still reading a request
/// while its response is complete. `?tag=T` comes back in `x-tag`.
fn early(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name));
    let read_after = param("read_after_ms=")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        .min(60_000);
    let tag = param("tag=").and_then(|t| hyper::header::HeaderValue::from_str(t).ok());
    let body = req.into_body();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(read_after)).await;
        match body.collect().await {
            Ok(body) => tracing::info!(bytes = body.to_bytes().len(), "early: request body read"),
            Err(e) => tracing::info!("early: request body ended with an error: {e}"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::from_static(b"accepted")));
    *response.status_mut() = StatusCode::ACCEPTED;
    let headers = response.headers_mut();
    headers.insert("x-pid", std::process::id().into());
    if let Some(tag) = tag {
        headers.insert("x-tag", tag);
    }
    response
}
