//! mdsync: sync Dovecot Maildir storage directly on the filesystem, keeping everything an IMAP
//! client relies on — UIDs, UIDVALIDITY, mailbox GUIDs, flags and keywords.
//!
//! Flow: each side is a [`replica::Replica`] that [`scan`]s its tree into a compact
//! [`table::MailTable`]; the brain ([`sync`]) diffs the two tables into a [`sync::plan::Plan`]
//! with pure functions, and the destination's applier carries it out. The library never
//! prints: it reports through [`progress::Progress`] and return values.
//!
//! Invariants: only `sync::apply` writes mail; every write goes through `tmp/` and a
//! non-replacing rename; `dovecot-uidlist.lock` is held while files are renamed into place
//! or removed and while the uidlist changes; `N` in a uidlist never goes down.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod interrupt;
pub mod model;
pub mod progress;
pub mod replica;
pub mod runlock;
pub mod scan;
pub mod serve;
pub mod storage;
pub mod sync;
pub mod table;
pub mod transport;
pub mod watch;
pub mod wire;

pub use error::{Error, Result};
