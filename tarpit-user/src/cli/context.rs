//! What every inspection command needs before it touches the kernel: the
//! configuration, the pin directory, the state file, and the checks that
//! turn the usual failures into one clear sentence.
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::kernel_glue::KernelMaps;
use crate::config::Config;

/// Resolved settings of one command-line invocation.
pub struct Context {
    pub config: Config,
    pub pin_path: PathBuf,
    pub state_file: PathBuf,
}

/// CAP_BPF (linux/capability.h).
const CAP_BPF: u32 = 39;
/// CAP_SYS_ADMIN, which implies the BPF rights on older kernels.
const CAP_SYS_ADMIN: u32 = 21;

impl Context {
    /// `explicit` is true when the user named the config file: then it must
    /// exist. The default file may be absent (a box where only the command
    /// line is used); built-in defaults apply then.
    pub fn new(config_path: &Path, explicit: bool, pin_path: Option<PathBuf>) -> Result<Context> {
        let config = if explicit || config_path.exists() {
            Config::load(config_path)?
        } else {
            Config::default()
        };
        let pin_path = pin_path.unwrap_or_else(|| config.kernel.pin_path.clone());
        let state_file = config.state.file.clone();
        Ok(Context {
            config,
            pin_path,
            state_file,
        })
    }

    /// Opens the pinned maps for reading and writing, after checking the
    /// privileges, that the maps exist, and that their layout is ours.
    pub fn open(&self) -> Result<KernelMaps> {
        check_privileges()?;
        KernelMaps::open(&self.pin_path)
    }
}

/// Refuses early, with the sentence an admin needs, when the caller cannot
/// use bpf(2) on pinned maps.
pub fn check_privileges() -> Result<()> {
    if has_bpf_privileges() {
        return Ok(());
    }
    bail!("needs root or CAP_BPF (run it with sudo)")
}

fn has_bpf_privileges() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    eff & (1 << CAP_BPF) != 0 || eff & (1 << CAP_SYS_ADMIN) != 0
}

/// The sentence for "there are no maps here".
pub fn no_maps_message(pin_path: &Path) -> String {
    format!(
        "no tarpit maps at {}; start the agent with `tarpit run`",
        pin_path.display()
    )
}
