//! Header names the edge touches on every request, parsed once at compile
//! time. A `&str` name is parsed (matched against the standard names,
//! validated, hashed) each time it is used to insert or remove; on a
//! proxied request that happened a dozen times per request.

use http::header::{self, HeaderName};
use meridian_core::headers;

pub const EDGE: HeaderName = HeaderName::from_static(headers::EDGE);
pub const ATTEMPTS: HeaderName = HeaderName::from_static(headers::ATTEMPTS);
pub const FAULT: HeaderName = HeaderName::from_static(headers::FAULT);
pub const RESIDENCY: HeaderName = HeaderName::from_static(headers::RESIDENCY);
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
pub const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// Headers that describe one connection, not the message (RFC 9110
/// §7.6.1, and the proxy ones): never passed from one side to the other.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Standard names compare as an enum; the three custom ones by bytes.
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::PROXY_AUTHORIZATION
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// What the edge takes off a region's answer before a client sees it:
/// hop-by-hop headers, cache tags (for the edge's purge only) and the
/// residency mark (for the edge's cache only).
pub fn is_internal_to_the_edge(name: &HeaderName) -> bool {
    is_hop_by_hop(name) || *name == SURROGATE_KEY || *name == CACHE_TAG || *name == RESIDENCY
}

/// `x-meridian-attempts` for `n` regions tried: the usual counts are
/// static values, not a number formatted per response.
pub fn attempts_value(n: usize) -> http::HeaderValue {
    match n {
        0 => http::HeaderValue::from_static("0"),
        1 => http::HeaderValue::from_static("1"),
        2 => http::HeaderValue::from_static("2"),
        3 => http::HeaderValue::from_static("3"),
        n => http::HeaderValue::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_known_by_any_spelling_and_nothing_else_is() {
        for n in [
            "connection",
            "Keep-Alive",
            "proxy-connection",
            "proxy-authenticate",
            "Proxy-Authorization",
            "te",
            "trailer",
            "Transfer-Encoding",
            "upgrade",
        ] {
            assert!(is_hop_by_hop(&HeaderName::from_bytes(n.as_bytes()).unwrap()), "{n}");
        }
        for n in ["host", "content-length", "x-meridian-region", "keep", "authorization", "cache-tag"] {
            assert!(!is_hop_by_hop(&HeaderName::from_bytes(n.as_bytes()).unwrap()), "{n}");
        }
        for n in ["Surrogate-Key", "cache-tag", "x-meridian-residency", "connection"] {
            assert!(is_internal_to_the_edge(&HeaderName::from_bytes(n.as_bytes()).unwrap()), "{n}");
        }
        assert!(!is_internal_to_the_edge(&HeaderName::from_static("x-meridian-region")));
    }

    #[test]
    fn constant_names_are_the_shared_ones_and_attempts_read_back() {
        assert_eq!(EDGE.as_str(), headers::EDGE);
        assert_eq!(ATTEMPTS.as_str(), headers::ATTEMPTS);
        assert_eq!(FAULT.as_str(), headers::FAULT);
        assert_eq!(RESIDENCY.as_str(), headers::RESIDENCY);
        for n in 0..12 {
            assert_eq!(attempts_value(n).to_str().unwrap(), n.to_string());
        }
    }
}
