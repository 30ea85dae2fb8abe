//! The wire encoding of one mailbox table, and its delta against a baseline both sides
//! hold. Rows are written one after another in UID order, so a message whose flags changed
//! changes only its own bytes; compressed with the previous encoding as a zstd dictionary,
//! an unchanged mailbox costs a few dozen bytes and a changed one a few bytes per change.
//! Pure functions over bytes; every length a peer sends is checked before use.

use serde::{Deserialize, Serialize};

use super::conn::WireError;
use super::frame::{Payload, put_string};
use super::path::{MAX_PATH, check_dir, check_name};
use crate::model::{Flags, MailboxStamps};
use crate::storage::maildir::keywords::KeywordMap;
use crate::storage::maildir::uidlist::Header;
use crate::table::{Anomaly, DirMeta, Extras, MailboxTable, StrRef};

/// Largest table encoding accepted (raw): about ten million messages.
pub const MAX_TABLE: usize = 1 << 30;

/// Largest baseline used as a dictionary; bigger tables are sent whole.
const MAX_BASELINE: usize = 256 << 20;

/// Everything of a mailbox table but its rows.
#[derive(Serialize, Deserialize)]
struct Head {
    dir: String,
    name: String,
    header: Option<Header>,
    next_uid: u32,
    keywords: KeywordMap,
    dir_meta: DirMeta,
    stamps: MailboxStamps,
    settled: bool,
    broken: Option<String>,
    /// Broken because it was renamed or deleted while read; left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    vanished: bool,
    unchanged: Option<u64>,
    anomalies: Vec<Anomaly>,
    /// An mdbox mailbox (no `new/`); left out for Maildir, whose encoding stays as it was.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    flat: bool,
}

/// A 128-bit identity of an encoding: both sides name a baseline by it.
pub fn id_of(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_short(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encodes a mailbox table.
pub fn encode(m: &MailboxTable) -> Vec<u8> {
    let head = Head {
        dir: m.dir.clone(),
        name: m.name.clone(),
        header: m.header.clone(),
        next_uid: m.next_uid,
        keywords: m.keywords.clone(),
        dir_meta: m.dir_meta,
        stamps: m.stamps,
        settled: m.settled,
        broken: m.broken.clone(),
        vanished: m.vanished,
        unchanged: m.unchanged,
        anomalies: m.anomalies.clone(),
        flat: m.flat,
    };
    let head = serde_json::to_vec(&head).expect("plain data serializes");
    let mut out = Vec::with_capacity(head.len() + m.arena.len() + m.len() * 24 + 16);
    put_u32(&mut out, head.len() as u32);
    out.extend_from_slice(&head);
    put_u32(&mut out, m.len() as u32);
    for i in 0..m.len() {
        let msgs = &m.msgs;
        put_u32(&mut out, msgs.uid[i]);
        out.push(msgs.status[i]);
        put_u32(&mut out, msgs.flags[i].system);
        put_u32(&mut out, msgs.flags[i].keywords);
        put_u32(&mut out, msgs.size[i]);
        put_short(&mut out, m.name(i));
        out.extend_from_slice(&msgs.base_len[i].to_le_bytes());
        match (msgs.extras[i] != crate::table::NO_EXTRAS).then(|| m.extras[msgs.extras[i] as usize])
        {
            None => out.push(0),
            Some(e) => {
                out.push(1 | u8::from(e.guid.is_some()) << 1 | u8::from(e.ext.is_some()) << 2);
                for part in [e.guid, e.ext].into_iter().flatten() {
                    put_string(&mut out, m.str(part));
                }
            }
        }
    }
    put_u32(&mut out, m.listed_missing.len() as u32);
    for &(uid, base) in &m.listed_missing {
        put_u32(&mut out, uid);
        put_short(&mut out, m.str(base));
    }
    out
}

fn bad() -> WireError {
    WireError::protocol("malformed mailbox table")
}

fn short<'a>(p: &mut Payload<'a>) -> Result<&'a str, WireError> {
    let len = p.u16().ok_or_else(bad)? as usize;
    std::str::from_utf8(p.take(len).ok_or_else(bad)?).map_err(|_| bad())
}

/// Decodes a table from a peer, checking every name: a hostile source must not be able to
/// make the destination write outside its root.
pub fn decode(bytes: &[u8]) -> Result<MailboxTable, WireError> {
    let unsafe_path = |e: super::path::UnsafePath| WireError::protocol(e.to_string());
    let mut p = Payload::new(bytes);
    let head_len = p.u32().ok_or_else(bad)? as usize;
    let head: Head = serde_json::from_slice(p.take(head_len).ok_or_else(bad)?)
        .map_err(|e| WireError::protocol(format!("malformed mailbox table: {e}")))?;
    check_dir(&head.dir).map_err(unsafe_path)?;
    let one_line = super::codec::one_line;
    let header_ok = head.header.as_ref().is_none_or(|h| one_line(&h.extra));
    let keywords_ok = head
        .keywords
        .names
        .iter()
        .flatten()
        .all(|k| one_line(k) && !k.contains(' '));
    if !header_ok || !keywords_ok {
        return Err(WireError::protocol(
            "a table whose uidlist or keywords break lines",
        ));
    }
    let mut dir_meta = head.dir_meta;
    dir_meta.mode &= 0o1777;
    let mut table = MailboxTable {
        dir: head.dir,
        name: head.name,
        header: head.header,
        next_uid: head.next_uid,
        keywords: head.keywords,
        dir_meta,
        stamps: head.stamps,
        settled: head.settled,
        broken: head.broken,
        vanished: head.vanished,
        unchanged: head.unchanged,
        anomalies: head.anomalies,
        flat: head.flat,
        ..MailboxTable::default()
    };
    let rows = p.u32().ok_or_else(bad)? as usize;
    // Every row takes at least 22 bytes: the count cannot make us allocate more than the
    // bytes that arrived justify.
    if rows > bytes.len() / 22 {
        return Err(bad());
    }
    for _ in 0..rows {
        let uid = p.u32().ok_or_else(bad)?;
        let status = p.u8().ok_or_else(bad)?;
        let flags = Flags {
            system: p.u32().ok_or_else(bad)?,
            keywords: p.u32().ok_or_else(bad)?,
        };
        let size = p.u32().ok_or_else(bad)?;
        let name = check_name(short(&mut p)?).map_err(unsafe_path)?;
        let base_len = p.u16().ok_or_else(bad)? as usize;
        if base_len > name.len() || !name.is_char_boundary(base_len) {
            return Err(bad());
        }
        let tag = p.u8().ok_or_else(bad)?;
        let extras = if tag & 1 == 0 {
            None
        } else {
            let mut part = |present: bool| -> Result<Option<StrRef>, WireError> {
                if !present {
                    return Ok(None);
                }
                let text = p.string(MAX_PATH).ok_or_else(bad)?;
                if !super::codec::one_line(text) {
                    return Err(bad());
                }
                Ok(Some(table.intern(text)))
            };
            let guid = part(tag & 2 != 0)?;
            let ext = part(tag & 4 != 0)?;
            Some(Extras { guid, ext })
        };
        table.push(uid, name, base_len, flags, size, extras, status);
    }
    let missing = p.u32().ok_or_else(bad)? as usize;
    if missing > bytes.len() / 6 {
        return Err(bad());
    }
    for _ in 0..missing {
        let uid = p.u32().ok_or_else(bad)?;
        let base = check_name(short(&mut p)?).map_err(unsafe_path)?;
        let r = table.intern(base);
        table.listed_missing.push((uid, r));
    }
    if !p.is_done() {
        return Err(bad());
    }
    table.sort_by_uid();
    Ok(table)
}

/// What a mailbox object carries: a whole encoding, or a delta against a baseline.
pub enum Shipped {
    /// The encoding itself.
    Whole(Vec<u8>),
    /// zstd of the encoding with the baseline as dictionary.
    Delta {
        /// Identity of the baseline used.
        base: u128,
        /// Identity of the result, checked after decompression.
        result: u128,
        /// The compressed bytes.
        bytes: Vec<u8>,
    },
    /// The baseline's rows kept, skipped or replaced (`wire::rows`; capability
    /// `CAP_ROW_DELTA`).
    Rows {
        /// Identity of the baseline used.
        base: u128,
        /// Identity of the result, checked after it is rebuilt.
        result: u128,
        /// The row delta.
        bytes: Vec<u8>,
    },
}

impl Shipped {
    /// Makes a delta of `encoding` against `baseline` when that is worth it.
    pub fn make(encoding: Vec<u8>, baseline: Option<&[u8]>) -> Shipped {
        let Some(base) = baseline.filter(|b| b.len() <= MAX_BASELINE && !b.is_empty()) else {
            return Shipped::Whole(encoding);
        };
        match compress_with(&encoding, base) {
            Ok(bytes) if bytes.len() < encoding.len() => Shipped::Delta {
                base: id_of(base),
                result: id_of(&encoding),
                bytes,
            },
            _ => Shipped::Whole(encoding),
        }
    }

    /// Makes a row delta of `encoding` against `baseline` when at most half of the rows
    /// changed, else what [`Shipped::make`] makes. Why not
    /// [`Shipped::make`]: loading a baseline as a zstd dictionary costs the sender about as
    /// much as compressing the table, and a run's tables are most of the far side's work
    /// before the client can plan (40–60 ms of 100,000 messages on two cores); a row delta
    /// is one pass over both tables' rows.
    pub fn make_rows(encoding: Vec<u8>, baseline: Option<&[u8]>) -> Shipped {
        let Some(base) = baseline.filter(|b| !b.is_empty()) else {
            return Shipped::Whole(encoding);
        };
        match super::rows::make(&encoding, base) {
            Some(bytes) => Shipped::Rows {
                base: id_of(base),
                result: id_of(&encoding),
                bytes,
            },
            // Most rows changed: a zstd delta finds what they still share.
            None => Shipped::make(encoding, Some(base)),
        }
    }

    /// The identity of the baseline a delta was made against.
    pub fn base(&self) -> Option<u128> {
        match self {
            Shipped::Whole(_) => None,
            Shipped::Delta { base, .. } | Shipped::Rows { base, .. } => Some(*base),
        }
    }

    /// The object payload.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Shipped::Whole(encoding) => {
                let mut out = Vec::with_capacity(encoding.len() + 1);
                out.push(0);
                out.extend_from_slice(encoding);
                out
            }
            Shipped::Delta {
                base,
                result,
                bytes,
            }
            | Shipped::Rows {
                base,
                result,
                bytes,
            } => {
                let mut out = Vec::with_capacity(bytes.len() + 33);
                out.push(if matches!(self, Shipped::Rows { .. }) {
                    2
                } else {
                    1
                });
                out.extend_from_slice(&base.to_le_bytes());
                out.extend_from_slice(&result.to_le_bytes());
                out.extend_from_slice(bytes);
                out
            }
        }
    }

    /// Parses an object payload.
    pub fn from_bytes(bytes: &[u8]) -> Result<Shipped, WireError> {
        let (&tag, rest) = bytes.split_first().ok_or_else(bad)?;
        match tag {
            0 => Ok(Shipped::Whole(rest.to_vec())),
            1 if rest.len() >= 32 => Ok(Shipped::Delta {
                base: u128::from_le_bytes(rest[..16].try_into().expect("16 bytes")),
                result: u128::from_le_bytes(rest[16..32].try_into().expect("16 bytes")),
                bytes: rest[32..].to_vec(),
            }),
            2 if rest.len() >= 32 => Ok(Shipped::Rows {
                base: u128::from_le_bytes(rest[..16].try_into().expect("16 bytes")),
                result: u128::from_le_bytes(rest[16..32].try_into().expect("16 bytes")),
                bytes: rest[32..].to_vec(),
            }),
            _ => Err(bad()),
        }
    }

    /// The encoding, using `baseline` for a delta; it must be the baseline the sender named.
    pub fn resolve(self, baseline: Option<&[u8]>) -> Result<Vec<u8>, WireError> {
        match self {
            Shipped::Whole(encoding) => Ok(encoding),
            Shipped::Delta {
                base,
                result,
                ref bytes,
            }
            | Shipped::Rows {
                base,
                result,
                ref bytes,
            } => {
                let baseline = baseline
                    .filter(|b| id_of(b) == base)
                    .ok_or_else(|| WireError::protocol("a table delta against an unknown base"))?;
                let encoding = match self {
                    Shipped::Rows { .. } => super::rows::apply(bytes, baseline)?,
                    _ => decompress_with(bytes, baseline)?,
                };
                if encoding.len() > MAX_TABLE {
                    return Err(WireError::protocol("a table delta beyond 1 GiB"));
                }
                if id_of(&encoding) != result {
                    return Err(WireError::protocol(
                        "a table delta did not reproduce its table",
                    ));
                }
                Ok(encoding)
            }
        }
    }
}

/// Window large enough to reach back over the whole baseline.
fn window_log(len: usize) -> u32 {
    (usize::BITS - len.max(1 << 20).leading_zeros()).clamp(20, 29)
}

fn compress_with(data: &[u8], dictionary: &[u8]) -> std::io::Result<Vec<u8>> {
    use zstd::zstd_safe::CParameter;
    let mut c = zstd::bulk::Compressor::with_dictionary(3, dictionary)?;
    c.set_parameter(CParameter::WindowLog(window_log(
        dictionary.len() + data.len(),
    )))?;
    c.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
    c.compress(data)
}

fn decompress_with(data: &[u8], dictionary: &[u8]) -> Result<Vec<u8>, WireError> {
    use zstd::zstd_safe::DParameter;
    let fail = |e: std::io::Error| WireError::protocol(format!("bad table delta: {e}"));
    let mut d = zstd::bulk::Decompressor::with_dictionary(dictionary).map_err(fail)?;
    d.set_parameter(DParameter::WindowLogMax(30))
        .map_err(fail)?;
    d.decompress(data, MAX_TABLE).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Subdir;

    fn sample(flag_of_7: u32) -> MailboxTable {
        let mut t = MailboxTable {
            dir: ".Archive".into(),
            name: "Archive".into(),
            next_uid: 2001,
            ..MailboxTable::default()
        };
        for uid in 1..=2000u32 {
            let flags = if uid == 7 { flag_of_7 } else { 1 << 18 };
            let base = format!("17000{uid:05}.M{uid}P1.host,S=1234,W=1260");
            let letters = if flags == 1 << 18 { "S" } else { "FS" };
            let extras = (uid == 3).then(|| Extras {
                guid: Some(t.intern("guid-three")),
                ext: None,
            });
            t.push(
                uid,
                &format!("{base}:2,{letters}"),
                base.len(),
                Flags {
                    system: flags,
                    keywords: 0,
                },
                1234,
                extras,
                0,
            );
        }
        let missing = t.intern("gone.M1");
        t.listed_missing.push((2000, missing));
        t
    }

    #[test]
    fn tables_round_trip() {
        let t = sample(1 << 18);
        let back = decode(&encode(&t)).unwrap();
        assert_eq!(encode(&back), encode(&t));
        assert_eq!(back.guid(2), "guid-three");
        assert_eq!(back.subdir(5), Subdir::Cur);
        assert_eq!(back.str(back.listed_missing[0].1), "gone.M1");
        assert!(!back.flat);
    }

    #[test]
    fn flat_travels_and_a_maildir_head_does_not_name_it() {
        let maildir = encode(&sample(1 << 18));
        assert!(!String::from_utf8_lossy(&maildir).contains("flat"));
        let mut t = sample(1 << 18);
        t.flat = true;
        assert!(decode(&encode(&t)).unwrap().flat);
    }

    /// A far side's folder that vanished while it was read stays "changed meanwhile" on
    /// this side (exit 2, not 1); a head without it (an older peer's) reads as not.
    #[test]
    fn vanished_travels_and_is_left_out_when_false() {
        assert!(!String::from_utf8_lossy(&encode(&sample(1 << 18))).contains("vanished"));
        let mut t = sample(1 << 18);
        t.broken = Some("gone".into());
        t.vanished = true;
        let back = decode(&encode(&t)).unwrap();
        assert!(back.vanished && back.broken.as_deref() == Some("gone"));
    }

    #[test]
    fn a_flag_change_ships_as_a_few_bytes() {
        let before = encode(&sample(1 << 18));
        let after = encode(&sample(1 << 18 | 1 << 5));
        let shipped = Shipped::make(after.clone(), Some(&before));
        let size = shipped.to_bytes().len();
        assert!(size < 200, "delta of one flag change is {size} bytes");
        let back = Shipped::from_bytes(&shipped.to_bytes()).unwrap();
        assert_eq!(back.resolve(Some(&before)).unwrap(), after);
    }

    #[test]
    fn a_delta_against_another_base_is_refused() {
        let before = encode(&sample(1 << 18));
        let after = encode(&sample(1 << 5));
        let shipped = Shipped::make(after, Some(&before)).to_bytes();
        let other = encode(&sample(1 << 3));
        assert!(
            Shipped::from_bytes(&shipped)
                .unwrap()
                .resolve(Some(&other))
                .is_err()
        );
        assert!(
            Shipped::from_bytes(&shipped)
                .unwrap()
                .resolve(None)
                .is_err()
        );
    }

    #[test]
    fn unsafe_names_are_refused() {
        let mut t = sample(1 << 18);
        t.push(3000, "../../etc/passwd", 5, Flags::default(), 1, None, 0);
        assert!(decode(&encode(&t)).is_err());
        let mut t = sample(1 << 18);
        t.dir = "../x".into();
        assert!(decode(&encode(&t)).is_err());
        // A name or keyword that would add a line to the uidlist or keywords file.
        let mut t = sample(1 << 18);
        t.push(3000, "1.M1.h\n3 :evil", 6, Flags::default(), 1, None, 0);
        assert!(decode(&encode(&t)).is_err());
        let mut t = sample(1 << 18);
        t.keywords.names[0] = Some("$Junk\n0 evil".into());
        assert!(decode(&encode(&t)).is_err());
        let mut t = sample(1 << 18);
        t.dir_meta.mode = 0o4755;
        assert_eq!(decode(&encode(&t)).unwrap().dir_meta.mode, 0o755);
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            if let Ok(s) = Shipped::from_bytes(&bytes) {
                let _ = s.resolve(Some(b"baseline"));
            }
        }
    }
}
