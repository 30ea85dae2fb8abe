//! Races with a live Dovecot, staged deterministically through a wrapper replica: a message
//! renamed while the source was listed must not be expunged on the destination, and a
//! message expunged between scan and copy is skipped with a "re-run" completion.

use std::fs;
use std::path::Path;
use std::sync::Mutex;

use mdsync::model::Subdir;
use mdsync::progress::{NoProgress, Progress};
use mdsync::replica::local::LocalReplica;
use mdsync::replica::mdbox::MdboxReplica;
use mdsync::replica::{Body, BodyError, BodySource, Replica};
use mdsync::scan::ScanOptions;
use mdsync::storage::maildir::layout::Layout;
use mdsync::storage::maildir::writer::{FsyncPolicy, Ownership};
use mdsync::sync::apply::{ApplyOptions, ApplyReport};
use mdsync::sync::backup::{BackupOptions, Completion, DeleteLimit, backup};
use mdsync::sync::diff::DiffOptions;
use mdsync::sync::plan::Plan;
use mdsync::table::{MailTable, MailboxTable};

/// What the wrapper does to the source right after its first full scan.
enum Trick {
    /// Nothing: the wrapper only counts second looks.
    Plain,
    /// Pretend `readdir` missed this file (Dovecot renamed it meanwhile).
    HideFromFirstScan(&'static str),
    /// Delete this file after the scan (Dovecot expunged it before we copied it).
    DeleteAfterScan(&'static str),
    /// Rename the folder at `path.0` (below the root) to `path.1` after the folder list
    /// was taken and before it was read (a user renamed it in their mail client
    /// meanwhile); `dir` are the two names as the table has them.
    RenameFolderWhileRead {
        path: (&'static str, &'static str),
        dir: (&'static str, &'static str),
    },
}

/// A replica on a local tree, Maildir or mdbox, that the tricks can reach on disk.
trait Rooted: Replica {
    fn root(&self) -> &Path;
}

impl Rooted for LocalReplica {
    fn root(&self) -> &Path {
        LocalReplica::root(self)
    }
}

impl Rooted for MdboxReplica {
    fn root(&self) -> &Path {
        MdboxReplica::root(self)
    }
}

struct Tricky<R> {
    inner: R,
    trick: Trick,
    rescans: Mutex<u32>,
}

impl<R: Rooted> BodySource for Tricky<R> {
    fn open_body(&self, dir: &str, sub: Subdir, name: &str) -> Result<Body<'_>, BodyError> {
        self.inner.open_body(dir, sub, name)
    }
}

impl<R: Rooted> Replica for Tricky<R> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn detect_layout(&self) -> mdsync::Result<Option<Layout>> {
        self.inner.detect_layout()
    }

    fn scan(&self, options: &ScanOptions, progress: &dyn Progress) -> mdsync::Result<MailTable> {
        match self.trick {
            Trick::Plain => self.inner.scan(options, progress),
            Trick::HideFromFirstScan(name) => {
                let path = self.inner.root().join("cur").join(name);
                let aside = self.inner.root().join("aside");
                fs::rename(&path, &aside).unwrap();
                let table = self.inner.scan(options, progress);
                fs::rename(&aside, &path).unwrap();
                table
            }
            Trick::DeleteAfterScan(name) => {
                let table = self.inner.scan(options, progress);
                fs::remove_file(self.inner.root().join("cur").join(name)).unwrap();
                table
            }
            Trick::RenameFolderWhileRead { path, dir } => {
                let root = self.inner.root();
                fs::rename(root.join(path.0), root.join(path.1)).unwrap();
                let mut table = self.inner.scan(options, progress)?;
                // What a scan that listed the folders before the rename read.
                let listed_before = self.inner.rescan_mailbox(table.layout, dir.0);
                table.mailboxes.retain(|m| m.dir != dir.1);
                table.mailboxes.push(listed_before);
                table.mailboxes.sort_by(|a, b| a.dir.cmp(&b.dir));
                Ok(table)
            }
        }
    }

    fn rescan_mailbox(&self, layout: Layout, dir: &str) -> MailboxTable {
        *self.rescans.lock().unwrap() += 1;
        self.inner.rescan_mailbox(layout, dir)
    }

    fn content_hash(&self, dir: &str, sub: Subdir, name: &str) -> Result<u128, BodyError> {
        self.inner.content_hash(dir, sub, name)
    }

    fn apply(
        &self,
        plan: &Plan,
        source: &dyn BodySource,
        options: &ApplyOptions,
        progress: &dyn Progress,
    ) -> mdsync::Result<ApplyReport> {
        self.inner.apply(plan, source, options, progress)
    }
}

fn options() -> BackupOptions {
    BackupOptions {
        scan: ScanOptions::default(),
        diff: DiffOptions::default(),
        apply: ApplyOptions {
            fsync: FsyncPolicy::None,
            ownership: Ownership::RunningUser,
            read_ahead: 64 << 20,
        },
        dry_run: false,
        max_delete: DeleteLimit::Percent(100),
        state_dir: None,
    }
}

fn make_source(root: &Path) {
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(root.join(sub)).unwrap();
    }
    fs::write(
        root.join("dovecot-uidlist"),
        "3 V5 N3 G0000000000000000000000000000000a\n1 :a,S=1\n2 :b,S=1\n",
    )
    .unwrap();
    fs::write(root.join("cur/a,S=1:2,S"), "a").unwrap();
    fs::write(root.join("cur/b,S=1:2,S"), "b").unwrap();
}

/// Backs up `src` to `dst` through a replica whose first scan misses `name` in `cur/`, and
/// asserts the mailbox was listed again and the destination copy kept.
fn assert_missed_file_is_confirmed(src: &Path, dst: &Path, name: &'static str) {
    let tricky = Tricky {
        inner: LocalReplica::new(src),
        trick: Trick::HideFromFirstScan(name),
        rescans: Mutex::new(0),
    };
    let outcome = backup(&tricky, &LocalReplica::new(dst), &options(), &NoProgress).unwrap();
    let rescans = *tricky.rescans.lock().unwrap();
    assert_eq!(rescans, 1, "the mailbox is listed again");
    assert_eq!(
        outcome.planned.expunges, 0,
        "a phantom expunge reached the plan"
    );
    assert!(dst.join("cur").join(name).exists());
}

#[test]
fn message_missed_by_readdir_is_confirmed_not_expunged() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src);
    let plain = LocalReplica::new(&src);
    let target = LocalReplica::new(&dst);
    backup(&plain, &target, &options(), &NoProgress).unwrap();
    assert!(dst.join("cur/b,S=1:2,S").exists());

    assert_missed_file_is_confirmed(&src, &dst, "b,S=1:2,S");
}

#[test]
fn really_expunged_message_is_expunged_after_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src);
    let (s, d) = (LocalReplica::new(&src), LocalReplica::new(&dst));
    backup(&s, &d, &options(), &NoProgress).unwrap();
    fs::remove_file(src.join("cur/b,S=1:2,S")).unwrap();
    let outcome = backup(&s, &d, &options(), &NoProgress).unwrap();
    assert_eq!(outcome.report.expunged, 1);
    assert!(!dst.join("cur/b,S=1:2,S").exists());
}

#[test]
fn message_expunged_before_copy_is_skipped_and_rerun_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src);
    let tricky = Tricky {
        inner: LocalReplica::new(&src),
        trick: Trick::DeleteAfterScan("b,S=1:2,S"),
        rescans: Mutex::new(0),
    };
    let outcome = backup(&tricky, &LocalReplica::new(&dst), &options(), &NoProgress).unwrap();
    assert_eq!(outcome.report.vanished, 1);
    assert_eq!(outcome.completion(), Completion::Partial);
    assert!(dst.join("cur/a,S=1:2,S").exists());
    let leftovers: Vec<_> = fs::read_dir(dst.join("tmp")).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "nothing staged may linger: {leftovers:?}"
    );
}

/// A folder renamed while the source was read is left alone for the run, never read as an
/// empty folder whose copy would be emptied; the run is partial (exit 2) and the next run
/// renames the copy.
#[test]
fn a_folder_renamed_while_read_is_left_alone_and_the_next_run_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src);
    make_source(&src.join(".Work"));
    fs::write(src.join(".Work/maildirfolder"), "").unwrap();
    let (s, d) = (LocalReplica::new(&src), LocalReplica::new(&dst));
    backup(&s, &d, &options(), &NoProgress).unwrap();
    assert!(dst.join(".Work/cur/a,S=1:2,S").exists());

    let tricky = Tricky {
        inner: LocalReplica::new(&src),
        trick: Trick::RenameFolderWhileRead {
            path: (".Work", ".Moved"),
            dir: (".Work", ".Moved"),
        },
        rescans: Mutex::new(0),
    };
    let outcome = backup(&tricky, &d, &options(), &NoProgress).unwrap();
    assert_eq!(outcome.completion(), Completion::Partial, "{outcome:?}");
    assert_eq!(outcome.skipped.len(), 1, "{:?}", outcome.skipped);
    assert!(outcome.skipped[0].changed && outcome.skipped[0].why.contains(".Work"));
    assert_eq!(outcome.planned.expunges, 0, "the copy was emptied");
    assert!(dst.join(".Work/cur/a,S=1:2,S").exists());
    assert!(dst.join(".Work/cur/b,S=1:2,S").exists());

    let outcome = backup(&s, &d, &options(), &NoProgress).unwrap();
    assert_eq!(outcome.completion(), Completion::Complete, "{outcome:?}");
    assert!(dst.join(".Moved/cur/a,S=1:2,S").exists());
    assert!(!dst.join(".Work").exists());
}

#[test]
fn message_renamed_before_copy_is_found_under_its_new_name() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src);
    struct Renamer(LocalReplica);
    impl BodySource for Renamer {
        fn open_body(&self, dir: &str, sub: Subdir, name: &str) -> Result<Body<'_>, BodyError> {
            let old = self.0.root().join("cur").join(name);
            if old.exists() && name.starts_with('b') {
                fs::rename(&old, self.0.root().join("cur/b,S=1:2,RS")).unwrap();
            }
            self.0.open_body(dir, sub, name)
        }
    }
    let renamer = Renamer(LocalReplica::new(&src));
    let plan = {
        let s = LocalReplica::new(&src);
        let d = LocalReplica::new(&dst);
        let opts = BackupOptions {
            dry_run: true,
            ..options()
        };
        backup(&s, &d, &opts, &NoProgress).unwrap();
        let st = s.scan(&ScanOptions::default(), &NoProgress).unwrap();
        let dt = d.scan(&ScanOptions::default(), &NoProgress).unwrap();
        mdsync::sync::diff::diff_backup(&st, &dt, &Default::default(), &DiffOptions::default())
    };
    let report = LocalReplica::new(&dst)
        .apply(&plan, &renamer, &options().apply, &NoProgress)
        .unwrap();
    assert_eq!(report.messages_copied, 2);
    assert_eq!(fs::read_to_string(dst.join("cur/b,S=1:2,S")).unwrap(), "b");
}

#[test]
fn a_copy_that_fails_keeps_the_file_it_was_to_replace() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src);
    backup(
        &LocalReplica::new(&src),
        &LocalReplica::new(&dst),
        &options(),
        &NoProgress,
    )
    .unwrap();
    // UID 2 now names another message on the source: the destination's must be replaced.
    fs::remove_file(src.join("cur/b,S=1:2,S")).unwrap();
    fs::write(src.join("cur/c,S=1:2,S"), "c").unwrap();
    fs::write(
        src.join("dovecot-uidlist"),
        "3 V5 N3 G0000000000000000000000000000000a\n1 :a,S=1\n2 :c,S=1\n",
    )
    .unwrap();
    struct Failing(LocalReplica);
    impl BodySource for Failing {
        fn open_body(&self, dir: &str, sub: Subdir, name: &str) -> Result<Body<'_>, BodyError> {
            if name.starts_with('c') {
                return Err(BodyError::Failed(format!("{name}: simulated I/O error")));
            }
            self.0.open_body(dir, sub, name)
        }
    }
    let st = LocalReplica::new(&src)
        .scan(&ScanOptions::default(), &NoProgress)
        .unwrap();
    let dt = LocalReplica::new(&dst)
        .scan(&ScanOptions::default(), &NoProgress)
        .unwrap();
    let plan =
        mdsync::sync::diff::diff_backup(&st, &dt, &Default::default(), &DiffOptions::default());
    assert_eq!(plan.counts().expunges, 1, "the plan replaces uid 2");
    let report = LocalReplica::new(&dst)
        .apply(
            &plan,
            &Failing(LocalReplica::new(&src)),
            &options().apply,
            &NoProgress,
        )
        .unwrap();
    assert_eq!(report.errors.len(), 1);
    assert!(
        dst.join("cur/b,S=1:2,S").exists(),
        "the old copy was dropped"
    );
    let uidlist = fs::read_to_string(dst.join("dovecot-uidlist")).unwrap();
    assert!(uidlist.contains("2 :b,S=1"), "{uidlist}");
}

#[test]
fn a_settled_mailbox_is_not_listed_twice_for_a_lingering_record() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src);
    backup(
        &LocalReplica::new(&src),
        &LocalReplica::new(&dst),
        &options(),
        &NoProgress,
    )
    .unwrap();
    // Dovecot expunged b long ago; its uidlist record lingers until the next rewrite.
    fs::remove_file(src.join("cur/b,S=1:2,S")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let counting = Tricky {
        inner: LocalReplica::new(&src),
        trick: Trick::Plain,
        rescans: Mutex::new(0),
    };
    let outcome = backup(&counting, &LocalReplica::new(&dst), &options(), &NoProgress).unwrap();
    assert_eq!(outcome.report.expunged, 1);
    assert_eq!(
        *counting.rescans.lock().unwrap(),
        0,
        "stamps did not move: no second look"
    );
}

#[test]
fn unnumbered_message_missed_by_readdir_is_confirmed_not_expunged() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src);
    fs::write(src.join("cur/u,S=1:2,"), "u").unwrap(); // delivered, not yet numbered
    backup(
        &LocalReplica::new(&src),
        &LocalReplica::new(&dst),
        &options(),
        &NoProgress,
    )
    .unwrap();
    assert!(dst.join("cur/u,S=1:2,").exists());
    assert_missed_file_is_confirmed(&src, &dst, "u,S=1:2,");
}

#[test]
fn a_destination_laid_out_differently_is_refused_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src);
    fs::create_dir_all(src.join(".Sent/cur")).unwrap();
    fs::create_dir_all(dst.join("Work/cur")).unwrap();
    fs::write(dst.join("Work/cur/w,S=1:2,S"), "w").unwrap();
    let result = backup(
        &LocalReplica::new(&src),
        &LocalReplica::new(&dst),
        &options(),
        &NoProgress,
    );
    let err = result.expect_err("layouts disagree");
    assert!(err.to_string().contains("--layout"), "{err}");
    assert!(dst.join("Work/cur/w,S=1:2,S").exists());
}

/// The same for an mdbox source (Dovecot's fixture tree): the folder renamed while read is
/// left alone on the Maildir copy, the run is partial, and the next run renames the copy.
#[test]
fn an_mdbox_folder_renamed_while_read_is_left_alone_and_the_next_run_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/mdbox/live");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&fixture)
        .arg(&src)
        .status()
        .unwrap();
    assert!(copied.success());
    let d = LocalReplica::new(&dst);
    backup(&MdboxReplica::new(&src), &d, &options(), &NoProgress).unwrap();
    let sent_files = || fs::read_dir(dst.join(".Sent/cur")).unwrap().count();
    assert_eq!(sent_files(), 1);

    let tricky = Tricky {
        inner: MdboxReplica::new(&src),
        trick: Trick::RenameFolderWhileRead {
            path: ("mailboxes/Sent", "mailboxes/Sent2"),
            dir: (".Sent", ".Sent2"),
        },
        rescans: Mutex::new(0),
    };
    let outcome = backup(&tricky, &d, &options(), &NoProgress).unwrap();
    assert_eq!(outcome.completion(), Completion::Partial, "{outcome:?}");
    assert_eq!(outcome.skipped.len(), 1, "{:?}", outcome.skipped);
    assert!(outcome.skipped[0].changed, "{:?}", outcome.skipped);
    assert_eq!(outcome.planned.expunges, 0, "the copy was emptied");
    assert_eq!(outcome.planned.mailboxes_deleted, 0);
    assert_eq!(sent_files(), 1);

    let outcome = backup(&MdboxReplica::new(&src), &d, &options(), &NoProgress).unwrap();
    assert_eq!(outcome.completion(), Completion::Complete, "{outcome:?}");
    assert_eq!(fs::read_dir(dst.join(".Sent2/cur")).unwrap().count(), 1);
    assert!(!dst.join(".Sent").exists());
}
