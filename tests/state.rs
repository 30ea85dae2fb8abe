//! The pair state end to end: after a run that finds a mailbox in sync (with stamps older
//! than the racy window), the next run does not read it on either side; a change on either
//! side makes that one mailbox be read and synced again.

use std::fs;
use std::path::Path;
use std::time::Duration;

use mdsync::progress::NoProgress;
use mdsync::replica::local::LocalReplica;
use mdsync::scan::ScanOptions;
use mdsync::storage::maildir::writer::{FsyncPolicy, Ownership};
use mdsync::sync::apply::ApplyOptions;
use mdsync::sync::backup::{BackupOptions, BackupOutcome, DeleteLimit, backup};
use mdsync::sync::diff::DiffOptions;

fn make_mailbox(path: &Path, validity: u32, names: &[&str]) {
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(path.join(sub)).unwrap();
    }
    let mut uidlist = format!("3 V{validity} N{} G{validity:032x}\n", names.len() + 1);
    for (i, name) in names.iter().enumerate() {
        let base = name.split(':').next().unwrap();
        uidlist.push_str(&format!("{} :{base}\n", i + 1));
        fs::write(path.join("cur").join(name), format!("body of {base}")).unwrap();
    }
    fs::write(path.join("dovecot-uidlist"), uidlist).unwrap();
}

fn run(src: &Path, dst: &Path, cache: &Path) -> BackupOutcome {
    let options = BackupOptions {
        scan: ScanOptions {
            cache_dir: Some(cache.to_path_buf()),
            ..ScanOptions::default()
        },
        diff: DiffOptions::default(),
        apply: ApplyOptions {
            fsync: FsyncPolicy::None,
            ownership: Ownership::RunningUser,
            read_ahead: 64 << 20,
        },
        dry_run: false,
        max_delete: DeleteLimit::Percent(100),
        state_dir: Some(cache.to_path_buf()),
    };
    backup(
        &LocalReplica::new(src),
        &LocalReplica::new(dst),
        &options,
        &NoProgress,
    )
    .unwrap()
}

fn settle() {
    std::thread::sleep(Duration::from_millis(2100));
}

#[test]
fn unchanged_mailboxes_are_skipped_and_changes_on_either_side_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, cache) = (
        dir.path().join("src"),
        dir.path().join("dst"),
        dir.path().join("cache"),
    );
    make_mailbox(&src, 10, &["a,S=10:2,S", "b,S=10:2,"]);
    make_mailbox(&src.join(".Sent"), 11, &["c,S=10:2,S"]);
    fs::write(src.join(".Sent/maildirfolder"), "").unwrap();

    assert_eq!(run(&src, &dst, &cache).report.messages_copied, 3);
    settle();
    let second = run(&src, &dst, &cache);
    assert_eq!(second.planned, Default::default());
    assert_eq!(
        second.unchanged_mailboxes, 0,
        "first in-sync run still reads everything"
    );
    let third = run(&src, &dst, &cache);
    assert_eq!(third.unchanged_mailboxes, 2, "both mailboxes skipped");
    assert_eq!(third.source_messages, 3);

    // A flag change on the source: only INBOX is read, and the change arrives.
    fs::rename(src.join("cur/b,S=10:2,"), src.join("cur/b,S=10:2,RS")).unwrap();
    let fourth = run(&src, &dst, &cache);
    assert_eq!(fourth.report.flag_changes, 1);
    assert_eq!(fourth.unchanged_mailboxes, 1);
    assert!(dst.join("cur/b,S=10:2,RS").exists());

    // Damage on the destination only: caught although the source did not change.
    settle();
    run(&src, &dst, &cache);
    fs::remove_file(dst.join(".Sent/cur/c,S=10:2,S")).unwrap();
    let repaired = run(&src, &dst, &cache);
    assert_eq!(repaired.report.messages_copied, 1);
    assert!(dst.join(".Sent/cur/c,S=10:2,S").exists());
}

#[test]
fn the_scan_cache_keeps_sources_and_untouched_destinations_only() {
    use mdsync::scan::cache::{ScanCache, take_stamps};
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, cache) = (
        dir.path().join("src"),
        dir.path().join("dst"),
        dir.path().join("cache"),
    );
    make_mailbox(&src, 10, &["a,S=10:2,S", "b,S=10:2,"]);
    make_mailbox(&src.join(".Sent"), 11, &["c,S=10:2,S"]);
    fs::write(src.join(".Sent/maildirfolder"), "").unwrap();
    run(&src, &dst, &cache);
    fs::rename(src.join("cur/b,S=10:2,"), src.join("cur/b,S=10:2,RS")).unwrap();
    settle();

    // Both trees are old enough to cache; this run renames a file in DST's INBOX only.
    let dst_inbox_before = take_stamps(&dst);
    let dst_sent_before = take_stamps(&dst.join(".Sent"));
    assert_eq!(run(&src, &dst, &cache).report.flag_changes, 1);
    let (src_cache, dst_cache) = (
        ScanCache::for_root(&cache, &src),
        ScanCache::for_root(&cache, &dst),
    );
    assert!(src_cache.take("", &take_stamps(&src)).is_some());
    assert!(
        src_cache
            .take(".Sent", &take_stamps(&src.join(".Sent")))
            .is_some()
    );
    assert!(
        dst_cache.take(".Sent", &dst_sent_before).is_some(),
        "an untouched destination mailbox is cached"
    );
    assert_eq!(take_stamps(&dst.join(".Sent")), dst_sent_before);
    assert!(
        dst_cache.take("", &dst_inbox_before).is_none(),
        "the table read before the run changed INBOX must not be cached"
    );
    assert_ne!(take_stamps(&dst), dst_inbox_before);
}
