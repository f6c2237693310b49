//! What one routing decision costs an edge, in process: parse the client's
//! location header, then rank the regions (`select::rank`) — the work
//! `Edge::handle` does per request before forwarding.
//!
//!     cargo run --release -p meridian-edge --example route_cost
//!
//! Issue 9's target: under 1 µs per decision.

use meridian_core::GeoPoint;
use meridian_edge::select::{rank, Candidate, Policy};
use std::hint::black_box;
use std::time::Instant;

fn regions(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate {
            // As an edge holds them: each region's unit vector made once.
            unit: GeoPoint { lat: -60.0 + (i as f64 * 137.0) % 120.0, lon: -170.0 + (i as f64 * 97.0) % 340.0 }.unit(),
            healthy: i % 5 != 4,
            rtt_ms: Some(5.0 + i as f64 * 11.0),
        })
        .collect()
}

fn main() {
    let headers: Vec<String> = (0..1024)
        .map(|i| format!("{:.2},{:.2}", -80.0 + (i * 7 % 160) as f64, -179.0 + (i * 13 % 358) as f64))
        .collect();
    println!("| regions | policy | ns per decision (header parse + rank) | target |");
    println!("|---|---|---|---|");
    for n in [3usize, 10, 30] {
        let cands = regions(n);
        for (name, policy) in [("geo", Policy::Geo), ("latency", Policy::Latency)] {
            let iters = 1_000_000;
            let mut best = f64::MAX;
            for _round in 0..5 {
                let t = Instant::now();
                for i in 0..iters {
                    let client: GeoPoint =
                        black_box(&headers[i % headers.len()]).parse().unwrap_or(GeoPoint { lat: 0.0, lon: 0.0 });
                    black_box(rank(policy, client, black_box(&cands)));
                }
                best = best.min(t.elapsed().as_nanos() as f64 / iters as f64);
            }
            println!("| {n} | {name} | {best:.0} | < 1000 |");
        }
    }
}
