//! The Postfix test instance of ../shared/peers (copied to tests/peers),
//! templated into a temp dir and run inside a test's server namespace.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::env::{peers_dir, unique_id};
use crate::netns::{SERVER_V4, SERVER_V6, TestNet};
use crate::wait;

/// Listener ports of the instance (see tests/peers/master.cf).
pub const PLAIN: u16 = 2525;
pub const PROXY: u16 = 2535;
pub const XCLIENT: u16 = 2545;
pub const POSTSCREEN: u16 = 2526;
pub const POSTSCREEN_PROXY: u16 = 2536;

/// A running Postfix instance; Drop stops it and removes its directory.
pub struct Postfix {
    pub dir: PathBuf,
    server_ns: String,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// main.cf: bind every address of the namespace, not only loopback.
fn template_main(text: &str, dir: &Path) -> String {
    text.replace("@DIR@", &dir.display().to_string())
        .replace("inet_interfaces = loopback-only", "inet_interfaces = all")
}

/// master.cf: every `127.0.0.1:PORT` service (with its `-o` lines) is
/// repeated on the server veth addresses, the clients' way in. postscreen
/// copies get a cache file of their own (a btree cannot be shared).
fn template_master(text: &str, dir: &Path) -> String {
    let text = text.replace("@DIR@", &dir.display().to_string());
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
        let pf = Postfix {
            dir: dir.clone(),
            server_ns: net.server_ns.clone(),
        };
        let conf = dir.join("conf");
        std::fs::create_dir_all(&conf)?;
        for name in ["main.cf", "master.cf"] {
            let text = std::fs::read_to_string(peers_dir().join(name))?;
            let text = if name == "main.cf" {
                format!("{}\n{extra_main_cf}\n", template_main(&text, &dir))
            } else {
                template_master(&text, &dir)
            };
            std::fs::write(conf.join(name), text)?;
        }
        for sub in ["queue/etc", "data", "mail"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        run(Command::new("chown").arg("postfix").arg(dir.join("data")))?;
        run(Command::new("chown")
            .arg("65534:65534")
            .arg(dir.join("mail")))?;
        std::fs::write(dir.join("queue/etc/resolv.conf"), "nameserver 127.0.0.1\n")?;
        let confs = conf.display().to_string();
        run(net.server_cmd("postfix").args(["-c", &confs, "check"]))?;
        run(net.server_cmd("postfix").args(["-c", &confs, "start"]))?;
        // Ready when smtpd answers on the plain port.
        let ready = wait::until(Duration::from_secs(20), || {
            net.in_server(|| {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from((SERVER_V4, PLAIN)),
                    Duration::from_millis(200),
                )
                .is_ok()
            })
            .unwrap_or(false)
        });
        if !ready {
            bail!("Postfix did not start listening; log:\n{}", pf.log());
        }
        Ok(pf)
    }

    /// The instance's log (postlogd writes it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
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

impl Drop for Postfix {
    fn drop(&mut self) {
        let confs = self.dir.join("conf").display().to_string();
        let _ = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.server_ns))
            .args(["--", "postfix", "-c", &confs, "stop"])
            .output();
        // postfix stop returns before every child has gone; make sure.
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--", &format!("-c {confs}")])
            .status();
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
