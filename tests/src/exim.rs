//! An Exim test instance behind the agent, configured as
//! docs/mta-setup.md says (`hosts_proxy` for the agent's PROXY header,
//! `smtp_receive_timeout`, `smtp_accept_max_nonmail`), run in a test's
//! server namespace with its own config, spool, log and Maildir.
//!
//! Debian's exim4-daemon-* conflicts with Postfix (both provide
//! mail-transport-agent), so it is not installed: scripts/install-test-deps.sh
//! unpacks exim4-daemon-heavy (the build with PROXY support) and the
//! libraries it needs into `.tools/exim`, and this runs that binary.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::env::{repo_root, unique_id};
use crate::netns::TestNet;
use crate::wait;

/// Where the agent reaches Exim (both families).
pub const PORT: u16 = 10025;

/// The unpacked Exim root (`.tools/exim`), or `EXIM_ROOT`.
pub fn exim_root() -> PathBuf {
    std::env::var_os("EXIM_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/exim"))
}

/// True when the unpacked exim4 is there (scripts/install-test-deps.sh).
pub fn available() -> bool {
    exim_root().join("usr/sbin/exim4").is_file()
}

/// A running Exim daemon; Drop stops it and removes its directory.
pub struct Exim {
    pub dir: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

fn config(dir: &Path, exim: &Path, extra: &str) -> String {
    let d = dir.display();
    let e = exim.display();
    format!(
        r#"# Exim behind the tarpit, as docs/mta-setup.md describes it
exim_path = {e}
exim_user = Debian-exim
exim_group = Debian-exim
keep_environment =
primary_hostname = exim.tarpit.test
qualify_domain = tarpit.test
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
log_selector = +proxy +smtp_connection +received_recipients
# no DNS (the test namespace has no resolver)
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
# docs/mta-setup.md: loopback listener, PROXY header from the agent only
daemon_smtp_ports = {PORT}
local_interfaces  = <; 127.0.0.1.{PORT} ; ::1.{PORT}
hosts_proxy       = <; 127.0.0.1 ; ::1
smtp_receive_timeout = 900s
smtp_accept_max_nonmail = 1000
domainlist local_domains = tarpit.test
acl_smtp_rcpt = acl_check_rcpt
{extra}

begin acl
acl_check_rcpt:
  deny    local_parts = ^unknown
          message     = 5.1.1 User unknown
  accept  domains     = +local_domains
  deny    message     = 5.7.1 Relay access denied

begin routers
sink:
  driver = accept
  domains = +local_domains
  transport = maildir_sink

begin transports
maildir_sink:
  driver = appendfile
  directory = {d}/mail/sink
  maildir_format
  create_directory
  user = Debian-exim
  group = Debian-exim
"#
    )
}

impl Exim {
    /// Starts `exim4 -bdf` in the server namespace of `net`, listening on
    /// 127.0.0.1 and ::1 port [`PORT`]; `extra` is added to the main
    /// section. Returns once it accepts connections.
    pub fn start(net: &TestNet, extra: &str) -> Result<Exim> {
        Exim::start_custom(net, true, PORT, |dir, bin| config(dir, bin, extra))
    }

    /// Starts an Exim with the whole configuration `make(dir, exim_path)`
    /// gives, in the server (`server = true`) or client namespace of
    /// `net`; ready once 127.0.0.1:`port` there accepts connections.
    pub fn start_custom(
        net: &TestNet,
        server: bool,
        port: u16,
        make: impl FnOnce(&Path, &Path) -> String,
    ) -> Result<Exim> {
        if !available() {
            bail!(
                "no Exim at {}: run scripts/install-test-deps.sh",
                exim_root().display()
            );
        }
        let dir = std::env::temp_dir().join(format!("tarpit-exim-{}", unique_id()));
        let conf = dir.join("exim.conf");
        let mut exim = Exim {
            dir,
            conf,
            child: None,
        };
        for sub in ["spool", "log", "mail"] {
            std::fs::create_dir_all(exim.dir.join(sub))?;
        }
        // The daemon re-executes `exim_path` for every delivery, with an
        // environment of its own: a wrapper gives it the private libraries.
        let bin = exim.dir.join("exim4");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\nLD_LIBRARY_PATH={} exec {} \"$@\"\n",
                lib_path(),
                exim_root().join("usr/sbin/exim4").display()
            ),
        )?;
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::write(&exim.conf, make(&exim.dir, &bin))?;
        let status = Command::new("chown")
            .arg("-R")
            .arg("Debian-exim:Debian-exim")
            .arg(&exim.dir)
            .status()?;
        if !status.success() {
            bail!(
                "chown Debian-exim failed (no Debian-exim user? run scripts/install-test-deps.sh)"
            );
        }
        // Exim refuses a configuration not owned by root (its CONFIGURE_OWNER).
        std::os::unix::fs::chown(&exim.conf, Some(0), Some(0))?;
        let log = std::fs::File::create(exim.dir.join("stderr.log"))?;
        let ns = if server {
            &net.server_ns
        } else {
            &net.client_ns
        };
        let child = testkit::netns::nsenter(ns, &bin.display().to_string())
            .arg("-C")
            .arg(&exim.conf)
            .args(["-bdf", "-q1s"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start exim4")?;
        exim.child = Some(child);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut exited = false;
        let up = wait::until(Duration::from_secs(20), || {
            exited = exim
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            exited
                || net
                    .in_server(|| {
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                            .is_ok()
                    })
                    .unwrap_or(false)
        });
        if !up || exited {
            bail!(
                "Exim did not listen on {addr}:\n{}\n{}",
                exim.stderr(),
                exim.log()
            );
        }
        Ok(exim)
    }

    /// Exim's main log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log/mainlog")).unwrap_or_default()
    }

    /// Exim's reject log.
    pub fn rejectlog(&self) -> String {
        std::fs::read_to_string(self.dir.join("log/rejectlog")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// Waits until the main log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait::until(timeout, || self.log().contains(needle))
    }

    /// The delivered messages (the sink Maildir), as text.
    pub fn messages(&self) -> Vec<String> {
        ["new", "cur"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.dir.join("mail/sink").join(d)).ok())
            .flat_map(|rd| rd.flatten())
            .filter_map(|e| std::fs::read(e.path()).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect()
    }

    /// Waits until at least `n` messages were delivered.
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> bool {
        wait::until(timeout, || self.messages().len() >= n)
    }
}

/// The library path of the unpacked Exim and its libraries.
pub fn lib_path() -> String {
    let root = exim_root();
    format!(
        "{}:{}",
        root.join("usr/lib/x86_64-linux-gnu").display(),
        root.join("usr/lib").display()
    )
}

impl Drop for Exim {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // delivery processes it forked
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--", &format!("-C {}", self.conf.display())])
            .status();
        if std::thread::panicking() {
            eprintln!(
                "--- exim mainlog ({}) ---\n{}\n--- stderr ---\n{}",
                self.dir.display(),
                self.log(),
                self.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
