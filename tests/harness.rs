//! Self-tests of the Dovecot test harness (tests/support) and of the committed sample
//! fixture: real doveadm builds and reads trees. They never run the mdsync engine.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use support::{Dovecot, Layout, copy_tree, message, sample_maildir, vmail_ids};

/// The oracle lines that start with `prefix`.
fn lines_with<'a>(oracle: &'a str, prefix: &str) -> Vec<&'a str> {
    oracle.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// The single `status NAME ...` line of the oracle; panics showing the oracle otherwise.
fn status_of<'a>(oracle: &'a str, mailbox: &str) -> &'a str {
    let prefix = format!("status {mailbox} uidvalidity=");
    let found = lines_with(oracle, &prefix);
    assert_eq!(
        found.len(),
        1,
        "no single status line for {mailbox} in:\n{oracle}"
    );
    found[0]
}

/// `uid -> flags` of the `message` lines of one mailbox.
fn flags_by_uid(oracle: &str, mailbox: &str) -> BTreeMap<u32, String> {
    let prefix = format!("message {mailbox} uid=");
    lines_with(oracle, &prefix)
        .into_iter()
        .map(|line| {
            let rest = &line[prefix.len()..];
            let (uid, rest) = rest.split_once(' ').expect("uid then guid");
            let flags = rest.split_once(" flags=").expect("flags= field").1;
            (uid.parse().expect("numeric uid"), flags.to_owned())
        })
        .collect()
}

/// Every regular file of a tree except Dovecot's index/cache/log files, with its bytes.
fn mail_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    collect_mail_files(root, root, &mut files);
    files
}

fn collect_mail_files(root: &Path, dir: &Path, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
    for entry in fs::read_dir(dir).expect("readable tree") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            collect_mail_files(root, &path, files);
        } else if !is_index_file(&name) {
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            files.insert(rel, fs::read(&path).expect("readable file"));
        }
    }
}

fn is_index_file(name: &str) -> bool {
    ["dovecot.index", "dovecot.list.index", "dovecot.mailbox.log"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// `(uidvalidity, guid)` from the header line of a committed dovecot-uidlist.
fn uidlist_header(path: &Path) -> (String, String) {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header = text.lines().next().expect("uidlist header");
    let field = |tag: char| {
        header
            .split(' ')
            .find_map(|f| f.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} field in {header:?}"))
            .to_owned()
    };
    (field('V'), field('G'))
}

#[test]
fn vmail_user_exists_and_is_not_root() {
    let (uid, gid) = vmail_ids();
    assert_ne!(uid, 0, "vmail must not be uid 0");
    assert_ne!(gid, 0, "vmail must not be gid 0");
}

#[test]
fn oracle_reports_uids_flags_gaps_and_subscriptions() {
    let dc = Dovecot::new();
    let root = dc.maildir("built");
    for n in 1..=4 {
        dc.save(&root, "INBOX", &message(&format!("m{n}"), "hello", 3));
    }
    dc.create_mailbox(&root, "Work/Project");
    dc.save(&root, "Work/Project", &message("w1", "work", 40));
    dc.flags_add(&root, "INBOX", "1", "\\Seen $Junk");
    dc.flags_add(&root, "INBOX", "2", "\\Flagged \\Answered");
    dc.flags_remove(&root, "INBOX", "2", "\\Answered");
    dc.expunge(&root, "INBOX", "3");
    dc.subscribe(&root, "Work/Project");

    let oracle = dc.oracle(&root);
    let inbox = flags_by_uid(&oracle, "INBOX");
    let expected: BTreeMap<u32, String> = [(1, "$Junk \\Seen"), (2, "\\Flagged"), (4, "")]
        .into_iter()
        .map(|(u, f)| (u, f.to_owned()))
        .collect();
    assert_eq!(inbox, expected, "oracle:\n{oracle}");
    assert!(
        status_of(&oracle, "INBOX").ends_with("uidnext=5 messages=3"),
        "{oracle}"
    );
    assert!(
        status_of(&oracle, "Work/Project").ends_with("uidnext=2 messages=1"),
        "{oracle}"
    );
    assert!(oracle.contains("list Work\n"), "parent listed:\n{oracle}");
    assert!(oracle.contains("subscribed Work/Project\n"), "{oracle}");
    assert!(
        !oracle.contains("\\Recent"),
        "\\Recent is session state:\n{oracle}"
    );
    assert!(root.join(".Work.Project/cur").is_dir(), "Maildir++ on disk");
}

#[test]
fn oracle_is_stable_and_leaves_mail_files_alone() {
    let dc = Dovecot::new();
    let root = dc.sample("sample");
    let before = mail_files(&root);
    let first = dc.oracle(&root);
    let second = dc.oracle(&root);
    assert_eq!(first, second, "oracle must not change between reads");
    assert_eq!(before, mail_files(&root), "oracle changed non-index files");
}

#[test]
fn sample_fixture_reads_as_documented() {
    let dc = Dovecot::new();
    let root = dc.sample("sample");
    let oracle = dc.oracle(&root);
    let listed = lines_with(&oracle, "list ");
    assert_eq!(
        listed,
        [
            "list Archive",
            "list Archive/2023",
            "list Entwürfe",
            "list INBOX",
            "list Sent"
        ],
        "{oracle}"
    );
    let subscribed = lines_with(&oracle, "subscribed ");
    assert_eq!(subscribed.len(), 5, "{oracle}");
    let counts = [
        ("INBOX", "uidnext=14 messages=12"),
        ("Sent", "uidnext=6 messages=4"),
        ("Archive", "uidnext=5 messages=4"),
        ("Archive/2023", "uidnext=4 messages=3"),
        ("Entwürfe", "uidnext=3 messages=2"),
    ];
    for (mailbox, tail) in counts {
        assert!(
            status_of(&oracle, mailbox).ends_with(tail),
            "{mailbox}: {oracle}"
        );
    }
    let inbox = flags_by_uid(&oracle, "INBOX");
    assert!(
        !inbox.contains_key(&4),
        "INBOX uid 4 was expunged: {oracle}"
    );
    assert_eq!(inbox[&3], "$label1 \\Flagged \\Seen");
    assert_eq!(inbox[&13], "\\Flagged", "flagged while still in new/");
    assert_eq!(flags_by_uid(&oracle, "Archive")[&4], "\\Deleted \\Seen");
    assert_eq!(flags_by_uid(&oracle, "Entwürfe")[&1], "\\Draft \\Seen");
}

#[test]
fn sample_status_comes_from_committed_uidlists() {
    let dc = Dovecot::new();
    let root = dc.sample("sample");
    let oracle = dc.oracle(&root);
    let folders = [
        ("INBOX", ""),
        ("Sent", ".Sent"),
        ("Archive/2023", ".Archive.2023"),
        ("Entwürfe", ".Entw&APw-rfe"),
    ];
    for (mailbox, dir) in folders {
        let (uidvalidity, guid) =
            uidlist_header(&sample_maildir().join(dir).join("dovecot-uidlist"));
        let expected = format!("status {mailbox} uidvalidity={uidvalidity} guid={guid} ");
        assert!(
            status_of(&oracle, mailbox).starts_with(&expected),
            "{expected}\n{oracle}"
        );
    }
}

#[test]
fn copy_tree_recreates_maildir_dirs_owned_by_vmail() {
    let dc = Dovecot::new();
    let root = dc.sample("sample");
    let (uid, gid) = vmail_ids();
    for dir in ["", ".Sent", ".Archive", ".Archive.2023", ".Entw&APw-rfe"] {
        for sub in ["cur", "new", "tmp"] {
            let path = root.join(dir).join(sub);
            let meta = fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(meta.is_dir(), "{} is a directory", path.display());
            assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{}", path.display());
        }
    }
    assert!(
        !root.join("cur/cur").exists(),
        "no Maildir dirs inside cur/"
    );
    let src_files = mail_files(&sample_maildir());
    assert_eq!(
        src_files,
        mail_files(&root),
        "copy has the same files and bytes"
    );
    let some = src_files.keys().next().expect("fixture has files");
    let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(
        mtime(&sample_maildir().join(some)),
        mtime(&root.join(some)),
        "mtime kept"
    );
}

#[test]
fn copies_of_a_tree_have_equal_oracles() {
    let dc = Dovecot::new();
    let a = dc.sample("a");
    let b = dc.maildir("b");
    copy_tree(&a, &b);
    assert_eq!(dc.oracle(&a), dc.oracle(&b));
    dc.flags_add(&b, "Sent", "1", "\\Flagged");
    assert_ne!(dc.oracle(&a), dc.oracle(&b), "a flag change must show");
}

#[test]
fn fs_layout_trees_build_read_and_copy() {
    let dc = Dovecot::new();
    let root = dc.maildir("fs");
    dc.doveadm_fs(&root, &["mailbox", "create", "Archive/2023"]);
    dc.save_in(
        &root,
        Layout::Fs,
        "Archive/2023",
        &message("fs1", "fs layout", 2),
    );
    dc.save_in(&root, Layout::Fs, "INBOX", &message("fs2", "fs inbox", 2));
    assert!(
        root.join("Archive/2023/new").is_dir(),
        "LAYOUT=fs folder on disk"
    );

    let copy = dc.maildir("fs-copy");
    copy_tree(&root, &copy);
    assert!(
        !copy.join("Archive/cur").exists(),
        "hierarchy-only parent stays no mailbox"
    );
    let oracle = dc.oracle_in(&root, Layout::Fs);
    assert_eq!(oracle, dc.oracle_in(&copy, Layout::Fs));
    assert!(
        status_of(&oracle, "Archive/2023").ends_with("uidnext=2 messages=1"),
        "{oracle}"
    );
    assert!(oracle.contains("list Archive\n"), "{oracle}");
}

#[test]
fn try_doveadm_reports_failure_without_panicking() {
    let dc = Dovecot::new();
    let root = dc.maildir("empty");
    let out = dc.try_doveadm(&root, &["mailbox", "status", "messages", "NoSuchBox"]);
    assert!(!out.status.success(), "status of a missing mailbox fails");
    assert!(String::from_utf8_lossy(&out.stderr).contains("NoSuchBox"));
}

#[test]
#[should_panic(expected = "doveadm -o mail_location=maildir:")]
fn doveadm_panics_with_the_command_on_failure() {
    let dc = Dovecot::new();
    let root = dc.maildir("empty");
    dc.doveadm(&root, &["mailbox", "status", "messages", "NoSuchBox"]);
}

#[test]
fn oracle_of_an_empty_root_lists_only_inbox() {
    let dc = Dovecot::new();
    let root = dc.maildir("empty");
    assert_eq!(dc.oracle(&root), "list INBOX\n");
}
