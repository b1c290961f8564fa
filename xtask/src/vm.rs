//! `cargo xtask test --kernel ...`: the kernel-side end-to-end tests inside
//! qemu, on Debian's own kernels, with the binaries built on this host.
//!
//! Why: mail servers run distribution kernels (Debian 12's 6.1 most of all,
//! 6.12, 5.10 on older hosts), while the build box runs something much
//! newer. tc attach, helpers and verifier limits differ between them, and
//! nothing shows it until a user tries, so the same test executables run on
//! each kernel.
//!
//! How: `scripts/vm/setup.sh` fetches each kernel once per machine into
//! `target/vm/kernels` (a fresh clone downloads again); `scripts/vm/run-vm.sh`
//! boots it with the host's root file system read-only under a RAM overlay,
//! so the host's test executables, `target/debug/tarpit`, `ip`, `bpftool`...
//! run unchanged. The guest has no environment of ours and a kernel command
//! line of ~2000 bytes, so everything it runs is written into a script in
//! the kernel's output directory `target/vm/out/<kernel>/` (the guest's
//! `/mnt/out`); the guest writes each test executable's output and exit
//! status next to it, which stay there for a look after a failure.
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{paths, shell};

/// A Debian kernel the tests boot in qemu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    /// What `--kernel` calls it.
    pub name: &'static str,
    /// Its directory under the kernels dir (scripts/vm/setup.sh's names).
    tree: &'static str,
}

/// Oldest first: 5.10 (Debian 11), 6.1 (Debian 12), 6.12 (Debian 12 "+deb12"
/// and Debian 13).
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "5.10",
        tree: "k510",
    },
    Kernel {
        name: "6.1",
        tree: "k61",
    },
    Kernel {
        name: "6.12",
        tree: "k612",
    },
];

/// Test executables of the `tarpit-tests` crate that run in the VMs: the
/// ones about the kernel side, and the closed loop between kernel and
/// agent with the real Postfix (sk_lookup bypass and fail-open, the window
/// clamp, the allow and block lists the agent writes). The rest (SMTP
/// policy, CLI...) does not depend on the kernel version and runs on the
/// host only.
fn runs_in_vm(test_target: &str) -> bool {
    test_target == "foundation"
        || test_target == "portability"
        || test_target.starts_with("kernel_")
        || test_target.starts_with("loop_")
}

/// Where `cargo xtask test` runs the suite: the host and Debian kernels in
/// qemu (`--kernel host,6.1` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    pub host: bool,
    pub kernels: Vec<Kernel>,
}

impl Targets {
    /// Parses a comma-separated list of `host`, `5.10`, `6.1`, `6.12` and
    /// `all` (the host and every kernel).
    pub fn parse(s: &str) -> std::result::Result<Targets, String> {
        let mut t = Targets {
            host: false,
            kernels: Vec::new(),
        };
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "host" => t.host = true,
                "all" => {
                    t.host = true;
                    t.kernels = KERNELS.to_vec();
                }
                _ => match KERNELS.iter().find(|k| k.name == word) {
                    Some(k) if !t.kernels.contains(k) => t.kernels.push(*k),
                    Some(_) => {}
                    None => {
                        return Err(format!(
                            "unknown kernel '{word}': use host, {}, or all",
                            KERNELS
                                .iter()
                                .map(|k| k.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                },
            }
        }
        if !t.host && t.kernels.is_empty() {
            return Err("no kernel given".into());
        }
        t.kernels
            .sort_by_key(|k| KERNELS.iter().position(|x| x == k));
        Ok(t)
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<&str> = Vec::new();
        if self.host {
            words.push("host");
        }
        words.extend(self.kernels.iter().map(|k| k.name));
        f.write_str(&words.join(","))
    }
}

/// What one kernel's run came to.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `6.1 (6.1.0-56-amd64)`
    pub label: String,
    pub passed: u64,
    pub failed: u64,
    /// `test name` or a sentence about what went wrong.
    pub failures: Vec<String>,
    pub seconds: u64,
    /// The guest's output directory, for the failure report.
    pub out_dir: PathBuf,
}

impl Outcome {
    fn fail(&mut self, what: impl Into<String>) {
        self.failed += 1;
        self.failures.push(what.into());
    }

    /// The per-kernel summary line.
    pub fn line(&self) -> String {
        format!(
            "kernel {}: {} passed, {} failed ({} s)",
            self.label, self.passed, self.failed, self.seconds
        )
    }
}

/// The kernels' cache: survives between runs on one machine, absent on a
/// fresh clone. `TARPIT_KERNELS_DIR` moves it.
fn kernels_dir() -> PathBuf {
    std::env::var_os("TARPIT_KERNELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::root().join("target/vm/kernels"))
}

fn scripts() -> PathBuf {
    paths::root().join("scripts/vm")
}

/// Runs the VM-side tests on each kernel, one after the other (the host has
/// two cores; a TCG guest keeps both busy). Infrastructure failures (no
/// kernel, no build) come back as failed outcomes, so the summary always
/// has a line per kernel.
pub fn run(kernels: &[Kernel], filter: Option<&str>) -> Vec<Outcome> {
    let mut outcomes: Vec<Outcome> = kernels
        .iter()
        .map(|k| Outcome {
            label: k.name.to_string(),
            out_dir: paths::root().join("target/vm/out").join(k.tree),
            ..Outcome::default()
        })
        .collect();
    // Held until the kernels are done: another run in this tree would
    // replace the binaries and output directories under this one's VMs.
    let _lock = match lock_vm_dir() {
        Ok(l) => l,
        Err(e) => {
            for o in &mut outcomes {
                o.fail(format!("kernel tests not run: {e:#}"));
            }
            return outcomes;
        }
    };
    let prepared = prepare(kernels);
    let binaries = match prepared {
        Ok(b) => b,
        Err(e) => {
            eprintln!("xtask: cannot run the kernel tests: {e:#}");
            for o in &mut outcomes {
                o.fail(format!("kernel tests not run: {e:#}"));
            }
            return outcomes;
        }
    };
    let binaries = select(binaries, filter);
    for (k, o) in kernels.iter().zip(&mut outcomes) {
        shell::step(&format!("kernel {}", k.name));
        let start = Instant::now();
        if binaries.is_empty() {
            o.fail("no kernel test executable matches the filter".to_string());
            continue;
        }
        if let Err(e) = run_kernel(*k, &binaries, o) {
            o.fail(format!("{e:#}"));
        }
        o.seconds = start.elapsed().as_secs();
        eprintln!("{}", o.line());
    }
    outcomes
}

/// An exclusive lock on `target/vm/.lock`, waited for when another
/// `cargo xtask test --kernel` of this tree holds it. The kernel drops it
/// when the holder exits, however it exits.
fn lock_vm_dir() -> Result<fs::File> {
    use std::os::fd::AsRawFd;
    let dir = paths::root().join("target/vm");
    fs::create_dir_all(&dir)?;
    let path = dir.join(".lock");
    let file =
        fs::File::create(&path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let try_lock = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if try_lock != 0 {
        shell::say(
            "Waiting",
            &format!(
                "for another kernel test run in this tree ({})",
                path.display()
            ),
        );
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    Ok(file)
}

/// Kernels downloaded, `tarpit` built, the test executables built and found.
fn prepare(kernels: &[Kernel]) -> Result<Vec<TestBinary>> {
    shell::step("vm setup");
    let mut setup = Command::new(scripts().join("setup.sh"));
    setup
        .args(kernels.iter().map(|k| k.tree))
        .env("KERNELS_DIR", kernels_dir());
    if !shell::is_root() {
        // Installing qemu needs root; a machine that has it can still run.
        setup.env("VM_SETUP_NO_APT", "1");
    }
    shell::run(&mut setup).context("preparing the kernels (scripts/vm/setup.sh) failed")?;

    shell::step("vm build");
    let root = paths::root();
    shell::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--workspace", "--bins"]),
    )
    .context("the workspace does not build")?;
    // Only the VM test targets, so a broken unit test elsewhere does not
    // stop the kernel tests; `--workspace` as in the host suite, for the same
    // feature set (no rebuild between the two).
    let targets = vm_test_targets(&root.join("tests/tests"))?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["test", "--workspace", "--no-run", "--message-format=json"]);
    for t in &targets {
        cmd.args(["--test", t]);
    }
    let json = shell::output(&mut cmd).context("the kernel test executables do not build")?;
    let binaries = test_binaries(&json);
    if binaries.is_empty() {
        bail!(
            "no kernel test executables (tests/tests/foundation.rs, kernel_*.rs, loop_*.rs) were built"
        );
    }
    snapshot(&binaries)
}

/// Copies of what the guest runs, in `target/vm/bin/`. The guest reads the
/// host's files through 9p with page caching: a `cargo build` on the host
/// while a VM runs (another terminal, another engineer) would change the
/// binaries under the guest's feet, and a half-replaced executable crashes
/// in odd places. Copies (not hard links: the linker may rewrite the same
/// inode) keep each run on one consistent build.
fn snapshot(binaries: &[TestBinary]) -> Result<Vec<TestBinary>> {
    let dir = bin_dir();
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot empty {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let copy = |from: &Path, to: &Path| {
        fs::copy(from, to)
            .map(|_| ())
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
    };
    copy(
        &paths::target_dir().join("debug/tarpit"),
        &dir.join("tarpit"),
    )?;
    copy(&paths::ebpf_object(), &dir.join("tarpit.bpf.o"))?;
    binaries
        .iter()
        .map(|b| {
            let to = dir.join(&b.name);
            copy(&b.path, &to)?;
            Ok(TestBinary {
                path: to,
                ..b.clone()
            })
        })
        .collect()
}

/// Where [`snapshot`] puts its copies.
fn bin_dir() -> PathBuf {
    paths::root().join("target/vm/bin")
}

/// The test targets (files in tests/tests/) that run in the VMs.
fn vm_test_targets(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".rs")?;
            runs_in_vm(stem).then(|| stem.to_string())
        })
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("no kernel tests in {}", dir.display());
    }
    Ok(names)
}

/// A test executable of the tarpit-tests crate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TestBinary {
    /// The test target (file) name: `foundation`, `kernel_xdp`...
    name: String,
    path: PathBuf,
    /// libtest's name filters for this executable (any of them; none: all).
    filters: Vec<String>,
}

/// Picks the VM test executables out of cargo's JSON messages.
fn test_binaries(json: &str) -> Vec<TestBinary> {
    let mut found: Vec<TestBinary> = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["package_id"]
                .as_str()
                .is_some_and(|p| p.contains("tarpit-tests") || p.contains("/tests#"))
        })
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?.to_string();
            let path = PathBuf::from(m["executable"].as_str()?);
            runs_in_vm(&name).then_some(TestBinary {
                name,
                path,
                filters: Vec::new(),
            })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found.dedup();
    found
}

/// The executables a filter names, each with the filters libtest gets. A
/// filter `kernel_lifecycle::` runs that executable whole,
/// `kernel_lifecycle::netlink_tc` its tests matching `netlink_tc` (the form
/// the summary prints for a failure), and a comma-separated list of these
/// runs each (`kernel_hold::,kernel_lifecycle::netlink_tc`); any other
/// filter goes to every executable.
fn select(binaries: Vec<TestBinary>, filter: Option<&str>) -> Vec<TestBinary> {
    let Some(f) = filter else {
        return binaries;
    };
    let named: Option<Vec<(&str, &str)>> = f
        .split(',')
        .map(|part| {
            part.trim()
                .split_once("::")
                .filter(|(bin, _)| binaries.iter().any(|b| b.name == *bin))
        })
        .collect();
    match named {
        Some(parts) => binaries
            .into_iter()
            .filter_map(|mut b| {
                let mine: Vec<&str> = parts
                    .iter()
                    .filter(|(bin, _)| *bin == b.name)
                    .map(|(_, test)| *test)
                    .collect();
                if mine.is_empty() {
                    return None;
                }
                // `EXE::` (all of it) wins over `EXE::name`.
                if !mine.contains(&"") {
                    b.filters = mine.into_iter().map(String::from).collect();
                }
                Some(b)
            })
            .collect(),
        None => binaries
            .into_iter()
            .map(|mut b| {
                b.filters = vec![f.to_string()];
                b
            })
            .collect(),
    }
}

/// Seconds one test executable may run in the guest (TCG is 3-10x slower
/// than the host): `TARPIT_VM_TEST_TIMEOUT`, default 300
/// (the slowest, kernel_conns, takes about 60 s under TCG).
fn test_timeout() -> u64 {
    std::env::var("TARPIT_VM_TEST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn run_kernel(kernel: Kernel, binaries: &[TestBinary], outcome: &mut Outcome) -> Result<()> {
    let kdir = kernels_dir();
    let release = fs::read_dir(kdir.join(kernel.tree).join("lib/modules"))
        .ok()
        .and_then(|mut rd| rd.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .with_context(|| format!("kernel {} is not set up in {}", kernel.name, kdir.display()))?;
    outcome.label = format!("{} ({release})", kernel.name);

    let out = &outcome.out_dir.clone();
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("cannot empty {}", out.display()))?;
    }
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let per_test = test_timeout();
    fs::write(
        out.join("run.sh"),
        guest_script(binaries, per_test, &paths::root(), &bin_dir()),
    )?;
    // Boot (~5-13 s), then every executable may use its whole timeout.
    let vm_timeout = 120 + per_test * binaries.len() as u64;

    let mut child = Command::new(scripts().join("run-vm.sh"))
        .args([kernel.tree, "bash /mnt/out/run.sh"])
        .env("KERNELS_DIR", &kdir)
        .env("VM_OUT", out)
        .env("VM_TIMEOUT", vm_timeout.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start scripts/vm/run-vm.sh")?;
    let mut console = fs::File::create(out.join("console.log"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    // The serial console, live: guest kernel messages and test output.
    for line in BufReader::new(stdout).split(b'\n') {
        let line = line?;
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\r');
        writeln!(console, "{text}")?;
        println!("[{}] {text}", kernel.name);
    }
    let status = child.wait()?;

    let ran = binaries
        .iter()
        .any(|b| out.join(format!("{}.rc", b.name)).exists());
    if !ran {
        // Nothing ran: say why once, not once per test executable.
        let console = fs::read_to_string(out.join("console.log")).unwrap_or_default();
        let why = console
            .lines()
            .find(|l| l.contains("Kernel panic") || l.contains("initramfs:"))
            .map(|l| format!("the guest did not come up: {}", l.trim()))
            .unwrap_or_else(|| {
                format!("the guest ran nothing (qemu exit {status}; see console.log)")
            });
        outcome.fail(why);
        return Ok(());
    }
    for b in binaries {
        let log = fs::read_to_string(out.join(format!("{}.log", b.name))).unwrap_or_default();
        let rc = fs::read_to_string(out.join(format!("{}.rc", b.name)))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let (passed, failed, names) = libtest_counts(&log);
        outcome.passed += passed;
        outcome.failed += failed;
        outcome
            .failures
            .extend(names.into_iter().map(|n| format!("{}::{n}", b.name)));
        match rc {
            Some(0) => {}
            Some(124) | Some(137) => {
                outcome.fail(format!("{}: timed out after {per_test} s", b.name))
            }
            Some(rc) if failed == 0 => outcome.fail(format!(
                "{}: exited with {rc} before reporting a failure (crash?)",
                b.name
            )),
            Some(_) => {}
            None => outcome.fail(format!("{}: did not run (the VM stopped before)", b.name)),
        }
    }
    if status.code() == Some(255) && outcome.failed == 0 {
        outcome.fail("the VM gave no exit status (boot failure or timeout, see console.log)");
    }
    Ok(())
}

/// The script the guest runs: environment, then each test executable with a
/// timeout, its output to the console and to `/mnt/out/<name>.log`, its exit
/// status to `/mnt/out/<name>.rc`.
fn guest_script(binaries: &[TestBinary], timeout: u64, root: &Path, bin: &Path) -> String {
    let mut s = String::from(
        "#!/bin/bash\n# Written by `cargo xtask test --kernel`; runs as root inside the VM.\n",
    );
    let mut env: Vec<(String, String)> = vec![
        ("RUST_BACKTRACE".into(), "1".into()),
        // The verifier's work at agent start is several times slower here.
        ("TARPIT_TEST_AGENT_READY_SECS".into(), "180".into()),
        (
            "TARPIT_BIN".into(),
            bin.join("tarpit").display().to_string(),
        ),
        (
            "TARPIT_EBPF_OBJECT".into(),
            bin.join("tarpit.bpf.o").display().to_string(),
        ),
    ];
    for var in [
        "CI",
        "TARPIT_TEST_LOG",
        "RUST_TEST_THREADS",
        "RUST_BACKTRACE",
        "RUST_LOG",
    ] {
        if let Ok(v) = std::env::var(var) {
            env.retain(|(k, _)| k != var);
            env.push((var.into(), v));
        }
    }
    for (k, v) in env {
        s.push_str(&format!("export {k}={}\n", quote(&v)));
    }
    // libtest runs a test executable with its package dir as cwd.
    s.push_str(&format!(
        "cd {}\n",
        quote(&root.join("tests").display().to_string())
    ));
    s.push_str(
        "rc=0\n\
         run() {\n  name=$1; shift\n  echo \"=== $name: $*\"\n  \
         timeout -k 10 \"$@\" 2>&1 | tee /mnt/out/$name.log\n  \
         r=${PIPESTATUS[0]}; echo $r > /mnt/out/$name.rc; [ $r = 0 ] || rc=1\n}\n",
    );
    for b in binaries {
        let mut line = format!(
            "run {} {timeout} {}",
            b.name,
            quote(&b.path.display().to_string())
        );
        for f in &b.filters {
            line.push(' ');
            line.push_str(&quote(f));
        }
        s.push_str(&line);
        s.push('\n');
    }
    // Verifier complaints and warnings of the kernel, kept for a look later.
    s.push_str("dmesg > /mnt/out/dmesg.txt 2>&1\nexit $rc\n");
    s
}

/// Single-quotes a word for bash.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Passed and failed counts and the failed tests' names of one libtest run.
fn libtest_counts(log: &str) -> (u64, u64, Vec<String>) {
    let mut passed = 0;
    let mut failed = 0;
    let mut names = Vec::new();
    for line in log.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("test ")
            && let Some(name) = rest.strip_suffix(" ... FAILED")
        {
            names.push(name.to_string());
        }
        if let Some(summary) = line.trim().strip_prefix("test result: ") {
            passed += crate::test::count(summary, " passed");
            failed += crate::test::count(summary, " failed");
        }
    }
    (passed, failed, names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_lists() {
        let t = Targets::parse("6.1").unwrap();
        assert!(!t.host);
        assert_eq!(
            t.kernels.iter().map(|k| k.name).collect::<Vec<_>>(),
            ["6.1"]
        );
        let t = Targets::parse("6.12,host,5.10,6.12").unwrap();
        assert!(t.host);
        assert_eq!(
            t.kernels.iter().map(|k| k.name).collect::<Vec<_>>(),
            ["5.10", "6.12"]
        );
        let t = Targets::parse("all").unwrap();
        assert!(t.host);
        assert_eq!(t.kernels.len(), 3);
        assert_eq!(t.to_string(), "host,5.10,6.1,6.12");
        assert!(
            Targets::parse("4.19")
                .unwrap_err()
                .contains("unknown kernel '4.19'")
        );
        assert!(Targets::parse("").is_err());
    }

    #[test]
    fn picks_kernel_test_executables_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#tarpit-tests@0.1.0","target":{"kind":["test"],"name":"foundation"},"executable":"/w/target/debug/deps/foundation-1"}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#tarpit-tests@0.1.0","target":{"kind":["test"],"name":"kernel_xdp"},"executable":"/w/target/debug/deps/kernel_xdp-2"}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#tarpit-tests@0.1.0","target":{"kind":["test"],"name":"harness"},"executable":"/w/target/debug/deps/harness-3"}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#tarpit-tests@0.1.0","target":{"kind":["lib"],"name":"tarpit_tests"},"executable":null}
{"reason":"build-finished","success":true}"#;
        let b = test_binaries(json);
        assert_eq!(
            b.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
            ["foundation", "kernel_xdp"]
        );
        assert_eq!(b[1].path, Path::new("/w/target/debug/deps/kernel_xdp-2"));
    }

    #[test]
    fn a_filter_naming_an_executable_runs_only_that_one() {
        let bins = || {
            ["kernel_hold", "kernel_lifecycle", "kernel_malformed"]
                .map(|n| TestBinary {
                    name: n.into(),
                    path: format!("/w/{n}").into(),
                    filters: Vec::new(),
                })
                .to_vec()
        };
        let runs = |b: Vec<TestBinary>| {
            b.into_iter()
                .map(|b| (b.name, b.filters))
                .collect::<Vec<_>>()
        };
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            runs(select(bins(), Some("kernel_lifecycle::netlink_tc"))),
            [("kernel_lifecycle".into(), s(&["netlink_tc"]))]
        );
        assert_eq!(
            runs(select(
                bins(),
                Some("kernel_hold::, kernel_malformed::a,kernel_malformed::b")
            )),
            [
                ("kernel_hold".into(), s(&[])),
                ("kernel_malformed".into(), s(&["a", "b"]))
            ]
        );
        assert_eq!(
            runs(select(bins(), Some("kernel_hold::x,kernel_hold::"))),
            [("kernel_hold".into(), s(&[]))]
        );
        let all = runs(select(bins(), Some("v4_and_v6")));
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|(_, f)| *f == s(&["v4_and_v6"])));
        // An unknown executable: a plain filter, as before.
        let all = runs(select(bins(), Some("kernel_hold::,nosuch::x")));
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].1, s(&["kernel_hold::,nosuch::x"]));
        assert_eq!(runs(select(bins(), None)).len(), 3);
    }

    #[test]
    fn counts_guest_test_output() {
        let log = "running 3 tests\r\ntest a ... ok\r\ntest b ... FAILED\r\ntest c ... ok\r\n\
                   test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\r\n";
        assert_eq!(libtest_counts(log), (2, 1, vec!["b".to_string()]));
    }

    #[test]
    fn guest_script_quotes_and_times_out() {
        let b = [TestBinary {
            name: "foundation".into(),
            path: "/w/target/debug/deps/foundation-1".into(),
            filters: vec!["it's".into()],
        }];
        let s = guest_script(&b, 300, Path::new("/w"), Path::new("/w/vm"));
        assert!(s.contains("export TARPIT_BIN='/w/vm/tarpit'\n"));
        assert!(s.contains("export TARPIT_EBPF_OBJECT='/w/vm/tarpit.bpf.o'\n"));
        assert!(s.contains("cd '/w/tests'\n"));
        assert!(s.contains("run foundation 300 '/w/target/debug/deps/foundation-1' 'it'\\''s'\n"));
        assert!(!s.contains('"') || s.contains("echo \"=== $name: $*\""));
    }
}
