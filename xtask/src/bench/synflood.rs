//! A bounded SYN flood for the block-list scenario: raw Ethernet frames
//! (AF_PACKET) sent from the client end of the veth pair, sources spread
//! over a block-listed prefix, to the server's SMTP port. There is no
//! pktgen on this box; `sendmmsg` of a prebuilt pool of frames comes close
//! enough for a fair comparison, as both sides get the same traffic.
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::netns::{SERVER_V4, SERVER_V6, is_test_address};
use super::{procstat, signal};

/// Block-listed sources of the flood (inside the test networks).
pub const BLOCK_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 51, 100, 128), 25);
pub const BLOCK_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 0x8000), 113);

pub struct FloodResult {
    pub sent: u64,
    pub elapsed: Duration,
    pub sender_cpu: Duration,
}

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN header (20 bytes) with its checksum over `pseudo`.
fn tcp_syn(sport: u16, dport: u16, seq: u32, pseudo: u32) -> [u8; 20] {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let c = csum_fold(csum_add(pseudo, &t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// Frame `i` of the pool: IPv4 for even `i`, IPv6 for odd; sources and
/// ports vary with `i`.
pub fn frame(i: u32, dst_mac: [u8; 6], src_mac: [u8; 6], dport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(80);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    let sport = 1024 + (i.wrapping_mul(7919) % 60000) as u16;
    let seq = i.wrapping_mul(2_654_435_761);
    if i.is_multiple_of(2) {
        let src = Ipv4Addr::from(u32::from(BLOCK_V4.0) | (i / 2 % 127));
        debug_assert!(is_test_address(src.into()));
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[4..6].copy_from_slice(&(i as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&SERVER_V4.octets());
        let c = csum_fold(csum_add(0, &ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let pseudo = csum_add(csum_add(0, &ip[12..20]), &[0, 6, 0, 20]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&tcp_syn(sport, dport, seq, pseudo));
    } else {
        let src = Ipv6Addr::from(u128::from(BLOCK_V6.0) | u128::from(i / 2 % 8191));
        debug_assert!(is_test_address(src.into()));
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&20u16.to_be_bytes());
        ip[6] = 6;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&src.octets());
        ip[24..40].copy_from_slice(&SERVER_V6.octets());
        let pseudo = csum_add(csum_add(0, &ip[8..40]), &[0, 0, 0, 20, 0, 0, 0, 6]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&tcp_syn(sport, dport, seq, pseudo));
    }
    f
}

/// Sends up to `count` SYNs within `limit` out of `ifname`. Must run on a
/// thread inside the client namespace (the interface is looked up there).
pub fn flood(
    ifname: &str,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    dport: u16,
    count: u64,
    limit: Duration,
) -> Result<FloodResult> {
    let cname = std::ffi::CString::new(ifname)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname} here");
    }
    // SAFETY: plain socket(2); protocol 0 = send only, receive nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    let close = CloseFd(fd);
    // SAFETY: zeroed sockaddr_ll is valid; then fill the fields we use.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&dst_mac);
    // SAFETY: bind with a valid sockaddr_ll of the right size.
    if unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    } != 0
    {
        bail!("bind AF_PACKET: {}", std::io::Error::last_os_error());
    }
    const POOL: u32 = 4096;
    const BATCH: usize = 64;
    let frames: Vec<Vec<u8>> = (0..POOL)
        .map(|i| frame(i, dst_mac, src_mac, dport))
        .collect();
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: zeroed mmsghdr entries, then pointed at our iovecs.
    let mut msgs: Vec<libc::mmsghdr> = (0..POOL as usize)
        .map(|i| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let cpu0 = procstat::thread_cpu();
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut at = 0usize;
    while sent < count && start.elapsed() < limit {
        if sent.is_multiple_of(BATCH as u64 * 256) {
            signal::check()?;
        }
        let n = BATCH.min((count - sent) as usize).min(POOL as usize - at);
        // SAFETY: msgs[at..at+n] are valid mmsghdrs pointing at live frames.
        let r = unsafe { libc::sendmmsg(fd, msgs[at..].as_mut_ptr(), n as u32, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EAGAIN) {
                std::thread::yield_now();
                continue;
            }
            bail!("sendmmsg: {e}");
        }
        sent += r as u64;
        at = (at + r as usize) % POOL as usize;
    }
    let elapsed = start.elapsed();
    let sender_cpu = procstat::thread_cpu().saturating_sub(cpu0);
    drop(close);
    Ok(FloodResult {
        sent,
        elapsed,
        sender_cpu,
    })
}

struct CloseFd(i32);

impl Drop for CloseFd {
    fn drop(&mut self) {
        // SAFETY: we own this fd.
        unsafe { libc::close(self.0) };
    }
}
