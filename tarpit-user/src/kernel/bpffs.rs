//! bpffs: where pinned maps and links live. Not mounted by default on many
//! systems, so the agent mounts it itself when the pin path is under the
//! usual `/sys/fs/bpf`.
use std::path::Path;

use anyhow::{Context, Result, bail};
use tracing::info;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `pin_path` lies on a bpffs, mounting `/sys/fs/bpf` if needed.
pub fn ensure_bpffs(pin_path: &Path) -> Result<()> {
    // The nearest existing ancestor decides which filesystem the pins land on.
    let existing = pin_path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let default = Path::new(DEFAULT_BPFFS);
    if pin_path.starts_with(default) && !is_bpffs(default) {
        nix::mount::mount(
            Some("bpf"),
            default,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("cannot mount bpffs at /sys/fs/bpf (needs root or CAP_SYS_ADMIN)")?;
        info!("mounted bpffs at {DEFAULT_BPFFS}");
        return Ok(());
    }
    bail!(
        "{} is not on a bpffs mount; set kernel.pin_path under /sys/fs/bpf or mount one with \
         `mount -t bpf bpf DIR`",
        pin_path.display()
    )
}
