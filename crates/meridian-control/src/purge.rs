//! Purging the edges' caches: an operator's purge, and the one every
//! rollout ends with (what changed between the two versions).
//!
//! A purge goes to every edge at once over mutual TLS (the edge accepts it
//! from control and operator certificates only). Purging is idempotent, so
//! an edge that failed can simply be purged again; the report says which.

use bytes::Bytes;
use http::Method;
use meridian_core::wire::Purge;
use meridian_http::cluster::{CallError, ClusterClient, Target};
use meridian_manifest::{Bundle, RouteTarget};
use meridian_trust::{Expect, Role};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// An edge the control plane purges.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlEdge {
    /// The name in its certificate (role `edge`).
    pub name: String,
    /// Its cluster port, e.g. `https://10.0.1.9:7501`.
    pub url: String,
}

impl ControlEdge {
    fn target(&self) -> Result<Target, CallError> {
        Target::from_url(self.url.trim_end_matches('/'), Expect::new(&self.name, Role::Edge))
    }
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct PurgeReport {
    pub purge: Purge,
    pub edges: Vec<EdgePurge>,
    /// From sending to the last edge's answer.
    pub ms: f64,
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct EdgePurge {
    pub edge: String,
    /// Objects removed; `None` if the edge did not confirm.
    pub removed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub ms: f64,
}

impl PurgeReport {
    /// Edges that did not confirm.
    pub fn failed(&self) -> Vec<&EdgePurge> {
        self.edges.iter().filter(|e| e.removed.is_none()).collect()
    }
}

/// Sends `purge` to every edge at once; each gets `timeout`.
pub async fn fan_out(client: &ClusterClient, edges: &[ControlEdge], purge: Purge, timeout: Duration) -> PurgeReport {
    let start = Instant::now();
    let body = Bytes::from(serde_json::to_vec(&purge).unwrap_or_default());
    let path = meridian_core::headers::EDGE_PURGE_PATH;
    let edges = futures::future::join_all(edges.iter().map(|e| {
        let body = body.clone();
        async move {
            let t0 = Instant::now();
            let answer = match e.target() {
                Ok(t) => client.call(&t, Method::POST, path, body, timeout).await,
                Err(err) => Err(err),
            };
            let (removed, error) = match answer {
                Ok(a) if a.status.is_success() => {
                    let removed =
                        serde_json::from_slice::<serde_json::Value>(&a.body).ok().and_then(|v| v["removed"].as_u64());
                    (removed.or(Some(0)), None)
                }
                Ok(a) => (None, Some(a.text())),
                Err(err) => (None, Some(err.to_string())),
            };
            if let Some(err) = &error {
                tracing::warn!(edge = %e.name, error = %err, "purge not confirmed");
            }
            EdgePurge { edge: e.name.clone(), removed, error, ms: t0.elapsed().as_secs_f64() * 1000.0 }
        }
    }))
    .await;
    PurgeReport { purge, edges, ms: start.elapsed().as_secs_f64() * 1000.0 }
}

/// What switching between `old` and `new` changes for the edges (hosts
/// left empty for the caller): every static file added, changed or removed
/// (its URL, with any query), and the prefix of every function route whose
/// component changed. Everything when the routes themselves changed.
pub fn changes(old: &Bundle, new: &Bundle) -> Purge {
    let mut p = Purge::default();
    if old.manifest.routes != new.manifest.routes {
        p.all = true;
        return p;
    }
    let mut paths = BTreeSet::new();
    let mut prefixes = BTreeSet::new();
    for route in &new.manifest.routes {
        let base = route.path.trim_end_matches('/');
        match &route.target {
            RouteTarget::Static(dir) => {
                let under = format!("{dir}/");
                let files: BTreeSet<&String> =
                    old.digests.keys().chain(new.digests.keys()).filter(|f| f.starts_with(&under)).collect();
                for f in files {
                    if old.digests.get(f) == new.digests.get(f) {
                        continue;
                    }
                    let rel = &f[under.len()..];
                    let url = format!("{base}/{rel}");
                    prefixes.insert(format!("{url}?"));
                    paths.insert(url);
                    // A directory's index is also served at the directory.
                    if let Some(d) = rel.strip_suffix("index.html") {
                        let dir_url = format!("{base}/{d}");
                        prefixes.insert(format!("{dir_url}?"));
                        if dir_url.len() > 1 {
                            paths.insert(dir_url.trim_end_matches('/').to_string());
                        }
                        paths.insert(dir_url);
                    }
                }
            }
            RouteTarget::Component(name) => {
                let (a, b) = (old.manifest.components.get(name), new.manifest.components.get(name));
                let source_changed = match (a, b) {
                    (Some(a), Some(b)) => a != b || old.digests.get(&a.source) != new.digests.get(&b.source),
                    _ => true,
                };
                if source_changed {
                    prefixes.insert(route.path.clone());
                }
            }
        }
    }
    p.paths = paths.into_iter().collect();
    p.prefixes = prefixes.into_iter().collect();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(files: &[(&str, &str)], manifest: &str) -> Bundle {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("meridian.toml"), manifest).unwrap();
        for (p, content) in files {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        Bundle::from_dir(dir.path()).unwrap()
    }

    const MANIFEST: &str = r#"
[app]
name = "site"
[components.api]
source = "api.wasm"
[[routes]]
path = "/api"
component = "api"
[[routes]]
path = "/"
static = "public"
"#;

    #[test]
    fn a_deploy_purges_exactly_the_files_and_routes_that_changed() {
        let wasm = "\0asm\x01\0\0\0";
        let old = bundle(
            &[("api.wasm", wasm), ("public/index.html", "one"), ("public/a.css", "a"), ("public/docs/index.html", "d")],
            MANIFEST,
        );
        let new = bundle(
            &[("api.wasm", wasm), ("public/index.html", "two"), ("public/a.css", "a"), ("public/b.js", "b")],
            MANIFEST,
        );
        let p = changes(&old, &new);
        assert!(!p.all);
        assert_eq!(p.paths, vec!["/", "/b.js", "/docs", "/docs/", "/docs/index.html", "/index.html"]);
        assert!(p.prefixes.iter().all(|x| x.ends_with('?')), "{:?}", p.prefixes);
        assert!(!p.prefixes.iter().any(|x| x.starts_with("/a.css")), "unchanged file purged: {:?}", p.prefixes);
        // A new component purges its route; the routes changing purges all.
        let new2 = bundle(&[("api.wasm", "\0asm\x01\0\0\0\0"), ("public/index.html", "one")], MANIFEST);
        assert!(changes(&old, &new2).prefixes.contains(&"/api".to_string()));
        let moved = bundle(&[("api.wasm", wasm), ("public/index.html", "one")], &MANIFEST.replace("/api", "/v2"));
        assert!(changes(&old, &moved).all);
    }
}
