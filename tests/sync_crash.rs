//! Crash safety of `mdsync sync`: runs SIGKILLed at points spread over a whole two-way run
//! (a union of two different trees whose UIDs all clash, and an incremental run with
//! changes on both sides), then a run to completion, must leave both sides equal as Dovecot
//! sees them, with every message of either side, no GUID twice in a mailbox and no
//! `mdsync-tmp.*` leftovers; a further run has nothing to do.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread::sleep;
use std::time::{Duration, Instant};

use support::corpus::write_corpus;
use support::tree::{leftover_temps, mail_files, read_uidlist};
use support::{Dovecot, mdsync};

const MESSAGES: usize = 150;

fn sync_ok(a: &Path, b: &Path) -> serde_json::Value {
    support::tree::sync_ok(a, b, &["--max-delete", "100%"])
}

/// Starts `mdsync sync A B`, SIGKILLs it after `delay` (if still running), reaps it.
fn run_and_kill(a: &Path, b: &Path, delay: Duration) {
    let mut child = mdsync()
        .args(["sync", "--no-progress", "--max-delete", "100%"])
        .arg(a)
        .arg(b)
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

#[test]
fn killed_syncs_then_a_complete_one_converge_without_loss_or_duplicates() {
    let dc = Dovecot::new();
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
    sync_ok(&a, &b);
    let full = started.elapsed();
    const ROUNDS: u32 = 6;
    for round in 0..ROUNDS {
        fresh();
        let first = (f64::from(round) + 0.5) / f64::from(ROUNDS);
        let second = f64::from((round * 5 + 2) % ROUNDS) / f64::from(ROUNDS);
        run_and_kill(&a, &b, full.mul_f64(first));
        run_and_kill(&a, &b, full.mul_f64(second));
        let when = format!("round {round}: killed at {first:.2} then {second:.2} of {full:?}");
        sync_ok(&a, &b);
        assert_converged(&dc, &a, &b, &want, &when);
        let again = sync_ok(&a, &b);
        assert_eq!(again["in_sync"], true, "{when}: {again}");
    }
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
        run_and_kill(&a, &b, full.mul_f64(0.2 + 0.3 * f64::from(round)));
        let when = format!("incremental round {round}");
        sync_ok(&a, &b);
        assert_converged(&dc, &a, &b, &want, &when);
    }
}
