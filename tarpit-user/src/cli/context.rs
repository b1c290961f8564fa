//! What every inspection command needs before it touches the kernel: the
//! configuration, the pin directory, the state file, and the checks that
//! turn the usual failures into one clear sentence.
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::kernel_glue::AdminMaps;
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
    pub fn open(&self) -> Result<AdminMaps> {
        check_privileges()?;
        if let Some(hint) = bpffs_hint(&self.pin_path) {
            bail!("{} ({hint})", no_maps_message(&self.pin_path));
        }
        AdminMaps::open(&self.pin_path)
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

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Why there cannot be maps at `pin_path` when it is not on a bpffs: the
/// filesystem is not mounted (a fresh boot before the agent ran), or the
/// path points elsewhere. `None` when it is on a bpffs.
fn bpffs_hint(pin_path: &Path) -> Option<String> {
    let existing = pin_path.ancestors().find(|p| p.exists())?;
    let magic = nix::sys::statfs::statfs(existing)
        .map(|s| s.filesystem_type().0)
        .ok()?;
    if magic == BPF_FS_MAGIC {
        return None;
    }
    Some(if pin_path.starts_with("/sys/fs/bpf") {
        "no bpffs is mounted at /sys/fs/bpf; the agent mounts it".to_string()
    } else {
        format!("{} is not on a bpffs mount", pin_path.display())
    })
}

/// The sentence for "there are no maps here".
pub fn no_maps_message(pin_path: &Path) -> String {
    format!(
        "no tarpit maps at {}; start the agent with `tarpit run`",
        pin_path.display()
    )
}
