//! The Debian package (`cargo xtask deb`) through its whole life on this
//! box: dpkg installs it (files, conffile, unit that `systemd-analyze
//! verify` accepts, the `tarpit` user, /var/lib/tarpit; nothing started);
//! the agent runs with the unit's own ExecStart line (no systemd as PID 1
//! here) on the test's interface, with the conffile edited as an admin
//! would; an upgrade to a rebuilt package while mail flows keeps the
//! programs attached and the pins in place, and the agent restarted on the
//! new binary (what the postinst's `try-restart` does under systemd) finds
//! them again; no message is lost. `dpkg -r` stops the agent and detaches
//! everything; `dpkg -P` removes the conffile and the state.
//!
//! Runs the built xtask binary (`cargo xtask` would wait for the cargo
//! lock that `cargo test` holds), with the tarpit binary under test.
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tarpit_tests::smtp_client::{SmtpClient, agent_v4, agent_v6, message, proxy_backend};
use tarpit_tests::{
    CLIENT_V4, CLIENT_V6, PinDir, Postfix, TempDir, TestNet, env::repo_root, require_root,
    tarpit_bin, wait,
};

const UNIT: &str = "/lib/systemd/system/tarpit.service";
const CONFFILE: &str = "/etc/tarpit/tarpit.toml";

fn xtask_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XTASK_BIN") {
        return PathBuf::from(p);
    }
    let p = tarpit_bin().with_file_name("xtask");
    assert!(p.is_file(), "{} not found: build it first", p.display());
    p
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn build_deb(out: &Path, revision: &str) -> PathBuf {
    run(Command::new(xtask_bin())
        .args(["deb", "--binary"])
        .arg(tarpit_bin())
        .args(["--revision", revision, "--out-dir"])
        .arg(out)
        .current_dir(repo_root()));
    let arch =
        String::from_utf8_lossy(&run(Command::new("dpkg").arg("--print-architecture")).stdout)
            .trim()
            .to_string();
    let deb = out.join(format!(
        "tarpit_{}-{revision}_{arch}.deb",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(deb.is_file(), "{} built", deb.display());
    deb
}

fn dpkg(args: &[&str]) -> Output {
    // A conffile left by an earlier run keeps the admin's version.
    run(Command::new("dpkg")
        .args(["--force-confdef", "--force-confold"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The agent started from the unit's ExecStart line.
struct UnitAgent {
    child: Child,
    log: PathBuf,
}

impl UnitAgent {
    fn start(net: &TestNet, dir: &Path, n: u32) -> UnitAgent {
        let unit = std::fs::read_to_string(UNIT).expect("unit installed");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart line");
        let mut words = exec.split_whitespace();
        let program = words.next().expect("program");
        assert_eq!(
            program, "/usr/bin/tarpit",
            "the unit runs the packaged binary"
        );
        let log = dir.join(format!("agent-{n}.log"));
        let f = std::fs::File::create(&log).expect("log");
        let child = net
            .server_cmd(program)
            .args(words)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("agent starts");
        let mut a = UnitAgent { child, log };
        let ready = wait::until(Duration::from_secs(60), || {
            a.log().contains("tarpit agent running") || a.child.try_wait().ok().flatten().is_some()
        });
        assert!(
            ready && a.log().contains("tarpit agent running"),
            "agent not ready:\n{}",
            a.log()
        );
        a
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exe(&self) -> String {
        std::fs::read_link(format!("/proc/{}/exe", self.child.id()))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// SIGTERM and wait, as systemd's stop does.
    fn stop(&mut self) {
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let mut done = false;
        wait::until(Duration::from_secs(45), || {
            done = self.child.try_wait().ok().flatten().is_some();
            done
        });
        assert!(done, "agent did not stop:\n{}", self.log());
    }
}

impl Drop for UnitAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Purges the package and removes what a failed run left.
struct Cleanup {
    pins: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.pins.exists() {
            let _ = Command::new(tarpit_bin())
                .arg("detach")
                .arg("--pin-path")
                .arg(&self.pins)
                .status();
        }
        let _ = Command::new("dpkg").args(["-P", "tarpit"]).output();
    }
}

fn xdp_attached(net: &TestNet) -> bool {
    let o =
        run(Command::new("ip").args(["-n", &net.server_ns, "link", "show", "dev", &net.server_if]));
    text(&o).contains("xdp")
}

/// One message from `src`, retried like an MTA would (up to 40 tries,
/// 250 ms apart) while the agent restarts. Returns the tries it took.
fn deliver(net: &TestNet, src: IpAddr, subject: &str) -> usize {
    let dst = if src.is_ipv4() {
        agent_v4()
    } else {
        agent_v6()
    };
    for attempt in 1..=40 {
        let ok = (|| -> anyhow::Result<()> {
            let mut c = SmtpClient::connect(net, src, dst)?;
            c.set_read_timeout(Duration::from_secs(20))?;
            anyhow::ensure!(c.reply()?.code == 220, "no 220");
            c.expect("EHLO client.example", 250)?;
            c.expect("MAIL FROM:<sender@client.example>", 250)?;
            c.expect("RCPT TO:<sink@tarpit.test>", 250)?;
            c.expect("DATA", 354)?;
            c.send(message(subject).as_bytes())?;
            c.expect(".", 250)?;
            let _ = c.cmd("QUIT");
            Ok(())
        })();
        if ok.is_ok() {
            return attempt;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("{subject}: not accepted in 40 tries");
}

#[test]
fn the_package_installs_upgrades_with_mail_flowing_removes_and_purges_cleanly() {
    if !require_root() {
        return;
    }
    let tmp = TempDir::new("deb");
    let v1 = build_deb(&tmp.path.join("v1"), "1");
    let v2 = build_deb(&tmp.path.join("v2"), "2");

    // lintian: no error; the warnings and infos left are explained in
    // docs/operations.md ("As a Debian package").
    let lintian = Command::new("lintian")
        .args(["--tag-display-limit", "0", "-I"])
        .arg(&v1)
        .output()
        .expect("lintian (apt-get install lintian)");
    let report = text(&lintian);
    println!("lintian {}:\n{report}", v1.display());
    let tags: Vec<&str> = report
        .lines()
        .filter(|l| l.len() > 2 && l.as_bytes()[1] == b':')
        .collect();
    let explained = [
        "W: tarpit: initial-upload-closes-no-bugs",
        "I: tarpit: hardening-no-fortify-functions",
        "I: tarpit: package-supports-alternative-init-but-no-init.d-script",
    ];
    for t in &tags {
        assert!(
            explained.iter().any(|e| t.starts_with(e)) || binary_noise(t),
            "lintian tag not explained: {t}"
        );
    }

    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pins");
    let _cleanup = Cleanup {
        pins: pins.path.clone(),
    };
    let pf = Postfix::start(&net).expect("postfix");

    // Install.
    dpkg(&["-i", &v1.display().to_string()]);
    for f in [
        "/usr/bin/tarpit",
        UNIT,
        "/usr/lib/sysusers.d/tarpit.conf",
        "/usr/share/man/man1/tarpit.1.gz",
        "/usr/share/man/man1/tarpit-ip.1.gz",
        "/usr/share/doc/tarpit/copyright",
        "/usr/share/tarpit/grafana/tarpit-dashboard.json",
        CONFFILE,
    ] {
        assert!(Path::new(f).is_file(), "{f} installed");
    }
    let shipped = std::fs::read_to_string(repo_root().join("config/tarpit.toml")).expect("shipped");
    assert_eq!(
        std::fs::read_to_string(CONFFILE).expect("conffile"),
        shipped,
        "the conffile is the shipped, loopback-only config"
    );
    let conffiles = text(&run(Command::new("dpkg-query").args([
        "-W",
        "-f",
        "${Conffiles}",
        "tarpit",
    ])));
    assert!(
        conffiles.contains(CONFFILE),
        "{CONFFILE} is a conffile: {conffiles}"
    );
    let unit = std::fs::read_to_string(UNIT).expect("unit");
    assert!(
        unit.contains("ExecStart=/usr/bin/tarpit run -c /etc/tarpit/tarpit.toml"),
        "{unit}"
    );
    let verify = Command::new("systemd-analyze")
        .args(["verify", UNIT])
        .output()
        .expect("systemd-analyze");
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        text(&verify)
    );
    let user = text(&run(Command::new("getent").args(["passwd", "tarpit"])));
    assert!(
        user.ends_with(":/var/lib/tarpit:/usr/sbin/nologin\n"),
        "{user}"
    );
    let state = std::fs::metadata("/var/lib/tarpit").expect("/var/lib/tarpit");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(
        (state.uid(), state.gid()),
        (0, 0),
        "root's, as StateDirectory"
    );
    assert_eq!(state.permissions().mode() & 0o7777, 0o755);
    let running = Command::new("pgrep")
        .args(["-f", "^/usr/bin/tarpit run"])
        .output()
        .expect("pgrep");
    assert!(running.stdout.is_empty(), "the package started nothing");

    // The admin's configuration: the test's interface and ports, production
    // lifetime (programs and pins survive the agent), a pid file for the
    // maintainer scripts, the unprivileged user.
    let pid_file = tmp.path.join("tarpit.pid");
    let config = format!(
        "[listen]\naddrs = [\"{}\", \"{}\"]\n[kernel]\ninterfaces = [\"{}\"]\npin_path = \"{}\"\ndetach_on_exit = false\n{}[greeting]\ndelay = \"0s\"\n[daemon]\nuser = \"tarpit\"\npid_file = \"{}\"\n",
        agent_v4(),
        agent_v6(),
        net.server_if,
        pins.path.display(),
        proxy_backend(),
        pid_file.display()
    );
    std::fs::write(CONFFILE, &config).expect("edit conffile");
    let mut agent = UnitAgent::start(&net, &tmp.path, 1);
    assert_eq!(agent.exe(), "/usr/bin/tarpit");
    assert!(
        pins.path.join("BLOCK").exists(),
        "maps pinned: {:?}",
        pins.entries()
    );
    let pins_before = pins.entries();

    // Upgrade while mail flows.
    let (sent, upgraded_exe) = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let mut sent = Vec::new();
            for i in 0..16 {
                let src = if i % 2 == 0 {
                    IpAddr::from(CLIENT_V4)
                } else {
                    IpAddr::from(CLIENT_V6)
                };
                let subject = format!("upgrade {i}");
                deliver(&net, src, &subject);
                sent.push(subject);
                std::thread::sleep(Duration::from_millis(150));
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(600));
        dpkg(&["-i", &v2.display().to_string()]);
        let version = text(&run(Command::new("dpkg-query").args([
            "-W",
            "-f",
            "${Version}",
            "tarpit",
        ])));
        assert!(version.ends_with("-2"), "upgraded: {version}");
        // The upgrade detached nothing: the old agent still runs (its
        // binary replaced under it), its programs and pins are in place.
        assert!(
            agent.child.try_wait().ok().flatten().is_none(),
            "agent kept running"
        );
        assert!(
            agent.exe().ends_with("(deleted)"),
            "binary replaced: {}",
            agent.exe()
        );
        assert!(xdp_attached(&net), "XDP still attached after the upgrade");
        assert_eq!(pins.entries(), pins_before, "pins kept");
        assert_eq!(
            std::fs::read_to_string(CONFFILE).expect("conffile"),
            config,
            "the admin's conffile kept"
        );
        // try-restart: stop, start the new binary from the unit's line.
        agent.stop();
        assert!(xdp_attached(&net), "XDP stays attached while no agent runs");
        assert_eq!(pins.entries(), pins_before, "pins kept across the restart");
        agent = UnitAgent::start(&net, &tmp.path, 2);
        let exe = agent.exe();
        (sender.join().expect("sender"), exe)
    });
    assert_eq!(
        upgraded_exe, "/usr/bin/tarpit",
        "restarted on the new binary"
    );
    assert!(
        agent.log().contains("reused=true"),
        "the new agent found the pinned maps:\n{}",
        agent.log()
    );
    assert!(
        pf.wait_delivered(sent.len(), Duration::from_secs(30)),
        "{}",
        pf.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    let messages = pf.messages();
    for subject in &sent {
        let n = messages
            .iter()
            .filter(|m| {
                m.contains(&format!("Subject: {subject}\r\n"))
                    || m.contains(&format!("Subject: {subject}\n"))
            })
            .count();
        assert_eq!(n, 1, "{subject} delivered exactly once");
    }
    assert_eq!(messages.len(), sent.len(), "nothing lost, nothing twice");

    // Remove: the prerm stops the agent (pid file) and detaches.
    // The agent is this test's child: reap it while dpkg runs (init
    // would), or the prerm's wait would see a zombie.
    let mut remove = Command::new("dpkg")
        .args(["-r", "tarpit"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dpkg -r");
    let mut stopped = false;
    let mut removed = None;
    wait::until(Duration::from_secs(90), || {
        stopped |= agent.child.try_wait().ok().flatten().is_some();
        removed = remove.try_wait().ok().flatten();
        removed.is_some()
    });
    let out = remove.wait_with_output().expect("dpkg -r output");
    assert!(out.status.success(), "dpkg -r failed: {}", text(&out));
    stopped |= agent.child.try_wait().ok().flatten().is_some();
    assert!(stopped, "dpkg -r stopped the agent: {}", text(&out));
    assert!(
        !pins.path.exists() || pins.entries().is_empty(),
        "no pins left: {:?}",
        pins.entries()
    );
    assert!(!xdp_attached(&net), "nothing attached after dpkg -r");
    assert!(!Path::new("/usr/bin/tarpit").exists(), "binary removed");
    assert!(
        Path::new(CONFFILE).exists(),
        "the conffile stays until purge"
    );
    assert!(
        Path::new("/var/lib/tarpit").exists(),
        "state stays until purge"
    );

    // Purge: conffile and state go.
    dpkg(&["-P", "tarpit"]);
    assert!(!Path::new(CONFFILE).exists(), "conffile purged");
    assert!(!Path::new("/var/lib/tarpit").exists(), "state purged");
    let status = Command::new("dpkg-query")
        .args(["-W", "tarpit"])
        .output()
        .expect("dpkg-query");
    assert!(
        !status.status.success() || text(&status).trim().is_empty(),
        "package gone"
    );
}

/// lintian's `spelling-error-in-binary` on bytes that are not our text:
/// it reads any run of letters in the executable (machine code, tables),
/// so a build can show `yUr your` where no source says "yUr". A
/// misspelling that is a word of our own sources is a real typo and still
/// fails the test.
fn binary_noise(tag: &str) -> bool {
    let Some(rest) = tag.strip_prefix("I: tarpit: spelling-error-in-binary ") else {
        return false;
    };
    let Some(word) = rest.split_whitespace().next() else {
        return false;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = Vec::new();
    for dir in ["tarpit-user/src", "tarpit-common/src", "config"] {
        collect_files(&root.join(dir), &mut sources);
    }
    !sources.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|text| {
            text.split(|c: char| !c.is_alphanumeric())
                .any(|w| w == word)
        })
    })
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}
