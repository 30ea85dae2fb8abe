//! Storage health of an mdbox root: how many `m.N` files and bytes there are, how many
//! bytes the map still references and how many only wait for `doveadm purge`, refcount-0
//! messages, map entries that point past a file's end (or at a missing file), records in
//! files that no map entry references, and refcounts that disagree with the mailbox
//! indexes. Reads every `m.N` file whole; never repairs anything.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::dbox;
use super::layout::{list_files, list_mailboxes};
use super::mailbox::MailboxIndex;
use super::map::MapIndex;

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// `m.N` files in `storage/`.
    pub files: u64,
    /// Their total size.
    pub file_bytes: u64,
    /// Map entries (messages stored once, however many mailboxes hold them).
    pub map_entries: u64,
    /// Bytes of records with refcount > 0: what purge keeps.
    pub referenced_bytes: u64,
    /// Bytes that are not a referenced record (refcount-0 records, unreferenced records,
    /// file headers): roughly what `doveadm purge` reclaims.
    pub wasted_bytes: u64,
    /// Map entries with refcount 0.
    pub refcount_zero: u64,
    /// Map entries pointing past their file's end or at a missing file.
    pub past_end: Vec<String>,
    /// Records found in files that no map entry references: (`m.N@offset`, GUID).
    pub unreferenced: Vec<(String, String)>,
    /// Files whose records do not parse (the error).
    pub unreadable: Vec<String>,
    /// Map entries whose refcount differs from the mailbox records pointing at them.
    pub refcount_mismatch: Vec<String>,
    /// Mailbox records whose map UID is not in the map.
    pub dangling: Vec<String>,
}

impl Health {
    /// True when nothing is wrong (waste waiting for purge is not wrong).
    pub fn is_clean(&self) -> bool {
        self.past_end.is_empty()
            && self.unreferenced.is_empty()
            && self.unreadable.is_empty()
            && self.refcount_mismatch.is_empty()
            && self.dangling.is_empty()
    }
}

/// Checks the mdbox root `root`.
pub fn check(root: &Path) -> crate::Result<Health> {
    let map = MapIndex::load(&root.join("storage"))?;
    let files = list_files(root).map_err(|e| crate::Error::io(&root.join("storage"), e))?;
    let mut health = Health {
        files: files.len() as u64,
        map_entries: map.entries.len() as u64,
        ..Health::default()
    };
    let mut by_file: HashMap<u32, Vec<(u32, u32, u16)>> = HashMap::new();
    for e in &map.entries {
        by_file
            .entry(e.file_id)
            .or_default()
            .push((e.offset, e.size, e.refcount));
        if e.refcount == 0 {
            health.refcount_zero += 1;
        }
    }
    let present: HashSet<u32> = files.iter().map(|(id, _)| *id).collect();
    for (id, entries) in &by_file {
        if !present.contains(id) {
            health.past_end.extend(
                entries
                    .iter()
                    .map(|(offset, _, _)| format!("m.{id}@{offset}: the file is missing")),
            );
        }
    }
    for (id, path) in &files {
        check_file(
            *id,
            path,
            by_file.get(id).map_or(&[][..], Vec::as_slice),
            &mut health,
        )?;
    }
    health.wasted_bytes = health.file_bytes.saturating_sub(health.referenced_bytes);
    check_refcounts(root, &map, &mut health)?;
    Ok(health)
}

/// One `m.N` file against the map entries that point into it.
fn check_file(
    id: u32,
    path: &Path,
    entries: &[(u32, u32, u16)],
    health: &mut Health,
) -> crate::Result<()> {
    let data = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
    health.file_bytes += data.len() as u64;
    let mapped: HashSet<u32> = entries.iter().map(|(offset, _, _)| *offset).collect();
    for &(offset, size, refcount) in entries {
        match dbox::read_message(path, &data, offset as usize, size) {
            Ok(msg) if refcount > 0 => health.referenced_bytes += msg.record.len() as u64,
            Ok(_) => {}
            Err(e) => health.past_end.push(format!("m.{id}@{offset}: {}", e.what)),
        }
    }
    match dbox::read_all(path, &data) {
        Ok(records) => health.unreferenced.extend(
            records
                .iter()
                .filter(|r| !mapped.contains(&(r.record.start as u32)))
                .map(|r| (format!("m.{id}@{}", r.record.start), r.meta.guid.clone())),
        ),
        Err(e) => health.unreadable.push(e.to_string()),
    }
    Ok(())
}

/// Compares each map refcount with the number of mailbox records pointing at the entry.
fn check_refcounts(root: &Path, map: &MapIndex, health: &mut Health) -> crate::Result<()> {
    let mut counts: HashMap<u32, u32> = HashMap::new();
    let mailboxes =
        list_mailboxes(root).map_err(|e| crate::Error::io(&root.join("mailboxes"), e))?;
    for mb in mailboxes {
        let Some(index) = MailboxIndex::load(&mb.index_dir)? else {
            continue;
        };
        for m in &index.messages {
            if map.get(m.map_uid).is_none() {
                health.dangling.push(format!(
                    "{} uid {}: map UID {} missing",
                    mb.name, m.uid, m.map_uid
                ));
            }
            *counts.entry(m.map_uid).or_default() += 1;
        }
    }
    for e in &map.entries {
        let seen = counts.get(&e.map_uid).copied().unwrap_or(0);
        if seen != u32::from(e.refcount) {
            health.refcount_mismatch.push(format!(
                "map UID {}: refcount {} but {seen} mailbox records",
                e.map_uid, e.refcount
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;

    #[test]
    fn live_tree_waits_for_purge_and_purged_tree_does_not() {
        let live = check(&fixture("live")).unwrap();
        assert!(live.is_clean(), "{live:?}");
        assert_eq!(live.map_entries, 11);
        assert_eq!(live.refcount_zero, 2);
        let purged = check(&fixture("purged")).unwrap();
        assert!(purged.is_clean(), "{purged:?}");
        assert_eq!(purged.refcount_zero, 0);
        assert_eq!(purged.map_entries, 9);
        // Purge keeps every referenced byte and drops the two refcount-0 records.
        assert_eq!(purged.referenced_bytes, live.referenced_bytes);
        assert!(purged.wasted_bytes < live.wasted_bytes);
        assert!(live.files >= 2);
    }

    #[test]
    fn damage_shows_up() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        let status = std::process::Command::new("cp")
            .args([
                "-a",
                fixture("purged").to_str().unwrap(),
                root.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let (id, path) = list_files(&root).unwrap().pop().unwrap();
        let data = std::fs::read(&path).unwrap();
        std::fs::write(&path, &data[..data.len() - 5]).unwrap();
        // A record nothing references: a copy of the file under a new number.
        std::fs::write(root.join(format!("storage/m.{}", id + 10)), &data).unwrap();
        let h = check(&root).unwrap();
        assert!(!h.is_clean());
        assert_eq!(h.past_end.len(), 1, "{h:?}");
        assert!(h.past_end[0].starts_with(&format!("m.{id}@")), "{h:?}");
        assert!(!h.unreferenced.is_empty(), "{h:?}");
        assert_eq!(h.unreadable.len(), 1, "{h:?}");
    }
}
