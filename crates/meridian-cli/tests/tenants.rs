//! The hostile-tenant suite (issue 27): two apps share a world, and tenant
//! B (`evil`), holding its own deploy, read and data-admin tokens, tries
//! every way it can name to reach tenant A (`notes`, which `meridian dev`
//! deploys): smoke tests aimed at the platform's API, forged Host and
//! X-Forwarded-Host and the platform's own headers through every edge,
//! bundles that lie about their size or are cut short or name A, and a
//! function that answers 5xx claiming a platform fault. Afterwards A's data,
//! hostnames and versions read back unchanged, no region was ejected, and
//! every refused attempt is in the audit log.

mod support;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NOTES: (&str, &str) = ("host", "notes.localhost");
const EVIL: (&str, &str) = ("host", "evil.localhost");

/// One request written by hand (so it can lack a `Host`, or repeat one);
/// the whole answer as text.
async fn raw(addr: &str, request: &str) -> String {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    };
    tokio::time::timeout(Duration::from_secs(20), io).await.expect("no answer within 20 s")
}

/// A tar of every file under `dir`, unchecked (as an attacker would send).
fn tar_of(dir: &std::path::Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for rel in ["meridian.toml", "c/hostile.wasm"] {
        b.append_path_with_name(dir.join(rel), rel).unwrap();
    }
    b.into_inner().unwrap()
}

/// evil's own app: the hostile function at every path.
fn evil_app(smoke: &str) -> tempfile::TempDir {
    single_component_app(
        "hostile.wasm",
        &format!(
            "[app]\nname = \"evil\"\n[limits]\ndeadline_ms = 500\nmemory_mb = 16\n[components.h]\nsource = \
             \"c/hostile.wasm\"\n[[routes]]\npath = \"/\"\ncomponent = \"h\"\n{smoke}"
        ),
    )
}

/// What a user of `notes` can see of it: a value, its hostnames and its
/// version in every region.
async fn notes_state(w: &World, c: &Client) -> (String, String, Vec<String>) {
    let value = get(c, &format!("{}/kv/notes/first", w.edge("edge-us-east")), &[NOTES]).await.body;
    let (ok, apps) = w.cli(&["apps", "list"]);
    assert!(ok, "{apps}");
    let hosts = apps.lines().find(|l| l.starts_with("notes ")).unwrap_or("").to_string();
    let mut versions = Vec::new();
    for r in &w.desc.regions {
        let (status, body) = w.region_call(&r.name, "GET", "/_meridian/apps/notes/active", vec![]).await;
        versions.push(format!("{} {status} {body}", r.name));
    }
    (value, hosts, versions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_tenant_reaches_nothing_of_another() {
    let w = World::start(&[]);
    let c = client();
    let tmp = tempfile::tempdir().unwrap();
    let edge = w.edge("edge-us-east");
    let put = request(&c, "PUT", &format!("{edge}/kv/notes/first"), &[NOTES], "notes-secret").await.unwrap();
    assert_eq!(put.status, 200, "{}", put.body);
    let (ok, out) = w.cli(&["apps", "create", "evil", "--host", "evil.example"]);
    assert!(ok, "{out}");
    let deploy = w.token("evil", &["deploy", "read", "data-admin"]);
    let evil_token = tmp.path().join("evil.token");
    std::fs::write(&evil_token, &deploy).unwrap();
    let evil_token = evil_token.to_str().unwrap();
    let (ok, out) = w.cli(&["deploy", evil_app("").path().to_str().unwrap(), "--token-file", evil_token]);
    assert!(ok, "{out}");
    let before = notes_state(&w, &c).await;
    assert_eq!(before.0, "notes-secret");

    let control = meridian_http::cluster::Target::from_url(
        w.desc.control_url.split(',').next().unwrap(),
        meridian_trust::Expect::service(meridian_trust::Role::Control),
    )
    .unwrap();
    let bearer = format!("Bearer {deploy}");
    let send = |path: String, body: Vec<u8>| {
        let (control, bearer) = (control.clone(), bearer.clone());
        let client = w.client_as("operator");
        async move {
            let hs = [("authorization", bearer.as_str())];
            let a = client
                .call_with(&control, http::Method::POST, &path, &hs, body.into(), Duration::from_secs(60))
                .await
                .unwrap();
            format!("{} {}", a.status.as_u16(), a.text())
        }
    };

    // --- Reproduction 1: smoke tests aimed at the platform's API ----------
    for (method, path, body) in [
        ("POST", "/_meridian/apps/notes/kv/op", r#"{"op":"get","ns":"notes","key":"first"}"#),
        ("DELETE", "/_meridian/apps/notes", ""),
        ("PUT", "/_meridian/apps/evil", r#"{"name":"evil","hosts":["notes.localhost"]}"#),
        ("GET", "/%5Fmeridian/apps/notes/status", ""),
    ] {
        let smoke = format!(
            "[[smoke]]\nmethod = \"{method}\"\npath = \"{path}\"\nbody = '{body}'\nstatus = 599\n"
        );
        let app = evil_app(&smoke);
        let (ok, out) = w.cli(&["deploy", app.path().to_str().unwrap(), "--token-file", evil_token]);
        assert!(!ok, "{method} {path}: deployed: {out}");
        assert!(out.contains("reserved for the platform"), "{method} {path}: {out}");
        // Not through the CLI, which checks first: the control plane
        // refuses it too.
        let out = send("/v1/deploy?app=evil".into(), tar_of(app.path())).await;
        assert!(out.starts_with("422") && out.contains("reserved for the platform"), "{method} {path}: {out}");
        assert!(!out.contains("6e6f746573") && !out.contains("notes-secret"), "notes's value in the answer: {out}");
    }
    // A smoke test cannot dress as the platform, or as another app.
    let smoke = "[[smoke]]\npath = \"/kv/notes/first\"\nheaders = { x-meridian-app = \"notes\" }\n";
    let out = send("/v1/deploy?app=evil".into(), tar_of(evil_app(smoke).path())).await;
    assert!(out.starts_with("422") && out.contains("set by the platform"), "{out}");
    // And should a stored version carry such a smoke test, the region
    // refuses app traffic at a reserved path whatever certificate sends
    // it: the control plane's, as a smoke test would come.
    for (method, path) in [("POST", "/_meridian/apps/notes/kv/op"), ("DELETE", "/_meridian/apps/notes")] {
        let r = &w.desc.regions[0];
        let target = meridian_http::cluster::Target::from_url(
            &r.cluster_url,
            meridian_trust::Expect::region(&r.name, &r.jurisdiction),
        )
        .unwrap();
        let a = w
            .client_as("control-1")
            .call_with(
                &target,
                method.parse().unwrap(),
                path,
                &[("x-meridian-app", "evil"), ("x-meridian-version-override", "0000")],
                bytes::Bytes::from_static(br#"{"op":"get","ns":"notes","key":"first"}"#),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 403, "{method} {path}: {}", a.text());
        assert!(!a.text().contains("notes-secret"));
    }

    // --- Reproduction 2: forged hosts through every edge ------------------
    for e in &w.desc.edges {
        let addr = addr_of(&e.url);
        // No Host, a forged X-Forwarded-Host: the default app (hello),
        // which has no bucket named notes.
        for version in ["HTTP/1.0", "HTTP/1.1"] {
            let answer = raw(
                &addr,
                &format!("GET /kv/notes/first {version}\r\nx-forwarded-host: notes.localhost\r\nconnection: close\r\n\r\n"),
            )
            .await;
            assert!(!answer.contains("notes-secret"), "{} {version}: served notes: {answer}", e.name);
            assert!(answer.contains("x-meridian-region"), "{} {version}: no region answered: {answer}", e.name);
        }
        // With evil's Host and a forged X-Forwarded-Host: evil's.
        let r = get(&c, &format!("{}/kv/notes/first", e.url), &[EVIL, ("x-forwarded-host", "notes.localhost")]).await;
        assert_eq!(r.body, "ok\n", "{}: {}", e.name, r.body);
        // Every platform header a client can forge: still evil's, on
        // evil's active version.
        let forged = [
            EVIL,
            ("x-meridian-app", "notes"),
            ("x-meridian-version-override", "0000"),
            ("x-meridian-forwarded", "us-east"),
            ("forwarded", "host=notes.localhost"),
        ];
        let r = get(&c, &format!("{}/kv/notes/first", e.url), &forged).await;
        assert_eq!(r.body, "ok\n", "{}: {}", e.name, r.body);
    }

    // --- Bundles that lie, are cut short or name another app --------------
    let mut liar = tar::Header::new_gnu();
    liar.set_path("meridian.toml").unwrap();
    liar.set_size(1 << 44);
    liar.set_entry_type(tar::EntryType::Regular);
    liar.set_cksum();
    let mut lying = liar.as_bytes().to_vec();
    lying.extend_from_slice(&[0u8; 4096]);
    let whole = meridian_manifest::Bundle::from_dir(evil_app("").path()).unwrap().to_tar();
    let notes_bundle = meridian_manifest::Bundle::from_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/notes"),
    )
    .unwrap()
    .to_tar();
    for (what, path, body, want) in [
        ("a size claim of 16 TiB", "/v1/deploy?app=evil", lying, "422"),
        ("a bundle cut short", "/v1/deploy?app=evil", whole[..whole.len() / 2].to_vec(), "422"),
        ("notes's bundle", "/v1/deploy?app=notes", notes_bundle.clone(), "403"),
        ("notes's bundle, sent as evil's", "/v1/deploy?app=evil", notes_bundle.clone(), "400"),
        ("notes's bundle, no app named", "/v1/deploy", notes_bundle, "403"),
    ] {
        let out = send(path.to_string(), body).await;
        assert!(out.starts_with(want), "{what}: {out}");
    }

    // --- A function answering 5xx, claiming a platform fault --------------
    let started = Instant::now();
    let mut notes_worst = Duration::ZERO;
    for round in 0..20 {
        for method in ["GET", "PUT", "DELETE", "POST"] {
            let r = request(&c, method, &format!("{edge}/status/503"), &[EVIL], "x").await.unwrap();
            assert_eq!(r.status, 503, "{method}: {}", r.body);
            assert_eq!(r.body, "the app chose 503\n");
            assert_eq!(r.header("x-meridian-attempts"), "1", "{method}: the app's own answer was retried");
            assert_eq!(r.header("x-meridian-fault"), "app", "{method}");
            assert_eq!(r.region(), "us-east", "{method}: the guest set the platform's region header");
            assert!(r.header("x-meridian-residency").is_empty());
        }
        let r = request(&c, "GET", &format!("{edge}/status/500"), &[EVIL], "").await.unwrap();
        assert_eq!((r.status, r.header("x-meridian-attempts").as_str()), (500, "1"), "round {round}");
        let t = Instant::now();
        let n = get(&c, &format!("{edge}/kv/notes/first"), &[NOTES]).await;
        notes_worst = notes_worst.max(t.elapsed());
        assert_eq!(n.body, "notes-secret");
    }
    // notes's requests never waited behind evil's failures (the edge's
    // upstream timeouts are seconds; a retried or ejected region shows).
    assert!(notes_worst < Duration::from_secs(1), "notes's slowest request took {notes_worst:?}");
    for e in &w.desc.edges {
        let s = w.edge_status(&e.name).await;
        for r in s["regions"].as_array().unwrap() {
            let h = &r[1];
            assert_eq!(h["healthy"], true, "{}: {} ejected: {h}", e.name, r[0]);
            assert_eq!(h["ejections"], 0, "{}: {} ejected after {:?}: {h}", e.name, r[0], started.elapsed());
        }
        assert_eq!(s["traffic"]["retries"], 0, "{}: retries spent on evil's answers", e.name);
    }

    // --- Afterwards: notes is as it was -----------------------------------
    assert_eq!(notes_state(&w, &c).await, before);

    // --- and every refused attempt is in the audit log --------------------
    let (ok, out) = w.cli(&["audit", "--json"]);
    assert!(ok, "{out}");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let refused = |app: &str, outcome: &str| {
        entries
            .iter()
            .filter(|e| {
                e["action"] == "deploy" && e["app"] == app && e["outcome"].as_str().unwrap().starts_with(outcome)
            })
            .count()
    };
    // Five smoke tests and two bundles refused as unreadable.
    assert!(refused("evil", "422") >= 7, "{out}");
    // notes's bundle: refused unread, refused once read, and refused as
    // not the app it was sent for.
    assert!(refused("notes", "403") >= 2, "{out}");
    assert!(refused("notes", "400") >= 1, "{out}");
}
