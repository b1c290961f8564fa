//! `[listen]` and `[backend]`: where the agent takes clients and where the
//! real MTA is.
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Addresses the agent accepts SMTP clients on. `[::]:25` also serves
    /// IPv4 on Linux unless `net.ipv6.bindv6only` is set.
    pub addrs: Vec<SocketAddr>,
    /// Connections the kernel queues for each listener before the agent
    /// accepts them. Bots connect in bursts; a short queue makes their SYNs
    /// (and real senders' too) wait a retransmission (1 s, then 3 s...)
    /// for nothing. The kernel caps it at `net.core.somaxconn`.
    pub backlog: u32,
}

/// Default listen queue: `net.core.somaxconn`'s default since Linux 5.4.
pub const DEFAULT_BACKLOG: u32 = 4096;

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            backlog: DEFAULT_BACKLOG,
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
        if !(1..=65535).contains(&self.backlog) {
            return Err(ConfigError::invalid(
                "listen.backlog",
                format!("{} is out of range: use 1 to 65535", self.backlog),
            ));
        }
        Ok(())
    }
}

/// When the agent opens the client's connection to the MTA.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectMode {
    /// At the end of the greeting delay: the MTA speaks the banner and
    /// answers everything. For an MTA whose EHLO reply differs per client,
    /// which a probe cannot learn.
    AtConnect,
    /// At the first command that needs the MTA (MAIL, AUTH, VRFY, EXPN,
    /// ETRN, STARTTLS without a certificate): the agent speaks the banner,
    /// HELO/EHLO, NOOP, RSET, HELP and QUIT itself from what a probe
    /// connection learned, then replays the client's EHLO on the late
    /// connection. Bots that never start a transaction never cost the MTA
    /// a process. Not for an MTA whose EHLO reply differs per client
    /// (Postfix `smtpd_discard_ehlo_keyword_address_maps`). The default:
    /// a bot flood released from the greeting delay does not become a
    /// burst of MTA connections, and bots that quit after EHLO cost the
    /// MTA nothing.
    #[default]
    AtTransaction,
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

/// Where the real MTA listens for the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum MtaAddr {
    /// `host:port` (`127.0.0.1:10025`, `[::1]:10025`).
    Tcp(SocketAddr),
    /// `unix:/path`: a Unix-domain stream socket. An MTA on the same host
    /// (Postfix: an `smtpd` service of type `unix` in master.cf, with
    /// `smtpd_upstream_proxy_protocol = haproxy`) costs less per message
    /// this way: no second TCP connection to set up, carry and tear down
    /// for every client.
    Unix(PathBuf),
}

/// Longest Unix socket path: `sun_path` is 108 bytes with its NUL.
const MAX_UNIX_PATH: usize = 107;

impl TryFrom<String> for MtaAddr {
    type Error = String;
    fn try_from(s: String) -> Result<MtaAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "\"{s}\": a Unix socket path must be absolute (unix:/path)"
                ));
            }
            if path.len() > MAX_UNIX_PATH {
                return Err(format!(
                    "\"{s}\": a Unix socket path is at most {MAX_UNIX_PATH} bytes"
                ));
            }
            return Ok(MtaAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(MtaAddr::Tcp).map_err(|_| {
            format!(
                "\"{s}\" is neither host:port (an IP address and a port: 127.0.0.1:10025, \
                 [::1]:10025) nor unix:/path"
            )
        })
    }
}

impl fmt::Display for MtaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MtaAddr::Tcp(a) => write!(f, "{a}"),
            MtaAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl From<SocketAddr> for MtaAddr {
    fn from(a: SocketAddr) -> MtaAddr {
        MtaAddr::Tcp(a)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// The real MTA: `host:port` or `unix:/path` (see [`MtaAddr`]).
    pub addr: MtaAddr,
    pub client_address: ClientAddress,
    /// How long connecting to the MTA (and reading its banner) may take
    /// before the client gets `421 4.3.2`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long the MTA may take to answer one command (end of data
    /// included) before the client gets a 4xx. RFC 5321 asks clients to
    /// wait 10 minutes for the end-of-data reply.
    #[serde(with = "humantime_serde")]
    pub reply_timeout: Duration,
    /// The name the agent gives in its own EHLO before XCLIENT.
    pub helo_name: String,
    /// While the agent holds a reply, the MTA's session sits idle, and
    /// Postfix's default `smtpd_timeout` is 10 s under stress (exactly
    /// during a bot flood). Between commands the agent sends the MTA a
    /// `NOOP` this often during a hold, so its session outlives the hold.
    /// 0 = never (then `smtpd_timeout` must exceed every hold).
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// How long one write to the MTA may block (the MTA does not read)
    /// before the client gets a 4xx and both connections are closed.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// The MTA's implicit-TLS (wrapper-mode) listener, for clients on
    /// `tls.implicit_ports` when the agent has no certificate: their bytes
    /// are passed through to it untouched after the greeting delay. Unset:
    /// `addr`. With a certificate the agent terminates TLS itself and
    /// those clients go to `addr` in clear.
    pub implicit_tls_addr: Option<SocketAddr>,
    /// `"at-transaction"` (default) or `"at-connect"`: see [`ConnectMode`].
    pub connect: ConnectMode,
    /// With `at-transaction`: the banner text the agent speaks (after
    /// `220 `). Unset: the MTA's own, learned by the probe.
    pub banner: Option<String>,
    /// With `at-transaction`: how often the agent probes the MTA's banner
    /// and EHLO reply (also at start, on reload, and whenever a late
    /// connection shows a different EHLO reply).
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Connections to the MTA being opened at once (connect, PROXY or
    /// XCLIENT, banner); more wait their turn instead of flooding the
    /// MTA's listen queue.
    pub max_connecting: usize,
    /// Connections to the MTA open at once; clients beyond wait (their
    /// reply held) until one closes. 0 = no limit. Set it to the MTA's
    /// process limit (Postfix: `default_process_limit`, 100).
    pub max_sessions: usize,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            addr: MtaAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 10025))),
            client_address: ClientAddress::ProxyV2,
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(600),
            helo_name: "tarpit.localhost".to_string(),
            keepalive: Duration::from_secs(8),
            write_timeout: Duration::from_secs(60),
            implicit_tls_addr: None,
            connect: ConnectMode::AtTransaction,
            banner: None,
            probe_interval: Duration::from_secs(300),
            max_connecting: 64,
            max_sessions: 0,
        }
    }
}

impl BackendConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let MtaAddr::Tcp(a) = &self.addr
            && a.port() == 0
        {
            return Err(ConfigError::invalid(
                "backend.addr",
                "port 0 is not a TCP port",
            ));
        }
        if self.connect_timeout.is_zero() || self.connect_timeout > Duration::from_secs(300) {
            return Err(ConfigError::invalid(
                "backend.connect_timeout",
                "must be from 1ms to 300s",
            ));
        }
        if self.reply_timeout.is_zero() || self.reply_timeout > Duration::from_secs(3600) {
            return Err(ConfigError::invalid(
                "backend.reply_timeout",
                "must be from 1ms to 1h",
            ));
        }
        if self.keepalive > Duration::from_secs(300) {
            return Err(ConfigError::invalid(
                "backend.keepalive",
                "must be at most 300s (0 = off)",
            ));
        }
        if self.write_timeout.is_zero() || self.write_timeout > Duration::from_secs(600) {
            return Err(ConfigError::invalid(
                "backend.write_timeout",
                "must be from 1ms to 600s",
            ));
        }
        if self.implicit_tls_addr.is_some_and(|a| a.port() == 0) {
            return Err(ConfigError::invalid(
                "backend.implicit_tls_addr",
                "port 0 is not a TCP port",
            ));
        }
        if self.probe_interval < Duration::from_secs(1)
            || self.probe_interval > Duration::from_secs(86_400)
        {
            return Err(ConfigError::invalid(
                "backend.probe_interval",
                "must be from 1s to 24h",
            ));
        }
        if !(1..=100_000).contains(&self.max_connecting) {
            return Err(ConfigError::invalid(
                "backend.max_connecting",
                "must be from 1 to 100000",
            ));
        }
        if self.max_sessions > 1_000_000 {
            return Err(ConfigError::invalid(
                "backend.max_sessions",
                "must be at most 1000000 (0 = no limit)",
            ));
        }
        if let Some(b) = &self.banner
            && (b.is_empty()
                || b.len() > 400
                || !b.chars().all(|c| c == ' ' || c.is_ascii_graphic()))
        {
            return Err(ConfigError::invalid(
                "backend.banner",
                "must be 1 to 400 printable ASCII characters",
            ));
        }
        if self.helo_name.is_empty()
            || !self
                .helo_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_[]:".contains(c))
        {
            return Err(ConfigError::invalid(
                "backend.helo_name",
                "must be a host name or an address literal",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn lazy_connect_and_pacing_keys_are_checked() {
        let c = Config::parse(
            "[backend]\nconnect = \"at-transaction\"\nmax_sessions = 100\nbanner = \"mx.example ESMTP\"\n",
        )
        .unwrap();
        assert_eq!(c.backend.connect, super::ConnectMode::AtTransaction);
        assert_eq!(c.backend.max_sessions, 100);
        // The default is at-transaction; at-connect is chosen by name.
        assert_eq!(
            Config::parse("").unwrap().backend.connect,
            super::ConnectMode::AtTransaction
        );
        assert_eq!(
            Config::parse("[backend]\nconnect = \"at-connect\"\n")
                .unwrap()
                .backend
                .connect,
            super::ConnectMode::AtConnect
        );
        assert_eq!(c.backend.max_connecting, 64);
        for (bad, key) in [
            ("max_connecting = 0", "backend.max_connecting"),
            ("probe_interval = \"0s\"", "backend.probe_interval"),
            ("banner = \"\"", "backend.banner"),
            ("banner = \"a\\r\\nb\"", "backend.banner"),
            ("max_sessions = 2000000", "backend.max_sessions"),
        ] {
            let e = Config::parse(&format!("[backend]\n{bad}\n")).unwrap_err();
            assert_eq!(e.key(), Some(key), "{bad}: {e}");
        }
        assert!(Config::parse("[backend]\nconnect = \"later\"\n").is_err());
    }

    #[test]
    fn the_mta_is_host_port_or_an_absolute_unix_path() {
        use super::MtaAddr;
        let c =
            Config::parse("[backend]\naddr = \"unix:/var/spool/postfix/public/tarpit\"\n").unwrap();
        assert_eq!(
            c.backend.addr,
            MtaAddr::Unix("/var/spool/postfix/public/tarpit".into())
        );
        assert_eq!(
            c.backend.addr.to_string(),
            "unix:/var/spool/postfix/public/tarpit"
        );
        let c = Config::parse("[backend]\naddr = \"[::1]:10025\"\n").unwrap();
        assert_eq!(c.backend.addr, MtaAddr::Tcp("[::1]:10025".parse().unwrap()));
        let long = format!("unix:/{}", "a".repeat(107));
        for (bad, why) in [
            ("unix:relative/path", "absolute"),
            (long.as_str(), "at most 107 bytes"),
            ("localhost:25", "neither host:port"),
            ("127.0.0.1", "neither host:port"),
        ] {
            let e = Config::parse(&format!("[backend]\naddr = \"{bad}\"\n")).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("addr") && text.contains(why), "{bad}: {text}");
        }
        let e = Config::parse("[backend]\naddr = \"127.0.0.1:0\"\n").unwrap_err();
        assert_eq!(e.key(), Some("backend.addr"), "{e}");
    }

    #[test]
    fn backlog_defaults_to_somaxconn_and_is_range_checked() {
        let c = Config::parse("[listen]\naddrs = [\"127.0.0.1:2525\"]\n").unwrap();
        assert_eq!(c.listen.backlog, super::DEFAULT_BACKLOG);
        let c = Config::parse("[listen]\nbacklog = 512\n").unwrap();
        assert_eq!(c.listen.backlog, 512);
        for bad in ["0", "65536"] {
            let e = Config::parse(&format!("[listen]\nbacklog = {bad}\n")).unwrap_err();
            assert!(e.to_string().contains("listen.backlog"), "{e}");
        }
    }
}
