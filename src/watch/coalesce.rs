//! The coalescer: a pure function of change notices and a clock. It gathers the mailboxes
//! that changed into one batch and says when that batch is due: once nothing new arrived
//! for the debounce window, or at the latest a fixed delay after the first notice, so a
//! constant stream of deliveries still flushes. Never reads the real clock or the disk.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// What one notice from the watcher says changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Something inside one mailbox (`""` is INBOX): its messages, uidlist or keywords.
    Mailbox(String),
    /// The tree's structure: a folder created, deleted or renamed, `subscriptions`,
    /// `dovecot-uidvalidity`, or a directory whose watch went away.
    Structure,
    /// Anything may have changed: the event queue overflowed, or a watch could not be set.
    Everything,
}

/// The work of one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Mailboxes to read again on both sides.
    pub mailboxes: BTreeSet<String>,
    /// The mailbox list and root files must be read again too.
    pub structure: bool,
    /// Read everything again.
    pub everything: bool,
}

impl Dirty {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.mailboxes.is_empty() && !self.structure && !self.everything
    }

    /// Adds one change. Past `cap` distinct mailboxes the set gives way to `everything`,
    /// so memory stays bounded whatever the event rate.
    fn add(&mut self, change: Change, cap: usize) {
        match change {
            Change::Mailbox(dir) if !self.everything => {
                self.mailboxes.insert(dir);
                if self.mailboxes.len() > cap {
                    self.mark_everything();
                }
            }
            Change::Mailbox(_) => {}
            Change::Structure => self.structure = true,
            Change::Everything => self.mark_everything(),
        }
    }

    fn mark_everything(&mut self) {
        self.everything = true;
        self.structure = true;
        self.mailboxes.clear();
    }
}

/// Timing of the coalescer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A batch is due once no notice arrived for this long.
    pub debounce: Duration,
    /// ...and at the latest this long after its first notice.
    pub max_delay: Duration,
    /// Distinct mailboxes kept before the batch becomes "everything".
    pub cap: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            debounce: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            cap: 10_000,
        }
    }
}

/// Gathers changes into batches.
#[derive(Debug, Clone)]
pub struct Coalescer {
    timing: Timing,
    pending: Dirty,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new(timing: Timing) -> Coalescer {
        Coalescer {
            timing,
            pending: Dirty::default(),
            first: None,
            last: None,
        }
    }

    /// Records a change noticed at `now`.
    pub fn note(&mut self, change: Change, now: Instant) {
        self.pending.add(change, self.timing.cap);
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the pending batch is due; `None` when nothing is pending.
    pub fn due(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.timing.debounce).min(first + self.timing.max_delay))
    }

    /// When the first change of the pending batch was noticed.
    pub fn first_noticed(&self) -> Option<Instant> {
        self.first
    }

    /// Drops what is pending (a full run covers it).
    pub fn clear(&mut self) {
        self.first = None;
        self.last = None;
        self.pending = Dirty::default();
    }

    /// The pending batch, when it is due at `now`.
    pub fn take(&mut self, now: Instant) -> Option<Dirty> {
        if self.due()? > now {
            return None;
        }
        self.first = None;
        self.last = None;
        Some(std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn coalescer(cap: usize) -> Coalescer {
        Coalescer::new(Timing {
            debounce: ms(50),
            max_delay: ms(200),
            cap,
        })
    }

    fn inbox() -> Change {
        Change::Mailbox(String::new())
    }

    #[test]
    fn nothing_pending_is_never_due() {
        let mut c = coalescer(10);
        assert_eq!(c.due(), None);
        assert_eq!(c.take(Instant::now()), None);
    }

    #[test]
    fn a_burst_becomes_one_batch_after_the_quiet_window() {
        let t0 = Instant::now();
        let mut c = coalescer(10);
        c.note(inbox(), t0);
        c.note(Change::Mailbox(".Sent".into()), t0 + ms(10));
        c.note(inbox(), t0 + ms(20));
        assert_eq!(c.due(), Some(t0 + ms(70)));
        assert_eq!(c.take(t0 + ms(69)), None);
        let batch = c.take(t0 + ms(70)).unwrap();
        assert_eq!(
            batch.mailboxes.into_iter().collect::<Vec<_>>(),
            vec![String::new(), ".Sent".to_string()]
        );
        assert!(!batch.structure && !batch.everything);
        assert_eq!(c.due(), None);
    }

    #[test]
    fn a_constant_stream_still_flushes_at_the_max_delay() {
        let t0 = Instant::now();
        let mut c = coalescer(10);
        let mut flushed = Vec::new();
        for i in 0..50u64 {
            let now = t0 + ms(i * 20);
            if c.take(now).is_some() {
                flushed.push(i * 20);
            }
            c.note(inbox(), now);
        }
        // Notices every 20 ms never leave a 50 ms gap; the 200 ms cap flushes anyway.
        assert_eq!(flushed, vec![200, 400, 600, 800]);
    }

    #[test]
    fn too_many_mailboxes_become_everything_and_stay_bounded() {
        let t0 = Instant::now();
        let mut c = coalescer(3);
        for i in 0..100 {
            c.note(Change::Mailbox(format!(".F{i}")), t0);
        }
        let batch = c.take(t0 + ms(50)).unwrap();
        assert!(batch.everything && batch.structure);
        assert!(batch.mailboxes.is_empty());
    }

    #[test]
    fn structure_and_overflow_are_kept() {
        let t0 = Instant::now();
        let mut c = coalescer(10);
        c.note(Change::Structure, t0);
        c.note(inbox(), t0);
        let batch = c.take(t0 + ms(50)).unwrap();
        assert!(batch.structure && !batch.everything);
        assert_eq!(batch.mailboxes.len(), 1);
        c.note(Change::Everything, t0 + ms(60));
        c.note(inbox(), t0 + ms(61));
        let batch = c.take(t0 + ms(200)).unwrap();
        assert!(batch.everything && batch.mailboxes.is_empty());
    }
}
