//! Merge rules on in-memory replicas, and a property test: random operations on two
//! replicas of a synced pair, merge, carry both plans out on the tables (with
//! `sync::predict`), and the two sides are equal, lose no new message, duplicate none, and
//! a second merge has nothing to do.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::model::MailboxGuid;
use crate::storage::maildir::filename;
use crate::storage::maildir::layout::Layout;
use crate::sync::plan::MailboxPlan;
use crate::sync::predict::predict;

/// One message of the model: GUID (also the base name), system flags, keyword names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg {
    guid: String,
    system: u32,
    keywords: BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct ModelBox {
    guid: u128,
    uid_validity: u32,
    next: u32,
    msgs: BTreeMap<u32, Msg>,
}

/// A replica as Dovecot would hold it: mailbox name → mailbox.
#[derive(Debug, Clone, Default)]
struct Model {
    boxes: BTreeMap<String, ModelBox>,
    /// Keyword letters assigned in reverse name order (B) to exercise translation.
    reverse_keywords: bool,
    delivered: u32,
    side: char,
}

fn dir_of(name: &str) -> String {
    if name == "INBOX" {
        String::new()
    } else {
        format!(".{name}")
    }
}

impl Model {
    fn table(&self) -> MailTable {
        let mut mailboxes: Vec<MailboxTable> = self
            .boxes
            .iter()
            .map(|(name, b)| self.mailbox_table(name, b))
            .collect();
        mailboxes.sort_by(|x, y| x.dir.cmp(&y.dir));
        MailTable {
            layout: Layout::MaildirPlusPlus,
            mailboxes,
            parents: Vec::new(),
            unfollowed: Vec::new(),
            subscriptions: None,
            uidvalidity_next: Some(2000),
            root_meta: Default::default(),
            scanned_at_ns: 0,
            anomalies: Vec::new(),
        }
    }

    fn mailbox_table(&self, name: &str, b: &ModelBox) -> MailboxTable {
        let mut names: Vec<&String> = b.msgs.values().flat_map(|m| &m.keywords).collect();
        names.sort();
        names.dedup();
        if self.reverse_keywords {
            names.reverse();
        }
        let mut keywords = KeywordMap::default();
        for n in names {
            keywords.assign(n);
        }
        let mut t = MailboxTable {
            dir: dir_of(name),
            name: name.to_string(),
            header: Some(Header {
                uid_validity: b.uid_validity,
                next_uid: b.next,
                guid: Some(MailboxGuid(b.guid.to_le_bytes())),
                extra: String::new(),
            }),
            next_uid: b.next,
            keywords: keywords.clone(),
            settled: true,
            ..MailboxTable::default()
        };
        for (&uid, m) in &b.msgs {
            let mut flags = Flags {
                system: m.system,
                keywords: 0,
            };
            for k in &m.keywords {
                flags.keywords |= 1 << keywords.index_of(k).unwrap();
            }
            let file = filename::compose(&m.guid, flags, false);
            t.push(uid, &file, m.guid.len(), flags, 100, None, 0);
        }
        t
    }

    fn deliver(&mut self, name: &str, guid: String) {
        if let Some(b) = self.boxes.get_mut(name) {
            b.msgs.insert(
                b.next,
                Msg {
                    guid,
                    system: 0,
                    keywords: BTreeSet::new(),
                },
            );
            b.next += 1;
        }
    }

    fn nth_box(&self, k: usize) -> String {
        self.boxes.keys().nth(k % self.boxes.len()).unwrap().clone()
    }

    fn nth_msg(&self, name: &str, k: usize) -> Option<u32> {
        let b = &self.boxes[name];
        (!b.msgs.is_empty()).then(|| *b.msgs.keys().nth(k % b.msgs.len()).unwrap())
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Deliver(k) => {
                let name = self.nth_box(k);
                self.delivered += 1;
                let guid = format!("{}{}", self.side, self.delivered);
                self.deliver(&name, guid);
            }
            Op::Flag(k, m, bit) => {
                let name = self.nth_box(k);
                if let Some(uid) = self.nth_msg(&name, m) {
                    let msg = self
                        .boxes
                        .get_mut(&name)
                        .unwrap()
                        .msgs
                        .get_mut(&uid)
                        .unwrap();
                    match bit {
                        0..=3 => msg.system ^= 1 << [3u32, 5, 17, 18][bit as usize],
                        _ => {
                            let kw = ["$Work", "$Later"][(bit as usize) % 2].to_string();
                            if !msg.keywords.remove(&kw) {
                                msg.keywords.insert(kw);
                            }
                        }
                    }
                }
            }
            Op::Expunge(k, m) => {
                let name = self.nth_box(k);
                if let Some(uid) = self.nth_msg(&name, m) {
                    self.boxes.get_mut(&name).unwrap().msgs.remove(&uid);
                }
            }
            Op::Move(k, to, m) => {
                let (from, to) = (self.nth_box(k), self.nth_box(to));
                if from != to
                    && let Some(uid) = self.nth_msg(&from, m)
                {
                    let msg = self
                        .boxes
                        .get_mut(&from)
                        .unwrap()
                        .msgs
                        .remove(&uid)
                        .unwrap();
                    self.deliver(&to, msg.guid);
                }
            }
            Op::Create(n, seed) => {
                let name = ["Work", "Lists", "Old"][n % 3].to_string();
                self.boxes.entry(name).or_insert(ModelBox {
                    // Unique per name: two mailboxes with one GUID are a copied directory.
                    guid: u128::from(seed) << 64
                        | ((n % 3) as u128) << 32
                        | u128::from(self.side as u32),
                    uid_validity: 1000 + seed,
                    next: 1,
                    msgs: BTreeMap::new(),
                });
            }
            Op::Rename(k, n) => {
                let from = self.nth_box(k);
                let to = ["Renamed", "Moved", "Work"][n % 3].to_string();
                if from != "INBOX" && !self.boxes.contains_key(&to) {
                    let b = self.boxes.remove(&from).unwrap();
                    self.boxes.insert(to, b);
                }
            }
            Op::Delete(k) => {
                let name = self.nth_box(k);
                if name != "INBOX" {
                    self.boxes.remove(&name);
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Deliver(usize),
    Flag(usize, usize, u8),
    Expunge(usize, usize),
    Move(usize, usize, usize),
    Create(usize, u32),
    Rename(usize, usize),
    Delete(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<usize>().prop_map(Op::Deliver),
        4 => (any::<usize>(), any::<usize>(), 0u8..6).prop_map(|(a, b, c)| Op::Flag(a, b, c)),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Expunge(a, b)),
        2 => (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(a, b, c)| Op::Move(a, b, c)),
        1 => (any::<usize>(), 1u32..50).prop_map(|(a, b)| Op::Create(a, b)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => any::<usize>().prop_map(Op::Delete),
    ]
}

/// The starting point both replicas share.
fn initial(messages: u32) -> Model {
    let mut m = Model {
        side: 's',
        ..Model::default()
    };
    for (i, name) in ["INBOX", "Archive", "Sent"].iter().enumerate() {
        m.boxes.insert(
            name.to_string(),
            ModelBox {
                guid: 77 + i as u128,
                uid_validity: 500 + i as u32,
                next: 1,
                msgs: BTreeMap::new(),
            },
        );
        for n in 0..messages {
            m.deliver(name, format!("s{i}x{n}"));
        }
    }
    m
}

/// Carries a plan out on a table, as the applier would leave the tree (a rescan's table).
fn carry_out(t: &MailTable, plan: &Plan) -> MailTable {
    let mut boxes: BTreeMap<String, MailboxTable> = t
        .mailboxes
        .iter()
        .map(|m| (m.dir.clone(), m.clone()))
        .collect();
    for r in &plan.rename_mailboxes {
        assert!(!boxes.contains_key(&r.to_dir), "rename onto {}", r.to_dir);
        let mut m = boxes.remove(&r.from_dir).expect("renamed mailbox exists");
        m.dir = r.to_dir.clone();
        m.name = r.name.clone();
        boxes.insert(r.to_dir.clone(), m);
    }
    for mp in &plan.mailboxes {
        let before = match boxes.get(&mp.dir) {
            Some(m) => m.clone(),
            None => {
                assert!(mp.create.is_some(), "plan for a missing mailbox {}", mp.dir);
                MailboxTable {
                    dir: mp.dir.clone(),
                    name: mp.name.clone(),
                    ..MailboxTable::default()
                }
            }
        };
        let mut after = predict(&before, mp);
        after.dir = mp.dir.clone();
        after.name = mp.name.clone();
        after.settled = true;
        boxes.insert(mp.dir.clone(), after);
    }
    for d in &plan.delete_mailboxes {
        boxes.remove(&d.dir);
    }
    MailTable {
        mailboxes: boxes.into_values().collect(),
        subscriptions: plan
            .subscriptions
            .clone()
            .unwrap_or(t.subscriptions.clone()),
        ..t.clone()
    }
}

type View = BTreeMap<
    String,
    (
        u32,
        Option<MailboxGuid>,
        u32,
        BTreeMap<u32, (String, u32, BTreeSet<String>)>,
    ),
>;

/// What Dovecot would show: per mailbox name, UIDVALIDITY, GUID, UIDNEXT and per UID the
/// GUID, system flags and keyword names.
fn view(t: &MailTable) -> View {
    t.mailboxes
        .iter()
        .map(|m| {
            let h = m.header.clone().unwrap_or_default();
            let msgs = (0..m.len())
                .map(|i| {
                    let f = m.msgs.flags[i];
                    let kws = (0..26)
                        .filter(|&k| f.keywords & (1 << k) != 0)
                        .map(|k| m.keywords.name(k).unwrap_or("?").to_string())
                        .collect();
                    (m.msgs.uid[i], (m.guid(i).to_string(), f.system, kws))
                })
                .collect();
            (m.name.clone(), (h.uid_validity, h.guid, m.next_uid, msgs))
        })
        .collect()
}

/// Per UID: the message's GUID, system flags and keyword names.
type Messages = BTreeMap<u32, (String, u32, BTreeSet<String>)>;

/// Per mailbox GUID (the name when there is none): the mailbox's name and its messages as
/// [`view`] shows them.
fn by_mailbox(t: &MailTable) -> BTreeMap<String, (String, Messages)> {
    view(t)
        .into_iter()
        .map(|(name, (_, guid, _, msgs))| {
            let key = guid.map_or_else(|| name.clone(), |g| format!("{:?}", g.0));
            (key, (name, msgs))
        })
        .collect()
}

fn guids(t: &MailTable) -> BTreeSet<String> {
    t.mailboxes
        .iter()
        .flat_map(|m| (0..m.len()).map(move |i| m.guid(i).to_string()))
        .collect()
}

/// The plan's work in Archive.
fn archive_plan(plan: &Plan) -> &MailboxPlan {
    plan.mailboxes.iter().find(|m| m.dir == ".Archive").unwrap()
}

/// Merges without content answers and with the default options.
fn merge_plain(base: &BaseState, a: &MailTable, b: &MailTable) -> Merged {
    merge(base, a, b, &HashAnswers::new(), &DiffOptions::default())
}

/// Merges, carries both plans out, and returns both sides afterwards and the next base.
fn sync_round(base: &BaseState, a: &MailTable, b: &MailTable) -> (MailTable, MailTable, Merged) {
    let merged = merge_plain(base, a, b);
    let a2 = carry_out(a, &merged.plan_a);
    let b2 = carry_out(b, &merged.plan_b);
    (a2, b2, merged)
}

/// The synced start of both replicas (its table and base), and each side's table after
/// its operations.
fn changed_pair(a_ops: &[Op], b_ops: &[Op]) -> (MailTable, BaseState, MailTable, MailTable) {
    let start = initial(3);
    let t0 = start.table();
    let (_, _, first) = sync_round(&BaseState::default(), &t0, &t0);
    assert!(first.plan_a.is_empty(), "{:?}", first.plan_a.lines());
    assert!(first.plan_b.is_empty(), "{:?}", first.plan_b.lines());
    let (mut ma, mut mb) = (start.clone(), start);
    ma.side = 'a';
    mb.side = 'b';
    mb.reverse_keywords = true;
    for op in a_ops {
        ma.apply(op);
    }
    for op in b_ops {
        mb.apply(op);
    }
    (t0, first.next, ma.table(), mb.table())
}

fn check_pair(a_ops: &[Op], b_ops: &[Op]) -> Result<(), TestCaseError> {
    let (t0, base, ta, tb) = changed_pair(a_ops, b_ops);
    let (a2, b2, merged) = sync_round(&base, &ta, &tb);
    check_converged(&t0, (&ta, &tb), (&a2, &b2), &merged)
}

/// After a merge of `ta` and `tb` (changed from `t0`) carried out as `a2` and `b2`: both
/// sides equal, no GUID twice in a mailbox, no new message lost, none held by both sides
/// dropped, and a second merge has nothing to do.
fn check_converged(
    t0: &MailTable,
    (ta, tb): (&MailTable, &MailTable),
    (a2, b2): (&MailTable, &MailTable),
    merged: &Merged,
) -> Result<(), TestCaseError> {
    let (va, vb) = (view(a2), view(b2));
    prop_assert_eq!(&va, &vb, "sides differ after the sync");
    // No GUID twice in a mailbox.
    for (name, (_, _, _, msgs)) in &va {
        let set: BTreeSet<&String> = msgs.values().map(|m| &m.0).collect();
        prop_assert_eq!(set.len(), msgs.len(), "duplicate GUID in {}", name);
    }
    // Every message new since the base survives somewhere.
    let known = guids(t0);
    let after = guids(a2);
    for g in guids(ta).union(&guids(tb)) {
        prop_assert!(
            known.contains(g) || after.contains(g),
            "new message {} lost",
            g
        );
    }
    // A message both sides still hold the same way (same mailbox, by its GUID as the merge
    // pairs mailboxes, not by name: a name can mean another mailbox on each side after
    // renames) is kept.
    let (before_a, before_b, after_a) = (by_mailbox(ta), by_mailbox(tb), by_mailbox(a2));
    for (mailbox, (name, msgs)) in &before_a {
        let Some((_, other)) = before_b.get(mailbox) else {
            continue;
        };
        for (uid, m) in msgs {
            if other.get(uid).is_some_and(|o| o.0 == m.0) {
                let kept = after_a
                    .get(mailbox)
                    .and_then(|b| b.1.get(uid))
                    .is_some_and(|k| k.0 == m.0);
                prop_assert!(kept, "{} uid {} held by both sides was dropped", name, uid);
            }
        }
    }
    // A second merge right away has nothing to do.
    let again = merge_plain(&merged.next, a2, b2);
    prop_assert!(
        again.plan_a.is_empty(),
        "second sync plans on A: {:?}",
        again.plan_a.lines()
    );
    prop_assert!(
        again.plan_b.is_empty(),
        "second sync plans on B: {:?}",
        again.plan_b.lines()
    );
    prop_assert_eq!(&again.next, &merged.next);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_changes_on_both_sides_merge_to_equal_replicas(
        a_ops in proptest::collection::vec(op(), 0..12),
        b_ops in proptest::collection::vec(op(), 0..12),
    ) {
        check_pair(&a_ops, &b_ops)?;
    }

    #[test]
    fn a_run_killed_part_way_converges_on_the_next(
        a_ops in proptest::collection::vec(op(), 0..12),
        b_ops in proptest::collection::vec(op(), 0..12),
        a_kill in any::<(u64, u64)>(),
        b_kill in any::<(u64, u64)>(),
    ) {
        check_killed_run(&a_ops, &b_ops, a_kill, b_kill)?;
    }
}

#[test]
fn flags_merge_per_bit_against_the_base() {
    let f = |system| Flags {
        system,
        keywords: 0,
    };
    // base {S}; A removes S; B adds R: {R}.
    assert_eq!(merge_flags(f(0b10), f(0b00), f(0b11)), f(0b01));
    // both add the same bit; neither touches another.
    assert_eq!(merge_flags(f(0b100), f(0b101), f(0b101)), f(0b101));
}

#[test]
fn the_same_uid_for_different_messages_is_renumbered_on_both_sides() {
    let start = initial(2);
    let (_, _, first) = sync_round(&BaseState::default(), &start.table(), &start.table());
    let (mut ma, mut mb) = (start.clone(), start);
    ma.side = 'a';
    mb.side = 'b';
    ma.apply(&Op::Deliver(0));
    mb.apply(&Op::Deliver(0));
    let (a2, b2, merged) = sync_round(&first.next, &ma.table(), &mb.table());
    assert_eq!(view(&a2), view(&b2));
    let archive = &view(&a2)["Archive"].3;
    assert_eq!(
        archive.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 4, 5]
    );
    assert_eq!(archive[&4].0, "a1");
    assert_eq!(archive[&5].0, "b1");
    let kinds: Vec<ConflictKind> = merged.conflicts.iter().map(|c| c.kind).collect();
    assert!(kinds.contains(&ConflictKind::UidRenumbered), "{kinds:?}");
    // A's copy of a1 keeps its file: renumbered in the uidlist, not copied.
    let plan = archive_plan(&merged.plan_a);
    assert_eq!(plan.copies.len(), 1, "only b1 is copied to A");
}

#[test]
fn a_mailbox_renamed_on_one_side_is_renamed_not_copied() {
    let start = initial(2);
    let (_, _, first) = sync_round(&BaseState::default(), &start.table(), &start.table());
    let mut ma = start.clone();
    ma.apply(&Op::Rename(0, 0)); // Archive → Renamed
    let (a2, b2, merged) = sync_round(&first.next, &ma.table(), &start.table());
    assert_eq!(view(&a2), view(&b2));
    assert_eq!(merged.plan_b.rename_mailboxes.len(), 1);
    assert!(merged.plan_b.mailboxes.iter().all(|m| m.copies.is_empty()));
    assert!(merged.plan_b.delete_mailboxes.is_empty());
}

#[test]
fn a_mailbox_deleted_on_one_side_with_new_mail_on_the_other_is_kept() {
    let start = initial(1);
    let (_, _, first) = sync_round(&BaseState::default(), &start.table(), &start.table());
    let (mut ma, mut mb) = (start.clone(), start);
    ma.apply(&Op::Delete(0)); // Archive
    mb.side = 'b';
    mb.apply(&Op::Deliver(0));
    let (a2, b2, merged) = sync_round(&first.next, &ma.table(), &mb.table());
    assert_eq!(view(&a2), view(&b2));
    assert_eq!(view(&a2)["Archive"].3.len(), 2);
    assert_eq!(merged.conflicts[0].kind, ConflictKind::DeleteRefused);
    // Without new mail the delete goes through.
    let mut mc = initial(1);
    mc.apply(&Op::Delete(0));
    let (a3, b3, _) = sync_round(&first.next, &mc.table(), &initial(1).table());
    assert!(!view(&a3).contains_key("Archive") && !view(&b3).contains_key("Archive"));
}

#[test]
fn subscriptions_merge_by_name() {
    let base = b"V\t2\n\nA\nB\n".as_slice();
    let a = b"V\t2\n\nA\nB\nC\n".as_slice();
    let b = b"V\t2\n\nB\n".as_slice();
    assert_eq!(
        merge_subscriptions(Some(base), Some(a), Some(b)).unwrap(),
        b"V\t2\n\nB\nC\n"
    );
    assert_eq!(
        merge_subscriptions(Some(base), Some(base), Some(b)).unwrap(),
        b
    );
}

#[test]
fn a_side_restored_from_an_older_copy_expunges_nothing() {
    let start = initial(2);
    let (_, _, first) = sync_round(&BaseState::default(), &start.table(), &start.table());
    let mut later = start.clone();
    later.side = 'b';
    later.apply(&Op::Deliver(0));
    later.apply(&Op::Deliver(1));
    let (a1, b1, second) = sync_round(&first.next, &start.table(), &later.table());
    assert_eq!(view(&a1), view(&b1));
    // A comes back from a copy older than the last sync: its next UIDs are lower.
    let (a2, b2, third) = sync_round(&second.next, &start.table(), &b1);
    assert_eq!(view(&a2), view(&b2));
    assert_eq!(view(&b2), view(&b1), "nothing of B's expunged");
    assert!(third.plan_b.mailboxes.iter().all(|m| m.expunges.is_empty()));
    // The stale entries are named, so that the stored base loses them before any apply.
    assert!(!third.untrusted_base.is_empty());
    for dir in &third.untrusted_base {
        assert!(
            second.next.mailbox(dir).is_some(),
            "{dir} is a base mailbox"
        );
    }
    assert!(
        second.untrusted_base.is_empty(),
        "a current base is trusted"
    );
}

#[test]
fn renumbered_uids_are_reported_as_ranges() {
    assert_eq!(uid_ranges(&[3, 4, 5, 9, 11, 12]), "3:5,9,11:12");
    let many: Vec<u32> = (0..30).map(|n| n * 2).collect();
    assert!(uid_ranges(&many).ends_with(",…"));
}

/// `t` with message `uid` of mailbox `dir` gone from the listing but still named by the
/// uidlist, as a scan that raced a rename by Dovecot sees it; `settled` as the scan found.
fn missed_by_readdir(t: &MailTable, dir: &str, uid: u32, settled: bool) -> MailTable {
    let mut out = t.clone();
    let m = out.mailboxes.iter_mut().find(|m| m.dir == dir).unwrap();
    let base = m.base(m.find_uid(uid).unwrap()).to_string();
    *m = m.with_file_missed(&base, settled);
    out
}

#[test]
fn a_file_missed_while_the_mailbox_moved_is_neither_expunged_nor_copied_back() {
    let start = initial(2);
    let t0 = start.table();
    let (_, _, first) = sync_round(&BaseState::default(), &t0, &t0);
    // B's listing raced a rename of Archive's UID 2 (still in B's uidlist): not an expunge.
    let b = missed_by_readdir(&t0, ".Archive", 2, false);
    let merged = merge_plain(&first.next, &t0, &b);
    assert!(merged.plan_a.is_empty(), "{:?}", merged.plan_a.lines());
    assert!(merged.plan_b.is_empty(), "{:?}", merged.plan_b.lines());
    assert_eq!(merged.next, first.next, "the base still speaks for Archive");
    // Without a base either: A's copy is not brought to B beside the file B has.
    let none = merge_plain(&BaseState::default(), &t0, &b);
    assert!(none.plan_b.is_empty(), "{:?}", none.plan_b.lines());
    // Once B's mailbox is read settled, the record without a file is a real expunge.
    let settled = missed_by_readdir(&t0, ".Archive", 2, true);
    let merged = merge_plain(&first.next, &t0, &settled);
    let archive = archive_plan(&merged.plan_a);
    assert_eq!(archive.expunges.len(), 1, "{:?}", merged.plan_a.lines());
}

/// [`carry_out`] of the plan's mailbox renames and only the mailbox plans whose bit is set
/// in `mask` (deletes with bit 63): a run killed part-way through this side.
fn carry_out_part(t: &MailTable, plan: &Plan, mask: u64) -> MailTable {
    let part = Plan {
        mailboxes: plan
            .mailboxes
            .iter()
            .enumerate()
            .filter(|&(k, _)| mask & (1 << (k % 63)) != 0)
            .map(|(_, m)| m.clone())
            .collect(),
        delete_mailboxes: if mask & (1 << 63) != 0 {
            plan.delete_mailboxes.clone()
        } else {
            Vec::new()
        },
        ..plan.clone()
    };
    carry_out(t, &part)
}

fn check_killed_run(
    a_ops: &[Op],
    b_ops: &[Op],
    (mask_a, half_a): (u64, u64),
    (mask_b, half_b): (u64, u64),
) -> Result<(), TestCaseError> {
    let (t0, base, ta, tb) = changed_pair(a_ops, b_ops);
    // The run is killed: part of each side's plan is done, the base is not saved.
    let killed = merge_plain(&base, &ta, &tb);
    let a1 = carry_out_killed(&ta, &killed.plan_a, mask_a, half_a);
    let b1 = carry_out_killed(&tb, &killed.plan_b, mask_b, half_b);
    let (a2, b2, merged) = sync_round(&base, &a1, &b1);
    check_converged(&t0, (&ta, &tb), (&a2, &b2), &merged)
}

/// One mailbox plan carried out up to its uidlist, as a run killed under the lock leaves
/// it: copies landed without a UID (their GUID is their base name), renames and expunges
/// done, the uidlist (UIDs, renumbering, GUID fields) as it was.
fn carry_out_until_uidlist(before: Option<&MailboxTable>, mp: &MailboxPlan) -> MailboxTable {
    let mut out = MailboxTable {
        dir: mp.dir.clone(),
        name: mp.name.clone(),
        settled: true,
        ..before.cloned().unwrap_or_default()
    };
    out.msgs = Default::default();
    out.arena = String::new();
    out.extras = Vec::new();
    out.listed_missing = Vec::new();
    if let Some(k) = &mp.keywords {
        out.keywords = k.clone();
    }
    let mut rows: Vec<(u32, String, Option<String>)> = Vec::new();
    if let Some(b) = before {
        for i in 0..b.len() {
            let name = b.name(i);
            if mp.expunges.iter().any(|e| e.name == name) {
                if b.msgs.uid[i] != 0 {
                    let r = out.intern(b.base(i));
                    out.listed_missing.push((b.msgs.uid[i], r));
                }
                continue;
            }
            let name = mp
                .renames
                .iter()
                .find(|r| r.from_name == name)
                .map_or(name.to_string(), |r| r.to_name.clone());
            let guid = (b.guid(i) != b.base(i)).then(|| b.guid(i).to_string());
            rows.push((b.msgs.uid[i], name, guid));
        }
    }
    for c in &mp.copies {
        rows.push((0, c.dst_name.clone(), None));
    }
    for (uid, name, guid) in rows {
        let parsed = filename::parse(&name).unwrap();
        let base_len = parsed.base.len();
        let flags = parsed.flags;
        let extras = guid.map(|g| {
            let r = out.intern(&g);
            Extras {
                guid: Some(r),
                ext: None,
            }
        });
        out.push(uid, &name, base_len, flags, 100, extras, 0);
    }
    out.sort_by_uid();
    out
}

/// [`carry_out_part`], then the mailbox plans whose bit is set in `half` only up to their
/// uidlist.
fn carry_out_killed(t: &MailTable, plan: &Plan, mask: u64, half: u64) -> MailTable {
    let mut out = carry_out_part(t, plan, mask & !half);
    let renamed = carry_out(
        t,
        &Plan {
            rename_mailboxes: plan.rename_mailboxes.clone(),
            ..Plan::default()
        },
    );
    for (k, mp) in plan.mailboxes.iter().enumerate() {
        if half & (1 << (k % 63)) == 0 || mask & (1 << (k % 63)) == 0 {
            continue;
        }
        let half_done = carry_out_until_uidlist(renamed.mailbox(&mp.dir), mp);
        out.mailboxes.retain(|m| m.dir != mp.dir);
        out.mailboxes.push(half_done);
    }
    out.mailboxes.sort_by(|x, y| x.dir.cmp(&y.dir));
    out
}

#[test]
fn a_rerun_after_one_side_finished_keeps_the_uids_that_side_gave() {
    let start = initial(2);
    let first = sync_round(&BaseState::default(), &start.table(), &start.table()).2;
    let (mut ma, mut mb) = (start.clone(), start);
    ma.side = 'a';
    mb.side = 'b';
    ma.apply(&Op::Deliver(0));
    mb.apply(&Op::Deliver(0));
    let (ta, tb) = (ma.table(), mb.table());
    // Killed after A's plan (a1 renumbered 3 → 4, b1 copied as 5), before B's: no base.
    let killed = merge_plain(&first.next, &ta, &tb);
    let a1 = carry_out(&ta, &killed.plan_a);
    let (a2, b2, merged) = sync_round(&first.next, &a1, &tb);
    assert_eq!(view(&a2), view(&b2));
    assert!(
        merged.plan_a.is_empty(),
        "A's clients keep the UIDs they saw: {:?}",
        merged.plan_a.lines()
    );
    let archive = &view(&b2)["Archive"].3;
    assert_eq!(
        (archive[&4].0.as_str(), archive[&5].0.as_str()),
        ("a1", "b1")
    );
}

#[test]
fn a_flag_changed_on_one_side_survives_a_renumbering_by_dovecot_on_the_other() {
    let start = initial(2);
    let first = sync_round(&BaseState::default(), &start.table(), &start.table()).2;
    let (mut ma, mut mb) = (start.clone(), start);
    // A: \Seen on Archive's UID 1. B: Dovecot gave the same message a new UID (its uidlist
    // was rebuilt, or it reappeared), 1 → 3.
    ma.apply(&Op::Flag(0, 0, 1));
    let archive = mb.boxes.get_mut("Archive").unwrap();
    let msg = archive.msgs.remove(&1).unwrap();
    archive.msgs.insert(3, msg);
    archive.next = 4;
    let (a2, b2, merged) = sync_round(&first.next, &ma.table(), &mb.table());
    assert_eq!(view(&a2), view(&b2));
    let archive = &view(&a2)["Archive"].3;
    let seen = 1 << 5;
    let kept: Vec<_> = archive.values().filter(|m| m.0 == "s1x0").collect();
    assert_eq!(kept.len(), 1, "{archive:?}");
    assert_eq!(
        kept[0].1 & seen,
        seen,
        "A's flag change is kept: {archive:?}"
    );
    let plan = archive_plan(&merged.plan_a);
    assert!(
        plan.copies.is_empty() && plan.expunges.is_empty(),
        "{:?}",
        merged.plan_a.lines()
    );
}

#[test]
fn a_flat_side_never_moves_the_other_sides_new_mail_to_cur() {
    let start = initial(2);
    let t0 = start.table();
    let (_, _, first) = sync_round(&BaseState::default(), &t0, &t0);
    // A keeps INBOX's UID 1 in new/; B (mdbox) has no new/ and lists it in cur/.
    let mut a = t0.clone();
    a.mailboxes[0].msgs.status[0] |= status::IN_NEW;
    assert_eq!(a.mailboxes[0].subdir(0), crate::model::Subdir::New);
    let mut b = t0.clone();
    b.mailboxes.iter_mut().for_each(|m| m.flat = true);
    let merged = merge_plain(&first.next, &a, &b);
    assert!(merged.plan_a.is_empty(), "{:?}", merged.plan_a.lines());
    assert!(merged.plan_b.is_empty(), "{:?}", merged.plan_b.lines());
    // Between two Maildir sides, new/ on one and cur/ on the other is still settled in cur/.
    let merged = merge_plain(&first.next, &a, &t0);
    assert_eq!(
        merged.plan_a.counts().moves,
        1,
        "{:?}",
        merged.plan_a.lines()
    );
}

#[test]
fn one_message_moved_into_mailboxes_renamed_apart_on_both_sides_is_kept_in_both() {
    // A renames Sent → Renamed and Archive → Work and moves INBOX uid 3 into its Renamed
    // (ex-Sent); B renames Archive → Renamed, moves the same message into its Renamed
    // (ex-Archive) and gets new mail in Sent. "Renamed" names another mailbox on each side.
    let a_ops = [Op::Rename(2, 0), Op::Rename(0, 2), Op::Move(0, 1, 2)];
    let b_ops = [Op::Rename(0, 0), Op::Move(0, 1, 2), Op::Deliver(2)];
    let (t0, base, ta, tb) = changed_pair(&a_ops, &b_ops);
    let (a2, b2, merged) = sync_round(&base, &ta, &tb);
    check_converged(&t0, (&ta, &tb), (&a2, &b2), &merged).unwrap();
    let after = by_mailbox(&a2);
    let mailbox = |guid: u128| &after[&format!("{:?}", guid.to_le_bytes())];
    // Archive (GUID 78) keeps A's name, Sent (79) takes A's; each holds the moved message.
    let (archive, sent) = (mailbox(78), mailbox(79));
    assert_eq!(archive.0, "Work");
    assert_eq!(sent.0, "Renamed");
    assert_eq!(archive.1[&4].0, "s0x2");
    let sent_guids: Vec<&str> = sent.1.values().map(|m| m.0.as_str()).collect();
    assert_eq!(sent_guids, ["s2x0", "s2x1", "s2x2", "s0x2", "b1"]);
    assert!(!view(&a2)["INBOX"].3.contains_key(&3));
}
