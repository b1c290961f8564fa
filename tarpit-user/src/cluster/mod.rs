//! Several MX hosts, one memory: state shared through Redis or Valkey
//! when `[cluster]` is configured (docs/cluster.md).
//!
//! Shared in this version:
//! - **blocks**: every change to this node's kernel block list (an
//!   offender blocked by the agent, `tarpit block add|del` with its
//!   comment; not an eviction from the full automatic part) is written to
//!   Redis with the block's expiry as the key's TTL and announced on the
//!   channel; every other node puts it on its own kernel block list with
//!   the same expiry. Deletions are tombstones with a TTL, so a node that
//!   was away does not bring a deleted block back;
//! - **run-time allow entries**: `tarpit allow add|del` on one node
//!   reaches every node's kernel allow list (each node's `allow.ips`
//!   stays its own: neither shared nor removed by another node);
//! - **allow wins**: a block from elsewhere that touches this node's
//!   internal networks, configured allow list or kernel allow list is not
//!   applied here;
//! - **strikes**: every offence seen here (pre-greet talk, rejected
//!   sessions, unknown recipients) is announced and counts at every other
//!   node too, so strikes split across hosts add up toward one block (one
//!   made while Redis was gone is announced when it returns, with its own
//!   time);
//! - **authenticated addresses**: an address that authenticated at one
//!   node (or `tarpit auth add`) is in every node's AUTH map with the same
//!   expiry, for the once-per-day HELO rule and the sk_lookup bypass;
//! - **greylist**: first attempts and passes, keyed by the same keyed
//!   hashes as the local store, under the site key the cluster shares (a
//!   key tarpit made gives way to the cluster's, an admin's does not:
//!   `link::grey_key_verdict`), so a retry at another MX passes after the
//!   minimum wait.
//!
//! Redis is one server (`url`), whichever server Redis Sentinels name as
//! the master (`sentinels`, asked again at every reconnect, so a
//! fail-over is an outage like any other), or a Redis Cluster (`nodes`,
//! every key in one hash slot: [`conn`]); see [`Source`]. Each over TLS
//! with `rediss://` addresses (for Sentinels: to them and to the servers
//! they name), checked against `ca_file`.
//!
//! Redis gone: each node goes on with its local state (the kernel's maps
//! and the greylist table keep working), counts and keeps what it could
//! not share, and catches up when Redis returns ([`link`]).
//!
//! The client is redis-rs (the `redis` crate): the most used and longest
//! kept Rust client, now maintained under the Redis organisation and
//! tested against Valkey too, with async connections on tokio, TLS through
//! rustls (the agent's own TLS library, with its ring provider, so no
//! second crypto stack), and the async Cluster and Sentinel support the
//! next steps of issue 20 need, behind features of the same crate; most
//! Rust tools around Redis-backed mail filtering use it. `fred` would do
//! too (its pooling and reconnect policies are richer), but this task
//! wants one connection, one subscriber and explicit catch-up, which
//! redis-rs gives with less.
pub mod backlog;
pub mod conn;
pub mod keys;
pub mod link;
pub mod lookup;
pub mod metrics;
pub mod mirror;
pub mod record;

use std::sync::Arc;

use anyhow::{Context as _, Result};
use redis::IntoConnectionInfo as _;
use tokio::sync::{mpsc, watch};

use crate::closed_loop::{LoopHandle, OffenceShare};
use crate::config::Config;
use crate::kernel::{AllowLookup, KernelMaps};
use crate::metrics::Metrics;
use crate::policy::ports::Offence;
use crate::reputation::{GreyRecord, GreyShare, Greylist};
pub use metrics::ClusterMetrics;

/// Greylist changes (and, apart, offences) waiting for the cluster task;
/// beyond, they are counted as lost rather than slowing a session.
const GREY_QUEUE: usize = 10_000;

/// The cluster, set up as root (maps opened, password read), not yet
/// running. `None` from [`prepare`] when no cluster is configured.
pub struct Prepared {
    engine: link::Engine,
}

/// Sets the cluster up: reads the password file, opens the kernel's maps
/// and registers the metrics. Root, no runtime (before the drop).
pub fn prepare(
    config: &Config,
    pin_path: &std::path::Path,
    metrics: &Metrics,
    updates: watch::Receiver<Arc<Config>>,
) -> Result<Option<Prepared>> {
    let c = &config.cluster;
    if !c.enabled() {
        return Ok(None);
    }
    let source = Source::from_config(c)?;
    let maps = KernelMaps::open(pin_path).context("cluster: cannot open the kernel's maps")?;
    let allow = AllowLookup::open(pin_path).ok();
    let cm = Arc::new(ClusterMetrics::default());
    metrics.register(|r| cm.register(r));
    let node = c.node_name();
    tracing::info!(node = %node, prefix = %c.key_prefix, "cluster configured");
    Ok(Some(Prepared {
        engine: link::Engine {
            cfg: c.clone(),
            keys: keys::Keys::for_config(c),
            node,
            instance: {
                let mut id = [0u8; 8];
                getrandom::fill(&mut id).context("cluster: no random id")?;
                hex::encode(id)
            },
            said_twin: false,
            source,
            maps,
            allow,
            metrics: cm,
            config: updates,
            grey: None,
            offences: None,
            grey_shared: true,
            mirror: mirror::Mirror::new(),
            auth_mirror: mirror::Mirror::of(record::SharedList::Auth),
            allow_mirror: mirror::Mirror::of(record::SharedList::Allow),
            conn: None,
            backlog: backlog::Backlog::default(),
            seen_strikes: Default::default(),
            strike_seq: 0,
        },
    }))
}

/// Where the Redis master is: the one server of `url`, or whichever
/// server the Sentinels name as the master of `service` now.
pub enum Source {
    Direct(redis::Client),
    Sentinel(redis::sentinel::SentinelClient),
    /// A Redis Cluster: its client, and a client per seed node for the
    /// change channel (pub/sub reaches every node of a Redis Cluster).
    Cluster(redis::cluster::ClusterClient, Vec<redis::Client>),
}

impl Source {
    /// From `[cluster]`, with the user and the password from its file
    /// (read now: call as root).
    pub fn from_config(c: &crate::config::ClusterConfig) -> Result<Source> {
        let mut settings = redis::RedisConnectionInfo::default();
        if let Some(user) = &c.user {
            settings = settings.set_username(user);
        }
        if let Some(pw) = c.read_password()? {
            settings = settings.set_password(pw);
        }
        // `ca_file`'s CA for every TLS connection (the validation allows
        // it only with rediss:// addresses); none = the system's.
        let certs = || -> Result<Option<redis::TlsCertificates>> {
            Ok(c.read_ca()?.map(|root_cert| redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            }))
        };
        if !c.nodes.is_empty() {
            let with_auth = |url: &str| -> Result<redis::ConnectionInfo> {
                let info = url.into_connection_info().context("cluster.nodes")?;
                let mut own = info.redis_settings().clone();
                if let Some(user) = settings.username() {
                    own = own.set_username(user);
                }
                if let Some(pw) = settings.password() {
                    own = own.set_password(pw);
                }
                Ok(info.set_redis_settings(own))
            };
            let infos = c
                .nodes
                .iter()
                .map(|n| with_auth(n))
                .collect::<Result<Vec<_>>>()?;
            let ca = certs()?;
            let seeds = infos
                .iter()
                .cloned()
                .map(|i| match &ca {
                    Some(ca) => redis::Client::build_with_tls(i, ca.clone()),
                    None => redis::Client::open(i),
                })
                .collect::<redis::RedisResult<Vec<_>>>()
                .context("cluster.nodes")?;
            // rediss:// nodes make the client TLS to every node it learns
            // of (the first node's mode; the validation refuses mixing);
            // `certs` adds the CA.
            let mut builder = redis::cluster::ClusterClientBuilder::new(infos);
            if let Some(ca) = ca {
                builder = builder.certs(ca);
            }
            let client = builder.build().context("cluster.nodes")?;
            return Ok(Source::Cluster(client, seeds));
        }
        if !c.sentinels.is_empty() {
            let service = c.service.as_deref().ok_or_else(|| {
                anyhow::anyhow!("cluster.service is needed with cluster.sentinels")
            })?;
            let client = if c.tls() {
                sentinel_tls(c, service, &settings, certs()?)?
            } else {
                let node = redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(settings);
                redis::sentinel::SentinelClient::build(
                    c.sentinels.iter().map(String::as_str).collect(),
                    service,
                    Some(node),
                    redis::sentinel::SentinelServerType::Master,
                )
                .context("cluster.sentinels")?
            };
            return Ok(Source::Sentinel(client));
        }
        let url = c
            .url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("no [cluster] url"))?;
        let mut info = url.into_connection_info().context("cluster.url")?;
        // The URL's own database number stays; user and password are ours.
        let mut own = info.redis_settings().clone();
        if let Some(user) = settings.username() {
            own = own.set_username(user);
        }
        if let Some(pw) = settings.password() {
            own = own.set_password(pw);
        }
        info = info.set_redis_settings(own);
        let client = match certs()? {
            Some(ca) => redis::Client::build_with_tls(info, ca).context("cluster.ca_file")?,
            None => redis::Client::open(info).context("cluster.url")?,
        };
        Ok(Source::Direct(client))
    }

    /// A client for the master now: after a fail-over, the Sentinels name
    /// the new one. With a Redis Cluster, the first seed node that answers
    /// (for the change channel and `tarpit ip`'s look-ups of one slot).
    pub async fn client(&mut self) -> redis::RedisResult<redis::Client> {
        match self {
            Source::Direct(c) => Ok(c.clone()),
            Source::Sentinel(s) => s.async_get_client().await,
            Source::Cluster(_, seeds) => {
                let mut last = None;
                for s in seeds.iter() {
                    match s.get_multiplexed_async_connection().await {
                        Ok(_) => return Ok(s.clone()),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Client, "no cluster.nodes"))
                }))
            }
        }
    }

    /// The connection for the task's commands: to the server of
    /// [`Source::client`], or to the whole Redis Cluster.
    pub async fn conn(
        &mut self,
        client: &redis::Client,
        cc: &redis::AsyncConnectionConfig,
    ) -> redis::RedisResult<conn::Conn> {
        match self {
            Source::Cluster(c, _) => Ok(conn::Conn::Cluster(c.get_async_connection().await?)),
            _ => Ok(conn::Conn::One(
                client
                    .get_multiplexed_async_connection_with_config(cc)
                    .await?,
            )),
        }
    }
}

/// A Sentinel client over TLS (`rediss://` sentinels): the Sentinels
/// and the master they name are both reached over TLS, their certificates
/// checked against `ca` (the system's trust store without it). The
/// master's certificate must name the address the Sentinels give for it
/// (usually an IP address: a subjectAltName `IP:...`).
fn sentinel_tls(
    c: &crate::config::ClusterConfig,
    service: &str,
    settings: &redis::RedisConnectionInfo,
    ca: Option<redis::TlsCertificates>,
) -> Result<redis::sentinel::SentinelClient> {
    let addrs = c
        .sentinels
        .iter()
        .map(|u| Ok(u.as_str().into_connection_info()?.addr().clone()))
        .collect::<redis::RedisResult<Vec<_>>>()
        .context("cluster.sentinels")?;
    let mut b = redis::sentinel::SentinelClientBuilder::new(
        addrs,
        service,
        redis::sentinel::SentinelServerType::Master,
    )
    .context("cluster.sentinels")?
    .set_client_to_redis_tls_mode(redis::TlsMode::Secure);
    if let Some(user) = settings.username() {
        b = b.set_client_to_redis_username(user);
    }
    if let Some(pw) = settings.password() {
        b = b.set_client_to_redis_password(pw);
    }
    if let Some(ca) = ca {
        b = b
            .set_client_to_sentinel_certificates(ca.clone())
            .set_client_to_redis_certificates(ca);
    }
    b.build().context("cluster.sentinels")
}

/// Hands the greylist's changes to the cluster task without waiting.
struct GreyOutlet {
    tx: mpsc::Sender<(GreyRecord, u64)>,
    metrics: Arc<ClusterMetrics>,
}

impl GreyShare for GreyOutlet {
    fn publish(&self, record: GreyRecord, now: u64) {
        if self.tx.try_send((record, now)).is_err() {
            self.metrics.lost.inc();
        }
    }
}

/// Hands the closed loop's offences to the cluster task without waiting.
struct OffenceOutlet {
    tx: mpsc::Sender<(std::net::IpAddr, Offence)>,
    metrics: Arc<ClusterMetrics>,
}

impl OffenceShare for OffenceOutlet {
    fn share(&self, ip: std::net::IpAddr, offence: Offence) {
        if self.tx.try_send((ip, offence)).is_err() {
            self.metrics.lost.inc();
        }
    }
}

impl Prepared {
    /// Starts the cluster task (inside the runtime, after the drop): the
    /// closed loop's offences (when there is a loop) and the greylist's
    /// changes are shared from now on; returns the greylist to use.
    pub fn start(
        mut self,
        greylist: Option<Greylist>,
        closed_loop: Option<LoopHandle>,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Option<Greylist> {
        let (off_tx, off_rx) = mpsc::channel(GREY_QUEUE);
        if let Some(lp) = &closed_loop {
            lp.share_offences(Arc::new(OffenceOutlet {
                tx: off_tx,
                metrics: self.engine.metrics.clone(),
            }));
        }
        self.engine.offences = closed_loop;
        let (tx, rx) = mpsc::channel(GREY_QUEUE);
        let greylist = greylist.map(|g| {
            g.with_share(Arc::new(GreyOutlet {
                tx,
                metrics: self.engine.metrics.clone(),
            }))
        });
        self.engine.grey = greylist.clone();
        tasks.spawn(self.engine.run(rx, off_rx));
        greylist
    }
}
