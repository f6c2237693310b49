//! What mutual TLS costs on Meridian's own node-to-node stack, measured side
//! by side in one run: the same server (`meridian_http::serve`) and the same
//! pooled client (`meridian_http::pool`), once in plain TCP and once with
//! mutual TLS (TLS 1.3, ECDSA P-256 certificates from a cluster CA).
//!
//!     cargo run --release -p meridian-http --example tls_cost -- [ROUNDS]
//!
//! 1. Request latency over a pooled keep-alive connection (what an edge adds
//!    per request in front of a region): sequential GETs.
//! 2. Stream throughput: one long-lived POST carrying length-prefixed
//!    messages, as a replication stream does — small (200 B) and large
//!    (64 KiB) messages.
//!
//! Rounds alternate plain and TLS so machine noise falls on both.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use meridian_http::pool::Pool;
use meridian_http::{Body, ClientAuth, Handler, Transport};
use meridian_trust::{Expect, Identity, Role, Tls, TlsFiles};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn server(transport: Transport) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let handler: Handler = Arc::new(|req: Request<hyper::body::Incoming>, _| {
        Box::pin(async move {
            if req.method() == http::Method::POST {
                // Count the bytes of a stream, answer with the total.
                let mut body = req.into_body();
                let mut n = 0u64;
                while let Some(Ok(f)) = body.frame().await {
                    if let Ok(d) = f.into_data() {
                        n += d.len() as u64;
                    }
                }
                return Response::new(meridian_http::full(n.to_string()));
            }
            let mut r = Response::new(meridian_http::full("ok"));
            *r.status_mut() = StatusCode::OK;
            r
        })
    });
    tokio::spawn(meridian_http::serve(l, handler, transport, std::future::pending(), Duration::from_secs(1)));
    addr
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

async fn latency(pool: &Arc<Pool>, n: usize) -> (f64, f64) {
    let mut us = Vec::with_capacity(n);
    for i in 0..n + 200 {
        let t = Instant::now();
        let r = pool.send(Request::get("/").body(meridian_http::empty()).unwrap()).await.unwrap();
        let _ = r.into_body().collect().await.unwrap();
        if i >= 200 {
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    (pct(&mut us, 0.5), pct(&mut us, 0.99))
}

async fn stream(pool: &Arc<Pool>, msg: usize, total: usize) -> f64 {
    let frame = {
        let mut f = (msg as u32).to_le_bytes().to_vec();
        f.extend(std::iter::repeat_n(7u8, msg));
        Bytes::from(f)
    };
    let count = total / msg;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let body = http_body_util::StreamBody::new(futures_lite_stream(rx));
    let req: Request<Body> = Request::post("/stream").body(body.boxed_unsync()).unwrap();
    let t = Instant::now();
    let send = tokio::spawn({
        let pool = pool.clone();
        async move {
            let r = pool.send(req).await.unwrap();
            r.into_body().collect().await.unwrap().to_bytes()
        }
    });
    for _ in 0..count {
        tx.send(frame.clone()).await.unwrap();
    }
    drop(tx);
    let got = send.await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(String::from_utf8_lossy(&got).parse::<usize>().unwrap(), count * (msg + 4));
    count as f64 / secs
}

fn futures_lite_stream(
    rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures_core::Stream<Item = Result<hyper::body::Frame<Bytes>, meridian_http::BoxError>> {
    struct S(tokio::sync::mpsc::Receiver<Bytes>);
    impl futures_core::Stream for S {
        type Item = Result<hyper::body::Frame<Bytes>, meridian_http::BoxError>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }
    S(rx)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let ca = meridian_trust::init_ca(dir.path(), "bench", 1).unwrap();
    for (name, role, j) in [("us-east", Role::Region, Some("us")), ("eu-west", Role::Region, Some("eu"))] {
        meridian_trust::issue(&ca, &Identity::new(name, role, j).unwrap(), dir.path(), 1).unwrap();
    }
    let server_tls = Tls::load(TlsFiles::in_dir(dir.path(), "us-east")).unwrap();
    let client_tls = Tls::load(TlsFiles::in_dir(dir.path(), "eu-west")).unwrap();
    let plain_addr = server(Transport::Plain).await;
    let tls_addr = server(Transport::Tls(server_tls, ClientAuth::Required)).await;
    let plain = Pool::new(plain_addr, Duration::from_secs(2));
    let tls = Pool::with_tls(tls_addr, Duration::from_secs(2), client_tls, Expect::region("us-east", "us"));

    let mut rows: Vec<[Vec<f64>; 2]> = vec![[vec![], vec![]], [vec![], vec![]], [vec![], vec![]], [vec![], vec![]]];
    for _ in 0..rounds {
        for (i, pool) in [&plain, &tls].into_iter().enumerate() {
            let (p50, p99) = latency(pool, 5000).await;
            rows[0][i].push(p50);
            rows[1][i].push(p99);
            rows[2][i].push(stream(pool, 200, 100 << 20).await);
            rows[3][i].push(stream(pool, 64 << 10, 1 << 30).await);
        }
    }
    let med = |v: &mut Vec<f64>| pct(v, 0.5);
    println!("\n## mTLS cost on the node-to-node stack (meridian-http serve + pool, loopback, {rounds} alternating rounds, medians)\n");
    println!("| measure | plain TCP | mutual TLS 1.3 | TLS vs plain |");
    println!("|---|---|---|---|");
    let names = [
        "pooled request p50 µs",
        "pooled request p99 µs",
        "stream of 200 B messages, msgs/s",
        "stream of 64 KiB messages, MiB/s",
    ];
    for (k, name) in names.iter().enumerate() {
        let (mut a, mut b) = (rows[k][0].clone(), rows[k][1].clone());
        let (mut a, mut b) = (med(&mut a), med(&mut b));
        if k == 3 {
            a = a * 64.0 / 1024.0;
            b = b * 64.0 / 1024.0;
        }
        let cmp = if k < 2 { format!("+{:.1} µs", b - a) } else { format!("{:.1} % less", (1.0 - b / a) * 100.0) };
        println!("| {name} | {a:.1} | {b:.1} | {cmp} |");
    }
}
