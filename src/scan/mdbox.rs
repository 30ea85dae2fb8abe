//! The mdbox scanner: reads an mdbox root's map index and mailbox indexes into the same
//! compact [`MailTable`] the Maildir scanner builds, so the differ and the applier work on
//! it unchanged. Each message gets the Maildir name it will have in a Maildir copy — its
//! GUID as the base name when that is a valid name, so Dovecot derives the same GUID —
//! and its body location (`m.N`, offset) in [`crate::table::DboxColumns`]. Reads only.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::{Flags, MailboxGuid, MailboxStamps};
use crate::progress::{Event, Progress};
use crate::scan::dbox_cache::{DboxCache, RecordFacts};
use crate::scan::{ScanOptions, cache, read_optional};
use crate::storage::maildir::keywords::{KeywordMap, LETTERS};
use crate::storage::maildir::layout::Layout;
use crate::storage::maildir::uidlist::Header;
use crate::storage::maildir::{SUBSCRIPTIONS, UIDVALIDITY_FILE};
use crate::storage::mdbox::dbox;
use crate::storage::mdbox::guid_hex;
use crate::storage::mdbox::layout::{MailboxDir, list_files, list_mailboxes};
use crate::storage::mdbox::mailbox::{MailboxIndex, MailboxMessage};
use crate::storage::mdbox::map::MapIndex;
use crate::storage::mdbox::store::Store;
use crate::table::{Anomaly, DirMeta, Extras, MailTable, MailboxTable, status};

/// The Maildir directory (relative to a Maildir root of `layout`) that holds the mailbox
/// stored under `mailboxes/<mdbox_dir>`; `None` when Maildir++ cannot name it (a `.` in
/// a folder name).
pub fn maildir_dir(layout: Layout, mdbox_dir: &str) -> Option<String> {
    if mdbox_dir == "INBOX" {
        return Some(String::new());
    }
    match layout {
        Layout::Fs => Some(mdbox_dir.to_string()),
        Layout::MaildirPlusPlus => {
            (!mdbox_dir.contains('.')).then(|| format!(".{}", mdbox_dir.replace('/', ".")))
        }
    }
}

/// Scans the mdbox root `root` into a table whose mailbox directories follow `layout` (the
/// layout of the Maildir it is compared with; Maildir++ when none is given).
pub fn scan(
    root: &Path,
    options: &ScanOptions,
    progress: &dyn Progress,
    store: &Store,
) -> Result<MailTable> {
    let layout = options.layout.unwrap_or(Layout::MaildirPlusPlus);
    let root_meta = dir_meta(root)?;
    let scanned_at_ns = cache::now_ns();
    let found = list_mailboxes(root).map_err(|e| Error::io(&root.join("mailboxes"), e))?;
    let mut anomalies = Vec::new();
    let mut chosen = Vec::new();
    for mb in found {
        if options.excludes(&mb.name) {
            continue;
        }
        match maildir_dir(layout, &mb.dir) {
            Some(dir) => chosen.push((dir, mb)),
            None => anomalies.push(Anomaly {
                path: format!("mailboxes/{}", mb.dir),
                what: format!(
                    "a '.' in the name cannot be stored in a {} Maildir",
                    layout.as_str()
                ),
                serious: true,
            }),
        }
    }
    // A mailbox the pair state vouches for is not read; the map, the record cache and the
    // storage listing are loaded only when some mailbox is.
    let mut mailboxes = Vec::with_capacity(chosen.len());
    let mut to_read = Vec::new();
    for (dir, mb) in chosen {
        match skipped(&dir, &mb, options) {
            Some(table) => {
                progress.event(Event::MailboxScanned {
                    messages: table.message_count(),
                });
                mailboxes.push(table);
            }
            None => to_read.push((dir, mb)),
        }
    }
    if !to_read.is_empty() {
        let map = MapIndex::load(&root.join("storage"))?;
        let records = record_cache(root, options);
        let sources = Sources {
            root,
            map: &map,
            store,
            records: &records,
        };
        mailboxes.par_extend(to_read.par_iter().map(|(dir, mb)| {
            let table = read_mailbox(&sources, dir, mb);
            progress.event(Event::MailboxScanned {
                messages: table.message_count(),
            });
            table
        }));
        save_record_cache(root, &records, progress)?;
    }
    mailboxes.sort_by(|a, b| a.dir.cmp(&b.dir));
    let parents = match layout {
        Layout::Fs => parent_dirs(&mailboxes),
        Layout::MaildirPlusPlus => Vec::new(),
    };
    let read =
        |name: &str| read_optional(&root.join(name)).map_err(|e| Error::io(&root.join(name), e));
    let uidvalidity_next = read(UIDVALIDITY_FILE)?
        .and_then(|b| u32::from_str_radix(String::from_utf8_lossy(&b).trim(), 16).ok());
    Ok(MailTable {
        layout,
        mailboxes,
        parents,
        unfollowed: Vec::new(),
        subscriptions: read(SUBSCRIPTIONS)?,
        uidvalidity_next,
        root_meta,
        scanned_at_ns,
        anomalies,
    })
}

/// The record cache of `root` (none without a cache directory).
fn record_cache(root: &Path, options: &ScanOptions) -> DboxCache {
    let dir = options
        .cache_dir
        .as_deref()
        .map(|d| cache::ScanCache::for_root(d, root).dir().to_path_buf());
    DboxCache::load(dir.as_deref())
}

/// Scans the mailboxes whose Maildir directories are `dirs` again (a watch batch), in
/// parallel, with the map index and the mailbox list read once for all of them.
pub fn rescan_mailboxes(
    root: &Path,
    layout: Layout,
    dirs: &[String],
    store: &Store,
) -> Vec<MailboxTable> {
    let empty = |dir: &str| MailboxTable {
        dir: dir.to_string(),
        name: layout.display_name(dir),
        ..MailboxTable::default()
    };
    let all_broken = |why: String| {
        dirs.iter()
            .map(|dir| MailboxTable {
                broken: Some(why.clone()),
                ..empty(dir)
            })
            .collect()
    };
    let map = match MapIndex::load(&root.join("storage")) {
        Ok(map) => map,
        Err(e) => return all_broken(e.to_string()),
    };
    let found = match list_mailboxes(root) {
        Ok(found) => found,
        Err(e) => return all_broken(format!("{}: {e}", root.join("mailboxes").display())),
    };
    let records = DboxCache::load(None);
    let sources = Sources {
        root,
        map: &map,
        store,
        records: &records,
    };
    // A dirty mailbox no longer listed was renamed or deleted since the event: read as
    // empty, it would have its copy expunged before the folder change is seen. Broken, the
    // batch reads the folder list instead.
    let gone = |dir: &str| MailboxTable {
        broken: Some(format!(
            "{}: no longer listed (renamed or deleted meanwhile)",
            root.join("mailboxes").display()
        )),
        vanished: true,
        ..empty(dir)
    };
    dirs.par_iter()
        .map(|dir| {
            found
                .iter()
                .find(|mb| maildir_dir(layout, &mb.dir).as_deref() == Some(dir.as_str()))
                .map_or_else(|| gone(dir), |mb| read_mailbox(&sources, dir, mb))
        })
        .collect()
}

/// The stamps that change whenever Dovecot changes a mailbox: its index log (appended to
/// on every change; a new inode when rotated or recreated), the snapshot (replaced by
/// rename) and the previous log. Not the directory: Dovecot creates and removes lock and
/// temp files there whenever it merely opens the mailbox, which says nothing about its
/// messages. The cache file (`dovecot.index.cache`) holds nothing mdsync reads.
pub fn take_stamps(index_dir: &Path) -> MailboxStamps {
    MailboxStamps {
        parts: [
            cache::stamp_of(&index_dir.join("dovecot.index.log")),
            cache::stamp_of(&index_dir.join("dovecot.index")),
            cache::stamp_of(&index_dir.join("dovecot.index.log.2")),
            Default::default(),
        ],
    }
}

/// What reading a mailbox needs besides its own index: the root, the map, the mapped
/// `m.N` files and the record cache.
struct Sources<'a> {
    root: &'a Path,
    map: &'a MapIndex,
    store: &'a Store,
    records: &'a DboxCache,
}

/// A placeholder when the pair state says the mailbox is unchanged (its stamps are those
/// of the last in-sync run), else `None`: the mailbox must be read.
fn skipped(dir: &str, mb: &MailboxDir, options: &ScanOptions) -> Option<MailboxTable> {
    let stamps = take_stamps(&mb.index_dir);
    let (_, count) = options
        .unchanged_if
        .get(dir)
        .filter(|(known, _)| *known == stamps)?;
    Some(MailboxTable {
        dir: dir.to_string(),
        name: mb.name.clone(),
        unchanged: Some(*count),
        stamps,
        ..MailboxTable::default()
    })
}

/// Writes the record cache, keeping the files `storage/` still has; a cache that cannot be
/// written only costs speed next time.
fn save_record_cache(root: &Path, records: &DboxCache, progress: &dyn Progress) -> Result<()> {
    let live: Vec<u32> = list_files(root)
        .map_err(|e| Error::io(&root.join("storage"), e))?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    if let Err(e) = records.save(&live) {
        progress.event(Event::Warning {
            message: format!("dbox record cache: {e}"),
        });
    }
    Ok(())
}

/// Reads one mailbox; problems become `broken` or anomalies, never an error.
fn read_mailbox(src: &Sources, dir: &str, mb: &MailboxDir) -> MailboxTable {
    let started_ns = cache::now_ns();
    let stamps = take_stamps(&mb.index_dir);
    let mut table = MailboxTable {
        dir: dir.to_string(),
        name: mb.name.clone(),
        stamps,
        flat: true,
        ..MailboxTable::default()
    };
    table.dir_meta = match dir_meta(&mb.index_dir) {
        Ok(meta) => meta,
        Err(e) => {
            table.broken = Some(e.to_string());
            table.vanished = super::is_gone(&mb.index_dir);
            return table;
        }
    };
    let index = match MailboxIndex::load(&mb.index_dir) {
        Ok(index) => index,
        Err(e) => {
            table.broken = Some(e.to_string());
            return table;
        }
    };
    if let Some(index) = &index
        && let Err(why) = fill(&mut table, index, src)
    {
        table.broken = Some(why);
        return table;
    }
    // Gone by now: the missing index files, or a snapshot read without its log (the
    // directory went between the two reads), do not describe the mailbox; read as empty
    // or stale, its copy would be expunged. Left alone like one gone before it was read.
    if super::is_gone(&mb.index_dir) {
        super::mark_gone(&mut table, &mb.index_dir);
        return table;
    }
    if index.is_none() {
        table.next_uid = 1;
        table.settled = true;
        return table;
    }
    table.settled = take_stamps(&mb.index_dir) == stamps
        && !stamps.is_racy(started_ns, cache::racy_margin_ns(&mb.index_dir));
    table
}

/// Header, keyword letters and one row per message.
fn fill(table: &mut MailboxTable, index: &MailboxIndex, src: &Sources) -> Result<(), String> {
    let map = src.map;
    table.header = Some(Header {
        uid_validity: index.uid_validity,
        next_uid: index.next_uid,
        guid: index.mailbox_guid.map(MailboxGuid),
        extra: String::new(),
    });
    table.next_uid = index.next_uid.max(1);
    let used = index.messages.iter().fold(0u64, |acc, m| acc | m.keywords);
    if used >> LETTERS != 0 {
        return Err(format!(
            "uses more than {LETTERS} keywords, which a Maildir cannot store"
        ));
    }
    let mut keywords = KeywordMap::default();
    for (i, name) in index.keyword_names.iter().enumerate().take(LETTERS) {
        keywords.names[i] = Some(name.clone());
    }
    table.keywords = keywords;
    if index.map_uid_validity != 0 && index.map_uid_validity != map.uid_validity {
        return Err("the mailbox index belongs to another map index (rebuilt?)".into());
    }
    table.msgs.reserve(index.messages.len());
    let mut bases: HashSet<String> = HashSet::with_capacity(index.messages.len());
    for m in &index.messages {
        push_message(table, m, src, &mut bases);
    }
    Ok(())
}

/// One row: the Maildir name, flags, body size and location. A message whose body cannot
/// be found is kept as BROKEN (never copied) with an anomaly naming the file.
fn push_message(
    table: &mut MailboxTable,
    m: &MailboxMessage,
    src: &Sources,
    bases: &mut HashSet<String>,
) {
    let Sources {
        root,
        map,
        store,
        records,
    } = *src;
    let mut flags = m.system_flags();
    flags.keywords = m.keywords as u32;
    let located = map
        .get(m.map_uid)
        .ok_or_else(|| format!("map UID {} is not in the map index", m.map_uid))
        .and_then(|entry| {
            record_facts(store, records, entry.file_id, entry.offset, entry.size)
                .map(|facts| (entry, facts))
        });
    let (guid, size, file_id, offset, bits) = match located {
        Ok((entry, facts)) => (facts.guid, facts.body_len, entry.file_id, entry.offset, 0),
        Err(why) => {
            table.anomalies.push(Anomaly {
                path: format!("{} uid {}", root.join("storage").display(), m.uid),
                what: why,
                serious: true,
            });
            (guid_hex(&m.guid), 0, 0, 0, status::BROKEN)
        }
    };
    let guid = if guid.is_empty() {
        guid_hex(&m.guid)
    } else {
        guid
    };
    let mut base = if valid_base(&guid) {
        guid.clone()
    } else {
        guid_hex(&m.guid)
    };
    if bases.contains(&base) {
        base = format!("{base}.U{}", m.uid);
    }
    let extras = (base != guid && !guid.contains(char::is_whitespace)).then(|| Extras {
        guid: Some(table.intern(&guid)),
        ext: None,
    });
    let name = format!("{base}:2,{}", letters(flags));
    table.push(m.uid, &name, base.len(), flags, size, extras, bits);
    table.dbox.file_id.push(file_id);
    table.dbox.offset.push(offset);
    bases.insert(base);
}

fn letters(flags: Flags) -> String {
    flags.to_letters()
}

/// GUID and body size of the record at (`file_id`, `offset`): from the cache, else read
/// from the mapped file (and cached). A record with attachments stored elsewhere (`X`
/// metadata) is an error: its bytes are not the whole message.
fn record_facts(
    store: &Store,
    records: &DboxCache,
    file_id: u32,
    offset: u32,
    size: u32,
) -> Result<RecordFacts, String> {
    let file = store.file(file_id).map_err(|e| e.to_string())?;
    let ident = (file.meta.ino(), file.created);
    if let Some(facts) = records.get(file_id, ident, offset) {
        return Ok(facts);
    }
    let msg = dbox::read_message(&file.path, &file.data, offset as usize, size)
        .map_err(|e| e.to_string())?;
    if msg.meta.external_parts {
        return Err(format!(
            "m.{file_id}@{offset}: attachments stored outside the file (X metadata) are not supported"
        ));
    }
    let facts = RecordFacts {
        body_len: msg.body.len().min(u32::MAX as usize) as u32,
        guid: msg.meta.guid,
    };
    records.put(file_id, ident, offset, facts.clone());
    Ok(facts)
}

/// True when `name` can be a Maildir base name as it is.
fn valid_base(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// fs layout: directories that only hold other mailboxes.
fn parent_dirs(mailboxes: &[MailboxTable]) -> Vec<String> {
    let dirs: HashSet<&str> = mailboxes.iter().map(|m| m.dir.as_str()).collect();
    let mut parents: Vec<String> = mailboxes
        .iter()
        .flat_map(|m| {
            let parts: Vec<&str> = m.dir.split('/').collect();
            (1..parts.len()).map(move |n| parts[..n].join("/"))
        })
        .filter(|p| !dirs.contains(p.as_str()))
        .collect();
    parents.sort();
    parents.dedup();
    parents
}

fn dir_meta(path: &Path) -> Result<DirMeta> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_dir() {
        return Err(Error::NotADirectory(path.to_path_buf()));
    }
    Ok(DirMeta {
        mode: meta.permissions().mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::storage::mdbox::fixture;

    #[test]
    fn maildir_dirs_follow_the_layout() {
        assert_eq!(maildir_dir(Layout::MaildirPlusPlus, "INBOX").unwrap(), "");
        assert_eq!(
            maildir_dir(Layout::MaildirPlusPlus, "Archive/2023").unwrap(),
            ".Archive.2023"
        );
        assert_eq!(
            maildir_dir(Layout::Fs, "Archive/2023").unwrap(),
            "Archive/2023"
        );
        assert_eq!(maildir_dir(Layout::MaildirPlusPlus, "a.b"), None);
        assert!(valid_base("0123abcd"));
        assert!(!valid_base("a:b") && !valid_base("a/b") && !valid_base("") && !valid_base("a b"));
    }

    /// The table of each fixture says what `doveadm fetch` said: UIDs, GUIDs, flags.
    #[test]
    fn tables_match_what_doveadm_reported() {
        for tree in ["live", "purged", "resynced"] {
            let root = fixture(tree);
            let store = Store::new(&root);
            let table = scan(&root, &ScanOptions::default(), &NoProgress, &store).unwrap();
            let mut got = Vec::new();
            for m in &table.mailboxes {
                assert!(m.broken.is_none(), "{tree} {}: {:?}", m.name, m.broken);
                assert!(m.anomalies.is_empty(), "{tree}: {:?}", m.anomalies);
                for i in 0..m.len() {
                    let f = m.msgs.flags[i];
                    let mut flags: Vec<String> = [
                        ('R', "\\Answered"),
                        ('F', "\\Flagged"),
                        ('T', "\\Deleted"),
                        ('S', "\\Seen"),
                        ('D', "\\Draft"),
                    ]
                    .iter()
                    .filter(|(l, _)| f.system & (1 << (*l as u8 - b'A')) != 0)
                    .map(|(_, n)| n.to_string())
                    .collect();
                    for k in 0..LETTERS {
                        if f.keywords & (1 << k) != 0 {
                            flags.push(m.keywords.names[k].clone().unwrap());
                        }
                    }
                    got.push(format!(
                        "{}\t{}\t{}\t{}",
                        m.name,
                        m.msgs.uid[i],
                        m.guid(i),
                        flags.join(" ")
                    ));
                }
            }
            got.sort();
            let want = std::fs::read_to_string(fixture(&format!("{tree}.fetch"))).unwrap();
            let mut want: Vec<&str> = want.lines().collect();
            want.sort();
            assert_eq!(got, want, "{tree}");
            let inbox = table.mailbox("").unwrap();
            assert_eq!(inbox.name, "INBOX");
            assert_eq!(inbox.dbox.file_id.len(), inbox.len());
            assert!(table.mailbox(".Entw&APw-rfe").is_some());
        }
    }

    /// A batch of mailboxes read again (one map index for all) holds what a whole scan
    /// holds for them; a mailbox gone since is broken (the batch then reads the folder
    /// list), not empty (its copy would be expunged).
    #[test]
    fn a_batch_rescan_reads_each_mailbox_as_the_whole_scan_does() {
        let root = fixture("live");
        let store = Store::new(&root);
        let layout = Layout::MaildirPlusPlus;
        let options = ScanOptions {
            layout: Some(layout),
            ..ScanOptions::default()
        };
        let whole = scan(&root, &options, &NoProgress, &store).unwrap();
        let mut dirs: Vec<String> = whole.mailboxes.iter().map(|m| m.dir.clone()).collect();
        assert!(dirs.len() >= 2, "the fixture has several mailboxes");
        dirs.push(".Gone".into());
        let again = rescan_mailboxes(&root, layout, &dirs, &store);
        assert_eq!(again.len(), dirs.len());
        for ((m, r), dir) in whole.mailboxes.iter().zip(&again).zip(&dirs) {
            assert_eq!((&r.dir, &r.name), (&m.dir, &m.name));
            assert!(r.broken.is_none(), "{dir}: {:?}", r.broken);
            assert_eq!(r.msgs.uid, m.msgs.uid, "{dir}");
            assert_eq!(r.msgs.flags, m.msgs.flags, "{dir}");
            let guids = |t: &MailboxTable| {
                (0..t.len())
                    .map(|i| t.guid(i).to_string())
                    .collect::<Vec<_>>()
            };
            assert_eq!(guids(r), guids(m), "{dir}");
        }
        let gone = again.last().unwrap();
        let why = gone
            .broken
            .as_deref()
            .expect("a vanished mailbox is broken");
        assert!(why.contains("no longer listed") && gone.vanished, "{why}");
        let one = rescan_mailboxes(&root, layout, &dirs[..1], &store);
        assert_eq!(one[0].msgs.uid, whole.mailboxes[0].msgs.uid);
    }

    /// A mailbox listed, then renamed or deleted before its index was read, is broken (left
    /// alone this run), never an empty mailbox whose copy the plan would expunge.
    #[test]
    fn a_mailbox_gone_between_listing_and_reading_is_broken_not_empty() {
        let root = fixture("live");
        let store = Store::new(&root);
        let map = MapIndex::load(&root.join("storage")).unwrap();
        let records = DboxCache::load(None);
        let sources = Sources {
            root: &root,
            map: &map,
            store: &store,
            records: &records,
        };
        let listed = MailboxDir {
            dir: "Projects".into(),
            name: "Projects".into(),
            index_dir: root.join("mailboxes/Projects/dbox-Mails"),
        };
        let table = read_mailbox(&sources, ".Projects", &listed);
        let why = table.broken.as_deref().expect("broken");
        assert!(
            why.contains("mailboxes/Projects/dbox-Mails") && table.vanished,
            "{why}"
        );
        assert!(!table.settled);
    }
}
