//! Every map of the kernel programs, declared in one place. Names are the
//! constants of `tarpit_common::maps`; sizes given here are defaults that
//! the loader overrides from the agent's configuration.
use aya_ebpf::{
    btf_maps::{Array, LruHashMap},
    macros::btf_map,
};
use tarpit_common::{
    IpAddrKey,
    maps::{SYN_COUNT_ENTRIES, Settings},
};

#[btf_map]
pub static SYN_COUNT: LruHashMap<IpAddrKey, u64, { SYN_COUNT_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static SETTINGS: Array<Settings, 1> = Array::new();

/// The live settings; all-zero (no SMTP port watched) until the agent
/// writes them, which makes a freshly loaded program a no-op.
#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0)
}
