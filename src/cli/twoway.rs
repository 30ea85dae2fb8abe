//! `mdsync sync A B`: opens both sides, runs the two-way sync, prints the plan, conflicts
//! and summary, and maps the outcome to an exit code (as `backup` does).

use std::process::ExitCode;

use mdsync::sync::twoway::{self, SideOutcome, SyncOutcome};

use super::{
    Access, EXIT_INTERRUPTED, SyncArgs, backup_options, collapse_repeats, exit_code, output,
    run_pair,
};

/// Runs `mdsync sync`.
pub(super) fn run(a: SyncArgs) -> anyhow::Result<ExitCode> {
    let options = backup_options(&a.o.mirror, a.o.dry_run)?;
    let outcome = run_pair((&a.a, Access::Write), &a.b, &a.o, |x, y, progress| {
        twoway::sync(x, y, &options, progress)
    })?;
    let Some(outcome) = outcome else {
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    report(&outcome, &a);
    Ok(exit_code(outcome.completion()))
}

fn report(o: &SyncOutcome, a: &SyncArgs) {
    for s in &o.skipped {
        eprintln!(
            "mdsync: {}",
            super::output::skip_line(&s.path, s, super::output::RERUN)
        );
    }
    for w in &o.warnings {
        eprintln!("mdsync: warning: {}: {}", w.path, w.why);
    }
    for (side, out) in [("A", &o.a), ("B", &o.b)] {
        for (e, repeats) in collapse_repeats(&out.report.errors) {
            match repeats {
                0 => eprintln!("mdsync: error: {side}: {e}"),
                n => eprintln!("mdsync: error: {side}: {e} (and {n} more times)"),
            }
        }
    }
    let vanished = o.a.report.vanished + o.b.report.vanished;
    if vanished > 0 {
        eprintln!("mdsync: {vanished} messages changed during the run; re-run to finish");
    }
    if !a.o.json {
        for c in &o.conflicts {
            eprintln!(
                "mdsync: conflict: {}: {}: {}",
                c.mailbox,
                serde_json::to_value(c.kind)
                    .map_or_else(|_| String::new(), |v| v.as_str().unwrap_or("").to_string()),
                c.detail
            );
        }
    }
    if a.o.dry_run && !a.o.json {
        for line in &o.a.plan_lines {
            println!("A: {line}");
        }
        for line in &o.b.plan_lines {
            println!("B: {line}");
        }
    }
    if a.o.json {
        println!("{}", json_report(o, a.o.dry_run));
    } else if !a.o.dry_run && (a.o.verbose || !a.o.no_progress) {
        eprintln!("{}", summary_line(o));
    }
}

fn side_summary(s: &SideOutcome) -> String {
    let r = &s.report;
    format!(
        "{} copied ({}), {} flag changes, {} moves, {} expunged, {} mailboxes created, {} renamed, {} deleted",
        r.messages_copied,
        output::human_bytes(r.bytes_copied),
        r.flag_changes,
        r.moves,
        r.expunged,
        r.mailboxes_created,
        s.planned.mailboxes_renamed,
        r.mailboxes_deleted,
    )
}

fn summary_line(o: &SyncOutcome) -> String {
    if o.is_noop() {
        return format!(
            "mdsync: in sync, nothing to do ({} + {} messages, {} mailboxes unchanged since the last sync) in {:.2} s",
            o.a.messages, o.b.messages, o.unchanged_mailboxes, o.seconds
        );
    }
    format!(
        "mdsync: A: {}; B: {}; {} conflicts in {:.2} s",
        side_summary(&o.a),
        side_summary(&o.b),
        o.conflicts.len(),
        o.seconds
    )
}

fn side_json(s: &SideOutcome, dry_run: bool) -> serde_json::Value {
    let (p, r) = (&s.planned, &s.report);
    let pick = |planned: u64, done: u64| if dry_run { planned } else { done };
    serde_json::json!({
        "mailboxes_created": pick(p.mailboxes_created, r.mailboxes_created),
        "mailboxes_renamed": p.mailboxes_renamed,
        "mailboxes_deleted": pick(p.mailboxes_deleted, r.mailboxes_deleted),
        "messages_copied": pick(p.copies, r.messages_copied),
        "bytes_copied": pick(p.bytes, r.bytes_copied),
        "flag_changes": pick(p.flag_changes, r.flag_changes),
        "moves": pick(p.moves, r.moves),
        "expunged": pick(p.expunges, r.expunged),
        "vanished": r.vanished,
        "errors": r.errors,
        "messages": s.messages,
        "plan": if dry_run { s.plan_lines.clone() } else { Vec::new() },
    })
}

/// The `--json` report: per side what was (or would be) done, and the conflicts.
fn json_report(o: &SyncOutcome, dry_run: bool) -> String {
    serde_json::json!({
        "a": side_json(&o.a, dry_run),
        "b": side_json(&o.b, dry_run),
        "conflicts": o.conflicts,
        "skipped": o.skipped.iter().map(|s| format!("{}: {}", s.path, s.why)).collect::<Vec<_>>(),
        "completion": super::output::completion_name(o.completion()),
        "first_sync": o.first_sync,
        "in_sync": o.is_noop(),
        "unchanged_mailboxes": o.unchanged_mailboxes,
        "seconds": o.seconds,
        "wire_bytes_sent": o.wire.map(|w| w.0),
        "wire_bytes_received": o.wire.map(|w| w.1),
        "dry_run": dry_run,
    })
    .to_string()
}
