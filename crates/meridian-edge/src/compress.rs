//! Compression of what the cache stores, as CDNs and nginx's `gzip` do for
//! text: an object of a text-like type is gzipped once, when it is stored,
//! and clients that accept gzip get that form (`Content-Encoding: gzip`,
//! `Vary: Accept-Encoding`, a weak `ETag`); others, and byte ranges, get
//! the object as the region sent it.
//!
//! Only what the region sent unencoded is compressed, never an answer
//! marked `no-transform` (RFC 9111 §5.2.2.6), and the compressed form is
//! kept only when it saves at least a tenth.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use std::io::Write;

/// Bodies smaller than this gain too little to be worth a `Vary`.
pub const MIN_BYTES: usize = 1024;

/// Media types worth compressing: text, and the structured and code types
/// that are text in all but name. Images, video, archives and fonts in
/// compressed formats are already compressed.
fn compressible_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence.starts_with("text/")
        || essence.ends_with("+json")
        || essence.ends_with("+xml")
        || matches!(
            essence.as_str(),
            "application/javascript"
                | "application/x-javascript"
                | "application/ecmascript"
                | "application/json"
                | "application/xml"
                | "application/wasm"
                | "application/manifest+json"
                | "image/svg+xml"
                | "image/x-icon"
                | "image/vnd.microsoft.icon"
                | "font/ttf"
                | "font/otf"
                | "application/vnd.ms-fontobject"
        )
}

/// Whether a stored answer with these headers and a body of `len` bytes is
/// to be kept gzipped too.
pub fn worth_compressing(status: StatusCode, headers: &HeaderMap, len: usize) -> bool {
    if status != StatusCode::OK || len < MIN_BYTES {
        return false;
    }
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| v.to_str().map_or(true, |v| !v.trim().eq_ignore_ascii_case("identity")));
    let no_transform = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"));
    let text = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(compressible_type);
    text && !encoded && !no_transform
}

/// `body` gzipped, if that saves at least a tenth of it. (Level 6, zlib's
/// and nginx's default: most of the gain for a fraction of the time of 9.)
pub fn gzip(body: &[u8]) -> Option<Bytes> {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 3), flate2::Compression::new(6));
    enc.write_all(body).ok()?;
    let out = enc.finish().ok()?;
    (out.len() <= body.len() - body.len() / 10).then(|| Bytes::from(out))
}

/// Whether a client with this `Accept-Encoding` takes gzip (RFC 9110
/// §12.5.3): `gzip` (or `x-gzip`) with a non-zero weight, or `*` with a
/// non-zero weight when gzip is not named.
pub fn accepts_gzip(accept_encoding: &HeaderMap) -> bool {
    let (mut gzip, mut any) = (None, None);
    for v in accept_encoding.get_all(header::ACCEPT_ENCODING) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let weight = parts
                .find_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("q").then(|| v.trim().parse::<f32>().unwrap_or(0.0))
                })
                .unwrap_or(1.0);
            match coding.as_str() {
                "gzip" | "x-gzip" => gzip = Some(weight > 0.0),
                "*" => any = Some(weight > 0.0),
                _ => {}
            }
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// An entity tag for the gzipped form: the object's, made weak. Two
/// representations must not share a strong tag; a weak one still lets a
/// conditional request of either form be answered with a 304.
pub fn weak_etag(etag: &HeaderValue) -> HeaderValue {
    if etag.as_bytes().starts_with(b"W/") {
        return etag.clone();
    }
    let mut v = Vec::with_capacity(etag.len() + 2);
    v.extend_from_slice(b"W/");
    v.extend_from_slice(etag.as_bytes());
    HeaderValue::from_bytes(&v).unwrap_or_else(|_| etag.clone())
}

/// Adds `Accept-Encoding` to the answer's `Vary` unless it is there.
pub fn vary_on_accept_encoding(h: &mut HeaderMap) {
    let named = h
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim() == "*" || n.trim().eq_ignore_ascii_case("accept-encoding"));
    if !named {
        h.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn what_accepts_gzip() {
        // (Accept-Encoding values, takes gzip)
        let cases: &[(&[&str], bool)] = &[
            (&["gzip"], true),
            (&["gzip, deflate, br, zstd"], true),
            (&["GZIP"], true),
            (&["x-gzip"], true),
            (&["br;q=1.0, gzip;q=0.5"], true),
            (&["gzip;q=0"], false),
            (&["gzip; q=0.000"], false),
            (&["*"], true),
            (&["*;q=0"], false),
            (&["*, gzip;q=0"], false),
            (&["gzip;q=0, *"], false),
            (&["br", "gzip"], true),
            (&["identity"], false),
            (&["br, zstd"], false),
            (&[""], false),
            (&[], false),
        ];
        for (values, want) in cases {
            let h = headers(&values.iter().map(|v| ("accept-encoding", *v)).collect::<Vec<_>>());
            assert_eq!(accepts_gzip(&h), *want, "{values:?}");
        }
    }

    #[test]
    fn what_is_worth_compressing() {
        let ok = StatusCode::OK;
        // (status, headers, body length, compressed)
        type Case<'a> = (StatusCode, &'a [(&'a str, &'a str)], usize, bool);
        let cases: &[Case] = &[
            (ok, &[("content-type", "text/html; charset=utf-8")], 4096, true),
            (ok, &[("content-type", "application/javascript")], 4096, true),
            (ok, &[("content-type", "application/ld+json")], 4096, true),
            (ok, &[("content-type", "image/svg+xml")], 4096, true),
            (ok, &[("content-type", "application/wasm")], 4096, true),
            (ok, &[("content-type", "text/css"), ("content-encoding", "identity")], 4096, true),
            // Too small, already compressed formats, no type.
            (ok, &[("content-type", "text/html")], 1000, false),
            (ok, &[("content-type", "image/png")], 4096, false),
            (ok, &[("content-type", "application/octet-stream")], 4096, false),
            (ok, &[], 4096, false),
            // Encoded by the region, or not to be transformed.
            (ok, &[("content-type", "text/html"), ("content-encoding", "br")], 4096, false),
            (ok, &[("content-type", "text/html"), ("cache-control", "public, no-transform")], 4096, false),
            // Only whole 200s.
            (StatusCode::NOT_FOUND, &[("content-type", "text/html")], 4096, false),
        ];
        for (status, h, len, want) in cases {
            assert_eq!(worth_compressing(*status, &headers(h), *len), *want, "{status} {h:?} {len}");
        }
    }

    #[test]
    fn gzip_round_trips_and_is_kept_only_when_it_saves() {
        let text = "<p>the same paragraph, again and again</p>\n".repeat(200);
        let gz = gzip(text.as_bytes()).expect("text compresses");
        assert!(gz.len() < text.len() / 10, "{} of {}", gz.len(), text.len());
        let mut back = String::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut back).unwrap();
        assert_eq!(back, text);
        // Noise does not shrink: not kept.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(gzip(&noise).is_none());
    }

    #[test]
    fn tags_weaken_and_vary_is_added_once() {
        assert_eq!(weak_etag(&HeaderValue::from_static("\"v1\"")), "W/\"v1\"");
        assert_eq!(weak_etag(&HeaderValue::from_static("W/\"v1\"")), "W/\"v1\"");
        let mut h = headers(&[("vary", "Origin")]);
        vary_on_accept_encoding(&mut h);
        vary_on_accept_encoding(&mut h);
        let vary: Vec<_> = h.get_all("vary").iter().map(|v| v.to_str().unwrap().to_string()).collect();
        assert_eq!(vary, ["Origin", "accept-encoding"]);
        let mut h = headers(&[("vary", "Accept-Encoding, Origin")]);
        vary_on_accept_encoding(&mut h);
        assert_eq!(h.get_all("vary").iter().count(), 1);
    }
}
