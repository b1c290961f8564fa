//! An XDP program that passes everything, for the client-side veth.
//!
//! A veth in native XDP mode delivers XDP_TX frames to its peer only when
//! the peer has an XDP program of its own (its receive ring exists only
//! then). The kernel hold answers with XDP_TX, so its tests give the
//! client veth this two-instruction program (`r0 = XDP_PASS; exit`),
//! loaded with bpf(2) directly: no object file needed, so the bench can
//! use it before the eBPF object is built. The link lives as
//! long as the returned descriptor (and goes with the namespace anyway).
//!
//! The kernel-hold tests and the bench's kernel-hold scenario use it.

use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_PASS: u32 = 2;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> Result<OwnedFd> {
    // SAFETY: bpf(2) with a zeroed, large enough attribute union.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        bail!("bpf({cmd}): {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put(attr: &mut [u8; 128], at: usize, bytes: &[u8]) {
    attr[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Attaches a pass-everything XDP program to `ifname` in namespace `ns`;
/// detached when the descriptor is dropped.
pub fn attach(ns: &str, ifname: &str) -> Result<OwnedFd> {
    let ifname = ifname.to_string();
    crate::netns::in_ns(ns, move || -> Result<OwnedFd> {
        // mov64 r0, XDP_PASS ; exit
        let mut insns = [0u8; 16];
        insns[0] = 0xb7;
        insns[4..8].copy_from_slice(&XDP_PASS.to_le_bytes());
        insns[8] = 0x95;
        let license = b"GPL\0";
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &BPF_PROG_TYPE_XDP.to_ne_bytes());
        put(&mut attr, 4, &2u32.to_ne_bytes());
        put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 48, b"tarpit_test_pas");
        put(&mut attr, 68, &BPF_XDP.to_ne_bytes());
        let prog = bpf(BPF_PROG_LOAD, &mut attr)?;
        let name = std::ffi::CString::new(ifname.clone())?;
        // SAFETY: a NUL-terminated interface name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            bail!("no interface {ifname}");
        }
        let mut attr = [0u8; 128];
        let pfd = std::os::fd::AsRawFd::as_raw_fd(&prog) as u32;
        put(&mut attr, 0, &pfd.to_ne_bytes());
        put(&mut attr, 4, &index.to_ne_bytes());
        put(&mut attr, 8, &BPF_XDP.to_ne_bytes());
        bpf(BPF_LINK_CREATE, &mut attr)
    })?
}
