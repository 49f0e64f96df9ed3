//! Byte transport for a session: plain or TLS streams behind one type, and the
//! output queue that lets cached `Bytes` be written without copying.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream that may have been upgraded to TLS after an SSLRequest.
pub enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, b),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The transport under an upstream connection: TCP, or a Unix socket when
/// Postgres runs on the same host (markedly cheaper per round trip than TCP
/// loopback, which matters when the proxy shares a small machine with Postgres).
pub enum Transport {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, b),
            Transport::Unix(s) => Pin::new(s).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Bytes waiting to be written to one peer, as a list of shared chunks.
///
/// Forwarded data is split off the receive buffer and cached results are pushed
/// as the `Bytes` the cache holds, so nothing is copied on the way out; one
/// vectored write sends a whole reply.
#[derive(Default)]
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    len: usize,
    /// Set once the queue drained and the peer still needs a flush (TLS).
    needs_flush: bool,
}

/// At most this many chunks go into one vectored write.
const MAX_IOV: usize = 32;

impl OutQueue {
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.chunks.push_back(b);
        }
    }

    pub fn push_static(&mut self, b: &'static [u8]) {
        self.push(Bytes::from_static(b));
    }

    /// Moves the first `n` bytes of a receive buffer into the queue without copying.
    pub fn push_from(&mut self, buf: &mut BytesMut, n: usize) {
        if n > 0 {
            self.push(buf.split_to(n).freeze());
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write as much as the peer accepts now. `Ready(Ok)` means the queue is empty
    /// and flushed; `Pending` means the peer is full (the waker is registered).
    pub fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.chunks.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n_iov = 0;
            for c in self.chunks.iter().take(MAX_IOV) {
                iov[n_iov] = IoSlice::new(c);
                n_iov += 1;
            }
            let written = if n_iov == 1 {
                std::task::ready!(Pin::new(&mut *w).poll_write(cx, &iov[0]))?
            } else {
                std::task::ready!(Pin::new(&mut *w).poll_write_vectored(cx, &iov[..n_iov]))?
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(written);
            self.needs_flush = true;
        }
        if self.needs_flush {
            std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
            self.needs_flush = false;
        }
        Poll::Ready(Ok(()))
    }

    fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// Read once into the spare capacity of `buf`; `Ready(Ok(0))` is end of stream.
pub fn poll_read_into<R: AsyncRead + Unpin>(
    r: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    min_spare: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < min_spare {
        buf.reserve(min_spare);
    }
    tokio_util::io::poll_read_buf(Pin::new(r), cx, buf)
}

/// Write a whole buffer, for the startup phase where nothing else is in flight.
pub async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, b: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(b).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn out_queue_writes_chunks_in_order() {
        let mut q = OutQueue::default();
        q.push_static(b"ab");
        let mut rx = BytesMut::from(&b"cdef"[..]);
        q.push_from(&mut rx, 3);
        assert_eq!(&rx[..], b"f");
        q.push(Bytes::new());
        assert_eq!(q.len(), 5);
        let mut sink: Vec<u8> = Vec::new();
        std::future::poll_fn(|cx| q.poll_write(&mut sink, cx))
            .await
            .unwrap();
        assert_eq!(sink, b"abcde");
        assert!(q.is_empty());
    }
}
