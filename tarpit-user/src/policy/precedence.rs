//! Who is spared: the one precedence rule, read by [`super::Policy::decide`]
//! (through [`Precedence::excluded`] and friends) and by
//! [`super::Policy::explain`] (`tarpit ip`), so that the agent and the CLI
//! cannot disagree.
//!
//! In order, the first that applies wins:
//! 1. `allow`: the kernel allow list (admin or config entry), `allow.ips`
//!    or a DNS allow (DNSWL score, `allow.hosts` name), with
//!    `exclude.allowlisted` (the default). The kernel allow list also beats
//!    the block list in XDP, whatever `[exclude]` says.
//! 2. `block`: a kernel block list entry (XDP drops the client).
//! 3. `off`: `enabled = false`, the master switch: no tarpit rule applies.
//! 4. `internal`: `allow.internal`: never tarpitted, never blacklisted.
//! 5. `authenticated`: the client authenticated (in this session, or
//!    within 24 h with `helo.authenticated_once_per_day`), with
//!    `exclude.authenticated` (the default).
//! 6. everyone else is subject to the tarpit rules (DNSBL, blacklists,
//!    greylisting, delays).
//!
//! Greylisting spares a little more: every allow-listed or authenticated
//! client, whatever `[exclude]` says (a 4xx costs real mail a retry), and
//! so do the per-client connection limits for internal clients.
use std::net::IpAddr;

use ipnet::IpNet;

use super::facts::Facts;
use super::{Client, SessionState};
use crate::config::Config;

/// The networks and switches the precedence reads (`enabled`, `[exclude]`,
/// `[allow]`, `helo.authenticated_once_per_day`, `tls.implicit_ports`).
#[derive(Debug, Clone)]
pub struct Precedence {
    pub enabled: bool,
    pub exclude_allowlisted: bool,
    pub exclude_authenticated: bool,
    /// A recent AUTH spares the client's next sessions from their start
    /// (as sk_lookup steers it past the agent with bypass on).
    pub auth_spares_new_sessions: bool,
    pub allow_ips: Vec<IpNet>,
    pub internal: Vec<IpNet>,
    pub implicit_tls_ports: Vec<u16>,
}

/// Where a client stands, most decisive rule first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Allow(AllowedBy),
    Block,
    Off,
    Internal,
    Authenticated,
    /// The tarpit rules apply.
    Subject,
}

/// Which allow list spares the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowedBy {
    Kernel,
    Config,
    Dns,
}

impl Standing {
    /// No tarpit rule applies (delays, DNSBL actions, blacklists).
    pub fn spared(self) -> bool {
        !matches!(self, Standing::Subject | Standing::Block)
    }
}

/// What the precedence needs to know of a client, from a session's state
/// or from [`Facts`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Who {
    pub allowed_by: Option<AllowedBy>,
    pub blocked: bool,
    pub internal: bool,
    pub authenticated: bool,
}

fn contains(nets: &[IpNet], ip: IpAddr) -> Option<IpNet> {
    nets.iter().find(|n| n.contains(&ip)).copied()
}

impl Precedence {
    pub fn new(c: &Config) -> Precedence {
        Precedence {
            enabled: c.enabled,
            exclude_allowlisted: c.exclude.allowlisted,
            exclude_authenticated: c.exclude.authenticated,
            auth_spares_new_sessions: c.helo.authenticated_once_per_day && c.exclude.authenticated,
            allow_ips: c.allow.ips.clone(),
            internal: c.allow.internal.clone(),
            implicit_tls_ports: c.tls.implicit_ports.clone(),
        }
    }

    pub fn internal_net(&self, ip: IpAddr) -> Option<IpNet> {
        contains(&self.internal, ip)
    }

    pub fn allow_net(&self, ip: IpAddr) -> Option<IpNet> {
        contains(&self.allow_ips, ip)
    }

    /// THE rule: where `who` stands.
    pub fn standing(&self, who: &Who) -> Standing {
        match who.allowed_by {
            Some(by) if self.exclude_allowlisted => return Standing::Allow(by),
            // XDP passes a kernel allow entry even when it is blocked.
            Some(AllowedBy::Kernel) => {}
            _ if who.blocked => return Standing::Block,
            _ => {}
        }
        if !self.enabled {
            Standing::Off
        } else if who.internal {
            Standing::Internal
        } else if who.authenticated && self.exclude_authenticated {
            Standing::Authenticated
        } else {
            Standing::Subject
        }
    }

    /// A session's client as the precedence sees it.
    pub fn who(&self, s: &SessionState) -> Who {
        Who {
            allowed_by: s.client.allowlisted.then_some(AllowedBy::Config),
            blocked: false,
            internal: s.client.internal,
            authenticated: s.authenticated,
        }
    }

    /// `tarpit ip`'s client: every allow list, the block list, and an
    /// authentication the kernel remembers.
    pub fn who_of(&self, f: &Facts) -> Who {
        let ip = f.ip.map(|ip| ip.to_canonical());
        let allowed_by = if f.kernel_allow.is_some() {
            Some(AllowedBy::Kernel)
        } else if ip.and_then(|ip| self.allow_net(ip)).is_some() {
            Some(AllowedBy::Config)
        } else if matches!(f.dns, super::facts::Dns::Allowed(_)) {
            Some(AllowedBy::Dns)
        } else {
            None
        };
        Who {
            allowed_by,
            blocked: f.kernel_block.is_some(),
            internal: ip.and_then(|ip| self.internal_net(ip)).is_some(),
            // An AUTH entry spares new sessions only with the once-per-day
            // rule; without it the agent tarpits the client until it
            // authenticates in the session (which `tarpit ip` cannot see).
            authenticated: (f.auth_note.is_some() || f.last_auth.is_some())
                && self.auth_spares_new_sessions,
        }
    }

    /// No tarpit at all for this session (from now on).
    pub fn excluded(&self, s: &SessionState) -> bool {
        self.standing(&self.who(s)).spared()
    }

    /// Never greylisted: the master switch is off, or the client is
    /// internal, allow-listed (by IP or DNS) or authenticated, whatever
    /// `[exclude]` says.
    pub fn never_greylisted(&self, s: &SessionState) -> bool {
        !self.enabled || s.client.internal || s.client.allowlisted || s.authenticated
    }

    /// Not counted against the per-address and per-network connection
    /// limits: internal clients, and allow-listed ones the tarpit spares.
    pub fn limits_exempt(&self, c: &Client) -> bool {
        c.internal || (c.allowlisted && self.exclude_allowlisted)
    }

    /// Never blocked or slowed by the closed loop, whatever its offences:
    /// internal and allow-listed addresses (`allow.ips` or the kernel's
    /// list, `kernel_allow`), whatever `[exclude]` says. Names the reason.
    pub fn never_sanctioned(&self, ip: IpAddr, kernel_allow: bool) -> Option<&'static str> {
        let ip = ip.to_canonical();
        if self.internal_net(ip).is_some() {
            Some("internal")
        } else if kernel_allow || self.allow_net(ip).is_some() {
            Some("allow-listed")
        } else {
            None
        }
    }

    /// May take the reserved session slots: internal and allow-listed
    /// clients.
    pub fn may_use_reserve(&self, c: &Client) -> bool {
        c.internal || c.allowlisted
    }
}
