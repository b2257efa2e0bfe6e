//! `[cluster]`: the store every gateway of a fleet shares its limits through.

use toml::Spanned;

use super::Validator;
use crate::model::{
    ClusterConfig, OnStoreFailure, DEFAULT_LEASE_TTL, DEFAULT_MESSAGE_SYNC_INTERVAL,
    DEFAULT_STORE_TIMEOUT,
};
use crate::raw::RawCluster;

/// Ids and namespaces end up in Redis keys and in logs: short and plain.
fn plain_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

impl Validator<'_> {
    /// `[cluster]`: the store's URL from one place (`store` or `store_env`, whose value is never
    /// shown: it may hold a password), the lease and timeout bounded, the failure mode named.
    pub(super) fn cluster(&mut self, c: &Spanned<RawCluster>) -> Option<ClusterConfig> {
        let span = c.span();
        let c = c.get_ref();
        let store = match (&c.store, &c.store_env) {
            (Some(_), Some(env)) => {
                self.err(
                    env.span(),
                    "cluster.store_env",
                    "set cluster.store or cluster.store_env, not both",
                );
                None
            }
            (None, None) => {
                self.err(
                    span.clone(),
                    "cluster",
                    "set cluster.store (\"redis://host:port\") or cluster.store_env",
                );
                None
            }
            (Some(url), None) => self.store_url(url.get_ref(), url.span(), "cluster.store", false),
            (None, Some(var)) => match std::env::var(var.get_ref()) {
                Ok(v) => self.store_url(&v, var.span(), "cluster.store_env", true),
                Err(_) => {
                    self.err(
                        var.span(),
                        "cluster.store_env",
                        format!(
                            "environment variable `{}` is not set (or not UTF-8)",
                            var.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let mut names = |v: &Option<Spanned<String>>, key: &str| -> Option<Option<String>> {
            match v {
                None => Some(None),
                Some(s) if plain_name(s.get_ref()) => Some(Some(s.get_ref().clone())),
                Some(s) => {
                    self.err(
                        s.span(),
                        key,
                        "1 to 64 characters of A-Z, a-z, 0-9, `-`, `_`, `.`, `:`",
                    );
                    None
                }
            }
        };
        let gateway_id = names(&c.gateway_id, "cluster.gateway_id");
        let namespace = names(&c.namespace, "cluster.namespace");
        let lease_ttl = c.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL);
        if lease_ttl < std::time::Duration::from_secs(1) {
            self.err(
                span.clone(),
                "cluster.lease_ttl",
                "must be at least 1s (gateways renew their lease three times per lease_ttl)",
            );
        }
        let store_timeout = c.store_timeout.unwrap_or(DEFAULT_STORE_TIMEOUT);
        if store_timeout.is_zero() || store_timeout.checked_mul(3).is_none_or(|t| t > lease_ttl) {
            self.err(
                span.clone(),
                "cluster.store_timeout",
                "must be above zero and at most a third of lease_ttl",
            );
        }
        let message_sync_interval = c
            .message_sync_interval
            .unwrap_or(DEFAULT_MESSAGE_SYNC_INTERVAL);
        if !(std::time::Duration::from_millis(10)..=std::time::Duration::from_secs(10))
            .contains(&message_sync_interval)
        {
            self.err(
                span.clone(),
                "cluster.message_sync_interval",
                "must be between 10ms and 10s",
            );
        }
        let on_store_failure = match c
            .on_store_failure
            .as_ref()
            .map(|s| (s.get_ref().as_str(), s.span()))
        {
            None | Some(("local", _)) => Some(OnStoreFailure::Local),
            Some(("open", _)) => Some(OnStoreFailure::Open),
            Some(("closed", _)) => Some(OnStoreFailure::Closed),
            Some((other, at)) => {
                self.err(
                    at,
                    "cluster.on_store_failure",
                    format!(
                        "`{}`: one of \"local\", \"open\", \"closed\"",
                        other.escape_debug()
                    ),
                );
                None
            }
        };
        Some(ClusterConfig {
            store: store?,
            gateway_id: gateway_id?,
            namespace: namespace?.unwrap_or_else(|| "tollgate".into()),
            lease_ttl,
            store_timeout,
            on_store_failure: on_store_failure?,
            message_sync_interval,
        })
    }

    /// A `redis://` URL; its text is shown in an error only when it came from the manifest
    /// itself (an environment variable's may hold a password).
    fn store_url(
        &mut self,
        url: &str,
        span: std::ops::Range<usize>,
        key: &str,
        secret: bool,
    ) -> Option<String> {
        // Never a password: whatever sits between `://` and `@` is left out.
        let shown = if secret {
            String::new()
        } else {
            let safe = match (url.find("://"), url.rfind('@')) {
                (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
                _ => url.to_owned(),
            };
            format!("`{}`: ", safe.escape_debug())
        };
        if url.starts_with("rediss://") {
            self.err(span, key, format!("{shown}TLS to the store (rediss://) is not supported yet; use redis:// on a private network"));
            return None;
        }
        if !url.starts_with("redis://") || url.len() <= "redis://".len() {
            self.err(span, key, format!("{shown}expected redis://host:port[/db]"));
            return None;
        }
        Some(url.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::model::OnStoreFailure;
    use crate::test_util::{p, BASE};

    #[test]
    fn cluster_defaults_and_located_errors() {
        let c = p(&format!(
            "{BASE}[cluster]\nstore = \"redis://127.0.0.1:6379\"\n"
        ))
        .unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.lease_ttl, Duration::from_secs(30));
        assert_eq!(cl.store_timeout, Duration::from_millis(50));
        assert_eq!(cl.on_store_failure, OnStoreFailure::Local);
        assert_eq!(cl.namespace, "tollgate");
        assert_eq!(cl.gateway_id, None);
        assert_eq!(cl.message_sync_interval, Duration::from_millis(100));
        assert!(
            !format!("{cl:?}").contains("6379"),
            "the URL is never printed"
        );
        assert!(p(BASE).unwrap().cluster.is_none());
        let e = p(&format!(
            "{BASE}[cluster]\nstore = \"http://x\"\non_store_failure = \"maybe\"\ngateway_id = \"a b\"\nlease_ttl = \"1s\"\nstore_timeout = \"500ms\"\nmessage_sync_interval = \"5ms\"\n"
        ))
        .unwrap_err();
        let keys: Vec<_> = e.0.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "cluster.store",
                "cluster.gateway_id",
                "cluster.store_timeout",
                "cluster.message_sync_interval",
                "cluster.on_store_failure"
            ],
            "{e}"
        );
        let e = p(&format!(
            "{BASE}[cluster]\nstore_env = \"TOLLGATE_TEST_NO_SUCH_VAR\"\n"
        ))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("TOLLGATE_TEST_NO_SUCH_VAR` is not set"),
            "{e}"
        );
    }
}
