//! From the raw manifest to the validated [`Config`]: every rule the manifest must follow, applied
//! in one pass that collects *all* errors rather than stopping at the first, because `tollgate
//! check` promises to report every problem in one run.
//!
//! Each error is located at the value it is about (file, line and column from the value's span,
//! and its dotted key), and the order errors are found in is the order they are reported in.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use http::HeaderName;
use toml::Spanned;

use crate::backend_url::{parse_backend, BackendUrl};
use crate::error::line_col;
use crate::model::{
    AdminConfig, ApiConfig, Attachment, Config, ConnLimits, GatewayConfig, Grants, Instances,
    KeyLocation, Limits, ListenerTls, ProductConfig, Schemes, SubscriptionConfig,
    DEFAULT_POOL_MAX_USES, DEFAULT_SIGNATURE_CACHE_ENTRIES, MIN_HEADER_BYTES,
};
use crate::raw::{
    RawAdmin, RawApi, RawApiLimits, RawAttachment, RawGateway, RawLimits, RawManifest, RawProduct,
    RawSubscription,
};
use crate::secrets::KeysFile;
use crate::{ManifestError, ManifestErrors};

/// What a PEM file named in the manifest must hold.
#[derive(Debug, Clone, Copy)]
enum Pem {
    Certificates,
    PrivateKey,
}

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

    /// The subscriptions of product `i`, each key resolved to its digest.
    fn subscriptions(
        &mut self,
        i: usize,
        list: &[Spanned<RawSubscription>],
        keys_file: &mut Option<KeysFile>,
        names: &mut HashMap<String, String>,
    ) -> Vec<SubscriptionConfig> {
        let mut out = Vec::new();
        for (j, sub) in list.iter().enumerate() {
            let path = format!("products[{i}].subscriptions[{j}]");
            let r = sub.get_ref();
            let name = r.name.get_ref().trim().to_owned();
            if name.is_empty() {
                self.err(r.name.span(), format!("{path}.name"), "must not be empty");
                continue;
            }
            if let Some(first) = names.insert(name.clone(), path.clone()) {
                self.err(
                    r.name.span(),
                    format!("{path}.name"),
                    format!("duplicate subscription name `{name}` (first used by {first}); names are unique across the manifest"),
                );
                continue;
            }
            self.sub_sites
                .insert(name.clone(), (path.clone(), sub.span()));
            if let Some(m) = &r.max_connections {
                if *m.get_ref() == 0 {
                    self.err(
                        m.span(),
                        format!("{path}.max_connections"),
                        "must be at least 1 (remove the subscription to shut it out)",
                    );
                }
            }
            let keys = self.subscription_keys(&path, &name, sub, keys_file);
            out.push(SubscriptionConfig {
                name,
                max_connections: r.max_connections.as_ref().map(|m| *m.get_ref()),
                keys,
            });
        }
        out
    }

    /// The API's subscription key header and query parameter names.
    fn key_location(&mut self, i: usize, a: &RawApi) -> KeyLocation {
        let mut loc = KeyLocation::default();
        if let Some(h) = &a.subscription_key_header {
            if HeaderName::from_bytes(h.get_ref().trim().as_bytes()).is_err() {
                self.err(
                    h.span(),
                    format!("apis[{i}].subscription_key_header"),
                    format!("`{}` is not a valid header name", h.get_ref()),
                );
            } else {
                loc.header = h.get_ref().trim().to_ascii_lowercase();
            }
        }
        if let Some(q) = &a.subscription_key_query {
            if q.get_ref().trim().is_empty() {
                self.err(
                    q.span(),
                    format!("apis[{i}].subscription_key_query"),
                    "must not be empty",
                );
            } else {
                loc.query = q.get_ref().trim().to_owned();
            }
        }
        loc
    }

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

    /// Whether `dir` (an existing directory below the manifest's, by name) is still below it
    /// once every symbolic link on the way is followed.
    fn stays_below_manifest_dir(&self, dir: &Path) -> bool {
        match (self.base.canonicalize(), dir.canonicalize()) {
            (Ok(base), Ok(real)) => real.starts_with(base),
            _ => false,
        }
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

    /// The whole manifest, section by section. The order of the calls is the order errors are
    /// reported in: gateway, admin, products (with their subscriptions and the keys file), global
    /// policies, APIs, then the checks that need every section.
    fn validate(mut self, raw: RawManifest) -> Result<Config, ManifestErrors> {
        let gw_span = raw.gateway.span();
        let g = raw.gateway.into_inner();
        let gateway = self.gateway(&g, gw_span.clone());
        let admin = raw.admin.as_ref().and_then(|a| self.admin(a));
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
            apis,
            unserved_apis,
            products,
            policies,
        })
    }

    /// `[gateway]`: its name, listeners, plugin directories, limits and trusted proxies. `span`
    /// is the whole table's, for what is missing from it.
    fn gateway(&mut self, g: &RawGateway, span: Range<usize>) -> GatewayConfig {
        let name = g.name.get_ref().trim().to_owned();
        if name.is_empty() {
            self.err(g.name.span(), "gateway.name", "must not be empty");
        }
        let listen = g
            .listen
            .as_ref()
            .and_then(|l| self.addr(l, "gateway.listen"));
        let tls = g.tls.as_ref().and_then(|t| {
            let listen = self.addr(&t.listen, "gateway.tls.listen");
            let cert = self.existing_file(&t.cert, "gateway.tls.cert");
            let key = self.existing_file(&t.key, "gateway.tls.key");
            self.pem_content(&t.cert, "gateway.tls.cert", &cert, Pem::Certificates);
            self.pem_content(&t.key, "gateway.tls.key", &key, Pem::PrivateKey);
            listen.map(|listen| ListenerTls { listen, cert, key })
        });
        if g.listen.is_none() && g.tls.is_none() {
            self.err(
                span,
                "gateway.listen",
                "no listener: set `listen` (ws) and/or `[gateway.tls]` (wss)",
            );
        }
        let plugin_dir = g.plugin_dir.as_ref().map(|d| self.resolve(d.get_ref()));
        if let (Some(d), Some(dir)) = (&g.plugin_dir, &plugin_dir) {
            if let Err(e) = std::fs::read_dir(dir) {
                self.err(
                    d.span(),
                    "gateway.plugin_dir",
                    format!("cannot read directory `{}`: {e}", dir.display()),
                );
            }
        }
        let plugin_cache_dir = g
            .plugin_cache_dir
            .as_ref()
            .map(|d| self.resolve(d.get_ref()));
        let limits = self.limits(&g.limits);
        let trusted_proxies = match &g.trusted_proxies {
            Some(list) => match tollgate_edge::forwarded::TrustedProxies::parse(list.get_ref()) {
                Ok(t) => t,
                Err(m) => {
                    self.err(list.span(), "gateway.trusted_proxies", m);
                    Default::default()
                }
            },
            None => Default::default(),
        };
        GatewayConfig {
            name,
            listen,
            tls,
            plugin_dir,
            plugin_dir_location: g
                .plugin_dir
                .as_ref()
                .map(|d| self.site(d.span().start, "gateway.plugin_dir")),
            plugin_cache_dir,
            signature_cache_entries: g
                .signature_cache_entries
                .unwrap_or(DEFAULT_SIGNATURE_CACHE_ENTRIES),
            subscription_keys_file: g
                .subscription_keys_file
                .as_ref()
                .map(|f| self.resolve(f.get_ref())),
            log_query_values: g.log_query_values.unwrap_or(false),
            trusted_proxies,
            limits,
        }
    }

    /// `[[products]]`, with their policies and subscriptions, each subscription's keys resolved
    /// (from the environment, a digest, or `keys_file`, read here). Also returns each product's
    /// index by name, for the APIs that list them.
    fn products(
        &mut self,
        list: &[RawProduct],
        keys_file: Option<&Spanned<String>>,
    ) -> (Vec<ProductConfig>, HashMap<String, usize>) {
        let mut keys_file = keys_file.and_then(|f| self.keys_file(f));
        let mut sub_names: HashMap<String, String> = HashMap::new();
        let mut products = Vec::new();
        let mut product_names = HashMap::new();
        for (i, p) in list.iter().enumerate() {
            let pname = p.name.get_ref().trim().to_owned();
            if pname.is_empty() {
                self.err(
                    p.name.span(),
                    format!("products[{i}].name"),
                    "must not be empty",
                );
            } else if product_names.insert(pname.clone(), i).is_some() {
                self.err(
                    p.name.span(),
                    format!("products[{i}].name"),
                    format!("duplicate product name `{pname}`"),
                );
            }
            if let Some(apis) = &p.apis {
                self.err(
                    apis.span(),
                    format!("products[{i}].apis"),
                    format!("a product does not list its APIs: each API lists its products (one source of truth); add `products = [\"{pname}\"]` to those [[apis]] entries"),
                );
            }
            let policies = self.attachments(&p.policies, &format!("products[{i}].policies"));
            let subscriptions =
                self.subscriptions(i, &p.subscriptions, &mut keys_file, &mut sub_names);
            products.push(ProductConfig {
                name: pname.clone(),
                display_name: p.display_name.clone().unwrap_or(pname),
                // APIM's default: a product is protected unless it says otherwise.
                subscription_required: p
                    .subscription_required
                    .as_ref()
                    .is_none_or(|r| *r.get_ref()),
                policies,
                subscriptions,
            });
        }
        if let Some(kf) = &keys_file {
            self.unused_keys(kf);
        }
        self.duplicate_keys(&products);
        (products, product_names)
    }

    /// A product no API lists is most likely a typo in an API's `products`; its subscribers
    /// would reach nothing.
    fn unpublished_products(&mut self, products: &[RawProduct], apis: &[RawApi]) {
        for (i, p) in products.iter().enumerate() {
            let pname = p.name.get_ref().trim();
            if !pname.is_empty()
                && !apis
                    .iter()
                    .any(|a| a.products.iter().any(|ap| ap.get_ref() == pname))
            {
                self.err(
                    p.name.span(),
                    format!("products[{i}].name"),
                    format!("product `{pname}` publishes no API: add `products = [\"{pname}\"]` to the [[apis]] entries it publishes"),
                );
            }
        }
    }

    /// `[[apis]]`: the APIs this gateway serves, and the names of those it does not (their
    /// `gateways` name others). An API with errors is checked to the end, so that all of its
    /// errors are reported, and then left out.
    fn apis(
        &mut self,
        list: &[RawApi],
        products: &[ProductConfig],
        product_names: &HashMap<String, usize>,
        gateway: &GatewayConfig,
        has_tls_listener: bool,
    ) -> (Vec<ApiConfig>, Vec<String>) {
        let mut apis = Vec::new();
        let mut unserved = Vec::new();
        let mut api_names: HashMap<String, usize> = HashMap::new();
        let mut suffixes: BTreeMap<String, usize> = BTreeMap::new();
        for (i, a) in list.iter().enumerate() {
            let aname = a.name.get_ref().trim().to_owned();
            if aname.is_empty() {
                self.err(
                    a.name.span(),
                    format!("apis[{i}].name"),
                    "must not be empty",
                );
            } else if let Some(first) = api_names.insert(aname.clone(), i) {
                self.err(
                    a.name.span(),
                    format!("apis[{i}].name"),
                    format!("duplicate API name `{aname}` (first used by apis[{first}])"),
                );
            }
            let suffix = self.url_suffix(i, list, &mut suffixes);
            let backend = match parse_backend(a.backend.get_ref()) {
                Ok(b) => Some(b),
                Err(m) => {
                    self.err(a.backend.span(), format!("apis[{i}].backend"), m);
                    None
                }
            };
            let schemes = self.schemes(i, a, gateway.listen.is_some(), has_tls_listener);
            self.api_products(i, a, &aname, products, product_names);
            let subscription_key = self.key_location(i, a);
            let ca_file = self.ca_file(i, a, backend.as_ref());
            let on_handshake =
                self.attachments(&a.on_handshake, &format!("apis[{i}].on_handshake"));
            if let Some(m) = a
                .limits
                .max_connections
                .as_ref()
                .filter(|m| *m.get_ref() == 0)
            {
                self.err(
                    m.span(),
                    format!("apis[{i}].limits.max_connections"),
                    "must be at least 1 (0 would refuse every handshake; remove the API to shut it)",
                );
            }
            let Some(backend) = backend else { continue };
            let served = a.gateways.is_empty() || a.gateways.contains(&gateway.name);
            if !served {
                unserved.push(aname);
                continue;
            }
            apis.push(ApiConfig {
                display_name: a.display_name.clone().unwrap_or_else(|| aname.clone()),
                name: aname,
                url_suffix: suffix,
                backend,
                schemes,
                products: a.products.iter().map(|p| p.get_ref().clone()).collect(),
                subscription_key,
                max_connections: a.limits.max_connections.as_ref().map(|m| *m.get_ref()),
                limits: conn_limits(&a.limits, &gateway.limits),
                ca_file,
                insecure_skip_verify: a.insecure_skip_verify,
                on_handshake,
            });
        }
        (apis, unserved)
    }

    /// API `i`'s url_suffix without its surrounding `/`: a plain path (no query, fragment,
    /// escapes or dot segments, which would make routing ambiguous) and unique across the
    /// gateway. `suffixes` holds the suffixes of the APIs before it, by index into `list`.
    fn url_suffix(
        &mut self,
        i: usize,
        list: &[RawApi],
        suffixes: &mut BTreeMap<String, usize>,
    ) -> String {
        let a = &list[i];
        let suffix = a.url_suffix.get_ref().trim().trim_matches('/').to_owned();
        if let Some(bad) = suffix
            .chars()
            .find(|c| c.is_whitespace() || matches!(c, '?' | '#' | '%') || c.is_control())
        {
            self.err(
                a.url_suffix.span(),
                format!("apis[{i}].url_suffix"),
                format!("character {bad:?} is not allowed in a url_suffix"),
            );
        } else if suffix
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
            && !suffix.is_empty()
        {
            self.err(
                a.url_suffix.span(),
                format!("apis[{i}].url_suffix"),
                "empty, `.` or `..` path segments are not allowed",
            );
        }
        if let Some(first) = suffixes.insert(suffix.clone(), i) {
            self.err(
                a.url_suffix.span(),
                format!("apis[{i}].url_suffix"),
                format!(
                    "duplicate url_suffix `{suffix}`: already used by API `{}` (apis[{first}]); a suffix must be unique across the gateway",
                    list[first].name.get_ref()
                ),
            );
        }
        suffix
    }

    /// The products API `i` (named `aname`) lists: each defined, and at most one of them open.
    fn api_products(
        &mut self,
        i: usize,
        a: &RawApi,
        aname: &str,
        products: &[ProductConfig],
        product_names: &HashMap<String, usize>,
    ) {
        let mut open = Vec::new();
        for p in &a.products {
            match product_names.get(p.get_ref().as_str()) {
                None => self.err(
                    p.span(),
                    format!("apis[{i}].products"),
                    format!("product `{}` is not defined in [[products]]", p.get_ref()),
                ),
                Some(&n) if !products[n].subscription_required => open.push(p.get_ref().as_str()),
                Some(_) => {}
            }
        }
        if open.len() > 1 {
            // A handshake without a key comes in through the API's open product; with two
            // there would be no telling which product's policies apply.
            self.err(
                a.products[0].span(),
                format!("apis[{i}].products"),
                format!(
                    "an API can be in at most one open product (subscription_required = false); `{aname}` is in {}",
                    open.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
                ),
            );
        }
    }

    /// API `i`'s `ca_file`: an existing PEM file of certificates, for a `wss://` backend only.
    fn ca_file(&mut self, i: usize, a: &RawApi, backend: Option<&BackendUrl>) -> Option<PathBuf> {
        let c = a.ca_file.as_ref()?;
        let key = format!("apis[{i}].ca_file");
        let path = self.existing_file(c, &key);
        self.pem_content(c, &key, &path, Pem::Certificates);
        if backend.is_some_and(|b| !b.tls) {
            self.err(c.span(), key, "ca_file is only used with a wss:// backend");
        }
        Some(path)
    }

    fn attachments(&mut self, list: &[Spanned<RawAttachment>], key: &str) -> Vec<Attachment> {
        let mut out = Vec::new();
        for (n, a) in list.iter().enumerate() {
            let r = a.get_ref();
            let failure_status = r.failure_status.as_ref().map_or(500, |f| *f.get_ref());
            if let Some(f) = r
                .failure_status
                .as_ref()
                .filter(|_| !(400..=599).contains(&failure_status))
            {
                self.err(
                    f.span(),
                    format!("{key}[{n}].failure_status"),
                    "must be between 400 and 599",
                );
            }
            if r.plugin.get_ref().trim().is_empty() {
                self.err(
                    r.plugin.span(),
                    format!("{key}[{n}].plugin"),
                    "must name a plugin",
                );
            }
            let timeout =
                r.timeout.as_ref().and_then(
                    |t| match humantime_serde::re::humantime::parse_duration(t.get_ref().trim()) {
                        Ok(d) if d.is_zero() => {
                            self.err(
                                t.span(),
                                format!("{key}[{n}].timeout"),
                                "must be more than 0",
                            );
                            None
                        }
                        Ok(d) => Some(d),
                        Err(e) => {
                            self.err(
                                t.span(),
                                format!("{key}[{n}].timeout"),
                                format!(
                                    "`{}` is not a duration ({e}); write e.g. \"500ms\" or \"2s\"",
                                    t.get_ref()
                                ),
                            );
                            None
                        }
                    },
                );
            let mut grants = Grants {
                read_dirs: Vec::new(),
                env: r.grants.env.clone(),
                clock: r.grants.clock,
            };
            for (k, entry) in r.grants.read_dirs.iter().enumerate() {
                let d = entry.get_ref();
                let rel = d.trim_end_matches('/');
                let host = self.resolve(rel);
                let site = format!("{key}[{n}].grants.read_dirs[{k}]");
                if rel.is_empty()
                    || Path::new(rel).is_absolute()
                    || rel.split('/').any(|c| c == "..")
                {
                    self.err(
                        entry.span(),
                        site,
                        format!("`{d}` must be a relative path below the manifest's directory"),
                    );
                } else if !host.is_dir() {
                    self.err(
                        entry.span(),
                        site,
                        format!("`{}` is not a directory", host.display()),
                    );
                } else if !self.stays_below_manifest_dir(&host) {
                    // A symbolic link (the directory or one on its way) that leads out: the
                    // sandbox would open whatever it points at.
                    self.err(
                        entry.span(),
                        site,
                        format!("`{d}` leads outside the manifest's directory (through a symbolic link); grant the real directory below it instead"),
                    );
                } else {
                    grants.read_dirs.push((host, rel.to_owned()));
                }
            }
            let instances = match (
                r.instances.as_ref().map(|i| i.get_ref().as_str()),
                r.pool_max_uses.as_ref().map(|u| *u.get_ref()),
            ) {
                (None | Some("fresh"), None) => Instances::Fresh,
                (Some("pooled"), uses) if uses != Some(0) => Instances::Pooled {
                    max_uses: uses.unwrap_or(DEFAULT_POOL_MAX_USES),
                },
                (Some("pooled"), _) => {
                    self.err(
                        r.pool_max_uses.as_ref().map_or(a.span(), |u| u.span()),
                        format!("{key}[{n}].pool_max_uses"),
                        "must be at least 1",
                    );
                    Instances::Fresh
                }
                (None | Some("fresh"), Some(_)) => {
                    self.err(
                        r.pool_max_uses.as_ref().map_or(a.span(), |u| u.span()),
                        format!("{key}[{n}].pool_max_uses"),
                        "only applies with instances = \"pooled\"",
                    );
                    Instances::Fresh
                }
                (Some(other), _) => {
                    self.err(
                        r.instances.as_ref().map_or(a.span(), |i| i.span()),
                        format!("{key}[{n}].instances"),
                        format!("`{other}` is not an instance strategy; use \"fresh\" (a new instance per handshake, the default) or \"pooled\" (warm instances reused)"),
                    );
                    Instances::Fresh
                }
            };
            out.push(Attachment {
                plugin: r.plugin.get_ref().clone(),
                config: r
                    .config
                    .as_ref()
                    .map(|c| c.get_ref().clone())
                    .unwrap_or_default(),
                fuel: r.fuel,
                memory_limit_bytes: r.memory_limit_bytes,
                timeout,
                failure_status,
                grants,
                instances,
                location: self.site(r.plugin.span().start, &format!("{key}[{n}].plugin")),
                config_location: match &r.config {
                    Some(c) => self.site(c.span().start, &format!("{key}[{n}].config")),
                    None => self.site(r.plugin.span().start, &format!("{key}[{n}].plugin")),
                },
            });
        }
        self.has_policies |= !out.is_empty();
        out
    }

    /// `[admin]`: its address, the extra Host names it answers, and its token (see
    /// [`Validator::admin_token`]).
    fn admin(&mut self, a: &RawAdmin) -> Option<AdminConfig> {
        let listen = self.addr(&a.listen, "admin.listen");
        let mut allowed_hosts = Vec::new();
        for (i, h) in a.allowed_hosts.iter().enumerate() {
            match tollgate_edge::host::HostName::parse(h.get_ref()) {
                Ok(name) => allowed_hosts.push(name),
                Err(e) => self.err(
                    h.span(),
                    format!("admin.allowed_hosts[{i}]"),
                    format!("`{}`: {e}", h.get_ref()),
                ),
            }
        }
        let token = self.admin_token(a);
        Some(AdminConfig {
            listen: listen?,
            allowed_hosts,
            token,
        })
    }

    fn limits(&mut self, l: &RawLimits) -> Limits {
        let d = Limits::default();
        let max_header_bytes = match &l.max_header_bytes {
            Some(v) if *v.get_ref() < MIN_HEADER_BYTES => {
                self.err(
                    v.span(),
                    "gateway.limits.max_header_bytes",
                    format!("must be at least {MIN_HEADER_BYTES}"),
                );
                MIN_HEADER_BYTES
            }
            Some(v) => *v.get_ref(),
            None => d.max_header_bytes,
        };
        let max_pending_handshakes = match &l.max_pending_handshakes {
            Some(v) if *v.get_ref() == 0 => {
                self.err(
                    v.span(),
                    "gateway.limits.max_pending_handshakes",
                    "must be at least 1",
                );
                d.max_pending_handshakes
            }
            Some(v) => *v.get_ref(),
            None => d.max_pending_handshakes,
        };
        let max_connections = match &l.max_connections {
            Some(v) if *v.get_ref() == 0 => {
                self.err(
                    v.span(),
                    "gateway.limits.max_connections",
                    "must be at least 1 (0 would refuse every handshake)",
                );
                d.max_connections
            }
            Some(v) => *v.get_ref(),
            None => d.max_connections,
        };
        Limits {
            max_connections,
            handshake_timeout: l.handshake_timeout.unwrap_or(d.handshake_timeout),
            backend_timeout: l.backend_timeout.unwrap_or(d.backend_timeout),
            idle_timeout: match l.idle_timeout {
                Some(t) if t.is_zero() => None,
                Some(t) => Some(t),
                None => d.idle_timeout,
            },
            drain_timeout: l.drain_timeout.unwrap_or(d.drain_timeout),
            max_frame_size: l.max_frame_size.unwrap_or(d.max_frame_size),
            max_message_size: l.max_message_size.or(d.max_message_size),
            max_header_bytes,
            max_pending_handshakes,
        }
    }

    fn schemes(&mut self, i: usize, a: &RawApi, has_ws: bool, has_wss: bool) -> Schemes {
        let key = format!("apis[{i}].schemes");
        let Some(list) = &a.schemes else {
            // Default: whatever listeners exist.
            return Schemes {
                ws: has_ws,
                wss: has_wss,
            };
        };
        let mut s = Schemes::default();
        if list.get_ref().is_empty() {
            self.err(
                list.span(),
                key.clone(),
                "must list at least one of \"ws\", \"wss\"",
            );
        }
        for scheme in list.get_ref() {
            match scheme.as_str() {
                "ws" if !has_ws => self.err(
                    list.span(),
                    key.clone(),
                    "scheme \"ws\" needs a plain listener: set gateway.listen",
                ),
                "wss" if !has_wss => self.err(
                    list.span(),
                    key.clone(),
                    "scheme \"wss\" needs a TLS listener: add [gateway.tls]",
                ),
                "ws" => s.ws = true,
                "wss" => s.wss = true,
                other => self.err(
                    list.span(),
                    key.clone(),
                    format!("unknown scheme `{other}` (expected \"ws\" or \"wss\")"),
                ),
            }
        }
        s
    }
}

/// The limits in force on an API's connections: the API's own where it sets them, the gateway's
/// otherwise; a timeout of `0s` turns it off.
fn conn_limits(l: &RawApiLimits, global: &Limits) -> ConnLimits {
    ConnLimits {
        idle_timeout: match l.idle_timeout {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => global.idle_timeout,
        },
        max_connection_lifetime: l.max_connection_lifetime.filter(|d| !d.is_zero()),
        max_frame_size: l.max_frame_size.unwrap_or(global.max_frame_size),
        max_message_size: l.max_message_size.or(global.max_message_size),
    }
}

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_util::{hex, p, BASE};
    use crate::{key_digest, parse};

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
    fn edge_settings_have_safe_defaults_and_located_errors() {
        let api = "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://x/\"\n";
        let c = p(&format!("{BASE}{api}")).unwrap();
        assert!(
            !c.gateway.log_query_values,
            "query values are redacted by default"
        );
        assert!(
            c.gateway.trusted_proxies.is_empty(),
            "no proxy is trusted by default"
        );
        assert_eq!(c.gateway.limits.max_pending_handshakes, 4096);
        assert_eq!(c.apis[0].limits.max_connection_lifetime, None);
        let c = p(&format!(
            "{BASE}log_query_values = true\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n{api}[apis.limits]\nmax_connection_lifetime = \"1h\"\n"
        ))
        .unwrap();
        assert!(c.gateway.log_query_values);
        assert!(c
            .gateway
            .trusted_proxies
            .trusts("10.2.3.4".parse().unwrap()));
        assert_eq!(
            c.apis[0].limits.max_connection_lifetime,
            Some(Duration::from_secs(3600))
        );
        let e = p(&format!(
            "{BASE}trusted_proxies = [\"10.0.0.0/99\"]\n[gateway.limits]\nmax_pending_handshakes = 0\n{api}"
        ))
        .unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        let proxies = e.0.iter().find(|m| m.key == "gateway.trusted_proxies");
        let proxies = proxies.unwrap_or_else(|| panic!("{e}"));
        assert_eq!(proxies.line, 4, "{e}");
        assert!(proxies.message.contains("10.0.0.0/99"), "{e}");
        assert!(
            e.0.iter()
                .any(|m| m.key == "gateway.limits.max_pending_handshakes"),
            "{e}"
        );
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

    #[test]
    fn attachment_timeout_is_a_positive_duration_located_by_line_and_key() {
        let api = "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\n";
        let att = |t: &str| {
            format!("{BASE}plugin_dir = \".\"\n{api}[[apis.on_handshake]]\nplugin = \"p\"\n{t}\n")
        };
        let c = p(&att("timeout = \"500ms\"")).unwrap();
        assert_eq!(
            c.apis[0].on_handshake[0].timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(p(&att("")).unwrap().apis[0].on_handshake[0].timeout, None);
        for (bad, words) in [
            ("timeout = \"soon\"", "is not a duration"),
            ("timeout = \"0s\"", "must be more than 0"),
        ] {
            let e = p(&att(bad)).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(e.0[0].key, "apis[0].on_handshake[0].timeout", "{e}");
            assert_eq!(e.0[0].line, 11, "{e}");
            assert!(e.0[0].message.contains(words), "{e}");
        }
        let e = p(&att("timeout = 5")).unwrap_err();
        assert!(e.to_string().contains("timeout"), "{e}");
    }

    #[test]
    fn products_and_subscriptions_are_validated_with_every_error_located() {
        let dir = std::env::temp_dir().join(format!("tollgate-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("keys.toml"),
            "[bob]\nprimary = \"short-secret\"\n\n[carol]\nprimary = \"carol-key-0123456789\"\n[nobody]\nprimary = \"nobody-key-0123456789\"\n",
        )
        .unwrap();
        std::env::remove_var("TOLLGATE_TEST_UNSET_KEY");
        let text = format!(
            "[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\nsubscription_keys_file = \"keys.toml\"\n\
             [[products]]\nname = \"gold\"\napis = [\"a\"]\n\
             [[products.subscriptions]]\nname = \"alice\"\nprimary_key_env = \"TOLLGATE_TEST_UNSET_KEY\"\nsecondary_key_sha256 = \"abc\"\n\
             [[products.subscriptions]]\nname = \"bob\"\n\
             [[products.subscriptions]]\nname = \"carol\"\n\
             [[products.subscriptions]]\nname = \"dave\"\nprimary_key_sha256 = \"{}\"\n\
             [[products.subscriptions]]\nname = \"erin\"\n\
             [[products]]\nname = \"open1\"\nsubscription_required = false\n\
             [[products]]\nname = \"open2\"\nsubscription_required = false\n\
             [[products]]\nname = \"lonely\"\n\
             [[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\nproducts = [\"gold\", \"open1\", \"open2\"]\n",
            hex(&key_digest("carol-key-0123456789"))
        );
        let e = parse(&dir.join("m.toml"), &text).unwrap_err();
        let shown = e.to_string();
        let has = |key: &str, what: &str| {
            e.0.iter()
                .any(|x| x.key == key && x.message.contains(what) && x.line > 0)
        };
        assert!(
            has("products[0].apis", "each API lists its products"),
            "{shown}"
        );
        assert!(
            has(
                "products[0].subscriptions[0].primary_key_env",
                "TOLLGATE_TEST_UNSET_KEY` is not set"
            ),
            "{shown}"
        );
        assert!(
            has(
                "products[0].subscriptions[0].secondary_key_sha256",
                "64 hex digits"
            ),
            "{shown}"
        );
        assert!(has("bob.primary", "at least 16 characters"), "{shown}");
        assert!(
            has("nobody", "no subscription is named `nobody`"),
            "{shown}"
        );
        assert!(
            has("products[0].subscriptions[3]", "have the same key"),
            "{shown}"
        );
        assert!(has("products[0].subscriptions[4]", "has no key"), "{shown}");
        assert!(
            has("apis[0].products", "at most one open product"),
            "{shown}"
        );
        assert!(has("products[3].name", "publishes no API"), "{shown}");
        // Errors found in the keys file name that file and its line.
        let bob = e.0.iter().find(|x| x.key == "bob.primary").unwrap();
        assert!(bob.file.ends_with("keys.toml") && bob.line == 2, "{bob}");
        // No key value is ever echoed.
        for secret in ["short-secret", "carol-key", "nobody-key"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn products_require_subscriptions_unless_they_say_otherwise() {
        std::env::set_var("TOLLGATE_TEST_SET_KEY", "0123456789abcdef0123");
        let c = p(&format!(
            "{BASE}[[products]]\nname = \"gold\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_env = \"TOLLGATE_TEST_SET_KEY\"\nmax_connections = 3\n\
             [[products]]\nname = \"free\"\nsubscription_required = false\n\
             [[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\nproducts = [\"gold\", \"free\"]\nsubscription_key_header = \"X-Key\"\n"
        ))
        .unwrap();
        assert!(c.products[0].subscription_required);
        assert!(!c.products[1].subscription_required);
        assert_eq!(
            c.products[0].subscriptions[0].keys,
            vec![key_digest("0123456789abcdef0123")]
        );
        assert_eq!(c.products[0].subscriptions[0].max_connections, Some(3));
        assert_eq!(c.apis[0].subscription_key.header, "x-key");
        assert_eq!(c.apis[0].subscription_key.query, "subscription-key");
        // Debug output (e.g. in a panic) never shows key material.
        assert!(!format!("{:?}", c.products[0]).contains(&hex(&key_digest("0123456789abcdef0123"))));
    }

    #[test]
    fn wss_scheme_needs_tls_listener() {
        let e = p(&format!(
            "{BASE}[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://x/\"\nschemes = [\"wss\"]\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("TLS listener"), "{e}");
    }

    #[test]
    fn api_for_other_gateway_is_not_served() {
        let c = p(&format!(
            "{BASE}[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://x/\"\ngateways = [\"edge-2\"]\n"
        ))
        .unwrap();
        assert!(c.apis.is_empty());
        assert_eq!(c.unserved_apis, vec!["a".to_owned()]);
    }
}
