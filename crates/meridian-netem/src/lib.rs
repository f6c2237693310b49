//! User-space link emulation: a TCP proxy per directed link that adds a
//! configurable one-way delay and can be partitioned or killed at runtime.
//!
//! The kernel here has no `netem`, and tests must not need root, so every
//! edge→region and region→region connection of a dev world is made through a
//! [`Link`] instead. A link is a delay line, not a rate limiter: each chunk is
//! stamped when it is read and written out one delay later, so throughput is
//! unaffected while latency is exactly what the topology says.
//!
//! * `Up`: bytes flow after `one_way_delay`; a new connection pays one extra
//!   round trip before its first byte, like a TCP handshake.
//! * `Partitioned`: a black hole. Connections stay open, bytes are held and
//!   new connections hang, as when packets are dropped; on heal everything
//!   held is delivered, as TCP retransmission would.
//! * `Down`: the far side is gone. Every connection is reset and new ones are
//!   reset on accept.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Up,
    Partitioned,
    Down,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub name: String,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub one_way_delay_ms: f64,
    pub state: LinkState,
    pub open_connections: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NetemError {
    #[error("no link named {0:?}")]
    UnknownLink(String),
    #[error("a link named {0:?} already exists")]
    Duplicate(String),
    #[error("cannot listen on {addr} for link {name}: {source}")]
    Bind { name: String, addr: SocketAddr, source: std::io::Error },
}

struct Shared {
    delay_us: AtomicU64,
    state: watch::Sender<LinkState>,
    open: AtomicU64,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }
}

/// One directed link: connections to `listen` are proxied to `upstream`.
pub struct Link {
    pub name: String,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    shared: Arc<Shared>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept_task.abort();
        // Tears down every open connection of the link.
        self.shared.state.send_replace(LinkState::Down);
    }
}

impl Link {
    /// Binds `listen` (port 0 picks a free port) and starts proxying.
    pub async fn start(
        name: &str,
        listen: SocketAddr,
        upstream: SocketAddr,
        one_way_delay: Duration,
    ) -> Result<Link, NetemError> {
        let listener = TcpListener::bind(listen).await.map_err(|source| NetemError::Bind {
            name: name.into(),
            addr: listen,
            source,
        })?;
        let listen =
            listener.local_addr().map_err(|source| NetemError::Bind { name: name.into(), addr: listen, source })?;
        let shared = Arc::new(Shared {
            delay_us: AtomicU64::new(one_way_delay.as_micros() as u64),
            state: watch::channel(LinkState::Up).0,
            open: AtomicU64::new(0),
        });
        let s = shared.clone();
        let link_name = name.to_string();
        let accept_task = tokio::spawn(async move {
            loop {
                let (client, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(link = %link_name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = client.set_nodelay(true);
                let s = s.clone();
                let link_name = link_name.clone();
                tokio::spawn(async move {
                    s.open.fetch_add(1, Ordering::Relaxed);
                    proxy_connection(&s, client, upstream).await;
                    s.open.fetch_sub(1, Ordering::Relaxed);
                    tracing::trace!(link = %link_name, "connection closed");
                });
            }
        });
        Ok(Link { name: name.to_string(), listen, upstream, shared, accept_task })
    }

    pub fn set_delay(&self, one_way: Duration) {
        self.shared.delay_us.store(one_way.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn set_state(&self, state: LinkState) {
        self.shared.state.send_replace(state);
    }

    pub fn status(&self) -> LinkStatus {
        LinkStatus {
            name: self.name.clone(),
            listen: self.listen,
            upstream: self.upstream,
            one_way_delay_ms: self.shared.delay().as_secs_f64() * 1000.0,
            state: *self.shared.state.borrow(),
            open_connections: self.shared.open.load(Ordering::Relaxed),
        }
    }
}

/// Resets a connection (RST instead of FIN), as a dead peer would.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Waits until the link is not partitioned; false if it went down.
async fn wait_passable(state: &mut watch::Receiver<LinkState>) -> bool {
    match state.wait_for(|s| *s != LinkState::Partitioned).await {
        Ok(s) => *s == LinkState::Up,
        Err(_) => false,
    }
}

async fn proxy_connection(s: &Shared, client: TcpStream, upstream: SocketAddr) {
    let mut state = s.state.subscribe();
    if !wait_passable(&mut state).await {
        return reset(client);
    }
    // The handshake of a real connection costs a round trip.
    tokio::select! {
        _ = tokio::time::sleep(2 * s.delay()) => {}
        _ = state.wait_for(|s| *s == LinkState::Down) => return reset(client),
    }
    let server = match TcpStream::connect(upstream).await {
        Ok(server) => server,
        Err(_) => return reset(client),
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(s, cr, sw);
    let down = pump(s, sr, cw);
    tokio::pin!(up, down);
    tokio::select! {
        // The server closed (or died): once that reached the client, close
        // the whole connection. Waiting for more bytes from the client
        // would leave a request written into a dead server hanging.
        _ = &mut down => {}
        // The client half-closed: let the response flow back.
        _ = &mut up => down.await,
    }
}

/// Copies one direction through the delay line until end of stream, an
/// error, or the link going down. On anything but a clean end both sockets
/// it touches are reset, so the peers notice at once.
async fn pump(s: &Shared, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    // Bounded: a slow reader pushes back on the writer, as a TCP window does.
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(256);
    let mut down = s.state.subscribe();
    let clean = {
        let reader = async {
            // Owned here so the writer sees the channel close when the
            // reader stops for any reason, including an error.
            let tx = tx;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let chunk = match from.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => Some(buf[..n].to_vec()),
                    Err(_) => return false,
                };
                let end = chunk.is_none();
                if tx.send((Instant::now() + s.delay(), chunk)).await.is_err() {
                    return false;
                }
                if end {
                    return true;
                }
            }
        };
        let writer = async {
            let mut state = s.state.subscribe();
            while let Some((due, chunk)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if *state.borrow() != LinkState::Up && !wait_passable(&mut state).await {
                    return false;
                }
                match chunk {
                    Some(bytes) => {
                        if to.write_all(&bytes).await.is_err() {
                            return false;
                        }
                    }
                    None => return to.shutdown().await.is_ok(),
                }
            }
            false
        };
        tokio::select! {
            (r, w) = async { tokio::join!(reader, writer) } => r && w,
            _ = down.wait_for(|s| *s == LinkState::Down) => false,
        }
    };
    if !clean {
        let _ = from.as_ref().set_zero_linger();
        let _ = to.as_ref().set_zero_linger();
    }
}

/// Every link of a world, by name.
#[derive(Default)]
pub struct Netem {
    links: Mutex<BTreeMap<String, Arc<Link>>>,
}

impl Netem {
    pub fn new() -> Netem {
        Netem::default()
    }

    pub async fn add(
        &self,
        name: &str,
        listen: SocketAddr,
        upstream: SocketAddr,
        one_way_delay: Duration,
    ) -> Result<Arc<Link>, NetemError> {
        if self.links.lock().unwrap().contains_key(name) {
            return Err(NetemError::Duplicate(name.into()));
        }
        let link = Arc::new(Link::start(name, listen, upstream, one_way_delay).await?);
        self.links.lock().unwrap().insert(name.to_string(), link.clone());
        Ok(link)
    }

    pub fn get(&self, name: &str) -> Result<Arc<Link>, NetemError> {
        self.links.lock().unwrap().get(name).cloned().ok_or_else(|| NetemError::UnknownLink(name.into()))
    }

    pub fn status(&self) -> Vec<LinkStatus> {
        self.links.lock().unwrap().values().map(|l| l.status()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes every byte back.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = c.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(c: &mut TcpStream) -> std::io::Result<Duration> {
        let t = std::time::Instant::now();
        c.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await?;
        Ok(t.elapsed())
    }

    #[tokio::test]
    async fn adds_the_configured_delay_in_each_direction_and_follows_changes() {
        let up = echo_server().await;
        let link = Link::start("a->b", "127.0.0.1:0".parse().unwrap(), up, Duration::from_millis(20)).await.unwrap();
        let mut c = TcpStream::connect(link.listen).await.unwrap();
        // First exchange includes the emulated handshake round trip.
        let first = round_trip(&mut c).await.unwrap();
        assert!(first >= Duration::from_millis(80), "{first:?}");
        let rtt = round_trip(&mut c).await.unwrap();
        assert!(rtt >= Duration::from_millis(40) && rtt < Duration::from_millis(80), "{rtt:?}");
        link.set_delay(Duration::from_millis(5));
        let rtt = round_trip(&mut c).await.unwrap();
        assert!(rtt >= Duration::from_millis(10) && rtt < Duration::from_millis(40), "{rtt:?}");
    }

    #[tokio::test]
    async fn a_partition_holds_bytes_and_healing_delivers_them() {
        let up = echo_server().await;
        let link = Link::start("a->b", "127.0.0.1:0".parse().unwrap(), up, Duration::ZERO).await.unwrap();
        let mut c = TcpStream::connect(link.listen).await.unwrap();
        round_trip(&mut c).await.unwrap();
        link.set_state(LinkState::Partitioned);
        let held = tokio::time::timeout(Duration::from_millis(300), round_trip(&mut c)).await;
        assert!(held.is_err(), "bytes crossed a partitioned link");
        link.set_state(LinkState::Up);
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn when_the_server_goes_away_the_client_connection_closes() {
        // A server that dies with a request unread in its socket, as a
        // SIGKILLed process does: the kernel answers with a reset.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (c, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(c);
        });
        let link = Link::start("a->b", "127.0.0.1:0".parse().unwrap(), up, Duration::from_millis(1)).await.unwrap();
        let mut c = TcpStream::connect(link.listen).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        // The client keeps its side open and waits for an answer: it must
        // learn promptly that none will come.
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await.expect("client left hanging");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }

    #[tokio::test]
    async fn a_killed_link_resets_connections_and_refuses_new_ones() {
        let up = echo_server().await;
        let link = Link::start("a->b", "127.0.0.1:0".parse().unwrap(), up, Duration::ZERO).await.unwrap();
        let mut c = TcpStream::connect(link.listen).await.unwrap();
        round_trip(&mut c).await.unwrap();
        link.set_state(LinkState::Down);
        let r = tokio::time::timeout(Duration::from_secs(2), round_trip(&mut c)).await.unwrap();
        assert!(r.is_err(), "connection survived a killed link");
        let mut c2 = TcpStream::connect(link.listen).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(2), round_trip(&mut c2)).await.unwrap();
        assert!(r.is_err());
        link.set_state(LinkState::Up);
        let mut c3 = TcpStream::connect(link.listen).await.unwrap();
        round_trip(&mut c3).await.unwrap();
    }
}
