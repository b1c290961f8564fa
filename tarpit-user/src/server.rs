//! Listeners, session limits and the hand-off of each client to a session.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{info, warn};

use crate::metrics::Outcome;
use crate::ops::summary::Tally;
use crate::session::park::Holder;
use crate::session::{self, Opened, Shared};

const TOO_MANY_SESSIONS: &[u8] = b"421 4.3.2 Too many sessions, try again later\r\n";
const TOO_MANY_PER_IP: &[u8] = b"421 4.7.0 Too many connections\r\n";

/// Sessions per client address, decremented when a session ends.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct PerIpGuard {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn try_enter(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<PerIpGuard> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(PerIpGuard {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut m = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A listener as `TcpListener::bind` makes it (SO_REUSEADDR, the system's
/// IPV6_V6ONLY default), with the configured queue instead of tokio's 1024.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The bound listeners of the agent.
pub struct Server {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
    /// Rebuilt on every config reload; each new session takes the latest.
    updates: Option<watch::Receiver<Arc<Shared>>>,
}

impl Server {
    /// Binds every address with a listen queue of `backlog`; any failure is
    /// an error naming the address.
    pub async fn bind(addrs: &[SocketAddr], backlog: u32, shared: Arc<Shared>) -> Result<Server> {
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
    /// stops (`crate::ops::shutdown`), which closes the listeners.
    pub async fn serve(self) {
        let updates = self
            .updates
            .unwrap_or_else(|| watch::channel(self.shared.clone()).1);
        let sessions = Arc::new(Semaphore::new(self.shared.limits.sessions));
        let per_ip = Arc::new(PerIp::default());
        let holder = Holder::start(crate::ops::shutdown::current());
        let mut tasks = tokio::task::JoinSet::new();
        for l in self.listeners {
            tasks.spawn(accept_loop(
                l,
                updates.clone(),
                sessions.clone(),
                per_ip.clone(),
                holder.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn accept_loop(
    l: TcpListener,
    updates: watch::Receiver<Arc<Shared>>,
    sessions: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
    holder: Holder,
) {
    let shutdown = crate::ops::shutdown::current();
    loop {
        let accepted = tokio::select! {
            r = l.accept() => r,
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
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
            shared.metrics.limit_refused("sessions");
            tokio::spawn(refuse(stream, TOO_MANY_SESSIONS, shared.clone()));
            continue;
        };
        let mut client = shared.policy.classify(peer.ip(), local.port());
        client.allowlisted |= crate::closed_loop::allowlisted(client.ip);
        let guard = if client.internal || (client.allowlisted && shared.policy.exclude_allowlisted)
        {
            None
        } else {
            match per_ip.try_enter(client.ip, shared.limits.per_ip) {
                Some(g) => Some(g),
                None => {
                    shared.metrics.limit_refused("per_ip");
                    drop(permit);
                    tokio::spawn(refuse(stream, TOO_MANY_PER_IP, shared.clone()));
                    continue;
                }
            }
        };
        let end = End {
            shared: shared.clone(),
            guard,
            permit,
            _counted: shutdown.session(),
        };
        tokio::spawn(serve_client(end, stream, peer, local, holder.clone()));
    }
}

/// What a session holds until it ends, and what ends it.
struct End {
    shared: Arc<Shared>,
    guard: Option<PerIpGuard>,
    permit: OwnedSemaphorePermit,
    _counted: crate::ops::shutdown::SessionGuard,
}

impl End {
    /// One summary line per session, whatever path it took; then the
    /// metrics and the limits let go of it.
    fn finish(self, peer: SocketAddr, outcome: Outcome, tally: &Tally) {
        crate::ops::summary::write(peer, tally, outcome.as_str());
        self.shared.metrics.sessions_active.dec();
        self.shared.metrics.session_ended(outcome);
        crate::closed_loop::session_ended(peer.ip(), outcome);
        drop(self.guard);
        drop(self.permit);
    }
}

/// One client: opened in this task; a client held in the greeting delay
/// is parked with `holder` and goes on in a new task when its wait ends,
/// so that while it waits it has no task and no future of its own.
async fn serve_client(
    end: End,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    holder: Holder,
) {
    end.shared.metrics.sessions_active.inc();
    // Boxed once here, so the task holds the session's future only once
    // and not again inside each wrapper's state.
    let opened = Box::pin(session::open(&end.shared, stream, peer, local));
    let (opened, tally) = crate::ops::summary::scope(opened).await;
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
                            crate::ops::summary::scope_from(kept.into_tally(), rest).await;
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

async fn refuse(mut stream: TcpStream, reply: &'static [u8], shared: Arc<Shared>) {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = stream.write_all(reply).await;
        let _ = stream.shutdown().await;
    })
    .await;
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
