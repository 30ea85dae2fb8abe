//! Crash safety of `mdsync sync`: runs SIGKILLed at points spread over a whole two-way run
//! (a union of two different trees whose UIDs all clash, locally and with B over ssh, and
//! an incremental run with changes on both sides), then a run to completion, must leave
//! both sides equal as Dovecot sees them, with every message of either side, no GUID twice
//! in a mailbox and no `mdsync-tmp.*` leftovers; a further run has nothing to do.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread::sleep;
use std::time::{Duration, Instant};

use support::corpus::write_corpus;
use support::sshd::Sshd;
use support::tree::{leftover_temps, mail_files, read_uidlist};
use support::{Dovecot, mdsync};

const MESSAGES: usize = 150;

/// The command-line words naming A and B, B through ssh when `remote` is given.
fn sides(a: &Path, b: &Path, remote: Option<&Sshd>) -> Vec<String> {
    let (a, b) = (a.display().to_string(), b.display().to_string());
    match remote {
        None => vec![a, b],
        Some(sshd) => vec![
            "-e".into(),
            sshd.rsh(),
            "--remote-mdsync".into(),
            env!("CARGO_BIN_EXE_mdsync").into(),
            a,
            format!("{}:{b}", sshd.host()),
        ],
    }
}

fn sync_ok(a: &Path, b: &Path) -> serde_json::Value {
    support::tree::sync_ok(a, b, &["--max-delete", "100%"])
}

fn sync_ok_via(a: &Path, b: &Path, remote: Option<&Sshd>) -> serde_json::Value {
    let words = sides(a, b, remote);
    let mut args = vec!["sync", "--json", "--no-progress", "--max-delete", "100%"];
    args.extend(words.iter().map(String::as_str));
    let run = support::tree::run_mdsync(&args);
    run.assert_ok();
    run.json()
}

/// Starts `mdsync sync A B` (B through ssh when `remote` is given), SIGKILLs it after `delay` (if still running), reaps it.
fn run_and_kill(a: &Path, b: &Path, remote: Option<&Sshd>, delay: Duration) {
    let mut child = mdsync()
        .args(["sync", "--no-progress", "--max-delete", "100%"])
        .args(sides(a, b, remote))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mdsync");
    sleep(delay);
    let _ = child.kill();
    let status = child.wait().expect("reap mdsync");
    assert!(
        status.code().is_none_or(|c| c == 0),
        "a run that was not killed must succeed: {status}"
    );
}

/// (mailbox dir, base name) of every message file.
fn keys(root: &Path) -> BTreeSet<(PathBuf, String)> {
    mail_files(root)
        .iter()
        .map(|f| (f.mailbox.clone(), f.base().to_owned()))
        .collect()
}

fn assert_converged(
    dc: &Dovecot,
    a: &Path,
    b: &Path,
    want: &BTreeSet<(PathBuf, String)>,
    when: &str,
) {
    let (oa, ob) = (dc.oracle(a), dc.oracle(b));
    assert_eq!(oa, ob, "{when}: A and B differ as Dovecot sees them");
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in oa.lines().filter(|l| l.starts_with("message ")) {
        let (mailbox, rest) = line["message ".len()..].split_once(" uid=").unwrap();
        let guid = rest
            .split(' ')
            .find_map(|f| f.strip_prefix("guid="))
            .unwrap();
        assert!(
            seen.entry(mailbox.to_owned())
                .or_default()
                .insert(guid.to_owned()),
            "{when}: GUID {guid} twice in {mailbox}"
        );
    }
    for root in [a, b] {
        assert_eq!(&keys(root), want, "{when}: messages of {}", root.display());
        assert_eq!(
            leftover_temps(root),
            Vec::<PathBuf>::new(),
            "{when}: leftovers"
        );
    }
}

/// Rounds of a union of two different trees (every UID clashes), each killed twice at
/// points spread over a whole run, then completed.
fn killed_union_rounds(dc: &Dovecot, remote: Option<&Sshd>, rounds: u32) -> Duration {
    let (a, b) = (dc.path().join("a"), dc.path().join("b"));
    let fresh = || {
        for root in [&a, &b] {
            if root.exists() {
                fs::remove_dir_all(root).unwrap();
            }
        }
        write_corpus(&a, MESSAGES, 7);
        write_corpus(&b, MESSAGES, 8);
    };
    fresh();
    let want: BTreeSet<_> = keys(&a).union(&keys(&b)).cloned().collect();
    let started = Instant::now();
    sync_ok_via(&a, &b, remote);
    let full = started.elapsed();
    for round in 0..rounds {
        fresh();
        let first = (f64::from(round) + 0.5) / f64::from(rounds);
        let second = f64::from((round * 5 + 2) % rounds) / f64::from(rounds);
        run_and_kill(&a, &b, remote, full.mul_f64(first));
        run_and_kill(&a, &b, remote, full.mul_f64(second));
        let when = format!("round {round}: killed at {first:.2} then {second:.2} of {full:?}");
        sync_ok_via(&a, &b, remote);
        assert_converged(dc, &a, &b, &want, &when);
        let again = sync_ok_via(&a, &b, remote);
        assert_eq!(again["in_sync"], true, "{when}: {again}");
    }
    full
}

#[test]
fn killed_syncs_over_ssh_converge_without_loss_or_duplicates() {
    let sshd = Sshd::start();
    let dc = Dovecot::new();
    killed_union_rounds(&dc, Some(&sshd), 4);
}

#[test]
fn killed_syncs_then_a_complete_one_converge_without_loss_or_duplicates() {
    let dc = Dovecot::new();
    let (a, b) = (dc.path().join("a"), dc.path().join("b"));
    let full = killed_union_rounds(&dc, None, 6);
    // Incremental: changes on both sides against a base, killed, completed.
    for round in 0..3u32 {
        dc.save(
            &a,
            "INBOX",
            &support::message(&format!("na{round}"), "new on a", 3),
        );
        dc.save(
            &b,
            "INBOX",
            &support::message(&format!("nb{round}"), "new on b", 3),
        );
        dc.flags_add(&a, "INBOX", "1:*", "\\Seen");
        let (uid, base) = read_uidlist(&b).unwrap().records[0].clone();
        dc.expunge(&b, "INBOX", &uid.to_string());
        let mut want: BTreeSet<_> = keys(&a).union(&keys(&b)).cloned().collect();
        assert!(
            want.remove(&(PathBuf::new(), base)),
            "expunged message was on A"
        );
        run_and_kill(&a, &b, None, full.mul_f64(0.2 + 0.3 * f64::from(round)));
        let when = format!("incremental round {round}");
        sync_ok(&a, &b);
        assert_converged(&dc, &a, &b, &want, &when);
    }
}
