//! The served APIs and how a request path finds one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::backend::Connector;
use crate::manifest::ApiConfig;
use crate::subscriptions::Subscription;

/// One served API with its backend connector and live connection count.
pub struct Api {
    pub config: ApiConfig,
    pub connector: Connector,
    /// The named backends a policy may pick (`proceed.backend`), by name.
    pub backends: std::collections::BTreeMap<String, Connector>,
    /// Connections admitted to this API; shared with the `Api` of the same name that a reload
    /// puts in its place, so the per-API limit counts connections admitted before it too.
    pub active: Arc<AtomicUsize>,
    /// onHandshake policies in the order they run: global, product, API. Product steps run
    /// only for handshakes that came in through their product.
    pub chain: Vec<crate::policy::chain::Step>,
    /// Message policies (`[[apis.on_message]]`) in the order they run; empty: the relay
    /// streams the API's frames untouched. Shared with the relays of the API's connections,
    /// which keep calling the ones they were admitted with.
    pub messages: Arc<[crate::policy::message::MessageStep]>,
    /// The open product (`subscription_required = false`) among the API's products, if any: a
    /// handshake without a key comes in through it.
    pub open_product: Option<String>,
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

/// A connection slot, counted globally, per API and per subscription; given back when dropped,
/// so every exit path (rejection, error, normal close) frees it at once.
pub struct Permit {
    global: Arc<AtomicUsize>,
    api: Arc<Api>,
    subscription: Option<Arc<Subscription>>,
    /// The connection's slots in the fleet's store (`[cluster]`), given back with the rest.
    fleet: Option<crate::cluster::FleetSlot>,
}

/// Which limit refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReached {
    Subscription,
    Api,
    Gateway,
}

impl Api {
    /// The URL (as written in the manifest) of the backend a handshake went to: the named one a
    /// policy picked, else the API's own. Derived when a record is written, so the handshake
    /// path carries a name only when a policy picked one.
    pub fn backend_url(&self, picked: Option<&str>) -> &str {
        picked
            .and_then(|n| self.backends.get(n))
            .unwrap_or(&self.connector)
            .url()
            .original
            .as_str()
    }
}

impl From<LimitReached> for crate::metrics::Limit {
    fn from(l: LimitReached) -> Self {
        use crate::metrics::Limit;
        match l {
            LimitReached::Gateway => Limit::GatewayMaxConnections,
            LimitReached::Api => Limit::ApiMaxConnections,
            LimitReached::Subscription => Limit::SubscriptionMaxConnections,
        }
    }
}

impl LimitReached {
    pub fn reason(self) -> &'static str {
        match self {
            LimitReached::Subscription => "subscription max_connections reached",
            LimitReached::Api => "API max_connections reached",
            LimitReached::Gateway => "gateway max_connections reached",
        }
    }
}

impl Permit {
    /// Takes a slot if the subscription's, the API's and the global limit all allow it. The
    /// subscription comes first: a subscriber at its own limit hears so (429) whatever the
    /// gateway's load (503).
    pub fn acquire(
        global: &Arc<AtomicUsize>,
        global_max: usize,
        api: &Arc<Api>,
        subscription: Option<&Arc<Subscription>>,
    ) -> Result<Permit, LimitReached> {
        if let Some(s) = subscription {
            if !s.try_take() {
                return Err(LimitReached::Subscription);
            }
        }
        let give_back_sub = || {
            if let Some(s) = subscription {
                s.give_back();
            }
        };
        if global.fetch_add(1, Ordering::AcqRel) >= global_max {
            global.fetch_sub(1, Ordering::AcqRel);
            give_back_sub();
            return Err(LimitReached::Gateway);
        }
        let api_max = api.config.max_connections.unwrap_or(usize::MAX);
        if api.active.fetch_add(1, Ordering::AcqRel) >= api_max {
            api.active.fetch_sub(1, Ordering::AcqRel);
            global.fetch_sub(1, Ordering::AcqRel);
            give_back_sub();
            return Err(LimitReached::Api);
        }
        Ok(Permit {
            global: global.clone(),
            api: api.clone(),
            subscription: subscription.cloned(),
            fleet: None,
        })
    }

    /// The slot of a connection a binary upgrade handed over: it was admitted by the previous
    /// process, so it is counted whatever the limits (a lowered limit applies to new
    /// handshakes, as after a reload).
    pub fn adopt(
        global: &Arc<AtomicUsize>,
        api: &Arc<Api>,
        subscription: Option<&Arc<Subscription>>,
    ) -> Permit {
        if let Some(s) = subscription {
            s.adopt();
        }
        global.fetch_add(1, Ordering::AcqRel);
        api.active.fetch_add(1, Ordering::AcqRel);
        Permit {
            global: global.clone(),
            api: api.clone(),
            subscription: subscription.cloned(),
            fleet: None,
        }
    }

    pub fn subscription(&self) -> Option<&Arc<Subscription>> {
        self.subscription.as_ref()
    }

    /// The things the connection holds fleet slots of.
    pub fn fleet_things(&self) -> Vec<String> {
        self.fleet
            .as_ref()
            .map(|f| f.things().to_vec())
            .unwrap_or_default()
    }
}

impl Permit {
    /// Holds the connection's fleet-wide slots for as long as the permit lives.
    pub fn hold(&mut self, slot: crate::cluster::FleetSlot) {
        self.fleet = Some(slot);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(s) = &self.subscription {
            s.give_back();
        }
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
            backends: Default::default(),
            config: ApiConfig {
                name: suffix.into(),
                display_name: suffix.into(),
                url_suffix: suffix.into(),
                backend,
                backends: Default::default(),
                schemes: Schemes {
                    ws: true,
                    wss: false,
                },
                products: vec![],
                subscription_key: Default::default(),
                max_connections: Some(1),
                limits: ConnLimits {
                    idle_timeout: None,
                    max_connection_lifetime: None,
                    max_frame_size: 1,
                    max_message_size: None,
                    client_messages: Default::default(),
                    backend_messages: Default::default(),
                    max_inspected_message_size: 1,
                },
                ca_file: None,
                insecure_skip_verify: false,
                on_handshake: vec![],
                on_message: vec![],
            },
            active: Arc::new(AtomicUsize::new(0)),
            chain: Vec::new(),
            messages: Arc::from([]),
            open_product: None,
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
        let p = Permit::acquire(&g, 10, &a, None).unwrap();
        assert!(Permit::acquire(&g, 10, &a, None).is_err());
        assert_eq!(g.load(Ordering::SeqCst), 1);
        drop(p);
        assert_eq!(g.load(Ordering::SeqCst), 0);
        assert!(Permit::acquire(&g, 10, &a, None).is_ok());
    }
}
