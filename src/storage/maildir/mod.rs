//! Dovecot's Maildir on disk: file names, `dovecot-uidlist`, `dovecot-keywords`, dotlocks,
//! folder layouts and the safe writer. Knows nothing of tables, plans or the wire.

pub mod dotlock;
pub mod filename;
pub mod keywords;
pub mod layout;
pub mod uidlist;
pub mod writer;

/// Root-level file listing subscribed mailboxes; copied byte for byte.
pub const SUBSCRIPTIONS: &str = "subscriptions";

/// Root-level file holding the next UIDVALIDITY Dovecot will hand out (8 hex digits).
pub const UIDVALIDITY_FILE: &str = "dovecot-uidvalidity";

/// Marker file in every Maildir++ subfolder.
pub const MAILDIRFOLDER: &str = "maildirfolder";

/// Dovecot's per-mailbox index files: caches for Maildir, never copied, removed when the
/// UIDs they remember no longer match the uidlist.
pub const INDEX_FILES: [&str; 4] = [
    "dovecot.index",
    "dovecot.index.log",
    "dovecot.index.log.2",
    "dovecot.index.cache",
];

/// Prefix of every temporary name mdsync creates, so a re-run can find and remove what a
/// killed run left behind.
pub const TEMP_PREFIX: &str = "mdsync-tmp.";
