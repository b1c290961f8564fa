//! What root hands over to the agent's user before it stops being root:
//! the pin directory and its pins, the greylist's own directory and store
//! (the move from the old default location included), and what root takes
//! back (a state directory an earlier version had handed out).
//!
//! Its own file because it is the one part of the drop that touches the
//! file system as root, where every step must hold against links the
//! user may have planted: every handover is `fchown` on a descriptor
//! opened without following links ([`crate::safe_fs`]).
use std::ffi::OsStr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use nix::sys::stat::SFlag;
use nix::unistd::{Gid, Uid};
use tracing::{info, warn};

use super::Account;
use crate::config::Config;
use crate::safe_fs::SafeDir;

/// The greylist store's directory, made ready for the agent to open the
/// store in after the drop: created if missing (0750), refused if it is a
/// link or the state file's directory, the store moved there from the old
/// default location if needed, a link at the store's name refused, and
/// directory and store given to `account` with `fchown`.
pub fn prepare_greylist_dir(config: &Config, account: Option<&Account>) -> Result<()> {
    let store = &config.greylist.store;
    let (Some(dir), Some(name)) = (store.parent(), store.file_name()) else {
        bail!("greylist.store: {} names no file", store.display());
    };
    let grey = SafeDir::open_or_create(dir, 0o750)
        .with_context(|| format!("greylist.store: cannot use its directory {}", dir.display()))?;
    // The config check compares paths as written; this catches links and
    // bind mounts.
    if let Some(state_dir) = config.state.file.parent()
        && let Ok(state) = SafeDir::open(state_dir)
        && same_inode(&grey, &state)?
    {
        bail!(
            "greylist.store: {} is the state directory ({}): the greylist's directory is handed \
             to daemon.user and root writes the state file; give the store a directory of its \
             own (default {})",
            dir.display(),
            state_dir.display(),
            crate::config::DEFAULT_GREYLIST_STORE
        );
    }
    if store.as_path() == Path::new(crate::config::DEFAULT_GREYLIST_STORE) {
        migrate_store(
            Path::new(crate::config::OLD_DEFAULT_GREYLIST_STORE),
            &grey,
            name,
        )?;
    }
    if let Some(st) = grey.stat_at(name)? {
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            return Err(crate::safe_fs::SafeFsError::Symlink {
                path: store.clone(),
            })
            .context("greylist.store");
        }
    }
    if let Some(account) = account {
        let hand = || -> Result<(), crate::safe_fs::SafeFsError> {
            grey.chown(account.uid, account.gid)?;
            grey.chown_file(name, account.uid, account.gid)?;
            Ok(())
        };
        hand().with_context(|| format!("cannot hand {} to {}", dir.display(), account.name))?;
    }
    Ok(())
}

/// Moves the store from `old` (the default before it had a directory of
/// its own) into `new_dir` as `name`, once: only a regular file is moved,
/// never over an existing store. A link at the old name is left there
/// with a warning (it is not followed). True if it moved.
pub fn migrate_store(old: &Path, new_dir: &SafeDir, name: &OsStr) -> Result<bool> {
    let (Some(old_dir), Some(old_name)) = (old.parent(), old.file_name()) else {
        return Ok(false);
    };
    if new_dir.stat_at(name)?.is_some() {
        return Ok(false);
    }
    let from = match SafeDir::open(old_dir) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(e).context("greylist store migration"),
    };
    let Some(st) = from.stat_at(old_name)? else {
        return Ok(false);
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        warn!(
            target: "tarpit::ops",
            path = %old.display(),
            "greylist store at the old default location is not a regular file (a link?): \
             not moved, not followed"
        );
        return Ok(false);
    }
    new_dir
        .move_from(&from, old_name, name)
        .context("greylist store migration")?;
    info!(
        target: "tarpit::ops",
        from = %old.display(),
        to = %new_dir.join(name).display(),
        "greylist store moved to its own directory"
    );
    Ok(true)
}

fn same_inode(a: &SafeDir, b: &SafeDir) -> Result<bool> {
    let (a, b) = (a.stat()?, b.stat()?);
    Ok(a.st_dev == b.st_dev && a.st_ino == b.st_ino)
}

/// Earlier tarpits handed the state directory to the agent's user (it was
/// also the greylist's). Root writes the state file there, so it is taken
/// back (root:root, mode kept) when it still belongs to that user.
pub(super) fn reclaim_state_dir(state_file: &Path, account: &Account) -> Result<()> {
    let Some(dir) = state_file.parent() else {
        return Ok(());
    };
    let state = match SafeDir::open(dir) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e).context("state.file"),
    };
    if state.stat()?.st_uid == account.uid.as_raw() {
        state.chown(Uid::from_raw(0), Gid::from_raw(0))?;
        warn!(
            target: "tarpit::ops",
            dir = %dir.display(),
            "the state directory belonged to {}: taken back by root (root writes the state \
             file; the greylist has a directory of its own)",
            account.name
        );
    }
    Ok(())
}

/// Hands the pin directory, its subdirectories and the pins to `account`.
/// Directories are opened without following links and changed with
/// `fchown`; pins (which cannot be opened) with `fchownat(...,
/// AT_SYMLINK_NOFOLLOW)` relative to their held directory, so a link the
/// user left in its directory never redirects root's chown.
pub(super) fn give_pins(root: &Path, account: &Account) -> Result<()> {
    let top = match SafeDir::open(root) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e).context("kernel.pin_path"),
    };
    let hand = |e: crate::safe_fs::SafeFsError| {
        anyhow::Error::new(e).context(format!("cannot hand the pins to {}", account.name))
    };
    let mut stack = vec![top];
    while let Some(dir) = stack.pop() {
        dir.chown(account.uid, account.gid).map_err(hand)?;
        for name in dir.names().map_err(hand)? {
            let Some(st) = dir.stat_at(&name).map_err(hand)? else {
                continue;
            };
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
                stack.push(dir.open_subdir(&name).map_err(hand)?);
            } else {
                dir.chown_entry(&name, account.uid, account.gid)
                    .map_err(hand)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::resolve;
    use super::*;
    use crate::config::GreylistMode;

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tarpit-priv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn greylist_config(state: &Path, store: &Path) -> Config {
        let mut c = Config::default();
        c.state.file = state.to_owned();
        c.greylist.mode = GreylistMode::Triplet;
        c.greylist.store = store.to_owned();
        c
    }

    #[test]
    fn old_store_is_moved_once_and_links_are_not() {
        use std::os::unix::fs::symlink;
        let d = tmpdir("migrate");
        let old = d.join("greylist.db");
        std::fs::write(&old, "entries\n").unwrap();
        let new = SafeDir::open_or_create(&d.join("greylist"), 0o750).unwrap();
        assert!(migrate_store(&old, &new, OsStr::new("greylist.db")).unwrap());
        assert!(!old.exists());
        assert_eq!(
            std::fs::read_to_string(d.join("greylist/greylist.db")).unwrap(),
            "entries\n"
        );
        // never over an existing store
        std::fs::write(&old, "older\n").unwrap();
        assert!(!migrate_store(&old, &new, OsStr::new("greylist.db")).unwrap());
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "older\n");
        // a link at the old name stays where it is, unfollowed
        std::fs::remove_file(&old).unwrap();
        std::fs::remove_file(d.join("greylist/greylist.db")).unwrap();
        std::fs::write(d.join("victim"), "precious\n").unwrap();
        symlink(d.join("victim"), &old).unwrap();
        assert!(!migrate_store(&old, &new, OsStr::new("greylist.db")).unwrap());
        assert!(new.stat_at(OsStr::new("greylist.db")).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn greylist_directory_is_refused_when_linked_shared_or_holding_a_link() {
        use std::os::unix::fs::symlink;
        let d = tmpdir("greydir");
        std::fs::create_dir(d.join("state")).unwrap();
        std::fs::write(d.join("victim"), "precious\n").unwrap();
        let state = d.join("state/state.json");
        // the state directory under another name
        symlink(d.join("state"), d.join("alias")).unwrap();
        let c = greylist_config(&state, &d.join("alias/greylist.db"));
        let e = prepare_greylist_dir(&c, None).unwrap_err();
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        // a bind-mount-like alias is caught by inode: the same path
        let c = greylist_config(&state, &d.join("state/./greylist.db"));
        let e = prepare_greylist_dir(&c, None).unwrap_err();
        assert!(format!("{e:#}").contains("state directory"), "{e:#}");
        // a link at the store's name
        std::fs::create_dir(d.join("grey")).unwrap();
        symlink(d.join("victim"), d.join("grey/greylist.db")).unwrap();
        let c = greylist_config(&state, &d.join("grey/greylist.db"));
        let e = prepare_greylist_dir(&c, None).unwrap_err();
        assert!(format!("{e:#}").contains("grey/greylist.db"), "{e:#}");
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        assert_eq!(
            std::fs::read_to_string(d.join("victim")).unwrap(),
            "precious\n"
        );
        // a directory of its own: created and handed over
        if Uid::effective().is_root() {
            use std::os::unix::fs::MetadataExt;
            let c = greylist_config(&state, &d.join("own/greylist.db"));
            std::fs::create_dir(d.join("own")).unwrap();
            std::fs::write(d.join("own/greylist.db"), "x\n").unwrap();
            let account = resolve("4242", Some("4242")).unwrap();
            prepare_greylist_dir(&c, Some(&account)).unwrap();
            for p in ["own", "own/greylist.db"] {
                assert_eq!(std::fs::metadata(d.join(p)).unwrap().uid(), 4242, "{p}");
            }
            assert_eq!(std::fs::metadata(d.join("state")).unwrap().uid(), 0);
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
