//! Access to the `m.N` files of one mdbox root: each file mapped once (through
//! [`crate::storage::mmap`]) and shared, and messages read by (file, offset). Never writes.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::dbox::{self, Message};
use super::layout;
use crate::storage::mmap::{self, Mapped};

/// One mapped `m.N` file with its owner and mode.
pub struct DboxFile {
    /// The bytes.
    pub data: Mapped,
    /// Its path, for messages.
    pub path: PathBuf,
    /// Its metadata when mapped.
    pub meta: std::fs::Metadata,
    /// Creation time from its header line.
    pub created: u32,
}

/// The `m.N` files of a root, mapped on first use.
pub struct Store {
    root: PathBuf,
    files: Mutex<HashMap<u32, Arc<DboxFile>>>,
}

impl Store {
    /// The store of the mdbox root `root`.
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
            files: Mutex::new(HashMap::new()),
        }
    }

    /// `m.<file_id>`, mapped.
    pub fn file(&self, file_id: u32) -> crate::Result<Arc<DboxFile>> {
        if let Some(file) = self.files.lock().expect("store lock").get(&file_id) {
            return Ok(Arc::clone(file));
        }
        let path = layout::file_path(&self.root, file_id);
        let io = |e| crate::Error::io(&path, e);
        let handle = File::open(&path).map_err(io)?;
        let meta = handle.metadata().map_err(io)?;
        let data = mmap::map_dbox_file(&handle).map_err(io)?;
        let created = dbox::parse_file_header(&path, &data)?.created;
        let file = Arc::new(DboxFile {
            data,
            path,
            meta,
            created,
        });
        self.files
            .lock()
            .expect("store lock")
            .insert(file_id, Arc::clone(&file));
        Ok(file)
    }

    /// The message record at `offset` in `m.<file_id>`; `size` is the map's record size
    /// (0 = unknown).
    pub fn message(
        &self,
        file_id: u32,
        offset: u32,
        size: u32,
    ) -> crate::Result<(Arc<DboxFile>, Message)> {
        let file = self.file(file_id)?;
        let message = dbox::read_message(&file.path, &file.data, offset as usize, size)?;
        Ok((file, message))
    }

    /// Forgets every mapping (after a scan, before files may be purged and replaced).
    pub fn clear(&self) {
        self.files.lock().expect("store lock").clear();
    }
}

/// A reader over a byte range of a mapped file; keeps the mapping alive.
pub struct RangeReader {
    file: Arc<DboxFile>,
    pos: usize,
    end: usize,
}

impl RangeReader {
    /// Reads `range` of `file`.
    pub fn new(file: Arc<DboxFile>, range: std::ops::Range<usize>) -> RangeReader {
        RangeReader {
            file,
            pos: range.start,
            end: range.end,
        }
    }
}

impl std::io::Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.end - self.pos);
        buf[..n].copy_from_slice(&self.file.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
