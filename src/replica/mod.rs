//! Replicas: the two sides of a sync behind one trait — scan into a table, hand out message
//! bodies, apply a plan. The brain talks only to this trait, so a remote replica plugs in
//! without touching the differ or the planner.

pub mod baseline;
pub mod local;
pub mod mdbox;
pub mod remote;
pub mod spool;

use std::collections::HashMap;
use std::fs::File;

use crate::error::Result;
use crate::model::{MailboxStamps, Subdir};
use crate::progress::Progress;
use crate::scan::ScanOptions;
use crate::storage::maildir::layout::Layout;
use crate::storage::maildir::writer::BodyMeta;
use crate::sync::apply::{ApplyOptions, ApplyReport};
use crate::sync::plan::Plan;
use crate::table::{MailTable, MailboxTable};

/// A message body ready to be copied.
pub struct Body<'a> {
    /// Where the bytes come from.
    pub data: BodyData<'a>,
    /// mtime, mode and owner of the source file.
    pub meta: BodyMeta,
    /// Where it was read from, for messages to the user (a path, or `host:path`).
    pub origin: String,
}

/// The bytes of a body.
pub enum BodyData<'a> {
    /// An open local file (copied with `copy_file_range`).
    File(File),
    /// Bytes arriving from a remote peer, read straight into the temp file.
    Stream(Box<dyn std::io::Read + 'a>),
}

impl BodyData<'_> {
    /// The bytes as a plain reader (for sending; the applier keeps `File` for
    /// `copy_file_range`).
    pub fn as_read(&mut self) -> &mut dyn std::io::Read {
        match self {
            BodyData::File(file) => file,
            BodyData::Stream(stream) => stream,
        }
    }
}

/// Why a body could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The message disappeared (expunged by Dovecot meanwhile): skip it, re-run later.
    #[error("{0}: vanished (expunged meanwhile?)")]
    Vanished(String),
    /// Anything else, with the path.
    #[error("{0}")]
    Failed(String),
}

/// Something that can hand out message bodies by mailbox, subdirectory and file name.
pub trait BodySource: Sync {
    /// Opens one body. A file renamed since the scan (a flag change) is found again by its
    /// base name.
    fn open_body(&self, dir: &str, sub: Subdir, name: &str) -> Result<Body<'_>, BodyError>;

    /// True when bodies arrive as one stream: the applier then announces every body it will
    /// open, in order, and opens them one at a time in that order (it may skip some).
    fn sequential(&self) -> bool {
        false
    }

    /// Tells a sequential source every body the applier will open, in order, so that it
    /// can ask for all of them in one round trip.
    fn announce(&self, _keys: &[Key]) -> Result<(), BodyError> {
        Ok(())
    }

    /// Waits until every body this source will hand out is in, and says whether it was
    /// delivered whole. The applier asks before it changes anything Dovecot sees, so a
    /// far side whose answer broke off leaves this side as it was. Only a gated spool
    /// (see [`spool::Spool::gated`]) ever waits or fails.
    fn settled(&self) -> Result<()> {
        Ok(())
    }
}

pub use crate::wire::codec::Key;

/// Runs `work` with a `meanwhile` that does its job at most once, then makes sure it ran
/// exactly once: when `work` never got to call it (it failed first, or had no moment for
/// it), it runs after. The contract of [`Replica::apply_overlapping`].
pub(crate) fn with_meanwhile_once<T>(
    meanwhile: &(dyn Fn() + Sync),
    work: impl FnOnce(&(dyn Fn() + Sync)) -> T,
) -> T {
    // A flag rather than `Once`: a `meanwhile` that panics must not poison the second call.
    let ran = std::sync::atomic::AtomicBool::new(false);
    let once = || {
        if !ran.swap(true, std::sync::atomic::Ordering::SeqCst) {
            meanwhile();
        }
    };
    let done = work(&once);
    once();
    done
}

/// One side of a sync.
pub trait Replica: BodySource + Send {
    /// Where this replica lives, for messages.
    fn location(&self) -> String;

    /// The folder layout this replica's folders show, `None` when it has no folder yet.
    fn detect_layout(&self) -> Result<Option<Layout>>;

    /// True while the replica's connection is still being set up (a remote side whose
    /// ssh has not answered yet): the local side then leaves ssh a core.
    fn connecting(&self) -> bool {
        false
    }

    /// Scans the whole replica.
    fn scan(&self, options: &ScanOptions, progress: &dyn Progress) -> Result<MailTable>;

    /// Applies a plan like [`Replica::apply`] and runs `meanwhile` while the applier waits
    /// for its closing sync: work that needs the CPU but not this replica's durability,
    /// such as writing scan caches. `meanwhile` runs once, also when the apply fails; the
    /// default runs it afterwards. It must not use this replica: a remote one runs it
    /// while its connection is held for the apply.
    fn apply_overlapping(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        options: &ApplyOptions,
        progress: &dyn Progress,
        meanwhile: &(dyn Fn() + Sync),
    ) -> Result<ApplyReport> {
        let report = self.apply(plan, source, options, progress);
        meanwhile();
        report
    }

    /// Applies a plan like [`Replica::apply_overlapping`] and reads from this replica into
    /// `into` (made by [`spool::Spool::gated`] for `wanted`) the bodies `wanted` that the
    /// other side's plan copies, settling it once they are in (before the apply's answer
    /// is awaited), so that the other side's apply runs beside this one. It settles `into`
    /// before anything that may wait for the thread pool (`meanwhile` among it): the other
    /// side's apply holds pool threads while it waits for bodies. The default reads
    /// them first, then applies; a remote replica asks for them with the plan, and they
    /// come back while the plan's own bodies go out.
    fn apply_reading_ahead(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        options: &ApplyOptions,
        progress: &dyn Progress,
        meanwhile: &(dyn Fn() + Sync),
        (wanted, into): (&[Key], &spool::Spool),
    ) -> Result<ApplyReport> {
        into.fill_announcing(self, wanted, || Ok(()));
        self.apply_overlapping(plan, source, options, progress, meanwhile)
    }

    /// Keeps what a scan with [`ScanOptions::defer_cache_writes`] listed in this replica's
    /// scan cache, except the mailboxes `changed` names (the run wrote to them since). A
    /// replica without a scan cache keeps nothing. Errors only cost speed next time.
    fn save_scan_cache(
        &self,
        options: &ScanOptions,
        table: &MailTable,
        changed: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<()> {
        let _ = (options, table, changed);
        Ok(())
    }

    /// The current stamps of the mailboxes in `dirs` (those that exist), when this replica
    /// can take them without a round trip: a local one. The brain uses them to tell the
    /// other side, before it scans, which mailboxes changed here. `None` when not cheap.
    fn stamps_now(&self, dirs: &[String]) -> Option<HashMap<String, MailboxStamps>> {
        let _ = dirs;
        None
    }

    /// Scans one mailbox again (to confirm that a message is really gone).
    fn rescan_mailbox(&self, layout: Layout, dir: &str) -> MailboxTable;

    /// Scans several mailboxes again, in the order given (`watch`'s changed mailboxes):
    /// one round trip for a remote replica. Unlike [`Replica::rescan_mailbox`], a replica
    /// that cannot answer at all (a lost connection) is an error, not a broken mailbox.
    fn rescan_mailboxes(&self, layout: Layout, dirs: &[String]) -> Result<Vec<MailboxTable>> {
        use rayon::prelude::*;
        Ok(dirs
            .par_iter()
            .map(|dir| self.rescan_mailbox(layout, dir))
            .collect())
    }

    /// xxh3-128 of a message's bytes, to settle identity when GUIDs disagree.
    fn content_hash(&self, dir: &str, sub: Subdir, name: &str) -> Result<u128, BodyError>;

    /// Content hashes of many messages, in order: one round trip for a remote replica.
    fn content_hashes(&self, keys: &[Key]) -> Vec<Result<u128, BodyError>> {
        use rayon::prelude::*;
        keys.par_iter()
            .map(|k| self.content_hash(&k.dir, k.sub, &k.name))
            .collect()
    }

    /// Refuses a replica that would refuse any plan (an mdbox tree opened without
    /// `--offline`, here or on the far side), so that a run that is going to write into it
    /// stops before anything is written on either side. Opens a remote replica.
    fn check_writable(&self) -> Result<()> {
        Ok(())
    }

    /// Bytes sent to and received from a remote replica (`None` for a local one).
    fn wire_bytes(&self) -> Option<(u64, u64)> {
        None
    }

    /// Ends the session with a remote replica cleanly; a no-op for a local one.
    fn close(&self) -> Result<()> {
        Ok(())
    }

    /// Applies a plan, fetching bodies from `source`.
    fn apply(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        options: &ApplyOptions,
        progress: &dyn Progress,
    ) -> Result<ApplyReport>;
}
