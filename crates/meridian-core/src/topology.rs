//! Regions, where they are, and how far apart they are in round-trip time.

use crate::geo::GeoPoint;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// A named place that runs the app and holds a copy of its data.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Region {
    pub name: String,
    /// Human-readable place, for status output only.
    #[serde(default)]
    pub city: String,
    pub location: GeoPoint,
    /// Jurisdiction tag used by residency rules (`us`, `eu`, ...).
    pub jurisdiction: String,
}

/// The regions of a world and the round-trip times between them.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    pub regions: Vec<Region>,
    /// Round trip between two distinct regions, keyed by the names in sorted order.
    rtt: BTreeMap<(String, String), Duration>,
    /// Round trip between an edge and the region in the same metro area.
    pub local_rtt: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("topology file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("topology {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyFile {
    #[serde(default)]
    local_rtt_ms: Option<f64>,
    region: Vec<RegionEntry>,
    #[serde(default)]
    rtt: Vec<RttEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionEntry {
    name: String,
    #[serde(default)]
    city: String,
    lat: f64,
    lon: f64,
    jurisdiction: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RttEntry {
    between: [String; 2],
    ms: f64,
}

/// Light in fibre covers about 200 km per millisecond; real paths are longer
/// than great circles. 1.5x inflation matches what published inter-region
/// measurements show on average and is only used for pairs a topology file
/// leaves out.
fn estimated_rtt(a: &GeoPoint, b: &GeoPoint) -> Duration {
    let one_way_ms = a.distance_km(b) * 1.5 / 200.0;
    Duration::from_secs_f64(2.0 * one_way_ms / 1000.0)
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl Topology {
    /// The built-in three-region world.
    ///
    /// Round trips are AWS inter-region medians as published by cloudping.co
    /// (https://www.cloudping.co/grid, "p50", us-east-1 / eu-west-1 /
    /// ap-southeast-1), rounded to the millisecond: Virginia-Ireland 67 ms,
    /// Virginia-Singapore 213 ms, Ireland-Singapore 171 ms.
    pub fn default_world() -> Topology {
        let region = |name: &str, city: &str, lat, lon, j: &str| Region {
            name: name.into(),
            city: city.into(),
            location: GeoPoint { lat, lon },
            jurisdiction: j.into(),
        };
        let regions = vec![
            region("us-east", "Virginia", 39.04, -77.49, "us"),
            region("eu-west", "Ireland", 53.35, -6.26, "eu"),
            region("ap-southeast", "Singapore", 1.35, 103.82, "sg"),
        ];
        let mut rtt = BTreeMap::new();
        rtt.insert(pair("us-east", "eu-west"), Duration::from_millis(67));
        rtt.insert(pair("us-east", "ap-southeast"), Duration::from_millis(213));
        rtt.insert(pair("eu-west", "ap-southeast"), Duration::from_millis(171));
        Topology { regions, rtt, local_rtt: Duration::from_millis(1) }
    }

    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Io { path: p.clone(), source })?;
        Self::parse(&p, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Topology, TopologyError> {
        let invalid = |message: String| TopologyError::Invalid { path: path.to_string(), message };
        let file: TopologyFile = toml::from_str(text)
            .map_err(|e| TopologyError::Parse { path: path.to_string(), message: e.to_string() })?;
        if file.region.is_empty() {
            return Err(invalid("at least one [[region]] is required".into()));
        }
        let mut regions: Vec<Region> = Vec::new();
        for r in file.region {
            if !is_valid_name(&r.name) {
                return Err(invalid(format!("region name {:?} must be 1-32 characters of a-z, 0-9 and '-'", r.name)));
            }
            if regions.iter().any(|x| x.name == r.name) {
                return Err(invalid(format!("region {:?} is declared twice", r.name)));
            }
            let location = GeoPoint::new(r.lat, r.lon).map_err(|e| invalid(format!("region {:?}: {e}", r.name)))?;
            regions.push(Region { name: r.name, city: r.city, location, jurisdiction: r.jurisdiction });
        }
        let mut rtt = BTreeMap::new();
        for e in file.rtt {
            for n in &e.between {
                if !regions.iter().any(|r| &r.name == n) {
                    return Err(invalid(format!("[[rtt]] names unknown region {n:?}")));
                }
            }
            if e.between[0] == e.between[1] || !(e.ms.is_finite() && e.ms >= 0.0) {
                return Err(invalid(format!(
                    "[[rtt]] between {:?} must name two regions and a non-negative ms",
                    e.between
                )));
            }
            rtt.insert(pair(&e.between[0], &e.between[1]), Duration::from_secs_f64(e.ms / 1000.0));
        }
        for a in &regions {
            for b in &regions {
                if a.name < b.name {
                    rtt.entry(pair(&a.name, &b.name)).or_insert_with(|| estimated_rtt(&a.location, &b.location));
                }
            }
        }
        let local_rtt = Duration::from_secs_f64(file.local_rtt_ms.unwrap_or(1.0).max(0.0) / 1000.0);
        Ok(Topology { regions, rtt, local_rtt })
    }

    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// Round-trip time between two regions (or an edge at `a` and region `b`).
    pub fn rtt(&self, a: &str, b: &str) -> Duration {
        if a == b {
            return self.local_rtt;
        }
        self.rtt.get(&pair(a, b)).copied().unwrap_or(self.local_rtt)
    }
}

/// Names end up in file names, header values and URLs: keep them boring.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_world_has_three_regions_and_symmetric_rtts() {
        let t = Topology::default_world();
        assert_eq!(t.regions.len(), 3);
        assert_eq!(t.rtt("us-east", "eu-west"), t.rtt("eu-west", "us-east"));
        assert_eq!(t.rtt("eu-west", "ap-southeast"), Duration::from_millis(171));
        assert_eq!(t.rtt("eu-west", "eu-west"), t.local_rtt);
    }

    #[test]
    fn file_replaces_the_world_and_estimates_missing_pairs() {
        let t = Topology::parse(
            "t.toml",
            r#"
            [[region]]
            name = "a"
            lat = 0.0
            lon = 0.0
            jurisdiction = "x"
            [[region]]
            name = "b"
            lat = 0.0
            lon = 10.0
            jurisdiction = "x"
            "#,
        )
        .unwrap();
        // 1112 km * 1.5 / 200 km/ms * 2 = 16.7 ms
        let ms = t.rtt("a", "b").as_secs_f64() * 1000.0;
        assert!((15.0..18.0).contains(&ms), "{ms}");
    }

    #[test]
    fn unknown_keys_and_bad_names_are_rejected() {
        let bad_key = "[[region]]\nname='a'\nlat=0.0\nlon=0.0\njurisdiction='x'\ncolour='red'\n";
        assert!(matches!(Topology::parse("t", bad_key), Err(TopologyError::Parse { .. })));
        let bad_name = "[[region]]\nname='A B'\nlat=0.0\nlon=0.0\njurisdiction='x'\n";
        assert!(matches!(Topology::parse("t", bad_name), Err(TopologyError::Invalid { .. })));
    }
}
