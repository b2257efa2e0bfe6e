//! Structured logs. JSON (one object per line, fields at the top level) when stdout is not a
//! terminal, so `jq 'select(.event == "handshake" and .api == "echo" and .status == 101)'`
//! works on a captured log; human-readable text on a terminal. `RUST_LOG` overrides the level.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if std::io::stdout().is_terminal() {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    }
}

/// For `tollgate check`: warnings (an inherited policy that will be skipped, a backend with
/// `insecure_skip_verify`, a keys file others can read, ...) go to stderr as plain lines, so a
/// manifest that passes still shows what an operator should look at. Info lines stay quiet.
pub fn init_check() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .without_time()
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// A URL or request target as log records show it: browsers pass credentials in the query
/// (`?access_token=`), so values are redacted unless the manifest says `log_query_values = true`.
pub fn loggable(target: &str, log_values: bool) -> std::borrow::Cow<'_, str> {
    if log_values {
        target.into()
    } else {
        tollgate_edge::query::redact_target(target)
    }
}
