//! Case-insensitive `*`/`?` patterns for sender addresses and HELO names.

/// A compiled pattern. `<>` matches only the null sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Vec<char>);

impl Pattern {
    pub fn new(p: &str) -> Pattern {
        Pattern(p.to_lowercase().chars().collect())
    }

    /// True when the whole of `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        let t: Vec<char> = text.to_lowercase().chars().collect();
        glob(&self.0, &t)
    }
}

/// Iterative wildcard match with one backtrack point: linear in practice,
/// never exponential on hostile input.
fn glob(p: &[char], t: &[char]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// A list of patterns; matches when any does.
#[derive(Debug, Clone, Default)]
pub struct PatternList(Vec<Pattern>);

impl PatternList {
    pub fn new(items: &[String]) -> PatternList {
        PatternList(items.iter().map(|s| Pattern::new(s)).collect())
    }

    pub fn matches(&self, text: &str) -> bool {
        self.0.iter().any(|p| p.matches(text))
    }

    /// Matches an envelope sender; the null sender is tested as `<>`.
    pub fn matches_sender(&self, sender: &str) -> bool {
        let s = if sender.is_empty() { "<>" } else { sender };
        self.matches(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(Pattern::new("double-bounce@*").matches("Double-Bounce@mx.example"));
        assert!(!Pattern::new("double-bounce@*").matches("x-double-bounce@mx.example"));
        assert!(Pattern::new("*@spam.example").matches("a@spam.example"));
        assert!(!Pattern::new("*@spam.example").matches("a@spam.example.org"));
        assert!(Pattern::new("*.dyn.example").matches("1-2-3-4.dyn.example"));
        assert!(Pattern::new("h?st").matches("host"));
        assert!(Pattern::new("*a*b*c*").matches("xxaxxbxxc"));
        assert!(!Pattern::new("*a*b*c*").matches("xxaxxcxxb"));
        assert!(Pattern::new("*").matches(""));
    }

    #[test]
    fn null_sender() {
        let l = PatternList::new(&["<>".to_string()]);
        assert!(l.matches_sender(""));
        assert!(!l.matches_sender("a@b"));
    }

    #[test]
    fn hostile_pattern_is_fast() {
        let p = Pattern::new(&"*a".repeat(50));
        let t = "a".repeat(2000) + "b";
        assert!(!p.matches(&t));
    }
}
