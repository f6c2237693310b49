//! Locating an IP address with a MaxMind-format database (GeoLite2/GeoIP2
//! City or Country): what edges and the GeoDNS server share.

use crate::geo::country_centroid;
use crate::GeoPoint;
use std::net::IpAddr;

pub type GeoDb = maxminddb::Reader<Vec<u8>>;

/// Opens a database file.
pub fn open(path: &std::path::Path) -> Result<GeoDb, String> {
    maxminddb::Reader::open_readfile(path).map_err(|e| e.to_string())
}

/// Where `ip` is (its coordinates, else its country's centroid) and its
/// country code, as far as the database knows.
pub fn locate(db: &GeoDb, ip: IpAddr) -> (Option<GeoPoint>, Option<String>) {
    let Ok(Some(city)) = db.lookup::<maxminddb::geoip2::City>(ip) else { return (None, None) };
    let iso = city.country.as_ref().and_then(|c| c.iso_code);
    let point = city
        .location
        .as_ref()
        .and_then(|l| Some(GeoPoint { lat: l.latitude?, lon: l.longitude? }))
        .or_else(|| iso.and_then(country_centroid));
    (point, iso.map(String::from))
}
