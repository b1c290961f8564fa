//! The replies: made by the agent or owed by the MTA, held as the policy
//! says ([`Session::settle`]), released in order ([`Session::release_ready`])
//! and acted on once the client has them ([`Session::after_reply`]:
//! offences, authentication, STARTTLS, QUIT); and the stop (SIGTERM).
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::time::{Duration, Instant, timeout};
use tracing::info;

use super::{BACKEND_LOST, Close, Kind, Owed, Pending, SHUTTING_DOWN, Session, WRITE_TIMEOUT};
use crate::metrics::Outcome;
use crate::policy::{Delay, Event, Sent, release_at};
use crate::smtp::{Expect, Reply};

impl Session<'_> {
    /// The agent is stopping (`closing`: and its drain time is up). A reply
    /// held by a tarpit delay is not held any longer: the verdict on a
    /// message goes out at once, as the MTA gives it (its end of data is
    /// sent now), so nothing accepted is lost; any other held reply is
    /// replaced by a 421 and the session ends. A session waiting for its
    /// next command gets the 421 now; one whose command is with the MTA
    /// finishes it (new transactions are refused by [`Session::command`])
    /// unless the drain time is up.
    pub(in crate::session) fn on_stop(&mut self, closing: bool) {
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
            if p.reply.is_none() {
                // Not known yet: when it goes out is not known either.
                break;
            }
            let at = release_at(p.arrival, previous, p.ready, p.hold);
            if at > now {
                cut = Some(i);
                break;
            }
            previous = at;
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

    /// The policy's final hold of a reply with `code` (charged to the
    /// session's budget), counted in the metrics.
    pub(in crate::session) fn settle(
        &mut self,
        command_delay: Option<Delay>,
        code: u16,
    ) -> Option<Delay> {
        let event = Event::Reply {
            code,
            command: command_delay,
        };
        let hold = self.shared.policy.decide(&mut self.state, event).hold;
        if let Some(d) = hold {
            self.shared.metrics.delayed(d.reason, d.duration);
        }
        hold
    }

    pub(in crate::session) fn alloc_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(in crate::session) fn push_local(&mut self, text: &str, kind: Kind, close: bool) {
        let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(421);
        let reply = Reply::local(code, text.get(4..).unwrap_or(""));
        self.push_reply(kind, reply, None, close);
    }

    pub(in crate::session) fn push_local_reply(&mut self, reply: Reply, close: bool) {
        self.push_reply(Kind::Local, reply, None, close);
    }

    /// A reply the agent makes itself, held as policy says: the command's
    /// own delay (`command_delay`), or the 5xx delay.
    pub(in crate::session) fn push_reply(
        &mut self,
        kind: Kind,
        reply: Reply,
        command_delay: Option<Delay>,
        close: bool,
    ) {
        let hold = self.settle(command_delay, reply.code);
        let id = self.alloc_id();
        self.pending.push_back(Pending {
            reply: Some(reply),
            hold,
            close,
            ..Pending::new(id, kind, command_delay)
        });
    }

    /// Queues a command sent to the MTA at once.
    pub(in crate::session) fn push_command(
        &mut self,
        kind: Kind,
        line: &[u8],
        command_delay: Option<Delay>,
    ) {
        let now = Instant::now();
        let id = self.alloc_id();
        // (No MTA at all cannot happen here: `lazy` answers or opens it.)
        let lost = self.backend_lost || self.backend.is_none();
        if !lost {
            self.to_backend.extend_from_slice(line);
            self.owed.push_back((Owed::Client(id), now));
            self.last_mta_write = now;
        }
        self.pending
            .push_back(Pending::new(id, kind, command_delay));
        if lost {
            // Nobody will answer: the 4xx goes out in its place.
            self.pending.pop_back();
            self.push_local(BACKEND_LOST, Kind::Local, true);
            self.close_after_flush = Some(Close(Outcome::BackendError));
        }
    }

    /// Sends every reply whose time has come, in order, and acts on it.
    pub(in crate::session) async fn release_ready(&mut self) -> Option<Outcome> {
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
        let sent = Sent {
            code,
            rcpt: kind == Kind::Rcpt,
            close,
            pre_greet: false,
        };
        if let Some(offence) = self
            .shared
            .policy
            .decide(&mut self.state, Event::Sent(sent))
            .offence
        {
            self.shared
                .ports
                .offences
                .offence(self.state.client.ip, offence);
        }
        if close {
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
            (Kind::Auth, 235) => {
                self.shared.metrics.authenticated_total.inc();
                if self
                    .shared
                    .policy
                    .decide(&mut self.state, Event::Authenticated)
                    .remember_auth
                {
                    self.shared
                        .ports
                        .auth
                        .record(self.state.client.ip, Instant::now());
                }
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
}
