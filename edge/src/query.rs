//! Query strings: taking a parameter out (the subscription key), and redacting values before a
//! query reaches a log record (browsers cannot set headers on a WebSocket, so credentials
//! travel as `?access_token=...`).

/// A parameter that may appear only once appeared more often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeated(pub String);

impl std::fmt::Display for Repeated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "query parameter `{}` is repeated", self.0)
    }
}

impl std::error::Error for Repeated {}

/// What [`take_param`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Taken {
    /// The decoded value of the parameter, if present.
    pub value: Option<String>,
    /// The query without it, each other pair exactly as the client wrote it; `None` if nothing
    /// is left.
    pub rest: Option<String>,
}

/// Removes every `name=...` pair from a raw query string. A parameter given twice is refused:
/// with two values, the gateway and whatever reads the query after it could each pick a
/// different one.
pub fn take_param(query: Option<&str>, name: &str) -> Result<Taken, Repeated> {
    let Some(q) = query else {
        return Ok(Taken::default());
    };
    let mut found = None;
    let mut kept = Vec::new();
    for piece in q.split('&') {
        let decoded = form_urlencoded::parse(piece.as_bytes()).next();
        match decoded {
            Some((k, v)) if k == name => {
                if found.is_some() {
                    return Err(Repeated(name.to_owned()));
                }
                found = Some(v.into_owned());
            }
            _ => kept.push(piece),
        }
    }
    let rest = if kept.is_empty() {
        None
    } else {
        Some(kept.join("&"))
    };
    Ok(Taken { value: found, rest })
}

/// What a redacted value is replaced with.
pub const REDACTED: &str = "REDACTED";

/// A query with every value replaced by [`REDACTED`] and the names kept as written:
/// `token=abc&room=1` becomes `token=REDACTED&room=REDACTED`; a name without `=` stays as it is.
pub fn redact(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for (i, piece) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match piece.split_once('=') {
            Some((name, _)) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            None => out.push_str(piece),
        }
    }
    out
}

/// A request target (`path?query`) with the query's values redacted (see [`redact`]).
pub fn redact_target(target: &str) -> std::borrow::Cow<'_, str> {
    match target.split_once('?') {
        Some((path, q)) => format!("{path}?{}", redact(q)).into(),
        None => target.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_parameter_and_keeps_the_rest_verbatim() {
        let t = take_param(Some("a=1&subscription-key=k%20y&b=%41"), "subscription-key").unwrap();
        assert_eq!(t.value.as_deref(), Some("k y"));
        assert_eq!(t.rest.as_deref(), Some("a=1&b=%41"));
        let t = take_param(Some("subscription-key=k"), "subscription-key").unwrap();
        assert_eq!(t.rest, None);
        let t = take_param(Some("a=1"), "subscription-key").unwrap();
        assert_eq!(t.value, None);
        assert_eq!(take_param(None, "x").unwrap(), Taken::default());
    }

    #[test]
    fn a_repeated_parameter_is_refused_whatever_its_spelling() {
        assert!(take_param(Some("k=1&k=2"), "k").is_err());
        assert!(take_param(Some("k=1&%6B=1"), "k").is_err());
        assert!(take_param(Some("k=1&k"), "k").is_err());
    }

    #[test]
    fn redaction_keeps_names_only() {
        assert_eq!(
            redact("access_token=eyJ.x.y&room=1&flag"),
            "access_token=REDACTED&room=REDACTED&flag"
        );
        assert_eq!(redact("a=&b=c=d"), "a=REDACTED&b=REDACTED");
        assert_eq!(redact_target("/ws/x?token=s3cret"), "/ws/x?token=REDACTED");
        assert_eq!(redact_target("/ws/x"), "/ws/x");
    }
}
