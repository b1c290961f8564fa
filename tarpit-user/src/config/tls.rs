//! `[tls]`: STARTTLS terminated by the agent, so the policies keep working
//! inside TLS.
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;

use super::{BackendConfig, ClientAddress, ConfigError, ListenConfig};

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

    /// Without a certificate, clients on an implicit-TLS port are passed
    /// through to the MTA byte for byte: only a PROXY header can tell the
    /// MTA who they are, since XCLIENT is an SMTP command and the client's
    /// TLS handshake comes before any command.
    pub fn validate_listeners(
        &self,
        listen: &ListenConfig,
        backend: &BackendConfig,
    ) -> Result<(), ConfigError> {
        if self.cert.is_some() || backend.client_address != ClientAddress::Xclient {
            return Ok(());
        }
        match listen
            .addrs
            .iter()
            .map(|a| a.port())
            .find(|p| self.implicit_ports.contains(p))
        {
            Some(port) => Err(ConfigError::invalid(
                "backend.client_address",
                format!(
                    "XCLIENT is sent in-band and cannot precede the client's TLS handshake \
                     on implicit-TLS port {port}: use proxy-v2 or proxy-v1, or give the \
                     agent a certificate"
                ),
            )),
            None => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const XCLIENT_ON_465: &str = "[listen]\naddrs = [\"127.0.0.1:25\", \"127.0.0.1:465\"]\n\
                                  [backend]\nclient_address = \"xclient\"\n";

    #[test]
    fn xclient_is_refused_for_an_implicit_tls_port_without_a_certificate() {
        let e = Config::parse(XCLIENT_ON_465).unwrap_err();
        assert_eq!(e.key(), Some("backend.client_address"), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("implicit-TLS port 465"), "{msg}");
        assert!(msg.contains("proxy-v2"), "{msg}");
    }

    #[test]
    fn xclient_passes_where_no_listener_is_implicit_tls() {
        // 465 is no implicit port any more, or no listener is on one.
        Config::parse(&format!("{XCLIENT_ON_465}[tls]\nimplicit_ports = []\n")).unwrap();
        Config::parse(
            "[listen]\naddrs = [\"127.0.0.1:25\"]\n[backend]\nclient_address = \"xclient\"\n",
        )
        .unwrap();
        // A PROXY header precedes the handshake: fine on 465.
        Config::parse("[listen]\naddrs = [\"127.0.0.1:465\"]\n").unwrap();
    }

    #[test]
    fn xclient_passes_on_465_when_the_agent_terminates_tls() {
        // With a certificate the agent speaks SMTP to the MTA in clear.
        let mut c: Config = toml::from_str(XCLIENT_ON_465).unwrap();
        c.tls.cert = Some("/etc/ssl/cert.pem".into());
        c.tls.validate_listeners(&c.listen, &c.backend).unwrap();
        c.tls.cert = None;
        assert!(c.tls.validate_listeners(&c.listen, &c.backend).is_err());
    }
}
