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
//!   sequence, acknowledgement and ownership as `CONNS`), served by the successor's
//!   `resume_upgraded` handler;
//! - `DONE\n`: nothing more will come.
//!
//! New → old: `ACK <seq>\n`, sent as soon as a batch is received, **before** any of its
//! connections is read from.
//!
//! The framing is open: every message is one datagram whose first line starts with a word
//! naming its kind (`CONNS`, `DONE`, `ACK`); a side ignores a kind it does not know (its
//! attached fds, if any, are closed), so later versions can add kinds on the same channel.
//!
//! # Ownership: exactly one owner at every moment
//! - A connection is the old process's until the successor acknowledges its batch, and the
//!   successor's from the moment it sends that acknowledgement. The old process stops serving
//!   a connection before passing it (hyper has let go of it: it was taken apart between two
//!   requests), and the successor starts only after acknowledging it.
//! - The old process takes a sent batch back only on the successor's explicit refusal (it
//!   closes the channel without acknowledging: a listener it has no plaintext service for, a
//!   truncated message) or its proven death (its end of the channel closed, `ECONNRESET`
//!   included, or its pidfd readable). Acknowledgements still queued when it went are read
//!   first: those connections were its. Never on a timeout: a slow successor (stopped, its
//!   runtime blocked) is slow, not dead.
//! - A successor slower than [`ACK_TIMEOUT`] only stops further passing: every connection not
//!   sent yet stays with the old process, which serves it to the end (`Connection: close`)
//!   within its own drain deadline. What was sent stays in flight: if the old process reaches
//!   its deadline first, it exits closing only its copies (a passed socket is never shut
//!   down: a shutdown acts on the socket, not on one process's fd), and the connection waits
//!   in the successor's queue.
//! - So the successor serves every batch it received, whether its acknowledgement arrived or
//!   not: the old process cannot have taken it back while the successor lives.
//! - Batches of at most [`MAX_BATCH`] sockets and [`MAX_BATCH_BYTES`] bytes, at most
//!   [`WINDOW`] batches unacknowledged: a flood of connections moves without blocking the old
//!   process, and without more sockets in flight than the kernel allows a sender.

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
use crate::conn::control::{Directive, Phase};
use crate::conn::{HandOff, PassOutcome, TrackedIo};
use crate::notify::Connected;
use crate::sys;
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
    /// The application's state, for an upgraded connection (sent in batches of their own, as
    /// `UPGRADED`).
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
        let parcel = Parcel {
            io,
            read,
            upgraded: None,
            done,
        };
        if self.sent.failed.is_cancelled() || parcel_size(&parcel) > MAX_BATCH_BYTES {
            give_back(std::iter::once(parcel), &self.sent);
            return outcome;
        }
        parcel.io.control().mark_in_flight(true);
        if let Err(mpsc::error::SendError(p)) = self.tx.send(parcel) {
            give_back(std::iter::once(p), &self.sent);
        }
        outcome
    }

    fn takes_upgraded(&self) -> bool {
        self.accepts_upgraded
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
        parcel.io.control().mark_in_flight(true);
        if let Err(mpsc::error::SendError(p)) = self.tx.send(parcel) {
            give_back(std::iter::once(p), &self.sent);
        }
        outcome
    }
}

/// The server's one hand-off slot: connection tasks pass through it to the outbox of the
/// current successor, if any. Set at a hand-off; cleared when the server serves again after
/// its successor died (a later restart sets a new one).
#[derive(Debug, Default)]
pub(crate) struct Switch {
    current: std::sync::Mutex<Option<Arc<Outbox>>>,
}

impl Switch {
    pub(crate) fn set(&self, outbox: Option<Arc<Outbox>>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = outbox;
    }
}

impl Switch {
    fn current(&self) -> Option<Arc<Outbox>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// No successor takes connections (any more): served here.
fn kept(io: TrackedIo, read: Bytes) -> oneshot::Receiver<PassOutcome> {
    let (done, outcome) = oneshot::channel();
    let _ = done.send(PassOutcome::Kept(io, read));
    outcome
}

impl HandOff for Switch {
    fn pass(&self, io: TrackedIo, read: Bytes) -> oneshot::Receiver<PassOutcome> {
        match self.current() {
            Some(outbox) => outbox.pass(io, read),
            None => kept(io, read),
        }
    }

    fn takes_upgraded(&self) -> bool {
        self.current().is_some_and(|o| o.takes_upgraded())
    }

    fn pass_upgraded(
        &self,
        io: TrackedIo,
        read: Bytes,
        state: Bytes,
    ) -> oneshot::Receiver<PassOutcome> {
        match self.current() {
            Some(outbox) => outbox.pass_upgraded(io, read, state),
            None => kept(io, read),
        }
    }
}

/// What a connection takes of a batch message: its listener's name, its byte count, the bytes
/// (and for an upgraded one its state length and state).
fn parcel_size(p: &Parcel) -> usize {
    p.io.info().listener().len()
        + 24
        + p.read.len()
        + p.upgraded.as_ref().map_or(0, |s| 24 + s.len())
}

/// How the passing went, for the drain's report.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    /// Connections the successor acknowledged.
    pub(crate) passed: AtomicUsize,
    /// Connections given back (the channel failed, or too much read-ahead to pass): served
    /// here, with `Connection: close`.
    pub(crate) kept: AtomicUsize,
    /// Cancelled when the channel failed; every later connection is kept.
    pub(crate) failed: CancellationToken,
}

/// Starts passing connections to the successor `to_pid` over `channel`, watching it through
/// `pidfd`. Returns where to put them and the counters; the task ends once the outbox is
/// dropped and everything sent was acknowledged (then it sends `DONE`), or the successor
/// refused or died (then what it had not acknowledged is given back). `accepts_upgraded`: the
/// successor also takes upgraded connections.
pub(crate) fn send(
    channel: Connected,
    to_pid: u32,
    pidfd: Arc<OwnedFd>,
    accepts_upgraded: bool,
) -> (Arc<Outbox>, Arc<Sent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sent = Arc::new(Sent::default());
    let outbox = Arc::new(Outbox {
        tx,
        sent: Arc::clone(&sent),
        accepts_upgraded,
    });
    tokio::spawn(sender(channel, rx, Arc::clone(&sent), to_pid, pidfd));
    (outbox, sent)
}

/// The sender's state: what is in flight, and whether it still passes.
struct Flight {
    unacked: VecDeque<(u64, Instant, Vec<Parcel>)>,
    /// A parcel that did not fit in the last batch: the first of the next one.
    next: Option<Parcel>,
    seq: u64,
    /// The outbox is still open (the server may pass more).
    open: bool,
    /// Still passing: false once the successor was slow to acknowledge, or spoke nonsense.
    passing: bool,
}

async fn sender(
    channel: Connected,
    mut rx: mpsc::UnboundedReceiver<Parcel>,
    sent: Arc<Sent>,
    to_pid: u32,
    pidfd: Arc<OwnedFd>,
) {
    let mut f = Flight {
        unacked: VecDeque::new(),
        next: None,
        seq: 0,
        open: true,
        passing: true,
    };
    // Without a watchable pidfd, the channel's end is the only proof of death (it is one: the
    // successor's end closes when it exits, and it is close-on-exec there). A copy of its own:
    // the lifecycle watches the same process, and one fd registers with the runtime once.
    let pidfd = pidfd
        .try_clone()
        .and_then(|fd| sys::register(fd, Interest::READABLE).map_err(|(_, e)| e))
        .map_err(|e| tracing::warn!(error = %e, to_pid, "cannot watch the new process's pidfd; its channel tells its death"))
        .ok();
    let channel = channel.async_fd();
    let end = loop {
        if f.unacked.is_empty() && f.next.is_none() && (!f.open || !f.passing) {
            // Everything sent is the successor's: tell it nothing more comes.
            let _ = channel
                .async_io(Interest::WRITABLE, |fd| send_msg(fd, b"DONE\n", &[]))
                .await;
            break End::Done;
        }
        let room = f.unacked.len() < WINDOW;
        let silent_since = f
            .unacked
            .front()
            .map(|(_, at, _)| *at + ACK_TIMEOUT)
            .filter(|_| f.passing);
        tokio::select! {
            biased;
            got = channel.async_io(Interest::READABLE, recv_word), if !f.unacked.is_empty() => match got {
                Ok(Word::Ack(acked)) => {
                    if let Err(e) = acknowledged(&mut f.unacked, acked, &sent) {
                        f.stop_passing(&Failure::Protocol(e), &mut rx, &sent, to_pid);
                    }
                }
                Ok(Word::Other(text)) => {
                    tracing::debug!(message = text, to_pid, "ignoring a message on the connection channel");
                }
                Ok(Word::End) => break End::Gone(Failure::Closed),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break End::Gone(Failure::Closed),
                Err(e) => f.stop_passing(&Failure::Protocol(e), &mut rx, &sent, to_pid),
            },
            () = exited(pidfd.as_ref()) => break End::Gone(Failure::Died),
            () = sleep_until_some(silent_since) => f.stop_passing(&Failure::Silent, &mut rx, &sent, to_pid),
            parcel = next_parcel(&mut f.next, &mut rx), if f.passing && room && (f.open || f.next.is_some()) => {
                let Some(first) = parcel else {
                    f.open = false;
                    continue;
                };
                let batch = fill_batch(first, &mut rx, &mut f.next);
                if let Err(e) = send_batch(channel, f.seq, &batch).await {
                    // The kernel refused the message: this batch never left.
                    give_back(batch, &sent);
                    f.stop_passing(&Failure::Protocol(e), &mut rx, &sent, to_pid);
                    continue;
                }
                tracing::debug!(seq = f.seq, connections = batch.len(), to_pid, "passing connections to the new process");
                f.unacked.push_back((f.seq, Instant::now(), batch));
                f.seq += 1;
            }
        }
    };
    if let End::Gone(failure) = end {
        // Acknowledgements it sent before it went are still queued: they count (those
        // connections were its, and went with it). Then the rest is provably not taken.
        let mut acks = 0;
        // Bounded: the queue holds what the successor sent, at most one message per batch.
        while let Ok(Word::Ack(acked)) = recv_word(channel.get_ref()) {
            if acknowledged(&mut f.unacked, acked, &sent).is_err() {
                break;
            }
            acks += 1;
        }
        let back: usize = f.unacked.iter().map(|(_, _, b)| b.len()).sum();
        tracing::warn!(%failure, to_pid, acks, given_back = back, "the new process is gone; the connections it had not acknowledged are served here (Connection: close)");
        f.stop_passing(&failure, &mut rx, &sent, to_pid);
        for (_, _, batch) in f.unacked.drain(..) {
            give_back(batch, &sent);
        }
    }
    let passed = sent.passed.load(Ordering::Relaxed);
    let kept = sent.kept.load(Ordering::Relaxed);
    tracing::info!(passed, kept, to_pid, "connection hand-off finished");
}

/// How the sender ended.
enum End {
    /// Everything sent was acknowledged.
    Done,
    /// The successor refused or died: what it did not acknowledge is ours again.
    Gone(Failure),
}

impl Flight {
    /// Nothing more is passed: later connections, and those not sent yet, are kept and served
    /// here. What was sent stays in flight: it is the successor's as soon as it acknowledges,
    /// and ours again only once it is provably gone (its channel closed, its pidfd readable).
    /// A slow successor is slow, not dead.
    fn stop_passing(
        &mut self,
        failure: &Failure,
        rx: &mut mpsc::UnboundedReceiver<Parcel>,
        sent: &Sent,
        to_pid: u32,
    ) {
        if !self.passing {
            return;
        }
        self.passing = false;
        if !matches!(failure, Failure::Closed | Failure::Died) {
            let in_flight: usize = self.unacked.iter().map(|(_, _, b)| b.len()).sum();
            tracing::warn!(%failure, to_pid, in_flight, "passing connections to the new process failed; the rest are served here until they close (Connection: close); those in flight stay its until it acknowledges them or is gone");
        }
        sent.failed.cancel();
        give_back(self.next.take(), sent);
        rx.close();
        while let Ok(p) = rx.try_recv() {
            give_back(std::iter::once(p), sent);
        }
    }
}

/// Why passing stopped.
enum Failure {
    /// The successor closed its end (it refused a batch, or exited): it never acknowledged
    /// what is left, so it never read from those connections.
    Closed,
    /// The successor's pidfd says it exited.
    Died,
    /// A send failed, or the successor said something unexpected.
    Protocol(std::io::Error),
    /// The successor did not acknowledge a batch within [`ACK_TIMEOUT`].
    Silent,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Closed => f.write_str("the new process closed the connection channel"),
            Failure::Died => f.write_str("the new process exited"),
            Failure::Protocol(e) => write!(f, "{e}"),
            Failure::Silent => write!(
                f,
                "the new process did not acknowledge passed connections within {ACK_TIMEOUT:?}"
            ),
        }
    }
}

/// Completes once the process behind `pidfd` has exited; never without one.
async fn exited(pidfd: Option<&AsyncFd<OwnedFd>>) {
    match pidfd {
        Some(fd) => {
            if fd.readable().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
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
        let control = p.io.control();
        control.mark_in_flight(false);
        control.raise(Directive::CloseResponses);
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
                (p.io.info().listener(), &p.read[..], state)
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
        msg.extend_from_slice(p.io.info().listener().as_bytes());
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

/// A message from the successor on the channel, by its first word.
#[derive(Debug, PartialEq, Eq)]
enum Word {
    /// `ACK <seq>`: the batch `seq` is the successor's.
    Ack(u64),
    /// A message of a kind this version does not know (ignored: the framing is open to new
    /// kinds, each a datagram whose first line starts with its own word).
    Other(String),
    /// The end of the channel.
    End,
}

/// Reads one message from the successor, without waiting.
fn recv_word(fd: &OwnedFd) -> std::io::Result<Word> {
    let mut buf = [0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        fd,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    if msg.bytes == 0 {
        return Ok(Word::End);
    }
    Ok(parse_word(&buf[..msg.bytes]))
}

fn parse_word(msg: &[u8]) -> Word {
    let text = String::from_utf8_lossy(msg);
    let first = text.lines().next().unwrap_or("");
    match first.strip_prefix("ACK ").map(|s| s.trim().parse()) {
        Some(Ok(seq)) => Word::Ack(seq),
        _ => Word::Other(first.chars().take(80).collect()),
    }
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
    let mut hold_open = false;
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
        let msg = &buf[..len];
        // Everything about each connection is settled before any is acknowledged: until the
        // acknowledgement, they are the old process's, which gets them back if we refuse
        // (closing the channel unacknowledged) — also for a name this process has no
        // plaintext service for (a deploy that renamed a listener, or put TLS on it).
        let adopted = if msg.starts_with(b"CONNS ") {
            let Some(batch) = parse_batch(msg, fds) else {
                tracing::warn!(
                    "unexpected message on the connection channel; refusing it (the old process keeps its connections)"
                );
                break;
            };
            adopt_batch(batch, &services, &cx)
        } else if msg.starts_with(b"UPGRADED ") {
            adopt_upgraded(msg, fds, &services, &cx, resume_upgraded.as_ref())
        } else {
            // A kind of message this version does not know (see the module docs): not ours to
            // answer.
            tracing::debug!(len, "ignoring a message on the connection channel");
            continue;
        };
        let (seq, adopted) = match adopted {
            Ok(adopted) => adopted,
            Err(why) => {
                tracing::warn!(
                    why,
                    "refusing a batch of passed connections (the old process keeps them, and every connection not acknowledged yet)"
                );
                break;
            }
        };
        // Ours from here on, whether the acknowledgement arrives or not: the old process gives
        // a batch back only once we are provably gone (our end closed), never on silence.
        let ack = format!("ACK {seq}\n");
        let acked = channel
            .async_io(Interest::WRITABLE, |fd| send_msg(fd, ack.as_bytes(), &[]))
            .await;
        match adopted {
            Adopted::Conns(conns) => {
                for (index, io, read) in conns {
                    taken += 1;
                    tokio::spawn(services[index].1.serve(io, read, &cx));
                }
            }
            Adopted::Upgraded(resumed, handler) => {
                for r in resumed {
                    taken += 1;
                    handler.spawn(r);
                }
            }
        }
        match acked {
            Ok(()) => {}
            Err(e) if peer_gone(&e) => {
                // The old process exited with the batch in flight: it closed its copies without
                // serving them, so they are ours alone. What else it sent is queued: read on.
                tracing::info!(
                    seq,
                    "the previous process is gone; serving the connections it passed"
                );
            }
            Err(e) => {
                // The old process may still be there, waiting for a word it will never get: it
                // must not see our end close (it would take the batch back, and serve it too).
                tracing::error!(error = %e, "could not acknowledge passed connections; serving them, and holding the channel open so that the old process never takes them back");
                hold_open = true;
                break;
            }
        }
    }
    tracing::info!(
        connections = taken,
        "took over connections from the previous process"
    );
    if hold_open {
        // Bounded by our own life: the channel closes when this process exits.
        let _keep = channel;
        std::future::pending::<()>().await;
    }
    taken
}

/// A batch settled, to be acknowledged and served.
enum Adopted<'h> {
    /// HTTP/1 connections: each with the index of its listener's service, and the bytes read.
    Conns(Vec<(usize, TrackedIo, Bytes)>),
    /// Upgraded connections, for the application's handler.
    Upgraded(Vec<Resumed>, &'h ResumeHandler),
}

/// Settles everything about a `CONNS` batch before it is acknowledged: the listener and socket
/// of each connection; or why it is refused (the old process then keeps them).
fn adopt_batch<'h>(
    batch: Batch,
    services: &[(Arc<str>, Box<dyn ServeConn>)],
    cx: &ConnContext,
) -> Result<(u64, Adopted<'h>), String> {
    let mut adopted = Vec::with_capacity(batch.conns.len());
    for (name, read, fd) in batch.conns {
        let index = passable_service(services, &name)?;
        let io = crate::accept::adopt_passed(fd, Arc::clone(&services[index].0), cx)
            .map_err(|e| format!("a passed socket is unusable: {e}"))?;
        adopted.push((index, io, read));
    }
    Ok((batch.seq, Adopted::Conns(adopted)))
}

/// The index of the plaintext service of the listener `name`.
fn passable_service(
    services: &[(Arc<str>, Box<dyn ServeConn>)],
    name: &str,
) -> Result<usize, String> {
    services
        .iter()
        .position(|(n, s)| **n == *name && s.passable())
        .ok_or_else(|| format!("no plaintext listener named {name:?} here"))
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
) -> Result<(u64, Adopted<'h>), String> {
    let Some(handler) = handler else {
        return Err("this process has no resume_upgraded handler".to_string());
    };
    let (seq, conns) = parse_upgraded(msg, fds).ok_or("a malformed UPGRADED message")?;
    let mut resumed = Vec::with_capacity(conns.len());
    for up in conns {
        let index = passable_service(services, &up.listener)?;
        let io = crate::accept::adopt_passed(up.fd, Arc::clone(&services[index].0), cx)
            .map_err(|e| format!("a passed socket is unusable: {e}"))?;
        // The application's from now on: no header-read timeout, no request boundary.
        io.control().set_phase(Phase::Upgraded);
        resumed.push(Resumed::new(io, up.read, up.state));
    }
    Ok((seq, Adopted::Upgraded(resumed, handler)))
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

/// Whether a send failed because the other process is gone.
fn peer_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
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

    #[test]
    fn messages_are_told_apart_by_their_first_word() {
        assert_eq!(parse_word(b"ACK 7\n"), Word::Ack(7));
        // Kinds this version does not know are passed over, not taken for an error: the
        // framing is open to new ones.
        assert_eq!(
            parse_word(b"REASON exit 3\nmore\n"),
            Word::Other("REASON exit 3".into())
        );
        assert_eq!(parse_word(b"ACK x\n"), Word::Other("ACK x".into()));
    }

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
