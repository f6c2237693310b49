//! What anti-entropy and opening a store cost as the data held grows, in
//! process (two stores, the peer read directly: no network in the numbers).
//!
//!     cargo run --release -p meridian-data --example tree_bench [-- 10000 100000 1000000]
//!
//! For each size: load that many keys into store A (merged in batches, as
//! a snapshot arrives), copy it to B, reopen both (open time: no scan of
//! the records), then a round between identical stores, and a round after
//! one key changed in A — nodes compared, records pulled, time.

use meridian_data::antientropy::pull_differences;
use meridian_store::{Change, Record, Store, Timestamp, Value};
use std::time::Instant;

fn record(i: u64, origin: &str) -> Record {
    Record {
        value: Value::Bytes(vec![7; 100]),
        ts: Timestamp { wall_ms: 1_700_000_000_000 + i, logical: 0 },
        origin: origin.into(),
        seen: Timestamp::default(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![10_000, 100_000, 1_000_000] } else { sizes };
    println!(
        "| keys | load s | open ms | identical round: nodes / µs | one key differs: nodes / records / requests / µs |"
    );
    println!("|---|---|---|---|---|");
    for n in sizes {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a_path, b_path) = (dir.path().join("a"), dir.path().join("b"));
        let t = Instant::now();
        {
            let a = Store::open(&a_path, "eu-west").expect("open");
            let mut batch = Vec::with_capacity(10_000);
            for i in 0..n {
                let key = format!("session-{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).into_bytes();
                batch.push(Change { ns: "sessions".into(), key, record: record(i, "eu-west") });
                if batch.len() == 10_000 {
                    a.merge(std::mem::take(&mut batch)).await.expect("merge");
                }
            }
            a.merge(batch).await.expect("merge");
            a.flush_tree().await.expect("flush");
        }
        let load_s = t.elapsed().as_secs_f64();
        std::fs::copy(&a_path, &b_path).expect("copy");
        let t = Instant::now();
        let a = Store::open(&a_path, "eu-west").expect("open");
        let open_ms = t.elapsed().as_secs_f64() * 1e3;
        let b = Store::open(&b_path, "us-east").expect("open");

        let t = Instant::now();
        let same = pull_differences(&b, &a, "sessions", |_| Ok(())).await.expect("round");
        let same_us = t.elapsed().as_secs_f64() * 1e6;

        let key = format!("session-{:016x}", (n / 2).wrapping_mul(0x9e37_79b9_7f4a_7c15)).into_bytes();
        a.merge(vec![Change { ns: "sessions".into(), key, record: record(n + 1, "eu-west") }]).await.expect("merge");
        a.flush_tree().await.expect("flush");
        let t = Instant::now();
        let one = pull_differences(&b, &a, "sessions", |_| Ok(())).await.expect("round");
        let one_us = t.elapsed().as_secs_f64() * 1e6;
        assert_eq!(one.changed, 1);
        println!(
            "| {n} | {load_s:.1} | {open_ms:.1} | {} / {same_us:.0} | {} / {} / {} / {one_us:.0} |",
            same.nodes_compared, one.nodes_compared, one.records_pulled, one.requests
        );
    }
}
