//! `mdsync watch`: arguments, signals (SIGTERM/SIGINT stop after the batch in flight, SIGHUP
//! re-opens the log), and rendering the loop's events as one status line per batch (stderr
//! or `--log FILE`) and, with `--json`, one JSON object per line on stdout. Decides
//! nothing about mail.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::json;

use mdsync::progress::{Event, Progress};
use mdsync::replica::Replica;
use mdsync::storage::maildir::layout::Layout;
use mdsync::storage::mdbox::layout::is_mdbox;
use mdsync::transport::{Location, parse_location};
use mdsync::watch::coalesce::Timing;
use mdsync::watch::oneway::OneWay;
use mdsync::watch::twoway::TwoWay;
use mdsync::watch::watcher::TreeWatcher;
use mdsync::watch::{Monitor, Step, WatchEvent, WatchLoop, WatchOptions};

use super::{
    Access, MirrorArgs, backup_options, check_paths, check_sides, claim_local, open_local,
    open_replica,
};

#[derive(Debug, clap::Args)]
pub(super) struct WatchArgs {
    /// Source Maildir or mdbox root on this host (it is watched with inotify).
    src: String,
    /// Destination Maildir or mdbox root, local or remote ([USER@]HOST:PATH, ssh://...).
    dst: String,
    /// Merge both ways with `sync` semantics (against the pair's sync state) instead of
    /// mirroring SRC to DST; a local DST is watched too, a remote one is read where SRC
    /// changed and at every full run.
    #[arg(long)]
    two_way: bool,
    /// Itemize every change in the log (copy, flags, move, expunge, create, delete).
    #[arg(short, long)]
    verbose: bool,
    /// One JSON object per line on stdout for every batch, failure and reconnect.
    #[arg(long)]
    json: bool,
    /// Write status lines to this file instead of stderr; SIGHUP re-opens it.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// A batch starts once no change arrived for this many milliseconds...
    #[arg(long, value_name = "MS", default_value_t = 50)]
    debounce: u64,
    /// ...and at the latest this many milliseconds after its first change.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    max_delay: u64,
    /// Run a full (incremental) backup this often, to catch anything inotify missed
    /// (0: only at start and after failures).
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    rescan_interval: u64,
    /// First delay before retrying after a failure (doubles each time).
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    retry_min: f64,
    /// Longest delay between retries.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    retry_max: f64,
    #[command(flatten)]
    mirror: MirrorArgs,
}

/// A watcher of the local tree `root`, following it as mdbox when it is one.
fn tree_watcher(root: &Path, watcher: notify::Result<TreeWatcher>) -> anyhow::Result<TreeWatcher> {
    let watcher = watcher.with_context(|| format!("{}: cannot start inotify", root.display()))?;
    Ok(if is_mdbox(root) {
        watcher.mdbox()
    } else {
        watcher
    })
}

/// The layout the tables of a watched mdbox source name folders in (it has none of its
/// own): the one asked for, else a local Maildir B's of `--two-way`, else Maildir++ — as
/// `backup` and `sync` settle it.
fn mdbox_source_layout(a: &WatchArgs, dst_path: Option<&Path>) -> anyhow::Result<Layout> {
    if let Some(layout) = a.mirror.layout.layout() {
        return Ok(layout);
    }
    let b = dst_path.filter(|p| a.two_way && !is_mdbox(p));
    let detected = match b {
        Some(path) => Layout::detect_folders(path)
            .with_context(|| format!("{}: cannot read", path.display()))?,
        None => None,
    };
    Ok(detected.unwrap_or(Layout::MaildirPlusPlus))
}

/// Runs `mdsync watch` until SIGTERM or SIGINT.
pub(super) fn run(a: WatchArgs) -> anyhow::Result<ExitCode> {
    check_sides(&a.src, &a.dst)?;
    let src_path = match parse_location(&a.src).map_err(anyhow::Error::msg)? {
        Location::Local(path) => path,
        Location::Remote(_) => bail!(
            "{}: watch needs the source on this host (inotify); run mdsync watch there",
            a.src
        ),
    };
    let options = watch_options(&a)?;
    let backup = backup_options(&a.mirror, false)?;
    let dst_path = match parse_location(&a.dst).map_err(anyhow::Error::msg)? {
        Location::Local(path) => Some(path),
        Location::Remote(_) => None,
    };
    check_paths(Some(&src_path), dst_path.as_deref())?;
    // Two-way, A is written too: an mdbox A needs --offline, as with `sync`.
    let src_access = if a.two_way {
        Access::Write
    } else {
        Access::Read
    };
    // Two-way, A is written: it holds its run lock for the whole watch, as does a local
    // B (a remote B's far side holds it for each session).
    let src_lock = match a.two_way {
        true => claim_local(&src_path, &a.mirror)?,
        false => None,
    };
    let src = open_local(&src_path, src_access, a.mirror.offline, src_lock)?;
    if let Some(path) = dst_path.as_deref().filter(|p| is_mdbox(p)) {
        // Refused now rather than at every reconnect.
        open_local(path, Access::Write, a.mirror.offline, None)?;
    }
    // A DST on this host is locked here, one served (by ssh, or the in-process pipe of
    // the tests) by its server in each session.
    let dst_served = dst_path.is_none() || a.mirror.remote.via_pipe.as_deref() == Some("dst");
    let _dst_lock = match dst_path.as_deref().filter(|_| !dst_served) {
        Some(path) => claim_local(path, &a.mirror)?,
        None => None,
    };
    let log = Log::open(a.log.clone())?;
    let watcher = tree_watcher(&src_path, TreeWatcher::new(&src_path))?;
    let excludes = backup.scan.exclude.clone();
    let excluded = move |name: &str| excludes.iter().any(|p| p.matches(name));
    let connect = || -> mdsync::Result<Box<dyn Replica>> {
        open_replica(
            &a.dst,
            "dst",
            Access::Write,
            &a.mirror,
            (a.verbose, dst_served),
        )
        .map(|(replica, _)| replica)
        .map_err(|e| mdsync::Error::Usage(format!("{e:#}")))
    };
    // The layout is decided once, before the first run, so that the first watches cover
    // every folder; the first run still checks DST against it.
    let layout = match a.mirror.layout.layout() {
        Some(layout) => layout,
        None if is_mdbox(&src_path) => mdbox_source_layout(&a, dst_path.as_deref())?,
        None => Layout::detect(&src_path)
            .with_context(|| format!("{}: cannot read", src_path.display()))?,
    };
    // Two-way, a local DST's changes go into the same batches; nothing watches a remote
    // one (see the README: it is read where SRC changed and at every full run).
    let dst_watcher = match (&dst_path, a.two_way) {
        (Some(path), true) => Some(tree_watcher(path, watcher.alongside(path))?),
        _ => None,
    };
    let mut watch = WatchLoop::new(
        watcher,
        src.as_ref(),
        &connect,
        options,
        (layout, &excluded),
    );
    if let Some(dst_watcher) = dst_watcher {
        watch = watch.also_watching(dst_watcher);
    }
    let control = watch.control();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("installing signal handlers")?;
    let handle = signals.handle();
    let renderer = Renderer {
        log: &log,
        json: a.json,
        verbose: a.verbose,
        // Two-way lines already say which side ("A: ", "B: ").
        dst: if a.two_way { None } else { Some(a.dst.clone()) },
    };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for signal in signals.forever() {
                if signal == signal_hook::consts::SIGHUP {
                    log.reopen();
                } else {
                    renderer.line("stopping after the batch in flight");
                    control.stop();
                }
            }
        });
        let mut step: Box<dyn Step> = if a.two_way {
            Box::new(TwoWay::new(backup))
        } else {
            Box::new(OneWay::new(backup))
        };
        watch.run(step.as_mut(), &renderer, &renderer);
        handle.close();
    });
    renderer.json(json!({"event": "stopped"}));
    renderer.line("stopped");
    Ok(ExitCode::SUCCESS)
}

fn watch_options(a: &WatchArgs) -> anyhow::Result<WatchOptions> {
    let seconds = |value: f64, name: &str| -> anyhow::Result<Duration> {
        Duration::try_from_secs_f64(value)
            .with_context(|| format!("{name} {value}: expected a number of seconds"))
    };
    const HOUR_MS: u64 = 3_600_000;
    const YEAR: u64 = 365 * 86_400;
    if a.debounce == 0 || a.max_delay < a.debounce || a.max_delay > HOUR_MS {
        bail!(
            "--debounce must be at least 1 ms, --max-delay at least --debounce and at most an hour"
        );
    }
    if a.rescan_interval > YEAR {
        bail!("--rescan-interval is at most a year (0: never)");
    }
    let rescan = match a.rescan_interval {
        // Never: ten years stands in for it.
        0 => Duration::from_secs(10 * YEAR),
        n => Duration::from_secs(n),
    };
    let (retry_min, retry_max) = (
        seconds(a.retry_min, "--retry-min")?,
        seconds(a.retry_max, "--retry-max")?,
    );
    if retry_min.is_zero() || retry_max < retry_min || retry_max > Duration::from_secs(86_400) {
        bail!("--retry-min must be above 0, --retry-max at least --retry-min and at most a day");
    }
    Ok(WatchOptions {
        timing: Timing {
            debounce: Duration::from_millis(a.debounce),
            max_delay: Duration::from_millis(a.max_delay),
            ..Timing::default()
        },
        rescan_interval: rescan,
        degraded_rescan_interval: Duration::from_secs(60),
        retry_min,
        retry_max,
    })
}

/// Where status lines go: stderr, or a file re-opened on SIGHUP (after logrotate moved it).
struct Log {
    path: Option<PathBuf>,
    file: Mutex<Option<File>>,
}

impl Log {
    fn open(path: Option<PathBuf>) -> anyhow::Result<Log> {
        let file = match &path {
            Some(p) => Some(append(p).with_context(|| format!("--log {}", p.display()))?),
            None => None,
        };
        Ok(Log {
            path,
            file: Mutex::new(file),
        })
    }

    /// Opens the log file again; keeps the old one when that fails, and says so there.
    fn reopen(&self) {
        let Some(path) = &self.path else {
            return;
        };
        match append(path) {
            Ok(file) => {
                if let Ok(mut slot) = self.file.lock() {
                    *slot = Some(file);
                }
                self.write(&format!("{} log re-opened", timestamp()));
            }
            Err(e) => self.write(&format!(
                "{} cannot re-open {}: {e}; still writing here",
                timestamp(),
                path.display()
            )),
        }
    }

    fn write(&self, line: &str) {
        let mut slot = self.file.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_mut() {
            Some(file) => {
                let _ = writeln!(file, "{line}");
            }
            None => eprintln!("{line}"),
        }
    }
}

fn append(path: &std::path::Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Renders the loop's events and the library's progress.
struct Renderer<'a> {
    log: &'a Log,
    json: bool,
    verbose: bool,
    dst: Option<String>,
}

impl Renderer<'_> {
    fn line(&self, text: &str) {
        self.log
            .write(&format!("{} mdsync watch: {text}", timestamp()));
    }

    fn json(&self, value: serde_json::Value) {
        if self.json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{value}");
            let _ = out.flush();
        }
    }
}

impl Monitor for Renderer<'_> {
    fn event(&self, event: WatchEvent) {
        match event {
            WatchEvent::Watching { watches } => {
                self.line(&format!("watching {watches} directories"));
                self.json(json!({"event": "watching", "watches": watches}));
            }
            WatchEvent::Batch { report, latency } => {
                let o = &report.outcome;
                let r = &o.report;
                let kind = if report.full { "full run" } else { "batch" };
                let latency_ms = latency.map(|l| l.as_secs_f64() * 1000.0);
                let after = latency_ms.map_or(String::new(), |ms| {
                    format!(", {ms:.0} ms after the first change")
                });
                self.line(&format!(
                    "{kind}: {} mailboxes read, {} copied, {} flag changes, {} moves, \
                     {} expunged, {} mailboxes created, {} deleted{after}",
                    report.mailboxes_read,
                    r.messages_copied,
                    r.flag_changes,
                    r.moves,
                    r.expunged,
                    r.mailboxes_created,
                    r.mailboxes_deleted,
                ));
                for s in &o.skipped {
                    self.line(&super::output::skip_line(
                        &s.path,
                        s,
                        "read again at its next change",
                    ));
                }
                for e in &r.errors {
                    self.line(&format!("error: {e}"));
                }
                for c in &report.conflicts {
                    self.line(&format!("conflict: {c}"));
                }
                self.json(json!({
                    "event": "batch",
                    "full": report.full,
                    "mailboxes": report.mailboxes_read,
                    "copies": r.messages_copied,
                    "bytes": r.bytes_copied,
                    "flag_changes": r.flag_changes,
                    "moves": r.moves,
                    "expunges": r.expunged,
                    "mailboxes_created": r.mailboxes_created,
                    "mailboxes_deleted": r.mailboxes_deleted,
                    "vanished": r.vanished,
                    "skipped": o.skipped.len(),
                    "errors": r.errors,
                    "conflicts": report.conflicts,
                    "latency_ms": latency_ms,
                    "seconds": o.seconds,
                    "time": timestamp(),
                }));
            }
            WatchEvent::Failed { message, retry_in } => {
                self.line(&format!(
                    "error: {message}; full run in {:.1} s",
                    retry_in.as_secs_f64()
                ));
                self.json(json!({
                    "event": "failed",
                    "message": message,
                    "retry_in_ms": retry_in.as_millis() as u64,
                    "time": timestamp(),
                }));
            }
            WatchEvent::Reconnected { location } => {
                self.line(&format!("reconnected to {location}"));
                self.json(
                    json!({"event": "reconnected", "location": location, "time": timestamp()}),
                );
            }
            WatchEvent::WatchLimit {
                count,
                first,
                rescan_every,
            } => {
                self.line(&format!(
                    "warning: {count} directories could not be watched ({first}); \
                     a full run every {} s covers them (at the inotify watch limit, \
                     raise fs.inotify.max_user_watches)",
                    rescan_every.as_secs()
                ));
                self.json(json!({"event": "watch_limit", "count": count, "first": first}));
            }
            WatchEvent::Warning { message } => {
                self.line(&format!("warning: {message}"));
                self.json(json!({"event": "warning", "message": message, "time": timestamp()}));
            }
            WatchEvent::Overflow => {
                self.line("warning: inotify events were lost; reading everything again");
                self.json(json!({"event": "overflow", "time": timestamp()}));
            }
        }
    }
}

impl Progress for Renderer<'_> {
    fn event(&self, event: Event) {
        match event {
            Event::Applied { line, .. } if self.verbose => match &self.dst {
                Some(dst) => self.log.write(&format!("{} {dst} {line}", timestamp())),
                None => self.log.write(&format!("{} {line}", timestamp())),
            },
            Event::Warning { message } => self.line(&format!("warning: {message}")),
            _ => {}
        }
    }
}

/// The time now as `2026-11-23T06:01:02Z` (UTC), for log lines.
fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// Seconds since the epoch as an ISO 8601 UTC time (days to a civil date: the usual
/// era-based conversion).
fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_format_like_iso_8601() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_410_062), "2026-11-23T05:01:02Z");
    }

    #[test]
    fn watch_options_are_checked() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["mdsync", "watch"];
            argv.extend_from_slice(extra);
            argv.extend_from_slice(&["a", "b"]);
            match super::super::Args::try_parse_from(argv).unwrap().command {
                super::super::Command::Watch(a) => watch_options(&a),
                _ => unreachable!(),
            }
        };
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.timing.debounce, Duration::from_millis(50));
        assert_eq!(defaults.rescan_interval, Duration::from_secs(600));
        assert!(parse(&["--debounce", "0"]).is_err());
        assert!(parse(&["--debounce", "300", "--max-delay", "100"]).is_err());
        assert!(parse(&["--retry-min", "5", "--retry-max", "1"]).is_err());
        assert!(parse(&["--retry-min=-1"]).is_err());
        assert!(parse(&["--rescan-interval", "18446744073709551615"]).is_err());
        assert!(parse(&["--max-delay", "18446744073709551615"]).is_err());
        let never = parse(&["--rescan-interval", "0"]).unwrap();
        assert!(never.rescan_interval > Duration::from_secs(9 * 365 * 86_400));
        let quick = parse(&["--retry-min", "0.2"]).unwrap();
        assert_eq!(quick.retry_min, Duration::from_millis(200));
    }
}
