//! A replica on another host: the client side of the protocol. Every trait call is one
//! request and its answer; hash and body requests go as whole lists (one round trip), and
//! a plan's bodies stream to the far side while its progress streams back. Everything the
//! peer sends is checked by `wire` before use. Never touches the local filesystem.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::interrupt;
use crate::model::Subdir;
use crate::progress::Progress;
use crate::replica::baseline::{Baselines, Kept};
use crate::replica::spool::Spool;
use crate::replica::{Body, BodyData, BodyError, BodySource, Key, Replica};
use crate::scan::ScanOptions;
use crate::storage::maildir::layout::Layout;
use crate::sync::apply::{ApplyOptions, ApplyReport};
use crate::sync::mdbox_new::{NewTreeReport, body_keys};
use crate::sync::plan::Plan;
use crate::table::{MailTable, MailboxTable};
use crate::transport::{Channel, Peer};
use crate::wire::codec;
use crate::wire::conn::{
    BodyReader, BodyStatus, FrameReader, FrameWriter, Inbox, MAX_OBJECT, Stats, WireError,
};
use crate::wire::frame::{FrameError, Kind};
use crate::wire::hello::{
    CAP_APPLY_SENDS, CAP_HASH, CAP_NEW_MDBOX, CAP_RESCAN_MANY, CAP_ROW_DELTA, CAP_ZSTD, Hello,
};
use crate::wire::messages::{Answer, Request, RootFacts, StoreFormat, WireEvent};
use crate::wire::table::{self as wire_table, Shipped, id_of};

/// Session settings chosen by the user.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// zstd level for bodies and tables; `None` sends them as they are.
    pub compress_level: Option<i32>,
    /// Sending limit in bytes per second, both ways (0 = none).
    pub bwlimit: u64,
    /// Longest wait for a byte from the far side; `None` waits forever.
    pub timeout: Option<Duration>,
    /// Let the far side use its scan cache and keep table baselines.
    pub use_cache: bool,
    /// Where this side keeps the tables last received, to get deltas next time; `None`
    /// keeps none.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Ask for itemized lines while applying.
    pub verbose: bool,
    /// The user asserts that no Dovecot uses the far side's tree during the run
    /// (`--offline`): the far side writes into an mdbox tree only then.
    pub offline: bool,
    /// The run will write the far side: it holds its tree's run lock for the session,
    /// waiting this long for another mdsync run that holds it. `None`: only reads.
    pub lock_wait: Option<Duration>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            compress_level: Some(3),
            bwlimit: 0,
            timeout: Some(Duration::from_secs(300)),
            use_cache: true,
            cache_dir: None,
            verbose: false,
            offline: false,
            lock_wait: None,
        }
    }
}

/// A replica served by `mdsync serve` at the other end of a [`Channel`].
pub struct RemoteReplica {
    label: String,
    location: String,
    /// Held for one request and its answer, so answers never cross.
    exchange: Mutex<()>,
    inbox: Mutex<Inbox>,
    out: Mutex<FrameWriter>,
    stats: Arc<Stats>,
    peer: Mutex<Option<Peer>>,
    timed_out: Arc<AtomicBool>,
    stop_watchdog: Arc<AtomicBool>,
    timeout: Option<Duration>,
    baselines: Baselines,
    /// The baselines as on disk, read during the greeting for the first scan.
    preloaded: Mutex<Option<Kept>>,
    /// The path as the user wrote it after `host:`.
    path: String,
    options: RemoteOptions,
    /// The outcome of greeting the far side and opening the path (see `open`).
    opened: OnceLock<Result<Opened, String>>,
    /// Requests sent, and mailbox objects received by kind (whole, zstd delta, row delta):
    /// what a test can see of how the session went.
    counts: Counts,
}

/// See [`RemoteReplica::counts`].
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) requests: AtomicU64,
    pub(crate) tables: [AtomicU64; 3],
}

/// What the far side said when the replica was opened.
struct Opened {
    /// Whether the path exists there as a directory.
    is_dir: bool,
    /// The capabilities both sides agreed on.
    caps: u64,
    /// Why the far side will refuse any plan (see [`Replica::check_writable`]).
    read_only: Option<String>,
    /// How the far side stores mail there.
    format: StoreFormat,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RemoteReplica {
    /// A replica served at the other end of `channel`, to be opened at `path` there.
    /// Returns at once: the greeting and the opening happen with the first request, so the
    /// ssh connection is set up while the local side already scans. `label` names the host
    /// side for messages (`user@host`).
    pub fn connect(
        channel: Channel,
        label: &str,
        path: &str,
        options: &RemoteOptions,
    ) -> RemoteReplica {
        let stats = Arc::new(Stats::default());
        let location = format!("{label}:{path}");
        let cache_dir = options.cache_dir.as_deref().filter(|_| options.use_cache);
        let replica = RemoteReplica {
            label: label.to_string(),
            baselines: Baselines::new(cache_dir, &location),
            preloaded: Mutex::new(None),
            location,
            path: path.to_string(),
            options: options.clone(),
            opened: OnceLock::new(),
            exchange: Mutex::new(()),
            inbox: Mutex::new(Inbox::new(FrameReader::new(channel.input, stats.clone()))),
            out: Mutex::new(FrameWriter::new(channel.output, stats.clone())),
            stats,
            peer: Mutex::new(Some(channel.peer)),
            timed_out: Arc::new(AtomicBool::new(false)),
            stop_watchdog: Arc::new(AtomicBool::new(false)),
            timeout: options.timeout,
            counts: Counts::default(),
        };
        replica.start_watchdog();
        replica
    }

    /// Greets the far side and opens the replica, once; later calls return the outcome of
    /// the first.
    fn open(&self) -> Result<&Opened, WireError> {
        self.opened
            .get_or_init(|| {
                self.handshake(&self.path, &self.options)
                    .map_err(|e| self.message(e))
            })
            .as_ref()
            .map_err(|why| WireError::Failed(why.clone()))
    }

    /// What the session did so far (requests, tables by kind), for tests.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> &Counts {
        &self.counts
    }

    /// True when the remote path exists as a directory (opens the replica).
    pub fn is_dir(&self) -> Result<bool> {
        self.open().map(|o| o.is_dir).map_err(|e| self.error(e))
    }

    /// True when the remote path is an mdbox tree (opens the replica).
    pub fn is_mdbox(&self) -> Result<bool> {
        self.open()
            .map(|o| o.format == StoreFormat::Mdbox)
            .map_err(|e| self.error(e))
    }

    /// Greets the far side and opens `path`; returns what it said of it and the
    /// capabilities agreed on.
    fn handshake(&self, path: &str, options: &RemoteOptions) -> Result<Opened, WireError> {
        let zstd_cap = if options.compress_level.is_some() {
            CAP_ZSTD
        } else {
            0
        };
        let ours = Hello::ours(
            CAP_HASH | CAP_RESCAN_MANY | CAP_NEW_MDBOX | CAP_APPLY_SENDS | CAP_ROW_DELTA | zstd_cap,
        );
        {
            let mut out = locked(&self.out);
            out.frame(Kind::Hello, &ours.encode())?;
            out.flush()?;
        }
        // While ssh logs in (a quarter of a second), not after.
        *locked(&self.preloaded) = Some(self.baselines.load_all());
        let mut inbox = locked(&self.inbox);
        let payload = inbox.reader.expect(Kind::Hello).map_err(|e| match e {
            WireError::Frame(FrameError::Closed) => WireError::Failed(
                "the connection closed before the far side answered; is mdsync installed there \
                 (see --remote-mdsync) and can ssh log in?"
                    .into(),
            ),
            WireError::Frame(FrameError::UnknownKind(_) | FrameError::TooLarge(_)) => {
                WireError::Failed(
                    "the far side is not mdsync serve (does the remote shell print a banner?)"
                        .into(),
                )
            }
            other => other,
        })?;
        let theirs = Hello::decode(&payload).map_err(|e| WireError::Failed(e.to_string()))?;
        let shared = ours
            .agree(&theirs)
            .map_err(|e| WireError::Failed(e.to_string()))?;
        let zstd = shared & CAP_ZSTD != 0;
        inbox.reader.set_zstd(zstd);
        let mut out = locked(&self.out);
        out.set_zstd(if zstd { options.compress_level } else { None });
        out.set_bwlimit(options.bwlimit);
        out.json(
            Kind::Request,
            &Request::Open {
                path: path.to_string(),
                bwlimit: options.bwlimit,
                use_cache: options.use_cache,
                verbose: options.verbose,
                keepalive_ms: options
                    .timeout
                    .map_or(0, |t| (t.as_millis() as u64 / 4).max(100)),
                offline: options.offline,
                lock_wait_ms: options.lock_wait.map(|wait| wait.as_millis() as u64),
                compress_level: options.compress_level,
            },
        )?;
        drop(out);
        match answer(&mut inbox, None)? {
            Answer::Opened {
                is_dir,
                read_only,
                format,
                ..
            } => Ok(Opened {
                is_dir,
                caps: shared,
                read_only,
                format,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Kills the far side when it sends nothing for longer than the timeout while we wait.
    fn start_watchdog(&self) {
        let Some(timeout) = self.timeout else {
            return;
        };
        let pid = match &*locked(&self.peer) {
            Some(Peer::Child(child)) => child.id(),
            _ => return,
        };
        let (stats, stop, timed_out) = (
            self.stats.clone(),
            self.stop_watchdog.clone(),
            self.timed_out.clone(),
        );
        // A tenth of the timeout between looks (50 ms to 5 s): a kill comes at most 10 %
        // late, and an idle session (a `watch` between batches) wakes rarely.
        let step = (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let _ = std::thread::Builder::new()
            .name("mdsync-watchdog".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(step);
                    if stats.stalled_for() > timeout {
                        timed_out.store(true, Ordering::Relaxed);
                        crate::transport::kill_tree(pid);
                        return;
                    }
                }
            });
    }

    /// The library error for a session failure, with the location.
    fn error(&self, e: WireError) -> Error {
        Error::Remote {
            location: self.location.clone(),
            message: self.message(e),
        }
    }

    /// What went wrong, in words: a timeout, a lost connection (and why), or the far
    /// side's own message.
    fn message(&self, e: WireError) -> String {
        if self.timed_out.load(Ordering::Relaxed) {
            return format!(
                "no data from the far side for {} s (--timeout); connection closed",
                self.timeout.map_or(0, |t| t.as_secs())
            );
        }
        match e {
            WireError::Frame(FrameError::Closed | FrameError::Truncated) => {
                format!("connection lost{}", self.peer_status())
            }
            WireError::Remote(text) => format!("far side failed: {text}"),
            other => other.to_string(),
        }
    }

    /// ` (ssh exited with …)` when the far side's process has ended.
    fn peer_status(&self) -> String {
        let mut peer = locked(&self.peer);
        if let Some(Peer::Child(child)) = peer.as_mut() {
            for _ in 0..20 {
                if let Ok(Some(status)) = child.try_wait() {
                    return format!(" ({} exited: {status})", self.label);
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        String::new()
    }

    /// Sends a request (with an optional object after it) and returns the locked inbox,
    /// cleared of bodies nobody read.
    fn request(
        &self,
        request: &Request,
        object: Option<&[u8]>,
    ) -> Result<MutexGuard<'_, Inbox>, WireError> {
        self.open()?;
        let mut inbox = locked(&self.inbox);
        inbox.drain()?;
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        let mut out = locked(&self.out);
        out.json(Kind::Request, request)?;
        if let Some(bytes) = object {
            out.object(bytes)?;
            out.flush()?;
        }
        Ok(inbox)
    }

    fn scan_remote(
        &self,
        options: &ScanOptions,
        progress: &dyn Progress,
    ) -> Result<MailTable, WireError> {
        let _x = locked(&self.exchange);
        // Opened first, so that a scan that is the session's first request still finds
        // the baselines read during the greeting.
        self.open()?;
        let kept = locked(&self.preloaded)
            .take()
            .unwrap_or_else(|| self.baselines.load_all());
        let request = Request::Scan {
            layout: options.layout,
            exclude: options
                .exclude
                .iter()
                .map(|p| p.as_str().to_string())
                .collect(),
            unchanged_if: options
                .unchanged_if
                .iter()
                .map(|(dir, (stamps, count))| (dir.clone(), *stamps, *count))
                .collect(),
            baselines: kept
                .iter()
                .map(|(id, (dir, _))| (dir.clone(), format!("{id:032x}")))
                .collect(),
        };
        let mut inbox = self.request(&request, None)?;
        let mut objects = Vec::new();
        let mut received = 0usize;
        loop {
            let (kind, payload) = inbox.reader.frame()?;
            match kind {
                Kind::Event => forward(&payload, Some(progress))?,
                Kind::Part => {
                    let object = inbox.reader.object_from(payload)?;
                    received += object.len();
                    if received > MAX_OBJECT {
                        return Err(WireError::protocol("a scan larger than 1 GiB"));
                    }
                    objects.push(object);
                }
                Kind::Answer => {
                    return match FrameReader::json(&payload)? {
                        Answer::ScanEnd { mailboxes: n, root } if n as usize == objects.len() => {
                            let mailboxes = objects
                                .par_iter()
                                .map(|bytes| self.receive(bytes, &kept))
                                .collect::<Result<Vec<_>, _>>()?;
                            for dir in root.parents.iter().chain(&root.unfollowed) {
                                crate::wire::path::check_dir(dir)
                                    .map_err(|e| WireError::protocol(e.to_string()))?;
                            }
                            let mut root = root;
                            root.root_meta.mode &= 0o1777;
                            let scanned = mailboxes.iter().map(|m| m.dir.as_str()).collect();
                            self.baselines.prune(&scanned);
                            Ok(root.into_table(mailboxes))
                        }
                        other => Err(unexpected(&other)),
                    };
                }
                other => return Err(WireError::protocol(format!("unexpected {other:?}"))),
            }
        }
    }

    fn rescan_remote(&self, layout: Layout, dir: &str) -> Result<MailboxTable, WireError> {
        let _x = locked(&self.exchange);
        let kept: Kept = self
            .baselines
            .get(dir)
            .map(|b| (id_of(&b), (dir.to_string(), b)))
            .into_iter()
            .collect();
        let request = Request::Rescan {
            layout,
            dir: dir.to_string(),
            baseline: kept.keys().next().map(|id| format!("{id:032x}")),
        };
        let mut inbox = self.request(&request, None)?;
        let table = self.receive(&inbox.reader.object()?, &kept)?;
        if table.dir != dir {
            return Err(WireError::protocol("rescan answered for another mailbox"));
        }
        match answer(&mut inbox, None)? {
            Answer::Rescanned => Ok(table),
            other => Err(unexpected(&other)),
        }
    }

    /// Several mailboxes in one round trip, or one `Rescan` each when the far side does
    /// not know `RescanMany`.
    fn rescan_many_remote(
        &self,
        layout: Layout,
        dirs: &[String],
    ) -> Result<Vec<MailboxTable>, WireError> {
        if self.open()?.caps & CAP_RESCAN_MANY == 0 {
            return dirs
                .iter()
                .map(|dir| self.rescan_remote(layout, dir))
                .collect();
        }
        let _x = locked(&self.exchange);
        let kept: Kept = dirs
            .iter()
            .filter_map(|dir| {
                self.baselines
                    .get(dir)
                    .map(|b| (id_of(&b), (dir.clone(), b)))
            })
            .collect();
        let id_of_dir: HashMap<&str, u128> = kept
            .iter()
            .map(|(id, (dir, _))| (dir.as_str(), *id))
            .collect();
        let request = Request::RescanMany {
            layout,
            mailboxes: dirs
                .iter()
                .map(|dir| {
                    let id = id_of_dir.get(dir.as_str()).map(|id| format!("{id:032x}"));
                    (dir.clone(), id)
                })
                .collect(),
        };
        let mut inbox = self.request(&request, None)?;
        let mut tables = Vec::with_capacity(dirs.len());
        for dir in dirs {
            let table = self.receive(&inbox.reader.object()?, &kept)?;
            if table.dir != *dir {
                return Err(WireError::protocol("rescan answered for another mailbox"));
            }
            tables.push(table);
        }
        match answer(&mut inbox, None)? {
            Answer::Rescanned => Ok(tables),
            other => Err(unexpected(&other)),
        }
    }

    /// Decodes a mailbox object, resolving a delta against the baseline it names, and
    /// keeps the result as the new baseline.
    fn receive(&self, bytes: &[u8], kept: &Kept) -> Result<MailboxTable, WireError> {
        let shipped = Shipped::from_bytes(bytes)?;
        let kind = match shipped {
            Shipped::Whole(_) => 0,
            Shipped::Delta { .. } => 1,
            Shipped::Rows { .. } => 2,
        };
        self.counts.tables[kind].fetch_add(1, Ordering::Relaxed);
        let base = shipped.base().and_then(|id| kept.get(&id));
        let encoding = shipped.resolve(base.map(|(_, b)| b.as_slice()))?;
        let table = wire_table::decode(&encoding)?;
        if base.is_some_and(|(dir, _)| *dir != table.dir) {
            return Err(WireError::protocol("a table delta against another mailbox"));
        }
        if table.unchanged.is_none() {
            self.baselines.stage(&table.dir, encoding);
        }
        Ok(table)
    }

    fn hashes_remote(&self, keys: &[Key]) -> Result<Vec<codec::HashAnswer>, WireError> {
        let _x = locked(&self.exchange);
        let mut inbox = self.request(&Request::Hashes, Some(&codec::encode_keys(keys)))?;
        match answer(&mut inbox, None)? {
            Answer::Hashes => codec::decode_hashes(&inbox.reader.object()?, keys.len()),
            other => Err(unexpected(&other)),
        }
    }

    /// Has the far side apply `plan`, bodies from `source`. Once the bodies are sent, the
    /// next baselines are worked out and `meanwhile` runs, while the far side still works.
    /// With `read_ahead` (only when the far side agreed on `CAP_APPLY_SENDS`), the far
    /// side also sends the bodies it names while it receives the plan's; they go into the
    /// spool, which is settled before the apply's answer is awaited.
    fn apply_remote(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        options: &ApplyOptions,
        progress: &dyn Progress,
        meanwhile: &(dyn Fn() + Sync),
        read_ahead: Option<(&[Key], &Spool)>,
    ) -> Result<ApplyReport, WireError> {
        let _x = locked(&self.exchange);
        let plan_json = serde_json::to_vec(plan).map_err(|e| WireError::Failed(e.to_string()))?;
        let request = Request::Apply {
            options: *options,
            also_send: read_ahead.is_some(),
        };
        let mut inbox = self.request(&request, Some(&plan_json))?;
        if let Some((wanted, _)) = read_ahead {
            let mut out = locked(&self.out);
            out.object(&codec::encode_keys(wanted))?;
            out.flush()?;
            inbox.expect_bodies(wanted.len());
        }
        drop(inbox);
        // The far side answers for the bodies asked for first, then for the apply. A
        // refusal (an `Error` frame) or a break in that answer is the session's end: the
        // spool is settled as broken off, so the local side commits nothing.
        let read_first = || -> Result<(), WireError> {
            let Some((wanted, into)) = read_ahead else {
                return Ok(());
            };
            into.fill_from(self, wanted);
            // Left after an interrupt: read past them to the apply's answer.
            let drained = locked(&self.inbox).drain();
            let whole = self
                .answer_whole()
                .map_err(|e| WireError::Failed(e.to_string()))
                .and(drained);
            into.settle(
                whole
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| BodyError::Failed(e.to_string())),
            );
            whole
        };
        let copies = plan.mailboxes.iter().flat_map(|m| {
            m.copies
                .iter()
                .map(|c| (m.dir.as_str(), c.src_sub, c.src_name.as_str()))
        });
        let predicted = Mutex::new(None);
        let after_sent = || {
            *locked(&predicted) = Some(self.baselines.predict(plan));
            meanwhile();
        };
        let answer = self.stream_bodies(copies, source, progress, &after_sent, &read_first)?;
        match answer {
            Answer::Applied { report } => {
                // The far side keeps the same predictions (see `sync::predict`).
                let predicted = locked(&predicted).take();
                self.baselines
                    .stage_predicted(predicted.unwrap_or_else(|| self.baselines.predict(plan)));
                Ok(report)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Streams the bodies of `keys`, in order, from `source` while the far side's events
    /// come back, and returns its answer. After an interrupt the rest are sent as failed,
    /// so the far side finishes cleanly with what it has. `after_sent` runs once the last
    /// body is out (not when sending fails), while the far side still works; `read_first`
    /// reads what the far side sends before the answer, while the bodies go out.
    fn stream_bodies<'k>(
        &self,
        keys: impl Iterator<Item = (&'k str, Subdir, &'k str)> + Send,
        source: &dyn BodySource,
        progress: &dyn Progress,
        after_sent: &(dyn Fn() + Sync),
        read_first: &dyn Fn() -> Result<(), WireError>,
    ) -> Result<Answer, WireError> {
        let send = || -> std::io::Result<()> {
            let mut out = locked(&self.out);
            for key in keys {
                if interrupt::requested() {
                    out.body_missing(key, &BodyStatus::Failed("interrupted".into()))?;
                    continue;
                }
                let (dir, sub, name) = key;
                send_body(&mut out, key, source.open_body(dir, sub, name))?;
            }
            out.flush()?;
            drop(out);
            after_sent();
            Ok(())
        };
        std::thread::scope(|scope| {
            let sender = scope.spawn(send);
            let result =
                read_first().and_then(|()| answer(&mut locked(&self.inbox), Some(progress)));
            if result.is_err() {
                self.kill_peer();
            }
            match (result, sender.join()) {
                (Err(e), _) => Err(e),
                (_, Ok(Err(e))) => Err(WireError::from(e)),
                (_, Err(_)) => Err(WireError::Failed("the body sender panicked".into())),
                (Ok(answer), Ok(Ok(()))) => Ok(answer),
            }
        })
    }

    /// Has the far side write a new mdbox tree at the opened path from the scanned
    /// `table`, streaming its bodies from `source` (`backup --to-format mdbox` into a
    /// remote destination; the far side needs `--offline` in the session).
    pub fn write_new_mdbox(
        &self,
        table: &MailTable,
        source: &dyn BodySource,
        progress: &dyn Progress,
    ) -> Result<NewTreeReport> {
        self.new_mdbox_remote(table, source, progress)
            .map_err(|e| self.error(e))
    }

    fn new_mdbox_remote(
        &self,
        table: &MailTable,
        source: &dyn BodySource,
        progress: &dyn Progress,
    ) -> Result<NewTreeReport, WireError> {
        if self.open()?.caps & CAP_NEW_MDBOX == 0 {
            return Err(WireError::Failed(
                "the far side's mdsync cannot write a new mdbox tree (too old)".into(),
            ));
        }
        let _x = locked(&self.exchange);
        let request = Request::NewMdbox {
            mailboxes: table.mailboxes.len() as u32,
            root: RootFacts::of(table),
        };
        drop(self.request(&request, None)?);
        {
            let mut out = locked(&self.out);
            for mailbox in &table.mailboxes {
                out.object(&Shipped::Whole(wire_table::encode(mailbox)).to_bytes())?;
            }
            out.flush()?;
        }
        let keys = body_keys(table);
        let keys = keys
            .iter()
            .map(|k| (k.dir.as_str(), k.sub, k.name.as_str()));
        match self.stream_bodies(keys, source, progress, &|| (), &|| Ok(()))? {
            Answer::NewMdboxWritten { report } => Ok(report),
            other => Err(unexpected(&other)),
        }
    }

    fn kill_peer(&self) {
        if let Some(Peer::Child(child)) = locked(&self.peer).as_mut() {
            kill_if_running(child);
        }
    }

    /// Whether the bodies read so far came whole: not when the stream broke off.
    fn answer_whole(&self) -> Result<(), BodyError> {
        match locked(&self.inbox).broken() {
            Some(why) => Err(BodyError::Failed(why.to_string())),
            None => Ok(()),
        }
    }

    fn bye(&self) -> Result<(), WireError> {
        let _x = locked(&self.exchange);
        let mut inbox = self.request(&Request::Bye, None)?;
        match answer(&mut inbox, None)? {
            Answer::Bye => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

/// Sends one opened body, or says why it cannot be: the same for bodies a client pushes
/// and bodies a server hands out.
pub(crate) fn send_body(
    out: &mut FrameWriter,
    key: (&str, Subdir, &str),
    opened: Result<Body<'_>, BodyError>,
) -> std::io::Result<()> {
    match opened {
        Ok(mut body) => out.body(key, &body.meta, body.data.as_read()),
        Err(BodyError::Vanished(_)) => out.body_missing(key, &BodyStatus::Vanished),
        Err(BodyError::Failed(why)) => out.body_missing(key, &BodyStatus::Failed(why)),
    }
}

/// Kills the far side's process tree, unless the child was already reaped: its PID may
/// belong to another process by now.
fn kill_if_running(child: &mut std::process::Child) {
    if matches!(child.try_wait(), Ok(None)) {
        crate::transport::kill_tree(child.id());
    }
}

/// Reads frames up to the answer, forwarding events.
fn answer(inbox: &mut Inbox, progress: Option<&dyn Progress>) -> Result<Answer, WireError> {
    loop {
        let (kind, payload) = inbox.reader.frame()?;
        match kind {
            Kind::Event => forward(&payload, progress)?,
            Kind::Answer => return FrameReader::json(&payload),
            other => return Err(WireError::protocol(format!("unexpected {other:?}"))),
        }
    }
}

fn forward(payload: &[u8], progress: Option<&dyn Progress>) -> Result<(), WireError> {
    let event: WireEvent = FrameReader::json(payload)?;
    if let Some(progress) = progress {
        progress.event(event.into_event());
    }
    Ok(())
}

fn unexpected(answer: &Answer) -> WireError {
    let name = serde_json::to_value(answer)
        .ok()
        .and_then(|v| v.get("answer").and_then(|a| a.as_str()).map(String::from))
        .unwrap_or_default();
    WireError::protocol(format!("unexpected answer {name}"))
}

impl BodySource for RemoteReplica {
    fn open_body(&self, dir: &str, sub: Subdir, name: &str) -> Result<Body<'_>, BodyError> {
        let mut inbox = locked(&self.inbox);
        let origin = format!("{}/{dir}/{}/{name}", self.location, sub.as_str());
        match inbox.next_body((dir, sub, name)) {
            Ok(BodyStatus::Data(meta)) => Ok(Body {
                data: BodyData::Stream(Box::new(BodyReader::new(inbox))),
                meta,
                origin,
            }),
            Ok(BodyStatus::Vanished) => Err(BodyError::Vanished(origin)),
            Ok(BodyStatus::Failed(why)) => Err(BodyError::Failed(format!("{}: {why}", self.label))),
            Err(e) => Err(BodyError::Failed(self.error(e).to_string())),
        }
    }

    fn sequential(&self) -> bool {
        true
    }

    fn announce(&self, keys: &[Key]) -> Result<(), BodyError> {
        let _x = locked(&self.exchange);
        let mut inbox = self
            .request(&Request::Bodies, Some(&codec::encode_keys(keys)))
            .map_err(|e| BodyError::Failed(self.error(e).to_string()))?;
        inbox.expect_bodies(keys.len());
        Ok(())
    }
}

impl Replica for RemoteReplica {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn connecting(&self) -> bool {
        let over_ssh = matches!(*locked(&self.peer), Some(Peer::Child(_)));
        over_ssh && self.opened.get().is_none()
    }

    fn detect_layout(&self) -> Result<Option<Layout>> {
        let _x = locked(&self.exchange);
        let result = self
            .request(&Request::DetectLayout, None)
            .and_then(|mut inbox| answer(&mut inbox, None));
        match result.map_err(|e| self.error(e))? {
            Answer::Layout { layout } => Ok(layout),
            other => Err(self.error(unexpected(&other))),
        }
    }

    fn scan(&self, options: &ScanOptions, progress: &dyn Progress) -> Result<MailTable> {
        self.scan_remote(options, progress)
            .map_err(|e| self.error(e))
    }

    fn rescan_mailbox(&self, layout: Layout, dir: &str) -> MailboxTable {
        self.rescan_remote(layout, dir)
            .unwrap_or_else(|e| MailboxTable {
                dir: dir.to_string(),
                broken: Some(self.error(e).to_string()),
                ..MailboxTable::default()
            })
    }

    fn rescan_mailboxes(&self, layout: Layout, dirs: &[String]) -> Result<Vec<MailboxTable>> {
        self.rescan_many_remote(layout, dirs)
            .map_err(|e| self.error(e))
    }

    fn content_hash(&self, dir: &str, sub: Subdir, name: &str) -> Result<u128, BodyError> {
        let key = Key {
            dir: dir.to_string(),
            sub,
            name: name.to_string(),
        };
        self.content_hashes(&[key])
            .pop()
            .unwrap_or_else(|| Err(BodyError::Failed("no answer".into())))
    }

    fn content_hashes(&self, keys: &[Key]) -> Vec<Result<u128, BodyError>> {
        if keys.is_empty() {
            return Vec::new();
        }
        match self.hashes_remote(keys) {
            Ok(answers) => answers,
            Err(e) => {
                let why = self.error(e).to_string();
                keys.iter()
                    .map(|_| Err(BodyError::Failed(why.clone())))
                    .collect()
            }
        }
    }

    fn apply(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        options: &ApplyOptions,
        progress: &dyn Progress,
    ) -> Result<ApplyReport> {
        self.apply_overlapping(plan, source, options, progress, &|| ())
    }

    /// `meanwhile` runs once the bodies are sent, while the far side applies.
    fn apply_overlapping(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        options: &ApplyOptions,
        progress: &dyn Progress,
        meanwhile: &(dyn Fn() + Sync),
    ) -> Result<ApplyReport> {
        super::with_meanwhile_once(meanwhile, |once| {
            self.apply_remote(plan, source, options, progress, once, None)
        })
        .map_err(|e| self.error(e))
    }

    /// The bodies `wanted` travel with the apply, the other way, when the far side can
    /// send them while it receives (`CAP_APPLY_SENDS`); else they are read first.
    fn apply_reading_ahead(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        options: &ApplyOptions,
        progress: &dyn Progress,
        meanwhile: &(dyn Fn() + Sync),
        (wanted, into): (&[Key], &Spool),
    ) -> Result<ApplyReport> {
        let together = self.open().is_ok_and(|o| o.caps & CAP_APPLY_SENDS != 0);
        if wanted.is_empty() || !together {
            into.fill_announcing(self, wanted, || self.answer_whole());
            return self.apply_overlapping(plan, source, options, progress, meanwhile);
        }
        super::with_meanwhile_once(meanwhile, |once| {
            // Settled before `meanwhile` catches up after a failed request (see the trait).
            let _settled = into.settle_on_drop();
            let read_ahead = Some((wanted, into));
            self.apply_remote(plan, source, options, progress, once, read_ahead)
        })
        .map_err(|e| self.error(e))
    }

    fn check_writable(&self) -> Result<()> {
        match &self.open().map_err(|e| self.error(e))?.read_only {
            Some(why) => Err(Error::Remote {
                location: self.location.clone(),
                message: why.clone(),
            }),
            None => Ok(()),
        }
    }

    fn wire_bytes(&self) -> Option<(u64, u64)> {
        Some((self.stats.sent(), self.stats.received()))
    }

    fn close(&self) -> Result<()> {
        // Both sides write this session's baselines at its end, at the same time. Should
        // only one side manage, the next exchange just sends whole tables.
        std::thread::scope(|scope| {
            scope.spawn(|| self.baselines.persist());
            self.bye()
        })
        .map_err(|e| self.error(e))?;
        self.stop_watchdog.store(true, Ordering::Relaxed);
        match locked(&self.peer).take() {
            Some(Peer::Child(mut child)) => {
                let status = child.wait().map_err(|e| Error::Remote {
                    location: self.location.clone(),
                    message: e.to_string(),
                })?;
                if !status.success() {
                    return Err(Error::Remote {
                        location: self.location.clone(),
                        message: format!("the far side exited with {status}"),
                    });
                }
            }
            Some(Peer::Thread(thread)) => match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(self.error(e)),
                Err(_) => return Err(self.error(WireError::Failed("the server panicked".into()))),
            },
            None => {}
        }
        Ok(())
    }
}

impl Drop for RemoteReplica {
    fn drop(&mut self) {
        self.stop_watchdog.store(true, Ordering::Relaxed);
        if let Some(Peer::Child(mut child)) = locked(&self.peer).take() {
            kill_if_running(&mut child);
            let _ = child.wait();
        }
    }
}
