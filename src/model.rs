//! Shared vocabulary of mail state — flag sets, mailbox GUIDs, which Maildir subdirectory a
//! message lives in. No I/O and no knowledge of any file format beyond single letters.

use std::fmt;

/// Maildir flag letters of one message: uppercase letters (system flags `D F P R S T`, and
/// any other uppercase letter, kept verbatim) and lowercase keyword letters `a`–`z`, whose
/// meaning is per mailbox (`dovecot-keywords`). Two `u32` bitsets: 8 bytes, `Copy`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Flags {
    /// Bit `i` = letter `'A' + i`.
    pub system: u32,
    /// Bit `i` = keyword letter `'a' + i`.
    pub keywords: u32,
}

impl Flags {
    /// Adds one letter; returns false (and adds nothing) for anything but `A–Z`/`a–z`.
    pub fn insert_letter(&mut self, letter: u8) -> bool {
        match letter {
            b'A'..=b'Z' => self.system |= 1 << (letter - b'A'),
            b'a'..=b'z' => self.keywords |= 1 << (letter - b'a'),
            _ => return false,
        }
        true
    }

    /// True when no letter is set.
    pub fn is_empty(self) -> bool {
        self.system == 0 && self.keywords == 0
    }

    /// Appends the letters in the order Dovecot writes them: uppercase, then lowercase, each
    /// ascending.
    pub fn push_letters(self, out: &mut String) {
        for i in 0..26u8 {
            if self.system & (1 << i) != 0 {
                out.push((b'A' + i) as char);
            }
        }
        for i in 0..26u8 {
            if self.keywords & (1 << i) != 0 {
                out.push((b'a' + i) as char);
            }
        }
    }

    /// The letters as a string, for reports and tests.
    pub fn to_letters(self) -> String {
        let mut s = String::new();
        self.push_letters(&mut s);
        s
    }
}

/// Which Maildir subdirectory holds a message. `new/` means Dovecot still shows it as
/// \Recent, so a backup keeps it there.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Subdir {
    /// `new/`: delivered, not yet seen by a client.
    New,
    /// `cur/`: everything else.
    Cur,
}

impl Subdir {
    /// The directory name on disk.
    pub fn as_str(self) -> &'static str {
        match self {
            Subdir::New => "new",
            Subdir::Cur => "cur",
        }
    }
}

impl fmt::Display for Subdir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A 128-bit mailbox GUID as Dovecot writes it in the uidlist header (32 lowercase hex).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub struct MailboxGuid(pub [u8; 16]);

impl MailboxGuid {
    /// Parses exactly 32 hex digits.
    pub fn parse_hex(text: &str) -> Option<MailboxGuid> {
        if text.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(MailboxGuid(out))
    }
}

impl fmt::Display for MailboxGuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Stamps closer than this to a scan are "racy": a change in the same clock tick would not
/// move them, so they are not trusted next time.
pub const RACY_SECS: i64 = 2;

/// Identity of one file or directory at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    /// mtime in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// ctime in nanoseconds since the epoch.
    pub ctime_ns: i64,
    /// Inode number (a replaced file has a new one).
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The stamps that decide whether a mailbox changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MailboxStamps {
    /// `cur/`, `new/`, `dovecot-uidlist`, `dovecot-keywords`.
    pub parts: [Stamp; 4],
}

impl MailboxStamps {
    /// True when a part changed so recently that a change in the same tick could hide.
    pub fn is_racy(&self, scan_started_ns: i64) -> bool {
        let margin = RACY_SECS * 1_000_000_000;
        self.parts.iter().any(|s| {
            s.mtime_ns >= scan_started_ns - margin || s.ctime_ns >= scan_started_ns - margin
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_round_trip_in_dovecot_order() {
        let mut f = Flags::default();
        for b in b"cSaRP" {
            assert!(f.insert_letter(*b));
        }
        assert_eq!(f.to_letters(), "PRSac");
        assert!(!f.insert_letter(b'1'));
    }

    #[test]
    fn flags_record_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<Flags>(), 8);
    }

    #[test]
    fn guid_hex_round_trip() {
        let text = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
        let g = MailboxGuid::parse_hex(text).unwrap();
        assert_eq!(g.to_string(), text);
        assert!(MailboxGuid::parse_hex("xyz").is_none());
        assert!(MailboxGuid::parse_hex(&"g".repeat(32)).is_none());
    }
}
