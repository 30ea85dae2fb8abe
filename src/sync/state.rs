//! Pair state: per mailbox, the stamps both sides had when a run found them in sync. A
//! mailbox whose stamps are still those on both sides is in sync without being read — the
//! no-change run reads four stamps per mailbox and nothing else. Kept beside the scan cache
//! on the initiating side, written atomically; a missing or damaged file is an empty state.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::model::MailboxStamps;
use crate::storage::maildir::writer;
use crate::sync::plan::Plan;
use crate::table::{MailTable, MailboxTable};

/// What the last in-sync run saw of one mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InSync {
    /// Source stamps.
    pub src: MailboxStamps,
    /// Source message count.
    pub src_messages: u64,
    /// Destination stamps.
    pub dst: MailboxStamps,
    /// Destination message count.
    pub dst_messages: u64,
}

/// The state of one (source, destination) pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PairState {
    /// Format version; other versions are ignored.
    pub version: u32,
    /// Mailbox directory → stamps of both sides when last found in sync.
    pub mailboxes: HashMap<String, InSync>,
}

const VERSION: u32 = 1;

impl PairState {
    /// Loads a state file; anything unreadable is an empty state.
    pub fn load(path: &Path) -> PairState {
        fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<PairState>(&bytes).ok())
            .filter(|s| s.version == VERSION)
            .unwrap_or_default()
    }

    /// Writes the state atomically.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let tmp = dir.join(writer::temp_name());
        fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        fs::rename(&tmp, path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// Directories of the mailboxes last found in sync.
    pub fn dirs(&self) -> Vec<String> {
        self.mailboxes.keys().cloned().collect()
    }

    /// The "do not read if still so" map for the source side. With `dst_now`, the
    /// destination's current stamps, a mailbox the destination changed is left out: it
    /// must be read on both sides, and asking for it in the scan is cheaper than a second
    /// look afterwards (a round trip per mailbox to a remote side).
    pub fn source_hints(
        &self,
        dst_now: Option<&HashMap<String, MailboxStamps>>,
    ) -> HashMap<String, (MailboxStamps, u64)> {
        self.mailboxes
            .iter()
            .filter(|(d, s)| dst_now.is_none_or(|now| now.get(*d) == Some(&s.dst)))
            .map(|(d, s)| (d.clone(), (s.src, s.src_messages)))
            .collect()
    }

    /// The same for the destination side, given the source's current stamps.
    pub fn destination_hints(
        &self,
        src_now: Option<&HashMap<String, MailboxStamps>>,
    ) -> HashMap<String, (MailboxStamps, u64)> {
        self.mailboxes
            .iter()
            .filter(|(d, s)| src_now.is_none_or(|now| now.get(*d) == Some(&s.src)))
            .map(|(d, s)| (d.clone(), (s.dst, s.dst_messages)))
            .collect()
    }

    /// The state after a run that applied `plan` completely: pairs not read stay in sync;
    /// pairs the plan left untouched are in sync now, unless a stamp is too recent to trust.
    pub fn after_run(&self, src: &MailTable, dst: &MailTable, plan: &Plan) -> PairState {
        let touched: std::collections::HashSet<&str> =
            plan.mailboxes.iter().map(|m| m.dir.as_str()).collect();
        let mut next = PairState {
            version: VERSION,
            mailboxes: HashMap::new(),
        };
        for s in &src.mailboxes {
            let Some(d) = dst.mailbox(&s.dir) else {
                continue;
            };
            if s.unchanged.is_some() && d.unchanged.is_some() {
                if let Some(old) = self.mailboxes.get(&s.dir) {
                    next.mailboxes.insert(s.dir.clone(), *old);
                }
                continue;
            }
            if touched.contains(s.dir.as_str()) || !trustworthy(s) || !trustworthy(d) {
                continue;
            }
            next.mailboxes.insert(
                s.dir.clone(),
                InSync {
                    src: s.stamps,
                    src_messages: s.message_count(),
                    dst: d.stamps,
                    dst_messages: d.message_count(),
                },
            );
        }
        next
    }
}

/// A mailbox read cleanly whose stamps are old enough to be trusted next time: settled
/// (not racy, and not moved while it was read).
fn trustworthy(m: &MailboxTable) -> bool {
    m.broken.is_none() && m.anomalies.is_empty() && m.settled
}

/// Where the state of a pair lives: `<dir>/<xxh3(src)>-<xxh3(dst)>.pair`.
pub fn state_file(dir: &Path, src_location: &str, dst_location: &str) -> PathBuf {
    let h = |s: &str| xxhash_rust::xxh3::xxh3_64(s.as_bytes());
    dir.join(format!(
        "{:016x}-{:016x}.pair",
        h(src_location),
        h(dst_location)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Stamp;

    fn stamps(n: i64) -> MailboxStamps {
        MailboxStamps {
            parts: [Stamp {
                mtime_ns: n,
                ctime_ns: n,
                ino: 1,
                size: 1,
            }; 4],
        }
    }

    fn table(boxes: Vec<MailboxTable>) -> MailTable {
        MailTable {
            layout: crate::storage::maildir::layout::Layout::MaildirPlusPlus,
            mailboxes: boxes,
            parents: Vec::new(),
            unfollowed: Vec::new(),
            subscriptions: None,
            uidvalidity_next: None,
            root_meta: Default::default(),
            scanned_at_ns: 100_000_000_000,
            anomalies: Vec::new(),
        }
    }

    /// A listed mailbox; `settled` as the scanner found it.
    fn mailbox(dir: &str, stamp: i64, settled: bool) -> MailboxTable {
        MailboxTable {
            dir: dir.into(),
            stamps: stamps(stamp),
            settled,
            ..MailboxTable::default()
        }
    }

    #[test]
    fn untouched_old_pairs_become_in_sync_racy_and_touched_do_not() {
        let src = table(vec![
            mailbox("", 1, true),
            mailbox(".A", 1, true),
            mailbox(".B", 99_000_000_000, false),
        ]);
        let dst = table(vec![
            mailbox("", 1, true),
            mailbox(".A", 1, true),
            mailbox(".B", 1, true),
        ]);
        let plan = Plan {
            mailboxes: vec![crate::sync::plan::MailboxPlan {
                dir: ".A".into(),
                ..Default::default()
            }],
            ..Plan::default()
        };
        let next = PairState::default().after_run(&src, &dst, &plan);
        assert!(next.mailboxes.contains_key(""));
        assert!(!next.mailboxes.contains_key(".A"), "touched by the plan");
        assert!(!next.mailboxes.contains_key(".B"), "source not settled");
    }

    #[test]
    fn a_mailbox_changed_on_one_side_gets_no_hint_for_the_other() {
        let mut state = PairState::default();
        for dir in ["", ".A"] {
            state.mailboxes.insert(
                dir.into(),
                InSync {
                    src: stamps(1),
                    src_messages: 1,
                    dst: stamps(2),
                    dst_messages: 1,
                },
            );
        }
        let src_now: HashMap<String, MailboxStamps> =
            [("".into(), stamps(1)), (".A".into(), stamps(5))].into();
        let dst_hints = state.destination_hints(Some(&src_now));
        assert!(dst_hints.contains_key(""));
        assert!(!dst_hints.contains_key(".A"), "changed on the source");
        assert_eq!(state.destination_hints(None).len(), 2, "nothing known");
        let dst_now: HashMap<String, MailboxStamps> = [("".into(), stamps(2))].into();
        let src_hints = state.source_hints(Some(&dst_now));
        assert_eq!(src_hints.keys().collect::<Vec<_>>(), [&String::new()]);
    }

    #[test]
    fn round_trips_and_ignores_damage() {
        let dir = tempfile::tempdir().unwrap();
        let file = state_file(dir.path(), "a", "b");
        let mut state = PairState {
            version: VERSION,
            ..PairState::default()
        };
        state.mailboxes.insert(
            "".into(),
            InSync {
                src: stamps(1),
                src_messages: 3,
                dst: stamps(2),
                dst_messages: 3,
            },
        );
        state.save(&file).unwrap();
        assert_eq!(PairState::load(&file), state);
        fs::write(&file, b"{garbage").unwrap();
        assert_eq!(PairState::load(&file), PairState::default());
    }
}
