//! `[kernel]`: where and how the eBPF programs attach, how big their maps
//! are, and the toggles the programs read live from their settings map.
use std::path::PathBuf;

use serde::Deserialize;
use tarpit_common::maps::{self as names, MAX_SMTP_PORTS};

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelConfig {
    /// Interfaces the XDP and tc programs attach to.
    pub interfaces: Vec<String>,
    /// Attach inside this named network namespace (`/var/run/netns/NAME`)
    /// instead of the agent's own; bpffs and cgroups stay the agent's.
    pub netns: Option<String>,
    /// TCP ports the kernel programs watch as SMTP.
    pub smtp_ports: Vec<u16>,
    /// bpffs directory where every map (and, with `detach_on_exit = false`,
    /// every link) is pinned.
    pub pin_path: PathBuf,
    /// Remove programs, links and pins when the agent exits.
    pub detach_on_exit: bool,
    /// XDP attach mode: "auto" (driver if the NIC supports it), "driver", "skb".
    pub xdp_mode: XdpModeSetting,
    /// How tc programs attach: "auto" (TCX links from Linux 6.6, netlink
    /// filters on a clsact qdisc below), "tcx" or "netlink".
    pub tc_attach: TcAttachSetting,
    /// cgroup v2 directory the sock_ops program attaches to; it sees the
    /// TCP sockets of every process in it and below.
    pub cgroup: PathBuf,
    /// Count live connections per address (sock_ops on `cgroup`).
    pub count_connections: bool,
    /// Flag clients that talk before the greeting (tc).
    pub pregreet: bool,
    /// Drop block-listed sources in XDP (false: count only).
    pub block: bool,
    /// Send rare events (pre-greet, block samples, map pressure) to the agent.
    pub events: bool,
    /// Kernel log lines for rare events, in the agent's log.
    pub log: bool,
    /// TCP window clamp in bytes for addresses marked for slow-down
    /// (0 = off; the kernel's floor is about 1 KiB).
    pub window_clamp: u32,
    /// Map capacities, applied when the maps are created (pinned maps keep
    /// the size they were made with until `tarpit detach`).
    pub syn_count_entries: u32,
    pub flow_entries: u32,
    pub ip_state_entries: u32,
    pub allow_entries: u32,
    /// The admin's block list (`tarpit block add`, the state file).
    pub block_entries: u32,
    /// Automatic blocks (repeat offenders), apart from the admin's list:
    /// when full, the agent evicts the oldest of them.
    pub auto_block_entries: u32,
    pub auth_entries: u32,
    pub slow_entries: u32,
    /// Size of the event ring buffer in bytes (a power of two, >= 4096).
    pub events_bytes: u32,
    /// Kernel hold (block entries that say `hold`): replies per second
    /// XDP sends to one source address, SYN-ACKs and ACKs together. A
    /// forged SYN flood with a held source gets no more than this.
    pub hold_rate_per_source: u32,
    /// Replies one source may get at once after a quiet spell.
    pub hold_burst_per_source: u32,
    /// Replies per second of the kernel hold in total, split evenly over
    /// the CPUs (each CPU keeps its own share).
    pub hold_rate_total: u32,
    /// Burst of the total, split the same way.
    pub hold_burst_total: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    #[default]
    Auto,
    Driver,
    Skb,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TcAttachSetting {
    #[default]
    Auto,
    Tcx,
    Netlink,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            interfaces: vec!["lo".to_string()],
            netns: None,
            smtp_ports: vec![25],
            pin_path: PathBuf::from("/sys/fs/bpf/tarpit"),
            detach_on_exit: false,
            xdp_mode: XdpModeSetting::Auto,
            tc_attach: TcAttachSetting::Auto,
            cgroup: PathBuf::from("/sys/fs/cgroup/unified"),
            count_connections: true,
            pregreet: true,
            block: true,
            events: true,
            log: true,
            window_clamp: 1024,
            syn_count_entries: names::SYN_COUNT_ENTRIES,
            flow_entries: names::FLOWS_ENTRIES,
            ip_state_entries: names::IP_STATE_ENTRIES,
            allow_entries: names::ALLOW_ENTRIES,
            block_entries: names::BLOCK_ENTRIES,
            auto_block_entries: names::AUTO_BLOCK_ENTRIES,
            auth_entries: names::AUTH_ENTRIES,
            slow_entries: names::SLOW_ENTRIES,
            events_bytes: names::EVENTS_BYTES,
            hold_rate_per_source: 20,
            hold_burst_per_source: 40,
            hold_rate_total: 20_000,
            hold_burst_total: 40_000,
        }
    }
}

impl KernelConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.smtp_ports.is_empty() {
            return Err(ConfigError::invalid(
                "kernel.smtp_ports",
                "at least one port is needed",
            ));
        }
        if self.smtp_ports.len() > MAX_SMTP_PORTS {
            return Err(ConfigError::invalid(
                "kernel.smtp_ports",
                format!("at most {MAX_SMTP_PORTS} ports can be watched"),
            ));
        }
        if self.smtp_ports.contains(&0) {
            return Err(ConfigError::invalid(
                "kernel.smtp_ports",
                "port 0 is not a TCP port",
            ));
        }
        for name in &self.interfaces {
            if name.is_empty() || name.len() >= libc::IF_NAMESIZE || name.contains('/') {
                return Err(ConfigError::invalid(
                    "kernel.interfaces",
                    format!("{name:?} is not a valid interface name"),
                ));
            }
        }
        if let Some(ns) = &self.netns
            && (ns.is_empty() || ns.len() >= 48 || ns.contains('/'))
        {
            return Err(ConfigError::invalid(
                "kernel.netns",
                "must be a namespace name under /var/run/netns (1-47 bytes, no '/')",
            ));
        }
        if !self.pin_path.is_absolute() {
            return Err(ConfigError::invalid(
                "kernel.pin_path",
                "must be an absolute path inside a bpffs mount",
            ));
        }
        if !self.cgroup.is_absolute() {
            return Err(ConfigError::invalid(
                "kernel.cgroup",
                "must be an absolute path of a cgroup v2 directory",
            ));
        }
        for (key, value) in [
            ("kernel.syn_count_entries", self.syn_count_entries),
            ("kernel.flow_entries", self.flow_entries),
            ("kernel.ip_state_entries", self.ip_state_entries),
            ("kernel.allow_entries", self.allow_entries),
            ("kernel.block_entries", self.block_entries),
            ("kernel.auto_block_entries", self.auto_block_entries),
            ("kernel.auth_entries", self.auth_entries),
            ("kernel.slow_entries", self.slow_entries),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
            if value > 1 << 26 {
                return Err(ConfigError::invalid(key, "must be at most 67108864"));
            }
        }
        if !self.events_bytes.is_power_of_two()
            || self.events_bytes < 4096
            || self.events_bytes > 1 << 30
        {
            return Err(ConfigError::invalid(
                "kernel.events_bytes",
                "must be a power of two between 4096 and 1073741824",
            ));
        }
        for (key, v) in [
            ("kernel.hold_rate_per_source", self.hold_rate_per_source),
            ("kernel.hold_burst_per_source", self.hold_burst_per_source),
            ("kernel.hold_rate_total", self.hold_rate_total),
            ("kernel.hold_burst_total", self.hold_burst_total),
        ] {
            if v == 0 || v > 1_000_000_000 {
                return Err(ConfigError::invalid(
                    key,
                    "must be between 1 and 1000000000 (block entries without `hold` send nothing)",
                ));
            }
        }
        if self.window_clamp > 1 << 30 {
            return Err(ConfigError::invalid(
                "kernel.window_clamp",
                "must be at most 1073741824 bytes",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn defaults_are_valid() {
        KernelConfig::default().validate().unwrap();
    }

    #[test]
    fn zero_sized_map_names_its_key() {
        let e = Config::parse("[kernel]\nflow_entries = 0\n").unwrap_err();
        assert!(e.to_string().contains("kernel.flow_entries"), "{e}");
    }

    #[test]
    fn automatic_blocks_have_their_own_size() {
        let c = Config::parse("[kernel]\nauto_block_entries = 16\n").unwrap();
        assert_eq!(c.kernel.auto_block_entries, 16);
        assert_eq!(c.kernel.block_entries, names::BLOCK_ENTRIES);
        let e = Config::parse("[kernel]\nauto_block_entries = 0\n").unwrap_err();
        assert!(e.to_string().contains("kernel.auto_block_entries"), "{e}");
    }

    #[test]
    fn ring_buffer_must_be_a_power_of_two() {
        let e = Config::parse("[kernel]\nevents_bytes = 5000\n").unwrap_err();
        assert!(e.to_string().contains("kernel.events_bytes"), "{e}");
        Config::parse("[kernel]\nevents_bytes = 8192\n").unwrap();
    }

    #[test]
    fn tc_attach_modes_parse() {
        let c = Config::parse("[kernel]\ntc_attach = \"netlink\"\n").unwrap();
        assert_eq!(c.kernel.tc_attach, TcAttachSetting::Netlink);
        assert!(Config::parse("[kernel]\ntc_attach = \"bogus\"\n").is_err());
    }

    #[test]
    fn relative_cgroup_is_refused() {
        let e = Config::parse("[kernel]\ncgroup = \"unified\"\n").unwrap_err();
        assert!(e.to_string().contains("kernel.cgroup"), "{e}");
    }
}
