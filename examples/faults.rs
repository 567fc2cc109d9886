//! Run with: `HOOKS=ok,panic,hang,ok cargo run --example faults [ADDR]`
//!
//! The hello server with shutdown hooks that misbehave on purpose, to see (and test) what
//! handover does with them: hooks run in order, a panicking hook is logged and the next one
//! runs, a hook still running at the deadline is abandoned and the rest are skipped.
//!
//! `HOOKS` is a comma-separated list of: `ok`, `panic`, `hang` (sync hooks), `async-ok`,
//! `async-panic`, `async-hang`, or `sleep:MS` (a sync hook that takes MS milliseconds).
//! `HANDOVER_DRAIN_TIMEOUT_MS` sets the deadline (default 5000), `HANDOVER_READY_TIMEOUT_MS`
//! the restart's.
//!
//! `GET /upgrade` with `Connection: upgrade`, `Upgrade: echo` switches the connection to a
//! byte echo, like a WebSocket would: a connection hyper no longer drives, which a drain must
//! still wait for, and cut at its deadline.
//!
//! Misconfigurations, for the start-up error tests: `SERVICES=a,b,*` serves the listeners
//! named `a` and `b` with a service each and the rest with a default one (`*`); `SECOND_SERVER=1`
//! starts a second restart-capable server in the same process once the first serves;
//! `MAX_HEADERS=N` sets hyper's HTTP/1 header limit.
//!
//! `HANDOVER_SERVE_FOR_MS=N` drops the server future after N ms (as `tokio::time::timeout`
//! would), then keeps the runtime running for `HANDOVER_LINGER_MS` (default 3000) before
//! exiting 0: to see what a dropped server leaves behind. `AFTER_SERVE_MS=N` sleeps N ms after
//! serving, as an application's clean-up would.
//!
//! `PANIC_AT_START_IF=PATH` panics at start-up (after taking the listeners) if PATH exists, and
//! `BAD_SERVICE_IF=PATH` then serves a listener name that does not exist: a new binary that
//! fails before `READY=1`, for the tests of a failed restart's reason.
//!
//! `GET /env` runs `env` as a subprocess and answers with its output: what a program the
//! application starts sees of the environment (no `LISTEN_*`, `NOTIFY_SOCKET`, `WATCHDOG_*`).
//! `GET /state` answers with the server's state (`serving`, `handed over`, ...).
//!
//! Cues for a successor that misbehaves after its `READY=1` (set them for the new binary only,
//! with a wrapper script: a restart gives the new process the old one's environment), each N
//! ms after the server first serves (it reports `READY=1` right then):
//! `STOP_AFTER_READY_MS=N` stops the whole process (`SIGSTOP`; a test sends `SIGCONT`), as a
//! process descheduled or blocked would be; `DIE_AFTER_READY_MS=N` exits with status 7 (or
//! `DIE_WITH`).

mod common;

use std::path::Path;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

/// The server's handle, for `GET /state`.
static HANDLE: OnceLock<handover::Handle> = OnceLock::new();

async fn route(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    if req.uri().path() == "/env" {
        let out = tokio::process::Command::new("env").output().await;
        let body = match out {
            Ok(out) => out.stdout,
            Err(e) => format!("could not run env: {e}").into_bytes(),
        };
        return Ok(hyper::Response::new(http_body_util::Full::new(body.into())));
    }
    if req.uri().path() == "/state" {
        let state = HANDLE.get().map_or("unknown", |h| h.state().as_str());
        let mut response =
            hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(state)));
        response
            .headers_mut()
            .insert("x-pid", std::process::id().into());
        return Ok(response);
    }
    if req.uri().path() != "/upgrade" {
        return common::hello(req).await;
    }
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                tracing::info!("upgraded: echoing");
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                tracing::info!("upgraded connection ended");
            }
            Err(e) => tracing::warn!("upgrade failed: {e}"),
        }
    });
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
    *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("echo"),
    );
    Ok(response)
}

/// `AFTER_SERVE_MS=N`: the application's clean-up after serving, N ms long. Signals have their
/// default action again by then: a `SIGTERM` ends the process.
fn after_serve(code: ExitCode) -> ExitCode {
    if let Some(cleanup) = common::env_ms("AFTER_SERVE_MS") {
        tracing::info!(?cleanup, "after serve: cleaning up");
        std::thread::sleep(cleanup);
        tracing::info!("after serve: clean-up done");
    }
    code
}

fn main() -> ExitCode {
    common::init_tracing();
    let listeners = match common::listen() {
        Ok(l) => l,
        Err(code) => return code,
    };
    let service = tower::service_fn(route);
    // Broken deploys, for the tests of a failed restart's reason: a new process that finds the
    // file named by PANIC_AT_START_IF panics before READY=1; one that finds BAD_SERVICE_IF's
    // serves a listener name that does not exist (the server fails to start).
    let exists = |var: &str| std::env::var_os(var).is_some_and(|p| Path::new(&p).exists());
    if exists("PANIC_AT_START_IF") {
        panic!("PANIC_AT_START_IF: the file exists, so this process panics");
    }
    if exists("BAD_SERVICE_IF") {
        return common::run(handover::Server::new(listeners).service("no-such-listener", service));
    }
    let mut server = match std::env::var("SERVICES") {
        // SERVICES=a,b,*: a service for the listeners named a and b, and a default one.
        Ok(names) => names.split(',').filter(|name| !name.is_empty()).fold(
            handover::Server::new(listeners),
            |s, name| match name {
                "*" => s.default_service(service),
                name => s.service(name, service),
            },
        ),
        Err(_) => handover::serve(listeners, service),
    };
    if let Some(max) = std::env::var("MAX_HEADERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        server = server.http1(|h1| {
            h1.max_headers(max);
        });
    }
    if let Some(t) = common::env_ms("HANDOVER_DRAIN_TIMEOUT_MS") {
        server = server.drain_timeout(t);
    }
    if let Some(t) = common::env_ms("HANDOVER_READY_TIMEOUT_MS") {
        server = server.ready_timeout(t);
    }
    let hooks = std::env::var("HOOKS").unwrap_or_default();
    for (i, kind) in hooks.split(',').filter(|k| !k.is_empty()).enumerate() {
        let n = i + 1;
        let kind = kind.to_string();
        server = match kind.as_str() {
            "ok" => server.on_shutdown(move || tracing::info!("hook {n} (ok) done")),
            "panic" => server.on_shutdown(move || panic!("hook {n} panics on purpose")),
            "hang" => server.on_shutdown(move || {
                tracing::info!("hook {n} (hang) hangs");
                std::thread::sleep(Duration::from_secs(3600));
            }),
            "async-ok" => server.on_shutdown_async(move || async move {
                tracing::info!("hook {n} (async-ok) done");
            }),
            "async-panic" => server.on_shutdown_async(move || async move {
                tokio::task::yield_now().await;
                panic!("hook {n} panics on purpose");
            }),
            "async-hang" => server.on_shutdown_async(move || async move {
                tracing::info!("hook {n} (async-hang) hangs");
                std::future::pending::<()>().await;
            }),
            other => match other.strip_prefix("sleep:").and_then(|ms| ms.parse().ok()) {
                Some(ms) => server.on_shutdown(move || {
                    tracing::info!("hook {n} (sleep) sleeping {ms} ms");
                    std::thread::sleep(Duration::from_millis(ms));
                    tracing::info!("hook {n} (sleep) done");
                }),
                None => {
                    tracing::error!("HOOKS: unknown hook kind {other:?}");
                    return ExitCode::from(2);
                }
            },
        };
    }
    if let Some(limit) = common::env_ms("HANDOVER_SERVE_FOR_MS") {
        let linger = common::env_ms("HANDOVER_LINGER_MS").unwrap_or(Duration::from_secs(3));
        return after_serve(serve_for(server, limit, linger));
    }
    let _ = HANDLE.set(server.handle());
    if std::env::var_os("SECOND_SERVER").is_none() {
        let handle = server.handle();
        return after_serve(common::run(async move {
            misbehave_after_ready(handle);
            server.await
        }));
    }
    // A second restart-capable server in the same process, once the first serves: refused.
    let mut state = server.handle().watch();
    common::run(async move {
        tokio::spawn(async move {
            let _ = state.wait_for(|s| *s == handover::State::Serving).await;
            let second = handover::Listeners::bind(([127, 0, 0, 1], 0).into())
                .map(|l| handover::serve(l, tower::service_fn(route)));
            match second {
                Ok(second) => match second.await {
                    Ok(_) => tracing::error!("second server: served"),
                    Err(e) => tracing::error!("second server: {e}"),
                },
                Err(e) => tracing::error!("second server: could not bind: {e}"),
            }
        });
        server.await
    })
}

/// Runs `server` for at most `limit`, then drops it and lets the runtime run on for `linger`.
fn serve_for<F>(server: F, limit: Duration, linger: Duration) -> ExitCode
where
    F: std::future::IntoFuture<Output = Result<handover::Shutdown, handover::Error>>,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match tokio::time::timeout(limit, server.into_future()).await {
            Ok(Ok(shutdown)) => tracing::info!(reason = ?shutdown.reason, "server closed"),
            Ok(Err(e)) => tracing::error!("server error: {e}"),
            Err(_) => {
                tracing::info!(?limit, "serve future dropped by a timeout; lingering");
                tokio::time::sleep(linger).await;
                tracing::info!("linger over");
            }
        }
    });
    ExitCode::SUCCESS
}

/// `STOP_AFTER_READY_MS`, `DIE_AFTER_READY_MS`: see the module docs.
fn misbehave_after_ready(handle: handover::Handle) {
    let stop = common::env_ms("STOP_AFTER_READY_MS");
    let die = common::env_ms("DIE_AFTER_READY_MS");
    if stop.is_none() && die.is_none() {
        return;
    }
    let mut state = handle.watch();
    tokio::spawn(async move {
        let _ = state.wait_for(|s| *s == handover::State::Serving).await;
        if let Some(after) = stop {
            tokio::time::sleep(after).await;
            tracing::warn!("STOP_AFTER_READY_MS: stopping this process (SIGSTOP)");
            let me = rustix::process::getpid();
            if let Err(e) = rustix::process::kill_process(me, rustix::process::Signal::STOP) {
                tracing::error!("SIGSTOP: {e}");
            }
        }
        if let Some(after) = die {
            let code = std::env::var("DIE_WITH")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(7);
            tokio::time::sleep(after).await;
            tracing::warn!("DIE_AFTER_READY_MS: exiting with status {code}");
            std::process::exit(code);
        }
    });
}
