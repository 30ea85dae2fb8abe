//! A hostile client against `mdsync serve`: crafted frames on its stdin. Every case must
//! end the session with an `Error` frame and a non-zero exit — never a panic, a hang or a
//! byte written outside the served root.

mod support;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};

use mdsync::wire::frame::{Kind, read_frame, write_frame};
use mdsync::wire::hello::{CAP_HASH, Hello};

fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, kind, payload).unwrap();
    out
}

fn hello() -> Vec<u8> {
    frame(Kind::Hello, &Hello::ours(CAP_HASH).encode())
}

fn request(json: &str) -> Vec<u8> {
    frame(Kind::Request, json.as_bytes())
}

fn object(bytes: &[u8]) -> Vec<u8> {
    let mut payload = vec![0u8];
    payload.extend_from_slice(bytes);
    frame(Kind::Part, &payload)
}

/// A key list naming one message in `cur/` (the encoder checks nothing; the server must).
fn key_list(dir: &str, name: &str) -> Vec<u8> {
    mdsync::wire::codec::encode_keys(&[mdsync::wire::codec::Key {
        dir: dir.into(),
        sub: mdsync::model::Subdir::Cur,
        name: name.into(),
    }])
}

fn open(path: &str) -> Vec<u8> {
    request(&format!(
        r#"{{"request":"open","path":"{path}","bwlimit":0,"use_cache":false,"verbose":false}}"#
    ))
}

/// Runs `mdsync serve --root ROOT` with `input` on stdin.
fn serve(root: &Path, input: &[u8]) -> Output {
    serve_with(&["--root"], root, input)
}

/// Runs `mdsync serve --no-cache ARGS ROOT` with `input` on stdin.
fn serve_with(args: &[&str], root: &Path, input: &[u8]) -> Output {
    let mut child = support::mdsync()
        .args(["serve", "--no-cache"])
        .args(args)
        .arg(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(input);
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// The text of the `Error` frame the server sent, failing when there is none.
fn error_frame(out: &Output) -> String {
    let mut input = &out.stdout[..];
    while let Ok(f) = read_frame(&mut input) {
        if f.kind == Kind::Error {
            return String::from_utf8_lossy(&f.payload).into_owned();
        }
    }
    panic!(
        "no Error frame; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_refused(out: &Output, needle: &str) {
    assert!(!out.status.success(), "the session must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let error = error_frame(out);
    assert!(
        error.contains(needle),
        "{error:?} does not mention {needle:?}"
    );
}

fn served_root() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("served");
    fs::create_dir_all(root.join("alice")).unwrap();
    (dir, root)
}

#[test]
fn garbage_and_oversized_frames_end_the_session() {
    let (_dir, root) = served_root();
    assert_refused(&serve(&root, b"SSH-2.0-OpenSSH banner\r\n"), "");
    let mut huge = vec![Kind::Hello as u8];
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_refused(&serve(&root, &huge), "exceeds");
    let mut unknown = hello();
    unknown.extend_from_slice(&[200, 0, 0, 0, 0]);
    assert_refused(&serve(&root, &unknown), "unknown frame kind");
    let mut wrong_version = Hello::ours(0);
    wrong_version.version = 99;
    assert_refused(
        &serve(&root, &frame(Kind::Hello, &wrong_version.encode())),
        "protocol 99",
    );
}

#[test]
fn paths_outside_the_root_are_refused() {
    let (dir, root) = served_root();
    for path in ["../outside", "/etc", "alice/../../outside"] {
        let mut input = hello();
        input.extend(open(path));
        assert_refused(&serve(&root, &input), path);
        // `mdsync serve ROOT` is the same confinement.
        assert_refused(&serve_with(&[], &root, &input), path);
    }
    // A request before Open, and a malformed request.
    let mut input = hello();
    input.extend(request(r#"{"request":"detect_layout"}"#));
    assert_refused(&serve(&root, &input), "no replica is open");
    let mut input = hello();
    input.extend(request(r#"{"request":"launch_missiles"}"#));
    assert_refused(&serve(&root, &input), "malformed");
    assert!(!dir.path().join("outside").exists());
}

#[test]
fn hostile_key_lists_and_plans_are_refused_and_write_nothing() {
    let (dir, root) = served_root();
    // Bodies of a file outside the root.
    let keys = key_list("../..", "passwd");
    let mut input = hello();
    input.extend(open("alice"));
    input.extend(request(r#"{"request":"bodies"}"#));
    input.extend(object(&keys));
    let out = serve(&root, &input);
    assert_refused(&out, "unsafe path");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("root:"),
        "no byte of a file outside the root may be sent"
    );

    // A key list whose count the bytes cannot back.
    let mut input = hello();
    input.extend(open("alice"));
    input.extend(request(r#"{"request":"hashes"}"#));
    input.extend(object(&u32::MAX.to_le_bytes()));
    assert_refused(&serve(&root, &input), "");

    // A plan whose mailbox lies outside the root.
    let plan = serde_json::json!({
        "delete_mailboxes": [], "create_parents": [], "remove_parents": [],
        "mailboxes": [{
            "dir": "../escape", "name": "x", "create": {"mode": 448, "uid": 0, "gid": 0},
            "maildirfolder": true, "keywords": null, "copies": [], "renames": [],
            "expunges": [], "uidlist": null, "reset_index": false
        }],
        "subscriptions": null, "uidvalidity_next": null, "skipped": [], "warnings": [],
        "root_meta": {"mode": 448, "uid": 0, "gid": 0}, "sweep": []
    });
    let mut input = hello();
    input.extend(open("alice"));
    input.extend(request(
        r#"{"request":"apply","options":{"fsync":"None","ownership":"RunningUser"}}"#,
    ));
    input.extend(object(plan.to_string().as_bytes()));
    assert_refused(&serve(&root, &input), "unsafe path");
    assert!(!root.join("escape").exists() && !dir.path().join("escape").exists());
    assert!(
        fs::read_dir(root.join("alice")).unwrap().next().is_none(),
        "nothing written in the opened replica either"
    );
}

#[test]
fn a_client_that_vanishes_mid_request_ends_the_server() {
    let (_dir, root) = served_root();
    let mut input = hello();
    input.extend(open("alice"));
    input.extend(request(r#"{"request":"bodies"}"#));
    // The object's part frame is cut short.
    let part = object(&[1, 0, 0, 0]);
    input.extend_from_slice(&part[..part.len() - 2]);
    let out = serve(&root, &input);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn a_symlink_inside_the_root_is_not_a_way_out() {
    let (dir, root) = served_root();
    let outside = dir.path().join("outside");
    fs::create_dir_all(outside.join("cur")).unwrap();
    fs::write(outside.join("cur/secret"), b"root:x:0:0").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("alice/.Link")).unwrap();
    let keys = key_list(".Link", "secret");
    let mut input = hello();
    input.extend(open("alice"));
    input.extend(request(r#"{"request":"bodies"}"#));
    input.extend(object(&keys));
    let out = serve(&root, &input);
    assert_refused(&out, "symlink");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("root:x"));
}

#[test]
fn rescans_through_a_symlink_or_of_too_many_mailboxes_are_refused() {
    let (dir, root) = served_root();
    let outside = dir.path().join("outside");
    fs::create_dir_all(outside.join("cur")).unwrap();
    fs::write(outside.join("cur/1.M1P1.secret-name"), b"x").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("alice/.Link")).unwrap();
    for rescan in [
        r#"{"request":"rescan","layout":"MaildirPlusPlus","dir":".Link","baseline":null}"#,
        r#"{"request":"rescan_many","layout":"MaildirPlusPlus","mailboxes":[["",null],[".Link",null]]}"#,
    ] {
        let mut input = hello();
        input.extend(open("alice"));
        input.extend(request(rescan));
        let out = serve(&root, &input);
        assert_refused(&out, "symlink");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("secret-name"));
    }
    let many: Vec<String> = (0..=mdsync::serve::MAX_RESCAN)
        .map(|n| format!(r#"[".F{n}",null]"#))
        .collect();
    let mut input = hello();
    input.extend(open("alice"));
    input.extend(request(&format!(
        r#"{{"request":"rescan_many","layout":"MaildirPlusPlus","mailboxes":[{}]}}"#,
        many.join(",")
    )));
    assert_refused(&serve(&root, &input), "mailboxes in one rescan");
}

#[test]
fn a_rescan_naming_a_mailbox_twice_is_refused() {
    // Each name is read and held until all are sent: one big mailbox named 65,536 times
    // would hold as many copies of its table in memory.
    let (_dir, root) = served_root();
    let mut input = hello();
    input.extend(open("alice"));
    input.extend(request(
        r#"{"request":"rescan_many","layout":"MaildirPlusPlus","mailboxes":[["",null],[".A",null],["",null]]}"#,
    ));
    assert_refused(&serve(&root, &input), "twice");
}

/// `Open` with the client's `--offline` assertion.
fn open_offline(path: &str) -> Vec<u8> {
    request(&format!(
        r#"{{"request":"open","path":"{path}","bwlimit":0,"use_cache":false,"verbose":false,"offline":true}}"#
    ))
}

/// A `NewMdbox` request announcing `mailboxes` tables (none of which follow).
fn new_mdbox(mailboxes: u32) -> Vec<u8> {
    use mdsync::wire::messages::{Request, RootFacts};
    let root = RootFacts {
        layout: mdsync::storage::maildir::layout::Layout::MaildirPlusPlus,
        parents: Vec::new(),
        unfollowed: Vec::new(),
        subscriptions: None,
        uidvalidity_next: None,
        root_meta: Default::default(),
        scanned_at_ns: 0,
        anomalies: Vec::new(),
    };
    request(&serde_json::to_string(&Request::NewMdbox { mailboxes, root }).unwrap())
}

/// Writes into mdbox need the client's `--offline`: a plan for an mdbox tree opened without
/// it, and a new tree without it, are refused naming the path; a new tree is never made at
/// the served root itself (it is built beside its place), nor from more mailboxes than the
/// limit. Nothing is written.
#[test]
fn mdbox_writes_without_offline_or_out_of_bounds_are_refused() {
    let (_dir, root) = served_root();
    let mdbox = root.join("mdbox");
    fs::create_dir_all(mdbox.join("storage")).unwrap();
    fs::create_dir_all(mdbox.join("mailboxes")).unwrap();
    let plan = serde_json::to_string(&mdsync::sync::plan::Plan::default()).unwrap();
    let mut input = hello();
    input.extend(open("mdbox"));
    input.extend(request(
        r#"{"request":"apply","options":{"fsync":"None","ownership":"RunningUser"}}"#,
    ));
    input.extend(object(plan.as_bytes()));
    let out = serve(&root, &input);
    assert_refused(&out, "needs --offline");
    assert!(error_frame(&out).contains("mdbox"));
    for dir in ["storage", "mailboxes"] {
        assert!(fs::read_dir(mdbox.join(dir)).unwrap().next().is_none());
    }

    let mut input = hello();
    input.extend(open("fresh"));
    input.extend(new_mdbox(0));
    assert_refused(&serve(&root, &input), "needs --offline");
    assert!(!root.join("fresh").exists());

    let mut input = hello();
    input.extend(open_offline(""));
    input.extend(new_mdbox(0));
    assert_refused(&serve(&root, &input), "the served root itself");

    let mut input = hello();
    input.extend(open_offline("fresh"));
    input.extend(new_mdbox(u32::MAX));
    assert_refused(&serve(&root, &input), "mailboxes in one new tree");
    assert!(!root.join("fresh").exists());
    let parent: Vec<_> = fs::read_dir(&root).unwrap().flatten().collect();
    assert_eq!(parent.len(), 2, "only alice and mdbox: {parent:?}");
}

/// An `Apply` that carries nothing to do.
fn empty_plan() -> String {
    serde_json::json!({
        "delete_mailboxes": [], "create_parents": [], "remove_parents": [], "mailboxes": [],
        "subscriptions": null, "uidvalidity_next": null, "skipped": [], "warnings": [],
        "root_meta": {"mode": 448, "uid": 0, "gid": 0}, "sweep": []
    })
    .to_string()
}

/// `Apply` asking for bodies too (`also_send`, capability bit 4).
fn apply_also_sending(keys: &[u8]) -> Vec<u8> {
    let mut input = request(
        r#"{"request":"apply","options":{"fsync":"None","ownership":"RunningUser"},"also_send":true}"#,
    );
    input.extend(object(empty_plan().as_bytes()));
    input.extend(object(keys));
    input
}

#[test]
fn an_apply_asking_for_bodies_is_checked_like_bodies_and_answers_them_first() {
    let (_dir, root) = served_root();
    let mut input = hello();
    input.extend(open("alice"));
    input.extend(apply_also_sending(&key_list("../..", "passwd")));
    let out = serve(&root, &input);
    assert_refused(&out, "unsafe path");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("root:"));

    // A message of the served INBOX comes back whole, before the apply's answer.
    let cur = root.join("alice/cur");
    fs::create_dir_all(&cur).unwrap();
    fs::write(cur.join("1700000000.M1P1.host,S=13:2,S"), b"hello, alice\n").unwrap();
    let mut input = hello();
    input.extend(open("alice"));
    input.extend(apply_also_sending(&key_list(
        "",
        "1700000000.M1P1.host,S=13:2,S",
    )));
    input.extend(request(r#"{"request":"bye"}"#));
    let out = serve(&root, &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut stdout = &out.stdout[..];
    let mut frames = Vec::new();
    let mut body = Vec::new();
    while let Ok(f) = read_frame(&mut stdout) {
        if f.kind == Kind::BodyChunk {
            body.extend_from_slice(&f.payload);
        }
        let applied =
            f.kind == Kind::Answer && String::from_utf8_lossy(&f.payload).contains("applied");
        frames.push((f.kind, applied));
    }
    let at = |kind| frames.iter().position(|f| *f == (kind, false)).unwrap();
    let applied = frames
        .iter()
        .position(|f| *f == (Kind::Answer, true))
        .unwrap();
    assert!(at(Kind::BodyStart) < at(Kind::BodyEnd), "{frames:?}");
    assert!(at(Kind::BodyEnd) < applied, "{frames:?}");
    assert_eq!(
        body, b"hello, alice\n",
        "sent as it is (no zstd was agreed)"
    );
}
