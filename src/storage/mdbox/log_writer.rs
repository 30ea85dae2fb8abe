//! Builds Dovecot transaction logs in memory, record by record, the way Dovecot writes
//! them: the 40-byte version 1.3 header, records with the big-endian "lockless" size, and
//! a BOUNDARY record ahead of every transaction of two or more records. Every record is
//! marked EXTERNAL (it describes mail already in `storage/`). Only builds bytes; the
//! caller decides where they go. Used to create the index of a new mdbox tree, so a log
//! replayed from its start is the whole index (no `dovecot.index` snapshot is written).

use super::log::kind;

/// Record types written here (see [`super::log`] for the full list).
const EXTERNAL: u32 = kind::EXTERNAL;
/// Offset of `log_file_tail_offset` in the index base header.
const TAIL_OFFSET: u16 = 64;

/// A log file being built.
pub struct LogWriter {
    bytes: Vec<u8>,
    txn: Vec<u8>,
    txn_records: usize,
    /// Length of the file these bytes will follow (0 for a new log).
    base: usize,
}

impl LogWriter {
    /// A log with sequence number 1 (no previous file) for the index `indexid`.
    pub fn new(indexid: u32, created: u32) -> LogWriter {
        let mut bytes = Vec::with_capacity(4096);
        bytes.extend([1, 3]);
        bytes.extend(40u16.to_le_bytes());
        bytes.extend(indexid.to_le_bytes());
        bytes.extend(1u32.to_le_bytes()); // file_seq
        bytes.extend(0u32.to_le_bytes()); // prev_file_seq
        bytes.extend(0u32.to_le_bytes()); // prev_file_offset
        bytes.extend(created.to_le_bytes());
        bytes.extend(1u64.to_le_bytes()); // initial_modseq
        bytes.extend([1, 0, 0, 0, 0, 0, 0, 0]); // compat_flags: little-endian
        LogWriter {
            bytes,
            txn: Vec::new(),
            txn_records: 0,
            base: 0,
        }
    }

    /// Records to append to an existing log of `existing_len` bytes (no header).
    pub fn continuing(existing_len: usize) -> LogWriter {
        LogWriter {
            bytes: Vec::new(),
            txn: Vec::new(),
            txn_records: 0,
            base: existing_len,
        }
    }

    fn record(&mut self, kind: u32, payload: &[u8]) {
        let size = 8 + align4(payload.len());
        self.txn.extend(encode_size(size));
        self.txn.extend((kind | EXTERNAL).to_le_bytes());
        self.txn.extend(payload);
        self.txn
            .resize(self.txn.len() + align4(payload.len()) - payload.len(), 0);
        self.txn_records += 1;
    }

    /// Ends the current transaction: a BOUNDARY first when it has two or more records.
    pub fn commit(&mut self) {
        if self.txn_records >= 2 {
            let total = (12 + self.txn.len()) as u32;
            self.bytes.extend(encode_size(12));
            self.bytes.extend((kind::BOUNDARY | EXTERNAL).to_le_bytes());
            self.bytes.extend(total.to_le_bytes());
        }
        self.bytes.append(&mut self.txn);
        self.txn_records = 0;
    }

    /// Writes `data` at `offset` of the base header.
    pub fn header_update(&mut self, offset: u16, data: &[u8]) {
        let mut p = offset.to_le_bytes().to_vec();
        p.extend((data.len() as u16).to_le_bytes());
        p.extend(data);
        self.record(kind::HEADER_UPDATE, &p);
    }

    /// Selects (creating it if needed) the extension `name` for the records that follow.
    pub fn ext_intro(&mut self, name: &str, hdr_size: u32, record_size: u16, align: u16) {
        let mut p = u32::MAX.to_le_bytes().to_vec();
        p.extend(0u32.to_le_bytes()); // reset_id
        p.extend(hdr_size.to_le_bytes());
        p.extend(record_size.to_le_bytes());
        p.extend(align.to_le_bytes());
        p.extend(1u16.to_le_bytes()); // flags: no shrink
        p.extend((name.len() as u16).to_le_bytes());
        p.extend(name.as_bytes());
        self.record(kind::EXT_INTRO, &p);
    }

    /// Writes `data` at `offset` of the current extension's header.
    pub fn ext_hdr_update(&mut self, offset: u16, data: &[u8]) {
        let mut p = offset.to_le_bytes().to_vec();
        p.extend((data.len() as u16).to_le_bytes());
        p.extend(data);
        self.record(kind::EXT_HDR_UPDATE, &p);
    }

    /// Appends records `(uid, flags)`, UIDs ascending.
    pub fn append(&mut self, records: &[(u32, u8)]) {
        let mut p = Vec::with_capacity(records.len() * 8);
        for &(uid, flags) in records {
            p.extend(uid.to_le_bytes());
            p.extend([flags, 0, 0, 0]);
        }
        self.record(kind::APPEND, &p);
    }

    /// Sets the current extension's record data of each `(uid, data)`.
    pub fn ext_rec_update(&mut self, items: &[(u32, Vec<u8>)]) {
        let mut p = Vec::new();
        for (uid, data) in items {
            p.extend(uid.to_le_bytes());
            p.extend(data);
            p.resize(align4(p.len()), 0);
        }
        self.record(kind::EXT_REC_UPDATE, &p);
    }

    /// Adds keyword `name` to the messages with these UIDs.
    pub fn keyword_add(&mut self, name: &str, uids: &[u32]) {
        self.keyword_update(0, name, uids);
    }

    fn keyword_update(&mut self, modify: u8, name: &str, uids: &[u32]) {
        let mut p = vec![modify, 0];
        p.extend((name.len() as u16).to_le_bytes());
        p.extend(name.as_bytes());
        p.resize(align4(p.len()), 0);
        for &uid in uids {
            p.extend(uid.to_le_bytes());
            p.extend(uid.to_le_bytes());
        }
        self.record(kind::KEYWORD_UPDATE, &p);
    }

    /// Sets system flags: adds `add`, removes `remove` (index flag bits) for one UID.
    pub fn flag_update(&mut self, uid: u32, add: u8, remove: u8) {
        let mut p = uid.to_le_bytes().to_vec();
        p.extend(uid.to_le_bytes());
        p.extend([add, remove, 0, 0]);
        self.record(kind::FLAG_UPDATE, &p);
    }

    /// Removes keyword `name` from the messages with these UIDs.
    pub fn keyword_remove(&mut self, name: &str, uids: &[u32]) {
        self.keyword_update(1, name, uids);
    }

    /// Expunges one message (already gone from the backend's point of view), naming its GUID
    /// as Dovecot does.
    pub fn expunge_guid(&mut self, uid: u32, guid: &[u8; 16]) {
        let mut p = uid.to_le_bytes().to_vec();
        p.extend(guid);
        self.record(kind::EXPUNGE_GUID | kind::EXPUNGE_PROT, &p);
    }

    /// Adds `diff` to the current extension's counter of each UID (map refcounts).
    pub fn atomic_inc(&mut self, items: &[(u32, i32)]) {
        let mut p = Vec::with_capacity(items.len() * 8);
        for &(uid, diff) in items {
            p.extend(uid.to_le_bytes());
            p.extend(diff.to_le_bytes());
        }
        self.record(kind::EXT_ATOMIC_INC, &p);
    }

    /// The finished log; an open transaction is committed first. It ends with the header
    /// update Dovecot writes once the backend has applied everything: `log_file_tail_offset`
    /// = the end of the log. Dovecot's map sync refuses a map log whose tail lags its head
    /// ("Inconsistency in map index") and rebuilds the whole map.
    pub fn finish(mut self) -> Vec<u8> {
        self.commit();
        let end = (self.base + self.bytes.len() + 16) as u32;
        self.header_update(TAIL_OFFSET, &end.to_le_bytes());
        self.commit();
        self.bytes
    }
}

/// One message for a mailbox index: what Dovecot's mdbox save records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailRecord {
    /// IMAP UID.
    pub uid: u32,
    /// Index flag bits.
    pub flags: u8,
    /// Keyword names.
    pub keywords: Vec<String>,
    /// The map UID locating the body.
    pub map_uid: u32,
    /// The 128-bit message GUID.
    pub guid: [u8; 16],
}

impl LogWriter {
    /// The mailbox identity header (`mdbox-hdr`): the map's UIDVALIDITY and the mailbox GUID.
    pub fn mdbox_hdr(&mut self, map_validity: u32, guid: [u8; 16]) {
        let mut hdr = map_validity.to_le_bytes().to_vec();
        hdr.extend(guid);
        hdr.extend([0; 4]);
        self.ext_intro("mdbox-hdr", 24, 0, 0);
        self.ext_hdr_update(0, &hdr);
    }

    /// One transaction appending `records` (UIDs ascending) with their `mdbox` (map UID,
    /// save date), `guid` and keyword records.
    pub fn mdbox_appends(&mut self, records: &[MailRecord], save_date: u32) {
        let appends: Vec<(u32, u8)> = records.iter().map(|r| (r.uid, r.flags)).collect();
        self.append(&appends);
        self.ext_intro("mdbox", 0, 8, 4);
        let recs: Vec<(u32, Vec<u8>)> = records
            .iter()
            .map(|r| {
                let mut d = r.map_uid.to_le_bytes().to_vec();
                d.extend(save_date.to_le_bytes());
                (r.uid, d)
            })
            .collect();
        self.ext_rec_update(&recs);
        self.ext_intro("guid", 0, 16, 1);
        let guids: Vec<(u32, Vec<u8>)> = records.iter().map(|r| (r.uid, r.guid.to_vec())).collect();
        self.ext_rec_update(&guids);
        let mut names: Vec<&str> = records
            .iter()
            .flat_map(|r| r.keywords.iter().map(String::as_str))
            .collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let uids: Vec<u32> = records
                .iter()
                .filter(|r| r.keywords.iter().any(|k| k == name))
                .map(|r| r.uid)
                .collect();
            self.keyword_add(name, &uids);
        }
        self.commit();
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The record size in Dovecot's big-endian 7-bits-per-byte form.
pub fn encode_size(size: usize) -> [u8; 4] {
    let v = (size / 4) as u32;
    [
        0x80 | (v >> 21 & 0x7f) as u8,
        0x80 | (v >> 14 & 0x7f) as u8,
        0x80 | (v >> 7 & 0x7f) as u8,
        0x80 | (v & 0x7f) as u8,
    ]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::index::IndexState;
    use super::super::log::{decode_size, parse_header, replay};
    use super::*;

    #[test]
    fn what_is_written_reads_back() {
        let mut log = LogWriter::new(77, 1000);
        log.header_update(24, &5u32.to_le_bytes());
        log.commit();
        log.ext_intro("guid", 0, 16, 1);
        log.append(&[(1, 0x08), (3, 0)]);
        log.ext_rec_update(&[(1, vec![7; 16]), (3, vec![9; 16])]);
        log.keyword_add("$Junk", &[3]);
        log.commit();
        log.flag_update(1, 0x02, 0x08);
        log.keyword_remove("$Junk", &[3]);
        log.expunge_guid(3, &[9; 16]);
        let bytes = log.finish();
        let path = Path::new("dovecot.index.log");
        let head = parse_header(path, &bytes).unwrap();
        assert_eq!((head.indexid, head.file_seq, head.hdr_size), (77, 1, 40));
        let mut state = IndexState::empty();
        let done = replay(path, &bytes, 40, &mut state).unwrap();
        assert!(!done.torn_tail);
        assert_eq!(done.end, bytes.len());
        assert_eq!(state.uid_validity(), 5);
        assert_eq!(state.uids, vec![1, 3]);
        assert_eq!(state.alive, vec![true, false]);
        assert_eq!(state.next_uid(), 4);
        assert_eq!(state.keyword_names, vec!["$Junk"]);
        assert_eq!(state.keywords, vec![0, 0]);
        assert_eq!(state.flags[0], 0x02);
        let guid = state.ext("guid").unwrap();
        assert_eq!(state.ext_record(guid, 1), &[9; 16]);
        let mut more = LogWriter::continuing(bytes.len());
        more.ext_intro("guid", 0, 16, 1);
        more.atomic_inc(&[(1, 1)]);
        let more = more.finish();
        let mut whole = bytes.clone();
        whole.extend(&more);
        let done = replay(path, &whole, 40, &mut IndexState::empty()).unwrap();
        assert_eq!(done.end, whole.len());
        // The tail offset written last is the end of the whole file.
        assert_eq!(
            &whole[whole.len() - 4..],
            &(whole.len() as u32).to_le_bytes()
        );
        for size in [8, 12, 1 << 16] {
            assert_eq!(decode_size(encode_size(size)), Some(size));
        }
    }
}
