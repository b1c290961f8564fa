//! Client commands, classified.
//!
//! The parser never refuses a line: anything it does not recognise is
//! [`Command::Other`] and goes to the MTA, whose reply is relayed. It only
//! pulls out what the policies and the framing need (HELO name, envelope
//! addresses, BDAT size).

/// One command line, without its line ending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    /// `MAIL FROM:<addr>`; the null sender is an empty string.
    Mail(String),
    Rcpt(String),
    Data,
    /// `BDAT size [LAST]`; `None` when the size or keyword is malformed,
    /// in which case the framing of what follows is unknown.
    Bdat(Option<(u64, bool)>),
    Rset,
    Quit,
    Starttls,
    /// `AUTH mechanism [initial-response]`: the mechanism only (the rest
    /// is a credential and is never kept).
    Auth(String),
    /// XCLIENT or XFORWARD: only the agent may send these to the MTA.
    ProxyOverride,
    Noop,
    Other,
}

/// Splits off the verb (case-insensitive) and classifies the line.
pub fn parse_command(line: &[u8]) -> Command {
    let line = trim_line_end(line);
    let (verb, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[][..]),
    };
    let verb = verb.to_ascii_uppercase();
    match verb.as_slice() {
        b"HELO" => Command::Helo(first_word(rest)),
        b"EHLO" => Command::Ehlo(first_word(rest)),
        b"MAIL" => match path_after(rest, b"FROM:") {
            Some(p) => Command::Mail(p),
            None => Command::Other,
        },
        b"RCPT" => match path_after(rest, b"TO:") {
            Some(p) => Command::Rcpt(p),
            None => Command::Other,
        },
        b"DATA" if rest.iter().all(|b| *b == b' ') => Command::Data,
        b"BDAT" => Command::Bdat(parse_bdat(rest)),
        b"RSET" => Command::Rset,
        b"QUIT" => Command::Quit,
        b"STARTTLS" if rest.iter().all(|b| *b == b' ') => Command::Starttls,
        b"AUTH" => Command::Auth(first_word(rest).to_ascii_uppercase()),
        b"XCLIENT" | b"XFORWARD" => Command::ProxyOverride,
        b"NOOP" => Command::Noop,
        _ => Command::Other,
    }
}

fn trim_line_end(mut line: &[u8]) -> &[u8] {
    while let [head @ .., b'\r' | b'\n'] = line {
        line = head;
    }
    line
}

fn first_word(rest: &[u8]) -> String {
    let s = String::from_utf8_lossy(rest);
    s.split_ascii_whitespace().next().unwrap_or("").to_string()
}

/// The path of `MAIL FROM:` / `RCPT TO:`, lenient like Postfix: spaces
/// around the colon are accepted, angle brackets are optional, and a quoted
/// local part may contain `>` and spaces.
fn path_after(rest: &[u8], keyword: &[u8]) -> Option<String> {
    let rest = trim_start(rest);
    if rest.len() < keyword.len()
        || !rest[..keyword.len() - 1].eq_ignore_ascii_case(&keyword[..keyword.len() - 1])
    {
        return None;
    }
    let after_word = trim_start(&rest[keyword.len() - 1..]);
    let after_colon = trim_start(after_word.strip_prefix(b":")?);
    let path = if let Some(inner) = after_colon.strip_prefix(b"<") {
        let mut quoted = false;
        let mut escaped = false;
        let mut end = None;
        for (i, &b) in inner.iter().enumerate() {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = !quoted;
            } else if b == b'>' && !quoted {
                end = Some(i);
                break;
            }
        }
        &inner[..end?]
    } else {
        let end = after_colon
            .iter()
            .position(|&b| b == b' ')
            .unwrap_or(after_colon.len());
        &after_colon[..end]
    };
    // Source routes (`@a,@b:user@c`) are obsolete; the mailbox is what counts.
    let path = match (path.first(), path.iter().position(|&b| b == b':')) {
        (Some(b'@'), Some(i)) => &path[i + 1..],
        _ => path,
    };
    Some(String::from_utf8_lossy(path).into_owned())
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', tail @ ..] = s {
        s = tail;
    }
    s
}

fn parse_bdat(rest: &[u8]) -> Option<(u64, bool)> {
    let s = std::str::from_utf8(rest).ok()?;
    let mut words = s.split_ascii_whitespace();
    let size_word = words.next()?;
    if size_word.is_empty()
        || size_word.len() > 19
        || !size_word.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let size = size_word.parse().ok()?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some((size, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            parse_command(b"ehlo client.example\r\n"),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(parse_command(b"HeLo x"), Command::Helo("x".into()));
        assert_eq!(parse_command(b"quit\r\n"), Command::Quit);
        assert_eq!(parse_command(b"data\r\n"), Command::Data);
        assert_eq!(parse_command(b"StartTLS\r\n"), Command::Starttls);
        assert_eq!(parse_command(b"rset"), Command::Rset);
        assert_eq!(parse_command(b"NOOP hello"), Command::Noop);
    }

    #[test]
    fn envelope_paths() {
        assert_eq!(
            parse_command(b"MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME\r\n"),
            Command::Mail("a@b.example".into())
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<>\r\n"),
            Command::Mail(String::new())
        );
        assert_eq!(
            parse_command(b"mail from: <x@y>"),
            Command::Mail("x@y".into())
        );
        assert_eq!(
            parse_command(b"MAIL FROM:x@y SIZE=1"),
            Command::Mail("x@y".into())
        );
        assert_eq!(
            parse_command(b"RCPT TO:<\"a>b c\"@d>\r\n"),
            Command::Rcpt("\"a>b c\"@d".into())
        );
        assert_eq!(
            parse_command(b"RCPT TO:<@relay.example:u@d.example>"),
            Command::Rcpt("u@d.example".into())
        );
        assert_eq!(
            parse_command("RCPT TO:<ü@bücher.example> ".as_bytes()),
            Command::Rcpt("ü@bücher.example".into())
        );
        // malformed envelope commands are the MTA's to refuse
        assert_eq!(parse_command(b"MAIL <a@b>"), Command::Other);
        assert_eq!(parse_command(b"RCPT TO:<unterminated"), Command::Other);
        assert_eq!(parse_command(b"MAIL"), Command::Other);
    }

    #[test]
    fn bdat_framing() {
        assert_eq!(
            parse_command(b"BDAT 1000\r\n"),
            Command::Bdat(Some((1000, false)))
        );
        assert_eq!(
            parse_command(b"bdat 0 last\r\n"),
            Command::Bdat(Some((0, true)))
        );
        assert_eq!(parse_command(b"BDAT\r\n"), Command::Bdat(None));
        assert_eq!(parse_command(b"BDAT -1"), Command::Bdat(None));
        assert_eq!(parse_command(b"BDAT 10 LAST x"), Command::Bdat(None));
        assert_eq!(
            parse_command(b"BDAT 99999999999999999999"),
            Command::Bdat(None)
        );
        assert_eq!(parse_command(b"BDAT 1 FIRST"), Command::Bdat(None));
    }

    #[test]
    fn auth_keeps_only_the_mechanism() {
        assert_eq!(
            parse_command(b"auth plain AHVzZXIAcGFzcw==\r\n"),
            Command::Auth("PLAIN".into())
        );
        assert_eq!(parse_command(b"AUTH LOGIN"), Command::Auth("LOGIN".into()));
    }

    #[test]
    fn proxy_overrides_are_recognised() {
        assert_eq!(
            parse_command(b"XCLIENT ADDR=1.2.3.4"),
            Command::ProxyOverride
        );
        assert_eq!(parse_command(b"xforward NAME=x"), Command::ProxyOverride);
    }

    #[test]
    fn garbage_is_other() {
        assert_eq!(parse_command(b""), Command::Other);
        assert_eq!(parse_command(b"\xff\xfe\r\n"), Command::Other);
        assert_eq!(parse_command(b"GET / HTTP/1.1"), Command::Other);
        assert_eq!(parse_command(b"DATA now"), Command::Other);
    }
}
