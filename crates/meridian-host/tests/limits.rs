//! The host contains hostile guests: an endless loop is cut at its deadline,
//! an unbounded allocation at its memory limit, and the host keeps serving.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use meridian_host::{Fault, Host, HostConfig, Prepared};
use std::time::{Duration, Instant};

const HOSTILE: &[u8] = include_bytes!("../../../guests/hostile.wasm");
const HELLO: &[u8] = include_bytes!("../../../guests/hello.wasm");

fn host(dir: &std::path::Path) -> Host {
    Host::new(HostConfig { cache_dir: dir.to_path_buf(), max_instances: 50, max_memory_mb: 256, ..Default::default() }).unwrap()
}

fn get(path: &str) -> hyper::Request<http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>> {
    hyper::Request::get(format!("http://localhost{path}"))
        .header("x-meridian-region", "test-region")
        .body(Empty::new().map_err(|never| match never {}).boxed_unsync())
        .unwrap()
}

async fn call(p: &Prepared, path: &str) -> (u16, Option<Fault>, String) {
    let resp = p.handle(get(path), None).await;
    let status = resp.status().as_u16();
    let fault = resp.extensions().get::<Fault>().copied();
    let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    (status, fault, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_times_out_at_its_deadline_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(dir.path());
    let deadline = Duration::from_millis(300);
    let hostile = h.prepare(HOSTILE, deadline, 32, vec![]).unwrap();
    let hello = h.prepare(HELLO, Duration::from_secs(5), 32, vec![]).unwrap();

    // Two spinning guests, one per core, and a stream of well-behaved requests.
    let spin = |p: Prepared| {
        tokio::spawn(async move {
            let t = Instant::now();
            let r = call(&p, "/spin").await;
            (r, t.elapsed())
        })
    };
    let (s1, s2) = (spin(hostile.clone()), spin(hostile.clone()));
    let mut served = 0;
    let t = Instant::now();
    while t.elapsed() < deadline {
        let (status, _, body) = call(&hello, "/hello").await;
        assert_eq!(status, 200);
        assert_eq!(body, "Hello from test-region!\n");
        served += 1;
    }
    assert!(served >= 5, "only {served} requests served while guests spun");
    for s in [s1, s2] {
        let ((status, fault, body), elapsed) = s.await.unwrap();
        assert_eq!(status, 504, "{body}");
        assert_eq!(fault, Some(Fault::Deadline));
        assert!(elapsed < deadline + Duration::from_millis(100), "timed out after {elapsed:?}");
        assert!(body.contains("deadline of 300 ms"), "{body}");
    }
    // The host is unharmed.
    assert_eq!(call(&hostile, "/").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_allocation_is_stopped_at_the_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(dir.path());
    let hostile = h.prepare(HOSTILE, Duration::from_secs(10), 16, vec![]).unwrap();
    let t = Instant::now();
    let (status, fault, body) = call(&hostile, "/hog").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(fault, Some(Fault::Memory), "{body}");
    assert!(body.contains("memory limit of 16 MiB"), "{body}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // A trap is contained too, and the next request is fine.
    let (status, fault, _) = call(&hostile, "/trap").await;
    assert_eq!((status, fault), (500, Some(Fault::Trap)));
    assert_eq!(call(&hostile, "/").await.0, 200);
}

#[tokio::test]
async fn compiled_code_is_cached_on_disk_and_broken_components_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let h = host(dir.path());
        assert!(!h.prepare(HELLO, Duration::from_secs(1), 16, vec![]).unwrap().was_cached);
        assert!(h.prepare(HELLO, Duration::from_secs(1), 16, vec![]).unwrap().was_cached);
    }
    // A new host (a restart) finds the artifact.
    let h = host(dir.path());
    let p = h.prepare(HELLO, Duration::from_secs(1), 16, vec![]).unwrap();
    assert!(p.was_cached);
    assert_eq!(call(&p, "/hello").await.0, 200);

    let err = h.prepare(b"\0asm garbage", Duration::from_secs(1), 16, vec![]).err().unwrap();
    assert!(err.to_string().contains("not a valid component"), "{err}");
    let err = h.prepare(HELLO, Duration::from_secs(1), 100_000, vec![]).err().unwrap();
    assert!(err.to_string().contains("exceeds this region's maximum"), "{err}");
}
