//! What is known of a client: the one input of the precedence rule
//! ([`super::precedence`]), built by the agent's server at accept (and
//! completed by the session as DNS answers) and by `tarpit ip` from the
//! kernel's maps and the configuration.
use std::net::IpAddr;

use ipnet::IpNet;
use tokio::time::Instant;

use crate::config::ListAction;

/// Everything the precedence rule looks at, for one client.
///
/// The agent fills what it learns at accept ([`Facts::new`] then
/// [`Facts::kernel_allow`], [`Facts::last_auth`]) and later the DNS
/// verdict. `tarpit ip` fills the kernel's entries with their expiry in
/// words (`*_note`), for [`super::Policy::explain`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// The address, IPv4-mapped IPv6 taken as IPv4.
    pub ip: Option<IpAddr>,
    /// Connected to an implicit-TLS port (465): it speaks first.
    pub implicit_tls: bool,
    /// The kernel allow list entry that covers it (config and run-time
    /// entries; XDP, sk_lookup and the agent read the same list).
    pub kernel_allow: Option<IpNet>,
    /// An active kernel block list entry covering it (XDP drops it; the
    /// agent never sees such a client). Only `tarpit ip` fills it.
    pub kernel_block: Option<Blocked>,
    /// When it last authenticated, if within 24 h (the kernel's AUTH map
    /// or the agent's store).
    pub last_auth: Option<Instant>,
    /// `tarpit ip`: the AUTH map has an active entry; the text says until
    /// when ("" when unknown). The agent uses [`Facts::last_auth`].
    pub auth_note: Option<String>,
    /// What DNS says, once known.
    pub dns: Dns,
    /// What greylisting would answer.
    pub greylist: Grey,
    /// Pre-greet strikes the kernel remembers (only `tarpit ip` reads it).
    pub pregreet_strikes: u32,
    /// `tarpit ip`: its TCP window is clamped; the text says until when.
    pub clamped: Option<String>,
}

/// A kernel block list entry, described for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub net: IpNet,
    /// Why it was blocked (`manual` when nobody said).
    pub reason: String,
    /// "until in 2h" or "with no expiry".
    pub until: String,
    pub all_ports: bool,
    /// Held in the kernel (zero window, no socket) rather than dropped.
    pub hold: bool,
}

/// The DNS verdict (DNSBL/DNSWL scores, forward-confirmed host names).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Dns {
    /// Not asked, or not answered yet.
    #[default]
    Unknown,
    /// Asked: neither listed nor allow-listed (or the score's action is
    /// none).
    Clean,
    /// A DNSWL score or an `allow.hosts` name: allow-listed like `allow.ips`.
    Allowed(String),
    /// The DNSBL score reached `dnsbl.threshold`.
    Listed {
        score: i32,
        action: ListAction,
        /// The `reject` action's reply (names the lists).
        reply: String,
    },
}

/// What greylisting says about a client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Grey {
    /// Not asked (greylisting off, or no store at hand): in connect mode
    /// [`super::Policy::explain`] assumes the address did not pass.
    #[default]
    Unknown,
    /// Connect mode: the address passed before.
    Passed,
    /// Connect mode: the address would get `421 4.7.1` now.
    WouldGreylist,
}

impl Facts {
    /// The facts of a client that connected to `local_port`, with only its
    /// address known yet.
    pub fn new(ip: IpAddr, implicit_tls: bool) -> Facts {
        Facts {
            ip: Some(ip.to_canonical()),
            implicit_tls,
            ..Facts::default()
        }
    }
}
