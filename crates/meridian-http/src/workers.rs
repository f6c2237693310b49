//! Thread per core for public ports: `n` threads, each with a
//! single-threaded tokio runtime and its own `SO_REUSEPORT` listener on the
//! same address, so the kernel spreads connections over the threads and a
//! request lives on one thread from accept to answer: no work stealing, no
//! cross-thread wake-ups between a client's connection task and the
//! upstream connection task serving it (nginx's worker model, and Pingora's
//! "thread per core" option).
//!
//! Whatever a worker's requests keep per connection (an edge's upstream
//! pools) should be per worker too: [`current`] says which worker a thread
//! is, so such state can be indexed by it and connections opened on a
//! worker are only ever used there.

use crate::{serve, Handler, Transport};
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker this thread is, or `None` on any other thread (the main
/// runtime: cluster ports, health probes, background work).
pub fn current() -> Option<usize> {
    WORKER.with(|w| w.get())
}

/// How many workers to run when a config does not say: one per core.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A listener that the workers of [`serve_per_core`] will share its
/// address with (`SO_REUSEPORT`). An address some other process already
/// listens on is refused (`AddrInUse`), as a plain bind would: without the
/// check a second edge started on the same port by the same user would
/// silently take half of the first one's connections.
pub async fn bind_shared(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    if addr.port() != 0 {
        // Fails if anyone listens there (a socket without SO_REUSEPORT
        // cannot join a group); closed at once, a listener leaves no
        // TIME_WAIT behind.
        drop(std::net::TcpListener::bind(addr)?);
    }
    join_shared(addr)
}

/// Another listener on an address shared with `SO_REUSEPORT`.
fn join_shared(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// One public port: its listener (bound with [`bind_shared`]), handler
/// and transport.
pub struct Port {
    pub listener: tokio::net::TcpListener,
    pub handler: Handler,
    pub transport: Transport,
}

/// Serves `ports` on `n` worker threads until `stop` turns true, then
/// drains each worker for up to `grace`. Every worker serves every port:
/// worker 0 takes over the given listeners, the others bind their own on
/// the same addresses. Errors binding or starting a worker come back
/// before anything is served.
pub async fn serve_per_core(
    n: usize,
    ports: Vec<Port>,
    stop: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
) -> std::io::Result<()> {
    let n = n.max(1);
    // Every worker's listeners, made here so a failure is reported at once.
    let mut per_worker: Vec<Vec<(std::net::TcpListener, Handler, Transport)>> = (0..n).map(|_| Vec::new()).collect();
    for p in ports {
        let addr = p.listener.local_addr()?;
        for (i, mine) in per_worker.iter_mut().enumerate().skip(1) {
            let l = join_shared(addr).map_err(|e| {
                std::io::Error::new(e.kind(), format!("worker {i} cannot share {addr} (SO_REUSEPORT): {e}"))
            })?;
            mine.push((l.into_std()?, p.handler.clone(), p.transport.clone()));
        }
        per_worker[0].push((p.listener.into_std()?, p.handler, p.transport));
    }
    let mut done = Vec::new();
    for (i, listeners) in per_worker.into_iter().enumerate() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let stop = stop.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || {
            WORKER.with(|w| w.set(Some(i)));
            rt.block_on(async move {
                let mut tasks = tokio::task::JoinSet::new();
                for (l, handler, transport) in listeners {
                    let l = match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(worker = i, error = %e, "cannot register a listener");
                            continue;
                        }
                    };
                    let mut stop = stop.clone();
                    tasks.spawn(serve(
                        l,
                        handler,
                        transport,
                        async move {
                            let _ = stop.wait_for(|s| *s).await;
                        },
                        grace,
                    ));
                }
                while tasks.join_next().await.is_some() {}
            });
            let _ = tx.send(());
        })?;
        done.push(rx);
    }
    for d in done {
        let _ = d.await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Sixteen clients over fresh connections: more than one worker
    /// answers, each request on a worker thread, and every worker stops.
    /// A port some process already serves is refused, shared or not.
    #[tokio::test]
    async fn a_port_already_in_use_is_refused_even_to_a_shared_listener() {
        let first = bind_shared("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = first.local_addr().unwrap();
        let e = bind_shared(addr).await.expect_err("a second process would split the port");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = bind_shared(plain.local_addr().unwrap()).await.expect_err("a plain listener's port");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        drop(first);
        bind_shared(addr).await.expect("free again once the first one closed");
    }

    #[tokio::test]
    async fn connections_spread_over_workers_and_each_request_stays_on_one() {
        let listener = bind_shared("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Option<usize>>>> = Arc::default();
        let s = seen.clone();
        let handler: Handler = Arc::new(move |_req, _peer| {
            let s = s.clone();
            Box::pin(async move {
                let before = current();
                tokio::task::yield_now().await;
                assert_eq!(current(), before, "a request moved threads");
                s.lock().unwrap().push(before);
                http::Response::new(crate::full("ok"))
            })
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve_per_core(
            2,
            vec![Port { listener, handler, transport: Transport::Plain }],
            stop_rx,
            Duration::from_secs(1),
        ));
        let mut workers = std::collections::BTreeSet::new();
        for _ in 0..64 {
            // A new connection each time (the kernel hashes each to a worker).
            let pool = crate::pool::Pool::new(addr.to_string(), Duration::from_secs(2));
            let r = pool.send(http::Request::get("/").body(crate::empty()).unwrap()).await.unwrap();
            assert_eq!(r.status(), 200);
            workers.insert(seen.lock().unwrap().last().copied().flatten());
            if workers.len() == 2 {
                break;
            }
        }
        assert_eq!(workers.len(), 2, "64 connections all went to one worker: {workers:?}");
        assert!(seen.lock().unwrap().iter().all(|w| w.is_some()), "a request ran off the workers");
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("workers stopped").unwrap().unwrap();
    }
}
