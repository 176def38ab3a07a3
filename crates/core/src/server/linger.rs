//! Sockets that read and discard for a moment before they close.
//!
//! When keel refuses input while the client is still sending it (a body over the limit, a
//! WebSocket message over the limit), closing the socket with unread data in it makes the
//! kernel send a reset, and the client sees `ECONNRESET`, `EPIPE` or close code 1006 instead
//! of keel's answer. A [`LingeringStream`] avoids that: when it is dropped (by hyper after a
//! response, or by a WebSocket after its close frame) it half-closes its write side, so the
//! client reads everything keel wrote and then the end of the stream, and it keeps reading
//! and discarding until the client closes too, for at most the configured linger time.
//! A forced drain cuts the linger short.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A TCP stream that lingers when it is dropped; reads and writes go straight through.
pub(crate) struct LingeringStream {
    /// The socket; taken by the linger task on drop.
    stream: Option<TcpStream>,
    /// How long to linger; zero closes at once.
    linger: Duration,
    /// Tracks the linger task, so the drain waits for it.
    tracker: TaskTracker,
    /// Cancelled when the drain is forced: a lingering socket closes at once.
    force: CancellationToken,
}

impl LingeringStream {
    pub(crate) fn new(
        stream: TcpStream,
        linger: Duration,
        tracker: TaskTracker,
        force: CancellationToken,
    ) -> LingeringStream {
        LingeringStream {
            stream: Some(stream),
            linger,
            tracker,
            force,
        }
    }

    fn stream(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        // The stream is only taken in `drop`, after which nothing polls it.
        Pin::new(
            self.get_mut()
                .stream
                .as_mut()
                .expect("the stream is taken only on drop"),
        )
    }
}

impl AsyncRead for LingeringStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for LingeringStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }
}

impl Drop for LingeringStream {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.linger.is_zero() || self.force.is_cancelled() {
            return;
        }
        // Dropped outside a runtime (a runtime being torn down): just close.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = linger(stream, self.linger, self.force.clone());
        runtime.spawn(self.tracker.track_future(task));
    }
}

/// Half-closes `stream`, then reads and discards until the peer closes, `linger` passes or
/// the drain is forced.
async fn linger(mut stream: TcpStream, linger: Duration, force: CancellationToken) {
    // What was written reaches the client, followed by the end of the stream; the peer may
    // already be gone, and then there is nothing to wait for.
    if stream.shutdown().await.is_err() {
        return;
    }
    let discard = async {
        let mut buf = vec![0u8; 16 * 1024];
        // Ends at the peer's close (0) or a failed read.
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::select! {
        // The drain was forced: close now.
        _ = force.cancelled() => {}
        // The peer closed, or the linger time passed.
        _ = tokio::time::timeout(linger, discard) => {}
    }
}
