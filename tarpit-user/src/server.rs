//! Listeners, session limits and the hand-off of each client to a session.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::IpNet;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{info, warn};

use crate::metrics::Outcome;
use crate::metrics::summary::Tally;
use crate::policy::{Client, SessionState};
use crate::reputation::cache::network_of;
use crate::session::park::Holder;
use crate::session::{self, Opened, Shared};

const TOO_MANY_SESSIONS: &[u8] = b"421 4.3.2 Too many sessions, try again later\r\n";
const TOO_MANY_PER_IP: &[u8] = b"421 4.7.0 Too many connections\r\n";
const TOO_MANY_PER_PREFIX: &[u8] = b"421 4.7.0 Too many connections from your network\r\n";

/// Sessions per client address and per client network (IPv4 /24, IPv6
/// /64), decremented when a session ends. One lock for both, taken twice
/// per session: at accept and at the end.
#[derive(Default)]
struct PerClient(Mutex<Counts>);

#[derive(Default)]
struct Counts {
    ips: HashMap<IpAddr, usize>,
    nets: HashMap<IpNet, usize>,
}

/// Which limit refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    PerIp,
    PerPrefix,
    Sessions,
}

impl Refused {
    /// The label of `tarpit_limit_refusals_total`.
    fn label(self) -> &'static str {
        match self {
            Refused::PerIp => "per_ip",
            Refused::PerPrefix => "per_prefix",
            Refused::Sessions => "sessions",
        }
    }

    fn reply(self) -> &'static [u8] {
        match self {
            Refused::PerIp => TOO_MANY_PER_IP,
            Refused::PerPrefix => TOO_MANY_PER_PREFIX,
            Refused::Sessions => TOO_MANY_SESSIONS,
        }
    }
}

struct PerClientGuard {
    table: Arc<PerClient>,
    ip: IpAddr,
    net: IpNet,
}

/// `count` down by one, the entry gone at zero (the tables hold only
/// clients with sessions open).
fn leave<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            m.remove(k);
        }
    }
}

impl PerClient {
    /// Counts a session of `ip` unless its address already has `per_ip`
    /// or its network `per_net` (0 = no cap) sessions open.
    fn try_enter(
        self: &Arc<Self>,
        ip: IpAddr,
        per_ip: usize,
        per_net: usize,
    ) -> Result<PerClientGuard, Refused> {
        let net = network_of(ip);
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if c.ips.get(&ip).copied().unwrap_or(0) >= per_ip {
            return Err(Refused::PerIp);
        }
        if per_net != 0 && c.nets.get(&net).copied().unwrap_or(0) >= per_net {
            return Err(Refused::PerPrefix);
        }
        *c.ips.entry(ip).or_insert(0) += 1;
        *c.nets.entry(net).or_insert(0) += 1;
        Ok(PerClientGuard {
            table: self.clone(),
            ip,
            net,
        })
    }
}

impl Drop for PerClientGuard {
    fn drop(&mut self) {
        let mut c = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        leave(&mut c.ips, &self.ip);
        leave(&mut c.nets, &self.net);
    }
}

/// The global session slots: `limits.sessions` in all, of which
/// `limits.reserved_sessions` only internal and allow-listed clients may
/// take. Two semaphores, so that taking a slot never waits on a lock:
/// everyone draws from the open pool first, and only the site's own
/// clients may go on to the reserve when it is empty.
#[derive(Clone)]
struct Slots {
    open: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
}

impl Slots {
    fn new(sessions: usize, reserved: usize) -> Slots {
        let reserved = reserved.min(sessions);
        Slots {
            open: Arc::new(Semaphore::new(sessions - reserved)),
            reserve: Arc::new(Semaphore::new(reserved)),
        }
    }

    fn take(&self, privileged: bool) -> Option<OwnedSemaphorePermit> {
        match self.open.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) if privileged => self.reserve.clone().try_acquire_owned().ok(),
            Err(_) => None,
        }
    }
}

/// A listener as `TcpListener::bind` makes it (SO_REUSEADDR, the system's
/// IPV6_V6ONLY default, close-on-exec, non-blocking), with the configured
/// queue instead of tokio's 1024. A std listener: the agent binds as root
/// before its runtime starts (see `ops::privileges`); [`Server::serve`]
/// hands it to tokio.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// The bound listeners of the agent.
pub struct Server {
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    /// Rebuilt on every config reload; each new session takes the latest.
    updates: Option<watch::Receiver<Arc<Shared>>>,
}

impl Server {
    /// Binds every address with a listen queue of `backlog`; any failure is
    /// an error naming the address. Needs no runtime.
    pub fn bind(addrs: &[SocketAddr], backlog: u32, shared: Arc<Shared>) -> Result<Server> {
        let mut listeners = Vec::new();
        for a in addrs {
            let l = listen(*a, backlog)
                .with_context(|| format!("cannot listen on {a} (listen.addrs)"))?;
            info!(addr = %l.local_addr().unwrap_or(*a), "listening for SMTP clients");
            listeners.push(l);
        }
        Ok(Server {
            listeners,
            shared,
            updates: None,
        })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Takes each new session's shared state from `updates` (config
    /// reloads) instead of the one given to [`Server::bind`].
    pub fn with_updates(mut self, updates: watch::Receiver<Arc<Shared>>) -> Server {
        self.updates = Some(updates);
        self
    }

    /// Accepts clients until the returned future is dropped or the agent
    /// stops (the shared state's `shutdown`), which closes the listeners.
    pub async fn serve(self) {
        let updates = self
            .updates
            .unwrap_or_else(|| watch::channel(self.shared.clone()).1);
        let limits = &self.shared.limits;
        let slots = Slots::new(limits.sessions, limits.reserved());
        let per_client = Arc::new(PerClient::default());
        let holder = Holder::start(self.shared.shutdown.clone());
        let mut tasks = tokio::task::JoinSet::new();
        for l in self.listeners {
            // SAFETY: the `AsyncFd` owns the listener, whose descriptor
            // nothing else closes or replaces while it is registered.
            let l = match unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
            {
                Ok(l) => l,
                Err(e) => {
                    warn!("listener lost: {e}");
                    continue;
                }
            };
            tasks.spawn(accept_loop(
                l,
                updates.clone(),
                slots.clone(),
                per_client.clone(),
                holder.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Accepts one client as a non-blocking, close-on-exec std socket that
/// is not registered with the runtime's reactor: the session registers it
/// only if it has to wait on it in a task (see `session::open`), so a
/// client that is parked or dropped before its banner costs no
/// `epoll_ctl` calls of the runtime's.
async fn accept(
    l: &AsyncFd<std::net::TcpListener>,
) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = l.readable().await?;
        let r = ready.try_io(|l| {
            let (s, a) = socket2::SockRef::from(l.get_ref())
                .accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
            let peer = a.as_socket().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "not an IP peer")
            })?;
            Ok((std::net::TcpStream::from(s), peer))
        });
        if let Ok(r) = r {
            return r;
        }
    }
}

async fn accept_loop(
    l: AsyncFd<std::net::TcpListener>,
    updates: watch::Receiver<Arc<Shared>>,
    slots: Slots,
    per_client: Arc<PerClient>,
    holder: Holder,
) {
    // Every `Shared` carries the same stop token (reloads keep it).
    let shutdown = updates.borrow().shutdown.clone();
    loop {
        let accepted = tokio::select! {
            r = accept(&l) => r,
            // SIGTERM: stop accepting; the listener closes as this returns.
            _ = shutdown.draining() => return,
        };
        let shared = updates.borrow().clone();
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(_) => continue,
        };
        // Who the client is, asked once: the limits and the session
        // (every policy rule) see the same answer.
        let state = session::classify(&shared, peer, local);
        let (guard, permit) = match admit(&shared, &state.client, &slots, &per_client) {
            Ok(x) => x,
            Err(r) => {
                shared.metrics.limit_refused(r.label());
                tokio::spawn(refuse(stream, r.reply(), shared));
                continue;
            }
        };
        let end = End {
            shared: shared.clone(),
            guard,
            permit,
            _counted: shutdown.session(),
        };
        tokio::spawn(serve_client(
            end,
            stream,
            peer,
            local,
            state,
            holder.clone(),
        ));
    }
}

/// Takes what a new client needs to be served: a count against its
/// address and network (unless exempt, as internal and allow-listed
/// clients are), then a global slot (internal and allow-listed clients may
/// take the reserve). `Err` says which limit refused it.
fn admit(
    shared: &Shared,
    client: &Client,
    slots: &Slots,
    per_client: &Arc<PerClient>,
) -> Result<(Option<PerClientGuard>, OwnedSemaphorePermit), Refused> {
    let guard = if shared.policy.precedence.limits_exempt(client) {
        None
    } else {
        let l = &shared.limits;
        let per_net = if client.ip.is_ipv4() {
            l.per_ipv4_prefix
        } else {
            l.per_ipv6_prefix
        };
        Some(per_client.try_enter(client.ip, l.per_ip, per_net)?)
    };
    // The guard, if any, is dropped with the refusal.
    let permit = slots
        .take(shared.policy.precedence.may_use_reserve(client))
        .ok_or(Refused::Sessions)?;
    Ok((guard, permit))
}

/// What a session holds until it ends, and what ends it.
struct End {
    shared: Arc<Shared>,
    guard: Option<PerClientGuard>,
    permit: OwnedSemaphorePermit,
    _counted: crate::shutdown::SessionGuard,
}

impl End {
    /// One summary line per session, whatever path it took; then the
    /// metrics and the limits let go of it.
    fn finish(self, peer: SocketAddr, outcome: Outcome, tally: &Tally) {
        crate::metrics::summary::write(peer, tally, outcome.as_str());
        self.shared.metrics.sessions_active.dec();
        self.shared.metrics.session_ended(outcome);
        if let Some(o) = crate::policy::offenders::ended(outcome.as_str()) {
            self.shared.ports.offences.offence(peer.ip(), o);
        }
        drop(self.guard);
        drop(self.permit);
    }
}

/// One client: opened in this task; a client held in the greeting delay
/// is parked with `holder` and goes on in a new task when its wait ends,
/// so that while it waits it has no task and no future of its own.
async fn serve_client(
    end: End,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    state: SessionState,
    holder: Holder,
) {
    end.shared.metrics.sessions_active.inc();
    // Boxed once here, so the task holds the session's future only once
    // and not again inside each wrapper's state.
    let opened = Box::pin(session::open(&end.shared, stream, peer, local, state));
    let (opened, tally) = crate::metrics::summary::scope(opened).await;
    match opened {
        Opened::Done(outcome) => end.finish(peer, outcome, &tally),
        Opened::Held(stream, greeting) => {
            let deadline = greeting.deadline();
            let kept = Kept::new(tally);
            holder.park(
                stream,
                deadline,
                Box::new(move |stream, woke| {
                    tokio::spawn(async move {
                        let peer = greeting.peer();
                        let rest = Box::pin(greeting.resume(&end.shared, stream, woke));
                        let (outcome, tally) =
                            crate::metrics::summary::scope_from(kept.into_tally(), rest).await;
                        end.finish(peer, outcome, &tally);
                    });
                }),
            );
        }
    }
}

/// A session's tally while it is parked: nearly always the greeting delay
/// alone (nothing else happens before the banner), kept without the
/// `Tally`'s own allocation.
enum Kept {
    One(&'static str, u32, Duration),
    Full(Box<Tally>),
}

impl Kept {
    fn new(t: Tally) -> Kept {
        match t.delays.as_slice() {
            [(reason, n, d)] if t.helo.is_none() && t.rcpts == 0 => Kept::One(reason, *n, *d),
            _ => Kept::Full(Box::new(t)),
        }
    }

    fn into_tally(self) -> Tally {
        match self {
            Kept::One(reason, n, d) => Tally {
                delays: vec![(reason, n, d)],
                ..Tally::default()
            },
            Kept::Full(t) => *t,
        }
    }
}

async fn refuse(stream: std::net::TcpStream, reply: &'static [u8], shared: Arc<Shared>) {
    session::say_and_close_std(stream, reply).await;
    shared.metrics.session_ended(Outcome::Limit);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting_only() -> Tally {
        Tally {
            delays: vec![("greeting", 1, Duration::from_secs(300))],
            ..Tally::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_slash_64_is_capped_however_many_addresses_it_uses() {
        let t = Arc::new(PerClient::default());
        let mut held = Vec::new();
        for i in 0..5 {
            let a = ip(&format!("fd5b:1e00:0:1::{:x}", i + 1));
            held.push(t.try_enter(a, 2, 5).unwrap());
        }
        // A sixth address of the same /64: refused by the network's cap.
        assert_eq!(
            t.try_enter(ip("fd5b:1e00:0:1::ff"), 2, 5).err(),
            Some(Refused::PerPrefix)
        );
        // The per-address limit still holds inside the cap.
        let other = Arc::new(PerClient::default());
        let a = ip("fd5b:1e00:0:2::1");
        let g = (
            other.try_enter(a, 2, 5).unwrap(),
            other.try_enter(a, 2, 5).unwrap(),
        );
        assert_eq!(other.try_enter(a, 2, 5).err(), Some(Refused::PerIp));
        drop(g);
        // Another /64 is not affected; 0 means no cap.
        assert!(t.try_enter(ip("fd5b:1e00:0:3::1"), 2, 5).is_ok());
        assert!(t.try_enter(ip("fd5b:1e00:0:1::ff"), 2, 0).is_ok());
        // A session that ends gives its network a slot back, and the
        // tables forget clients with no session open.
        held.pop();
        assert!(t.try_enter(ip("fd5b:1e00:0:1::ff"), 2, 5).is_ok());
        drop(held);
        let c = t.0.lock().unwrap();
        assert!(c.ips.is_empty() && c.nets.is_empty());
    }

    #[test]
    fn ipv4_clients_count_per_slash_24() {
        let t = Arc::new(PerClient::default());
        let _a = t.try_enter(ip("198.51.100.1"), 1, 2).unwrap();
        let _b = t.try_enter(ip("198.51.100.2"), 1, 2).unwrap();
        assert_eq!(
            t.try_enter(ip("198.51.100.3"), 1, 2).err(),
            Some(Refused::PerPrefix)
        );
        assert!(t.try_enter(ip("198.51.101.3"), 1, 2).is_ok());
    }

    #[test]
    fn the_reserve_is_for_the_sites_own_clients() {
        let s = Slots::new(4, 2);
        let open: Vec<_> = (0..2).map(|_| s.take(false).unwrap()).collect();
        assert!(s.take(false).is_none(), "the open slots are taken");
        let r1 = s.take(true).expect("an internal client takes the reserve");
        let _r2 = s.take(true).unwrap();
        assert!(s.take(true).is_none(), "never more than sessions");
        drop(r1);
        assert!(s.take(false).is_none(), "a reserve slot stays reserved");
        assert!(s.take(true).is_some());
        drop(open);
        assert!(s.take(false).is_some());
    }

    #[test]
    fn a_parked_tally_comes_back_as_it_was() {
        for t in [
            greeting_only(),
            Tally::default(),
            Tally {
                helo: Some("bot".into()),
                rcpts: 2,
                delays: vec![("greeting", 1, Duration::from_secs(5))],
            },
        ] {
            assert_eq!(Kept::new(t.clone()).into_tally(), t);
        }
        assert!(matches!(Kept::new(greeting_only()), Kept::One(..)));
    }
}
