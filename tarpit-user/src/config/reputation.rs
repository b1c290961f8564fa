//! `[dns]`, `[dnsbl]`, `[dnswl]` and `[greylist]`: what the agent learns
//! about a client from DNS, and the temporary failures of greylisting.
//!
//! Site strings use Postfix postscreen's syntax (`zone=127.0.0.[2..11]*3`),
//! parsed and checked by `super::dns_lists`, the one parser that config
//! errors and run-time scoring (`reputation::dnsbl`) share.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use super::{ListAction, Site};

/// `[dns]`: the resolver used for DNSBL, DNSWL and host-name lookups.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers as "IP" or "IP:port"; empty = the system's
    /// (/etc/resolv.conf).
    pub nameservers: Vec<String>,
    /// How long a session may wait for its DNS verdict, counted from
    /// connect. Lookups start at connect and overlap the greeting delay.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Capacity of each per-address cache (list results, allow cache,
    /// host names); when full, new results are simply not cached.
    pub cache_entries: usize,
    /// New look-ups one client network (IPv4 /24, IPv6 /64) may start per
    /// minute, in bursts of as many; 0 = no budget. Answers stay cached per
    /// address, so this only bites a network that keeps showing new
    /// addresses: a rotating /64 costs at most this many queries per list
    /// and minute instead of one per connection. A client over its
    /// network's budget is "not looked up", as on a DNS timeout (not
    /// listed, counted). 30 lets a sender's whole /24 farm (256 hosts) be
    /// looked up in under ten minutes, each answer then cached for its TTL.
    pub prefix_lookups_per_minute: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
            cache_entries: 100_000,
            prefix_lookups_per_minute: 30,
        }
    }
}

/// Parses a name server entry: "IP" (port 53) or "IP:port" / "[IPv6]:port".
pub fn parse_nameserver(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(format!("`{s}` is not an IP address or IP:port"))
}

impl DnsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, ns) in self.nameservers.iter().enumerate() {
            let sa = parse_nameserver(ns)
                .map_err(|r| ConfigError::invalid(format!("dns.nameservers[{i}]"), r))?;
            if sa.port() == 0 {
                return Err(ConfigError::invalid(
                    format!("dns.nameservers[{i}]"),
                    "port 0 is not a DNS port",
                ));
            }
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "dns.timeout",
                "must lie between 100ms and 60s",
            ));
        }
        if self.cache_entries == 0 {
            return Err(ConfigError::invalid(
                "dns.cache_entries",
                "must be at least 1",
            ));
        }
        if self.prefix_lookups_per_minute > 100_000 {
            return Err(ConfigError::invalid(
                "dns.prefix_lookups_per_minute",
                "must be at most 100000 (0 = no budget)",
            ));
        }
        Ok(())
    }

    /// The configured name servers, parsed (call after `validate`).
    pub fn nameserver_addrs(&self) -> Vec<SocketAddr> {
        self.nameservers
            .iter()
            .filter_map(|s| parse_nameserver(s).ok())
            .collect()
    }
}

/// `[dnsbl]`: block lists, weights, threshold and actions.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsblConfig {
    /// postscreen_dnsbl_sites syntax; weights default to 1 and may be
    /// negative (an allow list inside the same score, as postscreen allows).
    pub sites: Vec<String>,
    /// A client is listed when its score is at least this.
    pub threshold: i32,
    /// The default action for a listed client.
    pub action: ListAction,
    /// Custom actions per list domain (ORF's custom action per test).
    pub actions: HashMap<String, ListAction>,
    /// Bounds on how long one list's answer for one address is cached
    /// (the record's TTL, or the negative TTL, clamped to these).
    #[serde(with = "humantime_serde")]
    pub min_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Temporary allow cache: a client that passed every list is not looked
    /// up again for this long (postscreen_dnsbl_ttl).
    #[serde(with = "humantime_serde")]
    pub allow_ttl: Duration,
}

impl Default for DnsblConfig {
    fn default() -> Self {
        DnsblConfig {
            sites: Vec::new(),
            threshold: 1,
            action: ListAction::Delay,
            actions: HashMap::new(),
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
            allow_ttl: Duration::from_secs(3600),
        }
    }
}

/// `[dnswl]`: allow lists. Same syntax; a weight, when given, must be
/// negative (postscreen's `list.dnswl.org=127.0.[0..255].[1..3]*-2` can be
/// copied as it is); the default weight is -1.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnswlConfig {
    pub sites: Vec<String>,
    /// A client is allow-listed when its combined score is at most this
    /// (postscreen_dnsbl_allowlist_threshold); must be negative.
    pub threshold: i32,
}

impl Default for DnswlConfig {
    fn default() -> Self {
        DnswlConfig {
            sites: Vec::new(),
            threshold: -1,
        }
    }
}

impl DnsblConfig {
    /// The parsed sites of both sections, DNSBL first.
    pub fn all_sites(&self, wl: &DnswlConfig) -> Result<Vec<Site>, ConfigError> {
        let mut out = Vec::new();
        for (i, s) in self.sites.iter().enumerate() {
            out.push(
                Site::parse(s, 1).map_err(|e| {
                    ConfigError::invalid(format!("dnsbl.sites[{i}]"), e.to_string())
                })?,
            );
        }
        for (i, s) in wl.sites.iter().enumerate() {
            let site = Site::parse(s, -1)
                .map_err(|e| ConfigError::invalid(format!("dnswl.sites[{i}]"), e.to_string()))?;
            if site.weight > 0 {
                return Err(ConfigError::invalid(
                    format!("dnswl.sites[{i}]"),
                    "an allow list's weight must be negative (e.g. *-2)",
                ));
            }
            out.push(site);
        }
        Ok(out)
    }

    /// Checks both sections together (actions must name a configured list).
    pub fn validate(&self, wl: &DnswlConfig) -> Result<(), ConfigError> {
        let sites = self.all_sites(wl)?;
        if self.threshold < 1 {
            return Err(ConfigError::invalid(
                "dnsbl.threshold",
                "must be at least 1",
            ));
        }
        if wl.threshold > -1 {
            return Err(ConfigError::invalid(
                "dnswl.threshold",
                "must be negative (at most -1)",
            ));
        }
        for domain in self.actions.keys() {
            let d = domain.trim_end_matches('.').to_ascii_lowercase();
            if !sites.iter().any(|s| s.domain == d) {
                return Err(ConfigError::invalid(
                    format!("dnsbl.actions.{domain}"),
                    "names no list of dnsbl.sites or dnswl.sites",
                ));
            }
        }
        if self.min_ttl > self.max_ttl {
            return Err(ConfigError::invalid(
                "dnsbl.min_ttl",
                "must not exceed dnsbl.max_ttl",
            ));
        }
        if self.max_ttl > Duration::from_secs(7 * 86400) {
            return Err(ConfigError::invalid(
                "dnsbl.max_ttl",
                "must not exceed 7 days",
            ));
        }
        if self.allow_ttl > Duration::from_secs(7 * 86400) {
            return Err(ConfigError::invalid(
                "dnsbl.allow_ttl",
                "must not exceed 7 days",
            ));
        }
        Ok(())
    }

    /// Custom actions keyed by normalized domain.
    pub fn normalized_actions(&self) -> HashMap<String, ListAction> {
        self.actions
            .iter()
            .map(|(d, a)| (d.trim_end_matches('.').to_ascii_lowercase(), *a))
            .collect()
    }
}

/// Which greylisting, if any.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GreylistMode {
    #[default]
    Off,
    /// `451 4.7.1` at RCPT for an unseen (client network, sender, recipient).
    Triplet,
    /// A 4xx right at connect for an unseen client address.
    Connect,
}

/// Default greylist store: in a directory of its own, below the state
/// directory, so that the directory handed to the agent's user is not the
/// one root writes the state file into.
pub const DEFAULT_GREYLIST_STORE: &str = "/var/lib/tarpit/greylist/greylist.db";
/// Where the store was by default before it got its own directory; moved
/// to [`DEFAULT_GREYLIST_STORE`] at the first start that finds it there
/// (`ops::privileges`).
pub const OLD_DEFAULT_GREYLIST_STORE: &str = "/var/lib/tarpit/greylist.db";

/// `[greylist]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GreylistConfig {
    pub mode: GreylistMode,
    /// A retry earlier than this after the first attempt is refused again
    /// (postgrey: 5 min; spamd: 25 min).
    #[serde(with = "humantime_serde")]
    pub min_wait: Duration,
    /// A retry must come within this time of the first attempt, else the
    /// attempt counts as new (spamd's greyexp, 4 h).
    #[serde(with = "humantime_serde")]
    pub retry_window: Duration,
    /// Once passed, how long the triplet (or address) passes without delay;
    /// renewed by each pass (spamd's whiteexp, 36 days).
    #[serde(with = "humantime_serde")]
    pub pass_ttl: Duration,
    /// Client networks in a triplet: senders retry from another address of
    /// their pool, so the triplet holds the /24 (IPv4) or /64 (IPv6).
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// The store (a log of changes, compacted by atomic rename); it must
    /// survive restarts. The site's hash key lives next to it
    /// (`greylist.key` for `greylist.db`), created at the first start. Its
    /// directory is handed to `daemon.user` and must be the greylist's own:
    /// never the state file's directory, which root writes (checked in
    /// [`crate::config::StateConfig::validate_with`]).
    pub store: PathBuf,
    /// Known (passed) triplets or addresses kept at most; when full, the
    /// least recently renewed go first (they are greylisted once more).
    pub max_entries: usize,
    /// First attempts waiting for their retry, kept at most; when full,
    /// the oldest go first. Nobody passes because a store is full.
    pub max_pending: usize,
    /// First attempts one client network (`ipv4_prefix`/`ipv6_prefix`)
    /// may have waiting at once (each waits `retry_window` at most); the
    /// network's further new attempts get the same 451 but are not
    /// recorded, so a flood of random recipients from one network costs
    /// no more than this.
    pub pending_per_network: usize,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        GreylistConfig {
            mode: GreylistMode::Off,
            min_wait: Duration::from_secs(300),
            retry_window: Duration::from_secs(4 * 3600),
            pass_ttl: Duration::from_secs(36 * 86400),
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            store: PathBuf::from(DEFAULT_GREYLIST_STORE),
            max_entries: 1_000_000,
            max_pending: 200_000,
            pending_per_network: 500,
        }
    }
}

impl GreylistConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.retry_window <= self.min_wait {
            return Err(ConfigError::invalid(
                "greylist.retry_window",
                "must be longer than greylist.min_wait",
            ));
        }
        if self.pass_ttl < self.retry_window {
            return Err(ConfigError::invalid(
                "greylist.pass_ttl",
                "must be at least greylist.retry_window",
            ));
        }
        if self.pass_ttl > Duration::from_secs(400 * 86400) {
            return Err(ConfigError::invalid(
                "greylist.pass_ttl",
                "must not exceed 400 days",
            ));
        }
        if self.ipv4_prefix == 0 || self.ipv4_prefix > 32 {
            return Err(ConfigError::invalid(
                "greylist.ipv4_prefix",
                "must lie between 1 and 32",
            ));
        }
        if self.ipv6_prefix == 0 || self.ipv6_prefix > 128 {
            return Err(ConfigError::invalid(
                "greylist.ipv6_prefix",
                "must lie between 1 and 128",
            ));
        }
        if self.mode != GreylistMode::Off && self.store.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "greylist.store",
                "a file path is needed when greylisting is on",
            ));
        }
        if self.max_entries == 0 {
            return Err(ConfigError::invalid(
                "greylist.max_entries",
                "must be at least 1",
            ));
        }
        if self.max_pending == 0 {
            return Err(ConfigError::invalid(
                "greylist.max_pending",
                "must be at least 1",
            ));
        }
        if self.pending_per_network == 0 || self.pending_per_network > self.max_pending {
            return Err(ConfigError::invalid(
                "greylist.pending_per_network",
                "must lie between 1 and greylist.max_pending",
            ));
        }
        if self.store.extension().is_some_and(|e| e == "key") {
            return Err(ConfigError::invalid(
                "greylist.store",
                "must not end in .key (the name of the site's hash key next to it)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: for<'de> Deserialize<'de>>(s: &str) -> T {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn defaults_are_safe_and_off() {
        let dns = DnsConfig::default();
        dns.validate().unwrap();
        assert!(dns.nameservers.is_empty());
        let bl = DnsblConfig::default();
        let wl = DnswlConfig::default();
        bl.validate(&wl).unwrap();
        assert!(bl.all_sites(&wl).unwrap().is_empty());
        let g = GreylistConfig::default();
        g.validate().unwrap();
        assert_eq!(g.mode, GreylistMode::Off);
        assert_eq!(g.min_wait, Duration::from_secs(300));
        assert_eq!(g.pass_ttl, Duration::from_secs(36 * 86400));
    }

    #[test]
    fn nameservers_take_ip_or_ip_port() {
        let d: DnsConfig = parse("nameservers = [\"127.0.0.1\", \"127.0.0.1:5353\", \"[::1]:53\"]");
        d.validate().unwrap();
        let a = d.nameserver_addrs();
        assert_eq!(a[0], "127.0.0.1:53".parse().unwrap());
        assert_eq!(a[1], "127.0.0.1:5353".parse().unwrap());
        assert_eq!(a[2], "[::1]:53".parse().unwrap());
        let d: DnsConfig = parse("nameservers = [\"localhost\"]");
        let e = d.validate().unwrap_err();
        assert_eq!(e.key(), Some("dns.nameservers[0]"));
    }

    #[test]
    fn the_network_lookup_budget_defaults_to_30_and_is_bounded() {
        assert_eq!(DnsConfig::default().prefix_lookups_per_minute, 30);
        let d: DnsConfig = parse("prefix_lookups_per_minute = 0");
        d.validate().unwrap();
        let d: DnsConfig = parse("prefix_lookups_per_minute = 100001");
        let e = d.validate().unwrap_err();
        assert_eq!(e.key(), Some("dns.prefix_lookups_per_minute"));
    }

    #[test]
    fn bad_site_names_its_index() {
        let bl: DnsblConfig = parse("sites = [\"bl.test\", \"zen.example=127.0.0\"]");
        let e = bl.validate(&DnswlConfig::default()).unwrap_err();
        assert_eq!(e.key(), Some("dnsbl.sites[1]"));
        assert!(e.to_string().contains("four"), "{e}");
    }

    #[test]
    fn dnswl_weights_default_negative_and_must_stay_negative() {
        let bl = DnsblConfig::default();
        let wl: DnswlConfig =
            parse("sites = [\"wl.test\", \"dnswl.example=127.0.[0..255].[1..3]*-2\"]");
        let s = bl.all_sites(&wl).unwrap();
        assert_eq!(s[0].weight, -1);
        assert_eq!(s[1].weight, -2);
        let wl: DnswlConfig = parse("sites = [\"wl.test*2\"]");
        let e = bl.validate(&wl).unwrap_err();
        assert_eq!(e.key(), Some("dnswl.sites[0]"));
    }

    #[test]
    fn actions_must_name_a_list_and_parse() {
        let bl: DnsblConfig =
            parse("sites = [\"bl.test\"]\naction = \"log\"\n[actions]\n\"BL.test\" = \"drop\"\n");
        bl.validate(&DnswlConfig::default()).unwrap();
        assert_eq!(bl.action, ListAction::Log);
        assert_eq!(bl.normalized_actions()["bl.test"], ListAction::Drop);
        let bl: DnsblConfig =
            parse("sites = [\"bl.test\"]\n[actions]\n\"other.test\" = \"drop\"\n");
        let e = bl.validate(&DnswlConfig::default()).unwrap_err();
        assert_eq!(e.key(), Some("dnsbl.actions.other.test"));
        assert!(toml::from_str::<DnsblConfig>("action = \"bounce\"").is_err());
    }

    #[test]
    fn thresholds_and_ttls_are_checked() {
        let wl = DnswlConfig::default();
        let bl: DnsblConfig = parse("threshold = 0");
        assert_eq!(bl.validate(&wl).unwrap_err().key(), Some("dnsbl.threshold"));
        let bad_wl: DnswlConfig = parse("threshold = 0");
        assert_eq!(
            DnsblConfig::default().validate(&bad_wl).unwrap_err().key(),
            Some("dnswl.threshold")
        );
        let bl: DnsblConfig = parse("min_ttl = \"2h\"\nmax_ttl = \"1h\"");
        assert_eq!(bl.validate(&wl).unwrap_err().key(), Some("dnsbl.min_ttl"));
        let d: DnsConfig = parse("timeout = \"0s\"");
        assert_eq!(d.validate().unwrap_err().key(), Some("dns.timeout"));
    }

    #[test]
    fn greylist_windows_are_checked() {
        let g: GreylistConfig = parse(
            "mode = \"triplet\"\nmin_wait = \"2s\"\nretry_window = \"1m\"\npass_ttl = \"36d\"\nstore = \"/tmp/x\"",
        );
        g.validate().unwrap();
        assert_eq!(g.mode, GreylistMode::Triplet);
        let g: GreylistConfig = parse("min_wait = \"5h\"");
        assert_eq!(
            g.validate().unwrap_err().key(),
            Some("greylist.retry_window")
        );
        let g: GreylistConfig = parse("ipv6_prefix = 129");
        assert_eq!(
            g.validate().unwrap_err().key(),
            Some("greylist.ipv6_prefix")
        );
        let g: GreylistConfig = parse("mode = \"connect\"\nstore = \"\"");
        assert_eq!(g.validate().unwrap_err().key(), Some("greylist.store"));
        assert!(toml::from_str::<GreylistConfig>("mode = \"on\"").is_err());
        let g: GreylistConfig = parse("max_pending = 10\npending_per_network = 11");
        assert_eq!(
            g.validate().unwrap_err().key(),
            Some("greylist.pending_per_network")
        );
        let g: GreylistConfig = parse("max_pending = 0");
        assert_eq!(
            g.validate().unwrap_err().key(),
            Some("greylist.max_pending")
        );
        let g: GreylistConfig = parse("store = \"/var/lib/tarpit/greylist.key\"");
        assert_eq!(g.validate().unwrap_err().key(), Some("greylist.store"));
    }
}
