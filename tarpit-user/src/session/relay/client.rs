//! The client's side of the relay: what the strict reader found, turned
//! into commands for the MTA, replies of the agent's own, or the end of a
//! message.
use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, info};

use super::{BACKEND_LOST, Close, Kind, Owed, Pending, SHUTTING_DOWN, Session};
use crate::metrics::Outcome;
use crate::policy::protocol::Test;
use crate::policy::{Delay, Step};
use crate::smtp::{Command, Expect, Item};

impl Session<'_> {
    /// The end of a message: its hold runs before `end` (the final dot, or
    /// the last BDAT) is sent to the MTA, so a message is never queued for
    /// a client that did not wait for its verdict.
    pub(super) fn end_of_data(&mut self, end: &'static [u8]) {
        if self.backend_lost {
            self.push_local(BACKEND_LOST, Kind::Local, true);
            self.close_after_flush = Some(Close(Outcome::BackendError));
            return;
        }
        let d = self.step(Step::DataEnd);
        // Charged now: the client waits this long before the MTA even
        // hears of the end.
        let hold = self.settle(d, 0);
        let id = self.alloc_id();
        self.pending.push_back(Pending {
            precharged: true,
            deferred: Some(Bytes::from_static(end)),
            ..Pending::new(id, Kind::DataEnd, hold)
        });
    }

    /// The hold of a command's reply, as the policy says.
    pub(super) fn step(&mut self, step: Step<'_>) -> Option<Delay> {
        self.command_policy(step).hold
    }

    /// Consumes what the client sent, as far as the replies it waits for
    /// allow.
    pub(super) fn process_client(&mut self) {
        loop {
            if self.close_after_flush.is_some()
                || self.opening()
                || self.pending.iter().any(|p| p.kind.is_barrier())
            {
                return;
            }
            let was = self.reader.expecting();
            let Some(item) = self.reader.next(&mut self.to_backend) else {
                return;
            };
            match item {
                Item::Command(cmd, canonical) => {
                    if self.pipelined_early() && self.tripped(Test::Pipelining) {
                        return;
                    }
                    if self.non_smtp(&cmd, &canonical) && self.tripped(Test::NonSmtp) {
                        return;
                    }
                    self.command(cmd, canonical)
                }
                Item::AuthResponse(line) => self.push_command(Kind::Auth, &line, None),
                Item::BadLine(_) | Item::TooLong if was == Expect::AuthResponse => {
                    // The MTA waits for a SASL response: cancel the
                    // exchange; its reply (501) is the client's answer.
                    self.push_command(Kind::Auth, b"*\r\n", None);
                }
                Item::BadLine(fault) => {
                    self.shared.metrics.protocol_refused("bare_line_ending");
                    if self.tripped(Test::BareNewline) {
                        return;
                    }
                    debug!(client = %self.peer, fault = fault.as_str(), "command line refused");
                    let text = format!(
                        "500 5.5.2 Error: {} in a command line: lines end with CRLF",
                        fault.as_str()
                    );
                    self.push_local(&text, Kind::Local, false);
                }
                Item::TooLong => {
                    self.shared.metrics.limit_refused("line");
                    self.push_local("500 5.5.2 Error: line too long", Kind::Local, false);
                }
                Item::BodyEnd => self.end_of_data(b".\r\n"),
                Item::BodyRefused(fault) => {
                    self.shared.metrics.protocol_refused("bare_line_ending");
                    info!(client = %self.peer, fault = fault.as_str(), "message refused: bare line ending in the body");
                    self.abandon_backend();
                    let text = format!(
                        "554 5.6.0 Message refused: {} in the message, lines end with CRLF",
                        fault.as_str()
                    );
                    self.push_local(&text, Kind::Local, true);
                    self.close_after_flush = Some(Close(Outcome::Protocol));
                }
                Item::ChunkEnd => {
                    if std::mem::take(&mut self.last_chunk) {
                        self.end_of_data(b"BDAT 0 LAST\r\n");
                    } else if self.backend_lost {
                        self.push_local(BACKEND_LOST, Kind::Local, true);
                        self.close_after_flush = Some(Close(Outcome::BackendError));
                    }
                }
            }
        }
    }

    /// One command line, read strictly and forwarded in `canonical` form.
    pub(super) fn command(&mut self, cmd: Command, canonical: Bytes) {
        if self.shared.shutdown.is_draining()
            && !matches!(
                cmd,
                Command::Rcpt(_) | Command::Data | Command::Bdat(_) | Command::Quit
            )
        {
            // Stopping: the transaction in progress may finish, no new one
            // starts.
            self.push_local(SHUTTING_DOWN, Kind::Local, true);
            self.close_after_flush = Some(Close(Outcome::Shutdown));
            self.backend_quit();
            return;
        }
        if self.backend.is_none() && self.lazy_command(&cmd, &canonical) {
            return;
        }
        match cmd {
            Command::Helo(name) => {
                self.shared.metrics.helo(&name);
                let d = self.step(Step::Helo(&name));
                self.forget_told();
                self.push_command(Kind::Helo, &canonical, d);
            }
            Command::Ehlo(name) => {
                self.shared.metrics.helo(&name);
                let d = self.step(Step::Helo(&name));
                self.forget_told();
                self.push_command(Kind::Ehlo, &canonical, d);
            }
            Command::Mail(sender) => {
                let d = self.step(Step::Mail(&sender));
                self.push_command(Kind::Other, &canonical, d);
                self.sender = sender;
            }
            Command::Rcpt(rcpt) => {
                self.shared.metrics.rcpt();
                match self.rcpt(&rcpt) {
                    (d, Some(text)) => self.push_local_held(&text, d),
                    (d, None) => self.push_command(Kind::Rcpt, &canonical, d),
                }
            }
            Command::Data => {
                let d = self.step(Step::Data);
                self.push_command(Kind::Data, &canonical, d);
            }
            Command::Bdat(_) if !self.chunking && self.told_but_gone("CHUNKING") => {}
            Command::Bdat(_) if !self.chunking => {
                // The MTA did not offer it: nothing is forwarded, and what
                // follows is read as commands, by the agent and the MTA alike.
                self.shared
                    .metrics
                    .protocol_refused("bdat_without_chunking");
                self.push_local("502 5.5.1 Error: BDAT without CHUNKING", Kind::Local, false);
            }
            Command::Bdat(Some((size, false))) => {
                self.push_command(Kind::Other, &canonical, None);
                if size > 0 {
                    self.reader.expect_chunk(size);
                }
            }
            Command::Bdat(Some((0, true))) => self.end_of_data(b"BDAT 0 LAST\r\n"),
            Command::Bdat(Some((size, true))) => {
                // The data goes to the MTA as it comes, as a chunk that is
                // not the last; the empty last chunk follows after the hold.
                if !self.backend_lost {
                    let now = Instant::now();
                    self.to_backend
                        .extend_from_slice(format!("BDAT {size}\r\n").as_bytes());
                    self.owed.push_back((Owed::Chunk, now));
                    self.last_mta_write = now;
                }
                self.last_chunk = true;
                self.reader.expect_chunk(size);
            }
            Command::Bdat(None) => {
                self.push_local("501 5.5.4 Syntax: BDAT size [LAST]", Kind::Local, false);
            }
            Command::Rset => {
                let d = self.step(Step::Rset);
                self.push_command(Kind::Other, &canonical, d);
            }
            Command::Quit => self.push_command(Kind::Quit, &canonical, None),
            Command::Starttls(args) => match (&self.shared.tls, self.client.is_tls(), args) {
                (_, true, _) => {
                    self.push_local("554 5.5.1 Error: TLS already active", Kind::Local, false)
                }
                (Some(_), false, true) => {
                    self.push_local("501 5.5.4 Syntax: STARTTLS", Kind::Local, false)
                }
                (Some(_), false, false) => {
                    self.push_local("220 2.0.0 Ready to start TLS", Kind::StarttlsLocal, false)
                }
                (None, false, _) => self.push_command(Kind::StarttlsRelayed, &canonical, None),
            },
            Command::Auth(_) if self.auth_needs_tls() => {
                // No password crosses port 25 in clear (Postfix's
                // smtpd_tls_auth_only): refused here, never forwarded.
                self.shared.metrics.protocol_refused("auth_in_clear");
                self.push_local(
                    "538 5.7.11 Encryption required for requested authentication mechanism",
                    Kind::Local,
                    false,
                );
            }
            Command::Auth(_) => self.push_command(Kind::Auth, &canonical, None),
            Command::ProxyOverride => {
                self.shared.metrics.protocol_refused("xclient");
                self.push_local(
                    "550 5.7.0 Error: insufficient authorization",
                    Kind::Local,
                    false,
                );
            }
            Command::Noop | Command::Other => {
                let d = self.step(Step::Other);
                self.push_command(Kind::Other, &canonical, d);
            }
        }
    }

    /// AUTH is refused in clear: the agent terminates TLS and the client
    /// has not started it.
    pub(super) fn auth_needs_tls(&self) -> bool {
        self.shared.tls.is_some() && self.shared.tls_auth_only && !self.client.is_tls()
    }
}
