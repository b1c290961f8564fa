//! `cargo xtask deb`: a Debian package, built with `dpkg-deb`.
//!
//! dpkg-deb rather than cargo-deb: it is part of dpkg, so it is on every
//! Debian box already (cargo-deb would be one more tool to download and
//! build), and the package's layout is already what `cargo xtask install
//! --prefix /usr --destdir` stages; the rest (control file, maintainer
//! scripts in config/debian, md5sums, compressed man pages and changelog)
//! is a few lines here, in plain view.
//!
//! Contents: /usr/bin/tarpit (the kernel programs are embedded in it),
//! /lib/systemd/system/tarpit.service (ExecStart /usr/bin/tarpit),
//! /usr/lib/sysusers.d/tarpit.conf, the man pages, /etc/tarpit/tarpit.toml
//! as a conffile (the shipped, loopback-only config), the docs, and the
//! Grafana dashboard in /usr/share/tarpit/grafana.
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{install, paths, shell};

#[derive(Debug, clap::Args)]
pub struct DebArgs {
    /// Package this binary instead of building a release one (it must
    /// embed the eBPF object: built after `cargo xtask build-ebpf`).
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
    /// The Debian revision: the package's version is the crate's version,
    /// a dash and this.
    #[arg(long, default_value = "1")]
    pub revision: String,
    /// Where the .deb goes (default: target/deb).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

const MAINTAINER: &str = "tarpit developers <tarpit-maint@example.org>";

pub fn run(args: DebArgs) -> Result<()> {
    let deb = build(&args)?;
    shell::say("Built", &deb.display().to_string());
    Ok(())
}

/// Builds the package; returns the path of the .deb.
pub fn build(args: &DebArgs) -> Result<PathBuf> {
    if !args
        .revision
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "+.~".contains(c))
    {
        bail!("--revision may hold only letters, digits, '+', '.' and '~'");
    }
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => crate::release::build()?,
    };
    let version = format!("{}-{}", env!("CARGO_PKG_VERSION"), args.revision);
    let arch = shell::output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let out = args
        .out_dir
        .clone()
        .unwrap_or_else(|| paths::target_dir().join("deb"));
    let stage = out.join(format!("tarpit_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    fs::create_dir_all(&stage)?;
    let root = paths::root();

    install::install_files(&root, &binary, Path::new("/usr"), &stage)?;
    // Debian 12 keeps units in /lib/systemd/system.
    let unit_dir = stage.join("lib/systemd/system");
    fs::create_dir_all(&unit_dir)?;
    fs::rename(
        stage.join("usr/lib/systemd/system/tarpit.service"),
        unit_dir.join("tarpit.service"),
    )?;
    fs::remove_dir_all(stage.join("usr/lib/systemd"))?;
    shell::run(
        Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
            ])
            .arg(stage.join("usr/bin/tarpit")),
    )?;

    // Manual pages, from the binary's own --help definitions, compressed.
    let man = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man)?;
    shell::run(
        Command::new(stage.join("usr/bin/tarpit"))
            .arg("man")
            .arg(&man)
            .stdout(Stdio::null()),
    )?;
    for e in fs::read_dir(&man)?.flatten() {
        gzip(&e.path())?;
    }

    let doc = stage.join("usr/share/doc/tarpit");
    for name in ["mta-setup.md", "cli.md", "reputation.md", "loop.md"] {
        fs::copy(root.join("docs").join(name), doc.join(name))?;
    }
    put(&doc.join("copyright"), COPYRIGHT.as_bytes(), 0o644)?;
    let changelog = doc.join("changelog.Debian");
    put(
        &changelog,
        format!(
            "tarpit ({version}) unstable; urgency=medium\n\n  * Package built by `cargo xtask deb`.\n\n -- {MAINTAINER}  Sun, 06 Dec 2026 00:00:00 +0000\n"
        )
        .as_bytes(),
        0o644,
    )?;
    gzip(&changelog)?;

    let grafana = stage.join("usr/share/tarpit/grafana");
    fs::create_dir_all(&grafana)?;
    fs::copy(
        root.join("config/grafana/tarpit-dashboard.json"),
        grafana.join("tarpit-dashboard.json"),
    )?;

    // Control area.
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    for script in ["postinst", "prerm", "postrm"] {
        let text = fs::read(root.join("config/debian").join(script))?;
        put(&debian.join(script), &text, 0o755)?;
    }
    put(
        &debian.join("conffiles"),
        b"/etc/tarpit/tarpit.toml\n",
        0o644,
    )?;
    let size_kib = du_kib(&stage)?;
    let control = format!(
        "Package: tarpit\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {size_kib}\n\
         Depends: adduser, libc6 (>= 2.34), libgcc-s1 (>= 4.2)\n\
         Suggests: postfix | exim4-daemon-heavy, prometheus\n\
         Section: mail\n\
         Priority: optional\n\
         Description: eBPF/XDP-assisted SMTP tarpit in front of the MTA\n \
         tarpit sits in front of the real MTA (Postfix, Exim) and makes spam\n \
         bots, address harvesters and protocol violators waste their time,\n \
         while real senders notice nothing: kernel programs (XDP, tc,\n \
         sock_ops) drop block-listed sources and flag pre-greet talkers; the\n \
         agent delays the greeting, HELO, RCPT and 5xx replies, checks DNSBLs\n \
         and hands every session that earns it to the MTA with the real\n \
         client address (PROXY protocol or XCLIENT).\n \
         .\n \
         The shipped configuration is safe on any box (loopback only); the\n \
         service is not started on install. See\n \
         /usr/share/doc/tarpit/operations.md.\n"
    );
    put(&debian.join("control"), control.as_bytes(), 0o644)?;
    put(&debian.join("md5sums"), md5sums(&stage)?.as_bytes(), 0o644)?;

    let deb = out.join(format!("tarpit_{version}_{arch}.deb"));
    shell::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb)
            .stdout(Stdio::null()),
    )?;
    Ok(deb)
}

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tarpit

Files: *
Copyright: 2026 tarpit developers
License: MIT or Apache-2.0

License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a
 copy of this software and associated documentation files (the
 \"Software\"), to deal in the Software without restriction, including
 without limitation the rights to use, copy, modify, merge, publish,
 distribute, sublicense, and/or sell copies of the Software, and to permit
 persons to whom the Software is furnished to do so, subject to the
 following conditions:
 .
 The above copyright notice and this permission notice shall be included
 in all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS
 OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
 MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN
 NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
 DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
 OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE
 USE OR OTHER DEALINGS IN THE SOFTWARE.

License: Apache-2.0
 On Debian systems, the complete text of the Apache License, Version 2.0,
 can be found in /usr/share/common-licenses/Apache-2.0.
";

fn gzip(path: &Path) -> Result<()> {
    shell::run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(path))
}

fn put(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Installed size in KiB, as dpkg counts it (1 per file rounded up).
fn du_kib(stage: &Path) -> Result<u64> {
    let mut total = 0;
    for f in files(stage)? {
        total += fs::metadata(&f)?.len().div_ceil(1024);
    }
    Ok(total)
}

/// Every regular file below `stage`, outside DEBIAN/, sorted.
fn files(stage: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![stage.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d)?.flatten() {
            let p = e.path();
            let t = e.file_type()?;
            if t.is_dir() {
                if p != stage.join("DEBIAN") {
                    dirs.push(p);
                }
            } else if t.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// DEBIAN/md5sums: every file but the conffiles, relative paths.
fn md5sums(stage: &Path) -> Result<String> {
    let mut text = String::new();
    for f in files(stage)? {
        let rel = f.strip_prefix(stage)?.to_string_lossy().into_owned();
        if rel.starts_with("etc/") {
            continue;
        }
        let sum = shell::output(Command::new("md5sum").arg(&f))?;
        let hash = sum.split_whitespace().next().unwrap_or_default();
        text.push_str(&format!("{hash}  {rel}\n"));
    }
    Ok(text)
}
