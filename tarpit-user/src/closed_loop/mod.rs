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
//! The sessions reach the loop through the seams the agent keeps for it
//! ([`pregreet`], [`auth_store`], [`offence`]): when no loop runs (no
//! kernel side, unit tests), they are `None` and the agent's own
//! detectors apply.
pub mod allow_sync;
pub mod auth;
pub mod offenders;
pub mod verdict;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use tarpit_common::steer::{
    STEER_F_ALLOWED, STEER_F_AUTHENTICATED, STEER_F_FAIL_OPEN, SteerSettings,
};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::kernel::{
    AllowLookup, BlockSpec, EventKind, EventStream, HeldLink, Kernel, KernelMaps, SteerCounters,
    SteerMaps,
};
use crate::policy::AuthenticatedIps;
use crate::session::PreGreetVerdict;
pub use offenders::{Offence, Verdict};

/// What the sessions and the event reader share.
struct Inner {
    maps: Arc<Mutex<KernelMaps>>,
    config: Mutex<Arc<Config>>,
    tracker: Mutex<offenders::Tracker>,
    steer: Option<Mutex<SteerMaps>>,
    /// Inodes of the MTA listeners in the sockmap (to notice a restart).
    mta_inodes: Mutex<Vec<Option<u64>>>,
    pregreet: Arc<verdict::KernelPreGreet>,
    auth: Arc<auth::KernelAuthStore>,
    allow: Option<AllowLookup>,
}

static RUNNING: RwLock<Option<Arc<Inner>>> = RwLock::new(None);

fn running() -> Option<Arc<Inner>> {
    RUNNING.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The kernel's pre-greet verdict, when the loop runs.
pub fn pregreet() -> Option<Arc<dyn PreGreetVerdict>> {
    running().map(|i| i.pregreet.clone() as Arc<dyn PreGreetVerdict>)
}

/// The kernel's authenticated-address map, when the loop runs.
pub fn auth_store() -> Option<Arc<dyn AuthenticatedIps>> {
    running().map(|i| i.auth.clone() as Arc<dyn AuthenticatedIps>)
}

/// Is `ip` on the kernel's allow list (config or run-time entry)? The
/// agent asks on every connection, so one list spares a client in XDP,
/// sk_lookup and the agent alike. `false` without a loop or on a read
/// error (the config's own `allow.ips` still apply).
pub fn allowlisted(ip: IpAddr) -> bool {
    let Some(i) = running() else { return false };
    let Some(allow) = &i.allow else { return false };
    match allow.contains(ip) {
        Ok(b) => b,
        Err(e) => {
            debug!(client = %ip, "allow list not readable: {e}");
            false
        }
    }
}

/// Did `ip` authenticate within 24 h, and does that spare its new session
/// from the tarpit? Only with `helo.authenticated_once_per_day` (and
/// `exclude.authenticated`): then a client that authenticated is treated
/// as authenticated from the start of its next connections (also after an
/// agent restart: the AUTH map is pinned), exactly as sk_lookup steers it
/// past the agent when bypass is on. With the flag off it pays again.
pub fn authenticated_today(policy: &crate::policy::Policy, ip: IpAddr) -> bool {
    if !policy.auth_spares_new_sessions() {
        return false;
    }
    let Some(i) = running() else { return false };
    i.auth
        .last_authenticated(ip, tokio::time::Instant::now())
        .is_some()
}

/// The sk_lookup program's steering counts, read now; `None` when no
/// bypass runs (`bypass.enabled` off, or no loop).
pub fn steer_counters() -> Option<Result<SteerCounters>> {
    let i = running()?;
    let steer = i.steer.as_ref()?;
    Some(steer.lock().unwrap_or_else(|e| e.into_inner()).counters())
}

/// A session ended: sessions the agent dropped for policy (a DNSBL
/// `drop`) count as rejected sessions. (The pre-greet 554 is counted from
/// the kernel's event, never twice.)
pub fn session_ended(ip: IpAddr, outcome: crate::metrics::Outcome) {
    if outcome == crate::metrics::Outcome::DnsblDrop {
        offence(ip, Offence::Rejected);
    }
}

/// Reports an offence seen by a session (no-op without a loop).
pub fn offence(ip: IpAddr, kind: Offence) {
    if let Some(i) = running() {
        i.offend(ip, kind);
    }
}

/// The running loop; [`ClosedLoop::stop`] (or drop) ends its tasks.
pub struct ClosedLoop {
    inner: Arc<Inner>,
    tasks: tokio::task::JoinSet<()>,
}

/// Call before [`Kernel::load`] (see `kernel::hold_steering_link`).
pub fn prepare(config: &Config) -> Option<HeldLink> {
    if !config.bypass.enabled {
        return None;
    }
    crate::kernel::hold_steering_link(&config.kernel.pin_path, config.kernel.netns.as_deref())
}

/// The steering settings a config asks for.
pub fn steer_settings(config: &Config) -> SteerSettings {
    let mut s = SteerSettings::default();
    if !config.bypass.enabled {
        return s;
    }
    for (slot, port) in s.ports.iter_mut().zip(&config.bypass.ports) {
        *slot = *port;
    }
    if config.bypass.allowlisted && config.exclude.allowlisted {
        s.flags |= STEER_F_ALLOWED;
    }
    if config.bypass.authenticated && config.helo.authenticated_once_per_day {
        s.flags |= STEER_F_AUTHENTICATED;
    }
    if config.bypass.fail_open {
        s.flags |= STEER_F_FAIL_OPEN;
    }
    s
}

impl ClosedLoop {
    /// Starts the loop over a loaded kernel side: syncs the allow list,
    /// attaches steering when configured, and starts reading events.
    /// Must run inside the tokio runtime.
    pub fn start(
        config: &Config,
        kernel: &mut Kernel,
        held: Option<HeldLink>,
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
                    crate::ops::metrics::kernel_feature("bypass", true);
                }
                // Without the MTA's socket nothing can be steered to it:
                // every client goes to the agent, as without bypass.
                Err(e) => {
                    warn!("bypass: {e:#}; trusted clients go through the agent");
                    crate::ops::metrics::kernel_feature("bypass", false);
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
        let inner = Arc::new(Inner {
            pregreet: Arc::new(verdict::KernelPreGreet::new(maps.clone())),
            auth: Arc::new(auth::KernelAuthStore::new(maps.clone())),
            maps,
            config: Mutex::new(Arc::new(config.clone())),
            tracker: Mutex::new(offenders::Tracker::new(offenders::Rules::from_config(
                &config.offenders,
            ))),
            steer,
            mta_inodes: Mutex::new(mta_inodes),
            allow: match AllowLookup::open(kernel.pin_path()) {
                Ok(a) => Some(a),
                Err(e) => {
                    warn!("the kernel's allow list cannot be read per connection: {e}");
                    None
                }
            },
        });
        let mut tasks = tokio::task::JoinSet::new();
        match EventStream::open(kernel.pin_path()) {
            Ok(stream) => {
                tasks.spawn(read_events(inner.clone(), stream));
            }
            Err(e) => warn!("kernel events not read: {e}"),
        }
        tasks.spawn(sweep(inner.clone()));
        *RUNNING.write().unwrap_or_else(|e| e.into_inner()) = Some(inner.clone());
        Ok(ClosedLoop { inner, tasks })
    }

    /// The agent's listeners are bound: put them into the steering map so
    /// untrusted clients go to the agent (until now, with fail-open, they
    /// went to the MTA).
    pub fn agent_listening(&self, addrs: &[SocketAddr]) -> Result<()> {
        let Some(steer) = &self.inner.steer else {
            return Ok(());
        };
        let mut s = steer.lock().unwrap_or_else(|e| e.into_inner());
        s.take_agent(addrs)?;
        info!("bypass: the agent takes untrusted clients");
        Ok(())
    }

    /// Applies a reloaded configuration: allow list, thresholds, steering.
    pub fn reload(&self, config: &Config) {
        self.inner.reload(config);
    }

    /// Ends the loop's tasks (the kernel side stays as configured).
    pub fn stop(mut self) {
        self.tasks.abort_all();
        let mut r = RUNNING.write().unwrap_or_else(|e| e.into_inner());
        if r.as_ref().is_some_and(|i| Arc::ptr_eq(i, &self.inner)) {
            *r = None;
        }
    }
}

/// Applies a reloaded configuration to the running loop, if any (for the
/// reload path, which does not hold the [`ClosedLoop`]).
pub fn reload(config: &Config) {
    if let Some(i) = running() {
        i.reload(config);
    }
}

impl Inner {
    fn config(&self) -> Arc<Config> {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn reload(&self, config: &Config) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(config.clone());
        {
            let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            allow_sync::sync(&mut maps, config);
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

    /// Allow-listed and internal addresses are never blocked or slowed.
    fn exempt(&self, ip: IpAddr, config: &Config) -> Option<&'static str> {
        let ip = ip.to_canonical();
        if config.allow.internal.iter().any(|n| n.contains(&ip)) {
            return Some("internal");
        }
        if config.allow.ips.iter().any(|n| n.contains(&ip)) {
            return Some("allow-listed");
        }
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
            Ok(true) => Some("allow-listed"),
            Ok(false) => None,
            // Cannot tell: do not block.
            Err(_) => Some("allow list unreadable"),
        }
    }

    fn offend(&self, ip: IpAddr, kind: Offence) {
        let ip = ip.to_canonical();
        let config = self.config();
        if let Some(why) = self.exempt(ip, &config) {
            debug!(client = %ip, offence = kind.as_str(), "offence not acted on: {why}");
            return;
        }
        let verdict = self
            .tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(ip, kind, tokio::time::Instant::now());
        let oc = &config.offenders;
        match verdict {
            Verdict::Block {
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
                };
                let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
                // The automatic part of the block list: it makes its own
                // room, the admin's list is never touched.
                match maps.auto_block_add(net, spec) {
                    Ok(added) => {
                        if added.added {
                            crate::ops::metrics::blocks_added(1);
                        }
                        if !added.evicted.is_empty() {
                            crate::ops::metrics::blocks_evicted(added.evicted.len() as u64);
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
            Verdict::Block { count, offence, .. } => info!(
                client = %ip,
                "repeat offender ({count} {}) not blocked: offenders.enabled is off",
                offence.as_str()
            ),
            Verdict::SlowDown { count } if oc.slowdown => {
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
            Verdict::SlowDown { .. } | Verdict::Nothing => {}
        }
    }
}

/// Reads the kernel's events for as long as the loop runs.
async fn read_events(inner: Arc<Inner>, mut stream: EventStream) {
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
async fn sweep(inner: Arc<Inner>) {
    loop {
        let every = inner.config().offenders.sweep_interval;
        tokio::time::sleep(every.max(Duration::from_secs(1))).await;
        let res = {
            let mut maps = inner.maps.lock().unwrap_or_else(|e| e.into_inner());
            maps.sweep_expired()
        };
        match res {
            Ok(r) if r.allow + r.block + r.auth + r.slow > 0 => {
                crate::ops::metrics::blocks_expired(r.block as u64);
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

impl Inner {
    /// A restarted MTA listens on new sockets; the old ones left the
    /// sockmap when they closed. Take the new ones (needs the rights the
    /// agent had at start: after a privilege drop this fails and says so).
    fn retake_mta(&self) {
        let Some(steer) = &self.steer else { return };
        let addrs = self.config().bypass.mta_listeners.clone();
        let now = SteerMaps::listener_inodes(&addrs);
        let mut known = self.mta_inodes.lock().unwrap_or_else(|e| e.into_inner());
        if *known == now || now.iter().any(|i| i.is_none()) {
            return;
        }
        let mut s = steer.lock().unwrap_or_else(|e| e.into_inner());
        match s.take_mta(&addrs) {
            Ok(taken) => {
                *known = taken.iter().map(|l| Some(l.inode)).collect();
                info!("bypass: the MTA's listeners changed (MTA restarted); taken again");
            }
            Err(e) => warn!(
                "bypass: the MTA's listeners changed and cannot be taken again ({e:#}); \
                 restart the agent to steer trusted clients and fail open"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    const BYPASS: &str = "[bypass]\nenabled = true\nmta_listeners = [\"127.0.0.1:10026\"]\n";

    #[test]
    fn nothing_is_steered_without_bypass() {
        assert_eq!(steer_settings(&parse("")), SteerSettings::default());
    }

    #[test]
    fn allow_listed_clients_are_steered_only_when_the_agent_would_spare_them() {
        let s = steer_settings(&parse(BYPASS));
        assert_eq!(s.ports[0], 25);
        assert!(s.has(STEER_F_ALLOWED) && s.has(STEER_F_FAIL_OPEN));
        let s = steer_settings(&parse(&format!("{BYPASS}[exclude]\nallowlisted = false\n")));
        assert!(!s.has(STEER_F_ALLOWED));
    }

    #[test]
    fn authenticated_clients_are_steered_only_with_once_per_day() {
        assert!(!steer_settings(&parse(BYPASS)).has(STEER_F_AUTHENTICATED));
        let on = format!("{BYPASS}[helo]\nauthenticated_once_per_day = true\n");
        assert!(steer_settings(&parse(&on)).has(STEER_F_AUTHENTICATED));
        // bypass.authenticated = false wins over the HELO rule.
        let c = parse(
            "[bypass]\nenabled = true\nmta_listeners = [\"127.0.0.1:10026\"]\n\
             authenticated = false\n[helo]\nauthenticated_once_per_day = true\n",
        );
        assert!(!steer_settings(&c).has(STEER_F_AUTHENTICATED));
    }

    #[test]
    fn fail_open_can_be_switched_off() {
        let c = parse(&format!("{BYPASS}fail_open = false\n"));
        assert!(!steer_settings(&c).has(STEER_F_FAIL_OPEN));
    }
}
