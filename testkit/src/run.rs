//! Running helper programs whose failure must stop the setup.
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `cmd` to completion; an error carries its output when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
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

/// Runs `cmd` with `input` on its stdin (`ip -batch -`, `nft -f -`); an
/// error carries its stderr.
pub fn feed(cmd: &mut Command, input: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    // Dropped at the end of the statement: the program sees end of input.
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_passes_input_and_reports_failure() {
        feed(
            Command::new("grep").arg("-q").arg("needle"),
            "hay\nneedle\n",
        )
        .unwrap();
        let e = feed(
            Command::new("sh").args(["-c", "cat >/dev/null; echo refused >&2; exit 3"]),
            "x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e:#}");
    }
}
