//! The edge router: terminates user HTTP (HTTP/1.1 and h2c) and forwards each
//! request to the best healthy region, retrying on the next one when a region
//! fails.
//!
//! Request phases, in order: locate the client ([`Edge::locate`]), rank the
//! regions ([`select::rank`]), buffer the body so it can be replayed, then try
//! regions in rank order until one answers. What counts as a failure and what
//! may be retried:
//!
//! * could not connect, or the connection broke before a response head:
//!   the region is ejected at once; retried if the request is idempotent or
//!   the failure happened while connecting;
//! * a 5xx the region marked as its own failure (`x-meridian-fault:
//!   platform`): counted towards ejection; retried if idempotent;
//! * anything else the app answered — its own 5xx, or a fault of the app
//!   (deadline, memory limit, trap), or of a region it needed — is returned
//!   as is, sent to one region only and not counted against it: it would
//!   repeat in every region, and one app must not eject a region for all.
//!
//! Two doors: the public port carries user traffic only (nothing under
//! `/_meridian/` is forwarded or answered there: 404); the cluster port
//! (mutual TLS) answers the edge's status to the control plane and
//! operators. Every connection to a region is mutual TLS to the region's
//! cluster port, and the region must present its own certificate.
//!
//! Architecture invariant: the edge never interprets app responses beyond
//! status and the fault header, and never talks to the control plane; its
//! only knowledge of regions is its config and its own probes.

pub mod body;
pub mod budget;
pub mod cache;
pub mod compress;
pub mod disk;
pub mod health;
pub mod https;
pub mod limits;
mod names;
pub mod routing;
pub mod select;

use meridian_http::pool;
use meridian_trust::{Expect, Role, Tls, TlsFiles};

use bytes::Bytes;
use cache::{Cache, CacheConfig, Found, Lookup, Outcome, Turn};
use health::{HealthConfig, RegionHealth};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use meridian_core::{geo::country_centroid, headers, GeoPoint};
use meridian_http::{full, json, text, Body};
use select::{Candidate, Policy};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    pub name: String,
    /// User traffic (plain HTTP/1.1 and h2c).
    pub listen: SocketAddr,
    /// More addresses of the user port (same port as `listen`): an edge's
    /// own IPs, as GeoDNS answers them.
    #[serde(default)]
    pub also_listen_ips: Vec<IpAddr>,
    /// User traffic over TLS, certificates per hostname (`[https]`).
    #[serde(default)]
    pub https: Option<https::HttpsConfig>,
    /// Mutual TLS: the edge's status, for the control plane and operators.
    pub cluster_listen: SocketAddr,
    /// This edge's certificate; regions are reached with it.
    pub tls: TlsFiles,
    /// Where the edge is; clients that cannot be located are assumed near it.
    pub location: GeoPoint,
    /// The jurisdiction the edge is in: answers pinned to a jurisdiction
    /// (residency rules, pinned data) are cached only by its edges.
    #[serde(default)]
    pub jurisdiction: Option<String>,
    #[serde(default)]
    pub policy: Policy,
    /// Honour `x-meridian-client-geo` / `x-meridian-client-country` from
    /// clients. Only for edges behind something that sets them, and for tests.
    #[serde(default)]
    pub trust_client_geo_headers: bool,
    /// A MaxMind-format (GeoLite2/GeoIP2 City or Country) database.
    #[serde(default)]
    pub geoip_db: Option<PathBuf>,
    pub regions: Vec<RegionTarget>,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    /// How many retries the edge may add to its traffic.
    #[serde(default)]
    pub retry_budget: budget::BudgetConfig,
    /// Extra regions tried after the first one fails.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Time allowed for one region to produce a response head.
    #[serde(default = "default_upstream_timeout_ms")]
    pub upstream_timeout_ms: u64,
    /// For idempotent requests, which are retried elsewhere: time allowed
    /// for a region's response head before the next region is tried (a
    /// black-holed region costs this, not `upstream_timeout_ms`).
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Largest request body buffered for replay on another region.
    #[serde(default = "default_max_body_kb")]
    pub max_body_kb: usize,
    /// Threads serving the user ports, each with its own runtime, listener
    /// (`SO_REUSEPORT`) and connections to the regions (default: one per
    /// core).
    #[serde(default)]
    pub workers: Option<usize>,
}

impl EdgeConfig {
    /// How many worker threads serve the user ports.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(meridian_http::workers::default_count).max(1)
    }
}

fn default_max_retries() -> u32 {
    2
}
fn default_upstream_timeout_ms() -> u64 {
    30_000
}
fn default_first_byte_timeout_ms() -> u64 {
    5_000
}
fn default_max_body_kb() -> usize {
    8 * 1024
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionTarget {
    pub name: String,
    /// The region's cluster port, e.g. `https://10.0.1.7:7401`.
    pub url: String,
    pub location: GeoPoint,
    /// Its jurisdiction (as in its certificate), for residency rules.
    #[serde(default)]
    pub jurisdiction: Option<String>,
}

struct Upstream {
    target: RegionTarget,
    /// `Host` of every request to this region (its cluster address), made
    /// once rather than per request.
    host: HeaderValue,
    /// Connections to the region: one pool per worker thread (a connection
    /// is driven by a task of the runtime that opened it, so a worker uses
    /// only its own), and the last for every other thread (health probes).
    pools: Vec<Arc<pool::Pool>>,
    health: Mutex<RegionHealth>,
    /// Answers of this region passed on to clients.
    answered: std::sync::atomic::AtomicU64,
    /// Attempts here that failed over to another region, or failed.
    failed: std::sync::atomic::AtomicU64,
    /// Its location as a unit vector, for ranking without trigonometry.
    unit: meridian_core::geo::UnitVector,
    /// Hosts of the apps whose data this region is still catching up on
    /// after a restart, and whether the default app is one (its health
    /// probe says): their requests go elsewhere, every other app's stay.
    catching_up: arc_swap::ArcSwap<(Vec<String>, bool)>,
}

impl Upstream {
    /// This thread's pool of connections to the region.
    fn pool(&self) -> &Arc<pool::Pool> {
        let last = self.pools.len() - 1;
        &self.pools[meridian_http::workers::current().map_or(last, |i| i.min(last))]
    }
}

pub struct Edge {
    config: EdgeConfig,
    pub tls: Arc<Tls>,
    upstreams: Vec<Upstream>,
    geoip: Option<meridian_core::geoip::GeoDb>,
    edge_header: HeaderValue,
    /// Each app's rate, learned from the regions' health answers.
    limits: limits::AppLimits,
    /// Each app's routing, learned the same way.
    routes: routing::Routes,
    names: Vec<String>,
    jurisdictions: Vec<Option<String>>,
    pub cache: Arc<Cache>,
    budget: budget::RetryBudget,
    requests: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("region {name}: url {url:?} must look like https://host:port (the region's cluster port)")]
    BadUrl { name: String, url: String },
    #[error("certificates: {0}")]
    Trust(#[from] meridian_trust::TrustError),
    #[error("the certificate is for {found}, but this config is edge {name:?}: issue one with `meridian certs issue --role edge --name {name}`")]
    WrongIdentity { name: String, found: meridian_trust::Identity },
    #[error("cannot open GeoIP database {path}: {message}")]
    GeoIp { path: PathBuf, message: String },
    #[error("an edge needs at least one region")]
    NoRegions,
    #[error("cannot use {path} for the cache's disk tier: {source}")]
    CacheDir { path: PathBuf, source: std::io::Error },
}

/// Where a client was located, and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Located {
    Header(GeoPoint),
    Country(GeoPoint),
    GeoIp(GeoPoint),
    Edge(GeoPoint),
}

impl Located {
    pub fn point(&self) -> GeoPoint {
        match *self {
            Located::Header(p) | Located::Country(p) | Located::GeoIp(p) | Located::Edge(p) => p,
        }
    }
}

impl Edge {
    pub fn new(config: EdgeConfig) -> Result<Arc<Edge>, EdgeError> {
        if config.regions.is_empty() {
            return Err(EdgeError::NoRegions);
        }
        let tls = Tls::load(config.tls.clone())?;
        let me = tls.identity();
        if me.role != Role::Edge || me.name != config.name {
            return Err(EdgeError::WrongIdentity { name: config.name.clone(), found: me });
        }
        let upstreams = config
            .regions
            .iter()
            .map(|r| {
                let uri: Uri =
                    r.url.parse().map_err(|_| EdgeError::BadUrl { name: r.name.clone(), url: r.url.clone() })?;
                let authority = match (uri.scheme_str(), uri.authority()) {
                    (Some("https"), Some(a)) => a.clone(),
                    _ => return Err(EdgeError::BadUrl { name: r.name.clone(), url: r.url.clone() }),
                };
                let pools = (0..=config.workers())
                    .map(|_| {
                        pool::Pool::with_tls(
                            authority.to_string(),
                            Duration::from_millis(config.health.timeout_ms.max(100)),
                            tls.clone(),
                            Expect::new(&r.name, Role::Region),
                        )
                    })
                    .collect();
                let host = HeaderValue::from_str(authority.as_str())
                    .map_err(|_| EdgeError::BadUrl { name: r.name.clone(), url: r.url.clone() })?;
                Ok(Upstream {
                    target: r.clone(),
                    host,
                    pools,
                    health: Mutex::new(RegionHealth::new()),
                    answered: Default::default(),
                    failed: Default::default(),
                    unit: r.location.unit(),
                    catching_up: Default::default(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let geoip = match &config.geoip_db {
            None => None,
            Some(p) => {
                Some(meridian_core::geoip::open(p).map_err(|message| EdgeError::GeoIp { path: p.clone(), message })?)
            }
        };
        let edge_header = HeaderValue::from_str(&config.name).unwrap_or(HeaderValue::from_static("edge"));
        let cache = Cache::new(config.cache.clone()).map_err(|source| EdgeError::CacheDir {
            path: config.cache.disk_dir.clone().unwrap_or_default(),
            source,
        })?;
        let config_budget = config.retry_budget;
        let names = config.regions.iter().map(|r| r.name.clone()).collect();
        let jurisdictions = config.regions.iter().map(|r| r.jurisdiction.clone()).collect();
        Ok(Arc::new(Edge {
            config,
            tls,
            upstreams,
            geoip,
            edge_header,
            limits: Default::default(),
            routes: Default::default(),
            names,
            jurisdictions,
            cache,
            budget: budget::RetryBudget::new(config_budget),
            requests: Default::default(),
        }))
    }

    /// Probes every region forever at the configured interval.
    pub async fn run_health_checks(self: Arc<Self>) {
        let interval = Duration::from_millis(self.config.health.interval_ms.max(10));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for i in 0..self.upstreams.len() {
                let edge = self.clone();
                // Probes run concurrently so a black-holed region cannot
                // delay the verdict on the others.
                tokio::spawn(async move { edge.probe(i).await });
            }
        }
    }

    async fn probe(&self, i: usize) {
        let u = &self.upstreams[i];
        let uri = format!("{}health", headers::RESERVED_PREFIX);
        let req = Request::get(uri).body(meridian_http::empty()).expect("valid probe request");
        let start = Instant::now();
        let timeout = Duration::from_millis(self.config.health.timeout_ms);
        let ok = match tokio::time::timeout(timeout, u.pool().send(req)).await {
            Ok(Ok(resp)) => {
                let ok = resp.status() == StatusCode::OK;
                // Read to the end (so the connection returns to the pool):
                // the answer lists the apps' rate limits.
                if let Ok(body) = resp.into_body().collect().await {
                    #[derive(serde::Deserialize)]
                    struct Health {
                        #[serde(default)]
                        limits: Vec<meridian_core::wire::AppLimit>,
                        #[serde(default)]
                        routing: Vec<meridian_core::wire::AppRouting>,
                        #[serde(default)]
                        catching_up_hosts: Vec<String>,
                        #[serde(default)]
                        catching_up_default: bool,
                        #[serde(default)]
                        serving: bool,
                    }
                    if let Ok(h) = serde_json::from_slice::<Health>(&body.to_bytes()) {
                        self.limits.update(h.limits);
                        self.routes.update(h.routing, &self.names);
                        // Serving, but catching up on some apps: healthy
                        // for every other app.
                        let catching_up = (h.catching_up_hosts, h.catching_up_default);
                        let apps_only = !ok && h.serving && (!catching_up.0.is_empty() || catching_up.1);
                        if **u.catching_up.load() != catching_up {
                            u.catching_up.store(Arc::new(catching_up));
                        }
                        return self.probed(i, ok || apps_only, start);
                    }
                }
                ok
            }
            _ => false,
        };
        self.probed(i, ok, start)
    }

    fn probed(&self, i: usize, ok: bool, start: Instant) {
        let u = &self.upstreams[i];
        let mut h = u.health.lock().unwrap();
        let was = h.healthy;
        if ok {
            h.probe_ok(start.elapsed(), &self.config.health);
        } else {
            h.probe_failed(&self.config.health);
        }
        if was != h.healthy {
            tracing::info!(region = %u.target.name, healthy = h.healthy, "region health changed");
        }
    }

    /// Where the client is: trusted headers, then GeoIP, then this edge.
    pub fn locate<B>(&self, req: &Request<B>, peer: IpAddr) -> Located {
        self.locate_with_country(req, peer).0
    }

    /// Where the client is, and its country when known.
    pub fn locate_with_country<B>(&self, req: &Request<B>, peer: IpAddr) -> (Located, Option<String>) {
        let mut country = None;
        if self.config.trust_client_geo_headers {
            let hv = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
            country = hv(headers::CLIENT_COUNTRY).map(|c| c.trim().to_ascii_uppercase());
            if let Some(p) = hv(headers::CLIENT_GEO).and_then(|v| v.parse::<GeoPoint>().ok()) {
                return (Located::Header(p), country);
            }
            if let Some(p) = country.as_deref().and_then(country_centroid) {
                return (Located::Country(p), country);
            }
        }
        if let Some(db) = &self.geoip {
            let (point, iso) = meridian_core::geoip::locate(db, peer);
            if country.is_none() {
                country = iso;
            }
            if let Some(p) = point {
                return (Located::GeoIp(p), country);
            }
        }
        (Located::Edge(self.config.location), country)
    }

    /// The regions to try for a request, best first.
    fn plan(&self, app: Option<&routing::AppRoute>, host: Option<&str>, client: &routing::Client<'_>) -> routing::Plan {
        let cands: Vec<Candidate> = self
            .upstreams
            .iter()
            .map(|u| {
                let mut c = Candidate::at(u.unit, &u.health.lock().unwrap());
                let behind = u.catching_up.load();
                let (hosts, default) = behind.as_ref();
                if *default || !hosts.is_empty() {
                    // An unknown host may be the default app's.
                    let listed = host.is_some_and(|h| hosts.iter().any(|x| x == h));
                    c.healthy &= !(listed || (*default && app.is_none_or(|a| a.default)));
                }
                c
            })
            .collect();
        let regions = routing::Regions { candidates: &cands, names: &self.names, jurisdictions: &self.jurisdictions };
        let random = if app.is_some_and(|a| a.weighted()) { rand::random::<f64>() } else { 0.0 };
        routing::plan(self.config.policy, app, client, &regions, random)
    }

    /// The cluster port: the edge's status, for the control plane and
    /// operators (judged by their certificates).
    pub async fn handle_cluster(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let Some(caller) = meridian_http::Peer::of(&req) else {
            return text(StatusCode::UNAUTHORIZED, "the cluster port needs a client certificate from the cluster CA");
        };
        if !matches!(caller.role, Role::Control | Role::Operator) {
            return text(StatusCode::FORBIDDEN, format!("{caller} may not read an edge's status"));
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, headers::EDGE_STATUS_PATH) => return json(StatusCode::OK, &self.status()),
            (&Method::GET, headers::EDGE_METRICS_PATH) => {
                let mut r = Response::new(full(self.metrics()));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                return r;
            }
            (&Method::POST, headers::EDGE_PURGE_PATH) => {
                let body = match meridian_http::read_body(req.into_body(), 1 << 20).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                return match serde_json::from_slice::<cache::Purge>(&body) {
                    Ok(p) if p.hosts.is_empty() && p.any_host_but.is_none() => {
                        text(StatusCode::BAD_REQUEST, "a purge names the hosts it applies to")
                    }
                    Ok(p) => {
                        // The disk tier makes this file work: off the async threads.
                        let (cache, purge) = (self.cache.clone(), p.clone());
                        let removed = tokio::task::spawn_blocking(move || {
                            let removed = if purge.is_empty() { 0 } else { cache.purge(&purge) };
                            cache.relabel(&purge);
                            cache.pause(&purge);
                            removed
                        })
                        .await
                        .unwrap_or(0);
                        tracing::info!(hosts = ?p.hosts, removed, "purged");
                        json(StatusCode::OK, &serde_json::json!({ "edge": self.config.name, "removed": removed }))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("malformed purge: {e}")),
                };
            }
            _ => {}
        }
        text(StatusCode::NOT_FOUND, format!("no such API: {}", req.uri().path()))
    }

    /// The public port: user traffic, forwarded to a region. Nothing under
    /// `/_meridian/` is forwarded or answered: internal paths do not exist
    /// for users.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if req.uri().path().starts_with(headers::RESERVED_PREFIX) {
            return self.finish(text(StatusCode::NOT_FOUND, format!("no route serves {}", req.uri().path())), 0);
        }
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .and_then(meridian_core::wire::host_of);
        if !self.limits.admit(host.as_deref()) {
            let mut r = text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests: over the app's requests_per_second; retry shortly",
            );
            r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return self.finish(r, 0);
        }
        let (located, country) = self.locate_with_country(&req, peer.ip());
        let app = self.routes.for_host(host.as_deref());
        let affinity = app.as_ref().filter(|a| a.affinity).and_then(|_| affinity_cookie(req.headers()));
        let client =
            routing::Client { point: located.point(), country: country.as_deref(), affinity: affinity.as_deref() };
        let plan = self.plan(app.as_deref(), host.as_deref(), &client);
        let sticky = app.as_ref().is_some_and(|a| a.affinity).then_some(affinity);
        if plan.order.is_empty() {
            let j = plan.pinned.as_deref().unwrap_or("?");
            let msg = format!(
                "no region of jurisdiction {j} is known to this edge, and this app's residency rule serves clients \
                 in {j} only from regions of {j}"
            );
            return self.finish(text(StatusCode::SERVICE_UNAVAILABLE, msg), 0);
        }
        let (mut parts, body) = req.into_parts();
        // The host this edge chose the app by (its limits, plan and cache
        // key) is the one the region is told: a client's own
        // X-Forwarded-Host never passes, and a Host this edge could not
        // read goes no further than it did here (the default app's).
        parts.headers.remove(names::X_FORWARDED_HOST);
        match &host {
            Some(h) if !parts.headers.contains_key(header::HOST) => {
                if let Ok(v) = HeaderValue::from_str(h) {
                    parts.headers.insert(header::HOST, v);
                }
            }
            Some(_) => {}
            None => {
                parts.headers.remove(header::HOST);
            }
        }
        // A pinned request is cached only at an edge of its jurisdiction,
        // and apart from everyone else's (only its regions' answers).
        let cache_here = plan.pinned.is_none() || plan.pinned == self.config.jurisdiction;
        let host = match host {
            Some(h)
                if self.cache.enabled() && cache_here && cacheable_request(&parts, &body) && !self.cache.paused(&h) =>
            {
                h
            }
            _ => {
                let resp = self.pass(parts, body, host, &plan, peer.ip()).await;
                return with_affinity(resp, sticky);
            }
        };
        // The client's own directives and conditionals are the edge's to
        // answer, not the regions' (see `cache`).
        let mut conditional = HeaderMap::new();
        for name in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
            if let Some(v) = parts.headers.remove(&name) {
                conditional.insert(name, v);
            }
        }
        let range = parts.headers.remove(header::RANGE);
        let if_range = parts.headers.remove(header::IF_RANGE);
        parts.headers.remove(header::CACHE_CONTROL);
        parts.headers.remove(header::PRAGMA);
        let version = meridian_http::cookie(&parts.headers, headers::VERSION_COOKIE).map(String::from);
        let accepts_gzip = self.cache.compresses() && compress::accepts_gzip(&parts.headers);
        let req = CacheRequest {
            path_and_query: pq_of(&parts.uri).into(),
            head: parts.method == Method::HEAD,
            headers: parts.headers,
            conditional,
            accepts_gzip,
            range,
            if_range,
            peer: peer.ip(),
            version,
            key: match &plan.pinned {
                None => cache::key(&host, pq_of(&parts.uri)),
                Some(j) => cache::pinned_key(&host, j, pq_of(&parts.uri)),
            },
            plan,
        };
        let resp = self.cached(Arc::new(req)).await;
        with_affinity(resp, sticky)
    }

    /// A request the cache has nothing to do with (a method other than GET
    /// and HEAD, a body, `If-Match`, ...): forwarded as it is. A successful
    /// unsafe method forgets what is stored for its URL (RFC 9111 §4.4).
    async fn pass(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        host: Option<String>,
        plan: &routing::Plan,
        peer: IpAddr,
    ) -> Response<Body> {
        // Buffered so it can be replayed on another region.
        let body = if http_body::Body::is_end_stream(&body) {
            Bytes::new()
        } else {
            match meridian_http::read_body(body, self.config.max_body_kb << 10).await {
                Ok(b) => b,
                Err(e) => return self.finish(e.into_response(), 0),
            }
        };
        let (resp, attempts) = self.forward(&parts.method, &parts.uri, &parts.headers, body, plan, peer).await;
        let unsafe_method = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
        if let Some(host) = host.filter(|_| unsafe_method && self.cache.enabled()) {
            if resp.status().is_success() || resp.status().is_redirection() {
                let pq = pq_of(&parts.uri);
                self.cache.invalidate(&cache::key(&host, pq));
                // Pinned clients' copies are kept apart, and only at an
                // edge of their jurisdiction (`cache_here`): this edge's
                // one such key goes too, whoever wrote.
                if let Some(j) = &self.config.jurisdiction {
                    self.cache.invalidate(&cache::pinned_key(&host, j, pq));
                }
            }
        }
        if !self.cache.enabled() {
            return self.finish(resp, attempts);
        }
        self.bypassed(resp, attempts)
    }

    /// An answer the cache had no part in, marked so.
    fn bypassed(&self, mut resp: Response<Body>, attempts: usize) -> Response<Body> {
        self.cache.record(Outcome::Bypass, 0);
        resp.headers_mut().insert(cache::CACHE_STATUS, Outcome::Bypass.header());
        self.finish(resp, attempts)
    }

    /// A GET or HEAD through the cache.
    async fn cached(self: &Arc<Self>, req: Arc<CacheRequest>) -> Response<Body> {
        let key = req.key.clone();
        let now = SystemTime::now();
        let found = match self.cache.lookup(&key, &req.lookup(), now) {
            // A client a rollout pinned to one version gets only that
            // version's answers.
            Found::Fresh(o) | Found::Stale(o) if !req.version_matches(&o) => {
                let headers = req.passed_headers();
                let (resp, attempts) =
                    self.forward(&req.method(), &req.uri(), &headers, Bytes::new(), &req.plan, req.peer).await;
                return self.bypassed(resp, attempts);
            }
            found => found,
        };
        let stale = match found {
            Found::Fresh(o) => return self.answer_from_cache(&o, Outcome::Hit, &req, now, 0),
            Found::Stale(o) if o.serve_while_revalidating(now) => {
                // Served now; one refresh in the background.
                if let Turn::Lead(guard) = self.cache.join(&key) {
                    let (edge, req, old) = (self.clone(), req.clone(), o.clone());
                    tokio::spawn(async move {
                        let _guard = guard;
                        edge.fill(key, &req, Some(old)).await
                    });
                }
                return self.answer_from_cache(&o, Outcome::Stale, &req, now, 0);
            }
            Found::Stale(o) => Some(o),
            Found::Miss => None,
        };
        // Only GET bodies are stored: a HEAD that finds nothing passes; so
        // does a request whose last answer could not be stored (it would
        // only queue behind others' fetches).
        if stale.is_none() && (req.head || self.cache.is_uncacheable(&key)) {
            let headers = req.passed_headers();
            let (resp, attempts) =
                self.forward(&req.method(), &req.uri(), &headers, Bytes::new(), &req.plan, req.peer).await;
            return self.bypassed(resp, attempts);
        }
        let filled = match self.cache.join(&key) {
            Turn::Lead(guard) => {
                // The fill runs on its own task: a client that goes away
                // must not cancel it for everyone waiting on it.
                let (edge, r) = (self.clone(), req.clone());
                let task = tokio::spawn(async move {
                    let _guard = guard;
                    edge.fill(key, &r, stale).await
                });
                match task.await {
                    Ok(f) => f,
                    Err(e) => {
                        return self
                            .finish(text(StatusCode::INTERNAL_SERVER_ERROR, format!("cache fill failed: {e}")), 0)
                    }
                }
            }
            Turn::Wait(mut done) => {
                // No longer than a region may take to start answering: a
                // slow fill does not hold everyone else up.
                let timeout = self.first_byte_timeout(&req.plan);
                let _ = tokio::time::timeout(timeout, done.wait_for(|d| *d)).await;
                let now = SystemTime::now();
                match self.cache.lookup(&key, &req.lookup(), now) {
                    Found::Fresh(o) => return self.answer_from_cache(&o, Outcome::Hit, &req, now, 0),
                    // The fill stored nothing this request can use (not
                    // storable, another variant, failed): its own fetch.
                    Found::Stale(o) => self.fill(key, &req, Some(o)).await,
                    Found::Miss => self.fill(key, &req, None).await,
                }
            }
        };
        match filled {
            Filled::Object { object, outcome, attempts } => {
                self.answer_from_cache(&object, outcome, &req, SystemTime::now(), attempts)
            }
            // A range of an object too large to keep: the region cuts it
            // (the whole body the fill asked for is dropped unread, once;
            // later requests for the object go to the region directly).
            Filled::TooLarge { resp, attempts }
                if req.range.is_some() && !req.head && resp.status() == StatusCode::OK =>
            {
                drop(resp);
                if req.version.is_none() {
                    self.cache.mark_uncacheable(&req.key);
                }
                let headers = req.passed_headers();
                let (mut resp, more) =
                    self.forward(&Method::GET, &req.uri(), &headers, Bytes::new(), &req.plan, req.peer).await;
                self.cache.record(Outcome::Miss, 0);
                resp.headers_mut().insert(cache::CACHE_STATUS, Outcome::Miss.header());
                self.finish(resp, attempts + more)
            }
            Filled::Passed { mut resp, attempts } | Filled::TooLarge { mut resp, attempts } => {
                // (Not for a version-pinned client: its answers are never
                // stored, others' may be.)
                if !resp.status().is_server_error() && req.version.is_none() {
                    self.cache.mark_uncacheable(&req.key);
                }
                self.cache.record(Outcome::Miss, 0);
                resp.headers_mut().insert(cache::CACHE_STATUS, Outcome::Miss.header());
                if req.head {
                    *resp.body_mut() = meridian_http::empty();
                }
                self.finish(resp, attempts)
            }
        }
    }

    /// Fetches `key` from the regions (revalidating `stale` if given) and
    /// stores the answer when it may be stored and no purge, relabel or
    /// write of its URL began while it was fetched (the answer is still
    /// this request's).
    async fn fill(&self, key: Box<str>, req: &CacheRequest, stale: Option<Arc<cache::Object>>) -> Filled {
        let since = self.cache.since();
        let mut headers = req.headers.clone();
        for (k, v) in stale.iter().flat_map(|o| o.validators()) {
            headers.insert(k, v);
        }
        let uri = req.uri();
        let (mut resp, mut attempts) =
            self.forward(&Method::GET, &uri, &headers, Bytes::new(), &req.plan, req.peer).await;
        let now = SystemTime::now();
        if resp.status() == StatusCode::NOT_MODIFIED {
            if let Some(old) = stale.as_ref().filter(|o| o.confirmed_by(resp.headers())) {
                let object = match old.revalidated(&req.lookup(), resp.headers(), now) {
                    Some(new) => {
                        let new = Arc::new(new);
                        self.cache.store_unless_changed(key, new.clone(), since);
                        new
                    }
                    None => {
                        self.cache.invalidate(&key);
                        old.clone()
                    }
                };
                return Filled::Object { object, outcome: Outcome::Revalidated, attempts };
            }
            // A 304 for something else: fetch it whole.
            let (r, a) = self.forward(&Method::GET, &uri, &req.headers, Bytes::new(), &req.plan, req.peer).await;
            (resp, attempts) = (r, attempts + a);
        }
        if resp.status().is_server_error() {
            if let Some(old) = stale.filter(|o| o.serve_on_error(now)) {
                tracing::debug!(status = %resp.status(), "serving stale on error");
                return Filled::Object { object: old, outcome: Outcome::Stale, attempts };
            }
            return Filled::Passed { resp, attempts };
        }
        let max = self.cache.max_object_bytes();
        let declared = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > max) {
            return Filled::TooLarge { resp, attempts };
        }
        // A client pinned to a version by a rollout fills nobody's cache:
        // everyone else would get its version.
        if req.version.is_some() {
            return Filled::Passed { resp, attempts };
        }
        // An answer holding pinned data is stored only by edges of its
        // jurisdiction.
        if let Some(j) = resp.headers().get(headers::RESIDENCY).and_then(|v| v.to_str().ok()) {
            let mine = self.config.jurisdiction.as_deref();
            if !j.split(',').all(|j| Some(j.trim()) == mine) {
                return Filled::Passed { resp, attempts };
            }
        }
        let (parts, body) = resp.into_parts();
        match body::buffer_upto(body, max).await {
            Ok(bytes) => {
                // The answer's parts end in this block and the object is
                // boxed: held in this future across the wait below, either
                // would weigh on every request's.
                let (mut object, compress) = {
                    let (parts, bytes) = (parts, bytes);
                    let compress = self.cache.compresses()
                        && compress::worth_compressing(parts.status, &parts.headers, bytes.len());
                    match cache::Object::new(&req.lookup(), parts.status, &parts.headers, bytes.clone(), now) {
                        Some(object) => (Box::new(object), compress),
                        None => return Filled::Passed { resp: Response::from_parts(parts, full(bytes)), attempts },
                    }
                };
                if compress {
                    // Off the event loop: a few MiB take tens of ms. (A
                    // failed task stores the object uncompressed.)
                    let body = object.body.clone();
                    object.gzip = tokio::task::spawn_blocking(move || compress::gzip(&body)).await.ok().flatten();
                }
                let object = Arc::<cache::Object>::from(object);
                if !self.cache.store_unless_changed(key, object.clone(), since) {
                    tracing::debug!(path = %req.path_and_query, "a purge or write began during the fill: its answer is not stored");
                }
                Filled::Object { object, outcome: Outcome::Miss, attempts }
            }
            Err(body::Overflow::TooLarge(rest)) => {
                Filled::TooLarge { resp: Response::from_parts(parts, rest), attempts }
            }
            Err(body::Overflow::Failed(e)) => Filled::Passed {
                resp: text(StatusCode::BAD_GATEWAY, format!("the region's answer broke off: {e}")),
                attempts,
            },
        }
    }

    fn answer_from_cache(
        &self,
        o: &cache::Object,
        outcome: Outcome,
        req: &CacheRequest,
        now: SystemTime,
        attempts: usize,
    ) -> Response<Body> {
        let not_modified = o.status == StatusCode::OK && o.satisfies_conditional(&req.conditional);
        // A conditional that holds wins over a range (RFC 9110 §13.2.2);
        // HEAD ignores ranges.
        let range = if not_modified || req.head {
            cache::RangeAnswer::Full
        } else {
            o.range(req.range.as_ref(), req.if_range.as_ref())
        };
        let len = o.body.len();
        let mut h = o.response_headers(now);
        // The gzipped form for a client that takes it, unless it asked for
        // a range: ranges are of the body as the region sent it.
        let gzip = o.gzip.as_ref().filter(|_| req.accepts_gzip && req.range.is_none());
        if o.gzip.is_some() {
            compress::vary_on_accept_encoding(&mut h);
        }
        if let Some(g) = gzip {
            // The tag of the form the client holds, for a 304 too.
            if let Some(etag) = h.get(header::ETAG).map(compress::weak_etag) {
                h.insert(header::ETAG, etag);
            }
            if !not_modified {
                h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(g.len()));
            }
            // Ranges are served of the body as the region sent it only.
            h.remove(header::ACCEPT_RANGES);
        } else if o.status == StatusCode::OK {
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        if let Some(value) = range.content_range(len) {
            h.insert(header::CONTENT_RANGE, value);
        }
        let (status, body, sent) = match range {
            _ if not_modified => {
                h.remove(header::CONTENT_LENGTH);
                (StatusCode::NOT_MODIFIED, meridian_http::empty(), 0)
            }
            _ if req.head => (o.status, meridian_http::empty(), 0),
            cache::RangeAnswer::Full => match gzip {
                Some(g) => {
                    self.cache.record_compressed(len.saturating_sub(g.len()));
                    (o.status, full(g.clone()), g.len())
                }
                None => (o.status, full(o.body.clone()), len),
            },
            cache::RangeAnswer::Partial(r) => {
                let sent = r.len();
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(sent));
                (StatusCode::PARTIAL_CONTENT, full(o.body.slice(r)), sent)
            }
            cache::RangeAnswer::Unsatisfiable => {
                // The object's own headers describe a body not sent.
                for name in [header::CONTENT_TYPE, header::CONTENT_ENCODING, header::ETAG, header::LAST_MODIFIED] {
                    h.remove(name);
                }
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
                h.remove(header::CONTENT_LENGTH);
                let msg = format!("the range asked for is outside the {len} bytes of {}\n", req.path_and_query);
                (StatusCode::RANGE_NOT_SATISFIABLE, full(Bytes::from(msg)), 0)
            }
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        h.insert(cache::CACHE_STATUS, outcome.header());
        *resp.headers_mut() = h;
        self.cache.record(outcome, sent);
        self.finish(resp, attempts)
    }

    /// Tries regions in `order` until one answers; returns the answer (or
    /// the edge's own error) and how many regions were tried.
    async fn forward(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
        plan: &routing::Plan,
        peer: IpAddr,
    ) -> (Response<Body>, usize) {
        let order = &plan.order;
        let idempotent = matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        );
        let attempts = order.len().min(1 + self.config.max_retries as usize);
        let mut last_error = String::new();
        // A region's own 5xx, kept while others are tried: if none does
        // better, its message is worth more than ours.
        let mut kept: Option<(Response<Body>, usize)> = None;
        self.budget.request();
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tried = 0;
        for (n, &i) in order.iter().take(attempts).enumerate() {
            if n > 0 && !self.budget.try_retry() {
                last_error = format!("{last_error}; not retried further: the edge's retry budget is spent");
                break;
            }
            tried = n + 1;
            let u = &self.upstreams[i];
            let last = n + 1 == attempts;
            let req = self.upstream_request(method, uri, headers, body.clone(), &u.host, peer);
            // An idempotent request waits for a head only so long before
            // the next region is tried; others wait the full timeout.
            let timeout = if idempotent && !last {
                self.first_byte_timeout(plan)
            } else {
                Duration::from_millis(self.config.upstream_timeout_ms)
            };
            // Boxed: a future is copied each time it moves into the one
            // awaiting it, and this one is the largest of the request's
            // (over a kilobyte); boxed, only its pointer moves.
            match tokio::time::timeout(timeout, Box::pin(u.pool().send(req))).await {
                Ok(Ok(resp)) => {
                    // Only the region's own failure is a reason to try
                    // another: whatever the app answered (a 5xx too) is its
                    // answer, sent once and passed on as is, and says
                    // nothing of the region's health.
                    let platform_error = resp.status().is_server_error()
                        && resp.headers().get(names::FAULT).is_some_and(|f| f == headers::FAULT_PLATFORM);
                    if platform_error {
                        u.health.lock().unwrap().server_error(&self.config.health);
                        u.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if idempotent && !last {
                            last_error = format!("{} answered {}", u.target.name, resp.status());
                            tracing::debug!(region = %u.target.name, status = %resp.status(), "retrying on next region");
                            // Boxed: a rare path, kept out of every request's future.
                            kept = Box::pin(keep(resp)).await.map(|r| (r, i));
                            continue;
                        }
                    } else {
                        u.health.lock().unwrap().request_ok();
                    }
                    u.answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return (resp, n + 1);
                }
                Ok(Err(e)) => {
                    let connect = matches!(e, pool::SendError::Connect(_));
                    u.health.lock().unwrap().connection_failed();
                    u.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    last_error = format!("{}: {e}", u.target.name);
                    tracing::info!(region = %u.target.name, error = %e, connect, "region failed; ejected");
                    if !(connect || idempotent) {
                        let msg = format!(
                            "region {} failed mid-request: {e}; not retried because {method} is not idempotent",
                            u.target.name
                        );
                        return (text(StatusCode::BAD_GATEWAY, msg), n + 1);
                    }
                }
                Err(_) => {
                    u.health.lock().unwrap().connection_failed();
                    u.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    last_error = format!("{} did not answer within {timeout:?}", u.target.name);
                    if !idempotent {
                        return (text(StatusCode::GATEWAY_TIMEOUT, last_error), n + 1);
                    }
                }
            }
        }
        let attempts = tried.max(1);
        if let Some((resp, i)) = kept {
            self.upstreams[i].answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return (resp, attempts);
        }
        if let Some(j) = &plan.pinned {
            let msg = format!(
                "no region of jurisdiction {j} could serve the request, and this app's residency rule serves \
                 clients in {j} only from regions of {j} (last error: {last_error})"
            );
            return (text(StatusCode::SERVICE_UNAVAILABLE, msg), attempts);
        }
        let msg = format!("no region could serve the request (last error: {last_error})");
        (text(StatusCode::BAD_GATEWAY, msg), attempts)
    }

    /// How long a region has to start answering before it is given up on
    /// (and, for an idempotent request, the next one tried): the edge's
    /// `first_byte_timeout_ms`, or the app's own bound when its functions
    /// may take longer, never past `upstream_timeout_ms`.
    fn first_byte_timeout(&self, plan: &routing::Plan) -> Duration {
        meridian_core::wire::first_byte_wait(
            Duration::from_millis(self.config.first_byte_timeout_ms),
            plan.answer_within,
            Duration::from_millis(self.config.upstream_timeout_ms),
        )
    }

    fn upstream_request(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
        host: &HeaderValue,
        peer: IpAddr,
    ) -> Request<Body> {
        // The client's path and query as they came (already parsed: a
        // clone shares the bytes).
        let mut target = http::uri::Parts::default();
        target.path_and_query =
            Some(uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        let mut req = Request::new(full(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = Uri::from_parts(target).unwrap_or_else(|_| Uri::from_static("/"));
        let h = req.headers_mut();
        h.reserve(headers.len() + 4);
        for (k, v) in headers {
            if !names::is_hop_by_hop(k) && k != header::HOST {
                h.append(k.clone(), v.clone());
            }
        }
        // `handle` left exactly the Host it chose the app by (or none),
        // and no X-Forwarded-Host of the client's.
        if let Some(host) = headers.get(header::HOST) {
            h.insert(names::X_FORWARDED_HOST, host.clone());
        }
        h.insert(header::HOST, host.clone());
        let xff = match headers.get(names::X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) => HeaderValue::from_str(&format!("{prev}, {peer}")).ok(),
            None => Some(peer_value(peer)),
        };
        if let Some(v) = xff {
            h.insert(names::X_FORWARDED_FOR, v);
        }
        h.insert(names::EDGE, self.edge_header.clone());
        req
    }

    fn finish(&self, mut resp: Response<Body>, attempts: usize) -> Response<Body> {
        let h = resp.headers_mut();
        // One pass to look; a region's answer rarely has any of them.
        let internal: Vec<HeaderName> = h.keys().filter(|k| names::is_internal_to_the_edge(k)).cloned().collect();
        for k in internal {
            h.remove(k);
        }
        h.insert(names::EDGE, self.edge_header.clone());
        h.insert(names::ATTEMPTS, names::attempts_value(attempts));
        resp
    }

    pub fn status(&self) -> EdgeStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let answered: u64 = self.upstreams.iter().map(|u| u.answered.load(Relaxed)).sum();
        EdgeStatus {
            edge: self.config.name.clone(),
            policy: self.config.policy,
            regions: self.upstreams.iter().map(|u| (u.target.name.clone(), u.health.lock().unwrap().clone())).collect(),
            cache: self.cache.stats(),
            apps: self.routes.learned(),
            traffic: Traffic {
                requests: self.requests.load(Relaxed),
                retries: self.budget.retries.load(Relaxed),
                retries_denied: self.budget.denied.load(Relaxed),
                regions: self
                    .upstreams
                    .iter()
                    .map(|u| {
                        let a = u.answered.load(Relaxed);
                        RegionTraffic {
                            region: u.target.name.clone(),
                            answered: a,
                            failed: u.failed.load(Relaxed),
                            share: if answered == 0 { 0.0 } else { a as f64 / answered as f64 },
                        }
                    })
                    .collect(),
            },
        }
    }

    /// The edge's counters in the Prometheus text format.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let s = self.status();
        let e = &s.edge;
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{{edge=\"{e}\"{labels}}} {v}");
            }
        };
        let c = &s.cache;
        family(
            "meridian_edge_cache_requests_total",
            "counter",
            "Requests by what the cache did.",
            [
                ("hit", c.hits),
                ("miss", c.misses),
                ("stale", c.stale),
                ("revalidated", c.revalidated),
                ("bypass", c.bypass),
            ]
            .iter()
            .map(|(k, v)| (format!(",result=\"{k}\""), *v as f64))
            .collect(),
        );
        family(
            "meridian_edge_cache_hit_ratio",
            "gauge",
            "Hits (fresh, stale, revalidated) over cacheable requests.",
            vec![(String::new(), c.hit_ratio())],
        );
        family(
            "meridian_edge_cache_served_bytes_total",
            "counter",
            "Body bytes served from the cache.",
            vec![(String::new(), c.bytes_from_cache as f64)],
        );
        family(
            "meridian_edge_cache_compressed_total",
            "counter",
            "Answers from the cache sent gzipped.",
            vec![(String::new(), c.compressed as f64)],
        );
        family(
            "meridian_edge_cache_compression_saved_bytes_total",
            "counter",
            "Body bytes that sending gzipped answers saved.",
            vec![(String::new(), c.compression_saved_bytes as f64)],
        );
        family("meridian_edge_cache_objects", "gauge", "Objects stored.", vec![(String::new(), c.objects as f64)]);
        family(
            "meridian_edge_cache_stored_bytes",
            "gauge",
            "Bytes stored.",
            vec![(String::new(), c.bytes_stored as f64)],
        );
        family(
            "meridian_edge_cache_coalesced_total",
            "counter",
            "Misses that waited for another's fetch.",
            vec![(String::new(), c.coalesced as f64)],
        );
        family(
            "meridian_edge_cache_purged_total",
            "counter",
            "Objects purged.",
            vec![(String::new(), c.purged as f64)],
        );
        family(
            "meridian_edge_region_answers_total",
            "counter",
            "Answers passed on to clients, by region.",
            s.traffic.regions.iter().map(|r| (format!(",region=\"{}\"", r.region), r.answered as f64)).collect(),
        );
        family(
            "meridian_edge_region_failures_total",
            "counter",
            "Attempts that failed (connect, timeout, platform 5xx), by region.",
            s.traffic.regions.iter().map(|r| (format!(",region=\"{}\"", r.region), r.failed as f64)).collect(),
        );
        family(
            "meridian_edge_region_ejections_total",
            "counter",
            "Times a region was taken out of rotation.",
            s.regions.iter().map(|(n, h)| (format!(",region=\"{n}\""), h.ejections as f64)).collect(),
        );
        family(
            "meridian_edge_region_healthy",
            "gauge",
            "1 while a region is in rotation.",
            s.regions.iter().map(|(n, h)| (format!(",region=\"{n}\""), f64::from(u8::from(h.healthy)))).collect(),
        );
        family(
            "meridian_edge_retries_total",
            "counter",
            "Retries on another region.",
            vec![(String::new(), s.traffic.retries as f64)],
        );
        family(
            "meridian_edge_retries_denied_total",
            "counter",
            "Retries the retry budget refused.",
            vec![(String::new(), s.traffic.retries_denied as f64)],
        );
        out
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EdgeStatus {
    pub edge: String,
    pub policy: Policy,
    pub regions: Vec<(String, RegionHealth)>,
    pub cache: cache::CacheStats,
    pub traffic: Traffic,
    /// The apps whose routing the regions have reported.
    pub apps: Vec<routing::LearnedApp>,
}

/// Where the edge's requests went.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Traffic {
    /// Requests sent to regions (cache hits are not).
    pub requests: u64,
    pub retries: u64,
    pub retries_denied: u64,
    pub regions: Vec<RegionTraffic>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RegionTraffic {
    pub region: String,
    pub answered: u64,
    pub failed: u64,
    /// Its part of all answers, 0..1.
    pub share: f64,
}

/// How a fill ended.
enum Filled {
    /// An object to answer from: just stored (`Miss`), confirmed by a 304
    /// (`Revalidated`), or kept because the regions failed (`Stale`).
    Object { object: Arc<cache::Object>, outcome: Outcome, attempts: usize },
    /// An answer that is not stored, passed on as it came.
    Passed { resp: Response<Body>, attempts: usize },
    /// An answer larger than the cache keeps (`max_object_kb`): passed on
    /// as it came, unless the client asked for a range of it.
    TooLarge { resp: Response<Body>, attempts: usize },
}

/// A GET or HEAD on its way through the cache, owned so a fill can run on
/// its own task.
struct CacheRequest {
    path_and_query: String,
    head: bool,
    /// The client's headers with `Host` set, without its conditionals and
    /// cache directives.
    headers: HeaderMap,
    /// The client's `If-None-Match` / `If-Modified-Since`, answered by the
    /// edge.
    conditional: HeaderMap,
    /// The client's `Range` and `If-Range`, also answered by the edge, from
    /// the whole object (fetched without them).
    range: Option<HeaderValue>,
    if_range: Option<HeaderValue>,
    /// The client's `Accept-Encoding` takes gzip.
    accepts_gzip: bool,
    peer: IpAddr,
    /// The version a rollout pinned the client to (its cookie).
    version: Option<String>,
    /// The cache key: host and path, apart per residency jurisdiction.
    key: Box<str>,
    plan: routing::Plan,
}

impl CacheRequest {
    fn lookup(&self) -> Lookup<'_> {
        Lookup { path_and_query: &self.path_and_query, method: &Method::GET, headers: &self.headers }
    }

    fn uri(&self) -> Uri {
        self.path_and_query.parse().unwrap_or_else(|_| Uri::from_static("/"))
    }

    fn method(&self) -> Method {
        if self.head {
            Method::HEAD
        } else {
            Method::GET
        }
    }

    /// The headers for a request the cache passes on rather than fills:
    /// the client's, its `Range` and `If-Range` put back (the region
    /// answers those itself then).
    fn passed_headers(&self) -> std::borrow::Cow<'_, HeaderMap> {
        if self.range.is_none() && self.if_range.is_none() {
            return std::borrow::Cow::Borrowed(&self.headers);
        }
        let mut h = self.headers.clone();
        if let Some(v) = &self.range {
            h.insert(header::RANGE, v.clone());
        }
        if let Some(v) = &self.if_range {
            h.insert(header::IF_RANGE, v.clone());
        }
        std::borrow::Cow::Owned(h)
    }

    /// Is `o` of the version the client is pinned to (if it is)?
    fn version_matches(&self, o: &cache::Object) -> bool {
        let Some(v) = &self.version else { return true };
        o.header(headers::VERSION).is_some_and(|have| have == v.as_str())
    }
}

/// A region's error answer, read whole if small (so its connection is
/// free for others while the next region is tried).
async fn keep(resp: Response<Body>) -> Option<Response<Body>> {
    let (parts, body) = resp.into_parts();
    let read = tokio::time::timeout(Duration::from_secs(1), meridian_http::cluster::read_all(body, 64 << 10)).await;
    Some(Response::from_parts(parts, full(read.ok()?.ok()?)))
}

fn pq_of(uri: &Uri) -> &str {
    uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

/// The region the client's affinity cookie names.
fn affinity_cookie(h: &HeaderMap) -> Option<String> {
    meridian_http::cookie(h, headers::AFFINITY_COOKIE).map(String::from)
}

/// With affinity on (`sticky` is the cookie the client sent, if any), a
/// client served by another region than its cookie names is told to stay
/// with the one that served it.
fn with_affinity(mut resp: Response<Body>, sticky: Option<Option<String>>) -> Response<Body> {
    let Some(had) = sticky else { return resp };
    let Some(region) = resp.headers().get(headers::REGION).and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return resp;
    };
    if had.as_deref() != Some(region.as_str()) {
        let cookie = format!("{}={region}; Path=/; Max-Age=86400; SameSite=Lax; HttpOnly", headers::AFFINITY_COOKIE);
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// May this request go through the cache? GET and HEAD without a body,
/// without preconditions the cache does not evaluate (it answers `Range`,
/// `If-Range`, `If-None-Match` and `If-Modified-Since` itself).
fn cacheable_request(parts: &http::request::Parts, body: &Incoming) -> bool {
    matches!(parts.method, Method::GET | Method::HEAD)
        && http_body::Body::is_end_stream(body)
        && !parts.headers.contains_key(header::IF_MATCH)
        && !parts.headers.contains_key(header::IF_UNMODIFIED_SINCE)
        && !parts.headers.contains_key(header::UPGRADE)
        && !parts.headers.contains_key(headers::VERSION_OVERRIDE)
}

/// The client's address as an `x-forwarded-for` value. A client sends
/// many requests from one address (over one connection, mostly), so each
/// worker thread keeps the last one formatted.
fn peer_value(peer: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((ip, v)) if *ip == peer => v.clone(),
            _ => {
                // An address's text is always a valid header value.
                let v = HeaderValue::from_str(&peer.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
                *last = Some((peer, v.clone()));
                v
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, Fut, F: Fn(A, B, C) -> Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// A request's future is copied whole into its box and at each await
    /// that moves it, so its size is work done per request. The pool's
    /// send future (over a kilobyte) is boxed to keep it out; with it
    /// inline this future was 3.6 KB, boxed 2.5 KB. Past the bound,
    /// something large is held inline again.
    #[test]
    fn a_request_future_stays_small() {
        let handle = future_size(|e: Arc<Edge>, r: Request<Incoming>, p: SocketAddr| e.handle(r, p));
        assert!(handle <= 3 * 1024, "Edge::handle's future is {handle} bytes");
        let cached = future_size(|e: &Arc<Edge>, r: Arc<CacheRequest>, _: ()| e.cached(r));
        assert!(cached <= 2 * 1024, "Edge::cached's future is {cached} bytes");
    }
}
