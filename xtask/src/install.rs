//! `cargo xtask install`: puts a release build, the systemd unit, the
//! sysusers entry, the docs and (only if none exists) the default config in
//! place, the way a package would.
//!
//! Layout, for `--prefix P` (default /usr/local) and `--destdir D` (a
//! staging root for packaging, default none):
//! - `D/P/bin/tarpit`
//! - `D/P/lib/systemd/system/tarpit.service`, its paths rewritten to `P`
//! - `D/P/lib/sysusers.d/tarpit.conf` (the unprivileged `tarpit` user)
//! - `D/P/share/doc/tarpit/{operations.md,tarpit.toml}`
//! - `D/P/share/man/man1/tarpit.1`, `tarpit-SUBCOMMAND.1`, ... (written by
//!   the installed binary itself)
//! - `D/etc/tarpit/tarpit.toml`, never overwritten: an operator's config
//!   outlives upgrades; the new shipped one is in the doc directory.
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{paths, shell};

/// Where the shipped unit expects things; rewritten for other prefixes.
const UNIT_PREFIX: &str = "/usr/local";
const CONFIG_DIR: &str = "etc/tarpit";

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Installation prefix: the binary goes to PREFIX/bin, the unit to
    /// PREFIX/lib/systemd/system.
    #[arg(long, default_value = UNIT_PREFIX, value_name = "DIR")]
    pub prefix: PathBuf,
    /// Staging root put in front of every path (for packaging); the
    /// installed unit still names the PREFIX paths.
    #[arg(long, value_name = "DIR")]
    pub destdir: Option<PathBuf>,
    /// Install this binary instead of building a release one (it must
    /// embed the eBPF object: built after `cargo xtask build-ebpf`).
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
}

pub fn run(args: InstallArgs) -> Result<()> {
    if !args.prefix.is_absolute() {
        bail!("--prefix must be an absolute path");
    }
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => crate::release::build()?,
    };
    let destdir = args.destdir.clone().unwrap_or_else(|| PathBuf::from("/"));
    let mut report = install_files(&paths::root(), &binary, &args.prefix, &destdir)?;
    let man_dir = staged(&destdir, &args.prefix.join("share/man/man1"));
    write_man_pages(&staged(&destdir, &args.prefix.join("bin/tarpit")), &man_dir)?;
    report.written.push(("manual pages", man_dir));
    for (what, path) in &report.written {
        shell::say("Installed", &format!("{what}: {}", path.display()));
    }
    if let Some(kept) = &report.kept_config {
        shell::say(
            "Kept",
            &format!(
                "{} (exists; the new default is in {})",
                kept.display(),
                report.doc_dir.display()
            ),
        );
    }
    if args.destdir.is_none() {
        eprintln!(
            "\nNext steps (docs/operations.md has the details):\n  \
             systemd-sysusers            # creates the 'tarpit' user\n  \
             $EDITOR /etc/tarpit/tarpit.toml   # [daemon] user = \"tarpit\", listen, backend, kernel.interfaces\n  \
             tarpit check-config -c /etc/tarpit/tarpit.toml\n  \
             systemctl daemon-reload && systemctl enable --now tarpit"
        );
    }
    Ok(())
}

/// The installed binary writes its own manual pages (`tarpit man DIR`, a
/// hidden subcommand): they come from the same definition as `--help`.
fn write_man_pages(tarpit: &Path, dir: &Path) -> Result<()> {
    let out = std::process::Command::new(tarpit)
        .arg("man")
        .arg(dir)
        .output()
        .with_context(|| format!("cannot run {}", tarpit.display()))?;
    if !out.status.success() {
        bail!(
            "{} man {} failed: {}",
            tarpit.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What an install wrote.
#[derive(Debug)]
pub struct Report {
    pub written: Vec<(&'static str, PathBuf)>,
    /// The config that was already there and left alone.
    pub kept_config: Option<PathBuf>,
    pub doc_dir: PathBuf,
}

/// `dest` joined with an absolute `path` (`/a` + `/usr/x` = `/a/usr/x`).
fn staged(dest: &Path, path: &Path) -> PathBuf {
    dest.join(path.strip_prefix("/").unwrap_or(path))
}

/// Copies every file from the source tree `src` into place.
pub fn install_files(src: &Path, binary: &Path, prefix: &Path, destdir: &Path) -> Result<Report> {
    if !binary.is_file() {
        bail!("no binary at {}: build it first", binary.display());
    }
    let read = |rel: &str| -> Result<String> {
        fs::read_to_string(src.join(rel)).with_context(|| format!("cannot read {rel}"))
    };
    let mut written = Vec::new();
    let p = |rel: &str| staged(destdir, &prefix.join(rel));

    let bin = p("bin/tarpit");
    put(
        &bin,
        &fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?,
        0o755,
    )?;
    written.push(("binary", bin));

    let unit = unit_for_prefix(&read("config/tarpit.service")?, prefix);
    let unit_path = p("lib/systemd/system/tarpit.service");
    put(&unit_path, unit.as_bytes(), 0o644)?;
    written.push(("systemd unit", unit_path));

    let sysusers = p("lib/sysusers.d/tarpit.conf");
    put(&sysusers, read("config/tarpit.sysusers")?.as_bytes(), 0o644)?;
    written.push(("sysusers entry", sysusers));

    let shipped = read("config/tarpit.toml")?;
    let doc_dir = p("share/doc/tarpit");
    put(
        &doc_dir.join("operations.md"),
        read("docs/operations.md")?.as_bytes(),
        0o644,
    )?;
    put(&doc_dir.join("tarpit.toml"), shipped.as_bytes(), 0o644)?;
    written.push(("docs", doc_dir.clone()));

    let config = staged(destdir, Path::new("/"))
        .join(CONFIG_DIR)
        .join("tarpit.toml");
    let kept_config = if config.exists() {
        Some(config)
    } else {
        put(&config, shipped.as_bytes(), 0o644)?;
        written.push(("default config", config));
        None
    };
    Ok(Report {
        written,
        kept_config,
        doc_dir,
    })
}

/// The shipped unit with its `/usr/local` paths moved to `prefix`.
pub fn unit_for_prefix(unit: &str, prefix: &Path) -> String {
    let prefix = prefix.to_string_lossy();
    let prefix = prefix.trim_end_matches('/');
    unit.lines()
        .map(|l| {
            if l.starts_with('#') {
                l.to_string()
            } else {
                l.replace(&format!("{UNIT_PREFIX}/"), &format!("{prefix}/"))
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Writes a file atomically (temp + rename: a running binary is replaced,
/// not rewritten under the process) with the given mode.
fn put(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path.file_name().context("no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(tag: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!("tarpit-install-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }

    #[test]
    fn installs_everything_and_keeps_an_existing_config() {
        let t = tmp("layout");
        let bin = t.0.join("tarpit-built");
        fs::write(&bin, b"#!/bin/sh\necho tarpit\n").unwrap();
        let dest = t.0.join("root");
        let prefix = Path::new("/opt/tarpit");
        let r = install_files(&paths::root(), &bin, prefix, &dest).unwrap();
        assert!(r.kept_config.is_none());

        let installed = dest.join("opt/tarpit/bin/tarpit");
        assert_eq!(fs::read(&installed).unwrap(), fs::read(&bin).unwrap());
        let mode = fs::metadata(&installed).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);

        let unit =
            fs::read_to_string(dest.join("opt/tarpit/lib/systemd/system/tarpit.service")).unwrap();
        assert!(
            unit.contains("\nExecStart=/opt/tarpit/bin/tarpit run -c /etc/tarpit/tarpit.toml\n"),
            "{unit}"
        );
        assert!(
            !unit
                .lines()
                .filter(|l| !l.starts_with('#'))
                .any(|l| l.contains("/usr/local/")),
            "{unit}"
        );
        assert!(dest.join("opt/tarpit/lib/sysusers.d/tarpit.conf").is_file());
        assert!(
            dest.join("opt/tarpit/share/doc/tarpit/operations.md")
                .is_file()
        );

        let config = dest.join("etc/tarpit/tarpit.toml");
        let shipped = fs::read_to_string(paths::root().join("config/tarpit.toml")).unwrap();
        assert_eq!(fs::read_to_string(&config).unwrap(), shipped);

        // the operator edits the config; a reinstall leaves it alone
        fs::write(&config, "# mine\nenabled = false\n").unwrap();
        let r = install_files(&paths::root(), &bin, prefix, &dest).unwrap();
        assert_eq!(r.kept_config.as_deref(), Some(config.as_path()));
        assert_eq!(
            fs::read_to_string(&config).unwrap(),
            "# mine\nenabled = false\n"
        );
        // and the new default is next to the docs
        assert_eq!(
            fs::read_to_string(dest.join("opt/tarpit/share/doc/tarpit/tarpit.toml")).unwrap(),
            shipped
        );
    }

    #[test]
    fn default_prefix_leaves_the_unit_unchanged() {
        let unit = fs::read_to_string(paths::root().join("config/tarpit.service")).unwrap();
        assert_eq!(unit_for_prefix(&unit, Path::new(UNIT_PREFIX)), unit);
        assert_eq!(unit_for_prefix(&unit, Path::new("/usr/local/")), unit);
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let t = tmp("nobin");
        let e =
            install_files(&paths::root(), &t.0.join("nope"), Path::new("/usr"), &t.0).unwrap_err();
        assert!(e.to_string().contains("no binary"), "{e}");
    }
}
