//! On-disk mail formats. Knows nothing about tables, sync or the wire.

pub mod maildir;
pub mod mdbox;
pub mod mmap;
