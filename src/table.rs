//! The compact in-memory picture of one replica: per mailbox, its uidlist header, keyword map
//! and a struct-of-arrays message table whose strings live in one arena. Built by the
//! scanner, read by the differ; holds no file handles and does no I/O.

use std::ops::Range;

use crate::model::{Flags, MailboxGuid, MailboxStamps, Subdir};
use crate::storage::maildir::keywords::KeywordMap;
use crate::storage::maildir::layout::Layout;
use crate::storage::maildir::uidlist::Header;

/// A string stored in a mailbox's arena: byte offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StrRef {
    /// Byte offset in the arena.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

/// Status bits of a message.
pub mod status {
    /// The file is in `new/` (else `cur/`).
    pub const IN_NEW: u8 = 1;
    /// The name's info part is not a plain `:2,FLAGS`; the name is carried verbatim.
    pub const ODD_NAME: u8 = 2;
    /// The entry cannot be copied (symlink, bad name, unreadable); its counterpart on the
    /// other side is left alone.
    pub const BROKEN: u8 = 4;
    /// The size is unknown (no `,S=` and not stat'ed).
    pub const SIZE_UNKNOWN: u8 = 8;
    /// Only in a two-way merge's target tables: the flags column and `IN_NEW` are what the
    /// message should have, while the name is still the file's real name on the side it
    /// comes from (so a copy can open it); the differ composes the wanted name.
    pub const STALE_NAME: u8 = 16;
}

/// Hasher for the name maps of the scanner, the differ and the applier: one one-shot xxh3
/// call per key. The streaming `Xxh3Builder` costs several times as much on 50-byte file
/// names, and these maps hold every message of a mailbox. Not keyed, like the xxh3 maps
/// it replaces.
#[derive(Debug, Default, Clone, Copy)]
pub struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Builds [`NameHasher`]s.
pub type NameHash = std::hash::BuildHasherDefault<NameHasher>;

/// Sentinel for "no extras".
pub const NO_EXTRAS: u32 = u32::MAX;

/// Uidlist extension fields of one message, kept only for the few messages that have them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extras {
    /// `G` value: the message GUID when it differs from the base name.
    pub guid: Option<StrRef>,
    /// Other fields (`P`, `O`, `S`, `W`, …) verbatim.
    pub ext: Option<StrRef>,
}

/// The messages of one mailbox as parallel arrays, sorted by UID with unlisted messages
/// (UID 0, not yet numbered by Dovecot) last. No per-message heap object.
#[derive(Debug, Clone, Default)]
pub struct Messages {
    /// UID from the uidlist, 0 when the file is not listed yet.
    pub uid: Vec<u32>,
    /// Offset of the full file name in the arena.
    pub name_offset: Vec<u32>,
    /// Length of the full file name.
    pub name_len: Vec<u16>,
    /// Length of the base name (prefix of the file name, up to the first `:`).
    pub base_len: Vec<u16>,
    /// Flags parsed from the name.
    pub flags: Vec<Flags>,
    /// Physical size in bytes (`,S=` or stat), saturated at `u32::MAX`.
    pub size: Vec<u32>,
    /// Index into [`MailboxTable::extras`] or [`NO_EXTRAS`].
    pub extras: Vec<u32>,
    /// [`status`] bits.
    pub status: Vec<u8>,
}

impl Messages {
    /// Makes room for `additional` more rows in every column.
    pub fn reserve(&mut self, additional: usize) {
        self.uid.reserve(additional);
        self.name_offset.reserve(additional);
        self.name_len.reserve(additional);
        self.base_len.reserve(additional);
        self.flags.reserve(additional);
        self.size.reserve(additional);
        self.extras.reserve(additional);
        self.status.reserve(additional);
    }
}

/// Bytes one message costs in [`Messages`], excluding its name in the arena.
pub const RECORD_BYTES: usize = 4 + 4 + 2 + 2 + 8 + 4 + 4 + 1;

/// Where each message's body lives in an mdbox store (`m.<file_id>` at `offset`), parallel
/// to [`Messages`]; empty for a Maildir table, whose bodies are the named files.
#[derive(Debug, Clone, Default)]
pub struct DboxColumns {
    /// `N` of the `m.N` file.
    pub file_id: Vec<u32>,
    /// Offset of the message record in that file.
    pub offset: Vec<u32>,
}

/// Extra bytes one mdbox message costs in [`DboxColumns`].
pub const DBOX_RECORD_BYTES: usize = 4 + 4;

/// Where a mailbox directory came from on disk: mode and owner, recreated on the mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DirMeta {
    /// Permission bits.
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
}

/// Something odd the scanner saw, with the path it concerns.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Anomaly {
    /// Path relative to the replica root.
    pub path: String,
    /// What is wrong.
    pub what: String,
    /// True when the entry is not copied (an error); false for a warning.
    pub serious: bool,
}

/// One scanned mailbox.
#[derive(Debug, Clone, Default)]
pub struct MailboxTable {
    /// Directory relative to the root (`""` is INBOX).
    pub dir: String,
    /// User-visible name (`INBOX`, `Archive/2023`).
    pub name: String,
    /// Uidlist header, when the mailbox has a uidlist.
    pub header: Option<Header>,
    /// Next UID Dovecot would assign (max of `N` and the last record + 1); 1 without a uidlist.
    pub next_uid: u32,
    /// Letter ↔ keyword name map of this mailbox.
    pub keywords: KeywordMap,
    /// Mode and owner of the mailbox directory.
    pub dir_meta: DirMeta,
    /// The messages.
    pub msgs: Messages,
    /// Uidlist records whose file was not found: (uid, base name). A message missing only
    /// because it was being renamed must be confirmed before its copy is expunged.
    pub listed_missing: Vec<(u32, StrRef)>,
    /// Sparse uidlist extension fields.
    pub extras: Vec<Extras>,
    /// All strings of this mailbox.
    pub arena: String,
    /// Why this mailbox must not be touched (corrupt uidlist, unreadable directory).
    pub broken: Option<String>,
    /// True when it is broken because its directory was gone when it was read: renamed
    /// or deleted while this run read it. Not bad input: the run ends "partial" (exit 2)
    /// rather than in error, and the next run finds the folder under its new name.
    pub vanished: bool,
    /// Problems with single entries.
    pub anomalies: Vec<Anomaly>,
    /// Stamps of `cur/`, `new/`, uidlist and keywords, taken before the mailbox was read.
    pub stamps: MailboxStamps,
    /// True when nothing in the mailbox moved while it was read: its stamps were the same
    /// before and after, and old enough to trust. A uidlist record without a file is then
    /// really expunged, not a file `readdir` missed during a rename.
    pub settled: bool,
    /// `Some(message count)` when the mailbox was not read at all: its stamps equal those of
    /// the last run that left this pair in sync. Such a table holds no messages.
    pub unchanged: Option<u64>,
    /// True when the whole-replica scan listed this mailbox from disk: it was neither
    /// skipped as unchanged nor taken from the scan cache (see `scan::save_cache`).
    pub fresh: bool,
    /// Body locations when the mailbox comes from an mdbox store.
    pub dbox: DboxColumns,
    /// True when the store has no `new/` and `cur/` (mdbox): every row is in `cur/`, and a
    /// source message in `new/` matches it without a move.
    pub flat: bool,
}

impl MailboxTable {
    /// Messages on disk, also for a mailbox that was not read ([`MailboxTable::unchanged`]).
    pub fn message_count(&self) -> u64 {
        self.unchanged.unwrap_or(self.len() as u64)
    }

    /// Number of messages in the table.
    pub fn len(&self) -> usize {
        self.msgs.uid.len()
    }

    /// True when the mailbox holds no message.
    pub fn is_empty(&self) -> bool {
        self.msgs.uid.is_empty()
    }

    /// Stores a string in the arena.
    pub fn intern(&mut self, text: &str) -> StrRef {
        let offset = self.arena.len() as u32;
        self.arena.push_str(text);
        StrRef {
            offset,
            len: text.len() as u32,
        }
    }

    /// Reads a string back from the arena.
    pub fn str(&self, r: StrRef) -> &str {
        &self.arena[r.offset as usize..(r.offset + r.len) as usize]
    }

    /// Full file name of message `i`.
    pub fn name(&self, i: usize) -> &str {
        let start = self.msgs.name_offset[i] as usize;
        &self.arena[start..start + self.msgs.name_len[i] as usize]
    }

    /// Base name of message `i` (before the first `:`).
    pub fn base(&self, i: usize) -> &str {
        let start = self.msgs.name_offset[i] as usize;
        &self.arena[start..start + self.msgs.base_len[i] as usize]
    }

    /// The message GUID as Dovecot derives it: the uidlist `G` field, else the base name.
    pub fn guid(&self, i: usize) -> &str {
        self.extras_of(i)
            .and_then(|e| e.guid)
            .map_or_else(|| self.base(i), |g| self.str(g))
    }

    /// Other uidlist extension fields of message `i`, verbatim (empty when none).
    pub fn ext(&self, i: usize) -> &str {
        self.extras_of(i)
            .and_then(|e| e.ext)
            .map_or("", |e| self.str(e))
    }

    fn extras_of(&self, i: usize) -> Option<&Extras> {
        let id = self.msgs.extras[i];
        (id != NO_EXTRAS).then(|| &self.extras[id as usize])
    }

    /// Path of message `i` relative to the replica root, for messages to the user.
    pub fn rel_path(&self, i: usize) -> String {
        let path = format!("{}/{}/{}", self.dir, self.subdir(i), self.name(i));
        path.trim_start_matches('/').to_string()
    }

    /// Which subdirectory holds message `i`.
    pub fn subdir(&self, i: usize) -> Subdir {
        if self.msgs.status[i] & status::IN_NEW != 0 {
            Subdir::New
        } else {
            Subdir::Cur
        }
    }

    /// True when message `i` has status bit `bit`.
    pub fn has(&self, i: usize, bit: u8) -> bool {
        self.msgs.status[i] & bit != 0
    }

    /// Total size in bytes of all messages.
    pub fn bytes(&self) -> u64 {
        self.msgs.size.iter().map(|&s| u64::from(s)).sum()
    }

    /// The mailbox GUID from the uidlist header.
    pub fn guid_of_mailbox(&self) -> Option<MailboxGuid> {
        self.header.as_ref().and_then(|h| h.guid)
    }

    /// Appends one message, interning its name; the caller keeps the rows sorted (or calls
    /// [`MailboxTable::sort_by_uid`]).
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        uid: u32,
        name: &str,
        base_len: usize,
        flags: Flags,
        size: u32,
        extras: Option<Extras>,
        status_bits: u8,
    ) {
        let r = self.intern(name);
        self.push_interned(uid, r, base_len, flags, size, extras, status_bits);
    }

    /// Appends one message whose name is already in the arena.
    #[allow(clippy::too_many_arguments)]
    pub fn push_interned(
        &mut self,
        uid: u32,
        r: StrRef,
        base_len: usize,
        flags: Flags,
        size: u32,
        extras: Option<Extras>,
        status_bits: u8,
    ) {
        let name_len = r.len as usize;
        self.msgs.uid.push(uid);
        self.msgs.name_offset.push(r.offset);
        self.msgs
            .name_len
            .push(name_len.min(u16::MAX as usize) as u16);
        self.msgs
            .base_len
            .push(base_len.min(u16::MAX as usize) as u16);
        self.msgs.flags.push(flags);
        self.msgs.size.push(size);
        let id = match extras {
            Some(e) => {
                self.extras.push(e);
                (self.extras.len() - 1) as u32
            }
            None => NO_EXTRAS,
        };
        self.msgs.extras.push(id);
        self.msgs.status.push(status_bits);
    }

    /// Sorts messages by UID, unlisted (0) last in name order, so lookups can binary-search.
    pub fn sort_by_uid(&mut self) {
        let n = self.len();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|&a, &b| {
            let (ua, ub) = (self.msgs.uid[a as usize], self.msgs.uid[b as usize]);
            (ua == 0, ua, self.name(a as usize)).cmp(&(ub == 0, ub, self.name(b as usize)))
        });
        if order.iter().enumerate().all(|(i, &o)| i as u32 == o) {
            return;
        }
        let m = &self.msgs;
        self.msgs = Messages {
            uid: pick(&order, &m.uid),
            name_offset: pick(&order, &m.name_offset),
            name_len: pick(&order, &m.name_len),
            base_len: pick(&order, &m.base_len),
            flags: pick(&order, &m.flags),
            size: pick(&order, &m.size),
            extras: pick(&order, &m.extras),
            status: pick(&order, &m.status),
        };
        if !self.dbox.file_id.is_empty() {
            self.dbox = DboxColumns {
                file_id: pick(&order, &self.dbox.file_id),
                offset: pick(&order, &self.dbox.offset),
            };
        }
    }

    /// Index of the message with this UID.
    pub fn find_uid(&self, uid: u32) -> Option<usize> {
        let listed = self.msgs.uid.partition_point(|&u| u != 0);
        self.msgs.uid[..listed].binary_search(&uid).ok()
    }

    /// For each message, the index of the message in `other` with the same UID (`None` for
    /// unlisted messages and UIDs `other` lacks). Both tables keep their listed messages
    /// sorted by UID, so this is one merge walk instead of a search per message.
    pub fn rows_by_uid(&self, other: &MailboxTable) -> Vec<Option<usize>> {
        let mut out = vec![None; self.len()];
        let (mine, theirs) = (self.listed_range().end, other.listed_range().end);
        let (mut i, mut j) = (0, 0);
        while i < mine && j < theirs {
            let (a, b) = (self.msgs.uid[i], other.msgs.uid[j]);
            match a.cmp(&b) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    out[i] = Some(j);
                    i += 1;
                    j += 1;
                }
            }
        }
        out
    }

    /// The range of listed messages (UID ≠ 0).
    pub fn listed_range(&self) -> Range<usize> {
        0..self.msgs.uid.partition_point(|&u| u != 0)
    }

    /// Heap bytes held by this mailbox's message table, for the bytes-per-message report.
    pub fn heap_bytes(&self) -> usize {
        let m = &self.msgs;
        m.uid.capacity() * 4
            + m.name_offset.capacity() * 4
            + m.name_len.capacity() * 2
            + m.base_len.capacity() * 2
            + m.flags.capacity() * 8
            + m.size.capacity() * 4
            + m.extras.capacity() * 4
            + m.status.capacity()
            + (self.dbox.file_id.capacity() + self.dbox.offset.capacity()) * 4
            + self.arena.capacity()
            + self.extras.capacity() * std::mem::size_of::<Extras>()
    }
}

/// Reorders one column.
fn pick<T: Copy>(order: &[u32], column: &[T]) -> Vec<T> {
    order.iter().map(|&o| column[o as usize]).collect()
}

/// A whole replica.
#[derive(Debug, Clone)]
pub struct MailTable {
    /// The folder layout.
    pub layout: Layout,
    /// Mailboxes sorted by directory, INBOX (`""`) first.
    pub mailboxes: Vec<MailboxTable>,
    /// fs layout: directories that are only parents of folders (`\NoSelect`), sorted.
    pub parents: Vec<String>,
    /// Folder directories that exist but were not followed (symlinks, non-UTF-8 names):
    /// neither side's copy of them is ever created, changed or deleted.
    pub unfollowed: Vec<String>,
    /// The root `subscriptions` file, byte for byte.
    pub subscriptions: Option<Vec<u8>>,
    /// The root `dovecot-uidvalidity` value.
    pub uidvalidity_next: Option<u32>,
    /// Mode and owner of the root directory.
    pub root_meta: DirMeta,
    /// When the scan started (ns since the epoch), to tell racy stamps.
    pub scanned_at_ns: i64,
    /// Root-level anomalies (symlinked folders, odd names).
    pub anomalies: Vec<Anomaly>,
}

impl MailTable {
    /// The mailbox stored in directory `dir`.
    pub fn mailbox(&self, dir: &str) -> Option<&MailboxTable> {
        self.mailboxes
            .binary_search_by(|m| m.dir.as_str().cmp(dir))
            .ok()
            .map(|i| &self.mailboxes[i])
    }

    /// Total number of messages, including mailboxes that were not read.
    pub fn message_count(&self) -> u64 {
        self.mailboxes.iter().map(MailboxTable::message_count).sum()
    }

    /// True when `dir` is, or lies below, a folder that was not followed.
    pub fn is_unfollowed(&self, dir: &str) -> bool {
        self.unfollowed.iter().any(|u| {
            dir == u
                || dir
                    .strip_prefix(u.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Heap bytes of all message tables.
    pub fn heap_bytes(&self) -> usize {
        self.mailboxes.iter().map(MailboxTable::heap_bytes).sum()
    }
}

#[cfg(test)]
impl MailboxTable {
    /// This mailbox as a listing that missed the file of `base` (still in the uidlist)
    /// finds it — what `readdir` returns while Dovecot renames that file; `settled` as the
    /// scan judged it.
    pub(crate) fn with_file_missed(&self, base: &str, settled: bool) -> MailboxTable {
        let mut kept = MailboxTable {
            msgs: Messages::default(),
            arena: String::new(),
            extras: Vec::new(),
            settled,
            ..self.clone()
        };
        for i in 0..self.len() {
            if self.base(i) == base {
                let r = kept.intern(base);
                kept.listed_missing.push((self.msgs.uid[i], r));
                continue;
            }
            let m = &self.msgs;
            let extras = self.extras_of(i).map(|e| Extras {
                guid: e.guid.map(|r| kept.intern(self.str(r))),
                ext: e.ext.map(|r| kept.intern(self.str(r))),
            });
            let (name, base_len) = (self.name(i), m.base_len[i] as usize);
            kept.push(
                m.uid[i],
                name,
                base_len,
                m.flags[i],
                m.size[i],
                extras,
                m.status[i],
            );
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_is_compact() {
        // uid + name offset + name len + base len + flags + size + extras id + status
        assert_eq!(RECORD_BYTES, 29);
        assert_eq!(std::mem::size_of::<Flags>(), 8);
        // An mdbox message adds its body location: file id + offset.
        assert_eq!(DBOX_RECORD_BYTES, 8);
    }

    #[test]
    fn dbox_columns_follow_the_sort_and_count_in_heap_bytes() {
        let mut mb = MailboxTable::default();
        mb.push(9, "b", 1, Flags::default(), 1, None, 0);
        mb.push(2, "a", 1, Flags::default(), 1, None, 0);
        let before = mb.heap_bytes();
        mb.dbox.file_id = vec![7, 3];
        mb.dbox.offset = vec![700, 300];
        assert!(mb.heap_bytes() >= before + 2 * DBOX_RECORD_BYTES);
        mb.sort_by_uid();
        assert_eq!(mb.dbox.file_id, vec![3, 7]);
        assert_eq!(mb.dbox.offset, vec![300, 700]);
    }

    #[test]
    fn heap_bytes_per_message_stays_small() {
        let mut mb = MailboxTable::default();
        let n = 10_000;
        for i in 0..n {
            let name = format!("17000{i:05}.M{i}P4711.mx1,S=2048,W=2090:2,S");
            let base_len = name.find(':').unwrap();
            mb.push(i + 1, &name, base_len, Flags::default(), 2048, None, 0);
        }
        mb.msgs.uid.shrink_to_fit();
        let per_message = mb.heap_bytes() / n as usize;
        let name_len = mb.name(0).len();
        assert!(
            per_message <= RECORD_BYTES * 2 + name_len * 2,
            "{per_message} bytes per message"
        );
    }

    #[test]
    fn sort_puts_unlisted_last_and_find_uid_works() {
        let mut mb = MailboxTable::default();
        mb.push(0, "z", 1, Flags::default(), 1, None, 0);
        mb.push(7, "b:2,S", 1, Flags::default(), 1, None, 0);
        mb.push(3, "a", 1, Flags::default(), 1, None, status::IN_NEW);
        mb.sort_by_uid();
        assert_eq!(mb.msgs.uid, vec![3, 7, 0]);
        assert_eq!(mb.name(1), "b:2,S");
        assert_eq!(mb.base(1), "b");
        assert_eq!(mb.find_uid(7), Some(1));
        assert_eq!(mb.find_uid(0), None);
        assert_eq!(mb.subdir(0), Subdir::New);
        assert_eq!(mb.listed_range(), 0..2);
    }

    #[test]
    fn rows_by_uid_pairs_listed_messages_only() {
        let table = |uids: &[u32]| {
            let mut mb = MailboxTable::default();
            for (k, &uid) in uids.iter().enumerate() {
                mb.push(uid, &format!("m{k}"), 2, Flags::default(), 1, None, 0);
            }
            mb.sort_by_uid();
            mb
        };
        let a = table(&[2, 3, 5, 9, 0, 0]);
        let b = table(&[1, 3, 4, 5, 8, 9, 10, 0]);
        assert_eq!(
            a.rows_by_uid(&b),
            vec![None, Some(1), Some(3), Some(5), None, None]
        );
        for (i, found) in a.rows_by_uid(&b).into_iter().enumerate() {
            let uid = a.msgs.uid[i];
            assert_eq!(found, if uid == 0 { None } else { b.find_uid(uid) });
        }
        assert_eq!(b.rows_by_uid(&table(&[])), vec![None; 8]);
    }
}
