//! Bad input for `mdsync backup`: a corrupt uidlist, symlinks out of the tree, `,S=` sizes
//! that lie or do not parse, overlapping or missing roots. Each must give a non-zero exit,
//! a stderr line naming the offending path, no panic, and no damage: the other mailboxes
//! are still mirrored and the destination's copy of the affected mailbox is left as it was.

mod support;

use std::fs;
use std::os::unix::fs::{chown, symlink};
use std::path::{Path, PathBuf};

use support::tree::{
    assert_same_lines, assert_same_snapshot, backup, backup_ok, mail_files, messages_of, snapshot,
};
use support::{Dovecot, copy_tree, message, vmail_ids};

/// Writes a message file by hand (owned by vmail) and returns its path.
fn drop_file(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, body).unwrap();
    let (uid, gid) = vmail_ids();
    chown(&path, Some(uid), Some(gid)).unwrap();
    path
}

/// Asserts that every mailbox of the sample shows the same messages on DST as in `want`,
/// except `affected`: left out when `subset` is false, else DST must show at least every
/// message `want` has there.
fn assert_mailboxes_mirrored(oracle_dst: &str, want: &str, affected: &str, subset: bool) {
    for mailbox in ["INBOX", "Sent", "Archive", "Archive/2023", "Entwürfe"] {
        let (got, want) = (messages_of(oracle_dst, mailbox), messages_of(want, mailbox));
        if mailbox != affected {
            assert_eq!(got, want, "{mailbox} must still be mirrored");
        } else if subset {
            let missing: Vec<_> = want.iter().filter(|l| !got.contains(l)).collect();
            assert!(missing.is_empty(), "{mailbox} lacks {missing:?}");
        }
    }
}

#[test]
fn corrupt_uidlist_leaves_that_mailbox_alone_and_syncs_the_rest() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    dc.flags_add(&src, "INBOX", "1", "\\Flagged");
    dc.flags_add(&src, "Sent", "1", "\\Flagged");
    dc.save(&src, "Sent", &message("s", "not copied", 2));
    let want = dc.oracle(&src);
    let uidlist = src.join(".Sent/dovecot-uidlist");
    let mut text = fs::read_to_string(&uidlist).unwrap();
    text.push_str("3 :1795396999.M1P1.duplicate,S=1,W=1\n"); // UID 3 twice
    fs::write(&uidlist, text).unwrap();
    let sent_before = snapshot(&dst.join(".Sent"));

    let run = backup(&src, &dst, &["--json"]);
    run.assert_no_panic();
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert_eq!(run.json()["completion"], "errors", "{}", run.describe());
    assert!(
        run.stderr.contains(&uidlist.display().to_string()),
        "stderr names {}: {}",
        uidlist.display(),
        run.describe()
    );
    assert_same_snapshot(&sent_before, &snapshot(&dst.join(".Sent")), "DST Sent");
    let got = dc.oracle(&dst);
    assert_mailboxes_mirrored(&got, &want, "Sent", false);
    assert!(
        got.contains(&messages_of(&want, "INBOX")[0].to_string()),
        "the INBOX flag change reached DST"
    );
}

#[test]
fn symlinks_in_the_source_are_not_followed() {
    let dc = Dovecot::new();
    let pristine = dc.sample("pristine");
    let src = dc.maildir("src");
    copy_tree(&pristine, &src);
    let secret = b"Subject: secret\n\nTOP-SECRET-BYTES-OUTSIDE-THE-TREE\n";
    let outside = dc.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let target = drop_file(&outside, "secret.eml", secret);
    let link_name = format!("1795500000.M9P9.evil,S={}:2,S", secret.len());
    let link = src.join("cur").join(&link_name);
    symlink(&target, &link).unwrap();
    // A whole mailbox that is a symlink to a Maildir outside the tree.
    let foreign = dc.maildir("foreign");
    copy_tree(&pristine.join(".Sent"), &foreign);
    symlink(&foreign, src.join(".Evil")).unwrap();

    let dst = dc.path().join("dst");
    let run = backup(&src, &dst, &["--json"]);
    run.assert_no_panic();
    assert_ne!(run.code, Some(0), "{}", run.describe());
    assert!(
        run.stderr.contains(&link.display().to_string()),
        "stderr names {}: {}",
        link.display(),
        run.describe()
    );
    assert!(
        run.stderr
            .contains(&src.join(".Evil").display().to_string()),
        "stderr names the symlinked mailbox: {}",
        run.describe()
    );
    assert!(
        !dst.join(".Evil").exists(),
        "symlinked mailbox not mirrored"
    );
    for f in mail_files(&dst) {
        assert!(!f.name.contains("evil"), "copied {}", f.path.display());
        let bytes = fs::read(&f.path).unwrap();
        assert!(
            !bytes.windows(10).any(|w| w == b"TOP-SECRET"),
            "{} holds the symlink target's bytes",
            f.path.display()
        );
    }
    assert_eq!(
        mail_files(&dst).len(),
        25,
        "the real messages are all there"
    );
    assert_same_lines(&dc.oracle(&dst), &dc.oracle(&pristine), "DST vs the sample");
}

#[test]
fn symlinked_cur_directory_is_not_followed() {
    let dc = Dovecot::new();
    let pristine = dc.sample("pristine");
    let src = dc.maildir("src");
    copy_tree(&pristine, &src);
    let outside = dc.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let secret = b"Subject: secret\n\nTOP-SECRET-BYTES-OUTSIDE-THE-TREE\n";
    drop_file(
        &outside,
        &format!("1795500000.M9P9.outside,S={}:2,S", secret.len()),
        secret,
    );
    let cur = src.join(".Sent/cur");
    fs::remove_dir_all(&cur).unwrap();
    symlink(&outside, &cur).unwrap();

    let dst = dc.path().join("dst");
    let run = backup(&src, &dst, &["--json"]);
    run.assert_no_panic();
    for f in mail_files(&dst) {
        let bytes = fs::read(&f.path).unwrap();
        assert!(
            !bytes.windows(10).any(|w| w == b"TOP-SECRET"),
            "{} holds bytes from outside the tree, read through the symlink {}",
            f.path.display(),
            cur.display()
        );
    }
    assert_ne!(run.code, Some(0), "{}", run.describe());
    assert!(
        run.stderr.contains(&cur.display().to_string()),
        "stderr names {}: {}",
        cur.display(),
        run.describe()
    );
    assert_mailboxes_mirrored(&dc.oracle(&dst), &dc.oracle(&pristine), "Sent", false);
}

#[test]
fn size_field_that_disagrees_with_the_file_is_reported() {
    let dc = Dovecot::new();
    let pristine = dc.sample("pristine");
    let src = dc.maildir("src");
    copy_tree(&pristine, &src);
    let body = message("liar", "wrong S=", 3);
    let name = format!("1795500000.M1P1.liar,S={},W=100100", body.len() + 99_000);
    let liar = drop_file(&src.join("new"), &name, &body);

    let dst = dc.path().join("dst");
    let run = backup(&src, &dst, &["--json"]);
    run.assert_no_panic();
    assert_ne!(
        run.code,
        Some(0),
        "a file whose ,S= is not its size must be reported: {}",
        run.describe()
    );
    assert!(
        run.stderr.contains(&liar.display().to_string()),
        "stderr names {}: {}",
        liar.display(),
        run.describe()
    );
    assert_mailboxes_mirrored(&dc.oracle(&dst), &dc.oracle(&pristine), "INBOX", true);
}

#[test]
fn malformed_size_field_is_reported_and_not_copied() {
    let dc = Dovecot::new();
    let pristine = dc.sample("pristine");
    let src = dc.maildir("src");
    copy_tree(&pristine, &src);
    let bad = drop_file(
        &src.join(".Sent/cur"),
        "1795500001.M2P2.badname,S=x,W=12:2,S",
        &message("bad", "malformed", 1),
    );

    let dst = dc.path().join("dst");
    let run = backup(&src, &dst, &["--json"]);
    run.assert_no_panic();
    assert_ne!(run.code, Some(0), "{}", run.describe());
    assert!(
        run.stderr.contains(&bad.display().to_string()),
        "stderr names {}: {}",
        bad.display(),
        run.describe()
    );
    assert!(
        mail_files(&dst).iter().all(|f| !f.name.contains("badname")),
        "the malformed name was copied"
    );
    assert_mailboxes_mirrored(&dc.oracle(&dst), &dc.oracle(&pristine), "Sent", true);
}

#[test]
fn overlapping_roots_are_refused_and_nothing_is_created() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let link = dc.path().join("link");
    symlink(&src, &link).unwrap();
    let before = snapshot(dc.path());
    let inside = src.join("backup");
    let cases: [(PathBuf, PathBuf); 4] = [
        (src.clone(), inside.clone()),
        (src.clone(), src.clone()),
        (src.clone(), link.join("backup")),
        (src.join(".Sent"), src.clone()),
    ];
    for (from, to) in &cases {
        let run = backup(from, to, &[]);
        run.assert_code(1);
        assert!(
            run.stderr.contains(&to.display().to_string()),
            "stderr names {}: {}",
            to.display(),
            run.describe()
        );
        assert_same_snapshot(&before, &snapshot(dc.path()), "a refused run wrote");
    }
    assert!(!inside.exists());
}

#[test]
fn missing_or_non_directory_roots_are_errors() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let missing = dc.path().join("no-such-root");
    let dst = dc.path().join("dst");
    let run = backup(&missing, &dst, &[]);
    run.assert_code(1);
    assert!(
        run.stderr.contains(&missing.display().to_string()),
        "stderr names {}: {}",
        missing.display(),
        run.describe()
    );
    assert!(!dst.exists(), "nothing created for a missing source");

    let file = dc.path().join("a-file");
    fs::write(&file, "not a maildir").unwrap();
    let run = backup(&file, &dst, &[]);
    run.assert_code(1);
    assert!(
        run.stderr.contains(&file.display().to_string()),
        "{}",
        run.describe()
    );
    assert!(!dst.exists());

    let run = backup(&src, &file, &[]);
    run.assert_code(1);
    assert!(
        run.stderr.contains(&file.display().to_string()),
        "{}",
        run.describe()
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), "not a maildir");
}

#[test]
fn symlinked_control_file_on_the_source_is_refused_not_copied() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    let secret = dc.path().join("secret");
    fs::write(&secret, "TOP-SECRET root-only bytes\n").unwrap();
    fs::remove_file(src.join("subscriptions")).unwrap();
    symlink(&secret, src.join("subscriptions")).unwrap();
    let before = snapshot(&dst);

    let run = backup(&src, &dst, &[]);
    run.assert_no_panic();
    assert_ne!(run.code, Some(0), "{}", run.describe());
    assert!(run.stderr.contains("subscriptions"), "{}", run.describe());
    let copied = fs::read_to_string(dst.join("subscriptions")).unwrap();
    assert!(
        !copied.contains("TOP-SECRET"),
        "the link target leaked into DST"
    );
    assert_same_snapshot(&before, &snapshot(&dst), "DST after a refused run");
}

#[test]
fn source_folder_replaced_by_a_symlink_keeps_its_backup() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    let moved = dc.path().join("archive-elsewhere");
    fs::rename(src.join(".Archive"), &moved).unwrap();
    symlink(&moved, src.join(".Archive")).unwrap();
    let archive_before = snapshot(&dst.join(".Archive"));

    let run = backup(&src, &dst, &["--max-delete", "100%"]);
    run.assert_no_panic();
    assert_ne!(
        run.code,
        Some(0),
        "the symlink is reported: {}",
        run.describe()
    );
    assert!(run.stderr.contains(".Archive"), "{}", run.describe());
    assert_same_snapshot(
        &archive_before,
        &snapshot(&dst.join(".Archive")),
        "DST's Archive",
    );
}

#[test]
fn symlinked_folder_on_the_destination_is_never_written_through() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.maildir("dst");
    let outside = dc.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let (uid, gid) = vmail_ids();
    chown(&outside, Some(uid), Some(gid)).unwrap(); // so the oracle (Dovecot) can follow it
    symlink(&outside, dst.join(".Sent")).unwrap();

    let run = backup(&src, &dst, &[]);
    run.assert_no_panic();
    assert_ne!(run.code, Some(0), "{}", run.describe());
    assert!(run.stderr.contains(".Sent"), "{}", run.describe());
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote through the link"
    );
    let want = dc.oracle(&src);
    assert_mailboxes_mirrored(&dc.oracle(&dst), &want, "Sent", false);
}
