//! The configuration file: serde + TOML, validated once at load.
//!
//! Each section lives in its own module with its defaults and its checks.
//! Defaults are defined here and nowhere else (the shipped
//! `config/tarpit.toml` documents them). A bad file is refused with the
//! key path and the reason, by `tarpit check-config` and `tarpit run` alike.
mod allow;
mod blacklist;
mod closed_loop;
mod cluster;
mod delays;
mod dns_lists;
mod error;
mod greeting;
mod helo;
mod kernel;
mod limits;
mod metrics;
mod net;
mod ops;
mod protocol;
mod rcpt;
mod reject;
mod reputation;
mod smtp;
mod state;
mod tls;
mod warnings;

use std::path::Path;

use serde::Deserialize;

pub use allow::{AllowConfig, ExcludeConfig};
pub use blacklist::BlacklistConfig;
pub use closed_loop::{BypassConfig, MAX_OFFENDER_TTL, OffenderAction, OffendersConfig};
pub use cluster::{
    ClusterConfig, DEFAULT_CLUSTER_TIMEOUT, DEFAULT_KEY_PREFIX, DEFAULT_TOMBSTONE_TTL,
    MAX_CLUSTER_TIMEOUT,
};
pub use delays::MAX_DELAY;
pub use dns_lists::{HostPattern, ListAction, ReplyFilter, Site, SiteError};
pub use error::ConfigError;
pub use greeting::GreetingConfig;
pub use helo::HeloConfig;
pub use kernel::{KernelConfig, TcAttachSetting, XdpModeSetting};
pub use limits::LimitsConfig;
pub use metrics::MetricsConfig;
pub use net::{BackendConfig, ClientAddress, ConnectMode, ListenConfig, MtaAddr};
pub use ops::{DaemonConfig, LogConfig, LogFormat, MAX_SHUTDOWN_TIMEOUT};
pub use protocol::{ProtocolConfig, TestAction};
pub use rcpt::RcptConfig;
pub use reject::RejectConfig;
pub use reputation::{
    DEFAULT_GREYLIST_STORE, DnsConfig, DnsblConfig, DnswlConfig, GreylistConfig, GreylistMode,
    OLD_DEFAULT_GREYLIST_STORE, parse_nameserver,
};
pub use smtp::{BareLineEnding, SmtpConfig};
pub use state::{DEFAULT_STATE_FILE, StateConfig};
pub use tls::TlsConfig;
pub use warnings::Warning;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Master switch: `false` makes the agent a transparent proxy.
    pub enabled: bool,
    pub listen: ListenConfig,
    pub backend: BackendConfig,
    pub kernel: KernelConfig,
    /// `[state]`: the file of run-time allow and block entries.
    pub state: StateConfig,
    pub greeting: GreetingConfig,
    pub helo: HeloConfig,
    pub rcpt: RcptConfig,
    pub reject: RejectConfig,
    pub blacklist: BlacklistConfig,
    pub exclude: ExcludeConfig,
    pub allow: AllowConfig,
    pub limits: LimitsConfig,
    pub smtp: SmtpConfig,
    /// `[protocol]`: postscreen's after-greeting tests.
    pub protocol: ProtocolConfig,
    pub tls: TlsConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub daemon: DaemonConfig,
    pub dns: DnsConfig,
    pub dnsbl: DnsblConfig,
    pub dnswl: DnswlConfig,
    pub greylist: GreylistConfig,
    /// `[offenders]`: repeat offenders into the XDP block list, slow-down.
    pub offenders: OffendersConfig,
    /// `[bypass]`: trusted clients straight to the MTA (sk_lookup), fail-open.
    pub bypass: BypassConfig,
    /// `[cluster]`: state shared with other MX hosts through Redis/Valkey;
    /// unset = none (every host on its own, as always).
    pub cluster: ClusterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            listen: ListenConfig::default(),
            backend: BackendConfig::default(),
            kernel: KernelConfig::default(),
            state: StateConfig::default(),
            greeting: GreetingConfig::default(),
            helo: HeloConfig::default(),
            rcpt: RcptConfig::default(),
            reject: RejectConfig::default(),
            blacklist: BlacklistConfig::default(),
            exclude: ExcludeConfig::default(),
            allow: AllowConfig::default(),
            limits: LimitsConfig::default(),
            smtp: SmtpConfig::default(),
            protocol: ProtocolConfig::default(),
            tls: TlsConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            daemon: DaemonConfig::default(),
            dns: DnsConfig::default(),
            dnsbl: DnsblConfig::default(),
            dnswl: DnswlConfig::default(),
            greylist: GreylistConfig::default(),
            offenders: OffendersConfig::default(),
            bypass: BypassConfig::default(),
            cluster: ClusterConfig::default(),
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
        self.state.validate()?;
        self.greeting.validate()?;
        self.helo.validate()?;
        self.rcpt.validate()?;
        self.reject.validate()?;
        self.blacklist.validate()?;
        self.allow.validate()?;
        self.limits.validate()?;
        self.smtp.validate()?;
        self.protocol.validate()?;
        self.tls.validate()?;
        self.tls.validate_listeners(&self.listen, &self.backend)?;
        self.metrics.validate()?;
        self.log.validate()?;
        self.daemon.validate()?;
        self.dns.validate()?;
        self.dnsbl.validate(&self.dnswl)?;
        self.greylist.validate()?;
        self.state
            .validate_with(&self.greylist, self.daemon.pid_file.as_deref())?;
        self.offenders.validate()?;
        self.bypass.validate()?;
        self.cluster.validate()?;
        Ok(())
    }

    /// What is valid but will cost real senders (holds past the time they
    /// wait for a reply): printed by `check-config`, logged by the agent.
    pub fn warnings(&self) -> Vec<Warning> {
        warnings::warnings(self)
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
    fn agent_defaults_follow_the_seed_systems() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.greeting.delay, std::time::Duration::from_secs(5));
        assert!(c.greeting.drop_pre_greet);
        assert_eq!(c.helo.delay, std::time::Duration::ZERO);
        assert_eq!(c.rcpt.threshold, 5);
        assert_eq!(c.rcpt.delay, std::time::Duration::from_secs(10));
        assert_eq!(c.rcpt.scaling, 1.0);
        assert_eq!(c.reject.delay, std::time::Duration::ZERO);
        assert_eq!(c.blacklist.delay, std::time::Duration::from_secs(60));
        assert!(c.exclude.allowlisted && c.exclude.authenticated);
        assert_eq!(c.allow.callout_senders, vec!["<>", "double-bounce@*"]);
    }

    #[test]
    fn delays_over_600s_are_refused_with_the_key() {
        for key in [
            "greeting.delay",
            "helo.delay",
            "rcpt.delay",
            "reject.delay",
            "blacklist.delay",
        ] {
            let (section, name) = key.split_once('.').unwrap();
            let e = Config::parse(&format!("[{section}]\n{name} = \"601s\"\n")).unwrap_err();
            assert_eq!(e.key(), Some(key), "{e}");
            assert!(e.to_string().contains("600s"), "{e}");
            Config::parse(&format!("[{section}]\n{name} = \"10m\"\n")).unwrap();
        }
    }

    #[test]
    fn bad_agent_values_name_their_key() {
        let cases = [
            ("[rcpt]\nscaling = 0.5\n", "rcpt.scaling"),
            ("[limits]\nline = 100\n", "limits.line"),
            ("[limits]\nsessions = 0\n", "limits.sessions"),
            ("[tls]\ncert = \"/nonexistent/cert.pem\"\n", "tls.key"),
            (
                "[tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n",
                "tls.cert",
            ),
            ("[blacklist]\nsenders = [\"a b\"]\n", "blacklist.senders"),
        ];
        for (text, key) in cases {
            let e = Config::parse(text).unwrap_err();
            assert_eq!(e.key(), Some(key), "{text}: {e}");
        }
        let e = Config::parse("[blacklist]\nips = [\"300.1.2.3/8\"]\n").unwrap_err();
        assert!(e.to_string().contains("ips"), "{e}");
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
