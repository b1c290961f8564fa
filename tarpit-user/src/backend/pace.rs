//! Pacing of connections to the MTA: at most `backend.max_connecting`
//! being opened and `backend.max_sessions` open at once. A tarpit releases
//! clients in bursts (a greeting delay ends for a whole flood at the same
//! instant); without pacing each burst lands in the MTA's listen queue at
//! once, overflows it and costs SYN retransmissions to everyone. Clients
//! beyond the limits wait here, their reply held, in arrival order
//! (tokio's semaphore is fair).
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits, shared by every session built from one config.
#[derive(Clone, Debug)]
pub struct Pacer {
    connecting: Arc<Semaphore>,
    sessions: Option<Arc<Semaphore>>,
}

/// The right to one MTA connection: its session slot (kept as long as the
/// connection lives) and, while it is being opened, a connecting slot.
#[derive(Debug, Default)]
pub struct Slot {
    session: Option<OwnedSemaphorePermit>,
    connecting: Option<OwnedSemaphorePermit>,
}

impl Slot {
    /// The connection is open: its connecting slot goes to the next one.
    pub fn opened(&mut self) {
        self.connecting = None;
    }

    /// Whether this slot still counts against `max_connecting`.
    pub fn is_connecting(&self) -> bool {
        self.connecting.is_some()
    }

    /// Whether this slot holds a session permit (`max_sessions` set).
    pub fn has_session(&self) -> bool {
        self.session.is_some()
    }
}

impl Pacer {
    /// `max_sessions` 0 is no limit.
    pub fn new(max_connecting: usize, max_sessions: usize) -> Pacer {
        Pacer {
            connecting: Arc::new(Semaphore::new(max_connecting.max(1))),
            sessions: (max_sessions > 0).then(|| Arc::new(Semaphore::new(max_sessions))),
        }
    }

    /// Whether a new connection would have to wait now.
    pub fn is_full(&self) -> bool {
        self.connecting.available_permits() == 0
            || self
                .sessions
                .as_ref()
                .is_some_and(|s| s.available_permits() == 0)
    }

    /// Waits for a session slot, then a connecting slot. Cancel-safe
    /// (dropping the future gives back what it took), but dropping it
    /// loses the place in the queue.
    pub async fn slot(&self) -> Slot {
        let mut slot = Slot::default();
        if let Some(s) = &self.sessions {
            // The semaphores are never closed: an error cannot happen,
            // and would only mean no limit.
            slot.session = s.clone().acquire_owned().await.ok();
        }
        slot.connecting = self.connecting.clone().acquire_owned().await.ok();
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sessions_and_connecting_are_bounded_and_freed() {
        let p = Pacer::new(2, 3);
        let mut a = p.slot().await;
        let b = p.slot().await;
        assert!(p.is_full(), "two connecting");
        a.opened();
        assert!(!p.is_full());
        let mut c = p.slot().await;
        c.opened();
        assert!(p.is_full(), "three sessions");
        let waiting = tokio::spawn({
            let p = p.clone();
            async move { p.slot().await }
        });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        drop(b);
        let d = waiting.await.unwrap();
        assert!(d.has_session() && d.is_connecting());
    }

    #[tokio::test]
    async fn zero_sessions_is_no_limit() {
        let p = Pacer::new(1, 0);
        let mut slots = Vec::new();
        for _ in 0..100 {
            let mut s = p.slot().await;
            s.opened();
            assert!(!s.has_session());
            slots.push(s);
        }
        assert!(!p.is_full());
    }
}
