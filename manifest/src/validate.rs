//! From the raw manifest to the validated [`Config`]: every rule the manifest must follow, applied
//! in one pass that collects *all* errors rather than stopping at the first, because `tollgate
//! check` promises to report every problem in one run.
//!
//! Each error is located at the value it is about (file, line and column from the value's span,
//! and its dotted key), and the order errors are found in is the order they are reported in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use crate::error::line_col;
use crate::model::Config;
use crate::raw::RawManifest;
use crate::{ManifestError, ManifestErrors};

mod apis;
mod attachments;
mod cluster;
mod gateway;
mod message_limits;
mod products;

/// Checks the raw manifest `text` (written at `file`) and builds its [`Config`], or returns every
/// problem found. `keys_file_text` stands in for reading `gateway.subscription_keys_file`.
pub(crate) fn validate(
    file: &Path,
    text: &str,
    raw: RawManifest,
    keys_file_text: Option<&str>,
) -> Result<Config, ManifestErrors> {
    let mut v = Validator::new(file, text);
    v.keys_file_text = keys_file_text.map(str::to_owned);
    v.validate(raw)
}

/// One validation under way: the manifest's text (to locate errors), its directory (to resolve
/// paths), the errors found so far in the order found, and what a section learns for the checks
/// of a later one.
pub(crate) struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
    base: PathBuf,
    pub(crate) errors: Vec<ManifestError>,
    has_policies: bool,
    /// Where each subscription is written (key path, span), for errors found later.
    pub(crate) sub_sites: HashMap<String, (String, Range<usize>)>,
    /// The keys file's text when the caller has it already ([`crate::parse_with_keys_file`]).
    pub(crate) keys_file_text: Option<String>,
}

impl<'a> Validator<'a> {
    fn new(file: &'a Path, text: &'a str) -> Self {
        let base = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Validator {
            file,
            text,
            base,
            errors: Vec::new(),
            has_policies: false,
            sub_sites: HashMap::new(),
            keys_file_text: None,
        }
    }

    /// The whole manifest, section by section. The order of the calls is the order errors are
    /// reported in: gateway, admin, products (with their subscriptions and the keys file), global
    /// policies, APIs, then the checks that need every section.
    fn validate(mut self, raw: RawManifest) -> Result<Config, ManifestErrors> {
        let gw_span = raw.gateway.span();
        let g = raw.gateway.into_inner();
        let gateway = self.gateway(&g, gw_span.clone());
        let admin = raw.admin.as_ref().and_then(|a| self.admin(a));
        let cluster = raw.cluster.as_ref().and_then(|c| self.cluster(c));
        let (products, product_names) =
            self.products(&raw.products, g.subscription_keys_file.as_ref());
        let policies = self.attachments(&raw.policies, "policies");
        // Whether `[gateway.tls]` is written, not whether it is valid: an API's `wss` is not
        // refused again for a TLS listener whose own errors are reported already.
        let (apis, unserved_apis) = self.apis(
            &raw.apis,
            &products,
            &product_names,
            &gateway,
            g.tls.is_some(),
        );
        self.unpublished_products(&raw.products, &raw.apis);
        if self.has_policies && gateway.plugin_dir.is_none() {
            self.err(
                gw_span,
                "gateway.plugin_dir",
                "policies are attached but no plugin_dir is set to load them from",
            );
        }
        if !self.errors.is_empty() {
            return Err(ManifestErrors(self.errors));
        }
        Ok(Config {
            source: self.file.to_owned(),
            gateway,
            admin,
            cluster,
            apis,
            unserved_apis,
            products,
            policies,
        })
    }

    /// Records a problem at `span` of the manifest and lets validation go on, so that one run
    /// reports them all.
    pub(crate) fn err(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(ManifestError {
            file: self.file.to_owned(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    /// A path as written in the manifest, relative to the manifest's directory (not the working
    /// directory), so a manifest means the same wherever the gateway is started from.
    pub(crate) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    /// `file:line:column: key `key`` for the byte offset `at` of the manifest, the prefix of
    /// errors found after parsing (in the plugins an attachment names).
    fn site(&self, at: usize, key: &str) -> String {
        let (line, column) = line_col(self.text, at);
        format!("{}:{line}:{column}: key `{key}`", self.file.display())
    }

    fn addr(&mut self, v: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    v.span(),
                    key,
                    format!(
                        "`{}` is not a socket address (expected IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080)",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn existing_file(&mut self, v: &Spanned<String>, key: &str) -> PathBuf {
        let p = self.resolve(v.get_ref());
        if !p.is_file() {
            self.err(
                v.span(),
                key,
                format!("file `{}` does not exist", p.display()),
            );
        }
        p
    }

    /// Checks that `path` (an existing file named at `v`) holds what its key promises, so a
    /// wrong file is reported at its key rather than when the listener or connector is built.
    fn pem_content(&mut self, v: &Spanned<String>, key: &str, path: &Path, want: Pem) {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        if !path.is_file() {
            return; // already reported
        }
        let problem = match want {
            Pem::Certificates => match CertificateDer::pem_file_iter(path) {
                Err(e) => Some(format!("cannot read `{}`: {e}", path.display())),
                Ok(it) => match it.collect::<Result<Vec<_>, _>>() {
                    Err(e) => Some(format!("`{}` is not valid PEM: {e}", path.display())),
                    Ok(certs) if certs.is_empty() => Some(format!(
                        "no certificate found in `{}` (expected PEM `-----BEGIN CERTIFICATE-----` blocks)",
                        path.display()
                    )),
                    Ok(_) => None,
                },
            },
            Pem::PrivateKey => PrivateKeyDer::from_pem_file(path).err().map(|e| {
                format!(
                    "no usable private key in `{}` ({e}; expected a PEM PKCS#8, PKCS#1 or SEC1 key)",
                    path.display()
                )
            }),
        };
        if let Some(p) = problem {
            self.err(v.span(), key, p);
        }
    }
}

/// What a PEM file named in the manifest must hold.
#[derive(Debug, Clone, Copy)]
enum Pem {
    Certificates,
    PrivateKey,
}

#[cfg(test)]
mod tests {
    use crate::test_util::{p, BASE};
    use crate::Limits;

    #[test]
    fn minimal_manifest_with_defaults() {
        let c = p(&format!(
            "{BASE}[[apis]]\nname = \"echo\"\nurl_suffix = \"/echo/\"\nbackend = \"ws://127.0.0.1:9000/\"\n"
        ))
        .unwrap();
        assert_eq!(c.apis[0].url_suffix, "echo");
        assert!(c.apis[0].schemes.ws && !c.apis[0].schemes.wss);
        assert_eq!(c.gateway.limits, Limits::default());
    }

    #[test]
    fn all_semantic_errors_reported() {
        let text = format!(
            "{BASE}[[apis]]\nname = \"a\"\nurl_suffix = \"chat\"\nbackend = \"http://x/\"\n\
             [[apis]]\nname = \"b\"\nurl_suffix = \"chat\"\nbackend = \"ws://x/\"\nproducts = [\"nope\"]\n"
        );
        let e = p(&text).unwrap_err();
        let keys: Vec<_> = e.0.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert!(keys.contains(&("apis[0].backend", 7)), "{e}");
        assert!(keys.contains(&("apis[1].url_suffix", 10)), "{e}");
        assert!(keys.contains(&("apis[1].products", 12)), "{e}");
    }
}
