//! `check-header`: the handshake must carry a header, optionally with one of a list of values;
//! otherwise it is refused with the attachment's own status and message. This is API
//! Management's check-header policy on the WebSocket onHandshake.
//!
//! Why a policy for it: a WebSocket gets exactly one HTTP request, the handshake, and once it
//! is upgraded the backend holds the connection open for as long as the client likes. A client
//! that should not be there (no API key header, the wrong tenant, an old protocol version)
//! is cheapest to turn away before the gateway opens anything to the backend: a refused
//! handshake never reaches it.
//!
//! ```toml
//! [[apis.on_handshake]]
//! plugin = "check-header"
//! [apis.on_handshake.config]
//! name = "X-Client-Tier"
//! failed_check_httpcode = 403
//! failed_check_error_message = "This API is for gold and silver clients"
//! ignore_case = true
//! values = ["gold", "silver"]
//! ```
//!
//! The rules, where API Management's documentation leaves room:
//! - **Header names** are always case-insensitive (HTTP's rule); `name` may be written in any
//!   case.
//! - **Presence**: a header that is present with an empty value is present. Without `values`
//!   that is all that is checked (and only the first value is read from the host).
//! - **Values**: the check passes when any value the client sent matches any listed value. A
//!   header sent on several lines counts every line, and a line that is a comma-separated list
//!   counts as the whole line and as each of its items (RFC 9110 section 5.3 makes
//!   `X: a, b` and `X: a` + `X: b` the same request, so both spellings behave alike; a listed
//!   value that itself contains a comma still matches a line that is exactly it). Items are
//!   trimmed of spaces and tabs; empty items are skipped. Quoted strings are not parsed: a
//!   comma inside quotes splits too.
//! - **`ignore_case`** is required in API Management; here it defaults to `false` (exact
//!   comparison), the stricter choice for values that are often keys or tokens. When `true`,
//!   ASCII letters are compared without case; any other character must match exactly (HTTP
//!   header values are ASCII in practice, and folding Unicode would let look-alike characters
//!   such as the Kelvin sign match a plain `k`).
//! - **Refusal**: `failed_check_httpcode` with `failed_check_error_message` as a `text/plain`
//!   body, for an absent header and for a value that is not listed alike.
//! - **Logging**: a refusal is logged at info level with the header's name and which check
//!   failed, never with the values sent or listed: they are often credentials.
//! - The gateway removes the subscription key header before any policy runs, so a check of it
//!   always fails; configuring the default one (`Ocp-Apim-Subscription-Key`) is warned about at
//!   load.

use serde::{Deserialize, Deserializer};
use tollgate_sdk::host::{self, Level};
use tollgate_sdk::{Capability, Decision, Policy, Rejection, Request};

/// Longest `failed_check_error_message`, in bytes. The gateway caps a whole decision at
/// 256 KiB; a refusal is a short text, and a longer one is a mistake worth catching at load.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The subscription key header the gateway reads by default (and removes before policies).
const DEFAULT_SUBSCRIPTION_KEY_HEADER: &str = "ocp-apim-subscription-key";

/// The attachment's config: the manifest's `config` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The header that must be present (any case).
    pub name: String,
    /// The status of a refusal, 400..=599.
    #[serde(deserialize_with = "status")]
    pub failed_check_httpcode: u16,
    /// The body of a refusal (text/plain).
    pub failed_check_error_message: String,
    /// Compare values without regard to ASCII case. Default `false`.
    #[serde(default)]
    pub ignore_case: bool,
    /// Allowed values; empty: only presence is checked.
    #[serde(default)]
    pub values: Vec<String>,
}

/// `failed_check_httpcode`: an integer between 400 and 599, with a message that says so.
fn status<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = i64::deserialize(d)?;
    u16::try_from(n)
        .ok()
        .filter(|s| (400..=599).contains(s))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "failed_check_httpcode must be between 400 and 599, got {n}"
            ))
        })
}

/// RFC 9110 `tchar`: what a header name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// HTTP's optional whitespace, which never starts or ends a header value.
const OWS: [char; 2] = [' ', '\t'];

impl Config {
    /// Parses and validates the manifest's config. Error messages name the key at fault and,
    /// for `values`, the index only: listed values may be secrets.
    pub fn parse(json: &str) -> Result<Config, String> {
        // Through a `Value` first: errors of the typed step then carry no "at line 1 column
        // 93" of a JSON text the operator never wrote (the manifest is TOML).
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("check-header: {e}"))?;
        let config: Config =
            serde_json::from_value(value).map_err(|e| format!("check-header: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("check-header: name must not be empty".into());
        }
        if !self.name.bytes().all(is_tchar) {
            return Err(format!(
                "check-header: name {:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)",
                self.name
            ));
        }
        // Checked by the deserializer too; kept for a `Config` built in code.
        if !(400..=599).contains(&self.failed_check_httpcode) {
            return Err(format!(
                "check-header: failed_check_httpcode must be between 400 and 599, got {}",
                self.failed_check_httpcode
            ));
        }
        if self.failed_check_error_message.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "check-header: failed_check_error_message is {} bytes long; at most {MAX_MESSAGE_BYTES} are allowed",
                self.failed_check_error_message.len()
            ));
        }
        for (i, v) in self.values.iter().enumerate() {
            let never = if v.is_empty() {
                "it is empty (leave `values` out to require only that the header is present)"
            } else if v.starts_with(OWS) || v.ends_with(OWS) {
                "it starts or ends with whitespace, which HTTP strips from header values"
            } else if v.chars().any(|c| c.is_ascii_control() && c != '\t') {
                "it contains a control character, which a header value cannot carry"
            } else {
                continue;
            };
            return Err(format!(
                "check-header: values[{i}] can never match: {never}"
            ));
        }
        Ok(())
    }

    /// Load-time warnings: accepted, but probably not what the operator meant.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self
            .name
            .eq_ignore_ascii_case(DEFAULT_SUBSCRIPTION_KEY_HEADER)
        {
            w.push(format!(
                "check-header: `{}` is the default subscription key header, which the gateway removes before policies run: unless the API reads its key from another header, this check refuses every handshake",
                self.name
            ));
        }
        w
    }

    /// Whether `sent` (one value of the header) equals `allowed`.
    fn same(&self, sent: &str, allowed: &str) -> bool {
        if self.ignore_case {
            sent.eq_ignore_ascii_case(allowed)
        } else {
            sent == allowed
        }
    }

    /// Whether one line of the header, as a whole or any of its comma-separated items,
    /// equals a listed value.
    fn line_matches(&self, line: &str) -> bool {
        let line = line.trim_matches(OWS);
        let listed = |item: &str| self.values.iter().any(|v| self.same(item, v));
        listed(line)
            || (line.contains(',')
                && line
                    .split(',')
                    .map(|item| item.trim_matches(OWS))
                    .filter(|item| !item.is_empty())
                    .any(listed))
    }
}

/// Why a handshake failed the check; what is logged (no values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The header is not there.
    Absent,
    /// The header is there, on this many lines, with no listed value.
    NotListed { lines: usize },
}

/// The check itself: `None` when the handshake may go on.
pub fn check(config: &Config, request: &Request) -> Option<Failure> {
    if config.values.is_empty() {
        // Presence only: one value is all there is to read.
        return request
            .header(&config.name)
            .is_none()
            .then_some(Failure::Absent);
    }
    let sent = request.header_values(&config.name);
    if sent.is_empty() {
        return Some(Failure::Absent);
    }
    if sent.iter().any(|line| config.line_matches(line)) {
        None
    } else {
        Some(Failure::NotListed { lines: sent.len() })
    }
}

/// The log line for a failure: the header's name and which check failed, never a value.
pub fn describe(config: &Config, failure: Failure) -> String {
    match failure {
        Failure::Absent => format!("header `{}` is absent", config.name),
        Failure::NotListed { lines } => format!(
            "header `{}` ({lines} line{}) has none of the {} allowed value{}{}",
            config.name,
            if lines == 1 { "" } else { "s" },
            config.values.len(),
            if config.values.len() == 1 { "" } else { "s" },
            if config.ignore_case {
                " (ignoring case)"
            } else {
                ""
            }
        ),
    }
}

/// The exported policy.
pub struct CheckHeader;

impl Policy for CheckHeader {
    type Config = Config;
    const CAPABILITIES: &'static [Capability] = &[Capability::ReadRequest, Capability::Reject];

    fn configure(config_json: &str) -> Result<String, String> {
        let config = Config::parse(config_json)?;
        // The host logs these at load, and `tollgate check` prints them.
        for w in config.warnings() {
            host::log(Level::Warn, &w);
        }
        Ok(config_json.to_owned())
    }

    fn on_handshake(config: &Config, request: &Request) -> Result<Decision, String> {
        Ok(match check(config, request) {
            None => Decision::proceed(),
            Some(failure) => {
                host::log(Level::Info, &describe(config, failure));
                Rejection::new(
                    config.failed_check_httpcode,
                    config.failed_check_error_message.as_str(),
                )
                .into()
            }
        })
    }
}

tollgate_sdk::export!(CheckHeader);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_sdk::testing::{self, take_logs};

    const KEY: &str = r#"{"name":"X-Api-Key","failed_check_httpcode":401,"failed_check_error_message":"Missing or invalid key","values":["k1","k2"]}"#;

    fn request(headers: &[(&str, &str)]) -> Request<'static> {
        let mut r = testing::request().path("/chat").api("chat");
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.build()
    }

    fn run(config: &str, headers: &[(&str, &str)]) -> Decision {
        testing::handshake::<CheckHeader>(config, &request(headers)).unwrap()
    }

    /// The rejection's status and body, `None` when it proceeds.
    fn refused(config: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
        match run(config, headers) {
            Decision::Reject(r) => Some((r.status, String::from_utf8(r.body).unwrap())),
            Decision::Proceed(p) => {
                assert!(
                    p.header_changes.is_empty() && p.context.is_empty(),
                    "proceeds unchanged"
                );
                None
            }
        }
    }

    fn cfg(json: &str) -> Config {
        Config::parse(json).unwrap()
    }

    fn presence(extra: &str) -> String {
        format!(
            r#"{{"name":"X-Team","failed_check_httpcode":400,"failed_check_error_message":"X-Team required"{extra}}}"#
        )
    }

    #[test]
    fn present_header_passes_a_presence_only_check() {
        assert_eq!(refused(&presence(""), &[("x-team", "blue")]), None);
        // Present but empty is present.
        assert_eq!(refused(&presence(""), &[("x-team", "")]), None);
        // An explicitly empty list is the same as none.
        assert_eq!(
            refused(&presence(r#","values":[]"#), &[("x-team", "x")]),
            None
        );
    }

    #[test]
    fn absent_header_is_refused_with_the_configured_status_and_message() {
        let d = run(&presence(""), &[("x-other", "blue")]);
        let Decision::Reject(r) = d else {
            panic!("proceeded")
        };
        assert_eq!(r.status, 400);
        assert_eq!(r.body, b"X-Team required");
        assert_eq!(r.headers.len(), 1);
        assert_eq!(r.headers[0].name, "content-type");
        assert!(r.headers[0].value.starts_with("text/plain"));
        assert_eq!(
            refused(KEY, &[]),
            Some((401, "Missing or invalid key".into()))
        );
    }

    #[test]
    fn header_names_are_case_insensitive() {
        assert_eq!(refused(KEY, &[("X-API-KEY", "k1")]), None);
        assert_eq!(refused(KEY, &[("x-api-key", "k2")]), None);
        let lower = KEY.replace("X-Api-Key", "x-api-key");
        assert_eq!(refused(&lower, &[("X-Api-Key", "k1")]), None);
    }

    #[test]
    fn a_value_that_is_not_listed_is_refused() {
        assert_eq!(
            refused(KEY, &[("x-api-key", "k3")]),
            Some((401, "Missing or invalid key".into()))
        );
        // Prefixes, suffixes and substrings are not matches.
        for v in ["k", "k10", "xk1", "k1k2", ""] {
            assert!(refused(KEY, &[("x-api-key", v)]).is_some(), "{v:?}");
        }
    }

    #[test]
    fn ignore_case_decides_whether_the_values_case_matters() {
        let strict = KEY.replace("\"values\"", "\"ignore_case\":false,\"values\"");
        let loose = KEY.replace("\"values\"", "\"ignore_case\":true,\"values\"");
        // The default is exact.
        assert!(refused(KEY, &[("x-api-key", "K1")]).is_some());
        assert!(refused(&strict, &[("x-api-key", "K1")]).is_some());
        assert_eq!(refused(&strict, &[("x-api-key", "k1")]), None);
        assert_eq!(refused(&loose, &[("x-api-key", "K1")]), None);
        assert_eq!(refused(&loose, &[("x-api-key", "k2")]), None);
        assert!(refused(&loose, &[("x-api-key", "K3")]).is_some());
        // ASCII only: the Kelvin sign is not a `k`, however case is ignored.
        assert!(refused(&loose, &[("x-api-key", "\u{212A}1")]).is_some());
        let accented = r#"{"name":"X-A","failed_check_httpcode":403,"failed_check_error_message":"no","ignore_case":true,"values":["ÄB"]}"#;
        assert_eq!(refused(accented, &[("x-a", "Äb")]), None);
        assert!(refused(accented, &[("x-a", "äb")]).is_some());
    }

    #[test]
    fn a_repeated_header_passes_when_any_line_is_listed() {
        assert_eq!(
            refused(KEY, &[("x-api-key", "nope"), ("x-api-key", "k2")]),
            None
        );
        assert_eq!(
            refused(KEY, &[("x-api-key", "k1"), ("x-api-key", "nope")]),
            None
        );
        assert!(refused(KEY, &[("x-api-key", "a"), ("x-api-key", "b")]).is_some());
    }

    #[test]
    fn a_comma_separated_line_counts_each_item_and_the_whole_line() {
        assert_eq!(refused(KEY, &[("x-api-key", "nope, k2")]), None);
        assert_eq!(refused(KEY, &[("x-api-key", "nope,\tk1 ,")]), None);
        assert!(refused(KEY, &[("x-api-key", "nope, k3")]).is_some());
        assert!(refused(KEY, &[("x-api-key", ", ,")]).is_some());
        // A listed value with a comma in it matches the line that is exactly it.
        let comma = r#"{"name":"X-A","failed_check_httpcode":403,"failed_check_error_message":"no","values":["a, b"]}"#;
        assert_eq!(refused(comma, &[("x-a", "a, b")]), None);
        assert!(refused(comma, &[("x-a", "a")]).is_some());
        assert!(refused(comma, &[("x-a", "a, b, c")]).is_some());
    }

    #[test]
    fn refusals_are_logged_with_the_name_and_the_check_but_never_a_value() {
        take_logs();
        refused(KEY, &[]);
        refused(
            KEY,
            &[("x-api-key", "hunter2"), ("x-api-key", "also-secret")],
        );
        refused(KEY, &[("x-api-key", "k1")]);
        let logs = take_logs();
        assert_eq!(logs.len(), 2, "{logs:?}");
        assert!(logs.iter().all(|(l, _)| matches!(l, Level::Info)));
        assert_eq!(logs[0].1, "header `X-Api-Key` is absent");
        assert_eq!(
            logs[1].1,
            "header `X-Api-Key` (2 lines) has none of the 2 allowed values"
        );
        for (_, m) in &logs {
            for secret in ["hunter2", "also-secret", "k1", "k2"] {
                assert!(!m.contains(secret), "{m}");
            }
        }
    }

    #[test]
    fn declares_read_request_and_reject_only() {
        assert_eq!(
            CheckHeader::capabilities(),
            vec![Capability::ReadRequest, Capability::Reject]
        );
    }

    #[test]
    fn config_defaults() {
        let c = cfg(&presence(""));
        assert!(!c.ignore_case);
        assert!(c.values.is_empty());
        assert_eq!(c.failed_check_httpcode, 400);
        // Any message, the empty one included, is the operator's choice.
        let c = cfg(&presence("").replace("X-Team required", ""));
        assert_eq!(c.failed_check_error_message, "");
    }

    fn config_error(json: &str) -> String {
        let e = CheckHeader::configure(json).unwrap_err();
        assert!(e.starts_with("check-header: "), "{e}");
        assert!(!e.contains("at line"), "{e}");
        e
    }

    #[test]
    fn required_keys_and_unknown_keys() {
        for key in [
            "name",
            "failed_check_httpcode",
            "failed_check_error_message",
        ] {
            let mut v: serde_json::Value = serde_json::from_str(KEY).unwrap();
            v.as_object_mut().unwrap().remove(key);
            let e = config_error(&v.to_string());
            assert!(e.contains(&format!("missing field `{key}`")), "{e}");
        }
        // APIM's spelling, and a typo, are unknown keys with the known ones listed.
        let e = config_error(&KEY.replace("failed_check_httpcode", "failed-check-httpcode"));
        assert!(e.contains("unknown field `failed-check-httpcode`"), "{e}");
        assert!(e.contains("failed_check_httpcode"), "{e}");
        let e = config_error(&KEY.replace("\"values\"", "\"value\""));
        assert!(e.contains("unknown field `value`"), "{e}");
        assert!(config_error("null").contains("invalid type"));
        // Not JSON at all (the gateway never sends that): serde_json's own message.
        let e = CheckHeader::configure("{").unwrap_err();
        assert!(e.starts_with("check-header: EOF"), "{e}");
    }

    #[test]
    fn status_must_be_4xx_or_5xx() {
        for bad in ["200", "399", "600", "0", "-1", "70000"] {
            let e = config_error(&KEY.replace("401", bad));
            assert!(
                e.contains(&format!(
                    "failed_check_httpcode must be between 400 and 599, got {bad}"
                )),
                "{e}"
            );
        }
        let e = config_error(&KEY.replace("401", "\"401\""));
        assert!(e.contains("invalid type: string"), "{e}");
        for good in ["400", "599", "429"] {
            assert!(CheckHeader::configure(&KEY.replace("401", good)).is_ok());
        }
        // Built in code, the same rule holds.
        let mut c = cfg(KEY);
        c.failed_check_httpcode = 302;
        assert!(c.validate().unwrap_err().contains("got 302"));
    }

    #[test]
    fn header_name_must_be_a_token() {
        let e = config_error(&KEY.replace("X-Api-Key", ""));
        assert_eq!(e, "check-header: name must not be empty");
        for bad in ["X Api", "X-Api:", "X-Api\\n", "(x)", "X-Ä", " X"] {
            let e = config_error(&KEY.replace("X-Api-Key", bad));
            assert!(e.contains("is not a valid header name"), "{bad}: {e}");
        }
        for good in ["x", "X_Custom.Header", "!#$%&'*+-.^_`|~09"] {
            assert!(
                CheckHeader::configure(&KEY.replace("X-Api-Key", good)).is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn values_that_can_never_match_are_refused_by_index_without_echoing_them() {
        let with = |values: &str| KEY.replace(r#"["k1","k2"]"#, values);
        let cases = [
            (r#"["k1",""]"#, "values[1] can never match: it is empty"),
            (
                r#"[" secret"]"#,
                "values[0] can never match: it starts or ends",
            ),
            (
                r#"["secret\t"]"#,
                "values[0] can never match: it starts or ends",
            ),
            (
                r#"["k1","k2","sec\r\nret"]"#,
                "values[2] can never match: it contains a control character",
            ),
        ];
        for (values, want) in cases {
            let e = config_error(&with(values));
            assert!(e.contains(want), "{values}: {e}");
            assert!(!e.contains("secret") && !e.contains("sec"), "{e}");
        }
        let e = config_error(&with(r#""k1""#));
        assert!(e.contains("invalid type: string"), "{e}");
        // Inner whitespace, tabs and commas are fine.
        assert!(CheckHeader::configure(&with(r#"["a b","a\tb","a, b"]"#)).is_ok());
    }

    #[test]
    fn an_overlong_message_is_refused() {
        let long = "x".repeat(MAX_MESSAGE_BYTES + 1);
        let e = config_error(&presence("").replace("X-Team required", &long));
        assert!(
            e.contains("failed_check_error_message is 65537 bytes long"),
            "{e}"
        );
        let ok = "x".repeat(MAX_MESSAGE_BYTES);
        assert!(CheckHeader::configure(&presence("").replace("X-Team required", &ok)).is_ok());
    }

    #[test]
    fn the_default_subscription_key_header_is_warned_about_at_load() {
        take_logs();
        let json = KEY.replace("X-Api-Key", "Ocp-Apim-Subscription-Key");
        assert_eq!(CheckHeader::configure(&json).as_deref(), Ok(json.as_str()));
        let logs = take_logs();
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert!(matches!(logs[0].0, Level::Warn));
        assert!(logs[0].1.contains("default subscription key header"));
        assert!(CheckHeader::configure(KEY).is_ok());
        assert!(take_logs().is_empty());
    }

    #[test]
    fn describe_says_which_check_failed() {
        let c = cfg(&KEY.replace("\"values\"", "\"ignore_case\":true,\"values\""));
        assert_eq!(
            describe(&c, Failure::NotListed { lines: 1 }),
            "header `X-Api-Key` (1 line) has none of the 2 allowed values (ignoring case)"
        );
        assert_eq!(
            check(&c, &request(&[("x-api-key", "K9")])),
            Some(Failure::NotListed { lines: 1 })
        );
        assert_eq!(check(&c, &request(&[])), Some(Failure::Absent));
        assert_eq!(check(&c, &request(&[("x-api-key", "K2")])), None);
    }
}
