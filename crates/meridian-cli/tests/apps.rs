//! Many apps in one world, isolated from each other: chosen by host, each
//! with its own buckets, tokens and share of a region, and deleted with
//! every byte of its data.

mod support;
use std::time::{Duration, Instant};
use support::*;

const NOTES: (&str, &str) = ("host", "notes.localhost");
const HELLO: (&str, &str) = ("host", "hello.localhost");

/// Waits until every region's data directory holds `needle` (replicated).
async fn on_every_disk(w: &World, needle: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for r in &w.desc.regions {
        let dir = w.dir.path().join("data").join(&r.name);
        while files_containing(&dir, needle).is_empty() {
            assert!(Instant::now() < deadline, "{} never reached {}", String::from_utf8_lossy(needle), r.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_are_chosen_by_host_and_cannot_reach_each_others_data() {
    let w = World::start(&[]);
    let c = client();
    let edge = w.edge("edge-eu-west");

    // The host picks the app; a bare address is the default app (hello);
    // a host that names no app gets a clear 404.
    let r = get(&c, &format!("{edge}/hello"), &[]).await;
    assert_eq!((r.status, r.body.trim()), (200, "Hello from eu-west!"));
    let r = get(&c, &format!("{edge}/hello"), &[HELLO]).await;
    assert_eq!(r.status, 200);
    let r = get(&c, &format!("{edge}/"), &[NOTES]).await;
    assert!(r.status == 200 && r.body.contains("<h1>notes</h1>"), "{} {}", r.status, r.body);
    let r = get(&c, &format!("{edge}/hello"), &[NOTES]).await;
    assert_eq!(r.status, 404, "notes has no /hello: {}", r.body);
    let r = get(&c, &format!("{edge}/hello"), &[("host", "nobody.example.com")]).await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("no app is served at host \"nobody.example.com\""), "{}", r.body);

    // Each app opens only its own buckets: hello's function opening notes'
    // bucket gets an error value, and the reverse too.
    let put = request(&c, "PUT", &format!("{edge}/kv/notes/n1"), &[NOTES], "NOTES-ONLY").await.unwrap();
    assert_eq!(put.status, 200, "{}", put.body);
    let r = get(&c, &format!("{edge}/kv/notes/n1"), &[HELLO]).await;
    assert!(r.status >= 400 && r.body.contains("no such bucket"), "hello read notes' bucket: {} {}", r.status, r.body);
    let r = get(&c, &format!("{edge}/kv/sessions/x"), &[NOTES]).await;
    assert!(r.status >= 400 && r.body.contains("no such bucket"), "{} {}", r.status, r.body);

    // Same bucket name, different apps: different data. A third app
    // declares `sessions` too and sees none of hello's.
    let mirror = single_component_app(
        "kv.wasm",
        "[app]\nname = \"mirror\"\n[components.kv]\nsource = \"c/kv.wasm\"\n[[routes]]\npath = \"/kv\"\ncomponent = \"kv\"\n[kv.sessions]\nmode = \"global\"\n",
    );
    let (ok, out) = w.create_and_deploy(mirror.path(), false);
    assert!(ok, "{out}");
    const MIRROR: (&str, &str) = ("host", "mirror.localhost");
    let put = request(&c, "PUT", &format!("{edge}/kv/sessions/shared"), &[HELLO], "HELLO-SESSION").await.unwrap();
    assert_eq!(put.status, 200);
    let r = get(&c, &format!("{edge}/kv/sessions/shared"), &[MIRROR]).await;
    assert_eq!(r.status, 404, "mirror read hello's sessions: {}", r.body);
    let put = request(&c, "PUT", &format!("{edge}/kv/sessions/shared"), &[MIRROR], "MIRROR-SESSION").await.unwrap();
    assert_eq!(put.status, 200);
    assert_eq!(get(&c, &format!("{edge}/kv/sessions/shared"), &[HELLO]).await.body, "HELLO-SESSION");
    assert_eq!(get(&c, &format!("{edge}/kv/sessions/shared"), &[MIRROR]).await.body, "MIRROR-SESSION");
    // A causality token one app sealed means nothing to another.
    let token = put.header("x-meridian-causality");
    assert!(!token.is_empty());
    let t = Instant::now();
    let r = get(
        &c,
        &format!("{}/kv/sessions/shared", w.edge("edge-ap-southeast")),
        &[HELLO, ("x-meridian-causality", &token)],
    )
    .await;
    assert!(r.status == 200 || r.status == 404, "{}", r.body);
    assert!(t.elapsed() < Duration::from_millis(450), "hello waited on mirror's token: {:?}", t.elapsed());

    // Metrics are labelled by app. (Which region served each request
    // depends on when each app had caught up there after the world started
    // or the app was deployed: an app catching up in a region is routed
    // elsewhere. So the counts are looked for in every region.)
    let mut all = String::new();
    for region in ["us-east", "eu-west", "ap-southeast"] {
        let (status, metrics) = w.region_call(region, "GET", "/_meridian/metrics", vec![]).await;
        assert_eq!(status, 200);
        assert_eq!(metrics.matches("# TYPE meridian_kv_writes_total").count(), 1, "one family, every app in it");
        all += &metrics;
    }
    for (family, labels) in [
        ("meridian_app_requests_total", "app=\"notes\",class=\"2xx\"}"),
        ("meridian_app_requests_total", "app=\"hello\",class=\"2xx\"}"),
        ("meridian_kv_writes_total", "app=\"notes\"}"),
        ("meridian_kv_writes_total", "app=\"mirror\"}"),
    ] {
        let total: f64 = all
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{region=")) && l.contains(labels))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        assert!(total > 0.0, "no {family} with {labels} in any region:\n{all}");
    }

    // A token for one app can neither deploy nor read another.
    let (ok, out) = w.cli(&["tokens", "create", "--app", "notes", "--scope", "deploy", "--scope", "read"]);
    assert!(ok, "{out}");
    let secret = out.lines().find(|l| l.starts_with("mrd_")).unwrap().to_string();
    let tf = w.dir.path().join("notes-token");
    std::fs::write(&tf, &secret).unwrap();
    let tf = tf.to_str().unwrap();
    let hello = example_app_copy();
    let (ok, out) = w.cli(&["deploy", hello.path().to_str().unwrap(), "--token-file", tf]);
    assert!(!ok && out.contains("403") && out.contains("may not deploy app \"hello\""), "{out}");
    let (ok, out) = w.cli(&["apps", "list", "--token-file", tf]);
    assert!(ok && out.contains("notes") && !out.contains("hello"), "{out}");
    let (ok, out) = w.cli(&["status", "--token-file", tf]);
    assert!(ok && out.contains("app notes") && !out.contains("app hello"), "{out}");
    // Nor create or delete apps.
    let (ok, out) = w.cli(&["apps", "delete", "hello", "--yes", "--token-file", tf]);
    assert!(!ok && out.contains("403"), "{out}");

    // Data goes through the control plane, granted by the data-admin scope
    // on the app: not by deploy or read, and never on another app.
    let (ok, out) = w.cli(&["kv", "get", "--app", "notes", "--ns", "notes", "n1", "--token-file", tf]);
    assert!(!ok && out.contains("403") && out.contains("data-admin"), "{out}");
    let (ok, out) = w.cli(&["tokens", "create", "--app", "notes", "--scope", "data-admin"]);
    assert!(ok, "{out}");
    let admin = w.dir.path().join("notes-data");
    std::fs::write(&admin, out.lines().find(|l| l.starts_with("mrd_")).unwrap()).unwrap();
    let admin = admin.to_str().unwrap();
    let (ok, out) = w.cli(&["kv", "get", "--app", "notes", "--ns", "notes", "n1", "--token-file", admin]);
    assert!(ok && out.contains("NOTES-ONLY"), "{out}");
    let put =
        ["kv", "put", "--app", "notes", "--ns", "notes", "n2", "by-cli", "--region", "eu-west", "--token-file", admin];
    let (ok, out) = w.cli(&put);
    assert!(ok, "{out}");
    assert_eq!(get(&c, &format!("{edge}/kv/notes/n2"), &[NOTES]).await.body, "by-cli");
    // Many keys at once from JSON lines; a malformed line is named and
    // nothing of its batch is written.
    let import = w.dir.path().join("import.jsonl");
    std::fs::write(&import, "{\"key\": \"i1\", \"value\": \"one\"}\n\n{\"key\": \"i2\", \"value_hex\": \"74776f\"}\n")
        .unwrap();
    let import = import.to_str().unwrap();
    let import_args =
        ["kv", "import", "--app", "notes", "--ns", "notes", import, "--region", "eu-west", "--token-file", admin];
    let (ok, out) = w.cli(&import_args);
    assert!(ok && out.contains("imported 2 keys into notes"), "{out}");
    assert_eq!(get(&c, &format!("{edge}/kv/notes/i2"), &[NOTES]).await.body, "two");
    std::fs::write(import, "{\"key\": \"i3\", \"value\": \"three\"}\n{\"key\": \"i4\"}\n").unwrap();
    let (ok, out) = w.cli(&import_args);
    assert!(!ok && out.contains("import.jsonl:2") && out.contains("value"), "{out}");
    assert_eq!(get(&c, &format!("{edge}/kv/notes/i3"), &[NOTES]).await.status, 404);
    let (ok, out) = w.cli(&["kv", "get", "--app", "hello", "--ns", "sessions", "shared", "--token-file", admin]);
    assert!(!ok && out.contains("403"), "a notes token read hello's data: {out}");
    // The administrator token reaches every app's data; the default app
    // needs no --app.
    let (ok, out) = w.cli(&["kv", "get", "--ns", "sessions", "shared"]);
    assert!(ok && out.contains("HELLO-SESSION"), "{out}");

    // Every change asked of the control plane is in the audit log, refused
    // ones too, numbered without gaps; a token sees only its app's.
    let (ok, out) = w.cli(&["audit", "--json"]);
    assert!(ok, "{out}");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "a gap in the audit log");
    let has = |action: &str, app: &str, outcome: &str, detail: &str| {
        entries.iter().any(|e| {
            e["action"] == action
                && e["app"] == app
                && e["outcome"].as_str().unwrap().starts_with(outcome)
                && e["detail"].as_str().unwrap().contains(detail)
        })
    };
    assert!(has("apps.create", "mirror", "ok", "mirror.localhost"), "{out}");
    assert!(has("deploy", "mirror", "ok", ""), "{out}");
    assert!(has("deploy", "hello", "403", ""), "{out}");
    assert!(has("apps.delete", "hello", "403", ""), "{out}");
    assert!(has("tokens.create", "notes", "ok", "DataAdmin"), "{out}");
    assert!(has("kv.write", "notes", "ok", "set notes/n2"), "{out}");
    assert!(!out.contains("by-cli"), "a value reached the audit log");
    let who = entries.iter().find(|e| e["action"] == "kv.write").unwrap()["who"].as_str().unwrap().to_string();
    assert!(who.starts_with("token "), "{who}");
    let (ok, out) = w.cli(&["audit", "--json", "--token-file", tf]);
    assert!(ok, "{out}");
    let mine: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(!mine.is_empty() && mine.iter().all(|e| e["app"] == "notes"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_app_removes_its_data_from_every_region_and_keeps_the_others() {
    let w = World::start(&[]);
    let c = client();
    let edge = w.edge("edge-us-east");
    for i in 0..20 {
        let r = request(&c, "PUT", &format!("{edge}/kv/notes/k{i}"), &[NOTES], &format!("NOTES-DOOMED-{i:02}")).await;
        assert_eq!(r.unwrap().status, 200);
    }
    let r = request(&c, "PUT", &format!("{edge}/kv/sessions/keep"), &[HELLO], "HELLO-KEPT").await.unwrap();
    assert_eq!(r.status, 200);
    on_every_disk(&w, b"NOTES-DOOMED-19").await;
    on_every_disk(&w, b"HELLO-KEPT").await;

    let (ok, out) = w.cli(&["apps", "delete", "notes"]);
    assert!(!ok && out.contains("--yes"), "deleting needs confirmation: {out}");
    let (ok, out) = w.cli(&["apps", "delete", "notes", "--yes"]);
    assert!(ok, "{out}");
    for r in &w.desc.regions {
        let line = out.lines().find(|l| l.trim_start().starts_with(&r.name)).unwrap_or_else(|| panic!("{out}"));
        let bytes: u64 = line.split("files, ").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
        assert!(bytes > 0, "{} removed nothing: {out}", r.name);
    }
    // Scanned: no byte of the app's values is left on any region's disk;
    // the other app's data is all there.
    for r in &w.desc.regions {
        let dir = w.dir.path().join("data").join(&r.name);
        for i in 0..20 {
            let found = files_containing(&dir, format!("NOTES-DOOMED-{i:02}").as_bytes());
            assert!(found.is_empty(), "deleted app's value {i} still on {}: {found:?}", r.name);
        }
        assert!(!files_containing(&dir, b"HELLO-KEPT").is_empty(), "{} lost hello's data", r.name);
    }
    let r = get(&c, &format!("{edge}/"), &[NOTES]).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(get(&c, &format!("{edge}/kv/sessions/keep"), &[HELLO]).await.body, "HELLO-KEPT");
    let (ok, out) = w.cli(&["apps", "list"]);
    assert!(ok && !out.contains("notes") && out.contains("hello"), "{out}");

    // The name can be used again: a new, empty app.
    let (ok, out) = w.cli(&["apps", "create", "notes"]);
    assert!(ok, "{out}");
    let notes = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/notes");
    let (ok, out) = w.cli(&["deploy", notes.to_str().unwrap()]);
    assert!(ok, "{out}");
    let r = get(&c, &format!("{edge}/kv/notes/k1"), &[NOTES]).await;
    assert_eq!(r.status, 404, "a re-created app saw the deleted one's data: {}", r.body);
}

/// p99 of `n` sequential GETs.
async fn p99(c: &Client, url: &str, headers: &[(&str, &str)], n: usize) -> Duration {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = get(c, url, headers).await;
        assert_eq!(r.status, 200, "{}", r.body);
        samples.push(t.elapsed());
    }
    samples.sort();
    samples[(n * 99 / 100).min(n - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_apps_endless_loops_barely_move_anothers_latency() {
    let w = World::start(&[]);
    let spinner = single_component_app(
        "hostile.wasm",
        "[app]\nname = \"spinner\"\n[limits]\ndeadline_ms = 2000\nmemory_mb = 16\n[components.h]\nsource = \"c/hostile.wasm\"\n[[routes]]\npath = \"/\"\ncomponent = \"h\"\n",
    );
    let (ok, out) = w.create_and_deploy(spinner.path(), false);
    assert!(ok, "{out}");
    let c = client();
    let region = w.region_url("us-east");
    let hello = format!("{region}/hello");
    p99(&c, &hello, &[HELLO], 50).await; // warm
    let alone = p99(&c, &hello, &[HELLO], 300).await;

    // Four endless loops at all times in the same region (each runs to
    // its 2 s deadline and is replaced at once).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut spinners = Vec::new();
    for _ in 0..4 {
        let (c, url, stop) = (c.clone(), format!("{region}/spin"), stop.clone());
        spinners.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = get(&c, &url, &[("host", "spinner.localhost")]).await;
                assert_eq!(r.status, 504, "{}", r.body);
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let noisy = p99(&c, &hello, &[HELLO], 300).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut loops = 0;
    for s in spinners {
        loops += s.await.unwrap();
    }
    assert!(loops >= 4, "the loops did not run");
    // The bound: a spinning guest yields every epoch tick (2 ms), so the
    // other app waits at most a few ticks per poll, not the loop's 2 s.
    let bound = alone * 3 + Duration::from_millis(40);
    eprintln!("hello p99 alone {alone:?}, next to 4 endless loops {noisy:?} (bound {bound:?})");
    assert!(noisy < bound, "hello p99 {noisy:?} next to endless loops (alone {alone:?}); bound {bound:?}");
}
