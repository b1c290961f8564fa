//! Opening the client's connection to the MTA, paced
//! (`crate::backend::pace`): the session waits for a slot, counted in
//! `tarpit_mta_waiting`, for at most [`SLOT_WAIT`] (or the reply timeout
//! if shorter), then connects, counted in `tarpit_mta_connects_total`.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::timeout;

use super::Shared;
use crate::backend::pace::Slot;
use crate::backend::{Backend, BackendError};
use crate::metrics::Metrics;
use crate::smtp::Reply;

/// The longest a client waits for an MTA slot: RFC 5321's shortest
/// command timeout (MAIL, RCPT: 5 minutes).
const SLOT_WAIT: Duration = Duration::from_secs(300);

/// Counts one waiting client for as long as it lives.
struct Waiting<'a>(&'a Metrics);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.mta_waiting.dec();
    }
}

/// How long a client may wait for a slot.
pub(super) fn slot_wait(shared: &Shared) -> Duration {
    shared.backend.reply_timeout.min(SLOT_WAIT)
}

/// Waits for a pacing slot; `None` when the wait timed out.
pub(super) async fn slot(shared: &Shared) -> Option<Slot> {
    let limit = slot_wait(shared);
    let _waiting = shared.pacer.is_full().then(|| {
        shared.metrics.mta_waiting.inc();
        Waiting(&shared.metrics)
    });
    timeout(limit, shared.pacer.slot()).await.ok()
}

/// Opens the MTA connection with a slot in hand.
pub(super) async fn open_in(
    shared: &Shared,
    slot: Slot,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<(Backend, Reply), BackendError> {
    shared.metrics.mta_connects_total.inc();
    Box::pin(Backend::open_in(&shared.backend, slot, peer, local)).await
}

/// Waits for a slot, then opens the MTA connection.
pub(super) async fn open(
    shared: &Shared,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<(Backend, Reply), BackendError> {
    let Some(slot) = slot(shared).await else {
        return Err(BackendError::Timeout(slot_wait(shared)));
    };
    open_in(shared, slot, peer, local).await
}
