//! A deterministic synthetic Maildir++ corpus written straight to disk in the formats
//! Dovecot writes (v3 `dovecot-uidlist` with mailbox GUIDs and UID gaps, per-mailbox
//! `dovecot-keywords` with differing letter maps, `,S=`/`,W=` names, mtime = received
//! time, messages in `new/`, `subscriptions`, `dovecot-uidvalidity`), owned by vmail.
//! Used where a test needs hundreds of messages faster than doveadm could save them.

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::vmail_ids;

/// One mailbox of the corpus: IMAP name, directory under the root, keyword letters.
struct Spec {
    dir: &'static str,
    subscription: &'static str,
    keywords: &'static [&'static str],
    /// Relative share of the messages.
    weight: u64,
    /// How many of its newest messages stay in `new/` without flags.
    in_new: usize,
}

const MAILBOXES: [Spec; 6] = [
    Spec {
        dir: "",
        subscription: "INBOX",
        keywords: &["$Junk", "NonJunk", "$label1"],
        weight: 4,
        in_new: 3,
    },
    Spec {
        dir: ".Sent",
        subscription: "Sent",
        keywords: &["NonJunk", "$label1"],
        weight: 2,
        in_new: 0,
    },
    Spec {
        dir: ".Archive",
        subscription: "Archive",
        keywords: &["$label1", "$Junk", "NonJunk", "$label2"],
        weight: 1,
        in_new: 0,
    },
    Spec {
        dir: ".Archive.2023",
        subscription: "Archive\t2023",
        keywords: &[],
        weight: 1,
        in_new: 0,
    },
    Spec {
        dir: ".Lists.rust",
        subscription: "Lists\trust",
        keywords: &["$label2", "$Junk"],
        weight: 2,
        in_new: 1,
    },
    Spec {
        dir: ".Entw&APw-rfe",
        subscription: "Entw&APw-rfe",
        keywords: &[],
        weight: 1,
        in_new: 1,
    },
];

/// What [`write_corpus`] made.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Message files written.
    pub messages: usize,
    /// Their total size.
    pub bytes: u64,
    /// Mailbox directories (relative to the root, `""` = INBOX).
    pub dirs: Vec<&'static str>,
}

/// xorshift64*: small, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Message {
    time: u64,
    base: String,
    body: Vec<u8>,
    flags: String,
}

/// Writes a corpus of `messages` messages (deterministic for `seed`) into the empty or
/// missing directory `root`, chowned to vmail. About one message in 40 is 256 KiB; the rest
/// are 1–16 KiB.
pub fn write_corpus(root: &Path, messages: usize, seed: u64) -> Corpus {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let total_weight: u64 = MAILBOXES.iter().map(|m| m.weight).sum();
    let mut per_box: Vec<Vec<Message>> = MAILBOXES.iter().map(|_| Vec::new()).collect();
    let mut bytes = 0;
    for i in 0..messages {
        let mut pick = rng.below(total_weight);
        let index = MAILBOXES
            .iter()
            .position(|m| {
                if pick < m.weight {
                    true
                } else {
                    pick -= m.weight;
                    false
                }
            })
            .expect("weights cover the range");
        let time = 1_600_000_000 + i as u64 * 600 + rng.below(600);
        let target = if i % 40 == 7 {
            256 * 1024
        } else {
            1024 + rng.below(15 * 1024) as usize
        };
        let body = message_text(seed, i, target);
        let lines = body.iter().filter(|&&b| b == b'\n').count();
        let base = format!(
            "{time}.M{}P{}.corpus,S={},W={}",
            rng.below(1_000_000),
            1000 + i,
            body.len(),
            body.len() + lines
        );
        let spec = &MAILBOXES[index];
        let mut flags: String =
            ["S", "S", "S", "RS", "FS", "", "ST", "DS", "FRS"][rng.below(9) as usize].to_owned();
        if !spec.keywords.is_empty() && rng.below(4) == 0 {
            let letter = b'a' + rng.below(spec.keywords.len() as u64) as u8;
            flags.push(letter as char);
        }
        bytes += body.len() as u64;
        per_box[index].push(Message {
            time,
            base,
            body,
            flags,
        });
    }
    let (uid, gid) = vmail_ids();
    make_dir(root, uid, gid);
    let mut dirs = Vec::new();
    for (index, (spec, msgs)) in MAILBOXES.iter().zip(&per_box).enumerate() {
        let dir = root.join(spec.dir);
        write_mailbox(&dir, spec, msgs, index as u32, &mut rng, uid, gid);
        dirs.push(spec.dir);
    }
    let mut subscriptions = String::from("V\t2\n\n");
    for spec in &MAILBOXES {
        subscriptions.push_str(spec.subscription);
        subscriptions.push('\n');
    }
    write(
        root,
        "subscriptions",
        subscriptions.as_bytes(),
        0o600,
        uid,
        gid,
    );
    let next_validity = format!("{:08x}", 1_600_000_000 + MAILBOXES.len() as u32);
    write(
        root,
        "dovecot-uidvalidity",
        next_validity.as_bytes(),
        0o600,
        uid,
        gid,
    );
    let marker = format!("dovecot-uidvalidity.{next_validity}");
    write(root, &marker, b"", 0o444, uid, gid);
    Corpus {
        messages,
        bytes,
        dirs,
    }
}

fn write_mailbox(
    dir: &Path,
    spec: &Spec,
    msgs: &[Message],
    index: u32,
    rng: &mut Rng,
    uid: u32,
    gid: u32,
) {
    make_dir(dir, uid, gid);
    for sub in ["cur", "new", "tmp"] {
        make_dir(&dir.join(sub), uid, gid);
    }
    if !spec.dir.is_empty() {
        write(dir, "maildirfolder", b"", 0o600, uid, gid);
    }
    if !spec.keywords.is_empty() {
        let text: String = spec
            .keywords
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{i} {k}\n"))
            .collect();
        write(dir, "dovecot-keywords", text.as_bytes(), 0o600, uid, gid);
    }
    let guid: String = (0..4)
        .map(|_| format!("{:08x}", rng.next() as u32))
        .collect();
    let mut records = String::new();
    let mut next_uid = 1;
    for (n, msg) in msgs.iter().enumerate() {
        if rng.below(10) == 0 {
            next_uid += 1 + rng.below(3) as u32; // expunged UIDs leave gaps
        }
        records.push_str(&format!("{next_uid} :{}\n", msg.base));
        next_uid += 1;
        let in_new = n + spec.in_new >= msgs.len();
        let (sub, name) = if in_new {
            ("new", msg.base.clone())
        } else {
            ("cur", format!("{}:2,{}", msg.base, msg.flags))
        };
        let path = dir.join(sub).join(&name);
        fs::write(&path, &msg.body).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        finish(&path, 0o600, uid, gid);
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(msg.time);
        fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(mtime))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    if index % 2 == 1 {
        next_uid += 2; // the newest messages were expunged: N is above the last record
    }
    let header = format!("3 V{} N{next_uid} G{guid}\n", 1_600_000_000 + index);
    write(
        dir,
        "dovecot-uidlist",
        (header + &records).as_bytes(),
        0o600,
        uid,
        gid,
    );
}

/// An RFC 5322 message of about `target` bytes with a unique Message-ID.
fn message_text(seed: u64, i: usize, target: usize) -> Vec<u8> {
    let mut text = format!(
        "From: sender{i}@example.org\nTo: rcpt@example.org\nSubject: corpus message {i}\n\
         Date: Mon, 01 Jan 2024 12:00:00 +0000\nMessage-ID: <corpus-{seed}-{i}@test.mdsync>\n\n"
    );
    let mut n = 0;
    while text.len() < target {
        text.push_str(&format!(
            "line {n} of message {i}: the quick brown fox jumps over the lazy dog\n"
        ));
        n += 1;
    }
    text.into_bytes()
}

fn make_dir(dir: &Path, uid: u32, gid: u32) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    finish(dir, 0o700, uid, gid);
}

fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32, uid: u32, gid: u32) {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    finish(&path, mode, uid, gid);
}

fn finish(path: &Path, mode: u32, uid: u32, gid: u32) {
    chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
