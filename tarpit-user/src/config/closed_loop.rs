//! `[offenders]` and `[bypass]`: the loop between kernel and agent.
//!
//! `[offenders]` turns what the kernel and the sessions see into XDP
//! blocks (repeat offenders) and TCP window clamps (first offences).
//! `[bypass]` steers trusted clients past the agent, straight to the MTA's
//! plain loopback listener, and keeps mail flowing when the agent is gone.
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use tarpit_common::steer::MAX_STEER_PORTS;

use super::ConfigError;

/// Longest block or slow-down a rule may impose (a week): an address
/// reassigned to a good sender must get its mail through eventually.
pub const MAX_OFFENDER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffendersConfig {
    /// Put repeat offenders on the XDP block list (false: only log them).
    pub enabled: bool,
    /// Pre-greet strikes (seen by the kernel) within `window` that block
    /// an address (0 = never for this offence).
    pub pregreet_strikes: u32,
    /// Sessions the agent dropped for policy (a DNSBL `drop`, a 5xx reply
    /// that ended the session; the pre-greet 554 excepted: that is already
    /// a strike) within `window` that block an address (0 = off).
    pub rejected_sessions: u32,
    /// Unknown recipients (RCPT answered `550 5.1.1`) within `window` that
    /// block an address as a directory harvester (0 = off).
    pub unknown_recipients: u32,
    /// How far back offences count.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long a block lasts. The kernel compares the expiry itself, so
    /// the block ends on time with or without the agent.
    #[serde(with = "humantime_serde")]
    pub block_ttl: Duration,
    /// Block every port of an offender, not only the SMTP ports.
    pub block_all_ports: bool,
    /// What a block does to the offender's connections to the SMTP ports:
    /// `drop` (XDP drops them: the bot retries and moves on within
    /// seconds) or `hold` (XDP answers with a zero window and keeps no
    /// socket: the bot waits minutes for a banner that never comes; Linux
    /// 6.0+, dropped elsewhere).
    pub action: OffenderAction,
    /// Addresses with offences below the block threshold get the kernel's
    /// TCP window clamp (`kernel.window_clamp`), so what they send crawls.
    pub slowdown: bool,
    /// How long a slow-down lasts.
    #[serde(with = "humantime_serde")]
    pub slowdown_ttl: Duration,
    /// How often the agent removes expired block, allow, authenticated and
    /// slow-down entries from the kernel's maps (the kernel ignores them
    /// already; this frees their room).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Addresses tracked at once; the stalest are forgotten beyond this.
    pub max_tracked: usize,
    /// Strikes of every address in one IPv6 network of this prefix length
    /// add up, and the block covers that network: a bot rotating through
    /// its /64 is one offender, not 2^64. 0 = off (per address), else
    /// 48..=128 (64 is the usual size of one site's network).
    pub aggregate_ipv6_prefix: u8,
    /// The same for IPv4 (e.g. 24); 0 = off, else 16..=32. Off by default
    /// also where IPv6 is on: many unrelated hosts share an IPv4 /24.
    pub aggregate_ipv4_prefix: u8,
}

impl Default for OffendersConfig {
    fn default() -> Self {
        OffendersConfig {
            enabled: true,
            pregreet_strikes: 3,
            rejected_sessions: 0,
            unknown_recipients: 0,
            window: Duration::from_secs(600),
            block_ttl: Duration::from_secs(3600),
            block_all_ports: false,
            action: OffenderAction::Drop,
            slowdown: true,
            slowdown_ttl: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(60),
            max_tracked: 100_000,
            aggregate_ipv6_prefix: 0,
            aggregate_ipv4_prefix: 0,
        }
    }
}

/// `offenders.action`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OffenderAction {
    #[default]
    Drop,
    Hold,
}

fn check_ttl(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::invalid(key, "must be longer than 0s"));
    }
    if d > MAX_OFFENDER_TTL {
        return Err(ConfigError::invalid(key, "must be at most 7 days"));
    }
    Ok(())
}

impl OffendersConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_ttl("offenders.window", self.window)?;
        check_ttl("offenders.block_ttl", self.block_ttl)?;
        check_ttl("offenders.slowdown_ttl", self.slowdown_ttl)?;
        if self.sweep_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "offenders.sweep_interval",
                "must be at least 1s",
            ));
        }
        if self.max_tracked == 0 {
            return Err(ConfigError::invalid(
                "offenders.max_tracked",
                "must be at least 1",
            ));
        }
        // Shorter prefixes would block whole providers for one bot.
        let p = self.aggregate_ipv6_prefix;
        if p != 0 && !(48..=128).contains(&p) {
            return Err(ConfigError::invalid(
                "offenders.aggregate_ipv6_prefix",
                "must be 0 (off) or between 48 and 128",
            ));
        }
        let p = self.aggregate_ipv4_prefix;
        if p != 0 && !(16..=32).contains(&p) {
            return Err(ConfigError::invalid(
                "offenders.aggregate_ipv4_prefix",
                "must be 0 (off) or between 16 and 32",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BypassConfig {
    /// Attach the sk_lookup program. Needs `mta_listeners`.
    pub enabled: bool,
    /// The MTA's plain listeners for steered connections, which carry no
    /// PROXY header: typically `127.0.0.1:10026` and `[::1]:10026` (see
    /// docs/loop.md for Postfix and Exim). The agent finds each listening
    /// socket in the MTA's process and takes a copy with pidfd_getfd(2)
    /// (root, or CAP_SYS_PTRACE). One IPv4 (or dual-stack) and one IPv6
    /// listener; IPv6 clients need the IPv6 (or a dual-stack) one.
    pub mta_listeners: Vec<SocketAddr>,
    /// Local ports whose connections are steered (the agent's SMTP ports;
    /// never an implicit-TLS port, whose clients the plain listener
    /// cannot serve).
    pub ports: Vec<u16>,
    /// Allow-listed (and internal) clients go straight to the MTA (only
    /// when `exclude.allowlisted` is on, else the agent must tarpit them).
    pub allowlisted: bool,
    /// Clients that authenticated within 24 h go straight to the MTA, when
    /// `helo.authenticated_once_per_day` is on (else they must still pay
    /// the HELO delay in the agent).
    pub authenticated: bool,
    /// With the agent gone (crashed, stopped, restarting), every client
    /// goes straight to the MTA: a dead agent never stops mail. Needs the
    /// programs to outlive the agent (`kernel.detach_on_exit = false`).
    pub fail_open: bool,
}

impl Default for BypassConfig {
    fn default() -> Self {
        BypassConfig {
            enabled: false,
            mta_listeners: Vec::new(),
            ports: vec![25],
            allowlisted: true,
            authenticated: true,
            fail_open: true,
        }
    }
}

impl BypassConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if self.mta_listeners.is_empty() {
            return Err(ConfigError::invalid(
                "bypass.mta_listeners",
                "the MTA's plain listener is needed when bypass.enabled is true",
            ));
        }
        let v4 = self.mta_listeners.iter().filter(|a| a.is_ipv4()).count();
        let v6 = self.mta_listeners.len() - v4;
        if v4 > 1 || v6 > 1 {
            return Err(ConfigError::invalid(
                "bypass.mta_listeners",
                "at most one IPv4 and one IPv6 listener",
            ));
        }
        if self.ports.is_empty() || self.ports.len() > MAX_STEER_PORTS {
            return Err(ConfigError::invalid(
                "bypass.ports",
                format!("between 1 and {MAX_STEER_PORTS} ports"),
            ));
        }
        if self.ports.contains(&0) {
            return Err(ConfigError::invalid(
                "bypass.ports",
                "port 0 is not a TCP port",
            ));
        }
        if self.ports.contains(&tarpit_common::maps::SMTPS_PORT) {
            return Err(ConfigError::invalid(
                "bypass.ports",
                "465 is implicit TLS: the MTA's plain listener cannot serve it",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn defaults_are_valid_and_bypass_is_off() {
        let c = Config::parse("").unwrap();
        assert!(c.offenders.enabled);
        assert_eq!(c.offenders.pregreet_strikes, 3);
        assert!(!c.bypass.enabled);
        assert_eq!(
            c.offenders.aggregate_ipv6_prefix, 0,
            "per address by default"
        );
        assert_eq!(c.offenders.aggregate_ipv4_prefix, 0);
    }

    #[test]
    fn aggregation_prefixes_are_bounded() {
        let c =
            Config::parse("[offenders]\naggregate_ipv6_prefix = 64\naggregate_ipv4_prefix = 24\n")
                .unwrap();
        assert_eq!(c.offenders.aggregate_ipv6_prefix, 64);
        assert_eq!(c.offenders.aggregate_ipv4_prefix, 24);
        for (text, key) in [
            (
                "aggregate_ipv6_prefix = 32",
                "offenders.aggregate_ipv6_prefix",
            ),
            (
                "aggregate_ipv6_prefix = 129",
                "offenders.aggregate_ipv6_prefix",
            ),
            (
                "aggregate_ipv4_prefix = 8",
                "offenders.aggregate_ipv4_prefix",
            ),
            (
                "aggregate_ipv4_prefix = 33",
                "offenders.aggregate_ipv4_prefix",
            ),
        ] {
            let e = Config::parse(&format!("[offenders]\n{text}\n")).unwrap_err();
            assert_eq!(e.key(), Some(key), "{text}: {e}");
        }
        assert!(Config::parse("[offenders]\naggregate_ipv6_prefix = -1\n").is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[offenders]\nblock_ttl = \"0s\"\n", "offenders.block_ttl"),
            ("[offenders]\nwindow = \"8days\"\n", "offenders.window"),
            (
                "[offenders]\nsweep_interval = \"0s\"\n",
                "offenders.sweep_interval",
            ),
            ("[bypass]\nenabled = true\n", "bypass.mta_listeners"),
            (
                "[bypass]\nenabled = true\nmta_listeners = [\"127.0.0.1:10026\", \"127.0.0.2:10026\"]\n",
                "bypass.mta_listeners",
            ),
            (
                "[bypass]\nenabled = true\nmta_listeners = [\"127.0.0.1:10026\"]\nports = [465]\n",
                "bypass.ports",
            ),
        ];
        for (text, key) in cases {
            let e = Config::parse(text).unwrap_err();
            assert_eq!(e.key(), Some(key), "{text}: {e}");
        }
        let c = Config::parse(
            "[bypass]\nenabled = true\nmta_listeners = [\"127.0.0.1:10026\", \"[::1]:10026\"]\n",
        )
        .unwrap();
        assert_eq!(c.bypass.ports, vec![25]);
    }
}
