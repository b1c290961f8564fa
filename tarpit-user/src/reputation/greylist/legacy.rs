//! The store's old format (before keys were hashed): `P first KEY` /
//! `A until KEY`, with KEY `t NET SENDER RCPT` (percent-encoded, `<>` for
//! the null sender) or `c IP`. Read once, at the first start after an
//! upgrade; the loader hashes each key with the site key and the store is
//! written back in the current format, so nobody is greylisted again
//! because of the upgrade. Nothing writes this format any more.

use super::GreyKey;

/// An entry of the old store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Pending { first: u64 },
    Passed { until: u64 },
}

fn decode_field(s: &str) -> Option<String> {
    if s == "<>" {
        return Some(String::new());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn decode_key(fields: &[&str]) -> Option<GreyKey> {
    match fields {
        ["t", net, sender, rcpt] => Some(GreyKey::Triplet {
            net: net.parse().ok()?,
            sender: decode_field(sender)?,
            rcpt: decode_field(rcpt)?,
        }),
        ["c", ip] => Some(GreyKey::Client(ip.parse().ok()?)),
        _ => None,
    }
}

/// One line of the old store.
pub fn parse_line(line: &str) -> Option<(GreyKey, Entry)> {
    let fields: Vec<&str> = line.split(' ').collect();
    let (kind, t, rest) = (fields.first()?, fields.get(1)?, fields.get(2..)?);
    let t: u64 = t.parse().ok()?;
    let key = decode_key(rest)?;
    let e = match *kind {
        "P" => Entry::Pending { first: t },
        "A" => Entry::Passed { until: t },
        _ => return None,
    };
    Some((key, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_lines_parse() {
        let (k, e) = parse_line("P 5 t fd5b:1e00::/64 we%25ird%20%3cx%3e@a b@t").unwrap();
        assert_eq!(e, Entry::Pending { first: 5 });
        assert_eq!(
            k,
            GreyKey::Triplet {
                net: "fd5b:1e00::/64".parse().unwrap(),
                sender: "we%ird <x>@a".into(),
                rcpt: "b@t".into()
            }
        );
        assert!(parse_line("A 7 c 198.51.100.1").is_some());
        assert!(parse_line("A 12 t 198.51.100.0/24 a@x").is_none());
    }
}
