//! `tarpit run`: the agent's life cycle.
use std::path::Path;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{error, info, warn};

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::closed_loop::{ClosedLoop, LoopHandle};
use crate::metrics::Metrics;
use crate::ops::metrics::KernelScrape;
use crate::policy::Policy;
use crate::policy::ports::Ports;
use crate::server::Server;
use crate::session::Shared;
use crate::shutdown::Shutdown;
use crate::{config::Config, kernel::Kernel};

pub fn run(config_path: &Path) -> Result<()> {
    // First: no thread may have taken an arena of its own yet.
    crate::heap::one_malloc_arena();
    let config = Config::load(config_path)?;
    // Log format and level, pid file: before anything privileged.
    let mut daemon = crate::ops::Daemon::start(config_path, &config)?;
    for w in config.warnings() {
        warn!(key = w.key, "{w}");
    }
    let root = privileged(&config, &daemon)?;
    // Ports bound, programs attached, maps open: root is not needed any
    // more. Dropped on this, the only thread: capabilities belong to
    // threads, and the runtime's threads, started next, inherit the
    // reduced sets (ops::privileges).
    daemon.drop_privileges()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(agent(root, &mut daemon))
}

/// What the agent sets up as root, before its runtime starts.
struct Privileged {
    kernel: Kernel,
    closed_loop: crate::closed_loop::ClosedLoop,
    /// `[cluster]`, set up (maps open, password read); `None` without one.
    cluster: Option<crate::cluster::Prepared>,
    bound: Bound,
}

/// Loads and attaches the kernel side, opens its maps, binds the ports and
/// reads the TLS key: everything that needs root, on one thread, with no
/// async runtime (see [`run`]).
fn privileged(config: &Config, daemon: &crate::ops::Daemon) -> Result<Privileged> {
    crate::kernel_version::check_min_kernel()?;
    let held = crate::closed_loop::prepare(config);
    let metrics = Arc::new(Metrics::new());
    let mut kernel = Kernel::load(&config.kernel)?;
    for (feature, available) in kernel.features() {
        metrics.kernel_feature(feature, available);
    }
    crate::state::restore_at_start(&config.kernel.pin_path, &config.state.file)?;
    // Opened as root: scrapes and reloads use the maps after the drop.
    let closed_loop = ClosedLoop::attach(config, &mut kernel, held, &metrics)?;
    let kernel_scrape = crate::kernel::KernelMaps::open(&config.kernel.pin_path)
        .ok()
        .map(|maps| Arc::new(KernelScrape::new(maps)));
    // The password file is root's, the maps are opened as root.
    let cluster =
        crate::cluster::prepare(config, &config.kernel.pin_path, &metrics, daemon.config())?;
    let reloads = daemon.config_watch().counts();
    metrics.register(|r| {
        reloads.register(r);
        if let Some(k) = &kernel_scrape {
            r.register_collector(Box::new(k.clone()));
        }
    });
    let handles = Handles {
        ports: closed_loop.ports(),
        shutdown: daemon.shutdown(),
        closed_loop: Some(closed_loop.handle()),
        metrics,
        kernel: kernel_scrape,
    };
    let bound = bind_agent(config, daemon.config(), handles)?;
    closed_loop.agent_listening(&config.listen.addrs)?;
    Ok(Privileged {
        kernel,
        closed_loop,
        cluster,
        bound,
    })
}

async fn agent(root: Privileged, daemon: &mut crate::ops::Daemon) -> Result<()> {
    let Privileged {
        mut kernel,
        mut closed_loop,
        cluster,
        bound,
    } = root;
    kernel.relay_log();
    closed_loop.run(kernel.pin_path());
    // Only now, on threads that all dropped, are clients accepted.
    let mut agent = bound.serve(cluster)?;
    daemon.ready()?;
    info!("tarpit agent running; Ctrl-C or SIGTERM stops it");
    let signal = daemon.wait_for_stop().await?;
    info!(%signal, "stopping");
    daemon.drain().await;
    agent.abort_all();
    closed_loop.stop();
    kernel.shutdown()
}

/// What the agent hands down to its sessions and reloads instead of
/// process-wide state.
#[derive(Clone)]
pub struct Handles {
    /// The policy's ports: the closed loop's, or [`Ports::standalone`].
    pub ports: Ports,
    /// The agent's stop, watched by the server and every session.
    pub shutdown: Shutdown,
    /// The running loop, told about reloads (none without a kernel side).
    pub closed_loop: Option<LoopHandle>,
    /// The one registry's owner: every part registers into it.
    pub metrics: Arc<Metrics>,
    /// The kernel's maps as opened at start: reloads write its settings.
    pub kernel: Option<Arc<KernelScrape>>,
}

/// The agent with its listeners bound and its sessions' shared state built
/// (TLS key read as root), not yet accepting anyone.
pub struct Bound {
    server: Server,
    metrics: Option<(std::net::TcpListener, Arc<Metrics>)>,
    shared: watch::Sender<Arc<Shared>>,
    updates: watch::Receiver<Arc<Config>>,
    config: Arc<Config>,
    closed_loop: Option<LoopHandle>,
    kernel: Option<Arc<KernelScrape>>,
}

/// Builds the sessions' shared state from the config and binds the SMTP
/// and metrics listeners (failing loudly if one cannot be bound), without
/// a runtime. Nothing is accepted until [`Bound::serve`].
pub fn bind_agent(
    config: &Config,
    updates: watch::Receiver<Arc<Config>>,
    handles: Handles,
) -> Result<Bound> {
    let metrics = handles.metrics;
    let tls = config.tls.server_config()?.map(TlsAcceptor::from);
    let reputation = crate::reputation::Reputation::from_config(config, Arc::default())?;
    // Once: reloads hand the same counters to the rebuilt checks.
    metrics.register(|r| reputation.metrics().register(r));
    // Opened in `serve`, after the drop (see there).
    let greylist = None;
    let shared = Arc::new(Shared {
        policy: Policy::new(config),
        backend: config.backend.clone(),
        limits: config.limits.clone(),
        smtp: config.smtp.clone(),
        tls,
        tls_auth_only: config.tls.auth_only,
        metrics: metrics.clone(),
        ports: handles.ports,
        shutdown: handles.shutdown,
        reputation,
        greylist,
        mta: crate::backend::probe::MtaProfile::default(),
        pacer: crate::backend::pace::Pacer::new(
            config.backend.max_connecting,
            config.backend.max_sessions,
        ),
    });
    let metrics = match config.metrics.listen {
        Some(addr) => Some((crate::metrics::bind(addr)?, metrics)),
        None => None,
    };
    let (shared_tx, _) = watch::channel(shared.clone());
    let server = Server::bind(&config.listen.addrs, config.listen.backlog, shared)?;
    Ok(Bound {
        server,
        metrics,
        shared: shared_tx,
        updates,
        config: Arc::new(config.clone()),
        closed_loop: handles.closed_loop,
        kernel: handles.kernel,
    })
}

impl Bound {
    /// Opens the greylist store and starts accepting SMTP and metrics
    /// clients. Called after the privilege drop: no client is ever served
    /// by a thread that still has root's privileges, and the store is
    /// opened as the agent's user, in the directory handed to it, so a
    /// link planted there can only reach what that user may write anyway.
    /// Dropping or aborting the returned set stops everything, the
    /// cluster task (started here when `cluster` is set) included.
    pub fn serve(
        self,
        cluster: Option<crate::cluster::Prepared>,
    ) -> Result<tokio::task::JoinSet<()>> {
        let mut tasks = tokio::task::JoinSet::new();
        let greylist = crate::reputation::Greylist::open(
            &self.config.greylist,
            self.shared.borrow().reputation.metrics().clone(),
            crate::reputation::unix_now(),
        )?;
        let greylist = match cluster {
            Some(c) => c.start(greylist, self.closed_loop.clone(), &mut tasks),
            None => greylist,
        };
        if greylist.is_some() {
            self.shared.send_modify(|s| {
                let mut with = (**s).clone();
                with.greylist = greylist;
                *s = Arc::new(with);
            });
        }
        if let Some((l, metrics)) = self.metrics {
            tasks.spawn(crate::metrics::serve(l, metrics));
        }
        let server = self.server.with_updates(self.shared.subscribe());
        tasks.spawn(server.serve());
        tasks.spawn(probe_mta(self.shared.subscribe()));
        tasks.spawn(apply_reloads(
            self.updates,
            self.shared,
            self.config,
            self.closed_loop,
            self.kernel,
        ));
        Ok(tasks)
    }
}

/// Keeps what the MTA says before a transaction (`Shared::mta`) fresh for
/// `backend.connect = "at-transaction"`: a probe at start, on every reload
/// and every `backend.probe_interval` (sooner, every few seconds, while
/// probes fail: until one succeeds, sessions connect the MTA at once).
async fn probe_mta(mut shared: watch::Receiver<Arc<Shared>>) {
    const RETRY: std::time::Duration = std::time::Duration::from_secs(5);
    let mut probed = None;
    loop {
        let s = shared.borrow_and_update().clone();
        let mut wait = s.backend.probe_interval;
        if probed
            .replace(s.backend.addr.clone())
            .is_some_and(|a| a != s.backend.addr)
        {
            // Another MTA: what the old one said is no guide.
            s.mta.clear();
        }
        if s.backend.connect == crate::config::ConnectMode::AtTransaction {
            match crate::backend::probe::probe(&s.backend).await {
                Ok(learned) => {
                    if s.mta.get().as_deref() != Some(&learned) {
                        info!(banner = %String::from_utf8_lossy(&learned.banner.to_bytes()).trim_end(),
                            keywords = learned.ehlo.ehlo_keywords().len(),
                            "learned the MTA's banner and EHLO reply");
                    }
                    s.mta.set(learned);
                }
                Err(e) => {
                    warn!("probing the MTA: {e}; sessions connect it at once meanwhile");
                    wait = wait.min(RETRY);
                }
            }
        }
        drop(s);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = shared.changed() => if r.is_err() { return },
        }
    }
}

/// On every reload the daemon applied: rebuilds what sessions share from
/// the new config (policy, MTA, limits, TLS, reputation checks, greylist
/// timing) for the next session, keeping the long-lived parts (counters,
/// metrics, the greylist table), and writes the kernel's live settings.
/// Sessions in flight keep what they started with. `started` is the
/// config the agent started with.
async fn apply_reloads(
    mut updates: watch::Receiver<Arc<Config>>,
    shared: watch::Sender<Arc<Shared>>,
    started: Arc<Config>,
    closed_loop: Option<LoopHandle>,
    kernel: Option<Arc<KernelScrape>>,
) {
    // The config the running reputation checks were built from.
    let mut reputation_from = started;
    while updates.changed().await.is_ok() {
        let config = updates.borrow_and_update().clone();
        let tls = match config.tls.server_config() {
            Ok(t) => t.map(TlsAcceptor::from),
            Err(e) => {
                error!(
                    target: "tarpit::ops::reload",
                    "tls: {e:#}; new sessions keep the previous settings"
                );
                continue;
            }
        };
        let mut next = (**shared.borrow()).clone();
        if crate::reputation::Reputation::config_changed(&reputation_from, &config) {
            // The reload checked that these build (`ops::reload::preflight`).
            match crate::reputation::Reputation::from_config(
                &config,
                next.reputation.metrics().clone(),
            ) {
                Ok(r) => {
                    next.reputation = r;
                    reputation_from = config.clone();
                    info!(
                        target: "tarpit::ops::reload",
                        lists = config.dnsbl.sites.len() + config.dnswl.sites.len(),
                        "reputation checks rebuilt ([dns], [dnsbl], [dnswl], allow.hosts): \
                         new sessions use them, with empty DNS caches"
                    );
                }
                Err(e) => {
                    error!(
                        target: "tarpit::ops::reload",
                        key = e.key().unwrap_or("-"),
                        "reputation checks not rebuilt, new sessions keep the previous ones: {e}"
                    );
                }
            }
        }
        next.greylist = next
            .greylist
            .as_ref()
            .map(|g| g.reconfigure(&config.greylist));
        next.policy = Policy::new(&config);
        if (config.backend.max_connecting, config.backend.max_sessions)
            != (next.backend.max_connecting, next.backend.max_sessions)
        {
            // New limits for new sessions; those open keep their slots
            // in the old ones until they end.
            next.pacer = crate::backend::pace::Pacer::new(
                config.backend.max_connecting,
                config.backend.max_sessions,
            );
        }
        next.backend = config.backend.clone();
        next.limits = config.limits.clone();
        next.tls = tls;
        shared.send_replace(Arc::new(next));
        if let Some(l) = &closed_loop {
            l.reload(&config);
        }
        if let Some(k) = &kernel
            && let Err(e) = k.apply_kernel_settings(&config.kernel)
        {
            warn!(target: "tarpit::ops::reload", "kernel settings not updated: {e:#}");
        }
    }
}
