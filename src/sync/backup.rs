//! One-way backup: scan both replicas, confirm apparent expunges, settle GUID disagreements
//! by content hash, diff, check the delete guard, then apply (or only describe, for a dry
//! run). Orchestrates; writes nothing itself.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::progress::{Event, Progress};
use crate::replica::{Key, Replica};
use crate::scan::ScanOptions;
use crate::storage::maildir::layout::Layout;
use crate::sync::apply::{ApplyOptions, ApplyReport};
use crate::sync::diff::{self, DiffOptions, HashAnswers, HashQuestion};
use crate::sync::merge;
use crate::sync::plan::{Plan, PlanCounts, Skipped};
use crate::sync::state::{self, PairState};
use crate::table::MailTable;

/// How many destination messages a run may expunge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteLimit {
    /// At most this many.
    Count(u64),
    /// At most this percentage of the destination's messages.
    Percent(u64),
}

impl Default for DeleteLimit {
    /// Half of the destination: a source that failed to mount must not empty the backup.
    fn default() -> Self {
        DeleteLimit::Percent(50)
    }
}

impl DeleteLimit {
    /// The largest number of expunges allowed out of `total`.
    pub fn allowed(self, total: u64) -> u64 {
        match self {
            DeleteLimit::Count(n) => n,
            DeleteLimit::Percent(p) => total.saturating_mul(p) / 100,
        }
    }
}

/// Everything a backup run needs to know.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// What to scan.
    pub scan: ScanOptions,
    /// Differ knobs.
    pub diff: DiffOptions,
    /// How to write.
    pub apply: ApplyOptions,
    /// Plan only.
    pub dry_run: bool,
    /// Delete guard.
    pub max_delete: DeleteLimit,
    /// Where pair states live (see [`crate::sync::state`]); `None` reads every mailbox.
    pub state_dir: Option<PathBuf>,
}

/// What a backup run did.
#[derive(Debug, Clone, Default)]
pub struct BackupOutcome {
    /// Counts of the plan.
    pub planned: PlanCounts,
    /// The plan's itemized lines (filled for dry runs).
    pub plan_lines: Vec<String>,
    /// What the applier did (empty for dry runs).
    pub report: ApplyReport,
    /// Source items not copied.
    pub skipped: Vec<Skipped>,
    /// Oddities copied anyway.
    pub warnings: Vec<Skipped>,
    /// Messages on the source.
    pub source_messages: u64,
    /// Mailboxes not read on either side: unchanged since the last in-sync run.
    pub unchanged_mailboxes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Bytes sent to and received from remote replicas, when a side is remote.
    pub wire: Option<(u64, u64)>,
}

/// How a run ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Everything done.
    Complete,
    /// Done, but some messages changed under us: a re-run finishes the job.
    Partial,
    /// Done as far as possible; some items could not be copied (bad input, I/O errors).
    Errors,
}

impl Completion {
    /// How a run ended, for `backup` and `sync` alike: in error when an item `failed` or
    /// was skipped for bad input; partial when something changed under the run (messages
    /// `vanished`, a folder that changed while it was read).
    pub fn of(failed: bool, vanished: u64, skipped: &[Skipped]) -> Completion {
        if failed || skipped.iter().any(|s| !s.changed) {
            Completion::Errors
        } else if vanished > 0 || !skipped.is_empty() {
            Completion::Partial
        } else {
            Completion::Complete
        }
    }
}

impl BackupOutcome {
    /// Classifies the run.
    pub fn completion(&self) -> Completion {
        let r = &self.report;
        Completion::of(!r.errors.is_empty(), r.vanished, &self.skipped)
    }
}

/// Runs a one-way backup from `src` to `dst`.
pub fn backup(
    src: &dyn Replica,
    dst: &dyn Replica,
    options: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupOutcome> {
    backup_keeping(src, dst, options, progress).map(|run| run.outcome)
}

/// What a backup run saw and did, for a caller that keeps going from there (`watch`).
#[derive(Debug, Clone)]
pub struct Converged {
    /// The run's outcome.
    pub outcome: BackupOutcome,
    /// The source as scanned (mailboxes the pair state vouched for hold no messages).
    pub src: MailTable,
    /// The destination as scanned, before the plan was applied.
    pub dst: MailTable,
    /// The plan that was applied (or only described, for a dry run).
    pub plan: Plan,
}

/// How much of the destination the applier sweeps for what killed runs left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Every destination mailbox (a whole run).
    All,
    /// Only the mailboxes that were read: a batch that reads a few mailboxes must not
    /// list the `tmp/` of every other one.
    Read,
}

/// Runs a one-way backup like [`backup`] and hands back the tables and the plan.
pub fn backup_keeping(
    src: &dyn Replica,
    dst: &dyn Replica,
    options: &BackupOptions,
    progress: &dyn Progress,
) -> Result<Converged> {
    let started = Instant::now();
    let state_path = options
        .state_dir
        .as_deref()
        .filter(|_| !options.diff.checksum)
        .map(|dir| state::state_file(dir, &src.location(), &dst.location()));
    let state = state_path
        .as_deref()
        .map(PairState::load)
        .unwrap_or_default();
    // The source's layout is known at once; the destination's is checked against it while
    // the source is scanned, so a remote destination's connection is set up meanwhile.
    let layout = match options.scan.layout {
        Some(layout) => layout,
        None => src.detect_layout()?.unwrap_or(Layout::MaildirPlusPlus),
    };
    // Scan caches are written at the end (`Scans::keep`, while the applier's closing sync
    // waits for the disk): not while the scans compete for the CPU, and not for
    // destination mailboxes this run rewrites.
    // A mailbox changed on one side is read on both: where a side's stamps are cheap to
    // take, the other side is told before it scans instead of being asked again after.
    let known = state.dirs();
    let (src_now, dst_now) = match known.is_empty() {
        true => (None, None),
        false => (src.stamps_now(&known), dst.stamps_now(&known)),
    };
    let src_scan = ScanOptions {
        layout: Some(layout),
        unchanged_if: state.source_hints(dst_now.as_ref()),
        defer_cache_writes: true,
        ..options.scan.clone()
    };
    let dst_scan = ScanOptions {
        layout: Some(layout),
        unchanged_if: state.destination_hints(src_now.as_ref()),
        defer_cache_writes: true,
        ..options.scan.clone()
    };
    let scans = Scans {
        src,
        dst,
        src_options: &src_scan,
        dst_options: &dst_scan,
        progress,
    };
    progress.event(Event::ScanStarted { side: "source" });
    let (src_table, dst_table) = super::both(
        (src, || src.scan(&src_scan, progress)),
        (dst, || {
            if options.scan.layout.is_none() {
                check_destination_layout(src, dst, layout)?;
            }
            dst.scan(&dst_scan, progress)
        }),
    );
    let (mut src_table, mut dst_table) = (src_table?, dst_table?);
    read_one_sided(src, dst, &mut src_table, &mut dst_table);
    let keep = |s: &MailTable, d: &MailTable, plan: Option<&Plan>| scans.keep(s, d, plan);
    let mut run = converge(
        (src, dst),
        (&mut src_table, &dst_table),
        options,
        Sweep::All,
        progress,
        &keep,
    )?;
    if let Some(path) = state_path
        && !options.dry_run
        && run.outcome.completion() == Completion::Complete
    {
        let next = state.after_run(&src_table, &dst_table, &run.plan);
        if next != state
            && let Err(e) = next.save(&path)
        {
            progress.event(Event::Warning {
                message: format!("pair state {}: {e}", path.display()),
            });
        }
    }
    run.outcome.seconds = started.elapsed().as_secs_f64();
    Ok(Converged {
        outcome: run.outcome,
        plan: run.plan,
        src: src_table,
        dst: dst_table,
    })
}

/// The outcome of [`converge`] and the plan it applied.
#[derive(Debug, Clone)]
pub struct Applied {
    /// What was done.
    pub outcome: BackupOutcome,
    /// The plan.
    pub plan: Plan,
}

/// Brings `dst` to `src` from tables already read: confirm apparent expunges, settle GUID
/// disagreements by content hash, diff, check the delete guard, apply. A mailbox that is a
/// placeholder (`unchanged`) on both sides is left alone; a caller must have read a mailbox
/// on both sides or on neither (see `read_one_sided`). `keep` runs once while the applier's
/// closing sync waits for the disk (or at once when nothing is applied), with both tables
/// and, when it was applied, the plan. A source mailbox listed again to confirm an
/// expunge is replaced in `src_table`.
pub fn converge(
    (src, dst): (&dyn Replica, &dyn Replica),
    (src_table, dst_table): (&mut MailTable, &MailTable),
    options: &BackupOptions,
    sweep: Sweep,
    progress: &dyn Progress,
    keep: &(dyn Fn(&MailTable, &MailTable, Option<&Plan>) + Sync),
) -> Result<Applied> {
    let started = Instant::now();
    // A folder renamed on the source is renamed on the destination (one `rename()`); the
    // rest of the plan is made against the destination as it will look after that.
    let renames = diff::mailbox_renames(src_table, dst_table);
    let dst_view = merge::renamed_table(dst_table, &renames);
    let dst_view: &MailTable = &dst_view;
    confirm_missing(src, src_table, dst_view);
    let src_table = &*src_table;
    let questions = diff::hash_questions(src_table, dst_view, &options.diff);
    let answers = answer(src, dst, questions);
    let mut plan = diff::diff_backup(src_table, dst_view, &answers, &options.diff);
    plan.rename_mailboxes = merge::order_renames(renames);
    if sweep == Sweep::Read {
        plan.sweep
            .retain(|dir| dst_view.mailbox(dir).is_some_and(|m| m.unchanged.is_none()));
    }
    let planned = plan.counts();
    if let Err(e) = check_delete_guard(&planned, dst_table, options.max_delete) {
        keep(src_table, dst_table, None);
        return Err(e);
    }
    let mut outcome = BackupOutcome {
        planned,
        skipped: plan.skipped.clone(),
        warnings: plan.warnings.clone(),
        source_messages: src_table.message_count(),
        unchanged_mailboxes: src_table
            .mailboxes
            .iter()
            .filter(|m| m.unchanged.is_some())
            .count() as u64,
        ..BackupOutcome::default()
    };
    // A destination that would refuse the plan (an mdbox tree without `--offline`) is
    // refused now, also for a dry run: as a local one is before anything is read.
    dst.check_writable()?;
    if options.dry_run {
        outcome.plan_lines = plan.lines();
        keep(src_table, dst_table, None);
    } else {
        if !plan.is_empty() {
            progress.event(Event::PlanReady {
                operations: planned.copies
                    + planned.flag_changes
                    + planned.moves
                    + planned.expunges,
                bytes: planned.bytes,
            });
        }
        // Also with nothing to do: the applier clears what killed runs left behind.
        // The scan caches are written while the applier's closing sync waits for the disk.
        let meanwhile = || keep(src_table, dst_table, Some(&plan));
        outcome.report = dst.apply_overlapping(&plan, src, &options.apply, progress, &meanwhile)?;
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome.wire = wire_bytes(src, dst);
    Ok(Applied { outcome, plan })
}

/// Wire bytes of both sides together (sent, received), when either is remote.
pub(crate) fn wire_bytes(src: &dyn Replica, dst: &dyn Replica) -> Option<(u64, u64)> {
    match (src.wire_bytes(), dst.wire_bytes()) {
        (None, None) => None,
        (a, b) => {
            let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
            Some((a.0 + b.0, a.1 + b.1))
        }
    }
}

/// Both sides' scan options, to keep what the scans listed once the run is done.
struct Scans<'a> {
    src: &'a dyn Replica,
    dst: &'a dyn Replica,
    src_options: &'a ScanOptions,
    dst_options: &'a ScanOptions,
    progress: &'a dyn Progress,
}

impl Scans<'_> {
    /// Stores the freshly listed mailboxes in the scan caches: every source mailbox (the run
    /// never writes there), and the destination mailboxes an applied `plan` left alone. A
    /// mailbox the plan changed, or deletes, is listed again next time.
    fn keep(&self, src_table: &MailTable, dst_table: &MailTable, plan: Option<&Plan>) {
        let changed: HashSet<&str> = plan
            .map(|p| {
                let written = p.mailboxes.iter().map(|m| m.dir.as_str());
                written
                    .chain(p.delete_mailboxes.iter().map(|d| d.dir.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        let (kept_src, kept_dst) = rayon::join(
            || {
                self.src
                    .save_scan_cache(self.src_options, src_table, &|_| false)
            },
            || {
                self.dst
                    .save_scan_cache(self.dst_options, dst_table, &|dir| changed.contains(dir))
            },
        );
        for e in [kept_src, kept_dst].into_iter().filter_map(Result::err) {
            self.progress.event(Event::Warning {
                message: format!("scan cache: {e}"),
            });
        }
    }
}

/// One layout for both sides: the one asked for, else the source's. A destination whose
/// folders show another layout is refused, since reading it the wrong way would make its
/// folders look deleted.
pub(crate) fn check_destination_layout(
    src: &dyn Replica,
    dst: &dyn Replica,
    layout: Layout,
) -> Result<()> {
    match dst.detect_layout()? {
        Some(other) if other != layout => Err(Error::Usage(format!(
            "{} looks like a {} tree but {} like a {} tree; pass --layout to choose",
            src.location(),
            layout.as_str(),
            dst.location(),
            other.as_str()
        ))),
        _ => Ok(()),
    }
}

/// A mailbox skipped as unchanged on one side but changed (or missing) on the other must be
/// read after all: the pair is no longer known to be in sync.
pub fn read_one_sided(
    src: &dyn Replica,
    dst: &dyn Replica,
    src_table: &mut MailTable,
    dst_table: &mut MailTable,
) {
    let layout = src_table.layout;
    src_table.mailboxes.par_iter_mut().for_each(|s| {
        let dst_unchanged = dst_table
            .mailbox(&s.dir)
            .is_some_and(|d| d.unchanged.is_some());
        if s.unchanged.is_some() && !dst_unchanged {
            *s = src.rescan_mailbox(layout, &s.dir);
        }
    });
    let dst_layout = dst_table.layout;
    dst_table.mailboxes.par_iter_mut().for_each(|d| {
        let src_read = src_table
            .mailbox(&d.dir)
            .is_some_and(|s| s.unchanged.is_none());
        if d.unchanged.is_some() && src_read {
            *d = dst.rescan_mailbox(dst_layout, &d.dir);
        }
    });
}

/// A file the scan did not see may be a message Dovecot was renaming during `readdir`.
/// Unless the mailbox was settled (its stamps did not move while it was read), the source
/// mailbox is listed again before a destination copy it seems to lack is expunged; whatever
/// that second look finds is what counts.
fn confirm_missing(src: &dyn Replica, src_table: &mut MailTable, dst_table: &MailTable) {
    let layout = src_table.layout;
    src_table.mailboxes.par_iter_mut().for_each(|mailbox| {
        let Some(dst_mailbox) = dst_table.mailbox(&mailbox.dir) else {
            return;
        };
        if mailbox.settled || dst_mailbox.is_empty() {
            return;
        }
        // The mailbox moved while it was read: any destination file the source seems to
        // lack (numbered or not) may be one `readdir` missed. Look again before it goes.
        let src_bases: std::collections::HashSet<&str> =
            (0..mailbox.len()).map(|i| mailbox.base(i)).collect();
        let at_stake = (0..dst_mailbox.len()).any(|j| !src_bases.contains(dst_mailbox.base(j)));
        if at_stake {
            *mailbox = src.rescan_mailbox(layout, &mailbox.dir);
        }
    });
}

/// Compares contents for the pairs the differ asked about: one batch per side, both sides
/// at once. A pair that cannot be read counts as different (the copy is redone, never
/// dropped).
pub(crate) fn answer(
    src: &dyn Replica,
    dst: &dyn Replica,
    questions: Vec<HashQuestion>,
) -> HashAnswers {
    let keys = |side: fn(&HashQuestion) -> &(crate::model::Subdir, String)| -> Vec<Key> {
        questions
            .iter()
            .map(|q| Key {
                dir: q.dir.clone(),
                sub: side(q).0,
                name: side(q).1.clone(),
            })
            .collect()
    };
    let (src_keys, dst_keys) = (keys(|q| &q.src), keys(|q| &q.dst));
    let (a, b) = rayon::join(
        || src.content_hashes(&src_keys),
        || dst.content_hashes(&dst_keys),
    );
    questions
        .into_iter()
        .zip(a.into_iter().zip(b))
        .map(|(q, (a, b))| {
            let same = matches!((a, b), (Ok(a), Ok(b)) if a == b);
            (q, same)
        })
        .collect()
}

pub(crate) fn check_delete_guard(
    planned: &PlanCounts,
    dst: &MailTable,
    limit: DeleteLimit,
) -> Result<()> {
    let total = dst.message_count();
    let allowed = limit.allowed(total);
    if planned.expunges > allowed {
        return Err(Error::TooManyDeletes {
            would: planned.expunges,
            total,
            limit: allowed,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_limit_defaults_to_half() {
        assert_eq!(DeleteLimit::default().allowed(10), 5);
        assert_eq!(DeleteLimit::Percent(100).allowed(7), 7);
        assert_eq!(DeleteLimit::Count(3).allowed(1000), 3);
        assert_eq!(DeleteLimit::default().allowed(0), 0);
    }

    /// A folder that changed while it was read makes the run partial (exit 2); bad input
    /// beside it still makes it an error (exit 1).
    #[test]
    fn a_skip_that_changed_meanwhile_is_partial_and_bad_input_an_error() {
        let skip = |changed| Skipped {
            path: ".A".into(),
            why: "left alone".into(),
            changed,
        };
        let outcome = |skipped: Vec<Skipped>| BackupOutcome {
            skipped,
            ..BackupOutcome::default()
        };
        assert_eq!(outcome(vec![]).completion(), Completion::Complete);
        assert_eq!(outcome(vec![skip(true)]).completion(), Completion::Partial);
        let both = outcome(vec![skip(true), skip(false)]);
        assert_eq!(both.completion(), Completion::Errors);
    }
}
