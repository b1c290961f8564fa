//! Files that root writes, safe from whoever else can write their
//! directory.
//!
//! The agent starts as root and the command line (`tarpit allow add`) runs
//! as root, but some of the directories they write into may be writable by
//! someone else: the unprivileged agent user (an earlier tarpit handed it the
//! state directory), or an admin's mistake. Opening a path there the usual
//! way follows any symbolic link planted at that name, so a compromised
//! agent could make root create, truncate or `chown` any file on the system.
//!
//! Everything here therefore works on a directory **held open**
//! ([`SafeDir`], opened with `O_DIRECTORY | O_NOFOLLOW`, so the directory
//! itself cannot be a link) and on single names inside it:
//! - files are opened with `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)`
//!   where the kernel has it (5.6+), else `openat(O_NOFOLLOW)`, which is
//!   equivalent for a single name; a link at the name is refused with an
//!   error naming the path ([`SafeFsError::Symlink`]);
//! - new files are written under an unpredictable temporary name created
//!   with `O_CREAT | O_EXCL` (never an existing file, link or not), fsynced,
//!   renamed over the target with `renameat` (which replaces a name, never
//!   follows it) and the directory is fsynced;
//! - ownership is changed with `fchown` on the opened descriptor, never by
//!   path, and only for a regular file with a single link (a hard link to
//!   someone else's file is not ours to give away).
//!
//! The errors, and the reading of an errno as a planted link, are in
//! `error`; the tests plant real links in `tests`.
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid};

mod error;

pub use error::SafeFsError;
use error::{Result, classify, io};

/// Set once `openat2` answered ENOSYS (kernel before 5.6, or a seccomp
/// filter that does not know it): later opens go straight to `openat`.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A directory held open; every file operation is relative to it.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl SafeDir {
    /// Opens `path` as a directory; a symbolic link as its last component is
    /// refused (links higher up, e.g. a distribution's `/var` → `/srv/var`,
    /// are the administrator's and are followed).
    pub fn open(path: &Path) -> Result<SafeDir> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match nix::fcntl::open(path, flags, Mode::empty()) {
            Ok(fd) => Ok(SafeDir {
                fd,
                path: path.to_owned(),
            }),
            Err(e) => Err(classify(path, "open directory", e, "directory")),
        }
    }

    /// [`SafeDir::open`], creating the directory first if it is missing
    /// (its parents with the default mode, itself with `mode`).
    pub fn open_or_create(path: &Path, mode: u32) -> Result<SafeDir> {
        match SafeDir::open(path) {
            Err(e) if e.is_not_found() => {}
            other => return other,
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| io("create directory", parent, e))?;
        }
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(mode).create(path) {
            Ok(()) => {}
            // Made meanwhile (another writer), or a dangling link: open
            // tells which.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("create directory", path, e)),
        }
        SafeDir::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The full path of `name` in this directory (for messages).
    pub fn join(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    /// The directory's own metadata.
    pub fn stat(&self) -> Result<FileStat> {
        nix::sys::stat::fstat(self.fd.as_fd()).map_err(|e| io("stat", &self.path, e))
    }

    /// Metadata of `name` itself (a link is described, not followed);
    /// `None` if there is no such name.
    pub fn stat_at(&self, name: &OsStr) -> Result<Option<FileStat>> {
        let name = check_name(name)?;
        match nix::sys::stat::fstatat(self.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(io("stat", &self.join(name), e)),
        }
    }

    /// Opens the subdirectory `name`, refusing a link there.
    pub fn open_subdir(&self, name: &OsStr) -> Result<SafeDir> {
        let name = check_name(name)?;
        let path = self.join(name);
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match nix::fcntl::openat(self.fd.as_fd(), name, flags, Mode::empty()) {
            Ok(fd) => Ok(SafeDir { fd, path }),
            Err(e) => Err(classify(&path, "open directory", e, "directory")),
        }
    }

    /// The names in the directory (listed by path: only names come from
    /// it, every use of them is relative to the held descriptor).
    pub fn names(&self) -> Result<Vec<std::ffi::OsString>> {
        let list = std::fs::read_dir(&self.path).map_err(|e| io("list", &self.path, e))?;
        let mut out = Vec::new();
        for e in list {
            out.push(e.map_err(|e| io("list", &self.path, e))?.file_name());
        }
        Ok(out)
    }

    /// Changes the owner of the name `name` itself (`fchownat` with
    /// `AT_SYMLINK_NOFOLLOW` relative to the held directory): for objects
    /// that cannot be opened, such as bpffs pins. A link gets the owner,
    /// never its target.
    pub fn chown_entry(&self, name: &OsStr, uid: Uid, gid: Gid) -> Result<()> {
        let name = check_name(name)?;
        nix::unistd::fchownat(
            self.fd.as_fd(),
            name,
            Some(uid),
            Some(gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io("change the owner of", &self.join(name), e))
    }

    /// Changes the directory's owner (`fchown` on the held descriptor).
    pub fn chown(&self, uid: Uid, gid: Gid) -> Result<()> {
        nix::unistd::fchown(self.fd.as_fd(), Some(uid), Some(gid))
            .map_err(|e| io("change the owner of", &self.path, e))
    }

    /// Opens `name` read-only; `None` if it does not exist. A link is
    /// refused; so is anything but a regular file (a FIFO would block the
    /// reader: it is opened non-blocking and checked before any read).
    pub fn open_read(&self, name: &OsStr) -> Result<Option<File>> {
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK;
        let fd = match self.open_at(name, flags, 0) {
            Ok(fd) => fd,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let file = self.regular(name, fd)?;
        Ok(Some(file))
    }

    /// The whole content of `name`; `None` if it does not exist.
    pub fn read(&self, name: &OsStr) -> Result<Option<Vec<u8>>> {
        let Some(mut f) = self.open_read(name)? else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|e| io("read", &self.join(name), e))?;
        Ok(Some(buf))
    }

    /// Opens (creating it with `mode` if missing) a file that is only
    /// locked, never written: `O_CREAT` without `O_EXCL`, so that every
    /// writer opens the same file, but never through a link.
    pub fn open_lock(&self, name: &OsStr, mode: u32) -> Result<File> {
        let fd = self.open_at(name, OFlag::O_RDWR | OFlag::O_CREAT, mode)?;
        self.regular(name, fd)
    }

    /// Replaces `name` with `contents`, atomically (see the module docs):
    /// readers see the old file or the new one, never a mix, and nothing
    /// is written through a link. A link already at `name` is refused.
    /// `owner` is given to the new file with `fchown` before it gets its
    /// name.
    pub fn replace(
        &self,
        name: &OsStr,
        contents: &[u8],
        mode: u32,
        owner: Option<(Uid, Gid)>,
    ) -> Result<()> {
        let name = check_name(name)?;
        if let Some(st) = self.stat_at(name)?
            && SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
        {
            return Err(SafeFsError::Symlink {
                path: self.join(name),
            });
        }
        let (tmp, mut file) = self.create_temp(name, mode)?;
        let written = (|| {
            let tmp_path = self.join(tmp.as_os_str());
            if let Some((uid, gid)) = owner {
                nix::unistd::fchown(file.as_fd(), Some(uid), Some(gid))
                    .map_err(|e| io("change the owner of", &tmp_path, e))?;
            }
            file.write_all(contents)
                .map_err(|e| io("write", &tmp_path, e))?;
            file.sync_all().map_err(|e| io("fsync", &tmp_path, e))?;
            nix::fcntl::renameat(self.fd.as_fd(), tmp.as_os_str(), self.fd.as_fd(), name)
                .map_err(|e| io("rename into place", &self.join(name), e))?;
            self.sync()
        })();
        if written.is_err() {
            let _ = nix::unistd::unlinkat(
                self.fd.as_fd(),
                tmp.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        written
    }

    /// Removes `name` (a link is removed itself, never followed).
    pub fn remove(&self, name: &OsStr) -> Result<()> {
        let name = check_name(name)?;
        nix::unistd::unlinkat(
            self.fd.as_fd(),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(|e| io("remove", &self.join(name), e))
    }

    /// Moves `from_name` of `from` to `to_name` here, never replacing an
    /// existing `to_name` (`RENAME_NOREPLACE`). A link is moved as a link;
    /// callers check what they move.
    pub fn move_from(&self, from: &SafeDir, from_name: &OsStr, to_name: &OsStr) -> Result<()> {
        let (from_name, to_name) = (check_name(from_name)?, check_name(to_name)?);
        nix::fcntl::renameat2(
            from.fd.as_fd(),
            from_name,
            self.fd.as_fd(),
            to_name,
            RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| io("move", &from.join(from_name), e))?;
        self.sync()?;
        from.sync()
    }

    /// Gives the regular file `name` to `uid:gid` with `fchown` on a
    /// descriptor opened without following links. Refuses a link, a
    /// non-regular file and a file with other hard links. `false` if there
    /// is no such file.
    pub fn chown_file(&self, name: &OsStr, uid: Uid, gid: Gid) -> Result<bool> {
        let Some(file) = self.open_read(name)? else {
            return Ok(false);
        };
        let path = self.join(name);
        let st = nix::sys::stat::fstat(file.as_fd()).map_err(|e| io("stat", &path, e))?;
        if st.st_nlink != 1 {
            return Err(SafeFsError::HardLinked {
                path,
                links: st.st_nlink as u64,
            });
        }
        if st.st_uid != uid.as_raw() || st.st_gid != gid.as_raw() {
            nix::unistd::fchown(file.as_fd(), Some(uid), Some(gid))
                .map_err(|e| io("change the owner of", &path, e))?;
        }
        Ok(true)
    }

    /// Makes renames and new names in the directory durable.
    pub fn sync(&self) -> Result<()> {
        nix::unistd::fsync(self.fd.as_fd()).map_err(|e| io("fsync", &self.path, e))
    }

    /// A new file under a fresh unpredictable name next to `name`
    /// (`.NAME.tmp.RANDOM`): `O_EXCL` makes creation fail on any existing
    /// name, link or not, and another name is tried.
    fn create_temp(&self, name: &OsStr, mode: u32) -> Result<(PathBuf, File)> {
        let mut last = None;
        for _ in 0..16 {
            let tmp = temp_name(name)?;
            match self.open_at(
                tmp.as_os_str(),
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                mode,
            ) {
                Ok(fd) => return Ok((tmp, File::from(fd))),
                Err(SafeFsError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    last = Some(tmp);
                }
                Err(e) => return Err(e),
            }
        }
        Err(io(
            "create a temporary file",
            &self.join(last.as_deref().unwrap_or(Path::new(name)).as_os_str()),
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ))
    }

    /// `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)` or, before Linux
    /// 5.6, `openat(O_NOFOLLOW)`; both with `O_CLOEXEC | O_NOFOLLOW`.
    fn open_at(&self, name: &OsStr, flags: OFlag, mode: u32) -> Result<OwnedFd> {
        let name = check_name(name)?;
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mode = Mode::from_bits_truncate(mode);
        let what = if flags.contains(OFlag::O_CREAT) {
            "create"
        } else {
            "open"
        };
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let how = OpenHow::new().flags(flags).mode(mode).resolve(
                ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
            match nix::fcntl::openat2(self.fd.as_fd(), name, how) {
                Ok(fd) => return Ok(fd),
                // Not there (old kernel), or refused by a seccomp filter
                // that predates it.
                Err(Errno::ENOSYS) | Err(Errno::EPERM) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(classify(&self.join(name), what, e, "file")),
            }
        }
        nix::fcntl::openat(self.fd.as_fd(), name, flags, mode)
            .map_err(|e| classify(&self.join(name), what, e, "file"))
    }

    /// `fd` as a file, if it is a regular one.
    fn regular(&self, name: &OsStr, fd: OwnedFd) -> Result<File> {
        let path = self.join(name);
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| io("stat", &path, e))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(SafeFsError::WrongType {
                path,
                expected: "regular file",
            });
        }
        let file = File::from(fd);
        // Back to blocking reads for the callers (O_NONBLOCK only kept a
        // FIFO from blocking the open).
        let fl = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| io("open", &path, e))?;
        let fl = OFlag::from_bits_truncate(fl) & !OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(fl))
            .map_err(|e| io("open", &path, e))?;
        Ok(file)
    }
}

/// A name must be one path component: `a/b`, `..` or `` would escape the
/// held directory (`openat2`'s RESOLVE_BENEATH would catch it; `openat`
/// on old kernels would not).
fn check_name(name: &OsStr) -> Result<&OsStr> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(SafeFsError::BadName { name: name.into() });
    }
    Ok(name)
}

#[cfg(test)]
thread_local! {
    /// Tests force the next temporary name to prove that a link planted at
    /// it is never written through.
    static FORCED_TEMP: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `.NAME.tmp.<16 hex digits from getrandom>`: a local attacker cannot
/// plant something at a name it cannot predict (`O_EXCL` would refuse it
/// anyway, but then every write would fail).
fn temp_name(name: &OsStr) -> Result<PathBuf> {
    #[cfg(test)]
    if let Some(t) = FORCED_TEMP.with(|f| f.borrow_mut().pop()) {
        return Ok(t);
    }
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer,
    // which lives across the call.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(io(
            "draw a temporary name for",
            Path::new(name),
            std::io::Error::last_os_error(),
        ));
    }
    let mut t = std::ffi::OsString::from(".");
    t.push(name);
    t.push(format!(".tmp.{:016x}", u64::from_ne_bytes(bytes)));
    Ok(PathBuf::from(t))
}

#[cfg(test)]
mod tests;
