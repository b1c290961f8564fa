//! The only module that touches aya: loads the kernel programs, pins their
//! maps, writes their settings and attaches them where the config says.
mod bpffs;
mod netns;
mod object;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use tarpit_common::maps::{self as names, Settings};
use tracing::{info, warn};

use crate::config::{KernelConfig, XdpModeSetting};

pub use bpffs::ensure_bpffs;
pub use netns::in_netns;

/// Name of the XDP program in the object file.
const XDP_PROGRAM: &str = "tarpit_xdp";

/// Every map the programs declare, pinned under the pin directory by name.
const PINNED_MAPS: &[&str] = &[names::SYN_COUNT, names::SETTINGS];

/// The loaded and attached kernel side. Dropping it detaches the programs;
/// [`Kernel::shutdown`] also removes the pins when the config asks for it.
pub struct Kernel {
    ebpf: Ebpf,
    pin_path: PathBuf,
    detach_on_exit: bool,
    xdp_links: Vec<(String, XdpLinkId)>,
}

impl Kernel {
    /// Loads the programs, reuses or creates the pinned maps, writes the
    /// settings and attaches XDP to every configured interface.
    pub fn load(cfg: &KernelConfig) -> Result<Kernel> {
        let object = object::ebpf_object()?;
        ensure_bpffs(&cfg.pin_path)?;
        std::fs::create_dir_all(&cfg.pin_path)
            .with_context(|| format!("cannot create pin directory {}", cfg.pin_path.display()))?;

        let pins: Vec<(&str, PathBuf)> = PINNED_MAPS
            .iter()
            .map(|name| (*name, cfg.pin_path.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::SYN_COUNT, cfg.syn_count_entries);
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).context(
            "cannot load the kernel programs (needs root or CAP_BPF + CAP_NET_ADMIN, \
             and a kernel with BTF)",
        )?;
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf) {
            // Programs without log statements have no log map: not an error.
            tracing::debug!("no kernel log channel: {e}");
        }
        info!(pin_path = %cfg.pin_path.display(), "maps pinned");

        let mut kernel = Kernel {
            ebpf,
            pin_path: cfg.pin_path.clone(),
            detach_on_exit: cfg.detach_on_exit,
            xdp_links: Vec::new(),
        };
        kernel.write_settings(cfg)?;
        kernel.attach_xdp(cfg)?;
        Ok(kernel)
    }

    fn write_settings(&mut self, cfg: &KernelConfig) -> Result<()> {
        let mut settings = Settings::default();
        for (slot, port) in settings.smtp_ports.iter_mut().zip(&cfg.smtp_ports) {
            *slot = *port;
        }
        let map = self
            .ebpf
            .map_mut(names::SETTINGS)
            .context("the kernel object has no SETTINGS map")?;
        let mut array: Array<_, Settings> = Array::try_from(map)?;
        array
            .set(0, settings, 0)
            .context("cannot write kernel settings")?;
        Ok(())
    }

    fn attach_xdp(&mut self, cfg: &KernelConfig) -> Result<()> {
        let mode = match cfg.xdp_mode {
            XdpModeSetting::Auto => XdpMode::Default,
            XdpModeSetting::Driver => XdpMode::Driver,
            XdpModeSetting::Skb => XdpMode::Skb,
        };
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .context("the kernel object has no XDP program")?
            .try_into()?;
        program
            .load()
            .context("the verifier refused the XDP program")?;
        for iface in &cfg.interfaces {
            let mut attach = || program.attach(iface, mode);
            let link = match &cfg.netns {
                Some(ns) => in_netns(ns, attach)?,
                None => attach(),
            }
            .with_context(|| format!("cannot attach XDP to {iface}"))?;
            info!(interface = %iface, netns = cfg.netns.as_deref().unwrap_or("-"), mode = ?cfg.xdp_mode, "XDP attached");
            self.xdp_links.push((iface.clone(), link));
        }
        Ok(())
    }

    /// Detaches every program; with `detach_on_exit` also removes the pins.
    pub fn shutdown(mut self) -> Result<()> {
        if let Ok(program) = <&mut Xdp>::try_from(
            self.ebpf
                .program_mut(XDP_PROGRAM)
                .context("the kernel object has no XDP program")?,
        ) {
            for (iface, link) in self.xdp_links.drain(..) {
                match program.detach(link) {
                    Ok(()) => info!(interface = %iface, "XDP detached"),
                    Err(e) => warn!(interface = %iface, "cannot detach XDP: {e}"),
                }
            }
        }
        if self.detach_on_exit {
            remove_pins(&self.pin_path)?;
        }
        Ok(())
    }
}

/// Removes every map pin of ours and the pin directory itself.
pub fn remove_pins(pin_path: &Path) -> Result<()> {
    for name in PINNED_MAPS {
        let p = pin_path.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot remove pin {}: {e}", p.display()),
        }
    }
    match std::fs::remove_dir(pin_path) {
        Ok(()) => info!(pin_path = %pin_path.display(), "pins removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(pin_path = %pin_path.display(), "pin directory not removed: {e}"),
    }
    Ok(())
}
