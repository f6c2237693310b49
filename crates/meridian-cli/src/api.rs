//! A small client for the APIs of a running world (control, supervisor).

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use meridian_core::world::{default_world_dir, WorldDescription};
use std::path::PathBuf;
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
}

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
