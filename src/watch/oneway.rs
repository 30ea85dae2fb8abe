//! The one-way batch step of `watch`: what both sides looked like after the last batch
//! (per mailbox its stamps and message count, plus the root files), and how to bring the
//! destination along when some mailboxes changed — read only those again on both sides,
//! stand the others in as placeholders, and hand both tables to the backup's `converge`.
//! Holds no message rows between batches; never decides what to copy itself.

use std::collections::{BTreeMap, HashMap};

use crate::error::Result;
use crate::model::MailboxStamps;
use crate::progress::Progress;
use crate::replica::Replica;
use crate::scan::ScanOptions;
use crate::storage::maildir::layout::Layout;
use crate::sync::backup::{self, BackupOptions, Sweep};
use crate::sync::plan::Plan;
use crate::table::{MailTable, MailboxTable};
use crate::watch::coalesce::Dirty;
use crate::watch::{BatchReport, Step};

/// What is known about one mailbox on one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Known {
    /// Stamps when it was last read; `None` once the destination's applier wrote to it.
    stamps: Option<MailboxStamps>,
    /// Messages it held (for the delete guard).
    count: u64,
}

/// One side's picture between batches.
#[derive(Debug, Clone)]
struct Side {
    /// Mailboxes by directory.
    known: BTreeMap<String, Known>,
    /// The root files and folder list (a table without mailboxes).
    root: MailTable,
}

/// What a read of `m` vouches for: its stamps and count, unless it could not be read (a
/// broken mailbox's stamps would let later batches skip it as unchanged).
fn known_of(m: &MailboxTable) -> Known {
    Known {
        stamps: m.broken.is_none().then_some(m.stamps),
        count: m.message_count(),
    }
}

impl Side {
    fn from_table(table: &MailTable) -> Side {
        Side {
            known: table
                .mailboxes
                .iter()
                .map(|m| (m.dir.clone(), known_of(m)))
                .collect(),
            root: MailTable {
                mailboxes: Vec::new(),
                ..table.clone()
            },
        }
    }

    /// Scan hints: every mailbox not in `dirty` whose stamps are known.
    fn hints(&self, dirty: &Dirty) -> HashMap<String, (MailboxStamps, u64)> {
        self.known
            .iter()
            .filter(|(dir, _)| !dirty.mailboxes.contains(*dir))
            .filter_map(|(dir, k)| k.stamps.map(|s| (dir.clone(), (s, k.count))))
            .collect()
    }

    /// The whole side as the differ sees it: the mailboxes in `read` as read, every other
    /// one a placeholder that the differ leaves alone.
    fn view(&self, layout: Layout, read: &HashMap<String, MailboxTable>) -> MailTable {
        let mailboxes = self
            .known
            .iter()
            .map(|(dir, k)| match read.get(dir) {
                Some(table) => table.clone(),
                None => MailboxTable {
                    dir: dir.clone(),
                    name: layout.display_name(dir),
                    unchanged: Some(k.count),
                    stamps: k.stamps.unwrap_or_default(),
                    ..MailboxTable::default()
                },
            })
            .collect();
        MailTable {
            mailboxes,
            anomalies: Vec::new(),
            ..self.root.clone()
        }
    }
}

/// The one-way mirror's batch step.
pub struct OneWay {
    options: BackupOptions,
    state: Option<(Side, Side)>,
}

impl OneWay {
    /// A step that knows nothing yet: the first batch is a full run.
    pub fn new(options: BackupOptions) -> OneWay {
        OneWay {
            options,
            state: None,
        }
    }

    /// The layout the first run settled on.
    fn layout(&self) -> Option<Layout> {
        self.state.as_ref().map(|(src, _)| src.root.layout)
    }

    /// Diffs and applies two views, then remembers what both sides look like now.
    fn converge(
        &mut self,
        replicas: (&dyn Replica, &dyn Replica),
        mut src_table: MailTable,
        dst_table: MailTable,
        structure: bool,
        progress: &dyn Progress,
    ) -> Result<BatchReport> {
        let keep = |_: &MailTable, _: &MailTable, _: Option<&Plan>| {};
        let applied = backup::converge(
            replicas,
            (&mut src_table, &dst_table),
            &self.options,
            Sweep::Read,
            progress,
            &keep,
        )?;
        let read = src_table
            .mailboxes
            .iter()
            .filter(|m| m.unchanged.is_none())
            .count();
        let next = remember(
            self.state.take(),
            &src_table,
            &dst_table,
            &applied.plan,
            structure,
        );
        self.state = Some(next);
        Ok(BatchReport {
            outcome: applied.outcome,
            mailboxes_read: read as u64,
            full: false,
            conflicts: Vec::new(),
        })
    }
}

/// Both sides' pictures after a batch: the source as read; the destination as read except
/// where the plan wrote (stamps unknown, count as the source's) or deleted.
fn remember(
    before: Option<(Side, Side)>,
    src_table: &MailTable,
    dst_table: &MailTable,
    plan: &Plan,
    structure: bool,
) -> (Side, Side) {
    let (mut src, mut dst) = match before {
        Some((src, dst)) if !structure => (src, dst),
        _ => (Side::from_table(src_table), Side::from_table(dst_table)),
    };
    for m in src_table.mailboxes.iter().filter(|m| m.unchanged.is_none()) {
        src.known.insert(m.dir.clone(), known_of(m));
    }
    for m in dst_table.mailboxes.iter().filter(|m| m.unchanged.is_none()) {
        dst.known.insert(m.dir.clone(), known_of(m));
    }
    for m in &plan.mailboxes {
        let count = src.known.get(&m.dir).map_or(0, |k| k.count);
        dst.known.insert(
            m.dir.clone(),
            Known {
                stamps: None,
                count,
            },
        );
    }
    for d in &plan.delete_mailboxes {
        dst.known.remove(&d.dir);
    }
    if plan.subscriptions.is_some() {
        dst.root.subscriptions = src.root.subscriptions.clone();
    }
    if !plan.create_parents.is_empty() || !plan.remove_parents.is_empty() {
        dst.root.parents = src.root.parents.clone();
    }
    if let Some(next) = plan.uidvalidity_next {
        dst.root.uidvalidity_next = Some(next);
    }
    (src, dst)
}

impl Step for OneWay {
    fn full(
        &mut self,
        src: &dyn Replica,
        dst: &dyn Replica,
        progress: &dyn Progress,
    ) -> Result<BatchReport> {
        let options = BackupOptions {
            scan: ScanOptions {
                layout: self.layout().or(self.options.scan.layout),
                ..self.options.scan.clone()
            },
            ..self.options.clone()
        };
        let run = backup::backup_keeping(src, dst, &options, progress)?;
        let read = run
            .src
            .mailboxes
            .iter()
            .filter(|m| m.unchanged.is_none())
            .count();
        let next = remember(None, &run.src, &run.dst, &run.plan, true);
        self.state = Some(next);
        Ok(BatchReport {
            outcome: run.outcome,
            mailboxes_read: read as u64,
            full: true,
            conflicts: Vec::new(),
        })
    }

    fn batch(
        &mut self,
        src: &dyn Replica,
        dst: &dyn Replica,
        dirty: &Dirty,
        progress: &dyn Progress,
    ) -> Result<BatchReport> {
        let Some(sides) = &self.state else {
            return self.full(src, dst, progress);
        };
        if dirty.everything {
            return self.full(src, dst, progress);
        }
        let read = Read {
            replicas: (src, dst),
            sides,
            dirty,
            scan: &self.options.scan,
            progress,
        };
        let dirty_only = if dirty.structure {
            None
        } else {
            read.dirty_mailboxes()?
        };
        let ((src_table, dst_table), structure) = match dirty_only {
            Some(tables) => (tables, false),
            None => (read.structure()?, true),
        };
        self.converge((src, dst), src_table, dst_table, structure, progress)
    }
}

/// How a batch reads both sides before they are diffed.
struct Read<'a> {
    replicas: (&'a dyn Replica, &'a dyn Replica),
    sides: &'a (Side, Side),
    dirty: &'a Dirty,
    scan: &'a ScanOptions,
    progress: &'a dyn Progress,
}

impl Read<'_> {
    /// Reads only the dirty mailboxes on both sides. `None` when that is not enough: a
    /// mailbox not known on a side, or one that cannot be read (as when it was just
    /// deleted): the structure must be read too.
    fn dirty_mailboxes(&self) -> Result<Option<(MailTable, MailTable)>> {
        let ((src, dst), (src_side, dst_side)) = (self.replicas, self.sides);
        let layout = src_side.root.layout;
        let known_on_both = self
            .dirty
            .mailboxes
            .iter()
            .all(|d| src_side.known.contains_key(d) && dst_side.known.contains_key(d));
        if !known_on_both {
            return Ok(None);
        }
        let dirs: Vec<String> = self.dirty.mailboxes.iter().cloned().collect();
        let read = |replica: &dyn Replica| -> Result<HashMap<String, MailboxTable>> {
            let tables = replica.rescan_mailboxes(layout, &dirs)?;
            Ok(dirs.iter().cloned().zip(tables).collect())
        };
        let (src_read, dst_read) = rayon::join(|| read(src), || read(dst));
        let (src_read, dst_read) = (src_read?, dst_read?);
        let broken = src_read.values().chain(dst_read.values());
        if broken.into_iter().any(|m| m.broken.is_some()) {
            return Ok(None);
        }
        Ok(Some((
            src_side.view(layout, &src_read),
            dst_side.view(layout, &dst_read),
        )))
    }

    /// Reads the folder lists and root files of both sides and every mailbox not vouched
    /// for by its stamps (the dirty ones always).
    fn structure(&self) -> Result<(MailTable, MailTable)> {
        let ((src, dst), (src_side, dst_side)) = (self.replicas, self.sides);
        let scan = |hints| ScanOptions {
            layout: Some(src_side.root.layout),
            unchanged_if: hints,
            cache_dir: None,
            defer_cache_writes: true,
            ..self.scan.clone()
        };
        let hints = (src_side.hints(self.dirty), dst_side.hints(self.dirty));
        let (src_scan, dst_scan) = (scan(hints.0), scan(hints.1));
        let (s, d) = rayon::join(
            || src.scan(&src_scan, self.progress),
            || dst.scan(&dst_scan, self.progress),
        );
        let (mut src_table, mut dst_table) = (s?, d?);
        backup::read_one_sided(src, dst, &mut src_table, &mut dst_table);
        Ok((src_table, dst_table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Stamp;
    use crate::sync::plan::{DeleteMailbox, MailboxPlan};

    fn stamps(n: i64) -> MailboxStamps {
        let stamp = Stamp {
            mtime_ns: n,
            ..Stamp::default()
        };
        MailboxStamps { parts: [stamp; 4] }
    }

    fn mailbox(dir: &str, messages: u32, stamp: i64) -> MailboxTable {
        let mut table = MailboxTable {
            dir: dir.into(),
            stamps: stamps(stamp),
            ..MailboxTable::default()
        };
        table.msgs.uid = (1..=messages).collect();
        table
    }

    fn placeholder(dir: &str, messages: u64, stamp: i64) -> MailboxTable {
        MailboxTable {
            dir: dir.into(),
            unchanged: Some(messages),
            stamps: stamps(stamp),
            ..MailboxTable::default()
        }
    }

    fn tree(mailboxes: Vec<MailboxTable>, subscriptions: &[u8]) -> MailTable {
        MailTable {
            layout: Layout::MaildirPlusPlus,
            mailboxes,
            parents: Vec::new(),
            unfollowed: Vec::new(),
            subscriptions: Some(subscriptions.to_vec()),
            uidvalidity_next: Some(10),
            root_meta: Default::default(),
            scanned_at_ns: 0,
            anomalies: Vec::new(),
        }
    }

    /// A mailbox read as broken (gone while read, or bad input) is remembered without
    /// stamps: no later batch skips it as unchanged.
    #[test]
    fn a_mailbox_that_could_not_be_read_is_never_vouched_for() {
        let mut gone = mailbox(".Gone", 0, 7);
        gone.broken = Some("gone while read".into());
        gone.vanished = true;
        let src = tree(vec![mailbox("", 1, 1), gone], b"");
        let dst = tree(vec![mailbox("", 1, 2), mailbox(".Gone", 3, 8)], b"");
        for structure in [true, false] {
            let before = Some((Side::from_table(&src), Side::from_table(&dst)));
            let (src_side, _) = remember(before, &src, &dst, &Plan::default(), structure);
            let hints = src_side.hints(&Dirty::default());
            assert!(hints.contains_key(""), "a clean read is vouched for");
            assert!(!hints.contains_key(".Gone"), "{hints:?}");
        }
    }

    #[test]
    fn what_the_plan_wrote_is_read_again_next_time_and_the_rest_is_vouched_for() {
        let src = tree(
            vec![
                mailbox("", 3, 1),
                placeholder(".Sent", 7, 2),
                mailbox(".New", 1, 3),
            ],
            b"Sent\nNew\n",
        );
        let dst = tree(
            vec![
                mailbox("", 2, 4),
                placeholder(".Sent", 7, 5),
                mailbox(".Old", 9, 6),
            ],
            b"Sent\nOld\n",
        );
        let plan = Plan {
            mailboxes: ["", ".New"]
                .map(|dir| MailboxPlan {
                    dir: dir.into(),
                    ..MailboxPlan::default()
                })
                .to_vec(),
            delete_mailboxes: vec![DeleteMailbox {
                dir: ".Old".into(),
                name: "Old".into(),
                messages: 9,
            }],
            subscriptions: Some(Some(b"Sent\nNew\n".to_vec())),
            uidvalidity_next: Some(12),
            ..Plan::default()
        };
        let (src_side, dst_side) = remember(None, &src, &dst, &plan, true);
        let known = |side: &Side, dir: &str| side.known.get(dir).copied();
        assert_eq!(
            known(&src_side, ".Sent"),
            Some(Known {
                stamps: Some(stamps(2)),
                count: 7
            })
        );
        // Written by the plan: stamps unknown (read again), counted like the source.
        assert_eq!(
            known(&dst_side, ""),
            Some(Known {
                stamps: None,
                count: 3
            })
        );
        assert_eq!(known(&dst_side, ".New").map(|k| k.count), Some(1));
        assert_eq!(known(&dst_side, ".Old"), None);
        assert_eq!(
            known(&dst_side, ".Sent"),
            Some(Known {
                stamps: Some(stamps(5)),
                count: 7
            })
        );
        assert_eq!(dst_side.root.subscriptions, src.subscriptions);
        assert_eq!(dst_side.root.uidvalidity_next, Some(12));

        // The next batch: only INBOX is read; the rest stand in unread, on both sides.
        let dirty = Dirty {
            mailboxes: [String::new()].into(),
            ..Dirty::default()
        };
        assert_eq!(
            dst_side.hints(&dirty).keys().collect::<Vec<_>>(),
            vec![".Sent"],
            "no hint for what was written or is dirty"
        );
        let read = HashMap::from([(String::new(), mailbox("", 3, 9))]);
        let view = dst_side.view(Layout::MaildirPlusPlus, &read);
        let dirs: Vec<(&str, Option<u64>)> = view
            .mailboxes
            .iter()
            .map(|m| (m.dir.as_str(), m.unchanged))
            .collect();
        assert_eq!(dirs, [("", None), (".New", Some(1)), (".Sent", Some(7))]);
        assert!(view.anomalies.is_empty());
    }
}
