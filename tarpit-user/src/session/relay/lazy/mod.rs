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
mod late;
mod spoken;

use std::sync::Arc;

use bytes::Bytes;

use super::{Close, Kind, Session};
use crate::backend::probe::Learned;
use crate::metrics::Outcome;
use tracing::warn;

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
    /// Error replies the agent gave in this phase (`spoken::HARD_ERROR_LIMIT`).
    errors: u32,
    /// Commands that go nowhere (`spoken::JUNK_COMMAND_LIMIT`).
    junk: u32,
}

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
}
