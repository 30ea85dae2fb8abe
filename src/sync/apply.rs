//! The applier: the only code that writes a mail tree. Carries out a [`Plan`] on a local
//! Maildir root the way a live Dovecot needs it — bodies staged in `tmp/` without a lock,
//! then, under `dovecot-uidlist.lock`, keywords, renames into place, expunges and the
//! uidlist. Never decides what to do; never replaces an existing message name.

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::interrupt;
use crate::progress::{Event, Progress};
use crate::replica::spool::Spool;
use crate::replica::{BodyData, BodyError, BodySource, Key};
use crate::scan::mailbox_path;
use crate::storage::maildir::dotlock::{self, DotLock, UIDLIST_TIMING, with_path};
use crate::storage::maildir::uidlist::{self, OwnedRecord};
use crate::storage::maildir::writer::{self, FsyncPolicy, Ownership};
use crate::storage::maildir::{self as md, keywords};
use crate::sync::plan::{self, CopyOp, MailboxPlan, Plan, UidlistChange, UidlistEdit};

/// How to write.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ApplyOptions {
    /// Durability policy.
    pub fsync: FsyncPolicy,
    /// Who owns created files.
    pub ownership: Ownership,
    /// Most body bytes read into memory ahead of writing them, so that work overlaps: a
    /// two-way sync with a remote side reads what the local side needs before the remote
    /// side's apply takes the connection, and `mdsync serve` receives a plan's bodies
    /// whole before staging them in parallel. Plans that copy more (and 0) stream bodies
    /// straight into the tree. A far side caps it at [`Spool::MAX_BYTES`].
    #[serde(default = "default_read_ahead")]
    pub read_ahead: u64,
}

/// What an older client that does not send `read_ahead` gets.
fn default_read_ahead() -> u64 {
    Spool::MAX_BYTES
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    /// Mailboxes created.
    pub mailboxes_created: u64,
    /// Mailboxes deleted.
    pub mailboxes_deleted: u64,
    /// Messages copied.
    pub messages_copied: u64,
    /// Bytes of message data written.
    pub bytes_copied: u64,
    /// Renames that changed flags.
    pub flag_changes: u64,
    /// Renames between `new/` and `cur/` only.
    pub moves: u64,
    /// Messages removed.
    pub expunged: u64,
    /// Messages that vanished on the source meanwhile (re-run picks up the rest).
    pub vanished: u64,
    /// Errors with single items, each naming its path.
    pub errors: Vec<String>,
}

impl ApplyReport {
    /// Adds `other`'s counts and errors to these.
    pub(crate) fn absorb(&mut self, other: ApplyReport) {
        self.mailboxes_created += other.mailboxes_created;
        self.mailboxes_deleted += other.mailboxes_deleted;
        self.messages_copied += other.messages_copied;
        self.bytes_copied += other.bytes_copied;
        self.flag_changes += other.flag_changes;
        self.moves += other.moves;
        self.expunged += other.expunged;
        self.vanished += other.vanished;
        self.errors.extend(other.errors);
    }
}

/// Applies `plan` to the Maildir at `root`.
pub fn apply(
    root: &Path,
    plan: &Plan,
    source: &dyn BodySource,
    options: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<ApplyReport> {
    apply_overlapping(root, plan, source, options, progress, &|| ())
}

/// [`apply`], running `meanwhile` while the closing `syncfs` waits for the disk (or after
/// the apply when there is none, or when it fails). `meanwhile` runs exactly once.
pub fn apply_overlapping(
    root: &Path,
    plan: &Plan,
    source: &dyn BodySource,
    options: &ApplyOptions,
    progress: &dyn Progress,
    meanwhile: &(dyn Fn() + Sync),
) -> Result<ApplyReport> {
    crate::replica::with_meanwhile_once(meanwhile, |once| {
        apply_inner(root, plan, source, options, progress, once)
    })
}

fn apply_inner(
    root: &Path,
    plan: &Plan,
    source: &dyn BodySource,
    options: &ApplyOptions,
    progress: &dyn Progress,
    meanwhile: &(dyn Fn() + Sync),
) -> Result<ApplyReport> {
    // A gated source (a spool still filling from a far side whose answer may break off)
    // is staged from as it fills, but nothing Dovecot sees changes before it is settled:
    // a plan that makes or renames folders waits for it first.
    let makes_folders = !plan.create_parents.is_empty()
        || !plan.rename_mailboxes.is_empty()
        || plan.mailboxes.iter().any(|m| m.create.is_some());
    if makes_folders {
        source.settled()?;
    }
    prepare_root(root, plan, options)?;
    rename_mailboxes(root, plan, progress)?;
    sweep(root, plan);
    for parent in &plan.create_parents {
        let path = root.join(parent);
        let meta = plan.root_meta;
        writer::create_dir_staged(
            &path,
            &root.join("tmp"),
            meta.mode,
            (meta.uid, meta.gid),
            options.ownership,
            &[],
            None,
        )
        .map_err(|e| Error::io(&path, e))?;
    }
    // Phase 1, no lock: create directories, stage every body in its mailbox's tmp/ and
    // (batch policy) write each new uidlist beside them. A streamed source (a remote peer)
    // hands bodies out in plan order, one at a time.
    let staged: Vec<Result<Prepared<'_>>> = if source.sequential() {
        announce_copies(plan, source)?;
        plan.mailboxes
            .iter()
            .map(|m| stage_mailbox(root, m, source, options, progress))
            .collect()
    } else {
        plan.mailboxes
            .par_iter()
            .map(|m| stage_mailbox(root, m, source, options, progress))
            .collect()
    };
    // A mailbox that cannot be prepared (a symlinked tmp/, a full disk) is reported and
    // left out; the others go on. An interrupt stops everything, rolling staged files back.
    let mut report = ApplyReport::default();
    let mut prepared = Vec::with_capacity(staged.len());
    for result in staged {
        match result {
            Ok(ok) => prepared.push(Some(ok)),
            Err(Error::Interrupted) => prepared.push(None),
            Err(e) => {
                report.errors.push(e.to_string());
                prepared.push(None);
            }
        }
    }
    if let Err(e) = check_interrupt().and_then(|()| source.settled()) {
        prepared.iter().flatten().for_each(|p| discard(&p.staged));
        return Err(e);
    }
    // Phase 2: bodies durable before any uidlist names them, and the new uidlists before
    // they replace the old ones — one sync for the whole run. Flag changes and moves wait
    // for no body: they rename files already in place, so they are done meanwhile, each
    // mailbox under its uidlist lock, while the disk works.
    let any_staged = prepared
        .iter()
        .flatten()
        .any(|p| !p.staged.is_empty() || p.uidlist.is_some());
    if options.fsync == FsyncPolicy::Batch && any_staged {
        let (synced, ()) = rayon::join(
            || writer::sync_filesystem(root),
            || rename_while_syncing(root, plan, &mut prepared, progress),
        );
        if let Err(e) = synced {
            prepared.iter().flatten().for_each(|p| discard(&p.staged));
            return Err(Error::io(root, e));
        }
    }
    // Expunged files are moved into their mailbox's tmp/ under the lock (a rename is cheap)
    // and unlinked by a reaper thread meanwhile, outside every lock. A kill leaves them in
    // tmp/ under mdsync's temp name, where the next run's sweep removes them.
    std::thread::scope(|scope| {
        let (trash, reaped) = std::sync::mpsc::channel::<PathBuf>();
        let reaper = scope.spawn(move || {
            for path in reaped {
                let _ = fs::remove_file(&path);
            }
        });
        let finished = commit_and_finish(
            root, plan, prepared, report, options, progress, &trash, meanwhile,
        );
        drop(trash);
        let _ = reaper.join();
        finished
    })
}

/// Phase 3 and the rest: per mailbox under its uidlist lock, renames, expunges (into
/// `trash`) and the uidlist; then mailbox deletions, root files and the closing sync,
/// with `meanwhile` running beside it.
#[allow(clippy::too_many_arguments)]
fn commit_and_finish(
    root: &Path,
    plan: &Plan,
    prepared: Vec<Option<Prepared<'_>>>,
    mut report: ApplyReport,
    options: &ApplyOptions,
    progress: &dyn Progress,
    trash: &std::sync::mpsc::Sender<PathBuf>,
    meanwhile: &(dyn Fn() + Sync),
) -> Result<ApplyReport> {
    let results: Vec<Result<ApplyReport>> = plan
        .mailboxes
        .par_iter()
        .zip(prepared)
        .filter_map(|(m, prepared)| prepared.map(|p| (m, p)))
        .map(|(m, prepared)| commit_mailbox(root, m, prepared, options, progress, trash))
        .collect();
    for result in results {
        report.absorb(result?);
    }
    check_interrupt()?;
    let mut deletes: Vec<_> = plan.delete_mailboxes.iter().collect();
    deletes.sort_by(|a, b| b.dir.cmp(&a.dir));
    for d in deletes {
        let path = mailbox_path(root, &d.dir);
        if !delete_mailbox(root, &d.dir, d.messages).map_err(|e| Error::io(&path, e))? {
            report.errors.push(format!(
                "{}: not deleted: it holds more mail than the {} messages planned for \
                 (delivered since the scan); left alone",
                path.display(),
                d.messages
            ));
            continue;
        }
        report.mailboxes_deleted += 1;
        report.expunged += d.messages;
        progress.event(Event::Applied {
            line: format!("delete   {} ({} messages)", d.name, d.messages),
            bytes: 0,
        });
    }
    // fs layout: emptied mailbox directories and dropped parents go deepest first, so a
    // parent is removed after its children.
    let emptied = plan
        .delete_mailboxes
        .iter()
        .map(|d| &d.dir)
        .filter(|d| !d.starts_with('.') && !d.is_empty());
    let dirs: Vec<String> = emptied.chain(&plan.remove_parents).cloned().collect();
    remove_empty_dirs(root, &dirs)?;
    apply_root_files(root, plan, options, progress)?;
    if options.fsync == FsyncPolicy::Batch && !plan.is_empty() {
        let (synced, ()) = rayon::join(|| writer::sync_filesystem(root), meanwhile);
        synced.map_err(|e| Error::io(root, e))?;
    }
    Ok(report)
}

/// Tells a sequential source every body phase 1 will open, in the order it opens them.
pub(crate) fn announce_copies(plan: &Plan, source: &dyn BodySource) -> Result<()> {
    announce(source, &copy_keys(plan))
}

/// Every body `plan` copies, as the source names it, in plan order.
pub(crate) fn copy_keys(plan: &Plan) -> Vec<Key> {
    plan.mailboxes
        .iter()
        .flat_map(|m| {
            m.copies.iter().map(|c| Key {
                dir: m.dir.clone(),
                sub: c.src_sub,
                name: c.src_name.clone(),
            })
        })
        .collect()
}

/// Tells a sequential source the bodies `keys` names, in the order they will be opened.
pub(crate) fn announce(source: &dyn BodySource, keys: &[Key]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    source
        .announce(keys)
        .map_err(|e| Error::Usage(format!("cannot ask the source for bodies: {e}")))
}

/// Renames whole mailbox directories, in plan order, each with one non-replacing rename
/// (what Dovecot's own RENAME does). A rename whose directory is already gone while the
/// new one exists is done: a killed run did it, or (fs layout) the parent's rename moved it.
fn rename_mailboxes(root: &Path, plan: &Plan, progress: &dyn Progress) -> Result<()> {
    for r in &plan.rename_mailboxes {
        if r.from_dir.is_empty() || r.to_dir.is_empty() {
            continue;
        }
        let (from, to) = (
            mailbox_path(root, &r.from_dir),
            mailbox_path(root, &r.to_dir),
        );
        if fs::symlink_metadata(&from).is_err() && fs::symlink_metadata(&to).is_ok() {
            continue;
        }
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        writer::rename_noreplace(&from, &to).map_err(|e| Error::io(&from, e))?;
        progress.event(Event::Applied {
            line: crate::sync::plan::rename_mailbox_line(r),
            bytes: 0,
        });
    }
    Ok(())
}

/// Creates the root (and its `tmp/`, the staging area for new directories) when missing.
/// While the root holds no mailbox yet, its owner and mode are set again, so a run killed
/// between `mkdir` and `chown` cannot leave a root Dovecot may not write to.
fn prepare_root(root: &Path, plan: &Plan, options: &ApplyOptions) -> Result<()> {
    let meta = plan.root_meta;
    let owner = (meta.uid, meta.gid);
    writer::create_dir(root, meta.mode, owner, options.ownership)
        .map_err(|e| Error::io(root, e))?;
    let holds_mail = fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .flatten()
        .any(|e| e.file_name() != "tmp");
    if !holds_mail {
        writer::repair_dir(root, meta.mode, owner, options.ownership)
            .map_err(|e| Error::io(root, e))?;
    }
    let tmp = root.join("tmp");
    writer::create_dir(&tmp, meta.mode, owner, options.ownership)
        .map_err(|e| Error::io(&tmp, e))?;
    let (mode, owner) = existing_meta(root).unwrap_or((meta.mode, owner));
    writer::repair_dir(&tmp, mode, owner, options.ownership).map_err(|e| Error::io(&tmp, e))
}

/// Removes what killed runs left behind in every destination mailbox, even one with
/// nothing else to do: staged files and directories of dead mdsync processes in `tmp/`,
/// and `dovecot-uidlist.lock` files whose owner process is dead on this host (Dovecot would
/// override those too; until then it shows the mailbox as empty). Never fails a run.
fn sweep(root: &Path, plan: &Plan) {
    let root_tmp = root.join("tmp");
    let subscriptions_lock = md::dotlock::lock_path_for(&root.join(md::SUBSCRIPTIONS));
    if writer::is_twin_of_dead_temp(&root_tmp, &subscriptions_lock) {
        let _ = writer::remove_file_if_exists(&subscriptions_lock);
    }
    let _ = writer::clean_stale_temps(&root_tmp);
    for dir in &plan.sweep {
        let path = mailbox_path(root, dir);
        let _ = writer::clean_stale_temps(&path.join("tmp"));
        let _ = dotlock::remove_if_owner_dead(&path.join(uidlist::FILE_NAME));
    }
}

/// fs layout: removes directories deepest first when they are empty (a folder excluded from
/// the run may still live below one).
fn remove_empty_dirs(root: &Path, dirs: &[String]) -> Result<()> {
    let mut dirs: Vec<&String> = dirs.iter().collect();
    dirs.sort_by(|a, b| b.cmp(a));
    for parent in dirs {
        let path = root.join(parent);
        match fs::remove_dir(&path) {
            Err(e)
                if !matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                return Err(Error::io(&path, e));
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_interrupt() -> Result<()> {
    if interrupt::requested() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// A body staged in `tmp/`, waiting to be renamed into place.
struct Staged<'a> {
    op: &'a CopyOp,
    tmp: PathBuf,
    bytes: u64,
    /// The source name's `,S=` disagrees with the file: copied verbatim (the mirror shows
    /// what Dovecot shows) but reported, since Dovecot will misread this message.
    size_error: Option<String>,
}

/// What phase 1 made ready for one mailbox.
struct Prepared<'a> {
    report: ApplyReport,
    staged: Vec<Staged<'a>>,
    uidlist: Option<Speculated>,
    /// The plan's renames are done (while the staged bodies were being synced).
    renamed: bool,
}

/// A new uidlist rendered and written to `tmp/` before the lock (batch policy), so that the
/// run's one sync makes it durable together with the bodies instead of an fsync per
/// mailbox under its lock. It replaces the uidlist only when, under the lock, the uidlist
/// still reads exactly `based_on` and every copy landed; otherwise it is dropped and the
/// uidlist is rendered and written (with its own fsync) under the lock as usual. Dropping
/// it removes the temp file.
struct Speculated {
    /// The uidlist text it was rendered from (`None`: there was no uidlist).
    based_on: Option<String>,
    /// The temp file, until it is renamed into place.
    temp: Option<PathBuf>,
}

impl Drop for Speculated {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = fs::remove_file(temp);
        }
    }
}

/// Renders and writes a mailbox's new uidlist ahead of the lock (see [`Speculated`]).
/// Anything unexpected (no edit, an unreadable or corrupt uidlist, no change, a failed
/// write) simply means no speculation: the locked path handles and reports it.
fn speculate_uidlist(path: &Path, m: &MailboxPlan, options: &ApplyOptions) -> Option<Speculated> {
    let Some(UidlistChange::Write(edit)) = &m.uidlist else {
        return None;
    };
    if options.fsync != FsyncPolicy::Batch {
        return None;
    }
    let based_on = read_uidlist_text(&path.join(uidlist::FILE_NAME)).ok()?;
    let current = match &based_on {
        Some(text) => Some(uidlist::parse(text).ok()?),
        None => None,
    };
    // An upsert whose UID the text already gives another file would not land; the locked
    // path sorts that out. So a speculation vouches that no upsert's UID is taken in
    // `based_on`, and the lock need not parse the same text again to find out.
    if current
        .as_ref()
        .is_some_and(|current| taken_in(current, edit).upserts > 0)
    {
        return None;
    }
    let text = render_edit(current.as_ref(), edit);
    if based_on.as_deref() == Some(text.as_str()) {
        return None;
    }
    let owner = existing_meta(path).map_or((0, 0), |(_, o)| o);
    let temp = writer::write_temp(
        &path.join("tmp"),
        text.as_bytes(),
        owner,
        0o600,
        options.ownership,
        FsyncPolicy::None,
    )
    .ok()?;
    Some(Speculated {
        based_on,
        temp: Some(temp),
    })
}

/// The uidlist's text, `None` when there is none.
fn read_uidlist_text(file: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(file) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Prepares one mailbox's directories and stages its bodies in `tmp/`.
fn stage_mailbox<'a>(
    root: &Path,
    m: &'a MailboxPlan,
    source: &dyn BodySource,
    options: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<Prepared<'a>> {
    check_interrupt()?;
    let path = mailbox_path(root, &m.dir);
    let mut report = ApplyReport::default();
    prepare_dirs(root, &path, m, options).map_err(|e| Error::io(&path, e))?;
    if m.create.is_some() {
        report.mailboxes_created = 1;
        progress.event(Event::Applied {
            line: format!("create   {}", m.name),
            bytes: 0,
        });
    }
    // What killed runs left in tmp/ is gone already: `sweep` cleaned every mailbox.
    let staged = stage_copies(&path, m, source, options, &mut report)?;
    let uidlist = speculate_uidlist(&path, m, options);
    Ok(Prepared {
        report,
        staged,
        uidlist,
        renamed: false,
    })
}

/// Renames (flag changes, moves between `new/` and `cur/`) of every prepared mailbox, each
/// under its uidlist lock, in parallel: the work done while the staged bodies are synced.
/// They touch only files the plan found in place, never a staged body or a name a copy
/// lands on (a copy's name has a base this mailbox does not hold). A mailbox whose lock
/// cannot be had keeps its renames for the commit, which reports the lock's error.
fn rename_while_syncing(
    root: &Path,
    plan: &Plan,
    prepared: &mut [Option<Prepared<'_>>],
    progress: &dyn Progress,
) {
    plan.mailboxes
        .par_iter()
        .zip(prepared.par_iter_mut())
        .filter_map(|(m, p)| p.as_mut().map(|p| (m, p)))
        .filter(|(m, _)| !m.renames.is_empty())
        .for_each(|(m, p)| {
            let path = mailbox_path(root, &m.dir);
            let Ok(lock) = lock_uidlist(&path) else {
                return;
            };
            rename_messages(&path, m, progress, &mut p.report);
            drop(lock);
            p.renamed = true;
        });
}

/// The plan's renames in the mailbox at `path`; the caller holds its uidlist lock. A file
/// gone meanwhile (Dovecot expunged or renamed it) is counted as vanished.
fn rename_messages(
    path: &Path,
    m: &MailboxPlan,
    progress: &dyn Progress,
    report: &mut ApplyReport,
) {
    for r in &m.renames {
        let from = path.join(r.from_sub.as_str()).join(&r.from_name);
        let to = path.join(r.to_sub.as_str()).join(&r.to_name);
        match writer::rename_noreplace(&from, &to) {
            Ok(()) => {
                let line = plan::rename_line(&m.name, r);
                if r.is_move_only() {
                    report.moves += 1;
                } else {
                    report.flag_changes += 1;
                }
                progress.event(Event::Applied { line, bytes: 0 });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => report.vanished += 1,
            Err(e) => report.errors.push(e.to_string()),
        }
    }
}

/// Takes the uidlist lock of the mailbox at `path` (its temp file in the mailbox's `tmp/`).
fn lock_uidlist(path: &Path) -> io::Result<DotLock> {
    DotLock::acquire(
        &path.join(uidlist::FILE_NAME),
        &path.join("tmp"),
        UIDLIST_TIMING,
    )
}

/// Takes the mailbox's uidlist lock and carries out the rest of its plan.
fn commit_mailbox(
    root: &Path,
    m: &MailboxPlan,
    prepared: Prepared<'_>,
    options: &ApplyOptions,
    progress: &dyn Progress,
    trash: &std::sync::mpsc::Sender<PathBuf>,
) -> Result<ApplyReport> {
    let Prepared {
        mut report,
        staged,
        uidlist: speculated,
        renamed,
    } = prepared;
    let path = mailbox_path(root, &m.dir);
    let mut lock = match lock_uidlist(&path) {
        Ok(lock) => lock,
        Err(e) => {
            discard(&staged);
            return Err(Error::io(&path, e));
        }
    };
    let mut expunged = Vec::new();
    let locked = apply_locked(
        &path,
        m,
        (staged, speculated, renamed),
        options,
        progress,
        &mut report,
        &mut lock,
        &mut expunged,
    );
    // Released as soon as the uidlist is in place: a killed run leaves no lock behind
    // while it only waits for the disk.
    drop(lock);
    for path in expunged {
        if let Err(unsent) = trash.send(path) {
            let _ = fs::remove_file(unsent.0);
        }
    }
    locked?;
    if options.fsync == FsyncPolicy::File {
        for sub in ["cur", "new"] {
            writer::sync_dir(&path.join(sub)).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(report)
}

/// Creates the mailbox directory with its `cur/ new/ tmp/` (whole, through the root's
/// `tmp/`), or the subdirectories an existing mailbox lacks.
fn prepare_dirs(
    root: &Path,
    path: &Path,
    m: &MailboxPlan,
    options: &ApplyOptions,
) -> io::Result<()> {
    let staging = root.join("tmp");
    if let Some(meta) = m.create {
        let marker = m.maildirfolder.then_some(md::MAILDIRFOLDER);
        let owner = (meta.uid, meta.gid);
        let subdirs = ["cur", "new", "tmp"];
        writer::create_dir_staged(
            path,
            &staging,
            meta.mode,
            owner,
            options.ownership,
            &subdirs,
            marker,
        )?;
        // An existing shell gets the owner and mode it should have had.
        writer::repair_dir(path, meta.mode, owner, options.ownership)?;
    }
    let (mode, owner) = existing_meta(path).unwrap_or((0o700, (0, 0)));
    for sub in ["cur", "new", "tmp"] {
        let sub_path = path.join(sub);
        if path != root || sub != "tmp" {
            writer::create_dir_staged(
                &sub_path,
                &staging,
                mode,
                owner,
                options.ownership,
                &[],
                None,
            )?;
        }
    }
    if m.maildirfolder {
        let marker = path.join(md::MAILDIRFOLDER);
        let created = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&marker);
        match created {
            Ok(file) => options.ownership.apply_fd(&file, owner.0, owner.1)?,
            // Already there (or a link in its place, which is never followed).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(with_path(e, &marker)),
        }
    }
    Ok(())
}

fn existing_meta(path: &Path) -> Option<(u32, (u32, u32))> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = fs::metadata(path).ok()?;
    Some((meta.permissions().mode() & 0o7777, (meta.uid(), meta.gid())))
}

/// Copies bodies into `tmp/` in parallel. Vanished sources are counted and skipped; other
/// failures are reported per message.
fn stage_copies<'a>(
    path: &Path,
    m: &'a MailboxPlan,
    source: &dyn BodySource,
    options: &ApplyOptions,
    report: &mut ApplyReport,
) -> Result<Vec<Staged<'a>>> {
    let tmp_dir = path.join("tmp");
    let vanished = AtomicU64::new(0);
    let errors = Mutex::new(Vec::new());
    let stage = |op: &'a CopyOp| {
        if interrupt::requested() {
            return None;
        }
        match stage_one(&tmp_dir, &m.dir, op, source, options) {
            Ok(staged) => Some(staged),
            Err(BodyError::Vanished(_)) => {
                vanished.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(BodyError::Failed(why)) => {
                errors.lock().map(|mut e| e.push(why)).ok();
                None
            }
        }
    };
    let staged: Vec<Staged<'a>> = if source.sequential() {
        m.copies.iter().filter_map(stage).collect()
    } else {
        m.copies.par_iter().filter_map(stage).collect()
    };
    report.vanished += vanished.into_inner();
    report
        .errors
        .extend(errors.into_inner().unwrap_or_default());
    Ok(staged)
}

fn stage_one<'a>(
    tmp_dir: &Path,
    dir: &str,
    op: &'a CopyOp,
    source: &dyn BodySource,
    options: &ApplyOptions,
) -> Result<Staged<'a>, BodyError> {
    let body = source.open_body(dir, op.src_sub, &op.src_name)?;
    let meta = body.meta;
    let size_error = size_disagreement(&body.origin, op, meta.len);
    let tmp = match body.data {
        BodyData::File(mut file) => {
            writer::write_to_tmp(tmp_dir, &mut file, &meta, options.ownership, options.fsync)
        }
        BodyData::Stream(mut stream) => writer::write_stream_to_tmp(
            tmp_dir,
            &mut *stream,
            &meta,
            options.ownership,
            options.fsync,
        ),
    }
    .map_err(|e| BodyError::Failed(e.to_string()))?;
    Ok(Staged {
        op,
        tmp,
        bytes: meta.len,
        size_error,
    })
}

/// An error text when the `,S=` of the source name is not the file's real size.
fn size_disagreement(origin: &str, op: &CopyOp, real: u64) -> Option<String> {
    let claimed = crate::storage::maildir::filename::parse(&op.src_name)
        .ok()?
        .size?;
    (claimed != real).then(|| {
        format!(
            "{origin}: ,S={claimed} but the file has {real} bytes; \
             copied as it is, Dovecot will misread it"
        )
    })
}

fn discard(staged: &[Staged<'_>]) {
    for s in staged {
        let _ = fs::remove_file(&s.tmp);
    }
}

/// The part done under the uidlist lock, kept short: keywords, renames, expunges, uidlist.
/// An expunged file is renamed into `tmp/` (under mdsync's temp name, so a killed run's
/// sweep removes it) and its path added to `expunged`, to be unlinked after the lock.
#[allow(clippy::too_many_arguments)]
fn apply_locked(
    path: &Path,
    m: &MailboxPlan,
    (staged, speculated, renamed): (Vec<Staged<'_>>, Option<Speculated>, bool),
    options: &ApplyOptions,
    progress: &dyn Progress,
    report: &mut ApplyReport,
    lock: &mut DotLock,
    expunged: &mut Vec<PathBuf>,
) -> Result<()> {
    let tmp_dir = path.join("tmp");
    let owner = existing_meta(path).map_or((0, 0), |(_, o)| o);
    if let Some(map) = &m.keywords {
        write_keywords(path, &map.render(), owner, options).map_err(|e| Error::io(path, e))?;
    }
    let raced = match &m.uidlist {
        Some(UidlistChange::Write(edit)) if !edit.upsert.is_empty() => {
            taken_meanwhile(path, edit, speculated.as_ref())
        }
        _ => Default::default(),
    };
    report.vanished += raced.upserts;
    let mut landed: std::collections::HashSet<u32> = std::collections::HashSet::new();
    for (n, s) in staged.iter().enumerate() {
        if n % 1024 == 0 {
            lock.touch_if_due();
        }
        if s.op.uid != 0 && raced.uids.contains(&s.op.uid) {
            let _ = fs::remove_file(&s.tmp);
            continue;
        }
        let target = path.join(s.op.dst_sub.as_str()).join(&s.op.dst_name);
        match writer::rename_noreplace(&s.tmp, &target) {
            Ok(()) => {
                landed.insert(s.op.uid);
                report.messages_copied += 1;
                report.bytes_copied += s.bytes;
                report.errors.extend(s.size_error.clone());
                progress.event(Event::Applied {
                    line: plan::copy_line(&m.name, s.op),
                    bytes: s.bytes,
                });
            }
            Err(e) => {
                let _ = fs::remove_file(&s.tmp);
                report.errors.push(e.to_string());
            }
        }
    }
    if !renamed {
        rename_messages(path, m, progress, report);
    }
    // A copy that did not land (vanished source, I/O error) leaves its UID as it was: the
    // file it was to replace stays, and its uidlist record is not rewritten.
    // Nor does a UID Dovecot gave away since the scan: the message keeps its old record.
    let failed: std::collections::HashSet<u32> = m
        .copies
        .iter()
        .map(|c| c.uid)
        .filter(|&uid| uid != 0 && !landed.contains(&uid))
        .chain(raced.uids)
        .collect();
    for e in m
        .expunges
        .iter()
        .filter(|e| e.uid == 0 || !failed.contains(&e.uid))
    {
        let file = path.join(e.sub.as_str()).join(&e.name);
        let aside = tmp_dir.join(writer::temp_name());
        match writer::rename_noreplace(&file, &aside) {
            Ok(()) => {
                expunged.push(aside);
                report.expunged += 1;
                progress.event(Event::Applied {
                    line: plan::expunge_line(&m.name, e),
                    bytes: 0,
                });
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => report.expunged += 1,
            Err(err) => report.errors.push(with_path(err, &file).to_string()),
        }
    }
    match &m.uidlist {
        Some(UidlistChange::Write(edit)) if failed.is_empty() => {
            write_uidlist(path, edit, owner, options, speculated)?
        }
        Some(UidlistChange::Write(edit)) => {
            let kept = UidlistEdit {
                header: edit.header.clone(),
                remove: edit
                    .remove
                    .iter()
                    .copied()
                    .filter(|u| !failed.contains(u))
                    .collect(),
                upsert: edit
                    .upsert
                    .iter()
                    .filter(|r| !failed.contains(&r.uid))
                    .cloned()
                    .collect(),
            };
            write_uidlist(path, &kept, owner, options, None)?
        }
        Some(UidlistChange::Remove) => remove_if_exists(&path.join(uidlist::FILE_NAME))?,
        None => {}
    }
    if m.reset_index {
        for name in md::INDEX_FILES {
            remove_if_exists(&path.join(name))?;
        }
    }
    Ok(())
}

/// UIDs of an edit that a live Dovecot numbered since the scan, to be left as they are.
#[derive(Default)]
struct Raced {
    /// The upserts' UIDs held now by a record the plan did not know of, and the UIDs the
    /// same messages have now (their records stay).
    uids: std::collections::HashSet<u32>,
    /// How many upserts are left out (the run is then not complete: a re-run settles them).
    upserts: u64,
}

/// Finds the upserts whose UID the uidlist, as it is under the lock, gives to another
/// file and the plan neither removes nor knew of: Dovecot delivered and numbered a message
/// after the scan. Writing the upsert would take that UID from it (its IMAP clients have
/// seen it), so those upserts wait for the next run, which sees Dovecot's record. An
/// unreadable uidlist finds none; writing it reports the problem. A uidlist that still
/// reads what `speculated` was rendered from is not parsed again: no UID in it was taken
/// (see [`speculate_uidlist`]).
fn taken_meanwhile(path: &Path, edit: &UidlistEdit, speculated: Option<&Speculated>) -> Raced {
    let Ok(Some(text)) = read_uidlist_text(&path.join(uidlist::FILE_NAME)) else {
        return Raced::default();
    };
    if speculated.is_some_and(|s| s.based_on.as_deref() == Some(text.as_str())) {
        return Raced::default();
    }
    match uidlist::parse(&text) {
        Ok(current) => taken_in(&current, edit),
        Err(_) => Raced::default(),
    }
}

/// The upserts of `edit` whose UID `current` gives to another file (see
/// [`taken_meanwhile`]), and the UIDs `current` gives their own files.
fn taken_in(current: &uidlist::Uidlist<'_>, edit: &UidlistEdit) -> Raced {
    let mut raced = Raced::default();
    if current.header.uid_validity != edit.header.uid_validity {
        return raced;
    }
    // The parser leaves records sorted by UID, UIDs unique.
    let records = &current.records;
    let holder = |uid: u32| {
        records
            .binary_search_by_key(&uid, |r| r.uid)
            .ok()
            .map(|i| records[i].base)
    };
    for r in &edit.upsert {
        let foreign = holder(r.uid).is_some_and(|base| base != r.base);
        if !foreign || edit.remove.binary_search(&r.uid).is_ok() {
            continue;
        }
        raced.upserts += 1;
        raced.uids.insert(r.uid);
        let own = records.iter().filter(|c| c.base == r.base);
        raced.uids.extend(own.map(|c| c.uid));
    }
    raced
}

fn remove_if_exists(path: &Path) -> Result<()> {
    writer::remove_file_if_exists(path).map_err(|e| Error::io(path, e))
}

/// Writes `dovecot-keywords` with an mtime newer than the old file's, so a Dovecot that
/// checks mtimes with one-second granularity reloads it.
fn write_keywords(
    path: &Path,
    content: &str,
    owner: (u32, u32),
    options: &ApplyOptions,
) -> io::Result<()> {
    let file = path.join(keywords::FILE_NAME);
    let old_mtime = fs::metadata(&file).and_then(|m| m.modified()).ok();
    writer::replace_file(
        &file,
        &path.join("tmp"),
        content.as_bytes(),
        owner,
        0o600,
        options.ownership,
        options.fsync,
    )?;
    if let Some(old) = old_mtime {
        let now = SystemTime::now();
        let floor = old + Duration::from_secs(1);
        if now < floor {
            fs::File::options()
                .write(true)
                .open(&file)?
                .set_modified(floor)?;
        }
    }
    Ok(())
}

/// Applies an edit to the uidlist as it is now (under the lock), never lowering `N`. A
/// speculated uidlist rendered from exactly the current text is renamed into place (it is
/// durable since the run's sync); any other is dropped.
fn write_uidlist(
    path: &Path,
    edit: &UidlistEdit,
    owner: (u32, u32),
    options: &ApplyOptions,
    speculated: Option<Speculated>,
) -> Result<()> {
    let file = path.join(uidlist::FILE_NAME);
    let current_text = read_uidlist_text(&file).map_err(|e| Error::io(&file, e))?;
    if let Some(mut speculated) = speculated
        && speculated.based_on == current_text
        && let Some(temp) = speculated.temp.take()
    {
        return fs::rename(&temp, &file).map_err(|e| {
            let _ = fs::remove_file(&temp);
            Error::io(&file, e)
        });
    }
    let current = match &current_text {
        Some(text) => Some(uidlist::parse(text).map_err(|e| {
            Error::io(
                &file,
                io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            )
        })?),
        None => None,
    };
    let text = render_edit(current.as_ref(), edit);
    if current_text.as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    writer::replace_file(
        &file,
        &path.join("tmp"),
        text.as_bytes(),
        owner,
        0o600,
        options.ownership,
        options.fsync,
    )
    .map_err(|e| Error::io(&file, e))
}

/// The new uidlist text: current records minus removals and replaced ones, plus upserts,
/// in UID order. The kept records are rendered straight from the current text (a merge of
/// two UID-sorted lists), so a large uidlist with a few changes costs no allocation per
/// record.
pub fn render_edit(current: Option<&uidlist::Uidlist<'_>>, edit: &UidlistEdit) -> String {
    use crate::table::NameHash;
    let mut header = edit.header.clone();
    let mut upserts: Vec<&OwnedRecord> = edit.upsert.iter().collect();
    upserts.sort_by_key(|r| r.uid);
    let mut kept: Vec<&uidlist::Record<'_>> = Vec::new();
    if let Some(cur) = current {
        if cur.header.uid_validity == header.uid_validity {
            header.next_uid = header.next_uid.max(cur.next_uid());
        }
        let upsert_uids: std::collections::HashSet<u32, NameHash> =
            edit.upsert.iter().map(|r| r.uid).collect();
        let upsert_bases: std::collections::HashSet<&str, NameHash> =
            edit.upsert.iter().map(|r| r.base.as_str()).collect();
        // `parse` returns the records sorted by UID.
        kept = cur
            .records
            .iter()
            .filter(|r| {
                edit.remove.binary_search(&r.uid).is_err()
                    && !upsert_uids.contains(&r.uid)
                    && !upsert_bases.contains(r.base)
            })
            .collect();
    }
    let last = kept
        .last()
        .map(|r| r.uid)
        .max(upserts.last().map(|r| r.uid));
    if let Some(last) = last {
        header.next_uid = header.next_uid.max(last.saturating_add(1));
    }
    let mut out = String::with_capacity(128 + (kept.len() + upserts.len()) * 72);
    uidlist::push_header(&mut out, &header);
    let (mut k, mut u) = (kept.iter().peekable(), upserts.iter().peekable());
    loop {
        let take_kept = match (k.peek(), u.peek()) {
            (Some(a), Some(b)) => a.uid <= b.uid,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_kept {
            let r = k.next().expect("peeked");
            uidlist::push_record(&mut out, r.uid, &r.ext, r.guid, r.base);
        } else {
            let r = u.next().expect("peeked");
            uidlist::push_record(&mut out, r.uid, &r.ext, r.guid.as_deref(), &r.base);
        }
    }
    out
}

/// Removes a destination mailbox. Maildir++: the directory is first renamed into the root's
/// `tmp/` (Dovecot never lists it there), then removed. fs layout and INBOX: only the
/// mailbox's own mail directories and control files go; child mailboxes and root files
/// (`subscriptions`, `dovecot-uidvalidity`) stay, and the emptied directory is removed
/// later, after its children. A mailbox holding more messages than the `planned` the scan
/// saw is put back and not deleted (false): mail delivered since the scan is never lost.
fn delete_mailbox(root: &Path, dir: &str, planned: u64) -> io::Result<bool> {
    let path = mailbox_path(root, dir);
    let trash_dir = root.join("tmp");
    writer::create_dir(&trash_dir, 0o700, (0, 0), Ownership::RunningUser)?;
    let trash = trash_dir.join(format!("{}trash.{}", md::TEMP_PREFIX, writer::temp_name()));
    if dir.starts_with('.') {
        fs::rename(&path, &trash).map_err(|e| with_path(e, &path))?;
        if !set_aside_holds_only(&trash, &path, true, planned)? {
            return Ok(false);
        }
        fs::remove_dir_all(&trash).map_err(|e| with_path(e, &trash))?;
        return Ok(true);
    }
    // fs layout and INBOX: the mail directories are set aside together (child mailboxes
    // and root files stay where they are).
    fs::create_dir(&trash).map_err(|e| with_path(e, &trash))?;
    for sub in ["cur", "new"] {
        match fs::rename(path.join(sub), trash.join(sub)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(e, &path.join(sub))),
        }
    }
    if !set_aside_holds_only(&trash, &path, false, planned)? {
        let _ = fs::remove_dir(&trash);
        return Ok(false);
    }
    fs::remove_dir_all(&trash).map_err(|e| with_path(e, &trash))?;
    let mail_dirs: &[&str] = if dir.is_empty() { &[] } else { &["tmp"] };
    for sub in mail_dirs {
        let sub_path = path.join(sub);
        match fs::remove_dir_all(&sub_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(e, &sub_path)),
        }
    }
    let control = [uidlist::FILE_NAME, keywords::FILE_NAME, md::MAILDIRFOLDER];
    for name in control.iter().chain(md::INDEX_FILES.iter()) {
        writer::remove_file_if_exists(&path.join(name))?;
    }
    Ok(true)
}

/// Whether a mailbox's mail set aside for deletion (`aside`: the whole directory when
/// `whole`, else a directory holding its `cur/` and `new/`) holds no more messages than the
/// plan saw. More means a live Dovecot delivered into it since the scan (or the scan's
/// `readdir` missed a file): the mail goes back home, and the mailbox is not deleted.
/// Setting aside first makes the count final: Dovecot cannot deliver into a directory
/// that moved.
fn set_aside_holds_only(aside: &Path, home: &Path, whole: bool, planned: u64) -> io::Result<bool> {
    let mut held = 0u64;
    for sub in ["cur", "new"] {
        match fs::read_dir(aside.join(sub)) {
            Ok(entries) => {
                held += entries
                    .flatten()
                    .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
                    .count() as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(e, aside)),
        }
    }
    if held <= planned {
        return Ok(true);
    }
    if whole {
        writer::rename_noreplace(aside, home).map_err(|e| with_path(e, home))?;
        return Ok(false);
    }
    for sub in ["cur", "new"] {
        match writer::rename_noreplace(&aside.join(sub), &home.join(sub)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(e, &home.join(sub))),
        }
    }
    Ok(false)
}

/// `subscriptions` (through its dotlock) and `dovecot-uidvalidity`.
fn apply_root_files(
    root: &Path,
    plan: &Plan,
    options: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let owner = (plan.root_meta.uid, plan.root_meta.gid);
    let tmp_dir = root.join("tmp");
    if plan.subscriptions.is_some() || plan.uidvalidity_next.is_some() {
        writer::create_dir(&tmp_dir, 0o700, owner, options.ownership)
            .map_err(|e| Error::io(&tmp_dir, e))?;
    }
    if let Some(subscriptions) = &plan.subscriptions {
        let file = root.join(md::SUBSCRIPTIONS);
        match subscriptions {
            Some(content) => write_subscriptions(root, content, owner, options)
                .map_err(|e| Error::io(&file, e))?,
            None => remove_if_exists(&file)?,
        }
        progress.event(Event::Applied {
            line: "subscriptions".into(),
            bytes: 0,
        });
    }
    if let Some(next) = plan.uidvalidity_next {
        write_uidvalidity(root, next, owner, options).map_err(|e| Error::io(root, e))?;
    }
    Ok(())
}

/// Dovecot's subscriptions dance: the lock file is the new file, renamed over the old one.
fn write_subscriptions(
    root: &Path,
    content: &[u8],
    owner: (u32, u32),
    options: &ApplyOptions,
) -> io::Result<()> {
    let target = root.join(md::SUBSCRIPTIONS);
    let lock = md::dotlock::lock_path_for(&target);
    let tmp_dir = root.join("tmp");
    // Dovecot's dotlock: the new content, complete, is linked to the lock name (which
    // fails while someone holds it) and then renamed over the file. The temp file stays
    // until the end, so a lock left by a killed run is recognisable as ours.
    let temp = writer::write_temp(
        &tmp_dir,
        content,
        owner,
        0o600,
        options.ownership,
        options.fsync,
    )?;
    let mut waited = Duration::ZERO;
    let linked = loop {
        match fs::hard_link(&temp, &lock) {
            Ok(()) => break Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if writer::is_twin_of_dead_temp(&tmp_dir, &lock)
                    || waited >= Duration::from_secs(30)
                {
                    // Ours from a killed run, or stale by Dovecot's 30 s rule.
                    writer::remove_file_if_exists(&lock)?;
                    waited = Duration::ZERO;
                    continue;
                }
                std::thread::sleep(Duration::from_millis(100));
                waited += Duration::from_millis(100);
            }
            Err(e) => break Err(with_path(e, &lock)),
        }
    };
    let result =
        linked.and_then(|()| fs::rename(&lock, &target).map_err(|e| with_path(e, &target)));
    if result.is_err() {
        let _ = fs::remove_file(&lock);
    }
    let _ = fs::remove_file(&temp);
    result
}

/// Raises `dovecot-uidvalidity` (and its `.<hex>` marker) to `next`.
fn write_uidvalidity(
    root: &Path,
    next: u32,
    owner: (u32, u32),
    options: &ApplyOptions,
) -> io::Result<()> {
    let hex = format!("{next:08x}");
    let file = root.join(md::UIDVALIDITY_FILE);
    writer::replace_file(
        &file,
        &root.join("tmp"),
        hex.as_bytes(),
        owner,
        0o600,
        options.ownership,
        options.fsync,
    )?;
    let marker_prefix = format!("{}.", md::UIDVALIDITY_FILE);
    for entry in fs::read_dir(root)?.flatten() {
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| n.starts_with(&marker_prefix) && n.len() == marker_prefix.len() + 8)
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    let marker = root.join(format!("{marker_prefix}{hex}"));
    let f = fs::File::create(&marker)?;
    options.ownership.apply_fd(&f, owner.0, owner.1)?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o444))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::storage::maildir::uidlist::Header;

    fn rec(uid: u32, base: &str) -> OwnedRecord {
        OwnedRecord {
            uid,
            guid: None,
            ext: String::new(),
            base: base.into(),
        }
    }

    #[test]
    fn edit_keeps_foreign_records_and_never_lowers_n() {
        let current =
            uidlist::parse("3 V7 N20 G00000000000000000000000000000001\n1 :a\n2 :b\n15 :late\n")
                .unwrap();
        let edit = UidlistEdit {
            header: Header {
                uid_validity: 7,
                next_uid: 5,
                guid: current.header.guid,
                extra: String::new(),
            },
            remove: vec![2],
            upsert: vec![rec(3, "c")],
        };
        let text = render_edit(Some(&current), &edit);
        assert_eq!(
            text,
            "3 V7 N20 G00000000000000000000000000000001\n1 :a\n3 :c\n15 :late\n"
        );
    }

    /// The straightforward version `render_edit` must agree with: collect, sort, render.
    fn render_edit_reference(current: Option<&uidlist::Uidlist<'_>>, edit: &UidlistEdit) -> String {
        let mut header = edit.header.clone();
        let mut records: Vec<OwnedRecord> = Vec::new();
        if let Some(cur) = current {
            if cur.header.uid_validity == header.uid_validity {
                header.next_uid = header.next_uid.max(cur.next_uid());
            }
            let uids: std::collections::HashSet<u32> = edit.upsert.iter().map(|r| r.uid).collect();
            let bases: std::collections::HashSet<&str> =
                edit.upsert.iter().map(|r| r.base.as_str()).collect();
            records.extend(
                cur.records
                    .iter()
                    .filter(|r| {
                        edit.remove.binary_search(&r.uid).is_err()
                            && !uids.contains(&r.uid)
                            && !bases.contains(r.base)
                    })
                    .map(OwnedRecord::from_record),
            );
        }
        records.extend(edit.upsert.iter().cloned());
        records.sort_by_key(|r| r.uid);
        if let Some(last) = records.last() {
            header.next_uid = header.next_uid.max(last.uid.saturating_add(1));
        }
        uidlist::render(&header, &records)
    }

    proptest::proptest! {
        #[test]
        fn render_edit_agrees_with_the_reference(
            current in proptest::collection::btree_map(1u32..60, (0u8..4, 0u8..8), 0..30),
            removes in proptest::collection::btree_set(1u32..60, 0..10),
            upserts in proptest::collection::btree_map(1u32..60, (0u8..4, 0u8..8), 0..10),
            same_validity in proptest::bool::ANY,
            next in 0u32..80,
            no_current in proptest::bool::ANY,
        ) {
            // Small base alphabets make upserts collide with current records by base name.
            let line = |uid: u32, (kind, base): (u8, u8)| match kind {
                0 => format!("{uid} :b{base}\n"),
                1 => format!("{uid} W{uid} :b{base}\n"),
                2 => format!("{uid} Gg{uid} :b{base}\n"),
                _ => format!("{uid} P{uid} Gg{uid} O1 :b{base}\n"),
            };
            let mut text = "3 V7 N5 G00000000000000000000000000000001\n".to_string();
            for (&uid, &what) in &current {
                text.push_str(&line(uid, what));
            }
            let parsed = uidlist::parse(&text).unwrap();
            let edit = UidlistEdit {
                header: Header {
                    uid_validity: if same_validity { 7 } else { 8 },
                    next_uid: next,
                    guid: parsed.header.guid,
                    extra: String::new(),
                },
                remove: removes.into_iter().collect(),
                upsert: upserts
                    .iter()
                    .rev()
                    .map(|(&uid, &(kind, base))| OwnedRecord {
                        uid,
                        guid: (kind >= 2).then(|| format!("u{uid}")),
                        ext: if kind % 2 == 1 { format!("P{base}") } else { String::new() },
                        base: format!("b{base}"),
                    })
                    .collect(),
            };
            let current = (!no_current).then_some(&parsed);
            proptest::prop_assert_eq!(
                render_edit(current, &edit),
                render_edit_reference(current, &edit)
            );
        }
    }

    #[test]
    fn edit_replaces_same_base_and_new_generation_resets_n() {
        let current = uidlist::parse("3 V1 N9\n4 :a\n").unwrap();
        let edit = UidlistEdit {
            header: Header {
                uid_validity: 2,
                next_uid: 3,
                guid: None,
                extra: String::new(),
            },
            remove: vec![],
            upsert: vec![rec(2, "a")],
        };
        assert_eq!(render_edit(Some(&current), &edit), "3 V2 N3\n2 :a\n");
    }

    /// A mailbox with a two-record uidlist, and a plan that drops uid 2 and adds uid 3.
    fn speculation_fixture() -> (tempfile::TempDir, MailboxPlan, UidlistEdit) {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        fs::write(dir.path().join("dovecot-uidlist"), "3 V7 N3\n1 :a\n2 :b\n").unwrap();
        let edit = UidlistEdit {
            header: Header {
                uid_validity: 7,
                next_uid: 4,
                guid: None,
                extra: String::new(),
            },
            remove: vec![2],
            upsert: vec![rec(3, "c")],
        };
        let plan = MailboxPlan {
            uidlist: Some(UidlistChange::Write(edit.clone())),
            ..MailboxPlan::default()
        };
        (dir, plan, edit)
    }

    fn batch() -> ApplyOptions {
        ApplyOptions {
            fsync: FsyncPolicy::Batch,
            ownership: Ownership::RunningUser,
            read_ahead: Spool::MAX_BYTES,
        }
    }

    fn tmp_entries(dir: &Path) -> usize {
        fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    #[test]
    fn a_speculated_uidlist_replaces_an_unchanged_one() {
        let (dir, plan, edit) = speculation_fixture();
        let path = dir.path();
        let speculated = speculate_uidlist(path, &plan, &batch()).expect("speculated");
        assert_eq!(tmp_entries(path), 1, "written beside the bodies, in tmp/");
        assert_eq!(
            fs::read_to_string(path.join("dovecot-uidlist")).unwrap(),
            "3 V7 N3\n1 :a\n2 :b\n",
            "nothing replaced before the lock"
        );
        write_uidlist(path, &edit, (0, 0), &batch(), Some(speculated)).unwrap();
        assert_eq!(
            fs::read_to_string(path.join("dovecot-uidlist")).unwrap(),
            "3 V7 N4\n1 :a\n3 :c\n"
        );
        assert_eq!(tmp_entries(path), 0);
    }

    #[test]
    fn a_uidlist_changed_since_the_speculation_is_rendered_again() {
        let (dir, plan, edit) = speculation_fixture();
        let path = dir.path();
        let speculated = speculate_uidlist(path, &plan, &batch()).expect("speculated");
        // Dovecot numbered a new file between the speculation and our lock.
        fs::write(path.join("dovecot-uidlist"), "3 V7 N10\n1 :a\n2 :b\n9 :z\n").unwrap();
        write_uidlist(path, &edit, (0, 0), &batch(), Some(speculated)).unwrap();
        assert_eq!(
            fs::read_to_string(path.join("dovecot-uidlist")).unwrap(),
            "3 V7 N10\n1 :a\n3 :c\n9 :z\n",
            "Dovecot's record and N survive"
        );
        assert_eq!(tmp_entries(path), 0, "the stale speculation is removed");
    }

    #[test]
    fn speculation_is_batch_only_and_cleans_up_when_dropped() {
        let (dir, plan, _) = speculation_fixture();
        let path = dir.path();
        for fsync in [FsyncPolicy::None, FsyncPolicy::File] {
            let options = ApplyOptions { fsync, ..batch() };
            assert!(speculate_uidlist(path, &plan, &options).is_none());
        }
        let speculated = speculate_uidlist(path, &plan, &batch()).expect("speculated");
        assert_eq!(tmp_entries(path), 1);
        drop(speculated);
        assert_eq!(tmp_entries(path), 0);
        fs::write(path.join("dovecot-uidlist"), "3 V7 N3\n1 :a\n2 :b").unwrap();
        assert!(
            speculate_uidlist(path, &plan, &batch()).is_none(),
            "a torn uidlist is left to the locked path"
        );
    }

    #[test]
    fn a_uid_taken_after_the_speculation_is_found_under_the_lock() {
        let (dir, plan, edit) = speculation_fixture();
        let path = dir.path();
        let speculated = speculate_uidlist(path, &plan, &batch()).expect("speculated");
        let unchanged = taken_meanwhile(path, &edit, Some(&speculated));
        assert_eq!((unchanged.upserts, unchanged.uids.len()), (0, 0));
        // Dovecot numbered a new file 3, the UID the plan gives `c`, after the speculation.
        fs::write(
            path.join("dovecot-uidlist"),
            "3 V7 N4\n1 :a\n2 :b\n3 :late\n",
        )
        .unwrap();
        let raced = taken_meanwhile(path, &edit, Some(&speculated));
        assert_eq!(raced.upserts, 1);
        assert!(raced.uids.contains(&3));
    }

    #[test]
    fn no_speculation_from_a_uidlist_that_already_gives_an_upserts_uid_away() {
        let (dir, plan, edit) = speculation_fixture();
        let path = dir.path();
        fs::write(
            path.join("dovecot-uidlist"),
            "3 V7 N4\n1 :a\n2 :b\n3 :late\n",
        )
        .unwrap();
        assert!(speculate_uidlist(path, &plan, &batch()).is_none());
        assert_eq!(tmp_entries(path), 0);
        assert_eq!(taken_meanwhile(path, &edit, None).upserts, 1);
    }

    #[test]
    fn a_uid_dovecot_gave_away_after_the_scan_is_not_taken_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        for root in [&src, &dst] {
            for sub in ["cur", "new", "tmp"] {
                fs::create_dir_all(root.join(sub)).unwrap();
            }
        }
        fs::write(src.join("cur/theirs:2,"), "body\n").unwrap();
        for base in ["a", "b"] {
            fs::write(dst.join("cur").join(format!("{base}:2,")), "x\n").unwrap();
        }
        // As scanned: UIDs 1 and 2, next 3. The plan copies `theirs` as 3 and, for a UID
        // conflict, renumbers `a` from 1 to 4.
        let plan = Plan {
            mailboxes: vec![MailboxPlan {
                copies: vec![CopyOp {
                    uid: 3,
                    src_sub: crate::model::Subdir::Cur,
                    src_name: "theirs:2,".into(),
                    dst_sub: crate::model::Subdir::Cur,
                    dst_name: "theirs:2,".into(),
                    size: 5,
                }],
                uidlist: Some(UidlistChange::Write(UidlistEdit {
                    header: Header {
                        uid_validity: 7,
                        next_uid: 5,
                        guid: None,
                        extra: String::new(),
                    },
                    remove: vec![1],
                    upsert: vec![rec(3, "theirs"), rec(4, "a")],
                })),
                ..MailboxPlan::default()
            }],
            ..Plan::default()
        };
        // Meanwhile Dovecot delivered two messages and numbered them 3 and 4.
        for base in ["late", "later"] {
            fs::write(dst.join("new").join(base), "y\n").unwrap();
        }
        let uidlist = "3 V7 N5\n1 :a\n2 :b\n3 :late\n4 :later\n";
        fs::write(dst.join("dovecot-uidlist"), uidlist).unwrap();
        let source = crate::replica::local::LocalReplica::new(&src);
        let report = apply(&dst, &plan, &source, &batch(), &NoProgress).unwrap();
        assert_eq!(
            fs::read_to_string(dst.join("dovecot-uidlist")).unwrap(),
            uidlist,
            "Dovecot's records stay, and so does a's"
        );
        assert!(
            !dst.join("cur/theirs:2,").exists(),
            "not landed without a UID"
        );
        assert!(report.vanished > 0, "the run is not complete: {report:?}");
    }

    #[test]
    fn meanwhile_runs_once_whether_the_apply_syncs_or_fails() {
        use std::sync::atomic::AtomicUsize;
        let dir = tempfile::tempdir().unwrap();
        let source = crate::replica::local::LocalReplica::new(dir.path().join("src"));
        let plan = Plan {
            mailboxes: vec![MailboxPlan {
                dir: ".Sent".into(),
                name: "Sent".into(),
                create: Some(crate::table::DirMeta {
                    mode: 0o700,
                    uid: 0,
                    gid: 0,
                }),
                maildirfolder: true,
                ..MailboxPlan::default()
            }],
            root_meta: crate::table::DirMeta {
                mode: 0o700,
                uid: 0,
                gid: 0,
            },
            ..Plan::default()
        };
        for fsync in [FsyncPolicy::Batch, FsyncPolicy::None] {
            let calls = AtomicUsize::new(0);
            let count = || {
                calls.fetch_add(1, Ordering::SeqCst);
            };
            let root = dir.path().join(format!("dst-{fsync:?}"));
            let options = ApplyOptions { fsync, ..batch() };
            apply_overlapping(&root, &plan, &source, &options, &NoProgress, &count).unwrap();
            assert!(root.join(".Sent/cur").is_dir());
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{fsync:?}");
        }
        let calls = AtomicUsize::new(0);
        let count = || {
            calls.fetch_add(1, Ordering::SeqCst);
        };
        let not_a_dir = dir.path().join("file");
        fs::write(&not_a_dir, "x").unwrap();
        let failed = apply_overlapping(&not_a_dir, &plan, &source, &batch(), &NoProgress, &count);
        assert!(failed.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "also when the apply fails");
    }

    #[test]
    fn a_mailbox_with_mail_delivered_since_the_scan_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Maildir++ and fs layout; the scan saw one message in each, Dovecot added one.
        for (mailbox, home) in [(".Lists", ".Lists"), ("Work", "Work")] {
            for d in ["cur", "new", "tmp"] {
                fs::create_dir_all(root.join(home).join(d)).unwrap();
            }
            fs::write(root.join(home).join("cur/seen:2,S"), "x").unwrap();
            fs::write(root.join(home).join("new/delivered"), "y").unwrap();
            assert!(!delete_mailbox(root, mailbox, 1).unwrap(), "{mailbox}");
            for f in ["cur/seen:2,S", "new/delivered"] {
                assert!(root.join(home).join(f).exists(), "{mailbox}: {f} kept");
            }
            assert!(delete_mailbox(root, mailbox, 2).unwrap(), "{mailbox}");
            assert!(!root.join(home).join("cur").exists(), "{mailbox}");
        }
        assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn deleting_inbox_keeps_root_files_and_child_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["cur", "new", "tmp", ".Sent/cur"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "subscriptions",
            "dovecot-uidvalidity",
            "dovecot-uidlist",
            "cur/x:2,S",
        ] {
            fs::write(root.join(f), "x").unwrap();
        }
        assert!(delete_mailbox(root, "", 1).unwrap());
        assert!(!root.join("cur").exists() && !root.join("dovecot-uidlist").exists());
        for kept in ["subscriptions", "dovecot-uidvalidity", "tmp", ".Sent/cur"] {
            assert!(root.join(kept).exists(), "{kept} must survive");
        }
        assert!(delete_mailbox(root, ".Sent", 0).unwrap());
        assert!(!root.join(".Sent").exists());
        assert_eq!(
            fs::read_dir(root.join("tmp")).unwrap().count(),
            0,
            "trash removed"
        );
    }

    #[test]
    fn a_killed_runs_subscriptions_lock_is_recognised_and_replaced_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("tmp")).unwrap();
        let dead_temp = root.join(format!("tmp/{}2147483646.7", md::TEMP_PREFIX));
        fs::write(&dead_temp, "old\n").unwrap();
        fs::hard_link(&dead_temp, root.join("subscriptions.lock")).unwrap();
        let options = ApplyOptions {
            fsync: FsyncPolicy::None,
            ownership: Ownership::RunningUser,
            read_ahead: Spool::MAX_BYTES,
        };
        let started = std::time::Instant::now();
        write_subscriptions(root, b"V\t2\n\nINBOX\n", (0, 0), &options).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited for a dead run's lock"
        );
        assert_eq!(
            fs::read(root.join("subscriptions")).unwrap(),
            b"V\t2\n\nINBOX\n"
        );
        assert!(!root.join("subscriptions.lock").exists());
    }

    #[test]
    fn a_live_foreign_subscriptions_lock_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("tmp")).unwrap();
        fs::write(root.join("subscriptions.lock"), "someone else's\n").unwrap();
        let lock = root.join("subscriptions.lock");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            fs::remove_file(lock).unwrap();
        });
        let options = ApplyOptions {
            fsync: FsyncPolicy::None,
            ownership: Ownership::RunningUser,
            read_ahead: Spool::MAX_BYTES,
        };
        let started = std::time::Instant::now();
        write_subscriptions(root, b"V\t2\n\n", (0, 0), &options).unwrap();
        releaser.join().unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "did not wait for the holder"
        );
    }
}
