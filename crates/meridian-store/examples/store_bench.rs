//! Durable writes through `Store` vs raw redb with the same fsync policy, in
//! one run, and the latency of a local `get`.
//!
//!     cargo run --release -p meridian-store --example store_bench [-- WRITES [ROUNDS]]

use meridian_store::Store;
use redb::{Database, TableDefinition};
use std::time::Instant;

const RAW: TableDefinition<&[u8], &[u8]> = TableDefinition::new("raw");

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let round_count: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().expect("temp dir");
    let value = vec![7u8; 100];
    let mut rounds = Vec::new();
    // Alternate the two so machine noise lands on both.
    for round in 0..round_count {
        let raw_db = Database::create(dir.path().join(format!("raw{round}.redb"))).expect("raw db");
        let t = Instant::now();
        for i in 0..n {
            let txn = raw_db.begin_write().expect("txn");
            {
                let mut table = txn.open_table(RAW).expect("table");
                let key = format!("sessions\0key-{i}");
                table.insert(key.as_bytes(), value.as_slice()).expect("insert");
            }
            txn.commit().expect("commit"); // Durability::Immediate: fsync
        }
        let raw = n as f64 / t.elapsed().as_secs_f64();

        let store = Store::open(&dir.path().join(format!("store{round}.redb")), "eu-west").expect("store");
        let t = Instant::now();
        for i in 0..n {
            store.put_blocking("sessions", format!("key-{i}").as_bytes(), value.clone()).expect("put");
        }
        let ours = n as f64 / t.elapsed().as_secs_f64();

        // The same writes from 64 concurrent writers (as from many requests
        // at once): group commit shares each fsync among them.
        let store2 = Store::open(&dir.path().join(format!("group{round}.redb")), "eu-west").expect("store");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        let t = Instant::now();
        rt.block_on(async {
            let per = n / 64;
            let tasks: Vec<_> = (0..64)
                .map(|w| {
                    let (s, v) = (store2.clone(), value.clone());
                    tokio::spawn(async move {
                        for i in 0..per {
                            s.put("sessions", format!("key-{w}-{i}").as_bytes(), v.clone()).await.expect("put");
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
        });
        let group = (n / 64 * 64) as f64 / t.elapsed().as_secs_f64();
        rounds.push((raw, ours, group));

        // Local reads of existing keys.
        let mut lat: Vec<f64> = (0..n)
            .map(|i| {
                let k = format!("key-{}", (i * 7919) % n);
                let t = Instant::now();
                let r = store.get("sessions", k.as_bytes()).expect("get");
                let dt = t.elapsed().as_secs_f64() * 1e6;
                assert!(r.is_some());
                dt
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        println!(
            "round {round}: raw redb {raw:.0} writes/s, Store::put {ours:.0} writes/s ({:.2}x), 64 concurrent writers {group:.0} writes/s ({:.2}x); Store::get p50 {:.1} µs, p99 {:.1} µs",
            ours / raw,
            group / raw,
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100]
        );
    }
    let (raw, ours, group): (f64, f64, f64) =
        rounds.iter().fold((0.0, 0.0, 0.0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
    let k = rounds.len() as f64;
    println!(
        "mean of {} rounds: raw {:.0} writes/s, Store one writer {:.0} writes/s ({:.2}x, target >= 0.8x), 64 writers {:.0} writes/s ({:.2}x)",
        rounds.len(),
        raw / k,
        ours / k,
        ours / raw,
        group / k,
        group / raw
    );
}
