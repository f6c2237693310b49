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
//! * a 5xx from the platform (not marked `x-meridian-fault: app`): counted
//!   towards ejection; retried if idempotent;
//! * a fault of the app itself (deadline, memory limit, trap): returned as is,
//!   not retried and not counted, since it would repeat in every region.
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

pub mod health;
pub mod limits;
pub mod select;

use meridian_http::pool;
use meridian_trust::{Expect, Role, Tls, TlsFiles};

use bytes::Bytes;
use health::{HealthConfig, RegionHealth};
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use meridian_core::{geo::country_centroid, headers, GeoPoint};
use meridian_http::{full, json, text, Body};
use select::{rank, Candidate, Policy};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    pub name: String,
    /// User traffic (plain HTTP/1.1 and h2c).
    pub listen: SocketAddr,
    /// Mutual TLS: the edge's status, for the control plane and operators.
    pub cluster_listen: SocketAddr,
    /// This edge's certificate; regions are reached with it.
    pub tls: TlsFiles,
    /// Where the edge is; clients that cannot be located are assumed near it.
    pub location: GeoPoint,
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
    /// Extra regions tried after the first one fails.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Time allowed for one region to produce a response head.
    #[serde(default = "default_upstream_timeout_ms")]
    pub upstream_timeout_ms: u64,
    /// Largest request body buffered for replay on another region.
    #[serde(default = "default_max_body_kb")]
    pub max_body_kb: usize,
}

fn default_max_retries() -> u32 {
    2
}
fn default_upstream_timeout_ms() -> u64 {
    30_000
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
}

struct Upstream {
    target: RegionTarget,
    /// `Host` of every request to this region (its cluster address), made
    /// once rather than per request.
    host: HeaderValue,
    pool: Arc<pool::Pool>,
    health: Mutex<RegionHealth>,
    /// Its location as a unit vector, for ranking without trigonometry.
    unit: meridian_core::geo::UnitVector,
}

pub struct Edge {
    config: EdgeConfig,
    pub tls: Arc<Tls>,
    upstreams: Vec<Upstream>,
    geoip: Option<maxminddb::Reader<Vec<u8>>>,
    edge_header: HeaderValue,
    /// Each app's rate, learned from the regions' health answers.
    limits: limits::AppLimits,
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
                let pool = pool::Pool::with_tls(
                    authority.to_string(),
                    Duration::from_millis(config.health.timeout_ms.max(100)),
                    tls.clone(),
                    Expect::new(&r.name, Role::Region),
                );
                let host = HeaderValue::from_str(authority.as_str())
                    .map_err(|_| EdgeError::BadUrl { name: r.name.clone(), url: r.url.clone() })?;
                Ok(Upstream {
                    target: r.clone(),
                    host,
                    pool,
                    health: Mutex::new(RegionHealth::new()),
                    unit: r.location.unit(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let geoip = match &config.geoip_db {
            None => None,
            Some(p) => Some(
                maxminddb::Reader::open_readfile(p)
                    .map_err(|e| EdgeError::GeoIp { path: p.clone(), message: e.to_string() })?,
            ),
        };
        let edge_header = HeaderValue::from_str(&config.name).unwrap_or(HeaderValue::from_static("edge"));
        Ok(Arc::new(Edge { config, tls, upstreams, geoip, edge_header, limits: Default::default() }))
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
        let ok = match tokio::time::timeout(timeout, u.pool.send(req)).await {
            Ok(Ok(resp)) => {
                let ok = resp.status() == StatusCode::OK;
                // Read to the end (so the connection returns to the pool):
                // the answer lists the apps' rate limits.
                if let Ok(body) = resp.into_body().collect().await {
                    #[derive(serde::Deserialize)]
                    struct Health {
                        #[serde(default)]
                        limits: Vec<meridian_core::wire::AppLimit>,
                    }
                    if let Ok(h) = serde_json::from_slice::<Health>(&body.to_bytes()) {
                        self.limits.update(h.limits);
                    }
                }
                ok
            }
            _ => false,
        };
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
        if self.config.trust_client_geo_headers {
            let hv = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
            if let Some(p) = hv(headers::CLIENT_GEO).and_then(|v| v.parse::<GeoPoint>().ok()) {
                return Located::Header(p);
            }
            if let Some(p) = hv(headers::CLIENT_COUNTRY).and_then(country_centroid) {
                return Located::Country(p);
            }
        }
        if let Some(db) = &self.geoip {
            if let Ok(Some(city)) = db.lookup::<maxminddb::geoip2::City>(peer) {
                let loc = city.location.as_ref().and_then(|l| Some(GeoPoint { lat: l.latitude?, lon: l.longitude? }));
                if let Some(p) = loc {
                    return Located::GeoIp(p);
                }
                if let Some(p) = city.country.as_ref().and_then(|c| c.iso_code).and_then(country_centroid) {
                    return Located::GeoIp(p);
                }
            }
        }
        Located::Edge(self.config.location)
    }

    /// Region indices to try, best first.
    fn plan(&self, client: GeoPoint) -> Vec<usize> {
        let cands: Vec<Candidate> =
            self.upstreams.iter().map(|u| Candidate::at(u.unit, &u.health.lock().unwrap())).collect();
        rank(self.config.policy, client, &cands)
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
        if req.uri().path() == headers::EDGE_STATUS_PATH {
            return json(StatusCode::OK, &self.status());
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
        let client = self.locate(&req, peer.ip());
        let order = self.plan(client.point());
        let (parts, body) = req.into_parts();
        // Buffered so it can be replayed on another region.
        let body = if http_body::Body::is_end_stream(&body) {
            Bytes::new()
        } else {
            match meridian_http::read_body(body, self.config.max_body_kb << 10).await {
                Ok(b) => b,
                Err(e) => return self.finish(e.into_response(), 0),
            }
        };
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        );
        let attempts = order.len().min(1 + self.config.max_retries as usize);
        let mut last_error = String::new();
        for (n, &i) in order.iter().take(attempts).enumerate() {
            let u = &self.upstreams[i];
            let last = n + 1 == attempts;
            let req = self.upstream_request(&parts, body.clone(), &u.host, peer.ip());
            let timeout = Duration::from_millis(self.config.upstream_timeout_ms);
            match tokio::time::timeout(timeout, u.pool.send(req)).await {
                Ok(Ok(resp)) => {
                    let platform_error =
                        resp.status().is_server_error() && !resp.headers().contains_key(headers::FAULT);
                    if platform_error {
                        u.health.lock().unwrap().server_error(&self.config.health);
                        if idempotent && !last {
                            last_error = format!("{} answered {}", u.target.name, resp.status());
                            tracing::debug!(region = %u.target.name, status = %resp.status(), "retrying on next region");
                            continue;
                        }
                    } else {
                        u.health.lock().unwrap().request_ok();
                    }
                    return self.finish(resp, n + 1);
                }
                Ok(Err(e)) => {
                    let connect = matches!(e, pool::SendError::Connect(_));
                    u.health.lock().unwrap().connection_failed();
                    last_error = format!("{}: {e}", u.target.name);
                    tracing::info!(region = %u.target.name, error = %e, connect, "region failed; ejected");
                    if !(connect || idempotent) {
                        return self.finish(
                            text(
                                StatusCode::BAD_GATEWAY,
                                format!(
                                    "region {} failed mid-request: {e}; not retried because {} is not idempotent",
                                    u.target.name, parts.method
                                ),
                            ),
                            n + 1,
                        );
                    }
                }
                Err(_) => {
                    u.health.lock().unwrap().connection_failed();
                    last_error = format!("{} did not answer within {timeout:?}", u.target.name);
                    if !idempotent {
                        return self.finish(text(StatusCode::GATEWAY_TIMEOUT, last_error), n + 1);
                    }
                }
            }
        }
        self.finish(
            text(StatusCode::BAD_GATEWAY, format!("no region could serve the request (last error: {last_error})")),
            attempts,
        )
    }

    fn upstream_request(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        host: &HeaderValue,
        peer: IpAddr,
    ) -> Request<Body> {
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri = Uri::builder().path_and_query(pq).build();
        let mut req = Request::new(full(body));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri.unwrap_or_else(|_| Uri::from_static("/"));
        let h = req.headers_mut();
        for (k, v) in &parts.headers {
            if !is_hop_by_hop(k) && k != header::HOST {
                h.append(k.clone(), v.clone());
            }
        }
        let original_host = parts
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        if let Some(host) = original_host {
            h.insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        h.insert(header::HOST, host.clone());
        let xff = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {peer}"),
            None => peer.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        h.insert(headers::EDGE, self.edge_header.clone());
        req
    }

    fn finish(&self, mut resp: Response<Body>, attempts: usize) -> Response<Body> {
        let h = resp.headers_mut();
        for k in HOP_BY_HOP {
            h.remove(*k);
        }
        h.insert(headers::EDGE, self.edge_header.clone());
        h.insert(headers::ATTEMPTS, HeaderValue::from(attempts));
        resp
    }

    pub fn status(&self) -> EdgeStatus {
        EdgeStatus {
            edge: self.config.name.clone(),
            policy: self.config.policy,
            regions: self.upstreams.iter().map(|u| (u.target.name.clone(), u.health.lock().unwrap().clone())).collect(),
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EdgeStatus {
    pub edge: String,
    pub policy: Policy,
    pub regions: Vec<(String, RegionHealth)>,
}

const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}
