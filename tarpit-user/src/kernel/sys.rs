//! The few system calls aya 0.14 does not offer: opening a pinned link as
//! a plain fd, swapping the program behind a link in place
//! (`BPF_LINK_UPDATE`, for XDP, TCX and cgroup links alike) and deleting a
//! clsact qdisc over rtnetlink (with `netlink-packet-route`), plus the
//! interface index lookup (nix's `if_nametoindex`).
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

/// Deletes the clsact qdisc of an interface (in the calling thread's
/// network namespace). `Ok(false)` when there was none.
///
/// aya 0.14 can add a clsact qdisc (`tc::qdisc_add_clsact`) and take its
/// filters off (`tc::qdisc_detach_program`) but has no call to delete it,
/// so the request is built with `netlink-packet-route` and sent over a
/// `netlink-sys` socket: `tc qdisc del dev IF clsact`.
pub fn delete_clsact(ifindex: u32) -> io::Result<bool> {
    use netlink_packet_core::{
        NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

    let index = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index too large"))?;
    let mut tc = TcMessage::with_index(index);
    // handle ffff:0, parent ffff:fff1: what `tc qdisc add ... clsact` made
    tc.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    tc.header.parent = TcHandle::CLSACT;
    tc.attributes.push(TcAttribute::Kind("clsact".into()));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelQueueDiscipline(tc)),
    );
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);

    let sock = Socket::new(NETLINK_ROUTE)?;
    sock.send_to(&buf, &SocketAddr::new(0, 0), 0)?;
    let (reply, _) = sock.recv_from_full()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| io::Error::other(format!("bad netlink reply: {e}")))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.raw_code().abs() {
            0 => Ok(true),
            libc::ENOENT | libc::EINVAL => Ok(false),
            errno => Err(io::Error::from_raw_os_error(errno)),
        },
        other => Err(io::Error::other(format!(
            "unexpected netlink reply type {}",
            other.message_type()
        ))),
    }
}

/// The index of an interface in the calling thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(io::Error::from)
}
