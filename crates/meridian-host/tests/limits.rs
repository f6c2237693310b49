//! The host contains hostile guests: an endless loop is cut at its deadline,
//! an unbounded allocation at its memory limit, and the host keeps serving.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use meridian_host::{Fault, Host, HostConfig, Pooling, Prepared};
use std::time::{Duration, Instant};

const HOSTILE: &[u8] = include_bytes!("../../../guests/hostile.wasm");
const HELLO: &[u8] = include_bytes!("../../../guests/hello.wasm");

fn host(dir: &std::path::Path) -> Host {
    Host::new(HostConfig { cache_dir: dir.to_path_buf(), max_instances: 50, max_memory_mb: 256, ..Default::default() })
        .unwrap()
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

/// Slots are reset in place between requests (not unmapped), so this is
/// what keeps requests apart: a guest leaves a secret in its data and bss
/// sections, heap, stack, memory it grew and a wasm global, and no later
/// request, on whichever slot, finds any of it. Under every way of
/// resetting a slot, with more requests at once than slots kept warm and
/// another component using the same slots in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_finds_what_an_earlier_one_left_in_memory_or_globals() {
    let in_place = Pooling::default();
    let madvise = Pooling { keep_resident_kib: 0, pagemap_scan: false, memory_init_cow: true, ..Pooling::default() };
    let memset_cow = Pooling { keep_resident_kib: 1024, pagemap_scan: false, ..Pooling::default() };
    let scan_cow = Pooling { memory_init_cow: true, ..Pooling::default() };
    for pooling in [in_place, madvise, memset_cow, scan_cow] {
        let dir = tempfile::tempdir().unwrap();
        let h = Host::new(HostConfig {
            cache_dir: dir.path().to_path_buf(),
            // Room for the four at a time, and for instances that have
            // answered but whose slots are not yet given back.
            max_instances: 8,
            max_memory_mb: 64,
            pooling: Pooling { warm_slots: 2, ..pooling.clone() },
        })
        .unwrap();
        let hostile = h.prepare(HOSTILE, Duration::from_secs(10), 32, vec![]).unwrap();
        let hello = h.prepare(HELLO, Duration::from_secs(10), 32, vec![]).unwrap();
        for round in 0..40 {
            let calls: Vec<_> = (0..3)
                .map(|_| {
                    let p = hostile.clone();
                    tokio::spawn(async move { call(&p, "/secret").await })
                })
                .collect();
            assert_eq!(call(&hello, "/").await.0, 200);
            for c in calls {
                let (status, _, body) = c.await.unwrap();
                assert_eq!(status, 200, "{body}");
                let field = |name: &str| {
                    body.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                        .unwrap_or_else(|| panic!("no {name} in {body:?}"))
                        .to_string()
                };
                // What this request left proves the search works...
                assert!(field("left").parse::<u32>().unwrap() >= 5, "{pooling:?} round {round}: {body}");
                assert_eq!(field("global_left"), "5ec7e7", "{body}");
                // ...and nothing of any earlier request is there.
                assert_eq!(field("found"), "0", "{pooling:?} round {round}: {body}");
                assert_eq!(field("global"), "0", "{pooling:?} round {round}: {body}");
                assert_eq!(field("seen"), "0", "{pooling:?} round {round}: {body}");
            }
        }
    }
}
