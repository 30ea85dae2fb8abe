//! Dovecot's multi-dbox (mdbox) storage, read directly from disk: the dbox message files
//! (`storage/m.N`), Dovecot's index format with its transaction log (the map index in
//! `storage/` and one index per mailbox), and the folder tree under `mailboxes/`. Reads
//! only; never writes, locks or repairs a file.

pub mod append;
pub mod dbox;
pub mod health;
pub mod index;
pub mod layout;
pub mod log;
pub mod log_writer;
pub mod mailbox;
pub mod map;
pub mod store;

use std::path::{Path, PathBuf};

/// A file that does not hold what its format promises, with the path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct Corrupt {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub what: String,
}

impl Corrupt {
    /// A complaint about `path`.
    pub fn new(path: &Path, what: impl Into<String>) -> Corrupt {
        Corrupt {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

impl From<Corrupt> for crate::Error {
    fn from(c: Corrupt) -> crate::Error {
        crate::Error::Corrupt {
            path: c.path,
            what: c.what,
        }
    }
}

/// Reads a little-endian `u32` at `at`; the caller checked the length.
fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads a little-endian `u16` at `at`; the caller checked the length.
fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}

/// Rounds `n` up to a multiple of `align` (a power of two).
fn align_up(n: usize, align: usize) -> usize {
    (n + align - 1) & !(align - 1)
}

/// The 128-bit form of a message GUID string, as Dovecot stores it in the `guid`
/// extension: 32 hex digits parsed directly, anything else (a Maildir base name) hashed
/// with SHA-1, keeping the last 16 bytes of the digest.
pub fn guid_128(text: &str) -> [u8; 16] {
    if let Some(g) = crate::model::MailboxGuid::parse_hex(text) {
        return g.0;
    }
    use sha1::Digest;
    let digest = sha1::Sha1::digest(text.as_bytes());
    digest[4..20].try_into().expect("16 bytes")
}

/// 32 lowercase hex digits of a 128-bit GUID, as doveadm prints it.
pub fn guid_hex(guid: &[u8; 16]) -> String {
    guid.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fixture tree of testdata/mdbox (written by Dovecot; see its README).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/mdbox")
        .join(name)
}

#[cfg(test)]
mod guid_tests {
    use super::*;

    #[test]
    fn guids_become_128_bits_like_dovecot_does() {
        // Observed: mdbox stored this for a message dsync'ed from Maildir.
        let name = "1795388138.M203114P9617.vm,S=132,W=139";
        assert_eq!(
            guid_hex(&guid_128(name)),
            "6632e09c06c4daa14ec294e4e05b3668"
        );
        let hex = "c98c60300ad5036b2e75000083ecc375";
        assert_eq!(guid_hex(&guid_128(hex)), hex);
    }
}

#[cfg(test)]
mod fixture_tests {
    //! The readers against trees Dovecot wrote (testdata/mdbox, see its README): each must
    //! report exactly what `doveadm` reported about the same tree.

    use super::layout::list_mailboxes;
    use super::mailbox::MailboxIndex;
    use super::map::MapIndex;
    use super::*;

    fn expected(name: &str, ext: &str) -> Vec<String> {
        let text = std::fs::read_to_string(fixture(&format!("{name}.{ext}"))).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort();
        lines
    }

    /// `doveadm fetch 'mailbox uid guid flags'` and `mailbox status` lines as the readers
    /// see the tree.
    fn as_doveadm(name: &str) -> (Vec<String>, Vec<String>) {
        let root = fixture(name);
        let (mut fetch, mut status) = (Vec::new(), Vec::new());
        for mb in list_mailboxes(&root).unwrap() {
            let index = MailboxIndex::load(&mb.index_dir).unwrap().unwrap();
            for m in &index.messages {
                let mut flags: Vec<&str> = [
                    (0x01, "\\Answered"),
                    (0x02, "\\Flagged"),
                    (0x04, "\\Deleted"),
                    (0x08, "\\Seen"),
                    (0x10, "\\Draft"),
                ]
                .iter()
                .filter(|(bit, _)| m.flags & bit != 0)
                .map(|(_, f)| *f)
                .collect();
                flags.extend(index.keywords_of(m));
                let line = format!(
                    "{}\t{}\t{}\t{}",
                    mb.name,
                    m.uid,
                    guid_hex(&m.guid),
                    flags.join(" ")
                );
                fetch.push(line);
            }
            status.push(format!(
                "{}\t{}\t{}\t{}\t{}",
                mb.name,
                index.messages.len(),
                index.next_uid,
                index.uid_validity,
                guid_hex(&index.mailbox_guid.unwrap())
            ));
        }
        fetch.sort();
        status.sort();
        (fetch, status)
    }

    #[test]
    fn readers_report_what_doveadm_reported() {
        for tree in ["live", "purged", "resynced"] {
            let (fetch, status) = as_doveadm(tree);
            assert_eq!(fetch, expected(tree, "fetch"), "{tree}: fetch");
            assert_eq!(status, expected(tree, "status"), "{tree}: status");
        }
    }

    #[test]
    fn every_message_body_is_where_the_map_says() {
        for tree in ["live", "purged", "resynced"] {
            let root = fixture(tree);
            let map = MapIndex::load(&root.join("storage")).unwrap();
            for mb in list_mailboxes(&root).unwrap() {
                let index = MailboxIndex::load(&mb.index_dir).unwrap().unwrap();
                assert_eq!(
                    index.map_uid_validity, map.uid_validity,
                    "{tree} {}",
                    mb.name
                );
                for m in &index.messages {
                    let entry = map.get(m.map_uid).unwrap();
                    assert!(entry.refcount >= 1, "{tree} {} uid {}", mb.name, m.uid);
                    let path = layout::file_path(&root, entry.file_id);
                    let data = std::fs::read(&path).unwrap();
                    let msg = dbox::read_message(&path, &data, entry.offset as usize, entry.size)
                        .unwrap();
                    assert_eq!(msg.meta.guid, guid_hex(&m.guid));
                    assert!(data[msg.body.clone()].starts_with(b"From: alice@example.org\n"));
                }
            }
        }
    }

    #[test]
    fn refcounts_follow_copies_expunges_and_purge() {
        let refs = |tree: &str| -> Vec<u16> {
            let map = MapIndex::load(&fixture(tree).join("storage")).unwrap();
            let mut r: Vec<u16> = map.entries.iter().map(|e| e.refcount).collect();
            r.sort();
            r
        };
        // live: 11 saves; INBOX 1 copied to Archive (2); INBOX 2 copied, then expunged
        // from INBOX (1); INBOX 5 and Sent 2 expunged (0); the rest 1.
        let live = refs("live");
        assert_eq!(live, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2]);
        let purged = refs("purged");
        assert_eq!(purged, [1, 1, 1, 1, 1, 1, 1, 1, 2]);
    }
}

#[cfg(test)]
mod damage_tests {
    //! Damaged copies of a real tree: errors name the file, a torn log tail is left out.

    use std::path::{Path, PathBuf};

    use super::mailbox::MailboxIndex;
    use super::map::MapIndex;
    use super::*;

    fn copy_live() -> (tempfile::TempDir, PathBuf) {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/mdbox/live");
        let tmp = tempfile::tempdir().unwrap();
        let dst = tmp.path().join("live");
        copy_dir(&src, &dst);
        (tmp, dst)
    }

    fn copy_dir(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            let to = dst.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &to);
            } else {
                std::fs::copy(entry.path(), &to).unwrap();
            }
        }
    }

    #[test]
    fn a_torn_tail_transaction_changes_nothing() {
        let (_tmp, root) = copy_live();
        let inbox = root.join("mailboxes/INBOX/dbox-Mails");
        let before = MailboxIndex::load(&inbox).unwrap().unwrap();
        let log = inbox.join("dovecot.index.log");
        let mut data = std::fs::read(&log).unwrap();
        // A boundary announcing 200 bytes, then half an append: an unfinished write.
        data.extend([0x80, 0x80, 0x80, 0x83, 0, 0, 0x08, 0x10, 200, 0, 0, 0]);
        data.extend([0x80, 0x80, 0x80, 0x84, 0x02, 0, 0, 0x10, 99]);
        std::fs::write(&log, &data).unwrap();
        let after = MailboxIndex::load(&inbox).unwrap().unwrap();
        assert_eq!(after.messages, before.messages);
        assert_eq!(after.next_uid, before.next_uid);
    }

    #[test]
    fn damaged_files_are_errors_naming_them() {
        let (_tmp, root) = copy_live();
        let inbox = root.join("mailboxes/INBOX/dbox-Mails");
        let log = inbox.join("dovecot.index.log");
        let mut data = std::fs::read(&log).unwrap();
        data.extend([0x12, 0x34, 0x56, 0x78, 1, 2, 3, 4, 5, 6, 7, 8]);
        std::fs::write(&log, &data).unwrap();
        let err = MailboxIndex::load(&inbox).unwrap_err().to_string();
        assert!(err.starts_with(&log.display().to_string()), "{err}");

        let index = root.join("mailboxes/Sent/dbox-Mails/dovecot.index");
        let mut data = std::fs::read(&index).unwrap();
        data[0] = 9;
        std::fs::write(&index, &data).unwrap();
        let err = MailboxIndex::load(index.parent().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported index version 9"), "{err}");

        let map = MapIndex::load(&root.join("storage")).unwrap();
        let last = map
            .entries
            .iter()
            .max_by_key(|e| (e.file_id, e.offset))
            .unwrap();
        let file = layout::file_path(&root, last.file_id);
        let data = std::fs::read(&file).unwrap();
        std::fs::write(&file, &data[..data.len() - 10]).unwrap();
        let data = std::fs::read(&file).unwrap();
        let err = dbox::read_message(&file, &data, last.offset as usize, last.size).unwrap_err();
        assert!(
            err.to_string().starts_with(&file.display().to_string()),
            "{err}"
        );
    }
}
