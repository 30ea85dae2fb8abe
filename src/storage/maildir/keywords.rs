//! `dovecot-keywords`: the per-mailbox map from keyword letters (`a`–`z`) to names. Parses
//! and renders text only; never reads or writes files.

/// The keywords file name inside a mailbox directory.
pub const FILE_NAME: &str = "dovecot-keywords";

/// Number of keyword letters a Maildir file name can carry.
pub const LETTERS: usize = 26;

/// Letter index → keyword name for one mailbox. Gaps are allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeywordMap {
    /// `names[i]` is the keyword written as letter `'a' + i`.
    pub names: [Option<String>; LETTERS],
}

impl KeywordMap {
    /// Parses the file; bad lines, indexes past `z` and repeated names are skipped, as
    /// Dovecot does.
    pub fn parse(text: &str) -> KeywordMap {
        let mut map = KeywordMap::default();
        for line in text.lines() {
            let Some((index, name)) = line.split_once(' ') else {
                continue;
            };
            let Ok(index) = index.parse::<usize>() else {
                continue;
            };
            if index >= LETTERS || name.is_empty() || map.index_of(name).is_some() {
                continue;
            }
            map.names[index] = Some(name.to_string());
        }
        map
    }

    /// The letter index of a name (case-insensitive, as IMAP keywords are).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names
            .iter()
            .position(|n| n.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(name)))
    }

    /// The name behind a letter index.
    pub fn name(&self, index: usize) -> Option<&str> {
        self.names.get(index).and_then(|n| n.as_deref())
    }

    /// Gives `name` a letter: its existing one, else the first free one. `None` when all 26
    /// letters are taken.
    pub fn assign(&mut self, name: &str) -> Option<usize> {
        self.assign_avoiding(name, 0)
    }

    /// Like [`KeywordMap::assign`], but never hands out a free letter whose bit is set in
    /// `reserved` (letters in use without a name).
    pub fn assign_avoiding(&mut self, name: &str, reserved: u32) -> Option<usize> {
        if let Some(i) = self.index_of(name) {
            return Some(i);
        }
        let free = (0..LETTERS).find(|&i| self.names[i].is_none() && reserved & (1 << i) == 0)?;
        self.names[free] = Some(name.to_string());
        Some(free)
    }

    /// True when no letter is mapped.
    pub fn is_empty(&self) -> bool {
        self.names.iter().all(Option::is_none)
    }

    /// Renders the file as Dovecot writes it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, name) in self.names.iter().enumerate() {
            if let Some(name) = name {
                out.push_str(&format!("{i} {name}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_gaps_and_skips_junk() {
        let map = KeywordMap::parse("0 $Junk\n1 NonJunk\nnonsense\n4 $label5\n30 x\n5 $junk\n");
        assert_eq!(map.name(0), Some("$Junk"));
        assert_eq!(map.name(4), Some("$label5"));
        assert_eq!(
            map.name(5),
            None,
            "duplicate name (case-insensitive) is skipped"
        );
        assert_eq!(map.index_of("nonjunk"), Some(1));
        assert_eq!(map.render(), "0 $Junk\n1 NonJunk\n4 $label5\n");
    }

    #[test]
    fn assign_fills_gaps_then_refuses() {
        let mut map = KeywordMap::parse("1 a\n");
        assert_eq!(map.assign("b"), Some(0));
        assert_eq!(map.assign("a"), Some(1));
        for i in 0..24 {
            assert!(map.assign(&format!("k{i}")).is_some());
        }
        assert_eq!(map.assign("one-too-many"), None);
    }
}
