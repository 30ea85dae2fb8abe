//! `mdsync serve`: the far side of a remote replica. Speaks the protocol on a byte stream
//! (ssh's stdin and stdout), and runs this machine's scanner, hasher and applier for the
//! brain on the other end. Never decides what to change — it carries out the plans it is
//! sent — and never touches a path outside its root.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::model::Subdir;
use crate::progress::{Event, Progress};
use crate::replica::baseline::{Baselines, parse_id};
use crate::replica::local::{LocalReplica, resolve};
use crate::replica::mdbox::MdboxReplica;
use crate::replica::remote::send_body;
use crate::replica::spool::Spool;
use crate::replica::{Body, BodyData, BodyError, BodySource, Replica};
use crate::runlock::{self, LockError, RunLock};
use crate::scan::ScanOptions;
use crate::storage::maildir::layout::Layout;
use crate::storage::maildir::writer::Ownership;
use crate::sync::apply::ApplyOptions;
use crate::sync::plan::Plan;
use crate::table::{MailTable, MailboxTable};
use crate::wire::codec;
use crate::wire::conn::{
    BodyReader, BodyStatus, FrameReader, FrameWriter, Inbox, MAX_OBJECT, Stats, WireError,
};
use crate::wire::frame::Kind;
use crate::wire::hello::{
    CAP_APPLY_SENDS, CAP_HASH, CAP_NEW_MDBOX, CAP_RESCAN_MANY, CAP_ROW_DELTA, CAP_ZSTD, Hello,
};
use crate::wire::messages::{Answer, Request, RootFacts, StoreFormat, WireEvent};
use crate::wire::table::{self as wire_table, Shipped};

/// Most mailboxes one `RescanMany` may name.
pub const MAX_RESCAN: usize = 65_536;

/// Most mailboxes one `NewMdbox` may send.
pub const MAX_NEW_MAILBOXES: usize = 1 << 20;

/// How the server may be used.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Only paths inside this directory may be opened (for forced-command ssh keys).
    pub root: Option<PathBuf>,
    /// The server's scan cache directory; `None` disables it.
    pub cache_dir: Option<PathBuf>,
    /// Where run locks live (the cache directory, also with `--no-cache`); `None`: the
    /// server takes no run lock.
    pub lock_dir: Option<PathBuf>,
    /// Capabilities not offered (`wire::hello::CAP_*` bits): lets tests stand in for an
    /// older server.
    #[doc(hidden)]
    pub withheld_caps: u64,
}

/// Serves one session on `input`/`output` until the client says goodbye. A protocol
/// violation or a failure that ends the request is sent to the client as `Error` and
/// returned.
pub fn serve(
    input: Box<dyn Read + Send>,
    output: Box<dyn Write + Send>,
    options: &ServeOptions,
) -> Result<(), WireError> {
    let stats = Arc::new(Stats::default());
    let reader = FrameReader::new(input, stats.clone());
    let writer = FrameWriter::new(output, stats);
    let mut session = Session {
        inbox: Mutex::new(Inbox::new(reader)),
        out: Arc::new(Mutex::new(writer)),
        options,
        replica: None,
        baselines: Baselines::new(None, ""),
        unkept: Mutex::new(None),
        touched: Mutex::new(HashSet::new()),
        verbose: false,
        use_cache: false,
        offline: false,
        row_deltas: false,
        keepalive_ms: Arc::new(AtomicU64::new(0)),
        run_lock: Mutex::new(None),
        lock_warning: Mutex::new(None),
    };
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let ticker = keepalive(session.out.clone(), session.keepalive_ms.clone(), stopped);
    let result = session.run();
    // Wakes the ticker at once: the session's end must not wait out its sleep.
    drop(stop);
    let _ = ticker.map(|t| t.join());
    if let Err(e) = &result
        && !matches!(e, WireError::Remote(_))
        && let Ok(mut out) = session.out.lock()
    {
        let _ = out.error(&e.to_string());
    }
    result
}

/// Sends an empty event every `interval_ms` (once the client set it) until `stopped`
/// disconnects. Never inside a body stream or an object: those are written under the
/// writer's lock.
fn keepalive(
    out: Arc<Mutex<FrameWriter>>,
    interval_ms: Arc<AtomicU64>,
    stopped: std::sync::mpsc::Receiver<()>,
) -> Option<std::thread::JoinHandle<()>> {
    use std::sync::mpsc::RecvTimeoutError;
    std::thread::Builder::new()
        .name("mdsync-keepalive".into())
        .spawn(move || {
            let mut last = Instant::now();
            while let Err(RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(100))
            {
                let every = interval_ms.load(Ordering::Relaxed);
                if every > 0 && last.elapsed() >= Duration::from_millis(every) {
                    let idle = WireEvent::Progressed {
                        operations: 0,
                        bytes: 0,
                    };
                    let _ = locked(&out).json(Kind::Event, &idle);
                    last = Instant::now();
                }
            }
        })
        .ok()
}

struct Session<'a> {
    inbox: Mutex<Inbox>,
    out: Arc<Mutex<FrameWriter>>,
    /// Keepalive interval the client asked for (ms; 0 = none).
    keepalive_ms: Arc<AtomicU64>,
    options: &'a ServeOptions,
    replica: Option<Served>,
    baselines: Baselines,
    /// The last whole scan, its listed mailboxes not yet in the scan cache: kept once the
    /// plan that follows it is known (not the mailboxes it writes), or at `Bye`.
    unkept: Mutex<Option<(ScanOptions, MailTable)>>,
    /// Mailboxes the session's plans touched since that scan.
    touched: Mutex<HashSet<String>>,
    verbose: bool,
    use_cache: bool,
    /// The client asserted that no Dovecot uses the replica (`--offline`).
    offline: bool,
    /// Tables go as row deltas (`CAP_ROW_DELTA` agreed), else as zstd deltas.
    row_deltas: bool,
    /// The run lock of the open tree, when the client will write it.
    run_lock: Mutex<Option<RunLock>>,
    /// Why the run lock could not be taken, told the client with the next scan.
    lock_warning: Mutex<Option<String>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Session<'_> {
    fn run(&mut self) -> Result<(), WireError> {
        self.handshake()?;
        loop {
            let payload = locked(&self.inbox).reader.expect(Kind::Request)?;
            let request: Request = FrameReader::json(&payload)?;
            match request {
                Request::Open {
                    path,
                    bwlimit,
                    use_cache,
                    verbose,
                    keepalive_ms,
                    offline,
                    lock_wait_ms,
                    compress_level,
                } => {
                    self.keepalive_ms.store(
                        keepalive_ms.max(100 * u64::from(keepalive_ms > 0)),
                        Ordering::Relaxed,
                    );
                    let how = OpenHow {
                        bwlimit,
                        use_cache,
                        verbose,
                        offline,
                        lock_wait: lock_wait_ms
                            .map(|ms| Duration::from_millis(ms).min(runlock::MAX_WAIT)),
                        compress_level: compress_level.map(|level| level.clamp(1, 19)),
                    };
                    self.open(&path, how)?
                }
                Request::Bye => {
                    rayon::join(|| self.baselines.persist(), || self.keep_scan(None));
                    locked(&self.out).json(Kind::Answer, &Answer::Bye)?;
                    return Ok(());
                }
                other => self.handle(other)?,
            }
        }
    }

    fn handshake(&mut self) -> Result<(), WireError> {
        let payload = locked(&self.inbox).reader.expect(Kind::Hello)?;
        let theirs = Hello::decode(&payload).map_err(|e| WireError::protocol(e.to_string()))?;
        let all =
            CAP_ZSTD | CAP_HASH | CAP_RESCAN_MANY | CAP_NEW_MDBOX | CAP_APPLY_SENDS | CAP_ROW_DELTA;
        let ours = Hello::ours(all & !self.options.withheld_caps);
        let mut out = locked(&self.out);
        out.frame(Kind::Hello, &ours.encode())?;
        out.flush()?;
        let shared = ours
            .agree(&theirs)
            .map_err(|e| WireError::protocol(e.to_string()))?;
        let zstd = shared & CAP_ZSTD != 0;
        self.row_deltas = shared & CAP_ROW_DELTA != 0;
        locked(&self.inbox).reader.set_zstd(zstd);
        out.set_zstd(zstd.then_some(3));
        Ok(())
    }

    fn open(&mut self, path: &str, how: OpenHow) -> Result<(), WireError> {
        // A scan of the replica open so far belongs in that replica's cache.
        self.keep_scan(None);
        let resolved = resolve_path(path, self.options.root.as_deref())
            .map_err(|why| WireError::protocol(format!("{path}: {why}")))?;
        let location = resolved.display().to_string();
        let is_dir = std::fs::metadata(&resolved).is_ok_and(|m| m.is_dir());
        // Taken before anything is read: a run still writing the tree (the far side of an
        // interrupted one) finishes first. The lock of a tree opened before goes.
        *locked(&self.run_lock) = None;
        if let Some(wait) = how.lock_wait {
            self.hold_run_lock(&resolved, wait)?;
        }
        self.baselines = Baselines::new(
            self.options.cache_dir.as_deref().filter(|_| how.use_cache),
            &format!("served:{location}"),
        );
        let served = Served::open(resolved, how.offline);
        let answer = Answer::Opened {
            location,
            is_dir,
            format: served.format(),
            read_only: served.read_only(),
        };
        self.replica = Some(served);
        self.verbose = how.verbose;
        self.use_cache = how.use_cache;
        self.offline = how.offline;
        let mut out = locked(&self.out);
        out.set_bwlimit(how.bwlimit);
        if let Some(level) = how.compress_level {
            // A second `Open` after bodies were sent keeps the level already streaming.
            out.set_zstd_level(level);
        }
        out.json(Kind::Answer, &answer)?;
        Ok(())
    }

    /// Holds the run lock of `root` for the rest of the session, waiting up to `wait` for
    /// another run. A lock file that cannot be made is no error: the client is told with
    /// the next scan or new-mdbox write.
    fn hold_run_lock(&self, root: &Path, wait: Duration) -> Result<(), WireError> {
        let mut held = locked(&self.run_lock);
        let Some(lock_dir) = self.options.lock_dir.as_deref().filter(|_| held.is_none()) else {
            return Ok(());
        };
        match RunLock::acquire(lock_dir, root, wait) {
            Ok(lock) => *held = Some(lock),
            Err(unavailable @ LockError::Unavailable { .. }) => {
                *locked(&self.lock_warning) = Some(format!("{unavailable}; going on without it"))
            }
            Err(refused) => return Err(WireError::Failed(refused.to_string())),
        }
        Ok(())
    }

    /// Tells the client, once, why the run lock could not be taken.
    fn warn_about_the_lock(&self, progress: &dyn Progress) {
        if let Some(message) = locked(&self.lock_warning).take() {
            progress.event(Event::Warning { message });
        }
    }

    fn replica(&self) -> Result<&Served, WireError> {
        self.replica
            .as_ref()
            .ok_or_else(|| WireError::protocol("no replica is open"))
    }

    fn handle(&self, request: Request) -> Result<(), WireError> {
        let served = self.replica()?;
        let replica = served.replica();
        let progress = WireProgress::new(&self.out, self.verbose);
        match request {
            Request::DetectLayout => {
                let layout = replica.detect_layout().map_err(|e| self.fatal(e))?;
                locked(&self.out).json(Kind::Answer, &Answer::Layout { layout })?;
            }
            Request::Scan {
                layout,
                exclude,
                unchanged_if,
                baselines,
            } => {
                let options = ScanOptions {
                    layout,
                    exclude: compile_globs(&exclude)?,
                    cache_dir: self.options.cache_dir.clone().filter(|_| self.use_cache),
                    unchanged_if: unchanged_if
                        .into_iter()
                        .map(|(dir, stamps, count)| (dir, (stamps, count)))
                        .collect(),
                    // Not while the client waits for the tables: see `keep_scan`.
                    defer_cache_writes: true,
                };
                self.keep_scan(None);
                locked(&self.touched).clear();
                self.warn_about_the_lock(&progress);
                let table = replica
                    .scan(&options, &progress)
                    .map_err(|e| self.fatal(e))?;
                progress.flush();
                let client: HashMap<String, u128> = baselines
                    .into_iter()
                    .filter_map(|(dir, id)| Some((dir, parse_id(&id)?)))
                    .collect();
                let objects: Vec<Vec<u8>> = table
                    .mailboxes
                    .par_iter()
                    .map(|m| self.ship(m, client.get(&m.dir).copied()))
                    .collect();
                // As the client does: the baselines of mailboxes gone since are dropped.
                let scanned = table.mailboxes.iter().map(|m| m.dir.as_str()).collect();
                self.baselines.prune(&scanned);
                let mut out = locked(&self.out);
                for object in &objects {
                    out.object(object)?;
                }
                let answer = Answer::ScanEnd {
                    mailboxes: table.mailboxes.len() as u32,
                    root: RootFacts::of(&table),
                };
                out.json(Kind::Answer, &answer)?;
                *locked(&self.unkept) = Some((options, table));
            }
            Request::Rescan {
                layout,
                dir,
                baseline,
            } => self.rescan(served, layout, &[(dir, baseline)])?,
            Request::RescanMany { layout, mailboxes } => {
                if mailboxes.len() > MAX_RESCAN {
                    return Err(WireError::protocol(format!(
                        "{} mailboxes in one rescan (at most {MAX_RESCAN})",
                        mailboxes.len()
                    )));
                }
                self.rescan(served, layout, &mailboxes)?
            }
            Request::Hashes => {
                let keys = self.read_keys(served)?;
                let answers = replica.content_hashes(&keys);
                let mut out = locked(&self.out);
                out.json(Kind::Answer, &Answer::Hashes)?;
                out.object(&codec::encode_hashes(&answers))?;
                out.flush()?;
            }
            Request::Bodies => {
                let keys = self.read_keys(served)?;
                self.send_bodies(replica, &keys, None)?;
            }
            Request::Apply { options, also_send } => {
                let plan_bytes = locked(&self.inbox).reader.object()?;
                let mut plan: Plan = FrameReader::json(&plan_bytes)?;
                codec::check_plan(&plan)?;
                codec::tame_plan(&mut plan);
                let dirs = plan
                    .mailboxes
                    .iter()
                    .map(|m| &m.dir)
                    .chain(plan.delete_mailboxes.iter().map(|d| &d.dir))
                    .chain(&plan.create_parents)
                    .chain(&plan.remove_parents)
                    .chain(&plan.sweep)
                    .chain(
                        plan.rename_mailboxes
                            .iter()
                            .flat_map(|r| [&r.from_dir, &r.to_dir]),
                    );
                if let Some(why) = served.read_only() {
                    return Err(WireError::Failed(why));
                }
                // A client that did not ask for the run lock at `Open` (an older one) writes
                // only while no other run holds it.
                self.hold_run_lock(served.root(), Duration::ZERO)?;
                for dir in dirs {
                    served.check_dir(None, dir)?;
                }
                // The bodies the client asked for with the plan are sent while the plan's
                // own bodies arrive; the key list is read whole first, as for `Bodies`.
                let to_send = match also_send {
                    true => self.read_keys(served)?,
                    false => Vec::new(),
                };
                let copies = plan.mailboxes.iter().map(|m| m.copies.len()).sum();
                locked(&self.inbox).expect_bodies(copies);
                let options = ApplyOptions {
                    ownership: ownership_here(options.ownership),
                    ..options
                };
                let source = StreamSource { inbox: &self.inbox };
                // The scan's mailboxes the plan leaves alone go into the scan cache while
                // the applier's closing sync waits for the disk.
                let keep = || self.keep_scan(Some(&plan));
                // Bodies that fit the read-ahead limit are received into a spool by a
                // thread of their own while the applier stages, in parallel, those already
                // in: the stream never waits on a disk write, nor the writes on the whole
                // stream. Larger plans are staged as their bodies arrive.
                let spool =
                    Spool::reads_ahead(plan.counts().bytes, options.read_ahead).then(|| {
                        let keys = crate::sync::apply::copy_keys(&plan);
                        (Spool::expecting(&keys), keys)
                    });
                let apply = |sender_holds_the_writer: Option<Receiver<()>>| {
                    // All of the `Bodies` answer goes out before any of the apply's: its
                    // sender holds the writer until it is done, so the apply may start
                    // once it has it. Neither plan of a sync touches a file the other
                    // copies, so the files sent are not those the apply writes.
                    if let Some(held) = sender_holds_the_writer {
                        let _ = held.recv();
                    }
                    let bodies: &dyn BodySource = match &spool {
                        Some((spool, _)) => spool,
                        None => &source,
                    };
                    replica
                        .apply_overlapping(&plan, bodies, &options, &progress, &keep)
                        .map_err(|e| self.fatal(e))
                };
                // The next baselines are worked out while the plan is applied.
                let (report, predicted) = std::thread::scope(|scope| {
                    let filling = spool
                        .as_ref()
                        .map(|(spool, keys)| scope.spawn(|| spool.fill_from(&source, keys)));
                    let (sending, held) = match to_send.is_empty() {
                        true => (None, None),
                        false => {
                            let (holds, held) = std::sync::mpsc::channel();
                            let send = move || self.send_bodies(replica, &to_send, Some(holds));
                            (Some(scope.spawn(send)), Some(held))
                        }
                    };
                    let predicting = scope.spawn(|| self.baselines.predict(&plan));
                    let report = apply(held);
                    let sent = sending.map_or(Ok(Ok(())), |s| s.join());
                    let sent = sent
                        .map_err(|_| WireError::Failed("the body sender panicked".into()))
                        .and_then(|sent| sent);
                    // Every body is read off the stream, also after a failed apply.
                    let filled = filling.map_or(Ok(()), |f| f.join());
                    let report = filled
                        .map_err(|_| WireError::Failed("the body receiver panicked".into()))
                        .and(sent)
                        .and(report);
                    (report, predicting.join())
                });
                let report = report?;
                locked(&self.inbox).drain()?;
                self.baselines.stage_predicted(
                    predicted.map_err(|_| WireError::Failed("predicting panicked".into()))?,
                );
                progress.flush();
                locked(&self.out).json(Kind::Answer, &Answer::Applied { report })?;
                // Written now, while the client winds up, rather than when it says bye.
                self.baselines.persist();
            }
            Request::NewMdbox { mailboxes, root } => {
                self.hold_run_lock(served.root(), Duration::ZERO)?;
                self.warn_about_the_lock(&progress);
                let table = self.receive_tables(mailboxes, root)?;
                let report = self.new_mdbox(served, &table, &progress)?;
                progress.flush();
                let answer = Answer::NewMdboxWritten { report };
                locked(&self.out).json(Kind::Answer, &answer)?;
            }
            Request::Open { .. } | Request::Bye => unreachable!("handled by run"),
        }
        Ok(())
    }

    /// Reads mailboxes again and sends them in the order asked, then `Rescanned`. Every dir
    /// is checked before any is read: a bad one ends the session, and so does a dir named
    /// twice, since all tables are held until they are sent (one big mailbox named over
    /// and over would multiply its table in memory).
    fn rescan(
        &self,
        served: &Served,
        layout: Layout,
        mailboxes: &[(String, Option<String>)],
    ) -> Result<(), WireError> {
        let mut seen = HashSet::with_capacity(mailboxes.len());
        for (dir, _) in mailboxes {
            crate::wire::path::check_dir(dir).map_err(|e| WireError::protocol(e.to_string()))?;
            if !seen.insert(dir.as_str()) {
                return Err(WireError::protocol(format!(
                    "mailbox {dir:?} named twice in one rescan"
                )));
            }
            served.check_dir(Some(layout), dir)?;
        }
        let replica = served.replica();
        let tables: Vec<MailboxTable> = mailboxes
            .par_iter()
            .map(|(dir, _)| replica.rescan_mailbox(layout, dir))
            .collect();
        let mut out = locked(&self.out);
        for (table, (_, baseline)) in tables.iter().zip(mailboxes) {
            let client = baseline.as_deref().and_then(parse_id);
            out.object(&self.ship(table, client))?;
        }
        out.json(Kind::Answer, &Answer::Rescanned)?;
        Ok(())
    }

    /// A mailbox table as an object payload: a delta against the client's baseline when
    /// this side still holds the same one. What is sent becomes the baseline of both sides.
    fn ship(&self, table: &MailboxTable, client_baseline: Option<u128>) -> Vec<u8> {
        let encoding = wire_table::encode(table);
        if table.unchanged.is_some() {
            return Shipped::Whole(encoding).to_bytes();
        }
        let base = client_baseline.and_then(|id| {
            self.baselines
                .get(&table.dir)
                .filter(|b| wire_table::id_of(b) == id)
        });
        self.baselines.stage(&table.dir, encoding.clone());
        match self.row_deltas {
            true => Shipped::make_rows(encoding, base.as_deref()).to_bytes(),
            false => Shipped::make(encoding, base.as_deref()).to_bytes(),
        }
    }

    fn fatal(&self, e: crate::Error) -> WireError {
        WireError::Failed(e.to_string())
    }

    /// Reads the `count` whole mailbox tables that follow a `NewMdbox`, each checked as a
    /// scan's are, into one table with the root facts `root`.
    fn receive_tables(&self, count: u32, root: RootFacts) -> Result<MailTable, WireError> {
        let count = count as usize;
        if count > MAX_NEW_MAILBOXES {
            return Err(WireError::protocol(format!(
                "{count} mailboxes in one new tree (at most {MAX_NEW_MAILBOXES})"
            )));
        }
        let mut tables = Vec::with_capacity(count.min(1024));
        let mut received = 0usize;
        for _ in 0..count {
            let bytes = locked(&self.inbox).reader.object()?;
            received += bytes.len();
            if received > MAX_OBJECT {
                return Err(WireError::protocol("mailbox tables larger than 1 GiB"));
            }
            let encoding = Shipped::from_bytes(&bytes)?.resolve(None)?;
            tables.push(wire_table::decode(&encoding)?);
        }
        for dir in root.parents.iter().chain(&root.unfollowed) {
            crate::wire::path::check_dir(dir).map_err(|e| WireError::protocol(e.to_string()))?;
        }
        let mut root = root;
        root.root_meta.mode &= 0o1777;
        Ok(root.into_table(tables))
    }

    /// Writes a new mdbox tree at the opened path from `table`, its bodies streamed by the
    /// client; only when the client asserted `--offline`, and never at the served root
    /// itself (the tree is built beside its place, which would lie outside the root).
    fn new_mdbox(
        &self,
        served: &Served,
        table: &MailTable,
        progress: &WireProgress<'_>,
    ) -> Result<crate::sync::mdbox_new::NewTreeReport, WireError> {
        let path = served.root();
        if !self.offline {
            return Err(WireError::Failed(format!(
                "{}: writing a new mdbox tree needs --offline: mdsync takes none of Dovecot's \
                 index locks, so no Dovecot may use it during the run",
                path.display()
            )));
        }
        if let Some(root) = &self.options.root
            && std::fs::canonicalize(root).is_ok_and(|r| r == path)
        {
            return Err(WireError::Failed(format!(
                "{}: the served root itself; name a new directory below it",
                path.display()
            )));
        }
        let bodies = crate::sync::mdbox_new::body_keys(table).len();
        locked(&self.inbox).expect_bodies(bodies);
        let source = StreamSource { inbox: &self.inbox };
        let report = crate::sync::mdbox_new::write_new_tree(path, table, &source, progress)
            .map_err(|e| self.fatal(e))?;
        locked(&self.inbox).drain()?;
        Ok(report)
    }

    /// Reads the key list that follows a request, each key checked to name something
    /// inside the root without passing a symlink.
    fn read_keys(&self, served: &Served) -> Result<Vec<codec::Key>, WireError> {
        let keys = codec::decode_keys(&locked(&self.inbox).reader.object()?)?;
        if let Served::Maildir(replica) = served {
            for key in &keys {
                no_symlink_on_the_way(replica.root(), &key.dir)?;
            }
        }
        Ok(keys)
    }

    /// Puts the mailboxes the last whole scan listed into the scan cache, except those
    /// the session's plans touched (`plan`'s too): once, after the tables went out (the
    /// client waits for those), and not for mailboxes about to change. A plan that only
    /// renames folders (a two-way sync's first, its main plan comes next) just adds to
    /// what is left out. A store that fails only costs speed.
    fn keep_scan(&self, plan: Option<&Plan>) {
        if let Some(plan) = plan {
            locked(&self.touched).extend(plan.touched_dirs());
            let only_renames = !plan.rename_mailboxes.is_empty()
                && plan.delete_mailboxes.is_empty()
                && plan.mailboxes.iter().all(|m| m.is_empty());
            if only_renames {
                return;
            }
        }
        let Some((options, table)) = locked(&self.unkept).take() else {
            return;
        };
        let touched = std::mem::take(&mut *locked(&self.touched));
        if let Ok(served) = self.replica() {
            let _ = served
                .replica()
                .save_scan_cache(&options, &table, &|dir| touched.contains(dir));
        }
    }

    /// Sends the bodies of `keys` as one answer, holding the writer throughout; tells
    /// `holds` once it has the writer.
    fn send_bodies(
        &self,
        replica: &dyn Replica,
        keys: &[codec::Key],
        holds: Option<Sender<()>>,
    ) -> Result<(), WireError> {
        let mut out = locked(&self.out);
        if let Some(holds) = holds {
            let _ = holds.send(());
        }
        for key in keys {
            let opened = replica.open_body(&key.dir, key.sub, &key.name);
            send_body(&mut out, (&key.dir, key.sub, &key.name), opened)?;
        }
        out.flush()?;
        Ok(())
    }
}

/// How the client asked to open the replica.
struct OpenHow {
    bwlimit: u64,
    use_cache: bool,
    verbose: bool,
    offline: bool,
    /// The session will write: hold the tree's run lock, waiting this long for it.
    lock_wait: Option<Duration>,
    /// The zstd level to send at, already clamped; `None`: the default, 3.
    compress_level: Option<i32>,
}

/// The replica being served: a Maildir tree, or an mdbox tree (writable only when the client
/// asserted `--offline`).
enum Served {
    Maildir(LocalReplica),
    Mdbox(MdboxReplica),
}

impl Served {
    fn open(path: PathBuf, offline: bool) -> Served {
        match crate::storage::mdbox::layout::is_mdbox(&path) {
            true if offline => Served::Mdbox(MdboxReplica::offline(&path)),
            true => Served::Mdbox(MdboxReplica::new(&path)),
            false => Served::Maildir(LocalReplica::new(path)),
        }
    }

    fn root(&self) -> &Path {
        match self {
            Served::Maildir(r) => r.root(),
            Served::Mdbox(r) => r.root(),
        }
    }

    fn replica(&self) -> &dyn Replica {
        match self {
            Served::Maildir(r) => r,
            Served::Mdbox(r) => r,
        }
    }

    fn format(&self) -> StoreFormat {
        match self {
            Served::Maildir(_) => StoreFormat::Maildir,
            Served::Mdbox(_) => StoreFormat::Mdbox,
        }
    }

    /// Why a plan would be refused, naming the path.
    fn read_only(&self) -> Option<String> {
        match self {
            Served::Maildir(_) => None,
            Served::Mdbox(r) => r.read_only(),
        }
    }

    /// Refuses a mailbox dir the client names when an existing component of the directory
    /// it stands for is a symlink. In an mdbox tree that is the mailbox's directory below
    /// `mailboxes/`, named as `layout` (the last scan's when `None`) maps it.
    fn check_dir(&self, layout: Option<Layout>, dir: &str) -> Result<(), WireError> {
        match self {
            Served::Maildir(r) => no_symlink_on_the_way(r.root(), dir),
            Served::Mdbox(r) => {
                let layout = layout.unwrap_or_else(|| r.layout());
                let rel = crate::sync::mdbox_new::mdbox_dir(layout, dir)
                    .map_err(|e| WireError::protocol(e.to_string()))?;
                no_symlink_on_the_way(&r.root().join("mailboxes"), &rel)
            }
        }
    }
}

/// The owner policy as this machine's user can carry it out: only root can give files
/// away, so a non-root server keeps its own ownership unless `--chown` named IDs.
fn ownership_here(asked: Ownership) -> Ownership {
    match asked {
        Ownership::Fixed(uid, gid) => Ownership::Fixed(uid, gid),
        _ if nix::unistd::geteuid().is_root() => Ownership::FromSource,
        _ => Ownership::RunningUser,
    }
}

fn compile_globs(globs: &[String]) -> Result<Vec<glob::Pattern>, WireError> {
    globs
        .iter()
        .map(|g| {
            glob::Pattern::new(g).map_err(|e| WireError::protocol(format!("--exclude {g}: {e}")))
        })
        .collect()
}

/// Refuses a mailbox dir the client names when any existing component of it is a symlink:
/// the scanner never follows one, and a client must not reach through one either.
fn no_symlink_on_the_way(root: &Path, dir: &str) -> Result<(), WireError> {
    let mut path = root.to_path_buf();
    for component in Path::new(dir).components() {
        path.push(component);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(WireError::protocol(format!(
                    "{}: a symlink; mdsync never follows one",
                    path.display()
                )));
            }
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Turns the path a client asked for into a local path: `~/` is the home directory, a
/// relative path is relative to the root (or the working directory without one). With a
/// root, the path must stay inside it: no `..` anywhere, and the canonical form of what
/// exists must lie in the canonical root, so a symlink cannot lead out.
pub fn resolve_path(asked: &str, root: Option<&Path>) -> Result<PathBuf, String> {
    if asked.contains('\0') {
        return Err("a path with NUL".into());
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let path = match (asked.strip_prefix("~/"), &home) {
        (Some(rest), Some(home)) => home.join(rest),
        _ if asked == "~" && home.is_some() => home.clone().unwrap_or_default(),
        _ => PathBuf::from(if asked.is_empty() { "." } else { asked }),
    };
    let Some(root) = root else {
        return Ok(resolve(&path));
    };
    if path.components().any(|c| c == Component::ParentDir) {
        return Err("`..` is not allowed under --root".into());
    }
    let root =
        std::fs::canonicalize(root).map_err(|e| format!("--root {}: {e}", root.display()))?;
    let full = resolve(&root.join(&path));
    if !full.starts_with(&root) {
        return Err(format!("outside the served root {}", root.display()));
    }
    Ok(full)
}

/// Bodies the client streams during `Apply`, handed to the applier in plan order.
struct StreamSource<'a> {
    inbox: &'a Mutex<Inbox>,
}

impl BodySource for StreamSource<'_> {
    fn open_body(&self, dir: &str, sub: Subdir, name: &str) -> Result<Body<'_>, BodyError> {
        let mut inbox = locked(self.inbox);
        match inbox.next_body((dir, sub, name)) {
            Ok(BodyStatus::Data(meta)) => Ok(Body {
                data: BodyData::Stream(Box::new(BodyReader::new(inbox))),
                meta,
                origin: format!("client:{dir}/{}/{name}", sub.as_str()),
            }),
            Ok(BodyStatus::Vanished) => Err(BodyError::Vanished(format!("client:{dir}/{name}"))),
            Ok(BodyStatus::Failed(why)) => Err(BodyError::Failed(why)),
            Err(e) => Err(BodyError::Failed(format!("connection lost: {e}"))),
        }
    }

    fn sequential(&self) -> bool {
        true
    }
}

/// Sends the applier's and scanner's events to the client: itemized lines when it asked
/// for them, else counts at most four times a second.
struct WireProgress<'a> {
    out: &'a Mutex<FrameWriter>,
    verbose: bool,
    pending: Mutex<(u64, u64, Instant)>,
}

impl<'a> WireProgress<'a> {
    fn new(out: &'a Mutex<FrameWriter>, verbose: bool) -> WireProgress<'a> {
        WireProgress {
            out,
            verbose,
            pending: Mutex::new((0, 0, Instant::now())),
        }
    }

    fn send(&self, event: &WireEvent) {
        let mut out = locked(self.out);
        let _ = out.json(Kind::Event, event);
    }

    /// Sends the counts not sent yet.
    fn flush(&self) {
        let mut pending = locked(&self.pending);
        if pending.0 > 0 {
            self.send(&WireEvent::Progressed {
                operations: pending.0,
                bytes: pending.1,
            });
            *pending = (0, 0, Instant::now());
        }
    }
}

impl Progress for WireProgress<'_> {
    fn event(&self, event: Event) {
        match event {
            Event::MailboxScanned { messages } => {
                self.send(&WireEvent::MailboxScanned { messages })
            }
            Event::Warning { message } => self.send(&WireEvent::Warning { message }),
            Event::Applied { line, bytes } if self.verbose => {
                self.send(&WireEvent::Applied { line, bytes })
            }
            Event::Applied { bytes, .. } => self.count(1, bytes),
            Event::Progressed { operations, bytes } => self.count(operations, bytes),
            Event::ScanStarted { .. } | Event::PlanReady { .. } => {}
        }
    }
}

impl WireProgress<'_> {
    fn count(&self, operations: u64, bytes: u64) {
        let due = {
            let mut pending = locked(&self.pending);
            pending.0 += operations;
            pending.1 += bytes;
            pending.2.elapsed() >= Duration::from_millis(250)
        };
        if due {
            self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mail");
        std::fs::create_dir_all(root.join("alice")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        let canonical = std::fs::canonicalize(&root).unwrap();
        assert_eq!(
            resolve_path("alice", Some(&root)).unwrap(),
            canonical.join("alice")
        );
        assert_eq!(
            resolve_path("bob/new", Some(&root)).unwrap(),
            canonical.join("bob/new")
        );
        let inside = canonical.join("alice");
        assert_eq!(
            resolve_path(inside.to_str().unwrap(), Some(&root)).unwrap(),
            inside
        );
        for bad in [
            "../x",
            "alice/../../x",
            "/etc",
            "escape",
            "escape/passwd",
            "a\0b",
        ] {
            assert!(resolve_path(bad, Some(&root)).is_err(), "{bad}");
        }
    }

    #[test]
    fn mdbox_dirs_are_checked_below_mailboxes_and_read_only_without_offline() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("storage")).unwrap();
        std::fs::create_dir_all(root.join("mailboxes/Archive/dbox-Mails")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("mailboxes/Escape")).unwrap();
        let served = Served::open(root.to_path_buf(), false);
        assert_eq!(served.format(), StoreFormat::Mdbox);
        let why = served.read_only().expect("read-only without --offline");
        assert!(why.contains("--offline") && why.contains(&root.display().to_string()));
        for layout in [Layout::MaildirPlusPlus, Layout::Fs] {
            let archive = if layout == Layout::Fs {
                "Archive"
            } else {
                ".Archive"
            };
            assert!(served.check_dir(Some(layout), archive).is_ok());
            assert!(served.check_dir(Some(layout), "").is_ok());
        }
        assert!(
            served
                .check_dir(Some(Layout::MaildirPlusPlus), ".Escape.x")
                .is_err()
        );
        assert!(served.check_dir(Some(Layout::Fs), "Escape").is_err());
        assert!(
            served
                .check_dir(Some(Layout::Fs), "Archive/dbox-Mails")
                .is_err()
        );
        let offline = Served::open(root.to_path_buf(), true);
        assert_eq!(offline.read_only(), None);
        let maildir = Served::open(root.join("mailboxes"), false);
        assert_eq!(maildir.format(), StoreFormat::Maildir);
        assert_eq!(maildir.read_only(), None);
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::replica::remote::{RemoteOptions, RemoteReplica};
    use crate::runlock::RunLock;

    fn session(locks: &Path, tree: &Path, lock_wait: Option<Duration>) -> RemoteReplica {
        let channel = crate::transport::spawn_in_process(ServeOptions {
            lock_dir: Some(locks.to_path_buf()),
            ..Default::default()
        })
        .unwrap();
        let options = RemoteOptions {
            lock_wait,
            ..RemoteOptions::default()
        };
        RemoteReplica::connect(channel, "pipe", tree.to_str().unwrap(), &options)
    }

    #[test]
    fn a_writing_session_holds_the_lock_from_open_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let (locks, tree) = (dir.path().join("locks"), dir.path().join("mail"));
        let writer = session(&locks, &tree, Some(Duration::ZERO));
        assert!(!writer.is_dir().unwrap(), "the session is open");
        assert!(
            RunLock::acquire(&locks, &tree, Duration::ZERO).is_err(),
            "held while the session lasts"
        );
        writer.close().unwrap();
        RunLock::acquire(&locks, &tree, Duration::ZERO).expect("released at its end");
    }

    #[test]
    fn a_session_that_did_not_ask_writes_only_while_no_run_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (locks, tree) = (dir.path().join("locks"), dir.path().join("mail"));
        let older = session(&locks, &tree, None);
        assert!(!older.is_dir().unwrap());
        let held = RunLock::acquire(&locks, &tree, Duration::ZERO).expect("not taken at Open");
        let source = LocalReplica::new(dir.path().join("src"));
        let options = crate::sync::twoway::test_options(dir.path()).apply;
        let refused = older
            .apply(&Plan::default(), &source, &options, &NoProgress)
            .unwrap_err();
        assert!(
            refused.to_string().contains("another mdsync run"),
            "{refused}"
        );
        assert!(!tree.exists(), "nothing written");
        drop(held);
        let older = session(&locks, &tree, None);
        older
            .apply(&Plan::default(), &source, &options, &NoProgress)
            .unwrap();
    }
}
