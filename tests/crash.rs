//! Crash safety of `mdsync backup`: runs SIGKILLed at delays spread over a whole run (with
//! and without Dovecot opening the half-written destination before the re-run), then a run
//! to completion, must leave a destination Dovecot sees exactly like the source — no
//! duplicate messages, no unlisted files, no `mdsync-tmp.*` leftovers. Also: leftovers of a
//! killed run are removed by the next run even where it has nothing else to do.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, chown};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::corpus::{Corpus, write_corpus};
use support::tree::{
    assert_no_duplicate_guids, assert_same_lines, backup_ok, leftover_temps, mail_files,
    read_uidlist, run_and_kill, uidnexts, without_uidnext,
};
use support::{Dovecot, vmail_ids};

/// Messages in the crash corpus.
const MESSAGES: usize = 400;

/// A PID that cannot be running (above any `pid_max`), as a dead run's PID.
const DEAD_PID: u32 = 2_147_483_646;

/// The corpus as SRC, checked through Dovecot.
fn corpus_source(dc: &Dovecot) -> (PathBuf, Corpus) {
    let src = dc.path().join("src");
    let corpus = write_corpus(&src, MESSAGES, 7);
    let oracle = dc.oracle(&src);
    let listed = oracle.lines().filter(|l| l.starts_with("message ")).count();
    assert_eq!(
        listed, corpus.messages,
        "Dovecot reads the corpus:\n{oracle}"
    );
    (src, corpus)
}

/// Wall time of a complete run into a fresh destination (then removed).
fn full_run_time(dc: &Dovecot, src: &Path, options: &[&str]) -> Duration {
    let scratch = dc.path().join("measure");
    let started = Instant::now();
    backup_ok(src, &scratch, options);
    let took = started.elapsed();
    fs::remove_dir_all(&scratch).unwrap();
    took
}

/// The destination invariants after a complete run.
fn assert_clean_mirror(dc: &Dovecot, src: &Path, dst: &Path, when: &str) {
    let src_keys: BTreeSet<(PathBuf, String)> = mail_files(src)
        .iter()
        .map(|f| (f.mailbox.clone(), f.base().to_owned()))
        .collect();
    assert_same_bodies(src, dst, when);
    let mut seen: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    for f in mail_files(dst) {
        let base = f.base().to_owned();
        assert!(
            seen.entry(f.mailbox.clone())
                .or_default()
                .insert(base.clone()),
            "{when}: two files with base {base} in DST {}",
            f.mailbox.display()
        );
        let listed = read_uidlist(&dst.join(&f.mailbox))
            .is_some_and(|u| u.records.iter().any(|(_, b)| *b == base));
        assert!(
            listed || src_keys.contains(&(f.mailbox.clone(), base.clone())),
            "{when}: {} is neither in DST's uidlist nor on SRC",
            f.path.display()
        );
    }
    assert_eq!(
        leftover_temps(dst),
        Vec::<PathBuf>::new(),
        "{when}: mdsync-tmp.* leftovers on DST"
    );
    let got = dc.oracle(dst);
    assert_no_duplicate_guids(&got, when);
    assert_same_lines(
        &got,
        &dc.oracle(src),
        &format!("{when}: Dovecot's view of DST"),
    );
}

/// Every DST message file has the bytes of the SRC file with the same mailbox and base
/// name (a torn copy would keep its name, and Dovecot would serve it).
fn assert_same_bodies(src: &Path, dst: &Path, when: &str) {
    let src_files: BTreeMap<(PathBuf, String), PathBuf> = mail_files(src)
        .into_iter()
        .map(|f| ((f.mailbox.clone(), f.base().to_owned()), f.path))
        .collect();
    for f in mail_files(dst) {
        let key = (f.mailbox.clone(), f.base().to_owned());
        if let Some(src_path) = src_files.get(&key) {
            assert!(
                fs::read(&f.path).unwrap() == fs::read(src_path).unwrap(),
                "{when}: {} differs from {}",
                f.path.display(),
                src_path.display()
            );
        }
    }
}

#[test]
fn killed_runs_then_a_complete_run_leave_an_exact_mirror() {
    let dc = Dovecot::new();
    let (src, _) = corpus_source(&dc);
    let modes: [&[&str]; 2] = [&["--fsync", "batch"], &["--fsync", "file"]];
    let full: Vec<Duration> = modes.iter().map(|m| full_run_time(&dc, &src, m)).collect();
    let dst = dc.path().join("dst");
    // Each round starts from an empty DST. The first kill hits the initial run at a point
    // that steps through the whole run time from round to round; the second hits the re-run
    // over that half-written state at a scrambled point; then one run completes.
    const ROUNDS: u32 = 10;
    for round in 0..ROUNDS {
        let mode = (round % 2) as usize;
        let first = (f64::from(round) + 0.5) / f64::from(ROUNDS);
        let second = f64::from((round * 7 + 3) % ROUNDS) / f64::from(ROUNDS);
        if dst.exists() {
            fs::remove_dir_all(&dst).unwrap();
        }
        run_and_kill(&src, &dst, modes[mode], full[mode].mul_f64(first));
        run_and_kill(&src, &dst, modes[mode], full[mode].mul_f64(second));
        let when = format!(
            "round {round}: {:?} killed at {first:.2} then {second:.2} of {:?}",
            modes[mode], full[mode]
        );
        let run = backup_ok(&src, &dst, &[]);
        assert_eq!(run.count("skipped"), 0, "{when}: {}", run.describe());
        assert_clean_mirror(&dc, &src, &dst, &when);
    }
    backup_ok(&src, &dst, &[]).assert_no_work();
}

#[test]
fn dovecot_opening_a_half_written_mirror_does_not_break_the_rerun() {
    let dc = Dovecot::new();
    let (src, _) = corpus_source(&dc);
    let full = full_run_time(&dc, &src, &[]);
    let want = dc.oracle(&src);
    for step in 1..=6u32 {
        let dst = dc.path().join(format!("dst{step}"));
        run_and_kill(&src, &dst, &[], full.mul_f64(f64::from(step) / 7.0));
        if dst.exists() {
            dc.oracle(&dst); // Dovecot numbers whatever files it finds, writes its indexes
        }
        let when = format!("kill at {step}/7 of {full:?}, Dovecot opened DST, re-run");
        let run = backup_ok(&src, &dst, &["--max-delete", "100%"]);
        assert_eq!(run.count("skipped"), 0, "{when}: {}", run.describe());
        // Dovecot may have handed out UIDs on the half-written DST, and mdsync never lowers
        // a uidlist's next UID: uidnext may be higher on DST, everything else is equal.
        assert_same_bodies(&src, &dst, &when);
        let got = dc.oracle(&dst);
        assert_no_duplicate_guids(&got, &when);
        assert_same_lines(&without_uidnext(&got), &without_uidnext(&want), &when);
        let (want_next, got_next) = (uidnexts(&want), uidnexts(&got));
        for (mailbox, next) in &want_next {
            assert!(got_next[mailbox] >= *next, "{when}: {mailbox} uidnext");
        }
        assert_eq!(
            leftover_temps(&dst),
            Vec::<PathBuf>::new(),
            "{when}: leftovers"
        );
        fs::remove_dir_all(&dst).unwrap();
    }
}

/// Writes a file owned by vmail.
fn plant(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap();
    let (uid, gid) = vmail_ids();
    chown(path, Some(uid), Some(gid)).unwrap();
}

#[test]
fn leftovers_of_a_killed_run_are_removed_even_where_nothing_else_changes() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    // What a run killed by SIGKILL can leave: a staged body in a mailbox's tmp/, a half
    // written control file in the root's tmp/, a mailbox being deleted (moved into the
    // root's tmp/ as trash). The dead run's PID is in every name.
    let staged = dst
        .join(".Sent/tmp")
        .join(format!("mdsync-tmp.{DEAD_PID}.3"));
    plant(&staged, b"Subject: staged\n\nbody\n");
    let control = dst.join("tmp").join(format!("mdsync-tmp.{DEAD_PID}.9"));
    plant(&control, b"6b039518");
    let trash = dst
        .join("tmp")
        .join(format!("mdsync-tmp.trash.{DEAD_PID}.4"));
    fs::create_dir_all(trash.join("cur")).unwrap();
    plant(&trash.join("cur/1795396883.M1P1.x,S=5:2,S"), b"trash");
    let lock_temp = dst
        .join(".Archive/tmp")
        .join(format!("mdsync-tmp.lock.{DEAD_PID}.77"));
    plant(&lock_temp, format!("{DEAD_PID}:host").as_bytes());
    // A temp of a run that is still alive (this test process) must stay.
    let alive = dst
        .join(".Archive/tmp")
        .join(format!("mdsync-tmp.{}.1", std::process::id()));
    plant(&alive, b"in use");

    let run = backup_ok(&src, &dst, &[]);
    run.assert_no_work();
    let left: Vec<PathBuf> = leftover_temps(&dst)
        .into_iter()
        .filter(|p| dst.join(p) != alive)
        .collect();
    assert_eq!(
        left,
        Vec::<PathBuf>::new(),
        "a dead run's temps survived a complete run"
    );
    assert!(alive.exists(), "a live run's temp was removed");
    assert_eq!(fs::metadata(&alive).unwrap().uid(), vmail_ids().0);
    assert_same_lines(&dc.oracle(&dst), &dc.oracle(&src), "Dovecot's view of DST");
}

/// This machine's host name, as mdsync writes it into its lock files.
fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("host name")
        .trim()
        .to_owned()
}

#[test]
fn stale_uidlist_lock_of_a_killed_run_does_not_outlive_the_next_run() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    // A run SIGKILLed after writing Sent's uidlist but before releasing its lock leaves
    // `dovecot-uidlist.lock` naming its (dead) PID and this host, owned by root. While it
    // is there, Dovecot's STATUS reports Sent as empty with UIDVALIDITY 0.
    let lock = dst.join(".Sent/dovecot-uidlist.lock");
    fs::write(&lock, format!("{DEAD_PID}:{}", host_name())).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(10);
    fs::File::options()
        .write(true)
        .open(&lock)
        .and_then(|f| f.set_modified(old))
        .unwrap();

    let run = backup_ok(&src, &dst, &[]);
    run.assert_no_work();
    assert!(
        !lock.exists(),
        "a complete run left the dead run's {}",
        lock.display()
    );
    assert_same_lines(&dc.oracle(&dst), &dc.oracle(&src), "Dovecot's view of DST");
}

#[test]
fn mailbox_dir_left_by_a_run_killed_right_after_mkdir_gets_its_owner_and_mode() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    backup_ok(&src, &dst, &[]);
    dc.create_mailbox(&src, "Fresh");
    dc.save(&src, "Fresh", &support::message("fresh", "new folder", 2));
    // mdsync (as root) creates a mailbox directory, then chowns and chmods it: a SIGKILL in
    // between leaves it root-owned with the umask's mode, and nothing inside.
    let fresh = dst.join(".Fresh");
    fs::create_dir(&fresh).unwrap();
    fs::set_permissions(&fresh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    backup_ok(&src, &dst, &[]);
    let (uid, gid) = vmail_ids();
    let src_mode = fs::metadata(src.join(".Fresh")).unwrap().mode() & 0o7777;
    for dir in ["", "cur", "new", "tmp"] {
        let meta = fs::metadata(fresh.join(dir)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (uid, gid, src_mode),
            "owner and mode of {}",
            fresh.join(dir).display()
        );
    }
    assert_same_lines(&dc.oracle(&dst), &dc.oracle(&src), "Dovecot's view of DST");
}
