//! Property tests of the whole local engine on real directories: random source and
//! destination Maildir trees → `backup` → the destination shows the same mailboxes, UIDs,
//! GUIDs, flags, keyword names and bodies as the source, and a second run has nothing to do.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use mdsync::progress::NoProgress;
use mdsync::replica::local::LocalReplica;
use mdsync::scan::{self, ScanOptions};
use mdsync::storage::maildir::writer::{FsyncPolicy, Ownership};
use mdsync::sync::apply::ApplyOptions;
use mdsync::sync::backup::{BackupOptions, DeleteLimit, backup};
use mdsync::sync::diff::DiffOptions;
use mdsync::table::MailTable;
use proptest::prelude::*;

const MAILBOXES: [&str; 3] = ["", ".Sent", ".A.B"];
const KEYWORDS: [&str; 3] = ["$Junk", "NonJunk", "$label1"];

/// One message as placed in a generated tree.
#[derive(Debug, Clone)]
struct GenMessage {
    uid_step: u32,
    body: u8,
    base_variant: u8,
    system: u8,
    keywords: u8,
    in_new: bool,
    listed: bool,
}

#[derive(Debug, Clone)]
struct GenMailbox {
    present: bool,
    validity: u32,
    keyword_letters: [u8; 3],
    /// How many of [`KEYWORDS`] this mailbox's `dovecot-keywords` names.
    known_keywords: usize,
    messages: Vec<GenMessage>,
}

fn gen_message() -> impl Strategy<Value = GenMessage> {
    (
        1u32..4,
        0u8..6,
        0u8..2,
        any::<u8>(),
        0u8..8,
        any::<bool>(),
        prop::bool::weighted(0.9),
    )
        .prop_map(
            |(uid_step, body, base_variant, system, keywords, in_new, listed)| GenMessage {
                uid_step,
                body,
                base_variant,
                system,
                keywords,
                in_new,
                listed,
            },
        )
}

fn gen_mailbox() -> impl Strategy<Value = GenMailbox> {
    (
        prop::bool::weighted(0.8),
        7u32..9,
        Just([0u8, 1, 2]).prop_shuffle(),
        0u8..3,
        0usize..4,
        prop::collection::vec(gen_message(), 0..7),
    )
        .prop_map(
            |(present, validity, letters, shift, known_keywords, messages)| GenMailbox {
                present,
                validity,
                keyword_letters: letters.map(|l| l + shift),
                known_keywords,
                messages,
            },
        )
}

fn gen_tree() -> impl Strategy<Value = Vec<GenMailbox>> {
    prop::collection::vec(gen_mailbox(), 3)
}

/// Writes a generated tree the way Dovecot lays it out.
fn write_tree(root: &Path, tree: &[GenMailbox]) {
    for (dir, mailbox) in MAILBOXES.iter().zip(tree) {
        if !mailbox.present {
            continue;
        }
        let path = if dir.is_empty() {
            root.to_path_buf()
        } else {
            root.join(dir)
        };
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(path.join(sub)).unwrap();
        }
        let mut keywords = String::new();
        for (k, letter) in mailbox
            .keyword_letters
            .iter()
            .enumerate()
            .take(mailbox.known_keywords)
        {
            keywords.push_str(&format!("{letter} {}\n", KEYWORDS[k]));
        }
        fs::write(path.join("dovecot-keywords"), keywords).unwrap();
        let mut uidlist = format!("3 V{} N1 G{:032x}\n", mailbox.validity, mailbox.validity);
        let mut uid = 0;
        let mut used_bases = std::collections::HashSet::new();
        for m in &mailbox.messages {
            uid += m.uid_step;
            let body = format!("Subject: {}\n\nbody {}\n", m.body, m.body);
            let base = format!(
                "17000000{:02}.M{}P1.host,S={}",
                m.body,
                m.base_variant,
                body.len()
            );
            if !used_bases.insert(base.clone()) {
                continue;
            }
            let mut flags = String::new();
            for (bit, letter) in "DFPRST".chars().enumerate() {
                if m.system & (1 << bit) != 0 {
                    flags.push(letter);
                }
            }
            let mut letters: Vec<char> = (0..mailbox.known_keywords)
                .filter(|k| m.keywords & (1 << k) != 0)
                .map(|k| (b'a' + mailbox.keyword_letters[k]) as char)
                .collect();
            letters.sort();
            flags.extend(letters);
            let in_new = m.in_new && flags.is_empty();
            let name = if in_new {
                base.clone()
            } else {
                format!("{base}:2,{flags}")
            };
            let sub = if in_new { "new" } else { "cur" };
            fs::write(path.join(sub).join(&name), &body).unwrap();
            if m.listed {
                uidlist.push_str(&format!("{uid} :{base}\n"));
            }
        }
        fs::write(path.join("dovecot-uidlist"), uidlist).unwrap();
        if !dir.is_empty() {
            fs::write(path.join("maildirfolder"), "").unwrap();
        }
    }
}

type View = BTreeMap<String, (Option<(u32, String)>, Vec<String>)>;

/// What Dovecot would show: per mailbox, UIDVALIDITY and GUID, and per message its UID,
/// GUID, flags with keyword names, folder and body.
fn view(root: &Path) -> View {
    let table: MailTable = scan::scan(root, &ScanOptions::default(), &NoProgress).unwrap();
    let mut out = View::new();
    for m in &table.mailboxes {
        let header = m.header.as_ref().map(|h| {
            (
                h.uid_validity,
                h.guid.map(|g| g.to_string()).unwrap_or_default(),
            )
        });
        let mut messages = Vec::new();
        for i in 0..m.len() {
            let flags = m.msgs.flags[i];
            let system = flags
                .to_letters()
                .chars()
                .filter(|c| c.is_ascii_uppercase())
                .collect::<String>();
            let mut names: Vec<&str> = (0..26)
                .filter(|k| flags.keywords & (1 << k) != 0)
                .map(|k| m.keywords.name(k).unwrap_or("?"))
                .collect();
            names.sort();
            let dir = if m.dir.is_empty() {
                root.to_path_buf()
            } else {
                root.join(&m.dir)
            };
            let body = fs::read_to_string(dir.join(m.subdir(i).as_str()).join(m.name(i))).unwrap();
            let uid = m.msgs.uid[i];
            // An unnumbered message is identified by its file name; Dovecot numbers it later.
            let id = if uid == 0 {
                format!("unnumbered {}", m.base(i))
            } else {
                format!("uid {uid}")
            };
            messages.push(format!(
                "{id} guid={} flags={system}{names:?} {} {body:?}",
                m.guid(i),
                m.subdir(i)
            ));
        }
        messages.sort();
        out.insert(m.name.clone(), (header, messages));
    }
    out
}

fn options() -> BackupOptions {
    BackupOptions {
        scan: ScanOptions::default(),
        diff: DiffOptions {
            checksum: false,
            fresh_name_prefix: "1800000000.M1P99".into(),
        },
        apply: ApplyOptions {
            fsync: FsyncPolicy::None,
            ownership: Ownership::RunningUser,
            read_ahead: 64 << 20,
        },
        dry_run: false,
        max_delete: DeleteLimit::Percent(100),
        state_dir: None,
    }
}

fn snapshot(root: &Path) -> Vec<(String, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    if !root.exists() {
        return Vec::new();
    }
    let mut out: Vec<_> = walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let m = e.metadata().unwrap();
            (
                e.path().display().to_string(),
                m.ino(),
                m.mtime_nsec() + m.mtime() * 1_000_000_000,
            )
        })
        .collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn backup_makes_destination_equal_and_is_idempotent(src_tree in gen_tree(), dst_tree in gen_tree()) {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        fs::create_dir_all(&src).unwrap();
        write_tree(&src, &src_tree);
        write_tree(&dst, &dst_tree);
        let (s, d) = (LocalReplica::new(&src), LocalReplica::new(&dst));
        let outcome = backup(&s, &d, &options(), &NoProgress).unwrap();
        prop_assert!(outcome.report.errors.is_empty(), "{:?}", outcome.report.errors);
        prop_assert_eq!(view(&src), view(&dst));

        let before = snapshot(&dst);
        let again = backup(&s, &d, &options(), &NoProgress).unwrap();
        prop_assert_eq!(again.planned, Default::default());
        prop_assert_eq!(before, snapshot(&dst), "a second run must not write");
    }
}
