//! How the CLI reaches a running world: the control plane and nodes'
//! cluster ports over TLS with the operator's certificate, and the dev
//! supervisor in plain HTTP on loopback.

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use meridian_core::world::{default_world_dir, Credentials, WorldDescription};
use meridian_http::cluster::{ClusterClient, Target};
use meridian_trust::{Expect, Role, Tls, TlsFiles};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where to find a world: `--world DIR`, `$MERIDIAN_WORLD`, or `~/.meridian/dev`.
#[derive(clap::Args, Clone, Debug)]
pub struct WorldArg {
    /// Directory of a running world (default: $MERIDIAN_WORLD or ~/.meridian/dev).
    #[arg(long, global = true)]
    pub world: Option<PathBuf>,
}

impl WorldArg {
    pub fn dir(&self) -> PathBuf {
        self.world.clone().unwrap_or_else(default_world_dir)
    }

    pub fn load(&self) -> anyhow::Result<(WorldDescription, String)> {
        let w = WorldDescription::read(&self.dir())?;
        let token = w.token().with_context(|| format!("cannot read the token at {}", w.token_file.display()))?;
        Ok((w, token))
    }

    /// The world and a client holding the operator's credentials.
    pub fn connect(&self) -> anyhow::Result<(WorldDescription, Operator)> {
        let (w, token) = self.load()?;
        let op = Operator::new(&w.operator, token)?;
        Ok((w, op))
    }
}

/// The operator's side of the cluster: a certificate for nodes' cluster
/// ports and the token for the control plane's API.
pub struct Operator {
    pub client: ClusterClient,
    pub token: String,
}

impl Operator {
    pub fn new(c: &Credentials, token: String) -> anyhow::Result<Operator> {
        let files = TlsFiles { ca: c.ca.clone(), cert: c.cert.clone(), key: c.key.clone(), reload_interval_ms: 5000 };
        let tls: Arc<Tls> = Tls::load(files).context("the operator's certificate")?;
        Ok(Operator { client: ClusterClient::new(tls, Duration::from_secs(5)), token })
    }

    /// Calls a node's cluster port, which must prove to be `expect`.
    pub async fn node(
        &self,
        url: &str,
        expect: Expect,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let target = Target::from_url(url, expect)?;
        let auth = format!("Bearer {}", self.token);
        let a = self.client.call_with(&target, method, path, &[("authorization", &auth)], body, timeout).await?;
        Ok((a.status, a.body))
    }

    /// Like [`Operator::node`], but any non-2xx status is an error carrying the body.
    pub async fn node_ok(
        &self,
        url: &str,
        expect: Expect,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> anyhow::Result<Bytes> {
        let (status, body) = self.node(url, expect, method, path, body, timeout).await?;
        success(status, body)
    }

    /// Calls the control plane. `control_url` may list several control
    /// nodes, comma-separated: the next is tried when one cannot be reached
    /// (nothing was sent) or says it cannot serve now (503: no leader yet,
    /// or the leader unreachable from it). Any node forwards to the leader.
    pub async fn control(
        &self,
        control_url: &str,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let auth = format!("Bearer {}", self.token);
        let hs = [("authorization", auth.as_str())];
        let mut last = None;
        for url in control_urls(control_url) {
            let target = Target::from_url(url, Expect::service(Role::Control))?;
            match self.client.call_with(&target, method.clone(), path, &hs, body.clone(), timeout).await {
                Ok(a) if a.status == StatusCode::SERVICE_UNAVAILABLE => last = Some(Ok((a.status, a.body))),
                Ok(a) => return Ok((a.status, a.body)),
                Err(e) if e.nothing_sent() => last = Some(Err(anyhow::Error::new(e))),
                Err(e) => return Err(e.into()),
            }
        }
        last.unwrap_or_else(|| Err(anyhow::anyhow!("no control plane URL given")))
    }

    /// Like [`Operator::control`], but any non-2xx status is an error carrying the body.
    pub async fn control_ok(
        &self,
        control_url: &str,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> anyhow::Result<Bytes> {
        let (status, body) = self.control(control_url, method, path, body, timeout).await?;
        success(status, body)
    }
}

/// A 2xx answer's body; any other status is an error carrying the body.
fn success(status: StatusCode, body: Bytes) -> anyhow::Result<Bytes> {
    if !status.is_success() {
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    Ok(body)
}

/// The control nodes' URLs in a comma-separated list.
pub fn control_urls(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(|u| u.trim().trim_end_matches('/')).filter(|u| !u.is_empty())
}

/// A plain-HTTP call with a bearer token (the dev supervisor's chaos API).
pub async fn call(
    method: Method,
    url: &str,
    token: &str,
    body: Bytes,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let client = meridian_http::client(Duration::from_secs(5));
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(meridian_http::full(body))?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .with_context(|| format!("{url} did not answer within {timeout:?}"))?
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let body =
        resp.into_body().collect().await.map_err(|e| anyhow::anyhow!("reading the answer of {url}: {e}"))?.to_bytes();
    Ok((status, body))
}

/// Like [`call`], but any non-2xx status is an error carrying the body.
pub async fn call_ok(method: Method, url: &str, token: &str, body: Bytes, timeout: Duration) -> anyhow::Result<Bytes> {
    let (status, body) = call(method, url, token, body, timeout).await?;
    if !status.is_success() {
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    Ok(body)
}
