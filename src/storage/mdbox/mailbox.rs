//! One mailbox's index (`mailboxes/<name>/dbox-Mails/dovecot.index*`): its UIDVALIDITY,
//! next UID and mailbox GUID (`mdbox-hdr`), and per message the UID, flags, keywords,
//! message GUID (`guid`) and the map UID that locates the body (`mdbox`). Reads only.

use std::path::Path;

use super::index::{self, IndexState};
use super::{Corrupt, le32};
use crate::model::Flags;

/// One message of a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxMessage {
    /// IMAP UID.
    pub uid: u32,
    /// Index flag byte (0x01 \Answered, 0x02 \Flagged, 0x04 \Deleted, 0x08 \Seen, 0x10 \Draft).
    pub flags: u8,
    /// Bit i = keyword i of [`MailboxIndex::keyword_names`].
    pub keywords: u64,
    /// Where the body is: a map index UID.
    pub map_uid: u32,
    /// When the message was saved to this mailbox (UNIX seconds).
    pub save_date: u32,
    /// The 128-bit message GUID.
    pub guid: [u8; 16],
}

impl MailboxMessage {
    /// The system flags as Maildir letters (keywords are per mailbox and left out).
    pub fn system_flags(&self) -> Flags {
        let mut flags = Flags::default();
        for (bit, letter) in [
            (0x01, b'R'),
            (0x02, b'F'),
            (0x04, b'T'),
            (0x08, b'S'),
            (0x10, b'D'),
        ] {
            if self.flags & bit != 0 {
                flags.insert_letter(letter);
            }
        }
        flags
    }
}

/// A mailbox's state as Dovecot sees it.
#[derive(Debug, Clone, Default)]
pub struct MailboxIndex {
    /// UIDVALIDITY.
    pub uid_validity: u32,
    /// The UID the next message would get.
    pub next_uid: u32,
    /// Mailbox GUID from `mdbox-hdr` (`None` before Dovecot wrote it).
    pub mailbox_guid: Option<[u8; 16]>,
    /// The map's UIDVALIDITY this mailbox's map UIDs belong to.
    pub map_uid_validity: u32,
    /// Keyword names in index order.
    pub keyword_names: Vec<String>,
    /// Messages by ascending UID.
    pub messages: Vec<MailboxMessage>,
}

impl MailboxIndex {
    /// Loads the index in a `dbox-Mails` directory; `None` when it has no index files.
    pub fn load(dir: &Path) -> crate::Result<Option<MailboxIndex>> {
        let Some(state) = index::load(dir, "dovecot.index")? else {
            return Ok(None);
        };
        Ok(Some(MailboxIndex::from_state(
            &dir.join("dovecot.index"),
            &state,
        )?))
    }

    /// Reads the mdbox extensions of a loaded mailbox index.
    pub fn from_state(path: &Path, state: &IndexState) -> Result<MailboxIndex, Corrupt> {
        let hdr = state.ext("mdbox-hdr").map(|e| e.hdr.as_slice());
        let (map_uid_validity, mailbox_guid) = match hdr {
            Some(h) if h.len() >= 20 => {
                let guid: [u8; 16] = h[4..20].try_into().expect("16 bytes");
                (le32(h, 0), (guid != [0; 16]).then_some(guid))
            }
            _ => (0, None),
        };
        let mdbox = state.ext("mdbox").filter(|e| e.record_size >= 8);
        let guid = state.ext("guid").filter(|e| e.record_size >= 16);
        if !state.uids.is_empty() && mdbox.is_none() {
            return Err(Corrupt::new(path, "messages without an mdbox extension"));
        }
        let messages = (0..state.uids.len())
            .map(|row| {
                let rec = mdbox.map_or(&[][..], |e| state.ext_record(e, row));
                MailboxMessage {
                    uid: state.uids[row],
                    flags: state.flags[row],
                    keywords: state.keywords[row],
                    map_uid: le32(rec, 0),
                    save_date: le32(rec, 4),
                    guid: guid.map_or([0; 16], |e| {
                        state.ext_record(e, row)[..16].try_into().expect("16 bytes")
                    }),
                }
            })
            .collect();
        Ok(MailboxIndex {
            uid_validity: state.uid_validity(),
            next_uid: state.next_uid(),
            mailbox_guid,
            map_uid_validity,
            keyword_names: state.keyword_names.clone(),
            messages,
        })
    }

    /// The keyword names of a message, in index order.
    pub fn keywords_of(&self, message: &MailboxMessage) -> Vec<&str> {
        self.keyword_names
            .iter()
            .enumerate()
            .filter(|(i, _)| message.keywords & (1 << i) != 0)
            .map(|(_, name)| name.as_str())
            .collect()
    }
}
