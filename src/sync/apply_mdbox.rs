//! The mdbox applier: carries out a plan on an existing mdbox tree, for runs whose caller
//! asserted `--offline` (no Dovecot uses the tree: mdsync takes none of Dovecot's index
//! locks). Order, as Dovecot saves: an intent record first (`mdbox_pending`), then mailbox
//! renames (`mdbox_folders`), new bodies into new `m.N` files (fsynced), then the map index
//! log gets their map records (refcount 1), then each mailbox's index log gets its records
//! (appends, flag and keyword changes, GUID-checked expunges), mailboxes are deleted, and
//! only then are the refcounts of expunged messages lowered and the intent record removed.
//! A run killed in between never leaves a mailbox record without its body; the next run
//! repairs the refcounts from the intent record. Never rewrites a file: logs are appended
//! to (after the unfinished tail of a killed run is cut), `m.N` files are only created.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::progress::{Event, Progress};
use crate::replica::BodySource;
use crate::storage::maildir::filename;
use crate::storage::maildir::keywords::{KeywordMap, LETTERS};
use crate::storage::maildir::layout::Layout;
use crate::storage::maildir::{SUBSCRIPTIONS, UIDVALIDITY_FILE};
use crate::storage::mdbox::append::Appender;
use crate::storage::mdbox::guid_128;
use crate::storage::mdbox::index;
use crate::storage::mdbox::layout::{DBOX_MAILS, list_files};
use crate::storage::mdbox::log_writer::{LogWriter, MailRecord};
use crate::storage::mdbox::mailbox::{MailboxIndex, MailboxMessage};
use crate::storage::mdbox::map::MapIndex;
use crate::sync::apply::ApplyReport;
use crate::sync::mdbox_new::{
    fresh_guid, fsync_path, index_flags, mdbox_dir, mkdir_all, now_secs, store_body,
};
use crate::sync::plan::{MailboxPlan, Plan, UidlistChange};
use crate::sync::{mdbox_folders, mdbox_pending};

/// Applies `plan` to the mdbox root `root`, whose mailbox directories the plan names in
/// `layout`.
pub fn apply(
    root: &Path,
    layout: Layout,
    plan: &Plan,
    source: &dyn BodySource,
    progress: &dyn Progress,
) -> Result<ApplyReport> {
    // Its first write is the intent record: a gated source is waited for whole before it.
    source.settled()?;
    let storage = root.join("storage");
    let owner = (plan.root_meta.uid, plan.root_meta.gid);
    let now = now_secs();
    let map_log = storage.join("dovecot.map.index.log");
    // What a killed update left goes first (see `mdbox_pending`).
    mdbox_folders::sweep_trash(root);
    if let Some(changes) = mdbox_pending::recover(root)? {
        if !changes.is_empty() {
            let map = MapIndex::load(&storage)?;
            append_log(&map_log, owner, now, map.uid_validity.max(now), |log| {
                log.ext_intro("ref", 0, 2, 2);
                log.atomic_inc(&changes);
                log.commit();
            })?;
        }
        mdbox_pending::end(root)?;
    }
    // Nothing else to do: neither the map index nor any mailbox index is read (a no-change
    // run must stay as cheap as its scans).
    if plan.is_empty() {
        write_root_files(root, plan, owner)?;
        return Ok(ApplyReport::default());
    }
    let map = MapIndex::load(&storage)?;
    let existing = list_files(root).map_err(|e| Error::io(&storage, e))?;
    let first_file = existing
        .last()
        .map_or(0, |(id, _)| *id)
        .max(map.highest_file_id)
        + 1;
    let mut appender = Appender::new(storage.clone(), owner, now, first_file, map.next_uid);
    let mut report = ApplyReport::default();
    // 0. Read every mailbox index (where it is before the renames) and check that the plan
    // fits Dovecot's rules, before anything is written.
    let mut staged = Vec::new();
    for mp in plan.mailboxes.iter().filter(|m| !m.is_empty()) {
        let before = mdbox_folders::dir_before_renames(root, layout, plan, &mp.dir);
        let index_dir = root.join("mailboxes").join(mdbox_dir(layout, &before)?);
        let index = MailboxIndex::load(&index_dir.join(DBOX_MAILS))?;
        check_uids(mp, index.as_ref())?;
        let moved = renumbered(mp, index.as_ref());
        check_renumbered(mp, index.as_ref(), &moved)?;
        let dir = root.join("mailboxes").join(mdbox_dir(layout, &mp.dir)?);
        staged.push((mp, dir, index, Vec::new(), moved));
    }
    let mut deleted = Vec::new();
    for d in &plan.delete_mailboxes {
        let dir = root.join("mailboxes").join(mdbox_dir(layout, &d.dir)?);
        let index = MailboxIndex::load(&dir.join(DBOX_MAILS))?;
        deleted.push((dir, index));
    }
    // The intent record, before the first write: a killed run's successor repairs from it.
    let unref = staged
        .iter()
        .flat_map(|(mp, _, index, _, moved)| {
            // A renumbered message's map record is counted again too: a kill between its
            // new record and the old one's expunge leaves two pointing at it.
            expunged_map_uids(mp, index.as_ref()).chain(moved.iter().map(|r| r.record.map_uid))
        })
        .chain(deleted.iter().flat_map(|(_, index)| {
            index
                .iter()
                .flat_map(|i| i.messages.iter().map(|m| m.map_uid))
        }))
        .collect();
    let pending = mdbox_pending::Pending {
        pid: std::process::id(),
        first_file,
        first_map_uid: map.next_uid,
        unref,
    };
    mdbox_pending::begin(root, &pending, owner)?;
    // Then, as for Maildir, the mailbox renames first: the rest of the plan names the
    // mailboxes by their new names. Dovecot's list index goes before any of it.
    mdbox_folders::prepare(root, plan)?;
    mdbox_folders::rename_mailboxes(root, layout, plan, owner, progress)?;
    // 1. Bodies into new m.N files; 2. their map records. Files of a failed step go again.
    // A remote source is told every body at once; they are opened in plan order.
    if source.sequential() {
        crate::sync::apply::announce_copies(plan, source)?;
    }
    let stored = (|| {
        for (mp, _, index, records, moved) in &mut staged {
            *records = stage_copies(mp, index.as_ref(), source, &mut appender, &mut report)?;
            records.extend(moved.iter().map(|r| r.record.clone()));
            records.sort_by_key(|r| r.uid);
        }
        appender.finish()?;
        if !appender.is_empty() {
            append_log(&map_log, owner, now, map.uid_validity.max(now), |log| {
                appender.map_records(log)
            })?;
        }
        Ok(())
    })();
    if let Err(e) = stored {
        appender.discard();
        return Err(e);
    }
    // 3. The mailbox indexes.
    let mut unref: Vec<(u32, i32)> = Vec::new();
    for (mp, dir, index, records, moved) in &staged {
        let outcome = update_mailbox(
            mp,
            (&root.join("mailboxes"), dir),
            index.as_ref(),
            (records, moved),
            map.uid_validity,
            owner,
            now,
        )?;
        unref.extend(outcome.iter().map(|&m| (m, -1)));
        report.expunged += outcome.len() as u64;
        report.mailboxes_created += u64::from(index.is_none());
        report.flag_changes += mp.renames.iter().filter(|r| !r.is_move_only()).count() as u64;
        report.moves += mp.renames.iter().filter(|r| r.is_move_only()).count() as u64;
        progress.event(Event::Progressed {
            operations: (mp.copies.len() + mp.renames.len() + mp.expunges.len()) as u64,
            bytes: 0,
        });
    }
    for (dir, index) in &deleted {
        if let Some(index) = index {
            unref.extend(index.messages.iter().map(|m| (m.map_uid, -1)));
            report.expunged += index.messages.len() as u64;
        }
        if dir.join(DBOX_MAILS).is_dir() {
            mdbox_folders::delete_mailbox(root, dir)?;
        }
        report.mailboxes_deleted += 1;
    }
    // 4. Lower the refcounts of what no mailbox holds any more.
    if !unref.is_empty() {
        append_log(&map_log, owner, now, map.uid_validity.max(now), |log| {
            log.ext_intro("ref", 0, 2, 2);
            log.atomic_inc(&unref);
            log.commit();
        })?;
    }
    write_root_files(root, plan, owner)?;
    mdbox_pending::end(root)?;
    Ok(report)
}

/// Map UIDs of the messages a mailbox plan expunges (those the index still holds).
fn expunged_map_uids<'a>(
    mp: &'a MailboxPlan,
    index: Option<&'a MailboxIndex>,
) -> impl Iterator<Item = u32> + 'a {
    mp.expunges.iter().filter_map(move |e| {
        index.and_then(|i| {
            i.messages
                .iter()
                .find(|m| m.uid == e.uid)
                .map(|m| m.map_uid)
        })
    })
}

/// Refuses copies Dovecot would take for corruption: an append below the mailbox's next
/// UID (a message expunged on the destination alone, or a changed UIDVALIDITY).
fn check_uids(mp: &MailboxPlan, index: Option<&MailboxIndex>) -> Result<()> {
    let Some(index) = index else {
        return Ok(());
    };
    match mp
        .copies
        .iter()
        .find(|c| c.uid != 0 && c.uid < index.next_uid)
    {
        Some(c) => Err(Error::Usage(format!(
            "{}: UID {} lies below the destination's next UID {}: an mdbox index cannot take \
             it back (was it expunged on the destination, or did UIDVALIDITY change?); \
             delete the destination mailbox and run again",
            mp.name, c.uid, index.next_uid
        ))),
        None => Ok(()),
    }
}

/// A message the plan gives a new UID in its own mailbox (a two-way sync's UID conflict,
/// where Maildir only rewrites its uidlist record): in an mdbox index its record is
/// expunged under the old UID and appended under the new one, pointing at the same map
/// record, so no body moves and no refcount changes.
#[derive(Debug, Clone)]
struct Renumbered {
    old_uid: u32,
    record: MailRecord,
}

/// The plan's renumberings in one mailbox: a UID the uidlist edit removes (and no expunge
/// names) whose message comes back, by GUID, in an upserted record under a UID the
/// mailbox does not hold and no copy brings.
fn renumbered(mp: &MailboxPlan, index: Option<&MailboxIndex>) -> Vec<Renumbered> {
    let (Some(index), Some(UidlistChange::Write(edit))) = (index, &mp.uidlist) else {
        return Vec::new();
    };
    let removed: HashSet<u32> = edit.remove.iter().copied().collect();
    let expunged: HashSet<u32> = mp.expunges.iter().map(|e| e.uid).collect();
    let copied: HashSet<u32> = mp.copies.iter().map(|c| c.uid).collect();
    let held: HashSet<u32> = index.messages.iter().map(|m| m.uid).collect();
    let mut leaving: Vec<&MailboxMessage> = index
        .messages
        .iter()
        .filter(|m| removed.contains(&m.uid) && !expunged.contains(&m.uid))
        .collect();
    let mut out = Vec::new();
    for u in &edit.upsert {
        if copied.contains(&u.uid) || held.contains(&u.uid) {
            continue;
        }
        let guid = guid_128(u.guid.as_deref().unwrap_or(&u.base));
        if let Some(k) = leaving.iter().position(|m| m.guid == guid) {
            let m = leaving.swap_remove(k);
            out.push(Renumbered {
                old_uid: m.uid,
                record: MailRecord {
                    uid: u.uid,
                    flags: m.flags,
                    keywords: index_keywords(index, m.keywords),
                    map_uid: m.map_uid,
                    guid: m.guid,
                },
            });
        }
    }
    out
}

/// The names of the keyword bits `bits` of `index`.
fn index_keywords(index: &MailboxIndex, bits: u64) -> Vec<String> {
    index
        .keyword_names
        .iter()
        .enumerate()
        .filter(|(i, _)| *i < 64 && bits & (1 << i) != 0)
        .map(|(_, name)| name.clone())
        .collect()
}

/// A renumbered message must land above the mailbox's next UID, like any append.
fn check_renumbered(
    mp: &MailboxPlan,
    index: Option<&MailboxIndex>,
    moved: &[Renumbered],
) -> Result<()> {
    let next_uid = index.map_or(1, |i| i.next_uid);
    match moved.iter().find(|r| r.record.uid < next_uid) {
        Some(r) => Err(Error::Usage(format!(
            "{}: UID {} (renumbered from {}) lies below the mailbox's next UID {}: an mdbox \
             index cannot take it",
            mp.name, r.record.uid, r.old_uid, next_uid
        ))),
        None => Ok(()),
    }
}

/// Reads the bodies of a mailbox plan's copies and appends them to `appender`.
fn stage_copies(
    mp: &MailboxPlan,
    index: Option<&MailboxIndex>,
    source: &dyn BodySource,
    appender: &mut Appender,
    report: &mut ApplyReport,
) -> Result<Vec<MailRecord>> {
    let keywords = letter_names(mp, index);
    let guids: HashMap<u32, Option<String>> = match &mp.uidlist {
        Some(UidlistChange::Write(edit)) => edit
            .upsert
            .iter()
            .map(|r| (r.uid, r.guid.clone()))
            .collect(),
        _ => HashMap::new(),
    };
    let mut next_uid = next_uid_of(mp, index);
    let mut out = Vec::with_capacity(mp.copies.len());
    for op in &mp.copies {
        let parsed = filename::parse(&op.dst_name)
            .map_err(|e| Error::Usage(format!("{}: {e:?}", op.dst_name)))?;
        let uid = if op.uid == 0 { next_uid } else { op.uid };
        next_uid = next_uid.max(uid + 1);
        let guid = guids
            .get(&op.uid)
            .cloned()
            .flatten()
            .unwrap_or_else(|| parsed.base.to_string());
        let body = match source.open_body(&mp.dir, op.src_sub, &op.src_name) {
            Ok(body) => body,
            Err(crate::replica::BodyError::Vanished(what)) => {
                report.vanished += 1;
                report.errors.push(format!("{what}: vanished"));
                continue;
            }
            Err(e) => return Err(Error::Usage(e.to_string())),
        };
        let (map_uid, len) = store_body(appender, body, &guid, &mp.name)?;
        report.messages_copied += 1;
        report.bytes_copied += len;
        out.push(MailRecord {
            uid,
            flags: index_flags(parsed.flags.system),
            keywords: names_of(&keywords, parsed.flags.keywords),
            map_uid,
            guid: guid_128(&guid),
        });
    }
    out.sort_by_key(|r| r.uid);
    Ok(out)
}

/// The letter → keyword map the plan's names use: the plan's new map, else the one the
/// scanner gave the mailbox (index order).
fn letter_names(mp: &MailboxPlan, index: Option<&MailboxIndex>) -> KeywordMap {
    if let Some(map) = &mp.keywords {
        return map.clone();
    }
    current_letters(index)
}

/// The letters the scanner assigned: keyword `i` of the index is letter `a + i`.
fn current_letters(index: Option<&MailboxIndex>) -> KeywordMap {
    let mut map = KeywordMap::default();
    for (i, name) in index
        .map_or(&[][..], |x| &x.keyword_names)
        .iter()
        .enumerate()
        .take(LETTERS)
    {
        map.names[i] = Some(name.clone());
    }
    map
}

fn names_of(map: &KeywordMap, letters: u32) -> Vec<String> {
    (0..LETTERS)
        .filter(|i| letters & (1 << i) != 0)
        .filter_map(|i| map.names[i].clone())
        .collect()
}

/// The first UID a message the source has not numbered may get.
fn next_uid_of(mp: &MailboxPlan, index: Option<&MailboxIndex>) -> u32 {
    let planned = match &mp.uidlist {
        Some(UidlistChange::Write(edit)) => edit.header.next_uid,
        _ => 0,
    };
    index.map_or(1, |i| i.next_uid).max(planned).max(1)
}

/// Writes one mailbox's changes to its index log (creating the mailbox, in `dir` below
/// `boxes`, when it has no index yet); returns the map UIDs of the messages it expunged.
fn update_mailbox(
    mp: &MailboxPlan,
    (boxes, dir): (&Path, &Path),
    index: Option<&MailboxIndex>,
    (records, moved): (&[MailRecord], &[Renumbered]),
    map_validity: u32,
    owner: (u32, u32),
    now: u32,
) -> Result<Vec<u32>> {
    let index_dir = dir.join(DBOX_MAILS);
    let header = match &mp.uidlist {
        Some(UidlistChange::Write(edit)) => Some(&edit.header),
        _ => None,
    };
    if index.is_none() {
        // Creates the missing directories below `mailboxes/`.
        mkdir_all(&index_dir, boxes, owner)?;
    }
    let current = current_letters(index);
    let wanted = letter_names(mp, index);
    let mut expunged_maps = Vec::new();
    let log_path = index_dir.join("dovecot.index.log");
    append_log(
        &log_path,
        owner,
        now,
        header.map_or(now, |h| h.uid_validity),
        |log| {
            if let Some(h) = header {
                if index.is_none_or(|i| i.uid_validity != h.uid_validity) {
                    log.header_update(24, &h.uid_validity.to_le_bytes());
                }
                let guid = h.guid.map(|g| g.0);
                if index.is_none() || guid.is_some() && index.and_then(|i| i.mailbox_guid) != guid {
                    let guid = guid.unwrap_or_else(|| fresh_guid(&mp.name));
                    log.mdbox_hdr(map_validity, guid);
                }
                log.commit();
            }
            if !records.is_empty() {
                log.mdbox_appends(records, now);
            }
            for r in &mp.renames {
                let (Ok(from), Ok(to)) =
                    (filename::parse(&r.from_name), filename::parse(&r.to_name))
                else {
                    continue;
                };
                let (old, new) = (index_flags(from.flags.system), index_flags(to.flags.system));
                if old != new {
                    log.flag_update(r.uid, new & !old, old & !new);
                }
                let old_kw = names_of(&current, from.flags.keywords);
                let new_kw = names_of(&wanted, to.flags.keywords);
                for name in new_kw.iter().filter(|n| !old_kw.contains(n)) {
                    log.keyword_add(name, &[r.uid]);
                }
                for name in old_kw.iter().filter(|n| !new_kw.contains(n)) {
                    log.keyword_remove(name, &[r.uid]);
                }
                log.commit();
            }
            for e in &mp.expunges {
                if let Some(m) = index.and_then(|i| i.messages.iter().find(|m| m.uid == e.uid)) {
                    log.expunge_guid(m.uid, &m.guid);
                    log.commit();
                    expunged_maps.push(m.map_uid);
                }
            }
            // The old records of renumbered messages: their map records stay referenced
            // by the new ones, so no refcount changes.
            for r in moved {
                log.expunge_guid(r.old_uid, &r.record.guid);
                log.commit();
            }
            if let Some(h) = header
                && index.is_none_or(|i| h.next_uid > i.next_uid)
            {
                log.header_update(28, &h.next_uid.to_le_bytes());
                log.commit();
            }
        },
    )?;
    Ok(expunged_maps)
}

/// Appends what `fill` writes to the log at `path`: after checking that the log ends with
/// a complete transaction, or as a new log when there is none (`validity` for its header).
fn append_log(
    path: &Path,
    owner: (u32, u32),
    now: u32,
    validity: u32,
    fill: impl FnOnce(&mut LogWriter),
) -> Result<()> {
    let dir = path.parent().expect("a log lives in a directory");
    let prefix = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".log"))
        .expect("a .log file");
    let len = fs::metadata(path).map(|m| m.len() as usize).ok();
    let mut log = match len {
        Some(len) => {
            let state = index::load(dir, prefix)?;
            if state.is_some_and(|s| s.log_offset as usize != len) {
                return Err(Error::Corrupt {
                    path: path.to_path_buf(),
                    what: "ends with an unfinished transaction; let Dovecot open it first".into(),
                });
            }
            LogWriter::continuing(len)
        }
        None => {
            let mut log = LogWriter::new(now, now);
            log.header_update(24, &validity.to_le_bytes());
            log.commit();
            log
        }
    };
    fill(&mut log);
    let bytes = log.finish();
    if len.is_none() {
        // A new log appears whole (a kill never leaves a log without its header).
        replace_file(path, &bytes, owner)?;
        return fsync_path(dir);
    }
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.write_all(&bytes).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

/// `subscriptions` and `dovecot-uidvalidity`, replaced by rename.
fn write_root_files(root: &Path, plan: &Plan, owner: (u32, u32)) -> Result<()> {
    if let Some(subs) = &plan.subscriptions {
        let path = root.join(SUBSCRIPTIONS);
        match subs {
            Some(bytes) => replace_file(&path, bytes, owner)?,
            None => {
                let _ = fs::remove_file(&path);
            }
        }
    }
    if let Some(next) = plan.uidvalidity_next {
        replace_file(
            &root.join(UIDVALIDITY_FILE),
            format!("{next:x}").as_bytes(),
            owner,
        )?;
    }
    Ok(())
}

fn replace_file(path: &Path, bytes: &[u8], owner: (u32, u32)) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.mdsync-tmp", path.display()));
    let _ = fs::remove_file(&tmp);
    crate::sync::mdbox_new::write_file(&tmp, bytes, owner)?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
