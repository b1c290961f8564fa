//! The Postfix test instance of ../shared/peers (copied to tests/peers),
//! templated into a temp dir and run inside a test's server namespace
//! (`testkit::postfix`, which the bench shares); the tests' listeners are
//! the template's, also on the server veth addresses.
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use testkit::postfix::Instance;

use crate::env::unique_id;
use crate::netns::{SERVER_V4, SERVER_V6, TestNet};
use crate::wait;

/// Listener ports of the instance (see tests/peers/master.cf).
pub const PLAIN: u16 = 2525;
pub const PROXY: u16 = 2535;
pub const XCLIENT: u16 = 2545;
pub const POSTSCREEN: u16 = 2526;
pub const POSTSCREEN_PROXY: u16 = 2536;
/// PROXY listener with `smtpd_timeout = 10s`: Postfix under stress, for
/// the agent's keep-alive during long holds (2535, 2545 and 2565 have
/// 900 s, as docs/mta-setup.md requires).
pub const STRESSED: u16 = 2555;
/// Implicit-TLS ("wrapper mode", port 465) listener behind a PROXY
/// header; its certificate is what [`Postfix::install_wrapper_cert`] put.
pub const WRAPPER: u16 = 2565;

/// A running Postfix instance: the fields and methods of [`Instance`]
/// (`dir`, `log()`, ...); Drop stops it and removes its directory.
pub struct Postfix(Instance);

impl Deref for Postfix {
    type Target = Instance;
    fn deref(&self) -> &Instance {
        &self.0
    }
}

/// master.cf: every `127.0.0.1:PORT` service (with its `-o` lines) is
/// repeated on the server veth addresses, the clients' way in. postscreen
/// copies get a cache file of their own (a btree cannot be shared).
fn template_master(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    let mut copies = 0;
    while i < lines.len() {
        let mut j = i + 1;
        while j < lines.len() && lines[j].starts_with("  ") {
            j += 1;
        }
        let block = &lines[i..j];
        for l in block {
            out.push_str(l);
            out.push('\n');
        }
        if let Some(rest) = lines[i].strip_prefix("127.0.0.1:") {
            for addr in [SERVER_V4.to_string(), format!("[{SERVER_V6}]")] {
                copies += 1;
                out.push_str(&format!("{addr}:{rest}\n"));
                for l in &block[1..] {
                    if !l.contains("postscreen_cache_map") {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
                if rest.contains("postscreen") {
                    out.push_str(&format!(
                        "  -o postscreen_cache_map=btree:$data_directory/psc_copy{copies}\n"
                    ));
                }
            }
        }
        i = j;
    }
    out
}

impl Postfix {
    /// Starts an instance inside the server namespace of `net`.
    pub fn start(net: &TestNet) -> Result<Postfix> {
        Postfix::start_with(net, "")
    }

    /// Like [`Postfix::start`], with `extra_main_cf` appended to main.cf
    /// (later settings override earlier ones).
    pub fn start_with(net: &TestNet, extra_main_cf: &str) -> Result<Postfix> {
        let dir = std::env::temp_dir().join(format!("tarpit-postfix-{}", unique_id()));
        let pf = Postfix(Instance::start(
            dir,
            &net.server_ns,
            extra_main_cf,
            template_master,
        )?);
        // Ready when smtpd answers on the plain port.
        let plain = SocketAddr::from((SERVER_V4, PLAIN));
        if !wait::until(Duration::from_secs(20), || pf.accepts(plain)) {
            bail!("Postfix did not start listening; log:\n{}", pf.log());
        }
        Ok(pf)
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait::until(timeout, || self.log().contains(needle))
    }

    /// Messages delivered to the sink Maildir (`anything@tarpit.test`).
    pub fn delivered(&self) -> usize {
        let new = self.dir.join("mail/sink/new");
        let cur = self.dir.join("mail/sink/cur");
        [new, cur]
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .map(|rd| rd.count())
            .sum()
    }

    /// Waits until at least `n` messages were delivered.
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> bool {
        wait::until(timeout, || self.delivered() >= n)
    }

    /// Gives the wrapper-mode listener ([`WRAPPER`]) its certificate and
    /// key (PEM files). smtpd reads them when a connection spawns it, so
    /// this works on a running instance; master.cf names `@DIR@/tls`
    /// because a test's certificate cannot be known when it is written.
    pub fn install_wrapper_cert(&self, cert: &Path, key: &Path) -> Result<()> {
        let dir = self.dir.join("tls");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(cert, dir.join("cert.pem"))?;
        std::fs::copy(key, dir.join("key.pem"))?;
        Ok(())
    }

    /// The delivered messages (sink Maildir), as text.
    pub fn messages(&self) -> Vec<String> {
        ["new", "cur"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.dir.join("mail/sink").join(d)).ok())
            .flat_map(|rd| rd.flatten())
            .filter_map(|e| std::fs::read(e.path()).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect()
    }

    /// Files in the queue (maildrop, incoming, active, deferred, hold):
    /// 0 when nothing is queued or being received.
    pub fn queued(&self) -> usize {
        fn count(dir: &Path) -> usize {
            std::fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| match e.file_type() {
                            Ok(t) if t.is_dir() => count(&e.path()),
                            _ => 1,
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        ["maildrop", "incoming", "active", "deferred", "hold"]
            .iter()
            .map(|q| count(&self.dir.join("queue").join(q)))
            .sum()
    }

    /// `postqueue -p` run inside the instance's namespace: Postfix's own
    /// view of its queue ("Mail queue is empty" when nothing is queued).
    pub fn postqueue(&self, net: &TestNet) -> String {
        let out = net
            .server_cmd("postqueue")
            .arg("-c")
            .arg(self.conf())
            .arg("-p")
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("cannot run postqueue: {e}"),
        }
    }

    /// Stops Postfix (kill -9 of the master, for "MTA died" tests).
    pub fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("queue/pid/master.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}
