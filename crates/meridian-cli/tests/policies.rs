//! Each app's `[routing]` at the edges: weighted splits, session affinity,
//! residency rules that never send a jurisdiction's clients abroad, and a
//! black-holed region that costs a request one first-byte timeout at most,
//! while a slow function is waited for as long as its deadline allows.

mod support;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

fn deploy(w: &World, manifest: &str) -> tempfile::TempDir {
    let app = single_component_app("hello.wasm", manifest);
    let (ok, out) = w.create_and_deploy(app.path(), false);
    assert!(ok, "deploy failed: {out}");
    app
}

/// Waits until the edges have learned the app's routing from the regions'
/// health answers (probes every 100 ms here).
async fn learned(w: &World, host: &str, country: &str, want: impl Fn(&str) -> bool) {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    for e in &w.desc.edges {
        loop {
            let r =
                get(&c, &format!("{}/hello", e.url), &[("host", host), ("x-meridian-client-country", country)]).await;
            if want(&r.region()) {
                break;
            }
            assert!(Instant::now() < deadline, "{} never routed {host} as its manifest says", e.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_lands_within_two_percent_and_affinity_keeps_a_client_on_its_region() {
    let w = World::start(&[]);
    deploy(
        &w,
        r#"
[app]
name = "split"
[components.hello]
source = "c/hello.wasm"
[[routes]]
path = "/hello"
component = "hello"
[routing]
policy = "weighted"
weights = { us-east = 90, eu-west = 10 }
"#,
    );
    deploy(
        &w,
        r#"
[app]
name = "sticky"
[components.hello]
source = "c/hello.wasm"
[[routes]]
path = "/hello"
component = "hello"
[routing]
policy = "weighted"
weights = { us-east = 50, eu-west = 50 }
affinity = true
"#,
    );
    // ap-southeast has no weight: it never serves while the others are up.
    learned(&w, "split.localhost", "SG", |r| r != "ap-southeast").await;

    // --- 10,000 requests, 16 at a time, through the US edge -------------
    let edge = w.edge("edge-us-east");
    let counts = Arc::new(Mutex::new(BTreeMap::<String, u32>::new()));
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (edge, counts, next) = (edge.clone(), counts.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            while next.fetch_add(1, Ordering::Relaxed) < 10_000 {
                let r = get(&c, &format!("{edge}/hello"), &[("host", "split.localhost")]).await;
                assert_eq!(r.status, 200, "{}", r.body);
                *counts.lock().unwrap().entry(r.region()).or_default() += 1;
            }
        }));
    }
    for h in workers {
        h.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    let total: u32 = counts.values().sum();
    assert_eq!(total, 10_000);
    let us = f64::from(counts.get("us-east").copied().unwrap_or(0)) / 100.0;
    assert!((88.0..=92.0).contains(&us), "us-east got {us:.2} % (want 90 +- 2): {counts:?}");
    assert_eq!(counts.get("ap-southeast"), None, "{counts:?}");

    // --- affinity: a client keeps the region that first served it --------
    let c = client();
    let mut first_regions = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let first = get(&c, &format!("{edge}/hello"), &[("host", "sticky.localhost")]).await;
        let cookie = first.header("set-cookie");
        assert!(cookie.starts_with(&format!("meridian-region={};", first.region())), "{cookie:?}");
        let cookie = cookie.split(';').next().unwrap().to_string();
        first_regions.insert(first.region());
        for _ in 0..25 {
            let r = get(&c, &format!("{edge}/hello"), &[("host", "sticky.localhost"), ("cookie", &cookie)]).await;
            assert_eq!(r.region(), first.region(), "the client moved");
            assert!(r.header("set-cookie").is_empty(), "nothing to change");
        }
    }
    // New clients still spread over both (8 draws of 50/50: all on one
    // side has probability 1/128).
    assert_eq!(first_regions.len(), 2, "{first_regions:?}");
}

/// Stored in the EU namespace; looked for on every edge's disk.
const SECRET: &str = "eu-only-7f3a9c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eu_clients_are_served_only_by_eu_regions_and_eu_data_is_stored_only_by_eu_edges() {
    let w = World::start(&[]);
    let app = single_component_app(
        "kv.wasm",
        r#"
[app]
name = "gdpr"
[components.kv]
source = "c/kv.wasm"
[[routes]]
path = "/kv"
component = "kv"
cache_control = "public, max-age=60"
[kv.profiles]
mode = "regional"
jurisdiction = "eu"
[kv.prefs]
mode = "global"
[routing]
[[routing.residency]]
clients = "eu"
regions = "eu"
"#,
    );
    let (ok, out) = w.create_and_deploy(app.path(), false);
    assert!(ok, "deploy failed: {out}");
    let host = "gdpr.localhost";
    let c = client();
    let put = |edge: String, path: &'static str, value: &'static str| {
        let c = c.clone();
        async move {
            let r = request(&c, "PUT", &format!("{edge}{path}"), &[("host", host)], value).await.unwrap();
            assert!(r.status < 300, "{}", r.body);
        }
    };
    put(w.edge("edge-eu-west"), "/kv/profiles/alice", SECRET).await;
    put(w.edge("edge-eu-west"), "/kv/prefs/alice", "dark mode").await;
    // Edges learn the rule from the regions: every edge then sends an EU
    // client to eu-west, however near another region is.
    learned(&w, host, "FR", |r| r == "eu-west").await;

    // --- an EU-heavy workload through every edge --------------------------
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for e in &w.desc.edges {
        for (country, path) in [("FR", "/kv/profiles/alice"), ("DE", "/kv/prefs/alice"), ("US", "/kv/profiles/alice")] {
            let (url, stop) = (format!("{}{path}", e.url), stop.clone());
            workers.push(tokio::spawn(async move {
                let c = client();
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = get(&c, &url, &[("host", host), ("x-meridian-client-country", country)]).await;
                    seen.push((country, r.status, r.region(), r.header("x-meridian-residency")));
                }
                seen
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut n = 0;
    for h in workers {
        for (country, status, region, residency) in h.await.unwrap() {
            n += 1;
            assert_eq!(status, 200);
            if country != "US" {
                assert_eq!(region, "eu-west", "an EU client was served by {region}");
            }
            assert!(residency.is_empty(), "the residency mark is the edges' own, not the clients'");
        }
    }
    assert!(n > 100, "only {n} requests");
    // The answers that read EU data: stored at the EU edge, at no other —
    // in memory or on disk.
    for e in &w.desc.edges {
        let disk = w.dir.path().join("data").join(&e.name).join("cache");
        let found = files_containing(&disk, SECRET.as_bytes());
        if e.name == "edge-eu-west" {
            assert!(!found.is_empty(), "the scan finds EU data where it may be ({})", disk.display());
        } else {
            assert!(found.is_empty(), "{} wrote EU data to its disk: {found:?}", e.name);
        }
    }
    for e in &w.desc.edges {
        let s = w.edge_status(&e.name).await;
        let objects = s["cache"]["objects"].as_u64().unwrap();
        if e.name == "edge-eu-west" {
            assert!(objects >= 2, "{}: {s}", e.name);
        } else {
            // Only the global namespace's answer (DE clients are pinned to
            // EU regions, so non-EU edges store nothing of theirs either).
            assert_eq!(objects, 0, "{} stored EU answers: {s}", e.name);
        }
    }

    // --- a write forgets the stored answer for its URL (RFC 9111 4.4), ---
    // --- the copies kept apart for pinned clients included ------------------
    let eu = [("host", host), ("x-meridian-client-country", "FR")];
    let url = format!("{}/kv/profiles/alice", w.edge("edge-eu-west"));
    let r = get(&c, &url, &eu).await;
    assert!(r.body.contains(SECRET) && r.header("x-meridian-cache") == "HIT", "{:?} {}", r.headers, r.body);
    let r = request(&c, "PUT", &url, &eu, "eu-only-rotated").await.unwrap();
    assert!(r.status < 300, "{}", r.body);
    let r = get(&c, &url, &eu).await;
    assert!(r.body.contains("eu-only-rotated"), "an EU client read the answer stored before its write: {}", r.body);

    // --- the only EU region down: a clear error, never a move abroad ------
    w.chaos(&["kill", "eu-west"]);
    for e in &w.desc.edges {
        for path in ["/kv/prefs/alice", "/kv/profiles/bob"] {
            let r = get(&c, &format!("{}{path}", e.url), &[("host", host), ("x-meridian-client-country", "IE")]).await;
            assert!(r.region().is_empty() || r.region() == "eu-west", "served abroad by {}", r.region());
            if r.status == 200 {
                // Cached earlier from eu-west at the EU edge.
                assert_eq!((e.name.as_str(), r.header("x-meridian-cache").as_str()), ("edge-eu-west", "HIT"));
                continue;
            }
            assert_eq!(r.status, 503, "{}: {}", e.name, r.body);
            assert!(r.body.contains("residency rule") && r.body.contains("jurisdiction eu"), "{}", r.body);
        }
        // Clients elsewhere are still served.
        let r =
            get(&c, &format!("{}/kv/prefs/alice", e.url), &[("host", host), ("x-meridian-client-country", "US")]).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_region_costs_a_request_at_most_one_first_byte_timeout_and_a_retry() {
    let w = World::start(&[]);
    let url = format!("{}/hello", w.edge("edge-eu-west"));
    let samples = Arc::new(Mutex::new(Vec::<(Duration, u16, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (url, samples, stop) = (url.clone(), samples.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = get(&c, &url, &[("x-meridian-client-geo", "48.86,2.35")]).await;
                samples.lock().unwrap().push((
                    t.elapsed(),
                    r.status,
                    format!("{} {}", r.region(), r.header("x-meridian-attempts")),
                ));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Bytes to and from eu-west are held, connections stay open: no error,
    // no answer.
    w.chaos(&["cut", "edge-eu-west", "eu-west"]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    for h in workers {
        h.await.unwrap();
    }
    let samples = samples.lock().unwrap();
    assert!(samples.iter().all(|s| s.1 == 200), "a request failed");
    // The dev world's first-byte timeout is 5 s; the retry elsewhere takes
    // a round trip to the next region (concurrent requests for the same
    // uncacheable path do not queue behind one another).
    let worst = samples.iter().map(|s| s.0).max().unwrap();
    assert!(worst < Duration::from_millis(6000), "a request waited {worst:?}");
    let moved = samples.iter().rev().take(20).all(|s| !s.2.starts_with("eu-west"));
    assert!(moved, "traffic left eu-west");
}

/// A loopback server whose every answer takes `delay`; counts requests.
async fn slow_upstream(delay: Duration) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(delay).await;
                        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"worth the wait"));
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_function_within_its_deadline_is_waited_for_not_run_twice_or_held_against_its_region() {
    let w = World::start(&[]);
    // The function answers after 6.5 s: past the dev edges' 5 s first-byte
    // timeout, within its own 9 s deadline.
    let (port, seen) = slow_upstream(Duration::from_millis(6500)).await;
    let app = single_component_app(
        "fetch.wasm",
        &format!(
            r#"[app]
name = "slowpoke"
[components.f]
source = "c/fetch.wasm"
deadline_ms = 9000
allowed_outbound_hosts = ["http://127.0.0.1:{port}"]
[[routes]]
path = "/fetch"
component = "f"
"#
        ),
    );
    let (ok, out) = w.create_and_deploy(app.path(), false);
    assert!(ok, "deploy failed: {out}");
    // The edge learns how long the app may take from the regions' health
    // answers: the deadline and a 1 s margin.
    let t = Instant::now();
    loop {
        let s = w.edge_status("edge-eu-west").await;
        let apps = s["apps"].as_array().cloned().unwrap_or_default();
        if apps.iter().any(|a| a["app"] == "slowpoke" && a["answer_within_ms"] == 10_000) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the edge never learned slowpoke's deadline: {apps:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let c = client();
    let url = format!("{}/fetch?url=http://127.0.0.1:{port}/", w.edge("edge-eu-west"));
    let t = Instant::now();
    let r = get(&c, &url, &[("host", "slowpoke.localhost"), ("x-meridian-client-geo", "48.86,2.35")]).await;
    let took = t.elapsed();
    assert_eq!((r.status, r.body.as_str()), (200, "upstream 200\nworth the wait"), "{:?}", r.headers);
    // One region, once: not given up on at 5 s and tried again elsewhere.
    assert_eq!((r.region().as_str(), r.header("x-meridian-attempts").as_str()), ("eu-west", "1"));
    assert_eq!(seen.load(Ordering::SeqCst), 1, "the function ran more than once");
    assert!(took >= Duration::from_millis(6500) && took < Duration::from_secs(9), "took {took:?}");
    // And eu-west is not held responsible for its app's pace.
    let s = w.edge_status("edge-eu-west").await;
    let eu = s["regions"].as_array().unwrap().iter().find(|r| r[0] == "eu-west").unwrap().clone();
    assert!(eu[1]["ejected_for"].is_null(), "eu-west was ejected: {eu}");
    let traffic =
        s["traffic"]["regions"].as_array().unwrap().iter().find(|r| r["region"] == "eu-west").unwrap().clone();
    assert_eq!(traffic["failed"], 0, "{traffic}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_reporting_another_regions_failure_is_not_ejected_and_its_message_reaches_the_user() {
    let w = World::start(&[]);
    let app = single_component_app(
        "kv.wasm",
        r#"
[app]
name = "pinned"
[components.kv]
source = "c/kv.wasm"
[[routes]]
path = "/kv"
component = "kv"
[kv.profiles]
mode = "regional"
jurisdiction = "eu"
"#,
    );
    let (ok, out) = w.create_and_deploy(app.path(), false);
    assert!(ok, "deploy failed: {out}");
    // The namespace lives only in eu-west; us-east forwards to it.
    w.chaos(&["kill", "eu-west"]);
    let c = client();
    let edge = w.edge("edge-us-east");
    for _ in 0..10 {
        let r = get(
            &c,
            &format!("{edge}/kv/profiles/alice"),
            &[("host", "pinned.localhost"), ("x-meridian-client-country", "US")],
        )
        .await;
        // us-east answered, saying what failed, and nothing else was tried.
        assert_eq!(r.region(), "us-east", "{}", r.body);
        assert!(r.status >= 500, "{}", r.body);
        assert_eq!(r.header("x-meridian-fault"), "dependency", "{}", r.body);
        assert!(!r.body.contains("no region could serve"), "the region's message was replaced: {}", r.body);
        assert_eq!(r.header("x-meridian-attempts"), "1");
    }
    let s = w.edge_status("edge-us-east").await;
    let us = s["regions"].as_array().unwrap().iter().find(|p| p[0] == "us-east").unwrap();
    assert_eq!(us[1]["healthy"], true, "{s}");
    assert_eq!(us[1]["consecutive_5xx"], 0, "{s}");
}
