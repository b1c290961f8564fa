//! The late connection: when it is due, the pacing slot, the MTA's
//! banner, the replayed HELO/EHLO and the check of its capabilities, then
//! the opening command.
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::super::{Close, Owed, READ_AHEAD, Session};
use super::keyword_name;
use crate::backend::pace::Slot;
use crate::metrics::Outcome;
use crate::policy::release_at;
use crate::session::connect;
use crate::smtp::Reply;

/// The EHLO keywords a MAIL command's parameters rely on.
fn mail_needs(line: &[u8]) -> Vec<&'static str> {
    let text = String::from_utf8_lossy(line).to_ascii_uppercase();
    let mut needs = Vec::new();
    for word in text.split_ascii_whitespace().skip(1) {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        let need = match (key, value) {
            ("SIZE", _) => "SIZE",
            ("BODY", "8BITMIME") => "8BITMIME",
            ("BODY", "BINARYMIME") => "BINARYMIME",
            ("SMTPUTF8", _) => "SMTPUTF8",
            ("RET" | "ENVID", _) => "DSN",
            ("AUTH", _) => "AUTH",
            ("REQUIRETLS", _) => "REQUIRETLS",
            _ => continue,
        };
        needs.push(need);
    }
    needs
}

/// The EHLO keywords an opening command relies on: its verb's own, its
/// parameters', and PIPELINING when more commands were sent behind it.
fn needs(line: &[u8], pipelined: bool) -> Vec<&'static str> {
    let verb = line
        .split(|&b| b == b' ' || b == b'\r')
        .next()
        .unwrap_or(b"");
    let mut needs = match verb {
        b"MAIL" => mail_needs(line),
        b"AUTH" => vec!["AUTH"],
        b"STARTTLS" => vec!["STARTTLS"],
        b"ETRN" => vec!["ETRN"],
        _ => Vec::new(),
    };
    if pipelined {
        needs.push("PIPELINING");
    }
    needs
}

/// The capabilities in `told` that `needed` names and `now` lacks.
fn missing(told: &[String], now: &[String], needed: &[&str]) -> Vec<String> {
    let has = |set: &[String], n: &str| set.iter().any(|k| keyword_name(k) == n);
    needed
        .iter()
        .filter(|n| has(told, n) && !has(now, n))
        .map(|n| n.to_string())
        .collect()
}

impl Session<'_> {
    /// When the late connection is due: the opening command is the next
    /// reply owed to the client, and its own hold has run (counted as
    /// its reply's would be, so the hold is not paid twice).
    pub(in crate::session::relay) fn connect_time(&self) -> Option<Instant> {
        let id = self.lazy.as_ref()?.opening.as_ref()?.id;
        let p = self.pending.front().filter(|p| p.id == id)?;
        Some(release_at(
            p.arrival,
            self.last_release,
            p.arrival,
            p.command_delay,
        ))
    }

    /// Opens the late connection when it is due: a pacing slot (watching
    /// the client meanwhile), the MTA's banner, the replayed HELO/EHLO and
    /// its check, then the opening command. `Some` ends the session.
    pub(in crate::session::relay) async fn connect_due(&mut self) -> Option<Outcome> {
        let at = self.connect_time()?;
        if at > Instant::now() {
            return None;
        }
        let lazy = self.lazy.as_mut()?;
        let op = lazy.opening.take()?;
        let hello = lazy.hello.clone();
        let told = lazy.told.clone();
        let learned = lazy.learned.clone();
        let slot = match self.wait_slot().await {
            Ok(Some(slot)) => slot,
            Ok(None) => {
                warn!(client = %self.peer, "no MTA slot within {:?}", connect::slot_wait(self.shared));
                self.shared.metrics.backend_error("slots");
                self.fail_opening(op.id, crate::session::NO_SERVICE.trim_end());
                return None;
            }
            Err(outcome) => return Some(outcome),
        };
        let (backend, banner) =
            match connect::open_in(self.shared, slot, self.peer, self.local).await {
                Ok(x) => x,
                Err(e) => {
                    warn!(client = %self.peer, "{e}");
                    self.shared.metrics.backend_error(e.kind());
                    self.fail_opening(op.id, crate::session::NO_SERVICE.trim_end());
                    return None;
                }
            };
        self.backend = Some(backend);
        self.backend_lost = false;
        self.last_mta_write = Instant::now();
        if let Some(l) = self.lazy.as_mut() {
            l.reached = true;
        }
        if banner.code != 220 {
            // The MTA refuses this client (its own rules, or overload):
            // its words are the answer to the command that opened it.
            info!(client = %self.peer, code = banner.code, "the MTA refused the late connection");
            self.backend_quit();
            let _ = self.flush_backend().await;
            // Whatever the MTA does next (it closes) is no news.
            self.backend_lost = true;
            self.reply_for(op.id, banner);
            self.close_opening(op.id, Outcome::BackendClosed);
            return None;
        }
        if let Some((line, ehlo)) = hello {
            let reply = match self.replay_hello(&line).await {
                Ok(r) => r,
                Err(e) => {
                    self.on_backend_lost(Some(e));
                    return None;
                }
            };
            if ehlo && reply.code == 250 {
                let now = reply
                    .rewrite_ehlo(self.ehlo_starttls(), self.auth_needs_tls())
                    .ehlo_keywords();
                if reply.ehlo_keywords() != learned.ehlo.ehlo_keywords() {
                    info!(client = %self.peer, "the MTA's EHLO reply changed since the probe: learned anew");
                    self.shared.mta.set_ehlo(reply.clone());
                }
                let gone = missing(&told, &now, &needs(&op.line, !self.reader.is_empty()));
                if !gone.is_empty() {
                    warn!(client = %self.peer, missing = gone.join(" "),
                        "the MTA no longer offers what the client was told and used: 421");
                    self.shared.metrics.backend_error("capabilities");
                    self.backend_quit();
                    let _ = self.flush_backend().await;
                    self.backend_lost = true;
                    self.fail_opening(
                        op.id,
                        "421 4.3.0 Error: the mail server changed its capabilities, try again",
                    );
                    return None;
                }
                self.chunking = now.iter().any(|k| k == "CHUNKING");
            } else if reply.code != 250 {
                // The MTA refused the greeting: that is the answer.
                debug!(client = %self.peer, code = reply.code, "the MTA refused the replayed HELO/EHLO");
                self.reply_for(op.id, reply);
                return None;
            } else {
                self.chunking = false;
            }
        }
        let now = Instant::now();
        self.to_backend.extend_from_slice(&op.line);
        self.owed.push_back((Owed::Client(op.id), now));
        self.last_mta_write = now;
        if !self.flush_backend().await {
            self.on_backend_lost(None);
        }
        None
    }

    /// Sends the client's HELO/EHLO line and reads the MTA's reply.
    async fn replay_hello(&mut self, line: &[u8]) -> Result<Reply, crate::backend::BackendError> {
        let (write, read) = (
            self.shared.backend.write_timeout,
            self.shared.backend.reply_timeout,
        );
        let Some(b) = self.backend.as_mut() else {
            return Err(crate::backend::BackendError::Closed);
        };
        b.send(line, write).await?;
        tokio::time::timeout(read, b.read_reply())
            .await
            .map_err(|_| crate::backend::BackendError::Timeout(read))?
    }

    /// The opening command's answer is `text` (a 4xx), and the session
    /// ends after it.
    fn fail_opening(&mut self, id: u64, text: &str) {
        let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(421);
        self.reply_for(id, Reply::local(code, text.get(4..).unwrap_or("")));
        self.close_opening(id, Outcome::BackendError);
    }

    fn close_opening(&mut self, id: u64, outcome: Outcome) {
        if let Some(p) = self.pending.iter_mut().find(|p| p.id == id) {
            p.close = true;
        }
        self.close_after_flush = Some(Close(outcome));
    }

    /// Waits for a pacing slot while reading ahead from the client (a
    /// client that leaves meanwhile ends the session: the MTA never hears
    /// of it; one that shuts its sending side after a pipelined QUIT
    /// waits for its replies, and gets them). `Ok(None)`: no slot in time.
    async fn wait_slot(&mut self) -> Result<Option<Slot>, Outcome> {
        let shared = self.shared;
        let acquire = connect::slot(shared);
        tokio::pin!(acquire);
        loop {
            // Never past a STARTTLS: those bytes belong to the handshake.
            let can_read =
                !self.client_eof && self.may_read_ahead() && self.reader.len() < READ_AHEAD;
            tokio::select! {
                s = &mut acquire => return Ok(s),
                r = self.client.read_buf(self.reader.spare()), if can_read => match r {
                    Ok(0) if self.reader.ends_with_quit() => self.client_eof = true,
                    Ok(0) | Err(_) => return Err(Outcome::ClientClosed),
                    Ok(_) => self.last_activity = Instant::now(),
                },
                _ = shared.shutdown.closing() => return Err(Outcome::Shutdown),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn mail_parameters_name_what_they_rely_on() {
        assert_eq!(
            needs(b"MAIL FROM:<a@b> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n", false),
            vec!["SIZE", "8BITMIME", "SMTPUTF8"]
        );
        assert_eq!(needs(b"MAIL FROM:<a@b>\r\n", true), vec!["PIPELINING"]);
        assert_eq!(needs(b"AUTH PLAIN\r\n", false), vec!["AUTH"]);
        assert_eq!(needs(b"VRFY x\r\n", false), Vec::<&str>::new());
        assert_eq!(
            needs(b"MAIL FROM:<a@b> RET=HDRS ENVID=x\r\n", false),
            vec!["DSN", "DSN"]
        );
    }

    #[test]
    fn only_a_used_capability_that_is_gone_matters() {
        let told = s(&["PIPELINING", "SIZE 10240000", "8BITMIME", "CHUNKING"]);
        let now = s(&["PIPELINING", "SIZE 5000", "CHUNKING"]);
        // SIZE changed its value: still offered.
        assert!(missing(&told, &now, &["SIZE"]).is_empty());
        assert_eq!(missing(&told, &now, &["8BITMIME"]), vec!["8BITMIME"]);
        // Not used: no matter.
        assert!(missing(&told, &now, &[]).is_empty());
        // Never told: the MTA's own answer decides.
        assert!(missing(&told, &now, &["SMTPUTF8"]).is_empty());
    }
}
