//! `meridian dev`: a whole multi-region world on this machine.
//!
//! Starts a control plane, one region node per region of the topology and
//! one edge per region location, each as its own OS process on a loopback
//! address, with every edge→region and region→region connection going
//! through an emulated link whose one-way delay is half the topology's round
//! trip. Then deploys the app (the bundled example unless `--app` is given),
//! writes `world.json` and waits for Ctrl-C.

use crate::api::{Operator, WorldArg};
use crate::commands::roles::shutdown_signal;
use crate::supervisor::{process_info, Listeners, Supervisor};
use anyhow::Context;
use bytes::Bytes;
use http::Method;
use meridian_control::consensus::ControlMember;
use meridian_control::{ControlConfig, ControlRegion};
use meridian_core::world::{Credentials, EdgeInfo, LinkInfo, RegionInfo, WorldDescription, FORMAT, TOKEN_FILE};
use meridian_core::Topology;
use meridian_edge::health::HealthConfig;
use meridian_edge::select::Policy;
use meridian_edge::{EdgeConfig, RegionTarget};
use meridian_region::RegionConfig;
use meridian_trust::{Expect, Identity, Role, TlsFiles};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub world: WorldArg,
    /// Topology file replacing the built-in three-region world.
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// App directory to deploy instead of the bundled example.
    #[arg(long)]
    pub app: Option<PathBuf>,
    /// Do not deploy anything.
    #[arg(long)]
    pub no_deploy: bool,
    /// First port of a consecutive range (edges first); 0 picks free ports.
    #[arg(long, default_value_t = 7400)]
    pub port_base: u16,
    /// Active health-check interval of the edges.
    #[arg(long, default_value_t = 500)]
    pub health_interval_ms: u64,
    /// Routing policy of the edges.
    #[arg(long, value_enum, default_value_t = PolicyArg::Geo)]
    pub policy: PolicyArg,
    /// A MaxMind-format GeoIP database for the edges and the GeoDNS server
    /// (without one, clients are located only by trusted headers).
    #[arg(long)]
    pub geoip_db: Option<PathBuf>,
    /// How often regions compare key-value digests with each peer.
    #[arg(long, default_value_t = 3000)]
    pub anti_entropy_ms: u64,
    /// The longest a restarted region keeps an app's users away while it
    /// catches up with its peers (then it serves what it has, and says so).
    #[arg(long, default_value_t = 60_000)]
    pub rejoin_bound_ms: u64,
    /// Control nodes (their state replicated by Raft): 3 survive losing
    /// one; 1 is a control plane without failover.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=7))]
    pub control_nodes: u8,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum PolicyArg {
    Geo,
    Latency,
}

/// The example app, compiled into the binary so `meridian dev` works from
/// any directory.
/// The second example app (`notes.localhost`).
const NOTES: &[(&str, &[u8])] = &[
    ("meridian.toml", include_bytes!("../../../../examples/notes/meridian.toml")),
    ("components/kv.wasm", include_bytes!("../../../../examples/notes/components/kv.wasm")),
    ("static/index.html", include_bytes!("../../../../examples/notes/static/index.html")),
];

const EXAMPLE: &[(&str, &[u8])] = &[
    ("meridian.toml", include_bytes!("../../../../examples/hello/meridian.toml")),
    ("components/hello.wasm", include_bytes!("../../../../examples/hello/components/hello.wasm")),
    ("components/kv.wasm", include_bytes!("../../../../examples/hello/components/kv.wasm")),
    ("static/index.html", include_bytes!("../../../../examples/hello/static/index.html")),
    ("static/style.css", include_bytes!("../../../../examples/hello/static/style.css")),
];

/// The name (and certificate name) of the dev world's `i`-th control node.
fn control_name(i: u8) -> String {
    format!("control-{i}")
}

struct Ports {
    next: u16,
}

impl Ports {
    /// The next port of the fixed layout, or port 0 (the kernel picks, the
    /// process reports what it got) when `--port-base 0`.
    fn take(&mut self) -> anyhow::Result<SocketAddr> {
        let port = self.next;
        if port != 0 {
            self.next = self.next.checked_add(1).context("ran out of ports above --port-base")?;
        }
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

/// Every node's certificate, from the world's own CA (kept across runs of
/// the same world; node certificates are issued afresh each time).
fn issue_certificates(dir: &Path, topology: &Topology, control_nodes: u8) -> anyhow::Result<PathBuf> {
    let certs = dir.join("certs");
    let ca = meridian_trust::ensure_ca(&certs, "dev", 3650)?;
    let mut ids = vec![Identity::new("operator", Role::Operator, None)?];
    for i in 1..=control_nodes {
        ids.push(Identity::new(&control_name(i), Role::Control, None)?);
    }
    for r in &topology.regions {
        ids.push(Identity::new(&r.name, Role::Region, Some(&r.jurisdiction))?);
        ids.push(Identity::new(&format!("edge-{}", r.name), Role::Edge, None)?);
    }
    for id in &ids {
        meridian_trust::issue(&ca, id, &certs, 365)?;
    }
    // What users see over HTTPS: its own CA (trusting it must not let
    // anyone mint node certificates), one certificate for the example
    // apps' hostnames.
    let (public_ca, public_key) = meridian_trust::ensure_public_ca(&certs, "dev", 3650)?;
    let hosts: Vec<String> =
        ["localhost", "hello.localhost", "notes.localhost", "*.localhost"].iter().map(|h| h.to_string()).collect();
    meridian_trust::issue_site(&public_ca, &public_key, &hosts, &certs.join("sites"), "localhost", 365)?;
    Ok(certs)
}

/// A node's certificate files; a dev world checks them for changes every
/// second, so a reissued certificate takes effect quickly.
fn dev_tls(certs: &Path, name: &str) -> TlsFiles {
    TlsFiles { reload_interval_ms: 1000, ..TlsFiles::in_dir(certs, name) }
}

fn write_config<T: serde::Serialize>(dir: &Path, name: &str, value: &T) -> anyhow::Result<PathBuf> {
    let path = dir.join("config").join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(value)?)?;
    Ok(path)
}

fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let dir = a.world.dir();
    let topology = match &a.topology {
        Some(p) => Topology::load(p)?,
        None => Topology::default_world(),
    };
    if let Ok(old) = WorldDescription::read(&dir) {
        let alive = old.processes.iter().find(|p| p.role == "supervisor").and_then(|p| p.pid).is_some_and(|pid| {
            // SAFETY: signal 0 only checks that the PID exists.
            unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
        });
        if alive {
            anyhow::bail!(
                "a world is already running in {} (see world.json); stop it or pass --world DIR",
                dir.display()
            );
        }
    }
    for sub in ["config", "logs", "data", "run"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let token = new_token();
    let token_file = dir.join(TOKEN_FILE);
    meridian_core::fs::write_secret(&token_file, token.as_bytes())?;
    let certs = issue_certificates(&dir, &topology, a.control_nodes).context("cannot make the world's certificates")?;
    let operator_creds =
        Credentials { ca: certs.join("ca.pem"), cert: certs.join("operator.pem"), key: certs.join("operator.key") };

    let mut ports = Ports { next: a.port_base };
    // Fixed layout: edges first, so users get stable URLs from the port base.
    let edge_addrs: Vec<SocketAddr> = topology.regions.iter().map(|_| ports.take()).collect::<Result<_, _>>()?;
    let control_addr = ports.take()?;
    let supervisor_addr = ports.take()?;
    let region_addrs: Vec<SocketAddr> = topology.regions.iter().map(|_| ports.take()).collect::<Result<_, _>>()?;
    // Control nodes must know each other's addresses before they start: with
    // --port-base 0 the kernel picks free ones now. Each stays bound here
    // (so no other process, and no other pick, gets it) until just before
    // its node starts and binds it.
    let mut control_addrs = vec![control_addr];
    for _ in 1..a.control_nodes {
        control_addrs.push(ports.take()?);
    }
    let control_holds = hold_ports(&mut control_addrs)?;
    // The control plane purges the edges' caches: it must know their
    // cluster ports before it starts.
    let mut edge_cluster_addrs: Vec<SocketAddr> =
        topology.regions.iter().map(|_| ports.take()).collect::<Result<_, _>>()?;
    let edge_cluster_holds = hold_ports(&mut edge_cluster_addrs)?;

    // The chaos API listens first so a script can act as soon as the world exists.
    let listener = tokio::net::TcpListener::bind(supervisor_addr).await.with_context(|| {
        format!("cannot listen on {supervisor_addr} (is another world using --port-base {}?)", a.port_base)
    })?;
    let supervisor_addr = listener.local_addr()?;
    let mut world = WorldDescription {
        format: FORMAT,
        ready: false,
        dir: dir.clone(),
        token_file: token_file.clone(),
        operator: operator_creds.clone(),
        control_url: String::new(),
        supervisor_url: format!("http://{supervisor_addr}"),
        processes: vec![process_info("supervisor", "supervisor", supervisor_addr.to_string(), None, None)],
        edges: Vec::new(),
        regions: Vec::new(),
        links: Vec::new(),
        dns: None,
    };
    world.processes[0].pid = Some(std::process::id());
    let sup = Arc::new(Supervisor::new(dir.clone(), token.clone(), world)?);
    let s = sup.clone();
    let handler: meridian_http::Handler = Arc::new(move |req, _| {
        let s = s.clone();
        Box::pin(async move { s.handle(req).await })
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let api = tokio::spawn(meridian_http::serve(
        listener,
        handler,
        meridian_http::Transport::Plain,
        async {
            let _ = stop_rx.await;
        },
        Duration::from_secs(1),
    ));
    let s = sup.clone();
    tokio::spawn(async move { s.watch_children().await });

    let operator = Operator::new(&operator_creds, token.clone())?;
    let plan = Plan {
        topology,
        edge_addrs,
        edge_cluster_addrs,
        edge_cluster_holds,
        control_addrs,
        control_holds,
        region_addrs,
        token_file,
        certs,
    };
    let result = tokio::select! {
        r = bring_up(&sup, &a, plan, &mut ports, &operator) => r,
        _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = result {
        sup.stop_all(Duration::from_secs(3));
        let _ = std::fs::remove_file(dir.join(meridian_core::world::WORLD_FILE));
        return Err(e.context(format!("the world did not start; logs are in {}", dir.join("logs").display())));
    }
    let world = {
        let mut w = sup.world.lock().unwrap();
        w.ready = true;
        w.write(&dir)?;
        w.clone()
    };
    print_summary(&world, &dir);

    shutdown_signal().await;
    eprintln!("\nstopping the world...");
    sup.stop_all(Duration::from_secs(5));
    let _ = stop_tx.send(());
    let _ = api.await;
    let _ = std::fs::remove_file(dir.join(meridian_core::world::WORLD_FILE));
    eprintln!("stopped.");
    Ok(())
}

/// Port 0 in `addrs` becomes a free port, each held (so no other process,
/// and no other pick, gets it) until just before its process starts.
fn hold_ports(addrs: &mut [SocketAddr]) -> anyhow::Result<Vec<Option<std::net::TcpListener>>> {
    let mut holds = Vec::new();
    for addr in addrs.iter_mut() {
        if addr.port() == 0 {
            let l = std::net::TcpListener::bind(*addr)?;
            *addr = l.local_addr()?;
            holds.push(Some(l));
        } else {
            holds.push(None);
        }
    }
    Ok(holds)
}

struct Plan {
    topology: Topology,
    edge_addrs: Vec<SocketAddr>,
    /// The edges' cluster ports, pre-picked like the control ports.
    edge_cluster_addrs: Vec<SocketAddr>,
    edge_cluster_holds: Vec<Option<std::net::TcpListener>>,
    control_addrs: Vec<SocketAddr>,
    /// The pre-picked control ports, held until their node starts.
    control_holds: Vec<Option<std::net::TcpListener>>,
    region_addrs: Vec<SocketAddr>,
    token_file: PathBuf,
    certs: PathBuf,
}

async fn add_link(
    sup: &Supervisor,
    ports: &mut Ports,
    from: &str,
    to: &str,
    upstream: SocketAddr,
    delay: Duration,
) -> anyhow::Result<LinkInfo> {
    let name = format!("{from}->{to}");
    let link = sup.netem.add(&name, ports.take()?, upstream, delay).await?;
    Ok(LinkInfo {
        name,
        from: from.to_string(),
        to: to.to_string(),
        listen: link.listen.to_string(),
        upstream: upstream.to_string(),
        one_way_delay_ms: delay.as_secs_f64() * 1000.0,
    })
}

/// Starts a role, waits until it serves, and pins the ports it got in its
/// config so a restart comes back on the same addresses.
async fn start_role<T: serde::Serialize>(
    sup: &Supervisor,
    name: &str,
    role: &str,
    cfg: &mut T,
    pin: impl Fn(&mut T, &Listeners),
) -> anyhow::Result<Listeners> {
    let path = write_config(&sup.dir, name, cfg)?;
    sup.add_process(name, role, path.clone());
    {
        let mut w = sup.world.lock().unwrap();
        w.processes.push(process_info(
            name,
            role,
            String::new(),
            Some(path),
            Some(sup.dir.join(format!("logs/{name}.log"))),
        ));
    }
    sup.start(name)?;
    let got = sup.wait_ready(name, Duration::from_secs(60)).await?;
    pin(cfg, &got);
    write_config(&sup.dir, name, cfg)?;
    Ok(got)
}

/// The example's manifest, fitted to the world's regions: its `strong`
/// namespace names the default topology's three regions.
fn example_manifest(bytes: &[u8], regions: &[String]) -> String {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let default = r#"["us-east", "eu-west", "ap-southeast"]"#;
    if regions.len() >= 3 {
        let list: Vec<String> = regions.iter().take(3).map(|r| format!("{r:?}")).collect();
        let text = text.replace(default, &format!("[{}]", list.join(", ")));
        text.replace(r#"leader = "us-east""#, &format!("leader = {:?}", regions[0]))
    } else {
        // Too few regions for consensus: leave the strong namespace out.
        match text.find("[kv.ledger]") {
            Some(i) => text[..i].to_string(),
            None => text,
        }
    }
}

async fn bring_up(
    sup: &Supervisor,
    a: &Args,
    mut plan: Plan,
    ports: &mut Ports,
    operator: &Operator,
) -> anyhow::Result<()> {
    let dir = sup.dir.clone();
    let plan_regions: Vec<String> = plan.topology.regions.iter().map(|r| r.name.clone()).collect();
    let t0 = Instant::now();
    let topology = &plan.topology;

    // Regions first: everything else points at them.
    // Every edge->region, region->region and control->region connection
    // goes to a region's cluster port.
    let mut region_addrs = Vec::new();
    let mut region_cfgs = Vec::new();
    for (r, addr) in topology.regions.iter().zip(&plan.region_addrs) {
        let mut cfg = RegionConfig {
            name: r.name.clone(),
            public_listen: *addr,
            cluster_listen: ports.take()?,
            data_dir: dir.join("data").join(&r.name),
            tls: dev_tls(&plan.certs, &r.name),
            cluster_key_file: plan.certs.join("cluster.key"),
            max_instances: 200,
            max_instances_per_app: Some(100),
            max_memory_mb: 512,
            pooling: Default::default(),
            max_bundle_mb: 256,
            peers: Vec::new(),
            anti_entropy_ms: a.anti_entropy_ms,
            causality_wait_ms: 500,
            rejoin_bound_ms: a.rejoin_bound_ms,
        };
        let got = start_role(sup, &r.name, "region", &mut cfg, |c, l| {
            c.public_listen = l.public.unwrap_or(c.public_listen);
            c.cluster_listen = l.cluster.unwrap_or(c.cluster_listen);
        })
        .await?;
        let (public, cluster) = (cfg.public_listen, cfg.cluster_listen);
        debug_assert!(got.public.is_some() && got.cluster.is_some());
        region_cfgs.push(cfg);
        region_addrs.push(cluster);
        sup.world.lock().unwrap().regions.push(RegionInfo {
            name: r.name.clone(),
            url: format!("http://{public}"),
            cluster_url: format!("https://{cluster}"),
            location: r.location,
            jurisdiction: r.jurisdiction.clone(),
        });
    }

    // Every edge->region and region->region connection crosses a link whose
    // one-way delay is half the topology's round trip between the places.
    let mut links = Vec::new();
    let mut edge_targets: Vec<Vec<RegionTarget>> = vec![Vec::new(); topology.regions.len()];
    for (ei, at) in topology.regions.iter().enumerate() {
        for (ri, r) in topology.regions.iter().enumerate() {
            let from = format!("edge-{}", at.name);
            let link =
                add_link(sup, ports, &from, &r.name, region_addrs[ri], topology.rtt(&at.name, &r.name) / 2).await?;
            edge_targets[ei].push(RegionTarget {
                name: r.name.clone(),
                url: format!("https://{}", link.listen),
                location: r.location,
                jurisdiction: Some(r.jurisdiction.clone()),
            });
            links.push(link);
        }
    }
    // Regions replicate with each other through their links.
    for (ai, ra) in topology.regions.iter().enumerate() {
        let mut peers = Vec::new();
        for (bi, rb) in topology.regions.iter().enumerate() {
            if ra.name != rb.name {
                let rtt = topology.rtt(&ra.name, &rb.name);
                let link = add_link(sup, ports, &ra.name, &rb.name, region_addrs[bi], rtt / 2).await?;
                peers.push(meridian_region::Peer {
                    name: rb.name.clone(),
                    url: format!("https://{}", link.listen),
                    jurisdiction: rb.jurisdiction.clone(),
                    rtt_ms: rtt.as_secs_f64() * 1000.0,
                });
                links.push(link);
            }
        }
        // In the config for restarts, and at once through the admin API.
        region_cfgs[ai].peers = peers.clone();
        write_config(&dir, &ra.name, &region_cfgs[ai])?;
        operator
            .node_ok(
                &format!("https://{}", region_addrs[ai]),
                Expect::region(&ra.name, &ra.jurisdiction),
                Method::PUT,
                "/_meridian/peers",
                Bytes::from(serde_json::to_vec(&peers)?),
                Duration::from_secs(5),
            )
            .await
            .with_context(|| format!("cannot give {} its peers", ra.name))?;
    }
    // Control nodes purge the edges' caches across the WAN too: control
    // node i sits in region i (cycling) and reaches each edge through a link
    // with the one-way delay between the two places.
    let mut control_edges = Vec::new();
    for i in 0..plan.control_addrs.len() {
        let home = &topology.regions[i % topology.regions.len()];
        let from = control_name(i as u8 + 1);
        let mut edges = Vec::new();
        for (ei, at) in topology.regions.iter().enumerate() {
            let to = format!("edge-{}", at.name);
            let delay = topology.rtt(&home.name, &at.name) / 2;
            let link = add_link(sup, ports, &from, &to, plan.edge_cluster_addrs[ei], delay).await?;
            edges.push(meridian_control::purge::ControlEdge { name: to, url: format!("https://{}", link.listen) });
            links.push(link);
        }
        control_edges.push(edges);
    }
    sup.world.lock().unwrap().links = links;

    let members: Vec<ControlMember> = plan
        .control_addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| ControlMember { name: control_name(i as u8 + 1), url: format!("https://{addr}") })
        .collect();
    for (i, m) in members.iter().enumerate() {
        let mut control_cfg = ControlConfig {
            listen: plan.control_addrs[i],
            data_dir: dir.join("data").join(&m.name),
            token_file: plan.token_file.clone(),
            tls: dev_tls(&plan.certs, &m.name),
            regions: topology
                .regions
                .iter()
                .zip(&region_addrs)
                .map(|(r, addr)| ControlRegion { name: r.name.clone(), url: format!("https://{addr}") })
                .collect(),
            reconcile_interval_ms: 1000,
            apps_domain: Some("localhost".into()),
            members: if members.len() > 1 { members.clone() } else { Vec::new() },
            raft_heartbeat_ms: 250,
            edges: control_edges[i].clone(),
        };
        drop(plan.control_holds[i].take());
        start_role(sup, &m.name, "control", &mut control_cfg, |c, l| c.listen = l.cluster.unwrap_or(c.listen)).await?;
    }
    let control_url = members.iter().map(|m| m.url.as_str()).collect::<Vec<_>>().join(",");
    sup.world.lock().unwrap().control_url = control_url.clone();
    // The control nodes elect a leader before the first change.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match operator.control(&control_url, Method::GET, "/v1/whoami", Bytes::new(), Duration::from_secs(5)).await {
            Ok((status, _)) if status.is_success() => break,
            answer if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("the control plane elected no leader within 30 s (last answer: {answer:?})")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    let policy = match a.policy {
        PolicyArg::Geo => Policy::Geo,
        PolicyArg::Latency => Policy::Latency,
    };
    let mut dns_edges = Vec::new();
    for (i, ((at, addr), targets)) in topology.regions.iter().zip(&plan.edge_addrs).zip(edge_targets).enumerate() {
        let name = format!("edge-{}", at.name);
        // Each edge also has an address of its own, as GeoDNS answers it.
        let own_ip = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, i as u8 + 1));
        let mut cfg = EdgeConfig {
            name: name.clone(),
            listen: *addr,
            also_listen_ips: vec![own_ip],
            cluster_listen: plan.edge_cluster_addrs[i],
            tls: dev_tls(&plan.certs, &name),
            https: Some(meridian_edge::https::HttpsConfig {
                listen: ports.take()?,
                certs_dir: plan.certs.join("sites"),
                reload_interval_ms: 1000,
            }),
            location: at.location,
            jurisdiction: Some(at.jurisdiction.clone()),
            policy,
            trust_client_geo_headers: true,
            geoip_db: a.geoip_db.clone(),
            regions: targets,
            health: HealthConfig { interval_ms: a.health_interval_ms, ..HealthConfig::default() },
            cache: meridian_edge::cache::CacheConfig {
                disk_dir: Some(dir.join("data").join(&name).join("cache")),
                ..Default::default()
            },
            retry_budget: Default::default(),
            max_retries: 2,
            upstream_timeout_ms: 30_000,
            first_byte_timeout_ms: 5_000,
            max_body_kb: 8 * 1024,
            workers: None,
        };
        drop(plan.edge_cluster_holds[i].take());
        start_role(sup, &name, "edge", &mut cfg, |c, l| {
            c.listen = l.public.unwrap_or(c.listen);
            c.cluster_listen = l.cluster.unwrap_or(c.cluster_listen);
            if let (Some(h), Some(addr)) = (c.https.as_mut(), l.https) {
                h.listen = addr;
            }
        })
        .await?;
        sup.world.lock().unwrap().edges.push(EdgeInfo {
            name,
            url: format!("http://{}", cfg.listen),
            cluster_url: format!("https://{}", cfg.cluster_listen),
            location: at.location,
            https_url: cfg.https.as_ref().map(|h| format!("https://localhost:{}", h.listen.port())),
        });
        dns_edges.push(meridian_geodns::DnsEdge {
            name: cfg.name.clone(),
            addresses: vec![own_ip],
            location: at.location,
            probe: cfg.listen,
        });
    }
    // GeoDNS for every app's <app>.localhost: each client gets the nearest
    // healthy edge's own address.
    let mut dns_cfg = meridian_geodns::DnsConfig {
        listen: ports.take()?,
        zones: vec!["localhost".into()],
        ttl: 5,
        geoip_db: a.geoip_db.clone(),
        probe_interval_ms: a.health_interval_ms,
        probe_timeout_ms: 1000,
        edges: dns_edges,
    };
    start_role(sup, "geodns", "dns", &mut dns_cfg, |c, l| c.listen = l.public.unwrap_or(c.listen)).await?;
    sup.world.lock().unwrap().dns = Some(dns_cfg.listen.to_string());
    let world = sup.world.lock().unwrap().clone();
    world.write(&dir)?;
    tracing::info!(elapsed = ?t0.elapsed(), "all processes serve");
    if a.no_deploy {
        return Ok(());
    }
    // Two apps, each chosen by its hostname: the example (also the default
    // for bare addresses, so `curl localhost:7400/hello` works) and notes.
    // With `--app`, that app alone, as the default.
    let mut apps: Vec<(PathBuf, bool)> = Vec::new();
    match &a.app {
        Some(d) => apps.push((d.clone(), true)),
        None => {
            let d = dir.join("example-app");
            for (rel, bytes) in EXAMPLE {
                let p = d.join(rel);
                std::fs::create_dir_all(p.parent().expect("files have a parent"))?;
                if *rel == "meridian.toml" {
                    std::fs::write(p, example_manifest(bytes, &plan_regions))?;
                } else {
                    std::fs::write(p, bytes)?;
                }
            }
            apps.push((d, true));
            let d = dir.join("notes-app");
            for (rel, bytes) in NOTES {
                let p = d.join(rel);
                std::fs::create_dir_all(p.parent().expect("files have a parent"))?;
                std::fs::write(p, bytes)?;
            }
            apps.push((d, false));
        }
    }
    for (app_dir, default) in &apps {
        let manifest = meridian_manifest::Bundle::from_dir(app_dir).map_err(|e| anyhow::anyhow!("{e}"))?.manifest;
        let new = meridian_control::NewApp { name: manifest.name.clone(), hosts: Vec::new(), default: *default };
        let record = crate::commands::apps::create(operator, &control_url, &new).await?;
        let report = crate::commands::deploy::deploy_dir(operator, &control_url, app_dir, false).await?;
        eprintln!("deployed {} version {} at {}", report.app, report.version.short(), record.hosts.join(", "));
    }
    // Ready means routable: every edge sees every region healthy.
    let deadline = Instant::now() + Duration::from_secs(60);
    for e in &world.edges {
        loop {
            let s = operator
                .node_ok(
                    &e.cluster_url,
                    Expect::new(&e.name, Role::Edge),
                    Method::GET,
                    meridian_core::headers::EDGE_STATUS_PATH,
                    Bytes::new(),
                    Duration::from_secs(2),
                )
                .await;
            let all = s
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| {
                    v["regions"].as_array().map(|rs| rs.iter().all(|r| r[1]["healthy"].as_bool() == Some(true)))
                })
                .unwrap_or(false);
            if all {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("{} does not see every region healthy after 60 s", e.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // An edge counts a region healthy while it catches up on some apps
    // (healthy for the others), so ask each region too: ready means every
    // app is active and caught up everywhere. Otherwise a link cut right
    // after start finds a region still pulling from its peers, and its
    // requests handed to a peer behind the cut.
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_millis(a.rejoin_bound_ms);
    for r in &world.regions {
        let path = format!("{}health", meridian_core::headers::RESERVED_PREFIX);
        loop {
            let answer = operator
                .node_ok(
                    &r.cluster_url,
                    Expect::new(&r.name, Role::Region),
                    Method::GET,
                    &path,
                    Bytes::new(),
                    Duration::from_secs(2),
                )
                .await;
            match answer {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    anyhow::bail!("{} is not serving every app (caught up) in time: {e:#}", r.name)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    Ok(())
}

fn print_summary(w: &WorldDescription, dir: &Path) {
    out!("\nMeridian dev world is up: {} regions, {} edges.\n", w.regions.len(), w.edges.len());
    out!("Edges (send users here):");
    for e in &w.edges {
        out!("  {:<22} {}  {}", e.name, e.url, e.https_url.as_deref().unwrap_or(""));
    }
    out!("\nRegions (direct, bypassing edges and links):");
    for r in &w.regions {
        out!("  {:<22} {}  [{}]", r.name, r.url, r.jurisdiction);
    }
    let controls: Vec<&str> = w.control_url.split(',').collect();
    out!("\nControl plane ({} nodes, any forwards to the leader):", controls.len());
    for (p, url) in w.processes.iter().filter(|p| p.role == "control").zip(&controls) {
        out!("  {:<22} {url}", p.name);
    }
    let e = &w.edges[0];
    out!("\nTry:");
    out!("  curl -i {}/hello -H 'x-meridian-client-country: DE'", e.url);
    out!("  curl -i {}/hello -H 'x-meridian-client-geo: 1.29,103.85'", e.url);
    let notes = e.url.replace("127.0.0.1", "notes.localhost");
    out!("  curl -X PUT --data 'hi' {notes}/kv/notes/first   # the second app, by host");
    if let Some(https) = &e.https_url {
        let ca = dir.join("certs").join("public-ca.pem");
        out!("  curl --cacert {} {https}/hello   # HTTPS (HTTP/2) with the world's public CA", ca.display());
    }
    if let Some(dns) = &w.dns {
        let (ip, port) = dns.rsplit_once(':').unwrap_or((dns, "53"));
        out!("  dig @{ip} -p {port} hello.localhost +short   # GeoDNS: the nearest healthy edge's address");
    }
    out!("  meridian status");
    out!("  meridian chaos kill eu-west      # then watch traffic move");
    out!("  meridian chaos kill control-1    # the control plane's leader: another takes over");
    out!("\nWorld description: {}", dir.join(meridian_core::world::WORLD_FILE).display());
    out!("Logs:              {}", dir.join("logs").display());
    out!("Ctrl-C stops every process.");
}
