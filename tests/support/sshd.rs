//! A real, throwaway OpenSSH server on 127.0.0.1 for end-to-end tests of ssh transports.
//!
//! [`Sshd::start`] makes a temp dir holding a fresh ed25519 host key, a user key, an
//! `authorized_keys`, an `sshd_config` and sshd's log, picks a free loopback port, runs
//! `/usr/sbin/sshd -D -e -f CONFIG` as a child process and waits until `ssh ... true`
//! succeeds through it. Clients reach it with the command line from [`Sshd::rsh`] (like
//! rsync's `-e`), which logs in as the user running the tests (root: the tests run as root,
//! and the config allows root to log in with a key).
//!
//! What it needs: root, `/usr/sbin/sshd`, `ssh`, `ssh-keygen` (scripts/test.sh installs
//! openssh-server, which brings the client and creates the `sshd` privilege-separation
//! user), and the privilege-separation directory `/run/sshd`, which it creates (mode 755)
//! when missing, as systemd would.
//!
//! What it never does: listen anywhere but 127.0.0.1; read or write the system's sshd, its
//! config or keys (`/etc/ssh`), or anyone's `~/.ssh` (the server reads only the temp dir's
//! files, the clients run with `-F /dev/null`, `UserKnownHostsFile=/dev/null` and
//! `IdentitiesOnly=yes`); kill any process but its own sshd and that sshd's per-connection
//! children, by PID; skip a test (every failure is a panic naming the cause, with sshd's log).
//!
//! Inside a session: sshd runs the remote command as `SHELL -c COMMAND` with its default
//! environment, so `PATH` is sshd's built-in default (for root
//! `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`), not the test's: name
//! the remote binary (e.g. `env!("CARGO_BIN_EXE_mdsync")`) by absolute path. The config sets
//! `SHLVL=1` in sessions so that Debian's bash does not source `~/.bashrc` for commands run
//! by sshd: the remote side is not at the mercy of whatever the machine's rc file prints or
//! puts in `PATH`.
//! Nothing else of the test's environment reaches the session either (no `AcceptEnv`):
//! `HOME` is the user's real home, so a remote mdsync must be given its cache location on
//! its command line, e.g. `env XDG_CACHE_HOME=DIR HOME=DIR /abs/path/mdsync serve`, or it
//! writes its scan cache under /root/.cache.
//!
//! Dropping an [`Sshd`] stops its sshd (SIGTERM, then SIGKILL after a bounded wait) and the
//! per-connection sshd processes still open, then removes the temp dir.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The sshd binary, always by absolute path: sshd refuses to re-exec itself otherwise.
const SSHD: &str = "/usr/sbin/sshd";

/// sshd's privilege-separation directory; it must exist, owned by root, not group- or
/// world-writable.
const PRIVSEP_DIR: &str = "/run/sshd";

/// The only address the server listens on and clients connect to.
const HOST: &str = "127.0.0.1";

/// How long [`Sshd::start`] waits for sshd to accept a login, per attempt.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one readiness probe (`ssh ... true`) may take before it is killed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many ports [`Sshd::start`] tries when sshd cannot bind the one it was given.
const PORT_ATTEMPTS: usize = 5;

/// How long [`Drop`] waits after SIGTERM before sending SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// A running throwaway sshd on 127.0.0.1, stopped and removed when dropped.
pub struct Sshd {
    /// Temp dir with keys, config, `authorized_keys`, PID file and log.
    dir: tempfile::TempDir,
    /// The sshd listener (`sshd -D`); `None` only once dropped.
    child: Option<Child>,
    port: u16,
    /// Private key of the default user key (public half is `KEY.pub`).
    key: PathBuf,
    authorized_keys: PathBuf,
    log: PathBuf,
}

impl Sshd {
    /// Generates keys and config in a fresh temp dir, starts `/usr/sbin/sshd -D -e` on a
    /// free 127.0.0.1 port (picking another when sshd cannot bind it) and returns once an
    /// `ssh ... true` through it succeeds. Panics, with sshd's log, when anything fails or
    /// sshd is not ready within 10 s.
    pub fn start() -> Sshd {
        require_file(SSHD, "install openssh-server (scripts/test.sh does)");
        ensure_privsep_dir();
        let dir = tempfile::Builder::new()
            .prefix("mdsync-sshd-")
            .tempdir()
            .unwrap_or_else(|e| panic!("sshd: cannot create a temp dir: {e}"));
        let host_key = dir.path().join("host_ed25519");
        keygen(&host_key, "mdsync-test-host");
        let key = dir.path().join("user_ed25519");
        keygen(&key, "mdsync-test-user");
        let authorized_keys = dir.path().join("authorized_keys");
        write_file(&authorized_keys, &public_key(&key));
        let log = dir.path().join("sshd.log");
        let mut sshd = Sshd {
            dir,
            child: None,
            port: 0,
            key,
            authorized_keys,
            log,
        };
        sshd.launch(&host_key);
        sshd
    }

    /// Port sshd listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Private key of the default user key, authorized for any command.
    pub fn key(&self) -> &Path {
        &self.key
    }

    /// Host to connect to: always `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The temp dir holding keys, config and log (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The ssh command line to use as a program's ssh command (like rsync's `-e`), with the
    /// default key: `ssh -p PORT -i KEY -o ... -F /dev/null`. Append the host (and the
    /// remote command). Its words contain no whitespace or quotes, so splitting on spaces
    /// gives the argv back.
    pub fn rsh(&self) -> String {
        self.rsh_with(&self.key)
    }

    /// Everything sshd has logged so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read sshd log {}: {e})", self.log.display()))
    }

    /// Runs `remote_command` on 127.0.0.1 through [`Sshd::rsh`] (stdin from /dev/null) and
    /// returns its output whatever the exit status. Panics only when ssh cannot be started.
    pub fn ssh(&self, remote_command: &str) -> Output {
        self.ssh_command(&self.key, remote_command)
            .output()
            .unwrap_or_else(|e| panic!("sshd: cannot run ssh: {e}\n{}", self.log_section()))
    }

    /// Authorizes a second, newly generated user key whose logins always run `command`
    /// (via the login shell, whatever the client asks for; the client's request is in
    /// `SSH_ORIGINAL_COMMAND`), with `no-pty,no-port-forwarding,no-agent-forwarding,
    /// no-X11-forwarding`. Returns that key's private key path and an rsh string (as
    /// [`Sshd::rsh`]) using it. Name binaries in `command` by absolute path (see the module
    /// doc about `PATH`).
    pub fn authorize_forced_command(&self, command: &str) -> (PathBuf, String) {
        assert!(
            !command.contains(['\n', '\r', '\0']),
            "sshd: a forced command cannot contain a line break or NUL: {command:?}"
        );
        let index = (1..)
            .find(|n| !self.dir.path().join(format!("forced{n}_ed25519")).exists())
            .expect("a free key name");
        let key = self.dir.path().join(format!("forced{index}_ed25519"));
        keygen(&key, &format!("mdsync-test-forced{index}"));
        // In authorized_keys options only `\"` is an escape: everything else is literal.
        let quoted = command.replace('"', "\\\"");
        let line = format!(
            "command=\"{quoted}\",no-pty,no-port-forwarding,no-agent-forwarding,\
             no-X11-forwarding {}",
            String::from_utf8_lossy(&public_key(&key))
        );
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&self.authorized_keys)
            .unwrap_or_else(|e| {
                panic!("sshd: cannot open {}: {e}", self.authorized_keys.display())
            });
        file.write_all(line.as_bytes()).unwrap_or_else(|e| {
            panic!(
                "sshd: cannot append to {}: {e}",
                self.authorized_keys.display()
            )
        });
        let rsh = self.rsh_with(&key);
        (key, rsh)
    }

    /// The rsh words for `key`.
    fn rsh_args(&self, key: &Path) -> Vec<String> {
        let key = key
            .to_str()
            .unwrap_or_else(|| panic!("sshd: key path {} is not UTF-8", key.display()));
        assert!(
            !key.contains(|c: char| c.is_whitespace() || "\"'\\$`".contains(c)),
            "sshd: key path {key:?} has whitespace or quotes, so an rsh string cannot carry \
             it: set TMPDIR to a plain path like /tmp"
        );
        let mut args = vec![
            "ssh".to_owned(),
            "-p".to_owned(),
            self.port.to_string(),
            "-i".to_owned(),
            key.to_owned(),
        ];
        for option in [
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "LogLevel=ERROR",
        ] {
            args.push("-o".to_owned());
            args.push(option.to_owned());
        }
        args.push("-F".to_owned());
        args.push("/dev/null".to_owned());
        args
    }

    fn rsh_with(&self, key: &Path) -> String {
        self.rsh_args(key).join(" ")
    }

    /// `ssh RSH-OPTIONS 127.0.0.1 REMOTE_COMMAND` with stdin from /dev/null and captured
    /// stdout/stderr, not started.
    fn ssh_command(&self, key: &Path, remote_command: &str) -> Command {
        let args = self.rsh_args(key);
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..])
            .arg(HOST)
            .arg(remote_command)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Stops sshd and every connection it serves (the far side goes away), until
    /// [`Sshd::start_again`].
    pub fn stop_for_now(&mut self) {
        self.stop();
    }

    /// Starts the stopped sshd again on the same port, with the same keys; panics when it
    /// does not accept a login (the port was taken meanwhile, say).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "sshd is still running");
        let host_key = self.dir.path().join("host_ed25519");
        self.spawn(&host_key);
        if let Err(exit) = self.wait_ready() {
            panic!(
                "sshd exited ({exit}) when started again on port {}\n{}",
                self.port,
                self.log_section()
            );
        }
    }

    /// Writes the config for the current port and starts sshd (not waiting for it).
    fn spawn(&mut self, host_key: &Path) {
        let config = self.dir.path().join("sshd_config");
        write_file(&config, self.config_text(host_key).as_bytes());
        let log = fs::File::create(&self.log)
            .unwrap_or_else(|e| panic!("sshd: cannot create {}: {e}", self.log.display()));
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("sshd: cannot start {SSHD}: {e}"));
        self.child = Some(child);
    }

    /// Starts sshd on a fresh free port until one attempt gets a working login.
    fn launch(&mut self, host_key: &Path) {
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            self.port = free_port();
            self.spawn(host_key);
            match self.wait_ready() {
                Ok(()) => return,
                Err(exit) => {
                    let log = self.log();
                    self.child = None; // exited: nothing to stop
                    if !bind_failed(&log) {
                        panic!(
                            "sshd exited ({exit}) before accepting a login on port {}\n{}",
                            self.port,
                            self.log_section()
                        );
                    }
                    failures.push(format!("port {}: {}", self.port, log.trim()));
                }
            }
        }
        panic!(
            "sshd could not bind a free port on {HOST} in {PORT_ATTEMPTS} attempts:\n{}",
            failures.join("\n")
        );
    }

    /// Waits until the port accepts a connection and `ssh ... true` succeeds. `Err` with the
    /// exit status when sshd exits first; panics (stopping sshd) on timeout.
    fn wait_ready(&mut self) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_probe = String::from("(port never accepted a connection)");
        loop {
            if let Some(status) = self.child_exit() {
                return Err(status);
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                match self.probe() {
                    Ok(()) => return Ok(()),
                    Err(why) => last_probe = why,
                }
            }
            if Instant::now() >= deadline {
                let message = format!(
                    "sshd on port {} did not accept `ssh ... true` within {START_TIMEOUT:?}; \
                     last attempt: {last_probe}\n{}",
                    self.port,
                    self.log_section()
                );
                self.stop();
                panic!("{message}");
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// The exit status of the sshd child if it has exited (`None` while it runs).
    fn child_exit(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait for sshd: {e}")),
        }
    }

    /// One `ssh ... true` login, killed after [`PROBE_TIMEOUT`] or as soon as sshd exits
    /// (then the port may well be someone else's).
    fn probe(&mut self) -> Result<(), String> {
        let mut child = self
            .ssh_command(&self.key, "true")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("sshd: cannot run ssh: {e}\n{}", self.log_section()));
        let deadline = Instant::now() + PROBE_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline && self.child_exit().is_none() => {
                    sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    break;
                }
            }
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("sshd: cannot wait for ssh: {e}"));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ssh exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The sshd_config text for the current port.
    fn config_text(&self, host_key: &Path) -> String {
        let dir = self.dir.path();
        format!(
            "# Throwaway sshd for mdsync tests: loopback only, keys only, files in {dir}.\n\
             ListenAddress {HOST}\n\
             Port {port}\n\
             AddressFamily inet\n\
             HostKey {host_key}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {authorized_keys}\n\
             AuthorizedPrincipalsFile none\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             HostbasedAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             UsePAM no\n\
             StrictModes no\n\
             UseDNS no\n\
             PermitUserRC no\n\
             PermitUserEnvironment no\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             X11Forwarding no\n\
             AllowAgentForwarding no\n\
             AllowTcpForwarding no\n\
             MaxStartups 100\n\
             MaxSessions 100\n\
             SetEnv SHLVL=1\n\
             LogLevel VERBOSE\n",
            dir = dir.display(),
            port = self.port,
            host_key = host_key.display(),
            pid = dir.join("sshd.pid").display(),
            authorized_keys = self.authorized_keys.display(),
        )
    }

    /// sshd's log, framed for a panic message.
    fn log_section(&self) -> String {
        format!("--- sshd log ({}):\n{}", self.log.display(), self.log())
    }

    /// Stops the sshd child and its per-connection processes: SIGTERM, then SIGKILL after
    /// [`STOP_TIMEOUT`]. Never panics.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = child.id();
        // Listed while the listener lives: once it is gone they are reparented.
        let connections = children_of(pid);
        for &(p, _) in &connections {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGTERM);
        }
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        // Connection processes still alive after that: the same PID with the same start
        // time is the same process, so this never hits a recycled PID.
        let deadline = Instant::now() + STOP_TIMEOUT;
        for &(p, started) in &connections {
            while stat_of(p).is_some_and(|(_, s)| s == started) && Instant::now() < deadline {
                sleep(Duration::from_millis(20));
            }
            if stat_of(p).is_some_and(|(_, s)| s == started) {
                let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Sshd {
    /// Stops sshd (see the module doc); the temp dir goes afterwards.
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bound with port 0, then released).
fn free_port() -> u16 {
    let listener = TcpListener::bind((HOST, 0))
        .unwrap_or_else(|e| panic!("sshd: cannot bind {HOST}:0 to find a free port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("sshd: cannot read the bound port: {e}"))
        .port()
}

/// True when sshd's log says it could not listen on its port.
fn bind_failed(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("Cannot bind any address")
}

/// Creates `/run/sshd` (mode 755, as systemd's tmpfiles would) when missing.
fn ensure_privsep_dir() {
    let dir = Path::new(PRIVSEP_DIR);
    if dir.is_dir() {
        return;
    }
    match fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("sshd: cannot chmod 755 {PRIVSEP_DIR}: {e}")),
        // another test created it meanwhile
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => panic!(
            "sshd: cannot create its privilege-separation directory {PRIVSEP_DIR} \
             (tests must run as root): {e}"
        ),
    }
}

/// Panics naming `hint` unless `path` is an existing file.
fn require_file(path: &str, hint: &str) {
    assert!(Path::new(path).is_file(), "sshd: {path} not found: {hint}");
}

/// `ssh-keygen -q -t ed25519 -N '' -C COMMENT -f PATH` (PATH must not exist).
fn keygen(path: &Path, comment: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("sshd: cannot run ssh-keygen (install openssh-client): {e}"));
    assert!(
        out.status.success(),
        "sshd: ssh-keygen for {} failed ({}):\n{}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `KEY.pub` line of a key made by [`keygen`], newline-terminated.
fn public_key(key: &Path) -> Vec<u8> {
    let path = key.with_extension("pub");
    let mut text =
        fs::read(&path).unwrap_or_else(|e| panic!("sshd: cannot read {}: {e}", path.display()));
    if !text.ends_with(b"\n") {
        text.push(b'\n');
    }
    text
}

fn write_file(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("sshd: cannot write {}: {e}", path.display()));
}

/// `(pid, start time)` of the processes whose parent is `parent`, from /proc (empty when
/// unreadable).
fn children_of(parent: u32) -> Vec<(u32, u64)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| match stat_of(pid) {
            Some((ppid, started)) if ppid == parent => Some((pid, started)),
            _ => None,
        })
        .collect()
}

/// `(parent pid, start time in clock ticks since boot)` of a live (not zombie) `pid`, from
/// /proc/PID/stat: fields 4 and 22, counted after the parenthesized command name.
fn stat_of(pid: u32) -> Option<(u32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// A script that runs this build's mdsync with the test's cache home: sshd starts
/// commands with a bare environment, so the far side would otherwise cache in /root.
pub fn remote_wrapper(dir: &Path) -> PathBuf {
    let path = dir.join("mdsync-remote");
    let text = format!(
        "#!/bin/sh\nexport XDG_CACHE_HOME='{home}/remote' HOME='{home}/remote'\nexec '{bin}' \"$@\"\n",
        home = super::cache_home().display(),
        bin = env!("CARGO_BIN_EXE_mdsync"),
    );
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}
