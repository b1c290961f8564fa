//! The state file's tests: format, atomic writes, locking, planted links.
use super::*;
use std::fs;
use std::os::unix::fs::symlink;

fn tmpdir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "tarpit-state-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&d).unwrap();
    d
}

fn allow(cidr: &str, expires_at: Option<u64>) -> AllowEntry {
    AllowEntry {
        cidr: cidr.parse().unwrap(),
        added_at: 100,
        expires_at,
        comment: Some("partner".into()),
    }
}

fn block(cidr: &str, expires_at: Option<u64>) -> BlockEntry {
    BlockEntry {
        cidr: cidr.parse().unwrap(),
        added_at: 100,
        expires_at,
        all_ports: true,
        hold: false,
        comment: None,
    }
}

#[test]
fn missing_file_is_empty_state() {
    let d = tmpdir();
    let s = State::load(&d.join("nope.json")).unwrap();
    assert_eq!(s, State::new());
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn save_then_load_round_trips_and_leaves_no_temp_file() {
    let d = tmpdir();
    let path = d.join("sub/state.json");
    let mut s = State::new();
    s.upsert_allow(allow("198.51.100.0/24", None));
    s.upsert_block(block("fd5b:1e00::/64", Some(5_000)));
    s.save(&path).unwrap();
    assert_eq!(State::load(&path).unwrap(), s);
    let names: Vec<_> = fs::read_dir(d.join("sub"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["state.json"]);
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn upsert_replaces_and_remove_reports() {
    let mut s = State::new();
    s.upsert_block(block("198.51.100.0/24", None));
    s.upsert_block(block("198.51.100.0/24", Some(9)));
    assert_eq!(s.block.len(), 1);
    assert_eq!(s.block[0].expires_at, Some(9));
    assert!(s.remove_block(&"198.51.100.0/24".parse().unwrap()));
    assert!(!s.remove_block(&"198.51.100.0/24".parse().unwrap()));
    assert!(!s.remove_allow(&"198.51.100.0/24".parse().unwrap()));
}

#[test]
fn prune_drops_only_expired() {
    let mut s = State::new();
    s.upsert_allow(allow("198.51.100.0/24", Some(50)));
    s.upsert_allow(allow("198.51.101.0/24", None));
    s.upsert_block(block("198.51.102.0/24", Some(200)));
    assert_eq!(s.prune_expired(100), 1);
    assert_eq!(s.allow.len(), 1);
    assert_eq!(s.block.len(), 1);
}

#[test]
fn malformed_file_is_an_error_not_an_empty_state() {
    let d = tmpdir();
    let path = d.join("state.json");
    fs::write(&path, "{\"version\": 1, \"allow\": [").unwrap();
    let e = State::load(&path).unwrap_err();
    assert!(matches!(e, StateError::Invalid { .. }), "{e}");
    fs::write(
        &path,
        r#"{"version":1,"allow":[{"cidr":"198.51.100.7/24","added_at":1}]}"#,
    )
    .unwrap();
    let e = State::load(&path).unwrap_err().to_string();
    assert!(e.contains("host bits"), "{e}");
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn newer_format_is_refused() {
    let d = tmpdir();
    let path = d.join("state.json");
    fs::write(&path, r#"{"version": 2, "allow": "something new"}"#).unwrap();
    let e = State::load(&path).unwrap_err();
    assert!(matches!(e, StateError::Version { found: 2, .. }), "{e}");
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn update_saves_only_on_change_and_serialises_writers() {
    let d = tmpdir();
    let path = d.join("state.json");
    update(&path, |_| ()).unwrap();
    assert!(!path.exists(), "no change, no file");
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                update(&path, |s| {
                    s.upsert_block(block(&format!("198.51.100.{i}/32"), None))
                })
                .unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(State::load(&path).unwrap().block.len(), 8, "no lost update");
    fs::remove_dir_all(d).unwrap();
}

/// A state with one entry, for the planted-link tests.
fn one_entry() -> State {
    let mut s = State::new();
    s.upsert_block(block("198.51.100.0/24", None));
    s
}

fn victim(d: &Path) -> PathBuf {
    let v = d.join("victim");
    fs::write(&v, "precious\n").unwrap();
    v
}

#[test]
fn a_link_at_the_state_file_is_refused_and_its_target_unchanged() {
    let d = tmpdir();
    let v = victim(&d);
    let path = d.join("state/state.json");
    fs::create_dir(d.join("state")).unwrap();
    symlink(&v, &path).unwrap();
    let e = State::load(&path).unwrap_err();
    assert!(e.is_refused(), "{e}");
    assert!(e.to_string().contains("state/state.json"), "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    let e = one_entry().save(&path).unwrap_err();
    assert!(e.is_refused(), "{e}");
    let e = update(&path, |s| s.upsert_allow(allow("198.51.100.0/24", None))).unwrap_err();
    assert!(e.is_refused(), "{e}");
    assert_eq!(fs::read_to_string(&v).unwrap(), "precious\n");
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_link_at_the_lock_file_is_refused_and_its_target_unchanged() {
    let d = tmpdir();
    let v = victim(&d);
    let path = d.join("state.json");
    symlink(&v, d.join("state.json.lock")).unwrap();
    let e = update(&path, |s| s.upsert_allow(allow("198.51.100.0/24", None))).unwrap_err();
    assert!(e.is_refused(), "{e}");
    assert!(e.to_string().contains("state.json.lock"), "{e}");
    assert_eq!(fs::read_to_string(&v).unwrap(), "precious\n");
    assert!(!path.exists());
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn links_at_temporary_names_are_never_written_through() {
    let d = tmpdir();
    let v = victim(&d);
    let path = d.join("state.json");
    // the predictable names of earlier tarpits (".NAME.tmp.PID")
    symlink(
        &v,
        d.join(format!(".state.json.tmp.{}", std::process::id())),
    )
    .unwrap();
    for pid in 1..64 {
        let _ = symlink(&v, d.join(format!(".state.json.tmp.{pid}")));
    }
    update(&path, |s| s.upsert_allow(allow("198.51.100.0/24", None))).unwrap();
    assert_eq!(fs::read_to_string(&v).unwrap(), "precious\n");
    assert_eq!(State::load(&path).unwrap().allow.len(), 1);
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_linked_state_directory_is_refused() {
    let d = tmpdir();
    fs::create_dir(d.join("real")).unwrap();
    symlink(d.join("real"), d.join("state")).unwrap();
    let path = d.join("state/state.json");
    let e = update(&path, |s| s.upsert_allow(allow("198.51.100.0/24", None))).unwrap_err();
    assert!(e.is_refused(), "{e}");
    assert!(
        e.to_string()
            .contains(&d.join("state").display().to_string()),
        "{e}"
    );
    let e = State::load(&path).unwrap_err();
    assert!(e.is_refused(), "{e}");
    assert_eq!(
        fs::read_dir(d.join("real")).unwrap().count(),
        0,
        "nothing written"
    );
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn restore_at_start_refuses_a_planted_link_but_not_damage() {
    let d = tmpdir();
    let v = victim(&d);
    let path = d.join("state.json");
    // damage: logged, the agent goes on (the pins are never reached)
    fs::write(&path, "{").unwrap();
    restore_at_start(&d.join("no-pins"), &path).unwrap();
    fs::remove_file(&path).unwrap();
    symlink(&v, &path).unwrap();
    let e = restore_at_start(&d.join("no-pins"), &path).unwrap_err();
    assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
    fs::remove_dir_all(d).unwrap();
}
