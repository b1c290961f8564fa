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
use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::time::{Duration, Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use super::{BACKEND_LOST, IDLE, SHUTTING_DOWN, Shared, WRITE_TIMEOUT, passthrough};
use crate::backend::{Backend, BackendError};
use crate::metrics::Outcome;
use crate::policy::{Delay, SessionState, Step, release_at};
use crate::smtp::{ClientReader, Command, Expect, Item, Reply};
use crate::tls::ClientStream;

/// How many bytes the agent reads ahead of a reply the client must see
/// first (DATA's 354, the end of data, AUTH, STARTTLS): enough to notice
/// that the client left, too little to matter.
const READ_AHEAD: usize = 16 * 1024;

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
    pub(super) backend: Backend,
    pub(super) pending: VecDeque<Pending>,
    owed: VecDeque<(Owed, Instant)>,
    next_id: u64,
    pub(super) last_auth: Option<Instant>,
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
    /// The DNSBL `reject` action's reply, for this client's RCPTs.
    pub(super) dnsbl_reject: Option<String>,
    /// The MTA's last EHLO reply offered CHUNKING (BDAT).
    chunking: bool,
    /// The BDAT chunk being read is the last: its end is the end of data.
    last_chunk: bool,
    /// A failed reply to the data of the last chunk: the message's verdict.
    chunk_verdict: Option<Reply>,
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
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        shared: &'a Shared,
        peer: SocketAddr,
        local: SocketAddr,
        state: SessionState,
        client: ClientStream,
        backend: Backend,
        last_auth: Option<Instant>,
        dnsbl_reject: Option<String>,
    ) -> Session<'a> {
        let now = Instant::now();
        Session {
            shared,
            peer,
            local,
            state,
            client,
            reader: ClientReader::new(shared.limits.line, shared.smtp.bare_line_ending),
            backend,
            pending: VecDeque::new(),
            owed: VecDeque::new(),
            next_id: 0,
            last_auth,
            last_activity: now,
            last_release: now,
            last_mta_write: now,
            to_backend: BytesMut::new(),
            backend_lost: false,
            client_eof: false,
            close_after_flush: None,
            sender: String::new(),
            dnsbl_reject,
            chunking: false,
            last_chunk: false,
            chunk_verdict: None,
        }
    }

    pub(super) async fn relay(&mut self, banner: Reply) -> Outcome {
        let close = banner.code == 421;
        self.push_local_reply(banner, close);
        let shutdown = crate::ops::shutdown::current();
        let (mut drain_seen, mut close_seen) = (false, false);
        loop {
            if let Some(outcome) = self.release_ready().await {
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
                let backend = &mut self.backend;
                let lost = self.backend_lost;
                tokio::select! {
                    r = reader.fill(client), if read_client => Wake::Client(r),
                    r = backend.fill(), if !lost => Wake::Backend(r),
                    _ = sleep_until(timer) => Wake::Timer,
                    _ = shutdown.draining(), if !drain_seen => Wake::Drain,
                    _ = shutdown.closing(), if drain_seen && !close_seen => Wake::Close,
                }
            };
            match wake {
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
                    if self.pending.is_empty() || self.backend_lost {
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

    /// The agent is stopping (`closing`: and its drain time is up). A reply
    /// held by a tarpit delay is not held any longer: the verdict on a
    /// message goes out at once, as the MTA gives it (its end of data is
    /// sent now), so nothing accepted is lost; any other held reply is
    /// replaced by a 421 and the session ends. A session waiting for its
    /// next command gets the 421 now; one whose command is with the MTA
    /// finishes it (new transactions are refused by [`Session::command`])
    /// unless the drain time is up.
    fn on_stop(&mut self, closing: bool) {
        if self.close_after_flush.is_some() {
            return;
        }
        let now = Instant::now();
        let mut cut = None;
        let mut previous = self.last_release;
        for (i, p) in self.pending.iter_mut().enumerate() {
            if p.kind == Kind::DataEnd {
                p.command_delay = None;
                p.hold = None;
                continue;
            }
            if p.reply.is_some() && release_at(p.arrival, previous, p.ready, p.hold) > now {
                cut = Some(i);
                break;
            }
            previous = previous.max(p.ready);
        }
        let idle = self.pending.is_empty() && self.reader.expecting() == Expect::Command;
        if let Some(i) = cut {
            self.pending.truncate(i);
        } else if !(idle || closing) {
            return;
        }
        if closing {
            // Only replies already in hand still go out before the 421.
            if let Some(i) = self.pending.iter().position(|p| p.reply.is_none()) {
                self.pending.truncate(i);
            }
        }
        self.push_local(SHUTTING_DOWN, Kind::Local, true);
        self.close_after_flush = Some(Close(Outcome::Shutdown));
        self.backend_quit();
    }

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
    fn abandon_backend(&mut self) {
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
    fn on_backend_lost(&mut self, err: Option<BackendError>) {
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

    fn alloc_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(super) fn push_local(&mut self, text: &str, kind: Kind, close: bool) {
        let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(421);
        let reply = Reply::local(code, text.get(4..).unwrap_or(""));
        self.push_reply(kind, reply, None, close);
    }

    pub(super) fn push_local_reply(&mut self, reply: Reply, close: bool) {
        self.push_reply(Kind::Local, reply, None, close);
    }

    /// A reply the agent makes itself, held as policy says: the command's
    /// own delay (`command_delay`), or the 5xx delay.
    pub(super) fn push_reply(
        &mut self,
        kind: Kind,
        reply: Reply,
        command_delay: Option<Delay>,
        close: bool,
    ) {
        let now = Instant::now();
        let hold = self
            .shared
            .policy
            .settle(&mut self.state, command_delay, reply.code);
        if let Some(d) = hold {
            self.shared.metrics.delayed(d.reason, d.duration);
        }
        let id = self.alloc_id();
        self.pending.push_back(Pending {
            id,
            kind,
            arrival: now,
            command_delay,
            precharged: false,
            reply: Some(reply),
            ready: now,
            hold,
            close,
            deferred: None,
        });
    }

    /// Queues a command sent to the MTA at once.
    pub(super) fn push_command(&mut self, kind: Kind, line: &[u8], command_delay: Option<Delay>) {
        let now = Instant::now();
        let id = self.alloc_id();
        if !self.backend_lost {
            self.to_backend.extend_from_slice(line);
            self.owed.push_back((Owed::Client(id), now));
            self.last_mta_write = now;
        }
        self.pending.push_back(Pending {
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
        });
        if self.backend_lost {
            // Nobody will answer: the 4xx goes out in its place.
            self.pending.pop_back();
            self.push_local(BACKEND_LOST, Kind::Local, true);
            self.close_after_flush = Some(Close(Outcome::BackendError));
        }
    }

    /// The end of a message: its hold runs before `end` (the final dot, or
    /// the last BDAT) is sent to the MTA, so a message is never queued for
    /// a client that did not wait for its verdict.
    fn end_of_data(&mut self, end: &'static [u8]) {
        if self.backend_lost {
            self.push_local(BACKEND_LOST, Kind::Local, true);
            self.close_after_flush = Some(Close(Outcome::BackendError));
            return;
        }
        let d = self.step(Step::DataEnd);
        // Charged now: the client waits this long before the MTA even
        // hears of the end.
        let hold = self.shared.policy.settle(&mut self.state, d, 0);
        if let Some(d) = hold {
            self.shared.metrics.delayed(d.reason, d.duration);
        }
        let now = Instant::now();
        let id = self.alloc_id();
        self.pending.push_back(Pending {
            id,
            kind: Kind::DataEnd,
            arrival: now,
            command_delay: hold,
            precharged: true,
            reply: None,
            ready: now,
            hold: None,
            close: false,
            deferred: Some(Bytes::from_static(end)),
        });
    }

    pub(super) fn step(&mut self, step: Step<'_>) -> Option<Delay> {
        let policy = &self.shared.policy;
        policy.observe(&mut self.state, step);
        let delay = policy.command_delay(&mut self.state, step, self.last_auth, Instant::now());
        // No tarpit while the agent stops: the session should finish.
        delay.filter(|_| !crate::ops::shutdown::is_draining())
    }

    /// Consumes what the client sent, as far as the replies it waits for
    /// allow.
    fn process_client(&mut self) {
        loop {
            if self.close_after_flush.is_some() || self.pending.iter().any(|p| p.kind.is_barrier())
            {
                return;
            }
            let was = self.reader.expecting();
            let Some(item) = self.reader.next(&mut self.to_backend) else {
                return;
            };
            match item {
                Item::Command(cmd, canonical) => self.command(cmd, canonical),
                Item::AuthResponse(line) => self.push_command(Kind::Auth, &line, None),
                Item::BadLine(_) | Item::TooLong if was == Expect::AuthResponse => {
                    // The MTA waits for a SASL response: cancel the
                    // exchange; its reply (501) is the client's answer.
                    self.push_command(Kind::Auth, b"*\r\n", None);
                }
                Item::BadLine(fault) => {
                    self.shared.metrics.protocol_refused("bare_line_ending");
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
    fn command(&mut self, cmd: Command, canonical: Bytes) {
        if crate::ops::shutdown::is_draining()
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
        match cmd {
            Command::Helo(name) => {
                crate::ops::summary::helo(&name);
                let d = self.step(Step::Helo(&name));
                self.push_command(Kind::Helo, &canonical, d);
            }
            Command::Ehlo(name) => {
                crate::ops::summary::helo(&name);
                let d = self.step(Step::Helo(&name));
                self.push_command(Kind::Ehlo, &canonical, d);
            }
            Command::Mail(sender) => {
                let d = self.step(Step::Mail(&sender));
                self.push_command(Kind::Other, &canonical, d);
                self.sender = sender;
            }
            Command::Rcpt(rcpt) => {
                crate::ops::summary::rcpt();
                let d = self.step(Step::Rcpt);
                match self.rcpt_gate(&rcpt) {
                    Some(text) => self.push_local_held(&text, d),
                    None => self.push_command(Kind::Rcpt, &canonical, d),
                }
            }
            Command::Data => {
                let d = self.step(Step::Data);
                self.push_command(Kind::Data, &canonical, d);
            }
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
    fn auth_needs_tls(&self) -> bool {
        self.shared.tls.is_some() && self.shared.tls_auth_only && !self.client.is_tls()
    }

    pub(super) async fn flush_backend(&mut self) -> bool {
        if self.to_backend.is_empty() || self.backend_lost {
            self.to_backend.clear();
            return true;
        }
        let data = self.to_backend.split().freeze();
        if self.to_backend.capacity() > 64 * 1024 {
            self.to_backend = BytesMut::new();
        }
        match self
            .backend
            .send(&data, self.shared.backend.write_timeout)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                warn!(client = %self.peer, "writing to the MTA: {e}");
                false
            }
        }
    }

    /// Matches the MTA's replies to what it owes, in order.
    fn process_backend(&mut self) {
        loop {
            let reply = match self.backend.next_reply() {
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
    fn mta_ended(&mut self, reply: Reply) {
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
    fn reply_for(&mut self, id: u64, reply: Reply) {
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
                let starttls = match (&self.shared.tls, self.client.is_tls()) {
                    (Some(_), tls) => Some(!tls),
                    (None, true) => Some(false),
                    (None, false) => None,
                };
                reply.rewrite_ehlo(starttls, self.auth_needs_tls())
            }
            Kind::Helo => {
                self.chunking = false;
                reply
            }
            Kind::DataEnd => self.chunk_verdict.take().unwrap_or(reply),
            _ => reply,
        };
        let draining = crate::ops::shutdown::is_draining();
        let p = &self.pending[i];
        let (precharged, command_delay) = (p.precharged, p.command_delay);
        let hold = if precharged {
            let extra = self.shared.policy.settle(&mut self.state, None, reply.code);
            if let Some(d) = extra {
                self.shared.metrics.delayed(d.reason, d.duration);
            }
            Delay::longer(command_delay, extra)
        } else {
            let hold = self
                .shared
                .policy
                .settle(&mut self.state, command_delay, reply.code);
            if let Some(d) = hold {
                self.shared.metrics.delayed(d.reason, d.duration);
            }
            hold
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

    /// Sends every reply whose time has come, in order, and acts on it.
    async fn release_ready(&mut self) -> Option<Outcome> {
        let now = Instant::now();
        let mut out = BytesMut::new();
        let mut effects = Vec::new();
        while let Some(p) = self.pending.front() {
            match self.release_time(p) {
                Some(at) if at <= now => self.last_release = at,
                _ => break,
            }
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let Some(reply) = p.reply else { break };
            for l in &reply.lines {
                out.extend_from_slice(l);
            }
            effects.push((p.kind, reply.code, p.close));
            if p.close
                || matches!(
                    p.kind,
                    Kind::StarttlsLocal | Kind::StarttlsRelayed | Kind::Quit
                )
            {
                break;
            }
        }
        if out.is_empty() {
            return None;
        }
        match timeout(WRITE_TIMEOUT, self.client.write_all(&out)).await {
            Ok(Ok(())) => {}
            _ => return Some(Outcome::ClientError),
        }
        // A reply just went out: the client's silence counts from here.
        self.last_activity = Instant::now();
        for (kind, code, close) in effects {
            if let Some(outcome) = self.after_reply(kind, code, close).await {
                return Some(outcome);
            }
        }
        // A barrier lifted may free buffered commands.
        if !self.reader.is_empty() && self.close_after_flush.is_none() {
            self.process_client();
            if !self.flush_backend().await {
                self.on_backend_lost(None);
            }
        }
        None
    }

    /// What a reply the client just got means for the session.
    async fn after_reply(&mut self, kind: Kind, code: u16, close: bool) -> Option<Outcome> {
        if close {
            if (500..600).contains(&code) {
                crate::closed_loop::offence(
                    self.state.client.ip,
                    crate::closed_loop::Offence::Rejected,
                );
            }
            let outcome = match self.close_after_flush {
                Some(Close(o)) => o,
                None => Outcome::BackendClosed,
            };
            self.backend_quit();
            let _ = self.flush_backend().await;
            let _ = timeout(Duration::from_secs(5), self.client.shutdown()).await;
            return Some(outcome);
        }
        match (kind, code) {
            (Kind::Data, 354) => self.reader.expect_body(),
            (Kind::Auth, 334) => self.reader.expect_auth_response(),
            (Kind::Rcpt, 550) => crate::closed_loop::offence(
                self.state.client.ip,
                crate::closed_loop::Offence::UnknownRecipient,
            ),
            (Kind::Auth, 235) => {
                self.state.authenticated = true;
                self.shared.metrics.authenticated_total.inc();
                self.shared
                    .auth_store
                    .record(self.state.client.ip, Instant::now());
                info!(client = %self.peer, "authenticated (MTA said 235)");
            }
            (Kind::Quit, _) => {
                let _ = timeout(Duration::from_secs(5), self.client.shutdown()).await;
                return Some(Outcome::Quit);
            }
            (Kind::StarttlsLocal, _) => return self.start_tls().await,
            (Kind::StarttlsRelayed, 220) => return Some(self.go_opaque().await),
            _ => {}
        }
        None
    }

    /// The agent's own STARTTLS: the handshake, then a fresh session with
    /// the MTA (RFC 3207 4.2: nothing learned before TLS is kept; the
    /// MTA, which never saw the STARTTLS, would keep the HELO name and any
    /// transaction, so it gets a new connection and the client's next EHLO).
    async fn start_tls(&mut self) -> Option<Outcome> {
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
        match Box::pin(Backend::open(&self.shared.backend, self.peer, self.local)).await {
            Ok((backend, banner)) => {
                self.backend = backend;
                self.backend_lost = false;
                self.owed.clear();
                self.chunking = false;
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

    async fn go_opaque(&mut self) -> Outcome {
        info!(client = %self.peer, "STARTTLS relayed to the MTA: the rest of the session is opaque");
        self.reader.clear();
        let to_client = self.backend.take_buffered();
        passthrough(self.shared, &mut self.client, &mut self.backend, to_client).await
    }
}
