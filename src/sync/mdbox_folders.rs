//! Whole-mailbox changes in an mdbox tree, for the mdbox applier: renames (the mailbox's
//! directory under `mailboxes/` moves, as Dovecot's own RENAME does), deletes (the
//! mailbox's directory leaves `mailboxes/` in one rename before it is removed), and the
//! mailbox list index (`dovecot.list.index*`, a cache Dovecot rebuilds), dropped before the
//! set of mailboxes changes. Every step is one `rename()` or can be redone, so a run killed
//! at any instant leaves each mailbox under its old name or its new one, never half-moved.
//! Never touches a mailbox's index or `storage/`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::progress::{Event, Progress};
use crate::storage::maildir::layout::Layout;
use crate::storage::maildir::writer::rename_noreplace;
use crate::storage::mdbox::layout::DBOX_MAILS;
use crate::sync::mdbox_new::{fsync_path, mdbox_dir, mkdir_all};
use crate::sync::plan::{Plan, rename_mailbox_line};

/// Prefix of a deleted mailbox's directory while it is being removed: in the root, beside
/// `mailboxes/`, where Dovecot does not look for mailboxes.
const TRASH_PREFIX: &str = ".mdsync-trash-";

/// Dovecot's mailbox list index files in an mdbox root.
const LIST_INDEX: [&str; 3] = [
    "dovecot.list.index",
    "dovecot.list.index.log",
    "dovecot.list.index.log.2",
];

/// A mailbox's path under `mailboxes/` (modified UTF-7, `/`-separated).
fn boxes_path(root: &Path, layout: Layout, dir: &str) -> Result<PathBuf> {
    Ok(root.join("mailboxes").join(mdbox_dir(layout, dir)?))
}

/// The directory a planned mailbox's index is in before the plan's renames: the mailbox
/// `dir` names after them, followed back through the renames (a swap goes through a parked
/// name). A rename already done (its old directory gone) leaves the new directory.
pub(crate) fn dir_before_renames(root: &Path, layout: Layout, plan: &Plan, dir: &str) -> String {
    let mut current = dir.to_string();
    for r in plan.rename_mailboxes.iter().rev() {
        if r.to_dir == current && !r.from_dir.is_empty() {
            current = r.from_dir.clone();
        }
    }
    let exists = |d: &str| boxes_path(root, layout, d).is_ok_and(|p| p.join(DBOX_MAILS).is_dir());
    if current != dir && !exists(&current) {
        return dir.to_string();
    }
    current
}

/// True when the plan changes which mailboxes exist (so Dovecot's list index is stale).
fn changes_mailbox_set(plan: &Plan) -> bool {
    !plan.rename_mailboxes.is_empty()
        || !plan.delete_mailboxes.is_empty()
        || plan.mailboxes.iter().any(|m| m.create.is_some())
}

/// Removes Dovecot's mailbox list index when the plan changes the set of mailboxes, before
/// any such change: Dovecot rebuilds it from `mailboxes/` on next use, so it can never
/// list a name the run removed or miss one it added (also after a kill).
pub(crate) fn prepare(root: &Path, plan: &Plan) -> Result<()> {
    if !changes_mailbox_set(plan) {
        return Ok(());
    }
    for name in LIST_INDEX {
        let path = root.join(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(Error::io(&path, e)),
            _ => {}
        }
    }
    fsync_path(root)
}

/// Removes what deletes of killed runs left in the root (no Dovecot looks there).
pub(crate) fn sweep_trash(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(TRASH_PREFIX)
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Carries out the plan's mailbox renames, in plan order.
pub(crate) fn rename_mailboxes(
    root: &Path,
    layout: Layout,
    plan: &Plan,
    owner: (u32, u32),
    progress: &dyn Progress,
) -> Result<()> {
    let moves: Vec<(String, String)> = plan
        .rename_mailboxes
        .iter()
        .filter(|r| !r.from_dir.is_empty() && !r.to_dir.is_empty())
        .map(|r| {
            Ok((
                mdbox_dir(layout, &r.from_dir)?,
                mdbox_dir(layout, &r.to_dir)?,
            ))
        })
        .collect::<Result<_>>()?;
    let named = plan
        .rename_mailboxes
        .iter()
        .filter(|r| !r.from_dir.is_empty() && !r.to_dir.is_empty());
    for ((from, to), r) in moves.iter().zip(named) {
        rename_mailbox(&root.join("mailboxes"), from, to, &moves, owner)?;
        progress.event(Event::Applied {
            line: rename_mailbox_line(r),
            bytes: 0,
        });
    }
    Ok(())
}

/// Renames mailbox `from` to `to` (paths below `boxes`). Like Dovecot, the whole directory
/// moves in one rename when nothing is in the way and every mailbox below it is renamed
/// along to the same place below `to` (their own renames then find themselves done);
/// otherwise only the mailbox's own `dbox-Mails` moves, and its emptied directories go.
fn rename_mailbox(
    boxes: &Path,
    from: &str,
    to: &str,
    moves: &[(String, String)],
    owner: (u32, u32),
) -> Result<()> {
    let (from_path, to_path) = (boxes.join(from), boxes.join(to));
    if !from_path.join(DBOX_MAILS).is_dir() {
        if to_path.join(DBOX_MAILS).is_dir() {
            // Done by a killed run, or by the rename of a parent.
            remove_empty_up(boxes, &from_path);
            return Ok(());
        }
        return Err(Error::Usage(format!(
            "{}: cannot rename a mailbox that is not there",
            from_path.display()
        )));
    }
    let parent = to_path.parent().expect("below mailboxes/");
    mkdir_all(parent, boxes, owner)?;
    let whole =
        fs::symlink_metadata(&to_path).is_err() && children_follow(&from_path, from, to, moves);
    if whole {
        rename_noreplace(&from_path, &to_path).map_err(|e| Error::io(&from_path, e))?;
    } else {
        mkdir_all(&to_path, boxes, owner)?;
        let (old, new) = (from_path.join(DBOX_MAILS), to_path.join(DBOX_MAILS));
        rename_noreplace(&old, &new).map_err(|e| Error::io(&old, e))?;
        fsync_path(&to_path)?;
    }
    fsync_path(parent)?;
    fsync_path(from_path.parent().expect("below mailboxes/"))?;
    remove_empty_up(boxes, &from_path);
    Ok(())
}

/// True when every mailbox below `from_path` is renamed to the same place below `to`.
fn children_follow(from_path: &Path, from: &str, to: &str, moves: &[(String, String)]) -> bool {
    let mut children = Vec::new();
    collect_mailboxes(from_path, "", &mut children);
    children.iter().all(|rel| {
        let (old, new) = (format!("{from}/{rel}"), format!("{to}/{rel}"));
        moves.iter().any(|(f, t)| *f == old && *t == new)
    })
}

/// Mailboxes (directories with `dbox-Mails`) strictly below `dir`, relative to it.
fn collect_mailboxes(dir: &Path, rel: &str, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == DBOX_MAILS || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if entry.path().join(DBOX_MAILS).is_dir() {
            out.push(child.clone());
        }
        collect_mailboxes(&entry.path(), &child, out);
    }
}

/// Removes `dir` (when there) and its parents up to (not including) `boxes` while they are
/// empty: Dovecot would list an empty directory under `mailboxes/` as a mailbox.
fn remove_empty_up(boxes: &Path, dir: &Path) {
    let mut current = Some(dir);
    while let Some(d) = current.filter(|d| *d != boxes && d.starts_with(boxes)) {
        match fs::remove_dir(d) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return,
            _ => {}
        }
        current = d.parent();
    }
}

/// Deletes a mailbox: its directory (or, when mailboxes live below it, its `dbox-Mails`)
/// is first renamed out of `mailboxes/` into the root, then removed; a kill in between
/// leaves it where the next run's [`sweep_trash`] removes it.
pub(crate) fn delete_mailbox(root: &Path, dir: &Path) -> Result<()> {
    let boxes = root.join("mailboxes");
    let mut children = Vec::new();
    collect_mailboxes(dir, "", &mut children);
    let only_index = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .all(|e| e.file_name() == DBOX_MAILS);
    let moved = if children.is_empty() && only_index {
        dir.to_path_buf()
    } else {
        dir.join(DBOX_MAILS)
    };
    static DELETED: AtomicU32 = AtomicU32::new(0);
    let trash = root.join(format!(
        "{TRASH_PREFIX}{}-{}",
        std::process::id(),
        DELETED.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&trash);
    fs::rename(&moved, &trash).map_err(|e| Error::io(&moved, e))?;
    fsync_path(root)?;
    remove_empty_up(&boxes, dir);
    fs::remove_dir_all(&trash).map_err(|e| Error::io(&trash, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::plan::RenameMailbox;

    fn mailbox(root: &Path, rel: &str) {
        fs::create_dir_all(root.join("mailboxes").join(rel).join(DBOX_MAILS)).unwrap();
        fs::write(
            root.join("mailboxes")
                .join(rel)
                .join(DBOX_MAILS)
                .join("dovecot.index.log"),
            rel,
        )
        .unwrap();
    }

    /// A temp mdbox root with these mailboxes (their index log holds their name).
    fn tree(mailboxes: &[&str]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        for rel in mailboxes {
            mailbox(tmp.path(), rel);
        }
        tmp
    }

    fn rename(from: &str, to: &str) -> RenameMailbox {
        RenameMailbox {
            from_dir: from.into(),
            to_dir: to.into(),
            name: to.trim_start_matches('.').replace('.', "/"),
        }
    }

    fn index_of(root: &Path, rel: &str) -> Option<String> {
        fs::read_to_string(
            root.join("mailboxes")
                .join(rel)
                .join(DBOX_MAILS)
                .join("dovecot.index.log"),
        )
        .ok()
    }

    fn owner() -> (u32, u32) {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    }

    #[test]
    fn a_parent_renamed_with_its_children_moves_in_one_piece() {
        let tmp = tree(&["A", "A/C"]);
        let root = tmp.path();
        fs::write(root.join("dovecot.list.index.log"), "x").unwrap();
        let plan = Plan {
            rename_mailboxes: vec![rename(".A", ".B"), rename(".A.C", ".B.C")],
            ..Plan::default()
        };
        assert_eq!(
            dir_before_renames(root, Layout::MaildirPlusPlus, &plan, ".B.C"),
            ".A.C"
        );
        prepare(root, &plan).unwrap();
        assert!(!root.join("dovecot.list.index.log").exists());
        let progress = crate::progress::NoProgress;
        rename_mailboxes(root, Layout::MaildirPlusPlus, &plan, owner(), &progress).unwrap();
        assert_eq!(index_of(root, "B").as_deref(), Some("A"));
        assert_eq!(index_of(root, "B/C").as_deref(), Some("A/C"));
        assert!(!root.join("mailboxes/A").exists());
        // Run again (a killed run did it all): nothing changes, no error.
        rename_mailboxes(root, Layout::MaildirPlusPlus, &plan, owner(), &progress).unwrap();
        assert_eq!(index_of(root, "B/C").as_deref(), Some("A/C"));
    }

    #[test]
    fn a_child_left_behind_keeps_its_place() {
        let tmp = tree(&["A", "A/C", "B/X"]);
        let root = tmp.path();
        let plan = Plan {
            rename_mailboxes: vec![rename(".A", ".B")],
            ..Plan::default()
        };
        let progress = crate::progress::NoProgress;
        rename_mailboxes(root, Layout::MaildirPlusPlus, &plan, owner(), &progress).unwrap();
        assert_eq!(index_of(root, "B").as_deref(), Some("A"));
        assert_eq!(index_of(root, "B/X").as_deref(), Some("B/X"));
        assert_eq!(index_of(root, "A/C").as_deref(), Some("A/C"));
        assert!(!root.join("mailboxes/A").join(DBOX_MAILS).exists());
    }

    #[test]
    fn a_swap_goes_through_a_parked_name() {
        let tmp = tree(&["A", "B"]);
        let root = tmp.path();
        let plan = Plan {
            rename_mailboxes: crate::sync::merge::order_renames(vec![
                rename(".A", ".B"),
                rename(".B", ".A"),
            ]),
            ..Plan::default()
        };
        let layout = Layout::MaildirPlusPlus;
        assert_eq!(dir_before_renames(root, layout, &plan, ".A"), ".B");
        assert_eq!(dir_before_renames(root, layout, &plan, ".B"), ".A");
        let progress = crate::progress::NoProgress;
        rename_mailboxes(root, layout, &plan, owner(), &progress).unwrap();
        assert_eq!(index_of(root, "A").as_deref(), Some("B"));
        assert_eq!(index_of(root, "B").as_deref(), Some("A"));
        let left: Vec<_> = fs::read_dir(root.join("mailboxes")).unwrap().collect();
        assert_eq!(left.len(), 2, "no parked directory left");
    }

    #[test]
    fn a_delete_leaves_no_directory_dovecot_would_list() {
        let tmp = tree(&["P/Q", "S", "S/T"]);
        let root = tmp.path();
        delete_mailbox(root, &root.join("mailboxes/P/Q")).unwrap();
        assert!(!root.join("mailboxes/P").exists());
        delete_mailbox(root, &root.join("mailboxes/S")).unwrap();
        assert!(!root.join("mailboxes/S").join(DBOX_MAILS).exists());
        assert_eq!(index_of(root, "S/T").as_deref(), Some("S/T"));
        // A kill after the move into the root: the next run's sweep removes it.
        fs::create_dir(root.join(format!("{TRASH_PREFIX}1-2"))).unwrap();
        sweep_trash(root);
        let names: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["mailboxes".to_string()]);
    }
}
