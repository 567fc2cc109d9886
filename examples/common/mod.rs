//! What the examples share: logging set-up and the `Hello world` handler of the Go original.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub(crate) fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Answers `Hello world`. For experiments and tests: `?sleep_ms=N` delays the answer by N ms
/// (at most 60 s), and the `x-pid` header tells which process answered.
pub(crate) async fn hello<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let sleep_ms = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("sleep_ms=")))
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = sleep_ms {
        tracing::info!(ms, "slow request: sleeping");
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let mut response = Response::new(Full::new(Bytes::from_static(b"Hello world")));
    response
        .headers_mut()
        .insert("x-pid", std::process::id().into());
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
