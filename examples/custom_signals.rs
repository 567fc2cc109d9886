//! Run with: `cargo run --example custom_signals [ADDR]`
//!
//! The Go original's example 2: SIGUSR2 may already mean something else to the application,
//! so only SIGUSR1 restarts and only SIGINT shuts down; the drain timeout is 3 s; two shutdown
//! hooks run in the order they were registered (close the database, then flush the logs).
//!
//! Listens on the inherited socket, or on ADDR (default `127.0.0.1:8877`).
//!
//! Note: SIGTERM is then not handled and kills the process without a drain. Under systemd,
//! pair this with `KillSignal=SIGINT` in the service.

mod common;

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    common::init_tracing();
    // Before the runtime: the process still has one thread (see Listeners::from_env).
    let listeners = match common::listen() {
        Ok(l) => l,
        Err(code) => return code,
    };
    let server = handover::serve(listeners, tower::service_fn(common::hello))
        .restart_signals([handover::signal::SIGUSR1])
        .close_signals([handover::signal::SIGINT])
        .drain_timeout(Duration::from_secs(3))
        .on_shutdown(|| tracing::info!("shutdown hook 1: closing the database"))
        .on_shutdown_async(|| async {
            tracing::info!("shutdown hook 2: flushing the logs");
        });
    common::run(server)
}
