//! The vocabulary of guest egress: `allowed_outbound_hosts` entries as the
//! manifest states them (the host enforces them, `meridian-host::egress`).

use std::net::IpAddr;

/// One `allowed_outbound_hosts` entry: `scheme://host[:port|:*]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AllowedHost {
    pub scheme: OutboundScheme,
    pub host: HostPattern,
    /// `None`: `:*`, any port. Without a port in the entry: the scheme's default.
    pub port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OutboundScheme {
    Http,
    Https,
    /// `*://`
    Any,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HostPattern {
    /// An exact name (lowercase).
    Name(String),
    /// `*.example.com`: any name ending in `.example.com`.
    Suffix(String),
    /// An IP literal: the only way to allow a loopback, private, link-local
    /// or metadata address.
    Ip(IpAddr),
}

impl std::str::FromStr for AllowedHost {
    type Err = String;

    fn from_str(s: &str) -> Result<AllowedHost, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| format!("{s:?} needs a scheme, like https://{s}"))?;
        let scheme = match scheme {
            "http" => OutboundScheme::Http,
            "https" => OutboundScheme::Https,
            "*" => OutboundScheme::Any,
            _ => return Err(format!("{s:?}: the scheme must be http, https or *")),
        };
        if rest.contains('/') || rest.contains('@') || rest.contains('?') || rest.contains('#') {
            return Err(format!("{s:?}: only scheme://host[:port] is allowed, without path or user"));
        }
        // The port follows the last ':' outside an IPv6 literal's brackets.
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !p.contains(']') && (h.starts_with('[') || !h.contains(':')) => {
                (h, Some(p))
            }
            _ => (rest, None),
        };
        let port = match port {
            None => Some(match scheme {
                OutboundScheme::Https => 443,
                OutboundScheme::Http => 80,
                OutboundScheme::Any => return Err(format!("{s:?}: with scheme * give a port (or :*)")),
            }),
            Some("*") => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| format!("{s:?}: {p:?} is not a port"))?),
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let host = if let Ok(ip) = bare.parse::<IpAddr>() {
            HostPattern::Ip(ip)
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !valid_name(suffix) {
                return Err(format!("{s:?}: {suffix:?} is not a host name"));
            }
            HostPattern::Suffix(suffix.to_ascii_lowercase())
        } else if valid_name(host) {
            HostPattern::Name(host.to_ascii_lowercase())
        } else {
            return Err(format!("{s:?}: {host:?} is not a host name or IP address"));
        };
        Ok(AllowedHost { scheme, host, port })
    }
}

fn valid_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_strictly() {
        let ok = |s: &str| s.parse::<AllowedHost>().unwrap();
        assert_eq!(
            ok("https://API.example.com"),
            AllowedHost {
                scheme: OutboundScheme::Https,
                host: HostPattern::Name("api.example.com".into()),
                port: Some(443)
            }
        );
        assert_eq!(ok("http://127.0.0.1:8080").host, HostPattern::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!(ok("http://127.0.0.1:8080").port, Some(8080));
        assert_eq!(ok("http://[::1]:*").port, None);
        assert_eq!(ok("http://[::1]").host, HostPattern::Ip("::1".parse().unwrap()));
        assert_eq!(ok("*://*.example.com:8443").host, HostPattern::Suffix("example.com".into()));
        for bad in ["example.com", "ftp://x", "https://x/path", "https://u@x", "*://x", "https://x:99999", "https://"] {
            assert!(bad.parse::<AllowedHost>().is_err(), "{bad}");
        }
    }
}
