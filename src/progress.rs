//! How the library reports what it is doing: a [`Progress`] trait the CLI renders as a bar,
//! periodic lines or JSON, and tests collect. The library never prints.

/// One thing that happened.
#[derive(Debug, Clone)]
pub enum Event {
    /// A scan of one side started.
    ScanStarted {
        /// Which side ("source", "destination").
        side: &'static str,
    },
    /// One mailbox was scanned.
    MailboxScanned {
        /// Messages found in it.
        messages: u64,
    },
    /// The plan is known: this much work follows.
    PlanReady {
        /// Operations to apply.
        operations: u64,
        /// Bytes of message data to copy.
        bytes: u64,
    },
    /// One operation was done (or, in a dry run, would be done); `line` is the itemized text.
    Applied {
        /// Itemized description, e.g. `copy INBOX uid 12`.
        line: String,
        /// Message bytes it copied.
        bytes: u64,
    },
    /// Several operations were done on a remote replica, reported without their lines.
    Progressed {
        /// How many.
        operations: u64,
        /// Message bytes they copied.
        bytes: u64,
    },
    /// Something went wrong with one item; the run goes on.
    Warning {
        /// The message, naming the path.
        message: String,
    },
}

/// Receives events; must be callable from rayon worker threads.
pub trait Progress: Sync {
    /// Handles one event.
    fn event(&self, event: Event);
}

/// Ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _event: Event) {}
}

/// Collects events, for tests.
#[derive(Debug, Default)]
pub struct CollectProgress {
    /// Everything received, in order.
    pub events: std::sync::Mutex<Vec<Event>>,
}

impl Progress for CollectProgress {
    fn event(&self, event: Event) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }
}
