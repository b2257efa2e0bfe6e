//! A policy that fails in the way its config names, for the fault-isolation tests:
//! `{"mode": "loop" | "alloc" | "trap" | "recursion" | "huge" | "ok"}`, or probes its sandbox
//! and reports what happened in the 101 header `x-probe`:
//! `{"mode": "read-file", "arg": PATH}`, `{"mode": "env", "arg": NAME}`,
//! `{"mode": "socket", "arg": "127.0.0.1:PORT"}`, `{"mode": "clock"}`, or reports the
//! request's TLS facts: `{"mode": "tls"}`, or counts the calls this instance has served:
//! `{"mode": "count"}` (1 every time with fresh instances; 1, 2, 3... with a pooled one), or
//! dirties every page of a 3 MiB static after checking an earlier call left none dirty:
//! `{"mode": "scribble"}` (`clean`, or the error `N dirty pages`).
//!
//! Probes of the sandbox's bounds: `{"mode": "sleep", "arg": MS}` waits on the monotonic clock
//! (no CPU time used); `"sleep-first"` does so only in an instance's first call, then counts;
//! `{"mode": "sockets", "arg": N}` creates N TCP sockets through wasi-libc and keeps them
//! (never closed, so a warm instance would hold their descriptors); `"udp"` and `"lookup"` try
//! a UDP socket and a name lookup; `{"mode": "verify", "arg": "CALLS:BYTES"}` calls
//! `signatures.verify` CALLS times on a BYTES-long message; `{"mode": "log", "arg": N}` logs N
//! records of 4000 bytes; `"many"` returns 100,000 empty context values;
//! `{"mode": "respond-header", "arg": NAME}` adds 101 header NAME; `{"mode": "reject-header",
//! "arg": NAME}` rejects (403) with header NAME; `{"mode": "fail-second",
//! "arg": "trap" | "loop" | "alloc"}` fails that way in an instance's second call and reports
//! the count otherwise (a pooled instance that failed must not be reused); `{"mode": "error",
//! "arg": TEXT}` returns the error TEXT (cannot decide); `{"mode": "close-in", "arg": SECONDS}`
//! proceeds with `close-at` SECONDS after `received-at` (0 or less: a time not in the future);
//! `{"mode": "read-loop", "arg": N}` reads all headers N times and reports the bytes read;
//! `{"mode": "tiny-loop", "arg": N}` reads `received-at` N times;
//! `{"mode": "close-at", "arg": UNIX_SECONDS}` proceeds with that `close-at` (default u64::MAX).
// Natively (workspace builds) nothing is exported, so the policy is unused there.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use serde::Deserialize;
use tollgate_sdk::{Capability, Decision, Pair, Policy, Proceed, Rejection, Request};

#[derive(Deserialize, Clone)]
struct Config {
    mode: String,
    #[serde(default)]
    arg: String,
}

fn probe(c: &Config, request: &Request) -> String {
    let r: Result<String, String> = match c.mode.as_str() {
        "tls" => request
            .tls()
            .map(|t| {
                format!(
                    "{} {} {}",
                    t.version,
                    t.cipher_suite,
                    t.server_name.as_deref().unwrap_or("-")
                )
            })
            .ok_or_else(|| "no TLS".to_owned()),
        "read-file" => std::fs::read_to_string(&c.arg)
            .map(|s| format!("{} bytes", s.len()))
            .map_err(|e| e.to_string()),
        "env" => std::env::var(&c.arg).map_err(|e| e.to_string()),
        "socket" => std::net::TcpStream::connect(&c.arg)
            .map(|_| "connected".to_owned())
            .map_err(|e| e.to_string()),
        "scribble" => {
            // Reads, then dirties, one byte of every page of a 3 MiB zero-initialised static
            // (in .bss, above the 1 MiB stack): a fresh instance must find every one zero again,
            // whichever way the host resets the memory it kept or released.
            let mut dirty = 0usize;
            for i in (0..SCRIBBLE.len())
                .step_by(4096)
                .chain([SCRIBBLE.len() - 1])
            {
                if SCRIBBLE[i].swap(0xAA, std::sync::atomic::Ordering::Relaxed) != 0 {
                    dirty += 1;
                }
            }
            if dirty == 0 {
                Ok("clean".to_owned())
            } else {
                Err(format!("{dirty} dirty pages"))
            }
        }
        "count" => {
            static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            Ok(n.to_string())
        }
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_millis(
                c.arg.parse().unwrap_or(10_000),
            ));
            Ok("slept".to_owned())
        }
        "sleep-first" => {
            static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n == 1 {
                std::thread::sleep(std::time::Duration::from_millis(
                    c.arg.parse().unwrap_or(10_000),
                ));
            }
            Ok(n.to_string())
        }
        "sockets" => sockets(c.arg.parse().unwrap_or(1)),
        "udp" => std::net::UdpSocket::bind("127.0.0.1:0")
            .map(|_| "bound".to_owned())
            .map_err(|e| e.to_string()),
        "lookup" => std::net::ToSocketAddrs::to_socket_addrs("localhost:80")
            .map(|a| format!("{} addresses", a.count()))
            .map_err(|e| e.to_string()),
        "verify" => {
            let (calls, bytes) = c.arg.split_once(':').unwrap_or(("1", "16"));
            let (calls, bytes): (u32, usize) =
                (calls.parse().unwrap_or(1), bytes.parse().unwrap_or(16));
            let message = vec![b'm'; bytes];
            let mut done = 0u32;
            let mut last = Ok(false);
            while done < calls {
                last = tollgate_sdk::host::verify(
                    tollgate_sdk::host::Algorithm::Hs256,
                    &tollgate_sdk::host::Key::Secret(b"secret".to_vec()),
                    &message,
                    &[0u8; 32],
                );
                if last.is_err() {
                    break;
                }
                done += 1;
            }
            last.map(|v| format!("{done} calls, last {v}"))
        }
        "log" => {
            let n: u32 = c.arg.parse().unwrap_or(1);
            for i in 0..n {
                let mut line = format!("record {i} ");
                line.push_str(&"x".repeat(4000 - line.len()));
                tollgate_sdk::host::log(tollgate_sdk::host::Level::Info, &line);
            }
            Ok(format!("logged {n}"))
        }
        "clock" => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs().to_string())
            .map_err(|e| e.to_string()),
        other => Err(format!("unknown mode {other}")),
    };
    match r {
        Ok(v) => format!("ok: {v}"),
        Err(e) => format!("error: {e}").replace(['\r', '\n'], " "),
    }
}

/// Creates `n` TCP sockets (wasi-libc's `socket`, which calls `wasi:sockets`'
/// `create-tcp-socket`) and leaks them on purpose: a warm instance keeps them open.
fn sockets(n: u32) -> Result<String, String> {
    #[cfg(target_arch = "wasm32")]
    {
        for i in 0..n {
            // SAFETY: plain libc call; the descriptor is leaked on purpose.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                return Err(format!("socket {i}: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(format!("{n} sockets"))
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        Err(format!("{n} sockets: only in the component"))
    }
}

/// What `scribble` writes to: zero-initialised, so in the module's .bss, not its data image.
static SCRIBBLE: [std::sync::atomic::AtomicU8; 3 << 20] =
    [const { std::sync::atomic::AtomicU8::new(0) }; 3 << 20];

struct Faulty;

// Recursing without end is the point: it must hit the guest's stack limit.
#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    // black_box keeps the optimiser from turning this into a loop.
    std::hint::black_box(recurse(n + 1)) + std::hint::black_box(n)
}

impl Policy for Faulty {
    type Config = Config;
    // Everything it may do, so the probes are about the sandbox, not the declaration; it
    // rejects only in `reject-header`.
    const CAPABILITIES: &'static [Capability] = &[
        Capability::Reject,
        Capability::ReadRequest,
        Capability::ModifyHeaders,
        Capability::ModifyQuery,
        Capability::ModifyResponseHeaders,
        Capability::UseContext,
        Capability::VerifySignatures,
        Capability::LimitLifetime,
        Capability::FetchKeys,
    ];

    /// `register-elsewhere`: asks the gateway to fetch a URL the config does not hold;
    /// `register-many`: asks for `arg` (a URL of the config) over and over; both in
    /// `configure`, where `key-sets.register` is allowed. The error ends the load.
    fn check(c: &Config) -> Result<(), String> {
        use tollgate_sdk::host::{register_key_set, KeySetOptions, KeySetSource};
        let options = KeySetOptions {
            refresh_seconds: 0,
            min_refresh_seconds: 0,
            ca_pem: None,
        };
        match c.mode.as_str() {
            "register-elsewhere" => {
                register_key_set(
                    &KeySetSource::Jwks("https://127.0.0.1:9/elsewhere".into()),
                    &options,
                )?;
            }
            "register-many" => {
                let mut last = String::new();
                for _ in 0..20 {
                    match register_key_set(&KeySetSource::Jwks(c.arg.clone()), &options) {
                        Ok(_) => return Err("a register succeeded".into()),
                        Err(e) => last = e,
                    }
                }
                return Err(last);
            }
            _ => {}
        }
        Ok(())
    }

    fn on_handshake(c: &Config, request: &Request) -> Result<Decision, String> {
        Ok(match c.mode.as_str() {
            "loop" => {
                let mut i: u64 = 0;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => panic!("faulty policy: trap on purpose"),
            "recursion" => {
                std::hint::black_box(recurse(0));
                unreachable!()
            }
            "huge" => Decision::Proceed(Proceed {
                response_headers: vec![Pair::new("x-huge", "a".repeat(8 * 1024 * 1024))],
                ..Proceed::default()
            }),
            "fail-second" => {
                // An instance's second call fails as `arg` says; the others report the count.
                static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n == 2 {
                    let fail = Config {
                        mode: c.arg.clone(),
                        arg: String::new(),
                    };
                    return Faulty::on_handshake(&fail, request);
                }
                Decision::Proceed(Proceed {
                    response_headers: vec![Pair::new("x-probe", format!("ok: {n}"))],
                    ..Proceed::default()
                })
            }
            "ok" => Decision::Proceed(Proceed::default()),
            "error" => return Err(c.arg.clone()),
            "read-loop" => {
                // Reads the headers over and over: the host's per-call read budget must stop it.
                let mut bytes = 0usize;
                for _ in 0..c.arg.parse::<u32>().unwrap_or(1_000_000) {
                    bytes += request
                        .headers()
                        .iter()
                        .map(|p| p.value.len())
                        .sum::<usize>();
                }
                Decision::Proceed(
                    Proceed::new().response_header("x-probe", format!("read {bytes} bytes")),
                )
            }
            "tiny-loop" => {
                // Reads that return no bytes (received-at) over and over: only the flat fee of
                // each read bounds them.
                let mut sum = 0u64;
                for _ in 0..c.arg.parse::<u32>().unwrap_or(1_000_000) {
                    sum = sum.wrapping_add(request.received_at());
                }
                Decision::Proceed(Proceed::new().response_header("x-probe", sum.to_string()))
            }
            "close-at" => {
                Decision::Proceed(Proceed::new().close_at(c.arg.parse().unwrap_or(u64::MAX)))
            }
            "close-in" => {
                let secs: i64 = c.arg.parse().unwrap_or(0);
                let at = i64::try_from(request.received_at()).unwrap_or(i64::MAX) + secs;
                Decision::Proceed(Proceed::new().close_at(u64::try_from(at).unwrap_or(0)))
            }
            "many" => Decision::Proceed(Proceed {
                context: vec![Pair::new("", ""); 100_000],
                ..Proceed::default()
            }),
            "reject-header" => Decision::Reject(Rejection {
                status: 403,
                headers: vec![Pair::new(c.arg.clone(), "0")],
                body: b"refused by policy".to_vec(),
            }),
            "respond-header" => Decision::Proceed(Proceed {
                response_headers: vec![Pair::new(c.arg.clone(), "from-policy")],
                ..Proceed::default()
            }),
            _ => Decision::Proceed(Proceed {
                response_headers: vec![Pair::new("x-probe", probe(c, request))],
                ..Proceed::default()
            }),
        })
    }
}

tollgate_sdk::export!(Faulty, name = "faulty");
