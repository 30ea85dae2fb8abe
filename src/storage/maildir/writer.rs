//! Safe Maildir writes, as a live Dovecot expects them: bodies go through `tmp/` with
//! `O_EXCL|O_NOFOLLOW`, get their mtime, owner and mode, and are renamed into place without
//! ever replacing an existing name; control files are replaced by write-temp-then-rename.
//! Decides nothing: the applier says what to write.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use super::TEMP_PREFIX;
use super::dotlock::with_path;

/// When data is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum FsyncPolicy {
    /// One `syncfs` for the staged bodies and uidlists before any is put in place, one at
    /// the end of the run (default).
    #[default]
    Batch,
    /// `fsync` every file and directory written.
    File,
    /// Never; the OS writes back when it likes.
    None,
}

/// Who owns what mdsync creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ownership {
    /// Leave ownership to the running user (not root).
    RunningUser,
    /// Copy owner and group from the source (root's default, like `rsync -a`).
    FromSource,
    /// Everything belongs to this uid and gid (`--chown`).
    Fixed(u32, u32),
}

impl Ownership {
    /// Changes the owner of an open file according to the policy.
    pub fn apply_fd(self, file: &File, src_uid: u32, src_gid: u32) -> io::Result<()> {
        let (uid, gid) = match self {
            Ownership::RunningUser => return Ok(()),
            Ownership::FromSource => (src_uid, src_gid),
            Ownership::Fixed(u, g) => (u, g),
        };
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))
    }

    /// Changes the owner of a path (never following a symlink).
    pub fn apply_path(self, path: &Path, src_uid: u32, src_gid: u32) -> io::Result<()> {
        let (uid, gid) = match self {
            Ownership::RunningUser => return Ok(()),
            Ownership::FromSource => (src_uid, src_gid),
            Ownership::Fixed(u, g) => (u, g),
        };
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| with_path(e, path))
    }
}

/// Metadata a copied message keeps: mtime is Dovecot's received date (INTERNALDATE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BodyMeta {
    /// Modification time, seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Length in bytes.
    pub len: u64,
}

impl BodyMeta {
    /// Reads the metadata of an open file.
    pub fn of(meta: &fs::Metadata) -> BodyMeta {
        BodyMeta {
            mtime: (meta.mtime(), meta.mtime_nsec() as u32),
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            len: meta.len(),
        }
    }

    fn mtime_system(&self) -> SystemTime {
        let (secs, nanos) = self.mtime;
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos)
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    }
}

/// A unique temp name in `tmp/`: `mdsync-tmp.<pid>.<counter>`.
pub fn temp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{TEMP_PREFIX}{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes a message into `tmp_dir` from `reader` and returns the temp file's path. The file
/// gets the source's mtime, mode and (per policy) owner; with [`FsyncPolicy::File`] it is
/// fsynced. Nothing outside `tmp/` is touched, so a crash leaves nothing Dovecot reads.
/// Generic so that a `File` source gets the kernel's `copy_file_range`.
pub fn write_to_tmp<R: io::Read>(
    tmp_dir: &Path,
    reader: &mut R,
    meta: &BodyMeta,
    ownership: Ownership,
    fsync: FsyncPolicy,
) -> io::Result<PathBuf> {
    create_tmp(
        tmp_dir,
        |file| io::copy(reader, file),
        meta,
        ownership,
        fsync,
    )
}

/// [`write_to_tmp`] for a body that arrives as a stream (from a peer, or read ahead): read
/// into a large buffer and written in a few large writes, instead of `io::copy`'s 8 KiB
/// ones — a far side writing 100,000 streamed messages spent its time in the kernel.
pub fn write_stream_to_tmp(
    tmp_dir: &Path,
    reader: &mut dyn io::Read,
    meta: &BodyMeta,
    ownership: Ownership,
    fsync: FsyncPolicy,
) -> io::Result<PathBuf> {
    create_tmp(
        tmp_dir,
        |file| copy_in_large_writes(reader, file),
        meta,
        ownership,
        fsync,
    )
}

/// Copies `reader` to `file` through a reused 256 KiB buffer per thread, each write as
/// large as the reader fills it.
fn copy_in_large_writes(reader: &mut dyn io::Read, file: &mut File) -> io::Result<u64> {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with_borrow_mut(|buffer| {
        buffer.resize(256 << 10, 0);
        let mut total = 0u64;
        loop {
            let filled = read_full(reader, buffer)?;
            file.write_all(&buffer[..filled])?;
            total += filled as u64;
            if filled < buffer.len() {
                return Ok(total);
            }
        }
    })
}

/// Reads until `buf` is full or the stream ends; returns the bytes read. (Also what the
/// wire's frame reader reads headers and payloads with.)
pub fn read_full(input: &mut (impl io::Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Creates a temp file in `tmp_dir`, fills it with `copy`, and gives it the source's
/// metadata; removes it again when anything fails.
fn create_tmp(
    tmp_dir: &Path,
    copy: impl FnOnce(&mut File) -> io::Result<u64>,
    meta: &BodyMeta,
    ownership: Ownership,
    fsync: FsyncPolicy,
) -> io::Result<PathBuf> {
    let path = tmp_dir.join(temp_name());
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| with_path(e, &path))?;
    let result = fill_tmp(&mut file, copy, meta, ownership, fsync);
    if let Err(e) = result {
        let _ = fs::remove_file(&path);
        return Err(with_path(e, &path));
    }
    Ok(path)
}

fn fill_tmp(
    file: &mut File,
    copy: impl FnOnce(&mut File) -> io::Result<u64>,
    meta: &BodyMeta,
    ownership: Ownership,
    fsync: FsyncPolicy,
) -> io::Result<()> {
    copy(file)?;
    ownership.apply_fd(file, meta.uid, meta.gid)?;
    file.set_permissions(fs::Permissions::from_mode(meta.mode))?;
    file.set_modified(meta.mtime_system())?;
    if fsync == FsyncPolicy::File {
        file.sync_all()?;
    }
    Ok(())
}

/// Renames `from` to `to`, failing with `AlreadyExists` instead of replacing a file.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOSYS) => {
            // Filesystems without RENAME_NOREPLACE: link() also refuses existing names.
            fs::hard_link(from, to).map_err(|e| with_path(e, to))?;
            fs::remove_file(from).map_err(|e| with_path(e, from))
        }
        Err(e) => Err(with_path(io::Error::from(e), to)),
    }
}

/// Replaces a control file atomically: write a temp file in `tmp_dir`, fsync it (unless the
/// policy is `none`), rename over. Readers see the old or the new file, never half.
pub fn replace_file(
    path: &Path,
    tmp_dir: &Path,
    content: &[u8],
    owner: (u32, u32),
    mode: u32,
    ownership: Ownership,
    fsync: FsyncPolicy,
) -> io::Result<()> {
    let tmp = write_temp(tmp_dir, content, owner, mode, ownership, fsync)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        with_path(e, path)
    })
}

/// Creates a directory (and missing parents) with the given mode and owner; an existing
/// directory is left as it is.
pub fn create_dir(
    path: &Path,
    mode: u32,
    owner: (u32, u32),
    ownership: Ownership,
) -> io::Result<()> {
    if let Some(existing) = existing_entry(path)? {
        return existing;
    }
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        create_dir(parent, mode, owner, ownership)?;
    }
    match make_dir(path, mode, owner, ownership) {
        // Created meanwhile by someone else: theirs stands, as above.
        Err(_) if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) => Ok(()),
        other => other,
    }
}

/// Removes a file; one that is already gone is fine.
pub fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(with_path(e, path)),
        _ => Ok(()),
    }
}

/// Creates directory `target` so that it appears complete or not at all: it is built in
/// `staging` (same filesystem) with its mode, owner, `subdirs` and an optional empty
/// `marker` file, then renamed into place. A kill can leave only a temp directory in
/// `staging`, never a half-owned directory where Dovecot looks. An existing target is left
/// as it is; missing parents are created the same way.
#[allow(clippy::too_many_arguments)]
pub fn create_dir_staged(
    target: &Path,
    staging: &Path,
    mode: u32,
    owner: (u32, u32),
    ownership: Ownership,
    subdirs: &[&str],
    marker: Option<&str>,
) -> io::Result<()> {
    if let Some(existing) = existing_entry(target)? {
        return existing;
    }
    if let Some(parent) = target.parent()
        && fs::symlink_metadata(parent).is_err()
    {
        create_dir_staged(parent, staging, mode, owner, ownership, &[], None)?;
    }
    let temp = staging.join(temp_name());
    let build = || -> io::Result<()> {
        make_dir(&temp, mode, owner, ownership)?;
        for sub in subdirs {
            make_dir(&temp.join(sub), mode, owner, ownership)?;
        }
        if let Some(marker) = marker {
            let file = fs::File::create(temp.join(marker))?;
            ownership.apply_fd(&file, owner.0, owner.1)?;
        }
        fs::rename(&temp, target)
    };
    match build() {
        Ok(()) => Ok(()),
        Err(_) if fs::symlink_metadata(target).is_ok() => {
            // Someone else created it meanwhile: theirs stands.
            let _ = fs::remove_dir_all(&temp);
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&temp);
            Err(with_path(e, target))
        }
    }
}

/// `Some(Ok)` for an existing real directory, `Some(Err)` for anything else there (a
/// symlink is never written through), `None` when nothing is there.
fn existing_entry(path: &Path) -> io::Result<Option<io::Result<()>>> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(Some(Ok(()))),
        Ok(_) => Ok(Some(Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{}: exists and is not a directory (symlink?); not followed",
                path.display()
            ),
        )))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(with_path(e, path)),
    }
}

/// `mkdir`, then owner and mode.
fn make_dir(path: &Path, mode: u32, owner: (u32, u32), ownership: Ownership) -> io::Result<()> {
    fs::create_dir(path).map_err(|e| with_path(e, path))?;
    ownership.apply_path(path, owner.0, owner.1)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| with_path(e, path))
}

/// Gives `path` this owner and mode when they differ (used for the directories mdsync
/// owns the creation of: the root while it holds no mail, and the root's `tmp/`).
pub fn repair_dir(
    path: &Path,
    mode: u32,
    owner: (u32, u32),
    ownership: Ownership,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| with_path(e, path))?;
    let wanted_owner = match ownership {
        Ownership::RunningUser => None,
        Ownership::FromSource => Some(owner),
        Ownership::Fixed(u, g) => Some((u, g)),
    };
    if wanted_owner.is_some_and(|(u, g)| (meta.uid(), meta.gid()) != (u, g)) {
        ownership.apply_path(path, owner.0, owner.1)?;
    }
    if meta.permissions().mode() & 0o7777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| with_path(e, path))?;
    }
    Ok(())
}

/// Flushes the whole filesystem holding `path` (the `batch` fsync policy).
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let dir = File::open(path).map_err(|e| with_path(e, path))?;
    nix::unistd::syncfs(&dir).map_err(|e| with_path(io::Error::from(e), path))
}

/// fsyncs a directory so renames in it are durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| with_path(e, path))
}

/// Removes files a killed mdsync run left in a `tmp/` directory: our prefix, and a PID
/// that is no longer running (a concurrent run's files are left alone).
pub fn clean_stale_temps(tmp_dir: &Path) -> io::Result<usize> {
    let dead = dead_temps(tmp_dir);
    for entry in &dead {
        let path = entry.path();
        let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(|e| with_path(e, &path))?;
    }
    Ok(dead.len())
}

/// Entries of `tmp_dir` with mdsync's prefix whose PID is no longer running.
fn dead_temps(tmp_dir: &Path) -> Vec<fs::DirEntry> {
    // Never through a symlink: a `tmp` that is a link is not ours to clean.
    if !fs::symlink_metadata(tmp_dir).is_ok_and(|m| m.is_dir()) {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir(tmp_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else {
                return false;
            };
            let pid_text = rest
                .trim_start_matches("lock.")
                .trim_start_matches("trash.");
            let pid = pid_text
                .split('.')
                .next()
                .and_then(|p| p.parse::<i32>().ok());
            !pid.is_some_and(|p| {
                p as u32 == std::process::id()
                    || nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
            })
        })
        .collect()
}

/// True when `file` is a hard link of a temp file a dead mdsync run left in `tmp_dir`:
/// a lock that run took and never released.
pub fn is_twin_of_dead_temp(tmp_dir: &Path, file: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(file) else {
        return false;
    };
    dead_temps(tmp_dir).iter().any(|e| {
        e.metadata()
            .is_ok_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev())
    })
}

/// Writes `content` into a new temp file in `tmp_dir` (mode, owner, fsync per policy) and
/// returns its path; the caller links or renames it into place.
pub fn write_temp(
    tmp_dir: &Path,
    content: &[u8],
    owner: (u32, u32),
    mode: u32,
    ownership: Ownership,
    fsync: FsyncPolicy,
) -> io::Result<PathBuf> {
    let tmp = tmp_dir.join(temp_name());
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(content)?;
        ownership.apply_fd(&file, owner.0, owner.1)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        // Control files are synced before they replace the old ones under every policy
        // but `none`: a power cut must not leave an empty uidlist where Dovecot looks.
        if fsync != FsyncPolicy::None {
            file.sync_data()?;
        }
        Ok(())
    };
    match write() {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(with_path(e, &tmp))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_dir_appears_whole_with_parents() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("tmp");
        fs::create_dir(&staging).unwrap();
        let target = dir.path().join("A/B");
        create_dir_staged(
            &target,
            &staging,
            0o750,
            (0, 0),
            Ownership::RunningUser,
            &["cur", "new"],
            Some("maildirfolder"),
        )
        .unwrap();
        assert!(target.join("cur").is_dir() && target.join("maildirfolder").is_file());
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o750
        );
        assert_eq!(
            fs::read_dir(&staging).unwrap().count(),
            0,
            "no staging leftovers"
        );
        create_dir_staged(
            &target,
            &staging,
            0o700,
            (0, 0),
            Ownership::RunningUser,
            &[],
            None,
        )
        .unwrap();
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o750,
            "existing kept"
        );
    }

    #[test]
    fn rename_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, "a").unwrap();
        fs::write(&b, "b").unwrap();
        let err = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read_to_string(&b).unwrap(), "b");
        rename_noreplace(&a, &dir.path().join("c")).unwrap();
        assert!(!a.exists());
    }

    #[test]
    fn tmp_copy_keeps_mtime_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let meta = BodyMeta {
            mtime: (1_600_000_000, 5),
            mode: 0o640,
            uid: 0,
            gid: 0,
            len: 5,
        };
        let path = write_to_tmp(
            dir.path(),
            &mut &b"hello"[..],
            &meta,
            Ownership::RunningUser,
            FsyncPolicy::File,
        )
        .unwrap();
        let written = fs::metadata(&path).unwrap();
        assert_eq!(written.mtime(), 1_600_000_000);
        assert_eq!(written.permissions().mode() & 0o7777, 0o640);
        assert!(
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(TEMP_PREFIX)
        );
    }

    /// Hands out its bytes a few at a time, as a peer's stream may.
    struct Trickle<'a>(&'a [u8], usize);

    impl io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_streamed_body_is_written_whole_at_any_size() {
        let dir = tempfile::tempdir().unwrap();
        let meta = |len| BodyMeta {
            mtime: (1_600_000_000, 0),
            mode: 0o600,
            uid: 0,
            gid: 0,
            len,
        };
        // Empty, short, exactly one buffer, and more than two buffers.
        for len in [0usize, 1000, 256 << 10, (600 << 10) + 7] {
            let body: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let path = write_stream_to_tmp(
                dir.path(),
                &mut Trickle(&body, 70_001),
                &meta(len as u64),
                Ownership::RunningUser,
                FsyncPolicy::None,
            )
            .unwrap();
            assert_eq!(fs::read(&path).unwrap(), body, "{len} bytes");
        }
    }

    #[test]
    fn cleans_only_dead_runs_temps() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(format!("{TEMP_PREFIX}2147483646.1")), "x").unwrap();
        fs::write(
            dir.path()
                .join(format!("{TEMP_PREFIX}{}.1", std::process::id())),
            "x",
        )
        .unwrap();
        fs::write(dir.path().join("1700.M1P2.host"), "x").unwrap();
        assert_eq!(clean_stale_temps(dir.path()).unwrap(), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
