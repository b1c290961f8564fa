//! The connection to the MTA: TCP, or a Unix-domain socket when the MTA
//! runs on the same host (`backend.addr = "unix:/path"`).
//!
//! One type for both, so the relay, the probe and the opaque
//! (implicit-TLS) path read and write the MTA the same way whatever the
//! transport.
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::MtaAddr;

pub enum MtaStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl MtaStream {
    /// Connects to `addr` (no timeout: the caller adds it).
    pub async fn connect(addr: &MtaAddr) -> io::Result<MtaStream> {
        match addr {
            MtaAddr::Tcp(a) => {
                let s = TcpStream::connect(a).await?;
                // Replies and commands are small and each is waited for.
                let _ = s.set_nodelay(true);
                Ok(MtaStream::Tcp(s))
            }
            MtaAddr::Unix(p) => Ok(MtaStream::Unix(UnixStream::connect(p).await?)),
        }
    }

    /// The agent's own end on TCP; `None` on a Unix socket, which has no
    /// address the MTA could be told.
    pub fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        match self {
            MtaStream::Tcp(s) => s.local_addr().map(Some),
            MtaStream::Unix(_) => Ok(None),
        }
    }
}

impl AsyncRead for MtaStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MtaStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            MtaStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MtaStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MtaStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            MtaStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MtaStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MtaStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MtaStream::Tcp(s) => s.is_write_vectored(),
            MtaStream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MtaStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            MtaStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MtaStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            MtaStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A fresh directory of this test's own, removed on drop.
    struct Dir(std::path::PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir()
                .join(format!("tarpit-mta-stream-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn a_unix_socket_carries_both_ways() {
        let dir = Dir::new("both-ways");
        let path = dir.path().join("mta.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"220 mx\r\n").await.unwrap();
            let mut buf = [0u8; 6];
            s.read_exact(&mut buf).await.unwrap();
            buf
        });
        let mut c = MtaStream::connect(&MtaAddr::Unix(path)).await.unwrap();
        assert_eq!(c.local_addr().unwrap(), None);
        let mut banner = [0u8; 8];
        c.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"220 mx\r\n");
        c.write_all(b"QUIT\r\n").await.unwrap();
        assert_eq!(&server.await.unwrap(), b"QUIT\r\n");
    }

    #[tokio::test]
    async fn a_missing_socket_is_an_error_not_a_hang() {
        let dir = Dir::new("missing");
        let e = MtaStream::connect(&MtaAddr::Unix(dir.path().join("none")))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
