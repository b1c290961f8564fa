//! Bounded polling: every wait in the harness has a deadline.
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits like [`until`] and fails the test, naming `what`, when `f` is
/// still false after `limit`.
#[track_caller]
pub fn eventually(what: &str, limit: Duration, f: impl FnMut() -> bool) {
    assert!(until(limit, f), "not within {limit:?}: {what}");
}
