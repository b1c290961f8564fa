//! `tarpit run`: the agent's life cycle.
use std::path::Path;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

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
    info!("tarpit agent running; Ctrl-C or SIGTERM stops it");
    wait_for_stop().await?;
    info!("stopping");
    kernel.shutdown()
}

async fn wait_for_stop() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
