//! Which regions to try for a request, in order.

use crate::health::RegionHealth;
use meridian_core::geo::UnitVector;
use meridian_core::GeoPoint;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Nearest region by great-circle distance from the client.
    #[default]
    Geo,
    /// Lowest smoothed probe round trip from this edge.
    Latency,
}

/// What ranking needs to know of a region: a copy, so no lock is held
/// while sorting.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// The region's location as a unit vector, computed once per region.
    pub unit: UnitVector,
    pub healthy: bool,
    pub rtt_ms: Option<f64>,
}

impl Candidate {
    pub fn new(location: GeoPoint, health: &RegionHealth) -> Candidate {
        Candidate::at(location.unit(), health)
    }

    /// A candidate whose location's unit vector is already known.
    pub fn at(unit: UnitVector, health: &RegionHealth) -> Candidate {
        Candidate { unit, healthy: health.healthy, rtt_ms: health.rtt_ms }
    }
}

/// Indices of `regions` in the order to try them: healthy regions by the
/// policy's preference, then unhealthy ones in the same order. Trying an
/// unhealthy region beats failing outright when every region looks down
/// (the probes may be what is broken), and costs nothing otherwise because
/// retries stop at the first success.
pub fn rank(policy: Policy, client: GeoPoint, regions: &[Candidate]) -> Vec<usize> {
    // Keys are computed once per region, and nearness is a dot product of
    // unit vectors (the client's trigonometry once, none per region): this
    // runs on every request. Larger closeness is nearer, so it is negated.
    let client = client.unit();
    let keys: Vec<(bool, f64, f64, usize)> = regions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let distance = -client.closeness(&c.unit);
            let primary = match policy {
                Policy::Geo => distance,
                Policy::Latency => c.rtt_ms.unwrap_or(f64::INFINITY),
            };
            // Ties (equal latency, unknown latency) fall back to distance,
            // then to configuration order, so ranking is deterministic.
            (!c.healthy, primary, distance, i)
        })
        .collect();
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by(|&a, &b| {
        let (ka, kb) = (&keys[a], &keys[b]);
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).then(ka.2.total_cmp(&kb.2)).then(ka.3.cmp(&kb.3))
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthConfig;
    use std::time::Duration;

    fn healthy(rtt_ms: u64) -> RegionHealth {
        let mut h = RegionHealth::new();
        h.probe_ok(Duration::from_millis(rtt_ms), &HealthConfig::default());
        h
    }

    const VIRGINIA: GeoPoint = GeoPoint { lat: 39.04, lon: -77.49 };
    const DUBLIN: GeoPoint = GeoPoint { lat: 53.35, lon: -6.26 };
    const SINGAPORE: GeoPoint = GeoPoint { lat: 1.35, lon: 103.82 };
    const PARIS: GeoPoint = GeoPoint { lat: 48.86, lon: 2.35 };
    const TOKYO: GeoPoint = GeoPoint { lat: 35.68, lon: 139.69 };

    #[test]
    fn geo_prefers_the_nearest_healthy_region() {
        let (a, b, c) = (healthy(1), healthy(1), healthy(1));
        let regions = [Candidate::new(VIRGINIA, &a), Candidate::new(DUBLIN, &b), Candidate::new(SINGAPORE, &c)];
        assert_eq!(rank(Policy::Geo, PARIS, &regions), vec![1, 0, 2]);
        assert_eq!(rank(Policy::Geo, TOKYO, &regions)[0], 2);
    }

    #[test]
    fn unhealthy_regions_go_last_but_stay_in_the_list() {
        let (a, mut b, c) = (healthy(1), healthy(1), healthy(1));
        b.connection_failed();
        let regions = [Candidate::new(VIRGINIA, &a), Candidate::new(DUBLIN, &b), Candidate::new(SINGAPORE, &c)];
        assert_eq!(rank(Policy::Geo, PARIS, &regions), vec![0, 2, 1]);
    }

    #[test]
    fn latency_prefers_the_fastest_probe() {
        let (a, b, c) = (healthy(70), healthy(5), healthy(170));
        let regions = [Candidate::new(VIRGINIA, &a), Candidate::new(DUBLIN, &b), Candidate::new(SINGAPORE, &c)];
        assert_eq!(rank(Policy::Latency, TOKYO, &regions), vec![1, 0, 2]);
    }
}
