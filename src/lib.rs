//! Zero-downtime restarts and graceful shutdown for tokio/hyper servers, the systemd way.
//!
//! `handover` serves any `tower` service (an `axum::Router`, a `tower::service_fn`) over
//! HTTP/1.1 and HTTP/2 on listeners it gets through systemd's socket-activation protocol
//! (`LISTEN_FDS`), or binds itself when there are none. It tells the service manager what it is
//! doing with `sd_notify` (`READY=1`, `RELOADING=1`, `STOPPING=1`, `MAINPID=`, `STATUS=`).
//!
//! - **Shutdown** (`SIGINT`, `SIGTERM`; configurable): stop accepting, run the shutdown hooks in
//!   registration order, let in-flight requests finish, and return only once the last
//!   connection is closed (or cut at the deadline, 5 s by default).
//! - **Restart** (`SIGUSR1`, `SIGUSR2`; configurable): start the new binary with the very same
//!   listening sockets, passed by the same `LISTEN_FDS` protocol systemd uses; keep serving
//!   until it reports `READY=1`; then drain and exit. If the new binary is missing, crashes or
//!   never becomes ready, it is killed and reaped and nothing changes for clients.
//!
//! # Example
//! ```no_run
//! use std::convert::Infallible;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // First, while the process has one thread: take the inherited listeners (or bind).
//!     let listeners = handover::Listeners::from_env_or_bind("127.0.0.1:8877".parse()?)?;
//!     let app = tower::service_fn(|_req| async {
//!         Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
//!             bytes::Bytes::from("Hello world"),
//!         )))
//!     });
//!     let runtime = tokio::runtime::Runtime::new()?;
//!     let shutdown = runtime.block_on(handover::serve(listeners, app).into_future())?;
//!     eprintln!("server closed: {:?}", shutdown.reason);
//!     Ok(())
//! }
//! # use std::future::IntoFuture;
//! ```
//!
//! # What is here
//! - [`Listeners`], [`Listener`]: acquire the listening sockets (`LISTEN_FDS`, or bind; by
//!   name with [`Listeners::take_or_bind`]).
//! - [`serve`], [`Server`]: serve them, a service per listener name ([`HttpService`] names
//!   what can be served), with the settings; `.await` it for the [`Shutdown`] report.
//! - [`Handle`], [`State`]: restart ([`Handle::restart`] tells how it went) or shut down from
//!   code, and the lifecycle state (serving, restarting, lame duck, draining, handed over).
//! - [`ConnectionInfo`]: in every request's extensions, the peer, the local address, the
//!   listener's name (and the TLS session's details with the `rustls` feature).
//! - `TlsCertificate` (feature `rustls`): a PEM certificate chain and key in one call, with
//!   errors that name the file; TLS session tickets whose keys survive restarts
//!   (`Server::tls`).
//! - [`report_start_failure`]: a new process that fails before it is ready tells the old one
//!   why ([`RestartError::reason`]).
//!
//! A restart passes the listeners to the new process and, after the new process is ready, its
//! established plaintext HTTP/1 connections too, at a request boundary
//! ([`Server::connection_handoff`]). All `unsafe` code lives in one private module.
//!
//! # Cargo features
//! Both off by default.
//! - `axum`: requests on TCP connections also carry axum's `ConnectInfo<SocketAddr>`, so the
//!   `ConnectInfo` extractor works unchanged.
//! - `rustls`: listeners served over TLS (`Server::tls`), with `ring` as crypto provider.
//! - `metrics`: restarts, readiness, hand-off and drain durations and connections, recorded
//!   through the `metrics` crate (the table: `handover::metrics`).
//!
//! # Rules worth knowing
//! - Linux only (≥ 5.3 for `clone3` and pidfds, ≥ 5.4 as PID 1; ≥ 5.11 for
//!   `close_range(CLOSE_RANGE_CLOEXEC)`, used as an extra safety net).
//! - Take the listeners before the tokio runtime starts (`Listeners::from_env` first thing in
//!   `main`): the process then has one thread, and the `LISTEN_*` variables can also be
//!   removed from the environment. Under `#[tokio::main]` everything works the same, but the
//!   variables stay in the environment of the programs the service starts.
//! - handover logs through `tracing`: install a subscriber, or its messages (restart failures
//!   among them) go nowhere.
//! - A restart is confirmed: the old process stops serving only once the service manager's
//!   queue holds the new `MAINPID=`; otherwise the restart is rolled back.
//! - As PID 1 of a PID namespace (a container without an init), `serve` does not return after a
//!   hand-off: the process stays on as a minimal init for its successors, and exits with the
//!   serving process's exit status.
//! - One restart-capable [`Server`] per process: a restart hands over the listeners of one
//!   server, so serve every listener through one (a service per listener name).
//! - Shutdown hooks run after the listeners stop accepting and *before* the drain (as in the
//!   Go original): requests already being served go on meanwhile. Release what in-flight
//!   requests still need after `serve(..).await` has returned instead: that is after the drain.
//! - Under systemd, keep `SIGTERM` among the close signals (or set `KillSignal=` to one of
//!   them): a signal that is not handled has its default action, and `SIGTERM`'s is to die
//!   without draining.

// docs.rs (and .ci/run's docs step) builds with `--cfg docsrs`: every item that needs a feature
// is marked with it there.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "handover supports Linux only: it relies on pidfds, SO_PASSCRED and the LISTEN_FDS protocol of systemd"
);

mod accept;
#[cfg(feature = "rustls")]
mod certs;
mod conn;
mod conn_info;
mod error;
mod handle;
mod handoff;
mod hooks;
mod keeper;
mod lifecycle;
mod listen;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(not(feature = "metrics"))]
mod metrics;
mod notify;
mod reason;
mod registry;
mod restart;
mod server;
mod signals;
mod startup;
mod sys;
#[cfg(feature = "rustls")]
mod tickets;
#[cfg(feature = "rustls")]
mod tls;
pub mod upgrade;

pub use accept::HttpService;
#[cfg(feature = "rustls")]
#[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
pub use certs::{CertificateError, CertificateErrorKind, TlsCertificate};
#[cfg(feature = "rustls")]
#[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
pub use conn_info::TlsInfo;
pub use conn_info::{ConnectionInfo, Local, Peer, PeerCredentials};
pub use error::{Error, ErrorKind};
pub use handle::{Handle, RestartError, RestartErrorKind, Restarted, State, StateReached};
pub use hooks::HooksReport;
pub use listen::{Listener, Listeners, Origin};
pub use reason::report_start_failure;
pub use server::{Reason, Server, Shutdown, serve};

/// The rustls crate handover serves TLS with (feature `rustls`): build the
/// `rustls::ServerConfig` for [`Server::tls`] with this one, so that the versions match.
#[cfg(feature = "rustls")]
#[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
pub use rustls;

/// Signal numbers, for [`Server::close_signals`] and [`Server::restart_signals`].
pub mod signal {
    pub use signal_hook::consts::signal::{
        SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH,
    };
}

/// `now + d`, or a point far in the future (30 years) if that overflows: every duration the
/// application gives is accepted, `Duration::MAX` meaning "never".
pub(crate) fn instant_after(
    now: tokio::time::Instant,
    d: std::time::Duration,
) -> tokio::time::Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(30 * 365 * 86_400))
}
