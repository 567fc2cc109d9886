//! Run with: `cargo run --example custom_signals [ADDR]`
//!
//! The Go original's example 2: SIGUSR2 may already mean something else to the application,
//! so only SIGUSR1 restarts and only SIGINT shuts down; the drain timeout is 3 s; two shutdown
//! hooks run in the order they were registered (close the database, then flush the logs).
//!
//! Listens on the inherited socket, or on ADDR (default `127.0.0.1:8877`).

mod common;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    common::init_tracing();
    let addr: SocketAddr = match std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8877".to_string())
        .parse()
    {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("bad address: {e}");
            return ExitCode::from(2);
        }
    };
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
    let server = handover::serve(listeners, tower::service_fn(common::hello))
        .restart_signals([handover::signal::SIGUSR1])
        .close_signals([handover::signal::SIGINT])
        .drain_timeout(Duration::from_secs(3))
        .on_shutdown(|| tracing::info!("shutdown hook 1: closing the database"))
        .on_shutdown_async(|| async {
            tracing::info!("shutdown hook 2: flushing the logs");
        });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server.into_future()) {
        Ok(shutdown) => {
            tracing::info!(reason = ?shutdown.reason, "server closed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("server error: {e}");
            ExitCode::FAILURE
        }
    }
}
