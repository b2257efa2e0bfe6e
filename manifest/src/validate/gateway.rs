//! The `[gateway]` and `[admin]` tables: the listeners, plugin directories, limits and trusted
//! proxies of the gateway, and the admin listener.
//!
//! One file because both describe the process rather than what it serves (its listeners, TLS
//! and admin settings are what a reload refuses to change), and nothing here depends on the APIs
//! or products.

use std::ops::Range;

use super::{Pem, Validator};
use crate::model::{
    AdminConfig, GatewayConfig, Limits, ListenerTls, DEFAULT_SIGNATURE_CACHE_ENTRIES,
    MAX_HEADER_BYTES, MIN_HEADER_BYTES,
};
use crate::raw::{RawAdmin, RawGateway, RawLimits};

impl Validator<'_> {
    /// `[gateway]`: its name, listeners, plugin directories, limits and trusted proxies. `span`
    /// is the whole table's, for what is missing from it.
    pub(super) fn gateway(&mut self, g: &RawGateway, span: Range<usize>) -> GatewayConfig {
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
            pid_file: g.pid_file.as_ref().map(|f| self.resolve(f.get_ref())),
            log_query_values: g.log_query_values.unwrap_or(false),
            trusted_proxies,
            limits,
        }
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
            Some(v) if *v.get_ref() > MAX_HEADER_BYTES => {
                self.err(
                    v.span(),
                    "gateway.limits.max_header_bytes",
                    format!("must be at most {MAX_HEADER_BYTES}"),
                );
                MAX_HEADER_BYTES
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
        let drain_timeout = l.drain_timeout.unwrap_or(d.drain_timeout);
        let last_close = std::time::Duration::from_secs(5);
        let upgrade_close_window = match &l.upgrade_close_window {
            None => d
                .upgrade_close_window
                .min(drain_timeout / 3)
                .min(drain_timeout.saturating_sub(last_close)),
            Some(w) => {
                let key = "gateway.limits.upgrade_close_window";
                match humantime_serde::re::humantime::parse_duration(w.get_ref().trim()) {
                    // The last close needs time for its handshake (5 s) within the drain.
                    // "0s": every close at once, whatever the drain.
                    Ok(t) if !t.is_zero() && t.saturating_add(last_close) > drain_timeout => {
                        self.err(
                            w.span(),
                            key,
                            format!(
                                "`{}` leaves no time for the last close within drain_timeout ({}); at most drain_timeout minus 5s",
                                w.get_ref(),
                                humantime_serde::re::humantime::format_duration(drain_timeout)
                            ),
                        );
                        drain_timeout.saturating_sub(last_close)
                    }
                    Ok(t) => t,
                    Err(e) => {
                        self.err(
                            w.span(),
                            key,
                            format!("`{}` is not a duration ({e}); e.g. \"10s\"", w.get_ref()),
                        );
                        d.upgrade_close_window
                    }
                }
            }
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
            drain_timeout,
            max_frame_size: l.max_frame_size.unwrap_or(d.max_frame_size),
            max_message_size: l.max_message_size.or(d.max_message_size),
            max_header_bytes,
            max_pending_handshakes,
            upgrade_close_window,
        }
    }

    /// `[admin]`: its address, the extra Host names it answers, and its token (see
    /// [`Validator::admin_token`]).
    pub(super) fn admin(&mut self, a: &RawAdmin) -> Option<AdminConfig> {
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::test_util::{p, BASE};

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
    fn the_upgrade_close_window_fits_the_drain() {
        let api = "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://x/\"\n";
        let c = p(&format!("{BASE}{api}")).unwrap();
        assert_eq!(
            c.gateway.limits.upgrade_close_window,
            Duration::from_secs(10)
        );
        // A short drain makes the default window shorter, not an error; it leaves the last
        // close 5 s, and a drain shorter than that closes at once ("0s" is always allowed).
        for (drain, window, want) in [("9s", "", 3), ("3s", "", 0), ("3s", "\"0s\"", 0)] {
            let set = if window.is_empty() {
                String::new()
            } else {
                format!("upgrade_close_window = {window}\n")
            };
            let c = p(&format!(
                "{BASE}[gateway.limits]\ndrain_timeout = \"{drain}\"\n{set}{api}"
            ))
            .unwrap();
            assert_eq!(
                c.gateway.limits.upgrade_close_window,
                Duration::from_secs(want)
            );
        }
        let c = p(&format!(
            "{BASE}[gateway.limits]\nupgrade_close_window = \"20s\"\n{api}"
        ))
        .unwrap();
        assert_eq!(
            c.gateway.limits.upgrade_close_window,
            Duration::from_secs(20)
        );
        for (window, says) in [
            ("\"26s\"", "drain_timeout minus 5s"),
            ("\"18446744073709551615s\"", "drain_timeout minus 5s"),
            ("\"soon\"", "not a duration"),
        ] {
            let e = p(&format!(
                "{BASE}[gateway.limits]\nupgrade_close_window = {window}\n{api}"
            ))
            .unwrap_err();
            let m =
                e.0.iter()
                    .find(|m| m.key == "gateway.limits.upgrade_close_window");
            let m = m.unwrap_or_else(|| panic!("{e}"));
            assert_eq!(m.line, 5, "{e}");
            assert!(m.message.contains(says), "{e}");
        }
    }
}
