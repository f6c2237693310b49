//! Versions roll out atomically and bad versions never reach users.

mod support;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploying_under_load_fails_nothing_and_bad_versions_are_refused() {
    let w = World::start(&[]);
    let c = client();
    let edge = w.edge("edge-eu-west");
    let v1 = get(&c, &format!("{edge}/hello"), &[]).await.header("x-meridian-version");

    // --- v2 under load -------------------------------------------------
    let app = example_app_copy();
    std::fs::write(app.path().join("static/index.html"), "<h1>version two</h1>").unwrap();
    let samples = Arc::new(Mutex::new(Vec::<(Instant, u16, String)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for e in &w.desc.edges {
        let (url, samples, stop) = (format!("{}/hello", e.url), samples.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let r = get(&c, &url, &[]).await;
                samples.lock().unwrap().push((t, r.status, r.header("x-meridian-version")));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, out) = w.create_and_deploy(app.path(), true);
    assert!(ok, "deploy failed: {out}");
    let deployed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in workers {
        h.await.unwrap();
    }
    let v2 = get(&c, &format!("{edge}/hello"), &[]).await.header("x-meridian-version");
    assert_ne!(v1, v2);
    assert!(out.contains(&v2), "deploy output names the version: {out}");
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let statuses: BTreeSet<u16> = samples.iter().map(|s| s.1).collect();
    assert_eq!(statuses, BTreeSet::from([200]), "failed requests during deploy");
    let versions: BTreeSet<&str> = samples.iter().map(|s| s.2.as_str()).collect();
    assert!(versions.iter().all(|v| *v == v1 || *v == v2), "{versions:?}");
    let after: Vec<_> = samples.iter().filter(|s| s.0 > deployed_at).collect();
    assert!(!after.is_empty());
    assert!(after.iter().all(|s| s.2 == v2), "v1 served after the deploy returned");
    assert_eq!(get(&c, &format!("{edge}/"), &[]).await.body, "<h1>version two</h1>");

    // --- a broken component is refused; v2 keeps serving ----------------
    let broken = example_app_copy();
    std::fs::write(broken.path().join("components/hello.wasm"), b"\0asm\x01\0\0\0 definitely not a component").unwrap();
    let (ok, out) = w.cli(&["deploy", broken.path().to_str().unwrap()]);
    assert!(!ok, "a broken component was accepted: {out}");
    assert!(out.contains("component \"hello\"") && out.contains("nothing was changed"), "{out}");
    for e in &w.desc.edges {
        let r = get(&c, &format!("{}/hello", e.url), &[]).await;
        assert_eq!((r.status, r.header("x-meridian-version")), (200, v2.clone()));
    }

    // --- a malformed manifest is reported in full, with lines -----------
    let bad = example_app_copy();
    let manifest = std::fs::read_to_string(bad.path().join("meridian.toml")).unwrap();
    let manifest = manifest
        .replace("name = \"hello\"", "name = \"hello\"\ncolour = \"blue\"")
        .replace("memory_mb = 64", "memory_mb = -1");
    std::fs::write(bad.path().join("meridian.toml"), manifest).unwrap();
    let (ok, out) = w.cli(&["deploy", bad.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("2 problems"), "{out}");
    assert!(out.contains(":4:1: `app.colour`: unknown key"), "{out}");
    assert!(out.contains("`limits.memory_mb`: -1 is out of range"), "{out}");

    // --- the control API refuses calls without the token -----------------
    assert_eq!(w.control_call_as("operator", http::Method::POST, "/v1/deploy").await, 401);
    // --- and a region takes versions only from the control plane or an
    // operator, judged by the caller's certificate ------------------------
    let (status, body) =
        w.region_call_as("edge-us-east", "us-east", "PUT", "/_meridian/apps/hello/active", v1.into()).await.unwrap();
    assert_eq!(status, 403, "{body}");
    let (status, body) =
        w.region_call_as("eu-west", "us-east", "PUT", "/_meridian/apps/hello/active", vec![]).await.unwrap();
    assert_eq!(status, 403, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_function_is_contained_and_not_retried_across_regions() {
    let w = World::start(&[]);
    let app = single_component_app(
        "hostile.wasm",
        "[app]\nname = \"hostile\"\n[limits]\ndeadline_ms = 300\nmemory_mb = 16\n[components.h]\nsource = \"c/hostile.wasm\"\n[[routes]]\npath = \"/\"\ncomponent = \"h\"\n",
    );
    let (ok, out) = w.create_and_deploy(app.path(), true);
    assert!(ok, "{out}");
    let c = client();
    let edge = w.edge("edge-us-east");
    let t = Instant::now();
    let spin = get(&c, &format!("{edge}/spin"), &[]).await;
    let took = t.elapsed();
    assert_eq!(spin.status, 504, "{}", spin.body);
    assert_eq!(spin.header("x-meridian-fault"), "app");
    assert_eq!(spin.header("x-meridian-attempts"), "1", "an app fault must not be retried in other regions");
    assert!(took < Duration::from_millis(300 + 100 + 50), "took {took:?}");
    let hog = get(&c, &format!("{edge}/hog"), &[]).await;
    assert_eq!(hog.status, 500);
    assert!(hog.body.contains("memory limit of 16 MiB"), "{}", hog.body);
    // The region is still healthy and serving.
    let ok = get(&c, &format!("{edge}/fine"), &[]).await;
    assert_eq!((ok.status, ok.region().as_str()), (200, "us-east"));
}
