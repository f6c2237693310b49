//! `meridian region|edge|control --config FILE`: run one role.

use anyhow::Context;
use meridian_http::Handler;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// The role's config file (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Once serving, write the bound address here (useful with port 0).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

fn announce(ready_file: &Option<PathBuf>, listener: &tokio::net::TcpListener) -> anyhow::Result<()> {
    if let Some(f) = ready_file {
        let addr = listener.local_addr()?.to_string();
        meridian_core::fs::write_atomic(f, addr.as_bytes()).with_context(|| format!("cannot write {}", f.display()))?;
    }
    Ok(())
}

fn load<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config {}", path.display()))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))
}

/// Announces the bound address, then serves until SIGINT/SIGTERM and drains.
async fn serve(a: &Args, what: &str, listener: tokio::net::TcpListener, handler: Handler) -> anyhow::Result<()> {
    serve_until(a, what, listener, handler, shutdown_signal()).await
}

async fn serve_until(
    a: &Args,
    what: &str,
    listener: tokio::net::TcpListener,
    handler: Handler,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    announce(&a.ready_file, &listener)?;
    tracing::info!(addr = %listener.local_addr()?, "{what} serving");
    meridian_http::serve(listener, handler, shutdown, Duration::from_secs(10)).await;
    Ok(())
}

pub async fn region(a: Args) -> anyhow::Result<()> {
    let cfg: meridian_region::RegionConfig = load(&a.config)?;
    let listener = bind(cfg.listen).await?;
    let what = format!("region {}", cfg.name);
    let region = meridian_region::Region::open(cfg).await?;
    let r = region.clone();
    let handler: Handler = Arc::new(move |req, _peer| {
        let r = r.clone();
        Box::pin(async move { r.handle(req).await })
    });
    // Replication streams are long-lived requests: end them first so the
    // server can drain.
    let shutdown = async {
        shutdown_signal().await;
        region.shutdown().await;
    };
    serve_until(&a, &what, listener, handler, shutdown).await
}

pub async fn edge(a: Args) -> anyhow::Result<()> {
    let cfg: meridian_edge::EdgeConfig = load(&a.config)?;
    let listener = bind(cfg.listen).await?;
    let what = cfg.name.clone();
    let edge = meridian_edge::Edge::new(cfg)?;
    tokio::spawn(edge.clone().run_health_checks());
    let handler: Handler = Arc::new(move |req, peer| {
        let e = edge.clone();
        Box::pin(async move { e.handle(req, peer).await })
    });
    serve(&a, &what, listener, handler).await
}

pub async fn control(a: Args) -> anyhow::Result<()> {
    let cfg: meridian_control::ControlConfig = load(&a.config)?;
    let listener = bind(cfg.listen).await?;
    let control = meridian_control::Control::open(cfg)?;
    tokio::spawn(control.clone().reconcile_loop());
    let handler: Handler = Arc::new(move |req, _peer| {
        let c = control.clone();
        Box::pin(async move { c.handle(req).await })
    });
    serve(&a, "control plane", listener, handler).await
}
