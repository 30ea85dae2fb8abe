//! End-to-end remote runs: `mdsync backup` pushing to and pulling from `mdsync serve`, over
//! the in-process pipe transport and over a real sshd on 127.0.0.1, checked against
//! Dovecot's view of both sides, the inodes on disk and the bytes on the wire; a
//! forced-command key confined by `--root`; a connection killed mid-transfer; a far side
//! that never answers; a missing remote binary; a destination another run is writing.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::sshd::{Sshd, remote_wrapper};
use support::tree::{Run, inode_of, mail_files, run_mdsync};
use support::{Dovecot, message};

/// How the far side is reached.
#[derive(Clone, Copy, Debug)]
enum Via {
    Pipe,
    Ssh,
}

/// Which side is remote.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Direction {
    /// The destination is remote.
    Push,
    /// The source is remote.
    Pull,
}

/// The arguments of one backup run from `src` to `dst` over `via`.
struct Remote {
    sshd: Option<Sshd>,
    wrapper: PathBuf,
}

impl Remote {
    fn new(via: Via) -> Remote {
        let sshd = matches!(via, Via::Ssh).then(Sshd::start);
        let dir = sshd
            .as_ref()
            .map(|s| s.dir().to_path_buf())
            .unwrap_or_else(std::env::temp_dir);
        let wrapper = remote_wrapper(&dir);
        Remote { sshd, wrapper }
    }

    fn backup(&self, direction: Direction, src: &Path, dst: &Path, extra: &[&str]) -> Run {
        let (src, dst) = (src.display().to_string(), dst.display().to_string());
        let mut args: Vec<String> = vec!["backup".into(), "--json".into(), "--no-progress".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (src, dst) = match &self.sshd {
            None => {
                let side = if direction == Direction::Push {
                    "dst"
                } else {
                    "src"
                };
                args.extend(["--via-pipe".into(), side.into()]);
                (src, dst)
            }
            Some(sshd) => {
                args.extend(["-e".into(), sshd.rsh()]);
                args.extend(["--remote-mdsync".into(), self.wrapper.display().to_string()]);
                match direction {
                    Direction::Push => (src, format!("{}:{dst}", sshd.host())),
                    Direction::Pull => (format!("{}:{src}", sshd.host()), dst),
                }
            }
        };
        args.extend([src, dst]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_mdsync(&refs)
    }
}

fn assert_same_oracle(dc: &Dovecot, src: &Path, dst: &Path, when: &str) {
    let (want, got) = (dc.oracle(src), dc.oracle(dst));
    support::tree::assert_same_lines(&got, &want, &format!("{when}: Dovecot's view of DST"));
}

fn wire_sent(run: &Run) -> u64 {
    run.json()["wire_bytes_sent"]
        .as_u64()
        .expect("wire_bytes_sent")
}

fn wire_received(run: &Run) -> u64 {
    run.json()["wire_bytes_received"]
        .as_u64()
        .expect("wire_bytes_received")
}

/// The whole life of a backup over a transport: initial copy, a change of every kind made
/// by Dovecot, a no-change run; each checked against Dovecot and the disk.
fn scenario(via: Via, direction: Direction) {
    let dc = Dovecot::new();
    let remote = Remote::new(via);
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    let first = remote.backup(direction, &src, &dst, &[]);
    first.assert_ok();
    assert_eq!(first.count("messages_copied"), 25, "{}", first.describe());
    assert_same_oracle(&dc, &src, &dst, "after the first run");

    // Dovecot changes the source: a flag, an expunge, a new message, a new folder.
    let inbox_base = dc.fetch(&src, "INBOX", "uid guid")[0]["guid"].clone();
    let inode_before = inode_of(&dst, "", &inbox_base);
    dc.flags_add(&src, "INBOX", "1", "\\Flagged");
    dc.expunge(&src, "INBOX", "2");
    let new_message = message("remote-new", "over the wire", 400);
    dc.save(&src, "INBOX", &new_message);
    dc.create_mailbox(&src, "Remote/Made");
    let second = remote.backup(direction, &src, &dst, &[]);
    second.assert_ok();
    assert_same_oracle(&dc, &src, &dst, "after Dovecot changed the source");
    assert_eq!(second.count("messages_copied"), 1, "{}", second.describe());
    assert_eq!(second.count("flag_changes"), 1, "{}", second.describe());
    assert_eq!(second.count("expunged"), 1, "{}", second.describe());
    assert_eq!(
        inode_of(&dst, "", &inbox_base),
        inode_before,
        "a flag change must be a rename on DST, not a new copy"
    );
    // Only the new body crosses the wire (compressed), plus a little metadata.
    let body_direction = match direction {
        Direction::Push => wire_sent(&second),
        Direction::Pull => wire_received(&second),
    };
    assert!(
        body_direction < new_message.len() as u64 + 8192,
        "{body_direction} bytes carried bodies for one new message of {} bytes: {}",
        new_message.len(),
        second.describe()
    );

    let third = remote.backup(direction, &src, &dst, &[]);
    third.assert_ok().assert_no_work();
    assert_same_oracle(&dc, &src, &dst, "after a no-change run");
    // Dovecot keeps the UIDs once it has opened DST itself.
    dc.save(&dst, "INBOX", &message("after", "dovecot on dst", 3));
    let uids: Vec<String> = dc
        .fetch(&dst, "INBOX", "uid")
        .iter()
        .map(|r| r["uid"].clone())
        .collect();
    let src_uids: Vec<String> = dc
        .fetch(&src, "INBOX", "uid")
        .iter()
        .map(|r| r["uid"].clone())
        .collect();
    assert_eq!(&uids[..src_uids.len()], &src_uids[..]);
}

#[test]
fn push_over_the_pipe_transport() {
    scenario(Via::Pipe, Direction::Push);
}

#[test]
fn pull_over_the_pipe_transport() {
    scenario(Via::Pipe, Direction::Pull);
}

#[test]
fn push_over_ssh() {
    scenario(Via::Ssh, Direction::Push);
}

#[test]
fn pull_over_ssh() {
    scenario(Via::Ssh, Direction::Pull);
}

#[test]
fn a_forced_command_key_is_confined_to_its_root() {
    let dc = Dovecot::new();
    let remote = Remote::new(Via::Ssh);
    let sshd = remote.sshd.as_ref().unwrap();
    let served = dc.path().join("served");
    fs::create_dir_all(&served).unwrap();
    let forced = format!(
        "{} serve --root {}",
        remote.wrapper.display(),
        served.display()
    );
    let (_key, rsh) = sshd.authorize_forced_command(&forced);
    let src = dc.sample("src");
    let backup_to = |dst: &str| {
        run_mdsync(&[
            "backup",
            "--json",
            "--no-progress",
            "-e",
            &rsh,
            "--remote-mdsync",
            "whatever-the-client-asks",
            src.to_str().unwrap(),
            &format!("127.0.0.1:{dst}"),
        ])
    };
    backup_to("alice").assert_ok();
    assert_same_oracle(&dc, &src, &served.join("alice"), "inside the root");
    let outside = dc.path().join("outside");
    for dst in [
        outside.display().to_string(),
        "../outside".into(),
        "alice/../../outside".into(),
    ] {
        let run = backup_to(&dst);
        assert_eq!(run.code, Some(1), "{}", run.describe());
        assert!(
            run.stderr.contains("root") || run.stderr.contains(".."),
            "the refusal names the reason: {}",
            run.describe()
        );
        run.assert_no_panic();
    }
    assert!(!outside.exists(), "nothing may be written outside the root");
}

#[test]
fn a_transfer_killed_midway_is_finished_by_a_rerun() {
    let dc = Dovecot::new();
    let remote = Remote::new(Via::Ssh);
    let sshd = remote.sshd.as_ref().unwrap();
    let src = dc.path().join("corpus");
    support::corpus::write_corpus(&src, 600, 7);
    let dst = dc.path().join("dst");
    // Slow enough (about 10 s) to be killed in the middle.
    for victim in ["client", "connection"] {
        let mut child = support::mdsync()
            .args([
                "backup",
                "--no-progress",
                "--no-compress",
                "--bwlimit",
                "300K",
            ])
            .args(["-e", &sshd.rsh(), "--remote-mdsync"])
            .arg(&remote.wrapper)
            .arg(&src)
            .arg(format!("127.0.0.1:{}", dst.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        match victim {
            // The client dies: the far side sees its stdin close.
            "client" => child.kill().unwrap(),
            // The ssh connection dies under the client.
            _ => kill_children(child.id()),
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "{victim}: the run cannot have finished"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        if victim == "connection" {
            assert!(
                stderr.contains("127.0.0.1"),
                "the error names the remote: {stderr}"
            );
        }
        assert_no_half_written_files(&dst);
    }
    let rerun = remote.backup(Direction::Push, &src, &dst, &[]);
    rerun.assert_ok();
    assert_same_oracle(&dc, &src, &dst, "after kills and a re-run");
    assert_no_half_written_files(&dst);
    remote
        .backup(Direction::Push, &src, &dst, &[])
        .assert_ok()
        .assert_no_work();
}

/// SIGKILLs every child process of `pid` (the ssh client of a run).
fn kill_children(pid: u32) {
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let pids: Vec<i32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(!pids.is_empty(), "the run has no ssh child to kill");
    for child in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Nothing but complete messages where Dovecot looks: every file in `cur/` and `new/` has
/// the size its `,S=` names.
fn assert_no_half_written_files(root: &Path) {
    for file in mail_files(root) {
        let name = file.path.file_name().unwrap().to_str().unwrap().to_string();
        let Some(size) = name
            .split(',')
            .find_map(|part| part.strip_prefix("S="))
            .and_then(|s| s.split([':', ',']).next())
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let real = fs::metadata(&file.path).unwrap().len();
        assert_eq!(real, size, "half-written file {}", file.path.display());
    }
}

#[test]
fn a_far_side_that_never_answers_times_out() {
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let started = Instant::now();
    // A "remote shell" that connects nowhere and stays silent.
    let run = run_mdsync(&[
        "backup",
        "--no-progress",
        "--timeout",
        "2",
        "-e",
        "sh -c 'sleep 60' --",
        src.to_str().unwrap(),
        "somehost:/srv/mail",
    ]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(run.stderr.contains("--timeout"), "{}", run.describe());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the run must not hang"
    );
}

#[test]
fn a_missing_remote_binary_or_source_is_a_clear_error() {
    let dc = Dovecot::new();
    let remote = Remote::new(Via::Ssh);
    let sshd = remote.sshd.as_ref().unwrap();
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    let run = run_mdsync(&[
        "backup",
        "--no-progress",
        "-e",
        &sshd.rsh(),
        "--remote-mdsync",
        "/nonexistent/mdsync",
        src.to_str().unwrap(),
        &format!("127.0.0.1:{}", dst.display()),
    ]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(run.stderr.contains("remote-mdsync"), "{}", run.describe());
    assert!(!dst.exists());
    // A remote source that does not exist is an error, not an empty mailbox to mirror.
    let missing = dc.path().join("no-such-tree");
    let run = run_mdsync(&[
        "backup",
        "--no-progress",
        "-e",
        &sshd.rsh(),
        "--remote-mdsync",
        remote.wrapper.to_str().unwrap(),
        &format!("127.0.0.1:{}", missing.display()),
        dst.to_str().unwrap(),
    ]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(run.stderr.contains("not a directory"), "{}", run.describe());
    assert!(!dst.exists() && !missing.exists());
}

#[test]
fn bwlimit_bounds_the_sending_rate() {
    let dc = Dovecot::new();
    let remote = Remote::new(Via::Pipe);
    let src = dc.path().join("corpus");
    support::corpus::write_corpus(&src, 120, 3);
    let total: u64 = mail_files(&src)
        .iter()
        .map(|f| fs::metadata(&f.path).unwrap().len())
        .sum();
    let dst = dc.path().join("dst");
    let started = Instant::now();
    let run = remote.backup(
        Direction::Push,
        &src,
        &dst,
        &["--no-compress", "--bwlimit", "400K"],
    );
    run.assert_ok();
    let seconds = started.elapsed().as_secs_f64();
    let rate = wire_sent(&run) as f64 / seconds;
    assert!(wire_sent(&run) >= total, "uncompressed bodies all crossed");
    assert!(
        rate < 400.0 * 1024.0 * 1.25,
        "{rate:.0} B/s exceeds --bwlimit 400K ({} bytes in {seconds:.1} s)",
        wire_sent(&run)
    );
}

/// A far side that cannot write one mailbox still reads every body off the stream (the
/// applier stages from a spool that fills meanwhile): the others land, the run ends with
/// the path named, nothing is written through the link, and a re-run finishes the job.
#[test]
fn a_mailbox_the_far_side_cannot_write_fails_alone_and_a_rerun_finishes() {
    let dc = Dovecot::new();
    let remote = Remote::new(Via::Pipe);
    let src = dc.sample("src");
    let dst = dc.path().join("dst");
    remote.backup(Direction::Push, &src, &dst, &[]).assert_ok();
    for (mailbox, tag) in [("INBOX", "inbox"), ("Sent", "sent"), ("Archive", "archive")] {
        dc.save(&src, mailbox, &message(tag, "while a tmp/ is a link", 2000));
    }
    // The Sent folder's tmp/ on the destination is a link out of the tree.
    let outside = dc.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let tmp = dst.join(".Sent/tmp");
    fs::rename(&tmp, dst.join(".Sent/tmp.aside")).unwrap();
    std::os::unix::fs::symlink(&outside, &tmp).unwrap();
    let run = remote.backup(Direction::Push, &src, &dst, &[]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains(".Sent"),
        "names the mailbox: {}",
        run.describe()
    );
    run.assert_no_panic();
    assert_eq!(run.count("messages_copied"), 2, "{}", run.describe());
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "written through the link"
    );
    for mailbox in ["INBOX", "Archive"] {
        assert_eq!(
            dc.fetch(&dst, mailbox, "guid").len(),
            dc.fetch(&src, mailbox, "guid").len(),
            "{mailbox} got its new message"
        );
    }
    fs::remove_file(&tmp).unwrap();
    fs::rename(dst.join(".Sent/tmp.aside"), &tmp).unwrap();
    let rerun = remote.backup(Direction::Push, &src, &dst, &[]);
    rerun.assert_ok();
    assert_eq!(rerun.count("messages_copied"), 1, "{}", rerun.describe());
    assert_same_oracle(&dc, &src, &dst, "after the re-run");
}

/// `--compress-level` sets what the far side sends too: a pull is compressed as asked.
#[test]
fn a_pull_is_compressed_at_the_level_asked() {
    let dc = Dovecot::new();
    let remote = Remote::new(Via::Pipe);
    let src = dc.path().join("corpus");
    support::corpus::write_corpus(&src, 120, 3);
    let received_at = |level: &str| {
        let dst = dc.path().join(format!("dst-{level}"));
        // Without the cache, both runs receive whole tables: only the level differs.
        let args = ["--no-cache", "--compress-level", level];
        let run = remote.backup(Direction::Pull, &src, &dst, &args);
        run.assert_ok();
        wire_received(&run)
    };
    let (fast, tight) = (received_at("1"), received_at("19"));
    // At one level for both, they differ by a few bytes of paths; 1 and 19 by over 10%.
    assert!(
        tight * 20 < fast * 19,
        "level 19 should send at least 5% fewer bytes than level 1 ({tight} against {fast})"
    );
}

#[test]
fn table_deltas_keep_the_wire_quiet() {
    let dc = Dovecot::new();
    let remote = Remote::new(Via::Pipe);
    let src = dc.path().join("corpus");
    support::corpus::write_corpus(&src, 600, 11);
    let dst = dc.path().join("dst");
    remote.backup(Direction::Push, &src, &dst, &[]).assert_ok();
    // A flag change by hand in INBOX: the destination's INBOX table must travel. Its
    // baseline is what both sides predicted after the initial copy.
    let flag_one = |round: usize| {
        let file = mail_files(&src)
            .into_iter()
            .filter(|f| f.mailbox == Path::new("") && f.path.to_str().unwrap().contains(":2,"))
            .nth(round)
            .unwrap();
        let renamed = file.path.to_str().unwrap().to_string() + "F";
        fs::rename(&file.path, renamed).unwrap();
    };
    flag_one(0);
    // Without the cache no baseline is used: the whole table travels.
    let whole = remote.backup(Direction::Push, &src, &dst, &["--no-cache"]);
    whole.assert_ok();
    flag_one(1);
    let delta = remote.backup(Direction::Push, &src, &dst, &[]);
    delta.assert_ok();
    assert_eq!(delta.count("flag_changes"), 1, "{}", delta.describe());
    assert!(
        wire_received(&delta) * 4 < wire_received(&whole),
        "the second table went as a delta: {} bytes, against {} for the whole table",
        wire_received(&delta),
        wire_received(&whole)
    );
    assert!(
        wire_received(&delta) < 4096,
        "{} bytes received for one flag change",
        wire_received(&delta)
    );
    assert_same_oracle(&dc, &src, &dst, "after deltas");
}

#[test]
fn a_far_side_failure_ends_the_run_with_its_message() {
    let dc = Dovecot::new();
    let remote = Remote::new(Via::Pipe);
    let src = dc.sample("src");
    // The destination is a regular file: the far side cannot apply anything there.
    let dst = dc.path().join("not-a-dir");
    fs::write(&dst, b"x").unwrap();
    let run = remote.backup(Direction::Push, &src, &dst, &[]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains("not-a-dir"),
        "the error names the path: {}",
        run.describe()
    );
    run.assert_no_panic();
    assert_eq!(fs::read(&dst).unwrap(), b"x");
}

/// A destination another mdsync run writes, on this host, through the pipe transport and
/// over ssh: the run waits `--lock-wait`, then stops naming the tree and the holder, having
/// written nothing; a dry run does not wait; once the holder is gone the run goes through.
#[test]
fn a_tree_another_run_writes_is_waited_for_then_left_alone() {
    use mdsync::runlock::RunLock;
    let dc = Dovecot::new();
    let src = dc.sample("src");
    let local_locks = support::cache_home().join("mdsync");
    for via in [None, Some(Via::Pipe), Some(Via::Ssh)] {
        let dst = dc.path().join(format!("dst-{via:?}"));
        let lock_dir = match via {
            Some(Via::Ssh) => support::cache_home().join("remote").join("mdsync"),
            _ => local_locks.clone(),
        };
        let remote = via.map(Remote::new);
        let backup = |extra: &[&str]| match &remote {
            Some(remote) => remote.backup(Direction::Push, &src, &dst, extra),
            None => {
                let mut args = vec!["backup", "--json", "--no-progress"];
                args.extend_from_slice(extra);
                let (s, d) = (src.display().to_string(), dst.display().to_string());
                run_mdsync(&[&args[..], &[s.as_str(), d.as_str()]].concat())
            }
        };
        let held = RunLock::acquire(&lock_dir, &dst, Duration::ZERO).unwrap();
        let started = Instant::now();
        let refused = backup(&["--lock-wait", "1"]);
        assert_eq!(refused.code, Some(1), "{via:?}: {}", refused.describe());
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{via:?}: it waited"
        );
        let holder = format!("another mdsync run (pid {})", std::process::id());
        for part in [dst.display().to_string(), holder] {
            assert!(
                refused.stderr.contains(&part),
                "{via:?}: the error names {part}: {}",
                refused.describe()
            );
        }
        refused.assert_no_panic();
        assert!(!dst.exists(), "{via:?}: nothing was written");
        backup(&["--dry-run", "--lock-wait", "0"]).assert_ok();
        drop(held);
        backup(&["--lock-wait", "0"]).assert_ok();
        assert_same_oracle(
            &dc,
            &src,
            &dst,
            &format!("{via:?}: once the other run ended"),
        );
    }
}

#[test]
fn a_slow_transfer_is_not_a_timeout() {
    // The far side sends keepalives while it works, so --timeout measures silence, not
    // the length of a transfer: about 6 s of bodies at 300 KiB/s under a 2 s timeout.
    let dc = Dovecot::new();
    let remote = Remote::new(Via::Ssh);
    let src = dc.path().join("corpus");
    support::corpus::write_corpus(&src, 120, 3);
    let dst = dc.path().join("dst");
    let started = Instant::now();
    let run = remote.backup(
        Direction::Push,
        &src,
        &dst,
        &["--no-compress", "--bwlimit", "300K", "--timeout", "2"],
    );
    run.assert_ok();
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "the transfer was meant to outlast the timeout"
    );
    assert_same_oracle(&dc, &src, &dst, "after a slow transfer");
}

#[test]
fn the_far_side_caches_its_scan_except_the_mailboxes_the_plan_wrote() {
    use mdsync::scan::cache::{ScanCache, take_stamps};
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, cache) = (
        dir.path().join("src"),
        dir.path().join("dst"),
        dir.path().join("cache"),
    );
    support::corpus::write_corpus(&src, 60, 5);
    let remote = Remote::new(Via::Pipe);
    let cache_arg = ["--cache-dir", cache.to_str().unwrap()];
    remote
        .backup(Direction::Push, &src, &dst, &cache_arg)
        .assert_ok();
    // Old enough to cache, then one flag change in INBOX only.
    std::thread::sleep(Duration::from_millis(2100));
    let file = mail_files(&src)
        .into_iter()
        .find(|f| f.mailbox == Path::new("") && f.path.to_str().unwrap().contains(":2,"))
        .unwrap();
    fs::rename(&file.path, file.path.to_str().unwrap().to_string() + "F").unwrap();
    let (inbox_before, sent_before) = (take_stamps(&dst), take_stamps(&dst.join(".Sent")));
    let run = remote.backup(Direction::Push, &src, &dst, &cache_arg);
    run.assert_ok();
    assert_eq!(run.count("flag_changes"), 1, "{}", run.describe());
    // The server kept its own scan (the client keeps none for a remote side): the
    // mailbox the plan left alone, not the one it wrote.
    let served = ScanCache::for_root(&cache, &dst);
    assert_eq!(take_stamps(&dst.join(".Sent")), sent_before);
    assert!(
        served.take(".Sent", &sent_before).is_some(),
        "an untouched mailbox of the far side is cached"
    );
    assert_ne!(take_stamps(&dst), inbox_before);
    assert!(
        served.take("", &inbox_before).is_none(),
        "the far side's INBOX, read before the plan changed it, must not be cached"
    );
}
