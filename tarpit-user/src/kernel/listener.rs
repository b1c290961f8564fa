//! Finding a listening TCP socket by its address and taking a copy of it,
//! from this process or from another one (the MTA) with pidfd_getfd(2).
//!
//! The socket is looked up by inode: `/proc/net/tcp{,6}` (of the calling
//! thread's network namespace) names the inode of the listener bound to
//! the address, and `/proc/<pid>/fd/*` shows which process holds it.
//! Copying a descriptor out of another process needs the right to ptrace
//! it (root, or CAP_SYS_PTRACE over the MTA's user); the copy refers to
//! the very same socket, so connections put on it are accepted by the MTA.
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One LISTEN line of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenEntry {
    pub addr: SocketAddr,
    pub inode: u64,
}

const TCP_LISTEN: &str = "0A";

/// Decodes a `/proc/net/tcp{,6}` address (`0100007F:09DD`): the kernel
/// prints each 32-bit word of the network-order address as a native
/// integer in hex.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The LISTEN sockets of a `/proc/net/tcp{,6}` text.
pub fn parse_listeners(text: &str) -> Vec<ListenEntry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 || f[3] != TCP_LISTEN {
                return None;
            }
            Some(ListenEntry {
                addr: parse_addr(f[1])?,
                inode: f[9].parse().ok()?,
            })
        })
        .collect()
}

/// The listener for `want`: bound to exactly that address, else a
/// wildcard listener (`0.0.0.0` / `::`) on the same port.
pub fn pick(entries: &[ListenEntry], want: SocketAddr) -> Option<ListenEntry> {
    let same = |e: &&ListenEntry| e.addr.port() == want.port();
    entries
        .iter()
        .filter(same)
        .find(|e| e.addr.ip() == want.ip())
        .or_else(|| {
            entries
                .iter()
                .filter(same)
                .find(|e| e.addr.ip().is_unspecified() && e.addr.is_ipv6() == want.is_ipv6())
        })
        .copied()
}

/// The listening socket's inode for `addr` in this thread's namespace.
pub fn listener_inode(addr: SocketAddr) -> io::Result<ListenEntry> {
    let file = if addr.is_ipv4() {
        "/proc/thread-self/net/tcp"
    } else {
        "/proc/thread-self/net/tcp6"
    };
    let text = fs::read_to_string(file)?;
    pick(&parse_listeners(&text), addr).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("nothing listens on {addr} in this network namespace"),
        )
    })
}

/// Which process holds socket `inode`, and as which descriptor. `first`
/// is looked at before every other process (the likely owner).
pub fn find_holder(inode: u64, first: Option<u32>) -> io::Result<(u32, RawFd)> {
    let want = format!("socket:[{inode}]");
    let holds = |pid: u32| -> Option<RawFd> {
        let rd = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        rd.flatten().find_map(|e| {
            let target = fs::read_link(e.path()).ok()?;
            (target.as_os_str() == want.as_str())
                .then(|| e.file_name().to_str()?.parse().ok())
                .flatten()
        })
    };
    if let Some(pid) = first
        && let Some(fd) = holds(pid)
    {
        return Ok((pid, fd));
    }
    for e in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if Some(pid) == first {
            continue;
        }
        if let Some(fd) = holds(pid) {
            return Ok((pid, fd));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no process holds socket inode {inode}"),
    ))
}

/// A copy of descriptor `fd` of process `pid` (this process: a dup).
pub fn copy_fd(pid: u32, fd: RawFd) -> io::Result<OwnedFd> {
    if pid == std::process::id() {
        // SAFETY: fcntl on a descriptor number; a failure is reported.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(n) });
    }
    // SAFETY: raw syscalls with integer arguments; failures are reported.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    let n = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd returned a new descriptor (close-on-exec) of ours.
    Ok(unsafe { OwnedFd::from_raw_fd(n as RawFd) })
}

/// A listening socket taken from whichever process holds it.
#[derive(Debug)]
pub struct TakenListener {
    pub fd: OwnedFd,
    /// The address it is bound to (may be a wildcard).
    pub bound: SocketAddr,
    pub pid: u32,
    /// The socket's inode: it changes when the owner opens a new one.
    pub inode: u64,
    /// An IPv6 socket that also accepts IPv4 (not IPV6_V6ONLY, bound to `::`).
    pub dual_stack: bool,
}

/// Finds the listener of `addr` and takes a copy of it; `first` is the
/// process to look at first (e.g. this one for the agent's own sockets).
pub fn take_listener(addr: SocketAddr, first: Option<u32>) -> io::Result<TakenListener> {
    let entry = listener_inode(addr)?;
    let (pid, fd) = find_holder(entry.inode, first)?;
    let fd = copy_fd(pid, fd).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot take the listener {addr} from process {pid}: {e}"),
        )
    })?;
    let dual_stack = entry.addr.is_ipv6() && entry.addr.ip().is_unspecified() && !v6only(&fd);
    Ok(TakenListener {
        fd,
        bound: entry.addr,
        pid,
        inode: entry.inode,
        dual_stack,
    })
}

fn v6only(fd: &OwnedFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid pointers to an int and its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    rc != 0 || v != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:09DD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123 1 0000000000000000 100 0 0 10 0
   1: 0100007F:09DD 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 124 1 0000000000000000 100 0 0 10 0
   2: 00000000:0019 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 125 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:09DD 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 200 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:0019 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 201 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn listeners_are_parsed_and_established_sockets_skipped() {
        let v4 = parse_listeners(TCP);
        assert_eq!(v4.len(), 2);
        assert_eq!(v4[0].addr, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(v4[0].inode, 123);
        let v6 = parse_listeners(TCP6);
        assert_eq!(v6[0].addr, "[::1]:2525".parse().unwrap());
        assert_eq!(v6[1].addr, "[::]:25".parse().unwrap());
    }

    #[test]
    fn exact_address_first_then_wildcard() {
        let v4 = parse_listeners(TCP);
        assert_eq!(
            pick(&v4, "127.0.0.1:2525".parse().unwrap()).unwrap().inode,
            123
        );
        assert_eq!(
            pick(&v4, "198.51.100.1:25".parse().unwrap()).unwrap().inode,
            125
        );
        assert!(pick(&v4, "127.0.0.1:26".parse().unwrap()).is_none());
        let v6 = parse_listeners(TCP6);
        assert_eq!(
            pick(&v6, "[fd5b:1e00::1]:25".parse().unwrap())
                .unwrap()
                .inode,
            201
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse_listeners("header\nnot a line\n  0: zz:zz 0 0A\n").is_empty());
    }
}
