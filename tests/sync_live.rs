//! `mdsync sync` against a live Dovecot: while Dovecot delivers mail to A and changes flags
//! on B, syncs run again and again; afterwards a final sync leaves both sides equal as
//! Dovecot sees them, with every delivered message present once — nothing delivered during
//! a sync is lost, nothing is duplicated.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use support::tree::sync_ok;
use support::{Dovecot, copy_tree, message};

const DELIVERIES: usize = 24;

/// Message-ID → how many times each side holds it.
fn message_ids(dc: &Dovecot, root: &Path) -> BTreeMap<String, usize> {
    let out = dc.doveadm(root, &["-f", "tab", "fetch", "hdr.message-id", "all"]);
    let mut ids = BTreeMap::new();
    for id in out.lines().skip(1) {
        *ids.entry(id.to_string()).or_default() += 1;
    }
    ids
}

#[test]
fn mail_delivered_and_flagged_during_syncs_is_never_lost_or_duplicated() {
    let dc = Dovecot::new();
    let a = dc.maildir("a");
    for n in 0..5 {
        dc.save(&a, "INBOX", &message(&format!("old{n}"), "old", 2));
    }
    let b = dc.maildir("b");
    copy_tree(&a, &b);
    sync_ok(&a, &b, &[]);
    let delivering = AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for n in 0..DELIVERIES {
                dc.save(&a, "INBOX", &message(&format!("live{n}"), "live", 3));
                let uid = (n % 5 + 1).to_string();
                let flag = if n % 2 == 0 { "\\Seen" } else { "\\Flagged" };
                dc.try_doveadm(&b, &["flags", "add", flag, "mailbox", "INBOX", "uid", &uid]);
            }
            delivering.store(false, Ordering::SeqCst);
        });
        let (mut runs, mut during) = (0, 0);
        while delivering.load(Ordering::SeqCst) || runs < 3 {
            during += usize::from(delivering.load(Ordering::SeqCst));
            sync_ok(&a, &b, &[]);
            runs += 1;
        }
        assert!(
            during >= 2,
            "only {during} syncs ran while Dovecot delivered"
        );
    });
    sync_ok(&a, &b, &[]);
    let oracle = dc.oracle(&a);
    assert_eq!(oracle, dc.oracle(&b), "A and B differ after the last sync");
    let ids = message_ids(&dc, &a);
    for n in 0..DELIVERIES {
        let id = format!("<live{n}@test.mdsync>");
        assert_eq!(ids.get(&id), Some(&1), "{id} on A:\n{oracle}");
    }
    assert_eq!(ids.len(), DELIVERIES + 5, "{oracle}");
    assert_eq!(ids, message_ids(&dc, &b));
    let again = sync_ok(&a, &b, &[]);
    assert_eq!(again["in_sync"], true, "{again}");
}
