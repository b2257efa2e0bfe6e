//! How a problem is reported: every error names the file, the line and column, and the dotted
//! key it is about, so an operator can jump straight to it.
//!
//! Its own module because every other part of the crate reports through it, and because toml's
//! own errors (from the manifest and from the keys file alike) must be turned into the same form:
//! located, on one line, never empty, and never echoing a value (a keys file holds secrets).

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// One problem in a manifest, located precisely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is about the file as a whole (e.g. it cannot be read).
    pub line: usize,
    pub column: usize,
    /// Dotted key path such as `apis[1].url_suffix`; empty when no key applies.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a manifest.
#[derive(Debug, thiserror::Error)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// toml's message for a parse error, made fit for an operator's terminal: on one line, never
/// empty (toml gives some syntax errors, such as a control character in a comment, no words of
/// their own), and with every string value it quotes replaced (`invalid type: string "..."`
/// would otherwise print a key written where a table was expected, from the keys file, into
/// `tollgate check` output and logs).
pub(crate) fn toml_message(e: &toml::de::Error) -> String {
    let message = redact_strings(&e.message().replace('\n', " "));
    if message.trim().is_empty() {
        "invalid TOML here (e.g. a control character, or a character TOML does not allow at this place)".into()
    } else {
        message
    }
}

/// Replaces each `string "..."` (serde's wording for an unexpected string value, Debug-escaped)
/// with `a string`.
pub(crate) fn redact_strings(message: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(QUOTED) {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        let after = &rest[at + QUOTED.len()..];
        // The value ends at the first quote not escaped with a backslash.
        let mut escaped = false;
        let end = after.char_indices().find_map(|(i, c)| {
            let closes = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            closes.then_some(i + 1)
        });
        match end {
            Some(end) => rest = &after[end..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// Best-effort name of the key a parse error points at: the spanned text when it is a bare key,
/// otherwise the key on the left of `=` on that line, otherwise a `[table]` header.
pub(crate) fn key_at(text: &str, span: &Range<usize>) -> String {
    let spanned = text.get(span.clone()).unwrap_or("").trim();
    let is_key = !spanned.is_empty()
        && spanned
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if is_key && !spanned.chars().all(|c| c.is_ascii_digit()) {
        return spanned.to_owned();
    }
    let start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("").trim();
    if line.starts_with('#') {
        // A comment names no key (and may hold anything).
        return String::new();
    }
    if let Some((k, _)) = line.split_once('=') {
        return k.trim().to_owned();
    }
    line.trim_matches(|c| c == '[' || c == ']')
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use crate::test_util::{p, BASE};

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = p(&format!("{BASE}colour = \"blue\"\n")).unwrap_err();
        assert_eq!(e.0[0].line, 4, "{e}");
        assert_eq!(e.0[0].key, "colour", "{e}");
        assert!(e.0[0].message.contains("unknown field"), "{e}");
    }

    /// Found by the `manifest` fuzz target: a control character in a comment gave an error with
    /// an empty message and the comment's text as its key.
    #[test]
    fn every_parse_error_says_what_is_wrong() {
        let e = p(&format!(
            "{BASE}# a comment \u{1}\0 with control characters\n"
        ))
        .unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert!(!e.0[0].message.trim().is_empty(), "{e}");
        assert_eq!(e.0[0].key, "", "{e}");
        assert_eq!(e.0[0].line, 4, "{e}");
    }
}
