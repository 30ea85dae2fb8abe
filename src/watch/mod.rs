//! `watch`: a near-realtime mirror. Watches the source tree with inotify, gathers what
//! changed into batches of dirty mailboxes ([`coalesce`]), and runs a batch step ([`Step`]:
//! [`oneway::OneWay`] or [`twoway::TwoWay`]) over one long-lived pair of replicas: a full run first and
//! after anything goes wrong, then only the dirty mailboxes. Reconnects with exponential
//! backoff and stops cleanly between batches. Blocks while idle; never prints (reports
//! through [`Monitor`]); never writes mail itself (the step's applier does).

pub mod coalesce;
pub mod oneway;
pub mod twoway;
pub mod watcher;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::interrupt;
use crate::progress::Progress;
use crate::replica::Replica;
use crate::storage::maildir::layout::Layout;
use crate::sync::backup::BackupOutcome;
use coalesce::{Change, Coalescer, Dirty, Timing};
use watcher::{TreeWatcher, Wake, Waker};

/// What one batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    /// The backup outcome of the batch (counts, errors, skipped items).
    pub outcome: BackupOutcome,
    /// Source mailboxes read (the rest stood in as unchanged).
    pub mailboxes_read: u64,
    /// True for a full run (start, catch-up, overflow, periodic rescan).
    pub full: bool,
    /// Two-way disagreements and how they were settled, one line each.
    pub conflicts: Vec<String>,
}

/// One batch of work over two replicas. The loop knows nothing of how the two sides are
/// brought together: one-way backup is [`oneway::OneWay`], two-way sync is
/// [`twoway::TwoWay`].
pub trait Step {
    /// Brings everything together (the first run, after a reconnect or an overflow, and
    /// every rescan interval).
    fn full(
        &mut self,
        src: &dyn Replica,
        dst: &dyn Replica,
        progress: &dyn Progress,
    ) -> Result<BatchReport>;

    /// Brings together what `dirty` names; may fall back to a full run.
    fn batch(
        &mut self,
        src: &dyn Replica,
        dst: &dyn Replica,
        dirty: &Dirty,
        progress: &dyn Progress,
    ) -> Result<BatchReport>;
}

/// What the loop reports.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// Watching: this many directories.
    Watching {
        /// Directories with an inotify watch.
        watches: usize,
    },
    /// A batch (or full run) is done.
    Batch {
        /// What it did.
        report: Box<BatchReport>,
        /// From the first change noticed to the end of the batch; `None` for a run that no
        /// change started (the first one, a periodic rescan).
        latency: Option<Duration>,
    },
    /// A batch failed; the loop retries with a full run after `retry_in`.
    Failed {
        /// What went wrong.
        message: String,
        /// When the next attempt comes.
        retry_in: Duration,
    },
    /// The destination was opened again after a failure.
    Reconnected {
        /// Where.
        location: String,
    },
    /// Some directories could not be watched (a watch limit): changes there are seen only
    /// by the periodic full rescan, which then comes every `rescan_every`.
    WatchLimit {
        /// How many directories, and the first one with the reason.
        count: usize,
        /// The first failure.
        first: String,
        /// The rescan interval in force.
        rescan_every: Duration,
    },
    /// Events were lost (the queue overflowed): everything is read again.
    Overflow,
    /// Something worth telling that needs no retry.
    Warning {
        /// What happened.
        message: String,
    },
}

/// Receives [`WatchEvent`]s.
pub trait Monitor: Sync {
    /// Handles one event.
    fn event(&self, event: WatchEvent);
}

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Debounce and maximum delay of a batch.
    pub timing: Timing,
    /// A full run this often, to catch anything the watches missed.
    pub rescan_interval: Duration,
    /// The rescan interval while some directory could not be watched.
    pub degraded_rescan_interval: Duration,
    /// First retry delay after a failure; doubles up to `retry_max`.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            timing: Timing::default(),
            rescan_interval: Duration::from_secs(600),
            degraded_rescan_interval: Duration::from_secs(60),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// Stops a running loop from another thread (a signal handler's thread).
#[derive(Debug, Clone)]
pub struct Control {
    waker: Waker,
    stop: Arc<AtomicBool>,
    in_full_run: Arc<AtomicBool>,
}

impl Control {
    /// Stops after the batch in flight. A full run in flight, which may take long on a big
    /// tree, is interrupted the way an interrupted backup is: nothing half-done is
    /// visible, and the next start catches up.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.in_full_run.load(Ordering::SeqCst) {
            interrupt::flag().store(true, Ordering::SeqCst);
        }
        self.waker.stop();
    }
}

/// Opens the destination (again): a remote one is a new session.
pub type Connect<'a> = dyn Fn() -> Result<Box<dyn Replica>> + 'a;

/// The watch loop over one watched source tree (and, for a two-way step, the destination
/// tree too: [`WatchLoop::also_watching`]).
pub struct WatchLoop<'a> {
    watcher: TreeWatcher,
    /// Watchers of other trees, sharing `watcher`'s queue ([`TreeWatcher::alongside`]).
    others: Vec<TreeWatcher>,
    src: &'a dyn Replica,
    connect: &'a Connect<'a>,
    options: WatchOptions,
    layout: Layout,
    excluded: &'a (dyn Fn(&str) -> bool + Sync),
    stop: Arc<AtomicBool>,
    in_full_run: Arc<AtomicBool>,
    /// The watch count last reported, to report only changes.
    reported_watches: Option<usize>,
}

impl<'a> WatchLoop<'a> {
    /// A loop that watches `src`'s tree, whose folders have `layout`, through `watcher`
    /// and mirrors it to what `connect` opens. `excluded` says which mailbox names are not
    /// watched (`--exclude`).
    pub fn new(
        watcher: TreeWatcher,
        src: &'a dyn Replica,
        connect: &'a Connect<'a>,
        options: WatchOptions,
        (layout, excluded): (Layout, &'a (dyn Fn(&str) -> bool + Sync)),
    ) -> WatchLoop<'a> {
        WatchLoop {
            watcher,
            others: Vec::new(),
            src,
            connect,
            options,
            layout,
            excluded,
            stop: Arc::new(AtomicBool::new(false)),
            in_full_run: Arc::new(AtomicBool::new(false)),
            reported_watches: None,
        }
    }

    /// Also watches another tree, such as a local destination that a two-way step brings
    /// together with the source: its changes go into the same batches. `other` must come
    /// from [`TreeWatcher::alongside`] on this loop's watcher.
    pub fn also_watching(mut self, other: TreeWatcher) -> WatchLoop<'a> {
        self.others.push(other);
        self
    }

    fn watchers(&self) -> impl Iterator<Item = &TreeWatcher> {
        std::iter::once(&self.watcher).chain(&self.others)
    }

    /// A handle to stop the loop.
    pub fn control(&self) -> Control {
        Control {
            waker: self.watcher.waker(),
            stop: self.stop.clone(),
            in_full_run: self.in_full_run.clone(),
        }
    }

    /// Runs until stopped, then closes the destination. Failures of single batches are
    /// reported and retried, never returned.
    pub fn run(mut self, step: &mut dyn Step, monitor: &dyn Monitor, progress: &dyn Progress) {
        let mut state = LoopState::new(&self.options);
        let mut dst: Option<Box<dyn Replica>> = None;
        // Watches first, so nothing that changes during the first run goes unseen.
        state.watches_set(self.set_watches(monitor));
        loop {
            let deadline = state.deadline(&self.options);
            if !self.stop.load(Ordering::SeqCst) {
                self.gather(deadline, &mut state.coalescer, monitor);
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let Some(work) = state.next_work(&self.options) else {
                continue;
            };
            let dst_ref = match &dst {
                Some(d) => d,
                None => match (self.connect)() {
                    Ok(d) => {
                        if state.failures > 0 {
                            monitor.event(WatchEvent::Reconnected {
                                location: d.location(),
                            });
                        }
                        dst.insert(d)
                    }
                    Err(e) => {
                        state.failed(work, &e, &self.options, monitor);
                        continue;
                    }
                },
            };
            if work.structure() {
                // Before the tree is read, so nothing created in between goes unseen.
                state.watches_set(self.set_watches(monitor));
            }
            let started = Instant::now();
            let result = self.do_work(step, dst_ref.as_ref(), &work, progress);
            match result {
                Ok(mut report) => {
                    report.outcome.seconds = started.elapsed().as_secs_f64();
                    // Items that could not be written (not bad source input, which would
                    // fail the same way every time) are retried by a full run.
                    let first_error = report.outcome.report.errors.first().cloned();
                    state.done(&work, report, first_error.is_none(), monitor);
                    if let Some(e) = first_error {
                        state.retry_later(
                            &format!("not everything was written: {e}"),
                            &self.options,
                            monitor,
                        );
                    }
                }
                Err(_) if self.stop.load(Ordering::SeqCst) => break,
                Err(e) => {
                    if dst.as_ref().is_some_and(|d| d.wire_bytes().is_some()) {
                        // A remote session that failed once is not trusted again.
                        dst = None;
                    }
                    state.failed(work, &e, &self.options, monitor);
                }
            }
        }
        if let Some(Err(e)) = dst.map(|d| d.close()) {
            // Stopping anyway: the next start catches up whatever the session missed.
            monitor.event(WatchEvent::Warning {
                message: format!("closing the destination: {e}"),
            });
        }
    }

    fn do_work(
        &self,
        step: &mut dyn Step,
        dst: &dyn Replica,
        work: &Work,
        progress: &dyn Progress,
    ) -> Result<BatchReport> {
        match work {
            Work::Full { .. } => {
                self.in_full_run.store(true, Ordering::SeqCst);
                if self.stop.load(Ordering::SeqCst) {
                    return Err(Error::Interrupted);
                }
                let result = step.full(self.src, dst, progress);
                self.in_full_run.store(false, Ordering::SeqCst);
                result
            }
            Work::Batch { dirty, .. } => step.batch(self.src, dst, dirty, progress),
        }
    }

    /// Updates the watches to the tree's current folders; true when all could be set.
    fn set_watches(&mut self, monitor: &dyn Monitor) -> bool {
        let (layout, excluded) = (self.layout, self.excluded);
        let failures: Vec<_> = std::iter::once(&mut self.watcher)
            .chain(&mut self.others)
            .flat_map(|w| w.update(layout, excluded))
            .collect();
        let watches = self.watchers().map(TreeWatcher::watch_count).sum();
        if self.reported_watches.replace(watches) != Some(watches) {
            monitor.event(WatchEvent::Watching { watches });
        }
        if let Some(first) = failures.first() {
            monitor.event(WatchEvent::WatchLimit {
                count: failures.len(),
                first: format!("{}: {}", first.path.display(), first.why),
                rescan_every: (self.options.rescan_interval)
                    .min(self.options.degraded_rescan_interval),
            });
        }
        failures.is_empty()
    }

    /// Waits for changes until `deadline`, then takes whatever else is queued.
    fn gather(&self, deadline: Option<Instant>, coalescer: &mut Coalescer, monitor: &dyn Monitor) {
        let mut next = self.watcher.wait(deadline);
        while let Some(wake) = next {
            match wake {
                Wake::Stop => return,
                Wake::Fs(event) => {
                    let now = Instant::now();
                    let mut changes: Vec<Change> =
                        self.watchers().flat_map(|w| w.classify(&event)).collect();
                    // An error or an overflow is everyone's: once is enough.
                    changes.dedup();
                    for change in changes {
                        if change == Change::Everything {
                            monitor.event(WatchEvent::Overflow);
                        }
                        coalescer.note(change, now);
                    }
                }
            }
            next = self.watcher.poll();
        }
        if self.watcher.take_overflow() {
            monitor.event(WatchEvent::Overflow);
            coalescer.note(Change::Everything, Instant::now());
        }
    }
}

/// What the loop does next.
#[derive(Debug)]
enum Work {
    /// A full run.
    Full {
        /// The first change it covers, for the latency.
        since: Option<Instant>,
    },
    /// Only what changed.
    Batch {
        dirty: Dirty,
        /// The first change of the batch.
        since: Instant,
    },
}

impl Work {
    fn structure(&self) -> bool {
        match self {
            Work::Full { .. } => true,
            Work::Batch { dirty, .. } => dirty.structure || dirty.everything,
        }
    }
}

/// Timers and counters of the loop.
struct LoopState {
    coalescer: Coalescer,
    need_full: bool,
    last_full: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
    /// The first change not yet covered by a successful run, kept across failures.
    pending_since: Option<Instant>,
    /// Some directory could not be watched at the last update: full runs come more often.
    degraded: bool,
}

impl LoopState {
    fn new(options: &WatchOptions) -> LoopState {
        LoopState {
            coalescer: Coalescer::new(options.timing),
            need_full: true,
            last_full: None,
            retry_at: None,
            failures: 0,
            pending_since: None,
            degraded: false,
        }
    }

    /// Records whether the last update of the watches set them all. Each update tries the
    /// missing ones again, so one that succeeds ends the frequent full runs.
    fn watches_set(&mut self, all: bool) {
        self.degraded = !all;
    }

    fn rescan_every(&self, options: &WatchOptions) -> Duration {
        if self.degraded {
            options
                .rescan_interval
                .min(options.degraded_rescan_interval)
        } else {
            options.rescan_interval
        }
    }

    /// When the loop must wake up even if nothing happens; `None` waits for a change.
    fn deadline(&self, options: &WatchOptions) -> Option<Instant> {
        if let Some(at) = self.retry_at {
            return Some(at);
        }
        if self.need_full {
            return Some(Instant::now());
        }
        let rescan = self.last_full.map(|at| at + self.rescan_every(options));
        match (self.coalescer.due(), rescan) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn next_work(&mut self, options: &WatchOptions) -> Option<Work> {
        let now = Instant::now();
        if self.retry_at.is_some_and(|at| at > now) {
            return None;
        }
        self.retry_at = None;
        let rescan_due = self
            .last_full
            .is_some_and(|at| now >= at + self.rescan_every(options));
        if self.need_full || rescan_due {
            // A full run covers whatever is pending too.
            let since = self.pending_since.take().or(self.coalescer.first_noticed());
            self.coalescer.clear();
            return Some(Work::Full { since });
        }
        let first = self.coalescer.first_noticed();
        let dirty = self.coalescer.take(now)?;
        let since = self
            .pending_since
            .into_iter()
            .chain(first)
            .min()
            .unwrap_or(now);
        if dirty.everything {
            // Lost events: a full run, which a stop interrupts and which counts as the
            // last full run for the periodic one.
            return Some(Work::Full { since: Some(since) });
        }
        Some(Work::Batch { dirty, since })
    }

    /// Records a batch that ran; a `clean` one (nothing left to retry) ends the backoff.
    fn done(&mut self, work: &Work, report: BatchReport, clean: bool, monitor: &dyn Monitor) {
        let since = match work {
            Work::Full { since } => *since,
            Work::Batch { since, .. } => Some(*since),
        };
        if matches!(work, Work::Full { .. }) {
            self.need_full = false;
            self.last_full = Some(Instant::now());
        }
        if clean {
            self.failures = 0;
        }
        self.pending_since = None;
        monitor.event(WatchEvent::Batch {
            report: Box::new(report),
            latency: since.map(|s| s.elapsed()),
        });
    }

    fn failed(&mut self, work: Work, e: &Error, options: &WatchOptions, monitor: &dyn Monitor) {
        let since = match work {
            Work::Full { since } => since,
            Work::Batch { since, .. } => Some(since),
        };
        self.pending_since = self.pending_since.or(since);
        self.retry_later(&e.to_string(), options, monitor);
    }

    /// Schedules a full run after the backoff; whatever the failed batch held is covered
    /// by that catch-up run.
    fn retry_later(&mut self, message: &str, options: &WatchOptions, monitor: &dyn Monitor) {
        self.need_full = true;
        let retry_in = backoff(options, self.failures);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + retry_in);
        monitor.event(WatchEvent::Failed {
            message: message.to_string(),
            retry_in,
        });
    }
}

/// The delay before retry number `failures + 1`: doubling from the minimum, capped.
fn backoff(options: &WatchOptions, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX);
    options
        .retry_min
        .saturating_mul(factor)
        .min(options.retry_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let options = WatchOptions {
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            ..WatchOptions::default()
        };
        let delays: Vec<u64> = (0..10)
            .map(|n| backoff(&options, n).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            vec![
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000
            ]
        );
        assert_eq!(backoff(&options, u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn the_first_work_is_a_full_run_then_batches_wait_for_changes() {
        let options = WatchOptions::default();
        let mut state = LoopState::new(&options);
        assert!(state.deadline(&options).is_some());
        assert!(matches!(
            state.next_work(&options),
            Some(Work::Full { since: None })
        ));
        state.done(
            &Work::Full { since: None },
            BatchReport::default(),
            true,
            &NoMonitor,
        );
        // Idle: only the periodic rescan is scheduled.
        let deadline = state.deadline(&options).unwrap();
        assert!(deadline > Instant::now() + Duration::from_secs(590));
        assert!(state.next_work(&options).is_none());
        // Missing watches bring the rescan closer...
        state.watches_set(false);
        let degraded = state.deadline(&options).unwrap();
        assert!(degraded < Instant::now() + Duration::from_secs(61));
        // ...until an update sets them all (the watch limit was raised).
        state.watches_set(true);
        let deadline = state.deadline(&options).unwrap();
        assert!(deadline > Instant::now() + Duration::from_secs(590));
    }

    /// A loop state after its first full run, with a change to INBOX noticed at the
    /// returned instant, a second ago.
    fn after_a_full_run_and_a_change(options: &WatchOptions) -> (LoopState, Instant) {
        let mut state = LoopState::new(options);
        state.done(
            &Work::Full { since: None },
            BatchReport::default(),
            true,
            &NoMonitor,
        );
        let t0 = Instant::now() - Duration::from_secs(1);
        state.coalescer.note(Change::Mailbox(String::new()), t0);
        (state, t0)
    }

    #[test]
    fn lost_events_make_a_full_run_that_a_stop_can_interrupt() {
        let options = WatchOptions::default();
        let (mut state, t0) = after_a_full_run_and_a_change(&options);
        state.coalescer.note(Change::Everything, t0);
        // A full run, not a batch: `Control::stop` interrupts only a full run in flight.
        match state.next_work(&options) {
            Some(Work::Full { since: Some(since) }) => assert_eq!(since, t0),
            other => panic!("{other:?}"),
        }
        assert!(state.next_work(&options).is_none());
    }

    #[test]
    fn a_failure_schedules_a_full_catch_up_after_the_backoff() {
        let options = WatchOptions {
            retry_min: Duration::from_millis(200),
            ..WatchOptions::default()
        };
        let (mut state, t0) = after_a_full_run_and_a_change(&options);
        let work = state.next_work(&options).unwrap();
        assert!(matches!(work, Work::Batch { .. }));
        state.failed(work, &Error::Interrupted, &options, &NoMonitor);
        assert!(state.next_work(&options).is_none(), "waits for the backoff");
        std::thread::sleep(Duration::from_millis(210));
        match state.next_work(&options) {
            Some(Work::Full { since: Some(since) }) => assert_eq!(since, t0),
            other => panic!("{other:?}"),
        }
    }

    struct NoMonitor;

    impl Monitor for NoMonitor {
        fn event(&self, _event: WatchEvent) {}
    }

    /// Records what the loop reported, by kind.
    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<&'static str>>);

    impl Monitor for Seen {
        fn event(&self, event: WatchEvent) {
            let kind = match event {
                WatchEvent::Batch { report, .. } if report.full => "full",
                WatchEvent::Batch { .. } => "batch",
                WatchEvent::Failed { .. } => "failed",
                WatchEvent::Reconnected { .. } => "reconnected",
                _ => return,
            };
            self.0.lock().unwrap().push(kind);
        }
    }

    impl Seen {
        fn wait_for(&self, kinds: &[&str]) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while *self.0.lock().unwrap() != kinds {
                assert!(Instant::now() < deadline, "{:?}", self.0.lock().unwrap());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// A step that fails its first `failures` batches, then reports item errors in the
    /// next `item_errors`.
    struct Flaky {
        failures: usize,
        item_errors: usize,
        calls: Vec<&'static str>,
    }

    impl Step for Flaky {
        fn full(
            &mut self,
            _: &dyn Replica,
            _: &dyn Replica,
            _: &dyn Progress,
        ) -> Result<BatchReport> {
            self.calls.push("full");
            Ok(BatchReport {
                full: true,
                ..BatchReport::default()
            })
        }

        fn batch(
            &mut self,
            _: &dyn Replica,
            _: &dyn Replica,
            dirty: &Dirty,
            _: &dyn Progress,
        ) -> Result<BatchReport> {
            assert_eq!(dirty.mailboxes.len(), 1, "{dirty:?}");
            self.calls.push("batch");
            if self.failures > 0 {
                self.failures -= 1;
                return Err(Error::Usage("destination disk full".into()));
            }
            let mut report = BatchReport::default();
            if self.item_errors > 0 {
                self.item_errors -= 1;
                report
                    .outcome
                    .report
                    .errors
                    .push("a message: disk full".into());
            }
            Ok(report)
        }
    }

    #[test]
    fn a_failed_batch_is_retried_as_a_full_run_and_stop_ends_the_loop() {
        use crate::replica::local::LocalReplica;
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path().join("src");
        for dir in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        let src = LocalReplica::new(&root);
        let connects = std::sync::atomic::AtomicUsize::new(0);
        let dst = tree.path().join("dst");
        let connect = || -> Result<Box<dyn Replica>> {
            connects.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(LocalReplica::new(&dst)))
        };
        let options = WatchOptions {
            timing: Timing {
                debounce: Duration::from_millis(5),
                max_delay: Duration::from_millis(10),
                cap: 100,
            },
            retry_min: Duration::from_millis(10),
            ..WatchOptions::default()
        };
        let excluded = |_: &str| false;
        let watcher = TreeWatcher::new(&root).unwrap();
        let watch = WatchLoop::new(
            watcher,
            &src,
            &connect,
            options,
            (Layout::MaildirPlusPlus, &excluded),
        );
        let control = watch.control();
        let seen = Seen::default();
        let mut step = Flaky {
            failures: 1,
            item_errors: 1,
            calls: Vec::new(),
        };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                seen.wait_for(&["full"]);
                std::fs::write(root.join("new/1.M1P1.h"), b"x").unwrap();
                seen.wait_for(&["full", "failed", "full"]);
                // A batch that could not write everything is followed by a full run.
                std::fs::write(root.join("new/2.M2P1.h"), b"x").unwrap();
                seen.wait_for(&["full", "failed", "full", "batch", "failed", "full"]);
                std::fs::write(root.join("new/3.M3P1.h"), b"x").unwrap();
                seen.wait_for(&["full", "failed", "full", "batch", "failed", "full", "batch"]);
                control.stop();
            });
            watch.run(&mut step, &seen, &crate::progress::NoProgress);
        });
        let calls = ["full", "batch", "full", "batch", "full", "batch"];
        assert_eq!(step.calls, calls);
        // A local destination is kept across failures; only a remote session is reopened.
        assert_eq!(connects.load(Ordering::SeqCst), 1);
    }
}
