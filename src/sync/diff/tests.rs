//! Unit tests of the differ on tables built in memory.

use super::*;
use crate::storage::maildir::uidlist::Header;
use crate::table::{DirMeta, MailTable, MailboxTable};

fn flags(letters: &str) -> Flags {
    let mut f = Flags::default();
    for b in letters.bytes() {
        f.insert_letter(b);
    }
    f
}

/// A mailbox with uidlist header V=`validity`, next uid `next`, and messages given as
/// (uid, base, flag letters, in_new).
fn mailbox(dir: &str, validity: u32, next: u32, msgs: &[(u32, &str, &str, bool)]) -> MailboxTable {
    let mut m = MailboxTable {
        dir: dir.into(),
        name: Layout::MaildirPlusPlus.display_name(dir),
        header: Some(Header {
            uid_validity: validity,
            next_uid: next,
            guid: None,
            extra: String::new(),
        }),
        next_uid: next,
        ..MailboxTable::default()
    };
    for &(uid, base, letters, in_new) in msgs {
        let f = flags(letters);
        let name = filename::compose(base, f, in_new);
        let bits = if in_new { status::IN_NEW } else { 0 };
        m.push(uid, &name, base.len(), f, 10, None, bits);
    }
    m.sort_by_uid();
    m
}

fn table(mailboxes: Vec<MailboxTable>) -> MailTable {
    MailTable {
        layout: Layout::MaildirPlusPlus,
        mailboxes,
        parents: Vec::new(),
        unfollowed: Vec::new(),
        subscriptions: None,
        uidvalidity_next: Some(1000),
        root_meta: DirMeta::default(),
        scanned_at_ns: 0,
        anomalies: Vec::new(),
    }
}

fn plan_of(src: &MailTable, dst: &MailTable) -> Plan {
    diff_backup(src, dst, &HashAnswers::new(), &DiffOptions::default())
}

#[test]
fn identical_tables_need_nothing() {
    let m = mailbox("", 7, 3, &[(1, "a", "S", false), (2, "b", "", true)]);
    let plan = plan_of(&table(vec![m.clone()]), &table(vec![m]));
    assert!(plan.is_empty(), "{plan:?}");
}

#[test]
fn flag_change_is_a_rename_only() {
    let src = table(vec![mailbox("", 7, 3, &[(1, "a", "RS", false)])]);
    let dst = table(vec![mailbox("", 7, 3, &[(1, "a", "S", false)])]);
    let plan = plan_of(&src, &dst);
    let m = &plan.mailboxes[0];
    assert_eq!(m.renames.len(), 1);
    assert_eq!(m.renames[0].to_name, "a:2,RS");
    assert!(m.copies.is_empty() && m.expunges.is_empty() && m.uidlist.is_none());
    assert_eq!(plan.counts().flag_changes, 1);
}

#[test]
fn a_flat_destination_takes_new_mail_without_a_move() {
    // mdbox has no new/: the destination lists every message in cur/ with a `:2,` name.
    let src = table(vec![mailbox(
        "",
        7,
        3,
        &[(1, "a", "", true), (2, "b", "S", true)],
    )]);
    let mut flat = mailbox("", 7, 3, &[(1, "a", "", false), (2, "b", "", false)]);
    flat.flat = true;
    let plan = plan_of(&src, &table(vec![flat.clone()]));
    let m = &plan.mailboxes[0];
    assert_eq!(m.renames.len(), 1, "{plan:?}");
    assert_eq!(
        (m.renames[0].uid, m.renames[0].to_name.as_str()),
        (2, "b:2,S")
    );
    assert_eq!(m.renames[0].to_sub, Subdir::Cur);
    flat.flat = false;
    assert_eq!(plan_of(&src, &table(vec![flat])).counts().moves, 1);
}

#[test]
fn new_to_cur_is_a_move() {
    let src = table(vec![mailbox("", 7, 2, &[(1, "a", "", false)])]);
    let dst = table(vec![mailbox("", 7, 2, &[(1, "a", "", true)])]);
    let plan = plan_of(&src, &dst);
    assert_eq!(plan.counts().moves, 1);
    assert_eq!(plan.mailboxes[0].renames[0].to_sub, Subdir::Cur);
}

#[test]
fn new_message_is_copied_with_its_uid() {
    let src = table(vec![mailbox(
        "",
        7,
        5,
        &[(1, "a", "S", false), (4, "d", "", true)],
    )]);
    let dst = table(vec![mailbox("", 7, 2, &[(1, "a", "S", false)])]);
    let plan = plan_of(&src, &dst);
    let m = &plan.mailboxes[0];
    assert_eq!(m.copies.len(), 1);
    assert_eq!(m.copies[0].dst_name, "d");
    let Some(UidlistChange::Write(edit)) = &m.uidlist else {
        panic!("uidlist edit expected")
    };
    assert_eq!(edit.upsert[0].uid, 4);
    assert_eq!(edit.header.next_uid, 5);
    assert!(!m.reset_index, "uid 4 >= destination next uid 2");
}

#[test]
fn extra_destination_message_is_expunged() {
    let src = table(vec![mailbox("", 7, 3, &[(1, "a", "S", false)])]);
    let dst = table(vec![mailbox(
        "",
        7,
        3,
        &[(1, "a", "S", false), (2, "b", "", false)],
    )]);
    let plan = plan_of(&src, &dst);
    let m = &plan.mailboxes[0];
    assert_eq!(m.expunges.len(), 1);
    let Some(UidlistChange::Write(edit)) = &m.uidlist else {
        panic!("uidlist edit expected")
    };
    assert_eq!(edit.remove, vec![2]);
}

#[test]
fn keyword_letters_are_translated_by_name() {
    let mut s = mailbox("", 7, 2, &[(1, "a", "Sa", false)]);
    s.keywords = KeywordMap::parse("0 $Junk\n");
    let mut d = mailbox("", 7, 2, &[(1, "a", "S", false)]);
    d.keywords = KeywordMap::parse("0 Other\n");
    let plan = plan_of(&table(vec![s]), &table(vec![d]));
    let m = &plan.mailboxes[0];
    assert_eq!(m.renames[0].to_name, "a:2,Sb");
    assert_eq!(m.keywords.as_ref().unwrap().render(), "0 Other\n1 $Junk\n");
}

#[test]
fn new_mailbox_gets_source_keywords_and_names_verbatim() {
    let mut s = mailbox(".Work", 9, 2, &[(1, "a", "Sb", false)]);
    s.keywords = KeywordMap::parse("1 NonJunk\n");
    let plan = plan_of(&table(vec![s]), &table(vec![]));
    let m = &plan.mailboxes[0];
    assert!(m.create.is_some() && m.maildirfolder);
    assert_eq!(m.copies[0].dst_name, "a:2,Sb");
    assert_eq!(m.keywords.as_ref().unwrap().render(), "1 NonJunk\n");
}

#[test]
fn missing_source_mailbox_is_deleted() {
    let src = table(vec![mailbox("", 7, 1, &[])]);
    let dst = table(vec![
        mailbox("", 7, 1, &[]),
        mailbox(".Old", 8, 2, &[(1, "x", "", false)]),
    ]);
    let plan = plan_of(&src, &dst);
    assert_eq!(plan.delete_mailboxes.len(), 1);
    assert_eq!(plan.counts().expunges, 1);
}

#[test]
fn guid_conflict_without_equal_content_replaces_the_message() {
    let src = table(vec![mailbox("", 7, 3, &[(2, "new-guid", "", false)])]);
    let dst = table(vec![mailbox("", 7, 3, &[(2, "old-guid", "", false)])]);
    let questions = hash_questions(&src, &dst, &DiffOptions::default());
    assert_eq!(questions.len(), 1);
    let plan = plan_of(&src, &dst);
    let m = &plan.mailboxes[0];
    assert_eq!((m.copies.len(), m.expunges.len()), (1, 1));
    assert!(
        m.reset_index,
        "uid 2 now names another file below next uid 3"
    );
}

#[test]
fn guid_conflict_with_equal_content_keeps_the_file_and_records_the_guid() {
    let src = table(vec![mailbox("", 7, 3, &[(2, "src-name", "S", false)])]);
    let dst = table(vec![mailbox("", 7, 3, &[(2, "dst-name", "", false)])]);
    let mut answers = HashAnswers::new();
    for q in hash_questions(&src, &dst, &DiffOptions::default()) {
        answers.insert(q, true);
    }
    let plan = diff_backup(&src, &dst, &answers, &DiffOptions::default());
    let m = &plan.mailboxes[0];
    assert!(m.copies.is_empty() && m.expunges.is_empty());
    assert_eq!(m.renames[0].to_name, "dst-name:2,S");
    let Some(UidlistChange::Write(edit)) = &m.uidlist else {
        panic!("uidlist edit expected")
    };
    assert_eq!(edit.upsert[0].guid.as_deref(), Some("src-name"));
    assert!(
        m.reset_index,
        "a changed GUID must not survive in Dovecot's cache"
    );
}

#[test]
fn other_uidvalidity_resets_the_index() {
    let src = table(vec![mailbox("", 7, 2, &[(1, "a", "", false)])]);
    let dst = table(vec![mailbox("", 99, 50, &[(1, "a", "", false)])]);
    let plan = plan_of(&src, &dst);
    let m = &plan.mailboxes[0];
    assert!(m.reset_index);
    let Some(UidlistChange::Write(edit)) = &m.uidlist else {
        panic!("uidlist edit expected")
    };
    assert_eq!((edit.header.uid_validity, edit.header.next_uid), (7, 2));
}

#[test]
fn unnumbered_message_is_copied_unnumbered() {
    let src = table(vec![mailbox(
        "",
        7,
        2,
        &[(1, "a", "", false), (0, "fresh", "", true)],
    )]);
    let dst = table(vec![mailbox("", 7, 2, &[(1, "a", "", false)])]);
    let plan = plan_of(&src, &dst);
    let m = &plan.mailboxes[0];
    assert_eq!(m.copies[0].uid, 0);
    assert!(
        m.uidlist.is_none(),
        "Dovecot numbers it on both sides alike"
    );
}

#[test]
fn unnumbered_destination_file_is_adopted_not_copied() {
    let src = table(vec![mailbox("", 7, 3, &[(2, "fresh", "S", false)])]);
    let dst = table(vec![mailbox("", 7, 2, &[(0, "fresh", "", true)])]);
    let plan = plan_of(&src, &dst);
    let m = &plan.mailboxes[0];
    assert!(m.copies.is_empty());
    assert_eq!(m.renames.len(), 1);
    assert!(!m.reset_index);
}

#[test]
fn copy_never_reuses_a_name_still_on_the_destination() {
    let src = table(vec![mailbox("", 7, 3, &[(2, "same-base", "", false)])]);
    let dst = table(vec![mailbox("", 7, 3, &[(1, "same-base", "", false)])]);
    let options = DiffOptions {
        fresh_name_prefix: "123.M1P1".into(),
        ..DiffOptions::default()
    };
    let plan = diff_backup(&src, &dst, &HashAnswers::new(), &options);
    let m = &plan.mailboxes[0];
    // The destination file with uid 1 is the same message (same GUID) under another UID:
    // it is renumbered, not copied.
    assert!(m.copies.is_empty());
    let Some(UidlistChange::Write(edit)) = &m.uidlist else {
        panic!("uidlist edit expected")
    };
    assert_eq!(edit.remove, vec![1]);
    assert_eq!(edit.upsert[0].uid, 2);
}

#[test]
fn broken_source_mailbox_is_left_alone() {
    let mut s = mailbox("", 7, 2, &[]);
    s.broken = Some("corrupt".into());
    let d = mailbox("", 7, 2, &[(1, "a", "", false)]);
    let plan = plan_of(&table(vec![s]), &table(vec![d]));
    assert!(plan.mailboxes.is_empty() && plan.delete_mailboxes.is_empty());
    assert_eq!(plan.skipped.len(), 1);
    assert!(!plan.skipped[0].changed, "bad input");
}

/// A folder renamed or deleted while it was read is left alone like a broken one, but
/// counts as changed during the run (exit 2), on either side.
#[test]
fn a_vanished_mailbox_is_left_alone_as_changed_during_the_run() {
    let vanished = |m: MailboxTable| MailboxTable {
        broken: Some("gone".into()),
        vanished: true,
        ..m
    };
    let s = mailbox(".A", 7, 2, &[]);
    let d = mailbox(".A", 7, 2, &[(1, "a", "", false)]);
    for (src, dst) in [(vanished(s.clone()), d.clone()), (s, vanished(d))] {
        let plan = plan_of(&table(vec![src]), &table(vec![dst]));
        assert!(plan.mailboxes.is_empty() && plan.delete_mailboxes.is_empty());
        assert_eq!(plan.skipped.len(), 1);
        assert!(plan.skipped[0].changed, "{:?}", plan.skipped);
    }
}

#[test]
fn checksum_mismatch_replaces_the_file_under_a_fresh_name() {
    let src = table(vec![mailbox("", 7, 3, &[(2, "same", "S", false)])]);
    let dst = table(vec![mailbox("", 7, 3, &[(2, "same", "S", false)])]);
    let options = DiffOptions {
        checksum: true,
        fresh_name_prefix: "123.M1P1".into(),
    };
    let questions = hash_questions(&src, &dst, &options);
    assert_eq!(questions.len(), 1, "--checksum asks about every pair");
    let answers: HashAnswers = questions.into_iter().map(|q| (q, false)).collect();
    let plan = diff_backup(&src, &dst, &answers, &options);
    let m = &plan.mailboxes[0];
    assert_eq!((m.copies.len(), m.expunges.len()), (1, 1));
    assert_ne!(
        m.copies[0].dst_name, "same:2,S",
        "never reuse a name still on disk"
    );
    let Some(UidlistChange::Write(edit)) = &m.uidlist else {
        panic!("uidlist edit expected")
    };
    assert_eq!(
        edit.upsert[0].guid.as_deref(),
        Some("same"),
        "GUID kept via G"
    );
}

#[test]
fn unnamed_letters_keep_their_letter_and_no_name_takes_it() {
    let mut s = mailbox("", 7, 3, &[(1, "x", "Sa", false), (2, "y", "Sb", false)]);
    s.keywords = KeywordMap::parse("1 foo\n");
    let d = mailbox("", 7, 3, &[(1, "x", "S", false), (2, "y", "S", false)]);
    let plan = plan_of(&table(vec![s]), &table(vec![d]));
    let m = &plan.mailboxes[0];
    let names: Vec<&str> = m.renames.iter().map(|r| r.to_name.as_str()).collect();
    assert_eq!(names, ["x:2,Sa", "y:2,Sb"]);
    assert_eq!(m.keywords.as_ref().unwrap().render(), "1 foo\n");
}

#[test]
fn odd_names_are_translated_keeping_their_tail() {
    let mut s = mailbox("", 7, 2, &[]);
    s.keywords = KeywordMap::parse("0 foo\n1 bar\n");
    let name = "x:2,Sb,tail";
    let parsed = filename::parse(name).unwrap();
    s.push(1, name, 1, parsed.flags, 10, None, status::ODD_NAME);
    let mut d = mailbox("", 7, 2, &[(1, "x", "S", false)]);
    d.keywords = KeywordMap::parse("0 bar\n");
    let plan = plan_of(&table(vec![s]), &table(vec![d]));
    assert_eq!(plan.mailboxes[0].renames[0].to_name, "x:2,Sa,tail");
}

#[test]
fn bringing_back_a_file_whose_record_lingers_resets_the_index() {
    let src = table(vec![mailbox("", 7, 11, &[(5, "back", "S", false)])]);
    let mut d = mailbox("", 7, 11, &[]);
    let base = d.intern("back");
    d.listed_missing.push((5, base));
    let plan = plan_of(&src, &table(vec![d]));
    let m = &plan.mailboxes[0];
    assert_eq!(m.copies.len(), 1);
    assert!(
        m.reset_index,
        "Dovecot's index may already call uid 5 expunged"
    );
}

#[test]
fn unfollowed_folders_are_neither_written_nor_deleted() {
    let src = table(vec![
        mailbox("", 7, 1, &[]),
        mailbox(".Evil", 8, 2, &[(1, "a", "", false)]),
    ]);
    let mut dst = table(vec![mailbox("", 7, 1, &[])]);
    dst.unfollowed.push(".Evil".into());
    let plan = plan_of(&src, &dst);
    assert!(plan.mailboxes.iter().all(|m| m.dir != ".Evil"));
    assert!(plan.skipped.iter().any(|s| s.path == ".Evil"));

    let mut src = table(vec![mailbox("", 7, 1, &[])]);
    src.unfollowed.push(".Arch".into());
    let dst = table(vec![
        mailbox("", 7, 1, &[]),
        mailbox(".Arch", 8, 2, &[(1, "a", "", false)]),
    ]);
    assert!(plan_of(&src, &dst).delete_mailboxes.is_empty());
}

/// `mailbox` with a mailbox GUID made of `byte`.
fn with_guid(mut m: MailboxTable, byte: u8) -> MailboxTable {
    if let Some(h) = m.header.as_mut() {
        h.guid = Some(crate::model::MailboxGuid([byte; 16]));
    }
    m
}

#[test]
fn a_folder_under_a_new_name_with_its_guid_is_a_rename() {
    let msgs = [(1, "a", "S", false)];
    let src = table(vec![with_guid(mailbox(".New", 7, 2, &msgs), 1)]);
    let dst = table(vec![with_guid(mailbox(".Old", 7, 2, &msgs), 1)]);
    let renames = mailbox_renames(&src, &dst);
    assert_eq!(renames.len(), 1);
    assert_eq!(
        (renames[0].from_dir.as_str(), renames[0].to_dir.as_str()),
        (".Old", ".New")
    );
    // Another UIDVALIDITY, another GUID, or two candidates: no rename.
    let other_validity = table(vec![with_guid(mailbox(".Old", 8, 2, &msgs), 1)]);
    assert!(mailbox_renames(&src, &other_validity).is_empty());
    let other_guid = table(vec![with_guid(mailbox(".Old", 7, 2, &msgs), 2)]);
    assert!(mailbox_renames(&src, &other_guid).is_empty());
    let twins = table(vec![
        with_guid(mailbox(".Old", 7, 2, &msgs), 1),
        with_guid(mailbox(".Older", 7, 2, &msgs), 1),
    ]);
    assert!(mailbox_renames(&src, &twins).is_empty());
    // fs layout: a folder with folders below it on the destination is copied instead.
    let mut src_fs = table(vec![with_guid(mailbox("New", 7, 2, &msgs), 1)]);
    let mut dst_fs = table(vec![
        with_guid(mailbox("Old", 7, 2, &msgs), 1),
        with_guid(mailbox("Old/Child", 7, 2, &msgs), 3),
    ]);
    src_fs.layout = Layout::Fs;
    dst_fs.layout = Layout::Fs;
    assert!(mailbox_renames(&src_fs, &dst_fs).is_empty());
}
