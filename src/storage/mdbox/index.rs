//! Dovecot's index snapshot (`dovecot.index`, `dovecot.map.index`): the 120-byte base
//! header, the extension headers, and the fixed-size records, loaded into an [`IndexState`]
//! that the transaction log ([`super::log`]) then brings up to date. Parses bytes; every
//! offset is checked against the file's length. Never writes an index.

use std::path::Path;

use super::{Corrupt, align_up, le16, le32};

/// Size of the base header Dovecot 2.x writes (and the least it accepts).
pub const BASE_HEADER_MIN: usize = 120;
/// Offset of `uid_validity` in the base header.
pub const HDR_UID_VALIDITY: usize = 24;
/// Offset of `next_uid` in the base header.
pub const HDR_NEXT_UID: usize = 28;
/// Offset of `log_file_seq` in the base header.
const HDR_LOG_SEQ: usize = 60;
/// Offset of `log_file_head_offset` in the base header.
const HDR_LOG_HEAD: usize = 68;
/// Most keywords one mailbox may use (one `u64` bitmask per message).
pub const MAX_KEYWORDS: usize = 64;

/// One extension: its header bytes and the per-record data column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ext {
    /// Name (`map`, `ref`, `mdbox`, `guid`, `mdbox-hdr`, …).
    pub name: String,
    /// Data is valid only for this reset id.
    pub reset_id: u32,
    /// Header data.
    pub hdr: Vec<u8>,
    /// Bytes of per-record data.
    pub record_size: usize,
    /// Per-record data, `record_size` bytes per row of [`IndexState::uids`].
    pub column: Vec<u8>,
}

/// An index as of some point in its transaction log.
#[derive(Debug, Clone, Default)]
pub struct IndexState {
    /// The base header bytes (at least [`BASE_HEADER_MIN`]); header updates write here.
    pub base: Vec<u8>,
    /// Extensions in id order (the order the log's intros refer to).
    pub exts: Vec<Ext>,
    /// Keyword names, bit `i` of [`IndexState::keywords`] = name `i`.
    pub keyword_names: Vec<String>,
    /// Record UIDs, ascending; expunged rows stay until [`IndexState::compact`].
    pub uids: Vec<u32>,
    /// Record flag bytes.
    pub flags: Vec<u8>,
    /// Keyword bitmask per record.
    pub keywords: Vec<u64>,
    /// False for a row expunged by the log.
    pub alive: Vec<bool>,
    /// Log position the state reflects: (file sequence, offset).
    pub log_seq: u32,
    /// Offset in log file `log_seq` up to which the state is current.
    pub log_offset: u32,
    /// The index id shared by the index and its logs.
    pub indexid: u32,
}

impl IndexState {
    /// An index with no snapshot: what replaying a log from its start builds on.
    pub fn empty() -> IndexState {
        let mut base = vec![0u8; BASE_HEADER_MIN];
        base[HDR_NEXT_UID..HDR_NEXT_UID + 4].copy_from_slice(&1u32.to_le_bytes());
        IndexState {
            base,
            ..IndexState::default()
        }
    }

    /// UIDVALIDITY from the base header.
    pub fn uid_validity(&self) -> u32 {
        le32(&self.base, HDR_UID_VALIDITY)
    }

    /// Next UID from the base header.
    pub fn next_uid(&self) -> u32 {
        le32(&self.base, HDR_NEXT_UID)
    }

    /// Sets the next UID in the base header.
    pub fn set_next_uid(&mut self, uid: u32) {
        self.base[HDR_NEXT_UID..HDR_NEXT_UID + 4].copy_from_slice(&uid.to_le_bytes());
    }

    /// Id of the extension called `name`.
    pub fn ext_id(&self, name: &str) -> Option<usize> {
        self.exts.iter().position(|e| e.name == name)
    }

    /// The extension called `name`.
    pub fn ext(&self, name: &str) -> Option<&Ext> {
        self.exts.iter().find(|e| e.name == name)
    }

    /// Per-record data of extension `ext` for row `row` (empty when it has none).
    pub fn ext_record<'a>(&self, ext: &'a Ext, row: usize) -> &'a [u8] {
        let start = row * ext.record_size;
        ext.column
            .get(start..start + ext.record_size)
            .unwrap_or(&[])
    }

    /// Row of the live record with this UID.
    pub fn row_of(&self, uid: u32) -> Option<usize> {
        let row = self.uids.binary_search(&uid).ok()?;
        self.alive[row].then_some(row)
    }

    /// Rows whose UID lies in `first..=last` and that are still alive.
    pub fn rows_in(&self, first: u32, last: u32) -> impl Iterator<Item = usize> + '_ {
        let start = self.uids.partition_point(|&u| u < first);
        let end = self.uids.partition_point(|&u| u <= last);
        (start..end.max(start)).filter(|&row| self.alive[row])
    }

    /// Adds a record at the end; extension data starts zeroed.
    pub fn push_record(&mut self, uid: u32, flags: u8) {
        self.uids.push(uid);
        self.flags.push(flags);
        self.keywords.push(0);
        self.alive.push(true);
        for ext in &mut self.exts {
            ext.column.resize(ext.column.len() + ext.record_size, 0);
        }
    }

    /// Drops expunged rows.
    pub fn compact(&mut self) {
        if self.alive.iter().all(|&a| a) {
            return;
        }
        let keep: Vec<usize> = (0..self.uids.len()).filter(|&r| self.alive[r]).collect();
        self.uids = keep.iter().map(|&r| self.uids[r]).collect();
        self.flags = keep.iter().map(|&r| self.flags[r]).collect();
        self.keywords = keep.iter().map(|&r| self.keywords[r]).collect();
        self.alive = vec![true; keep.len()];
        for ext in &mut self.exts {
            let size = ext.record_size;
            let mut column = Vec::with_capacity(keep.len() * size);
            for &r in &keep {
                column.extend_from_slice(&ext.column[r * size..(r + 1) * size]);
            }
            ext.column = column;
        }
    }

    /// Number of live records.
    pub fn live_count(&self) -> usize {
        self.alive.iter().filter(|&&a| a).count()
    }
}

/// Loads the index `dir/prefix` (`dovecot.index`, `dovecot.map.index`): the snapshot when
/// there is one, then the rest of `.log.2` and `.log` replayed over it. `None` when neither
/// a snapshot nor a log exists. An unfinished transaction at a log's end is left out.
pub fn load(dir: &Path, prefix: &str) -> crate::Result<Option<IndexState>> {
    let snap_path = dir.join(prefix);
    let log_path = dir.join(format!("{prefix}.log"));
    let log2_path = dir.join(format!("{prefix}.log.2"));
    let snapshot = read_optional(&snap_path)?
        .map(|data| parse_snapshot(&snap_path, &data))
        .transpose()?;
    let Some(log) = read_optional(&log_path)? else {
        return Ok(snapshot.map(|mut s| {
            s.compact();
            s
        }));
    };
    let head = super::log::parse_header(&log_path, &log)?;
    let mut state = match snapshot {
        Some(state) => state,
        None => IndexState {
            indexid: head.indexid,
            ..IndexState::empty()
        },
    };
    if state.indexid != head.indexid {
        return Err(Corrupt::new(&log_path, "index id differs from the index file's").into());
    }
    let from_start = state.log_seq == 0;
    if from_start && head.prev_file_seq != 0 || !from_start && head.file_seq != state.log_seq {
        // The state's position lies in the previous log file.
        let wanted = if from_start {
            head.prev_file_seq
        } else {
            state.log_seq
        };
        let log2 = read_optional(&log2_path)?
            .ok_or_else(|| Corrupt::new(&log_path, format!("log file {wanted} is missing")))?;
        let head2 = super::log::parse_header(&log2_path, &log2)?;
        if head2.file_seq != wanted || head2.file_seq != head.prev_file_seq {
            return Err(Corrupt::new(&log2_path, "does not connect the index and the log").into());
        }
        if from_start && head2.prev_file_seq != 0 {
            return Err(Corrupt::new(&log2_path, "no index file and older logs are gone").into());
        }
        let start = if from_start {
            head2.hdr_size
        } else {
            state.log_offset as usize
        };
        super::log::replay(&log2_path, &log2, start.max(head2.hdr_size), &mut state)?;
        state.log_offset = 0;
    }
    let start = (state.log_offset as usize).max(head.hdr_size);
    let done = super::log::replay(&log_path, &log, start, &mut state)?;
    state.log_seq = head.file_seq;
    state.log_offset = done.end as u32;
    state.compact();
    Ok(Some(state))
}

/// The file's bytes, `None` when it does not exist.
fn read_optional(path: &Path) -> crate::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::Error::io(path, e)),
    }
}

/// Parses a `dovecot.index`-format snapshot.
pub fn parse_snapshot(path: &Path, data: &[u8]) -> Result<IndexState, Corrupt> {
    let bad = |what: String| Corrupt::new(path, what);
    if data.len() < BASE_HEADER_MIN {
        return Err(bad(format!("index of {} bytes is truncated", data.len())));
    }
    if data[0] != 7 {
        return Err(bad(format!(
            "unsupported index version {}.{} (need 7.x)",
            data[0], data[1]
        )));
    }
    if data[12] & 1 == 0 {
        return Err(bad("index is not little-endian".into()));
    }
    let base_size = le16(data, 2) as usize;
    let header_size = le32(data, 4) as usize;
    let record_size = le32(data, 8) as usize;
    if base_size < BASE_HEADER_MIN || header_size < base_size || header_size > data.len() {
        return Err(bad(format!(
            "bad header sizes (base {base_size}, header {header_size}, file {})",
            data.len()
        )));
    }
    let count = le32(data, 32) as usize;
    let records_end = count
        .checked_mul(record_size)
        .and_then(|n| n.checked_add(header_size))
        .filter(|&end| end <= data.len() && record_size >= 5)
        .ok_or_else(|| bad(format!("{count} records of {record_size} bytes do not fit")))?;
    let mut state = IndexState {
        base: data[..base_size].to_vec(),
        indexid: le32(data, 16),
        log_seq: le32(data, HDR_LOG_SEQ),
        log_offset: le32(data, HDR_LOG_HEAD),
        ..IndexState::default()
    };
    let offsets = parse_ext_headers(path, data, base_size, header_size, &mut state)?;
    let records = &data[header_size..records_end];
    load_records(path, records, record_size, &offsets, &mut state)?;
    Ok(state)
}

/// Reads the extension headers between the base header and the records; returns each
/// extension's offset inside a record.
fn parse_ext_headers(
    path: &Path,
    data: &[u8],
    mut offset: usize,
    header_size: usize,
    state: &mut IndexState,
) -> Result<Vec<usize>, Corrupt> {
    let mut record_offsets = Vec::new();
    while offset + 16 <= header_size {
        let hdr_size = le32(data, offset) as usize;
        let name_size = le16(data, offset + 14) as usize;
        let name_end = offset + 16 + name_size;
        let data_start = align_up(name_end, 8);
        let data_end = data_start.saturating_add(hdr_size);
        if data_end > header_size {
            return Err(Corrupt::new(
                path,
                format!("extension header at offset {offset} runs past the header"),
            ));
        }
        let name = String::from_utf8_lossy(&data[offset + 16..name_end]).into_owned();
        let ext = Ext {
            name,
            reset_id: le32(data, offset + 4),
            hdr: data[data_start..data_end].to_vec(),
            record_size: le16(data, offset + 10) as usize,
            column: Vec::new(),
        };
        record_offsets.push(le16(data, offset + 8) as usize);
        if ext.name == "keywords" {
            state.keyword_names = parse_keyword_names(path, &ext.hdr)?;
        }
        state.exts.push(ext);
        offset = align_up(data_end, 8);
    }
    Ok(record_offsets)
}

/// Names from the `keywords` extension header: count, (unused, name offset) pairs, names.
fn parse_keyword_names(path: &Path, hdr: &[u8]) -> Result<Vec<String>, Corrupt> {
    let bad = || Corrupt::new(path, "bad keywords extension header");
    if hdr.len() < 4 {
        return Ok(Vec::new());
    }
    let count = le32(hdr, 0) as usize;
    let names_start = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .filter(|&n| n <= hdr.len())
        .ok_or_else(bad)?;
    let names = &hdr[names_start..];
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let at = le32(hdr, 4 + i * 8 + 4) as usize;
        let rest = names.get(at..).ok_or_else(bad)?;
        let len = rest.iter().position(|&b| b == 0).ok_or_else(bad)?;
        out.push(String::from_utf8_lossy(&rest[..len]).into_owned());
    }
    if out.len() > MAX_KEYWORDS {
        return Err(Corrupt::new(
            path,
            format!(
                "{} keywords: more than {MAX_KEYWORDS} are not supported",
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// Splits the fixed-size records into UIDs, flags, keyword masks and extension columns.
fn load_records(
    path: &Path,
    records: &[u8],
    record_size: usize,
    offsets: &[usize],
    state: &mut IndexState,
) -> Result<(), Corrupt> {
    for (ext, &at) in state.exts.iter().zip(offsets) {
        if ext.record_size > 0 && at + ext.record_size > record_size {
            return Err(Corrupt::new(
                path,
                format!("extension {} lies outside the record", ext.name),
            ));
        }
    }
    let keywords = state.ext_id("keywords");
    let n = records.len() / record_size;
    let mut last = 0;
    for row in records.chunks_exact(record_size) {
        let uid = le32(row, 0);
        if uid <= last {
            return Err(Corrupt::new(
                path,
                format!("record UIDs not ascending at {uid}"),
            ));
        }
        last = uid;
        state.uids.push(uid);
        state.flags.push(row[4]);
        state.alive.push(true);
        let mask = keywords.map_or(0, |k| {
            let ext = &state.exts[k];
            bits_to_mask(&row[offsets[k]..offsets[k] + ext.record_size])
        });
        state.keywords.push(mask);
    }
    for (ext, &at) in state.exts.iter_mut().zip(offsets) {
        ext.column = Vec::with_capacity(n * ext.record_size);
        for row in records.chunks_exact(record_size) {
            ext.column.extend_from_slice(&row[at..at + ext.record_size]);
        }
    }
    Ok(())
}

/// A keyword bitmap (bit i = byte i/8, bit i%8) as a mask of the first 64 keywords.
fn bits_to_mask(bits: &[u8]) -> u64 {
    bits.iter()
        .take(8)
        .enumerate()
        .fold(0, |mask, (i, &b)| mask | u64::from(b) << (8 * i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_versions_and_truncation() {
        let path = Path::new("dovecot.index");
        let mut data = vec![0u8; 120];
        data[0] = 8;
        let err = parse_snapshot(path, &data).unwrap_err().to_string();
        assert!(err.contains("unsupported index version 8"), "{err}");
        assert!(parse_snapshot(path, &data[..50]).is_err());
        data[0] = 7;
        data[12] = 1;
        data[2] = 120;
        data[4] = 120;
        data[8] = 8;
        data[32] = 3; // three records that are not there
        let err = parse_snapshot(path, &data).unwrap_err().to_string();
        assert!(err.starts_with("dovecot.index: 3 records"), "{err}");
    }

    #[test]
    fn keyword_bits_become_a_mask() {
        assert_eq!(bits_to_mask(&[0b101, 0b1]), 0b1_0000_0101);
        assert_eq!(bits_to_mask(&[]), 0);
    }
}
