//! End-to-end runs on mdbox trees that Dovecot wrote (testdata/mdbox): `mdsync scan` with
//! its storage health report, and mdbox → Maildir backups checked with Dovecot's own view
//! of both trees (the oracle), before and after `doveadm force-resync`, incremental runs
//! after changes made through doveadm, and the refusal to write into an mdbox tree.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::sshd::{Sshd, remote_wrapper};
use support::tree::{
    Run, assert_same_lines, assert_same_snapshot, backup, backup_ok, run_mdsync, snapshot,
};
use support::{Dovecot, Layout, chown_tree, mdsync, message, vmail_ids};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/mdbox")
        .join(name)
}

/// A copy of fixture `name` at `dest` inside the Dovecot temp dir, owned by vmail.
fn copy_fixture(dovecot: &Dovecot, name: &str, dest: &str) -> PathBuf {
    let to = dovecot.path().join(dest);
    let status = Command::new("cp")
        .arg("-a")
        .arg(fixture(name))
        .arg(&to)
        .status()
        .unwrap();
    assert!(status.success(), "cp -a {name}");
    let (uid, gid) = vmail_ids();
    chown_tree(&to, uid, gid);
    to
}

/// `uid date.received` of every message, per mailbox, as doveadm reports them.
fn received_dates(dovecot: &Dovecot, root: &Path, layout: Layout) -> String {
    let out = dovecot.doveadm_in(
        root,
        layout,
        &["-f", "tab", "fetch", "mailbox uid date.received", "all"],
    );
    let mut lines: Vec<&str> = out.lines().skip(1).collect();
    lines.sort();
    lines.join("\n")
}

/// Changes made through Dovecot: a flag and a keyword set on INBOX 3, `\Seen` cleared on
/// INBOX 1, Archive 2 expunged, a new mailbox `Later` with one message, a new INBOX message.
fn change_through_dovecot(dovecot: &Dovecot, root: &Path, layout: Layout) {
    let da = |args: &[&str]| dovecot.doveadm_in(root, layout, args);
    da(&[
        "flags",
        "add",
        "\\Seen $label2",
        "mailbox",
        "INBOX",
        "uid",
        "3",
    ]);
    da(&["flags", "remove", "\\Seen", "mailbox", "INBOX", "uid", "1"]);
    da(&["expunge", "mailbox", "Archive", "uid", "2"]);
    da(&["mailbox", "create", "Later"]);
    dovecot.save_in(root, layout, "Later", &message("later-1", "Later 1", 3));
    dovecot.save_in(root, layout, "INBOX", &message("inbox-new", "Inbox new", 3));
}

fn scan_json(root: &Path) -> (serde_json::Value, Option<i32>) {
    let out = mdsync()
        .arg("scan")
        .arg("--json")
        .arg(root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "scan --json: {e}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (json, out.status.code())
}

#[test]
fn scan_reports_messages_and_storage_health() {
    let (live, code) = scan_json(&fixture("live"));
    assert_eq!(code, Some(0), "{live}");
    assert_eq!(live["format"], "mdbox");
    assert_eq!(live["messages"], 10);
    let health = &live["health"];
    assert_eq!(health["refcount_zero"], 2, "{health}");
    assert_eq!(health["map_entries"], 11, "{health}");
    assert!(health["wasted_bytes"].as_u64().unwrap() > 0, "{health}");
    let (purged, code) = scan_json(&fixture("purged"));
    assert_eq!(code, Some(0));
    assert_eq!(purged["messages"], 10);
    assert_eq!(purged["health"]["refcount_zero"], 0);
    assert_eq!(
        purged["health"]["referenced_bytes"],
        health["referenced_bytes"]
    );
}

#[test]
fn scan_of_a_damaged_tree_fails_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("live");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(fixture("live"))
            .arg(&root)
            .status()
            .unwrap()
            .success()
    );
    let log = root.join("storage/dovecot.map.index.log");
    let mut data = std::fs::read(&log).unwrap();
    data.extend([0x12, 0x34, 0x56, 0x78, 1, 2, 3, 4, 5, 6, 7, 8]);
    std::fs::write(&log, &data).unwrap();
    let before = snapshot(&root);
    let out = mdsync().arg("scan").arg(&root).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("dovecot.map.index.log"), "{stderr}");
    assert_same_snapshot(&before, &snapshot(&root), "a failed scan writes nothing");
}

/// mdbox → Maildir for every fixture: Dovecot sees the same mailboxes, UIDs, UIDVALIDITYs,
/// GUIDs, flags, keywords and received dates on both sides; a force-resync of the copy
/// changes nothing; a second run has nothing to do.
#[test]
fn mdbox_to_maildir_backup_is_what_dovecot_sees() {
    for (tree, layout, args) in [
        ("live", Layout::MaildirPlusPlus, &[][..]),
        ("purged", Layout::MaildirPlusPlus, &[][..]),
        ("resynced", Layout::Fs, &["--layout", "fs"][..]),
    ] {
        let dovecot = Dovecot::new();
        let src = copy_fixture(&dovecot, tree, "src");
        let dst = dovecot.maildir("dst");
        let mut options = vec!["--no-cache"];
        options.extend_from_slice(args);
        let run = backup_ok(&src, &dst, &options);
        let fetched = std::fs::read_to_string(fixture(&format!("{tree}.fetch"))).unwrap();
        let messages = fetched.lines().count() as u64;
        let copied = run.count("messages_copied");
        assert_eq!(copied, messages, "{tree}: {}", run.describe());
        let want = dovecot.oracle_in(&src, Layout::Mdbox);
        let got = dovecot.oracle_in(&dst, layout);
        assert_same_lines(
            &got,
            &want,
            &format!("{tree}: Maildir copy vs mdbox source"),
        );
        assert_eq!(
            received_dates(&dovecot, &dst, layout),
            received_dates(&dovecot, &src, Layout::Mdbox),
            "{tree}: received dates"
        );
        dovecot.doveadm_in(&dst, layout, &["force-resync", "*"]);
        let resynced = dovecot.oracle_in(&dst, layout);
        assert_same_lines(&resynced, &want, &format!("{tree}: after force-resync"));
        backup_ok(&src, &dst, &options).assert_no_work();
    }
}

/// Changes made through Dovecot on the mdbox source (flags, keywords, expunge, a new
/// message, a new folder) reach the Maildir copy on the next run.
#[test]
fn incremental_backup_follows_changes_made_by_dovecot() {
    let dovecot = Dovecot::new();
    let src = copy_fixture(&dovecot, "live", "src");
    let dst = dovecot.maildir("dst");
    backup_ok(&src, &dst, &[]);
    change_through_dovecot(&dovecot, &src, Layout::Mdbox);
    dovecot.doveadm_in(
        &src,
        Layout::Mdbox,
        &[
            "flags",
            "remove",
            "\\Flagged",
            "mailbox",
            "INBOX",
            "uid",
            "1",
        ],
    );
    dovecot.doveadm_in(&src, Layout::Mdbox, &["purge"]);
    let run = backup_ok(&src, &dst, &[]);
    assert_eq!(run.count("messages_copied"), 2, "{}", run.describe());
    assert_eq!(run.count("expunged"), 1, "{}", run.describe());
    assert_same_lines(
        &dovecot.oracle_in(&dst, Layout::MaildirPlusPlus),
        &dovecot.oracle_in(&src, Layout::Mdbox),
        "after changes made through doveadm",
    );
    backup_ok(&src, &dst, &[]).assert_no_work();
}

#[test]
fn writing_into_an_mdbox_tree_is_refused() {
    let dovecot = Dovecot::new();
    let dst = copy_fixture(&dovecot, "live", "dst");
    let src = dovecot.sample("src");
    let before = snapshot(&dst);
    let run = backup(&src, &dst, &["--no-cache"]);
    assert_ne!(run.code, Some(0), "{}", run.describe());
    assert!(run.stderr.contains("mdbox"), "{}", run.describe());
    assert!(
        run.stderr.contains(&dst.display().to_string()),
        "{}",
        run.describe()
    );
    assert_same_snapshot(&before, &snapshot(&dst), "a refused run writes nothing");
}

/// mdbox → Maildir over ssh: the table goes over the wire, bodies are streamed from the
/// mapped m.N files; the remote copy is what Dovecot sees in the source.
#[test]
fn mdbox_to_a_remote_maildir_over_ssh() {
    let dovecot = Dovecot::new();
    let src = copy_fixture(&dovecot, "live", "src");
    let dst = dovecot.maildir("dst");
    let sshd = Sshd::start();
    let wrapper = remote_wrapper(sshd.dir());
    let target = format!("{}:{}", sshd.host(), dst.display());
    let args = [
        "backup",
        "--json",
        "--no-progress",
        "-e",
        &sshd.rsh(),
        "--remote-mdsync",
        wrapper.to_str().unwrap(),
        src.to_str().unwrap(),
        &target,
    ];
    let run = run_mdsync(&args);
    run.assert_ok();
    assert_eq!(run.count("messages_copied"), 10, "{}", run.describe());
    assert_same_lines(
        &dovecot.oracle_in(&dst, Layout::MaildirPlusPlus),
        &dovecot.oracle_in(&src, Layout::Mdbox),
        "remote Maildir copy vs mdbox source",
    );
    run_mdsync(&args).assert_no_work();
}

/// `--to-format mdbox --offline` into a new destination, from Maildir and from mdbox:
/// Dovecot sees the same mailboxes, UIDs, UIDVALIDITYs, GUIDs, flags, keywords and
/// received dates in the new mdbox tree; `doveadm force-resync` changes nothing; the
/// storage health of the new tree is clean.
#[test]
fn migration_into_a_new_mdbox_is_what_dovecot_sees() {
    let dovecot = Dovecot::new();
    let maildir = dovecot.sample("maildir-src");
    let mdbox = copy_fixture(&dovecot, "live", "mdbox-src");
    for (src, layout) in [(&maildir, Layout::MaildirPlusPlus), (&mdbox, Layout::Mdbox)] {
        let dst = dovecot.path().join(format!(
            "new-{}",
            src.file_name().unwrap().to_str().unwrap()
        ));
        let run = backup_ok(
            src,
            &dst,
            &["--no-cache", "--to-format", "mdbox", "--offline"],
        );
        assert!(run.count("messages_copied") > 0, "{}", run.describe());
        let want = dovecot.oracle_in(src, layout);
        assert_same_lines(
            &dovecot.oracle_in(&dst, Layout::Mdbox),
            &want,
            "new mdbox vs source",
        );
        assert_eq!(
            received_dates(&dovecot, &dst, Layout::Mdbox),
            received_dates(&dovecot, src, layout),
            "received dates"
        );
        assert_healthy_and_resync_proof(&dovecot, &dst, &want, "new mdbox");
    }
}

/// The mdbox tree `root` has a clean storage health (refcounts agree with the mailboxes),
/// and `doveadm force-resync` leaves Dovecot's view of it at `want`.
fn assert_healthy_and_resync_proof(dovecot: &Dovecot, root: &Path, want: &str, what: &str) {
    let (scan, code) = scan_json(root);
    assert_eq!(code, Some(0), "{what}: {scan}");
    assert_eq!(
        scan["health"]["refcount_mismatch"],
        serde_json::json!([]),
        "{what}: {scan}"
    );
    dovecot.doveadm_in(root, Layout::Mdbox, &["force-resync", "*"]);
    assert_same_lines(
        &dovecot.oracle_in(root, Layout::Mdbox),
        want,
        &format!("{what}: after force-resync"),
    );
}

#[test]
fn mdbox_writes_need_offline_and_an_empty_destination() {
    let dovecot = Dovecot::new();
    let src = dovecot.sample("src");
    let dst = dovecot.path().join("dst");
    let run = backup(&src, &dst, &["--to-format", "mdbox"]);
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("--offline"), "{}", run.describe());
    assert!(!dst.exists(), "nothing written without --offline");
    let existing = dovecot.sample("existing");
    let before = snapshot(&existing);
    let run = backup(&src, &existing, &["--to-format", "mdbox", "--offline"]);
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("not empty"), "{}", run.describe());
    assert_same_snapshot(
        &before,
        &snapshot(&existing),
        "a refused run writes nothing",
    );
    let leftovers: Vec<_> = std::fs::read_dir(dovecot.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("mdsync-new"))
        .collect();
    assert!(leftovers.is_empty(), "temp trees left: {leftovers:?}");
}

/// Panics unless the run's `--json` report has these counts.
fn assert_counts(run: &Run, counts: &[(&str, u64)], what: &str) {
    for &(field, want) in counts {
        assert_eq!(
            run.count(field),
            want,
            "{what}: {field}: {}",
            run.describe()
        );
    }
}

/// The `live` mdbox fixture and the sample Maildir, as sources, with their layouts.
fn mdbox_and_maildir_sources(dovecot: &Dovecot) -> [(PathBuf, Layout); 2] {
    [
        (copy_fixture(dovecot, "live", "mdbox-src"), Layout::Mdbox),
        (dovecot.sample("maildir-src"), Layout::MaildirPlusPlus),
    ]
}

/// `src` migrated into a new mdbox tree `PREFIX-<src name>`: (src name, the tree).
fn migrated(dovecot: &Dovecot, src: &Path, prefix: &str) -> (String, PathBuf) {
    let name = src.file_name().unwrap().to_str().unwrap().to_string();
    let dst = dovecot.path().join(format!("{prefix}-{name}"));
    backup_ok(src, &dst, &["--to-format", "mdbox", "--offline"]);
    (name, dst)
}

/// An existing mdbox destination, updated with `--offline` after changes made through
/// Dovecot on the source (mdbox or Maildir): flags and keywords set and cleared, an
/// expunge, new mail, a new and a deleted mailbox. Dovecot then sees the source's state in
/// the destination, also after `doveadm force-resync`; refcounts agree with the mailboxes;
/// a further run has nothing to do.
#[test]
fn offline_updates_of_an_existing_mdbox_follow_the_source() {
    let dovecot = Dovecot::new();
    for (src, layout) in &mdbox_and_maildir_sources(&dovecot) {
        let (src, layout) = (src, *layout);
        let (name, dst) = migrated(&dovecot, src, "dst");
        let name = name.as_str();
        change_through_dovecot(&dovecot, src, layout);
        dovecot.doveadm_in(src, layout, &["mailbox", "delete", "Sent"]);
        let refused = backup(src, &dst, &[]);
        assert_ne!(refused.code, Some(0), "{}", refused.describe());
        assert!(
            refused.stderr.contains("--offline"),
            "{}",
            refused.describe()
        );
        let run = backup_ok(src, &dst, &["--offline"]);
        assert_counts(
            &run,
            &[("messages_copied", 2), ("mailboxes_deleted", 1)],
            name,
        );
        let want = dovecot.oracle_in(src, layout);
        assert_same_lines(&dovecot.oracle_in(&dst, Layout::Mdbox), &want, name);
        let (scan, code) = scan_json(&dst);
        assert_eq!(code, Some(0), "{name}: {scan}");
        dovecot.doveadm_in(&dst, Layout::Mdbox, &["force-resync", "*"]);
        let after = dovecot.oracle_in(&dst, Layout::Mdbox);
        assert_same_lines(&after, &want, &format!("{name}: after force-resync"));
        backup_ok(src, &dst, &["--offline"]).assert_no_work();
    }
}

/// A message expunged on the mdbox destination alone cannot be appended again under its
/// old UID (Dovecot would take the index for corrupt): the run is refused, and writes
/// nothing.
#[test]
fn re_adding_a_uid_below_next_uid_is_refused_without_writing() {
    let dovecot = Dovecot::new();
    let src = copy_fixture(&dovecot, "live", "src");
    let dst = dovecot.path().join("dst");
    backup_ok(&src, &dst, &["--to-format", "mdbox", "--offline"]);
    dovecot.doveadm_in(
        &dst,
        Layout::Mdbox,
        &["expunge", "mailbox", "INBOX", "uid", "3"],
    );
    let before = snapshot(&dst);
    let run = backup(&src, &dst, &["--offline"]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains("UID 3 lies below"),
        "{}",
        run.describe()
    );
    assert_same_snapshot(&before, &snapshot(&dst), "a refused run writes nothing");
}

/// How a far side is reached: a real sshd on 127.0.0.1 (with the wrapper that runs this
/// build's mdsync there), or the in-process pipe.
enum Far {
    Ssh(Sshd, PathBuf),
    Pipe,
}

impl Far {
    fn ssh() -> Far {
        let sshd = Sshd::start();
        let wrapper = remote_wrapper(sshd.dir());
        Far::Ssh(sshd, wrapper)
    }

    /// `mdsync COMMAND --json --no-progress EXTRA X Y` with the first side (`remote` =
    /// "src") or the second ("dst") served by the far side.
    fn run(&self, command: &str, remote: &str, x: &Path, y: &Path, extra: &[&str]) -> Run {
        let mut args: Vec<String> = vec![command.into(), "--json".into(), "--no-progress".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (mut x, mut y) = (x.display().to_string(), y.display().to_string());
        match self {
            Far::Pipe => args.extend(["--via-pipe".into(), remote.into()]),
            Far::Ssh(sshd, wrapper) => {
                args.extend(["-e".into(), sshd.rsh()]);
                args.extend(["--remote-mdsync".into(), wrapper.display().to_string()]);
                let far = if remote == "src" { &mut x } else { &mut y };
                *far = format!("{}:{far}", sshd.host());
            }
        }
        args.extend([x, y]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_mdsync(&refs)
    }
}

/// A remote mdbox source over ssh, read-only on the far side (no --offline): the far side
/// scans it with the mdbox scanner and sends bodies read from its m.N files, into a local
/// Maildir and (with --offline) a local mdbox. Dovecot sees the source's state in both
/// copies, also after changes made through doveadm on the source and incremental runs.
#[test]
fn a_remote_mdbox_source_over_ssh_is_what_dovecot_sees() {
    let dovecot = Dovecot::new();
    let src = copy_fixture(&dovecot, "live", "src");
    let maildir = dovecot.path().join("maildir");
    let mdbox = dovecot.path().join("mdbox");
    let far = Far::ssh();
    let first = far.run("backup", "src", &src, &maildir, &[]);
    first.assert_ok();
    assert_eq!(first.count("messages_copied"), 10, "{}", first.describe());
    let into_mdbox = ["--to-format", "mdbox", "--offline"];
    far.run("backup", "src", &src, &mdbox, &into_mdbox)
        .assert_ok();
    let want = dovecot.oracle_in(&src, Layout::Mdbox);
    for (copy, layout) in [(&maildir, Layout::MaildirPlusPlus), (&mdbox, Layout::Mdbox)] {
        assert_same_lines(
            &dovecot.oracle_in(copy, layout),
            &want,
            "copy of a remote mdbox",
        );
        assert_eq!(
            received_dates(&dovecot, copy, layout),
            received_dates(&dovecot, &src, Layout::Mdbox),
            "received dates"
        );
    }
    let src_before = snapshot(&src);
    change_through_dovecot(&dovecot, &src, Layout::Mdbox);
    assert_ne!(snapshot(&src), src_before, "doveadm changed the source");
    let second = far.run("backup", "src", &src, &maildir, &[]);
    second.assert_ok();
    assert_eq!(second.count("messages_copied"), 2, "{}", second.describe());
    assert_eq!(second.count("expunged"), 1, "{}", second.describe());
    let onto_mdbox = far.run("backup", "src", &src, &mdbox, &["--offline"]);
    onto_mdbox.assert_ok();
    assert_eq!(
        onto_mdbox.count("messages_copied"),
        2,
        "{}",
        onto_mdbox.describe()
    );
    let want = dovecot.oracle_in(&src, Layout::Mdbox);
    assert_same_lines(
        &dovecot.oracle_in(&maildir, Layout::MaildirPlusPlus),
        &want,
        "Maildir copy after changes made through doveadm",
    );
    assert_same_lines(
        &dovecot.oracle_in(&mdbox, Layout::Mdbox),
        &want,
        "mdbox copy after changes made through doveadm",
    );
    far.run("backup", "src", &src, &maildir, &[])
        .assert_no_work();
}

/// Local Maildir → an existing remote mdbox tree: refused without --offline (the message
/// names the path and --offline, the tree is left byte for byte), carried out the way
/// Dovecot saves with it; `doveadm force-resync` then changes nothing.
fn remote_mdbox_destination(far: &Far) {
    let dovecot = Dovecot::new();
    let src = dovecot.sample("src");
    let dst = dovecot.path().join("dst");
    backup_ok(&src, &dst, &["--to-format", "mdbox", "--offline"]);
    change_through_dovecot(&dovecot, &src, Layout::MaildirPlusPlus);
    let before = snapshot(&dst);
    let refused = far.run("backup", "dst", &src, &dst, &[]);
    assert_eq!(refused.code, Some(1), "{}", refused.describe());
    for needed in ["--offline", &dst.display().to_string()] {
        assert!(refused.stderr.contains(needed), "{}", refused.describe());
    }
    assert_same_snapshot(&before, &snapshot(&dst), "a refused run writes nothing");
    let run = far.run("backup", "dst", &src, &dst, &["--offline"]);
    run.assert_ok();
    assert_eq!(run.count("messages_copied"), 2, "{}", run.describe());
    assert_eq!(run.count("expunged"), 1, "{}", run.describe());
    let want = dovecot.oracle(&src);
    assert_same_lines(
        &dovecot.oracle_in(&dst, Layout::Mdbox),
        &want,
        "remote mdbox",
    );
    assert_healthy_and_resync_proof(&dovecot, &dst, &want, "remote mdbox");
    far.run("backup", "dst", &src, &dst, &["--offline"])
        .assert_no_work();
}

#[test]
fn a_remote_mdbox_destination_over_ssh_needs_offline() {
    remote_mdbox_destination(&Far::ssh());
}

#[test]
fn a_remote_mdbox_destination_through_the_pipe_needs_offline() {
    remote_mdbox_destination(&Far::Pipe);
}

/// `mdsync sync` with a remote mdbox side writes both sides: without --offline it is
/// refused before either side is written; with it, changes made on each side reach the
/// other, and Dovecot sees the same in both.
#[test]
fn sync_with_a_remote_mdbox_side_needs_offline() {
    let dovecot = Dovecot::new();
    let a = dovecot.sample("a");
    let b = dovecot.path().join("b");
    backup_ok(&a, &b, &["--to-format", "mdbox", "--offline"]);
    let far = Far::ssh();
    far.run("sync", "dst", &a, &b, &["--offline"]).assert_ok();
    dovecot.flags_add(&a, "INBOX", "1", "\\Flagged");
    dovecot.save(&a, "INBOX", &message("from-a", "From A", 3));
    let da = |args: &[&str]| dovecot.doveadm_in(&b, Layout::Mdbox, args);
    da(&["flags", "add", "$label1", "mailbox", "INBOX", "uid", "3"]);
    dovecot.save_in(
        &b,
        Layout::Mdbox,
        "Archive",
        &message("from-b", "From B", 3),
    );
    let (a_before, b_before) = (snapshot(&a), snapshot(&b));
    let refused = far.run("sync", "dst", &a, &b, &[]);
    assert_eq!(refused.code, Some(1), "{}", refused.describe());
    for needed in ["--offline", &b.display().to_string()] {
        assert!(refused.stderr.contains(needed), "{}", refused.describe());
    }
    assert_same_snapshot(
        &a_before,
        &snapshot(&a),
        "a refused sync writes nothing on A",
    );
    assert_same_snapshot(
        &b_before,
        &snapshot(&b),
        "a refused sync writes nothing on B",
    );
    let run = far.run("sync", "dst", &a, &b, &["--offline"]);
    run.assert_ok();
    let json = run.json();
    assert_eq!(json["a"]["messages_copied"], 1, "{}", run.describe());
    assert_eq!(json["b"]["messages_copied"], 1, "{}", run.describe());
    assert_same_lines(
        &dovecot.oracle_in(&b, Layout::Mdbox),
        &dovecot.oracle(&a),
        "both sides after sync",
    );
    let again = far.run("sync", "dst", &a, &b, &["--offline"]);
    again.assert_ok();
    assert_eq!(again.json()["in_sync"], true, "{}", again.describe());
    // The remote mdbox as the first side is written all the same (a first sync of this
    // pair in this order: flags are united).
    dovecot.flags_add(&a, "INBOX", "2", "$swapped");
    let swapped = far.run("sync", "src", &b, &a, &["--offline"]);
    swapped.assert_ok();
    assert_eq!(
        swapped.json()["a"]["flag_changes"],
        1,
        "{}",
        swapped.describe()
    );
    assert_same_lines(
        &dovecot.oracle_in(&b, Layout::Mdbox),
        &dovecot.oracle(&a),
        "both sides after a sync with the remote mdbox first",
    );
}

/// `--to-format mdbox --offline` into a new remote destination: the far side writes the
/// tree from the scan and the bodies the client streams. Dovecot sees the source's state in
/// it, also after `doveadm force-resync`; run again, the existing tree is updated (nothing
/// to do), as a local one would be.
fn new_remote_mdbox(far: &Far, src: &Path, layout: Layout, dovecot: &Dovecot) {
    let dst = dovecot.path().join("new-remote");
    let into_new = ["--to-format", "mdbox", "--offline"];
    let refused = far.run("backup", "dst", src, &dst, &into_new[..2]);
    assert_eq!(refused.code, Some(1), "{}", refused.describe());
    assert!(
        refused.stderr.contains("--offline"),
        "{}",
        refused.describe()
    );
    assert!(!dst.exists(), "nothing written without --offline");
    let run = far.run("backup", "dst", src, &dst, &into_new);
    run.assert_ok();
    assert!(
        run.stdout.contains("\"format\":\"mdbox\""),
        "{}",
        run.describe()
    );
    let want = dovecot.oracle_in(src, layout);
    assert_same_lines(
        &dovecot.oracle_in(&dst, Layout::Mdbox),
        &want,
        "new remote mdbox",
    );
    assert_eq!(
        received_dates(dovecot, &dst, Layout::Mdbox),
        received_dates(dovecot, src, layout),
        "received dates"
    );
    assert_healthy_and_resync_proof(dovecot, &dst, &want, "new remote mdbox");
    far.run("backup", "dst", src, &dst, &into_new)
        .assert_no_work();
}

#[test]
fn a_new_remote_mdbox_over_ssh_is_what_dovecot_sees() {
    let dovecot = Dovecot::new();
    let src = dovecot.sample("src");
    new_remote_mdbox(&Far::ssh(), &src, Layout::MaildirPlusPlus, &dovecot);
}

#[test]
fn a_new_mdbox_through_the_pipe_from_an_mdbox_source() {
    let dovecot = Dovecot::new();
    let src = copy_fixture(&dovecot, "live", "src");
    new_remote_mdbox(&Far::Pipe, &src, Layout::Mdbox, &dovecot);
}

/// The `m.N` files of an mdbox tree, by name.
fn storage_files(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("storage"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("m."))
        .collect();
    names.sort();
    names
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

/// Dovecot's view of the mdbox `dst` is `want`, also after `doveadm force-resync`.
fn assert_mdbox_shows(dovecot: &Dovecot, dst: &Path, want: &str, what: &str) {
    assert_same_lines(&dovecot.oracle_in(dst, Layout::Mdbox), want, what);
    dovecot.doveadm_in(dst, Layout::Mdbox, &["force-resync", "*"]);
    let resynced = dovecot.oracle_in(dst, Layout::Mdbox);
    assert_same_lines(&resynced, want, &format!("{what}: after force-resync"));
}

/// Folders renamed on the source (Maildir or mdbox) through doveadm — a parent with its
/// child, then the child alone out of its parent, together with a flag change and new mail
/// in it — are renamed in the mdbox destination: the mailbox indexes move (same inode), no
/// body is written again, and Dovecot lists the new names only (its list index included),
/// with the source's mailbox GUIDs, UIDVALIDITYs, UIDs and flags, also after
/// `doveadm force-resync`.
#[test]
fn folders_renamed_on_the_source_are_renamed_in_the_mdbox() {
    let dovecot = Dovecot::new();
    for (src, layout) in &mdbox_and_maildir_sources(&dovecot) {
        let (src, layout) = (src, *layout);
        let (name, dst) = migrated(&dovecot, src, "renamed");
        let name = name.as_str();
        // Dovecot opens the copy: its list index now names every mailbox.
        dovecot.oracle_in(&dst, Layout::Mdbox);
        let da = |args: &[&str]| dovecot.doveadm_in(src, layout, args);
        let index = |rel: &str| inode(&dst.join("mailboxes").join(rel).join("dbox-Mails"));
        let (archive, child) = (index("Archive"), index("Archive/2023"));
        let files = storage_files(&dst);
        da(&["mailbox", "rename", "Archive", "Older"]);
        let run = backup_ok(src, &dst, &["--offline"]);
        assert_counts(
            &run,
            &[("messages_copied", 0), ("mailboxes_created", 0)],
            name,
        );
        assert_eq!(
            storage_files(&dst),
            files,
            "{name}: a rename writes no body"
        );
        assert_eq!(index("Older"), archive, "{name}: the index moved");
        assert_eq!(
            index("Older/2023"),
            child,
            "{name}: the child's index moved"
        );
        assert!(!dst.join("mailboxes/Archive").exists(), "{name}");
        let want = dovecot.oracle_in(src, layout);
        assert!(want.contains("list Older/2023\n"), "{want}");
        assert_mdbox_shows(&dovecot, &dst, &want, name);
        backup_ok(src, &dst, &["--offline"]).assert_no_work();
        // The child alone, out of its parent, with changes in it made after the rename.
        da(&["mailbox", "rename", "Older/2023", "Y2023"]);
        da(&[
            "flags",
            "add",
            "\\Flagged",
            "mailbox",
            "Y2023",
            "uid",
            "1:*",
        ]);
        dovecot.save_in(src, layout, "Y2023", &message("y2023-new", "Y2023 new", 2));
        let run = backup_ok(src, &dst, &["--offline"]);
        assert_eq!(
            run.count("messages_copied"),
            1,
            "{name}: {}",
            run.describe()
        );
        assert_eq!(index("Y2023"), child, "{name}: the child's index moved");
        assert_eq!(index("Older"), archive, "{name}: the parent stayed");
        let want = dovecot.oracle_in(src, layout);
        assert!(want.contains("list Y2023\n"), "{want}");
        assert_mdbox_shows(&dovecot, &dst, &want, &format!("{name}, child renamed"));
        backup_ok(src, &dst, &["--offline"]).assert_no_work();
    }
}
