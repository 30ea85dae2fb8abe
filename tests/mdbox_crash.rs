//! Crash safety of the mdbox writers: `backup --to-format mdbox --offline` into a new tree
//! and `backup --offline` updates of an existing mdbox tree, SIGKILLed at delays spread
//! over a whole run, then a run to completion. Dovecot must then see in the destination
//! exactly what it sees in the source (mailboxes, status, UIDs, GUIDs, flags), with no
//! message twice in a mailbox, also after `doveadm force-resync` and `doveadm purge`.

mod support;

use std::fs;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::corpus::write_corpus;
use support::tree::{assert_no_duplicate_guids, assert_same_lines, backup_ok, run_and_kill};
use support::{Dovecot, Layout, vmail_ids};

/// Messages in the crash corpus.
const MESSAGES: usize = 300;

/// The corpus as a Maildir SRC, checked (and numbered) through Dovecot.
fn corpus_source(dc: &Dovecot) -> PathBuf {
    let src = dc.path().join("src");
    let corpus = write_corpus(&src, MESSAGES, 11);
    let oracle = dc.oracle(&src);
    let listed = oracle.lines().filter(|l| l.starts_with("message ")).count();
    assert_eq!(listed, corpus.messages, "Dovecot reads the corpus");
    src
}

/// Wall time of `mdsync backup OPTIONS SRC DST` run to completion.
fn timed_run(src: &Path, dst: &Path, options: &[&str]) -> Duration {
    let started = Instant::now();
    backup_ok(src, dst, options);
    started.elapsed()
}

/// Directories a new-tree run leaves beside DST (`.DST.mdsync-new-PID`).
fn new_tree_leftovers(dst: &Path) -> Vec<String> {
    let prefix = format!(
        ".{}.mdsync-new-",
        dst.file_name().unwrap().to_string_lossy()
    );
    fs::read_dir(dst.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Dovecot's view of the mdbox DST equals `want` (the source's), without duplicates;
/// also after `doveadm force-resync`, and (when `purge`) after a purge on top.
fn assert_mdbox_mirror(dc: &Dovecot, dst: &Path, want: &str, purge: bool, when: &str) {
    let got = dc.oracle_in(dst, Layout::Mdbox);
    assert_no_duplicate_guids(&got, when);
    assert_same_lines(&got, want, &format!("{when}: Dovecot's view of DST"));
    dc.doveadm_in(dst, Layout::Mdbox, &["force-resync", "*"]);
    let got = dc.oracle_in(dst, Layout::Mdbox);
    assert_no_duplicate_guids(&got, when);
    assert_same_lines(&got, want, &format!("{when}: after force-resync"));
    if purge {
        dc.doveadm_in(dst, Layout::Mdbox, &["purge"]);
        let got = dc.oracle_in(dst, Layout::Mdbox);
        assert_same_lines(&got, want, &format!("{when}: after purge"));
        // Every body is still readable after the purge.
        dc.doveadm_in(dst, Layout::Mdbox, &["fetch", "text", "all"]);
    }
}

/// `backup --to-format mdbox --offline` killed at delays spread over a whole run: DST is
/// then absent or complete (never half there); the re-run (a new tree, or an update of the
/// complete one) succeeds, and removes the killed run's hidden build directory.
#[test]
fn killed_new_tree_runs_leave_nothing_or_the_whole_tree() {
    let dc = Dovecot::new();
    let src = corpus_source(&dc);
    let want = dc.oracle(&src);
    let options = ["--to-format", "mdbox", "--offline"];
    let scratch = dc.path().join("measure");
    let full = timed_run(&src, &scratch, &options);
    fs::remove_dir_all(&scratch).unwrap();
    const ROUNDS: u32 = 8;
    for round in 0..ROUNDS {
        let dst = dc.path().join(format!("dst{round}"));
        let at = (f64::from(round) + 0.5) / f64::from(ROUNDS);
        let when = format!("round {round}: killed at {at:.2} of {full:?}");
        run_and_kill(&src, &dst, &options, full.mul_f64(at));
        if dst.exists() {
            let got = dc.oracle_in(&dst, Layout::Mdbox);
            assert_same_lines(
                &got,
                &want,
                &format!("{when}: a DST that is there is whole"),
            );
        }
        backup_ok(&src, &dst, &options);
        assert_eq!(
            new_tree_leftovers(&dst),
            Vec::<String>::new(),
            "{when}: the killed run's build directory outlived the re-run"
        );
        assert_mdbox_mirror(&dc, &dst, &want, round % 2 == 0, &when);
        fs::remove_dir_all(&dst).unwrap();
    }
}

/// A message in the Maildir SRC's INBOX `new/`, as a delivery would leave it (Dovecot
/// gives it its UID when it next opens the mailbox).
fn deliver(src: &Path, round: u32, i: u32) {
    let text = format!(
        "From: crash@example.org\nSubject: round {round} message {i}\n\
         Message-ID: <r{round}m{i}@example.org>\n\n{}\n",
        "body line of a new message\n".repeat(200 + (i as usize * 37) % 400)
    );
    let path = src
        .join("new")
        .join(format!("17950000{round:02}.M{i}P1.crash,S={}", text.len()));
    fs::write(&path, &text).unwrap();
    let (uid, gid) = vmail_ids();
    chown(&path, Some(uid), Some(gid)).unwrap();
}

/// Round `round`'s source changes: new mail in INBOX, flags set and cleared, expunges in
/// several mailboxes, and in some rounds a mailbox created, renamed or deleted (Dovecot
/// numbers and records everything).
fn change_source(dc: &Dovecot, src: &Path, round: u32) {
    for i in 0..60 {
        deliver(src, round, i);
    }
    let lo = 1 + round * 7;
    let range = format!("{lo}:{}", lo + 20);
    dc.flags_add(src, "INBOX", &range, "\\Seen $label1");
    dc.flags_remove(src, "Sent", &range, "\\Seen");
    dc.flags_add(src, "Lists/rust", &range, "\\Flagged");
    dc.expunge(src, "INBOX", &format!("{}:{}", lo + 2, lo + 5));
    dc.expunge(src, "Sent", &format!("{}:{}", lo, lo + 3));
    let archive = if round > 5 { "Old" } else { "Archive" };
    dc.expunge(src, archive, &format!("{lo}"));
    // Whole mailboxes: created with mail, renamed, a parent renamed with its child, deleted.
    match round {
        1 => {
            dc.create_mailbox(src, "Fresh");
            for i in 0..3 {
                let text = format!("Subject: fresh {i}\n\nfresh {i}\n");
                dc.save(src, "Fresh", text.as_bytes());
            }
        }
        3 => dc.rename_mailbox(src, "Fresh", "Fresher"),
        5 => dc.rename_mailbox(src, "Archive", "Old"),
        7 => dc.delete_mailbox(src, "Fresher"),
        _ => {}
    }
}

/// `backup --offline` updates of an existing mdbox tree (appends, flag changes, expunges,
/// mailbox creates, renames and deletes):
/// each round starts runs killed at delays that step through the run (from before its
/// writes begin until a run gets to finish), so kills land before, between and inside the
/// writes — and inside the repairs of the killed runs before — then a run to completion.
#[test]
fn killed_updates_of_an_mdbox_then_a_complete_run_leave_an_exact_mirror() {
    let dc = Dovecot::new();
    let src = corpus_source(&dc);
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &["--to-format", "mdbox", "--offline"]);
    let scratch = dc.path().join("measure");
    const ROUNDS: u32 = 10;
    let (mut kills, mut mid_write) = (0, 0);
    for round in 0..ROUNDS {
        change_source(&dc, &src, round);
        let want = dc.oracle(&src);
        // A full update's time, measured on a copy of DST.
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&dst)
            .arg(&scratch)
            .status()
            .unwrap();
        assert!(copied.success());
        let full = timed_run(&src, &scratch, &["--offline"]);
        fs::remove_dir_all(&scratch).unwrap();
        let step = (full / 10).max(Duration::from_millis(2));
        let mut delay = full / 3 + step.mul_f64(f64::from(round) / f64::from(ROUNDS));
        let mut killed_at = Vec::new();
        while run_and_kill(&src, &dst, &["--offline"], delay) && killed_at.len() < 40 {
            kills += 1;
            let pending = dst.join(".mdsync-pending").exists();
            mid_write += u32::from(pending);
            killed_at.push(format!("{delay:?}{}", if pending { "*" } else { "" }));
            delay += step;
        }
        let mut when = format!(
            "round {round}: full run {full:?}, killed at {} (* = mid-write)",
            killed_at.join(" ")
        );
        if round % 3 == 1 {
            // Dovecot opens the half-updated tree first (and writes its own index files).
            dc.oracle_in(&dst, Layout::Mdbox);
            when.push_str(", Dovecot opened DST");
        }
        let run = backup_ok(&src, &dst, &["--offline"]);
        assert_eq!(run.count("skipped"), 0, "{when}: {}", run.describe());
        assert_mdbox_mirror(&dc, &dst, &want, round % 2 == 1, &when);
        backup_ok(&src, &dst, &["--offline"]).assert_no_work();
    }
    assert!(
        mid_write > 0,
        "none of {kills} kills hit a run while it wrote: the test did not test"
    );
}
