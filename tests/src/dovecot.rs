//! Dovecot's auth service with a passwd-file, as the SASL back end of the
//! Postfix test instance (`smtpd_sasl_type = dovecot`): real AUTH PLAIN
//! against real software. No mail protocol listens; the only socket is a
//! UNIX one in the instance's own directory, so namespaces do not matter.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::env::unique_id;
use crate::wait;

/// The one user of the passwd-file.
pub const USER: &str = "alice@tarpit.test";
pub const PASSWORD: &str = "s3cret-pw";

/// A running Dovecot auth service; Drop stops it and removes its directory.
pub struct Dovecot {
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Dovecot {
    pub fn start() -> Result<Dovecot> {
        let dir = std::env::temp_dir().join(format!("tarpit-dovecot-{}", unique_id()));
        for sub in ["run", "state", "home"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let d = dir.display();
        let conf = format!(
            r#"protocols = none
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={d}/home
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
"#
        );
        std::fs::write(dir.join("dovecot.conf"), conf)?;
        std::fs::write(dir.join("passwd"), format!("{USER}:{{PLAIN}}{PASSWORD}\n"))?;
        let child = Command::new("dovecot")
            .arg("-c")
            .arg(dir.join("dovecot.conf"))
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start dovecot (Debian package dovecot-core)")?;
        let dv = Dovecot {
            dir,
            child: Some(child),
        };
        if !wait::until(Duration::from_secs(10), || dv.socket().exists()) {
            bail!("dovecot did not create its auth socket; log:\n{}", dv.log());
        }
        Ok(dv)
    }

    /// The auth socket for Postfix.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/auth-postfix")
    }

    /// main.cf lines that make every smtpd of the instance offer AUTH
    /// through this service (plaintext allowed: the tests run on their
    /// own namespaces).
    pub fn postfix_main_cf(&self) -> String {
        format!(
            "smtpd_sasl_auth_enable = yes\nsmtpd_sasl_type = dovecot\nsmtpd_sasl_path = {}\n\
             smtpd_tls_auth_only = no\n",
            self.socket().display()
        )
    }

    /// The AUTH PLAIN initial response for `user` / `password`.
    pub fn plain(user: &str, password: &str) -> String {
        base64(format!("\0{user}\0{password}").as_bytes())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default()
    }
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM lets the master stop its auth processes.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if !wait::until(Duration::from_secs(5), || {
                c.try_wait().ok().flatten().is_some()
            }) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_of_a_plain_response() {
        assert_eq!(super::base64(b"\0u\0p"), "AHUAcA==");
        assert_eq!(super::base64(b"abc"), "YWJj");
        assert_eq!(super::base64(b"ab"), "YWI=");
    }
}
