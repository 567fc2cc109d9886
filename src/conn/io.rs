//! A connection's bytes: the socket (registered with the server while it is open), and bytes
//! to replay before the socket's own. Both report what they see to the connection's
//! [`Control`] through the same call ([`Control::note_read`]), so a replayed byte counts
//! exactly as a fresh one: a connection with a request half replayed is `Reading`, not idle.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::either::Either;

use super::control::{Control, Phase};
use crate::conn_info::ConnectionInfo;
use crate::registry::{Connections, Registration};

/// An accepted stream socket.
pub(crate) type Sock = Either<tokio::net::TcpStream, tokio::net::UnixStream>;

fn sock_fd(sock: &Sock) -> BorrowedFd<'_> {
    match sock {
        Either::Left(s) => s.as_fd(),
        Either::Right(s) => s.as_fd(),
    }
}

/// What a peek at a connection's first bytes found.
#[derive(Debug)]
pub(crate) enum Peeked<R> {
    /// What the bytes were taken for.
    Told(R),
    /// The peer closed its sending side before its bytes told anything (or without a byte).
    Eof,
}

/// Whether the peer has shut down its sending side (`POLLRDHUP`): bytes still queued are all
/// that will come. Asked only while a connection's first bytes cannot tell its protocol yet.
fn peer_done_sending(fd: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(&fd, PollFlags::RDHUP)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&now)) {
        Ok(0) => false,
        Ok(_) => fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR),
        // Not known (`poll` refused, by a seccomp filter say): taken as done, so that the
        // connection ends rather than wait on a readiness that may never clear (a spin); a
        // client that sent half a preface then loses its connection, not the server a CPU.
        Err(_) => true,
    }
}

/// Something that reports to a connection's control block.
pub(crate) trait Tracked {
    /// The connection's control block.
    fn control(&self) -> &Arc<Control>;
}

/// A connection's socket: registered for the forced cut and the sweeper, counted by the
/// server's tracker for as long as it exists (in hyper's hands, or the application's after an
/// upgrade), and reporting reads and writes to the connection's control block.
///
/// Its `Drop` removes the registration *before* the socket closes (whatever the fields'
/// order): the registry's invariant that every fd it holds is open.
#[derive(Debug)]
pub(crate) struct TrackedIo {
    registration: Registration,
    control: Arc<Control>,
    info: ConnectionInfo,
    sock: Sock,
}

impl Drop for TrackedIo {
    fn drop(&mut self) {
        // Runs before any field is dropped: out of the registry while the socket is open.
        self.registration.remove();
    }
}

impl TrackedIo {
    /// Registers `sock` with `connections`. `passable`: a plaintext connection that a
    /// successor can take over.
    pub(crate) fn register(
        connections: &Connections,
        sock: Sock,
        info: ConnectionInfo,
        passable: bool,
    ) -> TrackedIo {
        let fd = sock_fd(&sock).as_raw_fd();
        let (control, registration) = connections.register(fd, passable);
        TrackedIo {
            registration,
            control,
            info,
            sock,
        }
    }

    pub(crate) fn control(&self) -> &Arc<Control> {
        &self.control
    }

    pub(crate) fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// Peeks at the first bytes without consuming them (so, without reporting a read), until
    /// `told` makes something of them (`Some`). While it cannot (`None`: more bytes are
    /// needed), the wait is for the socket's readiness, which the runtime clears only if no
    /// new bytes arrived since the peek: so a peek that saw too few bytes is not repeated until
    /// more arrive (a busy loop otherwise), and bytes that arrive meanwhile are not missed.
    pub(crate) fn poll_peek_until<R>(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        mut told: impl FnMut(&[u8]) -> Option<R>,
    ) -> Poll<std::io::Result<Peeked<R>>> {
        loop {
            match &self.sock {
                Either::Left(s) => std::task::ready!(s.poll_read_ready(cx))?,
                Either::Right(s) => std::task::ready!(s.poll_read_ready(cx))?,
            }
            let mut peek = || {
                let (n, _) = rustix::net::recv(
                    sock_fd(&self.sock),
                    &mut *buf,
                    rustix::net::RecvFlags::PEEK,
                )?;
                if n == 0 {
                    return Ok(Peeked::Eof);
                }
                match told(&buf[..n]) {
                    Some(r) => Ok(Peeked::Told(r)),
                    // The peer sent all it will: no more bytes can tell anything (and the
                    // runtime never clears a closed socket's readiness: waiting would spin).
                    None if peer_done_sending(sock_fd(&self.sock)) => Ok(Peeked::Eof),
                    // Clears the readiness seen before the peek (see above).
                    None => Err(std::io::ErrorKind::WouldBlock.into()),
                }
            };
            let peeked = match &self.sock {
                Either::Left(s) => s.try_io(tokio::io::Interest::READABLE, &mut peek),
                Either::Right(s) => s.try_io(tokio::io::Interest::READABLE, &mut peek),
            };
            match peeked {
                Ok(p) => return Poll::Ready(Ok(p)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Whether bytes wait in the socket's receive queue that nobody has read yet.
    pub(crate) fn bytes_waiting(&self) -> bool {
        rustix::io::ioctl_fionread(sock_fd(&self.sock)).is_ok_and(|n| n > 0)
    }
}

impl Tracked for TrackedIo {
    fn control(&self) -> &Arc<Control> {
        &self.control
    }
}

impl AsFd for TrackedIo {
    fn as_fd(&self) -> BorrowedFd<'_> {
        sock_fd(&self.sock)
    }
}

impl AsRawFd for TrackedIo {
    fn as_raw_fd(&self) -> RawFd {
        sock_fd(&self.sock).as_raw_fd()
    }
}

impl AsyncRead for TrackedIo {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // Room left, not the filled length: no slicing (and so no bounds check) per read.
        let room = buf.remaining();
        let this = &mut *self;
        let result = Pin::new(&mut this.sock).poll_read(cx, buf);
        if buf.remaining() < room {
            this.control.note_read();
        }
        result
    }
}

impl AsyncWrite for TrackedIo {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.sock).poll_write(cx, buf);
        self.control.note_write(result.is_pending());
        result
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.sock).poll_write_vectored(cx, bufs);
        self.control.note_write(result.is_pending());
        result
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.sock.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.sock).poll_flush(cx);
        self.control.note_write(result.is_pending());
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_shutdown(cx)
    }
}

/// A transport with bytes to deliver before its own: what was read to tell the protocol, what
/// hyper had read on a connection taken apart, or what the previous process had read on a
/// connection it passed over. Buffered bytes are a request begun: the connection is `Reading`
/// from the moment they are put here, and every replayed byte is reported like a fresh one.
#[derive(Debug)]
pub(crate) struct Replay<T> {
    replay: Bytes,
    inner: T,
}

impl<T: Tracked> Replay<T> {
    pub(crate) fn new(replay: Bytes, inner: T) -> Replay<T> {
        if !replay.is_empty() && inner.control().phase().0 == Phase::Idle {
            inner.control().set_phase(Phase::Reading);
        }
        Replay { replay, inner }
    }

    pub(crate) fn inner(&self) -> &T {
        &self.inner
    }

    /// The transport, and the bytes not replayed yet.
    pub(crate) fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.replay)
    }
}

impl<T: Tracked> Tracked for Replay<T> {
    fn control(&self) -> &Arc<Control> {
        self.inner.control()
    }
}

impl<T: AsyncRead + Tracked + Unpin> AsyncRead for Replay<T> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay[..n]);
            self.replay.advance(n);
            if n > 0 {
                self.inner.control().note_read();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
