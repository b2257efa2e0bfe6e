//! A policy that fails in the way its config names, for the fault-isolation tests:
//! `{"mode": "loop" | "alloc" | "trap" | "recursion" | "huge" | "ok"}`.
// Natively (workspace builds) nothing is exported, so the policy is unused there.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use std::cell::RefCell;

use serde::Deserialize;
use tollgate_sdk::{Capability, Decision, Declaration, HandshakeRequest, Pair, Policy, Proceed};

#[derive(Deserialize, Clone)]
struct Config {
    mode: String,
}

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
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

    fn configure(config_json: String) -> Result<(), String> {
        let c: Config = serde_json::from_str(&config_json).map_err(|e| e.to_string())?;
        MODE.with(|m| *m.borrow_mut() = c.mode);
        Ok(())
    }

    fn on_handshake(_request: HandshakeRequest) -> Decision {
        let mode = MODE.with(|m| m.borrow().clone());
        match mode.as_str() {
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
            _ => Decision::Proceed(Proceed::default()),
        }
    }
}

#[cfg(target_arch = "wasm32")]
tollgate_sdk::export_policy!(Faulty with_types_in tollgate_sdk);
