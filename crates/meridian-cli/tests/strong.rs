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

async fn group_leader(_c: &Client, w: &World, region: &str) -> Option<String> {
    let (_, body) =
        w.region_call_as("operator", region, "GET", "/_meridian/apps/hello/kv/status", vec![]).await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["groups"][0]["leader"].as_str().map(String::from)
}

/// Random reads and writes of a few keys from one client, until `stop`.
async fn run_client(
    base: String,
    round: u64,
    id: u64,
    t0: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
    history: Arc<Mutex<Vec<Vec<Op>>>>,
) {
    let c = client_with_timeout();
    let mut x = (id + 100 * round).wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = (x % KEYS as u64) as usize;
        let url = format!("{base}/kv/ledger/s{round}r{key}");
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

/// Faults injected during a round, at fixed offsets.
enum Fault {
    KillLeader,
    RestartKilled,
    Cut(&'static str, &'static str),
    Heal(&'static str, &'static str),
    IsolateLeader,
    HealIsolated,
}

async fn leader_now(c: &Client, w: &World) -> Option<String> {
    for r in REGIONS {
        if let Some(l) = group_leader(c, w, r).await {
            return Some(l);
        }
    }
    None
}

/// One seeded round: six clients (two per region) read and write three
/// keys while `faults` happen; then every key's history is checked.
async fn round(w: &World, seed: u64, faults: &[(u64, Fault)]) {
    let c = client();
    let t0 = Instant::now();
    let history: Arc<Mutex<Vec<Vec<Op>>>> = Arc::new(Mutex::new(vec![Vec::new(); KEYS]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, r) in REGIONS.iter().enumerate() {
        for j in 0..2 {
            let id = (i * 2 + j + 1) as u64;
            tasks.push(tokio::spawn(run_client(w.region_url(r), seed, id, t0, stop.clone(), history.clone())));
        }
    }
    let mut first_fault = None;
    let (mut killed, mut isolated) = (None::<String>, None::<String>);
    for (at_ms, f) in faults {
        let wait = Duration::from_millis(*at_ms).saturating_sub(t0.elapsed());
        tokio::time::sleep(wait).await;
        first_fault.get_or_insert(t0.elapsed().as_micros() as u64);
        match f {
            Fault::KillLeader => {
                let l = leader_now(&c, w).await.expect("a leader");
                w.chaos(&["kill", &l]);
                killed = Some(l);
            }
            Fault::RestartKilled => w.chaos(&["restart", killed.as_deref().expect("a killed region")]),
            Fault::Cut(a, b) => w.chaos(&["cut", a, b]),
            Fault::Heal(a, b) => w.chaos(&["heal", a, b]),
            Fault::IsolateLeader => {
                let l = leader_now(&c, w).await.expect("a leader");
                for r in REGIONS.iter().filter(|r| **r != l) {
                    w.chaos(&["cut", &l, r]);
                }
                isolated = Some(l);
            }
            Fault::HealIsolated => {
                let l = isolated.clone().expect("an isolated region");
                for r in REGIONS.iter().filter(|r| **r != l) {
                    w.chaos(&["heal", &l, r]);
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }

    let history = history.lock().unwrap().clone();
    let total: usize = history.iter().map(Vec::len).sum();
    let first = first_fault.unwrap_or(0);
    // Progress, not only safety: operations completed well after the first fault.
    let after = history.iter().flatten().filter(|o| o.ret.is_some() && o.call > first + 3_000_000).count();
    eprintln!("seed {seed}: {total} operations, {after} completed more than 3 s after the first fault");
    assert!(total > 40, "seed {seed}: only {total} operations");
    assert!(after > 10, "seed {seed}: no progress after the fault:\n{}", w.log());
    for (k, ops) in history.iter().enumerate() {
        lincheck::check(ops, None)
            .unwrap_or_else(|e| panic!("seed {seed}: key r{k} is not linearizable: {e}\n{ops:#?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_namespace_stays_linearizable_while_the_leader_dies_and_a_link_is_cut() {
    let w = World::start(&[]);
    let c = client();
    // The group forms with its first leader in the preferred region.
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
    // Three seeded rounds, each with its own faults.
    round(
        &w,
        1,
        &[
            (1500, Fault::KillLeader),
            (5500, Fault::RestartKilled),
            (7000, Fault::Cut("eu-west", "ap-southeast")),
            (9500, Fault::Heal("eu-west", "ap-southeast")),
            (10500, Fault::Heal("eu-west", "ap-southeast")),
        ],
    )
    .await;
    round(&w, 2, &[(1000, Fault::IsolateLeader), (5000, Fault::HealIsolated), (7000, Fault::HealIsolated)]).await;
    round(
        &w,
        3,
        &[
            (1000, Fault::KillLeader),
            (2500, Fault::Cut("us-east", "eu-west")),
            (5000, Fault::RestartKilled),
            (6000, Fault::Heal("us-east", "eu-west")),
            (11000, Fault::Heal("us-east", "eu-west")),
        ],
    )
    .await;
}
