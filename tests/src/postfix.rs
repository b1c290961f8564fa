//! The Postfix test instance of ../shared/peers (copied to tests/peers),
//! templated into a temp dir and run inside a test's server namespace
//! (`testkit::postfix`, which the bench shares); the tests' listeners are
//! the template's, also on the server veth addresses.
use std::net::SocketAddr;
use std::ops::Deref;
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

    /// Stops Postfix (kill -9 of the master, for "MTA died" tests).
    pub fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("queue/pid/master.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}
