//! The scenarios of issue 10 (and the kernel hold's, and the cluster's of issue 20), each in its own module. A scenario returns
//! one report object per scenario id it measures (the good-mail run also
//! yields the kernel cost, measured during it).
mod blocklist;
mod blocklist_live;
mod cluster;
mod hold;
mod kernel_hold;
mod lateness;
mod pregreet;
mod throughput;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail};

use super::agent::Agent;
use super::netns::{BenchNet, SERVER_V4, SERVER_V6, TcpExt};
use super::postfix::Postfix;
use super::report::{Scenario, Side};
use super::{Env, signal};

pub struct Def {
    pub ids: &'static [&'static str],
    pub run: fn(&Env) -> Result<Vec<Scenario>>,
}

pub const ALL: &[Def] = &[
    Def {
        ids: &["good_mail_throughput", "kernel_cost"],
        run: throughput::run,
    },
    Def {
        ids: &["hold_capacity"],
        run: hold::run,
    },
    Def {
        ids: &["pregreet_flood"],
        run: pregreet::run,
    },
    Def {
        ids: &["blocklist_drops", "blocklist_drops_veth"],
        run: blocklist::run,
    },
    Def {
        ids: &["delay_lateness"],
        run: lateness::run,
    },
    Def {
        ids: &["kernel_hold"],
        run: kernel_hold::run,
    },
    Def {
        ids: &["cluster_propagation", "cluster_greylist"],
        run: cluster::run,
    },
];

/// Median of a non-empty list (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The q-quantile (0..=1) by nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Agent config keys that make every delay zero (set when the agent knows them).
pub fn zero_delays(c: super::agent::AgentConfig) -> super::agent::AgentConfig {
    c.want("greeting.delay", "\"0s\"")
        .want("helo.delay", "\"0s\"")
        .want("rcpt.delay", "\"0s\"")
        .want("reject.delay", "\"0s\"")
        .want("limits.sessions", "20000")
        .want("limits.per_ip", "20000")
        // Every IPv6 source of the bench is in one /64 (fd5b:1e00::/64):
        // the default 200 per /64 refused all but 200 of them.
        .want("limits.per_ipv6_prefix", "20000")
}

/// The server's address on `port` in both families: what the workers aim
/// at (IPv4 and IPv6 alike).
pub fn both_families(port: u16) -> Vec<SocketAddr> {
    vec![
        SocketAddr::from((SERVER_V4, port)),
        SocketAddr::from((SERVER_V6, port)),
    ]
}

/// The one process whose cost a side measures on `port`: the agent when
/// there is one, else the postscreen serving that port. `what` names its
/// job in the error.
///
/// Master starts postscreen on the first client, so one short connection
/// goes first, then `settle` for it to come up.
pub fn judging_pid(
    net: &BenchNet,
    pf: &Postfix,
    agent: Option<&Agent>,
    port: u16,
    settle: Duration,
    what: &str,
) -> Result<u32> {
    let _ = net.in_client(|| {
        std::net::TcpStream::connect_timeout(&(SERVER_V4, port).into(), Duration::from_secs(2))
    });
    signal::sleep(settle)?;
    let pid = match agent {
        Some(a) => a.pid(),
        None => pf.postscreen_for(net, port),
    };
    match pid {
        Some(pid) => Ok(pid),
        None => bail!("cannot find the process that {what}"),
    }
}

/// Both namespaces' TCP trouble counters, taken before a phase: a full
/// accept queue shows in them, which explains slow or failed connects.
pub struct TcpTrouble {
    server: TcpExt,
    client: TcpExt,
}

impl TcpTrouble {
    pub fn before(net: &BenchNet) -> TcpTrouble {
        TcpTrouble {
            server: net.server_tcp_ext(),
            client: net.client_tcp_ext(),
        }
    }

    /// Sets on `s` what happened since [`TcpTrouble::before`]:
    /// listen_overflows, syncookies_sent (server side) and
    /// client_syn_retrans.
    pub fn set_since(&self, net: &BenchNet, s: &mut Side) {
        let server = self.server.since(&net.server_tcp_ext());
        let client = self.client.since(&net.client_tcp_ext());
        s.set("listen_overflows", server.listen_overflows as f64)
            .set("syncookies_sent", server.syncookies_sent as f64)
            .set("client_syn_retrans", client.syn_retrans as f64);
    }
}
