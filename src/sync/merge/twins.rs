//! Content twins for a first sync: in a mailbox the base does not know, the same mail may
//! sit on both sides under other GUIDs and other UIDs (imported separately, by IMAP or by
//! another tool). This lists the content comparisons that find them — candidates paired by
//! equal size, a bounded number per size — and finds a row's twin among the answers. Pure;
//! reads no file.

use std::collections::{HashMap, HashSet};

use crate::sync::base::BaseState;
use crate::sync::diff::{HashAnswers, HashQuestion};
use crate::table::{MailTable, MailboxTable, status};

/// At most this many comparisons per mailbox and size: a size shared by many messages on
/// both sides (empty or tiny generated mail) would otherwise ask for its square.
pub const MAX_PAIRS_PER_SIZE: usize = 16;

/// The comparisons a first sync needs: per mailbox both sides hold and the base does not
/// know, every message whose GUID the other side lacks against every such message of the
/// same size on the other side (bounded by [`MAX_PAIRS_PER_SIZE`]).
pub fn twin_questions(base: &BaseState, ta: &MailTable, tb: &MailTable) -> Vec<HashQuestion> {
    let mut out = Vec::new();
    for a in ta.mailboxes.iter().filter(|m| m.broken.is_none()) {
        let Some(b) = tb.mailbox(&a.dir).filter(|m| m.broken.is_none()) else {
            continue;
        };
        if base.mailbox(&a.dir).is_some() {
            continue;
        }
        out.extend(mailbox_twin_questions(a, b));
    }
    out
}

/// Rows of `m` whose GUID `other` lacks, by size (known sizes only).
fn lonely_by_size(m: &MailboxTable, other: &MailboxTable) -> HashMap<u32, Vec<usize>> {
    let theirs: HashSet<&str> = (0..other.len()).map(|j| other.guid(j)).collect();
    let mut by_size: HashMap<u32, Vec<usize>> = HashMap::new();
    for i in 0..m.len() {
        if m.has(i, status::BROKEN) || m.msgs.size[i] == 0 || theirs.contains(m.guid(i)) {
            continue;
        }
        by_size.entry(m.msgs.size[i]).or_default().push(i);
    }
    by_size
}

fn mailbox_twin_questions(a: &MailboxTable, b: &MailboxTable) -> Vec<HashQuestion> {
    let (in_a, in_b) = (lonely_by_size(a, b), lonely_by_size(b, a));
    let mut sizes: Vec<u32> = in_a
        .keys()
        .filter(|s| in_b.contains_key(s))
        .copied()
        .collect();
    sizes.sort_unstable();
    let mut out = Vec::new();
    for size in sizes {
        let (rows_a, rows_b) = (&in_a[&size], &in_b[&size]);
        let pairs = rows_a
            .iter()
            .flat_map(|&i| rows_b.iter().map(move |&j| (i, j)))
            .take(MAX_PAIRS_PER_SIZE);
        out.extend(pairs.map(|(i, j)| HashQuestion::between(a, i, b, j)));
    }
    out
}

/// B's rows by size, for [`find_twin`]: those `taken` does not mark.
pub fn by_size(b: &MailboxTable, taken: &[bool]) -> HashMap<u32, Vec<usize>> {
    let mut out: HashMap<u32, Vec<usize>> = HashMap::new();
    for j in (0..b.len()).filter(|&j| !taken[j] && b.msgs.size[j] != 0) {
        out.entry(b.msgs.size[j]).or_default().push(j);
    }
    out
}

/// A's row `i`'s twin in B: a row of the same size, not `taken`, that the answers found
/// equal in content.
pub fn find_twin(
    a: &MailboxTable,
    i: usize,
    b: &MailboxTable,
    candidates: &HashMap<u32, Vec<usize>>,
    taken: &[bool],
    answers: &HashAnswers,
) -> Option<usize> {
    let rows = candidates.get(&a.msgs.size[i])?;
    rows.iter().copied().filter(|&j| !taken[j]).find(|&j| {
        let question = HashQuestion::between(a, i, b, j);
        answers.get(&question).copied().unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Flags;

    fn mailbox(rows: &[(u32, &str, u32)]) -> MailboxTable {
        let mut m = MailboxTable {
            dir: ".Archive".into(),
            name: "Archive".into(),
            ..MailboxTable::default()
        };
        for &(uid, base, size) in rows {
            let name = format!("{base},S={size}:2,S");
            let base_len = name.find(':').unwrap_or(name.len());
            m.push(uid, &name, base_len, Flags::default(), size, None, 0);
        }
        m
    }

    fn table(m: MailboxTable) -> MailTable {
        MailTable {
            layout: crate::storage::maildir::layout::Layout::MaildirPlusPlus,
            mailboxes: vec![m],
            parents: Vec::new(),
            unfollowed: Vec::new(),
            subscriptions: None,
            uidvalidity_next: None,
            root_meta: Default::default(),
            scanned_at_ns: 0,
            anomalies: Vec::new(),
        }
    }

    #[test]
    fn same_size_lonely_messages_are_compared_and_shared_guids_are_not() {
        let a = mailbox(&[(1, "shared", 10), (2, "a-only", 20), (3, "a-odd", 30)]);
        let b = mailbox(&[(1, "shared", 10), (7, "b-only", 20), (8, "b-odd", 31)]);
        let questions = twin_questions(&BaseState::default(), &table(a), &table(b));
        assert_eq!(questions.len(), 1, "{questions:?}");
        assert!(questions[0].src.1.starts_with("a-only"));
        assert!(questions[0].dst.1.starts_with("b-only"));
    }

    #[test]
    fn a_size_shared_by_many_is_bounded() {
        let names: Vec<(String, String)> = (1..=10)
            .map(|u| (format!("a{u}"), format!("b{u}")))
            .collect();
        let rows = |pick: fn(&(String, String)) -> &String| -> Vec<(u32, &str, u32)> {
            (1..=10)
                .zip(&names)
                .map(|(u, n)| (u, pick(n).as_str(), 5))
                .collect()
        };
        let a = mailbox(&rows(|n| &n.0));
        let b = mailbox(&rows(|n| &n.1));
        let questions = twin_questions(&BaseState::default(), &table(a), &table(b));
        assert_eq!(questions.len(), MAX_PAIRS_PER_SIZE);
    }

    #[test]
    fn the_twin_is_the_answered_one_and_a_taken_row_is_skipped() {
        let a = mailbox(&[(2, "a-only", 20)]);
        let b = mailbox(&[(5, "b-x", 20), (7, "b-only", 20)]);
        let mut answers = HashAnswers::new();
        answers.insert(HashQuestion::between(&a, 0, &b, 0), false);
        answers.insert(HashQuestion::between(&a, 0, &b, 1), true);
        let mut taken = vec![false, false];
        let candidates = by_size(&b, &taken);
        assert_eq!(find_twin(&a, 0, &b, &candidates, &taken, &answers), Some(1));
        taken[1] = true;
        assert_eq!(find_twin(&a, 0, &b, &candidates, &taken, &answers), None);
    }
}
