//! Can XDP_TX send a reply out of this interface? (for the kernel hold)
//!
//! A veth in native XDP mode hands XDP_TX frames straight to its peer's
//! XDP receive ring, which exists only while the peer has an XDP program
//! of its own: without one the reply is silently dropped. Real NICs and
//! generic (skb) mode have no such condition. One rtnetlink question
//! answers it: is the interface a veth, and what is attached to its peer
//! (which may live in another namespace: asked with
//! `IFLA_TARGET_NETNSID`, Linux 4.20+)?
use std::mem::size_of;

use anyhow::{Context, Result, bail};

use super::netns::in_netns;
use crate::config::XdpModeSetting;

const RTM_GETLINK: u16 = 18;
const RTM_NEWLINK: u16 = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_TARGET_NETNSID: u16 = 46;
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_MULTI: u8 = 4;
const NLA_F_MASK: u16 = 0x3fff;

/// Why XDP_TX cannot reply on `iface`, or `None` when it can (or when
/// the kernel does not say: then the hold is tried).
pub fn blocker(netns: Option<&str>, iface: &str, mode: XdpModeSetting) -> Option<String> {
    if mode == XdpModeSetting::Skb {
        return None;
    }
    let res = match netns {
        Some(ns) => in_netns(ns, || veth_peer_without_xdp(iface)).and_then(|r| r),
        None => veth_peer_without_xdp(iface),
    };
    match res {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(iface, "cannot tell whether XDP_TX works: {e:#}");
            None
        }
    }
}

fn veth_peer_without_xdp(iface: &str) -> Result<Option<String>> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name; returns 0 when there is none.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {iface}");
    }
    let sock = Netlink::open()?;
    let own = sock.get_link(index as i32, None)?;
    if own.kind.as_deref() != Some("veth") {
        return Ok(None);
    }
    let Some(peer) = own.link else {
        return Ok(None);
    };
    let peer_info = sock.get_link(peer, own.link_netnsid)?;
    if peer_info.native_xdp {
        return Ok(None);
    }
    Ok(Some(format!(
        "{iface} is a veth whose peer has no XDP program: XDP_TX replies would be lost"
    )))
}

#[derive(Debug, Default)]
struct LinkInfo {
    kind: Option<String>,
    link: Option<i32>,
    link_netnsid: Option<i32>,
    native_xdp: bool,
}

struct Netlink(std::os::fd::OwnedFd);

impl Netlink {
    fn open() -> Result<Netlink> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the fd is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("netlink socket");
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Netlink(fd))
    }

    /// RTM_GETLINK for one interface index, in another namespace when
    /// `netnsid` is given.
    fn get_link(&self, index: i32, netnsid: Option<i32>) -> Result<LinkInfo> {
        use std::os::fd::AsRawFd;
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
        msg.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
        msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id
        // struct ifinfomsg
        msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
        msg.extend_from_slice(&0u16.to_ne_bytes());
        msg.extend_from_slice(&index.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        if let Some(id) = netnsid {
            msg.extend_from_slice(&8u16.to_ne_bytes());
            msg.extend_from_slice(&IFLA_TARGET_NETNSID.to_ne_bytes());
            msg.extend_from_slice(&id.to_ne_bytes());
        }
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: sending an initialised buffer to our own socket.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("netlink send");
        }
        let mut buf = vec![0u8; 32 * 1024];
        // SAFETY: receiving into a buffer of the length given.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("netlink receive");
        }
        parse_link(&buf[..n as usize])
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Attributes of a netlink attribute stream: (type, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16_at(b, 0)? as usize;
        let ty = u16_at(b, 2)? & NLA_F_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        let next = (len + 3) & !3;
        b = b.get(next..).unwrap_or(&[]);
        Some((ty, payload))
    })
}

fn parse_link(b: &[u8]) -> Result<LinkInfo> {
    let ty = u16_at(b, 4).context("short netlink reply")?;
    if ty == NLMSG_ERROR {
        let err = i32_at(b, 16).unwrap_or(0);
        bail!(
            "netlink: {}",
            std::io::Error::from_raw_os_error(err.saturating_neg())
        );
    }
    if ty != RTM_NEWLINK {
        bail!("unexpected netlink reply type {ty}");
    }
    let body = b.get(16 + 16..).context("short link reply")?;
    let mut info = LinkInfo::default();
    for (t, p) in attrs(body) {
        match t {
            IFLA_LINK => info.link = i32_at(p, 0),
            IFLA_LINK_NETNSID => info.link_netnsid = i32_at(p, 0),
            IFLA_LINKINFO => {
                for (t, p) in attrs(p) {
                    if t == IFLA_INFO_KIND {
                        let s = p.split(|&c| c == 0).next().unwrap_or(&[]);
                        info.kind = Some(String::from_utf8_lossy(s).into_owned());
                    }
                }
            }
            IFLA_XDP => {
                let mut attached = 0u8;
                let mut drv_id = 0;
                for (t, p) in attrs(p) {
                    match t {
                        IFLA_XDP_ATTACHED => attached = p.first().copied().unwrap_or(0),
                        IFLA_XDP_DRV_PROG_ID => drv_id = i32_at(p, 0).unwrap_or(0),
                        _ => {}
                    }
                }
                info.native_xdp =
                    attached == XDP_ATTACHED_DRV || (attached == XDP_ATTACHED_MULTI && drv_id != 0);
            }
            _ => {}
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_no_veth() {
        // `lo` exists in every namespace and is never a veth.
        if let Ok(found) = veth_peer_without_xdp("lo") {
            assert_eq!(found, None);
        }
    }

    #[test]
    fn attributes_are_walked_with_padding() {
        let mut b = Vec::new();
        b.extend_from_slice(&5u16.to_ne_bytes());
        b.extend_from_slice(&7u16.to_ne_bytes());
        b.extend_from_slice(&[9, 0, 0, 0]); // one byte payload + padding
        b.extend_from_slice(&8u16.to_ne_bytes());
        b.extend_from_slice(&IFLA_LINK.to_ne_bytes());
        b.extend_from_slice(&42i32.to_ne_bytes());
        let v: Vec<_> = attrs(&b).collect();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0], (7, &[9u8][..]));
        assert_eq!(v[1].0, IFLA_LINK);
        assert_eq!(i32_at(v[1].1, 0), Some(42));
    }
}
