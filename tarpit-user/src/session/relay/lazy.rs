//! The agent speaks for the MTA until a transaction starts
//! (`backend.connect = "at-transaction"`).
//!
//! The banner, HELO/EHLO (from what the probe learned, `XCLIENT` and
//! `XFORWARD` hidden, `STARTTLS` and `AUTH` adjusted as for a relayed
//! reply), NOOP, RSET, HELP and QUIT are answered here; commands that need
//! a transaction's state (RCPT, DATA, BDAT) are refused as the MTA would
//! refuse them without MAIL. The first command that needs the MTA (MAIL,
//! AUTH, VRFY, EXPN, ETRN, STARTTLS without a certificate) opens the
//! connection, once its hold has run (a blacklisted client's MAIL hold
//! included: held bots never occupy an MTA slot): the PROXY header or
//! XCLIENT goes first as always, then the client's own HELO/EHLO line is
//! replayed, so the MTA sees exactly what it would have seen. The MTA's
//! reply to the replayed EHLO is checked against what the client was told;
//! a capability the opening command relies on that is gone is a 421 and a
//! log line, never a silent mismatch. A refusing banner (421, 554) is the
//! answer to the opening command.
//!
//! Everything the client sends in this phase is read by the same strict
//! reader as in the relay; nothing of it reaches the MTA but the
//! canonical HELO/EHLO line and the opening command.
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Close, Kind, Owed, Pending, READ_AHEAD, Session};
use crate::backend::pace::Slot;
use crate::backend::probe::Learned;
use crate::metrics::Outcome;
use crate::policy::{Delay, Step, release_at};
use crate::session::connect;
use crate::smtp::{Command, Reply};
use tokio::io::AsyncReadExt;

/// The agent-spoken phase of one session.
pub(in crate::session) struct Lazy {
    learned: Arc<Learned>,
    /// The client's HELO or EHLO line, canonical, to replay; `true` for EHLO.
    hello: Option<(Bytes, bool)>,
    /// The EHLO keywords the client was told, upper-cased.
    told: Vec<String>,
    /// The command waiting for the late connection.
    opening: Option<Opening>,
    /// The MTA was connected in this session.
    reached: bool,
    /// Error replies the agent gave in this phase ([`HARD_ERROR_LIMIT`]).
    errors: u32,
    /// Commands that go nowhere ([`JUNK_COMMAND_LIMIT`]).
    junk: u32,
}

/// Error replies before the agent hangs up, as Postfix's
/// `smtpd_hard_error_limit` (20): the MTA never sees these errors, so the
/// agent keeps its count.
const HARD_ERROR_LIMIT: u32 = 20;

/// NOOP, RSET, HELP, HELO and EHLO before the agent hangs up, as Postfix's
/// `smtpd_junk_command_limit` (100): without it a bot could keep a session
/// (and the agent's memory of it) alive forever without the MTA's limits.
const JUNK_COMMAND_LIMIT: u32 = 100;

/// A command that opens the MTA connection.
struct Opening {
    /// Its pending reply.
    id: u64,
    /// The canonical line, sent once the client's HELO/EHLO is replayed.
    line: Bytes,
}

impl Lazy {
    pub(super) fn new(learned: Arc<Learned>) -> Lazy {
        Lazy {
            learned,
            hello: None,
            told: Vec::new(),
            opening: None,
            reached: false,
            errors: 0,
            junk: 0,
        }
    }
}

/// The name of an EHLO keyword (`SIZE 1000` -> `SIZE`).
fn keyword_name(k: &str) -> &str {
    k.split_ascii_whitespace().next().unwrap_or("")
}

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
    /// A command that opens the MTA connection waits for it.
    pub(super) fn opening(&self) -> bool {
        self.lazy.as_ref().is_some_and(|l| l.opening.is_some())
    }

    /// The client was told `keyword` by the agent (in the spoken phase)
    /// and the MTA connected since does not offer it: using it now is a
    /// 421 and a log line, never a silent mismatch.
    pub(super) fn told_but_gone(&mut self, keyword: &str) -> bool {
        let Some(l) = self.lazy.as_ref().filter(|l| l.reached) else {
            return false;
        };
        if !l.told.iter().any(|k| keyword_name(k) == keyword) {
            return false;
        }
        warn!(client = %self.peer, missing = keyword,
            "the MTA no longer offers what the client was told and used: 421");
        self.shared.metrics.backend_error("capabilities");
        self.push_local(
            "421 4.3.0 Error: the mail server changed its capabilities, try again",
            Kind::Local,
            true,
        );
        self.close_after_flush = Some(Close(Outcome::BackendError));
        self.backend_quit();
        true
    }

    /// The client's HELO/EHLO went to the MTA: what it is told from now on
    /// is the MTA's own reply, not the agent's.
    pub(super) fn forget_told(&mut self) {
        if let Some(l) = self.lazy.as_mut() {
            l.told.clear();
        }
    }

    /// Whether this session ever reached the MTA.
    pub(in crate::session) fn reached_mta(&self) -> bool {
        self.lazy.as_ref().is_none_or(|l| l.reached)
    }

    /// `STARTTLS` in an EHLO reply to this client: `Some(true)` the agent
    /// offers it, `Some(false)` nobody does (TLS is on), `None` as the MTA
    /// says.
    pub(super) fn ehlo_starttls(&self) -> Option<bool> {
        match (&self.shared.tls, self.client.is_tls()) {
            (Some(_), tls) => Some(!tls),
            (None, true) => Some(false),
            (None, false) => None,
        }
    }

    /// After the agent's own STARTTLS: the MTA (if connected) is gone and
    /// the agent speaks for it again (RFC 3207: nothing learned before TLS
    /// is kept; the client must say EHLO again).
    pub(super) fn restart_lazy(&mut self) {
        self.backend = None;
        self.backend_lost = false;
        self.owed.clear();
        self.to_backend.clear();
        self.chunking = false;
        self.pipelining = false;
        if let Some(l) = self.lazy.as_mut() {
            l.hello = None;
            l.told.clear();
            l.opening = None;
        }
    }

    /// When the late connection is due: the opening command is the next
    /// reply owed to the client, and its own hold has run (counted as
    /// its reply's would be, so the hold is not paid twice).
    pub(super) fn connect_time(&self) -> Option<Instant> {
        let id = self.lazy.as_ref()?.opening.as_ref()?.id;
        let p = self.pending.front().filter(|p| p.id == id)?;
        Some(release_at(
            p.arrival,
            self.last_release,
            p.arrival,
            p.command_delay,
        ))
    }

    /// Handles `cmd` while no MTA is connected. `false`: the relay's own
    /// handling applies (the agent's local answers: XCLIENT, AUTH in
    /// clear, its own STARTTLS, BDAT without CHUNKING or malformed).
    pub(super) fn lazy_command(&mut self, cmd: &Command, canonical: &Bytes) -> bool {
        let Some(lazy) = self.lazy.as_ref() else {
            return false;
        };
        if self.backend.is_some() {
            return false;
        }
        let has_hello = lazy.hello.is_some();
        let learned = lazy.learned.clone();
        let relay_answers = match cmd {
            Command::Auth(_) => self.auth_needs_tls(),
            Command::Starttls(_) => self.shared.tls.is_some() || self.client.is_tls(),
            Command::Bdat(Some(_)) => !self.chunking,
            Command::Bdat(None) | Command::ProxyOverride => true,
            _ => false,
        };
        if relay_answers {
            return false;
        }
        let queued = self.pending.len();
        self.spoken_command(cmd, canonical, has_hello, &learned);
        self.count_limits(cmd, queued);
        true
    }

    /// Hangs up on a client past the error or junk limit (421, as Postfix).
    fn count_limits(&mut self, cmd: &Command, queued: usize) {
        let junk = matches!(
            cmd,
            Command::Noop | Command::Rset | Command::Helo(_) | Command::Ehlo(_)
        ) || (*cmd == Command::Other
            && self.pending.back().is_some_and(|p| p.kind == Kind::Local));
        let error = self.pending.len() > queued
            && self
                .pending
                .back()
                .and_then(|p| p.reply.as_ref())
                .is_some_and(|r| r.code >= 400);
        let Some(l) = self.lazy.as_mut() else {
            return;
        };
        l.junk += u32::from(junk);
        l.errors += u32::from(error);
        let limit = if l.errors >= HARD_ERROR_LIMIT {
            "errors"
        } else if l.junk >= JUNK_COMMAND_LIMIT {
            "junk"
        } else {
            return;
        };
        self.shared.metrics.limit_refused(limit);
        info!(client = %self.peer, limit, "too many commands that go nowhere: 421");
        self.push_local("421 4.7.0 Error: too many errors", Kind::Local, true);
        self.close_after_flush = Some(Close(Outcome::Limit));
    }

    /// [`Session::lazy_command`]'s answers.
    fn spoken_command(
        &mut self,
        cmd: &Command,
        canonical: &Bytes,
        has_hello: bool,
        learned: &Arc<Learned>,
    ) {
        match cmd {
            Command::Ehlo(name) => {
                self.shared.metrics.helo(name);
                let d = self.step(Step::Helo(name));
                let reply = learned
                    .ehlo
                    .rewrite_ehlo(self.ehlo_starttls(), self.auth_needs_tls());
                let told = reply.ehlo_keywords();
                self.chunking = told.iter().any(|k| k == "CHUNKING");
                self.pipelining = told.iter().any(|k| k == "PIPELINING");
                if let Some(l) = self.lazy.as_mut() {
                    l.told = told;
                    l.hello = Some((canonical.clone(), true));
                }
                // Kind::Ehlo: a command pipelined behind it is seen
                // (`[protocol] pipelining`).
                self.push_reply(Kind::Ehlo, reply, d, false);
            }
            Command::Helo(name) => {
                self.shared.metrics.helo(name);
                let d = self.step(Step::Helo(name));
                let host = learned.host_name();
                self.chunking = false;
                self.pipelining = false;
                if let Some(l) = self.lazy.as_mut() {
                    l.told.clear();
                    l.hello = Some((canonical.clone(), false));
                }
                self.push_reply(Kind::Local, Reply::local(250, &host), d, false);
            }
            Command::Noop => {
                let d = self.step(Step::Other);
                self.push_reply(Kind::Local, Reply::local(250, "2.0.0 Ok"), d, false);
            }
            Command::Rset => {
                let d = self.step(Step::Rset);
                self.push_reply(Kind::Local, Reply::local(250, "2.0.0 Ok"), d, false);
            }
            Command::Quit => {
                self.push_reply(Kind::Quit, Reply::local(221, "2.0.0 Bye"), None, false);
            }
            Command::Mail(_) | Command::Auth(_) if !has_hello => {
                self.push_local("503 5.5.1 Error: send HELO/EHLO first", Kind::Local, false);
            }
            Command::Mail(sender) => {
                let d = self.step(Step::Mail(sender));
                self.sender = sender.clone();
                self.open_late(Kind::Other, canonical, d);
            }
            Command::Auth(_) => self.open_late(Kind::Auth, canonical, None),
            Command::Starttls(_) => self.open_late(Kind::StarttlsRelayed, canonical, None),
            Command::Rcpt(_) => {
                self.push_local("503 5.5.1 Error: need MAIL command", Kind::Local, false);
            }
            Command::Data => {
                self.push_local("503 5.5.1 Error: need RCPT command", Kind::Local, false);
            }
            Command::Bdat(Some((size, _))) => {
                // The chunk is read and dropped (nothing is connected to
                // take it), so its bytes are never taken for commands.
                if *size > 0 {
                    self.reader.expect_chunk(*size);
                }
                self.push_local("503 5.5.1 Error: need RCPT command", Kind::Local, false);
            }
            // The relay answers these (`lazy_command`).
            Command::Bdat(None) | Command::ProxyOverride => {}
            Command::Other => {
                let verb = canonical
                    .split(|&b| b == b' ' || b == b'\r')
                    .next()
                    .unwrap_or(b"");
                match verb {
                    b"VRFY" | b"EXPN" | b"ETRN" => {
                        let d = self.step(Step::Other);
                        self.open_late(Kind::Other, canonical, d);
                    }
                    b"HELP" => {
                        let d = self.step(Step::Other);
                        let r = Reply::local(214, "2.0.0 https://www.rfc-editor.org/rfc/rfc5321");
                        self.push_reply(Kind::Local, r, d, false);
                    }
                    _ => {
                        let d = self.step(Step::Other);
                        let r = Reply::local(502, "5.5.2 Error: command not recognized");
                        self.push_reply(Kind::Local, r, d, false);
                    }
                }
            }
        }
    }

    /// Queues `line` as the command that opens the MTA connection.
    fn open_late(&mut self, kind: Kind, line: &Bytes, command_delay: Option<Delay>) {
        let id = self.alloc_id();
        self.pending
            .push_back(Pending::new(id, kind, command_delay));
        if let Some(l) = self.lazy.as_mut() {
            l.opening = Some(Opening {
                id,
                line: line.clone(),
            });
        }
    }

    /// Opens the late connection when it is due: a pacing slot (watching
    /// the client meanwhile), the MTA's banner, the replayed HELO/EHLO and
    /// its check, then the opening command. `Some` ends the session.
    pub(super) async fn connect_due(&mut self) -> Option<Outcome> {
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
                self.fail_opening(op.id, super::super::NO_SERVICE.trim_end());
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
                    self.fail_opening(op.id, super::super::NO_SERVICE.trim_end());
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
    /// of it). `Ok(None)`: no slot in time.
    async fn wait_slot(&mut self) -> Result<Option<Slot>, Outcome> {
        let shared = self.shared;
        let acquire = connect::slot(shared);
        tokio::pin!(acquire);
        loop {
            // Never past a STARTTLS: those bytes belong to the handshake.
            let can_read = self.may_read_ahead() && self.reader.len() < READ_AHEAD;
            tokio::select! {
                s = &mut acquire => return Ok(s),
                r = self.client.read_buf(self.reader.spare()), if can_read => match r {
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
