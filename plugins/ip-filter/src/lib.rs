//! `ip-filter`: lets a WebSocket handshake through, or refuses it with 403, by the client's IP
//! address, with API Management's ip-filter semantics: `action = "allow"` admits only the listed
//! addresses, `"forbid"` refuses only them.
//!
//! The address judged is the one the gateway derives for filters (`request.client-ip`): the
//! socket peer's, or, when the peer is one of `[gateway] trusted_proxies`, the first address
//! from the right of `X-Forwarded-For` that is not a trusted proxy. A client cannot get past an
//! allow-list by writing its own `X-Forwarded-For`: from an untrusted peer that header is
//! ignored.
//!
//! ```toml
//! [[apis.on_handshake]]
//! plugin = "ip-filter"
//! [apis.on_handshake.config]
//! action = "allow"
//! addresses = ["192.0.2.10", "10.0.0.0/8", "2001:db8::/32"]
//! ranges = [{ from = "198.51.100.1", to = "198.51.100.20" }]
//! ```

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use tollgate_sdk::host::{self, Level};
use tollgate_sdk::{Capability, Decision, Policy, Request};

/// APIM's `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Only the listed addresses get through.
    Allow,
    /// The listed addresses are refused; everyone else gets through.
    Forbid,
}

/// APIM's `address-range`: both ends included.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub from: IpAddr,
    pub to: IpAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub action: Action,
    /// Addresses (`192.0.2.10`, `::1`) and CIDR networks (`10.0.0.0/8`, `2001:db8::/32`),
    /// parsed with the config (once per instance).
    #[serde(default)]
    pub addresses: Vec<Network>,
    #[serde(default)]
    pub ranges: Vec<Range>,
}

/// An address (a network of one) or a CIDR network.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
pub struct Network(pub IpNet);

impl TryFrom<String> for Network {
    type Error = String;
    fn try_from(s: String) -> Result<Network, String> {
        let t = s.trim();
        let net = t
            .parse::<IpNet>()
            .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("`{t}` is neither an address nor a CIDR network"))?;
        // Client addresses are judged as IPv4 when they are IPv4-mapped IPv6 (`::ffff:a.b.c.d`),
        // so an entry written that way could never match: refused rather than silently dead.
        if let IpNet::V6(v6) = net {
            if v6.network().to_ipv4_mapped().is_some() {
                return Err(format!(
                    "`{t}` is an IPv4-mapped IPv6 network: write it as IPv4 (clients are judged by their IPv4 address)"
                ));
            }
        }
        Ok(Network(net))
    }
}

impl Config {
    /// Whether `ip` is one of the listed addresses, networks or ranges.
    pub fn lists(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.addresses.iter().any(|n| n.0.contains(&ip))
            || self.ranges.iter().any(|r| {
                let (from, to) = (r.from.to_canonical(), r.to.to_canonical());
                from.is_ipv4() == ip.is_ipv4() && from <= ip && ip <= to
            })
    }
}

/// The exported policy.
pub struct IpFilter;

impl Policy for IpFilter {
    type Config = Config;
    const CAPABILITIES: &'static [Capability] = &[Capability::ReadRequest, Capability::Reject];

    fn check(c: &Config) -> Result<(), String> {
        if c.addresses.is_empty() && c.ranges.is_empty() {
            return Err(
                "ip-filter: list at least one address, network or range (`addresses`, `ranges`)"
                    .into(),
            );
        }
        for r in &c.ranges {
            let (from, to) = (r.from.to_canonical(), r.to.to_canonical());
            if from.is_ipv4() != to.is_ipv4() {
                return Err(format!(
                    "ip-filter: range {from} - {to} mixes IPv4 and IPv6"
                ));
            }
            if from > to {
                return Err(format!(
                    "ip-filter: range {from} - {to} ends before it starts"
                ));
            }
        }
        Ok(())
    }

    fn on_handshake(config: &Config, request: &Request) -> Result<Decision, String> {
        // Unknown (a trusted proxy's X-Forwarded-For held something that is not an address):
        // refused whatever the action, so neither list can be got round that way.
        let Some(seen) = request.client_ip() else {
            host::log(
                Level::Info,
                "client refused: its address is unknown (X-Forwarded-For from a trusted proxy holds an entry that is not an address)",
            );
            return Ok(Decision::reject(403, "Forbidden"));
        };
        let ip: IpAddr = seen
            .parse()
            .map_err(|_| format!("client-ip `{seen}` is not an address"))?;
        let listed = config.lists(ip);
        let admitted = match config.action {
            Action::Allow => listed,
            Action::Forbid => !listed,
        };
        if admitted {
            return Ok(Decision::proceed());
        }
        host::log(
            Level::Info,
            &format!(
                "client {ip} refused ({})",
                if listed {
                    "forbidden"
                } else {
                    "not in the allow list"
                }
            ),
        );
        Ok(Decision::reject(403, "Forbidden"))
    }
}

tollgate_sdk::export!(IpFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_sdk::testing::{handshake, request};

    fn status(config: &str, ip: &str) -> Option<u16> {
        handshake::<IpFilter>(config, &request().client_ip(ip).build())
            .unwrap()
            .status()
    }

    #[test]
    fn allow_admits_only_listed_addresses_networks_and_ranges() {
        let c = r#"{"action": "allow", "addresses": ["192.0.2.10", "10.0.0.0/8", "2001:db8::/32"],
                    "ranges": [{"from": "198.51.100.1", "to": "198.51.100.20"}]}"#;
        for ok in [
            "192.0.2.10",
            "10.200.0.1",
            "2001:db8::5",
            "198.51.100.1",
            "198.51.100.20",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(status(c, ok), None, "{ok}");
        }
        for refused in [
            "192.0.2.11",
            "11.0.0.1",
            "2001:db9::1",
            "198.51.100.21",
            "::1",
        ] {
            assert_eq!(status(c, refused), Some(403), "{refused}");
        }
    }

    #[test]
    fn an_unknown_client_is_refused_by_either_action() {
        for c in [
            r#"{"action": "forbid", "addresses": ["203.0.113.0/24"]}"#,
            r#"{"action": "allow", "addresses": ["0.0.0.0/0", "::/0"]}"#,
        ] {
            let d = handshake::<IpFilter>(c, &request().unknown_client_ip().build()).unwrap();
            assert_eq!(d.status(), Some(403), "{c}");
        }
    }

    #[test]
    fn forbid_refuses_only_listed_addresses() {
        let c = r#"{"action": "forbid", "addresses": ["203.0.113.0/24", "::1"]}"#;
        assert_eq!(status(c, "203.0.113.9"), Some(403));
        assert_eq!(status(c, "::1"), Some(403));
        assert_eq!(status(c, "203.0.114.9"), None);
        assert_eq!(status(c, "127.0.0.1"), None);
    }

    #[test]
    fn bad_configs_are_refused_with_a_message() {
        let err = |c: &str| IpFilter::configure(c).unwrap_err();
        assert!(err(r#"{"action": "allow"}"#).contains("at least one"));
        assert!(err(r#"{"action": "allow", "addresses": ["10.0.0.0/33"]}"#).contains("10.0.0.0/33"));
        assert!(err(r#"{"action": "allow", "addresses": ["example.com"]}"#).contains("example.com"));
        assert!(err(r#"{"action": "maybe", "addresses": ["::1"]}"#).contains("maybe"));
        assert!(
            err(r#"{"action": "allow", "ranges": [{"from": "10.0.0.9", "to": "10.0.0.1"}]}"#)
                .contains("ends before it starts")
        );
        assert!(
            err(r#"{"action": "allow", "ranges": [{"from": "10.0.0.1", "to": "::9"}]}"#)
                .contains("mixes")
        );
        assert!(
            err(r#"{"action": "allow", "addresses": ["::1"], "colour": 1}"#).contains("colour")
        );
        assert!(
            err(r#"{"action": "forbid", "addresses": ["::ffff:203.0.113.0/120"]}"#)
                .contains("write it as IPv4")
        );
    }
}
