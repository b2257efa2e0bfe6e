//! Whose `X-Forwarded-For`, `Forwarded` and `X-Real-IP` the gateway passes on.
//!
//! Backends use these headers for client addresses (logs, rate limits, allow-lists). A client
//! that writes its own `X-Forwarded-For: 10.0.0.1` must not have the gateway vouch for it, so
//! the headers are extended only when the peer is a configured trusted proxy (a load balancer
//! that sets them itself); from anyone else they are replaced with what the gateway saw.

use std::net::IpAddr;

use ipnet::IpNet;

/// `[gateway] trusted_proxies`: networks whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses CIDRs (`10.0.0.0/8`, `::1/128`) and single addresses (`192.0.2.7`).
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Self, String> {
        let mut nets = Vec::with_capacity(list.len());
        for s in list {
            let s = s.as_ref().trim();
            let net = match s.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => match s.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => {
                        return Err(format!(
                            "`{s}` is neither an address nor a CIDR network (e.g. 10.0.0.0/8)"
                        ))
                    }
                },
            };
            nets.push(net);
        }
        Ok(TrustedProxies(nets))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a peer at `ip` is a trusted proxy (an IPv4-mapped IPv6 peer counts as IPv4).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// The forwarding headers the backend gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarding {
    pub x_forwarded_for: String,
    pub forwarded: String,
    pub x_real_ip: String,
}

/// What the client sent, all values of each header joined with `, `.
#[derive(Debug, Clone, Default)]
pub struct Sent<'a> {
    pub x_forwarded_for: Option<&'a str>,
    pub forwarded: Option<&'a str>,
    pub x_real_ip: Option<&'a str>,
}

/// The headers for a handshake from `peer` over `proto` (`http` or `https`). From a trusted
/// proxy the chain it sent is extended (and its `X-Real-IP` kept); from anyone else every value
/// is the peer's own address.
pub fn forwarding(peer: IpAddr, proto: &str, trusted: bool, sent: &Sent<'_>) -> Forwarding {
    let peer = peer.to_canonical();
    let ip = peer.to_string();
    let node = match peer {
        IpAddr::V4(_) => ip.clone(),
        IpAddr::V6(_) => format!("\"[{ip}]\""),
    };
    let element = format!("for={node};proto={proto}");
    let nonempty = |v: Option<&str>| {
        v.map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    if trusted {
        Forwarding {
            x_forwarded_for: match nonempty(sent.x_forwarded_for) {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip.clone(),
            },
            forwarded: match nonempty(sent.forwarded) {
                Some(prev) => format!("{prev}, {element}"),
                None => element,
            },
            x_real_ip: nonempty(sent.x_real_ip).unwrap_or(ip),
        }
    } else {
        Forwarding {
            x_forwarded_for: ip.clone(),
            forwarded: element,
            x_real_ip: ip,
        }
    }
}

/// The client's address as policies judge it (ip-filter): the peer's, unless the peer is a
/// trusted proxy; then the `X-Forwarded-For` chain is walked from the right, past every
/// trusted proxy, and the first address that is not one is the client. A chain of trusted
/// proxies only gives its leftmost entry, no chain at all the proxy itself. The same rule as
/// nginx's `real_ip_recursive` and Envoy's `xff_num_trusted_hops` by address.
///
/// Entries may carry a port or brackets (`192.0.2.1:5678`, `[2001:db8::1]:443`, as Azure
/// Application Gateway writes them). An entry the walk reaches that is not an address (a
/// client's own garbage appended to by the proxy, `unknown`, bytes that are not ASCII) makes
/// the client **unknown** (`None`): never the trusted proxy's own address, which an allow-list
/// covering the proxies' network would admit. `lines` are the header's raw values.
pub fn client_ip(peer: IpAddr, trusted: &TrustedProxies, lines: &[&[u8]]) -> Option<IpAddr> {
    let mut client = peer.to_canonical();
    if !trusted.trusts(client) {
        return Some(client);
    }
    let entries = lines
        .iter()
        .flat_map(|v| v.split(|b| *b == b','))
        .map(|e| e.trim_ascii())
        .filter(|e| !e.is_empty());
    for entry in entries.rev() {
        client = entry_address(entry)?.to_canonical();
        if !trusted.trusts(client) {
            break;
        }
    }
    Some(client)
}

/// One `X-Forwarded-For` entry as an address: `a.b.c.d`, `a.b.c.d:port`, `v6`, `[v6]`,
/// `[v6]:port`.
fn entry_address(entry: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(entry).ok()?;
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok());
        return inside
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .filter(|_| port_ok)
            .map(IpAddr::V6);
    }
    s.parse::<std::net::SocketAddrV4>()
        .ok()
        .map(|a| IpAddr::V4(*a.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_address_is_the_first_untrusted_one_from_the_right() {
        let t = TrustedProxies::parse(&["10.0.0.0/8", "::1"]).unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let peer = |s: &str| s.parse::<IpAddr>().unwrap();
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(
            client_ip(peer("203.0.113.5"), &t, &[b"198.51.100.1"]),
            ip("203.0.113.5")
        );
        // A trusted peer: the chain's last untrusted entry.
        assert_eq!(
            client_ip(peer("10.0.0.1"), &t, &[b"6.6.6.6, 198.51.100.1, 10.0.0.2"]),
            ip("198.51.100.1")
        );
        // Several header lines are one chain; IPv6 entries count.
        assert_eq!(
            client_ip(peer("::1"), &t, &[b"6.6.6.6", b"2001:db8::5"]),
            ip("2001:db8::5")
        );
        // All trusted: the leftmost; none sent: the peer.
        assert_eq!(
            client_ip(peer("10.0.0.1"), &t, &[b"10.0.0.3, 10.0.0.2"]),
            ip("10.0.0.3")
        );
        assert_eq!(client_ip(peer("10.0.0.1"), &t, &[]), ip("10.0.0.1"));
        // A mapped IPv4 peer is IPv4.
        assert_eq!(
            client_ip(peer("::ffff:10.0.0.1"), &t, &[b"198.51.100.7"]),
            ip("198.51.100.7")
        );
        // Ports and brackets, as proxies write them.
        assert_eq!(
            client_ip(peer("10.0.0.1"), &t, &[b"198.51.100.7:5678"]),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(peer("10.0.0.1"), &t, &[b"[2001:db8::9]:443, [10.0.0.2]"]),
            None,
            "[v4] is not a form proxies write"
        );
        assert_eq!(
            client_ip(peer("10.0.0.1"), &t, &[b"[2001:db8::9]:443"]),
            ip("2001:db8::9")
        );
        assert_eq!(
            client_ip(peer("10.0.0.1"), &t, &[b"[2001:db8::9]"]),
            ip("2001:db8::9")
        );
    }

    #[test]
    fn an_unreadable_entry_makes_the_client_unknown_never_the_proxy() {
        let t = TrustedProxies::parse(&["10.0.0.0/8"]).unwrap();
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        for chain in [
            &b"unknown"[..],
            b"6.6.6.6, unknown",
            b"\xff, 6.6.6.6, garbage",
            b"1.2.3.4:99999",
            b"[2001:db8::1",
        ] {
            assert_eq!(client_ip(peer, &t, &[chain]), None, "{chain:?}");
        }
        // Garbage left of the first untrusted entry is never reached.
        assert_eq!(
            client_ip(peer, &t, &[b"\xff garbage", b"6.6.6.6"]),
            Some("6.6.6.6".parse().unwrap())
        );
    }

    #[test]
    fn parses_networks_and_addresses() {
        let t = TrustedProxies::parse(&["10.0.0.0/8", "192.0.2.7", "::1/128"]).unwrap();
        assert!(t.trusts("10.1.2.3".parse().unwrap()));
        assert!(t.trusts("192.0.2.7".parse().unwrap()));
        assert!(!t.trusts("192.0.2.8".parse().unwrap()));
        assert!(t.trusts("::1".parse().unwrap()));
        assert!(t.trusts("::ffff:10.0.0.1".parse().unwrap()));
        assert!(TrustedProxies::parse(&["10.0.0.0/33"]).is_err());
        assert!(TrustedProxies::parse(&["example.com"]).is_err());
        // Empty only without networks (the gateway logs the list at start when there is one).
        assert!(!t.is_empty());
        assert!(TrustedProxies::parse::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn untrusted_peers_get_their_own_address_only() {
        let sent = Sent {
            x_forwarded_for: Some("10.9.9.9"),
            forwarded: Some("for=10.9.9.9"),
            x_real_ip: Some("10.9.9.9"),
        };
        let f = forwarding("203.0.113.5".parse().unwrap(), "http", false, &sent);
        assert_eq!(f.x_forwarded_for, "203.0.113.5");
        assert_eq!(f.forwarded, "for=203.0.113.5;proto=http");
        assert_eq!(f.x_real_ip, "203.0.113.5");
    }

    #[test]
    fn trusted_proxies_chains_are_extended() {
        let sent = Sent {
            x_forwarded_for: Some("198.51.100.1"),
            forwarded: Some("for=198.51.100.1"),
            x_real_ip: Some("198.51.100.1"),
        };
        let f = forwarding("::1".parse().unwrap(), "https", true, &sent);
        assert_eq!(f.x_forwarded_for, "198.51.100.1, ::1");
        assert_eq!(f.forwarded, "for=198.51.100.1, for=\"[::1]\";proto=https");
        assert_eq!(f.x_real_ip, "198.51.100.1");
        let f = forwarding("10.0.0.1".parse().unwrap(), "http", true, &Sent::default());
        assert_eq!(f.x_forwarded_for, "10.0.0.1");
        assert_eq!(f.x_real_ip, "10.0.0.1");
    }
}
