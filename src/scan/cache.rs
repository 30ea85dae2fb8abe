//! The scan cache: per mailbox, the stamps (mtime, ctime, inode, size) of `cur/`, `new/`,
//! `dovecot-uidlist` and `dovecot-keywords` together with the scanned table, so that a
//! mailbox whose stamps did not change is not listed again — the check Dovecot itself makes
//! before trusting its index. Only a mailbox whose stamps were settled when it was read is
//! kept: not racy (see [`racy_margin_ns`]: a change in the same clock tick would not move
//! them) and not moved while it was listed. Reads and writes only its own
//! cache file; a missing, foreign or damaged cache is an empty one.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::model::{COARSE_RACY_NS, FINE_RACY_NS, Flags, MailboxGuid, MailboxStamps, Stamp};
use crate::storage::maildir::keywords::{KeywordMap, LETTERS};
use crate::storage::maildir::uidlist::Header;
use crate::storage::maildir::{keywords, uidlist, writer};
use crate::table::{DirMeta, Extras, MailboxTable, Messages, StrRef};

/// Version 2: magic, stamps, xxh3-64 of the rest, then the mailbox. The stamps come first
/// so a changed mailbox costs one small read; the checksum makes a file torn by a crash
/// (cache files are not fsynced) a miss rather than a wrong table.
const MAGIC: &[u8; 8] = b"MDSYNCC\x02";
/// Magic, four stamps of four u64 fields, checksum.
const HEAD_LEN: usize = MAGIC.len() + 4 * 4 * 8 + 8;

/// Writes a cache file (a scan cache entry, a wire baseline) in `dir` as `file`: whole,
/// under a temp name first, not fsynced. The old file is unlinked before the new one is
/// renamed into its place rather than renamed over: replacing an existing file makes
/// ext4 start writing the new one back at once (`auto_da_alloc`): the far side's table
/// baselines after a 100,000-message run over ssh took 25–30 ms that way against 14–18 ms,
/// at the run's end, where the client waits. Killed in between, the cache only misses
/// that file.
pub(crate) fn put_cache_file(dir: &Path, file: &Path, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(writer::temp_name());
    let put = fs::write(&tmp, bytes)
        .and_then(|()| writer::remove_file_if_exists(file))
        .and_then(|()| fs::rename(&tmp, file));
    put.inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Stat stamp of one path (all zero when it is missing).
pub fn stamp_of(path: &Path) -> Stamp {
    match fs::symlink_metadata(path) {
        Ok(m) => Stamp {
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
            size: m.len(),
        },
        Err(_) => Stamp::default(),
    }
}

/// Stats the four parts of the mailbox in `path`: `cur/`, `new/`, `dovecot-uidlist`,
/// `dovecot-keywords`.
pub fn take_stamps(path: &Path) -> MailboxStamps {
    MailboxStamps {
        parts: [
            stamp_of(&path.join("cur")),
            stamp_of(&path.join("new")),
            stamp_of(&path.join(uidlist::FILE_NAME)),
            stamp_of(&path.join(keywords::FILE_NAME)),
        ],
    }
}

/// The racy margin for stamps of the tree holding `path`: fine on local filesystems known
/// to stamp with the kernel's own clock in nanoseconds, coarse on anything else (network
/// and FUSE filesystems, FAT, unknown ones) or when the filesystem cannot be asked.
pub fn racy_margin_ns(path: &Path) -> i64 {
    use nix::sys::statfs::{
        BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, F2FS_SUPER_MAGIC, FsType, TMPFS_MAGIC, XFS_SUPER_MAGIC,
    };
    const ZFS_SUPER_MAGIC: FsType = FsType(0x2fc1_2fc1);
    let fine = [
        EXT4_SUPER_MAGIC, // also ext2/ext3, whose second-granularity stamps say so themselves
        XFS_SUPER_MAGIC,
        BTRFS_SUPER_MAGIC,
        TMPFS_MAGIC,
        F2FS_SUPER_MAGIC,
        ZFS_SUPER_MAGIC,
    ];
    match nix::sys::statfs::statfs(path) {
        Ok(fs) if fine.contains(&fs.filesystem_type()) => FINE_RACY_NS,
        _ => COARSE_RACY_NS,
    }
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The cache of one root: a directory holding one file per mailbox, so a run reads and
/// rewrites only the mailboxes it needs.
#[derive(Debug, Clone)]
pub struct ScanCache {
    dir: PathBuf,
}

impl ScanCache {
    /// The directory of this root's cache.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache of `root` under `cache_dir`: `<cache_dir>/<xxh3 of the canonical root>/`.
    pub fn for_root(cache_dir: &Path, root: &Path) -> ScanCache {
        let canonical = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let hash = xxhash_rust::xxh3::xxh3_64(canonical.as_os_str().as_encoded_bytes());
        ScanCache {
            dir: cache_dir.join(format!("{hash:016x}")),
        }
    }

    fn file_for(&self, mailbox_dir: &str) -> PathBuf {
        let hash = xxhash_rust::xxh3::xxh3_64(mailbox_dir.as_bytes());
        self.dir.join(format!("{hash:016x}.mbox"))
    }

    /// The cached table of `mailbox_dir` when its stamps are exactly `stamps`. A missing,
    /// foreign or damaged file is a miss.
    pub fn take(&self, mailbox_dir: &str, stamps: &MailboxStamps) -> Option<MailboxTable> {
        use std::io::Read;
        let mut file = fs::File::open(self.file_for(mailbox_dir)).ok()?;
        let mut head = [0u8; HEAD_LEN];
        file.read_exact(&mut head).ok()?;
        let mut r = Reader { bytes: &head };
        if r.take(MAGIC.len())? != MAGIC || get_stamps(&mut r)? != *stamps {
            return None;
        }
        let checksum = r.u64()?;
        let mut body = Vec::new();
        file.read_to_end(&mut body).ok()?;
        if xxhash_rust::xxh3::xxh3_64(&body) != checksum {
            return None;
        }
        let mut r = Reader { bytes: &body };
        if r.string()? != mailbox_dir {
            return None;
        }
        decode_mailbox(&mut r, mailbox_dir)
    }

    /// Stores a freshly read mailbox with the stamps taken before it was read; one that was
    /// not settled (racy stamps, or a change while it was read) or broken is removed
    /// instead, so it is read again next time. Atomic per file.
    pub fn store(&self, mailbox: &MailboxTable) -> io::Result<()> {
        let file = self.file_for(&mailbox.dir);
        if !mailbox.settled || mailbox.broken.is_some() {
            return writer::remove_file_if_exists(&file);
        }
        let mut out = Vec::with_capacity(mailbox.arena.len() + mailbox.len() * 32 + 1024);
        out.extend_from_slice(MAGIC);
        put_stamps(&mut out, &mailbox.stamps);
        put_u64(&mut out, 0);
        put_str(&mut out, &mailbox.dir);
        encode_mailbox(&mut out, mailbox);
        let checksum = xxhash_rust::xxh3::xxh3_64(&out[HEAD_LEN..]);
        out[HEAD_LEN - 8..HEAD_LEN].copy_from_slice(&checksum.to_le_bytes());
        put_cache_file(&self.dir, &file, &out)
    }

    /// Removes the files of mailboxes that no longer exist.
    pub fn prune(&self, mailbox_dirs: &[String]) -> io::Result<()> {
        let keep: std::collections::HashSet<PathBuf> =
            mailbox_dirs.iter().map(|d| self.file_for(d)).collect();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            if !keep.contains(&entry.path()) {
                writer::remove_file_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// The default cache directory: `$XDG_CACHE_HOME/mdsync` or `$HOME/.cache/mdsync`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("mdsync"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("mdsync"))
}

/// Shared with the two-way base's encoding.
pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Shared with the two-way base's encoding.
pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Shared with the two-way base's encoding.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

fn put_column<T: Copy, const N: usize>(
    out: &mut Vec<u8>,
    column: &[T],
    bytes: impl Fn(T) -> [u8; N],
) {
    put_u32(out, column.len() as u32);
    for &v in column {
        out.extend_from_slice(&bytes(v));
    }
}

/// Shared with the two-way base's encoding.
pub(crate) fn put_stamps(out: &mut Vec<u8>, stamps: &MailboxStamps) {
    for s in &stamps.parts {
        put_u64(out, s.mtime_ns as u64);
        put_u64(out, s.ctime_ns as u64);
        put_u64(out, s.ino);
        put_u64(out, s.size);
    }
}

fn encode_mailbox(out: &mut Vec<u8>, m: &MailboxTable) {
    put_str(out, &m.name);
    match &m.header {
        Some(h) => {
            out.push(1);
            put_u32(out, h.uid_validity);
            put_u32(out, h.next_uid);
            out.push(u8::from(h.guid.is_some()));
            out.extend_from_slice(&h.guid.unwrap_or_default().0);
            put_str(out, &h.extra);
        }
        None => out.push(0),
    }
    put_u32(out, m.next_uid);
    for name in &m.keywords.names {
        put_str(out, name.as_deref().unwrap_or(""));
    }
    put_u32(out, m.dir_meta.mode);
    put_u32(out, m.dir_meta.uid);
    put_u32(out, m.dir_meta.gid);
    put_str(out, &m.arena);
    let msgs = &m.msgs;
    put_column(out, &msgs.uid, u32::to_le_bytes);
    put_column(out, &msgs.name_offset, u32::to_le_bytes);
    put_column(out, &msgs.name_len, u16::to_le_bytes);
    put_column(out, &msgs.base_len, u16::to_le_bytes);
    put_column(out, &msgs.flags, |f: Flags| {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&f.system.to_le_bytes());
        b[4..].copy_from_slice(&f.keywords.to_le_bytes());
        b
    });
    put_column(out, &msgs.size, u32::to_le_bytes);
    put_column(out, &msgs.extras, u32::to_le_bytes);
    put_column(out, &msgs.status, |s: u8| [s]);
    put_column(out, &m.listed_missing, |(uid, r): (u32, StrRef)| {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&uid.to_le_bytes());
        b[4..8].copy_from_slice(&r.offset.to_le_bytes());
        b[8..].copy_from_slice(&r.len.to_le_bytes());
        b
    });
    put_column(out, &m.extras, |e: Extras| {
        let mut b = [0u8; 18];
        let parts = [e.guid, e.ext];
        for (k, p) in parts.iter().enumerate() {
            b[k * 9] = u8::from(p.is_some());
            let r = p.unwrap_or_default();
            b[k * 9 + 1..k * 9 + 5].copy_from_slice(&r.offset.to_le_bytes());
            b[k * 9 + 5..k * 9 + 9].copy_from_slice(&r.len.to_le_bytes());
        }
        b
    });
    put_u32(out, m.anomalies.len() as u32);
    for a in &m.anomalies {
        put_str(out, &a.path);
        put_str(out, &a.what);
        out.push(u8::from(a.serious));
    }
}

/// A bounds-checked reader over the cache bytes.
/// A little-endian reader over a byte slice (also the two-way base's).
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    pub(crate) fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    fn column<T, const N: usize>(&mut self, from: impl Fn([u8; N]) -> T) -> Option<Vec<T>> {
        let len = self.u32()? as usize;
        let bytes = self.take(len.checked_mul(N)?)?;
        Some(
            bytes
                .chunks_exact(N)
                .map(|c| from(c.try_into().expect("chunk of N bytes")))
                .collect(),
        )
    }
}

/// Shared with the two-way base's encoding.
pub(crate) fn get_stamps(r: &mut Reader<'_>) -> Option<MailboxStamps> {
    let mut stamps = MailboxStamps::default();
    for s in &mut stamps.parts {
        *s = Stamp {
            mtime_ns: r.u64()? as i64,
            ctime_ns: r.u64()? as i64,
            ino: r.u64()?,
            size: r.u64()?,
        };
    }
    Some(stamps)
}

fn decode_mailbox(r: &mut Reader<'_>, dir: &str) -> Option<MailboxTable> {
    let dir = dir.to_string();
    let name = r.string()?;
    let header = match r.u8()? {
        1 => {
            let uid_validity = r.u32()?;
            let next_uid = r.u32()?;
            let has_guid = r.u8()? == 1;
            let guid = MailboxGuid(r.take(16)?.try_into().ok()?);
            let extra = r.string()?;
            Some(Header {
                uid_validity,
                next_uid,
                guid: has_guid.then_some(guid),
                extra,
            })
        }
        _ => None,
    };
    let next_uid = r.u32()?;
    let mut keywords = KeywordMap::default();
    for i in 0..LETTERS {
        let name = r.string()?;
        keywords.names[i] = (!name.is_empty()).then_some(name);
    }
    let dir_meta = DirMeta {
        mode: r.u32()?,
        uid: r.u32()?,
        gid: r.u32()?,
    };
    let arena = r.string()?;
    let msgs = Messages {
        uid: r.column(u32::from_le_bytes)?,
        name_offset: r.column(u32::from_le_bytes)?,
        name_len: r.column(u16::from_le_bytes)?,
        base_len: r.column(u16::from_le_bytes)?,
        flags: r.column(|b: [u8; 8]| Flags {
            system: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
            keywords: u32::from_le_bytes(b[4..].try_into().expect("4 bytes")),
        })?,
        size: r.column(u32::from_le_bytes)?,
        extras: r.column(u32::from_le_bytes)?,
        status: r.column(|b: [u8; 1]| b[0])?,
    };
    let listed_missing = r.column(|b: [u8; 12]| {
        let word = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        (
            word(0),
            StrRef {
                offset: word(4),
                len: word(8),
            },
        )
    })?;
    let extras = r.column(|b: [u8; 18]| {
        let part = |k: usize| {
            let word = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
            (b[k * 9] == 1).then(|| StrRef {
                offset: word(k * 9 + 1),
                len: word(k * 9 + 5),
            })
        };
        Extras {
            guid: part(0),
            ext: part(1),
        }
    })?;
    let anomaly_count = r.u32()?;
    let mut anomalies = Vec::new();
    for _ in 0..anomaly_count {
        anomalies.push(crate::table::Anomaly {
            path: r.string()?,
            what: r.string()?,
            serious: r.u8()? == 1,
        });
    }
    let mailbox = MailboxTable {
        dir,
        name,
        header,
        next_uid,
        keywords,
        dir_meta,
        msgs,
        listed_missing,
        extras,
        arena,
        broken: None,
        anomalies,
        ..MailboxTable::default()
    };
    is_consistent(&mailbox).then_some(mailbox)
}

/// Every string reference stays inside the arena and every column has one row a message,
/// so a damaged cache can never make the table panic.
fn is_consistent(m: &MailboxTable) -> bool {
    let n = m.msgs.uid.len();
    let msgs = &m.msgs;
    let columns_match = [
        msgs.name_offset.len(),
        msgs.name_len.len(),
        msgs.base_len.len(),
        msgs.flags.len(),
        msgs.size.len(),
        msgs.extras.len(),
        msgs.status.len(),
    ]
    .iter()
    .all(|&len| len == n);
    let fits = |offset: u32, len: u32| {
        let end = offset as usize + len as usize;
        end <= m.arena.len()
            && m.arena.is_char_boundary(offset as usize)
            && m.arena.is_char_boundary(end)
    };
    columns_match
        && (0..n).all(|i| {
            msgs.base_len[i] <= msgs.name_len[i]
                && fits(msgs.name_offset[i], u32::from(msgs.name_len[i]))
                && fits(msgs.name_offset[i], u32::from(msgs.base_len[i]))
                && (msgs.extras[i] == crate::table::NO_EXTRAS
                    || (msgs.extras[i] as usize) < m.extras.len())
        })
        && m.listed_missing.iter().all(|&(_, r)| fits(r.offset, r.len))
        && m.extras.iter().all(|e| {
            [e.guid, e.ext]
                .iter()
                .flatten()
                .all(|r| fits(r.offset, r.len))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::scan_mailbox;
    use crate::storage::maildir::layout::Layout;

    fn sample_mailbox(root: &Path) -> MailboxTable {
        fs::create_dir_all(root.join("cur")).unwrap();
        fs::write(
            root.join("dovecot-uidlist"),
            "3 V9 N4 G0f1e2d3c4b5a69788796a5b4c3d2e1f0\n1 :a,S=1\n2 G77 P9 :b,S=1\n3 :gone\n",
        )
        .unwrap();
        fs::write(root.join("dovecot-keywords"), "2 $Junk\n").unwrap();
        fs::write(root.join("cur/a,S=1:2,Sc"), "x").unwrap();
        fs::write(root.join("cur/b,S=1:2,"), "y").unwrap();
        scan_mailbox(root, Layout::MaildirPlusPlus, "")
    }

    /// The mailbox as a scan that found it settled returns it.
    fn settled(mailbox: &MailboxTable) -> MailboxTable {
        MailboxTable {
            settled: true,
            ..mailbox.clone()
        }
    }

    fn cache_in(dir: &Path) -> (ScanCache, PathBuf) {
        let cache = ScanCache::for_root(&dir.join("cache"), dir);
        let file = cache.file_for("");
        (cache, file)
    }

    #[test]
    fn unknown_filesystems_get_the_coarse_margin() {
        assert_eq!(racy_margin_ns(Path::new("/proc")), COARSE_RACY_NS);
        assert_eq!(
            racy_margin_ns(Path::new("/nonexistent/mdsync")),
            COARSE_RACY_NS
        );
    }

    #[test]
    fn round_trips_a_mailbox() {
        let dir = tempfile::tempdir().unwrap();
        let mailbox = sample_mailbox(dir.path());
        let (cache, _) = cache_in(dir.path());
        cache.store(&settled(&mailbox)).unwrap();
        let back = cache.take("", &mailbox.stamps).expect("cached entry");
        assert_eq!(back.msgs.uid, mailbox.msgs.uid);
        assert_eq!(back.name(0), mailbox.name(0));
        assert_eq!(back.guid(1), "77");
        assert_eq!(back.ext(1), "P9");
        assert_eq!(back.header, mailbox.header);
        assert_eq!(back.keywords, mailbox.keywords);
        assert_eq!(back.listed_missing.len(), 1);
        assert_eq!(back.str(back.listed_missing[0].1), "gone");
        assert!(cache.take(".Other", &mailbox.stamps).is_none());
    }

    #[test]
    fn racy_and_changed_entries_are_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mailbox = sample_mailbox(dir.path());
        let (cache, file) = cache_in(dir.path());
        cache.store(&settled(&mailbox)).unwrap();
        assert!(file.exists());
        let unsettled = MailboxTable {
            settled: false,
            ..mailbox.clone()
        };
        cache.store(&unsettled).unwrap();
        assert!(!file.exists(), "an unsettled mailbox is not cached");
        cache.store(&settled(&mailbox)).unwrap();
        let mut changed = mailbox.stamps;
        changed.parts[0].mtime_ns += 1;
        assert!(cache.take("", &changed).is_none());
        cache.prune(&[".Sent".to_string()]).unwrap();
        assert!(!file.exists(), "pruned: INBOX is gone");
    }

    #[test]
    fn a_flipped_bit_anywhere_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let mailbox = sample_mailbox(dir.path());
        let (cache, file) = cache_in(dir.path());
        cache.store(&settled(&mailbox)).unwrap();
        let mut bytes = fs::read(&file).unwrap();
        assert!(cache.take("", &mailbox.stamps).is_some());
        for at in 0..bytes.len() {
            bytes[at] ^= 0x10;
            fs::write(&file, &bytes).unwrap();
            assert!(cache.take("", &mailbox.stamps).is_none(), "byte {at}");
            bytes[at] ^= 0x10;
        }
    }

    #[test]
    fn damaged_cache_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let mailbox = sample_mailbox(dir.path());
        let (cache, file) = cache_in(dir.path());
        cache.store(&settled(&mailbox)).unwrap();
        let mut bytes = fs::read(&file).unwrap();
        for cut in [0, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            fs::write(&file, &bytes[..cut]).unwrap();
            assert!(cache.take("", &mailbox.stamps).is_none(), "cut at {cut}");
        }
        for at in (8..bytes.len()).step_by(7) {
            bytes[at] ^= 0xff;
            fs::write(&file, &bytes).unwrap();
            let _ = cache.take("", &mailbox.stamps); // must not panic
            bytes[at] ^= 0xff;
        }
    }
}
