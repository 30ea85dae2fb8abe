//! Appends message records to new `m.N` files: each file is written under a temporary name
//! in `storage/`, fsynced, and given its number by a link that never replaces an existing
//! `m.N` (Dovecot's rule: never rewrite a file the map may point into). Collects the map
//! entries of what it wrote and renders them as map index log records. Never opens an
//! existing `m.N` file.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use super::dbox::{self, Metadata};
use super::log_writer::LogWriter;
use crate::error::{Error, Result};

/// Dovecot's default `mdbox_rotate_size`: a file is not appended to past this size.
const ROTATE_SIZE: usize = 10 * 1024 * 1024;

/// The `m.N` files being written and the map entries for them.
pub struct Appender {
    dir: PathBuf,
    owner: (u32, u32),
    now: u32,
    next_file_id: u32,
    first_map_uid: u32,
    current: Option<(File, PathBuf, usize)>,
    /// (file_id, offset, size) by map UID − `first_map_uid`.
    entries: Vec<(u32, u32, u32)>,
    last_file_id: u32,
    files: u32,
    /// Every file this appender created (temporary or numbered), for [`Appender::discard`].
    created: Vec<PathBuf>,
}

impl Appender {
    /// Writes into `dir` (a `storage/` directory) files numbered from `first_file_id`, for
    /// map UIDs from `first_map_uid`; files and their owner `owner`.
    pub fn new(
        dir: PathBuf,
        owner: (u32, u32),
        now: u32,
        first_file_id: u32,
        first_map_uid: u32,
    ) -> Appender {
        Appender {
            dir,
            owner,
            now,
            next_file_id: first_file_id,
            first_map_uid,
            current: None,
            entries: Vec::new(),
            last_file_id: first_file_id.saturating_sub(1),
            files: 0,
            created: Vec::new(),
        }
    }

    /// Appends one record; returns its map UID.
    pub fn append(&mut self, body: &[u8], meta: &Metadata) -> Result<u32> {
        let mut record = Vec::with_capacity(body.len() + 128);
        dbox::write_record(&mut record, body, meta);
        let full = self
            .current
            .as_ref()
            .is_some_and(|(_, _, len)| *len > 16 && len + record.len() > ROTATE_SIZE);
        if self.current.is_none() || full {
            self.rotate()?;
        }
        let file_id = self.next_file_id - 1;
        let (file, path, len) = self.current.as_mut().expect("an open m.N file");
        file.write_all(&record).map_err(|e| Error::io(path, e))?;
        let offset = u32::try_from(*len)
            .map_err(|_| Error::Usage(format!("{}: larger than 4 GiB", path.display())))?;
        *len += record.len();
        let size = u32::try_from(record.len()).unwrap_or(0);
        self.entries.push((file_id, offset, size));
        Ok(self.first_map_uid + self.entries.len() as u32 - 1)
    }

    /// Closes the current file and starts the next.
    fn rotate(&mut self) -> Result<()> {
        self.close_current()?;
        let path = self.dir.join(format!(
            ".temp.mdsync.{}.{}",
            std::process::id(),
            self.next_file_id
        ));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        self.created.push(path.clone());
        crate::sync::mdbox_new::chown(&path, self.owner)?;
        let header = dbox::file_header(self.now);
        file.write_all(&header).map_err(|e| Error::io(&path, e))?;
        self.current = Some((file, path, header.len()));
        self.next_file_id += 1;
        Ok(())
    }

    /// fsyncs the current file and gives it its number (refusing to replace a file).
    fn close_current(&mut self) -> Result<()> {
        let Some((file, temp, _)) = self.current.take() else {
            return Ok(());
        };
        file.sync_all().map_err(|e| Error::io(&temp, e))?;
        let id = self.next_file_id - 1;
        let target = self.dir.join(format!("m.{id}"));
        fs::hard_link(&temp, &target).map_err(|e| Error::io(&target, e))?;
        self.created.push(target.clone());
        fs::remove_file(&temp).map_err(|e| Error::io(&temp, e))?;
        self.last_file_id = id;
        self.files += 1;
        Ok(())
    }

    /// Finishes the last file and fsyncs `storage/`; returns how many files were written.
    pub fn finish(&mut self) -> Result<u32> {
        self.close_current()?;
        crate::sync::mdbox_new::fsync_path(&self.dir)?;
        Ok(self.files)
    }

    /// Removes every file this appender created: the map never named them. Best effort.
    pub fn discard(&mut self) {
        self.current = None;
        for path in self.created.drain(..) {
            let _ = fs::remove_file(path);
        }
    }

    /// True when nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The map index records for what was appended: the highest file id, the new map UIDs,
    /// their locations, refcount 1 each. One transaction.
    pub fn map_records(&self, log: &mut LogWriter) {
        log.ext_intro("map", 8, 12, 4);
        log.ext_hdr_update(0, &self.last_file_id.to_le_bytes());
        if !self.entries.is_empty() {
            let uid = |i: usize| self.first_map_uid + i as u32;
            let uids: Vec<(u32, u8)> = (0..self.entries.len()).map(|i| (uid(i), 0)).collect();
            log.append(&uids);
            let locs: Vec<(u32, Vec<u8>)> = self
                .entries
                .iter()
                .enumerate()
                .map(|(i, &(file, offset, size))| {
                    let mut d = file.to_le_bytes().to_vec();
                    d.extend(offset.to_le_bytes());
                    d.extend(size.to_le_bytes());
                    (uid(i), d)
                })
                .collect();
            log.ext_rec_update(&locs);
            log.ext_intro("ref", 0, 2, 2);
            let refs: Vec<(u32, Vec<u8>)> = (0..self.entries.len())
                .map(|i| (uid(i), 1u16.to_le_bytes().to_vec()))
                .collect();
            log.ext_rec_update(&refs);
        }
        log.commit();
    }
}
