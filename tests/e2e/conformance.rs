//! Protocol conformance through the gateway (BRIEF section 4): a suite of RFC 6455 cases, run
//! once directly against a compliant backend and once through Tollgate in front of it, must
//! give the same verdict, case for case.
//!
//! Why our own suite: the reference one (Autobahn|Testsuite) needs Python 2.7, which no
//! registry this project can reach still offers. The cases below follow its sections (framing,
//! pings and pongs, reserved bits, opcodes, fragmentation, UTF-8, close handling, big messages)
//! and its verdicts: OK, NON-STRICT (the peer failed the connection, but not the preferred way),
//! FAILED. The backend is tungstenite, the library behind `examples/echo-backend`, which
//! validates frames, UTF-8 and close codes; the gateway relays frames without reassembling
//! them, so whatever the backend decides must reach the client unchanged.
//!
//! Where the backend drops the TCP connection without a close frame (tungstenite does on
//! invalid UTF-8), the gateway sends the client a close 1011, as BRIEF section 1 requires of a
//! backend drop; the comparison judges that close as the drop it stands for and the report
//! marks each such case.
//!
//! The per-case tables are written to `target/test-artifacts/conformance.md` (ws) and
//! `conformance-wss.md` (TLS on both legs).

mod support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use support::tls::*;
use support::*;
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
    // 6: UTF-8 in text messages.
    let valid: [(&str, &[u8]); 6] = [
        ("empty", b""),
        ("ASCII", b"Hello-World"),
        ("2-byte sequences", "κόσμε".as_bytes()),
        ("3-byte sequence U+FFFD", "\u{fffd}".as_bytes()),
        ("4-byte sequence U+10FFFF", "\u{10ffff}".as_bytes()),
        ("mixed", "Hello-µ@ßöäüàá-UTF-8!!".as_bytes()),
    ];
    for (i, (name, text)) in valid.iter().enumerate() {
        v.push(case(
            &format!("6.1.{}", i + 1),
            &format!("valid UTF-8, {name}"),
            vec![Step::Send(msg(TEXT, text))],
            echo(TEXT, text),
        ));
    }
    let kosme = "κόσμε".as_bytes();
    v.push(case(
        "6.2.1",
        "valid UTF-8 split inside a code point across fragments",
        vec![Step::Send(
            [
                frame(false, 0, TEXT, &kosme[..3]),
                frame(true, 0, CONT, &kosme[3..]),
            ]
            .concat(),
        )],
        echo(TEXT, kosme),
    ));
    v.push(case(
        "6.2.2",
        "valid UTF-8 written a byte at a time",
        vec![Step::Chopped(msg(TEXT, kosme), 1)],
        echo(TEXT, kosme),
    ));
    let invalid: [(&str, &[u8]); 10] = [
        ("lone continuation byte", &[0x80]),
        ("truncated 2-byte sequence", &[0xc2]),
        ("truncated 3-byte sequence", &[0xe2, 0x82]),
        ("overlong '/'", &[0xc0, 0xaf]),
        ("overlong NUL, 3 bytes", &[0xe0, 0x80, 0x80]),
        ("UTF-16 surrogate U+D800", &[0xed, 0xa0, 0x80]),
        ("beyond U+10FFFF", &[0xf4, 0x90, 0x80, 0x80]),
        ("byte 0xFE", &[0xfe]),
        ("byte 0xFF", &[0xff]),
        ("valid text then 0xC0", &[b'o', b'k', 0xc0]),
    ];
    for (i, (name, bytes)) in invalid.iter().enumerate() {
        v.push(case(
            &format!("6.3.{}", i + 1),
            &format!("invalid UTF-8: {name}"),
            vec![Step::Send(msg(TEXT, bytes))],
            Expect::Fail {
                before: vec![],
                codes: INVALID_DATA,
            },
        ));
    }
    v.push(case(
        "6.4.1",
        "invalid UTF-8 in the second fragment",
        vec![Step::Send(
            [
                frame(false, 0, TEXT, b"good"),
                frame(true, 0, CONT, &[0xed, 0xa0, 0x80]),
            ]
            .concat(),
        )],
        Expect::Fail {
            before: vec![],
            codes: INVALID_DATA,
        },
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
            codes: &[1002, 1007],
        },
    ));
    for (i, code) in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
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
        0u16, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999, 5000, 65535,
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
    for (i, (op, len)) in [(TEXT, 1 << 20), (BINARY, 1 << 20), (BINARY, 4 << 20)]
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
        let chunks: Vec<&[u8]> = p.chunks(64 * 1024).collect();
        let last = chunks.len() - 1;
        let wire: Vec<u8> = chunks
            .iter()
            .enumerate()
            .flat_map(|(j, c)| frame(j == last, 0, if j == 0 { op } else { CONT }, c))
            .collect();
        v.push(case(
            &format!("9.2.{}", i + 1),
            &format!("opcode {op}, {len} bytes in 64 KiB fragments"),
            vec![Step::Send(wire)],
            echo(op, &p),
        ));
    }
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
    let mut translations = 0;
    for c in &cases {
        let d = run_case(direct, c).await;
        let g = run_case(through, c).await;
        // The one translation the BRIEF asks of the gateway: a backend that drops the TCP
        // connection without a close frame becomes a close 1011 to the client (section 1,
        // "1006-style drops become close 1001/1011"). Judged as the drop it stands for, and
        // marked in the report.
        let translated =
            d.end == End::Eof && g.end == End::Close(Some(1011)) && d.frames == g.frames;
        let judged = if translated {
            Observed {
                frames: g.frames.clone(),
                end: End::Eof,
            }
        } else {
            g.clone()
        };
        let (vd, vg) = (verdict(c, &d), verdict(c, &judged));
        if translated {
            translations += 1;
        }
        if vd == Verdict::Ok {
            direct_ok += 1;
        }
        let _ = writeln!(
            report,
            "| {} | {} | {vd:?} | {vg:?} | {} | {}{} |",
            c.id,
            c.what,
            describe(&d),
            describe(&g),
            if translated {
                " (the backend's drop, sent as 1011)"
            } else {
                ""
            }
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
    let _ = writeln!(
        report,
        "\n{} cases; OK directly: {direct_ok}; backend drops translated to close 1011: {translations}",
        cases.len()
    );
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
    let backend = ws_echo_backend().await;
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
    compare(&direct, &through, "conformance.md").await;
}

/// The same over TLS on both legs: a wss client, the gateway's wss listener, a wss backend
/// (TLS changes how the relay writes, flushes and shuts down, not what it relays).
#[tokio::test]
async fn conformance_suite_over_wss_gives_the_same_verdict_through_the_gateway_as_direct() {
    let ca = TestCa::new("Conformance CA");
    let backend = wss_echo_backend(&ca.leaf(&["localhost", "127.0.0.1"])).await;
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
    compare(&direct, &through, "conformance-wss.md").await;
}
