//! End-to-end `mdsync backup` on Maildir++ trees, checked against Dovecot's own view (the
//! oracle) and the files on disk: full and incremental backups, moves, a destination changed
//! behind mdsync's back, keyword letters, dry-run/verbose/JSON output, `--exclude`, the
//! delete guard, message metadata and files delivered by hand.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use support::tree::{
    assert_same_lines, assert_same_snapshot, backup, backup_ok, find_by_base, inode_of, mail_files,
    read_uidlist, snapshot, uidnexts, without_uidnext,
};
use support::{Dovecot, message, vmail_ids};

/// Base name (message GUID) of `uid` in the mailbox directory `dir` of `root`, from its
/// uidlist.
fn base_of_uid(root: &Path, dir: &str, uid: u32) -> String {
    let list = read_uidlist(&root.join(dir))
        .unwrap_or_else(|| panic!("no uidlist in {}/{dir}", root.display()));
    list.records
        .iter()
        .find(|(u, _)| *u == uid)
        .map(|(_, b)| b.clone())
        .unwrap_or_else(|| panic!("uid {uid} not in {}/{dir}: {list:?}", root.display()))
}

/// `(mailbox dir, base)` of every message file under `root`.
fn message_keys(root: &Path) -> BTreeSet<(String, String)> {
    mail_files(root)
        .iter()
        .map(|f| (f.mailbox.display().to_string(), f.base().to_owned()))
        .collect()
}

/// Total size of the message files of `root` whose `(mailbox dir, base)` is not in `old`.
fn bytes_of_new_messages(root: &Path, old: &BTreeSet<(String, String)>) -> (u64, usize) {
    let new: Vec<u64> = mail_files(root)
        .iter()
        .filter(|f| !old.contains(&(f.mailbox.display().to_string(), f.base().to_owned())))
        .map(|f| fs::metadata(&f.path).unwrap().len())
        .collect();
    (new.iter().sum(), new.len())
}

/// Relative path -> bytes of every message file.
fn message_contents(root: &Path) -> BTreeMap<String, Vec<u8>> {
    mail_files(root)
        .into_iter()
        .map(|f| {
            let rel = f.path.strip_prefix(root).unwrap().display().to_string();
            (rel, fs::read(&f.path).unwrap())
        })
        .collect()
}

/// The plan/itemize lines that describe single operations, sorted.
fn op_lines(text: &str) -> Vec<String> {
    let ops = ["create ", "copy ", "flags ", "move ", "expunge ", "delete "];
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| ops.iter().any(|op| l.starts_with(op)))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

fn assert_same_oracle(dc: &Dovecot, src: &Path, dst: &Path, when: &str) {
    let want = dc.oracle(src);
    let got = dc.oracle(dst);
    assert_same_lines(&got, &want, &format!("{when}: Dovecot's view of DST"));
}

#[test]
fn sample_backup_is_exact_and_a_rerun_writes_nothing() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    let src_before = snapshot(&src);
    let first = backup_ok(&src, &dst, &[]);
    assert_eq!(first.count("messages_copied"), 25, "{}", first.describe());
    assert_eq!(first.count("mailboxes_created"), 5, "{}", first.describe());
    assert_same_snapshot(&src_before, &snapshot(&src), "mdsync wrote into SRC");
    assert_eq!(
        message_contents(&dst),
        message_contents(&src),
        "same message files, names and bytes"
    );

    let dst_before = snapshot(&dst);
    let second = backup_ok(&src, &dst, &[]);
    second.assert_no_work();
    assert_same_snapshot(&dst_before, &snapshot(&dst), "a no-change run wrote on DST");

    let want = dc.oracle(&src);
    assert_same_lines(&dc.oracle(&dst), &want, "first open of DST");
    assert_same_lines(&dc.oracle(&dst), &want, "second open of DST");
    dc.doveadm(&dst, &["force-resync", "*"]);
    assert_same_lines(&dc.oracle(&dst), &want, "after force-resync of DST");

    // Dovecot has now written its index files on DST: still nothing to do, nothing written.
    let dst_before = snapshot(&dst);
    backup_ok(&src, &dst, &[]).assert_no_work();
    assert_same_snapshot(
        &dst_before,
        &snapshot(&dst),
        "a no-change run after Dovecot opened DST wrote on DST",
    );
    assert_same_lines(&dc.oracle(&dst), &want, "after Dovecot opened DST");
}

#[test]
fn incremental_changes_made_through_dovecot_are_mirrored() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    dc.oracle(&dst); // DST now has Dovecot index files, as a live mirror would

    // Phase A: flags, keywords, expunges, new mail, new/deleted mailbox, subscriptions.
    let flagged = [
        ("", base_of_uid(&src, "", 1)),
        ("", base_of_uid(&src, "", 3)),
        (".Sent", base_of_uid(&src, ".Sent", 3)),
        (".Sent", base_of_uid(&src, ".Sent", 4)),
    ];
    let old_keys = message_keys(&src);
    dc.flags_add(&src, "INBOX", "1", "\\Flagged $label2");
    dc.flags_remove(&src, "INBOX", "3", "\\Seen $label1");
    dc.flags_add(&src, "Sent", "3", "\\Answered");
    dc.flags_add(&src, "Sent", "4", "$Junk");
    dc.expunge(&src, "INBOX", "2");
    dc.expunge(&src, "Sent", "1");
    dc.save(&src, "INBOX", &message("inc1", "incremental one", 5));
    dc.save(&src, "INBOX", &message("inc2", "incremental two", 300));
    dc.save(&src, "Sent", &message("inc3", "sent later", 7));
    dc.create_mailbox(&src, "Projects/2025");
    dc.save(&src, "Projects/2025", &message("inc4", "project", 2));
    dc.delete_mailbox(&src, "Entwürfe");
    dc.subscribe(&src, "Projects/2025");
    dc.unsubscribe(&src, "Sent");
    let (new_bytes, new_count) = bytes_of_new_messages(&src, &old_keys);
    assert_eq!(new_count, 4, "four messages were saved");
    let inodes: Vec<u64> = flagged
        .iter()
        .map(|(dir, base)| inode_of(&dst, dir, base))
        .collect();

    let run = backup_ok(&src, &dst, &[]);
    assert_same_oracle(&dc, &src, &dst, "after phase A");
    for (field, want) in [
        ("messages_copied", 4),
        ("bytes_copied", new_bytes),
        ("flag_changes", 4),
        ("moves", 0),
        ("expunged", 4), // INBOX uid 2, Sent uid 1, and the 2 messages of Entwürfe
        ("mailboxes_created", 1),
        ("mailboxes_deleted", 1),
    ] {
        assert_eq!(run.count(field), want, "{field}: {}", run.describe());
    }
    for ((dir, base), inode) in flagged.iter().zip(inodes) {
        assert_eq!(
            inode_of(&dst, dir, base),
            inode,
            "a flag change must rename the DST file, not copy it ({dir}/{base})"
        );
    }
    assert!(!dst.join(".Entw&APw-rfe").exists(), "deleted mailbox gone");
    assert_eq!(
        tmp_leftovers(&dst),
        Vec::<PathBuf>::new(),
        "staged bodies, uidlists and expunged files are all gone from tmp/"
    );

    // Phase B: a rename (with a child mailbox).
    dc.oracle(&dst);
    let renamed_bytes: u64 = mail_files(&src)
        .iter()
        .filter(|f| f.mailbox.to_string_lossy().starts_with(".Archive"))
        .map(|f| fs::metadata(&f.path).unwrap().len())
        .sum();
    dc.rename_mailbox(&src, "Archive", "Old");
    assert!(
        src.join(".Old.2023").is_dir(),
        "Dovecot renamed the child too"
    );
    let run = backup_ok(&src, &dst, &[]);
    assert_same_oracle(&dc, &src, &dst, "after a mailbox rename");
    // mdsync matches mailboxes by directory, so a rename may cost a re-copy of the renamed
    // mailboxes (UIDs, UIDVALIDITY and mailbox GUIDs are still carried over, as the oracle
    // shows), but never more than that.
    assert!(
        run.count("bytes_copied") <= renamed_bytes,
        "a rename copied more than the renamed mailboxes hold ({renamed_bytes}): {}",
        run.describe()
    );
    assert!(!dst.join(".Archive").exists() && !dst.join(".Archive.2023").exists());
    backup_ok(&src, &dst, &[]).assert_no_work();
}

#[test]
fn message_moved_from_new_to_cur_is_renamed_on_dst() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    dc.oracle(&dst);
    // INBOX uid 12 and Entwürfe uid 2 sit in new/ without flags. Move them to cur/ as
    // Dovecot does on SELECT: one without flags, one marked \Seen on the way.
    let plain = base_of_uid(&src, "", 12);
    let seen = base_of_uid(&src, ".Entw&APw-rfe", 2);
    let inode_plain = inode_of(&dst, "", &plain);
    let inode_seen = inode_of(&dst, ".Entw&APw-rfe", &seen);
    fs::rename(
        src.join("new").join(&plain),
        src.join("cur").join(format!("{plain}:2,")),
    )
    .unwrap();
    let drafts = src.join(".Entw&APw-rfe");
    fs::rename(
        drafts.join("new").join(&seen),
        drafts.join("cur").join(format!("{seen}:2,S")),
    )
    .unwrap();

    let run = backup_ok(&src, &dst, &[]);
    assert_eq!(run.count("moves"), 1, "{}", run.describe());
    assert_eq!(run.count("flag_changes"), 1, "{}", run.describe());
    assert_eq!(run.count("messages_copied"), 0, "{}", run.describe());
    let moved = dst.join("cur").join(format!("{plain}:2,"));
    assert!(moved.is_file(), "{} exists", moved.display());
    assert!(!dst.join("new").join(&plain).exists());
    assert_eq!(
        fs::metadata(&moved).unwrap().ino(),
        inode_plain,
        "same inode"
    );
    let moved = dst.join(".Entw&APw-rfe/cur").join(format!("{seen}:2,S"));
    assert_eq!(
        fs::metadata(&moved).unwrap().ino(),
        inode_seen,
        "same inode"
    );
    assert_same_oracle(&dc, &src, &dst, "after new/ -> cur/ moves");
}

#[test]
fn destination_changed_independently_is_brought_back() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    dc.save(&dst, "INBOX", &message("stray1", "only on dst", 3));
    dc.save(&dst, "Sent", &message("stray2", "only on dst", 3));
    dc.flags_add(&dst, "INBOX", "1", "\\Flagged $label2");
    dc.flags_add(&dst, "INBOX", "12", "\\Seen"); // still in new/
    dc.flags_remove(&dst, "Archive", "4", "\\Deleted");
    dc.flags_add(&dst, "Archive/2023", "1", "NewKeyword");

    let run = backup_ok(&src, &dst, &["--max-delete", "100%"]);
    assert_eq!(run.count("expunged"), 2, "{}", run.describe());
    assert_eq!(run.count("flag_changes"), 4, "{}", run.describe());
    assert_eq!(run.count("messages_copied"), 0, "{}", run.describe());
    // mdsync never lowers a uidlist's next UID: the UIDs Dovecot gave the stray messages on
    // DST must never be handed out again there. So uidnext may be higher on DST; everything
    // else must be equal.
    let (want, got) = (dc.oracle(&src), dc.oracle(&dst));
    assert_same_lines(
        &without_uidnext(&got),
        &without_uidnext(&want),
        "DST vs SRC",
    );
    let (want_next, got_next) = (uidnexts(&want), uidnexts(&got));
    for (mailbox, next) in &want_next {
        assert!(got_next[mailbox] >= *next, "{mailbox}: {got}\nvs\n{want}");
    }
    assert_eq!(
        got_next["INBOX"], 15,
        "the stray message's UID 14 stays used"
    );

    let before = snapshot(&dst);
    backup_ok(&src, &dst, &[]).assert_no_work();
    assert_same_snapshot(&before, &snapshot(&dst), "re-run wrote on DST");

    // SRC now hands out UID 14, which DST had given to its stray message: the mirror must
    // still show SRC's message under UID 14.
    dc.save(&src, "INBOX", &message("late", "src uid 14", 4));
    let run = backup_ok(&src, &dst, &[]);
    assert_eq!(run.count("messages_copied"), 1, "{}", run.describe());
    let (want, got) = (dc.oracle(&src), dc.oracle(&dst));
    assert_same_lines(
        &without_uidnext(&got),
        &without_uidnext(&want),
        "after SRC reused DST's stray UID",
    );
}

/// Swaps keyword letters `a` and `b` in the flags part of a Maildir file name, keeping
/// Dovecot's letter order.
fn swap_ab(name: &str) -> String {
    let Some((base, flags)) = name.split_once(":2,") else {
        return name.to_owned();
    };
    let mut letters: Vec<char> = flags
        .chars()
        .map(|c| match c {
            'a' => 'b',
            'b' => 'a',
            c => c,
        })
        .collect();
    letters.sort_unstable();
    format!("{base}:2,{}", letters.into_iter().collect::<String>())
}

#[test]
fn keyword_letters_are_translated_to_the_destination_map() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    // Re-letter DST's INBOX consistently ($Junk a<->b $label1), as a replica whose Dovecot
    // assigned keywords in another order would have it.
    assert_eq!(
        fs::read_to_string(dst.join("dovecot-keywords")).unwrap(),
        "0 $Junk\n1 $label1\n2 NonJunk\n"
    );
    fs::write(
        dst.join("dovecot-keywords"),
        "0 $label1\n1 $Junk\n2 NonJunk\n",
    )
    .unwrap();
    for f in mail_files(&dst)
        .iter()
        .filter(|f| f.mailbox.as_os_str().is_empty())
    {
        let to = f.path.with_file_name(swap_ab(&f.name));
        fs::rename(&f.path, to).unwrap();
    }
    assert_same_oracle(&dc, &src, &dst, "re-lettered DST");
    let run = backup_ok(&src, &dst, &[]);
    run.assert_no_work();

    let junk_uid7 = base_of_uid(&src, "", 7);
    dc.flags_add(&src, "INBOX", "7", "$Junk");
    dc.flags_add(&src, "INBOX", "8", "$label1 $label3");
    dc.flags_remove(&src, "INBOX", "5", "$Junk");
    let run = backup_ok(&src, &dst, &[]);
    assert_eq!(run.count("flag_changes"), 3, "{}", run.describe());
    assert_same_oracle(&dc, &src, &dst, "after keyword changes");
    let name = find_by_base(&dst, "", &junk_uid7).unwrap();
    assert!(
        name.to_string_lossy().ends_with(":2,b"),
        "$Junk is letter b on DST: {}",
        name.display()
    );
}

#[test]
fn keywords_of_an_independently_made_destination_mailbox_are_remapped() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.maildir("dst");
    // DST made by Dovecot itself, keywords created in another order (and one extra).
    dc.save(&dst, "INBOX", &message("d1", "dst only", 2));
    for keyword in ["Extra", "NonJunk", "$label1", "$Junk"] {
        dc.flags_add(&dst, "INBOX", "1", keyword);
    }
    dc.create_mailbox(&dst, "Archive");
    dc.save(&dst, "Archive", &message("d2", "dst only", 2));
    for keyword in ["NonJunk", "$Junk", "$label1"] {
        dc.flags_add(&dst, "Archive", "1", keyword);
    }
    assert!(
        fs::read_to_string(dst.join("dovecot-keywords"))
            .unwrap()
            .starts_with("0 Extra\n1 NonJunk\n"),
        "Dovecot assigned letters in save order"
    );

    backup_ok(&src, &dst, &["--max-delete", "100%"]);
    assert_same_oracle(&dc, &src, &dst, "DST with foreign keyword letters");
    backup_ok(&src, &dst, &[]).assert_no_work();
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");

    // Into a missing destination: nothing is created.
    let run = backup(&src, &dst, &["--dry-run"]);
    run.assert_ok();
    assert!(!dst.exists(), "dry run created {}", dst.display());
    assert!(
        run.stdout.lines().any(|l| l.starts_with("create   Sent")),
        "{}",
        run.describe()
    );
    assert_eq!(
        run.stdout
            .lines()
            .filter(|l| l.starts_with("copy "))
            .count(),
        25,
        "{}",
        run.describe()
    );

    backup_ok(&src, &dst, &[]);
    dc.oracle(&dst);
    dc.flags_add(&src, "INBOX", "1", "\\Flagged");
    dc.expunge(&src, "Sent", "2");
    dc.save(&src, "INBOX", &message("dry", "dry run", 2));
    dc.create_mailbox(&src, "Fresh");
    dc.delete_mailbox(&src, "Entwürfe");
    let new_base = base_of_uid(&src, "", 14);

    let before = snapshot(&dst);
    let run = backup(&src, &dst, &["--dry-run"]);
    run.assert_ok();
    assert_same_snapshot(&before, &snapshot(&dst), "--dry-run touched DST");
    let plan = op_lines(&run.stdout);
    let expected_prefixes = [
        format!("copy     INBOX uid 14 new/{new_base}"),
        "flags    INBOX uid 1 2,S -> 2,FS".to_owned(),
        "expunge  Sent uid 2 cur/".to_owned(),
        "create   Fresh".to_owned(),
        "delete   Entwürfe (2 messages)".to_owned(),
    ];
    for prefix in &expected_prefixes {
        assert!(
            plan.iter().any(|l| l.starts_with(prefix.as_str())),
            "no plan line starting with {prefix:?}: {}",
            run.describe()
        );
    }
    assert_eq!(plan.len(), 5, "one line per operation: {}", run.describe());

    let run = backup(&src, &dst, &["--dry-run", "--json"]);
    run.assert_ok();
    assert_same_snapshot(&before, &snapshot(&dst), "--dry-run --json touched DST");
    let json = run.json();
    assert_eq!(json["dry_run"], serde_json::json!(true), "{json}");
    for (field, want) in [
        ("messages_copied", 1),
        ("flag_changes", 1),
        ("expunged", 3),
        ("mailboxes_created", 1),
        ("mailboxes_deleted", 1),
    ] {
        assert_eq!(run.count(field), want, "{field}: {json}");
    }
    let json_plan: Vec<String> = json["plan"]
        .as_array()
        .expect("plan array in a dry run's JSON")
        .iter()
        .map(|l| l.as_str().expect("plan lines are strings").to_owned())
        .collect();
    assert_eq!(op_lines(&json_plan.join("\n")), plan, "same plan both ways");

    // -v: the real run itemizes exactly the planned operations, one line each.
    let run = backup(&src, &dst, &["-v"]);
    run.assert_ok();
    assert_eq!(op_lines(&run.stdout), plan, "{}", run.describe());
    assert_same_oracle(&dc, &src, &dst, "after the -v run");
}

#[test]
fn json_report_has_the_documented_fields() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    let run = backup_ok(&src, &dst, &["-v"]);
    let json = run.json();
    let object = json.as_object().expect("a JSON object");
    for field in [
        "mailboxes_created",
        "mailboxes_deleted",
        "messages_copied",
        "bytes_copied",
        "flag_changes",
        "moves",
        "expunged",
        "skipped",
    ] {
        assert!(object[field].is_u64(), "{field} is a count: {json}");
    }
    assert!(object["seconds"].is_f64(), "seconds is a number: {json}");
    assert_eq!(object["dry_run"], serde_json::json!(false), "{json}");
    let total: u64 = mail_files(&src)
        .iter()
        .map(|f| fs::metadata(&f.path).unwrap().len())
        .sum();
    assert_eq!(run.count("bytes_copied"), total, "{json}");
    // With --json, stdout holds only the report; -v lines go to stderr.
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.describe());
    assert_eq!(
        run.stderr
            .lines()
            .filter(|l| l.starts_with("copy "))
            .count(),
        25,
        "{}",
        run.describe()
    );
}

#[test]
fn excluded_mailboxes_are_neither_copied_nor_deleted() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    let run = backup_ok(&src, &dst, &["--exclude", "Archive*"]);
    assert_eq!(run.count("messages_copied"), 18, "{}", run.describe());
    assert!(!dst.join(".Archive").exists() && !dst.join(".Archive.2023").exists());

    // A full mirror, then SRC and DST both change inside the excluded mailboxes.
    backup_ok(&src, &dst, &[]);
    dc.oracle(&dst);
    dc.flags_add(&src, "Archive", "1", "\\Flagged");
    dc.delete_mailbox(&src, "Archive/2023");
    dc.flags_add(&src, "INBOX", "1", "\\Flagged");
    dc.create_mailbox(&dst, "Archive/Extra");
    dc.save(&dst, "Archive/Extra", &message("keep", "dst only", 2));
    let archive_before = snapshot(&dst.join(".Archive"));
    let archive_2023_before = snapshot(&dst.join(".Archive.2023"));
    let extra_before = snapshot(&dst.join(".Archive.Extra"));

    let run = backup_ok(&src, &dst, &["--exclude", "Archive*"]);
    assert_eq!(run.count("mailboxes_deleted"), 0, "{}", run.describe());
    assert_eq!(
        run.count("flag_changes"),
        1,
        "only INBOX: {}",
        run.describe()
    );
    assert_same_snapshot(&archive_before, &snapshot(&dst.join(".Archive")), "Archive");
    assert_same_snapshot(
        &archive_2023_before,
        &snapshot(&dst.join(".Archive.2023")),
        "Archive/2023",
    );
    assert_same_snapshot(
        &extra_before,
        &snapshot(&dst.join(".Archive.Extra")),
        "Archive/Extra",
    );
    let (want, got) = (dc.oracle(&src), dc.oracle(&dst));
    for mailbox in ["INBOX", "Sent", "Entwürfe"] {
        assert_eq!(
            support::tree::messages_of(&got, mailbox),
            support::tree::messages_of(&want, mailbox),
            "{mailbox}"
        );
    }
    assert_eq!(support::tree::messages_of(&got, "Archive/Extra").len(), 1);
    assert_eq!(support::tree::messages_of(&got, "Archive/2023").len(), 3);
}

#[test]
fn delete_guard_refuses_to_empty_the_destination() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    dc.oracle(&dst);
    for mailbox in ["Archive/2023", "Archive", "Sent", "Entwürfe"] {
        dc.delete_mailbox(&src, mailbox);
    }
    dc.doveadm(&src, &["expunge", "mailbox", "INBOX", "all"]);
    assert!(mail_files(&src).is_empty(), "SRC is empty");

    let before = snapshot(&dst);
    let run = backup(&src, &dst, &["--json"]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("--max-delete"),
        "the refusal names --max-delete: {}",
        run.describe()
    );
    assert_same_snapshot(&before, &snapshot(&dst), "a refused run changed DST");

    // An unmounted source (an empty directory) is refused the same way.
    let empty = dc.maildir("empty");
    let run = backup(&empty, &dst, &[]);
    run.assert_code(1);
    assert!(run.stderr.contains("--max-delete"), "{}", run.describe());
    assert_same_snapshot(&before, &snapshot(&dst), "a refused run changed DST");

    let run = backup_ok(&src, &dst, &["--max-delete", "100%"]);
    assert_eq!(run.count("expunged"), 25, "{}", run.describe());
    assert_same_oracle(&dc, &src, &dst, "after allowing the deletes");
}

#[test]
fn message_files_keep_mtime_mode_and_owner() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let files = mail_files(&src);
    // Vary the modes a little: Dovecot itself writes 0600, other MDAs 0644 or 0640.
    for (n, f) in files.iter().enumerate() {
        let mode = [0o600, 0o640, 0o644][n % 3];
        fs::set_permissions(&f.path, fs::Permissions::from_mode(mode)).unwrap();
    }
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    let (uid, gid) = vmail_ids();
    for f in &files {
        let rel = f.path.strip_prefix(&src).unwrap();
        let (s, d) = (
            fs::metadata(&f.path).unwrap(),
            fs::metadata(dst.join(rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display())),
        );
        assert_eq!(
            (d.mtime(), d.mtime_nsec()),
            (s.mtime(), s.mtime_nsec()),
            "mtime of {}",
            rel.display()
        );
        assert_eq!(
            d.mode() & 0o7777,
            s.mode() & 0o7777,
            "mode of {}",
            rel.display()
        );
    }
    for (path, stat) in snapshot(&dst) {
        assert_eq!(
            (stat.uid, stat.gid),
            (uid, gid),
            "owner of {}",
            path.display()
        );
    }
    for dir in ["", ".Sent", ".Archive", ".Archive.2023", ".Entw&APw-rfe"] {
        let mode = |root: &Path| fs::metadata(root.join(dir)).unwrap().mode() & 0o7777;
        assert_eq!(mode(&dst), mode(&src), "mode of mailbox dir {dir:?}");
    }
    for mailbox in ["INBOX", "Sent", "Archive", "Archive/2023", "Entwürfe"] {
        let fields = "uid guid date.received";
        assert_eq!(
            dc.fetch(&dst, mailbox, fields),
            dc.fetch(&src, mailbox, fields),
            "{mailbox}: received dates"
        );
    }
}

#[test]
fn a_file_delivered_by_hand_gets_the_same_uid_on_both_sides() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    dc.oracle(&dst);
    let (uid, gid) = vmail_ids();
    let drop = |dir: &Path, stem: &str, info: &str| {
        let body = message(stem, "delivered by hand", 4);
        let lines = body.iter().filter(|&&b| b == b'\n').count();
        let base = format!("{stem},S={},W={}", body.len(), body.len() + lines);
        let sub = if info.is_empty() { "new" } else { "cur" };
        let path = dir.join(sub).join(format!("{base}{info}"));
        fs::write(&path, &body).unwrap();
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        base
    };
    let inbox_base = drop(&src, "1795500000.M1P1.byhand", "");
    let inbox_base2 = drop(&src, "1795500001.M2P2.byhand", "");
    let sent_base = drop(&src.join(".Sent"), "1795500002.M3P3.byhand", ":2,S");

    let run = backup_ok(&src, &dst, &[]);
    assert_eq!(run.count("messages_copied"), 3, "{}", run.describe());
    assert!(find_by_base(&dst, "", &inbox_base).is_some());
    assert!(find_by_base(&dst, "", &inbox_base2).is_some());
    assert!(find_by_base(&dst, ".Sent", &sent_base).is_some());
    // Dovecot numbers the new files when it opens each side: same UIDs on both.
    let want = dc.oracle(&src);
    assert_same_lines(&dc.oracle(&dst), &want, "after Dovecot numbered both sides");
    assert!(
        want.contains(&format!("uid=14 guid={inbox_base} ")),
        "Dovecot gave the hand-delivered file uid 14:\n{want}"
    );
    backup_ok(&src, &dst, &[]).assert_no_work();
}

#[test]
fn copies_and_moves_between_mailboxes_are_mirrored() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    dc.oracle(&dst);
    // Dovecot hardlinks copies and keeps their base names (= GUIDs) in the new mailbox.
    dc.doveadm(&src, &["copy", "Archive", "mailbox", "INBOX", "uid", "1:2"]);
    dc.doveadm(&src, &["move", "Sent", "mailbox", "INBOX", "uid", "3"]);
    let run = backup_ok(&src, &dst, &[]);
    assert_eq!(run.count("messages_copied"), 3, "{}", run.describe());
    assert_eq!(run.count("expunged"), 1, "{}", run.describe());
    assert_same_oracle(&dc, &src, &dst, "after copy and move");
    backup_ok(&src, &dst, &[]).assert_no_work();
}

/// `doveadm fetch 'uid guid text'` of every mailbox: what an IMAP client would download.
fn fetch_texts(dc: &Dovecot, root: &Path) -> Vec<String> {
    ["INBOX", "Sent", "Archive", "Archive/2023", "Entwürfe"]
        .iter()
        .map(|m| dc.doveadm(root, &["fetch", "uid guid text", "mailbox", m, "all"]))
        .collect()
}

#[test]
fn checksum_repairs_a_destination_file_whose_bytes_differ() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    // Bit rot on DST: same name and size, one byte changed.
    let victim = mail_files(&dst)
        .into_iter()
        .find(|f| f.mailbox.as_os_str() == ".Sent")
        .expect("a Sent message");
    let mut bytes = fs::read(&victim.path).unwrap();
    let at = bytes.len() - 3;
    bytes[at] = if bytes[at] == b'X' { b'Y' } else { b'X' };
    fs::write(&victim.path, &bytes).unwrap();
    assert_ne!(
        fetch_texts(&dc, &dst),
        fetch_texts(&dc, &src),
        "rot is visible"
    );

    backup_ok(&src, &dst, &[]).assert_no_work(); // by GUID nothing differs
    let run = backup_ok(&src, &dst, &["--checksum"]);
    assert_eq!(
        run.count("messages_copied"),
        1,
        "--checksum must replace the rotten copy of {}: {}",
        victim.path.display(),
        run.describe()
    );
    assert_same_oracle(&dc, &src, &dst, "after --checksum");
    assert_eq!(fetch_texts(&dc, &dst), fetch_texts(&dc, &src), "same bytes");
    backup_ok(&src, &dst, &["--checksum"]).assert_no_work();
}

/// Number of regular files anywhere under `dir` (0 when it does not exist).
/// Files left in any `tmp/` of a tree.
fn tmp_leftovers(root: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter(|e| {
            e.path()
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n == "tmp")
        })
        .map(|e| e.path().to_path_buf())
        .collect()
}

fn file_count(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    snapshot(dir).values().filter(|s| s.kind == 'f').count()
}

#[test]
fn cached_scans_still_see_later_changes() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    let cache = dc.path().join("cache");
    let cache_arg = cache.to_str().unwrap();
    let with_cache = ["--cache-dir", cache_arg];
    backup_ok(&src, &dst, &with_cache);
    // mdsync does not cache a mailbox whose stamps are under 2 s old; let them age so the
    // next run caches both trees, then change both behind the cache's back.
    std::thread::sleep(std::time::Duration::from_millis(2200));
    backup_ok(&src, &dst, &with_cache).assert_no_work();
    assert!(file_count(&cache) > 0, "no scan cache was written");

    let base = base_of_uid(&src, "", 7);
    let old = find_by_base(&src, "", &base).unwrap();
    fs::rename(&old, src.join("cur").join(format!("{base}:2,FS"))).unwrap();
    dc.flags_add(&dst, "Sent", "1", "\\Answered");
    let run = backup_ok(&src, &dst, &with_cache);
    assert_eq!(run.count("flag_changes"), 2, "{}", run.describe());
    assert_same_oracle(&dc, &src, &dst, "after changes behind the cache");
    let before = snapshot(&dst);
    backup_ok(&src, &dst, &["--no-cache"]).assert_no_work();
    assert_same_snapshot(&before, &snapshot(&dst), "--no-cache disagrees");
}

#[test]
fn mailbox_deleted_and_recreated_under_the_same_name_gets_the_new_identity() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    dc.oracle(&dst);
    let old = dc.oracle(&src);
    dc.delete_mailbox(&src, "Sent");
    dc.create_mailbox(&src, "Sent");
    dc.save(&src, "Sent", &message("again", "recreated", 2));
    dc.flags_add(&src, "Sent", "1", "\\Seen NonJunk");
    let want = dc.oracle(&src);
    let status = |oracle: &str| {
        oracle
            .lines()
            .find(|l| l.starts_with("status Sent "))
            .map(str::to_owned)
    };
    assert_ne!(status(&old), status(&want), "new UIDVALIDITY and GUID");

    let run = backup_ok(&src, &dst, &["--max-delete", "100%"]);
    assert_eq!(run.count("messages_copied"), 1, "{}", run.describe());
    assert_same_lines(&dc.oracle(&dst), &want, "after re-creating Sent");
    backup_ok(&src, &dst, &[]).assert_no_work();
}

#[test]
fn a_folder_renamed_on_the_source_is_renamed_not_copied() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    dc.oracle(&dst);
    let inodes = |root: &Path| -> BTreeMap<String, u64> {
        mail_files(root)
            .iter()
            .filter(|f| f.mailbox.to_string_lossy().starts_with(".Archive"))
            .map(|f| (f.base().to_owned(), fs::metadata(&f.path).unwrap().ino()))
            .collect()
    };
    let before = inodes(&dst);
    assert!(before.len() >= 2, "the sample has mail under Archive");
    // Dovecot renames the folder and its child (.Archive.2023) with their GUIDs.
    dc.rename_mailbox(&src, "Archive", "Old mail");

    // Renames expunge nothing, so even a guard that allows no expunge lets them pass.
    let run = backup_ok(&src, &dst, &["--max-delete", "0"]);
    assert_eq!(run.count("expunged"), 0, "{}", run.describe());
    assert_eq!(run.count("messages_copied"), 0, "{}", run.describe());
    assert_eq!(run.count("mailboxes_deleted"), 0, "{}", run.describe());
    assert!(!dst.join(".Archive").exists() && !dst.join(".Archive.2023").exists());
    let after: BTreeMap<String, u64> = mail_files(&dst)
        .iter()
        .filter(|f| f.mailbox.to_string_lossy().starts_with(".Old mail"))
        .map(|f| (f.base().to_owned(), fs::metadata(&f.path).unwrap().ino()))
        .collect();
    assert_eq!(after, before, "the same files, moved with their folders");
    assert_same_oracle(&dc, &src, &dst, "after the rename");
    let again = backup_ok(&src, &dst, &[]);
    assert_eq!(
        again.count("flag_changes") + again.count("messages_copied"),
        0
    );
}
