//! The one place where kernel and userspace agree on data layouts.
//!
//! Every map key, map value, event record and map name that crosses the
//! kernel boundary is declared here, `#[repr(C)]` and padding-free, so the
//! eBPF programs (`tarpit-ebpf`) and the agent (`tarpit-user`) can never
//! disagree about a byte. With the `user` feature the types also implement
//! `aya::Pod` so userspace can read and write them through aya's map APIs.
#![no_std]

pub mod addr;
pub mod counters;
pub mod events;
pub mod greeting;
pub mod hold;
pub mod lists;
pub mod maps;
pub mod parse;
pub mod state;
pub mod steer;

pub use addr::IpAddrKey;
pub use counters::Counter;
pub use events::Event;
pub use lists::{AttachKey, BlockReason, ListEntry, TimedEntry};
pub use state::{FlowKey, FlowState, IpState};
