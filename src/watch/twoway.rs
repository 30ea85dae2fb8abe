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
use crate::sync::backup::BackupOutcome;
use crate::sync::base::{BaseMailbox, BaseState};
use crate::sync::plan::PlanCounts;
use crate::sync::twoway::{self, Round, ScannedPair, Sides, SyncOptions, SyncOutcome};
use crate::table::{MailTable, MailboxTable};
use crate::watch::coalesce::Dirty;
use crate::watch::{BatchReport, Step};

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
    ) -> Result<Option<(HashMap<String, MailboxTable>, HashMap<String, MailboxTable>)>> {
        let Some(base) = &self.base else {
            return Ok(None);
        };
        let dirs: Vec<String> = dirty.mailboxes.iter().cloned().collect();
        if dirs.iter().any(|d| base.mailbox(d).is_none()) {
            return Ok(None);
        }
        let read = |replica: &dyn Replica| -> Result<HashMap<String, MailboxTable>> {
            let tables = replica.rescan_mailboxes(layout, &dirs)?;
            Ok(dirs.iter().cloned().zip(tables).collect())
        };
        let (ra, rb) = rayon::join(|| read(a), || read(b));
        let (ra, rb) = (ra?, rb?);
        let settles = |read: &HashMap<String, MailboxTable>| {
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
        let base = self.take_base(path.as_deref());
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
        let round = twoway::sync_tables(&sides, ta, tb, &base, &self.options, progress);
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
        let base = self.take_base(path.as_deref());
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
        match twoway::sync_tables(&sides, ta, tb, &base, &self.options, progress) {
            Ok(round) => Ok(self.finish(round, (base, path), roots, (read, false), progress)),
            Err(e) => {
                self.base = Some(base);
                self.roots = None;
                Err(e)
            }
        }
    }
}

/// A table without its mailboxes: what a batch's views are built on.
fn root_of(table: &MailTable) -> MailTable {
    MailTable {
        layout: table.layout,
        mailboxes: Vec::new(),
        parents: table.parents.clone(),
        unfollowed: table.unfollowed.clone(),
        subscriptions: table.subscriptions.clone(),
        uidvalidity_next: table.uidvalidity_next,
        root_meta: table.root_meta,
        scanned_at_ns: table.scanned_at_ns,
        anomalies: Vec::new(),
    }
}

/// One side as a batch's merge sees it: every mailbox of the base, the ones in `read` as
/// read and every other one a placeholder "unchanged since the base" (as the scanner
/// reports a mailbox its hints vouch for).
fn view(
    root: &MailTable,
    base: &BaseState,
    read: &HashMap<String, MailboxTable>,
    side_a: bool,
) -> MailTable {
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

/// A base mailbox as a side's unread, unchanged mailbox.
fn placeholder(m: &BaseMailbox, side_a: bool) -> MailboxTable {
    let stamps = if side_a { m.stamps_a } else { m.stamps_b };
    MailboxTable {
        dir: m.dir.clone(),
        name: m.name.clone(),
        unchanged: Some(m.len() as u64),
        stamps: stamps.map(|(s, _)| s).unwrap_or_default(),
        ..MailboxTable::default()
    }
}

/// A two-way outcome as the loop's report: both sides' counts added up, each side's errors
/// named by its letter, conflicts as lines.
fn report(o: SyncOutcome, mailboxes_read: u64, full: bool) -> BatchReport {
    let mut applied = o.a.report.clone();
    let b = &o.b.report;
    applied.mailboxes_created += b.mailboxes_created;
    applied.mailboxes_deleted += b.mailboxes_deleted;
    applied.messages_copied += b.messages_copied;
    applied.bytes_copied += b.bytes_copied;
    applied.flag_changes += b.flag_changes;
    applied.moves += b.moves;
    applied.expunged += b.expunged;
    applied.vanished += b.vanished;
    applied.errors = (o.a.report.errors.iter().map(|e| format!("A: {e}")))
        .chain(b.errors.iter().map(|e| format!("B: {e}")))
        .collect();
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
