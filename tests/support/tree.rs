//! Helpers that look at Maildir trees and at mdsync runs from the outside: running
//! `mdsync backup` and reading its exit code, stderr and `--json` report; snapshots of every
//! entry under a root (to prove a run wrote nothing); message files by base name; uidlist
//! records; oracle text without `uidnext`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use super::mdsync;

/// A finished `mdsync` run.
#[derive(Debug)]
pub struct Run {
    /// The command line, for failure messages.
    pub cmdline: String,
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// stdout as text.
    pub stdout: String,
    /// stderr as text.
    pub stderr: String,
}

impl Run {
    /// Wraps a finished process.
    pub fn from_output(cmdline: String, out: Output) -> Run {
        Run {
            cmdline,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Everything about the run, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }

    /// Panics (showing the output) unless the exit code is `code`; also checks for panics.
    pub fn assert_code(&self, code: i32) -> &Run {
        self.assert_no_panic();
        assert_eq!(self.code, Some(code), "{}", self.describe());
        self
    }

    /// Panics unless the run exited 0.
    pub fn assert_ok(&self) -> &Run {
        self.assert_code(0)
    }

    /// Panics when mdsync panicked (exit 101 or a panic message) or died from a signal.
    pub fn assert_no_panic(&self) {
        assert!(
            self.code.is_some() && self.code != Some(101) && !self.stderr.contains("panicked"),
            "mdsync panicked or died: {}",
            self.describe()
        );
    }

    /// The `--json` report (the single JSON object on stdout).
    pub fn json(&self) -> serde_json::Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON object on stdout: {}", self.describe()));
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.describe()))
    }

    /// A non-negative integer field of the `--json` report.
    pub fn count(&self, field: &str) -> u64 {
        let json = self.json();
        json.get(field)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| panic!("--json lacks integer `{field}`: {json}"))
    }

    /// Panics unless the `--json` report shows no work at all.
    pub fn assert_no_work(&self) {
        for field in WORK_FIELDS {
            assert_eq!(
                self.count(field),
                0,
                "`{field}` must be 0 in a no-change run: {}",
                self.describe()
            );
        }
    }
}

/// The `--json` counters that describe work done.
pub const WORK_FIELDS: [&str; 7] = [
    "mailboxes_created",
    "mailboxes_deleted",
    "messages_copied",
    "bytes_copied",
    "flag_changes",
    "moves",
    "expunged",
];

/// Runs `mdsync backup OPTIONS SRC DST` to completion.
pub fn backup(src: &Path, dst: &Path, options: &[&str]) -> Run {
    let mut cmd = mdsync();
    cmd.arg("backup").args(options).arg(src).arg(dst);
    let cmdline = format!(
        "mdsync backup {} {} {}",
        options.join(" "),
        src.display(),
        dst.display()
    );
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));
    Run::from_output(cmdline, out)
}

/// Runs `mdsync ARGS` to completion (for locations that are not local paths).
pub fn run_mdsync(args: &[&str]) -> Run {
    let cmdline = format!("mdsync {}", args.join(" "));
    let out = mdsync()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));
    Run::from_output(cmdline, out)
}

/// Runs `mdsync sync --json --no-progress OPTIONS A B` to completion, asserting exit 0;
/// returns the JSON report.
pub fn sync_ok(a: &Path, b: &Path, options: &[&str]) -> serde_json::Value {
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let mut args = vec!["sync", "--json", "--no-progress"];
    args.extend_from_slice(options);
    args.extend([a.as_str(), b.as_str()]);
    let run = run_mdsync(&args);
    run.assert_ok();
    run.json()
}

/// The `kind` of every conflict in a `sync --json` report.
pub fn conflict_kinds(json: &serde_json::Value) -> Vec<&str> {
    json["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect()
}

/// `backup` with `--json`, asserting exit 0.
pub fn backup_ok(src: &Path, dst: &Path, options: &[&str]) -> Run {
    let mut all = vec!["--json"];
    all.extend_from_slice(options);
    let run = backup(src, dst, &all);
    run.assert_ok();
    run
}

/// What a snapshot records about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryStat {
    /// `d`, `f`, `l` (symlink) or `o`.
    pub kind: char,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// mtime in nanoseconds.
    pub mtime_ns: i128,
    /// ctime in nanoseconds (moves on chmod/chown/rename too).
    pub ctime_ns: i128,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// Every entry under `root` (the root itself as `""`), by relative path, never following
/// symlinks. Nothing is excluded.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, EntryStat> {
    let mut out = BTreeMap::new();
    snapshot_into(root, root, &mut out);
    out
}

fn snapshot_into(root: &Path, path: &Path, out: &mut BTreeMap<PathBuf, EntryStat>) {
    let meta = fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
    let kind = if meta.is_dir() {
        'd'
    } else if meta.is_file() {
        'f'
    } else if meta.file_type().is_symlink() {
        'l'
    } else {
        'o'
    };
    let ns = |secs: i64, nsec: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
    out.insert(
        path.strip_prefix(root).unwrap().to_path_buf(),
        EntryStat {
            kind,
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        },
    );
    if kind == 'd' {
        for entry in fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
            snapshot_into(root, &entry.expect("dir entry").path(), out);
        }
    }
}

/// Panics listing every added, removed or changed entry when two snapshots differ.
pub fn assert_same_snapshot(
    before: &BTreeMap<PathBuf, EntryStat>,
    after: &BTreeMap<PathBuf, EntryStat>,
    what: &str,
) {
    let mut diffs = Vec::new();
    for (path, old) in before {
        match after.get(path) {
            None => diffs.push(format!("removed {}", path.display())),
            Some(new) if new != old => {
                diffs.push(format!("changed {}: {old:?} -> {new:?}", path.display()))
            }
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        diffs.push(format!("added {}", path.display()));
    }
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
}

/// A message file (an entry of some `cur/` or `new/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFile {
    /// Mailbox directory relative to the root (`""` = INBOX).
    pub mailbox: PathBuf,
    /// `cur` or `new`.
    pub sub: String,
    /// File name.
    pub name: String,
    /// Full path.
    pub path: PathBuf,
}

impl MailFile {
    /// The base name (before the first `:`), which is the message GUID for Maildir.
    pub fn base(&self) -> &str {
        base_name(&self.name)
    }
}

/// The part of a Maildir file name before the first `:`.
pub fn base_name(name: &str) -> &str {
    name.split(':').next().unwrap_or(name)
}

/// Every entry of every `cur/` and `new/` under `root` (any layout), sorted by path.
pub fn mail_files(root: &Path) -> Vec<MailFile> {
    let mut out = Vec::new();
    collect_mail_files(root, root, &mut out);
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn collect_mail_files(root: &Path, dir: &Path, out: &mut Vec<MailFile>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir {
            continue;
        }
        match name.as_str() {
            "cur" | "new" => {
                for msg in fs::read_dir(&path).into_iter().flatten().flatten() {
                    out.push(MailFile {
                        mailbox: dir.strip_prefix(root).unwrap().to_path_buf(),
                        sub: name.clone(),
                        name: msg.file_name().to_string_lossy().into_owned(),
                        path: msg.path(),
                    });
                }
            }
            "tmp" => {}
            _ => collect_mail_files(root, &path, out),
        }
    }
}

/// The message file with base name `base` in the mailbox directory `mailbox` (relative to
/// `root`), in `cur/` or `new/`.
pub fn find_by_base(root: &Path, mailbox: &str, base: &str) -> Option<PathBuf> {
    let dir = root.join(mailbox);
    ["cur", "new"].iter().find_map(|sub| {
        fs::read_dir(dir.join(sub))
            .ok()?
            .flatten()
            .find(|e| base_name(&e.file_name().to_string_lossy()) == base)
            .map(|e| e.path())
    })
}

/// Inode of the message `base` in `mailbox`; panics when absent.
pub fn inode_of(root: &Path, mailbox: &str, base: &str) -> u64 {
    let path = find_by_base(root, mailbox, base)
        .unwrap_or_else(|| panic!("no message {base} in {}/{mailbox}", root.display()));
    fs::metadata(&path).unwrap().ino()
}

/// Every file named `mdsync-tmp.*` (or directory) anywhere under `root`.
pub fn leftover_temps(root: &Path) -> Vec<PathBuf> {
    snapshot(root)
        .into_keys()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("mdsync-tmp."))
        })
        .collect()
}

/// A parsed `dovecot-uidlist`: the header line and `(uid, base)` records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidlistFile {
    /// The first line.
    pub header: String,
    /// Records in file order.
    pub records: Vec<(u32, String)>,
}

/// Reads `dir/dovecot-uidlist`, `None` when absent.
pub fn read_uidlist(dir: &Path) -> Option<UidlistFile> {
    let text = fs::read_to_string(dir.join("dovecot-uidlist")).ok()?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("").to_owned();
    let records = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (head, base) = l
                .split_once(" :")
                .unwrap_or_else(|| panic!("bad uidlist line {l:?} in {}", dir.display()));
            let uid = head
                .split(' ')
                .next()
                .and_then(|u| u.parse().ok())
                .unwrap_or_else(|| panic!("bad uid in {l:?} in {}", dir.display()));
            (uid, base.to_owned())
        })
        .collect();
    Some(UidlistFile { header, records })
}

/// The oracle with the `uidnext=N` field removed from every `status` line.
pub fn without_uidnext(oracle: &str) -> String {
    oracle
        .lines()
        .map(|line| {
            if line.starts_with("status ") {
                line.split(' ')
                    .filter(|f| !f.starts_with("uidnext="))
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `mailbox -> uidnext` from the oracle's `status` lines.
pub fn uidnexts(oracle: &str) -> BTreeMap<String, u32> {
    oracle
        .lines()
        .filter_map(|l| l.strip_prefix("status "))
        .map(|rest| {
            let (name, fields) = rest
                .split_once(" uidvalidity=")
                .unwrap_or_else(|| panic!("status line {rest:?}"));
            let next = fields
                .split(' ')
                .find_map(|f| f.strip_prefix("uidnext="))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no uidnext in {rest:?}"));
            (name.to_owned(), next)
        })
        .collect()
}

/// The oracle's `message` lines of one mailbox.
pub fn messages_of<'a>(oracle: &'a str, mailbox: &str) -> Vec<&'a str> {
    let prefix = format!("message {mailbox} uid=");
    oracle.lines().filter(|l| l.starts_with(&prefix)).collect()
}

/// Panics showing only the differing lines when two oracle texts differ.
pub fn assert_same_lines(got: &str, want: &str, what: &str) {
    if got == want {
        return;
    }
    let (got_lines, want_lines): (Vec<&str>, Vec<&str>) =
        (got.lines().collect(), want.lines().collect());
    let mut diff = String::new();
    for line in want_lines.iter().filter(|l| !got_lines.contains(l)) {
        diff.push_str(&format!("- {line}\n"));
    }
    for line in got_lines.iter().filter(|l| !want_lines.contains(l)) {
        diff.push_str(&format!("+ {line}\n"));
    }
    panic!("{what}: differs (- expected, + actual):\n{diff}");
}

/// Starts `mdsync backup --no-progress OPTIONS SRC DST`, SIGKILLs it after `delay` (if
/// still running) and reaps it; true when the kill ended it. A run that ended by itself
/// must have succeeded.
pub fn run_and_kill(src: &Path, dst: &Path, options: &[&str], delay: std::time::Duration) -> bool {
    let mut child = mdsync()
        .args(["backup", "--no-progress"])
        .args(options)
        .arg(src)
        .arg(dst)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start mdsync");
    std::thread::sleep(delay);
    let _ = child.kill(); // SIGKILL; an error only means it already exited
    let status = child.wait().expect("reap mdsync");
    assert!(
        status.code().is_none_or(|c| c == 0),
        "a run that was not killed must succeed: {status}"
    );
    status.code().is_none()
}

/// Panics when an oracle lists one message GUID twice in a mailbox.
pub fn assert_no_duplicate_guids(oracle: &str, when: &str) {
    let mut seen = std::collections::BTreeSet::new();
    for line in oracle.lines().filter(|l| l.starts_with("message ")) {
        let (mailbox, rest) = line["message ".len()..]
            .split_once(" uid=")
            .expect("message line");
        let guid = rest
            .split(' ')
            .find_map(|f| f.strip_prefix("guid="))
            .expect("guid field");
        assert!(
            seen.insert((mailbox.to_owned(), guid.to_owned())),
            "{when}: GUID {guid} twice in {mailbox}:\n{oracle}"
        );
    }
}
