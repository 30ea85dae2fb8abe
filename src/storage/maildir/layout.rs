//! Folder layouts: where each mailbox's directory lives (Maildir++ `.A.B` or `LAYOUT=fs`
//! `A/B`), how on-disk names map to the names users see (modified UTF-7), and which
//! directories of a root are mailboxes. Lists directories; never reads messages.

use std::fs;
use std::io;
use std::path::Path;

/// How a Maildir root stores its folders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Layout {
    /// Dovecot's default: flat `.A.B` directories in the root, each with `maildirfolder`.
    MaildirPlusPlus,
    /// `LAYOUT=fs`: nested `A/B` directories, INBOX at the root.
    Fs,
}

impl Layout {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::MaildirPlusPlus => "maildir++",
            Layout::Fs => "fs",
        }
    }

    /// Guesses the layout of an existing root: any `.X` directory means Maildir++, any
    /// plain subdirectory holding `cur/` or `new/` means fs; an empty root is Maildir++.
    pub fn detect(root: &Path) -> io::Result<Layout> {
        Ok(Layout::detect_folders(root)?.unwrap_or(Layout::MaildirPlusPlus))
    }

    /// The layout an existing root's folders show, or `None` when it has no folder yet.
    pub fn detect_folders(root: &Path) -> io::Result<Option<Layout>> {
        let Ok(entries) = fs::read_dir(root) else {
            return Ok(None);
        };
        let mut saw_fs = false;
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // A dot-directory is a Maildir++ folder only when it looks like one: roots also
            // hold `.cache`, `.git` or `.snapshot` directories.
            let path = entry.path();
            if is_maildirpp_folder(&name)
                && (has_mail_dirs(&path) || path.join(super::MAILDIRFOLDER).exists())
            {
                return Ok(Some(Layout::MaildirPlusPlus));
            }
            if !is_reserved_dir(&name) && holds_mailbox(&path, 0) {
                saw_fs = true;
            }
        }
        Ok(saw_fs.then_some(Layout::Fs))
    }

    /// The user-visible mailbox name (`/`-separated, UTF-8) of a mailbox directory given
    /// relative to the root (`""` = INBOX).
    pub fn display_name(self, rel_dir: &str) -> String {
        if rel_dir.is_empty() {
            return "INBOX".to_string();
        }
        let parts: Vec<String> = match self {
            Layout::MaildirPlusPlus => rel_dir
                .trim_start_matches('.')
                .split('.')
                .map(decode_mutf7)
                .collect(),
            Layout::Fs => rel_dir.split('/').map(decode_mutf7).collect(),
        };
        parts.join("/")
    }

    /// Lists the mailbox directories under `root`, relative to it, INBOX (`""`) first when
    /// present. Symlinked directories are returned in `skipped`, never followed.
    pub fn list_mailboxes(self, root: &Path) -> io::Result<MailboxDirs> {
        let mut found = MailboxDirs::default();
        if has_mail_dirs(root) || root.join(super::uidlist::FILE_NAME).exists() {
            found.dirs.push(String::new());
        }
        match self {
            Layout::MaildirPlusPlus => list_maildirpp(root, &mut found)?,
            Layout::Fs => list_fs(root, root, &mut found)?,
        }
        let first_folder = usize::from(found.dirs.first().is_some_and(|d| d.is_empty()));
        found.dirs[first_folder..].sort();
        found.parents.sort();
        Ok(found)
    }
}

/// Mailbox directories found in a root.
#[derive(Debug, Default)]
pub struct MailboxDirs {
    /// Relative directory of each mailbox; `""` is INBOX.
    pub dirs: Vec<String>,
    /// Entries that look like mailboxes but were not followed (symlinks, non-UTF-8 names).
    pub skipped: Vec<String>,
    /// fs layout: directories that hold no mail of their own, only folders below them
    /// (Dovecot lists them as `\NoSelect`); relative to the root.
    pub parents: Vec<String>,
}

fn is_maildirpp_folder(name: &str) -> bool {
    name.len() > 1 && name.starts_with('.') && name != ".." && !name.starts_with(".DOVECOT-")
}

fn is_reserved_dir(name: &str) -> bool {
    matches!(name, "cur" | "new" | "tmp") || name.starts_with('.')
}

/// True when `dir` has a real (not symlinked) `cur/` or `new/` directory.
fn has_mail_dirs(dir: &Path) -> bool {
    let real_dir = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    real_dir(&dir.join("cur")) || real_dir(&dir.join("new"))
}

/// True when `dir` has a `cur` or `new` entry of any kind.
fn has_mail_dir_entries(dir: &Path) -> bool {
    fs::symlink_metadata(dir.join("cur")).is_ok() || fs::symlink_metadata(dir.join("new")).is_ok()
}

/// True when `dir` or a plain subdirectory of it (a few levels deep) is a mailbox: an fs
/// layout may have folders only below parents that hold no mail (`Archive/2023`).
fn holds_mailbox(dir: &Path, depth: usize) -> bool {
    if has_mail_dirs(dir) {
        return true;
    }
    if depth >= 8 {
        return false;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        e.file_type().is_ok_and(|t| t.is_dir())
            && !is_reserved_dir(&name.to_string_lossy())
            && holds_mailbox(&e.path(), depth + 1)
    })
}

/// The entries of `dir` with UTF-8 names, with their types (from `readdir`, no `stat`);
/// other names go to `found.skipped`.
fn utf8_entries(dir: &Path, found: &mut MailboxDirs) -> io::Result<Vec<(String, fs::FileType)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let file_type = entry.file_type()?;
        match entry.file_name().into_string() {
            Ok(name) => out.push((name, file_type)),
            Err(name) => found.skipped.push(name.to_string_lossy().into_owned()),
        }
    }
    Ok(out)
}

fn list_maildirpp(root: &Path, found: &mut MailboxDirs) -> io::Result<()> {
    for (name, file_type) in utf8_entries(root, found)? {
        if !is_maildirpp_folder(&name) {
            continue;
        }
        if file_type.is_symlink() {
            found.skipped.push(name);
        } else if file_type.is_dir() {
            found.dirs.push(name);
        }
    }
    Ok(())
}

fn list_fs(root: &Path, dir: &Path, found: &mut MailboxDirs) -> io::Result<()> {
    for (name, file_type) in utf8_entries(dir, found)? {
        if is_reserved_dir(&name) {
            continue;
        }
        let path = dir.join(&name);
        let rel = path
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if file_type.is_symlink() {
            found.skipped.push(rel);
        } else if file_type.is_dir() {
            // A directory without cur/ or new/ is only a parent (\NoSelect). One whose
            // cur/ or new/ is a symlink is still a mailbox: the scanner refuses it and the
            // destination's copy is left alone.
            if has_mail_dirs(&path) || has_mail_dir_entries(&path) {
                found.dirs.push(rel);
            } else {
                found.parents.push(rel);
            }
            list_fs(root, &path, found)?;
        }
    }
    Ok(())
}

/// Decodes one modified-UTF-7 name component (RFC 3501 §5.1.3). Undecodable input is
/// returned as it is: this name is for display and matching only, never for paths.
pub fn decode_mutf7(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('-') else {
            return text.to_string();
        };
        let chunk = &after[..end];
        if chunk.is_empty() {
            out.push('&');
        } else {
            match decode_utf16_base64(chunk) {
                Some(s) => out.push_str(&s),
                None => return text.to_string(),
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

fn decode_utf16_base64(chunk: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut bytes = Vec::new();
    for c in chunk.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            bytes.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    if bytes.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> = bytes
        .chunks(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_modified_utf7() {
        assert_eq!(decode_mutf7("Entw&APw-rfe"), "Entwürfe");
        assert_eq!(decode_mutf7("&AMQ-rger"), "Ärger");
        assert_eq!(decode_mutf7("&ZeVnLA-"), "日本");
        assert_eq!(decode_mutf7("A&-B"), "A&B");
        assert_eq!(decode_mutf7("broken&abc"), "broken&abc");
    }

    #[test]
    fn display_names_per_layout() {
        let pp = Layout::MaildirPlusPlus;
        assert_eq!(pp.display_name(""), "INBOX");
        assert_eq!(pp.display_name(".Archive.2023"), "Archive/2023");
        assert_eq!(Layout::Fs.display_name("Archive/2023"), "Archive/2023");
    }

    #[test]
    fn lists_and_detects_both_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["cur", "new", "tmp", ".Sent/cur", ".A.B/new"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("/", root.join(".Evil")).unwrap();
        assert_eq!(Layout::detect(root).unwrap(), Layout::MaildirPlusPlus);
        let found = Layout::MaildirPlusPlus.list_mailboxes(root).unwrap();
        assert_eq!(found.dirs, vec!["", ".A.B", ".Sent"]);
        assert_eq!(found.skipped, vec![".Evil"]);

        let fsdir = tempfile::tempdir().unwrap();
        for d in ["cur", "Work/cur", "Work/Proj/new", "Parent/Child/cur"] {
            fs::create_dir_all(fsdir.path().join(d)).unwrap();
        }
        assert_eq!(Layout::detect(fsdir.path()).unwrap(), Layout::Fs);
        let found = Layout::Fs.list_mailboxes(fsdir.path()).unwrap();
        assert_eq!(found.dirs, vec!["", "Parent/Child", "Work", "Work/Proj"]);
    }

    #[test]
    fn fs_detection_and_listing_edge_cases() {
        let fsdir = tempfile::tempdir().unwrap();
        let root = fsdir.path();
        for d in ["cur", "Work/cur", "Parent/Child/cur", "Archive/2023/new"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let found = Layout::Fs.list_mailboxes(root).unwrap();
        assert_eq!(found.parents, vec!["Archive", "Parent"]);
        // Folders only below parents still make an fs tree.
        let nested = tempfile::tempdir().unwrap();
        for d in ["cur", "Archive/2023/cur"] {
            fs::create_dir_all(nested.path().join(d)).unwrap();
        }
        assert_eq!(Layout::detect(nested.path()).unwrap(), Layout::Fs);
        // A stray dot-directory does not turn an fs tree into Maildir++.
        fs::create_dir_all(nested.path().join(".cache/x")).unwrap();
        assert_eq!(Layout::detect(nested.path()).unwrap(), Layout::Fs);
        // A folder whose cur/ is a symlink is still a folder (the scanner refuses it).
        fs::create_dir_all(nested.path().join("Linked")).unwrap();
        std::os::unix::fs::symlink("/tmp", nested.path().join("Linked/cur")).unwrap();
        let found = Layout::Fs.list_mailboxes(nested.path()).unwrap();
        assert!(
            found.dirs.contains(&"Linked".to_string()),
            "{:?}",
            found.dirs
        );
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(Layout::detect_folders(empty.path()).unwrap(), None);
    }
}
