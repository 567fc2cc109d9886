//! Upgraded connections (WebSockets) that move to the new process at a restart.
//!
//! A WebSocket served from a [`WebSocketIo`] can be handed to the successor after a restart,
//! at a message boundary the application chooses, together with a small state of its own (a
//! session id, a nickname, the last sequence number): [`WebSocketIo::hand_off`]. The successor
//! receives each such connection through the handler it registered with
//! [`crate::Server::resume_upgraded`]: the socket, the bytes already read from it that no
//! message consumed, and that state, as a [`Resumed`]; it resumes serving it. The client sees
//! nothing: the same TCP connection, no close frame, no message lost or repeated.
//!
//! # Why tokio-tungstenite over the raw stream, not axum's `WebSocket`
//! A connection can move only as a socket plus the bytes read from it and not yet consumed.
//! axum's `WebSocket` cannot be taken apart into those: it owns the upgraded stream and its
//! read buffer for good. tokio-tungstenite's `WebSocketStream` can: `from_raw_socket` over a
//! [`WebSocketIo`] serves a connection, `into_inner` gives the [`WebSocketIo`] back (after a
//! `flush`), and the successor resumes with `from_raw_socket` over the [`WebSocketIo`] of a
//! [`Resumed`]. The one thing tungstenite keeps to itself is its read buffer; a
//! [`WebSocketIo`] therefore never hands a reader bytes past the end of the WebSocket frame it
//! is in, so that at a message boundary tungstenite holds nothing, and keeps the bytes of a
//! message still being received, which move with the connection (so the successor reads that
//! message whole). The handshake itself is a few lines (see `examples/websocket.rs`:
//! `hyper::upgrade::on`, and `tungstenite::handshake::derive_accept_key` for the 101).
//!
//! # Who owns the connection
//! One process at every moment, as for HTTP/1 connections (see the crate's hand-off): the old
//! process keeps its socket until the successor acknowledged it, which it does before reading a
//! byte; if the successor cannot take it (it has no handler, it is an older build, the channel
//! failed or it died, the bytes are over the bounds, the listener is TLS, there is no
//! successor) [`WebSocketIo::hand_off`] gives the connection back ([`HandOffError`]), unharmed,
//! and the application says goodbye instead (Close 1001).
//!
//! # Bounds
//! The state is at most [`MAX_STATE`] bytes (64 KiB), the bytes read and not consumed at most
//! [`MAX_UNREAD`] (32 KiB: a message half received when the hand-off is asked for).
//!
//! # Example
//! ```no_run
//! use futures_util::{SinkExt, StreamExt};
//! use handover::upgrade::{Resumed, WebSocketIo};
//! use tokio_tungstenite::WebSocketStream;
//! use tokio_tungstenite::tungstenite::protocol::Role;
//!
//! /// Serves a WebSocket until the client leaves or the process hands over; hands it over if
//! /// it can, and says goodbye otherwise.
//! async fn serve(io: WebSocketIo, mut count: u64) {
//!     let Some(conn) = io.connection_info().cloned() else { return };
//!     let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
//!     let going_away = conn.going_away();
//!     tokio::pin!(going_away);
//!     loop {
//!         tokio::select! {
//!             msg = ws.next() => match msg {
//!                 Some(Ok(msg)) if msg.is_text() => {
//!                     count += 1;
//!                     let _ = ws.send(msg).await;
//!                 }
//!                 Some(Ok(_)) => {}
//!                 _ => return,
//!             },
//!             _ = &mut going_away => {
//!                 // A message boundary: nothing half read, nothing unsent.
//!                 let _ = ws.flush().await;
//!                 match ws.into_inner().hand_off(count.to_be_bytes().to_vec()).await {
//!                     Ok(()) => return, // the successor serves it now
//!                     Err(e) => {
//!                         let ws = WebSocketStream::from_raw_socket(e.into_io(), Role::Server, None).await;
//!                         // ... Close 1001 ("going away") on `ws`
//!                         return;
//!                     }
//!                 }
//!             }
//!         }
//!     }
//! }
//!
//! /// In the successor: `Server::resume_upgraded(resume)`.
//! async fn resume(resumed: Resumed) {
//!     let (io, state) = resumed.into_parts();
//!     let count = state.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
//!     serve(io, count).await;
//! }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::conn::io::Replay;
use crate::conn::{PassOutcome, TrackedIo};
use crate::conn_info::ConnectionInfo;

/// Most bytes of application state that move with one connection.
pub const MAX_STATE: usize = 64 * 1024;
/// Most bytes read from a connection and not consumed yet (a message half received) that move
/// with it.
pub const MAX_UNREAD: usize = 32 * 1024;

/// How much a read from the socket asks for.
const READ_CHUNK: usize = 16 * 1024;

/// The raw stream of an upgraded WebSocket connection, for tokio-tungstenite (or any WebSocket
/// implementation over `AsyncRead + AsyncWrite`), which can be handed to the successor after a
/// restart ([`WebSocketIo::hand_off`]).
///
/// Reads never cross the end of a WebSocket frame: a reader that parses frames (tungstenite)
/// then holds no byte of a next frame when it returns a message. Writes go to the socket as
/// they are.
pub struct WebSocketIo {
    io: Io,
    frames: Frames,
}

enum Io {
    /// A plaintext connection of a handover server: movable.
    Own(TrackedIo),
    /// Anything else (TLS, another server's connection): served, never moved.
    Other(TokioIo<hyper::upgrade::Upgraded>),
}

impl WebSocketIo {
    /// The stream of a connection that hyper upgraded (`hyper::upgrade::on(&mut request)`,
    /// after the 101 response). Any upgraded connection works; only a plaintext connection of a
    /// handover server can be handed over.
    pub fn new(upgraded: hyper::upgrade::Upgraded) -> WebSocketIo {
        // What the serve path gives hyper for a plaintext connection (`conn::serve`).
        match upgraded.downcast::<TokioIo<Replay<TrackedIo>>>() {
            Ok(parts) => {
                let (io, prefix) = parts.io.into_inner().into_parts();
                let mut unread = BytesMut::from(&prefix[..]);
                unread.extend_from_slice(&parts.read_buf);
                WebSocketIo {
                    io: Io::Own(io),
                    frames: Frames::new(unread),
                }
            }
            Err(upgraded) => WebSocketIo {
                io: Io::Other(TokioIo::new(upgraded)),
                frames: Frames::new(BytesMut::new()),
            },
        }
    }

    pub(crate) fn resumed(io: TrackedIo, unread: Bytes) -> WebSocketIo {
        WebSocketIo {
            io: Io::Own(io),
            frames: Frames::new(BytesMut::from(&unread[..])),
        }
    }

    /// What handover knows of the connection (its peer, listener, the server's handle and
    /// [`ConnectionInfo::going_away`]); `None` for a connection that is not a plaintext
    /// connection of a handover server.
    pub fn connection_info(&self) -> Option<&ConnectionInfo> {
        match &self.io {
            Io::Own(io) => Some(io.info()),
            Io::Other(_) => None,
        }
    }

    /// Whether [`WebSocketIo::hand_off`] can succeed at all: a plaintext connection of a
    /// handover server (not TLS: the TLS session cannot move).
    pub fn is_movable(&self) -> bool {
        matches!(&self.io, Io::Own(io) if io.control().passable())
    }

    /// Hands the connection to the new process, with `state` (at most [`MAX_STATE`] bytes),
    /// once this process has handed over ([`ConnectionInfo::handed_over`]). Call it at a message
    /// boundary, with everything written flushed (tungstenite: `flush`, then `into_inner`).
    ///
    /// `Ok`: the successor acknowledged it and serves it now (through its
    /// [`crate::Server::resume_upgraded`] handler); this process's copy is closed, without a
    /// shutdown. `Err`: the connection is still this process's, unharmed (the bytes of a
    /// message half received are read again), and says why; say goodbye on it (Close 1001).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future while the successor has not answered yet closes
    /// this process's copy; the successor may still take the connection, or it ends.
    pub async fn hand_off(self, state: impl Into<Bytes>) -> Result<(), HandOffError> {
        let state = state.into();
        let WebSocketIo { io, frames } = self;
        // Whatever happens, the reader that held the message in progress is gone (the caller
        // took this stream out of it): from here on, that message is read again from its start.
        let unread = match frames.unread() {
            Ok(unread) => unread,
            // Not kept whole (over the bound, or not WebSocket frames): it cannot move, and
            // cannot be read again either; what follows is handed out as it comes.
            Err(frames) => {
                let io = WebSocketIo { io, frames };
                return Err(HandOffError::new(HandOffErrorKind::TooMuchUnread, io));
            }
        };
        let io = match io {
            Io::Own(io) if io.control().passable() => io,
            io => {
                let frames = Frames::new(BytesMut::from(&unread[..]));
                let io = WebSocketIo { io, frames };
                return Err(HandOffError::new(HandOffErrorKind::NotMovable, io));
            }
        };
        if state.len() > MAX_STATE {
            return Err(HandOffError::new(
                HandOffErrorKind::StateTooLarge,
                WebSocketIo::resumed(io, unread),
            ));
        }
        let slot = Arc::clone(io.info().handle().hand_off_slot());
        // The server's hand-off switch is always there; whether it leads to a successor that
        // takes upgraded connections is its current outbox's.
        let Some(outbox) = slot.get().filter(|h| h.takes_upgraded()) else {
            return Err(HandOffError::new(
                HandOffErrorKind::NoSuccessor,
                WebSocketIo::resumed(io, unread),
            ));
        };
        match outbox.pass_upgraded(io, unread, state).await {
            Ok(PassOutcome::Passed) | Err(_) => Ok(()),
            Ok(PassOutcome::Kept(io, unread)) => Err(HandOffError::new(
                HandOffErrorKind::Refused,
                WebSocketIo::resumed(io, unread),
            )),
        }
    }
}

impl fmt::Debug for WebSocketIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketIo")
            .field("movable", &self.is_movable())
            .field("unread", &self.frames.pending.len())
            .finish_non_exhaustive()
    }
}

impl AsyncRead for WebSocketIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some(n) = this.frames.deliverable(buf.remaining()) {
                let chunk = this.frames.take(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            // More bytes needed: a frame header, or the rest of a frame. Read straight into
            // `pending`, as much as the socket has (up to a chunk).
            this.frames.pending.reserve(READ_CHUNK);
            let pending = &mut this.frames.pending;
            let n = match &mut this.io {
                Io::Own(io) => ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, pending))?,
                Io::Other(io) => ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, pending))?,
            };
            if n == 0 {
                // The end: what is left (a frame cut short) goes to the reader as it is, and
                // the reader sees the end after it.
                let rest = this.frames.pending.split().freeze();
                if rest.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let n = rest.len().min(buf.remaining());
                buf.put_slice(&rest[..n]);
                this.frames.pending.extend_from_slice(&rest[n..]);
                this.frames.broken = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for WebSocketIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            Io::Own(io) => Pin::new(io).poll_write(cx, buf),
            Io::Other(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            Io::Own(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Io::Other(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Own(io) => io.is_write_vectored(),
            Io::Other(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Own(io) => Pin::new(io).poll_flush(cx),
            Io::Other(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Own(io) => Pin::new(io).poll_shutdown(cx),
            Io::Other(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// Where the reader is in the stream of WebSocket frames (RFC 6455 5.2).
///
/// `pending` holds bytes read from the socket and not handed to the reader; `message` the
/// bytes handed to the reader since the last message boundary (the start of a frame outside a
/// fragmented message), which the reader may still hold unparsed, so they move (or are read
/// again) with the connection.
#[derive(Debug, Default)]
struct Frames {
    pending: BytesMut,
    message: BytesMut,
    /// Bytes of the current frame (header included) not handed to the reader yet; 0 at the
    /// start of a frame.
    left: u64,
    /// Whether the current frame, once whole, ends a message.
    ends_message: bool,
    /// Inside a fragmented data message (a frame without FIN seen, its last one not yet).
    fragmented: bool,
    /// The stream ended inside a frame, or the bytes are not WebSocket frames: no boundaries
    /// any more (and no hand-off).
    broken: bool,
}

/// What a frame header says: its length with the header, and whether it ends a message.
fn parse_header(bytes: &[u8], fragmented: bool) -> Option<(u64, bool, bool)> {
    let (&b0, &b1) = (bytes.first()?, bytes.get(1)?);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    let masked = b1 & 0x80 != 0;
    let (payload, mut header) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])),
            4,
        ),
        127 => {
            let ext: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(ext), 10)
        }
        n => (u64::from(n), 2),
    };
    if masked {
        header += 4;
    }
    if bytes.len() < header {
        return None;
    }
    let control = opcode & 0x08 != 0;
    // After this frame: a control frame leaves a fragmented message as it was; a data frame
    // ends its message with FIN.
    let (ends_message, fragmented_after) = match control {
        true => (!fragmented, fragmented),
        false => (fin, !fin),
    };
    Some((
        (header as u64).saturating_add(payload),
        ends_message,
        fragmented_after,
    ))
}

impl Frames {
    fn new(unread: BytesMut) -> Frames {
        Frames {
            pending: unread,
            ..Frames::default()
        }
    }

    /// How many bytes can go to a reader with room for `room` now, without crossing the end of
    /// the current frame; `None` if more must be read first.
    fn deliverable(&mut self, room: usize) -> Option<usize> {
        if room == 0 {
            return Some(0);
        }
        if self.broken {
            return (!self.pending.is_empty()).then(|| self.pending.len().min(room));
        }
        if self.left == 0 {
            let (len, ends_message, fragmented) = parse_header(&self.pending, self.fragmented)?;
            self.left = len;
            self.ends_message = ends_message;
            self.fragmented = fragmented;
        }
        if self.pending.is_empty() {
            return None;
        }
        let n = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(room)
            .min(self.pending.len());
        Some(n)
    }

    /// Hands `n` bytes to the reader, keeping them until the message ends.
    fn take(&mut self, n: usize) -> Bytes {
        let chunk = self.pending.split_to(n).freeze();
        if self.broken {
            return chunk;
        }
        self.left -= n as u64;
        if self.message.len() <= MAX_UNREAD {
            // Past the bound the hand-off is refused anyway; no need to keep more.
            self.message.extend_from_slice(&chunk);
        }
        if self.left == 0 && self.ends_message {
            self.message.clear();
        }
        chunk
    }

    /// What the reader has not consumed: the message in progress, and what was not handed out;
    /// at most [`MAX_UNREAD`] bytes. `Err`: more (a message over the bound was not kept whole),
    /// or no frames to tell: the frames, from now on without boundaries.
    fn unread(mut self) -> Result<Bytes, Frames> {
        if self.broken || self.message.len() + self.pending.len() > MAX_UNREAD {
            self.broken = true;
            return Err(self);
        }
        self.message.extend_from_slice(&self.pending);
        Ok(self.message.freeze())
    }
}

/// Why a connection was not handed over; it is still yours: [`HandOffError::into_io`].
pub struct HandOffError {
    kind: HandOffErrorKind,
    io: WebSocketIo,
}

/// The class of a [`HandOffError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandOffErrorKind {
    /// This process has not handed over to a successor that takes upgraded connections (no
    /// restart; a shutdown; connection hand-off off; a successor without a
    /// [`crate::Server::resume_upgraded`] handler, or an older build).
    NoSuccessor,
    /// The connection cannot move: a TLS connection (its session cannot move without kernel
    /// TLS), or one not served by handover.
    NotMovable,
    /// The state is larger than [`MAX_STATE`].
    StateTooLarge,
    /// More than [`MAX_UNREAD`] bytes were read and not consumed (a long message half
    /// received), or the stream is not WebSocket frames. The message in progress is not read
    /// again (see [`HandOffError::into_io`]).
    TooMuchUnread,
    /// The successor did not take it: passing failed (the channel, or the successor died), or
    /// it refused the connection.
    Refused,
}

impl HandOffError {
    fn new(kind: HandOffErrorKind, io: WebSocketIo) -> HandOffError {
        HandOffError { kind, io }
    }

    /// Why.
    pub fn kind(&self) -> HandOffErrorKind {
        self.kind
    }

    /// The connection, still this process's: the bytes of a message half received are read
    /// again from it, so a new `WebSocketStream` over it reads that message whole (except after
    /// [`HandOffErrorKind::TooMuchUnread`]: that message was not kept, and reading resumes in
    /// its middle; say goodbye and end).
    pub fn into_io(self) -> WebSocketIo {
        self.io
    }
}

impl fmt::Display for HandOffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            HandOffErrorKind::NoSuccessor => {
                "no successor that takes upgraded connections; the connection stays here"
            }
            HandOffErrorKind::NotMovable => {
                "this connection cannot move (TLS, or not served by handover); it stays here"
            }
            HandOffErrorKind::StateTooLarge => {
                "the state is larger than handover::upgrade::MAX_STATE (64 KiB); the connection stays here"
            }
            HandOffErrorKind::TooMuchUnread => {
                "more than handover::upgrade::MAX_UNREAD bytes (32 KiB) were read and not consumed; the connection stays here"
            }
            HandOffErrorKind::Refused => {
                "the successor did not take the connection; it stays here"
            }
        })
    }
}

impl fmt::Debug for HandOffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandOffError")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl std::error::Error for HandOffError {}

/// A connection the previous process handed over, as the successor's
/// [`crate::Server::resume_upgraded`] handler receives it.
#[derive(Debug)]
pub struct Resumed {
    io: WebSocketIo,
    state: Bytes,
}

impl Resumed {
    pub(crate) fn new(io: TrackedIo, unread: Bytes, state: Bytes) -> Resumed {
        Resumed {
            io: WebSocketIo::resumed(io, unread),
            state,
        }
    }

    /// The state the previous process handed over with it.
    pub fn state(&self) -> &Bytes {
        &self.state
    }

    /// What this process knows of the connection (its peer, listener, the server's handle).
    pub fn connection_info(&self) -> &ConnectionInfo {
        match &self.io.io {
            Io::Own(io) => io.info(),
            Io::Other(_) => unreachable!("BUG: a resumed connection is a handover connection"),
        }
    }

    /// The stream, to resume serving it (tokio-tungstenite: `WebSocketStream::from_raw_socket`
    /// with `Role::Server`), and the state.
    pub fn into_parts(self) -> (WebSocketIo, Bytes) {
        (self.io, self.state)
    }
}

/// The successor's handler of resumed connections ([`crate::Server::resume_upgraded`]).
#[derive(Clone)]
pub(crate) struct ResumeHandler(Arc<ResumeFn>);

type ResumeFn = dyn Fn(Resumed) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

impl ResumeHandler {
    pub(crate) fn new<F, Fut>(handler: F) -> ResumeHandler
    where
        F: Fn(Resumed) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        ResumeHandler(Arc::new(move |resumed| Box::pin(handler(resumed))))
    }

    /// Serves a resumed connection on a task of its own.
    pub(crate) fn spawn(&self, resumed: Resumed) {
        tokio::spawn((self.0)(resumed));
    }
}

impl fmt::Debug for ResumeHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeHandler")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client sends it (masked), with `payload`.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `bytes` in pieces of `split`, reads with room `room`; returns the sizes handed
    /// out, and the frames state.
    fn read_all(bytes: &[u8], split: usize, room: usize) -> (Vec<usize>, Frames) {
        let mut frames = Frames::default();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match frames.deliverable(room) {
                Some(n) if n > 0 => out.push(frames.take(n).len()),
                _ if fed < bytes.len() => {
                    let end = (fed + split).min(bytes.len());
                    frames.pending.extend_from_slice(&bytes[fed..end]);
                    fed = end;
                }
                _ => return (out, frames),
            }
        }
    }

    #[test]
    fn reads_stop_at_each_frame_end_whatever_the_splits() {
        let a = frame(true, 1, b"hello");
        let b = frame(true, 2, &[7; 300]);
        let c = frame(true, 1, &[9; 70_000]);
        let all = [a.clone(), b.clone(), c.clone()].concat();
        for split in [1, 3, 7, 100, 4096, all.len()] {
            let (sizes, frames) = read_all(&all, split, 1 << 20);
            // Cumulative sizes hit every frame end exactly.
            let mut at = 0;
            let mut ends = Vec::new();
            for n in sizes {
                at += n;
                ends.push(at);
            }
            for end in [a.len(), a.len() + b.len(), all.len()] {
                assert!(ends.contains(&end), "split {split}: no read ends at {end}");
            }
            assert!(
                frames.message.is_empty(),
                "a whole message is no longer kept"
            );
            assert_eq!(frames.unread().ok(), Some(Bytes::new()));
        }
    }

    #[test]
    fn a_message_half_received_is_unread_whole() {
        let first = frame(false, 1, b"part one ");
        let ping = frame(true, 9, b"p");
        let last = frame(true, 0, b"part two");
        let next = frame(true, 1, b"next");
        let all = [first.clone(), ping.clone(), last[..4].to_vec()].concat();
        let (_, frames) = read_all(&all, 5, 1 << 20);
        // The fragmented message so far, the ping inside it, the part of its last frame.
        assert_eq!(frames.unread().ok(), Some(Bytes::from(all.clone())));
        // Once its last frame is read, nothing is unread; the next frame's bytes, read ahead
        // from the socket but not handed out, are.
        let more = [all, last[4..].to_vec(), next[..3].to_vec()].concat();
        let mut frames = Frames::default();
        frames.pending.extend_from_slice(&more);
        while let Some(n) = frames.deliverable(1 << 20) {
            frames.take(n);
        }
        assert_eq!(frames.unread().ok(), Some(Bytes::from(next[..3].to_vec())));
    }

    /// A connection hyper upgraded that is not a plaintext connection of a handover server
    /// (as a TLS one is not): served as it is, and a hand-off gives it back, unharmed.
    #[tokio::test]
    async fn a_connection_that_cannot_move_is_given_back_and_still_serves() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::Role;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (io_tx, io_rx) = tokio::sync::oneshot::channel();
        let io_tx = std::sync::Mutex::new(Some(io_tx));
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.expect("accept");
            let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                let upgrade = hyper::upgrade::on(&mut req);
                let tx = io_tx.lock().expect("lock").take();
                tokio::spawn(async move {
                    if let (Ok(upgraded), Some(tx)) = (upgrade.await, tx) {
                        let _ = tx.send(WebSocketIo::new(upgraded));
                    }
                });
                async {
                    let mut response = hyper::Response::new(http_body_util::Empty::<Bytes>::new());
                    *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                    let headers = response.headers_mut();
                    headers.insert("connection", "upgrade".parse().expect("value"));
                    headers.insert("upgrade", "websocket".parse().expect("value"));
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), service)
                .with_upgrades()
                .await;
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(
            &mut client,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .expect("write");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut client, &mut byte)
                .await
                .expect("read the 101");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        let io = io_rx.await.expect("upgraded");
        assert!(!io.is_movable());
        assert!(io.connection_info().is_none());
        let err = io.hand_off(&b"state"[..]).await.expect_err("cannot move");
        assert_eq!(err.kind(), HandOffErrorKind::NotMovable);
        // Still served: an echo over it.
        let mut server_ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(err.into_io(), Role::Server, None)
                .await;
        let mut client_ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        client_ws.send(Message::text("ping")).await.expect("send");
        let got = server_ws.next().await.expect("a message").expect("ok");
        assert_eq!(got, Message::text("ping"));
        server.abort();
    }

    /// One frame of a random stream: FIN, opcode (0 continuation, 1 text, 2 binary, 9 ping),
    /// payload length.
    fn frames_strategy() -> impl proptest::strategy::Strategy<Value = Vec<(bool, u8, usize)>> {
        use proptest::prelude::*;
        let len = prop_oneof![0usize..130, 120usize..300, 65_530usize..65_540];
        proptest::collection::vec(
            (
                any::<bool>(),
                prop_oneof![Just(0u8), Just(1), Just(2), Just(9)],
                len,
            ),
            1..12,
        )
    }

    proptest::proptest! {
        /// Whatever the frames, the read sizes and the pieces the socket gives: the bytes come
        /// out whole and in order, no read crosses the end of a frame, and what is unread at
        /// any moment is exactly the message in progress (from its first frame on) and what was
        /// not handed out.
        #[test]
        fn frames_are_handed_out_whole_and_never_across_a_frame_end(
            spec in frames_strategy(),
            split in 1usize..5000,
            room in 1usize..70_000,
        ) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            // Where each message starts (the boundary before it), frame by frame.
            let mut message_start = Vec::new();
            let mut fragmented = false;
            let mut start = 0;
            for (fin, opcode, len) in &spec {
                let control = *opcode >= 8;
                // Control frames are never fragmented (RFC 6455 5.5).
                let fin = control || *fin;
                if !fragmented {
                    start = bytes.len();
                }
                bytes.extend(frame(fin, *opcode, &vec![b'x'; *len]));
                ends.push(bytes.len());
                if !control {
                    fragmented = !fin;
                }
                message_start.push(if fragmented { start } else { bytes.len() });
            }
            let mut frames = Frames::default();
            let mut out = Vec::new();
            let mut fed = 0;
            loop {
                match frames.deliverable(room) {
                    Some(n) if n > 0 => {
                        let at = out.len();
                        out.extend_from_slice(&frames.take(n));
                        // Not across a frame end: the next end at or after `at` bounds it.
                        let next_end = ends.iter().copied().find(|&e| e > at).unwrap_or(usize::MAX);
                        proptest::prop_assert!(out.len() <= next_end);
                        if let Some(i) = ends.iter().position(|&e| e == out.len()) {
                            // At a frame end: unread = the message in progress + not handed out.
                            let mut expect = bytes[message_start[i]..out.len()].to_vec();
                            expect.extend_from_slice(&frames.pending);
                            let copy = Frames {
                                pending: frames.pending.clone(),
                                message: frames.message.clone(),
                                fragmented: frames.fragmented,
                                ..Frames::default()
                            };
                            if expect.len() <= MAX_UNREAD {
                                proptest::prop_assert_eq!(copy.unread().ok(), Some(Bytes::from(expect)));
                            } else {
                                proptest::prop_assert!(copy.unread().is_err());
                            }
                        }
                    }
                    _ if fed < bytes.len() => {
                        let end = (fed + split).min(bytes.len());
                        frames.pending.extend_from_slice(&bytes[fed..end]);
                        fed = end;
                    }
                    _ => break,
                }
            }
            proptest::prop_assert_eq!(out, bytes);
        }
    }

    #[test]
    fn a_message_over_the_bound_is_reported_too_long() {
        let big = frame(true, 2, &[1; MAX_UNREAD + 10]);
        let (_, frames) = read_all(&big[..MAX_UNREAD + 5], 4096, 1 << 20);
        let frames = frames.unread().expect_err("over the bound");
        assert!(
            frames.broken,
            "from now on, bytes are handed out as they come"
        );
    }
}
