//! Finds the end of a DATA body (`CRLF . CRLF`) in a stream of chunks.
//!
//! Lines end at LF (a preceding CR is optional), as the MTAs behind the
//! agent read them; the agent forwards every byte unchanged, so the MTA
//! stays the judge of what is body and what is command.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line.
    LineStart,
    /// A `.` at the start of a line.
    Dot,
    /// `.` CR at the start of a line.
    DotCr,
    /// Inside a line.
    Mid,
}

/// Scans a DATA body. Create one after the MTA's 354.
#[derive(Debug, Clone)]
pub struct DotScanner {
    state: State,
}

impl Default for DotScanner {
    fn default() -> Self {
        DotScanner::new()
    }
}

impl DotScanner {
    pub fn new() -> DotScanner {
        DotScanner {
            state: State::LineStart,
        }
    }

    /// Feeds the next chunk; returns the length of the prefix of `chunk`
    /// that completes the body (terminator included), if the body ends in it.
    pub fn scan(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            self.state = match (self.state, b) {
                (State::Mid, _) => match chunk[i..].iter().position(|&c| c == b'\n') {
                    Some(p) => {
                        i += p;
                        State::LineStart
                    }
                    None => return None,
                },
                (State::LineStart, b'.') => State::Dot,
                (State::LineStart, b'\n') => State::LineStart,
                (State::LineStart, _) => State::Mid,
                (State::Dot, b'\n') | (State::DotCr, b'\n') => {
                    self.state = State::LineStart;
                    return Some(i + 1);
                }
                (State::Dot, b'\r') => State::DotCr,
                (State::Dot, _) | (State::DotCr, _) => State::Mid,
            };
            // A CR or other byte that moved us to Mid may itself be LF-free;
            // Mid handles the rest of the line on the next step.
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(chunks: &[&[u8]]) -> Option<(usize, usize)> {
        let mut s = DotScanner::new();
        for (n, c) in chunks.iter().enumerate() {
            if let Some(at) = s.scan(c) {
                return Some((n, at));
            }
        }
        None
    }

    #[test]
    fn finds_the_terminator() {
        assert_eq!(
            end(&[b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"]),
            Some((0, 23))
        );
        assert_eq!(end(&[b".\r\n"]), Some((0, 3)));
        assert_eq!(end(&[b"a\n.\n"]), Some((0, 4)));
    }

    #[test]
    fn split_across_chunks() {
        assert_eq!(end(&[b"body\r", b"\n.", b"\r", b"\nNEXT"]), Some((3, 1)));
        assert_eq!(end(&[b"body\r\n", b".\r\n"]), Some((1, 3)));
    }

    #[test]
    fn dot_stuffed_lines_are_body() {
        assert_eq!(end(&[b"..\r\n.x\r\n. \r\nbody.\r\n"]), None);
        assert_eq!(end(&[b"a.\r\n", b"x\r\n"]), None);
        assert_eq!(end(&[b".\rx\r\n"]), None);
    }

    #[test]
    fn every_split_point_agrees() {
        let msg: &[u8] = b"From: a\r\n\r\n..dots\r\n.x\r\nend\r\n.\r\nQUIT\r\n";
        for cut in 0..msg.len() {
            let (a, b) = msg.split_at(cut);
            let mut s = DotScanner::new();
            let total = match s.scan(a) {
                Some(at) => at,
                None => a.len() + s.scan(b).expect("terminator"),
            };
            assert_eq!(total, msg.len() - 6, "cut at {cut}");
        }
    }
}
