//! One writing mdsync per tree: the advisory lock a run holds, for its whole session, on
//! each tree it writes. A run started while another still writes the tree (an overlapping
//! cron job, the far side of an interrupted run still finishing its apply) waits for it,
//! then stops, instead of planning from a scan the other run is changing. The lock file
//! lives in the cache directory, never in the mail tree, and guards only against other
//! mdsync runs of the same user: Dovecot is kept in step by its own dotlocks.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// How long a run waits for another one by default: long enough for the far side of an
/// interrupted run to finish its apply, short enough that an overlapping cron job gives up
/// at once.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// The longest wait a peer may ask a server for: a server cannot tell a client that died
/// during the wait, so this bounds how long it outlives one.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// How often a waiting run tries again.
const RETRY: Duration = Duration::from_millis(50);

/// The lock, held until dropped (closing the file releases it, also when the process dies).
#[derive(Debug)]
pub struct RunLock {
    _held: Flock<File>,
}

/// Why a run could not take the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another run holds it, and went on holding it for the whole wait.
    #[error(
        "{root}: another mdsync run{holder} is writing this tree; gave up after {waited} s \
         (--lock-wait)"
    )]
    Busy {
        /// The tree.
        root: PathBuf,
        /// " (pid N)" when the holder wrote its pid, else empty.
        holder: String,
        /// Seconds waited.
        waited: u64,
    },
    /// The user interrupted the wait (SIGINT, SIGTERM).
    #[error("{root}: interrupted while waiting for another mdsync run writing this tree")]
    Interrupted {
        /// The tree.
        root: PathBuf,
    },
    /// The lock file cannot be made or locked (an unwritable cache directory): the run may
    /// go on without it.
    #[error("{path}: cannot take the run lock: {source}")]
    Unavailable {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl RunLock {
    /// The lock file of `root` under `lock_dir`: `<lock_dir>/locks/<xxh3 of the root's
    /// canonical path>.lock`. Outside the scan cache's directory of the root, whose
    /// pruning removes files it does not know.
    pub fn path_for(lock_dir: &Path, root: &Path) -> PathBuf {
        let canonical = canonical(root);
        let hash = xxhash_rust::xxh3::xxh3_64(canonical.as_os_str().as_encoded_bytes());
        lock_dir.join("locks").join(format!("{hash:016x}.lock"))
    }

    /// Takes the lock of `root`, waiting up to `wait` for a run that holds it.
    pub fn acquire(lock_dir: &Path, root: &Path, wait: Duration) -> Result<RunLock, LockError> {
        let path = RunLock::path_for(lock_dir, root);
        let unavailable = |source: io::Error| LockError::Unavailable {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(unavailable)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(unavailable)?;
        let started = Instant::now();
        let held = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => break held,
                Err((back, Errno::EWOULDBLOCK | Errno::EINTR))
                    if started.elapsed() < wait && !crate::interrupt::requested() =>
                {
                    file = back;
                    std::thread::sleep(RETRY.min(wait.saturating_sub(started.elapsed())));
                }
                Err(_) if crate::interrupt::requested() => {
                    return Err(LockError::Interrupted {
                        root: root.to_path_buf(),
                    });
                }
                Err((mut back, Errno::EWOULDBLOCK | Errno::EINTR)) => {
                    return Err(LockError::Busy {
                        root: root.to_path_buf(),
                        holder: holder(&mut back),
                        waited: started.elapsed().as_secs(),
                    });
                }
                Err((_, errno)) => return Err(unavailable(errno.into())),
            }
        };
        // Who holds it, for the message of a run that finds it taken. Best effort.
        let _ = held
            .set_len(0)
            .and_then(|()| writeln!(&*held, "{}", std::process::id()));
        Ok(RunLock { _held: held })
    }
}

/// " (pid N)" from a held lock file, else empty.
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.take(32).read_to_string(&mut text);
    match text.trim().parse::<u32>() {
        Ok(pid) => format!(" (pid {pid})"),
        Err(_) => String::new(),
    }
}

/// `root` resolved as far as it exists, so that a destination a first run creates keeps
/// the same lock file afterwards.
fn canonical(root: &Path) -> PathBuf {
    if let Ok(path) = fs::canonicalize(root) {
        return path;
    }
    let absolute = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => canonical(parent).join(name),
        _ => absolute,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_waits_then_gives_up_naming_the_tree_and_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let (locks, root) = (dir.path().join("cache"), dir.path().join("mail"));
        let held = RunLock::acquire(&locks, &root, Duration::ZERO).unwrap();
        let started = Instant::now();
        let busy = RunLock::acquire(&locks, &root, Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200), "it waited");
        let text = busy.to_string();
        assert!(text.starts_with(&root.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("(pid {})", std::process::id())),
            "{text}"
        );
        assert!(!root.exists(), "the mail tree is not touched");
        // Another tree is another lock.
        RunLock::acquire(&locks, &dir.path().join("other"), Duration::ZERO).unwrap();
        drop(held);
        RunLock::acquire(&locks, &root, Duration::ZERO).unwrap();
    }

    #[test]
    fn a_run_that_waits_gets_the_lock_when_the_holder_ends() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mail");
        let held = RunLock::acquire(dir.path(), &root, Duration::ZERO).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            drop(held);
        });
        RunLock::acquire(dir.path(), &root, Duration::from_secs(10)).unwrap();
        releaser.join().unwrap();
    }

    #[test]
    fn a_tree_created_by_the_first_run_keeps_its_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("new").join("mail");
        let before = RunLock::path_for(dir.path(), &root);
        fs::create_dir_all(&root).unwrap();
        assert_eq!(RunLock::path_for(dir.path(), &root), before);
        let relative = RunLock::path_for(dir.path(), Path::new("."));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(relative, RunLock::path_for(dir.path(), &cwd));
    }
}
