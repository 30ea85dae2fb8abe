//! Checks on every mailbox directory, subdirectory and file name a peer sends: they must
//! name something inside the replica root, so a hostile peer cannot read or write outside
//! it. Pure string checks; the filesystem side (no symlinks followed) is the storage's job.

use std::path::{Component, Path};

use crate::model::Subdir;

/// Longest name or directory accepted from a peer.
pub const MAX_PATH: usize = 4096;

/// Why a peer's path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the peer sent an unsafe path {0:?}")]
pub struct UnsafePath(pub String);

/// A mailbox directory relative to the root: empty (INBOX) or normal components only.
pub fn check_dir(dir: &str) -> Result<&str, UnsafePath> {
    let bad = || UnsafePath(dir.chars().take(200).collect());
    if dir.len() > MAX_PATH || dir.contains('\0') {
        return Err(bad());
    }
    if dir.is_empty() {
        return Ok(dir);
    }
    let path = Path::new(dir);
    let all_normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    let dotted = dir.split('/').any(|c| c == "." || c == "..");
    if !all_normal || dotted || dir.ends_with('/') || dir.contains("//") {
        return Err(bad());
    }
    Ok(dir)
}

/// A message file name: one component, not `.` or `..`, no `/`, NUL or line break (a
/// name goes into the line-based uidlist).
pub fn check_name(name: &str) -> Result<&str, UnsafePath> {
    let bad = name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains(['\0', '\n', '\r']);
    if bad {
        return Err(UnsafePath(name.chars().take(200).collect()));
    }
    Ok(name)
}

/// A subdirectory byte: `cur` or `new`.
pub fn check_subdir(byte: u8) -> Result<Subdir, UnsafePath> {
    match byte {
        0 => Ok(Subdir::New),
        1 => Ok(Subdir::Cur),
        other => Err(UnsafePath(format!("subdir {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_mailbox_paths() {
        for ok in ["", ".Sent", ".Archive.2023", "Work/Project", "Entw&APw-rfe"] {
            assert!(check_dir(ok).is_ok(), "{ok}");
        }
        assert!(check_name("1700000000.M1P2.host,S=5:2,S").is_ok());
    }

    #[test]
    fn refuses_escapes() {
        for bad in [
            "..", "../etc", "/etc", "a/../b", "a/./b", "a//b", "a/", "./a", "a\0b",
        ] {
            assert!(check_dir(bad).is_err(), "{bad:?}");
        }
        for bad in ["", ".", "..", "a/b", "a\0", &"x".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_subdir(2).is_err());
    }

    proptest::proptest! {
        #[test]
        fn accepted_dirs_stay_inside(dir in "[a-z./]{0,12}") {
            if check_dir(&dir).is_ok() {
                let joined = Path::new("/root").join(&dir);
                proptest::prop_assert!(joined.starts_with("/root"));
                proptest::prop_assert!(!dir.split('/').any(|c| c == ".." || c == "."));
            }
        }
    }
}
