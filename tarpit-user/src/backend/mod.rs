//! The connection to the real MTA.
//!
//! Opened only once a client has earned it (after the greeting delay);
//! the first bytes tell the MTA who the client really is (PROXY v2, v1 or
//! XCLIENT), then the MTA's banner is read to be relayed.
pub mod pace;
pub mod probe;
pub mod proxy;
pub mod stream;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

pub use self::stream::MtaStream;
use crate::config::{BackendConfig, ClientAddress, MtaAddr};
use crate::smtp::{LineBuf, Reply, ReplyAssembler, ReplyError};

/// Longest reply line accepted from the MTA (RFC 5321: 512).
const MAX_REPLY_LINE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to the MTA at {addr}: {source}")]
    Connect {
        addr: MtaAddr,
        source: std::io::Error,
    },
    #[error("the MTA did not answer within {0:?}")]
    Timeout(Duration),
    #[error("connection to the MTA: {0}")]
    Io(#[from] std::io::Error),
    #[error("the MTA closed the connection")]
    Closed,
    #[error("the MTA sent a malformed reply: {0}")]
    Malformed(#[from] ReplyError),
    #[error("the MTA sent a reply line longer than {MAX_REPLY_LINE} bytes")]
    LineTooLong,
    #[error("XCLIENT refused or not offered by the MTA: {0}")]
    Xclient(String),
    #[error("the MTA refused the probe: {0}")]
    Refused(String),
}

impl BackendError {
    /// A short metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Connect { .. } => "connect",
            BackendError::Timeout(_) => "timeout",
            BackendError::Io(_) => "io",
            BackendError::Closed => "closed",
            BackendError::Malformed(_) | BackendError::LineTooLong => "malformed",
            BackendError::Xclient(_) => "xclient",
            BackendError::Refused(_) => "refused",
        }
    }
}

/// An open session with the MTA.
pub struct Backend {
    pub stream: MtaStream,
    buf: LineBuf,
    replies: ReplyAssembler,
    /// Its place in the pacing limits (`pace`), given back on drop.
    slot: pace::Slot,
}

impl Backend {
    /// Connects, introduces the client and returns the MTA's banner.
    pub async fn open(
        cfg: &BackendConfig,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<(Backend, Reply), BackendError> {
        let t = cfg.connect_timeout;
        let mut b = Backend::connect(cfg, &cfg.addr).await?;
        let banner = timeout(t, b.introduce(cfg, Some((client, local))))
            .await
            .map_err(|_| BackendError::Timeout(t))??;
        Ok((b, banner))
    }

    /// [`Backend::open`] with a pacing slot already taken
    /// ([`pace::Pacer::slot`]): the connecting part of it is given back
    /// once the banner is in, the session part when the connection closes.
    pub async fn open_in(
        cfg: &BackendConfig,
        mut slot: pace::Slot,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<(Backend, Reply), BackendError> {
        let (mut b, banner) = Backend::open(cfg, client, local).await?;
        slot.opened();
        b.slot = slot;
        Ok((b, banner))
    }

    /// Connects to `addr` and sends only the PROXY header: for an
    /// implicit-TLS client whose TLS session is with the MTA, whose banner
    /// is inside that session, so there is nothing to wait for. XCLIENT,
    /// which is in-band, cannot work here (the configuration refuses it).
    pub async fn open_opaque(
        cfg: &BackendConfig,
        addr: &MtaAddr,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<Backend, BackendError> {
        let t = cfg.connect_timeout;
        let mut b = Backend::connect(cfg, addr).await?;
        let header = match cfg.client_address {
            ClientAddress::ProxyV2 => proxy::v2_header(client, local)?,
            ClientAddress::ProxyV1 => proxy::v1_header(client, local),
            ClientAddress::Xclient => {
                return Err(BackendError::Xclient(
                    "XCLIENT cannot precede a TLS handshake: use PROXY for implicit-TLS ports"
                        .to_string(),
                ));
            }
        };
        timeout(t, b.stream.write_all(&header))
            .await
            .map_err(|_| BackendError::Timeout(t))??;
        Ok(b)
    }

    async fn connect(cfg: &BackendConfig, addr: &MtaAddr) -> Result<Backend, BackendError> {
        let t = cfg.connect_timeout;
        let stream = timeout(t, MtaStream::connect(addr))
            .await
            .map_err(|_| BackendError::Timeout(t))?
            .map_err(|source| BackendError::Connect {
                addr: addr.clone(),
                source,
            })?;
        Ok(Backend {
            stream,
            buf: LineBuf::new(MAX_REPLY_LINE),
            replies: ReplyAssembler::default(),
            slot: pace::Slot::default(),
        })
    }

    /// Tells the MTA who the client is (`Some((client, local))`), or that
    /// the connection is the agent's own (`None`: the probe over a Unix
    /// socket, which has no address to give: PROXY v2 `LOCAL`, v1
    /// `UNKNOWN`, no XCLIENT); returns the banner.
    async fn introduce(
        &mut self,
        cfg: &BackendConfig,
        ends: Option<(SocketAddr, SocketAddr)>,
    ) -> Result<Reply, BackendError> {
        let Some((client, local)) = ends else {
            match cfg.client_address {
                ClientAddress::ProxyV2 => self.stream.write_all(&proxy::v2_local_header()?).await?,
                ClientAddress::ProxyV1 => self.stream.write_all(proxy::V1_UNKNOWN).await?,
                ClientAddress::Xclient => {}
            }
            return self.read_reply().await;
        };
        match cfg.client_address {
            ClientAddress::ProxyV2 => {
                let h = proxy::v2_header(client, local)?;
                self.stream.write_all(&h).await?;
                self.read_reply().await
            }
            ClientAddress::ProxyV1 => {
                self.stream
                    .write_all(&proxy::v1_header(client, local))
                    .await?;
                self.read_reply().await
            }
            ClientAddress::Xclient => {
                let banner = self.read_reply().await?;
                if banner.code != 220 {
                    // The MTA refuses service: the client gets its words.
                    return Ok(banner);
                }
                self.stream
                    .write_all(format!("EHLO {}\r\n", cfg.helo_name).as_bytes())
                    .await?;
                let ehlo = self.read_reply().await?;
                let offered: Vec<String> = ehlo
                    .ehlo_keywords()
                    .iter()
                    .find_map(|k| k.strip_prefix("XCLIENT ").map(str::to_string))
                    .map(|attrs| attrs.split_ascii_whitespace().map(str::to_string).collect())
                    .unwrap_or_default();
                if !offered.iter().any(|a| a == "ADDR") {
                    return Err(BackendError::Xclient(format!(
                        "EHLO reply offers no XCLIENT ADDR (is the agent in smtpd_authorized_xclient_hosts?): {}",
                        String::from_utf8_lossy(&ehlo.to_bytes()).trim_end()
                    )));
                }
                self.stream
                    .write_all(proxy::xclient_line(client, local, &offered).as_bytes())
                    .await?;
                let r = self.read_reply().await?;
                if r.code != 220 {
                    return Err(BackendError::Xclient(
                        String::from_utf8_lossy(&r.to_bytes())
                            .trim_end()
                            .to_string(),
                    ));
                }
                Ok(r)
            }
        }
    }

    /// Reads until one complete reply is there (no timeout: callers add it).
    pub async fn read_reply(&mut self) -> Result<Reply, BackendError> {
        loop {
            if let Some(r) = self.next_reply()? {
                return Ok(r);
            }
            if self.stream.read_buf(self.buf.spare()).await? == 0 {
                return Err(BackendError::Closed);
            }
        }
    }

    /// Reads what the MTA sent; `Ok(0)` is end of stream. Cancel-safe.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        self.stream.read_buf(self.buf.spare()).await
    }

    /// The next complete reply among the bytes read, if any.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, BackendError> {
        while let Some(line) = self.buf.next_line() {
            let line: Bytes = line.map_err(|_| BackendError::LineTooLong)?;
            if let Some(r) = self.replies.push(line)? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Bytes read from the MTA but not yet parsed (after STARTTLS goes to
    /// the MTA, they belong to its TLS handshake).
    pub fn take_buffered(&mut self) -> Bytes {
        self.buf.take_raw(usize::MAX)
    }

    /// Writes to the MTA, giving up after `limit` (an MTA that stops
    /// reading must not stall the session, its drain or its close).
    pub async fn send(&mut self, data: &[u8], limit: Duration) -> Result<(), BackendError> {
        timeout(limit, self.stream.write_all(data))
            .await
            .map_err(|_| BackendError::Timeout(limit))??;
        Ok(())
    }
}
