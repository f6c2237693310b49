//! The control plane: keeps the app's versions and which one should run, and
//! makes every region run it.
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
//! version, written atomically.

pub mod tokens;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use meridian_core::{headers, wire::RegionStatus, VersionId};
use meridian_http::cluster::{CallError, ClusterClient, Target};
use meridian_http::{json, text, unauthorized, Body, Role, Tls};
use meridian_manifest::Bundle;
use meridian_trust::{Expect, TlsFiles};
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

#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct ControlState {
    pub app: Option<String>,
    pub desired: Option<VersionId>,
    pub history: Vec<VersionId>,
}

pub struct Control {
    config: ControlConfig,
    tokens: Tokens,
    pub tls: Arc<Tls>,
    client: ClusterClient,
    state: Mutex<ControlState>,
    deploy_lock: tokio::sync::Mutex<()>,
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
}

enum RegionCall {
    Ok(String),
    Refused(String),
    Unreachable(String),
}

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
        std::fs::create_dir_all(config.data_dir.join("bundles"))?;
        let state = match std::fs::read(config.data_dir.join("state.json")) {
            Ok(b) => serde_json::from_slice(&b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ControlState::default(),
            Err(e) => return Err(e.into()),
        };
        let tokens = Tokens::open(config.data_dir.join("tokens.json"), &token)?;
        Ok(Arc::new(Control {
            config,
            tokens,
            client: ClusterClient::new(tls.clone(), Duration::from_secs(2)),
            tls,
            state: Mutex::new(state),
            deploy_lock: tokio::sync::Mutex::new(()),
        }))
    }

    fn save_state(&self, s: &ControlState) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
        meridian_core::fs::write_atomic(&self.config.data_dir.join("state.json"), &bytes)
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
        let target = match Target::from_url(region.url.trim_end_matches('/'), Expect::new(&region.name, Role::Region)) {
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

    /// Stores a version and makes it run everywhere (see the module docs).
    pub async fn deploy(&self, tar: Bytes, caller: &Caller) -> Result<DeployReport, (StatusCode, String)> {
        let bundle = Bundle::from_tar(&tar).map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        if !caller.may(Scope::Deploy, &bundle.manifest.name) {
            return Err((
                StatusCode::FORBIDDEN,
                format!("this token may not deploy app {:?} (it needs the deploy scope on it)", bundle.manifest.name),
            ));
        }
        let _guard = self.deploy_lock.lock().await;
        let id = bundle.id.clone();
        let path = self.bundle_path(&id);
        if !path.exists() {
            meridian_core::fs::write_atomic(&path, &tar)
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the version: {e}")))?;
        }
        // Phase 1: install (compile) everywhere reachable.
        let install_timeout = Duration::from_secs(300);
        let install_path = format!("versions/{id}");
        let installs = futures::future::join_all(
            self.config.regions.iter().map(|r| self.call(r, Method::PUT, &install_path, tar.clone(), install_timeout)),
        )
        .await;
        let mut outcomes = Vec::new();
        let mut refused = Vec::new();
        for (r, res) in self.config.regions.iter().zip(installs) {
            match res {
                RegionCall::Ok(_) => outcomes.push((r, true, String::new())),
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
        {
            let mut s = self.state.lock().unwrap();
            s.app = Some(bundle.manifest.name.clone());
            s.desired = Some(id.clone());
            if s.history.last() != Some(&id) {
                s.history.push(id.clone());
            }
            self.save_state(&s)
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot record the deploy: {e}")))?;
        }
        // Phase 2: switch each region that holds it.
        let mut report = Vec::new();
        for (r, installed, err) in outcomes {
            let outcome = if !installed {
                RegionOutcome { region: r.name.clone(), outcome: "pending".into(), detail: err }
            } else {
                match self.call(r, Method::PUT, "active", Bytes::from(id.to_string()), Duration::from_secs(10)).await {
                    RegionCall::Ok(_) => {
                        RegionOutcome { region: r.name.clone(), outcome: "active".into(), detail: String::new() }
                    }
                    RegionCall::Unreachable(e) | RegionCall::Refused(e) => {
                        RegionOutcome { region: r.name.clone(), outcome: "pending".into(), detail: e }
                    }
                }
            };
            report.push(outcome);
        }
        Ok(DeployReport { app: bundle.manifest.name, version: id, regions: report })
    }

    /// Brings every region to the desired version, forever.
    pub async fn reconcile_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.reconcile_interval_ms.max(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Read the desired version under the deploy lock: read before
            // it, a deploy finishing meanwhile would be undone.
            let _guard = self.deploy_lock.lock().await;
            let Some(desired) = self.state.lock().unwrap().desired.clone() else { continue };
            for r in &self.config.regions {
                if let Err(e) = self.reconcile_region(r, &desired).await {
                    tracing::debug!(region = %r.name, error = %e, "reconcile pending");
                }
            }
        }
    }

    async fn reconcile_region(&self, r: &ControlRegion, desired: &VersionId) -> Result<(), String> {
        let status = match self.call(r, Method::GET, "status", Bytes::new(), Duration::from_secs(2)).await {
            RegionCall::Ok(b) => b,
            RegionCall::Unreachable(e) | RegionCall::Refused(e) => return Err(e),
        };
        let status: RegionStatus = serde_json::from_str(&status).map_err(|e| format!("unreadable status: {e}"))?;
        if status.active.as_ref() == Some(desired) {
            return Ok(());
        }
        let installed = status.installed.contains(desired);
        if !installed {
            let tar = std::fs::read(self.bundle_path(desired)).map_err(|e| e.to_string())?;
            if let RegionCall::Unreachable(e) | RegionCall::Refused(e) = self
                .call(r, Method::PUT, &format!("versions/{desired}"), Bytes::from(tar), Duration::from_secs(300))
                .await
            {
                return Err(e);
            }
        }
        match self.call(r, Method::PUT, "active", Bytes::from(desired.to_string()), Duration::from_secs(10)).await {
            RegionCall::Ok(_) => {
                tracing::info!(region = %r.name, version = desired.short(), "reconciled region to the desired version");
                Ok(())
            }
            RegionCall::Unreachable(e) | RegionCall::Refused(e) => Err(e),
        }
    }

    pub async fn status(&self) -> serde_json::Value {
        let (app, desired) = {
            let s = self.state.lock().unwrap();
            (s.app.clone(), s.desired.clone())
        };
        let calls = futures::future::join_all(
            self.config
                .regions
                .iter()
                .map(|r| self.call(r, Method::GET, "status", Bytes::new(), Duration::from_secs(2))),
        )
        .await;
        let regions: Vec<_> = self
            .config
            .regions
            .iter()
            .zip(calls)
            .map(|(r, c)| match c {
                RegionCall::Ok(b) => {
                    match serde_json::from_str::<RegionStatus>(&b) {
                        Ok(s) => serde_json::json!({"region": r.name, "reachable": true, "active": s.active}),
                        Err(e) => serde_json::json!({"region": r.name, "reachable": true, "error": format!("unreadable status: {e}")}),
                    }
                }
                RegionCall::Unreachable(e) | RegionCall::Refused(e) => {
                    serde_json::json!({"region": r.name, "reachable": false, "error": e})
                }
            })
            .collect();
        serde_json::json!({"app": app, "desired": desired, "regions": regions})
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let Some(caller) = self.tokens.caller(meridian_http::bearer(&req).unwrap_or("")) else {
            return unauthorized();
        };
        let app = self.state.lock().unwrap().app.clone().unwrap_or_default();
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
            (Method::GET, ["v1", "status"]) => {
                if !caller.may(Scope::Read, &app) {
                    return forbidden(&format!("read app {app:?}"));
                }
                json(StatusCode::OK, &self.status().await)
            }
            (Method::POST, ["v1", "deploy"]) => {
                let body = match meridian_http::read_body(req.into_body(), MAX_DEPLOY_BYTES).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                match self.deploy(body, &caller).await {
                    Ok(report) => json(StatusCode::OK, &report),
                    Err((status, msg)) => text(status, msg),
                }
            }
            (method, ["v1", "tokens", ..]) if caller != Caller::Admin => {
                let _ = method;
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
                if !meridian_core::topology::is_valid_name(&n.app) || n.scopes.is_empty() {
                    return text(StatusCode::BAD_REQUEST, "a token needs an app name and at least one scope");
                }
                match self.tokens.create(&n.app, n.scopes) {
                    Ok((record, secret)) => {
                        json(StatusCode::OK, &serde_json::json!({"token": secret, "record": record}))
                    }
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the token: {e}")),
                }
            }
            (Method::DELETE, ["v1", "tokens", id]) => match self.tokens.revoke(id) {
                Ok(true) => json(StatusCode::OK, &serde_json::json!({"revoked": id})),
                Ok(false) => text(StatusCode::NOT_FOUND, format!("no token {id}")),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the tokens: {e}")),
            },
            _ => text(StatusCode::NOT_FOUND, format!("no such API: {path}")),
        }
    }
}
