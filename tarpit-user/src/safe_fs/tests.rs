//! safe_fs's tests: every refusal is tried with a real planted link.
use super::*;
use std::os::unix::fs::{MetadataExt, symlink};

pub(crate) fn tmpdir(tag: &str) -> PathBuf {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "tarpit-safefs-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A file outside the directory that a planted link points at.
fn victim(d: &Path) -> PathBuf {
    let v = d.join("victim");
    std::fs::write(&v, "precious\n").unwrap();
    v
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[test]
fn replace_writes_atomically_and_leaves_no_temp_file() {
    let d = tmpdir("replace");
    let dir = SafeDir::open_or_create(&d.join("a/b"), 0o750).unwrap();
    dir.replace(os("f.json"), b"one\n", 0o600, None).unwrap();
    dir.replace(os("f.json"), b"two\n", 0o600, None).unwrap();
    assert_eq!(dir.read(os("f.json")).unwrap().unwrap(), b"two\n");
    let names: Vec<_> = std::fs::read_dir(d.join("a/b"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f.json")]);
    let meta = std::fs::metadata(d.join("a/b/f.json")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(d.join("a/b")).unwrap().mode() & 0o777,
        0o750
    );
    assert!(dir.read(os("missing")).unwrap().is_none());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_link_at_the_target_is_refused_and_its_target_unchanged() {
    let d = tmpdir("target");
    let v = victim(&d);
    std::fs::create_dir(d.join("s")).unwrap();
    symlink(&v, d.join("s/state.json")).unwrap();
    let dir = SafeDir::open(&d.join("s")).unwrap();
    let e = dir
        .replace(os("state.json"), b"evil", 0o600, None)
        .unwrap_err();
    assert!(e.is_symlink(), "{e}");
    assert!(e.to_string().contains("s/state.json"), "{e}");
    let e = dir.read(os("state.json")).unwrap_err();
    assert!(e.is_symlink(), "{e}");
    let e = dir.open_lock(os("state.json"), 0o600).unwrap_err();
    assert!(e.is_symlink(), "{e}");
    assert_eq!(std::fs::read_to_string(&v).unwrap(), "precious\n");
    assert!(
        std::fs::symlink_metadata(d.join("s/state.json"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link is left for the admin to see"
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_dangling_link_is_not_created_through() {
    let d = tmpdir("dangling");
    std::fs::create_dir(d.join("s")).unwrap();
    let would_be = d.join("created-by-root");
    symlink(&would_be, d.join("s/x.lock")).unwrap();
    let dir = SafeDir::open(&d.join("s")).unwrap();
    let e = dir.open_lock(os("x.lock"), 0o600).unwrap_err();
    assert!(e.is_symlink(), "{e}");
    assert!(!would_be.exists());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_link_at_the_temporary_name_is_never_written_through() {
    let d = tmpdir("temp");
    let v = victim(&d);
    std::fs::create_dir(d.join("s")).unwrap();
    // The name the writer will try first, and the predictable name an
    // earlier tarpit used.
    symlink(&v, d.join("s/.state.json.tmp.forced")).unwrap();
    symlink(
        &v,
        d.join(format!("s/.state.json.tmp.{}", std::process::id())),
    )
    .unwrap();
    FORCED_TEMP.with(|f| f.borrow_mut().push(".state.json.tmp.forced".into()));
    let dir = SafeDir::open(&d.join("s")).unwrap();
    dir.replace(os("state.json"), b"new\n", 0o600, None)
        .unwrap();
    assert_eq!(std::fs::read_to_string(&v).unwrap(), "precious\n");
    assert_eq!(
        std::fs::read_to_string(d.join("s/state.json")).unwrap(),
        "new\n"
    );
    assert!(
        std::fs::symlink_metadata(d.join("s/.state.json.tmp.forced"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_linked_directory_is_refused() {
    let d = tmpdir("dir");
    std::fs::create_dir(d.join("real")).unwrap();
    symlink(d.join("real"), d.join("link")).unwrap();
    let e = SafeDir::open(&d.join("link")).unwrap_err();
    assert!(e.is_symlink(), "{e}");
    assert!(e.to_string().contains("link"), "{e}");
    let e = SafeDir::open_or_create(&d.join("link"), 0o755).unwrap_err();
    assert!(e.is_symlink(), "{e}");
    // dangling: not created through either
    symlink(d.join("nowhere"), d.join("dangling")).unwrap();
    let e = SafeDir::open_or_create(&d.join("dangling"), 0o755).unwrap_err();
    assert!(e.is_symlink(), "{e}");
    assert!(!d.join("nowhere").exists());
    assert_eq!(std::fs::read_dir(d.join("real")).unwrap().count(), 0);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn names_cannot_leave_the_directory() {
    let d = tmpdir("names");
    let dir = SafeDir::open(&d).unwrap();
    for bad in ["", ".", "..", "a/b", "../x"] {
        let e = dir.replace(os(bad), b"x", 0o600, None).unwrap_err();
        assert!(matches!(e, SafeFsError::BadName { .. }), "{bad}: {e}");
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn fifo_is_refused_without_blocking() {
    let d = tmpdir("fifo");
    nix::unistd::mkfifo(&d.join("p"), Mode::from_bits_truncate(0o600)).unwrap();
    let dir = SafeDir::open(&d).unwrap();
    let e = dir.read(os("p")).unwrap_err();
    assert!(matches!(e, SafeFsError::WrongType { .. }), "{e}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn ownership_goes_through_the_descriptor() {
    if !Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = tmpdir("chown");
    let v = victim(&d);
    let dir = SafeDir::open_or_create(&d.join("g"), 0o750).unwrap();
    let (uid, gid) = (Uid::from_raw(4242), Gid::from_raw(4343));
    dir.chown(uid, gid).unwrap();
    dir.replace(os("new"), b"x", 0o640, Some((uid, gid)))
        .unwrap();
    let m = std::fs::metadata(d.join("g/new")).unwrap();
    assert_eq!((m.uid(), m.gid()), (4242, 4343));
    let m = std::fs::metadata(d.join("g")).unwrap();
    assert_eq!((m.uid(), m.gid()), (4242, 4343));
    std::fs::write(d.join("g/store"), "x").unwrap();
    assert!(dir.chown_file(os("store"), uid, gid).unwrap());
    assert_eq!(std::fs::metadata(d.join("g/store")).unwrap().uid(), 4242);
    assert!(!dir.chown_file(os("missing"), uid, gid).unwrap());
    // a link is refused, its target keeps its owner
    symlink(&v, d.join("g/link")).unwrap();
    let e = dir.chown_file(os("link"), uid, gid).unwrap_err();
    assert!(e.is_symlink(), "{e}");
    // a hard link to someone else's file too
    std::fs::hard_link(&v, d.join("g/hard")).unwrap();
    let e = dir.chown_file(os("hard"), uid, gid).unwrap_err();
    assert!(matches!(e, SafeFsError::HardLinked { .. }), "{e}");
    assert_eq!(std::fs::metadata(&v).unwrap().uid(), 0);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn move_never_replaces() {
    let d = tmpdir("move");
    let a = SafeDir::open_or_create(&d.join("a"), 0o755).unwrap();
    let b = SafeDir::open_or_create(&d.join("b"), 0o755).unwrap();
    a.replace(os("g.db"), b"old\n", 0o600, None).unwrap();
    b.move_from(&a, os("g.db"), os("g.db")).unwrap();
    assert_eq!(b.read(os("g.db")).unwrap().unwrap(), b"old\n");
    assert!(a.stat_at(os("g.db")).unwrap().is_none());
    a.replace(os("g.db"), b"again\n", 0o600, None).unwrap();
    assert!(b.move_from(&a, os("g.db"), os("g.db")).is_err());
    assert_eq!(b.read(os("g.db")).unwrap().unwrap(), b"old\n");
    std::fs::remove_dir_all(d).unwrap();
}

/// The same refusals on the `openat(O_NOFOLLOW)` path kernels before
/// 5.6 take (both paths are safe, so switching for the other tests
/// running meanwhile changes nothing they check).
#[test]
fn the_openat_fallback_refuses_links_too() {
    let before = NO_OPENAT2.swap(true, Ordering::Relaxed);
    let d = tmpdir("fallback");
    let v = victim(&d);
    symlink(&v, d.join("t")).unwrap();
    symlink(d.join("nowhere"), d.join("t.lock")).unwrap();
    let dir = SafeDir::open(&d).unwrap();
    assert!(dir.read(os("t")).unwrap_err().is_symlink());
    assert!(dir.open_lock(os("t.lock"), 0o600).unwrap_err().is_symlink());
    assert!(!d.join("nowhere").exists());
    dir.replace(os("u"), b"ok", 0o600, None).unwrap();
    assert_eq!(std::fs::read_to_string(&v).unwrap(), "precious\n");
    NO_OPENAT2.store(before, Ordering::Relaxed);
    std::fs::remove_dir_all(d).unwrap();
}
