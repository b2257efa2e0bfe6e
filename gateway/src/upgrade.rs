//! Upgrading the binary without refusing a connection attempt (issue 23, first step: the
//! listening sockets).
//!
//! On SIGUSR2 the running gateway starts its own command again (the binary at the path it was
//! started from, which an upgrade has replaced, with the same arguments), with one end of a
//! Unix socket pair as `TOLLGATE_UPGRADE_FD`. Over it the old process sends its listening
//! sockets (SCM_RIGHTS) and what each one is; the new process loads and checks its manifest
//! and plugins, serves on the sockets it was given (binding only those its manifest moved),
//! and answers `ready` once it accepts. Only then does the old process stop accepting and
//! drain as on SIGTERM. The sockets are the same kernel objects in both processes, so the
//! accept queue is never closed: a connection attempt made at any moment is accepted by one
//! process or the other. If the new process fails (its manifest, a plugin, a bind) or does not
//! answer within [`READY_WITHIN`], the old one says why, stops it, and keeps serving.
//!
//! Connections the old process holds go on in the new one where both binaries can do it
//! ([`crate::handover`]): the offer says which connection format the old process writes, the
//! answer which one the new process reads; the channel then stays open for the connections.
//! Otherwise (or for connections that cannot be handed over) they are drained as on SIGTERM.
//!
//! The messages are JSON, each after its length (4 bytes, big-endian), and carry a version:
//! a new binary that does not know the old one's version answers `failed`, and the old one
//! keeps serving. A reader takes exactly one message's bytes, so the channel can carry many.

use std::io::{IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The environment variable that tells a new process which descriptor is its end of the
/// handover channel.
pub const ENV_FD: &str = "TOLLGATE_UPGRADE_FD";
/// The handover's format; bumped when a message changes.
pub const VERSION: u32 = 1;
/// The format live connections are handed over in ([`crate::handover`]): offered by the old
/// process, accepted by the new one. Bumped when `HandedConnection` changes meaning. (Kept here,
/// with the rest of the channel's formats, so the handover builds on this module and not the
/// other way round.)
pub const CONNECTION_FORMAT: u32 = 1;
/// How long the old process waits for the new one to load everything and accept: plugins are
/// compiled (or read from the cache) first.
pub const READY_WITHIN: Duration = Duration::from_secs(120);
/// Descriptors that come with one message at most (the listening sockets: ws, wss, admin; a
/// connection's two sockets).
const MAX_FDS: usize = 8;
/// Longest message on the channel.
const MAX_MESSAGE: usize = 64 * 1024;
/// Longest reason a failed new process gives.
const MAX_REASON: usize = 16 * 1024;

/// Which listener a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Ws,
    Wss,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ws => "ws",
            Role::Wss => "wss",
            Role::Admin => "admin",
        }
    }
}

/// A listening socket as the old process describes it: its role, the address its manifest
/// asked for (a new manifest that asks for another one gets a socket of its own) and the one
/// it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Described {
    pub role: Role,
    pub configured: SocketAddr,
    pub bound: SocketAddr,
}

/// The old process's message: its sockets, in the order of the descriptors sent with it.
#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    version: u32,
    old_pid: u32,
    listeners: Vec<Described>,
    /// The connection format the old process hands live connections over in, if it can.
    #[serde(default)]
    connections: Option<u32>,
}

/// The new process's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "lowercase")]
enum Answer {
    /// It accepts on every listener now.
    Ready {
        pid: u32,
        took: Vec<Role>,
        version: String,
        /// The connection format it reads, when it takes the old process's connections.
        #[serde(default)]
        connections: Option<u32>,
    },
    /// It cannot serve; it exits.
    Failed { pid: u32, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot start the new process ({command}): {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("handover channel: {0}")]
    Channel(std::io::Error),
    #[error("the new process (pid {pid}) failed: {reason}")]
    Failed { pid: u32, reason: String },
    #[error("the new process (pid {pid}) exited before it was ready ({status})")]
    Exited {
        pid: u32,
        status: std::process::ExitStatus,
    },
    #[error("the new process (pid {pid}) was not ready within {within:?}")]
    NotReady { pid: u32, within: Duration },
    #[error("handover message: {0}")]
    Message(String),
    #[error("an upgrade is already under way")]
    Busy,
}

/// The command this process was started with, read at start: the path as it was given (made
/// absolute against the starting directory, or found on `PATH`), not resolved. An upgrade that
/// replaced the file, or moved a symlink to another version, runs what the path names now;
/// `/proc/self/exe` would name the old file.
static COMMAND: OnceLock<(std::path::PathBuf, Vec<std::ffi::OsString>)> = OnceLock::new();

/// The descriptor of the handover channel, taken out of the environment at start.
static CHANNEL_FD: OnceLock<Option<i32>> = OnceLock::new();

/// First thing in `main`, while the process has one thread: remembers how this process was
/// started, takes [`ENV_FD`] out of the environment (so nothing this process starts inherits
/// it), and ignores SIGUSR2 until the gateway installs its handler (a stray one would
/// otherwise kill a new process still loading).
pub fn at_start() {
    // SAFETY: setting a signal's disposition to "ignore" has no preconditions; the gateway's
    // runtime replaces it with its handler once it serves.
    unsafe {
        libc::signal(libc::SIGUSR2, libc::SIG_IGN);
    }
    let mut args = std::env::args_os();
    let argv0 = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_default();
    let exe = if argv0.components().count() > 1 {
        std::env::current_dir()
            .map(|d| d.join(&argv0))
            .unwrap_or(argv0)
    } else {
        std::env::var_os("PATH")
            .and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join(&argv0))
                    .find(|p| p.is_file())
            })
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or(argv0)
    };
    let _ = COMMAND.set((exe, args.collect()));
    let fd = std::env::var(ENV_FD)
        .ok()
        .map(|v| v.parse::<i32>().unwrap_or(-1));
    std::env::remove_var(ENV_FD);
    let _ = CHANNEL_FD.set(fd);
}

/// A listening socket to hand over: what it is, and a descriptor of it (a duplicate, so the
/// accept loop keeps its own).
pub struct Handable {
    pub described: Described,
    pub fd: OwnedFd,
}

/// A new process that answered `ready`: it is this process's child until this one exits.
#[derive(Debug)]
pub struct Upgraded {
    pub new_pid: u32,
    pub took: Vec<Role>,
    /// Its version, and the binary it runs.
    pub version: String,
    pub exe: std::path::PathBuf,
    pub child: std::process::Child,
    /// The channel, still open, when the new process takes live connections.
    pub channel: Option<UnixStream>,
}

/// Ends a handover that is waiting for the new process (the gateway is stopping): the wait
/// returns at once, and the new process is stopped.
pub struct Abort(UnixStream);

impl Abort {
    pub fn abort(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Starts the new process and hands it `listeners`; returns once it is ready, or why not (it
/// is then stopped and reaped). `on_wait` gets an [`Abort`] before the wait for `ready`.
/// Blocking: run it on a blocking thread.
pub fn hand_over(
    listeners: &[Handable],
    on_wait: impl FnOnce(Abort),
) -> Result<Upgraded, UpgradeError> {
    let (exe, args) = COMMAND
        .get()
        .cloned()
        .unwrap_or_else(|| (std::path::PathBuf::from("tollgate"), Vec::new()));
    let (mut ours, theirs) = UnixStream::pair().map_err(UpgradeError::Channel)?;
    // Above the standard streams, which the child's stdio set-up replaces before exec.
    let theirs =
        rustix::io::fcntl_dupfd_cloexec(&theirs, 3).map_err(|e| UpgradeError::Channel(e.into()))?;
    let fd = theirs.as_raw_fd();
    let mut command = std::process::Command::new(&exe);
    command
        .args(&args)
        .env(ENV_FD, fd.to_string())
        .stdin(std::process::Stdio::null());
    // SAFETY: runs in the child between fork and exec; fcntl is async-signal-safe. It clears
    // close-on-exec on the child's end of the pair only, so the new binary inherits it.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| UpgradeError::Spawn {
        command: exe.display().to_string(),
        source,
    })?;
    drop(theirs);
    let pid = child.id();
    if let Ok(clone) = ours.try_clone() {
        on_wait(Abort(clone));
    }
    match offer_and_wait(&mut ours, listeners, pid) {
        Ok((took, version, connections)) => Ok(Upgraded {
            new_pid: pid,
            took,
            version,
            exe,
            child,
            channel: (connections == Some(CONNECTION_FORMAT)).then_some(ours),
        }),
        Err(e) => {
            // Ours to stop: it never served, or said it cannot.
            let _ = child.kill();
            let status = child.wait();
            Err(match (e, status) {
                (UpgradeError::Channel(_), Ok(status)) if status.code().is_some() => {
                    UpgradeError::Exited { pid, status }
                }
                (e, _) => e,
            })
        }
    }
}

fn offer_and_wait(
    ours: &mut UnixStream,
    listeners: &[Handable],
    pid: u32,
) -> Result<(Vec<Role>, String, Option<u32>), UpgradeError> {
    let offer = Offer {
        version: VERSION,
        old_pid: std::process::id(),
        listeners: listeners.iter().map(|l| l.described.clone()).collect(),
        connections: Some(CONNECTION_FORMAT),
    };
    let fds: Vec<_> = listeners.iter().map(|l| l.fd.as_fd()).collect();
    send(ours, &offer, &fds)?;
    ours.set_read_timeout(Some(READY_WITHIN))
        .map_err(UpgradeError::Channel)?;
    let answer: Answer = match receive(ours) {
        Ok((a, _)) => a,
        Err(UpgradeError::Channel(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(UpgradeError::NotReady {
                pid,
                within: READY_WITHIN,
            })
        }
        Err(e) => return Err(e),
    };
    match answer {
        Answer::Ready {
            took,
            version,
            connections,
            ..
        } => {
            // Connections flow on the same channel from now on, as long as they come.
            ours.set_read_timeout(None).map_err(UpgradeError::Channel)?;
            Ok((took, version, connections))
        }
        Answer::Failed { pid, reason } => Err(UpgradeError::Failed { pid, reason }),
    }
}

/// What a new process was handed: the listening sockets, and the channel to answer on.
pub struct Inherited {
    pub old_pid: u32,
    listeners: Vec<(Described, Option<OwnedFd>)>,
    channel: UnixStream,
    /// The connection format the old process offered.
    connections: Option<u32>,
}

impl Inherited {
    /// If this process was started by an upgrade: the old process's sockets (blocking; at
    /// start). `Err`: the channel is there but unreadable, or from an unknown version.
    pub fn from_env() -> Option<Result<Inherited, UpgradeError>> {
        let fd = (*CHANNEL_FD.get()?)?;
        let bad = |why: &str| Some(Err(UpgradeError::Message(format!("{ENV_FD}={fd}: {why}"))));
        if fd < 3 {
            return bad("not a descriptor an upgrade passes");
        }
        // SAFETY: only borrowed, to look at what it is; ownership is taken below only once
        // it is a Unix stream socket, which only the old process's socket pair is.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let stream = matches!(
            rustix::net::sockopt::socket_type(borrowed),
            Ok(rustix::net::SocketType::STREAM)
        ) && matches!(
            rustix::net::sockopt::socket_domain(borrowed),
            Ok(rustix::net::AddressFamily::UNIX)
        );
        if !stream {
            return bad("not a Unix stream socket");
        }
        // SAFETY: a Unix stream socket named by the variable the old process set for this
        // process (and took out of the environment at start); nothing else owns it.
        let channel = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let _ = rustix::io::fcntl_setfd(&channel, rustix::io::FdFlags::CLOEXEC);
        Some(Inherited::receive(channel))
    }

    fn receive(channel: UnixStream) -> Result<Inherited, UpgradeError> {
        // A process that reads this, blocks at most this long (the old one wrote it first).
        channel
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(UpgradeError::Channel)?;
        let (raw, fds): (serde_json::Value, Vec<OwnedFd>) = receive(&channel)?;
        let mut inherited = Inherited {
            old_pid: 0,
            listeners: Vec::new(),
            channel,
            connections: None,
        };
        // The version first, whatever else a later format holds, so the answer can say why.
        let version = raw.get("version").and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(VERSION)) {
            let reason = format!(
                "the running gateway hands over format {}, this binary reads {VERSION}",
                version.map_or_else(|| "(none)".to_owned(), |v| v.to_string())
            );
            inherited.failed(&reason);
            return Err(UpgradeError::Message(reason));
        }
        let offer: Offer = match serde_json::from_value(raw) {
            Ok(o) => o,
            Err(e) => {
                let reason = format!("unreadable handover: {e}");
                inherited.failed(&reason);
                return Err(UpgradeError::Message(reason));
            }
        };
        inherited.old_pid = offer.old_pid;
        inherited.connections = offer.connections;
        if fds.len() != offer.listeners.len() {
            let reason = format!(
                "{} sockets described, {} received",
                offer.listeners.len(),
                fds.len()
            );
            inherited.failed(&reason);
            return Err(UpgradeError::Message(reason));
        }
        inherited.listeners = offer
            .listeners
            .into_iter()
            .zip(fds.into_iter().map(Some))
            .collect();
        Ok(inherited)
    }

    /// The socket for `role` if the old process had one for the same configured address.
    pub fn take(&mut self, role: Role, configured: SocketAddr) -> Option<std::net::TcpListener> {
        let (_, fd) = self
            .listeners
            .iter_mut()
            .find(|(d, fd)| d.role == role && d.configured == configured && fd.is_some())?;
        fd.take().map(std::net::TcpListener::from)
    }

    /// Tells the old process this one accepts now (it then stops accepting, hands over its
    /// connections and drains the rest). Returns the channel when connections will come on it.
    pub fn ready(mut self, took: Vec<Role>) -> Result<Option<UnixStream>, UpgradeError> {
        let takes = self.connections == Some(CONNECTION_FORMAT);
        let answer = Answer::Ready {
            pid: std::process::id(),
            took,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            connections: takes.then_some(CONNECTION_FORMAT),
        };
        send(&mut self.channel, &answer, &[])?;
        if !takes {
            return Ok(None);
        }
        // They come for as long as the old process drains.
        self.channel
            .set_read_timeout(None)
            .map_err(UpgradeError::Channel)?;
        Ok(Some(self.channel))
    }

    /// Tells the old process this one cannot serve, and why.
    pub fn failed(&mut self, reason: &str) {
        // Bounded, so the message fits the channel's limit whatever the errors were.
        let answer = Answer::Failed {
            pid: std::process::id(),
            reason: reason[..reason.floor_char_boundary(MAX_REASON)].to_owned(),
        };
        let _ = send(&mut self.channel, &answer, &[]);
    }
}

/// One message: its length, its JSON, and `fds` with its first byte.
pub(crate) fn send<T: Serialize>(
    channel: &mut UnixStream,
    message: &T,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), UpgradeError> {
    let body = serde_json::to_vec(message).map_err(|e| UpgradeError::Message(e.to_string()))?;
    // Checked here, before anything is written: the reader refuses a longer message, and the
    // channel would be out of step after it.
    if body.len() > MAX_MESSAGE {
        return Err(UpgradeError::Message(format!(
            "a message of {} bytes (at most {MAX_MESSAGE})",
            body.len()
        )));
    }
    let mut bytes = u32::try_from(body.len())
        .map_err(|_| UpgradeError::Message("message too long".into()))?
        .to_be_bytes()
        .to_vec();
    bytes.extend_from_slice(&body);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty()
        && (fds.len() > MAX_FDS || !control.push(rustix::net::SendAncillaryMessage::ScmRights(fds)))
    {
        return Err(UpgradeError::Message(format!(
            "{} sockets to hand over (at most {MAX_FDS})",
            fds.len()
        )));
    }
    // The descriptors go with the first byte; the rest follows on the stream.
    let sent = rustix::net::sendmsg(
        &*channel,
        &[IoSlice::new(&bytes)],
        &mut control,
        rustix::net::SendFlags::NOSIGNAL,
    )
    .map_err(|e| UpgradeError::Channel(e.into()))?;
    channel
        .write_all(&bytes[sent..])
        .map_err(UpgradeError::Channel)
}

/// One message and the descriptors that came with it. Reads exactly its bytes, so the next
/// message (and its descriptors) stays on the channel for the next call.
pub(crate) fn receive<T: for<'de> Deserialize<'de>>(
    channel: &UnixStream,
) -> Result<(T, Vec<OwnedFd>), UpgradeError> {
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    read_exact_with_fds(channel, &mut len, &mut fds)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(UpgradeError::Message(format!("a message of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    read_exact_with_fds(channel, &mut body, &mut fds)?;
    let message =
        serde_json::from_slice(&body).map_err(|e| UpgradeError::Message(e.to_string()))?;
    Ok((message, fds))
}

/// Fills `buf` from the channel, keeping every descriptor that comes with its bytes. A signal
/// (SA_RESTART does not restart a socket read with a timeout) is not a failure; descriptors
/// the kernel had to drop (no room for them) are.
fn read_exact_with_fds(
    channel: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<(), UpgradeError> {
    let mut have = 0;
    while have < buf.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let got = loop {
            match rustix::net::recvmsg(
                channel,
                &mut [IoSliceMut::new(&mut buf[have..])],
                &mut control,
                rustix::net::RecvFlags::CMSG_CLOEXEC,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r.map_err(|e| UpgradeError::Channel(e.into()))?,
            }
        };
        for message in control.drain() {
            if let rustix::net::RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(UpgradeError::Message(
                "descriptors were lost on the channel (more than a message may carry)".into(),
            ));
        }
        if got.bytes == 0 {
            return Err(UpgradeError::Channel(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        have += got.bytes;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_cross_the_channel_and_still_accept() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bound = listener.local_addr().unwrap();
        let (mut old, new) = UnixStream::pair().unwrap();
        let offer = Offer {
            version: VERSION,
            old_pid: 7,
            listeners: vec![Described {
                role: Role::Ws,
                configured: "127.0.0.1:0".parse().unwrap(),
                bound,
            }],
            connections: None,
        };
        send(&mut old, &offer, &[listener.as_fd()]).unwrap();
        let mut inherited = Inherited::receive(new).unwrap();
        assert_eq!(inherited.old_pid, 7);
        assert!(inherited
            .take(Role::Wss, "127.0.0.1:0".parse().unwrap())
            .is_none());
        let taken = inherited
            .take(Role::Ws, "127.0.0.1:0".parse().unwrap())
            .unwrap();
        assert_eq!(taken.local_addr().unwrap(), bound);
        // A connection made now may be accepted on either descriptor: the same socket.
        drop(listener);
        let _client = std::net::TcpStream::connect(bound).unwrap();
        assert!(taken.accept().is_ok());
        // Taken once only.
        assert!(inherited
            .take(Role::Ws, "127.0.0.1:0".parse().unwrap())
            .is_none());
        inherited.ready(vec![Role::Ws]).unwrap();
        match receive::<Answer>(&old).unwrap().0 {
            Answer::Ready { took, .. } => assert_eq!(took, [Role::Ws]),
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn an_unknown_version_is_refused_with_a_reason() {
        let (mut old, new) = UnixStream::pair().unwrap();
        let offer = Offer {
            version: VERSION + 1,
            old_pid: 7,
            listeners: Vec::new(),
            connections: None,
        };
        send(&mut old, &offer, &[]).unwrap();
        assert!(Inherited::receive(new).is_err());
        match receive::<Answer>(&old).unwrap().0 {
            Answer::Failed { reason, .. } => assert!(reason.contains("format 2"), "{reason}"),
            a => panic!("{a:?}"),
        }
    }
}
