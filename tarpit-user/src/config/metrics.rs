//! `[metrics]`: the Prometheus endpoint.
use std::net::SocketAddr;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint serving `GET /metrics` in the
    /// OpenMetrics text format; absent = no endpoint. Keep it on loopback:
    /// the counters tell who is being tarpitted.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9325))),
        }
    }
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(a) = self.listen
            && a.port() == 0
        {
            return Err(ConfigError::invalid(
                "metrics.listen",
                "port 0 is not a TCP port",
            ));
        }
        Ok(())
    }
}
