//! `cargo xtask run`: build everything, mount bpffs if needed, start the
//! agent with the shipped config.
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::{ebpf, paths, shell};

pub fn run(config: Option<PathBuf>, release: bool) -> Result<()> {
    if !shell::is_root() {
        bail!("`cargo xtask run` must run as root: the agent loads eBPF programs and mounts bpffs");
    }
    ebpf::build()?;
    let mut build = Command::new("cargo");
    build
        .current_dir(paths::root())
        .args(["build", "--package", "tarpit-user", "--bin", "tarpit"]);
    if release {
        build.arg("--release");
    }
    shell::run(&mut build)?;
    let profile = if release { "release" } else { "debug" };
    let bin = paths::root().join("target").join(profile).join("tarpit");
    let config = config.unwrap_or_else(|| paths::root().join("config/tarpit.toml"));
    shell::say(
        "Running",
        &format!("{} run -c {}", bin.display(), config.display()),
    );
    // exec: Ctrl-C goes straight to the agent, which detaches and exits.
    let err = Command::new(bin).arg("run").arg("-c").arg(config).exec();
    bail!("cannot start the agent: {err}")
}
