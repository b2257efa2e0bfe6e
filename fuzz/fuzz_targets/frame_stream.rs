//! The relay's frame parser fed an arbitrary byte stream in arbitrary reads, either direction,
//! with or without an agreed extension, under small or no size limits.
//!
//! Invariants: it never panics; it never forwards more than it was given; whole, byte-by-byte
//! and arbitrarily chunked reads reach the same verdict (close frames seen, then clean or the
//! same violation code) and, when clean, the same counters; and that verdict is the one of the
//! independent whole-buffer reference parser in `fuzz/src/lib.rs` (std's UTF-8 check); so does a
//! run whose parser is handed over (paused, resumed in a new one) between reads. When a
//! violation is found, what was forwarded stops at or after the offending frame's start and
//! before the byte that made it one; read whole, exactly at the frame's start.
//!
//! What the parser forwarded is then held by the message assembler (`tollgate_edge::assemble`,
//! what the relay does for message policies) in the same chunked reads, under a small limit:
//! it never panics; every byte it takes comes out again, in a control frame passed on, in a
//! held message's frames, or in what it still holds; a held message's payload is within the
//! limit; and when nothing was too big and the stream was clean, it holds as many messages as
//! the reference counts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_edge::assemble::{Assembler, Fed};
use tollgate_fuzz::{feed, feed_handing_over, reference, Outcome, StreamInput};

fuzz_target!(|data: &[u8]| {
    let Some(input) = StreamInput::decode(data) else {
        return;
    };
    let want = reference(&input);
    let whole = feed(&input, || usize::MAX);
    let bytewise = feed(&input, || 1);
    let mut turn = 0;
    let chunked = feed(&input, || {
        let c = input.chunks[turn % 3];
        turn += 1;
        if c == 0 {
            usize::MAX
        } else {
            usize::from(c)
        }
    });
    // Handed to a new parser between every two reads that end between frames (a binary
    // upgrade's pause and resume): nothing changes.
    let mut turn = 0;
    let handed = feed_handing_over(&input, || {
        let c = input.chunks[turn % 3];
        turn += 1;
        usize::from(c).max(1)
    });
    for (how, run) in [
        ("whole", &whole),
        ("byte by byte", &bytewise),
        ("chunked", &chunked),
        ("handed over between reads", &handed),
    ] {
        assert_eq!(
            run.outcome, want.outcome,
            "{how}: verdict differs from the reference"
        );
        assert_eq!(
            run.closes, want.closes,
            "{how}: close frames differ from the reference"
        );
        assert!(
            run.forwarded <= input.data.len(),
            "{how}: forwarded more than the input"
        );
        match want.outcome {
            Outcome::Clean => {
                assert_eq!(run.forwarded, want.forwardable, "{how}: forwarded bytes");
                assert_eq!(run.stats.bytes, run.forwarded as u64, "{how}: byte counter");
                assert_eq!(run.stats.frames, want.frames, "{how}: frame counter");
                assert_eq!(run.stats.messages, want.messages, "{how}: message counter");
            }
            Outcome::Violation(_) => assert!(
                want.forwardable <= run.forwarded && run.forwarded <= want.detected_at,
                "{how}: forwarded {} of a stream whose offending frame starts at {} and is found bad at {}",
                run.forwarded,
                want.forwardable,
                want.detected_at
            ),
        }
    }
    assert_eq!(
        whole.forwarded, want.forwardable,
        "a whole read stops at the frame's start"
    );
    if want.outcome == Outcome::Clean {
        assert_eq!(whole.stats, bytewise.stats);
        assert_eq!(whole.stats, chunked.stats);
        assert_eq!(whole.stats, handed.stats);
    }

    let limit = usize::from(input.chunks[0]) * 16 + 1;
    let forwarded = &input.data[..whole.forwarded];
    let mut assembler = Assembler::new(limit);
    let (mut out, mut held_raw, mut messages, mut too_big) = (Vec::new(), 0usize, 0u64, false);
    let mut taken = 0;
    let mut turn = 0;
    'reads: while taken < forwarded.len() {
        let c = usize::from(input.chunks[turn % 3]).max(1);
        turn += 1;
        let mut read = &forwarded[taken..(taken + c).min(forwarded.len())];
        taken += read.len();
        while !read.is_empty() {
            let (n, fed) = assembler.feed(read, &mut out);
            assert!(n <= read.len());
            read = &read[n..];
            match fed {
                Fed::More => assert!(read.is_empty(), "More before the end of a read"),
                Fed::Message => {
                    let m = assembler.take();
                    assert!(m.payload.len() <= limit, "held past the limit");
                    assert!(m.raw.len() >= m.payload.len());
                    held_raw += m.raw.len();
                    messages += 1;
                }
                Fed::TooBig => {
                    too_big = true;
                    break 'reads;
                }
            }
        }
    }
    if !too_big {
        assert!(
            out.len() + held_raw <= forwarded.len(),
            "more came out than went in"
        );
        if want.outcome == Outcome::Clean {
            assert_eq!(messages, want.messages, "messages held");
            if !assembler.holding() {
                assert_eq!(out.len() + held_raw, forwarded.len(), "bytes lost");
            }
        }
    }
});
