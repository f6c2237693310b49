//! A region node: runs the active version of every app of the world
//! (functions and static assets), each app chosen by the request's host,
//! and lets the control plane create and delete apps and install and
//! switch their versions. Apps share nothing but the node: each has its own
//! versions, limits and key-value store ([`App`]).
//!
//! Versions are installed ahead of time: the bundle is verified, every
//! component compiled (or loaded from the compile cache) and pre-instantiated,
//! and only then may the version be activated. Activation is one atomic
//! pointer swap: a request holds the version it started with until it ends,
//! so requests in flight finish on the old version and none fail.
//!
//! The node persists each app's record, the bundles it installed and which
//! one is active; after a restart it serves the same versions without
//! asking anyone and without compiling.
//!
//! Two doors. The **public** port carries app traffic only: anything under
//! `/_meridian/` answers 404 there. The **cluster** port is mutual TLS with
//! certificates from the cluster CA; it carries app traffic from edges (and
//! from regions forwarding a request) and every internal API, each allowed
//! only to the roles that need it ([`authorize`]), judged by the caller's
//! certificate.

mod app;
mod request_kv;
mod statics;

pub use app::{App, Deployed, InstallError};

pub use meridian_data::{kv, repl, strong};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
pub use meridian_core::wire::{AppRecord, AppRemoved, Peer, RegionStatus};
use meridian_core::{headers, VersionId};
use meridian_host::{Host, HostConfig};
use meridian_http::cluster::ClusterClient;
use meridian_http::{json, text, Body, Peer as PeerCert, Role, Tls};
use meridian_manifest::RouteTarget;
use meridian_trust::TlsFiles;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a request handed to a peer (while this region catches up,
/// or to follow a causality token) may wait for the peer's answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// For an idempotent request with another peer left to try: the wait for
/// the answer's head before that peer is tried instead (at least; longer
/// for an app whose functions may take longer, see [`answer_within`]).
const FORWARD_FIRST_BYTE: Duration = Duration::from_secs(5);

/// The longest a healthy region may take to start answering a request of
/// an app with this manifest: its slowest function's deadline plus a
/// margin; `None` when it has no functions (its files answer at once).
/// Waiting less for a region's answer would take a slow function for a
/// dead region.
pub fn answer_within(manifest: &meridian_manifest::Manifest) -> Option<Duration> {
    let slowest = manifest.components.values().map(|c| c.limits.deadline_ms).max()?;
    Some(Duration::from_millis(slowest.saturating_add(meridian_core::wire::ANSWER_MARGIN_MS)))
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    /// App traffic from users, plain HTTP. Nothing internal answers here.
    pub public_listen: std::net::SocketAddr,
    /// Mutual TLS: edges, other regions, the control plane, operators.
    pub cluster_listen: std::net::SocketAddr,
    pub data_dir: PathBuf,
    /// This region's certificate (its name and jurisdiction come from it).
    pub tls: TlsFiles,
    /// The world's secret for causality tokens (`meridian certs init`
    /// writes `cluster.key`); every region of a world has the same one.
    pub cluster_key_file: PathBuf,
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// The most instances one app may run at once here (default: a quarter
    /// of `max_instances`), so no app can take the node from the others;
    /// an app's `max_concurrency` can only lower it.
    #[serde(default)]
    pub max_instances_per_app: Option<u32>,
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: u64,
    /// How instance slots are recycled between requests (`[pooling]`;
    /// the defaults are chosen by measurement, see docs/roles.md).
    #[serde(default)]
    pub pooling: meridian_host::Pooling,
    #[serde(default = "default_max_bundle_mb")]
    pub max_bundle_mb: u64,
    /// Regions to replicate with. Can also be set at runtime
    /// (`PUT /_meridian/peers`).
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// How often anti-entropy compares digests with each peer.
    #[serde(default = "default_anti_entropy_ms")]
    pub anti_entropy_ms: u64,
    /// How long a request with a causality token waits for the writes it
    /// names before it is forwarded to the region that made them.
    #[serde(default = "default_causality_wait_ms")]
    pub causality_wait_ms: u64,
    /// The longest an app's data keeps users away after its store opens
    /// (a restart, a wipe) while it catches up with its reachable peers;
    /// then the region serves what it has.
    #[serde(default = "default_rejoin_bound_ms")]
    pub rejoin_bound_ms: u64,
}

fn default_rejoin_bound_ms() -> u64 {
    60_000
}

fn default_anti_entropy_ms() -> u64 {
    3000
}
fn default_causality_wait_ms() -> u64 {
    500
}

fn default_max_instances() -> u32 {
    1000
}
fn default_max_memory_mb() -> u64 {
    1024
}
fn default_max_bundle_mb() -> u64 {
    256
}

/// Why a region cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("certificates: {0}")]
    Trust(#[from] meridian_trust::TrustError),
    #[error("the certificate is for {found}, but this config is region {name:?}: issue one with `meridian certs issue --role region --name {name} --jurisdiction J`")]
    WrongIdentity { name: String, found: meridian_trust::Identity },
}

/// The apps a node holds, and how a request's host finds one. Replaced
/// whole (copy on write) when an app is created, changed or deleted.
#[derive(Default)]
struct Apps {
    by_name: HashMap<String, Arc<App>>,
    by_host: HashMap<String, Arc<App>>,
    default: Option<Arc<App>>,
}

impl Apps {
    fn new(apps: impl IntoIterator<Item = Arc<App>>) -> Apps {
        let mut t = Apps::default();
        for a in apps {
            let r = a.record.load();
            for h in &r.hosts {
                t.by_host.insert(h.clone(), a.clone());
            }
            if r.default {
                t.default = Some(a.clone());
            }
            t.by_name.insert(a.name.clone(), a.clone());
        }
        t
    }

    /// The app a request's host names: an app's hostname, or the default
    /// app for a bare address.
    fn for_host(&self, host: Option<&str>) -> Result<&Arc<App>, String> {
        let Some(host) = host else {
            return self.default.as_ref().ok_or_else(|| "the request names no host and no app is the default".into());
        };
        if let Some(a) = self.by_host.get(host) {
            return Ok(a);
        }
        if meridian_core::wire::is_bare_address(host) {
            if let Some(a) = &self.default {
                return Ok(a);
            }
        }
        Err(format!("no app is served at host {host:?}"))
    }
}

pub struct Region {
    pub config: RegionConfig,
    /// This node's certificate and TLS configurations (reloaded live).
    pub tls: Arc<Tls>,
    host: Arc<Host>,
    region_header: HeaderValue,
    node: app::Node,
    apps: ArcSwap<Apps>,
    /// Serialises creating and deleting apps.
    apps_lock: tokio::sync::Mutex<()>,
    /// Installs compile on the blocking pool; one at a time keeps a deploy
    /// from starving the request path of CPU on small machines.
    install_lock: tokio::sync::Mutex<()>,
}

impl Region {
    /// Opens the data directory and every app recorded in it; an app that
    /// had an active version installs it again from disk (from the compile
    /// cache) and activates it.
    pub async fn open(config: RegionConfig) -> anyhow::Result<Arc<Region>> {
        let tls = Tls::load(config.tls.clone()).map_err(OpenError::from)?;
        let me = tls.identity();
        if me.role != Role::Region || me.name != config.name {
            return Err(OpenError::WrongIdentity { name: config.name.clone(), found: me }.into());
        }
        // Residency trusts the certificate, never the config.
        let jurisdiction = me.jurisdiction.clone().unwrap_or_default();
        tls.spawn_reloader();
        let cluster_key = std::fs::read_to_string(&config.cluster_key_file)
            .map_err(|e| anyhow::anyhow!("cannot read the cluster key {}: {e}", config.cluster_key_file.display()))?
            .trim()
            .as_bytes()
            .to_vec();
        if cluster_key.len() < 32 {
            anyhow::bail!("the cluster key {} is shorter than 32 bytes", config.cluster_key_file.display());
        }
        std::fs::create_dir_all(config.data_dir.join("apps"))?;
        let host = Host::new(HostConfig {
            cache_dir: config.data_dir.join("compiled"),
            max_instances: config.max_instances,
            max_memory_mb: config.max_memory_mb,
            pooling: config.pooling.clone(),
        })?;
        let region_header = HeaderValue::from_str(&config.name)?;
        let node = app::Node {
            region: config.name.clone(),
            jurisdiction,
            cluster: ClusterClient::new(tls.clone(), Duration::from_secs(2)),
            causality_key: kv::CausalityKey::new(cluster_key),
            anti_entropy: Duration::from_millis(config.anti_entropy_ms.max(50)),
            causality_wait: Duration::from_millis(config.causality_wait_ms),
            rejoin_bound: Duration::from_millis(config.rejoin_bound_ms),
            peers: ArcSwap::from_pointee(config.peers.iter().filter(|p| p.name != config.name).cloned().collect()),
            instance_share: config
                .max_instances_per_app
                .unwrap_or(config.max_instances / 4)
                .clamp(1, config.max_instances.max(1)),
        };
        let mut apps = Vec::new();
        for e in std::fs::read_dir(config.data_dir.join("apps"))? {
            let dir = e?.path();
            match App::load(&dir) {
                Some(Ok(a)) => apps.push(Arc::new(a)),
                Some(Err(e)) => anyhow::bail!("unreadable app record {e}"),
                // A directory without a record is an app whose deletion
                // was interrupted: finish it.
                None => {
                    let (files, bytes) = app::remove_tree(&dir)?;
                    tracing::info!(dir = %dir.display(), files, bytes, "finished deleting an app");
                }
            }
        }
        let region = Arc::new(Region {
            config,
            tls,
            host: Arc::new(host),
            region_header,
            node,
            apps: ArcSwap::from_pointee(Apps::new(apps.iter().cloned())),
            apps_lock: tokio::sync::Mutex::new(()),
            install_lock: tokio::sync::Mutex::new(()),
        });
        for a in &apps {
            let _guard = region.install_lock.lock().await;
            a.restore(&region.node, &region.host).await?;
        }
        Ok(region)
    }

    /// The addresses this node listens on: no guest may ever reach them,
    /// whatever its manifest lists.
    pub fn forbid_guest_access(&self, addrs: Vec<std::net::SocketAddr>) {
        self.host.forbid_addrs(addrs);
    }

    /// Stops background work (replication, Raft) so the region's data can be
    /// closed and opened again in this process once the region is dropped.
    pub async fn shutdown(&self) {
        let apps: Vec<Arc<App>> = self.apps.load().by_name.values().cloned().collect();
        for a in apps {
            a.stop().await;
        }
    }

    /// An app this node holds.
    pub fn app(&self, name: &str) -> Option<Arc<App>> {
        self.apps.load().by_name.get(name).cloned()
    }

    /// Installs a version of an app (one compile at a time on this node).
    pub async fn install(&self, app: &App, id: &VersionId, tar: Bytes) -> Result<Arc<Deployed>, InstallError> {
        let _guard = self.install_lock.lock().await;
        app.install(&self.node, &self.host, id, tar).await
    }

    /// Switches an app to an installed version.
    pub fn activate(&self, app: &App, id: &VersionId) -> Result<(), String> {
        app.activate(&self.node, id)
    }

    /// Creates an app, or updates its record (hostnames, default).
    pub async fn put_app(&self, record: AppRecord) -> Result<(), (StatusCode, String)> {
        if !meridian_core::wire::is_valid_app_name(&record.name) {
            return Err((StatusCode::BAD_REQUEST, format!("{:?} is not an app name", record.name)));
        }
        if let Some(h) = record.hosts.iter().find(|h| !meridian_core::wire::is_valid_hostname(h)) {
            return Err((StatusCode::BAD_REQUEST, format!("{h:?} is not a hostname")));
        }
        let _guard = self.apps_lock.lock().await;
        let current = self.apps.load_full();
        let io = |e: std::io::Error| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot record the app: {e}"));
        let app = match current.by_name.get(&record.name) {
            Some(a) if **a.record.load() == record => return Ok(()),
            Some(a) => {
                a.set_record(record.clone()).map_err(io)?;
                a.clone()
            }
            None => Arc::new(App::create(&self.config.data_dir, record.clone()).map_err(io)?),
        };
        // One default, and a hostname belongs to one app: the newest
        // record wins (the control plane keeps them consistent anyway).
        let mut all: Vec<Arc<App>> = current.by_name.values().filter(|a| a.name != app.name).cloned().collect();
        for other in &all {
            let r = other.record.load();
            if (record.default && r.default) || r.hosts.iter().any(|h| record.hosts.contains(h)) {
                let mut r = (**r).clone();
                r.default &= !record.default;
                r.hosts.retain(|h| !record.hosts.contains(h));
                other.set_record(r).map_err(io)?;
            }
        }
        all.push(app);
        self.apps.store(Arc::new(Apps::new(all)));
        tracing::info!(app = %record.name, hosts = ?record.hosts, default = record.default, "app recorded");
        Ok(())
    }

    /// Deletes an app and everything it stored on this node.
    pub async fn delete_app(&self, name: &str) -> Result<AppRemoved, (StatusCode, String)> {
        let _guard = self.apps_lock.lock().await;
        let current = self.apps.load_full();
        let Some(app) = current.by_name.get(name).cloned() else {
            // Already gone (a retried delete): nothing left to remove.
            return Ok(AppRemoved { region: self.config.name.clone(), app: name.to_string(), files: 0, bytes: 0 });
        };
        self.apps.store(Arc::new(Apps::new(current.by_name.values().filter(|a| a.name != name).cloned())));
        app.remove(&self.config.name)
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot remove the app's files: {e}")))
    }

    /// Every request on the public port: app traffic only, the app chosen
    /// by the `Host` header.
    pub async fn handle_public(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        if req.uri().path().starts_with(headers::RESERVED_PREFIX) {
            return text(StatusCode::NOT_FOUND, format!("no route serves {}", req.uri().path()));
        }
        // Only a region may say it forwarded a request, or which app it is for.
        req.headers_mut().remove(headers::FORWARDED);
        req.headers_mut().remove(headers::APP);
        req.headers_mut().remove(headers::VERSION_OVERRIDE);
        let host = request_host(&req, http::header::HOST.as_str());
        let app = match self.apps.load().for_host(host.as_deref()) {
            Ok(a) => a.clone(),
            Err(why) => return self.no_app(why),
        };
        self.handle_app(app, req).await
    }

    /// Every request on the cluster port; the TLS layer has verified the
    /// caller's certificate, and [`authorize`] decides what it may call.
    pub async fn handle_cluster(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        // The identity is shared with the connection: an Arc, not a copy.
        let Some(peer) = req.extensions().get::<PeerCert>().map(|p| p.0.clone()) else {
            return text(StatusCode::UNAUTHORIZED, "the cluster port needs a client certificate from the cluster CA");
        };
        let path = req.uri().path();
        if let Err(why) = authorize(&peer, path) {
            tracing::warn!(caller = %peer, path, "refused: {why}");
            return text(StatusCode::FORBIDDEN, format!("{peer} may not call {path}: {why}"));
        }
        // A request that names an app or a version is that app's traffic
        // (a region forwarding it, a smoke test): never the platform's API,
        // whoever sends it. Otherwise a manifest's smoke test, sent with the
        // control plane's certificate, could call any app's API.
        let names_app = req.headers().contains_key(headers::APP) || req.headers().contains_key(headers::VERSION_OVERRIDE);
        if names_app && headers::is_reserved_path(path) {
            tracing::warn!(caller = %peer, path, "refused: app traffic at a reserved path");
            return text(
                StatusCode::FORBIDDEN,
                format!("{path} is reserved for the platform; a request naming an app or a version is that app's traffic"),
            );
        }
        if path.starts_with(headers::RESERVED_PREFIX) {
            return self.admin(req, &peer).await;
        }
        if peer.role != Role::Region {
            req.headers_mut().remove(headers::FORWARDED);
        }
        // Only the control plane (smoke tests) and operators pick a version.
        if !matches!(peer.role, Role::Control | Role::Operator) {
            req.headers_mut().remove(headers::VERSION_OVERRIDE);
        }
        // A region forwarding a request names its app; an edge passes the
        // user's host on; the control plane and operators may do either.
        let named = match peer.role {
            Role::Region | Role::Control | Role::Operator => {
                req.headers().get(headers::APP).and_then(|v| v.to_str().ok()).map(str::to_string)
            }
            _ => None,
        };
        let apps = self.apps.load();
        let app = match named {
            Some(name) => apps.by_name.get(&name).ok_or_else(|| format!("no app named {name:?} here")),
            // An edge says which host it chose the app by, or names none
            // (the default app's): the Host it sends is this node's own.
            None if peer.role == Role::Edge => apps.for_host(request_host(&req, "x-forwarded-host").as_deref()),
            None => {
                let host = request_host(&req, "x-forwarded-host").or_else(|| request_host(&req, "host"));
                apps.for_host(host.as_deref())
            }
        };
        let app = match app {
            Ok(a) => a.clone(),
            Err(why) => return self.no_app(why),
        };
        drop(apps);
        self.handle_app(app, req).await
    }

    fn no_app(&self, why: String) -> Response<Body> {
        let mut r = text(StatusCode::NOT_FOUND, why);
        r.headers_mut().insert(headers::REGION, self.region_header.clone());
        r
    }

    async fn handle_app(self: Arc<Self>, app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
        let (version, pin) = match pick_version(&app, &req) {
            Ok(v) => v,
            Err(e) => {
                let mut r = e.into_response();
                r.headers_mut().insert(headers::REGION, self.region_header.clone());
                return r;
            }
        };
        if version.admission.rate.as_ref().is_some_and(|r| r.check().is_err()) {
            app.counters.count(StatusCode::TOO_MANY_REQUESTS, false);
            return self.too_many("the app's requests_per_second in this region");
        }
        let kv = app.kv();
        // Data still catching up after a restart: a request is served by
        // the nearest peer (the edges keep users away meanwhile; this is
        // for those that got here anyway).
        if let Some(kv) = kv.as_ref().filter(|kv| kv.rejoin.catching_up()) {
            if !req.headers().contains_key(headers::FORWARDED) {
                let mut peers: Vec<Peer> = kv.peers.load().iter().cloned().collect();
                peers.sort_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms));
                if !peers.is_empty() {
                    let why = "this region is catching up";
                    return self
                        .forward_request(&app.name, kv, &peers, why, answer_within(&version.manifest), req)
                        .await;
                }
            }
        }
        // Causality: serve a request that follows a write only where that
        // write is applied: wait a little, else hand it to the region that
        // made the write.
        if let Some(kv) = &kv {
            let token = causality_token(kv, &req);
            if !token.is_empty() && !req.headers().contains_key(headers::FORWARDED) && !kv.wait_for(&token).await {
                let origin = token.iter().find(|e| !kv.has_applied(std::slice::from_ref(e))).map(|e| e.origin.clone());
                let peer = origin.and_then(|o| kv.peers.load().iter().find(|p| p.name == o).cloned());
                if let Some(peer) = peer {
                    let why = "its causality token is not applied here yet";
                    return self
                        .forward_request(&app.name, kv, &[peer], why, answer_within(&version.manifest), req)
                        .await;
                }
            }
        }
        let started = Instant::now();
        let mut resp = self.serve_app(&version, kv, req).await;
        app.counters.count(resp.status(), resp.extensions().get::<meridian_host::Fault>().is_some());
        version.stats.record(started.elapsed(), resp.status().is_server_error());
        let h = resp.headers_mut();
        h.insert(headers::REGION, self.region_header.clone());
        h.insert(headers::VERSION, version.version_header.clone());
        // While a rollout splits this app's traffic, the client keeps the
        // version it got.
        if pin {
            let cookie =
                format!("{}={}; Path=/; Max-Age=3600; SameSite=Lax", headers::VERSION_COOKIE, version.id.short());
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                h.append(http::header::SET_COOKIE, v);
            }
        }
        resp
    }

    async fn serve_app(
        &self,
        version: &Deployed,
        kv: Option<Arc<kv::KvService>>,
        mut req: Request<Incoming>,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        let Some(route) = version.manifest.route_for(&path) else {
            return text(StatusCode::NOT_FOUND, format!("no route serves {path}"));
        };
        match &route.target {
            RouteTarget::Static(dir) => {
                let rel = path.strip_prefix(route.path.as_str()).unwrap_or("");
                let mut resp = match version.statics.get(dir) {
                    Some(site) => site.serve(&req, rel),
                    None => text(StatusCode::NOT_FOUND, format!("no file at {path}")),
                };
                statics::cache_headers(route, &mut resp, Some(rel));
                resp
            }
            RouteTarget::Component(name) => {
                let Some(component) = version.components.get(name) else {
                    return platform_fault(StatusCode::INTERNAL_SERVER_ERROR, format!("component {name} missing"));
                };
                // Held while the function runs: an app at its concurrency
                // cannot take more of the region's instances.
                let Ok(_slot) = version.admission.slots.clone().try_acquire_owned() else {
                    return self
                        .too_many("the app's concurrency (max_concurrency, or its share of instances) in this region");
                };
                // The function learns where it runs from trusted headers; a
                // client cannot spoof them.
                let h = req.headers_mut();
                h.insert(headers::REGION, self.region_header.clone());
                h.insert(headers::VERSION, version.version_header.clone());
                // An app without a store has no buckets: every open fails
                // with an error value.
                let Some(svc) = kv else {
                    let mut resp = component.handle(req, None).await;
                    guest_answer(&mut resp, false);
                    statics::cache_headers(route, &mut resp, None);
                    return resp;
                };
                let token = causality_token(&svc, &req);
                let idem = match req.headers().get(headers::IDEMPOTENCY_KEY).map(request_kv::idempotency_key) {
                    Some(Err(e)) => return text(StatusCode::BAD_REQUEST, e),
                    Some(Ok(k)) => Some(k),
                    None => None,
                };
                let mut kv = request_kv::RequestKv::new(svc, version.namespaces.clone(), token);
                kv.idem = idem;
                let kv = Arc::new(kv);
                let written = kv.token.lock().unwrap().len();
                let mut resp = component.handle(req, Some(kv.clone() as Arc<dyn meridian_host::KvBackend>)).await;
                guest_answer(&mut resp, kv.dependency_failed.load(std::sync::atomic::Ordering::Relaxed));
                statics::cache_headers(route, &mut resp, None);
                if let Some(j) = kv.residency().and_then(|j| HeaderValue::from_str(&j).ok()) {
                    resp.headers_mut().insert(headers::RESIDENCY, j);
                }
                if let Some(o) = kv.write_outcome() {
                    resp.headers_mut().insert(headers::WRITE_OUTCOME, HeaderValue::from_static(o.header()));
                }
                // A response that followed writes carries their token (merged
                // with the one the request brought), as a header and a cookie.
                let token = kv.token.lock().unwrap().clone();
                if token.len() > written || (!token.is_empty() && kv_wrote(&token, &self.config.name)) {
                    let t = kv.svc.causality_key.seal(&token);
                    if let Ok(v) = HeaderValue::from_str(&t) {
                        resp.headers_mut().insert(headers::CAUSALITY, v);
                    }
                    if let Ok(v) = HeaderValue::from_str(&format!(
                        "{}={t}; Path=/; Max-Age=600; SameSite=Lax",
                        headers::CAUSALITY_COOKIE
                    )) {
                        resp.headers_mut().append(http::header::SET_COOKIE, v);
                    }
                }
                resp
            }
        }
    }

    async fn admin(&self, req: Request<Incoming>, peer: &meridian_trust::Identity) -> Response<Body> {
        let path = req.uri().path()[headers::RESERVED_PREFIX.len()..].to_string();
        let method = req.method().clone();
        let parts: Vec<&str> = path.split('/').collect();
        match (method, parts.as_slice()) {
            (Method::GET, ["health"]) => self.health(),
            (Method::GET, ["status"]) => json(StatusCode::OK, &self.status()),
            (Method::GET, ["metrics"]) => self.metrics(),
            (Method::PUT, ["peers"]) => match meridian_http::read_body(req.into_body(), 1 << 20).await {
                Ok(b) => match serde_json::from_slice::<Vec<Peer>>(&b) {
                    Ok(peers) => {
                        let peers: Vec<Peer> = peers.into_iter().filter(|p| p.name != self.config.name).collect();
                        self.node.peers.store(Arc::new(peers.clone()));
                        for a in self.apps.load().by_name.values() {
                            if let Some(kv) = a.kv() {
                                kv.set_peers(peers.clone());
                            }
                        }
                        json(StatusCode::OK, &peers)
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("expected a list of peers: {e}")),
                },
                Err(e) => e.into_response(),
            },
            // Compiled code the control plane made once for every region.
            (Method::GET | Method::HEAD, ["compiled", digest]) => {
                if self.host.has_artifact(digest) {
                    text(StatusCode::OK, "present")
                } else {
                    text(StatusCode::NOT_FOUND, "absent")
                }
            }
            (Method::PUT, ["compiled", digest]) => {
                let digest = digest.to_string();
                let req_headers = req.headers().clone();
                let engine = req.headers().get(headers::ENGINE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                let limit = (self.config.max_bundle_mb as usize) << 22;
                let body = match meridian_http::read_body(req.into_body(), limit).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                let header =
                    |n: &str| req_headers.get(n).and_then(|v| v.to_str().ok()).and_then(|v| hex::decode(v).ok());
                let (Some(sig), Some(cert)) = (header(headers::SIGNATURE), header(headers::SIGNER)) else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "compiled code must come signed (x-meridian-signature, x-meridian-signer)",
                    );
                };
                let (host, tls) = (self.host.clone(), self.tls.clone());
                let stored = tokio::task::spawn_blocking(move || {
                    // Loading native code trusts its producer: only code the
                    // control plane signed for this component and engine.
                    use sha2::Digest;
                    let msg = headers::artifact_message(&digest, &engine, &sha2::Sha256::digest(&body));
                    match tls.verify_signed(&cert, &msg, &sig) {
                        Ok(who) if who.role == Role::Control => {}
                        Ok(who) => return Err(ArtifactRefused::NotControl(who)),
                        Err(e) => return Err(ArtifactRefused::Signature(e)),
                    }
                    host.accept_artifact(&digest, &engine, &body).map_err(ArtifactRefused::Stored)
                })
                .await;
                match stored {
                    Ok(Ok(())) => text(StatusCode::OK, "stored"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "compiled code refused");
                        let status = match e {
                            ArtifactRefused::Stored(meridian_host::ArtifactError::Io(_)) => {
                                StatusCode::INTERNAL_SERVER_ERROR
                            }
                            ArtifactRefused::Stored(meridian_host::ArtifactError::OtherEngine { .. }) => {
                                StatusCode::CONFLICT
                            }
                            _ => StatusCode::FORBIDDEN,
                        };
                        text(status, format!("compiled code refused: {e}"))
                    }
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            (Method::GET, ["apps"]) => {
                let mut list: Vec<AppRecord> =
                    self.apps.load().by_name.values().map(|a| (**a.record.load()).clone()).collect();
                list.sort_by(|a, b| a.name.cmp(&b.name));
                json(StatusCode::OK, &list)
            }
            (Method::PUT, ["apps", name]) => {
                let record = match meridian_http::read_body(req.into_body(), 64 << 10).await {
                    Ok(b) => match serde_json::from_slice::<AppRecord>(&b) {
                        Ok(r) if r.name == *name => r,
                        Ok(r) => return text(StatusCode::BAD_REQUEST, format!("the record is app {:?}", r.name)),
                        Err(e) => return text(StatusCode::BAD_REQUEST, format!("expected an app record: {e}")),
                    },
                    Err(e) => return e.into_response(),
                };
                match self.put_app(record).await {
                    Ok(()) => json(StatusCode::OK, &self.app(name).map(|a| a.status())),
                    Err((status, msg)) => text(status, msg),
                }
            }
            (Method::DELETE, ["apps", name]) => match self.delete_app(name).await {
                Ok(removed) => json(StatusCode::OK, &removed),
                Err((status, msg)) => text(status, msg),
            },
            (method, ["apps", name, rest @ ..]) => {
                let Some(app) = self.app(name) else {
                    return text(
                        StatusCode::NOT_FOUND,
                        format!("no app named {name:?} in region {}", self.config.name),
                    );
                };
                self.app_admin(app, method, rest, req, peer).await
            }
            _ => text(StatusCode::NOT_FOUND, format!("no such API: {path}")),
        }
    }

    /// `/_meridian/apps/<name>/...`: one app's versions and data.
    async fn app_admin(
        &self,
        app: Arc<App>,
        method: Method,
        rest: &[&str],
        req: Request<Incoming>,
        peer: &meridian_trust::Identity,
    ) -> Response<Body> {
        match (method, rest) {
            (Method::GET, ["status"]) => json(StatusCode::OK, &app.status()),
            (Method::PUT, ["versions", id]) => {
                let id: VersionId = match id.parse() {
                    Ok(id) => id,
                    Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
                };
                let limit = (self.config.max_bundle_mb as usize) << 20;
                let body = match meridian_http::read_body(req.into_body(), limit).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                let t = Instant::now();
                match self.install(&app, &id, body).await {
                    Ok(d) => json(
                        StatusCode::OK,
                        &serde_json::json!({
                            "region": self.config.name,
                            "app": app.name,
                            "version": id,
                            "compiled_ms": t.elapsed().as_millis() as u64,
                            "from_cache": d.all_cached,
                        }),
                    ),
                    Err(e) => {
                        tracing::warn!(app = %app.name, version = id.short(), error = %e, "install refused");
                        text(StatusCode::UNPROCESSABLE_ENTITY, format!("region {}: {e}", self.config.name))
                    }
                }
            }
            (Method::GET, ["stats"]) => json(StatusCode::OK, &app.stats()),
            (Method::PUT, ["split"]) => {
                let split = match meridian_http::read_body(req.into_body(), 1024).await {
                    Ok(b) => match serde_json::from_slice::<meridian_core::wire::Split>(&b) {
                        Ok(s) => s,
                        Err(e) => return text(StatusCode::BAD_REQUEST, format!("expected {{version, percent}}: {e}")),
                    },
                    Err(e) => return e.into_response(),
                };
                match app.set_split(&split) {
                    Ok(()) => json(StatusCode::OK, &app.status()),
                    Err(e) => text(StatusCode::CONFLICT, e),
                }
            }
            (Method::DELETE, ["split"]) => {
                app.clear_split();
                json(StatusCode::OK, &app.status())
            }
            (Method::DELETE, ["active"]) => match app.deactivate() {
                Ok(()) => json(StatusCode::OK, &app.status()),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot record the change: {e}")),
            },
            (Method::PUT, ["active"]) => {
                let body = match meridian_http::read_body(req.into_body(), 1024).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                let id: VersionId = match std::str::from_utf8(&body).ok().and_then(|s| s.trim().parse().ok()) {
                    Some(id) => id,
                    None => return text(StatusCode::BAD_REQUEST, "body must be a version id"),
                };
                match self.activate(&app, &id) {
                    Ok(()) => json(StatusCode::OK, &app.status()),
                    Err(e) => text(StatusCode::CONFLICT, e),
                }
            }
            (_, [first, ..]) if matches!(*first, "kv" | "repl" | "raft" | "metrics") => {
                // What a peer sends (replication, Raft, an operation) opens
                // the app's store if this region has none yet; reading
                // status never creates one.
                let writes = matches!(rest, ["repl", ..] | ["raft", ..] | ["kv", "op"]);
                let kv = if writes {
                    match app.kv_or_open(&self.node) {
                        Ok(kv) => kv,
                        Err(e) => {
                            let msg = format!("app {}: cannot open its store: {e}", app.name);
                            return text(StatusCode::SERVICE_UNAVAILABLE, msg);
                        }
                    }
                } else {
                    match app.kv() {
                        Some(kv) => kv,
                        None => {
                            let msg = format!("app {} has no key-value store in region {}", app.name, self.config.name);
                            return text(StatusCode::NOT_FOUND, msg);
                        }
                    }
                };
                kv.admin(req, rest, peer).await
            }
            _ => text(StatusCode::NOT_FOUND, format!("no such API for app {}: {}", app.name, rest.join("/"))),
        }
    }

    /// Hands an app request to another region — the first of `peers` that
    /// can be reached (a peer that could not be sent anything is skipped);
    /// its answer comes back as is.
    async fn forward_request(
        &self,
        app: &str,
        kv: &kv::KvService,
        peers: &[Peer],
        why: &str,
        answer_within: Option<Duration>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let first_byte = meridian_core::wire::first_byte_wait(FORWARD_FIRST_BYTE, answer_within, FORWARD_TIMEOUT);
        let (parts, body) = req.into_parts();
        let body = match meridian_http::read_body(body, 8 << 20).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        // A peer behind a black-holed link takes the request and never
        // answers: an idempotent request waits for a head only so long
        // before the next peer is tried (as an edge does); others wait the
        // full timeout, since they must not run twice.
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        );
        let mut last = String::from("no region to forward to");
        for (n, peer) in peers.iter().enumerate() {
            let wait = if idempotent && n + 1 < peers.len() { first_byte } else { FORWARD_TIMEOUT };
            let target = match kv.target(peer) {
                Ok(t) => t,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let mut b = Request::builder().method(parts.method.clone()).uri(pq);
            for (k, v) in parts.headers.iter() {
                if k != http::header::HOST && k != headers::APP {
                    b = b.header(k, v);
                }
            }
            b = b.header(headers::FORWARDED, self.config.name.as_str()).header(headers::APP, app);
            let Ok(out) = b.body(meridian_http::full(body.clone())) else {
                return text(StatusCode::BAD_REQUEST, "cannot forward this request");
            };
            tracing::debug!(to = %peer.name, why, "forwarding a request");
            let mut resp = match tokio::time::timeout(wait, kv.cluster.send(&target, out)).await {
                Ok(Ok(resp)) => return resp,
                Ok(Err(e)) if e.nothing_sent() => {
                    last = format!("{}: {e}", peer.name);
                    continue;
                }
                Err(_) if wait < FORWARD_TIMEOUT => {
                    tracing::info!(to = %peer.name, ?wait, "no answer to a forwarded idempotent request; trying the next peer");
                    last = format!("{}: no answer within {wait:?}", peer.name);
                    continue;
                }
                Ok(Err(e)) => {
                    text(StatusCode::BAD_GATEWAY, format!("{} did not answer a forwarded request: {e}", peer.name))
                }
                Err(_) => {
                    text(StatusCode::GATEWAY_TIMEOUT, format!("{} did not answer a forwarded request", peer.name))
                }
            };
            // Another region's failure, not this one's.
            resp.headers_mut().insert(headers::FAULT, HeaderValue::from_static(headers::FAULT_DEPENDENCY));
            return resp;
        }
        let mut resp = text(StatusCode::BAD_GATEWAY, format!("cannot forward a request ({why}): {last}"));
        resp.headers_mut().insert(headers::FAULT, HeaderValue::from_static(headers::FAULT_DEPENDENCY));
        resp
    }

    fn too_many(&self, what: &str) -> Response<Body> {
        let mut r = text(StatusCode::TOO_MANY_REQUESTS, format!("too many requests: over {what}; retry shortly"));
        r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        r.headers_mut().insert(headers::REGION, self.region_header.clone());
        r
    }

    fn health(&self) -> Response<Body> {
        // Healthy means able to serve: a node where no app has a version
        // would only answer 503s.
        let apps = self.apps.load();
        let versions: std::collections::BTreeMap<&str, Option<String>> =
            apps.by_name.values().map(|a| (a.name.as_str(), a.active().map(|d| d.id.short().to_string()))).collect();
        let serving = versions.values().any(Option::is_some);
        // An app whose data is still catching up after a restart keeps
        // the whole node out of the edges' rotation until it has (or its
        // rejoin bound passes).
        let catching_up: Vec<&str> = apps
            .by_name
            .values()
            .filter(|a| a.active().is_some() && a.kv().is_some_and(|kv| kv.rejoin.catching_up()))
            .map(|a| a.name.as_str())
            .collect();
        // ...for those apps only: edges that read `catching_up_hosts` send
        // only their requests elsewhere (and a request that comes anyway
        // is handed to a peer, see `handle_app`).
        let (mut catching_up_hosts, mut catching_up_default) = (Vec::new(), false);
        for name in &catching_up {
            if let Some(a) = apps.by_name.get(*name) {
                let r = a.record.load();
                catching_up_hosts.extend(r.hosts.iter().cloned());
                catching_up_default |= r.default;
            }
        }
        let status = if serving && catching_up.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        // Edges enforce each app's rate too, before the WAN.
        let limits: Vec<meridian_core::wire::AppLimit> = apps
            .by_name
            .values()
            .filter_map(|a| {
                let rps = a.active()?.manifest.traffic.requests_per_second?;
                let r = a.record.load();
                Some(meridian_core::wire::AppLimit {
                    app: a.name.clone(),
                    hosts: r.hosts.clone(),
                    default: r.default,
                    requests_per_second: rps,
                })
            })
            .collect();
        // ...and route each app as its manifest says, waiting for its
        // slowest function as long as its deadline allows.
        let routing: Vec<meridian_core::wire::AppRouting> = apps
            .by_name
            .values()
            .filter_map(|a| {
                let manifest = &a.active()?.manifest;
                let r = a.record.load();
                Some(meridian_core::wire::AppRouting {
                    app: a.name.clone(),
                    hosts: r.hosts.clone(),
                    default: r.default,
                    routing: manifest.routing.clone(),
                    answer_within_ms: answer_within(manifest).map(|d| d.as_millis() as u64),
                })
            })
            .collect();
        let mut r = json(
            status,
            &serde_json::json!({"region": self.config.name, "apps": versions, "limits": limits, "routing": routing,
                "catching_up": catching_up, "catching_up_hosts": catching_up_hosts,
                "catching_up_default": catching_up_default, "serving": serving}),
        );
        r.headers_mut().insert(headers::REGION, self.region_header.clone());
        r
    }

    pub fn status(&self) -> RegionStatus {
        let mut apps: Vec<_> = self.apps.load().by_name.values().map(|a| a.status()).collect();
        apps.sort_by(|a, b| a.app.cmp(&b.app));
        RegionStatus { region: self.config.name.clone(), apps }
    }

    /// Every app's key-value metrics, labelled by app, in one exposition
    /// (each metric family once, as Prometheus requires).
    fn metrics(&self) -> Response<Body> {
        let mut apps: Vec<Arc<App>> = self.apps.load().by_name.values().cloned().collect();
        apps.sort_by(|a, b| a.name.cmp(&b.name));
        let mut texts: Vec<String> = vec![self.request_metrics(&apps)];
        texts.extend(apps.iter().filter_map(|a| a.kv()).map(|kv| kv.metrics_text()));
        let mut r = Response::new(meridian_http::full(merge_exposition(&texts)));
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
        r
    }
}

impl Region {
    /// Every app's request counters in the Prometheus text format.
    fn request_metrics(&self, apps: &[Arc<App>]) -> String {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let r = &self.config.name;
        let mut out = String::new();
        let _ =
            writeln!(out, "# HELP meridian_app_requests_total App requests answered in this region, by status class.");
        let _ = writeln!(out, "# TYPE meridian_app_requests_total counter");
        for a in apps {
            for (i, class) in ["2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let n = a.counters.by_class[i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "meridian_app_requests_total{{region=\"{r}\",app=\"{}\",class=\"{class}\"}} {n}",
                    a.name
                );
            }
        }
        for (name, help, f) in [
            (
                "meridian_app_throttled_total",
                "App requests refused by its limits (429).",
                (|c: &app::Counters| c.throttled.load(Relaxed)) as fn(&app::Counters) -> u64,
            ),
            ("meridian_app_faults_total", "App requests failed in the guest (deadline, memory, trap).", |c| {
                c.faults.load(Relaxed)
            }),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for a in apps {
                let _ = writeln!(out, "{name}{{region=\"{r}\",app=\"{}\"}} {}", a.name, f(&a.counters));
            }
        }
        out
    }
}

/// Merges Prometheus text expositions that share metric families, so each
/// family (its `# HELP`/`# TYPE` and every sample) appears once, in order.
fn merge_exposition(texts: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: HashMap<String, (Vec<String>, Vec<String>)> = HashMap::new();
    for t in texts {
        let mut current = String::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
                current = rest.split(' ').next().unwrap_or("").to_string();
                let f = families.entry(current.clone()).or_insert_with(|| {
                    order.push(current.clone());
                    Default::default()
                });
                if f.0.len() < 2 && !f.0.iter().any(|l| l == line) {
                    f.0.push(line.to_string());
                }
            } else if !line.is_empty() {
                let name = line.split(['{', ' ']).next().unwrap_or("").to_string();
                let key = if name == current || current.is_empty() { name } else { current.clone() };
                families
                    .entry(key.clone())
                    .or_insert_with(|| {
                        order.push(key.clone());
                        Default::default()
                    })
                    .1
                    .push(line.to_string());
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let (head, samples) = &families[&name];
        for l in head.iter().chain(samples) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Why a region did not take compiled code it was sent.
#[derive(Debug, thiserror::Error)]
enum ArtifactRefused {
    #[error("the signature does not hold: {0}")]
    Signature(meridian_trust::TrustError),
    #[error("signed by {0}, not the control plane")]
    NotControl(meridian_trust::Identity),
    #[error("{0}")]
    Stored(meridian_host::ArtifactError),
}

/// Why no version of an app can serve a request here.
#[derive(Debug, thiserror::Error)]
enum NoVersion {
    /// Retry elsewhere: another region may have one.
    #[error("no version of app {app:?} is deployed in this region yet")]
    NoneDeployed { app: String },
    /// The override header names a version this region does not hold.
    #[error("version {version:?} of app {app:?} is not installed here")]
    NotInstalled { app: String, version: String },
}

impl NoVersion {
    fn into_response(self) -> Response<Body> {
        let status = match self {
            NoVersion::NoneDeployed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            NoVersion::NotInstalled { .. } => StatusCode::NOT_FOUND,
        };
        platform_fault(status, self.to_string())
    }
}

/// A failure of this region itself, not of the app: the one kind of
/// answer an edge may take to another region (and count against this
/// one's health).
fn platform_fault(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = text(status, msg);
    if status.is_server_error() {
        r.headers_mut().insert(headers::FAULT, HeaderValue::from_static(headers::FAULT_PLATFORM));
    }
    r
}

/// What a function answered, made the app's: the platform's own headers
/// (`x-meridian-…`: fault, residency, causality, …) are the region's to set,
/// never a guest's — a guest claiming a platform fault would have every
/// region retried and ejected —, and every 5xx it produced is marked as
/// the app's (or, when a region it needed failed, as that dependency's),
/// so no edge retries it or holds it against this region.
fn guest_answer(resp: &mut Response<Body>, dependency_failed: bool) {
    let h = resp.headers_mut();
    if h.keys().any(|k| k.as_str().starts_with("x-meridian-")) {
        let theirs: Vec<http::HeaderName> =
            h.keys().filter(|k| k.as_str().starts_with("x-meridian-")).cloned().collect();
        for k in theirs {
            h.remove(k);
        }
    }
    let fault = if resp.extensions().get::<meridian_host::Fault>().is_some() {
        Some(headers::FAULT_APP)
    } else if resp.status().is_server_error() {
        Some(if dependency_failed { headers::FAULT_DEPENDENCY } else { headers::FAULT_APP })
    } else {
        None
    };
    if let Some(f) = fault {
        resp.headers_mut().insert(headers::FAULT, HeaderValue::from_static(f));
    }
}

/// Which version serves a request, and whether the client must be pinned
/// to it (a split is on): the override header (smoke tests; only control
/// and operators keep it), else the client's version cookie if it names
/// one of the two, else a draw by the split's percentage.
fn pick_version<B>(app: &App, req: &Request<B>) -> Result<(Arc<Deployed>, bool), NoVersion> {
    let active = app.active();
    let canary = app.canary();
    let named = |v: &str| {
        let matches = |d: &Deployed| d.id.is_named(v);
        active
            .iter()
            .find(|d| matches(d))
            .cloned()
            .or_else(|| canary.as_ref().filter(|c| matches(&c.version)).map(|c| c.version.clone()))
    };
    if let Some(v) = req.headers().get(headers::VERSION_OVERRIDE).and_then(|v| v.to_str().ok()) {
        return match app.installed(v.trim()) {
            Some(d) => Ok((d, false)),
            None => Err(NoVersion::NotInstalled { app: app.name.clone(), version: v.trim().to_string() }),
        };
    }
    let Some(canary) = canary.clone() else {
        return match active {
            Some(d) => Ok((d, false)),
            None => Err(NoVersion::NoneDeployed { app: app.name.clone() }),
        };
    };
    if let Some(d) = meridian_http::cookie(req.headers(), headers::VERSION_COOKIE).and_then(named) {
        return Ok((d, true));
    }
    let Some(active) = active.clone() else { return Ok((canary.version.clone(), true)) };
    // A client the manifest's sticky header names lands on the same side in
    // every region and on every device: a hash of its value (salted with the
    // version, so each rollout picks different clients first) below the
    // split's percentage. As the percentage grows, nobody moves back.
    let sticky = canary.version.manifest.rollout.sticky_header.as_deref().and_then(|h| req.headers().get(h));
    let bucket = match sticky {
        Some(v) => fnv1a(canary.version.id.as_str().as_bytes(), v.as_bytes()) % 100,
        None => u64::from(rand::random::<u32>() % 100),
    };
    let on_canary = bucket < u64::from(canary.percent);
    Ok((if on_canary { canary.version.clone() } else { active }, true))
}

/// 64-bit FNV-1a of `salt` then `value`: cheap, stable across processes
/// and machines (unlike std's `RandomState`), and plenty for splitting
/// clients into 100 buckets.
fn fnv1a(salt: &[u8], value: &[u8]) -> u64 {
    salt.iter().chain(value).fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The host a request names in header `name`, normalised.
fn request_host<B>(req: &Request<B>, name: &str) -> Option<String> {
    req.headers().get(name).and_then(|v| v.to_str().ok()).and_then(meridian_core::wire::host_of).or_else(|| {
        (name == "host").then(|| req.uri().authority().and_then(|a| meridian_core::wire::host_of(a.as_str()))).flatten()
    })
}

/// Whether a token names a write made in `region` (so the response must carry it).
fn kv_wrote(token: &[kv::TokenEntry], region: &str) -> bool {
    token.iter().any(|e| e.origin == region)
}

/// The causality token a request carries (header, else cookie), if this
/// app in this world sealed it; anything else is ignored, never waited on.
fn causality_token<B>(kv: &kv::KvService, req: &Request<B>) -> Vec<kv::TokenEntry> {
    let key = &kv.causality_key;
    if let Some(v) = req.headers().get(headers::CAUSALITY).and_then(|v| v.to_str().ok()) {
        return key.open(v);
    }
    meridian_http::cookie(req.headers(), headers::CAUSALITY_COOKIE).map(|t| key.open(t)).unwrap_or_default()
}

/// Which roles may call what on the cluster port. Edges reach the app and
/// the health probe; regions also replicate, run Raft and forward key-value
/// operations; the control plane installs and activates versions and reads
/// status; operators may do everything but speak Raft or replication.
pub fn authorize(peer: &meridian_trust::Identity, path: &str) -> Result<(), &'static str> {
    let Some(api) = path.strip_prefix(headers::RESERVED_PREFIX) else {
        // App traffic: users through edges, forwarded by regions, smoke
        // tests from the control plane, operators.
        return Ok(());
    };
    // One app's API is judged like the node's: `apps/<name>/kv/op` as
    // `kv/op`. Creating, changing and deleting apps is the control plane's.
    let api = match api.strip_prefix("apps/").map(|r| r.split_once('/')) {
        Some(Some((_app, rest))) => rest,
        Some(None) => return role_in(peer, &[Role::Control, Role::Operator]),
        None if api == "apps" => return role_in(peer, &[Role::Control, Role::Operator]),
        None => api,
    };
    let first = api.split('/').next().unwrap_or("");
    let allowed: &[Role] = match first {
        "health" => &[Role::Edge, Role::Region, Role::Control, Role::Operator],
        "repl" | "raft" => &[Role::Region],
        // The control plane runs operations for holders of a data-admin token.
        "kv" if api == "kv/op" => &[Role::Region, Role::Control, Role::Operator],
        "kv" if api.starts_with("kv/digest/") => &[Role::Region, Role::Operator],
        "kv" | "metrics" | "status" => &[Role::Control, Role::Operator],
        "versions" | "active" | "peers" | "split" | "stats" => &[Role::Control, Role::Operator],
        // Native code: only the control plane, which compiled it.
        "compiled" => &[Role::Control],
        _ => &[Role::Operator],
    };
    role_in(peer, allowed)
}

fn role_in(peer: &meridian_trust::Identity, allowed: &[Role]) -> Result<(), &'static str> {
    if allowed.contains(&peer.role) {
        Ok(())
    } else {
        Err("not allowed for this role")
    }
}

#[cfg(test)]
mod tests {
    use super::authorize;
    use meridian_trust::{Identity, Role};

    fn id(role: Role) -> Identity {
        Identity::new("n", role, (role == Role::Region).then_some("eu")).unwrap()
    }

    #[test]
    fn each_role_reaches_exactly_what_it_needs() {
        let cases: &[(&str, &[Role])] = &[
            ("/hello", &[Role::Edge, Role::Region, Role::Control, Role::Operator]),
            ("/_meridian/health", &[Role::Edge, Role::Region, Role::Control, Role::Operator]),
            ("/_meridian/repl/stream", &[Role::Region]),
            ("/_meridian/repl/push", &[Role::Region]),
            ("/_meridian/raft/ledger/append", &[Role::Region]),
            ("/_meridian/kv/op", &[Role::Region, Role::Control, Role::Operator]),
            ("/_meridian/kv/digest/sessions", &[Role::Region, Role::Operator]),
            ("/_meridian/kv/status", &[Role::Control, Role::Operator]),
            ("/_meridian/kv/conflicts/sessions", &[Role::Control, Role::Operator]),
            ("/_meridian/metrics", &[Role::Control, Role::Operator]),
            ("/_meridian/versions/abc", &[Role::Control, Role::Operator]),
            ("/_meridian/active", &[Role::Control, Role::Operator]),
            ("/_meridian/peers", &[Role::Control, Role::Operator]),
            ("/_meridian/anything-new", &[Role::Operator]),
            ("/_meridian/compiled/abc", &[Role::Control]),
            ("/_meridian/apps", &[Role::Control, Role::Operator]),
            ("/_meridian/apps/shop", &[Role::Control, Role::Operator]),
            ("/_meridian/apps/shop/repl/stream", &[Role::Region]),
            ("/_meridian/apps/shop/raft/ledger/vote", &[Role::Region]),
            ("/_meridian/apps/shop/kv/op", &[Role::Region, Role::Control, Role::Operator]),
            ("/_meridian/apps/shop/kv/status", &[Role::Control, Role::Operator]),
            ("/_meridian/apps/shop/versions/abc", &[Role::Control, Role::Operator]),
            ("/_meridian/apps/shop/active", &[Role::Control, Role::Operator]),
            ("/_meridian/apps/shop/split", &[Role::Control, Role::Operator]),
            ("/_meridian/apps/shop/stats", &[Role::Control, Role::Operator]),
        ];
        for (path, allowed) in cases {
            for role in [Role::Edge, Role::Region, Role::Control, Role::Operator] {
                assert_eq!(authorize(&id(role), path).is_ok(), allowed.contains(&role), "{role} on {path}");
            }
        }
    }
}
