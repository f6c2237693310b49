//! The HTTP plumbing every role shares: one body type, small response
//! builders, bearer-token checks, a bounded body reader, a pooled client and
//! an accept loop that speaks HTTP/1.1 and HTTP/2 (h2c) with graceful
//! shutdown, in plain HTTP for public ports and mutual TLS for cluster ports
//! ([`Transport`]), and the one client nodes call each other with
//! ([`cluster::ClusterClient`]). Only roles (region, edge, control, CLI) use
//! it; the function host and the storage layers stay free of HTTP framing
//! concerns beyond `wasi:http` itself.

pub mod cluster;
pub mod pool;
pub mod range;
pub mod workers;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub use meridian_trust::{ClientAuth, Identity, Role, Tls};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A plain-text response; `message` should say what went wrong and what to do.
pub fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut m = message.into();
    if !m.ends_with('\n') {
        m.push('\n');
    }
    let mut r = Response::new(full(m));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(v) => {
            let mut r = Response::new(full(v));
            *r.status_mut() = status;
            r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode response: {e}")),
    }
}

/// The token of an `Authorization: Bearer <token>` header, if any.
pub fn bearer<B>(req: &Request<B>) -> Option<&str> {
    req.headers().get(http::header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// The value of cookie `name` in a request's `Cookie` headers, if any.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))
}

/// Byte equality in time independent of where the inputs differ, so a
/// secret cannot be guessed byte by byte from timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in
/// constant time.
pub fn has_bearer<B>(req: &Request<B>, token: &str) -> bool {
    !token.is_empty() && bearer(req).is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
}

pub fn unauthorized() -> Response<Body> {
    text(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token: pass `Authorization: Bearer <token>` with the world's token",
    )
}

#[derive(Debug)]
pub enum ReadBodyError {
    TooLarge(usize),
    Failed(BoxError),
}

impl std::fmt::Display for ReadBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadBodyError::TooLarge(n) => write!(f, "request body is larger than {n} bytes"),
            ReadBodyError::Failed(e) => write!(f, "cannot read request body: {e}"),
        }
    }
}

impl std::error::Error for ReadBodyError {}

impl ReadBodyError {
    pub fn into_response(self) -> Response<Body> {
        match &self {
            ReadBodyError::TooLarge(_) => text(StatusCode::PAYLOAD_TOO_LARGE, self.to_string()),
            ReadBodyError::Failed(_) => text(StatusCode::BAD_REQUEST, self.to_string()),
        }
    }
}

/// Collects a body of at most `limit` bytes.
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ReadBodyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ReadBodyError::TooLarge(limit)),
        Err(e) => Err(ReadBodyError::Failed(e)),
    }
}

pub type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// A pooled HTTP/1.1 client with TCP_NODELAY and a connect timeout.
pub fn client(connect_timeout: Duration) -> Client {
    let mut conn = hyper_util::client::legacy::connect::HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(connect_timeout));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .pool_timer(TokioTimer::new())
        .build(conn)
}

/// A request handler shared by every connection.
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> BoxFuture<Response<Body>> + Send + Sync>;

/// How a listener's connections are carried.
#[derive(Clone)]
pub enum Transport {
    /// Plain HTTP/1.1 and h2c: public ports.
    Plain,
    /// TLS with the node's certificate. With [`ClientAuth::Required`] (cluster
    /// ports) a client without a certificate from the cluster CA never gets
    /// past the handshake; every request then carries the client's verified
    /// [`Peer`] identity as an extension.
    Tls(Arc<Tls>, ClientAuth),
    /// TLS for users (an edge's HTTPS port): the configuration decides the
    /// certificate per server name and offers h2 and http/1.1 by ALPN; no
    /// client certificate.
    Public(Arc<tokio_rustls::rustls::ServerConfig>),
}

/// The verified identity of the node (or operator) on the other end of a
/// TLS connection, from its certificate. Handlers authorize with this and
/// nothing else: no header or message field can set it.
#[derive(Clone, Debug)]
pub struct Peer(pub Arc<Identity>);

impl Peer {
    pub fn of<B>(req: &Request<B>) -> Option<&Identity> {
        req.extensions().get::<Peer>().map(|p| &*p.0)
    }
}

/// A TLS handshake must finish within this, so a client that connects and
/// says nothing (or half a ClientHello) cannot hold a task for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server side of a TLS handshake, within `HANDSHAKE_TIMEOUT`; `None`
/// (logged) if it failed.
async fn accept_tls(
    config: Arc<tokio_rustls::rustls::ServerConfig>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsAcceptor::from(config).accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake refused");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Accepts connections until `shutdown` resolves, then stops accepting and
/// waits up to `grace` for requests in flight to finish.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    transport: Transport,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and similar: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (h, builder, watcher, transport) =
            (handler.clone(), builder.clone(), graceful.watcher(), transport.clone());
        tokio::spawn(async move {
            let service = |identity: Option<Peer>| {
                hyper::service::service_fn(move |mut req| {
                    let h = h.clone();
                    if let Some(id) = &identity {
                        req.extensions_mut().insert(id.clone());
                    }
                    async move { Ok::<_, std::convert::Infallible>(h(req, peer).await) }
                })
            };
            let result = match transport {
                Transport::Plain => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service(None));
                    watcher.watch(conn.into_owned()).await
                }
                Transport::Public(config) => {
                    let Some(stream) = accept_tls(config, stream, peer).await else { return };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service(None));
                    watcher.watch(conn.into_owned()).await
                }
                Transport::Tls(tls, auth) => {
                    let Some(stream) = accept_tls(tls.server_config(auth), stream, peer).await else { return };
                    let identity =
                        Tls::peer_identity(stream.get_ref().1.peer_certificates()).map(|i| Peer(Arc::new(i)));
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service(identity));
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {grace:?}; closing them");
    }
}
