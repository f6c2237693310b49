//! The trust boundary of a real world: nothing internal answers on a public
//! port; the cluster ports speak only mutual TLS with certificates from the
//! world's CA; what a caller may do, and which data it may receive, follows
//! from the name, role and jurisdiction its certificate carries; garbage on
//! any port harms nothing; certificates reload without a restart.

mod support;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INTERNAL: &[&str] = &[
    "/_meridian/health",
    "/_meridian/edge",
    "/_meridian/status",
    "/_meridian/apps/hello/active",
    "/_meridian/peers",
    "/_meridian/apps/hello/versions/0000000000000000000000000000000000000000000000000000000000000000",
    "/_meridian/metrics",
    "/_meridian/apps/hello/kv/status",
    "/_meridian/apps/hello/kv/op",
    "/_meridian/apps/hello/kv/digest/sessions",
    "/_meridian/apps/hello/repl/push",
    "/_meridian/apps/hello/repl/stream",
    "/_meridian/apps/hello/repl/bucket/profiles/0",
    "/_meridian/apps/hello/raft/ledger/vote",
];

/// Sends one HTTP/1.1 request over TLS with `cfg`; the response's first
/// line, or why there was none.
async fn raw_tls_request(addr: &str, cfg: Arc<rustls::ClientConfig>, name: &str) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    let io = async {
        let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| e.to_string())?;
        tls.write_all(b"GET /_meridian/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        match text.lines().next() {
            Some(l) if !l.is_empty() => Ok(l.to_string()),
            _ => Err("closed without an answer".to_string()),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), io).await.map_err(|_| "timed out".to_string())?
}

fn roots(ca: &std::path::Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that trusts the world's CA but presents no certificate.
fn anonymous(w: &World) -> Arc<rustls::ClientConfig> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&w.dir.path().join("certs/ca.pem")))
        .with_no_client_auth();
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_paths_answer_404_on_every_public_port() {
    let w = World::start(&[]);
    let c = client();
    let mut publics: Vec<String> = w.desc.edges.iter().map(|e| e.url.clone()).collect();
    publics.extend(w.desc.regions.iter().map(|r| r.url.clone()));
    for base in &publics {
        for path in INTERNAL {
            for method in ["GET", "POST", "PUT"] {
                let r = request(&c, method, &format!("{base}{path}"), &[], "x").await.unwrap();
                assert_eq!(r.status, 404, "{method} {base}{path}: {}", r.body);
            }
        }
    }
    // A public request cannot pretend a region forwarded it: the example
    // still answers it normally.
    let r = get(&c, &format!("{}/hello", w.edge("edge-eu-west")), &[("x-meridian-forwarded", "us-east")]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ports_refuse_clients_without_a_certificate_or_from_another_ca() {
    let w = World::start(&[]);
    // Another cluster's CA issues a certificate with a perfectly valid name.
    let other = tempfile::tempdir().unwrap();
    let other_ca = meridian_trust::init_ca(other.path(), "other", 1).unwrap();
    let op = meridian_trust::Identity::new("operator", meridian_trust::Role::Operator, None).unwrap();
    meridian_trust::issue(&other_ca, &op, other.path(), 1).unwrap();
    let mut foreign = meridian_trust::TlsFiles::in_dir(other.path(), "operator");
    // It trusts our CA (so the server's certificate checks out); only the
    // client's own certificate is foreign.
    foreign.ca = w.dir.path().join("certs/ca.pem");
    let foreign = meridian_trust::Tls::load(foreign).unwrap().client_config();
    let ours = w.client_as("operator").tls().client_config();

    let mut ports: Vec<(String, String)> =
        w.desc.regions.iter().map(|r| (addr_of(&r.cluster_url), format!("{}.region.meridian", r.name))).collect();
    ports.extend(w.desc.edges.iter().map(|e| (addr_of(&e.cluster_url), format!("{}.edge.meridian", e.name))));
    for (addr, name) in &ports {
        // With the world's certificate, the port answers.
        let ok = raw_tls_request(addr, ours.clone(), name).await;
        assert!(ok.as_deref().is_ok_and(|l| l.starts_with("HTTP/1.1 ")), "{addr}: {ok:?}");
        let e = raw_tls_request(addr, anonymous(&w), name).await;
        assert!(e.is_err(), "{addr} answered a client without a certificate: {e:?}");
        let e = raw_tls_request(addr, foreign.clone(), name).await;
        assert!(e.is_err(), "{addr} answered a certificate from another CA: {e:?}");
        // Plain HTTP gets no HTTP answer at all.
        let r = request(&client(), "GET", &format!("http://{addr}/_meridian/health"), &[], "").await;
        assert!(r.is_err(), "{addr} answered plain HTTP: {:?}", r.map(|r| r.status));
    }
    // The control plane takes operators by token, but a certificate from
    // another CA is still refused.
    let control = addr_of(w.desc.control_url.split(',').next().unwrap());
    let e = raw_tls_request(&control, foreign, "control.control.meridian").await;
    assert!(e.is_err(), "the control plane answered a certificate from another CA: {e:?}");
    // And the world's own CLI works through all of it.
    let (ok, out) = w.cli(&["status"]);
    assert!(ok && out.contains("healthy"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_come_from_certificates_an_edge_cannot_replicate_or_vote() {
    let w = World::start(&[]);
    let edge_only = [
        ("POST", "/_meridian/apps/hello/repl/push"),
        ("POST", "/_meridian/apps/hello/repl/stream"),
        ("GET", "/_meridian/apps/hello/repl/bucket/sessions/0"),
        ("POST", "/_meridian/apps/hello/raft/ledger/vote"),
        ("POST", "/_meridian/apps/hello/raft/ledger/append"),
        ("POST", "/_meridian/apps/hello/kv/op"),
        ("PUT", "/_meridian/peers"),
        ("PUT", "/_meridian/apps/hello/active"),
        ("GET", "/_meridian/apps/hello/kv/status"),
    ];
    for (method, path) in edge_only {
        let (status, body) = w.region_call_as("edge-eu-west", "eu-west", method, path, b"{}".to_vec()).await.unwrap();
        assert_eq!(status, 403, "an edge called {method} {path}: {body}");
    }
    // The control plane installs versions but does not replicate or vote.
    for (method, path) in
        [("POST", "/_meridian/apps/hello/repl/push"), ("POST", "/_meridian/apps/hello/raft/ledger/vote")]
    {
        let (status, body) = w.region_call_as("control-1", "eu-west", method, path, b"{}".to_vec()).await.unwrap();
        assert_eq!(status, 403, "the control plane called {path}: {body}");
    }
    // A region may not speak Raft for another member: us-east's certificate
    // carrying a vote request in eu-west's name (node 2 of the ledger group:
    // node ids are positions in the manifest's list, from 1).
    let vote = serde_json::json!({
        "vote": {"leader_id": {"term": 99, "node_id": 2}, "committed": false},
        "last_log_id": null
    });
    let (status, body) = w
        .region_call_as(
            "us-east",
            "ap-southeast",
            "POST",
            "/_meridian/apps/hello/raft/ledger/vote",
            vote.to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    // The same message in its own name is answered (here: refused by Raft
    // itself for its stale log, but heard).
    let own = vote.to_string().replace("\"node_id\":2", "\"node_id\":1");
    let (status, body) = w
        .region_call_as("us-east", "ap-southeast", "POST", "/_meridian/apps/hello/raft/ledger/vote", own.into_bytes())
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // An edge still reaches the app and the health probe (answered: 200,
    // or 503 while an app there is still catching up after the start).
    let (status, body) = w.region_call_as("edge-eu-west", "eu-west", "GET", "/_meridian/health", vec![]).await.unwrap();
    assert!(status == 200 || (status == 503 && body.contains("\"catching_up\"")), "{status} {body}");
    let (status, body) = w.region_call_as("edge-eu-west", "eu-west", "GET", "/hello", vec![]).await.unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_issued_for_us_never_receives_an_eu_namespace_whatever_it_claims() {
    let w = World::start(&[]);
    let c = client();
    let eu = w.region_url("eu-west");
    for k in 0..5 {
        let r = request(&c, "PUT", &format!("{eu}/kv/profiles/p{k}"), &[], &format!("EUSECRET-{k}")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // 1. Pulling: us-east's certificate asks eu-west for EU buckets and
    //    digests, claiming in a header to be eu-west.
    let client = w.client_as("us-east");
    let r = w.desc.regions.iter().find(|r| r.name == "eu-west").unwrap();
    let target =
        meridian_http::cluster::Target::from_url(&r.cluster_url, meridian_trust::Expect::region("eu-west", "eu"))
            .unwrap();
    for i in 0..16 {
        let a = client
            .call_with(
                &target,
                http::Method::GET,
                &format!("/_meridian/apps/hello/repl/bucket/profiles/{i}"),
                &[("x-meridian-peer", "eu-west")],
                Default::default(),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 403);
        assert!(!a.body.windows(8).any(|w| w == b"EUSECRET"), "bucket {i} leaked EU data");
    }
    let (status, _) = w
        .region_call_as("us-east", "eu-west", "GET", "/_meridian/apps/hello/kv/digest/profiles", vec![])
        .await
        .unwrap();
    assert_eq!(status, 403);
    // 2. Being pushed to: eu-west is told (by an operator's mistake, or an
    //    attacker with the peers API) that us-east is in the EU.
    let mut peers: Vec<serde_json::Value> = {
        let cfg = std::fs::read_to_string(w.dir.path().join("config/eu-west.toml")).unwrap();
        let v: toml::Value = toml::from_str(&cfg).unwrap();
        v["peers"].as_array().unwrap().iter().map(|p| serde_json::to_value(p).unwrap()).collect()
    };
    for p in &mut peers {
        if p["name"] == "us-east" {
            p["jurisdiction"] = "eu".into();
        }
    }
    let (status, body) = w.region_call("eu-west", "PUT", "/_meridian/peers", serde_json::to_vec(&peers).unwrap()).await;
    assert_eq!(status, 200, "{body}");
    for k in 5..10 {
        let r = request(&c, "PUT", &format!("{eu}/kv/profiles/p{k}"), &[], &format!("EUSECRET-{k}")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Replication to us-east now fails at the handshake, naming why.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = w.region_call("eu-west", "GET", "/_meridian/apps/hello/kv/status", vec![]).await;
        let s: serde_json::Value = serde_json::from_str(&body).unwrap();
        let us = s["peers"].as_array().unwrap().iter().find(|p| p["peer"] == "us-east").cloned().unwrap();
        if us["last_error"].as_str().is_some_and(|e| e.contains("issued for \"us\"")) {
            break;
        }
        assert!(Instant::now() < deadline, "no handshake failure reported: {us}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // us-east's disk holds nothing of the EU namespace; the search works
    // (eu-west's disk has it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let found = files_containing(&w.dir.path().join("data/us-east"), b"EUSECRET");
    assert!(found.is_empty(), "EU data on us-east's disk: {found:?}");
    assert!(!files_containing(&w.dir.path().join("data/eu-west"), b"EUSECRET-9").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_tls_on_every_port_harm_nothing() {
    let w = World::start(&[]);
    let mut ports: Vec<String> = Vec::new();
    for e in &w.desc.edges {
        ports.push(addr_of(&e.url));
        ports.push(addr_of(&e.cluster_url));
    }
    for r in &w.desc.regions {
        ports.push(addr_of(&r.url));
        ports.push(addr_of(&r.cluster_url));
    }
    ports.extend(w.desc.control_url.split(',').map(addr_of));
    // A TLS 1.3 ClientHello's first bytes, cut off; a record header that
    // promises 16 KiB and stops; random bytes; an HTTP request with a
    // gigantic header.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = vec![0u8; 4096];
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let payloads: Vec<Vec<u8>> = vec![
        vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03],
        vec![0x16, 0x03, 0x03, 0x40, 0x00, 0xde, 0xad],
        random,
        format!("GET / HTTP/1.1\r\nx-big: {}\r\n", "a".repeat(200_000)).into_bytes(),
    ];
    for addr in &ports {
        for p in &payloads {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                let _ = s.write_all(p).await;
                let _ = s.shutdown().await;
                let mut sink = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut sink)).await;
            }
        }
    }
    // Every process still runs and the world still serves.
    for p in &w.desc.processes {
        let pid = w.pid_of(&p.name).unwrap();
        // SAFETY: signal 0 only checks that the process exists.
        assert_eq!(unsafe { libc::kill(pid as i32, 0) }, 0, "{} died", p.name);
    }
    let c = client();
    for e in &w.desc.edges {
        let r = get(&c, &format!("{}/hello", e.url), &[]).await;
        assert_eq!(r.status, 200, "{}: {}", e.name, r.body);
    }
    let (ok, out) = w.cli(&["status"]);
    assert!(ok && out.contains("healthy"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reissued_certificate_is_served_without_a_restart() {
    let w = World::start(&[]);
    let certs = w.dir.path().join("certs");
    let pid = w.pid_of("eu-west").unwrap();
    let served = || async {
        let tcp = tokio::net::TcpStream::connect(addr_of(&w.region_cluster_url("eu-west"))).await.unwrap();
        let cfg = w.client_as("operator").tls().client_config();
        let name = ServerName::try_from("eu-west.region.meridian").unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let pem_der = || CertificateDer::from_pem_file(certs.join("eu-west.pem")).unwrap().to_vec();
    assert_eq!(served().await, pem_der());
    let ca = meridian_trust::CaFiles::in_dir(&certs);
    let id = meridian_trust::Identity::new("eu-west", meridian_trust::Role::Region, Some("eu")).unwrap();
    meridian_trust::issue(&ca, &id, &certs, 30).unwrap();
    let new = pem_der();
    let deadline = Instant::now() + Duration::from_secs(10);
    while served().await != new {
        assert!(Instant::now() < deadline, "eu-west still serves its old certificate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(w.pid_of("eu-west"), Some(pid), "eu-west was restarted");
    // Replication to and from it goes on with the new certificate.
    let c = client();
    let r =
        request(&c, "PUT", &format!("{}/kv/sessions/after-reissue", w.region_url("eu-west")), &[], "v").await.unwrap();
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(&c, &format!("{}/kv/sessions/after-reissue", w.region_url("us-east")), &[]).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "a write in eu-west did not reach us-east after the reissue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
