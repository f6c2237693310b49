//! A region dies under load and users do not notice.

mod support;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

struct Sample {
    started: Instant,
    ok: bool,
    region: String,
    detail: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_nearest_region_fails_no_request_and_traffic_returns_after_restart() {
    let w = World::start(&[]);
    let url = format!("{}/hello", w.edge("edge-eu-west"));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (url, samples, stop) = (url.clone(), samples.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let r = request(&c, "GET", &url, &[("x-meridian-client-geo", "48.86,2.35")], "").await;
                let (ok, region, detail) = match r {
                    Ok(r) => (r.status == 200, r.region(), format!("{} {}", r.status, r.body)),
                    Err(e) => (false, String::new(), e),
                };
                samples.lock().unwrap().push(Sample { started, ok, region, detail });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = w.pid_of("eu-west").expect("eu-west runs");
    let killed_at = Instant::now();
    w.chaos(&["kill", "eu-west"]);
    assert!(w.pid_of("eu-west").is_none());
    // SAFETY: signal 0 only checks that the PID exists.
    assert_ne!(unsafe { libc::kill(pid as i32, 0) }, 0, "eu-west pid {pid} still alive");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted_at = Instant::now();
    w.chaos(&["restart", "eu-west"]);
    // Wait for traffic to come back to eu-west.
    let back_at = loop {
        let last = samples
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s.started > restarted_at && s.region == "eu-west")
            .map(|s| s.started);
        if let Some(t) = last {
            break t;
        }
        assert!(restarted_at.elapsed() < Duration::from_secs(20), "traffic did not return to eu-west:\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in workers {
        h.await.unwrap();
    }
    let samples = samples.lock().unwrap();
    let failed: Vec<_> = samples.iter().filter(|s| !s.ok).map(|s| &s.detail).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(5)]
    );
    let before: Vec<_> = samples.iter().filter(|s| s.started < killed_at).collect();
    assert!(before.len() > 20 && before.iter().all(|s| s.region == "eu-west"));
    // Within 1 s of the kill, every request is served by the next-nearest region.
    let moved: Vec<_> =
        samples.iter().filter(|s| s.started > killed_at + Duration::from_secs(1) && s.started < restarted_at).collect();
    assert!(moved.len() > 20, "too few samples during the outage: {}", moved.len());
    assert!(moved.iter().all(|s| s.region == "us-east"), "{:?}", moved.iter().map(|s| &s.region).collect::<Vec<_>>());
    let first_rerouted =
        samples.iter().find(|s| s.started > killed_at && s.region == "us-east").map(|s| s.started - killed_at);
    eprintln!(
        "{} requests, 0 failed; first us-east response started {:?} after the kill; back on eu-west {:?} after restart",
        samples.len(),
        first_rerouted,
        back_at - restarted_at
    );
    // After it is back, it stays back.
    assert!(samples.iter().filter(|s| s.started > back_at + Duration::from_millis(100)).all(|s| s.region == "eu-west"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_takes_its_region_out_of_rotation_until_healed() {
    let w = World::start(&[]);
    let c = client();
    let url = format!("{}/hello", w.edge("edge-eu-west"));
    let paris = [("x-meridian-client-geo", "48.86,2.35")];
    assert_eq!(get(&c, &url, &paris).await.region(), "eu-west");
    // A black hole, not a dead process: only the probes can tell.
    w.chaos(&["cut", "edge-eu-west", "eu-west"]);
    let t = Instant::now();
    loop {
        let s = w.edge_status("edge-eu-west").await;
        let eu = s["regions"].as_array().unwrap().iter().find(|r| r[0] == "eu-west").unwrap().clone();
        if eu[1]["healthy"] == false {
            assert_eq!(eu[1]["ejected_for"], "probes_failed");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "eu-west still healthy behind a cut link");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&c, &url, &paris).await.region(), "us-east");
    // Other edges still reach eu-west: only that one link is cut.
    assert_eq!(get(&c, &format!("{}/hello", w.edge("edge-us-east")), &paris).await.region(), "eu-west");
    w.chaos(&["heal", "edge-eu-west", "eu-west"]);
    let t = Instant::now();
    while get(&c, &url, &paris).await.region() != "eu-west" {
        assert!(t.elapsed() < Duration::from_secs(10), "traffic did not return after heal");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
