//! Renders library progress for people and scripts: a progress bar on a terminal, a quiet
//! line every 10 s otherwise, itemized lines with `-v`, the JSON report. Decides nothing.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mdsync::progress::{Event, Progress};
use mdsync::sync::backup::{BackupOutcome, Completion};
use mdsync::sync::plan::Skipped;

/// The CLI's [`Progress`].
pub struct Renderer {
    verbose: bool,
    itemize_to_stderr: bool,
    bar: Option<ProgressBar>,
    periodic: bool,
    last_line: Mutex<Instant>,
    scanned: AtomicU64,
    done_ops: AtomicU64,
    done_bytes: AtomicU64,
}

impl Renderer {
    /// `verbose`: itemize; `json`: stdout is reserved for the report; `show`: draw progress.
    pub fn new(verbose: bool, json: bool, show: bool) -> Renderer {
        let tty = std::io::stderr().is_terminal();
        let bar = (show && tty).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{elapsed_precise}] {wide_bar} {pos}/{len}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Renderer {
            verbose,
            itemize_to_stderr: json,
            bar,
            periodic: show && !tty,
            last_line: Mutex::new(Instant::now()),
            scanned: AtomicU64::new(0),
            done_ops: AtomicU64::new(0),
            done_bytes: AtomicU64::new(0),
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn itemize(&self, line: &str) {
        if let Some(bar) = &self.bar {
            bar.suspend(|| self.print_item(line));
        } else {
            self.print_item(line);
        }
    }

    fn print_item(&self, line: &str) {
        if self.itemize_to_stderr {
            eprintln!("{line}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    }

    fn maybe_periodic_line(&self) {
        if !self.periodic {
            return;
        }
        let Ok(mut last) = self.last_line.lock() else {
            return;
        };
        if last.elapsed() >= Duration::from_secs(10) {
            *last = Instant::now();
            eprintln!(
                "mdsync: {} messages scanned, {} changes applied, {} copied",
                self.scanned.load(Ordering::Relaxed),
                self.done_ops.load(Ordering::Relaxed),
                human_bytes(self.done_bytes.load(Ordering::Relaxed))
            );
        }
    }
}

impl Progress for Renderer {
    fn event(&self, event: Event) {
        match event {
            Event::ScanStarted { side } => {
                if let Some(bar) = &self.bar {
                    bar.set_message(format!("scanning {side}"));
                }
            }
            Event::MailboxScanned { messages } => {
                self.scanned.fetch_add(messages, Ordering::Relaxed);
            }
            Event::PlanReady { operations, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_message("applying");
                    bar.set_length(operations);
                    bar.set_position(0);
                }
            }
            Event::Progressed { operations, bytes } => {
                self.done_ops.fetch_add(operations, Ordering::Relaxed);
                self.done_bytes.fetch_add(bytes, Ordering::Relaxed);
                if let Some(bar) = &self.bar {
                    bar.inc(operations);
                }
            }
            Event::Applied { line, bytes } => {
                self.done_ops.fetch_add(1, Ordering::Relaxed);
                self.done_bytes.fetch_add(bytes, Ordering::Relaxed);
                if let Some(bar) = &self.bar {
                    bar.inc(1);
                }
                if self.verbose {
                    self.itemize(&line);
                }
            }
            Event::Warning { message } => eprintln!("mdsync: warning: {message}"),
        }
        self.maybe_periodic_line();
    }
}

/// How a skipped item is labelled: `error` for bad input (exit 1); for a folder that
/// changed while it was read (exit 2), `then`: what happens to it next.
pub fn skip_line(path: &str, s: &Skipped, then: &str) -> String {
    match s.changed {
        true => format!("{path}: {} (changed while read; {then})", s.why),
        false => format!("error: {path}: {}", s.why),
    }
}

/// What a one-shot run says about a folder that changed while it was read.
pub const RERUN: &str = "re-run to finish";

/// `1.5 MiB`-style sizes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// One line for the end of a run.
pub fn summary_line(o: &BackupOutcome) -> String {
    let r = &o.report;
    if o.planned == Default::default() {
        return format!(
            "mdsync: in sync, nothing to do ({} messages, {} mailboxes unchanged since the last run) in {:.2} s",
            o.source_messages, o.unchanged_mailboxes, o.seconds
        );
    }
    format!(
        "mdsync: {} copied ({}), {} flag changes, {} moves, {} expunged, {} mailboxes created, {} deleted in {:.2} s",
        r.messages_copied,
        human_bytes(r.bytes_copied),
        r.flag_changes,
        r.moves,
        r.expunged,
        r.mailboxes_created,
        r.mailboxes_deleted,
        o.seconds
    )
}

/// How a run ended, as the `--json` reports name it (the exit code's meaning).
pub fn completion_name(completion: Completion) -> &'static str {
    match completion {
        Completion::Complete => "complete",
        Completion::Partial => "partial",
        Completion::Errors => "errors",
    }
}

/// The `--json` report.
pub fn json_report(o: &BackupOutcome, dry_run: bool) -> String {
    let p = &o.planned;
    let r = &o.report;
    let (created, deleted, copied, bytes, flags, moves, expunged) = if dry_run {
        (
            p.mailboxes_created,
            p.mailboxes_deleted,
            p.copies,
            p.bytes,
            p.flag_changes,
            p.moves,
            p.expunges,
        )
    } else {
        (
            r.mailboxes_created,
            r.mailboxes_deleted,
            r.messages_copied,
            r.bytes_copied,
            r.flag_changes,
            r.moves,
            r.expunged,
        )
    };
    let value = serde_json::json!({
        "mailboxes_created": created,
        "mailboxes_deleted": deleted,
        "messages_copied": copied,
        "bytes_copied": bytes,
        "flag_changes": flags,
        "moves": moves,
        "expunged": expunged,
        "skipped": o.skipped.len() as u64 + r.vanished + r.errors.len() as u64,
        "vanished": r.vanished,
        "errors": r.errors.iter().chain(o.skipped.iter().filter(|s| !s.changed).map(|s| &s.path)).collect::<Vec<_>>(),
        "completion": completion_name(o.completion()),
        "source_messages": o.source_messages,
        "unchanged_mailboxes": o.unchanged_mailboxes,
        "seconds": o.seconds,
        "wire_bytes_sent": o.wire.map(|w| w.0),
        "wire_bytes_received": o.wire.map(|w| w.1),
        "dry_run": dry_run,
        "plan": if dry_run { o.plan_lines.clone() } else { Vec::new() },
    });
    value.to_string()
}
