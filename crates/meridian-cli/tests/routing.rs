//! Users are served by the nearest region, through any edge.

mod support;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_served_by_the_region_nearest_to_them() {
    let w = World::start(&[]);
    let c = client();
    let places = [
        ("48.86,2.35", "eu-west"),         // Paris
        ("52.52,13.40", "eu-west"),        // Berlin
        ("35.68,139.69", "ap-southeast"),  // Tokyo
        ("-33.87,151.21", "ap-southeast"), // Sydney
        ("41.88,-87.63", "us-east"),       // Chicago
        ("-23.55,-46.63", "us-east"),      // Sao Paulo
    ];
    for edge in &w.desc.edges {
        for (geo, want) in places {
            let r = get(&c, &format!("{}/hello", edge.url), &[("x-meridian-client-geo", geo)]).await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.region(), want, "client at {geo} via {}", edge.name);
            assert_eq!(r.body, format!("Hello from {want}!\n"));
            assert_eq!(r.header("x-meridian-edge"), edge.name);
            assert_eq!(r.header("x-meridian-version").len(), 12);
        }
    }
    for (country, want) in [
        ("DE", "eu-west"),
        ("ie", "eu-west"),
        ("SG", "ap-southeast"),
        ("JP", "ap-southeast"),
        ("US", "us-east"),
        ("MX", "us-east"),
    ] {
        let r = get(&c, &format!("{}/hello", w.edge("edge-us-east")), &[("x-meridian-client-country", country)]).await;
        assert_eq!(r.region(), want, "client in {country}");
    }
    // Without location headers a client is assumed near the edge it reached.
    for (edge, want) in
        [("edge-eu-west", "eu-west"), ("edge-ap-southeast", "ap-southeast"), ("edge-us-east", "us-east")]
    {
        assert_eq!(get(&c, &format!("{}/hello", w.edge(edge)), &[]).await.region(), want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_assets_functions_and_http2_work_through_the_edge() {
    let w = World::start(&[]);
    let c = client();
    let edge = w.edge("edge-eu-west");
    let r = get(&c, &format!("{edge}/"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/html; charset=utf-8");
    assert!(r.body.contains("Served from the nearest region"));
    let etag = r.header("etag");
    assert_eq!(get(&c, &format!("{edge}/"), &[("if-none-match", &etag)]).await.status, 304);
    assert_eq!(get(&c, &format!("{edge}/style.css"), &[]).await.header("content-type"), "text/css; charset=utf-8");
    assert_eq!(get(&c, &format!("{edge}/../../etc/passwd"), &[]).await.status / 100, 4);
    assert_eq!(get(&c, &format!("{edge}/%2e%2e/%2e%2e/etc/passwd"), &[]).await.status, 400);

    let r = request(&c, "POST", &format!("{edge}/echo/x?y=1"), &[("x-test", "42")], "payload").await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("POST /echo/x?y=1\n"), "{}", r.body);
    assert!(r.body.contains("x-test: 42"), "{}", r.body);
    assert!(r.body.ends_with("\npayload"), "{}", r.body);

    // h2c with prior knowledge.
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let r = get(&h2, &format!("{edge}/hello"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.region(), "eu-west");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_policy_follows_measured_round_trips() {
    let w = World::start(&["--policy", "latency"]);
    let c = client();
    let edge = w.edge("edge-eu-west");
    // The client claims to be in Tokyo, but this policy ignores where the
    // client is and picks the lowest probed round trip from the edge.
    let tokyo = [("x-meridian-client-geo", "35.68,139.69")];
    assert_eq!(get(&c, &format!("{edge}/hello"), &tokyo).await.region(), "eu-west");
    // Make the local link slower than the transatlantic one (67 ms RTT).
    w.chaos(&["latency", "edge-eu-west", "eu-west", "150"]);
    let t = std::time::Instant::now();
    loop {
        let r = get(&c, &format!("{edge}/hello"), &tokyo).await;
        assert_eq!(r.status, 200);
        if r.region() == "us-east" {
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "still on {} after 10 s", r.region());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    w.chaos(&["latency", "edge-eu-west", "eu-west", "0.5"]);
    let t = std::time::Instant::now();
    while get(&c, &format!("{edge}/hello"), &tokyo).await.region() != "eu-west" {
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
