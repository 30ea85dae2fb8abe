//! The plan: everything one replica must do, as plain data — mailbox creates and deletes,
//! per-mailbox copies, renames, expunges, keyword-map and uidlist edits. Built by the differ,
//! carried out by an applier, printed for `--dry-run` and `-v`. Does no I/O.

use crate::model::Subdir;
use crate::storage::maildir::keywords::KeywordMap;
use crate::storage::maildir::uidlist::{Header, OwnedRecord};
use crate::table::DirMeta;

/// Copy one message body from the source into the destination mailbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CopyOp {
    /// UID it gets (0: left for Dovecot to number, as on the source).
    pub uid: u32,
    /// Source subdirectory.
    pub src_sub: Subdir,
    /// Source file name.
    pub src_name: String,
    /// Destination subdirectory.
    pub dst_sub: Subdir,
    /// Destination file name.
    pub dst_name: String,
    /// Size in bytes as the source table knows it.
    pub size: u64,
}

/// Rename a destination file: a flag change, or a move from `new/` to `cur/`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RenameOp {
    /// The message's UID (for reports).
    pub uid: u32,
    /// Current subdirectory.
    pub from_sub: Subdir,
    /// Current name.
    pub from_name: String,
    /// New subdirectory.
    pub to_sub: Subdir,
    /// New name.
    pub to_name: String,
}

impl RenameOp {
    /// True when only the subdirectory changes, not the flags (`new/x` → `cur/x:2,`).
    pub fn is_move_only(&self) -> bool {
        let flags = |name: &str| {
            crate::storage::maildir::filename::parse(name)
                .map(|p| p.flags)
                .ok()
        };
        self.from_sub != self.to_sub && flags(&self.from_name) == flags(&self.to_name)
    }
}

/// Remove a destination file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExpungeOp {
    /// The message's UID (0 when unlisted).
    pub uid: u32,
    /// Subdirectory.
    pub sub: Subdir,
    /// File name.
    pub name: String,
}

/// Changes to a destination uidlist, applied to the file as it is under the lock (so a
/// record Dovecot appended meanwhile survives).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UidlistEdit {
    /// Header to write; `next_uid` is a floor (the writer never lowers `N`).
    pub header: Header,
    /// UIDs whose records go.
    pub remove: Vec<u32>,
    /// Records to add or replace (a record with the same UID or base name is replaced).
    pub upsert: Vec<OwnedRecord>,
}

/// What happens to a destination uidlist.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum UidlistChange {
    /// Edit (or create) it.
    Write(UidlistEdit),
    /// Remove it: the source mailbox was never numbered by Dovecot.
    Remove,
}

/// Everything to do in one destination mailbox, in apply order: create, keywords, copies,
/// renames, expunges, uidlist, index reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MailboxPlan {
    /// Directory relative to the root (`""` = INBOX).
    pub dir: String,
    /// User-visible name.
    pub name: String,
    /// Create the mailbox directory (with `cur/ new/ tmp/`) with this mode and owner.
    pub create: Option<DirMeta>,
    /// Put a `maildirfolder` marker in a created directory (Maildir++ subfolders).
    pub maildirfolder: bool,
    /// New keyword map to write before any file uses its letters.
    pub keywords: Option<KeywordMap>,
    /// Bodies to copy.
    pub copies: Vec<CopyOp>,
    /// Files to rename.
    pub renames: Vec<RenameOp>,
    /// Files to remove.
    pub expunges: Vec<ExpungeOp>,
    /// Uidlist change.
    pub uidlist: Option<UidlistChange>,
    /// Remove Dovecot's index files: they remember UIDs the new uidlist contradicts.
    pub reset_index: bool,
}

impl MailboxPlan {
    /// True when nothing is to be done here.
    pub fn is_empty(&self) -> bool {
        self.create.is_none()
            && self.keywords.is_none()
            && self.copies.is_empty()
            && self.renames.is_empty()
            && self.expunges.is_empty()
            && self.uidlist.is_none()
            && !self.reset_index
    }
}

/// Remove a whole destination mailbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeleteMailbox {
    /// Directory relative to the root.
    pub dir: String,
    /// User-visible name.
    pub name: String,
    /// Messages it holds (counted by the delete guard).
    pub messages: u64,
}

/// Rename a whole mailbox directory: the other side of a two-way sync renamed it (same
/// mailbox GUID, new name). Done first, so the mailbox's own plan already names the new
/// directory; its messages are moved, never copied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RenameMailbox {
    /// Directory now, relative to the root.
    pub from_dir: String,
    /// Directory afterwards.
    pub to_dir: String,
    /// User-visible name afterwards.
    pub name: String,
}

/// A source item the run cannot copy, reported and counted in the exit code.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    /// Path relative to the source root, or a mailbox.
    pub path: String,
    /// Why.
    pub why: String,
    /// True when the item changed while the run read it (a folder renamed or deleted
    /// meanwhile): a re-run picks it up, so the run is partial (exit 2), not in error.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub changed: bool,
}

/// The whole plan for one destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// Mailboxes to rename (done first, in order; a two-way sync's only).
    #[serde(default)]
    pub rename_mailboxes: Vec<RenameMailbox>,
    /// Mailboxes to remove (done last).
    pub delete_mailboxes: Vec<DeleteMailbox>,
    /// fs layout: parent-only directories to create (the source lists them as `\NoSelect`).
    pub create_parents: Vec<String>,
    /// fs layout: parent-only directories the source no longer has; removed when empty.
    pub remove_parents: Vec<String>,
    /// Per-mailbox work, sorted by directory (parents before children).
    pub mailboxes: Vec<MailboxPlan>,
    /// New `subscriptions` content; `Some(None)` removes the file.
    pub subscriptions: Option<Option<Vec<u8>>>,
    /// Raise the root `dovecot-uidvalidity` to this value.
    pub uidvalidity_next: Option<u32>,
    /// What cannot be copied (errors).
    pub skipped: Vec<Skipped>,
    /// Oddities that were copied anyway (warnings).
    pub warnings: Vec<Skipped>,
    /// Mode and owner for the root and root-level files (from the source root).
    pub root_meta: DirMeta,
    /// Every destination mailbox, to clear what killed runs left there (not work: a plan
    /// with only this is empty).
    pub sweep: Vec<String>,
}

/// Counts of a plan, for the guard, the progress bar and the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanCounts {
    /// Mailboxes created.
    pub mailboxes_created: u64,
    /// Mailboxes deleted.
    pub mailboxes_deleted: u64,
    /// Mailboxes renamed.
    pub mailboxes_renamed: u64,
    /// Messages copied.
    pub copies: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Renames that change flags.
    pub flag_changes: u64,
    /// Renames that only move between `new/` and `cur/`.
    pub moves: u64,
    /// Messages expunged, including those in deleted mailboxes.
    pub expunges: u64,
}

impl Plan {
    /// Directories the plan writes to, deletes or renames (both names): what a scan cache
    /// must not keep from a scan taken before it was applied.
    pub fn touched_dirs(&self) -> std::collections::HashSet<String> {
        self.mailboxes
            .iter()
            .filter(|m| !m.is_empty())
            .map(|m| m.dir.clone())
            .chain(self.delete_mailboxes.iter().map(|d| d.dir.clone()))
            .chain(
                self.rename_mailboxes
                    .iter()
                    .flat_map(|r| [r.from_dir.clone(), r.to_dir.clone()]),
            )
            .collect()
    }

    /// True when the destination already matches.
    pub fn is_empty(&self) -> bool {
        self.delete_mailboxes.is_empty()
            && self.rename_mailboxes.is_empty()
            && self.create_parents.is_empty()
            && self.remove_parents.is_empty()
            && self.mailboxes.iter().all(MailboxPlan::is_empty)
            && self.subscriptions.is_none()
            && self.uidvalidity_next.is_none()
    }

    /// Adds up the work.
    pub fn counts(&self) -> PlanCounts {
        let mut c = PlanCounts {
            mailboxes_deleted: self.delete_mailboxes.len() as u64,
            mailboxes_renamed: self.rename_mailboxes.len() as u64,
            expunges: self.delete_mailboxes.iter().map(|d| d.messages).sum(),
            ..PlanCounts::default()
        };
        for m in &self.mailboxes {
            c.mailboxes_created += u64::from(m.create.is_some());
            c.copies += m.copies.len() as u64;
            // Saturating: a plan from a peer carries sizes nobody checked.
            c.bytes = m
                .copies
                .iter()
                .fold(c.bytes, |sum, op| sum.saturating_add(op.size));
            for r in &m.renames {
                if r.is_move_only() {
                    c.moves += 1;
                } else {
                    c.flag_changes += 1;
                }
            }
            c.expunges += m.expunges.len() as u64;
        }
        c
    }

    /// One line per operation, as `--dry-run` and `-v` print them.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.rename_mailboxes {
            out.push(rename_mailbox_line(r));
        }
        for m in &self.mailboxes {
            out.extend(mailbox_lines(m));
        }
        for d in &self.delete_mailboxes {
            out.push(format!("delete   {} ({} messages)", d.name, d.messages));
        }
        for p in &self.create_parents {
            out.push(format!("mkdir    {p}"));
        }
        for p in &self.remove_parents {
            out.push(format!("rmdir    {p}"));
        }
        if self.subscriptions.is_some() {
            out.push("subscriptions".to_string());
        }
        out
    }
}

/// The itemized lines of one mailbox plan.
pub fn mailbox_lines(m: &MailboxPlan) -> Vec<String> {
    let mut out = Vec::new();
    if m.create.is_some() {
        out.push(format!("create   {}", m.name));
    }
    if m.keywords.is_some() {
        out.push(format!("keywords {}", m.name));
    }
    for c in &m.copies {
        out.push(copy_line(&m.name, c));
    }
    for r in &m.renames {
        out.push(rename_line(&m.name, r));
    }
    for e in &m.expunges {
        out.push(expunge_line(&m.name, e));
    }
    if m.uidlist.is_some() {
        out.push(format!("uidlist  {}", m.name));
    }
    out
}

/// The itemized line of one mailbox rename.
pub fn rename_mailbox_line(r: &RenameMailbox) -> String {
    format!("rename   {} -> {}", r.from_dir, r.name)
}

/// The itemized line of one copy.
pub fn copy_line(mailbox: &str, c: &CopyOp) -> String {
    format!(
        "copy     {mailbox} {} {}/{}",
        uid_text(c.uid),
        c.dst_sub,
        c.dst_name
    )
}

/// The itemized line of one expunge.
pub fn expunge_line(mailbox: &str, e: &ExpungeOp) -> String {
    format!(
        "expunge  {mailbox} {} {}/{}",
        uid_text(e.uid),
        e.sub,
        e.name
    )
}

/// The itemized line of one rename.
pub fn rename_line(mailbox: &str, r: &RenameOp) -> String {
    let (from, to) = (flags_part(&r.from_name), flags_part(&r.to_name));
    if r.is_move_only() {
        format!(
            "move     {mailbox} {} {} -> {}",
            uid_text(r.uid),
            r.from_sub,
            r.to_sub
        )
    } else {
        format!("flags    {mailbox} {} {from} -> {to}", uid_text(r.uid))
    }
}

fn uid_text(uid: u32) -> String {
    if uid == 0 {
        "uid -".to_string()
    } else {
        format!("uid {uid}")
    }
}

/// The `:2,…` part of a name, or `-` when there is none.
fn flags_part(name: &str) -> &str {
    name.find(':').map_or("-", |i| &name[i + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's plan can claim any sizes: counting them saturates instead of overflowing.
    #[test]
    fn copy_bytes_a_peer_claims_are_counted_without_overflow() {
        let copy = |size| CopyOp {
            uid: 0,
            src_sub: Subdir::Cur,
            src_name: "m".into(),
            dst_sub: Subdir::Cur,
            dst_name: "m".into(),
            size,
        };
        let plan = Plan {
            mailboxes: vec![MailboxPlan {
                copies: vec![copy(1 << 63), copy(1 << 63), copy(7)],
                ..MailboxPlan::default()
            }],
            ..Plan::default()
        };
        let counts = plan.counts();
        assert_eq!((counts.copies, counts.bytes), (3, u64::MAX));
    }
}
