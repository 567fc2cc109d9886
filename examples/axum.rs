//! Run with: `cargo run --example axum [ADDR]`
//!
//! An `axum::Router` served by handover: the shape is axum's own
//! `serve(listener, app).with_graceful_shutdown(..)`, plus restarts, socket activation and
//! sd_notify. Listens on the inherited socket, or on ADDR (default `127.0.0.1:8877`).

mod common;

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::init_tracing();
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8877".to_string())
        .parse()?;
    // Under #[tokio::main] the runtime's threads already exist: this works the same, but
    // leaves the LISTEN_* variables in the environment (see Listeners::from_env).
    let listeners = handover::Listeners::from_env_or_bind(addr)?;
    for l in listeners.iter() {
        println!("listen on: {}, pid: {}", l.url(), std::process::id());
    }
    let app = Router::new()
        .route("/", get(common::hello))
        .route("/health", get(|| async { "ok" }));
    let shutdown = handover::serve(listeners, app)
        .on_shutdown_async(|| async { tracing::info!("flushing caches") })
        .await?;
    tracing::info!(?shutdown, "server closed");
    Ok(())
}
