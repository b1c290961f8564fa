//! Looking an address up in one of the agent's pinned LPM tries (the
//! kernel block lists), straight through bpf(2): one syscall of a few
//! microseconds per look-up, so a poll loop can watch for a block to
//! appear with a resolution of its own sleep, not of a process start
//! (`tarpit block list` or bpftool take milliseconds each).
//!
//! The key is tarpit's LPM key (tarpit-common `lists`): a host-order u32
//! prefix length, then the 16-byte address, IPv4 mapped. A look-up with
//! the full /128 finds any entry that covers the address.
use std::ffi::CString;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;
/// Room for the value the kernel copies out: a list entry (tarpit-common
/// `ListEntry`) is 32 bytes; more room costs nothing and a larger value
/// of a later layout could never write past the buffer.
const VALUE_BYTES: usize = 256;

/// An open pinned map.
pub struct PinnedLpm {
    fd: OwnedFd,
}

impl PinnedLpm {
    pub fn open(pin: &Path) -> Result<PinnedLpm> {
        let path = CString::new(pin.as_os_str().as_bytes())
            .with_context(|| format!("bad pin path {}", pin.display()))?;
        // union bpf_attr { struct { __aligned_u64 pathname; __u32 bpf_fd;
        // __u32 file_flags; ... } obj; ... }
        let mut attr = [0u8; 128];
        attr[..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
        // SAFETY: pathname points at a NUL-terminated string alive for
        // the call.
        let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) };
        if fd < 0 {
            bail!(
                "cannot open the pinned map {}: {}",
                pin.display(),
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the kernel returned a new fd that we own.
        Ok(PinnedLpm {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// Does an entry of the trie cover `addr`?
    pub fn covers(&self, addr: IpAddr) -> Result<bool> {
        let mut key = [0u8; 20];
        key[..4].copy_from_slice(&128u32.to_ne_bytes());
        let octets = match addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        key[4..].copy_from_slice(&octets);
        let mut value = [0u8; VALUE_BYTES];
        // struct { __u32 map_fd; (pad) __aligned_u64 key; __aligned_u64
        // value; __u64 flags; }
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&(self.fd.as_raw_fd() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(key.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(value.as_mut_ptr() as u64).to_ne_bytes());
        // SAFETY: key and value point at buffers of at least the map's
        // key and value sizes, alive for the call.
        let r = unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(false);
        }
        bail!("map look-up failed: {e}")
    }
}

/// bpf(2) with a zeroed attr of the documented size (the kernel checks
/// that bytes past the command's fields are zero).
///
/// # Safety
/// Every pointer the command's fields hold must be valid for the call.
unsafe fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> libc::c_long {
    // SAFETY: the caller vouches for the pointers inside attr; attr itself
    // is a live buffer of the length given.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    }
}
