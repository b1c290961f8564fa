//! The release agent, as `cargo xtask install` ships it and the bench
//! measures it: the kernel programs first (tarpit-user's build.rs embeds
//! the object when it exists), then `tarpit` in release.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{ebpf, paths, shell};

/// Builds both; returns the path of the release `tarpit`.
pub fn build() -> Result<PathBuf> {
    ebpf::build().context("building the kernel programs failed")?;
    shell::run(Command::new("cargo").current_dir(paths::root()).args([
        "build",
        "--release",
        "--package",
        "tarpit-user",
        "--bin",
        "tarpit",
    ]))
    .context("building the release agent failed")?;
    Ok(paths::target_dir().join("release/tarpit"))
}
