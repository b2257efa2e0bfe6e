//! The served APIs and how a request path finds one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::backend::Connector;
use crate::manifest::ApiConfig;

/// One served API with its backend connector and live connection count.
pub struct Api {
    pub config: ApiConfig,
    pub connector: Connector,
    /// Connections admitted to this API; shared with the `Api` of the same name that a reload
    /// puts in its place, so the per-API limit counts connections admitted before it too.
    pub active: Arc<AtomicUsize>,
    /// onHandshake policies in the order they run: global, product, API.
    pub chain: Vec<crate::chain::Step>,
    /// This API's metric handles (shared with the `Api` a reload puts in its place).
    pub metrics: Arc<crate::metrics::ApiMetrics>,
}

/// APIs ordered for matching: longest `url_suffix` first, so `chat/admin` wins over `chat`.
pub struct Routes {
    apis: Vec<Arc<Api>>,
}

impl Routes {
    pub fn new(mut apis: Vec<Arc<Api>>) -> Self {
        apis.sort_by_key(|a| std::cmp::Reverse(a.config.url_suffix.len()));
        Routes { apis }
    }

    pub fn apis(&self) -> &[Arc<Api>] {
        &self.apis
    }

    /// Finds the API serving `path` and the remainder of the path after its suffix. A suffix
    /// matches whole path segments: `chat` serves `/chat` and `/chat/room/1`, not `/chatter`.
    pub fn find<'p>(&self, path: &'p str) -> Option<(&Arc<Api>, &'p str)> {
        let rel = path.strip_prefix('/').unwrap_or(path);
        self.apis.iter().find_map(|api| {
            let suffix = api.config.url_suffix.as_str();
            if suffix.is_empty() {
                return Some((api, path));
            }
            let rest = rel.strip_prefix(suffix)?;
            if rest.is_empty() || rest.starts_with('/') {
                Some((api, &path[path.len() - rest.len()..]))
            } else {
                None
            }
        })
    }
}

/// A connection slot, counted globally and per API; given back when dropped, so every exit path
/// (rejection, error, normal close) frees it at once.
pub struct Permit {
    global: Arc<AtomicUsize>,
    api: Arc<Api>,
}

impl Permit {
    /// Takes a slot if both the global and the API's limit allow it.
    pub fn acquire(
        global: &Arc<AtomicUsize>,
        global_max: usize,
        api: &Arc<Api>,
    ) -> Result<Permit, &'static str> {
        if global.fetch_add(1, Ordering::AcqRel) >= global_max {
            global.fetch_sub(1, Ordering::AcqRel);
            return Err("gateway max_connections reached");
        }
        let api_max = api.config.max_connections.unwrap_or(usize::MAX);
        if api.active.fetch_add(1, Ordering::AcqRel) >= api_max {
            api.active.fetch_sub(1, Ordering::AcqRel);
            global.fetch_sub(1, Ordering::AcqRel);
            return Err("API max_connections reached");
        }
        Ok(Permit {
            global: global.clone(),
            api: api.clone(),
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.api.active.fetch_sub(1, Ordering::AcqRel);
        self.global.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{parse_backend, ConnLimits, Schemes};
    use std::time::Duration;

    fn api(suffix: &str) -> Arc<Api> {
        let backend = parse_backend("ws://127.0.0.1:1/").unwrap();
        Arc::new(Api {
            metrics: crate::metrics::Metrics::new().api(suffix),
            connector: Connector::new(backend.clone(), None, Duration::from_secs(1)).unwrap(),
            config: ApiConfig {
                name: suffix.into(),
                display_name: suffix.into(),
                url_suffix: suffix.into(),
                backend,
                schemes: Schemes {
                    ws: true,
                    wss: false,
                },
                products: vec![],
                max_connections: Some(1),
                limits: ConnLimits {
                    idle_timeout: None,
                    max_frame_size: 1,
                    max_message_size: None,
                },
                ca_file: None,
                insecure_skip_verify: false,
                on_handshake: vec![],
            },
            active: Arc::new(AtomicUsize::new(0)),
            chain: Vec::new(),
        })
    }

    #[test]
    fn segment_prefix_matching() {
        let r = Routes::new(vec![api("chat"), api("chat/admin")]);
        let name = |p| {
            r.find(p)
                .map(|(a, rest)| (a.config.name.clone(), rest.to_owned()))
        };
        assert_eq!(name("/chat"), Some(("chat".into(), "".into())));
        assert_eq!(
            name("/chat/room/1"),
            Some(("chat".into(), "/room/1".into()))
        );
        assert_eq!(
            name("/chat/admin/x"),
            Some(("chat/admin".into(), "/x".into()))
        );
        assert_eq!(name("/chatter"), None);
        assert_eq!(name("/"), None);
    }

    #[test]
    fn permits_are_counted_and_returned() {
        let g = Arc::new(AtomicUsize::new(0));
        let a = api("a");
        let p = Permit::acquire(&g, 10, &a).unwrap();
        assert!(Permit::acquire(&g, 10, &a).is_err());
        assert_eq!(g.load(Ordering::SeqCst), 1);
        drop(p);
        assert_eq!(g.load(Ordering::SeqCst), 0);
        assert!(Permit::acquire(&g, 10, &a).is_ok());
    }
}
