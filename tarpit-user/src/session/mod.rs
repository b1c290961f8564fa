//! One client connection, from accept to close.
//!
//! 1. Greeting: hold the banner (policy), watch for pre-greet talk, then
//!    connect to the MTA, introduce the client (PROXY/XCLIENT) and relay
//!    the MTA's banner. The agent's server parks a client held in the
//!    greeting delay ([`open`], [`park`]): while it waits it is a socket
//!    and a [`Greeting`], with no task or future of its own, which is what
//!    lets one small box hold tens of thousands of bots.
//! 2. Relay: client commands go to the MTA as they come (pipelining
//!    included); each MTA reply is matched to its command, held as policy
//!    says (counted from the command's arrival) and sent in order. The
//!    agent answers only what it must: limits, pre-greet, STARTTLS when it
//!    terminates TLS, XCLIENT from clients, and 4xx when the MTA fails.
//!    It never makes up a positive reply to DATA or BDAT.
//!
//! All relay waiting happens in one `select!` over the client, the MTA and
//! a timer, with cancel-safe reads into [`LineBuf`]s, so a session held at
//! a command is a socket, two small buffers and a queue.
mod dns_gate;
pub mod park;
pub mod pregreet;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, ReadBuf, copy_bidirectional};
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant, sleep_until, timeout};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::backend::{Backend, BackendError};
use crate::config::{BackendConfig, LimitsConfig};
use crate::metrics::{Metrics, Outcome};
use crate::policy::{AuthenticatedIps, Delay, Policy, SessionState, Step, release_at};
use crate::smtp::{Command, DotScanner, LineBuf, LineError, Reply, parse_command};
use crate::tls::ClientStream;
pub use park::Woke;
pub use pregreet::{AgentPreGreet, PreGreetVerdict};

/// Everything sessions share; built from the config at start and again on
/// every reload (a session keeps the one it started with).
#[derive(Clone)]
pub struct Shared {
    pub policy: Policy,
    pub backend: BackendConfig,
    pub limits: LimitsConfig,
    pub tls: Option<TlsAcceptor>,
    pub metrics: Arc<Metrics>,
    pub auth_store: Arc<dyn AuthenticatedIps>,
    pub pregreet: Arc<dyn PreGreetVerdict>,
    /// DNSBL/DNSWL and host-name checks (issue 8).
    pub reputation: crate::reputation::Reputation,
    pub greylist: Option<crate::reputation::Greylist>,
}

const PRE_GREET: &str = "554 5.5.1 SMTP protocol violation\r\n";
const NO_SERVICE: &str = "421 4.3.2 Service not available, try again later\r\n";
const BACKEND_LOST: &str = "421 4.4.2 Lost connection to the mail server, try again later";
const IDLE: &str = "421 4.4.2 Idle timeout, closing connection";
/// The agent stops (SIGTERM): see `crate::ops::shutdown`.
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
    match open(shared, stream, peer, local).await {
        Opened::Done(outcome) => outcome,
        Opened::Held(stream, greeting) => Box::pin(greeting.wait_here(shared, stream)).await,
    }
}

/// How [`open`] left a session.
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

/// The start of a session: classify the client, send the teaser, start
/// the DNS lookups and wait for their verdict (it may let the client
/// through early). A session with a greeting delay left comes back
/// [`Opened::Held`]; one without runs to its end.
///
/// Everything past the delay (MTA, relay) or off the common path (teaser
/// write, pre-greet answer) is boxed: a future is as large as its largest
/// state, and this one is alive for every client being greeted.
pub async fn open(
    shared: &Shared,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Opened {
    let _ = stream.set_nodelay(true);
    let mut client = shared.policy.classify(peer.ip(), local.port());
    client.allowlisted |= crate::closed_loop::allowlisted(client.ip);
    let mut state = SessionState::new(client);
    state.authenticated = crate::closed_loop::authenticated_today(&shared.policy, state.client.ip);
    let rep = dns_gate::start(shared, &state);
    let start = Instant::now();
    let crate::policy::GreetingPlan {
        delay,
        check_pre_greet,
        teaser,
    } = shared.policy.greeting(&mut state);
    if let Some(t) = teaser {
        let teaser = format!("220-{t}\r\n");
        if Box::pin(stream.write_all(teaser.as_bytes())).await.is_err() {
            return Opened::Done(Outcome::ClientError);
        }
    }
    let mut greeting = Greeting {
        state,
        peer,
        local,
        rep,
        check_pre_greet,
        deadline: start + delay.map_or(Duration::ZERO, |d| d.duration),
    };
    let Some(d) = delay else {
        return Opened::Done(Box::pin(greeting.resume(shared, stream, Woke::Due)).await);
    };
    shared.metrics.delayed(d.reason, d.duration);
    if greeting.rep.is_some() {
        // Wait here until the verdict is in, then park for the rest.
        let woke = match hold(&stream, greeting.deadline, &mut greeting.rep).await {
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
        let woke = match hold(&stream, self.deadline, &mut None).await {
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
                if check_pre_greet && shared.pregreet.talked_first(peer, local, true) {
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
async fn hold(stream: &TcpStream, deadline: Instant, rep: &mut dns_gate::Lookups) -> Held {
    let sleep = sleep_until(deadline);
    let drain = crate::ops::shutdown::drain_waiter();
    tokio::pin!(sleep, drain);
    if crate::ops::shutdown::is_draining() {
        return Held::Woke(Woke::Drain);
    }
    let mut verdict = rep
        .as_mut()
        .map(|h| Box::pin(async move { h.verdict().await.exempt() }));
    std::future::poll_fn(|cx| {
        if let Some(d) = drain.as_mut().as_pin_mut()
            && d.poll(cx).is_ready()
        {
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
    let (stream, backend, banner) = match greet(
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
    if state.client.implicit_tls {
        // The client speaks TLS first: nothing to read in clear, relay it.
        let (mut client, mut backend) = (ClientStream::Plain(stream), backend);
        return Box::pin(passthrough(shared, &mut client, &mut backend, Bytes::new())).await;
    }
    let dnsbl_reject = dns_gate::reject_reply(&mut rep).await;
    // Boxed: a task's future is as large as its largest state, and the
    // relay state is much larger than the greeting one.
    Box::pin(relay(
        shared,
        peer,
        state,
        stream,
        backend,
        banner,
        dnsbl_reject,
    ))
    .await
}

/// The relay phase of [`run`], once the banner is there.
async fn relay(
    shared: &Shared,
    peer: SocketAddr,
    state: SessionState,
    stream: TcpStream,
    backend: Backend,
    banner: Reply,
    dnsbl_reject: Option<String>,
) -> Outcome {
    let last_auth = shared
        .auth_store
        .last_authenticated(state.client.ip, Instant::now());
    let mut s = Session {
        shared,
        peer,
        state,
        client: ClientStream::Plain(stream),
        client_buf: LineBuf::new(shared.limits.line),
        backend,
        pending: VecDeque::new(),
        mode: Mode::Command,
        last_auth,
        last_client_activity: Instant::now(),
        to_backend: BytesMut::new(),
        backend_lost: false,
        client_eof: false,
        close_after_flush: None,
        sender: String::new(),
        dnsbl_reject,
    };
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
/// check, DNS gate, MTA connection, banner.
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
) -> Result<(TcpStream, Backend, Reply), Outcome> {
    if check_pre_greet && pre_greet_now(shared, &stream, peer, local, seen).await {
        return Err(pre_greet(shared, state, stream, peer).await);
    }
    dns_gate::gate(shared, state, &mut stream, peer, rep).await?;
    if crate::ops::shutdown::is_draining() {
        say_and_close(&mut stream, &format!("{SHUTTING_DOWN}\r\n")).await;
        return Err(Outcome::Shutdown);
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
    Ok((stream, backend, banner))
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
    shared.pregreet.talked_first(peer, local, seen)
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
        let shutdown = crate::ops::shutdown::current();
        tokio::select! {
            _ = tokio::time::sleep(d.duration) => {}
            _ = shutdown.draining() => {}
        }
    }
    say_and_close(&mut stream, PRE_GREET).await;
    shared.metrics.drops_554_total.inc();
    Outcome::PreGreet
}

/// Relays the rest of a session without looking at it (TLS to the MTA).
async fn passthrough(
    shared: &Shared,
    client: &mut ClientStream,
    backend: &mut Backend,
    to_client: Bytes,
) -> Outcome {
    shared.metrics.starttls_passthrough_total.inc();
    if !to_client.is_empty() && client.write_all(&to_client).await.is_err() {
        return Outcome::ClientError;
    }
    let _ = copy_bidirectional(client, &mut backend.stream).await;
    Outcome::Passthrough
}

/// What the client's next bytes are.
#[derive(Debug)]
enum Mode {
    Command,
    /// After a 334: the next line is a SASL response (a credential: it is
    /// forwarded, never parsed or logged).
    AuthResponse,
    /// A DATA body, until the lone dot.
    Data(DotScanner),
    /// A BDAT chunk: this many bytes are still to come.
    Bdat(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ehlo,
    Helo,
    Data,
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
            Kind::Data | Kind::Auth | Kind::StarttlsRelayed | Kind::StarttlsLocal | Kind::Quit
        )
    }
}

struct Pending {
    kind: Kind,
    arrival: Instant,
    command_delay: Option<Delay>,
    /// Waits for the MTA (else the reply is already there).
    from_backend: bool,
    reply: Option<Reply>,
    release: Instant,
    /// Close the session once this reply is out.
    close: bool,
}

/// Why the relay loop must stop after flushing.
#[derive(Debug, Clone, Copy)]
struct Close(Outcome);

struct Session<'a> {
    shared: &'a Shared,
    peer: SocketAddr,
    state: SessionState,
    client: ClientStream,
    client_buf: LineBuf,
    backend: Backend,
    pending: VecDeque<Pending>,
    mode: Mode,
    last_auth: Option<Instant>,
    last_client_activity: Instant,
    to_backend: BytesMut,
    backend_lost: bool,
    client_eof: bool,
    close_after_flush: Option<Close>,
    /// The current transaction's sender (for greylisting triplets).
    sender: String,
    /// The DNSBL `reject` action's reply, for this client's RCPTs.
    dnsbl_reject: Option<String>,
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

impl Session<'_> {
    async fn relay(&mut self, banner: Reply) -> Outcome {
        let close = banner.code == 421;
        self.push_local_reply(banner, close);
        let shutdown = crate::ops::shutdown::current();
        let (mut drain_seen, mut close_seen) = (false, false);
        loop {
            if let Some(outcome) = self.release_ready().await {
                return outcome;
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
                && !self.pending.iter().any(|p| p.kind.is_barrier())
                && self.pending.len() < self.shared.limits.pipeline;
            let timer = self.next_deadline();
            let wake = {
                let client_buf = &mut self.client_buf;
                let client = &mut self.client;
                let backend = &mut self.backend;
                let lost = self.backend_lost;
                tokio::select! {
                    r = client_buf.fill(client), if read_client => Wake::Client(r),
                    r = backend.fill(), if !lost => Wake::Backend(r),
                    _ = sleep_until(timer) => Wake::Timer,
                    _ = shutdown.draining(), if !drain_seen => Wake::Drain,
                    _ = shutdown.closing(), if drain_seen && !close_seen => Wake::Close,
                }
            };
            match wake {
                Wake::Client(Ok(0)) | Wake::Client(Err(_)) => {
                    self.client_eof = true;
                    if self.pending.is_empty() || self.backend_lost {
                        return Outcome::ClientClosed;
                    }
                }
                Wake::Client(Ok(_)) => {
                    self.last_client_activity = Instant::now();
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

    /// The earliest instant something must happen without I/O.
    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(86_400);
        match self.pending.front() {
            Some(p) if p.reply.is_some() => p.release,
            Some(p) => p.arrival + self.shared.backend.reply_timeout,
            None => self.last_client_activity + self.shared.limits.idle,
        }
        .min(far)
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        match self.pending.front() {
            Some(p)
                if p.reply.is_none() && now >= p.arrival + self.shared.backend.reply_timeout =>
            {
                warn!(client = %self.peer, "the MTA did not answer within {:?}", self.shared.backend.reply_timeout);
                self.on_backend_lost(Some(BackendError::Timeout(
                    self.shared.backend.reply_timeout,
                )));
            }
            None if now >= self.last_client_activity + self.shared.limits.idle => {
                self.shared.metrics.limit_refused("idle");
                self.push_local(IDLE, Kind::Local, true);
                self.close_after_flush = Some(Close(Outcome::Idle));
                self.backend_quit();
            }
            _ => {}
        }
    }

    /// The agent is stopping (`closing`: and its drain time is up). A reply
    /// held by a tarpit delay is not held any longer: the verdict on a
    /// message (end of DATA, last BDAT) goes out at once, as the MTA gave
    /// it, so nothing accepted is lost; any other held reply is replaced by
    /// a 421 and the session ends. A session waiting for its next command
    /// gets the 421 now; one whose command is with the MTA finishes it
    /// (new transactions are refused by [`Session::command`]) unless the
    /// drain time is up.
    fn on_stop(&mut self, closing: bool) {
        if self.close_after_flush.is_some() {
            return;
        }
        let now = Instant::now();
        let mut cut = None;
        for (i, p) in self.pending.iter_mut().enumerate() {
            if p.reply.is_some() && p.release > now {
                if p.kind == Kind::DataEnd {
                    p.release = now;
                } else {
                    cut = Some(i);
                    break;
                }
            }
        }
        let idle = self.pending.is_empty() && matches!(self.mode, Mode::Command);
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

    /// Tells the MTA goodbye when the agent ends a session itself.
    fn backend_quit(&mut self) {
        if !self.backend_lost {
            self.to_backend.extend_from_slice(b"QUIT\r\n");
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
        if let Some(i) = self.pending.iter().position(|p| p.reply.is_none()) {
            self.pending.truncate(i);
        }
        match self.mode {
            Mode::Data(_) | Mode::Bdat(_) => {} // answered at the end of the body
            _ => {
                self.push_local(BACKEND_LOST, Kind::Local, true);
                self.close_after_flush = Some(Close(Outcome::BackendError));
            }
        }
    }

    fn push_local(&mut self, text: &str, kind: Kind, close: bool) {
        let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(421);
        let reply = Reply::local(code, text.get(4..).unwrap_or(""));
        self.push_reply(kind, reply, close);
    }

    fn push_local_reply(&mut self, reply: Reply, close: bool) {
        self.push_reply(Kind::Local, reply, close);
    }

    fn push_reply(&mut self, kind: Kind, reply: Reply, close: bool) {
        let now = Instant::now();
        let hold = self.shared.policy.settle(&mut self.state, None, reply.code);
        if let Some(d) = hold {
            self.shared.metrics.delayed(d.reason, d.duration);
        }
        self.pending.push_back(Pending {
            kind,
            arrival: now,
            command_delay: None,
            from_backend: false,
            reply: Some(reply),
            release: release_at(now, now, hold),
            close,
        });
    }

    /// Queues a command sent to the MTA.
    fn push_command(&mut self, kind: Kind, line: &[u8], command_delay: Option<Delay>) {
        if !self.backend_lost {
            self.to_backend.extend_from_slice(line);
        }
        self.pending.push_back(Pending {
            kind,
            arrival: Instant::now(),
            command_delay,
            from_backend: true,
            reply: None,
            release: Instant::now(),
            close: false,
        });
        if self.backend_lost {
            // Nobody will answer: the 4xx goes out in its place.
            self.pending.pop_back();
            self.push_local(BACKEND_LOST, Kind::Local, true);
            self.close_after_flush = Some(Close(Outcome::BackendError));
        }
    }

    /// Consumes what the client sent, as far as the mode allows.
    fn process_client(&mut self) {
        loop {
            if self.close_after_flush.is_some() || self.pending.iter().any(|p| p.kind.is_barrier())
            {
                return;
            }
            match &mut self.mode {
                Mode::Data(scanner) => {
                    if self.client_buf.is_empty() {
                        return;
                    }
                    let end = scanner.scan(self.client_buf.peek());
                    let chunk = self.client_buf.take_raw(end.unwrap_or(usize::MAX));
                    if !self.backend_lost {
                        self.to_backend.extend_from_slice(&chunk);
                    }
                    if end.is_none() {
                        return;
                    }
                    self.mode = Mode::Command;
                    self.end_of_body(Kind::DataEnd);
                }
                Mode::Bdat(remaining) => {
                    if *remaining > 0 && self.client_buf.is_empty() {
                        return;
                    }
                    let want = usize::try_from(*remaining).unwrap_or(usize::MAX);
                    let chunk = self.client_buf.take_raw(want);
                    *remaining -= chunk.len() as u64;
                    if !self.backend_lost {
                        self.to_backend.extend_from_slice(&chunk);
                    }
                    if *remaining == 0 {
                        self.mode = Mode::Command;
                        if self.backend_lost {
                            self.end_of_body(Kind::Local);
                        }
                    }
                }
                Mode::AuthResponse => {
                    let Some(line) = self.client_buf.next_line() else {
                        return;
                    };
                    self.mode = Mode::Command;
                    match line {
                        Ok(line) => self.push_command(Kind::Auth, &line, None),
                        Err(LineError::TooLong(_)) => {
                            self.shared.metrics.limit_refused("line");
                            self.push_local("500 5.5.2 Error: line too long", Kind::Local, false);
                            // The MTA is still waiting for the response: cancel it.
                            self.push_command(Kind::Auth, b"*\r\n", None);
                        }
                    }
                }
                Mode::Command => {
                    let Some(line) = self.client_buf.next_line() else {
                        return;
                    };
                    match line {
                        Ok(line) => self.command(line),
                        Err(LineError::TooLong(_)) => {
                            self.shared.metrics.limit_refused("line");
                            self.push_local("500 5.5.2 Error: line too long", Kind::Local, false);
                        }
                    }
                }
            }
        }
    }

    /// End of a DATA body (or a BDAT body the MTA can no longer take).
    fn end_of_body(&mut self, kind: Kind) {
        if self.backend_lost {
            self.push_local(BACKEND_LOST, Kind::Local, true);
            self.close_after_flush = Some(Close(Outcome::BackendError));
            return;
        }
        let d = self.step(Step::DataEnd);
        self.push_command(kind, b"", d);
    }

    fn step(&mut self, step: Step<'_>) -> Option<Delay> {
        let policy = &self.shared.policy;
        policy.observe(&mut self.state, step);
        let delay = policy.command_delay(&mut self.state, step, self.last_auth, Instant::now());
        // No tarpit while the agent stops: the session should finish.
        delay.filter(|_| !crate::ops::shutdown::is_draining())
    }

    fn command(&mut self, line: Bytes) {
        let cmd = parse_command(&line);
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
                self.push_command(Kind::Helo, &line, d);
            }
            Command::Ehlo(name) => {
                crate::ops::summary::helo(&name);
                let d = self.step(Step::Helo(&name));
                self.push_command(Kind::Ehlo, &line, d);
            }
            Command::Mail(sender) => {
                let d = self.step(Step::Mail(&sender));
                self.push_command(Kind::Other, &line, d);
                self.sender = sender;
            }
            Command::Rcpt(rcpt) => {
                crate::ops::summary::rcpt();
                let d = self.step(Step::Rcpt);
                match self.rcpt_gate(&rcpt) {
                    Some(text) => self.push_local_held(&text, d),
                    None => self.push_command(Kind::Rcpt, &line, d),
                }
            }
            Command::Data => {
                let d = self.step(Step::Data);
                self.push_command(Kind::Data, &line, d);
            }
            Command::Bdat(Some((size, last))) => {
                let d = if last { self.step(Step::DataEnd) } else { None };
                // The last chunk's reply is the verdict on the message.
                let kind = if last { Kind::DataEnd } else { Kind::Other };
                self.push_command(kind, &line, d);
                if size > 0 {
                    self.mode = Mode::Bdat(size);
                }
            }
            Command::Bdat(None) => {
                self.push_local("501 5.5.4 Syntax: BDAT size [LAST]", Kind::Local, false);
            }
            Command::Rset => {
                let d = self.step(Step::Rset);
                self.push_command(Kind::Other, &line, d);
            }
            Command::Quit => self.push_command(Kind::Quit, &line, None),
            Command::Starttls => match (&self.shared.tls, self.client.is_tls()) {
                (_, true) => {
                    self.push_local("554 5.5.1 Error: TLS already active", Kind::Local, false)
                }
                (Some(_), false) => {
                    self.push_local("220 2.0.0 Ready to start TLS", Kind::StarttlsLocal, false)
                }
                (None, false) => self.push_command(Kind::StarttlsRelayed, &line, None),
            },
            Command::Auth(_) => self.push_command(Kind::Auth, &line, None),
            Command::ProxyOverride => self.push_local(
                "550 5.7.0 Error: insufficient authorization",
                Kind::Local,
                false,
            ),
            Command::Noop | Command::Other => {
                let d = self.step(Step::Other);
                self.push_command(Kind::Other, &line, d);
            }
        }
    }

    async fn flush_backend(&mut self) -> bool {
        if self.to_backend.is_empty() || self.backend_lost {
            self.to_backend.clear();
            return true;
        }
        let data = self.to_backend.split().freeze();
        if self.to_backend.capacity() > 64 * 1024 {
            self.to_backend = BytesMut::new();
        }
        self.backend.send(&data).await.is_ok()
    }

    /// Matches the MTA's replies to the oldest commands waiting for one.
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
            let now = Instant::now();
            let Some(p) = self
                .pending
                .iter_mut()
                .find(|p| p.from_backend && p.reply.is_none())
            else {
                if reply.code == 421 {
                    // The MTA ends the session (its own timeout, shutdown).
                    self.push_local_reply(reply, true);
                    self.close_after_flush = Some(Close(Outcome::BackendClosed));
                    self.backend_lost = true;
                } else {
                    debug!(client = %self.peer, code = reply.code, "reply without a command, dropped");
                }
                continue;
            };
            let reply = match p.kind {
                Kind::Ehlo => reply.rewrite_ehlo(match (&self.shared.tls, self.client.is_tls()) {
                    (Some(_), tls) => Some(!tls),
                    (None, true) => Some(false),
                    (None, false) => None,
                }),
                _ => reply,
            };
            let hold = self
                .shared
                .policy
                .settle(&mut self.state, p.command_delay, reply.code)
                .filter(|_| !crate::ops::shutdown::is_draining());
            if let Some(d) = hold {
                self.shared.metrics.delayed(d.reason, d.duration);
            }
            p.release = release_at(p.arrival, now, hold);
            if reply.code == 421 {
                p.close = true;
                self.close_after_flush = Some(Close(Outcome::BackendClosed));
            }
            p.reply = Some(reply);
        }
    }

    /// Sends every reply whose time has come, in order, and acts on it.
    async fn release_ready(&mut self) -> Option<Outcome> {
        let now = Instant::now();
        let mut out = BytesMut::new();
        let mut effects = Vec::new();
        while let Some(p) = self.pending.front() {
            if p.reply.is_none() || p.release > now {
                break;
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
        for (kind, code, close) in effects {
            if let Some(outcome) = self.after_reply(kind, code, close).await {
                return Some(outcome);
            }
        }
        // A barrier lifted may free buffered commands.
        if !self.client_buf.is_empty() && self.close_after_flush.is_none() {
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
            (Kind::Data, 354) => self.mode = Mode::Data(DotScanner::new()),
            (Kind::Auth, 334) => self.mode = Mode::AuthResponse,
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

    async fn start_tls(&mut self) -> Option<Outcome> {
        let acceptor = self.shared.tls.clone()?;
        if !self.client_buf.is_empty() {
            // Plaintext sent after STARTTLS would otherwise be taken as
            // commands inside TLS (CVE-2011-0411).
            warn!(client = %self.peer, bytes = self.client_buf.len(), "dropped bytes pipelined after STARTTLS");
            self.client_buf.clear();
        }
        let plain = std::mem::replace(&mut self.client, ClientStream::Closed);
        match timeout(self.shared.limits.idle, plain.upgrade(&acceptor)).await {
            Ok(Ok(tls)) => {
                self.client = tls;
                self.mode = Mode::Command;
                self.last_client_activity = Instant::now();
                None
            }
            _ => {
                debug!(client = %self.peer, "TLS handshake failed");
                self.backend_quit();
                let _ = self.flush_backend().await;
                Some(Outcome::ClientError)
            }
        }
    }

    async fn go_opaque(&mut self) -> Outcome {
        info!(client = %self.peer, "STARTTLS relayed to the MTA: the rest of the session is opaque");
        self.client_buf.clear();
        let to_client = self.backend.take_buffered();
        passthrough(self.shared, &mut self.client, &mut self.backend, to_client).await
    }
}

#[cfg(test)]
mod tests;
