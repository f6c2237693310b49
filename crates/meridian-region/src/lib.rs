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
//! API boundary: everything under `/_meridian/` is the node's own API (health
//! is public; install, activate and status need the world's token). All other
//! paths belong to the app.

mod statics;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
pub use meridian_core::wire::RegionStatus;
use meridian_core::{headers, VersionId};
use meridian_host::{Host, HostConfig, Prepared};
use meridian_http::{has_bearer, json, text, unauthorized, Body};
use meridian_manifest::{Bundle, Manifest, RouteTarget};
use statics::StaticSite;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    pub listen: std::net::SocketAddr,
    pub data_dir: PathBuf,
    /// File holding the bearer token required by the admin API.
    pub token_file: PathBuf,
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: u64,
    #[serde(default = "default_max_bundle_mb")]
    pub max_bundle_mb: u64,
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
}

/// An installed version, ready to serve.
pub struct Deployed {
    pub id: VersionId,
    pub manifest: Manifest,
    components: HashMap<String, Prepared>,
    statics: HashMap<String, StaticSite>,
    version_header: HeaderValue,
    /// Whether every component came from the compile cache.
    pub all_cached: bool,
}

pub struct Region {
    pub config: RegionConfig,
    token: String,
    host: Arc<Host>,
    region_header: HeaderValue,
    active: ArcSwapOption<Deployed>,
    installed: Mutex<HashMap<VersionId, Arc<Deployed>>>,
    /// Installs compile on the blocking pool; one at a time keeps a deploy
    /// from starving the request path of CPU on small machines.
    install_lock: tokio::sync::Mutex<()>,
}

impl Region {
    /// Opens the data directory and, if a version was active before, installs
    /// it again from disk (from the compile cache) and activates it.
    pub async fn open(config: RegionConfig) -> anyhow::Result<Arc<Region>> {
        let token = std::fs::read_to_string(&config.token_file)
            .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", config.token_file.display()))?
            .trim()
            .to_string();
        std::fs::create_dir_all(config.data_dir.join("versions"))?;
        let host = Host::new(HostConfig {
            cache_dir: config.data_dir.join("compiled"),
            max_instances: config.max_instances,
            max_memory_mb: config.max_memory_mb,
        })?;
        let region_header = HeaderValue::from_str(&config.name)?;
        let region = Arc::new(Region {
            config,
            token,
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
        Ok(region)
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
        let previous = self.active.swap(Some(d)).map(|p| p.id.clone());
        // Keep the new and the previous version in memory (a rollback is a
        // pointer swap); older ones are dropped once their last request ends.
        // Their bundles and compiled code stay on disk, so reinstalling one
        // costs no compilation.
        self.installed.lock().unwrap().retain(|v, _| v == id || Some(v) == previous.as_ref());
        tracing::info!(version = id.short(), previous = previous.as_ref().map(|p| p.short()), "activated");
        Ok(())
    }

    /// Entry point for every request to the node.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path().starts_with(headers::RESERVED_PREFIX) {
            return self.admin(req).await;
        }
        let Some(version) = self.active.load_full() else {
            let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "no version of the app is deployed in this region yet");
            r.headers_mut().insert(headers::REGION, self.region_header.clone());
            return r;
        };
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
                // The function learns where it runs from trusted headers; a
                // client cannot spoof them.
                let h = req.headers_mut();
                h.insert(headers::REGION, self.region_header.clone());
                h.insert(headers::VERSION, version.version_header.clone());
                let mut resp = component.handle(req, None).await;
                if resp.extensions().get::<meridian_host::Fault>().is_some() {
                    resp.headers_mut().insert(headers::FAULT, HeaderValue::from_static("app"));
                }
                resp
            }
        }
    }

    async fn admin(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path()[headers::RESERVED_PREFIX.len()..].to_string();
        let method = req.method().clone();
        if path == "health" {
            return self.health();
        }
        if !has_bearer(&req, &self.token) {
            return unauthorized();
        }
        match (method, path.split('/').collect::<Vec<_>>().as_slice()) {
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
            .prepare(wasm, Duration::from_millis(c.limits.deadline_ms), c.limits.memory_mb, env)
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
    Ok(Deployed { id: bundle.id, manifest: bundle.manifest, components, statics, version_header, all_cached })
}
