//! The two-way batch step of `watch --two-way`: `sync` semantics in the watch loop. A full
//! run is a whole two-way round against the pair's base; a batch reads only the dirty
//! mailboxes, on both sides, and stands every other mailbox in as the base says both sides
//! hold it — a placeholder the merge treats as unchanged on both sides, so a mailbox not
//! read can never look deleted, emptied or changed. Keeps the base in memory between
//! rounds and saves it (atomically) after each round that changed it. Never decides what
//! to copy itself (the merge does) and never writes mail (the appliers do).

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::Result;
use crate::progress::Progress;
use crate::replica::Replica;
use crate::scan::ScanOptions;
use crate::storage::maildir::layout::Layout;
use crate::sync::apply::ApplyReport;
use crate::sync::backup::BackupOutcome;
use crate::sync::base::{BaseMailbox, BaseState};
use crate::sync::plan::PlanCounts;
use crate::sync::twoway::{self, Round, ScannedPair, Sides, SyncOptions, SyncOutcome};
use crate::table::{MailTable, MailboxTable};
use crate::watch::coalesce::Dirty;
use crate::watch::{BatchReport, Step};
use crate::wire::messages::RootFacts;

/// Mailboxes read in a batch, by directory.
type Read = HashMap<String, MailboxTable>;

/// What a batch needs besides the base: both sides' root as the last full run read it.
#[derive(Debug, Clone)]
struct Roots {
    a: MailTable,
    b: MailTable,
}

/// The two-way mirror's batch step.
pub struct TwoWay {
    options: SyncOptions,
    /// The pair's base after the last complete round (`None`: not loaded yet).
    base: Option<BaseState>,
    /// Set after a complete round; `None` makes the next batch a full run (the first one,
    /// and after any round that did not complete, whose base was not advanced).
    roots: Option<Roots>,
}

impl TwoWay {
    /// A step that knows nothing yet: the first batch is a full run, which loads the
    /// pair's base from `options.state_dir` (the one `mdsync sync` keeps) if there is one.
    pub fn new(options: SyncOptions) -> TwoWay {
        TwoWay {
            options,
            base: None,
            roots: None,
        }
    }

    /// Keeps what a round left: its base when it completed (saved, if it changed), else
    /// the old base and a full run next time.
    fn finish(
        &mut self,
        round: Round,
        (base, path): (BaseState, Option<PathBuf>),
        roots: Roots,
        (read, full): (u64, bool),
        progress: &dyn Progress,
    ) -> BatchReport {
        match round.next_base {
            Some(next) => {
                twoway::save_base(path.as_deref(), &base, &next, progress);
                self.base = Some(next);
                self.roots = Some(roots);
            }
            None => {
                self.base = Some(base);
                self.roots = None;
            }
        }
        report(round.outcome, read, full)
    }

    /// The base in memory, else the one on disk, else none (a first sync: a union).
    fn take_base(&mut self, path: Option<&std::path::Path>) -> BaseState {
        self.base
            .take()
            .or_else(|| path.map(BaseState::load))
            .unwrap_or_default()
    }

    /// The mailboxes of a batch, read on both sides; `None` when a batch cannot settle
    /// them and a full run must: one the base does not know (new, or never merged), one
    /// that cannot be read on a side (deleted meanwhile), or one whose mailbox GUID is
    /// not the base's (deleted and created again).
    fn read_dirty(
        &self,
        (a, b): (&dyn Replica, &dyn Replica),
        layout: Layout,
        dirty: &Dirty,
    ) -> Result<Option<(Read, Read)>> {
        let Some(base) = &self.base else {
            return Ok(None);
        };
        let dirs: Vec<String> = dirty.mailboxes.iter().cloned().collect();
        if dirs.iter().any(|d| base.mailbox(d).is_none()) {
            return Ok(None);
        }
        let read = |replica: &dyn Replica| -> Result<Read> {
            let tables = replica.rescan_mailboxes(layout, &dirs)?;
            Ok(dirs.iter().cloned().zip(tables).collect())
        };
        let (ra, rb) = rayon::join(|| read(a), || read(b));
        let (ra, rb) = (ra?, rb?);
        let settles = |read: &Read| {
            read.values().all(|m| {
                let known = base.mailbox(&m.dir).expect("checked above");
                m.broken.is_none() && m.guid_of_mailbox() == known.guid
            })
        };
        Ok((settles(&ra) && settles(&rb)).then_some((ra, rb)))
    }
}

impl Step for TwoWay {
    fn full(
        &mut self,
        a: &dyn Replica,
        b: &dyn Replica,
        progress: &dyn Progress,
    ) -> Result<BatchReport> {
        let path = twoway::base_path(a, b, &self.options);
        let mut base = self.take_base(path.as_deref());
        // Should the scan fail, the base stays as it was.
        let pair = match twoway::scan_pair(a, b, &base, &self.options, progress) {
            Ok(pair) => pair,
            Err(e) => {
                self.base = Some(base);
                self.roots = None;
                return Err(e);
            }
        };
        let roots = Roots {
            a: root_of(&pair.ta),
            b: root_of(&pair.tb),
        };
        let read = pair
            .ta
            .mailboxes
            .iter()
            .filter(|m| m.unchanged.is_none())
            .count() as u64;
        let ScannedPair {
            ta,
            tb,
            scan_a,
            scan_b,
        } = pair;
        let sides = Sides {
            a,
            b,
            scan_a: &scan_a,
            scan_b: &scan_b,
        };
        let round = twoway::sync_tables(&sides, ta, tb, &mut base, &self.options, progress);
        match round {
            Ok(round) => Ok(self.finish(round, (base, path), roots, (read, true), progress)),
            Err(e) => {
                self.base = Some(base);
                self.roots = None;
                Err(e)
            }
        }
    }

    fn batch(
        &mut self,
        a: &dyn Replica,
        b: &dyn Replica,
        dirty: &Dirty,
        progress: &dyn Progress,
    ) -> Result<BatchReport> {
        let Some(roots) = self.roots.clone() else {
            return self.full(a, b, progress);
        };
        if dirty.everything || dirty.structure {
            return self.full(a, b, progress);
        }
        let Some((ra, rb)) = self.read_dirty((a, b), roots.a.layout, dirty)? else {
            return self.full(a, b, progress);
        };
        let path = twoway::base_path(a, b, &self.options);
        let mut base = self.take_base(path.as_deref());
        let mut ta = view(&roots.a, &base, &ra, true);
        let mut tb = view(&roots.b, &base, &rb, false);
        same_root(&mut ta, &mut tb, &base);
        // Nothing read here goes into a scan cache: the next full run reads what changed.
        let no_cache = ScanOptions {
            cache_dir: None,
            ..ScanOptions::default()
        };
        let sides = Sides {
            a,
            b,
            scan_a: &no_cache,
            scan_b: &no_cache,
        };
        let read = ra.len() as u64;
        match twoway::sync_tables(&sides, ta, tb, &mut base, &self.options, progress) {
            Ok(round) => Ok(self.finish(round, (base, path), roots, (read, false), progress)),
            Err(e) => {
                self.base = Some(base);
                self.roots = None;
                Err(e)
            }
        }
    }
}

/// A table without its mailboxes: what a batch's views are built on. Without its
/// anomalies too: the full run reported them.
fn root_of(table: &MailTable) -> MailTable {
    let mut root = RootFacts::of(table).into_table(Vec::new());
    root.anomalies.clear();
    root
}

/// One side as a batch's merge sees it: every mailbox of the base, the ones in `read` as
/// read and every other one a placeholder "unchanged since the base" (as the scanner
/// reports a mailbox its hints vouch for).
fn view(root: &MailTable, base: &BaseState, read: &Read, side_a: bool) -> MailTable {
    let mailboxes = base
        .mailboxes
        .iter()
        .map(|m| match read.get(&m.dir) {
            Some(table) => table.clone(),
            None => placeholder(m, side_a),
        })
        .collect();
    MailTable {
        mailboxes,
        ..root.clone()
    }
}

/// Makes the root of both views one and the same, so a batch never writes a root file:
/// the `subscriptions` are the base's, the folder parents and unfollowed folders the union
/// of both sides', `dovecot-uidvalidity` at least every UIDVALIDITY either side holds.
/// (A change to those files on a watched side is a structure change, which a full run
/// settles; a remote side's is settled at the next full run, never undone by a batch.)
fn same_root(ta: &mut MailTable, tb: &mut MailTable, base: &BaseState) {
    let union = |x: &[String], y: &[String]| {
        let mut all: Vec<String> = x.iter().chain(y).cloned().collect();
        all.sort();
        all.dedup();
        all
    };
    let parents = union(&ta.parents, &tb.parents);
    let unfollowed = union(&ta.unfollowed, &tb.unfollowed);
    let ceiling = [&*ta, &*tb]
        .into_iter()
        .flat_map(|t| {
            let used = t.mailboxes.iter().filter_map(|m| m.header.as_ref());
            used.map(|h| h.uid_validity).chain(t.uidvalidity_next)
        })
        .max();
    for t in [ta, tb] {
        t.parents = parents.clone();
        t.unfollowed = unfollowed.clone();
        t.subscriptions = base.subscriptions.clone();
        t.uidvalidity_next = ceiling;
    }
}

/// A base mailbox as a side's unread, unchanged mailbox. Its count comes from the stamps
/// when the base has them, so the records of a big base are not decoded for every batch.
fn placeholder(m: &BaseMailbox, side_a: bool) -> MailboxTable {
    let stamps = if side_a { m.stamps_a } else { m.stamps_b };
    MailboxTable {
        dir: m.dir.clone(),
        name: m.name.clone(),
        unchanged: Some(stamps.map_or_else(|| m.len() as u64, |(_, n)| n)),
        stamps: stamps.map(|(s, _)| s).unwrap_or_default(),
        ..MailboxTable::default()
    }
}

/// A two-way outcome as the loop's report: both sides' counts added up, each side's errors
/// named by its letter, conflicts as lines.
fn report(o: SyncOutcome, mailboxes_read: u64, full: bool) -> BatchReport {
    let named = |side: &str, report: &ApplyReport| ApplyReport {
        errors: report
            .errors
            .iter()
            .map(|e| format!("{side}: {e}"))
            .collect(),
        ..report.clone()
    };
    let mut applied = named("A", &o.a.report);
    applied.absorb(named("B", &o.b.report));
    let conflicts = o
        .conflicts
        .iter()
        .map(|c| {
            let kind = serde_json::to_value(c.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            format!("{}: {kind}: {}", c.mailbox, c.detail)
        })
        .collect();
    BatchReport {
        outcome: BackupOutcome {
            planned: add_counts(&o.a.planned, &o.b.planned),
            plan_lines: Vec::new(),
            report: applied,
            skipped: o.skipped,
            warnings: o.warnings,
            source_messages: o.a.messages,
            unchanged_mailboxes: o.unchanged_mailboxes,
            seconds: o.seconds,
            wire: o.wire,
        },
        mailboxes_read,
        full,
        conflicts,
    }
}

fn add_counts(x: &PlanCounts, y: &PlanCounts) -> PlanCounts {
    PlanCounts {
        mailboxes_created: x.mailboxes_created + y.mailboxes_created,
        mailboxes_deleted: x.mailboxes_deleted + y.mailboxes_deleted,
        mailboxes_renamed: x.mailboxes_renamed + y.mailboxes_renamed,
        copies: x.copies + y.copies,
        bytes: x.bytes + y.bytes,
        flag_changes: x.flag_changes + y.flag_changes,
        moves: x.moves + y.moves,
        expunges: x.expunges + y.expunges,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::replica::local::LocalReplica;
    use crate::storage::maildir::uidlist::Header;
    use std::fs;
    use std::path::Path;

    /// A Maildir++ mailbox at `dir` with three listed messages, all `\Seen`.
    fn mailbox(dir: &Path, guid: &str) {
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let mut uidlist = format!("3 V1700000000 N4 G{guid}\n");
        for uid in 1..=3 {
            let base = format!("1700000000.M{uid}P1.host,S=6");
            fs::write(dir.join("cur").join(format!("{base}:2,S")), b"hello\n").unwrap();
            uidlist.push_str(&format!("{uid} :{base}\n"));
        }
        fs::write(dir.join("dovecot-uidlist"), uidlist).unwrap();
    }

    /// A tree with INBOX and Sent.
    fn tree(root: &Path) {
        mailbox(root, "0f1e2d3c4b5a69788796a5b4c3d2e1f0");
        mailbox(&root.join(".Sent"), "1f1e2d3c4b5a69788796a5b4c3d2e1f0");
        fs::write(root.join(".Sent/maildirfolder"), b"").unwrap();
        fs::write(root.join("dovecot-uidvalidity"), "6553f101").unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("cur"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn dirty(dirs: &[&str]) -> Dirty {
        Dirty {
            mailboxes: dirs.iter().map(|d| d.to_string()).collect(),
            ..Dirty::default()
        }
    }

    /// Two equal trees `a` and `b` in a temp dir, their replicas, and a step keeping its
    /// base in the temp dir too.
    fn pair() -> (tempfile::TempDir, (LocalReplica, LocalReplica), TwoWay) {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        tree(&a);
        tree(&b);
        let replicas = (LocalReplica::new(&a), LocalReplica::new(&b));
        let step = TwoWay::new(twoway::test_options(&dir.path().join("state")));
        (dir, replicas, step)
    }

    #[test]
    fn a_batch_merges_the_dirty_mailbox_and_leaves_the_unread_ones_alone() {
        let (dir, (ra, rb), mut step) = pair();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let first = step.full(&ra, &rb, &NoProgress).unwrap();
        assert!(first.full && first.outcome.planned.flag_changes == 0);
        let path = twoway::base_path(&ra, &rb, &step.options).unwrap();
        assert!(!BaseState::load(&path).mailboxes.is_empty(), "base saved");

        // A flags a message in INBOX; meanwhile, unseen by the batch (as on an unwatched
        // side), B expunges one in Sent.
        let msg = "1700000000.M2P1.host,S=6";
        fs::rename(
            a.join(format!("cur/{msg}:2,S")),
            a.join(format!("cur/{msg}:2,FS")),
        )
        .unwrap();
        fs::remove_file(b.join(".Sent/cur/1700000000.M1P1.host,S=6:2,S")).unwrap();
        let batch = step.batch(&ra, &rb, &dirty(&[""]), &NoProgress).unwrap();
        assert!(!batch.full);
        assert_eq!(batch.mailboxes_read, 1);
        assert_eq!(batch.outcome.report.flag_changes, 1);
        assert_eq!(names(&b), names(&a), "INBOX merged");
        // Sent was not read: neither expunged on A nor brought back on B.
        assert_eq!(names(&a.join(".Sent")).len(), 3);
        assert_eq!(names(&b.join(".Sent")).len(), 2);

        // The batch the applier's own writes raise changes nothing, and writes nothing.
        let uidlists = |root: &Path| {
            [
                root.join("dovecot-uidlist"),
                root.join("dovecot-uidvalidity"),
            ]
            .map(|p| fs::read(p).unwrap())
        };
        let before = (uidlists(&a), uidlists(&b), names(&a), names(&b));
        let again = step.batch(&ra, &rb, &dirty(&[""]), &NoProgress).unwrap();
        let planned = again.outcome.planned;
        assert_eq!(planned, PlanCounts::default(), "{planned:?}");
        assert_eq!((uidlists(&a), uidlists(&b), names(&a), names(&b)), before);

        // The next full run reads Sent, and B's expunge reaches A.
        let full = step.full(&ra, &rb, &NoProgress).unwrap();
        assert_eq!(full.outcome.report.expunged, 1);
        assert_eq!(names(&a.join(".Sent")), names(&b.join(".Sent")));
    }

    #[test]
    fn a_batch_falls_back_to_a_full_run_for_what_the_base_does_not_know() {
        let (dir, (ra, rb), mut step) = pair();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        // Nothing known yet: the first batch is a full run.
        assert!(
            step.batch(&ra, &rb, &dirty(&[""]), &NoProgress)
                .unwrap()
                .full
        );
        // A mailbox the base does not know.
        mailbox(&a.join(".New"), "2f1e2d3c4b5a69788796a5b4c3d2e1f0");
        let batch = step
            .batch(&ra, &rb, &dirty(&[".New"]), &NoProgress)
            .unwrap();
        assert!(batch.full);
        assert_eq!(names(&b.join(".New")).len(), 3);
        // One deleted on a side meanwhile (unreadable there).
        fs::remove_dir_all(b.join(".New")).unwrap();
        let batch = step
            .batch(&ra, &rb, &dirty(&[".New"]), &NoProgress)
            .unwrap();
        assert!(batch.full);
        assert!(!a.join(".New").exists(), "the deletion was merged");
    }

    fn header(uid_validity: u32) -> Header {
        Header {
            uid_validity,
            ..Header::default()
        }
    }

    #[test]
    fn both_views_get_one_root_so_a_batch_writes_no_root_file() {
        let root = |subs: &[u8], next: u32, parents: &[&str]| MailTable {
            layout: Layout::MaildirPlusPlus,
            mailboxes: Vec::new(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            unfollowed: Vec::new(),
            subscriptions: Some(subs.to_vec()),
            uidvalidity_next: Some(next),
            root_meta: Default::default(),
            scanned_at_ns: 0,
            anomalies: Vec::new(),
        };
        let base = BaseState {
            mailboxes: vec![
                BaseMailbox {
                    dir: String::new(),
                    name: "INBOX".into(),
                    ..BaseMailbox::default()
                },
                BaseMailbox {
                    dir: ".Sent".into(),
                    name: "Sent".into(),
                    stamps_a: Some((Default::default(), 3)),
                    ..BaseMailbox::default()
                },
            ],
            subscriptions: Some(b"INBOX\nSent\n".to_vec()),
        };
        let read = HashMap::from([(
            String::new(),
            MailboxTable {
                dir: String::new(),
                header: Some(header(900)),
                ..MailboxTable::default()
            },
        )]);
        let mut ta = view(&root(b"stale A", 500, &["x"]), &base, &read, true);
        let mut tb = view(
            &root(b"stale B", 700, &["y"]),
            &base,
            &HashMap::new(),
            false,
        );
        same_root(&mut ta, &mut tb, &base);
        for t in [&ta, &tb] {
            assert_eq!(t.subscriptions, base.subscriptions);
            assert_eq!(t.parents, vec!["x".to_string(), "y".to_string()]);
            assert_eq!(
                t.uidvalidity_next,
                Some(900),
                "above every UIDVALIDITY used"
            );
            let dirs: Vec<&str> = t.mailboxes.iter().map(|m| m.dir.as_str()).collect();
            assert_eq!(dirs, ["", ".Sent"], "every base mailbox, nothing else");
        }
        // Read where read; elsewhere a placeholder for the merge's "unchanged on both".
        assert_eq!(ta.mailboxes[0].unchanged, None);
        assert_eq!(tb.mailboxes[0].unchanged, Some(0));
        assert_eq!(ta.mailboxes[1].unchanged, Some(3), "counted by the stamps");
        assert_eq!(ta.mailboxes[1].name, "Sent");
    }
}
