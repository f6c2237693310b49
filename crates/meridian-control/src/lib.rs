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
//! never with a token. State lives in the data directory: bundles by content id, and `state.json` with the desired
//! version of every app and the apps being deleted, written atomically.
//!
//! Apps: `POST /v1/apps` creates one (administrator token only) and records
//! it on every region; `DELETE /v1/apps/<name>` makes every region remove
//! its versions and data (each says how much) and revokes its tokens; a
//! region that was down is told by the reconcile loop when it is back.

pub mod audit;
pub mod rollout;
pub mod tokens;

use bytes::Bytes;
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
}

fn default_reconcile_ms() -> u64 {
    2000
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
    state: Mutex<ControlState>,
    /// Serialises deploys' first phase, app changes and reconcile rounds.
    deploy_lock: tokio::sync::Mutex<()>,
    /// Rollouts in progress, by app (registered under `deploy_lock`; the
    /// reconcile loop leaves these apps alone).
    rollouts: Mutex<std::collections::HashMap<String, Arc<rollout::RolloutCtl>>>,
    /// The last finished rollout of each app.
    finished: Mutex<std::collections::HashMap<String, rollout::RolloutStatus>>,
    /// Every change asked of this control plane.
    audit: audit::Audit,
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

impl Control {
    pub fn open(config: ControlConfig) -> anyhow::Result<Arc<Control>> {
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
        let state = match std::fs::read(config.data_dir.join("state.json")) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.data_dir.join("state.json").display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ControlState::default(),
            Err(e) => return Err(e.into()),
        };
        let tokens = Tokens::open(config.data_dir.join("tokens.json"), &token)?;
        let audit = audit::Audit::open(config.data_dir.join("audit.jsonl"))?;
        let compiler = Arc::new(meridian_host::Host::new(meridian_host::HostConfig {
            cache_dir: config.data_dir.join("compiled"),
            max_instances: 1,
            max_memory_mb: 64,
        })?);
        Ok(Arc::new(Control {
            config,
            tokens,
            client: ClusterClient::new(tls.clone(), Duration::from_secs(2)),
            tls,
            state: Mutex::new(state),
            deploy_lock: tokio::sync::Mutex::new(()),
            rollouts: Default::default(),
            finished: Default::default(),
            audit,
            compiler,
        }))
    }

    fn save_state(&self, s: &ControlState) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
        meridian_core::fs::write_atomic(&self.config.data_dir.join("state.json"), &bytes)
    }

    /// Changes the state and saves it; unchanged if saving fails.
    fn update<T>(&self, f: impl FnOnce(&mut ControlState) -> T) -> Result<T, ApiError> {
        let mut s = self.state.lock().unwrap();
        let mut next = s.clone();
        let out = f(&mut next);
        self.save_state(&next)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot record the change: {e}")))?;
        *s = next;
        Ok(out)
    }

    fn bundle_path(&self, id: &VersionId) -> PathBuf {
        self.config.data_dir.join("bundles").join(format!("{id}.tar"))
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

    /// Compiles the bundle's components the regions do not have yet (in
    /// parallel, from this node's cache if compiled before) and sends each
    /// region the ones it lacks.
    async fn ship_compiled(&self, bundle: &Bundle) {
        use sha2::Digest;
        let mut components: std::collections::BTreeMap<String, Bytes> = Default::default();
        for c in bundle.manifest.components.values() {
            if let Some(wasm) = bundle.files.get(&c.source) {
                components.insert(hex::encode(sha2::Sha256::digest(wasm)), Bytes::from(wasm.clone()));
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
        let needed: BTreeSet<&String> = lacks.iter().flat_map(|(_, m)| m).collect();
        if needed.is_empty() {
            return;
        }
        let t = std::time::Instant::now();
        let compiled = futures::future::join_all(needed.iter().map(|d| {
            let (compiler, wasm, d) = (self.compiler.clone(), components[*d].clone(), (*d).clone());
            async move {
                let r = tokio::task::spawn_blocking(move || compiler.compile(&wasm)).await;
                (d, r)
            }
        }))
        .await;
        let mut artifacts: std::collections::BTreeMap<String, Bytes> = Default::default();
        for (d, r) in compiled {
            match r {
                Ok(Ok(a)) => {
                    artifacts.insert(d, Bytes::from(a));
                }
                Ok(Err(e)) => tracing::warn!(component = %d, error = %e, "cannot compile; regions will try"),
                Err(e) => tracing::warn!(component = %d, error = %e, "compile task failed"),
            }
        }
        tracing::info!(components = artifacts.len(), elapsed = ?t.elapsed(), "compiled for the regions");
        let engine = self.compiler.engine_key();
        futures::future::join_all(lacks.iter().map(|(r, missing)| {
            let (artifacts, engine) = (&artifacts, &engine);
            async move {
                for d in missing {
                    let Some(a) = artifacts.get(d) else { continue };
                    let target = match r.target() {
                        Ok(t) => t,
                        Err(_) => continue,
                    };
                    let path = format!("{}compiled/{d}", headers::RESERVED_PREFIX);
                    // Signed with this control plane's certificate: a region
                    // loads native code only from its control plane.
                    use sha2::Digest;
                    let msg = headers::artifact_message(d, engine, &sha2::Sha256::digest(a));
                    let (sig, cert) = match self.tls.sign(&msg) {
                        Ok(x) => (hex::encode(x.0), hex::encode(x.1)),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot sign compiled code; regions will compile");
                            continue;
                        }
                    };
                    let hs = [(headers::ENGINE, engine.as_str()), (headers::SIGNATURE, &sig), (headers::SIGNER, &cert)];
                    match self
                        .client
                        .call_with(&target, Method::PUT, &path, &hs, a.clone(), Duration::from_secs(300))
                        .await
                    {
                        Ok(ans) if ans.status.is_success() => {}
                        Ok(ans) => tracing::info!(region = %r.name, answer = %ans.text(), "compiled code not taken"),
                        Err(e) => tracing::debug!(region = %r.name, error = %e, "compiled code not sent"),
                    }
                }
            }
        }))
        .await;
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
        let changed = self.update(|s| {
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
        })??;
        self.push_records(&changed).await;
        Ok(changed[0].clone())
    }

    /// Deletes an app: its versions stop everywhere and every region
    /// removes its data; its tokens are revoked.
    pub async fn delete_app(&self, name: &str) -> Result<DeleteReport, ApiError> {
        let _guard = self.deploy_lock.lock().await;
        let regions: BTreeSet<String> = self.config.regions.iter().map(|r| r.name.clone()).collect();
        let existed = self.update(|s| {
            let existed = s.apps.remove(name).is_some();
            if existed {
                s.deleting.insert(name.to_string(), regions.clone());
            }
            existed
        })?;
        if !existed && !self.state.lock().unwrap().deleting.contains_key(name) {
            return Err((StatusCode::NOT_FOUND, format!("no app named {name:?}")));
        }
        let tokens_revoked = self
            .tokens
            .revoke_app(name)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot revoke the app's tokens: {e}")))?;
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
        })?;
        Ok(DeleteReport { app: name.to_string(), removed, pending, tokens_revoked })
    }

    /// Stores a version of an existing app and makes it run everywhere
    /// (see the module docs).
    pub async fn deploy(self: &Arc<Self>, tar: Bytes, caller: &Caller) -> Result<DeployReport, ApiError> {
        let bundle = Bundle::from_tar(&tar).map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        let app = bundle.manifest.name.clone();
        if !caller.may(Scope::Deploy, &app) {
            return Err((
                StatusCode::FORBIDDEN,
                format!("this token may not deploy app {app:?} (it needs the deploy scope on it)"),
            ));
        }
        let guard = self.deploy_lock.lock().await;
        if let Some(r) = self.rollouts.lock().unwrap().get(&app) {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "a rollout of app {app:?} (version {}) is in progress; see `meridian rollout status`, \
                     abort it or wait for it",
                    r.version.short()
                ),
            ));
        }
        if !self.state.lock().unwrap().apps.contains_key(&app) {
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
        let path = self.bundle_path(&id);
        if !path.exists() {
            meridian_core::fs::write_atomic(&path, &tar)
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the version: {e}")))?;
        }
        // Phase 0: compile each component once, here, and ship the machine
        // code to the regions that lack it (they load it at install instead
        // of compiling). Best effort: a region that did not get it compiles.
        self.ship_compiled(&bundle).await;
        // Phase 1: install everywhere reachable.
        let install_timeout = Duration::from_secs(300);
        let install_path = format!("apps/{app}/versions/{id}");
        let installs = self.call_all(Method::PUT, &install_path, tar.clone(), install_timeout).await;
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
                    outcomes.push((r, true, note.to_string()))
                }
                RegionCall::Unreachable(e) => outcomes.push((r, false, e)),
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
        // Phase 2: the rollout, wave by wave, over the regions that hold it,
        // in a task of its own: a client that goes away does not stop it
        // halfway. It runs without the deploy lock (other apps deploy
        // meanwhile); this app is marked as rolling out instead.
        let old = self.state.lock().unwrap().apps.get(&app).and_then(|a| a.desired.clone()).filter(|o| o != &id);
        let ctl = Arc::new(rollout::RolloutCtl::new(&app, id.clone(), old.clone()));
        self.rollouts.lock().unwrap().insert(app.clone(), ctl.clone());
        drop(guard);
        // The plan's waves, by region name (the task owns its data), over
        // the regions that installed the version.
        let installed: Vec<&str> = outcomes.iter().filter(|(_, ok, _)| *ok).map(|(r, _, _)| r.name.as_str()).collect();
        let waves: Vec<Vec<String>> = waves
            .into_iter()
            .map(|w| w.into_iter().filter(|r| installed.contains(&r.name.as_str())).map(|r| r.name.clone()).collect())
            .filter(|w: &Vec<String>| !w.is_empty())
            .collect();
        let outcomes: Vec<(String, bool, String)> =
            outcomes.into_iter().map(|(r, ok, e)| (r.name.clone(), ok, e)).collect();
        let this = self.clone();
        let manifest = bundle.manifest;
        tokio::spawn(async move { this.phase_two(ctl, manifest, waves, outcomes).await })
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("the rollout task failed: {e}")))?
    }

    /// The rollout of a version over `waves` (regions that installed it);
    /// records the outcome.
    async fn phase_two(
        &self,
        ctl: Arc<rollout::RolloutCtl>,
        manifest: meridian_manifest::Manifest,
        waves: Vec<Vec<String>>,
        outcomes: Vec<(String, bool, String)>,
    ) -> Result<DeployReport, ApiError> {
        // The app, the version and the one it replaces are the rollout's.
        let (app, id, old) = (ctl.app.clone(), ctl.version.clone(), ctl.old.clone());
        let waves: Vec<Vec<&ControlRegion>> = waves
            .iter()
            .map(|w| w.iter().filter_map(|n| self.config.regions.iter().find(|r| &r.name == n)).collect())
            .collect();
        let plan = rollout::Plan {
            started: std::time::Instant::now(),
            ctl: &ctl,
            app: &app,
            old: old.clone(),
            new: id.clone(),
            rollout: &manifest.rollout,
            smoke: &manifest.smoke,
        };
        let result = self.run_rollout(&plan, waves).await;
        let steps = ctl.steps();
        if result.is_ok() {
            let saved = self.update(|s| {
                if let Some(a) = s.apps.get_mut(&app) {
                    a.desired = Some(id.clone());
                    if a.history.last() != Some(&id) {
                        a.history.push(id.clone());
                    }
                }
            });
            ctl.set_state(if saved.is_ok() { "succeeded" } else { "failed to record" });
            self.finished.lock().unwrap().insert(app.clone(), ctl.status());
            self.rollouts.lock().unwrap().remove(&app);
            saved?;
        } else {
            let aborted = result.as_ref().err().is_some_and(|s| s.reason.starts_with("aborted"));
            ctl.set_state(if aborted { "aborted and rolled back" } else { "rolled back" });
            self.finished.lock().unwrap().insert(app.clone(), ctl.status());
            self.rollouts.lock().unwrap().remove(&app);
        }
        if let Err(stopped) = result {
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
        let report: Vec<RegionOutcome> = outcomes
            .into_iter()
            .map(|(r, installed, err)| {
                let ok = steps.iter().any(|s| s.region == r && s.step == "100%" && s.ok);
                match (installed, ok) {
                    (true, true) => RegionOutcome { region: r.clone(), outcome: "active".into(), detail: err },
                    (_, _) => RegionOutcome { region: r.clone(), outcome: "pending".into(), detail: err },
                }
            })
            .collect();
        Ok(DeployReport { app, version: id, regions: report, steps })
    }

    /// Puts an app back on an earlier version (default: the one before the
    /// desired one) in every region at once — an emergency, so no waves.
    /// Regions that cannot be reached get it from the reconcile loop.
    pub async fn rollback(&self, app: &str, to: Option<&str>, caller: &Caller) -> Result<DeployReport, ApiError> {
        if !caller.may(Scope::Deploy, app) {
            return Err((StatusCode::FORBIDDEN, format!("this token may not roll back app {app:?} (needs deploy)")));
        }
        let _guard = self.deploy_lock.lock().await;
        if self.rollouts.lock().unwrap().contains_key(app) {
            return Err((
                StatusCode::CONFLICT,
                format!("a rollout of app {app:?} is in progress: `meridian rollout abort` rolls it back"),
            ));
        }
        let (desired, history) = match self.state.lock().unwrap().apps.get(app) {
            Some(a) => (a.desired.clone(), a.history.clone()),
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
        let tar = std::fs::read(self.bundle_path(&target))
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read version {}: {e}", target.short())))?;
        let tar = Bytes::from(tar);
        self.update(|s| {
            if let Some(a) = s.apps.get_mut(app) {
                a.desired = Some(target.clone());
            }
        })?;
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
        Ok(DeployReport { app: app.to_string(), version: target, regions, steps: Vec::new() })
    }

    /// Brings every region to the desired state (apps, their versions,
    /// deleted apps gone), forever.
    pub async fn reconcile_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.reconcile_interval_ms.max(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Read the desired state under the deploy lock: read before it,
            // a deploy finishing meanwhile would be undone.
            let _guard = self.deploy_lock.lock().await;
            let state = self.state.lock().unwrap().clone();
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
                let _ = self.update(|s| {
                    if let Some(left) = s.deleting.get_mut(name) {
                        left.remove(&r.name);
                        if left.is_empty() {
                            s.deleting.remove(name);
                        }
                    }
                });
            }
        }
        let mut errors = Vec::new();
        let rolling: Vec<String> = self.rollouts.lock().unwrap().keys().cloned().collect();
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
            let tar = std::fs::read(self.bundle_path(desired)).map_err(|e| e.to_string())?;
            if let RegionCall::Unreachable(e) | RegionCall::Refused(e) = self
                .call(
                    r,
                    Method::PUT,
                    &format!("apps/{app}/versions/{desired}"),
                    Bytes::from(tar),
                    Duration::from_secs(300),
                )
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
        let state = self.state.lock().unwrap();
        state.apps.values().filter(|a| caller.may(Scope::Read, &a.record.name)).cloned().collect()
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
        serde_json::json!({"apps": apps})
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
        if !self.state.lock().unwrap().apps.contains_key(app) {
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
    fn note(&self, caller: &Caller, action: &str, app: Option<&str>, detail: &str, outcome: &str) {
        let who = match caller {
            Caller::Admin => "admin".to_string(),
            Caller::App { id, .. } => format!("token {id}"),
        };
        if let Err(e) = self.audit.record(&who, action, app, detail, outcome) {
            tracing::error!(error = %e, action, "cannot write the audit log");
        }
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let Some(caller) = self.tokens.caller(meridian_http::bearer(&req).unwrap_or("")) else {
            return unauthorized();
        };
        let forbidden = |what: &str| text(StatusCode::FORBIDDEN, format!("this token may not {what}"));
        let path = req.uri().path().to_string();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (req.method().clone(), parts.as_slice()) {
            (Method::GET, ["v1", "whoami"]) => json(
                StatusCode::OK,
                &match &caller {
                    Caller::Admin => serde_json::json!({"admin": true}),
                    Caller::App { id, app, scopes } => serde_json::json!({"token": id, "app": app, "scopes": scopes}),
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
                self.note(&caller, action, parts.get(2).copied(), "", "403: not the administrator token");
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
                        self.note(&caller, "apps.create", Some(&name), &record.hosts.join(","), "ok");
                        json(StatusCode::OK, &record)
                    }
                    Err((status, msg)) => {
                        self.note(&caller, "apps.create", Some(&name), &hosts, &format!("{status}: {msg}"));
                        text(status, msg)
                    }
                }
            }
            (Method::DELETE, ["v1", "apps", name]) => match self.delete_app(name).await {
                Ok(report) => {
                    let bytes: u64 = report.removed.iter().map(|r| r.bytes).sum();
                    let detail = format!("{bytes} bytes removed; pending: {}", report.pending.join(", "));
                    self.note(&caller, "apps.delete", Some(name), &detail, "ok");
                    json(StatusCode::OK, &report)
                }
                Err((status, msg)) => {
                    self.note(&caller, "apps.delete", Some(name), "", &format!("{status}: {msg}"));
                    text(status, msg)
                }
            },
            (Method::GET, ["v1", "audit"]) => {
                let wanted = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("app=")))
                    .map(str::to_string);
                let entries = self.audit.read(|e| {
                    let readable = match &caller {
                        Caller::Admin => true,
                        Caller::App { .. } => e.app.as_deref().is_some_and(|a| caller.may(Scope::Read, a)),
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
                match self.state.lock().unwrap().apps.get(*app) {
                    Some(a) => json(StatusCode::OK, &serde_json::json!({"desired": a.desired, "history": a.history})),
                    None => text(StatusCode::NOT_FOUND, format!("no app named {app:?}")),
                }
            }
            (Method::GET, ["v1", "apps", app, "rollout"]) => {
                if !caller.may(Scope::Read, app) {
                    return forbidden(&format!("read app {app:?}"));
                }
                let current = self.rollouts.lock().unwrap().get(*app).map(|c| c.status());
                match current.or_else(|| self.finished.lock().unwrap().get(*app).cloned()) {
                    Some(s) => json(StatusCode::OK, &s),
                    None => text(
                        StatusCode::NOT_FOUND,
                        format!("no rollout of app {app:?} since the control plane started"),
                    ),
                }
            }
            (Method::POST, ["v1", "apps", app, "rollout", action]) => {
                let what = format!("rollout.{action}");
                if !caller.may(Scope::Deploy, app) {
                    self.note(&caller, &what, Some(app), "", "403: needs deploy");
                    return forbidden(&format!("steer app {app:?}'s rollout (needs deploy)"));
                }
                let Some(ctl) = self.rollouts.lock().unwrap().get(*app).cloned() else {
                    self.note(&caller, &what, Some(app), "", "404: no rollout in progress");
                    return text(StatusCode::NOT_FOUND, format!("no rollout of app {app:?} is in progress"));
                };
                match *action {
                    "pause" => ctl.command(rollout::Command::Pause),
                    "resume" => ctl.command(rollout::Command::Run),
                    "abort" => ctl.command(rollout::Command::Abort),
                    "approve" => ctl.approve(),
                    other => {
                        return text(
                            StatusCode::NOT_FOUND,
                            format!("no rollout action {other:?}: pause, resume, abort, approve"),
                        )
                    }
                }
                tracing::info!(app, action, "rollout steered");
                self.note(&caller, &what, Some(app), ctl.version.short(), "ok");
                json(StatusCode::OK, &ctl.status())
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
                        self.note(&caller, "rollback", Some(&app), report.version.short(), "ok");
                        json(StatusCode::OK, &report)
                    }
                    Err((status, msg)) => {
                        let to = to.as_deref().unwrap_or("");
                        self.note(&caller, "rollback", Some(&app), to, &format!("{status}: {msg}"));
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
                    .filter(|op| matches!(op["op"].as_str(), Some("set" | "delete" | "increment" | "swap")))
                    .map(|op| {
                        let key = op["key"].as_str().map(|k| format!("/{k}")).unwrap_or_default();
                        format!("{} {}{key}", op["op"].as_str().unwrap_or("?"), op["ns"].as_str().unwrap_or("?"))
                    });
                let resp = self.kv_api(&caller, &app, &rest, method, query.as_deref(), body).await;
                if let Some(detail) = change {
                    let outcome = if resp.status().is_success() { "ok".to_string() } else { resp.status().to_string() };
                    self.note(&caller, "kv.write", Some(&app), &detail, &outcome);
                }
                resp
            }
            (Method::POST, ["v1", "deploy"]) => {
                let body = match meridian_http::read_body(req.into_body(), MAX_DEPLOY_BYTES).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                let peek = body.clone();
                let result = self.deploy(body, &caller).await;
                let (app, version) = match &result {
                    Ok(r) => (Some(r.app.clone()), r.version.short().to_string()),
                    Err(_) => match Bundle::from_tar(&peek) {
                        Ok(b) => (Some(b.manifest.name), b.id.short().to_string()),
                        Err(_) => (None, "an unreadable bundle".into()),
                    },
                };
                match result {
                    Ok(report) => {
                        self.note(&caller, "deploy", app.as_deref(), &version, "ok");
                        json(StatusCode::OK, &report)
                    }
                    Err((status, msg)) => {
                        let first = msg.lines().next().unwrap_or("");
                        self.note(&caller, "deploy", app.as_deref(), &version, &format!("{status}: {first}"));
                        text(status, msg)
                    }
                }
            }
            (method, ["v1", "tokens", ..]) if caller != Caller::Admin => {
                if method != Method::GET {
                    self.note(&caller, "tokens", None, "", "403: not the administrator token");
                }
                forbidden("manage tokens (only the world's administrator token can)")
            }
            (Method::GET, ["v1", "tokens"]) => json(StatusCode::OK, &self.tokens.list()),
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
                match self.tokens.create(&n.app, n.scopes) {
                    Ok((record, secret)) => {
                        self.note(&caller, "tokens.create", Some(&n.app), &format!("{} {scopes}", record.id), "ok");
                        json(StatusCode::OK, &serde_json::json!({"token": secret, "record": record}))
                    }
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the token: {e}")),
                }
            }
            (Method::DELETE, ["v1", "tokens", id]) => match self.tokens.revoke(id) {
                Ok(true) => {
                    self.note(&caller, "tokens.revoke", None, id, "ok");
                    json(StatusCode::OK, &serde_json::json!({"revoked": id}))
                }
                Ok(false) => text(StatusCode::NOT_FOUND, format!("no token {id}")),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the tokens: {e}")),
            },
            _ => text(StatusCode::NOT_FOUND, format!("no such API: {path}")),
        }
    }
}
