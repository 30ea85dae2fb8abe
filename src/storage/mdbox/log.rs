//! Dovecot's transaction log (`dovecot.index.log`, `.log.2`): the 40-byte header and the
//! records after it, replayed over an [`IndexState`] — the log is the latest truth, the
//! snapshot only a starting point. Handles the big-endian "lockless" record sizes,
//! extension ids by position or by name, EXTERNAL-only expunges, and an unfinished tail
//! transaction, which it ignores like Dovecot does. Never writes or truncates a log.

use std::path::Path;

use super::index::{IndexState, MAX_KEYWORDS};
use super::{Corrupt, align_up, le16, le32};

/// Length of the log header Dovecot 2.x writes (and the least it accepts).
const LOG_HEADER_MIN: usize = 24;

/// Record types (low 28 bits of the type word).
pub(crate) mod kind {
    pub const EXPUNGE: u32 = 0x1;
    pub const APPEND: u32 = 0x2;
    pub const FLAG_UPDATE: u32 = 0x4;
    pub const HEADER_UPDATE: u32 = 0x20;
    pub const EXT_INTRO: u32 = 0x40;
    pub const EXT_RESET: u32 = 0x80;
    pub const EXT_HDR_UPDATE: u32 = 0x100;
    pub const EXT_REC_UPDATE: u32 = 0x200;
    pub const KEYWORD_UPDATE: u32 = 0x400;
    pub const KEYWORD_RESET: u32 = 0x800;
    pub const EXT_ATOMIC_INC: u32 = 0x1000;
    pub const EXPUNGE_GUID: u32 = 0x2000;
    pub const MODSEQ_UPDATE: u32 = 0x8000;
    pub const EXT_HDR_UPDATE32: u32 = 0x10000;
    pub const INDEX_DELETED: u32 = 0x20000;
    pub const INDEX_UNDELETED: u32 = 0x40000;
    pub const BOUNDARY: u32 = 0x80000;
    pub const ATTRIBUTE_UPDATE: u32 = 0x100000;
    /// Bits every expunge record must carry.
    pub const EXPUNGE_PROT: u32 = 0xcd90;
    /// The record describes a change already made in the backend.
    pub const EXTERNAL: u32 = 0x1000_0000;
    pub const TYPE_MASK: u32 = 0x0fff_ffff;
}

/// The header of one log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHeader {
    /// Header length: records start here.
    pub hdr_size: usize,
    /// Must match the index's id.
    pub indexid: u32,
    /// Sequence number of this file.
    pub file_seq: u32,
    /// Sequence number of the file before it (0: none).
    pub prev_file_seq: u32,
}

/// Parses and checks a log file header.
pub fn parse_header(path: &Path, data: &[u8]) -> Result<LogHeader, Corrupt> {
    if data.len() < LOG_HEADER_MIN {
        return Err(Corrupt::new(path, "transaction log header is truncated"));
    }
    if data[0] != 1 {
        return Err(Corrupt::new(
            path,
            format!(
                "unsupported transaction log version {}.{}",
                data[0], data[1]
            ),
        ));
    }
    let hdr_size = le16(data, 2) as usize;
    if hdr_size < LOG_HEADER_MIN || hdr_size > data.len() {
        return Err(Corrupt::new(
            path,
            format!("bad log header size {hdr_size}"),
        ));
    }
    if hdr_size > 32 && data[32] & 1 == 0 {
        return Err(Corrupt::new(path, "transaction log is not little-endian"));
    }
    let header = LogHeader {
        hdr_size,
        indexid: le32(data, 4),
        file_seq: le32(data, 8),
        prev_file_seq: le32(data, 12),
    };
    if header.indexid == 0 {
        return Err(Corrupt::new(path, "transaction log is marked corrupted"));
    }
    Ok(header)
}

/// Decodes the big-endian 7-bits-per-byte record size; `None` when a byte lacks its top bit
/// (a size not yet fully written).
pub fn decode_size(bytes: [u8; 4]) -> Option<usize> {
    let x = u32::from_be_bytes(bytes);
    if x & 0x8080_8080 != 0x8080_8080 {
        return None;
    }
    let v =
        (x & 0x7f) | ((x >> 8) & 0x7f) << 7 | ((x >> 16) & 0x7f) << 14 | ((x >> 24) & 0x7f) << 21;
    Some(v as usize * 4)
}

/// Where a replay stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Offset after the last complete transaction applied.
    pub end: usize,
    /// True when bytes after `end` were an unfinished transaction (ignored).
    pub torn_tail: bool,
}

/// Applies the records of `data` from `start` to `state`. A transaction that is not
/// complete at the end of the file is left out; a malformed complete record is an error.
pub fn replay(
    path: &Path,
    data: &[u8],
    start: usize,
    state: &mut IndexState,
) -> Result<Replayed, Corrupt> {
    let mut pos = start;
    let mut cursor = Cursor::default();
    let torn = |end| {
        Ok(Replayed {
            end,
            torn_tail: true,
        })
    };
    while pos < data.len() {
        let Some(rec) = record_at(path, data, pos)? else {
            return torn(pos);
        };
        let txn_end = if rec.kind == kind::BOUNDARY {
            let size = rec.payload.get(..4).map(|b| le32(b, 0) as usize);
            let end = size.map_or(usize::MAX, |s| pos.saturating_add(s));
            if end > data.len() {
                return torn(pos);
            }
            end
        } else {
            rec.end
        };
        // Check the whole transaction parses before applying any of it.
        let mut at = pos;
        let mut records = Vec::new();
        while at < txn_end {
            let Some(r) = record_at(path, data, at)? else {
                return torn(pos);
            };
            at = r.end;
            records.push(r);
        }
        for r in &records {
            apply(path, r, state, &mut cursor)?;
        }
        pos = txn_end.max(at);
    }
    Ok(Replayed {
        end: pos,
        torn_tail: false,
    })
}

/// One record of a log file.
struct Record<'a> {
    offset: usize,
    end: usize,
    kind: u32,
    external: bool,
    payload: &'a [u8],
}

/// The record at `pos`, `None` when it is not complete (the file ends inside it, or its
/// size is not written yet and only zeros follow).
fn record_at<'a>(path: &Path, data: &'a [u8], pos: usize) -> Result<Option<Record<'a>>, Corrupt> {
    let Some(head) = data.get(pos..pos + 8) else {
        return Ok(None);
    };
    let Some(size) = decode_size(head[..4].try_into().expect("4 bytes")) else {
        if data[pos..].iter().all(|&b| b == 0) {
            return Ok(None);
        }
        return Err(Corrupt::new(
            path,
            format!("bad record size at offset {pos}"),
        ));
    };
    if size < 8 {
        return Err(Corrupt::new(
            path,
            format!("record of {size} bytes at offset {pos}"),
        ));
    }
    let end = pos + size;
    if end > data.len() {
        return Ok(None);
    }
    let word = le32(head, 4);
    Ok(Some(Record {
        offset: pos,
        end,
        kind: word & kind::TYPE_MASK,
        external: word & kind::EXTERNAL != 0,
        payload: &data[pos + 8..end],
    }))
}

/// Per-replay cursor: which extension the following `EXT_*` records address, and whether
/// they are stale (the intro named an old reset id) and so ignored.
#[derive(Default)]
struct Cursor {
    ext: Option<usize>,
    ignore: bool,
}

impl Cursor {
    /// The extension updates go to, `None` when none is selected or they are ignored.
    fn current<'s>(&self, state: &'s mut IndexState) -> Option<&'s mut super::index::Ext> {
        if self.ignore {
            return None;
        }
        state.exts.get_mut(self.ext?)
    }
}

/// Applies one record.
fn apply(
    path: &Path,
    rec: &Record,
    state: &mut IndexState,
    cursor: &mut Cursor,
) -> Result<(), Corrupt> {
    let bad = |what: &str| {
        Corrupt::new(
            path,
            format!(
                "record at offset {} (type {:#x}): {what}",
                rec.offset, rec.kind
            ),
        )
    };
    let p = rec.payload;
    match rec.kind {
        kind::APPEND => {
            for item in chunks(p, 8).ok_or_else(|| bad("bad size"))? {
                let uid = le32(item, 0);
                if state.uids.last().is_some_and(|&last| uid <= last) || uid == 0 {
                    return Err(bad(&format!("append of UID {uid} out of order")));
                }
                state.push_record(uid, item[4] & !0x20);
                if uid >= state.next_uid() {
                    state.set_next_uid(uid + 1);
                }
            }
        }
        k if k == kind::EXPUNGE | kind::EXPUNGE_PROT => {
            if rec.external {
                for item in chunks(p, 8).ok_or_else(|| bad("bad size"))? {
                    expunge(state, le32(item, 0), le32(item, 4));
                }
            }
        }
        k if k == kind::EXPUNGE_GUID | kind::EXPUNGE_PROT => {
            if rec.external {
                for item in chunks(p, 20).ok_or_else(|| bad("bad size"))? {
                    let uid = le32(item, 0);
                    expunge(state, uid, uid);
                }
            }
        }
        kind::EXPUNGE | kind::EXPUNGE_GUID => return Err(bad("expunge without protection bits")),
        kind::FLAG_UPDATE => {
            for item in chunks(p, 12).ok_or_else(|| bad("bad size"))? {
                let (add, remove) = (item[8], item[9]);
                let rows: Vec<usize> = state.rows_in(le32(item, 0), le32(item, 4)).collect();
                for row in rows {
                    state.flags[row] = (state.flags[row] & !remove) | add;
                }
            }
        }
        kind::HEADER_UPDATE => {
            for (offset, bytes) in updates(p, false).ok_or_else(|| bad("bad header update"))? {
                write_at(&mut state.base, offset, bytes);
            }
        }
        kind::EXT_INTRO => ext_intro(p, state, cursor).ok_or_else(|| bad("bad extension intro"))?,
        kind::EXT_RESET => {
            let new_reset = p.get(..5).ok_or_else(|| bad("bad size"))?;
            cursor.ignore = false;
            if let Some(ext) = cursor.ext.and_then(|id| state.exts.get_mut(id)) {
                ext.reset_id = le32(new_reset, 0);
                if new_reset[4] == 0 {
                    ext.column.iter_mut().for_each(|b| *b = 0);
                    ext.hdr.iter_mut().for_each(|b| *b = 0);
                }
            }
        }
        kind::EXT_HDR_UPDATE | kind::EXT_HDR_UPDATE32 => {
            let wide = rec.kind == kind::EXT_HDR_UPDATE32;
            let items = updates(p, wide).ok_or_else(|| bad("bad extension header update"))?;
            if let Some(ext) = cursor.current(state) {
                for (offset, bytes) in items {
                    write_at(&mut ext.hdr, offset, bytes);
                }
            }
        }
        kind::EXT_REC_UPDATE => ext_rec_update(p, state, cursor).ok_or_else(|| bad("bad size"))?,
        kind::EXT_ATOMIC_INC => {
            let items = chunks(p, 8).ok_or_else(|| bad("bad size"))?;
            atomic_inc(state, cursor, &items);
        }
        kind::KEYWORD_UPDATE => {
            keyword_update(path, p, state)?.ok_or_else(|| bad("bad keyword update"))?
        }
        kind::KEYWORD_RESET => {
            for item in chunks(p, 8).ok_or_else(|| bad("bad size"))? {
                let rows: Vec<usize> = state.rows_in(le32(item, 0), le32(item, 4)).collect();
                rows.into_iter().for_each(|row| state.keywords[row] = 0);
            }
        }
        kind::MODSEQ_UPDATE
        | kind::INDEX_DELETED
        | kind::INDEX_UNDELETED
        | kind::BOUNDARY
        | kind::ATTRIBUTE_UPDATE => {}
        _ => return Err(bad("unknown record type")),
    }
    Ok(())
}

/// `payload` as items of `size` bytes; `None` when it is not a whole number of them.
fn chunks(payload: &[u8], size: usize) -> Option<Vec<&[u8]>> {
    payload
        .len()
        .is_multiple_of(size)
        .then(|| payload.chunks_exact(size).collect())
}

fn expunge(state: &mut IndexState, first: u32, last: u32) {
    let rows: Vec<usize> = state.rows_in(first, last).collect();
    rows.into_iter().for_each(|row| state.alive[row] = false);
}

/// Writes `bytes` at `offset`, growing `target` when needed.
fn write_at(target: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    if target.len() < offset + bytes.len() {
        target.resize(offset + bytes.len(), 0);
    }
    target[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// `{offset, size, data, pad→4}` items of a header update (u16 or, `wide`, u32 fields).
fn updates(payload: &[u8], wide: bool) -> Option<Vec<(usize, &[u8])>> {
    let head = if wide { 8 } else { 4 };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < payload.len() {
        let (offset, size) = if wide {
            (
                le32(payload.get(pos..pos + 8)?, 0) as usize,
                le32(payload, pos + 4) as usize,
            )
        } else {
            (
                le16(payload.get(pos..pos + 4)?, 0) as usize,
                le16(payload, pos + 2) as usize,
            )
        };
        let bytes = payload.get(pos + head..pos + head + size)?;
        out.push((offset, bytes));
        pos = align_up(pos + head + size, 4);
    }
    Some(out)
}

/// `EXT_INTRO`: selects (by id or name), creates or resizes an extension.
fn ext_intro(payload: &[u8], state: &mut IndexState, cursor: &mut Cursor) -> Option<()> {
    let mut pos = 0;
    while pos < payload.len() {
        let item = payload.get(pos..pos + 20)?;
        let ext_id = le32(item, 0);
        let reset_id = le32(item, 4);
        let hdr_size = le32(item, 8) as usize;
        let record_size = le16(item, 12) as usize;
        let name_size = le16(item, 18) as usize;
        let name = payload.get(pos + 20..pos + 20 + name_size)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let id = if ext_id != u32::MAX {
            (ext_id as usize) < state.exts.len()
        } else {
            false
        }
        .then_some(ext_id as usize)
        .or_else(|| state.ext_id(&name));
        let (id, ignore) = match id {
            Some(id) => (id, state.exts[id].reset_id != reset_id),
            None if ext_id == u32::MAX => {
                state.exts.push(super::index::Ext {
                    name,
                    reset_id,
                    ..Default::default()
                });
                (state.exts.len() - 1, false)
            }
            None => return None,
        };
        resize_ext(state, id, hdr_size, record_size);
        *cursor = Cursor {
            ext: Some(id),
            ignore,
        };
        pos = align_up(pos + 20 + name_size, 4);
    }
    Some(())
}

/// Gives extension `id` a header of `hdr_size` and records of `record_size` bytes.
fn resize_ext(state: &mut IndexState, id: usize, hdr_size: usize, record_size: usize) {
    let rows = state.uids.len();
    let ext = &mut state.exts[id];
    ext.hdr.resize(hdr_size.max(ext.hdr.len()), 0);
    if record_size == ext.record_size {
        return;
    }
    let old = ext.record_size;
    let mut column = vec![0u8; rows * record_size];
    for row in 0..rows {
        let keep = old.min(record_size);
        column[row * record_size..row * record_size + keep]
            .copy_from_slice(&ext.column[row * old..row * old + keep]);
    }
    ext.column = column;
    ext.record_size = record_size;
}

/// `EXT_REC_UPDATE`: `{uid, data[record_size], pad→4}` items for the current extension.
fn ext_rec_update(payload: &[u8], state: &mut IndexState, cursor: &Cursor) -> Option<()> {
    let (id, ignore) = (cursor.ext?, cursor.ignore);
    let size = state.exts.get(id)?.record_size;
    let step = align_up(4 + size, 4);
    if !payload.len().is_multiple_of(step) {
        return None;
    }
    if ignore {
        return Some(());
    }
    for item in payload.chunks_exact(step) {
        if let Some(row) = state.row_of(le32(item, 0)) {
            let ext = &mut state.exts[id];
            ext.column[row * size..(row + 1) * size].copy_from_slice(&item[4..4 + size]);
        }
    }
    Some(())
}

/// `EXT_ATOMIC_INC`: adds a signed difference to a little-endian counter record.
fn atomic_inc(state: &mut IndexState, cursor: &Cursor, items: &[&[u8]]) {
    let (Some(id), false) = (cursor.ext, cursor.ignore) else {
        return;
    };
    let size = state.exts[id].record_size.min(8);
    for item in items {
        let Some(row) = state.row_of(le32(item, 0)) else {
            continue;
        };
        let diff = i64::from(i32::from_le_bytes(item[4..8].try_into().expect("4 bytes")));
        let ext = &mut state.exts[id];
        let record_size = ext.record_size;
        let cell = &mut ext.column[row * record_size..row * record_size + size];
        let mut buf = [0u8; 8];
        buf[..size].copy_from_slice(cell);
        let value = i64::from_le_bytes(buf).wrapping_add(diff);
        cell.copy_from_slice(&value.to_le_bytes()[..size]);
    }
}

/// `KEYWORD_UPDATE`: `{u8 modify (0 add, 1 remove), pad, u16 name_size, name, pad→4,
/// {uid1, uid2}[]}`. Unknown names join the keyword list in order of appearance (also
/// when removed, as in Dovecot).
fn keyword_update(
    path: &Path,
    payload: &[u8],
    state: &mut IndexState,
) -> Result<Option<()>, Corrupt> {
    let Some(head) = payload.get(..4) else {
        return Ok(None);
    };
    let remove = head[0] == 1;
    let name_size = le16(head, 2) as usize;
    let Some(name) = payload.get(4..4 + name_size) else {
        return Ok(None);
    };
    let name = String::from_utf8_lossy(name).into_owned();
    let bit = match state.keyword_names.iter().position(|n| *n == name) {
        Some(bit) => bit,
        None => {
            if state.keyword_names.len() >= MAX_KEYWORDS {
                return Err(Corrupt::new(
                    path,
                    format!("more than {MAX_KEYWORDS} keywords are not supported"),
                ));
            }
            state.keyword_names.push(name);
            // Like Dovecot, the first keyword creates the `keywords` extension, at the end
            // of the list: later intros count it when they name extensions by position.
            if state.ext_id("keywords").is_none() {
                state.exts.push(super::index::Ext {
                    name: "keywords".into(),
                    ..Default::default()
                });
            }
            state.keyword_names.len() - 1
        }
    };
    let Some(ranges) = payload
        .get(align_up(4 + name_size, 4)..)
        .and_then(|r| chunks(r, 8))
    else {
        return Ok(None);
    };
    for range in ranges {
        let rows: Vec<usize> = state.rows_in(le32(range, 0), le32(range, 4)).collect();
        for row in rows {
            if remove {
                state.keywords[row] &= !(1 << bit);
            } else {
                state.keywords[row] |= 1 << bit;
            }
        }
    }
    Ok(Some(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::mdbox::log_writer::encode_size;

    fn rec(kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = encode_size(8 + payload.len()).to_vec();
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn append(uid: u32, flags: u8) -> Vec<u8> {
        let mut p = uid.to_le_bytes().to_vec();
        p.extend([flags, 0, 0, 0]);
        rec(kind::APPEND | kind::EXTERNAL, &p)
    }

    #[test]
    fn sizes_decode_as_documented() {
        assert_eq!(decode_size([0x80, 0x80, 0x80, 0x83]), Some(12));
        assert_eq!(decode_size([0x80, 0x80, 0x81, 0x96]), Some(600));
        assert_eq!(decode_size([0x80, 0x80, 0x00, 0x83]), None);
        for size in [8, 12, 600, 1 << 20] {
            assert_eq!(decode_size(encode_size(size)), Some(size));
        }
    }

    #[test]
    fn appends_flags_expunges_and_a_torn_tail() {
        let path = Path::new("dovecot.index.log");
        let mut log = append(1, 0);
        log.extend(append(2, 0x08));
        let mut flag = Vec::new();
        flag.extend(1u32.to_le_bytes());
        flag.extend(2u32.to_le_bytes());
        flag.extend([0x02, 0x08, 0, 0]);
        log.extend(rec(kind::FLAG_UPDATE, &flag));
        let mut exp = Vec::new();
        exp.extend(1u32.to_le_bytes());
        exp.extend(1u32.to_le_bytes());
        // An internal expunge is only a request: not applied.
        log.extend(rec(kind::EXPUNGE | kind::EXPUNGE_PROT, &exp));
        let before_torn = log.len();
        let mut torn = append(3, 0);
        torn.truncate(10);
        log.extend(torn);
        let mut state = IndexState::empty();
        let done = replay(path, &log, 0, &mut state).unwrap();
        assert_eq!(
            done,
            Replayed {
                end: before_torn,
                torn_tail: true
            }
        );
        assert_eq!(state.uids, vec![1, 2]);
        assert_eq!(state.flags, vec![0x02, 0x02]);
        assert_eq!(state.next_uid(), 3);
        log.truncate(before_torn);
        log.extend(rec(
            kind::EXPUNGE | kind::EXPUNGE_PROT | kind::EXTERNAL,
            &exp,
        ));
        let mut state = IndexState::empty();
        replay(path, &log, 0, &mut state).unwrap();
        assert_eq!(state.live_count(), 1);
        assert_eq!(state.row_of(1), None);
    }

    #[test]
    fn a_transaction_cut_by_the_end_of_file_is_left_out_whole() {
        let path = Path::new("x.log");
        let mut txn = append(1, 0);
        txn.extend(append(2, 0));
        let mut log = rec(
            kind::BOUNDARY | kind::EXTERNAL,
            &((12 + txn.len()) as u32).to_le_bytes(),
        );
        log.extend(&txn[..txn.len() - 8]);
        let mut state = IndexState::empty();
        let done = replay(path, &log, 0, &mut state).unwrap();
        assert!(done.torn_tail);
        assert_eq!(done.end, 0);
        assert!(state.uids.is_empty());
    }

    #[test]
    fn the_first_keyword_creates_the_keywords_extension_in_id_order() {
        let mut log = append(1, 0);
        let mut kw = vec![0, 0, 5, 0];
        kw.extend(b"$Junk\0\0\0");
        kw.extend(1u32.to_le_bytes());
        kw.extend(1u32.to_le_bytes());
        log.extend(rec(kind::KEYWORD_UPDATE, &kw));
        // An intro by position: id 1 is the extension after `keywords` (id 0).
        let mut intro = u32::MAX.to_le_bytes().to_vec();
        intro.extend([0; 8]);
        intro.extend([2, 0, 2, 0, 0, 0, 3, 0]);
        intro.extend(b"ref\0");
        log.extend(rec(kind::EXT_INTRO, &intro));
        let mut by_id = 1u32.to_le_bytes().to_vec();
        by_id.extend([0; 8]);
        by_id.extend([2, 0, 2, 0, 0, 0, 0, 0]);
        log.extend(rec(kind::EXT_INTRO, &by_id));
        let mut state = IndexState::empty();
        replay(Path::new("x.log"), &log, 0, &mut state).unwrap();
        let names: Vec<&str> = state.exts.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["keywords", "ref"]);
        assert_eq!(state.keywords, vec![1]);
    }

    #[test]
    fn malformed_records_are_errors_naming_the_file() {
        let path = Path::new("mailboxes/INBOX/dbox-Mails/dovecot.index.log");
        let mut state = IndexState::empty();
        let mut log = append(5, 0);
        log.extend(append(4, 0));
        let err = replay(path, &log, 0, &mut state).unwrap_err().to_string();
        assert!(
            err.starts_with("mailboxes/INBOX/dbox-Mails/dovecot.index.log: "),
            "{err}"
        );
        let garbage = [0x12, 0x34, 0x56, 0x78, 1, 2, 3, 4, 5];
        assert!(replay(path, &garbage, 0, &mut IndexState::empty()).is_err());
        let unprotected = rec(kind::EXPUNGE | kind::EXTERNAL, &[1, 0, 0, 0, 1, 0, 0, 0]);
        assert!(replay(path, &unprotected, 0, &mut IndexState::empty()).is_err());
        assert!(parse_header(path, &[2u8; 40]).is_err());
    }
}
