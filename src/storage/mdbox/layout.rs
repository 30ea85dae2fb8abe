//! Where things live in an mdbox root: `storage/` with the map index and `m.N` files, and
//! one `mailboxes/<name>/dbox-Mails/` directory per mailbox (names in modified UTF-7,
//! hierarchy as nested directories). Lists directories; never reads a message or an index.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::storage::maildir::layout::decode_mutf7;

/// Directory inside a mailbox's directory that holds its index.
pub const DBOX_MAILS: &str = "dbox-Mails";

/// True when `root` looks like an mdbox root: it has both `storage/` and `mailboxes/`.
pub fn is_mdbox(root: &Path) -> bool {
    root.join("storage").is_dir() && root.join("mailboxes").is_dir()
}

/// One mailbox directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxDir {
    /// Path below `mailboxes/` as on disk (`Archive/2023`, `Entw&APw-rfe`).
    pub dir: String,
    /// The name users see (`/`-separated, UTF-8).
    pub name: String,
    /// The `dbox-Mails` directory.
    pub index_dir: PathBuf,
}

/// Every mailbox under `root/mailboxes`, sorted by on-disk path.
pub fn list_mailboxes(root: &Path) -> io::Result<Vec<MailboxDir>> {
    let mut out = Vec::new();
    walk(&root.join("mailboxes"), "", &mut out)?;
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(out)
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<MailboxDir>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name == DBOX_MAILS {
            continue;
        }
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let path = entry.path();
        if path.join(DBOX_MAILS).is_dir() {
            out.push(MailboxDir {
                name: decode_mutf7(&child),
                index_dir: path.join(DBOX_MAILS),
                dir: child.clone(),
            });
        }
        match walk(&path, &child, out) {
            // Renamed or deleted while the tree was listed: not an error of the tree. Its
            // mailboxes are read as gone (left alone), and the next listing finds them.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

/// The `m.N` files in `storage/`, as (N, path), sorted by N.
pub fn list_files(root: &Path) -> io::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root.join("storage"))? {
        let entry = entry?;
        let name = entry.file_name();
        let id = name
            .to_str()
            .and_then(|n| n.strip_prefix("m."))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(id) = id {
            out.push((id, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Path of `m.<file_id>`.
pub fn file_path(root: &Path, file_id: u32) -> PathBuf {
    root.join("storage").join(format!("m.{file_id}"))
}
