//! `[kernel]`: where and how the eBPF programs attach.
use std::path::PathBuf;

use serde::Deserialize;
use tarpit_common::maps::MAX_SMTP_PORTS;

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
    /// Capacity of the per-address SYN counters.
    pub syn_count_entries: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    #[default]
    Auto,
    Driver,
    Skb,
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
            syn_count_entries: tarpit_common::maps::SYN_COUNT_ENTRIES,
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
        if !self.pin_path.is_absolute() {
            return Err(ConfigError::invalid(
                "kernel.pin_path",
                "must be an absolute path inside a bpffs mount",
            ));
        }
        if self.syn_count_entries == 0 {
            return Err(ConfigError::invalid(
                "kernel.syn_count_entries",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
