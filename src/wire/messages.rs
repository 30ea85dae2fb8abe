//! The JSON control messages of the protocol: requests, answers and progress events, with
//! the root facts of a scan. Plain data with serde derives; no I/O.

use serde::{Deserialize, Serialize};

use crate::model::MailboxStamps;
use crate::progress::Event;
use crate::storage::maildir::layout::Layout;
use crate::sync::apply::{ApplyOptions, ApplyReport};
use crate::sync::mdbox_new::NewTreeReport;
use crate::table::{Anomaly, DirMeta, MailTable};

/// What the client asks of the server, one at a time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Open the replica at `path` (relative to the server's root or home).
    Open {
        /// The path as the user wrote it after `host:`.
        path: String,
        /// Sending limit for the server, bytes per second (0 = none).
        bwlimit: u64,
        /// Use the server's scan cache.
        use_cache: bool,
        /// Send itemized lines while applying (else only counts).
        verbose: bool,
        /// Send an empty event this often (ms; 0 = never), so a client with a timeout
        /// can tell a busy far side from a dead one.
        #[serde(default)]
        keepalive_ms: u64,
        /// The user asserted that no Dovecot uses the replica during the session
        /// (`--offline`): only then may an mdbox tree be written.
        #[serde(default)]
        offline: bool,
        /// The session will write the replica: hold its run lock until the session ends,
        /// waiting this long (ms) for another mdsync run that holds it. `None`: a session
        /// that only reads takes no lock.
        #[serde(default)]
        lock_wait_ms: Option<u64>,
        /// The zstd level the server sends at (`--compress-level`), when zstd was agreed:
        /// a pull is compressed as the user asked, not only a push. Clamped to 1..=19;
        /// absent (an older client): 3.
        #[serde(default)]
        compress_level: Option<i32>,
    },
    /// Which folder layout the replica's folders show.
    DetectLayout,
    /// Scan the whole replica.
    Scan {
        /// Layout to read it with.
        layout: Option<Layout>,
        /// `--exclude` globs.
        exclude: Vec<String>,
        /// Mailboxes not to read when their stamps are still these.
        unchanged_if: Vec<(String, MailboxStamps, u64)>,
        /// The client's baselines: mailbox dir and identity (hex) of the table it holds.
        baselines: Vec<(String, String)>,
    },
    /// Scan one mailbox again.
    Rescan {
        /// Layout.
        layout: Layout,
        /// Mailbox directory.
        dir: String,
        /// Identity (hex) of the client's baseline of this mailbox.
        baseline: Option<String>,
    },
    /// Scan several mailboxes again, in one round trip (capability `CAP_RESCAN_MANY`).
    RescanMany {
        /// Layout.
        layout: Layout,
        /// Mailbox directories, each with the identity (hex) of the client's baseline.
        mailboxes: Vec<(String, Option<String>)>,
    },
    /// Content hashes of the keys in the object that follows.
    Hashes,
    /// Bodies of the keys in the object that follows.
    Bodies,
    /// Apply the plan in the object that follows; bodies follow it.
    Apply {
        /// How to write.
        options: ApplyOptions,
        /// A key list follows the plan, and the server sends those bodies (as a `Bodies`
        /// answer) while it receives the plan's (capability `CAP_APPLY_SENDS`): a two-way
        /// sync's two body transfers share the connection's two directions.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        also_send: bool,
    },
    /// Write a new mdbox tree at the opened path from the mailbox objects that follow
    /// (capability `CAP_NEW_MDBOX`); the bodies of their messages follow them.
    NewMdbox {
        /// How many mailbox objects follow.
        mailboxes: u32,
        /// The source's root facts.
        root: RootFacts,
    },
    /// End of session.
    Bye,
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// The replica is open.
    Opened {
        /// Its canonical path on the server.
        location: String,
        /// Whether it exists as a directory (a source must; a destination may be created).
        is_dir: bool,
        /// How the replica stores mail (absent from older servers: Maildir).
        #[serde(default)]
        format: StoreFormat,
        /// Why the server will refuse any plan (an mdbox tree opened without the offline
        /// assertion), naming the path; `None` when it can be written.
        #[serde(default)]
        read_only: Option<String>,
    },
    /// The detected layout.
    Layout {
        /// `None`: no folder yet.
        layout: Option<Layout>,
    },
    /// End of a scan: the mailbox objects came before.
    ScanEnd {
        /// How many mailbox objects were sent.
        mailboxes: u32,
        /// Facts of the root.
        root: RootFacts,
    },
    /// End of a rescan: one mailbox object came before.
    Rescanned,
    /// The hash answers follow as one object.
    Hashes,
    /// The plan was applied.
    Applied {
        /// What was done.
        report: ApplyReport,
    },
    /// The new mdbox tree was written.
    NewMdboxWritten {
        /// What was written.
        report: NewTreeReport,
    },
    /// The session ends.
    Bye,
}

/// How a served replica stores mail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreFormat {
    /// A Maildir tree (or a path that does not exist yet).
    #[default]
    Maildir,
    /// An mdbox root.
    Mdbox,
}

/// Everything of a [`MailTable`] but its mailboxes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootFacts {
    /// Folder layout.
    pub layout: Layout,
    /// Parent-only directories.
    pub parents: Vec<String>,
    /// Folders not followed.
    pub unfollowed: Vec<String>,
    /// The `subscriptions` file.
    pub subscriptions: Option<Vec<u8>>,
    /// `dovecot-uidvalidity`.
    pub uidvalidity_next: Option<u32>,
    /// Root mode and owner.
    pub root_meta: DirMeta,
    /// Scan start, ns since the epoch.
    pub scanned_at_ns: i64,
    /// Root-level anomalies.
    pub anomalies: Vec<Anomaly>,
}

impl RootFacts {
    /// The facts of `table`.
    pub fn of(table: &MailTable) -> RootFacts {
        RootFacts {
            layout: table.layout,
            parents: table.parents.clone(),
            unfollowed: table.unfollowed.clone(),
            subscriptions: table.subscriptions.clone(),
            uidvalidity_next: table.uidvalidity_next,
            root_meta: table.root_meta,
            scanned_at_ns: table.scanned_at_ns,
            anomalies: table.anomalies.clone(),
        }
    }

    /// A table with these facts and `mailboxes`.
    pub fn into_table(self, mut mailboxes: Vec<crate::table::MailboxTable>) -> MailTable {
        mailboxes.sort_by(|a, b| a.dir.cmp(&b.dir));
        MailTable {
            layout: self.layout,
            mailboxes,
            parents: self.parents,
            unfollowed: self.unfollowed,
            subscriptions: self.subscriptions,
            uidvalidity_next: self.uidvalidity_next,
            root_meta: self.root_meta,
            scanned_at_ns: self.scanned_at_ns,
            anomalies: self.anomalies,
        }
    }
}

/// A progress event from the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WireEvent {
    /// One mailbox was scanned.
    MailboxScanned {
        /// Its messages.
        messages: u64,
    },
    /// One itemized operation.
    Applied {
        /// The line.
        line: String,
        /// Bytes it copied.
        bytes: u64,
    },
    /// Operations done since the last event, without lines.
    Progressed {
        /// How many.
        operations: u64,
        /// Bytes copied.
        bytes: u64,
    },
    /// A per-item problem.
    Warning {
        /// The message.
        message: String,
    },
}

impl WireEvent {
    /// The library event it stands for (`None` for events the client makes itself).
    pub fn into_event(self) -> Event {
        match self {
            WireEvent::MailboxScanned { messages } => Event::MailboxScanned { messages },
            WireEvent::Applied { line, bytes } => Event::Applied { line, bytes },
            WireEvent::Progressed { operations, bytes } => Event::Progressed { operations, bytes },
            WireEvent::Warning { message } => Event::Warning { message },
        }
    }
}
