//! Users reach every edge over HTTPS with HTTP/2 or HTTP/1.1, by hostname
//! (SNI); a hostname without a certificate gets a TLS alert, and a new
//! certificate is served without a restart. Driven with curl, as a user
//! would.

mod support;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl is installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edge_serves_https_by_hostname_with_h2_and_refuses_unknown_hosts() {
    let w = World::start(&[]);
    let certs = w.dir.path().join("certs");
    let ca = certs.join("public-ca.pem");
    let ca = ca.to_str().unwrap();
    for e in &w.desc.edges {
        let https = e.https_url.as_deref().expect("dev edges serve HTTPS");
        let port = https.rsplit(':').next().unwrap();
        let resolve = |host: &str| format!("{host}:{port}:127.0.0.1");
        for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
            let url = format!("https://hello.localhost:{port}/hello");
            let (ok, out, err) = curl(&[
                "--cacert",
                ca,
                flag,
                "--resolve",
                &resolve("hello.localhost"),
                "-w",
                "\n%{http_version} %{http_code}",
                &url,
            ]);
            assert!(ok, "{}: {err}", e.name);
            assert!(out.starts_with("Hello from "), "{out}");
            assert!(out.ends_with(&format!("\n{want} 200")), "{}: {out}", e.name);
        }
        // No certificate names this host: a TLS alert, not the example's
        // certificate under another name.
        let url = format!("https://other.example:{port}/hello");
        let (ok, _, err) = curl(&["--cacert", ca, "--resolve", &resolve("other.example"), &url]);
        assert!(!ok, "{}: an unknown host was served", e.name);
        assert!(err.contains("alert"), "{}: {err}", e.name);
        // Not trusting the world's public CA fails too (it is not a
        // public CA), and the cluster CA does not vouch for it.
        let cluster_ca = certs.join("ca.pem");
        let (ok, _, _) = curl(&[
            "--cacert",
            cluster_ca.to_str().unwrap(),
            "--resolve",
            &resolve("hello.localhost"),
            &format!("https://hello.localhost:{port}/hello"),
        ]);
        assert!(!ok, "the cluster CA vouched for a public certificate");
    }

    // A certificate dropped into the directory is served within a reload.
    meridian_trust::issue_site(
        &certs.join("public-ca.pem"),
        &certs.join("public-ca.key"),
        &["shop.example".into()],
        &certs.join("sites"),
        "shop",
        1,
    )
    .unwrap();
    let https = w.desc.edges[0].https_url.clone().unwrap();
    let port = https.rsplit(':').next().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, _, err) = curl(&[
            "--cacert",
            ca,
            "--resolve",
            &format!("shop.example:{port}:127.0.0.1"),
            "-o",
            "/dev/null",
            &format!("https://shop.example:{port}/"),
        ]);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was not picked up: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
