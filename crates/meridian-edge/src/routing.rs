//! Per-app routing at the edge: each app's `[routing]` (policy, weights,
//! failover order, country rules, affinity, residency), learned from the
//! regions' health answers like the apps' rate limits, and the plan of
//! regions to try for one request.
//!
//! Planning is pure: callers pass health, the client and a random number,
//! so tests drive every policy without sockets.

use crate::select::{rank, Candidate, Policy};
use arc_swap::ArcSwap;
use meridian_core::wire::{AppRouting, RoutingPolicy};
use meridian_core::GeoPoint;
use std::collections::HashMap;
use std::sync::Arc;

/// One app's routing with region names resolved to this edge's indices
/// (names the edge does not know are dropped).
#[derive(Debug)]
pub struct AppRoute {
    pub app: String,
    policy: RoutingPolicy,
    weights: Vec<(usize, u32)>,
    order: Vec<usize>,
    pub affinity: bool,
    countries: HashMap<String, usize>,
    /// Client jurisdiction -> the only jurisdiction whose regions serve it.
    residency: Vec<(String, String)>,
    /// The app is the world's default (served at bare addresses).
    pub default: bool,
    /// How long a healthy region may take to start answering (the app's
    /// slowest function's deadline and a margin).
    pub answer_within: Option<std::time::Duration>,
}

#[derive(Default)]
struct Table {
    reported: Vec<AppRouting>,
    by_host: HashMap<String, Arc<AppRoute>>,
    default: Option<Arc<AppRoute>>,
}

#[derive(Default)]
pub struct Routes {
    table: ArcSwap<Table>,
}

impl Routes {
    /// Takes what a region reported; `names` are the edge's regions in
    /// index order.
    pub fn update(&self, mut reported: Vec<AppRouting>, names: &[String]) {
        reported.sort_by(|a, b| a.app.cmp(&b.app));
        if self.table.load().reported == reported {
            return;
        }
        let index = |n: &str| names.iter().position(|x| x == n);
        let mut t = Table::default();
        for a in &reported {
            let r = &a.routing;
            // In the edge's region order, so a draw maps to a region the
            // same way on every edge.
            let mut weights: Vec<(usize, u32)> = r.weights.iter().filter_map(|(n, w)| Some((index(n)?, *w))).collect();
            weights.sort_unstable();
            let route = Arc::new(AppRoute {
                app: a.app.clone(),
                policy: r.policy,
                weights,
                order: r.order.iter().filter_map(|n| index(n)).collect(),
                affinity: r.affinity,
                countries: r
                    .countries
                    .iter()
                    .flat_map(|c| c.countries.iter().filter_map(|k| Some((k.clone(), index(&c.region)?))))
                    .collect(),
                residency: r.residency.iter().map(|x| (x.clients.clone(), x.regions.clone())).collect(),
                default: a.default,
                answer_within: a.answer_within_ms.map(std::time::Duration::from_millis),
            });
            for h in &a.hosts {
                t.by_host.insert(h.clone(), route.clone());
            }
            if a.default {
                t.default = Some(route);
            }
        }
        t.reported = reported;
        self.table.store(Arc::new(t));
    }

    /// What the edge has learned of each app, for its status.
    pub fn learned(&self) -> Vec<LearnedApp> {
        let t = self.table.load();
        t.reported
            .iter()
            .map(|a| LearnedApp { app: a.app.clone(), policy: a.routing.policy, answer_within_ms: a.answer_within_ms })
            .collect()
    }

    /// The routing of the app at `host` (normalised), if it has one.
    pub fn for_host(&self, host: Option<&str>) -> Option<Arc<AppRoute>> {
        let t = self.table.load();
        match host {
            Some(h) => match t.by_host.get(h) {
                Some(r) => Some(r.clone()),
                None if meridian_core::wire::is_bare_address(h) => t.default.clone(),
                None => None,
            },
            None => t.default.clone(),
        }
    }
}

impl AppRoute {
    /// Whether planning draws a random number for this app.
    pub fn weighted(&self) -> bool {
        self.policy == RoutingPolicy::Weighted
    }

    /// Whether the app's routing is a ranking and nothing else (no
    /// weights, order, rules or affinity): most apps, planned without
    /// further work.
    fn ranks_only(&self) -> bool {
        matches!(self.policy, RoutingPolicy::Edge | RoutingPolicy::Geo | RoutingPolicy::Latency)
            && self.countries.is_empty()
            && self.residency.is_empty()
            && !self.affinity
    }
}

/// One app as an edge knows it (its status).
#[derive(Clone, Debug, serde::Serialize)]
pub struct LearnedApp {
    pub app: String,
    pub policy: RoutingPolicy,
    /// How long a region may take to start answering it, when its
    /// functions set that.
    pub answer_within_ms: Option<u64>,
}

/// Who asks, as far as routing cares.
#[derive(Clone, Debug)]
pub struct Client<'a> {
    pub point: GeoPoint,
    /// ISO country code, when known (GeoIP or a trusted header).
    pub country: Option<&'a str>,
    /// The region named by the client's affinity cookie.
    pub affinity: Option<&'a str>,
}

/// The regions to try, best first.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub order: Vec<usize>,
    /// Set when a residency rule applies: only regions of this
    /// jurisdiction may answer (and only edges of it may cache).
    pub pinned: Option<String>,
    /// The app's [`AppRoute::answer_within`]: a region is not given up on
    /// sooner.
    pub answer_within: Option<std::time::Duration>,
}

/// What planning needs to know of the edge's regions.
pub struct Regions<'a> {
    pub candidates: &'a [Candidate],
    pub names: &'a [String],
    pub jurisdictions: &'a [Option<String>],
}

/// Plans one request: the edge's policy or the app's, then (in order of
/// precedence) affinity, the app's country rules, residency.
/// `random` is uniform in [0, 1) and used only by `weighted`.
pub fn plan(
    edge_policy: Policy,
    app: Option<&AppRoute>,
    client: &Client<'_>,
    regions: &Regions<'_>,
    random: f64,
) -> Plan {
    let base = match app.map(|a| a.policy) {
        Some(RoutingPolicy::Geo) => Policy::Geo,
        Some(RoutingPolicy::Latency) => Policy::Latency,
        _ => edge_policy,
    };
    let cands = regions.candidates;
    let mut order = rank(base, client.point, cands);
    let Some(app) = app else {
        return Plan { order, pinned: None, answer_within: None };
    };
    if app.ranks_only() {
        return Plan { order, pinned: None, answer_within: app.answer_within };
    }
    let healthy = |i: usize| cands[i].healthy;

    // Residency first: it decides which regions exist at all for this
    // client.
    let client_j = client.country.and_then(meridian_core::wire::jurisdiction_of_country);
    let pinned = client_j.and_then(|j| app.residency.iter().find(|(c, _)| *c == j).map(|(_, r)| r.clone()));
    if let Some(j) = &pinned {
        order.retain(|&i| regions.jurisdictions[i].as_deref() == Some(j.as_str()));
    }
    let mut permitted = vec![false; cands.len()];
    for &i in &order {
        permitted[i] = true;
    }
    let allowed = |i: usize| permitted[i];

    match app.policy {
        RoutingPolicy::Failover => {
            let first: Vec<usize> = app.order.iter().copied().filter(|&i| allowed(i) && healthy(i)).collect();
            let rest = order.iter().copied().filter(|i| !first.contains(i));
            order = first.iter().copied().chain(rest).collect();
        }
        RoutingPolicy::Weighted => {
            let live: Vec<(usize, u32)> =
                app.weights.iter().copied().filter(|&(i, w)| w > 0 && allowed(i) && healthy(i)).collect();
            let total: u32 = live.iter().map(|x| x.1).sum();
            if total > 0 {
                let mut point = random * f64::from(total);
                let mut pick = live[live.len() - 1].0;
                for (i, w) in &live {
                    if point < f64::from(*w) {
                        pick = *i;
                        break;
                    }
                    point -= f64::from(*w);
                }
                move_to_front(&mut order, pick);
            }
        }
        _ => {
            if let Some(&i) = client.country.and_then(|c| app.countries.get(&c.to_ascii_uppercase())) {
                if allowed(i) && healthy(i) {
                    move_to_front(&mut order, i);
                }
            }
        }
    }
    if app.affinity {
        if let Some(i) = client.affinity.and_then(|n| regions.names.iter().position(|x| x == n)) {
            if allowed(i) && healthy(i) {
                move_to_front(&mut order, i);
            }
        }
    }
    Plan { order, pinned, answer_within: app.answer_within }
}

fn move_to_front(order: &mut Vec<usize>, i: usize) {
    if let Some(pos) = order.iter().position(|&x| x == i) {
        order.remove(pos);
        order.insert(0, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{HealthConfig, RegionHealth};
    use meridian_core::wire::{CountryRule, ResidencyRule, Routing};
    use std::time::Duration;

    const VIRGINIA: GeoPoint = GeoPoint { lat: 39.04, lon: -77.49 };
    const DUBLIN: GeoPoint = GeoPoint { lat: 53.35, lon: -6.26 };
    const FRANKFURT: GeoPoint = GeoPoint { lat: 50.11, lon: 8.68 };
    const SINGAPORE: GeoPoint = GeoPoint { lat: 1.35, lon: 103.82 };
    const PARIS: GeoPoint = GeoPoint { lat: 48.86, lon: 2.35 };

    struct World {
        names: Vec<String>,
        jurisdictions: Vec<Option<String>>,
        health: Vec<RegionHealth>,
        points: Vec<GeoPoint>,
    }

    impl World {
        fn new() -> World {
            let mut health = Vec::new();
            for _ in 0..4 {
                let mut h = RegionHealth::new();
                h.probe_ok(Duration::from_millis(1), &HealthConfig::default());
                health.push(h);
            }
            World {
                names: ["us-east", "eu-west", "eu-central", "ap-southeast"].map(String::from).to_vec(),
                jurisdictions: ["us", "eu", "eu", "sg"].map(|j| Some(j.to_string())).to_vec(),
                health,
                points: vec![VIRGINIA, DUBLIN, FRANKFURT, SINGAPORE],
            }
        }

        fn down(&mut self, i: usize) {
            self.health[i].connection_failed();
        }

        fn plan(&self, routing: Option<Routing>, client: &Client<'_>, random: f64) -> Plan {
            let routes = Routes::default();
            if let Some(r) = routing {
                routes.update(
                    vec![AppRouting {
                        app: "a".into(),
                        hosts: vec!["a.example".into()],
                        default: false,
                        routing: r,
                        answer_within_ms: None,
                    }],
                    &self.names,
                );
            }
            let app = routes.for_host(Some("a.example"));
            let cands: Vec<Candidate> =
                self.points.iter().zip(&self.health).map(|(p, h)| Candidate::new(*p, h)).collect();
            let regions = Regions { candidates: &cands, names: &self.names, jurisdictions: &self.jurisdictions };
            plan(Policy::Geo, app.as_deref(), client, &regions, random)
        }
    }

    fn paris() -> Client<'static> {
        Client { point: PARIS, country: Some("FR"), affinity: None }
    }

    #[test]
    fn without_app_routing_the_edge_policy_ranks() {
        let w = World::new();
        assert_eq!(w.plan(None, &paris(), 0.5).order[0], 2, "Frankfurt is nearest Paris");
    }

    #[test]
    fn an_app_without_routing_rules_is_ranked_as_the_edge_ranks_and_keeps_its_answer_bound() {
        let w = World::new();
        let routes = Routes::default();
        let app = |answer_within_ms| AppRouting {
            app: "a".into(),
            hosts: vec!["a.example".into()],
            default: false,
            routing: Routing::default(),
            answer_within_ms,
        };
        routes.update(vec![app(Some(10_000))], &w.names);
        let cands: Vec<Candidate> = w.points.iter().zip(&w.health).map(|(p, h)| Candidate::new(*p, h)).collect();
        let regions = Regions { candidates: &cands, names: &w.names, jurisdictions: &w.jurisdictions };
        let with_app = plan(Policy::Geo, routes.for_host(Some("a.example")).as_deref(), &paris(), &regions, 0.5);
        let without = plan(Policy::Geo, None, &paris(), &regions, 0.5);
        assert_eq!(with_app.order, without.order);
        assert_eq!(with_app.answer_within, Some(Duration::from_secs(10)));
        assert_eq!(without.answer_within, None);
        // A new report replaces the bound.
        routes.update(vec![app(None)], &w.names);
        let again = plan(Policy::Geo, routes.for_host(Some("a.example")).as_deref(), &paris(), &regions, 0.5);
        assert_eq!(again.answer_within, None);
    }

    #[test]
    fn weighted_splits_by_the_random_draw_among_healthy_regions() {
        let mut w = World::new();
        let r = Routing {
            policy: RoutingPolicy::Weighted,
            weights: [("us-east".to_string(), 90), ("ap-southeast".to_string(), 10)].into(),
            ..Default::default()
        };
        assert_eq!(w.plan(Some(r.clone()), &paris(), 0.0).order[0], 0);
        assert_eq!(w.plan(Some(r.clone()), &paris(), 0.899).order[0], 0);
        assert_eq!(w.plan(Some(r.clone()), &paris(), 0.901).order[0], 3);
        // Over the draws, the split is the weights'.
        let picks = (0..1000).filter(|n| w.plan(Some(r.clone()), &paris(), *n as f64 / 1000.0).order[0] == 0).count();
        assert_eq!(picks, 900);
        w.down(0);
        assert_eq!(w.plan(Some(r.clone()), &paris(), 0.1).order[0], 3, "the healthy one takes all");
        assert_eq!(w.plan(Some(r), &paris(), 0.1).order.len(), 4, "every region stays in the list");
    }

    #[test]
    fn failover_takes_the_first_healthy_region_of_the_order() {
        let mut w = World::new();
        let r = Routing {
            policy: RoutingPolicy::Failover,
            order: vec!["ap-southeast".into(), "us-east".into()],
            ..Default::default()
        };
        assert_eq!(w.plan(Some(r.clone()), &paris(), 0.5).order[..2], [3, 0]);
        w.down(3);
        let p = w.plan(Some(r.clone()), &paris(), 0.5);
        assert_eq!(p.order[0], 0);
        assert_eq!(*p.order.last().unwrap(), 3, "the failed one is still tried last");
    }

    #[test]
    fn country_rules_and_affinity_take_precedence() {
        let w = World::new();
        let r = Routing {
            countries: vec![CountryRule { countries: vec!["FR".into()], region: "eu-west".into() }],
            affinity: true,
            ..Default::default()
        };
        assert_eq!(w.plan(Some(r.clone()), &paris(), 0.5).order[0], 1, "FR -> eu-west");
        let pinned = Client { affinity: Some("us-east"), ..paris() };
        assert_eq!(w.plan(Some(r), &pinned, 0.5).order[0], 0, "the cookie's region");
    }

    #[test]
    fn residency_keeps_a_jurisdictions_clients_on_its_regions_even_when_they_are_down() {
        let mut w = World::new();
        let r = Routing {
            residency: vec![ResidencyRule { clients: "eu".into(), regions: "eu".into() }],
            affinity: true,
            ..Default::default()
        };
        let p = w.plan(Some(r.clone()), &Client { affinity: Some("us-east"), ..paris() }, 0.5);
        assert_eq!(p.pinned.as_deref(), Some("eu"));
        assert_eq!(p.order, vec![2, 1], "EU regions only, the cookie ignored");
        w.down(1);
        w.down(2);
        assert_eq!(w.plan(Some(r.clone()), &paris(), 0.5).order, vec![2, 1], "down, but never abroad");
        // Clients elsewhere, or not located, are not pinned.
        let us = Client { point: VIRGINIA, country: Some("US"), affinity: None };
        assert_eq!(w.plan(Some(r.clone()), &us, 0.5).pinned, None);
        assert_eq!(w.plan(Some(r), &Client { country: None, ..paris() }, 0.5).pinned, None);
    }
}
