//! Points on the globe, great-circle distance and country centroids.

use std::fmt;
use std::str::FromStr;

/// A WGS84 coordinate in degrees.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GeoPoint {
    pub lat: f64,
    pub lon: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GeoParseError {
    #[error("expected `<lat>,<lon>` in degrees, got {0:?}")]
    Format(String),
    #[error("latitude {0} is outside -90..=90")]
    Latitude(f64),
    #[error("longitude {0} is outside -180..=180")]
    Longitude(f64),
}

const EARTH_RADIUS_KM: f64 = 6371.0088;

impl GeoPoint {
    pub fn new(lat: f64, lon: f64) -> Result<Self, GeoParseError> {
        if !(-90.0..=90.0).contains(&lat) || lat.is_nan() {
            return Err(GeoParseError::Latitude(lat));
        }
        if !(-180.0..=180.0).contains(&lon) || lon.is_nan() {
            return Err(GeoParseError::Longitude(lon));
        }
        Ok(GeoPoint { lat, lon })
    }

    /// Great-circle distance by the haversine formula, in kilometres.
    pub fn distance_km(&self, other: &GeoPoint) -> f64 {
        let (p1, p2) = (self.lat.to_radians(), other.lat.to_radians());
        let dp = p2 - p1;
        let dl = (other.lon - self.lon).to_radians();
        let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
    }
}

impl GeoPoint {
    /// The point as a unit vector from the Earth's centre: computed once
    /// per region, it makes "which is nearer" a dot product instead of
    /// trigonometry per region per request.
    pub fn unit(&self) -> UnitVector {
        let (lat, lon) = (self.lat.to_radians(), self.lon.to_radians());
        UnitVector([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()])
    }
}

/// A point on the globe as a unit vector (see [`GeoPoint::unit`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnitVector(pub [f64; 3]);

impl UnitVector {
    /// The cosine of the angle between two points: larger is nearer.
    pub fn closeness(&self, other: &UnitVector) -> f64 {
        self.0[0] * other.0[0] + self.0[1] * other.0[1] + self.0[2] * other.0[2]
    }

    /// Great-circle distance in kilometres.
    pub fn distance_km(&self, other: &UnitVector) -> f64 {
        EARTH_RADIUS_KM * self.closeness(other).clamp(-1.0, 1.0).acos()
    }
}

impl FromStr for GeoPoint {
    type Err = GeoParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lat, lon) = s.split_once(',').ok_or_else(|| GeoParseError::Format(s.to_string()))?;
        let lat: f64 = lat.trim().parse().map_err(|_| GeoParseError::Format(s.to_string()))?;
        let lon: f64 = lon.trim().parse().map_err(|_| GeoParseError::Format(s.to_string()))?;
        GeoPoint::new(lat, lon)
    }
}

impl fmt::Display for GeoPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.4},{:.4}", self.lat, self.lon)
    }
}

/// Approximate geographic centre of a country (ISO 3166-1 alpha-2), used when
/// an edge only knows the client's country. Covers the countries that carry
/// most Internet users; unknown codes return `None` and the edge falls back
/// to its own location.
pub fn country_centroid(code: &str) -> Option<GeoPoint> {
    let code = code.trim().to_ascii_uppercase();
    COUNTRY_CENTROIDS.iter().find(|(c, _, _)| *c == code).map(|&(_, lat, lon)| GeoPoint { lat, lon })
}

#[rustfmt::skip]
const COUNTRY_CENTROIDS: &[(&str, f64, f64)] = &[
    ("AE", 23.4, 53.8), ("AR", -38.4, -63.6), ("AT", 47.5, 14.6), ("AU", -25.3, 133.8),
    ("BD", 23.7, 90.4), ("BE", 50.5, 4.5), ("BG", 42.7, 25.5), ("BR", -14.2, -51.9),
    ("CA", 56.1, -106.3), ("CH", 46.8, 8.2), ("CL", -35.7, -71.5), ("CN", 35.9, 104.2),
    ("CO", 4.6, -74.3), ("CZ", 49.8, 15.5), ("DE", 51.2, 10.5), ("DK", 56.3, 9.5),
    ("DZ", 28.0, 1.7), ("EG", 26.8, 30.8), ("ES", 40.5, -3.7), ("FI", 61.9, 25.7),
    ("FR", 46.2, 2.2), ("GB", 55.4, -3.4), ("GR", 39.1, 21.8), ("HK", 22.4, 114.1),
    ("HR", 45.1, 15.2), ("HU", 47.2, 19.5), ("ID", -0.8, 113.9), ("IE", 53.4, -8.2),
    ("IL", 31.0, 34.9), ("IN", 20.6, 79.0), ("IR", 32.4, 53.7), ("IS", 64.9, -19.0),
    ("IT", 41.9, 12.6), ("JP", 36.2, 138.3), ("KE", -0.0, 37.9), ("KR", 35.9, 127.8),
    ("KZ", 48.0, 66.9), ("LU", 49.8, 6.1), ("MA", 31.8, -7.1), ("MX", 23.6, -102.6),
    ("MY", 4.2, 101.98), ("NG", 9.1, 8.7), ("NL", 52.1, 5.3), ("NO", 60.5, 8.5),
    ("NZ", -40.9, 174.9), ("PE", -9.2, -75.0), ("PH", 12.9, 121.8), ("PK", 30.4, 69.3),
    ("PL", 51.9, 19.1), ("PT", 39.4, -8.2), ("RO", 45.9, 25.0), ("RS", 44.0, 21.0),
    ("RU", 61.5, 105.3), ("SA", 23.9, 45.1), ("SE", 60.1, 18.6), ("SG", 1.35, 103.8),
    ("TH", 15.9, 101.0), ("TR", 38.9, 35.2), ("TW", 23.7, 121.0), ("UA", 48.4, 31.2),
    ("US", 37.1, -95.7), ("VN", 14.1, 108.3), ("ZA", -30.6, 22.9),
];

#[cfg(test)]
mod tests {
    #[test]
    fn unit_vectors_order_and_measure_like_haversine() {
        let pts = [(38.9, -77.0), (53.35, -6.26), (1.29, 103.85), (-33.9, 151.2), (64.1, -21.9), (0.0, 0.0)];
        let pts: Vec<GeoPoint> = pts.iter().map(|&(lat, lon)| GeoPoint::new(lat, lon).unwrap()).collect();
        for a in &pts {
            for b in &pts {
                let (h, u) = (a.distance_km(b), a.unit().distance_km(&b.unit()));
                assert!((h - u).abs() < 1.0, "{a} {b}: {h} vs {u}");
                for c in &pts {
                    let nearer = a.distance_km(b) < a.distance_km(c) - 1.0;
                    if nearer {
                        assert!(a.unit().closeness(&b.unit()) > a.unit().closeness(&c.unit()));
                    }
                }
            }
        }
    }

    use super::*;

    #[test]
    fn distance_dublin_to_virginia_is_about_5500_km() {
        let dublin: GeoPoint = "53.35,-6.26".parse().unwrap();
        let ashburn: GeoPoint = "39.04,-77.49".parse().unwrap();
        let d = dublin.distance_km(&ashburn);
        assert!((5300.0..5700.0).contains(&d), "{d}");
        assert_eq!(dublin.distance_km(&dublin), 0.0);
    }

    #[test]
    fn rejects_malformed_and_out_of_range_points() {
        assert!(matches!("1".parse::<GeoPoint>(), Err(GeoParseError::Format(_))));
        assert!(matches!("91,0".parse::<GeoPoint>(), Err(GeoParseError::Latitude(_))));
        assert!(matches!("0,181".parse::<GeoPoint>(), Err(GeoParseError::Longitude(_))));
        assert!(matches!("NaN,0".parse::<GeoPoint>(), Err(GeoParseError::Latitude(_))));
    }

    #[test]
    fn country_codes_are_case_insensitive() {
        assert_eq!(country_centroid("de"), country_centroid("DE"));
        assert!(country_centroid("XX").is_none());
    }
}
