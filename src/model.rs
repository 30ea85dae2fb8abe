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

/// How close to a scan a stamp may be before it is "racy": a change in the same clock tick
/// would not move it, so it is not trusted. Two seconds, as Dovecot allows for its own
/// index, wherever the filesystem's clock is coarse or not our own (second-granularity
/// timestamps, network filesystems whose server stamps the times).
pub const COARSE_RACY_NS: i64 = 2_000_000_000;

/// The racy margin on a local filesystem with nanosecond timestamps: the kernel stamps with
/// its coarse clock, which lags by at most one tick (10 ms at the slowest `HZ`), so a change
/// made after a scan started is always stamped later than this margin before it.
pub const FINE_RACY_NS: i64 = 100_000_000;

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
    /// `margin_ns` is the filesystem's margin ([`FINE_RACY_NS`] or [`COARSE_RACY_NS`]); a
    /// part stamped in whole seconds shows a coarse clock and gets the coarse margin.
    pub fn is_racy(&self, scan_started_ns: i64, margin_ns: i64) -> bool {
        let margin = if self.has_whole_second_stamps() {
            margin_ns.max(COARSE_RACY_NS)
        } else {
            margin_ns
        };
        self.parts.iter().any(|s| {
            s.mtime_ns >= scan_started_ns - margin || s.ctime_ns >= scan_started_ns - margin
        })
    }

    /// True when an existing part's times carry no fraction of a second.
    fn has_whole_second_stamps(&self) -> bool {
        const SECOND: i64 = 1_000_000_000;
        self.parts
            .iter()
            .filter(|s| s.ino != 0)
            .any(|s| s.mtime_ns % SECOND == 0 && s.ctime_ns % SECOND == 0)
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

    fn stamps_at(ns: i64) -> MailboxStamps {
        let part = Stamp {
            mtime_ns: ns,
            ctime_ns: ns,
            ino: 7,
            size: 1,
        };
        MailboxStamps { parts: [part; 4] }
    }

    #[test]
    fn racy_margin_is_fine_only_for_sub_second_stamps() {
        let scan = 100 * 1_000_000_000;
        let recent = stamps_at(scan - 500_000_123);
        assert!(!recent.is_racy(scan, FINE_RACY_NS));
        assert!(recent.is_racy(scan, COARSE_RACY_NS));
        assert!(stamps_at(scan - 50_000_123).is_racy(scan, FINE_RACY_NS));
        // A filesystem that stamps whole seconds is treated as coarse whatever it is.
        assert!(stamps_at(scan - 1_000_000_000).is_racy(scan, FINE_RACY_NS));
        assert!(!stamps_at(scan - 3_000_000_000).is_racy(scan, FINE_RACY_NS));
        // Missing parts (inode 0) say nothing about the clock.
        let mut one_missing = recent;
        one_missing.parts[3] = Stamp::default();
        assert!(!one_missing.is_racy(scan, FINE_RACY_NS));
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
