//! `strong` namespaces are linearizable from every region while the leader
//! region is killed and a link is cut: the recorded history of concurrent
//! clients in all regions passes a linearizability checker.

#[path = "support/lincheck.rs"]
mod lincheck;
mod support;

use lincheck::{Kind, Op};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-southeast"];
const KEYS: usize = 3;

async fn group_leader(c: &Client, w: &World, region: &str) -> Option<String> {
    let url = format!("{}/_meridian/kv/status", w.region_url(region));
    let r = request(c, "GET", &url, &[("authorization", &format!("Bearer {}", w.token))], "").await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    v["groups"][0]["leader"].as_str().map(String::from)
}

/// Random reads and writes of a few keys from one client, until `stop`.
async fn run_client(
    base: String,
    id: u64,
    t0: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
    history: Arc<Mutex<Vec<Vec<Op>>>>,
) {
    let c = client_with_timeout();
    let mut x = id.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = (x % KEYS as u64) as usize;
        let url = format!("{base}/kv/ledger/r{key}");
        let call = t0.elapsed().as_micros() as u64;
        if x & 0x100 == 0 {
            n += 1;
            let v = id * 1_000_000 + n;
            // Recorded before it is sent: if no answer ever comes, the write
            // may still have happened.
            let at = {
                let mut h = history.lock().unwrap();
                h[key].push(Op { call, ret: None, kind: Kind::Write(v) });
                h[key].len() - 1
            };
            let r = timed(&c, "PUT", &url, &v.to_string()).await;
            if matches!(&r, Ok(r) if r.status == 200) {
                history.lock().unwrap()[key][at].ret = Some(t0.elapsed().as_micros() as u64);
            }
        } else {
            let op = match timed(&c, "GET", &url, "").await {
                Ok(r) if r.status == 200 => Op {
                    call,
                    ret: Some(t0.elapsed().as_micros() as u64),
                    kind: Kind::Read(Some(r.body.trim().parse().expect("a written number"))),
                },
                Ok(r) if r.status == 404 && r.body.starts_with("not found") => {
                    Op { call, ret: Some(t0.elapsed().as_micros() as u64), kind: Kind::Read(None) }
                }
                // A failed read tells nothing.
                _ => Op { call, ret: None, kind: Kind::Read(None) },
            };
            history.lock().unwrap()[key].push(op);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A request that gives up after 5 s (its outcome is then unknown).
async fn timed(c: &Client, method: &str, url: &str, body: &str) -> Result<Resp, String> {
    match tokio::time::timeout(Duration::from_secs(5), request(c, method, url, &[], body)).await {
        Ok(r) => r,
        Err(_) => Err("timeout".into()),
    }
}

fn client_with_timeout() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build(hyper_util::client::legacy::connect::HttpConnector::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_namespace_stays_linearizable_while_the_leader_dies_and_a_link_is_cut() {
    let w = World::start(&[]);
    let c = client();
    // The group elects the preferred leader (us-east).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut leaders = Vec::new();
        for r in REGIONS {
            leaders.push(group_leader(&c, &w, r).await);
        }
        if leaders.iter().all(|l| l.as_deref() == Some("us-east")) {
            break;
        }
        assert!(Instant::now() < deadline, "no common leader: {leaders:?}\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let t0 = Instant::now();
    let history: Arc<Mutex<Vec<Vec<Op>>>> = Arc::new(Mutex::new(vec![Vec::new(); KEYS]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, r) in REGIONS.iter().enumerate() {
        for j in 0..2 {
            let id = (i * 2 + j + 1) as u64;
            tasks.push(tokio::spawn(run_client(w.region_url(r), id, t0, stop.clone(), history.clone())));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = t0.elapsed().as_micros() as u64;
    w.chaos(&["kill", "us-east"]);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    w.chaos(&["restart", "us-east"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.chaos(&["cut", "eu-west", "ap-southeast"]);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    w.chaos(&["heal", "eu-west", "ap-southeast"]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }

    let history = history.lock().unwrap().clone();
    let total: usize = history.iter().map(Vec::len).sum();
    let ok = |o: &Op| o.ret.is_some();
    // Progress, not only safety: writes succeeded after the leader died.
    let after_kill = history.iter().flatten().filter(|o| ok(o) && o.call > killed_at + 3_000_000).count();
    eprintln!("{total} operations, {after_kill} completed more than 3 s after the leader was killed");
    assert!(total > 60, "only {total} operations");
    assert!(after_kill > 10, "the group made no progress after losing its leader:\n{}", w.log());
    for (k, ops) in history.iter().enumerate() {
        lincheck::check(ops, None).unwrap_or_else(|e| panic!("key r{k} is not linearizable: {e}\n{ops:#?}"));
    }
}
