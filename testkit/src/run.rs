//! Running helper programs whose failure must stop the setup.
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `cmd` to completion; an error carries its output when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
