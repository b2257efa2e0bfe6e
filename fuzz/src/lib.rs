//! What the fuzz targets share: the input layout of `frame_stream`, the relay-like loop that
//! feeds `tollgate_edge::frame::FrameParser` in chunks, and an independent reference parser the
//! streaming one must agree with.
//!
//! The reference is deliberately simple and slow: it sees the whole buffer at once, unmasks
//! each payload into a `Vec` and validates text with `std::str::from_utf8`, sharing no code with
//! the parser under test (not even the close-code table).

use tollgate_edge::frame::{Direction, Event, FrameParser};

/// `frame_stream`'s input: an 8-byte header, then the byte stream.
///
/// - byte 0: bit 0 direction (set: client to backend), bit 1 an extension was agreed, bit 2 no
///   message size limit;
/// - bytes 1-2: `max_frame_size` (little-endian; `0xFFFF` means no limit);
/// - bytes 3-4: `max_message_size` (little-endian), unless bit 2 says none;
/// - bytes 5-7: chunk sizes, used in turn (`0`: the rest of the stream in one read).
#[derive(Debug, Clone)]
pub struct StreamInput<'a> {
    pub dir: Direction,
    pub extensions: bool,
    pub max_frame_size: u64,
    pub max_message_size: Option<u64>,
    pub chunks: [u8; 3],
    pub data: &'a [u8],
}

impl<'a> StreamInput<'a> {
    pub fn decode(b: &'a [u8]) -> Option<Self> {
        if b.len() < 8 {
            return None;
        }
        let mf = u16::from_le_bytes([b[1], b[2]]);
        let mm = u16::from_le_bytes([b[3], b[4]]);
        Some(StreamInput {
            dir: if b[0] & 1 != 0 {
                Direction::ClientToBackend
            } else {
                Direction::BackendToClient
            },
            extensions: b[0] & 2 != 0,
            max_frame_size: if mf == u16::MAX {
                u64::MAX
            } else {
                u64::from(mf)
            },
            max_message_size: if b[0] & 4 != 0 {
                None
            } else {
                Some(u64::from(mm))
            },
            chunks: [b[5], b[6], b[7]],
            data: &b[8..],
        })
    }

    /// The header bytes for a seed file.
    pub fn header(
        client: bool,
        extensions: bool,
        max_frame_size: u16,
        max_message_size: Option<u16>,
        chunks: [u8; 3],
    ) -> Vec<u8> {
        let flags = u8::from(client)
            | u8::from(extensions) << 1
            | u8::from(max_message_size.is_none()) << 2;
        let mut v = vec![flags];
        v.extend_from_slice(&max_frame_size.to_le_bytes());
        v.extend_from_slice(&max_message_size.unwrap_or(0).to_le_bytes());
        v.extend_from_slice(&chunks);
        v
    }
}

/// How a stream ended, as the relay would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// All input seen; no violation.
    Clean,
    /// A violation with this close code.
    Violation(u16),
}

/// What feeding a whole stream produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Close frames seen, in order: (code, reason).
    pub closes: Vec<(Option<u16>, String)>,
    pub outcome: Outcome,
    /// Bytes the parser let through.
    pub forwarded: usize,
    pub stats: tollgate_edge::frame::DirStats,
}

/// Feeds `data` to a fresh parser in reads of the sizes `chunk` yields, keeping an incomplete
/// header for the next read as the relay does, until the end or the first violation.
pub fn feed(input: &StreamInput<'_>, chunk: impl FnMut() -> usize) -> Run {
    feed_with(input, chunk, false)
}

/// [`feed`], with the parser's state handed to a new parser after every read that ends
/// between frames (what a binary upgrade does: `FrameParser::pause`, then `resume` in the new
/// process). The run must be the same as without.
pub fn feed_handing_over(input: &StreamInput<'_>, chunk: impl FnMut() -> usize) -> Run {
    feed_with(input, chunk, true)
}

fn feed_with(input: &StreamInput<'_>, mut chunk: impl FnMut() -> usize, hand_over: bool) -> Run {
    let new = || {
        FrameParser::new(input.dir, input.max_frame_size, input.max_message_size)
            .with_extensions(input.extensions)
    };
    let mut p = new();
    let mut carry: Vec<u8> = Vec::new();
    let mut closes = Vec::new();
    let mut forwarded = 0usize;
    let mut rest = input.data;
    while !rest.is_empty() {
        let n = chunk().clamp(1, rest.len());
        carry.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            let a = p.advance(&carry);
            assert!(a.forward <= carry.len(), "forwarded more than it was given");
            forwarded += a.forward;
            carry.drain(..a.forward);
            match a.event {
                None => break,
                Some(Event::Close { code, reason }) => closes.push((code, reason)),
                Some(Event::Violation { code, .. }) => {
                    return Run {
                        closes,
                        outcome: Outcome::Violation(code),
                        forwarded,
                        stats: p.stats,
                    }
                }
            }
            if carry.is_empty() {
                break;
            }
        }
        if hand_over {
            if let Some(state) = p.pause() {
                p = new()
                    .resume(state)
                    .expect("a state a parser paused in resumes");
            }
        }
    }
    Run {
        closes,
        outcome: Outcome::Clean,
        forwarded,
        stats: p.stats,
    }
}

/// The reference's verdict on a whole stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub closes: Vec<(Option<u16>, String)>,
    pub outcome: Outcome,
    /// Clean: the bytes of complete headers and the payload bytes after them (an incomplete
    /// header, or a close frame still arriving, stays behind). Violation: where the offending
    /// frame starts.
    pub forwardable: usize,
    /// Violation: the offset of the byte that made it one (nothing at or after it may be
    /// forwarded, whatever the reads).
    pub detected_at: usize,
    /// Clean: frames whose header went by, and complete data messages.
    pub frames: u64,
    pub messages: u64,
}

/// Whether `code` may be sent in a close frame: RFC 6455 7.4.1 and the IANA registry, written
/// out independently of `tollgate_edge::frame::close_code_allowed`.
fn close_code_ok(code: u16) -> bool {
    let defined = [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
    ];
    defined.contains(&code) || (3000..5000).contains(&code)
}

/// Index (in `text`) of the first byte that no valid continuation can follow, if any: the
/// shortest prefix that is not a prefix of valid UTF-8 ends there.
fn utf8_detection(text: &[u8]) -> Option<usize> {
    match std::str::from_utf8(text) {
        Ok(_) => None,
        // Invalid only because it ends early: not (yet) an error.
        Err(e) if e.error_len().is_none() => None,
        Err(e) => {
            // The error lies in text[valid_up_to..valid_up_to + error_len + 1]; find the
            // shortest prefix that is definitely invalid.
            let start = e.valid_up_to();
            (start..text.len()).find(|&end| {
                matches!(std::str::from_utf8(&text[start..=end]), Err(e) if e.error_len().is_some())
            })
        }
    }
}

/// Parses the whole stream in one pass, the simple way.
pub fn reference(input: &StreamInput<'_>) -> Reference {
    let d = input.data;
    let client = input.dir == Direction::ClientToBackend;
    let mut pos = 0usize;
    let mut closes = Vec::new();
    // The data message in progress: its opcode and (for text) its unmasked bytes so far.
    let mut message: Option<(u8, Vec<u8>, u64)> = None;
    let (mut frames, mut messages) = (0u64, 0u64);
    let violation = |closes: Vec<_>, code: u16, start: usize, at: usize| Reference {
        closes,
        outcome: Outcome::Violation(code),
        forwardable: start,
        detected_at: at,
        frames: 0,
        messages: 0,
    };
    loop {
        let avail = d.len() - pos;
        let clean = |closes, forwardable, frames, messages| Reference {
            closes,
            outcome: Outcome::Clean,
            forwardable,
            detected_at: d.len(),
            frames,
            messages,
        };
        if avail < 2 {
            return clean(closes, pos, frames, messages);
        }
        let (b0, b1) = (d[pos], d[pos + 1]);
        let fin = b0 & 0x80 != 0;
        let rsv = b0 & 0x70;
        let op = b0 & 0x0f;
        let masked = b1 & 0x80 != 0;
        let ext_len = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let hlen = 2 + ext_len + if masked { 4 } else { 0 };
        if avail < hlen {
            return clean(closes, pos, frames, messages);
        }
        let len: u64 = match ext_len {
            2 => u64::from(u16::from_be_bytes([d[pos + 2], d[pos + 3]])),
            8 => d[pos + 2..pos + 10]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
            _ => u64::from(b1 & 0x7f),
        };
        let key: Option<[u8; 4]> = masked.then(|| {
            [
                d[pos + hlen - 4],
                d[pos + hlen - 3],
                d[pos + hlen - 2],
                d[pos + hlen - 1],
            ]
        });
        if len >= 1 << 63 || masked != client || (rsv != 0 && !input.extensions) {
            return violation(closes, 1002, pos, pos);
        }
        let control = op >= 8;
        if ![0, 1, 2, 8, 9, 10].contains(&op) || (control && (!fin || len > 125)) {
            return violation(closes, 1002, pos, pos);
        }
        let body_start = pos + hlen;
        let have = (len.min((d.len() - body_start) as u64)) as usize;
        let unmask = |bytes: &[u8]| -> Vec<u8> {
            bytes
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key.map_or(0, |k| k[i % 4]))
                .collect()
        };
        if control {
            if op == 8 {
                if have < len as usize {
                    // Held until whole.
                    return clean(closes, pos, frames, messages);
                }
                let payload = unmask(&d[body_start..body_start + have]);
                match payload.len() {
                    0 => closes.push((None, String::new())),
                    1 => return violation(closes, 1002, pos, pos),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !close_code_ok(code) {
                            return violation(closes, 1002, pos, pos);
                        }
                        match std::str::from_utf8(&payload[2..]) {
                            Ok(r) => closes.push((Some(code), r.to_owned())),
                            Err(_) => return violation(closes, 1007, pos, pos),
                        }
                    }
                }
            }
            frames += 1;
            if have < len as usize {
                return clean(closes, d.len(), frames, messages);
            }
            pos = body_start + have;
            continue;
        }
        // Data frames.
        match (op, &message) {
            (0, None) => return violation(closes, 1002, pos, pos),
            (1 | 2, Some(_)) => return violation(closes, 1002, pos, pos),
            _ => {}
        }
        if len > input.max_frame_size {
            return violation(closes, 1009, pos, pos);
        }
        let so_far = message.as_ref().map_or(0, |m| m.2);
        if let Some(max) = input.max_message_size {
            if so_far.saturating_add(len) > max {
                return violation(closes, 1009, pos, pos);
            }
        }
        if op != 0 {
            message = Some((op, Vec::new(), 0));
        }
        frames += 1;
        let Some((mop, text, total)) = message.as_mut() else {
            unreachable!("a message was just opened or was in progress");
        };
        *total += len;
        let check = *mop == 1 && !input.extensions;
        if check {
            let before = text.len();
            text.extend(unmask(&d[body_start..body_start + have]));
            if let Some(i) = utf8_detection(text) {
                return violation(closes, 1007, pos, body_start + (i - before));
            }
        }
        if have < len as usize {
            return clean(closes, d.len(), frames, messages);
        }
        pos = body_start + have;
        if fin {
            if check && std::str::from_utf8(text).is_err() {
                // A code point left unfinished at the message's end.
                return violation(
                    closes,
                    1007,
                    body_start - hlen,
                    pos.saturating_sub(1).max(body_start - hlen),
                );
            }
            messages += 1;
            message = None;
        }
    }
}
