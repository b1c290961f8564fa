//! XDP on frames the kernel builds itself: `BPF_PROG_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` (Linux 5.18).
//!
//! The kernel copies one frame into the pages of a page pool, with XDP's
//! headroom, as a NIC driver's receive ring has them, and runs an XDP
//! program on each copy `repeat` times. It then acts on the verdict as a
//! driver does: XDP_DROP recycles the page, XDP_PASS builds an skb around
//! it and hands it to the stack (`netif_receive_skb_list`, so the netdev
//! ingress hook and nftables run) on the calling thread, with bottom
//! halves off. No skb exists before the program has decided.
//!
//! That is what a veth with a raw-socket sender cannot give (there XDP
//! gets the sender's skb, copied into a fresh page when its headroom is
//! short), and this box has no pktgen and no NIC to spare. Everything
//! happens in the calling thread, so its CPU time is the cost.
//!
//! Raw `bpf(2)` calls with the kernel's attribute layouts (`union
//! bpf_attr`, `struct xdp_md`); the kernel zero-extends a shorter attr.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// XDP verdicts (`enum xdp_action`).
pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;

/// `union bpf_attr` for BPF_PROG_LOAD, up to `prog_name`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `union bpf_attr` for BPF_PROG_GET_FD_BY_ID.
#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN (the `test` struct).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md`, the context the frames run with.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// `struct bpf_insn`: opcode, dst (low nibble) and src registers, offset,
/// immediate.
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// bpf(2) with one attribute struct; the new fd or value it returns.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, exclusively borrowed #[repr(C)] struct
    // laid out as the kernel's union bpf_attr member for `cmd`, and its
    // exact size is passed; every pointer inside it was set by our caller
    // to memory that outlives this call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// What one `BPF_PROG_RUN` call reports.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Mean wall time per frame by the kernel's own timer (ns), which
    /// leaves out the set-up of the page pool.
    pub kernel_ns: u32,
}

/// An XDP program held by fd (closed on drop; a program this process
/// loaded is unloaded then).
pub struct Prog(OwnedFd);

impl Prog {
    /// A loaded program by its id (another process's, such as the agent's).
    pub fn by_id(id: u32) -> Result<Prog> {
        let mut attr = GetFdByIdAttr {
            prog_id: id,
            ..Default::default()
        };
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
            .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
        Ok(Prog(owned(fd)?))
    }

    /// Loads a two-instruction XDP program that returns `action` for every
    /// frame (`r0 = action; exit`).
    pub fn returning(action: i32, name: &str) -> Result<Prog> {
        let insns = [
            // BPF_ALU64 | BPF_MOV | BPF_K, dst r0.
            Insn {
                code: 0xb7,
                regs: 0,
                off: 0,
                imm: action,
            },
            // BPF_JMP | BPF_EXIT.
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0,
            },
        ];
        let license = CString::new("GPL")?;
        let mut log = vec![0u8; 4096];
        let mut prog_name = [0u8; 16];
        for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name,
            ..Default::default()
        };
        match bpf(BPF_PROG_LOAD, &mut attr) {
            Ok(fd) => Ok(Prog(owned(fd)?)),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                bail!(
                    "BPF_PROG_LOAD of {name}: {e}; verifier: {}",
                    String::from_utf8_lossy(&log[..end]).trim()
                )
            }
        }
    }

    /// Runs the program on `repeat` live copies of `frame`, received on
    /// `ifindex`, which is looked up in the calling thread's network
    /// namespace: call it from a thread inside the namespace of that
    /// interface.
    pub fn run_live(&self, frame: &[u8], ifindex: u32, repeat: u32) -> Result<Run> {
        let mut ctx = XdpMd {
            data_end: frame.len() as u32,
            ingress_ifindex: ifindex,
            ..Default::default()
        };
        let mut attr = TestRunAttr {
            prog_fd: self.0.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
            ctx_in: (&raw mut ctx) as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)
            .context("BPF_PROG_RUN with live frames (needs Linux 5.18)")?;
        Ok(Run {
            kernel_ns: attr.duration,
        })
    }
}

/// Takes ownership of an fd bpf(2) returned.
fn owned(fd: i64) -> Result<OwnedFd> {
    let fd = i32::try_from(fd).context("bpf(2) returned no fd")?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The index of an interface in the calling thread's namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: a valid NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name} here: {}", io::Error::last_os_error());
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attribute layouts match the kernel's offsets (uapi/linux/bpf.h).
    #[test]
    fn attr_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<TestRunAttr>(), 80);
        assert_eq!(std::mem::offset_of!(TestRunAttr, data_in), 16);
        assert_eq!(std::mem::offset_of!(TestRunAttr, repeat), 32);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(std::mem::offset_of!(TestRunAttr, flags), 64);
        assert_eq!(std::mem::offset_of!(TestRunAttr, batch_size), 72);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_flags), 44);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::size_of::<XdpMd>(), 24);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }
}
