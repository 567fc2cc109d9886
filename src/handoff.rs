//! Passing established HTTP/1 connections to the successor, so that an idle keep-alive client
//! never sees its connection closed by a restart.
//!
//! Closing an idle keep-alive connection races with the client's next request (RFC 9112
//! 9.3.1): on a real network the request may be on the wire for a round trip, and is lost.
//! Instead, after a hand-off, the old process passes every plaintext HTTP/1 connection to the
//! new process at a request boundary: at once if it is idle, right after its response if it is
//! busy. The socket goes over the parent/child channel with `SCM_RIGHTS`, together with the
//! bytes hyper had read from it that no request consumed (pipelined or early bytes) and the
//! name of its listener; the new process serves it exactly as a freshly accepted connection,
//! first feeding it those bytes. The client sees nothing.
//!
//! # The channel
//! A `SOCK_SEQPACKET` socket pair made for each restart (see `restart`): the new process has
//! its end at the fd named by `HANDOVER_CHANNEL_FD`, and says it takes connections with the
//! [`ACCEPTS_CONNECTIONS`] line in its `READY=1` message. Messages, old → new:
//! - `CONNS <seq> <n>\n`, then for each connection `<listener name>\n<byte count>\n<bytes>`,
//!   with the `n` sockets attached (`SCM_RIGHTS`, in the same order);
//! - `UPGRADED <seq> <n>\n`, then for each connection
//!   `<listener name>\n<byte count>\n<state length>\n<bytes><state>`, with the `n` sockets
//!   attached: upgraded connections the application hands over (see `upgrade`), sent only to
//!   a process that said it takes them ([`ACCEPTS_UPGRADED`]); a batch of its own (the same
//!   sequence and acknowledgement as `CONNS`), served by the successor's `resume_upgraded`
//!   handler;
//! - `DONE\n`: nothing more will come.
//!
//! New → old: `ACK <seq>\n`, sent as soon as a batch is received, **before** any of its
//! connections is read from.
//!
//! # Invariants
//! - A connection is served by exactly one process at any time. The old process stops
//!   serving it before passing it (hyper has let go of it: it was taken apart between two
//!   requests), and the new one starts only after acknowledging it. The old process keeps its
//!   copy of the socket until the acknowledgement: if the new process dies before that, it never
//!   read from the connection, so the old one can still serve it (fallback).
//! - The old process closes its copy only after the acknowledgement, and never shuts a passed
//!   socket down (a shutdown acts on the socket, not on one process's fd): the forced cut skips
//!   connections in flight.
//! - Batches of at most [`MAX_BATCH`] sockets and [`MAX_BATCH_BYTES`] bytes, at most
//!   [`WINDOW`] batches unacknowledged: a flood of connections moves without blocking the old
//!   process, and without more sockets in flight than the kernel allows a sender.
//! - What goes wrong (a send fails, the new process dies or stops reading) falls back to
//!   what happens without a successor that takes connections: `Connection: close` on the next
//!   response, and the keep-alive grace, for every connection not acknowledged yet.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::accept::{ConnContext, ServeConn};
use crate::conn::{CLOSE_RESPONSES, HandOff, PassOutcome, TrackedIo};
use crate::notify::Connected;
use crate::upgrade::{ResumeHandler, Resumed};

/// The line a new process adds to its `READY=1` when it takes connections.
pub(crate) const ACCEPTS_CONNECTIONS: &str = "X_HANDOVER_CONNECTIONS=1";

/// The line a new process adds to its `READY=1` when it also takes upgraded connections (it
/// has a `resume_upgraded` handler).
pub(crate) const ACCEPTS_UPGRADED: &str = "X_HANDOVER_UPGRADED=1";

/// Most sockets in one message (the kernel allows 253).
pub(crate) const MAX_BATCH: usize = 64;
/// Most carried bytes in one message; a connection with more is not passed.
pub(crate) const MAX_BATCH_BYTES: usize = 48 * 1024;
/// Most carried bytes of one upgraded connection (what it read and did not consume, its state).
const MAX_UPGRADED_BYTES: usize = crate::upgrade::MAX_UNREAD + crate::upgrade::MAX_STATE;
/// Most bytes of an `UPGRADED` message besides its first line: one connection at its largest
/// fits (with its lines), or several smaller ones.
const MAX_UPGRADED_BATCH_BYTES: usize = MAX_UPGRADED_BYTES + 1024;
/// The receive buffer: the largest message of either kind, and its header lines.
const MAX_MESSAGE: usize = if MAX_BATCH_BYTES > MAX_UPGRADED_BATCH_BYTES {
    MAX_BATCH_BYTES
} else {
    MAX_UPGRADED_BATCH_BYTES
} + 4096;
/// Most batches sent and not acknowledged.
pub(crate) const WINDOW: usize = 8;
/// How long the successor has to acknowledge a batch (it does on receipt: a healthy process
/// takes microseconds). After that, nothing more is passed.
const ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// The old process's side.

/// A connection on its way to the successor, and where to report how it went.
struct Parcel {
    io: TrackedIo,
    read: Bytes,
    /// The application's state, for an upgraded connection (sent alone, as `UPGRADED`).
    upgraded: Option<Bytes>,
    done: oneshot::Sender<PassOutcome>,
}

/// Where connection tasks put the connections they pass; see [`send`].
#[derive(Debug)]
pub(crate) struct Outbox {
    tx: mpsc::UnboundedSender<Parcel>,
    /// The counters (a connection refused here is kept, like one given back) and the failure.
    sent: Arc<Sent>,
    /// The successor takes upgraded connections too.
    accepts_upgraded: bool,
}

impl HandOff for Outbox {
    fn pass(&self, io: TrackedIo, read: Bytes) -> oneshot::Receiver<PassOutcome> {
        let (done, outcome) = oneshot::channel();
        if self.sent.failed.is_cancelled() || entry_size(&io, &read) > MAX_BATCH_BYTES {
            let parcel = Parcel {
                io,
                read,
                upgraded: None,
                done,
            };
            give_back(std::iter::once(parcel), &self.sent);
            return outcome;
        }
        io.conn().mark_in_flight(true);
        let parcel = Parcel {
            io,
            read,
            upgraded: None,
            done,
        };
        if let Err(mpsc::error::SendError(p)) = self.tx.send(parcel) {
            give_back(std::iter::once(p), &self.sent);
        }
        outcome
    }

    fn pass_upgraded(
        &self,
        io: TrackedIo,
        read: Bytes,
        state: Bytes,
    ) -> oneshot::Receiver<PassOutcome> {
        let (done, outcome) = oneshot::channel();
        let parcel = Parcel {
            io,
            read,
            upgraded: Some(state),
            done,
        };
        if !self.accepts_upgraded
            || self.sent.failed.is_cancelled()
            || parcel.read.len() + parcel.upgraded.as_ref().map_or(0, Bytes::len)
                > MAX_UPGRADED_BYTES
        {
            give_back(std::iter::once(parcel), &self.sent);
            return outcome;
        }
        parcel.io.conn().mark_in_flight(true);
        if let Err(mpsc::error::SendError(p)) = self.tx.send(parcel) {
            give_back(std::iter::once(p), &self.sent);
        }
        outcome
    }
}

/// What a connection takes of a batch message: its listener's name, its byte count, the bytes
/// (and for an upgraded one its state length and state).
fn entry_size(io: &TrackedIo, read: &Bytes) -> usize {
    io.conn().info.listener().len() + 24 + read.len()
}

fn parcel_size(p: &Parcel) -> usize {
    entry_size(&p.io, &p.read) + p.upgraded.as_ref().map_or(0, |s| 24 + s.len())
}

/// How the passing went, for the drain's report.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    /// Connections the successor acknowledged.
    pub(crate) passed: AtomicUsize,
    /// Connections given back (the channel failed, or too much read-ahead to pass): served
    /// here, with `Connection: close`.
    pub(crate) kept: AtomicUsize,
    /// Connections sent and never acknowledged by a successor that stopped answering: they
    /// are in its queue, its if it ever reads them (never served twice, so not ours again).
    pub(crate) unconfirmed: AtomicUsize,
    /// Cancelled when the channel failed; every later connection is kept.
    pub(crate) failed: CancellationToken,
}

/// Starts passing connections to the successor over `channel`. Returns where to put them and
/// the counters; the task ends once the outbox is dropped and everything sent was
/// acknowledged (then it sends `DONE`), or the channel fails.
/// `accepts_upgraded`: the successor also takes upgraded connections.
pub(crate) fn send(
    channel: Connected,
    to_pid: u32,
    accepts_upgraded: bool,
) -> (Arc<Outbox>, Arc<Sent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sent = Arc::new(Sent::default());
    let outbox = Arc::new(Outbox {
        tx,
        sent: Arc::clone(&sent),
        accepts_upgraded,
    });
    tokio::spawn(sender(channel, rx, Arc::clone(&sent), to_pid));
    (outbox, sent)
}

async fn sender(
    channel: Connected,
    mut rx: mpsc::UnboundedReceiver<Parcel>,
    sent: Arc<Sent>,
    to_pid: u32,
) {
    let mut unacked: VecDeque<(u64, Instant, Vec<Parcel>)> = VecDeque::new();
    // A parcel that did not fit in the last batch: the first of the next one.
    let mut next: Option<Parcel> = None;
    let mut seq = 0u64;
    let mut open = true;
    let channel = channel.async_fd();
    let failure = loop {
        if !open && next.is_none() && unacked.is_empty() {
            // Everything passed: tell the successor, which then stops listening.
            let _ = channel
                .async_io(Interest::WRITABLE, |fd| send_msg(fd, b"DONE\n", &[]))
                .await;
            break None;
        }
        let room = unacked.len() < WINDOW;
        let oldest = unacked.front().map(|(_, at, _)| *at + ACK_TIMEOUT);
        tokio::select! {
            biased;
            ack = channel.async_io(Interest::READABLE, recv_ack), if !unacked.is_empty() => match ack {
                Ok(Some(acked)) => {
                    if let Err(e) = acknowledged(&mut unacked, acked, &sent) {
                        break Some(Failure::Protocol(e));
                    }
                }
                Ok(None) => break Some(Failure::Closed),
                Err(e) => break Some(Failure::Protocol(e)),
            },
            () = sleep_until_some(oldest) => break Some(Failure::Silent),
            parcel = next_parcel(&mut next, &mut rx), if room && (open || next.is_some()) => {
                let Some(first) = parcel else {
                    open = false;
                    continue;
                };
                let batch = fill_batch(first, &mut rx, &mut next);
                if let Err(e) = send_batch(channel, seq, &batch).await {
                    // The kernel refused the message: this batch never left.
                    give_back(batch, &sent);
                    break Some(Failure::Protocol(e));
                }
                tracing::debug!(seq, connections = batch.len(), to_pid, "passing connections to the new process");
                unacked.push_back((seq, Instant::now(), batch));
                seq += 1;
            }
        }
    };
    if let Some(failure) = failure {
        fail(channel, failure, unacked, next, rx, &sent, to_pid).await;
    }
    let passed = sent.passed.load(Ordering::Relaxed);
    let kept = sent.kept.load(Ordering::Relaxed);
    let unconfirmed = sent.unconfirmed.load(Ordering::Relaxed);
    tracing::info!(
        passed,
        kept,
        unconfirmed,
        to_pid,
        "connection hand-off finished"
    );
}

/// Why passing stopped.
enum Failure {
    /// The successor closed its end: it never acknowledged what is left, so it never read
    /// from those connections.
    Closed,
    /// A send failed, or the successor said something unexpected.
    Protocol(std::io::Error),
    /// The successor did not acknowledge a batch within [`ACK_TIMEOUT`].
    Silent,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Closed => f.write_str("the new process closed the connection channel"),
            Failure::Protocol(e) => write!(f, "{e}"),
            Failure::Silent => write!(
                f,
                "the new process did not acknowledge passed connections within {ACK_TIMEOUT:?}"
            ),
        }
    }
}

/// Passing failed: nothing more is passed (later connections are kept and served here), and
/// what was sent but not acknowledged is given back only once the successor has provably not
/// taken it (its end closed); a successor that stays silent keeps it (it may still read it:
/// serving it here too could serve it twice).
async fn fail(
    channel: &AsyncFd<OwnedFd>,
    failure: Failure,
    mut unacked: VecDeque<(u64, Instant, Vec<Parcel>)>,
    next: Option<Parcel>,
    mut rx: mpsc::UnboundedReceiver<Parcel>,
    sent: &Sent,
    to_pid: u32,
) {
    tracing::warn!(%failure, to_pid, "passing connections to the new process failed; the rest are served here until they close (Connection: close)");
    sent.failed.cancel();
    give_back(next, sent);
    rx.close();
    while let Ok(p) = rx.try_recv() {
        give_back(std::iter::once(p), sent);
    }
    let mut closed = matches!(failure, Failure::Closed);
    if !closed && !unacked.is_empty() {
        // Tell the successor that nothing more comes; it acknowledges what it has read and
        // closes. Read its acknowledgements until then, within a bound.
        let _ = rustix::net::shutdown(channel.get_ref(), rustix::net::Shutdown::Write);
        let until = Instant::now() + ACK_TIMEOUT;
        while !unacked.is_empty() {
            let ack =
                tokio::time::timeout_at(until, channel.async_io(Interest::READABLE, recv_ack))
                    .await;
            match ack {
                Ok(Ok(Some(acked))) if acknowledged(&mut unacked, acked, sent).is_ok() => {}
                Ok(Ok(None)) => {
                    closed = true;
                    break;
                }
                // Silent, or talking nonsense: its acknowledgements cannot be trusted to come.
                _ => break,
            }
        }
    }
    for (_, _, batch) in unacked {
        if closed {
            give_back(batch, sent);
        } else {
            sent.unconfirmed.fetch_add(batch.len(), Ordering::Relaxed);
            tracing::warn!(
                connections = batch.len(),
                to_pid,
                "connections sent to a new process that does not answer: left to it"
            );
            for parcel in batch {
                // Our copy closes (never a shutdown); the successor's is in its queue.
                let _ = parcel.done.send(PassOutcome::Passed);
            }
        }
    }
}

async fn sleep_until_some(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

async fn next_parcel(
    next: &mut Option<Parcel>,
    rx: &mut mpsc::UnboundedReceiver<Parcel>,
) -> Option<Parcel> {
    match next.take() {
        Some(p) => Some(p),
        None => rx.recv().await,
    }
}

/// A batch from `first` and what is queued, within the batch limits; what does not fit goes
/// to `next`.
fn fill_batch(
    first: Parcel,
    rx: &mut mpsc::UnboundedReceiver<Parcel>,
    next: &mut Option<Parcel>,
) -> Vec<Parcel> {
    // Upgraded connections go in batches of their own kind (`UPGRADED`).
    let upgraded = first.upgraded.is_some();
    let limit = match upgraded {
        true => MAX_UPGRADED_BATCH_BYTES,
        false => MAX_BATCH_BYTES,
    };
    let mut bytes = parcel_size(&first);
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(p) if p.upgraded.is_some() == upgraded && bytes + parcel_size(&p) <= limit => {
                bytes += parcel_size(&p);
                batch.push(p);
            }
            Ok(p) => {
                *next = Some(p);
                break;
            }
            Err(_) => break,
        }
    }
    batch
}

/// The batch `acked` is the successor's now. Batches are acknowledged one by one, in order:
/// anything else is a protocol error.
fn acknowledged(
    unacked: &mut VecDeque<(u64, Instant, Vec<Parcel>)>,
    acked: u64,
    sent: &Sent,
) -> std::io::Result<()> {
    match unacked.front() {
        Some((seq, _, _)) if *seq == acked => {}
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "acknowledgement of batch {acked}, expected {:?}",
                    other.map(|(s, _, _)| *s)
                ),
            ));
        }
    }
    if let Some((_, _, batch)) = unacked.pop_front() {
        sent.passed.fetch_add(batch.len(), Ordering::Relaxed);
        for parcel in batch {
            // Dropping the parcel closes our copy of the socket (never a shutdown, which
            // would end the connection for the successor too).
            let _ = parcel.done.send(PassOutcome::Passed);
        }
    }
    Ok(())
}

/// The connections stay here: served to the end, their next response with `Connection: close`
/// (raised on each now, so that it does not wait for the server's fallback, which comes a
/// moment later, or not at all for a connection refused for its size), so that the client
/// moves on to the new process.
fn give_back(parcels: impl IntoIterator<Item = Parcel>, sent: &Sent) {
    for p in parcels {
        let conn = p.io.conn();
        conn.mark_in_flight(false);
        conn.ctl.fetch_or(CLOSE_RESPONSES, Ordering::Release);
        sent.kept.fetch_add(1, Ordering::Relaxed);
        let _ = p.done.send(PassOutcome::Kept(p.io, p.read));
    }
}

async fn send_batch(channel: &AsyncFd<OwnedFd>, seq: u64, batch: &[Parcel]) -> std::io::Result<()> {
    if batch.first().is_some_and(|p| p.upgraded.is_some()) {
        let conns: Vec<_> = batch
            .iter()
            .map(|p| {
                let state = p.upgraded.as_deref().unwrap_or_default();
                (p.io.conn().info.listener(), &p.read[..], state)
            })
            .collect();
        let msg = upgraded_message(seq, &conns);
        let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|p| p.io.as_fd()).collect();
        return channel
            .async_io(Interest::WRITABLE, |fd| send_msg(fd, &msg, &fds))
            .await;
    }
    let mut msg = format!("CONNS {seq} {}\n", batch.len()).into_bytes();
    for p in batch {
        msg.extend_from_slice(p.io.conn().info.listener().as_bytes());
        msg.push(b'\n');
        msg.extend_from_slice(p.read.len().to_string().as_bytes());
        msg.push(b'\n');
        msg.extend_from_slice(&p.read);
    }
    let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|p| p.io.as_fd()).collect();
    channel
        .async_io(Interest::WRITABLE, |fd| send_msg(fd, &msg, &fds))
        .await
}

/// An `UPGRADED` message of `(listener, read, state)` entries (their sockets go beside it, in
/// the same order).
fn upgraded_message(seq: u64, conns: &[(&str, &[u8], &[u8])]) -> Vec<u8> {
    let mut msg = format!("UPGRADED {seq} {}\n", conns.len()).into_bytes();
    for (listener, read, state) in conns {
        msg.extend_from_slice(format!("{listener}\n{}\n{}\n", read.len(), state.len()).as_bytes());
        msg.extend_from_slice(read);
        msg.extend_from_slice(state);
    }
    msg
}

fn send_msg(fd: &OwnedFd, msg: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_BATCH))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("too many sockets for one message"));
    }
    let n = rustix::net::sendmsg(
        fd,
        &[IoSlice::new(msg)],
        &mut control,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?;
    if n != msg.len() {
        return Err(std::io::Error::other("a connection message was cut short"));
    }
    Ok(())
}

/// `Ok(Some(seq))`: the batches up to `seq` are acknowledged. `Ok(None)`: end of the channel.
fn recv_ack(fd: &OwnedFd) -> std::io::Result<Option<u64>> {
    let mut buf = [0u8; 64];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        fd,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    if msg.bytes == 0 {
        return Ok(None);
    }
    let text = std::str::from_utf8(&buf[..msg.bytes]).unwrap_or("");
    text.strip_prefix("ACK ")
        .and_then(|s| s.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected message on the connection channel: {text:?}"),
            )
        })
}

// ---------------------------------------------------------------------------------------------
// The new process's side.

/// Receives the connections the previous process passes, until it says `DONE` (or the
/// channel ends), and serves each with the service of its listener.
pub(crate) async fn receive(
    channel: Arc<Connected>,
    services: Vec<(Arc<str>, Box<dyn ServeConn>)>,
    cx: ConnContext,
    resume_upgraded: Option<ResumeHandler>,
) -> usize {
    let channel = channel.async_fd();
    let mut taken = 0;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let received = channel
            .async_io(Interest::READABLE, |fd| recv_batch(fd, &mut buf))
            .await;
        let (len, fds) = match received {
            Ok(Received::Message(len, fds)) => (len, fds),
            Ok(Received::End) => break,
            Ok(Received::Truncated) => {
                // Sockets or bytes were lost on the way (out of fds here?): refuse the batch.
                tracing::warn!(
                    "a batch of passed connections arrived truncated; refusing it (the old process keeps them)"
                );
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the connection channel failed");
                break;
            }
        };
        if buf[..len] == *b"DONE\n" {
            break;
        }
        if buf[..len].starts_with(b"UPGRADED ") {
            match adopt_upgraded(&buf[..len], fds, &services, &cx, resume_upgraded.as_ref()) {
                Ok((seq, resumed, handler)) => {
                    let n = resumed.len();
                    let ack = format!("ACK {seq}\n");
                    if let Err(e) = channel
                        .async_io(Interest::WRITABLE, |fd| send_msg(fd, ack.as_bytes(), &[]))
                        .await
                    {
                        tracing::warn!(error = %e, "could not acknowledge passed upgraded connections; the old process keeps them");
                        break;
                    }
                    taken += n;
                    for r in resumed {
                        handler.spawn(r);
                    }
                    continue;
                }
                Err(why) => {
                    tracing::warn!(
                        why,
                        "refusing a batch of passed upgraded connections (the old process keeps them, and every connection not acknowledged yet)"
                    );
                    break;
                }
            }
        }
        let Some(batch) = parse_batch(&buf[..len], fds) else {
            tracing::warn!(
                "unexpected message on the connection channel; refusing it (the old process keeps its connections)"
            );
            break;
        };
        // Everything about each connection is settled before any is acknowledged: until the
        // acknowledgement, they are the old process's, which gets them back if we refuse
        // (closing the channel unacknowledged) — also for a name this process has no
        // plaintext service for (a deploy that renamed a listener, or put TLS on it).
        let mut adopted = Vec::with_capacity(batch.conns.len());
        let mut refused = None;
        for (name, read, fd) in batch.conns {
            let Some(index) = services
                .iter()
                .position(|(n, s)| **n == *name && s.passable())
            else {
                refused = Some(format!("no plaintext listener named {name:?} here"));
                break;
            };
            match crate::accept::adopt_passed(fd, Arc::clone(&services[index].0), &cx) {
                Ok(io) => adopted.push((index, io, read)),
                Err(e) => {
                    refused = Some(format!("a passed socket is unusable: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = refused {
            tracing::warn!(
                why,
                "refusing a batch of passed connections (the old process keeps them)"
            );
            break;
        }
        let ack = format!("ACK {}\n", batch.seq);
        if let Err(e) = channel
            .async_io(Interest::WRITABLE, |fd| send_msg(fd, ack.as_bytes(), &[]))
            .await
        {
            tracing::warn!(error = %e, "could not acknowledge passed connections; the old process keeps them");
            break;
        }
        for (index, io, read) in adopted {
            taken += 1;
            tokio::spawn(services[index].1.serve(io, read, &cx));
        }
    }
    tracing::info!(
        connections = taken,
        "took over connections from the previous process"
    );
    taken
}

/// Settles everything about an `UPGRADED` batch before it is acknowledged: its handler, the
/// listener and socket of each connection; or why it is refused (the old process then keeps
/// them).
fn adopt_upgraded<'h>(
    msg: &[u8],
    fds: Vec<OwnedFd>,
    services: &[(Arc<str>, Box<dyn ServeConn>)],
    cx: &ConnContext,
    handler: Option<&'h ResumeHandler>,
) -> Result<(u64, Vec<Resumed>, &'h ResumeHandler), String> {
    let Some(handler) = handler else {
        return Err("this process has no resume_upgraded handler".to_string());
    };
    let (seq, conns) = parse_upgraded(msg, fds).ok_or("a malformed UPGRADED message")?;
    let mut resumed = Vec::with_capacity(conns.len());
    for up in conns {
        let Some(index) = services
            .iter()
            .position(|(n, s)| **n == *up.listener && s.passable())
        else {
            return Err(format!(
                "no plaintext listener named {:?} here",
                up.listener
            ));
        };
        let io = crate::accept::adopt_passed(up.fd, Arc::clone(&services[index].0), cx)
            .map_err(|e| format!("a passed socket is unusable: {e}"))?;
        // The application's from now on: no header-read timeout, no request boundary.
        io.conn().set_phase(crate::conn::Phase::Upgraded);
        resumed.push(Resumed::new(io, up.read, up.state));
    }
    Ok((seq, resumed, handler))
}

/// One connection of an `UPGRADED` message, parsed.
#[derive(Debug)]
struct Upgraded {
    listener: String,
    read: Bytes,
    state: Bytes,
    fd: OwnedFd,
}

/// Parses an `UPGRADED` message: its sequence and connections; `None` if it is malformed (the
/// counts, the lengths or the sockets do not add up).
fn parse_upgraded(mut msg: &[u8], fds: Vec<OwnedFd>) -> Option<(u64, Vec<Upgraded>)> {
    let header = take_line(&mut msg)?;
    let mut words = header.strip_prefix("UPGRADED ")?.split(' ');
    let seq: u64 = words.next()?.parse().ok()?;
    let n: usize = words.next()?.parse().ok()?;
    if words.next().is_some() || n != fds.len() || n == 0 {
        return None;
    }
    let mut conns = Vec::with_capacity(n);
    for fd in fds {
        let listener = take_line(&mut msg)?.to_string();
        let read_len: usize = take_line(&mut msg)?.parse().ok()?;
        let state_len: usize = take_line(&mut msg)?.parse().ok()?;
        let read = Bytes::copy_from_slice(msg.get(..read_len)?);
        msg = &msg[read_len..];
        let state = Bytes::copy_from_slice(msg.get(..state_len)?);
        msg = &msg[state_len..];
        conns.push(Upgraded {
            listener,
            read,
            state,
            fd,
        });
    }
    msg.is_empty().then_some((seq, conns))
}

/// What a read of the channel gave.
enum Received {
    Message(usize, Vec<OwnedFd>),
    /// The other end closed.
    End,
    /// The message, or its sockets, did not fit (`MSG_TRUNC`, `MSG_CTRUNC`); what arrived is
    /// closed.
    Truncated,
}

struct Batch {
    seq: u64,
    conns: Vec<(String, Bytes, OwnedFd)>,
}

fn recv_batch(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<Received> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_BATCH))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        fd,
        &mut [std::io::IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = cmsg {
            fds.extend(received);
        }
    }
    use rustix::net::ReturnFlags;
    if msg
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
    {
        return Ok(Received::Truncated);
    }
    if msg.bytes == 0 {
        return Ok(Received::End);
    }
    Ok(Received::Message(msg.bytes, fds))
}

/// Parses a `CONNS` message; `None` if it is not one, or is malformed (then its sockets are
/// closed, which the old process sees as connections it never got acknowledged: it keeps
/// serving them).
fn parse_batch(mut msg: &[u8], fds: Vec<OwnedFd>) -> Option<Batch> {
    let header = take_line(&mut msg)?;
    let mut words = header.strip_prefix("CONNS ")?.split(' ');
    let seq: u64 = words.next()?.parse().ok()?;
    let n: usize = words.next()?.parse().ok()?;
    if n != fds.len() {
        return None;
    }
    let mut conns = Vec::with_capacity(n);
    for fd in fds {
        let name = take_line(&mut msg)?.to_string();
        let len: usize = take_line(&mut msg)?.parse().ok()?;
        let read = Bytes::copy_from_slice(msg.get(..len)?);
        msg = &msg[len..];
        conns.push((name, read, fd));
    }
    Some(Batch { seq, conns })
}

fn take_line<'a>(msg: &mut &'a [u8]) -> Option<&'a str> {
    let end = msg.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&msg[..end]).ok()?;
    *msg = &msg[end + 1..];
    Some(line)
}

impl std::fmt::Debug for Parcel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parcel")
            .field("read", &self.read.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_socket() -> OwnedFd {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        a.into()
    }

    #[test]
    fn an_upgraded_message_reads_back_as_written() {
        let conns: [(&str, &[u8], &[u8]); 3] = [
            ("web", b"\x81\x85half", b"session 42\nnick"),
            ("admin", b"", b""),
            ("web", b"\n\n", b"3\n"),
        ];
        let msg = upgraded_message(7, &conns);
        let (seq, up) =
            parse_upgraded(&msg, vec![a_socket(), a_socket(), a_socket()]).expect("parsed");
        assert_eq!(seq, 7);
        let back: Vec<(&str, &[u8], &[u8])> = up
            .iter()
            .map(|u| (u.listener.as_str(), &u.read[..], &u.state[..]))
            .collect();
        assert_eq!(back, conns);
    }

    #[test]
    fn a_malformed_upgraded_message_is_refused() {
        let msg = upgraded_message(1, &[("web", b"abc", b"state")]);
        // Not as many sockets as connections.
        assert!(parse_upgraded(&msg, vec![]).is_none());
        assert!(parse_upgraded(&msg, vec![a_socket(), a_socket()]).is_none());
        // Lengths that do not add up.
        assert!(parse_upgraded(&msg[..msg.len() - 1], vec![a_socket()]).is_none());
        let mut longer = msg.clone();
        longer.push(b'!');
        assert!(parse_upgraded(&longer, vec![a_socket()]).is_none());
        assert!(parse_upgraded(b"UPGRADED x 1\nweb\n0\n0\n", vec![a_socket()]).is_none());
        assert!(parse_upgraded(b"UPGRADED 1\nweb\n0\n0\n", vec![a_socket()]).is_none());
        assert!(parse_upgraded(b"UPGRADED 1 0\n", vec![]).is_none());
        assert!(parse_upgraded(b"CONNS 1 1\nweb\n0\n", vec![a_socket()]).is_none());
    }

    #[test]
    fn the_receive_buffer_holds_the_largest_upgraded_connection() {
        let (read, state) = (
            [0; crate::upgrade::MAX_UNREAD],
            [0; crate::upgrade::MAX_STATE],
        );
        let msg = upgraded_message(u64::MAX, &[("a-listener-name", &read, &state)]);
        assert!(msg.len() <= MAX_MESSAGE);
        let first_line = "UPGRADED 18446744073709551615 1\n".len();
        assert!(msg.len() - first_line <= MAX_UPGRADED_BATCH_BYTES);
    }
}
