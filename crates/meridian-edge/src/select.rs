//! Which regions to try for a request, in order.

use crate::health::RegionHealth;
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

pub struct Candidate<'a> {
    pub location: GeoPoint,
    pub health: &'a RegionHealth,
}

/// Indices of `regions` in the order to try them: healthy regions by the
/// policy's preference, then unhealthy ones in the same order. Trying an
/// unhealthy region beats failing outright when every region looks down
/// (the probes may be what is broken), and costs nothing otherwise because
/// retries stop at the first success.
pub fn rank(policy: Policy, client: GeoPoint, regions: &[Candidate<'_>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..regions.len()).collect();
    let key = |i: usize| -> f64 {
        match policy {
            Policy::Geo => client.distance_km(&regions[i].location),
            Policy::Latency => regions[i].health.rtt_ms.unwrap_or(f64::INFINITY),
        }
    };
    order.sort_by(|&a, &b| {
        (!regions[a].health.healthy)
            .cmp(&!regions[b].health.healthy)
            .then(key(a).total_cmp(&key(b)))
            // Ties (equal distance, unknown latency) fall back to distance,
            // then to configuration order, so ranking is deterministic.
            .then(client.distance_km(&regions[a].location).total_cmp(&client.distance_km(&regions[b].location)))
            .then(a.cmp(&b))
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
        let regions = [
            Candidate { location: VIRGINIA, health: &a },
            Candidate { location: DUBLIN, health: &b },
            Candidate { location: SINGAPORE, health: &c },
        ];
        assert_eq!(rank(Policy::Geo, PARIS, &regions), vec![1, 0, 2]);
        assert_eq!(rank(Policy::Geo, TOKYO, &regions)[0], 2);
    }

    #[test]
    fn unhealthy_regions_go_last_but_stay_in_the_list() {
        let (a, mut b, c) = (healthy(1), healthy(1), healthy(1));
        b.connection_failed();
        let regions = [
            Candidate { location: VIRGINIA, health: &a },
            Candidate { location: DUBLIN, health: &b },
            Candidate { location: SINGAPORE, health: &c },
        ];
        assert_eq!(rank(Policy::Geo, PARIS, &regions), vec![0, 2, 1]);
    }

    #[test]
    fn latency_prefers_the_fastest_probe() {
        let (a, b, c) = (healthy(70), healthy(5), healthy(170));
        let regions = [
            Candidate { location: VIRGINIA, health: &a },
            Candidate { location: DUBLIN, health: &b },
            Candidate { location: SINGAPORE, health: &c },
        ];
        assert_eq!(rank(Policy::Latency, TOKYO, &regions), vec![1, 0, 2]);
    }
}
