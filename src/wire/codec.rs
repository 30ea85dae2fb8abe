//! Binary payloads of the protocol — body headers and ends, key lists, hash answers,
//! mailbox tables — and the checks that every dir and name a peer sends stays inside the
//! replica root. Pure functions over bytes; no I/O.

use super::conn::{BodyEnd, BodyHeader, BodyStatus, WireError};
use super::frame::{Payload, put_string};
use super::path::{MAX_PATH, check_dir, check_name, check_subdir};
use crate::model::Subdir;
use crate::storage::maildir::writer::BodyMeta;
use crate::sync::plan::Plan;

/// Most keys one list may hold.
pub const MAX_KEYS: usize = 16 << 20;

/// A message named by mailbox directory, subdirectory and file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// Mailbox directory.
    pub dir: String,
    /// Subdirectory.
    pub sub: Subdir,
    /// File name.
    pub name: String,
}

fn sub_byte(sub: Subdir) -> u8 {
    match sub {
        Subdir::New => 0,
        Subdir::Cur => 1,
    }
}

fn put_key(out: &mut Vec<u8>, dir: &str, sub: Subdir, name: &str) {
    put_string(out, dir);
    out.push(sub_byte(sub));
    put_string(out, name);
}

fn bad(what: &str) -> WireError {
    WireError::protocol(format!("malformed {what}"))
}

fn get_key(p: &mut Payload<'_>) -> Result<Key, WireError> {
    let dir = p.string(MAX_PATH).ok_or_else(|| bad("key"))?;
    let sub = p.u8().ok_or_else(|| bad("key"))?;
    let name = p.string(MAX_PATH).ok_or_else(|| bad("key"))?;
    Ok(Key {
        dir: check_dir(dir)
            .map_err(|e| WireError::protocol(e.to_string()))?
            .to_string(),
        sub: check_subdir(sub).map_err(|e| WireError::protocol(e.to_string()))?,
        name: check_name(name)
            .map_err(|e| WireError::protocol(e.to_string()))?
            .to_string(),
    })
}

/// Encodes a key list.
pub fn encode_keys(keys: &[Key]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.len() * 64 + 4);
    out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    for k in keys {
        put_key(&mut out, &k.dir, k.sub, &k.name);
    }
    out
}

/// Decodes and checks a key list.
pub fn decode_keys(bytes: &[u8]) -> Result<Vec<Key>, WireError> {
    let mut p = Payload::new(bytes);
    let count = p.u32().ok_or_else(|| bad("key list"))? as usize;
    if count > MAX_KEYS {
        return Err(WireError::protocol("too many keys"));
    }
    // Every key takes at least 9 bytes: the count cannot make us allocate more than the
    // bytes that arrived justify.
    let mut keys = Vec::with_capacity(count.min(bytes.len() / 9));
    for _ in 0..count {
        keys.push(get_key(&mut p)?);
    }
    if !p.is_done() {
        return Err(bad("key list"));
    }
    Ok(keys)
}

/// One content-hash answer.
pub type HashAnswer = Result<u128, crate::replica::BodyError>;

/// Encodes hash answers, one per key, in order.
pub fn encode_hashes(answers: &[HashAnswer]) -> Vec<u8> {
    let mut out = Vec::with_capacity(answers.len() * 17 + 4);
    out.extend_from_slice(&(answers.len() as u32).to_le_bytes());
    for a in answers {
        match a {
            Ok(h) => {
                out.push(0);
                out.extend_from_slice(&h.to_le_bytes());
            }
            Err(crate::replica::BodyError::Vanished(why)) => {
                out.push(1);
                put_string(&mut out, why);
            }
            Err(crate::replica::BodyError::Failed(why)) => {
                out.push(2);
                put_string(&mut out, why);
            }
        }
    }
    out
}

/// Decodes hash answers; there must be exactly `expected`.
pub fn decode_hashes(bytes: &[u8], expected: usize) -> Result<Vec<HashAnswer>, WireError> {
    let mut p = Payload::new(bytes);
    let count = p.u32().ok_or_else(|| bad("hash answers"))? as usize;
    if count != expected {
        return Err(WireError::protocol("wrong number of hash answers"));
    }
    let mut out = Vec::with_capacity(count.min(bytes.len()));
    for _ in 0..count {
        let answer = match p.u8().ok_or_else(|| bad("hash answer"))? {
            0 => {
                let b = p.take(16).ok_or_else(|| bad("hash answer"))?;
                Ok(u128::from_le_bytes(b.try_into().expect("16 bytes")))
            }
            1 => Err(crate::replica::BodyError::Vanished(
                p.string(MAX_PATH * 2)
                    .ok_or_else(|| bad("hash answer"))?
                    .into(),
            )),
            2 => Err(crate::replica::BodyError::Failed(
                p.string(MAX_PATH * 2)
                    .ok_or_else(|| bad("hash answer"))?
                    .into(),
            )),
            _ => return Err(bad("hash answer")),
        };
        out.push(answer);
    }
    if !p.is_done() {
        return Err(bad("hash answers"));
    }
    Ok(out)
}

/// Encodes a body header.
pub fn encode_body_header(key: (&str, Subdir, &str), status: &BodyStatus) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.0.len() + key.2.len() + 48);
    put_key(&mut out, key.0, key.1, key.2);
    match status {
        BodyStatus::Data(meta) => {
            out.push(0);
            out.extend_from_slice(&meta.mtime.0.to_le_bytes());
            out.extend_from_slice(&meta.mtime.1.to_le_bytes());
            out.extend_from_slice(&meta.mode.to_le_bytes());
            out.extend_from_slice(&meta.uid.to_le_bytes());
            out.extend_from_slice(&meta.gid.to_le_bytes());
            out.extend_from_slice(&meta.len.to_le_bytes());
        }
        BodyStatus::Vanished => out.push(1),
        BodyStatus::Failed(why) => {
            out.push(2);
            put_string(&mut out, why);
        }
    }
    out
}

/// Decodes and checks a body header.
pub fn decode_body_header(bytes: &[u8]) -> Result<BodyHeader, WireError> {
    let mut p = Payload::new(bytes);
    let key = get_key(&mut p)?;
    let status = match p.u8().ok_or_else(|| bad("body header"))? {
        0 => {
            let meta = (|| {
                Some(BodyMeta {
                    mtime: (p.u64()? as i64, p.u32()?),
                    // A peer never makes a setuid, setgid or sticky message file.
                    mode: p.u32()? & 0o777,
                    uid: p.u32()?,
                    gid: p.u32()?,
                    len: p.u64()?,
                })
            })()
            .ok_or_else(|| bad("body header"))?;
            if meta.mtime.1 >= 1_000_000_000 {
                return Err(bad("body header"));
            }
            BodyStatus::Data(meta)
        }
        1 => BodyStatus::Vanished,
        2 => BodyStatus::Failed(
            p.string(MAX_PATH * 2)
                .ok_or_else(|| bad("body header"))?
                .into(),
        ),
        _ => return Err(bad("body header")),
    };
    if !p.is_done() {
        return Err(bad("body header"));
    }
    Ok(BodyHeader {
        dir: key.dir,
        sub: key.sub,
        name: key.name,
        status,
    })
}

/// Encodes a body end: `None` complete, `Some(why)` failed.
pub fn encode_body_end(failed: Option<&str>) -> Vec<u8> {
    match failed {
        None => vec![0],
        Some(why) => {
            let mut out = vec![1];
            put_string(&mut out, why);
            out
        }
    }
}

/// Decodes a body end.
pub fn decode_body_end(bytes: &[u8]) -> Result<BodyEnd, WireError> {
    let mut p = Payload::new(bytes);
    let end = match p.u8().ok_or_else(|| bad("body end"))? {
        0 => BodyEnd::Complete,
        1 => BodyEnd::Failed(
            p.string(MAX_PATH * 2)
                .ok_or_else(|| bad("body end"))?
                .into(),
        ),
        _ => return Err(bad("body end")),
    };
    if !p.is_done() {
        return Err(bad("body end"));
    }
    Ok(end)
}

/// True when `text` cannot break a line-based control file: no newline, CR or NUL.
pub fn one_line(text: &str) -> bool {
    !text.contains(['\n', '\r', '\0'])
}

/// Masks the modes a peer asks for: no setuid, setgid (sticky stays, for directories).
pub fn tame_plan(plan: &mut Plan) {
    plan.root_meta.mode &= 0o1777;
    for m in &mut plan.mailboxes {
        if let Some(meta) = &mut m.create {
            meta.mode &= 0o1777;
        }
    }
}

/// Checks every directory and file name of a plan from a peer: all inside the root.
pub fn check_plan(plan: &Plan) -> Result<(), WireError> {
    let unsafe_path = |e: super::path::UnsafePath| WireError::protocol(e.to_string());
    let dirs = plan
        .delete_mailboxes
        .iter()
        .map(|d| &d.dir)
        .chain(&plan.create_parents)
        .chain(&plan.remove_parents)
        .chain(&plan.sweep)
        .chain(plan.mailboxes.iter().map(|m| &m.dir))
        .chain(
            plan.rename_mailboxes
                .iter()
                .flat_map(|r| [&r.from_dir, &r.to_dir]),
        );
    for dir in dirs {
        check_dir(dir).map_err(unsafe_path)?;
    }
    for m in &plan.mailboxes {
        let names = m
            .copies
            .iter()
            .flat_map(|c| [&c.src_name, &c.dst_name])
            .chain(m.renames.iter().flat_map(|r| [&r.from_name, &r.to_name]))
            .chain(m.expunges.iter().map(|e| &e.name));
        for name in names {
            check_name(name).map_err(unsafe_path)?;
        }
        if let Some(crate::sync::plan::UidlistChange::Write(edit)) = &m.uidlist {
            for record in &edit.upsert {
                check_name(&record.base).map_err(unsafe_path)?;
                let guid = record.guid.as_deref().unwrap_or("");
                if record.base.contains(' ')
                    || !one_line(&record.base)
                    || !one_line(&record.ext)
                    || !one_line(guid)
                    || guid.contains(' ')
                {
                    return Err(WireError::protocol("uidlist record with a line break"));
                }
            }
            if !one_line(&edit.header.extra) {
                return Err(WireError::protocol("uidlist header with a line break"));
            }
        }
        if let Some(keywords) = &m.keywords
            && keywords
                .names
                .iter()
                .flatten()
                .any(|k| !one_line(k) || k.contains(' '))
        {
            return Err(WireError::protocol("a keyword with a space or line break"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &str, name: &str) -> Key {
        Key {
            dir: dir.into(),
            sub: Subdir::Cur,
            name: name.into(),
        }
    }

    #[test]
    fn keys_round_trip_and_unsafe_ones_are_refused() {
        let keys = vec![key("", "1.M1.h:2,S"), key(".Archive.2023", "2.M2.h")];
        assert_eq!(decode_keys(&encode_keys(&keys)).unwrap(), keys);
        for (dir, name) in [("../etc", "x"), ("/etc", "x"), ("", "../x"), ("", "a/b")] {
            assert!(
                decode_keys(&encode_keys(&[key(dir, name)])).is_err(),
                "{dir} {name}"
            );
        }
        // A count that the bytes cannot back is refused, not allocated.
        assert!(decode_keys(&[0xff, 0xff, 0xff, 0x00]).is_err());
    }

    #[test]
    fn body_headers_round_trip() {
        let meta = BodyMeta {
            mtime: (-5, 7),
            mode: 0o640,
            uid: 8,
            gid: 9,
            len: 1 << 40,
        };
        for status in [
            BodyStatus::Data(meta),
            BodyStatus::Vanished,
            BodyStatus::Failed("x: EIO".into()),
        ] {
            let bytes = encode_body_header(("d", Subdir::New, "n"), &status);
            let back = decode_body_header(&bytes).unwrap();
            assert_eq!(back.status, status);
            let setuid = BodyStatus::Data(BodyMeta {
                mode: 0o4755,
                ..meta
            });
            let tamed = decode_body_header(&encode_body_header(("d", Subdir::New, "n"), &setuid));
            assert_eq!(
                tamed.unwrap().status,
                BodyStatus::Data(BodyMeta {
                    mode: 0o755,
                    ..meta
                })
            );
            assert!(decode_body_header(&bytes[..bytes.len() - 1]).is_err());
        }
    }

    #[test]
    fn hash_answers_round_trip() {
        use crate::replica::BodyError;
        let answers = vec![
            Ok(u128::MAX - 3),
            Err(BodyError::Vanished("gone".into())),
            Err(BodyError::Failed("bad".into())),
        ];
        let back = decode_hashes(&encode_hashes(&answers), 3).unwrap();
        assert_eq!(format!("{back:?}"), format!("{answers:?}"));
        assert!(decode_hashes(&encode_hashes(&answers), 2).is_err());
    }

    #[test]
    fn plans_naming_paths_outside_the_root_are_refused() {
        let mut plan = Plan::default();
        assert!(check_plan(&plan).is_ok());
        plan.sweep.push("../../etc".into());
        assert!(check_plan(&plan).is_err());
        let mut plan = Plan::default();
        plan.mailboxes.push(crate::sync::plan::MailboxPlan {
            dir: ".A".into(),
            expunges: vec![crate::sync::plan::ExpungeOp {
                uid: 1,
                sub: Subdir::Cur,
                name: "../../x".into(),
            }],
            ..Default::default()
        });
        assert!(check_plan(&plan).is_err());
        let mut plan = Plan::default();
        let mut keywords = crate::storage::maildir::keywords::KeywordMap::default();
        keywords.names[0] = Some("a\n1 b".into());
        plan.mailboxes.push(crate::sync::plan::MailboxPlan {
            keywords: Some(keywords),
            ..Default::default()
        });
        assert!(check_plan(&plan).is_err());
        for (from, to) in [(".A", "../B"), ("/etc", ".B"), (".A", ".B")] {
            let plan = Plan {
                rename_mailboxes: vec![crate::sync::plan::RenameMailbox {
                    from_dir: from.into(),
                    to_dir: to.into(),
                    name: "B".into(),
                }],
                ..Plan::default()
            };
            assert_eq!(
                check_plan(&plan).is_ok(),
                to == ".B" && from == ".A",
                "{from} -> {to}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode_keys(&bytes);
            let _ = decode_hashes(&bytes, 3);
            let _ = decode_body_header(&bytes);
            let _ = decode_body_end(&bytes);
        }
    }
}
