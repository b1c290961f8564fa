//! Running the agent as a production daemon: systemd readiness and
//! watchdog ([`sdnotify`]), least privilege ([`privileges`]), live reload
//! ([`reload`]), graceful stop ([`shutdown`]) and the pid file
//! ([`pidfile`]). [`Daemon`] ties them together for `tarpit run`:
//!
//! ```ignore
//! let config = Config::load(path)?;
//! let mut daemon = Daemon::start(path, &config)?;   // log config, pid file
//! let kernel = Kernel::load(&config.kernel)?;        // as root
//! let listeners = bind(&config.listen)?;             // as root
//! daemon.drop_privileges()?;                         // before any thread
//! runtime.block_on(async {
//!     spawn_server(listeners, daemon.config(), daemon.shutdown());
//!     daemon.ready()?;                               // signals, READY=1
//!     let sig = daemon.wait_for_stop().await;         // SIGTERM / SIGINT
//!     let report = daemon.drain().await;              // 421s, finish, timeout
//!     kernel.shutdown()
//! })
//! ```
pub mod metrics;
pub mod pidfile;
pub mod privileges;
pub mod reload;
pub mod sdnotify;
pub mod shutdown;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use pidfile::PidFile;
use privileges::Dropped;
use reload::ConfigWatch;
use sdnotify::Notifier;
use shutdown::{DrainReport, Shutdown, ShutdownController, StopSignal, StopSignals};

/// The agent's life as a service.
pub struct Daemon {
    notifier: Notifier,
    pid_file: Option<PidFile>,
    controller: ShutdownController,
    config: Arc<ConfigWatch>,
    stop: Option<StopSignals>,
}

impl Daemon {
    /// First step of `tarpit run`, right after the config loaded: applies
    /// `[log]` and writes the pid file.
    pub fn start(config_path: &Path, config: &Config) -> Result<Daemon> {
        crate::logging::configure(&config.log);
        let pid_file = config
            .daemon
            .pid_file
            .as_deref()
            .map(PidFile::create)
            .transpose()?;
        let controller = ShutdownController::new();
        Ok(Daemon {
            notifier: Notifier::from_env(),
            pid_file,
            controller,
            config: Arc::new(ConfigWatch::new(config_path, config.clone())),
            stop: None,
        })
    }

    /// Becomes `daemon.user` with only the capabilities still needed.
    /// After binding and loading; before the async runtime starts.
    pub fn drop_privileges(&self) -> Result<Option<Dropped>> {
        privileges::drop_privileges(&self.config.current())
    }

    /// The running configuration; `borrow().clone()` is a session's snapshot.
    pub fn config(&self) -> watch::Receiver<Arc<Config>> {
        self.config.subscribe()
    }

    /// The reload machinery (for metrics: reload counts).
    pub fn config_watch(&self) -> Arc<ConfigWatch> {
        self.config.clone()
    }

    /// The token servers and sessions watch for the stop.
    pub fn shutdown(&self) -> Shutdown {
        self.controller.token()
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Inside the runtime, once the server is serving: installs the signal
    /// handlers (SIGHUP reloads; SIGTERM/SIGINT stop), starts the watchdog
    /// pings and the log's drop notices, and tells systemd READY=1.
    pub fn ready(&mut self) -> Result<()> {
        self.stop = Some(StopSignals::install().context("cannot handle SIGTERM/SIGINT")?);
        self.config
            .clone()
            .spawn(self.notifier.clone())
            .context("cannot handle SIGHUP")?;
        if let Some(every) = sdnotify::watchdog_interval() {
            let n = self.notifier.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    n.watchdog();
                }
            });
            info!(target: "tarpit::ops", "systemd watchdog: ping every {}", humantime::format_duration(every));
        }
        tokio::spawn(async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                crate::logging::flush_dropped();
            }
        });
        let status = match &self.pid_file {
            Some(p) => format!("serving (pid file {})", p.path().display()),
            None => "serving".to_string(),
        };
        self.notifier.ready(&status);
        Ok(())
    }

    /// Waits for SIGTERM or SIGINT (handlers from [`Daemon::ready`]).
    pub async fn wait_for_stop(&mut self) -> Result<StopSignal> {
        let stop = match &mut self.stop {
            Some(s) => s,
            None => self
                .stop
                .insert(StopSignals::install().context("cannot handle SIGTERM/SIGINT")?),
        };
        Ok(stop.recv().await)
    }

    /// Tells systemd STOPPING=1 and drains the sessions for at most
    /// `daemon.shutdown_timeout`.
    /// A second SIGTERM or SIGINT cuts the drain short (an operator who
    /// insists, or systemd's `KillMode=mixed` escalation).
    pub async fn drain(&mut self) -> DrainReport {
        self.notifier.stopping();
        let timeout = self.config.current().daemon.shutdown_timeout;
        let open = self.controller.token().active();
        info!(
            target: "tarpit::ops",
            sessions = open,
            timeout = %humantime::format_duration(timeout),
            "stopping: no new sessions, tarpitted ones get 421, the others may finish"
        );
        let report = match &mut self.stop {
            Some(stop) => tokio::select! {
                r = self.controller.drain(timeout) => r,
                sig = stop.recv() => {
                    warn!(target: "tarpit::ops", "{sig} again: stopping without waiting for the sessions");
                    DrainReport {
                        remaining: self.controller.token().active(),
                        timed_out: true,
                    }
                }
            },
            None => self.controller.drain(timeout).await,
        };
        if report.remaining > 0 {
            warn!(target: "tarpit::ops", sessions = report.remaining, "stop timeout reached: closing the sessions still open");
        } else {
            info!(target: "tarpit::ops", timed_out = report.timed_out, "all sessions finished");
        }
        crate::logging::flush_dropped_final();
        report
    }
}
