//! GeoDNS answers each client with its nearest healthy edge: located by the
//! EDNS Client Subnet a resolver forwards, or by the resolver itself;
//! an edge that dies leaves the answers. Queried with `dig`, as a user
//! would.

mod support;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

fn dig(server: &str, args: &[&str]) -> String {
    let (ip, port) = server.rsplit_once(':').unwrap();
    let out = Command::new("dig")
        .args([&format!("@{ip}"), "-p", port, "+short", "+tries=1", "+time=2"])
        .args(args)
        .output()
        .expect("dig is installed (dnsutils)");
    assert!(out.status.success(), "dig {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_gets_the_nearest_healthy_edge_for_europe_asia_and_the_us() {
    // The test database places 127.1/16 in Berlin, 127.2/16 in Singapore,
    // 127.3/16 in New York.
    let db = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../meridian-edge/tests/fixtures/test-geoip.mmdb");
    let w = World::start(&["--geoip-db", db.to_str().unwrap()]);
    let dns = w.desc.dns.clone().expect("dev runs GeoDNS");
    // Edges have addresses of their own: us-east 127.0.1.1, eu-west
    // 127.0.1.2, ap-southeast 127.0.1.3.
    let own = |edge: &str| {
        let i = w.desc.edges.iter().position(|e| e.name == edge).unwrap();
        format!("127.0.1.{}", i + 1)
    };
    for (subnet, edge) in
        [("127.1.0.0/24", "edge-eu-west"), ("127.2.0.0/24", "edge-ap-southeast"), ("127.3.0.0/24", "edge-us-east")]
    {
        let answer = dig(&dns, &["hello.localhost", "A", &format!("+subnet={subnet}")]);
        assert_eq!(answer, own(edge), "a client in {subnet}");
    }
    // The answered address serves the app.
    let eu = own("edge-eu-west");
    let port = w.edge("edge-eu-west").rsplit(':').next().unwrap().to_string();
    let r = get(&client(), &format!("http://{eu}:{port}/hello"), &[("host", "hello.localhost")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Without a subnet, the resolver (here 127.0.0.1, in no database) is
    // the client: some edge, still an answer.
    assert!(dig(&dns, &["notes.localhost", "A"]).starts_with("127.0.1."));
    // Names outside the zone are refused, not resolved.
    let out = Command::new("dig")
        .args([
            &format!("@{}", dns.rsplit_once(':').unwrap().0),
            "-p",
            dns.rsplit_once(':').unwrap().1,
            "example.com",
            "A",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("REFUSED"));

    // --- the European edge dies: European clients get the next nearest ---
    w.chaos(&["kill", "edge-eu-west"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = dig(&dns, &["hello.localhost", "A", "+subnet=127.1.0.0/24"]);
        if answer != eu {
            assert_eq!(answer, own("edge-us-east"), "Berlin's next nearest edge is Virginia's");
            break;
        }
        assert!(Instant::now() < deadline, "still answering the dead edge");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.chaos(&["restart", "edge-eu-west"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while dig(&dns, &["hello.localhost", "A", "+subnet=127.1.0.0/24"]) != eu {
        assert!(Instant::now() < deadline, "the restarted edge never came back into answers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
