//! The differ: a pure function from two replica tables (and content-hash answers) to the
//! [`Plan`] that makes the destination equal to the source as Dovecot sees it. Parallel across
//! mailboxes with rayon. No filesystem, no clock.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use crate::model::{Flags, Subdir};
use crate::storage::maildir::filename;
use crate::storage::maildir::keywords::{KeywordMap, LETTERS};
use crate::storage::maildir::layout::Layout;
use crate::storage::maildir::uidlist::{Header, OwnedRecord};
use crate::sync::plan::{
    CopyOp, DeleteMailbox, ExpungeOp, MailboxPlan, Plan, RenameMailbox, RenameOp, Skipped,
    UidlistChange, UidlistEdit,
};
use crate::table::{MailTable, MailboxTable, NameHash, status};

/// Knobs of the differ.
#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// Compare every matched pair by content, not only by GUID.
    pub checksum: bool,
    /// A prefix for fresh base names when a copy must not reuse the source's (a clash on
    /// the destination); the differ appends a counter. Must be unique per run.
    pub fresh_name_prefix: String,
}

/// A pair of files whose contents must be compared before the differ can decide.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HashQuestion {
    /// Mailbox directory (same on both sides).
    pub dir: String,
    /// Source subdirectory and name.
    pub src: (Subdir, String),
    /// Destination subdirectory and name.
    pub dst: (Subdir, String),
}

impl HashQuestion {
    /// "Are row `i` of `s` and row `j` of `d` the same content?", in `s`'s mailbox.
    pub fn between(s: &MailboxTable, i: usize, d: &MailboxTable, j: usize) -> HashQuestion {
        HashQuestion {
            dir: s.dir.clone(),
            src: (s.subdir(i), s.name(i).to_string()),
            dst: (d.subdir(j), d.name(j).to_string()),
        }
    }
}

/// Answers to [`HashQuestion`]s: the pairs whose contents are equal. A question without an
/// answer counts as "different" when GUIDs disagree and "equal" when they agree.
pub type HashAnswers = HashMap<HashQuestion, bool>;

/// Lists the content comparisons the differ needs: same UID but different GUIDs, and with
/// `--checksum` every pair it would otherwise trust by GUID.
pub fn hash_questions(
    src: &MailTable,
    dst: &MailTable,
    options: &DiffOptions,
) -> Vec<HashQuestion> {
    src.mailboxes
        .par_iter()
        .filter(|s| s.broken.is_none())
        .filter_map(|s| dst.mailbox(&s.dir).map(|d| (s, d)))
        .flat_map_iter(|(s, d)| mailbox_questions(s, d, options))
        .collect()
}

fn mailbox_questions(
    s: &MailboxTable,
    d: &MailboxTable,
    options: &DiffOptions,
) -> Vec<HashQuestion> {
    let mut out = Vec::new();
    for (i, j) in s.rows_by_uid(d).into_iter().enumerate() {
        let Some(j) = j else {
            continue;
        };
        if s.has(i, status::BROKEN) || d.has(j, status::BROKEN) {
            continue;
        }
        if options.checksum || s.guid(i) != d.guid(j) {
            out.push(HashQuestion::between(s, i, d, j));
        }
    }
    out
}

/// Destination mailboxes that are a source mailbox under another name: the same mailbox
/// GUID and UIDVALIDITY, the source's directory absent on the destination and the
/// destination's absent on the source, exactly one candidate each way. A backup renames
/// them with one `rename()` instead of copying every message again and deleting the old
/// folder (which, for a big folder, would also trip the delete guard). With `LAYOUT=fs`, a
/// folder with mailboxes below it on the destination is not renamed (the rename would move
/// them too, out of the places the plan expects them); it is copied and deleted as before.
pub fn mailbox_renames(src: &MailTable, dst: &MailTable) -> Vec<RenameMailbox> {
    type Key = (crate::model::MailboxGuid, u32);
    let key = |m: &MailboxTable| -> Option<Key> {
        let header = m.header.as_ref()?;
        Some((m.guid_of_mailbox()?, header.uid_validity))
    };
    let usable = |m: &MailboxTable| !m.dir.is_empty() && m.broken.is_none();
    let only_in = |t: &MailTable, other: &MailTable| -> HashMap<Key, Vec<usize>> {
        let mut by_key: HashMap<Key, Vec<usize>> = HashMap::new();
        for (i, m) in t.mailboxes.iter().enumerate() {
            if usable(m)
                && other.mailbox(&m.dir).is_none()
                && !other.is_unfollowed(&m.dir)
                && let Some(k) = key(m)
            {
                by_key.entry(k).or_default().push(i);
            }
        }
        by_key
    };
    let (src_only, dst_only) = (only_in(src, dst), only_in(dst, src));
    let has_children = |dir: &str| {
        dst.layout == Layout::Fs
            && dst
                .mailboxes
                .iter()
                .any(|m| m.dir.strip_prefix(dir).is_some_and(|r| r.starts_with('/')))
    };
    let mut renames: Vec<RenameMailbox> = src_only
        .iter()
        .filter_map(|(k, s)| {
            let (&[s], Some(&[d])) = (s.as_slice(), dst_only.get(k).map(Vec::as_slice)) else {
                return None;
            };
            let (s, d) = (&src.mailboxes[s], &dst.mailboxes[d]);
            (!has_children(&d.dir)).then(|| RenameMailbox {
                from_dir: d.dir.clone(),
                to_dir: s.dir.clone(),
                name: s.name.clone(),
            })
        })
        .collect();
    renames.sort_by(|x, y| x.from_dir.cmp(&y.from_dir));
    renames
}

/// Computes the plan for a one-way mirror of `src` onto `dst`.
pub fn diff_backup(
    src: &MailTable,
    dst: &MailTable,
    answers: &HashAnswers,
    options: &DiffOptions,
) -> Plan {
    let mut plan = Plan::default();
    let mut skipped: Vec<Skipped> = Vec::new();
    let mut warnings: Vec<Skipped> = Vec::new();
    let all_anomalies = src
        .anomalies
        .iter()
        .chain(src.mailboxes.iter().flat_map(|m| &m.anomalies));
    for a in all_anomalies {
        let item = Skipped {
            path: a.path.clone(),
            why: a.what.clone(),
            changed: false,
        };
        if a.serious {
            skipped.push(item)
        } else {
            warnings.push(item)
        }
    }
    let results: Vec<(Option<MailboxPlan>, Vec<Skipped>)> = src
        .mailboxes
        .par_iter()
        .enumerate()
        .map(|(n, s)| {
            if dst.is_unfollowed(&s.dir) {
                let why = "the destination folder is a symlink (or has an odd name); left alone";
                return (
                    None,
                    vec![Skipped {
                        path: s.dir.clone(),
                        why: why.into(),
                        changed: false,
                    }],
                );
            }
            let mut ctx = MailboxDiff::new(s, dst.mailbox(&s.dir), src.layout, answers, options, n);
            let plan = ctx.run();
            (plan, ctx.skipped)
        })
        .collect();
    for (mailbox_plan, mut mailbox_skipped) in results {
        skipped.append(&mut mailbox_skipped);
        if let Some(p) = mailbox_plan.filter(|p| !p.is_empty()) {
            plan.mailboxes.push(p);
        }
    }
    for d in &dst.mailboxes {
        // A source folder that was not followed is not a deleted one: its copy stays.
        if src.mailbox(&d.dir).is_none() && !src.is_unfollowed(&d.dir) {
            plan.delete_mailboxes.push(DeleteMailbox {
                dir: d.dir.clone(),
                name: d.name.clone(),
                messages: d.message_count(),
            });
        }
    }
    plan_parents(src, dst, &mut plan);
    if src.subscriptions != dst.subscriptions {
        plan.subscriptions = Some(src.subscriptions.clone());
    }
    plan.uidvalidity_next = uidvalidity_floor(src, dst);
    plan.skipped = skipped;
    plan.warnings = warnings;
    plan.root_meta = src.root_meta;
    plan.sweep = dst.mailboxes.iter().map(|m| m.dir.clone()).collect();
    plan
}

/// fs layout: parent-only directories are mirrored too, so Dovecot lists the same
/// `\NoSelect` hierarchy on both sides.
fn plan_parents(src: &MailTable, dst: &MailTable, plan: &mut Plan) {
    plan.create_parents = parents_missing_in(src, dst);
    plan.remove_parents = parents_missing_in(dst, src);
}

/// Parent-only directories of `from` that `to` has neither as a parent nor as a mailbox,
/// leaving out those below a folder `to` does not follow.
fn parents_missing_in(from: &MailTable, to: &MailTable) -> Vec<String> {
    let to_dirs: HashSet<&str> = to
        .parents
        .iter()
        .map(String::as_str)
        .chain(to.mailboxes.iter().map(|m| m.dir.as_str()))
        .collect();
    from.parents
        .iter()
        .filter(|p| !to_dirs.contains(p.as_str()) && !to.is_unfollowed(p))
        .cloned()
        .collect()
}

/// The destination's `dovecot-uidvalidity` must not fall below the source's, or below any
/// UIDVALIDITY the mirror now uses, so Dovecot never hands one out twice.
fn uidvalidity_floor(src: &MailTable, dst: &MailTable) -> Option<u32> {
    let highest_used = src
        .mailboxes
        .iter()
        .filter_map(|m| m.header.as_ref().map(|h| h.uid_validity))
        .max()
        .unwrap_or(0);
    let wanted = src.uidvalidity_next.unwrap_or(0).max(highest_used);
    (wanted > 0 && dst.uidvalidity_next.is_none_or(|d| d < wanted)).then_some(wanted)
}

/// Flags with keyword letters moved by `map` (letter index → letter index); letters mapped
/// to `None` are dropped, system flags are kept.
pub(crate) fn translate_letters(flags: Flags, map: &[Option<u8>; LETTERS]) -> Flags {
    let mut out = Flags {
        system: flags.system,
        keywords: 0,
    };
    // Only the letters that are set: most messages carry none or one.
    let mut letters = flags.keywords;
    while letters != 0 {
        let i = letters.trailing_zeros() as usize;
        letters &= letters - 1;
        if let Some(to) = map[i] {
            out.keywords |= 1 << to;
        }
    }
    out
}

/// Working state of one mailbox's diff.
struct MailboxDiff<'a> {
    s: &'a MailboxTable,
    d: Option<&'a MailboxTable>,
    layout: Layout,
    answers: &'a HashAnswers,
    options: &'a DiffOptions,
    mailbox_index: usize,
    /// Destination keyword map after this run.
    keywords: KeywordMap,
    /// Source letter index → destination letter index.
    letter_map: [Option<u8>; LETTERS],
    used: Vec<bool>,
    /// Source message index → destination message with the same UID.
    dst_row: Vec<Option<usize>>,
    /// Destination base name → message index, built on first need (a no-change run that
    /// matches everything by UID never pays for it).
    by_base: Option<HashMap<&'a str, usize, NameHash>>,
    plan: MailboxPlan,
    skipped: Vec<Skipped>,
    fresh_names: u32,
}

impl<'a> MailboxDiff<'a> {
    fn new(
        s: &'a MailboxTable,
        d: Option<&'a MailboxTable>,
        layout: Layout,
        answers: &'a HashAnswers,
        options: &'a DiffOptions,
        mailbox_index: usize,
    ) -> Self {
        MailboxDiff {
            s,
            d,
            layout,
            answers,
            options,
            mailbox_index,
            keywords: KeywordMap::default(),
            letter_map: [None; LETTERS],
            used: vec![false; d.map_or(0, MailboxTable::len)],
            dst_row: d.map_or_else(Vec::new, |d| s.rows_by_uid(d)),
            by_base: None,
            plan: MailboxPlan {
                dir: s.dir.clone(),
                name: s.name.clone(),
                ..MailboxPlan::default()
            },
            skipped: Vec::new(),
            fresh_names: 0,
        }
    }

    fn run(&mut self) -> Option<MailboxPlan> {
        if self.s.unchanged.is_some() {
            // Both sides still have the stamps of the last in-sync run (the brain reads any
            // mailbox that is unchanged on one side only).
            return None;
        }
        if let Some(why) = &self.s.broken {
            let why = format!("source mailbox left alone: {why}");
            self.skip_changed(&self.s.dir.clone(), &why, self.s.vanished);
            return None;
        }
        if let Some(d) = self.d
            && let Some(why) = &d.broken
        {
            let why = format!("destination mailbox left alone: {why}");
            self.skip_changed(&self.s.dir.clone(), &why, d.vanished);
            return None;
        }
        // An empty shell (no uidlist, no mail) is what a run killed while creating the
        // mailbox could leave: it is created again, owner and mode included.
        let shell = self
            .d
            .is_some_and(|d| d.header.is_none() && d.is_empty() && d.listed_missing.is_empty());
        if self.d.is_none() || shell {
            self.plan.create = Some(self.s.dir_meta);
            self.plan.maildirfolder =
                self.layout == Layout::MaildirPlusPlus && !self.s.dir.is_empty();
        }
        self.plan_keywords();
        let mut upserts = Vec::new();
        let mut removes = Vec::new();
        let matches = self.match_all();
        for (i, matched) in matches.into_iter().enumerate() {
            self.plan_message(i, matched, &mut upserts, &mut removes);
        }
        self.plan_expunges(&mut removes);
        self.plan_uidlist(upserts, removes);
        Some(std::mem::take(&mut self.plan))
    }

    fn skip(&mut self, path: &str, why: &str) {
        self.skip_changed(path, why, false);
    }

    /// Skips `path`; `changed` when it changed while the run read it (see
    /// [`Skipped::changed`]).
    fn skip_changed(&mut self, path: &str, why: &str, changed: bool) {
        self.skipped.push(Skipped {
            path: path.to_string(),
            why: why.to_string(),
            changed,
        });
    }

    /// Builds the destination keyword map: the source's exactly for a new mailbox, else the
    /// destination's extended with the source's names (letters differ between replicas).
    fn plan_keywords(&mut self) {
        let Some(d) = self.d else {
            self.keywords = self.s.keywords.clone();
            self.letter_map = std::array::from_fn(|i| Some(i as u8));
            if !self.keywords.is_empty() {
                self.plan.keywords = Some(self.keywords.clone());
            }
            return;
        };
        self.keywords = d.keywords.clone();
        // Letters in use on the source without a name (Dovecot shows `unknown-N`) keep their
        // letter when it is free here, and no name may take it from them.
        let in_use = self
            .s
            .msgs
            .flags
            .iter()
            .fold(0u32, |acc, f| acc | f.keywords);
        let mut reserved = 0u32;
        for i in 0..LETTERS {
            if self.s.keywords.name(i).is_none() && self.keywords.name(i).is_none() {
                self.letter_map[i] = Some(i as u8);
                if in_use & (1 << i) != 0 {
                    reserved |= 1 << i;
                }
            }
        }
        for (i, name) in self.s.keywords.names.iter().enumerate() {
            let Some(name) = name else { continue };
            match self.keywords.assign_avoiding(name, reserved) {
                Some(letter) => self.letter_map[i] = Some(letter as u8),
                None => {
                    self.letter_map[i] = None;
                    let why = format!("keyword {name} does not fit in 26 letters; dropped");
                    self.skip(&self.s.dir.clone(), &why);
                }
            }
        }
        // An mdbox index learns a keyword's name when a message first gets it, and its
        // list is never rewritten: a flat destination needs the new map only where a
        // message uses a letter that names something new.
        if self.keywords != d.keywords && (!d.flat || self.uses_new_letters(d, in_use)) {
            self.plan.keywords = Some(self.keywords.clone());
        }
    }

    /// Whether a source letter in `in_use` lands on a destination letter whose name the
    /// destination's current map does not give it.
    fn uses_new_letters(&self, d: &MailboxTable, in_use: u32) -> bool {
        (0..LETTERS)
            .filter(|i| in_use & (1 << i) != 0)
            .filter_map(|i| self.letter_map[i])
            .any(|l| self.keywords.name(l as usize) != d.keywords.name(l as usize))
    }

    fn translate(&self, flags: Flags) -> Flags {
        translate_letters(flags, &self.letter_map)
    }

    /// The name a source message should have on the destination, given the base it has
    /// there. Verbatim when nothing needs translating, so odd names survive.
    fn target_name(&self, i: usize, base: &str, in_new: bool) -> String {
        let s = self.s;
        let flags = s.msgs.flags[i];
        let translated = self.translate(flags);
        if base == s.base(i)
            && translated == flags
            && !s.has(i, status::STALE_NAME)
            && in_new == (s.subdir(i) == Subdir::New)
        {
            return s.name(i).to_string();
        }
        let mut name = filename::compose(base, translated, in_new);
        if s.has(i, status::ODD_NAME) {
            // Keep an opaque tail after the flag letters (`:2,Sa,tail`) as it was.
            name.push_str(filename::info_tail(s.name(i)));
        }
        name
    }

    fn plan_message(
        &mut self,
        i: usize,
        matched: Option<usize>,
        upserts: &mut Vec<OwnedRecord>,
        removes: &mut Vec<u32>,
    ) {
        let s = self.s;
        if s.has(i, status::BROKEN) {
            self.skip(&s.rel_path(i), "cannot be copied; destination copy kept");
            return;
        }
        match matched {
            Some(j) => self.plan_matched(i, j, upserts, removes),
            None => self.plan_copy(i, upserts),
        }
    }

    /// Pairs every source message with the destination message that is the same message.
    /// First by identity for all messages — same UID and GUID, else the same base name and
    /// GUID under another UID — and only then, for what is left, by equal content under the
    /// same UID, so a content match never takes a file that is another message's exact match.
    fn match_all(&mut self) -> Vec<Option<usize>> {
        let n = self.s.len();
        let mut matches = vec![None; n];
        if self.d.is_none() {
            return matches;
        }
        let mut rotten = vec![false; n];
        for i in 0..n {
            let (found, is_rotten) = self.identity_match(i);
            matches[i] = found;
            rotten[i] = is_rotten;
            if let Some(j) = found {
                self.used[j] = true;
            }
        }
        for i in 0..n {
            if matches[i].is_none() && !rotten[i] {
                matches[i] = self.content_match(i);
                if let Some(j) = matches[i] {
                    self.used[j] = true;
                }
            }
        }
        matches
    }

    /// Same UID and GUID (with `--checksum`, and equal content), else an unclaimed file with
    /// the same base name and GUID. The flag is true when the same-UID, same-GUID file has
    /// other content (`--checksum`): it must not come back by name or content.
    fn identity_match(&mut self, i: usize) -> (Option<usize>, bool) {
        let (s, d) = (self.s, self.d.expect("destination exists"));
        if let Some(j) = self.dst_row[i]
            && !self.used[j]
            && s.guid(i) == d.guid(j)
        {
            return if self.same_message(i, j) {
                (Some(j), false)
            } else {
                (None, true)
            };
        }
        let Some(&j) = self.dst_by_base().get(s.base(i)) else {
            return (None, false);
        };
        // Another GUID is the same message only where the answers vouch for this very
        // pair: a two-way sync's content twin under another UID, whose file stays.
        let same = !self.used[j]
            && self.dst_row[i] != Some(j)
            && (d.guid(j) == s.guid(i) || self.vouched(i, j));
        (same.then_some(j), false)
    }

    /// Whether the answers hold "equal content" for source row `i` and destination row `j`.
    fn vouched(&self, i: usize, j: usize) -> bool {
        self.answer(i, j).unwrap_or(false)
    }

    /// The content answer for source row `i` and destination row `j`, if asked.
    fn answer(&self, i: usize, j: usize) -> Option<bool> {
        let d = self.d.expect("destination exists");
        let question = HashQuestion::between(self.s, i, d, j);
        self.answers.get(&question).copied()
    }

    /// Same UID, different GUID, equal content (a file renamed by hand or written by
    /// another MDA).
    fn content_match(&self, i: usize) -> Option<usize> {
        let (s, d) = (self.s, self.d?);
        let j = self.dst_row[i]?;
        (!self.used[j] && s.guid(i) != d.guid(j) && self.same_message(i, j)).then_some(j)
    }

    fn dst_by_base(&mut self) -> &HashMap<&'a str, usize, NameHash> {
        let d = self.d;
        self.by_base.get_or_insert_with(|| {
            d.map(|d| (0..d.len()).map(|j| (d.base(j), j)).collect())
                .unwrap_or_default()
        })
    }

    fn same_message(&self, i: usize, j: usize) -> bool {
        let (s, d) = (self.s, self.d.expect("destination exists"));
        if s.has(i, status::BROKEN) || d.has(j, status::BROKEN) {
            return s.guid(i) == d.guid(j);
        }
        let guids_agree = s.guid(i) == d.guid(j);
        if guids_agree && !self.options.checksum {
            return true;
        }
        self.answer(i, j).unwrap_or(guids_agree)
    }

    fn plan_matched(
        &mut self,
        i: usize,
        j: usize,
        upserts: &mut Vec<OwnedRecord>,
        removes: &mut Vec<u32>,
    ) {
        let (s, d) = (self.s, self.d.expect("matched implies destination"));
        // A flat destination (mdbox) has no `new/`: where the source keeps a message is
        // not a difference there.
        let to_sub = if d.flat { d.subdir(j) } else { s.subdir(i) };
        // The common case — same name, same folder, keyword letters that mean the same —
        // is settled without building a name.
        let unchanged = to_sub == d.subdir(j)
            && s.name(i) == d.name(j)
            && !s.has(i, status::STALE_NAME)
            && self.translate(s.msgs.flags[i]) == s.msgs.flags[i];
        let to_name = if unchanged {
            None
        } else {
            Some(self.target_name(i, d.base(j), to_sub == Subdir::New))
        };
        if let Some(to_name) = to_name.filter(|n| n != d.name(j) || to_sub != d.subdir(j)) {
            self.plan.renames.push(RenameOp {
                uid: s.msgs.uid[i],
                from_sub: d.subdir(j),
                from_name: d.name(j).to_string(),
                to_sub,
                to_name,
            });
        }
        let (src_uid, dst_uid) = (s.msgs.uid[i], d.msgs.uid[j]);
        if src_uid == 0 {
            if dst_uid != 0 {
                removes.push(dst_uid);
            }
            return;
        }
        // Compared borrowed: the record is built only when it must be written.
        let base = d.base(j);
        let wanted_guid = Some(s.guid(i)).filter(|&g| g != base);
        let dst_guid_field = Some(d.guid(j)).filter(|&g| g != base);
        if dst_uid != src_uid || wanted_guid != dst_guid_field || s.ext(i) != d.ext(j) {
            if dst_uid != 0 && dst_uid != src_uid {
                removes.push(dst_uid);
            }
            upserts.push(self.record_for(i, base));
        }
    }

    /// The uidlist record a source message needs when its file is called `base` here.
    fn record_for(&self, i: usize, base: &str) -> OwnedRecord {
        let guid = self.s.guid(i);
        OwnedRecord {
            uid: self.s.msgs.uid[i],
            guid: (guid != base).then(|| guid.to_string()),
            ext: self.s.ext(i).to_string(),
            base: base.to_string(),
        }
    }

    fn plan_copy(&mut self, i: usize, upserts: &mut Vec<OwnedRecord>) {
        let s = self.s;
        let base = if self.base_taken(s.base(i)) {
            self.fresh_base(s.base(i))
        } else {
            s.base(i).to_string()
        };
        let dst_name = self.target_name(i, &base, s.subdir(i) == Subdir::New);
        if s.msgs.uid[i] != 0 {
            upserts.push(self.record_for(i, &base));
        }
        self.plan.copies.push(CopyOp {
            uid: s.msgs.uid[i],
            src_sub: s.subdir(i),
            src_name: s.name(i).to_string(),
            dst_sub: s.subdir(i),
            dst_name,
            size: u64::from(s.msgs.size[i]),
        });
    }

    /// True when the destination already has a file with this base that is kept (matched)
    /// or about to be expunged: a copy must not reuse the name while the old file exists.
    fn base_taken(&mut self, base: &str) -> bool {
        self.d.is_some() && self.dst_by_base().contains_key(base)
    }

    /// A new unique base, keeping the source's `,S=`/`,W=` fields (they describe the body).
    fn fresh_base(&mut self, src_base: &str) -> String {
        self.fresh_names += 1;
        let size_fields = src_base.find(",S=").map_or("", |p| &src_base[p..]);
        format!(
            "{}Q{}x{}{}",
            self.options.fresh_name_prefix, self.mailbox_index, self.fresh_names, size_fields
        )
    }

    fn plan_expunges(&mut self, removes: &mut Vec<u32>) {
        let Some(d) = self.d else { return };
        for j in 0..d.len() {
            if self.used[j] {
                continue;
            }
            if d.has(j, status::BROKEN) {
                let why = "destination entry is not a regular file; left alone";
                self.skip(&d.rel_path(j), why);
                continue;
            }
            self.plan.expunges.push(ExpungeOp {
                uid: d.msgs.uid[j],
                sub: d.subdir(j),
                name: d.name(j).to_string(),
            });
            if d.msgs.uid[j] != 0 {
                removes.push(d.msgs.uid[j]);
            }
        }
    }

    /// Decides the uidlist edit and whether Dovecot's index must be reset.
    fn plan_uidlist(&mut self, upserts: Vec<OwnedRecord>, mut removes: Vec<u32>) {
        let s = self.s;
        let Some(src_header) = &s.header else {
            if self.d.is_some_and(|d| d.header.is_some()) {
                self.plan.uidlist = Some(UidlistChange::Remove);
                self.plan.reset_index = true;
            }
            return;
        };
        let d_header = self.d.and_then(|d| d.header.as_ref());
        let same_generation = d_header.is_some_and(|h| h.uid_validity == src_header.uid_validity);
        let d_next = self.d.filter(|_| same_generation).map_or(0, |d| d.next_uid);
        let header = Header {
            next_uid: s.next_uid.max(d_next),
            ..src_header.clone()
        };
        let header_changed = d_header.is_none_or(|h| {
            h.uid_validity != header.uid_validity
                || h.guid != header.guid
                || h.extra != header.extra
                || self.d.is_some_and(|d| d.next_uid < header.next_uid)
        });
        if upserts.is_empty() && removes.is_empty() && !header_changed {
            return;
        }
        if let Some(d) = self.d {
            removes.extend(d.listed_missing.iter().map(|&(uid, _)| uid));
            self.plan.reset_index = !same_generation || self.rebinds_below_next(d, &upserts);
        }
        removes.sort_unstable();
        removes.dedup();
        let mut upserts = upserts;
        upserts.sort_by_key(|r| r.uid);
        self.plan.uidlist = Some(UidlistChange::Write(UidlistEdit {
            header,
            remove: removes,
            upsert: upserts,
        }));
    }

    /// True when a record binds a UID below the destination's next UID to a file that UID
    /// did not name before: Dovecot's index would call it an expunged message reappearing.
    fn rebinds_below_next(&self, d: &MailboxTable, upserts: &[OwnedRecord]) -> bool {
        // Only files that exist count: a record whose file is gone may already be marked
        // expunged in Dovecot's index, which would renumber the message brought back. The
        // listed files have unique UIDs, so the file with this UID is the only candidate.
        upserts.iter().any(|r| {
            let file = d.find_uid(r.uid).filter(|&j| d.base(j) == r.base);
            r.uid < d.next_uid && file.is_none()
                || file.is_some_and(|j| (d.guid(j) != d.base(j)) != r.guid.is_some())
        })
    }
}

#[cfg(test)]
mod tests;
