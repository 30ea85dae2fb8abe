//! Baselines: the wire encoding of every mailbox table last exchanged with a peer, kept in
//! the cache directory on both sides, so the next exchange can ship a delta against it
//! (`wire::table`). Only an optimisation: a missing, foreign or damaged file just means
//! the whole table is sent. Reads and writes only its own directory.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::wire::table::id_of;

/// Baselines by identity: the mailbox directory each belongs to and its encoding.
pub type Kept = HashMap<u128, (String, Vec<u8>)>;

/// The baselines of one replica as seen from one side: those on disk, and those staged in
/// this session, which [`Baselines::persist`] writes at its end.
#[derive(Debug, Default)]
pub struct Baselines {
    dir: Option<PathBuf>,
    /// Staged this session, by mailbox dir.
    staged: Mutex<HashMap<String, Vec<u8>>>,
    /// Identity of what is on disk, by mailbox dir, as far as this session read it.
    on_disk: Mutex<HashMap<String, u128>>,
}

/// Predicted baselines of the mailboxes a plan changes (mailbox dir, encoding), to be
/// staged once the plan was applied.
#[derive(Debug, Default)]
pub struct Predicted(Vec<(String, Vec<u8>)>);

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Baselines {
    /// Baselines for `key` (a replica location) under `cache_dir`; `None` keeps none.
    pub fn new(cache_dir: Option<&Path>, key: &str) -> Baselines {
        let hash = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
        Baselines {
            dir: cache_dir.map(|c| c.join("baselines").join(format!("{hash:016x}"))),
            ..Baselines::default()
        }
    }

    /// Makes `encoding` the baseline of `mailbox_dir` for the rest of the session and, once
    /// [`Baselines::persist`] runs, on disk.
    pub fn stage(&self, mailbox_dir: &str, encoding: Vec<u8>) {
        if self.dir.is_some() {
            locked(&self.staged).insert(mailbox_dir.to_string(), encoding);
        }
    }

    /// The tables [`crate::sync::predict`] expects after `plan`, for every mailbox the
    /// plan changes, starting from the table staged in this session (the one exchanged).
    /// Both ends of a session stage these ([`Baselines::stage_predicted`]) once the plan
    /// was applied, so they keep the same baselines; computed apart from the staging so
    /// that it can run while the plan is being applied. A mailbox the plan creates starts
    /// from an empty table.
    pub fn predict(&self, plan: &crate::sync::plan::Plan) -> Predicted {
        use crate::table::MailboxTable;
        use crate::wire::table::{decode, encode};
        use rayon::prelude::*;
        if self.dir.is_none() {
            return Predicted(Vec::new());
        }
        let staged = locked(&self.staged);
        let exchanged = &*staged;
        let tables = plan
            .mailboxes
            .par_iter()
            .filter(|m| !m.is_empty())
            .filter_map(|m| {
                let before = match exchanged.get(&m.dir) {
                    Some(bytes) => decode(bytes).ok()?,
                    None if m.create.is_some() => MailboxTable {
                        dir: m.dir.clone(),
                        name: m.name.clone(),
                        ..MailboxTable::default()
                    },
                    None => return None,
                };
                let after = crate::sync::predict::predict(&before, m);
                Some((m.dir.clone(), encode(&after)))
            })
            .collect();
        Predicted(tables)
    }

    /// Stages what [`Baselines::predict`] made, once its plan was applied.
    pub fn stage_predicted(&self, predicted: Predicted) {
        locked(&self.staged).extend(predicted.0);
    }

    /// Writes what the session staged, in parallel, skipping what is already on disk.
    /// The staged tables stay: a later apply in the same session predicts from them.
    pub fn persist(&self) {
        use rayon::prelude::*;
        let on_disk = locked(&self.on_disk).clone();
        let to_write: Vec<(String, Vec<u8>, u128)> = locked(&self.staged)
            .iter()
            .filter_map(|(dir, encoding)| {
                let id = id_of(encoding);
                (on_disk.get(dir) != Some(&id)).then(|| (dir.clone(), encoding.clone(), id))
            })
            .collect();
        let written: Vec<(String, u128)> = to_write
            .into_par_iter()
            .filter_map(|(dir, encoding, id)| self.put(&dir, &encoding).then_some((dir, id)))
            .collect();
        locked(&self.on_disk).extend(written);
    }

    fn file_for(&self, mailbox_dir: &str) -> Option<PathBuf> {
        let hash = xxhash_rust::xxh3::xxh3_64(mailbox_dir.as_bytes());
        Some(self.dir.as_ref()?.join(format!("{hash:016x}.base")))
    }

    /// The baseline of `mailbox_dir`: staged in this session, else on disk.
    pub fn get(&self, mailbox_dir: &str) -> Option<Vec<u8>> {
        if let Some(staged) = locked(&self.staged).get(mailbox_dir) {
            return Some(staged.clone());
        }
        let bytes = fs::read(self.file_for(mailbox_dir)?).ok()?;
        let (dir, encoding) = split(&bytes)?;
        if dir != mailbox_dir {
            return None;
        }
        locked(&self.on_disk).insert(dir.to_string(), id_of(encoding));
        Some(encoding.to_vec())
    }

    /// Every kept baseline by identity: its mailbox dir and encoding.
    pub fn load_all(&self) -> Kept {
        let Some(dir) = &self.dir else {
            return HashMap::new();
        };
        let Ok(entries) = fs::read_dir(dir) else {
            return HashMap::new();
        };
        let all: Kept = entries
            .flatten()
            .filter_map(|e| {
                let bytes = fs::read(e.path()).ok()?;
                let (dir, encoding) = split(&bytes)?;
                Some((id_of(encoding), (dir.to_string(), encoding.to_vec())))
            })
            .collect();
        let mut on_disk = locked(&self.on_disk);
        for (id, (dir, _)) in &all {
            on_disk.insert(dir.clone(), *id);
        }
        all
    }

    /// Keeps `encoding` as the baseline of `mailbox_dir` on disk now (atomically); false
    /// when it could not, which only costs bytes next time.
    pub fn put(&self, mailbox_dir: &str, encoding: &[u8]) -> bool {
        let (Some(dir), Some(file)) = (&self.dir, self.file_for(mailbox_dir)) else {
            return false;
        };
        let mut bytes = Vec::with_capacity(encoding.len() + mailbox_dir.len() + 4);
        bytes.extend_from_slice(&(mailbox_dir.len() as u32).to_le_bytes());
        bytes.extend_from_slice(mailbox_dir.as_bytes());
        bytes.extend_from_slice(encoding);
        crate::scan::cache::put_cache_file(dir, &file, &bytes).is_ok()
    }

    /// Drops the baselines of mailboxes not in `keep`, staged ones too: a session that
    /// lasts (`watch`) would otherwise hold the table of every folder renamed or deleted
    /// since it began.
    pub fn prune(&self, keep: &HashSet<&str>) {
        locked(&self.staged).retain(|dir, _| keep.contains(dir.as_str()));
        locked(&self.on_disk).retain(|dir, _| keep.contains(dir.as_str()));
        let Some(dir) = &self.dir else {
            return;
        };
        let keep: HashSet<PathBuf> = keep.iter().filter_map(|d| self.file_for(d)).collect();
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if !keep.contains(&entry.path()) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

fn split(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let dir = std::str::from_utf8(bytes.get(4..4 + len)?).ok()?;
    Some((dir, bytes.get(4 + len..)?))
}

/// Parses a hex identity sent by a peer.
pub fn parse_id(hex: &str) -> Option<u128> {
    (hex.len() == 32).then(|| u128::from_str_radix(hex, 16).ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baselines_are_kept_per_mailbox_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let b = Baselines::new(Some(dir.path()), "host:/srv/mail");
        b.put("", b"inbox table");
        b.put(".A", b"archive table");
        assert_eq!(b.get("").unwrap(), b"inbox table");
        let all = b.load_all();
        assert_eq!(all.len(), 2);
        assert_eq!(all[&id_of(b"inbox table")].0, "");
        assert_eq!(
            parse_id(&format!("{:032x}", id_of(b"x"))),
            Some(id_of(b"x"))
        );
        b.prune(&[".A"].into_iter().collect());
        assert!(b.get("").is_none());
        assert!(b.get(".A").is_some());
        b.stage(".A", b"newer".to_vec());
        assert_eq!(b.get(".A").unwrap(), b"newer", "staged comes first");
        b.persist();
        let again = Baselines::new(Some(dir.path()), "host:/srv/mail");
        assert_eq!(again.get(".A").unwrap(), b"newer");
        // A session that lasts (watch) forgets the tables of mailboxes that went away.
        b.stage(".Renamed", b"old name".to_vec());
        b.prune(&[".A"].into_iter().collect());
        assert!(b.get(".Renamed").is_none());
        assert_eq!(b.get(".A").unwrap(), b"newer");
        let none = Baselines::new(None, "x");
        assert!(!none.put("", b"t"));
        assert!(none.get("").is_none() && none.load_all().is_empty());
    }

    #[test]
    fn a_session_predicts_from_its_tables_after_writing_them() {
        use crate::sync::plan::{MailboxPlan, Plan};
        use crate::table::MailboxTable;
        let dir = tempfile::tempdir().unwrap();
        let b = Baselines::new(Some(dir.path()), "host:/srv/mail");
        let table = MailboxTable {
            dir: ".A".into(),
            name: "A".into(),
            ..MailboxTable::default()
        };
        b.stage(".A", crate::wire::table::encode(&table));
        let plan = Plan {
            mailboxes: vec![MailboxPlan {
                dir: ".A".into(),
                reset_index: true,
                ..MailboxPlan::default()
            }],
            ..Plan::default()
        };
        // The server writes its baselines after each apply; a second apply in the same
        // session (a two-way sync's renames, then its plan) must still predict, as the
        // client, which writes only at the end, does.
        b.persist();
        assert_eq!(b.predict(&plan).0.len(), 1);
        let on_disk = fs::read_dir(dir.path().join("baselines")).unwrap().count();
        b.persist();
        assert_eq!(
            fs::read_dir(dir.path().join("baselines")).unwrap().count(),
            on_disk
        );
    }
}
