//! Property test of `mdsync sync` with Dovecot as the oracle: random operations through
//! doveadm (deliver, flag, unflag, keyword, move between folders, expunge, create, rename,
//! delete folder) on both replicas of a synced pair, then one sync: both replicas equal as
//! Dovecot sees them, no message new since the last sync lost, no GUID twice in a
//! mailbox, and a second sync with nothing to do. (The pure merge has its own, much larger
//! property test without Dovecot, in `sync::merge`.)

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proptest::prelude::*;
use support::{Dovecot, copy_tree, message};

const FOLDERS: [&str; 4] = ["INBOX", "Archive", "Work", "Lists"];
const FLAGS: [&str; 5] = ["\\Seen", "\\Answered", "\\Flagged", "$Todo", "$Later"];

#[derive(Debug, Clone)]
enum Op {
    Deliver(usize),
    FlagAdd(usize, u32, usize),
    FlagRemove(usize, u32, usize),
    Expunge(usize, u32),
    Move(usize, usize, u32),
    Create(usize),
    Rename(usize, usize),
    Delete(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let folder = 0..FOLDERS.len();
    let uid = 1u32..6;
    prop_oneof![
        3 => folder.clone().prop_map(Op::Deliver),
        3 => (folder.clone(), uid.clone(), 0..FLAGS.len()).prop_map(|(f, u, k)| Op::FlagAdd(f, u, k)),
        2 => (folder.clone(), uid.clone(), 0..FLAGS.len()).prop_map(|(f, u, k)| Op::FlagRemove(f, u, k)),
        2 => (folder.clone(), uid.clone()).prop_map(|(f, u)| Op::Expunge(f, u)),
        2 => (folder.clone(), folder.clone(), uid).prop_map(|(f, t, u)| Op::Move(f, t, u)),
        1 => folder.clone().prop_map(Op::Create),
        1 => (folder.clone(), 0usize..2).prop_map(|(f, n)| Op::Rename(f, n)),
        1 => folder.prop_map(Op::Delete),
    ]
}

/// Applies one operation through doveadm; operations that do not apply (a UID or folder
/// that does not exist) change nothing, as for an IMAP client.
fn apply(dc: &Dovecot, root: &Path, op: &Op, serial: &mut u32) {
    let run = |args: &[&str]| {
        dc.try_doveadm(root, args);
    };
    match op {
        Op::Deliver(f) => {
            *serial += 1;
            let id = format!("{}-{serial}", root.file_name().unwrap().to_string_lossy());
            run(&["mailbox", "create", FOLDERS[*f]]);
            dc.save(root, FOLDERS[*f], &message(&id, "prop", 2));
        }
        Op::FlagAdd(f, uid, k) | Op::FlagRemove(f, uid, k) => {
            let verb = if matches!(op, Op::FlagAdd(..)) {
                "add"
            } else {
                "remove"
            };
            run(&[
                "flags",
                verb,
                FLAGS[*k],
                "mailbox",
                FOLDERS[*f],
                "uid",
                &uid.to_string(),
            ]);
        }
        Op::Expunge(f, uid) => run(&["expunge", "mailbox", FOLDERS[*f], "uid", &uid.to_string()]),
        Op::Move(f, to, uid) => {
            if f != to {
                run(&[
                    "move",
                    FOLDERS[*to],
                    "mailbox",
                    FOLDERS[*f],
                    "uid",
                    &uid.to_string(),
                ]);
            }
        }
        Op::Create(f) => run(&["mailbox", "create", FOLDERS[*f]]),
        Op::Rename(f, n) => {
            if *f != 0 {
                run(&["mailbox", "rename", FOLDERS[*f], ["Renamed", "Moved"][*n]]);
            }
        }
        Op::Delete(f) => {
            if *f != 0 {
                run(&["mailbox", "delete", "-s", FOLDERS[*f]]);
            }
        }
    }
}

/// Message-ID → mailboxes holding it, over the whole tree.
fn message_ids(dc: &Dovecot, root: &Path) -> BTreeMap<String, Vec<String>> {
    let out = dc.doveadm(
        root,
        &["-f", "tab", "fetch", "mailbox hdr.message-id", "all"],
    );
    let mut ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in out.lines().skip(1) {
        if let Some((mailbox, id)) = line.split_once('\t') {
            ids.entry(id.to_string())
                .or_default()
                .push(mailbox.to_string());
        }
    }
    ids
}

fn sync(a: &Path, b: &Path) -> serde_json::Value {
    support::tree::sync_ok(a, b, &["--max-delete", "100%"])
}

fn check(a_ops: &[Op], b_ops: &[Op]) {
    let dc = Dovecot::new();
    let a = dc.maildir("a");
    for n in 1..=3 {
        dc.save(&a, "INBOX", &message(&format!("start{n}"), "start", 2));
    }
    dc.create_mailbox(&a, "Archive");
    dc.save(&a, "Archive", &message("start-archive", "start", 2));
    let b = dc.maildir("b");
    copy_tree(&a, &b);
    sync(&a, &b);
    let base: BTreeSet<String> = message_ids(&dc, &a).into_keys().collect();
    let mut serial = 0;
    for op in a_ops {
        apply(&dc, &a, op, &mut serial);
    }
    for op in b_ops {
        apply(&dc, &b, op, &mut serial);
    }
    let mut new_ids: BTreeSet<String> = message_ids(&dc, &a).into_keys().collect();
    new_ids.extend(message_ids(&dc, &b).into_keys());
    new_ids.retain(|id| !base.contains(id));
    sync(&a, &b);
    let oracle = dc.oracle(&a);
    assert_eq!(oracle, dc.oracle(&b), "A and B differ after the sync");
    let after = message_ids(&dc, &a);
    for id in &new_ids {
        assert!(
            after.contains_key(id),
            "message {id} new since the last sync was lost:\n{oracle}"
        );
    }
    let mut seen = BTreeSet::new();
    for line in oracle.lines().filter_map(|l| l.strip_prefix("message ")) {
        let (mailbox, rest) = line.split_once(" uid=").unwrap();
        let guid = rest
            .split(' ')
            .find_map(|f| f.strip_prefix("guid="))
            .unwrap();
        assert!(
            seen.insert((mailbox.to_string(), guid.to_string())),
            "GUID {guid} twice in {mailbox}"
        );
    }
    let again = sync(&a, &b);
    assert_eq!(again["in_sync"], true, "second sync did work: {again}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_doveadm_changes_on_both_sides_sync_to_equal_replicas(
        a_ops in proptest::collection::vec(op(), 0..7),
        b_ops in proptest::collection::vec(op(), 0..7),
    ) {
        check(&a_ops, &b_ops);
    }
}
