//! Host names as a `Host` header or a manifest's `allowed_hosts` write them, parsed to one
//! normal form so that comparing two is a string comparison.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// A name a request may address a listener by (the admin listener's `allowed_hosts`), as written in a `Host` header:
/// lower-case, an IPv6 address bracketed and in canonical form, a trailing dot dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostName {
    name: String,
    /// `None`: written without a port (in `allowed_hosts`: with or without the listener's port).
    port: Option<u16>,
}

/// Why a string is not a [`HostName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host name")]
    Empty,
    #[error("not a host name: expected a DNS name, an IPv4 address or a bracketed IPv6 address, optionally followed by :PORT")]
    Malformed,
    #[error("the port must be a number from 1 to 65535")]
    BadPort,
}

impl HostName {
    /// Parses `name`, `name:port`, `[v6]` or `[v6]:port`.
    pub fn parse(s: &str) -> Result<HostName, HostError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(HostError::Empty);
        }
        if let Some(rest) = s.strip_prefix('[') {
            let (inside, after) = rest.split_once(']').ok_or(HostError::Malformed)?;
            let ip: Ipv6Addr = inside.parse().map_err(|_| HostError::Malformed)?;
            let port = match after {
                "" => None,
                p => Some(parse_port(
                    p.strip_prefix(':').ok_or(HostError::Malformed)?,
                )?),
            };
            return Ok(HostName {
                name: format!("[{ip}]"),
                port,
            });
        }
        let (name, port) = match s.split_once(':') {
            Some((n, p)) => (n, Some(parse_port(p)?)),
            None => (s, None),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return Err(HostError::Empty);
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(HostError::Malformed);
        }
        Ok(HostName {
            name: name.to_ascii_lowercase(),
            port,
        })
    }

    /// An address as a Host names it, without a port.
    pub fn ip(ip: IpAddr) -> HostName {
        HostName {
            name: match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            },
            port: None,
        }
    }
}

impl HostName {
    /// `localhost`, without a port.
    pub fn localhost() -> HostName {
        HostName {
            name: "localhost".into(),
            port: None,
        }
    }

    /// The name in its normal form (lower-case, IPv6 bracketed), without the port.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port, if one was written.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

fn parse_port(p: &str) -> Result<u16, HostError> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::BadPort);
    }
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or(HostError::BadPort)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_parse_to_one_normal_form() {
        let h = |s: &str| HostName::parse(s).map(|h| h.to_string());
        assert_eq!(h("LocalHost").as_deref(), Ok("localhost"));
        assert_eq!(h("localhost.:9090").as_deref(), Ok("localhost:9090"));
        assert_eq!(h("[0:0::1]:80").as_deref(), Ok("[::1]:80"));
        assert_eq!(h("admin.example").as_deref(), Ok("admin.example"));
        assert_eq!(h(""), Err(HostError::Empty));
        assert_eq!(h("a:b"), Err(HostError::BadPort));
        assert_eq!(h("a:0"), Err(HostError::BadPort));
        assert_eq!(h("a:70000"), Err(HostError::BadPort));
        assert_eq!(h("::1"), Err(HostError::BadPort));
        assert_eq!(h("[::1"), Err(HostError::Malformed));
        assert_eq!(h("[::1]x"), Err(HostError::Malformed));
        assert_eq!(h("user@host"), Err(HostError::Malformed));
        assert_eq!(h("a..b"), Err(HostError::Malformed));
        assert_eq!(h("*"), Err(HostError::Malformed));
    }

    #[test]
    fn name_and_port_are_kept_apart_and_lengths_are_bounded() {
        let h = HostName::parse("Admin.Example:8443").unwrap();
        assert_eq!((h.name(), h.port()), ("admin.example", Some(8443)));
        let h = HostName::parse("admin.example").unwrap();
        assert_eq!((h.name(), h.port()), ("admin.example", None));
        for ok in ["my-host", "my_host", "h-1_2"] {
            assert!(HostName::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(HostName::parse("a:").err(), Some(HostError::BadPort));
        assert_eq!(HostName::parse("a:+1").err(), Some(HostError::BadPort));
        // A label of 63 characters is fine, 64 is not; a name of 253 is fine, 254 is not.
        let label = |n: usize| "a".repeat(n);
        assert!(HostName::parse(&label(63)).is_ok());
        assert_eq!(
            HostName::parse(&label(64)).err(),
            Some(HostError::Malformed)
        );
        let name = |n: usize| {
            let mut v = vec![label(63); 3];
            v.push(label(n - 3 * 64));
            v.join(".")
        };
        assert_eq!(name(253).len(), 253);
        assert!(HostName::parse(&name(253)).is_ok());
        assert_eq!(
            HostName::parse(&name(254)).err(),
            Some(HostError::Malformed)
        );
    }
}
