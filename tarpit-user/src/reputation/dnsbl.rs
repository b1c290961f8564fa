//! DNSBL and DNSWL site syntax and scoring, as Postfix postscreen has them.
//!
//! A site is written `domain[=filter][*weight]`, e.g.
//! `zen.example=127.0.0.[2..11]*3` or `list.dnswl.example=127.0.[0..255].[1..3]*-2`:
//! the client address is looked up as an A record under `domain`; the site
//! counts when any answer matches the filter (every answer, without one),
//! and then adds its weight (default 1, negative for allow lists) to the
//! client's score. Copying a `postscreen_dnsbl_sites` entry here gives the
//! same score postscreen computes. Everything in this file is pure: the
//! resolver feeds it answers.
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use serde::Deserialize;

/// What happens to a client whose score reaches the DNSBL threshold (ORF's
/// "default action or custom action per test").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListAction {
    /// Log the hit and count it; the session goes on as for anyone else.
    Log,
    /// The agent's blacklist delay (ORF's tarpit): each reply from MAIL FROM
    /// on is held `blacklist.delay`.
    Delay,
    /// The blacklist delay, then `554 5.7.1` instead of the MTA's answer.
    Reject,
    /// Close the connection without a word, right after connect.
    Drop,
}

impl ListAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ListAction::Log => "log",
            ListAction::Delay => "delay",
            ListAction::Reject => "reject",
            ListAction::Drop => "drop",
        }
    }
}

impl fmt::Display for ListAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a site string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SiteError(String);

fn err<T>(msg: impl Into<String>) -> Result<T, SiteError> {
    Err(SiteError(msg.into()))
}

/// One octet of a reply filter: a union of inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OctetSet(Vec<(u8, u8)>);

impl OctetSet {
    fn contains(&self, v: u8) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= v && v <= hi)
    }

    fn parse(s: &str) -> Result<OctetSet, SiteError> {
        fn num(s: &str) -> Result<u8, SiteError> {
            s.parse::<u8>()
                .or_else(|_| err(format!("`{s}` is not a number from 0 to 255")))
        }
        if let Some(inner) = s.strip_prefix('[') {
            let Some(inner) = inner.strip_suffix(']') else {
                return err(format!("`{s}` lacks its closing `]`"));
            };
            let mut ranges = Vec::new();
            for part in inner.split(';') {
                match part.split_once("..") {
                    Some((lo, hi)) => {
                        let (lo, hi) = (num(lo)?, num(hi)?);
                        if lo > hi {
                            return err(format!("range `{part}` is backwards"));
                        }
                        ranges.push((lo, hi));
                    }
                    None => {
                        let v = num(part)?;
                        ranges.push((v, v));
                    }
                }
            }
            Ok(OctetSet(ranges))
        } else {
            let v = num(s)?;
            Ok(OctetSet(vec![(v, v)]))
        }
    }
}

/// postscreen's reply filter `d.d.d.d`, each `d` a number or a `[...]`
/// pattern of `;`-separated numbers and `lo..hi` ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyFilter([OctetSet; 4]);

impl ReplyFilter {
    pub fn matches(&self, addr: Ipv4Addr) -> bool {
        self.0
            .iter()
            .zip(addr.octets())
            .all(|(set, o)| set.contains(o))
    }
}

impl FromStr for ReplyFilter {
    type Err = SiteError;
    fn from_str(s: &str) -> Result<Self, SiteError> {
        // Split on the dots between octets, not on those of `lo..hi`.
        let mut parts: Vec<&str> = Vec::new();
        let (mut depth, mut start) = (0i32, 0usize);
        for (i, c) in s.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                '.' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        if parts.len() != 4 {
            return err(format!(
                "reply filter `{s}` needs four dot-separated octets, like 127.0.0.[2..11]"
            ));
        }
        Ok(ReplyFilter([
            OctetSet::parse(parts[0])?,
            OctetSet::parse(parts[1])?,
            OctetSet::parse(parts[2])?,
            OctetSet::parse(parts[3])?,
        ]))
    }
}

/// One configured list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// The zone queried, lower case, without a trailing dot.
    pub domain: String,
    pub filter: Option<ReplyFilter>,
    pub weight: i32,
    /// The text as configured, for logs.
    pub spec: String,
}

impl Site {
    /// Parses `domain[=filter][*weight]`; `default_weight` applies when no
    /// `*weight` is given (1 for DNSBL sites, -1 for DNSWL sites).
    pub fn parse(spec: &str, default_weight: i32) -> Result<Site, SiteError> {
        let s = spec.trim();
        let (rest, weight) = match s.rsplit_once('*') {
            Some((rest, w)) => {
                let w: i32 = w
                    .parse()
                    .or_else(|_| err(format!("weight `{w}` is not an integer")))?;
                if w == 0 {
                    return err("a weight of 0 would make the site count for nothing");
                }
                if w.unsigned_abs() > 1000 {
                    return err(format!("weight {w} is outside -1000..=1000"));
                }
                (rest, w)
            }
            None => (s, default_weight),
        };
        let (domain, filter) = match rest.split_once('=') {
            Some((d, f)) => (d, Some(f.parse::<ReplyFilter>()?)),
            None => (rest, None),
        };
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        validate_domain(&domain)?;
        Ok(Site {
            domain,
            filter,
            weight,
            spec: s.to_string(),
        })
    }

    /// True when one of the answers counts for this site.
    pub fn matches(&self, answers: &[Ipv4Addr]) -> bool {
        match &self.filter {
            Some(f) => answers.iter().any(|a| f.matches(*a)),
            None => !answers.is_empty(),
        }
    }
}

fn validate_domain(d: &str) -> Result<(), SiteError> {
    if d.is_empty() {
        return err("the list's domain is empty");
    }
    if d.len() > 180 {
        // 180 + a reversed IPv6 address (72) stays within DNS's 253.
        return err(format!("domain `{d}` is longer than 180 characters"));
    }
    for label in d.split('.') {
        if label.is_empty() || label.len() > 63 {
            return err(format!("domain `{d}` has an empty or over-long label"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return err(format!(
                "domain `{d}` may hold only letters, digits, `-` and `_`"
            ));
        }
    }
    Ok(())
}

/// The DNS name to look up for `ip` under `domain`: reversed octets for
/// IPv4, reversed nibbles for IPv6 (an IPv4-mapped address is IPv4).
pub fn query_name(ip: IpAddr, domain: &str) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{domain}.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(64 + domain.len() + 1);
            for byte in v6.octets().iter().rev() {
                for nibble in [byte & 0x0f, byte >> 4] {
                    s.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                    s.push('.');
                }
            }
            s.push_str(domain);
            s.push('.');
            s
        }
    }
}

/// A site that counted for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub domain: String,
    pub spec: String,
    pub weight: i32,
}

/// The combined DNSBL/DNSWL judgement of one client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Score {
    pub total: i32,
    pub hits: Vec<Hit>,
}

/// Sums the weights of the sites that count. `answers` maps a domain to the
/// A records it returned for the client (absent: not listed, or unknown).
pub fn score(sites: &[Site], answers: &HashMap<String, Vec<Ipv4Addr>>) -> Score {
    let mut s = Score::default();
    for site in sites {
        if let Some(a) = answers.get(&site.domain)
            && site.matches(a)
        {
            s.total = s.total.saturating_add(site.weight);
            s.hits.push(Hit {
                domain: site.domain.clone(),
                spec: site.spec.clone(),
                weight: site.weight,
            });
        }
    }
    s
}

/// How scores turn into decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scoring {
    /// Listed when the score is at least this (postscreen_dnsbl_threshold).
    pub threshold: i32,
    /// Allow-listed (DNSWL) when the score is at most this
    /// (postscreen_dnsbl_allowlist_threshold); negative.
    pub allow_threshold: i32,
    pub default_action: ListAction,
    /// Custom actions by domain.
    pub actions: HashMap<String, ListAction>,
}

/// What the score means for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// Score at or above the threshold: the action of the strictest site
    /// that counted against the client (its own, or the default).
    Listed(ListAction),
    /// Score at or below the allow threshold: exempt like an allow-listed IP.
    AllowListed,
    Neutral,
}

impl Scoring {
    pub fn judge(&self, score: &Score) -> Judgement {
        if score.total >= self.threshold {
            let action = score
                .hits
                .iter()
                .filter(|h| h.weight > 0)
                .map(|h| {
                    self.actions
                        .get(&h.domain)
                        .copied()
                        .unwrap_or(self.default_action)
                })
                .max()
                .unwrap_or(self.default_action);
            Judgement::Listed(action)
        } else if score.total <= self.allow_threshold {
            Judgement::AllowListed
        } else {
            Judgement::Neutral
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn plain_site_counts_any_answer_with_weight_one() {
        let s = Site::parse("bl.test", 1).unwrap();
        assert_eq!(s.domain, "bl.test");
        assert_eq!(s.weight, 1);
        assert!(s.matches(&[a("127.0.0.2")]));
        assert!(s.matches(&[a("127.0.0.200")]));
        assert!(!s.matches(&[]));
    }

    #[test]
    fn postscreen_example_with_range_and_weight() {
        let s = Site::parse("zen.example=127.0.0.[2..11]*3", 1).unwrap();
        assert_eq!(s.domain, "zen.example");
        assert_eq!(s.weight, 3);
        assert!(s.matches(&[a("127.0.0.2")]));
        assert!(s.matches(&[a("127.0.0.11")]));
        assert!(!s.matches(&[a("127.0.0.1")]));
        assert!(!s.matches(&[a("127.0.0.12")]));
        assert!(!s.matches(&[a("127.0.1.2")]));
        // Any one matching answer is enough.
        assert!(s.matches(&[a("127.0.0.12"), a("127.0.0.4")]));
    }

    #[test]
    fn lists_and_ranges_combine_and_weights_go_negative() {
        let s = Site::parse("list.dnswl.example=127.0.[0..255].[1;3;5..6]*-2", 1).unwrap();
        assert_eq!(s.weight, -2);
        for ok in ["127.0.9.1", "127.0.255.3", "127.0.0.5", "127.0.0.6"] {
            assert!(s.matches(&[a(ok)]), "{ok}");
        }
        for no in ["127.0.9.2", "127.0.0.4", "127.0.0.7", "127.1.0.1"] {
            assert!(!s.matches(&[a(no)]), "{no}");
        }
    }

    #[test]
    fn default_weight_and_case_and_trailing_dot() {
        let s = Site::parse("WL.Test.", -1).unwrap();
        assert_eq!(s.domain, "wl.test");
        assert_eq!(s.weight, -1);
        assert_eq!(s.spec, "WL.Test.");
    }

    #[test]
    fn bad_sites_are_refused_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("bl.test*x", "integer"),
            ("bl.test*0", "0"),
            ("bl.test=127.0.0", "four"),
            ("bl.test=127.0.0.[2..11", "closing"),
            ("bl.test=127.0.0.[11..2]", "backwards"),
            ("bl.test=127.0.0.256", "0 to 255"),
            ("bl test", "letters"),
            ("bl..test", "label"),
            ("bl.test*5000", "outside"),
        ] {
            let e = Site::parse(bad, 1).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn query_names_for_v4_v6_and_mapped() {
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(query_name(v4, "bl.test"), "7.100.51.198.bl.test.");
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert_eq!(query_name(mapped, "bl.test"), "7.100.51.198.bl.test.");
        let v6: IpAddr = "fd5b:1e00::2".parse().unwrap();
        assert_eq!(
            query_name(v6, "bl.test"),
            "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.e.1.b.5.d.f.bl.test."
        );
    }

    fn scoring() -> Scoring {
        Scoring {
            threshold: 3,
            allow_threshold: -1,
            default_action: ListAction::Delay,
            actions: HashMap::from([("drop.test".to_string(), ListAction::Drop)]),
        }
    }

    fn answers(list: &[(&str, &str)]) -> HashMap<String, Vec<Ipv4Addr>> {
        let mut m: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
        for (d, ip) in list {
            m.entry(d.to_string()).or_default().push(a(ip));
        }
        m
    }

    #[test]
    fn weights_add_up_to_the_threshold() {
        let sites = vec![
            Site::parse("bl.test=127.0.0.2*2", 1).unwrap(),
            Site::parse("bl.test=127.0.0.4", 1).unwrap(),
            Site::parse("two.test*1", 1).unwrap(),
            Site::parse("wl.test*-5", 1).unwrap(),
        ];
        let sc = scoring();
        // One site alone stays below 3.
        let s = score(&sites, &answers(&[("bl.test", "127.0.0.2")]));
        assert_eq!(s.total, 2);
        assert_eq!(sc.judge(&s), Judgement::Neutral);
        // Two sites together reach it.
        let s = score(
            &sites,
            &answers(&[("bl.test", "127.0.0.2"), ("two.test", "127.0.0.9")]),
        );
        assert_eq!(s.total, 3);
        assert_eq!(sc.judge(&s), Judgement::Listed(ListAction::Delay));
        // Both entries of one domain count when both filters match.
        let s = score(
            &sites,
            &answers(&[
                ("bl.test", "127.0.0.2"),
                ("bl.test", "127.0.0.4"),
                ("two.test", "127.0.0.9"),
            ]),
        );
        assert_eq!(s.total, 4);
        assert_eq!(s.hits.len(), 3);
        // An allow list outweighs them.
        let s = score(
            &sites,
            &answers(&[
                ("bl.test", "127.0.0.2"),
                ("two.test", "127.0.0.9"),
                ("wl.test", "127.0.0.2"),
            ]),
        );
        assert_eq!(s.total, -2);
        assert_eq!(sc.judge(&s), Judgement::AllowListed);
    }

    #[test]
    fn strictest_custom_action_of_the_hits_wins() {
        let sites = vec![
            Site::parse("bl.test*3", 1).unwrap(),
            Site::parse("drop.test*3", 1).unwrap(),
        ];
        let sc = scoring();
        let s = score(&sites, &answers(&[("bl.test", "127.0.0.2")]));
        assert_eq!(sc.judge(&s), Judgement::Listed(ListAction::Delay));
        let s = score(
            &sites,
            &answers(&[("bl.test", "127.0.0.2"), ("drop.test", "127.0.0.2")]),
        );
        assert_eq!(sc.judge(&s), Judgement::Listed(ListAction::Drop));
        let mut log_only = scoring();
        log_only.default_action = ListAction::Log;
        let s = score(&sites, &answers(&[("bl.test", "127.0.0.2")]));
        assert_eq!(log_only.judge(&s), Judgement::Listed(ListAction::Log));
    }

    #[test]
    fn unlisted_client_is_neutral() {
        let sites = vec![Site::parse("bl.test", 1).unwrap()];
        let s = score(&sites, &HashMap::new());
        assert_eq!(s, Score::default());
        assert_eq!(scoring().judge(&s), Judgement::Neutral);
    }
}
