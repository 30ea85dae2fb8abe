//! `mdsync backup` of `LAYOUT=fs` trees (nested `A/B/` folders, INBOX at the root) built by
//! Dovecot itself, compared through the oracle with `maildir:ROOT:LAYOUT=fs`: full and
//! incremental backups, explicit `--layout fs`, and layout auto-detection of trees whose
//! only folders are nested below hierarchy-only parents.

mod support;

use std::path::{Path, PathBuf};

use support::tree::{assert_same_lines, assert_same_snapshot, backup_ok, snapshot};
use support::{Dovecot, Layout, message};

/// An fs-layout tree with top-level and nested mailboxes (one below a hierarchy-only
/// parent), keywords, flags, an expunge gap and subscriptions.
fn build_fs_tree(dc: &Dovecot, name: &str) -> PathBuf {
    let root = dc.maildir(name);
    let fs_args = |args: &[&str]| {
        dc.doveadm_fs(&root, args);
    };
    for mailbox in ["Work", "Work/Project/Specs", "Archive/2023", "Entwürfe"] {
        fs_args(&["mailbox", "create", "-s", mailbox]);
    }
    for (mailbox, count) in [
        ("INBOX", 4),
        ("Work", 2),
        ("Work/Project/Specs", 3),
        ("Archive/2023", 2),
        ("Entwürfe", 1),
    ] {
        for n in 0..count {
            let id = format!("{}-{n}", mailbox.replace('/', "-"));
            dc.save_in(&root, Layout::Fs, mailbox, &message(&id, mailbox, n + 1));
        }
    }
    fs_args(&[
        "flags",
        "add",
        "\\Seen $Junk",
        "mailbox",
        "INBOX",
        "uid",
        "1:2",
    ]);
    fs_args(&["flags", "add", "NonJunk", "mailbox", "INBOX", "uid", "3"]);
    fs_args(&[
        "flags",
        "add",
        "$label1 \\Flagged",
        "mailbox",
        "Work/Project/Specs",
        "uid",
        "2",
    ]);
    fs_args(&[
        "flags",
        "add",
        "\\Seen",
        "mailbox",
        "Archive/2023",
        "uid",
        "1:*",
    ]);
    fs_args(&["expunge", "mailbox", "INBOX", "uid", "4"]);
    fs_args(&["mailbox", "subscribe", "INBOX"]);
    assert!(
        root.join("Work/Project/Specs/cur").is_dir(),
        "fs layout on disk"
    );
    assert!(
        !root.join("Work/Project/cur").exists(),
        "hierarchy-only parent"
    );
    root
}

fn assert_same_fs_oracle(dc: &Dovecot, src: &Path, dst: &Path, when: &str) {
    let want = dc.oracle_in(src, Layout::Fs);
    assert!(want.contains("list Work/Project/Specs\n"), "{want}");
    assert_same_lines(&dc.oracle_in(dst, Layout::Fs), &want, when);
}

#[test]
fn fs_layout_tree_is_mirrored() {
    let dc = Dovecot::new();
    let src = build_fs_tree(&dc, "src");
    let dst = dc.path().join("dst");
    let run = backup_ok(&src, &dst, &[]);
    assert_eq!(run.count("messages_copied"), 11, "{}", run.describe());
    assert!(
        dst.join("Work/Project/Specs/cur").is_dir(),
        "nested dirs on DST"
    );
    assert!(!dst.join(".Work").exists(), "no Maildir++ dirs on DST");
    assert_same_fs_oracle(&dc, &src, &dst, "after the first backup");

    let before = snapshot(&dst);
    backup_ok(&src, &dst, &[]).assert_no_work();
    assert_same_snapshot(&before, &snapshot(&dst), "no-change run wrote on DST");

    // Incremental, through Dovecot.
    dc.doveadm_fs(
        &src,
        &["flags", "remove", "$Junk", "mailbox", "INBOX", "uid", "1"],
    );
    dc.doveadm_fs(
        &src,
        &["expunge", "mailbox", "Work/Project/Specs", "uid", "1"],
    );
    dc.save_in(
        &src,
        Layout::Fs,
        "Archive/2023",
        &message("later", "late", 2),
    );
    dc.doveadm_fs(&src, &["mailbox", "delete", "Entwürfe"]);
    dc.doveadm_fs(&src, &["mailbox", "create", "-s", "Work/New"]);
    let run = backup_ok(&src, &dst, &[]);
    assert_eq!(run.count("messages_copied"), 1, "{}", run.describe());
    assert_eq!(run.count("flag_changes"), 1, "{}", run.describe());
    assert_same_fs_oracle(&dc, &src, &dst, "after incremental changes");
}

/// An fs tree whose only folders sit below a hierarchy-only parent (`Archive/` has no
/// `cur/`): INBOX plus `Archive/2023` and `Archive/2024`.
fn build_nested_only_tree(dc: &Dovecot) -> PathBuf {
    let root = dc.maildir("nested");
    for mailbox in ["Archive/2023", "Archive/2024"] {
        dc.doveadm_fs(&root, &["mailbox", "create", "-s", mailbox]);
        dc.save_in(&root, Layout::Fs, mailbox, &message(mailbox, "old mail", 2));
    }
    dc.save_in(&root, Layout::Fs, "INBOX", &message("inbox", "new mail", 2));
    assert!(!root.join("Archive/cur").exists(), "hierarchy-only parent");
    root
}

#[test]
fn nested_only_fs_tree_is_mirrored_with_explicit_layout() {
    let dc = Dovecot::new();
    let src = build_nested_only_tree(&dc);
    let dst = dc.path().join("dst");
    let run = backup_ok(&src, &dst, &["--layout", "fs"]);
    assert_eq!(run.count("messages_copied"), 3, "{}", run.describe());
    let want = dc.oracle_in(&src, Layout::Fs);
    assert_same_lines(
        &dc.oracle_in(&dst, Layout::Fs),
        &want,
        "Dovecot's view of DST",
    );
    backup_ok(&src, &dst, &["--layout", "fs"]).assert_no_work();
}

/// Auto-detection must recognise `LAYOUT=fs` when the only folders are nested below a
/// hierarchy-only parent; otherwise the nested mailboxes are silently left out (exit 0).
#[test]
fn nested_only_fs_tree_is_detected_as_fs_layout() {
    let dc = Dovecot::new();
    let src = build_nested_only_tree(&dc);
    let dst = dc.path().join("dst");
    let run = backup_ok(&src, &dst, &[]);
    assert_eq!(
        run.count("messages_copied"),
        3,
        "Archive/2023 and Archive/2024 must be copied: {}",
        run.describe()
    );
    let want = dc.oracle_in(&src, Layout::Fs);
    assert_same_lines(
        &dc.oracle_in(&dst, Layout::Fs),
        &want,
        "Dovecot's view of DST",
    );
    // And a second run over the now-populated DST detects it the same way.
    backup_ok(&src, &dst, &[]).assert_no_work();
}

/// Renaming (or deleting) a mailbox with children must not leave the old hierarchy behind
/// on DST: in `LAYOUT=fs` Dovecot lists every leftover directory as a mailbox.
#[test]
fn fs_layout_rename_with_children_leaves_no_stale_parents() {
    let dc = Dovecot::new();
    let src = build_fs_tree(&dc, "src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    assert_same_fs_oracle(&dc, &src, &dst, "after the first backup");
    dc.doveadm_fs(&src, &["mailbox", "rename", "Work", "Job"]);
    assert!(!src.join("Work").exists(), "Dovecot moved the whole tree");
    backup_ok(&src, &dst, &["--max-delete", "100%"]);
    let stale: Vec<_> = snapshot(&dst)
        .into_keys()
        .filter(|p| p.starts_with("Work"))
        .collect();
    assert!(
        stale.is_empty(),
        "DST keeps the old hierarchy, which Dovecot lists (and fails to open) as mailboxes: \
         {stale:?}"
    );
    let want = dc.oracle_in(&src, Layout::Fs);
    assert!(want.contains("list Job/Project/Specs\n"), "{want}");
    assert_eq!(
        dc.oracle_in(&dst, Layout::Fs),
        want,
        "after renaming Work to Job"
    );
}

/// Deleting `Archive/2023` through Dovecot leaves the empty parent `Archive/`, which
/// Dovecot keeps listing (as a non-selectable mailbox); the mirror must list it too.
#[test]
fn fs_layout_empty_parent_left_by_a_delete_is_mirrored() {
    let dc = Dovecot::new();
    let src = build_fs_tree(&dc, "src");
    dc.doveadm_fs(&src, &["mailbox", "delete", "Archive/2023"]);
    let want = dc.oracle_in(&src, Layout::Fs);
    assert!(
        want.contains("list Archive\n") && !want.contains("list Archive/2023\n"),
        "Dovecot keeps listing the empty parent: {want}"
    );
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    assert_same_lines(
        &dc.oracle_in(&dst, Layout::Fs),
        &want,
        "fresh mirror of a tree with an empty parent",
    );
}

/// Two-way sync on the fs layout: a folder with children renamed through Dovecot on one
/// side is renamed (one `rename()`, children moving along) on the other, mail and all.
#[test]
fn fs_layout_two_way_sync_follows_a_rename_with_children() {
    let dc = Dovecot::new();
    let a = build_fs_tree(&dc, "a");
    let b = dc.path().join("b");
    support::tree::sync_ok(&a, &b, &[]);
    assert_same_fs_oracle(&dc, &a, &b, "after the first sync");
    dc.doveadm_fs(&a, &["mailbox", "rename", "Work", "Job"]);
    dc.save_in(
        &b,
        Layout::Fs,
        "Work/Project/Specs",
        &message("spec-b", "new on b", 2),
    );
    let json = support::tree::sync_ok(&a, &b, &[]);
    assert_eq!(
        json["b"]["messages_copied"], 0,
        "renamed, not copied: {json}"
    );
    assert!(!b.join("Work").exists(), "the old hierarchy is gone from B");
    assert_same_lines(
        &dc.oracle_in(&b, Layout::Fs),
        &dc.oracle_in(&a, Layout::Fs),
        "after renaming Work to Job on A",
    );
    let listed = dc.doveadm_fs(
        &a,
        &[
            "-f",
            "tab",
            "fetch",
            "uid",
            "mailbox",
            "Job/Project/Specs",
            "all",
        ],
    );
    assert_eq!(
        listed.lines().count() - 1,
        4,
        "B's new message reached A's renamed folder:\n{listed}"
    );
    let again = support::tree::sync_ok(&a, &b, &[]);
    assert_eq!(again["in_sync"], true, "{again}");
}
