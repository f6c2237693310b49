//! `meridian region|edge|control --config FILE`: run one role.

use anyhow::Context;
use meridian_http::workers::{serve_per_core, Port};
use meridian_http::{ClientAuth, Handler, Transport};
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

/// Writes `<kind> <address>` per listener, once all are bound (the file
/// appears atomically, so its presence means the role serves).
fn announce(ready_file: &Option<PathBuf>, listeners: &[(&str, &tokio::net::TcpListener)]) -> anyhow::Result<()> {
    if let Some(f) = ready_file {
        let mut text = String::new();
        for (kind, l) in listeners {
            text += &format!("{kind} {}\n", l.local_addr()?);
        }
        meridian_core::fs::write_atomic(f, text.as_bytes()).with_context(|| format!("cannot write {}", f.display()))?;
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

/// A user port that the worker threads share (`SO_REUSEPORT`).
async fn bind_shared(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    meridian_http::workers::bind_shared(addr).await.with_context(|| format!("cannot listen on {addr}"))
}

/// Serves every listener until `shutdown`, then drains them all.
async fn serve_all(
    a: &Args,
    what: &str,
    listeners: Vec<(&str, tokio::net::TcpListener, Handler, Transport)>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    announce(&a.ready_file, &listeners.iter().map(|(k, l, _, _)| (*k, l)).collect::<Vec<_>>())?;
    for (kind, l, _, _) in &listeners {
        tracing::info!(addr = %l.local_addr()?, "{what} serving ({kind})");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (_, l, h, t) in listeners {
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(meridian_http::serve(
            l,
            h,
            t,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
            Duration::from_secs(10),
        )));
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

pub async fn region(a: Args) -> anyhow::Result<()> {
    let cfg: meridian_region::RegionConfig = load(&a.config)?;
    let public = bind(cfg.public_listen).await?;
    let cluster = bind(cfg.cluster_listen).await?;
    let what = format!("region {}", cfg.name);
    let region = meridian_region::Region::open(cfg).await?;
    region.forbid_guest_access(vec![public.local_addr()?, cluster.local_addr()?]);
    let r = region.clone();
    let public_handler: Handler = Arc::new(move |req, _peer| {
        let r = r.clone();
        Box::pin(async move { r.handle_public(req).await })
    });
    let r = region.clone();
    let cluster_handler: Handler = Arc::new(move |req, _peer| {
        let r = r.clone();
        Box::pin(async move { r.handle_cluster(req).await })
    });
    // Replication streams are long-lived requests: end them first so the
    // server can drain.
    let shutdown = async {
        shutdown_signal().await;
        region.shutdown().await;
    };
    let tls = Transport::Tls(region.tls.clone(), ClientAuth::Required);
    serve_all(
        &a,
        &what,
        vec![("public", public, public_handler, Transport::Plain), ("cluster", cluster, cluster_handler, tls)],
        shutdown,
    )
    .await
}

pub async fn edge(a: Args) -> anyhow::Result<()> {
    let cfg: meridian_edge::EdgeConfig = load(&a.config)?;
    // User ports are shared by the worker threads (SO_REUSEPORT).
    let public = bind_shared(cfg.listen).await?;
    let cluster = bind(cfg.cluster_listen).await?;
    let port = public.local_addr()?.port();
    let mut also = Vec::new();
    for ip in &cfg.also_listen_ips {
        also.push(bind_shared(std::net::SocketAddr::new(*ip, port)).await?);
    }
    let https = match &cfg.https {
        None => None,
        Some(h) => {
            let sites = meridian_edge::https::Sites::load(&h.certs_dir)?;
            sites.spawn_reloader(Duration::from_millis(h.reload_interval_ms));
            let config = sites.server_config().context("the HTTPS port's TLS configuration")?;
            Some((bind_shared(h.listen).await?, config))
        }
    };
    let workers = cfg.workers();
    let what = cfg.name.clone();
    let edge = meridian_edge::Edge::new(cfg)?;
    edge.tls.spawn_reloader();
    tokio::spawn(edge.clone().run_health_checks());
    let e = edge.clone();
    // The handler's future boxed as it is, not inside another async
    // block: one copy of it per request instead of two.
    let public_handler: Handler = Arc::new(move |req, peer| Box::pin(e.clone().handle(req, peer)));
    let e = edge.clone();
    let cluster_handler: Handler = Arc::new(move |req, _peer| {
        let e = e.clone();
        Box::pin(async move { e.handle_cluster(req).await })
    });
    let tls = Transport::Tls(edge.tls.clone(), ClientAuth::Required);
    let mut user = vec![("public", public, Transport::Plain)];
    for l in also {
        user.push(("also", l, Transport::Plain));
    }
    if let Some((l, config)) = https {
        user.push(("https", l, Transport::Public(config)));
    }
    let mut named: Vec<(&str, &tokio::net::TcpListener)> = user.iter().map(|(k, l, _)| (*k, l)).collect();
    named.push(("cluster", &cluster));
    announce(&a.ready_file, &named)?;
    for (kind, l) in &named {
        tracing::info!(addr = %l.local_addr()?, workers, "{what} serving ({kind})");
    }
    let ports = user
        .into_iter()
        .map(|(_, listener, transport)| Port { listener, handler: public_handler.clone(), transport })
        .collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grace = Duration::from_secs(10);
    let mut rx = stop_rx.clone();
    let cluster = tokio::spawn(meridian_http::serve(
        cluster,
        cluster_handler,
        tls,
        async move {
            let _ = rx.wait_for(|s| *s).await;
        },
        grace,
    ));
    let mut user = tokio::spawn(serve_per_core(workers, ports, stop_rx, grace));
    tokio::select! {
        _ = shutdown_signal() => {}
        // The workers stop only when told to, unless they could not start.
        r = &mut user => {
            r.context("the worker threads")?.context("serving the user ports")?;
            anyhow::bail!("the worker threads stopped on their own");
        }
    }
    let _ = stop_tx.send(true);
    let _ = cluster.await;
    user.await.context("the worker threads")?.context("serving the user ports")?;
    Ok(())
}

pub async fn dns(a: Args) -> anyhow::Result<()> {
    let cfg: meridian_geodns::DnsConfig = load(&a.config)?;
    let (udp, tcp) = meridian_geodns::GeoDns::bind(cfg.listen).await?;
    let listen = udp.local_addr()?;
    let dns = meridian_geodns::GeoDns::new(cfg)?;
    if let Some(f) = &a.ready_file {
        meridian_core::fs::write_atomic(f, format!("public {listen}\n").as_bytes())
            .with_context(|| format!("cannot write {}", f.display()))?;
    }
    tracing::info!(%listen, "GeoDNS serving (UDP and TCP)");
    tokio::select! {
        _ = dns.serve(udp, tcp) => {}
        _ = shutdown_signal() => {}
    }
    Ok(())
}

pub async fn control(a: Args) -> anyhow::Result<()> {
    let cfg: meridian_control::ControlConfig = load(&a.config)?;
    let listener = bind(cfg.listen).await?;
    let control = meridian_control::Control::open(cfg).await?;
    control.tls.spawn_reloader();
    tokio::spawn(control.clone().reconcile_loop());
    tokio::spawn(control.clone().lead_loop());
    let c = control.clone();
    let handler: Handler = Arc::new(move |req, _peer| {
        let c = c.clone();
        Box::pin(async move { c.handle(req).await })
    });
    // Operators authenticate with the token; TLS proves the control plane.
    let tls = Transport::Tls(control.tls.clone(), ClientAuth::Optional);
    serve_all(&a, "control plane", vec![("cluster", listener, handler, tls)], shutdown_signal()).await
}
