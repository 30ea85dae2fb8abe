//! A replica in a local directory: scans with the scanner, opens bodies straight from disk,
//! applies plans with the local applier. Never reads outside its root.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::model::{MailboxStamps, Subdir};
use crate::progress::Progress;
use crate::replica::{Body, BodyData, BodyError, BodySource, Replica};
use crate::runlock::RunLock;
use crate::scan::{self, ScanOptions, mailbox_path};
use crate::storage::maildir::filename;
use crate::storage::maildir::layout::Layout;
use crate::storage::maildir::writer::BodyMeta;
use crate::storage::mmap;
use crate::sync::apply::{self, ApplyOptions, ApplyReport};
use crate::sync::plan::Plan;
use crate::table::{MailTable, MailboxTable};

/// A Maildir root on this machine.
#[derive(Debug, Clone)]
pub struct LocalReplica {
    root: PathBuf,
    /// Held while this replica (or a clone) lives, when a run will write it.
    _run_lock: Option<Arc<RunLock>>,
}

impl LocalReplica {
    /// A replica rooted at `root` (which need not exist yet: a fresh destination).
    pub fn new(root: impl Into<PathBuf>) -> LocalReplica {
        LocalReplica {
            root: root.into(),
            _run_lock: None,
        }
    }

    /// The same replica, holding `lock` (on its root), if any, for as long as it lives.
    pub fn holding(self, lock: Option<RunLock>) -> LocalReplica {
        LocalReplica {
            _run_lock: lock.map(Arc::new),
            ..self
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn open_no_follow(path: &Path) -> io::Result<File> {
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    }

    /// Opens `dir/sub/name`; when it is gone, looks for the same base name under other
    /// flags or in the other subdirectory (Dovecot renamed it meanwhile).
    fn open_current(
        &self,
        dir: &str,
        sub: Subdir,
        name: &str,
    ) -> Result<(File, PathBuf), BodyError> {
        let mailbox = mailbox_path(&self.root, dir);
        let path = mailbox.join(sub.as_str()).join(name);
        match Self::open_no_follow(&path) {
            Ok(file) => return Ok((file, path)),
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(BodyError::Failed(format!("{}: {e}", path.display())));
            }
            Err(_) => {}
        }
        let base = name.split(':').next().unwrap_or(name);
        for sub in [Subdir::Cur, Subdir::New] {
            let Ok(entries) = fs::read_dir(mailbox.join(sub.as_str())) else {
                continue;
            };
            for entry in entries.flatten() {
                let entry_name = entry.file_name();
                let Some(entry_name) = entry_name.to_str() else {
                    continue;
                };
                if filename::parse(entry_name).is_ok_and(|p| p.base == base) {
                    let found = entry.path();
                    return Self::open_no_follow(&found)
                        .map(|f| (f, found.clone()))
                        .map_err(|e| BodyError::Failed(format!("{}: {e}", found.display())));
                }
            }
        }
        Err(BodyError::Vanished(path.display().to_string()))
    }
}

impl BodySource for LocalReplica {
    fn open_body(&self, dir: &str, sub: Subdir, name: &str) -> Result<Body<'_>, BodyError> {
        let (file, path) = self.open_current(dir, sub, name)?;
        let meta = file
            .metadata()
            .map_err(|e| BodyError::Failed(format!("{}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(BodyError::Failed(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        Ok(Body {
            data: BodyData::File(file),
            meta: BodyMeta::of(&meta),
            origin: path.display().to_string(),
        })
    }
}

impl Replica for LocalReplica {
    fn location(&self) -> String {
        resolve(&self.root).display().to_string()
    }

    fn detect_layout(&self) -> Result<Option<Layout>> {
        Layout::detect_folders(&self.root).map_err(|e| crate::Error::io(&self.root, e))
    }

    fn scan(&self, options: &ScanOptions, progress: &dyn Progress) -> Result<MailTable> {
        scan::scan(&self.root, options, progress)
    }

    fn save_scan_cache(
        &self,
        options: &ScanOptions,
        table: &MailTable,
        changed: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<()> {
        scan::save_cache(&self.root, options, table, changed)
            .map_err(|e| crate::Error::io(options.cache_dir.as_deref().unwrap_or(&self.root), e))
    }

    fn stamps_now(&self, dirs: &[String]) -> Option<HashMap<String, MailboxStamps>> {
        use rayon::prelude::*;
        Some(
            dirs.par_iter()
                .map(|dir| {
                    let stamps = scan::cache::take_stamps(&mailbox_path(&self.root, dir));
                    (dir.clone(), stamps)
                })
                .collect(),
        )
    }

    fn rescan_mailbox(&self, layout: Layout, dir: &str) -> MailboxTable {
        scan::scan_mailbox(&self.root, layout, dir)
    }

    fn content_hash(&self, dir: &str, sub: Subdir, name: &str) -> Result<u128, BodyError> {
        let (file, path) = self.open_current(dir, sub, name)?;
        mmap::hash_file(&file).map_err(|e| BodyError::Failed(format!("{}: {e}", path.display())))
    }

    fn apply(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        options: &ApplyOptions,
        progress: &dyn Progress,
    ) -> Result<ApplyReport> {
        apply::apply(&self.root, plan, source, options, progress)
    }

    fn apply_overlapping(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        options: &ApplyOptions,
        progress: &dyn Progress,
        meanwhile: &(dyn Fn() + Sync),
    ) -> Result<ApplyReport> {
        apply::apply_overlapping(&self.root, plan, source, options, progress, meanwhile)
    }
}

/// Refuses a source and destination where one lies inside the other (or they are the
/// same): the mirror would copy its own output.
pub fn check_overlap(src: &Path, dst: &Path) -> Result<()> {
    let (a, b) = (resolve(src), resolve(dst));
    if a.starts_with(&b) || b.starts_with(&a) {
        return Err(crate::Error::Overlap(src.to_path_buf(), dst.to_path_buf()));
    }
    Ok(())
}

/// Canonicalizes the longest existing prefix of `path` and appends the rest.
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.clone();
    let mut rest = Vec::new();
    while fs::canonicalize(&existing).is_err() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return absolute,
        }
    }
    let mut resolved = fs::canonicalize(&existing).unwrap_or(existing);
    for part in rest.iter().rev() {
        resolved.push(part);
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_refused_even_for_missing_destinations() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        assert!(check_overlap(&src, &src.join("backup/x")).is_err());
        assert!(check_overlap(&src.join("."), &src).is_err());
        assert!(check_overlap(&src, &dir.path().join("dst")).is_ok());
    }
}
