//! A region node: runs the active version of the app (functions and static
//! assets) and lets the control plane install and switch versions.
//!
//! Versions are installed ahead of time: the bundle is verified, every
//! component compiled (or loaded from the compile cache) and pre-instantiated,
//! and only then may the version be activated. Activation is one atomic
//! pointer swap: a request holds the version it started with until it ends,
//! so requests in flight finish on the old version and none fail.
//!
//! The node persists the bundles it installed and which one is active; after
//! a restart it serves the same version without asking anyone and without
//! compiling.
//!
//! Two doors. The **public** port carries app traffic only: anything under
//! `/_meridian/` answers 404 there. The **cluster** port is mutual TLS with
//! certificates from the cluster CA; it carries app traffic from edges (and
//! from regions forwarding a request) and every internal API, each allowed
//! only to the roles that need it ([`authorize`]), judged by the caller's
//! certificate.

mod request_kv;
mod statics;

pub use meridian_data::{kv, repl, strong};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
pub use meridian_core::wire::{Peer, RegionStatus};
use meridian_core::{headers, VersionId};
use meridian_host::{Host, HostConfig, Prepared};
use meridian_http::cluster::ClusterClient;
use meridian_http::{json, text, Body, Peer as PeerCert, Role, Tls};
use meridian_manifest::{Bundle, Manifest, RouteTarget};
use meridian_trust::TlsFiles;
use statics::StaticSite;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: u64,
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

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Bundle(#[from] meridian_manifest::BundleError),
    #[error("bundle content hashes to {actual}, not the {claimed} it was sent as")]
    IdMismatch { claimed: VersionId, actual: VersionId },
    #[error("component {name:?}: {source}")]
    Component { name: String, source: meridian_host::HostError },
    #[error("cannot store the version: {0}")]
    Io(#[from] std::io::Error),
    #[error("compilation task failed: {0}")]
    Join(String),
    #[error("namespace {ns:?} names region {region:?}, which this region does not know")]
    UnknownRegion { ns: String, region: String },
    #[error("cannot open the key-value store: {0}")]
    Store(#[from] meridian_store::StoreError),
}

/// Why a region cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("certificates: {0}")]
    Trust(#[from] meridian_trust::TrustError),
    #[error("the certificate is for {found}, but this config is region {name:?}: issue one with `meridian certs issue --role region --name {name} --jurisdiction J`")]
    WrongIdentity { name: String, found: meridian_trust::Identity },
}

/// An installed version, ready to serve.
pub struct Deployed {
    pub id: VersionId,
    pub manifest: Manifest,
    namespaces: kv::Namespaces,
    components: HashMap<String, Prepared>,
    statics: HashMap<String, StaticSite>,
    version_header: HeaderValue,
    admission: Admission,
    /// Whether every component came from the compile cache.
    pub all_cached: bool,
}

pub struct Region {
    pub config: RegionConfig,
    /// This node's certificate and TLS configurations (reloaded live).
    pub tls: Arc<Tls>,
    host: Arc<Host>,
    region_header: HeaderValue,
    active: ArcSwapOption<Deployed>,
    installed: Mutex<HashMap<VersionId, Arc<Deployed>>>,
    /// Installs compile on the blocking pool; one at a time keeps a deploy
    /// from starving the request path of CPU on small machines.
    install_lock: tokio::sync::Mutex<()>,
    pub kv: Arc<kv::KvService>,
}

impl Region {
    /// Opens the data directory and, if a version was active before, installs
    /// it again from disk (from the compile cache) and activates it.
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
        std::fs::create_dir_all(config.data_dir.join("versions"))?;
        let host = Host::new(HostConfig {
            cache_dir: config.data_dir.join("compiled"),
            max_instances: config.max_instances,
            max_memory_mb: config.max_memory_mb,
        })?;
        let region_header = HeaderValue::from_str(&config.name)?;
        let store = meridian_store::Store::open(&config.data_dir.join("kv.redb"), &config.name)?;
        let repl = repl::Replication::new(Duration::from_millis(config.anti_entropy_ms.max(50)));
        let kv = Arc::new(kv::KvService {
            region: config.name.clone(),
            jurisdiction,
            store,
            peers: Default::default(),
            namespaces: Default::default(),
            cluster: ClusterClient::new(tls.clone(), Duration::from_secs(2)),
            causality_key: kv::CausalityKey::new(cluster_key),
            repl,
            causality_wait: Duration::from_millis(config.causality_wait_ms),
            groups: Default::default(),
        });
        let region = Arc::new(Region {
            kv,
            config,
            tls,
            host: Arc::new(host),
            region_header,
            active: ArcSwapOption::empty(),
            installed: Mutex::new(HashMap::new()),
            install_lock: tokio::sync::Mutex::new(()),
        });
        if let Ok(id) = std::fs::read_to_string(region.active_file()) {
            let id: VersionId = id.trim().parse()?;
            let tar = std::fs::read(region.bundle_path(&id))?;
            let t = Instant::now();
            region.install(&id, Bytes::from(tar)).await?;
            region.activate(&id).map_err(anyhow::Error::msg)?;
            tracing::info!(version = id.short(), elapsed = ?t.elapsed(), "restored active version");
        }
        region.kv.set_peers(region.config.peers.clone());
        Ok(region)
    }

    /// The addresses this node listens on: no guest may ever reach them,
    /// whatever its manifest lists.
    pub fn forbid_guest_access(&self, addrs: Vec<std::net::SocketAddr>) {
        self.host.forbid_addrs(addrs);
    }

    /// Stops background work (replication) so the region's data can be
    /// closed and opened again in this process once the region is dropped.
    pub async fn shutdown(&self) {
        self.kv.repl.stop().await;
        let groups: Vec<_> = self.kv.groups.lock().unwrap().drain().map(|(_, g)| g).collect();
        for g in groups {
            let _ = g.raft.shutdown().await;
        }
    }

    fn active_file(&self) -> PathBuf {
        self.config.data_dir.join("active")
    }

    fn bundle_path(&self, id: &VersionId) -> PathBuf {
        self.config.data_dir.join("versions").join(format!("{id}.tar"))
    }

    pub fn active(&self) -> Option<Arc<Deployed>> {
        self.active.load_full()
    }

    /// Verifies, stores, compiles and pre-instantiates a version. Idempotent.
    pub async fn install(&self, claimed: &VersionId, tar: Bytes) -> Result<Arc<Deployed>, InstallError> {
        if let Some(d) = self.installed.lock().unwrap().get(claimed) {
            return Ok(d.clone());
        }
        let _guard = self.install_lock.lock().await;
        let bundle = Bundle::from_tar(&tar)?;
        if &bundle.id != claimed {
            return Err(InstallError::IdMismatch { claimed: claimed.clone(), actual: bundle.id });
        }
        // Every region a namespace names must be one this region knows.
        let peers = self.kv.peers.load();
        if !peers.is_empty() {
            for n in bundle.manifest.kv.values() {
                let listed = match &n.mode {
                    meridian_manifest::KvMode::Strong { regions, .. } => regions.clone(),
                    meridian_manifest::KvMode::Regional { regions, .. } => regions.clone(),
                    meridian_manifest::KvMode::Global => Vec::new(),
                };
                for r in listed {
                    if r != self.config.name && !peers.iter().any(|p| p.name == r) {
                        return Err(InstallError::UnknownRegion { ns: n.name.clone(), region: r });
                    }
                }
            }
        }
        let host = self.host.clone();
        let region = self.config.name.clone();
        let deployed = tokio::task::spawn_blocking(move || prepare(&host, bundle, &region))
            .await
            .map_err(|e| InstallError::Join(e.to_string()))??;
        // Stored only once it compiled: a broken version never reaches disk.
        let path = self.bundle_path(claimed);
        if !path.exists() {
            meridian_core::fs::write_atomic(&path, &tar)?;
        }
        let deployed = Arc::new(deployed);
        self.installed.lock().unwrap().insert(claimed.clone(), deployed.clone());
        Ok(deployed)
    }

    /// Switches traffic to an installed version and records the choice.
    pub fn activate(&self, id: &VersionId) -> Result<(), String> {
        let d = self
            .installed
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| format!("version {} is not installed here; install it first", id.short()))?;
        meridian_core::fs::write_atomic(&self.active_file(), id.as_str().as_bytes())
            .map_err(|e| format!("cannot record the active version: {e}"))?;
        self.kv.namespaces.store(d.namespaces.clone());
        // Strong namespaces: start (or keep) this region's Raft groups.
        let (svc, dir, nss) = (self.kv.clone(), self.config.data_dir.clone(), d.namespaces.clone());
        tokio::spawn(async move { strong::ensure_groups(&svc, &dir, &nss).await });
        let previous = self.active.swap(Some(d)).map(|p| p.id.clone());
        // Keep the new and the previous version in memory (a rollback is a
        // pointer swap); older ones are dropped once their last request ends.
        // Their bundles and compiled code stay on disk, so reinstalling one
        // costs no compilation.
        self.installed.lock().unwrap().retain(|v, _| v == id || Some(v) == previous.as_ref());
        tracing::info!(version = id.short(), previous = previous.as_ref().map(|p| p.short()), "activated");
        Ok(())
    }

    /// Every request on the public port: app traffic only.
    pub async fn handle_public(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        if req.uri().path().starts_with(headers::RESERVED_PREFIX) {
            return text(StatusCode::NOT_FOUND, format!("no route serves {}", req.uri().path()));
        }
        // Only a region may say it forwarded a request.
        req.headers_mut().remove(headers::FORWARDED);
        self.handle_app(req).await
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
        if path.starts_with(headers::RESERVED_PREFIX) {
            return self.admin(req, &peer).await;
        }
        if peer.role != Role::Region {
            req.headers_mut().remove(headers::FORWARDED);
        }
        self.handle_app(req).await
    }

    async fn handle_app(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let Some(version) = self.active.load_full() else {
            let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "no version of the app is deployed in this region yet");
            r.headers_mut().insert(headers::REGION, self.region_header.clone());
            return r;
        };
        if version.admission.rate.as_ref().is_some_and(|r| r.check().is_err()) {
            return self.too_many("the app's requests_per_second in this region");
        }
        // Causality: serve a request that follows a write only where that
        // write is applied: wait a little, else hand it to the region that
        // made the write.
        let token = self.causality_token(&req);
        if !token.is_empty() && !req.headers().contains_key(headers::FORWARDED) && !self.kv.wait_for(&token).await {
            let origin = token.iter().find(|e| !self.kv.has_applied(std::slice::from_ref(e))).map(|e| e.origin.clone());
            let peer = origin.and_then(|o| self.kv.peers.load().iter().find(|p| p.name == o).cloned());
            if let Some(peer) = peer {
                return self.forward_request(&peer, req).await;
            }
        }
        let mut resp = self.serve_app(&version, req).await;
        let h = resp.headers_mut();
        h.insert(headers::REGION, self.region_header.clone());
        h.insert(headers::VERSION, version.version_header.clone());
        resp
    }

    async fn serve_app(&self, version: &Deployed, mut req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let Some(route) = version.manifest.route_for(&path) else {
            return text(StatusCode::NOT_FOUND, format!("no route serves {path}"));
        };
        match &route.target {
            RouteTarget::Static(dir) => {
                let rel = path.strip_prefix(route.path.as_str()).unwrap_or("");
                match version.statics.get(dir) {
                    Some(site) => site.serve(&req, rel),
                    None => text(StatusCode::NOT_FOUND, format!("no file at {path}")),
                }
            }
            RouteTarget::Component(name) => {
                let Some(component) = version.components.get(name) else {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, format!("component {name} missing"));
                };
                // Held while the function runs: an app at its concurrency
                // cannot take more of the region's instances.
                let _slot = match &version.admission.slots {
                    None => None,
                    Some(s) => match s.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => return self.too_many("the app's max_concurrency in this region"),
                    },
                };
                // The function learns where it runs from trusted headers; a
                // client cannot spoof them.
                let h = req.headers_mut();
                h.insert(headers::REGION, self.region_header.clone());
                h.insert(headers::VERSION, version.version_header.clone());
                let kv = Arc::new(request_kv::RequestKv {
                    svc: self.kv.clone(),
                    namespaces: version.namespaces.clone(),
                    token: Mutex::new(self.causality_token(&req)),
                });
                let written = kv.token.lock().unwrap().len();
                let mut resp = component.handle(req, Some(kv.clone() as Arc<dyn meridian_host::KvBackend>)).await;
                if resp.extensions().get::<meridian_host::Fault>().is_some() {
                    resp.headers_mut().insert(headers::FAULT, HeaderValue::from_static("app"));
                }
                // A response that followed writes carries their token (merged
                // with the one the request brought), as a header and a cookie.
                let token = kv.token.lock().unwrap().clone();
                if token.len() > written || (!token.is_empty() && kv_wrote(&token, &self.config.name)) {
                    let t = self.kv.causality_key.seal(&token);
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
        if path == "health" {
            return self.health();
        }
        let parts: Vec<&str> = path.split('/').collect();
        if matches!(parts.first(), Some(&"kv") | Some(&"repl") | Some(&"peers") | Some(&"metrics") | Some(&"raft")) {
            return self.kv.admin(req, &parts, peer).await;
        }
        match (method, parts.as_slice()) {
            (Method::GET, ["status"]) => json(StatusCode::OK, &self.status()),
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
                match self.install(&id, body).await {
                    Ok(d) => json(
                        StatusCode::OK,
                        &serde_json::json!({
                            "region": self.config.name,
                            "version": id,
                            "compiled_ms": t.elapsed().as_millis() as u64,
                            "from_cache": d.all_cached,
                        }),
                    ),
                    Err(e) => {
                        tracing::warn!(version = id.short(), error = %e, "install refused");
                        text(StatusCode::UNPROCESSABLE_ENTITY, format!("region {}: {e}", self.config.name))
                    }
                }
            }
            (Method::PUT, ["active"]) => {
                let body = match meridian_http::read_body(req.into_body(), 1024).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                let id: VersionId = match std::str::from_utf8(&body).ok().and_then(|s| s.trim().parse().ok()) {
                    Some(id) => id,
                    None => return text(StatusCode::BAD_REQUEST, "body must be a version id"),
                };
                match self.activate(&id) {
                    Ok(()) => json(StatusCode::OK, &self.status()),
                    Err(e) => text(StatusCode::CONFLICT, e),
                }
            }
            _ => text(StatusCode::NOT_FOUND, format!("no such API: {path}")),
        }
    }

    /// Hands an app request to another region (its answer comes back as is).
    async fn forward_request(&self, peer: &Peer, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match meridian_http::read_body(body, 8 << 20).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let target = match self.kv.target(peer) {
            Ok(t) => t,
            Err(e) => return text(StatusCode::BAD_GATEWAY, e.to_string()),
        };
        let mut b = Request::builder().method(parts.method.clone()).uri(pq);
        for (k, v) in parts.headers.iter() {
            if k != http::header::HOST {
                b = b.header(k, v);
            }
        }
        b = b.header(headers::FORWARDED, self.config.name.as_str());
        let Ok(out) = b.body(meridian_http::full(body)) else {
            return text(StatusCode::BAD_REQUEST, "cannot forward this request");
        };
        tracing::debug!(to = %peer.name, "forwarding a request whose causality token is not applied here yet");
        match tokio::time::timeout(Duration::from_secs(30), self.kv.cluster.send(&target, out)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                text(StatusCode::BAD_GATEWAY, format!("{} did not answer a forwarded request: {e}", peer.name))
            }
            Err(_) => text(StatusCode::GATEWAY_TIMEOUT, format!("{} did not answer a forwarded request", peer.name)),
        }
    }

    fn too_many(&self, what: &str) -> Response<Body> {
        let mut r = text(StatusCode::TOO_MANY_REQUESTS, format!("too many requests: over {what}; retry shortly"));
        r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        r.headers_mut().insert(headers::REGION, self.region_header.clone());
        r
    }

    fn health(&self) -> Response<Body> {
        // Healthy means able to serve the app: a node without a version
        // would only answer 503s.
        let active = self.active.load();
        let status = if active.is_some() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let mut r = json(
            status,
            &serde_json::json!({
                "region": self.config.name,
                "version": active.as_ref().map(|d| d.id.short().to_string()),
            }),
        );
        r.headers_mut().insert(headers::REGION, self.region_header.clone());
        r
    }

    pub fn status(&self) -> RegionStatus {
        let mut installed: Vec<VersionId> = self.installed.lock().unwrap().keys().cloned().collect();
        installed.sort();
        RegionStatus {
            region: self.config.name.clone(),
            active: self.active.load().as_ref().map(|d| d.id.clone()),
            installed,
        }
    }
}

/// An app's admission limits in this region (from `[limits]`).
struct Admission {
    rate: Option<governor::DefaultDirectRateLimiter>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl Admission {
    fn new(t: &meridian_manifest::TrafficLimits) -> Admission {
        Admission {
            rate: t
                .requests_per_second
                .and_then(std::num::NonZeroU32::new)
                .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n))),
            slots: t.max_concurrency.map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize))),
        }
    }
}

/// Compiles every component and loads every static directory of a bundle.
fn prepare(host: &Host, bundle: Bundle, region: &str) -> Result<Deployed, InstallError> {
    let mut components = HashMap::new();
    let mut all_cached = true;
    for (name, c) in &bundle.manifest.components {
        let wasm = &bundle.files[&c.source];
        let env = vec![
            ("MERIDIAN_REGION".to_string(), region.to_string()),
            ("MERIDIAN_VERSION".to_string(), bundle.id.short().to_string()),
        ];
        let p = host
            .prepare_with_egress(
                wasm,
                Duration::from_millis(c.limits.deadline_ms),
                c.limits.memory_mb,
                env,
                c.allowed_outbound_hosts.clone(),
            )
            .map_err(|source| InstallError::Component { name: name.clone(), source })?;
        all_cached &= p.was_cached;
        components.insert(name.clone(), p);
    }
    let mut statics = HashMap::new();
    for r in &bundle.manifest.routes {
        if let RouteTarget::Static(dir) = &r.target {
            statics.entry(dir.clone()).or_insert_with(|| StaticSite::new(bundle.static_files(dir)));
        }
    }
    let version_header = HeaderValue::from_str(bundle.id.short()).expect("hex is a valid header");
    let namespaces = Arc::new(bundle.manifest.kv.clone());
    let admission = Admission::new(&bundle.manifest.traffic);
    Ok(Deployed {
        id: bundle.id,
        manifest: bundle.manifest,
        namespaces,
        components,
        statics,
        version_header,
        admission,
        all_cached,
    })
}

/// Whether a token names a write made in `region` (so the response must carry it).
fn kv_wrote(token: &[kv::TokenEntry], region: &str) -> bool {
    token.iter().any(|e| e.origin == region)
}

impl Region {
    /// The causality token a request carries (header, else cookie), if this
    /// world sealed it; anything else is ignored, never waited on.
    fn causality_token<B>(&self, req: &Request<B>) -> Vec<kv::TokenEntry> {
        let key = &self.kv.causality_key;
        if let Some(v) = req.headers().get(headers::CAUSALITY).and_then(|v| v.to_str().ok()) {
            return key.open(v);
        }
        for v in req.headers().get_all(http::header::COOKIE) {
            let Ok(v) = v.to_str() else { continue };
            for c in v.split(';') {
                if let Some(t) = c.trim().strip_prefix(headers::CAUSALITY_COOKIE).and_then(|r| r.strip_prefix('=')) {
                    return key.open(t);
                }
            }
        }
        Vec::new()
    }
}

/// Which roles may call what on the cluster port. Edges reach the app and
/// the health probe; regions also replicate, run Raft and forward key-value
/// operations; the control plane installs and activates versions and reads
/// status; operators may do everything but speak Raft or replication.
pub fn authorize(peer: &meridian_trust::Identity, path: &str) -> Result<(), &'static str> {
    let Some(api) = path.strip_prefix(headers::RESERVED_PREFIX) else {
        return match peer.role {
            Role::Edge | Role::Region | Role::Operator => Ok(()),
            Role::Control => Err("the control plane does not send app traffic"),
        };
    };
    let first = api.split('/').next().unwrap_or("");
    let allowed: &[Role] = match first {
        "health" => &[Role::Edge, Role::Region, Role::Control, Role::Operator],
        "repl" | "raft" => &[Role::Region],
        "kv" if api == "kv/op" || api.starts_with("kv/digest/") => &[Role::Region, Role::Operator],
        "kv" | "metrics" | "status" => &[Role::Control, Role::Operator],
        "versions" | "active" | "peers" => &[Role::Control, Role::Operator],
        _ => &[Role::Operator],
    };
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
            ("/hello", &[Role::Edge, Role::Region, Role::Operator]),
            ("/_meridian/health", &[Role::Edge, Role::Region, Role::Control, Role::Operator]),
            ("/_meridian/repl/stream", &[Role::Region]),
            ("/_meridian/repl/push", &[Role::Region]),
            ("/_meridian/raft/ledger/append", &[Role::Region]),
            ("/_meridian/kv/op", &[Role::Region, Role::Operator]),
            ("/_meridian/kv/digest/sessions", &[Role::Region, Role::Operator]),
            ("/_meridian/kv/status", &[Role::Control, Role::Operator]),
            ("/_meridian/kv/conflicts/sessions", &[Role::Control, Role::Operator]),
            ("/_meridian/metrics", &[Role::Control, Role::Operator]),
            ("/_meridian/versions/abc", &[Role::Control, Role::Operator]),
            ("/_meridian/active", &[Role::Control, Role::Operator]),
            ("/_meridian/peers", &[Role::Control, Role::Operator]),
            ("/_meridian/anything-new", &[Role::Operator]),
        ];
        for (path, allowed) in cases {
            for role in [Role::Edge, Role::Region, Role::Control, Role::Operator] {
                assert_eq!(authorize(&id(role), path).is_ok(), allowed.contains(&role), "{role} on {path}");
            }
        }
    }
}
