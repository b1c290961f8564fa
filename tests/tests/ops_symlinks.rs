//! Root never writes through a planted symbolic link: links at the names
//! the state file's writer uses (the file, its lock, the temporary names of
//! earlier tarpits, its directory) and in the greylist's directory make the
//! command line and the agent's start refuse, naming the path, and leave
//! the link's target as it was. The greylist's directory is the one handed
//! to the agent's user; the state directory stays root's.
mod cli_common;

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use cli_common::{CliWorld, Opts};
use tarpit_tests::{Agent, require_root};

const NOBODY: u32 = 65534;

/// A root-owned file outside every directory tarpit writes: what a
/// compromised agent would like root to overwrite or give away.
fn victim(w: &CliWorld) -> PathBuf {
    let v = w.dir.join("victim");
    std::fs::write(&v, "precious\n").unwrap();
    v
}

fn assert_untouched(v: &Path) {
    assert_eq!(
        std::fs::read_to_string(v).unwrap(),
        "precious\n",
        "the link's target was written"
    );
    let m = std::fs::metadata(v).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (0, 0),
        "the link's target changed owner"
    );
}

fn stderr_of(w: &CliWorld, args: &[&str]) -> String {
    let out = w.tarpit(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "tarpit {args:?} succeeded: {err}");
    err
}

#[test]
fn allow_add_refuses_links_in_the_state_directory() {
    if !require_root() {
        return;
    }
    let mut w = CliWorld::new(Opts::detached());
    w.start_agent();
    let v = victim(&w);
    let state_dir = w.state_file.parent().unwrap().to_owned();
    std::fs::create_dir_all(&state_dir).unwrap();
    let lock = state_dir.join("state.json.lock");

    // at the state file, and at its lock file
    for planted in [&w.state_file, &lock] {
        // (the refused add before left a lock file of its own)
        let _ = std::fs::remove_file(planted);
        symlink(&v, planted).unwrap();
        let err = stderr_of(&w, &["allow", "add", "198.51.100.0/24"]);
        assert!(
            err.contains(&planted.display().to_string()) && err.contains("symbolic link"),
            "{}: {err}",
            planted.display()
        );
        assert_untouched(&v);
        std::fs::remove_file(planted).unwrap();
    }
    // nothing reached the kernel either
    assert!(w.json(&["allow", "list"]).as_array().unwrap().is_empty());

    // at the directory itself
    let real = w.dir.join("elsewhere");
    std::fs::create_dir(&real).unwrap();
    std::fs::remove_dir_all(&state_dir).unwrap();
    symlink(&real, &state_dir).unwrap();
    let err = stderr_of(&w, &["block", "add", "198.51.100.0/24"]);
    assert!(
        err.contains(&state_dir.display().to_string()) && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&real).unwrap().count(),
        0,
        "written through"
    );
    std::fs::remove_file(&state_dir).unwrap();
    std::fs::create_dir(&state_dir).unwrap();

    // at the temporary names an earlier tarpit used (".NAME.tmp.PID"): the
    // writer's names are unpredictable and created exclusively, so the add
    // goes through and the links are never followed
    for pid in 1..=4096 {
        symlink(&v, state_dir.join(format!(".state.json.tmp.{pid}"))).unwrap();
    }
    w.ok(&["allow", "add", "198.51.100.0/24"]);
    assert_untouched(&v);
    let saved = std::fs::read_to_string(&w.state_file).unwrap();
    assert!(saved.contains("198.51.100.0/24"), "{saved}");
    assert!(
        !std::fs::symlink_metadata(&w.state_file)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// The world's config plus greylisting in a directory of its own, and the
/// switch to `nobody`.
fn greylist_world() -> (CliWorld, PathBuf) {
    let w = CliWorld::new(Opts::detached());
    let store = w.dir.join("greylist/greylist.db");
    let config = format!(
        "{}\n[greylist]\nmode = \"triplet\"\nstore = \"{}\"\n[daemon]\nuser = \"nobody\"\n",
        w.config,
        store.display()
    );
    let mut w = w;
    std::fs::write(&w.config_path, &config).unwrap();
    w.config = config;
    (w, store)
}

fn start_fails(w: &CliWorld, planted: &Path) {
    let err = match Agent::start(&w.net, &w.config) {
        Ok(_) => panic!("the agent started with a link at {}", planted.display()),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&planted.display().to_string()) && err.contains("symbolic link"),
        "{}: {err}",
        planted.display()
    );
}

#[test]
fn start_refuses_links_in_the_state_and_greylist_directories() {
    if !require_root() {
        return;
    }
    let (mut w, store) = greylist_world();
    let v = victim(&w);
    let state_dir = w.state_file.parent().unwrap().to_owned();
    let grey_dir = store.parent().unwrap().to_owned();
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::create_dir_all(&grey_dir).unwrap();

    // the state file (restored at start, as root)
    symlink(&v, &w.state_file).unwrap();
    start_fails(&w, &w.state_file);
    assert_untouched(&v);
    std::fs::remove_file(&w.state_file).unwrap();

    // the greylist store (handed to the user at start)
    symlink(&v, &store).unwrap();
    start_fails(&w, &store);
    assert_untouched(&v);
    std::fs::remove_file(&store).unwrap();

    // the greylist directory itself
    std::fs::remove_dir(&grey_dir).unwrap();
    let real = w.dir.join("elsewhere");
    std::fs::create_dir(&real).unwrap();
    symlink(&real, &grey_dir).unwrap();
    start_fails(&w, &grey_dir);
    let m = std::fs::metadata(&real).unwrap();
    assert_eq!(m.uid(), 0, "the link's target was handed over");
    assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
    std::fs::remove_file(&grey_dir).unwrap();

    // without links: it starts; the greylist's directory and store are the
    // user's, the state directory stays root's
    w.start_agent();
    let log = w.agent.as_ref().unwrap().log();
    // clients are accepted only after the drop: the metrics endpoint's
    // accept loop (which says so) starts after it
    let dropped = log.find("privileges dropped").expect("drop logged");
    let serving = log
        .find("metrics endpoint listening")
        .expect("metrics serving");
    assert!(dropped < serving, "{log}");
    let m = std::fs::metadata(&grey_dir).unwrap();
    assert_eq!(m.uid(), NOBODY, "greylist directory handed over");
    let m = std::fs::metadata(&store).unwrap();
    assert_eq!(m.uid(), NOBODY, "the store was created by the agent's user");
    assert_eq!(std::fs::metadata(&state_dir).unwrap().uid(), 0);
    w.ok(&["allow", "add", "198.51.100.0/24"]);
    assert_eq!(std::fs::metadata(&w.state_file).unwrap().uid(), 0);
    w.stop_agent();
}

#[test]
fn check_config_refuses_greylist_store_in_the_state_directory() {
    if !require_root() {
        return;
    }
    let w = CliWorld::new(Opts::default());
    let config = format!(
        "{}\n[greylist]\nmode = \"triplet\"\nstore = \"{}\"\n",
        w.config,
        w.state_file.with_file_name("greylist.db").display()
    );
    std::fs::write(&w.config_path, config).unwrap();
    let err = stderr_of(&w, &["check-config"]);
    assert!(
        err.contains("greylist.store") && err.contains("state.file"),
        "{err}"
    );
}
