//! DNSBL and DNSWL site syntax and scoring, as Postfix postscreen has them.
//!
//! A site is written `domain[=filter][*weight]`, e.g.
//! `zen.example=127.0.0.[2..11]*3` or `list.dnswl.example=127.0.[0..255].[1..3]*-2`:
//! the client address is looked up as an A record under `domain`; the site
//! counts when any answer matches the filter (every answer, without one),
//! and then adds its weight (default 1, negative for allow lists) to the
//! client's score. Copying a `postscreen_dnsbl_sites` entry here gives the
//! same score postscreen computes. The site syntax is config (parsed and
//! refused at load, `crate::config::dns_lists`); this file scores the
//! parsed sites. Everything in it is pure: the resolver feeds it answers.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

/// Config syntax, re-exported at the paths the scoring code has always used.
pub use crate::config::{ListAction, ReplyFilter, Site, SiteError};

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
