//! Whole messages out of a relayed stream, for message policies.
//!
//! The relay forwards frames as they stream by ([`crate::frame`]); an API with message policies
//! needs each data message whole before anything of it goes on. The [`Assembler`] walks bytes
//! the [`FrameParser`](crate::frame::FrameParser) has already checked (so every header is
//! valid, masking is where it must be, text is UTF-8) and:
//! - passes control frames on at once, even between the fragments of a message it is holding
//!   (a ping is never held back behind a message being assembled);
//! - holds a data message's frames as they came (`raw`: headers, masking, fragment
//!   boundaries) next to its payload joined and unmasked (what a policy reads), until its last
//!   fragment; the relay then forwards `raw` unchanged, or a replacement as one frame
//!   ([`data_frame`]), or nothing;
//! - stops a message larger than its limit before holding more of it: its payload at most the
//!   limit, and its frames, headers included, at most the limit plus [`HEADER_ALLOWANCE`], so
//!   a message of endless empty fragments is bounded like a big one. What one message holds is
//!   at most its frames and its payload unmasked: about twice the limit.
//!
//! Why hand-written: the frames are already parsed and checked once; this only finds their
//! boundaries again, keeping the original bytes, which a WebSocket library's message reader
//! does not do (it unmasks and reassembles into a buffer of its own and drops the framing).

use crate::frame::{Direction, OP_BINARY, OP_CONTINUATION, OP_TEXT};

/// How much a held message's frames, headers included, may exceed the payload limit: room for
/// some 290 fragment headers of a message at the limit.
pub const HEADER_ALLOWANCE: u64 = 4096;

/// What [`Assembler::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// Every byte given was taken; more are needed for a whole message.
    More,
    /// A whole data message is held, ending at the returned offset: take it with
    /// [`Assembler::take`] before feeding the rest.
    Message,
    /// The message being held would grow beyond the limit: nothing of it may go on.
    TooBig,
}

/// One whole data message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Its frames as they arrived (headers, masking and fragment boundaries).
    pub raw: Vec<u8>,
    /// The payload, every fragment joined, unmasked.
    pub payload: Vec<u8>,
    pub text: bool,
}

#[derive(Debug)]
struct Frame {
    control: bool,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Payload bytes not yet seen.
    remaining: u64,
    /// Payload bytes seen (the masking key's phase).
    seen: u64,
}

/// See the module's documentation. One per direction of a connection.
#[derive(Debug)]
pub struct Assembler {
    max_message: usize,
    /// A header being read (at most 14 bytes).
    header: Vec<u8>,
    frame: Option<Frame>,
    /// The control frame being collected (at most 131 bytes), passed on once whole.
    control: Vec<u8>,
    held: Held,
    /// The held message's first frame has been seen.
    in_message: bool,
}

/// A frame header's length once its first two bytes are known.
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

impl Assembler {
    /// `max_message`: the largest payload a message may have to be held.
    pub fn new(max_message: usize) -> Assembler {
        Assembler {
            max_message,
            header: Vec::with_capacity(14),
            frame: None,
            control: Vec::new(),
            held: Held::default(),
            in_message: false,
        }
    }

    /// Whether part of a message (or of a frame) is held.
    pub fn holding(&self) -> bool {
        self.in_message || self.frame.is_some() || !self.header.is_empty()
    }

    /// Takes checked bytes; control frames that complete are appended to `out`. Returns how
    /// many bytes were taken and what was found: after [`Fed::Message`] the caller takes the
    /// message and feeds the rest again.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> (usize, Fed) {
        let mut pos = 0;
        while pos < bytes.len() {
            let Some(frame) = &mut self.frame else {
                // A header, possibly split across reads.
                let need = if self.header.len() < 2 {
                    2
                } else {
                    header_len(self.header[1])
                };
                let take = (need - self.header.len()).min(bytes.len() - pos);
                self.header.extend_from_slice(&bytes[pos..pos + take]);
                pos += take;
                if self.header.len() < 2 || self.header.len() < header_len(self.header[1]) {
                    continue;
                }
                if let Some(fed) = self.start_frame(out) {
                    return (pos, fed);
                }
                continue;
            };
            let take = usize::try_from(frame.remaining)
                .unwrap_or(usize::MAX)
                .min(bytes.len() - pos);
            let piece = &bytes[pos..pos + take];
            if frame.control {
                self.control.extend_from_slice(piece);
            } else {
                self.held.raw.extend_from_slice(piece);
                let start = self.held.payload.len();
                self.held.payload.extend_from_slice(piece);
                if let Some(key) = frame.mask {
                    for (i, b) in self.held.payload[start..].iter_mut().enumerate() {
                        *b ^= key[((frame.seen + i as u64) % 4) as usize];
                    }
                }
            }
            frame.remaining -= take as u64;
            frame.seen += take as u64;
            pos += take;
            if frame.remaining == 0 {
                if let Some(fed) = self.end_frame(out) {
                    return (pos, fed);
                }
            }
        }
        (pos, Fed::More)
    }

    /// A whole header is in `self.header`: starts its frame.
    fn start_frame(&mut self, out: &mut Vec<u8>) -> Option<Fed> {
        let h = std::mem::take(&mut self.header);
        let (b0, b1) = (h[0], h[1]);
        let opcode = b0 & 0x0f;
        let mut at = 2;
        let len = match b1 & 0x7f {
            126 => {
                at += 2;
                u64::from(u16::from_be_bytes([h[2], h[3]]))
            }
            127 => {
                at += 8;
                let mut l = [0u8; 8];
                l.copy_from_slice(&h[2..10]);
                u64::from_be_bytes(l)
            }
            n => u64::from(n),
        };
        let mask = (b1 & 0x80 != 0).then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let control = opcode & 0x08 != 0;
        if control {
            self.control.clear();
            self.control.extend_from_slice(&h);
        } else {
            if !self.in_message {
                self.in_message = true;
                self.held.text = opcode == OP_TEXT;
            }
            let payload = (self.held.payload.len() as u64).saturating_add(len);
            let frames = (self.held.raw.len() as u64)
                .saturating_add(h.len() as u64)
                .saturating_add(len);
            if payload > self.max_message as u64
                || frames > (self.max_message as u64).saturating_add(HEADER_ALLOWANCE)
            {
                return Some(Fed::TooBig);
            }
            self.held.raw.extend_from_slice(&h);
        }
        self.header = h;
        self.header.clear();
        self.frame = Some(Frame {
            control,
            fin: b0 & 0x80 != 0,
            mask,
            remaining: len,
            seen: 0,
        });
        if len == 0 {
            return self.end_frame(out);
        }
        None
    }

    /// The current frame's payload is complete.
    fn end_frame(&mut self, out: &mut Vec<u8>) -> Option<Fed> {
        let frame = self.frame.take()?;
        if frame.control {
            out.extend_from_slice(&self.control);
            self.control.clear();
            return None;
        }
        frame.fin.then_some(Fed::Message)
    }

    /// Lets go of whatever is held (the connection's output is closed).
    pub fn reset(&mut self) {
        *self = Assembler::new(self.max_message);
    }

    /// The message [`Fed::Message`] announced; the assembler starts on the next one.
    pub fn take(&mut self) -> Held {
        self.in_message = false;
        std::mem::take(&mut self.held)
    }
}

/// A data message in frames of at most `max_frame` payload bytes (one frame when it fits):
/// what replaces a message a policy changed. Frames towards the backend are masked, each with
/// a key from `key` (a fresh random one per frame, RFC 6455 5.3).
pub fn data_frames(
    dir: Direction,
    text: bool,
    payload: &[u8],
    max_frame: usize,
    mut key: impl FnMut() -> [u8; 4],
    out: &mut Vec<u8>,
) {
    let first_op = if text { OP_TEXT } else { OP_BINARY };
    if payload.is_empty() {
        frame_into(dir, true, first_op, payload, key(), out);
        return;
    }
    let mut chunks = payload.chunks(max_frame.max(1)).peekable();
    let mut op = first_op;
    while let Some(chunk) = chunks.next() {
        frame_into(dir, chunks.peek().is_none(), op, chunk, key(), out);
        op = OP_CONTINUATION;
    }
}

fn frame_into(dir: Direction, fin: bool, op: u8, payload: &[u8], key: [u8; 4], out: &mut Vec<u8>) {
    out.push(if fin { 0x80 } else { 0 } | op);
    let mask_bit = match dir {
        Direction::ClientToBackend => 0x80,
        Direction::BackendToClient => 0,
    };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if let Ok(l) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&l.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match dir {
        Direction::BackendToClient => out.extend_from_slice(payload),
        Direction::ClientToBackend => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{OP_CONTINUATION, OP_PING};

    fn frame(fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | op];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    /// Feeds `data` `step` bytes at a time; returns the messages and what passed at once.
    fn run(data: &[u8], step: usize, max: usize) -> (Vec<Held>, Vec<u8>, bool) {
        let mut a = Assembler::new(max);
        let mut out = Vec::new();
        let mut held = Vec::new();
        for chunk in data.chunks(step) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (n, fed) = a.feed(rest, &mut out);
                rest = &rest[n..];
                match fed {
                    Fed::More => {}
                    Fed::Message => held.push(a.take()),
                    Fed::TooBig => return (held, out, true),
                }
            }
        }
        (held, out, false)
    }

    #[test]
    fn a_fragmented_masked_message_is_held_whole_with_its_frames_and_pings_pass_at_once() {
        let key = [1, 2, 3, 4];
        let f1 = frame(false, OP_TEXT, b"hello ", Some(key));
        let ping = frame(true, OP_PING, b"p", Some([9, 9, 9, 9]));
        let f2 = frame(false, OP_CONTINUATION, b"wide ", Some([5, 6, 7, 8]));
        let f3 = frame(true, OP_CONTINUATION, &[b'w'; 300], Some(key));
        let next = frame(true, OP_BINARY, &[0, 1, 2], Some(key));
        let data = [
            f1.clone(),
            ping.clone(),
            f2.clone(),
            f3.clone(),
            next.clone(),
        ]
        .concat();
        for step in 1..=data.len() {
            let (held, out, too_big) = run(&data, step, 1 << 20);
            assert!(!too_big);
            assert_eq!(out, ping, "step {step}");
            assert_eq!(held.len(), 2, "step {step}");
            assert_eq!(held[0].raw, [f1.clone(), f2.clone(), f3.clone()].concat());
            let mut want = b"hello wide ".to_vec();
            want.extend_from_slice(&[b'w'; 300]);
            assert_eq!(held[0].payload, want);
            assert!(held[0].text);
            assert_eq!(held[1].raw, next);
            assert_eq!(held[1].payload, [0, 1, 2]);
            assert!(!held[1].text);
        }
    }

    #[test]
    fn unmasked_frames_and_empty_ones_and_long_lengths() {
        let big = vec![7u8; 70_000];
        let data = [
            frame(true, OP_TEXT, b"", None),
            frame(true, OP_BINARY, &big, None),
        ]
        .concat();
        let (held, out, _) = run(&data, 4096, 1 << 20);
        assert!(out.is_empty());
        assert_eq!(held.len(), 2);
        assert_eq!(held[0].payload, b"");
        assert_eq!(held[1].payload, big);
    }

    #[test]
    fn a_message_over_the_limit_is_stopped_at_the_frame_that_crosses_it() {
        let data = [
            frame(false, OP_BINARY, &[1; 60], None),
            frame(true, OP_CONTINUATION, &[1; 41], None),
        ]
        .concat();
        assert!(run(&data, 7, 100).2);
        let (held, _, too_big) = run(&data, 7, 101);
        assert!(!too_big);
        assert_eq!(held[0].payload.len(), 101);
    }

    #[test]
    fn a_replacement_frame_is_masked_towards_the_backend_only() {
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let payload = vec![b'a'; len];
            let key = || [1, 2, 3, 4];
            let mut out = Vec::new();
            data_frames(
                Direction::ClientToBackend,
                true,
                &payload,
                1 << 20,
                key,
                &mut out,
            );
            assert_eq!(
                out,
                frame(true, OP_TEXT, &payload, Some([1, 2, 3, 4])),
                "{len}"
            );
            let mut out = Vec::new();
            data_frames(
                Direction::BackendToClient,
                false,
                &payload,
                1 << 20,
                key,
                &mut out,
            );
            assert_eq!(out, frame(true, OP_BINARY, &payload, None), "{len}");
        }
    }

    #[test]
    fn a_replacement_larger_than_max_frame_size_goes_in_fragments() {
        let payload: Vec<u8> = (0..250u8).collect();
        let mut out = Vec::new();
        let key = || [9, 8, 7, 6];
        data_frames(
            Direction::ClientToBackend,
            false,
            &payload,
            100,
            key,
            &mut out,
        );
        let want = [
            frame(false, OP_BINARY, &payload[..100], Some([9, 8, 7, 6])),
            frame(
                false,
                OP_CONTINUATION,
                &payload[100..200],
                Some([9, 8, 7, 6]),
            ),
            frame(true, OP_CONTINUATION, &payload[200..], Some([9, 8, 7, 6])),
        ]
        .concat();
        assert_eq!(out, want);
        let (held, _, _) = run(&out, 7, 1 << 20);
        assert_eq!(held[0].payload, payload);
    }

    /// Endless empty fragments carry no payload but cost their headers: they are bounded by
    /// the header allowance, not let through for ever.
    #[test]
    fn endless_empty_fragments_are_stopped_by_their_headers() {
        let mut data = frame(false, OP_TEXT, b"", Some([1, 1, 1, 1]));
        for _ in 0..10_000 {
            data.extend(frame(false, OP_CONTINUATION, b"", Some([1, 1, 1, 1])));
        }
        let (held, _, too_big) = run(&data, 4096, 1024);
        assert!(too_big && held.is_empty());
        // Within the allowance a message of small fragments is held as usual.
        let mut data = Vec::new();
        for i in 0..100 {
            let op = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
            data.extend(frame(i == 99, op, b"ab", Some([1, 2, 3, 4])));
        }
        let (held, _, too_big) = run(&data, 4096, 1024);
        assert!(!too_big);
        assert_eq!(held[0].payload.len(), 200);
    }
}
