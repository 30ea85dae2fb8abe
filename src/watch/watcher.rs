//! Watches a local Maildir or mdbox tree with inotify (through the `notify` crate): one
//! watch per directory that matters — for Maildir the root, each mailbox directory, its
//! `cur/` and `new/`, and `LAYOUT=fs` parent directories, never `tmp/`; for mdbox the root,
//! every folder directory under `mailboxes/` and each mailbox's `dbox-Mails/` (its index
//! log is appended to on every change), never `storage/` — never one per file. Turns raw
//! events into [`Change`]s naming a mailbox. Never reads a mailbox and never writes
//! anything.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::scan::mailbox_path;
use crate::scan::mdbox::maildir_dir;
use crate::storage::maildir::layout::{Layout, decode_mutf7};
use crate::storage::mdbox::layout::{DBOX_MAILS, list_mailboxes};
use crate::watch::coalesce::Change;

/// Raw notices queued between notify's thread and the loop before the queue counts as
/// overflowed (and everything is read again).
const QUEUE: usize = 16 * 1024;

/// What a watched directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// A mailbox directory (`""` is the root, which also holds INBOX).
    Mailbox(String),
    /// `cur/` or `new/` of a mailbox.
    Messages(String),
    /// A `LAYOUT=fs` directory that only holds folders (for mdbox: `mailboxes/` and every
    /// folder directory below it).
    Parent,
    /// The root of an mdbox tree (`subscriptions`, `dovecot-uidvalidity`, `mailboxes/`).
    MdboxRoot,
    /// The `dbox-Mails/` index directory of an mdbox mailbox, by its directory in the
    /// table (as [`maildir_dir`] names it).
    MdboxIndex(String),
}

/// What kind of tree a watcher follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Maildir,
    Mdbox,
}

/// Something the loop wakes up for.
#[derive(Debug)]
pub enum Wake {
    /// A filesystem event (or an error of the watcher).
    Fs(notify::Result<notify::Event>),
    /// Stop after the batch in flight.
    Stop,
}

/// A handle that wakes the loop, for signal handlers and tests.
#[derive(Debug, Clone)]
pub struct Waker(SyncSender<Wake>);

impl Waker {
    /// Asks the loop to stop once the batch in flight is done.
    pub fn stop(&self) {
        // A full queue wakes the loop anyway, and it checks the stop flag first.
        let _ = self.0.try_send(Wake::Stop);
    }
}

/// Why a watch could not be set.
#[derive(Debug, Clone)]
pub struct WatchFailure {
    /// The directory.
    pub path: PathBuf,
    /// What the kernel said (a watch limit, usually).
    pub why: String,
}

/// The queue the watchers of one loop deliver to, and whether it overflowed.
struct Queue {
    events: Mutex<Receiver<Wake>>,
    sender: SyncSender<Wake>,
    overflowed: AtomicBool,
}

/// The inotify watches on one tree and the queue their events arrive on (shared with the
/// watcher of the other tree when both sides are watched).
pub struct TreeWatcher {
    root: PathBuf,
    inner: notify::RecommendedWatcher,
    watched: HashMap<PathBuf, Role>,
    /// Watched directories that were moved or deleted since the last update: inotify (and
    /// `notify`) dropped their watches and those of everything below them, even if the
    /// same path is back by now (renamed away and back, deleted and created again).
    /// Bounded by the number of watches.
    stale: Mutex<HashSet<PathBuf>>,
    queue: Arc<Queue>,
    format: Format,
}

impl TreeWatcher {
    /// Starts watching nothing yet under `root`; [`TreeWatcher::update`] sets the watches.
    pub fn new(root: &Path) -> notify::Result<TreeWatcher> {
        let (sender, events) = std::sync::mpsc::sync_channel(QUEUE);
        let queue = Queue {
            events: Mutex::new(events),
            sender,
            overflowed: AtomicBool::new(false),
        };
        TreeWatcher::with_queue(root, Arc::new(queue))
    }

    /// A watcher of another tree whose events arrive on this watcher's queue: the two
    /// sides of a two-way mirror, waited for as one.
    pub fn alongside(&self, root: &Path) -> notify::Result<TreeWatcher> {
        TreeWatcher::with_queue(root, self.queue.clone())
    }

    fn with_queue(root: &Path, queue: Arc<Queue>) -> notify::Result<TreeWatcher> {
        let target = queue.clone();
        let inner = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(e) = &event
                && matches!(e.kind, EventKind::Access(_))
            {
                // Opening or reading (our own scans among them) changes nothing.
                return;
            }
            if let Err(TrySendError::Full(_)) = target.sender.try_send(Wake::Fs(event)) {
                target.overflowed.store(true, Ordering::Relaxed);
            }
        })?;
        Ok(TreeWatcher {
            root: root.to_path_buf(),
            inner,
            watched: HashMap::new(),
            stale: Mutex::new(HashSet::new()),
            queue,
            format: Format::Maildir,
        })
    }

    /// Follows the tree as an mdbox tree: Dovecot changes one only through index files
    /// (appended, or replaced by rename) and `m.N` files, so the watches sit on the
    /// mailboxes' `dbox-Mails/` directories and on the folder directories, not on `cur/`
    /// and `new/`. Mailboxes are named as tables of the watch loop's layout name them.
    pub fn mdbox(mut self) -> TreeWatcher {
        self.format = Format::Mdbox;
        self
    }

    /// A handle that wakes the loop.
    pub fn waker(&self) -> Waker {
        Waker(self.queue.sender.clone())
    }

    /// Number of directories watched.
    pub fn watch_count(&self) -> usize {
        self.watched.len()
    }

    /// Sets the watches to match the tree as it is now: adds what is new, drops what went.
    /// Returns the directories that could not be watched (a limit reached): the caller
    /// falls back to periodic full rescans for them. A directory that vanished meanwhile is
    /// not a failure; its parent's event already asks for another look.
    pub fn update(&mut self, layout: Layout, excluded: &dyn Fn(&str) -> bool) -> Vec<WatchFailure> {
        let wanted = match self.format {
            Format::Maildir => wanted_watches(&self.root, layout, excluded),
            Format::Mdbox => wanted_mdbox_watches(&self.root, layout, excluded),
        };
        self.update_to(wanted)
    }

    /// [`TreeWatcher::update`] to the directories `wanted`. When the tree could not be
    /// listed (a `LAYOUT=fs` folder deleted while it was listed, no file descriptor left),
    /// every watch stays as it is and the root is reported as a failure, so the caller
    /// runs full rescans until an update succeeds; taking the listing for an empty tree
    /// would drop the watches of every mailbox, INBOX's too.
    fn update_to(&mut self, wanted: std::io::Result<HashMap<PathBuf, Role>>) -> Vec<WatchFailure> {
        let wanted = match wanted {
            Ok(wanted) => wanted,
            Err(e) => {
                return vec![WatchFailure {
                    path: self.root.clone(),
                    why: format!("cannot list the folders: {e}"),
                }];
            }
        };
        let gone: Vec<PathBuf> = self
            .watched
            .keys()
            .filter(|p| !wanted.contains_key(*p))
            .cloned()
            .collect();
        for path in gone {
            // The kernel drops the watch of a deleted directory by itself.
            let _ = self.inner.unwatch(&path);
            self.watched.remove(&path);
        }
        // A stale watch that is still wanted is set again below, without removing it
        // first: a watch that survived is only renewed, and nothing goes unseen meanwhile.
        let stale = std::mem::take(&mut *self.stale.lock().unwrap_or_else(|p| p.into_inner()));
        self.watched
            .retain(|p, _| !stale.iter().any(|s| p.starts_with(s)));
        let mut failures = Vec::new();
        let mut wanted: Vec<(PathBuf, Role)> = wanted
            .into_iter()
            .filter(|(p, role)| match self.watched.get_mut(p) {
                // Already watched: a folder that became a mailbox only changes its role.
                Some(known) => {
                    *known = role.clone();
                    false
                }
                None => true,
            })
            .collect();
        // Parents before children, so nothing created in between goes unseen.
        wanted.sort_by_key(|(p, _)| p.components().count());
        for (path, role) in wanted {
            match self.inner.watch(&path, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(path, role);
                }
                Err(e) if vanished(&e) => {}
                Err(e) => failures.push(WatchFailure {
                    path,
                    why: e.to_string(),
                }),
            }
        }
        failures
    }

    /// Waits for the next wake-up until `deadline` (forever when `None`). Blocks: no CPU
    /// while nothing happens. `None` when the deadline passed.
    pub fn wait(&self, deadline: Option<Instant>) -> Option<Wake> {
        let events = self.queue.events.lock().unwrap_or_else(|p| p.into_inner());
        let result = match deadline {
            None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => events.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        result.ok()
    }

    /// Takes the next queued wake-up without waiting.
    pub fn poll(&self) -> Option<Wake> {
        let events = self.queue.events.lock().unwrap_or_else(|p| p.into_inner());
        events.try_recv().ok()
    }

    /// Turns an event into the changes it stands for. The kernel's queue overflowing or a
    /// watcher error is `Everything` (ours overflowing: [`TreeWatcher::take_overflow`]).
    /// Paths outside this watcher's tree are not its business: they give nothing.
    pub fn classify(&self, event: &notify::Result<notify::Event>) -> Vec<Change> {
        let event = match event {
            Ok(event) if !event.need_rescan() => event,
            _ => return vec![Change::Everything],
        };
        if matches!(event.kind, EventKind::Access(_)) {
            return Vec::new();
        }
        let mut changes: Vec<Change> = event
            .paths
            .iter()
            .filter_map(|p| self.change_of(p))
            .collect();
        changes.dedup();
        changes
    }

    /// True when events were dropped since the last call.
    pub fn take_overflow(&self) -> bool {
        self.queue.overflowed.swap(false, Ordering::Relaxed)
    }

    fn change_of(&self, path: &Path) -> Option<Change> {
        if self.watched.contains_key(path) {
            // The watched directory itself went away or was moved: its watch, and those
            // below it, must be set again at the next update.
            let mut stale = self.stale.lock().unwrap_or_else(|p| p.into_inner());
            stale.insert(path.to_path_buf());
            return Some(Change::Structure);
        }
        let role = self.watched.get(path.parent()?)?;
        let name = path.file_name()?.to_str().unwrap_or("");
        classify_entry(role, name)
    }
}

/// What an entry `name` changing inside a directory with `role` means.
fn classify_entry(role: &Role, name: &str) -> Option<Change> {
    let dir = match role {
        Role::Messages(dir) => return Some(Change::Mailbox(dir.clone())),
        Role::Parent => return Some(Change::Structure),
        Role::MdboxRoot => return classify_mdbox_root(name),
        Role::MdboxIndex(dir) => return classify_mdbox_index(dir, name),
        Role::Mailbox(dir) => dir,
    };
    let is_root = dir.is_empty();
    match name {
        "dovecot-uidlist" | "dovecot-keywords" => Some(Change::Mailbox(dir.clone())),
        // Dovecot writes a new uidlist as `dovecot-uidlist.tmp` and renames it.
        n if n.ends_with(".lock") => None,
        n if n.starts_with("dovecot-uidlist.") || n.starts_with("dovecot-keywords.") => {
            Some(Change::Mailbox(dir.clone()))
        }
        // A `cur/` or `new/` that appeared needs a watch of its own.
        "cur" | "new" => Some(Change::Structure),
        "tmp" | "maildirfolder" => None,
        n if n.ends_with(".lock") || n.starts_with("dovecot.") => None,
        "subscriptions" if is_root => Some(Change::Structure),
        n if is_root && n.starts_with("dovecot-uidvalidity") => Some(Change::Structure),
        // Anything else may be a folder created, deleted or renamed.
        _ => Some(Change::Structure),
    }
}

/// What an entry `name` changing in an mdbox root means: the folder list and the root
/// files are structure; the mailbox list index, the mailbox log, `storage/` and lock and
/// temp files are not (a mailbox's own index says what changed in it).
fn classify_mdbox_root(name: &str) -> Option<Change> {
    match name {
        "subscriptions" | "mailboxes" => Some(Change::Structure),
        n if n.starts_with("dovecot-uidvalidity") && !n.ends_with(".lock") => {
            Some(Change::Structure)
        }
        _ => None,
    }
}

/// What an entry `name` changing in the `dbox-Mails/` of mailbox `dir` means: its index
/// log (appended to on every change, rotated to `.2`) and its snapshot (replaced by
/// rename) name the mailbox; the cache file and lock and temp files say nothing.
fn classify_mdbox_index(dir: &str, name: &str) -> Option<Change> {
    matches!(
        name,
        "dovecot.index" | "dovecot.index.log" | "dovecot.index.log.2"
    )
    .then(|| Change::Mailbox(dir.to_string()))
}

/// Every directory of an mdbox tree that should be watched, with its role: the root,
/// `mailboxes/` and every folder directory below it, and each mailbox's `dbox-Mails/`
/// named by its table directory. A mailbox the layout cannot name is left to the scanner,
/// which reports it. An error when the tree could not be listed.
fn wanted_mdbox_watches(
    root: &Path,
    layout: Layout,
    excluded: &dyn Fn(&str) -> bool,
) -> std::io::Result<HashMap<PathBuf, Role>> {
    let mut wanted = HashMap::new();
    wanted.insert(root.to_path_buf(), Role::MdboxRoot);
    let mailboxes = root.join("mailboxes");
    for mb in list_mailboxes(root)? {
        if excluded(&mb.name) {
            continue;
        }
        if let Some(dir) = maildir_dir(layout, &mb.dir) {
            wanted.insert(mb.index_dir, Role::MdboxIndex(dir));
        }
    }
    let folders = walkdir::WalkDir::new(&mailboxes)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| e.file_type().is_dir() && e.file_name() != DBOX_MAILS)
        .filter_map(|e| e.ok().map(walkdir::DirEntry::into_path));
    for dir in folders {
        let rel = dir.strip_prefix(&mailboxes).ok().and_then(Path::to_str);
        if rel.is_some_and(|rel| rel.is_empty() || !excluded(&decode_mutf7(rel))) {
            wanted.insert(dir, Role::Parent);
        }
    }
    Ok(wanted)
}

/// Every directory that should be watched, with its role; an error when the tree could
/// not be listed.
fn wanted_watches(
    root: &Path,
    layout: Layout,
    excluded: &dyn Fn(&str) -> bool,
) -> std::io::Result<HashMap<PathBuf, Role>> {
    let mut wanted = HashMap::new();
    wanted.insert(root.to_path_buf(), Role::Mailbox(String::new()));
    let found = layout.list_mailboxes(root)?;
    let mut dirs = found.dirs;
    if !dirs.iter().any(|d| d.is_empty()) {
        dirs.push(String::new());
    }
    for dir in dirs {
        if !dir.is_empty() && excluded(&layout.display_name(&dir)) {
            continue;
        }
        let path = mailbox_path(root, &dir);
        for sub in ["cur", "new"] {
            wanted.insert(path.join(sub), Role::Messages(dir.clone()));
        }
        wanted.insert(path, Role::Mailbox(dir));
    }
    for parent in found.parents {
        if !excluded(&layout.display_name(&parent)) {
            wanted
                .entry(mailbox_path(root, &parent))
                .or_insert(Role::Parent);
        }
    }
    // A folder directory that is not a mailbox yet (Dovecot creates `cur/` and `new/`
    // just after it): watched too, so that what appears inside is seen.
    for dir in folder_candidates(root, layout) {
        let rel = dir.strip_prefix(root).ok().and_then(Path::to_str);
        if rel.is_some_and(|rel| !excluded(&layout.display_name(rel))) {
            wanted.entry(dir).or_insert(Role::Parent);
        }
    }
    Ok(wanted)
}

/// Directories that may become folders: Maildir++ `.name` directories in the root, or
/// every directory of a `LAYOUT=fs` tree outside `cur/`, `new/` and `tmp/`. Never
/// through a symlink.
fn folder_candidates(root: &Path, layout: Layout) -> Vec<PathBuf> {
    let max_depth = match layout {
        Layout::MaildirPlusPlus => 1,
        Layout::Fs => usize::MAX,
    };
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .max_depth(max_depth)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| {
            let name = e.file_name().to_str().unwrap_or("");
            let folder = match layout {
                Layout::MaildirPlusPlus => name.starts_with('.'),
                Layout::Fs => true,
            };
            e.file_type().is_dir() && folder && !matches!(name, "cur" | "new" | "tmp")
        })
        .filter_map(|e| e.ok().map(walkdir::DirEntry::into_path))
        .collect()
}

fn vanished(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::PathNotFound => true,
        notify::ErrorKind::Io(io) => io.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(dir: &str) -> Role {
        Role::Mailbox(dir.into())
    }

    /// A temp tree with `dirs`, watched as a Maildir++ tree.
    fn watched(dirs: &[&str]) -> (tempfile::TempDir, TreeWatcher) {
        let tree = tempfile::tempdir().unwrap();
        for dir in dirs {
            std::fs::create_dir_all(tree.path().join(dir)).unwrap();
        }
        let mut watcher = TreeWatcher::new(tree.path()).unwrap();
        let failures = watcher.update(Layout::MaildirPlusPlus, &|_| false);
        assert!(failures.is_empty(), "{failures:?}");
        (tree, watcher)
    }

    fn created(path: PathBuf) -> notify::Result<notify::Event> {
        let kind = EventKind::Create(notify::event::CreateKind::Any);
        Ok(notify::Event::new(kind).add_path(path))
    }

    #[test]
    fn message_directories_name_their_mailbox() {
        let role = Role::Messages(".Sent".into());
        assert_eq!(
            classify_entry(&role, "1700000000.M1P2.host,S=10:2,S"),
            Some(Change::Mailbox(".Sent".into()))
        );
    }

    #[test]
    fn control_files_name_their_mailbox_and_noise_is_ignored() {
        let sent = mailbox(".Sent");
        assert_eq!(
            classify_entry(&sent, "dovecot-uidlist"),
            Some(Change::Mailbox(".Sent".into()))
        );
        assert_eq!(
            classify_entry(&sent, "dovecot-keywords"),
            Some(Change::Mailbox(".Sent".into()))
        );
        assert_eq!(
            classify_entry(&mailbox(""), "dovecot-uidlist.tmp"),
            Some(Change::Mailbox(String::new()))
        );
        for noise in [
            "dovecot-uidlist.lock",
            "dovecot.index.log",
            "dovecot.index.cache",
            "tmp",
            "maildirfolder",
        ] {
            assert_eq!(classify_entry(&sent, noise), None, "{noise}");
        }
    }

    #[test]
    fn folders_and_root_files_are_structure() {
        let root = mailbox("");
        for name in [".Archive", "subscriptions", "dovecot-uidvalidity", "cur"] {
            assert_eq!(
                classify_entry(&root, name),
                Some(Change::Structure),
                "{name}"
            );
        }
        assert_eq!(
            classify_entry(&root, "dovecot-uidlist"),
            Some(Change::Mailbox(String::new()))
        );
        assert_eq!(
            classify_entry(&Role::Parent, "2023"),
            Some(Change::Structure)
        );
    }

    #[test]
    fn events_map_through_the_watched_directories() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        for dir in ["cur", "new", "tmp", ".Sent/cur", ".Sent/new", ".Sent/tmp"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        let mut watcher = TreeWatcher::new(root).unwrap();
        let failures = watcher.update(Layout::MaildirPlusPlus, &|_| false);
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(watcher.watch_count(), 6);
        assert_eq!(
            watcher.classify(&created(root.join(".Sent/new/1.M1P1.h"))),
            vec![Change::Mailbox(".Sent".into())]
        );
        assert_eq!(
            watcher.classify(&created(root.join(".Drafts"))),
            vec![Change::Structure]
        );
        assert!(
            watcher
                .classify(&created(root.join(".Sent/tmp/x")))
                .is_empty()
        );
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(watcher.classify(&Ok(overflow)), vec![Change::Everything]);
        // A folder that goes away loses its watches.
        std::fs::remove_dir_all(root.join(".Sent")).unwrap();
        assert!(
            watcher
                .update(Layout::MaildirPlusPlus, &|_| false)
                .is_empty()
        );
        assert_eq!(watcher.watch_count(), 3);
    }

    #[test]
    fn folders_that_are_not_mailboxes_yet_are_watched() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        for dir in ["cur", "new", "tmp", ".Empty", "not-a-folder", ".Full/cur"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::create_dir_all(root.join(".Full/new")).unwrap();
        let mut watcher = TreeWatcher::new(root).unwrap();
        assert!(
            watcher
                .update(Layout::MaildirPlusPlus, &|_| false)
                .is_empty()
        );
        // root, cur, new, .Empty, .Full, .Full/cur, .Full/new
        assert_eq!(watcher.watch_count(), 7);
        assert_eq!(
            watcher.classify(&created(root.join(".Empty/cur"))),
            vec![Change::Structure]
        );
        // Once it is a mailbox, its `cur/` and `new/` are watched too and it names itself.
        std::fs::create_dir_all(root.join(".Empty/new")).unwrap();
        assert!(
            watcher
                .update(Layout::MaildirPlusPlus, &|_| false)
                .is_empty()
        );
        assert_eq!(watcher.watch_count(), 8);
        assert_eq!(
            watcher.classify(&created(root.join(".Empty/dovecot-uidlist"))),
            vec![Change::Mailbox(".Empty".into())]
        );
        let fs_tree = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(fs_tree.path().join("Clients/Acme")).unwrap();
        let mut fs_watcher = TreeWatcher::new(fs_tree.path()).unwrap();
        assert!(fs_watcher.update(Layout::Fs, &|_| false).is_empty());
        assert_eq!(fs_watcher.watch_count(), 3, "root, Clients, Clients/Acme");
        let mut excluding = TreeWatcher::new(fs_tree.path()).unwrap();
        assert!(
            excluding
                .update(Layout::Fs, &|name| name == "Clients/Acme")
                .is_empty()
        );
        assert_eq!(excluding.watch_count(), 2, "root, Clients");
    }

    #[test]
    fn a_flood_nobody_reads_is_reported_as_an_overflow() {
        let (tree, watcher) = watched(&["cur", "new", "tmp"]);
        let root = tree.path();
        // More events than either queue holds, none read meanwhile.
        for n in 0..(QUEUE + 1000) {
            std::fs::write(root.join(format!("new/{n}")), b"").unwrap();
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut everything = false;
        while !everything && Instant::now() < deadline {
            everything = watcher.take_overflow();
            while let Some(Wake::Fs(event)) = watcher.poll() {
                everything |= watcher.classify(&event).contains(&Change::Everything);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(everything, "an overflow must ask for everything");
    }

    #[test]
    fn two_trees_share_one_queue_and_each_names_its_own_mailboxes() {
        let trees = tempfile::tempdir().unwrap();
        let (a, b) = (trees.path().join("a"), trees.path().join("b"));
        for root in [&a, &b] {
            for dir in ["cur", "new", "tmp", ".Sent/cur", ".Sent/new"] {
                std::fs::create_dir_all(root.join(dir)).unwrap();
            }
        }
        let mut first = TreeWatcher::new(&a).unwrap();
        let mut second = first.alongside(&b).unwrap();
        assert!(first.update(Layout::MaildirPlusPlus, &|_| false).is_empty());
        assert!(
            second
                .update(Layout::MaildirPlusPlus, &|_| false)
                .is_empty()
        );
        std::fs::write(b.join(".Sent/new/1.M1P1.h"), b"x").unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = (Vec::new(), Vec::new());
        while seen.1.is_empty() {
            let Some(Wake::Fs(event)) = first.wait(Some(deadline)) else {
                panic!("no event from the second tree on the shared queue");
            };
            seen.0.extend(first.classify(&event));
            seen.1.extend(second.classify(&event));
        }
        assert!(seen.0.is_empty(), "{seen:?}");
        assert_eq!(seen.1, vec![Change::Mailbox(".Sent".into())]);
    }

    /// Classifies wake-ups until one gives `want`; false when none did within 5 s.
    fn wait_for_change(watcher: &TreeWatcher, want: &Change) -> bool {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while let Some(wake) = watcher.wait(Some(deadline)) {
            if let Wake::Fs(event) = wake
                && watcher.classify(&event).contains(want)
            {
                return true;
            }
        }
        false
    }

    #[test]
    fn a_folder_renamed_away_and_back_before_the_update_is_watched_again() {
        let (tree, mut watcher) = watched(&["cur", "new", "tmp", ".Sent/cur", ".Sent/new"]);
        let root = tree.path();
        // Within one batch window: inotify drops the watches of a directory moved away,
        // and the path is back when the watches are next updated.
        std::fs::rename(root.join(".Sent"), root.join(".Away")).unwrap();
        std::fs::rename(root.join(".Away"), root.join(".Sent")).unwrap();
        // Events arrive in order: once this one is in, so are those of the renames.
        std::fs::write(root.join("new/marker"), b"").unwrap();
        assert!(wait_for_change(&watcher, &Change::Mailbox(String::new())));
        assert!(
            watcher
                .update(Layout::MaildirPlusPlus, &|_| false)
                .is_empty()
        );
        std::fs::write(root.join(".Sent/new/1.M1P1.h"), b"x").unwrap();
        assert!(
            wait_for_change(&watcher, &Change::Mailbox(".Sent".into())),
            "a delivery into the folder that came back was not seen"
        );
    }

    #[test]
    fn a_listing_that_fails_keeps_every_watch_and_says_so() {
        let (tree, mut watcher) = watched(&["cur", "new", "tmp", ".Sent/cur", ".Sent/new"]);
        let before = watcher.watch_count();
        // As when an fs-layout folder is deleted while the tree is listed.
        let vanished = std::io::Error::from(std::io::ErrorKind::NotFound);
        let failures = watcher.update_to(Err(vanished));
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].why.contains("cannot list"), "{failures:?}");
        assert_eq!(watcher.watch_count(), before);
        std::fs::write(tree.path().join("new/1.M1P1.h"), b"x").unwrap();
        assert!(wait_for_change(&watcher, &Change::Mailbox(String::new())));
    }

    #[test]
    fn mdbox_index_files_name_their_mailbox_and_noise_is_ignored() {
        let index = Role::MdboxIndex(".Archive.2023".into());
        for name in ["dovecot.index.log", "dovecot.index", "dovecot.index.log.2"] {
            assert_eq!(
                classify_entry(&index, name),
                Some(Change::Mailbox(".Archive.2023".into())),
                "{name}"
            );
        }
        for noise in [
            "dovecot.index.cache",
            "dovecot.index.tmp",
            "dovecot.index.log.newlock",
            "dovecot.index.cache.lock",
        ] {
            assert_eq!(classify_entry(&index, noise), None, "{noise}");
        }
        for name in ["subscriptions", "mailboxes", "dovecot-uidvalidity.6b03d542"] {
            assert_eq!(
                classify_entry(&Role::MdboxRoot, name),
                Some(Change::Structure),
                "{name}"
            );
        }
        for noise in [
            "storage",
            "dovecot.list.index.log",
            "dovecot.mailbox.log",
            "subscriptions.lock",
        ] {
            assert_eq!(classify_entry(&Role::MdboxRoot, noise), None, "{noise}");
        }
    }

    #[test]
    fn mdbox_trees_are_watched_at_their_index_directories() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        for dir in [
            "storage",
            "mailboxes/INBOX/dbox-Mails",
            "mailboxes/Archive/dbox-Mails",
            "mailboxes/Archive/2023/dbox-Mails",
            "mailboxes/Clients/Acme",
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        let mut watcher = TreeWatcher::new(root).unwrap().mdbox();
        assert!(
            watcher
                .update(Layout::MaildirPlusPlus, &|_| false)
                .is_empty()
        );
        // root; mailboxes, INBOX, Archive, Archive/2023, Clients, Clients/Acme; three
        // dbox-Mails. Never storage/.
        assert_eq!(watcher.watch_count(), 10);
        let index = |dir: &str| root.join("mailboxes").join(dir).join(DBOX_MAILS);
        let mailbox = |dir: &str| vec![Change::Mailbox(dir.into())];
        for (path, want) in [
            (
                index("Archive/2023").join("dovecot.index.log"),
                mailbox(".Archive.2023"),
            ),
            (index("INBOX").join("dovecot.index"), mailbox("")),
            (index("Clients/Acme"), vec![Change::Structure]),
            (root.join("storage/m.4"), vec![]),
        ] {
            assert_eq!(watcher.classify(&created(path.clone())), want, "{path:?}");
        }
        // The same tree in fs layout names the mailbox by its path; an excluded mailbox
        // and its folder directory are not watched.
        let mut fs = TreeWatcher::new(root).unwrap().mdbox();
        assert!(
            fs.update(Layout::Fs, &|name| name == "Archive/2023")
                .is_empty()
        );
        assert_eq!(fs.watch_count(), 8);
        assert_eq!(
            fs.classify(&created(index("Archive").join("dovecot.index.log"))),
            vec![Change::Mailbox("Archive".into())]
        );
        // A real append to an index log wakes the waiter with its mailbox.
        std::fs::write(index("Archive/2023").join("dovecot.index.log"), b"x").unwrap();
        assert!(wait_for_change(
            &watcher,
            &Change::Mailbox(".Archive.2023".into())
        ));
    }

    #[test]
    fn a_real_delivery_wakes_the_waiter() {
        let (tree, watcher) = watched(&["cur", "new", "tmp"]);
        let root = tree.path();
        std::fs::write(root.join("tmp/m"), b"x").unwrap();
        std::fs::rename(root.join("tmp/m"), root.join("new/m")).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = Vec::new();
        while let Some(Wake::Fs(event)) = watcher.wait(Some(deadline)) {
            seen.extend(watcher.classify(&event));
            if !seen.is_empty() {
                break;
            }
        }
        assert_eq!(seen, vec![Change::Mailbox(String::new())]);
    }
}
