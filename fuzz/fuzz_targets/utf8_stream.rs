//! The streaming UTF-8 validator (`Utf8Stream`) against `std::str::from_utf8`, however the text
//! is cut into pieces.
//!
//! Input: byte 0 is the number of cuts (up to 15), the next that many bytes are cut points
//! (taken modulo the text's length, sorted), the rest is the text.
//!
//! Invariants: never panics; the verdict (every piece accepted and `finish` Ok) equals std's;
//! and it fails fast: the piece that fails is the one holding the first byte no valid text can
//! continue with, never an earlier one, never a later one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_edge::frame::Utf8Stream;

/// Index of the first byte after which no continuation can make `t` valid.
fn detection(t: &[u8]) -> Option<usize> {
    match std::str::from_utf8(t) {
        Ok(_) => None,
        Err(e) if e.error_len().is_none() => None,
        Err(e) => {
            let s = e.valid_up_to();
            (s..t.len()).find(|&end| {
                matches!(std::str::from_utf8(&t[s..=end]), Err(e) if e.error_len().is_some())
            })
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (cuts, text) = rest.split_at(n);
    let mut cuts: Vec<usize> = cuts
        .iter()
        .map(|c| {
            if text.is_empty() {
                0
            } else {
                usize::from(*c) % (text.len() + 1)
            }
        })
        .collect();
    cuts.sort_unstable();
    cuts.push(text.len());
    let std_ok = std::str::from_utf8(text).is_ok();
    let detect = detection(text);
    let mut u = Utf8Stream::default();
    let mut start = 0;
    for &end in &cuts {
        let piece = &text[start..end];
        let r = u.feed(piece);
        match detect {
            Some(d) if d >= start && d < end => {
                assert!(
                    r.is_err(),
                    "the piece {start}..{end} holds the bad byte {d} but passed"
                );
                assert!(!std_ok);
                return;
            }
            _ => assert!(
                r.is_ok(),
                "piece {start}..{end} failed, bad byte at {detect:?}"
            ),
        }
        start = end;
    }
    assert!(detect.is_none());
    assert_eq!(
        u.finish().is_ok(),
        std_ok,
        "verdict at the end differs from std"
    );
});
