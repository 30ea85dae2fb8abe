//! End-to-end test harness: drives a real Dovecot `doveadm` standalone (no dovecot service,
//! config in a temp dir) against Maildir trees in temp dirs owned by the `vmail` user, and
//! dumps what Dovecot sees as canonical text (the "oracle") for comparisons.
//! It never skips a test (missing root, `vmail` or doveadm is a panic naming the cause), and
//! never writes outside its temp dirs and the destinations it is given.
//!
//! Include from an integration test with `mod support;`.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub mod corpus;
pub mod sshd;
pub mod tree;

/// The system user (and group) that owns every mail tree doveadm touches.
pub const MAIL_USER: &str = "vmail";

/// Status fields the oracle records for each mailbox, in output order.
const STATUS_FIELDS: [&str; 4] = ["uidvalidity", "guid", "uidnext", "messages"];

/// Folder layout of a Maildir tree, as Dovecot's `mail_location` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Maildir++ (`.Archive.2023/` under the root), Dovecot's default.
    MaildirPlusPlus,
    /// `LAYOUT=fs` (`Archive/2023/` under the root).
    Fs,
    /// Not a Maildir: an mdbox root (`storage/`, `mailboxes/`).
    Mdbox,
}

impl Layout {
    /// The `mail_location` value for a tree at `root`.
    pub fn location(self, root: &Path) -> String {
        match self {
            Layout::MaildirPlusPlus => format!("maildir:{}", root.display()),
            Layout::Fs => format!("maildir:{}:LAYOUT=fs", root.display()),
            Layout::Mdbox => format!("mdbox:{}", root.display()),
        }
    }
}

/// `(uid, gid)` of the `vmail` user and group, read from /etc/passwd and /etc/group.
/// Panics when either is missing: scripts/test.sh creates them.
pub fn vmail_ids() -> (u32, u32) {
    let hint = "run scripts/test.sh as root (it creates it), or: \
                useradd --system --user-group --no-create-home --shell /usr/sbin/nologin vmail";
    let uid = id_from_db("/etc/passwd", MAIL_USER, 2)
        .unwrap_or_else(|| panic!("user `{MAIL_USER}` not found in /etc/passwd: {hint}"));
    let gid = id_from_db("/etc/group", MAIL_USER, 2)
        .unwrap_or_else(|| panic!("group `{MAIL_USER}` not found in /etc/group: {hint}"));
    (uid, gid)
}

/// Numeric field `field` of the line for `name` in a passwd/group style file.
fn id_from_db(file: &str, name: &str, field: usize) -> Option<u32> {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
    text.lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&name))
        .and_then(|cols| cols.get(field)?.parse().ok())
}

/// Panics unless the test runs as root: doveadm refuses root, so it must start as root to
/// drop to `vmail`, and the harness chowns trees.
fn require_root() {
    let status = fs::read_to_string("/proc/self/status")
        .unwrap_or_else(|e| panic!("cannot read /proc/self/status: {e}"));
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no Uid: line in /proc/self/status"));
    assert!(
        euid == "0",
        "end-to-end tests must run as root (doveadm drops from root to `{MAIL_USER}`); \
         run scripts/test.sh as root (effective uid is {euid})"
    );
}

/// Panics unless every ancestor of `dir` lets other users through (`vmail` must reach it).
fn require_traversable(dir: &Path) {
    for ancestor in dir.ancestors().skip(1) {
        let mode = fs::metadata(ancestor)
            .unwrap_or_else(|e| panic!("cannot stat {}: {e}", ancestor.display()))
            .permissions()
            .mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not searchable by `{MAIL_USER}` (mode {mode:o}); set TMPDIR to a directory \
             like /tmp whose ancestors are all o+x",
            ancestor.display()
        );
    }
}

/// A standalone Dovecot configuration in its own temp dir, plus helpers that run doveadm
/// (dropping to `vmail`) on Maildir trees. Everything is removed when dropped.
pub struct Dovecot {
    dir: tempfile::TempDir,
    conf: PathBuf,
    uid: u32,
    gid: u32,
}

impl Dovecot {
    /// Writes the config (base_dir/state_dir inside the temp dir, `mail_uid`/`mail_gid` =
    /// vmail, inbox namespace with separator `/`) into a fresh world-searchable temp dir.
    pub fn new() -> Self {
        require_root();
        let (uid, gid) = vmail_ids();
        let dir = tempfile::Builder::new()
            .prefix("mdsync-dovecot-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        require_traversable(dir.path());
        set_mode(dir.path(), 0o755);
        let run = dir.path().join("run");
        fs::create_dir_all(run.join("state"))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", run.display()));
        let conf = dir.path().join("dovecot.conf");
        write_file(&conf, config_text(&run).as_bytes());
        Dovecot {
            dir,
            conf,
            uid,
            gid,
        }
    }

    /// The temp dir holding the config and every tree made by [`Dovecot::maildir`].
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The generated `dovecot.conf`.
    pub fn config(&self) -> &Path {
        &self.conf
    }

    /// `(uid, gid)` of `vmail`.
    pub fn ids(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// Creates an empty Maildir root `name` inside the temp dir, owned by vmail, mode 0700.
    pub fn maildir(&self, name: &str) -> PathBuf {
        let root = self.dir.path().join(name);
        fs::create_dir_all(&root)
            .unwrap_or_else(|e| panic!("cannot create Maildir root {}: {e}", root.display()));
        set_mode(&root, 0o700);
        chown_path(&root, self.uid, self.gid);
        root
    }

    /// A copy of the committed sample fixture (see [`sample_maildir`]) at `name` inside the
    /// temp dir, made with [`copy_tree`].
    pub fn sample(&self, name: &str) -> PathBuf {
        let root = self.maildir(name);
        copy_tree(&sample_maildir(), &root);
        root
    }

    /// A copy of the mdbox fixture `testdata/mdbox/live` (written by Dovecot) at `name`
    /// inside the temp dir, owned by vmail.
    pub fn mdbox_sample(&self, name: &str) -> PathBuf {
        let to = self.dir.path().join(name);
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/mdbox/live");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&from)
            .arg(&to)
            .status()
            .unwrap();
        assert!(status.success(), "cp -a {}", from.display());
        chown_tree(&to, self.uid, self.gid);
        to
    }

    /// Runs `doveadm -c CONF -o mail_location=LOCATION ARGS` as vmail (env USER=vmail,
    /// HOME=root), feeding `stdin` if given. Never panics on doveadm's exit status.
    pub fn run_doveadm(
        &self,
        root: &Path,
        layout: Layout,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Output {
        let mut cmd = self.doveadm_command(root, layout, args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start doveadm (is dovecot-core installed?): {e}"));
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("doveadm stdin is piped");
            match pipe.write_all(input) {
                // doveadm quit early: its exit status and stderr say why
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                result => {
                    result.unwrap_or_else(|e| panic!("cannot write to doveadm {args:?}: {e}"))
                }
            }
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("cannot wait for doveadm {args:?}: {e}"))
    }

    /// The doveadm [`Command`] for a tree, fully set up but not started.
    pub fn doveadm_command(&self, root: &Path, layout: Layout, args: &[&str]) -> Command {
        let mut cmd = Command::new("doveadm");
        cmd.arg("-c")
            .arg(&self.conf)
            .arg("-o")
            .arg(format!("mail_location={}", layout.location(root)))
            .args(args)
            .env("USER", MAIL_USER)
            .env("HOME", root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// doveadm on a Maildir++ tree; returns the raw output whatever the exit status.
    pub fn try_doveadm(&self, root: &Path, args: &[&str]) -> Output {
        self.run_doveadm(root, Layout::MaildirPlusPlus, args, None)
    }

    /// doveadm on a tree of the given layout; panics (with stderr) on failure, returns stdout.
    pub fn doveadm_in(&self, root: &Path, layout: Layout, args: &[&str]) -> String {
        let out = self.run_doveadm(root, layout, args, None);
        checked_stdout(&out, root, layout, args)
    }

    /// doveadm on a Maildir++ tree; panics (with stderr) on failure, returns stdout.
    pub fn doveadm(&self, root: &Path, args: &[&str]) -> String {
        self.doveadm_in(root, Layout::MaildirPlusPlus, args)
    }

    /// doveadm on a `LAYOUT=fs` tree; panics (with stderr) on failure, returns stdout.
    pub fn doveadm_fs(&self, root: &Path, args: &[&str]) -> String {
        self.doveadm_in(root, Layout::Fs, args)
    }

    /// `doveadm save -m MAILBOX` with the message on stdin (lands in new/, no flags).
    pub fn save_in(&self, root: &Path, layout: Layout, mailbox: &str, message: &[u8]) {
        let args = ["save", "-m", mailbox];
        let out = self.run_doveadm(root, layout, &args, Some(message));
        checked_stdout(&out, root, layout, &args);
    }

    /// `doveadm save -m MAILBOX` into a Maildir++ tree.
    pub fn save(&self, root: &Path, mailbox: &str, message: &[u8]) {
        self.save_in(root, Layout::MaildirPlusPlus, mailbox, message);
    }

    /// `doveadm flags add FLAGS mailbox MAILBOX uid UIDS`; `flags` is space separated
    /// (`"\\Seen $Junk"`), `uids` a UID set (`"3"`, `"1:5"`, `"1,4:*"`).
    pub fn flags_add(&self, root: &Path, mailbox: &str, uids: &str, flags: &str) {
        self.doveadm(
            root,
            &["flags", "add", flags, "mailbox", mailbox, "uid", uids],
        );
    }

    /// `doveadm flags remove FLAGS mailbox MAILBOX uid UIDS`.
    pub fn flags_remove(&self, root: &Path, mailbox: &str, uids: &str, flags: &str) {
        self.doveadm(
            root,
            &["flags", "remove", flags, "mailbox", mailbox, "uid", uids],
        );
    }

    /// `doveadm expunge mailbox MAILBOX uid UIDS`.
    pub fn expunge(&self, root: &Path, mailbox: &str, uids: &str) {
        self.doveadm(root, &["expunge", "mailbox", mailbox, "uid", uids]);
    }

    /// `doveadm mailbox create NAME` (`/` separated, UTF-8).
    pub fn create_mailbox(&self, root: &Path, name: &str) {
        self.doveadm(root, &["mailbox", "create", name]);
    }

    /// `doveadm mailbox subscribe NAME`.
    pub fn subscribe(&self, root: &Path, name: &str) {
        self.doveadm(root, &["mailbox", "subscribe", name]);
    }

    /// `doveadm mailbox unsubscribe NAME`.
    pub fn unsubscribe(&self, root: &Path, name: &str) {
        self.doveadm(root, &["mailbox", "unsubscribe", name]);
    }

    /// `doveadm mailbox delete NAME` (the mailbox must have no children).
    pub fn delete_mailbox(&self, root: &Path, name: &str) {
        self.doveadm(root, &["mailbox", "delete", name]);
    }

    /// `doveadm mailbox rename OLD NEW` (children move along).
    pub fn rename_mailbox(&self, root: &Path, old: &str, new: &str) {
        self.doveadm(root, &["mailbox", "rename", old, new]);
    }

    /// `doveadm -f tab fetch FIELDS mailbox MAILBOX all`: one map per message, keyed by the
    /// field names doveadm prints (e.g. `uid`, `date.received`).
    pub fn fetch(&self, root: &Path, mailbox: &str, fields: &str) -> Vec<BTreeMap<String, String>> {
        parse_tab(&self.doveadm(
            root,
            &["-f", "tab", "fetch", fields, "mailbox", mailbox, "all"],
        ))
    }

    /// Canonical text of what Dovecot sees in a Maildir++ tree; see [`Dovecot::oracle_in`].
    pub fn oracle(&self, root: &Path) -> String {
        self.oracle_in(root, Layout::MaildirPlusPlus)
    }

    /// Canonical, sorted text of what Dovecot sees: mailbox list, subscriptions, per-mailbox
    /// status (uidvalidity, guid, uidnext, messages) and per-message uid, guid and flags
    /// (sorted, without the session-only `\Recent`). Equal trees give equal text.
    ///
    /// Reading makes doveadm write its index files (`dovecot.index*`, `dovecot.list.index*`)
    /// into the tree; it leaves messages, uidlists, keywords and subscriptions alone.
    pub fn oracle_in(&self, root: &Path, layout: Layout) -> String {
        let tab = |args: &[&str]| {
            let mut full = vec!["-f", "tab"];
            full.extend_from_slice(args);
            parse_tab(&self.doveadm_in(root, layout, &full))
        };
        let listed = tab(&["mailbox", "list"]);
        let subscribed = tab(&["mailbox", "list", "-s"]);
        let status_query = STATUS_FIELDS.join(" ");
        let status = tab(&["mailbox", "status", &status_query, "*"]);
        let messages = tab(&["fetch", "mailbox uid guid flags", "all"]);
        render_oracle(&listed, &subscribed, &status, &messages)
    }
}

impl Default for Dovecot {
    fn default() -> Self {
        Self::new()
    }
}

/// The standalone config text, with runtime dirs under `run`.
fn config_text(run: &Path) -> String {
    format!(
        "# Minimal standalone config for doveadm (no dovecot service running).\n\
         base_dir = {run}\n\
         state_dir = {run}/state\n\
         log_path = /dev/stderr\n\
         info_log_path = /dev/stderr\n\
         protocols =\n\
         ssl = no\n\
         mail_uid = {MAIL_USER}\n\
         mail_gid = {MAIL_USER}\n\
         mail_location = maildir:~/Maildir\n\
         namespace inbox {{\n  inbox = yes\n  separator = /\n}}\n",
        run = run.display()
    )
}

/// stdout of a finished doveadm run; panics with the command line and stderr on failure.
fn checked_stdout(out: &Output, root: &Path, layout: Layout, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "doveadm -o mail_location={} {} failed ({}):\nstderr: {}\nstdout: {}",
        layout.location(root),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap_or_else(|e| panic!("doveadm {} printed non-UTF-8: {e}", args.join(" ")))
}

/// Rows of doveadm's `-f tab` output as maps column name -> value (header row consumed).
fn parse_tab(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let names: Vec<&str> = header.split('\t').collect();
    lines
        .filter(|line| !line.is_empty())
        .map(|line| {
            let values = line.split('\t').map(str::to_owned);
            names.iter().map(|n| n.to_string()).zip(values).collect()
        })
        .collect()
}

/// Value of `column` in a tab row; panics naming the column when doveadm did not print it.
fn col<'a>(row: &'a BTreeMap<String, String>, column: &str) -> &'a str {
    row.get(column)
        .unwrap_or_else(|| panic!("doveadm output lacks column `{column}`: {row:?}"))
}

/// Flags as a sorted, space-separated list without `\Recent` (per-session state).
fn canonical_flags(flags: &str) -> String {
    let set: BTreeSet<&str> = flags
        .split_whitespace()
        .filter(|f| *f != "\\Recent")
        .collect();
    set.into_iter().collect::<Vec<_>>().join(" ")
}

/// The oracle text: `list`, `subscribed`, `status`, then `message` lines, each group sorted
/// (messages by mailbox, then numeric UID).
fn render_oracle(
    listed: &[BTreeMap<String, String>],
    subscribed: &[BTreeMap<String, String>],
    status: &[BTreeMap<String, String>],
    messages: &[BTreeMap<String, String>],
) -> String {
    let mut out = String::new();
    let names = |rows: &[BTreeMap<String, String>]| -> BTreeSet<String> {
        rows.iter().map(|r| col(r, "mailbox").to_owned()).collect()
    };
    for name in names(listed) {
        out.push_str(&format!("list {name}\n"));
    }
    for name in names(subscribed) {
        out.push_str(&format!("subscribed {name}\n"));
    }
    let mut status_lines: Vec<String> = status.iter().map(status_line).collect();
    status_lines.sort();
    status_lines.into_iter().for_each(|l| out.push_str(&l));
    let mut message_lines: Vec<((String, u64), String)> =
        messages.iter().map(message_line).collect();
    message_lines.sort();
    message_lines
        .into_iter()
        .for_each(|(_, l)| out.push_str(&l));
    out
}

fn status_line(row: &BTreeMap<String, String>) -> String {
    let fields: Vec<String> = STATUS_FIELDS
        .iter()
        .map(|f| format!("{f}={}", col(row, f)))
        .collect();
    format!("status {} {}\n", col(row, "mailbox"), fields.join(" "))
}

fn message_line(row: &BTreeMap<String, String>) -> ((String, u64), String) {
    let mailbox = col(row, "mailbox").to_owned();
    let uid_text = col(row, "uid");
    let uid: u64 = uid_text
        .parse()
        .unwrap_or_else(|e| panic!("doveadm printed uid {uid_text:?}: {e}"));
    let line = format!(
        "message {mailbox} uid={uid} guid={} flags={}\n",
        col(row, "guid"),
        canonical_flags(col(row, "flags"))
    );
    ((mailbox, uid), line)
}

/// The mdsync binary built by cargo for this test run, with `XDG_CACHE_HOME` and `HOME`
/// pointing at a per-process temp dir ([`cache_home`]) so its scan cache never lands in the
/// real home directory.
pub fn mdsync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mdsync"));
    let home = cache_home();
    cmd.env("XDG_CACHE_HOME", home).env("HOME", home);
    cmd
}

/// Name prefix of the per-process cache homes in the temp dir; the suffix is the test
/// process's PID.
const CACHE_HOME_PREFIX: &str = "mdsync-e2e-cache.";

/// The cache home of this test process: `$TMPDIR/mdsync-e2e-cache.<pid>`, created on first
/// use. Homes left by test processes that no longer run are removed at that moment, so the
/// temp dir does not fill up (statics are never dropped, so a process cannot clean its own).
pub fn cache_home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        let base = std::env::temp_dir();
        sweep_dead_cache_homes(&base);
        let dir = base.join(format!("{CACHE_HOME_PREFIX}{}", std::process::id()));
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create cache home {}: {e}", dir.display()));
        dir
    })
}

/// Removes `mdsync-e2e-cache.<pid>` dirs in `base` whose process is gone.
fn sweep_dead_cache_homes(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(CACHE_HOME_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The committed sample fixture, `testdata/sample/Maildir` in the repository.
pub fn sample_maildir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sample/Maildir")
}

/// A small RFC 5322 message with a distinct Message-ID for tests to save.
pub fn message(id: &str, subject: &str, body_lines: usize) -> Vec<u8> {
    let mut text = format!(
        "From: alice@example.org\nTo: bob@example.org\nSubject: {subject}\n\
         Date: Mon, 01 Jan 2024 12:00:00 +0000\nMessage-ID: <{id}@test.mdsync>\n\n"
    );
    for n in 0..body_lines.max(1) {
        text.push_str(&format!("{id} body line {n}\n"));
    }
    text.into_bytes()
}

/// Copies a Maildir tree like `cp -a` (modes, file and dir mtimes, symlinks as symlinks;
/// into `to`, created if missing), recreates the empty `cur new tmp` that git does not keep
/// in every mailbox dir, then chowns the copy to vmail.
pub fn copy_tree(from: &Path, to: &Path) {
    assert!(
        from.is_dir(),
        "copy_tree: source {} is not a directory",
        from.display()
    );
    copy_dir(from, to, 0);
    let (uid, gid) = vmail_ids();
    chown_tree(to, uid, gid);
}

/// Recursive step of [`copy_tree`]; `depth` 0 is the Maildir root (always a mailbox).
fn copy_dir(from: &Path, to: &Path, depth: usize) {
    if !to.exists() {
        fs::create_dir(to).unwrap_or_else(|e| panic!("cannot create {}: {e}", to.display()));
        let mode = fs::metadata(from)
            .map(|m| m.permissions().mode())
            .unwrap_or(0o755);
        set_mode(to, mode);
    }
    for entry in read_dir_sorted(from) {
        let name = entry.file_name().expect("dir entry has a name");
        copy_entry(&entry, &to.join(name), depth + 1);
    }
    if depth == 0 || is_mailbox_dir(from, depth) {
        for sub in ["cur", "new", "tmp"] {
            ensure_dir(&to.join(sub), 0o700);
        }
    }
    copy_mtime(from, to);
}

/// Copies one file, symlink or directory (recursively) from `from` to `to`.
fn copy_entry(from: &Path, to: &Path, depth: usize) {
    let meta = fs::symlink_metadata(from)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", from.display()));
    let kind = meta.file_type();
    if kind.is_dir() {
        copy_dir(from, to, depth);
    } else if kind.is_symlink() {
        let target = fs::read_link(from)
            .unwrap_or_else(|e| panic!("cannot read link {}: {e}", from.display()));
        symlink(&target, to).unwrap_or_else(|e| panic!("cannot symlink {}: {e}", to.display()));
    } else {
        fs::copy(from, to)
            .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), to.display()));
        copy_mtime(from, to);
    }
}

/// True for a directory (at `depth` below the root) holding a mailbox: a Maildir++
/// `.Folder` right under the root, or any folder with `maildirfolder`, `dovecot-uidlist`,
/// `cur` or `new`. Not for cur/new/tmp themselves nor for `LAYOUT=fs` parents that are
/// only hierarchy (no mailbox files: Dovecot would turn them into real mailboxes).
fn is_mailbox_dir(dir: &Path, depth: usize) -> bool {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if matches!(name, "cur" | "new" | "tmp") {
        return false;
    }
    let markers = ["maildirfolder", "dovecot-uidlist", "cur", "new"];
    (depth == 1 && name.starts_with('.')) || markers.iter().any(|m| dir.join(m).exists())
}

/// Entries of `dir`, sorted by name.
fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .path()
        })
        .collect();
    entries.sort();
    entries
}

/// Creates `dir` with `mode` unless it exists.
fn ensure_dir(dir: &Path, mode: u32) {
    if !dir.is_dir() {
        fs::create_dir(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        set_mode(dir, mode);
    }
}

/// Gives `to` the modification time of `from` (files and directories).
fn copy_mtime(from: &Path, to: &Path) {
    let mtime = fs::metadata(from)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("cannot read mtime of {}: {e}", from.display()));
    fs::File::open(to)
        .and_then(|f| f.set_modified(mtime))
        .unwrap_or_else(|e| panic!("cannot set mtime of {}: {e}", to.display()));
}

/// chown -R without following symlinks.
pub fn chown_tree(path: &Path, uid: u32, gid: u32) {
    chown_path(path, uid, gid);
    let meta = fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
    if meta.is_dir() {
        for entry in read_dir_sorted(path) {
            chown_tree(&entry, uid, gid);
        }
    }
}

fn chown_path(path: &Path, uid: u32, gid: u32) {
    lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("cannot chown {} to {uid}:{gid}: {e}", path.display()));
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {:o} {}: {e}", mode, path.display()));
}

fn write_file(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
