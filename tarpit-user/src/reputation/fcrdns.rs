//! The host-name allow list: forward-confirmed reverse DNS.
//!
//! Anyone who controls the reverse zone of an address can make its PTR say
//! `mail.partner.example`; only the owner of `partner.example` can make
//! that name resolve back to the address. So a name counts only when its
//! A (or AAAA) records contain the client address, as in SecurityGateway's
//! host-name allow list and Postfix's `reject_unknown_client_hostname`.
use std::net::IpAddr;

use super::resolver::{Answer, Dns, Failure};

/// At most this many PTR names are examined (a PTR set can be huge).
const MAX_PTR_NAMES: usize = 10;
/// At most this many matching names are forward-confirmed.
const MAX_CONFIRM: usize = 4;

/// The patterns are config syntax, parsed at load; re-exported for the
/// code that matched them here before.
pub use crate::config::HostPattern;

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
