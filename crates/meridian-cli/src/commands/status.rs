//! `meridian status`: every app's versions per region, and health as each
//! edge sees it.

use anyhow::Context;
use bytes::Bytes;
use http::Method;
use meridian_trust::{Expect, Role};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub control: crate::commands::deploy::ControlArgs,
    /// Print raw JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let t = Duration::from_secs(5);
    let (url, operator) = a.control.connect()?;
    let control =
        operator.control_ok(&url, Method::GET, "/v1/status", Bytes::new(), t).await.context("control plane")?;
    let control: serde_json::Value = serde_json::from_slice(&control)?;
    // Key-value replication of every app that has a store (through the
    // control plane; a token without `read` on an app sees none of it).
    let mut kv = Vec::new();
    for app in control["apps"].as_array().into_iter().flatten() {
        let name = app["app"].as_str().unwrap_or_default();
        let s = crate::commands::kv::statuses(&operator, &url, name).await.unwrap_or_default();
        if !s.is_empty() {
            kv.push((name.to_string(), s));
        }
    }
    // Edges are not the control plane's to know: only a dev world's
    // description lists them.
    let world = if a.control.selected_context()?.is_some() || a.control.control.is_some() {
        None
    } else {
        Some(a.control.world.connect()?.0)
    };
    let mut edges = Vec::new();
    for e in world.iter().flat_map(|w| &w.edges) {
        let path = meridian_core::headers::EDGE_STATUS_PATH;
        let s = operator
            .node_ok(&e.cluster_url, Expect::new(&e.name, Role::Edge), Method::GET, path, Bytes::new(), t)
            .await;
        edges.push((e, s.ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())));
    }
    if a.json {
        let edges: Vec<_> = edges.iter().map(|(e, s)| serde_json::json!({"edge": e.name, "status": s})).collect();
        let kv: serde_json::Map<String, serde_json::Value> =
            kv.iter().map(|(a, s)| (a.clone(), serde_json::to_value(s).unwrap_or_default())).collect();
        out!("{}", serde_json::to_string_pretty(&serde_json::json!({"control": control, "edges": edges, "kv": kv}))?);
        return Ok(());
    }
    print_control(&control);
    if !edges.is_empty() {
        out!("\nedges (each region: health, smoothed probe RTT, share of answers, ejections; then the cache):");
    }
    for (e, s) in &edges {
        out_part!("  {:<20} {}", e.name, e.url);
        match s {
            None => out!("  DOWN"),
            Some(s) => {
                out!();
                let traffic = s["traffic"]["regions"].as_array().cloned().unwrap_or_default();
                for pair in s["regions"].as_array().into_iter().flatten() {
                    let (name, h) = (&pair[0], &pair[1]);
                    let t = traffic.iter().find(|t| t["region"] == *name);
                    out!(
                        "      {:<16} {:<9} {:>9} {:>6} {:>3} ejections",
                        name.as_str().unwrap_or("?"),
                        if h["healthy"].as_bool() == Some(true) { "healthy" } else { "EJECTED" },
                        h["rtt_ms"].as_f64().map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".into()),
                        t.and_then(|t| t["share"].as_f64()).map(|v| format!("{:.0} %", v * 100.0)).unwrap_or_default(),
                        h["ejections"].as_u64().unwrap_or(0),
                    );
                }
                let c = &s["cache"];
                let n = |k: &str| c[k].as_u64().unwrap_or(0);
                let cacheable = n("hits") + n("stale") + n("revalidated") + n("misses");
                let ratio = if cacheable == 0 {
                    0.0
                } else {
                    (n("hits") + n("stale") + n("revalidated")) as f64 * 100.0 / cacheable as f64
                };
                out!(
                    "      cache: {ratio:.0} % hits of {cacheable} cacheable, {} KiB served from it ({} answers gzipped, \
                     {} KiB saved), {} objects ({} KiB); {} retries ({} refused by the budget)",
                    n("bytes_from_cache") / 1024,
                    n("compressed"),
                    n("compression_saved_bytes") / 1024,
                    n("objects"),
                    n("bytes_stored") / 1024,
                    s["traffic"]["retries"].as_u64().unwrap_or(0),
                    s["traffic"]["retries_denied"].as_u64().unwrap_or(0),
                );
                // What the edge has learned of each app from the regions:
                // its policy, and how long a region may take to answer it.
                let apps: Vec<String> = s["apps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        let wait = a["answer_within_ms"].as_u64().map(|ms| format!(", answer within {ms} ms"));
                        format!(
                            "{} ({}{})",
                            a["app"].as_str().unwrap_or("?"),
                            a["policy"].as_str().unwrap_or("?"),
                            wait.unwrap_or_default()
                        )
                    })
                    .collect();
                if !apps.is_empty() {
                    out!("      apps: {}", apps.join(", "));
                }
            }
        }
    }
    for (app, s) in &kv {
        out!("\nkey-value replication of {app} (-> pushing to a peer, <- applied from an origin):");
        crate::commands::kv::print_status(s);
    }
    Ok(())
}

fn print_control(control: &serde_json::Value) {
    let short =
        |v: &serde_json::Value| v.as_str().map(|s| s[..12.min(s.len())].to_string()).unwrap_or_else(|| "-".into());
    let apps = control["apps"].as_array().cloned().unwrap_or_default();
    if apps.is_empty() {
        out!("no apps yet: meridian apps create NAME --host HOST, then meridian deploy");
    }
    if let Some(nodes) = control["control"]["nodes"].as_array() {
        let list: Vec<String> = nodes
            .iter()
            .map(|n| {
                let name = n["name"].as_str().unwrap_or("?");
                match (n["leader"].as_bool(), n["behind"].as_u64()) {
                    (Some(true), _) => format!("{name} (leader)"),
                    (_, Some(0)) | (_, None) => name.to_string(),
                    (_, Some(b)) => format!("{name} ({b} entries behind)"),
                }
            })
            .collect();
        out!("control plane  term {}  {}", control["control"]["term"], list.join(", "));
    }
    for app in apps {
        let hosts: Vec<&str> =
            app["hosts"].as_array().map(|h| h.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
        out!(
            "app {}  desired version {}  hosts {}{}",
            app["app"].as_str().unwrap_or("-"),
            short(&app["desired"]),
            hosts.join(", "),
            if app["default"].as_bool() == Some(true) { " (default)" } else { "" }
        );
        for r in app["regions"].as_array().into_iter().flatten() {
            let state = if r["reachable"].as_bool() == Some(true) { "up" } else { "DOWN" };
            let mut notes = String::new();
            if let Some(p) = r["split"]["percent"].as_u64() {
                notes += &format!("  (rolling out {} to {p}%)", short(&r["split"]["version"]));
            }
            if r["drift"].as_bool() == Some(true) {
                notes += &format!("  DRIFT: desired {}", short(&app["desired"]));
            }
            out!("  {:<16} {:<5} active {}{notes}", r["region"].as_str().unwrap_or("?"), state, short(&r["active"]));
        }
    }
}
