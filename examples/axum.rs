//! Run with: `cargo run --features axum --example axum [WEB_ADDR] [ADMIN]`
//!
//! A realistic axum service under handover: shared state, a slow route, the peer address
//! through axum's own `ConnectInfo` extractor, an admin router on a listener of its own that
//! restarts and stops the service through the [`handover::Handle`], readiness and liveness
//! probes that read the lifecycle state, and a shutdown hook.
//!
//! Two listeners, by name: `web` and `admin`. Inherited when the service manager passes them
//! (systemd's `FileDescriptorName=web` / `=admin`, `systemd-socket-activate --fdname=web:admin`;
//! by address when unnamed, as from `systemfd -s http::8877 -s http::8878`), bound otherwise: `web` on WEB_ADDR (default
//! `127.0.0.1:8877`), `admin` on ADMIN (default `127.0.0.1:8878`, or `unix:/path/admin.sock`).
//!
//! ```text
//! web:   GET /            Hello world
//!        GET /slow?ms=N   answers after N ms (default 2000)
//!        GET /whoami      the peer address, from axum's ConnectInfo<SocketAddr>
//!        GET /healthz     readiness: 200, or 503 once a shutdown began (the lame duck)
//!        GET /livez       liveness: 200 until the process exits
//! admin: GET /ping        Hello world (for load balancer checks of the admin listener)
//!        POST /restart    restart through the handle: 200 "restarted: pid N", 409 if one is
//!                         already running, 500 "restart failed: ..." with the new process's
//!                         pid, how it ended and its own reason if it failed before READY=1
//!        POST /shutdown   graceful shutdown (?now: cut everything)
//!        GET /state       the lifecycle state
//!        GET /whoami      the connection as handover describes it (Unix peers: their uid/pid)
//!        GET /metrics     handover's metrics in Prometheus's text format (with
//!                         `--features axum,metrics`; 404 without)
//! ```
//! Every response carries `x-pid`, the process that answered.
//!
//! `HANDOVER_SHUTDOWN_DELAY_MS` sets the lame duck (behind a load balancer or in Kubernetes:
//! see the README), `HANDOVER_DRAIN_TIMEOUT_MS` and `HANDOVER_READY_TIMEOUT_MS` the timeouts.
//! With the `metrics` feature, a Prometheus recorder is installed before serving (the
//! exporter's own HTTP listener is not used: `/metrics` on the admin listener renders it), and
//! `HANDOVER_METRICS_AT_EXIT=1` also prints the last rendering to stdout when serving ends,
//! each line prefixed with `metrics at exit, pid N:`, as a push-based exporter would send it:
//! what an old process records at the end of its drain is otherwise gone with it.
//! `HANDOVER_CLOSE_UNUSED=1` closes inherited sockets other than `web` and `admin` with a
//! warning; without it they are an error at start-up (exit status 1).
//! `HANDOVER_RESTARTS=0` turns handover's restarts off (in a container, where a rolling
//! update replaces the process instead: `deploy/kubernetes/`); `POST /restart` then says so.
//!
//! Why no `#[tokio::main]`: the listeners are taken first, while the process has one thread,
//! so that handover can also remove the `LISTEN_*` variables from the environment (removing
//! variables is unsound once other threads run). Under `#[tokio::main]` everything works the
//! same, but the variables stay in the environment of the programs the service starts.

mod common;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};

/// What the handlers share.
struct App {
    handle: handover::Handle,
    hits: AtomicU64,
    #[cfg(feature = "metrics")]
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

fn main() -> ExitCode {
    common::init_tracing();
    // Before serving, so that handover's first figures (its readiness) are recorded.
    #[cfg(feature = "metrics")]
    let metrics = match install_metrics() {
        Ok(handle) => handle,
        Err(e) => {
            tracing::error!("could not install the metrics recorder: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut args = std::env::args().skip(1);
    let web_addr = args.next().unwrap_or_else(|| "127.0.0.1:8877".to_string());
    let admin_addr = args.next().unwrap_or_else(|| "127.0.0.1:8878".to_string());
    let listeners = match listeners(&web_addr, &admin_addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for l in listeners.iter() {
        println!(
            "listen on: {} ({}), pid: {}",
            l.url(),
            l.name(),
            std::process::id()
        );
    }

    let server = handover::Server::new(listeners);
    let app = Arc::new(App {
        handle: server.handle(),
        hits: AtomicU64::new(0),
        #[cfg(feature = "metrics")]
        metrics: metrics.clone(),
    });
    let mut server = server
        .service("web", web(Arc::clone(&app)))
        .service("admin", admin(Arc::clone(&app)))
        .on_shutdown_async(move || async move {
            let hits = app.hits.load(Ordering::Relaxed);
            tracing::info!(hits, "shutdown hook: flushing the hit counter");
        });
    if let Some(d) = common::env_ms("HANDOVER_SHUTDOWN_DELAY_MS") {
        server = server.shutdown_delay(d);
    }
    if let Some(d) = common::env_ms("HANDOVER_DRAIN_TIMEOUT_MS") {
        server = server.drain_timeout(d);
    }
    if let Some(d) = common::env_ms("HANDOVER_READY_TIMEOUT_MS") {
        server = server.ready_timeout(d);
    }
    match std::env::var("HANDOVER_RESTARTS").as_deref() {
        Ok("0") => server = server.restarts(false),
        Ok("1") | Err(_) => {}
        Ok(other) => tracing::warn!("HANDOVER_RESTARTS={other:?} is neither 0 nor 1; ignored"),
    }
    let code = common::run(server);
    #[cfg(feature = "metrics")]
    if std::env::var("HANDOVER_METRICS_AT_EXIT").as_deref() == Ok("1") {
        let pid = std::process::id();
        for line in metrics.render().lines() {
            println!("metrics at exit, pid {pid}: {line}");
        }
    }
    code
}

/// A Prometheus recorder for the `metrics` facade, without the exporter's HTTP listener: the
/// admin router renders it. Every `_seconds` histogram gets buckets (else the exporter would
/// render summaries, which cannot be aggregated across processes).
#[cfg(feature = "metrics")]
fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle, String> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".to_string()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())
}

/// `GET /metrics`: the Prometheus text format.
#[cfg(feature = "metrics")]
async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// `web` and `admin`, inherited by name or bound.
fn listeners(web: &str, admin: &str) -> Result<handover::Listeners, String> {
    let mut inherited = handover::Listeners::from_env().map_err(|e| e.to_string())?;
    let web: SocketAddr = web
        .parse()
        .map_err(|e| format!("{web:?} is not an address like 127.0.0.1:8877: {e}"))?;
    let web = inherited
        .take_or_bind("web", web)
        .map_err(|e| e.to_string())?;
    let admin = match admin.strip_prefix("unix:") {
        Some(path) => inherited.take_or_bind_unix("admin", path),
        None => {
            let addr: SocketAddr = admin
                .parse()
                .map_err(|e| format!("{admin:?} is not an address or unix:PATH: {e}"))?;
            inherited.take_or_bind("admin", addr)
        }
    }
    .map_err(|e| e.to_string())?;
    // Any other socket the service manager passed is an error when the server starts (a name
    // this code does not take, most likely), unless closing it is asked for.
    if std::env::var("HANDOVER_CLOSE_UNUSED").as_deref() == Ok("1") {
        inherited.close_unused();
    }
    Ok([web, admin].into())
}

/// The public router.
fn web(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(common::hello))
        .route("/slow", get(slow))
        .route("/whoami", get(whoami))
        .route("/healthz", get(healthz))
        .route("/livez", get(|| async { "alive" }))
        .with_state(app)
        .layer(axum::middleware::map_response(with_pid))
}

/// The admin router, on a listener of its own.
fn admin(app: Arc<App>) -> Router {
    let router = Router::new();
    #[cfg(feature = "metrics")]
    let router = router.route("/metrics", get(metrics));
    router
        .route("/ping", get(common::hello))
        .route("/restart", post(restart))
        .route("/shutdown", post(shutdown))
        .route(
            "/state",
            get(|State(app): State<Arc<App>>| async move { app.handle.state().to_string() }),
        )
        .route(
            "/whoami",
            get(
                |Extension(conn): Extension<handover::ConnectionInfo>| async move {
                    format!(
                        "listener={} peer={:?} local={:?}",
                        conn.listener(),
                        conn.peer(),
                        conn.local()
                    )
                },
            ),
        )
        .with_state(app)
        .layer(axum::middleware::map_response(with_pid))
}

async fn slow(State(app): State<Arc<App>>, RawQuery(query): RawQuery) -> &'static str {
    app.hits.fetch_add(1, Ordering::Relaxed);
    let ms = query
        .as_deref()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(2000)
        .min(60_000);
    tracing::info!(ms, "slow request: sleeping");
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "slow answer"
}

/// axum's own extractor: the peer address reaches it because handover puts
/// `ConnectInfo<SocketAddr>` in every request of a TCP connection (the `axum` feature).
async fn whoami(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(conn): Extension<handover::ConnectionInfo>,
) -> String {
    format!("peer={peer} listener={}", conn.listener())
}

/// Readiness: fails from the moment a shutdown begins, so a load balancer (or Kubernetes)
/// stops sending traffic while the lame duck still serves what comes.
async fn healthz(State(app): State<Arc<App>>) -> Response {
    let state = app.handle.state();
    if state.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{state}\n")).into_response()
    } else {
        format!("ok ({state})\n").into_response()
    }
}

async fn restart(State(app): State<Arc<App>>) -> Response {
    match app.handle.restart().await {
        Ok(r) => format!("restarted: pid {} serves now\n", r.pid).into_response(),
        Err(e) => {
            let status = match e.kind() {
                handover::RestartErrorKind::AlreadyRestarting => StatusCode::CONFLICT,
                handover::RestartErrorKind::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            // A failed new process: its pid, how it ended and the reason it gave
            // (`e.reason()`), in one sentence.
            let body = match e.kind() {
                handover::RestartErrorKind::Failed => format!("restart failed: {e}\n"),
                _ => format!("{e}\n"),
            };
            (status, body).into_response()
        }
    }
}

async fn shutdown(State(app): State<Arc<App>>, RawQuery(query): RawQuery) -> &'static str {
    if query.as_deref() == Some("now") {
        app.handle.shutdown_now();
        "shutting down now\n"
    } else {
        app.handle.shutdown();
        "shutting down\n"
    }
}

async fn with_pid(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert("x-pid", HeaderValue::from(std::process::id()));
    response
}
