//! The only module that touches aya.
//!
//! - [`Kernel`]: the agent's loader: loads the programs, creates or reuses
//!   the pinned maps, writes the settings, attaches XDP, tc and sock_ops,
//!   replaces programs in place on restart, and undoes it all on exit when
//!   the config says so.
//! - [`KernelMaps`]: a typed handle over the pinned maps, opened from the
//!   pin directory without loading anything (agent, CLI, tests); with
//!   [`MapUsage`], everything the CLI shows about a map, so the CLI itself
//!   needs no aya.
//! - [`EventStream`]: the kernel's rare events, async.
//! - [`detach`]: removes every program, link, pin and qdisc of ours.
//! - [`clock`]: the kernel's boot clock and wall time.
mod attach;
mod bpffs;
pub mod clock;
mod error;
mod events;
mod hold;
mod layout;
mod listener;
mod lookup;
mod maps;
mod netns;
mod object;
mod prefix;
mod steering;
mod sys;
mod xdp_tx;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{SchedClassifier, SockOps, TcAttachType, Xdp, XdpMode},
    util::KernelVersion,
};
use tarpit_common::maps::{self as names, Settings};
use tracing::{debug, info, warn};

use crate::config::{KernelConfig, TcAttachSetting, XdpModeSetting};

pub use attach::{
    DetachReport, SOCKOPS_PROGRAM, TC_IN_PROGRAM, TC_OUT_PROGRAM, XDP_PROGRAM, detach,
};
pub use bpffs::ensure_bpffs;
pub use clock::BootInstant;
pub use error::KernelError;
pub use events::{EventKind, EventStream, KernelEvent};
pub use hold::{HOLD_PROGRAM, settings_from as hold_settings_from};
/// Prefixes in the list APIs (re-exported so callers need no own ipnet).
pub use ipnet::IpNet;
pub use layout::{MAPS, MapSpec, spec_of};
pub use lookup::AllowLookup;
pub use maps::evictions;
pub use maps::{
    AutoBlockAdded, BlockSpec, KernelCounters, KernelMaps, ListItem, MapUsage, MigrateReport,
    PreGreetVerdict, SweepReport, TimedItem, evict_batch, eviction_victims,
};
pub use netns::in_netns;
pub use steering::{
    HeldLink, SK_LOOKUP_PROGRAM, SteerCounters, SteerMaps, hold_link as hold_steering_link,
};

/// The loaded and attached kernel side. Dropping it detaches what is not
/// pinned; [`Kernel::shutdown`] also removes pins, links and qdiscs when
/// `detach_on_exit` is set.
pub struct Kernel {
    ebpf: Ebpf,
    cfg: KernelConfig,
    held: Vec<attach::Attachment>,
    logger: Option<tokio::task::JoinHandle<()>>,
    /// The programs' log channel, opened at load when no runtime was there
    /// to read it yet (`tarpit run` loads before its runtime starts, see
    /// `ops::privileges`); [`Kernel::relay_log`] starts the reader.
    log_channel: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Features this kernel refused at load, each with its reason.
    degraded: Vec<(&'static str, String)>,
}

/// Run statistics of one loaded program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    pub id: u32,
    pub run_time: std::time::Duration,
    pub run_count: u64,
}

impl ProgramStats {
    /// Average nanoseconds per run (0 when it never ran).
    pub fn ns_per_run(&self) -> f64 {
        if self.run_count == 0 {
            0.0
        } else {
            self.run_time.as_nanos() as f64 / self.run_count as f64
        }
    }
}

/// The settings a config asks for.
pub fn settings_from(cfg: &KernelConfig) -> Settings {
    let mut s = Settings::default();
    for (slot, port) in s.smtp_ports.iter_mut().zip(&cfg.smtp_ports) {
        *slot = *port;
    }
    let mut flags = 0;
    for (on, bit) in [
        (cfg.pregreet, names::SETTING_PREGREET),
        (cfg.block, names::SETTING_BLOCK),
        (cfg.events, names::SETTING_EVENTS),
        (cfg.log, names::SETTING_LOG),
        (cfg.window_clamp > 0, names::SETTING_SLOWDOWN),
        (cfg.count_connections, names::SETTING_CONNS),
    ] {
        if on {
            flags |= bit;
        }
    }
    s.flags = flags;
    s.window_clamp = cfg.window_clamp;
    s
}

/// Whether tc attaches through TCX links on this kernel and config.
fn use_tcx(cfg: &KernelConfig) -> bool {
    match cfg.tc_attach {
        TcAttachSetting::Tcx => true,
        TcAttachSetting::Netlink => false,
        TcAttachSetting::Auto => {
            KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
        }
    }
}

impl Kernel {
    /// Loads the programs, reuses or creates the pinned maps, writes the
    /// settings and attaches everything the config asks for.
    pub fn load(cfg: &KernelConfig) -> Result<Kernel> {
        let object = object::ebpf_object()?;
        ensure_bpffs(&cfg.pin_path)?;
        std::fs::create_dir_all(cfg.pin_path.join(attach::LINKS_DIR))
            .with_context(|| format!("cannot create pin directory {}", cfg.pin_path.display()))?;
        // Flows are transient: a flow map of an older layout is replaced.
        layout::recreate_transient(&cfg.pin_path)?;
        // Refuse maps of another layout before aya would silently reuse them.
        let reused = layout::check(&cfg.pin_path)? == layout::PinState::Compatible;
        let new_maps = if reused {
            layout::missing(&cfg.pin_path)
        } else {
            Vec::new()
        };

        let pins: Vec<(&str, PathBuf)> = MAPS
            .iter()
            .map(|s| (s.name, cfg.pin_path.join(s.name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, size) in [
            (names::SYN_COUNT, cfg.syn_count_entries),
            (names::FLOWS, cfg.flow_entries),
            (names::IP_STATE, cfg.ip_state_entries),
            (names::ALLOW, cfg.allow_entries),
            (names::BLOCK, cfg.block_entries),
            (names::AUTO_BLOCK, cfg.auto_block_entries),
            (names::AUTH, cfg.auth_entries),
            (names::SLOW, cfg.slow_entries),
            (names::EVENTS, cfg.events_bytes),
        ] {
            loader.map_max_entries(name, size);
        }
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).context(
            "cannot load the kernel programs (needs root or CAP_BPF + CAP_NET_ADMIN, \
             and a kernel with BTF)",
        )?;
        if reused {
            warn_resized(cfg);
        }
        info!(pin_path = %cfg.pin_path.display(), reused, "maps pinned");
        layout::write_marker(
            ebpf.map_mut(names::LAYOUT)
                .context("the kernel object has no LAYOUT map")?,
        )?;
        layout::upgrade(&cfg.pin_path, &new_maps);
        // Before any program is attached: lists that hold entries from an
        // earlier run must be looked up (see `names::LISTS_USED`).
        KernelMaps::open(&cfg.pin_path)
            .and_then(|mut m| m.mark_lists_in_use())
            .context("cannot mark the prefix lists that hold entries")?;

        let mut kernel = Kernel {
            ebpf,
            cfg: cfg.clone(),
            held: Vec::new(),
            logger: None,
            log_channel: None,
            degraded: Vec::new(),
        };
        kernel.write_settings(cfg)?;
        kernel.load_programs()?;
        // Only after loading: the log map must stay open while programs
        // that use it are verified.
        kernel.log_channel = open_log_channel(&mut kernel.ebpf);
        kernel.relay_log();
        kernel.attach_all()?;
        Ok(kernel)
    }

    /// The typed map handle over this kernel's pins.
    pub fn maps(&self) -> Result<KernelMaps, KernelError> {
        KernelMaps::open(&self.cfg.pin_path)
    }

    pub fn pin_path(&self) -> &Path {
        &self.cfg.pin_path
    }

    /// Per-program run statistics: (name, kernel program id, total run
    /// time, run count). Times and counts move only while the
    /// `kernel.bpf_stats_enabled` sysctl is 1.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>> {
        let mut out = Vec::new();
        for name in [
            XDP_PROGRAM,
            HOLD_PROGRAM,
            TC_IN_PROGRAM,
            TC_OUT_PROGRAM,
            SOCKOPS_PROGRAM,
        ] {
            let Some(prog) = self.ebpf.program(name) else {
                continue;
            };
            let info = match prog {
                aya::programs::Program::Xdp(p) => p.info(),
                aya::programs::Program::SchedClassifier(p) => p.info(),
                aya::programs::Program::SockOps(p) => p.info(),
                _ => continue,
            }
            .with_context(|| format!("cannot read statistics of {name}"))?;
            out.push(ProgramStats {
                name,
                id: info.id(),
                run_time: info.run_time(),
                run_count: info.run_count(),
            });
        }
        Ok(out)
    }

    fn write_settings(&mut self, cfg: &KernelConfig) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(names::SETTINGS)
            .context("the kernel object has no SETTINGS map")?;
        let mut array: Array<_, Settings> = Array::try_from(map)?;
        array
            .set(0, settings_from(cfg), 0)
            .context("cannot write kernel settings")?;
        Ok(())
    }

    /// Loads (verifies) every program before attaching any, so a verifier
    /// failure leaves whatever ran before untouched.
    fn load_programs(&mut self) -> Result<()> {
        for name in [XDP_PROGRAM, TC_IN_PROGRAM, TC_OUT_PROGRAM, SOCKOPS_PROGRAM] {
            let prog = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("the kernel object has no program {name}"))?;
            let res = match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                _ => Ok(()),
            };
            match res {
                Ok(()) => {}
                // Connection counting is worth having, not worth refusing
                // to start over: older kernels lack helpers it uses.
                // Without the egress program no greeting is ever seen, and
                // every client would look like a pre-greet talker: switch
                // pre-greet detection off rather than refuse to start.
                Err(e) if name == TC_OUT_PROGRAM || name == TC_IN_PROGRAM => {
                    let why = format!("{:#}", anyhow::Error::from(e));
                    warn!(
                        "{name} refused by this kernel's verifier: pre-greet detection in the \
                         kernel is off ({why})"
                    );
                    self.degraded.push(("pregreet", why));
                }
                Err(e) if name == SOCKOPS_PROGRAM => {
                    let why = format!("{:#}", anyhow::Error::from(e));
                    warn!(
                        "sock_ops unavailable on this kernel: live connection counts, the \
                         window clamp and pre-greet detection in the kernel (which needs the \
                         flows sock_ops makes) are off ({why})"
                    );
                    self.degraded.push(("sock_ops", why.clone()));
                    if !self.is_degraded("pregreet") {
                        self.degraded.push(("pregreet", why));
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("the verifier refused {name}"));
                }
            }
        }
        // The hold needs the raw SYN-cookie helpers (Linux 6.0): without
        // them held addresses are dropped, as any block entry.
        if let Err(why) = hold::load(&mut self.ebpf) {
            warn!(
                "kernel hold unavailable on this kernel (needs Linux 6.0 or newer): held \
                 addresses are dropped instead ({why})"
            );
            self.degraded.push(("hold", why));
        }
        Ok(())
    }

    /// Features the kernel refused at load (name, reason): the agent
    /// reports them as a metric; everything else works.
    pub fn degraded(&self) -> &[(&'static str, String)] {
        &self.degraded
    }

    /// Each kernel feature and whether it runs here: the agent exports
    /// them as `tarpit_kernel_feature_available`.
    pub fn features(&self) -> Vec<(&'static str, bool)> {
        ["xdp", "pregreet", "sock_ops", "hold"]
            .into_iter()
            .map(|f| (f, !self.is_degraded(f)))
            .collect()
    }

    /// Whether the kernel refused `feature`'s program at load.
    fn is_degraded(&self, feature: &str) -> bool {
        self.degraded.iter().any(|(f, _)| *f == feature)
    }

    fn attach_all(&mut self) -> Result<()> {
        let cfg = self.cfg.clone();
        let persist = !cfg.detach_on_exit;
        let netns = cfg.netns.as_deref();
        let mut keep = Vec::new();
        let mode = match cfg.xdp_mode {
            XdpModeSetting::Auto => XdpMode::Default,
            XdpModeSetting::Driver => XdpMode::Driver,
            XdpModeSetting::Skb => XdpMode::Skb,
        };
        for iface in &cfg.interfaces {
            let xdp: &mut Xdp = self
                .ebpf
                .program_mut(XDP_PROGRAM)
                .context("no XDP")?
                .try_into()?;
            let held = attach::xdp(xdp, &cfg.pin_path, netns, iface, mode, persist)?;
            self.hold(held, &mut keep);
        }
        if !self.is_degraded("hold")
            && let Some(why) = cfg
                .interfaces
                .iter()
                .find_map(|i| xdp_tx::blocker(netns, i, cfg.xdp_mode))
        {
            warn!(
                "kernel hold off: {why}; held addresses are dropped instead (give the peer an \
                 XDP program, or set kernel.xdp_mode = \"skb\")"
            );
            self.degraded.push(("hold", why));
        }
        let hold_on = !self.is_degraded("hold");
        hold::install(&mut self.ebpf, &cfg, hold_on)?;
        let tcx = use_tcx(&cfg);
        let tc_ok = !self.is_degraded("pregreet");
        if !tc_ok {
            let mut s = settings_from(&cfg);
            s.flags &= !names::SETTING_PREGREET;
            let map = self
                .ebpf
                .map_mut(names::SETTINGS)
                .context("the kernel object has no SETTINGS map")?;
            Array::<_, Settings>::try_from(map)?
                .set(0, s, 0)
                .context("cannot write kernel settings")?;
        }
        for iface in cfg.interfaces.iter().filter(|_| tc_ok) {
            if !tcx {
                let created = attach::ensure_clsact(netns, iface)?;
                attach::record_netlink(
                    self.ebpf
                        .map_mut(names::ATTACHMENTS)
                        .context("no ATTACHMENTS map")?,
                    netns,
                    iface,
                    created,
                )?;
            }
            for (name, dir) in [
                (TC_IN_PROGRAM, TcAttachType::Ingress),
                (TC_OUT_PROGRAM, TcAttachType::Egress),
            ] {
                let prog: &mut SchedClassifier =
                    self.ebpf.program_mut(name).context("no tc")?.try_into()?;
                if tcx {
                    let held = attach::tcx(prog, &cfg.pin_path, netns, iface, dir, persist)?;
                    self.hold(held, &mut keep);
                } else if let Some(held) = attach::tc_netlink(prog, netns, iface, dir, persist)? {
                    self.held.push(held);
                }
            }
        }
        // sock_ops also makes the flows tc judges for pre-greet talk.
        if (cfg.count_connections || cfg.pregreet) && !self.is_degraded("sock_ops") {
            let prog: &mut SockOps = self
                .ebpf
                .program_mut(SOCKOPS_PROGRAM)
                .context("no sock_ops")?
                .try_into()?;
            let held = attach::sock_ops(prog, &cfg.pin_path, &cfg.cgroup, persist)?;
            self.hold(held, &mut keep);
        }
        attach::remove_stale_links(&cfg.pin_path, &keep);
        Ok(())
    }

    fn hold(&mut self, held: attach::Attachment, keep: &mut Vec<PathBuf>) {
        if let attach::Attachment::Pinned(p) = &held {
            keep.push(p.clone());
        }
        self.held.push(held);
    }

    /// Stops the log reader; with `detach_on_exit` detaches every program
    /// and removes links, pins and the qdiscs we created. Without it the
    /// pinned links keep the programs running and the maps keep their
    /// state for the next start.
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(task) = self.logger.take() {
            task.abort();
        }
        let held = std::mem::take(&mut self.held);
        if self.cfg.detach_on_exit {
            // Owned links and netlink filters go first, then every pin.
            drop(held);
            let report = detach(&self.cfg.pin_path)?;
            info!(
                links = report.links,
                maps = report.maps,
                "kernel programs detached"
            );
        } else {
            for h in held {
                if let attach::Attachment::Netlink(link) = h {
                    std::mem::forget(link);
                }
            }
            info!(pin_path = %self.cfg.pin_path.display(), "kernel programs left attached (pinned)");
        }
        Ok(())
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        if let Some(task) = self.logger.take() {
            task.abort();
        }
    }
}

/// Pinned maps keep the size they were created with: say so when the
/// config now asks for another.
fn warn_resized(cfg: &KernelConfig) {
    for spec in MAPS {
        let Some(key) = spec.size_key else { continue };
        let want = match key {
            "syn_count_entries" => cfg.syn_count_entries,
            "flow_entries" => cfg.flow_entries,
            "ip_state_entries" => cfg.ip_state_entries,
            "allow_entries" => cfg.allow_entries,
            "block_entries" => cfg.block_entries,
            "auto_block_entries" => cfg.auto_block_entries,
            "auth_entries" => cfg.auth_entries,
            "slow_entries" => cfg.slow_entries,
            "events_bytes" => cfg.events_bytes,
            _ => continue,
        };
        if let Ok(info) = aya::maps::MapInfo::from_pin(cfg.pin_path.join(spec.name))
            && info.max_entries() != want
        {
            warn!(
                "map {} keeps its pinned size {} (kernel.{key} = {want} applies after \
                 `tarpit detach`)",
                spec.name,
                info.max_entries()
            );
        }
    }
}

/// Opens the programs' aya-log channel (after loading: the log map must
/// stay open while programs that use it are verified).
fn open_log_channel(ebpf: &mut Ebpf) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            debug!("no kernel log channel: {e}");
            None
        }
    }
}

impl Kernel {
    /// Relays the programs' aya-log records into tracing, once a tokio
    /// runtime is there to drive it (otherwise the channel waits for the
    /// next call). Called by [`Kernel::load`] and again inside the runtime.
    pub fn relay_log(&mut self) {
        if self.logger.is_some() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if let Some(channel) = self.log_channel.take() {
            self.logger = start_logger(channel);
        }
    }
}

/// Reads `logger`'s ring buffer on the current runtime.
fn start_logger(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> Option<tokio::task::JoinHandle<()>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let _guard = handle.enter();
    // SAFETY: the logger owns its ring buffer fd for as long as AsyncFd holds it.
    let fd = match unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(
                "cannot watch the kernel log channel: {}",
                std::io::Error::from(e)
            );
            return None;
        }
    };
    Some(handle.spawn(async move {
        let mut fd = fd;
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// Removes every map pin of ours and the pin directory itself (kept for
/// callers of the foundation API; [`detach`] does more).
pub fn remove_pins(pin_path: &Path) -> Result<()> {
    detach(pin_path).map(|_| ())
}
