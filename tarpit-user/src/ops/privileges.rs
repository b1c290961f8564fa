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
//! Before the switch, root hands the pins and the greylist's directory to
//! the user ([`handover`]).
//!
//! Not kept: CAP_SYS_ADMIN (mounting bpffs, entering `kernel.netns`, looking
//! up programs by id), CAP_NET_BIND_SERVICE (the ports are bound already),
//! CAP_SETUID/SETGID/SETPCAP/CHOWN (used here, once), CAP_PERFMON. The
//! bounding set shrinks to the kept set too, and `no_new_privs` is set, so
//! no later exec can win anything back. Changing `listen.addrs` or
//! `kernel.interfaces` therefore needs a restart, never a reload.
//!
//! Capabilities belong to threads, not processes: `capset(2)` changes only
//! the calling thread, and a thread is born with its parent's sets. So the
//! drop runs while the process has one thread, before the async runtime
//! starts its workers, which then inherit the reduced sets (`tarpit run`
//! binds, loads and attaches without a runtime for that reason). The sets
//! are changed with the `caps` crate, the ids with nix; a drop asked for
//! while other threads run is refused rather than leave one of them
//! privileged, and every thread is checked in `/proc/self/task` afterwards.
mod handover;
mod proc_status;

use anyhow::{Context, Result, bail};
use nix::unistd::{Gid, Group, Uid, User};
use tracing::info;

use crate::config::{Config, GreylistMode};
pub use handover::{migrate_store, prepare_greylist_dir};
pub use proc_status::{CapSet, ProcStatus};

// The kernel's numbers (capability.h), as tests and /proc masks use them.
pub const CAP_CHOWN: u32 = 0;
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_NET_BIND_SERVICE: u32 = 10;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

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
/// Call after binding, loading and attaching, before serving any client
/// and before any other thread starts (refused otherwise).
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
    // Refused before anything is handed over: a drop that cannot reach
    // every thread changes nothing.
    single_thread()?;
    let keep = needed(config);
    // The agent reopens pinned maps by path after the drop (metrics read
    // map sizes, reloads resync lists) and, with detach_on_exit, unlinks
    // them at exit: both need the pins and their directory to be its own.
    handover::give_pins(&config.kernel.pin_path, &account)?;
    handover::reclaim_state_dir(&config.state.file, &account)?;
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

/// Fails unless the calling thread is the process's only one (counted in
/// `/proc/self/task`).
fn single_thread() -> Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")
        .context("cannot list /proc/self/task")?
        .count();
    if threads != 1 {
        bail!(
            "cannot drop privileges: {threads} threads run, and capabilities change only for \
             the thread that drops them; the drop must come before any thread starts"
        );
    }
    Ok(())
}

/// Becomes `account` keeping `keep`, on the calling thread, which must be
/// the only one.
fn switch(account: &Account, keep: CapSet) -> Result<()> {
    let uid = Uid::current();
    if !uid.is_root() && uid != account.uid {
        bail!(
            "daemon.user = {:?} needs the agent to start as root (it runs as uid {uid})",
            account.name
        );
    }
    single_thread()?;
    let failed =
        |step: &'static str| move |e: caps::errors::CapsError| anyhow::anyhow!("{step}: {e}");
    // The bounding set first: dropping needs CAP_SETPCAP, which the uid
    // change takes away.
    let bounding = caps::read(None, caps::CapSet::Bounding).map_err(failed("bounding set"))?;
    let want = keep.to_caps();
    for cap in bounding.difference(&want) {
        caps::drop(None, caps::CapSet::Bounding, *cap).map_err(failed("PR_CAPBSET_DROP"))?;
    }
    // Keep the permitted set across the uid change, then only `keep`.
    caps::securebits::set_keepcaps(true).map_err(failed("PR_SET_KEEPCAPS"))?;
    nix::unistd::setgroups(&[account.gid]).context("cannot drop privileges: setgroups")?;
    nix::unistd::setresgid(account.gid, account.gid, account.gid)
        .context("cannot drop privileges: setresgid")?;
    nix::unistd::setresuid(account.uid, account.uid, account.uid)
        .context("cannot drop privileges: setresuid")?;
    caps::securebits::set_keepcaps(false).map_err(failed("PR_SET_KEEPCAPS"))?;
    caps::set(None, caps::CapSet::Permitted, &want).map_err(failed("capset permitted"))?;
    caps::set(None, caps::CapSet::Effective, &want).map_err(failed("capset effective"))?;
    caps::clear(None, caps::CapSet::Inheritable).map_err(failed("capset inheritable"))?;
    // Ambient capabilities would survive an exec; kernels before 4.3 have
    // none and refuse the call.
    let _ = caps::clear(None, caps::CapSet::Ambient);
    nix::sys::prctl::set_no_new_privs().context("cannot drop privileges: no_new_privs")?;
    // The point of no return, checked: root must be out of reach.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        bail!("the agent could become root again after dropping privileges");
    }
    Ok(())
}

/// Every thread of this process must now be `account` with at most `keep`
/// (permitted and bounding: a capability the `caps` crate does not know
/// would stay in the bounding set, and is caught here).
fn check_threads(account: &Account, keep: CapSet) -> Result<()> {
    for entry in std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")? {
        let path = entry?.path().join("status");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // the thread has exited
        };
        let st = ProcStatus::parse(&text)?;
        if st.uid != [account.uid.as_raw(); 4]
            || !st.cap_prm.is_subset_of(keep)
            || !st.cap_bnd.is_subset_of(keep)
        {
            bail!(
                "thread {} kept privileges after the drop (uids {:?}, permitted {}, bounding {})",
                path.display(),
                st.uid,
                st.cap_prm.names(),
                st.cap_bnd.names()
            );
        }
    }
    Ok(())
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

    #[test]
    fn a_drop_with_other_threads_running_is_refused() {
        // The unit tests run on several threads, so the refusal shows here
        // without changing anything (the uid check comes first for others).
        if !Uid::current().is_root() {
            return;
        }
        let account = resolve("4242", Some("4242")).unwrap();
        let _other = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(2)));
        let e = switch(&account, CapSet::of(&[CAP_BPF])).unwrap_err();
        assert!(e.to_string().contains("threads run"), "{e}");
        assert!(Uid::current().is_root(), "nothing changed");
    }
}
