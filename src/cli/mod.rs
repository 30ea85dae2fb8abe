//! The command line: clap definitions, turning arguments into library options, and mapping
//! outcomes to output and exit codes. The only module that knows clap, anyhow or stdout.

mod output;
mod scan_report;
mod twoway;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use std::time::Duration;

use mdsync::replica::Replica;
use mdsync::replica::local::{LocalReplica, check_overlap};
use mdsync::replica::mdbox::MdboxReplica;
use mdsync::replica::remote::{RemoteOptions, RemoteReplica};
use mdsync::runlock::{LockError, RunLock};
use mdsync::scan::ScanOptions;
use mdsync::storage::maildir::layout::Layout;
use mdsync::storage::maildir::writer::{FsyncPolicy, Ownership};
use mdsync::storage::mdbox::layout as mdbox_layout;
use mdsync::sync::apply::ApplyOptions;
use mdsync::sync::backup::{self, BackupOptions, BackupOutcome, Completion, DeleteLimit};
use mdsync::sync::diff::DiffOptions;
use mdsync::transport::{self, ConnectOptions, Location, parse_location};

/// Exit code: some messages changed during the run; re-run to finish.
pub const EXIT_PARTIAL: u8 = 2;
/// Exit code: interrupted by a signal.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Sync Dovecot Maildir storage directly on the filesystem, keeping UIDs, UIDVALIDITY,
/// mailbox GUIDs, flags and keywords.
#[derive(Debug, Parser)]
#[command(name = "mdsync", version, about, long_about = None)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make DST equal to SRC as Dovecot sees it (one-way; extra mail on DST is removed).
    Backup(Box<BackupArgs>),
    /// Merge changes made on both A and B since their last sync (two-way, master-master).
    Sync(Box<SyncArgs>),
    /// Print what the scanner sees in a Maildir tree.
    Scan(ScanArgs),
    /// Serve a replica on stdin/stdout for a remote mdsync (started by it through ssh).
    Serve(ServeArgs),
    /// Mirror SRC to DST continuously: one backup, then every change within a second.
    Watch(Box<watch::WatchArgs>),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Serve only this directory and what lies below it (the same as --root).
    #[arg(value_name = "PATH", conflicts_with = "root")]
    path: Option<PathBuf>,
    /// Only serve paths inside this directory (for an ssh forced-command key).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Do not use or write the scan cache.
    #[arg(long)]
    no_cache: bool,
    /// Where scan caches live (default: $XDG_CACHE_HOME/mdsync or ~/.cache/mdsync).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct BackupArgs {
    /// Source Maildir root: PATH, [USER@]HOST:PATH or ssh://[USER@]HOST[:PORT]/PATH.
    src: String,
    /// Destination Maildir root (created when missing), local or remote like SRC.
    dst: String,
    #[command(flatten)]
    o: RunArgs,
}

#[derive(Debug, clap::Args)]
struct SyncArgs {
    /// One Maildir root: PATH, [USER@]HOST:PATH or ssh://[USER@]HOST[:PORT]/PATH.
    a: String,
    /// The other Maildir root (created when missing), local or remote like A.
    b: String,
    #[command(flatten)]
    o: RunArgs,
}

/// Options shared by `backup` and `sync`.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Print the plan, change nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Itemize every change (copy, flags, move, expunge, create, delete).
    #[arg(short, long)]
    verbose: bool,
    /// Print a JSON report on stdout at the end.
    #[arg(long)]
    json: bool,
    /// No progress bar or periodic progress lines.
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    mirror: MirrorArgs,
}

/// What a backup and a watch share: what to mirror and how to write it.
#[derive(Debug, clap::Args)]
struct MirrorArgs {
    /// Leave mailboxes matching this glob (e.g. 'Junk', 'Archive/*') alone on both sides.
    #[arg(long, value_name = "MAILBOX-GLOB")]
    exclude: Vec<String>,
    /// When to fsync: batch (one filesystem sync per mailbox), file (every file), none.
    #[arg(long, value_enum, default_value_t = FsyncArg::Batch)]
    fsync: FsyncArg,
    /// Allow expunging more than half of a side (DST): a count (500) or a percentage (80%).
    #[arg(long, value_name = "N|P%")]
    max_delete: Option<String>,
    /// Compare every message by content hash (xxh3-128), not only by GUID.
    #[arg(long)]
    checksum: bool,
    /// Owner of everything created on DST (default: the source's owner when run as root).
    #[arg(long, value_name = "USER:GROUP")]
    chown: Option<String>,
    /// Folder layout of both trees.
    #[arg(long, value_enum, default_value_t = LayoutArg::Auto)]
    layout: LayoutArg,
    /// Do not use or write the scan cache (list every mailbox).
    #[arg(long)]
    no_cache: bool,
    /// Where scan caches live (default: $XDG_CACHE_HOME/mdsync or ~/.cache/mdsync).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Format of a new destination: maildir (default), or mdbox (DST must be absent or
    /// empty; needs --offline).
    #[arg(long, value_enum, default_value_t = FormatArg::Maildir)]
    to_format: FormatArg,
    /// Assert that no Dovecot uses DST for the run (required to write mdbox).
    #[arg(long)]
    offline: bool,
    /// Wait this long for another mdsync run that is writing the same tree, then stop.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    lock_wait: u64,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    Maildir,
    Mdbox,
}

/// How to reach a remote side.
#[derive(Debug, clap::Args)]
struct RemoteArgs {
    /// The ssh command for remote locations, with its options (like rsync's -e).
    #[arg(short = 'e', long = "rsh", value_name = "CMD", default_value = "ssh")]
    rsh: String,
    /// The mdsync binary on the remote host.
    #[arg(long, value_name = "PATH", default_value = "mdsync")]
    remote_mdsync: String,
    /// zstd level for message bodies and tables on the wire (1-19).
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..=19))]
    compress_level: i32,
    /// Send bodies and tables uncompressed.
    #[arg(long)]
    no_compress: bool,
    /// Limit the sending rate on the wire, both ways: KiB/s, or with a K, M or G suffix.
    #[arg(long, value_name = "RATE")]
    bwlimit: Option<String>,
    /// Most message bytes held in memory so that writing overlaps other work (a sync's two
    /// sides, a far side's receiving and writing): a size with a K, M or G suffix; 0 streams
    /// every body straight to disk.
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    read_ahead: String,
    /// Give up when the far side sends nothing for this many seconds (0: never).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    timeout: u64,
    /// Testing: serve this local side through an in-process server (the real protocol).
    #[arg(long, value_name = "SIDE", hide = true)]
    via_pipe: Option<String>,
}

#[derive(Debug, clap::Args)]
struct ScanArgs {
    /// Maildir root.
    path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Folder layout.
    #[arg(long, value_enum, default_value_t = LayoutArg::Auto)]
    layout: LayoutArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FsyncArg {
    Batch,
    File,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LayoutArg {
    Auto,
    #[value(name = "maildir++")]
    MaildirPlusPlus,
    Fs,
}

impl LayoutArg {
    fn layout(self) -> Option<Layout> {
        match self {
            LayoutArg::Auto => None,
            LayoutArg::MaildirPlusPlus => Some(Layout::MaildirPlusPlus),
            LayoutArg::Fs => Some(Layout::Fs),
        }
    }
}

/// Parses the command line and runs it.
pub fn run() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if let Command::Watch(a) = args.command {
        // Watch handles its own signals: it finishes the batch in flight.
        return watch::run(*a);
    }
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, mdsync::interrupt::flag())
            .context("installing signal handlers")?;
    }
    match args.command {
        Command::Backup(a) => run_backup(*a),
        Command::Sync(a) => twoway::run(*a),
        Command::Scan(a) => scan_report::run(&a.path, a.layout.layout(), a.json),
        Command::Serve(a) => run_serve(a),
        Command::Watch(_) => unreachable!("handled above"),
    }
}

fn run_serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    // Run locks live in the cache directory also with `--no-cache`.
    let lock_dir = a.cache_dir.or_else(mdsync::scan::cache::default_cache_dir);
    let options = mdsync::serve::ServeOptions {
        root: a.root.or(a.path),
        cache_dir: lock_dir.clone().filter(|_| !a.no_cache),
        lock_dir,
        ..Default::default()
    };
    // Errors went to the client as an Error frame; stderr reaches the user through ssh too.
    mdsync::transport::widen_pipe(&std::io::stdin());
    mdsync::transport::widen_pipe(&std::io::stdout());
    mdsync::serve::serve(
        Box::new(std::io::stdin()),
        Box::new(std::io::stdout()),
        &options,
    )
    .context("serve")?;
    Ok(ExitCode::SUCCESS)
}

/// Whether a run writes to a side: an mdbox side that is written needs `--offline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Only read (a backup's source).
    Read,
    /// Written (a backup's destination, either side of a sync).
    Write,
}

/// Opens one side of a run: a local directory, the same through an in-process server
/// (`--via-pipe`, for tests), or a remote host through ssh.
/// `claim`: the run will write this side, so it holds the tree's run lock (here, or on
/// the far side for the session) for as long as the replica lives.
fn open_replica(
    text: &str,
    side: &str,
    access: Access,
    a: &MirrorArgs,
    (verbose, claim): (bool, bool),
) -> anyhow::Result<(Box<dyn Replica>, Option<PathBuf>)> {
    if let Some((replica, path)) = open_remote(text, side, a, verbose, claim)? {
        if path.is_none() && side == "src" && !replica.is_dir()? {
            bail!("{}: source is not a directory", replica.location());
        }
        return Ok((Box::new(replica), path));
    }
    match parse_location(text).map_err(anyhow::Error::msg)? {
        Location::Local(path) => {
            let lock = match claim {
                true => claim_local(&path, a)?,
                false => None,
            };
            Ok((open_local(&path, access, a.offline, lock)?, Some(path)))
        }
        Location::Remote(_) => unreachable!("remote sides are opened by open_remote"),
    }
}

/// The run lock of a local tree the run will write. A lock that cannot be taken at all (an
/// unwritable cache directory) is warned about, and the run goes on without it.
fn claim_local(path: &Path, a: &MirrorArgs) -> anyhow::Result<Option<RunLock>> {
    let Some(lock_dir) = lock_dir(a) else {
        return Ok(None);
    };
    match RunLock::acquire(&lock_dir, path, Duration::from_secs(a.lock_wait)) {
        Ok(lock) => Ok(Some(lock)),
        Err(unavailable @ LockError::Unavailable { .. }) => {
            eprintln!("mdsync: warning: {unavailable}; going on without it");
            Ok(None)
        }
        Err(refused) => Err(refused.into()),
    }
}

/// A side on this host: an mdbox tree (read-only unless written with `--offline`, since
/// mdsync takes none of Dovecot's index locks) or a Maildir tree, holding `lock` if given.
fn open_local(
    path: &Path,
    access: Access,
    offline: bool,
    lock: Option<RunLock>,
) -> anyhow::Result<Box<dyn Replica>> {
    if !mdbox_layout::is_mdbox(path) {
        return Ok(Box::new(LocalReplica::new(path).holding(lock)));
    }
    let replica = match access {
        Access::Write if !offline => bail!(
            "{}: writing into an mdbox tree needs --offline: mdsync takes none of \
             Dovecot's index locks, so no Dovecot may use it during the run",
            path.display()
        ),
        Access::Write => MdboxReplica::offline(path),
        Access::Read => MdboxReplica::new(path),
    };
    Ok(Box::new(replica.holding(lock)))
}

/// Side `text` as a remote replica when it is one: a remote host through ssh, or a local
/// path served through an in-process server (`--via-pipe SIDE`, for tests; the path comes
/// back with it). `None` for a plain local side.
fn open_remote(
    text: &str,
    side: &str,
    a: &MirrorArgs,
    verbose: bool,
    claim: bool,
) -> anyhow::Result<Option<(RemoteReplica, Option<PathBuf>)>> {
    let location = parse_location(text).map_err(anyhow::Error::msg)?;
    let r = &a.remote;
    let remote_options = RemoteOptions {
        compress_level: (!r.no_compress).then_some(r.compress_level),
        bwlimit: match &r.bwlimit {
            Some(text) => parse_size("--bwlimit", text, 'K')?,
            None => 0,
        },
        timeout: (r.timeout > 0).then(|| Duration::from_secs(r.timeout)),
        use_cache: !a.no_cache,
        cache_dir: cache_dir(a),
        verbose,
        offline: a.offline,
        lock_wait: claim.then(|| Duration::from_secs(a.lock_wait)),
    };
    match location {
        Location::Local(path) if r.via_pipe.as_deref() == Some(side) => {
            let channel = transport::spawn_in_process(mdsync::serve::ServeOptions {
                root: None,
                cache_dir: cache_dir(a),
                lock_dir: lock_dir(a),
                ..Default::default()
            })?;
            let path_text = path.to_str().context("a --via-pipe path must be UTF-8")?;
            let replica = RemoteReplica::connect(channel, "pipe", path_text, &remote_options);
            Ok(Some((replica, Some(path))))
        }
        Location::Local(_) => Ok(None),
        Location::Remote(spec) => {
            let options = ConnectOptions {
                rsh: r.rsh.clone(),
                remote_mdsync: r.remote_mdsync.clone(),
            };
            let channel = transport::spawn_ssh(&spec, &options)
                .with_context(|| format!("connecting to {}", spec.display()))?;
            let replica =
                RemoteReplica::connect(channel, &spec.user_host, &spec.path, &remote_options);
            Ok(Some((replica, None)))
        }
    }
}

/// Where run locks live: the cache directory, also with `--no-cache` (`None`: no
/// `--cache-dir`, and neither `$XDG_CACHE_HOME` nor `$HOME` is set).
fn lock_dir(a: &MirrorArgs) -> Option<PathBuf> {
    a.cache_dir
        .clone()
        .or_else(mdsync::scan::cache::default_cache_dir)
}

/// Where scan caches, pair states and table baselines live; `None` with `--no-cache`.
fn cache_dir(a: &MirrorArgs) -> Option<PathBuf> {
    lock_dir(a).filter(|_| !a.no_cache)
}

/// The path of a side on this host; `None` for a remote one (or an unparsable location,
/// which opening it reports).
fn local_path(text: &str) -> Option<PathBuf> {
    match parse_location(text) {
        Ok(Location::Local(path)) => Some(path),
        _ => None,
    }
}

/// rsync-style sizes and rates for `flag`: K, M and G suffixes (powers of 1024); a plain
/// number counts in `plain` units (`'K'` for `--bwlimit`'s KiB/s, `'B'` for bytes).
fn parse_size(flag: &str, text: &str, plain: char) -> anyhow::Result<u64> {
    let bad = || format!("{flag} {text}: expected a number like 500, 800K or 10M");
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_uppercase()),
        _ => (text, plain),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => bail!(bad()),
    };
    let value: f64 = number.parse().with_context(bad)?;
    if !(value >= 0.0 && value.is_finite()) {
        bail!(bad());
    }
    Ok((value * (1u64 << shift) as f64) as u64)
}

fn run_backup(a: BackupArgs) -> anyhow::Result<ExitCode> {
    let dst_is_mdbox =
        matches!(parse_location(&a.dst), Ok(Location::Local(ref p)) if mdbox_layout::is_mdbox(p));
    if a.o.mirror.to_format == FormatArg::Mdbox && !dst_is_mdbox {
        return run_to_mdbox(a);
    }
    run_mirror(a)
}

/// `backup` into a destination of the format it has.
fn run_mirror(a: BackupArgs) -> anyhow::Result<ExitCode> {
    let options = backup_options(&a.o.mirror, a.o.dry_run)?;
    let outcome = run_pair(
        (&a.src, Access::Read),
        &a.dst,
        &a.o,
        |src, dst, progress| backup::backup(src, dst, &options, progress),
    )?;
    let Some(outcome) = outcome else {
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    report(&outcome, &a);
    Ok(exit_code(outcome.completion()))
}

/// The frame of a run between two replicas (`backup`, `sync`): refuses two remote sides,
/// opens both, refuses overlapping local trees and a first side that is not a directory,
/// runs `work` with a progress renderer, closes the sessions. `None`: interrupted (said on
/// stderr).
fn run_pair<T>(
    (first, first_access): (&str, Access),
    second: &str,
    o: &RunArgs,
    work: impl FnOnce(&dyn Replica, &dyn Replica, &output::Renderer) -> mdsync::Result<T>,
) -> anyhow::Result<Option<T>> {
    check_sides(first, second)?;
    // Before either side is opened (and its run lock taken): `sync X X` is an overlap, not
    // a run that waits for itself.
    check_paths(local_path(first).as_deref(), local_path(second).as_deref())?;
    // A dry run writes nothing, so it waits for no other run.
    let claim_first = first_access == Access::Write && !o.dry_run;
    let opened = open_replica(
        first,
        "src",
        first_access,
        &o.mirror,
        (o.verbose, claim_first),
    )
    .and_then(|x| {
        let y = open_replica(
            second,
            "dst",
            Access::Write,
            &o.mirror,
            (o.verbose, !o.dry_run),
        )?;
        Ok((x, y))
    });
    let ((x, _), (y, _)) = match opened {
        Err(_) if mdsync::interrupt::requested() => {
            eprintln!("mdsync: interrupted before anything was read or written");
            return Ok(None);
        }
        opened => opened?,
    };
    let show_progress = !o.no_progress && !o.dry_run;
    let progress = output::Renderer::new(o.verbose && !o.dry_run, o.json, show_progress);
    let outcome = work(x.as_ref(), y.as_ref(), &progress);
    progress.finish();
    let outcome = outcome.and_then(|outcome| {
        x.close()?;
        y.close()?;
        Ok(outcome)
    });
    let interrupted = matches!(outcome, Err(mdsync::Error::Interrupted))
        || (mdsync::interrupt::requested() && outcome.is_err());
    if interrupted {
        eprintln!("mdsync: interrupted; nothing half-done is visible, re-run to finish");
        return Ok(None);
    }
    Ok(Some(outcome?))
}

/// The exit code of a finished run.
fn exit_code(completion: Completion) -> ExitCode {
    match completion {
        Completion::Complete => ExitCode::SUCCESS,
        Completion::Partial => ExitCode::from(EXIT_PARTIAL),
        Completion::Errors => ExitCode::FAILURE,
    }
}

/// At most one side may be remote.
fn check_sides(src: &str, dst: &str) -> anyhow::Result<()> {
    let remote = |text| matches!(parse_location(text), Ok(Location::Remote(_)));
    if remote(src) && remote(dst) {
        bail!("both sides are remote; run mdsync on one of the two hosts");
    }
    Ok(())
}

/// Local sides must not overlap, and a local source must be a directory.
fn check_paths(src: Option<&Path>, dst: Option<&Path>) -> anyhow::Result<()> {
    if let (Some(src_path), Some(dst_path)) = (src, dst) {
        check_overlap(src_path, dst_path)?;
    }
    if let Some(src_path) = src
        && !src_path.is_dir()
    {
        bail!("{}: source is not a directory", src_path.display());
    }
    Ok(())
}

/// `backup --to-format mdbox`: the source scanned as for a Maildir destination, then
/// written as a whole new mdbox tree.
fn run_to_mdbox(a: BackupArgs) -> anyhow::Result<ExitCode> {
    if !a.o.mirror.offline {
        bail!(
            "--to-format mdbox needs --offline: mdsync does not take Dovecot's index locks, \
             so no Dovecot may use {} during the run",
            a.dst
        );
    }
    if a.o.dry_run {
        bail!("--dry-run is not supported with --to-format mdbox");
    }
    check_sides(&a.src, &a.dst)?;
    let remote_dst = open_remote(&a.dst, "dst", &a.o.mirror, a.o.verbose, true)?;
    if let Some((dst, _)) = &remote_dst
        && dst.is_mdbox()?
    {
        // An existing mdbox tree is updated, as a local one is. The session ends first:
        // its far side holds the tree's run lock until it exits.
        dst.close()?;
        drop(remote_dst);
        return run_mirror(a);
    }
    let (src, src_path) = open_replica(
        &a.src,
        "src",
        Access::Read,
        &a.o.mirror,
        (a.o.verbose, false),
    )?;
    let local_dst = local_path(&a.dst);
    // A destination served through the in-process pipe takes its lock in the server.
    let _dst_lock = match (&local_dst, &remote_dst) {
        (Some(path), None) => claim_local(path, &a.o.mirror)?,
        _ => None,
    };
    if let (Some(src_path), Some(dst_path)) = (&src_path, &local_dst) {
        check_overlap(src_path, dst_path)?;
    }
    let options = backup_options(&a.o.mirror, a.o.dry_run)?;
    let layout = match options.scan.layout {
        Some(layout) => layout,
        None => src.detect_layout()?.unwrap_or(Layout::MaildirPlusPlus),
    };
    let scan = ScanOptions {
        layout: Some(layout),
        ..options.scan.clone()
    };
    let progress = output::Renderer::new(false, a.o.json, !a.o.no_progress);
    let table = src.scan(&scan, &progress)?;
    let report = match (&remote_dst, &local_dst) {
        (Some((dst, _)), _) => dst.write_new_mdbox(&table, src.as_ref(), &progress),
        (None, Some(dst)) => {
            mdsync::sync::mdbox_new::write_new_tree(dst, &table, src.as_ref(), &progress)
        }
        (None, None) => unreachable!("a destination is local or remote"),
    };
    progress.finish();
    let report = report?;
    src.close()?;
    if let Some((dst, _)) = &remote_dst {
        dst.close()?;
    }
    if a.o.json {
        println!(
            "{}",
            serde_json::json!({
                "format": "mdbox",
                "mailboxes_created": report.mailboxes,
                "messages_copied": report.messages,
                "bytes_copied": report.bytes,
                "files": report.files,
                "seconds": report.seconds,
            })
        );
    } else {
        println!(
            "mdsync: {} messages ({} bytes) in {} mailboxes written as mdbox ({} m.N files) in {:.2} s",
            report.messages, report.bytes, report.mailboxes, report.files, report.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn backup_options(a: &MirrorArgs, dry_run: bool) -> anyhow::Result<BackupOptions> {
    let exclude = a
        .exclude
        .iter()
        .map(|g| glob::Pattern::new(g).with_context(|| format!("--exclude {g}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(BackupOptions {
        scan: ScanOptions {
            layout: a.layout.layout(),
            exclude,
            cache_dir: cache_dir(a),
            ..ScanOptions::default()
        },
        diff: DiffOptions {
            checksum: a.checksum,
            fresh_name_prefix: fresh_name_prefix(),
        },
        apply: ApplyOptions {
            fsync: match a.fsync {
                FsyncArg::Batch => FsyncPolicy::Batch,
                FsyncArg::File => FsyncPolicy::File,
                FsyncArg::None => FsyncPolicy::None,
            },
            ownership: ownership(a.chown.as_deref())?,
            read_ahead: parse_size("--read-ahead", &a.remote.read_ahead, 'B')?,
        },
        dry_run,
        state_dir: cache_dir(a),
        max_delete: match &a.max_delete {
            Some(text) => parse_delete_limit(text)?,
            None => DeleteLimit::default(),
        },
    })
}

/// A Dovecot-style unique base prefix: `<secs>.M<usecs>P<pid>.<host>`-like, so Dovecot sorts
/// it sensibly.
fn fresh_name_prefix() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.M{}P{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id()
    )
}

fn ownership(chown: Option<&str>) -> anyhow::Result<Ownership> {
    if let Some(spec) = chown {
        let (user, group) = spec
            .split_once(':')
            .with_context(|| format!("--chown {spec}: expected USER:GROUP"))?;
        let uid = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
            .or_else(|| user.parse().ok())
            .with_context(|| format!("--chown: no such user {user}"))?;
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
            .or_else(|| group.parse().ok())
            .with_context(|| format!("--chown: no such group {group}"))?;
        return Ok(Ownership::Fixed(uid, gid));
    }
    Ok(if nix::unistd::geteuid().is_root() {
        Ownership::FromSource
    } else {
        Ownership::RunningUser
    })
}

fn parse_delete_limit(text: &str) -> anyhow::Result<DeleteLimit> {
    let bad = || format!("--max-delete {text}: expected a count (500) or a percentage (80%)");
    match text.strip_suffix('%') {
        Some(p) => {
            let p: u64 = p.parse().with_context(bad)?;
            if p > 100 {
                bail!(bad());
            }
            Ok(DeleteLimit::Percent(p))
        }
        None => Ok(DeleteLimit::Count(text.parse().with_context(bad)?)),
    }
}

fn report(outcome: &BackupOutcome, a: &BackupArgs) {
    for s in &outcome.skipped {
        eprintln!(
            "mdsync: {}",
            output::skip_line(&join(&a.src, &s.path), s, output::RERUN)
        );
    }
    for w in &outcome.warnings {
        eprintln!("mdsync: warning: {}: {}", join(&a.src, &w.path), w.why);
    }
    for (e, repeats) in collapse_repeats(&outcome.report.errors) {
        match repeats {
            0 => eprintln!("mdsync: error: {e}"),
            n => eprintln!("mdsync: error: {e} (and {n} more times)"),
        }
    }
    if outcome.report.vanished > 0 {
        eprintln!(
            "mdsync: {} messages changed on the source during the run; re-run to finish",
            outcome.report.vanished
        );
    }
    if a.o.dry_run && !a.o.json {
        for line in &outcome.plan_lines {
            println!("{line}");
        }
    }
    if a.o.json {
        println!("{}", output::json_report(outcome, a.o.dry_run));
    } else if !a.o.dry_run && (a.o.verbose || !a.o.no_progress) {
        eprintln!("{}", output::summary_line(outcome));
    }
}

/// Runs of identical messages as one message and how often it repeated after the first: a
/// connection lost in the middle of a pull fails every body still to come the same way.
fn collapse_repeats(lines: &[String]) -> Vec<(&str, usize)> {
    let mut out: Vec<(&str, usize)> = Vec::new();
    for line in lines {
        match out.last_mut() {
            Some((last, repeats)) if *last == line.as_str() => *repeats += 1,
            _ => out.push((line.as_str(), 0)),
        }
    }
    out
}

fn join(root: &str, rel: &str) -> String {
    if rel.is_empty() {
        root.to_string()
    } else {
        Path::new(root).join(rel).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_takes_its_root_as_a_path_or_an_option_not_both() {
        assert!(Args::try_parse_from(["mdsync", "serve", "/srv/mail"]).is_ok());
        assert!(Args::try_parse_from(["mdsync", "serve", "--root", "/srv/mail"]).is_ok());
        assert!(Args::try_parse_from(["mdsync", "serve", "/a", "--root", "/b"]).is_err());
    }

    #[test]
    fn repeated_errors_are_collapsed() {
        let lines: Vec<String> = ["a", "b", "b", "b", "a"].map(String::from).to_vec();
        assert_eq!(collapse_repeats(&lines), vec![("a", 0), ("b", 2), ("a", 0)]);
    }

    #[test]
    fn sizes_and_rates_parse_like_rsync() {
        let rate = |text| parse_size("--bwlimit", text, 'K');
        assert_eq!(rate("100").unwrap(), 100 << 10);
        assert_eq!(rate("2M").unwrap(), 2 << 20);
        assert_eq!(rate("1.5k").unwrap(), 1536);
        assert!(rate("fast").is_err());
        assert!(rate("-1").is_err());
        let size = |text| parse_size("--read-ahead", text, 'B');
        assert_eq!(size("0").unwrap(), 0);
        assert_eq!(size("4096").unwrap(), 4096);
        assert_eq!(size("64M").unwrap(), 64 << 20);
    }

    #[test]
    fn delete_limits_parse() {
        assert_eq!(parse_delete_limit("80%").unwrap(), DeleteLimit::Percent(80));
        assert_eq!(parse_delete_limit("12").unwrap(), DeleteLimit::Count(12));
        assert!(parse_delete_limit("101%").is_err());
        assert!(parse_delete_limit("lots").is_err());
    }

    #[test]
    fn args_parse() {
        Args::try_parse_from([
            "mdsync",
            "backup",
            "-n",
            "-v",
            "--exclude",
            "Junk",
            "a",
            "b",
        ])
        .unwrap();
        assert!(Args::try_parse_from(["mdsync", "backup", "a"]).is_err());
    }
}
