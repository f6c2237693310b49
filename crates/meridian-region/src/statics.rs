//! Static assets of a version, held in memory and served with correct
//! content types, strong ETags and conditional GET.
//!
//! Only files that are in the bundle can be served: a request path is looked
//! up in a map, never joined onto a filesystem path, so `..` and friends
//! cannot reach anything else. Paths with `..` segments are refused outright.

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use meridian_http::range::{self, RangeAnswer};
use meridian_http::{empty, full, text, Body};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

pub struct StaticFile {
    body: Bytes,
    content_type: HeaderValue,
    etag: HeaderValue,
}

#[derive(Default)]
pub struct StaticSite {
    files: HashMap<String, StaticFile>,
}

impl StaticSite {
    pub fn new<'a>(files: impl Iterator<Item = (&'a str, &'a [u8])>) -> StaticSite {
        let files = files
            .map(|(path, data)| {
                let mime = mime_guess::from_path(path).first_or_octet_stream();
                let ct = if mime.type_() == "text" || mime.essence_str() == "application/javascript" {
                    format!("{}; charset=utf-8", mime.essence_str())
                } else {
                    mime.essence_str().to_string()
                };
                let digest = Sha256::digest(data);
                let file = StaticFile {
                    body: Bytes::copy_from_slice(data),
                    content_type: HeaderValue::from_str(&ct)
                        .unwrap_or(HeaderValue::from_static("application/octet-stream")),
                    etag: HeaderValue::from_str(&format!("\"{}\"", hex::encode(&digest[..12])))
                        .expect("hex is a valid header"),
                };
                (path.to_string(), file)
            })
            .collect();
        StaticSite { files }
    }

    /// Serves `rel` (the request path below the route's prefix).
    pub fn serve<B>(&self, req: &Request<B>, rel: &str) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "static files answer GET and HEAD only");
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let Some(decoded) = percent_decode(rel) else {
            return text(StatusCode::BAD_REQUEST, "malformed percent-encoding in path");
        };
        let mut segments = Vec::new();
        for seg in decoded.split('/') {
            match seg {
                "" | "." => {}
                ".." => return text(StatusCode::BAD_REQUEST, "path segments `..` are not allowed"),
                s if s.contains('\0') || s.contains('\\') => {
                    return text(StatusCode::BAD_REQUEST, "path contains forbidden characters")
                }
                s => segments.push(s),
            }
        }
        let mut key = segments.join("/");
        if key.is_empty() || decoded.ends_with('/') {
            key = if key.is_empty() { "index.html".into() } else { format!("{key}/index.html") };
        }
        let file = match self.files.get(&key) {
            Some(f) => f,
            // `/docs` serves `docs/index.html` like every static host does.
            None => match self.files.get(&format!("{key}/index.html")) {
                Some(f) => f,
                None => return text(StatusCode::NOT_FOUND, format!("no file at {rel}")),
            },
        };
        let not_modified =
            req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| {
                v.split(',').any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == file.etag)
            });
        // A byte range of a GET, unless a conditional already answered it
        // (RFC 9110 §13.2.2); If-Range against the file's strong ETag.
        let range = if !not_modified && req.method() == Method::GET {
            range::answer(
                req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()),
                req.headers().get(header::IF_RANGE).map(|v| v.to_str().unwrap_or("")),
                file.etag.to_str().ok(),
                None,
                file.body.len(),
            )
        } else {
            RangeAnswer::Full
        };
        let len = file.body.len();
        let mut resp = if not_modified {
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        } else if req.method() == Method::HEAD {
            Response::new(empty())
        } else {
            match &range {
                RangeAnswer::Full => Response::new(full(file.body.clone())),
                RangeAnswer::Partial(r) => {
                    let mut resp = Response::new(full(file.body.slice(r.clone())));
                    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
                    resp.headers_mut().extend(range.content_range(len).map(|v| (header::CONTENT_RANGE, v)));
                    resp
                }
                RangeAnswer::Unsatisfiable => {
                    let mut resp = text(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        format!("the range asked for is outside the {len} bytes of {rel}"),
                    );
                    resp.headers_mut().extend(range.content_range(len).map(|v| (header::CONTENT_RANGE, v)));
                    return resp;
                }
            }
        };
        let h = resp.headers_mut();
        h.insert(header::ETAG, file.etag.clone());
        h.insert(header::CONTENT_TYPE, file.content_type.clone());
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        match &range {
            _ if not_modified => {}
            RangeAnswer::Partial(r) => {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.len()));
            }
            _ => {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            }
        }
        resp
    }
}

/// What static files tell caches when their route says nothing: browsers
/// revalidate every time (a 304 from the nearest edge is cheap), edges keep
/// them a minute (RFC 9213's `CDN-Cache-Control`, for CDNs only), serve
/// them stale while refreshing and for a day when every region fails. A
/// deploy purges what it changed at the edges.
const STATIC_BROWSER_CACHE: &str = "public, max-age=0, must-revalidate";
const STATIC_CDN_CACHE: &str = "public, max-age=60, stale-while-revalidate=60, stale-if-error=86400";

/// What a content-hashed file tells every cache: it never changes under
/// this name.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Adds a route's caching headers to an answer of it: `cache_control`
/// (always on static files, with a default; on a function's answer only if
/// it set none) and `cache_tags` as `Cache-Tag`. A static file is immutable
/// (cached for a year everywhere) when it is under one of the route's
/// `immutable` prefixes, or when its name carries the start of its own
/// SHA-256 (a content hash, as bundlers name assets). Errors are not
/// touched. `rel` is the request path below the route's prefix.
pub fn cache_headers(route: &meridian_manifest::Route, resp: &mut Response<Body>, static_rel: Option<&str>) {
    let status = resp.status();
    if !(status.is_success() || status == StatusCode::NOT_MODIFIED) {
        return;
    }
    let is_static = static_rel.is_some();
    let immutable = static_rel.is_some_and(|rel| {
        let rel = rel.trim_start_matches('/');
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let hashed = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(|e| e.trim_matches('"'))
            .is_some_and(|hex| hex.len() >= 8 && name.contains(&hex[..8]));
        hashed || route.immutable.iter().any(|p| rel.starts_with(p.trim_start_matches('/')))
    });
    let h = resp.headers_mut();
    match (&route.cache_control, is_static) {
        _ if immutable => {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
        }
        (Some(cc), _) if is_static || !h.contains_key(header::CACHE_CONTROL) => {
            if let Ok(v) = HeaderValue::from_str(cc) {
                h.insert(header::CACHE_CONTROL, v);
            }
        }
        (None, true) => {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static(STATIC_BROWSER_CACHE));
            h.insert(HeaderName::from_static("cdn-cache-control"), HeaderValue::from_static(STATIC_CDN_CACHE));
        }
        _ => {}
    }
    if !route.cache_tags.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&route.cache_tags.join(",")) {
            h.append(HeaderName::from_static("cache-tag"), v);
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hashed_and_declared_immutable_files_are_cached_for_a_year() {
        let js = b"console.log(1)";
        let hex = hex::encode(Sha256::digest(js));
        let hashed = format!("app.{}.js", &hex[..10]);
        let site = StaticSite::new(
            [(hashed.as_str(), &js[..]), ("vendor/lib.js", b"x"), ("index.html", b"hi"), ("app.0badc0de.js", b"y")]
                .into_iter(),
        );
        let route = meridian_manifest::Route {
            path: "/".into(),
            target: meridian_manifest::RouteTarget::Static("s".into()),
            cache_control: None,
            cache_tags: vec![],
            immutable: vec!["vendor/".into()],
        };
        let cc = |rel: &str| {
            let mut r = site.serve(&Request::get(format!("/{rel}")).body(()).unwrap(), rel);
            cache_headers(&route, &mut r, Some(rel));
            r.headers()[header::CACHE_CONTROL].to_str().unwrap().to_string()
        };
        assert_eq!(cc(&hashed), IMMUTABLE);
        assert_eq!(cc("vendor/lib.js"), IMMUTABLE);
        assert_eq!(cc("index.html"), STATIC_BROWSER_CACHE);
        assert_eq!(cc("app.0badc0de.js"), STATIC_BROWSER_CACHE, "a hash that is not its own");
    }
    use http_body_util::BodyExt;

    fn site() -> StaticSite {
        StaticSite::new(
            [("index.html", &b"<h1>hi</h1>"[..]), ("css/site.css", b"p{}"), ("docs/index.html", b"docs")].into_iter(),
        )
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    async fn body(r: Response<Body>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn serves_files_with_content_types_and_index() {
        let s = site();
        let r = s.serve(&get("/"), "/");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(body(r).await, "<h1>hi</h1>");
        assert_eq!(
            s.serve(&get("/css/site.css"), "css/site.css").headers()[header::CONTENT_TYPE],
            "text/css; charset=utf-8"
        );
        assert_eq!(body(s.serve(&get("/docs"), "docs")).await, "docs");
        assert_eq!(s.serve(&get("/nope"), "nope").status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn conditional_get_answers_304() {
        let s = site();
        let etag = s.serve(&get("/"), "").headers()[header::ETAG].clone();
        let req = Request::get("/").header(header::IF_NONE_MATCH, etag).body(()).unwrap();
        assert_eq!(s.serve(&req, "").status(), StatusCode::NOT_MODIFIED);
    }

    #[tokio::test]
    async fn byte_ranges_of_a_file_answer_206_or_416() {
        let s = site();
        let with = |pairs: &[(&http::HeaderName, &str)]| {
            let mut b = Request::get("/");
            for (k, v) in pairs {
                b = b.header(*k, *v);
            }
            s.serve(&b.body(()).unwrap(), "")
        };
        let r = with(&[(&header::RANGE, "bytes=4-5")]);
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes 4-5/11");
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "2");
        assert_eq!(body(r).await, "hi");
        let r = with(&[(&header::RANGE, "bytes=11-")]);
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes */11");
        let etag = with(&[]).headers()[header::ETAG].to_str().unwrap().to_string();
        let r = with(&[(&header::RANGE, "bytes=-5"), (&header::IF_RANGE, &etag)]);
        assert_eq!(body(r).await, "</h1>");
        let r = with(&[(&header::RANGE, "bytes=-5"), (&header::IF_RANGE, "\"stale\"")]);
        assert_eq!((r.status(), r.headers()[header::ACCEPT_RANGES].to_str().unwrap()), (StatusCode::OK, "bytes"));
        let r = with(&[(&header::RANGE, "bytes=0-1"), (&header::IF_NONE_MATCH, &etag)]);
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    }

    #[test]
    fn traversal_is_refused() {
        let s = site();
        for p in ["../etc/passwd", "css/../../x", "%2e%2e/x", "a/%2E%2E/%2e%2E/b", "%zz"] {
            let st = s.serve(&get("/"), p).status();
            assert!(st == StatusCode::BAD_REQUEST, "{p}: {st}");
        }
    }
}
