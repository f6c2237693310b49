//! A region still catching up after it opened hands the requests that reach
//! it anyway to its nearest peer. When that peer stops answering without
//! closing (a black-holed link), an idempotent request costs at most one
//! first-byte wait before the next peer answers it — not the 30 s a
//! forwarded request may take.
//!
//! Three regions in one process, with the catching-up region's links to its
//! peers through `meridian-netem`: `a` (the one catching up), `b` (nearest,
//! black-holed once `a` caught up with it) and `c` (far, slow enough that
//! `a`'s round with it keeps `a` catching up while the request arrives).

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use meridian_http::{ClientAuth, Handler, Transport};
use meridian_manifest::Bundle;
use meridian_netem::{Link, LinkState};
use meridian_region::{AppRecord, Peer, Region, RegionConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MANIFEST: &str = r#"
[app]
name = "shop"

[[routes]]
path = "/"
static = "static"

[kv.carts]
mode = "global"
"#;

/// What a forwarded idempotent request waits for a peer's head before it
/// tries the next (the region's `FORWARD_FIRST_BYTE`; the app has no
/// functions, so no longer deadline applies).
const FIRST_BYTE: Duration = Duration::from_secs(5);

fn bundle(dir: &Path) -> Bundle {
    std::fs::create_dir_all(dir.join("static")).unwrap();
    std::fs::write(dir.join("meridian.toml"), MANIFEST).unwrap();
    std::fs::write(dir.join("static/index.html"), "shop front").unwrap();
    Bundle::from_dir(dir).unwrap()
}

fn config(root: &Path, name: &str, peers: Vec<Peer>) -> RegionConfig {
    let certs = root.join("certs");
    let ca = meridian_trust::ensure_ca(&certs, "test", 1).unwrap();
    let id = meridian_trust::Identity::new(name, meridian_trust::Role::Region, Some("eu")).unwrap();
    meridian_trust::issue(&ca, &id, &certs, 1).unwrap();
    RegionConfig {
        name: name.into(),
        public_listen: "127.0.0.1:0".parse().unwrap(),
        cluster_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: root.join(name),
        tls: meridian_trust::TlsFiles::in_dir(&certs, name),
        cluster_key_file: ca.cluster_key.clone(),
        max_instances: 4,
        max_instances_per_app: None,
        max_memory_mb: 64,
        pooling: Default::default(),
        max_bundle_mb: 16,
        peers,
        // Only the rejoin rounds talk to peers here.
        anti_entropy_ms: 600_000,
        causality_wait_ms: 100,
        rejoin_bound_ms: 60_000,
    }
}

/// Serves `region`'s cluster port (mutual TLS) and, if asked, its public
/// port; returns their addresses.
async fn serve(region: &Arc<Region>, public: bool) -> (std::net::SocketAddr, Option<std::net::SocketAddr>) {
    let r = region.clone();
    let cluster: Handler = Arc::new(move |req, _| {
        let r = r.clone();
        Box::pin(async move { r.handle_cluster(req).await })
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cluster_addr = l.local_addr().unwrap();
    let tls = Transport::Tls(region.tls.clone(), ClientAuth::Required);
    tokio::spawn(meridian_http::serve(l, cluster, tls, std::future::pending(), Duration::from_secs(1)));
    if !public {
        return (cluster_addr, None);
    }
    let r = region.clone();
    let handler: Handler = Arc::new(move |req, _| {
        let r = r.clone();
        Box::pin(async move { r.handle_public(req).await })
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public_addr = l.local_addr().unwrap();
    tokio::spawn(meridian_http::serve(l, handler, Transport::Plain, std::future::pending(), Duration::from_secs(1)));
    (cluster_addr, Some(public_addr))
}

async fn deploy(region: &Region, b: &Bundle) {
    region.put_app(AppRecord { name: "shop".into(), hosts: vec!["shop.test".into()], default: true }).await.unwrap();
    let app = region.app("shop").unwrap();
    region.install(&app, &b.id, Bytes::from(b.to_tar())).await.unwrap();
    region.activate(&app, &b.id).unwrap();
}

fn peer(name: &str, link: &Link, rtt_ms: f64) -> Peer {
    Peer { name: name.into(), url: format!("https://{}", link.listen), jurisdiction: "eu".into(), rtt_ms }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catching_up_region_whose_nearest_peer_is_black_holed_forwards_within_one_first_byte_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let b = bundle(&tmp.path().join("bundle"));
    let mut far = Vec::new();
    for name in ["b", "c"] {
        let region = Region::open(config(tmp.path(), name, Vec::new())).await.unwrap();
        deploy(&region, &b).await;
        let (cluster, _) = serve(&region, false).await;
        far.push((region, cluster));
    }
    // b is next door; c is 300 ms away each way, so a's round with it
    // takes seconds (a connection, then each exchange of the round).
    let to_b = Link::start("a->b", "127.0.0.1:0".parse().unwrap(), far[0].1, Duration::from_millis(1)).await.unwrap();
    let to_c = Link::start("a->c", "127.0.0.1:0".parse().unwrap(), far[1].1, Duration::from_millis(300)).await.unwrap();
    let peers = vec![peer("b", &to_b, 2.0), peer("c", &to_c, 600.0)];
    let a = Region::open(config(tmp.path(), "a", peers)).await.unwrap();
    let (_, public) = serve(&a, true).await;
    deploy(&a, &b).await;
    let kv = a.app("shop").unwrap().kv().expect("the app has a namespace");

    // a has caught up with b (a pooled connection to b is left open) and
    // is still busy with c...
    let t = Instant::now();
    while !kv.rejoin.status().caught_up_with.contains(&"b".to_string()) {
        assert!(t.elapsed() < Duration::from_secs(10), "never caught up with b: {:?}", kv.rejoin.status());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...when b's link turns into a black hole: connections stay open,
    // nothing comes back.
    to_b.set_state(LinkState::Partitioned);
    assert!(kv.rejoin.catching_up(), "a finished catching up too soon for the test: {:?}", kv.rejoin.status());

    let client = meridian_http::client(Duration::from_secs(2));
    let req = Request::get(format!("http://{}/", public.unwrap()))
        .header("host", "shop.test")
        .body(meridian_http::empty())
        .unwrap();
    let t = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(40), client.request(req))
        .await
        .expect("no answer within 40 s")
        .unwrap();
    let took = t.elapsed();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    eprintln!("answered {} by {:?} after {took:?}", parts.status, parts.headers.get("x-meridian-region"));
    assert_eq!(parts.status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], b"shop front");
    assert_eq!(parts.headers["x-meridian-region"], "c", "served by the far peer, b being unreachable");
    // One first-byte wait for b, then c's answer (a connection and one
    // exchange over 300 ms links, with room for a loaded machine).
    assert!(took < FIRST_BYTE + Duration::from_secs(4), "the request waited {took:?}");
}
