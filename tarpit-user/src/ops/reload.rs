//! Live reload on SIGHUP (and `tarpit reload`, which sends one).
//!
//! The running configuration is an `Arc<Config>` in a tokio `watch`
//! channel. A reload reads and validates the whole file first; only a valid
//! file replaces the running config, in one swap, so no session ever sees
//! half of each. A bad file is refused with its key and reason in the log
//! and the old config stays in force. Sessions take a snapshot
//! (`rx.borrow().clone()`) when they start and keep it: a session in flight
//! is never dropped or changed by a reload, and the next one gets the new
//! values.
//!
//! Some keys describe what was bound, attached or dropped at start (listen
//! addresses, interfaces, pin path, the user, the greylist store and
//! mode, `[cluster]`): changing them needs a restart. A reload keeps their running
//! values, applies the rest, and names each such key in a warning.
//!
//! The reputation checks (`[dns]`, `[dnsbl]`, `[dnswl]`, `allow.hosts`)
//! apply on reload: when they changed, the new checks are built here
//! first, before the swap, so a config whose checks cannot be built (a
//! resolver that cannot be set up) is refused as a whole, naming the key,
//! exactly like an invalid file. The agent then builds them again for the
//! next sessions (`run::apply_reloads`), with empty DNS caches (cached
//! answers and allow-cache entries were judged by the old lists) and the
//! same metrics. Greylisting's windows, size and prefixes apply too; its
//! store and mode stay until a restart (`Greylist::reconfigure`).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::pidfile;
use super::sdnotify::Notifier;
use crate::config::{Config, ConfigError};

/// Reload attempts since the start, by result: the agent's
/// `tarpit_config_reloads_total{result}` ([`ReloadCounts::register`]).
#[derive(Debug, Clone)]
pub struct ReloadCounts {
    family: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub applied: Counter,
    pub refused: Counter,
}

impl Default for ReloadCounts {
    fn default() -> Self {
        let family = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        let result = |r| family.get_or_create(&vec![("result", r)]).clone();
        ReloadCounts {
            applied: result("applied"),
            refused: result("refused"),
            family,
        }
    }
}

impl ReloadCounts {
    /// Puts the counts into the agent's registry (once).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            self.family.clone(),
        );
    }
}

/// Owner of the running configuration.
#[derive(Debug)]
pub struct ConfigWatch {
    path: PathBuf,
    tx: watch::Sender<Arc<Config>>,
    counts: Arc<ReloadCounts>,
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Changed keys that keep their running value until a restart.
    pub restart_only: Vec<&'static str>,
}

impl ConfigWatch {
    pub fn new(path: &Path, initial: Config) -> ConfigWatch {
        let (tx, _) = watch::channel(Arc::new(initial));
        ConfigWatch {
            path: path.to_owned(),
            tx,
            counts: Arc::default(),
        }
    }

    /// A receiver for a server or session: `borrow().clone()` is the
    /// snapshot, `changed().await` wakes on every applied reload.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.tx.subscribe()
    }

    /// The running configuration.
    pub fn current(&self) -> Arc<Config> {
        self.tx.borrow().clone()
    }

    pub fn counts(&self) -> Arc<ReloadCounts> {
        self.counts.clone()
    }

    /// Reads, validates and swaps in the file. On error nothing changes.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        self.reload_with(preflight)
    }

    /// [`ConfigWatch::reload`] with the check of what the file asks to
    /// build (`check(running, new)`, after the restart-only keys were put
    /// back): its error refuses the whole reload.
    fn reload_with(
        &self,
        check: impl Fn(&Config, &Config) -> Result<(), ConfigError>,
    ) -> Result<Reloaded, ConfigError> {
        let refuse = |e: ConfigError| {
            self.counts.refused.inc();
            error!(
                target: "tarpit::ops::reload",
                key = e.key().unwrap_or("-"),
                "configuration reload refused, the running configuration stays in force: {e}"
            );
            Err(e)
        };
        let mut new = match Config::load(&self.path) {
            Ok(c) => c,
            Err(e) => return refuse(e),
        };
        let old = self.current();
        let restart_only = carry_restart_only(&old, &mut new);
        if let Err(e) = check(&old, &new) {
            return refuse(e);
        }
        for key in &restart_only {
            warn!(
                target: "tarpit::ops::reload",
                key,
                "{key} changed: it takes effect at the next restart, the running value is kept"
            );
        }
        crate::logging::configure(&new.log);
        for w in new.warnings() {
            warn!(target: "tarpit::ops::reload", key = w.key, "{w}");
        }
        self.tx.send_replace(Arc::new(new));
        self.counts.applied.inc();
        info!(target: "tarpit::ops::reload", path = %self.path.display(), "configuration reloaded");
        Ok(Reloaded { restart_only })
    }

    /// Installs the SIGHUP handler now (a SIGHUP before it would kill the
    /// process) and reloads on each one, telling systemd. Must be called
    /// inside the runtime.
    pub fn spawn(
        self: Arc<Self>,
        notifier: Notifier,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        Ok(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                info!(target: "tarpit::ops::reload", "SIGHUP: reloading {}", self.path.display());
                notifier.reloading();
                let result = self.reload();
                notifier.ready(match result {
                    Ok(_) => "serving (configuration reloaded)",
                    Err(_) => "serving (last reload refused, see the log)",
                });
            }
        }))
    }
}

/// What validation cannot know: can the agent build what the new config
/// asks for? The reputation checks, when they changed (their resolver is
/// set up from `dns.nameservers` or the system's configuration).
fn preflight(old: &Config, new: &Config) -> Result<(), ConfigError> {
    if crate::reputation::Reputation::config_changed(old, new) {
        crate::reputation::Reputation::from_config(new, Arc::default())?;
    }
    Ok(())
}

/// Puts back the running value of every restart-only key that the new
/// file changes, and names them. Compared through their Debug form, which
/// every config type has and which shows every field.
fn carry_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:ident).+) => {
            if format!("{:?}", old.$($field).+) != format!("{:?}", new.$($field).+) {
                new.$($field).+ = old.$($field).+.clone();
                kept.push($key);
            }
        };
    }
    keep!("listen", listen);
    keep!("metrics.listen", metrics.listen);
    keep!("kernel.interfaces", kernel.interfaces);
    keep!("kernel.netns", kernel.netns);
    keep!("kernel.pin_path", kernel.pin_path);
    keep!("kernel.xdp_mode", kernel.xdp_mode);
    keep!("kernel.tc_attach", kernel.tc_attach);
    keep!("kernel.cgroup", kernel.cgroup);
    keep!("kernel.detach_on_exit", kernel.detach_on_exit);
    keep!("kernel.syn_count_entries", kernel.syn_count_entries);
    keep!("kernel.flow_entries", kernel.flow_entries);
    keep!("kernel.ip_state_entries", kernel.ip_state_entries);
    keep!("kernel.allow_entries", kernel.allow_entries);
    keep!("kernel.block_entries", kernel.block_entries);
    keep!("kernel.auto_block_entries", kernel.auto_block_entries);
    keep!("kernel.auth_entries", kernel.auth_entries);
    keep!("kernel.slow_entries", kernel.slow_entries);
    keep!("kernel.events_bytes", kernel.events_bytes);
    keep!("limits.sessions", limits.sessions);
    keep!("limits.reserved_sessions", limits.reserved_sessions);
    // The store is opened (and handed to the user) at start, before the
    // privilege drop; turning greylisting on or off opens or closes it.
    keep!("greylist.mode", greylist.mode);
    keep!("greylist.store", greylist.store);
    keep!("daemon.user", daemon.user);
    keep!("daemon.group", daemon.group);
    keep!("daemon.pid_file", daemon.pid_file);
    // The password file is read as root at start, the connection made then.
    keep!("cluster", cluster);
    kept
}

/// The long help of `tarpit reload`.
pub const HELP: &str = "EXAMPLES:
  tarpit reload                       # /etc/tarpit/tarpit.toml, its daemon.pid_file
  tarpit reload -c /etc/tarpit/tarpit.toml --pid-file /run/tarpit/tarpit.pid
  systemctl reload tarpit             # the same under systemd (SIGHUP)

EXIT STATUS:
  0  the file is valid and the agent was sent SIGHUP (its log says
     \"configuration reloaded\", or why it refused)
  1  the file is invalid (the key and the reason are printed; the agent is
     not signalled), or there is no pid file or no agent behind it

FILES:
  /etc/tarpit/tarpit.toml  the default configuration file
  /run/tarpit/tarpit.pid   the pid file the shipped unit's layout suggests";

/// `tarpit reload`: checks the file the way the agent will, then sends
/// SIGHUP to the agent named in the pid file. Returns the pid.
pub fn signal_agent(config_path: &Path, pid_file: Option<&Path>) -> Result<u32> {
    let config =
        Config::load(config_path).context("not reloading: the agent would refuse this file")?;
    let pid_file = match pid_file {
        Some(p) => p.to_owned(),
        None => match &config.daemon.pid_file {
            Some(p) => p.clone(),
            None => bail!(
                "{} sets no daemon.pid_file: pass --pid-file, or under systemd use \
                 `systemctl reload tarpit`",
                config_path.display()
            ),
        },
    };
    let pid = pidfile::read(&pid_file)?;
    if !pidfile::is_tarpit(pid) {
        bail!(
            "pid {pid} from {} is not a running tarpit agent (stale pid file?)",
            pid_file.display()
        );
    }
    let raw = i32::try_from(pid).context("pid out of range")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(raw),
        nix::sys::signal::Signal::SIGHUP,
    )
    .with_context(|| format!("cannot signal pid {pid}"))?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TmpConfig(PathBuf);

    impl TmpConfig {
        fn new(tag: &str, text: &str) -> TmpConfig {
            let d =
                std::env::temp_dir().join(format!("tarpit-reload-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            let p = d.join("tarpit.toml");
            std::fs::write(&p, text).unwrap();
            TmpConfig(p)
        }
        fn write(&self, text: &str) {
            std::fs::write(&self.0, text).unwrap();
        }
    }

    impl Drop for TmpConfig {
        fn drop(&mut self) {
            if let Some(d) = self.0.parent() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }

    #[test]
    fn good_file_is_swapped_in_bad_file_is_refused_with_key() {
        let f = TmpConfig::new("swap", "[greeting]\ndelay = \"5s\"\n");
        let w = ConfigWatch::new(&f.0, Config::load(&f.0).unwrap());
        let rx = w.subscribe();
        let session_snapshot = rx.borrow().clone();

        f.write("[greeting]\ndelay = \"7s\"\n");
        assert_eq!(w.reload().unwrap().restart_only, Vec::<&str>::new());
        assert_eq!(w.current().greeting.delay.as_secs(), 7);
        assert!(rx.has_changed().unwrap());
        // a session that started before keeps its snapshot
        assert_eq!(session_snapshot.greeting.delay.as_secs(), 5);

        f.write("[greeting]\ndelay = \"900s\"\n");
        let e = w.reload().unwrap_err();
        assert_eq!(e.key(), Some("greeting.delay"));
        assert_eq!(w.current().greeting.delay.as_secs(), 7, "old config stays");

        f.write("[greeting\n");
        assert!(w.reload().is_err());
        assert_eq!(w.current().greeting.delay.as_secs(), 7);
        let c = w.counts();
        assert_eq!(c.applied.get(), 1);
        assert_eq!(c.refused.get(), 2);
        let mut reg = Registry::with_prefix("tarpit");
        c.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("tarpit_config_reloads_total{result=\"refused\"} 2\n"),
            "{text}"
        );
    }

    #[test]
    fn restart_only_keys_keep_their_running_value() {
        let f = TmpConfig::new(
            "restart",
            "[listen]\naddrs = [\"127.0.0.1:2525\"]\n[rcpt]\nthreshold = 5\n",
        );
        let w = ConfigWatch::new(&f.0, Config::load(&f.0).unwrap());
        f.write(
            "[listen]\naddrs = [\"127.0.0.1:2626\"]\n[rcpt]\nthreshold = 9\n\
             [daemon]\nuser = \"nobody\"\n[cluster]\nurl = \"redis://10.0.0.5\"\n",
        );
        let r = w.reload().unwrap();
        assert_eq!(r.restart_only, vec!["listen", "daemon.user", "cluster"]);
        assert!(!w.current().cluster.enabled(), "no cluster until a restart");
        let c = w.current();
        assert_eq!(c.rcpt.threshold, 9, "live keys apply");
        assert_eq!(c.listen.addrs[0].port(), 2525, "bound address stays");
        assert_eq!(c.daemon.user, None);
    }

    #[tokio::test]
    async fn reputation_and_greylist_timing_apply_store_and_mode_are_kept() {
        let f = TmpConfig::new(
            "reputation",
            "[dns]\nnameservers = [\"127.0.0.1:5353\"]\n[dnsbl]\nsites = [\"a.test\"]\n",
        );
        let w = ConfigWatch::new(&f.0, Config::load(&f.0).unwrap());
        f.write(
            "[dns]\nnameservers = [\"127.0.0.1:5300\"]\ntimeout = \"2s\"\n\
             [dnsbl]\nsites = [\"a.test\", \"b.test*2\"]\nthreshold = 2\n\
             [dnsbl.actions]\n\"b.test\" = \"reject\"\n\
             [allow]\nhosts = [\"*.partner.example\"]\n\
             [greylist]\nmode = \"triplet\"\nstore = \"/nonexistent/g.db\"\nmin_wait = \"1m\"\n",
        );
        let r = w.reload().unwrap();
        assert_eq!(r.restart_only, vec!["greylist.mode", "greylist.store"]);
        let c = w.current();
        assert_eq!(c.dns.nameservers, ["127.0.0.1:5300"]);
        assert_eq!(c.dnsbl.sites.len(), 2);
        assert_eq!(c.dnsbl.threshold, 2);
        assert_eq!(c.allow.hosts.len(), 1);
        assert_eq!(c.greylist.min_wait.as_secs(), 60, "timing applies");
        assert_eq!(c.greylist.mode, crate::config::GreylistMode::Off);
        assert_ne!(c.greylist.store, PathBuf::from("/nonexistent/g.db"));
    }

    #[test]
    fn a_config_the_agent_cannot_build_is_refused_as_a_whole() {
        let f = TmpConfig::new("unbuildable", "[greeting]\ndelay = \"5s\"\n");
        let w = ConfigWatch::new(&f.0, Config::load(&f.0).unwrap());
        f.write("[greeting]\ndelay = \"7s\"\n[dnsbl]\nsites = [\"a.test\"]\n");
        let e = w
            .reload_with(|old, new| {
                assert_eq!(old.greeting.delay.as_secs(), 5);
                assert_eq!(new.dnsbl.sites, ["a.test"]);
                Err(ConfigError::invalid("dns.nameservers", "no resolver"))
            })
            .unwrap_err();
        assert_eq!(e.key(), Some("dns.nameservers"));
        let c = w.current();
        assert_eq!(c.greeting.delay.as_secs(), 5, "nothing of the file applies");
        assert!(c.dnsbl.sites.is_empty());
        assert_eq!(w.counts().refused.get(), 1);
        assert_eq!(w.counts().applied.get(), 0);
    }

    #[test]
    fn preflight_builds_only_changed_checks() {
        let old = Config::parse("").unwrap();
        assert!(preflight(&old, &old).is_ok());
        let new = Config::parse(
            "[dns]\nnameservers = [\"127.0.0.1:5353\"]\n[dnsbl]\nsites = [\"a.test\"]\n",
        )
        .unwrap();
        assert!(preflight(&old, &new).is_ok());
    }

    #[test]
    fn signal_agent_refuses_a_bad_file_and_a_missing_pid_file() {
        let f = TmpConfig::new("signal", "[rcpt]\nscaling = 0.1\n");
        let e = signal_agent(&f.0, None).unwrap_err();
        assert!(format!("{e:#}").contains("rcpt.scaling"), "{e:#}");
        f.write("");
        let e = signal_agent(&f.0, None).unwrap_err();
        assert!(format!("{e:#}").contains("daemon.pid_file"), "{e:#}");
        let pid = f.0.with_file_name("x.pid");
        std::fs::write(&pid, "1\n").unwrap();
        let e = signal_agent(&f.0, Some(&pid)).unwrap_err();
        assert!(
            format!("{e:#}").contains("not a running tarpit agent"),
            "{e:#}"
        );
    }
}
