//! tarpit's kernel programs. One module per hook; packet parsing lives in
//! `tarpit_common::parse` and is shared by every hook that sees packets
//! (and unit-tested on the host there); every map and
//! the small helpers around them live in `maps`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod hold;
mod maps;
mod sk_lookup;
mod sockops;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible licence, needed by some helpers (ring buffer output,
/// socket storage, setsockopt) that the kernel restricts to GPL programs.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
