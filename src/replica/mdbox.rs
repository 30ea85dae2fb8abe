//! A local mdbox root as a replica: scanned by the mdbox scanner, bodies handed out as byte
//! ranges of the mapped `m.N` files with the received date as mtime. Plans are applied by
//! the mdbox applier only when the replica was opened offline (the caller asserted that no
//! Dovecot uses the tree); otherwise it only reads.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::model::Subdir;
use crate::progress::Progress;
use crate::replica::{Body, BodyData, BodyError, BodySource, Replica};
use crate::runlock::RunLock;
use crate::scan::{self, ScanOptions};
use crate::storage::maildir::layout::Layout;
use crate::storage::maildir::writer::BodyMeta;
use crate::storage::mdbox::store::{RangeReader, Store};
use crate::sync::apply::{ApplyOptions, ApplyReport};
use crate::sync::plan::Plan;
use crate::table::{MailTable, MailboxTable};

/// Body locations of one mailbox: base name → (`m.N` id, offset).
type Locations = HashMap<String, (u32, u32)>;

/// An mdbox root on this machine: read-only unless opened with [`MdboxReplica::offline`].
pub struct MdboxReplica {
    root: PathBuf,
    store: Store,
    /// Mailbox directory (as the table names it) → its body locations, from the last scan.
    locations: Mutex<HashMap<String, Locations>>,
    /// The layout the last scan named mailbox directories in (plans use it too).
    layout: Mutex<Layout>,
    /// True when plans may be applied (no Dovecot uses the tree).
    offline: bool,
    /// Held while this replica lives, when a run will write it.
    _run_lock: Option<RunLock>,
}

impl MdboxReplica {
    /// The mdbox root `root`, read-only.
    pub fn new(root: &Path) -> MdboxReplica {
        MdboxReplica {
            root: root.to_path_buf(),
            store: Store::new(root),
            locations: Mutex::new(HashMap::new()),
            layout: Mutex::new(Layout::MaildirPlusPlus),
            offline: false,
            _run_lock: None,
        }
    }

    /// The same replica, holding `lock` (on its root), if any, for as long as it lives.
    pub fn holding(self, lock: Option<RunLock>) -> MdboxReplica {
        MdboxReplica {
            _run_lock: lock,
            ..self
        }
    }

    /// The mdbox root `root`, writable: the caller asserts that no Dovecot uses it.
    pub fn offline(root: &Path) -> MdboxReplica {
        MdboxReplica {
            offline: true,
            ..MdboxReplica::new(root)
        }
    }

    /// The mdbox root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The layout the last scan named mailbox directories in (Maildir++ before any scan);
    /// plans name them the same way.
    pub fn layout(&self) -> Layout {
        *self.layout.lock().expect("layout lock")
    }

    /// Why this replica refuses plans, naming the path: it was not opened offline.
    pub fn read_only(&self) -> Option<String> {
        (!self.offline).then(|| {
            format!(
                "{}: an mdbox tree; writing into it needs --offline: mdsync takes none of \
                 Dovecot's index locks, so no Dovecot may use it during the run",
                self.location()
            )
        })
    }

    /// Reads the mailboxes `dirs` again, the map index once for all of them. Dovecot
    /// appends new messages to an existing `m.N` (and a purge replaces files): a mapping
    /// made before would end short of them, so the store starts afresh.
    fn rescan_batch(&self, layout: Layout, dirs: &[String]) -> Vec<MailboxTable> {
        self.store.clear();
        let tables = scan::mdbox::rescan_mailboxes(&self.root, layout, dirs, &self.store);
        tables.iter().for_each(|t| self.remember(t));
        tables
    }

    fn remember(&self, mailbox: &MailboxTable) {
        let places: Locations = (0..mailbox.dbox.file_id.len())
            .map(|i| {
                let loc = (mailbox.dbox.file_id[i], mailbox.dbox.offset[i]);
                (mailbox.base(i).to_string(), loc)
            })
            .collect();
        let mut all = self.locations.lock().expect("locations lock");
        all.insert(mailbox.dir.clone(), places);
    }

    fn locate(&self, dir: &str, name: &str) -> Result<(u32, u32), BodyError> {
        let base = name.split(':').next().unwrap_or(name);
        let all = self.locations.lock().expect("locations lock");
        all.get(dir)
            .and_then(|m| m.get(base).copied())
            .ok_or_else(|| BodyError::Vanished(format!("{} {dir}/{name}", self.root.display())))
    }

    /// The body of message `name` in mailbox `dir`, with its metadata.
    fn body(&self, dir: &str, name: &str) -> Result<Body<'_>, BodyError> {
        let (file_id, offset) = self.locate(dir, name)?;
        let (file, msg) = self
            .store
            .message(file_id, offset, 0)
            .map_err(|e| BodyError::Failed(e.to_string()))?;
        let received = msg.meta.received.map(|r| r as i64);
        let meta = BodyMeta {
            mtime: (received.unwrap_or(file.meta.mtime()), 0),
            mode: file.meta.permissions().mode() & 0o666,
            uid: file.meta.uid(),
            gid: file.meta.gid(),
            len: msg.body.len() as u64,
        };
        let origin = format!("{}@{offset}", file.path.display());
        Ok(Body {
            data: BodyData::Stream(Box::new(RangeReader::new(file, msg.body))),
            meta,
            origin,
        })
    }
}

impl BodySource for MdboxReplica {
    fn open_body(&self, dir: &str, _sub: Subdir, name: &str) -> Result<Body<'_>, BodyError> {
        self.body(dir, name)
    }
}

impl Replica for MdboxReplica {
    fn location(&self) -> String {
        crate::replica::local::resolve(&self.root)
            .display()
            .to_string()
    }

    fn detect_layout(&self) -> Result<Option<Layout>> {
        Ok(None)
    }

    fn scan(&self, options: &ScanOptions, progress: &dyn Progress) -> Result<MailTable> {
        self.store.clear();
        let table = scan::mdbox::scan(&self.root, options, progress, &self.store)?;
        *self.layout.lock().expect("layout lock") = table.layout;
        table.mailboxes.iter().for_each(|m| self.remember(m));
        Ok(table)
    }

    fn rescan_mailbox(&self, layout: Layout, dir: &str) -> MailboxTable {
        let mut tables = self.rescan_batch(layout, &[dir.to_string()]);
        tables.pop().expect("one table per directory")
    }

    fn rescan_mailboxes(&self, layout: Layout, dirs: &[String]) -> Result<Vec<MailboxTable>> {
        Ok(self.rescan_batch(layout, dirs))
    }

    fn content_hash(&self, dir: &str, _sub: Subdir, name: &str) -> Result<u128, BodyError> {
        let mut body = self.body(dir, name)?;
        let mut bytes = Vec::with_capacity(body.meta.len as usize);
        body.data
            .as_read()
            .read_to_end(&mut bytes)
            .map_err(|e| BodyError::Failed(format!("{}: {e}", body.origin)))?;
        Ok(xxhash_rust::xxh3::xxh3_128(&bytes))
    }

    fn check_writable(&self) -> Result<()> {
        self.read_only()
            .map_or(Ok(()), |why| Err(Error::Usage(why)))
    }

    fn apply(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        _options: &ApplyOptions,
        progress: &dyn Progress,
    ) -> Result<ApplyReport> {
        self.check_writable()?;
        crate::sync::apply_mdbox::apply(&self.root, self.layout(), plan, source, progress)
    }
}
