//! Protocol conformance through the gateway (BRIEF sections 4 and 6): a suite of RFC 6455
//! cases, run once directly against a compliant backend and once through Tollgate in front of
//! it, must give the same verdict, case for case, with no allowance made for the gateway.
//!
//! Why our own suite: the reference one (Autobahn|Testsuite) needs Python 2.7, which no
//! registry this project can reach still offers. The cases below follow its sections (framing,
//! pings and pongs, reserved bits, opcodes, fragmentation, UTF-8, close handling, big messages)
//! and its verdicts: OK, NON-STRICT (the peer failed the connection, but not the preferred way),
//! FAILED. The backend is tungstenite, the library behind `examples/echo-backend`, which
//! validates frames, UTF-8 and close codes, in two flavours: one drops the connection on
//! invalid UTF-8 (tungstenite's default), one answers 1007 (RFC 6455 allows both). The gateway
//! relays frames without reassembling them and validates text and close frames itself, so an
//! invalid message gets the client a 1007 from the gateway: a verdict the RFC allows, and the
//! same as either backend's (a drop and a 1007 both pass a "fail the connection" case; a 1011
//! would not).
//!
//! The per-case tables are written to `target/test-artifacts/conformance*.md`: ws and wss (TLS
//! on both legs), for each backend flavour.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::tls::*;
use crate::support::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a case waits for the peer to answer (or to fail the connection). No case passes by
/// timing out, so this only bounds a broken run (at most ~10 min for all cases); room for a
/// loaded CI machine moving the 4 MiB cases through debug builds.
const WAIT: Duration = Duration::from_secs(5);

const TEXT: u8 = 1;
const BINARY: u8 = 2;
const CONT: u8 = 0;
const CLOSE: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;

/// What the client does.
#[derive(Clone)]
enum Step {
    /// Wire bytes written at once.
    Send(Vec<u8>),
    /// Wire bytes written `n` bytes per write, each flushed (the peer sees them trickle in).
    Chopped(Vec<u8>, usize),
    Pause(u64),
}

/// What RFC 6455 asks of the server.
#[derive(Clone)]
enum Expect {
    /// These frames (opcode, payload) come back, then our close 1000 gets a close 1000.
    Echo(Vec<(u8, Vec<u8>)>),
    /// The server fails the connection (close with one of `codes`, or a TCP close) after at
    /// most echoing `before`; it must never echo the offending frames.
    Fail {
        before: Vec<(u8, Vec<u8>)>,
        codes: &'static [u16],
    },
    /// We sent a close; the server answers with a close carrying this code (None: no code).
    Close(Option<u16>),
}

#[derive(Clone)]
struct Case {
    id: String,
    what: String,
    steps: Vec<Step>,
    expect: Expect,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    Close(Option<u16>),
    Eof,
    Timeout,
}

/// What came back: frames (opcode, fin, payload) and how the connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    frames: Vec<(u8, bool, Vec<u8>)>,
    end: End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    NonStrict,
    Failed,
}

fn frame(fin: bool, rsv: u8, op: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(fin, rsv, op, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
}

fn msg(op: u8, payload: &[u8]) -> Vec<u8> {
    frame(true, 0, op, payload)
}

/// `payload` as one message of opcode `op` in fragments of `size` bytes (the last may be
/// shorter), on the wire.
fn fragmented(op: u8, payload: &[u8], size: usize) -> Vec<u8> {
    let chunks: Vec<&[u8]> = payload.chunks(size).collect();
    let last = chunks.len().saturating_sub(1);
    chunks
        .iter()
        .enumerate()
        .flat_map(|(j, c)| frame(j == last, 0, if j == 0 { op } else { CONT }, c))
        .collect()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'*' + (i % 64) as u8).collect()
}

fn case(id: &str, what: &str, steps: Vec<Step>, expect: Expect) -> Case {
    Case {
        id: id.into(),
        what: what.into(),
        steps,
        expect,
    }
}

fn echo(op: u8, payload: &[u8]) -> Expect {
    Expect::Echo(vec![(op, payload.to_vec())])
}

const PROTOCOL: &[u16] = &[1002];
const INVALID_DATA: &[u16] = &[1007];

fn fail() -> Expect {
    Expect::Fail {
        before: vec![],
        codes: PROTOCOL,
    }
}

/// The suite, grouped like Autobahn's sections 1-7 and 9.
fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // 1: framing: text and binary at the length-encoding boundaries, whole and trickled.
    for (op, name, sec) in [(TEXT, "text", 1), (BINARY, "binary", 2)] {
        for (i, len) in [0usize, 125, 126, 127, 128, 65535, 65536]
            .iter()
            .enumerate()
        {
            let p = pattern(*len);
            v.push(case(
                &format!("1.{sec}.{}", i + 1),
                &format!("{name} message, {len} bytes"),
                vec![Step::Send(msg(op, &p))],
                echo(op, &p),
            ));
        }
        let p = pattern(65536);
        v.push(case(
            &format!("1.{sec}.8"),
            &format!("{name} message, 65536 bytes, written 997 bytes at a time"),
            vec![Step::Chopped(msg(op, &p), 997)],
            echo(op, &p),
        ));
    }
    // 2: pings and pongs.
    v.push(case(
        "2.1",
        "ping, no payload",
        vec![Step::Send(msg(PING, b""))],
        echo(PONG, b""),
    ));
    v.push(case(
        "2.2",
        "ping, text payload",
        vec![Step::Send(msg(PING, b"Hello, world!"))],
        echo(PONG, b"Hello, world!"),
    ));
    let bin = [0x00u8, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0x00, 0xff];
    v.push(case(
        "2.3",
        "ping, binary payload",
        vec![Step::Send(msg(PING, &bin))],
        echo(PONG, &bin),
    ));
    let p125 = pattern(125);
    v.push(case(
        "2.4",
        "ping, 125 bytes",
        vec![Step::Send(msg(PING, &p125))],
        echo(PONG, &p125),
    ));
    v.push(case(
        "2.5",
        "ping, 126 bytes (control frames carry at most 125)",
        vec![Step::Send(msg(PING, &pattern(126)))],
        fail(),
    ));
    v.push(case(
        "2.6",
        "ping, 125 bytes, written a byte at a time",
        vec![Step::Chopped(msg(PING, &p125), 1)],
        echo(PONG, &p125),
    ));
    v.push(case(
        "2.7",
        "unsolicited pong, no payload (ignored)",
        vec![Step::Send(msg(PONG, b""))],
        Expect::Echo(vec![]),
    ));
    v.push(case(
        "2.8",
        "unsolicited pong with payload (ignored)",
        vec![Step::Send(msg(PONG, b"unsolicited"))],
        Expect::Echo(vec![]),
    ));
    v.push(case(
        "2.9",
        "unsolicited pong, then ping",
        vec![Step::Send([msg(PONG, b"x"), msg(PING, b"y")].concat())],
        echo(PONG, b"y"),
    ));
    v.push(case(
        "2.10",
        "10 pings in one write",
        vec![Step::Send(
            (0..10)
                .flat_map(|i| msg(PING, format!("p{i}").as_bytes()))
                .collect(),
        )],
        Expect::Echo(
            (0..10)
                .map(|i| (PONG, format!("p{i}").into_bytes()))
                .collect(),
        ),
    ));
    // 3: reserved bits (no extension was agreed, so any RSV bit fails the connection).
    for (i, (rsv, op, payload)) in [
        (1u8, TEXT, &b"Hello"[..]),
        (2, TEXT, b"Hello"),
        (4, TEXT, b"Hello"),
        (5, BINARY, &bin[..]),
        (6, PING, b"Hello"),
        (7, CLOSE, &[0x03, 0xe8][..]),
    ]
    .into_iter()
    .enumerate()
    {
        v.push(case(
            &format!("3.{}", i + 1),
            &format!("RSV {rsv:03b} on opcode {op}"),
            vec![Step::Send(frame(true, rsv, op, payload))],
            fail(),
        ));
    }
    v.push(case(
        "3.7",
        "text, then RSV1 text, then ping: the first echoes, the connection fails",
        vec![Step::Send(
            [
                msg(TEXT, b"first"),
                frame(true, 1, TEXT, b"bad"),
                msg(PING, b""),
            ]
            .concat(),
        )],
        Expect::Fail {
            before: vec![(TEXT, b"first".to_vec())],
            codes: PROTOCOL,
        },
    ));
    // 4: reserved opcodes.
    for (i, op) in [3u8, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf]
        .into_iter()
        .enumerate()
    {
        v.push(case(
            &format!("4.{}", i + 1),
            &format!("reserved opcode {op}"),
            vec![Step::Send(msg(op, b"reserved"))],
            fail(),
        ));
    }
    v.push(case(
        "4.11",
        "text, then reserved opcode 5, then ping",
        vec![Step::Send(
            [msg(TEXT, b"ok"), msg(5, b""), msg(PING, b"")].concat(),
        )],
        Expect::Fail {
            before: vec![(TEXT, b"ok".to_vec())],
            codes: PROTOCOL,
        },
    ));
    // 5: fragmentation.
    v.push(case(
        "5.1",
        "fragmented ping (control frames must not be fragmented)",
        vec![Step::Send(
            [
                frame(false, 0, PING, b"frag"),
                frame(true, 0, CONT, b"ment"),
            ]
            .concat(),
        )],
        fail(),
    ));
    v.push(case(
        "5.2",
        "fragmented pong",
        vec![Step::Send(
            [
                frame(false, 0, PONG, b"frag"),
                frame(true, 0, CONT, b"ment"),
            ]
            .concat(),
        )],
        fail(),
    ));
    for (id, op) in [("5.3", TEXT), ("5.4", BINARY)] {
        v.push(case(
            id,
            &format!("opcode {op} in two fragments"),
            vec![Step::Send(
                [
                    frame(false, 0, op, b"fragment1"),
                    frame(true, 0, CONT, b"fragment2"),
                ]
                .concat(),
            )],
            echo(op, b"fragment1fragment2"),
        ));
    }
    v.push(case(
        "5.5",
        "text in five fragments, one write each, with pauses",
        vec![
            Step::Send(frame(false, 0, TEXT, b"a")),
            Step::Pause(20),
            Step::Send(frame(false, 0, CONT, b"b")),
            Step::Pause(20),
            Step::Send(frame(false, 0, CONT, b"c")),
            Step::Send(frame(false, 0, CONT, b"d")),
            Step::Pause(20),
            Step::Send(frame(true, 0, CONT, b"e")),
        ],
        echo(TEXT, b"abcde"),
    ));
    // A ping between the fragments of a text message: its pong comes first.
    let ping_between = [
        frame(false, 0, TEXT, b"frag1"),
        msg(PING, b"between"),
        frame(true, 0, CONT, b"frag2"),
    ]
    .concat();
    let pong_then_text = Expect::Echo(vec![
        (PONG, b"between".to_vec()),
        (TEXT, b"frag1frag2".to_vec()),
    ]);
    v.push(case(
        "5.6",
        "text fragments with a ping between them",
        vec![Step::Send(ping_between.clone())],
        pong_then_text.clone(),
    ));
    v.push(case(
        "5.7",
        "text fragments with a ping between them, written a byte at a time",
        vec![Step::Chopped(ping_between, 1)],
        pong_then_text,
    ));
    v.push(case(
        "5.8",
        "continuation with nothing to continue (fin)",
        vec![Step::Send(frame(true, 0, CONT, b"orphan"))],
        fail(),
    ));
    v.push(case(
        "5.9",
        "continuation with nothing to continue (no fin), then its end",
        vec![Step::Send(
            [
                frame(false, 0, CONT, b"orphan"),
                frame(true, 0, CONT, b"end"),
            ]
            .concat(),
        )],
        fail(),
    ));
    v.push(case(
        "5.10",
        "text start, then a new text start instead of a continuation",
        vec![Step::Send(
            [frame(false, 0, TEXT, b"one"), frame(true, 0, TEXT, b"two")].concat(),
        )],
        fail(),
    ));
    v.push(case(
        "5.11",
        "binary start, then a whole text message",
        vec![Step::Send(
            [frame(false, 0, BINARY, b"one"), msg(TEXT, b"two")].concat(),
        )],
        fail(),
    ));
    v.push(case(
        "5.12",
        "empty fragments: text start, empty continuation, empty end",
        vec![Step::Send(
            [
                frame(false, 0, TEXT, b""),
                frame(false, 0, CONT, b""),
                frame(true, 0, CONT, b""),
            ]
            .concat(),
        )],
        echo(TEXT, b""),
    ));
    // 6: UTF-8 in text messages: every sequence of Autobahn's section 6 (Markus Kuhn's UTF-8
    // decoder stress test), each sent whole, in 1-byte fragments, and written a byte at a
    // time. Valid text must come back; invalid text must fail the connection (1007 or a drop).
    for (i, (name, text)) in utf8_sequences().into_iter().enumerate() {
        let valid = std::str::from_utf8(&text).is_ok();
        let expect = || {
            if valid {
                echo(TEXT, &text)
            } else {
                Expect::Fail {
                    before: vec![],
                    codes: INVALID_DATA,
                }
            }
        };
        let what = format!(
            "{} UTF-8: {name} ({})",
            if valid { "valid" } else { "invalid" },
            hex(&text)
        );
        v.push(case(
            &format!("6.{}.1", i + 1),
            &format!("{what}, one frame"),
            vec![Step::Send(msg(TEXT, &text))],
            expect(),
        ));
        if text.len() > 1 {
            let wire = fragmented(TEXT, &text, 1);
            v.push(case(
                &format!("6.{}.2", i + 1),
                &format!("{what}, 1-byte fragments"),
                vec![Step::Send(wire)],
                expect(),
            ));
            v.push(case(
                &format!("6.{}.3", i + 1),
                &format!("{what}, one frame written a byte at a time"),
                vec![Step::Chopped(msg(TEXT, &text), 1)],
                expect(),
            ));
        }
    }
    // Fail fast (Autobahn 6.4): the invalid part arrives while the rest of the message is
    // still to come, after pauses. The outcome is compared here; that the gateway fails the
    // connection before the rest arrives is checked by `invalid_utf8_fails_fast_through_the_gateway`.
    let kosme = "κόσμε".as_bytes();
    let bad = [0xf4u8, 0x90, 0x80, 0x80];
    let tail = b"edited";
    let fail_fast = |parts: Vec<Vec<u8>>| {
        let mut steps = Vec::new();
        for (j, p) in parts.into_iter().enumerate() {
            if j > 0 {
                steps.push(Step::Pause(100));
            }
            steps.push(Step::Send(p));
        }
        steps
    };
    let one_frame = [kosme, &bad[..], tail].concat();
    let wire = msg(TEXT, &one_frame);
    let head = wire.len() - one_frame.len();
    v.push(case(
        "6.900.1",
        "fail fast: valid part, pause, invalid part, pause, rest (one frame)",
        fail_fast(vec![
            wire[..head + kosme.len()].to_vec(),
            wire[head + kosme.len()..head + kosme.len() + 4].to_vec(),
            wire[head + kosme.len() + 4..].to_vec(),
        ]),
        Expect::Fail {
            before: vec![],
            codes: INVALID_DATA,
        },
    ));
    v.push(case(
        "6.900.2",
        "fail fast: the invalid sequence split by a pause (one frame)",
        fail_fast(vec![
            wire[..head + kosme.len() + 1].to_vec(),
            wire[head + kosme.len() + 1..head + kosme.len() + 2].to_vec(),
            wire[head + kosme.len() + 2..].to_vec(),
        ]),
        Expect::Fail {
            before: vec![],
            codes: INVALID_DATA,
        },
    ));
    v.push(case(
        "6.900.3",
        "fail fast: valid fragment, pause, fragment with the invalid part, pause, last fragment",
        fail_fast(vec![
            frame(false, 0, TEXT, kosme),
            frame(false, 0, CONT, &bad),
            frame(true, 0, CONT, tail),
        ]),
        Expect::Fail {
            before: vec![],
            codes: INVALID_DATA,
        },
    ));
    v.push(case(
        "6.900.4",
        "valid text split inside a code point across fragments, with a pause",
        fail_fast(vec![
            frame(false, 0, TEXT, &kosme[..3]),
            frame(true, 0, CONT, &kosme[3..]),
        ]),
        echo(TEXT, kosme),
    ));
    // 7: close handling.
    v.push(case(
        "7.1.1",
        "text, then close 1000: echo, then close 1000",
        vec![Step::Send(
            [msg(TEXT, b"Hello"), msg(CLOSE, &close_payload(1000, ""))].concat(),
        )],
        Expect::Echo(vec![(TEXT, b"Hello".to_vec())]),
    ));
    v.push(case(
        "7.1.2",
        "close, then a text message after it (ignored)",
        vec![Step::Send(
            [
                msg(CLOSE, &close_payload(1000, "")),
                msg(TEXT, b"after close"),
            ]
            .concat(),
        )],
        Expect::Close(Some(1000)),
    ));
    v.push(case(
        "7.1.3",
        "close with no payload",
        vec![Step::Send(msg(CLOSE, b""))],
        Expect::Close(None),
    ));
    v.push(case(
        "7.2.1",
        "close with a 1-byte payload",
        vec![Step::Send(msg(CLOSE, b"\x03"))],
        fail(),
    ));
    v.push(case(
        "7.2.2",
        "close 1000 with a 123-byte reason (the most a control frame allows)",
        vec![Step::Send(msg(
            CLOSE,
            &close_payload(1000, &"r".repeat(123)),
        ))],
        Expect::Close(Some(1000)),
    ));
    v.push(case(
        "7.2.3",
        "close with an invalid UTF-8 reason",
        vec![Step::Send(msg(
            CLOSE,
            &[0x03, 0xe8, 0xce, 0xba, 0xe1, 0xbd],
        ))],
        Expect::Fail {
            before: vec![],
            codes: INVALID_DATA,
        },
    ));
    v.push(case(
        "7.2.4",
        "close 1000 with a valid UTF-8 reason",
        vec![Step::Send(msg(CLOSE, &close_payload(1000, "κόσμε")))],
        Expect::Close(Some(1000)),
    ));
    v.push(case(
        "7.2.5",
        "close with an invalid UTF-8 reason, written a byte at a time",
        vec![Step::Chopped(
            msg(CLOSE, &[0x03, 0xe8, b'o', b'k', 0xed, 0xa0, 0x80]),
            1,
        )],
        Expect::Fail {
            before: vec![],
            codes: INVALID_DATA,
        },
    ));
    for (i, code) in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 3999, 4000, 4999,
    ]
    .into_iter()
    .enumerate()
    {
        v.push(case(
            &format!("7.3.{}", i + 1),
            &format!("close with valid code {code}"),
            vec![Step::Send(msg(CLOSE, &close_payload(code, "")))],
            Expect::Close(Some(code)),
        ));
    }
    for (i, code) in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ]
    .into_iter()
    .enumerate()
    {
        v.push(case(
            &format!("7.4.{}", i + 1),
            &format!("close with invalid code {code}"),
            vec![Step::Send(msg(CLOSE, &close_payload(code, "")))],
            fail(),
        ));
    }
    // 9: big messages, whole and in 64 KiB fragments.
    for (i, (op, len)) in [
        (TEXT, 64 << 10),
        (TEXT, 1 << 20),
        (TEXT, 4 << 20),
        (BINARY, 1 << 20),
        (BINARY, 4 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let p = pattern(len);
        v.push(case(
            &format!("9.1.{}", i + 1),
            &format!("opcode {op}, {len} bytes in one frame"),
            vec![Step::Send(msg(op, &p))],
            echo(op, &p),
        ));
        let wire = fragmented(op, &p, 64 * 1024);
        v.push(case(
            &format!("9.2.{}", i + 1),
            &format!("opcode {op}, {len} bytes in 64 KiB fragments"),
            vec![Step::Send(wire)],
            echo(op, &p),
        ));
    }
    // Big text, multi-byte characters split everywhere: in 997-byte fragments, and written
    // 4093 bytes at a time.
    let text: Vec<u8> = "κόσμε 𝄞 ".repeat(1 << 15).into_bytes();
    let wire = fragmented(TEXT, &text, 997);
    v.push(case(
        "9.3.1",
        "multi-byte text, 480 KiB in 997-byte fragments",
        vec![Step::Send(wire)],
        echo(TEXT, &text),
    ));
    v.push(case(
        "9.3.2",
        "multi-byte text, 480 KiB in one frame written 4093 bytes at a time",
        vec![Step::Chopped(msg(TEXT, &text), 4093)],
        echo(TEXT, &text),
    ));
    v
}

fn hex(b: &[u8]) -> String {
    let mut s: String = b.iter().take(12).map(|x| format!("{x:02x}")).collect();
    if b.len() > 12 {
        s.push_str("..");
    }
    s
}

/// Autobahn's section 6 sequences (after Markus Kuhn's UTF-8 decoder stress test), by name.
/// Which are valid is not written down here: the test asks the standard library.
fn utf8_sequences() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, b: &[u8]| v.push((name.to_owned(), b.to_vec()));
    add("empty", b"");
    add("ASCII", b"Hello-World");
    add("mixed", "Hello-µ@ßöäüàá-UTF-8!!".as_bytes());
    add("Greek kosme", "κόσμε".as_bytes());
    // 6.6: kosme, every prefix (valid where it ends on a code point).
    let kosme = "κόσμε".as_bytes();
    for n in 1..kosme.len() {
        add(&format!("kosme, first {n} bytes"), &kosme[..n]);
    }
    // 6.7-6.11: boundaries.
    for b in [
        &[0x00][..],
        &[0xc2, 0x80],
        &[0xe0, 0xa0, 0x80],
        &[0xf0, 0x90, 0x80, 0x80],
        &[0xf8, 0x88, 0x80, 0x80, 0x80],
        &[0xfc, 0x84, 0x80, 0x80, 0x80, 0x80],
        &[0x7f],
        &[0xdf, 0xbf],
        &[0xef, 0xbf, 0xbf],
        &[0xf4, 0x8f, 0xbf, 0xbf],
        &[0xf7, 0xbf, 0xbf, 0xbf],
        &[0xfb, 0xbf, 0xbf, 0xbf, 0xbf],
        &[0xfd, 0xbf, 0xbf, 0xbf, 0xbf, 0xbf],
        &[0xed, 0x9f, 0xbf],
        &[0xee, 0x80, 0x80],
        &[0xef, 0xbf, 0xbd],
        &[0xf4, 0x90, 0x80, 0x80],
    ] {
        add("boundary", b);
    }
    // 6.12: unexpected continuation bytes.
    for b in [
        &[0x80][..],
        &[0xbf],
        &[0x80, 0xbf],
        &[0x80, 0xbf, 0x80],
        &[0x80, 0xbf, 0x80, 0xbf],
        &[0x80, 0xbf, 0x80, 0xbf, 0x80],
        &[0x80, 0xbf, 0x80, 0xbf, 0x80, 0xbf],
    ] {
        add("unexpected continuation", b);
    }
    add(
        "all 64 continuation bytes",
        &(0x80u8..=0xbf).collect::<Vec<_>>(),
    );
    // 6.13: lonely start bytes, each followed by a space.
    for (name, range) in [
        ("lonely 2-byte starts", 0xc0u8..=0xdf),
        ("lonely 3-byte starts", 0xe0..=0xef),
        ("lonely 4-byte starts", 0xf0..=0xf7),
        ("lonely 5-byte starts", 0xf8..=0xfb),
        ("lonely 6-byte starts", 0xfc..=0xfd),
    ] {
        add(name, &range.flat_map(|b| [b, b' ']).collect::<Vec<_>>());
    }
    // 6.14-6.15: last continuation byte missing, alone and all together.
    let missing: [&[u8]; 10] = [
        &[0xc0],
        &[0xe0, 0x80],
        &[0xf0, 0x80, 0x80],
        &[0xf8, 0x80, 0x80, 0x80],
        &[0xfc, 0x80, 0x80, 0x80, 0x80],
        &[0xdf],
        &[0xef, 0xbf],
        &[0xf7, 0xbf, 0xbf],
        &[0xfb, 0xbf, 0xbf, 0xbf],
        &[0xfd, 0xbf, 0xbf, 0xbf, 0xbf],
    ];
    for b in missing {
        add("last continuation byte missing", b);
    }
    add("all of them concatenated", &missing.concat());
    // 6.16: impossible bytes.
    add("impossible byte fe", &[0xfe]);
    add("impossible byte ff", &[0xff]);
    add("impossible bytes fe fe ff ff", &[0xfe, 0xfe, 0xff, 0xff]);
    // 6.17-6.19: overlong forms.
    for b in [
        &[0xc0, 0xaf][..],
        &[0xe0, 0x80, 0xaf],
        &[0xf0, 0x80, 0x80, 0xaf],
        &[0xf8, 0x80, 0x80, 0x80, 0xaf],
        &[0xfc, 0x80, 0x80, 0x80, 0x80, 0xaf],
        &[0xc1, 0xbf],
        &[0xe0, 0x9f, 0xbf],
        &[0xf0, 0x8f, 0xbf, 0xbf],
        &[0xf8, 0x87, 0xbf, 0xbf, 0xbf],
        &[0xfc, 0x83, 0xbf, 0xbf, 0xbf, 0xbf],
        &[0xc0, 0x80],
        &[0xe0, 0x80, 0x80],
        &[0xf0, 0x80, 0x80, 0x80],
        &[0xf8, 0x80, 0x80, 0x80, 0x80],
        &[0xfc, 0x80, 0x80, 0x80, 0x80, 0x80],
    ] {
        add("overlong", b);
    }
    // 6.20-6.21: UTF-16 surrogates, single and paired.
    let single: [[u8; 3]; 7] = [
        [0xed, 0xa0, 0x80],
        [0xed, 0xad, 0xbf],
        [0xed, 0xae, 0x80],
        [0xed, 0xaf, 0xbf],
        [0xed, 0xb0, 0x80],
        [0xed, 0xbe, 0x80],
        [0xed, 0xbf, 0xbf],
    ];
    for b in &single {
        add("single surrogate", b);
    }
    for hi in &single[..4] {
        for lo in [&single[4], &single[6]] {
            add("paired surrogates", &[&hi[..], &lo[..]].concat());
        }
    }
    // 6.22: noncharacters (valid UTF-8: U+FFFE/U+FFFF of every plane, U+FDD0..U+FDEF).
    for plane in 0u32..=16 {
        for low in [0xfffe, 0xffff] {
            let c = char::from_u32((plane << 16) | low).unwrap_or('?');
            add("noncharacter", c.to_string().as_bytes());
        }
    }
    for cp in [0xfdd0u32, 0xfdef] {
        add(
            "noncharacter",
            char::from_u32(cp).unwrap_or('?').to_string().as_bytes(),
        );
    }
    // 6.23: a few more.
    add("U+FFFD", "\u{fffd}".as_bytes());
    add("byte order mark", "\u{feff}ok".as_bytes());
    add("combining sequence", "e\u{301}".as_bytes());
    add(
        "valid, then a truncated 4-byte sequence",
        &[b'o', b'k', 0xf0, 0x9f, 0x98],
    );
    add(
        "valid, then a lone continuation",
        &[b'o', b'k', 0x80, b'o', b'k'],
    );
    v
}

/// A client byte stream: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where a case's client connects: `tls` wraps the TCP connection in TLS for `localhost`.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    path: &'static str,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// Opens the WebSocket: the opening handshake by hand, so every frame after it is raw.
async fn open(t: &Target) -> (String, RawWs<Box<dyn Io>>) {
    let tcp = TcpStream::connect(t.addr).await.unwrap();
    let io: Box<dyn Io> = match &t.tls {
        Some(c) => Box::new(
            c.connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap(),
        ),
        None => Box::new(tcp),
    };
    handshake_on(io, "localhost", t.path, "").await
}

async fn next_frame(ws: &mut RawWs<Box<dyn Io>>) -> Result<Frame, End> {
    match tokio::time::timeout(WAIT, ws.read_frame()).await {
        Ok(Ok(f)) => Ok(f),
        Ok(Err(_)) => Err(End::Eof),
        Err(_) => Err(End::Timeout),
    }
}

async fn run_case(target: &Target, c: &Case) -> Observed {
    let (head, mut ws) = open(target).await;
    assert_eq!(status_of(&head), 101, "{}: handshake: {head}", c.id);
    for s in &c.steps {
        let sent = match s {
            Step::Send(b) => match ws.io.write_all(b).await {
                Ok(()) => ws.io.flush().await,
                e => e,
            },
            Step::Chopped(b, n) => {
                let mut r = Ok(());
                for chunk in b.chunks(*n) {
                    r = ws.io.write_all(chunk).await;
                    if r.is_err() {
                        break;
                    }
                    let _ = ws.io.flush().await;
                }
                r
            }
            Step::Pause(ms) => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                Ok(())
            }
        };
        // The peer may fail the connection before everything is written: that is observed below.
        if sent.is_err() {
            break;
        }
    }
    let mut frames = Vec::new();
    let mut wanted = match &c.expect {
        Expect::Echo(e) => e.len(),
        _ => usize::MAX,
    };
    let end = loop {
        if wanted == 0 {
            // Everything expected came back: start the closing handshake.
            let _ = ws.send_raw(&msg(CLOSE, &close_payload(1000, ""))).await;
            let _ = ws.io.flush().await;
            wanted = usize::MAX;
        }
        match next_frame(&mut ws).await {
            Ok(f) if f.opcode == CLOSE => break End::Close(f.close_code()),
            Ok(f) => {
                frames.push((f.opcode, f.fin, f.payload));
                wanted = wanted.saturating_sub(1);
            }
            Err(end) => break end,
        }
    };
    Observed { frames, end }
}

fn same_frames(got: &[(u8, bool, Vec<u8>)], want: &[(u8, Vec<u8>)]) -> bool {
    got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|((op, fin, p), (wop, wp))| op == wop && *fin && p == wp)
}

fn verdict(c: &Case, o: &Observed) -> Verdict {
    match &c.expect {
        Expect::Echo(want) => {
            if !same_frames(&o.frames, want) {
                Verdict::Failed
            } else if o.end == End::Close(Some(1000)) {
                Verdict::Ok
            } else if o.end == End::Eof {
                Verdict::NonStrict
            } else {
                Verdict::Failed
            }
        }
        Expect::Fail { before, codes } => {
            if !same_frames(&o.frames, before) {
                return Verdict::Failed;
            }
            match o.end {
                End::Close(Some(code)) if codes.contains(&code) => Verdict::Ok,
                End::Eof => Verdict::Ok,
                End::Close(_) => Verdict::NonStrict,
                End::Timeout => Verdict::Failed,
            }
        }
        Expect::Close(code) => {
            if !o.frames.is_empty() {
                Verdict::Failed
            } else if o.end == End::Close(*code) {
                Verdict::Ok
            } else if o.end == End::Eof {
                Verdict::NonStrict
            } else {
                Verdict::Failed
            }
        }
    }
}

fn describe(o: &Observed) -> String {
    let mut s = String::new();
    for (op, fin, p) in &o.frames {
        let _ = write!(
            s,
            "op{op}{} {}B, ",
            if *fin { "" } else { " (no fin)" },
            p.len()
        );
    }
    let _ = write!(s, "{:?}", o.end);
    s
}

/// Runs every case against `direct` and `through`, writes the table to
/// `target/test-artifacts/{report}`, and fails on any verdict that differs.
async fn compare(direct: &Target, through: &Target, report_file: &str) {
    let cases = cases();
    let mut report = String::from(
        "| case | what | direct | through Tollgate | observed direct | observed through Tollgate |\n|---|---|---|---|---|---|\n",
    );
    let mut mismatches = Vec::new();
    let mut direct_ok = 0;
    for c in &cases {
        let d = run_case(direct, c).await;
        let g = run_case(through, c).await;
        let (vd, vg) = (verdict(c, &d), verdict(c, &g));
        if vd == Verdict::Ok {
            direct_ok += 1;
        }
        let _ = writeln!(
            report,
            "| {} | {} | {vd:?} | {vg:?} | {} | {} |",
            c.id,
            c.what,
            describe(&d),
            describe(&g),
        );
        if vd != vg {
            mismatches.push(format!(
                "{} ({}): direct {vd:?} [{}], through the gateway {vg:?} [{}]",
                c.id,
                c.what,
                describe(&d),
                describe(&g)
            ));
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let artifacts = root.join("target").join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let _ = writeln!(report, "\n{} cases; OK directly: {direct_ok}", cases.len());
    std::fs::write(artifacts.join(report_file), &report).unwrap();
    println!("{report}");

    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
    // The suite must be able to tell: the backend passes most of it directly.
    assert!(
        direct_ok * 10 >= cases.len() * 8,
        "only {direct_ok} of {} cases OK directly: the suite or the backend is broken",
        cases.len()
    );
    // Every case got an answer (checked above), and the gateway is still serving.
    let (_, mut ws) = open(through).await;
    ws.send(true, TEXT, b"still here").await.unwrap();
    ws.io.flush().await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"still here");
}

#[tokio::test]
async fn conformance_suite_gives_the_same_verdict_through_the_gateway_as_direct() {
    for (flavour, report) in [
        (OnBadText::Drop, "conformance.md"),
        (OnBadText::Close1007, "conformance-1007.md"),
    ] {
        let backend = ws_echo_backend_as(flavour).await;
        let gw = Gateway::start(&format!(
            "{}{}",
            gateway_section(""),
            api_section("echo", "echo", &format!("ws://{backend}/"), "")
        ));
        let direct = Target {
            addr: backend,
            path: "/",
            tls: None,
        };
        let through = Target {
            addr: gw.ws.unwrap(),
            path: "/echo",
            tls: None,
        };
        compare(&direct, &through, report).await;
    }
}

/// The same through an API with a message policy that forwards everything (issue 22): every
/// data message is then held whole and judged before it goes on, control frames pass at once,
/// and none of that may change a verdict. Up to 16 MiB is inspected, so the big-message cases
/// are judged like the rest.
#[tokio::test]
async fn conformance_suite_gives_the_same_verdict_through_a_pass_through_message_policy() {
    let backend = ws_echo_backend_as(OnBadText::Close1007).await;
    let dir = TempDir::new("conformance-messages");
    plugins::install(&dir.path().join("plugins"), &["message_test.wasm"]);
    let gw = Gateway::start_in(
        dir,
        &format!(
            "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n{}[[apis.on_message]]\nplugin = \"message-test\"\ninstances = \"pooled\"\nconfig = {{ pass = true }}\n",
            gateway_section("plugin_dir = \"plugins\""),
            api_section(
                "echo",
                "echo",
                &format!("ws://{backend}/"),
                "[apis.limits]\nmax_inspected_message_size = 16777216\n"
            )
        ),
    );
    let direct = Target {
        addr: backend,
        path: "/",
        tls: None,
    };
    let through = Target {
        addr: gw.ws.unwrap(),
        path: "/echo",
        tls: None,
    };
    compare(&direct, &through, "conformance-message-policy.md").await;
    let calls = sample(
        &scrape(gw.admin.unwrap()).await,
        "tollgate_policy_calls_total",
        &[
            ("api", "echo"),
            ("plugin", "message-test"),
            ("scope", "message"),
            ("outcome", "forward"),
        ],
    );
    assert!(calls.is_some_and(|c| c > 100.0), "{calls:?}");
}

/// The same over TLS on both legs: a wss client, the gateway's wss listener, a wss backend
/// (TLS changes how the relay writes, flushes and shuts down, not what it relays).
#[tokio::test]
async fn conformance_suite_over_wss_gives_the_same_verdict_through_the_gateway_as_direct() {
    for (flavour, report) in [
        (OnBadText::Drop, "conformance-wss.md"),
        (OnBadText::Close1007, "conformance-wss-1007.md"),
    ] {
        let ca = TestCa::new("Conformance CA");
        let backend = wss_echo_backend_as(&ca.leaf(&["localhost", "127.0.0.1"]), flavour).await;
        let dir = TempDir::new("conformance-wss");
        let ca_path = ca.write(dir.path(), "ca.pem");
        let (cert, key) = ca.leaf(&["localhost"]).write(dir.path(), "gw");
        let manifest = format!(
            "[gateway]\nname = \"t\"\n[gateway.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n{}",
            cert.display(),
            key.display(),
            api_section(
                "echo",
                "echo",
                &format!("wss://localhost:{}/", backend.port()),
                &format!("schemes = [\"wss\"]\nca_file = \"{}\"", ca_path.display())
            )
        );
        let gw = Gateway::start_in(dir, &manifest);
        let tls = Some(tokio_rustls::TlsConnector::from(client_config(&ca)));
        let direct = Target {
            addr: backend,
            path: "/",
            tls: tls.clone(),
        };
        let through = Target {
            addr: gw.wss.unwrap(),
            path: "/echo",
            tls,
        };
        compare(&direct, &through, report).await;
    }
}

/// The gateway judges text as it streams: the client's close 1007 arrives while the rest of
/// the message is still unsent, and none of the invalid frame reaches the backend.
#[tokio::test]
async fn invalid_utf8_fails_fast_through_the_gateway() {
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        gateway_section(""),
        api_section("echo", "echo", &backend.url(), "")
    ));
    for (what, first, second) in [
        // The invalid byte in the same read as its frame header: the frame is withheld whole
        // and the backend gets a close 1007 of its own.
        ("whole frame", true, false),
        // A long frame whose invalid byte comes later: the backend has seen part of the frame
        // and is disconnected.
        ("later piece", false, true),
    ] {
        let (head, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
        assert_eq!(status_of(&head), 101);
        let mut payload = b"valid start ".to_vec();
        if second {
            payload.extend(std::iter::repeat_n(b'x', 300));
        }
        let bad_at = payload.len();
        payload.extend_from_slice(&[0xf4, 0x90, 0x80, 0x80]);
        payload.extend_from_slice(&[b'y'; 100]);
        let wire = msg(TEXT, &payload);
        let cut = wire.len() - payload.len() + if first { bad_at + 2 } else { 200 };
        ws.send_raw(&wire[..cut]).await.unwrap();
        if second {
            // The first piece passes; the invalid byte comes with the second.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let cut2 = wire.len() - payload.len() + bad_at + 2;
            ws.send_raw(&wire[cut..cut2]).await.unwrap();
        }
        // 0xF4 0x90 can never become valid: the close comes now, without the rest.
        let close = tokio::time::timeout(Duration::from_secs(3), ws.read_until_close())
            .await
            .unwrap_or_else(|_| panic!("{what}: no fail-fast close"))
            .unwrap();
        assert_eq!(close.close_code(), Some(1007), "{what}");
        if first {
            let f = tokio::time::timeout(Duration::from_secs(3), seen.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (f.opcode, f.close_code()),
                (CLOSE, Some(1007)),
                "{what}: the backend sees no text, only the close"
            );
        } else {
            // Part of the frame went on before the invalid byte arrived; nothing after it did.
            let rec = gw
                .wait_record("connection_closed", |r| {
                    r["closed_by"] == "client_violation" && r["conn"] == 2
                })
                .await;
            assert_eq!(rec["close_code"], 1007, "{rec}");
            assert!(
                rec["client_bytes"].as_u64().unwrap() < wire.len() as u64,
                "{rec}"
            );
        }
    }
}

/// Close frames are checked before they go on: a code that may not be sent, a 1-byte payload
/// or a reason that is not UTF-8 gets the client the close for its own violation, and the
/// backend sees the gateway's close, never the invalid one.
#[tokio::test]
async fn invalid_close_frames_never_reach_the_backend() {
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        gateway_section(""),
        api_section("echo", "echo", &backend.url(), "")
    ));
    for (payload, code) in [
        (close_payload(1005, ""), 1002),
        (close_payload(2999, ""), 1002),
        (vec![0x03], 1002),
        (
            [&close_payload(1000, "")[..], &[0xce, 0xba, 0xff]].concat(),
            1007,
        ),
    ] {
        let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
        ws.send_raw(&msg(CLOSE, &payload)).await.unwrap();
        let close = tokio::time::timeout(Duration::from_secs(5), ws.read_until_close())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(close.close_code(), Some(code), "{payload:02x?}");
        let f = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (f.opcode, f.close_code()),
            (CLOSE, Some(code)),
            "{payload:02x?}: the backend gets the gateway's close"
        );
    }
}

/// A side that broke the protocol gets the close for its own violation even when the other
/// side then drops the TCP connection: the drop is not turned into a 1011 for the violator.
#[tokio::test]
async fn a_violator_gets_its_own_code_when_the_other_side_then_drops() {
    // The backend drops the connection as soon as anything arrives (here: the gateway's close).
    let dropper: Handler = std::sync::Arc::new(|_head, mut ws| {
        Box::pin(async move {
            let _ = ws.read_frame().await;
        })
    });
    let backend = RawBackend::start(dropper).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        gateway_section(""),
        api_section("echo", "echo", &backend.url(), "")
    ));
    for (what, wire, code) in [
        (
            "unmasked frame",
            encode_frame(true, 0, TEXT, b"x", None),
            1002,
        ),
        ("reserved opcode", msg(5, b""), 1002),
        ("invalid UTF-8", msg(TEXT, &[0xce, 0xff]), 1007),
        (
            "invalid close code",
            msg(CLOSE, &close_payload(1005, "")),
            1002,
        ),
    ] {
        let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
        ws.send_raw(&wire).await.unwrap();
        let close = tokio::time::timeout(Duration::from_secs(5), ws.read_until_close())
            .await
            .unwrap_or_else(|_| panic!("{what}: no close"))
            .unwrap();
        assert_eq!(close.close_code(), Some(code), "{what}");
    }
}
