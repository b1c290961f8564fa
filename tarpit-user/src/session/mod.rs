//! One client connection, from accept to close. The session decides
//! nothing: it tells the policy what happened (`crate::policy::Event`) and
//! carries out what it is told (`crate::policy::Action`: holds, replies in
//! place of the MTA, drops, greylist questions, offences), reaching the
//! world outside only through the handles in [`Shared`] (ports, shutdown,
//! metrics).
//!
//! 1. Opening and parking ([`open`](open()), `park`): the server classifies
//!    the client once ([`classify`]); the banner is held as the policy
//!    says, the DNS look-ups run meanwhile (`dns_gate`), and a held client
//!    is parked: while it waits it is a socket and a [`Greeting`], with no
//!    task or future of its own, which is what lets one small box hold
//!    tens of thousands of bots.
//! 2. Pre-greet (`pregreet`): talk before the banner, judged by the
//!    pre-greet source, answered as the policy says.
//! 3. After the delay (`dns_gate`, [`run`]'s `greet`): the DNS verdict and
//!    connect greylisting take effect, then the MTA is connected (paced:
//!    `connect`), the client introduced (PROXY/XCLIENT) and its banner
//!    relayed. With `backend.connect = "at-transaction"` the agent speaks
//!    the banner itself instead, and `relay::lazy` answers for the MTA
//!    until the client starts a transaction, which connects it.
//! 4. Relay (`relay`): client commands, read strictly and forwarded in
//!    canonical form, go to the MTA as they come (pipelining included);
//!    each MTA reply is matched to its command, held as the policy says
//!    and sent in order. The agent answers only what it must: limits,
//!    pre-greet, malformed lines, STARTTLS when it terminates TLS, XCLIENT
//!    from clients, postscreen's after-greeting tests (`relay::protocol`),
//!    4xx when the MTA fails, and (at-transaction) what comes before a
//!    transaction. It never makes up a positive reply to DATA or BDAT.
//! 5. STARTTLS and opaque relay (`relay::mta`, `opaque`): STARTTLS relayed
//!    to the MTA, or an implicit-TLS client whose TLS session is with the
//!    MTA.
mod connect;
mod dns_gate;
mod opaque;
mod open;
pub mod park;
mod pregreet;
mod relay;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Duration, timeout};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::backend::Backend;
use crate::backend::pace::Pacer;
use crate::backend::probe::{Learned, MtaProfile};
use crate::config::{BackendConfig, ConnectMode, LimitsConfig, SmtpConfig};
use crate::metrics::{Metrics, Outcome};
use crate::policy::ports::Ports;
use crate::policy::{Policy, SessionState};
use crate::shutdown::Shutdown;
use crate::smtp::Reply;
use crate::tls::ClientStream;
use opaque::passthrough;
#[cfg(test)]
use open::hold;
pub use open::{Greeting, Opened, classify, open};
pub use park::Woke;
use relay::Session;

/// Everything sessions share; built from the config at start and again on
/// every reload (a session keeps the one it started with).
#[derive(Clone)]
pub struct Shared {
    pub policy: Policy,
    pub backend: BackendConfig,
    pub limits: LimitsConfig,
    pub smtp: SmtpConfig,
    pub tls: Option<TlsAcceptor>,
    /// With `tls`: AUTH only inside TLS (`tls.auth_only`).
    pub tls_auth_only: bool,
    pub metrics: Arc<Metrics>,
    /// The kernel's allow list, authenticated addresses, pre-greet
    /// verdict and offence sink (the closed loop's, or standalone ones).
    pub ports: Ports,
    /// The agent's stop, watched by every session.
    pub shutdown: Shutdown,
    /// DNSBL/DNSWL and host-name checks (issue 8).
    pub reputation: crate::reputation::Reputation,
    pub greylist: Option<crate::reputation::Greylist>,
    /// The MTA's banner and EHLO reply, as the probe learned them
    /// (`backend.connect = "at-transaction"`); kept across reloads.
    pub mta: MtaProfile,
    /// The limits on MTA connections (`backend.max_connecting`,
    /// `backend.max_sessions`).
    pub pacer: Pacer,
}

impl Shared {
    /// What the agent says in place of the MTA until a transaction starts,
    /// when it does: `at-transaction`, and a probe has succeeded (until
    /// then sessions connect the MTA at once, as `at-connect`).
    pub fn speaks_first(&self) -> Option<std::sync::Arc<Learned>> {
        if self.backend.connect != ConnectMode::AtTransaction {
            return None;
        }
        self.mta.get()
    }
}

const NO_SERVICE: &str = "421 4.3.2 Service not available, try again later\r\n";
const BACKEND_LOST: &str = "421 4.4.2 Lost connection to the mail server, try again later";
const IDLE: &str = "421 4.4.2 Idle timeout, closing connection";
/// The agent stops (SIGTERM): see `crate::shutdown`. One literal for the
/// reply the relay queues and the line written straight on a socket.
macro_rules! shutting_down {
    () => {
        "421 4.3.2 Service shutting down, try again later"
    };
}
const SHUTTING_DOWN: &str = shutting_down!();
const SHUTTING_DOWN_LINE: &str = concat!(shutting_down!(), "\r\n");
/// How long a reply to the client may take to write before the client is
/// given up (it does not read).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one session to its end, waiting out the greeting delay in its own
/// task (the agent's server parks held clients instead: [`open`]).
pub async fn run(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Outcome {
    let client = classify(shared, peer, local);
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(_) => return Outcome::ClientError,
    };
    match open(shared, stream, peer, local, client).await {
        Opened::Done(outcome) => outcome,
        Opened::Held(stream, greeting) => Box::pin(greeting.wait_here(shared, stream)).await,
    }
}

/// Everything after the greeting delay: the pre-greet verdict, the DNS
/// gate, the MTA's banner, then the relay.
#[allow(clippy::too_many_arguments)]
async fn after_hold(
    shared: &Shared,
    mut state: SessionState,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    mut rep: dns_gate::Lookups,
    check_pre_greet: bool,
    seen: bool,
) -> Outcome {
    let (mut stream, backend, banner, learned) = match greet(
        shared,
        &mut state,
        stream,
        peer,
        local,
        &mut rep,
        check_pre_greet,
        seen,
    )
    .await
    {
        Ok(x) => x,
        Err(outcome) => return outcome,
    };
    let (banner, backend) = match (banner, backend) {
        (Some(banner), backend) => (banner, backend),
        (None, Some(mut backend)) => {
            // Implicit TLS with the MTA: nothing to read in clear, relay it.
            return Box::pin(passthrough(shared, &mut stream, &mut backend, Bytes::new())).await;
        }
        (None, None) => return Outcome::BackendError,
    };
    // Boxed: a task's future is as large as its largest state, and the
    // relay state is much larger than the greeting one.
    Box::pin(relay(
        shared, peer, local, state, stream, backend, banner, learned,
    ))
    .await
}

/// The relay phase of [`run`], once the banner is there. Without a
/// `backend` the agent speaks for the MTA (`learned`) until the client
/// starts a transaction (`relay::lazy`).
#[allow(clippy::too_many_arguments)]
async fn relay(
    shared: &Shared,
    peer: SocketAddr,
    local: SocketAddr,
    state: SessionState,
    client: ClientStream,
    backend: Option<Backend>,
    banner: Reply,
    learned: Option<std::sync::Arc<Learned>>,
) -> Outcome {
    let mut s = Session::new(shared, peer, local, state, client, backend, learned);
    let outcome = s.relay(banner).await;
    if !s.reached_mta() {
        shared.metrics.sessions_unreached_total.inc();
    }
    debug!(client = %peer, outcome = outcome.as_str(), rcpts = s.state.rcpts,
        delay_s = s.state.delay_spent.as_secs_f64(), "session ended");
    outcome
}

/// Sends a short reply and closes; errors do not matter any more.
async fn say_and_close<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, text: &str) {
    write_and_close(w, text.as_bytes()).await;
}

async fn write_and_close<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) {
    let _ = timeout(Duration::from_secs(10), async {
        let _ = w.write_all(bytes).await;
        let _ = w.shutdown().await;
    })
    .await;
}

/// [`say_and_close`] for a socket outside the runtime's reactor (a client
/// accepted, or parked, and never registered): a short reply into an empty
/// send buffer goes out in one non-blocking `send`, then `shutdown` and
/// `close`, without the reactor's `epoll_ctl` calls; only what the buffer
/// did not take (`EAGAIN`: the client does not read, or a partial write)
/// is written through the runtime, under the same timeout. Errors do not
/// matter any more: the client is gone.
pub(crate) async fn say_and_close_std(stream: std::net::TcpStream, bytes: &[u8]) {
    use std::io::{ErrorKind, Write};
    let sent = loop {
        match (&stream).write(bytes) {
            Ok(n) => break n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break 0,
            Err(_) => return,
        }
    };
    if sent == bytes.len() {
        let _ = stream.shutdown(std::net::Shutdown::Write);
        return;
    }
    if let Ok(mut s) = TcpStream::from_std(stream) {
        write_and_close(&mut s, &bytes[sent..]).await;
    }
}

/// What the greeting phase hands to the relay: the client, the MTA (none
/// yet when the agent speaks first), the banner (none for implicit TLS
/// with the MTA) and what the agent speaks from.
type Greeted = (
    ClientStream,
    Option<Backend>,
    Option<Reply>,
    Option<std::sync::Arc<Learned>>,
);

/// The end of the greeting phase, once the delay is over: pre-greet
/// check, DNS gate, MTA connection, banner. The banner is `None` for an
/// implicit-TLS client whose TLS session is with the MTA (the agent has no
/// certificate): the rest is relayed opaquely. With
/// `backend.connect = "at-transaction"` the agent speaks the banner itself
/// and no MTA is connected yet.
#[allow(clippy::too_many_arguments)]
async fn greet(
    shared: &Shared,
    state: &mut SessionState,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    rep: &mut dns_gate::Lookups,
    check_pre_greet: bool,
    seen: bool,
) -> Result<Greeted, Outcome> {
    if check_pre_greet {
        let talk = pregreet::talked_first(shared, &stream, peer, local, seen).await;
        if talk.talked() {
            return Err(pregreet::answer_registered(shared, state, stream, peer, talk).await);
        }
    }
    dns_gate::gate(shared, state, &mut stream, peer, rep).await?;
    if shared.shutdown.is_draining() {
        say_and_close(&mut stream, SHUTTING_DOWN_LINE).await;
        return Err(Outcome::Shutdown);
    }
    if state.client.implicit_tls {
        return Box::pin(opaque::implicit_tls(shared, stream, peer, local))
            .await
            .map(|(c, b, r)| (c, Some(b), r, None));
    }
    if let Some(learned) = shared.speaks_first() {
        let banner = match &shared.backend.banner {
            Some(text) => Reply::local(220, text),
            None => learned.banner.clone(),
        };
        return Ok((
            ClientStream::Plain(stream),
            None,
            Some(banner),
            Some(learned),
        ));
    }
    let (backend, banner) = match Box::pin(connect::open(shared, peer, local)).await {
        Ok(x) => x,
        Err(e) => {
            warn!(client = %peer, "{e}");
            shared.metrics.backend_error(e.kind());
            say_and_close(&mut stream, NO_SERVICE).await;
            return Err(Outcome::BackendError);
        }
    };
    if check_pre_greet {
        let talk = pregreet::talked_first(shared, &stream, peer, local, seen).await;
        if talk.talked() {
            return Err(pregreet::answer_registered(shared, state, stream, peer, talk).await);
        }
    }
    Ok((
        ClientStream::Plain(stream),
        Some(backend),
        Some(banner),
        None,
    ))
}

#[cfg(test)]
mod tests;
