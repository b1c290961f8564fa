//! SecurityGateway's rules (`[helo]`, `[rcpt]`): the HELO delay (once a
//! day for addresses that authenticated, with
//! `helo.authenticated_once_per_day`), and the RCPT delay past a
//! threshold, growing by `rcpt.scaling`. The master switch and the
//! exclusions, SecurityGateway's too, are the precedence
//! ([`super::precedence`]), shared with `tarpit ip`.
use tokio::time::{Duration, Instant};

use super::{AUTH_TTL, Delay, Reason, SessionState};
use crate::config::{HeloConfig, MAX_DELAY, RcptConfig};

/// `[helo]` and `[rcpt]`, compiled.
#[derive(Debug, Clone)]
pub struct SecurityGateway {
    pub helo_delay: Duration,
    pub auth_once_per_day: bool,
    pub rcpt_threshold: u32,
    pub rcpt_delay: Duration,
    pub rcpt_scaling: f64,
}

impl SecurityGateway {
    pub fn new(helo: &HeloConfig, rcpt: &RcptConfig) -> SecurityGateway {
        SecurityGateway {
            helo_delay: helo.delay,
            auth_once_per_day: helo.authenticated_once_per_day,
            rcpt_threshold: rcpt.threshold,
            rcpt_delay: rcpt.delay,
            rcpt_scaling: rcpt.scaling,
        }
    }

    /// The HELO/EHLO hold: once per session (the EHLO after STARTTLS does
    /// not pay again), and not at all for an address that authenticated
    /// within a day when `authenticated_once_per_day` is on.
    pub fn helo_delay(
        &self,
        s: &mut SessionState,
        last_auth: Option<Instant>,
        now: Instant,
    ) -> Option<Delay> {
        let recently = last_auth.is_some_and(|t| now.saturating_duration_since(t) < AUTH_TTL);
        if s.helo_paid || (self.auth_once_per_day && recently) {
            None
        } else {
            s.helo_paid = true;
            Delay::new(self.helo_delay, Reason::Helo)
        }
    }

    /// The k-th RCPT of a session (1-based).
    pub fn rcpt_delay(&self, k: u32) -> Option<Delay> {
        if k <= self.rcpt_threshold {
            return None;
        }
        let beyond = f64::from(k - self.rcpt_threshold - 1);
        let factor = 1.0 + beyond * (self.rcpt_scaling - 1.0);
        let secs = (self.rcpt_delay.as_secs_f64() * factor).min(MAX_DELAY.as_secs_f64());
        Delay::new(Duration::from_secs_f64(secs), Reason::Rcpt)
    }
}
