//! The control plane: keeps the world's apps (name, hostnames), their
//! versions and which one should run, and makes every region run them.
//!
//! A deploy is two-phase. First the version is installed on every reachable
//! region (each verifies the bundle and compiles it); if any region refuses
//! it, for example because a component does not compile, the deploy stops and
//! nothing changes anywhere. Only when all reachable regions hold the
//! compiled version is each one switched to it. A region that was unreachable
//! is brought up to date by the reconcile loop when it comes back.
//!
//! The API is served over TLS with the control plane's certificate (clients
//! verify it against the cluster CA) and every call needs the operator's
//! bearer token. Regions are called on their cluster ports with mutual TLS:
//! the control plane proves it is the control plane with its certificate,
//! never with a token.
//!
//! State: everything but the bundles is replicated by Raft across the
//! control nodes (see [`consensus`]): apps, desired versions, tokens,
//! rollouts in progress, the audit log. Only the leader acts; the others
//! forward API calls to it and take over, rollouts included, when it is
//! gone. Bundles are files by content id in `DATA_DIR/bundles`, pushed to
//! every control node at deploy and fetched from a peer (id checked) by a
//! node that lacks one.
//!
//! Apps: `POST /v1/apps` creates one (administrator token only) and records
//! it on every region; `DELETE /v1/apps/<name>` makes every region remove
//! its versions and data (each says how much) and revokes its tokens; a
//! region that was down is told by the reconcile loop when it is back.

pub mod audit;
pub mod consensus;
pub mod purge;
pub mod rollout;
pub mod tokens;

use bytes::Bytes;
use consensus::{Command, Consensus, ControlMember, ProposeError};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use meridian_core::wire::{AppRecord, AppRemoved, AppStatus, RegionStatus};
use meridian_core::{headers, VersionId};
use meridian_http::cluster::{CallError, ClusterClient, Target};
use meridian_http::{json, text, unauthorized, Body, Role, Tls};
use meridian_manifest::Bundle;
use meridian_trust::{Expect, TlsFiles};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokens::{Caller, Scope, Tokens};

/// Largest bundle accepted by a deploy.
const MAX_DEPLOY_BYTES: usize = 512 << 20;
/// Calls a follower passes to the leader at once; more wait no longer than
/// a moment and are told to retry.
const MAX_FORWARDS: usize = 8;

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// The API (TLS with this node's certificate; operators' bearer token).
    pub listen: std::net::SocketAddr,
    pub data_dir: PathBuf,
    /// The operators' bearer token.
    pub token_file: PathBuf,
    /// The control plane's certificate (role `control`).
    pub tls: TlsFiles,
    pub regions: Vec<ControlRegion>,
    #[serde(default = "default_reconcile_ms")]
    pub reconcile_interval_ms: u64,
    /// If set, every app also answers at `<app>.<apps_domain>` (as
    /// `<app>.fly.dev`); `meridian dev` uses `localhost`.
    #[serde(default)]
    pub apps_domain: Option<String>,
    /// The control nodes of a highly-available control plane, this one
    /// included (three in different regions survive losing one). Empty:
    /// this node alone.
    #[serde(default)]
    pub members: Vec<ControlMember>,
    /// Raft heartbeat between control nodes; elections time out after 4-6
    /// of them. Must exceed the longest round trip between members.
    #[serde(default = "default_heartbeat_ms")]
    pub raft_heartbeat_ms: u64,
    /// The edges whose caches a purge (and every rollout's end) reaches.
    #[serde(default)]
    pub edges: Vec<purge::ControlEdge>,
}

fn default_reconcile_ms() -> u64 {
    2000
}

fn default_heartbeat_ms() -> u64 {
    250
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRegion {
    pub name: String,
    /// The region's cluster port, e.g. `https://10.0.1.7:7401`.
    pub url: String,
}

impl ControlRegion {
    /// Where to reach the region, and who it must prove to be: a region
    /// certificate with its name.
    pub fn target(&self) -> Result<Target, CallError> {
        Target::from_url(self.url.trim_end_matches('/'), Expect::new(&self.name, Role::Region))
    }
}

/// One app as the control plane keeps it.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct AppState {
    pub record: AppRecord,
    pub desired: Option<VersionId>,
    #[serde(default)]
    pub history: Vec<VersionId>,
}

#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct ControlState {
    #[serde(default)]
    pub apps: BTreeMap<String, AppState>,
    /// Deleted apps, with the regions that have not confirmed removing
    /// their data yet (the reconcile loop keeps asking).
    #[serde(default)]
    pub deleting: BTreeMap<String, BTreeSet<String>>,
}

pub struct Control {
    config: ControlConfig,
    tokens: Tokens,
    pub tls: Arc<Tls>,
    client: ClusterClient,
    /// The replicated state, and whether this node leads.
    pub consensus: Arc<Consensus>,
    /// Serialises deploys' first phase, app changes and reconcile rounds.
    deploy_lock: tokio::sync::Mutex<()>,
    /// Bodies a follower holds while it passes calls to the leader: at
    /// most [`MAX_FORWARDS`] at once (each up to a bundle's size).
    forwards: tokio::sync::Semaphore,
    /// Apps whose rollout runs on this node (registered under
    /// `deploy_lock`), so a rollout is never run twice here.
    running: Mutex<BTreeSet<String>>,
    /// The term in which this node, leading, has applied everything
    /// committed before it (it serves the API only then).
    caught_up_term: std::sync::atomic::AtomicU64,
    /// Compiles each component once for every region (same engine
    /// configuration; its compile cache keeps what was compiled).
    compiler: Arc<meridian_host::Host>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RegionOutcome {
    pub region: String,
    /// `active`, `pending` (unreachable; the reconcile loop will finish the
    /// job) or `refused`.
    pub outcome: String,
    pub detail: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DeployReport {
    pub app: String,
    pub version: VersionId,
    pub regions: Vec<RegionOutcome>,
    /// Every smoke test, traffic step and gate of the rollout, in order.
    #[serde(default)]
    pub steps: Vec<rollout::StepOutcome>,
    /// What the edges forgot because this version changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge: Option<purge::PurgeReport>,
}

/// What deleting an app did in each region.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DeleteReport {
    pub app: String,
    /// Regions that removed the app's files, and how much.
    pub removed: Vec<AppRemoved>,
    /// Regions that could not be reached: the reconcile loop removes the
    /// app there when they come back.
    pub pending: Vec<String>,
    pub tokens_revoked: usize,
}

/// `POST /v1/apps`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApp {
    pub name: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub default: bool,
}

enum RegionCall {
    Ok(String),
    Refused(String),
    Unreachable(String),
}

type ApiError = (StatusCode, String);

fn propose_failed(e: ProposeError) -> ApiError {
    match e {
        ProposeError::NotLeader { .. } => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}; retry")),
        ProposeError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Marks a request a control node forwarded to the leader (so it is never
/// forwarded again).
const FORWARDED: &str = "x-meridian-forwarded";

impl Control {
    pub async fn open(config: ControlConfig) -> anyhow::Result<Arc<Control>> {
        let token = std::fs::read_to_string(&config.token_file)
            .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", config.token_file.display()))?
            .trim()
            .to_string();
        let tls = Tls::load(config.tls.clone())?;
        let me = tls.identity();
        if me.role != Role::Control {
            anyhow::bail!("the certificate is for {me}; the control plane needs one issued with --role control");
        }
        if let Some(d) = &config.apps_domain {
            if !meridian_core::wire::is_valid_hostname(d) {
                anyhow::bail!("apps_domain {d:?} is not a hostname");
            }
        }
        std::fs::create_dir_all(config.data_dir.join("bundles"))?;
        let client = ClusterClient::new(tls.clone(), Duration::from_secs(2));
        let own_url = format!("https://{}", config.listen);
        let consensus = Consensus::start(
            &config.data_dir,
            &me.name,
            &own_url,
            &config.members,
            config.raft_heartbeat_ms.max(20),
            client.clone(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("control state: {e}"))?;
        let compiler = Arc::new(meridian_host::Host::new(meridian_host::HostConfig {
            cache_dir: config.data_dir.join("compiled"),
            max_instances: 1,
            max_memory_mb: 64,
            // Regions' engines use the default pooling too, so what this
            // compiles has their engine key.
            pooling: meridian_host::Pooling::default(),
        })?);
        Ok(Arc::new(Control {
            config,
            tokens: Tokens::new(&token),
            client,
            tls,
            consensus,
            deploy_lock: tokio::sync::Mutex::new(()),
            forwards: tokio::sync::Semaphore::new(MAX_FORWARDS),
            running: Default::default(),
            caught_up_term: std::sync::atomic::AtomicU64::new(0),
            compiler,
        }))
    }

    /// A copy of the apps' state as this node last applied it (for a
    /// reconcile round; a lookup reads it in place with `consensus.read`).
    fn state(&self) -> ControlState {
        self.consensus.read(|m| m.state.clone())
    }

    /// Changes the apps' state through the log: `f` runs on the current
    /// state and the result applies only if nothing changed it meanwhile
    /// (else `f` runs again on the newer state).
    async fn update<T>(&self, mut f: impl FnMut(&mut ControlState) -> T) -> Result<T, ApiError> {
        for _ in 0..16 {
            let (revision, mut next) = self.consensus.read(|m| (m.revision, m.state.clone()));
            let out = f(&mut next);
            match self.consensus.propose(Command::SetState { revision, state: next }).await {
                Ok(r) if r.applied => return Ok(out),
                Ok(_) => continue,
                Err(e) => return Err(propose_failed(e)),
            }
        }
        Err((StatusCode::CONFLICT, "the control state changed too often meanwhile; retry".into()))
    }

    /// The purge an app's hostnames scope: its own, and for the default app
    /// every host no other app claims.
    fn purge_scope(&self, app: &str) -> Option<meridian_core::wire::Purge> {
        self.consensus.read(|m| {
            let a = m.state.apps.get(app)?;
            let others = a.record.default.then(|| {
                m.state.apps.values().filter(|o| o.record.name != app).flat_map(|o| o.record.hosts.clone()).collect()
            });
            Some(meridian_core::wire::Purge {
                hosts: a.record.hosts.clone(),
                any_host_but: others,
                ..Default::default()
            })
        })
    }

    /// Sends `p` to every edge at once (each gets 5 s).
    async fn purge_edges(&self, p: meridian_core::wire::Purge) -> purge::PurgeReport {
        purge::fan_out(&self.client, &self.config.edges, p, Duration::from_secs(5)).await
    }

    /// Tells every edge to stop caching `app` (for an hour at most; the
    /// rollout's end purge restarts it).
    async fn pause_edges(&self, app: &str) {
        if self.config.edges.is_empty() {
            return;
        }
        let Some(mut p) = self.purge_scope(app) else { return };
        p.pause_ms = Some(3_600_000);
        let report = self.purge_edges(p).await;
        tracing::info!(app, ms = report.ms, failed = report.failed().len(), "edge caching paused for the rollout");
    }

    /// Purges what differs between two versions of `app` at every edge.
    async fn purge_changes(&self, app: &str, old: Option<&VersionId>, new: &VersionId) -> Option<purge::PurgeReport> {
        if self.config.edges.is_empty() {
            return None;
        }
        let mut p = self.purge_scope(app)?;
        let load = |id: &VersionId| {
            let id = id.clone();
            async move { Bundle::from_tar(&self.bundle(&id).await.ok()?).ok() }
        };
        match old {
            Some(old) => match (load(old).await, load(new).await) {
                (Some(a), Some(b)) => {
                    let c = purge::changes(&a, &b);
                    (p.paths, p.prefixes, p.all) = (c.paths, c.prefixes, c.all);
                }
                _ => p.all = true,
            },
            None => p.all = true,
        }
        // Also ends the pause the rollout started; what stays cached is the
        // same in both versions.
        p.pause_ms = Some(0);
        if let Some(old) = old.filter(|_| !p.all) {
            p.relabel =
                Some(meridian_core::wire::Relabel { from: old.short().to_string(), to: new.short().to_string() });
        }
        let report = self.purge_edges(p).await;
        tracing::info!(app, ms = report.ms, failed = report.failed().len(), "edges purged after the rollout");
        Some(report)
    }

    fn bundle_path(&self, id: &VersionId) -> PathBuf {
        self.config.data_dir.join("bundles").join(format!("{id}.tar"))
    }

    /// The other control nodes.
    fn peers(&self) -> Vec<ControlMember> {
        let me = self.consensus.node_id;
        self.consensus.members.iter().filter(|(id, _)| **id != me).map(|(_, m)| m.clone()).collect()
    }

    /// Stores a bundle on this node's disk.
    async fn store_bundle(&self, id: &VersionId, tar: &Bytes) -> Result<(), ApiError> {
        let path = self.bundle_path(id);
        if path.exists() {
            return Ok(());
        }
        let tar = tar.clone();
        tokio::task::spawn_blocking(move || meridian_core::fs::write_atomic(&path, &tar))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the version: {e}")))
    }

    /// Sends a bundle to every other control node (in parallel; one that
    /// misses it fetches it from another when it needs it).
    async fn replicate_bundle(&self, id: &VersionId, tar: &Bytes) {
        let peers = self.peers();
        futures::future::join_all(peers.iter().map(|m| async move {
            let Ok(target) = m.target() else { return };
            let path = format!("/v1/internal/bundles/{id}");
            match self.client.call(&target, Method::PUT, &path, tar.clone(), Duration::from_secs(120)).await {
                Ok(a) if a.status.is_success() => {}
                Ok(a) => tracing::warn!(node = %m.name, answer = %a.text(), "bundle not taken"),
                Err(e) => tracing::info!(node = %m.name, error = %e, "bundle not sent; it will fetch it"),
            }
        }))
        .await;
    }

    /// A stored bundle: from this node's disk, else from another control
    /// node (kept only if its content is the id asked for).
    async fn bundle(&self, id: &VersionId) -> Result<Bytes, String> {
        let path = self.bundle_path(id);
        match std::fs::read(&path) {
            Ok(b) => return Ok(Bytes::from(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        let mut last = "no other control node".to_string();
        for m in self.peers() {
            let Ok(target) = m.target() else { continue };
            let got = self
                .client
                .call(
                    &target,
                    Method::GET,
                    &format!("/v1/internal/bundles/{id}"),
                    Bytes::new(),
                    Duration::from_secs(120),
                )
                .await;
            match got {
                Ok(a) if a.status.is_success() => match Bundle::from_tar(&a.body) {
                    Ok(b) if &b.id == id => {
                        meridian_core::fs::write_atomic(&path, &a.body).map_err(|e| e.to_string())?;
                        return Ok(a.body);
                    }
                    Ok(b) => last = format!("{} sent version {} instead", m.name, b.id.short()),
                    Err(e) => last = format!("{} sent an unreadable bundle: {e}", m.name),
                },
                Ok(a) => last = format!("{}: {}", m.name, a.text()),
                Err(e) => last = format!("{}: {e}", m.name),
            }
        }
        Err(format!("version {} is on no reachable control node ({last})", id.short()))
    }

    async fn call(
        &self,
        region: &ControlRegion,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> RegionCall {
        let target = match region.target() {
            Ok(t) => t,
            Err(e) => return RegionCall::Refused(e.to_string()),
        };
        let path = format!("{}{}", headers::RESERVED_PREFIX, path);
        match self.client.call(&target, method, &path, body, timeout).await {
            Err(e @ (CallError::BadTarget(_) | CallError::TooLarge { .. })) => RegionCall::Refused(e.to_string()),
            Err(e) => RegionCall::Unreachable(e.to_string()),
            Ok(a) => {
                let body = a.text();
                if a.status.is_success() {
                    RegionCall::Ok(body)
                } else if a.status.is_server_error() {
                    RegionCall::Unreachable(format!("{}: {body}", a.status))
                } else {
                    RegionCall::Refused(body)
                }
            }
        }
    }

    /// The same call to every region at once; answers in the config's
    /// order of regions.
    async fn call_all(&self, method: Method, path: &str, body: Bytes, timeout: Duration) -> Vec<RegionCall> {
        let calls = self.config.regions.iter().map(|r| self.call(r, method.clone(), path, body.clone(), timeout));
        futures::future::join_all(calls).await
    }

    /// Records every app on every region, in parallel; regions that could
    /// not take it get it from the reconcile loop.
    async fn push_records(&self, records: &[AppRecord]) {
        let calls = self.config.regions.iter().flat_map(|r| {
            records.iter().map(move |rec| async move {
                let body = Bytes::from(serde_json::to_vec(rec).unwrap_or_default());
                let path = format!("apps/{}", rec.name);
                if let RegionCall::Unreachable(e) | RegionCall::Refused(e) =
                    self.call(r, Method::PUT, &path, body, Duration::from_secs(5)).await
                {
                    tracing::debug!(region = %r.name, app = %rec.name, error = %e, "app record pending");
                }
            })
        });
        futures::future::join_all(calls).await;
    }

    /// Compiles the bundle's components the regions do not have yet (from
    /// this node's cache if compiled before) and sends each region the ones
    /// it lacks.
    async fn ship_compiled(&self, bundle: &Bundle) {
        let mut components: std::collections::BTreeMap<String, &[u8]> = Default::default();
        for c in bundle.manifest.components.values() {
            if let (Some(wasm), Some(d)) = (bundle.files.get(&c.source), bundle.digests.get(&c.source)) {
                components.insert(hex::encode(d), wasm);
            }
        }
        // Which region lacks which.
        let digests: Vec<String> = components.keys().cloned().collect();
        let digests = &digests;
        let lacks = futures::future::join_all(self.config.regions.iter().map(|r| async move {
            let mut missing = Vec::new();
            for d in digests {
                let path = format!("compiled/{d}");
                if let RegionCall::Refused(_) =
                    self.call(r, Method::GET, &path, Bytes::new(), Duration::from_secs(5)).await
                {
                    missing.push(d.clone());
                }
            }
            (r, missing)
        }))
        .await;
        let needed: Vec<String> =
            lacks.iter().flat_map(|(_, m)| m).cloned().collect::<BTreeSet<String>>().into_iter().collect();
        if needed.is_empty() {
            return;
        }
        // One component after another (each compile already uses every
        // core), so a later component reuses the functions an earlier one
        // compiled (the incremental cache; components of one toolchain
        // share most of their code); each is shipped while the next compiles.
        let t = std::time::Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Bytes)>(needed.len());
        let compile = async {
            for d in &needed {
                let (compiler, wasm) = (self.compiler.clone(), components[d].to_vec());
                let one = std::time::Instant::now();
                match tokio::task::spawn_blocking(move || compiler.compile(&wasm)).await {
                    Ok(Ok(a)) => {
                        tracing::info!(component = %&d[..12], elapsed = ?one.elapsed(), "compiled");
                        let _ = tx.send((d.clone(), Bytes::from(a))).await;
                    }
                    Ok(Err(e)) => tracing::warn!(component = %d, error = %e, "cannot compile; regions will try"),
                    Err(e) => tracing::warn!(component = %d, error = %e, "compile task failed"),
                }
            }
            drop(tx);
            tracing::info!(components = needed.len(), elapsed = ?t.elapsed(), "compiled for the regions");
        };
        let ship = async {
            while let Some((d, artifact)) = rx.recv().await {
                let to = lacks.iter().filter(|(_, missing)| missing.contains(&d)).map(|(r, _)| *r);
                futures::future::join_all(to.map(|r| self.ship_artifact(r, &d, &artifact))).await;
            }
        };
        tokio::join!(compile, ship);
    }

    /// Sends one region the machine code of the component with SHA-256 `d`,
    /// signed with this control node's certificate: a region loads native
    /// code only from its control plane. Best effort: a region that does not
    /// take it compiles the component itself.
    async fn ship_artifact(&self, r: &ControlRegion, d: &str, artifact: &Bytes) {
        use sha2::Digest;
        let Ok(target) = r.target() else { return };
        let path = format!("{}compiled/{d}", headers::RESERVED_PREFIX);
        let engine = self.compiler.engine_key();
        let msg = headers::artifact_message(d, &engine, &sha2::Sha256::digest(artifact));
        let (sig, cert) = match self.tls.sign(&msg) {
            Ok(x) => (hex::encode(x.0), hex::encode(x.1)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot sign compiled code; regions will compile");
                return;
            }
        };
        let hs = [(headers::ENGINE, engine.as_str()), (headers::SIGNATURE, &sig), (headers::SIGNER, &cert)];
        match self.client.call_with(&target, Method::PUT, &path, &hs, artifact.clone(), Duration::from_secs(300)).await
        {
            Ok(ans) if ans.status.is_success() => {}
            Ok(ans) => tracing::info!(region = %r.name, answer = %ans.text(), "compiled code not taken"),
            Err(e) => tracing::debug!(region = %r.name, error = %e, "compiled code not sent"),
        }
    }

    /// Creates an app (or changes its hostnames and default flag).
    pub async fn create_app(&self, n: NewApp) -> Result<AppRecord, ApiError> {
        let bad = |m: String| Err((StatusCode::BAD_REQUEST, m));
        if !meridian_core::wire::is_valid_app_name(&n.name) {
            return bad(format!("{:?} is not an app name: 1-32 characters of a-z, 0-9 and '-'", n.name));
        }
        let mut hosts: Vec<String> = Vec::new();
        for h in n.hosts.iter().map(|h| h.trim().to_ascii_lowercase()) {
            if !meridian_core::wire::is_valid_hostname(&h) {
                return bad(format!("{h:?} is not a hostname (lowercase DNS labels, no port)"));
            }
            if !hosts.contains(&h) {
                hosts.push(h);
            }
        }
        if let Some(d) = &self.config.apps_domain {
            let own = format!("{}.{d}", n.name);
            if !hosts.contains(&own) {
                hosts.insert(0, own);
            }
        }
        let _guard = self.deploy_lock.lock().await;
        let changed = self
            .update(|s| {
                if let Some((other, _)) =
                    s.apps.iter().find(|(name, a)| **name != n.name && a.record.hosts.iter().any(|h| hosts.contains(h)))
                {
                    return Err((StatusCode::CONFLICT, format!("a hostname is already app {other:?}'s")));
                }
                // The first app is the default one unless told otherwise.
                let default = n.default || (s.apps.is_empty() && !s.apps.contains_key(&n.name));
                let record = AppRecord { name: n.name.clone(), hosts: hosts.clone(), default };
                let mut changed = vec![record.clone()];
                if default {
                    for (name, a) in s.apps.iter_mut() {
                        if *name != n.name && a.record.default {
                            a.record.default = false;
                            changed.push(a.record.clone());
                        }
                    }
                }
                s.deleting.remove(&n.name);
                s.apps.entry(n.name.clone()).and_modify(|a| a.record = record.clone()).or_insert(AppState {
                    record,
                    desired: None,
                    history: Vec::new(),
                });
                Ok(changed)
            })
            .await??;
        self.push_records(&changed).await;
        Ok(changed[0].clone())
    }

    /// Deletes an app: its versions stop everywhere and every region
    /// removes its data; its tokens are revoked.
    pub async fn delete_app(&self, name: &str) -> Result<DeleteReport, ApiError> {
        let _guard = self.deploy_lock.lock().await;
        let regions: BTreeSet<String> = self.config.regions.iter().map(|r| r.name.clone()).collect();
        let existed = self
            .update(|s| {
                let existed = s.apps.remove(name).is_some();
                if existed {
                    s.deleting.insert(name.to_string(), regions.clone());
                }
                existed
            })
            .await?;
        if !existed && !self.consensus.read(|m| m.state.deleting.contains_key(name)) {
            return Err((StatusCode::NOT_FOUND, format!("no app named {name:?}")));
        }
        let tokens_revoked =
            self.consensus.propose(Command::RevokeApp { app: name.to_string() }).await.map_err(propose_failed)?.count
                as usize;
        let path = format!("apps/{name}");
        let calls = self.call_all(Method::DELETE, &path, Bytes::new(), Duration::from_secs(60)).await;
        let mut removed = Vec::new();
        let mut pending = Vec::new();
        for (r, c) in self.config.regions.iter().zip(calls) {
            match c {
                RegionCall::Ok(b) => match serde_json::from_str::<AppRemoved>(&b) {
                    Ok(rm) => removed.push(rm),
                    Err(e) => pending.push(format!("{}: unreadable answer: {e}", r.name)),
                },
                RegionCall::Unreachable(e) | RegionCall::Refused(e) => pending.push(format!("{}: {e}", r.name)),
            }
        }
        let done: Vec<String> = removed.iter().map(|r| r.region.clone()).collect();
        self.update(|s| {
            if let Some(left) = s.deleting.get_mut(name) {
                left.retain(|r| !done.contains(r));
                if left.is_empty() {
                    s.deleting.remove(name);
                }
            }
        })
        .await?;
        Ok(DeleteReport { app: name.to_string(), removed, pending, tokens_revoked })
    }

    /// Stores a version of an existing app and makes it run everywhere
    /// (see the module docs).
    pub async fn deploy(
        self: &Arc<Self>,
        tar: Bytes,
        caller: &Caller,
        named: Option<&str>,
    ) -> Result<DeployReport, ApiError> {
        let bundle = Bundle::from_tar(&tar).map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        let app = bundle.manifest.name.clone();
        if let Some(named) = named.filter(|n| *n != app) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("the bundle is app {app:?}, but the deploy was sent for app {named:?}"),
            ));
        }
        if !caller.may(Scope::Deploy, &app) {
            return Err((
                StatusCode::FORBIDDEN,
                format!("this token may not deploy app {app:?} (it needs the deploy scope on it)"),
            ));
        }
        let guard = self.deploy_lock.lock().await;
        let current = self.consensus.read(|m| m.rollouts.get(&app).filter(|r| !r.finished()).cloned());
        if let Some(r) = current {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "a rollout of app {app:?} (version {}) is in progress; see `meridian rollout status`, \
                     abort it or wait for it",
                    r.version.short()
                ),
            ));
        }
        if !self.consensus.read(|m| m.state.apps.contains_key(&app)) {
            return Err((
                StatusCode::NOT_FOUND,
                format!(
                    "there is no app {app:?} in this world; create it first: meridian apps create {app} --host HOST"
                ),
            ));
        }
        // A plan naming regions this world lacks is refused before anything.
        let waves = self.waves(&bundle.manifest.rollout).map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e))?;
        let id = bundle.id.clone();
        // Stored here while, phase 0, each component is compiled once, here,
        // and the machine code shipped to the regions that lack it (they
        // load it at install instead of compiling). Best effort: a region
        // that did not get it compiles.
        let (stored, ()) = tokio::join!(self.store_bundle(&id, &tar), self.ship_compiled(&bundle));
        stored?;
        // Phase 1: install everywhere reachable.
        let install_timeout = Duration::from_secs(300);
        let install_path = format!("apps/{app}/versions/{id}");
        let installs = self.call_all(Method::PUT, &install_path, tar.clone(), install_timeout).await;
        // Then the bundle goes to every other control node (a new leader may
        // need it to bring a returning region up to date), in the
        // background: off the deploy's path, which needs every core.
        let (this, bundle_id, bundle_tar) = (self.clone(), id.clone(), tar.clone());
        tokio::spawn(async move { this.replicate_bundle(&bundle_id, &bundle_tar).await });
        let mut outcomes = Vec::new();
        let mut refused = Vec::new();
        for (r, res) in self.config.regions.iter().zip(installs) {
            match res {
                RegionCall::Ok(answer) => {
                    // Whether the region loaded machine code (shipped from
                    // here, or compiled before) or had to compile.
                    let cached =
                        serde_json::from_str::<serde_json::Value>(&answer).ok().and_then(|v| v["from_cache"].as_bool());
                    let note = match cached {
                        Some(true) => "loaded compiled code",
                        Some(false) => "compiled in the region",
                        None => "",
                    };
                    outcomes.push((r.name.clone(), true, note.to_string()))
                }
                RegionCall::Unreachable(e) => outcomes.push((r.name.clone(), false, e)),
                RegionCall::Refused(e) => refused.push(e),
            }
        }
        if !refused.is_empty() {
            return Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("version {} refused; nothing was changed:\n{}", id.short(), refused.join("\n")),
            ));
        }
        if outcomes.iter().all(|(_, ok, _)| !ok) {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "no region is reachable; nothing was changed".into()));
        }
        // Phase 2: the rollout, wave by wave, over the regions that hold it.
        // Its plan and progress are in the replicated state (a new leader
        // finishes it); it runs in a task of its own (a client that goes
        // away does not stop it halfway), without the deploy lock (other
        // apps deploy meanwhile).
        let installed: Vec<&str> = outcomes.iter().filter(|(_, ok, _)| *ok).map(|(r, _, _)| r.as_str()).collect();
        let waves: Vec<Vec<String>> = waves
            .into_iter()
            .map(|w| w.into_iter().filter(|r| installed.contains(&r.name.as_str())).map(|r| r.name.clone()).collect())
            .filter(|w: &Vec<String>| !w.is_empty())
            .collect();
        let old = self.consensus.read(|m| m.state.apps.get(&app).and_then(|a| a.desired.clone())).filter(|o| o != &id);
        let record = rollout::RolloutRecord {
            app: app.clone(),
            version: id.clone(),
            old,
            state: "running".into(),
            command: rollout::Command::Run,
            approvals: 0,
            steps: Vec::new(),
            waves,
            rollout: bundle.manifest.rollout.clone(),
            smoke: bundle.manifest.smoke.clone(),
            installs: outcomes,
            started_ms: consensus::now_ms(),
            stopped: None,
            by: caller.who(),
        };
        self.running.lock().unwrap().insert(app.clone());
        let started = self.consensus.propose(Command::Rollout { record: Box::new(record.clone()) }).await;
        if let Err(e) = started {
            self.running.lock().unwrap().remove(&app);
            return Err(propose_failed(e));
        }
        self.note(caller, "rollout.start", Some(&app), id.short(), "ok").await;
        drop(guard);
        let this = self.clone();
        tokio::spawn(async move { this.drive(record).await })
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("the rollout task failed: {e}")))?
    }

    /// Runs a rollout from its record to the end (here, while this node
    /// leads) and records how it ended.
    async fn drive(&self, record: rollout::RolloutRecord) -> Result<DeployReport, ApiError> {
        let (app, id, old) = (record.app.clone(), record.version.clone(), record.old.clone());
        // While it runs, edges neither serve nor store this app's answers:
        // a client sees the version the regions give it, not a cached one.
        self.pause_edges(&app).await;
        let ctl = rollout::RolloutCtl::new(self.consensus.clone(), record.clone());
        let result = self.run_rollout(&rollout::Plan { ctl: &ctl, record: &record }).await;
        self.running.lock().unwrap().remove(&app);
        let system = Caller::System(self.consensus.me().name.clone());
        let (state, desired) = match &result {
            Err(rollout::Halted::Deposed(e)) => {
                tracing::info!(app, error = %e, "lost the lead mid-rollout; the new leader continues it");
                return Err((
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "this control node stopped leading during the rollout of version {}; the new leader \
                         continues it from its last recorded step: see `meridian rollout status {app}`",
                        id.short()
                    ),
                ));
            }
            Ok(()) => ("succeeded", Some(id.clone())),
            Err(rollout::Halted::Stopped(s)) if s.reason.starts_with("aborted") => ("aborted and rolled back", None),
            Err(rollout::Halted::Stopped(_)) => ("rolled back", None),
        };
        let finish = Command::FinishRollout { app: app.clone(), state: state.into(), desired };
        if let Err(e) = self.consensus.propose(finish).await {
            return Err(propose_failed(e));
        }
        self.note(&system, "rollout.end", Some(&app), id.short(), state).await;
        // Whichever way it ended, regions may have served the new version:
        // the edges forget what differs between the two.
        let purged = self.purge_changes(&app, old.as_ref(), &id).await;
        let steps = self.consensus.read(|m| m.rollouts.get(&app).map(|r| r.steps.clone())).unwrap_or_default();
        if let Err(rollout::Halted::Stopped(stopped)) = result {
            let log: Vec<String> = steps
                .iter()
                .map(|s| {
                    let ok = if s.ok { "ok  " } else { "FAIL" };
                    format!("  {:<16} {:<8} {ok} +{} ms  {}", s.region, s.step, s.at_ms, s.detail)
                })
                .collect();
            return Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "rollout of version {} stopped in {} at step {}: {}\nrolled back; the app stays on {}.\n{}",
                    id.short(),
                    stopped.region,
                    stopped.step,
                    stopped.reason,
                    old.as_ref().map(|o| o.short().to_string()).unwrap_or_else(|| "no version".into()),
                    log.join("\n")
                ),
            ));
        }
        let report: Vec<RegionOutcome> = record
            .installs
            .into_iter()
            .map(|(r, installed, err)| {
                let ok = steps.iter().any(|s| s.region == r && s.step == "100%" && s.ok);
                match (installed, ok) {
                    (true, true) => RegionOutcome { region: r.clone(), outcome: "active".into(), detail: err },
                    (_, _) => RegionOutcome { region: r.clone(), outcome: "pending".into(), detail: err },
                }
            })
            .collect();
        Ok(DeployReport { app, version: id, regions: report, steps, purge: purged })
    }

    /// A control plane from before replication kept its state in files
    /// (`state.json`, `tokens.json`, `audit.jsonl`): the first leader over
    /// such a data directory imports them into the replicated state, once,
    /// and renames them `*.imported`. Files next to a replicated state that
    /// already holds something are left alone (and said so).
    pub async fn import_legacy(&self) -> Result<(), String> {
        let dir = &self.config.data_dir;
        let files = [dir.join("state.json"), dir.join("tokens.json"), dir.join("audit.jsonl")];
        if !files.iter().any(|f| f.exists()) {
            return Ok(());
        }
        let empty = self.consensus.read(|m| m.revision == 0 && m.tokens.is_empty() && m.audit_seq == 0);
        if !empty {
            tracing::warn!(dir = %dir.display(), "files of an older control plane next to a replicated state; left alone");
            return Ok(());
        }
        let read = |p: &std::path::Path| match std::fs::read(p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", p.display())),
        };
        let state: ControlState = match read(&files[0])? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", files[0].display()))?,
            None => ControlState::default(),
        };
        let tokens: Vec<tokens::TokenRecord> = match read(&files[1])? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", files[1].display()))?,
            None => Vec::new(),
        };
        let entries = audit::read_legacy(&files[2]).map_err(|e| e.to_string())?;
        let summary = format!("{} apps, {} tokens, {} audit entries", state.apps.len(), tokens.len(), entries.len());
        let mut commands = vec![Command::SetState { revision: 0, state }];
        commands.extend(tokens.into_iter().map(|record| Command::AddToken { record }));
        commands.extend(entries.into_iter().map(|entry| Command::Audit { entry }));
        for c in commands {
            self.consensus.propose(c).await.map_err(|e| e.to_string())?;
        }
        for f in files.iter().filter(|f| f.exists()) {
            let mut to = f.clone().into_os_string();
            to.push(".imported");
            std::fs::rename(f, &to).map_err(|e| format!("{}: {e}", f.display()))?;
        }
        let system = Caller::System(self.consensus.me().name.clone());
        self.note(&system, "control.import", None, &summary, "ok").await;
        tracing::info!(%summary, "imported the state of an older control plane");
        Ok(())
    }

    /// While this node leads: takes over every rollout the replicated state
    /// says is unfinished and not running here (its leader was lost), and
    /// runs the reconcile loop's rounds. Forever.
    pub async fn lead_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.consensus.is_leader() {
                continue;
            }
            let term = self.consensus.raft.metrics().borrow().current_term;
            if self.caught_up_term.load(std::sync::atomic::Ordering::Acquire) != term {
                // A committed entry of this term: everything before it is
                // applied here, so the state read next is the latest.
                if self.consensus.propose(Command::Noop).await.is_err() {
                    continue;
                }
                self.caught_up_term.store(term, std::sync::atomic::Ordering::Release);
                tracing::info!(node = %self.consensus.me().name, term, "leading the control plane");
                if let Err(e) = self.import_legacy().await {
                    tracing::error!(error = %e, "cannot import the older control plane's files");
                }
            }
            let orphans: Vec<rollout::RolloutRecord> = {
                let running = self.running.lock().unwrap();
                self.consensus.read(|m| {
                    m.rollouts.values().filter(|r| !r.finished() && !running.contains(&r.app)).cloned().collect()
                })
            };
            for record in orphans {
                self.running.lock().unwrap().insert(record.app.clone());
                let system = Caller::System(self.consensus.me().name.clone());
                let at = record.steps.last().map(|s| format!(" after {} {}", s.region, s.step)).unwrap_or_default();
                let detail = format!("{}{at}", record.version.short());
                self.note(&system, "rollout.resume", Some(&record.app), &detail, "ok").await;
                tracing::info!(app = %record.app, version = record.version.short(), "resuming a rollout");
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err((status, msg)) = this.drive(record).await {
                        tracing::info!(%status, msg = msg.lines().next().unwrap_or(""), "resumed rollout ended");
                    }
                });
            }
        }
    }

    /// Puts an app back on an earlier version (default: the one before the
    /// desired one) in every region at once — an emergency, so no waves.
    /// Regions that cannot be reached get it from the reconcile loop.
    pub async fn rollback(&self, app: &str, to: Option<&str>, caller: &Caller) -> Result<DeployReport, ApiError> {
        if !caller.may(Scope::Deploy, app) {
            return Err((StatusCode::FORBIDDEN, format!("this token may not roll back app {app:?} (needs deploy)")));
        }
        let _guard = self.deploy_lock.lock().await;
        if self.consensus.read(|m| m.rollouts.get(app).is_some_and(|r| !r.finished())) {
            return Err((
                StatusCode::CONFLICT,
                format!("a rollout of app {app:?} is in progress: `meridian rollout abort` rolls it back"),
            ));
        }
        let (desired, history) =
            match self.consensus.read(|m| m.state.apps.get(app).map(|a| (a.desired.clone(), a.history.clone()))) {
                Some(x) => x,
                None => return Err((StatusCode::NOT_FOUND, format!("no app named {app:?}"))),
            };
        let target = match to {
            Some(v) => history
                .iter()
                .rev()
                .find(|h| h.is_named(v) || h.as_str().starts_with(v))
                .cloned()
                .ok_or_else(|| (StatusCode::NOT_FOUND, format!("app {app:?} never had a version {v:?}")))?,
            None => history
                .iter()
                .rev()
                .find(|h| Some(*h) != desired.as_ref())
                .cloned()
                .ok_or_else(|| (StatusCode::CONFLICT, format!("app {app:?} has no earlier version")))?,
        };
        let tar = self.bundle(&target).await.map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e))?;
        self.update(|s| {
            if let Some(a) = s.apps.get_mut(app) {
                a.desired = Some(target.clone());
            }
        })
        .await?;
        let calls = self.config.regions.iter().map(|r| {
            let (tar, target) = (tar.clone(), target.clone());
            async move {
                let _ = self
                    .call(r, Method::DELETE, &format!("apps/{app}/split"), Bytes::new(), Duration::from_secs(5))
                    .await;
                let installed = self
                    .call(r, Method::PUT, &format!("apps/{app}/versions/{target}"), tar, Duration::from_secs(300))
                    .await;
                let result = match installed {
                    RegionCall::Ok(_) => {
                        let path = format!("apps/{app}/active");
                        self.call(r, Method::PUT, &path, Bytes::from(target.to_string()), Duration::from_secs(10)).await
                    }
                    other => other,
                };
                match result {
                    RegionCall::Ok(_) => {
                        RegionOutcome { region: r.name.clone(), outcome: "active".into(), detail: String::new() }
                    }
                    RegionCall::Unreachable(e) | RegionCall::Refused(e) => {
                        RegionOutcome { region: r.name.clone(), outcome: "pending".into(), detail: e }
                    }
                }
            }
        });
        let regions = futures::future::join_all(calls).await;
        tracing::info!(app, version = target.short(), "rolled back");
        let purge = self.purge_changes(app, desired.as_ref(), &target).await;
        Ok(DeployReport { app: app.to_string(), version: target, regions, steps: Vec::new(), purge })
    }

    /// Brings every region to the desired state (apps, their versions,
    /// deleted apps gone), forever.
    pub async fn reconcile_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.reconcile_interval_ms.max(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Only the leader changes regions.
            if !self.consensus.is_leader() {
                continue;
            }
            // Read the desired state under the deploy lock: read before it,
            // a deploy finishing meanwhile would be undone.
            let _guard = self.deploy_lock.lock().await;
            let state = self.state();
            for r in &self.config.regions {
                if let Err(e) = self.reconcile_region(r, &state).await {
                    tracing::debug!(region = %r.name, error = %e, "reconcile pending");
                }
            }
        }
    }

    async fn reconcile_region(&self, r: &ControlRegion, state: &ControlState) -> Result<(), String> {
        let status = match self.call(r, Method::GET, "status", Bytes::new(), Duration::from_secs(2)).await {
            RegionCall::Ok(b) => b,
            RegionCall::Unreachable(e) | RegionCall::Refused(e) => return Err(e),
        };
        let status: RegionStatus = serde_json::from_str(&status).map_err(|e| format!("unreadable status: {e}"))?;
        for (name, waiting) in &state.deleting {
            if !waiting.contains(&r.name) {
                continue;
            }
            if let RegionCall::Ok(b) =
                self.call(r, Method::DELETE, &format!("apps/{name}"), Bytes::new(), Duration::from_secs(60)).await
            {
                tracing::info!(region = %r.name, app = %name, answer = %b, "removed a deleted app");
                let _ = self
                    .update(|s| {
                        if let Some(left) = s.deleting.get_mut(name) {
                            left.remove(&r.name);
                            if left.is_empty() {
                                s.deleting.remove(name);
                            }
                        }
                    })
                    .await;
            }
        }
        let mut errors = Vec::new();
        let rolling: Vec<String> =
            self.consensus.read(|m| m.rollouts.values().filter(|r| !r.finished()).map(|r| r.app.clone()).collect());
        for (name, app) in state.apps.iter().filter(|(n, _)| !rolling.contains(n)) {
            let have = status.app(name);
            if have.is_none() {
                let body = Bytes::from(serde_json::to_vec(&app.record).unwrap_or_default());
                if let RegionCall::Unreachable(e) | RegionCall::Refused(e) =
                    self.call(r, Method::PUT, &format!("apps/{name}"), body, Duration::from_secs(5)).await
                {
                    errors.push(e);
                    continue;
                }
            }
            // A split outside a rollout is a leftover (a control plane that
            // stopped mid-rollout): end it.
            if have.is_some_and(|a| a.split.is_some()) {
                let path = format!("apps/{name}/split");
                if let RegionCall::Unreachable(e) | RegionCall::Refused(e) =
                    self.call(r, Method::DELETE, &path, Bytes::new(), Duration::from_secs(5)).await
                {
                    errors.push(e);
                }
            }
            let Some(desired) = &app.desired else { continue };
            if have.and_then(|a| a.active.as_ref()) == Some(desired) {
                continue;
            }
            if let Err(e) = self.reconcile_version(r, name, desired, have).await {
                errors.push(format!("{name}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    async fn reconcile_version(
        &self,
        r: &ControlRegion,
        app: &str,
        desired: &VersionId,
        have: Option<&AppStatus>,
    ) -> Result<(), String> {
        if !have.is_some_and(|a| a.installed.contains(desired)) {
            let tar = self.bundle(desired).await?;
            if let RegionCall::Unreachable(e) | RegionCall::Refused(e) = self
                .call(r, Method::PUT, &format!("apps/{app}/versions/{desired}"), tar, Duration::from_secs(300))
                .await
            {
                return Err(e);
            }
        }
        match self
            .call(
                r,
                Method::PUT,
                &format!("apps/{app}/active"),
                Bytes::from(desired.to_string()),
                Duration::from_secs(10),
            )
            .await
        {
            RegionCall::Ok(_) => {
                tracing::info!(region = %r.name, app, version = desired.short(), "reconciled region to the desired version");
                Ok(())
            }
            RegionCall::Unreachable(e) | RegionCall::Refused(e) => Err(e),
        }
    }

    /// The apps a caller may read (an app token: its own app only).
    fn readable_apps(&self, caller: &Caller) -> Vec<AppState> {
        self.consensus
            .read(|m| m.state.apps.values().filter(|a| caller.may(Scope::Read, &a.record.name)).cloned().collect())
    }

    /// Every app the caller may read, with its desired version and what
    /// each region runs.
    pub async fn status(&self, caller: &Caller) -> serde_json::Value {
        let apps = self.readable_apps(caller);
        let calls = self.call_all(Method::GET, "status", Bytes::new(), Duration::from_secs(2)).await;
        let regions: Vec<(String, Result<RegionStatus, String>)> = self
            .config
            .regions
            .iter()
            .zip(calls)
            .map(|(r, c)| {
                let s = match c {
                    RegionCall::Ok(b) => {
                        serde_json::from_str::<RegionStatus>(&b).map_err(|e| format!("unreadable status: {e}"))
                    }
                    RegionCall::Unreachable(e) | RegionCall::Refused(e) => Err(e),
                };
                (r.name.clone(), s)
            })
            .collect();
        let apps: Vec<serde_json::Value> = apps
            .iter()
            .map(|a| {
                let per_region: Vec<serde_json::Value> = regions
                    .iter()
                    .map(|(name, s)| match s {
                        Ok(s) => {
                            let have = s.app(&a.record.name);
                            let active = have.and_then(|x| x.active.clone());
                            serde_json::json!({
                                "region": name,
                                "reachable": true,
                                "active": active,
                                "split": have.and_then(|x| x.split.clone()),
                                // Not what the control plane wants (the
                                // reconcile loop is on it; a rollout in
                                // progress is drift too, on purpose).
                                "drift": a.desired.is_some() && active != a.desired,
                            })
                        }
                        Err(e) => serde_json::json!({"region": name, "reachable": false, "error": e}),
                    })
                    .collect();
                serde_json::json!({
                    "app": a.record.name,
                    "hosts": a.record.hosts,
                    "default": a.record.default,
                    "desired": a.desired,
                    "regions": per_region,
                })
            })
            .collect();
        serde_json::json!({"apps": apps, "control": self.control_status()})
    }

    /// The control nodes as the leader sees them: who leads, in which term,
    /// and how far behind each node's log is (a node that is down falls
    /// behind as changes are made).
    pub fn control_status(&self) -> serde_json::Value {
        let m = self.consensus.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let nodes: Vec<serde_json::Value> = self
            .consensus
            .members
            .iter()
            .map(|(id, member)| {
                let matched = m.replication.as_ref().and_then(|r| r.get(id)).map(|l| l.map(|l| l.index).unwrap_or(0));
                serde_json::json!({
                    "name": member.name,
                    "url": member.url,
                    "leader": m.current_leader == Some(*id),
                    "behind": matched.map(|x| last.saturating_sub(x)),
                })
            })
            .collect();
        let leader = m.current_leader.and_then(|id| self.consensus.members.get(&id)).map(|l| l.name.clone());
        serde_json::json!({"term": m.current_term, "leader": leader, "last_index": last, "nodes": nodes})
    }

    /// An app's key-value data through the control plane, so an app's
    /// token (not a node certificate) is what grants it: `op` and
    /// `conflicts` need `data-admin` (they read and write values), `status`
    /// needs `read`. The control plane calls a region with its certificate;
    /// the region runs or forwards the operation as it would a function's.
    async fn kv_api(
        &self,
        caller: &Caller,
        app: &str,
        rest: &[&str],
        method: Method,
        query: Option<&str>,
        body: Bytes,
    ) -> Response<Body> {
        let needs = if rest == ["status"] { Scope::Read } else { Scope::DataAdmin };
        if !caller.may(needs, app) {
            let what = if needs == Scope::Read { "read" } else { "data-admin" };
            return text(StatusCode::FORBIDDEN, format!("this token may not use app {app:?}'s data (needs {what})"));
        }
        if !self.consensus.read(|m| m.state.apps.contains_key(app)) {
            return text(StatusCode::NOT_FOUND, format!("no app named {app:?}"));
        }
        if rest == ["status"] {
            let path = format!("apps/{app}/kv/status");
            let calls = self.call_all(Method::GET, &path, Bytes::new(), Duration::from_secs(5)).await;
            let all: Vec<serde_json::Value> = calls
                .into_iter()
                .filter_map(|c| if let RegionCall::Ok(b) = c { serde_json::from_str(&b).ok() } else { None })
                .collect();
            return json(StatusCode::OK, &all);
        }
        let path = match (&method, rest) {
            (&Method::POST, ["op"]) => format!("apps/{app}/kv/op"),
            (&Method::GET, ["conflicts", ns]) => format!("apps/{app}/kv/conflicts/{ns}"),
            _ => return text(StatusCode::NOT_FOUND, format!("no such API: kv/{}", rest.join("/"))),
        };
        // The region asked for, else the first that answers (reads and
        // connect failures only: an operation that may have run is not
        // sent again).
        let wanted = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("region=")));
        let regions: Vec<&ControlRegion> = match wanted {
            Some(name) => match self.config.regions.iter().find(|r| r.name == name) {
                Some(r) => vec![r],
                None => return text(StatusCode::NOT_FOUND, format!("no region {name:?}")),
            },
            None => self.config.regions.iter().collect(),
        };
        let mut last = String::from("no region");
        for r in regions {
            let target = match r.target() {
                Ok(t) => t,
                Err(e) => return text(StatusCode::BAD_GATEWAY, e.to_string()),
            };
            let full = format!("{}{}", headers::RESERVED_PREFIX, path);
            match self.client.call(&target, method.clone(), &full, body.clone(), Duration::from_secs(15)).await {
                Ok(a) => {
                    let mut resp = Response::new(meridian_http::full(a.body));
                    *resp.status_mut() = a.status;
                    resp.headers_mut()
                        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                    return resp;
                }
                Err(e) if e.nothing_sent() || method == Method::GET => last = format!("{}: {e}", r.name),
                Err(e) => {
                    return text(StatusCode::BAD_GATEWAY, format!("{}: outcome unknown, not retried: {e}", r.name))
                }
            }
        }
        text(StatusCode::SERVICE_UNAVAILABLE, format!("no region answered ({last})"))
    }

    /// Records a change in the audit log (a failure to record is logged:
    /// the change itself already happened).
    async fn note(&self, caller: &Caller, action: &str, app: Option<&str>, detail: &str, outcome: &str) {
        let entry = audit::Entry {
            seq: 0,
            at_ms: consensus::now_ms(),
            who: caller.who(),
            action: action.to_string(),
            app: app.map(str::to_string),
            detail: detail.to_string(),
            outcome: outcome.to_string(),
        };
        if let Err(e) = self.consensus.propose(Command::Audit { entry }).await {
            tracing::error!(error = %e, action, "cannot write the audit log");
        }
    }

    /// `/v1/internal/…`: other control nodes only (their certificate).
    async fn internal(&self, req: Request<Incoming>, rest: &[&str]) -> Response<Body> {
        let member = meridian_http::Peer::of(&req)
            .is_some_and(|p| p.role == Role::Control && self.consensus.members.values().any(|m| m.name == p.name));
        if !member {
            return text(StatusCode::FORBIDDEN, "only the control plane's other nodes may call this");
        }
        match (req.method().clone(), rest) {
            (Method::POST, ["raft", what]) => {
                let what = what.to_string();
                match meridian_http::read_body(req.into_body(), 64 << 20).await {
                    Ok(body) => self.consensus.handle_rpc(&what, body).await,
                    Err(e) => e.into_response(),
                }
            }
            (Method::GET, ["bundles", id]) => match id.parse::<VersionId>() {
                Ok(id) => match std::fs::read(self.bundle_path(&id)) {
                    Ok(b) => Response::new(meridian_http::full(b)),
                    Err(e) => text(StatusCode::NOT_FOUND, format!("version {}: {e}", id.short())),
                },
                Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
            },
            (Method::PUT, ["bundles", id]) => {
                let Ok(id) = id.parse::<VersionId>() else {
                    return text(StatusCode::BAD_REQUEST, "not a version id");
                };
                let body = match meridian_http::read_body(req.into_body(), MAX_DEPLOY_BYTES).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                match Bundle::from_tar(&body) {
                    Ok(b) if b.id == id => match meridian_core::fs::write_atomic(&self.bundle_path(&id), &body) {
                        Ok(()) => text(StatusCode::OK, "stored"),
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    },
                    Ok(b) => text(StatusCode::BAD_REQUEST, format!("this bundle is version {}", b.id)),
                    Err(e) => text(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "no such internal API"),
        }
    }

    /// A deploy's bundle is read only from a caller that may deploy the
    /// app it is for: an app's token needs the deploy scope on its own app
    /// (the bundle's name must then be that app), and `?app=` — which the
    /// CLI sends — must name an app the caller may deploy. A refusal is
    /// audited by the leader (a follower passes it there without the body).
    async fn may_send_a_bundle(
        &self,
        req: &Request<Incoming>,
        parts: &[&str],
        caller: &Caller,
    ) -> Result<(), Response<Body>> {
        if !(req.method() == Method::POST && parts == ["v1", "deploy"]) {
            return Ok(());
        }
        let Some(app) = deploy_app(req.uri().query(), caller) else {
            return Ok(());
        };
        if caller.may(Scope::Deploy, &app) {
            return Ok(());
        }
        if !self.consensus.is_leader() {
            return Err(self.pass_to_leader(req.method(), req.uri(), req.headers(), Bytes::new()).await);
        }
        let why = format!("this token may not deploy app {app:?} (it needs the deploy scope on it)");
        self.note(caller, "deploy", Some(&app), "a bundle (not read)", &format!("403: {why}")).await;
        Err(text(StatusCode::FORBIDDEN, why))
    }

    /// Passes an API call to the leader (as is: its token is checked
    /// there) and its answer back.
    async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        let Ok(_permit) = tokio::time::timeout(Duration::from_secs(1), self.forwards.acquire()).await else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("this control node is passing {MAX_FORWARDS} calls to the leader already; retry"),
            );
        };
        let (parts, body) = req.into_parts();
        let body = match meridian_http::read_body(body, MAX_DEPLOY_BYTES).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        self.pass_to_leader(&parts.method, &parts.uri, &parts.headers, body).await
    }

    /// One call, its body already read, passed to the leader as it came.
    async fn pass_to_leader(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
        body: Bytes,
    ) -> Response<Body> {
        let leader = match self.consensus.await_leader(Duration::from_secs(5)).await {
            Some(l) => l,
            None => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no control node leads yet (an election is under way, or most control nodes are down); retry",
                )
            }
        };
        let target = match leader.target() {
            Ok(t) => t,
            Err(e) => return text(StatusCode::BAD_GATEWAY, e.to_string()),
        };
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let header = |name: http::header::HeaderName| {
            headers.get(&name).and_then(|v| v.to_str().ok()).map(|v| (name.as_str().to_string(), v.to_string()))
        };
        let mut hs: Vec<(String, String)> =
            [http::header::AUTHORIZATION, http::header::CONTENT_TYPE].into_iter().filter_map(header).collect();
        hs.push((FORWARDED.into(), self.consensus.me().name.clone()));
        let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        // Deploys wait for their rollout: as long as the leader takes.
        match self.client.call_with(&target, method.clone(), path, &hs, body, Duration::from_secs(3600)).await {
            Ok(a) => {
                let mut resp = Response::new(meridian_http::full(a.body));
                *resp.status_mut() = a.status;
                resp
            }
            Err(e) if e.nothing_sent() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the leader {} cannot be reached ({e}); nothing was sent; retry", leader.name),
            ),
            Err(e) => text(
                StatusCode::BAD_GATEWAY,
                format!("the leader {} did not answer ({e}); the outcome is unknown", leader.name),
            ),
        }
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        if let ["v1", "internal", rest @ ..] = parts.as_slice() {
            return self.internal(req, rest).await;
        }
        // Who calls is settled before any body is read, on every node: a
        // follower holds the same tokens (as of its last applied entry; the
        // leader checks again), so an unauthenticated caller cannot make
        // it read or forward anything.
        let token = meridian_http::bearer(&req).unwrap_or("");
        let Some(caller) = self.consensus.read(|m| self.tokens.caller(token, &m.tokens)) else {
            return unauthorized();
        };
        // A call another node passed here thinking this one leads is not
        // passed on again (no loop while leaders change).
        if !self.consensus.is_leader() && req.headers().contains_key(FORWARDED) {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the control plane is changing leaders; retry in a few seconds",
            );
        }
        if let Err(resp) = self.may_send_a_bundle(&req, &parts, &caller).await {
            return resp;
        }
        if !self.consensus.is_leader() {
            return self.forward(req).await;
        }
        // A new leader answers once it has applied what earlier leaders
        // committed (its lead loop commits a no-op of its term first), so
        // no answer is made from a stale state.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let term = self.consensus.raft.metrics().borrow().current_term;
            if self.caught_up_term.load(std::sync::atomic::Ordering::Acquire) == term {
                break;
            }
            if tokio::time::Instant::now() > deadline || !self.consensus.is_leader() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "the control plane is changing leaders; retry");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let forbidden = |what: &str| text(StatusCode::FORBIDDEN, format!("this token may not {what}"));
        match (req.method().clone(), parts.as_slice()) {
            (Method::GET, ["v1", "whoami"]) => json(
                StatusCode::OK,
                &match &caller {
                    Caller::Admin => serde_json::json!({"admin": true}),
                    Caller::App { id, app, scopes } => serde_json::json!({"token": id, "app": app, "scopes": scopes}),
                    Caller::System(node) => serde_json::json!({"node": node}),
                },
            ),
            (Method::GET, ["v1", "status"]) => json(StatusCode::OK, &self.status(&caller).await),
            (Method::GET, ["v1", "apps"]) => {
                let list: Vec<serde_json::Value> = self
                    .readable_apps(&caller)
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "name": a.record.name,
                            "hosts": a.record.hosts,
                            "default": a.record.default,
                            "desired": a.desired,
                            "versions": a.history.len(),
                        })
                    })
                    .collect();
                json(StatusCode::OK, &list)
            }
            (method, ["v1", "apps"] | ["v1", "apps", _])
                if caller != Caller::Admin && (method == Method::POST || method == Method::DELETE) =>
            {
                let action = if method == Method::POST { "apps.create" } else { "apps.delete" };
                self.note(&caller, action, parts.get(2).copied(), "", "403: not the administrator token").await;
                forbidden("create or delete apps (only the world's administrator token can)")
            }
            (Method::POST, ["v1", "apps"]) => {
                let body = match meridian_http::read_body(req.into_body(), 64 << 10).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                let n: NewApp = match serde_json::from_slice(&body) {
                    Ok(n) => n,
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("expected {{name, hosts, default}}: {e}")),
                };
                let (name, hosts) = (n.name.clone(), n.hosts.join(","));
                match self.create_app(n).await {
                    Ok(record) => {
                        self.note(&caller, "apps.create", Some(&name), &record.hosts.join(","), "ok").await;
                        json(StatusCode::OK, &record)
                    }
                    Err((status, msg)) => {
                        self.note(&caller, "apps.create", Some(&name), &hosts, &format!("{status}: {msg}")).await;
                        text(status, msg)
                    }
                }
            }
            (Method::DELETE, ["v1", "apps", name]) => match self.delete_app(name).await {
                Ok(report) => {
                    let bytes: u64 = report.removed.iter().map(|r| r.bytes).sum();
                    let detail = format!("{bytes} bytes removed; pending: {}", report.pending.join(", "));
                    self.note(&caller, "apps.delete", Some(name), &detail, "ok").await;
                    json(StatusCode::OK, &report)
                }
                Err((status, msg)) => {
                    self.note(&caller, "apps.delete", Some(name), "", &format!("{status}: {msg}")).await;
                    text(status, msg)
                }
            },
            (Method::GET, ["v1", "audit"]) => {
                let wanted = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("app=")))
                    .map(str::to_string);
                let entries = self.consensus.store.audit(|e| {
                    let readable = match &caller {
                        Caller::Admin => true,
                        _ => e.app.as_deref().is_some_and(|a| caller.may(Scope::Read, a)),
                    };
                    readable && wanted.as_ref().is_none_or(|w| e.app.as_deref() == Some(w.as_str()))
                });
                match entries {
                    Ok(list) => json(StatusCode::OK, &list),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            (Method::GET, ["v1", "apps", app, "versions"]) => {
                if !caller.may(Scope::Read, app) {
                    return forbidden(&format!("read app {app:?}"));
                }
                let versions = self.consensus.read(|m| {
                    m.state.apps.get(*app).map(|a| serde_json::json!({"desired": a.desired, "history": a.history}))
                });
                match versions {
                    Some(v) => json(StatusCode::OK, &v),
                    None => text(StatusCode::NOT_FOUND, format!("no app named {app:?}")),
                }
            }
            (Method::GET, ["v1", "apps", app, "rollout"]) => {
                if !caller.may(Scope::Read, app) {
                    return forbidden(&format!("read app {app:?}"));
                }
                match self.consensus.read(|m| m.rollouts.get(*app).map(|r| r.status())) {
                    Some(s) => json(StatusCode::OK, &s),
                    None => text(StatusCode::NOT_FOUND, format!("app {app:?} has had no rollout")),
                }
            }
            (Method::POST, ["v1", "apps", app, "rollout", action]) => {
                let what = format!("rollout.{action}");
                if !caller.may(Scope::Deploy, app) {
                    self.note(&caller, &what, Some(app), "", "403: needs deploy").await;
                    return forbidden(&format!("steer app {app:?}'s rollout (needs deploy)"));
                }
                let (command, approve) = match *action {
                    "pause" => (Some(rollout::Command::Pause), false),
                    "resume" => (Some(rollout::Command::Run), false),
                    "abort" => (Some(rollout::Command::Abort), false),
                    "approve" => (None, true),
                    other => {
                        return text(
                            StatusCode::NOT_FOUND,
                            format!("no rollout action {other:?}: pause, resume, abort, approve"),
                        )
                    }
                };
                let steer = Command::Steer { app: app.to_string(), command, approve, unless_aborted: false };
                match self.consensus.propose(steer).await {
                    Ok(r) if r.applied => {}
                    Ok(_) => {
                        self.note(&caller, &what, Some(app), "", "404: no rollout in progress").await;
                        return text(StatusCode::NOT_FOUND, format!("no rollout of app {app:?} is in progress"));
                    }
                    Err(e) => {
                        let (status, msg) = propose_failed(e);
                        return text(status, msg);
                    }
                }
                tracing::info!(app, action, "rollout steered");
                let status = self.consensus.read(|m| m.rollouts.get(*app).map(|r| r.status()));
                let version = status.as_ref().map(|s| s.version.short().to_string()).unwrap_or_default();
                self.note(&caller, &what, Some(app), &version, "ok").await;
                json(StatusCode::OK, &status)
            }
            (Method::POST, ["v1", "apps", app, "purge"]) => {
                if !caller.may(Scope::Deploy, app) {
                    self.note(&caller, "purge", Some(app), "", "403: needs deploy").await;
                    return forbidden(&format!("purge app {app:?}'s cached answers (needs deploy)"));
                }
                let body = match meridian_http::read_body(req.into_body(), 1 << 20).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Asked {
                    #[serde(default)]
                    paths: Vec<String>,
                    #[serde(default)]
                    prefixes: Vec<String>,
                    #[serde(default)]
                    tags: Vec<String>,
                    #[serde(default)]
                    all: bool,
                }
                let asked: Asked = match serde_json::from_slice(&body) {
                    Ok(a) => a,
                    Err(e) => {
                        return text(StatusCode::BAD_REQUEST, format!("expected {{paths, prefixes, tags, all}}: {e}"))
                    }
                };
                if let Some(bad) = asked.paths.iter().chain(&asked.prefixes).find(|p| !p.starts_with('/')) {
                    return text(StatusCode::BAD_REQUEST, format!("{bad:?}: paths and prefixes start with '/'"));
                }
                let Some(mut p) = self.purge_scope(app) else {
                    return text(StatusCode::NOT_FOUND, format!("no app named {app:?}"));
                };
                (p.paths, p.prefixes, p.tags, p.all) = (asked.paths, asked.prefixes, asked.tags, asked.all);
                if p.is_empty() {
                    return text(StatusCode::BAD_REQUEST, "nothing to purge: give paths, prefixes, tags or all");
                }
                let detail = format!(
                    "{} paths, {} prefixes, tags [{}]{}",
                    p.paths.len(),
                    p.prefixes.len(),
                    p.tags.join(","),
                    if p.all { ", all" } else { "" }
                );
                let report = self.purge_edges(p).await;
                let outcome = match report.failed().len() {
                    0 => format!("ok: {} edges in {:.0} ms", report.edges.len(), report.ms),
                    n => format!("{n} of {} edges did not confirm", report.edges.len()),
                };
                self.note(&caller, "purge", Some(app), &detail, &outcome).await;
                json(StatusCode::OK, &report)
            }
            (Method::POST, ["v1", "apps", app, "rollback"]) => {
                let app = app.to_string();
                let to = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("to=")))
                    .map(str::to_string);
                match self.rollback(&app, to.as_deref(), &caller).await {
                    Ok(report) => {
                        self.note(&caller, "rollback", Some(&app), report.version.short(), "ok").await;
                        json(StatusCode::OK, &report)
                    }
                    Err((status, msg)) => {
                        let to = to.as_deref().unwrap_or("");
                        self.note(&caller, "rollback", Some(&app), to, &format!("{status}: {msg}")).await;
                        text(status, msg)
                    }
                }
            }
            (method, ["v1", "apps", app, "kv", rest @ ..]) => {
                let (app, rest): (String, Vec<String>) =
                    (app.to_string(), rest.iter().map(|x| x.to_string()).collect());
                let query = req.uri().query().map(str::to_string);
                let body = match meridian_http::read_body(req.into_body(), 16 << 20).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
                // Changes to data are audited (which key, never the value).
                let change = (rest == ["op"])
                    .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
                    .flatten()
                    // A write under an idempotency key is the write inside.
                    .map(|op| if op["op"] == "once" { op["write"].clone() } else { op })
                    .filter(|op| matches!(op["op"].as_str(), Some("set" | "delete" | "increment" | "swap")))
                    .map(|op| {
                        let key = op["key"].as_str().map(|k| format!("/{k}")).unwrap_or_default();
                        format!("{} {}{key}", op["op"].as_str().unwrap_or("?"), op["ns"].as_str().unwrap_or("?"))
                    });
                let resp = self.kv_api(&caller, &app, &rest, method, query.as_deref(), body).await;
                if let Some(detail) = change {
                    let outcome = if resp.status().is_success() { "ok".to_string() } else { resp.status().to_string() };
                    self.note(&caller, "kv.write", Some(&app), &detail, &outcome).await;
                }
                resp
            }
            (Method::POST, ["v1", "deploy"]) => {
                let named = deploy_target(req.uri().query());
                let sent_for = deploy_app(req.uri().query(), &caller);
                let body = match meridian_http::read_body(req.into_body(), MAX_DEPLOY_BYTES).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                let peek = body.clone();
                let result = self.deploy(body, &caller, named.as_deref()).await;
                let (app, version) = match &result {
                    Ok(r) => (Some(r.app.clone()), r.version.short().to_string()),
                    Err(_) => match Bundle::from_tar(&peek) {
                        Ok(b) => (Some(b.manifest.name), b.id.short().to_string()),
                        // Refused unread: the app it was sent for.
                        Err(_) => (sent_for, "an unreadable bundle".into()),
                    },
                };
                match result {
                    Ok(report) => {
                        self.note(&caller, "deploy", app.as_deref(), &version, "ok").await;
                        json(StatusCode::OK, &report)
                    }
                    Err((status, msg)) => {
                        let first = msg.lines().next().unwrap_or("");
                        self.note(&caller, "deploy", app.as_deref(), &version, &format!("{status}: {first}")).await;
                        text(status, msg)
                    }
                }
            }
            (method, ["v1", "tokens", ..]) if caller != Caller::Admin => {
                if method != Method::GET {
                    self.note(&caller, "tokens", None, "", "403: not the administrator token").await;
                }
                forbidden("manage tokens (only the world's administrator token can)")
            }
            (Method::GET, ["v1", "tokens"]) => json(StatusCode::OK, &self.consensus.read(|m| m.tokens.clone())),
            (Method::POST, ["v1", "tokens"]) => {
                #[derive(serde::Deserialize)]
                struct NewToken {
                    app: String,
                    scopes: Vec<Scope>,
                }
                let body = match meridian_http::read_body(req.into_body(), 4096).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                let n: NewToken = match serde_json::from_slice(&body) {
                    Ok(n) => n,
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("expected {{app, scopes}}: {e}")),
                };
                if !meridian_core::wire::is_valid_app_name(&n.app) || n.scopes.is_empty() {
                    return text(StatusCode::BAD_REQUEST, "a token needs an app name and at least one scope");
                }
                let scopes = format!("{:?}", n.scopes);
                let (record, secret) = Tokens::make(&n.app, n.scopes);
                let added = self.consensus.propose(Command::AddToken { record: record.clone() }).await;
                match added {
                    Ok(_) => {
                        self.note(&caller, "tokens.create", Some(&n.app), &format!("{} {scopes}", record.id), "ok")
                            .await;
                        json(StatusCode::OK, &serde_json::json!({"token": secret, "record": record}))
                    }
                    Err(e) => {
                        let (status, msg) = propose_failed(e);
                        text(status, format!("cannot store the token: {msg}"))
                    }
                }
            }
            (Method::DELETE, ["v1", "tokens", id]) => {
                match self.consensus.propose(Command::RevokeToken { id: id.to_string() }).await {
                    Ok(r) if r.applied => {
                        self.note(&caller, "tokens.revoke", None, id, "ok").await;
                        json(StatusCode::OK, &serde_json::json!({"revoked": id}))
                    }
                    Ok(_) => text(StatusCode::NOT_FOUND, format!("no token {id}")),
                    Err(e) => {
                        let (status, msg) = propose_failed(e);
                        text(status, format!("cannot store the tokens: {msg}"))
                    }
                }
            }
            _ => text(StatusCode::NOT_FOUND, format!("no such API: {path}")),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A control plane of one node over `regions` (unreachable addresses),
    /// in `dir`, leading.
    pub(crate) async fn control(dir: &std::path::Path, regions: &[&str]) -> Arc<Control> {
        let certs = dir.join("certs");
        let ca = meridian_trust::ensure_ca(&certs, "t", 1).unwrap();
        let me = meridian_trust::Identity::new("control", meridian_trust::Role::Control, None).unwrap();
        meridian_trust::issue(&ca, &me, &certs, 1).unwrap();
        std::fs::write(dir.join("token"), "admin").unwrap();
        let region = |n: &&str| ControlRegion { name: n.to_string(), url: format!("https://127.0.0.1:1/{n}") };
        let config = ControlConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.join("data"),
            token_file: dir.join("token"),
            tls: meridian_trust::TlsFiles::in_dir(&certs, "control"),
            regions: regions.iter().map(region).collect(),
            reconcile_interval_ms: 1000,
            apps_domain: None,
            members: Vec::new(),
            raft_heartbeat_ms: 50,
            edges: Vec::new(),
        };
        let control = Control::open(config).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !control.consensus.is_leader() {
            assert!(tokio::time::Instant::now() < deadline, "a group of one never elected itself");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        control
    }

    #[tokio::test]
    async fn the_files_of_an_older_control_plane_are_imported_once_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut state = ControlState::default();
        let record = AppRecord { name: "shop".into(), hosts: vec!["shop.example.com".into()], default: true };
        state.apps.insert("shop".into(), AppState { record, desired: None, history: Vec::new() });
        std::fs::write(data.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
        let (token, secret) = Tokens::make("shop", vec![Scope::Deploy]);
        std::fs::write(data.join("tokens.json"), serde_json::to_vec(&vec![token]).unwrap()).unwrap();
        let entry = audit::Entry {
            seq: 1,
            at_ms: 5,
            who: "admin".into(),
            action: "apps.create".into(),
            app: Some("shop".into()),
            detail: String::new(),
            outcome: "ok".into(),
        };
        std::fs::write(data.join("audit.jsonl"), serde_json::to_string(&entry).unwrap() + "\n").unwrap();

        let c = control(dir.path(), &["us-east"]).await;
        c.import_legacy().await.unwrap();
        assert!(c.state().apps.contains_key("shop"));
        let records = c.consensus.read(|m| m.tokens.clone());
        assert!(c.tokens.caller(&secret, &records).is_some_and(|t| t.may(Scope::Deploy, "shop")));
        let log = c.consensus.store.audit(|_| true).unwrap();
        assert_eq!(log[0], entry, "the old entries keep their numbers and times");
        assert_eq!(log[1].action, "control.import");
        assert!(data.join("state.json.imported").exists() && !data.join("state.json").exists());
        // Once: a second call finds nothing to import.
        c.import_legacy().await.unwrap();
        assert_eq!(c.consensus.store.audit(|_| true).unwrap().len(), 2);
    }
}

/// The app a deploy names in its query (`?app=<name>`), if any.
fn deploy_target(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|kv| kv.strip_prefix("app=")).map(str::to_string)
}

/// The app a deploy is for before its bundle is read: the one its query
/// names, else an app token's own.
fn deploy_app(query: Option<&str>, caller: &Caller) -> Option<String> {
    deploy_target(query).or_else(|| match caller {
        Caller::App { app, .. } => Some(app.clone()),
        _ => None,
    })
}
