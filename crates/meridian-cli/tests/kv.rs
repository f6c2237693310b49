//! Replicated key-value namespaces in a real world: functions write through
//! wasi:keyvalue in every region while links are cut, regions are killed or
//! wiped; afterwards every region holds the same data, counters hold the
//! exact sums, residency held, and tokens give read-your-writes.

mod support;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-southeast"];

/// Digest of a namespace in a region (its cluster port, not through links).
async fn digest(_c: &Client, w: &World, region: &str, ns: &str) -> Option<String> {
    let (status, body) = w
        .region_call_as("operator", region, "GET", &format!("/_meridian/apps/hello/kv/digest/{ns}"), vec![])
        .await
        .ok()?;
    (status == 200).then_some(body)
}

/// One operation through a region's kv API; the parsed JSON answer.
async fn kv_op(_c: &Client, w: &World, region: &str, op: serde_json::Value) -> serde_json::Value {
    let (status, body) =
        w.region_call(region, "POST", "/_meridian/apps/hello/kv/op", op.to_string().into_bytes()).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn counter(c: &Client, w: &World, region: &str, key: &str) -> i64 {
    let r = kv_op(c, w, region, serde_json::json!({"op": "get", "ns": "counters", "key": key})).await;
    let v = r["value_hex"].as_str().map(|h| String::from_utf8(hex::decode(h).unwrap()).unwrap());
    v.map(|v| v.parse().unwrap()).unwrap_or(0)
}

/// Waits until every region reports the same digest for each namespace.
async fn converged(c: &Client, w: &World, nss: &[&str], within: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        let mut last = String::new();
        let mut all = true;
        for ns in nss {
            let mut ds = Vec::new();
            for r in REGIONS {
                ds.push(digest(c, w, r, ns).await);
            }
            if ds.iter().any(|d| d.is_none()) || ds.windows(2).any(|p| p[0] != p[1]) {
                all = false;
                last = format!("{ns}: {ds:?}");
            }
        }
        if all {
            return Ok(t.elapsed());
        }
        if t.elapsed() > within {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `Ok` if the request was answered 200; otherwise what went wrong, with
/// the transport error or the answer's status and body.
fn expect_ok(r: &Result<Resp, String>) -> Result<(), String> {
    match r {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("status {}: {}", r.status, r.body)),
        Err(e) => Err(format!("no answer: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_region_converges_after_heal_with_exact_counters_and_counted_conflicts() {
    let w = World::start(&["--anti-entropy-ms", "1000"]);
    let c = client();
    w.chaos(&["cut", "eu-west", "us-east"]);
    w.chaos(&["cut", "eu-west", "ap-southeast"]);

    // Every region's functions write the same keys and bump the same
    // counters while eu-west is cut off. Only acknowledged operations count.
    let sums: Arc<Mutex<BTreeMap<String, i64>>> = Default::default();
    let mut tasks = Vec::new();
    for (ri, region) in REGIONS.iter().enumerate() {
        let (base, sums) = (w.region_url(region), sums.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            let t = Instant::now();
            let mut i = 0u64;
            while t.elapsed() < Duration::from_secs(3) {
                let key = format!("user-{}", i % 10);
                let r = request(&c, "PUT", &format!("{base}/kv/sessions/{key}"), &[], &format!("{region}-{i}")).await;
                expect_ok(&r).map_err(|e| format!("PUT {base}/kv/sessions/{key} (round {i}): {e}"))?;
                let ck = format!("c{}", i % 3);
                let delta = (ri as i64 + 1) * if i % 4 == 3 { -1 } else { 2 };
                let r = request(&c, "POST", &format!("{base}/kv/counters/{ck}?incr={delta}"), &[], "").await;
                if r.map(|r| r.status == 200).unwrap_or(false) {
                    *sums.lock().unwrap().entry(ck).or_default() += delta;
                }
                if i % 7 == 6 {
                    let r = request(&c, "DELETE", &format!("{base}/kv/sessions/{key}"), &[], "").await;
                    expect_ok(&r).map_err(|e| format!("DELETE {base}/kv/sessions/{key} (round {i}): {e}"))?;
                }
                i += 1;
            }
            Ok::<u64, String>(i)
        }));
    }
    let mut total = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(n) => total += n,
            Err(e) => panic!("{e}\n{}", w.log()),
        }
    }
    assert!(total > 30, "only {total} write rounds");
    // Still partitioned: eu-west and the others disagree.
    assert!(converged(&c, &w, &["sessions"], Duration::ZERO).await.is_err(), "converged across a partition?");

    w.chaos(&["heal", "eu-west", "us-east"]);
    w.chaos(&["heal", "eu-west", "ap-southeast"]);
    let took = converged(&c, &w, &["sessions", "counters"], Duration::from_secs(5))
        .await
        .unwrap_or_else(|d| panic!("not converged 5 s after heal: {d}\n{}", w.log()));
    eprintln!("converged {took:?} after heal ({total} write rounds)");

    let sums = sums.lock().unwrap().clone();
    for r in REGIONS {
        for (k, sum) in &sums {
            assert_eq!(counter(&c, &w, r, k).await, *sum, "counter {k} in {r}");
        }
    }
    // The same keys were written on both sides of the partition: the
    // losers are counted and kept, not silently dropped.
    let (ok, out) = w.cli(&["kv", "conflicts", "--ns", "sessions", "--region", "eu-west"]);
    assert!(ok, "{out}");
    let n: usize = out.lines().last().and_then(|l| l.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(n > 0, "no conflicts recorded:\n{out}");
    let (ok, status) = w.cli(&["kv", "status"]);
    assert!(ok && status.contains("<- eu-west"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_sigkill_and_reach_the_other_regions() {
    let w = World::start(&[]);
    let base = w.region_url("eu-west");
    let acked: Arc<Mutex<Vec<String>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let (base, acked, stop) = (base.clone(), acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("w{worker}-{i}");
                if let Ok(r) = request(&c, "PUT", &format!("{base}/kv/sessions/{key}"), &[], &key).await {
                    if r.status == 200 {
                        acked.lock().unwrap().push(key);
                    }
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.chaos(&["kill", "eu-west"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20, "only {} writes acknowledged", acked.len());
    w.chaos(&["restart", "eu-west"]);

    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    for region in REGIONS {
        for key in &acked {
            loop {
                let r = kv_op(&c, &w, region, serde_json::json!({"op": "get", "ns": "sessions", "key": key})).await;
                if r["value_hex"].as_str() == Some(&hex::encode(key)) {
                    break;
                }
                assert!(Instant::now() < deadline, "acknowledged {key} missing in {region}: {r}\n{}", w.log());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_region_is_rebuilt_from_its_peers() {
    let w = World::start(&["--anti-entropy-ms", "1000"]);
    let c = client();
    for (i, region) in REGIONS.iter().enumerate() {
        for k in 0..20 {
            let url = format!("{}/kv/sessions/{region}-{k}", w.region_url(region));
            assert_eq!(request(&c, "PUT", &url, &[], &format!("v{i}-{k}")).await.unwrap().status, 200);
        }
        let url = format!("{}/kv/counters/total?incr={}", w.region_url(region), i + 1);
        assert_eq!(request(&c, "POST", &url, &[], "").await.unwrap().status, 200);
    }
    converged(&c, &w, &["sessions", "counters"], Duration::from_secs(10)).await.unwrap();
    let before = digest(&c, &w, "us-east", "sessions").await.unwrap();

    w.chaos(&["kill", "ap-southeast"]);
    let data = w.dir.path().join("data/ap-southeast");
    std::fs::remove_dir_all(&data).unwrap();
    w.chaos(&["restart", "ap-southeast"]);
    let took = converged(&c, &w, &["sessions", "counters"], Duration::from_secs(30))
        .await
        .unwrap_or_else(|d| panic!("wiped region not rebuilt: {d}\n{}", w.log()));
    eprintln!("wiped region rebuilt in {took:?}");
    assert_eq!(digest(&c, &w, "ap-southeast", "sessions").await.unwrap(), before);
    assert_eq!(counter(&c, &w, "ap-southeast", "total").await, 6);
    // And it replicates its new writes again.
    let url = format!("{}/kv/sessions/after-wipe", w.region_url("ap-southeast"));
    assert_eq!(request(&c, "PUT", &url, &[], "new").await.unwrap().status, 200);
    converged(&c, &w, &["sessions"], Duration::from_secs(10)).await.unwrap();

    // Now that all hold the same, an anti-entropy round compares the roots
    // of the two trees and nothing else: one node per namespace per round.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let rounds = |s: &serde_json::Value| {
        let peers = s["peers"].as_array().unwrap().clone();
        let sum = |f: &str| peers.iter().map(|p| p[f].as_u64().unwrap()).sum::<u64>();
        (sum("anti_entropy_rounds"), sum("tree_nodes_compared"))
    };
    let (r0, n0) = rounds(&kv_op_status(&c, &w, "eu-west").await);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (r1, n1) = rounds(&kv_op_status(&c, &w, "eu-west").await);
    assert!(r1 - r0 >= 4, "{} rounds in 3.5 s with two peers every second", r1 - r0);
    assert_eq!(n1 - n0, r1 - r0, "rounds on equal data compared more than their roots");
}

/// The scale test: a region wiped while the others hold a million
/// keys catches up — from eu-west's snapshot, streamed in pages, and its
/// own rejoin rounds, pulled in pages (periodic anti-entropy is set far
/// off) — converges, and its memory stays below a bound that does not grow
/// with the data: the pages in flight and the storage engine's fixed
/// cache, not the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_region_with_a_million_keys_catches_up_from_a_streamed_snapshot_in_bounded_memory() {
    const N: usize = 1_000_000;
    const BATCH: usize = 10_000;
    /// Peak resident memory of the catching-up region. It held ~120 MiB
    /// before catching up and its data directory ends above 250 MiB.
    const RSS_BOUND_MIB: u64 = 320;
    // A rejoin bound well above the catch-up (27-37 s here in a debug
    // build on one machine, over 60 s on a slower disk), so the state says
    // whether it caught up rather than when the default bound ran out.
    let w = World::start(&["--anti-entropy-ms", "600000", "--rejoin-bound-ms", "900000"]);
    let c = client();
    let t = Instant::now();
    for b in 0..N / BATCH {
        let items: Vec<serde_json::Value> = (b * BATCH..(b + 1) * BATCH)
            .map(|i| serde_json::json!({"key": format!("user-{i:07}"), "value_hex": hex::encode(format!("{i:0100}"))}))
            .collect();
        let r = kv_op(&c, &w, "eu-west", serde_json::json!({"op": "set_many", "ns": "sessions", "items": items})).await;
        assert_eq!(r["written"], BATCH, "{r}");
    }
    eprintln!("{N} keys written in eu-west in {:?}", t.elapsed());
    let took = converged(&c, &w, &["sessions"], Duration::from_secs(240))
        .await
        .unwrap_or_else(|d| panic!("a million keys not replicated: {d}\n{}", w.log()));
    eprintln!("replicated everywhere {took:?} later");
    let before = digest(&c, &w, "us-east", "sessions").await.unwrap();
    // Once both peers have acknowledged it, eu-west's log is trimmed: a
    // peer that lost everything can only be sent a snapshot.
    let t = Instant::now();
    while kv_op_status(&c, &w, "eu-west").await["log_len"].as_u64() != Some(0) {
        assert!(t.elapsed() < Duration::from_secs(30), "eu-west's log never trimmed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    w.chaos(&["kill", "ap-southeast"]);
    let data = w.dir.path().join("data/ap-southeast");
    std::fs::remove_dir_all(&data).unwrap();
    w.chaos(&["restart", "ap-southeast"]);
    let pid = w.pid_of("ap-southeast").expect("restarted");
    let kib = |field: &str| -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = s.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let t = Instant::now();
    loop {
        if digest(&c, &w, "ap-southeast", "sessions").await.as_ref() == Some(&before) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(240), "wiped region not caught up in 240 s\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let peak = kib("VmHWM:").expect("the region runs");
    let held = dir_size(&data);
    eprintln!("caught up in {:?}: peak RSS {} MiB; data directory {} MiB", t.elapsed(), peak >> 10, held >> 20);
    // The snapshot's last part (and eu-west's count) follows its pages.
    let t = Instant::now();
    let to_ap = loop {
        let eu = kv_op_status(&c, &w, "eu-west").await;
        let p = eu["peers"].as_array().unwrap().iter().find(|p| p["peer"] == "ap-southeast").unwrap().clone();
        if p["snapshots_sent"].as_u64().unwrap() >= 1 || t.elapsed() > Duration::from_secs(60) {
            eprintln!("eu-west's snapshot complete {:?} after the digests matched", t.elapsed());
            break p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(to_ap["snapshots_sent"].as_u64().unwrap() >= 1, "{to_ap}");
    // What came by eu-west's snapshot (pushed) and by ap-southeast's own
    // rejoin rounds (pulled, from both peers, in pages too) covers it all.
    // The rounds count what they changed when they end, which on a loaded
    // machine can be after the data (and the digest) already matched.
    let t = Instant::now();
    let ap = loop {
        let ap = kv_op_status(&c, &w, "ap-southeast").await;
        if ap["rejoin"]["state"] != "catching_up" || t.elapsed() > Duration::from_secs(120) {
            break ap;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let pulled = ap["rejoin"]["records_repaired"].as_u64().unwrap();
    let pushed = to_ap["snapshot_records_sent"].as_u64().unwrap();
    eprintln!("snapshot records from eu-west {pushed}; records changed by the rejoin rounds {pulled}");
    assert!(pushed > 0 && pushed + pulled >= N as u64, "{to_ap}\n{}", ap["rejoin"]);
    assert_eq!(ap["rejoin"]["state"], "caught_up", "{}", ap["rejoin"]);
    assert!(peak >> 10 < RSS_BOUND_MIB, "peak RSS {} MiB; the bound is {RSS_BOUND_MIB} MiB", peak >> 10);
    assert!(held >> 20 > 200, "the data held ({} MiB) should dwarf what the catch-up may keep in memory", held >> 20);
    assert_eq!(
        kv_op(&c, &w, "ap-southeast", serde_json::json!({"op": "get", "ns": "sessions", "key": "user-0999999"})).await
            ["value_hex"],
        hex::encode(format!("{:0100}", 999_999))
    );
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Rejoin before serving: a region restarted after missing writes — and
/// cut off from the region that made them — takes users back only once
/// it holds what its reachable peers held when it returned. A client next
/// to it reads every acknowledged write, never a stale answer, across the
/// restart; then the region serves again and says in status whom it
/// caught up with. (Anti-entropy is set far off: without the rejoin, the
/// region would serve 404s for those keys for ten minutes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_region_serves_no_stale_read_of_a_write_acknowledged_before_it_returned() {
    const K: usize = 3000;
    let w = World::start(&["--anti-entropy-ms", "600000"]);
    let c = client();
    w.chaos(&["kill", "ap-southeast"]);
    // Written (and acknowledged) in us-east while ap-southeast is down.
    let items: Vec<serde_json::Value> = (0..K)
        .map(|i| serde_json::json!({"key": format!("away-{i}"), "value_hex": hex::encode(format!("written-{i}"))}))
        .collect();
    let r = kv_op(&c, &w, "us-east", serde_json::json!({"op": "set_many", "ns": "sessions", "items": items})).await;
    assert_eq!(r["written"], K, "{r}");
    // eu-west has them; ap-southeast comes back cut off from us-east.
    let t = Instant::now();
    while digest(&c, &w, "eu-west", "sessions").await != digest(&c, &w, "us-east", "sessions").await {
        assert!(t.elapsed() < Duration::from_secs(20), "eu-west never got us-east's writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.chaos(&["cut", "us-east", "ap-southeast"]);
    w.chaos(&["restart", "ap-southeast"]);

    // A client next to ap-southeast reads through its edge throughout.
    let url = w.edge("edge-ap-southeast");
    let singapore = [("x-meridian-client-geo", "1.35,103.82")];
    let t = Instant::now();
    let (mut served_by, mut stale, mut back_at) = (BTreeMap::<String, u32>::new(), Vec::new(), None);
    let mut i = 0usize;
    while t.elapsed() < Duration::from_secs(20) {
        let key = (i * 7919) % K;
        i += 1;
        let r = get(&c, &format!("{url}/kv/sessions/away-{key}"), &singapore).await;
        *served_by.entry(r.region()).or_default() += 1;
        if r.status != 200 || r.body != format!("written-{key}") {
            stale.push(format!("away-{key}: {} {:?} from {}", r.status, r.body, r.region()));
        }
        if r.region() == "ap-southeast" && back_at.is_none() {
            back_at = Some(t.elapsed());
        }
        if back_at.is_some_and(|b| t.elapsed() > b + Duration::from_secs(1)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("{i} reads across the restart, answered by {served_by:?}; ap-southeast serving again after {back_at:?}");
    assert!(
        stale.is_empty(),
        "{} stale or failed reads, first: {:?}\n{}",
        stale.len(),
        &stale[..stale.len().min(5)],
        w.log()
    );
    assert!(back_at.is_some(), "ap-southeast never served again: {served_by:?}\n{}", w.log());

    let st = kv_op_status(&c, &w, "ap-southeast").await;
    let rejoin = &st["rejoin"];
    assert_eq!(rejoin["state"], "caught_up", "{rejoin}");
    assert_eq!(rejoin["caught_up_with"], serde_json::json!(["eu-west"]), "{rejoin}");
    assert_eq!(rejoin["unreachable"], serde_json::json!(["us-east"]), "{rejoin}");
    assert!(rejoin["records_repaired"].as_u64().unwrap() >= K as u64, "{rejoin}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eu_namespace_never_reaches_a_non_eu_disk_log_or_replication_stream() {
    // Capture every replication message every region sends.
    let capture = tempfile::tempdir().unwrap();
    std::env::set_var("MERIDIAN_CAPTURE_REPLICATION", capture.path());
    let w = World::start(&["--anti-entropy-ms", "300"]);
    std::env::remove_var("MERIDIAN_CAPTURE_REPLICATION");
    let c = client();

    // Random operations on the EU namespace from functions in every region,
    // and global writes alongside so replication is busy.
    let mut marks = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..60 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let region = REGIONS[(seed % 3) as usize];
        let base = w.region_url(region);
        let key = format!("person-{}", seed % 7);
        let mark = format!("RESIDENT{seed:016x}");
        match (seed >> 8) % 4 {
            0 | 1 => {
                let r = request(&c, "PUT", &format!("{base}/kv/profiles/{key}"), &[], &mark).await.unwrap();
                assert_eq!(r.status, 200, "{}", r.body);
                marks.push(mark);
            }
            2 => {
                let r = request(&c, "GET", &format!("{base}/kv/profiles/{key}"), &[], "").await.unwrap();
                assert!(r.status == 200 || r.status == 404, "{}", r.body);
            }
            _ => {
                let r = request(&c, "POST", &format!("{base}/kv/profiles/{key}?append"), &[], &mark).await.unwrap();
                assert_eq!(r.status, 200, "{}", r.body);
                marks.push(mark);
            }
        }
        let r = request(&c, "PUT", &format!("{base}/kv/sessions/s{i}"), &[], "global").await.unwrap();
        assert_eq!(r.status, 200);
    }
    // Let replication and a few anti-entropy rounds run.
    converged(&c, &w, &["sessions"], Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let data = w.dir.path().join("data");
    let logs = w.dir.path().join("logs");
    let captured: Vec<_> = std::fs::read_dir(capture.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(captured.len() >= 6, "replication traffic was not captured: {captured:?}");
    // The search works: the current values are in eu-west's store (older,
    // overwritten ones may be gone from its pages)...
    let mut current = 0;
    for k in 0..7 {
        let r =
            kv_op(&c, &w, "eu-west", serde_json::json!({"op": "get", "ns": "profiles", "key": format!("person-{k}")}))
                .await;
        if let Some(h) = r["value_hex"].as_str() {
            let v = hex::decode(h).unwrap();
            let last_mark = &v[v.len() - 24..];
            assert!(
                !files_containing(&data.join("eu-west"), last_mark).is_empty(),
                "current value not on eu-west's disk"
            );
            current += 1;
        }
    }
    assert!(current > 0);
    for mark in &marks {
        let m = mark.as_bytes();
        // ...and no value ever written is anywhere outside the EU.
        for region in ["us-east", "ap-southeast"] {
            let found = files_containing(&data.join(region), m);
            assert!(found.is_empty(), "{mark} on {region}'s disk: {found:?}");
            let to_region: Vec<_> = captured
                .iter()
                .filter(|p| p.to_string_lossy().ends_with(&format!("-to-{region}.bin")))
                .filter(|p| std::fs::read(p).unwrap().windows(m.len()).any(|w| w == m))
                .collect();
            assert!(to_region.is_empty(), "{mark} replicated to {region}: {to_region:?}");
        }
        let found = files_containing(&logs, m);
        assert!(found.is_empty(), "{mark} in logs: {found:?}");
    }
    // Nor in any region's metrics or status.
    for region in REGIONS {
        for path in ["/_meridian/metrics", "/_meridian/apps/hello/kv/status"] {
            let (status, body) = w.region_call(region, "GET", path, vec![]).await;
            assert_eq!(status, 200);
            assert!(body.contains("eu-west"), "{path} of {region}: {body}");
            assert!(!body.contains("RESIDENT"), "a value in {path} of {region}");
        }
    }
    // Global data did replicate through the same captured streams.
    assert!(captured.iter().any(|p| std::fs::read(p).unwrap().windows(6).any(|w| w == b"global")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_causality_token_gives_read_your_writes_in_another_region() {
    let w = World::start(&[]);
    let c = client();
    // Replication from eu-west to us-east now takes 0.4 s. (Not longer: a
    // forwarded read may need a new connection across the link — TCP and
    // TLS, three crossings — within the regions' 2 s connect timeout; at
    // 1.2 s this test passed only when anti-entropy had left a pooled
    // connection behind.)
    w.chaos(&["latency", "eu-west", "us-east", "400"]);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let r = request(&c, "PUT", &format!("{}/kv/sessions/cart", w.region_url("eu-west")), &[], "3 items").await.unwrap();
    assert_eq!(r.status, 200);
    let token = r.header("x-meridian-causality");
    assert!(token.starts_with("eu-west:"), "no causality token: {:?}", r.headers);
    assert!(r.header("set-cookie").starts_with("meridian-causality="), "{:?}", r.headers);

    // Without the token, us-east does not have the write yet...
    let us = format!("{}/kv/sessions/cart", w.edge("edge-us-east"));
    let stale = get(&c, &us, &[("x-meridian-client-country", "US")]).await;
    assert_eq!((stale.status, stale.region().as_str()), (404, "us-east"), "{}", stale.body);
    // ...with it (as the cookie a browser sends back, through the edge), the
    // user moved to us-east reads their own write.
    let cookie = format!("meridian-causality={token}");
    let fresh = get(&c, &us, &[("x-meridian-client-country", "US"), ("cookie", &cookie)]).await;
    assert_eq!(fresh.status, 200, "{}", fresh.body);
    assert_eq!(fresh.body, "3 items");
    // And with the header form.
    let fresh = get(&c, &us, &[("x-meridian-client-country", "US"), ("x-meridian-causality", &token)]).await;
    assert_eq!(fresh.body, "3 items");

    // A forged token — an altered sequence number, a made-up tag, an
    // unsigned one, or one sealed by another world — is ignored: served at
    // once by us-east, neither waited on (500 ms) nor forwarded across the
    // 0.4 s link.
    let (entries, tag) = token.rsplit_once('.').unwrap();
    let (prefix, seq) = entries.rsplit_once(':').unwrap();
    let forged = [
        format!("{prefix}:{}.{tag}", seq.parse::<u64>().unwrap() + 1000),
        format!("{entries}.{}", "0".repeat(32)),
        entries.to_string(),
        "eu-west:1:1000000".to_string(),
    ];
    for f in &forged {
        for h in [("x-meridian-causality", f.clone()), ("cookie", format!("meridian-causality={f}"))] {
            let t = Instant::now();
            let r = get(&c, &format!("{us}-forged"), &[("x-meridian-client-country", "US"), (h.0, &h.1)]).await;
            let took = t.elapsed();
            assert_eq!((r.status, r.region().as_str()), (404, "us-east"), "{f}: {}", r.body);
            assert!(took < Duration::from_millis(300), "a forged token ({f}) was waited on: {took:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_truncated_foreign_and_wrong_version_replication_messages_change_nothing() {
    let w = World::start(&[]);
    let c = client();
    let eu = w.region_url("eu-west");
    let url = format!("{eu}/kv/sessions/k");
    assert_eq!(request(&c, "PUT", &url, &[], "v").await.unwrap().status, 200);
    // A bucket the manifest does not declare is an error the guest sees
    // (wasi:keyvalue error::no-such-store, which the example turns into a
    // 404), not a crash.
    let r = request(&c, "GET", &format!("{eu}/kv/undeclared/k"), &[], "").await.unwrap();
    assert_eq!((r.status, r.body.starts_with("no such bucket")), (404, true), "{}", r.body);
    let before = digest(&c, &w, "eu-west", "sessions").await.unwrap();

    // A valid message from us-east, to tamper with.
    let change = |ns: &str, v: &[u8]| meridian_store::Change {
        ns: ns.into(),
        key: b"k".to_vec(),
        record: meridian_store::Record {
            value: meridian_store::Value::Bytes(v.to_vec()),
            ts: meridian_store::Timestamp { wall_ms: meridian_store::hlc::system_ms(), logical: 0 },
            origin: "us-east".into(),
            seen: Default::default(),
        },
    };
    let msg = |origin: &str, ns: &str| meridian_store::Message::Push {
        origin: origin.into(),
        incarnation: 1,
        prev_seq: 0,
        last_seq: 1,
        stable: Default::default(),
        changes: vec![change(ns, b"EVIL")],
    };
    let good = msg("us-east", "sessions").encode();
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n / 2] ^= 1;
    let mut version = good.clone();
    version[4] = 99;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("flipped byte", flipped, 400),
        ("truncated", good[..good.len() - 7].to_vec(), 400),
        ("wrong version", version, 400),
        ("not a message", b"hello".to_vec(), 400),
        ("unknown origin", msg("mars", "sessions").encode(), 403),
        (
            "clock at the maximum",
            {
                let mut m = msg("us-east", "sessions");
                if let meridian_store::Message::Push { changes, .. } = &mut m {
                    changes[0].record.ts = meridian_store::Timestamp { wall_ms: u64::MAX, logical: u32::MAX };
                }
                m.encode()
            },
            400,
        ),
        (
            "counter past i64::MAX",
            {
                let mut m = msg("us-east", "counters");
                if let meridian_store::Message::Push { changes, .. } = &mut m {
                    let mut incs = std::collections::BTreeMap::new();
                    incs.insert("us-east".to_string(), u64::MAX);
                    changes[0].record.value = meridian_store::Value::Counter { incs, decs: Default::default() };
                }
                m.encode()
            },
            400,
        ),
    ];
    // Sent with us-east's certificate, as us-east would.
    let push = "/_meridian/apps/hello/repl/push";
    for (what, body, status) in &cases {
        let r = w.region_call_as("us-east", "eu-west", "POST", push, body.clone()).await.unwrap();
        assert_eq!(r.0, *status, "{what}: {}", r.1);
    }
    // An operator's or an edge's certificate may not replicate at all.
    for who in ["operator", "edge-us-east"] {
        let r = w.region_call_as(who, "eu-west", "POST", push, good.clone()).await.unwrap();
        assert_eq!(r.0, 403, "{who}: {}", r.1);
    }
    // A residency breach: an EU-only namespace pushed into us-east.
    let r = w
        .region_call_as("eu-west", "us-east", "POST", push, {
            let mut m = msg("eu-west", "profiles");
            if let meridian_store::Message::Push { changes, .. } = &mut m {
                changes[0].record.origin = "eu-west".into();
            }
            m.encode()
        })
        .await
        .unwrap();
    assert_eq!(r.0, 403, "{}", r.1);

    assert_eq!(digest(&c, &w, "eu-west", "sessions").await.unwrap(), before, "a rejected message changed data");
    let v = kv_op(&c, &w, "eu-west", serde_json::json!({"op": "get", "ns": "sessions", "key": "k"})).await;
    assert_eq!(v["value_hex"], hex::encode("v"));
    let status = kv_op_status(&c, &w, "eu-west").await;
    assert_eq!(status["rejected_messages"], 7, "{status}");
    let log = std::fs::read_to_string(w.dir.path().join("logs/eu-west.log")).unwrap();
    assert!(log.matches("replication message rejected").count() >= 7, "{log}");
    assert!(log.contains("ahead of this region's clock") && log.contains("outside the 64-bit"), "{log}");
    // The region keeps serving, and its own clock was not dragged forward:
    // a new write still carries a timestamp of today.
    let r = request(&c, "PUT", &format!("{eu}/kv/sessions/after"), &[], "ok").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // A function adding past i64::MAX gets an error value (the example turns
    // it into a 503 that names it), and the counter is unchanged.
    let big = format!("{eu}/kv/counters/big?incr={}", i64::MAX);
    assert_eq!(request(&c, "POST", &big, &[], "").await.unwrap().body.trim(), i64::MAX.to_string());
    let r = request(&c, "POST", &format!("{eu}/kv/counters/big?incr=1"), &[], "").await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("64-bit signed"), "{}", r.body);
    assert_eq!(counter(&c, &w, "eu-west", "big").await, i64::MAX);
    // The same through Raft (the strong `ledger` namespace).
    let big = format!("{eu}/kv/ledger/big?incr={}", i64::MAX);
    let r = request(&c, "POST", &big, &[], "").await.unwrap();
    assert_eq!(r.body.trim(), i64::MAX.to_string(), "{}", r.body);
    let r = request(&c, "POST", &format!("{eu}/kv/ledger/big?incr=1"), &[], "").await.unwrap();
    assert!(r.status >= 500 && r.body.contains("64-bit signed"), "{}: {}", r.status, r.body);
    let r = request(&c, "GET", &format!("{eu}/kv/ledger/big"), &[], "").await.unwrap();
    assert_eq!(r.body.trim(), i64::MAX.to_string());
    assert!(log.contains("checksum mismatch") && log.contains("format version 99"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_collected_only_once_every_region_has_seen_them() {
    let w = World::start(&[]);
    let c = client();
    for k in 0..10 {
        let url = format!("{}/kv/sessions/doomed-{k}", w.region_url("us-east"));
        assert_eq!(request(&c, "PUT", &url, &[], "x").await.unwrap().status, 200);
    }
    converged(&c, &w, &["sessions"], Duration::from_secs(10)).await.unwrap();
    // ap-southeast is cut off while eu-west deletes everything.
    w.chaos(&["cut", "ap-southeast", "us-east"]);
    w.chaos(&["cut", "ap-southeast", "eu-west"]);
    for k in 0..10 {
        let url = format!("{}/kv/sessions/doomed-{k}", w.region_url("eu-west"));
        assert_eq!(request(&c, "DELETE", &url, &[], "").await.unwrap().status, 200);
    }
    // Several collection rounds pass: the tombstones must stay, since
    // ap-southeast has not seen them (dropping them would let its old
    // values come back through anti-entropy).
    tokio::time::sleep(Duration::from_secs(5)).await;
    for r in ["us-east", "eu-west"] {
        let s = kv_op_status(&c, &w, r).await;
        assert_eq!(s["tombstones"], 10, "{r}: {s}");
    }
    w.chaos(&["heal", "ap-southeast", "us-east"]);
    w.chaos(&["heal", "ap-southeast", "eu-west"]);
    // Once everyone has them, they go everywhere, and the keys stay deleted.
    let deadline = Instant::now() + Duration::from_secs(15);
    for r in REGIONS {
        loop {
            let s = kv_op_status(&c, &w, r).await;
            if s["tombstones"] == 0 && s["tombstones_collected"].as_u64().unwrap_or(0) >= 10 {
                break;
            }
            assert!(Instant::now() < deadline, "{r} still holds tombstones: {s}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let r2 = kv_op(&c, &w, r, serde_json::json!({"op": "list", "ns": "sessions"})).await;
        assert_eq!(r2["keys"], serde_json::json!(null), "{r}: {r2}");
    }
    converged(&c, &w, &["sessions"], Duration::from_secs(5)).await.unwrap();
}

async fn kv_op_status(_c: &Client, w: &World, region: &str) -> serde_json::Value {
    let (status, body) = w.region_call(region, "GET", "/_meridian/apps/hello/kv/status", vec![]).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}
