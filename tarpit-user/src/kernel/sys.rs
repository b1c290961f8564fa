//! The few system calls aya 0.14 does not offer: opening a pinned link as
//! a plain fd, swapping the program behind a link in place
//! (`BPF_LINK_UPDATE`, for XDP, TCX and cgroup links alike) and deleting a
//! clsact qdisc over rtnetlink.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// bpf(2) with a zeroed attribute block of the kernel's maximal size we use.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: attr is a valid, zero-padded buffer of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned BPF object (here: a link) by path.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in pin path"))?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64; // pathname; bpf_fd and file_flags stay 0
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically makes `link` run `prog` instead of its current program.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 16];
    // struct { u32 link_fd; u32 new_prog_fd; u32 flags; u32 old_prog_fd; }
    attr[0] = (link.as_raw_fd() as u32 as u64) | ((prog.as_raw_fd() as u32 as u64) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Detaches a link from its hook now (Linux >= 5.9), while it still
/// exists as an object: unpinning alone releases it from a work queue, a
/// moment later.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u32 as u64;
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

const RTM_DELQDISC: u16 = 37;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const TCA_KIND: u16 = 1;
const TC_H_CLSACT: u32 = 0xffff_fff1;
const TC_H_CLSACT_HANDLE: u32 = 0xffff_0000;

/// Deletes the clsact qdisc of an interface (in the calling thread's
/// network namespace). `Ok(false)` when there was none.
pub fn delete_clsact(ifindex: u32) -> io::Result<bool> {
    let mut msg = Vec::with_capacity(48);
    let kind = b"clsact\0";
    let attr_len = 4 + kind.len();
    let total = 16 + 20 + attr_len.div_ceil(4) * 4;
    // nlmsghdr
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&RTM_DELQDISC.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    // tcmsg
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&TC_H_CLSACT_HANDLE.to_ne_bytes());
    msg.extend_from_slice(&TC_H_CLSACT.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // TCA_KIND = "clsact"
    msg.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    msg.extend_from_slice(&TCA_KIND.to_ne_bytes());
    msg.extend_from_slice(kind);
    msg.resize(total, 0);

    // SAFETY: plain socket syscalls on buffers we own.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < 20 {
        return Err(io::Error::other("short netlink reply"));
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    if ty != NLMSG_ERROR {
        return Err(io::Error::other(format!(
            "unexpected netlink reply type {ty}"
        )));
    }
    let errno = -i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    match errno {
        0 => Ok(true),
        libc::ENOENT | libc::EINVAL => Ok(false),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// The index of an interface in the calling thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i)
    }
}
