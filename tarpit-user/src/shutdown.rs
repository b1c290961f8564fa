//! Graceful stop: the phases of the agent's stop, and the [`Shutdown`]
//! token handed down to the server and every session (mini-redis style:
//! no process-wide state; a token made outside an agent never fires).
//! The signals that start it are `ops::shutdown`'s.
//!
//! Three phases, broadcast to every session through a [`Shutdown`] token:
//! - `Running`: business as usual.
//! - `Draining` (SIGTERM received): the server stops accepting; a session
//!   still held in a tarpit delay (nothing of value in flight) answers
//!   `421 4.3.2 Service shutting down` at once and closes; a session
//!   already talking to the MTA carries on, so a message being sent
//!   finishes and is acknowledged by the MTA, not lost.
//! - `Closing` (the drain timeout is nearly up): every session still open
//!   sends 421 if it can and closes. Nothing the MTA acknowledged is lost:
//!   an unfinished message was never answered 250, so its client retries.
//!
//! [`ShutdownController::drain`] returns once every session is gone or the
//! timeout has passed, whichever comes first; the agent then exits.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Draining,
    Closing,
}

/// The reply a tarpitted session gives when the agent stops.
pub const SHUTDOWN_REPLY: &str = "421 4.3.2 Service shutting down, try again later\r\n";

#[derive(Debug, Default)]
struct Active {
    count: AtomicUsize,
    idle: Notify,
    /// Woken once when the drain starts, for [`drain_started`].
    drain: Notify,
}

/// What servers and sessions hold: cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    phase: watch::Receiver<Phase>,
    active: Arc<Active>,
}

impl Default for Shutdown {
    /// A token that never fires: for sessions run outside an agent (tests,
    /// tools).
    fn default() -> Self {
        ShutdownController::new().token()
    }
}

/// Counts one live session; dropping it ends the count.
#[derive(Debug)]
pub struct SessionGuard {
    active: Arc<Active>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.active.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.active.idle.notify_waiters();
        }
    }
}

impl Shutdown {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// True from SIGTERM on: stop accepting, release tarpitted sessions.
    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    /// Resolves when the agent starts to stop (at once if it has).
    pub async fn draining(&self) {
        self.reached(Phase::Draining).await
    }

    /// Resolves when the drain time is up and every session must close.
    pub async fn closing(&self) {
        self.reached(Phase::Closing).await
    }

    /// The drain signal as a bare waiter: it completes when the drain
    /// starts, if that happens after this call, so check
    /// [`Shutdown::is_draining`] after taking it. The smallest way to wait
    /// for the drain (no receiver, no async state): for the many sessions
    /// held in the greeting delay.
    pub fn drain_waiter(&self) -> Notified<'_> {
        self.active.drain.notified()
    }

    async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.clone();
        if rx.wait_for(|p| *p >= phase).await.is_err() {
            // No controller (a token made by `default()`, or the agent is
            // past its drain): this phase will never come.
            std::future::pending::<()>().await;
        }
    }

    /// Registers a session for the drain; hold the guard for its lifetime.
    pub fn session(&self) -> SessionGuard {
        self.active.count.fetch_add(1, Ordering::AcqRel);
        SessionGuard {
            active: self.active.clone(),
        }
    }

    /// Sessions currently registered.
    pub fn active(&self) -> usize {
        self.active.count.load(Ordering::Acquire)
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Sessions still open when `drain` returned (0 = all finished).
    pub remaining: usize,
    /// Whether the timeout cut the drain short.
    pub timed_out: bool,
}

/// Owned by the agent's life cycle: starts the phases and waits.
#[derive(Debug)]
pub struct ShutdownController {
    tx: watch::Sender<Phase>,
    token: Shutdown,
}

impl Default for ShutdownController {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownController {
    pub fn new() -> ShutdownController {
        let (tx, rx) = watch::channel(Phase::Running);
        ShutdownController {
            tx,
            token: Shutdown {
                phase: rx,
                active: Arc::new(Active::default()),
            },
        }
    }

    pub fn token(&self) -> Shutdown {
        self.token.clone()
    }

    fn advance(&self, phase: Phase) {
        let changed = self.tx.send_if_modified(|p| {
            if *p < phase {
                *p = phase;
                true
            } else {
                false
            }
        });
        if changed && phase >= Phase::Draining {
            // After the phase is visible: a waiter that saw `Running` was
            // registered before, so it is woken here.
            self.token.active.drain.notify_waiters();
        }
    }

    /// Enters `Draining`, waits for the sessions, enters `Closing` when
    /// little of `timeout` is left, and returns within `timeout`.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        self.advance(Phase::Draining);
        let start = Instant::now();
        // The last stretch is for closing: long enough for a 421 to be
        // written, short enough to stay inside the timeout.
        let close_grace = (timeout / 4).min(Duration::from_secs(1));
        let close_at = start + timeout.saturating_sub(close_grace);
        if self.wait_idle_until(close_at).await {
            return DrainReport {
                remaining: 0,
                timed_out: false,
            };
        }
        self.advance(Phase::Closing);
        let done = self.wait_idle_until(start + timeout).await;
        DrainReport {
            remaining: if done { 0 } else { self.token.active() },
            timed_out: true,
        }
    }

    /// True when no session is left before `deadline`.
    async fn wait_idle_until(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.token.active.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a guard dropped in between
            // still wakes us.
            notified.as_mut().enable();
            if self.token.active() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.token.active() == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn default_token_never_fires() {
        let t = Shutdown::default();
        assert_eq!(t.phase(), Phase::Running);
        let r = tokio::time::timeout(Duration::from_secs(3600), t.draining()).await;
        assert!(r.is_err(), "a default token must never drain");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waiters_taken_before_the_drain_are_woken_by_it() {
        let c = ShutdownController::new();
        let t = c.token();
        // Never polled before the drain, as a held session's may not be.
        let waiters: Vec<_> = (0..3).map(|_| t.drain_waiter()).collect();
        assert!(!t.is_draining());
        let r = c.drain(Duration::from_secs(30)).await;
        assert_eq!(r.remaining, 0);
        for w in waiters {
            tokio::time::timeout(Duration::ZERO, w)
                .await
                .expect("a waiter was not woken by the drain");
        }
        assert!(t.is_draining(), "a waiter taken now is answered by this");
        // Smaller than the receiver-based wait it replaces for held sessions.
        assert!(std::mem::size_of_val(&t.drain_waiter()) < std::mem::size_of_val(&t.draining()));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_without_sessions_returns_at_once() {
        let c = ShutdownController::new();
        let t = c.token();
        let start = Instant::now();
        let r = c.drain(Duration::from_secs(30)).await;
        assert_eq!(
            r,
            DrainReport {
                remaining: 0,
                timed_out: false
            }
        );
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(t.is_draining());
        assert_eq!(t.phase(), Phase::Draining);
    }

    #[tokio::test(start_paused = true)]
    async fn tarpitted_session_is_released_at_once_and_relaying_one_finishes() {
        let c = ShutdownController::new();
        let t = c.token();
        // a session held in a 60 s delay: leaves as soon as draining starts
        let tarpitted = {
            let t = t.clone();
            let guard = t.session();
            tokio::spawn(async move {
                let _guard = guard;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => "delay ran out",
                    _ = t.draining() => "421",
                }
            })
        };
        // a session in DATA with the MTA: needs 5 more seconds, is let finish
        let relaying = {
            let guard = t.session();
            tokio::spawn(async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_secs(5)).await;
                "250 from the MTA"
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(t.active(), 2);
        let start = Instant::now();
        let r = c.drain(Duration::from_secs(30)).await;
        assert_eq!(tarpitted.await.unwrap(), "421");
        assert_eq!(relaying.await.unwrap(), "250 from the MTA");
        assert!(!r.timed_out);
        assert_eq!(r.remaining, 0);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_session_is_told_to_close_inside_the_timeout() {
        let c = ShutdownController::new();
        let t = c.token();
        let stuck = {
            let t = t.clone();
            let guard = t.session();
            tokio::spawn(async move {
                let _guard = guard;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => "finished",
                    _ = t.closing() => "closed",
                }
            })
        };
        let start = Instant::now();
        let r = c.drain(Duration::from_secs(10)).await;
        // closing starts one second before the end, the session obeys
        assert_eq!(start.elapsed(), Duration::from_secs(9));
        assert_eq!(
            r,
            DrainReport {
                remaining: 0,
                timed_out: true
            }
        );
        assert_eq!(stuck.await.unwrap(), "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_ignores_closing_does_not_hold_the_stop() {
        let c = ShutdownController::new();
        let t = c.token();
        let _guard = t.session();
        let start = Instant::now();
        let r = c.drain(Duration::from_secs(2)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(
            r,
            DrainReport {
                remaining: 1,
                timed_out: true
            }
        );
        assert_eq!(t.phase(), Phase::Closing);
    }
}
