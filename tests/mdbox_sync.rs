//! End-to-end `mdsync sync --offline A B` with mdbox on one or both sides, changed through
//! doveadm on both, checked against what Dovecot sees on each side (the oracle): the first
//! sync, a merge with new mail on both sides (a UID conflict renumbered on both), flags
//! and expunges, a second sync with nothing to do; and the refusal without `--offline`,
//! which writes nothing on either side; one GUID held twice in a folder; a two-way `watch`
//! with an mdbox side refused without `--offline`.

mod support;

use std::path::Path;

use support::tree::{
    Run, assert_same_lines, assert_same_snapshot, conflict_kinds, run_mdsync, snapshot,
};
use support::{Dovecot, Layout, message};

fn sync(a: &Path, b: &Path, options: &[&str]) -> Run {
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let mut args = vec!["sync", "--json", "--no-progress"];
    args.extend_from_slice(options);
    args.extend([a.as_str(), b.as_str()]);
    run_mdsync(&args)
}

fn sync_ok(a: &Path, b: &Path) -> serde_json::Value {
    let run = sync(a, b, &["--offline"]);
    run.assert_ok();
    run.json()
}

/// Both sides as Dovecot sees them, asserted equal.
fn assert_equal(dovecot: &Dovecot, (a, la): (&Path, Layout), (b, lb): (&Path, Layout)) {
    assert_same_lines(
        &dovecot.oracle_in(b, lb),
        &dovecot.oracle_in(a, la),
        "B vs A as Dovecot sees them",
    );
}

/// `uid guid` of every message in INBOX.
fn inbox(dovecot: &Dovecot, root: &Path, layout: Layout) -> Vec<(u32, String)> {
    let out = dovecot.doveadm_in(
        root,
        layout,
        &["-f", "tab", "fetch", "uid guid", "mailbox", "INBOX"],
    );
    out.lines()
        .skip(1)
        .map(|l| {
            let (uid, guid) = l.split_once('\t').unwrap();
            (uid.parse().unwrap(), guid.to_string())
        })
        .collect()
}

/// Changes on both sides: new INBOX mail on each (the same next UID, so a conflict), a
/// flag set on one side and another cleared on the other, an expunge on B.
fn change_both(dovecot: &Dovecot, (a, la): (&Path, Layout), (b, lb): (&Path, Layout)) {
    dovecot.save_in(a, la, "INBOX", &message("new-a", "new on A", 3));
    dovecot.save_in(b, lb, "INBOX", &message("new-b", "new on B", 3));
    dovecot.doveadm_in(
        a,
        la,
        &["flags", "add", "\\Flagged", "mailbox", "INBOX", "uid", "1"],
    );
    dovecot.doveadm_in(
        b,
        lb,
        &["flags", "remove", "\\Seen", "mailbox", "INBOX", "uid", "1"],
    );
    dovecot.doveadm_in(b, lb, &["expunge", "mailbox", "Archive", "uid", "1"]);
}

/// The scenario for one pair of formats: first sync, changes on both sides, merge, no-op.
fn scenario(dovecot: &Dovecot, a: (&Path, Layout), b: (&Path, Layout)) {
    sync_ok(a.0, b.0);
    assert_equal(dovecot, a, b);
    let before = inbox(dovecot, a.0, a.1);
    change_both(dovecot, a, b);
    let json = sync_ok(a.0, b.0);
    let kinds = conflict_kinds(&json);
    assert!(kinds.contains(&"uid-renumbered"), "{json}");
    assert_equal(dovecot, a, b);
    let after = inbox(dovecot, a.0, a.1);
    assert_eq!(after.len(), before.len() + 2, "both new messages kept");
    let mut guids: Vec<&String> = after.iter().map(|m| &m.1).collect();
    guids.sort();
    guids.dedup();
    assert_eq!(guids.len(), after.len(), "no GUID twice: {after:?}");
    for (root, layout) in [a, b] {
        if layout == Layout::Mdbox {
            dovecot.doveadm_in(root, layout, &["force-resync", "*"]);
        }
    }
    assert_equal(dovecot, a, b);
    let json = sync_ok(a.0, b.0);
    assert_eq!(json["in_sync"], true, "second sync did work: {json}");
}

#[test]
fn mdbox_and_maildir_sync_both_ways() {
    let dovecot = Dovecot::new();
    let a = dovecot.mdbox_sample("a");
    let b = dovecot.path().join("b");
    scenario(&dovecot, (&a, Layout::Mdbox), (&b, Layout::MaildirPlusPlus));
}

#[test]
fn mdbox_and_mdbox_sync_both_ways() {
    let dovecot = Dovecot::new();
    let a = dovecot.mdbox_sample("a");
    let b = dovecot.path().join("b");
    let run = run_mdsync(&[
        "backup",
        "--no-progress",
        "--to-format",
        "mdbox",
        "--offline",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    run.assert_ok();
    scenario(&dovecot, (&a, Layout::Mdbox), (&b, Layout::Mdbox));
}

/// Without `--offline`, a sync with an mdbox side is refused before either side is
/// written, with either side order.
#[test]
fn sync_with_an_mdbox_side_needs_offline() {
    let dovecot = Dovecot::new();
    let mdbox = dovecot.mdbox_sample("a");
    let maildir = dovecot.sample("b");
    let before = (snapshot(&mdbox), snapshot(&maildir));
    for (a, b) in [(&mdbox, &maildir), (&maildir, &mdbox)] {
        let run = sync(a, b, &[]);
        assert_ne!(run.code, Some(0), "{}", run.describe());
        assert!(run.stderr.contains("--offline"), "{}", run.describe());
        assert!(
            run.stderr.contains(mdbox.to_str().unwrap()),
            "{}",
            run.describe()
        );
    }
    assert_same_snapshot(&before.0, &snapshot(&mdbox), "mdbox side untouched");
    assert_same_snapshot(&before.1, &snapshot(&maildir), "Maildir side untouched");
}

/// A two-way `watch` writes both sides: an mdbox side, A or B, without `--offline` is
/// refused before anything is read or written, naming the path.
#[test]
fn watching_an_mdbox_tree_two_way_needs_offline() {
    let dovecot = Dovecot::new();
    let mdbox = dovecot.mdbox_sample("a");
    let b = dovecot.maildir("b");
    let before = snapshot(&mdbox);
    let (a_text, b_text) = (mdbox.to_str().unwrap(), b.to_str().unwrap());
    for args in [
        ["watch", "--two-way", a_text, b_text],
        ["watch", "--two-way", b_text, a_text],
    ] {
        let run = run_mdsync(&args);
        assert_ne!(run.code, Some(0), "{}", run.describe());
        assert!(
            run.stderr.contains(a_text) && run.stderr.contains("--offline"),
            "{}",
            run.describe()
        );
    }
    assert_same_snapshot(&snapshot(&mdbox), &before, "the mdbox tree");
    assert_eq!(std::fs::read_dir(&b).unwrap().count(), 0, "nothing written");
}

/// One GUID under two UIDs in one mailbox (a COPY into the same mdbox folder keeps the
/// GUID): a first sync keeps both on the mdbox side and gives the other side both, and the
/// second sync has nothing to do.
#[test]
fn a_guid_held_twice_in_a_folder_stays_twice() {
    let dovecot = Dovecot::new();
    let a = dovecot.mdbox_sample("a");
    let b = dovecot.path().join("b");
    dovecot.doveadm_in(
        &a,
        Layout::Mdbox,
        &["copy", "INBOX", "mailbox", "INBOX", "uid", "3"],
    );
    let before = inbox(&dovecot, &a, Layout::Mdbox);
    let twice = before.iter().filter(|m| m.1 == before[1].1).count();
    assert_eq!(twice, 2, "doveadm copy kept the GUID: {before:?}");
    let json = sync_ok(&a, &b);
    assert_eq!(json["first_sync"], true, "{json}");
    assert_equal(&dovecot, (&a, Layout::Mdbox), (&b, Layout::MaildirPlusPlus));
    assert_eq!(inbox(&dovecot, &b, Layout::MaildirPlusPlus), before);
    let json = sync_ok(&a, &b);
    assert_eq!(json["in_sync"], true, "second sync did work: {json}");
}
