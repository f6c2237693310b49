//! Cost of one routing decision, in process: ranking regions and applying
//! an app's `[routing]` for a request, as `Edge::handle` does for each.
//! `cargo run --release -p meridian-edge --example plan_cost`

use meridian_core::wire::{AppRouting, CountryRule, ResidencyRule, Routing, RoutingPolicy};
use meridian_core::GeoPoint;
use meridian_edge::health::{HealthConfig, RegionHealth};
use meridian_edge::routing::{plan, Client, Regions, Routes};
use meridian_edge::select::{Candidate, Policy};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn main() {
    let sites = [
        ("us-east", "us", 39.04, -77.49),
        ("us-west", "us", 45.84, -119.7),
        ("eu-west", "eu", 53.35, -6.26),
        ("eu-central", "eu", 50.11, 8.68),
        ("ap-southeast", "sg", 1.35, 103.82),
        ("ap-northeast", "jp", 35.68, 139.69),
    ];
    let names: Vec<String> = sites.iter().map(|s| s.0.to_string()).collect();
    let jurisdictions: Vec<Option<String>> = sites.iter().map(|s| Some(s.1.to_string())).collect();
    let mut health = RegionHealth::new();
    health.probe_ok(Duration::from_millis(20), &HealthConfig::default());
    let candidates: Vec<Candidate> =
        sites.iter().map(|s| Candidate::new(GeoPoint { lat: s.2, lon: s.3 }, &health)).collect();
    let regions = Regions { candidates: &candidates, names: &names, jurisdictions: &jurisdictions };
    let routes = Routes::default();
    let app = |name: &str, routing: Routing| AppRouting {
        app: name.into(),
        hosts: vec![format!("{name}.example")],
        default: false,
        routing,
        answer_within_ms: None,
    };
    routes.update(
        vec![
            app(
                "weighted",
                Routing {
                    policy: RoutingPolicy::Weighted,
                    weights: [("us-east".into(), 70), ("eu-west".into(), 30)].into(),
                    affinity: true,
                    ..Default::default()
                },
            ),
            app(
                "resident",
                Routing {
                    countries: vec![CountryRule { countries: vec!["DE".into()], region: "eu-central".into() }],
                    residency: vec![ResidencyRule { clients: "eu".into(), regions: "eu".into() }],
                    ..Default::default()
                },
            ),
        ],
        &names,
    );
    let paris = GeoPoint { lat: 48.86, lon: 2.35 };
    let cases: [(&str, Option<&str>, Client); 3] = [
        ("edge geo only", None, Client { point: paris, country: Some("FR"), affinity: None }),
        (
            "weighted + affinity cookie",
            Some("weighted.example"),
            Client { point: paris, country: Some("FR"), affinity: Some("eu-west") },
        ),
        (
            "country rule + residency",
            Some("resident.example"),
            Client { point: paris, country: Some("DE"), affinity: None },
        ),
    ];
    println!("| decision (6 regions) | ns per request |");
    println!("|---|---|");
    for (name, host, client) in cases {
        let n = 1_000_000u32;
        let t = Instant::now();
        for i in 0..n {
            // The app lookup by host is part of every request's decision.
            let app = routes.for_host(host);
            let p = plan(Policy::Geo, app.as_deref(), black_box(&client), &regions, f64::from(i % 1000) / 1000.0);
            black_box(p);
        }
        println!("| {name} | {:.0} |", t.elapsed().as_nanos() as f64 / f64::from(n));
    }
}
