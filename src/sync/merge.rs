//! The three-way merge of a two-way sync: (base, table A, table B, content-hash answers) →
//! one plan per side and the conflicts met on the way. Pure: no filesystem, no clock.
//!
//! How: mailboxes are paired across base, A and B by mailbox GUID (then by directory), each
//! pair's messages are merged against the base into one target mailbox, and the target is
//! turned into each side's plan by the one-way differ ([`diff::diff_backup`]) — so the
//! Maildir details (names, keyword letters, uidlist edits, index resets) live in one place.
//! Rules (the README states them for users):
//! - a message on one side only and not in the base is new: copied, keeping its UID unless
//!   the other side used that UID (or may have: it lies below the other's next UID), in which
//!   case it is renumbered above both sides' next UID on both sides; one on both sides under
//!   different UIDs keeps one side's UID when the other never used or passed it;
//! - flags and keywords merge bit by bit against the base: a bit changed on either side
//!   is changed;
//! - a base message gone from one side (same UID and GUID) is expunged on the other, also
//!   when the other changed its flags;
//! - a mailbox renamed on one side (same GUID, new directory) is renamed on the other; one
//!   deleted on one side is deleted on the other unless the other added mail since, then it
//!   is kept (recreated) and reported;
//! - without a base, messages pair by GUID, then by equal content under the same UID, and
//!   nothing is expunged or deleted.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use crate::model::Flags;
use crate::storage::maildir::keywords::{KeywordMap, LETTERS};
use crate::storage::maildir::uidlist::Header;
use crate::sync::base::{BaseMailbox, BaseState, guid_hash};
use crate::sync::diff::{self, DiffOptions, HashAnswers, HashQuestion};
use crate::sync::plan::{Plan, RenameMailbox};
use crate::table::{Extras, MailTable, MailboxTable, status};

/// What kind of disagreement a sync met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictKind {
    /// Both sides gave a UID to different messages: renumbered on both sides.
    UidRenumbered,
    /// Expunged on one side, flags changed on the other: expunged.
    ExpungedChanged,
    /// Deleted on one side, new mail on the other: kept, recreated.
    DeleteRefused,
    /// Renamed differently on both sides: side A's name is kept.
    RenamedTwice,
    /// Two mailboxes want one name: one keeps it, the other goes back to its old name or
    /// gets a `-conflict-N` suffix.
    NameClash,
    /// Different UIDVALIDITY on the two sides: the base's (else A's) generation is kept,
    /// the other side's messages are renumbered into it.
    UidValidity,
    /// A mailbox that cannot be read on one side (or is a symlink there, or was changing
    /// while read): left alone.
    LeftAlone,
}

/// One conflict, for the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    /// Mailbox name.
    pub mailbox: String,
    /// What happened.
    pub kind: ConflictKind,
    /// Details (UIDs, names).
    pub detail: String,
}

/// The merge's result.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    /// What side A must do.
    pub plan_a: Plan,
    /// What side B must do.
    pub plan_b: Plan,
    /// Disagreements and how they were settled.
    pub conflicts: Vec<Conflict>,
    /// The base to keep once both plans are applied completely (without stamps for the
    /// mailboxes the merge read; the caller adds those it can trust).
    pub next: BaseState,
    /// Directories of base mailboxes the merge did not trust (a side behind the base, a
    /// mailbox recreated): merged as a union. Their entries must leave the stored base
    /// before either plan is applied, because a run killed halfway can leave both sides
    /// looking like the base again (next UIDs raised past it) without holding its
    /// messages, and the stale entries would then read as expunges.
    pub untrusted_base: Vec<String>,
}

/// Merges `a` and `b` against `base`. `answers` are the content comparisons of
/// [`diff::hash_questions`]`(a, b)` (A as source).
pub fn merge(
    base: &BaseState,
    a: &MailTable,
    b: &MailTable,
    answers: &HashAnswers,
    options: &DiffOptions,
) -> Merged {
    let groups = pair_mailboxes(base, a, b);
    let places = place_groups(&groups);
    // Mailboxes merge independently: in parallel, gathered in group order so the plans
    // and the base come out the same on every run.
    let per_group: Vec<(Targets, Vec<Conflict>)> = groups
        .par_iter()
        .zip(places)
        .map(|(g, place)| {
            let (mut targets, mut conflicts) = (Targets::default(), Vec::new());
            merge_group(g, a, b, place, answers, &mut targets, &mut conflicts);
            (targets, conflicts)
        })
        .collect();
    let mut conflicts = Vec::new();
    let mut targets = Targets::default();
    for (group_targets, group_conflicts) in per_group {
        targets.absorb(group_targets);
        conflicts.extend(group_conflicts);
    }
    let subscriptions = merge_subscriptions(
        base.subscriptions.as_deref(),
        a.subscriptions.as_deref(),
        b.subscriptions.as_deref(),
    );
    let next = BaseState {
        mailboxes: sorted(targets.next),
        subscriptions: subscriptions.clone(),
    };
    let b_renamed = renamed_table(b, &targets.renames_b);
    let a_renamed = renamed_table(a, &targets.renames_a);
    let t_a = target_table(&a_renamed, &b_renamed, targets.for_a, subscriptions.clone());
    let t_b = target_table(&b_renamed, &a_renamed, targets.for_b, subscriptions);
    let answers_a: HashAnswers = targets.same_a.into_iter().map(|q| (q, true)).collect();
    let answers_b: HashAnswers = targets.same_b.into_iter().map(|q| (q, true)).collect();
    let (mut plan_a, mut plan_b) = rayon::join(
        || diff::diff_backup(&t_a, &a_renamed, &answers_a, options),
        || diff::diff_backup(&t_b, &b_renamed, &answers_b, options),
    );
    plan_a.rename_mailboxes = order_renames(targets.renames_a);
    plan_b.rename_mailboxes = order_renames(targets.renames_b);
    plan_a.root_meta = pick_root_meta(a, b);
    plan_b.root_meta = pick_root_meta(b, a);
    Merged {
        plan_a,
        plan_b,
        conflicts,
        next,
        untrusted_base: targets.untrusted_base,
    }
}

/// A side keeps its own root's mode and owner; a side with no mail yet (a root created by
/// this run) takes the other's, as a backup's destination does.
fn pick_root_meta(own: &MailTable, other: &MailTable) -> crate::table::DirMeta {
    let empty = own.mailboxes.is_empty() && own.subscriptions.is_none();
    if empty && !other.mailboxes.is_empty() {
        other.root_meta
    } else {
        own.root_meta
    }
}

fn sorted<T: HasDir>(mut v: Vec<T>) -> Vec<T> {
    v.sort_by(|x, y| x.dir().cmp(y.dir()));
    v
}

trait HasDir {
    fn dir(&self) -> &str;
}

impl HasDir for BaseMailbox {
    fn dir(&self) -> &str {
        &self.dir
    }
}

impl HasDir for MailboxTable {
    fn dir(&self) -> &str {
        &self.dir
    }
}

/// One mailbox as the base, A and B know it.
#[derive(Debug, Clone, Copy)]
struct Group<'a> {
    base: Option<&'a BaseMailbox>,
    a: Option<&'a MailboxTable>,
    b: Option<&'a MailboxTable>,
}

impl Group<'_> {
    /// The directory the mailbox ends up in, and whether both sides renamed it apart.
    fn target_dir(&self) -> (&str, bool) {
        match (self.base, self.a, self.b) {
            (Some(base), Some(a), Some(b)) => {
                if a.dir == b.dir || b.dir == base.dir {
                    (&a.dir, false)
                } else if a.dir == base.dir {
                    (&b.dir, false)
                } else {
                    (&a.dir, true)
                }
            }
            (_, Some(a), _) => (&a.dir, false),
            (_, None, Some(b)) => (&b.dir, false),
            (Some(base), None, None) => (&base.dir, false),
            (None, None, None) => ("", false),
        }
    }

    fn name(&self) -> String {
        let (dir, _) = self.target_dir();
        [self.a, self.b]
            .into_iter()
            .flatten()
            .find(|m| m.dir == dir)
            .map(|m| m.name.clone())
            .or_else(|| self.base.map(|m| m.name.clone()))
            .unwrap_or_default()
    }
}

/// Pairs mailboxes: each base mailbox with the mailbox of the same GUID on each side (else
/// the one in its directory), then what is left on A with what is left on B, by GUID and
/// then by directory.
fn pair_mailboxes<'a>(base: &'a BaseState, a: &'a MailTable, b: &'a MailTable) -> Vec<Group<'a>> {
    let mut a_used = vec![false; a.mailboxes.len()];
    let mut b_used = vec![false; b.mailboxes.len()];
    let mut groups = Vec::new();
    // First every base mailbox's GUID on each side (a renamed mailbox is found wherever it
    // went), then, for what is still unpaired, the mailbox in its directory whatever its
    // GUID (one deleted and created again under the same name; the message merge then
    // trusts the base only where the GUID agrees).
    let by_guid = |t: &MailTable, used: &mut Vec<bool>, e: &BaseMailbox| {
        let i = e.guid.and_then(|g| {
            (0..t.mailboxes.len())
                .find(|&i| !used[i] && t.mailboxes[i].guid_of_mailbox() == Some(g))
        })?;
        used[i] = true;
        Some(i)
    };
    let by_dir = |t: &MailTable, used: &mut Vec<bool>, e: &BaseMailbox| {
        let i = (0..t.mailboxes.len()).find(|&i| !used[i] && t.mailboxes[i].dir == e.dir)?;
        used[i] = true;
        Some(i)
    };
    let mut found: Vec<(Option<usize>, Option<usize>)> = base
        .mailboxes
        .iter()
        .map(|e| (by_guid(a, &mut a_used, e), by_guid(b, &mut b_used, e)))
        .collect();
    for (e, (fa, fb)) in base.mailboxes.iter().zip(&mut found) {
        if fa.is_none() {
            *fa = by_dir(a, &mut a_used, e);
        }
        if fb.is_none() {
            *fb = by_dir(b, &mut b_used, e);
        }
    }
    // A mailbox found on one side only, renamed there, may be on the other side under its
    // new name without a GUID yet: a run killed while creating it there (directories,
    // perhaps files, no uidlist). It is the same mailbox, not a stranger to rename away.
    let unnumbered_at = |t: &MailTable, used: &mut Vec<bool>, dir: &str| {
        let i = (0..t.mailboxes.len()).find(|&i| {
            !used[i] && t.mailboxes[i].dir == dir && t.mailboxes[i].guid_of_mailbox().is_none()
        })?;
        used[i] = true;
        Some(i)
    };
    for (fa, fb) in &mut found {
        match (*fa, *fb) {
            (Some(i), None) => *fb = unnumbered_at(b, &mut b_used, &a.mailboxes[i].dir),
            (None, Some(j)) => *fa = unnumbered_at(a, &mut a_used, &b.mailboxes[j].dir),
            _ => {}
        }
    }
    for (e, (fa, fb)) in base.mailboxes.iter().zip(found) {
        groups.push(Group {
            base: Some(e),
            a: fa.map(|i| &a.mailboxes[i]),
            b: fb.map(|j| &b.mailboxes[j]),
        });
    }
    let mut b_left: Vec<usize> = (0..b.mailboxes.len()).filter(|&j| !b_used[j]).collect();
    for (i, ma) in a.mailboxes.iter().enumerate() {
        if a_used[i] {
            continue;
        }
        let same_guid = ma.guid_of_mailbox().and_then(|g| {
            b_left
                .iter()
                .position(|&j| b.mailboxes[j].guid_of_mailbox() == Some(g))
        });
        let partner =
            same_guid.or_else(|| b_left.iter().position(|&j| b.mailboxes[j].dir == ma.dir));
        let mb = partner.map(|p| &b.mailboxes[b_left.remove(p)]);
        groups.push(Group {
            base: None,
            a: Some(ma),
            b: mb,
        });
    }
    for j in b_left {
        groups.push(Group {
            base: None,
            a: None,
            b: Some(&b.mailboxes[j]),
        });
    }
    groups
}

/// Where a group's mailbox ends up.
#[derive(Debug, Clone)]
struct Place {
    dir: String,
    name: String,
    /// Why it is not where one side wanted it (two mailboxes wanted one name).
    moved: Option<String>,
    /// Why it must be left alone.
    hold: Option<String>,
}

/// Gives every group a directory of its own. When two groups want one directory (a
/// mailbox renamed onto a name the other side created or renamed to), the one already
/// there on both sides — else the first — keeps it; another goes back to its base name
/// when that is free, else gets a `-conflict-N` suffix. Nothing is merged into a stranger.
fn place_groups(groups: &[Group<'_>]) -> Vec<Place> {
    let wanted: Vec<String> = groups
        .iter()
        .map(|g| g.target_dir().0.to_string())
        .collect();
    let mut claimants: HashMap<&str, Vec<usize>> = HashMap::new();
    for (k, g) in groups.iter().enumerate() {
        if g.a.is_some() || g.b.is_some() {
            claimants.entry(wanted[k].as_str()).or_default().push(k);
        }
    }
    let mut used: HashSet<String> = claimants.keys().map(|d| d.to_string()).collect();
    let mut places: Vec<Place> = groups
        .iter()
        .zip(&wanted)
        .map(|(g, dir)| Place {
            dir: dir.clone(),
            name: g.name(),
            moved: None,
            hold: None,
        })
        .collect();
    let mut clashes: Vec<(&str, Vec<usize>)> =
        claimants.into_iter().filter(|(_, v)| v.len() > 1).collect();
    clashes.sort();
    for (dir, mut ks) in clashes {
        // INBOX never moves; a mailbox already in place on both sides keeps it.
        let inbox = |k: &usize| {
            let g = &groups[*k];
            dir.is_empty() || [g.a, g.b].into_iter().flatten().any(|m| m.dir.is_empty())
        };
        let settled = |k: &usize| {
            let g = &groups[*k];
            [g.a, g.b].into_iter().flatten().all(|m| m.dir == dir)
        };
        ks.sort_by_key(|k| (!inbox(k), !settled(k)));
        for &k in &ks[1..] {
            let g = &groups[k];
            if inbox(&k) {
                places[k].hold = Some("INBOX is paired with another mailbox".into());
                continue;
            }
            let back = g
                .base
                .map(|base| base.dir.clone())
                .filter(|d| d != dir && !d.is_empty() && !used.contains(d));
            let (new_dir, new_name) = match back {
                Some(d) => (
                    d.clone(),
                    g.base.map(|b| b.name.clone()).unwrap_or_default(),
                ),
                None => {
                    let mut n = 1;
                    while used.contains(&format!("{dir}-conflict-{n}")) {
                        n += 1;
                    }
                    (
                        format!("{dir}-conflict-{n}"),
                        format!("{}-conflict-{n}", places[k].name),
                    )
                }
            };
            used.insert(new_dir.clone());
            places[k] = Place {
                moved: Some(format!(
                    "another mailbox took {}; this one is {new_name}",
                    places[k].name
                )),
                dir: new_dir,
                name: new_name,
                hold: None,
            };
        }
    }
    places
}

/// What the merge builds up: each side's target mailboxes, renames, synthetic content
/// answers, and the next base.
#[derive(Default)]
struct Targets {
    for_a: Vec<MailboxTable>,
    for_b: Vec<MailboxTable>,
    renames_a: Vec<RenameMailbox>,
    renames_b: Vec<RenameMailbox>,
    same_a: Vec<HashQuestion>,
    same_b: Vec<HashQuestion>,
    next: Vec<BaseMailbox>,
    untrusted_base: Vec<String>,
}

impl Targets {
    /// Appends another group's results after these.
    fn absorb(&mut self, other: Targets) {
        self.for_a.extend(other.for_a);
        self.for_b.extend(other.for_b);
        self.renames_a.extend(other.renames_a);
        self.renames_b.extend(other.renames_b);
        self.same_a.extend(other.same_a);
        self.same_b.extend(other.same_b);
        self.next.extend(other.next);
        self.untrusted_base.extend(other.untrusted_base);
    }

    /// Keeps both sides' copies exactly as they are (the target equals the side), and the
    /// base entry as it was. `changing`: held because a side changed while it was read (a
    /// re-run settles it), not because of bad input.
    fn hold(&mut self, g: &Group<'_>, why: &str, changing: bool) {
        for (side, out) in [(g.a, &mut self.for_a), (g.b, &mut self.for_b)] {
            if let Some(m) = side {
                let mut kept = m.clone();
                kept.broken = Some(why.to_string());
                kept.vanished = changing;
                out.push(kept);
            }
        }
        if let Some(base) = g.base {
            self.next.push(base.clone());
        }
    }
}

fn merge_group(
    g: &Group<'_>,
    a: &MailTable,
    b: &MailTable,
    place: Place,
    answers: &HashAnswers,
    t: &mut Targets,
    conflicts: &mut Vec<Conflict>,
) {
    if g.a.is_none() && g.b.is_none() {
        return;
    }
    let renamed_twice = g.target_dir().1;
    let Place {
        dir,
        name,
        moved,
        hold,
    } = place;
    let conflict = |conflicts: &mut Vec<Conflict>, kind, detail: String| {
        conflicts.push(Conflict {
            mailbox: name.clone(),
            kind,
            detail,
        })
    };
    if let Some(why) = moved {
        conflict(conflicts, ConflictKind::NameClash, why);
    }
    if let Some(why) = hold {
        conflict(conflicts, ConflictKind::NameClash, why.clone());
        return t.hold(g, &why, false);
    }
    if a.is_unfollowed(&dir) || b.is_unfollowed(&dir) {
        conflict(
            conflicts,
            ConflictKind::LeftAlone,
            "a symlink (or odd name) on one side; left alone".into(),
        );
        return t.hold(g, "a symlink or odd name on one side", false);
    }
    let broken: Vec<&MailboxTable> = [g.a, g.b]
        .into_iter()
        .flatten()
        .filter(|m| m.broken.is_some())
        .collect();
    if let Some(first) = broken.first() {
        let why = first.broken.clone().unwrap_or_default();
        conflict(conflicts, ConflictKind::LeftAlone, why.clone());
        // Changing only when every broken side vanished: bad input beside it is an error.
        return t.hold(g, &why, broken.iter().all(|m| m.vanished));
    }
    if renamed_twice {
        let (ad, bd) = (g.a.map_or("", |m| &m.dir), g.b.map_or("", |m| &m.dir));
        conflict(
            conflicts,
            ConflictKind::RenamedTwice,
            format!("renamed to {ad} on A and to {bd} on B; A's name kept"),
        );
    }
    // Both sides unchanged since the last sync: nothing to read, nothing to do.
    if let (Some(ma), Some(mb), Some(base)) = (g.a, g.b, g.base)
        && ma.unchanged.is_some()
        && mb.unchanged.is_some()
        && ma.dir == base.dir
        && mb.dir == base.dir
    {
        t.for_a.push(ma.clone());
        t.for_b.push(mb.clone());
        t.next.push(base.clone());
        return;
    }
    if [g.a, g.b]
        .into_iter()
        .flatten()
        .any(|m| m.unchanged.is_some())
    {
        // The caller reads a mailbox unchanged on one side only; if it did not, wait.
        return t.hold(g, "not read on one side; next run", false);
    }
    if let Some(side) = phantom_side(g) {
        let why = format!(
            "changing on {side} while read: a file its uidlist names was not listed; next run"
        );
        conflict(conflicts, ConflictKind::LeftAlone, why.clone());
        return t.hold(g, &why, true);
    }
    // Deleted on one side since the last sync.
    if let Some(base) = g.base
        && (g.a.is_none() || g.b.is_none())
    {
        let survivor = g.a.or(g.b).expect("one side has it");
        let added = added_since(base, survivor);
        if added == 0 {
            // Gone from both targets: the differ deletes the survivor.
            return;
        }
        let deleted_on = if g.a.is_none() { "A" } else { "B" };
        conflict(
            conflicts,
            ConflictKind::DeleteRefused,
            format!("deleted on {deleted_on}, but {added} new messages on the other side; kept"),
        );
    }
    for (side, renames) in [(g.a, &mut t.renames_a), (g.b, &mut t.renames_b)] {
        if let Some(m) = side
            && m.dir != dir
            && !m.dir.is_empty()
            && !dir.is_empty()
        {
            renames.push(RenameMailbox {
                from_dir: m.dir.clone(),
                to_dir: dir.clone(),
                name: name.clone(),
            });
        }
    }
    let mut mm = MessageMerge::new(g, answers);
    if let Some(base) = g.base
        && !mm.base_valid
    {
        t.untrusted_base.push(base.dir.clone());
    }
    mm.run(conflicts, &name);
    let built = mm.build(&dir, &name);
    t.for_a.push(built.for_a);
    t.for_b.push(built.for_b);
    t.same_a.extend(built.same_a);
    t.same_b.extend(built.same_b);
    t.next.push(built.next);
}

/// The side (`"A"`, `"B"`) whose listing may have missed a file Dovecot was renaming, when
/// the miss would count: its mailbox moved while it was read (even on the caller's second
/// look) and its uidlist names a file not listed that the base knows (an expunge would reach
/// the other side) or the other side holds (a copy would land beside the file). Such a
/// mailbox is left alone until a run reads it settled.
fn phantom_side(g: &Group<'_>) -> Option<&'static str> {
    let doubtful = |m: Option<&MailboxTable>, other: Option<&MailboxTable>| {
        let Some(m) = m.filter(|m| !m.settled && !m.listed_missing.is_empty()) else {
            return false;
        };
        let other_bases: HashSet<&str> =
            other.map_or_else(HashSet::new, |o| (0..o.len()).map(|j| o.base(j)).collect());
        m.listed_missing.iter().any(|&(uid, r)| {
            g.base.is_some_and(|b| b.find_uid(uid).is_some()) || other_bases.contains(m.str(r))
        })
    };
    if doubtful(g.a, g.b) {
        Some("A")
    } else if doubtful(g.b, g.a) {
        Some("B")
    } else {
        None
    }
}

/// Messages of `m` that the base does not know (by UID and GUID).
fn added_since(base: &BaseMailbox, m: &MailboxTable) -> usize {
    (0..m.len())
        .filter(|&i| {
            base.find_uid(m.msgs.uid[i])
                .is_none_or(|k| base.records().guids[k] != guid_hash(m.guid(i)))
        })
        .count()
}

/// One message of the target mailbox.
#[derive(Debug, Clone)]
struct Target {
    /// UID it gets (0: none yet, to be allocated; stays 0 without a uidlist).
    uid: u32,
    /// Allocate a UID above both sides' next.
    renumber: bool,
    /// Its row on A and on B.
    a: Option<usize>,
    b: Option<usize>,
    /// Which side's GUID is the message's (when they differ: equal content).
    guid_from_a: bool,
    /// Flags, keyword letters of the merged map.
    flags: Flags,
    in_new: bool,
}

/// The message merge of one mailbox pair.
struct MessageMerge<'a> {
    g: Group<'a>,
    answers: &'a HashAnswers,
    /// Merged keyword map (A's letters first).
    keywords: KeywordMap,
    map_a: [Option<u8>; LETTERS],
    map_b: [Option<u8>; LETTERS],
    map_base: [Option<u8>; LETTERS],
    /// Header of the generation kept.
    header: Option<Header>,
    /// Whether each side's UIDs belong to the kept generation (and so mean something).
    a_uids: bool,
    b_uids: bool,
    /// Whether the base belongs to the kept generation.
    base_valid: bool,
    a_done: Vec<bool>,
    b_done: Vec<bool>,
    out: Vec<Target>,
}

impl<'a> MessageMerge<'a> {
    fn new(g: &Group<'a>, answers: &'a HashAnswers) -> Self {
        let mut keywords =
            g.a.map(|m| m.keywords.clone())
                .or_else(|| g.b.map(|m| m.keywords.clone()))
                .unwrap_or_default();
        for map in [g.b.map(|m| &m.keywords), g.base.map(|m| &m.keywords)]
            .into_iter()
            .flatten()
        {
            for name in map.names.iter().flatten() {
                keywords.assign(name);
            }
        }
        let map_of = |from: Option<&KeywordMap>| letter_map(from, &keywords);
        let (ha, hb) = (
            g.a.and_then(|m| m.header.as_ref()),
            g.b.and_then(|m| m.header.as_ref()),
        );
        let base_v = g.base.map_or(0, |m| m.uid_validity);
        // The generation kept: the one both share, else the base's, else A's.
        let (header, a_uids, b_uids) = match (ha, hb) {
            (Some(x), Some(y)) if x.uid_validity == y.uid_validity => (Some(x), true, true),
            (Some(_), Some(y)) if y.uid_validity == base_v => (Some(y), false, true),
            (Some(x), Some(_)) => (Some(x), true, false),
            (Some(x), None) => (Some(x), true, true),
            (None, Some(y)) => (Some(y), true, true),
            (None, None) => (None, true, true),
        };
        // The base speaks for a side only when that side still has the mailbox it recorded:
        // same UIDVALIDITY, (where both know it) the same mailbox GUID, and a next UID not
        // below the base's — Dovecot never lowers it, so a lower one is a side restored from
        // an older copy, or a run that did not finish there, and its missing messages were
        // never expunged by anyone.
        let same_box = |m: Option<&MailboxTable>| {
            m.is_none_or(|m| {
                let guid = m.guid_of_mailbox();
                let base_guid = g.base.and_then(|b| b.guid);
                let not_behind = g.base.is_none_or(|b| m.next_uid >= b.next_uid);
                not_behind && (guid.is_none() || base_guid.is_none() || guid == base_guid)
            })
        };
        let base_valid =
            header.is_some_and(|h| h.uid_validity == base_v) && same_box(g.a) && same_box(g.b);
        MessageMerge {
            map_a: map_of(g.a.map(|m| &m.keywords)),
            map_b: map_of(g.b.map(|m| &m.keywords)),
            map_base: map_of(g.base.map(|m| &m.keywords)),
            keywords,
            header: header.cloned(),
            a_uids,
            b_uids,
            base_valid,
            a_done: vec![false; g.a.map_or(0, MailboxTable::len)],
            b_done: vec![false; g.b.map_or(0, MailboxTable::len)],
            out: Vec::new(),
            g: *g,
            answers,
        }
    }

    fn uid_a(&self, i: usize) -> u32 {
        if self.a_uids {
            self.g.a.map_or(0, |m| m.msgs.uid[i])
        } else {
            0
        }
    }

    fn uid_b(&self, j: usize) -> u32 {
        if self.b_uids {
            self.g.b.map_or(0, |m| m.msgs.uid[j])
        } else {
            0
        }
    }

    fn find_a(&self, uid: u32) -> Option<usize> {
        self.g.a.filter(|_| self.a_uids && uid != 0)?.find_uid(uid)
    }

    fn find_b(&self, uid: u32) -> Option<usize> {
        self.g.b.filter(|_| self.b_uids && uid != 0)?.find_uid(uid)
    }

    fn flags_a(&self, i: usize) -> Flags {
        diff::translate_letters(self.g.a.expect("row on A").msgs.flags[i], &self.map_a)
    }

    fn flags_b(&self, j: usize) -> Flags {
        diff::translate_letters(self.g.b.expect("row on B").msgs.flags[j], &self.map_b)
    }

    fn new_a(&self, i: usize) -> bool {
        self.g
            .a
            .is_some_and(|m| m.subdir(i) == crate::model::Subdir::New)
    }

    fn new_b(&self, j: usize) -> bool {
        self.g
            .b
            .is_some_and(|m| m.subdir(j) == crate::model::Subdir::New)
    }

    /// A message on both sides stays in `new/` when each side that has a `new/` keeps it
    /// there: a flat side (mdbox) has none, so it never moves the other side's to `cur/`.
    fn stays_new(&self, i: usize, j: usize) -> bool {
        let (flat_a, flat_b) = (
            self.g.a.is_some_and(|m| m.flat),
            self.g.b.is_some_and(|m| m.flat),
        );
        !(flat_a && flat_b) && (flat_a || self.new_a(i)) && (flat_b || self.new_b(j))
    }

    fn run(&mut self, conflicts: &mut Vec<Conflict>, name: &str) {
        let mut note = |kind, detail: String| {
            conflicts.push(Conflict {
                mailbox: name.to_string(),
                kind,
                detail,
            })
        };
        if let (Some(x), Some(y)) = (
            self.g.a.and_then(|m| m.header.as_ref()),
            self.g.b.and_then(|m| m.header.as_ref()),
        ) && x.uid_validity != y.uid_validity
        {
            let kept = if self.a_uids { "A" } else { "B" };
            note(
                ConflictKind::UidValidity,
                format!(
                    "UIDVALIDITY {} on A, {} on B; {kept}'s kept, the other side's messages renumbered",
                    x.uid_validity, y.uid_validity
                ),
            );
        }
        self.merge_base(&mut note);
        self.pair_new();
        self.place_new(&mut note);
    }

    /// Messages the base knows: kept with merged flags, or expunged when one side lost them.
    fn merge_base(&mut self, note: &mut impl FnMut(ConflictKind, String)) {
        let Some(base) = self.g.base.filter(|_| self.base_valid) else {
            return;
        };
        let (has_a, has_b) = (self.g.a.is_some(), self.g.b.is_some());
        let records = base.records();
        let (mut gone_a, mut gone_b) = (Vec::new(), Vec::new());
        for k in 0..records.uids.len() {
            let (uid, gh) = (records.uids[k], records.guids[k]);
            let ia = self
                .find_a(uid)
                .filter(|&i| guid_hash(self.g.a.expect("a").guid(i)) == gh);
            let ib = self
                .find_b(uid)
                .filter(|&j| guid_hash(self.g.b.expect("b").guid(j)) == gh);
            let old = diff::translate_letters(records.flags[k], &self.map_base);
            match (ia, ib) {
                (Some(i), Some(j)) => {
                    self.a_done[i] = true;
                    self.b_done[j] = true;
                    let (fa, fb) = (self.flags_a(i), self.flags_b(j));
                    self.out.push(Target {
                        uid,
                        renumber: false,
                        a: Some(i),
                        b: Some(j),
                        guid_from_a: true,
                        flags: merge_flags(old, fa, fb),
                        in_new: self.stays_new(i, j),
                    });
                }
                (Some(i), None) if has_b => {
                    self.a_done[i] = true;
                    gone_b.push((uid, i, old));
                }
                (None, Some(j)) if has_a => {
                    self.b_done[j] = true;
                    gone_a.push((uid, j, old));
                }
                _ => {}
            }
        }
        self.gone_or_renumbered(gone_b, true, note);
        self.gone_or_renumbered(gone_a, false, note);
    }

    /// Base messages one side lacks under their UID: the other side's copy goes, unless
    /// the side holds the same GUID under a UID the base does not know (Dovecot numbered it
    /// again: a rebuilt uidlist, a message that "reappeared"). Then it is one message, its
    /// flags merged against the base — a flag changed on the other side is not lost.
    fn gone_or_renumbered(
        &mut self,
        gone: Vec<(u32, usize, Flags)>,
        lacking_b: bool,
        note: &mut impl FnMut(ConflictKind, String),
    ) {
        let side = if lacking_b { self.g.b } else { self.g.a };
        let Some(side) = side.filter(|_| !gone.is_empty()) else {
            return;
        };
        let done = if lacking_b {
            &self.b_done
        } else {
            &self.a_done
        };
        let unknown: HashMap<&str, usize> = (0..side.len())
            .filter(|&r| !done[r])
            .map(|r| (side.guid(r), r))
            .collect();
        let (lacking, holding) = if lacking_b { ("B", "A") } else { ("A", "B") };
        for (uid, row, old) in gone {
            let (held_guid, held_flags) = if lacking_b {
                (self.g.a.expect("a").guid(row), self.flags_a(row))
            } else {
                (self.g.b.expect("b").guid(row), self.flags_b(row))
            };
            let again = unknown.get(held_guid).copied();
            let Some(other) = again.filter(|&r| {
                let done = if lacking_b {
                    &self.b_done
                } else {
                    &self.a_done
                };
                !done[r]
            }) else {
                if held_flags != old {
                    note(
                        ConflictKind::ExpungedChanged,
                        format!(
                            "uid {uid}: expunged on {lacking}, flags changed on {holding}; expunged"
                        ),
                    );
                }
                continue;
            };
            let (i, j) = if lacking_b {
                (row, other)
            } else {
                (other, row)
            };
            self.a_done[i] = true;
            self.b_done[j] = true;
            let kept = self.kept_uid(self.uid_a(i), self.uid_b(j));
            self.out.push(Target {
                uid: kept,
                renumber: kept == 0 && self.header.is_some(),
                a: Some(i),
                b: Some(j),
                guid_from_a: true,
                flags: merge_flags(old, self.flags_a(i), self.flags_b(j)),
                in_new: self.stays_new(i, j),
            });
        }
    }

    /// Messages new on both sides that are the same message: same UID and GUID, same GUID
    /// under different UIDs (renumbered), or same UID and equal content.
    fn pair_new(&mut self) {
        let (Some(a), Some(b)) = (self.g.a, self.g.b) else {
            return;
        };
        let mut b_by_guid: HashMap<&str, usize> = HashMap::new();
        for j in 0..b.len() {
            if !self.b_done[j] {
                b_by_guid.entry(b.guid(j)).or_insert(j);
            }
        }
        if b_by_guid.is_empty() {
            return;
        }
        // Content twins under other UIDs: only where a first sync asked about them.
        let twins = (!self.answers.is_empty()).then(|| twins::by_size(b, &self.b_done));
        for i in 0..a.len() {
            if self.a_done[i] {
                continue;
            }
            let ua = self.uid_a(i);
            let same_uid = self.find_b(ua).filter(|&j| !self.b_done[j]);
            let by_guid = b_by_guid
                .get(a.guid(i))
                .copied()
                .filter(|&j| !self.b_done[j]);
            let (j, guid_from_a) = if let Some(j) = same_uid.filter(|&j| b.guid(j) == a.guid(i)) {
                (j, true)
            } else if let Some(j) = by_guid {
                (j, true)
            } else if let Some(j) = same_uid.filter(|&j| self.same_content(i, j)) {
                (j, true)
            } else if let Some(j) = twins.as_ref().and_then(|candidates| {
                twins::find_twin(a, i, b, candidates, &self.b_done, self.answers)
            }) {
                (j, true)
            } else {
                continue;
            };
            let ub = self.uid_b(j);
            self.a_done[i] = true;
            self.b_done[j] = true;
            let uid = self.kept_uid(ua, ub);
            self.out.push(Target {
                uid,
                renumber: uid == 0 && self.header.is_some(),
                a: Some(i),
                b: Some(j),
                guid_from_a,
                flags: union(self.flags_a(i), self.flags_b(j)),
                in_new: self.stays_new(i, j),
            });
        }
    }

    /// The UID a message new on both sides keeps: the one both gave it, else one side's
    /// when the other side never used or passed it (a run killed after one side numbered
    /// it, or a copy that landed before its uidlist record: that side's clients keep the
    /// UID they saw), else none (renumbered above both).
    fn kept_uid(&self, ua: u32, ub: u32) -> u32 {
        let next =
            |m: Option<&MailboxTable>, uids: bool| m.filter(|_| uids).map_or(0, |m| m.next_uid);
        let (a_next, b_next) = (next(self.g.a, self.a_uids), next(self.g.b, self.b_uids));
        if ua == ub || ua != 0 && ua >= b_next && self.find_b(ua).is_none() {
            ua
        } else if ub != 0 && ub >= a_next && self.find_a(ub).is_none() {
            ub
        } else {
            0
        }
    }

    fn same_content(&self, i: usize, j: usize) -> bool {
        let (a, b) = (self.g.a.expect("a"), self.g.b.expect("b"));
        if a.dir != b.dir {
            return false;
        }
        let q = HashQuestion::between(a, i, b, j);
        self.answers.get(&q).copied().unwrap_or(false)
    }

    /// Messages new on one side only: keep their UID when the other side cannot have used
    /// it, else renumber.
    fn place_new(&mut self, note: &mut impl FnMut(ConflictKind, String)) {
        let taken: HashSet<u32> = self.out.iter().map(|t| t.uid).filter(|&u| u != 0).collect();
        let a_next = self.g.a.filter(|_| self.a_uids).map_or(0, |m| m.next_uid);
        let b_next = self.g.b.filter(|_| self.b_uids).map_or(0, |m| m.next_uid);
        let mut placed = Vec::new();
        for on_a in [true, false] {
            let done = if on_a { &self.a_done } else { &self.b_done };
            let (me, other, other_next) = if on_a {
                ("A", "B", b_next)
            } else {
                ("B", "A", a_next)
            };
            let mut renumbered = Vec::new();
            for k in (0..done.len()).filter(|&k| !done[k]) {
                let (u, flags, in_new, on_other) = if on_a {
                    let u = self.uid_a(k);
                    (u, self.flags_a(k), self.new_a(k), self.find_b(u).is_some())
                } else {
                    let u = self.uid_b(k);
                    (u, self.flags_b(k), self.new_b(k), self.find_a(u).is_some())
                };
                let clash = u != 0 && (taken.contains(&u) || on_other || u < other_next);
                if clash {
                    renumbered.push(u);
                }
                placed.push(Target {
                    uid: if clash { 0 } else { u },
                    renumber: (clash || u == 0) && self.header.is_some(),
                    a: on_a.then_some(k),
                    b: (!on_a).then_some(k),
                    guid_from_a: on_a,
                    flags,
                    in_new,
                });
            }
            if !renumbered.is_empty() {
                note(
                    ConflictKind::UidRenumbered,
                    format!(
                        "{} new on {me} (UID {}) renumbered on both sides: {other} used or \
                         passed those UIDs",
                        renumbered.len(),
                        uid_ranges(&renumbered)
                    ),
                );
            }
        }
        self.out.extend(placed);
    }

    /// Hands out the renumbered UIDs (above both sides' next UID and the base's), sorts the
    /// target and builds each side's target table and the next base entry.
    fn build(mut self, dir: &str, name: &str) -> Built {
        let highest = self.out.iter().map(|t| t.uid).max().unwrap_or(0);
        let mut next = [
            // Also the other generation's: UIDNEXT must end up equal on both sides.
            self.g.a.map_or(1, |m| m.next_uid),
            self.g.b.map_or(1, |m| m.next_uid),
            self.g
                .base
                .filter(|_| self.base_valid)
                .map_or(1, |m| m.next_uid),
            highest.saturating_add(1),
            self.header.as_ref().map_or(1, |h| h.next_uid),
        ]
        .into_iter()
        .max()
        .unwrap_or(1);
        // Deterministic order: by the UID each had, A's first.
        let mut order: Vec<usize> = (0..self.out.len())
            .filter(|&k| self.out[k].renumber)
            .collect();
        order.sort_by_key(|&k| {
            let t = &self.out[k];
            (
                t.a.is_none(),
                t.a.map_or(0, |i| self.uid_a(i)),
                t.b.map_or(0, |j| self.uid_b(j)),
            )
        });
        for k in order {
            self.out[k].uid = next;
            next += 1;
        }
        self.out.sort_by_key(|t| {
            (
                t.uid == 0,
                t.uid,
                t.a.unwrap_or(usize::MAX),
                t.b.unwrap_or(usize::MAX),
            )
        });
        let header = self.header.clone().map(|h| Header {
            next_uid: next,
            ..h
        });
        let mut built = Built {
            for_a: self.side_table(dir, name, &header, next, true),
            for_b: self.side_table(dir, name, &header, next, false),
            same_a: Vec::new(),
            same_b: Vec::new(),
            next: BaseMailbox {
                dir: dir.to_string(),
                name: name.to_string(),
                guid: header.as_ref().and_then(|h| h.guid),
                uid_validity: header.as_ref().map_or(0, |h| h.uid_validity),
                next_uid: next,
                keywords: self.keywords.clone(),
                ..BaseMailbox::default()
            },
        };
        let mut columns = crate::sync::base::Columns::default();
        for t in &self.out {
            let row_broken =
                t.a.is_some_and(|i| self.g.a.expect("a").has(i, status::BROKEN))
                    || t.b
                        .is_some_and(|j| self.g.b.expect("b").has(j, status::BROKEN));
            if t.uid == 0 || row_broken {
                continue;
            }
            columns.uids.push(t.uid);
            columns.guids.push(guid_hash(self.guid_of(t)));
            columns.flags.push(t.flags);
        }
        built.next = std::mem::take(&mut built.next).with_records(columns);
        self.fill_rows(&mut built);
        built
    }

    /// The message's GUID: A's, unless it is B's only (or B's content twin).
    fn guid_of(&self, t: &Target) -> &'a str {
        match (t.guid_from_a, t.a, t.b) {
            (true, Some(i), _) | (false, Some(i), None) => self.g.a.expect("a").guid(i),
            (_, _, Some(j)) => self.g.b.expect("b").guid(j),
            (_, None, None) => "",
        }
    }

    fn side_table(
        &self,
        dir: &str,
        name: &str,
        header: &Option<Header>,
        next: u32,
        for_a: bool,
    ) -> MailboxTable {
        let own = if for_a { self.g.a } else { self.g.b };
        let other = if for_a { self.g.b } else { self.g.a };
        MailboxTable {
            dir: dir.to_string(),
            name: name.to_string(),
            header: header.clone(),
            next_uid: next,
            keywords: self.keywords.clone(),
            dir_meta: own.or(other).map(|m| m.dir_meta).unwrap_or_default(),
            // What cannot be copied from the other side is reported by the differ.
            anomalies: other.map(|m| m.anomalies.clone()).unwrap_or_default(),
            settled: true,
            ..MailboxTable::default()
        }
    }

    /// Fills both target tables' rows: each side's own file where it has one, else the
    /// other side's (a copy), named as on disk, flags as merged.
    fn fill_rows(&self, built: &mut Built) {
        for t in &self.out {
            let guid = self.guid_of(t);
            for for_a in [true, false] {
                let (own_row, other_row) = if for_a { (t.a, t.b) } else { (t.b, t.a) };
                let (own, other) = if for_a {
                    (self.g.a, self.g.b)
                } else {
                    (self.g.b, self.g.a)
                };
                let (table, row, map) = match (own_row, other_row) {
                    (Some(i), _) => (
                        own.expect("own"),
                        i,
                        if for_a { &self.map_a } else { &self.map_b },
                    ),
                    (None, Some(j)) => (
                        other.expect("other"),
                        j,
                        if for_a { &self.map_b } else { &self.map_a },
                    ),
                    (None, None) => continue,
                };
                let target = if for_a {
                    &mut built.for_a
                } else {
                    &mut built.for_b
                };
                let question = push_row(target, table, row, map, t, guid);
                if let Some(q) = question.filter(|_| own_row.is_some()) {
                    if for_a {
                        built.same_a.push(q);
                    } else {
                        built.same_b.push(q);
                    }
                }
            }
        }
    }
}

/// Sorted UIDs as ranges, `3:5,9`, the first ten ranges only.
fn uid_ranges(uids: &[u32]) -> String {
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &u in uids {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == u => *end = u,
            _ => ranges.push((u, u)),
        }
    }
    let mut text: Vec<String> = ranges
        .iter()
        .take(10)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}:{b}")
            }
        })
        .collect();
    if ranges.len() > 10 {
        text.push("…".into());
    }
    text.join(",")
}

/// Appends `t` to a target table, using `table`'s row `row` for the file. Returns the
/// content question the differ will ask when the message's GUID is not the row's own.
fn push_row(
    target: &mut MailboxTable,
    table: &MailboxTable,
    row: usize,
    map: &[Option<u8>; LETTERS],
    t: &Target,
    guid: &str,
) -> Option<HashQuestion> {
    let on_disk = diff::translate_letters(table.msgs.flags[row], map);
    let in_new_now = table.subdir(row) == crate::model::Subdir::New;
    let mut bits = table.msgs.status[row] & !(status::IN_NEW | status::STALE_NAME);
    if t.in_new {
        bits |= status::IN_NEW;
    }
    if on_disk != t.flags || in_new_now != t.in_new || table.msgs.flags[row] != on_disk {
        bits |= status::STALE_NAME;
    }
    let base = table.base(row);
    let guid_ref = (guid != base && !guid.is_empty()).then(|| target.intern(guid));
    let ext = table.ext(row);
    let ext_ref = (!ext.is_empty()).then(|| target.intern(ext));
    let extras = (guid_ref.is_some() || ext_ref.is_some()).then_some(Extras {
        guid: guid_ref,
        ext: ext_ref,
    });
    let name = table.name(row);
    target.push(
        t.uid,
        name,
        table.msgs.base_len[row] as usize,
        t.flags,
        table.msgs.size[row],
        extras,
        bits,
    );
    (guid != table.guid(row)).then(|| HashQuestion {
        dir: target.dir.clone(),
        src: (
            if t.in_new {
                crate::model::Subdir::New
            } else {
                crate::model::Subdir::Cur
            },
            name.to_string(),
        ),
        dst: (table.subdir(row), name.to_string()),
    })
}

struct Built {
    for_a: MailboxTable,
    for_b: MailboxTable,
    same_a: Vec<HashQuestion>,
    same_b: Vec<HashQuestion>,
    next: BaseMailbox,
}

/// Letter `i` of `from` → letter of the same name in `to`; letters without a name keep
/// their letter when `to` leaves it unnamed too.
fn letter_map(from: Option<&KeywordMap>, to: &KeywordMap) -> [Option<u8>; LETTERS] {
    std::array::from_fn(|i| match from.and_then(|f| f.name(i)) {
        Some(name) => to.index_of(name).map(|x| x as u8),
        None => to.name(i).is_none().then_some(i as u8),
    })
}

/// Per flag against the base: a bit either side changed is changed (both changing a bit
/// can only change it the same way).
pub fn merge_flags(base: Flags, a: Flags, b: Flags) -> Flags {
    Flags {
        system: base.system ^ ((a.system ^ base.system) | (b.system ^ base.system)),
        keywords: base.keywords ^ ((a.keywords ^ base.keywords) | (b.keywords ^ base.keywords)),
    }
}

fn union(a: Flags, b: Flags) -> Flags {
    Flags {
        system: a.system | b.system,
        keywords: a.keywords | b.keywords,
    }
}

/// Orders renames so that none lands on a directory another rename has yet to vacate, and
/// parents before their children; a cycle (two mailboxes swapping names) goes through a
/// temporary name.
pub(crate) fn order_renames(mut pending: Vec<RenameMailbox>) -> Vec<RenameMailbox> {
    // Parents first: with the fs layout a parent's rename moves its children, whose own
    // renames then find themselves done.
    pending.sort_by(|x, y| x.from_dir.cmp(&y.from_dir));
    let mut out = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let free = (0..pending.len()).find(|&k| {
            !pending
                .iter()
                .any(|other| other.from_dir == pending[k].to_dir)
        });
        match free {
            Some(k) => out.push(pending.remove(k)),
            None => {
                let first = &mut pending[0];
                let parked = format!("{}-mdsync-swap", first.from_dir);
                out.push(RenameMailbox {
                    from_dir: first.from_dir.clone(),
                    to_dir: parked.clone(),
                    name: first.name.clone(),
                });
                first.from_dir = parked;
            }
        }
    }
    out
}

/// A side's table with its mailboxes renamed as the merge decided, for the differ.
pub(crate) fn renamed_table<'t>(t: &'t MailTable, renames: &[RenameMailbox]) -> Cow<'t, MailTable> {
    if renames.is_empty() {
        return Cow::Borrowed(t);
    }
    let mut out = t.clone();
    // Simultaneous: every rename applies to the mailbox as scanned.
    let moves: HashMap<&str, &RenameMailbox> =
        renames.iter().map(|r| (r.from_dir.as_str(), r)).collect();
    for m in &mut out.mailboxes {
        if let Some(r) = moves.get(m.dir.as_str()) {
            m.dir = r.to_dir.clone();
            m.name = r.name.clone();
        }
    }
    // fs layout: a renamed folder takes the parent-only directories below it along.
    for p in &mut out.parents {
        let moved = renames.iter().find_map(|r| {
            let rest = p.strip_prefix(r.from_dir.as_str())?;
            rest.starts_with('/').then(|| format!("{}{rest}", r.to_dir))
        });
        if let Some(moved) = moved {
            *p = moved;
        }
    }
    out.parents.sort();
    out.mailboxes.sort_by(|x, y| x.dir.cmp(&y.dir));
    Cow::Owned(out)
}

/// The target table for side `own`: the merged mailboxes, and the root as both sides
/// should have it.
fn target_table(
    own: &MailTable,
    other: &MailTable,
    mailboxes: Vec<MailboxTable>,
    subscriptions: Option<Vec<u8>>,
) -> MailTable {
    let mut parents: Vec<String> = own.parents.iter().chain(&other.parents).cloned().collect();
    parents.sort();
    parents.dedup();
    let mut unfollowed: Vec<String> = own
        .unfollowed
        .iter()
        .chain(&other.unfollowed)
        .cloned()
        .collect();
    unfollowed.sort();
    unfollowed.dedup();
    MailTable {
        layout: own.layout,
        mailboxes: sorted(mailboxes),
        parents,
        unfollowed,
        subscriptions,
        uidvalidity_next: own.uidvalidity_next.max(other.uidvalidity_next),
        root_meta: pick_root_meta(own, other),
        scanned_at_ns: own.scanned_at_ns,
        anomalies: other.anomalies.clone(),
    }
}

/// Three-way merge of the `subscriptions` files, line by line after the header: a name
/// added on either side is added, one removed on either side (and not added on the other)
/// is removed.
pub fn merge_subscriptions(
    base: Option<&[u8]>,
    a: Option<&[u8]>,
    b: Option<&[u8]>,
) -> Option<Vec<u8>> {
    if a == b || b == base {
        return a.map(<[u8]>::to_vec);
    }
    if a == base {
        return b.map(<[u8]>::to_vec);
    }
    let split = |f: Option<&[u8]>| -> (Vec<u8>, Vec<Vec<u8>>) {
        let text = f.unwrap_or_default();
        let mut lines: Vec<&[u8]> = text.split(|&c| c == b'\n').collect();
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        // Dovecot 2.3 writes "V\t2", an empty line, then one name per line.
        let header_len = if lines.first().is_some_and(|l| l.starts_with(b"V\t")) {
            lines.iter().position(|l| l.is_empty()).map_or(1, |p| p + 1)
        } else {
            0
        };
        let mut header = Vec::new();
        for l in &lines[..header_len] {
            header.extend_from_slice(l);
            header.push(b'\n');
        }
        (
            header,
            lines[header_len..].iter().map(|l| l.to_vec()).collect(),
        )
    };
    let (header_a, names_a) = split(a);
    let (header_b, names_b) = split(b);
    let (_, names_base) = split(base);
    let in_base: HashSet<&Vec<u8>> = names_base.iter().collect();
    let set_a: HashSet<&Vec<u8>> = names_a.iter().collect();
    let set_b: HashSet<&Vec<u8>> = names_b.iter().collect();
    let mut out = if header_a.is_empty() {
        header_b
    } else {
        header_a
    };
    let keep_a = names_a
        .iter()
        .filter(|n| set_b.contains(n) || !in_base.contains(n));
    let keep_b = names_b
        .iter()
        .filter(|n| !set_a.contains(n) && !in_base.contains(n));
    for name in keep_a.chain(keep_b) {
        out.extend_from_slice(name);
        out.push(b'\n');
    }
    Some(out)
}

#[cfg(test)]
mod tests;
pub mod twins;
