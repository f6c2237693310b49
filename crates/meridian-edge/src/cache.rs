//! The edge's HTTP cache: a shared cache in the sense of RFC 9111, with
//! RFC 5861's `stale-while-revalidate` / `stale-if-error` and RFC 9213's
//! `CDN-Cache-Control` (which, when present, replaces `Cache-Control` for
//! this cache and is still passed on to clients).
//!
//! What may be stored and for how long is decided by `http-cache-semantics`
//! (freshness from `s-maxage`, `max-age`, `Expires` or a `Last-Modified`
//! heuristic; `no-store`, `private`, `Authorization`, `Vary`); this module
//! adds what a CDN adds on top:
//!
//! * a response with `Set-Cookie` is never stored (as Varnish), nor one that
//!   could never be reused (no freshness and no validator), nor a body over
//!   [`CacheConfig::max_object_kb`];
//! * stale objects are kept (up to their stale windows, or a day when they
//!   have a validator) so they can be revalidated with a 304 or served when
//!   every region fails;
//! * clients' own `Cache-Control` / `Pragma` do not bypass the cache (as
//!   Varnish, nginx and Cloudflare): one client cannot make every request
//!   reach the regions;
//! * one fill per key at a time: concurrent misses wait for the first
//!   ([`Cache::join`]).
//!
//! Every function takes `now` so the rules are tested without a clock.
//!
//! Objects are grouped by primary key (host and path with query); the
//! variants of one key (`Vary`) live side by side, at most
//! [`MAX_VARIANTS`] of them.

use crate::names::{self, is_hop_by_hop};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy, RequestLike, ResponseLike};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// Variants kept per URL; more are evicted oldest first.
pub const MAX_VARIANTS: usize = 8;

/// How long a stale object with a validator is kept for revalidation when
/// it names no stale window of its own.
const KEEP_FOR_REVALIDATION: Duration = Duration::from_secs(24 * 3600);

/// How long a key whose answer could not be stored skips coalescing.
const UNCACHEABLE_FOR: Duration = Duration::from_secs(30);

/// The response header that says what the cache did.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("x-meridian-cache");

/// Response headers that carry purge tags: `Surrogate-Key` (space
/// separated, Fastly) and `Cache-Tag` (comma separated, Cloudflare). They
/// are for the edge only and never reach clients.
const TAG_HEADERS: [HeaderName; 2] = [names::SURROGATE_KEY, names::CACHE_TAG];

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Bound of the memory tier (bodies and headers).
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Keep stored objects of text-like types gzipped too, for clients that
    /// accept it ([`crate::compress`]).
    #[serde(default = "yes")]
    pub compress: bool,
    /// Largest body stored; larger ones pass through.
    #[serde(default = "default_max_object_kb")]
    pub max_object_kb: usize,
    /// The disk tier: every stored object is also written here, so the edge
    /// keeps more than memory holds (emptied when the edge starts).
    #[serde(default)]
    pub disk_dir: Option<std::path::PathBuf>,
    /// Bound of the disk tier.
    #[serde(default = "default_disk_mb")]
    pub disk_mb: u64,
}

fn default_disk_mb() -> u64 {
    1024
}

fn yes() -> bool {
    true
}
fn default_memory_mb() -> u64 {
    256
}
fn default_max_object_kb() -> usize {
    8 * 1024
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            memory_mb: default_memory_mb(),
            max_object_kb: default_max_object_kb(),
            compress: true,
            disk_dir: None,
            disk_mb: default_disk_mb(),
        }
    }
}

/// What the cache did for one request (the `x-meridian-cache` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the cache, fresh.
    Hit,
    /// Fetched from a region (and stored if it could be).
    Miss,
    /// Served stale: within `stale-while-revalidate` (a refresh runs in the
    /// background) or `stale-if-error` (the regions failed).
    Stale,
    /// A stale object confirmed by the region with a 304.
    Revalidated,
    /// Not a cacheable request (method, `Range`, ...): passed through.
    Bypass,
}

impl Outcome {
    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Stale => "STALE",
            Outcome::Revalidated => "REVALIDATED",
            Outcome::Bypass => "BYPASS",
        })
    }
}

/// A request as the cache sees it: the path with query (never a scheme or
/// authority, which differ between HTTP/1.1 and HTTP/2 for one resource),
/// the method, and the client's headers with `Host` set.
pub struct Lookup<'a> {
    pub path_and_query: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

impl RequestLike for Lookup<'_> {
    fn uri(&self) -> Uri {
        self.path_and_query.parse().unwrap_or_else(|_| Uri::from_static("/"))
    }
    fn is_same_uri(&self, other: &Uri) -> bool {
        other.path_and_query().map(|p| p.as_str()) == Some(self.path_and_query)
    }
    fn method(&self) -> &Method {
        self.method
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

struct PolicyResponse<'a> {
    status: StatusCode,
    headers: &'a HeaderMap,
}

impl ResponseLike for PolicyResponse<'_> {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

/// One stored response.
#[derive(Clone)]
pub struct Object {
    pub(crate) policy: CachePolicy,
    pub status: StatusCode,
    /// As sent to clients: no hop-by-hop or tag headers, no `Age`.
    pub(crate) headers: HeaderMap,
    pub body: Bytes,
    /// The body gzipped, when it is of a type worth it and that saved
    /// something ([`crate::compress`]).
    pub(crate) gzip: Option<Bytes>,
    pub(crate) tags: Box<[Box<str>]>,
    /// The values of the request headers `Vary` names, to tell variants of
    /// one URL apart.
    pub(crate) vary_key: Box<str>,
    /// The `Host` of the request it answered (the policy's URL match, kept
    /// where a lookup can compare it without asking the policy).
    pub(crate) req_host: Option<HeaderValue>,
    /// When it stops being fresh.
    pub(crate) fresh_until: SystemTime,
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) stale_if_error: Duration,
}

pub use meridian_http::range::RangeAnswer;

/// What a lookup found.
pub enum Found {
    Fresh(Arc<Object>),
    /// Stale: to be revalidated ([`Object::validators`]) or served within
    /// its stale windows.
    Stale(Arc<Object>),
    Miss,
}

impl Object {
    /// Builds an object from a region's answer, or `None` when it must not
    /// (or could never usefully) be stored.
    pub fn new(
        req: &Lookup<'_>,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        now: SystemTime,
    ) -> Option<Object> {
        if headers.contains_key(header::SET_COOKIE) || *req.method != Method::GET {
            return None;
        }
        // Part of a body is not the object (the edge asks for whole ones
        // and cuts ranges from them itself).
        if status == StatusCode::PARTIAL_CONTENT || headers.contains_key(header::CONTENT_RANGE) {
            return None;
        }
        let (policy, cc) = policy_for(req, status, headers, now);
        if !policy.is_storable() {
            return None;
        }
        let ttl = policy.time_to_live(now);
        let validator = headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
        if ttl.is_zero() && !validator {
            return None;
        }
        let (swr, sie) = stale_windows(&cc);
        let mut stored = HeaderMap::with_capacity(headers.len());
        for (k, v) in headers {
            if !is_hop_by_hop(k) && !TAG_HEADERS.contains(k) && k != header::AGE {
                stored.append(k.clone(), v.clone());
            }
        }
        Some(Object {
            tags: tags_of(headers),
            vary_key: vary_key(headers, req.headers),
            req_host: req.headers.get(header::HOST).cloned(),
            policy,
            status,
            headers: stored,
            body,
            gzip: None,
            fresh_until: now + ttl,
            stale_while_revalidate: swr,
            stale_if_error: sie,
        })
    }

    /// The same object confirmed by a 304: the 304's headers replace the
    /// stored ones (except those describing the body), freshness restarts.
    pub fn revalidated(&self, req: &Lookup<'_>, not_modified: &HeaderMap, now: SystemTime) -> Option<Object> {
        let mut headers = self.headers.clone();
        for (k, v) in not_modified {
            if !is_hop_by_hop(k)
                && !matches!(k.as_str(), "content-length" | "content-encoding" | "content-range" | "age")
            {
                headers.insert(k.clone(), v.clone());
            }
        }
        // Tags come from the new answer when it carries any.
        let mut with_tags = headers.clone();
        for t in TAG_HEADERS {
            for v in not_modified.get_all(&t) {
                with_tags.append(t.clone(), v.clone());
            }
        }
        let mut o = Object::new(req, self.status, &with_tags, self.body.clone(), now)?;
        if o.tags.is_empty() {
            o.tags = self.tags.clone();
        }
        // The same body: the same compressed form, unless the new headers
        // forbid it (`no-transform`, an encoding).
        if crate::compress::worth_compressing(o.status, &o.headers, o.body.len()) {
            o.gzip = self.gzip.clone();
        }
        Some(o)
    }

    /// Whether a 304 from the region confirms this object (its strong
    /// validator, or its `Last-Modified` when it has no `ETag`).
    pub fn confirmed_by(&self, not_modified: &HeaderMap) -> bool {
        let get =
            |h: &HeaderMap, n: HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim).map(String::from);
        match (get(&self.headers, header::ETAG), get(not_modified, header::ETAG)) {
            (Some(old), Some(new)) => old.trim_start_matches("W/") == new.trim_start_matches("W/"),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            // Last-Modified only, or no validator at all (RFC 9111 §4.3.4).
            (None, None) => true,
        }
    }

    /// The conditional headers that revalidate this object.
    pub fn validators(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        let etag = self.headers.get(header::ETAG).map(|v| (header::IF_NONE_MATCH, v.clone()));
        let lm = self.headers.get(header::LAST_MODIFIED).map(|v| (header::IF_MODIFIED_SINCE, v.clone()));
        etag.into_iter().chain(lm)
    }

    pub fn is_fresh(&self, now: SystemTime) -> bool {
        now < self.fresh_until
    }

    /// The common hit, decided without building the policy's answer: fresh
    /// by our clock and the policy's, the same `Host` and `Vary` values, and
    /// a request with no directives of its own. When this says yes, so
    /// would [`CachePolicy::before_request`]; when it says no, the policy
    /// decides.
    fn plainly_fresh_for(&self, req: &Lookup<'_>, now: SystemTime) -> bool {
        self.is_fresh(now)
            && !req.headers.contains_key(header::CACHE_CONTROL)
            && !req.headers.contains_key(header::PRAGMA)
            && req.headers.get(header::HOST) == self.req_host.as_ref()
            && *vary_key(&self.headers, req.headers) == *self.vary_key
            && !self.policy.is_stale(now)
    }

    /// How long past freshness it is (zero when fresh).
    fn staleness(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fresh_until).unwrap_or_default()
    }

    /// May it be served while a refresh runs in the background?
    pub fn serve_while_revalidating(&self, now: SystemTime) -> bool {
        !self.is_fresh(now) && self.staleness(now) <= self.stale_while_revalidate
    }

    /// May it be served because the regions failed?
    pub fn serve_on_error(&self, now: SystemTime) -> bool {
        self.staleness(now) <= self.stale_if_error
    }

    /// Until when it is worth keeping.
    fn keep_until(&self) -> SystemTime {
        let validator = self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED);
        let mut keep = self.stale_while_revalidate.max(self.stale_if_error);
        if validator {
            keep = keep.max(KEEP_FOR_REVALIDATION);
        }
        self.fresh_until + keep
    }

    /// Headers for a client: the stored ones and the current `Age`.
    pub fn response_headers(&self, now: SystemTime) -> HeaderMap {
        let mut h = self.headers.clone();
        h.insert(header::AGE, HeaderValue::from(self.policy.age(now).as_secs()));
        h
    }

    /// A stored header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| &**t == tag)
    }

    /// Does the client's conditional request match this object (so a 304
    /// answers it)? `If-None-Match` wins over `If-Modified-Since`.
    pub fn satisfies_conditional(&self, req: &HeaderMap) -> bool {
        if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
            let Some(etag) = self.headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
                return false;
            };
            let etag = etag.trim_start_matches("W/");
            return inm.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == etag);
        }
        if let Some(ims) = req.get(header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok()) {
            let lm = self.headers.get(header::LAST_MODIFIED).and_then(|v| v.to_str().ok());
            if let (Ok(ims), Some(Ok(lm))) = (httpdate::parse_http_date(ims), lm.map(httpdate::parse_http_date)) {
                return lm <= ims;
            }
        }
        false
    }

    /// What a `Range` request (with its `If-Range`, if any) gets from this
    /// object (RFC 9110 §14): part of a stored 200, or all of it.
    pub fn range(&self, range: Option<&HeaderValue>, if_range: Option<&HeaderValue>) -> RangeAnswer {
        if self.status != StatusCode::OK {
            return RangeAnswer::Full;
        }
        meridian_http::range::answer(
            range.and_then(|v| v.to_str().ok()),
            if_range.map(|v| v.to_str().unwrap_or("")),
            self.header("etag"),
            self.header("last-modified"),
            self.body.len(),
        )
    }

    fn weight(&self) -> u32 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum();
        let gzip = self.gzip.as_ref().map_or(0, Bytes::len);
        (self.body.len() + gzip + headers + 512).min(u32::MAX as usize) as u32
    }
}

/// The policy this cache applies: `CDN-Cache-Control` replaces
/// `Cache-Control` when present (RFC 9213). Returns the directives used.
fn policy_for(req: &Lookup<'_>, status: StatusCode, headers: &HeaderMap, now: SystemTime) -> (CachePolicy, String) {
    let opts = CacheOptions { shared: true, ..Default::default() };
    let targeted: Vec<&str> = headers.get_all("cdn-cache-control").iter().filter_map(|v| v.to_str().ok()).collect();
    if targeted.is_empty() {
        let cc = headers.get_all(header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
        let cc = cc.join(",");
        // http-cache-semantics compares directive names as written; RFC
        // 9111 §5.2 makes them case-insensitive, so it is given them
        // folded (only when they need it: the common answer is not copied).
        if cc.bytes().any(|b| b.is_ascii_uppercase()) {
            let folded = fold_directive_names(&cc);
            let mut h = headers.clone();
            h.remove(header::CACHE_CONTROL);
            if let Ok(v) = HeaderValue::from_str(&folded) {
                h.insert(header::CACHE_CONTROL, v);
            }
            let policy = CachePolicy::new_options(req, &PolicyResponse { status, headers: &h }, now, opts);
            return (policy, folded);
        }
        let policy = CachePolicy::new_options(req, &PolicyResponse { status, headers }, now, opts);
        (policy, cc)
    } else {
        let cc = fold_directive_names(&targeted.join(","));
        let mut h = headers.clone();
        h.remove("cdn-cache-control");
        if let Ok(v) = HeaderValue::from_str(&cc) {
            h.insert(header::CACHE_CONTROL, v);
        }
        // `Expires` is a directive for every cache; a targeted field
        // replaces it too.
        h.remove(header::EXPIRES);
        let policy = CachePolicy::new_options(req, &PolicyResponse { status, headers: &h }, now, opts);
        (policy, cc)
    }
}

/// Cache directives with their names in lower case (RFC 9111 §5.2:
/// directive names are case-insensitive); values are kept as written.
fn fold_directive_names(cc: &str) -> String {
    let mut out = String::with_capacity(cc.len());
    for (i, d) in cc.split(',').map(str::trim).filter(|d| !d.is_empty()).enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match d.split_once('=') {
            Some((k, v)) => {
                out.push_str(&k.trim().to_ascii_lowercase());
                out.push('=');
                out.push_str(v.trim());
            }
            None => out.push_str(&d.to_ascii_lowercase()),
        }
    }
    out
}

/// `stale-while-revalidate` and `stale-if-error` (RFC 5861), both zero when
/// a directive forbids serving stale (`must-revalidate`, `proxy-revalidate`,
/// `no-cache`: RFC 9111 §4.2.4).
fn stale_windows(cc: &str) -> (Duration, Duration) {
    let mut swr = Duration::ZERO;
    let mut sie = Duration::ZERO;
    for d in cc.split(',') {
        let (k, v) = match d.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
            None => (d.trim(), None),
        };
        let secs = || v.and_then(|v| v.parse::<u64>().ok()).map(Duration::from_secs).unwrap_or_default();
        match k.to_ascii_lowercase().as_str() {
            "must-revalidate" | "proxy-revalidate" | "no-cache" => return (Duration::ZERO, Duration::ZERO),
            "stale-while-revalidate" => swr = secs(),
            "stale-if-error" => sie = secs(),
            _ => {}
        }
    }
    (swr, sie)
}

fn tags_of(headers: &HeaderMap) -> Box<[Box<str>]> {
    let mut tags: Vec<Box<str>> = Vec::new();
    for v in headers.get_all(names::SURROGATE_KEY).iter().filter_map(|v| v.to_str().ok()) {
        tags.extend(v.split_ascii_whitespace().map(Into::into));
    }
    for v in headers.get_all(names::CACHE_TAG).iter().filter_map(|v| v.to_str().ok()) {
        tags.extend(v.split(',').map(str::trim).filter(|t| !t.is_empty()).map(Into::into));
    }
    tags.sort();
    tags.dedup();
    tags.into_boxed_slice()
}

fn vary_key(resp: &HeaderMap, req: &HeaderMap) -> Box<str> {
    let mut key = String::new();
    for names in resp.get_all(header::VARY).iter().filter_map(|v| v.to_str().ok()) {
        for name in names.split(',').map(str::trim) {
            key.push_str(&name.to_ascii_lowercase());
            key.push('=');
            for v in req.get_all(name) {
                key.push_str(v.to_str().unwrap_or("?"));
                key.push(',');
            }
            key.push('\n');
        }
    }
    key.into()
}

/// `variants` with every `x-meridian-version: from` changed to `to`
/// (counted in `n`), or `None` if none carried `from`.
fn relabeled(variants: &[Arc<Object>], from: &HeaderValue, to: &HeaderValue, n: &mut u64) -> Option<Vec<Arc<Object>>> {
    let version = |o: &Object| o.headers.get(meridian_core::headers::VERSION) == Some(from);
    if !variants.iter().any(|o| version(o)) {
        return None;
    }
    Some(
        variants
            .iter()
            .map(|o| {
                if !version(o) {
                    return o.clone();
                }
                *n += 1;
                let mut relabelled = Object::clone(o);
                relabelled.headers.insert(meridian_core::headers::VERSION, to.clone());
                Arc::new(relabelled)
            })
            .collect(),
    )
}

/// The primary key of a request: its host and path with query. Requests a
/// residency rule pins to jurisdiction `j` (only its regions' answers) use
/// `pinned_key`.
pub fn key(host: &str, path_and_query: &str) -> Box<str> {
    let mut k = String::with_capacity(host.len() + path_and_query.len() + 1);
    k.push_str(host);
    k.push(' ');
    k.push_str(path_and_query);
    k.into()
}

pub fn pinned_key(host: &str, jurisdiction: &str, path_and_query: &str) -> Box<str> {
    key(&format!("{host}@{jurisdiction}"), path_and_query)
}

/// The host and path of a key.
fn split_key(k: &str) -> Option<(&str, &str)> {
    let (host, path) = k.split_once(' ')?;
    Some((host.split_once('@').map_or(host, |(h, _)| h), path))
}

pub use meridian_core::wire::Purge;

type Variants = Arc<[Arc<Object>]>;

/// How long a write through the edge is remembered against fills that
/// began before it: longer than any fill may take (`upstream_timeout_ms`).
const WRITTEN_FOR: Duration = Duration::from_secs(300);

/// The counts of changes a fill began after ([`Cache::since`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Since {
    purges: u64,
    writes: u64,
}

/// Has nothing that covers `key` changed between `since` and `now`?
fn unchanged(now: &Since, written: &moka::sync::Cache<Box<str>, u64>, key: &str, since: Since) -> bool {
    now.purges == since.purges && (now.writes == since.writes || written.get(key).is_none_or(|w| w <= since.writes))
}

/// The cache's counters, as reported in the edge's status.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub revalidated: u64,
    pub bypass: u64,
    /// Fills that waited for another request's fetch instead of making
    /// their own.
    pub coalesced: u64,
    pub purged: u64,
    /// Body bytes served from the cache (hits, stale, revalidated).
    pub bytes_from_cache: u64,
    /// Answers sent gzipped, and the body bytes that saved.
    #[serde(default)]
    pub compressed: u64,
    #[serde(default)]
    pub compression_saved_bytes: u64,
    pub objects: u64,
    pub bytes_stored: u64,
    /// URLs (all their variants) in the disk tier, and its bytes.
    pub disk_entries: u64,
    pub disk_bytes: u64,
}

impl CacheStats {
    /// Answers from the cache over all cacheable requests (0 when none).
    pub fn hit_ratio(&self) -> f64 {
        let from_cache = self.hits + self.stale + self.revalidated;
        let all = from_cache + self.misses;
        if all == 0 {
            0.0
        } else {
            from_cache as f64 / all as f64
        }
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    revalidated: AtomicU64,
    bypass: AtomicU64,
    coalesced: AtomicU64,
    purged: AtomicU64,
    bytes_from_cache: AtomicU64,
    compressed: AtomicU64,
    compression_saved: AtomicU64,
}

pub struct Cache {
    config: CacheConfig,
    objects: moka::sync::Cache<Box<str>, Variants>,
    disk: Option<Arc<crate::disk::Disk>>,
    /// Keys being filled now, and the signal that the fill ended.
    inflight: Mutex<HashMap<Box<str>, watch::Receiver<bool>>>,
    /// Keys whose last answer could not be stored: for a while their
    /// requests go straight to a region instead of queueing behind one
    /// another's fills (Varnish's hit-for-miss).
    uncacheable: moka::sync::Cache<Box<str>, ()>,
    /// Counts purges and relabels (of any URL) and writes through this
    /// edge (per URL, in `written`); each is counted, under the lock, before
    /// it touches an object. A fill notes the counts when it starts and
    /// stores its answer only if nothing it covers changed since
    /// ([`Cache::store_unless_changed`]): an answer fetched before a purge
    /// (a deploy's, say) or a write must not be stored after it, where it
    /// would outlive it until it expires.
    changes: Arc<Mutex<Since>>,
    /// The write count at each URL's last write through this edge (kept
    /// longer than a fill can take).
    written: moka::sync::Cache<Box<str>, u64>,
    /// Hosts not cached for now (rollouts under way), until when.
    paused: std::sync::RwLock<Vec<(Purge, std::time::Instant)>>,
    any_paused: std::sync::atomic::AtomicBool,
    counters: Counters,
}

/// The first request for a key fills it; the others wait for that fill.
pub enum Turn {
    Lead(FillGuard),
    Wait(watch::Receiver<bool>),
}

/// Held by the request filling a key. Dropping it (the fill ended, well or
/// not) wakes the waiters.
pub struct FillGuard {
    cache: Arc<Cache>,
    key: Box<str>,
    done: watch::Sender<bool>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.cache.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
        let _ = self.done.send(true);
    }
}

struct Expiry;

impl moka::Expiry<Box<str>, Variants> for Expiry {
    fn expire_after_create(&self, _: &Box<str>, v: &Variants, now: std::time::Instant) -> Option<Duration> {
        keep_for(v, now)
    }
    fn expire_after_update(
        &self,
        _: &Box<str>,
        v: &Variants,
        now: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        keep_for(v, now)
    }
}

fn keep_for(v: &Variants, _: std::time::Instant) -> Option<Duration> {
    let until = v.iter().map(|o| o.keep_until()).max()?;
    Some(until.duration_since(SystemTime::now()).unwrap_or(Duration::from_secs(1)))
}

impl Cache {
    pub fn new(config: CacheConfig) -> std::io::Result<Arc<Cache>> {
        let disk = match &config.disk_dir {
            Some(dir) => Some(Arc::new(crate::disk::Disk::open(dir, config.disk_mb << 20)?)),
            None => None,
        };
        let objects = moka::sync::Cache::builder()
            .max_capacity(config.memory_mb << 20)
            .weigher(|_k, v: &Variants| v.iter().map(|o| o.weight()).fold(0u32, |a, b| a.saturating_add(b)))
            .expire_after(Expiry)
            .build();
        Ok(Arc::new(Cache {
            config,
            objects,
            disk,
            inflight: Mutex::new(HashMap::new()),
            uncacheable: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(UNCACHEABLE_FOR).build(),
            changes: Default::default(),
            written: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(WRITTEN_FOR).build(),
            paused: Default::default(),
            any_paused: Default::default(),
            counters: Counters::default(),
        }))
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Whether stored objects of text-like types are kept gzipped too.
    pub fn compresses(&self) -> bool {
        self.config.compress
    }

    pub fn max_object_bytes(&self) -> usize {
        self.config.max_object_kb << 10
    }

    /// The stored response for `req` (a GET or HEAD; HEAD is answered from
    /// a stored GET), fresh or stale.
    pub fn lookup(&self, key: &str, req: &Lookup<'_>, now: SystemTime) -> Found {
        let variants = match self.objects.get(key) {
            Some(v) => v,
            // Not in memory: the disk tier may have it (then memory does).
            None => match self.disk.as_ref().and_then(|d| d.read(key)) {
                Some(list) if !list.is_empty() => {
                    let v: Variants = list.into();
                    self.objects.insert(key.into(), v.clone());
                    v
                }
                _ => return Found::Miss,
            },
        };
        let get = Lookup { method: &Method::GET, ..*req };
        // Newest variant first: a re-stored variant replaces its old self.
        for o in variants.iter().rev() {
            if o.plainly_fresh_for(&get, now) {
                return Found::Fresh(o.clone());
            }
            match o.policy.before_request(&get, now) {
                BeforeRequest::Fresh(_) if o.is_fresh(now) => return Found::Fresh(o.clone()),
                BeforeRequest::Stale { matches: false, .. } => continue,
                // Stale by the policy, or fresh by its whole seconds but
                // stale by ours.
                _ => return Found::Stale(o.clone()),
            }
        }
        Found::Miss
    }

    /// Stores `object` for `key`, replacing the variant with the same
    /// `Vary` values.
    pub fn store(&self, key: Box<str>, object: Arc<Object>) {
        let since = self.since();
        self.store_at(key, object, since);
    }

    /// Stores `object`, its disk copy only if nothing changed since `since`.
    fn store_at(&self, key: Box<str>, object: Arc<Object>, since: Since) {
        self.uncacheable.invalidate(&key);
        let old = self.objects.get(&key);
        let mut list: Vec<Arc<Object>> =
            old.iter().flat_map(|v| v.iter()).filter(|o| o.vary_key != object.vary_key).cloned().collect();
        list.push(object);
        if list.len() > MAX_VARIANTS {
            list.drain(..list.len() - MAX_VARIANTS);
        }
        self.write_disk(&key, &list, since);
        self.objects.insert(key, list.into());
    }

    /// The counts a fill starts from.
    pub fn since(&self) -> Since {
        *self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a purge or relabel; returns the counts with it.
    fn count_purge(&self) -> Since {
        let mut now = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        now.purges += 1;
        *now
    }

    /// Stores `object` unless a purge, relabel or write of `key` began
    /// since `since` (then its answer may be what that was for); says
    /// whether it did. Under the counts' lock: a store either ends before
    /// a change is counted (and the change then finds the object) or sees
    /// it.
    pub fn store_unless_changed(&self, key: Box<str>, object: Arc<Object>, since: Since) -> bool {
        let now = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        if !unchanged(&now, &self.written, &key, since) {
            return false;
        }
        self.store_at(key, object, since);
        drop(now);
        true
    }

    /// Writes `key`'s variants to the disk tier, off the request's thread
    /// when there is a runtime.
    /// A write that lands after a purge, relabel or write of `key` began
    /// since `since` is dropped: it may have looked for the key before the
    /// file was there.
    fn write_disk(&self, key: &str, list: &[Arc<Object>], since: Since) {
        let Some(disk) = self.disk.clone() else { return };
        let (key, list): (Box<str>, Vec<Arc<Object>>) = (key.into(), list.to_vec());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let (changes, written) = (self.changes.clone(), self.written.clone());
                rt.spawn_blocking(move || {
                    disk.write_if(&key, &list, || {
                        let now = changes.lock().unwrap_or_else(|e| e.into_inner());
                        unchanged(&now, &written, &key, since).then_some(now)
                    })
                });
            }
            // In line, in its caller's order (which may hold the count's
            // lock already).
            Err(_) => disk.write(&key, &list),
        }
    }

    /// Remembers that `key`'s answer could not be stored.
    pub fn mark_uncacheable(&self, key: &str) {
        self.uncacheable.insert(key.into(), ());
    }

    /// Was `key`'s last answer one that could not be stored?
    pub fn is_uncacheable(&self, key: &str) -> bool {
        self.uncacheable.contains_key(key)
    }

    /// Forgets everything stored under `key` (a successful unsafe request
    /// to it: RFC 9111 §4.4).
    pub fn invalidate(&self, key: &str) {
        {
            let mut now = self.changes.lock().unwrap_or_else(|e| e.into_inner());
            now.writes += 1;
            self.written.insert(key.into(), now.writes);
        }
        self.objects.invalidate(key);
        if let Some(d) = &self.disk {
            d.remove(key);
        }
    }

    /// Stops (`Some(n > 0)`: for n ms) or restarts (`Some(0)`) caching the
    /// hosts `p` names.
    pub fn pause(&self, p: &Purge) {
        let Some(ms) = p.pause_ms else { return };
        let scope = |x: &Purge| (x.hosts.clone(), x.any_host_but.clone());
        let mut paused = self.paused.write().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        paused.retain(|(q, until)| *until > now && scope(q) != scope(p));
        if ms > 0 {
            paused.push((
                Purge { hosts: p.hosts.clone(), any_host_but: p.any_host_but.clone(), ..Default::default() },
                now + Duration::from_millis(ms),
            ));
        }
        self.any_paused.store(!paused.is_empty(), Relaxed);
    }

    /// Is caching of `host` paused?
    pub fn paused(&self, host: &str) -> bool {
        if !self.any_paused.load(Relaxed) {
            return false;
        }
        let now = std::time::Instant::now();
        self.paused
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(p, until)| *until > now && p.covers_host(host))
    }

    /// Labels the objects of `p`'s hosts that carry `x-meridian-version:
    /// from` with `to` (a rollout ended and purged what it changed: the
    /// rest is the same in both versions). Returns how many.
    pub fn relabel(&self, p: &Purge) -> u64 {
        let Some(r) = &p.relabel else { return 0 };
        let since = self.count_purge();
        let (Ok(from), Ok(to)) = (HeaderValue::from_str(&r.from), HeaderValue::from_str(&r.to)) else { return 0 };
        let covered = |k: &str| split_key(k).is_some_and(|(host, _)| p.covers_host(host));
        let mut n = 0;
        for (k, variants) in self.objects.iter() {
            if covered(&k) {
                if let Some(list) = relabeled(&variants, &from, &to, &mut n) {
                    self.write_disk(&k, &list, since);
                    self.objects.insert((*k).clone(), list.into());
                }
            }
        }
        // What only the disk tier holds is relabelled there.
        if let Some(d) = &self.disk {
            for (k, _) in d.keys() {
                if covered(&k) && !self.objects.contains_key(&**k) {
                    if let Some(list) = d.read(&k).and_then(|v| relabeled(&v, &from, &to, &mut n)) {
                        d.write(&k, &list);
                    }
                }
            }
        }
        n
    }

    /// Removes what `p` names; returns how many objects went (a URL only
    /// the disk tier holds counts once).
    pub fn purge(&self, p: &Purge) -> u64 {
        self.count_purge();
        let doomed: HashMap<Arc<Box<str>>, usize> = self
            .objects
            .iter()
            .filter(|(k, v)| {
                split_key(k).is_some_and(|(host, path)| p.reaches(host, path, |t| v.iter().any(|o| o.has_tag(t))))
            })
            .map(|(k, v)| (k, v.len()))
            .collect();
        let mut removed = 0u64;
        for (k, n) in &doomed {
            self.objects.invalidate(&***k);
            removed += *n as u64;
        }
        // The disk tier holds more than memory: what only it has goes too.
        if let Some(d) = &self.disk {
            for (k, e) in d.keys() {
                let tagged = |t: &str| e.tags.iter().any(|x| &**x == t);
                if split_key(&k).is_some_and(|(host, path)| p.reaches(host, path, tagged)) {
                    if !doomed.contains_key(&k) {
                        removed += 1;
                    }
                    d.remove(&k);
                }
            }
        }
        self.counters.purged.fetch_add(removed, Relaxed);
        removed
    }

    /// Lead the fill of `key`, or wait for the one under way.
    pub fn join(self: &Arc<Self>, key: &str) -> Turn {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = inflight.get(key) {
            self.counters.coalesced.fetch_add(1, Relaxed);
            return Turn::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(false);
        inflight.insert(key.into(), rx);
        Turn::Lead(FillGuard { cache: self.clone(), key: key.into(), done: tx })
    }

    /// Counts what was done for a request that was served.
    pub fn record(&self, outcome: Outcome, body_bytes: usize) {
        let c = &self.counters;
        match outcome {
            Outcome::Hit => c.hits.fetch_add(1, Relaxed),
            Outcome::Miss => c.misses.fetch_add(1, Relaxed),
            Outcome::Stale => c.stale.fetch_add(1, Relaxed),
            Outcome::Revalidated => c.revalidated.fetch_add(1, Relaxed),
            Outcome::Bypass => c.bypass.fetch_add(1, Relaxed),
        };
        if matches!(outcome, Outcome::Hit | Outcome::Stale | Outcome::Revalidated) {
            c.bytes_from_cache.fetch_add(body_bytes as u64, Relaxed);
        }
    }

    /// An answer sent gzipped: `saved` bytes fewer than the body.
    pub fn record_compressed(&self, saved: usize) {
        self.counters.compressed.fetch_add(1, Relaxed);
        self.counters.compression_saved.fetch_add(saved as u64, Relaxed);
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let (disk_entries, disk_bytes) = self.disk.as_ref().map_or((0, 0), |d| d.usage());
        self.objects.run_pending_tasks();
        CacheStats {
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            stale: c.stale.load(Relaxed),
            revalidated: c.revalidated.load(Relaxed),
            bypass: c.bypass.load(Relaxed),
            coalesced: c.coalesced.load(Relaxed),
            purged: c.purged.load(Relaxed),
            bytes_from_cache: c.bytes_from_cache.load(Relaxed),
            compressed: c.compressed.load(Relaxed),
            compression_saved_bytes: c.compression_saved.load(Relaxed),
            objects: self.objects.iter().map(|(_, v)| v.len() as u64).sum(),
            bytes_stored: self.objects.weighted_size(),
            disk_entries,
            disk_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "app.example";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        if !h.contains_key(header::HOST) {
            h.insert(header::HOST, HeaderValue::from_static(HOST));
        }
        h
    }

    #[test]
    fn if_range_applies_a_range_only_to_the_representation_the_client_holds() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let lm = httpdate::fmt_http_date(t0);
        let rh = headers(&[]);
        let object = |status: u16, etag: &str| {
            let resp = headers(&[("cache-control", "max-age=60"), ("etag", etag), ("last-modified", &lm)]);
            Object::new(
                &lookup("/x", &rh),
                StatusCode::from_u16(status).unwrap(),
                &resp,
                Bytes::from_static(b"body"),
                t0,
            )
            .unwrap()
        };
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        let range = v("bytes=1-2");
        let strong = object(200, "\"v1\"");
        assert_eq!(strong.range(Some(&range), None), RangeAnswer::Partial(1..3));
        assert_eq!(strong.range(None, None), RangeAnswer::Full);
        assert_eq!(strong.range(Some(&range), Some(&v("\"v1\""))), RangeAnswer::Partial(1..3));
        assert_eq!(strong.range(Some(&range), Some(&v("\"v0\""))), RangeAnswer::Full);
        assert_eq!(strong.range(Some(&range), Some(&v("W/\"v1\""))), RangeAnswer::Full, "weak never matches");
        assert_eq!(strong.range(Some(&range), Some(&v(&lm))), RangeAnswer::Partial(1..3));
        let earlier = httpdate::fmt_http_date(t0 - Duration::from_secs(1));
        assert_eq!(strong.range(Some(&range), Some(&v(&earlier))), RangeAnswer::Full);
        // A weak validator cannot vouch for bytes.
        let weak = object(200, "W/\"v1\"");
        assert_eq!(weak.range(Some(&range), Some(&v("W/\"v1\""))), RangeAnswer::Full);
        // Only a 200 is split.
        let moved = object(301, "\"v1\"");
        assert_eq!(moved.range(Some(&range), None), RangeAnswer::Full);
    }

    fn lookup<'a>(path: &'a str, h: &'a HeaderMap) -> Lookup<'a> {
        Lookup { path_and_query: path, method: &Method::GET, headers: h }
    }

    /// Stores the answer `resp` to a GET of `/x` with `req` headers at `t0`;
    /// whether it was storable.
    fn put(cache: &Cache, req: &[(&str, &str)], status: u16, resp: &[(&str, &str)], t0: SystemTime) -> bool {
        let rh = headers(req);
        let status = StatusCode::from_u16(status).unwrap();
        match Object::new(&lookup("/x", &rh), status, &headers(resp), Bytes::from_static(b"body"), t0) {
            Some(o) => {
                cache.store(key(HOST, "/x"), Arc::new(o));
                true
            }
            None => false,
        }
    }

    /// RFC 9111 §5.2: directive names are case-insensitive (issue 28), in
    /// `Cache-Control` and in the field that replaces it here.
    #[test]
    fn cache_directive_names_are_case_insensitive_rfc_9111_5_2() {
        let t0 = SystemTime::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let rows: &[(&str, &[(&str, &str)], bool, &[(u64, bool)])] = &[
            ("MaX-AgE", &[("cache-control", "MaX-AgE=10")], true, &[(5, true), (11, false)]),
            ("S-MAXAGE wins", &[("cache-control", "max-age=100, S-MAXAGE=5")], true, &[(4, true), (6, false)]),
            ("No-StOrE", &[("cache-control", "max-age=100, No-StOrE")], false, &[]),
            ("PRIVATE", &[("cache-control", "PRIVATE, max-age=100")], false, &[]),
            (
                "No-CaChE revalidates",
                &[("cache-control", "No-CaChE, max-age=100"), ("etag", "\"a\"")],
                true,
                &[(1, false)],
            ),
            ("CDN-Cache-Control MAX-AGE", &[("cdn-cache-control", "MAX-AGE=20")], true, &[(10, true), (21, false)]),
        ];
        for (name, resp, stored, seen_at) in rows {
            let cache = Cache::new(CacheConfig::default()).unwrap();
            assert_eq!(put(&cache, &[], 200, resp, t0), *stored, "{name}: stored");
            for (t, fresh) in *seen_at {
                assert_eq!(seen(&cache, &[], at(*t)) == Seen::Fresh, *fresh, "{name} at {t} s: fresh");
            }
        }
        assert_eq!(fold_directive_names("MaX-AgE=10 , Public,,x=\"AbC\""), "max-age=10, public, x=\"AbC\"");
    }

    #[derive(Debug, PartialEq, Clone, Copy)]
    enum Seen {
        Fresh,
        Stale,
        Miss,
    }

    fn seen(cache: &Cache, req: &[(&str, &str)], now: SystemTime) -> Seen {
        let rh = headers(req);
        match cache.lookup(&key(HOST, "/x"), &lookup("/x", &rh), now) {
            Found::Fresh(_) => Seen::Fresh,
            Found::Stale(_) => Seen::Stale,
            Found::Miss => Seen::Miss,
        }
    }

    fn http_date(t: SystemTime) -> String {
        httpdate::fmt_http_date(t)
    }

    /// One row per rule of RFC 9111 (and 9213) a shared cache applies:
    /// what is stored, and what a lookup finds after so many seconds.
    #[test]
    fn freshness_and_storability_follow_rfc_9111() {
        let t0 = SystemTime::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let past = http_date(t0 - Duration::from_secs(3600));
        let in_30 = http_date(at(30));
        type Row<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, Vec<(&'a str, String)>, bool, Vec<(u64, Seen)>);
        let rows: Vec<Row> = vec![
            (
                "max-age",
                vec![],
                200,
                vec![("cache-control", "max-age=10".into())],
                true,
                vec![(0, Seen::Fresh), (9, Seen::Fresh), (11, Seen::Miss)],
            ),
            (
                "s-maxage wins over max-age in a shared cache",
                vec![],
                200,
                vec![("cache-control", "max-age=100, s-maxage=5".into())],
                true,
                vec![(4, Seen::Fresh), (6, Seen::Miss)],
            ),
            (
                "Expires",
                vec![],
                200,
                vec![("expires", in_30.clone()), ("date", http_date(t0))],
                true,
                vec![(20, Seen::Fresh), (40, Seen::Miss)],
            ),
            (
                "max-age wins over Expires",
                vec![],
                200,
                vec![("cache-control", "max-age=5".into()), ("expires", in_30.clone())],
                true,
                vec![(6, Seen::Miss)],
            ),
            (
                "an Expires in the past is stale at once",
                vec![],
                200,
                vec![("expires", past.clone()), ("etag", "\"a\"".into())],
                true,
                vec![(0, Seen::Stale)],
            ),
            (
                "CDN-Cache-Control replaces Cache-Control here",
                vec![],
                200,
                vec![("cache-control", "no-store".into()), ("cdn-cache-control", "max-age=20".into())],
                true,
                vec![(10, Seen::Fresh), (21, Seen::Miss)],
            ),
            (
                "no-store",
                vec![],
                200,
                vec![("cache-control", "no-store, max-age=60".into())],
                false,
                vec![(0, Seen::Miss)],
            ),
            (
                "private is not for a shared cache",
                vec![],
                200,
                vec![("cache-control", "private, max-age=60".into())],
                false,
                vec![(0, Seen::Miss)],
            ),
            (
                "a request with Authorization is not stored",
                vec![("authorization", "Bearer x")],
                200,
                vec![("cache-control", "max-age=60".into())],
                false,
                vec![],
            ),
            (
                "unless the answer says public",
                vec![("authorization", "Bearer x")],
                200,
                vec![("cache-control", "public, max-age=60".into())],
                true,
                vec![(1, Seen::Fresh)],
            ),
            (
                "Set-Cookie is never stored",
                vec![],
                200,
                vec![("cache-control", "public, max-age=60".into()), ("set-cookie", "a=b".into())],
                false,
                vec![],
            ),
            ("no freshness and no validator: useless, not stored", vec![], 200, vec![], false, vec![]),
            (
                "no-cache with a validator: stored, always revalidated",
                vec![],
                200,
                vec![("cache-control", "no-cache".into()), ("etag", "\"v1\"".into())],
                true,
                vec![(0, Seen::Stale)],
            ),
            (
                "heuristic freshness from Last-Modified (10 % of its age)",
                vec![],
                200,
                vec![("last-modified", http_date(t0 - Duration::from_secs(1000))), ("date", http_date(t0))],
                true,
                vec![(50, Seen::Fresh), (150, Seen::Stale)],
            ),
            (
                "404 with max-age is stored",
                vec![],
                404,
                vec![("cache-control", "max-age=10".into())],
                true,
                vec![(5, Seen::Fresh)],
            ),
            ("206 is not understood", vec![], 206, vec![("cache-control", "max-age=10".into())], false, vec![]),
            (
                "Vary: * never matches, so it is not worth storing",
                vec![],
                200,
                vec![("cache-control", "max-age=10".into()), ("vary", "*".into())],
                false,
                vec![(0, Seen::Miss)],
            ),
            (
                "a client's no-cache does not bypass the edge",
                vec![("cache-control", "no-cache"), ("pragma", "no-cache")],
                200,
                vec![("cache-control", "max-age=10".into())],
                true,
                vec![(1, Seen::Fresh)],
            ),
        ];
        for (name, req, status, resp, storable, checks) in rows {
            let cache = Cache::new(CacheConfig::default()).unwrap();
            let resp: Vec<(&str, &str)> = resp.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(put(&cache, &req, status, &resp, t0), storable, "{name}: storable");
            // The edge strips the client's own directives before a lookup.
            let lookup_req: Vec<_> =
                req.iter().copied().filter(|(k, _)| *k != "cache-control" && *k != "pragma").collect();
            for (secs, want) in checks {
                let got = seen(&cache, &lookup_req, at(secs));
                // An expired object without stale windows or validator may
                // linger until evicted; a lookup must not call it fresh.
                let got = if want == Seen::Miss && got == Seen::Stale { Seen::Miss } else { got };
                assert_eq!(got, want, "{name}: after {secs} s");
            }
        }
    }

    #[test]
    fn the_quick_freshness_check_never_says_fresh_where_the_policy_would_not() {
        let t0 = SystemTime::now();
        let rh = headers(&[("accept-language", "fr")]);
        let resp = headers(&[("cache-control", "max-age=60"), ("vary", "Accept-Language")]);
        let o = Object::new(&lookup("/x", &rh), StatusCode::OK, &resp, Bytes::from_static(b"b"), t0).unwrap();
        let policy_fresh = |req: &HeaderMap, now| {
            matches!(o.policy.before_request(&lookup("/x", req), now), BeforeRequest::Fresh(_)) && o.is_fresh(now)
        };
        let cases: [(&str, HeaderMap, SystemTime, bool); 7] = [
            ("the same request, fresh", rh.clone(), t0 + Duration::from_secs(1), true),
            ("the same request, expired", rh.clone(), t0 + Duration::from_secs(61), false),
            ("another Vary value", headers(&[("accept-language", "de")]), t0, false),
            ("no Vary value", headers(&[]), t0, false),
            ("another Host", headers(&[("accept-language", "fr"), ("host", "other.example")]), t0, false),
            (
                "the client's own max-age=0",
                headers(&[("accept-language", "fr"), ("cache-control", "max-age=0")]),
                t0 + Duration::from_secs(2),
                false,
            ),
            ("the client's Pragma", headers(&[("accept-language", "fr"), ("pragma", "no-cache")]), t0, false),
        ];
        for (name, req, now, want) in cases {
            let quick = o.plainly_fresh_for(&lookup("/x", &req), now);
            assert_eq!(quick, want, "{name}");
            // Whenever the quick check says fresh, the policy agrees.
            assert!(!quick || policy_fresh(&req, now), "{name}: quick says fresh, the policy does not");
        }
        // An answer that must always be revalidated (no-cache) is never
        // plainly fresh, not even at the instant it was stored.
        let no_cache = headers(&[("cache-control", "no-cache"), ("etag", "\"v\"")]);
        let o = Object::new(&lookup("/x", &rh), StatusCode::OK, &no_cache, Bytes::from_static(b"b"), t0).unwrap();
        assert!(!o.plainly_fresh_for(&lookup("/x", &rh), t0));
    }

    #[test]
    fn vary_keeps_one_variant_per_request_header_value() {
        let t0 = SystemTime::now();
        let cache = Cache::new(CacheConfig::default()).unwrap();
        let resp = [("cache-control", "max-age=60"), ("vary", "Accept-Language")];
        assert!(put(&cache, &[("accept-language", "fr")], 200, &resp, t0));
        assert_eq!(seen(&cache, &[("accept-language", "fr")], t0), Seen::Fresh);
        assert_eq!(seen(&cache, &[("accept-language", "de")], t0), Seen::Miss);
        assert_eq!(seen(&cache, &[], t0), Seen::Miss);
        assert!(put(&cache, &[("accept-language", "de")], 200, &resp, t0));
        assert_eq!(seen(&cache, &[("accept-language", "fr")], t0), Seen::Fresh);
        assert_eq!(seen(&cache, &[("accept-language", "de")], t0), Seen::Fresh);
        // Storing fr again replaces fr, not adds a third.
        assert!(put(&cache, &[("accept-language", "fr")], 200, &resp, t0));
        assert_eq!(cache.objects.get(&*key(HOST, "/x")).unwrap().len(), 2);
    }

    #[test]
    fn age_counts_upstream_age_and_time_held() {
        let t0 = SystemTime::now();
        let cache = Cache::new(CacheConfig::default()).unwrap();
        assert!(put(&cache, &[], 200, &[("cache-control", "max-age=60"), ("age", "7")], t0));
        let rh = headers(&[]);
        let Found::Fresh(o) = cache.lookup(&key(HOST, "/x"), &lookup("/x", &rh), t0 + Duration::from_secs(10)) else {
            panic!("fresh")
        };
        assert_eq!(o.response_headers(t0 + Duration::from_secs(10))[header::AGE], "17");
        // Fresh for 60 s of age, so 53 s after storing it is stale.
        assert_eq!(seen(&cache, &[], t0 + Duration::from_secs(52)), Seen::Fresh);
        assert_ne!(seen(&cache, &[], t0 + Duration::from_secs(54)), Seen::Fresh);
    }

    #[test]
    fn a_304_revalidates_keeps_the_body_and_restarts_freshness() {
        let t0 = SystemTime::now();
        let rh = headers(&[]);
        let resp = headers(&[("cache-control", "max-age=10"), ("etag", "\"v1\""), ("x-old", "1")]);
        let o = Object::new(&lookup("/x", &rh), StatusCode::OK, &resp, Bytes::from_static(b"body"), t0).unwrap();
        let later = t0 + Duration::from_secs(30);
        assert!(!o.is_fresh(later));
        let v: Vec<_> = o.validators().collect();
        assert_eq!(v, vec![(header::IF_NONE_MATCH, HeaderValue::from_static("\"v1\""))]);
        let nm = headers(&[("cache-control", "max-age=100"), ("etag", "\"v1\""), ("x-old", "2")]);
        assert!(o.confirmed_by(&nm));
        let n = o.revalidated(&lookup("/x", &rh), &nm, later).unwrap();
        assert!(n.is_fresh(later + Duration::from_secs(99)));
        assert_eq!(n.body, "body");
        assert_eq!(n.response_headers(later)["x-old"], "2");
        // A 304 with another strong validator confirms nothing.
        assert!(!o.confirmed_by(&headers(&[("etag", "\"v2\"")])));
    }

    #[test]
    fn the_edge_answers_a_clients_conditional_itself() {
        let t0 = SystemTime::now();
        let rh = headers(&[]);
        let lm = http_date(t0 - Duration::from_secs(100));
        let resp = headers(&[("cache-control", "max-age=10"), ("etag", "W/\"v1\""), ("last-modified", &lm)]);
        let o = Object::new(&lookup("/x", &rh), StatusCode::OK, &resp, Bytes::new(), t0).unwrap();
        assert!(o.satisfies_conditional(&headers(&[("if-none-match", "\"x\", \"v1\"")])));
        assert!(o.satisfies_conditional(&headers(&[("if-none-match", "*")])));
        assert!(!o.satisfies_conditional(&headers(&[("if-none-match", "\"v2\"")])));
        assert!(o.satisfies_conditional(&headers(&[("if-modified-since", &http_date(t0))])));
        assert!(!o.satisfies_conditional(&headers(&[("if-modified-since", &http_date(t0 - Duration::from_secs(200)))])));
        // If-None-Match decides when both are present.
        assert!(
            !o.satisfies_conditional(&headers(&[("if-none-match", "\"v2\""), ("if-modified-since", &http_date(t0))]))
        );
        assert!(!o.satisfies_conditional(&headers(&[])));
    }

    #[test]
    fn stale_windows_follow_rfc_5861_unless_revalidation_is_required() {
        let t0 = SystemTime::now();
        let rh = headers(&[]);
        let at = |s| t0 + Duration::from_secs(s);
        let make = |cc: &str| {
            let resp = headers(&[("cache-control", cc), ("etag", "\"v\"")]);
            Object::new(&lookup("/x", &rh), StatusCode::OK, &resp, Bytes::new(), t0).unwrap()
        };
        let o = make("max-age=10, stale-while-revalidate=20, stale-if-error=100");
        assert!(!o.serve_while_revalidating(at(5)), "fresh: no need");
        assert!(o.serve_while_revalidating(at(25)));
        assert!(!o.serve_while_revalidating(at(35)));
        assert!(o.serve_on_error(at(105)));
        assert!(!o.serve_on_error(at(115)));
        for cc in
            ["max-age=10, stale-if-error=100, must-revalidate", "max-age=10, stale-while-revalidate=100, no-cache"]
        {
            let o = make(cc);
            assert!(!o.serve_on_error(at(11)), "{cc}");
            assert!(!o.serve_while_revalidating(at(11)), "{cc}");
        }
    }

    #[test]
    fn tags_come_from_surrogate_key_and_cache_tag_and_never_reach_clients() {
        let t0 = SystemTime::now();
        let rh = headers(&[]);
        let resp = headers(&[("cache-control", "max-age=60"), ("surrogate-key", "a b"), ("cache-tag", "c, d")]);
        let o = Object::new(&lookup("/x", &rh), StatusCode::OK, &resp, Bytes::new(), t0).unwrap();
        for t in ["a", "b", "c", "d"] {
            assert!(o.has_tag(t), "{t}");
        }
        let out = o.response_headers(t0);
        assert!(!out.contains_key("surrogate-key") && !out.contains_key("cache-tag"));
    }

    #[test]
    fn purge_by_path_prefix_tag_and_all_stays_within_the_hosts_named() {
        let t0 = SystemTime::now();
        let cache = Cache::new(CacheConfig::default()).unwrap();
        let store = |host: &str, path: &str, tag: &str| {
            let rh = headers(&[("host", host)]);
            let resp = headers(&[("cache-control", "max-age=60"), ("cache-tag", tag)]);
            let o = Object::new(&lookup(path, &rh), StatusCode::OK, &resp, Bytes::new(), t0).unwrap();
            cache.store(key(host, path), Arc::new(o));
        };
        for host in ["a.example", "b.example"] {
            store(host, "/index.html", "home");
            store(host, "/img/1.png", "img");
            store(host, "/img/2.png", "img");
            store(host, "/api/x", "api");
        }
        let only_a = |f: fn(&mut Purge)| {
            let mut p = Purge { hosts: vec!["a.example".into()], ..Default::default() };
            f(&mut p);
            p
        };
        assert_eq!(cache.purge(&only_a(|p| p.paths = vec!["/index.html".into()])), 1);
        assert_eq!(cache.purge(&only_a(|p| p.prefixes = vec!["/img/".into()])), 2);
        assert_eq!(cache.purge(&only_a(|p| p.tags = vec!["api".into()])), 1);
        assert_eq!(cache.purge(&only_a(|p| p.all = true)), 0);
        // b.example kept everything.
        assert_eq!(
            cache.purge(&Purge { hosts: vec!["b.example".into()], tags: vec!["img".into()], ..Default::default() }),
            2
        );
        assert_eq!(cache.purge(&Purge { hosts: vec!["b.example".into()], all: true, ..Default::default() }), 2);
        assert_eq!(cache.stats().purged, 8);
    }

    #[test]
    fn pinned_objects_are_purged_with_their_host_and_a_rollouts_end_relabels_what_stayed() {
        let t0 = SystemTime::now();
        let cache = Cache::new(CacheConfig::default()).unwrap();
        let rh = headers(&[]);
        for (k, version) in [(key(HOST, "/a"), "v1"), (pinned_key(HOST, "eu", "/a"), "v1"), (key(HOST, "/b"), "v0")] {
            let resp = headers(&[("cache-control", "max-age=60"), ("x-meridian-version", version)]);
            let o = Object::new(&lookup("/a", &rh), StatusCode::OK, &resp, Bytes::new(), t0).unwrap();
            cache.store(k, Arc::new(o));
        }
        let relabel = Purge {
            hosts: vec![HOST.into()],
            relabel: Some(meridian_core::wire::Relabel { from: "v1".into(), to: "v2".into() }),
            ..Default::default()
        };
        assert_eq!(cache.relabel(&relabel), 2);
        let a = cache.objects.get(&*pinned_key(HOST, "eu", "/a")).unwrap();
        assert_eq!(a[0].header("x-meridian-version"), Some("v2"));
        assert_eq!(cache.objects.get(&*key(HOST, "/b")).unwrap()[0].header("x-meridian-version"), Some("v0"));
        // A purge by path reaches the path's pinned copies too.
        let path = Purge { hosts: vec![HOST.into()], paths: vec!["/a".into()], ..Default::default() };
        assert_eq!(cache.purge(&path), 2);
        let all = Purge { hosts: vec![HOST.into()], all: true, ..Default::default() };
        assert_eq!(cache.purge(&all), 1);
    }

    #[test]
    fn a_paused_host_is_not_cached_until_resumed_or_the_pause_ends() {
        let cache = Cache::new(CacheConfig::default()).unwrap();
        assert!(!cache.paused(HOST));
        let mut p = Purge { hosts: vec![HOST.into()], pause_ms: Some(60_000), ..Default::default() };
        cache.pause(&p);
        assert!(cache.paused(HOST) && !cache.paused("other.example"));
        p.pause_ms = Some(0);
        cache.pause(&p);
        assert!(!cache.paused(HOST));
        p.pause_ms = Some(1);
        cache.pause(&p);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!cache.paused(HOST), "expired");
    }

    #[test]
    fn an_answer_fetched_before_a_purge_or_a_write_is_not_stored_after_it() {
        let cache = Cache::new(CacheConfig::default()).unwrap();
        let t0 = SystemTime::now();
        let rh = headers(&[]);
        let resp = headers(&[("cache-control", "max-age=300"), ("cache-tag", "page")]);
        let object =
            || Arc::new(Object::new(&lookup("/p", &rh), StatusCode::OK, &resp, Bytes::from("old"), t0).unwrap());
        let fresh = |cache: &Cache| matches!(cache.lookup(&key(HOST, "/p"), &lookup("/p", &rh), t0), Found::Fresh(_));
        // A fill begins, a purge (or a rollout's relabel) arrives while it
        // fetches, the fill ends: its answer is not stored.
        let purge = Purge { hosts: vec![HOST.into()], tags: vec!["page".into()], ..Default::default() };
        let relabel = Purge {
            hosts: vec![HOST.into()],
            relabel: Some(meridian_core::wire::Relabel { from: "v1".into(), to: "v2".into() }),
            ..Default::default()
        };
        for during in [&purge, &relabel] {
            let since = cache.since();
            if during.relabel.is_some() {
                cache.relabel(during);
            } else {
                cache.purge(during);
            }
            assert!(!cache.store_unless_changed(key(HOST, "/p"), object(), since));
            assert!(!fresh(&cache));
        }
        // So is one of a URL written (PUT, POST …) through this edge while
        // it was fetched; a fill of another URL is not held back by that.
        let since = cache.since();
        cache.invalidate(&key(HOST, "/p"));
        assert!(!cache.store_unless_changed(key(HOST, "/p"), object(), since));
        assert!(!fresh(&cache));
        assert!(cache.store_unless_changed(key(HOST, "/q"), object(), since));
        // A fill that began after them stores its answer...
        let since = cache.since();
        assert!(cache.store_unless_changed(key(HOST, "/p"), object(), since));
        assert!(fresh(&cache));
        // ...and one stored before a purge is what the purge removes.
        cache.purge(&purge);
        assert!(!fresh(&cache));
    }

    #[test]
    fn a_disk_write_that_a_purge_overtook_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let disk = crate::disk::Disk::open(&dir.path().join("disk"), 1 << 20).unwrap();
        let rh = headers(&[]);
        let resp = headers(&[("cache-control", "max-age=300")]);
        let o = Object::new(&lookup("/p", &rh), StatusCode::OK, &resp, Bytes::from("old"), SystemTime::now()).unwrap();
        let o = Arc::new(o);
        // The purge count moved while the file was written: nothing lands,
        // not even the temporary file.
        disk.write_if("k", std::slice::from_ref(&o), || None::<()>);
        assert!(disk.read("k").is_none());
        assert_eq!(std::fs::read_dir(dir.path().join("disk")).unwrap().count(), 0);
        disk.write_if("k", &[o], || Some(()));
        assert_eq!(disk.read("k").expect("written")[0].body, "old");
    }

    #[test]
    fn the_gzipped_form_is_kept_through_the_disk_tier_and_revalidation() {
        let dir = tempfile::tempdir().unwrap();
        let config = CacheConfig { disk_dir: Some(dir.path().join("disk")), ..Default::default() };
        let cache = Cache::new(config).unwrap();
        let t0 = SystemTime::now();
        let rh = headers(&[]);
        let resp = headers(&[("cache-control", "max-age=10"), ("etag", "\"v1\""), ("content-type", "text/css")]);
        let body = Bytes::from("body { margin: 0 }\n".repeat(100));
        let mut o = Object::new(&lookup("/x.css", &rh), StatusCode::OK, &resp, body.clone(), t0).unwrap();
        o.gzip = crate::compress::gzip(&body);
        let gz = o.gzip.clone().expect("css compresses");
        let weight = o.weight();
        cache.store(key(HOST, "/x.css"), Arc::new(o));
        // Out of memory, back from disk with both forms.
        cache.objects.invalidate_all();
        cache.objects.run_pending_tasks();
        let Found::Fresh(o) = cache.lookup(&key(HOST, "/x.css"), &lookup("/x.css", &rh), t0) else {
            panic!("lost on disk")
        };
        assert_eq!((&o.body, o.gzip.as_ref()), (&body, Some(&gz)));
        assert!(weight as usize > body.len() + gz.len(), "both forms are weighed");
        // A 304 keeps the body, so the gzipped form too...
        let later = t0 + Duration::from_secs(30);
        let nm = headers(&[("cache-control", "max-age=100"), ("etag", "\"v1\"")]);
        assert_eq!(o.revalidated(&lookup("/x.css", &rh), &nm, later).unwrap().gzip, Some(gz));
        // ...unless the region now says not to transform it.
        let nm = headers(&[("cache-control", "max-age=100, no-transform"), ("etag", "\"v1\"")]);
        assert_eq!(o.revalidated(&lookup("/x.css", &rh), &nm, later).unwrap().gzip, None);
    }

    #[test]
    fn the_disk_tier_keeps_what_memory_cannot_and_purges_reach_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = CacheConfig { disk_dir: Some(dir.path().join("disk")), memory_mb: 1, ..Default::default() };
        let cache = Cache::new(config.clone()).unwrap();
        let t0 = SystemTime::now();
        let rh = headers(&[]);
        // 64 objects of 64 KiB: four times what memory holds.
        for i in 0..64 {
            let resp = headers(&[
                ("cache-control", "max-age=60"),
                ("cache-tag", if i % 2 == 0 { "even" } else { "odd" }),
                ("x-meridian-version", "v1"),
            ]);
            let body = Bytes::from(vec![i as u8; 64 << 10]);
            let path = format!("/f{i}");
            let o = Object::new(&lookup(&path, &rh), StatusCode::OK, &resp, body, t0).unwrap();
            cache.store(key(HOST, &path), Arc::new(o));
        }
        cache.objects.run_pending_tasks();
        assert!(cache.objects.entry_count() < 64, "memory is bounded");
        assert_eq!(cache.stats().disk_entries, 64);
        for i in 0..64 {
            let path = format!("/f{i}");
            match cache.lookup(&key(HOST, &path), &lookup(&path, &rh), t0) {
                Found::Fresh(o) => assert_eq!(o.body[0], i as u8, "{path}"),
                _ => panic!("{path} lost"),
            }
        }
        let purge = Purge { hosts: vec![HOST.into()], tags: vec!["odd".into()], ..Default::default() };
        cache.purge(&purge);
        cache.objects.run_pending_tasks();
        for i in 0..64 {
            let path = format!("/f{i}");
            let found = !matches!(cache.lookup(&key(HOST, &path), &lookup(&path, &rh), t0), Found::Miss);
            assert_eq!(found, i % 2 == 0, "{path}");
        }
        // A rollout's end relabels what stayed, in memory and on disk alike.
        let relabel = Purge {
            hosts: vec![HOST.into()],
            relabel: Some(meridian_core::wire::Relabel { from: "v1".into(), to: "v2".into() }),
            ..Default::default()
        };
        assert_eq!(cache.relabel(&relabel), 32);
        cache.objects.invalidate_all();
        cache.objects.run_pending_tasks();
        for i in (0..64).step_by(2) {
            let path = format!("/f{i}");
            match cache.lookup(&key(HOST, &path), &lookup(&path, &rh), t0) {
                Found::Fresh(o) => assert_eq!(o.header("x-meridian-version"), Some("v2"), "{path}"),
                _ => panic!("{path} lost"),
            }
        }
        drop(cache);
        // A new edge starts empty.
        let cache = Cache::new(config).unwrap();
        assert_eq!(cache.stats().disk_entries, 0);
        assert!(matches!(cache.lookup(&key(HOST, "/f0"), &lookup("/f0", &rh), t0), Found::Miss));
        assert_eq!(std::fs::read_dir(dir.path().join("disk")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn one_fill_per_key_and_the_waiters_wake_when_it_ends() {
        let cache = Cache::new(CacheConfig::default()).unwrap();
        let Turn::Lead(guard) = cache.join("k") else { panic!("first leads") };
        let mut waiters = Vec::new();
        for _ in 0..100 {
            match cache.join("k") {
                Turn::Wait(rx) => waiters.push(rx),
                Turn::Lead(_) => panic!("a second leader"),
            }
        }
        assert!(matches!(cache.join("other"), Turn::Lead(_)));
        drop(guard);
        for mut w in waiters {
            w.wait_for(|d| *d).await.unwrap();
        }
        assert!(matches!(cache.join("k"), Turn::Lead(_)), "the key is free again");
        assert_eq!(cache.stats().coalesced, 100);
    }
}
