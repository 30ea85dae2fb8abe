//! The crate's only `unsafe`: mapping a message file to hash it. Never maps a file it then
//! writes, and never keeps a mapping past one call.

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
