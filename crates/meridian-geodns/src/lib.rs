//! GeoDNS: an authoritative DNS server for the apps' hostnames that answers
//! each `A`/`AAAA` query with the nearest healthy edge.
//!
//! The client is the EDNS Client Subnet of the query (RFC 7871) when the
//! resolver sends one, else the resolver's own address; it is located with
//! a MaxMind-format database. Answers carry a short TTL so a failed edge
//! leaves resolvers' caches quickly, and every edge is probed (an HTTP
//! request to its public port): an edge that stops answering is left out
//! of answers until it answers again. When no edge is known healthy the
//! nearest is answered anyway (the probes may be what is broken).
//!
//! Names outside the configured zones are refused: the server is
//! authoritative, never a resolver.

use hickory_server::authority::MessageResponseBuilder;
use hickory_server::proto::op::{Edns, Header, MessageType, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use meridian_core::GeoPoint;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// UDP and TCP.
    pub listen: SocketAddr,
    /// Domains answered for (every name under them), e.g. `apps.example.com`.
    pub zones: Vec<String>,
    /// Seconds resolvers may keep an answer.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// A MaxMind-format (GeoLite2/GeoIP2 City or Country) database; without
    /// one every client gets the first healthy edge.
    #[serde(default)]
    pub geoip_db: Option<PathBuf>,
    #[serde(default = "default_interval_ms")]
    pub probe_interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub probe_timeout_ms: u64,
    pub edges: Vec<DnsEdge>,
}

fn default_ttl() -> u32 {
    20
}
fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    1000
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsEdge {
    pub name: String,
    /// The addresses answered for it (A for IPv4, AAAA for IPv6).
    pub addresses: Vec<IpAddr>,
    pub location: GeoPoint,
    /// Its public port, probed with an HTTP request.
    pub probe: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("zone {0:?} is not a domain name")]
    BadZone(String),
    #[error("GeoDNS needs at least one edge")]
    NoEdges,
    #[error("edge {0}: no address to answer")]
    NoAddress(String),
    #[error("cannot open GeoIP database {path}: {message}")]
    GeoIp { path: PathBuf, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

struct Edge {
    config: DnsEdge,
    unit: meridian_core::geo::UnitVector,
    healthy: AtomicBool,
}

pub struct GeoDns {
    zones: Vec<LowerName>,
    ttl: u32,
    geoip: Option<meridian_core::geoip::GeoDb>,
    edges: Vec<Edge>,
    probe_interval: Duration,
    probe_timeout: Duration,
}

impl GeoDns {
    pub fn new(config: DnsConfig) -> Result<Arc<GeoDns>, DnsError> {
        if config.edges.is_empty() {
            return Err(DnsError::NoEdges);
        }
        let zones = config
            .zones
            .iter()
            .map(|z| Name::from_str(z).map(LowerName::from).map_err(|_| DnsError::BadZone(z.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(e) = config.edges.iter().find(|e| e.addresses.is_empty()) {
            return Err(DnsError::NoAddress(e.name.clone()));
        }
        let geoip = match &config.geoip_db {
            None => None,
            Some(p) => {
                Some(meridian_core::geoip::open(p).map_err(|message| DnsError::GeoIp { path: p.clone(), message })?)
            }
        };
        let edges = config
            .edges
            .iter()
            .map(|e| Edge { unit: e.location.unit(), config: e.clone(), healthy: AtomicBool::new(true) })
            .collect();
        Ok(Arc::new(GeoDns {
            zones,
            ttl: config.ttl,
            geoip,
            edges,
            probe_interval: Duration::from_millis(config.probe_interval_ms.max(50)),
            probe_timeout: Duration::from_millis(config.probe_timeout_ms.max(50)),
        }))
    }

    /// Binds UDP and TCP on one port (`listen`'s, or with port 0 a free
    /// port both protocols have free).
    pub async fn bind(listen: SocketAddr) -> Result<(tokio::net::UdpSocket, tokio::net::TcpListener), DnsError> {
        let bind = |source| DnsError::Bind { addr: listen, source };
        let mut last = None;
        for _ in 0..20 {
            let udp = tokio::net::UdpSocket::bind(listen).await.map_err(bind)?;
            let at = udp.local_addr().map_err(bind)?;
            match tokio::net::TcpListener::bind(at).await {
                Ok(tcp) => return Ok((udp, tcp)),
                // A kernel-picked UDP port may be taken for TCP: pick again.
                Err(e) if listen.port() == 0 => last = Some(e),
                Err(e) => return Err(bind(e)),
            }
        }
        Err(bind(last.unwrap_or_else(|| std::io::Error::other("no free port"))))
    }

    /// Serves until the future is dropped.
    pub async fn serve(self: Arc<Self>, udp: tokio::net::UdpSocket, tcp: tokio::net::TcpListener) {
        tokio::spawn(self.clone().probe_forever());
        let mut server = hickory_server::ServerFuture::new(Handler(self));
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5));
        if let Err(e) = server.block_until_done().await {
            tracing::warn!(error = %e, "DNS server stopped");
        }
    }

    async fn probe_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let probes = self.edges.iter().map(|e| async {
                let ok = tokio::time::timeout(self.probe_timeout, probe(e.config.probe)).await.unwrap_or(false);
                if e.healthy.swap(ok, Relaxed) != ok {
                    tracing::info!(edge = %e.config.name, healthy = ok, "edge health changed");
                }
            });
            futures::future::join_all(probes).await;
        }
    }

    /// Is `name` in one of the zones?
    fn authoritative(&self, name: &LowerName) -> bool {
        self.zones.iter().any(|z| z.zone_of(name))
    }

    /// The edges to answer for a client at `client` (if located), best
    /// first: healthy ones by distance, then (only if none is healthy) the
    /// others.
    pub fn best(&self, client: Option<GeoPoint>) -> Option<&DnsEdge> {
        let key = |e: &Edge| client.map_or(0.0, |c| -c.unit().closeness(&e.unit));
        let pick = |healthy: bool| {
            self.edges.iter().filter(|e| e.healthy.load(Relaxed) == healthy).min_by(|a, b| key(a).total_cmp(&key(b)))
        };
        pick(true).or_else(|| pick(false)).map(|e| &e.config)
    }

    /// Where the client is: the subnet the resolver forwarded, else the
    /// resolver itself.
    fn locate(&self, ip: IpAddr) -> Option<GeoPoint> {
        self.geoip.as_ref().and_then(|db| meridian_core::geoip::locate(db, ip).0)
    }

    /// Each edge and whether its probes pass.
    pub fn healthy(&self) -> Vec<(String, bool)> {
        self.edges.iter().map(|e| (e.config.name.clone(), e.healthy.load(Relaxed))).collect()
    }
}

/// One HTTP request to an edge's public port; any HTTP answer means alive.
async fn probe(addr: SocketAddr) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return false };
    let req = b"GET /_meridian/ping HTTP/1.1\r\nhost: geodns\r\nconnection: close\r\n\r\n";
    if s.write_all(req).await.is_err() {
        return false;
    }
    let mut head = [0u8; 8];
    s.read_exact(&mut head).await.is_ok() && head.starts_with(b"HTTP/1.")
}

struct Handler(Arc<GeoDns>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let dns = &self.0;
        if request.op_code() != OpCode::Query || request.message_type() != MessageType::Query {
            return answer_error(request, response, ResponseCode::NotImp).await;
        }
        let Ok(info) = request.request_info() else {
            return answer_error(request, response, ResponseCode::FormErr).await;
        };
        let name = info.query.name().clone();
        if !dns.authoritative(&name) {
            return answer_error(request, response, ResponseCode::Refused).await;
        }
        // The client: the subnet a resolver forwarded (RFC 7871), else the
        // resolver.
        let subnet = request.edns().and_then(|e| match e.option(EdnsCode::Subnet) {
            Some(EdnsOption::Subnet(s)) => Some(*s),
            _ => None,
        });
        let client_ip = subnet.as_ref().map(|s| s.addr()).unwrap_or(request.src().ip());
        let best = dns.best(dns.locate(client_ip));
        let qtype = info.query.query_type();
        let owner: Name = name.clone().into();
        let mut answers = Vec::new();
        if let Some(edge) = best {
            for ip in &edge.addresses {
                let rdata = match (qtype, ip) {
                    (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => RData::A(A(*v4)),
                    (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                answers.push(Record::from_rdata(owner.clone(), dns.ttl, rdata));
            }
            tracing::debug!(%name, ?qtype, %client_ip, edge = %edge.name, "answered");
        }
        // No data of this type: NOERROR with the zone's SOA (a negative
        // answer resolvers may cache for the TTL).
        let zone: Name =
            dns.zones.iter().find(|z| z.zone_of(&name)).cloned().map(Into::into).unwrap_or_else(Name::root);
        let soa = Record::from_rdata(
            zone.clone(),
            dns.ttl,
            RData::SOA(SOA::new(
                Name::from_str("ns").ok().and_then(|n| n.append_domain(&zone).ok()).unwrap_or_else(|| zone.clone()),
                Name::from_str("hostmaster")
                    .ok()
                    .and_then(|n| n.append_domain(&zone).ok())
                    .unwrap_or_else(|| zone.clone()),
                1,
                3600,
                600,
                86400,
                dns.ttl,
            )),
        );
        let soa_records: Vec<Record> = if answers.is_empty() { vec![soa] } else { Vec::new() };
        let mut header = Header::response_from_request(request.header());
        header.set_authoritative(true);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(s) = subnet {
            // Echo the subnet, scoped to what the answer depends on.
            let mut edns = Edns::new();
            let prefix = s.source_prefix();
            edns.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(s.addr(), prefix, prefix)));
            builder.edns(edns);
        } else if let Some(e) = request.edns() {
            let mut edns = Edns::new();
            edns.set_max_payload(e.max_payload().max(512));
            builder.edns(edns);
        }
        let msg = builder.build(header, answers.iter(), std::iter::empty(), soa_records.iter(), std::iter::empty());
        match response.send_response(msg).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "DNS answer not sent");
                header.into()
            }
        }
    }
}

/// An answer with no records and `code` (a request this server does not
/// take: not a query, malformed, or outside its zones).
async fn answer_error<R: ResponseHandler>(request: &Request, mut response: R, code: ResponseCode) -> ResponseInfo {
    let msg = MessageResponseBuilder::from_message_request(request).error_msg(request.header(), code);
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "DNS answer not sent");
            let mut h = Header::response_from_request(request.header());
            h.set_response_code(code);
            h.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns() -> Arc<GeoDns> {
        let edge = |name: &str, ip: &str, lat, lon| DnsEdge {
            name: name.into(),
            addresses: vec![ip.parse().unwrap()],
            location: GeoPoint { lat, lon },
            probe: "127.0.0.1:1".parse().unwrap(),
        };
        GeoDns::new(DnsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            zones: vec!["apps.example".into()],
            ttl: 20,
            geoip_db: None,
            probe_interval_ms: 1000,
            probe_timeout_ms: 1000,
            edges: vec![
                edge("us", "192.0.2.1", 39.0, -77.5),
                edge("eu", "192.0.2.2", 53.3, -6.3),
                edge("ap", "192.0.2.3", 1.35, 103.8),
            ],
        })
        .unwrap()
    }

    #[test]
    fn the_nearest_healthy_edge_is_answered_and_the_nearest_of_all_when_none_is_healthy() {
        let d = dns();
        let paris = GeoPoint { lat: 48.9, lon: 2.35 };
        assert_eq!(d.best(Some(paris)).unwrap().name, "eu");
        assert_eq!(d.best(Some(GeoPoint { lat: 35.7, lon: 139.7 })).unwrap().name, "ap");
        d.edges[1].healthy.store(false, Relaxed);
        assert_eq!(d.best(Some(paris)).unwrap().name, "us");
        for e in &d.edges {
            e.healthy.store(false, Relaxed);
        }
        assert_eq!(d.best(Some(paris)).unwrap().name, "eu", "all down: still the nearest");
        assert!(d.authoritative(&LowerName::from(Name::from_str("shop.apps.example").unwrap())));
        assert!(!d.authoritative(&LowerName::from(Name::from_str("apps.example.org").unwrap())));
    }
}
