//! A world assembled by hand from the documented steps (README, docs/roles.md),
//! the way an operator would on separate machines: `meridian certs`, one
//! config file per role, `meridian region|edge|control --config`, and
//! `meridian deploy --control --token-file --tls-dir`. No `meridian dev`.

mod support;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use support::*;

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` distinct free ports (each held until all are picked: a port
/// released at once may be handed out again by the next bind).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

fn run(args: &[&str], dir: &Path) -> String {
    let out =
        meridian().args(args).current_dir(dir).env("MERIDIAN_CONTEXTS", dir.join("contexts.toml")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "meridian {args:?}: {text}");
    text
}

fn start(role: &str, config: &Path, dir: &Path, procs: &mut Procs) -> PathBuf {
    let ready = dir.join(format!("{}.ready", config.file_stem().unwrap().to_str().unwrap()));
    let log =
        std::fs::File::create(dir.join(format!("{}.log", config.file_stem().unwrap().to_str().unwrap()))).unwrap();
    let child = meridian()
        .args([role, "--config"])
        .arg(config)
        .arg("--ready-file")
        .arg(&ready)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    procs.0.push(child);
    ready
}

fn wait_file(p: &Path, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        if Instant::now() > deadline {
            let mut logs = String::new();
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    logs += &format!("--- {}\n{}", e.path().display(), std::fs::read_to_string(e.path()).unwrap());
                }
            }
            panic!("{} never appeared\n{logs}", p.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_built_from_the_documented_steps_serves_replicates_and_deploys() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Certificates, exactly as in docs/roles.md.
    run(&["certs", "init", "--dir", "certs"], d);
    run(&["certs", "issue", "--dir", "certs", "--role", "region", "--name", "eu-west", "--jurisdiction", "eu"], d);
    run(&["certs", "issue", "--dir", "certs", "--role", "region", "--name", "us-east", "--jurisdiction", "us"], d);
    run(&["certs", "issue", "--dir", "certs", "--role", "edge", "--name", "edge-fra"], d);
    run(&["certs", "issue", "--dir", "certs", "--role", "control", "--name", "control"], d);
    run(&["certs", "issue", "--dir", "certs", "--role", "operator", "--name", "operator"], d);
    assert!(run(&["certs", "show", "certs/eu-west.pem"], d).contains("region eu-west [eu]"));
    // A certificate cannot be issued for a region without a jurisdiction.
    let out = meridian().args(["certs", "issue", "--role", "region", "--name", "x"]).current_dir(d).output().unwrap();
    assert!(!out.status.success());

    let regions = [("eu-west", "eu", 53.35, -6.26), ("us-east", "us", 38.9, -77.0)];
    let free = free_ports(regions.len() * 2 + 3);
    let ports: Vec<(u16, u16)> = (0..regions.len()).map(|i| (free[2 * i], free[2 * i + 1])).collect();
    let mut procs = Procs(Vec::new());
    for (i, (name, _, _, _)) in regions.iter().enumerate() {
        let mut cfg = format!(
            r#"name = "{name}"
public_listen = "127.0.0.1:{}"
cluster_listen = "127.0.0.1:{}"
data_dir = "data/{name}"
cluster_key_file = "certs/cluster.key"

[tls]
ca = "certs/ca.pem"
cert = "certs/{name}.pem"
key = "certs/{name}.key"
"#,
            ports[i].0, ports[i].1
        );
        for (j, (peer, jur, _, _)) in regions.iter().enumerate() {
            if i != j {
                cfg += &format!(
                    "\n[[peers]]\nname = \"{peer}\"\nurl = \"https://127.0.0.1:{}\"\njurisdiction = \"{jur}\"\nrtt_ms = 70.0\n",
                    ports[j].1
                );
            }
        }
        std::fs::write(d.join(format!("{name}.toml")), cfg).unwrap();
    }
    let n = free.len();
    let (edge_public, edge_cluster, control_port) = (free[n - 3], free[n - 2], free[n - 1]);
    let mut edge = format!(
        r#"name = "edge-fra"
listen = "127.0.0.1:{edge_public}"
cluster_listen = "127.0.0.1:{edge_cluster}"
location = {{ lat = 50.11, lon = 8.68 }}

[tls]
ca = "certs/ca.pem"
cert = "certs/edge-fra.pem"
key = "certs/edge-fra.key"

[health]
interval_ms = 100
"#
    );
    let mut control = format!(
        r#"listen = "127.0.0.1:{control_port}"
data_dir = "data/control"
token_file = "token"
reconcile_interval_ms = 500

[tls]
ca = "certs/ca.pem"
cert = "certs/control.pem"
key = "certs/control.key"
"#
    );
    for (i, (name, _, lat, lon)) in regions.iter().enumerate() {
        edge += &format!(
            "\n[[regions]]\nname = \"{name}\"\nurl = \"https://127.0.0.1:{}\"\nlocation = {{ lat = {lat}, lon = {lon} }}\n",
            ports[i].1
        );
        control += &format!("\n[[regions]]\nname = \"{name}\"\nurl = \"https://127.0.0.1:{}\"\n", ports[i].1);
    }
    std::fs::write(d.join("edge.toml"), edge).unwrap();
    std::fs::write(d.join("control.toml"), control).unwrap();
    std::fs::write(d.join("token"), "operator-secret\n").unwrap();

    let mut ready = Vec::new();
    for (name, _, _, _) in &regions {
        ready.push(start("region", &d.join(format!("{name}.toml")), d, &mut procs));
    }
    ready.push(start("edge", &d.join("edge.toml"), d, &mut procs));
    ready.push(start("control", &d.join("control.toml"), d, &mut procs));
    for r in &ready {
        wait_file(r, d);
    }

    // Deploy the example (its strong namespace names a third region this
    // world does not have, so it is left out).
    let app = example_app_copy();
    let manifest = std::fs::read_to_string(app.path().join("meridian.toml")).unwrap();
    let manifest = &manifest[..manifest.find("[kv.ledger]").unwrap()];
    std::fs::write(app.path().join("meridian.toml"), manifest).unwrap();
    let control_url = format!("https://127.0.0.1:{control_port}");
    let out = run(
        &[
            "apps",
            "create",
            "hello",
            "--host",
            "hello.example.test",
            "--default",
            "--control",
            &control_url,
            "--token-file",
            "token",
            "--tls-dir",
            "certs",
        ],
        d,
    );
    assert!(out.contains("hello.example.test"), "{out}");
    let out = run(
        &[
            "deploy",
            app.path().to_str().unwrap(),
            "--control",
            &control_url,
            "--token-file",
            "token",
            "--tls-dir",
            "certs",
        ],
        d,
    );
    assert!(out.contains("eu-west") && out.contains("us-east") && out.contains("active"), "{out}");

    // Users reach it through the edge (nearest region to Frankfurt: eu-west).
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = request(&c, "GET", &format!("http://127.0.0.1:{edge_public}/hello"), &[], "").await;
        if let Ok(r) = r {
            if r.status == 200 {
                assert_eq!(r.region(), "eu-west", "{}", r.body);
                break;
            }
        }
        assert!(Instant::now() < deadline, "the edge never served the app");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Internal paths do not exist for users.
    let r = request(&c, "GET", &format!("http://127.0.0.1:{edge_public}/_meridian/kv/status"), &[], "").await.unwrap();
    assert_eq!(r.status, 404);
    // Data written in eu-west replicates to us-east over mutual TLS.
    let put = format!("http://127.0.0.1:{}/kv/sessions/hand", ports[0].0);
    assert_eq!(request(&c, "PUT", &put, &[], "built by hand").await.unwrap().status, 200);
    let get_us = format!("http://127.0.0.1:{}/kv/sessions/hand", ports[1].0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = request(&c, "GET", &get_us, &[], "").await.unwrap();
        if r.status == 200 {
            assert_eq!(r.body, "built by hand");
            break;
        }
        assert!(Instant::now() < deadline, "no replication to us-east: {}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The EU-only namespace stays on eu-west.
    let put = format!("http://127.0.0.1:{}/kv/profiles/anna", ports[1].0);
    assert_eq!(request(&c, "PUT", &put, &[], "HANDBUILT-EU").await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let found = files_containing(&d.join("data/us-east"), b"HANDBUILT-EU");
    assert!(found.is_empty(), "EU data on us-east's disk: {found:?}");
    // A named context makes the same world flag-free, as kubectl's do.
    run(&["context", "add", "hand", "--control", &control_url, "--token-file", "token", "--tls-dir", "certs"], d);
    let status = run(&["status"], d);
    assert!(status.contains("app hello") && status.contains("eu-west") && status.contains("up"), "{status}");
    assert!(!status.contains("DOWN"), "{status}");
    let out = run(&["deploy", app.path().to_str().unwrap()], d);
    assert!(out.contains("deployed hello"), "{out}");
    // Data administration works through the context too (no world file).
    let out = run(&["kv", "get", "--ns", "sessions", "hand", "--region", "us-east"], d);
    assert!(out.contains("built by hand"), "{out}");
    assert!(run(&["context", "list"], d).contains("* hand"));
    // A wrong token is refused by the control plane.
    std::fs::write(d.join("wrong"), "nope").unwrap();
    let out = meridian()
        .args([
            "deploy",
            app.path().to_str().unwrap(),
            "--control",
            &control_url,
            "--token-file",
            "wrong",
            "--tls-dir",
            "certs",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", String::from_utf8_lossy(&out.stderr));
}
