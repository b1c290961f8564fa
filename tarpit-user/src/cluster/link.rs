//! The one task that talks to Redis: it publishes this node's changes,
//! applies the others', and keeps going on local state when Redis is gone.
//!
//! Nothing in an SMTP session waits for it: the greylist hands its changes
//! over through a bounded queue and reads only its own table (into which
//! the other nodes' changes are merged as they arrive), and blocks are
//! found by scanning the kernel's block list. Every Redis operation is
//! bounded by `cluster.timeout`; one that fails or times out ends the
//! connection, and the node is on its own until a reconnect succeeds.
//!
//! While on its own, the node keeps its changes (the latest per block or
//! greylist key) in a bounded backlog. On reconnect it catches up: it
//! writes its backlog (unless a later change by another node is already
//! in Redis, which then wins here too), then reads every shared block and
//! greylist key, since the channel's messages of the outage are lost.
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow};
use futures_util::StreamExt as _;
use ipnet::IpNet;
use redis::AsyncConnectionConfig;
use redis::aio::PubSubStream;
use tarpit_common::BlockReason;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::backlog::{Backlog, KeptOffence, SeenStrikes};
use super::conn::Conn;
use super::keys::Keys;
use super::metrics::ClusterMetrics;
use super::mirror::{KernelBlock, Mirror, Remote, Saved, spared};
use super::record::{BlockRecord, Envelope, Event, GreyState, SharedList};
use crate::closed_loop::LoopHandle;
use crate::config::{ClusterConfig, Config};
use crate::kernel::{AllowLookup, BlockSpec, BootInstant, KernelMaps};
use crate::policy::ports::Offence;
use crate::reputation::greylist::Id;
use crate::reputation::greylist::{KeyOrigin, SiteKey};
use crate::reputation::{GreyRecord, Greylist};

/// How often the kernel's block list is compared with what was shared:
/// a block reaches the other nodes within this and the channel's delay.
pub const SCAN_EVERY: Duration = Duration::from_millis(250);
/// How long to wait between reconnect attempts while Redis is gone.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Keys read per SCAN step and per MGET when catching up.
const BATCH: usize = 500;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything the task needs, made as root before the privilege drop
/// (the kernel's maps are opened then, the password file read then).
pub struct Engine {
    pub(super) cfg: ClusterConfig,
    pub(super) node: String,
    /// This agent's random id in its messages (see [`Envelope`]).
    pub(super) instance: String,
    /// Another agent calls itself `node` too: said once.
    pub(super) said_twin: bool,
    pub(super) keys: Keys,
    pub(super) source: super::Source,
    pub(super) maps: KernelMaps,
    pub(super) allow: Option<AllowLookup>,
    pub(super) metrics: Arc<ClusterMetrics>,
    pub(super) config: watch::Receiver<Arc<Config>>,
    pub(super) grey: Option<Greylist>,
    /// The closed loop, where the other nodes' strikes count.
    pub(super) offences: Option<LoopHandle>,
    /// False when the greylist's site key differs from the cluster's.
    pub(super) grey_shared: bool,
    pub(super) mirror: Mirror,
    /// The same for the authenticated addresses (AUTH map).
    pub(super) auth_mirror: Mirror,
    /// The same for the run-time allow list.
    pub(super) allow_mirror: Mirror,
    pub(super) conn: Option<Conn>,
    pub(super) backlog: Backlog,
    /// Strikes of other nodes counted here (by their key, see
    /// [`Keys::strike`]) with their time, while in the strike window.
    pub(super) seen_strikes: SeenStrikes,
    /// Strikes this agent shared so far (each one's number).
    pub(super) strike_seq: u64,
}

/// The next message of the channel, or never while unsubscribed.
async fn next_event(s: &mut Option<PubSubStream>) -> Option<redis::Msg> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// What to do about the greylist key found in Redis.
#[derive(Debug, PartialEq, Eq)]
pub enum GreyKeyVerdict {
    /// The same as this host's: share.
    Same,
    /// Not a key (wrong length, not hex, zeros): never taken.
    Malformed,
    /// Another key, and this host's was written by an admin: keep ours,
    /// do not share.
    Keep(SiteKey),
    /// Another key, and this host's is tarpit's own: take the cluster's.
    Adopt(SiteKey),
}

/// Decides about `theirs`, the greylist key as Redis holds it, against
/// this host's key and its origin.
pub fn grey_key_verdict(ours: &SiteKey, origin: KeyOrigin, theirs: &str) -> GreyKeyVerdict {
    match SiteKey::from_hex(theirs) {
        None => GreyKeyVerdict::Malformed,
        Some(k) if k == *ours => GreyKeyVerdict::Same,
        Some(k) if origin.follows_cluster() => GreyKeyVerdict::Adopt(k),
        Some(k) => GreyKeyVerdict::Keep(k),
    }
}

impl Engine {
    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.cfg.timeout, f).await {
            Ok(r) => r.with_context(|| what.to_string()),
            Err(_) => Err(anyhow!("{what}: no answer within {:?}", self.cfg.timeout)),
        }
    }

    /// Runs until aborted.
    pub async fn run(
        mut self,
        mut grey_rx: mpsc::Receiver<(GreyRecord, u64)>,
        mut offence_rx: mpsc::Receiver<(IpAddr, Offence)>,
    ) {
        // What the kernel holds now, before anything is read from Redis:
        // blocks made while the agent was stopped are this node's changes
        // (dated by the kernel), replayed like an outage's.
        self.scan_kernel().await;
        let mut events: Option<PubSubStream> = None;
        let mut tick = tokio::time::interval(SCAN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut next_try = tokio::time::Instant::now();
        let mut said_down = false;
        loop {
            if self.conn.is_none() && tokio::time::Instant::now() >= next_try {
                match self.connect().await {
                    Ok(stream) => {
                        events = Some(stream);
                        self.metrics.up.set(1);
                        info!(node = %self.node, "cluster: connected to Redis");
                        said_down = false;
                        self.catch_up().await;
                    }
                    Err(e) => {
                        self.conn = None;
                        next_try = tokio::time::Instant::now() + RECONNECT_EVERY;
                        if !said_down {
                            warn!("cluster: Redis not reachable, going on with local state: {e:#}");
                            said_down = true;
                        }
                    }
                }
            }
            tokio::select! {
                _ = tick.tick() => {
                    self.scan_kernel().await;
                    let keep = self.cfg.tombstone_ttl.as_millis() as u64;
                    self.mirror.prune(now_ms(), keep);
                    self.auth_mirror.prune(now_ms(), keep);
                    self.allow_mirror.prune(now_ms(), keep);
                    self.prune_strikes();
                }
                Some((r, now)) = grey_rx.recv() => self.share_grey(r, now).await,
                Some((ip, o)) = offence_rx.recv() => self.share_offence(ip, o).await,
                msg = next_event(&mut events) => match msg {
                    Some(m) => self.on_message(&m),
                    None => {
                        events = None;
                        self.lost("the change channel closed");
                    }
                },
            }
            if self.conn.is_none() && events.is_some() {
                events = None;
            }
        }
    }

    /// Redis is gone: local state only until a reconnect.
    fn lost(&mut self, why: &str) {
        if self.conn.take().is_some() {
            self.metrics.up.set(0);
            self.metrics.outages.inc();
            warn!(
                "cluster: lost Redis ({why}); going on with local state, changes kept for replay"
            );
        }
    }

    async fn connect(&mut self) -> Result<PubSubStream> {
        let t = Some(self.cfg.timeout.max(Duration::from_secs(1)));
        let cc = AsyncConnectionConfig::new()
            .set_connection_timeout(t)
            .set_response_timeout(Some(self.cfg.timeout));
        let wait = self.cfg.timeout.max(Duration::from_secs(1));
        let client = match tokio::time::timeout(wait, self.source.client()).await {
            Ok(c) => c.context("finding the master")?,
            Err(_) => return Err(anyhow!("finding the master: no answer within {wait:?}")),
        };
        let conn = match tokio::time::timeout(wait, self.source.conn(&client, &cc)).await {
            Ok(c) => c.context("connect")?,
            Err(_) => return Err(anyhow!("connect: no answer within {wait:?}")),
        };
        let mut ps = self
            .bounded("connect (subscriber)", client.get_async_pubsub())
            .await?;
        let channel = self.keys.channel();
        self.bounded("SUBSCRIBE", ps.subscribe(&channel)).await?;
        self.conn = Some(conn);
        self.check_grey_key().await;
        Ok(ps.into_on_message())
    }

    /// Hosts that share a greylist must hash under one site key, and the
    /// cluster shares it: the first host to connect writes its key, the
    /// others compare. A host whose key tarpit made (or took from the
    /// cluster before) takes the cluster's; one whose key an admin wrote
    /// keeps it and does not share its greylist. A malformed key in Redis
    /// is never taken (see [`grey_key_verdict`]).
    async fn check_grey_key(&mut self) {
        let (Some(g), Some(mut conn)) = (self.grey.clone(), self.conn.clone()) else {
            return;
        };
        let (ours, origin) = g.site_key();
        let key = self.keys.grey_site_key();
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(ours.to_hex()).arg("NX");
        let _ = self
            .bounded("SET grey-key", set.query_async::<Option<String>>(&mut conn))
            .await;
        let theirs = self
            .bounded(
                "GET grey-key",
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<String>>(&mut conn),
            )
            .await;
        let theirs = match theirs {
            Ok(Some(t)) => t,
            Ok(None) => return debug!("cluster: no greylist key in Redis yet"),
            Err(e) => return debug!("cluster: greylist key not compared: {e:#}"),
        };
        let was = self.grey_shared;
        let fp = |k: &SiteKey| format!("{:016x}", k.fingerprint());
        self.grey_shared = match grey_key_verdict(&ours, origin, &theirs) {
            GreyKeyVerdict::Same => true,
            GreyKeyVerdict::Malformed => {
                if was {
                    error!(
                        key = %key,
                        "cluster: the greylist key in Redis is not a greylist key (32 hex \
                         digits, not all zeros): refused, and the greylist is not shared \
                         (delete the Redis key: the next host to connect writes its own)"
                    );
                }
                false
            }
            GreyKeyVerdict::Keep(k) => {
                if was {
                    error!(
                        cluster = %fp(&k), ours = %fp(&ours),
                        "cluster: this host's greylist key differs from the cluster's and \
                         was written by an admin, so it is kept: the greylist is not \
                         shared (copy greylist.key from another host, or delete it and \
                         restart to take the cluster's; docs/cluster.md)"
                    );
                }
                false
            }
            GreyKeyVerdict::Adopt(k) => {
                match g.adopt_key(k.clone(), crate::reputation::unix_now()) {
                    Ok(_) => {
                        warn!(
                            cluster = %fp(&k), was = %fp(&ours),
                            "cluster: greylist key taken from the cluster; this host's \
                             greylist starts again from what the other hosts share"
                        );
                        // Kept under the old key: noise to the others.
                        self.backlog.clear_grey();
                        self.update_backlog();
                        true
                    }
                    Err(e) => {
                        error!(
                            "cluster: the cluster's greylist key not taken: {e}; the greylist is not shared"
                        );
                        false
                    }
                }
            }
        };
    }

    /// Compares the kernel's block list, authenticated addresses and
    /// run-time allow list with what was shared, and shares what changed
    /// here.
    async fn scan_kernel(&mut self) {
        let boot = BootInstant::now().as_nanos();
        let wall = now_ms();
        // Boot-clock nanoseconds (past or future) to Unix milliseconds.
        let wall_of = |t: u64| {
            if t >= boot {
                wall.saturating_add((t - boot) / 1_000_000)
            } else {
                wall.saturating_sub((boot - t) / 1_000_000)
            }
        };
        let of_list = |i: &crate::kernel::ListItem| KernelBlock {
            net: i.net,
            written: i.added.as_nanos(),
            written_ms: wall_of(i.added.as_nanos()),
            expires_at: i.expires.map(|e| wall_of(e.as_nanos()).div_ceil(1000)),
            reason: i.reason_code,
            automatic: i.automatic,
            all_ports: i.all_ports,
            hold: i.hold,
        };
        let active = |e: &Option<BootInstant>| e.is_none_or(|e| e.as_nanos() > boot);
        let auth: Vec<KernelBlock> = match self.maps.auth_list() {
            Ok(items) => items
                .iter()
                .filter(|i| active(&i.expires))
                .map(|i| KernelBlock {
                    net: IpNet::from(i.ip.to_canonical()),
                    written: i.added.as_nanos(),
                    written_ms: wall_of(i.added.as_nanos()),
                    expires_at: i.expires.map(|e| wall_of(e.as_nanos()).div_ceil(1000)),
                    reason: 0,
                    automatic: true,
                    all_ports: false,
                    hold: false,
                })
                .collect(),
            Err(e) => {
                debug!("cluster: authenticated addresses not readable: {e}");
                return;
            }
        };
        // `allow.ips` is this host's own configuration: never shared.
        let config = self.config.borrow().clone();
        let allow: Vec<KernelBlock> = match self.maps.allow_list() {
            Ok(items) => items
                .iter()
                .filter(|i| active(&i.expires))
                .filter(|i| !config.allow.ips.iter().any(|n| n.trunc() == i.net.trunc()))
                .map(of_list)
                .collect(),
            Err(e) => {
                debug!("cluster: allow list not readable: {e}");
                return;
            }
        };
        let block: Vec<KernelBlock> = match self.maps.block_list() {
            Ok(items) => items
                .iter()
                .filter(|i| active(&i.expires))
                .map(of_list)
                .collect(),
            Err(e) => {
                debug!("cluster: block list not readable: {e}");
                return;
            }
        };
        // The state file is read only when an admin entry is new here.
        let changes = {
            let saved = std::cell::OnceCell::new();
            let state = || {
                saved
                    .get_or_init(|| crate::state::State::load(&config.state.file).ok())
                    .as_ref()
            };
            let block_saved = |net: IpNet| {
                let e = state()?.block_entry(&net)?;
                Some(Saved {
                    at_ms: e.added_at.saturating_mul(1000),
                    comment: e.comment.clone(),
                })
            };
            let allow_saved = |net: IpNet| {
                let e = state()?.allow_entry(&net)?;
                Some(Saved {
                    at_ms: e.added_at.saturating_mul(1000),
                    comment: e.comment.clone(),
                })
            };
            let none = |_: IpNet, _: u64| false;
            let mut changes = self
                .auth_mirror
                .scan(&auth, &self.node, wall, |_| None, none);
            changes.extend(
                self.allow_mirror
                    .scan(&allow, &self.node, wall, allow_saved, none),
            );
            changes.extend(self.mirror.scan(
                &block,
                &self.node,
                wall,
                block_saved,
                crate::kernel::evictions::evicted,
            ));
            changes
        };
        for rec in changes {
            info!(
                list = rec.list.as_str(),
                entry = %rec.net,
                deleted = rec.deleted,
                "cluster: sharing a change of this node"
            );
            self.share_block(rec).await;
        }
    }

    async fn share_block(&mut self, rec: BlockRecord) {
        if self.conn.is_some() {
            match self.write_block(&rec).await {
                Ok(()) => {
                    self.metrics.published(rec.list.as_str());
                    return;
                }
                Err(e) => self.lost(&format!("{e:#}")),
            }
        }
        self.metrics.unshared(rec.list.as_str());
        self.keep_block(rec);
    }

    fn keep_block(&mut self, rec: BlockRecord) {
        if !self.backlog.keep_block(rec) {
            self.metrics.lost.inc();
        }
        self.update_backlog();
    }

    fn update_backlog(&self) {
        self.metrics.backlog.set(self.backlog.len() as i64);
    }

    async fn write_block(&self, rec: &BlockRecord) -> Result<()> {
        let Some(mut conn) = self.conn.clone() else {
            return Err(anyhow!("not connected"));
        };
        let now = now_ms() / 1000;
        let Some(ttl) = rec.ttl(now, self.cfg.tombstone_ttl) else {
            return Ok(());
        };
        let json = serde_json::to_string(rec)?;
        let event = self.envelope(Event::Block(rec.clone()))?;
        let mut p = redis::pipe();
        let mut set = redis::cmd("SET");
        set.arg(self.keys.entry(rec.list, rec.net)).arg(&json);
        if let Some(ttl) = ttl {
            set.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        p.add_command(set).ignore();
        p.cmd("PUBLISH")
            .arg(self.keys.channel())
            .arg(&event)
            .ignore();
        self.bounded("SET block", p.query_async::<()>(&mut conn))
            .await
    }

    async fn share_grey(&mut self, r: GreyRecord, now: u64) {
        if !self.grey_shared {
            return;
        }
        let id = match r {
            GreyRecord::Pending { id, .. } | GreyRecord::Known { id, .. } => id,
        };
        let state = GreyState::of(&r);
        if self.conn.is_some() {
            match self.write_grey(id, state, now).await {
                Ok(()) => {
                    self.metrics.published("greylist");
                    return;
                }
                Err(e) => self.lost(&format!("{e:#}")),
            }
        }
        self.metrics.unshared("greylist");
        self.keep_grey(id, state);
    }

    fn keep_grey(&mut self, id: Id, state: GreyState) {
        if !self.backlog.keep_grey(id, state) {
            self.metrics.lost.inc();
        }
        self.update_backlog();
    }

    fn retry_window(&self) -> u64 {
        self.config.borrow().greylist.retry_window.as_secs()
    }

    async fn write_grey(&self, id: Id, state: GreyState, now: u64) -> Result<()> {
        let Some(mut conn) = self.conn.clone() else {
            return Err(anyhow!("not connected"));
        };
        let Some(ttl) = state.ttl(now, self.retry_window()) else {
            return Ok(());
        };
        let event = self.envelope(Event::Grey {
            node: self.node.clone(),
            id: hex::encode(id),
            state,
        })?;
        let mut set = redis::cmd("SET");
        set.arg(self.keys.grey(&id))
            .arg(serde_json::to_string(&state)?)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        // The first attempt anywhere is the one the wait counts from.
        if matches!(state, GreyState::Pending { .. }) {
            set.arg("NX");
        }
        let mut p = redis::pipe();
        p.add_command(set).ignore();
        p.cmd("PUBLISH")
            .arg(self.keys.channel())
            .arg(&event)
            .ignore();
        self.bounded("SET greylist", p.query_async::<()>(&mut conn))
            .await
    }

    /// Announces a strike seen here (never stored in Redis); while Redis
    /// is gone, keeps it to announce when Redis returns.
    async fn share_offence(&mut self, ip: IpAddr, offence: Offence) {
        self.strike_seq += 1;
        let kept = KeptOffence {
            ip,
            offence,
            at_ms: now_ms(),
            seq: self.strike_seq,
        };
        if self.conn.is_some() {
            match self.publish_offence(kept, None).await {
                Ok(()) => {
                    self.metrics.published("offence");
                    return;
                }
                Err(e) => self.lost(&format!("{e:#}")),
            }
        }
        self.metrics.unshared("offence");
        if !self.backlog.keep_offence(kept) {
            self.metrics.lost.inc();
        }
        self.update_backlog();
    }

    /// Announces a strike; `keep_for` (a replay after an outage): also
    /// stores it that long (what is left of its window), for the nodes
    /// that reconnect after this one and missed the announcement.
    async fn publish_offence(&self, o: KeptOffence, keep_for: Option<Duration>) -> Result<()> {
        let Some(mut conn) = self.conn.clone() else {
            return Err(anyhow!("not connected"));
        };
        let code = o.offence.code();
        let event = self.envelope(Event::Offence {
            node: self.node.clone(),
            ip: o.ip,
            offence: code.to_string(),
            at: Some(o.at_ms),
            seq: Some(o.seq),
        })?;
        let mut p = redis::pipe();
        if let Some(ttl) = keep_for {
            p.cmd("SET")
                .arg(self.keys.strike(&self.instance, o.seq))
                .arg(&event)
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .ignore();
        }
        p.cmd("PUBLISH")
            .arg(self.keys.channel())
            .arg(&event)
            .ignore();
        self.bounded("PUBLISH offence", p.query_async::<()>(&mut conn))
            .await
    }

    /// The strikes seen here while Redis was gone, announced with their
    /// own time, oldest first; those out of the strike window by now are
    /// dropped (they would count for nothing anywhere).
    async fn replay_offences(&mut self) -> Result<()> {
        let window = self.config.borrow().offenders.window.as_millis() as u64;
        loop {
            let (next, dropped) = self.backlog.next_fresh_offence(now_ms(), window);
            if dropped > 0 {
                debug!(
                    dropped,
                    "cluster: strikes of the outage out of the window, not announced"
                );
                self.update_backlog();
            }
            let Some(o) = next else {
                return Ok(());
            };
            let left = window.saturating_sub(now_ms().saturating_sub(o.at_ms));
            self.publish_offence(o, Some(Duration::from_millis(left)))
                .await?;
            self.metrics.replayed.inc();
            self.backlog.done_offence();
            self.update_backlog();
        }
    }

    /// A message of this agent, as sent on the channel.
    fn envelope(&self, event: Event) -> serde_json::Result<String> {
        serde_json::to_string(&Envelope {
            from: self.instance.clone(),
            event,
        })
    }

    fn on_message(&mut self, msg: &redis::Msg) {
        let Ok(text) = msg.get_payload::<String>() else {
            return;
        };
        let env: Envelope = match serde_json::from_str(&text) {
            Ok(e) => e,
            Err(e) => {
                debug!("cluster: unreadable message ignored: {e}");
                return;
            }
        };
        if env.from == self.instance {
            return;
        }
        let node = match &env.event {
            Event::Block(rec) => &rec.node,
            Event::Grey { node, .. } | Event::Offence { node, .. } => node,
        };
        if *node == self.node && !self.said_twin {
            self.said_twin = true;
            error!(
                node = %self.node,
                "cluster: another agent calls itself {} too; set cluster.node to a name \
                 of each host's own (changes are still exchanged)",
                self.node
            );
        }
        match env.event {
            Event::Block(rec) => {
                let applied = self.remote_block(&rec);
                if applied {
                    let lag = now_ms().saturating_sub(rec.at);
                    self.metrics.lag(Duration::from_millis(lag));
                }
            }
            Event::Grey { id, state, .. } => {
                let mut raw = [0u8; 16];
                if hex::decode_to_slice(&id, &mut raw).is_ok() {
                    self.remote_grey(raw, state);
                }
            }
            Event::Offence {
                node,
                ip,
                offence,
                at,
                seq,
            } => self.remote_strike(&env.from, &node, ip, &offence, (at, seq)),
        }
    }

    /// Counts a strike of another node, once: a strike of an outage
    /// comes both on the channel and from Redis at a catch-up.
    fn remote_strike(
        &mut self,
        from: &str,
        node: &str,
        ip: IpAddr,
        offence: &str,
        (at, seq): (Option<u64>, Option<u64>),
    ) {
        let (Some(o), Some(lp)) = (Offence::from_code(offence), &self.offences) else {
            return;
        };
        if let (Some(at), Some(seq)) = (at, seq)
            && !self.seen_strikes.first(format!("{from}:{seq}"), at)
        {
            return;
        }
        let age = at.map_or(0, |at| now_ms().saturating_sub(at));
        debug!(client = %ip, from = %node, offence = o.code(), age_ms = age, "cluster: strike of another node");
        lp.remote_offence(ip, o, Duration::from_millis(age));
        self.metrics.applied("offence");
    }

    /// Forgets strikes counted that have left the strike window.
    fn prune_strikes(&mut self) {
        let window = self.config.borrow().offenders.window.as_millis() as u64;
        self.seen_strikes.prune(now_ms(), window);
    }

    /// The strikes other nodes kept through an outage and stored when
    /// Redis returned (those still in the window), read at a catch-up:
    /// this node may have been away when they were announced.
    async fn read_strikes(&mut self) -> Result<()> {
        if self.offences.is_none() {
            return Ok(());
        }
        for (_, text) in self.read_all(&self.keys.strike_pattern()).await? {
            let Ok(env) = serde_json::from_str::<Envelope>(&text) else {
                continue;
            };
            if env.from == self.instance {
                continue;
            }
            if let Event::Offence {
                node,
                ip,
                offence,
                at,
                seq,
            } = env.event
            {
                self.remote_strike(&env.from, &node, ip, &offence, (at, seq));
            }
        }
        Ok(())
    }

    fn remote_grey(&self, id: Id, state: GreyState) {
        if !self.grey_shared {
            return;
        }
        let Some(g) = &self.grey else {
            return;
        };
        if g.merge(state.record(id), crate::reputation::unix_now()) {
            self.metrics.applied("greylist");
        }
    }

    /// This node's verdict on a network (see [`spared`]).
    fn spared(&self, net: IpNet) -> Option<&'static str> {
        let config = self.config.borrow().clone();
        let kernel = |ip: IpAddr| match &self.allow {
            Some(a) => a.contains(ip).unwrap_or(true),
            None => false,
        };
        spared(net, &config.allow.ips, &config.allow.internal, kernel)
    }

    /// Applies an authenticated address, or its deletion, of another
    /// node: it authenticated there, it is spared here as well. True when
    /// this node's kernel changed.
    fn remote_auth(&mut self, rec: &BlockRecord) -> bool {
        let now = now_ms() / 1000;
        let ip = rec.net.network();
        let done = match self.auth_mirror.remote(rec, None, now) {
            Remote::Apply => {
                let ttl = rec
                    .expires_at
                    .map(|e| Duration::from_secs(e.saturating_sub(now).max(1)));
                self.maps.auth_add(ip, ttl).map(|()| "auth")
            }
            Remote::Remove => self.maps.auth_del(ip).map(|_| "unauth"),
            Remote::Ignore(_) => return false,
        };
        match done {
            Ok(kind) => {
                self.metrics.applied(kind);
                info!(client = %ip, from = %rec.node, kind, "cluster: authenticated address of another node");
                true
            }
            Err(e) => {
                warn!(client = %ip, from = %rec.node, "cluster: authenticated address not applied: {e}");
                false
            }
        }
    }

    /// Applies a run-time allow entry, or its deletion, of another node.
    /// A deletion never takes out this node's own `allow.ips` entry.
    fn remote_allow(&mut self, rec: &BlockRecord) -> bool {
        let now = now_ms() / 1000;
        let net = rec.net.trunc();
        let own = self
            .config
            .borrow()
            .allow
            .ips
            .iter()
            .any(|n| n.trunc() == net);
        let done = match self.allow_mirror.remote(rec, None, now) {
            Remote::Apply => {
                let ttl = rec
                    .expires_at
                    .map(|e| Duration::from_secs(e.saturating_sub(now).max(1)));
                if let Some(lp) = &self.offences {
                    lp.shared_allow(net, true);
                }
                self.maps.allow_add(net, ttl).map(|()| "allow")
            }
            Remote::Remove if own => return false,
            Remote::Remove => {
                if let Some(lp) = &self.offences {
                    lp.shared_allow(net, false);
                }
                self.maps.allow_del(net).map(|_| "unallow")
            }
            Remote::Ignore(_) => return false,
        };
        match done {
            Ok(kind) => {
                self.metrics.applied(kind);
                info!(entry = %net, from = %rec.node, kind, "cluster: allow-list change of another node applied");
                true
            }
            Err(e) => {
                warn!(entry = %net, from = %rec.node, "cluster: allow-list change of another node not applied: {e}");
                false
            }
        }
    }

    /// Applies a shared entry, or its deletion, made by another node;
    /// true when this node's kernel changed.
    fn remote_block(&mut self, rec: &BlockRecord) -> bool {
        match rec.list {
            SharedList::Auth => return self.remote_auth(rec),
            SharedList::Allow => return self.remote_allow(rec),
            SharedList::Block => {}
        }
        let now = now_ms() / 1000;
        let spare = if rec.deleted {
            None
        } else {
            self.spared(rec.net)
        };
        let done = match self.mirror.remote(rec, spare, now) {
            Remote::Apply => {
                let spec = BlockSpec {
                    ttl: rec
                        .expires_at
                        .map(|e| Duration::from_secs(e.saturating_sub(now).max(1))),
                    reason: BlockReason::from_code(rec.reason).unwrap_or(BlockReason::Manual),
                    all_ports: rec.all_ports,
                    hold: rec.hold,
                };
                if rec.automatic {
                    self.maps.auto_block_add(rec.net, spec).map(|added| {
                        // Room made in a full automatic part: not a deletion.
                        for net in added.evicted {
                            self.mirror.forget(net);
                        }
                        "block"
                    })
                } else {
                    self.maps.block_add(rec.net, spec).map(|()| "block")
                }
            }
            Remote::Remove => self.maps.block_del(rec.net).map(|_| "unblock"),
            Remote::Ignore(why) => {
                if matches!(
                    why,
                    "allow.internal" | "allow.ips" | "allow list" | "too wide"
                ) {
                    self.metrics.refused(why);
                    info!(block = %rec.net, from = %rec.node, why, "cluster: block of another node not applied here");
                }
                return false;
            }
        };
        match done {
            Ok(kind) => {
                self.metrics.applied(kind);
                info!(block = %rec.net, from = %rec.node, kind, "cluster: block-list change of another node applied");
                true
            }
            Err(e) => {
                warn!(block = %rec.net, from = %rec.node, "cluster: block-list change of another node not applied: {e}");
                false
            }
        }
    }

    /// After (re)connecting: replay the backlog, then read what the
    /// others changed meanwhile.
    async fn catch_up(&mut self) {
        if let Err(e) = self.replay_blocks().await {
            self.lost(&format!("{e:#}"));
            return;
        }
        if let Err(e) = self.read_blocks().await {
            self.lost(&format!("{e:#}"));
            return;
        }
        if let Err(e) = self.replay_grey().await {
            self.lost(&format!("{e:#}"));
            return;
        }
        if let Err(e) = self.replay_offences().await {
            self.lost(&format!("{e:#}"));
            return;
        }
        if let Err(e) = self.read_strikes().await {
            self.lost(&format!("{e:#}"));
        }
        if let Err(e) = self.read_grey().await {
            self.lost(&format!("{e:#}"));
        }
    }

    async fn replay_blocks(&mut self) -> Result<()> {
        for rec in self.backlog.blocks() {
            let mut conn = self.conn.clone().ok_or_else(|| anyhow!("not connected"))?;
            let there: Option<String> = self
                .bounded(
                    "GET block",
                    redis::cmd("GET")
                        .arg(self.keys.entry(rec.list, rec.net))
                        .query_async(&mut conn),
                )
                .await?;
            let theirs = there.and_then(|t| serde_json::from_str::<BlockRecord>(&t).ok());
            match theirs {
                // A later change elsewhere wins here too.
                Some(t) if t.supersedes(&rec) => {
                    self.remote_block(&t);
                }
                _ => {
                    self.write_block(&rec).await?;
                    self.metrics.replayed.inc();
                }
            }
            self.backlog.done_block(&rec);
            self.update_backlog();
        }
        Ok(())
    }

    /// Every key matching `pattern` with its value.
    async fn read_all(&self, pattern: &str) -> Result<Vec<(String, String)>> {
        let mut conn = self.conn.clone().ok_or_else(|| anyhow!("not connected"))?;
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let slot_key = self.keys.slot_key().to_string();
            let (next, keys): (u64, Vec<String>) = self
                .bounded("SCAN", conn.scan(cursor, pattern, BATCH, &slot_key))
                .await?;
            if !keys.is_empty() {
                let values: Vec<Option<String>> = self
                    .bounded("MGET", redis::cmd("MGET").arg(&keys).query_async(&mut conn))
                    .await?;
                out.extend(
                    keys.into_iter()
                        .zip(values)
                        .filter_map(|(k, v)| v.map(|v| (k, v))),
                );
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    async fn read_blocks(&mut self) -> Result<()> {
        for list in [SharedList::Allow, SharedList::Block, SharedList::Auth] {
            for (_, text) in self.read_all(&self.keys.pattern(list)).await? {
                if let Ok(rec) = serde_json::from_str::<BlockRecord>(&text)
                    && rec.list == list
                {
                    self.remote_block(&rec);
                }
            }
        }
        Ok(())
    }

    async fn replay_grey(&mut self) -> Result<()> {
        if !self.grey_shared {
            self.backlog.clear_grey();
            self.update_backlog();
            return Ok(());
        }
        let now = crate::reputation::unix_now();
        for (id, state) in self.backlog.grey() {
            self.write_grey(id, state, now).await?;
            self.metrics.replayed.inc();
            self.backlog.done_grey(&id);
            self.update_backlog();
        }
        Ok(())
    }

    async fn read_grey(&mut self) -> Result<()> {
        if !self.grey_shared || self.grey.is_none() {
            return Ok(());
        }
        for (key, text) in self.read_all(&self.keys.grey_pattern()).await? {
            let (Some(id), Ok(state)) = (
                self.keys.grey_id(&key),
                serde_json::from_str::<GreyState>(&text),
            ) else {
                continue;
            };
            self.remote_grey(id, state);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_s_greylist_key_is_taken_only_when_well_formed_and_ours_is_tarpit_s() {
        let ours = SiteKey::from_hex(&"11".repeat(16)).unwrap();
        let theirs = "22".repeat(16);
        let k = SiteKey::from_hex(&theirs).unwrap();
        assert_eq!(
            grey_key_verdict(&ours, KeyOrigin::Generated, &"11".repeat(16)),
            GreyKeyVerdict::Same
        );
        assert_eq!(
            grey_key_verdict(&ours, KeyOrigin::Generated, &theirs),
            GreyKeyVerdict::Adopt(k.clone())
        );
        assert_eq!(
            grey_key_verdict(&ours, KeyOrigin::Cluster, &theirs),
            GreyKeyVerdict::Adopt(k.clone())
        );
        assert_eq!(
            grey_key_verdict(&ours, KeyOrigin::Configured, &theirs),
            GreyKeyVerdict::Keep(k)
        );
        // Whoever writes Redis cannot hand over a short, long, odd or
        // empty key, nor one of zeros (no secret at all).
        for bad in [
            String::new(),
            "22".repeat(8),
            "22".repeat(17),
            format!("{theirs}\n"),
            "0123456789abcdef".to_string(),
            "00".repeat(16),
            "gg".repeat(16),
        ] {
            for origin in [KeyOrigin::Generated, KeyOrigin::Cluster] {
                assert_eq!(
                    grey_key_verdict(&ours, origin, &bad),
                    GreyKeyVerdict::Malformed,
                    "{bad:?}"
                );
            }
        }
    }
}
