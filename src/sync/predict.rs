//! Predicts the table a destination mailbox will have once its plan is applied. Both ends of
//! a remote session compute it from the same table and the same plan, so they agree, byte
//! for byte, on the baseline the next run's table delta is taken against — without a
//! rescan and without a byte on the wire. Pure; a wrong guess only makes the next delta
//! bigger, never a result wrong.

use std::collections::{HashMap, HashSet};

use crate::model::Subdir;
use crate::storage::maildir::filename;
use crate::sync::plan::{MailboxPlan, UidlistChange};
use crate::table::{Extras, MailboxTable, status};

/// `before` after `plan`.
pub fn predict(before: &MailboxTable, plan: &MailboxPlan) -> MailboxTable {
    let expunged: HashSet<(Subdir, &str)> = plan
        .expunges
        .iter()
        .map(|e| (e.sub, e.name.as_str()))
        .collect();
    let renamed: HashMap<(Subdir, &str), (Subdir, &str)> = plan
        .renames
        .iter()
        .map(|r| {
            (
                (r.from_sub, r.from_name.as_str()),
                (r.to_sub, r.to_name.as_str()),
            )
        })
        .collect();
    let edit = match &plan.uidlist {
        Some(UidlistChange::Write(edit)) => Some(edit),
        _ => None,
    };
    let removed: HashSet<u32> = edit
        .map(|e| e.remove.iter().copied().collect())
        .unwrap_or_default();
    let upserts: HashMap<u32, (Option<&str>, &str)> = edit
        .map(|e| {
            e.upsert
                .iter()
                .map(|r| (r.uid, (r.guid.as_deref(), r.ext.as_str())))
                .collect()
        })
        .unwrap_or_default();
    // A record for an existing file under a new UID (a two-way sync's renumbering) names
    // the file by its base.
    let renumbered: HashMap<&str, u32> = edit
        .map(|e| e.upsert.iter().map(|r| (r.base.as_str(), r.uid)).collect())
        .unwrap_or_default();
    let mut after = MailboxTable {
        dir: before.dir.clone(),
        name: if plan.name.is_empty() {
            before.name.clone()
        } else {
            plan.name.clone()
        },
        header: match &plan.uidlist {
            Some(UidlistChange::Write(edit)) => {
                let mut header = edit.header.clone();
                let before_n = before.header.as_ref().map_or(0, |h| h.next_uid);
                header.next_uid = header.next_uid.max(before_n);
                Some(header)
            }
            Some(UidlistChange::Remove) => None,
            None => before.header.clone(),
        },
        keywords: plan
            .keywords
            .clone()
            .unwrap_or_else(|| before.keywords.clone()),
        dir_meta: plan.create.unwrap_or(before.dir_meta),
        ..MailboxTable::default()
    };
    for i in 0..before.len() {
        let key = (before.subdir(i), before.name(i));
        if expunged.contains(&key) {
            continue;
        }
        let renamed_to = renamed.get(&key).copied();
        let mut uid = before.msgs.uid[i];
        if renamed_to.is_none()
            && !renumbered.contains_key(before.base(i))
            && !removed.contains(&uid)
            && !upserts.contains_key(&uid)
            && copied_as_is(before, i)
        {
            copy_row(&mut after, before, i);
            continue;
        }
        let (sub, name) = renamed_to.unwrap_or(key);
        if let Some(&to) = renumbered.get(before.base(i)) {
            uid = to;
        } else if removed.contains(&uid) && !upserts.contains_key(&uid) {
            uid = 0;
        }
        let extras = match upserts.get(&uid) {
            Some(&(guid, ext)) => (guid.map(str::to_string), ext.to_string()),
            None => (
                (before.guid(i) != before.base(i)).then(|| before.guid(i).to_string()),
                before.ext(i).to_string(),
            ),
        };
        let kept = before.msgs.status[i] & !(status::IN_NEW | status::ODD_NAME);
        push_row(
            &mut after,
            uid,
            sub,
            name,
            before.msgs.size[i],
            extras,
            kept,
        );
    }
    for copy in &plan.copies {
        let extras = upserts
            .get(&copy.uid)
            .map(|&(guid, ext)| (guid.map(str::to_string), ext.to_string()))
            .unwrap_or_default();
        let size = u32::try_from(copy.size).unwrap_or(u32::MAX);
        push_row(
            &mut after,
            copy.uid,
            copy.dst_sub,
            &copy.dst_name,
            size,
            extras,
            0,
        );
    }
    after.sort_by_uid();
    let last_uid = after.msgs.uid.iter().copied().max().unwrap_or(0);
    let header_n = after.header.as_ref().map_or(1, |h| h.next_uid);
    after.next_uid = header_n.max(last_uid + 1).max(before.next_uid);
    after
}

/// True when row `i` can be copied column by column: what [`push_row`] would work out
/// again from its name is what the scan stored (a Maildir name that parsed; an mdbox
/// table's flags come from its index, not its names).
fn copied_as_is(before: &MailboxTable, i: usize) -> bool {
    !before.flat && before.msgs.status[i] & status::BROKEN == 0
}

/// Row `i` of `before` as it is: the same name, flags, size and uidlist fields. The rows
/// of the mailboxes a plan touches are mostly these, and parsing their names again cost
/// most of a prediction.
fn copy_row(after: &mut MailboxTable, before: &MailboxTable, i: usize) {
    let (guid, base, ext) = (before.guid(i), before.base(i), before.ext(i));
    let extras = (guid != base || !ext.is_empty()).then(|| Extras {
        guid: (guid != base).then(|| after.intern(guid)),
        ext: (!ext.is_empty()).then(|| after.intern(ext)),
    });
    let name = after.intern(before.name(i));
    let msgs = &before.msgs;
    after.push_interned(
        msgs.uid[i],
        name,
        usize::from(msgs.base_len[i]),
        msgs.flags[i],
        msgs.size[i],
        extras,
        msgs.status[i],
    );
}

fn push_row(
    table: &mut MailboxTable,
    uid: u32,
    sub: Subdir,
    name: &str,
    size: u32,
    (guid, ext): (Option<String>, String),
    kept_bits: u8,
) {
    let parsed = filename::parse(name).ok();
    let base_len = parsed.as_ref().map_or(name.len(), |p| p.base.len());
    let flags = parsed.as_ref().map(|p| p.flags).unwrap_or_default();
    let mut bits = kept_bits;
    if sub == Subdir::New {
        bits |= status::IN_NEW;
    }
    if parsed.as_ref().is_some_and(|p| p.odd_info) {
        bits |= status::ODD_NAME;
    }
    let extras = (guid.is_some() || !ext.is_empty()).then(|| Extras {
        guid: guid.map(|g| table.intern(&g)),
        ext: (!ext.is_empty()).then(|| table.intern(&ext)),
    });
    table.push(uid, name, base_len, flags, size, extras, bits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Flags;
    use crate::storage::maildir::uidlist::{Header, OwnedRecord};
    use crate::sync::plan::{CopyOp, ExpungeOp, RenameOp, UidlistEdit};

    fn table(names: &[(u32, &str)]) -> MailboxTable {
        let mut t = MailboxTable {
            dir: ".A".into(),
            name: "A".into(),
            header: Some(Header {
                uid_validity: 7,
                next_uid: 10,
                guid: None,
                extra: String::new(),
            }),
            next_uid: 10,
            ..MailboxTable::default()
        };
        for &(uid, name) in names {
            let parsed = filename::parse(name).unwrap();
            t.push(uid, name, parsed.base.len(), parsed.flags, 100, None, 0);
        }
        t
    }

    #[test]
    fn the_prediction_is_the_table_a_rescan_would_find() {
        let before = table(&[(1, "a:2,S"), (2, "b:2,"), (3, "c:2,S")]);
        let plan = MailboxPlan {
            dir: ".A".into(),
            name: "A".into(),
            renames: vec![RenameOp {
                uid: 2,
                from_sub: Subdir::Cur,
                from_name: "b:2,".into(),
                to_sub: Subdir::Cur,
                to_name: "b:2,F".into(),
            }],
            expunges: vec![ExpungeOp {
                uid: 3,
                sub: Subdir::Cur,
                name: "c:2,S".into(),
            }],
            copies: vec![CopyOp {
                uid: 11,
                src_sub: Subdir::Cur,
                src_name: "d:2,S".into(),
                dst_sub: Subdir::Cur,
                dst_name: "d:2,S".into(),
                size: 100,
            }],
            uidlist: Some(UidlistChange::Write(UidlistEdit {
                header: Header {
                    uid_validity: 7,
                    next_uid: 12,
                    guid: None,
                    extra: String::new(),
                },
                remove: vec![3],
                upsert: vec![OwnedRecord {
                    uid: 11,
                    guid: None,
                    ext: String::new(),
                    base: "d".into(),
                }],
            })),
            ..MailboxPlan::default()
        };
        let predicted = predict(&before, &plan);
        let rescanned = table(&[(1, "a:2,S"), (2, "b:2,F"), (11, "d:2,S")]);
        let mut rescanned = rescanned;
        rescanned.header.as_mut().unwrap().next_uid = 12;
        rescanned.next_uid = 12;
        let encode = crate::wire::table::encode;
        assert_eq!(encode(&predicted), encode(&rescanned));
        assert_eq!(
            predicted.msgs.flags[1],
            Flags {
                system: 1 << 5,
                keywords: 0
            }
        );
    }

    /// Rows the plan leaves alone are copied column by column; the result is byte for byte
    /// what working each row out from its name gives (as for an mdbox table), on a table
    /// the Maildir scanner made: GUID and other uidlist fields, `new/`, an odd info part, a
    /// name that does not parse, a record without a file.
    #[test]
    fn untouched_rows_copied_as_is_predict_what_reparsing_them_predicts() {
        use crate::storage::maildir::layout::Layout;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let write = |rel: &str, text: &str| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write(
            "dovecot-uidlist",
            "3 V7 N9 G0f1e2d3c4b5a69788796a5b4c3d2e1f0\n1 G77 :a,S=3\n2 W12 :b,S=4\n\
             3 :c,S=1\n4 :d,S=2\n5 :e,S=1\n6 :f\n7 :gone,S=1\n",
        );
        write("cur/a,S=3:2,S", "abc");
        write("cur/b,S=4:2,FS", "abcd");
        write("cur/c,S=1:2,", "c");
        write("new/d,S=2", "dd");
        write("cur/e,S=1:2,S,odd", "e");
        write("cur/f:2,S=x", "f");
        let before = crate::scan::scan_mailbox(root, Layout::MaildirPlusPlus, "");
        assert!(before.broken.is_none() && before.len() >= 5, "{before:?}");
        let plan = MailboxPlan {
            renames: vec![RenameOp {
                uid: 3,
                from_sub: Subdir::Cur,
                from_name: "c,S=1:2,".into(),
                to_sub: Subdir::Cur,
                to_name: "c,S=1:2,F".into(),
            }],
            expunges: vec![ExpungeOp {
                uid: 1,
                sub: Subdir::Cur,
                name: "a,S=3:2,S".into(),
            }],
            copies: vec![CopyOp {
                uid: 9,
                src_sub: Subdir::Cur,
                src_name: "g,S=1:2,S".into(),
                dst_sub: Subdir::Cur,
                dst_name: "g,S=1:2,S".into(),
                size: 1,
            }],
            uidlist: Some(UidlistChange::Write(UidlistEdit {
                header: before.header.clone().unwrap(),
                remove: vec![1],
                upsert: vec![OwnedRecord {
                    uid: 9,
                    guid: Some("g-guid".into()),
                    ext: String::new(),
                    base: "g,S=1".into(),
                }],
            })),
            ..MailboxPlan::default()
        };
        let reparsed = MailboxTable {
            flat: true,
            ..before.clone()
        };
        let encode = crate::wire::table::encode;
        let fast = predict(&before, &plan);
        assert_eq!(encode(&fast), encode(&predict(&reparsed, &plan)));
        assert_eq!(fast.len(), before.len());
        let d = (0..fast.len()).find(|&i| fast.base(i) == "d,S=2").unwrap();
        assert_eq!(fast.subdir(d), Subdir::New);
        let b = (0..fast.len()).find(|&i| fast.base(i) == "b,S=4").unwrap();
        assert_eq!(fast.ext(b), before.ext(1));
    }
}
