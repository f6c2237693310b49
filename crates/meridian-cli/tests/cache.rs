//! The edges cache like a CDN: one fetch for a thousand concurrent misses,
//! purges that reach every edge, a deploy that purges what it changed, and
//! cached content served while every region is down; byte ranges cut from
//! the cached object.

mod support;
use std::time::{Duration, Instant};
use support::*;

const HOST: &str = "cdn.localhost";

const MANIFEST: &str = r#"
[app]
name = "cdn"

[components.hello]
source = "c/hello.wasm"

# A function whose answers every edge may keep for five minutes.
[[routes]]
path = "/hello"
component = "hello"
cache_control = "public, max-age=300"
cache_tags = ["greeting"]

# Fresh for one second, then served stale for ten minutes if the regions fail.
[[routes]]
path = "/news"
static = "news"
cache_control = "public, max-age=1, stale-if-error=600"

[[routes]]
path = "/"
static = "site"
cache_tags = ["site"]
"#;

fn app() -> tempfile::TempDir {
    let app = single_component_app("hello.wasm", MANIFEST);
    for (path, body) in [
        ("site/index.html", "<h1>home</h1>"),
        ("site/about.html", "about"),
        ("site/uncached.txt", "never asked for before the regions died"),
        ("news/today.txt", "news of the day"),
        ("site/range.txt", "0123456789abcdefghij"),
    ] {
        let p = app.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    app
}

/// A world with app `cdn` (and `extra_files`) deployed: the world, the app's directory (kept
/// while the test runs), a client, and edge eu-west's URL.
fn start_cdn(extra_files: &[(&str, &[u8])]) -> (World, tempfile::TempDir, Client, String) {
    let w = World::start(&[]);
    let app = app();
    for (path, body) in extra_files {
        std::fs::write(app.path().join(path), body).unwrap();
    }
    let (ok, out) = w.create_and_deploy(app.path(), false);
    assert!(ok, "deploy failed: {out}");
    let eu = w.edge("edge-eu-west");
    (w, app, client(), eu)
}

/// Requests for app `cdn` the regions answered, all regions together.
async fn region_requests(w: &World) -> u64 {
    let mut total = 0;
    for r in &w.desc.regions {
        let (status, text) = w.region_call(&r.name, "GET", "/_meridian/metrics", vec![]).await;
        assert_eq!(status, 200, "{text}");
        total += text
            .lines()
            .filter(|l| l.starts_with("meridian_app_requests_total{") && l.contains("app=\"cdn\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

async fn get_cdn(c: &Client, edge: &str, path: &str, extra: &[(&str, &str)]) -> Resp {
    let mut h = vec![("host", HOST)];
    h.extend_from_slice(extra);
    get(c, &format!("{edge}{path}"), &h).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_cache_coalesce_purge_and_serve_stale_when_every_region_is_down() {
    let (w, app, c, eu) = start_cdn(&[]);

    // --- 1,000 concurrent requests for one uncached object: one fetch ------
    let before = region_requests(&w).await;
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (c, eu) = (c.clone(), eu.clone());
        tasks.push(tokio::spawn(async move { get_cdn(&c, &eu, "/hello", &[]).await }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let fetched = region_requests(&w).await - before;
    assert_eq!(fetched, 1, "the regions answered {fetched} requests for one object");
    assert!(answers.iter().all(|r| r.status == 200), "{:?}", answers.iter().find(|r| r.status != 200).map(|r| &r.body));
    let bodies: std::collections::BTreeSet<&str> = answers.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let misses = answers.iter().filter(|r| r.header("x-meridian-cache") == "MISS").count();
    assert_eq!(misses, 1);
    assert!(answers.iter().all(|r| r.header("cache-tag").is_empty()), "tags reach no client");
    let status = w.edge_status("edge-eu-west").await;
    assert_eq!(status["cache"]["misses"], 1, "{status}");

    // --- hits carry Age; the edge answers conditionals itself --------------
    let r = get_cdn(&c, &eu, "/index.html", &[]).await;
    assert_eq!((r.status, r.header("x-meridian-cache").as_str()), (200, "MISS"));
    let etag = r.header("etag");
    assert!(!etag.is_empty());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get_cdn(&c, &eu, "/index.html", &[]).await;
    assert_eq!((r.status, r.header("x-meridian-cache").as_str()), (200, "HIT"));
    assert!(r.header("age").parse::<u64>().unwrap() >= 1, "age {:?}", r.header("age"));
    // Browsers are told to revalidate; the edge keeps it (CDN-Cache-Control).
    assert_eq!(r.header("cache-control"), "public, max-age=0, must-revalidate");
    let r = get_cdn(&c, &eu, "/index.html", &[("if-none-match", &etag)]).await;
    assert_eq!((r.status, r.header("x-meridian-cache").as_str()), (304, "HIT"));
    // A client's no-cache does not reach the regions.
    let before = region_requests(&w).await;
    let r = get_cdn(&c, &eu, "/index.html", &[("cache-control", "no-cache"), ("pragma", "no-cache")]).await;
    assert_eq!(r.header("x-meridian-cache"), "HIT");
    assert_eq!(region_requests(&w).await, before);

    // --- a purge by tag reaches every edge; the next request is a miss -----
    for e in &w.desc.edges {
        for path in ["/hello", "/about.html"] {
            get_cdn(&c, &e.url, path, &[]).await;
            let r = get_cdn(&c, &e.url, path, &[]).await;
            assert_eq!(r.header("x-meridian-cache"), "HIT", "{path} at {}", e.name);
        }
    }
    let (ok, out) = w.cli(&["purge", "--app", "cdn", "--tag", "greeting"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("at {} edges", w.desc.edges.len())), "{out}");
    for e in &w.desc.edges {
        let r = get_cdn(&c, &e.url, "/hello", &[]).await;
        assert_eq!(r.header("x-meridian-cache"), "MISS", "/hello at {} after the purge", e.name);
        let r = get_cdn(&c, &e.url, "/about.html", &[]).await;
        assert_eq!(r.header("x-meridian-cache"), "HIT", "/about.html is not tagged greeting ({})", e.name);
    }
    // Another app's purge leaves this app's objects alone.
    let (ok, out) = w.cli(&["purge", "--app", "hello", "--all"]);
    assert!(ok, "{out}");
    assert_eq!(get_cdn(&c, &eu, "/about.html", &[]).await.header("x-meridian-cache"), "HIT");

    // --- a deploy purges exactly what it changed ---------------------------
    std::fs::write(app.path().join("site/about.html"), "about, revised").unwrap();
    let (ok, out) = w.cli(&["deploy", app.path().to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("purged"), "{out}");
    let r = get_cdn(&c, &eu, "/about.html", &[]).await;
    assert_eq!((r.body.as_str(), r.header("x-meridian-cache").as_str()), ("about, revised", "MISS"));
    assert_eq!(get_cdn(&c, &eu, "/index.html", &[]).await.header("x-meridian-cache"), "HIT", "unchanged, kept");

    // --- every region down: cached content is still served ----------------
    let r = get_cdn(&c, &eu, "/news/today.txt", &[]).await;
    assert_eq!((r.status, r.header("x-meridian-cache").as_str()), (200, "MISS"));
    get_cdn(&c, &eu, "/hello", &[]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for r in &w.desc.regions {
        w.chaos(&["kill", &r.name]);
    }
    let t = Instant::now();
    let r = get_cdn(&c, &eu, "/hello", &[]).await;
    assert_eq!((r.status, r.header("x-meridian-cache").as_str()), (200, "HIT"), "fresh: {}", r.body);
    let r = get_cdn(&c, &eu, "/news/today.txt", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "news of the day"), "stale-if-error");
    assert_eq!(r.header("x-meridian-cache"), "STALE");
    let r = get_cdn(&c, &eu, "/uncached.txt", &[]).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("no region could serve the request"), "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_ranges_are_cut_from_the_cached_object_at_the_edge() {
    // Larger than the edges keep (`max_object_kb`, 8 MiB by default).
    let big: Vec<u8> = b"0123456789".iter().copied().cycle().take(9 << 20).collect();
    let (w, _app, c, eu) = start_cdn(&[("site/big.txt", &big)]);
    let before = region_requests(&w).await;

    // A range asked for first: the edge fetches the whole object once and
    // answers the range from it.
    let r = get_cdn(&c, &eu, "/range.txt", &[("range", "bytes=2-5")]).await;
    assert_eq!((r.status, r.body.as_str(), r.header("x-meridian-cache").as_str()), (206, "2345", "MISS"));
    assert_eq!((r.header("content-range").as_str(), r.header("content-length").as_str()), ("bytes 2-5/20", "4"));
    // Every other form, from the cache (RFC 9110 §14).
    for (range, status, body, content_range) in [
        ("bytes=-3", 206, "hij", "bytes 17-19/20"),
        ("bytes=15-", 206, "fghij", "bytes 15-19/20"),
        ("bytes=18-100", 206, "ij", "bytes 18-19/20"),
        ("bytes=0-0", 206, "0", "bytes 0-0/20"),
        // Past the end: 416, saying how long the object is.
        ("bytes=20-", 416, "", "bytes */20"),
        // Several ranges, another unit, nonsense: the whole object.
        ("bytes=0-1,5-6", 200, "0123456789abcdefghij", ""),
        ("lines=1-2", 200, "0123456789abcdefghij", ""),
        ("bytes=9-3", 200, "0123456789abcdefghij", ""),
    ] {
        let r = get_cdn(&c, &eu, "/range.txt", &[("range", range)]).await;
        assert_eq!(r.status, status, "{range}: {}", r.body);
        if status != 416 {
            assert_eq!(r.body, body, "{range}");
        }
        assert_eq!(r.header("content-range"), content_range, "{range}");
        assert_eq!(r.header("x-meridian-cache"), "HIT", "{range}");
    }
    // A whole answer says ranges are welcome, and carries the validator...
    let r = get_cdn(&c, &eu, "/range.txt", &[]).await;
    assert_eq!((r.status, r.header("accept-ranges").as_str()), (200, "bytes"));
    let etag = r.header("etag");
    assert!(etag.starts_with('"'), "a strong ETag: {etag:?}");
    // ...that If-Range compares: the range only of the representation the
    // client holds part of, else all of it.
    let r = get_cdn(&c, &eu, "/range.txt", &[("range", "bytes=10-"), ("if-range", &etag)]).await;
    assert_eq!((r.status, r.body.as_str()), (206, "abcdefghij"));
    let r = get_cdn(&c, &eu, "/range.txt", &[("range", "bytes=10-"), ("if-range", "\"another\"")]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "0123456789abcdefghij"));
    // A conditional that holds wins over the range.
    let r = get_cdn(&c, &eu, "/range.txt", &[("range", "bytes=10-"), ("if-none-match", &etag)]).await;
    assert_eq!(r.status, 304);
    // All of it from one fetch.
    assert_eq!(region_requests(&w).await - before, 1, "the regions were asked more than once");

    // An object too large to keep: the range is the region's to cut, the
    // first time too (not the whole 9 MiB for a hundred bytes).
    let len = big.len();
    for (i, outcome) in ["MISS", "BYPASS"].into_iter().enumerate() {
        let r = get_cdn(&c, &eu, "/big.txt", &[("range", "bytes=100-199")]).await;
        assert_eq!((r.status, r.body.len()), (206, 100), "request {i}");
        assert_eq!(r.body.as_bytes(), &big[100..200], "request {i}");
        assert_eq!(r.header("content-range"), format!("bytes 100-199/{len}"), "request {i}");
        assert_eq!(r.header("x-meridian-cache"), outcome, "request {i}");
    }
    let r = get_cdn(&c, &eu, "/big.txt", &[]).await;
    assert_eq!((r.status, r.body.len()), (200, len));
}

/// Text the edges store is sent gzipped to clients that take it, as a CDN
/// does: one compression when stored, the same bytes as the region's once
/// unzipped; everyone else, and every byte range, gets the object as the
/// region sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_text_is_sent_gzipped_to_clients_that_take_it() {
    use std::io::Read;
    let script: String = (0..400).map(|i| format!("export const line{i} = \"the same line, again\";\n")).collect();
    let (w, _app, c, eu) = start_cdn(&[("site/app.js", script.as_bytes())]);
    let gzip = [("accept-encoding", "gzip, deflate, br")];

    let r = get_cdn(&c, &eu, "/app.js", &gzip).await;
    assert_eq!((r.status, r.header("x-meridian-cache").as_str()), (200, "MISS"));
    assert_eq!(r.header("content-encoding"), "gzip");
    assert!(r.header("vary").to_ascii_lowercase().contains("accept-encoding"), "{:?}", r.headers);
    let gzipped_len = r.raw.len();
    assert_eq!(r.header("content-length"), gzipped_len.to_string());
    assert!(r.raw.len() * 5 < script.len(), "{} bytes gzipped of {}", r.raw.len(), script.len());
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&r.raw[..]).read_to_string(&mut unzipped).unwrap();
    assert_eq!(unzipped, script);
    // Two representations, two tags: the gzipped one's is weak.
    let weak = r.header("etag");
    assert!(weak.starts_with("W/\""), "{weak}");
    assert!(r.header("accept-ranges").is_empty(), "ranges are of the unzipped body");

    // A client that does not take gzip, from the same object.
    for ae in [None, Some("gzip;q=0"), Some("br")] {
        let extra: Vec<(&str, &str)> = ae.iter().map(|v| ("accept-encoding", *v)).collect();
        let r = get_cdn(&c, &eu, "/app.js", &extra).await;
        assert_eq!((r.status, r.header("x-meridian-cache").as_str()), (200, "HIT"), "{ae:?}");
        assert_eq!((r.header("content-encoding").as_str(), r.body.as_str()), ("", script.as_str()), "{ae:?}");
        assert!(r.header("vary").to_ascii_lowercase().contains("accept-encoding"), "{ae:?}");
        assert_eq!(r.header("etag"), weak.trim_start_matches("W/"), "{ae:?}");
    }
    // A range is cut from the body as the region sent it.
    let r = get_cdn(&c, &eu, "/app.js", &[("accept-encoding", "gzip"), ("range", "bytes=0-5")]).await;
    assert_eq!((r.status, r.body.as_str(), r.header("content-encoding").as_str()), (206, "export", ""));
    // Revalidating the gzipped form with its tag: 304.
    let r = get_cdn(&c, &eu, "/app.js", &[("accept-encoding", "gzip"), ("if-none-match", &weak)]).await;
    assert_eq!((r.status, r.header("etag"), r.header("content-encoding").as_str()), (304, weak.clone(), ""));
    // A body too small to be worth it is sent as it is.
    let r = get_cdn(&c, &eu, "/index.html", &gzip).await;
    assert_eq!((r.status, r.body.as_str(), r.header("content-encoding").as_str()), (200, "<h1>home</h1>", ""));
    assert!(!r.header("vary").to_ascii_lowercase().contains("accept-encoding"));

    // The edge counts what it sent gzipped and what that saved.
    let st = w.edge_status("edge-eu-west").await;
    assert_eq!(st["cache"]["compressed"], 1, "{}", st["cache"]);
    let saved = st["cache"]["compression_saved_bytes"].as_u64().unwrap();
    assert_eq!(saved as usize, script.len() - gzipped_len, "{}", st["cache"]);
}
