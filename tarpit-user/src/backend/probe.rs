//! What the MTA says to every client before a transaction: its banner and
//! its EHLO reply, learned by a probe connection (at start, on reload, on
//! a timer, and whenever a late connection shows a different EHLO reply).
//! With `backend.connect = "at-transaction"` the agent speaks these itself
//! and connects the MTA only when a client starts a transaction.
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::timeout;

use super::{Backend, BackendError};
use crate::config::{BackendConfig, MtaAddr};
use crate::smtp::Reply;

/// The MTA's words, as the probe heard them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The banner (220).
    pub banner: Reply,
    /// The reply to `EHLO` (250, multi-line), as the MTA sent it: the
    /// session hides what the client must not see (`Reply::rewrite_ehlo`).
    pub ehlo: Reply,
}

impl Learned {
    /// The MTA's host name, the first word of its EHLO greeting line (the
    /// agent's reply to HELO).
    pub fn host_name(&self) -> String {
        self.ehlo
            .lines
            .first()
            .and_then(|l| crate::smtp::parse_reply_line(l).ok())
            .and_then(|l| {
                String::from_utf8_lossy(l.text)
                    .split_ascii_whitespace()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "localhost".to_string())
    }
}

/// The latest [`Learned`], shared by every session and the probe task;
/// kept across reloads (a clone shares it).
#[derive(Clone, Debug, Default)]
pub struct MtaProfile(Arc<RwLock<Option<Arc<Learned>>>>);

impl MtaProfile {
    /// What is known now; `None` until a probe has succeeded.
    pub fn get(&self) -> Option<Arc<Learned>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets what was learned (the MTA moved): sessions connect at once
    /// until the next probe succeeds.
    pub fn clear(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn set(&self, learned: Learned) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(learned));
    }

    /// A late connection showed `ehlo` instead of what was learned: the
    /// next clients are told that.
    pub fn set_ehlo(&self, ehlo: Reply) {
        let mut g = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = g.as_ref() {
            let mut next = (**l).clone();
            next.ehlo = ehlo;
            *g = Some(Arc::new(next));
        }
    }
}

/// One probe: connect, introduce the agent itself as the client (its own
/// end of the connection, so the MTA never sees a made-up address), read
/// the banner, `EHLO helo_name`, `QUIT`.
pub async fn probe(cfg: &BackendConfig) -> Result<Learned, BackendError> {
    let t = cfg.connect_timeout;
    let work = async {
        let mut b = Backend::connect(cfg, &cfg.addr).await?;
        // Over TCP the agent's own end, as client and destination; a Unix
        // socket has none: the MTA is told the connection is not relayed.
        let ends = match (b.stream.local_addr()?, &cfg.addr) {
            (Some(me), MtaAddr::Tcp(mta)) => Some((me, *mta)),
            _ => None,
        };
        let banner = b.introduce(cfg, ends).await?;
        if banner.code != 220 {
            return Err(BackendError::Refused(banner_text(&banner)));
        }
        b.send(
            format!("EHLO {}\r\n", cfg.helo_name).as_bytes(),
            cfg.write_timeout,
        )
        .await?;
        let ehlo = b.read_reply().await?;
        if ehlo.code != 250 {
            return Err(BackendError::Refused(banner_text(&ehlo)));
        }
        let _ = b.send(b"QUIT\r\n", Duration::from_secs(1)).await;
        Ok(Learned { banner, ehlo })
    };
    timeout(t, work)
        .await
        .map_err(|_| BackendError::Timeout(t))?
}

fn banner_text(r: &Reply) -> String {
    String::from_utf8_lossy(&r.to_bytes())
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn reply(code: u16, lines: &[&str]) -> Reply {
        Reply {
            code,
            lines: lines
                .iter()
                .map(|l| Bytes::from(format!("{l}\r\n")))
                .collect(),
        }
    }

    #[test]
    fn host_name_and_set_ehlo() {
        let p = MtaProfile::default();
        assert!(p.get().is_none());
        p.set_ehlo(reply(250, &["250 x"]));
        assert!(p.get().is_none(), "nothing to update before a probe");
        p.set(Learned {
            banner: reply(220, &["220 mx.example ESMTP"]),
            ehlo: reply(250, &["250-mx.example", "250 PIPELINING"]),
        });
        assert_eq!(p.get().unwrap().host_name(), "mx.example");
        p.set_ehlo(reply(250, &["250-mx2.example", "250 SIZE 10"]));
        let l = p.get().unwrap();
        assert_eq!(l.host_name(), "mx2.example");
        assert_eq!(l.banner.code, 220);
    }
}
