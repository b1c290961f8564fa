//! `tarpit run`: the agent's life cycle.
use std::path::Path;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::metrics::Metrics;
use crate::policy::{MemoryAuthStore, Policy};
use crate::server::Server;
use crate::session::{AgentPreGreet, Shared};
use crate::{config::Config, kernel::Kernel};

pub fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(agent(config))
}

async fn agent(config: Config) -> Result<()> {
    crate::kernel_version::check_min_kernel()?;
    let kernel = Kernel::load(&config.kernel)?;
    crate::state::restore_at_start(&config.kernel.pin_path, &config.state.file);
    let mut agent = start_agent(&config).await?;
    info!("tarpit agent running; Ctrl-C or SIGTERM stops it");
    wait_for_stop().await?;
    info!("stopping");
    agent.abort_all();
    kernel.shutdown()
}

/// Builds the sessions' shared state from the config, binds the SMTP and
/// metrics listeners (failing loudly if one cannot be bound) and starts
/// serving. Dropping or aborting the returned set stops everything.
pub async fn start_agent(config: &Config) -> Result<tokio::task::JoinSet<()>> {
    let metrics = Arc::new(Metrics::new());
    let tls = config.tls.server_config()?.map(TlsAcceptor::from);
    let reputation = crate::reputation::Reputation::new(
        &config.dns,
        &config.dnsbl,
        &config.dnswl,
        config.allow.hosts.clone(),
    )?;
    let _ = metrics.reputation.set(reputation.metrics().clone());
    let greylist = crate::reputation::Greylist::open(
        &config.greylist,
        reputation.metrics().clone(),
        crate::reputation::unix_now(),
    )?;
    let shared = Arc::new(Shared {
        policy: Policy::new(config),
        backend: config.backend.clone(),
        limits: config.limits.clone(),
        tls,
        metrics: metrics.clone(),
        auth_store: Arc::new(MemoryAuthStore::new(AUTH_STORE_CAPACITY)),
        pregreet: Arc::new(AgentPreGreet),
        reputation,
        greylist,
    });
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = config.metrics.listen {
        let l = crate::metrics::bind(addr).await?;
        tasks.spawn(crate::metrics::serve(l, metrics));
    }
    let server = Server::bind(&config.listen.addrs, shared).await?;
    tasks.spawn(server.serve());
    Ok(tasks)
}

/// Addresses remembered for the "HELO delay once per day" rule.
const AUTH_STORE_CAPACITY: usize = 100_000;

async fn wait_for_stop() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
