//! Live connection handover in a binary upgrade (issue 23, second step).
//!
//! Once the new process accepts on the listening sockets ([`crate::upgrade`]), the old one
//! does not close its plain connections: each relay pauses at a frame boundary in both
//! directions ([`crate::relay::Paused`]: a frame in flight is finished first, within
//! [`crate::relay::PAUSE_WITHIN`]; no byte of the next one is read), and its two sockets go to
//! the new process over the same Unix socket (SCM_RIGHTS), with what the relay knew: the
//! parsers' state (a fragmented message in progress, a code point split between frames, the
//! counts), the bytes read but not forwarded (at most an incomplete frame header), the
//! connection's age and quiet time, the size limits, idle timeout and lifetime it was admitted
//! with, its API, product, subscription key and policy deadline (message rates are the new
//! manifest's). The new process resumes relaying on the same
//! sockets: the peers see no close, no lost or repeated byte, only a pause.
//!
//! What is not handed over is closed with 1012 (service restart), each at a random moment of
//! `upgrade_close_window` so its clients do not all reconnect at once: wss connections (the
//! TLS session's state stays in this process; kernel TLS could carry it and is not used yet); a
//! relay that does not reach a frame boundary in time gets its 1012 at once. A connection's
//! fleet slots go with it ([`crate::cluster::Fleet::adopt`]); with message policies a direction
//! pauses at a message boundary, and the new process judges what follows with its manifest's
//! policies and the handshake's context values.
//!
//! Each connection is one message with its two descriptors; `done` ends the stream and the new
//! process answers what it did with them. The format has its own number
//! ([`crate::upgrade::CONNECTION_FORMAT`]), offered by the old process and accepted by the new
//! one in the listener handover: a binary that does not read it is not sent connections.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::ParserState;
use crate::upgrade::{receive, send, UpgradeError};

/// How long the old process waits for the new one's summary after the last connection, and at
/// most for one connection to be taken by the channel (a new process that stopped reading
/// must not keep the old one from exiting).
const SUMMARY_WITHIN: Duration = Duration::from_secs(10);

/// Longest request target handed over: it is only logged, and a message has a size limit.
pub const MAX_TARGET: usize = 4096;

/// What the relays of a process being upgraded are told (read when shutdown wakes them).
#[derive(Debug, Default)]
pub struct Signal {
    /// This shutdown is a binary upgrade: connections not handed over are closed with 1012
    /// (service restart), spread over `window_ms`.
    pub upgrading: std::sync::atomic::AtomicBool,
    /// The new process takes live connections: a relay that can pauses instead.
    pub live: std::sync::atomic::AtomicBool,
    pub window_ms: std::sync::atomic::AtomicU64,
}

/// Whether this kernel offers kernel TLS (the `tls` upper-layer protocol), with which a wss
/// connection's session could be carried to the new process. Not used yet: wss connections
/// are drained with 1012; the `upgrade` record says whether this kernel would allow it.
pub fn kernel_tls() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|ulps| ulps.split_whitespace().any(|u| u == "tls"))
}

/// What became of a connection in an upgrade (the `path` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Paused and passed to the new process (old process's count).
    HandedOver,
    /// Closed with 1001 by the old process.
    Drained,
    /// Lost on the way (the channel failed).
    Failed,
    /// Taken over from the previous process (new process's count).
    Resumed,
    /// Taken over, then closed at once: its API or subscription key is gone.
    Closed,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::HandedOver => "handed_over",
            Path::Drained => "drained",
            Path::Failed => "failed",
            Path::Resumed => "resumed",
            Path::Closed => "closed",
        }
    }
}

/// The limits a connection was admitted with: they stay with it in the new process, whatever
/// its manifest says now (as they would across a reload).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandedLimits {
    pub max_frame_size: u64,
    pub max_message_size: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub max_connection_lifetime_ms: Option<u64>,
}

/// One connection as the old process hands it over; its client and backend sockets come with
/// it, in that order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandedConnection {
    /// Its number in the old process (the new one logs it next to its own).
    pub conn: u64,
    pub api: String,
    pub product: Option<String>,
    pub subscription: Option<String>,
    /// The digest of the subscription key it was admitted with (the new process finds the
    /// subscription, and the token a reload revokes the key by, from it). A SHA-256 digest,
    /// never the key; the channel is a socket pair between the two processes.
    pub key: Option<[u8; 32]>,
    pub client: SocketAddr,
    pub target: String,
    pub picked_backend: Option<String>,
    pub limits: HandedLimits,
    pub extensions_agreed: bool,
    /// Left of a policy's `close-at`.
    pub policy_deadline_ms: Option<u64>,
    pub age_ms: u64,
    /// Since the client, the backend last sent anything.
    pub quiet_ms: [u64; 2],
    pub client_to_backend: ParserState,
    pub backend_to_client: ParserState,
    /// Read from each side, not yet forwarded (an incomplete frame header).
    pub client_unforwarded: Vec<u8>,
    pub backend_unforwarded: Vec<u8>,
    /// The fleet things (`sub:<product>/<name>`, `api:<name>`) it holds slots of: the new
    /// process takes them under its own id as this one gives them back.
    #[serde(default)]
    pub fleet: Vec<String>,
    /// The handshake's context values, for the API's message policies (empty without them).
    #[serde(default)]
    pub context: Vec<(String, String)>,
}

/// Old process to new, after `ready`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum ToNew {
    Connection(Box<HandedConnection>),
    Done { handed: u64 },
}

/// The new process's last word: what it did with the connections.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Summary {
    pub resumed: u64,
    pub closed: u64,
}

/// A connection on its way: its description and its client and backend sockets.
pub type Outgoing = (Box<HandedConnection>, [OwnedFd; 2]);

/// The old process's side: relays that paused put their connections here; a thread writes
/// them to the channel in order.
#[derive(Clone)]
pub struct Outbox(std::sync::mpsc::Sender<Outgoing>);

impl Outbox {
    /// Queues a connection; `false` if the channel is gone (the sockets are then closed).
    pub fn send(&self, c: Outgoing) -> bool {
        self.0.send(c).is_ok()
    }
}

/// What the old process's writer did.
#[derive(Debug, Default)]
pub struct Sent {
    pub handed: u64,
    pub failed: u64,
    pub error: Option<String>,
    /// The new process's answer, if it came.
    pub summary: Option<Summary>,
}

/// Starts the writer on `channel`; it ends (and asks the new process for its summary) once
/// every [`Outbox`] is dropped.
pub fn start_sending(channel: UnixStream) -> (Outbox, std::thread::JoinHandle<Sent>) {
    let (tx, rx) = std::sync::mpsc::channel::<Outgoing>();
    let writer = std::thread::spawn(move || {
        let mut channel = channel;
        let _ = channel.set_write_timeout(Some(SUMMARY_WITHIN));
        let mut sent = Sent::default();
        for (c, fds) in rx {
            if sent.error.is_some() {
                // The channel broke: these connections end here, with a close to each side.
                sent.failed += 1;
                close_going_away(fds);
                continue;
            }
            let borrowed = [fds[0].as_fd(), fds[1].as_fd()];
            match send(&mut channel, &ToNew::Connection(c), &borrowed) {
                Ok(()) => sent.handed += 1,
                // This connection's description could not be made: only it is closed.
                Err(UpgradeError::Message(_)) => {
                    sent.failed += 1;
                    close_going_away(fds);
                }
                Err(e) => {
                    sent.failed += 1;
                    sent.error = Some(e.to_string());
                    close_going_away(fds);
                }
            }
        }
        if sent.error.is_none() {
            let done = ToNew::Done {
                handed: sent.handed,
            };
            let answer = send(&mut channel, &done, &[])
                .and_then(|()| {
                    channel
                        .set_read_timeout(Some(SUMMARY_WITHIN))
                        .map_err(UpgradeError::Channel)
                })
                .and_then(|()| receive::<Summary>(&channel));
            match answer {
                Ok((s, _)) => sent.summary = Some(s),
                Err(e) => sent.error = Some(e.to_string()),
            }
        }
        sent
    });
    (Outbox(tx), writer)
}

/// What the new process reads from the channel.
pub enum Incoming {
    Connection(Box<HandedConnection>, Vec<OwnedFd>),
    /// No more connections: answer with the summary on this channel.
    Done {
        handed: u64,
        channel: UnixStream,
    },
    /// The channel failed before `done`.
    Broken(String),
}

/// The new process's side: a thread reads connections from `channel` as they come and passes
/// them on, until `done` (or the channel fails).
pub fn start_receiving(channel: UnixStream) -> tokio::sync::mpsc::UnboundedReceiver<Incoming> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || loop {
        match receive::<ToNew>(&channel) {
            Ok((ToNew::Connection(c), fds)) => {
                if tx.send(Incoming::Connection(c, fds)).is_err() {
                    return;
                }
            }
            Ok((ToNew::Done { handed }, _)) => {
                let _ = tx.send(Incoming::Done { handed, channel });
                return;
            }
            Err(e) => {
                let _ = tx.send(Incoming::Broken(e.to_string()));
                return;
            }
        }
    });
    rx
}

/// Ends a paused connection that cannot be handed over: both sides are at a frame boundary, so
/// each gets a close (1012, service restart, to the client; 1001 to the backend) before its
/// socket is closed. Best effort and never blocking (the
/// sockets are non-blocking): a peer that is not reading just sees the connection end.
pub fn close_going_away(fds: [OwnedFd; 2]) {
    use crate::frame::{close_frame, Direction};
    use std::io::Write;
    let [client, backend] = fds;
    let reason = "gateway restarting";
    let _ = std::net::TcpStream::from(client).write(&close_frame(
        Direction::BackendToClient,
        crate::frame::close_code::SERVICE_RESTART,
        reason,
    ));
    let _ = std::net::TcpStream::from(backend).write(&close_frame(
        Direction::ClientToBackend,
        1001,
        reason,
    ));
}

/// Answers the old process (blocking; the last message on the channel).
pub fn answer(mut channel: UnixStream, summary: Summary) -> Result<(), UpgradeError> {
    send(&mut channel, &summary, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DirStats;
    use std::io::{Read, Write};

    fn connection(conn: u64) -> Box<HandedConnection> {
        let state = ParserState {
            message: None,
            message_len: 0,
            utf8_carry: Vec::new(),
            dropping: None,
            stats: DirStats::default(),
        };
        Box::new(HandedConnection {
            conn,
            api: "echo".into(),
            product: None,
            subscription: None,
            key: Some([7; 32]),
            client: "127.0.0.1:1".parse().unwrap(),
            target: "/".into(),
            picked_backend: None,
            limits: HandedLimits {
                max_frame_size: 1 << 20,
                max_message_size: None,
                idle_timeout_ms: None,
                max_connection_lifetime_ms: None,
            },
            extensions_agreed: false,
            policy_deadline_ms: None,
            age_ms: 5,
            quiet_ms: [1, 2],
            client_to_backend: state.clone(),
            backend_to_client: state,
            client_unforwarded: vec![0x81],
            backend_unforwarded: Vec::new(),
            fleet: Vec::new(),
            context: Vec::new(),
        })
    }

    /// Many connections back to back, each with its own two sockets: every message arrives
    /// with exactly its descriptors, in order, and the summary goes back.
    #[test]
    fn connections_cross_the_channel_with_their_sockets() {
        let (old, new) = UnixStream::pair().unwrap();
        let (outbox, writer) = start_sending(old);
        let mut peers = Vec::new();
        for n in 0..50u64 {
            let (a, a_peer) = UnixStream::pair().unwrap();
            let (b, b_peer) = UnixStream::pair().unwrap();
            peers.push((a_peer, b_peer));
            assert!(outbox.send((connection(n), [a.into(), b.into()])));
        }
        drop(outbox);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut rx = start_receiving(new);
        let mut got = 0u64;
        let channel = loop {
            match rt.block_on(rx.recv()).unwrap() {
                Incoming::Connection(c, fds) => {
                    assert_eq!(c.conn, got);
                    assert_eq!(c.key, Some([7; 32]));
                    assert_eq!(fds.len(), 2);
                    // The descriptors are the sockets sent: a byte written on one reaches
                    // that connection's peer.
                    let (a_peer, b_peer) = &mut peers[got as usize];
                    let mut a = UnixStream::from(fds.into_iter().next().unwrap());
                    a.write_all(&[got as u8]).unwrap();
                    let mut byte = [0u8];
                    a_peer.read_exact(&mut byte).unwrap();
                    assert_eq!(byte[0], got as u8);
                    let _ = b_peer;
                    got += 1;
                }
                Incoming::Done { handed, channel } => {
                    assert_eq!(handed, 50);
                    break channel;
                }
                Incoming::Broken(e) => panic!("{e}"),
            }
        };
        assert_eq!(got, 50);
        answer(
            channel,
            Summary {
                resumed: 49,
                closed: 1,
            },
        )
        .unwrap();
        let sent = writer.join().unwrap();
        assert_eq!((sent.handed, sent.failed), (50, 0));
        assert!(sent.error.is_none(), "{:?}", sent.error);
        let summary = sent.summary.unwrap();
        assert_eq!((summary.resumed, summary.closed), (49, 1));
    }
}
