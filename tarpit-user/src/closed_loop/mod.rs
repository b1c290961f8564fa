//! The loop between kernel and agent.
//!
//! - **One verdict source**: the agent's pre-greet decision reads the
//!   kernel's per-flow flag ([`verdict`]).
//! - **Authenticated addresses** live in the kernel's pinned AUTH map
//!   ([`auth`]): the once-per-day HELO rule reads them across connections
//!   and agent restarts, and sk_lookup can steer them past the agent.
//! - **Allow list**: config and run-time entries are synced into the
//!   kernel's ALLOW map at start and on reload ([`allow_sync`]).
//! - **Repeat offenders**: kernel events (pre-greet talk) and session
//!   outcomes feed a per-address tracker ([`offenders`]); repeat offenders
//!   go on the XDP block list with a TTL and a reason (the kernel enforces
//!   the expiry; the agent sweeps expired entries), first offenders get the
//!   sock_ops window clamp. Allow-listed and internal addresses never do.
//! - **Bypass and fail-open**: the sk_lookup program steers trusted
//!   clients to the MTA's plain listener and every client there when the
//!   agent is gone (`kernel::steering`).
//!
//! The sessions reach the loop through the ports the policy declares
//! (`policy::ports`): [`LoopHandle`] implements them over the kernel's maps
//! and [`ClosedLoop::ports`] hands them out; the agent puts them into the
//! sessions' shared state. Without a loop (no kernel side, unit tests) the
//! sessions get `Ports::standalone()` and the agent's own detectors apply.
pub mod allow_sync;
pub mod auth;
pub mod offenders;
pub mod steering;
pub mod verdict;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::kernel::{
    AllowLookup, BlockSpec, EventKind, EventStream, HeldLink, Kernel, KernelMaps, SteerCounters,
    SteerMaps,
};
use crate::metrics::Metrics;
use crate::policy::ports::{AllowList, OffenceSink, Ports};
pub use offenders::{Offence, Sanction};
use prometheus_client::metrics::counter::Counter;
use steering::SteerScrape;
pub use steering::steer_settings;

/// What the sessions, the event reader and the sweeper share: the kernel's
/// maps, the running config, the offenders' record and the steering maps.
struct LoopState {
    maps: Arc<Mutex<KernelMaps>>,
    config: Mutex<Arc<Config>>,
    tracker: Mutex<offenders::Tracker>,
    steer: Option<Mutex<SteerMaps>>,
    /// Inodes of the MTA listeners in the sockmap (to notice a restart).
    mta_inodes: Mutex<Vec<Option<u64>>>,
    pregreet: Arc<verdict::KernelPreGreet>,
    auth: Arc<auth::KernelAuthStore>,
    allow: Option<AllowLookup>,
    /// Block-list churn, counted into the agent's registry.
    blocks: BlockCounters,
    /// Where this node's offences go to count at the other MX hosts too
    /// (the cluster); set once, after the runtime started.
    share: std::sync::OnceLock<Arc<dyn OffenceShare>>,
    /// Allow-list entries other MX hosts shared (the cluster): kept on
    /// the kernel's allow list by every sync, like the state file's.
    shared_allow: Mutex<std::collections::BTreeSet<ipnet::IpNet>>,
}

/// Hands this node's offences to whoever shares them with the other MX
/// hosts (`cluster`), so strikes seen at different hosts add up toward
/// one block. Must not block: it is called on the kernel's event path.
pub trait OffenceShare: Send + Sync {
    fn share(&self, ip: IpAddr, offence: Offence);
}

/// The block-list churn counters (the agent's `tarpit_blocks_*_total`).
struct BlockCounters {
    added: Counter,
    expired: Counter,
    evicted: Counter,
}

/// The running loop as sessions, reloads and scrapes see it: cheap to
/// clone, and what implements the policy's ports ([`LoopHandle::ports`]).
#[derive(Clone)]
pub struct LoopHandle(Arc<LoopState>);

impl LoopHandle {
    /// The ports the sessions use: the kernel's allow list, AUTH map and
    /// pre-greet verdict, and this loop as the offence sink.
    pub fn ports(&self) -> Ports {
        Ports {
            allow: Arc::new(self.clone()),
            auth: self.0.auth.clone(),
            pregreet: self.0.pregreet.clone(),
            offences: Arc::new(self.clone()),
        }
    }

    /// Applies a reloaded configuration: allow list, thresholds, steering.
    pub fn reload(&self, config: &Config) {
        self.0.reload(config);
    }

    /// From now on, this node's offences also go to `share` (once; a
    /// second call is ignored).
    pub fn share_offences(&self, share: Arc<dyn OffenceShare>) {
        let _ = self.0.share.set(share);
    }

    /// An allow-list entry another MX host shared is on the kernel's list
    /// (`true`) or was deleted there (`false`): reloads keep it or not.
    pub fn shared_allow(&self, net: ipnet::IpNet, listed: bool) {
        let mut s = self
            .0
            .shared_allow
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if listed {
            s.insert(net.trunc());
        } else {
            s.remove(&net.trunc());
        }
    }

    /// An offence another MX host saw `age` ago: it counts here as if
    /// seen here then (this node's allow list and internal networks still
    /// exempt the address; one older than the window counts for nothing),
    /// and is not shared again.
    pub fn remote_offence(&self, ip: IpAddr, offence: Offence, age: std::time::Duration) {
        self.0.offend_from(ip, offence, Some(age));
    }

    /// The sk_lookup program's steering counts, read now; `None` when no
    /// bypass runs (`bypass.enabled` off).
    pub fn steer_counters(&self) -> Option<Result<SteerCounters>> {
        let steer = self.0.steer.as_ref()?;
        Some(steer.lock().unwrap_or_else(|e| e.into_inner()).counters())
    }
}

impl AllowList for LoopHandle {
    /// Is `ip` on the kernel's allow list (config or run-time entry)? The
    /// agent asks on every connection, so one list spares a client in XDP,
    /// sk_lookup and the agent alike (a list that never held an entry is
    /// not read: see `kernel::lookup`, which may take up to its `RECHECK`
    /// to notice a first entry). `false` on a read error (the config's
    /// own `allow.ips` still apply).
    fn allowlisted(&self, ip: IpAddr) -> bool {
        let Some(allow) = &self.0.allow else {
            return false;
        };
        match allow.contains(ip) {
            Ok(b) => b,
            Err(e) => {
                debug!(client = %ip, "allow list not readable: {e}");
                false
            }
        }
    }
}

impl OffenceSink for LoopHandle {
    fn offence(&self, ip: IpAddr, offence: Offence) {
        self.0.offend(ip, offence);
    }
}

/// The running loop; [`ClosedLoop::stop`] (or drop) ends its tasks.
pub struct ClosedLoop {
    state: Arc<LoopState>,
    tasks: tokio::task::JoinSet<()>,
}

/// Call before [`Kernel::load`] (see `kernel::hold_steering_link`).
pub fn prepare(config: &Config) -> Option<HeldLink> {
    if !config.bypass.enabled {
        return None;
    }
    crate::kernel::hold_steering_link(&config.kernel.pin_path, config.kernel.netns.as_deref())
}

impl ClosedLoop {
    /// Sets the loop up over a loaded kernel side: syncs the allow list and
    /// attaches steering when configured. Needs root, no runtime (it runs
    /// before the privilege drop, see `ops::privileges`); [`ClosedLoop::run`]
    /// starts reading events.
    pub fn attach(
        config: &Config,
        kernel: &mut Kernel,
        held: Option<HeldLink>,
        metrics: &Metrics,
    ) -> Result<ClosedLoop> {
        let mut maps = kernel.maps().context("cannot open the kernel's maps")?;
        allow_sync::sync(&mut maps, config);
        let maps = Arc::new(Mutex::new(maps));
        let mut mta_inodes = Vec::new();
        let steer = if config.bypass.enabled {
            if let Some(ns) = &config.kernel.netns {
                // sk_lookup can only hand out sockets of its own namespace,
                // and the listeners are found in the agent's.
                anyhow::bail!(
                    "bypass.enabled: the agent must run in the network namespace it serves \
                     (kernel.netns = {ns:?} is set); start it there instead"
                );
            }
            kernel.attach_steering(held, !config.kernel.detach_on_exit)?;
            let mut s = SteerMaps::open(kernel.pin_path())?;
            s.set_settings(steer_settings(config))?;
            match s.take_mta(&config.bypass.mta_listeners) {
                Ok(taken) => {
                    mta_inodes = taken.iter().map(|l| Some(l.inode)).collect();
                    metrics.kernel_feature("bypass", true);
                }
                // Without the MTA's socket nothing can be steered to it:
                // every client goes to the agent, as without bypass.
                Err(e) => {
                    warn!("bypass: {e:#}; trusted clients go through the agent");
                    metrics.kernel_feature("bypass", false);
                }
            }
            if config.kernel.detach_on_exit && config.bypass.fail_open {
                warn!(
                    "bypass.fail_open needs kernel.detach_on_exit = false: the steering \
                     program ends with the agent"
                );
            }
            Some(Mutex::new(s))
        } else {
            None
        };
        let state = Arc::new(LoopState {
            pregreet: Arc::new(verdict::KernelPreGreet::new(maps.clone())),
            auth: Arc::new(auth::KernelAuthStore::new(maps.clone())),
            maps,
            config: Mutex::new(Arc::new(config.clone())),
            tracker: Mutex::new(offenders::Tracker::new(offenders::Rules::from_config(
                &config.offenders,
            ))),
            steer,
            mta_inodes: Mutex::new(mta_inodes),
            share: std::sync::OnceLock::new(),
            shared_allow: Mutex::default(),
            blocks: BlockCounters {
                added: metrics.blocks_added.clone(),
                expired: metrics.blocks_expired.clone(),
                evicted: metrics.blocks_evicted.clone(),
            },
            allow: match AllowLookup::open(kernel.pin_path()) {
                Ok(a) => Some(a),
                Err(e) => {
                    warn!("the kernel's allow list cannot be read per connection: {e}");
                    None
                }
            },
        });
        if state.steer.is_some() {
            let scrape = SteerScrape(LoopHandle(state.clone()));
            metrics.register(|r| r.register_collector(Box::new(scrape)));
        }
        Ok(ClosedLoop {
            state,
            tasks: tokio::task::JoinSet::new(),
        })
    }

    /// Starts reading the kernel's events (from the pins under
    /// `pin_path`) and sweeping; inside the tokio runtime.
    pub fn run(&mut self, pin_path: &std::path::Path) {
        match EventStream::open(pin_path) {
            Ok(stream) => {
                self.tasks.spawn(read_events(self.state.clone(), stream));
            }
            Err(e) => warn!("kernel events not read: {e}"),
        }
        self.tasks.spawn(sweep(self.state.clone()));
    }

    /// A handle on the loop for reloads and scrapes.
    pub fn handle(&self) -> LoopHandle {
        LoopHandle(self.state.clone())
    }

    /// The ports the sessions use (see [`LoopHandle::ports`]).
    pub fn ports(&self) -> Ports {
        self.handle().ports()
    }

    /// The agent's listeners are bound: put them into the steering map so
    /// untrusted clients go to the agent (until now, with fail-open, they
    /// went to the MTA).
    pub fn agent_listening(&self, addrs: &[SocketAddr]) -> Result<()> {
        let Some(steer) = &self.state.steer else {
            return Ok(());
        };
        let mut s = steer.lock().unwrap_or_else(|e| e.into_inner());
        s.take_agent(addrs)?;
        info!("bypass: the agent takes untrusted clients");
        Ok(())
    }

    /// Applies a reloaded configuration: allow list, thresholds, steering.
    pub fn reload(&self, config: &Config) {
        self.state.reload(config);
    }

    /// Ends the loop's tasks (the kernel side stays as configured).
    pub fn stop(mut self) {
        self.tasks.abort_all();
    }
}

impl LoopState {
    fn config(&self) -> Arc<Config> {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn reload(&self, config: &Config) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(config.clone());
        {
            let shared = self
                .shared_allow
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            allow_sync::sync_keeping(&mut maps, config, &shared);
        }
        // Entries the sync put on a list that was empty count at once.
        if let Some(allow) = &self.allow {
            allow.recheck();
        }
        self.tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_rules(offenders::Rules::from_config(&config.offenders));
        if let Some(steer) = &self.steer {
            let mut s = steer.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = s.set_settings(steer_settings(config)) {
                warn!("bypass: {e:#}");
            }
        }
    }

    /// Allow-listed and internal addresses are never blocked or slowed:
    /// the policy's rule (`Precedence::never_sanctioned`), asked first
    /// without the kernel's allow list, which is read only when the
    /// configuration does not settle it.
    fn exempt(&self, ip: IpAddr, config: &Config) -> Option<&'static str> {
        let rule = crate::policy::precedence::Precedence::new(config);
        if let Some(why) = rule.never_sanctioned(ip, false) {
            return Some(why);
        }
        let ip = ip.to_canonical();
        let listed = match &self.allow {
            Some(a) => a.contains(ip).map_err(|e| e.to_string()),
            None => {
                let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
                maps.allow_match(ip)
                    .map(|m| m.is_some())
                    .map_err(|e| e.to_string())
            }
        };
        match listed {
            Ok(listed) => rule.never_sanctioned(ip, listed),
            // Cannot tell: do not block.
            Err(_) => Some("allow list unreadable"),
        }
    }

    fn offend(&self, ip: IpAddr, kind: Offence) {
        self.offend_from(ip, kind, None);
    }

    /// An offence, seen here now (`remote` `None`, then shared with the
    /// cluster if there is one) or at another MX host, `remote` ago.
    fn offend_from(&self, ip: IpAddr, kind: Offence, remote: Option<std::time::Duration>) {
        let ip = ip.to_canonical();
        let config = self.config();
        if let Some(why) = self.exempt(ip, &config) {
            debug!(client = %ip, offence = kind.as_str(), "offence not acted on: {why}");
            return;
        }
        if remote.is_none()
            && let Some(share) = self.share.get()
        {
            share.share(ip, kind);
        }
        let now = tokio::time::Instant::now();
        let at = match remote.map(|age| now.checked_sub(age)) {
            None => now,
            Some(Some(at)) => at,
            // Older than this clock reaches: long out of any window.
            Some(None) => return,
        };
        let sanction = self
            .tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record_at(ip, kind, at, now);
        let oc = &config.offenders;
        match sanction {
            Sanction::Block {
                net,
                reason,
                offence,
                count,
            } if oc.enabled => {
                let net = offenders::block_target(net, ip, &config.allow.internal);
                let spec = BlockSpec {
                    ttl: Some(oc.block_ttl),
                    reason,
                    all_ports: oc.block_all_ports,
                    hold: oc.action == crate::config::OffenderAction::Hold,
                };
                let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
                // The automatic part of the block list: it makes its own
                // room, the admin's list is never touched.
                match maps.auto_block_add(net, spec) {
                    Ok(added) => {
                        if added.added {
                            self.blocks.added.inc();
                        }
                        if !added.evicted.is_empty() {
                            self.blocks.evicted.inc_by(added.evicted.len() as u64);
                            warn!(
                                evicted = added.evicted.len(),
                                oldest = %added.evicted[0],
                                "automatic block list full (kernel.auto_block_entries): its \
                                 oldest entries made room"
                            );
                        }
                        let _ = maps.slow_del(ip);
                        warn!(
                            client = %ip,
                            block = %net,
                            reason = reason.name(),
                            ttl = %humantime::format_duration(oc.block_ttl),
                            "repeat offender blocked in XDP: {count} {} within {}",
                            offence.as_str(),
                            humantime::format_duration(oc.window)
                        );
                    }
                    Err(e) => warn!(client = %ip, block = %net, "repeat offender not blocked: {e}"),
                }
            }
            Sanction::Block { count, offence, .. } => info!(
                client = %ip,
                "repeat offender ({count} {}) not blocked: offenders.enabled is off",
                offence.as_str()
            ),
            Sanction::SlowDown { count } if oc.slowdown => {
                let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
                match maps.slow_add(ip, Some(oc.slowdown_ttl)) {
                    Ok(()) => info!(
                        client = %ip,
                        ttl = %humantime::format_duration(oc.slowdown_ttl),
                        "offender slowed down (TCP window clamp): {count} {}",
                        kind.as_str()
                    ),
                    Err(e) => warn!(client = %ip, "offender not slowed down: {e}"),
                }
            }
            Sanction::SlowDown { .. } | Sanction::Nothing => {}
        }
    }
}

/// Reads the kernel's events for as long as the loop runs.
async fn read_events(inner: Arc<LoopState>, mut stream: EventStream) {
    loop {
        let ev = match stream.next().await {
            Ok(ev) => ev,
            Err(e) => {
                warn!("kernel event stream failed: {e}; events no longer read");
                return;
            }
        };
        match ev.kind {
            EventKind::PreGreet { teaser } => {
                info!(
                    client = %ev.addr,
                    port = ev.server_port,
                    teaser,
                    "pre-greet talk seen by the kernel"
                );
                inner.offend(ev.addr, Offence::PreGreet);
            }
            EventKind::BlockHit { reason, count } => {
                let name = tarpit_common::BlockReason::from_code(reason)
                    .map(|r| r.name())
                    .unwrap_or("unknown");
                info!(client = %ev.addr, reason = name, drops = count, "block list drops (sample)");
            }
            EventKind::FlowTableFull => {
                warn!("kernel flow table full: pre-greet detection degrades to \"unknown\"")
            }
            EventKind::IpTableFull => warn!("kernel per-address map refused an entry"),
            EventKind::Other(k) => debug!(kind = k, "kernel event of an unknown kind"),
        }
    }
}

/// Removes expired entries from the kernel's lists now and then.
async fn sweep(inner: Arc<LoopState>) {
    loop {
        let every = inner.config().offenders.sweep_interval;
        tokio::time::sleep(every.max(Duration::from_secs(1))).await;
        let res = {
            let mut maps = inner.maps.lock().unwrap_or_else(|e| e.into_inner());
            maps.sweep_expired()
        };
        match res {
            Ok(r) if r.allow + r.block + r.auth + r.slow > 0 => {
                inner.blocks.expired.inc_by(r.block as u64);
                info!(
                    block = r.block,
                    allow = r.allow,
                    auth = r.auth,
                    slow = r.slow,
                    "expired kernel list entries swept"
                );
            }
            Ok(_) => {}
            Err(e) => warn!("sweep of expired kernel entries failed: {e}"),
        }
        inner
            .tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expire(tokio::time::Instant::now());
        inner.retake_mta();
    }
}
