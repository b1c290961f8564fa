//! `[listen]` and `[backend]`: where the agent takes clients and where the
//! real MTA is.
use std::net::SocketAddr;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Addresses the agent accepts SMTP clients on. `[::]:25` also serves
    /// IPv4 on Linux unless `net.ipv6.bindv6only` is set.
    pub addrs: Vec<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
        }
    }
}

impl ListenConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.addrs.is_empty() {
            return Err(ConfigError::invalid(
                "listen.addrs",
                "at least one address is needed",
            ));
        }
        Ok(())
    }
}

/// How the backend MTA learns the real client address.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAddress {
    /// HAProxy PROXY protocol version 2 (binary).
    #[default]
    ProxyV2,
    /// HAProxy PROXY protocol version 1 (text).
    ProxyV1,
    /// Postfix's XCLIENT SMTP extension.
    Xclient,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// The real MTA.
    pub addr: SocketAddr,
    pub client_address: ClientAddress,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 10025)),
            client_address: ClientAddress::ProxyV2,
        }
    }
}

impl BackendConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.addr.port() == 0 {
            return Err(ConfigError::invalid(
                "backend.addr",
                "port 0 is not a TCP port",
            ));
        }
        Ok(())
    }
}
