//! `cargo xtask run`: build everything, then show the tarpit at work.
//!
//! Without `--config` it runs the first-run demo: a throw-away MTA on
//! loopback (the tests' Postfix instance, or a small sink when Postfix is
//! missing), the agent in front of it with config/demo.toml (127.0.0.2 is
//! not internal, so it gets the tarpit), and three commands to try. Ctrl-C
//! stops the agent (which detaches), the MTA, and removes the demo's
//! directory and pins. With `--config FILE` it runs the agent with that
//! file instead, as `tarpit run -c FILE` would.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{ebpf, paths, shell};

/// The throw-away MTA's port on 127.0.0.1 (not 10025: an amavis or a
/// moved MTA may be there on a real box).
const DEMO_BACKEND_PORT: u16 = 10125;
/// Where the agent takes clients in the demo (config/demo.toml).
const DEMO_PORT: u16 = 2525;

pub fn run(config: Option<PathBuf>, release: bool, no_build: bool) -> Result<()> {
    if !shell::is_root() {
        bail!("`cargo xtask run` must run as root: the agent loads eBPF programs and mounts bpffs");
    }
    if !no_build {
        ebpf::build()?;
        let mut build = Command::new("cargo");
        build.current_dir(paths::root()).args([
            "build",
            "--package",
            "tarpit-user",
            "--bin",
            "tarpit",
        ]);
        if release {
            build.arg("--release");
        }
        shell::run(&mut build)?;
    }
    let profile = if release { "release" } else { "debug" };
    let bin = paths::target_dir().join(profile).join("tarpit");
    if !bin.is_file() {
        bail!("{} not found: run without --no-build", bin.display());
    }
    match config {
        Some(config) => {
            shell::say(
                "Running",
                &format!("{} run -c {}", bin.display(), config.display()),
            );
            // exec: Ctrl-C goes straight to the agent, which detaches and exits.
            let err = Command::new(bin).arg("run").arg("-c").arg(config).exec();
            bail!("cannot start the agent: {err}")
        }
        None => demo(&bin),
    }
}

/// The signal that asked the demo to stop (0: none yet).
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop(sig: libc::c_int) {
    STOP.store(sig, Ordering::SeqCst);
}

/// The throw-away MTA behind the demo's agent.
enum Mta {
    Postfix(testkit::postfix::Instance),
    Sink(PathBuf),
}

impl Mta {
    fn describe(&self) -> String {
        match self {
            Mta::Postfix(pf) => format!(
                "Postfix (test instance in {}; log {}, mailbox {})",
                pf.dir.display(),
                pf.dir.join("maillog").display(),
                pf.dir.join("mail/sink/new").display()
            ),
            Mta::Sink(dir) => format!(
                "a small sink (no Postfix; messages land in {})",
                dir.display()
            ),
        }
    }
}

/// Removes the demo's directory when the demo ends, whatever the way.
struct DemoDir(PathBuf);

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn demo(bin: &Path) -> Result<()> {
    // `<pid hex>-0`: the suite's leak check tells a dead demo's pins by it.
    let id = testkit::unique_id();
    let dir = DemoDir(std::env::temp_dir().join(format!("tarpit-demo-{id}")));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    let pins = PathBuf::from(format!("/sys/fs/bpf/tarpit-demo-{id}"));
    let backend = SocketAddr::from(([127, 0, 0, 1], DEMO_BACKEND_PORT));
    for (addr, what) in [
        (backend, "the demo's MTA"),
        (SocketAddr::from(([127, 0, 0, 1], DEMO_PORT)), "the agent"),
    ] {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
            bail!("{addr} is taken, and the demo needs it for {what}: stop what listens there");
        }
    }

    let mta = start_mta(&dir.0, backend)?;
    let template = std::fs::read_to_string(paths::root().join("config/demo.toml"))
        .context("cannot read config/demo.toml")?;
    let config = dir.0.join("demo.toml");
    std::fs::write(
        &config,
        template
            .replace("@DIR@", &dir.0.display().to_string())
            .replace("@BACKEND@", &backend.to_string())
            .replace("@PINS@", &pins.display().to_string()),
    )?;
    let message = dir.0.join("message.eml");
    std::fs::write(
        &message,
        "From: demo@example.org\r\nTo: postmaster@tarpit.test\r\nSubject: through the tarpit\r\n\r\nHello from 127.0.0.2.\r\n",
    )?;

    // Ctrl-C reaches the agent (same process group) and us: we wait for
    // the agent to detach, then remove the MTA and the directory.
    // SAFETY: the handler only stores into an atomic, which is
    // async-signal-safe; the handlers are reset in exec'd children.
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
    }

    shell::say("Backend", &mta.describe());
    shell::say(
        "Running",
        &format!("{} run -c {}", bin.display(), config.display()),
    );
    let log = std::fs::File::create(dir.0.join("agent.log"))?;
    let mut agent = Command::new(bin)
        .arg("run")
        .arg("-c")
        .arg(&config)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the agent")?;
    let log = dir.0.join("agent.log");
    let mut shown = 0;
    let outcome = match wait_ready(&mut agent, &log, &mut shown) {
        Ok(()) => {
            print_tries(bin, &config, &message);
            follow(&mut agent, &log, &mut shown)
        }
        Err(e) => Err(e),
    };
    stop_agent(&mut agent);
    echo_log(&log, &mut shown);
    // detach_on_exit removed the pins; if the agent died before it could,
    // `tarpit detach` does it now.
    if pins.exists() {
        let _ = Command::new(bin)
            .arg("detach")
            .arg("-c")
            .arg(&config)
            .status();
    }
    drop(mta);
    drop(dir);
    shell::say(
        "Removed",
        "the agent's programs and pins, the MTA, the demo's directory",
    );
    outcome
}

/// Postfix when it is installed, else the sink (`TARPIT_DEMO_SINK=1`
/// forces the sink: its test runs where Postfix is installed).
fn start_mta(dir: &Path, backend: SocketAddr) -> Result<Mta> {
    let force_sink = std::env::var_os("TARPIT_DEMO_SINK").is_some_and(|v| v == "1");
    if !force_sink && Path::new("/usr/sbin/postfix").is_file() {
        let port = backend.port();
        let pf = testkit::postfix::Instance::start(dir.join("postfix"), "", "", |_| {
            format!(
                "{backend} inet n - n - - smtpd\n  -o syslog_name=postfix/demo\n  -o smtpd_upstream_proxy_protocol=haproxy\n  -o smtpd_upstream_proxy_timeout=5s\n  -o smtpd_timeout=900s\n  -o smtpd_junk_command_limit=1000\n{}",
                testkit::postfix::INTERNAL_SERVICES
            )
        })
        .with_context(|| format!("cannot start the demo's Postfix on 127.0.0.1:{port}"))?;
        let start = Instant::now();
        while !pf.accepts(backend) {
            if start.elapsed() > Duration::from_secs(20) {
                bail!("the demo's Postfix did not listen; log:\n{}", pf.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        return Ok(Mta::Postfix(pf));
    }
    let mail = dir.join("mail");
    std::fs::create_dir_all(&mail)?;
    let listener = TcpListener::bind(backend).with_context(|| format!("cannot bind {backend}"))?;
    let into = mail.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().flatten().enumerate() {
            let into = into.clone();
            std::thread::spawn(move || {
                let _ = sink_session(conn, &into, n);
            });
        }
    });
    Ok(Mta::Sink(mail))
}

/// One SMTP session of the sink: skips the PROXY v2 header, accepts
/// everything, stores each message as `N-M.eml`.
fn sink_session(conn: TcpStream, into: &Path, n: usize) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(900)))?;
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut head = [0u8; 16];
    r.read_exact(&mut head)?;
    if &head[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
        return Ok(());
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut skip = vec![0u8; len];
    r.read_exact(&mut skip)?;
    out.write_all(b"220 sink.localhost ESMTP demo sink\r\n")?;
    let mut line = String::new();
    let mut m = 0;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => out.write_all(b"250-sink.localhost\r\n250 8BITMIME\r\n")?,
            "DATA" => {
                out.write_all(b"354 go ahead\r\n")?;
                let mut body = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    body.push_str(&line);
                }
                m += 1;
                std::fs::write(into.join(format!("{n}-{m}.eml")), body)?;
                out.write_all(b"250 2.0.0 stored\r\n")?;
            }
            "QUIT" => {
                out.write_all(b"221 2.0.0 bye\r\n")?;
                return Ok(());
            }
            _ => out.write_all(b"250 2.0.0 ok\r\n")?,
        }
    }
}

fn wait_ready(agent: &mut Child, log: &Path, shown: &mut usize) -> Result<()> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("tarpit agent running") {
            echo_log(log, shown);
            return Ok(());
        }
        if let Ok(Some(status)) = agent.try_wait() {
            bail!("the agent exited ({status}):\n{text}");
        }
        if STOP.load(Ordering::SeqCst) != 0 {
            bail!("stopped before the agent was ready");
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("the agent was not ready within 120 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The three things to try, each on a line of its own starting with
/// `    $ ` (the demo's test runs exactly these lines).
fn print_tries(bin: &Path, config: &Path, message: &Path) {
    let bin = bin.display();
    let config = config.display();
    let message = message.display();
    println!(
        "
The tarpit is in front of a throw-away MTA on 127.0.0.1:{DEMO_BACKEND_PORT}; clients come to
127.0.0.1:{DEMO_PORT}. 127.0.0.1 is internal (never tarpitted); 127.0.0.2 is not. In another
shell, as root:

1. A good client from 127.0.0.2: it waits for the greeting (5 s of silence),
   then delivers its message to the MTA:
    $ curl -v --interface 127.0.0.2 --mail-from demo@example.org --mail-rcpt postmaster@tarpit.test --upload-file {message} smtp://127.0.0.1:{DEMO_PORT}

2. A bot that talks before the greeting: it gets 554 and is dropped (three
   times in 10 minutes, and the kernel drops 127.0.0.2 for an hour):
    $ printf 'EHLO bot.example\\r\\n' | curl -sS --max-time 15 --interface 127.0.0.2 telnet://127.0.0.1:{DEMO_PORT}

3. What tarpit knows about 127.0.0.2, and its policy for it now:
    $ {bin} ip -c {config} 127.0.0.2

The agent's log follows. Ctrl-C stops it and removes everything the demo made.
"
    );
    let _ = std::io::stdout().flush();
}

/// Prints what the agent logged since `shown` bytes.
fn echo_log(log: &Path, shown: &mut usize) {
    if let Ok(text) = std::fs::read_to_string(log)
        && let Some(new) = text.get(*shown..)
    {
        print!("{new}");
        let _ = std::io::stdout().flush();
        *shown = text.len();
    }
}

/// Echoes the agent's log until it exits or we are asked to stop.
fn follow(agent: &mut Child, log: &Path, shown: &mut usize) -> Result<()> {
    loop {
        echo_log(log, shown);
        if STOP.load(Ordering::SeqCst) != 0 {
            return Ok(());
        }
        if let Ok(Some(status)) = agent.try_wait() {
            bail!("the agent exited by itself ({status})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for the agent to stop; it got the Ctrl-C itself (same process
/// group). When only we were signalled, we pass the signal on.
fn stop_agent(agent: &mut Child) {
    let asked = Instant::now();
    let mut passed_on = false;
    loop {
        if let Ok(Some(_)) = agent.try_wait() {
            return;
        }
        let waited = asked.elapsed();
        if !passed_on && waited > Duration::from_secs(1) {
            let sig = match STOP.load(Ordering::SeqCst) {
                0 => libc::SIGTERM,
                s => s,
            };
            // SAFETY: kill(2) of our own child, which has not been reaped.
            unsafe { libc::kill(agent.id() as libc::pid_t, sig) };
            passed_on = true;
        }
        if waited > Duration::from_secs(45) {
            let _ = agent.kill();
            let _ = agent.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
