//! qmail-style greeting rules (`[greeting]`): the banner is held
//! (greetdelay), a client that talks before it gets `554` and is dropped
//! (pre-greet), and a `220-` teaser may go out at once.
use tokio::time::Duration;

use super::{Delay, Reason};
use crate::config::GreetingConfig;

/// The reply to a client that talked before the banner; the session
/// closes after it.
pub const PRE_GREET_REPLY: &str = "554 5.5.1 SMTP protocol violation";

/// `[greeting]`, compiled.
#[derive(Debug, Clone)]
pub struct Qmail {
    pub delay: Duration,
    pub drop_pre_greet: bool,
    pub teaser: Option<String>,
}

impl Qmail {
    pub fn new(c: &GreetingConfig) -> Qmail {
        Qmail {
            delay: c.delay,
            drop_pre_greet: c.drop_pre_greet,
            teaser: c.teaser.clone(),
        }
    }

    /// The banner's hold (before the session's budget).
    pub fn greeting_delay(&self) -> Option<Delay> {
        Delay::new(self.delay, Reason::Greeting)
    }

    /// Talking before the final `220 ` is a violation. Never on an
    /// implicit-TLS port: there the client speaks first (TLS hello).
    pub fn watch_pre_greet(&self, implicit_tls: bool) -> bool {
        self.drop_pre_greet && !implicit_tls
    }

    /// The text of the `220-` teaser line, if any (not on an
    /// implicit-TLS port).
    pub fn teaser(&self, implicit_tls: bool) -> Option<String> {
        if implicit_tls {
            None
        } else {
            self.teaser.clone()
        }
    }
}
