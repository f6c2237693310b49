//! What a guest may reach with outgoing HTTP (`wasi:http/outgoing-handler`).
//!
//! Default deny, as in Spin: a component reaches only the hosts its
//! manifest lists in `allowed_outbound_hosts` (`https://api.example.com`,
//! `https://*.example.com`, `http://127.0.0.1:8080`, with `:*` for any
//! port). On top of that, an address is checked *after* resolution, on the
//! address actually dialled: loopback, private, link-local (cloud metadata
//! at 169.254.169.254 among them), shared, multicast and unspecified
//! addresses are refused unless the entry that allowed the request names
//! that very IP literally — a public name resolving to 127.0.0.1 is still
//! refused, and the node's own listeners are refused whatever is listed.
//! Connecting to the checked address (not resolving again) closes the DNS
//! rebinding gap. The connect time is capped, and so is the response body.

use bytes::Bytes;
use http::uri::Scheme;
use http_body::Frame;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

pub use meridian_core::egress::{AllowedHost, HostPattern, OutboundScheme};

fn matches(a: &AllowedHost, https: bool, host: &Target, port: u16) -> bool {
    let scheme_ok = match a.scheme {
        OutboundScheme::Any => true,
        OutboundScheme::Https => https,
        OutboundScheme::Http => !https,
    };
    if !scheme_ok || a.port.is_some_and(|p| p != port) {
        return false;
    }
    match (&a.host, host) {
        (HostPattern::Ip(x), Target::Ip(y)) => x == y,
        (HostPattern::Name(x), Target::Name(y)) => x == y,
        (HostPattern::Suffix(s), Target::Name(y)) => y.len() > s.len() + 1 && y.ends_with(&format!(".{s}")),
        _ => false,
    }
}

/// What a request names.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Name(String),
    Ip(IpAddr),
}

/// The class of an address, for the egress check. Only `Public` is
/// reachable without naming the address itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrClass {
    Public,
    Loopback,
    /// RFC 1918, unique-local IPv6, and 100.64/10 (shared, CGNAT).
    Private,
    /// 169.254/16 and fe80::/10: where clouds put instance metadata.
    LinkLocal,
    /// 169.254.169.254, fd00:ec2::254, 100.100.100.200: metadata services.
    Metadata,
    /// Unspecified, broadcast, multicast, documentation, reserved.
    Reserved,
}

/// Classifies an address (IPv4-mapped IPv6 as its IPv4 address).
pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let seg = v6.segments();
            if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                AddrClass::Metadata
            } else if v6.is_loopback() {
                AddrClass::Loopback
            } else if v6.is_unspecified() || v6.is_multicast() || seg[0] == 0x2001 && seg[1] == 0xdb8 {
                AddrClass::Reserved
            } else if seg[0] & 0xffc0 == 0xfe80 {
                AddrClass::LinkLocal
            } else if seg[0] & 0xfe00 == 0xfc00 {
                AddrClass::Private
            } else if seg[0] == 0x64 && seg[1] == 0xff9b {
                // NAT64: the embedded IPv4 address decides.
                let [a, b] = seg[6].to_be_bytes();
                let [c, d] = seg[7].to_be_bytes();
                classify_v4(Ipv4Addr::new(a, b, c, d))
            } else {
                AddrClass::Public
            }
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let [a, b, c, _] = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
        AddrClass::Metadata
    } else if ip.is_loopback() {
        AddrClass::Loopback
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        AddrClass::Private
    } else if ip.is_link_local() {
        AddrClass::LinkLocal
    } else if a == 0
        || ip.is_broadcast()
        || ip.is_multicast()
        || a >= 240
        || ip.is_documentation()
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b & 0xfe) == 18)
    {
        AddrClass::Reserved
    } else {
        AddrClass::Public
    }
}

/// A component's egress policy.
#[derive(Clone, Debug)]
pub struct EgressPolicy {
    pub allowed: Vec<AllowedHost>,
    /// Longest a connection (and a TLS handshake) may take.
    pub connect_timeout: Duration,
    /// Largest response body a guest may read.
    pub max_response_bytes: u64,
    /// The node's own listeners: never reachable, whatever is listed.
    pub forbidden: Arc<std::sync::RwLock<Vec<SocketAddr>>>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressPolicy {
            allowed: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            max_response_bytes: 16 << 20,
            forbidden: Default::default(),
        }
    }
}

/// Why a request was not sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    NotListed,
    Prohibited(SocketAddr, AddrClass),
    OwnListener(SocketAddr),
    Unresolvable,
}

impl EgressPolicy {
    /// The address to dial for `scheme://authority`, or why not.
    pub async fn check(&self, scheme: &Scheme, authority: &http::uri::Authority) -> Result<SocketAddr, Refusal> {
        let port = authority.port_u16().unwrap_or(if *scheme == Scheme::HTTPS { 443 } else { 80 });
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let target = match host.parse::<IpAddr>() {
            Ok(ip) => Target::Ip(ip),
            Err(_) => Target::Name(host.to_ascii_lowercase()),
        };
        let https = *scheme == Scheme::HTTPS;
        let entry = self.allowed.iter().find(|a| matches(a, https, &target, port)).ok_or(Refusal::NotListed)?;
        let addrs: Vec<SocketAddr> = match &target {
            Target::Ip(ip) => vec![SocketAddr::new(*ip, port)],
            Target::Name(n) => {
                tokio::net::lookup_host((n.as_str(), port)).await.map_err(|_| Refusal::Unresolvable)?.collect()
            }
        };
        let mut refused = Refusal::Unresolvable;
        for addr in addrs {
            let own = self.forbidden.read().unwrap().iter().any(|f| {
                f.port() == addr.port() && (f.ip() == addr.ip() || f.ip().is_unspecified() || addr.ip().is_loopback())
            });
            if own {
                refused = Refusal::OwnListener(addr);
                continue;
            }
            let class = classify(addr.ip());
            let named = entry.host == HostPattern::Ip(addr.ip());
            if class == AddrClass::Public || named {
                return Ok(addr);
            }
            refused = Refusal::Prohibited(addr, class);
        }
        Err(refused)
    }

    /// Sends a guest's request under this policy.
    pub async fn send(
        &self,
        mut req: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> Result<http::Response<WasiBody>, HttpError> {
        use http_body_util::BodyExt;
        let scheme = req.uri().scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = req.uri().authority().cloned().ok_or(HttpError::HttpRequestUriInvalid)?;
        let addr = match self.check(&scheme, &authority).await {
            Ok(a) => a,
            Err(why) => {
                tracing::info!(%authority, ?why, "outgoing request refused by the egress policy");
                return Err(match why {
                    Refusal::NotListed => HttpError::HttpRequestDenied,
                    Refusal::Unresolvable => HttpError::DestinationNotFound,
                    Refusal::Prohibited(..) | Refusal::OwnListener(_) => HttpError::DestinationIpProhibited,
                });
            }
        };
        let connect_timeout =
            options.and_then(|o| o.connect_timeout).unwrap_or(self.connect_timeout).min(self.connect_timeout);
        let first_byte = options.and_then(|o| o.first_byte_timeout).unwrap_or(Duration::from_secs(60));
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(HttpError::Connect)?;
            let _ = tcp.set_nodelay(true);
            if scheme == Scheme::HTTPS {
                let name = match authority.host().trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                    Ok(ip) => rustls::pki_types::ServerName::from(ip),
                    Err(_) => rustls::pki_types::ServerName::try_from(authority.host().to_string())
                        .map_err(|_| HttpError::HttpRequestUriInvalid)?,
                };
                let tls =
                    tokio_rustls::TlsConnector::from(tls_config()).connect(name, tcp).await.map_err(HttpError::Tls)?;
                handshake(TokioIo(tls)).await
            } else {
                handshake(TokioIo(tcp)).await
            }
        };
        let mut sender =
            tokio::time::timeout(connect_timeout, connect).await.map_err(|_| HttpError::ConnectionTimeout)??;
        *req.uri_mut() = http::Uri::builder()
            .path_and_query(req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .build()
            .map_err(|_| HttpError::HttpRequestUriInvalid)?;
        let resp = tokio::time::timeout(first_byte, sender.send_request(req))
            .await
            .map_err(|_| HttpError::ConnectionReadTimeout)??;
        let cap = self.max_response_bytes;
        Ok(resp.map(|body| Capped { inner: body, seen: 0, cap }.boxed_unsync()))
    }
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
            let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(cfg)
        })
        .clone()
}

async fn handshake<I>(io: I) -> Result<hyper::client::conn::http1::SendRequest<WasiBody>, HttpError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A response body that fails once it passes `cap` bytes.
struct Capped {
    inner: hyper::body::Incoming,
    seen: u64,
    cap: u64,
}

impl http_body::Body for Capped {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.seen += d.len() as u64;
                    if self.seen > self.cap {
                        return Poll::Ready(Some(Err(HttpError::HttpResponseBodySize(Some(self.cap)))));
                    }
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// tokio I/O as hyper I/O (hyper-util is not a dependency of the host).
struct TokioIo<T>(T);

impl<T: tokio::io::AsyncRead + Unpin> hyper::rt::Read for TokioIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        // SAFETY: the bytes handed to tokio are only written to (never read
        // uninitialized), and exactly `filled` of them are advanced below.
        let n = unsafe {
            let mut tbuf = tokio::io::ReadBuf::uninit(buf.as_mut());
            match tokio::io::AsyncRead::poll_read(Pin::new(&mut self.0), cx, &mut tbuf) {
                Poll::Ready(Ok(())) => tbuf.filled().len(),
                other => return other,
            }
        };
        // SAFETY: tokio initialized `n` bytes of the cursor's buffer.
        unsafe { buf.advance(n) };
        Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> hyper::rt::Write for TokioIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(Pin::new(&mut self.0), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(Pin::new(&mut self.0), cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut self.0), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classifier_knows_every_special_range() {
        let cases = [
            ("8.8.8.8", AddrClass::Public),
            ("1.1.1.1", AddrClass::Public),
            ("127.0.0.1", AddrClass::Loopback),
            ("127.255.0.9", AddrClass::Loopback),
            ("10.1.2.3", AddrClass::Private),
            ("172.16.0.1", AddrClass::Private),
            ("172.31.255.255", AddrClass::Private),
            ("172.32.0.1", AddrClass::Public),
            ("192.168.1.1", AddrClass::Private),
            ("100.64.0.1", AddrClass::Private),
            ("100.128.0.1", AddrClass::Public),
            ("169.254.169.254", AddrClass::Metadata),
            ("100.100.100.200", AddrClass::Metadata),
            ("169.254.1.1", AddrClass::LinkLocal),
            ("0.0.0.0", AddrClass::Reserved),
            ("255.255.255.255", AddrClass::Reserved),
            ("224.0.0.1", AddrClass::Reserved),
            ("240.0.0.1", AddrClass::Reserved),
            ("192.0.2.1", AddrClass::Reserved),
            ("198.18.0.1", AddrClass::Reserved),
            ("::1", AddrClass::Loopback),
            ("::", AddrClass::Reserved),
            ("fe80::1", AddrClass::LinkLocal),
            ("fc00::1", AddrClass::Private),
            ("fd12:3456::1", AddrClass::Private),
            ("fd00:ec2::254", AddrClass::Metadata),
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("::ffff:169.254.169.254", AddrClass::Metadata),
            ("64:ff9b::a9fe:a9fe", AddrClass::Metadata),
            ("64:ff9b::808:808", AddrClass::Public),
            ("ff02::1", AddrClass::Reserved),
            ("2001:db8::1", AddrClass::Reserved),
            ("2606:4700::1111", AddrClass::Public),
        ];
        for (ip, class) in cases {
            assert_eq!(classify(ip.parse().unwrap()), class, "{ip}");
        }
    }

    fn policy(entries: &[&str]) -> EgressPolicy {
        EgressPolicy {
            allowed: entries.iter().map(|e| e.parse().unwrap()).collect(),
            forbidden: Arc::new(std::sync::RwLock::new(vec!["127.0.0.1:7401".parse().unwrap()])),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn only_listed_hosts_and_only_explicit_special_addresses_are_reached() {
        let auth = |s: &str| s.parse::<http::uri::Authority>().unwrap();
        let http = Scheme::HTTP;
        // Nothing listed: nothing reachable.
        assert_eq!(policy(&[]).check(&http, &auth("127.0.0.1:8080")).await, Err(Refusal::NotListed));
        // Listed literally: a loopback test server is reachable, other ports not.
        let p = policy(&["http://127.0.0.1:8080"]);
        assert_eq!(p.check(&http, &auth("127.0.0.1:8080")).await, Ok("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(p.check(&http, &auth("127.0.0.1:8081")).await, Err(Refusal::NotListed));
        assert_eq!(p.check(&Scheme::HTTPS, &auth("127.0.0.1:8080")).await, Err(Refusal::NotListed));
        // A name resolving to loopback is refused even when the name is listed.
        let p = policy(&["http://localhost:8080"]);
        assert!(matches!(
            p.check(&http, &auth("localhost:8080")).await,
            Err(Refusal::Prohibited(_, AddrClass::Loopback))
        ));
        // The node's own listener, whatever is listed.
        let p = policy(&["http://127.0.0.1:*"]);
        assert!(matches!(p.check(&http, &auth("127.0.0.1:7401")).await, Err(Refusal::OwnListener(_))));
        // Metadata, private, link-local: only when named by IP (no traffic is sent here).
        let p = policy(&["*://*.internal:*"]);
        assert_eq!(p.check(&http, &auth("169.254.169.254")).await, Err(Refusal::NotListed));
        assert_eq!(p.check(&http, &auth("10.0.0.1")).await, Err(Refusal::NotListed));
        let p = policy(&["http://169.254.169.254"]);
        assert_eq!(p.check(&http, &auth("169.254.169.254")).await, Ok("169.254.169.254:80".parse().unwrap()));
        // Suffix patterns need a subdomain.
        let p = policy(&["https://*.example.com"]);
        assert_eq!(p.check(&Scheme::HTTPS, &auth("example.com")).await, Err(Refusal::NotListed));
    }
}
