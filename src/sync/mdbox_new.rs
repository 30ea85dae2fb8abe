//! Migration into a new mdbox tree: every message of a scanned source (Maildir or mdbox)
//! is appended to fresh `storage/m.N` files, then the map index and one index per mailbox
//! are written as transaction logs that Dovecot replays — UIDs, UIDVALIDITY, mailbox and
//! message GUIDs, flags, keywords and received dates kept. The whole tree is built in a
//! hidden sibling directory, fsynced (data, then map, then mailbox indexes) and renamed
//! into place in one step, so a run killed at any instant leaves either nothing or the
//! complete tree. Never writes into an existing mdbox tree.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::progress::{Event, Progress};
use crate::replica::{BodySource, Key};
use crate::storage::maildir::keywords::LETTERS;
use crate::storage::maildir::layout::Layout;
use crate::storage::mdbox::append::Appender;
use crate::storage::mdbox::dbox::Metadata;
use crate::storage::mdbox::log_writer::{LogWriter, MailRecord};
use crate::storage::mdbox::{guid_128, layout as mdbox_layout};
use crate::table::{MailTable, MailboxTable, status};

/// What a migration wrote.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NewTreeReport {
    /// Mailboxes created.
    pub mailboxes: u64,
    /// Messages written.
    pub messages: u64,
    /// Body bytes written.
    pub bytes: u64,
    /// `m.N` files written.
    pub files: u32,
    /// Wall time.
    pub seconds: f64,
}

/// Writes the mdbox tree `dst` (absent or an empty directory) from the scanned `table`,
/// reading bodies from `source`.
pub fn write_new_tree(
    dst: &Path,
    table: &MailTable,
    source: &dyn BodySource,
    progress: &dyn Progress,
) -> Result<NewTreeReport> {
    let started = Instant::now();
    check_empty(dst)?;
    let name = dst
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a usable destination", dst.display())))?;
    let parent = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let prefix = format!(".{}.mdsync-new-", name.to_string_lossy());
    remove_dead_builds(parent, &prefix);
    let tmp = parent.join(format!("{prefix}{}", std::process::id()));
    let result = build(&tmp, table, source, progress).and_then(|mut report| {
        if dst.exists() {
            fs::remove_dir(dst).map_err(|e| Error::io(dst, e))?;
        }
        fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))?;
        fsync_path(parent)?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Removes the build directories (`prefix` + PID) of killed runs beside the destination:
/// a run that got as far as the rename left none, so these never became the tree.
fn remove_dead_builds(parent: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(process_is_gone) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// True when no process `pid` runs on this machine.
pub(crate) fn process_is_gone(pid: i32) -> bool {
    pid > 0
        && matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
}

/// Refuses a destination that holds anything.
fn check_empty(dst: &Path) -> Result<()> {
    match fs::read_dir(dst) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::Usage(format!(
                    "{}: not empty; mdsync writes mdbox only into a new, empty destination \
                     (incremental mdbox writes are not supported yet)",
                    dst.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(dst, e)),
    }
}

/// Builds the whole tree in `tmp`.
fn build(
    tmp: &Path,
    table: &MailTable,
    source: &dyn BodySource,
    progress: &dyn Progress,
) -> Result<NewTreeReport> {
    let owner = (table.root_meta.uid, table.root_meta.gid);
    let now = now_secs();
    mkdir(tmp, owner)?;
    mkdir(&tmp.join("storage"), owner)?;
    mkdir(&tmp.join("mailboxes"), owner)?;
    let mut storage = Appender::new(tmp.join("storage"), owner, now, 1, 1);
    let mut placed_by_mailbox = Vec::new();
    let mut report = NewTreeReport::default();
    if source.sequential() {
        announce_bodies(table, source)?;
    }
    for mailbox in table.mailboxes.iter().filter(|m| m.broken.is_none()) {
        let placed = place_mailbox(mailbox, source, &mut storage, &mut report)?;
        progress.event(Event::MailboxScanned {
            messages: placed.len() as u64,
        });
        placed_by_mailbox.push((mailbox, placed));
    }
    report.files = storage.finish()?;
    // Data is on disk; now the map, then the mailbox indexes.
    let map_validity = now.max(1);
    let mut map_log = LogWriter::new(now, now);
    map_log.header_update(24, &map_validity.to_le_bytes());
    map_log.commit();
    storage.map_records(&mut map_log);
    let map_path = tmp.join("storage/dovecot.map.index.log");
    write_file(&map_path, &map_log.finish(), owner)?;
    for (mailbox, placed) in &placed_by_mailbox {
        let dir = tmp
            .join("mailboxes")
            .join(mdbox_dir(table.layout, &mailbox.dir)?);
        mkdir_all(&dir.join(mdbox_layout::DBOX_MAILS), tmp, owner)?;
        let log = mailbox_log(mailbox, placed, map_validity, now);
        write_file(
            &dir.join(mdbox_layout::DBOX_MAILS).join("dovecot.index.log"),
            &log,
            owner,
        )?;
        report.mailboxes += 1;
    }
    write_root_files(tmp, table, owner)?;
    fsync_tree(tmp)?;
    Ok(report)
}

/// Appends the messages of one mailbox to `storage`, in UID order; messages the source
/// has not numbered yet get the next UIDs, as Dovecot would give them.
fn place_mailbox(
    mailbox: &MailboxTable,
    source: &dyn BodySource,
    storage: &mut Appender,
    report: &mut NewTreeReport,
) -> Result<Vec<MailRecord>> {
    let mut next_uid = mailbox.next_uid.max(1);
    let mut placed = Vec::with_capacity(mailbox.len());
    for i in 0..mailbox.len() {
        if mailbox.has(i, status::BROKEN) {
            continue;
        }
        let uid = match mailbox.msgs.uid[i] {
            0 => {
                next_uid += 1;
                next_uid - 1
            }
            uid => uid,
        };
        let body = source
            .open_body(&mailbox.dir, mailbox.subdir(i), mailbox.name(i))
            .map_err(|e| Error::Usage(e.to_string()))?;
        let guid = mailbox.guid(i).to_string();
        let (map_uid, len) = store_body(storage, body, &guid, &mailbox.name)?;
        report.messages += 1;
        report.bytes += len;
        let flags = mailbox.msgs.flags[i];
        placed.push(MailRecord {
            uid,
            flags: index_flags(flags.system),
            keywords: (0..LETTERS)
                .filter(|k| flags.keywords & (1 << k) != 0)
                .filter_map(|k| mailbox.keywords.names[k].clone())
                .collect(),
            map_uid,
            guid: guid_128(&guid),
        });
    }
    placed.sort_by_key(|p| p.uid);
    Ok(placed)
}

/// Tells a sequential (remote) source every body `place_mailbox` opens, in its order.
fn announce_bodies(table: &MailTable, source: &dyn BodySource) -> Result<()> {
    crate::sync::apply::announce(source, &body_keys(table))
}

/// Every body a new tree is written from, in the order they are read: mailboxes in table
/// order without a broken one, rows in table order without a broken row.
pub fn body_keys(table: &MailTable) -> Vec<Key> {
    table
        .mailboxes
        .iter()
        .filter(|m| m.broken.is_none())
        .flat_map(|m| {
            (0..m.len())
                .filter(|&i| !m.has(i, status::BROKEN))
                .map(move |i| Key {
                    dir: m.dir.clone(),
                    sub: m.subdir(i),
                    name: m.name(i).to_string(),
                })
        })
        .collect()
}

/// Reads one body and appends it with its metadata (GUID, received date = the body's
/// mtime, original mailbox); returns its map UID and length.
pub(crate) fn store_body(
    appender: &mut Appender,
    mut body: crate::replica::Body<'_>,
    guid: &str,
    mailbox: &str,
) -> Result<(u32, u64)> {
    let mut bytes = Vec::with_capacity(body.meta.len as usize);
    body.data
        .as_read()
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Usage(format!("{}: {e}", body.origin)))?;
    let meta = Metadata {
        guid: guid.to_string(),
        received: Some(body.meta.mtime.0.max(0) as u64),
        orig_mailbox: Some(mailbox.to_string()),
        ..Metadata::default()
    };
    Ok((appender.append(&bytes, &meta)?, bytes.len() as u64))
}

/// Maildir system flag letters → Dovecot index flag bits.
pub(crate) fn index_flags(system: u32) -> u8 {
    let has = |letter: u8| system & (1 << (letter - b'A')) != 0;
    [
        (b'R', 0x01),
        (b'F', 0x02),
        (b'T', 0x04),
        (b'S', 0x08),
        (b'D', 0x10),
    ]
    .iter()
    .filter(|(letter, _)| has(*letter))
    .fold(0, |acc, (_, bit)| acc | bit)
}

/// `mailboxes/<this>` for a table directory (`""` is INBOX; names stay modified UTF-7).
pub(crate) fn mdbox_dir(layout: Layout, dir: &str) -> Result<String> {
    let rel = match (dir, layout) {
        ("", _) => "INBOX".to_string(),
        (d, Layout::MaildirPlusPlus) => d.trim_start_matches('.').replace('.', "/"),
        (d, Layout::Fs) => d.to_string(),
    };
    if rel
        .split('/')
        .any(|p| p.is_empty() || p == ".." || p == mdbox_layout::DBOX_MAILS)
    {
        return Err(Error::Usage(format!(
            "{dir}: cannot be an mdbox mailbox name"
        )));
    }
    Ok(rel)
}

/// The mailbox index as one log: identity, messages, their map UIDs and GUIDs, keywords.
fn mailbox_log(
    mailbox: &MailboxTable,
    placed: &[MailRecord],
    map_validity: u32,
    now: u32,
) -> Vec<u8> {
    let header = mailbox.header.as_ref();
    let validity = header.map_or(now, |h| h.uid_validity).max(1);
    let guid = header
        .and_then(|h| h.guid)
        .map_or_else(|| fresh_guid(&mailbox.name), |g| g.0);
    let mut log = LogWriter::new(now, now);
    log.header_update(24, &validity.to_le_bytes());
    log.commit();
    log.mdbox_hdr(map_validity, guid);
    log.commit();
    if !placed.is_empty() {
        log.mdbox_appends(placed, now);
    }
    let last = placed.last().map_or(0, |p| p.uid);
    let next_uid = mailbox.next_uid.max(last + 1).max(1);
    log.header_update(28, &next_uid.to_le_bytes());
    log.finish()
}

/// A mailbox GUID for a source that has none: 16 bytes hashed from the name and the clock.
pub(crate) fn fresh_guid(name: &str) -> [u8; 16] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!("{name}\0{nanos}\0{}", std::process::id());
    xxhash_rust::xxh3::xxh3_128(seed.as_bytes()).to_le_bytes()
}

/// `subscriptions` and `dovecot-uidvalidity`, as the source had them.
fn write_root_files(tmp: &Path, table: &MailTable, owner: (u32, u32)) -> Result<()> {
    if let Some(subs) = &table.subscriptions {
        write_file(
            &tmp.join(crate::storage::maildir::SUBSCRIPTIONS),
            subs,
            owner,
        )?;
    }
    let highest = table
        .mailboxes
        .iter()
        .filter_map(|m| m.header.as_ref().map(|h| h.uid_validity))
        .max()
        .unwrap_or(0);
    let next = table
        .uidvalidity_next
        .unwrap_or(0)
        .max(highest.saturating_add(1));
    let path = tmp.join(crate::storage::maildir::UIDVALIDITY_FILE);
    write_file(&path, format!("{next:x}").as_bytes(), owner)
}

pub(crate) fn write_file(path: &Path, bytes: &[u8], owner: (u32, u32)) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    chown(path, owner)
}

pub(crate) fn mkdir(path: &Path, owner: (u32, u32)) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|e| Error::io(path, e))?;
    chown(path, owner)
}

/// Creates `path` and its missing parents below `top`, each owned by `owner`. A directory
/// on the way that is there with another owner gets `owner`: a run killed between `mkdir`
/// and `chown` left it so, and Dovecot could not enter it.
pub(crate) fn mkdir_all(path: &Path, top: &Path, owner: (u32, u32)) -> Result<()> {
    if path == top || !path.starts_with(top) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        mkdir_all(parent, top, owner)?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            use std::os::unix::fs::MetadataExt;
            if (meta.uid(), meta.gid()) != owner {
                chown(path, owner)?;
            }
            Ok(())
        }
        _ => mkdir(path, owner),
    }
}

pub(crate) fn chown(path: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

pub(crate) fn fsync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// fsyncs every directory of the new tree (files were synced as they were written).
fn fsync_tree(root: &Path) -> Result<()> {
    for entry in walkdir::WalkDir::new(root) {
        let entry = entry.map_err(|e| Error::io(root, e.into()))?;
        if entry.file_type().is_dir() {
            fsync_path(entry.path())?;
        }
    }
    Ok(())
}

pub(crate) fn now_secs() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_dirs_map_like_dovecot() {
        let letters = |s: &str| s.bytes().fold(0u32, |a, l| a | 1 << (l - b'A'));
        assert_eq!(index_flags(letters("RFTSD")), 0x1f);
        assert_eq!(index_flags(letters("SP")), 0x08);
        assert_eq!(mdbox_dir(Layout::MaildirPlusPlus, "").unwrap(), "INBOX");
        assert_eq!(mdbox_dir(Layout::MaildirPlusPlus, ".A.B").unwrap(), "A/B");
        assert_eq!(mdbox_dir(Layout::Fs, "A/B").unwrap(), "A/B");
        assert!(mdbox_dir(Layout::Fs, "A/../B").is_err());
    }

    #[test]
    fn mkdir_all_gives_directories_on_the_way_their_owner() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path();
        fs::create_dir(top.join("A")).unwrap();
        let me = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let owner = if me.0 == 0 { (12345, 12345) } else { me };
        mkdir_all(&top.join("A/B/C"), top, owner).unwrap();
        for dir in ["A", "A/B", "A/B/C"] {
            let meta = fs::metadata(top.join(dir)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), owner, "{dir}");
        }
        let outside = tempfile::tempdir().unwrap();
        mkdir_all(&outside.path().join("X"), top, owner).unwrap();
        assert!(!outside.path().join("X").exists(), "nothing outside top");
    }

    #[test]
    fn build_directories_of_dead_runs_go_and_live_ones_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join(".dst.mdsync-new-2147483646");
        let live = tmp
            .path()
            .join(format!(".dst.mdsync-new-{}", std::process::id()));
        let other = tmp.path().join(".other.mdsync-new-2147483646");
        for dir in [&dead, &live, &other] {
            fs::create_dir_all(dir.join("storage")).unwrap();
        }
        remove_dead_builds(tmp.path(), ".dst.mdsync-new-");
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }
}
