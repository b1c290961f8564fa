//! Manual pages from the same clap definition as `--help`, so the two can
//! never disagree: one page for `tarpit` and one per subcommand, named the
//! way man(1) finds them (`man tarpit-block-add`).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::CommandFactory;

use super::Cli;

/// Writes every page into `dir` and returns their paths.
pub fn write_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    for (name, page) in pages() {
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// (page name, roff text) for `tarpit` and each visible subcommand, nested
/// ones included.
fn pages() -> Vec<(String, Vec<u8>)> {
    let mut root = Cli::command();
    root.build();
    let mut out = Vec::new();
    collect(&root, "tarpit", &mut out);
    out
}

fn collect(cmd: &clap::Command, name: &str, out: &mut Vec<(String, Vec<u8>)>) {
    let mut roff = Vec::new();
    // After `build()` each subcommand's display name is "tarpit-block-add",
    // which clap_mangen uses for the title and NAME section.
    // Rendering into a Vec cannot fail.
    let _ = clap_mangen::Man::new(cmd.clone()).render(&mut roff);
    out.push((name.to_string(), roff));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        collect(sub, &format!("{name}-{}", sub.get_name()), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_per_subcommand_with_the_long_help_and_examples() {
        let pages = pages();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "tarpit",
            "tarpit-run",
            "tarpit-allow",
            "tarpit-allow-add",
            "tarpit-block-list",
            "tarpit-auth-del",
            "tarpit-detach",
            "tarpit-top",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(
            !names.contains(&"tarpit-man"),
            "the hidden command has no page"
        );
        let text = |n: &str| {
            String::from_utf8_lossy(&pages.iter().find(|(p, _)| p == n).unwrap().1).into_owned()
        };
        let main = text("tarpit");
        assert!(main.contains(".TH tarpit 1"), "{main}");
        assert!(main.contains("eBPF/XDP"), "{main}");
        let add = text("tarpit-block-add");
        assert!(add.contains("\\-\\-ttl"), "{add}");
        // The examples and exit status of --help are in the page too.
        let block = text("tarpit-block");
        assert!(block.to_lowercase().contains("exit"), "{block}");
    }

    #[test]
    fn writes_the_pages_into_a_new_directory() {
        let dir = std::env::temp_dir().join(format!("tarpit-man-{}", std::process::id()));
        let written = write_pages(&dir.join("man1")).unwrap();
        assert!(written.iter().any(|p| p.ends_with("tarpit.1")));
        assert!(written.iter().all(|p| p.is_file()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
