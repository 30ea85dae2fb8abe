//! Two-way sync: scan both replicas, read again what one side did not list, confirm
//! apparent expunges, settle GUID disagreements by content, merge against the pair's base
//! ([`crate::sync::merge`]), guard, apply one plan to each side, and keep the new base.
//! Orchestrates; writes no mail itself (the replicas' appliers do) and prints nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use crate::error::Result;
use crate::progress::{Event, Progress};
use crate::replica::Replica;
use crate::replica::spool::Spool;
use crate::scan::ScanOptions;
use crate::storage::maildir::layout::Layout;
use crate::sync::apply::{self, ApplyOptions, ApplyReport};
use crate::sync::backup::{self, BackupOptions, Completion};
use crate::sync::base::{self, BaseState, guid_hash};
use crate::sync::diff;
use crate::sync::merge::{self, Conflict, Merged};
use crate::sync::plan::{Plan, PlanCounts, Skipped};
use crate::table::{MailTable, MailboxTable};

/// Everything a two-way run needs to know: the knobs of a backup, with `max_delete`
/// guarding each side and `state_dir` holding the pair's base (`None`: no base, every run a
/// first sync — a union that never expunges or deletes).
pub type SyncOptions = BackupOptions;

/// What one side of a run did.
#[derive(Debug, Clone, Default)]
pub struct SideOutcome {
    /// Counts of the side's plan.
    pub planned: PlanCounts,
    /// True when the side's plan had nothing to do (no message, mailbox, uidlist, keyword
    /// or subscription change).
    pub nothing_to_do: bool,
    /// Its itemized lines (filled for dry runs).
    pub plan_lines: Vec<String>,
    /// What its applier did (empty for dry runs).
    pub report: ApplyReport,
    /// Messages on this side before the run.
    pub messages: u64,
}

/// What a two-way run did.
#[derive(Debug, Clone, Default)]
pub struct SyncOutcome {
    /// Side A (the first argument).
    pub a: SideOutcome,
    /// Side B.
    pub b: SideOutcome,
    /// Disagreements and how they were settled.
    pub conflicts: Vec<Conflict>,
    /// Items left alone (errors).
    pub skipped: Vec<Skipped>,
    /// Oddities copied anyway (warnings).
    pub warnings: Vec<Skipped>,
    /// Mailboxes not read: unchanged on both sides since the last sync.
    pub unchanged_mailboxes: u64,
    /// True when the pair had no base: a first sync (a union).
    pub first_sync: bool,
    /// Wall time.
    pub seconds: f64,
    /// Bytes on the wire, when a side is remote.
    pub wire: Option<(u64, u64)>,
}

impl SyncOutcome {
    /// Classifies the run, as for a backup.
    pub fn completion(&self) -> Completion {
        let (a, b) = (&self.a.report, &self.b.report);
        let failed = !a.errors.is_empty() || !b.errors.is_empty();
        Completion::of(failed, a.vanished + b.vanished, &self.skipped)
    }

    /// True when neither side needed a change.
    pub fn is_noop(&self) -> bool {
        self.a.nothing_to_do && self.b.nothing_to_do
    }

    fn applied_cleanly(&self) -> bool {
        self.a.report.errors.is_empty()
            && self.b.report.errors.is_empty()
            && self.a.report.vanished + self.b.report.vanished == 0
    }
}

/// Runs a two-way sync of `a` and `b`: loads the pair's base, scans, merges, applies, and
/// saves the new base.
pub fn sync(
    a: &dyn Replica,
    b: &dyn Replica,
    options: &SyncOptions,
    progress: &dyn Progress,
) -> Result<SyncOutcome> {
    let started = Instant::now();
    let base_path = base_path(a, b, options);
    let mut base = base_path
        .as_deref()
        .map(BaseState::load)
        .unwrap_or_default();
    let ScannedPair {
        ta,
        tb,
        scan_a,
        scan_b,
    } = scan_pair(a, b, &base, options, progress)?;
    let sides = Sides {
        a,
        b,
        scan_a: &scan_a,
        scan_b: &scan_b,
    };
    let round = sync_tables(&sides, ta, tb, &mut base, options, progress)?;
    if let Some(next) = &round.next_base {
        save_base(base_path.as_deref(), &base, next, progress);
    }
    let mut outcome = round.outcome;
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// Where the pair's base lives (`None`: no state directory, no base kept).
pub fn base_path(a: &dyn Replica, b: &dyn Replica, options: &SyncOptions) -> Option<PathBuf> {
    options
        .state_dir
        .as_deref()
        .map(|dir| base::base_file(dir, &a.location(), &b.location()))
}

/// Saves `next` atomically at `path` when it differs from `old`; a failure is a warning
/// (the next run merges against the older base, which loses nothing).
pub fn save_base(path: Option<&Path>, old: &BaseState, next: &BaseState, progress: &dyn Progress) {
    if let Some(path) = path
        && next != old
        && let Err(e) = next.save(path)
    {
        progress.event(Event::Warning {
            message: format!("sync base {}: {e}", path.display()),
        });
    }
}

/// Both sides scanned for a round, with the options they were scanned with.
pub struct ScannedPair {
    /// Side A's table.
    pub ta: MailTable,
    /// Side B's table.
    pub tb: MailTable,
    /// A's scan options.
    pub scan_a: ScanOptions,
    /// B's scan options.
    pub scan_b: ScanOptions,
}

/// Settles the layout (given, else detected on A, else on B) and scans both sides at
/// once, skipping every mailbox `base` vouches for on that side.
pub fn scan_pair(
    a: &dyn Replica,
    b: &dyn Replica,
    base: &BaseState,
    options: &SyncOptions,
    progress: &dyn Progress,
) -> Result<ScannedPair> {
    // B is asked only when A cannot tell: asking a remote B waits for its connection,
    // which A's scan should overlap.
    let layout = match options.scan.layout {
        Some(layout) => layout,
        None => match a.detect_layout()? {
            Some(layout) => layout,
            None => b.detect_layout()?.unwrap_or(Layout::MaildirPlusPlus),
        },
    };
    let scan_a = ScanOptions {
        layout: Some(layout),
        unchanged_if: base.hints(true),
        defer_cache_writes: true,
        ..options.scan.clone()
    };
    let scan_b = ScanOptions {
        unchanged_if: base.hints(false),
        ..scan_a.clone()
    };
    progress.event(Event::ScanStarted { side: "A and B" });
    let (ta, tb) = super::both(
        (a, || {
            if options.scan.layout.is_none() {
                backup::check_destination_layout(b, a, layout)?;
            }
            a.scan(&scan_a, progress)
        }),
        (b, || {
            if options.scan.layout.is_none() {
                backup::check_destination_layout(a, b, layout)?;
            }
            b.scan(&scan_b, progress)
        }),
    );
    Ok(ScannedPair {
        ta: ta?,
        tb: tb?,
        scan_a,
        scan_b,
    })
}

/// The two replicas of a run and the scan options their tables were made with (for
/// rescans and scan caches).
pub struct Sides<'a> {
    /// Side A.
    pub a: &'a dyn Replica,
    /// Side B.
    pub b: &'a dyn Replica,
    /// A's scan options.
    pub scan_a: &'a ScanOptions,
    /// B's scan options.
    pub scan_b: &'a ScanOptions,
}

/// One two-way round's result: the outcome, and the base to keep (`None`: keep the old
/// one, the run did not complete; a dry run).
#[derive(Debug, Clone)]
pub struct Round {
    /// What happened.
    pub outcome: SyncOutcome,
    /// The pair's next base.
    pub next_base: Option<BaseState>,
}

/// One two-way round on tables already scanned (possibly with `unchanged_if` hints from
/// `base`): the entry point for callers that keep their own scans and base, such as a
/// watcher. Reads again what it must (one-sided skips, apparent expunges), merges, guards,
/// applies both plans (unless a dry run) and returns the next base.
pub fn sync_tables(
    sides: &Sides<'_>,
    mut ta: MailTable,
    mut tb: MailTable,
    base: &mut BaseState,
    options: &SyncOptions,
    progress: &dyn Progress,
) -> Result<Round> {
    let (a, b) = (sides.a, sides.b);
    read_one_sided(a, &mut ta, &tb);
    read_one_sided(b, &mut tb, &ta);
    confirm_missing(a, &mut ta, &tb, base);
    confirm_missing(b, &mut tb, &ta, base);
    // Content comparisons settle the first sync of a mailbox (copies made by other tools
    // carry other GUIDs). Against a base, the same UID under two GUIDs is two messages: a
    // UID conflict, renumbered, never worth reading both bodies.
    let mut questions = diff::hash_questions(&ta, &tb, &options.diff);
    questions.retain(|q| options.diff.checksum || base.mailbox(&q.dir).is_none());
    // A first sync also finds the same mail under other GUIDs and other UIDs.
    questions.extend(merge::twins::twin_questions(base, &ta, &tb));
    let answers = if questions.is_empty() {
        Default::default()
    } else {
        backup::answer(a, b, questions)
    };
    let merged = merge::merge(base, &ta, &tb, &answers, &options.diff);
    let planned_a = merged.plan_a.counts();
    let planned_b = merged.plan_b.counts();
    let guard = backup::check_delete_guard(&planned_a, &ta, options.max_delete)
        .and_then(|()| backup::check_delete_guard(&planned_b, &tb, options.max_delete));
    let mut outcome = SyncOutcome {
        a: SideOutcome {
            planned: planned_a,
            nothing_to_do: merged.plan_a.is_empty(),
            messages: ta.message_count(),
            ..SideOutcome::default()
        },
        b: SideOutcome {
            planned: planned_b,
            nothing_to_do: merged.plan_b.is_empty(),
            messages: tb.message_count(),
            ..SideOutcome::default()
        },
        conflicts: merged.conflicts.clone(),
        skipped: merged
            .plan_a
            .skipped
            .iter()
            .chain(&merged.plan_b.skipped)
            .cloned()
            .collect(),
        warnings: merged
            .plan_a
            .warnings
            .iter()
            .chain(&merged.plan_b.warnings)
            .cloned()
            .collect(),
        unchanged_mailboxes: ta
            .mailboxes
            .iter()
            .filter(|m| m.unchanged.is_some())
            .count() as u64,
        first_sync: base.mailboxes.is_empty(),
        ..SyncOutcome::default()
    };
    if let Err(e) = guard {
        keep_scans(sides, &ta, &tb, None, progress);
        return Err(e);
    }
    // Both sides may be written: one that would refuse its plan (an mdbox tree without
    // `--offline`) stops the run before either is.
    a.check_writable()?;
    b.check_writable()?;
    if options.dry_run {
        outcome.a.plan_lines = merged.plan_a.lines();
        outcome.b.plan_lines = merged.plan_b.lines();
        keep_scans(sides, &ta, &tb, None, progress);
        outcome.wire = backup::wire_bytes(a, b);
        return Ok(Round {
            outcome,
            next_base: None,
        });
    }
    forget_untrusted(sides, base, &merged.untrusted_base, options)?;
    apply_both(
        sides,
        &merged,
        &ta,
        &tb,
        &options.apply,
        progress,
        &mut outcome,
    )?;
    let next_base = outcome
        .applied_cleanly()
        .then(|| with_stamps(merged.next, &ta, &tb, &merged.plan_a, &merged.plan_b));
    outcome.wire = backup::wire_bytes(a, b);
    Ok(Round { outcome, next_base })
}

/// Removes from the base, in memory and (durably) on disk, before anything is applied, the
/// mailboxes the merge did not trust. A run killed or failing after applying part of a
/// union could otherwise leave both sides with next UIDs past the stale entry's, which would
/// make it look trustworthy to the next round, whose merge would then read its messages'
/// absence as expunges.
fn forget_untrusted(
    sides: &Sides<'_>,
    base: &mut BaseState,
    untrusted: &[String],
    options: &SyncOptions,
) -> Result<()> {
    if untrusted.is_empty() {
        return Ok(());
    }
    base.mailboxes.retain(|m| !untrusted.contains(&m.dir));
    let Some(path) = base_path(sides.a, sides.b, options) else {
        return Ok(());
    };
    base.save(&path)
        .map_err(|e| crate::error::Error::io(&path, e))
}

/// Applies mailbox renames on both sides first (copies then find every mailbox where the
/// other side's plan names it), then A's plan with B as the body source and B's with A:
/// both at once, with a remote side's bodies read ahead when they fit (else one after
/// the other).
#[allow(clippy::too_many_arguments)]
fn apply_both(
    sides: &Sides<'_>,
    merged: &Merged,
    ta: &MailTable,
    tb: &MailTable,
    options: &ApplyOptions,
    progress: &dyn Progress,
    outcome: &mut SyncOutcome,
) -> Result<()> {
    let (a, b) = (sides.a, sides.b);
    let (pa, pb) = (Sided::new(progress, "A"), Sided::new(progress, "B"));
    let work = |c: &PlanCounts| c.copies + c.flag_changes + c.moves + c.expunges;
    let total = work(&outcome.a.planned) + work(&outcome.b.planned);
    if total > 0 {
        progress.event(Event::PlanReady {
            operations: total,
            bytes: outcome.a.planned.bytes + outcome.b.planned.bytes,
        });
    }
    for (replica, plan, p) in [(a, &merged.plan_a, &pa), (b, &merged.plan_b, &pb)] {
        if !plan.rename_mailboxes.is_empty() {
            let renames = Plan {
                rename_mailboxes: plan.rename_mailboxes.clone(),
                root_meta: plan.root_meta,
                ..Plan::default()
            };
            replica.apply(&renames, replica, options, p)?;
        }
    }
    let without_renames = |plan: &Plan| Plan {
        rename_mailboxes: Vec::new(),
        ..plan.clone()
    };
    let plan_a = without_renames(&merged.plan_a);
    let plan_b = without_renames(&merged.plan_b);
    let keep = || keep_scans(sides, ta, tb, Some((&plan_a, &plan_b)), progress);
    // Neither plan renames or removes a file the other copies (a message is copied only to
    // the side that lacks it, with the flags of the side that has it), so two local sides
    // apply at once. A remote side's connection carries one exchange at a time: the bodies
    // the local side needs are read ahead from it first (when they fit the spool; none
    // needed fit), then the two applies overlap; else they run one after the other.
    let fits = |c: &PlanCounts| c.copies == 0 || Spool::reads_ahead(c.bytes, options.read_ahead);
    let (ra, rb) = match (a.wire_bytes().is_some(), b.wire_bytes().is_some()) {
        (false, false) => rayon::join(
            || a.apply(&plan_a, b, options, &pa),
            || b.apply_overlapping(&plan_b, a, options, &pb, &keep),
        ),
        (false, true) if fits(&outcome.a.planned) => {
            apply_beside_remote((a, &plan_a, &pa), (b, &plan_b, &pb), options, &keep)?
        }
        (true, false) if fits(&outcome.b.planned) => {
            let (rb, ra) =
                apply_beside_remote((b, &plan_b, &pb), (a, &plan_a, &pa), options, &keep)?;
            (ra, rb)
        }
        _ => {
            let ra = a.apply(&plan_a, b, options, &pa);
            (ra, b.apply_overlapping(&plan_b, a, options, &pb, &keep))
        }
    };
    outcome.a.report = ra?;
    outcome.b.report = rb?;
    Ok(())
}

/// Applies the local side's plan and the remote side's at once: the local side's bodies
/// (which fit the spool) are read from the remote side into memory — with the remote
/// side's apply, the other way over the same connection, when the far side can — while
/// the local apply already stages those in; it commits once the far side's answer for
/// them was whole, and nothing if it broke off. `keep` runs once the remote side has its
/// bodies.
fn apply_beside_remote(
    (local, local_plan, local_progress): (&dyn Replica, &Plan, &Sided<'_>),
    (remote, remote_plan, remote_progress): (&dyn Replica, &Plan, &Sided<'_>),
    options: &ApplyOptions,
    keep: &(dyn Fn() + Sync),
) -> Result<(Result<ApplyReport>, Result<ApplyReport>)> {
    let wanted = apply::copy_keys(local_plan);
    let spool = Spool::gated(&wanted, remote.location());
    let local_apply = || local.apply(local_plan, &spool, options, local_progress);
    let remote_apply = || {
        // Whatever becomes of the remote apply, the local one never waits forever.
        let _settled = spool.settle_on_drop();
        let read_ahead = (wanted.as_slice(), &spool);
        remote.apply_reading_ahead(
            remote_plan,
            local,
            options,
            remote_progress,
            keep,
            read_ahead,
        )
    };
    match super::beside_remote(local_apply, remote_apply) {
        // The far side failed before its bodies were all in: its own error says why.
        (Err(_), Err(e)) if spool.broke_off() => Err(e),
        (local, remote) => Ok((local, remote)),
    }
}

/// Stores the freshly listed mailboxes in both scan caches, except those a plan changed.
fn keep_scans(
    sides: &Sides<'_>,
    ta: &MailTable,
    tb: &MailTable,
    plans: Option<(&Plan, &Plan)>,
    progress: &dyn Progress,
) {
    let changed = |plan: Option<&Plan>| -> HashSet<String> {
        plan.map(Plan::touched_dirs).unwrap_or_default()
    };
    let (ca, cb) = (changed(plans.map(|p| p.0)), changed(plans.map(|p| p.1)));
    let (ka, kb) = rayon::join(
        || {
            sides
                .a
                .save_scan_cache(sides.scan_a, ta, &|d| ca.contains(d))
        },
        || {
            sides
                .b
                .save_scan_cache(sides.scan_b, tb, &|d| cb.contains(d))
        },
    );
    for e in [ka, kb].into_iter().filter_map(Result::err) {
        progress.event(Event::Warning {
            message: format!("scan cache: {e}"),
        });
    }
}

/// The merge's next base with the stamps of every mailbox both plans left alone and both
/// scans can vouch for, so the next run need not read it.
fn with_stamps(
    mut next: BaseState,
    ta: &MailTable,
    tb: &MailTable,
    plan_a: &Plan,
    plan_b: &Plan,
) -> BaseState {
    let touched: HashSet<String> = plan_a
        .touched_dirs()
        .into_iter()
        .chain(plan_b.touched_dirs())
        .collect();
    for m in &mut next.mailboxes {
        if m.stamps_a.is_some() && m.stamps_b.is_some() {
            continue; // carried over: not read this time
        }
        let (Some(x), Some(y)) = (ta.mailbox(&m.dir), tb.mailbox(&m.dir)) else {
            continue;
        };
        if touched.contains(&m.dir) || !trustworthy(x) || !trustworthy(y) {
            continue;
        }
        m.stamps_a = Some((x.stamps, x.message_count()));
        m.stamps_b = Some((y.stamps, y.message_count()));
    }
    next
}

/// Read cleanly, and settled: stamps not racy and not moved while it was read.
fn trustworthy(m: &MailboxTable) -> bool {
    m.broken.is_none() && m.anomalies.is_empty() && m.unchanged.is_none() && m.settled
}

/// A mailbox skipped as unchanged on this side must be read after all when the other side
/// read its copy (or has none under that name): only a pair unchanged on both sides is
/// known to be in sync.
fn read_one_sided(side: &dyn Replica, mine: &mut MailTable, theirs: &MailTable) {
    let layout = mine.layout;
    mine.mailboxes.par_iter_mut().for_each(|m| {
        let both = theirs
            .mailbox(&m.dir)
            .is_some_and(|t| t.unchanged.is_some());
        if m.unchanged.is_some() && !both {
            *m = side.rescan_mailbox(layout, &m.dir);
        }
    });
}

/// A message the scan did not see may be one Dovecot was renaming during `readdir`. A
/// mailbox that moved while it was read (or whose uidlist names files the scan did not
/// find) and lacks a message whose absence would count is listed again first — a phantom
/// expunge must never reach the other side, nor a phantom gap be filled with a duplicate.
/// While the second look still finds it moving, it looks again after the stamps' racy
/// margin (a mailbox just changed, then quiet, settles); one still moving after that is
/// left alone by the merge for this run.
fn confirm_missing(side: &dyn Replica, mine: &mut MailTable, theirs: &MailTable, base: &BaseState) {
    let layout = mine.layout;
    mine.mailboxes.par_iter_mut().for_each(|m| {
        if m.unchanged.is_some() || (m.settled && m.listed_missing.is_empty()) {
            return;
        }
        let (other, base) = (theirs.mailbox(&m.dir), base.mailbox(&m.dir));
        if !lacks_something(m, other, base) {
            return;
        }
        *m = side.rescan_mailbox(layout, &m.dir);
        for wait_ms in CONFIRM_WAITS_MS {
            if m.settled || !lacks_something(m, other, base) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(wait_ms));
            *m = side.rescan_mailbox(layout, &m.dir);
        }
    });
}

/// Pauses before each further look at a mailbox still moving: past the fine (0.1 s) and
/// then the coarse (2 s) racy margin of the scanner's stamps.
const CONFIRM_WAITS_MS: [u64; 2] = [150, 2100];

/// True when the absence of a message from `m` would count: the base has a message `m`
/// lacks (it would be expunged on the other side), or the other side has a message whose
/// file `m`'s uidlist names but the listing did not find (it would be copied here twice).
/// Messages simply new on the other side need no second look.
fn lacks_something(
    m: &MailboxTable,
    other: Option<&MailboxTable>,
    base: Option<&base::BaseMailbox>,
) -> bool {
    if let Some(base) = base {
        let hashes: HashSet<u64> = (0..m.len()).map(|i| guid_hash(m.guid(i))).collect();
        if base.records().guids.iter().any(|g| !hashes.contains(g)) {
            return true;
        }
    }
    if m.listed_missing.is_empty() {
        return false;
    }
    let missing: HashSet<&str> = m.listed_missing.iter().map(|&(_, r)| m.str(r)).collect();
    other.is_some_and(|o| (0..o.len()).any(|j| missing.contains(o.base(j))))
}

/// Progress of one side: its itemized lines carry the side's letter.
struct Sided<'a> {
    inner: &'a dyn Progress,
    prefix: &'static str,
}

impl<'a> Sided<'a> {
    fn new(inner: &'a dyn Progress, side: &'static str) -> Self {
        Sided {
            inner,
            prefix: if side == "A" { "A: " } else { "B: " },
        }
    }
}

impl Progress for Sided<'_> {
    fn event(&self, event: Event) {
        match event {
            Event::Applied { line, bytes } => self.inner.event(Event::Applied {
                line: format!("{}{line}", self.prefix),
                bytes,
            }),
            other => self.inner.event(other),
        }
    }
}

/// Options for tests: Maildir++, no fsync, files owned by whoever runs them, the base in
/// `state`.
#[cfg(test)]
pub(crate) fn test_options(state: &Path) -> SyncOptions {
    use crate::storage::maildir::writer::{FsyncPolicy, Ownership};
    SyncOptions {
        scan: ScanOptions {
            layout: Some(Layout::MaildirPlusPlus),
            ..ScanOptions::default()
        },
        diff: crate::sync::diff::DiffOptions::default(),
        apply: ApplyOptions {
            fsync: FsyncPolicy::None,
            ownership: Ownership::RunningUser,
            read_ahead: crate::replica::spool::Spool::MAX_BYTES,
        },
        dry_run: false,
        max_delete: crate::sync::backup::DeleteLimit::Percent(100),
        state_dir: Some(state.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::replica::local::LocalReplica;
    use crate::replica::{Body, BodyError, BodySource};
    use std::fs;
    use std::path::Path;

    /// A tiny Maildir++ INBOX with three listed messages.
    fn maildir(root: &Path) {
        big_maildir(root, 3);
    }

    /// A local replica whose whole-replica scan misses one file of INBOX, as `readdir` can
    /// while Dovecot renames it (a flag change): the mailbox is not settled and its uidlist
    /// still names the file. A rescan sees the truth.
    struct Missing {
        inner: LocalReplica,
        base: String,
        /// Every second look misses it too (Dovecot keeps renaming it).
        always: bool,
    }

    impl BodySource for Missing {
        fn open_body(
            &self,
            dir: &str,
            sub: crate::model::Subdir,
            name: &str,
        ) -> Result<Body<'_>, BodyError> {
            self.inner.open_body(dir, sub, name)
        }
    }

    impl Replica for Missing {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn detect_layout(&self) -> Result<Option<Layout>> {
            self.inner.detect_layout()
        }
        fn scan(&self, options: &ScanOptions, progress: &dyn Progress) -> Result<MailTable> {
            // Read every mailbox, so there is something to miss.
            let options = ScanOptions {
                unchanged_if: Default::default(),
                ..options.clone()
            };
            let mut table = self.inner.scan(&options, progress)?;
            let inbox = &mut table.mailboxes[0];
            assert_eq!(inbox.len(), 3);
            *inbox = inbox.with_file_missed(&self.base, false);
            Ok(table)
        }
        fn rescan_mailbox(&self, layout: Layout, dir: &str) -> MailboxTable {
            let m = self.inner.rescan_mailbox(layout, dir);
            if self.always && dir.is_empty() {
                m.with_file_missed(&self.base, false)
            } else {
                m
            }
        }
        fn content_hash(
            &self,
            dir: &str,
            sub: crate::model::Subdir,
            name: &str,
        ) -> Result<u128, BodyError> {
            self.inner.content_hash(dir, sub, name)
        }
        fn apply(
            &self,
            plan: &Plan,
            source: &dyn crate::replica::BodySource,
            options: &ApplyOptions,
            progress: &dyn Progress,
        ) -> Result<ApplyReport> {
            self.inner.apply(plan, source, options, progress)
        }
    }

    fn files(root: &Path) -> usize {
        fs::read_dir(root.join("cur")).unwrap().count()
    }

    #[test]
    fn a_file_missed_by_one_scan_is_confirmed_before_it_counts_as_expunged() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, state) = sides(dir.path());
        maildir(&a);
        maildir(&b);
        let (ra, rb) = (LocalReplica::new(&a), LocalReplica::new(&b));
        let first = sync(&ra, &rb, &test_options(&state), &NoProgress).unwrap();
        assert!(first.first_sync && first.is_noop());
        for always in [false, true] {
            let hiding = Missing {
                inner: LocalReplica::new(&a),
                base: "1700000000.M2P1.host,S=6".into(),
                always,
            };
            let outcome = sync(&hiding, &rb, &test_options(&state), &NoProgress).unwrap();
            assert!(outcome.is_noop(), "{:?}", outcome.b.planned);
            assert_eq!(files(&b), 3, "the phantom expunge did not reach B");
            let left_alone = outcome
                .conflicts
                .iter()
                .any(|c| c.kind == merge::ConflictKind::LeftAlone);
            assert_eq!(left_alone, always, "{:?}", outcome.conflicts);
            // Held because A kept changing, not for bad input: re-run (exit 2).
            let want = match always {
                true => Completion::Partial,
                false => Completion::Complete,
            };
            assert_eq!(outcome.completion(), want, "{:?}", outcome.skipped);
        }
        // A real expunge on A does reach B.
        let gone = a.join("cur").join("1700000000.M2P1.host,S=6:2,S");
        fs::remove_file(gone).unwrap();
        let outcome = sync(&ra, &rb, &test_options(&state), &NoProgress).unwrap();
        assert_eq!(outcome.b.report.expunged, 1);
        assert_eq!(files(&b), 2);
    }

    /// Where a test keeps side A, side B and the pair's state.
    fn sides(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        (dir.join("a"), dir.join("b"), dir.join("s"))
    }

    /// Every message file of `root`'s INBOX, `cur/` and `new/`, by content.
    fn bodies(root: &Path) -> Vec<Vec<u8>> {
        let mut all: Vec<Vec<u8>> = ["cur", "new"]
            .iter()
            .flat_map(|sub| fs::read_dir(root.join(sub)).unwrap())
            .map(|e| fs::read(e.unwrap().path()).unwrap())
            .collect();
        all.sort();
        all
    }

    /// Side `b` served over the in-process pipe by a server with `serve`'s options, neither
    /// end keeping scan caches or baselines.
    fn uncached_pipe(
        b: &Path,
        serve: crate::serve::ServeOptions,
    ) -> crate::replica::remote::RemoteReplica {
        use crate::replica::remote::{RemoteOptions, RemoteReplica};
        let channel = crate::transport::spawn_in_process(serve).unwrap();
        let options = RemoteOptions {
            cache_dir: None,
            use_cache: false,
            ..RemoteOptions::default()
        };
        RemoteReplica::connect(channel, "pipe", b.to_str().unwrap(), &options)
    }

    /// Over the real codec: mail new on each side reaches the other whether the far side
    /// sends the local side's bodies while it receives its own (`CAP_APPLY_SENDS`: one
    /// request fewer) or, as an older server without it, before; and when the far side's
    /// plan is too big to spool, so that it sends them all before it reads its own.
    #[test]
    fn bodies_cross_both_ways_with_or_without_the_far_side_sending_during_its_apply() {
        use crate::wire::hello::CAP_APPLY_SENDS;
        let mut requests = Vec::new();
        for (withheld, read_ahead) in [(0, 1 << 20), (CAP_APPLY_SENDS, 1 << 20), (0, 16)] {
            let dir = tempfile::tempdir().unwrap();
            let (a, b, state) = sides(dir.path());
            maildir(&a);
            maildir(&b);
            let big = "from a, and longer than the far side may read ahead\n".repeat(2);
            let name = format!("1700000100.M9P1.host,S={}", big.len());
            fs::write(a.join("new").join(name), &big).unwrap();
            fs::write(b.join("new/1700000200.M9P2.host,S=8"), b"from b!\n").unwrap();
            let rb = uncached_pipe(
                &b,
                crate::serve::ServeOptions {
                    withheld_caps: withheld,
                    ..Default::default()
                },
            );
            let ra = LocalReplica::new(&a);
            let mut sync_options = test_options(&state);
            sync_options.apply.read_ahead = read_ahead;
            let outcome = sync(&ra, &rb, &sync_options, &NoProgress).unwrap();
            requests.push(
                rb.counts()
                    .requests
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
            rb.close().unwrap();
            let copied = (
                outcome.a.report.messages_copied,
                outcome.b.report.messages_copied,
            );
            assert_eq!(
                copied,
                (1, 1),
                "withheld {withheld:#x}, read-ahead {read_ahead}"
            );
            assert_eq!(bodies(&a), bodies(&b));
            assert_eq!(bodies(&a).len(), 5);
        }
        // The older server was asked for the bodies apart.
        assert_eq!(requests[0] + 1, requests[1], "{requests:?}");
        assert_eq!(requests[0], requests[2], "{requests:?}");
    }

    /// A far side that refuses the bodies asked for with its plan (here: a folder turned
    /// into a symlink since the scan) ends the exchange with its own reason, and the
    /// spool is settled as broken off with it, so the other side commits nothing.
    #[test]
    fn a_refused_read_ahead_reports_the_far_sides_reason_and_settles_the_spool_broken() {
        use crate::replica::{BodySource, Key};
        let dir = tempfile::tempdir().unwrap();
        let (a, b, _) = sides(dir.path());
        maildir(&a);
        maildir(&b);
        maildir(&dir.path().join("elsewhere"));
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), b.join(".F")).unwrap();
        let rb = uncached_pipe(&b, Default::default());
        let wanted = [Key {
            dir: ".F".into(),
            sub: crate::model::Subdir::Cur,
            name: "1700000000.M1P1.host,S=6:2,S".into(),
        }];
        let spool = Spool::gated(&wanted, "pipe".into());
        let ra = LocalReplica::new(&a);
        let options = test_options(&a).apply;
        let read_ahead = (&wanted[..], &spool);
        let plan = Plan::default();
        let applied = rb.apply_reading_ahead(&plan, &ra, &options, &NoProgress, &|| (), read_ahead);
        let why = applied.unwrap_err().to_string();
        assert!(why.contains("symlink"), "{why}");
        assert!(spool.broke_off());
        let settled = spool.settled().unwrap_err().to_string();
        assert!(settled.contains("symlink"), "{settled}");
    }

    /// A far side gone before the apply's request: the spool is settled (broken off)
    /// before `meanwhile` catches up, since the local apply may hold every pool thread
    /// waiting for bodies while `meanwhile` needs one.
    #[test]
    fn a_request_that_fails_settles_the_spool_before_meanwhile_runs() {
        use crate::replica::{BodySource, Key};
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let (a, b, _) = sides(dir.path());
        maildir(&a);
        maildir(&b);
        let rb = uncached_pipe(&b, Default::default());
        assert!(rb.is_dir().unwrap());
        rb.close().unwrap();
        let wanted = [Key {
            dir: String::new(),
            sub: crate::model::Subdir::Cur,
            name: "1700000000.M1P1.host,S=6:2,S".into(),
        }];
        let spool = Spool::gated(&wanted, "pipe".into());
        let settled_first = AtomicBool::new(false);
        let meanwhile = || settled_first.store(spool.broke_off(), Ordering::SeqCst);
        let ra = LocalReplica::new(&a);
        let apply = test_options(&a).apply;
        let read_ahead = (&wanted[..], &spool);
        let plan = Plan::default();
        let applied =
            rb.apply_reading_ahead(&plan, &ra, &apply, &NoProgress, &meanwhile, read_ahead);
        assert!(applied.is_err());
        assert!(settled_first.load(Ordering::SeqCst));
        assert!(spool.settled().is_err());
    }

    /// A "remote" side whose answer breaks off once the bodies the local side needs are
    /// in (a dropped connection, as the far side would report it).
    struct BreaksOff(LocalReplica);

    impl BodySource for BreaksOff {
        fn open_body(
            &self,
            dir: &str,
            sub: crate::model::Subdir,
            name: &str,
        ) -> Result<Body<'_>, BodyError> {
            self.0.open_body(dir, sub, name)
        }
    }

    impl Replica for BreaksOff {
        fn location(&self) -> String {
            "far:b".into()
        }
        fn detect_layout(&self) -> Result<Option<Layout>> {
            self.0.detect_layout()
        }
        fn scan(&self, options: &ScanOptions, progress: &dyn Progress) -> Result<MailTable> {
            self.0.scan(options, progress)
        }
        fn rescan_mailbox(&self, layout: Layout, dir: &str) -> MailboxTable {
            self.0.rescan_mailbox(layout, dir)
        }
        fn content_hash(
            &self,
            dir: &str,
            sub: crate::model::Subdir,
            name: &str,
        ) -> Result<u128, BodyError> {
            self.0.content_hash(dir, sub, name)
        }
        fn apply(
            &self,
            plan: &Plan,
            source: &dyn BodySource,
            options: &ApplyOptions,
            progress: &dyn Progress,
        ) -> Result<ApplyReport> {
            self.0.apply(plan, source, options, progress)
        }
        fn wire_bytes(&self) -> Option<(u64, u64)> {
            Some((0, 0))
        }
        fn apply_reading_ahead(
            &self,
            _plan: &Plan,
            _source: &dyn BodySource,
            _options: &ApplyOptions,
            _progress: &dyn Progress,
            meanwhile: &(dyn Fn() + Sync),
            (wanted, into): (&[crate::replica::Key], &Spool),
        ) -> Result<ApplyReport> {
            into.fill_from(self, wanted);
            // Give the local side time to stage what came in before the break shows.
            std::thread::sleep(std::time::Duration::from_millis(50));
            into.settle(Err(BodyError::Failed("the connection dropped".into())));
            meanwhile();
            Err(crate::Error::Remote {
                location: self.location(),
                message: "the connection dropped".into(),
            })
        }
    }

    /// The local side stages the bodies it reads ahead as they arrive, but a far side
    /// whose answer then breaks off leaves it exactly as it was: no message, no uidlist
    /// change, no staged file left in `tmp/`. The run fails with the far side's reason.
    #[test]
    fn a_read_ahead_that_breaks_off_leaves_the_local_side_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, state) = sides(dir.path());
        maildir(&a);
        maildir(&b);
        fs::write(b.join("new/1700000200.M9P2.host,S=8"), b"from b!\n").unwrap();
        let uidlist = fs::read(a.join("dovecot-uidlist")).unwrap();
        let (ra, rb) = (LocalReplica::new(&a), BreaksOff(LocalReplica::new(&b)));
        let failed = sync(&ra, &rb, &test_options(&state), &NoProgress).unwrap_err();
        // The far side's own reason, not the local side's "cannot read bodies ahead".
        assert_eq!(failed.to_string(), "far:b: the connection dropped");
        assert_eq!(bodies(&a).len(), 3, "nothing copied into A");
        assert_eq!(fs::read(a.join("dovecot-uidlist")).unwrap(), uidlist);
        assert_eq!(
            fs::read_dir(a.join("tmp")).unwrap().count(),
            0,
            "staged files left"
        );
    }

    /// Over the real codec, with baselines on both ends: the far side's table comes back as
    /// a delta, a row delta (`CAP_ROW_DELTA`) or, from an older server, a zstd one, and the
    /// flag change it carries reaches the other side either way.
    #[test]
    fn far_tables_come_as_row_deltas_or_zstd_deltas_from_an_older_server() {
        use crate::replica::remote::{RemoteOptions, RemoteReplica};
        use crate::wire::hello::CAP_ROW_DELTA;
        use std::sync::atomic::Ordering::Relaxed;
        let mut received = Vec::new();
        for withheld in [0, CAP_ROW_DELTA] {
            let dir = tempfile::tempdir().unwrap();
            let (a, b, state) = sides(dir.path());
            big_maildir(&a, 400);
            big_maildir(&b, 400);
            let run = |a: &Path, b: &Path| {
                let channel = crate::transport::spawn_in_process(crate::serve::ServeOptions {
                    cache_dir: Some(dir.path().join("far-cache")),
                    withheld_caps: withheld,
                    ..Default::default()
                })
                .unwrap();
                let options = RemoteOptions {
                    cache_dir: Some(dir.path().join("near-cache")),
                    use_cache: true,
                    compress_level: None,
                    ..RemoteOptions::default()
                };
                let rb = RemoteReplica::connect(channel, "pipe", b.to_str().unwrap(), &options);
                let ra = LocalReplica::new(a);
                let outcome = sync(&ra, &rb, &test_options(&state), &NoProgress).unwrap();
                let kinds = rb.counts().tables.each_ref().map(|n| n.load(Relaxed));
                rb.close().unwrap();
                (outcome, kinds)
            };
            assert_eq!(run(&a, &b).1, [1, 0, 0], "the first time, whole");
            let flagged = b.join("cur/1700000000.M2P1.host,S=6:2,S");
            fs::rename(&flagged, b.join("cur/1700000000.M2P1.host,S=6:2,FS")).unwrap();
            let (outcome, kinds) = run(&a, &b);
            let want = match withheld {
                0 => [0, 0, 1],
                _ => [0, 1, 0],
            };
            assert_eq!(kinds, want, "withheld {withheld:#x}");
            assert_eq!(outcome.a.report.flag_changes, 1, "withheld {withheld:#x}");
            assert!(a.join("cur/1700000000.M2P1.host,S=6:2,FS").exists());
            received.push(outcome.wire.unwrap().1);
        }
        // Both are deltas (the whole INBOX table is some 20 KB): about the head and the
        // changed row.
        assert!(received.iter().all(|&r| r < 2000), "{received:?}");
    }

    /// A Maildir++ INBOX with `count` listed messages.
    fn big_maildir(root: &Path, count: u32) {
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        let n = count + 1;
        let mut uidlist = format!("3 V1700000000 N{n} G0f1e2d3c4b5a69788796a5b4c3d2e1f0\n");
        for uid in 1..=count {
            let base = format!("1700000000.M{uid}P1.host,S=6");
            fs::write(root.join("cur").join(format!("{base}:2,S")), b"hello\n").unwrap();
            uidlist.push_str(&format!("{uid} :{base}\n"));
        }
        fs::write(root.join("dovecot-uidlist"), uidlist).unwrap();
        let uidvalidity = format!("{:08x}", 1_700_000_001);
        fs::write(root.join("dovecot-uidvalidity"), uidvalidity).unwrap();
    }
}
