//! Subscription keys and the admin token: where they may come from (an environment variable, a
//! SHA-256 in the manifest, or the subscription keys file), the rules a key must meet, and the
//! digests that are all the gateway keeps of them.
//!
//! Its own module so that every place a secret is read is in one file, to be reviewed for the
//! promise made about them: a key is hashed as soon as it is read and never appears in a message
//! (operators paste `tollgate check` output into tickets). The `Debug` impls of the model's
//! `AdminConfig` and `SubscriptionConfig` keep the digests out of panics and logs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use crate::error::{key_at, line_col, toml_message};
use crate::raw::{RawAdmin, RawKeyPair, RawSubscription};
use crate::validate::Validator;
use crate::{ManifestError, ProductConfig};

/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// SHA-256 of a subscription key.
pub type KeyDigest = [u8; 32];

/// The digest a key is stored and looked up by.
pub fn key_digest(key: &str) -> KeyDigest {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// Shortest plain-text subscription key accepted (APIM's generated keys have 32 characters).
pub const MIN_KEY_CHARS: usize = 16;

/// The subscription keys file, parsed; `used` collects the subscriptions that took a key from it.
pub(crate) struct KeysFile {
    path: PathBuf,
    text: String,
    entries: BTreeMap<Spanned<String>, RawKeyPair>,
    used: HashSet<String>,
}

impl Validator<'_> {
    /// Reads and parses `gateway.subscription_keys_file`.
    pub(crate) fn keys_file(&mut self, f: &Spanned<String>) -> Option<KeysFile> {
        let path = self.resolve(f.get_ref());
        let read = match self.keys_file_text.take() {
            Some(t) => Ok(t),
            None => std::fs::read_to_string(&path),
        };
        let text = match read {
            Ok(t) => t,
            Err(e) => {
                self.err(
                    f.span(),
                    "gateway.subscription_keys_file",
                    format!(
                        "cannot read subscription keys file `{}`: {e}",
                        path.display()
                    ),
                );
                return None;
            }
        };
        match toml::from_str::<BTreeMap<Spanned<String>, RawKeyPair>>(&text) {
            Ok(entries) => Some(KeysFile {
                path,
                text,
                entries,
                used: Default::default(),
            }),
            Err(e) => {
                // toml's message names the problem, never the value, so no key is echoed.
                let span = e.span().unwrap_or(0..0);
                let key = key_at(&text, &span);
                self.err_in(
                    &path,
                    &text,
                    span,
                    key,
                    format!(
                        "{} (expected one table per subscription: [NAME] primary = \"...\" secondary = \"...\")",
                        toml_message(&e)
                    ),
                );
                None
            }
        }
    }

    /// The digests of subscription `name`'s keys (written at `path`, `sub`), each from exactly
    /// one place: an environment variable, a digest in the manifest, or `keys_file`. A key is
    /// hashed as soon as it is read and never appears in a message.
    pub(crate) fn subscription_keys(
        &mut self,
        path: &str,
        name: &str,
        sub: &Spanned<RawSubscription>,
        keys_file: &mut Option<KeysFile>,
    ) -> Vec<KeyDigest> {
        let r = sub.get_ref();
        let from_file = keys_file
            .as_ref()
            .and_then(|kf| kf.entries.get_key_value(name))
            .map(|(k, v)| (k.span(), v.primary.clone(), v.secondary.clone()));
        let mut keys = Vec::new();
        let errors_before_keys = self.errors.len();
        for (slot, env, sha) in [
            ("primary", &r.primary_key_env, &r.primary_key_sha256),
            ("secondary", &r.secondary_key_env, &r.secondary_key_sha256),
        ] {
            let file_key = from_file.as_ref().and_then(|(_, p, s)| {
                if slot == "primary" {
                    p.clone()
                } else {
                    s.clone()
                }
            });
            let sources = env.is_some() as u8 + sha.is_some() as u8 + file_key.is_some() as u8;
            if sources > 1 {
                // At the manifest's own source of the key (the keys file is the other).
                let (span, field) = match (env, sha) {
                    (Some(e), _) => (e.span(), "key_env"),
                    (None, Some(h)) => (h.span(), "key_sha256"),
                    (None, None) => (sub.span(), "key_env"),
                };
                self.err(
                    span,
                    format!("{path}.{slot}_{field}"),
                    format!("subscription `{name}` has its {slot} key in more than one place ({slot}_key_env, {slot}_key_sha256, subscription_keys_file): keep one"),
                );
                continue;
            }
            if let Some(var) = env {
                match std::env::var(var.get_ref()) {
                    Ok(v) => match key_problem(&v) {
                        Some(p) => self.err(
                            var.span(),
                            format!("{path}.{slot}_key_env"),
                            format!("environment variable `{}`: {p}", var.get_ref()),
                        ),
                        None => keys.push(key_digest(&v)),
                    },
                    Err(_) => self.err(
                        var.span(),
                        format!("{path}.{slot}_key_env"),
                        format!(
                            "environment variable `{}` is not set (or not UTF-8)",
                            var.get_ref()
                        ),
                    ),
                }
            } else if let Some(h) = sha {
                match parse_sha256(h.get_ref()) {
                    Some(d) => keys.push(d),
                    None => self.err(
                        h.span(),
                        format!("{path}.{slot}_key_sha256"),
                        "must be 64 hex digits: the SHA-256 of the key (e.g. `printf %s \"$KEY\" | sha256sum`)",
                    ),
                }
            } else if let (Some(k), Some(kf)) = (file_key, keys_file.as_mut()) {
                kf.used.insert(name.to_owned());
                if let Some(p) = key_problem(k.get_ref()) {
                    let (file, text) = (kf.path.clone(), kf.text.clone());
                    self.err_in(&file, &text, k.span(), format!("{name}.{slot}"), p);
                } else {
                    keys.push(key_digest(k.get_ref()));
                }
            }
        }
        // A subscription whose key was wrong has been told so already.
        if keys.is_empty() && self.errors.len() == errors_before_keys {
            self.err(
                sub.span(),
                path.to_owned(),
                format!("subscription `{name}` has no key: set primary_key_env or primary_key_sha256, or give it a [{name}] table in gateway.subscription_keys_file"),
            );
        }
        keys
    }

    /// Entries of the keys file that name no subscription: most likely a typo, which would
    /// otherwise leave a subscriber locked out without a word.
    pub(crate) fn unused_keys(&mut self, kf: &KeysFile) {
        for k in kf.entries.keys() {
            if !kf.used.contains(k.get_ref()) && !self.sub_sites.contains_key(k.get_ref()) {
                self.err_in(
                    &kf.path,
                    &kf.text,
                    k.span(),
                    k.get_ref().clone(),
                    format!("no subscription is named `{}` in the manifest", k.get_ref()),
                );
            }
        }
    }

    /// A key must identify one subscription.
    pub(crate) fn duplicate_keys(&mut self, products: &[ProductConfig]) {
        let mut seen: HashMap<KeyDigest, &str> = HashMap::new();
        for s in products.iter().flat_map(|p| &p.subscriptions) {
            for k in &s.keys {
                match seen.insert(*k, &s.name) {
                    Some(other) if other != s.name => {
                        let (path, span) = self.sub_sites.get(&s.name).cloned().unwrap_or_default();
                        self.err(
                            span,
                            path,
                            format!("subscriptions `{other}` and `{}` have the same key; a key must identify one subscription", s.name),
                        );
                    }
                    _ => {}
                }
            }
        }
    }

    /// The admin token's digest, from one place (`token_env` or `token_sha256`), at least
    /// [`MIN_ADMIN_TOKEN_CHARS`] long; its value never appears in a message.
    pub(crate) fn admin_token(&mut self, a: &RawAdmin) -> Option<KeyDigest> {
        match (&a.token_env, &a.token_sha256) {
            (Some(_), Some(sha)) => {
                self.err(
                    sha.span(),
                    "admin.token_sha256",
                    "set admin.token_env or admin.token_sha256, not both",
                );
                None
            }
            (Some(var), None) => match std::env::var(var.get_ref()) {
                Ok(v) if v.chars().count() < MIN_ADMIN_TOKEN_CHARS => {
                    self.err(
                        var.span(),
                        "admin.token_env",
                        format!(
                            "environment variable `{}`: the admin token must have at least {MIN_ADMIN_TOKEN_CHARS} characters",
                            var.get_ref()
                        ),
                    );
                    None
                }
                Ok(v) if !v.chars().all(|c| c.is_ascii_graphic()) => {
                    self.err(
                        var.span(),
                        "admin.token_env",
                        format!(
                            "environment variable `{}`: the admin token must be printable ASCII without spaces (it travels in an Authorization header)",
                            var.get_ref()
                        ),
                    );
                    None
                }
                Ok(v) => Some(key_digest(&v)),
                Err(_) => {
                    self.err(
                        var.span(),
                        "admin.token_env",
                        format!(
                            "environment variable `{}` is not set (or not UTF-8)",
                            var.get_ref()
                        ),
                    );
                    None
                }
            },
            (None, Some(sha)) => match parse_sha256(sha.get_ref()) {
                Some(d) => Some(d),
                None => {
                    self.err(
                        sha.span(),
                        "admin.token_sha256",
                        "must be 64 hex digits: the SHA-256 of the token (e.g. `printf %s \"$TOKEN\" | sha256sum`)",
                    );
                    None
                }
            },
            (None, None) => None,
        }
    }

    /// An error in another file (the keys file), located in that file's text.
    fn err_in(
        &mut self,
        file: &Path,
        text: &str,
        span: Range<usize>,
        key: String,
        message: String,
    ) {
        let (line, column) = line_col(text, span.start);
        self.errors.push(ManifestError {
            file: file.to_owned(),
            line,
            column,
            key,
            message,
        });
    }
}

/// A plain-text key's problem, if any; worded without the key.
fn key_problem(key: &str) -> Option<String> {
    if key.chars().count() < MIN_KEY_CHARS {
        Some(format!(
            "a subscription key must have at least {MIN_KEY_CHARS} characters"
        ))
    } else if !key.chars().all(|c| c.is_ascii_graphic()) {
        Some("a subscription key must be printable ASCII without spaces (it travels in a header or query parameter)".into())
    } else {
        None
    }
}

/// 64 hex digits to a digest.
fn parse_sha256(hex: &str) -> Option<KeyDigest> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::error::redact_strings;
    use crate::parse_with_keys_file;
    use crate::test_util::{hex, p, BASE};

    #[test]
    fn admin_hosts_and_token_are_validated_and_only_the_digest_is_kept() {
        let sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let c = p(&format!(
            "{BASE}[admin]\nlisten = \"127.0.0.1:9090\"\nallowed_hosts = [\"Admin.Internal\", \"ops.example:8443\"]\ntoken_sha256 = \"{sha}\"\n"
        ))
        .unwrap();
        let a = c.admin.unwrap();
        assert_eq!(
            a.allowed_hosts
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>(),
            ["admin.internal", "ops.example:8443"]
        );
        assert_eq!(a.token.map(|d| hex(&d)).as_deref(), Some(sha));
        assert!(!format!("{a:?}").contains(sha));

        // SAFETY (edition 2021: safe): a variable only this test reads.
        std::env::set_var("TOLLGATE_UNIT_ADMIN_TOKEN_SHORT", "short-secret");
        std::env::set_var("TOLLGATE_UNIT_ADMIN_TOKEN", "a-long-enough-admin-token");
        let e = p(&format!(
            "{BASE}[admin]\nlisten = \"127.0.0.1:9090\"\ntoken_env = \"TOLLGATE_UNIT_ADMIN_TOKEN_SHORT\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            (e.0[0].line, e.0[0].key.as_str()),
            (6, "admin.token_env"),
            "{e}"
        );
        assert!(e.0[0].message.contains("at least 16"), "{e}");
        assert!(!e.to_string().contains("short-secret"), "{e}");
        let c = p(&format!(
            "{BASE}[admin]\nlisten = \"127.0.0.1:9090\"\ntoken_env = \"TOLLGATE_UNIT_ADMIN_TOKEN\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.admin.unwrap().token,
            Some(key_digest("a-long-enough-admin-token"))
        );
        let e = p(&format!(
            "{BASE}[admin]\nlisten = \"127.0.0.1:9090\"\ntoken_env = \"TOLLGATE_UNIT_ADMIN_TOKEN_UNSET\"\ntoken_sha256 = \"abc\"\nallowed_hosts = [\"a b\"]\n"
        ))
        .unwrap_err();
        let keys: Vec<_> = e.0.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert!(keys.contains(&("admin.allowed_hosts[0]", 8)), "{e}");
        assert!(keys.contains(&("admin.token_sha256", 7)), "{e}");
    }

    /// Found by the `keys_file` fuzz target: a key written as a plain value instead of a table
    /// came back in toml's message (`invalid type: string "..."`).
    #[test]
    fn a_keys_file_value_is_never_echoed_even_in_the_wrong_place() {
        let text = "[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\nsubscription_keys_file = \"keys.toml\"\n";
        let secret = "alice-key-0123456789\\\"x";
        let keys = format!("alice = \"{secret}\"\n");
        let e = parse_with_keys_file(Path::new("/tmp/m.toml"), text, &keys).unwrap_err();
        let shown = e.to_string();
        assert!(!shown.contains("alice-key"), "{shown}");
        assert!(
            shown.contains("keys.toml:1:") && shown.contains("invalid type: a string, expected"),
            "{shown}"
        );
        assert_eq!(
            redact_strings(r#"string "a\"b" and string "c""#),
            "a string and a string"
        );
        assert_eq!(redact_strings(r#"cut string "abc"#), "cut a string");
    }
}
