//! The pid file: how `tarpit reload` finds the running agent, and how a
//! second agent started by mistake on the same config finds the first.
//!
//! Root writes it at start, and `daemon.pid_file` may name any directory,
//! so it goes through [`crate::safe_fs`]: the directory held open, the
//! file written under an unpredictable temporary name and renamed into
//! place, links refused (naming the path) and never followed.
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::safe_fs::SafeDir;

use anyhow::{Context, Result, bail};
use tracing::debug;

/// A pid file this process wrote; removed on drop if it still names us.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    /// Held from the start: the removal at exit needs no path lookup.
    dir: SafeDir,
}

impl PidFile {
    /// Writes our pid to `path` (atomically: temp file + rename), creating
    /// the directory if needed. Refuses when the file names another live
    /// tarpit process: two agents on one config would fight over the port
    /// and the pins.
    pub fn create(path: &Path) -> Result<PidFile> {
        if let Ok(m) = path.symlink_metadata()
            && m.file_type().is_symlink()
        {
            bail!(
                "pid file {} is a symbolic link: refusing to follow it (remove it and check \
                 who could create it)",
                path.display()
            );
        }
        if let Ok(pid) = read(path)
            && pid != std::process::id()
            && is_tarpit(pid)
        {
            bail!(
                "another tarpit agent is running as pid {pid} (pid file {}); stop it first",
                path.display()
            );
        }
        let (dir, name) = split(path)?;
        let write = || {
            let dir = SafeDir::open_or_create(dir, 0o755)?;
            let pid = format!("{}\n", std::process::id());
            dir.replace(name, pid.as_bytes(), 0o644, None)?;
            Ok::<_, crate::safe_fs::SafeFsError>(dir)
        };
        let dir = write().with_context(|| format!("cannot write pid file {}", path.display()))?;
        Ok(PidFile {
            path: path.to_owned(),
            dir,
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
            let name = self.path.file_name().unwrap_or(OsStr::new("tarpit.pid"));
            if let Err(e) = self.dir.remove(name) {
                debug!(target: "tarpit::ops", "pid file {} not removed: {e}", self.path.display());
            }
        }
    }
}

/// The directory and the name of a pid file path.
fn split(path: &Path) -> Result<(&Path, &OsStr)> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .context("the pid file path has no directory")?;
    let name = path
        .file_name()
        .context("the pid file path has no file name")?;
    Ok((dir, name))
}

/// The pid written in `path` (a link there is refused, not followed).
pub fn read(path: &Path) -> Result<u32> {
    let read = || -> Result<String> {
        let (dir, name) = split(path)?;
        let bytes = SafeDir::open(dir)?
            .read(name)?
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let text = read().with_context(|| format!("cannot read pid file {}", path.display()))?;
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
    fn a_planted_link_is_refused_and_its_target_unchanged() {
        use std::os::unix::fs::symlink;
        let d = tmpdir("link");
        std::fs::create_dir_all(&d).unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let p = d.join("tarpit.pid");
        symlink(&victim, &p).unwrap();
        let e = PidFile::create(&p).unwrap_err();
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        assert!(format!("{e:#}").contains("tarpit.pid"), "{e:#}");
        assert!(read(&p).is_err(), "read does not follow it either");
        std::fs::remove_file(&p).unwrap();
        // the temporary names of earlier tarpits
        symlink(
            &victim,
            d.join(format!("tarpit.tmp.{}", std::process::id())),
        )
        .unwrap();
        let f = PidFile::create(&p).unwrap();
        assert_eq!(read(&p).unwrap(), std::process::id());
        drop(f);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
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
