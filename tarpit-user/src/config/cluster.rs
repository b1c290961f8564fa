//! `[cluster]`: several MX hosts sharing blocks and greylist through one
//! Redis or Valkey (`cluster` module, docs/cluster.md).
//!
//! Unset (no `url`) is the default and means today's behaviour exactly:
//! every host keeps its own files and nothing is ever sent anywhere.
//!
//! The password is never in this file: the config is world-readable
//! (`tarpit check-config`, backups, tickets), and whoever holds the
//! password can block or let through any address on every MX. It lives in
//! `password_file`, read once as root at start.
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// The default key prefix: every key and the channel start with it, so
/// one Redis can serve other tools (and an ACL can fence tarpit in).
pub const DEFAULT_KEY_PREFIX: &str = "tarpit:";
/// Look-ups and writes give up after this long by default: a slow Redis
/// must never show in an SMTP reply.
pub const DEFAULT_CLUSTER_TIMEOUT: Duration = Duration::from_millis(200);
/// The longest `timeout` accepted: beyond it a "short" look-up is not.
pub const MAX_CLUSTER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a deletion is remembered by default (tombstone TTL): longer
/// than any outage a node is expected to come back from with old entries.
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://host:port/db`, `rediss://...` (TLS) or `unix:///path`
    /// (a Redis on this host); absent = no cluster (unless `sentinels`).
    pub url: Option<String>,
    /// Instead of `url`: Redis Sentinels (`redis://host:26379`) that say
    /// which server is the master of `service` now, and fail over.
    pub sentinels: Vec<String>,
    /// The master's name at the Sentinels (`sentinel monitor NAME ...`).
    pub service: Option<String>,
    /// Instead of `url`: seed nodes of a Redis Cluster (`redis://h:7000`).
    pub nodes: Vec<String>,
    /// ACL user name (Redis 6+); absent = the default user.
    pub user: Option<String>,
    /// A file holding the password (first line), readable by root only.
    pub password_file: Option<PathBuf>,
    /// With `rediss://`: the CA certificates (PEM) that vouch for the
    /// server, instead of the system's trust store (a site's own CA).
    pub ca_file: Option<PathBuf>,
    /// Prefix of every key and of the change channel.
    pub key_prefix: String,
    /// This host's name in what it shares; default: the host name.
    pub node: Option<String>,
    /// Longest wait for one Redis operation before local state is used.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a deletion is kept in Redis, so that a node which was
    /// away does not bring the deleted entry back.
    #[serde(with = "humantime_serde")]
    pub tombstone_ttl: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            url: None,
            sentinels: Vec::new(),
            service: None,
            nodes: Vec::new(),
            user: None,
            password_file: None,
            ca_file: None,
            key_prefix: DEFAULT_KEY_PREFIX.to_string(),
            node: None,
            timeout: DEFAULT_CLUSTER_TIMEOUT,
            tombstone_ttl: DEFAULT_TOMBSTONE_TTL,
        }
    }
}

/// A name that goes into keys and log lines: printable ASCII, no spaces.
fn plain(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

impl ClusterConfig {
    /// Is a cluster configured?
    pub fn enabled(&self) -> bool {
        self.url.is_some() || !self.sentinels.is_empty() || !self.nodes.is_empty()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.nodes.is_empty() {
            if self.url.is_some() || !self.sentinels.is_empty() {
                return Err(ConfigError::invalid(
                    "cluster.nodes",
                    "give one of cluster.url, cluster.sentinels or cluster.nodes",
                ));
            }
            let tls = check_list("cluster.nodes", &self.nodes, "redis://10.0.0.5:7000")?;
            if self.service.is_some() {
                return Err(ConfigError::invalid(
                    "cluster.service",
                    "not used with cluster.nodes (it names a master at Sentinels)",
                ));
            }
            self.check_ca(tls, "cluster.nodes")?;
            return self.validate_common();
        }
        if !self.sentinels.is_empty() {
            if self.url.is_some() {
                return Err(ConfigError::invalid(
                    "cluster.sentinels",
                    "give either cluster.url (one Redis) or cluster.sentinels, not both",
                ));
            }
            let tls = check_list(
                "cluster.sentinels",
                &self.sentinels,
                "redis://10.0.0.5:26379",
            )?;
            match &self.service {
                Some(n) if !n.is_empty() && plain(n) => {}
                _ => {
                    return Err(ConfigError::invalid(
                        "cluster.service",
                        "needed with cluster.sentinels: the master's name at the Sentinels",
                    ));
                }
            }
            self.check_ca(tls, "cluster.sentinels")?;
            return self.validate_common();
        }
        if self.service.is_some() {
            return Err(ConfigError::invalid(
                "cluster.service",
                "needs cluster.sentinels",
            ));
        }
        let Some(url) = &self.url else {
            for (key, set) in [
                ("cluster.user", self.user.is_some()),
                ("cluster.password_file", self.password_file.is_some()),
                ("cluster.ca_file", self.ca_file.is_some()),
                ("cluster.node", self.node.is_some()),
            ] {
                if set {
                    return Err(ConfigError::invalid(
                        key,
                        "needs cluster.url (without it no cluster is used)",
                    ));
                }
            }
            return Ok(());
        };
        check_url(url)?;
        self.check_ca(url.starts_with("rediss://"), "cluster.url")?;
        self.validate_common()
    }

    /// Is the connection TLS? `rediss://` in `url`, or in every one of
    /// `sentinels` or `nodes` (mixing is refused by [`check_list`]).
    pub fn tls(&self) -> bool {
        let list = if !self.nodes.is_empty() {
            &self.nodes
        } else {
            &self.sentinels
        };
        match &self.url {
            Some(u) => u.starts_with("rediss://"),
            None => list.first().is_some_and(|u| u.starts_with("rediss://")),
        }
    }

    /// `ca_file` only with TLS (`tls`: the addresses of `key` are
    /// `rediss://`), as an absolute path.
    fn check_ca(&self, tls: bool, key: &str) -> Result<(), ConfigError> {
        let Some(p) = &self.ca_file else {
            return Ok(());
        };
        if !tls {
            return Err(ConfigError::invalid(
                "cluster.ca_file",
                format!("needs TLS: rediss:// addresses in {key}"),
            ));
        }
        if !p.is_absolute() {
            return Err(ConfigError::invalid(
                "cluster.ca_file",
                "must be an absolute path",
            ));
        }
        Ok(())
    }

    /// The keys that do not depend on how Redis is found.
    fn validate_common(&self) -> Result<(), ConfigError> {
        if let Some(user) = &self.user
            && (user.is_empty() || user.len() > 128 || !plain(user))
        {
            return Err(ConfigError::invalid(
                "cluster.user",
                "must be 1 to 128 printable characters without spaces",
            ));
        }
        if let Some(p) = &self.password_file
            && !p.is_absolute()
        {
            return Err(ConfigError::invalid(
                "cluster.password_file",
                "must be an absolute path",
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.len() > 64 || !plain(&self.key_prefix) {
            return Err(ConfigError::invalid(
                "cluster.key_prefix",
                "must be 1 to 64 printable characters without spaces (e.g. \"tarpit:\")",
            ));
        }
        if let Some(node) = &self.node
            && (node.is_empty() || node.len() > 64 || !plain(node))
        {
            return Err(ConfigError::invalid(
                "cluster.node",
                "must be 1 to 64 printable characters without spaces",
            ));
        }
        if self.timeout.is_zero() || self.timeout > MAX_CLUSTER_TIMEOUT {
            return Err(ConfigError::invalid(
                "cluster.timeout",
                format!(
                    "must be more than 0 and at most {} (it bounds how long an SMTP \
                     reply may wait for Redis)",
                    humantime::format_duration(MAX_CLUSTER_TIMEOUT)
                ),
            ));
        }
        if self.tombstone_ttl < Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "cluster.tombstone_ttl",
                "must be at least 1m: a shorter one lets a node that was away bring \
                 deleted entries back",
            ));
        }
        Ok(())
    }

    /// This node's name: `node`, or the host name.
    pub fn node_name(&self) -> String {
        if let Some(n) = &self.node {
            return n.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && plain(h))
            .unwrap_or_else(|| "tarpit".to_string())
    }

    /// Reads the CA certificates of `ca_file`; `None` without one.
    /// Called as root, before the privilege drop.
    pub fn read_ca(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(path) = &self.ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path).map_err(|e| {
            ConfigError::invalid(
                "cluster.ca_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            return Err(ConfigError::invalid(
                "cluster.ca_file",
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        Ok(Some(pem))
    }

    /// Reads the password (its first line) from `password_file`; `None`
    /// without one. Called as root, before the privilege drop.
    pub fn read_password(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::invalid(
                "cluster.password_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let pw = text.lines().next().unwrap_or("").to_string();
        if pw.is_empty() {
            return Err(ConfigError::invalid(
                "cluster.password_file",
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Some(pw))
    }
}

/// The addresses of `cluster.sentinels` or `cluster.nodes` (`key`): each
/// a `redis://` or `rediss://` (TLS) URL without a password, all of one
/// scheme (TLS to some servers and not to others would be a downgrade an
/// admin did not mean, and redis-rs takes one mode for all). Returns
/// whether they are TLS.
fn check_list(key: &str, list: &[String], example: &str) -> Result<bool, ConfigError> {
    let mut tls = None;
    for u in list {
        let this = if u.starts_with("rediss://") {
            true
        } else if u.starts_with("redis://") {
            false
        } else {
            return Err(ConfigError::invalid(
                key,
                format!("{u:?}: must be a redis:// or rediss:// (TLS) URL (e.g. {example})"),
            ));
        };
        if tls.is_some_and(|t| t != this) {
            return Err(ConfigError::invalid(
                key,
                "mixes redis:// and rediss://: give all of them rediss:// (TLS) or none \
                 (one TLS setting serves all the servers)",
            ));
        }
        tls = Some(this);
        check_url(u).map_err(|e| match e {
            ConfigError::Invalid { reason, .. } => ConfigError::invalid(key, reason),
            other => other,
        })?;
    }
    Ok(tls.unwrap_or(false))
}

/// The scheme must be one redis-rs speaks, and the URL must not carry a
/// password (or the config file would hold the secret it must not).
fn check_url(url: &str) -> Result<(), ConfigError> {
    let bad = |reason: &str| ConfigError::invalid("cluster.url", reason.to_string());
    let rest = if let Some(r) = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
    {
        r
    } else if let Some(path) = url.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(bad(
                "unix:// needs an absolute socket path (unix:///run/redis.sock)",
            ));
        }
        return Ok(());
    } else {
        return Err(bad(
            "must start with redis://, rediss:// (TLS) or unix:// (e.g. redis://10.0.0.5:6379)",
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Err(bad(
                "must not carry a password (the config file is readable by many); put it \
                 in cluster.password_file and the user in cluster.user",
            ));
        }
        return Err(bad(
            "must not carry a user name; set cluster.user (and cluster.password_file)",
        ));
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    if host.is_empty() {
        return Err(bad("has no host (e.g. redis://10.0.0.5:6379)"));
    }
    if url.contains("pass=") {
        return Err(bad(
            "must not carry a password; put it in cluster.password_file",
        ));
    }
    redis::parse_redis_url(url)
        .ok_or_else(|| bad("is not a URL redis-rs understands"))
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn err(text: &str) -> (Option<String>, String) {
        let e = Config::parse(text).unwrap_err();
        (e.key().map(str::to_string), e.to_string())
    }

    #[test]
    fn unset_is_off_and_changes_nothing() {
        let c = Config::parse("").unwrap();
        assert!(!c.cluster.enabled());
        assert_eq!(c.cluster.key_prefix, "tarpit:");
        assert_eq!(c.cluster.timeout, std::time::Duration::from_millis(200));
    }

    #[test]
    fn a_full_section_parses() {
        let c = Config::parse(
            "[cluster]\nurl = \"rediss://redis.example.net:6380/2\"\nuser = \"tarpit\"\n\
             password_file = \"/etc/tarpit/redis.pass\"\nca_file = \"/etc/tarpit/ca.pem\"\nkey_prefix = \"mx:\"\nnode = \"mx1\"\n\
             timeout = \"150ms\"\n",
        )
        .unwrap();
        assert!(c.cluster.enabled());
        assert_eq!(c.cluster.node_name(), "mx1");
        Config::parse("[cluster]\nurl = \"unix:///run/redis/redis.sock\"\n").unwrap();
        let c = Config::parse(
            "[cluster]\nsentinels = [\"redis://10.0.0.5:26379\", \"redis://10.0.0.6:26379\"]\n\
             service = \"tarpit\"\nuser = \"tarpit\"\n",
        )
        .unwrap();
        assert!(c.cluster.enabled());
        let c = Config::parse(
            "[cluster]\nnodes = [\"redis://10.0.0.5:7000\", \"redis://10.0.0.6:7000\"]\n",
        )
        .unwrap();
        assert!(c.cluster.enabled());
        Config::parse("[cluster]\nurl = \"redis://[fd5b:1e00::5]:6379\"\n").unwrap();
    }

    #[test]
    fn a_password_in_the_url_is_refused_naming_the_key_and_the_way_out() {
        for url in [
            "redis://tarpit:s3cret@10.0.0.5:6379",
            "redis://:s3cret@10.0.0.5",
            "rediss://u:p@h/0",
        ] {
            let (key, msg) = err(&format!("[cluster]\nurl = \"{url}\"\n"));
            assert_eq!(key.as_deref(), Some("cluster.url"), "{url}");
            assert!(msg.contains("password_file"), "{msg}");
            assert!(!msg.contains("s3cret"), "the secret is echoed: {msg}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("url = \"http://10.0.0.5\"", "cluster.url"),
            ("url = \"redis://\"", "cluster.url"),
            ("url = \"unix://run/redis.sock\"", "cluster.url"),
            ("url = \"redis://h\"\nuser = \"a b\"", "cluster.user"),
            (
                "url = \"redis://h\"\npassword_file = \"pw\"",
                "cluster.password_file",
            ),
            (
                "url = \"redis://h\"\nkey_prefix = \"\"",
                "cluster.key_prefix",
            ),
            ("url = \"redis://h\"\nnode = \"mx 1\"", "cluster.node"),
            ("url = \"redis://h\"\ntimeout = \"0s\"", "cluster.timeout"),
            ("url = \"redis://h\"\ntimeout = \"10s\"", "cluster.timeout"),
            (
                "url = \"redis://h\"\ntombstone_ttl = \"5s\"",
                "cluster.tombstone_ttl",
            ),
            (
                "url = \"redis://h\"\nca_file = \"/etc/ca.pem\"",
                "cluster.ca_file",
            ),
            (
                "url = \"rediss://h\"\nca_file = \"ca.pem\"",
                "cluster.ca_file",
            ),
            (
                "url = \"redis://h\"\nsentinels = [\"redis://s:26379\"]\nservice = \"t\"",
                "cluster.sentinels",
            ),
            ("sentinels = [\"redis://s:26379\"]", "cluster.service"),
            (
                "sentinels = [\"redis://u:p@s:26379\"]\nservice = \"t\"",
                "cluster.sentinels",
            ),
            (
                "sentinels = [\"s:26379\"]\nservice = \"t\"",
                "cluster.sentinels",
            ),
            ("url = \"redis://h\"\nservice = \"t\"", "cluster.service"),
            (
                "url = \"redis://h\"\nnodes = [\"redis://n:7000\"]",
                "cluster.nodes",
            ),
            ("nodes = [\"redis://:p@n:7000\"]", "cluster.nodes"),
            ("nodes = [\"n:7000\"]", "cluster.nodes"),
            (
                "nodes = [\"redis://n:7000\"]\nservice = \"t\"",
                "cluster.service",
            ),
            ("user = \"tarpit\"", "cluster.user"),
            ("node = \"mx1\"", "cluster.node"),
        ];
        for (body, key) in cases {
            let (k, msg) = err(&format!("[cluster]\n{body}\n"));
            assert_eq!(k.as_deref(), Some(key), "{body}: {msg}");
        }
    }

    #[test]
    fn tls_to_sentinels_and_cluster_nodes_is_rediss_with_a_ca_file() {
        let c = Config::parse(
            "[cluster]\nsentinels = [\"rediss://10.0.0.5:26380\", \"rediss://10.0.0.6:26380\"]\n\
             service = \"tarpit\"\nca_file = \"/etc/tarpit/ca.pem\"\n",
        )
        .unwrap();
        assert!(c.cluster.tls());
        let c = Config::parse(
            "[cluster]\nnodes = [\"rediss://10.0.0.5:7000\", \"rediss://10.0.0.6:7000\"]\n\
             ca_file = \"/etc/tarpit/ca.pem\"\n",
        )
        .unwrap();
        assert!(c.cluster.tls());
        // Without ca_file: the system's trust store.
        let c = Config::parse("[cluster]\nnodes = [\"rediss://10.0.0.5:7000\"]\n").unwrap();
        assert!(c.cluster.tls());
        let c = Config::parse("[cluster]\nnodes = [\"redis://10.0.0.5:7000\"]\n").unwrap();
        assert!(!c.cluster.tls());
    }

    #[test]
    fn tls_mistakes_with_sentinels_and_nodes_name_the_key_and_the_reason() {
        let cases = [
            (
                "sentinels = [\"rediss://s:26380\", \"redis://t:26379\"]\nservice = \"t\"",
                "cluster.sentinels",
                "mixes redis:// and rediss://",
            ),
            (
                "nodes = [\"redis://n:7000\", \"rediss://m:7000\"]",
                "cluster.nodes",
                "mixes redis:// and rediss://",
            ),
            (
                "sentinels = [\"redis://s:26379\"]\nservice = \"t\"\nca_file = \"/etc/ca.pem\"",
                "cluster.ca_file",
                "needs TLS: rediss:// addresses in cluster.sentinels",
            ),
            (
                "nodes = [\"redis://n:7000\"]\nca_file = \"/etc/ca.pem\"",
                "cluster.ca_file",
                "needs TLS: rediss:// addresses in cluster.nodes",
            ),
            (
                "nodes = [\"rediss://n:7000\"]\nca_file = \"ca.pem\"",
                "cluster.ca_file",
                "absolute path",
            ),
            (
                "sentinels = [\"rediss://s:26380\"]\nservice = \"t\"\nca_file = \"ca.pem\"",
                "cluster.ca_file",
                "absolute path",
            ),
            (
                "nodes = [\"unix:///run/redis.sock\"]",
                "cluster.nodes",
                "redis:// or rediss://",
            ),
            (
                "sentinels = [\"rediss://u:p@s:26380\"]\nservice = \"t\"",
                "cluster.sentinels",
                "password",
            ),
        ];
        for (body, key, reason) in cases {
            let (k, msg) = err(&format!("[cluster]\n{body}\n"));
            assert_eq!(k.as_deref(), Some(key), "{body}: {msg}");
            assert!(msg.contains(reason), "{body}: {msg}");
        }
    }

    #[test]
    fn the_password_file_gives_its_first_line() {
        let dir = std::env::temp_dir().join(format!("tarpit-cluster-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pass");
        std::fs::write(&path, "s3cret\n").unwrap();
        let c = Config::parse(&format!(
            "[cluster]\nurl = \"redis://h\"\npassword_file = \"{}\"\n",
            path.display()
        ))
        .unwrap();
        assert_eq!(
            c.cluster.read_password().unwrap().as_deref(),
            Some("s3cret")
        );
        std::fs::write(&path, "").unwrap();
        let e = c.cluster.read_password().unwrap_err();
        assert_eq!(e.key(), Some("cluster.password_file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
