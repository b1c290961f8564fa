//! The agent's heap: one malloc arena, trimmed after a crowd.
//!
//! glibc gives threads arenas of their own (up to eight per core), and the
//! agent's pattern of allocation leaves each of them fragmented: every
//! connection has a short-lived task and opening future next to the small
//! continuation that stays while the client is held, allocated by whichever
//! worker thread accepted it. Measured with `cargo xtask bench --quick
//! --only hold_capacity` (5,000 clients held in the greeting delay, release
//! build): 985 bytes of RSS per held client with glibc's default, 414 with
//! two arenas, 218 with one. glibc's per-thread cache serves the common
//! small allocations without taking the arena's lock, so one arena costs
//! tokio's few worker threads little. An administrator's
//! `MALLOC_ARENA_MAX` in the environment is left to glibc.

/// Asks glibc for one arena, unless `MALLOC_ARENA_MAX` is set. Call it
/// before any thread starts: threads that already have an arena keep it.
pub fn one_malloc_arena() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes a tuning parameter of glibc's
    // allocator (no pointer is passed); M_ARENA_MAX with a positive value
    // is valid at any time, and here no other thread is running yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Gives the allocator's free pages back to the kernel (glibc's
/// `malloc_trim`, which also releases whole free pages inside the heap).
/// A burst of connects leaves the memory of thousands of short-lived
/// session tasks free but resident; the session's parking holder calls
/// this once such a burst is over, so the agent's RSS
/// follows the clients it holds rather than its busiest second. It walks
/// the heap under the arena's lock: a millisecond or so for tens of MiB;
/// run it off the runtime's workers (`spawn_blocking`).
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer and is thread-safe (it locks
    // each arena while it walks it).
    unsafe {
        libc::malloc_trim(0);
    }
}
