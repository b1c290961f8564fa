//! `tarpit detach`: removes every program, link, pin and qdisc of ours.
//!
//! The work is [`crate::kernel::detach`]'s (netlink tc filters and the
//! qdiscs tarpit created, link pins, map pins, the directory). Before it,
//! every pinned link is detached with `BPF_LINK_DETACH`, which takes the
//! program off its hook at once even while a running agent still holds the
//! link: removing a pin alone only drops one reference.
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Result, bail};
use clap::Args;

use super::Context;
use super::context::{check_privileges, no_maps_message};

#[derive(Debug, Args)]
pub struct DetachArgs {}

/// Where the loader pins its links, under the pin directory (the kernel
/// module's `attach::LINKS_DIR`).
const LINKS_DIR: &str = "links";

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 4]) -> std::io::Result<i64> {
    // SAFETY: the attr buffer is large enough for both commands used here
    // (BPF_OBJ_GET: pathname, bpf_fd, file_flags; BPF_LINK_DETACH:
    // link_fd) and lives across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned object (map, program or link).
fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path with a NUL byte"))?;
    let mut attr = [0u64; 4];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches every link pinned under `dir` from its hook; returns how many.
/// Links that cannot be force-detached (old kernels, some link types) are
/// left to the pin removal that follows.
fn force_detach_links(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let Ok(fd) = obj_get(&e.path()) else { continue };
        let mut attr = [0u64; 4];
        attr[0] = fd.as_raw_fd() as u64;
        if bpf(BPF_LINK_DETACH, &mut attr).is_ok() {
            n += 1;
        }
    }
    n
}

pub fn run(ctx: &Context, _args: DetachArgs) -> Result<()> {
    check_privileges()?;
    let pin = &ctx.pin_path;
    if !pin.is_dir() {
        bail!("{}", no_maps_message(pin));
    }
    let forced = force_detach_links(&pin.join(LINKS_DIR));
    let report = crate::kernel::detach(pin)?;
    if pin.exists() {
        let left: Vec<String> = std::fs::read_dir(pin)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "{} is not empty after detaching; left: {} (not tarpit's: remove them by hand)",
            pin.display(),
            left.join(", ")
        );
    }
    println!(
        "detached {} link{} ({} taken off their hooks at once) and removed {} map pin{} \
         under {}",
        report.links,
        if report.links == 1 { "" } else { "s" },
        forced,
        report.maps,
        if report.maps == 1 { "" } else { "s" },
        pin.display()
    );
    Ok(())
}
