//! Scanner: turns a Maildir root into a [`MailTable`] — mailboxes in parallel (rayon), each
//! from its uidlist, keywords file and one `readdir` of `new/` and `cur/`, with no per-file
//! `stat` when names carry `,S=`; mailboxes whose stamps did not change since the last run
//! come from the [`cache`]. Reads mail only; never writes into, locks or follows a symlink
//! in a mail tree.

pub mod cache;
pub mod dbox_cache;
pub mod mdbox;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::dir::{Dir, Type as DirType};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::MailboxStamps;
use crate::progress::{Event, Progress};
use crate::storage::maildir::layout::Layout;
use crate::storage::maildir::{self, filename, keywords::KeywordMap, uidlist};
use crate::table::{Anomaly, DirMeta, Extras, MailTable, MailboxTable, NameHash, StrRef, status};

/// What to scan.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Folder layout; detected from the root when `None`.
    pub layout: Option<Layout>,
    /// Mailboxes (by user-visible name) to leave out entirely.
    pub exclude: Vec<glob::Pattern>,
    /// Where scan caches live; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Mailboxes not to read when their stamps are still these (with their message count):
    /// the last run left them in sync with the other side.
    pub unchanged_if: HashMap<String, (MailboxStamps, u64)>,
    /// Leave the scan cache's files alone during the scan: the caller stores the freshly
    /// listed mailboxes later with [`save_cache`], once it knows which of them it changed.
    pub defer_cache_writes: bool,
}

impl ScanOptions {
    /// True when a mailbox name matches an `--exclude` pattern.
    pub fn excludes(&self, name: &str) -> bool {
        self.exclude.iter().any(|p| p.matches(name))
    }
}

/// Scans a whole replica. A missing root is an empty replica (a fresh destination); a root
/// that is not a directory is an error.
pub fn scan(root: &Path, options: &ScanOptions, progress: &dyn Progress) -> Result<MailTable> {
    let layout = match options.layout {
        Some(layout) => layout,
        None => Layout::detect(root).map_err(|e| Error::io(root, e))?,
    };
    let root_meta = match fs::symlink_metadata(root) {
        Ok(meta) if meta.is_dir() => DirMeta {
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        },
        Ok(_) => return Err(Error::NotADirectory(root.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(empty_table(layout)),
        Err(e) => return Err(Error::io(root, e)),
    };
    let found = layout
        .list_mailboxes(root)
        .map_err(|e| Error::io(root, e))?;
    let anomalies: Vec<Anomaly> = found
        .skipped
        .iter()
        .map(|p| Anomaly {
            path: p.clone(),
            what: "symlink or non-UTF-8 name; not followed".into(),
            serious: true,
        })
        .collect();
    let dirs: Vec<String> = found
        .dirs
        .into_iter()
        .filter(|d| !options.excludes(&layout.display_name(d)))
        .collect();
    let scanned_at_ns = cache::now_ns();
    let mailboxes = scan_mailboxes(root, layout, &dirs, options, progress);
    Ok(MailTable {
        layout,
        mailboxes,
        parents: found.parents,
        unfollowed: found.skipped,
        subscriptions: read_optional(&root.join(maildir::SUBSCRIPTIONS))
            .map_err(|e| Error::io(&root.join(maildir::SUBSCRIPTIONS), e))?,
        uidvalidity_next: read_uidvalidity_next(root),
        root_meta,
        scanned_at_ns,
        anomalies,
    })
}

/// Scans the listed mailboxes in parallel. A mailbox whose stamps match
/// `options.unchanged_if` is not read at all; one whose stamps match the scan cache comes
/// from the cache; the rest are listed. The cache is refreshed when anything was listed.
fn scan_mailboxes(
    root: &Path,
    layout: Layout,
    dirs: &[String],
    options: &ScanOptions,
    progress: &dyn Progress,
) -> Vec<MailboxTable> {
    let cache = options
        .cache_dir
        .as_deref()
        .map(|d| cache::ScanCache::for_root(d, root));
    let stamps: Vec<MailboxStamps> = dirs
        .par_iter()
        .map(|d| cache::take_stamps(&mailbox_path(root, d)))
        .collect();
    let mailboxes: Vec<MailboxTable> = dirs
        .par_iter()
        .zip(&stamps)
        .map(|(dir, stamps)| {
            let mailbox = read_or_reuse(root, layout, dir, stamps, options, cache.as_ref());
            if let Some(cache) = &cache
                && mailbox.fresh
                && !options.defer_cache_writes
            {
                // A cache that cannot be written only costs speed; the scan is complete.
                let _ = cache.store(&mailbox);
            }
            progress.event(Event::MailboxScanned {
                messages: mailbox.message_count(),
            });
            mailbox
        })
        .collect();
    if let Some(cache) = &cache
        && !options.defer_cache_writes
        && mailboxes.iter().any(|m| m.fresh)
        && let Err(e) = cache.prune(dirs)
    {
        progress.event(Event::Warning {
            message: format!("scan cache: {e}"),
        });
    }
    mailboxes
}

/// One mailbox: a placeholder when the pair state says it is unchanged, the cached table
/// when the cache's stamps match, else a fresh read (marked `fresh`, for the cache).
fn read_or_reuse(
    root: &Path,
    layout: Layout,
    dir: &str,
    stamps: &MailboxStamps,
    options: &ScanOptions,
    cache: Option<&cache::ScanCache>,
) -> MailboxTable {
    if let Some((_, count)) = options
        .unchanged_if
        .get(dir)
        .filter(|(known, _)| known == stamps)
    {
        return MailboxTable {
            dir: dir.to_string(),
            name: layout.display_name(dir),
            unchanged: Some(*count),
            stamps: *stamps,
            ..MailboxTable::default()
        };
    }
    if let Some(table) = cache.and_then(|c| c.take(dir, stamps)) {
        // Cached only when its stamps were old; they have not moved since.
        return MailboxTable {
            stamps: *stamps,
            settled: true,
            ..table
        };
    }
    MailboxTable {
        fresh: true,
        ..scan_mailbox(root, layout, dir)
    }
}

/// Stores the mailboxes a scan with [`ScanOptions::defer_cache_writes`] listed from disk,
/// except those `changed` names (a destination mailbox the run wrote to: the table no
/// longer describes it), and removes the files of mailboxes that are gone. An entry is
/// stored with the stamps taken before its mailbox was read, and only when they were not
/// racy at the start of the scan, exactly as an immediate store would have done; a store
/// that fails only costs speed.
pub fn save_cache(
    root: &Path,
    options: &ScanOptions,
    table: &MailTable,
    changed: &(dyn Fn(&str) -> bool + Sync),
) -> io::Result<()> {
    let Some(dir) = options.cache_dir.as_deref() else {
        return Ok(());
    };
    if !table.mailboxes.iter().any(|m| m.fresh) {
        return Ok(());
    }
    let cache = cache::ScanCache::for_root(dir, root);
    table
        .mailboxes
        .par_iter()
        .filter(|m| m.fresh && !changed(&m.dir))
        .for_each(|m| {
            let _ = cache.store(m);
        });
    let dirs: Vec<String> = table.mailboxes.iter().map(|m| m.dir.clone()).collect();
    cache.prune(&dirs)
}

fn empty_table(layout: Layout) -> MailTable {
    MailTable {
        layout,
        mailboxes: Vec::new(),
        parents: Vec::new(),
        unfollowed: Vec::new(),
        subscriptions: None,
        uidvalidity_next: None,
        root_meta: DirMeta {
            mode: 0o700,
            uid: 0,
            gid: 0,
        },
        scanned_at_ns: cache::now_ns(),
        anomalies: Vec::new(),
    }
}

/// The directory of a mailbox.
pub fn mailbox_path(root: &Path, dir: &str) -> PathBuf {
    if dir.is_empty() {
        root.to_path_buf()
    } else {
        root.join(dir)
    }
}

/// Reads a control file that may be absent, never through a symlink: a link where Dovecot
/// keeps a control file is refused, so a tree cannot make mdsync copy a file from outside.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a symlink; not followed",
            ));
        }
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

fn read_uidvalidity_next(root: &Path) -> Option<u32> {
    let bytes = read_optional(&root.join(maildir::UIDVALIDITY_FILE)).ok()??;
    u32::from_str_radix(std::str::from_utf8(&bytes).ok()?.trim(), 16).ok()
}

/// Scans one mailbox. Problems become `broken` (the mailbox is left alone) or anomalies
/// (single entries); this function does not fail.
pub fn scan_mailbox(root: &Path, layout: Layout, dir: &str) -> MailboxTable {
    let first = read_mailbox(root, layout, dir);
    // `readdir` can return a file twice when Dovecot renames it meanwhile; a second look
    // tells such a ghost from a real second file with the same base name.
    if first.anomalies.iter().any(|a| a.what == DUPLICATE_BASE) {
        return read_mailbox(root, layout, dir);
    }
    first
}

/// The anomaly text of a second file with an already-listed base name.
const DUPLICATE_BASE: &str = "second file with the same base name; Dovecot gives it a new UID";

fn read_mailbox(root: &Path, layout: Layout, dir: &str) -> MailboxTable {
    let started_ns = cache::now_ns();
    let mut mailbox = read_mailbox_once(root, layout, dir);
    let path = mailbox_path(root, dir);
    let after = cache::take_stamps(&path);
    mailbox.settled = after == mailbox.stamps
        && !mailbox
            .stamps
            .is_racy(started_ns, cache::racy_margin_ns(&path));
    mailbox
}

fn read_mailbox_once(root: &Path, layout: Layout, dir: &str) -> MailboxTable {
    let path = mailbox_path(root, dir);
    let mut mailbox = MailboxTable {
        dir: dir.to_string(),
        name: layout.display_name(dir),
        next_uid: 1,
        stamps: cache::take_stamps(&path),
        ..MailboxTable::default()
    };
    match fill_mailbox(&path, &mut mailbox) {
        Err(why) => {
            mailbox.broken = Some(why);
            mailbox.vanished = is_gone(&path);
        }
        // Gone while it was read: a missing uidlist or `cur/` read as none, not the folder.
        Ok(()) if is_gone(&path) => mark_gone(&mut mailbox, &path),
        Ok(()) => {}
    }
    mailbox
}

/// True when nothing is at `path` any more: a folder listed, then renamed or deleted
/// before (or while) it was read.
pub(crate) fn is_gone(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// Leaves `mailbox` alone because its directory `path` went while it was read (see
/// [`MailboxTable::vanished`]), whatever was read of it.
pub(crate) fn mark_gone(mailbox: &mut MailboxTable, path: &Path) {
    let why = "gone (renamed or deleted while being read)";
    mailbox.broken = Some(format!("{}: {why}", path.display()));
    mailbox.vanished = true;
}

fn fill_mailbox(path: &Path, mailbox: &mut MailboxTable) -> std::result::Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    mailbox.dir_meta = DirMeta {
        mode: meta.permissions().mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    };
    // The uidlist is read before the directories: a file delivered in between shows up as
    // not yet numbered (copied as such), never as a UID pointing at nothing.
    let uidlist_path = path.join(uidlist::FILE_NAME);
    let uidlist_text = read_text(&uidlist_path)?;
    let entries = list_messages(path, mailbox)?;
    // Keywords after the listing: a letter Dovecot assigned meanwhile has its name here.
    let keywords_path = path.join(maildir::keywords::FILE_NAME);
    if let Some(text) = read_text(&keywords_path)? {
        mailbox.keywords = KeywordMap::parse(&text);
    }
    let parsed = match &uidlist_text {
        Some(text) => {
            Some(uidlist::parse(text).map_err(|e| format!("{}: {e}", uidlist_path.display()))?)
        }
        None => None,
    };
    if let Some(list) = &parsed {
        mailbox.header = Some(list.header.clone());
        mailbox.next_uid = list.next_uid();
    }
    let records = parsed.as_ref().map_or(&[][..], |l| &l.records[..]);
    join_uids(path, mailbox, entries, records);
    Ok(())
}

fn read_text(path: &Path) -> std::result::Result<Option<String>, String> {
    match read_optional(path) {
        Ok(None) => Ok(None),
        Ok(Some(bytes)) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| format!("{}: not valid UTF-8", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// One directory entry that looks like a message; its name is already in the arena.
struct Entry {
    name: StrRef,
    in_new: bool,
    broken: bool,
}

/// Lists `new/` and `cur/` with `readdir` only (the type comes from `d_type`), appending
/// each name to the mailbox's arena. The directories are opened with `O_NOFOLLOW`, and
/// names are read in place (no allocation per entry): this loop runs for every message of
/// both replicas.
fn list_messages(
    path: &Path,
    mailbox: &mut MailboxTable,
) -> std::result::Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    // cur/ first: a file Dovecot moves from new/ to cur/ meanwhile is then missed at worst
    // (and confirmed by a second look), never seen twice.
    let tmp_path = path.join("tmp");
    if fs::symlink_metadata(&tmp_path).is_ok_and(|m| !m.is_dir()) {
        return Err(format!(
            "{}: not a directory (symlink?); not followed",
            tmp_path.display()
        ));
    }
    for sub in ["cur", "new"] {
        let sub_path = path.join(sub);
        if fs::symlink_metadata(&sub_path).is_ok_and(|m| !m.is_dir()) {
            return Err(format!(
                "{}: not a directory (symlink?); not followed",
                sub_path.display()
            ));
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let dir = match Dir::open(&sub_path, flags, Mode::empty()) {
            Ok(dir) => dir,
            Err(Errno::ENOENT) => continue,
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                return Err(format!(
                    "{}: not a directory (symlink?); not followed",
                    sub_path.display()
                ));
            }
            Err(e) => return Err(format!("{}: {}", sub_path.display(), io::Error::from(e))),
        };
        for entry in dir {
            let entry =
                entry.map_err(|e| format!("{}: {}", sub_path.display(), io::Error::from(e)))?;
            let raw = entry.file_name().to_bytes();
            let Ok(name) = std::str::from_utf8(raw) else {
                let lossy = String::from_utf8_lossy(raw);
                let rel = format!("{}/{}/{}", mailbox.dir, sub, lossy);
                anomaly(mailbox, rel, "file name is not UTF-8; not copied");
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let is_file = match entry.file_type() {
                Some(kind) => kind == DirType::File,
                // No `d_type` from this file system: one lstat tells.
                None => fs::symlink_metadata(sub_path.join(name))
                    .map_err(|e| format!("{}: {e}", sub_path.join(name).display()))?
                    .is_file(),
            };
            let broken = !is_file;
            if broken {
                let rel = format!("{}/{}/{}", mailbox.dir, sub, name);
                anomaly(mailbox, rel, "not a regular file (symlink?); not followed");
            }
            let name = mailbox.intern(name);
            entries.push(Entry {
                name,
                in_new: sub == "new",
                broken,
            });
        }
    }
    Ok(entries)
}

fn anomaly(mailbox: &mut MailboxTable, path: String, what: &str) {
    mailbox.anomalies.push(Anomaly {
        path: path.trim_start_matches('/').to_string(),
        what: what.to_string(),
        serious: what.contains("not copied") || what.contains("not followed"),
    });
}

/// What the name of one entry says.
struct Named {
    entry: usize,
    base_len: usize,
    flags: crate::model::Flags,
    size: u32,
    bits: u8,
}

/// Parses an entry's name; a name that cannot be a message becomes an anomaly.
fn name_entry(
    path: &Path,
    mailbox: &mut MailboxTable,
    index: usize,
    entry: &Entry,
) -> Option<Named> {
    let name = mailbox.str(entry.name);
    let sub = if entry.in_new { "new" } else { "cur" };
    let rel = || format!("{}/{}/{}", mailbox.dir, sub, mailbox.str(entry.name));
    let parsed = match filename::parse(name) {
        Ok(p) => p,
        Err(e) => {
            // When only the part after the base is bad, the file still claims its uidlist
            // record (as a broken entry), so the destination's copy is kept.
            let base = name.split(':').next().unwrap_or("");
            let base_len = filename::parse(base).is_ok().then_some(base.len());
            let rel = rel();
            anomaly(mailbox, rel, &format!("{e}; not copied"));
            let in_new = if entry.in_new { status::IN_NEW } else { 0 };
            return base_len.map(|base_len| Named {
                entry: index,
                base_len,
                flags: crate::model::Flags::default(),
                size: 0,
                bits: in_new | status::BROKEN | status::SIZE_UNKNOWN,
            });
        }
    };
    let mut bits = if entry.in_new { status::IN_NEW } else { 0 };
    if entry.broken {
        bits |= status::BROKEN;
    }
    let size = match parsed.size {
        Some(s) => s.min(u64::from(u32::MAX)) as u32,
        // Mail from other MDAs lacks `,S=`: one lstat tells the size.
        None => match fs::symlink_metadata(path.join(sub).join(name)) {
            Ok(meta) => meta.len().min(u64::from(u32::MAX)) as u32,
            Err(_) => {
                bits |= status::SIZE_UNKNOWN;
                0
            }
        },
    };
    let named = Named {
        entry: index,
        base_len: parsed.base.len(),
        flags: parsed.flags,
        size,
        bits: bits | if parsed.odd_info { status::ODD_NAME } else { 0 },
    };
    if parsed.odd_info {
        let rel = rel();
        anomaly(mailbox, rel, "unusual flags part; copied verbatim");
    }
    Some(named)
}

/// Gives each entry its UID from the uidlist (by base name), walking the records in UID
/// order so the table comes out sorted, then appends the files Dovecot has not numbered yet
/// (by name). Records whose file was not seen are kept as `listed_missing`.
fn join_uids(
    path: &Path,
    mailbox: &mut MailboxTable,
    entries: Vec<Entry>,
    records: &[uidlist::Record<'_>],
) {
    let named: Vec<Named> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| name_entry(path, mailbox, i, e))
        .collect();
    let mut by_base: HashMap<&str, usize, NameHash> =
        HashMap::with_capacity_and_hasher(named.len(), NameHash::default());
    let base_of = |n: &Named| {
        let r = entries[n.entry].name;
        StrRef {
            offset: r.offset,
            len: n.base_len as u32,
        }
    };
    // The listing's arena (names in `readdir` order) is taken out; the joined rows get a new
    // one below.
    let arena = std::mem::take(&mut mailbox.arena);
    for (k, n) in named.iter().enumerate() {
        let b = base_of(n);
        by_base
            .entry(&arena[b.offset as usize..(b.offset + b.len) as usize])
            .or_insert(k);
    }
    let mut consumed = vec![false; named.len()];
    let mut rows = Vec::with_capacity(named.len());
    let mut missing = Vec::new();
    for r in records {
        match by_base.get(r.base) {
            Some(&k) if !consumed[k] => {
                consumed[k] = true;
                rows.push((r.uid, k, Some(r)));
            }
            _ => missing.push(r),
        }
    }
    let mut unlisted: Vec<usize> = (0..named.len()).filter(|&k| !consumed[k]).collect();
    let name_of = |k: usize| {
        let r = entries[named[k].entry].name;
        &arena[r.offset as usize..(r.offset + r.len) as usize]
    };
    unlisted.sort_by(|&a, &b| name_of(a).cmp(name_of(b)));
    let duplicates: Vec<String> = if unlisted.is_empty() {
        Vec::new()
    } else {
        let listed_bases: std::collections::HashSet<&str, NameHash> =
            records.iter().map(|r| r.base).collect();
        unlisted
            .iter()
            .filter(|&&k| {
                let b = base_of(&named[k]);
                listed_bases.contains(&arena[b.offset as usize..(b.offset + b.len) as usize])
            })
            .map(|&k| name_of(k).to_string())
            .collect()
    };
    rows.extend(unlisted.into_iter().map(|k| (0, k, None)));
    for name in duplicates {
        let rel = format!("{}/{}", mailbox.dir, name);
        anomaly(mailbox, rel, DUPLICATE_BASE);
    }
    // The names go into a fresh arena in row (UID) order: `readdir` returned them in hash
    // order, and the differ, the cache and the hash questions all walk the rows front to
    // back, so a row-ordered arena is read sequentially instead of at random.
    mailbox.arena = String::with_capacity(arena.len() + 64);
    mailbox.msgs.reserve(rows.len());
    for (uid, k, record) in rows {
        let n = &named[k];
        let name = mailbox.intern(name_of(k));
        let extras = record.and_then(|r| extras_for(mailbox, r));
        mailbox.push_interned(uid, name, n.base_len, n.flags, n.size, extras, n.bits);
    }
    for r in missing {
        let base = mailbox.intern(r.base);
        mailbox.listed_missing.push((r.uid, base));
    }
}

fn extras_for(mailbox: &mut MailboxTable, record: &uidlist::Record<'_>) -> Option<Extras> {
    if record.guid.is_none() && record.ext.is_empty() {
        return None;
    }
    let guid = record.guid.map(|g| mailbox.intern(g));
    let ext = (!record.ext.is_empty()).then(|| mailbox.intern(&record.ext));
    Some(Extras { guid, ext })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn scans_uids_flags_and_missing_records() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            &root.join("dovecot-uidlist"),
            "3 V42 N5 G0f1e2d3c4b5a69788796a5b4c3d2e1f0\n1 :a,S=3\n2 G77 :b,S=4\n3 :gone\n",
        );
        write(&root.join("dovecot-keywords"), "0 $Junk\n");
        write(&root.join("cur/a,S=3:2,Sa"), "abc");
        write(&root.join("new/b,S=4"), "abcd");
        write(&root.join("new/c,S=1"), "x");
        fs::create_dir_all(root.join("tmp")).unwrap();
        write(&root.join(".Sent/maildirfolder"), "");
        write(&root.join(".Sent/cur/d,S=1:2,S"), "y");
        let table = scan(root, &ScanOptions::default(), &NoProgress).unwrap();
        assert_eq!(table.mailboxes.len(), 2);
        let inbox = &table.mailboxes[0];
        assert_eq!(inbox.name, "INBOX");
        assert_eq!(inbox.msgs.uid, vec![1, 2, 0]);
        assert_eq!(inbox.msgs.flags[0].to_letters(), "Sa");
        assert_eq!(inbox.guid(1), "77");
        assert_eq!(inbox.guid(0), "a,S=3");
        assert_eq!(inbox.subdir(1), crate::model::Subdir::New);
        assert_eq!(inbox.next_uid, 5);
        assert_eq!(inbox.listed_missing.len(), 1);
        assert_eq!(inbox.keywords.name(0), Some("$Junk"));
        assert_eq!(table.mailboxes[1].name, "Sent");
        assert_eq!(table.mailboxes[1].msgs.uid, vec![0]);
    }

    #[test]
    fn corrupt_uidlist_marks_mailbox_broken() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("dovecot-uidlist"), "3 V1 N2\n1 :a\n1 :b\n");
        write(&dir.path().join("cur/a:2,S"), "x");
        let table = scan(dir.path(), &ScanOptions::default(), &NoProgress).unwrap();
        let why = table.mailboxes[0].broken.as_deref().unwrap();
        assert!(
            why.contains("dovecot-uidlist") && why.contains("duplicate uid 1"),
            "{why}"
        );
        assert!(!table.mailboxes[0].vanished, "bad input, not a folder gone");
    }

    /// A folder listed, then renamed or deleted before it was read, is broken and marked
    /// as vanished (the run is partial, exit 2), never read as an empty folder.
    #[test]
    fn a_folder_gone_before_it_is_read_is_broken_and_vanished() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join(".Gone/cur/a:2,S"), "x");
        let listed = scan_mailbox(dir.path(), Layout::MaildirPlusPlus, ".Gone");
        assert!(listed.broken.is_none() && listed.len() == 1);
        fs::rename(dir.path().join(".Gone"), dir.path().join(".Moved")).unwrap();
        let gone = scan_mailbox(dir.path(), Layout::MaildirPlusPlus, ".Gone");
        let why = gone.broken.as_deref().expect("broken");
        assert!(why.contains(".Gone") && gone.vanished, "{why}");
        assert!(gone.is_empty());
    }

    #[test]
    fn symlinks_and_bad_names_are_anomalies() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(&root.join("cur/ok:2,S"), "x");
        std::os::unix::fs::symlink("/etc/passwd", root.join("cur/link:2,S")).unwrap();
        write(&root.join("cur/:2,S"), "x");
        let table = scan(root, &ScanOptions::default(), &NoProgress).unwrap();
        let inbox = &table.mailboxes[0];
        assert_eq!(inbox.len(), 2);
        let link = (0..2).find(|&i| inbox.base(i) == "link").unwrap();
        assert!(inbox.has(link, status::BROKEN));
        assert_eq!(inbox.anomalies.len(), 2);
    }

    #[test]
    fn a_bad_flags_part_still_claims_its_record() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("dovecot-uidlist"), "3 V1 N3\n1 :a\n2 :b\n");
        write(&dir.path().join("cur/a:2,S"), "x");
        write(&dir.path().join("cur/b:2,S\tX"), "y");
        let table = scan(dir.path(), &ScanOptions::default(), &NoProgress).unwrap();
        let inbox = &table.mailboxes[0];
        assert_eq!(inbox.msgs.uid, vec![1, 2]);
        assert!(
            inbox.has(1, status::BROKEN),
            "kept as broken, so DST's copy stays"
        );
        assert!(inbox.listed_missing.is_empty());
    }

    #[test]
    fn symlinked_tmp_makes_the_mailbox_broken() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("cur/a:2,S"), "x");
        std::os::unix::fs::symlink("/tmp", dir.path().join("tmp")).unwrap();
        let table = scan(dir.path(), &ScanOptions::default(), &NoProgress).unwrap();
        assert!(
            table.mailboxes[0]
                .broken
                .as_deref()
                .unwrap()
                .contains("tmp")
        );
    }

    #[test]
    fn excluded_mailboxes_are_not_scanned() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("cur/a:2,S"), "x");
        write(&dir.path().join(".Junk/cur/b:2,S"), "x");
        let options = ScanOptions {
            exclude: vec![glob::Pattern::new("Ju*").unwrap()],
            ..ScanOptions::default()
        };
        let table = scan(dir.path(), &options, &NoProgress).unwrap();
        assert_eq!(table.mailboxes.len(), 1);
    }

    #[test]
    fn missing_root_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let table = scan(
            &dir.path().join("nope"),
            &ScanOptions::default(),
            &NoProgress,
        )
        .unwrap();
        assert!(table.mailboxes.is_empty());
    }
}
