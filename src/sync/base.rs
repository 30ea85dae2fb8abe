//! The base of a two-way sync: what both replicas of a pair held when they were last made
//! equal — per mailbox its name, GUID, UIDVALIDITY, next UID, keyword names and, per
//! message, UID, a 64-bit hash of the GUID and the flags. The three-way merge compares each
//! side against it to tell "added here" from "expunged there". Kept on the initiating side,
//! keyed by both sides' locations, written atomically (temp file, rename) with a checksum;
//! a missing or damaged file is an empty base, and an empty base makes a merge that loses
//! nothing. Never touches a mail tree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::model::{Flags, MailboxGuid, MailboxStamps};
use crate::scan::cache::{Reader, get_stamps, put_stamps, put_str, put_u32, put_u64};
use crate::storage::maildir::keywords::{KeywordMap, LETTERS};
use crate::storage::maildir::writer;

/// One mailbox as both sides held it after the last sync.
#[derive(Debug, Clone, Default)]
pub struct BaseMailbox {
    /// Directory relative to the root (the same on both sides).
    pub dir: String,
    /// User-visible name.
    pub name: String,
    /// Mailbox GUID, when the uidlist has one.
    pub guid: Option<MailboxGuid>,
    /// UIDVALIDITY (0: no uidlist).
    pub uid_validity: u32,
    /// Next UID both sides had (every UID below it was handed out on both sides).
    pub next_uid: u32,
    /// Keyword letters of the records' flags.
    pub keywords: KeywordMap,
    /// Stamps and message count of side A when both sides were found in sync, so an
    /// unchanged mailbox is not read next time.
    pub stamps_a: Option<(MailboxStamps, u64)>,
    /// The same for side B.
    pub stamps_b: Option<(MailboxStamps, u64)>,
    /// The messages: kept compressed as read from the file until a run needs them, so a
    /// mailbox unchanged on both sides costs its bytes and no decoding.
    pub(crate) records: Records,
}

/// Per-message records of a base mailbox, as parallel columns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    /// UIDs, ascending.
    pub uids: Vec<u32>,
    /// xxh3-64 of each message's GUID: 8 bytes instead of a 40-byte base name, compared
    /// only against the message with the same UID, so a collision cannot pair strangers.
    pub guids: Vec<u64>,
    /// Flags, keyword letters as in [`BaseMailbox::keywords`].
    pub flags: Vec<Flags>,
}

/// The columns compressed (as stored), decoded, or both, each made from the other once.
#[derive(Debug, Clone, Default)]
pub(crate) struct Records {
    packed: OnceLock<Vec<u8>>,
    open: OnceLock<Columns>,
}

impl BaseMailbox {
    /// The mailbox with these records.
    pub fn with_records(mut self, columns: Columns) -> BaseMailbox {
        self.records = Records {
            packed: OnceLock::new(),
            open: OnceLock::from(columns),
        };
        self
    }

    /// The records, decoded on first use. Records that do not decode (impossible past the
    /// file's checksum) are none: the merge then loses nothing.
    pub fn records(&self) -> &Columns {
        self.records.open.get_or_init(|| {
            self.records
                .packed
                .get()
                .and_then(|p| decode_columns(p))
                .unwrap_or_default()
        })
    }

    /// The records compressed, as stored.
    fn packed(&self) -> &[u8] {
        self.records
            .packed
            .get_or_init(|| encode_columns(self.records()))
    }

    /// Index of the record with this UID.
    pub fn find_uid(&self, uid: u32) -> Option<usize> {
        self.records().uids.binary_search(&uid).ok()
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.records().uids.len()
    }

    /// True when no message is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for BaseMailbox {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir
            && self.name == other.name
            && self.guid == other.guid
            && self.uid_validity == other.uid_validity
            && self.next_uid == other.next_uid
            && self.keywords == other.keywords
            && self.stamps_a == other.stamps_a
            && self.stamps_b == other.stamps_b
            && self.packed() == other.packed()
    }
}

impl Eq for BaseMailbox {}

/// The hash a message GUID is recorded as.
pub fn guid_hash(guid: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(guid.as_bytes())
}

/// The whole base of one pair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseState {
    /// Mailboxes, sorted by directory.
    pub mailboxes: Vec<BaseMailbox>,
    /// The `subscriptions` file both sides had.
    pub subscriptions: Option<Vec<u8>>,
}

/// Magic and format version; the xxh3-64 of the body follows, then the body, whose
/// per-mailbox records are zstd-compressed one mailbox at a time.
const MAGIC: &[u8; 8] = b"MDSYNCB\x02";

impl BaseState {
    /// The mailbox recorded in `dir`.
    pub fn mailbox(&self, dir: &str) -> Option<&BaseMailbox> {
        self.mailboxes
            .binary_search_by(|m| m.dir.as_str().cmp(dir))
            .ok()
            .map(|i| &self.mailboxes[i])
    }

    /// Loads a base; a missing, foreign or damaged file is an empty base (a full merge).
    pub fn load(path: &Path) -> BaseState {
        fs::read(path)
            .ok()
            .and_then(|bytes| decode(&bytes))
            .unwrap_or_default()
    }

    /// Writes the base atomically: a temp file beside it, fsynced, renamed over.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let tmp = dir.join(writer::temp_name());
        let written = (|| {
            use std::io::Write;
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&self.encode()?)?;
            file.sync_all()?;
            fs::rename(&tmp, path)
        })();
        written.inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// The file's bytes: magic, checksum, body.
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        put_u32(&mut body, self.mailboxes.len() as u32);
        for m in &self.mailboxes {
            encode_mailbox(&mut body, m);
        }
        put_opt_bytes(&mut body, self.subscriptions.as_deref());
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Per side, the "do not read if still so" hints of the scanner.
    pub fn hints(&self, side_a: bool) -> std::collections::HashMap<String, (MailboxStamps, u64)> {
        self.mailboxes
            .iter()
            .filter_map(|m| {
                let (a, b) = (m.stamps_a?, m.stamps_b?);
                Some((m.dir.clone(), if side_a { a } else { b }))
            })
            .collect()
    }
}

/// Where the base of a pair lives: `<dir>/<xxh3(a)>-<xxh3(b)>.sync`. The order matters:
/// `sync A B` and `sync B A` keep separate bases (each names its sides A and B).
pub fn base_file(dir: &Path, a_location: &str, b_location: &str) -> PathBuf {
    let h = |s: &str| xxhash_rust::xxh3::xxh3_64(s.as_bytes());
    dir.join(format!(
        "{:016x}-{:016x}.sync",
        h(a_location),
        h(b_location)
    ))
}

fn encode_mailbox(out: &mut Vec<u8>, m: &BaseMailbox) {
    put_str(out, &m.dir);
    put_str(out, &m.name);
    match m.guid {
        Some(g) => {
            out.push(1);
            out.extend_from_slice(&g.0);
        }
        None => out.push(0),
    }
    put_u32(out, m.uid_validity);
    put_u32(out, m.next_uid);
    for name in &m.keywords.names {
        put_opt_bytes(out, name.as_deref().map(str::as_bytes));
    }
    for stamps in [m.stamps_a, m.stamps_b] {
        match stamps {
            Some((s, count)) => {
                out.push(1);
                put_stamps(out, &s);
                put_u64(out, count);
            }
            None => out.push(0),
        }
    }
    put_opt_bytes(out, Some(m.packed()));
}

/// Column by column, UIDs as deltas, zstd-compressed: runs of small numbers and zero
/// flags compress to almost nothing, leaving the GUID hashes as the bulk.
fn encode_columns(c: &Columns) -> Vec<u8> {
    let mut raw = Vec::with_capacity(4 + c.uids.len() * 20);
    put_u32(&mut raw, c.uids.len() as u32);
    let mut last = 0u32;
    for &uid in &c.uids {
        put_u32(&mut raw, uid.wrapping_sub(last));
        last = uid;
    }
    for &g in &c.guids {
        put_u64(&mut raw, g);
    }
    for f in &c.flags {
        put_u32(&mut raw, f.system);
    }
    for f in &c.flags {
        put_u32(&mut raw, f.keywords);
    }
    zstd::encode_all(&raw[..], 3).expect("compressing into memory")
}

fn decode_columns(packed: &[u8]) -> Option<Columns> {
    let raw = zstd::decode_all(packed).ok()?;
    let mut r = Reader { bytes: &raw };
    let n = r.u32()? as usize;
    if n.checked_mul(20)? != r.bytes.len() {
        return None;
    }
    let mut uids = Vec::with_capacity(n);
    let mut last = 0u32;
    for _ in 0..n {
        last = last.wrapping_add(r.u32()?);
        uids.push(last);
    }
    let guids = (0..n).map(|_| r.u64()).collect::<Option<Vec<_>>>()?;
    let system = (0..n).map(|_| r.u32()).collect::<Option<Vec<_>>>()?;
    let flags = system
        .into_iter()
        .map(|system| {
            Some(Flags {
                system,
                keywords: r.u32()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    uids.is_sorted_by(|a, b| a < b)
        .then_some(Columns { uids, guids, flags })
}

fn put_opt_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            put_u32(out, b.len() as u32);
            out.extend_from_slice(b);
        }
        None => put_u32(out, u32::MAX),
    }
}

fn decode(bytes: &[u8]) -> Option<BaseState> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let (sum, body) = rest.split_at_checked(8)?;
    if xxhash_rust::xxh3::xxh3_64(body).to_le_bytes() != sum {
        return None;
    }
    let mut r = Reader { bytes: body };
    let n = r.u32()? as usize;
    let mut mailboxes = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        mailboxes.push(decode_mailbox(&mut r)?);
    }
    let subscriptions = opt_bytes(&mut r)?.map(<[u8]>::to_vec);
    if !r.bytes.is_empty() || !mailboxes.is_sorted_by(|a, b| a.dir < b.dir) {
        return None;
    }
    Some(BaseState {
        mailboxes,
        subscriptions,
    })
}

fn decode_mailbox(r: &mut Reader<'_>) -> Option<BaseMailbox> {
    let dir = r.string()?;
    let name = r.string()?;
    let guid = match r.u8()? {
        0 => None,
        _ => Some(MailboxGuid(r.take(16)?.try_into().ok()?)),
    };
    let uid_validity = r.u32()?;
    let next_uid = r.u32()?;
    let mut keywords = KeywordMap::default();
    for i in 0..LETTERS {
        keywords.names[i] = match opt_bytes(r)? {
            Some(b) => Some(String::from_utf8(b.to_vec()).ok()?),
            None => None,
        };
    }
    let mut stamps = [None, None];
    for slot in &mut stamps {
        if r.u8()? == 1 {
            *slot = Some((get_stamps(r)?, r.u64()?));
        }
    }
    let packed = opt_bytes(r)?.unwrap_or_default().to_vec();
    Some(BaseMailbox {
        dir,
        name,
        guid,
        uid_validity,
        next_uid,
        keywords,
        stamps_a: stamps[0],
        stamps_b: stamps[1],
        records: Records {
            packed: OnceLock::from(packed),
            open: OnceLock::new(),
        },
    })
}

fn opt_bytes<'a>(r: &mut Reader<'a>) -> Option<Option<&'a [u8]>> {
    match r.u32()? {
        u32::MAX => Some(None),
        n => Some(Some(r.take(n as usize)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u32) -> BaseState {
        let mut keywords = KeywordMap::default();
        keywords.assign("$Label1");
        let m = BaseMailbox {
            dir: ".Archive".into(),
            name: "Archive".into(),
            guid: MailboxGuid::parse_hex("0f1e2d3c4b5a69788796a5b4c3d2e1f0"),
            uid_validity: 1_700_000_000,
            next_uid: n + 1,
            keywords,
            stamps_a: Some((MailboxStamps::default(), u64::from(n))),
            ..BaseMailbox::default()
        };
        let mut c = Columns::default();
        for uid in 1..=n {
            let guid = format!("1700{uid:06}.M{uid}P4711.mx1,S=2048,W=2090");
            c.uids.push(uid);
            c.guids.push(guid_hash(&guid));
            // Typical mail: most seen, some answered, a few with a keyword.
            c.flags.push(Flags {
                system: if uid % 3 == 0 { 0 } else { 1 << (b'S' - b'A') },
                keywords: u32::from(uid % 50 == 0),
            });
        }
        BaseState {
            mailboxes: vec![m.with_records(c)],
            subscriptions: Some(b"V\t2\n\nArchive\n".to_vec()),
        }
    }

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let file = base_file(dir.path(), "a", "b");
        let state = sample(100);
        state.save(&file).unwrap();
        assert_eq!(BaseState::load(&file), state);
        assert_ne!(base_file(dir.path(), "b", "a"), file);
    }

    #[test]
    fn damage_anywhere_is_an_empty_base() {
        let state = sample(50);
        let bytes = state.encode().unwrap();
        for at in [0, 9, 20, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert_eq!(decode(&bad), None, "flipped byte {at}");
        }
        assert_eq!(decode(&bytes[..bytes.len() - 3]), None);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.sync");
        fs::write(&file, b"garbage").unwrap();
        assert_eq!(BaseState::load(&file), BaseState::default());
        assert_eq!(
            BaseState::load(&dir.path().join("missing")),
            BaseState::default()
        );
    }

    #[test]
    fn bytes_per_message_stay_small() {
        let n = 100_000;
        let bytes = sample(n).encode().unwrap().len();
        let per_message = bytes as f64 / f64::from(n);
        eprintln!("base: {per_message:.2} bytes per message at {n} messages");
        // 4 (UID) + 8 (GUID hash) + 8 (flags) raw; the hash does not compress.
        assert!(per_message <= 10.0, "{per_message:.2} bytes per message");
    }
}
