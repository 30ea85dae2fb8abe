//! The intent record of an mdbox update, `.mdsync-pending` in the mdbox root: written
//! (and fsynced) before the applier's first write, removed after its last. When a run is
//! killed in between, the next run finds it and first puts the tree back into a state
//! Dovecot's `force-resync` and `purge` agree with: the unfinished transaction at the end
//! of a log goes, `m.N` files (and temporary files) the map never named go, and the
//! refcount of every map record the killed run added or meant to lower is set to the
//! number of mailbox records that point at it. Without this, `doveadm force-resync` would
//! put a record no mailbox holds but whose refcount is not 0 back into its original
//! mailbox (Dovecot's rebuild restores such mail), reviving expunged messages and doubling
//! copied ones. Never touches a map record the killed run did not add or mean to lower.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::storage::mdbox::index;
use crate::storage::mdbox::layout::{list_files, list_mailboxes};
use crate::storage::mdbox::mailbox::MailboxIndex;
use crate::storage::mdbox::map::MapIndex;
use crate::sync::mdbox_new::{fsync_path, process_is_gone, write_file};

/// The record's file name in the mdbox root (Dovecot does not look there).
const FILE_NAME: &str = ".mdsync-pending";

/// Prefix of the temporary `m.N` files the appender writes in `storage/`.
const TEMP_PREFIX: &str = ".temp.mdsync.";

/// What an update is about to do, as far as a repair needs to know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Pending {
    /// The writing process.
    pub pid: u32,
    /// The first `m.N` number it may create.
    pub first_file: u32,
    /// The first map UID it may add.
    pub first_map_uid: u32,
    /// Map UIDs whose refcount it lowers (expunged, or in deleted mailboxes).
    pub unref: Vec<u32>,
}

impl Pending {
    fn render(&self) -> String {
        let unref: Vec<String> = self.unref.iter().map(u32::to_string).collect();
        format!(
            "mdsync-pending 1\npid {}\nfirst_file {}\nfirst_map_uid {}\nunref {}\n",
            self.pid,
            self.first_file,
            self.first_map_uid,
            unref.join(" ")
        )
    }

    fn parse(text: &str) -> Option<Pending> {
        let mut lines = text.lines();
        if lines.next()? != "mdsync-pending 1" {
            return None;
        }
        let mut field = |name: &str| -> Option<String> {
            let line = lines.next()?;
            Some(line.strip_prefix(name)?.trim_start().to_string())
        };
        let pid = field("pid")?.parse().ok()?;
        let first_file = field("first_file")?.parse().ok()?;
        let first_map_uid = field("first_map_uid")?.parse().ok()?;
        let unref = field("unref")?
            .split_whitespace()
            .map(|u| u.parse().ok())
            .collect::<Option<Vec<u32>>>()?;
        Some(Pending {
            pid,
            first_file,
            first_map_uid,
            unref,
        })
    }
}

/// Writes the intent record, durably, before the update's first write.
pub(crate) fn begin(root: &Path, pending: &Pending, owner: (u32, u32)) -> Result<()> {
    let path = root.join(FILE_NAME);
    let tmp = root.join(format!("{FILE_NAME}.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    write_file(&tmp, pending.render().as_bytes(), owner)?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    fsync_path(root)
}

/// Removes the intent record after the update's last write.
pub(crate) fn end(root: &Path) -> Result<()> {
    let path = root.join(FILE_NAME);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(Error::io(&path, e)),
        _ => {}
    }
    fsync_path(root)
}

/// Repairs what a killed update left (see the module doc), when its record is there.
/// Returns the map refcount changes to append (map UID, difference), or `None` when no
/// killed run left anything. A record of a process that still runs is an error: two runs
/// must not update one tree.
pub(crate) fn recover(root: &Path) -> Result<Option<Vec<(u32, i32)>>> {
    let path = root.join(FILE_NAME);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let pending = Pending::parse(&text).ok_or_else(|| Error::Corrupt {
        path: path.clone(),
        what: "not an mdsync intent record".into(),
    })?;
    if pending.pid != std::process::id() && !process_is_gone(pending.pid as i32) {
        return Err(Error::Usage(format!(
            "{}: mdsync process {} is updating this tree; wait for it to finish",
            path.display(),
            pending.pid
        )));
    }
    let storage = root.join("storage");
    remove_dead_temps(&storage)?;
    let mailboxes = list_mailboxes(root).map_err(|e| Error::io(&root.join("mailboxes"), e))?;
    drop_torn_tail(&storage, "dovecot.map.index")?;
    for mailbox in &mailboxes {
        drop_torn_tail(&mailbox.index_dir, "dovecot.index")?;
    }
    let map = MapIndex::load(&storage)?;
    remove_unmapped_files(root, &map, pending.first_file)?;
    let mut refs: HashMap<u32, i64> = HashMap::new();
    for mailbox in &mailboxes {
        if let Some(index) = MailboxIndex::load(&mailbox.index_dir)? {
            for m in &index.messages {
                *refs.entry(m.map_uid).or_default() += 1;
            }
        }
    }
    let lowered: HashSet<u32> = pending.unref.iter().copied().collect();
    let changes = map
        .entries
        .iter()
        .filter(|e| e.map_uid >= pending.first_map_uid || lowered.contains(&e.map_uid))
        .filter_map(|e| {
            let want = refs
                .get(&e.map_uid)
                .copied()
                .unwrap_or(0)
                .min(i64::from(u16::MAX));
            let diff = want - i64::from(e.refcount);
            (diff != 0).then_some((e.map_uid, diff as i32))
        })
        .collect();
    Ok(Some(changes))
}

/// Removes temporary `m.N` files of dead runs from `storage/`.
fn remove_dead_temps(storage: &Path) -> Result<()> {
    let entries = fs::read_dir(storage).map_err(|e| Error::io(storage, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .and_then(|rest| rest.split('.').next())
            .and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(process_is_gone) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Cuts the unfinished transaction a killed write left at the end of `dir/prefix.log`
/// (Dovecot writes over it too: it is no part of the index).
fn drop_torn_tail(dir: &Path, prefix: &str) -> Result<()> {
    let log: PathBuf = dir.join(format!("{prefix}.log"));
    let Ok(meta) = fs::metadata(&log) else {
        return Ok(());
    };
    if meta.len() == 0 {
        // Created, never written: as if it had not been created.
        return fs::remove_file(&log).map_err(|e| Error::io(&log, e));
    }
    let Some(state) = index::load(dir, prefix)? else {
        return Ok(());
    };
    if u64::from(state.log_offset) < meta.len() {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .map_err(|e| Error::io(&log, e))?;
        file.set_len(u64::from(state.log_offset))
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(&log, e))?;
    }
    Ok(())
}

/// Removes `m.N` files numbered from `first_file` that no map record points into: the
/// killed run wrote them, and the map never named them.
fn remove_unmapped_files(root: &Path, map: &MapIndex, first_file: u32) -> Result<()> {
    let mapped: HashSet<u32> = map.entries.iter().map(|e| e.file_id).collect();
    let storage = root.join("storage");
    for (id, path) in list_files(root).map_err(|e| Error::io(&storage, e))? {
        if id >= first_file && id > map.highest_file_id && !mapped.contains(&id) {
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    fsync_path(&storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_reads_back_and_rejects_foreign_text() {
        let p = Pending {
            pid: 42,
            first_file: 7,
            first_map_uid: 300,
            unref: vec![3, 9, 12],
        };
        assert_eq!(Pending::parse(&p.render()), Some(p.clone()));
        let empty = Pending {
            unref: Vec::new(),
            ..p
        };
        assert_eq!(Pending::parse(&empty.render()), Some(empty));
        assert_eq!(Pending::parse("pid 1\n"), None);
    }

    #[test]
    fn a_record_of_a_live_process_refuses_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("storage")).unwrap();
        fs::create_dir_all(tmp.path().join("mailboxes")).unwrap();
        let live = Pending {
            pid: 1,
            ..Pending::default()
        };
        fs::write(tmp.path().join(FILE_NAME), live.render()).unwrap();
        assert!(matches!(recover(tmp.path()), Err(Error::Usage(_))));
        fs::write(tmp.path().join(FILE_NAME), "garbage").unwrap();
        assert!(matches!(recover(tmp.path()), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn leftovers_of_a_dead_writer_go() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let storage = root.join("storage");
        fs::create_dir_all(&storage).unwrap();
        fs::create_dir_all(root.join("mailboxes")).unwrap();
        fs::write(storage.join(".temp.mdsync.2147483646.3"), "x").unwrap();
        fs::write(
            storage.join(format!(".temp.mdsync.{}.4", std::process::id())),
            "x",
        )
        .unwrap();
        fs::write(storage.join("m.1"), "old").unwrap();
        fs::write(storage.join("m.3"), "unmapped").unwrap();
        let dead = Pending {
            pid: 2_147_483_646,
            first_file: 2,
            first_map_uid: 1,
            unref: Vec::new(),
        };
        fs::write(root.join(FILE_NAME), dead.render()).unwrap();
        assert_eq!(recover(root).unwrap(), Some(Vec::new()));
        let mut left: Vec<String> = fs::read_dir(&storage)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                format!(".temp.mdsync.{}.4", std::process::id()),
                "m.1".into()
            ]
        );
    }
}
