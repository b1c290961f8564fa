//! Ids `<pid hex>-<n>`: unique across processes, and they name their maker.
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

/// A short id, unique across all running processes: the pid (hex) and a
/// per-process counter, `<pid>-<n>`. Short because interface names are
/// limited to 15 bytes; the pid lets a leak check or a stale sweep tell a
/// leftover of a finished process from one still in use.
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{:x}", std::process::id(), n)
}

/// Whether the process that made `id` (`<pid hex>-...`, as made by
/// [`unique_id`]) still runs; `None` when `id` does not start with a pid.
pub fn owner_alive(id: &str) -> Option<bool> {
    let pid = id.split('-').next()?;
    let pid = u32::from_str_radix(pid, 16).ok()?;
    Some(Path::new(&format!("/proc/{pid}")).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_process() {
        let a = unique_id();
        let b = unique_id();
        assert_ne!(a, b);
        assert_eq!(owner_alive(&a), Some(true));
        assert!(a.starts_with(&format!("{:x}-", std::process::id())));
        // pid_max is at most 2^22: this pid cannot exist.
        assert_eq!(owner_alive("7fffffff-0"), Some(false));
        assert_eq!(owner_alive("not-an-id"), None);
        assert_eq!(owner_alive(""), None);
    }
}
