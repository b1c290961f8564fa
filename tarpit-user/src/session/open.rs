//! Opening a session and holding it in the greeting delay: the client is
//! classified once ([`classify`]), the policy says what its connect means
//! (banner hold, teaser, pre-greet watch, DNS look-ups), and a held client
//! is handed back [`Opened::Held`] to be parked (`super::park`) or to wait
//! in its own task ([`Greeting::wait_here`]).
//!
//! The socket comes in as the server accepted it: a plain non-blocking
//! std socket, not registered with the runtime's reactor. It is
//! registered ([`register`]) only when the session must wait on it in a
//! task (a teaser to write, DNS look-ups to wait for, the banner and the
//! relay after the delay); a client that is parked, or that talked first
//! and gets its 554 at once, never is: that costs no `epoll_ctl` calls
//! of the runtime's.
use std::net::SocketAddr;
use std::task::Poll;

use tokio::io::{AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

use tracing::warn;

use super::park::{self, Woke};
use super::{SHUTTING_DOWN_LINE, Shared, after_hold, dns_gate, pregreet, say_and_close_std};
use crate::metrics::Outcome;
use crate::policy::{Event, SessionState};
use crate::shutdown::Shutdown;

/// How [`open`] left a session.
// `Held` is the common case (most clients are held bots), and boxing it
// would cost each of them an allocation; `Done` is rare and short-lived.
#[allow(clippy::large_enum_variant)]
pub enum Opened {
    /// It ended (or never had to wait, and ran to its end).
    Done(Outcome),
    /// It waits in the greeting delay: park it (`park::Holder`) or wait
    /// here ([`Greeting::wait_here`]), then [`Greeting::resume`] it. The
    /// socket is outside the runtime's reactor.
    Held(std::net::TcpStream, Greeting),
}

/// Puts a session's socket into the runtime's reactor, to wait on it in a
/// task (`TCP_NODELAY` set then: nothing the session wrote before, a
/// teaser or a last reply, waited for an ACK).
pub(super) fn register(stream: std::net::TcpStream) -> std::io::Result<TcpStream> {
    let s = TcpStream::from_std(stream)?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Takes a socket out of the runtime's reactor, to park it. `None` (not
/// seen in practice: deregistering a live socket) ends the session.
fn unregister(stream: TcpStream, peer: SocketAddr) -> Option<std::net::TcpStream> {
    match stream.into_std() {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(client = %peer, "cannot park a client: {e}");
            None
        }
    }
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

/// Who the client is, asked once per connection, before the server's
/// limits: the policy's facts (the config's networks, the kernel allow
/// list, when the address last authenticated) made into the session's
/// state, which the server hands to [`open`].
pub fn classify(shared: &Shared, peer: SocketAddr, local: SocketAddr) -> SessionState {
    let policy = &shared.policy;
    let mut facts = policy.facts(peer.ip(), local.port());
    let ip = facts.ip.unwrap_or(peer.ip());
    if shared.ports.allow.allowlisted(ip) {
        facts.kernel_allow = Some(ip.into());
    }
    if policy.wants_last_auth() {
        facts.last_auth = shared.ports.auth.last_authenticated(ip, Instant::now());
    }
    policy.session(&facts)
}

/// The start of a session (its client classified by [`classify`]): what
/// the policy makes of the connect (teaser, DNS look-ups, banner hold),
/// then, with look-ups, a wait for their verdict (it may let the client
/// through early). A session with a greeting delay left comes back
/// [`Opened::Held`]; one without runs to its end.
///
/// Everything past the delay (MTA, relay) or off the common path (teaser
/// write, pre-greet answer) is boxed: a future is as large as its largest
/// state, and this one is alive for every client being greeted.
pub async fn open(
    shared: &Shared,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    state: SessionState,
) -> Opened {
    let start = Instant::now();
    let mut greeting = Greeting {
        state,
        peer,
        local,
        rep: None,
        check_pre_greet: false,
        deadline: start,
    };
    let action = shared.policy.decide(&mut greeting.state, Event::Connect);
    greeting.rep = dns_gate::start(shared, greeting.state.client.ip, action.look_up);
    greeting.check_pre_greet = action.watch_pre_greet;
    if let Some(d) = action.hold {
        greeting.deadline += d.duration;
    }
    if let (Some(d), None, None) = (action.hold, &action.reply, &greeting.rep) {
        // The common case: held, nothing to write or wait for first.
        shared.metrics.delayed(d.reason, d.duration);
        if greeting.check_pre_greet
            && let Some(w) = park::peek(&stream)
        {
            // It talked (or left) already, as most pre-greet talkers do
            // by the time they are accepted: answered here, not parked
            // (as the holder would: the drain first).
            let w = if shared.shutdown.is_draining() {
                Woke::Drain
            } else {
                w
            };
            return Opened::Done(Box::pin(greeting.resume(shared, stream, w)).await);
        }
        return Opened::Held(stream, greeting);
    }
    if action.hold.is_none() && action.reply.is_none() {
        // No delay: on to the banner, registered once.
        return Opened::Done(Box::pin(greeting.resume(shared, stream, Woke::Due)).await);
    }
    let mut stream = match register(stream) {
        Ok(s) => s,
        Err(e) => {
            warn!(client = %peer, "cannot serve a client: {e}");
            return Opened::Done(Outcome::ClientError);
        }
    };
    if let Some(t) = action.reply {
        let teaser = format!("{t}\r\n");
        if Box::pin(stream.write_all(teaser.as_bytes())).await.is_err() {
            return Opened::Done(Outcome::ClientError);
        }
    }
    let Some(d) = action.hold else {
        return Opened::Done(Box::pin(greeting.resume_registered(shared, stream, Woke::Due)).await);
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
            Held::Known => {
                let dns = dns_gate::verdict(&mut greeting.rep).await;
                let a = shared
                    .policy
                    .decide(&mut greeting.state, Event::DnsKnown(&dns));
                a.exempt.then_some(Woke::Due)
            }
            Held::Woke(w) => Some(w),
        };
        if let Some(w) = woke {
            return Opened::Done(Box::pin(greeting.resume_registered(shared, stream, w)).await);
        }
    }
    match unregister(stream, peer) {
        Some(s) => Opened::Held(s, greeting),
        None => Opened::Done(Outcome::ClientError),
    }
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
    pub async fn wait_here(self, shared: &Shared, stream: std::net::TcpStream) -> Outcome {
        let stream = match register(stream) {
            Ok(s) => s,
            Err(_) => return Outcome::ClientError,
        };
        let woke = match hold(&shared.shutdown, &stream, self.deadline, &mut None).await {
            Held::Woke(w) => w,
            // Not without look-ups; were it, the wait is over all the same.
            Held::Known => Woke::Due,
        };
        self.resume_registered(shared, stream, woke).await
    }

    /// [`Greeting::resume`] for a socket in the runtime's reactor: a
    /// client whose turn came stays there; one to answer at once (421,
    /// 554) or to forget leaves it first.
    async fn resume_registered(self, shared: &Shared, stream: TcpStream, woke: Woke) -> Outcome {
        if woke == Woke::Due {
            return self.after_hold(shared, stream, false).await;
        }
        match unregister(stream, self.peer) {
            Some(s) => self.resume(shared, s, woke).await,
            None => Outcome::ClientError,
        }
    }

    /// The banner and what follows ([`after_hold`]); `seen`: the client
    /// talked during the delay (allowed: the pre-greet check is off).
    async fn after_hold(self, shared: &Shared, stream: TcpStream, seen: bool) -> Outcome {
        let Greeting {
            state,
            peer,
            local,
            rep,
            check_pre_greet,
            ..
        } = self;
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

    /// Goes on once the wait ended for `woke`: the drain answers 421, talk
    /// before the banner is judged (pre-greet), and a client whose turn
    /// came gets the MTA's banner. The socket is registered with the
    /// runtime only for the banner and what follows: a 421 or a 554 is
    /// written straight on it (`say_and_close_std`).
    pub async fn resume(
        mut self,
        shared: &Shared,
        stream: std::net::TcpStream,
        woke: Woke,
    ) -> Outcome {
        let mut seen = false;
        match woke {
            Woke::Due => {}
            Woke::Drain => {
                say_and_close_std(stream, SHUTTING_DOWN_LINE.as_bytes()).await;
                return Outcome::Shutdown;
            }
            Woke::Closed => return Outcome::ClientClosed,
            Woke::Error => return Outcome::ClientError,
            Woke::Talked => {
                seen = true;
                if self.check_pre_greet {
                    let talk = shared
                        .ports
                        .pregreet
                        .talked_first(self.peer, self.local, true);
                    if talk.talked() {
                        return pregreet::answer(shared, &mut self.state, stream, self.peer, talk)
                            .await;
                    }
                }
                // Talk is allowed here (the check is off): wait it out
                // without reading, the MTA will see the bytes.
                sleep_until(self.deadline).await;
            }
        }
        let stream = match register(stream) {
            Ok(s) => s,
            Err(e) => {
                warn!(client = %self.peer, "cannot take a parked client back: {e}");
                return Outcome::ClientError;
            }
        };
        self.after_hold(shared, stream, seen).await
    }
}

/// What ended a wait in the session's own task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    Woke(Woke),
    /// The DNS verdict is in: the policy says whether the wait goes on.
    Known,
}

/// Waits in the session's own task: until the deadline, the drain, the
/// client's talk or EOF, or (with look-ups) the DNS verdict.
///
/// One poll function instead of a `select!` over four futures: the socket
/// is watched with `poll_peek`, whose waker lives in the socket's own
/// registration, and the drain with one waiter on a shared `Notify`.
pub(super) async fn hold(
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
    let mut verdict = rep.as_mut().map(|h| {
        Box::pin(async move {
            h.verdict().await;
        })
    });
    std::future::poll_fn(|cx| {
        if drain.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Held::Woke(Woke::Drain));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Held::Woke(Woke::Due));
        }
        if let Some(v) = verdict.as_mut()
            && v.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Held::Known);
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
