//! End-to-end `mdsync watch`: the real binary watching a Dovecot-made tree while Dovecot
//! delivers, changes flags, expunges, creates, renames and deletes folders; each change
//! must reach the destination (checked with Dovecot's own view of both sides) within a
//! bounded wait. Locally, and over ssh to 127.0.0.1 with the far side killed mid-run and
//! sshd stopped for a while and started again on the same port.
//! SIGTERM must end it with exit code 0, and it must use no CPU while idle.

mod support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::sshd::Sshd;
use support::{Dovecot, Layout, cache_home, mdsync, message};

/// How long a change may take to show on the destination before the test fails. Far
/// above the target (well under a second): the machine running the tests may be busy.
const CONVERGE: Duration = Duration::from_secs(10);

/// A running `mdsync watch --json`, its stdout lines collected as they come.
struct Watch {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: PathBuf,
    cmdline: String,
}

impl Watch {
    fn start(args: &[String], stderr_dir: &Path) -> Watch {
        let stderr = stderr_dir.join("watch.stderr");
        let mut cmd = mdsync();
        cmd.arg("watch")
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).unwrap());
        let cmdline = format!("mdsync watch --json {}", args.join(" "));
        let mut child = cmd.spawn().expect("start mdsync watch");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Watch {
            child: Some(child),
            lines,
            stderr,
            cmdline,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    fn events_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "`{}`\n--- stdout:\n{}\n--- stderr:\n{}",
            self.cmdline,
            self.lines.lock().unwrap().join("\n"),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits until an event of `kind` satisfying `pred` was printed.
    fn wait_for(&self, kind: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + CONVERGE;
        while Instant::now() < deadline {
            if self.events_of(kind).iter().any(&pred) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no {kind} event came\n{}", self.describe());
    }

    /// SIGTERM ends it with exit code 0 after one `stopped` event.
    fn stops_cleanly(&mut self) {
        assert_eq!(self.terminate(), Some(0), "{}", self.describe());
        assert_eq!(self.events_of("stopped").len(), 1, "{}", self.describe());
    }

    /// SIGTERM, then the exit code (the process is killed if it takes longer than 10 s).
    fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mdsync watch did not stop on SIGTERM\n{}", self.describe());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls Dovecot's view of both trees until they agree; panics with both views when they
/// still differ after [`CONVERGE`].
fn wait_equal(dc: &Dovecot, src: &Path, dst: &Path, watch: &Watch, what: &str) {
    wait_equal_in(dc, Layout::MaildirPlusPlus, (src, dst), watch, what);
}

/// [`wait_equal`] for trees of either layout.
fn wait_equal_in(
    dc: &Dovecot,
    layout: Layout,
    (src, dst): (&Path, &Path),
    watch: &Watch,
    what: &str,
) {
    wait_same(dc, (src, layout), (dst, layout), watch, what);
}

/// [`wait_equal`] for two trees of any formats (an mdbox source, a Maildir copy).
fn wait_same(
    dc: &Dovecot,
    (src, src_layout): (&Path, Layout),
    (dst, dst_layout): (&Path, Layout),
    watch: &Watch,
    what: &str,
) {
    let deadline = Instant::now() + CONVERGE;
    // doveadm may fail on a tree the watcher is changing that moment (a folder listed,
    // then renamed away): that counts as "not yet", until the deadline.
    let oracle = |root: &Path, layout: Layout| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dc.oracle_in(root, layout)))
            .unwrap_or_default()
    };
    loop {
        let (want, got) = (oracle(src, src_layout), oracle(dst, dst_layout));
        if want == got && !want.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let (want, got) = (dc.oracle_in(src, src_layout), dc.oracle_in(dst, dst_layout));
            support::tree::assert_same_lines(&got, &want, &format!("{what}: DST"));
            panic!("{what}: trees differ\n{}", watch.describe());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CPU ticks (user + system) the process used so far, from /proc.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Starts `mdsync watch EXTRA.. SRC DST` on a copy of the sample tree; DST is missing.
fn watch_sample(dc: &Dovecot, extra: &[String]) -> (PathBuf, PathBuf, Watch) {
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    let mut args = extra.to_vec();
    args.extend([src.display().to_string(), dst.display().to_string()]);
    let watch = Watch::start(&args, dc.path());
    (src, dst, watch)
}

/// Idle means blocked: no CPU over 3 s (a busy loop would use hundreds of ticks).
fn assert_idle(watch: &Watch) {
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(watch.pid());
    std::thread::sleep(Duration::from_secs(3));
    let idle = cpu_ticks(watch.pid()) - before;
    assert!(
        idle <= 2,
        "{idle} CPU ticks while idle\n{}",
        watch.describe()
    );
}

/// Every kind of change Dovecot makes, each mirrored before the next.
fn changes(dc: &Dovecot, src: &Path, dst: &Path, watch: &Watch) {
    dc.save(
        src,
        "INBOX",
        &message("watch-1", "delivered while watching", 20),
    );
    wait_equal(dc, src, dst, watch, "after a delivery");
    dc.flags_add(src, "INBOX", "1", "\\Seen \\Flagged $Important");
    wait_equal(dc, src, dst, watch, "after flags were added");
    dc.flags_remove(src, "INBOX", "1", "\\Flagged");
    wait_equal(dc, src, dst, watch, "after a flag was removed");
    dc.expunge(src, "INBOX", "2");
    wait_equal(dc, src, dst, watch, "after an expunge");
    dc.create_mailbox(src, "Projects");
    dc.subscribe(src, "Projects");
    dc.save(src, "Projects", &message("watch-2", "in a new folder", 5));
    wait_equal(dc, src, dst, watch, "after a folder was created");
    dc.rename_mailbox(src, "Projects", "Work");
    wait_equal(dc, src, dst, watch, "after a folder was renamed");
    dc.save(src, "Work", &message("watch-3", "in the renamed folder", 5));
    wait_equal(
        dc,
        src,
        dst,
        watch,
        "after a delivery into the renamed folder",
    );
    dc.delete_mailbox(src, "Work");
    wait_equal(dc, src, dst, watch, "after a folder was deleted");
    // Renamed away and back within one batch (as rename(2) does for Dovecot): inotify
    // dropped the folder's watches, so they must be set again for what comes next.
    fs::rename(src.join(".Sent"), src.join(".Away")).unwrap();
    fs::rename(src.join(".Away"), src.join(".Sent")).unwrap();
    wait_equal(
        dc,
        src,
        dst,
        watch,
        "after a folder went away and came back",
    );
    dc.save(
        src,
        "Sent",
        &message("watch-4", "into the folder that came back", 5),
    );
    wait_equal(dc, src, dst, watch, "after a delivery into that folder");
}

#[test]
fn local_watch_mirrors_every_change_and_stops_on_sigterm() {
    let dc = Dovecot::new();
    let (src, dst, mut watch) = watch_sample(&dc, &[]);
    watch.wait_for("batch", |e| e["full"] == true && e["copies"] == 25);
    wait_equal(&dc, &src, &dst, &watch, "after the first run");

    changes(&dc, &src, &dst, &watch);
    // The changes went through batches of single mailboxes, not full runs.
    let batches = watch.events_of("batch");
    assert!(
        batches
            .iter()
            .any(|b| b["full"] == false && b["mailboxes"] == 1 && b["copies"] == 1),
        "{}",
        watch.describe()
    );
    assert!(
        batches
            .iter()
            .filter(|b| b["full"] == false)
            .all(|b| b["latency_ms"].as_f64().is_some()),
        "{}",
        watch.describe()
    );

    assert_idle(&watch);

    watch.stops_cleanly();
}

#[test]
fn fs_layout_nested_folders_are_watched_as_they_appear() {
    let dc = Dovecot::new();
    let src = dc.maildir("src");
    dc.doveadm_fs(&src, &["mailbox", "create", "-s", "Archive/2023"]);
    dc.save_in(&src, Layout::Fs, "Archive/2023", &message("fs-1", "old", 3));
    let dst = dc.path().join("dst");
    let args: Vec<String> = [src.display().to_string(), dst.display().to_string()].into();
    let mut watch = Watch::start(&args, dc.path());
    watch.wait_for("batch", |e| e["full"] == true);
    let both = (src.as_path(), dst.as_path());
    wait_equal_in(&dc, Layout::Fs, both, &watch, "after the first run");
    // A folder two levels below a new parent, then mail into it and into the old one.
    dc.doveadm_fs(&src, &["mailbox", "create", "-s", "Clients/Acme/2024"]);
    wait_equal_in(
        &dc,
        Layout::Fs,
        both,
        &watch,
        "after nested folders appeared",
    );
    dc.save_in(
        &src,
        Layout::Fs,
        "Clients/Acme/2024",
        &message("fs-2", "new", 3),
    );
    wait_equal_in(&dc, Layout::Fs, both, &watch, "after a delivery deep down");
    dc.save_in(
        &src,
        Layout::Fs,
        "Archive/2023",
        &message("fs-3", "more", 3),
    );
    dc.doveadm_fs(&src, &["mailbox", "rename", "Archive", "Old"]);
    wait_equal_in(&dc, Layout::Fs, both, &watch, "after a parent was renamed");
    assert_eq!(watch.terminate(), Some(0), "{}", watch.describe());
}

#[test]
fn a_delivery_during_the_first_run_is_not_lost() {
    let dc = Dovecot::new();
    let (src, dst, mut watch) = watch_sample(&dc, &[]);
    // No waiting: these race the first run.
    dc.save(
        &src,
        "INBOX",
        &message("early-1", "racing the first run", 5),
    );
    dc.create_mailbox(&src, "Early");
    dc.save(
        &src,
        "Early",
        &message("early-2", "in a folder made early", 5),
    );
    wait_equal(
        &dc,
        &src,
        &dst,
        &watch,
        "after changes during the first run",
    );
    assert_eq!(watch.terminate(), Some(0), "{}", watch.describe());
}

#[test]
fn sighup_reopens_the_log_file() {
    let dc = Dovecot::new();
    let log = dc.path().join("watch.log");
    let (src, dst, mut watch) = watch_sample(&dc, &["--log".into(), log.display().to_string()]);
    watch.wait_for("batch", |e| e["full"] == true);
    // logrotate: move the file away, then SIGHUP.
    let rotated = dc.path().join("watch.log.1");
    fs::rename(&log, &rotated).unwrap();
    kill(Pid::from_raw(watch.pid() as i32), Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + CONVERGE;
    while !log.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    dc.save(
        &src,
        "INBOX",
        &message("after-hup", "logged in the new file", 5),
    );
    wait_equal(&dc, &src, &dst, &watch, "after SIGHUP");
    watch.wait_for("batch", |e| e["full"] == false && e["copies"] == 1);
    assert_eq!(watch.terminate(), Some(0), "{}", watch.describe());
    let old = fs::read_to_string(&rotated).unwrap();
    let new = fs::read_to_string(&log).unwrap();
    assert!(
        old.contains("full run: 5 mailboxes read, 25 copied"),
        "{old}"
    );
    assert!(new.contains("log re-opened"), "{new}");
    assert!(new.contains("batch: 1 mailboxes read, 1 copied"), "{new}");
    assert!(!old.contains("1 copied"), "{old}");
}

/// A script that runs this build's mdsync with the test's cache home and writes its PID
/// (the same as the `mdsync serve` it becomes) to `serve.pid`, so the test can kill it.
fn remote_wrapper(dir: &Path) -> PathBuf {
    let path = dir.join("mdsync-remote");
    let text = format!(
        "#!/bin/sh\necho $$ > '{dir}/serve.pid'\n\
         export XDG_CACHE_HOME='{home}/remote' HOME='{home}/remote'\nexec '{bin}' \"$@\"\n",
        dir = dir.display(),
        home = cache_home().display(),
        bin = env!("CARGO_BIN_EXE_mdsync"),
    );
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn serve_pid(dir: &Path) -> i32 {
    fs::read_to_string(dir.join("serve.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `watch` arguments for a local `src` and `dst` on the far side of `sshd`, served by
/// `wrapper`, with `options` first.
fn ssh_args(
    sshd: &Sshd,
    wrapper: &Path,
    options: &[&str],
    (src, dst): (&Path, &Path),
) -> Vec<String> {
    let mut args: Vec<String> = options.iter().map(|o| o.to_string()).collect();
    args.extend([
        "-e".into(),
        sshd.rsh(),
        "--remote-mdsync".into(),
        wrapper.display().to_string(),
        src.display().to_string(),
        format!("{}:{}", sshd.host(), dst.display()),
    ]);
    args
}

#[test]
fn ssh_watch_survives_the_far_side_killed_and_the_host_going_away() {
    let dc = Dovecot::new();
    let sshd = Sshd::start();
    let wrapper = remote_wrapper(sshd.dir());
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    let args = ssh_args(&sshd, &wrapper, &["--retry-min", "0.2"], (&src, &dst));
    let mut watch = Watch::start(&args, dc.path());
    watch.wait_for("batch", |e| e["full"] == true && e["copies"] == 25);
    wait_equal(&dc, &src, &dst, &watch, "after the first run over ssh");
    let mut sshd = sshd;
    dc.save(&src, "INBOX", &message("ssh-1", "over one session", 20));
    dc.flags_add(&src, "INBOX", "1", "\\Answered");
    wait_equal(&dc, &src, &dst, &watch, "after a delivery over ssh");
    // Through a batch of one mailbox (RescanMany on the session), not a full run.
    watch.wait_for("batch", |e| e["full"] == false && e["mailboxes"] == 1);
    assert_idle(&watch);
    let first_serve = serve_pid(sshd.dir());

    // The far side dies while deliveries stream in: at some moment of a batch, or
    // between two.
    for n in 0..6 {
        if n == 3 {
            kill(Pid::from_raw(first_serve), Signal::SIGKILL).unwrap();
        }
        let id = format!("ssh-stream-{n}");
        dc.save(&src, "INBOX", &message(&id, "while the far side dies", 20));
    }
    dc.expunge(&src, "INBOX", "1");
    watch.wait_for("failed", |_| true);
    watch.wait_for("reconnected", |_| true);
    wait_equal(&dc, &src, &dst, &watch, "after the far side came back");
    assert_ne!(serve_pid(sshd.dir()), first_serve, "a new session serves");

    // It keeps going on the new session.
    dc.create_mailbox(&src, "Later");
    dc.save(&src, "Later", &message("ssh-3", "on the new session", 5));
    wait_equal(&dc, &src, &dst, &watch, "on the new session");

    // The whole host goes away for a while: every attempt fails, with growing delays,
    // until sshd is back on the same port.
    sshd.stop_for_now();
    let failed_before = watch.events_of("failed").len();
    dc.save(
        &src,
        "Later",
        &message("ssh-4", "while the host is down", 5),
    );
    let deadline = Instant::now() + CONVERGE;
    while watch.events_of("failed").len() < failed_before + 3 {
        assert!(Instant::now() < deadline, "{}", watch.describe());
        std::thread::sleep(Duration::from_millis(50));
    }
    let delays: Vec<u64> = watch.events_of("failed")[failed_before..]
        .iter()
        .map(|e| e["retry_in_ms"].as_u64().unwrap())
        .collect();
    assert!(delays.windows(2).all(|w| w[1] >= w[0]), "{delays:?}");
    sshd.start_again();
    wait_equal(&dc, &src, &dst, &watch, "after the host came back");
    assert_eq!(watch.terminate(), Some(0), "{}", watch.describe());
}

#[test]
fn bad_starts_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("cur")).unwrap();
    let src_text = src.display().to_string();
    let inside = src.join("backup").display().to_string();
    let missing = dir.path().join("missing").display().to_string();
    let cases: [(&[&str], &str); 4] = [
        (&["backup1:/srv/mail", "/tmp/x"], "source on this host"),
        (&[&src_text, &inside], "overlap"),
        (&[&missing, "/tmp/x"], "not a directory"),
        (&["--max-delay", "10", &src_text, "/tmp/x"], "--max-delay"),
    ];
    for (args, needle) in cases {
        let mut full = vec!["watch"];
        full.extend_from_slice(args);
        let run = support::tree::run_mdsync(&full);
        run.assert_code(1);
        assert!(run.stderr.contains(needle), "{}", run.describe());
    }
    assert!(!src.join("backup").exists(), "nothing was written");
}

/// The flags Dovecot reports for the message with `uid` in `mailbox`.
fn flags_of(dc: &Dovecot, root: &Path, mailbox: &str, uid: &str) -> String {
    dc.fetch(root, mailbox, "uid flags")
        .into_iter()
        .find(|row| row.get("uid").map(String::as_str) == Some(uid))
        .and_then(|row| row.get("flags").cloned())
        .unwrap_or_default()
}

/// Every kind of change Dovecot makes on `from`, each merged into `to` before the next;
/// `tag` keeps the message ids and folder names of two rounds apart.
fn two_way_changes(
    dc: &Dovecot,
    (from, to): (&Path, &Path),
    watch: &Watch,
    (tag, expunged): (&str, &str),
) {
    let what = |s: &str| format!("{s} on {tag}");
    dc.save(
        from,
        "INBOX",
        &message(&format!("{tag}-1"), "delivered while watching", 20),
    );
    wait_equal(dc, from, to, watch, &what("after a delivery"));
    dc.flags_add(from, "INBOX", "1", "\\Seen $Important");
    wait_equal(dc, from, to, watch, &what("after flags were added"));
    dc.flags_remove(from, "INBOX", "1", "\\Seen");
    wait_equal(dc, from, to, watch, &what("after a flag was removed"));
    dc.expunge(from, "INBOX", expunged);
    wait_equal(dc, from, to, watch, &what("after an expunge"));
    let folder = format!("Projects-{tag}");
    dc.create_mailbox(from, &folder);
    dc.subscribe(from, &folder);
    dc.save(
        from,
        &folder,
        &message(&format!("{tag}-2"), "in a new folder", 5),
    );
    wait_equal(dc, from, to, watch, &what("after a folder was created"));
    let renamed = format!("Work-{tag}");
    dc.rename_mailbox(from, &folder, &renamed);
    wait_equal(dc, from, to, watch, &what("after a folder was renamed"));
    dc.save(
        from,
        &renamed,
        &message(&format!("{tag}-3"), "in the renamed folder", 5),
    );
    wait_equal(dc, from, to, watch, &what("after a delivery there"));
}

#[test]
fn two_way_local_watch_merges_changes_from_both_sides() {
    let dc = Dovecot::new();
    let a = dc.sample("a");
    let b = dc.maildir("b");
    // A long debounce, so that the two flag changes below land in one batch.
    let args: Vec<String> = [
        "--two-way",
        "--debounce",
        "400",
        "--max-delay",
        "1500",
        &a.display().to_string(),
        &b.display().to_string(),
    ]
    .map(String::from)
    .into();
    let mut watch = Watch::start(&args, dc.path());
    watch.wait_for("batch", |e| e["full"] == true && e["copies"] == 25);
    wait_equal(&dc, &a, &b, &watch, "after the first run");

    two_way_changes(&dc, (&a, &b), &watch, ("A", "2"));
    let before_b = watch.events_of("batch").len();
    two_way_changes(&dc, (&b, &a), &watch, ("B", "3"));
    // Changes on B went through batches of the dirty mailboxes, not full runs.
    let from_b = &watch.events_of("batch")[before_b..];
    for kind in ["copies", "flag_changes", "expunges"] {
        assert!(
            from_b.iter().any(|e| e["full"] == false && e[kind] == 1),
            "no batch with {kind}\n{}",
            watch.describe()
        );
    }

    // One flag added on each side to the same message, within one batch: both kept.
    let batches = watch.events_of("batch").len();
    std::thread::scope(|s| {
        s.spawn(|| dc.flags_add(&a, "INBOX", "5", "\\Flagged"));
        s.spawn(|| dc.flags_add(&b, "INBOX", "5", "\\Answered"));
    });
    let deadline = Instant::now() + CONVERGE;
    loop {
        let (fa, fb) = (
            flags_of(&dc, &a, "INBOX", "5"),
            flags_of(&dc, &b, "INBOX", "5"),
        );
        let both = |f: &str| f.contains("\\Flagged") && f.contains("\\Answered");
        if both(&fa) && both(&fb) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A: {fa}, B: {fb}\n{}",
            watch.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_equal(&dc, &a, &b, &watch, "after flags added on both sides");
    // Merged in one batch: each side got the other's flag.
    assert!(
        watch.events_of("batch")[batches..]
            .iter()
            .any(|e| e["full"] == false && e["flag_changes"] == 2),
        "{}",
        watch.describe()
    );

    // Idle: the appliers' own writes raised one more batch, which changed nothing and so
    // raised nothing; then no batch at all, and no CPU.
    std::thread::sleep(Duration::from_secs(2));
    let batches = watch.events_of("batch").len();
    assert_idle(&watch);
    assert_eq!(
        watch.events_of("batch").len(),
        batches,
        "batches while idle\n{}",
        watch.describe()
    );
    let last = watch.events_of("batch").pop().unwrap();
    assert_eq!(last["copies"], 0, "{}", watch.describe());
    assert_eq!(last["flag_changes"], 0, "{}", watch.describe());

    watch.stops_cleanly();
}

#[test]
fn two_way_ssh_watch_merges_b_with_a_change_of_a_or_at_the_periodic_run() {
    let dc = Dovecot::new();
    let sshd = Sshd::start();
    let wrapper = remote_wrapper(sshd.dir());
    let a = dc.sample("a");
    let b = dc.maildir("b");
    let options = ["--two-way", "--rescan-interval", "6"];
    let args = ssh_args(&sshd, &wrapper, &options, (&a, &b));
    let mut watch = Watch::start(&args, dc.path());
    watch.wait_for("batch", |e| e["full"] == true && e["copies"] == 25);
    wait_equal(&dc, &a, &b, &watch, "after the first run over ssh");

    // A's changes go in batches of the dirty mailbox, over the session, and a batch reads
    // that mailbox on B too: B's change there comes along, before any periodic run.
    let batches = watch.events_of("batch").len();
    dc.flags_add(&b, "INBOX", "5", "\\Flagged");
    dc.save(&a, "INBOX", &message("ssh-2way-1", "from A", 20));
    wait_equal(&dc, &a, &b, &watch, "after changes on A");
    assert!(
        watch.events_of("batch")[batches..]
            .iter()
            .any(|e| e["full"] == false && e["copies"] == 1 && e["flag_changes"] == 1),
        "{}",
        watch.describe()
    );

    // Nothing watches B: its change is merged by the periodic full run.
    dc.flags_add(&b, "Sent", "1", "\\Flagged");
    dc.save(&b, "Archive", &message("ssh-2way-2", "from B", 5));
    wait_equal(&dc, &a, &b, &watch, "after changes on B");
    assert!(
        watch
            .events_of("batch")
            .iter()
            .any(|e| e["full"] == true && e["latency_ms"].is_null() && e["copies"] == 1),
        "{}",
        watch.describe()
    );
    assert_eq!(watch.terminate(), Some(0), "{}", watch.describe());
}

/// Every kind of change Dovecot makes in the mdbox tree `src`, each mirrored into `dst`
/// (read as `dst_layout`) before the next. The fixture's INBOX holds UIDs 1, 3, 4 and 6.
fn mdbox_changes(dc: &Dovecot, src: &Path, (dst, dst_layout): (&Path, Layout), watch: &Watch) {
    let md = Layout::Mdbox;
    let same = |what: &str| wait_same(dc, (src, md), (dst, dst_layout), watch, what);
    let doveadm = |args: &[&str]| {
        dc.doveadm_in(src, md, args);
    };
    let body = message("mdbox-1", "delivered while watching", 20);
    dc.save_in(src, md, "INBOX", &body);
    same("after a delivery");
    let flags = |change: &str, flags: &str| {
        doveadm(&["flags", change, flags, "mailbox", "INBOX", "uid", "1"]);
    };
    flags("add", "\\Seen \\Flagged $Important");
    same("after flags were added");
    flags("remove", "\\Flagged");
    same("after a flag was removed");
    doveadm(&["expunge", "mailbox", "INBOX", "uid", "4"]);
    same("after an expunge");
    doveadm(&["mailbox", "create", "-s", "Projects"]);
    dc.save_in(
        src,
        md,
        "Projects",
        &message("mdbox-2", "in a new folder", 5),
    );
    same("after a folder was created");
    doveadm(&["mailbox", "rename", "Projects", "Work"]);
    same("after a folder was renamed");
    let body = message("mdbox-3", "in the renamed folder", 5);
    dc.save_in(src, md, "Work", &body);
    same("after a delivery into the renamed folder");
    doveadm(&["mailbox", "delete", "Work"]);
    same("after a folder was deleted");
    dc.save_in(src, md, "Archive/2023", &message("mdbox-4", "deep down", 5));
    same("after a delivery into a nested folder");
    doveadm(&["mailbox", "unsubscribe", "Sent"]);
    same("after an unsubscribe alone");
    // A parent renamed: the watches below it moved with the directory and are set again.
    doveadm(&["mailbox", "rename", "Archive", "Old"]);
    same("after a parent folder was renamed");
    dc.save_in(
        src,
        md,
        "Old/2023",
        &message("mdbox-5", "below the renamed", 5),
    );
    same("after a delivery below the renamed parent");
}

/// Starts `mdsync watch EXTRA.. SRC DST` on a copy of the mdbox fixture, DST read as
/// `dst_layout`, and checks every kind of change Dovecot makes in it on DST. Among the
/// batches, one read one mailbox and copied one message: the watcher saw a delivery into
/// one mdbox mailbox (no periodic rescan comes within the test).
fn mirror_mdbox_source(dc: &Dovecot, extra: &[&str], (dst, dst_layout): (&Path, Layout)) -> Watch {
    let src = dc.mdbox_sample("src");
    let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    args.extend([src.display().to_string(), dst.display().to_string()]);
    let watch = Watch::start(&args, dc.path());
    watch.wait_for("batch", |e| e["full"] == true);
    let both = ((src.as_path(), Layout::Mdbox), (dst, dst_layout));
    wait_same(dc, both.0, both.1, &watch, "after the first run");
    mdbox_changes(dc, &src, (dst, dst_layout), &watch);
    let batches = watch.events_of("batch");
    assert!(
        batches
            .iter()
            .any(|b| b["full"] == false && b["mailboxes"] == 1 && b["copies"] == 1),
        "{}",
        watch.describe()
    );
    watch
}

#[test]
fn an_mdbox_source_is_mirrored_into_maildir_as_dovecot_changes_it() {
    let dc = Dovecot::new();
    let dst = dc.path().join("dst");
    let mut watch = mirror_mdbox_source(&dc, &[], (&dst, Layout::MaildirPlusPlus));
    assert_idle(&watch);
    watch.stops_cleanly();
}

#[test]
fn an_mdbox_source_is_mirrored_into_an_mdbox_copy_offline() {
    let dc = Dovecot::new();
    let dst = dc.mdbox_sample("dst");
    let mut watch = mirror_mdbox_source(&dc, &["--offline"], (&dst, Layout::Mdbox));
    assert_eq!(watch.terminate(), Some(0), "{}", watch.describe());
}

#[test]
fn two_way_watch_with_a_local_mdbox_b_merges_changes_from_both_sides() {
    let dc = Dovecot::new();
    let a = dc.maildir("a");
    let b = dc.mdbox_sample("b");
    let args: Vec<String> = [
        "--two-way",
        "--offline",
        &a.display().to_string(),
        &b.display().to_string(),
    ]
    .map(String::from)
    .into();
    let mut watch = Watch::start(&args, dc.path());
    watch.wait_for("batch", |e| e["full"] == true);
    let (maildir, md) = (Layout::MaildirPlusPlus, Layout::Mdbox);
    let same = |what: &str| wait_same(&dc, (&b, md), (&a, maildir), &watch, what);
    same("after the first run");
    let on_b = |args: &[&str]| {
        dc.doveadm_in(&b, md, args);
    };

    dc.save_in(&b, md, "INBOX", &message("b-1", "delivered into B", 10));
    same("after a delivery on B");
    on_b(&["flags", "add", "\\Flagged", "mailbox", "INBOX", "uid", "1"]);
    same("after a flag was added on B");
    on_b(&["expunge", "mailbox", "INBOX", "uid", "4"]);
    same("after an expunge on B");
    on_b(&["mailbox", "create", "-s", "Projects"]);
    dc.save_in(&b, md, "Projects", &message("b-2", "in a new folder", 5));
    same("after a folder was created on B");
    on_b(&["mailbox", "rename", "Projects", "Work"]);
    same("after a folder was renamed on B");
    let before_a = watch.events_of("batch").len();

    dc.save(&a, "INBOX", &message("a-1", "delivered into A", 10));
    same("after a delivery on A");
    dc.flags_remove(&a, "INBOX", "1", "\\Flagged");
    same("after a flag was removed on A");
    dc.expunge(&a, "INBOX", "3");
    same("after an expunge on A");
    dc.save(&a, "Work", &message("a-2", "into the renamed folder", 5));
    same("after a delivery into that folder on A");
    dc.delete_mailbox(&a, "Work");
    same("after a folder was deleted on A");
    // Changes on A reached B through batches of the dirty mailboxes, not full runs.
    let from_a = &watch.events_of("batch")[before_a..];
    for kind in ["copies", "flag_changes", "expunges"] {
        assert!(
            from_a.iter().any(|e| e["full"] == false && e[kind] == 1),
            "no batch with {kind}\n{}",
            watch.describe()
        );
    }
    // Dovecot still reads B whole after the writes (its indexes rebuilt from storage).
    on_b(&["force-resync", "*"]);
    same("after force-resync on B");
    assert_eq!(watch.terminate(), Some(0), "{}", watch.describe());
}
