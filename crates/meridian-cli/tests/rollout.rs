//! Rollouts: a new version reaches users region by region, behind smoke
//! tests and health gates, and is rolled back when it misbehaves.

mod support;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// The example app with `extra` appended to its manifest; with
/// `hostile_trap`, a `/trap` route whose function traps (a 500).
fn example_with(extra: &str, hostile_trap: bool) -> (tempfile::TempDir, String) {
    let app = example_app_copy();
    let mut manifest = std::fs::read_to_string(app.path().join("meridian.toml")).unwrap();
    if hostile_trap {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/hostile.wasm");
        std::fs::copy(src, app.path().join("components/hostile.wasm")).unwrap();
        manifest = manifest.replacen(
            "[[routes]]",
            "[components.hostile]\nsource = \"components/hostile.wasm\"\n\n[[routes]]\npath = \"/trap\"\ncomponent = \"hostile\"\n\n[[routes]]",
            1,
        );
    }
    manifest.push_str(extra);
    std::fs::write(app.path().join("meridian.toml"), manifest).unwrap();
    let id = meridian_manifest::Bundle::from_dir(app.path()).unwrap().id.short().to_string();
    (app, id)
}

struct Seen {
    at: Instant,
    status: u16,
    region: String,
    version: String,
}

/// Requests `paths` in turn through `edge` until stopped; each loop is one
/// client keeping its cookies (or none, a new client every time).
fn load(
    edge: String,
    paths: &'static [&'static str],
    geo: &'static str,
    keep_cookies: bool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Seen>> {
    load_as(edge, paths, geo, keep_cookies, None, stop)
}

/// `load`, with an `x-user` header naming the client (and no cookies, if
/// `keep_cookies` is false: the header alone must keep it on one version).
fn load_as(
    edge: String,
    paths: &'static [&'static str],
    geo: &'static str,
    keep_cookies: bool,
    user: Option<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Seen>> {
    tokio::spawn(async move {
        let c = client();
        let mut seen = Vec::new();
        let mut cookie = String::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let path = paths[i % paths.len()];
            i += 1;
            let mut headers = vec![("x-meridian-client-geo", geo)];
            if let Some(u) = &user {
                headers.push(("x-user", u.as_str()));
            }
            if keep_cookies && !cookie.is_empty() {
                headers.push(("cookie", cookie.as_str()));
            }
            let r = get(&c, &format!("{edge}{path}"), &headers).await;
            if keep_cookies {
                if let Some(v) = r
                    .headers
                    .get_all("set-cookie")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find(|v| v.starts_with("meridian-version="))
                {
                    cookie = v.split(';').next().unwrap().to_string();
                }
            }
            seen.push(Seen {
                at: Instant::now(),
                status: r.status,
                region: r.region(),
                version: r.header("x-meridian-version"),
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    })
}

const US: &str = "40.71,-74.0";
const EU: &str = "53.35,-6.26";
const AP: &str = "1.29,103.85";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_trips_its_gate_and_no_other_region_ever_runs_it() {
    let w = World::start(&[]);
    let c = client();
    let old = get(&c, &format!("{}/hello", w.edge("edge-us-east")), &[]).await.header("x-meridian-version");
    let (app, new) = example_with(
        "\n[rollout]\nwaves = [[\"us-east\"], [\"eu-west\", \"ap-southeast\"]]\nsteps = [25, 100]\nbake_ms = 2500\nmax_error_percent = 5\nmin_requests = 10\n",
        true,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let us = load(w.edge("edge-us-east"), &["/hello", "/trap"], US, false, stop.clone());
    let eu = load(w.edge("edge-eu-west"), &["/hello"], EU, false, stop.clone());
    let ap = load(w.edge("edge-ap-southeast"), &["/hello"], AP, false, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, out) = w.cli(&["deploy", app.path().to_str().unwrap()]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (us, eu, ap) = (us.await.unwrap(), eu.await.unwrap(), ap.await.unwrap());
    assert!(!ok, "the rollout of a failing version succeeded: {out}");
    assert!(out.contains("stopped in us-east at step 25%") && out.contains("gate: 5xx"), "{out}");
    assert!(out.contains("rolled back") && out.contains(&format!("stays on {}", &old[..12.min(old.len())])), "{out}");

    // No other region ever ran it; their users saw nothing of it.
    for s in eu.iter().chain(&ap) {
        assert_eq!(s.status, 200);
        assert_ne!(s.version, new, "{} served the failing version", s.region);
    }
    // The canary's users: the failing version had 25 % of new clients,
    // and only /trap (half the requests) fails on it, so the share of
    // failed requests is bounded by the canary's traffic share.
    let failed = us.iter().filter(|s| s.status >= 500).count();
    assert!(us.iter().any(|s| s.version == new), "the canary never took traffic");
    let share = failed as f64 / us.len() as f64;
    assert!(failed > 0 && share <= 0.25, "{failed} of {} requests failed ({share:.2}); bound 0.25", us.len());
    // Back on the old version, with no split, everywhere.
    for r in ["us-east", "eu-west", "ap-southeast"] {
        let (_, body) = w.region_call(r, "GET", "/_meridian/apps/hello/status", vec![]).await;
        let s: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(s["active"].as_str().unwrap().starts_with(&old), "{r}: {body}");
        assert!(s["split"].is_null(), "{r}: {body}");
    }
    let after = get(&c, &format!("{}/trap", w.edge("edge-us-east")), &[]).await;
    assert_eq!((after.status, after.header("x-meridian-version")), (404, old));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_failing_its_smoke_test_never_takes_user_traffic() {
    let w = World::start(&[]);
    let (app, new) = example_with("\n[[smoke]]\npath = \"/hello\"\nbody_contains = \"Goodbye\"\n", false);
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = [("edge-us-east", US), ("edge-eu-west", EU), ("edge-ap-southeast", AP)]
        .into_iter()
        .map(|(e, geo)| load(w.edge(e), &["/hello"], geo, false, stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ok, out) = w.cli(&["deploy", app.path().to_str().unwrap()]);
    stop.store(true, Ordering::Relaxed);
    assert!(!ok, "{out}");
    assert!(out.contains("step smoke") && out.contains("does not contain \"Goodbye\""), "{out}");
    for l in loads {
        for s in l.await.unwrap() {
            assert_eq!(s.status, 200);
            assert_ne!(s.version, new, "a user reached the version that failed its smoke test");
        }
    }
    // A passing smoke test lets the version through.
    let (app, new) = example_with("\n[[smoke]]\npath = \"/hello\"\nbody_contains = \"Hello\"\n", false);
    let (ok, out) = w.cli(&["deploy", app.path().to_str().unwrap(), "--json"]);
    assert!(ok, "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&out[out.find('{').unwrap()..=out.rfind('}').unwrap()]).unwrap();
    let smoke: Vec<&serde_json::Value> =
        report["steps"].as_array().unwrap().iter().filter(|s| s["step"] == "smoke").collect();
    assert_eq!(smoke.len(), 3, "a smoke test in every region: {out}");
    assert!(smoke.iter().all(|s| s["ok"] == true && s["detail"] == "1 passed"), "{out}");
    let r = get(&client(), &format!("{}/hello", w.edge("edge-eu-west")), &[]).await;
    assert_eq!(r.header("x-meridian-version"), new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_version_rolls_out_wave_by_wave_with_sticky_clients_and_no_failed_request() {
    let w = World::start(&[]);
    let old = get(&client(), &format!("{}/hello", w.edge("edge-us-east")), &[]).await.header("x-meridian-version");
    let (app, new) = example_with(
        "\n[rollout]\nsteps = [30, 100]\nbake_ms = 1500\nmin_requests = 5\nsticky_header = \"x-user\"\n[[smoke]]\npath = \"/hello\"\n",
        false,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for (e, geo) in [("edge-us-east", US), ("edge-eu-west", EU), ("edge-ap-southeast", AP)] {
        for _ in 0..4 {
            clients.push(load(w.edge(e), &["/hello", "/"], geo, true, stop.clone()));
        }
        // Clients known by the sticky header, keeping no cookies.
        for i in 0..3 {
            let user = Some(format!("user-{e}-{i}"));
            clients.push(load_as(w.edge(e), &["/hello"], geo, false, user, stop.clone()));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (ok, out) = w.cli(&["deploy", app.path().to_str().unwrap()]);
    let done = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(ok, "{out}");
    // The canary (the world's first region, us-east) went first, step by
    // step; the other regions after it.
    let order: Vec<&str> = out.lines().filter(|l| l.contains(" ok")).collect();
    let pos = |region: &str, step: &str| {
        order
            .iter()
            .position(|l| {
                let mut words = l.split_whitespace();
                words.next() == Some(region) && words.next() == Some(step)
            })
            .unwrap_or_else(|| panic!("no {region} {step} in: {out}"))
    };
    assert!(pos("us-east", "smoke") < pos("us-east", "30%"), "{out}");
    assert!(pos("us-east", "30%") < pos("us-east", "100%"), "{out}");
    assert!(pos("us-east", "100%") < pos("eu-west", "smoke"), "{out}");
    assert!(pos("eu-west", "30%") < pos("eu-west", "100%"), "{out}");
    assert!(pos("us-east", "100%") < pos("ap-southeast", "30%"), "{out}");

    let mut per_version: BTreeMap<String, usize> = BTreeMap::new();
    for c in clients {
        let seen = c.await.unwrap();
        // No request failed because of a switch.
        assert!(seen.iter().all(|s| s.status == 200), "a request failed during the rollout");
        // Stickiness: while the rollout runs, a client moves at most once,
        // from the old version to the new one, never back.
        let during: Vec<&Seen> = seen.iter().filter(|s| s.at > started && s.at < done).collect();
        let mut switched = false;
        for pair in during.windows(2) {
            if pair[0].version != pair[1].version {
                assert!(!switched, "a client switched versions twice");
                assert_eq!(
                    (pair[0].version.as_str(), pair[1].version.as_str()),
                    (old.as_str(), new.as_str()),
                    "a client moved back: {} from {} then {} from {}, {:?} apart",
                    pair[0].version,
                    pair[0].region,
                    pair[1].version,
                    pair[1].region,
                    pair[1].at - pair[0].at
                );
                switched = true;
            }
        }
        for s in &seen {
            *per_version.entry(s.version.clone()).or_default() += 1;
        }
    }
    assert!(per_version.contains_key(&new) && per_version.contains_key(&old), "{per_version:?}");
    for e in &w.desc.edges {
        let r = get(&client(), &format!("{}/hello", e.url), &[]).await;
        assert_eq!(r.header("x-meridian-version"), new);
    }

    // The history, and an emergency rollback: every region at once.
    let (ok, out) = w.cli(&["versions"]);
    assert!(ok && out.contains(&old) && out.contains(&format!("{new}  (desired)")), "{out}");
    let (ok, out) = w.cli(&["rollback"]);
    assert!(ok && out.contains(&format!("rolled back to version {old}")), "{out}");
    for e in &w.desc.edges {
        let r = get(&client(), &format!("{}/hello", e.url), &[]).await;
        assert_eq!(r.header("x-meridian-version"), old);
    }
    let (ok, out) = w.cli(&["versions"]);
    assert!(ok && out.contains(&format!("{old}  (desired)")), "{out}");
}

/// Polls `meridian rollout status` until it says `state`.
fn wait_state(w: &World, state: &str) -> String {
    wait_status(w, 30, &format!("reached {state:?}"), |out| out.lines().next().is_some_and(|l| l.ends_with(state)))
}

/// Polls `meridian rollout status` until its output satisfies `until`
/// (within `secs`, else the test fails saying the rollout never did `what`).
fn wait_status(w: &World, secs: u64, what: &str, until: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (_, out) = w.cli(&["rollout", "status"]);
        if until(&out) {
            return out;
        }
        assert!(Instant::now() < deadline, "the rollout never {what}: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `meridian deploy DIR` against the world, in a thread of its own.
fn deploy_in_background(
    w: &World,
    dir: &std::path::Path,
) -> std::thread::JoinHandle<std::io::Result<std::process::Output>> {
    let (world, dir) = (w.dir.path().to_path_buf(), dir.to_path_buf());
    std::thread::spawn(move || meridian().arg("deploy").arg(dir).arg("--world").arg(world).output())
}

/// The version `region` itself serves (a region still catching up after a
/// restart hands requests to a peer, which may serve another version).
async fn version_in(w: &World, region: &str) -> String {
    let r = get(&client(), &format!("{}/hello", w.region_url(region)), &[]).await;
    assert_eq!(r.header("x-meridian-region"), region, "answered by another region");
    r.header("x-meridian-version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_approves_each_wave_or_aborts_and_everything_rolls_back() {
    let w = World::start(&[]);
    let old = version_in(&w, "eu-west").await;

    // Approved: the canary wave, a stop, then the rest.
    let (app, new) = example_with("\n[rollout]\nmanual_approval = true\n", false);
    let deploy = deploy_in_background(&w, app.path());
    let status = wait_state(&w, "awaiting approval");
    assert!(status.contains("us-east") && status.contains("100%"), "{status}");
    assert_eq!(version_in(&w, "us-east").await, new);
    assert_eq!(version_in(&w, "eu-west").await, old, "the second wave ran before its approval");
    // Meanwhile another deploy of the app is refused, and says why.
    let (other, _) = example_with("\n# another\n", false);
    let (ok, out) = w.cli(&["deploy", other.path().to_str().unwrap()]);
    assert!(!ok && out.contains("is in progress"), "{out}");
    let (ok, out) = w.cli(&["rollout", "approve"]);
    assert!(ok, "{out}");
    let out = deploy.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("us-east") && text.contains("eu-west") && text.contains("+"), "live steps: {text}");
    for r in ["us-east", "eu-west", "ap-southeast"] {
        assert_eq!(version_in(&w, r).await, new, "{r}");
    }
    assert!(wait_state(&w, "succeeded").contains(&new));

    // Aborted at the approval: the canary goes back, nobody else moved.
    let (app, newer) = example_with("\n[rollout]\nmanual_approval = true\n# newer\n", false);
    let deploy = deploy_in_background(&w, app.path());
    wait_state(&w, "awaiting approval");
    assert_eq!(version_in(&w, "us-east").await, newer);
    let (ok, out) = w.cli(&["rollout", "abort"]);
    assert!(ok, "{out}");
    let out = deploy.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("aborted by an operator"), "{text}");
    for r in ["us-east", "eu-west", "ap-southeast"] {
        assert_eq!(version_in(&w, r).await, new, "{r} after the abort");
    }
    assert!(wait_state(&w, "aborted and rolled back").contains("rollback"));

    // The rollout belongs to the control plane, not to the client that
    // started it: the client killed, an approval still finishes it.
    let (app, newest) = example_with("\n[rollout]\nmanual_approval = true\n# newest\n", false);
    let mut client_process = meridian()
        .arg("deploy")
        .arg(app.path())
        .arg("--world")
        .arg(w.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_state(&w, "awaiting approval");
    client_process.kill().unwrap();
    client_process.wait().unwrap();
    let (ok, out) = w.cli(&["rollout", "approve"]);
    assert!(ok, "{out}");
    assert!(wait_state(&w, "succeeded").contains(&newest));
    for r in ["us-east", "eu-west", "ap-southeast"] {
        assert_eq!(version_in(&w, r).await, newest, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_down_during_a_rollout_gets_the_version_when_it_returns() {
    let w = World::start(&[]);
    w.chaos(&["kill", "ap-southeast"]);
    let (app, new) = example_with("\n# while ap-southeast is down\n", false);
    let (ok, out) = w.cli(&["deploy", app.path().to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.lines().any(|l| l.contains("ap-southeast") && l.contains("pending")), "{out}");
    let (ok, status) = w.cli(&["status"]);
    assert!(ok && status.contains("ap-southeast") && status.contains("DOWN"), "{status}");
    w.chaos(&["restart", "ap-southeast"]);
    // The reconcile loop brings it to the desired version; drift is
    // reported until then, and not after.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = request(&client(), "GET", &format!("{}/hello", w.region_url("ap-southeast")), &[], "").await;
        // Answered by ap-southeast itself: while it catches up after the
        // restart, a peer (already on the new version) answers for it.
        if r.as_ref()
            .is_ok_and(|r| r.header("x-meridian-version") == new && r.header("x-meridian-region") == "ap-southeast")
        {
            break;
        }
        assert!(Instant::now() < deadline, "ap-southeast never got the version");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, status) = w.cli(&["status"]);
    assert!(ok && !status.contains("DRIFT") && !status.contains("DOWN"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_component_is_compiled_once_by_the_control_plane_and_loaded_by_every_region() {
    let w = World::start(&[]);
    // A component no one has compiled yet: hello.wasm with a custom section.
    let app = single_component_app(
        "hello.wasm",
        "[app]\nname = \"fresh\"\n[components.h]\nsource = \"c/hello.wasm\"\n[[routes]]\npath = \"/\"\ncomponent = \"h\"\n",
    );
    let wasm = app.path().join("c/hello.wasm");
    let (name, payload) = (b"meridian-test", format!("{:?}", Instant::now()).into_bytes());
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    let mut bytes = std::fs::read(&wasm).unwrap();
    bytes.push(0);
    bytes.push(section.len() as u8);
    bytes.extend_from_slice(&section);
    std::fs::write(&wasm, &bytes).unwrap();

    let (ok, out) = w.create_and_deploy(app.path(), false);
    assert!(ok, "{out}");
    for r in ["us-east", "eu-west", "ap-southeast"] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(r) && l.contains("active"))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(line.contains("loaded compiled code"), "{r} compiled it itself: {out}");
    }
    // By the leader, which keeps it (the world's first control node, unless
    // an election moved the lead).
    let compiled: Vec<_> = (1..=3)
        .filter_map(|i| std::fs::read_dir(w.dir.path().join(format!("data/control-{i}/compiled"))).ok())
        .flat_map(|d| d.flatten())
        .collect();
    assert!(!compiled.is_empty(), "the control plane kept no compiled code");

    // Machine code goes into a region only signed by the control plane:
    // an operator's signature, a forged one, or none are refused, and no
    // other role may even send it.
    let digest = "ab".repeat(32);
    let path = format!("/_meridian/compiled/{digest}");
    let r = &w.desc.regions[0];
    let target = meridian_http::cluster::Target::from_url(
        &r.cluster_url,
        meridian_trust::Expect::region(&r.name, &r.jurisdiction),
    )
    .unwrap();
    let operator_tls =
        meridian_trust::Tls::load(meridian_trust::TlsFiles::in_dir(&w.dir.path().join("certs"), "operator")).unwrap();
    let (sig, cert) = operator_tls.sign(b"anything").unwrap();
    let (sig, cert) = (hex_encode(&sig), hex_encode(&cert));
    for (who, headers) in [
        ("control-1", vec![]),
        ("control-1", vec![("x-meridian-signature", sig.as_str()), ("x-meridian-signer", cert.as_str())]),
        ("operator", vec![]),
        ("eu-west", vec![]),
    ] {
        let a = w
            .client_as(who)
            .call_with(
                &target,
                http::Method::PUT,
                &path,
                &headers,
                bytes::Bytes::from_static(b"\x7fELF machine code"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert!(a.status == 400 || a.status == 403, "{who} {headers:?}: {} {}", a.status, a.text());
    }
    let cached: Vec<_> = std::fs::read_dir(w.dir.path().join("data").join(&r.name).join("compiled"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&digest))
        .collect();
    assert!(cached.is_empty(), "unsigned code reached the cache");
    let r = get(&client(), &format!("{}/hello", w.edge("edge-eu-west")), &[("host", "fresh.localhost")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Who leads the control plane, from `meridian status --json`.
fn control_leader(w: &World) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = w.cli(&["status", "--json"]);
        if ok {
            let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
            if let Some(l) = v["control"]["control"]["leader"].as_str() {
                return l.to_string();
            }
        }
        assert!(Instant::now() < deadline, "no control-plane leader: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_the_loss_of_the_control_plane_leader_and_the_audit_log_has_no_gap() {
    let w = World::start(&[]);
    let leader = control_leader(&w);
    let (app, new) = example_with("\n[rollout]\nsteps = [20, 50, 100]\nbake_ms = 1500\nmin_requests = 5\n", false);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for (e, geo) in [("edge-us-east", US), ("edge-eu-west", EU), ("edge-ap-southeast", AP)] {
        for _ in 0..3 {
            clients.push(load(w.edge(e), &["/hello"], geo, true, stop.clone()));
        }
    }
    let deploy = deploy_in_background(&w, app.path());
    // Mid-rollout (the canary baked its first step), the leader dies.
    wait_status(&w, 30, "got going", |out| {
        out.lines().any(|l| l.contains("us-east") && l.contains("20%") && l.contains("ok"))
    });
    w.chaos(&["kill", &leader]);
    let killed_at = Instant::now();

    // The client that started the deploy follows the rollout to its end on
    // the new leader.
    let out = deploy.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("following the rollout"), "{text}");
    stop.store(true, Ordering::Relaxed);
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(40), "the rollout took {took:?} after the leader died");
    for r in ["us-east", "eu-west", "ap-southeast"] {
        assert_eq!(version_in(&w, r).await, new, "{r}");
    }
    let status = wait_state(&w, "succeeded");
    // Every step once and in order per region, although two leaders ran it.
    for r in ["us-east", "eu-west", "ap-southeast"] {
        let steps: Vec<&str> = status
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(r)).then(|| words.next().unwrap_or(""))
            })
            .collect();
        assert_eq!(steps, vec!["20%", "50%", "100%"], "{r}: {status}");
    }
    for c in clients {
        let seen = c.await.unwrap();
        assert!(seen.iter().all(|s| s.status == 200), "a user request failed while the control plane failed over");
    }

    // The audit log: numbered without a gap across both leaders, the
    // rollout's start by the operator, its resumption and end by the new
    // leader.
    let new_leader = control_leader(&w);
    assert_ne!(new_leader, leader);
    let (ok, out) = w.cli(&["audit", "--json"]);
    assert!(ok, "{out}");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&out[out.find('[').unwrap()..]).unwrap();
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "a gap: {out}");
    let find = |action: &str| {
        entries
            .iter()
            .rev()
            .find(|e| e["action"] == action && e["detail"].as_str().unwrap_or("").starts_with(&new))
            .unwrap_or_else(|| panic!("no {action} of {new}: {out}"))
    };
    assert_eq!(find("rollout.start")["who"], "admin");
    assert_eq!(find("rollout.resume")["who"], format!("control {new_leader}"));
    let end = find("rollout.end");
    assert_eq!(
        (end["who"].as_str().unwrap(), end["outcome"].as_str().unwrap()),
        (format!("control {new_leader}").as_str(), "succeeded")
    );

    // The old leader comes back as a follower and catches up; the control
    // plane still takes changes.
    w.chaos(&["restart", &leader]);
    let (ok, out) = w.cli(&["apps", "create", "after-failover"]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out) = w.cli(&["status"]);
        let line = out.lines().find(|l| l.starts_with("control plane")).unwrap_or("").to_string();
        if line.contains(&leader) && !line.contains("behind") {
            break;
        }
        assert!(Instant::now() < deadline, "{leader} never caught up: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rollback_region_only_the_failing_region_goes_back_and_an_operator_decides_the_rest() {
    let w = World::start(&[]);
    let old = version_in(&w, "eu-west").await;
    let (app, new) = example_with(
        "\n[rollout]\nwaves = [[\"us-east\"], [\"eu-west\"], [\"ap-southeast\"]]\nsteps = [50, 100]\nbake_ms = 1200\n\
         max_error_percent = 5\nmin_requests = 10\nrollback = \"region\"\n",
        true,
    );
    // Only Asian users hit the route that fails on the new version.
    let stop = Arc::new(AtomicBool::new(false));
    let trap = load(w.edge("edge-ap-southeast"), &["/trap"], AP, false, stop.clone());
    let deploy = deploy_in_background(&w, app.path());
    let status = wait_status(&w, 60, "halted", |out| out.contains("halted"));
    stop.store(true, Ordering::Relaxed);
    trap.await.unwrap();
    assert!(status.contains("ap-southeast 50%: gate: 5xx"), "{status}");
    // The regions that passed keep the new version; the failed one is back.
    assert_eq!(version_in(&w, "us-east").await, new);
    assert_eq!(version_in(&w, "eu-west").await, new);
    assert_eq!(version_in(&w, "ap-southeast").await, old);
    // Halted, not finished: another deploy of the app waits for a decision.
    let (other, _) = example_with("\n# another\n", false);
    let (ok, out) = w.cli(&["deploy", other.path().to_str().unwrap()]);
    assert!(!ok && out.contains("is in progress"), "{out}");

    // Resumed with the failing traffic gone, ap-southeast starts over and
    // the rollout completes.
    let (ok, out) = w.cli(&["rollout", "resume"]);
    assert!(ok, "{out}");
    let out = join_within(deploy, 60);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let status = wait_state(&w, "succeeded");
    let ap: Vec<&str> = status
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("ap-southeast")).then(|| words.next().unwrap_or(""))
        })
        .collect();
    assert_eq!(ap, vec!["50%", "rollback", "50%", "100%"], "{status}");
    for r in ["us-east", "eu-west", "ap-southeast"] {
        assert_eq!(version_in(&w, r).await, new, "{r}");
    }

    // Back to the version without the failing route (an emergency
    // rollback, everywhere at once), then a rollout halted again and
    // aborted: every region goes back.
    let (ok, out) = w.cli(&["rollback"]);
    assert!(ok, "{out}");
    let (app, newer) = example_with(
        "\n[rollout]\nwaves = [[\"us-east\"], [\"ap-southeast\"], [\"eu-west\"]]\nsteps = [50, 100]\nbake_ms = 1200\n\
         max_error_percent = 5\nmin_requests = 10\nrollback = \"region\"\n# newer\n",
        true,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let trap = load(w.edge("edge-ap-southeast"), &["/trap"], AP, false, stop.clone());
    let deploy = deploy_in_background(&w, app.path());
    wait_status(&w, 60, "halted", |out| out.contains("halted") && out.contains(&newer));
    stop.store(true, Ordering::Relaxed);
    trap.await.unwrap();
    assert_eq!(version_in(&w, "us-east").await, newer);
    assert_eq!(version_in(&w, "ap-southeast").await, old);
    assert_eq!(version_in(&w, "eu-west").await, old, "a later wave ran before the decision");
    let (ok, out) = w.cli(&["rollout", "abort"]);
    assert!(ok, "{out}");
    let out = join_within(deploy, 60);
    assert!(!out.status.success());
    assert!(wait_state(&w, "aborted and rolled back").contains("rollback"));
    for r in ["us-east", "eu-west", "ap-southeast"] {
        assert_eq!(version_in(&w, r).await, old, "{r} after the abort");
    }
}

/// The output of a `meridian` run in a thread, within `secs` (a hang fails
/// the test instead of holding it).
fn join_within(t: std::thread::JoinHandle<std::io::Result<std::process::Output>>, secs: u64) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !t.is_finished() {
        assert!(Instant::now() < deadline, "the command did not end within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.join().unwrap().unwrap()
}
