//! The relay: after the 101 pair, frames flow both ways between one client and one backend
//! connection until either side closes.
//!
//! One task drives both directions (like tokio's `copy_bidirectional`), so a connection costs a
//! single task. Each direction is a [`Pump`] that reads into a buffer it allocates only while
//! bytes are moving and frees as soon as the socket has nothing more to give: an idle connection
//! holds no read buffers at all, which is what keeps memory per idle connection small.
//!
//! Bytes are forwarded verbatim (see [`crate::frame`]); the gateway only injects frames of its own
//! (close frames) at frame boundaries, and, for a message a policy replaced, the replacement.
//!
//! An API with message policies (`[[apis.on_message]]`) gets an [`Inspector`] on each direction
//! a policy watches: data messages are held whole ([`tollgate_edge::assemble`]) and judged
//! before anything of them goes on; control frames pass at once. Without message policies the
//! pump streams as above and pays nothing for the feature.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::frame::{
    close_code, close_frame, Advance, DirStats, Direction, Event, FrameParser, ParserState,
    SharedRate, SizeLimit,
};
use crate::manifest::{ConnLimits, RateSpec};
use crate::metrics::{ApiMetrics, DirCounters};
use crate::policy::message::{judge, Connection, Judged, MessageStep, Sender};
use crate::stream::Stream;
use crate::watch::{Happened, Watch, WatchEvent};
use tollgate_edge::assemble::{data_frames, Assembler, Fed};
use tollgate_edge::rate::{MessageRate, RateLimit};

/// Bytes read per system call while a direction is busy.
const BUF_SIZE: usize = 32 * 1024;

/// Messages a direction's policies judge in one poll before the connection's task yields: a
/// read full of tiny messages must not keep other connections of the worker waiting for
/// thousands of policy calls.
const MAX_VERDICTS_PER_POLL: u32 = 64;

/// The same in time: a call under a policy's first CPU-time tick does not yield on its own, so
/// after this long of judging the task yields too.
const MAX_JUDGING_PER_POLL: Duration = Duration::from_millis(1);

/// Judged messages queued for `dst` beyond which they are written before more are judged (64
/// replacements of a megabyte each would otherwise sit in memory at once).
const OUT_HIGH_WATER: usize = 4 * BUF_SIZE;

/// How long to wait for the other side's close reply (or for our own close frames to be written)
/// before the sockets are simply closed.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long a relay asked to pause for a binary upgrade may take to reach a frame boundary in
/// both directions (a frame in flight is finished first); after that it closes with 1001 as on
/// shutdown.
pub const PAUSE_WITHIN: Duration = Duration::from_secs(2);

/// After a client's protocol violation, how long the backend gets to answer the gateway's close
/// before the client gets its own.
pub const CLIENT_VIOLATION_GRACE: Duration = Duration::from_secs(1);

/// Read buffers of busy connections, recycled per worker thread. A connection holds one only
/// while bytes are moving; taking it from here instead of malloc saves an allocation and a free
/// of BUF_SIZE bytes per wake-up (glibc consolidates on such frees), which shows in the CPU cost
/// per small message and per handshake.
mod pool {
    use super::BUF_SIZE;
    use std::cell::RefCell;

    /// Buffers kept per thread; beyond that they go back to the allocator.
    const KEEP: usize = 32;

    thread_local! {
        static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take() -> Vec<u8> {
        FREE.with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
    }

    pub fn give(mut v: Vec<u8>) {
        if v.capacity() != BUF_SIZE {
            return;
        }
        v.clear();
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(v);
            }
        });
    }
}

/// Who ended the connection, for the per-connection log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    /// A close frame from the client started the closing handshake.
    Client,
    /// A close frame from the backend started the closing handshake.
    Backend,
    /// The client's TCP connection ended without a close frame.
    ClientDropped,
    /// The backend's TCP connection ended without a close frame.
    BackendDropped,
    /// The client broke the protocol or a size limit.
    ClientViolation,
    /// The backend broke the protocol or a size limit.
    BackendViolation,
    IdleTimeout,
    /// The API's `max_connection_lifetime` was reached.
    Lifetime,
    /// The deadline a policy set (`close-at`, e.g. the token's expiry) was reached.
    PolicyDeadline,
    /// A reload removed the subscription key the connection was admitted with.
    Revoked,
    Shutdown,
    /// A message policy closed the connection (`close`).
    MessagePolicy,
    /// A message policy failed (trap, CPU time, deadline, an error or a decision it may not
    /// make): 1011.
    MessagePolicyError,
}

impl ClosedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Backend => "backend",
            ClosedBy::ClientDropped => "client_dropped",
            ClosedBy::BackendDropped => "backend_dropped",
            ClosedBy::ClientViolation => "client_violation",
            ClosedBy::BackendViolation => "backend_violation",
            ClosedBy::IdleTimeout => "idle_timeout",
            ClosedBy::Lifetime => "max_connection_lifetime",
            ClosedBy::PolicyDeadline => "policy_deadline",
            ClosedBy::Revoked => "subscription_revoked",
            ClosedBy::Shutdown => "gateway_shutdown",
            ClosedBy::MessagePolicy => "message_policy",
            ClosedBy::MessagePolicyError => "message_policy_error",
        }
    }
}

/// What the relay reports when the connection pair is gone.
#[derive(Debug, Clone)]
pub struct RelayOutcome {
    pub client_to_backend: DirStats,
    pub backend_to_client: DirStats,
    pub closed_by: ClosedBy,
    /// The first close code that was sent or forwarded, if any.
    pub close_code: Option<u16>,
    pub close_reason: String,
    /// The size limit whose violation ended the connection (the first violation, as logged).
    pub limit: Option<SizeLimit>,
    pub duration: Duration,
}

#[derive(Debug)]
enum PumpEvent {
    Close {
        code: Option<u16>,
        reason: String,
    },
    Violation {
        code: u16,
        reason: &'static str,
        limit: Option<SizeLimit>,
    },
    SrcGone,
    DstGone,
    /// A close frame of the gateway's own has been written out.
    Injected,
    /// A message policy closed the connection or failed ([`Judged::Close`],
    /// [`Judged::Failed`]).
    MessagePolicy(Judged),
    /// Pausing for a binary upgrade: everything read is forwarded up to a frame boundary, and
    /// nothing more is read.
    Paused,
}

/// What the relay needs to run an API's message policies on a connection.
pub struct Inspection {
    pub steps: Arc<[MessageStep]>,
    pub connection: Arc<Connection>,
    /// `max_inspected_message_size` (and `max_message_size` when smaller): the largest message
    /// held, and the largest replacement.
    pub max_size: usize,
    /// `max_frame_size`: a longer replacement goes in fragments.
    pub max_frame: usize,
}

/// A verdict on its way: the held message's fate, decided by the policies on the connection's
/// own task (the call is bounded by the policies' CPU time and deadline).
type Verdict = Pin<Box<dyn Future<Output = Judged> + Send>>;

/// Holds one direction's data messages whole until the message policies have judged them.
struct Inspector {
    assembler: Assembler,
    dir: Direction,
    sender: Sender,
    steps: Arc<[MessageStep]>,
    connection: Arc<Connection>,
    max_size: usize,
    max_frame: usize,
    /// The judged message's frames as they came (forwarded as they are if no policy changed
    /// it), and whether it is text.
    raw: Vec<u8>,
    text: bool,
    verdict: Option<Verdict>,
    /// Frames to write to `dst`: control frames, judged messages.
    out: Vec<u8>,
    out_pos: usize,
    /// The console's watch of this connection, if it is one.
    watch: Option<Arc<Watch>>,
    /// Messages judged so far, and the size of the one being judged (for the watch).
    judged: u64,
    held_len: usize,
}

impl Inspector {
    fn new(dir: Direction, i: &Inspection, watch: Option<Arc<Watch>>) -> Inspector {
        Inspector {
            assembler: Assembler::new(i.max_size),
            dir,
            sender: match dir {
                Direction::ClientToBackend => Sender::Client,
                Direction::BackendToClient => Sender::Backend,
            },
            steps: i.steps.clone(),
            connection: i.connection.clone(),
            max_size: i.max_size,
            max_frame: i.max_frame,
            raw: Vec::new(),
            text: false,
            verdict: None,
            out: Vec::new(),
            out_pos: 0,
            watch,
            judged: 0,
            held_len: 0,
        }
    }

    fn idle(&self) -> bool {
        self.out_pos == self.out.len() && self.verdict.is_none()
    }

    /// Tells the console what the policies did to a watched connection's message.
    fn tell(&self, watch: &Watch, judged: &Judged) {
        let sender = self.sender.as_str();
        let e = |happened, by| WatchEvent {
            message: Some(self.judged),
            bytes: Some(self.held_len),
            ..WatchEvent::new(sender, happened, by)
        };
        watch.record(match judged {
            Judged::Forward => return,
            Judged::Drop { plugin } => e(Happened::Dropped, plugin),
            Judged::Replace { plugin, payload } => WatchEvent {
                replaced_bytes: Some(payload.len()),
                ..e(Happened::Replaced, plugin)
            },
            Judged::Close {
                plugin,
                code,
                reason,
            } => WatchEvent {
                code: Some(*code),
                text: Some(reason),
                ..e(Happened::Closed, plugin)
            },
            Judged::Failed { plugin, error } => WatchEvent {
                text: Some(error),
                ..e(Happened::Failed, plugin)
            },
        });
    }

    /// Starts judging the message the assembler holds.
    fn judge(&mut self) {
        let held = self.assembler.take();
        self.judged += 1;
        self.held_len = held.payload.len();
        self.raw = held.raw;
        self.text = held.text;
        let (steps, connection) = (self.steps.clone(), self.connection.clone());
        let (sender, text, max) = (self.sender, held.text, self.max_size);
        self.verdict = Some(Box::pin(async move {
            judge(&steps, &connection, sender, text, held.payload, max).await
        }));
    }

    /// Applies a verdict: the message's frames, a replacement, or nothing go out; a close or a
    /// failure is for the relay.
    fn apply(&mut self, judged: Judged) -> Option<PumpEvent> {
        let raw = std::mem::take(&mut self.raw);
        if let Some(watch) = &self.watch {
            self.tell(watch, &judged);
        }
        match judged {
            Judged::Forward => {
                if self.out.is_empty() {
                    self.out = raw;
                } else {
                    self.out.extend_from_slice(&raw);
                }
                None
            }
            Judged::Replace { payload, .. } => {
                let (dir, text, max_frame) = (self.dir, self.text, self.max_frame);
                data_frames(dir, text, &payload, max_frame, rand::random, &mut self.out);
                None
            }
            Judged::Drop { .. } => None,
            j @ (Judged::Close { .. } | Judged::Failed { .. }) => Some(PumpEvent::MessagePolicy(j)),
        }
    }
}

/// One direction: reads frames from `src`, writes them to `dst`.
struct Pump {
    parser: FrameParser,
    /// Valid bytes are `buf[start..]`; `buf[start..fwd]` may be written, `buf[fwd..]` is an
    /// incomplete frame header waiting for more bytes. Capacity 0 while idle.
    buf: Vec<u8>,
    start: usize,
    fwd: usize,
    inject: Vec<u8>,
    inject_pos: usize,
    /// A close frame has been sent to `dst`, or is on its way (forwarded or injected):
    /// everything else that arrives from `src` is read and discarded.
    out_closed: bool,
    /// A close frame came from `src`: nothing more is read.
    in_closed: bool,
    src_gone: bool,
    dst_gone: bool,
    stopped: bool,
    need_flush: bool,
    pending: Option<PumpEvent>,
    last_read: Instant,
    /// What of `parser.stats` the metrics have seen.
    published: DirStats,
    /// The gateway closed `dst`'s side (or found it could not): nothing more goes there.
    gateway_closed: bool,
    /// With message policies on this direction.
    inspect: Option<Box<Inspector>>,
    /// The console's watch (with whose messages this direction carries), and the rate drops
    /// it has been told of (over messages, over bytes).
    watch: Option<(Arc<Watch>, &'static str)>,
    watch_seen: (u64, u64),
    /// A binary upgrade asked the relay to pause: the frame being read is finished (and no
    /// byte of the next one read), then the pump stops at the boundary (`paused`).
    pausing: bool,
    paused: bool,
}

impl Pump {
    fn new(parser: FrameParser, prefix: Bytes) -> Self {
        let mut p = Pump {
            parser,
            buf: Vec::new(),
            start: 0,
            fwd: 0,
            inject: Vec::new(),
            inject_pos: 0,
            out_closed: false,
            in_closed: false,
            src_gone: false,
            dst_gone: false,
            stopped: false,
            need_flush: false,
            pending: None,
            last_read: Instant::now(),
            published: DirStats::default(),
            gateway_closed: false,
            inspect: None,
            watch: None,
            watch_seen: (0, 0),
            pausing: false,
            paused: false,
        };
        // Counts a resumed connection brought along are not this process's to publish.
        p.published = p.parser.stats;
        if !prefix.is_empty() {
            // Bytes the peer sent right behind its handshake, read with its head.
            p.buf.reserve(BUF_SIZE.max(prefix.len()));
            p.buf.extend_from_slice(&prefix);
            p.observe();
        }
        p
    }

    /// Goes on relaying after a pause that did not end in a handover.
    fn unpause(&mut self) {
        self.pausing = false;
        self.paused = false;
    }

    /// Reads at most the rest of the frame being read (a pause must not read into the next
    /// one: those bytes would be this process's to forward).
    fn poll_read_frame_rest(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Stream,
        left: u64,
    ) -> Poll<std::io::Result<usize>> {
        let spare = self.buf.spare_capacity_mut();
        let n = spare.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let mut rb = tokio::io::ReadBuf::uninit(&mut spare[..n]);
        match Pin::new(src).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let got = rb.filled().len();
                // SAFETY: `got` bytes of the spare capacity were initialised by the read.
                unsafe { self.buf.set_len(self.buf.len() + got) };
                Poll::Ready(Ok(got))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// True once nothing more will come from `src`.
    fn input_done(&self) -> bool {
        self.in_closed || self.src_gone || self.stopped
    }

    fn output_idle(&self) -> bool {
        self.dst_gone
            || (self.start == self.fwd
                && self.inject_pos == self.inject.len()
                && self.inspect.as_ref().is_none_or(|i| i.idle()))
    }

    /// Nothing more may be forwarded to `dst`.
    fn discarding(&self) -> bool {
        match self.inspect {
            // A close from `src` is held in the buffer until the messages before it are judged.
            Some(_) => self.dst_gone || self.gateway_closed,
            None => self.out_closed || self.dst_gone,
        }
    }

    /// Queues a close frame of the gateway's own towards `dst`, if a frame may go there now.
    fn queue_close(&mut self, dir: Direction, code: u16, reason: &str) -> bool {
        if self.out_closed || self.dst_gone {
            return false;
        }
        self.out_closed = true;
        self.gateway_closed = true;
        // An inspected direction only ever writes whole frames.
        if self.inspect.is_none() && !self.parser.at_boundary() {
            // Mid-frame towards dst: a frame cannot be inserted; the socket is just closed.
            return false;
        }
        self.inject = close_frame(dir, code, reason);
        self.inject_pos = 0;
        true
    }

    /// Tells the console of messages a rate dropped since it was last told.
    fn tell_drops(&mut self) {
        let Some((watch, sender)) = &self.watch else {
            return;
        };
        let s = &self.parser.stats;
        for (now, seen, limit) in [
            (
                s.dropped_over_messages,
                &mut self.watch_seen.0,
                RateLimit::MessagesPerSecond,
            ),
            (
                s.dropped_over_bytes,
                &mut self.watch_seen.1,
                RateLimit::BytesPerSecond,
            ),
        ] {
            if now > *seen {
                watch.record(WatchEvent {
                    count: Some(now - *seen),
                    ..WatchEvent::new(sender, Happened::OverRate, limit.key())
                });
                *seen = now;
            }
        }
    }

    /// Runs the parser over newly read bytes.
    fn observe(&mut self) {
        let first = self.parser.advance(&self.buf[self.fwd..]);
        let (new_fwd, event) = if first.discard == 0 {
            (self.fwd + first.forward, first.event)
        } else {
            self.cut_dropped(first)
        };
        let discard = self.discarding();
        self.fwd = new_fwd;
        if discard {
            self.start = new_fwd;
        }
        self.tell_drops();
        match event {
            None => {}
            Some(Event::Close { code, reason }) => {
                self.in_closed = true;
                // Inspected, the close waits in the buffer behind the messages before it, and
                // is on its way to dst only once it is fed to the output (see `poll`).
                if self.inspect.is_none() {
                    self.out_closed = true;
                }
                self.buf.truncate(new_fwd);
                self.pending = Some(PumpEvent::Close { code, reason });
            }
            Some(Event::Violation {
                code,
                reason,
                limit,
            }) => {
                self.stopped = true;
                self.buf.truncate(new_fwd);
                self.pending = Some(PumpEvent::Violation {
                    code,
                    reason,
                    limit,
                });
            }
        }
    }

    /// A dropped message's bytes (a message rate with `drop`) are cut out of the buffer while
    /// the parser goes on with what follows them: the kept bytes are moved down over the
    /// dropped ones in one pass, so a read full of tiny dropped frames costs one copy of the
    /// read, not one per frame. Returns where the forwardable bytes end, and the event.
    fn cut_dropped(&mut self, first: Advance) -> (usize, Option<Event>) {
        let mut kept = self.fwd + first.forward;
        let mut read = kept + first.discard;
        let mut event = first.event;
        while event.is_none() && read < self.buf.len() {
            let a = self.parser.advance(&self.buf[read..]);
            self.buf.copy_within(read..read + a.forward, kept);
            kept += a.forward;
            read += a.forward + a.discard;
            event = a.event;
            if a.discard == 0 {
                break;
            }
        }
        // What is left (an incomplete header, or what follows an event) moves down too.
        self.buf.copy_within(read.., kept);
        let len = self.buf.len() - (read - kept);
        self.buf.truncate(len);
        (kept, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Stream,
        dst: &mut Stream,
        counters: &DirCounters,
    ) -> Poll<PumpEvent> {
        if self.paused {
            return Poll::Pending;
        }
        // Verdicts applied in this poll, and when the first was (see MAX_VERDICTS_PER_POLL).
        let mut judged = 0;
        let mut poll_started: Option<std::time::Instant> = None;
        loop {
            if self.dst_gone {
                self.start = self.fwd;
                self.inject_pos = self.inject.len();
                if let Some(i) = self.inspect.as_deref_mut() {
                    i.out_pos = i.out.len();
                }
            }
            if let Some(i) = self.inspect.as_deref_mut() {
                while i.out_pos < i.out.len() {
                    match Pin::new(&mut *dst).poll_write(cx, &i.out[i.out_pos..]) {
                        Poll::Ready(Ok(n)) if n > 0 => {
                            i.out_pos += n;
                            self.need_flush = true;
                        }
                        Poll::Ready(_) => {
                            self.dst_gone = true;
                            return Poll::Ready(PumpEvent::DstGone);
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
                if !i.out.is_empty() {
                    i.out_pos = 0;
                    // An idle connection holds no buffers: a message's frames go with it.
                    if i.out.capacity() > 1024 {
                        i.out = Vec::new();
                    } else {
                        i.out.clear();
                    }
                }
            }
            while self.start < self.fwd && self.inspect.is_none() {
                match Pin::new(&mut *dst).poll_write(cx, &self.buf[self.start..self.fwd]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.start += n;
                        self.need_flush = true;
                    }
                    Poll::Ready(_) => {
                        self.dst_gone = true;
                        return Poll::Ready(PumpEvent::DstGone);
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            while self.inject_pos < self.inject.len() {
                match Pin::new(&mut *dst).poll_write(cx, &self.inject[self.inject_pos..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.inject_pos += n;
                        self.need_flush = true;
                        if self.inject_pos == self.inject.len() {
                            self.pending.get_or_insert(PumpEvent::Injected);
                        }
                    }
                    Poll::Ready(_) => {
                        self.dst_gone = true;
                        return Poll::Ready(PumpEvent::DstGone);
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.need_flush {
                match Pin::new(&mut *dst).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.need_flush = false,
                    Poll::Ready(Err(_)) => {
                        self.dst_gone = true;
                        return Poll::Ready(PumpEvent::DstGone);
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if let Some(i) = self.inspect.as_deref_mut() {
                if self.dst_gone || self.gateway_closed {
                    // Nothing more goes to dst: what is held or being judged is let go.
                    i.verdict = None;
                    i.raw = Vec::new();
                    i.assembler.reset();
                    self.start = self.fwd;
                } else {
                    // Judges what was read, message after message, while verdicts come at
                    // once (a warm instance's call never waits), so a read's worth of
                    // messages goes out in one write, as it would without policies.
                    let mut waiting = false;
                    let mut yielding = false;
                    loop {
                        // Written before more is judged: what one poll queues stays small.
                        if i.out.len() - i.out_pos >= OUT_HIGH_WATER {
                            break;
                        }
                        if judged >= MAX_VERDICTS_PER_POLL
                            || poll_started.is_some_and(|t| t.elapsed() >= MAX_JUDGING_PER_POLL)
                        {
                            yielding = true;
                            break;
                        }
                        if let Some(v) = i.verdict.as_mut() {
                            let Poll::Ready(verdict) = v.as_mut().poll(cx) else {
                                // Nothing more is read while a message is judged.
                                waiting = true;
                                break;
                            };
                            i.verdict = None;
                            judged += 1;
                            poll_started.get_or_insert_with(std::time::Instant::now);
                            if let Some(ev) = i.apply(verdict) {
                                // The connection ends on the policy's word. What followed the
                                // message is not forwarded, a close or a violation the sender
                                // sent after it included: the gateway's own close goes instead.
                                self.stopped = true;
                                self.start = self.fwd;
                                self.pending = None;
                                return Poll::Ready(ev);
                            }
                        }
                        if self.start == self.fwd {
                            break;
                        }
                        let (n, fed) = i
                            .assembler
                            .feed(&self.buf[self.start..self.fwd], &mut i.out);
                        self.start += n;
                        match fed {
                            Fed::More => {
                                if self.in_closed && self.start == self.fwd {
                                    // The sender's close was the last frame: now in the output.
                                    self.out_closed = true;
                                }
                                break;
                            }
                            Fed::Message => i.judge(),
                            Fed::TooBig => {
                                self.stopped = true;
                                self.start = self.fwd;
                                self.pending = None;
                                let limit = SizeLimit::MaxInspectedMessageSize;
                                return Poll::Ready(PumpEvent::Violation {
                                    code: close_code::TOO_BIG,
                                    reason: limit.reason(),
                                    limit: Some(limit),
                                });
                            }
                        }
                    }
                    if i.out_pos < i.out.len() {
                        continue;
                    }
                    if yielding {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    if waiting {
                        return Poll::Pending;
                    }
                }
            }
            if let Some(ev) = self.pending.take() {
                return Poll::Ready(ev);
            }
            if self.input_done() {
                pool::give(std::mem::take(&mut self.buf));
                return Poll::Pending;
            }
            // Everything forwarded: keep only an incomplete header, at the front.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.fwd -= self.start;
                self.start = 0;
            }
            if self.buf.capacity() == 0 {
                self.buf = pool::take();
            } else if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(BUF_SIZE);
            }
            let read = if self.pausing {
                // Everything read is forwarded and flushed (above), or with message policies
                // judged and written. At a frame boundary the pump stops (inspected: at a
                // message boundary, nothing held or being judged); inside a frame it reads the
                // frame's rest and no more; between the frames of a held message, the next
                // header a byte at a time, so no byte past it is read.
                let held = self
                    .inspect
                    .as_ref()
                    .is_some_and(|i| !i.idle() || i.assembler.holding());
                match self.parser.payload_left() {
                    None if !held => {
                        self.paused = true;
                        return Poll::Ready(PumpEvent::Paused);
                    }
                    None => self.poll_read_frame_rest(cx, src, 1),
                    Some(left) => self.poll_read_frame_rest(cx, src, left),
                }
            } else {
                tokio_util::io::poll_read_buf(Pin::new(&mut *src), cx, &mut self.buf)
            };
            match read {
                Poll::Pending => {
                    if self.buf.is_empty() {
                        // Idle: give the buffer back.
                        pool::give(std::mem::take(&mut self.buf));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    self.src_gone = true;
                    return Poll::Ready(PumpEvent::SrcGone);
                }
                Poll::Ready(Ok(_)) => {
                    self.last_read = Instant::now();
                    self.observe();
                    counters.add(&self.parser.stats, &mut self.published);
                }
            }
        }
    }
}

async fn shutdown_tls(s: &mut Stream) {
    if !matches!(s, Stream::Tcp(_)) {
        let _ = s.shutdown().await;
    }
}

/// Limits and signals for one relayed connection.
pub struct RelayParams {
    pub limits: ConnLimits,
    /// The gateway's shutdown token.
    pub shutdown: CancellationToken,
    /// Ends the connection: the shutdown token itself, or for a connection admitted with a
    /// subscription key, that key's token (a child of it, cancelled when a reload revokes the
    /// key). One token to wait on keeps the relay's state small; which of the two fired is
    /// told by whether `shutdown` is cancelled.
    pub end: CancellationToken,
    /// The API's counters, updated as frames go by.
    pub metrics: Arc<ApiMetrics>,
    /// The 101 agreed an extension, so frames may carry RSV bits.
    pub extensions_agreed: bool,
    /// When a policy asked for the connection to end (`close-at`): the client then gets close
    /// 1008 (policy violation), the backend 1001.
    pub policy_deadline: Option<Instant>,
    /// Message rates of this connection's own (`per = "connection"`: the API's, the
    /// product's), for the client's messages and the backend's.
    pub own_rates: [Vec<RateSpec>; 2],
    /// Message buckets shared with the other connections of the subscription
    /// (`per = "subscription"`: the API's, then the product's), the same way.
    pub shared_rates: [Vec<SharedRate>; 2],
    /// The API's message policies, when it has any.
    pub inspection: Option<Inspection>,
    /// The web console's watch, when the console opened this connection.
    pub watch: Option<Arc<Watch>>,
    /// Set by a binary upgrade before the drain: on shutdown, a connection that can be handed
    /// over (`handable`: plain TCP on both sides, see [`crate::handover`]) pauses at a frame
    /// boundary (with message policies, a message boundary) instead of closing; any other is
    /// closed with 1012 at a random moment within the upgrade's window.
    pub upgrade: Option<Arc<crate::handover::Signal>>,
    pub handable: bool,
    /// A connection handed over by the previous process: where its parsers were, how old it
    /// is and how long each side has been quiet.
    pub resume: Option<Resume>,
}

/// Where a relay paused for a handover goes on (see [`Paused`]).
#[derive(Debug, Clone)]
pub struct Resume {
    pub client_to_backend: ParserState,
    pub backend_to_client: ParserState,
    /// The connection's age (its lifetime limit and the duration logged count from its 101).
    pub age: Duration,
    /// Since each side last sent anything (client, backend): the idle timeout goes on.
    pub quiet: [Duration; 2],
}

/// A relay that paused for a binary upgrade: both directions at a frame boundary, everything
/// read forwarded except an incomplete frame header (`*_unforwarded`), the sockets intact.
pub struct Paused {
    pub client: Stream,
    pub backend: Stream,
    pub client_unforwarded: Vec<u8>,
    pub backend_unforwarded: Vec<u8>,
    pub resume: Resume,
    /// The counts so far (also in `resume`), for the record of the handover.
    pub client_to_backend: DirStats,
    pub backend_to_client: DirStats,
}

/// How a relay ended: the connection closed, or it paused to be handed over.
// Made once per connection and taken apart at once: boxing the common case would cost an
// allocation per connection for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Relayed {
    Ended(RelayOutcome),
    Paused(Box<Paused>),
}

enum Wake {
    C2b(PumpEvent),
    B2c(PumpEvent),
    Timer,
    Shutdown,
}

/// Relays frames between `client` and `backend` until the connection pair ends. The prefixes
/// are bytes each peer sent right after its handshake (or before its 101), read with its head.
pub async fn relay(
    mut client: Stream,
    client_prefix: Bytes,
    mut backend: Stream,
    backend_prefix: Bytes,
    params: RelayParams,
) -> Relayed {
    let now = Instant::now();
    let started = params
        .resume
        .as_ref()
        .and_then(|r| now.checked_sub(r.age))
        .unwrap_or(now);
    let limits = &params.limits;
    let metrics = &*params.metrics;
    metrics.active.inc();
    let rates = |specs: &[RateSpec]| {
        let now = std::time::Instant::now();
        specs
            .iter()
            .map(|s| MessageRate::new(s, now))
            .collect::<Vec<_>>()
    };
    let [client_own, backend_own] = &params.own_rates;
    let [client_shared, backend_shared] = params.shared_rates.clone();
    let parser = |dir, own: &[RateSpec], shared, state: Option<&ParserState>| {
        let p = FrameParser::new(dir, limits.max_frame_size, limits.max_message_size)
            .with_extensions(params.extensions_agreed)
            .with_message_rates(rates(own), shared);
        match state {
            None => (p, None),
            Some(state) => match p.resume(state.clone()) {
                Ok(p) => (p, None),
                // Not a state the previous process could have sent: the connection is
                // closed (1011) at once rather than relayed out of step.
                Err(_) => {
                    let limits = params.limits.max_frame_size;
                    (
                        FrameParser::new(dir, limits, None),
                        Some(PumpEvent::Violation {
                            code: close_code::INTERNAL_ERROR,
                            reason: "connection state lost in a binary upgrade",
                            limit: None,
                        }),
                    )
                }
            },
        }
    };
    let resume = params.resume.as_ref();
    let (c2b_parser, c2b_bad) = parser(
        Direction::ClientToBackend,
        client_own,
        client_shared,
        resume.map(|r| &r.client_to_backend),
    );
    let (b2c_parser, b2c_bad) = parser(
        Direction::BackendToClient,
        backend_own,
        backend_shared,
        resume.map(|r| &r.backend_to_client),
    );
    let mut c2b = Pump::new(c2b_parser, client_prefix);
    let mut b2c = Pump::new(b2c_parser, backend_prefix);
    for (pump, bad) in [(&mut c2b, c2b_bad), (&mut b2c, b2c_bad)] {
        if bad.is_some() {
            pump.stopped = true;
            pump.pending = bad;
        }
    }
    if let Some(r) = resume {
        c2b.last_read = now.checked_sub(r.quiet[0]).unwrap_or(now);
        b2c.last_read = now.checked_sub(r.quiet[1]).unwrap_or(now);
    }
    if let Some(w) = &params.watch {
        c2b.watch = Some((w.clone(), Sender::Client.as_str()));
        b2c.watch = Some((w.clone(), Sender::Backend.as_str()));
    }
    if let Some(i) = &params.inspection {
        let watched = |s: Sender| i.steps.iter().any(|step| step.watches.sees(s));
        if watched(Sender::Client) {
            c2b.inspect = Some(Box::new(Inspector::new(
                Direction::ClientToBackend,
                i,
                params.watch.clone(),
            )));
        }
        if watched(Sender::Backend) {
            b2c.inspect = Some(Box::new(Inspector::new(
                Direction::BackendToClient,
                i,
                params.watch.clone(),
            )));
        }
    }
    let far = Duration::from_secs(86400 * 365);
    let idle = limits.idle_timeout;
    // One timer serves the idle timeout, the lifetime and a policy's deadline: it is set to
    // whichever comes first.
    let lifetime_end = limits.max_connection_lifetime.map(|l| started + l);
    let policy_end = params.policy_deadline;
    let hard_end = match (lifetime_end, policy_end) {
        (Some(l), Some(p)) => Some(l.min(p)),
        (l, p) => l.or(p),
    };
    let next_deadline = |last_read: Instant| {
        let idle_end = idle.map_or(Instant::now() + far, |i| last_read + i);
        hard_end.map_or(idle_end, |l| l.min(idle_end))
    };
    let mut sleep = pin!(tokio::time::sleep_until(next_deadline(
        c2b.last_read.max(b2c.last_read)
    )));
    let end = params.end.clone();
    let mut shutdown_fut = pin!(end.cancelled());
    let mut shutdown_seen = false;
    let mut closing = false;
    let mut closed_by: Option<ClosedBy> = None;
    let mut close_code: Option<u16> = None;
    let mut close_reason = String::new();
    let mut limit_hit: Option<SizeLimit> = None;
    // After a client violation: the close the client is owed, sent once the backend has
    // answered ours (or gone, or taken CLIENT_VIOLATION_GRACE).
    let mut owed_to_client: Option<(u16, &'static str)> = None;
    let mut end_when_written = false;
    // Pausing for a binary upgrade (both pumps asked to stop at a frame boundary), and done.
    let mut pausing = false;
    let mut handed = false;
    // A binary upgrade that does not take this connection: when it is closed with 1012.
    let mut restart_at: Option<Instant> = None;
    let upgrading = || {
        params
            .upgrade
            .as_ref()
            .is_some_and(|u| u.upgrading.load(std::sync::atomic::Ordering::Acquire))
    };
    // The close a shutdown sends: 1012 (service restart: come back) in an upgrade, else 1001.
    let shutdown_code = || {
        if upgrading() {
            close_code::SERVICE_RESTART
        } else {
            close_code::GOING_AWAY
        }
    };

    // The first reason the connection ends is the one logged; later ones do not overwrite it.
    macro_rules! record_end {
        ($by:expr, $code:expr, $reason:expr) => {{
            record_end!($by, $code, $reason, None)
        }};
        ($by:expr, $code:expr, $reason:expr, $limit:expr) => {{
            if closed_by.is_none() {
                closed_by = Some($by);
                close_code = $code;
                close_reason = String::from($reason);
                limit_hit = $limit;
            }
        }};
    }

    // The closing phase starts once: the timer then bounds how long the peers get to answer.
    macro_rules! start_closing {
        ($grace:expr) => {{
            if !closing {
                closing = true;
                sleep.as_mut().reset(Instant::now() + $grace);
            }
        }};
    }

    // Starts the end of the connection: sends the gateway's close frames where they may go and
    // gives both sides CLOSE_GRACE to answer.
    macro_rules! terminate {
        ($by:expr, $to_client:expr, $to_backend:expr, $reason:expr) => {{
            terminate!($by, $to_client, $reason, $to_backend, $reason)
        }};
        // Each side with its own reason (the side that went over a message rate is told which
        // limit; the other side, who went over).
        ($by:expr, $to_client:expr, $client_reason:expr, $to_backend:expr, $backend_reason:expr) => {{
            record_end!($by, Some($to_client), $client_reason);
            b2c.queue_close(Direction::BackendToClient, $to_client, $client_reason);
            c2b.queue_close(Direction::ClientToBackend, $to_backend, $backend_reason);
            start_closing!(CLOSE_GRACE);
        }};
    }

    // A close frame from one side was forwarded to the other: wait for the answer.
    macro_rules! on_close {
        ($by:expr, $code:expr, $reason:expr) => {{
            record_end!($by, $code, $reason);
            start_closing!(CLOSE_GRACE);
        }};
    }

    // A message policy closed the connection (the sender gets its close, the other side 1001)
    // or failed (1011 to both; the error goes to the log, never to a peer).
    macro_rules! message_policy_end {
        ($judged:expr, $sender:expr) => {{
            let (conn, api) = params
                .inspection
                .as_ref()
                .map_or((0, ""), |i| (i.connection.id(), i.connection.api()));
            match $judged {
                Judged::Close {
                    plugin,
                    code,
                    reason,
                } => {
                    tracing::info!(event = "message_policy_close", conn, api, plugin = %plugin,
                        sender = $sender.as_str(), code, reason = ?reason,
                        "a message policy closed the connection");
                    match $sender {
                        Sender::Client => terminate!(
                            ClosedBy::MessagePolicy,
                            code,
                            reason.as_str(),
                            close_code::GOING_AWAY,
                            "client's message refused by a policy"
                        ),
                        Sender::Backend => terminate!(
                            ClosedBy::MessagePolicy,
                            close_code::GOING_AWAY,
                            "backend's message refused by a policy",
                            code,
                            reason.as_str()
                        ),
                    }
                }
                Judged::Failed { plugin, error } => {
                    tracing::warn!(event = "policy_error", conn, api, plugin = %plugin,
                        scope = "message", sender = $sender.as_str(), error = %error,
                        "message policy failed; connection closed");
                    terminate!(
                        ClosedBy::MessagePolicyError,
                        close_code::INTERNAL_ERROR,
                        close_code::INTERNAL_ERROR,
                        "message policy failed"
                    );
                }
                Judged::Forward | Judged::Replace { .. } | Judged::Drop { .. } => {}
            }
        }};
    }

    loop {
        let wake = poll_fn(|cx| {
            if let Poll::Ready(e) =
                c2b.poll(cx, &mut client, &mut backend, &metrics.client_to_backend)
            {
                return Poll::Ready(Wake::C2b(e));
            }
            if let Poll::Ready(e) =
                b2c.poll(cx, &mut backend, &mut client, &metrics.backend_to_client)
            {
                return Poll::Ready(Wake::B2c(e));
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
            if !shutdown_seen && shutdown_fut.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Shutdown);
            }
            Poll::Pending
        })
        .await;

        // Anything but the pause itself while pausing (a close, a violation, a side gone, the
        // pause taking too long) ends the pause: the event is handled as usual, then the
        // connection closes as on shutdown.
        let abandon = pausing
            && !matches!(
                wake,
                Wake::C2b(PumpEvent::Paused | PumpEvent::Injected)
                    | Wake::B2c(PumpEvent::Paused | PumpEvent::Injected)
            );
        if abandon {
            pausing = false;
            c2b.unpause();
            b2c.unpause();
        }

        match wake {
            Wake::C2b(PumpEvent::Paused) | Wake::B2c(PumpEvent::Paused) => {}
            Wake::C2b(PumpEvent::Close { code, reason }) => {
                on_close!(ClosedBy::Client, code, reason);
            }
            Wake::B2c(PumpEvent::Close { code, reason }) => {
                // Its close is on the way to the client: that is the close the client was owed.
                owed_to_client = None;
                on_close!(ClosedBy::Backend, code, reason);
            }
            Wake::C2b(PumpEvent::Violation {
                code,
                reason,
                limit,
            }) => {
                // Nothing more is read from the client, and the backend gets the same close
                // code. The client's close waits until the backend has answered: whatever the
                // backend sent in reply to the client's valid frames before the violation
                // still reaches the client (as it would with no gateway in between), followed
                // by the backend's close reply, normally the same code.
                // (A violation found in the middle of a frame the backend has partly seen, e.g.
                // invalid UTF-8 in a long text frame, leaves no frame boundary for a close: the
                // backend is then simply disconnected once the client has its close.)
                let mid_frame = !c2b.parser.at_boundary();
                record_end!(ClosedBy::ClientViolation, Some(code), reason, limit);
                if limit.is_some_and(SizeLimit::is_rate) {
                    // Over a message rate (always at a frame boundary): the client broke the
                    // API's rule, not the protocol, so the backend only hears it is going
                    // (1001), and both closes go at once, since the backend's reply to its 1001
                    // must not stand in for the client's 1008. (What the backend had sent that
                    // the gateway had not yet read is not forwarded after the client's close.)
                    terminate!(
                        ClosedBy::ClientViolation,
                        code,
                        reason,
                        close_code::GOING_AWAY,
                        "client over its message rate"
                    );
                } else if c2b.queue_close(Direction::ClientToBackend, code, reason) {
                    owed_to_client = Some((code, reason));
                    start_closing!(CLIENT_VIOLATION_GRACE);
                } else {
                    terminate!(ClosedBy::ClientViolation, code, code, reason);
                    if mid_frame {
                        end_when_written = true;
                    }
                }
            }
            Wake::B2c(PumpEvent::Violation {
                code,
                reason,
                limit,
            }) => {
                // The backend is the offender: it gets `code`. The client gets the same code
                // when it describes what the client saw (an oversized or invalid message that
                // will never be finished), 1001 after a message rate (the backend is going
                // away, as far as the client can tell), else a server error.
                let other = if limit.is_some_and(SizeLimit::is_rate) {
                    close_code::GOING_AWAY
                } else if code == close_code::TOO_BIG || code == close_code::INVALID_PAYLOAD {
                    code
                } else {
                    close_code::INTERNAL_ERROR
                };
                record_end!(ClosedBy::BackendViolation, Some(other), reason, limit);
                if limit.is_some_and(SizeLimit::is_rate) {
                    terminate!(
                        ClosedBy::BackendViolation,
                        other,
                        "backend over its message rate",
                        code,
                        reason
                    );
                } else {
                    terminate!(ClosedBy::BackendViolation, other, code, reason);
                }
            }
            Wake::C2b(PumpEvent::SrcGone) | Wake::B2c(PumpEvent::DstGone) => {
                // The client is gone. If it already had our close, this is the normal end.
                if !(b2c.out_closed && closing) {
                    terminate!(
                        ClosedBy::ClientDropped,
                        close_code::GOING_AWAY,
                        close_code::GOING_AWAY,
                        "client went away"
                    );
                }
                b2c.dst_gone = true;
                c2b.src_gone = true;
            }
            Wake::B2c(PumpEvent::SrcGone) | Wake::C2b(PumpEvent::DstGone) => {
                if let Some((code, reason)) = owed_to_client.take() {
                    b2c.queue_close(Direction::BackendToClient, code, reason);
                } else if !(c2b.out_closed && closing) {
                    terminate!(
                        ClosedBy::BackendDropped,
                        close_code::INTERNAL_ERROR,
                        close_code::GOING_AWAY,
                        "backend connection lost"
                    );
                } else if closed_by == Some(ClosedBy::Client) {
                    // The backend took the client's close and went without answering it: the
                    // client gets the answer RFC 6455 asks for (section 5.5.1, its own code
                    // echoed) instead of a bare end of the socket. Nothing is sent if the
                    // client already has a close or the backend stopped mid-frame.
                    let code = close_code.unwrap_or(close_code::NORMAL);
                    b2c.queue_close(Direction::BackendToClient, code, "");
                }
                c2b.dst_gone = true;
                b2c.src_gone = true;
            }
            Wake::C2b(PumpEvent::Injected) | Wake::B2c(PumpEvent::Injected) => {}
            Wake::C2b(PumpEvent::MessagePolicy(j)) => message_policy_end!(j, Sender::Client),
            Wake::B2c(PumpEvent::MessagePolicy(j)) => message_policy_end!(j, Sender::Backend),
            Wake::Timer => {
                if let Some((code, reason)) = owed_to_client.take() {
                    // The backend did not answer in time: the client gets its close now, and
                    // the connection ends once it is written (nothing is read from the client
                    // any more, so there is no reply to wait for).
                    b2c.queue_close(Direction::BackendToClient, code, reason);
                    end_when_written = true;
                    sleep.as_mut().reset(Instant::now() + CLOSE_GRACE);
                    continue;
                }
                if closing {
                    break; // grace period over
                }
                let last = c2b.last_read.max(b2c.last_read);
                let now = Instant::now();
                match idle {
                    _ if restart_at.is_some_and(|r| r <= now) => {
                        terminate!(
                            ClosedBy::Shutdown,
                            close_code::SERVICE_RESTART,
                            close_code::GOING_AWAY,
                            "service restart"
                        );
                    }
                    _ if policy_end.is_some_and(|p| p <= now) => {
                        terminate!(
                            ClosedBy::PolicyDeadline,
                            close_code::POLICY_VIOLATION,
                            close_code::GOING_AWAY,
                            "policy deadline reached"
                        );
                    }
                    _ if lifetime_end.is_some_and(|l| l <= now) => {
                        terminate!(
                            ClosedBy::Lifetime,
                            close_code::GOING_AWAY,
                            close_code::GOING_AWAY,
                            "max_connection_lifetime reached"
                        );
                    }
                    Some(idle) if last + idle <= now => {
                        terminate!(
                            ClosedBy::IdleTimeout,
                            close_code::GOING_AWAY,
                            close_code::GOING_AWAY,
                            "idle timeout"
                        );
                    }
                    _ => {
                        let next = next_deadline(last);
                        sleep
                            .as_mut()
                            .reset(restart_at.map_or(next, |r| r.min(next)));
                    }
                }
            }
            Wake::Shutdown
                if params.shutdown.is_cancelled()
                    && !closing
                    && params.handable
                    && params
                        .upgrade
                        .as_ref()
                        .is_some_and(|u| u.live.load(std::sync::atomic::Ordering::Acquire)) =>
            {
                // A binary upgrade: pause at a frame boundary both ways, to be handed over.
                shutdown_seen = true;
                pausing = true;
                c2b.pausing = true;
                b2c.pausing = true;
                sleep.as_mut().reset(Instant::now() + PAUSE_WITHIN);
            }
            Wake::Shutdown if params.shutdown.is_cancelled() && !closing && upgrading() => {
                // Not handed over: closed with 1012 at a random moment of the window, so the
                // clients of a whole gateway do not come back at once.
                shutdown_seen = true;
                let window = params.upgrade.as_ref().map_or(0, |u| {
                    u.window_ms.load(std::sync::atomic::Ordering::Relaxed)
                });
                let at = Instant::now() + Duration::from_millis(rand::random_range(0..=window));
                restart_at = Some(at);
                // A deadline due sooner (a policy's, the lifetime, the idle timeout) keeps its
                // turn.
                let next = next_deadline(c2b.last_read.max(b2c.last_read));
                sleep.as_mut().reset(at.min(next));
            }
            Wake::Shutdown if params.shutdown.is_cancelled() => {
                shutdown_seen = true;
                terminate!(
                    ClosedBy::Shutdown,
                    close_code::GOING_AWAY,
                    close_code::GOING_AWAY,
                    "gateway shutting down"
                );
            }
            Wake::Shutdown => {
                // The key this connection was admitted with was revoked by a reload: the
                // client is told why (1008, policy violation), the backend that the client is
                // going away.
                shutdown_seen = true;
                record_end!(
                    ClosedBy::Revoked,
                    Some(close_code::POLICY_VIOLATION),
                    "subscription revoked"
                );
                b2c.queue_close(
                    Direction::BackendToClient,
                    close_code::POLICY_VIOLATION,
                    "subscription revoked",
                );
                c2b.queue_close(
                    Direction::ClientToBackend,
                    close_code::GOING_AWAY,
                    "client's subscription revoked",
                );
                start_closing!(CLOSE_GRACE);
            }
        }

        if abandon {
            terminate!(
                ClosedBy::Shutdown,
                shutdown_code(),
                close_code::GOING_AWAY,
                "gateway shutting down"
            );
        }
        if pausing && c2b.paused && b2c.paused {
            handed = true;
            break;
        }
        if closing && c2b.input_done() && b2c.input_done() && c2b.output_idle() && b2c.output_idle()
        {
            break;
        }
        // With one side gone there is nobody to wait for once our frames are out.
        if closing && (c2b.src_gone || b2c.src_gone) && c2b.output_idle() && b2c.output_idle() {
            break;
        }
        if end_when_written && c2b.output_idle() && b2c.output_idle() {
            break;
        }
    }

    // What the metrics have not seen yet, and the connection off the active count.
    let publish_end = |c2b: &mut Pump, b2c: &mut Pump| {
        metrics
            .client_to_backend
            .add(&c2b.parser.stats, &mut c2b.published);
        metrics
            .backend_to_client
            .add(&b2c.parser.stats, &mut b2c.published);
        metrics.active.dec();
    };
    if handed {
        publish_end(&mut c2b, &mut b2c);
        let now = Instant::now();
        let unforwarded = |p: &Pump| p.buf[p.start..].to_vec();
        let (client_unforwarded, backend_unforwarded) = (unforwarded(&c2b), unforwarded(&b2c));
        // At a frame boundary (the pumps paused only there), so there is a state to give.
        if let (Some(c), Some(b)) = (c2b.parser.pause(), b2c.parser.pause()) {
            return Relayed::Paused(Box::new(Paused {
                client,
                backend,
                client_unforwarded,
                backend_unforwarded,
                client_to_backend: c2b.parser.stats,
                backend_to_client: b2c.parser.stats,
                resume: Resume {
                    client_to_backend: c,
                    backend_to_client: b,
                    age: now - started,
                    quiet: [now - c2b.last_read, now - b2c.last_read],
                },
            }));
        }
        metrics.active.inc();
    }

    // TLS sessions get their close_notify; a peer that stopped reading does not get to hold us
    // up. Plain TCP needs no shutdown(2) before close(2): dropping the socket sends the FIN, and
    // the extra system call per side is measurable in the per-handshake CPU budget.
    if !matches!(client, Stream::Tcp(_)) || !matches!(backend, Stream::Tcp(_)) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = tokio::join!(shutdown_tls(&mut client), shutdown_tls(&mut backend));
        })
        .await;
    }

    publish_end(&mut c2b, &mut b2c);
    let duration = started.elapsed();
    metrics.connection_duration.observe(duration.as_secs_f64());
    Relayed::Ended(RelayOutcome {
        client_to_backend: c2b.parser.stats,
        backend_to_client: b2c.parser.stats,
        closed_by: closed_by.unwrap_or(ClosedBy::Client),
        close_code,
        close_reason,
        limit: limit_hit,
        duration,
    })
}
