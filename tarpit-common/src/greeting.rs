//! Where a server segment leaves an SMTP greeting, decided from the tail of
//! its payload. Shared by the tc program (which copies the tail into a
//! buffer) and host unit tests.
//!
//! The greeting is complete once a server segment ends in a line that is
//! not a `220-` continuation (`220 ...`, or any other reply). A segment
//! whose last line is `220-...` leaves the flow in the teaser state:
//! postscreen's trick to catch bots that read only the first line. Any
//! doubt (a last line longer than the window) counts as complete: a missed
//! bot is better than a flagged good client.
use crate::state::{FLOW_GREETED, FLOW_TEASER};

/// Bytes of the segment's tail that are examined.
pub const GREETING_WINDOW: usize = 128;
/// Size of the buffer they are copied into: twice the window, so that any
/// index below 256 is in bounds. Verifiers before 6.6 lose the bounds a
/// comparison teaches them on register copies the compiler spilled; an
/// index bounded by a mask alone (0..=255) is always accepted.
pub const GREETING_BUF: usize = 2 * GREETING_WINDOW;
const MASK: usize = GREETING_BUF - 1;

/// `buf[..n]` holds the last `n` payload bytes of a server segment;
/// `whole` says whether that is the entire payload. Returns `FLOW_TEASER`
/// or `FLOW_GREETED`. Indexes are masked and loops bounded so the eBPF
/// verifier accepts the same code.
#[inline(always)]
pub fn after_segment(buf: &[u8; GREETING_BUF], n: usize, whole: bool) -> u32 {
    if !(4..=GREETING_WINDOW).contains(&n) {
        return FLOW_GREETED;
    }
    // From here on an opaque value bounded by a mask only: the compiler
    // cannot prove any index in range, so it keeps every mask below, and
    // every copy of `n` carries 0..=255 for the verifier.
    let n = core::hint::black_box(n) & MASK;
    // Ignore the line end of the last line, then find where it starts.
    let mut end = n;
    if buf[(end - 1) & MASK] == b'\n' {
        end -= 1;
    }
    let mut start = usize::MAX;
    for k in 1..GREETING_WINDOW {
        // Opaque step: without it LLVM turns this early-exit scan into a
        // loop whose per-byte states the verifiers of 5.10 and 6.1 cannot
        // prune ("BPF program is too large", "the sequence of 8193 jumps
        // is too complex").
        let k = core::hint::black_box(k);
        if k > end {
            break;
        }
        let i = end - k;
        if buf[i & MASK] == b'\n' {
            start = i + 1;
            break;
        }
    }
    if start == usize::MAX {
        if !whole {
            return FLOW_GREETED;
        }
        start = 0;
    }
    if start + 4 > n {
        return FLOW_GREETED;
    }
    if buf[start & MASK] == b'2'
        && buf[(start + 1) & MASK] == b'2'
        && buf[(start + 2) & MASK] == b'0'
        && buf[(start + 3) & MASK] == b'-'
    {
        FLOW_TEASER
    } else {
        FLOW_GREETED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Classifies a whole payload the way the tc program does.
    fn state(payload: &[u8]) -> u32 {
        let n = payload.len().min(GREETING_WINDOW);
        let mut buf = [0u8; GREETING_BUF];
        buf[..n].copy_from_slice(&payload[payload.len() - n..]);
        after_segment(&buf, n, n == payload.len())
    }

    #[test]
    fn final_line_completes_the_greeting() {
        assert_eq!(state(b"220 mx.example ESMTP\r\n"), FLOW_GREETED);
        assert_eq!(
            state(b"220-first\r\n220-second\r\n220 last\r\n"),
            FLOW_GREETED
        );
    }

    #[test]
    fn teaser_line_leaves_it_open() {
        assert_eq!(state(b"220-mx.example ESMTP\r\n"), FLOW_TEASER);
        assert_eq!(state(b"220-first\r\n220-second\r\n"), FLOW_TEASER);
        // A teaser without its line end yet.
        assert_eq!(state(b"220-mx.example"), FLOW_TEASER);
    }

    #[test]
    fn other_replies_complete_it() {
        assert_eq!(state(b"554 5.7.1 go away\r\n"), FLOW_GREETED);
        assert_eq!(state(b"421-busy\r\n"), FLOW_GREETED);
        assert_eq!(state(b"220 "), FLOW_GREETED);
    }

    #[test]
    fn doubt_counts_as_complete() {
        // Too short to say.
        assert_eq!(state(b"22\r\n"), FLOW_GREETED);
        // A last line longer than the window: its start is not visible.
        let mut long = b"220-".to_vec();
        long.extend_from_slice(&[b'x'; 300]);
        long.extend_from_slice(b"\r\n");
        assert_eq!(state(&long), FLOW_GREETED);
        // ... but a long earlier line does not hide a short last one.
        let mut v = b"220-".to_vec();
        v.extend_from_slice(&[b'x'; 300]);
        v.extend_from_slice(b"\r\n220-more\r\n");
        assert_eq!(state(&v), FLOW_TEASER);
    }
}
