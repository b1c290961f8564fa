//! The relay phase: from the MTA's banner to the end of the session.
//!
//! Everything the client sends is read once, strictly, by the
//! [`ClientReader`]; what reaches the MTA is what the agent saw, in
//! canonical form (commands) or re-encoded (DATA bodies), so no MTA behind
//! it can find a command or an end of data the agent did not.
//!
//! Replies are matched to commands ([`Owed`] is what the MTA still owes, in
//! order), held as the policy says and released in order ([`Pending`]).
//! A reply's hold counts from the later of its command's arrival and the
//! release of the reply before it, so pipelined commands pay what they
//! would pay one by one. The end of data (the final dot, or the last BDAT)
//! reaches the MTA only once its hold has run: a client that leaves during
//! the hold leaves nothing queued. While a reply is held between commands,
//! the MTA's session is kept alive with NOOPs.
//!
//! All waiting happens in one `select!` over the client, the MTA and a
//! timer, with cancel-safe reads, so a held session is a socket, two small
//! buffers and two queues.
mod client;
mod lazy;
mod mta;
mod protocol;
mod replies;

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::time::{Duration, Instant, sleep_until};
use tracing::{debug, info, warn};

use super::{BACKEND_LOST, IDLE, SHUTTING_DOWN, Shared, WRITE_TIMEOUT, passthrough};
use crate::backend::{Backend, BackendError};
use crate::metrics::Outcome;
use crate::policy::{Delay, SessionState, release_at};
use crate::smtp::{ClientReader, Expect, Reply};
use crate::tls::ClientStream;

/// How many bytes the agent reads ahead of a reply the client must see
/// first (DATA's 354, the end of data, AUTH, STARTTLS): enough to notice
/// that the client left, too little to matter.
pub(super) const READ_AHEAD: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Ehlo,
    Helo,
    Data,
    /// The end of a message (DATA's dot, the last BDAT chunk): its reply
    /// is the verdict on the message.
    DataEnd,
    Auth,
    StarttlsRelayed,
    StarttlsLocal,
    Quit,
    /// RCPT: a 550 is an unknown recipient (directory-harvest runs).
    Rcpt,
    Other,
    /// A reply the agent made.
    Local,
}

impl Kind {
    /// The client must see this reply before the agent reads on.
    fn is_barrier(self) -> bool {
        matches!(
            self,
            Kind::Data
                | Kind::DataEnd
                | Kind::Auth
                | Kind::StarttlsRelayed
                | Kind::StarttlsLocal
                | Kind::Quit
        )
    }

    /// While a reply of this kind is outstanding the MTA is not between
    /// commands (it reads a body, a SASL response, a TLS handshake, or
    /// closes): no keepalive NOOP may be sent.
    fn mta_busy(self) -> bool {
        matches!(
            self,
            Kind::Data | Kind::DataEnd | Kind::Auth | Kind::StarttlsRelayed | Kind::Quit
        )
    }
}

/// A reply the client will get, in order.
pub(super) struct Pending {
    id: u64,
    pub(super) kind: Kind,
    arrival: Instant,
    /// The hold decided when the command arrived.
    command_delay: Option<Delay>,
    /// `command_delay` was charged to the budget at arrival (the end of
    /// data, whose hold runs before the MTA hears of it).
    precharged: bool,
    reply: Option<Reply>,
    /// When the reply became known.
    ready: Instant,
    /// The final hold, once the reply is known.
    hold: Option<Delay>,
    /// Close the session once this reply is out.
    close: bool,
    /// Sent to the MTA only when the hold has run (the end of data).
    deferred: Option<Bytes>,
}

impl Pending {
    /// A reply to a command that arrived now, not known yet.
    fn new(id: u64, kind: Kind, command_delay: Option<Delay>) -> Pending {
        let now = Instant::now();
        Pending {
            id,
            kind,
            arrival: now,
            command_delay,
            precharged: false,
            reply: None,
            ready: now,
            hold: None,
            close: false,
            deferred: None,
        }
    }
}

/// A reply the MTA owes, in the order it will come, and since when.
#[derive(Debug, Clone, Copy)]
enum Owed {
    /// The reply to the client's command (pending `id`).
    Client(u64),
    /// The reply to a keepalive NOOP: the agent's own business.
    Keepalive,
    /// The reply to the data of a last BDAT chunk, sent as a non-last
    /// chunk; a failure there is the verdict on the message.
    Chunk,
}

/// Why the relay loop must stop after flushing.
#[derive(Debug, Clone, Copy)]
pub(super) struct Close(pub(super) Outcome);

pub(super) struct Session<'a> {
    pub(super) shared: &'a Shared,
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) state: SessionState,
    pub(super) client: ClientStream,
    pub(super) reader: ClientReader,
    /// The MTA; `None` while the agent speaks for it (`lazy`).
    pub(super) backend: Option<Backend>,
    /// The agent-spoken phase of `backend.connect = "at-transaction"`.
    pub(super) lazy: Option<lazy::Lazy>,
    pub(super) pending: VecDeque<Pending>,
    owed: VecDeque<(Owed, Instant)>,
    next_id: u64,
    /// The later of the last bytes from the client and the last reply to
    /// it: a held reply is not idleness.
    pub(super) last_activity: Instant,
    /// When the last reply was due out: the next hold counts from here.
    last_release: Instant,
    /// When the agent last wrote to the MTA (keepalive).
    last_mta_write: Instant,
    pub(super) to_backend: BytesMut,
    pub(super) backend_lost: bool,
    client_eof: bool,
    pub(super) close_after_flush: Option<Close>,
    /// The current transaction's sender (for greylisting triplets).
    pub(super) sender: String,
    /// The MTA's last EHLO reply offered CHUNKING (BDAT).
    chunking: bool,
    /// The last EHLO reply to the client offered PIPELINING.
    pipelining: bool,
    /// The BDAT chunk being read is the last: its end is the end of data.
    last_chunk: bool,
    /// A failed reply to the data of the last chunk: the message's verdict.
    chunk_verdict: Option<Reply>,
}

/// Reads from the MTA, if there is one (callers guard on that).
async fn fill(backend: &mut Option<Backend>) -> std::io::Result<usize> {
    match backend {
        Some(b) => b.fill().await,
        None => std::future::pending().await,
    }
}

enum Wake {
    Client(std::io::Result<usize>),
    Backend(std::io::Result<usize>),
    Timer,
    /// SIGTERM: stop tarpitting, end the session when its work is done.
    Drain,
    /// The drain time is up: close now.
    Close,
}

impl<'a> Session<'a> {
    pub(super) fn new(
        shared: &'a Shared,
        peer: SocketAddr,
        local: SocketAddr,
        state: SessionState,
        client: ClientStream,
        backend: Option<Backend>,
        learned: Option<std::sync::Arc<crate::backend::probe::Learned>>,
    ) -> Session<'a> {
        let now = Instant::now();
        let lazy = learned.map(lazy::Lazy::new);
        Session {
            shared,
            peer,
            local,
            state,
            client,
            reader: ClientReader::new(shared.limits.line, shared.smtp.bare_line_ending),
            backend,
            lazy,
            pending: VecDeque::new(),
            owed: VecDeque::new(),
            next_id: 0,
            last_activity: now,
            last_release: now,
            last_mta_write: now,
            to_backend: BytesMut::new(),
            backend_lost: false,
            client_eof: false,
            close_after_flush: None,
            sender: String::new(),
            chunking: false,
            pipelining: false,
            last_chunk: false,
            chunk_verdict: None,
        }
    }

    pub(super) async fn relay(&mut self, banner: Reply) -> Outcome {
        let close = banner.code == 421;
        self.push_local_reply(banner, close);
        let shutdown = self.shared.shutdown.clone();
        let (mut drain_seen, mut close_seen) = (false, false);
        loop {
            if let Some(outcome) = self.release_ready().await {
                return outcome;
            }
            if let Some(outcome) = self.connect_due().await {
                return outcome;
            }
            self.send_due(Instant::now());
            self.keepalive(Instant::now());
            if !self.flush_backend().await {
                self.on_backend_lost(None);
            }
            if let Some(Close(outcome)) = self.close_after_flush
                && self.pending.is_empty()
            {
                return outcome;
            }
            if self.client_eof && self.pending.is_empty() {
                return Outcome::ClientClosed;
            }
            let read_client = !self.client_eof
                && self.close_after_flush.is_none()
                && self.may_read_ahead()
                && self.pending.len() < self.shared.limits.pipeline;
            let timer = self.next_deadline();
            let wake = {
                let reader = &mut self.reader;
                let client = &mut self.client;
                let lost = self.backend_lost || self.backend.is_none();
                let backend = &mut self.backend;
                tokio::select! {
                    r = client.read_buf(reader.spare()), if read_client => Wake::Client(r),
                    r = fill(backend), if !lost => Wake::Backend(r),
                    _ = sleep_until(timer) => Wake::Timer,
                    _ = shutdown.draining(), if !drain_seen => Wake::Drain,
                    _ = shutdown.closing(), if drain_seen && !close_seen => Wake::Close,
                }
            };
            match wake {
                Wake::Client(Ok(0)) if self.reader.ends_with_quit() => {
                    // QUIT pipelined, then the sending side shut: the client
                    // waits for its replies (the end of data it sent goes
                    // ahead after its hold, a late MTA connection opens).
                    self.client_eof = true;
                    debug!(client = %self.peer, "client shut its sending side after a pipelined QUIT: answering it");
                }
                Wake::Client(Ok(0)) | Wake::Client(Err(_)) => {
                    self.client_eof = true;
                    if self.pending.iter().any(|p| p.deferred.is_some()) {
                        // Gone during the end-of-data hold: the MTA never
                        // gets the end, so nothing is queued (and a real
                        // sender that timed out sends once, not twice).
                        self.shared.metrics.abandoned_messages_total.inc();
                        info!(client = %self.peer, "client left during the end-of-data hold: message not passed to the MTA");
                        return Outcome::ClientClosed;
                    }
                    if self.pending.is_empty() || self.backend_lost || self.opening() {
                        // (Gone before its late MTA connection: the MTA
                        // never hears of it.)
                        return Outcome::ClientClosed;
                    }
                }
                Wake::Client(Ok(_)) => {
                    self.last_activity = Instant::now();
                    self.process_client();
                    if !self.flush_backend().await {
                        self.on_backend_lost(None);
                    }
                }
                Wake::Backend(Ok(0)) => self.on_backend_lost(None),
                Wake::Backend(Err(e)) => self.on_backend_lost(Some(e.into())),
                Wake::Backend(Ok(_)) => self.process_backend(),
                Wake::Timer => self.on_timer(),
                Wake::Drain => {
                    drain_seen = true;
                    self.on_stop(false);
                }
                Wake::Close => {
                    close_seen = true;
                    self.on_stop(true);
                }
            }
            if drain_seen && !close_seen {
                // A transaction finished while stopping: no new one.
                self.on_stop(false);
            }
            if self.client_eof && self.pending.is_empty() {
                return Outcome::ClientClosed;
            }
        }
    }

    /// Whether to read from the client now. Past a reply it must see first
    /// the agent reads only a little ahead (enough to notice a client that
    /// leaves during the end-of-data hold), and nothing past a STARTTLS:
    /// those bytes belong to the TLS handshake, never to the clear session.
    fn may_read_ahead(&self) -> bool {
        let mut barrier = false;
        for p in &self.pending {
            match p.kind {
                Kind::StarttlsLocal | Kind::StarttlsRelayed => return false,
                k if k.is_barrier() => barrier = true,
                _ => {}
            }
        }
        !barrier || self.reader.len() < READ_AHEAD
    }

    /// When the front reply may go out, if it exists.
    fn release_time(&self, p: &Pending) -> Option<Instant> {
        p.reply.as_ref()?;
        Some(release_at(p.arrival, self.last_release, p.ready, p.hold))
    }

    /// When the front pending's deferred bytes (the end of data) are due.
    fn deferred_time(&self, p: &Pending) -> Option<Instant> {
        p.deferred.as_ref()?;
        Some(release_at(
            p.arrival,
            self.last_release,
            p.arrival,
            p.command_delay,
        ))
    }

    /// Whether a keepalive NOOP may go to the MTA now, and from when: only
    /// between commands (the MTA owes nothing and reads no body, SASL
    /// response or handshake) while a reply is being held.
    fn keepalive_time(&self) -> Option<Instant> {
        let every = self.shared.backend.keepalive;
        if every.is_zero()
            || self.backend_lost
            || self.backend.is_none()
            || !self.owed.is_empty()
            || self.pending.is_empty()
            || self.reader.expecting() != Expect::Command
            || self.pending.iter().any(|p| p.kind.mta_busy())
        {
            return None;
        }
        Some(self.last_mta_write + every)
    }

    /// The earliest instant something must happen without I/O.
    fn next_deadline(&self) -> Instant {
        let mut t = Instant::now() + Duration::from_secs(86_400);
        if let Some(p) = self.pending.front() {
            for at in [self.release_time(p), self.deferred_time(p)]
                .into_iter()
                .flatten()
            {
                t = t.min(at);
            }
        }
        if let Some((_, sent)) = self.owed.front() {
            t = t.min(*sent + self.shared.backend.reply_timeout);
        }
        if self.pending.is_empty() && self.owed.is_empty() {
            t = t.min(self.last_activity + self.shared.limits.idle);
        }
        if let Some(k) = self.keepalive_time() {
            t = t.min(k);
        }
        if let Some(at) = self.connect_time() {
            t = t.min(at);
        }
        t
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if let Some((_, sent)) = self.owed.front()
            && now >= *sent + self.shared.backend.reply_timeout
        {
            let t = self.shared.backend.reply_timeout;
            warn!(client = %self.peer, "the MTA did not answer within {t:?}");
            self.on_backend_lost(Some(BackendError::Timeout(t)));
        } else if self.pending.is_empty()
            && self.owed.is_empty()
            && now >= self.last_activity + self.shared.limits.idle
        {
            self.shared.metrics.limit_refused("idle");
            self.push_local(IDLE, Kind::Local, true);
            self.close_after_flush = Some(Close(Outcome::Idle));
            self.backend_quit();
        }
    }

    /// Sends the end of data once its hold has run.
    fn send_due(&mut self, now: Instant) {
        let Some(p) = self.pending.front() else {
            return;
        };
        match self.deferred_time(p) {
            Some(at) if at <= now => {}
            _ => return,
        }
        let Some(p) = self.pending.front_mut() else {
            return;
        };
        let (id, bytes) = (p.id, p.deferred.take());
        if let Some(b) = bytes
            && !self.backend_lost
        {
            self.to_backend.extend_from_slice(&b);
            self.owed.push_back((Owed::Client(id), now));
            self.last_mta_write = now;
        }
    }

    /// Keeps the MTA's session alive during a long hold.
    fn keepalive(&mut self, now: Instant) {
        if self.keepalive_time().is_some_and(|at| at <= now) {
            self.to_backend.extend_from_slice(b"NOOP\r\n");
            self.owed.push_back((Owed::Keepalive, now));
            self.last_mta_write = now;
            self.shared.metrics.keepalives_total.inc();
        }
    }
}
