//! Streaming WebSocket frame observer (RFC 6455 section 5).
//!
//! The relay forwards bytes *verbatim*: the client's masking, RSV bits (so a permessage-deflate
//! agreed end to end keeps working) and fragment boundaries all survive. This parser only watches
//! the bytes go by: it finds frame boundaries, enforces the protocol rules a gateway must
//! enforce (masking direction, opcodes, control-frame rules, RSV bits without an agreed
//! extension, size limits), validates text as UTF-8 (section 8.1) and close frames (section
//! 7.4), captures close frames, and counts. It never holds a data payload, so a 1 GiB message
//! streams through in constant memory.
//!
//! Text is validated as it streams ([`Utf8Stream`]): a code point split across reads, frames or
//! fragments is carried over (at most 3 bytes), nothing is reassembled, and the first invalid
//! byte fails the message at once. Client payloads are checked 4 KiB at a time: an all-ASCII
//! block is recognised while still masked (no copy), any other is unmasked into a block on the
//! stack for the validator; the forwarded bytes keep the client's masking. When the handshake
//! agreed an extension (permessage-deflate), payloads are compressed and are not validated:
//! the endpoints check what they decompress. A close frame is held until it is complete (at
//! most 139 bytes) and checked before any of it is forwarded.
//!
//! With a message rate (`[[apis.message_limits]]` or a product's, [`crate::rate`]) a message
//! over it either ends the connection or, with `drop`, is cut out of the stream: its frames'
//! bytes are reported as `discard` instead of `forward`, control frames in between still pass.
//!
//! Why hand-written: tungstenite and friends parse whole messages (they reassemble fragments and
//! unmask into owned buffers), which is exactly what a frame-preserving, zero-copy relay must not
//! do.

use crate::rate::{MessageRate, RateAction, RateLimit};

/// Buckets shared by several connections' parsers (a subscription's), each connection on its
/// own task: a mutex held for one check.
pub type SharedRate = std::sync::Arc<std::sync::Mutex<MessageRate>>;

/// The buckets a direction is judged by: its own (the API's, the product's), and shared ones
/// (the subscription's for the API, for the product).
#[derive(Debug)]
struct Rates {
    own: Vec<MessageRate>,
    shared: Vec<SharedRate>,
}

/// A poisoned lock only means another connection's task panicked mid-check; the numbers in it
/// are still numbers.
fn locked(rate: &SharedRate) -> std::sync::MutexGuard<'_, MessageRate> {
    rate.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared sets of a message's check, locked together: the gateway gives a connection at
/// most two (its API's and its product's), held without allocating; more would go to the heap.
enum Locked<'a> {
    Few([Option<std::sync::MutexGuard<'a, MessageRate>>; 2]),
    Many(Vec<std::sync::MutexGuard<'a, MessageRate>>),
}

impl<'a> Locked<'a> {
    fn new(sets: &'a [SharedRate]) -> Locked<'a> {
        match sets {
            [] => Locked::Few([None, None]),
            [a] => Locked::Few([Some(locked(a)), None]),
            [a, b] => Locked::Few([Some(locked(a)), Some(locked(b))]),
            _ => Locked::Many(sets.iter().map(locked).collect()),
        }
    }

    fn iter_mut<'s>(&'s mut self) -> impl Iterator<Item = &'s mut MessageRate> + use<'s, 'a> {
        let (few, many): (&mut [Option<_>], &mut [_]) = match self {
            Locked::Few(g) => (&mut g[..], &mut []),
            Locked::Many(g) => (&mut [], &mut g[..]),
        };
        few.iter_mut()
            .flatten()
            .chain(many.iter_mut())
            .map(|g| &mut **g)
    }
}

impl Rates {
    /// Every set admits the message (and all are charged), or the first that refuses says why
    /// and what to do (its own action); a refused message charges none. The shared sets are
    /// locked together for that, always in the order the gateway lists them (an API's before
    /// its product's), so two connections never wait on each other in a circle.
    fn admit(
        &mut self,
        first_frame_len: u64,
        now: std::time::Instant,
    ) -> Result<(), (RateLimit, RateAction)> {
        for own in &mut self.own {
            own.check(first_frame_len, now)
                .map_err(|l| (l, own.action))?;
        }
        let mut shared = Locked::new(&self.shared);
        for s in shared.iter_mut() {
            s.check(first_frame_len, now).map_err(|l| (l, s.action))?;
        }
        for s in shared.iter_mut() {
            s.take(first_frame_len);
        }
        for own in &mut self.own {
            own.take(first_frame_len);
        }
        Ok(())
    }

    /// A later frame of an admitted message, of `len` payload bytes: charged if the byte
    /// buckets can take it as they could a first frame, else the limit it is over.
    fn admit_more(&mut self, len: u64, now: std::time::Instant) -> Result<(), RateLimit> {
        for own in &mut self.own {
            own.check_bytes(len, now)?;
        }
        let mut shared = Locked::new(&self.shared);
        for s in shared.iter_mut() {
            s.check_bytes(len, now)?;
        }
        for s in shared.iter_mut() {
            s.charge(len);
        }
        for own in &mut self.own {
            own.charge(len);
        }
        Ok(())
    }
}

/// Which way the bytes travel; decides which masking rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client frames MUST be masked (RFC 6455 5.1).
    ClientToBackend,
    /// Server frames MUST NOT be masked.
    BackendToClient,
}

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes the gateway itself sends.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The gateway restarts (a binary upgrade that could not take the connection along): the
    /// client may reconnect.
    pub const SERVICE_RESTART: u16 = 1012;
}

/// Per-direction counters. Plain integers in the connection's own task, so counting costs no
/// atomic per frame; the gateway's relay publishes their growth to its shared metrics once per
/// read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DirStats {
    /// Bytes on the wire (headers and payloads).
    pub bytes: u64,
    pub frames: u64,
    /// Complete data messages (a final text/binary/continuation frame ends one).
    pub messages: u64,
    pub text_frames: u64,
    pub binary_frames: u64,
    pub continuation_frames: u64,
    pub ping_frames: u64,
    pub pong_frames: u64,
    pub close_frames: u64,
    pub text_messages: u64,
    pub binary_messages: u64,
    /// Messages not forwarded because they were over `max_messages_per_second` (`drop`).
    pub dropped_over_messages: u64,
    /// Messages not forwarded because they were over `max_bytes_per_second` (`drop`).
    pub dropped_over_bytes: u64,
}

/// A direction's parser between two frames, as [`FrameParser::pause`] gives it: the data
/// message in progress (fragmented), its text validation and its rate drop, and the counts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParserState {
    pub message: Option<u8>,
    pub message_len: u64,
    pub utf8_carry: Vec<u8>,
    pub dropping: Option<RateLimit>,
    pub stats: DirStats,
}

/// A [`ParserState`] no parser could have paused in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a state a frame parser pauses in")]
pub struct BadState;

/// What stopped the parser at a frame boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete close frame went by (it is included in the forwarded bytes).
    Close { code: Option<u16>, reason: String },
    /// The frame starting at the returned offset breaks the protocol or a limit; it must not be
    /// forwarded. `code` is the close code for the offender; `limit` names the size limit when
    /// one was exceeded (metrics count limits by it, never by the reason's wording).
    Violation {
        code: u16,
        reason: &'static str,
        limit: Option<SizeLimit>,
    },
}

/// The limits the parser enforces on a direction, as a frame or message over one of them is
/// reported: sizes, and (with [`FrameParser::with_message_rate`]) message rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SizeLimit {
    MaxFrameSize,
    MaxMessageSize,
    MaxMessagesPerSecond,
    MaxBytesPerSecond,
    /// A message too large for the API's message policies to be given whole.
    MaxInspectedMessageSize,
}

impl From<RateLimit> for SizeLimit {
    fn from(l: RateLimit) -> SizeLimit {
        match l {
            RateLimit::MessagesPerSecond => SizeLimit::MaxMessagesPerSecond,
            RateLimit::BytesPerSecond => SizeLimit::MaxBytesPerSecond,
        }
    }
}

impl SizeLimit {
    /// The manifest key, which is also the `limit` label of `tollgate_limits_hit_total`.
    pub fn key(self) -> &'static str {
        match self {
            SizeLimit::MaxFrameSize => "max_frame_size",
            SizeLimit::MaxMessageSize => "max_message_size",
            SizeLimit::MaxMessagesPerSecond => RateLimit::MessagesPerSecond.key(),
            SizeLimit::MaxBytesPerSecond => RateLimit::BytesPerSecond.key(),
            SizeLimit::MaxInspectedMessageSize => "max_inspected_message_size",
        }
    }

    /// The reason in the close frame (code 1009 for sizes, 1008 for rates).
    pub fn reason(self) -> &'static str {
        match self {
            SizeLimit::MaxFrameSize => "frame exceeds max_frame_size",
            SizeLimit::MaxMessageSize => "message exceeds max_message_size",
            SizeLimit::MaxMessagesPerSecond => RateLimit::MessagesPerSecond.reason(),
            SizeLimit::MaxBytesPerSecond => RateLimit::BytesPerSecond.reason(),
            SizeLimit::MaxInspectedMessageSize => "message exceeds max_inspected_message_size",
        }
    }

    /// A message rate, not a size: the sender gets 1008 and the other side 1001.
    pub fn is_rate(self) -> bool {
        matches!(
            self,
            SizeLimit::MaxMessagesPerSecond | SizeLimit::MaxBytesPerSecond
        )
    }
}

/// Result of [`FrameParser::advance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    /// How many bytes from the start of the input may be forwarded. Bytes after it (when there is
    /// no event) are an incomplete frame header the caller must keep and present again.
    pub forward: usize,
    /// How many bytes after the forwarded ones belong to a dropped message: the caller removes
    /// them and presents the rest of its input again. Only ever non-zero with a message rate
    /// whose action is `drop`.
    pub discard: usize,
    pub event: Option<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Payload,
}

/// Streaming UTF-8 validation of one text message: bytes arrive in pieces of any size, a code
/// point may be split between them. Wraps `simdutf8` (vectorised); only the up to 3 bytes of an
/// unfinished code point are carried between pieces.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Stream {
    carry: [u8; 4],
    carry_len: u8,
}

/// Invalid UTF-8 (or a sequence that can no longer become valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

impl Utf8Stream {
    /// Checks the next piece. Fails as soon as a byte makes the text invalid, even if more
    /// bytes of the same code point were still to come.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidUtf8> {
        if self.carry_len > 0 {
            // Complete the carried code point first (it is at most 4 bytes long).
            let have = usize::from(self.carry_len);
            let take = (4 - have).min(bytes.len());
            let mut tmp = [0u8; 4];
            tmp[..have].copy_from_slice(&self.carry[..have]);
            tmp[have..have + take].copy_from_slice(&bytes[..take]);
            match simdutf8::compat::from_utf8(&tmp[..have + take]) {
                Ok(_) => {
                    self.carry_len = 0;
                    bytes = &bytes[take..];
                }
                Err(e) if e.valid_up_to() >= have => {
                    // The carried code point is complete; what follows is checked below.
                    self.carry_len = 0;
                    bytes = &bytes[e.valid_up_to() - have..];
                }
                Err(e) if e.error_len().is_some() => return Err(InvalidUtf8),
                Err(_) => {
                    // Still unfinished (the piece was shorter than the code point).
                    self.carry = tmp;
                    self.carry_len = (have + take) as u8;
                    return Ok(());
                }
            }
        }
        // A piece usually ends inside a code point (reads cut text anywhere): check what comes
        // before the unfinished one with the fast validator, and only the up to 3 bytes of the
        // unfinished one with the one that tells a prefix from an error.
        let split = unfinished_tail(bytes);
        if simdutf8::basic::from_utf8(&bytes[..split]).is_err() {
            return Err(InvalidUtf8);
        }
        let tail = &bytes[split..];
        match simdutf8::compat::from_utf8(tail) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(InvalidUtf8),
            Err(_) => {
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
                Ok(())
            }
        }
    }

    /// The bytes of an unfinished code point carried to the next piece (at most 3).
    pub fn carried(&self) -> &[u8] {
        &self.carry[..usize::from(self.carry_len)]
    }

    /// A stream that carries `bytes` of an unfinished code point, as [`Utf8Stream::carried`]
    /// gave them; `None` if they cannot begin a code point (more than 3, or invalid).
    pub fn carrying(bytes: &[u8]) -> Option<Utf8Stream> {
        if bytes.len() > 3 {
            return None;
        }
        match simdutf8::compat::from_utf8(bytes) {
            Ok(_) if bytes.is_empty() => Some(Utf8Stream::default()),
            Err(e) if e.valid_up_to() == 0 && e.error_len().is_none() => {
                let mut carry = [0u8; 4];
                carry[..bytes.len()].copy_from_slice(bytes);
                Some(Utf8Stream {
                    carry,
                    carry_len: bytes.len() as u8,
                })
            }
            _ => None,
        }
    }

    /// Whether a code point begun in an earlier piece is still unfinished.
    pub fn in_code_point(&self) -> bool {
        self.carry_len > 0
    }

    /// The message ended: an unfinished code point makes it invalid.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let unfinished = self.carry_len > 0;
        self.carry_len = 0;
        if unfinished {
            Err(InvalidUtf8)
        } else {
            Ok(())
        }
    }
}

/// Where a code point that `b` does not finish starts (`b.len()` if it ends on a boundary, as
/// far as its last 3 bytes tell).
fn unfinished_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let i = b.len() - back;
        let lead = b[i];
        if lead & 0xc0 != 0x80 {
            let needs = match lead {
                0xf0.. => 4,
                0xe0.. => 3,
                0xc0.. => 2,
                _ => 1,
            };
            return if needs > back { i } else { b.len() };
        }
    }
    b.len()
}

/// Whether a close code may appear in a close frame on the wire (RFC 6455 section 7.4, IANA
/// registry): 1000-1003, 1007-1014 and 3000-4999. 1004-1006 and 1015 are reserved or only for
/// reporting, the rest of 1000-2999 is unassigned.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Bytes of client text unmasked at a time for the UTF-8 check.
const UNMASK_BLOCK: usize = 4096;

/// The masking key as it applies to bytes starting `offset` into the payload, and that key
/// twice over as one 8-byte word (for the word-at-a-time loops).
fn rotated_key(key: [u8; 4], offset: u64) -> ([u8; 4], u64) {
    let r = (offset % 4) as usize;
    let k = [key[r], key[(r + 1) % 4], key[(r + 2) % 4], key[(r + 3) % 4]];
    (
        k,
        u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]),
    )
}

/// Writes `data` unmasked with `key` into `out` (the same length), `data` starting `offset`
/// bytes into its payload. Eight bytes at a time (the compiler vectorises the word loop): a
/// byte-at-a-time loop with a modulo per byte cost more than the UTF-8 check itself.
fn unmask_into(out: &mut [u8], data: &[u8], key: [u8; 4], offset: u64) {
    let (k, word) = rotated_key(key, offset);
    out.copy_from_slice(data);
    let mut words = out.chunks_exact_mut(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        w.copy_from_slice(&(u64::from_ne_bytes(b) ^ word).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the key lines up with index 0 again.
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= k[i % 4];
    }
}

/// Whether `data`, masked with `key` and starting `offset` bytes into its payload, is all ASCII
/// once unmasked. Reads eight bytes at a time and only ORs them together (the compiler
/// vectorises the loop): no copy is written.
fn masked_ascii(data: &[u8], key: [u8; 4], offset: u64) -> bool {
    let (k, word) = rotated_key(key, offset);
    let mut words = data.chunks_exact(8);
    let mut high = 0u64;
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        high |= u64::from_ne_bytes(b) ^ word;
    }
    let mut tail = 0u8;
    for (i, b) in words.remainder().iter().enumerate() {
        tail |= b ^ k[i % 4];
    }
    (high & 0x8080_8080_8080_8080) == 0 && tail & 0x80 == 0
}

#[derive(Debug)]
pub struct FrameParser {
    dir: Direction,
    max_frame_size: u64,
    max_message_size: Option<u64>,
    state: State,
    remaining: u64,
    opcode: u8,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Close frame payload, unmasked, captured as it passes.
    ctrl: Vec<u8>,
    /// Offset within the current frame's payload (for unmasking).
    payload_pos: u64,
    /// Opcode of the fragmented data message in progress, if any.
    message: Option<u8>,
    message_len: u64,
    /// RSV bits may be set: only when the 101 agreed an extension (RFC 6455 5.2). Which bits
    /// an extension uses is its business, so with any extension all three pass.
    rsv_allowed: bool,
    /// Text is validated as UTF-8 (not when an extension may have transformed payloads).
    validate_text: bool,
    /// The text message in progress, as validated so far.
    utf8: Utf8Stream,
    /// `[[apis.message_limits]]` of this direction; boxed, so a connection without them pays
    /// one word per direction.
    rate: Option<Box<Rates>>,
    /// The data message in progress is being dropped (its frames are discarded).
    dropping: Option<RateLimit>,
    pub stats: DirStats,
}

impl FrameParser {
    pub fn new(dir: Direction, max_frame_size: u64, max_message_size: Option<u64>) -> Self {
        FrameParser {
            dir,
            max_frame_size,
            max_message_size,
            state: State::Header,
            remaining: 0,
            opcode: 0,
            fin: false,
            mask: None,
            ctrl: Vec::new(),
            payload_pos: 0,
            message: None,
            message_len: 0,
            rsv_allowed: true,
            validate_text: false,
            utf8: Utf8Stream::default(),
            rate: None,
            dropping: None,
            stats: DirStats::default(),
        }
    }

    /// Enforces a message rate on this direction (`[[apis.message_limits]]`): a message over
    /// it ends the connection (a violation with code 1008) or, with `drop`, is not forwarded.
    /// Messages are judged at their first frame (see [`crate::rate`]); control frames are
    /// never limited, and pass through a dropped message's frames as they came.
    pub fn with_message_rate(self, rate: Option<MessageRate>) -> Self {
        self.with_message_rates(rate.into_iter().collect(), Vec::new())
    }

    /// [`FrameParser::with_message_rate`] with several sets of buckets: the connection's own
    /// (an API's and a product's limits) and sets shared with other connections (a
    /// subscription's): a message passes only if all admit it, and is charged to all.
    pub fn with_message_rates(mut self, own: Vec<MessageRate>, shared: Vec<SharedRate>) -> Self {
        self.rate =
            (!own.is_empty() || !shared.is_empty()).then(|| Box::new(Rates { own, shared }));
        self
    }

    /// Whether the handshake agreed an extension (`Sec-WebSocket-Extensions` in the 101).
    /// Without one, a frame with an RSV bit set fails the connection with 1002 here, at the
    /// gateway, instead of reaching the peer (which would have to fail it anyway).
    ///
    /// Without an extension, text payloads are also validated as UTF-8 (with one, they may be
    /// compressed, and only the endpoints can check them).
    pub fn with_extensions(mut self, agreed: bool) -> Self {
        self.rsv_allowed = agreed;
        self.validate_text = !agreed;
        self
    }

    /// Whether the frame being read carries text to validate.
    fn checking_text(&self) -> bool {
        self.validate_text
            && (self.opcode == OP_TEXT
                || (self.opcode == OP_CONTINUATION && self.message == Some(OP_TEXT)))
    }

    /// Validates a piece of the current text frame's payload, unmasking it first if needed.
    fn check_text(&mut self, chunk: &[u8]) -> Result<(), InvalidUtf8> {
        match self.mask {
            None => self.utf8.feed(chunk),
            Some(k) => {
                // In blocks that stay in the L1 cache: unmask one, check it, reuse the space.
                // A block that is all ASCII (most text is: JSON, protocols) needs neither the
                // copy nor the validator, unless it has to finish a code point begun earlier.
                let mut block = [0u8; UNMASK_BLOCK];
                let mut offset = self.payload_pos;
                for piece in chunk.chunks(UNMASK_BLOCK) {
                    if !self.utf8.in_code_point() && masked_ascii(piece, k, offset) {
                        offset += piece.len() as u64;
                        continue;
                    }
                    let out = &mut block[..piece.len()];
                    unmask_into(out, piece, k, offset);
                    self.utf8.feed(out)?;
                    offset += piece.len() as u64;
                }
                Ok(())
            }
        }
    }

    /// Bytes of the current frame's payload still to come, `None` between frames (the next
    /// byte starts a header). A relay pausing for a binary upgrade reads exactly this many, so
    /// it stops at a frame boundary without reading into the next frame.
    pub fn payload_left(&self) -> Option<u64> {
        (self.state == State::Payload).then_some(self.remaining)
    }

    /// What the parser knows beyond its configuration, between two frames (`None` inside
    /// one): what a new process needs to go on with the stream (a binary upgrade).
    pub fn pause(&self) -> Option<ParserState> {
        if self.state != State::Header {
            return None;
        }
        Some(ParserState {
            message: self.message,
            message_len: self.message_len,
            utf8_carry: self.utf8.carried().to_vec(),
            dropping: self.dropping,
            stats: self.stats,
        })
    }

    /// Goes on where another parser (with the same configuration) paused. Refuses a state no
    /// parser could have been in, so a damaged handover cannot put it out of step.
    pub fn resume(mut self, state: ParserState) -> Result<Self, BadState> {
        if !matches!(state.message, None | Some(OP_TEXT) | Some(OP_BINARY))
            || (state.message.is_none() && (state.message_len > 0 || state.dropping.is_some()))
            || state.message_len > self.max_message_size.unwrap_or(u64::MAX >> 1)
        {
            return Err(BadState);
        }
        self.utf8 = Utf8Stream::carrying(&state.utf8_carry).ok_or(BadState)?;
        self.message = state.message;
        self.message_len = state.message_len;
        self.dropping = state.dropping;
        self.stats = state.stats;
        Ok(self)
    }

    /// True between frames: a frame generated by the gateway may be inserted here.
    pub fn at_boundary(&self) -> bool {
        // Inside a dropped frame too: nothing of it went out, so the receiver is between frames.
        self.state == State::Header || self.discarding()
    }

    /// True while a fragmented message is open (a data frame may not be inserted).
    pub fn in_message(&self) -> bool {
        self.message.is_some() && self.dropping.is_none()
    }

    /// Observes `data`, which continues exactly where the previous call's forwarded bytes ended.
    pub fn advance(&mut self, data: &[u8]) -> Advance {
        let mut pos = 0;
        // Where the current frame's header starts, if it is in `data`: a frame found invalid
        // in the same call is then not forwarded at all, so the receiver stays at a frame
        // boundary and can be sent a close frame.
        let mut frame_start: Option<usize> = None;
        loop {
            match self.state {
                State::Payload if self.discarding() => {
                    return self.discard(data, pos, 0);
                }
                State::Payload => {
                    let avail = (data.len() - pos) as u64;
                    let take = avail.min(self.remaining);
                    if self.checking_text()
                        && self.check_text(&data[pos..pos + take as usize]).is_err()
                    {
                        return self.invalid_text(pos, frame_start);
                    }
                    if self.opcode == OP_CLOSE {
                        let chunk = &data[pos..pos + take as usize];
                        for (i, b) in chunk.iter().enumerate() {
                            let m = match self.mask {
                                Some(k) => k[((self.payload_pos + i as u64) % 4) as usize],
                                None => 0,
                            };
                            self.ctrl.push(b ^ m);
                        }
                    }
                    pos += take as usize;
                    self.payload_pos += take;
                    self.remaining -= take;
                    self.stats.bytes += take;
                    if self.remaining > 0 {
                        return Advance {
                            forward: pos,
                            discard: 0,
                            event: None,
                        };
                    }
                    self.state = State::Header;
                    if let Some(ev) = self.finish_frame() {
                        if matches!(ev, Event::Violation { .. }) {
                            self.state = State::Payload;
                            return self.invalid_text(pos - take as usize, frame_start);
                        }
                        return Advance {
                            forward: pos,
                            discard: 0,
                            event: Some(ev),
                        };
                    }
                }
                State::Header => {
                    let rest = &data[pos..];
                    match self.parse_header(rest) {
                        HeaderResult::Incomplete => {
                            return Advance {
                                forward: pos,
                                discard: 0,
                                event: None,
                            }
                        }
                        HeaderResult::Bad(code, reason) => {
                            return Advance {
                                forward: pos,
                                discard: 0,
                                event: Some(Event::Violation {
                                    code,
                                    reason,
                                    limit: None,
                                }),
                            }
                        }
                        HeaderResult::TooBig(limit) => {
                            return Advance {
                                forward: pos,
                                discard: 0,
                                event: Some(Event::Violation {
                                    code: close_code::TOO_BIG,
                                    reason: limit.reason(),
                                    limit: Some(limit),
                                }),
                            }
                        }
                        HeaderResult::Ok(hlen) => {
                            if self.rate.is_some() && self.opcode & 0x8 == 0 {
                                if let Some(adv) = self.judge(data, pos, hlen) {
                                    return adv;
                                }
                            }
                            frame_start = Some(pos);
                            pos += hlen;
                            self.stats.bytes += hlen as u64;
                            self.stats.frames += 1;
                            self.state = State::Payload;
                            if self.remaining == 0 {
                                self.state = State::Header;
                                if let Some(ev) = self.finish_frame() {
                                    if matches!(ev, Event::Violation { .. }) {
                                        return self.invalid_text(pos, frame_start);
                                    }
                                    return Advance {
                                        forward: pos,
                                        discard: 0,
                                        event: Some(ev),
                                    };
                                }
                            }
                        }
                    }
                }
            }
            if pos == data.len() {
                return Advance {
                    forward: pos,
                    discard: 0,
                    event: None,
                };
            }
        }
    }

    /// True while the frame being read belongs to a dropped message (control frames in
    /// between are forwarded as usual).
    fn discarding(&self) -> bool {
        self.dropping.is_some() && self.opcode & 0x8 == 0
    }

    /// With a message rate: the data frame whose `hlen`-byte header starts at `pos` (already
    /// parsed) is judged. `None`: forward it as usual; else what to tell the caller: a
    /// violation (`close`), or the start of the frame's bytes to discard (`drop`).
    fn judge(&mut self, data: &[u8], pos: usize, hlen: usize) -> Option<Advance> {
        let rate = self.rate.as_mut()?;
        let now = std::time::Instant::now();
        if self.opcode == OP_CONTINUATION {
            if self.dropping.is_none() {
                // A later frame of a message already forwarded in part: it cannot be dropped
                // any more, so a message that outgrows the byte rate while it streams ends the
                // connection, whatever the action (else one endless fragmented message would
                // pass any byte rate).
                return match rate.admit_more(self.remaining, now) {
                    Ok(()) => None,
                    Err(limit) => Some(self.rate_violation(pos, limit)),
                };
            }
        } else {
            match rate.admit(self.remaining, now) {
                Ok(()) => return None,
                Err((limit, RateAction::Close)) => return Some(self.rate_violation(pos, limit)),
                Err((limit, RateAction::Drop)) => self.dropping = Some(limit),
            }
        }
        // Dropped: not counted as relayed (`parse_header` counted the frame's type).
        self.uncount_frame_type();
        self.state = State::Payload;
        Some(self.discard(data, pos, hlen))
    }

    /// The data frame whose header starts at `pos` is over a rate: nothing of it is forwarded
    /// (the receiver stays at a frame boundary), and it is not counted as relayed.
    fn rate_violation(&mut self, pos: usize, limit: RateLimit) -> Advance {
        self.uncount_frame_type();
        Advance {
            forward: pos,
            discard: 0,
            event: Some(Event::Violation {
                code: close_code::POLICY_VIOLATION,
                reason: limit.reason(),
                limit: Some(limit.into()),
            }),
        }
    }

    /// Takes back the per-type count `parse_header` made for a data frame that is not relayed.
    fn uncount_frame_type(&mut self) {
        let n = match self.opcode {
            OP_TEXT => &mut self.stats.text_frames,
            OP_BINARY => &mut self.stats.binary_frames,
            _ => &mut self.stats.continuation_frames,
        };
        *n = n.saturating_sub(1);
    }

    /// Discards what `data` holds of the dropped frame being read, from `pos` (plus `header`
    /// bytes of its header not yet counted as discarded).
    fn discard(&mut self, data: &[u8], pos: usize, header: usize) -> Advance {
        let avail = (data.len() - pos - header) as u64;
        let take = avail.min(self.remaining);
        self.remaining -= take;
        self.payload_pos += take;
        if self.remaining == 0 {
            self.state = State::Header;
            if self.fin {
                self.message = None;
                self.message_len = 0;
                match self.dropping.take() {
                    Some(RateLimit::MessagesPerSecond) => self.stats.dropped_over_messages += 1,
                    Some(RateLimit::BytesPerSecond) => self.stats.dropped_over_bytes += 1,
                    None => {}
                }
            }
        }
        Advance {
            forward: pos,
            discard: header + take as usize,
            event: None,
        }
    }

    /// A text message turned out invalid while reading the frame whose current piece starts at
    /// `piece` in this call's input. Nothing of that piece is forwarded, nor of the frame if it
    /// started in this call (the parser is then back at that frame's start, a boundary).
    fn invalid_text(&mut self, piece: usize, frame_start: Option<usize>) -> Advance {
        let forward = match frame_start {
            Some(start) => {
                self.state = State::Header;
                start
            }
            None => piece,
        };
        Advance {
            forward,
            discard: 0,
            event: Some(Event::Violation {
                code: close_code::INVALID_PAYLOAD,
                reason: "invalid UTF-8 in a text message",
                limit: None,
            }),
        }
    }

    /// Checks a complete close frame's payload (already unmasked).
    fn check_close(payload: &[u8]) -> Result<(), (u16, &'static str)> {
        match payload {
            [] => Ok(()),
            [_] => Err((
                close_code::PROTOCOL_ERROR,
                "close frame with a 1-byte payload",
            )),
            [a, b, reason @ ..] => {
                if !close_code_allowed(u16::from_be_bytes([*a, *b])) {
                    return Err((
                        close_code::PROTOCOL_ERROR,
                        "close code that may not be sent",
                    ));
                }
                if simdutf8::basic::from_utf8(reason).is_err() {
                    return Err((
                        close_code::INVALID_PAYLOAD,
                        "close reason is not valid UTF-8",
                    ));
                }
                Ok(())
            }
        }
    }

    fn parse_header(&mut self, b: &[u8]) -> HeaderResult {
        if b.len() < 2 {
            return HeaderResult::Incomplete;
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = b[0] & 0x0F;
        let masked = b[1] & 0x80 != 0;
        let len7 = b[1] & 0x7F;
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let hlen = 2 + ext + if masked { 4 } else { 0 };
        if b.len() < hlen {
            return HeaderResult::Incomplete;
        }
        let len = match len7 {
            126 => u16::from_be_bytes([b[2], b[3]]) as u64,
            127 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[2..10]);
                let l = u64::from_be_bytes(a);
                if l >> 63 != 0 {
                    return HeaderResult::Bad(
                        close_code::PROTOCOL_ERROR,
                        "payload length has the most significant bit set",
                    );
                }
                l
            }
            n => n as u64,
        };
        match (self.dir, masked) {
            (Direction::ClientToBackend, false) => {
                return HeaderResult::Bad(close_code::PROTOCOL_ERROR, "client frame is not masked")
            }
            (Direction::BackendToClient, true) => {
                return HeaderResult::Bad(close_code::PROTOCOL_ERROR, "server frame is masked")
            }
            _ => {}
        }
        if b[0] & 0x70 != 0 && !self.rsv_allowed {
            return HeaderResult::Bad(
                close_code::PROTOCOL_ERROR,
                "RSV bit set but no extension was agreed",
            );
        }
        let is_control = opcode & 0x8 != 0;
        match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
            _ => return HeaderResult::Bad(close_code::PROTOCOL_ERROR, "reserved opcode"),
        }
        if is_control {
            if !fin {
                return HeaderResult::Bad(close_code::PROTOCOL_ERROR, "fragmented control frame");
            }
            if len > 125 {
                return HeaderResult::Bad(
                    close_code::PROTOCOL_ERROR,
                    "control frame payload over 125 bytes",
                );
            }
            if opcode == OP_CLOSE {
                // Held until complete, then checked before any of it goes on.
                let end = hlen + len as usize;
                if b.len() < end {
                    return HeaderResult::Incomplete;
                }
                let mut payload = [0u8; 125];
                let payload = &mut payload[..len as usize];
                payload.copy_from_slice(&b[hlen..end]);
                if masked {
                    let k = &b[hlen - 4..hlen];
                    for (i, x) in payload.iter_mut().enumerate() {
                        *x ^= k[i % 4];
                    }
                }
                if let Err((code, reason)) = Self::check_close(payload) {
                    return HeaderResult::Bad(code, reason);
                }
            }
        } else {
            if opcode == OP_CONTINUATION && self.message.is_none() {
                return HeaderResult::Bad(
                    close_code::PROTOCOL_ERROR,
                    "continuation frame without a message in progress",
                );
            }
            if opcode != OP_CONTINUATION && self.message.is_some() {
                return HeaderResult::Bad(
                    close_code::PROTOCOL_ERROR,
                    "new data frame while a fragmented message is in progress",
                );
            }
            if len > self.max_frame_size {
                return HeaderResult::TooBig(SizeLimit::MaxFrameSize);
            }
            let so_far = if opcode == OP_CONTINUATION {
                self.message_len
            } else {
                0
            };
            if let Some(max) = self.max_message_size {
                if so_far.saturating_add(len) > max {
                    return HeaderResult::TooBig(SizeLimit::MaxMessageSize);
                }
            }
        }
        self.fin = fin;
        self.opcode = opcode;
        self.remaining = len;
        self.payload_pos = 0;
        self.mask = if masked {
            let k = &b[hlen - 4..hlen];
            Some([k[0], k[1], k[2], k[3]])
        } else {
            None
        };
        match opcode {
            OP_TEXT | OP_BINARY => {
                self.message = Some(opcode);
                self.message_len = len;
                self.utf8 = Utf8Stream::default();
                if opcode == OP_TEXT {
                    self.stats.text_frames += 1;
                } else {
                    self.stats.binary_frames += 1;
                }
            }
            OP_CONTINUATION => {
                self.message_len += len;
                self.stats.continuation_frames += 1;
            }
            OP_CLOSE => {
                self.ctrl.clear();
                self.stats.close_frames += 1;
            }
            OP_PING => self.stats.ping_frames += 1,
            _ => self.stats.pong_frames += 1,
        }
        HeaderResult::Ok(hlen)
    }

    fn finish_frame(&mut self) -> Option<Event> {
        match self.opcode {
            OP_TEXT | OP_BINARY | OP_CONTINUATION if self.fin => {
                if self.checking_text() && self.utf8.finish().is_err() {
                    return Some(Event::Violation {
                        code: close_code::INVALID_PAYLOAD,
                        reason: "invalid UTF-8 in a text message",
                        limit: None,
                    });
                }
                self.stats.messages += 1;
                match self.message.take() {
                    Some(OP_TEXT) => self.stats.text_messages += 1,
                    _ => self.stats.binary_messages += 1,
                }
                self.message_len = 0;
                None
            }
            OP_CLOSE => {
                let (code, reason) = if self.ctrl.len() >= 2 {
                    (
                        Some(u16::from_be_bytes([self.ctrl[0], self.ctrl[1]])),
                        String::from_utf8_lossy(&self.ctrl[2..]).into_owned(),
                    )
                } else {
                    (None, String::new())
                };
                Some(Event::Close { code, reason })
            }
            _ => None,
        }
    }
}

enum HeaderResult {
    Incomplete,
    Ok(usize),
    Bad(u16, &'static str),
    TooBig(SizeLimit),
}

/// Builds a close frame the gateway sends itself. Frames towards the backend are masked with a
/// fresh random key, as RFC 6455 requires of a client.
pub fn close_frame(dir: Direction, code: u16, reason: &str) -> Vec<u8> {
    // A close reason must fit the 125-byte control payload; cut at a char boundary.
    let mut reason = reason;
    while reason.len() > 123 {
        let mut cut = 123;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason = &reason[..cut];
    }
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    let mut out = Vec::with_capacity(6 + payload.len());
    out.push(0x80 | OP_CLOSE);
    match dir {
        Direction::BackendToClient => {
            out.push(payload.len() as u8);
            out.extend_from_slice(&payload);
        }
        Direction::ClientToBackend => {
            out.push(0x80 | payload.len() as u8);
            let key: [u8; 4] = rand::random();
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | op];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => v.push(m | n as u8),
            n if n < 65536 => {
                v.push(m | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(m | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                v.extend_from_slice(&k);
                v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => v.extend_from_slice(payload),
        }
        v
    }

    const K: Option<[u8; 4]> = Some([1, 2, 3, 4]);

    #[test]
    fn byte_by_byte_equals_whole() {
        let mut data = frame(false, OP_TEXT, b"hel", K);
        data.extend(frame(true, OP_PING, b"p", K));
        data.extend(frame(true, OP_CONTINUATION, &[b'x'; 300], K));
        data.extend(frame(true, OP_BINARY, &[7; 70000], K));
        let mut whole = FrameParser::new(Direction::ClientToBackend, u64::MAX, None);
        assert_eq!(whole.advance(&data).forward, data.len());
        // Feed one byte at a time, carrying incomplete headers like the relay does.
        let mut split = FrameParser::new(Direction::ClientToBackend, u64::MAX, None);
        let mut carry = Vec::new();
        for b in &data {
            carry.push(*b);
            let a = split.advance(&carry);
            assert!(a.event.is_none());
            carry.drain(..a.forward);
        }
        assert!(carry.is_empty());
        assert_eq!(whole.stats, split.stats);
        assert_eq!(whole.stats.frames, 4);
        assert_eq!(whole.stats.messages, 2);
        assert_eq!(whole.stats.ping_frames, 1);
        assert_eq!(whole.stats.bytes, data.len() as u64);
    }

    #[test]
    fn a_parser_paused_between_frames_goes_on_in_another() {
        // "é" (2 bytes) split between two fragments of a text message: the second half, the
        // message's end and its validation happen in the resumed parser.
        let first = frame(false, OP_TEXT, &[b'a', 0xC3], K);
        let mut rest = frame(true, OP_CONTINUATION, &[0xA9, b'b'], K);
        rest.extend(frame(true, OP_BINARY, &[1; 200], K));
        let new = || {
            FrameParser::new(Direction::ClientToBackend, 1 << 20, Some(1 << 20))
                .with_extensions(false)
        };
        let mut whole = new();
        let mut all = first.clone();
        all.extend_from_slice(&rest);
        assert_eq!(whole.advance(&all).forward, all.len());

        let mut old = new();
        // Inside a frame: no pause, and the payload still to read is known exactly.
        assert_eq!(old.advance(&first[..7]).forward, 7);
        assert!(old.pause().is_none());
        assert_eq!(old.payload_left(), Some(1));
        assert_eq!(old.advance(&first[7..]).forward, 1);
        assert_eq!(old.payload_left(), None);
        let state = old.pause().unwrap();
        assert_eq!(state.utf8_carry, [0xC3]);
        assert_eq!(state.message, Some(OP_TEXT));
        let mut resumed = new().resume(state.clone()).unwrap();
        let a = resumed.advance(&rest);
        assert_eq!((a.forward, a.event), (rest.len(), None));
        assert_eq!(resumed.stats, whole.stats);

        // Resumed with an invalid continuation of the carried code point: a violation, as
        // the first parser would have found.
        let mut bad = new().resume(state.clone()).unwrap();
        let broken = frame(true, OP_CONTINUATION, b"xx", K);
        assert!(matches!(
            bad.advance(&broken).event,
            Some(Event::Violation {
                code: close_code::INVALID_PAYLOAD,
                ..
            })
        ));
        // States no parser pauses in are refused.
        for damaged in [
            ParserState {
                message: Some(OP_PING),
                ..state.clone()
            },
            ParserState {
                utf8_carry: vec![b'a'],
                ..state.clone()
            },
            ParserState {
                utf8_carry: vec![0xF0, 0x9F, 0x98, 0x80],
                ..state.clone()
            },
            ParserState {
                message: None,
                ..state.clone()
            },
            ParserState {
                message_len: 2 << 20,
                ..state
            },
        ] {
            assert_eq!(new().resume(damaged).err(), Some(BadState));
        }
    }

    #[test]
    fn close_frame_is_captured_and_unmasked() {
        let f = close_frame(Direction::ClientToBackend, 4000, "bye");
        let mut p = FrameParser::new(Direction::ClientToBackend, 1024, None);
        let a = p.advance(&f);
        assert_eq!(a.forward, f.len());
        assert_eq!(
            a.event,
            Some(Event::Close {
                code: Some(4000),
                reason: "bye".into()
            })
        );
    }

    #[test]
    fn violations() {
        let cases: Vec<(Direction, Vec<u8>, u16)> = vec![
            (
                Direction::ClientToBackend,
                frame(true, OP_TEXT, b"a", None),
                1002,
            ),
            (
                Direction::BackendToClient,
                frame(true, OP_TEXT, b"a", K),
                1002,
            ),
            (
                Direction::BackendToClient,
                frame(true, 0x3, b"", None),
                1002,
            ),
            (
                Direction::BackendToClient,
                frame(false, OP_PING, b"", None),
                1002,
            ),
            (
                Direction::BackendToClient,
                frame(true, OP_CONTINUATION, b"", None),
                1002,
            ),
            (
                Direction::BackendToClient,
                frame(true, OP_BINARY, &[0; 2000], None),
                1009,
            ),
        ];
        for (dir, f, code) in cases {
            let mut p = FrameParser::new(dir, 1000, None);
            let a = p.advance(&f);
            assert_eq!(a.forward, 0);
            assert!(matches!(a.event, Some(Event::Violation { code: c, .. }) if c == code));
        }
    }

    #[test]
    fn rsv_bits_need_an_agreed_extension() {
        let mut f = frame(true, OP_TEXT, b"a", K);
        f[0] |= 0x40; // RSV1, as permessage-deflate uses it
        let mut with =
            FrameParser::new(Direction::ClientToBackend, 1000, None).with_extensions(true);
        assert_eq!(with.advance(&f).forward, f.len());
        let mut without =
            FrameParser::new(Direction::ClientToBackend, 1000, None).with_extensions(false);
        let a = without.advance(&f);
        assert_eq!(a.forward, 0);
        assert!(matches!(a.event, Some(Event::Violation { code: 1002, .. })));
        // Clear RSV bits are fine either way.
        let plain = frame(true, OP_TEXT, b"a", K);
        let mut without =
            FrameParser::new(Direction::ClientToBackend, 1000, None).with_extensions(false);
        assert_eq!(without.advance(&plain).forward, plain.len());
    }

    /// Feeds `text` to a fresh stream split at every possible pair of points.
    fn utf8_verdict_for_every_split(text: &[u8]) -> bool {
        let whole = {
            let mut u = Utf8Stream::default();
            u.feed(text).is_ok() && u.finish().is_ok()
        };
        for i in 0..=text.len() {
            for j in i..=text.len() {
                let mut u = Utf8Stream::default();
                let split = u.feed(&text[..i]).is_ok()
                    && u.feed(&text[i..j]).is_ok()
                    && u.feed(&text[j..]).is_ok()
                    && u.finish().is_ok();
                assert_eq!(split, whole, "{text:02x?} split at {i}, {j}");
            }
        }
        whole
    }

    #[test]
    fn utf8_stream_agrees_with_std_however_the_text_is_cut() {
        for t in [
            "κόσμε".as_bytes(),
            "Hello-µ@ßöäüàá-UTF-8!!".as_bytes(),
            "𝄞 and 😀".as_bytes(),
            b"",
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
            b"\xf4\x90\x80\x80",
            b"\xc0\xaf",
            b"\xed\xbf\xbf",
            b"\xef\xbf\xbf",
            b"\xf0\x9f\x98",
            b"a\xff",
            b"\xce",
        ] {
            assert_eq!(
                utf8_verdict_for_every_split(t),
                std::str::from_utf8(t).is_ok(),
                "{t:02x?}"
            );
        }
    }

    #[test]
    fn unmasking_by_words_matches_byte_by_byte() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for offset in 0..9u64 {
            for len in [0usize, 1, 3, 7, 8, 9, 17, 1000] {
                let mut out = vec![0; len];
                unmask_into(&mut out, &data[..len], key, offset);
                let want: Vec<u8> = data[..len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ key[(offset as usize + i) % 4])
                    .collect();
                assert_eq!(out, want, "offset {offset}, len {len}");
            }
        }
    }

    #[test]
    fn masked_ascii_sees_a_high_bit_anywhere_at_any_offset() {
        let key = [0x12, 0x80, 0x7f, 0xff];
        for len in 0..40 {
            for offset in 0..4u64 {
                let plain = vec![b'a'; len];
                let masked: Vec<u8> = plain
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ key[(i + offset as usize) % 4])
                    .collect();
                assert!(
                    masked_ascii(&masked, key, offset),
                    "len {len} offset {offset}"
                );
                for at in 0..len {
                    let mut m = masked.clone();
                    m[at] ^= 0x80;
                    assert!(
                        !masked_ascii(&m, key, offset),
                        "len {len} offset {offset} at {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn utf8_fails_fast_on_an_impossible_prefix() {
        // 0xF4 0x90 can never start a valid code point (> U+10FFFF): no need to wait.
        let mut u = Utf8Stream::default();
        assert!(u.feed(b"ok \xf4").is_ok());
        assert_eq!(u.feed(b"\x90"), Err(InvalidUtf8));
    }

    fn parsed(dir: Direction, data: &[u8]) -> Advance {
        FrameParser::new(dir, 1 << 20, None)
            .with_extensions(false)
            .advance(data)
    }

    #[test]
    fn invalid_text_is_stopped_before_its_frame_when_it_arrives_whole() {
        let mut data = frame(true, OP_TEXT, b"fine", K);
        let bad = data.len();
        data.extend(frame(true, OP_TEXT, b"bad \xff text", K));
        let a = parsed(Direction::ClientToBackend, &data);
        assert_eq!(a.forward, bad, "the bad frame is not forwarded at all");
        assert!(matches!(a.event, Some(Event::Violation { code: 1007, .. })));
        // Unmasked (backend) text the same.
        let a = parsed(
            Direction::BackendToClient,
            &frame(true, OP_TEXT, b"\xed\xa0\x80", None),
        );
        assert_eq!(a.forward, 0);
        assert!(matches!(a.event, Some(Event::Violation { code: 1007, .. })));
        // Binary is not text.
        let b = frame(true, OP_BINARY, b"\xff", None);
        assert_eq!(parsed(Direction::BackendToClient, &b).forward, b.len());
        // With an extension agreed, payloads may be compressed: not checked.
        let mut p = FrameParser::new(Direction::BackendToClient, 1000, None).with_extensions(true);
        let t = frame(true, OP_TEXT, b"\xff", None);
        assert_eq!(p.advance(&t).forward, t.len());
    }

    #[test]
    fn invalid_text_across_fragments_and_reads_fails_at_the_first_bad_byte() {
        // "κ" split between two fragments is fine; a truncated code point at the end is not.
        let mut p = FrameParser::new(Direction::ClientToBackend, 1000, None).with_extensions(false);
        let f1 = frame(false, OP_TEXT, b"a\xce", K);
        assert_eq!(p.advance(&f1).forward, f1.len());
        let f2 = frame(true, OP_CONTINUATION, b"\xba!", K);
        let a = p.advance(&f2);
        assert_eq!((a.forward, a.event), (f2.len(), None));
        let f3 = frame(false, OP_TEXT, b"\xe2\x82", K);
        assert_eq!(p.advance(&f3).forward, f3.len());
        let f4 = frame(true, OP_CONTINUATION, b"", K);
        let a = p.advance(&f4);
        assert_eq!(a.forward, 0);
        assert!(matches!(a.event, Some(Event::Violation { code: 1007, .. })));
        // Masked ASCII after an unfinished code point fails at once, not at the message's end
        // (the all-ASCII shortcut must not skip the byte that breaks the code point).
        let mut p = FrameParser::new(Direction::ClientToBackend, 1000, None).with_extensions(false);
        let f1 = frame(false, OP_TEXT, b"a\xce", K);
        assert_eq!(p.advance(&f1).forward, f1.len());
        let f2 = frame(true, OP_CONTINUATION, &[b'x'; 100], K);
        let a = p.advance(&f2[..50]);
        assert_eq!(a.forward, 0, "the piece with the broken code point is held");
        assert!(matches!(a.event, Some(Event::Violation { code: 1007, .. })));
        // A long frame read in pieces: the piece with the bad byte is not forwarded.
        let mut p = FrameParser::new(Direction::BackendToClient, 1000, None).with_extensions(false);
        let mut f = frame(true, OP_TEXT, &[b'x'; 200], None);
        f[150] = 0xff;
        let a = p.advance(&f[..100]);
        assert_eq!((a.forward, a.event), (100, None));
        let a = p.advance(&f[100..]);
        assert_eq!(a.forward, 0, "nothing of the bad piece goes on");
        assert!(matches!(a.event, Some(Event::Violation { code: 1007, .. })));
        assert!(!p.at_boundary(), "the receiver is mid-frame");
    }

    #[test]
    fn close_frames_are_checked_whole_before_forwarding() {
        let close = |payload: &[u8]| frame(true, OP_CLOSE, payload, K);
        let code = |c: u16, reason: &[u8]| {
            let mut v = c.to_be_bytes().to_vec();
            v.extend_from_slice(reason);
            v
        };
        for (payload, expect) in [
            (vec![], None),
            (code(1000, b"bye"), None),
            (code(1012, b""), None),
            (code(4999, "κόσμε".as_bytes()), None),
            (vec![0x03], Some(1002)),
            (code(999, b""), Some(1002)),
            (code(1005, b""), Some(1002)),
            (code(1006, b""), Some(1002)),
            (code(1015, b""), Some(1002)),
            (code(1016, b""), Some(1002)),
            (code(2999, b""), Some(1002)),
            (code(5000, b""), Some(1002)),
            (code(1000, b"\xce\xba\xff"), Some(1007)),
        ] {
            let f = close(&payload);
            let a = parsed(Direction::ClientToBackend, &f);
            match expect {
                None => {
                    assert_eq!(a.forward, f.len(), "{payload:02x?}");
                    assert!(matches!(a.event, Some(Event::Close { .. })));
                }
                Some(c) => {
                    assert_eq!(a.forward, 0, "{payload:02x?}");
                    assert!(
                        matches!(a.event, Some(Event::Violation { code, .. }) if code == c),
                        "{payload:02x?}: {:?}",
                        a.event
                    );
                }
            }
        }
        // A close frame arriving in pieces is held until it is whole.
        let f = close(&code(1000, b"bye"));
        let mut p = FrameParser::new(Direction::ClientToBackend, 1000, None);
        assert_eq!(p.advance(&f[..f.len() - 1]).forward, 0);
        assert_eq!(p.advance(&f).forward, f.len());
    }

    #[test]
    fn message_size_counts_fragments() {
        let mut p = FrameParser::new(Direction::BackendToClient, 1000, Some(1000));
        let a = p.advance(&frame(false, OP_TEXT, &[b'a'; 600], None));
        assert!(a.event.is_none());
        let a = p.advance(&frame(true, OP_CONTINUATION, &[b'a'; 600], None));
        assert!(matches!(a.event, Some(Event::Violation { code: 1009, .. })));
    }

    #[test]
    fn size_violations_name_their_limit_and_others_none() {
        let limit = |a: &Advance| match &a.event {
            Some(Event::Violation { limit, .. }) => *limit,
            other => panic!("no violation: {other:?}"),
        };
        let mut p = FrameParser::new(Direction::BackendToClient, 100, Some(150));
        let a = p.advance(&frame(true, OP_BINARY, &[0; 101], None));
        assert_eq!(limit(&a), Some(SizeLimit::MaxFrameSize));
        let mut p = FrameParser::new(Direction::BackendToClient, 100, Some(150));
        let mut data = frame(false, OP_BINARY, &[0; 100], None);
        data.extend(frame(true, OP_CONTINUATION, &[0; 51], None));
        let a = p.advance(&data);
        assert_eq!(limit(&a), Some(SizeLimit::MaxMessageSize));
        assert_eq!(SizeLimit::MaxMessageSize.key(), "max_message_size");
        assert_eq!(SizeLimit::MaxFrameSize.key(), "max_frame_size");
        let mut p = FrameParser::new(Direction::BackendToClient, 100, None);
        let a = p.advance(&frame(true, OP_BINARY, b"x", Some([1, 2, 3, 4])));
        assert_eq!(limit(&a), None, "a masked server frame is no size limit");
        let mut p = FrameParser::new(Direction::BackendToClient, 100, None).with_extensions(false);
        let a = p.advance(&frame(true, OP_TEXT, &[0xff], None));
        assert_eq!(limit(&a), None, "invalid UTF-8 is no size limit");
    }

    // ---- Found by `cargo mutants` (tests/README.md): counters, boundaries, positions. ----

    /// Feeds `data` whole and expects all of it forwarded, with no event.
    fn forwards_all(p: &mut FrameParser, data: &[u8]) {
        assert_eq!(
            p.advance(data),
            Advance {
                forward: data.len(),
                discard: 0,
                event: None
            }
        );
    }

    /// The close code of a violation, if `a` reports one.
    fn violation(a: &Advance) -> Option<u16> {
        match a.event {
            Some(Event::Violation { code, .. }) => Some(code),
            _ => None,
        }
    }

    #[test]
    fn every_counter_counts_what_it_names() {
        let mut data = frame(false, OP_TEXT, b"ab", K); // 6 + 2
        data.extend(frame(false, OP_CONTINUATION, b"cd", K)); // 6 + 2
        data.extend(frame(true, OP_PING, b"", K)); // 6
        data.extend(frame(true, OP_CONTINUATION, b"e", K)); // 6 + 1
        data.extend(frame(true, OP_BINARY, &[1, 2, 3], K)); // 6 + 3
        data.extend(frame(true, OP_BINARY, &[4], K)); // 6 + 1
        data.extend(frame(true, OP_PONG, b"x", K)); // 6 + 1
        let mut p = FrameParser::new(Direction::ClientToBackend, 1000, None).with_extensions(false);
        let a = p.advance(&data);
        assert_eq!((a.forward, a.event), (data.len(), None));
        let mut close = frame(true, OP_CLOSE, &[0x03, 0xe8, b'o', b'k'], K); // 6 + 4
        let a = p.advance(&close);
        assert_eq!(a.forward, close.len());
        close.clear();
        assert_eq!(
            p.stats,
            DirStats {
                bytes: data.len() as u64 + 10,
                frames: 8,
                messages: 3,
                text_frames: 1,
                binary_frames: 2,
                continuation_frames: 2,
                ping_frames: 1,
                pong_frames: 1,
                close_frames: 1,
                text_messages: 1,
                binary_messages: 2,
                ..DirStats::default()
            }
        );
    }

    #[test]
    fn boundary_and_message_state_follow_the_bytes() {
        let mut p = FrameParser::new(Direction::BackendToClient, 1000, None);
        assert!(p.at_boundary() && !p.in_message());
        let f = frame(false, OP_BINARY, b"abcd", None);
        assert_eq!(p.advance(&f[..4]).forward, 4); // header and half the payload
        assert!(!p.at_boundary() && p.in_message());
        assert_eq!(p.advance(&f[4..]).forward, 2);
        assert!(p.at_boundary() && p.in_message(), "between fragments");
        let f = frame(true, OP_CONTINUATION, b"", None);
        assert_eq!(p.advance(&f).forward, f.len());
        assert!(p.at_boundary() && !p.in_message());
    }

    #[test]
    fn limits_hold_exactly_at_their_value() {
        // A frame of exactly max_frame_size passes; one byte more is a 1009.
        let mut p = FrameParser::new(Direction::BackendToClient, 100, None);
        let f = frame(true, OP_BINARY, &[0; 100], None);
        forwards_all(&mut p, &f);
        let f = frame(true, OP_BINARY, &[0; 101], None);
        assert_eq!(violation(&p.advance(&f)), Some(1009));
        // A message of exactly max_message_size passes, across fragments; one byte more fails.
        let mut p = FrameParser::new(Direction::BackendToClient, 1000, Some(10));
        let mut data = frame(false, OP_BINARY, &[0; 6], None);
        data.extend(frame(true, OP_CONTINUATION, &[0; 4], None));
        forwards_all(&mut p, &data);
        let mut data = frame(false, OP_BINARY, &[0; 6], None);
        data.extend(frame(true, OP_CONTINUATION, &[0; 5], None));
        let a = p.advance(&data);
        assert_eq!(
            a.forward, 8,
            "the first fragment goes, the one over the limit does not"
        );
        assert!(matches!(a.event, Some(Event::Violation { code: 1009, .. })));
        // A control frame may carry 125 bytes, not 126.
        let mut p = FrameParser::new(Direction::BackendToClient, 1000, None);
        let f = frame(true, OP_PING, &[0; 125], None);
        forwards_all(&mut p, &f);
        let f = frame(true, OP_PING, &[0; 126], None);
        assert_eq!(violation(&p.advance(&f)), Some(1002));
    }

    #[test]
    fn a_64_bit_length_is_read_whole_and_its_top_bit_refused() {
        let mut p = FrameParser::new(Direction::BackendToClient, u64::MAX, None);
        let f = frame(true, OP_BINARY, &[9; 70_000], None);
        assert_eq!(p.advance(&f[..10]).forward, 10);
        assert!(!p.at_boundary());
        assert_eq!(p.advance(&f[10..]).forward, 70_000);
        assert!(p.at_boundary());
        let mut top = vec![0x82, 127];
        top.extend_from_slice(&(1u64 << 63).to_be_bytes());
        let mut p = FrameParser::new(Direction::BackendToClient, u64::MAX, None);
        assert_eq!(violation(&p.advance(&top)), Some(1002));
    }

    #[test]
    fn binary_is_never_checked_as_text() {
        let mut p = FrameParser::new(Direction::ClientToBackend, 1000, None).with_extensions(false);
        let f = frame(true, OP_BINARY, b"\xff\xfe", K);
        forwards_all(&mut p, &f);
        let mut data = frame(false, OP_BINARY, b"\xc3", K);
        data.extend(frame(true, OP_CONTINUATION, b"(", K));
        forwards_all(&mut p, &data);
    }

    #[test]
    fn a_bad_byte_fails_at_once_even_at_the_end_of_a_piece() {
        // 0xff can start nothing: the piece that ends with it fails, nothing is carried.
        let mut u = Utf8Stream::default();
        assert_eq!(u.feed(b"ok\xff"), Err(InvalidUtf8));
        let mut u = Utf8Stream::default();
        assert_eq!(u.feed(b"\xe2\x28"), Err(InvalidUtf8));
    }

    #[test]
    fn masked_text_across_blocks_is_unmasked_at_its_offset() {
        // A multi-byte text frame longer than a block, read in pieces whose starts are not
        // multiples of 4 into the payload: every piece must be unmasked with the key rotated
        // to its own offset, or valid text would fail (and the reverse).
        let text: Vec<u8> = "κόσμε ".repeat(1200).into_bytes(); // > 2 blocks
        let key = [0x11, 0x22, 0x33, 0x44];
        let f = frame(true, OP_TEXT, &text, Some(key));
        for first in [9usize, 10, 11, 4105] {
            let mut p =
                FrameParser::new(Direction::ClientToBackend, u64::MAX, None).with_extensions(false);
            let a = p.advance(&f[..first]);
            assert_eq!(
                a,
                Advance {
                    forward: first,
                    discard: 0,
                    event: None
                },
                "first {first}"
            );
            let a = p.advance(&f[first..]);
            assert_eq!(
                a,
                Advance {
                    forward: f.len() - first,
                    discard: 0,
                    event: None
                },
                "first {first}"
            );
        }
        // And a bad byte deep in the second block is still found.
        let mut bad = text.clone();
        bad[5000] = 0xff;
        let f = frame(true, OP_TEXT, &bad, Some(key));
        let mut p =
            FrameParser::new(Direction::ClientToBackend, u64::MAX, None).with_extensions(false);
        assert_eq!(p.advance(&f[..9]).forward, 9);
        assert_eq!(violation(&p.advance(&f[9..])), Some(1007));
    }

    #[test]
    fn the_gateways_own_close_frames_are_well_formed() {
        for dir in [Direction::BackendToClient, Direction::ClientToBackend] {
            let long = "é".repeat(100); // 200 bytes: cut to 122 (a char boundary under 123)
            for (code, reason, want) in [
                (1001u16, "going away", "going away".to_owned()),
                (1009, long.as_str(), "é".repeat(61)),
                (1000, "", String::new()),
            ] {
                let f = close_frame(dir, code, reason);
                assert_eq!(f[0], 0x88, "FIN and close opcode");
                let masked = dir == Direction::ClientToBackend;
                assert_eq!(f[1] & 0x80 != 0, masked);
                let len = usize::from(f[1] & 0x7f);
                assert_eq!(len, 2 + want.len());
                let payload: Vec<u8> = if masked {
                    let k = [f[2], f[3], f[4], f[5]];
                    f[6..]
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ k[i % 4])
                        .collect()
                } else {
                    f[2..].to_vec()
                };
                assert_eq!(payload.len(), len);
                assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code);
                assert_eq!(&payload[2..], want.as_bytes());
                // And the gateway's own parser accepts it.
                let mut p = FrameParser::new(dir, 1000, None).with_extensions(false);
                let a = p.advance(&f);
                assert_eq!(a.forward, f.len());
                assert_eq!(
                    a.event,
                    Some(Event::Close {
                        code: Some(code),
                        reason: want.clone()
                    })
                );
            }
        }
    }

    #[test]
    fn only_text_and_its_continuations_are_checked() {
        // A binary message's continuation and a ping inside a text message are not text.
        let mut p = FrameParser::new(Direction::ClientToBackend, 1000, None).with_extensions(false);
        let mut data = frame(false, OP_BINARY, b"\xc3", K);
        data.extend(frame(true, OP_CONTINUATION, b"\xff", K));
        data.extend(frame(false, OP_TEXT, b"ok", K));
        data.extend(frame(true, OP_PING, b"\xff", K));
        data.extend(frame(true, OP_CONTINUATION, b"!", K));
        forwards_all(&mut p, &data);
    }

    #[test]
    fn a_message_ending_inside_a_code_point_holds_back_only_its_last_piece() {
        // The final frame's header and first byte arrive in one read, the rest (ending inside
        // a code point) in the next: that whole second piece is held back.
        let mut p = FrameParser::new(Direction::BackendToClient, 1000, None).with_extensions(false);
        let f = frame(true, OP_TEXT, b"abc\xe2\x82", None);
        assert_eq!(
            p.advance(&f[..3]),
            Advance {
                forward: 3,
                discard: 0,
                event: None
            }
        );
        let a = p.advance(&f[3..]);
        assert_eq!(a.forward, 0);
        assert!(matches!(a.event, Some(Event::Violation { code: 1007, .. })));
    }

    #[test]
    fn message_size_adds_up_over_many_fragments() {
        let mut p = FrameParser::new(Direction::BackendToClient, 1000, Some(12));
        let mut data = frame(false, OP_BINARY, &[0; 4], None);
        data.extend(frame(false, OP_CONTINUATION, &[0; 4], None));
        data.extend(frame(false, OP_CONTINUATION, &[0; 4], None));
        forwards_all(&mut p, &data);
        let f = frame(true, OP_CONTINUATION, &[0; 1], None);
        assert_eq!(violation(&p.advance(&f)), Some(1009));
    }

    #[test]
    fn masked_ascii_then_text_keeps_the_key_in_step() {
        // A whole ASCII block (skipped while masked), then multi-byte text, read from an
        // offset that is not a multiple of 4.
        let mut text = vec![b'a'; 5000];
        text.extend("κόσμε".repeat(500).into_bytes());
        // Key bytes that differ in their high bits: a key out of step breaks the UTF-8.
        let f = frame(true, OP_TEXT, &text, Some([0x00, 0x80, 0x40, 0xc0]));
        let mut p =
            FrameParser::new(Direction::ClientToBackend, u64::MAX, None).with_extensions(false);
        assert_eq!(p.advance(&f[..11]).forward, 11);
        assert_eq!(
            p.advance(&f[11..]),
            Advance {
                forward: f.len() - 11,
                discard: 0,
                event: None
            }
        );
    }

    /// What a relay forwards of `data` fed in pieces of `step` bytes: the pump's loop (cut out
    /// what is discarded, go on with the rest), and the first event.
    fn relayed(p: &mut FrameParser, data: &[u8], step: usize) -> (Vec<u8>, Option<Event>) {
        let mut out = Vec::new();
        let mut held: Vec<u8> = Vec::new();
        for piece in data.chunks(step) {
            held.extend_from_slice(piece);
            loop {
                let a = p.advance(&held);
                out.extend_from_slice(&held[..a.forward]);
                held.drain(..a.forward + a.discard);
                if a.event.is_some() {
                    return (out, a.event);
                }
                if a.discard == 0 || held.is_empty() {
                    break;
                }
            }
        }
        (out, None)
    }

    fn limited(action: RateAction) -> FrameParser {
        let spec = crate::rate::RateSpec {
            messages: Some(crate::rate::Rate {
                per_second: 1,
                burst: 2,
            }),
            bytes: None,
            action,
        };
        FrameParser::new(Direction::ClientToBackend, 1 << 20, None)
            .with_extensions(false)
            .with_message_rate(Some(MessageRate::new(&spec, std::time::Instant::now())))
    }

    /// `drop`: the third and fourth messages vanish whole (a fragmented one with a ping inside,
    /// whose ping passes), at any split of the input; the first two keep their fragments.
    #[test]
    fn dropped_messages_are_cut_out_whole_and_their_control_frames_pass() {
        let kept: Vec<Vec<u8>> = vec![
            frame(true, OP_TEXT, b"one", K),
            frame(false, OP_BINARY, &[2; 200], K),
            frame(true, OP_PING, b"p1", K),
            frame(true, OP_CONTINUATION, &[3; 70], K),
        ];
        let ping = frame(true, OP_PING, b"p2", K);
        let mut data: Vec<u8> = kept.concat();
        data.extend(frame(false, OP_TEXT, b"dropped ", K));
        data.extend(&ping);
        data.extend(frame(false, OP_CONTINUATION, &[b'x'; 300], K));
        data.extend(frame(true, OP_CONTINUATION, b"end", K));
        data.extend(frame(true, OP_BINARY, &[9; 70_000], K));
        let close = frame(true, OP_CLOSE, &1000u16.to_be_bytes(), K);
        data.extend(&close);
        let mut want = kept.concat();
        want.extend(&ping);
        want.extend(&close);
        for step in [1, 2, 7, 64, 1000, data.len()] {
            let mut p = limited(RateAction::Drop);
            let (out, event) = relayed(&mut p, &data, step);
            assert!(matches!(event, Some(Event::Close { .. })), "step {step}");
            assert_eq!(out.len(), want.len(), "step {step}");
            assert!(out == want, "step {step}");
            assert_eq!(p.stats.dropped_over_messages, 2, "step {step}");
            assert_eq!(p.stats.messages, 2, "step {step}");
            assert!(!p.in_message() && p.at_boundary(), "step {step}");
        }
    }

    /// One endless fragmented message cannot outrun a byte rate: its first frame is small, but
    /// each later frame must fit the bucket too, and one that does not ends the connection
    /// (1008) even with `drop`, since half a message cannot be dropped.
    #[test]
    fn an_endless_fragmented_message_is_stopped_by_the_byte_rate() {
        for action in [RateAction::Drop, RateAction::Close] {
            let spec = crate::rate::RateSpec {
                messages: None,
                bytes: Some(crate::rate::Rate {
                    per_second: 1,
                    burst: 1000,
                }),
                action,
            };
            let mut p = FrameParser::new(Direction::ClientToBackend, 1 << 20, None)
                .with_extensions(false)
                .with_message_rate(Some(MessageRate::new(&spec, std::time::Instant::now())));
            let mut data = frame(false, OP_BINARY, b"", K);
            for _ in 0..10 {
                data.extend(frame(false, OP_CONTINUATION, &[5; 300], K));
            }
            let (out, event) = relayed(&mut p, &data, 100);
            // The empty first frame and three of 300 fit 1,000 bytes; the fourth does not.
            assert_eq!(out.len(), 6 + 3 * (8 + 300), "{action:?}");
            assert!(
                matches!(
                    event,
                    Some(Event::Violation {
                        code: close_code::POLICY_VIOLATION,
                        limit: Some(SizeLimit::MaxBytesPerSecond),
                        ..
                    })
                ),
                "{action:?}: {event:?}"
            );
            assert!(p.at_boundary());
        }
    }

    /// While a dropped frame's payload is skipped the receiver has seen none of it: the relay
    /// may insert a close there.
    #[test]
    fn inside_a_dropped_frame_the_receiver_is_at_a_boundary() {
        let mut p = limited(RateAction::Drop);
        let mut data = frame(true, OP_TEXT, b"a", K);
        data.extend(frame(true, OP_TEXT, b"b", K));
        let big = frame(true, OP_BINARY, &[1; 1000], K);
        data.extend(&big[..500]);
        let (out, event) = relayed(&mut p, &data, data.len());
        assert_eq!((out.len(), event), (2 * 7, None));
        assert!(p.at_boundary() && !p.in_message());
    }

    /// Several sets (the connection's own, and two shared ones): a message refused by a later
    /// set charges none of the earlier ones.
    #[test]
    fn a_message_refused_by_one_set_charges_none_of_the_others() {
        let spec = |burst| crate::rate::RateSpec {
            messages: Some(crate::rate::Rate {
                per_second: 1,
                burst,
            }),
            bytes: None,
            action: RateAction::Drop,
        };
        let now = std::time::Instant::now();
        let shared = |burst| -> SharedRate {
            std::sync::Arc::new(std::sync::Mutex::new(MessageRate::new(&spec(burst), now)))
        };
        let (a, b) = (shared(3), shared(1));
        let parser = |own: Vec<MessageRate>, shared: Vec<SharedRate>| {
            FrameParser::new(Direction::ClientToBackend, 1 << 20, None)
                .with_extensions(false)
                .with_message_rates(own, shared)
        };
        let mut data = frame(true, OP_TEXT, b"1", K);
        data.extend(frame(true, OP_TEXT, b"2", K));
        data.extend(frame(true, OP_TEXT, b"3", K));
        let mut p = parser(vec![MessageRate::new(&spec(5), now)], vec![a.clone(), b]);
        let (out, _) = relayed(&mut p, &data, data.len());
        assert_eq!(out.len(), 7, "only the first passes `b`");
        assert_eq!(p.stats.dropped_over_messages, 2);
        // `a` paid for the first message only: two of three pass through it alone.
        let mut q = parser(Vec::new(), vec![a]);
        let (out, _) = relayed(&mut q, &data, data.len());
        assert_eq!(out.len(), 14);
    }

    /// `close`: the message over the limit is a violation (1008) before any of it is forwarded.
    #[test]
    fn a_message_over_the_rate_with_close_is_a_violation_at_its_first_byte() {
        let mut data = frame(true, OP_TEXT, b"a", K);
        data.extend(frame(true, OP_TEXT, b"b", K));
        let before = data.len();
        data.extend(frame(false, OP_TEXT, b"c", K));
        for step in [1, 3, data.len()] {
            let mut p = limited(RateAction::Close);
            let (out, event) = relayed(&mut p, &data, step);
            assert_eq!(out.len(), before, "step {step}");
            assert_eq!(
                event,
                Some(Event::Violation {
                    code: close_code::POLICY_VIOLATION,
                    reason: "message rate exceeds max_messages_per_second",
                    limit: Some(SizeLimit::MaxMessagesPerSecond),
                }),
                "step {step}"
            );
        }
    }

    #[test]
    fn a_close_reason_of_exactly_123_bytes_is_kept_whole() {
        let reason = "r".repeat(123);
        let f = close_frame(Direction::BackendToClient, 1000, &reason);
        assert_eq!(usize::from(f[1]), 125);
        assert_eq!(&f[4..], reason.as_bytes());
    }
}
