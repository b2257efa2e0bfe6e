//! `rate-limit-by-key`: at most `calls` handshakes per `renewal_period` for each value of
//! `counter_key`, API Management's rate-limit-by-key on the WebSocket onHandshake. A handshake
//! over the limit gets 429 with a `Retry-After` that is right to the second, and the backend is
//! never contacted.
//!
//! ```toml
//! [[apis.on_handshake]]
//! plugin = "rate-limit-by-key"
//! config = { calls = 30, renewal_period = 10, counter_key = "{subscription.name}" }
//! ```
//!
//! The counting is the gateway's (`counters`): a sliding window, so no window of
//! `renewal_period` ever admits more than `calls`, and, when the manifest has `[cluster]`, one
//! count across every gateway sharing the store. What API Management's documentation leaves
//! open, decided here:
//! - **Key template**: `{name}` takes `client.ip` (the client's address as filters judge it:
//!   `trusted_proxies` apply), `api.name`, `header.<name>` (the header's first value), or else
//!   the context value `name` (`subscription.name`, `product.name`, `jwt.sub`, ...). A value
//!   that is absent counts as empty, so every handshake without it shares one counter (e.g.
//!   `"{subscription.name}"`: anonymous clients together), which never lets a client escape the
//!   limit by leaving a value out. Each value goes into the key with its length (values cannot
//!   run into each other), and a key longer than 400 bytes is replaced by its SHA-256.
//! - **One counter per key value, plugin and period**, shared by every API the policy is
//!   attached to (API Management: "a single counter is used for all scopes"); put `{api.name}`
//!   in the key to count per API.
//! - **Refused handshakes count nothing**, so a client retrying too early is not locked out
//!   for longer.
//! - **The refusal**: 429, `Retry-After` in whole seconds (rounded up, at least 1), and API
//!   Management's JSON body. `remaining_calls_header_name` and `total_calls_header_name` add
//!   those figures to the 101 and to the 429.
//! - **When counting fails** (the fleet's store is unavailable and `on_store_failure =
//!   "closed"`): 503 with `Retry-After: 1`, and a warning.

use serde::Deserialize;
use tollgate_sdk::counters::{self, Rate};
use tollgate_sdk::host::{self, Level};
use tollgate_sdk::{Capability, Decision, Policy, Proceed, Rejection, Request};

/// Longest window: a week (the gateway's counters' bound).
pub const MAX_RENEWAL_PERIOD: u64 = 7 * 24 * 3600;
/// Largest `calls` (the gateway's counters' bound).
pub const MAX_CALLS: u64 = 1_000_000_000_000;
/// Bytes of a rendered key that count (the gateway takes keys up to 512).
pub const MAX_KEY_BYTES: usize = 400;

/// The attachment's config: the manifest's `config` table, API Management's names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Handshakes allowed per `renewal_period` for one key value.
    pub calls: u64,
    /// The window, in seconds (`10`) or as a duration (`"1m"`).
    pub renewal_period: Period,
    /// What to count by: a template such as `"{subscription.name}"` or `"{client.ip}"`.
    pub counter_key: String,
    /// Units one handshake counts (default 1).
    #[serde(default = "one")]
    pub increment_count: u64,
    /// A header for the calls left in the window (on the 101 and on the 429).
    #[serde(default)]
    pub remaining_calls_header_name: Option<String>,
    /// A header for `calls` (on the 101 and on the 429).
    #[serde(default)]
    pub total_calls_header_name: Option<String>,
}

fn one() -> u64 {
    1
}

/// A window in whole seconds: a number, or a duration such as `"90s"` or `"1m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period(pub u64);

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(s) => Ok(Period(s)),
            Raw::Text(t) => {
                let d = humantime::parse_duration(&t).map_err(|e| {
                    serde::de::Error::custom(format!(
                        "`{t}` is not a duration ({e}); write e.g. 10, \"90s\" or \"1m\""
                    ))
                })?;
                if d.subsec_nanos() != 0 {
                    return Err(serde::de::Error::custom(format!(
                        "`{t}`: renewal_period is whole seconds"
                    )));
                }
                Ok(Period(d.as_secs()))
            }
        }
    }
}

impl serde::Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// One piece of a key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    ClientIp,
    ApiName,
    Header(String),
    Context(String),
}

/// `template` in parts; an unclosed `{` or an empty `{}` is an error.
pub fn parse_template(template: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err(format!(
                "rate-limit-by-key: counter_key `{template}` has a `{{` without its `}}`"
            ));
        };
        let name = rest[open + 1..open + close].trim();
        parts.push(match name {
            "" => {
                return Err(format!(
                    "rate-limit-by-key: counter_key `{template}` has an empty `{{}}`"
                ))
            }
            "client.ip" => Part::ClientIp,
            "api.name" => Part::ApiName,
            n => match n.strip_prefix("header.") {
                Some(h) if valid_header_name(h) => Part::Header(h.to_ascii_lowercase()),
                Some(h) => {
                    return Err(format!(
                        "rate-limit-by-key: counter_key `{template}`: `{h}` is not a header name"
                    ))
                }
                None => Part::Context(n.to_owned()),
            },
        });
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

/// The key this request counts under: the template's parts, each value as the request has it
/// (absent: empty) preceded by its length, so no two different sets of values make the same
/// key (`{client.ip}{header.x}`: `1.2.3.4` + `5` is not `1.2.3.45` + nothing). A key longer
/// than [`MAX_KEY_BYTES`] becomes its SHA-256: distinct long values (tokens) never share a
/// counter, and the key's size is bounded.
pub fn render(parts: &[Part], request: &Request) -> String {
    let mut key = String::new();
    let mut value = |v: String| {
        key.push_str(&v.len().to_string());
        key.push(':');
        key.push_str(&v);
    };
    for p in parts {
        match p {
            Part::Text(t) => value(t.clone()),
            Part::ClientIp => value(request.client_ip().unwrap_or_default()),
            Part::ApiName => value(request.api()),
            Part::Header(h) => value(request.header(h).unwrap_or_default()),
            Part::Context(c) => value(request.context(c).unwrap_or_default()),
        }
    }
    if key.len() > MAX_KEY_BYTES {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(key.as_bytes());
        key = digest.iter().map(|b| format!("{b:02x}")).collect();
        key.insert_str(0, "sha256:");
    }
    key
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

impl Config {
    pub fn parse(json: &str) -> Result<Config, String> {
        let c: Config =
            serde_json::from_str(json).map_err(|e| format!("rate-limit-by-key: {e}"))?;
        if c.calls == 0 || c.calls > MAX_CALLS {
            return Err(format!(
                "rate-limit-by-key: calls = {} is not within 1..={MAX_CALLS}",
                c.calls
            ));
        }
        if c.renewal_period.0 == 0 || c.renewal_period.0 > MAX_RENEWAL_PERIOD {
            return Err(format!(
                "rate-limit-by-key: renewal_period of {} s is not within 1..={MAX_RENEWAL_PERIOD} s",
                c.renewal_period.0
            ));
        }
        if c.increment_count == 0 {
            return Err(
                "rate-limit-by-key: increment_count = 0 would count nothing: nothing would ever be limited".into(),
            );
        }
        if c.increment_count > c.calls {
            return Err(format!(
                "rate-limit-by-key: increment_count = {} is more than calls = {}: no handshake could ever pass",
                c.increment_count, c.calls
            ));
        }
        if c.counter_key.trim().is_empty() {
            return Err("rate-limit-by-key: counter_key is empty; write e.g. \"{subscription.name}\" or \"{client.ip}\"".into());
        }
        parse_template(&c.counter_key)?;
        for name in [&c.remaining_calls_header_name, &c.total_calls_header_name]
            .into_iter()
            .flatten()
        {
            if !valid_header_name(name) {
                return Err(format!(
                    "rate-limit-by-key: `{name}` is not a valid header name"
                ));
            }
        }
        Ok(c)
    }
}

/// The exported policy.
pub struct RateLimitByKey;

impl Policy for RateLimitByKey {
    type Config = Config;
    const CAPABILITIES: &'static [Capability] = &[
        Capability::ReadRequest,
        Capability::UseContext,
        Capability::UseCounters,
        Capability::Reject,
        Capability::ModifyResponseHeaders,
    ];

    fn configure(config_json: &str) -> Result<String, String> {
        let c = Config::parse(config_json)?;
        // Prepared with the period in seconds, so instances need no duration parsing.
        Ok(serde_json::json!({
            "calls": c.calls,
            "renewal_period": c.renewal_period,
            "counter_key": c.counter_key,
            "increment_count": c.increment_count,
            "remaining_calls_header_name": c.remaining_calls_header_name,
            "total_calls_header_name": c.total_calls_header_name,
        })
        .to_string())
    }

    fn on_handshake(config: &Config, request: &Request) -> Result<Decision, String> {
        Ok(decide(config, request))
    }
}

/// Counts this handshake under its key and decides.
pub fn decide(config: &Config, request: &Request) -> Decision {
    // Checked at load; a prepared config that no longer parses counts under the whole text.
    let parts = parse_template(&config.counter_key)
        .unwrap_or_else(|_| vec![Part::Text(config.counter_key.clone())]);
    let key = render(&parts, request);
    let rate = Rate {
        limit: config.calls,
        window_seconds: u32::try_from(config.renewal_period.0).unwrap_or(u32::MAX),
    };
    let counted = match counters::increment(&key, rate, config.increment_count) {
        Ok(c) => c,
        Err(e) => {
            host::log(
                Level::Warn,
                &format!("rate-limit-by-key: cannot count ({e}); handshake refused with 503"),
            );
            return Rejection::new(503, "Rate limit state is unavailable; try again shortly.")
                .header("retry-after", "1")
                .into();
        }
    };
    let remaining = config.calls.saturating_sub(counted.count);
    let figures = |mut headers: Vec<(String, String)>| {
        if let Some(h) = &config.remaining_calls_header_name {
            headers.push((h.clone(), remaining.to_string()));
        }
        if let Some(h) = &config.total_calls_header_name {
            headers.push((h.clone(), config.calls.to_string()));
        }
        headers
    };
    if counted.allowed {
        let mut proceed = Proceed::new();
        for (name, value) in figures(Vec::new()) {
            proceed = proceed.response_header(name, value);
        }
        return proceed.into();
    }
    let seconds = counted.retry_after_ms.div_ceil(1000).max(1);
    let body = serde_json::json!({
        "statusCode": 429,
        "message": format!("Rate limit is exceeded. Try again in {seconds} seconds."),
    })
    .to_string();
    let mut rejection = Rejection::new(429, body).header("content-type", "application/json");
    for (name, value) in figures(vec![("retry-after".into(), seconds.to_string())]) {
        rejection = rejection.header(name, value);
    }
    rejection.into()
}

tollgate_sdk::export!(RateLimitByKey);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_sdk::testing::{advance_counters, handshake, request};

    fn header<'a>(d: &'a Decision, name: &str) -> Option<&'a str> {
        match d {
            Decision::Reject(r) => r
                .headers
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.value.as_str()),
            Decision::Proceed(p) => p
                .response_headers
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.value.as_str()),
        }
    }

    #[test]
    fn the_limit_holds_per_key_and_retry_after_is_right_to_the_second() {
        let config = r#"{"calls": 3, "renewal_period": "10s", "counter_key": "{subscription.name}",
            "remaining_calls_header_name": "x-remaining"}"#;
        let ann = request().context("subscription.name", "ann").build();
        let bob = request().context("subscription.name", "bob").build();
        for left in ["2", "1", "0"] {
            let d = handshake::<RateLimitByKey>(config, &ann).unwrap();
            assert_eq!(d.status(), None);
            assert_eq!(header(&d, "x-remaining"), Some(left));
        }
        advance_counters(2_500);
        let d = handshake::<RateLimitByKey>(config, &ann).unwrap();
        assert_eq!(d.status(), Some(429));
        // The first three count until 10 s: 7.5 s from now, rounded up.
        assert_eq!(header(&d, "retry-after"), Some("8"));
        assert_eq!(header(&d, "x-remaining"), Some("0"));
        // Another key is not limited by ann's handshakes.
        assert_eq!(
            handshake::<RateLimitByKey>(config, &bob).unwrap().status(),
            None
        );
        advance_counters(7_500);
        assert_eq!(
            handshake::<RateLimitByKey>(config, &ann).unwrap().status(),
            None
        );
    }

    #[test]
    fn keys_render_from_the_request() {
        let r = request()
            .client_ip("203.0.113.5")
            .api("chat")
            .header("x-tenant", "t1")
            .context("jwt.sub", "ann")
            .build();
        let parts =
            parse_template("{client.ip}/{api.name}/{header.X-Tenant}/{jwt.sub}/{absent}").unwrap();
        assert_eq!(
            render(&parts, &r),
            "11:203.0.113.51:/4:chat1:/2:t11:/3:ann1:/0:"
        );
        // Values cannot run into each other...
        let two = parse_template("{client.ip}{header.x}").unwrap();
        let a = request().client_ip("1.2.3.4").header("x", "5").build();
        let b = request().client_ip("1.2.3.45").build();
        assert_ne!(render(&two, &a), render(&two, &b));
        // ...and long ones are hashed whole, not cut: two tokens alike for 400 bytes differ.
        let sub = parse_template("{jwt.sub}").unwrap();
        let long = |end: &str| {
            request()
                .context("jwt.sub", &format!("{}{end}", "é".repeat(300)))
                .build()
        };
        let (x, y) = (render(&sub, &long("x")), render(&sub, &long("y")));
        assert!(x.starts_with("sha256:") && x.len() <= MAX_KEY_BYTES, "{x}");
        assert_ne!(x, y);
    }

    #[test]
    fn bad_configs_are_refused_at_load() {
        for (config, says) in [
            (
                r#"{"calls": 0, "renewal_period": 1, "counter_key": "k"}"#,
                "calls",
            ),
            (
                r#"{"calls": 1, "renewal_period": 0, "counter_key": "k"}"#,
                "renewal_period",
            ),
            (
                r#"{"calls": 1, "renewal_period": "1.5s", "counter_key": "k"}"#,
                "whole seconds",
            ),
            (
                r#"{"calls": 1, "renewal_period": "soon", "counter_key": "k"}"#,
                "not a duration",
            ),
            (
                r#"{"calls": 1, "renewal_period": 1, "counter_key": "{oops"}"#,
                "without its",
            ),
            (
                r#"{"calls": 1, "renewal_period": 1, "counter_key": " "}"#,
                "empty",
            ),
            (
                r#"{"calls": 1, "renewal_period": 1, "counter_key": "k", "increment_count": 2}"#,
                "increment_count",
            ),
            (
                r#"{"calls": 1, "renewal_period": 1, "counter_key": "k", "increment_count": 0}"#,
                "count nothing",
            ),
            (
                r#"{"calls": 1, "renewal_period": 1, "counter_key": "{header.a b}"}"#,
                "not a header name",
            ),
            (
                r#"{"calls": 1, "renewal_period": 1, "counter_key": "k", "total_calls_header_name": "a b"}"#,
                "header name",
            ),
            (
                r#"{"calls": 1, "renewal_period": 1, "counter_key": "k", "colour": 1}"#,
                "unknown field",
            ),
        ] {
            let e = RateLimitByKey::configure(config).unwrap_err();
            assert!(e.contains(says), "{config}: {e}");
        }
        let prepared = RateLimitByKey::configure(
            r#"{"calls": 30, "renewal_period": "1m", "counter_key": "{client.ip}"}"#,
        )
        .unwrap();
        assert_eq!(Config::parse(&prepared).unwrap().renewal_period, Period(60));
    }
}
