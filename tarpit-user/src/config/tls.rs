//! `[tls]`: STARTTLS terminated by the agent, so the policies keep working
//! inside TLS.
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. With `cert` and `key` set the agent answers
    /// STARTTLS itself; without them STARTTLS goes to the MTA and the rest
    /// of that session is relayed opaquely (no policy after it).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Ports where clients start with TLS (implicit TLS, "submissions"):
    /// never checked for pre-greet talk, since the client speaks first.
    /// With a certificate the agent terminates TLS on them; without one
    /// those sessions are relayed opaquely after the greeting delay.
    pub implicit_ports: Vec<u16>,
    /// With a certificate: AUTH is offered only after STARTTLS, and an AUTH
    /// sent in clear gets `538 5.7.11` without reaching the MTA (Postfix's
    /// `smtpd_tls_auth_only`), so no password crosses port 25 in clear.
    /// Without a certificate the MTA decides.
    pub auth_only: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            implicit_ports: vec![465],
            auth_only: true,
        }
    }
}

impl TlsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server_config().map(|_| ())
    }

    /// The rustls configuration, or `None` when no certificate is set.
    pub fn server_config(&self) -> Result<Option<Arc<ServerConfig>>, ConfigError> {
        let (cert, key) = match (&self.cert, &self.key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "tls.key",
                    "needed when tls.cert is set",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "tls.cert",
                    "needed when tls.key is set",
                ));
            }
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ConfigError::invalid("tls.cert", format!("{}: {e}", cert.display())))?;
        if certs.is_empty() {
            return Err(ConfigError::invalid(
                "tls.cert",
                format!("{}: no certificate in the file", cert.display()),
            ));
        }
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| ConfigError::invalid("tls.key", format!("{}: {e}", key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::invalid("tls.cert", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key_der)
            .map_err(|e| {
                ConfigError::invalid("tls.key", format!("does not fit the certificate: {e}"))
            })?;
        Ok(Some(Arc::new(config)))
    }
}
