//! The pid file: how `tarpit reload` finds the running agent, and how a
//! second agent started by mistake on the same config finds the first.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tracing::debug;

/// A pid file this process wrote; removed on drop if it still names us.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes our pid to `path` (atomically: temp file + rename), creating
    /// the directory if needed. Refuses when the file names another live
    /// tarpit process: two agents on one config would fight over the port
    /// and the pins.
    pub fn create(path: &Path) -> Result<PidFile> {
        if let Ok(pid) = read(path)
            && pid != std::process::id()
            && is_tarpit(pid)
        {
            bail!(
                "another tarpit agent is running as pid {pid} (pid file {}); stop it first",
                path.display()
            );
        }
        let dir = path
            .parent()
            .context("the pid file path has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write pid file {}", path.display()));
        }
        Ok(PidFile {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read(&self.path).ok() == Some(std::process::id()) {
            // After the privilege drop the directory may not be ours to
            // change; systemd's RuntimeDirectory= cleans up then, and a
            // stale file is recognised as such at the next start.
            if let Err(e) = std::fs::remove_file(&self.path) {
                debug!(target: "tarpit::ops", "pid file {} not removed: {e}", self.path.display());
            }
        }
    }
}

/// The pid written in `path`.
pub fn read(path: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read pid file {}", path.display()))?;
    let pid: u32 = text.trim().parse().with_context(|| {
        format!(
            "pid file {} holds no pid: {:?}",
            path.display(),
            text.trim()
        )
    })?;
    if pid == 0 {
        bail!("pid file {} holds pid 0", path.display());
    }
    Ok(pid)
}

/// Whether `pid` is a live process running a tarpit binary (its name
/// starts with "tarpit", or it runs the same file as we do): a stale pid
/// file may name a pid the kernel has since given to something else.
pub fn is_tarpit(pid: u32) -> bool {
    let named = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.starts_with("tarpit"))
        .unwrap_or(false);
    let same_exe = match (
        std::fs::read_link(format!("/proc/{pid}/exe")),
        std::fs::read_link("/proc/self/exe"),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    named || same_exe
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tarpit-pidfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn writes_reads_and_removes() {
        let d = tmpdir("basic");
        let p = d.join("run/tarpit.pid");
        {
            let f = PidFile::create(&p).unwrap();
            assert_eq!(f.path(), p);
            assert_eq!(read(&p).unwrap(), std::process::id());
        }
        assert!(!p.exists(), "removed on drop");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn stale_or_foreign_pid_is_overwritten() {
        let d = tmpdir("stale");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("tarpit.pid");
        // pid 1 is alive but is not tarpit
        std::fs::write(&p, "1\n").unwrap();
        let f = PidFile::create(&p).unwrap();
        assert_eq!(read(&p).unwrap(), std::process::id());
        drop(f);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_live_tarpit_in_the_pid_file_is_refused() {
        let d = tmpdir("live");
        std::fs::create_dir_all(&d).unwrap();
        // a process whose name starts with "tarpit", as a running agent's
        let fake = d.join("tarpit-fake");
        std::fs::copy("/bin/sleep", &fake).unwrap();
        let mut child = std::process::Command::new(&fake).arg("30").spawn().unwrap();
        // spawn() may return before the child's exec has renamed it: until
        // then it carries the name of the test thread that forked it.
        let comm = format!("/proc/{}/comm", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "tarpit-fake")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let p = d.join("tarpit.pid");
        std::fs::write(&p, format!("{}\n", child.id())).unwrap();
        let e = PidFile::create(&p).unwrap_err();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            e.to_string().contains("another tarpit agent is running"),
            "{e:#}"
        );
        assert_eq!(read(&p).unwrap(), child.id(), "the file is left alone");
        // once it is gone, the file is stale and taken over
        let f = PidFile::create(&p).unwrap();
        assert_eq!(read(&p).unwrap(), std::process::id());
        drop(f);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let d = tmpdir("garbage");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("tarpit.pid");
        std::fs::write(&p, "hello\n").unwrap();
        let e = read(&p).unwrap_err();
        assert!(format!("{e:#}").contains("holds no pid"), "{e:#}");
        let e = read(&d.join("missing.pid")).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read pid file"), "{e:#}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
