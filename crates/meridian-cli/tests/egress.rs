//! Guests reach only what their manifest lists: a listed loopback test
//! server works; an unlisted port, the region's own ports, a listed name that
//! resolves to loopback, and cloud metadata do not; a response body past the
//! cap fails. (No traffic leaves loopback: refused addresses are refused
//! before any connection is made.)

mod support;
use std::time::Duration;
use support::*;

/// A loopback server: `/` answers "hi from upstream", `/big` 17 MiB.
async fn upstream() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let body = if req.uri().path() == "/big" {
                        bytes::Bytes::from(vec![b'x'; 17 << 20])
                    } else {
                        bytes::Bytes::from_static(b"hi from upstream")
                    };
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_reaches_only_listed_hosts_and_never_the_nodes_own_ports() {
    let w = World::start(&[]);
    let listed = upstream().await;
    let unlisted = upstream().await;
    let us = w.desc.regions.iter().find(|r| r.name == "us-east").unwrap().clone();
    let port_of = |url: &str| url.rsplit(':').next().unwrap().trim_end_matches('/').to_string();
    let (own_public, own_cluster) = (port_of(&us.url), port_of(&us.cluster_url));

    let app = single_component_app(
        "fetch.wasm",
        &format!(
            r#"[app]
name = "fetcher"
[components.f]
source = "c/fetch.wasm"
deadline_ms = 10000
allowed_outbound_hosts = [
  "http://127.0.0.1:{listed}",
  "http://localhost:{listed}",
  "http://127.0.0.1:{own_public}",
  "http://127.0.0.1:{own_cluster}",
  "https://127.0.0.1:{own_cluster}",
]
[[routes]]
path = "/fetch"
component = "f"
"#
        ),
    );
    let (ok, out) = w.create_and_deploy(app.path(), true);
    assert!(ok, "{out}");

    let c = client();
    let fetch = |url: String| {
        let c = c.clone();
        let base = us.url.clone();
        async move { get(&c, &format!("{base}/fetch?url={url}"), &[]).await }
    };
    // Listed by IP: reachable.
    let r = fetch(format!("http://127.0.0.1:{listed}/")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "upstream 200\nhi from upstream"));
    // Not listed: HTTP-request-denied (15).
    let r = fetch(format!("http://127.0.0.1:{unlisted}/")).await;
    assert_eq!((r.status, r.body.trim()), (502, "error-code 15"));
    // Cloud metadata, never listed: denied before any connection.
    let r = fetch("http://169.254.169.254/latest/meta-data/".into()).await;
    assert_eq!((r.status, r.body.trim()), (502, "error-code 15"));
    // Listed by a name that resolves to loopback: destination-IP-prohibited (4).
    let r = fetch(format!("http://localhost:{listed}/")).await;
    assert_eq!((r.status, r.body.trim()), (502, "error-code 4"));
    // The region's own ports, even listed: prohibited.
    for url in [
        format!("http://127.0.0.1:{own_public}/kv/sessions/x"),
        format!("http://127.0.0.1:{own_cluster}/_meridian/kv/status"),
        format!("https://127.0.0.1:{own_cluster}/_meridian/kv/status"),
    ] {
        let r = fetch(url.clone()).await;
        assert_eq!((r.status, r.body.trim()), (502, "error-code 4"), "{url}");
    }
    // A body past the 16 MiB cap fails the read.
    let r = fetch(format!("http://127.0.0.1:{listed}/big")).await;
    assert_eq!(r.status, 502, "{}", &r.body[..r.body.len().min(200)]);
    assert!(r.body.starts_with("body error after"), "{}", &r.body[..r.body.len().min(200)]);
    // And the region is fine.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = fetch(format!("http://127.0.0.1:{listed}/")).await;
    assert_eq!(r.status, 200);
}
