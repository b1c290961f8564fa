//! Attaching the programs, replacing them in place on restart, and
//! removing everything again.
//!
//! Links (XDP, TCX, cgroup sock_ops) are pinned under `<pin_path>/links/`
//! when they must outlive the agent. A new loader finds a pinned link and
//! swaps its program with `BPF_LINK_UPDATE`: no packet goes unseen and no
//! second copy is attached. netlink tc filters (kernels < 6.6, or
//! `tc_attach = "netlink"`) use a fixed priority and handle and are
//! replaced in place the same way; the clsact qdisc they need is created
//! by us when missing, recorded in the ATTACHMENTS map, and removed on
//! detach only if we created it.
use std::error::Error as StdError;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::{
    maps::{HashMap as AyaHashMap, Map, MapData},
    programs::{
        CgroupAttachMode, SchedClassifier, SockOps, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkOrder},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use tarpit_common::{
    AttachKey,
    maps::{self as names, ATTACH_QDISC_CREATED, ATTACH_TC_NETLINK},
};
use tracing::{info, warn};

use super::{layout::MAPS, netns::in_netns, sys};

pub const XDP_PROGRAM: &str = "tarpit_xdp";
pub const TC_IN_PROGRAM: &str = "tarpit_tc_in";
pub const TC_OUT_PROGRAM: &str = "tarpit_tc_out";
pub const SOCKOPS_PROGRAM: &str = "tarpit_sockops";

/// Priority and handle of our netlink tc filters: fixed, so a restart
/// replaces the filter instead of adding a second one.
const TC_PRIORITY: u16 = 0x7470;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0x7470);

/// Sub-directory of the pin path holding link pins.
pub const LINKS_DIR: &str = "links";

/// Something attached that this process must undo (or leave) on exit.
pub enum Attachment {
    /// A link owned by this process only: detached when dropped.
    Owned(#[allow(dead_code, reason = "held to keep the link attached")] FdLink),
    /// A pinned link: outlives the process; removed by detach.
    Pinned(PathBuf),
    /// A netlink tc filter owned by this process: detached when dropped.
    Netlink(SchedClassifierLink),
}

/// Runs `f` in the configured network namespace (or right here).
pub fn in_ns<T: Send, F: FnOnce() -> T + Send>(netns: Option<&str>, f: F) -> Result<T> {
    match netns {
        Some(ns) => in_netns(ns, f),
        None => Ok(f()),
    }
}

/// A link pin name. bpffs refuses names with a dot, so dots in interface
/// or namespace names become underscores.
pub fn link_pin(pin_path: &Path, kind: &str, netns: Option<&str>, target: &str) -> PathBuf {
    let clean = |s: &str| s.replace('.', "_");
    let name = match netns {
        Some(ns) => format!("{kind}@{}@{}", clean(ns), clean(target)),
        None => format!("{kind}@{}", clean(target)),
    };
    pin_path.join(LINKS_DIR).join(name)
}

/// Swaps the program of a pinned link, or attaches afresh with `fresh`
/// (pinning the new link when `persist`).
pub fn attach_or_replace(
    prog_fd: std::os::fd::BorrowedFd<'_>,
    pin: &Path,
    persist: bool,
    what: &str,
    fresh: impl FnOnce() -> Result<FdLink>,
) -> Result<Attachment> {
    if pin.exists() {
        match sys::obj_get(pin).and_then(|link| sys::link_update(link.as_fd(), prog_fd)) {
            Ok(()) => {
                info!(
                    "{what}: program replaced in place (pinned link {})",
                    pin.display()
                );
                return Ok(Attachment::Pinned(pin.to_owned()));
            }
            Err(e) => {
                warn!(
                    "{what}: pinned link {} is stale ({e}); attaching anew",
                    pin.display()
                );
                let _ = std::fs::remove_file(pin);
            }
        }
    }
    let link = fresh()?;
    if persist {
        link.pin(pin)
            .with_context(|| format!("{what}: cannot pin link at {}", pin.display()))?;
        info!("{what}: attached, link pinned at {}", pin.display());
        Ok(Attachment::Pinned(pin.to_owned()))
    } else {
        info!("{what}: attached");
        Ok(Attachment::Owned(link))
    }
}

pub fn xdp(
    prog: &mut Xdp,
    pin_path: &Path,
    netns: Option<&str>,
    iface: &str,
    mode: XdpMode,
    persist: bool,
) -> Result<Attachment> {
    let pin = link_pin(pin_path, "xdp", netns, iface);
    let fd = prog.fd()?.try_clone()?;
    attach_or_replace(
        fd.as_fd(),
        &pin,
        persist,
        &format!("XDP on {iface}"),
        || {
            let id = in_ns(netns, || prog.attach(iface, mode))?
                .with_context(|| format!("cannot attach XDP to {iface}"))?;
            let link = prog.take_link(id)?;
            FdLink::try_from(link).context("XDP attached without a link (kernel < 5.9?)")
        },
    )
}

pub fn tcx(
    prog: &mut SchedClassifier,
    pin_path: &Path,
    netns: Option<&str>,
    iface: &str,
    dir: TcAttachType,
    persist: bool,
) -> Result<Attachment> {
    let kind = if dir == TcAttachType::Ingress {
        "tc_in"
    } else {
        "tc_out"
    };
    let pin = link_pin(pin_path, kind, netns, iface);
    let fd = prog.fd()?.try_clone()?;
    attach_or_replace(
        fd.as_fd(),
        &pin,
        persist,
        &format!("tc {kind} on {iface}"),
        || {
            let id = in_ns(netns, || {
                prog.attach_with_options(
                    iface,
                    dir,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
            })?
            .with_context(|| format!("cannot attach tc ({kind}, TCX) to {iface}"))?;
            let link = prog.take_link(id)?;
            FdLink::try_from(link).context("TCX attach returned no link")
        },
    )
}

fn is_eexist(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EEXIST)
        {
            return true;
        }
        if err.to_string().contains("File exists") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Creates the clsact qdisc if missing; `true` when we created it.
pub fn ensure_clsact(netns: Option<&str>, iface: &str) -> Result<bool> {
    match in_ns(netns, || tc::qdisc_add_clsact(iface))? {
        Ok(()) => {
            info!(interface = %iface, "clsact qdisc created");
            Ok(true)
        }
        Err(e) if is_eexist(&e) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot add a clsact qdisc to {iface}")),
    }
}

/// Attaches (or replaces) a netlink tc filter with our fixed priority and
/// handle. With `persist` the filter stays after exit (netlink filters
/// are owned by the qdisc, not by a file descriptor).
pub fn tc_netlink(
    prog: &mut SchedClassifier,
    netns: Option<&str>,
    iface: &str,
    dir: TcAttachType,
    persist: bool,
) -> Result<Option<Attachment>> {
    let opts = || {
        TcAttachOptions::Netlink(NlOptions {
            priority: TC_PRIORITY,
            handle: TC_HANDLE,
            classid: None,
        })
    };
    let link = in_ns(netns, || -> Result<SchedClassifierLink> {
        let id = match prog.attach_with_options(iface, dir, opts()) {
            Ok(id) => id,
            Err(e) if is_eexist(&e) => {
                // Ours from an earlier run: replace it in place.
                let old = SchedClassifierLink::attached(iface, dir, TC_PRIORITY, TC_HANDLE, None)?;
                prog.attach_to_link(old)
                    .with_context(|| format!("cannot replace the tc filter on {iface}"))?
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot attach tc (netlink) to {iface}"));
            }
        };
        Ok(prog.take_link(id)?)
    })??;
    info!(interface = %iface, direction = ?dir, "tc attached through netlink");
    if persist {
        // Dropping the link would detach the filter: leave it to the qdisc.
        std::mem::forget(link);
        Ok(None)
    } else {
        Ok(Some(Attachment::Netlink(link)))
    }
}

pub fn sock_ops(
    prog: &mut SockOps,
    pin_path: &Path,
    cgroup: &Path,
    persist: bool,
) -> Result<Attachment> {
    let dir = File::open(cgroup)
        .with_context(|| format!("cannot open cgroup {} (kernel.cgroup)", cgroup.display()))?;
    let id = dir.metadata()?.ino();
    let pin = link_pin(pin_path, "sockops", None, &id.to_string());
    let fd = prog.fd()?.try_clone()?;
    attach_or_replace(
        fd.as_fd(),
        &pin,
        persist,
        &format!("sock_ops on {}", cgroup.display()),
        || {
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("cannot attach sock_ops to {}", cgroup.display()))?;
            let link = prog.take_link(id)?;
            FdLink::try_from(link).context("sock_ops attached without a link (kernel < 5.7?)")
        },
    )
}

/// Detaches a pinned link at once and removes its pin. (Unpinning alone
/// would also detach it, but later, from a kernel work queue.)
pub fn unpin_link(pin: &Path) -> std::io::Result<()> {
    if let Ok(fd) = sys::obj_get(pin)
        && let Err(e) = sys::link_detach(fd.as_fd())
    {
        // Old kernels without BPF_LINK_DETACH: the unpin below does it.
        tracing::debug!("BPF_LINK_DETACH on {}: {e}", pin.display());
    }
    std::fs::remove_file(pin)
}

/// Removes link pins that this load did not claim (interfaces or cgroups
/// dropped from the config). Only the pin goes: a link someone still
/// holds open (the steering link across a restart) keeps running; the
/// others detach when the kernel releases them.
pub fn remove_stale_links(pin_path: &Path, keep: &[PathBuf]) {
    let Ok(rd) = std::fs::read_dir(pin_path.join(LINKS_DIR)) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if !keep.contains(&p) {
            match std::fs::remove_file(&p) {
                Ok(()) => info!("removed stale link {}", p.display()),
                Err(err) => warn!("cannot remove stale link {}: {err}", p.display()),
            }
        }
    }
}

fn attach_key(netns: Option<&str>, iface: &str) -> AttachKey {
    let mut k = AttachKey {
        netns: [0; 48],
        ifname: [0; 16],
    };
    let ns = netns.unwrap_or("").as_bytes();
    k.netns[..ns.len().min(47)].copy_from_slice(&ns[..ns.len().min(47)]);
    let i = iface.as_bytes();
    k.ifname[..i.len().min(15)].copy_from_slice(&i[..i.len().min(15)]);
    k
}

fn key_str(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Records netlink tc use on an interface (and whether we made its qdisc,
/// keeping that bit from earlier runs).
pub fn record_netlink(
    map: &mut Map,
    netns: Option<&str>,
    iface: &str,
    created_qdisc: bool,
) -> Result<()> {
    let mut h: AyaHashMap<_, AttachKey, u32> = AyaHashMap::try_from(map)?;
    let key = attach_key(netns, iface);
    let old = h.get(&key, 0).unwrap_or(0);
    let flags = old
        | ATTACH_TC_NETLINK
        | if created_qdisc {
            ATTACH_QDISC_CREATED
        } else {
            0
        };
    h.insert(key, flags, 0)
        .context("cannot record the tc attachment (ATTACHMENTS map full?)")?;
    Ok(())
}

/// Removes our netlink tc filters and the qdiscs we created, as recorded.
fn undo_netlink(pin_path: &Path) -> Result<()> {
    let p = pin_path.join(names::ATTACHMENTS);
    if !p.exists() {
        return Ok(());
    }
    let data = MapData::from_pin(&p)?;
    let h: AyaHashMap<_, AttachKey, u32> = AyaHashMap::try_from(Map::from_map_data(data)?)?;
    let records: Vec<(AttachKey, u32)> = h.iter().filter_map(|r| r.ok()).collect();
    for (key, flags) in records {
        let ns = key_str(&key.netns);
        let iface = key_str(&key.ifname);
        let netns = (!ns.is_empty()).then_some(ns.as_str());
        let done = in_ns(netns, || -> Result<()> {
            if flags & ATTACH_TC_NETLINK != 0 {
                for (dir, name) in [
                    (TcAttachType::Ingress, TC_IN_PROGRAM),
                    (TcAttachType::Egress, TC_OUT_PROGRAM),
                ] {
                    match tc::qdisc_detach_program(&iface, dir, name) {
                        Ok(()) => info!(interface = %iface, "tc filter {name} removed"),
                        Err(tc::TcError::IoError(e))
                            if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => warn!(interface = %iface, "cannot remove tc filter {name}: {e}"),
                    }
                }
            }
            if flags & ATTACH_QDISC_CREATED != 0 {
                let idx = sys::ifindex(&iface)?;
                if sys::delete_clsact(idx)? {
                    info!(interface = %iface, "clsact qdisc removed");
                }
            }
            Ok(())
        });
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                warn!(interface = %iface, netns = %ns, "cannot undo tc attachment: {e:#}")
            }
        }
    }
    Ok(())
}

/// What [`detach`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DetachReport {
    pub links: usize,
    pub maps: usize,
}

/// Removes every program, link, pin and qdisc of ours under `pin_path`:
/// netlink tc filters and the qdiscs we created (as recorded), pinned
/// links (which detaches XDP, TCX and sock_ops), every map pin and the
/// directory. Programs of a still-running agent stay until it exits: stop
/// it first.
pub fn detach(pin_path: &Path) -> Result<DetachReport> {
    let mut report = DetachReport::default();
    if !pin_path.exists() {
        return Ok(report);
    }
    if let Err(e) = undo_netlink(pin_path) {
        warn!("cannot read the attachment registry: {e:#}");
    }
    let links = pin_path.join(LINKS_DIR);
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd.flatten() {
            let p = e.path();
            unpin_link(&p).with_context(|| format!("cannot remove link pin {}", p.display()))?;
            report.links += 1;
        }
    }
    match std::fs::remove_dir(&links) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot remove {}: {e}", links.display()),
    }
    for spec in MAPS {
        let p = pin_path.join(spec.name);
        match std::fs::remove_file(&p) {
            Ok(()) => report.maps += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot remove pin {}: {e}", p.display()),
        }
    }
    match std::fs::remove_dir(pin_path) {
        Ok(()) => info!(pin_path = %pin_path.display(), "pins removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(pin_path = %pin_path.display(), "pin directory not removed: {e}"),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_are_named_by_kind_namespace_and_target() {
        let p = Path::new("/sys/fs/bpf/t");
        assert_eq!(
            link_pin(p, "xdp", Some("ns1"), "veth0"),
            PathBuf::from("/sys/fs/bpf/t/links/xdp@ns1@veth0")
        );
        assert_eq!(
            link_pin(p, "tc_in", None, "eth0.100"),
            PathBuf::from("/sys/fs/bpf/t/links/tc_in@eth0_100")
        );
    }

    #[test]
    fn attach_keys_round_trip() {
        let k = attach_key(Some("tps-1"), "ts1");
        assert_eq!(key_str(&k.netns), "tps-1");
        assert_eq!(key_str(&k.ifname), "ts1");
        assert_eq!(key_str(&attach_key(None, "lo").netns), "");
    }
}
