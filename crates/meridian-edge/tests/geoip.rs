//! Clients are located from a MaxMind-format database when one is configured,
//! and client-supplied location headers are ignored unless trusted.

use meridian_core::GeoPoint;
use meridian_edge::{Edge, EdgeConfig, Located};

/// A CA and a certificate for `edge-test`; the `[tls]` section naming them.
fn tls_section() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let ca = meridian_trust::init_ca(dir.path(), "test", 1).unwrap();
    let id = meridian_trust::Identity::new("edge-test", meridian_trust::Role::Edge, None).unwrap();
    let issued = meridian_trust::issue(&ca, &id, dir.path(), 1).unwrap();
    let section = format!("[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n", ca.cert, issued.cert, issued.key);
    (dir, section)
}

fn edge(trust: bool) -> std::sync::Arc<Edge> {
    let (_dir, tls) = tls_section();
    let cfg: EdgeConfig = toml::from_str(&format!(
        r#"
        name = "edge-test"
        listen = "127.0.0.1:0"
        cluster_listen = "127.0.0.1:0"
        location = {{ lat = 0.0, lon = 0.0 }}
        trust_client_geo_headers = {trust}
        geoip_db = "{}/tests/fixtures/test-geoip.mmdb"
        [[regions]]
        name = "r"
        url = "https://127.0.0.1:1"
        location = {{ lat = 0.0, lon = 0.0 }}
        {tls}
        "#,
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    Edge::new(cfg).unwrap()
}

fn req(headers: &[(&str, &str)]) -> http::Request<()> {
    let mut b = http::Request::get("/");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

#[test]
fn clients_are_located_by_their_address() {
    let e = edge(false);
    assert_eq!(e.locate(&req(&[]), "127.1.0.9".parse().unwrap()), Located::GeoIp(GeoPoint { lat: 52.52, lon: 13.40 }));
    assert_eq!(e.locate(&req(&[]), "127.2.3.4".parse().unwrap()), Located::GeoIp(GeoPoint { lat: 1.29, lon: 103.85 }));
    // A record with a country but no coordinates falls back to the country's centre.
    let jp = meridian_core::geo::country_centroid("JP").unwrap();
    assert_eq!(e.locate(&req(&[]), "127.4.0.1".parse().unwrap()), Located::GeoIp(jp));
    // Unknown addresses are assumed near the edge.
    assert_eq!(e.locate(&req(&[]), "127.9.0.1".parse().unwrap()), Located::Edge(GeoPoint { lat: 0.0, lon: 0.0 }));
}

#[test]
fn location_headers_count_only_when_trusted() {
    let spoof = [("x-meridian-client-geo", "1.29,103.85"), ("x-meridian-client-country", "SG")];
    let berlin = Located::GeoIp(GeoPoint { lat: 52.52, lon: 13.40 });
    assert_eq!(edge(false).locate(&req(&spoof), "127.1.0.9".parse().unwrap()), berlin);
    let trusted = edge(true);
    assert_eq!(
        trusted.locate(&req(&spoof), "127.1.0.9".parse().unwrap()),
        Located::Header(GeoPoint { lat: 1.29, lon: 103.85 })
    );
    // Malformed headers are ignored, not fatal.
    assert_eq!(trusted.locate(&req(&[("x-meridian-client-geo", "north")]), "127.1.0.9".parse().unwrap()), berlin);
}

#[test]
fn a_missing_database_is_a_clear_error() {
    let (_dir, tls) = tls_section();
    let mut cfg: EdgeConfig = toml::from_str(&format!(
        "name='edge-test'\nlisten='127.0.0.1:0'\ncluster_listen='127.0.0.1:0'\nlocation={{lat=0.0,lon=0.0}}\ngeoip_db='/nonexistent.mmdb'\n[[regions]]\nname='r'\nurl='https://127.0.0.1:1'\nlocation={{lat=0.0,lon=0.0}}\n{tls}",
    ))
    .unwrap();
    let err = Edge::new(cfg.clone()).err().unwrap();
    assert!(err.to_string().contains("cannot open GeoIP database /nonexistent.mmdb"), "{err}");
    cfg.geoip_db = None;
    cfg.regions[0].url = "ftp://x".into();
    assert!(Edge::new(cfg).err().unwrap().to_string().contains("must look like https://host:port"));
}
