//! `cargo xtask test`: the whole suite, ending with one `N passed, N failed`
//! line over everything it ran (format and lint checks count as one each).
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{ebpf, leaks, paths, shell, vm};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Only run tests whose name contains this string (fmt and clippy are
    /// skipped when a filter is given). In the kernels' VMs, `EXE::` runs
    /// one test executable whole and `EXE::NAME` its tests matching NAME
    /// (`kernel_lifecycle::netlink_tc`, as a failure is reported); a
    /// comma-separated list of these runs each, in one boot.
    pub filter: Option<String>,
    /// Skip installing test dependencies (Debian packages).
    #[arg(long)]
    pub no_install: bool,
    /// Where to run: a comma-separated list of `host` (fmt, clippy, every
    /// test on this machine), `5.10`, `6.1`, `6.12` (the kernel-side tests
    /// inside qemu on that Debian kernel) or `all` (the host and every
    /// kernel). The default, `host,6.1`, is the host and Debian 12's kernel,
    /// the one most mail servers run.
    #[arg(long, value_name = "LIST", default_value = "host,6.1", value_parser = vm::Targets::parse)]
    pub kernel: vm::Targets,
}

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    failures: Vec<String>,
}

impl Tally {
    fn check(&mut self, name: &str, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            self.failures.push(name.to_string());
        }
    }
}

pub fn run(args: TestArgs) -> Result<()> {
    if !args.no_install {
        install_dependencies()?;
    }
    ebpf::build()?;
    let mut tally = Tally::default();
    if args.kernel.host {
        host_suite(&args, &mut tally)?;
    }
    let host_line = format!(
        "host ({}): {} passed, {} failed",
        shell::output(Command::new("uname").arg("-r"))
            .unwrap_or_default()
            .trim(),
        tally.passed,
        tally.failed
    );
    let outcomes = vm::run(&args.kernel.kernels, args.filter.as_deref());

    println!();
    for f in &tally.failures {
        println!("FAILED: {f}");
    }
    for o in &outcomes {
        for f in &o.failures {
            println!("FAILED: [{}] {f}", o.label);
        }
        if o.failed > 0 {
            println!("  guest output: {}", o.out_dir.display());
        }
    }
    if args.kernel.host {
        println!("{host_line}");
    }
    for o in &outcomes {
        println!("{}", o.line());
        tally.passed += o.passed;
        tally.failed += o.failed;
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 {
        bail!("{} failed", tally.failed);
    }
    Ok(())
}

/// fmt, clippy, build and every test, on this machine's kernel.
fn host_suite(args: &TestArgs, tally: &mut Tally) -> Result<()> {
    let root = paths::root();
    if args.filter.is_none() {
        shell::step("fmt");
        let fmt_ok = shell::run(
            Command::new("cargo")
                .current_dir(&root)
                .args(["fmt", "--all", "--check"]),
        )
        .is_ok()
            && shell::run(Command::new("cargo").current_dir(&root).args([
                "fmt",
                "--manifest-path",
                "tarpit-ebpf/Cargo.toml",
                "--check",
            ]))
            .is_ok();
        tally.check("cargo fmt --check", fmt_ok);
        shell::step("clippy");
        let clippy_ok = shell::run(Command::new("cargo").current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
        .is_ok();
        tally.check("cargo clippy -D warnings", clippy_ok);
    }
    shell::step("build");
    shell::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--workspace", "--bins"]),
    )
    .context("the workspace does not build")?;
    shell::step("tests");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("TARPIT_BIN", paths::target_dir().join("debug/tarpit"));
    if let Some(f) = &args.filter {
        cmd.arg("--").arg(f);
    }
    cargo_test(&mut cmd, tally)?;

    shell::step("leak check");
    let left = leaks::leftovers();
    for l in &left {
        println!("left behind: {l}");
    }
    tally.check("nothing left behind by the tests", left.is_empty());
    Ok(())
}

/// Runs `cargo test`, echoing its output and counting its results.
fn cargo_test(cmd: &mut Command, tally: &mut Tally) -> Result<()> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test ")
            && let Some(name) = rest.strip_suffix(" ... FAILED")
        {
            tally.failures.push(name.to_string());
        }
        if let Some(summary) = line.trim().strip_prefix("test result: ") {
            tally.passed += count(summary, " passed");
            tally.failed += count(summary, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && tally.failed == 0 {
        // A crate that did not compile, or a test binary that crashed.
        tally.check("cargo test (build or crash, see above)", false);
    }
    Ok(())
}

/// Extracts N from "... N passed; ..." style summaries.
pub(crate) fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            let part = part.trim();
            let part = part
                .strip_prefix("ok. ")
                .or_else(|| part.strip_prefix("FAILED. "))
                .unwrap_or(part);
            part.strip_suffix(label)?.trim().parse().ok()
        })
        .unwrap_or(0)
}

/// Debian packages and system settings the end-to-end tests need.
fn install_dependencies() -> Result<()> {
    let script = paths::root().join("scripts/install-test-deps.sh");
    if !shell::is_root() {
        shell::say(
            "Skipping",
            "dependency installation (not root); end-to-end tests will need it",
        );
        return Ok(());
    }
    shell::run(&mut Command::new(script)).context("installing test dependencies failed")
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_libtest_summaries() {
        let s = "ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(count(s, " passed"), 12);
        assert_eq!(count(s, " failed"), 0);
        let s = "FAILED. 3 passed; 2 failed; 0 ignored";
        assert_eq!(count(s, " passed"), 3);
        assert_eq!(count(s, " failed"), 2);
    }
}
