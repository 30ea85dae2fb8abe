//! The crate's only `unsafe`: mapping a message file to hash it, and mapping an mdbox `m.N`
//! file to read messages out of it. Never maps a file it then writes; a hash mapping lives
//! for one call, an `m.N` mapping as long as its [`Mapped`].

use std::fs::File;
use std::io::{self, Read};

/// xxh3-128 of a whole file: memory-mapped, or read when it is empty or mapping fails.
pub fn hash_file(file: &File) -> io::Result<u128> {
    let len = file.metadata()?.len();
    if len > 0 {
        // SAFETY: the map is read-only, lives only inside this function, and the file is a
        // delivered mail message, which IMAP semantics make immutable (writers create a new
        // file instead of changing one). If another process truncated it anyway, the worst
        // case is SIGBUS on a file that was already being corrupted; mdsync itself never
        // writes files it maps.
        #[allow(unsafe_code)]
        if let Ok(map) = unsafe { memmap2::Mmap::map(file) } {
            return Ok(xxhash_rust::xxh3::xxh3_128(&map));
        }
    }
    let mut bytes = Vec::with_capacity(len as usize);
    let mut reader = file;
    reader.read_to_end(&mut bytes)?;
    Ok(xxhash_rust::xxh3::xxh3_128(&bytes))
}

/// The bytes of a whole file, memory-mapped (or read when it is empty or mapping fails).
pub struct Mapped(MappedInner);

enum MappedInner {
    Map(memmap2::Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for Mapped {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            MappedInner::Map(map) => map,
            MappedInner::Read(bytes) => bytes,
        }
    }
}

/// Maps a dbox `m.N` file read-only. Dovecot only ever appends to an `m.N` file and never
/// rewrites or truncates one (purge writes new files and unlinks the old), so the bytes a
/// map index points at do not change under the mapping.
pub fn map_dbox_file(file: &File) -> io::Result<Mapped> {
    let len = file.metadata()?.len();
    if len > 0 {
        // SAFETY: read-only map of an append-only file (see above); mdsync never writes a
        // file it has mapped. A foreign truncation would be corruption of the store already.
        #[allow(unsafe_code)]
        if let Ok(map) = unsafe { memmap2::Mmap::map(file) } {
            return Ok(Mapped(MappedInner::Map(map)));
        }
    }
    let mut bytes = Vec::with_capacity(len as usize);
    let mut reader = file;
    reader.read_to_end(&mut bytes)?;
    Ok(Mapped(MappedInner::Read(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_equal_content_equally() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        std::fs::write(&a, "same body").unwrap();
        std::fs::write(&b, "same body").unwrap();
        std::fs::write(&c, "").unwrap();
        let h = |p| hash_file(&File::open(p).unwrap()).unwrap();
        assert_eq!(h(&a), h(&b));
        assert_eq!(h(&c), xxhash_rust::xxh3::xxh3_128(b""));
        assert_ne!(h(&a), h(&c));
    }
}
