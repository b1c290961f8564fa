//! The eBPF object embedded at build time (see build.rs).
use anyhow::{Result, bail};

#[cfg(tarpit_ebpf)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!("TARPIT_EBPF_OBJECT")));

#[cfg(not(tarpit_ebpf))]
static OBJECT: Option<&[u8]> = None;

/// The kernel programs, or a clear error when this binary was built before
/// them.
pub fn ebpf_object() -> Result<&'static [u8]> {
    match OBJECT {
        Some(bytes) => Ok(bytes),
        None => bail!(
            "this tarpit binary was built without its kernel programs: run \
             `cargo xtask build-ebpf` and rebuild (or use `cargo xtask run`)"
        ),
    }
}
