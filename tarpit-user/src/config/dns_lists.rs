//! The DNSBL/DNSWL site syntax and the host-name patterns of the config
//! (`dnsbl.sites`, `dnsbl.actions`, `dnswl.sites`, `allow.hosts`).
//!
//! Why here and not in `reputation`: the config must check these strings
//! at load (a bad site is refused with its key), and the config sits below
//! every other module; `reputation` scores and resolves with the parsed
//! values and re-exports them at their old paths. Everything here is pure.
use std::fmt;
use std::net::Ipv4Addr;
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

/// `mail.example.org` (that name only) or `*.example.org` (any name below
/// example.org, not example.org itself).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum HostPattern {
    Exact(String),
    /// The suffix with its leading dot: `.example.org`.
    Suffix(String),
}

impl HostPattern {
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        match self {
            HostPattern::Exact(n) => name.eq_ignore_ascii_case(n),
            HostPattern::Suffix(s) => {
                name.len() > s.len()
                    && name.is_char_boundary(name.len() - s.len())
                    && name[name.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let (body, suffix) = match t.strip_prefix("*.") {
            Some(rest) => (rest.to_string(), true),
            None => (t.clone(), false),
        };
        if body.is_empty() {
            return Err(format!("`{s}` has no name"));
        }
        let ok = body.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        if !ok {
            return Err(format!(
                "`{s}` is not a host name or `*.domain` pattern (a `*` only as the first label)"
            ));
        }
        Ok(if suffix {
            HostPattern::Suffix(format!(".{body}"))
        } else {
            HostPattern::Exact(body)
        })
    }
}

impl TryFrom<String> for HostPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
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

    fn p(s: &str) -> HostPattern {
        s.parse().unwrap()
    }

    #[test]
    fn exact_names_match_only_themselves() {
        let pat = p("Mail.Partner.Example.");
        assert!(pat.matches("mail.partner.example"));
        assert!(pat.matches("MAIL.partner.example."));
        assert!(!pat.matches("xmail.partner.example"));
        assert!(!pat.matches("mail.partner.example.evil"));
        assert_eq!(pat.to_string(), "mail.partner.example");
    }

    #[test]
    fn suffix_patterns_match_names_below_only() {
        let pat = p("*.partner.example");
        assert!(pat.matches("mx1.partner.example"));
        assert!(pat.matches("a.b.PARTNER.example"));
        assert!(!pat.matches("partner.example"));
        assert!(!pat.matches("evilpartner.example"));
        assert!(!pat.matches("mx1.partner.example.evil"));
        assert_eq!(pat.to_string(), "*.partner.example");
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "*.", "mail.*.example", "a b.example", "*", "**.x"] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad:?}");
        }
    }
}
