//! Dovecot's dotlock protocol (`file-dotlock.c`): create a temp file, `link()` it to
//! `<target>.lock`, detect stale locks by PID or by age, release only our own lock. Used for
//! `dovecot-uidlist.lock` and `subscriptions.lock`. Never holds a lock past drop.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Timing of one kind of lock, as Dovecot configures it.
#[derive(Debug, Clone, Copy)]
pub struct LockTiming {
    /// Give up waiting after this long.
    pub wait: Duration,
    /// A lock whose file and target did not change for this long is stale.
    pub stale: Duration,
}

/// The uidlist lock: stale after 120 s, waiters give up after 122 s.
pub const UIDLIST_TIMING: LockTiming = LockTiming {
    wait: Duration::from_secs(122),
    stale: Duration::from_secs(120),
};

/// A held dotlock; dropping it releases the lock if it is still ours.
#[derive(Debug)]
pub struct DotLock {
    lock_path: PathBuf,
    ino: u64,
    dev: u64,
    last_touch: Instant,
}

impl DotLock {
    /// Takes `<target>.lock`, waiting up to `timing.wait`. `temp_dir` must be on the same
    /// filesystem (the mailbox's `tmp/`); the temp file is named with mdsync's prefix so a
    /// killed run's leftovers are recognisable.
    pub fn acquire(target: &Path, temp_dir: &Path, timing: LockTiming) -> io::Result<DotLock> {
        let lock_path = lock_path_for(target);
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            match try_link_lock(&lock_path, temp_dir)? {
                Some(lock) => return Ok(lock),
                None if override_if_stale(&lock_path, target, timing.stale)? => continue,
                None if started.elapsed() >= timing.wait => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{}: held by another process for over {} s",
                            lock_path.display(),
                            timing.wait.as_secs()
                        ),
                    ));
                }
                None => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    /// Refreshes the lock's mtime when 10 s passed since the last refresh, so long work does
    /// not look stale to Dovecot.
    pub fn touch_if_due(&mut self) {
        if self.last_touch.elapsed() >= Duration::from_secs(10) {
            let now = SystemTime::now();
            if let Ok(file) = fs::File::options().write(true).open(&self.lock_path) {
                let _ = file.set_modified(now);
            }
            self.last_touch = Instant::now();
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.lock_path
    }
}

impl Drop for DotLock {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.lock_path)
            && meta.ino() == self.ino
            && meta.dev() == self.dev
        {
            let _ = fs::remove_file(&self.lock_path);
        }
    }
}

/// Removes `<target>.lock` when it names a process on this host that no longer exists
/// (a killed run's lock). Returns true when it removed one.
pub fn remove_if_owner_dead(target: &Path) -> io::Result<bool> {
    let lock_path = lock_path_for(target);
    if fs::symlink_metadata(&lock_path).is_err() || !owner_is_dead(&lock_path) {
        return Ok(false);
    }
    match fs::remove_file(&lock_path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(with_path(e, &lock_path)),
    }
}

/// `<target>.lock`.
pub fn lock_path_for(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_os_string();
    name.push(".lock");
    PathBuf::from(name)
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// One attempt: write `pid:host` into a temp file and link it to the lock name.
fn try_link_lock(lock_path: &Path, temp_dir: &Path) -> io::Result<Option<DotLock>> {
    let temp = temp_dir.join(format!(
        "{}lock.{}.{}",
        super::TEMP_PREFIX,
        std::process::id(),
        unique_suffix()
    ));
    let mut file = fs::File::options()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| with_path(e, &temp))?;
    file.write_all(format!("{}:{}", std::process::id(), host_name()).as_bytes())?;
    let meta = file.metadata()?;
    drop(file);
    let linked = fs::hard_link(&temp, lock_path);
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(Some(DotLock {
            lock_path: lock_path.to_path_buf(),
            ino: meta.ino(),
            dev: meta.dev(),
            last_touch: Instant::now(),
        })),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(with_path(e, lock_path)),
    }
}

/// Removes a stale lock: its owner PID is dead on this host (and the lock is over 2 s old),
/// or neither the lock nor its target changed for `stale`. Returns true when removed.
fn override_if_stale(lock_path: &Path, target: &Path, stale: Duration) -> io::Result<bool> {
    let meta = match fs::symlink_metadata(lock_path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(with_path(e, lock_path)),
    };
    let age = age_of(&meta);
    let owner_dead = age >= Duration::from_secs(2) && owner_is_dead(lock_path);
    let target_age = fs::metadata(target).map(|m| age_of(&m)).unwrap_or(age);
    if owner_dead || (age >= stale && target_age >= stale) {
        match fs::remove_file(lock_path) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(with_path(e, lock_path)),
        }
    }
    Ok(false)
}

fn age_of(meta: &fs::Metadata) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or_default()
}

/// True when the lock names a PID on this host that no longer exists.
fn owner_is_dead(lock_path: &Path) -> bool {
    let Ok(content) = fs::read_to_string(lock_path) else {
        return false;
    };
    let Some((pid, host)) = content.trim().split_once(':') else {
        return false;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    if host != host_name() || pid <= 0 {
        return false;
    }
    matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (nanos << 20) ^ COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Adds the path to an I/O error so the user sees which file failed.
pub fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> LockTiming {
        LockTiming {
            wait: Duration::from_millis(300),
            stale: Duration::from_secs(120),
        }
    }

    #[test]
    fn acquire_writes_pid_and_releases_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dovecot-uidlist");
        let lock = DotLock::acquire(&target, dir.path(), quick()).unwrap();
        let content = fs::read_to_string(lock.path()).unwrap();
        assert!(content.starts_with(&format!("{}:", std::process::id())));
        assert!(fs::read_dir(dir.path()).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("mdsync-tmp")
        }));
        drop(lock);
        assert!(!dir.path().join("dovecot-uidlist.lock").exists());
    }

    #[test]
    fn live_foreign_lock_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dovecot-uidlist");
        let lock_file = dir.path().join("dovecot-uidlist.lock");
        fs::write(&lock_file, format!("1:{}", host_name())).unwrap();
        let err = DotLock::acquire(&target, dir.path(), quick()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("dovecot-uidlist.lock"));
        assert!(lock_file.exists(), "a live owner's lock is never removed");
    }

    #[test]
    fn dead_owner_lock_is_overridden_after_two_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dovecot-uidlist");
        let lock_file = dir.path().join("dovecot-uidlist.lock");
        fs::write(&lock_file, format!("2147483646:{}", host_name())).unwrap();
        let old = SystemTime::now() - Duration::from_secs(5);
        fs::File::options()
            .write(true)
            .open(&lock_file)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let lock = DotLock::acquire(&target, dir.path(), quick()).unwrap();
        assert!(
            fs::read_to_string(lock.path())
                .unwrap()
                .starts_with(&std::process::id().to_string())
        );
    }

    #[test]
    fn does_not_release_a_lock_that_is_no_longer_ours() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dovecot-uidlist");
        let lock = DotLock::acquire(&target, dir.path(), quick()).unwrap();
        let lock_file = lock.path().to_path_buf();
        let other = dir.path().join("other");
        fs::write(&other, "someone else").unwrap();
        fs::rename(&other, &lock_file).unwrap();
        drop(lock);
        assert!(lock_file.exists());
    }
}
