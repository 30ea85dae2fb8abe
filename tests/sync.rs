//! End-to-end `mdsync sync A B` (two-way) on Maildir++ trees changed through doveadm and
//! on disk, checked against what Dovecot sees on both sides (the oracle): first sync as a
//! union, each merge rule, UID conflicts renumbered on both sides, mailbox renames and
//! deletes, the three cases `doveadm sync` gets wrong, a second sync with nothing to do,
//! the same scenarios over ssh, and a run kept out of a side that another mdsync run writes.

mod support;

use std::fs;
use std::path::Path;

use support::sshd::{Sshd, remote_wrapper};
use support::tree::{Run, conflict_kinds, run_mdsync};
use support::{Dovecot, copy_tree, message};

/// How a test reaches the sides: both local, or one of them over ssh to 127.0.0.1.
enum Via<'a> {
    Local,
    /// B is remote.
    Ssh(&'a Sshd),
    /// A is remote.
    SshA(&'a Sshd),
}

fn sync_run(via: &Via<'_>, a: &Path, b: &Path, options: &[&str]) -> Run {
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let mut args = vec!["sync", "--json", "--no-progress"];
    args.extend_from_slice(options);
    let rsh;
    let remote;
    let wrapper;
    match via {
        Via::Local => {
            args.push(&a);
            args.push(&b);
        }
        Via::Ssh(sshd) | Via::SshA(sshd) => {
            rsh = sshd.rsh();
            let a_remote = matches!(via, Via::SshA(_));
            remote = format!("{}:{}", sshd.host(), if a_remote { &a } else { &b });
            // The far side caches in the test's cache home, not the user's.
            wrapper = remote_wrapper(sshd.dir()).display().to_string();
            args.extend(["-e", &rsh, "--remote-mdsync", &wrapper]);
            if a_remote {
                args.extend([remote.as_str(), b.as_str()]);
            } else {
                args.extend([a.as_str(), remote.as_str()]);
            }
        }
    }
    run_mdsync(&args)
}

fn sync_ok(via: &Via<'_>, a: &Path, b: &Path) -> serde_json::Value {
    let run = sync_run(via, a, b, &[]);
    run.assert_ok();
    run.json()
}

/// Both sides as Dovecot sees them, asserted equal; returns the oracle text.
fn assert_equal(dovecot: &Dovecot, a: &Path, b: &Path) -> String {
    let (oa, ob) = (dovecot.oracle(a), dovecot.oracle(b));
    assert_eq!(oa, ob, "A and B differ as Dovecot sees them");
    oa
}

/// A second sync right away finds nothing to do.
fn assert_second_sync_is_noop(via: &Via<'_>, a: &Path, b: &Path) {
    let json = sync_ok(via, a, b);
    assert_eq!(json["in_sync"], true, "second sync did work: {json}");
    assert_eq!(json["completion"], "complete", "{json}");
    assert!(json["conflicts"].as_array().unwrap().is_empty(), "{json}");
}

/// Two trees in sync: A made with doveadm (INBOX with three messages, Archive with one),
/// B its copy, synced once so the pair has a base.
fn synced_pair(dovecot: &Dovecot, via: &Via<'_>) -> (std::path::PathBuf, std::path::PathBuf) {
    let a = dovecot.maildir("a");
    for n in 1..=3 {
        dovecot.save(&a, "INBOX", &message(&format!("m{n}"), "hello", 3));
    }
    dovecot.create_mailbox(&a, "Archive");
    dovecot.save(&a, "Archive", &message("old", "archived", 2));
    dovecot.flags_add(&a, "INBOX", "1", "\\Seen");
    let b = dovecot.maildir("b");
    copy_tree(&a, &b);
    let json = sync_ok(via, &a, &b);
    assert_eq!(json["first_sync"], true);
    assert_eq!(json["in_sync"], true, "copies need no work: {json}");
    (a, b)
}

fn fetch(dovecot: &Dovecot, root: &Path, mailbox: &str) -> Vec<(u32, String, String)> {
    dovecot
        .fetch(root, mailbox, "uid guid flags")
        .into_iter()
        .map(|m| {
            let mut flags: Vec<&str> = m["flags"]
                .split_whitespace()
                .filter(|f| *f != "\\Recent")
                .collect();
            flags.sort();
            (
                m["uid"].parse().unwrap(),
                m["guid"].clone(),
                flags.join(" "),
            )
        })
        .collect()
}

fn scenario_first_sync_is_a_union(via: &Via<'_>) {
    let dovecot = Dovecot::new();
    let a = dovecot.maildir("a");
    let b = dovecot.maildir("b");
    dovecot.save(&a, "INBOX", &message("a1", "from a", 2));
    dovecot.create_mailbox(&a, "OnlyA");
    dovecot.save(&a, "OnlyA", &message("a2", "from a", 2));
    copy_tree(&a, &b);
    dovecot.save(&a, "INBOX", &message("a3", "later on a", 2));
    dovecot.save(&b, "INBOX", &message("b1", "later on b", 2));
    dovecot.create_mailbox(&b, "OnlyB");
    dovecot.save(&b, "OnlyB", &message("b2", "from b", 2));
    let json = sync_ok(via, &a, &b);
    assert_eq!(json["first_sync"], true);
    let oracle = assert_equal(&dovecot, &a, &b);
    let inbox = fetch(&dovecot, &a, "INBOX");
    assert_eq!(inbox.len(), 3, "{oracle}");
    // Both sides gave UID 2 to a different message: both renumbered above 2.
    let uids: Vec<u32> = inbox.iter().map(|m| m.0).collect();
    assert_eq!(uids, vec![1, 3, 4], "{oracle}");
    assert_eq!(fetch(&dovecot, &a, "OnlyB").len(), 1);
    assert_eq!(fetch(&dovecot, &b, "OnlyA").len(), 1);
    assert_second_sync_is_noop(via, &a, &b);
}

#[test]
fn first_sync_is_a_union_and_renumbers_uid_conflicts() {
    scenario_first_sync_is_a_union(&Via::Local);
}

/// The same mail imported separately on both sides (other GUIDs, other UIDs, as an IMAP
/// migration leaves it): the first sync finds each pair by content and keeps one message,
/// not two; mail on one side only is still copied.
#[test]
fn a_first_sync_finds_the_same_mail_under_other_guids_and_uids() {
    let dovecot = Dovecot::new();
    let a = dovecot.maildir("a");
    let b = dovecot.maildir("b");
    let (m1, m2, m3) = (
        message("same-1", "one", 2),
        message("same-2", "two", 3),
        message("same-3", "three", 4),
    );
    for m in [&m1, &m2, &m3] {
        dovecot.save(&a, "INBOX", m);
    }
    dovecot.save(&b, "INBOX", &message("b-only", "only on b", 5));
    for m in [&m3, &m1, &m2] {
        dovecot.save(&b, "INBOX", m);
    }
    let json = sync_ok(&Via::Local, &a, &b);
    assert_eq!(json["first_sync"], true);
    let oracle = assert_equal(&dovecot, &a, &b);
    let inbox = fetch(&dovecot, &a, "INBOX");
    assert_eq!(
        inbox.len(),
        4,
        "three shared messages kept once, one copied: {oracle}"
    );
    let guids: std::collections::BTreeSet<&String> = inbox.iter().map(|m| &m.1).collect();
    assert_eq!(guids.len(), 4, "no GUID twice: {oracle}");
    assert_second_sync_is_noop(&Via::Local, &a, &b);
}

fn scenario_flags_merge_per_flag(via: &Via<'_>) {
    let dovecot = Dovecot::new();
    let (a, b) = synced_pair(&dovecot, via);
    // doveadm sync keeps one side's whole flag set here; per flag, both changes survive.
    dovecot.flags_remove(&a, "INBOX", "1", "\\Seen");
    dovecot.flags_add(&b, "INBOX", "1", "\\Answered");
    dovecot.flags_add(&a, "INBOX", "2", "$Label1");
    dovecot.flags_add(&b, "INBOX", "3", "\\Flagged $Work");
    // Subscriptions merge by name too.
    dovecot.subscribe(&a, "Archive");
    dovecot.subscribe(&b, "INBOX");
    sync_ok(via, &a, &b);
    let oracle = assert_equal(&dovecot, &a, &b);
    assert!(
        oracle.contains("subscribed Archive\n") && oracle.contains("subscribed INBOX\n"),
        "{oracle}"
    );
    let inbox = fetch(&dovecot, &b, "INBOX");
    assert_eq!(inbox[0].2, "\\Answered");
    assert_eq!(inbox[1].2, "$Label1");
    assert_eq!(inbox[2].2, "$Work \\Flagged");
    assert_second_sync_is_noop(via, &a, &b);
}

#[test]
fn flags_and_keywords_merge_per_flag() {
    scenario_flags_merge_per_flag(&Via::Local);
}

fn scenario_expunges(via: &Via<'_>) {
    let dovecot = Dovecot::new();
    let (a, b) = synced_pair(&dovecot, via);
    dovecot.expunge(&a, "INBOX", "2");
    // Expunged on B, flag-changed on A: expunged.
    dovecot.expunge(&b, "INBOX", "3");
    dovecot.flags_add(&a, "INBOX", "3", "\\Flagged");
    let json = sync_ok(via, &a, &b);
    assert_eq!(json["conflicts"][0]["kind"], "expunged-changed", "{json}");
    assert_equal(&dovecot, &a, &b);
    let uids: Vec<u32> = fetch(&dovecot, &a, "INBOX").iter().map(|m| m.0).collect();
    assert_eq!(uids, vec![1]);
    assert_second_sync_is_noop(via, &a, &b);
}

#[test]
fn expunges_propagate_and_win_over_flag_changes() {
    scenario_expunges(&Via::Local);
}

#[test]
fn a_message_deleted_on_disk_stays_deleted() {
    // doveadm sync brought such a message back under a new UID.
    let dovecot = Dovecot::new();
    let via = Via::Local;
    let (a, b) = synced_pair(&dovecot, &via);
    let victim = ["cur", "new"]
        .iter()
        .flat_map(|sub| fs::read_dir(a.join(sub)).unwrap().flatten())
        .map(|e| e.path())
        .find(|p| fs::read(p).unwrap().windows(2).any(|w| w == b"m2"))
        .expect("message m2 on A");
    fs::remove_file(victim).unwrap();
    sync_ok(&via, &a, &b);
    assert_equal(&dovecot, &a, &b);
    let uids: Vec<u32> = fetch(&dovecot, &b, "INBOX").iter().map(|m| m.0).collect();
    assert_eq!(uids, vec![1, 3]);
    assert_second_sync_is_noop(&via, &a, &b);
}

/// `options`: `--read-ahead 0` has a remote side's bodies stream straight into the tree,
/// one side's apply after the other; by default they are read ahead and the applies overlap.
fn scenario_new_mail_on_both_sides(via: &Via<'_>, options: &[&str]) {
    let dovecot = Dovecot::new();
    let (a, b) = synced_pair(&dovecot, via);
    dovecot.save(&a, "INBOX", &message("na", "new on a", 2));
    dovecot.save(&b, "INBOX", &message("nb", "new on b", 2));
    dovecot.save(&b, "Archive", &message("nb2", "new on b", 2));
    let run = sync_run(via, &a, &b, options);
    run.assert_ok();
    let json = run.json();
    let kinds = conflict_kinds(&json);
    assert!(kinds.contains(&"uid-renumbered"), "{json}");
    assert_equal(&dovecot, &a, &b);
    let inbox = fetch(&dovecot, &a, "INBOX");
    let uids: Vec<u32> = inbox.iter().map(|m| m.0).collect();
    // UID 4 went to different messages on the two sides: both renumbered above it.
    assert_eq!(uids, vec![1, 2, 3, 5, 6]);
    let guids: std::collections::BTreeSet<&String> = inbox.iter().map(|m| &m.1).collect();
    assert_eq!(guids.len(), 5, "no GUID twice");
    // A message new on one side only keeps its UID.
    let archive: Vec<u32> = fetch(&dovecot, &a, "Archive").iter().map(|m| m.0).collect();
    assert_eq!(archive, vec![1, 2]);
    assert_second_sync_is_noop(via, &a, &b);
}

#[test]
fn new_mail_on_both_sides_is_merged_and_uid_conflicts_renumbered() {
    scenario_new_mail_on_both_sides(&Via::Local, &[]);
}

fn scenario_mailboxes(via: &Via<'_>) {
    let dovecot = Dovecot::new();
    let (a, b) = synced_pair(&dovecot, via);
    dovecot.create_mailbox(&a, "Projects");
    dovecot.save(&a, "Projects", &message("p1", "project", 2));
    dovecot.rename_mailbox(&b, "Archive", "Old");
    let status = |root: &Path, mailbox: &str| {
        dovecot.doveadm(
            root,
            &[
                "-f",
                "tab",
                "mailbox",
                "status",
                "guid uidvalidity",
                mailbox,
            ],
        )
    };
    let before = status(&b, "Old");
    let json = sync_ok(via, &a, &b);
    assert_eq!(json["a"]["mailboxes_renamed"], 1, "{json}");
    assert_eq!(
        json["a"]["messages_copied"], 0,
        "renamed, not copied: {json}"
    );
    assert_equal(&dovecot, &a, &b);
    assert_eq!(status(&a, "Old"), before, "same GUID and UIDVALIDITY");
    assert_second_sync_is_noop(via, &a, &b);
    // Deleted on A, untouched on B: deleted on B.
    dovecot.delete_mailbox(&a, "Old");
    let json = sync_ok(via, &a, &b);
    assert_eq!(json["b"]["mailboxes_deleted"], 1, "{json}");
    assert_equal(&dovecot, &a, &b);
    // Deleted on B while A added mail: kept, recreated on B, reported.
    dovecot.delete_mailbox(&b, "Projects");
    dovecot.save(&a, "Projects", &message("p2", "project", 2));
    let json = sync_ok(via, &a, &b);
    assert_eq!(json["conflicts"][0]["kind"], "delete-refused", "{json}");
    assert_equal(&dovecot, &a, &b);
    assert_eq!(fetch(&dovecot, &b, "Projects").len(), 2);
    assert_second_sync_is_noop(via, &a, &b);
}

#[test]
fn mailboxes_are_created_renamed_and_deleted() {
    scenario_mailboxes(&Via::Local);
}

#[test]
fn a_folder_renamed_on_disk_is_renamed_on_the_other_side() {
    // doveadm sync renamed such a folder back on both sides.
    let dovecot = Dovecot::new();
    let via = Via::Local;
    let (a, b) = synced_pair(&dovecot, &via);
    fs::rename(a.join(".Archive"), a.join(".Kept")).unwrap();
    let json = sync_ok(&via, &a, &b);
    assert_eq!(json["b"]["mailboxes_renamed"], 1, "{json}");
    assert_equal(&dovecot, &a, &b);
    assert!(b.join(".Kept").is_dir() && !b.join(".Archive").exists());
    assert_second_sync_is_noop(&via, &a, &b);
}

#[test]
fn dry_run_changes_nothing_and_lists_both_sides() {
    let dovecot = Dovecot::new();
    let via = Via::Local;
    let (a, b) = synced_pair(&dovecot, &via);
    dovecot.save(&a, "INBOX", &message("na", "new on a", 2));
    dovecot.flags_add(&b, "INBOX", "2", "\\Flagged");
    let before = (dovecot.oracle(&a), dovecot.oracle(&b));
    let run = sync_run(&via, &a, &b, &["-n"]);
    run.assert_ok();
    let json = run.json();
    assert_eq!(json["b"]["messages_copied"], 1, "{json}");
    assert_eq!(json["a"]["flag_changes"], 1, "{json}");
    assert_eq!((dovecot.oracle(&a), dovecot.oracle(&b)), before);
    sync_ok(&via, &a, &b);
    assert_equal(&dovecot, &a, &b);
}

#[test]
fn a_lost_base_falls_back_to_a_union_that_loses_nothing() {
    let dovecot = Dovecot::new();
    let a = dovecot.maildir("a");
    dovecot.save(&a, "INBOX", &message("m1", "hello", 3));
    dovecot.save(&a, "INBOX", &message("m2", "hello", 3));
    let b = dovecot.maildir("b");
    copy_tree(&a, &b);
    // A cache directory of its own: garbling the shared one would take the base of every
    // other test running at the same time.
    let cache = dovecot.path().join("cache");
    let cache_arg = cache.display().to_string();
    let options = ["--cache-dir", cache_arg.as_str()];
    sync_run(&Via::Local, &a, &b, &options).assert_ok();
    let bases: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|e| e == "sync"))
        .collect();
    assert_eq!(bases.len(), 1, "one base for the pair");
    fs::write(bases[0].path(), b"garbage").unwrap();
    dovecot.save(&a, "INBOX", &message("na", "new on a", 2));
    dovecot.expunge(&b, "INBOX", "1");
    let run = sync_run(&Via::Local, &a, &b, &options);
    run.assert_ok();
    let json = run.json();
    assert_eq!(json["first_sync"], true, "{json}");
    assert_equal(&dovecot, &a, &b);
    // Without a base the expunge cannot be told from a message new on A: kept.
    assert_eq!(fetch(&dovecot, &b, "INBOX").len(), 3);
}

#[test]
fn over_ssh() {
    let sshd = Sshd::start();
    let via = Via::Ssh(&sshd);
    scenario_first_sync_is_a_union(&via);
    scenario_flags_merge_per_flag(&via);
    scenario_expunges(&via);
    scenario_new_mail_on_both_sides(&via, &[]);
    scenario_new_mail_on_both_sides(&via, &["--read-ahead", "0"]);
    scenario_mailboxes(&via);
    // The other way round: A on the far side.
    let via = Via::SshA(&sshd);
    scenario_flags_merge_per_flag(&via);
    scenario_new_mail_on_both_sides(&via, &[]);
    scenario_new_mail_on_both_sides(&via, &["--read-ahead", "0"]);
    scenario_mailboxes(&via);
}

#[test]
fn the_far_side_caches_no_mailbox_a_plan_after_its_renames_wrote() {
    use mdsync::scan::cache::{ScanCache, take_stamps};
    let sshd = Sshd::start();
    let via = Via::Ssh(&sshd);
    let dovecot = Dovecot::new();
    let (a, b) = synced_pair(&dovecot, &via);
    dovecot.create_mailbox(&a, "Quiet");
    dovecot.save(&a, "Quiet", &message("q1", "quiet", 2));
    sync_ok(&via, &a, &b);
    // Flags changed on B in INBOX and Quiet, so that B's scan lists both; old enough to
    // cache. Then a folder renamed on A and new mail in A's INBOX: B gets a plan of
    // renames alone, then its main plan, which writes INBOX and leaves Quiet alone.
    dovecot.flags_add(&b, "INBOX", "2", "\\Flagged");
    dovecot.flags_add(&b, "Quiet", "1", "\\Flagged");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    fs::rename(a.join(".Archive"), a.join(".Old")).unwrap();
    dovecot.save(&a, "INBOX", &message("m4", "late", 3));
    let served = ScanCache::for_root(&support::cache_home().join("remote/mdsync"), &b);
    let _ = fs::remove_dir_all(served.dir());
    let (inbox_before, quiet_before) = (take_stamps(&b), take_stamps(&b.join(".Quiet")));
    let json = sync_ok(&via, &a, &b);
    assert_eq!(json["b"]["mailboxes_renamed"], 1, "{json}");
    assert_eq!(json["b"]["messages_copied"], 1, "{json}");
    assert_eq!(take_stamps(&b.join(".Quiet")), quiet_before);
    assert!(
        served.take(".Quiet", &quiet_before).is_some(),
        "a mailbox no plan touched is cached by the far side"
    );
    assert_ne!(take_stamps(&b), inbox_before);
    assert!(
        served.take("", &inbox_before).is_none(),
        "INBOX, read before the main plan wrote it, must not be cached"
    );
    assert_equal(&dovecot, &a, &b);
}

/// (mailbox, Message-ID, GUID, flags) of every message, sorted, UIDs left out: where
/// `doveadm sync` and mdsync agree on the outcome, they may still number renumbered
/// messages differently. GUIDs of messages saved during a test differ between pairs (each
/// save makes one), so those are compared by Message-ID alone.
fn content(
    dovecot: &Dovecot,
    root: &Path,
    started: &[String],
) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for mailbox in ["INBOX", "Archive", "Receipts"] {
        for m in dovecot.fetch(root, mailbox, "guid flags hdr.message-id") {
            let mut flags: Vec<&str> = m["flags"]
                .split_whitespace()
                .filter(|f| *f != "\\Recent")
                .collect();
            flags.sort();
            let guid = if started.contains(&m["guid"]) {
                m["guid"].clone()
            } else {
                "new".into()
            };
            out.push((
                mailbox.to_string(),
                m["hdr.message-id"].clone(),
                guid,
                flags.join(" "),
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn where_doveadm_sync_has_an_answer_mdsync_gives_the_same() {
    let dovecot = Dovecot::new();
    let via = Via::Local;
    let (a, b) = synced_pair(&dovecot, &via);
    let started: Vec<String> = ["INBOX", "Archive"]
        .iter()
        .flat_map(|m| dovecot.fetch(&a, m, "guid"))
        .map(|m| m["guid"].clone())
        .collect();
    // The same starting pair for doveadm sync, synced once by it.
    let (da, db) = (dovecot.maildir("da"), dovecot.maildir("db"));
    copy_tree(&a, &da);
    copy_tree(&b, &db);
    let doveadm_sync = |x: &Path, y: &Path| {
        dovecot.doveadm(x, &["sync", &format!("maildir:{}", y.display())]);
    };
    doveadm_sync(&da, &db);
    // The same changes on both pairs: mail, flags and keywords, an expunge, a new folder.
    for (x, y) in [(&a, &b), (&da, &db)] {
        dovecot.save(x, "INBOX", &message("na", "new on a", 2));
        dovecot.save(y, "Archive", &message("nb", "new on b", 2));
        dovecot.flags_add(x, "INBOX", "2", "\\Flagged $Todo");
        dovecot.flags_add(y, "INBOX", "3", "\\Seen");
        dovecot.expunge(y, "INBOX", "1");
        dovecot.create_mailbox(x, "Receipts");
        dovecot.save(x, "Receipts", &message("r1", "receipt", 2));
    }
    sync_ok(&via, &a, &b);
    doveadm_sync(&da, &db);
    assert_equal(&dovecot, &a, &b);
    assert_equal(&dovecot, &da, &db);
    let (ours, theirs) = (
        content(&dovecot, &a, &started),
        content(&dovecot, &da, &started),
    );
    assert_eq!(ours.len(), 6, "{ours:#?}");
    assert_eq!(ours, theirs);
}

/// Both sides of a sync are written, so a run that another mdsync run keeps out of A (here,
/// or on the far side over ssh) stops before it reads or writes either side.
#[test]
fn a_side_another_run_writes_stops_the_sync_before_either_side_changes() {
    use mdsync::runlock::RunLock;
    use std::time::Duration;
    let sshd = Sshd::start();
    let (here, far) = (
        support::cache_home().join("mdsync"),
        support::cache_home().join("remote").join("mdsync"),
    );
    for (via, lock_dir, held_side) in [
        (Via::Local, &here, "a"),
        (Via::Local, &here, "b"),
        (Via::SshA(&sshd), &far, "a"),
        (Via::Ssh(&sshd), &far, "b"),
    ] {
        let dovecot = Dovecot::new();
        let (a, b) = synced_pair(&dovecot, &via);
        dovecot.save(&a, "INBOX", &message("new", "on A", 1));
        let before = (dovecot.oracle(&a), dovecot.oracle(&b));
        let side = if held_side == "a" { &a } else { &b };
        let held = RunLock::acquire(lock_dir, side, Duration::ZERO).unwrap();
        let refused = sync_run(&via, &a, &b, &["--lock-wait", "0"]);
        assert_eq!(refused.code, Some(1), "{}", refused.describe());
        assert!(
            refused.stderr.contains("another mdsync run"),
            "{}",
            refused.describe()
        );
        assert_eq!(
            (dovecot.oracle(&a), dovecot.oracle(&b)),
            before,
            "neither side changed"
        );
        drop(held);
        sync_ok(&via, &a, &b);
        assert_equal(&dovecot, &a, &b);
    }
}
