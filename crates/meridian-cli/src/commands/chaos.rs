//! `meridian chaos`: faults on demand in a running dev world.

use crate::api::{call_ok, WorldArg};
use bytes::Bytes;
use clap::Subcommand;
use http::Method;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
    #[command(flatten)]
    pub world: WorldArg,
}

#[derive(Subcommand)]
pub enum Action {
    /// SIGKILL the process of a region, a control node (`control-1`, …) or an edge (`edge-eu-west`).
    Kill { region: String },
    /// Start a region, control node or edge again (kills it first if it is running).
    Restart { region: String },
    /// Partition the links between A and B in both directions (bytes are held, not delivered).
    Cut { a: String, b: String },
    /// Take the links between A and B down: connections are reset, new ones refused.
    Down { a: String, b: String },
    /// Restore the links between A and B.
    Heal { a: String, b: String },
    /// Set the one-way delay of the links between A and B, in milliseconds.
    Latency { a: String, b: String, ms: f64 },
    /// Cut every link to and from a region or edge.
    Isolate { node: String },
    /// List links with their state and delay.
    Links,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let (w, token) = a.world.load()?;
    let base = w.supervisor_url.trim_end_matches('/').to_string();
    let t = Duration::from_secs(10);
    let post = |path: String, body: serde_json::Value| {
        let token = token.clone();
        let url = format!("{base}{path}");
        async move { call_ok(Method::POST, &url, &token, Bytes::from(body.to_string()), t).await }
    };
    let out = match a.action {
        Action::Kill { region } => post(format!("/regions/{region}/kill"), serde_json::Value::Null).await?,
        Action::Restart { region } => post(format!("/regions/{region}/restart"), serde_json::Value::Null).await?,
        Action::Cut { a, b } => {
            post("/links/set".into(), serde_json::json!({"a": a, "b": b, "state": "partitioned"})).await?
        }
        Action::Down { a, b } => {
            post("/links/set".into(), serde_json::json!({"a": a, "b": b, "state": "down"})).await?
        }
        Action::Heal { a, b } => post("/links/set".into(), serde_json::json!({"a": a, "b": b, "state": "up"})).await?,
        Action::Latency { a, b, ms } => {
            post("/links/set".into(), serde_json::json!({"a": a, "b": b, "one_way_delay_ms": ms})).await?
        }
        Action::Isolate { node } => {
            post("/links/set".into(), serde_json::json!({"a": node, "state": "partitioned"})).await?
        }
        Action::Links => call_ok(Method::GET, &format!("{base}/links"), &token, Bytes::new(), t).await?,
    };
    out!("{}", String::from_utf8_lossy(&out).trim());
    Ok(())
}
