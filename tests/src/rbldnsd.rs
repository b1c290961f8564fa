//! rbldnsd serving DNSBL zones inside a test's server namespace.
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::env::{peers_dir, unique_id};
use crate::netns::TestNet;
use crate::wait;

/// A running rbldnsd; Drop stops it and removes its directory.
pub struct Rbldnsd {
    pub dir: PathBuf,
    pid: Option<i32>,
}

impl Rbldnsd {
    /// Serves `zones` (rbldnsd zone specs such as `bl.test:ip4set:bl.zone`,
    /// with files copied from `files`) on 127.0.0.1:53 and 127.0.0.1:5353 of
    /// the server namespace. `bl.zone` from the peers directory is always
    /// available.
    pub fn start(net: &TestNet, zones: &[&str], files: &[(&str, &str)]) -> Result<Rbldnsd> {
        let dir = std::env::temp_dir().join(format!("tarpit-rbldnsd-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(peers_dir().join("bl.zone"), dir.join("bl.zone"))?;
        for (name, text) in files {
            std::fs::write(dir.join(name), text)?;
        }
        let mut r = Rbldnsd {
            dir: dir.clone(),
            pid: None,
        };
        let _ = Command::new("chmod").arg("755").arg(&dir).status();
        let pidfile = dir.join("pid");
        let status = net
            .server_cmd("rbldnsd")
            .args([
                "-u",
                "rbldns",
                "-b",
                "127.0.0.1/5353",
                "-b",
                "127.0.0.1/53",
                "-w",
            ])
            .arg(&dir)
            .arg("-p")
            .arg(&pidfile)
            .args(zones)
            .status()
            .context("cannot run rbldnsd (apt-get install rbldnsd)")?;
        if !status.success() {
            bail!("rbldnsd failed to start ({status})");
        }
        if !wait::until(Duration::from_secs(10), || pidfile.exists()) {
            bail!("rbldnsd wrote no pid file");
        }
        r.pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(r)
    }
}

impl Drop for Rbldnsd {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
