//! The host-name allow list: forward-confirmed reverse DNS.
//!
//! Anyone who controls the reverse zone of an address can make its PTR say
//! `mail.partner.example`; only the owner of `partner.example` can make
//! that name resolve back to the address. So a name counts only when its
//! A (or AAAA) records contain the client address, as in SecurityGateway's
//! host-name allow list and Postfix's `reject_unknown_client_hostname`.
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Deserialize;

use super::resolver::{Answer, Dns, Failure};

/// At most this many PTR names are examined (a PTR set can be huge).
const MAX_PTR_NAMES: usize = 10;
/// At most this many matching names are forward-confirmed.
const MAX_CONFIRM: usize = 4;

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

/// What FCrDNS found for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCheck {
    /// A PTR name that matches the allow list and resolves back.
    Confirmed(String),
    /// No PTR name both matches and resolves back (PTR absent, names not on
    /// the list, or on the list but not forward-confirmed).
    NotAllowed,
    /// DNS failed; nothing is known.
    Failed(Failure),
}

/// Looks for a forward-confirmed PTR name of `ip` that matches `patterns`.
/// Returns the result and the TTL it may be cached for (the PTR's).
pub async fn check(dns: &Dns, ip: IpAddr, patterns: &[HostPattern]) -> (HostCheck, Option<u32>) {
    let ip = ip.to_canonical();
    let (names, ttl) = match dns.ptr(ip).await {
        Answer::Found(names, ttl) => (names, ttl),
        Answer::NotFound(neg) => return (HostCheck::NotAllowed, neg),
        Answer::Failed(f) => return (HostCheck::Failed(f), None),
    };
    let candidates: Vec<String> = names
        .into_iter()
        .take(MAX_PTR_NAMES)
        .filter(|n| patterns.iter().any(|p| p.matches(n)))
        .take(MAX_CONFIRM)
        .collect();
    let mut failure = None;
    for name in candidates {
        let back: Answer<Vec<IpAddr>> = match ip {
            IpAddr::V4(_) => match dns.a(&name).await {
                Answer::Found(v, t) => Answer::Found(v.into_iter().map(IpAddr::V4).collect(), t),
                Answer::NotFound(t) => Answer::NotFound(t),
                Answer::Failed(f) => Answer::Failed(f),
            },
            IpAddr::V6(_) => match dns.aaaa(&name).await {
                Answer::Found(v, t) => Answer::Found(v.into_iter().map(IpAddr::V6).collect(), t),
                Answer::NotFound(t) => Answer::NotFound(t),
                Answer::Failed(f) => Answer::Failed(f),
            },
        };
        match back {
            Answer::Found(addrs, fwd_ttl) if addrs.contains(&ip) => {
                return (HostCheck::Confirmed(name), Some(ttl.min(fwd_ttl)));
            }
            Answer::Found(..) | Answer::NotFound(_) => {
                tracing::info!(client = %ip, ptr = %name, "PTR name matches the allow list but does not resolve back to the client");
            }
            Answer::Failed(f) => failure = Some(f),
        }
    }
    match failure {
        // A forward lookup failed: nothing is known, do not cache.
        Some(f) => (HostCheck::Failed(f), None),
        None => (HostCheck::NotAllowed, Some(ttl)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
