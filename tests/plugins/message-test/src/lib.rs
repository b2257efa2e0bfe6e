//! A message policy for the message-scope tests: each text message says what to do with it.
//!
//! - `drop...`: dropped; `close:CODE:REASON`: the connection is closed with CODE and REASON;
//! - `upper:TEXT`: replaced by `UPPER:TEXT` in capitals; `big:N`: replaced by N bytes of `x`;
//! - `whoami`: replaced by the connection as the policy sees it (api, product, subscription,
//!   context, direction), one `key=value` per line;
//! - `count`: replaced by the number of calls this instance has served;
//! - `bad-utf8`: replaced by a byte that is not UTF-8 (the host must refuse it);
//! - `close:BADCODE:...` with a code a close frame may not carry;
//! - `trap`, `spin` (loops until stopped), `error` (cannot decide);
//! - anything else, and every binary message: forwarded as it came.
//!
//! With config `{"pass": true}` every message is forwarded without a look (a pass-through
//! policy: what the conformance suite and the benchmark run through).

use std::sync::atomic::{AtomicU64, Ordering};

use tollgate_sdk::message::{
    Capability, Connection, Direction, Kind, Message, MessageDecision, MessagePolicy,
};

static CALLS: AtomicU64 = AtomicU64::new(0);

pub struct MessageTest;

/// The prepared config: whether the attachment says `"pass": true`.
#[derive(serde::Deserialize)]
pub struct Config {
    pass: bool,
}

impl MessagePolicy for MessageTest {
    type Config = Config;
    const CAPABILITIES: &'static [Capability] = &[
        Capability::ReplaceMessages,
        Capability::DropMessages,
        Capability::CloseConnections,
        Capability::UseContext,
    ];

    /// Any config loads (the tests attach this policy with whatever they like); only
    /// `"pass": true`, spotted in the JSON as written (spaces ignored), means something.
    fn configure(config_json: &str) -> Result<String, String> {
        let pass = config_json.replace(' ', "").contains("\"pass\":true");
        Ok(format!("{{\"pass\":{pass}}}"))
    }

    fn on_message(
        config: &Config,
        connection: &Connection,
        message: Message,
    ) -> Result<MessageDecision, String> {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        if message.kind == Kind::Binary || config.pass {
            return Ok(MessageDecision::Forward);
        }
        let text = message.text().ok_or("text is not UTF-8")?;
        if text.starts_with("drop") {
            return Ok(MessageDecision::Drop);
        }
        if let Some(rest) = text.strip_prefix("close:") {
            let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
            return Ok(MessageDecision::close(
                code.parse().map_err(|_| "bad close code")?,
                reason,
            ));
        }
        if let Some(rest) = text.strip_prefix("upper:") {
            return Ok(MessageDecision::replace_text(format!(
                "UPPER:{}",
                rest.to_uppercase()
            )));
        }
        if let Some(n) = text.strip_prefix("big:") {
            let n: usize = n.parse().map_err(|_| "bad size")?;
            return Ok(MessageDecision::Replace(vec![b'x'; n]));
        }
        match text {
            "whoami" => {
                let mut out = format!(
                    "id={}\napi={}\nproduct={}\nsubscription={}\ndirection={}\n",
                    connection.id,
                    connection.api,
                    connection.product.as_deref().unwrap_or("-"),
                    connection.subscription.as_deref().unwrap_or("-"),
                    match message.direction {
                        Direction::Client => "client",
                        Direction::Backend => "backend",
                    }
                );
                for p in &connection.context {
                    out.push_str(&format!("{}={}\n", p.name, p.value));
                }
                Ok(MessageDecision::replace_text(out))
            }
            "count" => Ok(MessageDecision::replace_text(calls.to_string())),
            "bad-utf8" => Ok(MessageDecision::Replace(vec![0xff])),
            "trap" => panic!("asked to trap"),
            "spin" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "error" => Err("asked to fail".into()),
            _ => Ok(MessageDecision::Forward),
        }
    }
}

tollgate_sdk::export_message_policy!(MessageTest);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_sdk::testing::{binary, connection, on_message, text};

    fn judge(config: &str, message: Message) -> Result<MessageDecision, String> {
        on_message::<MessageTest>(config, &connection().build(), message)
    }

    #[test]
    fn each_text_message_says_what_to_do_with_it() {
        assert!(matches!(
            judge("{}", text("hello")),
            Ok(MessageDecision::Forward)
        ));
        assert!(matches!(
            judge("{}", text("drop me")),
            Ok(MessageDecision::Drop)
        ));
        let d = judge("{}", text("upper:quiet")).unwrap();
        assert_eq!(d.replacement(), Some(&b"UPPER:QUIET"[..]));
        let d = judge("{}", text("big:3")).unwrap();
        assert_eq!(d.replacement(), Some(&b"xxx"[..]));
        let d = judge("{}", text("close:4000:enough")).unwrap();
        let c = d.closing().unwrap();
        assert_eq!((c.code, c.reason.as_str()), (4000, "enough"));
        assert_eq!(judge("{}", text("error")).unwrap_err(), "asked to fail");
        assert_eq!(judge("{}", text("close:x")).unwrap_err(), "bad close code");
    }

    #[test]
    fn what_the_gateway_refuses_is_refused_natively_too() {
        assert!(judge("{}", text("bad-utf8"))
            .unwrap_err()
            .contains("not UTF-8"));
        assert!(judge("{}", text("close:1005:no"))
            .unwrap_err()
            .contains("1005"));
    }

    #[test]
    fn binary_messages_and_pass_through_are_forwarded_without_a_look() {
        assert!(matches!(
            judge("{}", binary(*b"drop")),
            Ok(MessageDecision::Forward)
        ));
        for config in [r#"{"pass": true}"#, r#"{"pass":true,"x":1}"#] {
            assert!(matches!(
                judge(config, text("drop")),
                Ok(MessageDecision::Forward)
            ));
        }
        // Any config loads, as before the SDK.
        assert!(matches!(
            judge(r#"{"pass": "yes"}"#, text("drop")),
            Ok(MessageDecision::Drop)
        ));
    }

    #[test]
    fn whoami_is_the_connection_as_the_policy_sees_it() {
        let c = connection()
            .id(7)
            .api("echo")
            .product("gold")
            .context("jwt.sub", "ann")
            .build();
        let m = Message {
            direction: Direction::Backend,
            ..text("whoami")
        };
        let d = on_message::<MessageTest>("{}", &c, m).unwrap();
        assert_eq!(
            std::str::from_utf8(d.replacement().unwrap()).unwrap(),
            "id=7\napi=echo\nproduct=gold\nsubscription=-\ndirection=backend\njwt.sub=ann\n"
        );
    }

    #[test]
    fn count_grows_with_every_call() {
        let count = || {
            let d = judge("{}", text("count")).unwrap();
            String::from_utf8(d.replacement().unwrap().to_vec())
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        let first = count();
        assert!(count() > first);
    }
}
