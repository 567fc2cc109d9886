//! The connection layer below the accept loops: one connection, from its first byte to its
//! close, cut or hand-off.
//!
//! Stacked one way (each module uses only those below it):
//! ```text
//! serve    detect → (TLS handshake) → hyper HTTP/1 or HTTP/2, until a directive or the end
//!   ├── service   the application's service and response body, as hyper calls them
//!   ├── io        the tracked socket and replayed bytes (one tracking path for both)
//!   │     └── registry (crate::registry): every live connection, directives broadcast
//!   └── control   one connection's phase and directives; depends on nothing
//! ```
//!
//! # The phase is the truth
//! A connection is idle ([`control::Phase::Idle`]) only when no request is being read or
//! answered, no byte of a next request is buffered anywhere (hyper's buffer is checked when
//! the connection is taken apart; replayed bytes and TLS records count as read), and the
//! request's body, if it had one, is over. Only then may an HTTP/1 connection be closed or
//! passed on; every other directive waits for that boundary or is the cut.

pub(crate) mod control;
pub(crate) mod io;
pub(crate) mod serve;
pub(crate) mod service;

pub(crate) use io::{Sock, TrackedIo};
pub(crate) use serve::{ConnContext, HandOff, Http, PassOutcome, Tls};

#[cfg(test)]
mod tests;
