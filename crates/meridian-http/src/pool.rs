//! Keep-alive connections to one node.
//!
//! A deliberately small pool over hyper's HTTP/1 connection API, used instead
//! of hyper-util's general-purpose client: one lock-protected stack of idle
//! senders per node, no background tasks beyond each connection's own
//! driver. A connection goes back on the stack when its response body has
//! been read to the end; a connection whose body was abandoned is dropped.
//!
//! With TLS, every new connection is a mutual-TLS handshake with this node's
//! certificate, and the server's certificate must be the one the pool
//! [`Expect`]s (name, role and, for a region, jurisdiction) before the
//! request is written: a wrong peer is a connect error, and nothing was sent.

use crate::Body;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use meridian_trust::{Expect, Tls};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Idle connections older than this are not reused: the region's server
/// closes idle keep-alive connections after 30 s, and reusing one that is
/// about to close would fail a request that never reached the region.
const MAX_IDLE: Duration = Duration::from_secs(20);

pub struct Pool {
    addr: String,
    connect_timeout: Duration,
    tls: Option<(Arc<Tls>, Expect)>,
    idle: Mutex<Vec<(SendRequest<Body>, Instant)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing was sent: the request may be retried elsewhere whatever its method.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The request may have reached the node.
    #[error("{0}")]
    Request(#[from] hyper::Error),
}

impl SendError {
    /// Whether nothing of the request can have reached the node, so sending
    /// it again (there or elsewhere) cannot run it twice.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

impl Pool {
    /// A pool of plain TCP connections to `addr` (`host:port`).
    pub fn new(addr: String, connect_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool { addr, connect_timeout, tls: None, idle: Mutex::new(Vec::new()) })
    }

    /// A pool of mutual-TLS connections to `addr`, which must present the
    /// certificate of `expect`.
    pub fn with_tls(addr: String, connect_timeout: Duration, tls: Arc<Tls>, expect: Expect) -> Arc<Pool> {
        Arc::new(Pool { addr, connect_timeout, tls: Some((tls, expect)), idle: Mutex::new(Vec::new()) })
    }

    async fn connect(&self) -> Result<SendRequest<Body>, SendError> {
        let connect = async {
            let stream =
                tokio::net::TcpStream::connect(&self.addr).await.map_err(|e| SendError::Connect(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None => handshake(TokioIo::new(stream)).await,
                Some((tls, expect)) => {
                    let name = expect.server_name().map_err(SendError::Connect)?;
                    let stream = tokio_rustls::TlsConnector::from(tls.client_config())
                        .connect(name, stream)
                        .await
                        .map_err(|e| SendError::Connect(format!("TLS handshake with {}: {e}", self.addr)))?;
                    let id = Tls::peer_identity(stream.get_ref().1.peer_certificates())
                        .ok_or_else(|| SendError::Connect("the server's certificate carries no identity".into()))?;
                    expect.check(&id).map_err(SendError::Connect)?;
                    handshake(TokioIo::new(stream)).await
                }
            }
        };
        tokio::time::timeout(self.connect_timeout, connect).await.map_err(|_| {
            SendError::Connect(format!("no connection to {} within {:?}", self.addr, self.connect_timeout))
        })?
    }

    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap();
        while let Some((s, since)) = idle.pop() {
            if !s.is_closed() && since.elapsed() < MAX_IDLE {
                return Some(s);
            }
        }
        None
    }

    /// Opens connections in the background until `n` are idle (counting
    /// those already open and idle), like Envoy's preconnect: for a peer
    /// about to receive a burst of requests (a new Raft leader), whose
    /// handshakes would otherwise each cost two round trips in front of a
    /// request.
    pub fn preconnect(self: &Arc<Self>, n: usize) {
        let idle = {
            let mut idle = self.idle.lock().unwrap();
            idle.retain(|(s, since)| !s.is_closed() && since.elapsed() < MAX_IDLE);
            idle.len()
        };
        for _ in idle..n {
            let pool = self.clone();
            tokio::spawn(async move {
                if let Ok(s) = pool.connect().await {
                    pool.idle.lock().unwrap().push((s, Instant::now()));
                }
            });
        }
    }

    pub async fn send(self: &Arc<Self>, req: Request<Body>) -> Result<Response<Body>, SendError> {
        let mut sender = loop {
            match self.checkout() {
                // Released after its body ended, so ready at once or as soon
                // as the connection task has seen the end of the message.
                Some(mut s) => {
                    if s.ready().await.is_ok() {
                        break s;
                    }
                }
                // Connected in a task of its own: a caller with a short
                // timeout (a Raft heartbeat over a long link) may give up
                // before the handshake ends; the connection is then kept
                // for the next request instead of being thrown away, so
                // links slower than such a timeout still get connected.
                None => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let pool = self.clone();
                    tokio::spawn(async move {
                        if let Err(Ok(s)) = tx.send(pool.connect().await) {
                            pool.idle.lock().unwrap().push((s, Instant::now()));
                        }
                    });
                    break rx.await.map_err(|_| SendError::Connect("the connecting task ended".into()))??;
                }
            }
        };
        let resp = sender.send_request(req).await?;
        // No body to read (a 304, an answer to HEAD): hyper will not poll
        // it, so the connection goes back now.
        if hyper::body::Body::is_end_stream(resp.body()) {
            self.idle.lock().unwrap().push((sender, Instant::now()));
            return Ok(resp.map(|b| {
                http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(b, |e| {
                    Box::new(e) as crate::BoxError
                }))
            }));
        }
        let pool = self.clone();
        Ok(resp.map(|inner| {
            let body = PooledBody { inner, sender: Some(sender), pool };
            http_body_util::BodyExt::boxed_unsync(body)
        }))
    }
}

async fn handshake<I>(io: I) -> Result<SendRequest<Body>, SendError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| SendError::Connect(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

struct PooledBody {
    inner: Incoming,
    sender: Option<SendRequest<Body>>,
    pool: Arc<Pool>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(s) = self.sender.take() {
            self.pool.idle.lock().unwrap().push((s, Instant::now()));
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.sender = None,
            _ => {}
        }
        r.map(|o| o.map(|res| res.map_err(|e| Box::new(e) as crate::BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A server that counts the connections it accepts.
    async fn server() -> (String, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(crate::full("hello")))
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                });
            }
        });
        (addr, conns)
    }

    fn get() -> Request<Body> {
        Request::get("/").body(crate::empty()).unwrap()
    }

    #[tokio::test]
    async fn connections_are_reused_once_a_body_is_read_and_not_before() {
        let (addr, conns) = server().await;
        let pool = Pool::new(addr, Duration::from_secs(1));
        for _ in 0..5 {
            let r = pool.send(get()).await.unwrap();
            assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "hello");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "sequential requests share one connection");
        // Two responses held at once need two connections.
        let a = pool.send(get()).await.unwrap();
        let b = pool.send(get()).await.unwrap();
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        drop((a, b));
    }

    #[tokio::test]
    async fn a_response_without_a_body_gives_its_connection_back() {
        let (addr, conns) = server().await;
        let pool = Pool::new(addr, Duration::from_secs(1));
        for _ in 0..3 {
            let r = pool.send(Request::head("/").body(crate::empty()).unwrap()).await.unwrap();
            assert_eq!(r.status(), 200);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "HEAD answers are not read, yet their connection is reused");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let pool = Pool::new(addr, Duration::from_secs(1));
        assert!(matches!(pool.send(get()).await, Err(SendError::Connect(_))));
    }
}
