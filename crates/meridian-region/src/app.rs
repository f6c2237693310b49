//! One app in a region: its record (name, hostnames), the versions it has
//! installed, the active one, and — once it declares namespaces or a peer
//! replicates to it — its own key-value service.
//!
//! Everything an app owns lives under `<data_dir>/apps/<name>/`: the record
//! (`app.json`), its bundles (`versions/`), the active version (`active`),
//! its store (`kv.redb`) and its Raft groups (`raft/`). Deleting the app
//! stops its background work, waits for its requests to end, and removes
//! that directory: no other app's bytes are in any of those files, and none
//! of its bytes are anywhere else (the compile cache holds code, keyed by
//! content, shared by every app that ships the same component).

use crate::statics::StaticSite;
use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::HeaderValue;
use meridian_core::stats::{StatsSnapshot, VersionStats};
use meridian_core::wire::{AppRecord, AppRemoved, AppStatus, Split};
use meridian_core::VersionId;
use meridian_data::{kv, repl, strong};
use meridian_host::{Host, Prepared};
use meridian_manifest::{Bundle, Manifest, RouteTarget};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Bundle(#[from] meridian_manifest::BundleError),
    #[error("bundle content hashes to {actual}, not the {claimed} it was sent as")]
    IdMismatch { claimed: VersionId, actual: VersionId },
    #[error("the bundle is app {found:?}, not {app:?}")]
    WrongApp { app: String, found: String },
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

/// What every app of a node shares to open its key-value service.
pub struct Node {
    pub region: String,
    pub jurisdiction: String,
    pub cluster: meridian_http::cluster::ClusterClient,
    pub causality_key: kv::CausalityKey,
    pub anti_entropy: Duration,
    pub causality_wait: Duration,
    pub rejoin_bound: Duration,
    pub peers: ArcSwap<Vec<meridian_core::wire::Peer>>,
    /// The most instances one app may run at once in this region (its
    /// share of the node's pool), whatever its manifest asks.
    pub instance_share: u32,
}

/// What one app's requests came to in this region (for metrics).
#[derive(Default)]
pub struct Counters {
    /// By status class: 1xx-2xx, 3xx, 4xx, 5xx.
    pub by_class: [std::sync::atomic::AtomicU64; 4],
    /// Refused by the app's admission limits (429).
    pub throttled: std::sync::atomic::AtomicU64,
    /// Failed in the guest (deadline, memory limit, trap).
    pub faults: std::sync::atomic::AtomicU64,
}

impl Counters {
    pub fn count(&self, status: http::StatusCode, fault: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let class = match status.as_u16() {
            0..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        };
        self.by_class[class].fetch_add(1, Relaxed);
        if status == http::StatusCode::TOO_MANY_REQUESTS {
            self.throttled.fetch_add(1, Relaxed);
        }
        if fault {
            self.faults.fetch_add(1, Relaxed);
        }
    }
}

/// An installed version, ready to serve.
pub struct Deployed {
    pub id: VersionId,
    pub manifest: Manifest,
    pub(crate) namespaces: kv::Namespaces,
    pub(crate) components: HashMap<String, Prepared>,
    pub(crate) statics: HashMap<String, StaticSite>,
    pub(crate) version_header: HeaderValue,
    pub(crate) admission: Admission,
    /// What this version answered here (a rollout's gates read it).
    pub stats: VersionStats,
    /// Whether every component came from the compile cache.
    pub all_cached: bool,
}

/// A rollout step in this region: a share of the app's traffic on a new
/// version.
pub struct Canary {
    pub version: Arc<Deployed>,
    pub percent: u8,
}

pub struct App {
    pub name: String,
    pub record: ArcSwap<AppRecord>,
    dir: PathBuf,
    active: ArcSwapOption<Deployed>,
    canary: ArcSwapOption<Canary>,
    installed: Mutex<HashMap<VersionId, Arc<Deployed>>>,
    kv: ArcSwapOption<kv::KvService>,
    kv_open: Mutex<()>,
    pub counters: Counters,
}

impl App {
    /// The app's directory under a node's data directory.
    pub fn dir_in(data_dir: &Path, name: &str) -> PathBuf {
        data_dir.join("apps").join(name)
    }

    /// Creates (or opens) the app's directory and records it.
    pub fn create(data_dir: &Path, record: AppRecord) -> std::io::Result<App> {
        let dir = App::dir_in(data_dir, &record.name);
        std::fs::create_dir_all(dir.join("versions"))?;
        let app = App::new(record, dir);
        app.save_record()?;
        Ok(app)
    }

    fn new(record: AppRecord, dir: PathBuf) -> App {
        App {
            name: record.name.clone(),
            record: ArcSwap::from_pointee(record),
            dir,
            active: ArcSwapOption::empty(),
            canary: ArcSwapOption::empty(),
            installed: Mutex::new(HashMap::new()),
            kv: ArcSwapOption::empty(),
            kv_open: Mutex::new(()),
            counters: Counters::default(),
        }
    }

    /// The app recorded in `dir`, if it holds a readable record.
    pub fn load(dir: &Path) -> Option<Result<App, String>> {
        let bytes = std::fs::read(dir.join("app.json")).ok()?;
        let record: AppRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => return Some(Err(format!("{}: {e}", dir.join("app.json").display()))),
        };
        Some(Ok(App::new(record, dir.to_path_buf())))
    }

    pub fn set_record(&self, record: AppRecord) -> std::io::Result<()> {
        self.record.store(Arc::new(record));
        self.save_record()
    }

    fn save_record(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&**self.record.load()).map_err(std::io::Error::other)?;
        meridian_core::fs::write_atomic(&self.dir.join("app.json"), &bytes)
    }

    fn active_file(&self) -> PathBuf {
        self.dir.join("active")
    }

    fn bundle_path(&self, id: &VersionId) -> PathBuf {
        self.dir.join("versions").join(format!("{id}.tar"))
    }

    fn split_file(&self) -> PathBuf {
        self.dir.join("split")
    }

    fn kv_file(&self) -> PathBuf {
        self.dir.join("kv.redb")
    }

    pub fn active(&self) -> Option<Arc<Deployed>> {
        self.active.load_full()
    }

    /// An installed version by full or short id (active, rolling out, or
    /// taking no traffic at all: what the version-override header reaches).
    pub fn installed(&self, id: &str) -> Option<Arc<Deployed>> {
        let installed = self.installed.lock().unwrap();
        installed.values().find(|d| d.id.is_named(id)).cloned()
    }

    /// The version a rollout is shifting traffic to here, if any.
    pub fn canary(&self) -> Option<Arc<Canary>> {
        self.canary.load_full()
    }

    /// Sends `percent` of new clients to an installed version (a rollout
    /// step); clients keep the version they got.
    pub fn set_split(&self, split: &Split) -> Result<(), String> {
        if split.percent > 100 {
            return Err(format!("{} is not a percentage", split.percent));
        }
        let d = self
            .installed
            .lock()
            .unwrap()
            .get(&split.version)
            .cloned()
            .ok_or_else(|| format!("version {} is not installed here; install it first", split.version.short()))?;
        if self.active().is_some_and(|a| a.id == split.version) {
            return Err(format!("version {} is already the active one", split.version.short()));
        }
        // Recorded, so a region that restarts mid-rollout keeps the split.
        let bytes = serde_json::to_vec(split).map_err(|e| e.to_string())?;
        meridian_core::fs::write_atomic(&self.split_file(), &bytes)
            .map_err(|e| format!("cannot record the split: {e}"))?;
        self.canary.store(Some(Arc::new(Canary { version: d, percent: split.percent })));
        tracing::info!(app = %self.name, version = split.version.short(), percent = split.percent, "traffic split");
        Ok(())
    }

    /// Ends a split: every client back on the active version.
    pub fn clear_split(&self) {
        let _ = std::fs::remove_file(self.split_file());
        if self.canary.swap(None).is_some() {
            tracing::info!(app = %self.name, "traffic split ended");
        }
    }

    /// Takes the app's traffic off every version (a rolled-back first
    /// deploy): requests get 503 until a version is activated.
    pub fn deactivate(&self) -> std::io::Result<()> {
        self.clear_split();
        match std::fs::remove_file(self.active_file()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(d) = self.active.swap(None) {
            tracing::info!(app = %self.name, version = d.id.short(), "deactivated");
        }
        Ok(())
    }

    /// Counters of the active version and of the canary.
    pub fn stats(&self) -> Vec<StatsSnapshot> {
        let mut out: Vec<StatsSnapshot> = self.active().iter().map(|d| d.stats.snapshot(&d.id)).collect();
        if let Some(c) = self.canary() {
            out.push(c.version.stats.snapshot(&c.version.id));
        }
        out
    }

    /// The app's key-value service, if it is open.
    pub fn kv(&self) -> Option<Arc<kv::KvService>> {
        self.kv.load_full()
    }

    /// The app's key-value service, opened now if needed (its own store,
    /// replication with the node's peers).
    pub fn kv_or_open(&self, node: &Node) -> Result<Arc<kv::KvService>, meridian_store::StoreError> {
        if let Some(k) = self.kv.load_full() {
            return Ok(k);
        }
        let _guard = self.kv_open.lock().unwrap();
        if let Some(k) = self.kv.load_full() {
            return Ok(k);
        }
        let store = meridian_store::Store::open(&self.kv_file(), &node.region)?;
        let svc = Arc::new(kv::KvService {
            app: self.name.clone(),
            region: node.region.clone(),
            jurisdiction: node.jurisdiction.clone(),
            store,
            peers: Default::default(),
            namespaces: ArcSwap::from(self.active().map(|d| d.namespaces.clone()).unwrap_or_default()),
            cluster: node.cluster.clone(),
            causality_key: node.causality_key.for_app(&self.name),
            repl: repl::Replication::new(node.anti_entropy),
            causality_wait: node.causality_wait,
            groups: Default::default(),
            rejoin: meridian_data::rejoin::Rejoin::new(node.rejoin_bound),
        });
        svc.set_peers((**node.peers.load()).clone());
        self.kv.store(Some(svc.clone()));
        tracing::info!(app = %self.name, "key-value store open");
        Ok(svc)
    }

    /// Opens what was there before a restart: the store if it exists, then
    /// the active version (from disk and the compile cache).
    pub async fn restore(&self, node: &Node, host: &Arc<Host>) -> anyhow::Result<()> {
        if self.kv_file().exists() {
            self.kv_or_open(node)?;
        }
        let split: Option<Split> = match std::fs::read(self.split_file()) {
            Ok(b) => Some(serde_json::from_slice(&b)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if let Ok(id) = std::fs::read_to_string(self.active_file()) {
            let id: VersionId = id.trim().parse()?;
            let tar = std::fs::read(self.bundle_path(&id))?;
            let t = std::time::Instant::now();
            self.install(node, host, &id, Bytes::from(tar)).await?;
            self.activate(node, &id).map_err(anyhow::Error::msg)?;
            tracing::info!(app = %self.name, version = id.short(), elapsed = ?t.elapsed(), "restored active version");
        }
        // A rollout's split survives a restart (activate above removed the
        // file; it is read first).
        if let Some(split) = split {
            let tar = std::fs::read(self.bundle_path(&split.version))?;
            self.install(node, host, &split.version, Bytes::from(tar)).await?;
            self.set_split(&split).map_err(anyhow::Error::msg)?;
            tracing::info!(app = %self.name, version = split.version.short(), percent = split.percent, "restored traffic split");
        }
        Ok(())
    }

    /// Verifies, stores, compiles and pre-instantiates a version. Idempotent.
    /// The caller serialises installs (one compile at a time per node).
    pub async fn install(
        &self,
        node: &Node,
        host: &Arc<Host>,
        claimed: &VersionId,
        tar: Bytes,
    ) -> Result<Arc<Deployed>, InstallError> {
        if let Some(d) = self.installed.lock().unwrap().get(claimed) {
            return Ok(d.clone());
        }
        let bundle = Bundle::from_tar(&tar)?;
        if &bundle.id != claimed {
            return Err(InstallError::IdMismatch { claimed: claimed.clone(), actual: bundle.id });
        }
        if bundle.manifest.name != self.name {
            return Err(InstallError::WrongApp { app: self.name.clone(), found: bundle.manifest.name.clone() });
        }
        // Every region a namespace names must be one this region knows.
        let peers = node.peers.load();
        if !peers.is_empty() {
            for n in bundle.manifest.kv.values() {
                let listed = match &n.mode {
                    meridian_manifest::KvMode::Strong { regions, .. } => regions.clone(),
                    meridian_manifest::KvMode::Regional { regions, .. } => regions.clone(),
                    meridian_manifest::KvMode::Global => Vec::new(),
                };
                for r in listed {
                    if r != node.region && !peers.iter().any(|p| p.name == r) {
                        return Err(InstallError::UnknownRegion { ns: n.name.clone(), region: r });
                    }
                }
            }
        }
        let host = host.clone();
        let (region, share) = (node.region.clone(), node.instance_share);
        let deployed = tokio::task::spawn_blocking(move || prepare(&host, bundle, &region, share))
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

    /// Switches the app's traffic to an installed version and records it.
    pub fn activate(&self, node: &Node, id: &VersionId) -> Result<(), String> {
        let d = self
            .installed
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| format!("version {} is not installed here; install it first", id.short()))?;
        // A version that declares namespaces needs the app's store first.
        let kv = if d.namespaces.is_empty() {
            self.kv()
        } else {
            Some(self.kv_or_open(node).map_err(|e| format!("cannot open the key-value store: {e}"))?)
        };
        meridian_core::fs::write_atomic(&self.active_file(), id.as_str().as_bytes())
            .map_err(|e| format!("cannot record the active version: {e}"))?;
        if let Some(svc) = kv {
            svc.namespaces.store(d.namespaces.clone());
            // Users come once it has caught up with its peers on these.
            meridian_data::rejoin::start(&svc);
            // Strong namespaces: start (or keep) this region's Raft groups.
            let (dir, nss) = (self.dir.clone(), d.namespaces.clone());
            tokio::spawn(async move { strong::ensure_groups(&svc, &dir, &nss).await });
        }
        let previous = self.active.swap(Some(d)).map(|p| p.id.clone());
        // A rollout that reached 100 % ends its split here.
        let _ = std::fs::remove_file(self.split_file());
        self.canary.store(None);
        // Keep the new and the previous version in memory (a rollback is a
        // pointer swap); older ones are dropped once their last request ends.
        // Their bundles and compiled code stay on disk, so reinstalling one
        // costs no compilation. Activating the version already active (a
        // canary's rollback) changes nothing, so it drops nothing: the
        // canary may be tried again.
        if previous.as_ref() != Some(id) {
            self.installed.lock().unwrap().retain(|v, _| v == id || Some(v) == previous.as_ref());
        }
        tracing::info!(app = %self.name, version = id.short(), previous = previous.as_ref().map(|p| p.short()), "activated");
        Ok(())
    }

    pub fn status(&self) -> AppStatus {
        let mut installed: Vec<VersionId> = self.installed.lock().unwrap().keys().cloned().collect();
        installed.sort();
        AppStatus {
            app: self.name.clone(),
            active: self.active.load().as_ref().map(|d| d.id.clone()),
            installed,
            split: self.canary().map(|c| Split { version: c.version.id.clone(), percent: c.percent }),
        }
    }

    /// Stops the app's background work (replication, Raft) so its store can
    /// be closed; requests already running finish.
    pub async fn stop(&self) {
        if let Some(svc) = self.kv.load_full() {
            svc.repl.stop().await;
            let groups: Vec<_> = svc.groups.lock().unwrap().drain().map(|(_, g)| g).collect();
            for g in groups {
                let _ = g.raft.shutdown().await;
            }
        }
    }

    /// Deletes the app from this node: stops it, waits (bounded) for the
    /// requests still holding its store, closes the store, and removes its
    /// directory. The app must already be unreachable (out of the node's
    /// table). Returns what was removed.
    pub async fn remove(self: Arc<Self>, region: &str) -> std::io::Result<AppRemoved> {
        // The record goes first: a node that stops halfway finds a
        // directory without one at its next start, and finishes the job.
        let _ = std::fs::remove_file(self.dir.join("app.json"));
        self.stop().await;
        self.active.store(None);
        self.canary.store(None);
        self.installed.lock().unwrap().clear();
        if let Some(svc) = self.kv.swap(None) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while Arc::strong_count(&svc) > 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if Arc::strong_count(&svc) > 1 {
                tracing::warn!(app = %self.name, "requests still hold the store after 10 s; removing its files anyway");
            }
            // Dropping the last handle joins the writer: the file is closed.
            tokio::task::spawn_blocking(move || drop(svc)).await.map_err(std::io::Error::other)?;
        }
        let (files, bytes) = remove_tree(&self.dir)?;
        tracing::info!(app = %self.name, files, bytes, "app deleted");
        Ok(AppRemoved { region: region.to_string(), app: self.name.clone(), files, bytes })
    }
}

/// Removes a directory tree; (files, bytes) it held.
pub(crate) fn remove_tree(dir: &Path) -> std::io::Result<(u64, u64)> {
    fn walk(dir: &Path, files: &mut u64, bytes: &mut u64) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let meta = e.metadata()?;
            if meta.is_dir() {
                walk(&e.path(), files, bytes)?;
            } else {
                *files += 1;
                *bytes += meta.len();
            }
        }
        Ok(())
    }
    let (mut files, mut bytes) = (0, 0);
    match walk(dir, &mut files, &mut bytes) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    }
    std::fs::remove_dir_all(dir)?;
    Ok((files, bytes))
}

/// An app's admission limits in this region: `[limits]`, and its share of
/// the node's instances.
pub(crate) struct Admission {
    pub(crate) rate: Option<governor::DefaultDirectRateLimiter>,
    pub(crate) slots: Arc<tokio::sync::Semaphore>,
}

impl Admission {
    fn new(t: &meridian_manifest::TrafficLimits, share: u32) -> Admission {
        let slots = t.max_concurrency.unwrap_or(share).min(share).max(1);
        Admission {
            rate: t
                .requests_per_second
                .and_then(std::num::NonZeroU32::new)
                .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n))),
            slots: Arc::new(tokio::sync::Semaphore::new(slots as usize)),
        }
    }
}

/// Compiles every component and loads every static directory of a bundle.
fn prepare(host: &Host, bundle: Bundle, region: &str, share: u32) -> Result<Deployed, InstallError> {
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
    let admission = Admission::new(&bundle.manifest.traffic, share);
    Ok(Deployed {
        id: bundle.id,
        manifest: bundle.manifest,
        namespaces,
        components,
        statics,
        version_header,
        admission,
        stats: VersionStats::default(),
        all_cached,
    })
}

#[cfg(test)]
mod tests {
    use super::Admission;
    use meridian_manifest::TrafficLimits;

    #[test]
    fn an_app_gets_at_most_its_share_of_instances() {
        let slots = |max_concurrency, share| {
            let t = TrafficLimits { requests_per_second: None, max_concurrency };
            Admission::new(&t, share).slots.available_permits()
        };
        assert_eq!(slots(None, 50), 50, "no limit asked: the share");
        assert_eq!(slots(Some(8), 50), 8, "a manifest may lower it");
        assert_eq!(slots(Some(500), 50), 50, "but not raise it");
    }
}
