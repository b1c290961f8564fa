//! Clients in the greeting delay without a task of their own, and
//! outside the runtime's reactor.
//!
//! Most clients of a tarpit are bots waiting for a banner that comes late,
//! and each of them held by its own task costs that task, its future, a
//! timer and a drain waiter; even parked, a tokio socket costs its
//! reactor registration (a 128-byte-aligned `ScheduledIo` behind an
//! `Arc`, a few hundred bytes with the allocator's share) and a waker.
//! Parked here instead, a held client is a plain file descriptor in an
//! epoll set of the [`Holder`]'s own, a slot (descriptor, continuation,
//! sequence number) and a timer entry; the holder task is woken through
//! the one registration of that epoll descriptor, plus one timer for the
//! earliest deadline and one waiter for the drain. What ends the wait is
//! the same as for a session waiting in place: the deadline, the drain
//! (SIGTERM), or bytes (pre-greet talk) or EOF from the client, each seen
//! at once. The holder then hands the socket back ([`Woke`]) to the
//! continuation the session left, which runs in a new task; a parked
//! socket was never in the runtime's reactor (the server accepts outside
//! it), and goes there only for the banner and what follows.
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::warn;

use crate::shutdown::Shutdown;

/// Why a parked client is handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// The client's turn has come (the delay is over, or DNS exempts it).
    Due,
    /// The agent stops: a held client leaves at once.
    Drain,
    /// The client sent something before the banner.
    Talked,
    /// The client closed its side.
    Closed,
    /// The socket failed.
    Error,
}

/// What to do with the socket once the wait ends; it should spawn the rest
/// of the session (it runs inside the holder, which must not wait). The
/// socket comes back as it was parked, a plain (non-blocking) std socket.
pub type Then = Box<dyn FnOnce(std::net::TcpStream, Woke) + Send>;

struct Park {
    stream: std::net::TcpStream,
    deadline: Instant,
    then: Then,
}

impl Park {
    /// Waits out the delay in a task of its own, as without the holder:
    /// the fallback when the holder cannot take the client (it is gone,
    /// or its epoll set refused the socket).
    fn wait_alone(self) {
        tokio::spawn(async move {
            sleep_until(self.deadline).await;
            (self.then)(self.stream, Woke::Due);
        });
    }
}

/// Hands clients to the holding task; cheap to clone.
#[derive(Clone)]
pub struct Holder {
    tx: mpsc::UnboundedSender<Park>,
}

impl Holder {
    /// Starts the holding task on the current runtime; it ends once every
    /// `Holder` is dropped and no client is left.
    pub fn start(shutdown: Shutdown) -> Holder {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(hold(rx, shutdown));
        Holder { tx }
    }

    /// Holds `stream` (non-blocking, outside the runtime's reactor) until
    /// `deadline`, the drain or the client's own move, then calls `then`.
    /// A session that had its socket in the reactor took it out before
    /// (`TcpStream::into_std`), and ended properly when that failed.
    pub fn park(&self, stream: std::net::TcpStream, deadline: Instant, then: Then) {
        if let Err(mpsc::error::SendError(p)) = self.tx.send(Park {
            stream,
            deadline,
            then,
        }) {
            // The holding task is gone (the runtime stops): wait in a task
            // of its own rather than lose the client.
            p.wait_alone();
        }
    }
}

/// Clients parked since the last trim that make a crowd worth a trim
/// ([`crate::heap::trim`]) ...
const TRIM_AFTER: usize = 1000;
/// ... once no client has been parked for this long.
const TRIM_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

/// What the socket says, without reading: `None` while it has nothing.
pub(super) fn peek(stream: &std::net::TcpStream) -> Option<Woke> {
    let mut probe = [0u8; 1];
    match stream.peek(&mut probe) {
        Ok(0) => Some(Woke::Closed),
        Ok(_) => Some(Woke::Talked),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => None,
        Err(_) => Some(Woke::Error),
    }
}

/// The holder's epoll set, pollable by the runtime through its descriptor.
struct Poller(Epoll);

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

/// What a parked socket is watched for: bytes, its peer's FIN, errors;
/// once (`EPOLLONESHOT`): after its first event the socket stays in the
/// set, disabled, until it is closed, so handing back a talker costs no
/// `EPOLL_CTL_DEL`. A client handed back at its deadline may still cause
/// one event later, whose token is stale and ignored.
fn interest() -> EpollFlags {
    EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT
}

/// An epoll event's data: the slot and its sequence number, so a stale
/// event (its slot since released) is never taken for another client.
fn token(key: usize, seq: u32) -> u64 {
    (u64::from(seq) << 32) | key as u64
}

fn untoken(data: u64) -> (usize, u32) {
    ((data & 0xffff_ffff) as usize, (data >> 32) as u32)
}

struct Slot {
    stream: std::net::TcpStream,
    then: Then,
    /// Matches the slot's timer entry and epoll token (slots are reused).
    seq: u32,
}

/// The parked clients: slots, free keys, deadlines. Their epoll set is
/// the caller's (the holder waits on it while this changes).
#[derive(Default)]
struct Parked {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    timers: BinaryHeap<Reverse<(Instant, u32, usize)>>,
    seq: u32,
}

impl Parked {
    fn insert(&mut self, ep: &Epoll, p: Park) {
        let key = self.free.pop().unwrap_or(self.slots.len());
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        if let Err(e) = ep.add(&p.stream, EpollEvent::new(interest(), token(key, seq))) {
            // Cannot watch it (out of kernel memory): it waits out its
            // delay in a task of its own, as without the holder.
            if key < self.slots.len() {
                self.free.push(key);
            }
            warn!("cannot park a client: {e}");
            p.wait_alone();
            return;
        }
        let slot = Slot {
            stream: p.stream,
            then: p.then,
            seq,
        };
        if key == self.slots.len() {
            self.slots.push(Some(slot));
        } else {
            self.slots[key] = Some(slot);
        }
        self.timers.push(Reverse((p.deadline, seq, key)));
    }

    fn release(&mut self, key: usize, woke: Woke) {
        if let Some(s) = self.slots.get_mut(key).and_then(Option::take) {
            self.free.push(key);
            // Left in the epoll set: one-shot, and gone when it closes.
            (s.then)(s.stream, woke);
        }
    }

    fn release_due(&mut self, now: Instant) {
        while let Some(&Reverse((at, seq, key))) = self.timers.peek() {
            if at > now {
                return;
            }
            self.timers.pop();
            if self.current(key, seq) {
                self.release(key, Woke::Due);
            }
        }
    }

    fn current(&self, key: usize, seq: u32) -> bool {
        self.slots
            .get(key)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.seq == seq)
    }

    /// Takes every event the epoll set has now and hands back the clients
    /// with news; `true` when the set was read empty.
    fn check_ready(&mut self, ep: &Epoll) -> bool {
        let mut events = [EpollEvent::empty(); 64];
        loop {
            let n = match ep.wait(&mut events, 0u8) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("parked clients: epoll_wait: {e}");
                    return true;
                }
            };
            for ev in &events[..n] {
                let (key, seq) = untoken(ev.data());
                if !self.current(key, seq) {
                    continue;
                }
                let Some(slot) = self.slots[key].as_ref() else {
                    continue;
                };
                match peek(&slot.stream) {
                    Some(w) => self.release(key, w),
                    None => {
                        // Woken with nothing to read (not seen, but not
                        // ruled out): watch it again, once.
                        let mut again = EpollEvent::new(interest(), token(key, seq));
                        if ep.modify(&slot.stream, &mut again).is_err() {
                            self.release(key, Woke::Error);
                        }
                    }
                }
            }
            if n < events.len() {
                return true;
            }
        }
    }

    fn release_all(&mut self, woke: Woke) {
        for key in 0..self.slots.len() {
            self.release(key, woke);
        }
        self.timers.clear();
    }

    /// Gives back the memory of a past crowd once nobody is parked.
    fn compact(&mut self) {
        if self.len() == 0 && !self.slots.is_empty() {
            self.slots = Vec::new();
            self.free = Vec::new();
            // Only stale entries are left (their slots are gone).
            self.timers = BinaryHeap::new();
        }
    }

    /// Clients parked now: every slot not on the free list.
    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }
}

async fn hold(mut rx: mpsc::UnboundedReceiver<Park>, shutdown: Shutdown) {
    let poller = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
        .map_err(std::io::Error::from)
        .and_then(|ep| {
            // SAFETY: `Poller` owns the epoll set's descriptor (the
            // `OwnedFd` inside `Epoll`), which nothing replaces or closes
            // while the `AsyncFd` lives, and `as_raw_fd` always returns it.
            unsafe { AsyncFd::register_with_interest(Poller(ep), Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
        }) {
        Ok(p) => p,
        Err(e) => {
            // No epoll set: every client waits in a task of its own.
            warn!("cannot make the parked clients' epoll set: {e}; held clients wait in tasks");
            while let Some(p) = rx.recv().await {
                p.wait_alone();
            }
            return;
        }
    };
    let ep = &poller.get_ref().0;
    let mut parked = Parked::default();
    let drain = shutdown.drain_waiter();
    let sleep = sleep_until(Instant::now());
    // Once a crowd has come in and the arrivals have stopped, the memory
    // its short-lived tasks used goes back to the kernel.
    let trim = sleep_until(Instant::now());
    let mut since_trim = 0usize;
    tokio::pin!(drain, sleep, trim);
    let (mut open, mut draining) = (true, false);
    loop {
        draining |= shutdown.is_draining();
        if draining {
            parked.release_all(Woke::Drain);
        }
        parked.release_due(Instant::now());
        if parked.len() == 0 {
            if !open {
                return;
            }
            parked.compact();
        }
        if let Some(at) = parked.next_deadline() {
            sleep.as_mut().reset(at);
        }
        let timed = parked.next_deadline().is_some();
        tokio::select! {
            _ = &mut drain, if !draining => draining = true,
            p = rx.recv(), if open => match p {
                Some(p) if draining => (p.then)(p.stream, Woke::Drain),
                Some(p) => {
                    parked.insert(ep, p);
                    since_trim += 1;
                    if since_trim >= TRIM_AFTER {
                        trim.as_mut().reset(Instant::now() + TRIM_QUIET);
                    }
                }
                None => open = false,
            },
            r = poller.readable() => match r {
                Ok(mut guard) => {
                    // Cleared only once the set was read empty: a wake
                    // that comes meanwhile is not lost.
                    if parked.check_ready(ep) {
                        guard.clear_ready();
                    }
                }
                Err(e) => warn!("parked clients: {e}"),
            },
            _ = &mut sleep, if timed => {}
            _ = &mut trim, if since_trim >= TRIM_AFTER => {
                since_trim = 0;
                tokio::task::spawn_blocking(crate::heap::trim);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;

    use super::*;
    use crate::shutdown::ShutdownController;

    /// Parks the server side of a fresh loopback connection; returns the
    /// client side and what the holder handed back, with when.
    async fn park(
        holder: &Holder,
        delay: Duration,
    ) -> (TcpStream, oneshot::Receiver<(Woke, Instant)>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (tx, rx) = oneshot::channel();
        holder.park(
            server.into_std().unwrap(),
            Instant::now() + delay,
            Box::new(move |_stream, woke| {
                let _ = tx.send((woke, Instant::now()));
            }),
        );
        (client, rx)
    }

    #[tokio::test(start_paused = true)]
    async fn clients_are_handed_back_at_their_own_deadlines() {
        let holder = Holder::start(Shutdown::default());
        let start = Instant::now();
        let (_a, a) = park(&holder, Duration::from_secs(30)).await;
        let (_b, b) = park(&holder, Duration::from_secs(10)).await;
        let (woke, at) = b.await.unwrap();
        assert_eq!(woke, Woke::Due);
        assert_eq!(at - start, Duration::from_secs(10));
        let (woke, at) = a.await.unwrap();
        assert_eq!(woke, Woke::Due);
        assert_eq!(at - start, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn talk_and_close_are_seen_before_the_deadline() {
        let holder = Holder::start(Shutdown::default());
        let start = Instant::now();
        let (mut talker, talked) = park(&holder, Duration::from_secs(30)).await;
        let (leaver, left) = park(&holder, Duration::from_secs(30)).await;
        let (_patient, patient) = park(&holder, Duration::from_secs(30)).await;
        talker.write_all(b"EHLO bot\r\n").await.unwrap();
        let (woke, at) = talked.await.unwrap();
        assert_eq!(woke, Woke::Talked);
        assert!(at - start < Duration::from_secs(30));
        drop(leaver);
        let (woke, at) = left.await.unwrap();
        assert_eq!(woke, Woke::Closed);
        assert!(at - start < Duration::from_secs(30));
        // The others' wakes do not disturb the patient one.
        assert_eq!(
            patient.await.unwrap(),
            (Woke::Due, start + Duration::from_secs(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_hands_back_every_client_at_once() {
        let c = ShutdownController::new();
        let holder = Holder::start(c.token());
        let start = Instant::now();
        let (_a, a) = park(&holder, Duration::from_secs(300)).await;
        let (_b, b) = park(&holder, Duration::from_secs(600)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        c.drain(Duration::from_secs(30)).await;
        for rx in [a, b] {
            assert_eq!(
                rx.await.unwrap(),
                (Woke::Drain, start + Duration::from_secs(5))
            );
        }
        // Parked after the drain began: handed back at once.
        let (_c, late) = park(&holder, Duration::from_secs(300)).await;
        assert_eq!(late.await.unwrap().0, Woke::Drain);
    }

    #[test]
    fn a_parked_client_is_small() {
        // A descriptor, the continuation, a sequence number; no waker and
        // no reactor registration. The continuation's own size is the
        // caller's.
        assert!(std::mem::size_of::<Option<Slot>>() <= 32);
    }
}
