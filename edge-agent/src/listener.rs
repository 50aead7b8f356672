//! A TCP listener for the HTTP endpoint that holds at most a set number of connections
//! open: one more is answered `429 Too Many Requests` (with `Retry-After`) and closed, so
//! a flood of clients can take neither the memory (each may send a body of up to
//! `http.max_frame_bytes`) nor the file descriptors of the box.

use crate::telemetry::Telemetry;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The listener: connections beyond `max` are refused with 429.
pub struct Limited {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    telemetry: Arc<Telemetry>,
}

impl Limited {
    /// Wraps `inner`, allowing `max` connections at once.
    pub fn new(inner: TcpListener, max: usize, telemetry: Arc<Telemetry>) -> Limited {
        Limited {
            inner,
            slots: Arc::new(Semaphore::new(max)),
            max,
            telemetry,
        }
    }
}

/// An accepted connection; its slot is freed when it closes.
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

/// The answer to a connection over the limit.
fn too_many(max: usize) -> Vec<u8> {
    let body = format!(
        "{{\"error\":\"too many connections: the agent serves at most {max} at once \
         (http.max_connections); retry later\"}}"
    );
    format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl axum::serve::Listener for Limited {
    type Io = Connection;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Connection, std::net::SocketAddr) {
        loop {
            let (mut stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, as axum does.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    return (
                        Connection {
                            stream,
                            _slot: slot,
                        },
                        addr,
                    )
                }
                Err(_) => {
                    self.telemetry.http_refused("too_many_connections");
                    let answer = too_many(self.max);
                    // Answered beside the accept loop, within a second, then closed.
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            let _ = stream.write_all(&answer).await;
                            let _ = stream.shutdown().await;
                        })
                        .await;
                    });
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn the_connection_over_the_limit_gets_429() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let telemetry = Arc::new(Telemetry::new());
        let mut listener = Limited::new(inner, 2, telemetry.clone());
        let accepting = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..2 {
                held.push(listener.accept().await.0);
            }
            // The third is answered inside this accept, which then waits for a fourth.
            let _ = tokio::time::timeout(Duration::from_secs(2), listener.accept()).await;
            held
        });
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        assert!(answer.contains("http.max_connections"), "{answer}");
        let held = accepting.await.unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(telemetry.http_refused_count("too_many_connections"), 1);
    }
}
