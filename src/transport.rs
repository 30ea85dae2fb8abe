//! How the brain reaches a remote replica: parsing rsync-style locations (`PATH`,
//! `[user@]host:PATH`, `ssh://[user@]host[:port]/PATH`) and starting the far side — `ssh
//! host mdsync serve`, or an in-process server on a pipe for tests. Moves bytes only; the
//! protocol lives in `wire`, its use in `replica::remote`.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

use crate::serve::{ServeOptions, serve};
use crate::wire::conn::WireError;

/// Where a replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on this machine.
    Local(PathBuf),
    /// A directory on another host, reached through ssh.
    Remote(RemoteSpec),
}

/// A remote location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSpec {
    /// `host` or `user@host`.
    pub user_host: String,
    /// ssh port, when the location named one.
    pub port: Option<u16>,
    /// The path on that host, as written (relative paths are relative to the home there).
    pub path: String,
}

impl RemoteSpec {
    /// `user@host:path`, for messages.
    pub fn display(&self) -> String {
        match self.port {
            Some(port) => format!("ssh://{}:{port}/{}", self.user_host, self.path),
            None => format!("{}:{}", self.user_host, self.path),
        }
    }
}

/// Parses a location the way rsync does: a colon before any slash makes `host:path`.
pub fn parse_location(text: &str) -> Result<Location, String> {
    if let Some(rest) = text.strip_prefix("ssh://") {
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("{text}: an ssh:// location needs a /PATH"))?;
        let (user_host, port) = match authority.rsplit_once(':') {
            Some((uh, port)) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("{text}: bad port {port:?}"))?;
                (uh, Some(port))
            }
            None => (authority, None),
        };
        check_host(text, user_host)?;
        // ssh://host/srv/mail is the absolute /srv/mail; ssh://host/~/mail is the home's.
        let path = match path.strip_prefix("~/") {
            Some(home_relative) => format!("~/{home_relative}"),
            None => format!("/{path}"),
        };
        return Ok(Location::Remote(RemoteSpec {
            user_host: user_host.to_string(),
            port,
            path,
        }));
    }
    let colon = text.find(':');
    let slash = text.find('/');
    match colon {
        Some(c) if slash.is_none_or(|s| c < s) => {
            let (user_host, path) = (&text[..c], &text[c + 1..]);
            check_host(text, user_host)?;
            Ok(Location::Remote(RemoteSpec {
                user_host: user_host.to_string(),
                port: None,
                path: if path.is_empty() { "." } else { path }.to_string(),
            }))
        }
        _ => Ok(Location::Local(PathBuf::from(text))),
    }
}

fn check_host(text: &str, user_host: &str) -> Result<(), String> {
    let host = user_host.rsplit('@').next().unwrap_or("");
    let ok = !host.is_empty()
        && !user_host.starts_with('-')
        && user_host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@[]:%".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("{text}: bad host {user_host:?}"))
    }
}

/// How to start the far side.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The ssh command and its options (`-e`), split like a shell would.
    pub rsh: String,
    /// The mdsync binary on the far side.
    pub remote_mdsync: String,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            rsh: "ssh".into(),
            remote_mdsync: "mdsync".into(),
        }
    }
}

/// A running far side.
pub enum Peer {
    /// An ssh process.
    Child(Child),
    /// An in-process server thread.
    Thread(JoinHandle<Result<(), WireError>>),
}

/// The two byte streams to a far side and what runs it.
pub struct Channel {
    /// Bytes from the far side.
    pub input: Box<dyn Read + Send>,
    /// Bytes to the far side.
    pub output: Box<dyn Write + Send>,
    /// The process or thread serving it.
    pub peer: Peer,
}

/// The ssh command line for `spec`: the `-e` words, the port, the host, then the remote
/// command, quoted for the remote shell.
pub fn ssh_command(spec: &RemoteSpec, options: &ConnectOptions) -> Result<Vec<String>, String> {
    let mut words =
        shell_words::split(&options.rsh).map_err(|e| format!("--rsh {:?}: {e}", options.rsh))?;
    if words.is_empty() {
        return Err("--rsh is empty".into());
    }
    if let Some(port) = spec.port {
        words.push("-p".into());
        words.push(port.to_string());
    }
    words.push(spec.user_host.clone());
    words.push(shell_words::join([options.remote_mdsync.as_str(), "serve"]));
    Ok(words)
}

/// Starts `mdsync serve` on the remote host through ssh. Its stderr (ssh's own messages and
/// anything the far side prints) goes to ours, so the user sees it.
pub fn spawn_ssh(spec: &RemoteSpec, options: &ConnectOptions) -> io::Result<Channel> {
    let words = ssh_command(spec, options).map_err(io::Error::other)?;
    let mut child = Command::new(&words[0])
        .args(&words[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", words[0])))?;
    let input = child.stdout.take().expect("piped stdout");
    let output = child.stdin.take().expect("piped stdin");
    widen_pipe(&input);
    widen_pipe(&output);
    Ok(Channel {
        input: Box::new(input),
        output: Box::new(output),
        peer: Peer::Child(child),
    })
}

/// Largest pipe buffer an unprivileged process may ask for (Linux's default
/// `fs.pipe-max-size`).
const PIPE_BYTES: i32 = 1 << 20;

/// What is asked for when the kernel refuses [`PIPE_BYTES`] (a lower `fs.pipe-max-size`,
/// or the user's pipe budget nearly spent).
const PIPE_BYTES_FALLBACK: i32 = 256 << 10;

/// Widens the pipe `fd` to [`PIPE_BYTES`] (else [`PIPE_BYTES_FALLBACK`]), when it is a pipe
/// and the kernel allows it.
///
/// Why: every byte to and from the far side crosses two pipes per end (mdsync ↔ ssh, sshd
/// ↔ `mdsync serve`). At the default 64 KiB each, a few megabytes of bodies take hundreds
/// of wake-ups of ssh and of mdsync, each waiting for a CPU that the appliers keep busy; a
/// 1 MiB pipe lets each side run longer at once. A two-way sync over ssh of a 100,000-message
/// tree after a 1% change took 0.78–0.85 s instead of 0.90–0.98 s, and 0.1 s less CPU.
/// Anything else (not a pipe, lower limits) leaves the pipe as it was. The kernel never
/// lets an unprivileged user's pipes grow past its `fs.pipe-user-pages-soft` budget.
pub fn widen_pipe(fd: &impl std::os::fd::AsFd) {
    use nix::fcntl::{FcntlArg, fcntl};
    if fcntl(fd, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES)).is_err() {
        let _ = fcntl(fd, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES_FALLBACK));
    }
}

/// Starts a server in this process on a pair of pipes: the real codec end to end, without
/// ssh. Used by tests and `--transport pipe`.
pub fn spawn_in_process(options: ServeOptions) -> io::Result<Channel> {
    let (from_server, to_client) = io::pipe()?;
    let (from_client, to_server) = io::pipe()?;
    let thread = std::thread::Builder::new()
        .name("mdsync-serve".into())
        .spawn(move || serve(Box::new(from_client), Box::new(to_client), &options))?;
    Ok(Channel {
        input: Box::new(from_server),
        output: Box::new(to_server),
        peer: Peer::Thread(thread),
    })
}

/// SIGKILLs `pid` and every process below it. Killing only the ssh (or `-e` command)
/// process could leave a grandchild holding the pipe open, and the reader would wait on.
pub fn kill_tree(pid: u32) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        kill_tree(child);
    }
    if let Ok(raw) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a pipe get the wide buffer (the fallback where the kernel allows only
    /// that); a file is left as it is.
    #[test]
    fn pipes_are_widened_and_files_left_alone() {
        use nix::fcntl::{FcntlArg, fcntl};
        let allowed = |bytes| {
            let (probe, _) = std::io::pipe().unwrap();
            fcntl(&probe, FcntlArg::F_SETPIPE_SZ(bytes)).is_ok()
        };
        let want = [PIPE_BYTES, PIPE_BYTES_FALLBACK]
            .into_iter()
            .find(|&bytes| allowed(bytes))
            .expect("this kernel allows 256 KiB pipes");
        let (reader, writer) = std::io::pipe().unwrap();
        assert!(fcntl(&reader, FcntlArg::F_GETPIPE_SZ).unwrap() < want);
        widen_pipe(&reader);
        assert_eq!(fcntl(&writer, FcntlArg::F_GETPIPE_SZ).unwrap(), want);
        let file = tempfile::tempfile().unwrap();
        widen_pipe(&file);
        assert!(fcntl(&file, FcntlArg::F_GETPIPE_SZ).is_err());
    }

    fn remote(user_host: &str, port: Option<u16>, path: &str) -> Location {
        Location::Remote(RemoteSpec {
            user_host: user_host.into(),
            port,
            path: path.into(),
        })
    }

    #[test]
    fn locations_parse_like_rsync() {
        assert_eq!(
            parse_location("/srv/mail").unwrap(),
            Location::Local("/srv/mail".into())
        );
        assert_eq!(
            parse_location("./a:b").unwrap(),
            Location::Local("./a:b".into())
        );
        assert_eq!(
            parse_location("backup1:/srv/mail/alice").unwrap(),
            remote("backup1", None, "/srv/mail/alice")
        );
        assert_eq!(
            parse_location("vmail@backup1:Maildir").unwrap(),
            remote("vmail@backup1", None, "Maildir")
        );
        assert_eq!(parse_location("host:").unwrap(), remote("host", None, "."));
        assert_eq!(
            parse_location("ssh://u@h:2222/srv/mail").unwrap(),
            remote("u@h", Some(2222), "/srv/mail")
        );
        assert_eq!(
            parse_location("ssh://h/~/Maildir").unwrap(),
            remote("h", None, "~/Maildir")
        );
        assert!(parse_location("ssh://h:x/a").is_err());
        assert!(parse_location("-oProxyCommand=evil:x").is_err());
    }

    #[test]
    fn the_remote_command_is_quoted_for_the_remote_shell() {
        let spec = RemoteSpec {
            user_host: "h".into(),
            port: Some(2222),
            path: "/x".into(),
        };
        let options = ConnectOptions {
            rsh: "ssh -i 'my key'".into(),
            remote_mdsync: "/opt/md sync".into(),
        };
        assert_eq!(
            ssh_command(&spec, &options).unwrap(),
            [
                "ssh",
                "-i",
                "my key",
                "-p",
                "2222",
                "h",
                "'/opt/md sync' serve"
            ]
        );
    }
}
