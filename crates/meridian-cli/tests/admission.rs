//! An app's admission limits (`[limits] max_concurrency`,
//! `requests_per_second`): beyond them a region answers 429 at once with
//! Retry-After, instead of queueing work that would take the region from
//! everything else.

mod support;
use std::time::{Duration, Instant};
use support::*;

fn hostile_app(limits: &str) -> tempfile::TempDir {
    single_component_app(
        "hostile.wasm",
        &format!(
            "[app]\nname = \"hostile\"\n[limits]\ndeadline_ms = 1500\nmemory_mb = 16\n{limits}\n[components.h]\nsource = \"c/hostile.wasm\"\n[[routes]]\npath = \"/\"\ncomponent = \"h\"\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_an_apps_limits_get_429_at_once() {
    let w = World::start(&[]);
    let c = client();
    let region = w.region_url("us-east");

    // Two endless loops may run; the others are refused without waiting.
    let app = hostile_app("max_concurrency = 2");
    let (ok, out) = w.create_and_deploy(app.path(), true);
    assert!(ok, "{out}");
    let spins: Vec<_> = (0..6)
        .map(|_| {
            let (c, url) = (c.clone(), format!("{region}/spin"));
            tokio::spawn(async move {
                let t = Instant::now();
                let r = get(&c, &url, &[]).await;
                (r.status, r.header("retry-after"), t.elapsed())
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for s in spins {
        let (status, retry, took) = s.await.unwrap();
        if status == 429 {
            assert_eq!(retry, "1");
            assert!(took < Duration::from_millis(500), "a refused request waited {took:?}");
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, vec![429, 429, 429, 429, 504, 504], "{statuses:?}");

    // A rate: a burst of 30 against 5/s is mostly refused, and it recovers.
    let app = hostile_app("requests_per_second = 5");
    let (ok, out) = w.create_and_deploy(app.path(), true);
    assert!(ok, "{out}");
    let mut codes = Vec::new();
    for _ in 0..30 {
        codes.push(get(&c, &format!("{region}/fine"), &[]).await.status);
    }
    let ok = codes.iter().filter(|s| **s == 200).count();
    assert!((4..=8).contains(&ok), "{ok} of 30 admitted at 5/s: {codes:?}");
    assert!(codes.iter().all(|s| *s == 200 || *s == 429), "{codes:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&c, &format!("{region}/fine"), &[]).await.status, 200);

    // Edges learn the app's rate from the regions' health answers and
    // refuse its excess themselves, before the WAN: their 429s name no
    // region.
    let edge = w.edge("edge-us-east");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut refused_at_edge = 0;
        let mut admitted = 0;
        for _ in 0..30 {
            let r = get(&c, &format!("{edge}/fine"), &[]).await;
            match r.status {
                200 => admitted += 1,
                429 if r.region().is_empty() => {
                    assert_eq!(r.header("retry-after"), "1");
                    refused_at_edge += 1;
                }
                429 => {}
                s => panic!("{s}: {}", r.body),
            }
        }
        if refused_at_edge > 0 {
            assert!(admitted <= 8, "the edge admitted {admitted} of 30 at 5/s");
            break;
        }
        assert!(Instant::now() < deadline, "the edge never enforced the app's rate");
    }
}
