//! One client connection, from accept to close.
//!
//! 1. Greeting: hold the banner (policy), watch for pre-greet talk, then
//!    connect to the MTA, introduce the client (PROXY/XCLIENT) and relay
//!    the MTA's banner. The agent's server parks a client held in the
//!    greeting delay ([`open`], [`park`]): while it waits it is a socket
//!    and a [`Greeting`], with no task or future of its own, which is what
//!    lets one small box hold tens of thousands of bots.
//! 2. Relay ([`relay`]): client commands, read strictly and forwarded in
//!    canonical form, go to the MTA as they come (pipelining included);
//!    each MTA reply is matched to its command, held as policy says and
//!    sent in order. The agent answers only what it must: limits,
//!    pre-greet, malformed lines, STARTTLS when it terminates TLS, XCLIENT
//!    from clients, and 4xx when the MTA fails. It never makes up a
//!    positive reply to DATA or BDAT.
//! 3. Opaque relay ([`opaque`]): STARTTLS relayed to the MTA, or an
//!    implicit-TLS client whose TLS session is with the MTA.
mod dns_gate;
mod opaque;
pub mod park;
mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant, sleep_until, timeout};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::config::{BackendConfig, LimitsConfig, SmtpConfig};
use crate::metrics::{Metrics, Outcome};
use crate::policy::ports::Ports;
use crate::policy::{Policy, SessionState};
use crate::shutdown::Shutdown;
use crate::smtp::Reply;
use crate::tls::ClientStream;
use opaque::passthrough;
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
}

const PRE_GREET: &str = "554 5.5.1 SMTP protocol violation\r\n";
const NO_SERVICE: &str = "421 4.3.2 Service not available, try again later\r\n";
const BACKEND_LOST: &str = "421 4.4.2 Lost connection to the mail server, try again later";
const IDLE: &str = "421 4.4.2 Idle timeout, closing connection";
/// The agent stops (SIGTERM): see `crate::shutdown`.
const SHUTTING_DOWN: &str = "421 4.3.2 Service shutting down, try again later";
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
    match open(shared, stream, peer, local, client).await {
        Opened::Done(outcome) => outcome,
        Opened::Held(stream, greeting) => Box::pin(greeting.wait_here(shared, stream)).await,
    }
}

/// How [`open`] left a session.
// `Held` is the common case (most clients are held bots), and boxing it
// would cost each of them an allocation; `Done` is rare and short-lived.
#[allow(clippy::large_enum_variant)]
pub enum Opened {
    /// It ended (or never had to wait, and ran to its end).
    Done(Outcome),
    /// It waits in the greeting delay: park it ([`park::Holder`]) or wait
    /// here ([`Greeting::wait_here`]), then [`Greeting::resume`] it.
    Held(TcpStream, Greeting),
}

/// A session in the greeting delay: what it needs to go on, without its
/// socket. Kept small, as thousands of held clients each have one.
pub struct Greeting {
    state: SessionState,
    peer: SocketAddr,
    local: SocketAddr,
    rep: dns_gate::Lookups,
    check_pre_greet: bool,
    deadline: Instant,
}

/// Who the client is: the config's lists (`allow.internal`, `allow.ips`,
/// `blacklist.ips`) and the kernel allow list. Asked once per connection;
/// the server asks before its limits and hands the answer to [`open`].
pub fn classify(shared: &Shared, peer: SocketAddr, local: SocketAddr) -> crate::policy::Client {
    let mut client = shared.policy.classify(peer.ip(), local.port());
    client.allowlisted |= shared.ports.allow.allowlisted(client.ip);
    client
}

/// The start of a session (the client classified by [`classify`]): send
/// the teaser, start the DNS lookups and wait for their verdict (it may
/// let the client through early). A session with a greeting delay left
/// comes back [`Opened::Held`]; one without runs to its end.
///
/// Everything past the delay (MTA, relay) or off the common path (teaser
/// write, pre-greet answer) is boxed: a future is as large as its largest
/// state, and this one is alive for every client being greeted.
pub async fn open(
    shared: &Shared,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    client: crate::policy::Client,
) -> Opened {
    let _ = stream.set_nodelay(true);
    let mut greeting = Greeting {
        state: SessionState::new(client),
        peer,
        local,
        rep: None,
        check_pre_greet: false,
        deadline: Instant::now(),
    };
    let state = &mut greeting.state;
    state.authenticated = shared.policy.auth_spares_new_sessions()
        && shared
            .ports
            .auth
            .last_authenticated(state.client.ip, Instant::now())
            .is_some();
    greeting.rep = dns_gate::start(shared, &greeting.state);
    let crate::policy::GreetingPlan {
        delay,
        check_pre_greet,
        teaser,
    } = shared.policy.greeting(&mut greeting.state);
    greeting.check_pre_greet = check_pre_greet;
    greeting.deadline += delay.map_or(Duration::ZERO, |d| d.duration);
    if let Some(t) = teaser {
        let teaser = format!("220-{t}\r\n");
        if Box::pin(stream.write_all(teaser.as_bytes())).await.is_err() {
            return Opened::Done(Outcome::ClientError);
        }
    }
    let Some(d) = delay else {
        return Opened::Done(Box::pin(greeting.resume(shared, stream, Woke::Due)).await);
    };
    shared.metrics.delayed(d.reason, d.duration);
    if greeting.rep.is_some() {
        // Wait here until the verdict is in, then park for the rest.
        let woke = match hold(
            &shared.shutdown,
            &stream,
            greeting.deadline,
            &mut greeting.rep,
        )
        .await
        {
            Held::Known => None,
            Held::Exempt => Some(Woke::Due),
            Held::Woke(w) => Some(w),
        };
        if let Some(w) = woke {
            return Opened::Done(Box::pin(greeting.resume(shared, stream, w)).await);
        }
    }
    Opened::Held(stream, greeting)
}

impl Greeting {
    /// When the greeting delay ends.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Waits out the greeting delay in the caller's task, then resumes.
    pub async fn wait_here(self, shared: &Shared, stream: TcpStream) -> Outcome {
        let woke = match hold(&shared.shutdown, &stream, self.deadline, &mut None).await {
            Held::Woke(w) => w,
            // Not without lookups; were it, the wait is over all the same.
            Held::Exempt | Held::Known => Woke::Due,
        };
        self.resume(shared, stream, woke).await
    }

    /// Goes on once the wait ended for `woke`: the drain answers 421, talk
    /// before the banner is judged (pre-greet), and a client whose turn
    /// came gets the MTA's banner.
    pub async fn resume(self, shared: &Shared, mut stream: TcpStream, woke: Woke) -> Outcome {
        let Greeting {
            mut state,
            peer,
            local,
            rep,
            check_pre_greet,
            deadline,
        } = self;
        let mut seen = false;
        match woke {
            Woke::Due => {}
            Woke::Drain => {
                say_and_close(&mut stream, &format!("{SHUTTING_DOWN}\r\n")).await;
                return Outcome::Shutdown;
            }
            Woke::Closed => return Outcome::ClientClosed,
            Woke::Error => return Outcome::ClientError,
            Woke::Talked => {
                seen = true;
                if check_pre_greet && shared.ports.pregreet.talked_first(peer, local, true) {
                    return pre_greet(shared, &mut state, stream, peer).await;
                }
                // Talk is allowed here (the check is off): wait it out
                // without reading, the MTA will see the bytes.
                sleep_until(deadline).await;
            }
        }
        Box::pin(after_hold(
            shared,
            state,
            stream,
            peer,
            local,
            rep,
            check_pre_greet,
            seen,
        ))
        .await
    }
}

/// What ended a wait in the session's own task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Woke(Woke),
    /// DNS allow-lists the client: no need to wait longer.
    Exempt,
    /// The DNS verdict is in and does not exempt the client: the delay
    /// goes on.
    Known,
}

/// Waits in the session's own task: until the deadline, the drain, the
/// client's talk or EOF, or (with lookups) the DNS verdict.
///
/// One poll function instead of a `select!` over four futures: the socket
/// is watched with `poll_peek`, whose waker lives in the socket's own
/// registration, and the drain with one waiter on a shared `Notify`.
async fn hold(
    shutdown: &Shutdown,
    stream: &TcpStream,
    deadline: Instant,
    rep: &mut dns_gate::Lookups,
) -> Held {
    let sleep = sleep_until(deadline);
    let drain = shutdown.drain_waiter();
    tokio::pin!(sleep, drain);
    if shutdown.is_draining() {
        return Held::Woke(Woke::Drain);
    }
    let mut verdict = rep
        .as_mut()
        .map(|h| Box::pin(async move { h.verdict().await.exempt() }));
    std::future::poll_fn(|cx| {
        if drain.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Held::Woke(Woke::Drain));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Held::Woke(Woke::Due));
        }
        if let Some(v) = verdict.as_mut()
            && let Poll::Ready(exempt) = v.as_mut().poll(cx)
        {
            return Poll::Ready(if exempt { Held::Exempt } else { Held::Known });
        }
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        match stream.poll_peek(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(0)) => Poll::Ready(Held::Woke(Woke::Closed)),
            Poll::Ready(Ok(_)) => Poll::Ready(Held::Woke(Woke::Talked)),
            Poll::Ready(Err(_)) => Poll::Ready(Held::Woke(Woke::Error)),
        }
    })
    .await
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
    let (mut stream, mut backend, banner) = match greet(
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
    let Some(banner) = banner else {
        // Implicit TLS with the MTA: nothing to read in clear, relay it.
        return Box::pin(passthrough(shared, &mut stream, &mut backend, Bytes::new())).await;
    };
    let dnsbl_reject = dns_gate::reject_reply(&mut rep).await;
    // Boxed: a task's future is as large as its largest state, and the
    // relay state is much larger than the greeting one.
    Box::pin(relay(
        shared,
        peer,
        local,
        state,
        stream,
        backend,
        banner,
        dnsbl_reject,
    ))
    .await
}

/// The relay phase of [`run`], once the banner is there.
#[allow(clippy::too_many_arguments)]
async fn relay(
    shared: &Shared,
    peer: SocketAddr,
    local: SocketAddr,
    state: SessionState,
    client: ClientStream,
    backend: Backend,
    banner: Reply,
    dnsbl_reject: Option<String>,
) -> Outcome {
    let last_auth = shared
        .ports
        .auth
        .last_authenticated(state.client.ip, Instant::now());
    let mut s = Session::new(
        shared,
        peer,
        local,
        state,
        client,
        backend,
        last_auth,
        dnsbl_reject,
    );
    let outcome = s.relay(banner).await;
    debug!(client = %peer, outcome = outcome.as_str(), rcpts = s.state.rcpts,
        delay_s = s.state.delay_spent.as_secs_f64(), "session ended");
    outcome
}

/// Sends a short reply and closes; errors do not matter any more.
async fn say_and_close<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, text: &str) {
    let _ = timeout(Duration::from_secs(10), async {
        let _ = w.write_all(text.as_bytes()).await;
        let _ = w.shutdown().await;
    })
    .await;
}

/// The end of the greeting phase, once the delay is over: pre-greet
/// check, DNS gate, MTA connection, banner. The banner is `None` for an
/// implicit-TLS client whose TLS session is with the MTA (the agent has no
/// certificate): the rest is relayed opaquely.
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
) -> Result<(ClientStream, Backend, Option<Reply>), Outcome> {
    if check_pre_greet && pre_greet_now(shared, &stream, peer, local, seen).await {
        return Err(pre_greet(shared, state, stream, peer).await);
    }
    dns_gate::gate(shared, state, &mut stream, peer, rep).await?;
    if shared.shutdown.is_draining() {
        say_and_close(&mut stream, &format!("{SHUTTING_DOWN}\r\n")).await;
        return Err(Outcome::Shutdown);
    }
    if state.client.implicit_tls {
        return Box::pin(opaque::implicit_tls(shared, stream, peer, local)).await;
    }
    let (backend, banner) = match Box::pin(Backend::open(&shared.backend, peer, local)).await {
        Ok(x) => x,
        Err(e) => {
            warn!(client = %peer, "{e}");
            shared.metrics.backend_error(e.kind());
            say_and_close(&mut stream, NO_SERVICE).await;
            return Err(Outcome::BackendError);
        }
    };
    if check_pre_greet && pre_greet_now(shared, &stream, peer, local, seen).await {
        return Err(pre_greet(shared, state, stream, peer).await);
    }
    Ok((ClientStream::Plain(stream), backend, Some(banner)))
}

/// Asks the verdict source just before the banner goes out.
async fn pre_greet_now(
    shared: &Shared,
    stream: &TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    seen: bool,
) -> bool {
    let mut probe = [0u8; 1];
    // One poll of the socket: data already there counts, nothing waits.
    let seen = seen
        || matches!(
            timeout(Duration::ZERO, stream.peek(&mut probe)).await,
            Ok(Ok(n)) if n > 0
        );
    shared.ports.pregreet.talked_first(peer, local, seen)
}

async fn pre_greet(
    shared: &Shared,
    state: &mut SessionState,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Outcome {
    shared.metrics.pregreet_total.inc();
    info!(client = %peer, "pre-greet talk: 554 and close");
    let hold = shared.policy.settle(state, None, 554);
    if let Some(d) = hold {
        shared.metrics.delayed(d.reason, d.duration);
        tokio::select! {
            _ = tokio::time::sleep(d.duration) => {}
            _ = shared.shutdown.draining() => {}
        }
    }
    say_and_close(&mut stream, PRE_GREET).await;
    shared.metrics.drops_554_total.inc();
    Outcome::PreGreet
}

#[cfg(test)]
mod tests;
