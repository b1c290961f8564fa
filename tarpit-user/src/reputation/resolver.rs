//! The DNS client (hickory-resolver) behind DNSBL, DNSWL and FCrDNS.
//!
//! Its own cache is off: results are cached per client address by the
//! reputation module, for the record's TTL, so there is one cache with one
//! bound. The hosts file is never consulted: a DNSBL name is never in it,
//! and a PTR name must be confirmed by DNS, not by a local file.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData, RecordType};

/// The outcome of one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    /// Records, and the smallest TTL among them.
    Found(T, u32),
    /// The name does not exist, or has no record of the type: a definite
    /// "not listed". The negative TTL, when the server sent an SOA.
    NotFound(Option<u32>),
    /// No usable answer: timeout, refused, SERVFAIL, network down.
    Failed(Failure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    Error,
}

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct ResolverError(String);

/// A shared DNS client; clone it freely (it is a handle).
#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
    timeout: Duration,
}

impl Dns {
    /// Uses `nameservers` (UDP, TCP on truncation), or the system's
    /// configuration when the list is empty. `timeout` bounds one query.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Dns, ResolverError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| {
                ResolverError(format!(
                    "cannot read the system's resolver configuration: {e}"
                ))
            })?
        } else {
            let servers = nameservers
                .iter()
                .map(|sa| {
                    let mut ns = NameServerConfig::udp_and_tcp(sa.ip());
                    for c in &mut ns.connections {
                        c.port = sa.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        // Two tries within the budget: one lost UDP datagram must not cost
        // the whole timeout (the caller still bounds the total by `timeout`).
        opts.timeout = (timeout / 2).max(Duration::from_millis(50));
        opts.attempts = 2;
        opts.ndots = 0;
        opts.preserve_intermediates = false;
        let resolver = builder.build().map_err(|e| ResolverError(e.to_string()))?;
        Ok(Dns { resolver, timeout })
    }

    /// One query, bounded by the timeout whatever the resolver does.
    async fn query(&self, name: Name, rtype: RecordType) -> Answer<Vec<RData>> {
        let r = tokio::time::timeout(self.timeout, self.resolver.lookup(name, rtype)).await;
        match r {
            Err(_) => Answer::Failed(Failure::Timeout),
            Ok(Ok(lookup)) => {
                let mut ttl = u32::MAX;
                let mut out = Vec::new();
                for rec in lookup.answers() {
                    if rec.record_type() == rtype {
                        ttl = ttl.min(rec.ttl);
                        out.push(rec.data.clone());
                    }
                }
                if out.is_empty() {
                    Answer::NotFound(None)
                } else {
                    Answer::Found(out, ttl)
                }
            }
            Ok(Err(e)) => classify(&e),
        }
    }

    /// A records of an absolute name (a trailing dot is added if missing).
    pub async fn a(&self, name: &str) -> Answer<Vec<Ipv4Addr>> {
        let Some(n) = absolute(name) else {
            return Answer::Failed(Failure::Error);
        };
        map(self.query(n, RecordType::A).await, |d| match d {
            RData::A(a) => Some(a.0),
            _ => None,
        })
    }

    /// AAAA records of an absolute name.
    pub async fn aaaa(&self, name: &str) -> Answer<Vec<Ipv6Addr>> {
        let Some(n) = absolute(name) else {
            return Answer::Failed(Failure::Error);
        };
        map(self.query(n, RecordType::AAAA).await, |d| match d {
            RData::AAAA(a) => Some(a.0),
            _ => None,
        })
    }

    /// PTR names of an address (lower case, without the trailing dot).
    pub async fn ptr(&self, ip: IpAddr) -> Answer<Vec<String>> {
        let name = Name::from(ip.to_canonical());
        map(self.query(name, RecordType::PTR).await, |d| match d {
            RData::PTR(p) => Some(p.0.to_ascii().trim_end_matches('.').to_ascii_lowercase()),
            _ => None,
        })
    }
}

fn absolute(name: &str) -> Option<Name> {
    let mut s = name.to_string();
    if !s.ends_with('.') {
        s.push('.');
    }
    Name::from_ascii(&s).ok()
}

fn map<T>(a: Answer<Vec<RData>>, f: impl Fn(&RData) -> Option<T>) -> Answer<Vec<T>> {
    match a {
        Answer::Found(v, ttl) => {
            let out: Vec<T> = v.iter().filter_map(f).collect();
            if out.is_empty() {
                Answer::NotFound(None)
            } else {
                Answer::Found(out, ttl)
            }
        }
        Answer::NotFound(t) => Answer::NotFound(t),
        Answer::Failed(f) => Answer::Failed(f),
    }
}

fn classify<T>(e: &NetError) -> Answer<T> {
    if let NetError::Dns(hickory_resolver::net::DnsError::NoRecordsFound(nr)) = e {
        use hickory_resolver::proto::op::ResponseCode;
        if matches!(
            nr.response_code,
            ResponseCode::NXDomain | ResponseCode::NoError
        ) {
            return Answer::NotFound(nr.negative_ttl);
        }
    }
    if matches!(e, NetError::Timeout) {
        return Answer::Failed(Failure::Timeout);
    }
    tracing::debug!(error = %e, "DNS query failed");
    Answer::Failed(Failure::Error)
}
