//! The Postfix test instance of tests/peers (a copy of ../shared/peers),
//! templated into a directory of its own and run inside a namespace. The
//! tests and the bench differ only in the listeners (master.cf) and a few
//! main.cf overrides; the rest is here.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::{in_ns, nsenter};
use crate::run::run;

/// Postfix's internal services: the template's master.cf without its
/// listeners and without the SMTP client, for an instance that only
/// receives (the demo) or adds what it needs (a sending instance adds
/// `smtp unix`).
pub const INTERNAL_SERVICES: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// The peers directory: the Postfix config templates and the DNSBL zone.
/// The project keeps its own copy under tests/peers so it does not depend
/// on ../shared being present.
pub fn peers_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).join("tests/peers")
}

/// A running Postfix; Drop stops it and removes its directory.
pub struct Instance {
    pub dir: PathBuf,
    conf: PathBuf,
    ns: String,
}

impl Instance {
    /// Templates the peers' main.cf and master.cf into `dir/conf` (every
    /// `@DIR@` replaced by `dir`), makes the queue, data and mail
    /// directories and starts Postfix inside namespace `ns`.
    ///
    /// main.cf binds every address of the namespace, not only loopback,
    /// and gets `main_extra` appended (later settings override earlier
    /// ones); master.cf is what `master` makes of the template.
    ///
    /// Returns once `postfix start` did: wait for a listener with
    /// [`Instance::accepts`]. On any error what was made is removed.
    pub fn start(
        dir: PathBuf,
        ns: &str,
        main_extra: &str,
        master: impl FnOnce(&str) -> String,
    ) -> Result<Instance> {
        let conf = dir.join("conf");
        // From here on Drop stops the instance and removes the directory.
        let pf = Instance {
            dir,
            conf,
            ns: ns.to_string(),
        };
        std::fs::create_dir_all(&pf.conf)?;
        let peers = peers_dir();
        let template = |name: &str| -> Result<String> {
            let text = std::fs::read_to_string(peers.join(name))
                .with_context(|| format!("no Postfix template {name} in {}", peers.display()))?;
            Ok(text.replace("@DIR@", &pf.dir.display().to_string()))
        };
        let main = template("main.cf")?
            .replace("inet_interfaces = loopback-only", "inet_interfaces = all");
        let main = without_keys(&main, main_extra);
        std::fs::write(pf.conf.join("main.cf"), format!("{main}\n{main_extra}\n"))?;
        std::fs::write(pf.conf.join("master.cf"), master(&template("master.cf")?))?;
        for sub in ["queue/etc", "data", "mail"] {
            std::fs::create_dir_all(pf.dir.join(sub))?;
        }
        run(Command::new("chown")
            .arg("postfix")
            .arg(pf.dir.join("data")))?;
        run(Command::new("chown")
            .arg("65534:65534")
            .arg(pf.dir.join("mail")))?;
        // Inside the namespace only a local resolver (rbldnsd, dnsmasq)
        // can answer; never the machine's.
        std::fs::write(
            pf.dir.join("queue/etc/resolv.conf"),
            "nameserver 127.0.0.1\n",
        )?;
        let c = pf.conf.display().to_string();
        run(nsenter(&pf.ns, "postfix").args(["-c", &c, "check"]))?;
        run(nsenter(&pf.ns, "postfix").args(["-c", &c, "start"]))?;
        Ok(pf)
    }

    /// The config directory (`postfix -c`).
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The instance's log (postlogd writes it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// True when something accepts a TCP connection on `addr`, seen from
    /// inside the instance's namespace.
    pub fn accepts(&self, addr: SocketAddr) -> bool {
        in_ns(&self.ns, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
        .unwrap_or(false)
    }
}

/// `main` without the settings `extra` sets again (and their continuation
/// lines): Postfix would warn "overriding earlier entry" in every process,
/// and those warnings, sent to postlogd before it runs, can fill the
/// logging socket's queue and block the master at start.
fn without_keys(main: &str, extra: &str) -> String {
    let key = |l: &str| -> Option<String> {
        if l.starts_with(char::is_whitespace) || l.starts_with('#') {
            return None;
        }
        l.split_once('=').map(|(k, _)| k.trim().to_string())
    };
    let overridden: Vec<String> = extra.lines().filter_map(key).collect();
    let mut out = String::new();
    let mut skipping = false;
    for l in main.lines() {
        if l.starts_with(char::is_whitespace) && !l.trim().is_empty() {
            if !skipping {
                out.push_str(l);
                out.push('\n');
            }
            continue;
        }
        skipping = key(l).is_some_and(|k| overridden.contains(&k));
        if !skipping {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// How long `postfix stop` may take before the instance is killed instead:
/// its `postlog` line blocks for good when postlogd has died (its socket
/// stays, nobody reads it), which hung a bench's teardown once.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

impl Drop for Instance {
    fn drop(&mut self) {
        let c = self.conf.display().to_string();
        let mut stop = nsenter(&self.ns, "postfix");
        stop.args(["-c", &c, "stop"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // A group of its own, so a stuck stop goes with its children.
        std::os::unix::process::CommandExt::process_group(&mut stop, 0);
        if let Ok(mut child) = stop.spawn() {
            let started = std::time::Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if started.elapsed() > STOP_TIMEOUT => {
                        // SAFETY: kill(2) on the process group we made for
                        // this child (its pid is the group id); no memory.
                        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        // postfix stop returns before every child has gone; make sure.
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--", &format!("-c {c}")])
            .status();
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// main.cf of a sending Postfix (appended to the template's): `transport`
/// (entries of an inline map, `{rcpt = smtp:[addr]:port}, ...`) routes
/// mail without DNS; bounces for client.example land in its own Maildir
/// (`mail/sender/`); retries come every second or two, so a deferred
/// message is tried again at once, as a real queue would later.
pub fn sender_main_cf(transport: &str) -> String {
    format!(
        "myhostname = sender.client.example
mydomain = client.example
virtual_mailbox_domains = client.example
virtual_mailbox_maps = inline:{{ {{@client.example = sender/}} }}
relay_domains =
transport_maps = inline:{{ {transport} }}
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 10s
delay_warning_time = 0
"
    )
}

impl Instance {
    /// A sending Postfix in `ns`: its internal services, the SMTP client
    /// and `listener` (master.cf lines; empty: it only sends what
    /// [`Instance::submit`] queues); `main` as [`sender_main_cf`] makes it.
    pub fn start_sender(dir: PathBuf, ns: &str, main: &str, listener: &str) -> Result<Instance> {
        let master = format!(
            "{listener}{INTERNAL_SERVICES}smtp      unix  -       -       n       -       -       smtp\n"
        );
        Instance::start(dir, ns, main, |_| master)
    }

    /// Queues a message (headers, blank line, body) from `from` to
    /// `rcpts` with this instance's sendmail, as a local user would.
    pub fn submit(&self, from: &str, rcpts: &[String], message: &str) -> Result<()> {
        let mut child = Command::new("sendmail")
            .arg("-C")
            .arg(&self.conf)
            .args(["-f", from])
            .args(rcpts)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot run sendmail")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("sendmail stdin")?;
            stdin.write_all(message.as_bytes())?;
        }
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "sendmail failed: {status}");
        Ok(())
    }

    /// True once nothing waits in the queue (`postqueue -p`).
    pub fn queue_empty(&self) -> bool {
        Command::new("postqueue")
            .arg("-c")
            .arg(&self.conf)
            .arg("-p")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("Mail queue is empty"))
            .unwrap_or(false)
    }
}
