//! The configuration file: serde + TOML, validated once at load.
//!
//! Each section lives in its own module with its defaults and its checks.
//! Defaults are defined here and nowhere else (the shipped
//! `config/tarpit.toml` documents them). A bad file is refused with the
//! key path and the reason, by `tarpit check-config` and `tarpit run` alike.
mod error;
mod kernel;
mod net;
mod reputation;

use std::path::Path;

use serde::Deserialize;

pub use error::ConfigError;
pub use kernel::{KernelConfig, TcAttachSetting, XdpModeSetting};
pub use net::{BackendConfig, ClientAddress, ListenConfig};
pub use reputation::{
    DnsConfig, DnsblConfig, DnswlConfig, GreylistConfig, GreylistMode, parse_nameserver,
};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Master switch: `false` makes the agent a transparent proxy.
    pub enabled: bool,
    pub listen: ListenConfig,
    pub backend: BackendConfig,
    pub kernel: KernelConfig,
    pub dns: DnsConfig,
    pub dnsbl: DnsblConfig,
    pub dnswl: DnswlConfig,
    pub greylist: GreylistConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            listen: ListenConfig::default(),
            backend: BackendConfig::default(),
            kernel: KernelConfig::default(),
            dns: DnsConfig::default(),
            dnsbl: DnsblConfig::default(),
            dnswl: DnswlConfig::default(),
            greylist: GreylistConfig::default(),
        }
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(ConfigError::from_toml)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges, limits and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen.validate()?;
        self.backend.validate()?;
        self.kernel.validate()?;
        self.dns.validate()?;
        self.dnsbl.validate(&self.dnswl)?;
        self.greylist.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert!(c.enabled);
        assert_eq!(c.kernel.smtp_ports, vec![25]);
    }

    #[test]
    fn shipped_config_is_valid() {
        let text = include_str!("../../../config/tarpit.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.kernel.interfaces, vec!["lo".to_string()]);
        assert!(c.kernel.detach_on_exit);
        assert!(c.listen.addrs.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let e = Config::parse("[kernel]\nintrefaces = [\"lo\"]\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("intrefaces"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = Config::parse("[kernel]\nsmtp_ports = \"25\"\n").unwrap_err();
        assert!(e.to_string().contains("smtp_ports"), "{e}");
    }
}
