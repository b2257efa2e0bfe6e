//! The crate's entry points: a manifest (its file, or its text) to the validated [`Config`], in two
//! passes: toml into the raw structs, which stops at the first syntax or type error, then
//! validation, which reports every problem it finds.
//!
//! Its own module so that what the gateway, the fuzz targets and the tests call is in one short
//! place, apart from the rules they run.

use std::path::Path;

use crate::error::{key_at, line_col, toml_message};
use crate::raw::RawManifest;
use crate::{validate, Config, ManifestError, ManifestErrors};

/// Reads, parses and validates a manifest file.
pub fn load(path: &Path) -> Result<Config, ManifestErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ManifestErrors(vec![ManifestError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read manifest: {e}"),
        }])
    })?;
    parse(path, &text)
}

/// Parses and validates manifest text; `path` is used for error messages and to resolve
/// relative paths.
pub fn parse(path: &Path, text: &str) -> Result<Config, ManifestErrors> {
    parse_inner(path, text, None)
}

/// As [`parse`], with the text of `gateway.subscription_keys_file` given instead of read from
/// disk (the file's path is still resolved for error messages). Lets tests and the fuzz targets
/// run the keys file through the same validation without touching the filesystem.
pub fn parse_with_keys_file(
    path: &Path,
    text: &str,
    keys_file_text: &str,
) -> Result<Config, ManifestErrors> {
    parse_inner(path, text, Some(keys_file_text))
}

fn parse_inner(
    path: &Path,
    text: &str,
    keys_file_text: Option<&str>,
) -> Result<Config, ManifestErrors> {
    let raw: RawManifest = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let (line, column) = line_col(text, span.start);
        let key = key_at(text, &span);
        // toml's message already names unknown fields and expected types.
        let message = toml_message(&e);
        ManifestErrors(vec![ManifestError {
            file: path.to_owned(),
            line,
            column,
            key,
            message,
        }])
    })?;
    validate::validate(path, text, raw, keys_file_text)
}
