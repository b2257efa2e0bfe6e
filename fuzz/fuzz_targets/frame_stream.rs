//! The relay's frame parser fed an arbitrary byte stream in arbitrary reads, either direction,
//! with or without an agreed extension, under small or no size limits.
//!
//! Invariants: it never panics; it never forwards more than it was given; whole, byte-by-byte
//! and arbitrarily chunked reads reach the same verdict (close frames seen, then clean or the
//! same violation code) and, when clean, the same counters; and that verdict is the one of the
//! independent whole-buffer reference parser in `fuzz/src/lib.rs` (std's UTF-8 check). When a
//! violation is found, what was forwarded stops at or after the offending frame's start and
//! before the byte that made it one; read whole, exactly at the frame's start.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_fuzz::{feed, reference, Outcome, StreamInput};

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
    for (how, run) in [
        ("whole", &whole),
        ("byte by byte", &bytewise),
        ("chunked", &chunked),
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
    }
});
