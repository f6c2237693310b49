//! Keep-alive connections to one node.
//!
//! A deliberately small pool over hyper's HTTP/1 connection API, used instead
//! of hyper-util's general-purpose client: one lock-protected stack of idle
//! connections per node. A connection goes back on the stack when its
//! response body has been read to the end; a connection whose body was
//! abandoned is dropped.
//!
//! No task of its own drives a connection: the caller's task does, while it
//! waits for the response head and while it reads the body (a proxy's
//! request costs no hop to a connection task and back). An idle connection
//! is driven by nobody, so a close by the node is seen when the connection is
//! next checked out, or by the pool's sweeper, which every few seconds drops
//! idle connections that the node closed or that idled too long.
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
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
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
    idle: Mutex<Vec<(Conn, Instant)>>,
    sweeping: AtomicBool,
}

/// How often idle connections are looked at for a close by the node.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// hyper's connection state machine, over TCP or TLS, and whether it has
/// finished (the connection is closed).
struct Driver {
    machine: Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>,
    closed: bool,
}

impl Driver {
    /// Moves the connection along; true once it is closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.closed && self.machine.as_mut().poll(cx).is_ready() {
            self.closed = true;
        }
        self.closed
    }

    /// Waits for `look` (a response head, body bytes, room for a request),
    /// moving the connection along in between.
    ///
    /// Everything `look` waits for is handed over by the connection inside
    /// `drive`, in this very task, and each side of such a hand-over wakes
    /// the waker the other side left: had that been this task's, the task
    /// would wake itself, one more turn of the whole request for nothing.
    /// So `look` gets no waker, and the connection gets this task's waker
    /// only when this returns Pending, after a drive without one found
    /// nothing: then it is the connection (the node's bytes, its close)
    /// that wakes the task, which is all `look` waits for.
    fn drive_for<T>(&mut self, cx: &mut Context<'_>, mut look: impl FnMut(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        let mut quiet = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(v) = look(&mut quiet) {
            return Poll::Ready(v);
        }
        self.drive(&mut quiet);
        if let Poll::Ready(v) = look(&mut quiet) {
            return Poll::Ready(v);
        }
        self.drive(cx);
        let r = look(&mut quiet);
        if r.is_ready() {
            // Not waiting after all: take this task's waker back.
            self.drive(&mut quiet);
        }
        r
    }
}

/// One HTTP/1 connection: the handle requests are sent on and the state
/// machine that moves them, driven by whoever is using the connection.
struct Conn {
    sender: SendRequest<Body>,
    driver: Driver,
}

impl Conn {
    fn closed(&self) -> bool {
        self.driver.closed
    }

    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        self.driver.drive(cx)
    }

    /// Whether the connection can take a request now, driving it until it
    /// knows (the end of the last response may not have been seen yet).
    async fn ready(&mut self) -> bool {
        let Conn { sender, driver } = self;
        std::future::poll_fn(|cx| match driver.drive_for(cx, |q| sender.poll_ready(q).map(|r| r.is_ok())) {
            Poll::Pending if driver.closed => Poll::Ready(false),
            r => r,
        })
        .await
    }

    /// Sends `req` and waits for the response head, driving the connection
    /// (a closed connection fails the pending response at once).
    async fn send(&mut self, req: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        let mut response = std::pin::pin!(self.sender.send_request(req));
        let driver = &mut self.driver;
        std::future::poll_fn(|cx| driver.drive_for(cx, |q| response.as_mut().poll(q))).await
    }

    /// Polls an idle connection once without waiting: false if the node
    /// closed it.
    fn still_open(&mut self) -> bool {
        !self.drive(&mut Context::from_waker(std::task::Waker::noop())) && !self.sender.is_closed()
    }
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
        Arc::new(Pool {
            addr,
            connect_timeout,
            tls: None,
            idle: Mutex::new(Vec::new()),
            sweeping: AtomicBool::new(false),
        })
    }

    /// A pool of mutual-TLS connections to `addr`, which must present the
    /// certificate of `expect`.
    pub fn with_tls(addr: String, connect_timeout: Duration, tls: Arc<Tls>, expect: Expect) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            connect_timeout,
            tls: Some((tls, expect)),
            idle: Mutex::new(Vec::new()),
            sweeping: AtomicBool::new(false),
        })
    }

    async fn connect(self: &Arc<Self>) -> Result<Conn, SendError> {
        self.start_sweeping();
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

    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap();
        while let Some((c, since)) = idle.pop() {
            if !c.closed() && since.elapsed() < MAX_IDLE {
                return Some(c);
            }
        }
        None
    }

    fn release(&self, conn: Conn) {
        if !conn.closed() {
            self.idle.lock().unwrap().push((conn, Instant::now()));
        }
    }

    /// Drops idle connections that the node closed or that idled too long.
    fn sweep(&self) {
        self.idle.lock().unwrap().retain_mut(|(c, since)| since.elapsed() < MAX_IDLE && c.still_open());
    }

    /// Starts the sweeper, once, on the runtime of the first connect. It
    /// holds the pool weakly and ends with it.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                match pool.upgrade() {
                    Some(pool) => pool.sweep(),
                    None => break,
                }
            }
        });
    }

    /// Opens connections in the background until `n` are idle (counting
    /// those already open and idle), like Envoy's preconnect: for a peer
    /// about to receive a burst of requests (a new Raft leader), whose
    /// handshakes would otherwise each cost two round trips in front of a
    /// request.
    pub fn preconnect(self: &Arc<Self>, n: usize) {
        let idle = {
            let mut idle = self.idle.lock().unwrap();
            idle.retain(|(c, since)| !c.closed() && since.elapsed() < MAX_IDLE);
            idle.len()
        };
        for _ in idle..n {
            let pool = self.clone();
            tokio::spawn(async move {
                if let Ok(c) = pool.connect().await {
                    pool.release(c);
                }
            });
        }
    }

    pub async fn send(self: &Arc<Self>, req: Request<Body>) -> Result<Response<Body>, SendError> {
        let mut conn = loop {
            match self.checkout() {
                // Released after its body ended, so ready at once or as soon
                // as the connection has seen the end of the message.
                Some(mut c) => {
                    if c.ready().await {
                        break c;
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
                        if let Err(Ok(c)) = tx.send(pool.connect().await) {
                            pool.release(c);
                        }
                    });
                    break rx.await.map_err(|_| SendError::Connect("the connecting task ended".into()))??;
                }
            }
        };
        let resp = conn.send(req).await?;
        // No body to read (a 304, an answer to HEAD): hyper will not poll
        // it, so the connection goes back now.
        let conn = if hyper::body::Body::is_end_stream(resp.body()) {
            self.release(conn);
            None
        } else {
            Some(conn)
        };
        let pool = self.clone();
        Ok(resp.map(|inner| {
            let body = PooledBody { inner, conn, pool };
            http_body_util::BodyExt::boxed_unsync(body)
        }))
    }
}

async fn handshake<I>(io: I) -> Result<Conn, SendError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, driver) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| SendError::Connect(e.to_string()))?;
    Ok(Conn { sender, driver: Driver { machine: Box::pin(driver), closed: false } })
}

/// A response body that drives its connection while it is read and gives
/// the connection back at its end.
struct PooledBody {
    inner: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.release(c);
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // The body is asked first: hyper reads body bytes off the connection
        // only once the body has been polled for them, so driving first
        // would cost a second turn of this task for every response.
        let this = &mut *self;
        let inner = &mut this.inner;
        let r = match &mut this.conn {
            Some(c) => c.driver.drive_for(cx, |q| Pin::new(&mut *inner).poll_frame(q)),
            None => Pin::new(inner).poll_frame(cx),
        };
        match &r {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
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

    /// Counts the wakes of the task that happen while the task is being
    /// polled: each one is a turn of the whole task for nothing.
    struct SelfWakes {
        inner: std::task::Waker,
        polling: std::sync::atomic::AtomicBool,
        count: AtomicUsize,
    }

    impl std::task::Wake for SelfWakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref()
        }
        fn wake_by_ref(self: &Arc<Self>) {
            if self.polling.load(Ordering::SeqCst) {
                self.count.fetch_add(1, Ordering::SeqCst);
            }
            self.inner.wake_by_ref();
        }
    }

    /// Runs `fut` and says how often it woke itself while it ran.
    async fn self_wakes<F: Future>(fut: F) -> (F::Output, usize) {
        let mut fut = std::pin::pin!(fut);
        let mut total = 0;
        let out = std::future::poll_fn(|cx| {
            let w = Arc::new(SelfWakes { inner: cx.waker().clone(), polling: true.into(), count: AtomicUsize::new(0) });
            let r = fut.as_mut().poll(&mut Context::from_waker(&std::task::Waker::from(w.clone())));
            w.polling.store(false, Ordering::SeqCst);
            total += w.count.load(Ordering::SeqCst);
            r
        })
        .await;
        (out, total)
    }

    #[tokio::test]
    async fn a_request_and_its_body_do_not_wake_their_own_task() {
        // Bodies of one read and of many (driven more than once), on one
        // connection taken from the pool again and again.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let len = req.uri().path()[1..].parse::<usize>().unwrap_or(0);
                        Ok::<_, std::convert::Infallible>(Response::new(crate::full(vec![7u8; len])))
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                });
            }
        });
        let pool = Pool::new(addr, Duration::from_secs(1));
        for len in [1 << 20, 5, 1 << 20, 5, 5, 300_000] {
            let ((), woken) = self_wakes(async {
                let r = pool.send(Request::get(format!("/{len}")).body(crate::empty()).unwrap()).await.unwrap();
                assert_eq!(r.into_body().collect().await.unwrap().to_bytes().len(), len);
            })
            .await;
            assert_eq!(woken, 0, "a body of {len} bytes: the task woke itself {woken} times");
        }
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

    /// A server that answers one request per connection with `answer`, in
    /// one write, and closes the connection `linger` later, without
    /// `Connection: close`. It counts the connections it accepts.
    async fn canned_server(answer: &'static [u8], linger: Duration) -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer).await;
                    tokio::time::sleep(linger).await;
                });
            }
        });
        (addr, conns)
    }

    #[tokio::test]
    async fn a_connection_the_node_closed_while_idle_is_not_used_again() {
        let (addr, conns) =
            canned_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", Duration::from_millis(50)).await;
        let pool = Pool::new(addr, Duration::from_secs(1));
        for i in 1..=3 {
            let r = pool.send(get()).await.unwrap();
            assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "ok");
            assert_eq!(pool.idle.lock().unwrap().len(), 1, "the connection went back after its body");
            tokio::time::sleep(Duration::from_millis(150)).await;
            // The sweeper's pass, without waiting seconds for it.
            pool.sweep();
            assert!(pool.idle.lock().unwrap().is_empty(), "a closed idle connection is swept");
            assert_eq!(conns.load(Ordering::SeqCst), i);
        }
    }

    /// The end of a chunked body that came in the same read as its data is
    /// known as soon as the data has been taken, without another turn of
    /// the task: a proxy then writes the whole answer to its client in one
    /// write, not the data first and the final chunk in a second.
    #[tokio::test]
    async fn the_end_of_a_chunked_body_already_received_is_seen_at_once() {
        let (addr, _) = canned_server(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        let pool = Pool::new(addr, Duration::from_secs(1));
        let mut body = pool.send(get()).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "hello");
        let next =
            hyper::body::Body::poll_frame(Pin::new(&mut body), &mut Context::from_waker(std::task::Waker::noop()));
        assert!(matches!(next, Poll::Ready(None)), "the end is already known");
        assert_eq!(pool.idle.lock().unwrap().len(), 1, "and the connection is back in the pool");
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
