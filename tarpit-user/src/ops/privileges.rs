//! Least privilege: once the ports are bound and the kernel programs are
//! loaded, attached and their maps open, the agent becomes an unprivileged
//! user (`daemon.user`) holding only the capabilities it still uses.
//!
//! Kept, and why:
//! - `CAP_BPF`: the agent keeps writing maps at run time (allow and block
//!   entries, authenticated addresses, settings on reload) through file
//!   descriptors it opened as root. Since Linux 6.5 such updates need no
//!   capability, but older kernels with `kernel.unprivileged_bpf_disabled`
//!   set (Debian's default) refuse every bpf() call without it.
//! - `CAP_NET_ADMIN`, only with `kernel.detach_on_exit = true`: taking
//!   programs attached through netlink (XDP below 5.9, tc on a clsact
//!   qdisc below 6.6) off the interfaces at exit.
//!
//! The pin directory and the pins in it are handed to the user: the agent
//! reopens maps by path after the drop (bpffs checks file permissions,
//! which no capability the agent keeps overrides), and removes them at
//! exit with `detach_on_exit`.
//!
//! With greylisting on, the store's own directory (and the store in it) is
//! handed over too: the agent opens the store after the drop and compacts
//! it by writing a new file and renaming it. That directory is never the
//! state directory (the config check refuses it, and so does the start, by
//! device and inode): root writes the state file, and must never write
//! where the agent's user can plant links. Every handover is `fchown` on a
//! descriptor opened without following links ([`crate::safe_fs`]).
//!
//! Not kept: CAP_SYS_ADMIN (mounting bpffs, entering `kernel.netns`, looking
//! up programs by id), CAP_NET_BIND_SERVICE (the ports are bound already),
//! CAP_SETUID/SETGID/SETPCAP/CHOWN (used here, once), CAP_PERFMON. The
//! bounding set shrinks to the kept set too, and `no_new_privs` is set, so
//! no later exec can win anything back. Changing `listen.addrs` or
//! `kernel.interfaces` therefore needs a restart, never a reload.
//!
//! Capabilities belong to threads, not processes: `capset(2)` changes only
//! the calling thread. So the drop must run before the async runtime starts
//! its worker threads, which then inherit the reduced sets. setuid/setgid
//! go through glibc, which applies them to every thread, and a thread
//! without `PR_SET_KEEPCAPS` loses all capabilities when its uids leave 0,
//! so a thread started earlier ends up with less, never more; the drop
//! checks every thread in `/proc/self/task` afterwards and fails rather
//! than run with a privileged thread left over.
use std::ffi::OsStr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use nix::sys::stat::SFlag;
use nix::unistd::{Gid, Group, Uid, User};
use tracing::{info, warn};

use crate::config::{Config, GreylistMode};
use crate::safe_fs::SafeDir;

pub const CAP_CHOWN: u32 = 0;
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_NET_BIND_SERVICE: u32 = 10;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

const NAMES: &[(u32, &str)] = &[
    (CAP_CHOWN, "CAP_CHOWN"),
    (CAP_SETGID, "CAP_SETGID"),
    (CAP_SETUID, "CAP_SETUID"),
    (CAP_SETPCAP, "CAP_SETPCAP"),
    (CAP_NET_BIND_SERVICE, "CAP_NET_BIND_SERVICE"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    (CAP_PERFMON, "CAP_PERFMON"),
    (CAP_BPF, "CAP_BPF"),
];

/// A set of capabilities as the kernel's 64-bit mask (`CapEff:` etc. in
/// `/proc/PID/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn of(caps: &[u32]) -> CapSet {
        CapSet(caps.iter().fold(0, |m, c| m | (1u64 << c)))
    }

    pub fn contains(self, cap: u32) -> bool {
        self.0 & (1u64 << cap) != 0
    }

    pub fn is_subset_of(self, other: CapSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// Names, for logs and errors ("CAP_BPF,CAP_NET_ADMIN"; "none").
    pub fn names(self) -> String {
        if self.0 == 0 {
            return "none".into();
        }
        (0..64)
            .filter(|c| self.contains(*c))
            .map(|c| {
                NAMES
                    .iter()
                    .find(|(n, _)| *n == c)
                    .map_or_else(|| format!("cap_{c}"), |(_, s)| (*s).to_string())
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The capabilities the agent keeps after the drop (see the module doc).
pub fn needed(config: &Config) -> CapSet {
    if config.kernel.detach_on_exit {
        CapSet::of(&[CAP_BPF, CAP_NET_ADMIN])
    } else {
        CapSet::of(&[CAP_BPF])
    }
}

/// The user and group to become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Looks `daemon.user` / `daemon.group` up (names or numeric ids).
pub fn resolve(user: &str, group: Option<&str>) -> Result<Account> {
    let found = match user.parse::<u32>() {
        Ok(id) => User::from_uid(Uid::from_raw(id)),
        Err(_) => User::from_name(user),
    }
    .with_context(|| format!("daemon.user: cannot look up user {user:?}"))?;
    let (name, uid, primary) = match (found, user.parse::<u32>()) {
        (Some(u), _) => (u.name, u.uid, Some(u.gid)),
        // a numeric id without a passwd entry is still a valid identity
        (None, Ok(id)) => (id.to_string(), Uid::from_raw(id), None),
        (None, Err(_)) => bail!(
            "daemon.user: no user {user:?} on this system (create it, e.g. with \
             systemd-sysusers and the shipped tarpit.sysusers)"
        ),
    };
    if uid.is_root() {
        bail!("daemon.user: {user:?} is root; name an unprivileged user");
    }
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(id) => Gid::from_raw(id),
            Err(_) => {
                Group::from_name(g)
                    .with_context(|| format!("daemon.group: cannot look up group {g:?}"))?
                    .with_context(|| format!("daemon.group: no group {g:?} on this system"))?
                    .gid
            }
        },
        None => primary.with_context(|| {
            format!("daemon.user: uid {user} has no passwd entry; set daemon.group")
        })?,
    };
    if gid.as_raw() == 0 {
        bail!("daemon.group: the root group would keep access to root's files; name another");
    }
    Ok(Account { name, uid, gid })
}

/// What the drop did, for the log and for tests.
#[derive(Debug, Clone)]
pub struct Dropped {
    pub account: Account,
    pub kept: CapSet,
}

/// Switches to `daemon.user` if one is set; does nothing otherwise.
/// Call after binding, loading and attaching, before serving any client.
/// Prepares the greylist's directory first, also without a user (the move
/// from the old default location and the link checks apply to root too).
pub fn drop_privileges(config: &Config) -> Result<Option<Dropped>> {
    let account = config
        .daemon
        .user
        .as_deref()
        .map(|user| resolve(user, config.daemon.group.as_deref()))
        .transpose()?;
    if config.greylist.mode != GreylistMode::Off {
        prepare_greylist_dir(config, account.as_ref())?;
    }
    let Some(account) = account else {
        if Uid::effective().is_root() {
            tracing::warn!(
                target: "tarpit::ops",
                "running as root with every capability: set daemon.user to drop them"
            );
        }
        return Ok(None);
    };
    let keep = needed(config);
    // The agent reopens pinned maps by path after the drop (metrics read
    // map sizes, reloads resync lists) and, with detach_on_exit, unlinks
    // them at exit: both need the pins and their directory to be its own.
    give_pins(&config.kernel.pin_path, &account)?;
    reclaim_state_dir(&config.state.file, &account)?;
    switch(&account, keep)?;
    check_threads(&account, keep)?;
    info!(
        target: "tarpit::ops",
        user = %account.name,
        uid = account.uid.as_raw(),
        gid = account.gid.as_raw(),
        capabilities = %keep.names(),
        "privileges dropped"
    );
    Ok(Some(Dropped {
        account,
        kept: keep,
    }))
}

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
fn reclaim_state_dir(state_file: &Path, account: &Account) -> Result<()> {
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
fn give_pins(root: &Path, account: &Account) -> Result<()> {
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

fn switch(account: &Account, keep: CapSet) -> Result<()> {
    let uid = Uid::current();
    if !uid.is_root() && uid != account.uid {
        bail!(
            "daemon.user = {:?} needs the agent to start as root (it runs as uid {uid})",
            account.name
        );
    }
    all_threads::switch(account.uid.as_raw(), account.gid.as_raw(), keep, last_cap())?;
    // The point of no return, checked: root must be out of reach.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        bail!("the agent could become root again after dropping privileges");
    }
    Ok(())
}

/// The switch on every thread of the process, the way libpsx does it:
/// each thread runs the same raw syscalls in a signal handler, because
/// capabilities, the bounding set, keep-caps and no_new_privs are all
/// per-thread. glibc's setuid() would reach every thread too, but would
/// leave the other threads with no capability at all, and a tokio worker
/// that writes a map on an old kernel needs CAP_BPF.
mod all_threads {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};

    use super::CapSet;

    static UID: AtomicU32 = AtomicU32::new(0);
    static GID: AtomicU32 = AtomicU32::new(0);
    static KEEP: AtomicU64 = AtomicU64::new(0);
    static LAST_CAP: AtomicU32 = AtomicU32::new(0);
    static DONE: AtomicUsize = AtomicUsize::new(0);
    /// First failure: step << 32 | errno; 0 = none.
    static FAILED: AtomicU64 = AtomicU64::new(0);
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    const STEPS: [&str; 7] = [
        "-",
        "PR_CAPBSET_DROP",
        "PR_SET_KEEPCAPS",
        "setgroups",
        "setresgid",
        "setresuid",
        "capset",
    ];

    fn errno() -> i32 {
        // SAFETY: errno is thread-local and always readable.
        unsafe { *libc::__errno_location() }
    }

    /// The switch for the calling thread, in raw syscalls only: no
    /// allocation, no lock, so that it is safe in a signal handler.
    /// Idempotent: a thread born from an already switched one only gets
    /// its sets re-applied.
    fn this_thread() -> Result<(), (u32, i32)> {
        let uid = UID.load(SeqCst);
        let gid = GID.load(SeqCst);
        let keep = KEEP.load(SeqCst);
        let last = LAST_CAP.load(SeqCst);
        let (mut r, mut e, mut sv) = (0 as libc::uid_t, 0 as libc::uid_t, 0 as libc::uid_t);
        // SAFETY: getresuid writes three ids into the given locations.
        unsafe { libc::getresuid(&mut r, &mut e, &mut sv) };
        let switched = r == uid && e == uid && sv == uid;
        // SAFETY (all blocks below): prctl and raw syscalls with integer
        // arguments or pointers to locals that outlive the call.
        unsafe {
            if !switched {
                // The bounding set first: dropping needs CAP_SETPCAP, which
                // the uid change takes away.
                for cap in 0..=last {
                    if keep & (1u64 << cap) == 0
                        && libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) == 1
                        && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                    {
                        return Err((1, errno()));
                    }
                }
                // Keep the permitted set across the uid change.
                if libc::prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err((2, errno()));
                }
                let groups = [gid as libc::gid_t];
                if libc::syscall(libc::SYS_setgroups, 1 as libc::c_long, groups.as_ptr()) != 0 {
                    return Err((3, errno()));
                }
                if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                    return Err((4, errno()));
                }
                if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                    return Err((5, errno()));
                }
                if libc::prctl(libc::PR_SET_KEEPCAPS, 0 as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err((2, errno()));
                }
            }
            // permitted = effective = keep, inheritable = none
            let mut header = super::CapHeader {
                version: super::LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let (lo, hi) = (keep as u32, (keep >> 32) as u32);
            let data = [
                super::CapData {
                    effective: lo,
                    permitted: lo,
                    inheritable: 0,
                },
                super::CapData {
                    effective: hi,
                    permitted: hi,
                    inheritable: 0,
                },
            ];
            if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
                return Err((6, errno()));
            }
            // Ambient capabilities would survive an exec; kernels before
            // 4.3 have none and refuse the call.
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            );
            // Never fails on kernels >= 3.5, which is all we run on.
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0);
        }
        Ok(())
    }

    fn record(r: Result<(), (u32, i32)>) {
        if let Err((step, errno)) = r {
            let _ = FAILED.compare_exchange(
                0,
                (u64::from(step) << 32) | errno as u32 as u64,
                SeqCst,
                SeqCst,
            );
        }
    }

    extern "C" fn on_signal(_: libc::c_int) {
        let saved = errno();
        record(this_thread());
        DONE.fetch_add(1, SeqCst);
        // SAFETY: restoring the interrupted code's errno.
        unsafe { *libc::__errno_location() = saved };
    }

    fn tids() -> Result<Vec<i32>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")? {
            if let Some(tid) = e?.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(tid);
            }
        }
        Ok(out)
    }

    pub fn switch(uid: u32, gid: u32, keep: CapSet, last_cap: u32) -> Result<()> {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        UID.store(uid, SeqCst);
        GID.store(gid, SeqCst);
        KEEP.store(keep.0, SeqCst);
        LAST_CAP.store(last_cap, SeqCst);
        FAILED.store(0, SeqCst);
        let sig = libc::SIGRTMAX() - 3;
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask";
        // the handler only runs async-signal-safe code.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, &mut old) != 0 {
                return Err(std::io::Error::last_os_error()).context("sigaction");
            }
        }
        let result = broadcast(sig);
        // SAFETY: puts back whatever was there before.
        unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
        result?;
        let failed = FAILED.load(SeqCst);
        if failed != 0 {
            let step = STEPS.get((failed >> 32) as usize).copied().unwrap_or("?");
            let err = std::io::Error::from_raw_os_error((failed & 0xffff_ffff) as i32);
            bail!("cannot drop privileges: {step}: {err}");
        }
        Ok(())
    }

    /// Signals every other thread, then switches this one; again for any
    /// thread born meanwhile, until a round finds none.
    fn broadcast(sig: libc::c_int) -> Result<()> {
        // SAFETY: no preconditions.
        let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
        let mut handled: HashSet<i32> = HashSet::new();
        for _round in 0..20 {
            let fresh: Vec<i32> = tids()?
                .into_iter()
                .filter(|t| !handled.contains(t))
                .collect();
            if fresh.is_empty() {
                return Ok(());
            }
            DONE.store(0, SeqCst);
            let mut sent = 0;
            for &tid in &fresh {
                handled.insert(tid);
                if tid == me {
                    continue;
                }
                // SAFETY: tgkill to a thread of our own process.
                if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) } == 0 {
                    sent += 1;
                } // else ESRCH: the thread ended meanwhile
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while DONE.load(SeqCst) < sent {
                if Instant::now() > deadline {
                    bail!(
                        "cannot drop privileges: {} of {sent} threads did not answer",
                        sent - DONE.load(SeqCst)
                    );
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if fresh.contains(&me) {
                record(this_thread());
            }
        }
        bail!("cannot drop privileges: threads keep being created")
    }
}

/// Every thread of this process must now be `account` with at most `keep`.
fn check_threads(account: &Account, keep: CapSet) -> Result<()> {
    for entry in std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")? {
        let path = entry?.path().join("status");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // the thread has exited
        };
        let st = ProcStatus::parse(&text)?;
        if st.uid != [account.uid.as_raw(); 4] || !st.cap_prm.is_subset_of(keep) {
            bail!(
                "thread {} kept privileges after the drop (uids {:?}, permitted {})",
                path.display(),
                st.uid,
                st.cap_prm.names()
            );
        }
    }
    Ok(())
}

/// The identity and capability lines of `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStatus {
    /// Real, effective, saved, filesystem.
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inh: CapSet,
    pub cap_prm: CapSet,
    pub cap_eff: CapSet,
    pub cap_bnd: CapSet,
    pub cap_amb: CapSet,
    pub no_new_privs: bool,
}

impl ProcStatus {
    pub fn read(pid: u32) -> Result<ProcStatus> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        ProcStatus::parse(&text)
    }

    pub fn parse(text: &str) -> Result<ProcStatus> {
        let field = |name: &str| -> Result<&str> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .with_context(|| format!("no {name} line in /proc status"))
        };
        let ids = |name: &str| -> Result<[u32; 4]> {
            let v: Vec<u32> = field(name)?
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("bad {name} line"))?;
            v.try_into()
                .map_err(|_| anyhow::anyhow!("{name} line has not 4 ids"))
        };
        let caps = |name: &str| -> Result<CapSet> {
            let hex = field(name)?;
            u64::from_str_radix(hex, 16)
                .map(CapSet)
                .with_context(|| format!("bad {name} line {hex:?}"))
        };
        Ok(ProcStatus {
            uid: ids("Uid")?,
            gid: ids("Gid")?,
            groups: field("Groups")?
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .context("bad Groups line")?,
            cap_inh: caps("CapInh")?,
            cap_prm: caps("CapPrm")?,
            cap_eff: caps("CapEff")?,
            cap_bnd: caps("CapBnd")?,
            cap_amb: caps("CapAmb").unwrap_or_default(),
            no_new_privs: field("NoNewPrivs").map(|v| v == "1").unwrap_or(false),
        })
    }
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(CAP_BPF + 1)
        .min(63)
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// (effective, permitted, inheritable) of the calling thread.
#[cfg(test)]
fn capget() -> Result<(u64, u64, u64)> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data are the layout capget(2) documents for
    // version 3 (two data structs), and live across the call.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("capget");
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok((
        join(|d| d.effective),
        join(|d| d.permitted),
        join(|d| d.inheritable),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_set_follows_detach_on_exit() {
        let mut c = Config::default();
        c.kernel.detach_on_exit = false;
        assert_eq!(needed(&c), CapSet(1 << 39));
        assert_eq!(needed(&c).names(), "CAP_BPF");
        c.kernel.detach_on_exit = true;
        assert_eq!(needed(&c), CapSet((1 << 39) | (1 << 12)));
        assert_eq!(needed(&c).names(), "CAP_NET_ADMIN,CAP_BPF");
        assert_eq!(CapSet(0).names(), "none");
    }

    #[test]
    fn parses_proc_status() {
        let text = "Name:\ttarpit\nUid:\t65534\t65534\t65534\t65534\n\
                    Gid:\t65534\t65534\t65534\t65534\nGroups:\t65534 \n\
                    CapInh:\t0000000000000000\nCapPrm:\t0000008000000000\n\
                    CapEff:\t0000008000000000\nCapBnd:\t0000008000000000\n\
                    CapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        let st = ProcStatus::parse(text).unwrap();
        assert_eq!(st.uid, [65534; 4]);
        assert_eq!(st.groups, vec![65534]);
        assert_eq!(st.cap_eff, CapSet::of(&[CAP_BPF]));
        assert!(st.no_new_privs);
        // our own status parses too
        let me = ProcStatus::read(std::process::id()).unwrap();
        assert_eq!(me.uid[0], Uid::current().as_raw());
    }

    #[test]
    fn capget_matches_proc() {
        let (eff, prm, _) = capget().unwrap();
        let st = ProcStatus::read(std::process::id()).unwrap();
        // the test thread is not the main thread, but threads are born
        // with their parent's sets and tests change none of them
        assert_eq!(CapSet(prm), st.cap_prm);
        assert_eq!(CapSet(eff), st.cap_eff);
    }

    #[test]
    fn resolve_users() {
        let a = resolve("nobody", None).unwrap();
        assert_eq!(a.uid.as_raw(), 65534);
        assert!(
            resolve("root", None)
                .unwrap_err()
                .to_string()
                .contains("root")
        );
        let e = resolve("no-such-user-tarpit", None).unwrap_err();
        assert!(e.to_string().contains("no user"), "{e}");
        let e = resolve("nobody", Some("no-such-group-tarpit")).unwrap_err();
        assert!(e.to_string().contains("no group"), "{e:#}");
        let e = resolve("nobody", Some("0")).unwrap_err();
        assert!(e.to_string().contains("root group"), "{e}");
        let a = resolve("4242", Some("4242")).unwrap();
        assert_eq!((a.uid.as_raw(), a.gid.as_raw()), (4242, 4242));
    }

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
