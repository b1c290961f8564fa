//! One entry point for the fuzz target (`fuzz/fuzz_targets/smtp.rs`) and
//! for the bounded run in the unit tests: feeds arbitrary bytes through
//! every parser the agent runs on network input and checks invariants.
//! Nothing here may panic on any input.
use bytes::Bytes;

use super::{DotScanner, LineBuf, LineError, ReplyAssembler, parse_command, parse_reply_line};

/// Exercises the parsers with `data`; panics only when an invariant breaks.
pub fn exercise(data: &[u8]) {
    // Client side: a small line limit, input split where the first byte says.
    let max = 512;
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut lines = LineBuf::new(max);
    let mut consumed = 0usize;
    for chunk in [&data[..cut], &data[cut..]] {
        lines.extend(chunk);
        while let Some(line) = lines.next_line() {
            match line {
                Ok(l) => {
                    assert!(l.len() <= max, "line over the limit");
                    assert_eq!(l.last(), Some(&b'\n'));
                    consumed += l.len();
                    let _ = parse_command(&l);
                }
                Err(LineError::TooLong(n)) => assert_eq!(n, max),
            }
        }
        assert!(lines.len() < max, "buffer holds at most one line");
    }
    let _ = consumed;

    // MTA side: replies, assembled and rewritten.
    let mut asm = ReplyAssembler::default();
    for raw in data.split_inclusive(|b| *b == b'\n') {
        let _ = parse_reply_line(raw);
        match asm.push(Bytes::copy_from_slice(raw)) {
            Ok(Some(reply)) => {
                let total: usize = reply.lines.iter().map(|l| l.len()).sum();
                assert_eq!(reply.to_bytes().len(), total);
                for starttls in [None, Some(true), Some(false)] {
                    let r = reply.rewrite_ehlo(starttls);
                    assert_eq!(r.code, reply.code);
                    for l in &r.lines {
                        assert!(parse_reply_line(l).is_ok(), "rewrite made a bad line");
                    }
                }
                let _ = reply.ehlo_keywords();
            }
            Ok(None) => {}
            Err(_) => asm = ReplyAssembler::default(),
        }
    }

    // DATA bodies: the end is found at the same place however the input
    // is split.
    let whole = DotScanner::new().scan(data);
    let mut s = DotScanner::new();
    let split = match s.scan(&data[..cut]) {
        Some(at) => Some(at),
        None => s.scan(&data[cut..]).map(|at| cut + at),
    };
    assert_eq!(whole, split, "terminator depends on the split");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bounded run over mutations of real SMTP traffic (xorshift, fixed
    /// seed): the same invariants the fuzz target checks, in every
    /// `cargo test`.
    #[test]
    fn bounded_fuzz_run() {
        let seeds: [&[u8]; 6] = [
            b"EHLO a\r\nMAIL FROM:<a@b> SIZE=1\r\nRCPT TO:<\"q>\"@d>\r\nBDAT 5 LAST\r\nxxxxx",
            b"250-mx\r\n250-PIPELINING\r\n250-XCLIENT ADDR\r\n250 STARTTLS\r\n354 go\r\n",
            b"DATA\r\nSubject: x\r\n\r\n..a\r\n.\r\nQUIT\r\n",
            b"AUTH PLAIN AGEAYg==\r\n*\r\n535 no\r\n",
            b"220-teaser\r\n220 mx\r\n421 4.4.2 bye\n",
            b"\xff\xfe\r\n.\n\n.\r\r\n",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000 {
            let mut d = seeds[i % seeds.len()].to_vec();
            for _ in 0..(next() % 8) {
                let r = next();
                let pos = (r as usize >> 8) % (d.len() + 1);
                match r % 4 {
                    0 if pos < d.len() => d[pos] = (r >> 32) as u8,
                    1 => d.insert(pos, b"\r\n.-: <>"[(r >> 40) as usize % 8]),
                    2 if pos < d.len() => {
                        d.remove(pos);
                    }
                    _ => d.extend_from_slice(&d.clone()[..pos.min(d.len())]),
                }
            }
            exercise(&d);
        }
        exercise(&[]);
        exercise(&vec![b'a'; 5000]);
    }
}
