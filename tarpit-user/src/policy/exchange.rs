//! Exchange's `TarpitTime` (`[reject]`): every 5xx reply, the MTA's or
//! the agent's own, is held `reject.delay`.
use tokio::time::Duration;

use super::{Delay, Reason};
use crate::config::RejectConfig;

/// `[reject]`, compiled.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub delay: Duration,
}

impl Exchange {
    pub fn new(c: &RejectConfig) -> Exchange {
        Exchange { delay: c.delay }
    }

    /// The hold of a reply with `code`.
    pub fn reply_delay(&self, code: u16) -> Option<Delay> {
        if (500..600).contains(&code) {
            Delay::new(self.delay, Reason::Reject)
        } else {
            None
        }
    }
}
