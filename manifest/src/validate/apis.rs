//! `[[apis]]`: each API's name, url_suffix, backend, schemes, products, subscription key
//! location, CA file, handshake policies and connection limits.
//!
//! Its own file because an API draws on every other section (the gateway's listeners and limits,
//! the products) and is the longest list of rules; it is checked last so that all of them are
//! known.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use http::HeaderName;

use super::{Pem, Validator};
use crate::backend_url::{parse_backend, BackendUrl};
use crate::model::{
    ApiConfig, ConnLimits, GatewayConfig, KeyLocation, Limits, MessageRates, ProductConfig,
    Schemes, DEFAULT_MAX_INSPECTED_MESSAGE_SIZE,
};
use crate::raw::{RawApi, RawApiLimits};

impl Validator<'_> {
    /// `[[apis]]`: the APIs this gateway serves, and the names of those it does not (their
    /// `gateways` name others). An API with errors is checked to the end, so that all of its
    /// errors are reported, and then left out.
    pub(super) fn apis(
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
            let backends = self.named_backends(i, a, backend.as_ref());
            let schemes = self.schemes(i, a, gateway.listen.is_some(), has_tls_listener);
            self.api_products(i, a, &aname, products, product_names);
            let subscription_key = self.key_location(i, a);
            let any_tls =
                backend.as_ref().is_some_and(|b| b.tls) || backends.values().any(|b| b.tls);
            let ca_file = self.ca_file(i, a, backend.is_some() && !any_tls);
            let on_handshake =
                self.attachments(&a.on_handshake, &format!("apis[{i}].on_handshake"));
            let on_message = self.message_attachments(i, a);
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
            let no_subscriptions = format!("needs subscriptions, and apis[{i}] is in no product: add it to one (`products = [...]`) or limit per connection");
            let message_limits = self.message_limits(
                &format!("apis[{i}]"),
                &a.message_limits,
                a.products.is_empty().then_some(no_subscriptions.as_str()),
            );
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
                backends,
                schemes,
                products: a.products.iter().map(|p| p.get_ref().clone()).collect(),
                subscription_key,
                max_connections: a.limits.max_connections.as_ref().map(|m| *m.get_ref()),
                limits: ConnLimits {
                    client_messages: message_limits.client,
                    backend_messages: message_limits.backend,
                    max_inspected_message_size: self.max_inspected(i, a),
                    ..conn_limits(&a.limits, &gateway.limits)
                },
                ca_file,
                insecure_skip_verify: a.insecure_skip_verify,
                on_handshake,
                on_message,
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

    /// API `i`'s `ca_file`: an existing PEM file of certificates, for `wss://` backends only
    /// (`no_tls_backend`: the API has backends, none of them `wss://`).
    fn ca_file(&mut self, i: usize, a: &RawApi, no_tls_backend: bool) -> Option<PathBuf> {
        let c = a.ca_file.as_ref()?;
        let key = format!("apis[{i}].ca_file");
        let path = self.existing_file(c, &key);
        self.pem_content(c, &key, &path, Pem::Certificates);
        if no_tls_backend {
            self.err(c.span(), key, "ca_file is only used with a wss:// backend");
        }
        Some(path)
    }

    /// API `i`'s named `backends`: names of letters, digits, `-` and `_`, URLs as for
    /// `backend`. Neither these nor `backend` may carry a query then: the client's query, as
    /// policies left it, goes to whichever backend is picked, and a query of one backend's URL
    /// would otherwise follow the handshake to another.
    fn named_backends(
        &mut self,
        i: usize,
        a: &RawApi,
        default: Option<&BackendUrl>,
    ) -> std::collections::BTreeMap<String, BackendUrl> {
        let mut out = std::collections::BTreeMap::new();
        if a.backends.is_empty() {
            return out;
        }
        if default.is_some_and(|b| b.query.is_some()) {
            self.err(
                a.backend.span(),
                format!("apis[{i}].backend"),
                "a backend URL with a query cannot be combined with `backends` (the query would follow a handshake sent to another backend); drop the query",
            );
        }
        for (name, url) in &a.backends {
            let key = format!("apis[{i}].backends.{name}");
            if name == "default" {
                self.err(
                    url.span(),
                    key,
                    "`default` names the API's own `backend` (in logs and metrics); pick another name",
                );
                continue;
            }
            let ok_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok_name {
                self.err(
                    url.span(),
                    key,
                    "a backend name is 1 to 64 letters, digits, `-` or `_`",
                );
                continue;
            }
            match parse_backend(url.get_ref()) {
                Ok(b) if b.query.is_some() => self.err(
                    url.span(),
                    key,
                    "a named backend's URL has no query (the client's query, as policies left it, is forwarded)",
                ),
                Ok(b) => {
                    out.insert(name.clone(), b);
                }
                Err(m) => self.err(url.span(), key, m),
            }
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
        client_messages: MessageRates::default(),
        backend_messages: MessageRates::default(),
        max_inspected_message_size: DEFAULT_MAX_INSPECTED_MESSAGE_SIZE,
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::{p, BASE};

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

    #[test]
    fn named_backends_are_parsed_and_checked() {
        let api = |extra: &str| {
            p(&format!(
                "{BASE}[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://main/\"\n{extra}\n"
            ))
        };
        let c =
            api("backends = { eu = \"wss://eu.example/chat\", us-1 = \"ws://us:9000/\" }").unwrap();
        let b = &c.apis[0].backends;
        assert_eq!(b.keys().collect::<Vec<_>>(), ["eu", "us-1"]);
        assert!(b["eu"].tls && b["eu"].path == "/chat");
        for (extra, says) in [
            ("backends = { eu = \"http://x/\" }", "apis[0].backends.eu"),
            ("backends = { \"e u\" = \"ws://x/\" }", "a backend name is"),
            ("backends = { eu = \"ws://x/?a=1\" }", "has no query"),
            (
                "backends = { default = \"ws://x/\" }",
                "names the API's own",
            ),
        ] {
            let e = api(extra).unwrap_err().to_string();
            assert!(e.contains(says), "{extra}: {e}");
        }
        let e = p(&format!(
            "{BASE}[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://main/?k=v\"\nbackends = {{ eu = \"ws://x/\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot be combined with `backends`"), "{e}");
    }
}
