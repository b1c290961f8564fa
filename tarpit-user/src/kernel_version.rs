//! The oldest kernel tarpit runs on, checked when the agent starts.
//!
//! Without the check, an old kernel shows up as an obscure verifier or
//! `EINVAL` error halfway through loading. What the kernel side needs:
//!
//! | feature | since |
//! | --- | --- |
//! | BPF ring buffer (events), `bpf_ktime_get_boot_ns` (expiry clock) | 5.8 |
//! | sk_lookup programs, XDP attached through `bpf_link` | 5.9 |
//! | socket-local storage, LRU hash, LPM trie, cgroup `bpf_link` | <= 5.7 |
//! | tc through TCX (below: netlink tc with a clsact qdisc) | 6.6, optional |
//!
//! So 5.9 is the technical floor; 5.10 is the oldest long-term kernel with
//! all of it (Debian 11) and the oldest the test suite boots
//! (`cargo xtask test --kernel 5.10`), so it is the supported minimum.
//! Vendor kernels with backports (RHEL's 4.18) may work: the check can be
//! skipped with `TARPIT_SKIP_KERNEL_CHECK=1`.
use std::fmt;

use tracing::warn;

/// The oldest supported kernel, (major, minor).
pub const MIN_KERNEL: KernelVersion = KernelVersion {
    major: 5,
    minor: 10,
};

/// Environment variable that turns the refusal into a warning.
pub const SKIP_ENV: &str = "TARPIT_SKIP_KERNEL_CHECK";

/// A kernel's major.minor, from its release string (`6.1.0-56-amd64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl KernelVersion {
    /// Parses the leading `major.minor` of a release string; distributions
    /// append anything after it (`5.15.0-91-generic`, `6.18.44-fc-v657`,
    /// `4.18.0-513.el8.x86_64`).
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let mut parts = release.trim().split(['.', '-', '+', '_']);
        let major = parts.next()?.parse().ok()?;
        let minor_part = parts.next()?;
        let digits: String = minor_part
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let minor = digits.parse().ok()?;
        Some(KernelVersion { major, minor })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelCheckError {
    #[error(
        "kernel {release} is too old: tarpit needs Linux {MIN_KERNEL} or newer \
         (BPF ring buffer and boot-time clock since 5.8, sk_lookup and XDP links since 5.9; \
         {MIN_KERNEL} is the oldest tested). Set {SKIP_ENV}=1 to try anyway on a kernel \
         with backported BPF features"
    )]
    TooOld { release: String },
}

/// The running kernel's release string (`uname -r`).
fn running_release() -> Option<String> {
    // SAFETY: utsname is plain old data; uname fills it and NUL-terminates
    // every field on success.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return None;
        }
        let release = std::ffi::CStr::from_ptr(u.release.as_ptr());
        Some(release.to_string_lossy().into_owned())
    }
}

/// Refuses to start on a kernel older than [`MIN_KERNEL`]. A release that
/// cannot be parsed, or `TARPIT_SKIP_KERNEL_CHECK=1`, only warns: loading
/// then says what is missing.
pub fn check_min_kernel() -> Result<(), KernelCheckError> {
    let skip = std::env::var(SKIP_ENV).is_ok_and(|v| v == "1");
    check_release(running_release().as_deref(), skip)
}

fn check_release(release: Option<&str>, skip: bool) -> Result<(), KernelCheckError> {
    let Some(release) = release else {
        warn!("cannot read the kernel release; assuming Linux {MIN_KERNEL} or newer");
        return Ok(());
    };
    match KernelVersion::parse(release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        Some(_) if skip => {
            warn!(
                release,
                "kernel older than {MIN_KERNEL}; {SKIP_ENV}=1 given, trying anyway"
            );
            Ok(())
        }
        Some(_) => Err(KernelCheckError::TooOld {
            release: release.to_string(),
        }),
        None => {
            warn!(
                release,
                "cannot parse the kernel release; assuming Linux {MIN_KERNEL} or newer"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32) -> Option<KernelVersion> {
        Some(KernelVersion { major, minor })
    }

    #[test]
    fn parses_distribution_release_strings() {
        assert_eq!(KernelVersion::parse("6.1.0-56-amd64"), v(6, 1));
        assert_eq!(KernelVersion::parse("6.12.117+deb12-amd64"), v(6, 12));
        assert_eq!(KernelVersion::parse("5.10.0-46-amd64"), v(5, 10));
        assert_eq!(KernelVersion::parse("6.18.44-fc-v657"), v(6, 18));
        assert_eq!(KernelVersion::parse("5.15.0-91-generic"), v(5, 15));
        assert_eq!(KernelVersion::parse("4.18.0-513.el8.x86_64"), v(4, 18));
        assert_eq!(KernelVersion::parse("6.9-rc1"), v(6, 9));
        assert_eq!(KernelVersion::parse("6.8rc2"), v(6, 8));
        assert_eq!(KernelVersion::parse("weird"), None);
        assert_eq!(KernelVersion::parse("6"), None);
        assert_eq!(KernelVersion::parse(""), None);
    }

    #[test]
    fn orders_by_major_then_minor() {
        assert!(v(5, 10) > v(5, 9));
        assert!(v(6, 1) > v(5, 15));
        assert!(v(5, 10) < v(6, 0));
    }

    #[test]
    fn refuses_kernels_below_the_minimum_with_the_reason() {
        let err = check_release(Some("5.4.0-150-generic"), false).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("5.4.0-150-generic"), "{msg}");
        assert!(msg.contains("5.10 or newer"), "{msg}");
        assert!(msg.contains(SKIP_ENV), "{msg}");
        assert!(check_release(Some("5.9.16"), false).is_err());
        assert!(check_release(Some("4.18.0-513.el8.x86_64"), false).is_err());
    }

    #[test]
    fn accepts_supported_kernels() {
        for r in [
            "5.10.0-46-amd64",
            "6.1.0-56-amd64",
            "6.12.117+deb12-amd64",
            "6.18.44-fc-v657",
            "7.0.1",
        ] {
            assert!(check_release(Some(r), false).is_ok(), "{r}");
        }
    }

    #[test]
    fn skip_and_unreadable_releases_only_warn() {
        assert!(check_release(Some("4.18.0-513.el8.x86_64"), true).is_ok());
        assert!(check_release(Some("not-a-version"), false).is_ok());
        assert!(check_release(None, false).is_ok());
    }

    #[test]
    fn the_running_kernel_is_readable() {
        let r = running_release().expect("uname");
        assert!(KernelVersion::parse(&r).is_some(), "{r}");
    }
}
