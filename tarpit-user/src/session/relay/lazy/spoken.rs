//! The agent's answers while no MTA is connected, the limits Postfix
//! would apply to them, and the command that opens the late connection.
use bytes::Bytes;
use tracing::info;

use super::super::{Close, Kind, Pending, Session};
use super::Opening;
use crate::backend::probe::Learned;
use crate::metrics::Outcome;
use crate::policy::{Delay, Step};
use crate::smtp::{Command, Reply};
use std::sync::Arc;

/// Error replies before the agent hangs up, as Postfix's
/// `smtpd_hard_error_limit` (20): the MTA never sees these errors, so the
/// agent keeps its count.
pub(super) const HARD_ERROR_LIMIT: u32 = 20;

/// NOOP, RSET, HELP, HELO and EHLO before the agent hangs up, as Postfix's
/// `smtpd_junk_command_limit` (100): without it a bot could keep a session
/// (and the agent's memory of it) alive forever without the MTA's limits.
pub(super) const JUNK_COMMAND_LIMIT: u32 = 100;

impl Session<'_> {
    /// Handles `cmd` while no MTA is connected. `false`: the relay's own
    /// handling applies (the agent's local answers: XCLIENT, AUTH in
    /// clear, its own STARTTLS, BDAT without CHUNKING or malformed).
    pub(in crate::session::relay) fn lazy_command(
        &mut self,
        cmd: &Command,
        canonical: &Bytes,
    ) -> bool {
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
}
