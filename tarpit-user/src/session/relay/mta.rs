//! The MTA's side of the relay: writing to it, matching its replies to
//! what it owes, losing it, and starting it afresh after the agent's own
//! STARTTLS.
use bytes::BytesMut;
use tokio::time::{Instant, timeout};
use tracing::{debug, info, warn};

use super::{BACKEND_LOST, Close, Expect, Kind, Owed, Session, passthrough};
use crate::backend::BackendError;
use crate::metrics::Outcome;
use crate::policy::Delay;
use crate::session::connect;
use crate::smtp::Reply;
use crate::tls::ClientStream;

impl Session<'_> {
    /// Tells the MTA goodbye when the agent ends a session itself (never
    /// inside a body: there it would be text, and the missing end of data
    /// is what makes the MTA discard the message).
    pub(super) fn backend_quit(&mut self) {
        let in_body = matches!(self.reader.expecting(), Expect::Body | Expect::Chunk)
            || self.pending.iter().any(|p| p.deferred.is_some());
        if !self.backend_lost && !in_body {
            self.to_backend.extend_from_slice(b"QUIT\r\n");
        }
    }

    /// Never write to the MTA again: it must not see the end of a message
    /// the agent refused.
    pub(super) fn abandon_backend(&mut self) {
        self.backend_lost = true;
        self.to_backend.clear();
        self.owed.clear();
        for p in &mut self.pending {
            p.deferred = None;
        }
    }

    /// The MTA went away or failed. Replies it already gave still go out;
    /// the first command without one gets a 4xx and the session ends. A
    /// DATA or BDAT body in flight is read to its end first, so the client
    /// is listening when the 4xx comes.
    pub(super) fn on_backend_lost(&mut self, err: Option<BackendError>) {
        if self.backend_lost {
            return;
        }
        self.backend_lost = true;
        let err = err.unwrap_or(BackendError::Closed);
        self.shared.metrics.backend_error(err.kind());
        info!(client = %self.peer, "{err}");
        self.to_backend.clear();
        self.owed.clear();
        if let Some(i) = self.pending.iter().position(|p| p.reply.is_none()) {
            self.pending.truncate(i);
        }
        match self.reader.expecting() {
            Expect::Body | Expect::Chunk => {} // answered at the end of the body
            _ => {
                self.push_local(BACKEND_LOST, Kind::Local, true);
                self.close_after_flush = Some(Close(Outcome::BackendError));
            }
        }
    }

    /// The agent's own STARTTLS: the handshake, then a fresh session with
    /// the MTA (RFC 3207 4.2: nothing learned before TLS is kept; the
    /// MTA, which never saw the STARTTLS, would keep the HELO name and any
    /// transaction, so it gets a new connection and the client's next EHLO).
    pub(super) async fn start_tls(&mut self) -> Option<Outcome> {
        let acceptor = self.shared.tls.clone()?;
        if !self.reader.is_empty() {
            // Plaintext sent after STARTTLS would otherwise be taken as
            // commands inside TLS (CVE-2011-0411).
            warn!(client = %self.peer, bytes = self.reader.len(), "dropped bytes pipelined after STARTTLS");
            self.reader.clear();
        }
        let plain = std::mem::replace(&mut self.client, ClientStream::Closed);
        match timeout(self.shared.limits.idle, plain.upgrade(&acceptor)).await {
            Ok(Ok(tls)) => {
                self.client = tls;
                self.last_activity = Instant::now();
            }
            _ => {
                debug!(client = %self.peer, "TLS handshake failed");
                self.backend_quit();
                let _ = self.flush_backend().await;
                return Some(Outcome::ClientError);
            }
        }
        self.backend_quit();
        let _ = self.flush_backend().await;
        if self.lazy.is_some() {
            // The agent speaks for the MTA again until the next
            // transaction, which connects it afresh.
            self.restart_lazy();
            return None;
        }
        match Box::pin(connect::open(self.shared, self.peer, self.local)).await {
            Ok((backend, banner)) => {
                self.backend = Some(backend);
                self.backend_lost = false;
                self.owed.clear();
                self.chunking = false;
                self.pipelining = false;
                self.last_mta_write = Instant::now();
                if banner.code != 220 {
                    // The MTA refuses the new session: the client hears why.
                    self.push_local_reply(banner, true);
                    self.close_after_flush = Some(Close(Outcome::BackendClosed));
                }
            }
            Err(e) => {
                warn!(client = %self.peer, "after STARTTLS: {e}");
                self.shared.metrics.backend_error(e.kind());
                self.backend_lost = true;
                self.push_local(BACKEND_LOST, Kind::Local, true);
                self.close_after_flush = Some(Close(Outcome::BackendError));
            }
        }
        None
    }

    pub(super) async fn go_opaque(&mut self) -> Outcome {
        info!(client = %self.peer, "STARTTLS relayed to the MTA: the rest of the session is opaque");
        self.reader.clear();
        let Some(backend) = self.backend.as_mut() else {
            return Outcome::BackendError;
        };
        let to_client = backend.take_buffered();
        passthrough(self.shared, &mut self.client, backend, to_client).await
    }

    pub(super) async fn flush_backend(&mut self) -> bool {
        let Some(backend) = self.backend.as_mut().filter(|_| !self.backend_lost) else {
            // No MTA (lost, or not connected yet): nothing goes anywhere.
            self.to_backend.clear();
            return true;
        };
        if self.to_backend.is_empty() {
            return true;
        }
        let data = self.to_backend.split().freeze();
        if self.to_backend.capacity() > 64 * 1024 {
            self.to_backend = BytesMut::new();
        }
        match backend.send(&data, self.shared.backend.write_timeout).await {
            Ok(()) => true,
            Err(e) => {
                warn!(client = %self.peer, "writing to the MTA: {e}");
                false
            }
        }
    }

    /// Matches the MTA's replies to what it owes, in order.
    pub(super) fn process_backend(&mut self) {
        loop {
            let Some(backend) = self.backend.as_mut() else {
                return;
            };
            let reply = match backend.next_reply() {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    warn!(client = %self.peer, "{e}");
                    self.on_backend_lost(Some(e));
                    return;
                }
            };
            let Some((owed, _)) = self.owed.pop_front() else {
                if reply.code == 421 {
                    // The MTA ends the session (its own timeout, shutdown).
                    self.mta_ended(reply);
                } else {
                    debug!(client = %self.peer, code = reply.code, "reply without a command, dropped");
                }
                continue;
            };
            match owed {
                Owed::Keepalive => {
                    if reply.code == 421 {
                        self.mta_ended(reply);
                    }
                }
                Owed::Chunk => {
                    if !reply.is_positive() {
                        self.chunk_verdict = Some(reply);
                    }
                }
                Owed::Client(id) => self.reply_for(id, reply),
            }
        }
    }

    /// The MTA said 421 on its own: replies in hand still go out, then
    /// this one, and the session ends.
    pub(super) fn mta_ended(&mut self, reply: Reply) {
        if let Some(i) = self.pending.iter().position(|p| p.reply.is_none()) {
            self.pending.truncate(i);
        }
        self.owed.clear();
        self.push_local_reply(reply, true);
        self.close_after_flush = Some(Close(Outcome::BackendClosed));
        self.backend_lost = true;
    }

    /// The MTA's reply to pending `id`: rewritten where it must be, and
    /// given its final hold.
    pub(super) fn reply_for(&mut self, id: u64, reply: Reply) {
        let now = Instant::now();
        let Some(i) = self.pending.iter().position(|p| p.id == id) else {
            // Cut by a graceful stop: the client gets a 421 instead.
            return;
        };
        let kind = self.pending[i].kind;
        let reply = match kind {
            Kind::Ehlo => {
                self.chunking =
                    reply.code == 250 && reply.ehlo_keywords().iter().any(|k| k == "CHUNKING");
                let r = reply.rewrite_ehlo(self.ehlo_starttls(), self.auth_needs_tls());
                self.pipelining =
                    r.code == 250 && r.ehlo_keywords().iter().any(|k| k == "PIPELINING");
                r
            }
            Kind::Helo => {
                self.chunking = false;
                self.pipelining = false;
                reply
            }
            Kind::DataEnd => self.chunk_verdict.take().unwrap_or(reply),
            _ => reply,
        };
        let draining = self.shared.shutdown.is_draining();
        let p = &self.pending[i];
        let (precharged, command_delay) = (p.precharged, p.command_delay);
        let hold = if precharged {
            // The command's hold ran before the MTA heard the end; only a
            // 5xx delay can add to it.
            Delay::longer(command_delay, self.settle(None, reply.code))
        } else {
            self.settle(command_delay, reply.code)
        }
        .filter(|_| !draining);
        let code = reply.code;
        let p = &mut self.pending[i];
        p.hold = hold;
        p.ready = now;
        p.reply = Some(reply);
        if code == 421 {
            p.close = true;
            self.close_after_flush = Some(Close(Outcome::BackendClosed));
        }
    }
}
