//! What the mdbox scanner needs from `m.N` records but the indexes do not hold — the
//! message GUID as text and the body size — cached per record (file id, offset), so that a
//! scan reads index files only and never pages in the storage. A record never changes at
//! its place (Dovecot appends to `m.N` files and never rewrites one); a file id that comes
//! back after a purge and a rebuild is told apart by the file's inode and the creation time
//! in its header. The cache file is checksummed; a damaged or foreign one counts as empty.
//! Writes only its own file, by temp file and rename.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: &[u8] = b"mdsync-dbox-cache-1\n";

/// Identity of one `m.N` file: inode and the creation time in its header.
pub type FileIdent = (u64, u32);

/// Facts about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFacts {
    /// Body size in bytes.
    pub body_len: u32,
    /// The message GUID (`G` metadata).
    pub guid: String,
}

#[derive(Default)]
struct Entries {
    files: HashMap<u32, FileIdent>,
    records: HashMap<(u32, u32), RecordFacts>,
    dirty: bool,
}

/// The record cache of one mdbox root.
pub struct DboxCache {
    path: Option<PathBuf>,
    entries: Mutex<Entries>,
}

impl DboxCache {
    /// The cache at `dir/dbox-records` (none when `dir` is `None`), loaded when it is intact.
    pub fn load(dir: Option<&Path>) -> DboxCache {
        let path = dir.map(|d| d.join("dbox-records"));
        let entries = path
            .as_deref()
            .and_then(|p| fs::read(p).ok())
            .and_then(|bytes| decode(&bytes))
            .unwrap_or_default();
        DboxCache {
            path,
            entries: Mutex::new(entries),
        }
    }

    /// The facts of the record at `offset` in file `file_id`, when the file is still the
    /// one they were taken from.
    pub fn get(&self, file_id: u32, ident: FileIdent, offset: u32) -> Option<RecordFacts> {
        let entries = self.entries.lock().expect("dbox cache lock");
        if entries.files.get(&file_id) != Some(&ident) {
            return None;
        }
        entries.records.get(&(file_id, offset)).cloned()
    }

    /// Remembers the facts of one record.
    pub fn put(&self, file_id: u32, ident: FileIdent, offset: u32, facts: RecordFacts) {
        let mut entries = self.entries.lock().expect("dbox cache lock");
        if entries.files.insert(file_id, ident) != Some(ident) {
            entries.records.retain(|&(f, _), _| f != file_id);
        }
        entries.records.insert((file_id, offset), facts);
        entries.dirty = true;
    }

    /// Writes the cache when it changed, keeping only the files in `live`.
    pub fn save(&self, live: &[u32]) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut entries = self.entries.lock().expect("dbox cache lock");
        if !entries.dirty {
            return Ok(());
        }
        entries.files.retain(|id, _| live.contains(id));
        let files = entries.files.clone();
        entries.records.retain(|(f, _), _| files.contains_key(f));
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&encode(&entries))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        entries.dirty = false;
        Ok(())
    }
}

fn encode(entries: &Entries) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend((entries.files.len() as u32).to_le_bytes());
    for (id, (ino, created)) in &entries.files {
        out.extend(id.to_le_bytes());
        out.extend(ino.to_le_bytes());
        out.extend(created.to_le_bytes());
    }
    out.extend((entries.records.len() as u32).to_le_bytes());
    for ((file, offset), facts) in &entries.records {
        out.extend(file.to_le_bytes());
        out.extend(offset.to_le_bytes());
        out.extend(facts.body_len.to_le_bytes());
        let guid = facts.guid.as_bytes();
        out.extend((guid.len().min(u16::MAX as usize) as u16).to_le_bytes());
        out.extend(&guid[..guid.len().min(u16::MAX as usize)]);
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend(sum.to_le_bytes());
    out
}

/// Reads bytes in order, `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

fn decode(bytes: &[u8]) -> Option<Entries> {
    let body = bytes.get(..bytes.len().checked_sub(8)?)?;
    let sum = u64::from_le_bytes(bytes[body.len()..].try_into().ok()?);
    if !body.starts_with(MAGIC) || xxhash_rust::xxh3::xxh3_64(body) != sum {
        return None;
    }
    let mut r = Reader(&body[MAGIC.len()..]);
    let mut entries = Entries::default();
    for _ in 0..r.u32()? {
        let (id, ino, created) = (r.u32()?, r.u64()?, r.u32()?);
        entries.files.insert(id, (ino, created));
    }
    for _ in 0..r.u32()? {
        let (file, offset, body_len) = (r.u32()?, r.u32()?, r.u32()?);
        let len = r.u16()? as usize;
        let guid = String::from_utf8(r.take(len)?.to_vec()).ok()?;
        entries
            .records
            .insert((file, offset), RecordFacts { body_len, guid });
    }
    r.0.is_empty().then_some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(guid: &str) -> RecordFacts {
        RecordFacts {
            body_len: 42,
            guid: guid.into(),
        }
    }

    #[test]
    fn round_trips_and_tells_a_replaced_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DboxCache::load(Some(dir.path()));
        cache.put(1, (10, 100), 16, facts("g1"));
        cache.put(2, (11, 100), 16, facts("g2"));
        cache.save(&[1, 2]).unwrap();
        let again = DboxCache::load(Some(dir.path()));
        assert_eq!(again.get(1, (10, 100), 16), Some(facts("g1")));
        assert_eq!(
            again.get(1, (99, 100), 16),
            None,
            "another file under the same id"
        );
        assert_eq!(again.get(1, (10, 100), 17), None);
        again.put(2, (12, 200), 16, facts("new"));
        again.save(&[2]).unwrap();
        let third = DboxCache::load(Some(dir.path()));
        assert_eq!(third.get(1, (10, 100), 16), None, "m.1 is gone");
        assert_eq!(third.get(2, (12, 200), 16), Some(facts("new")));
    }

    #[test]
    fn a_damaged_file_counts_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DboxCache::load(Some(dir.path()));
        cache.put(1, (10, 100), 16, facts("g1"));
        cache.save(&[1]).unwrap();
        let path = dir.path().join("dbox-records");
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 12] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(
            DboxCache::load(Some(dir.path())).get(1, (10, 100), 16),
            None
        );
        assert!(decode(&bytes[..5]).is_none());
    }
}
