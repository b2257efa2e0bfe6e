//! A policy that fails in the way its config names, for the fault-isolation tests:
//! `{"mode": "loop" | "alloc" | "trap" | "recursion" | "huge" | "ok"}`, or probes its sandbox
//! and reports what happened in the 101 header `x-probe`:
//! `{"mode": "read-file", "arg": PATH}`, `{"mode": "env", "arg": NAME}`,
//! `{"mode": "socket", "arg": "127.0.0.1:PORT"}`, `{"mode": "clock"}`, or reports the
//! request's TLS facts: `{"mode": "tls"}`, or counts the calls this instance has served:
//! `{"mode": "count"}` (1 every time with fresh instances; 1, 2, 3... with a pooled one).
// Natively (workspace builds) nothing is exported, so the policy is unused there.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use serde::Deserialize;
use tollgate_sdk::{Capability, Decision, Declaration, HandshakeRequest, Pair, Policy, Proceed};

#[derive(Deserialize, Clone)]
struct Config {
    mode: String,
    #[serde(default)]
    arg: String,
}

fn probe(c: &Config, request: &HandshakeRequest) -> String {
    let r: Result<String, String> = match c.mode.as_str() {
        "tls" => request
            .tls
            .as_ref()
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
        "count" => {
            static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            Ok(n.to_string())
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

struct Faulty;

// Recursing without end is the point: it must hit the guest's stack limit.
#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    // black_box keeps the optimiser from turning this into a loop.
    std::hint::black_box(recurse(n + 1)) + std::hint::black_box(n)
}

impl Policy for Faulty {
    fn declare() -> Declaration {
        Declaration {
            name: "faulty".into(),
            version: "0.0.0".into(),
            capabilities: vec![Capability::ReadRequest, Capability::ModifyResponseHeaders],
        }
    }

    fn configure(config_json: String) -> Result<String, String> {
        let _: Config = serde_json::from_str(&config_json).map_err(|e| e.to_string())?;
        Ok(config_json)
    }

    fn on_handshake(config: String, request: HandshakeRequest) -> Decision {
        let Ok(c) = serde_json::from_str::<Config>(&config) else {
            panic!("config changed between configure and on-handshake")
        };
        match c.mode.as_str() {
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
            "ok" => Decision::Proceed(Proceed::default()),
            _ => Decision::Proceed(Proceed {
                response_headers: vec![Pair::new("x-probe", probe(&c, &request))],
                ..Proceed::default()
            }),
        }
    }
}

#[cfg(target_arch = "wasm32")]
tollgate_sdk::export_policy!(Faulty with_types_in tollgate_sdk);
