//! Self-tests of the throwaway sshd of tests/support/sshd.rs: logins through its rsh string
//! run commands (as root, with sshd's default PATH), a forced-command key runs its command
//! whatever the client asks, and dropping it stops the server and its open sessions.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use support::sshd::Sshd;

/// Runs `RSH HOST REMOTE_COMMAND` the way a program given the rsh string would: split on
/// spaces.
fn run_rsh(rsh: &str, host: &str, remote_command: &str) -> Output {
    let words: Vec<&str> = rsh.split(' ').collect();
    Command::new(words[0])
        .args(&words[1..])
        .arg(host)
        .arg(remote_command)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{rsh}`: {e}"))
}

/// stdout of a successful run; panics with everything (and sshd's log) otherwise.
fn stdout_ok(out: &Output, what: &str, sshd: &Sshd) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}\n--- sshd log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        sshd.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rsh_runs_a_command_as_root() {
    let sshd = Sshd::start();
    assert_eq!(sshd.host(), "127.0.0.1");
    let rsh = sshd.rsh();
    assert!(
        rsh.starts_with(&format!(
            "ssh -p {} -i {} ",
            sshd.port(),
            sshd.key().display()
        )),
        "unexpected rsh: {rsh}"
    );
    assert!(rsh.ends_with(" -F /dev/null"), "unexpected rsh: {rsh}");

    let out = run_rsh(&rsh, sshd.host(), "echo hello");
    assert_eq!(stdout_ok(&out, "ssh echo hello", &sshd), "hello\n");
    assert!(
        out.stderr.is_empty(),
        "ssh printed on stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = sshd.ssh("id -u");
    assert_eq!(stdout_ok(&out, "ssh id -u", &sshd), "0\n");
}

#[test]
fn session_path_is_sshd_default_not_the_tests() {
    let sshd = Sshd::start();
    let out = sshd.ssh("echo \"$PATH\"");
    let path = stdout_ok(&out, "ssh echo $PATH", &sshd);
    let path = path.trim_end();
    let entries: Vec<&str> = path.split(':').collect();
    assert!(entries.contains(&"/usr/bin"), "remote PATH: {path}");
    // No rc file ran: nothing under a home directory (cargo, pyenv, ...) was added.
    assert!(
        entries
            .iter()
            .all(|e| !e.starts_with("/root") && !e.starts_with("/home")),
        "remote PATH has entries from an rc file: {path}"
    );
    assert_ne!(
        Some(path),
        std::env::var("PATH").ok().as_deref(),
        "the session inherited the test's PATH"
    );
    let out = sshd.ssh("exit 3");
    assert_eq!(out.status.code(), Some(3), "exit status is passed through");
}

#[test]
fn forced_command_key_runs_its_command_whatever_is_asked() {
    let sshd = Sshd::start();
    let (key, rsh) = sshd.authorize_forced_command("echo forced");
    assert!(key.is_file(), "no key at {}", key.display());
    assert!(
        rsh.contains(&format!(" -i {} ", key.display())),
        "rsh: {rsh}"
    );

    let out = run_rsh(&rsh, sshd.host(), "echo other");
    assert_eq!(stdout_ok(&out, "forced ssh", &sshd), "forced\n");

    // Quotes survive authorized_keys quoting; the client's request is in
    // SSH_ORIGINAL_COMMAND.
    let (_, quoted) =
        sshd.authorize_forced_command("printf '%s|' \"forced\" \"$SSH_ORIGINAL_COMMAND\"");
    let out = run_rsh(&quoted, sshd.host(), "echo other");
    assert_eq!(
        stdout_ok(&out, "forced ssh with quotes", &sshd),
        "forced|echo other|"
    );

    // The default key still runs what it is asked.
    let out = run_rsh(&sshd.rsh(), sshd.host(), "echo other");
    assert_eq!(stdout_ok(&out, "unforced ssh", &sshd), "other\n");
}

#[test]
fn drop_stops_the_server_and_open_sessions() {
    let sshd = Sshd::start();
    let port = sshd.port();
    let dir = sshd.dir().to_path_buf();

    // An open session: `cat` waits on the client's stdin, which stays open.
    let words: Vec<String> = sshd.rsh().split(' ').map(str::to_owned).collect();
    let mut client = Command::new(&words[0])
        .args(&words[1..])
        .arg(sshd.host())
        .arg("echo started; cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ssh");
    let mut line = String::new();
    BufReader::new(client.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("read from ssh");
    assert_eq!(line, "started\n", "session did not start\n{}", sshd.log());

    drop(sshd);

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    assert!(
        refused.is_err(),
        "port {port} still accepts connections after drop"
    );
    assert!(!dir.exists(), "temp dir {} not removed", dir.display());

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = client.try_wait().expect("wait for ssh") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = client.kill();
            let _ = client.wait();
            panic!("ssh session still open 10 s after the server was dropped");
        }
        sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "ssh ended cleanly: {status}");
}
