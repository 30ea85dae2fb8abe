//! The map index (`storage/dovecot.map.index*`): for each map UID, where the message lives
//! (`m.<file_id>`, offset, size) and how many mailbox records point at it (refcount).
//! Reads only.

use std::path::Path;

use super::index::{self, IndexState};
use super::{Corrupt, le16, le32};

/// One message's location in `storage/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// The map UID mailbox records refer to.
    pub map_uid: u32,
    /// `N` of `m.N`.
    pub file_id: u32,
    /// Offset of the record's 30-byte header in the file.
    pub offset: u32,
    /// Record size (header, body, metadata); 0 = unknown (last record of a file).
    pub size: u32,
    /// Mailbox records pointing here; 0 = waiting for `doveadm purge`.
    pub refcount: u16,
}

/// The whole map, sorted by map UID.
#[derive(Debug, Clone, Default)]
pub struct MapIndex {
    /// The map's identity; every mailbox index stores it in `mdbox-hdr`.
    pub uid_validity: u32,
    /// Highest `m.N` the map ever assigned.
    pub highest_file_id: u32,
    /// The map UID the next stored message gets.
    pub next_uid: u32,
    /// Entries by ascending map UID.
    pub entries: Vec<MapEntry>,
}

impl MapIndex {
    /// Loads `storage/dovecot.map.index` with its logs; an empty map when none exists yet.
    pub fn load(storage: &Path) -> crate::Result<MapIndex> {
        let Some(state) = index::load(storage, "dovecot.map.index")? else {
            return Ok(MapIndex::default());
        };
        Ok(MapIndex::from_state(
            &storage.join("dovecot.map.index"),
            &state,
        )?)
    }

    /// Reads the `map` and `ref` extensions of a loaded map index.
    pub fn from_state(path: &Path, state: &IndexState) -> Result<MapIndex, Corrupt> {
        let map = state.ext("map");
        if let Some(ext) = map
            && ext.record_size < 12
        {
            return Err(Corrupt::new(path, "map extension records are too small"));
        }
        let refs = state.ext("ref").filter(|e| e.record_size >= 2);
        let entries = (0..state.uids.len())
            .map(|row| {
                let loc = map.map(|e| state.ext_record(e, row)).unwrap_or(&[]);
                let field = |at| if loc.len() >= 12 { le32(loc, at) } else { 0 };
                MapEntry {
                    map_uid: state.uids[row],
                    file_id: field(0),
                    offset: field(4),
                    size: field(8),
                    refcount: refs.map_or(0, |e| le16(state.ext_record(e, row), 0)),
                }
            })
            .collect();
        let highest_file_id = map
            .filter(|e| e.hdr.len() >= 4)
            .map_or(0, |e| le32(&e.hdr, 0));
        Ok(MapIndex {
            uid_validity: state.uid_validity(),
            highest_file_id,
            next_uid: state.next_uid().max(1),
            entries,
        })
    }

    /// The entry for `map_uid`.
    pub fn get(&self, map_uid: u32) -> Option<&MapEntry> {
        self.entries
            .binary_search_by_key(&map_uid, |e| e.map_uid)
            .ok()
            .map(|i| &self.entries[i])
    }
}
