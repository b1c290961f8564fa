//! Clients in the greeting delay without a task of their own.
//!
//! Most clients of a tarpit are bots waiting for a banner that comes late,
//! and each of them held by its own task costs that task, its future, a
//! timer and a drain waiter. Parked here instead, a held client is its
//! socket, a slot, a waker and a timer entry, in one [`Holder`] task that
//! watches them all: one timer for the earliest deadline, one waiter for
//! the drain, and per socket the waker that the socket's readiness calls.
//! What ends the wait is the same as for a session waiting in place: the
//! deadline, the drain (SIGTERM), or bytes (pre-greet talk) or EOF from
//! the client, each seen at once. The holder then hands the socket back
//! ([`Woke`]) to the continuation the session left, which runs in a new
//! task.
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, sleep_until};

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
/// of the session (it runs inside the holder, which must not wait).
pub type Then = Box<dyn FnOnce(TcpStream, Woke) + Send>;

struct Park {
    stream: TcpStream,
    deadline: Instant,
    then: Then,
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

    /// Holds `stream` until `deadline`, the drain or the client's own
    /// move, then calls `then`.
    pub fn park(&self, stream: TcpStream, deadline: Instant, then: Then) {
        if let Err(mpsc::error::SendError(p)) = self.tx.send(Park {
            stream,
            deadline,
            then,
        }) {
            // The holding task is gone (the runtime stops): wait in a task
            // of its own rather than lose the client.
            tokio::spawn(async move {
                sleep_until(p.deadline).await;
                (p.then)(p.stream, Woke::Due);
            });
        }
    }
}

/// Sockets whose readiness changed, for the holder to look at.
struct Ready {
    keys: Mutex<Vec<usize>>,
    notify: Notify,
}

/// The waker a parked socket calls: names its slot.
struct SlotWaker {
    key: usize,
    ready: Arc<Ready>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // A stale wake (the slot was since reused) only costs a peek.
        lock(&self.ready.keys).push(self.key);
        self.ready.notify.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Slot {
    stream: TcpStream,
    then: Then,
    waker: Waker,
    /// Matches the slot's timer entry (slots are reused).
    seq: u64,
}

/// What the socket says, without reading: `None` while it has nothing.
fn peek(stream: &TcpStream, waker: &Waker) -> Option<Woke> {
    let mut probe = [0u8; 1];
    let mut buf = ReadBuf::new(&mut probe);
    match stream.poll_peek(&mut Context::from_waker(waker), &mut buf) {
        Poll::Pending => None,
        Poll::Ready(Ok(0)) => Some(Woke::Closed),
        Poll::Ready(Ok(_)) => Some(Woke::Talked),
        Poll::Ready(Err(_)) => Some(Woke::Error),
    }
}

/// The parked clients: slots, free keys, deadlines.
#[derive(Default)]
struct Parked {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    timers: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    seq: u64,
}

impl Parked {
    fn insert(&mut self, p: Park, ready: &Arc<Ready>) {
        let key = self.free.pop().unwrap_or(self.slots.len());
        let waker = Waker::from(Arc::new(SlotWaker {
            key,
            ready: ready.clone(),
        }));
        // The first peek registers the waker with the socket.
        if let Some(w) = peek(&p.stream, &waker) {
            // Only a key of an existing slot goes back on the free list.
            if key < self.slots.len() {
                self.free.push(key);
            }
            (p.then)(p.stream, w);
            return;
        }
        self.seq += 1;
        let slot = Slot {
            stream: p.stream,
            then: p.then,
            waker,
            seq: self.seq,
        };
        if key == self.slots.len() {
            self.slots.push(Some(slot));
        } else {
            self.slots[key] = Some(slot);
        }
        self.timers.push(Reverse((p.deadline, self.seq, key)));
    }

    fn release(&mut self, key: usize, woke: Woke) {
        if let Some(s) = self.slots.get_mut(key).and_then(Option::take) {
            self.free.push(key);
            (s.then)(s.stream, woke);
        }
    }

    fn release_due(&mut self, now: Instant) {
        while let Some(&Reverse((at, seq, key))) = self.timers.peek() {
            if at > now {
                return;
            }
            self.timers.pop();
            if self
                .slots
                .get(key)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.seq == seq)
            {
                self.release(key, Woke::Due);
            }
        }
    }

    fn check(&mut self, key: usize) {
        let woke = match self.slots.get(key).and_then(Option::as_ref) {
            Some(s) => peek(&s.stream, &s.waker),
            None => None,
        };
        if let Some(w) = woke {
            self.release(key, w);
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
    let ready = Arc::new(Ready {
        keys: Mutex::new(Vec::new()),
        notify: Notify::new(),
    });
    let mut parked = Parked::default();
    let drain = shutdown.drain_waiter();
    let sleep = sleep_until(Instant::now());
    tokio::pin!(drain, sleep);
    let (mut open, mut draining) = (true, false);
    loop {
        draining |= shutdown.is_draining();
        if draining {
            parked.release_all(Woke::Drain);
        }
        parked.release_due(Instant::now());
        let keys = std::mem::take(&mut *lock(&ready.keys));
        for key in keys {
            parked.check(key);
        }
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
                Some(p) => parked.insert(p, &ready),
                None => open = false,
            },
            _ = ready.notify.notified() => {}
            _ = &mut sleep, if timed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
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
            server,
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
        // The socket, the continuation, the waker, a sequence number; the
        // continuation's own size is the caller's.
        assert!(std::mem::size_of::<Option<Slot>>() <= 80);
    }
}
