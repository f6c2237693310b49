//! `meridian kv`: read and write a world's key-value namespaces, and see
//! their replication.
//!
//! Operations go to one region's API (`--region`, default the first): a
//! namespace that region may not hold is forwarded by it to the nearest
//! region that may, exactly as a function's calls are.

use crate::api::{Operator, WorldArg};
use anyhow::Context;
use bytes::Bytes;
use http::Method;
use meridian_core::wire::KvStatus;
use meridian_core::world::{RegionInfo, WorldDescription};
use meridian_region::kv::{Op, OpResult};
use meridian_trust::Expect;
use std::io::Read;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub world: WorldArg,
    /// The app whose data to use (default: the world's default app).
    #[arg(long, global = true)]
    pub app: Option<String>,
    #[command(subcommand)]
    pub op: KvCommand,
}

#[derive(clap::Args, Clone)]
pub struct Target {
    /// Namespace (a `[kv.NAME]` of the app's manifest).
    #[arg(long)]
    pub ns: String,
    /// Region to ask (default: the world's first region).
    #[arg(long)]
    pub region: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum KvCommand {
    /// Print a key's value.
    Get {
        #[command(flatten)]
        t: Target,
        key: String,
    },
    /// Store a value ("-" reads it from stdin).
    Put {
        #[command(flatten)]
        t: Target,
        key: String,
        value: String,
    },
    /// Delete a key.
    Delete {
        #[command(flatten)]
        t: Target,
        key: String,
    },
    /// Add to a counter.
    Incr {
        #[command(flatten)]
        t: Target,
        key: String,
        #[arg(default_value_t = 1, allow_hyphen_values = true)]
        delta: i64,
    },
    /// List the keys of a namespace.
    List {
        #[command(flatten)]
        t: Target,
    },
    /// Show writes overwritten by concurrent ones (last-writer-wins losers).
    Conflicts {
        #[command(flatten)]
        t: Target,
    },
    /// Replication state of every region: lag, pending entries, conflicts.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn region<'a>(w: &'a WorldDescription, region: Option<&str>) -> anyhow::Result<&'a RegionInfo> {
    match region {
        Some(name) => {
            w.regions.iter().find(|r| r.name == name).with_context(|| format!("no region {name:?} in this world"))
        }
        None => w.regions.first().context("the world has no regions"),
    }
}

/// Calls a region's cluster port as the operator.
pub async fn region_call(
    op: &Operator,
    r: &RegionInfo,
    method: Method,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> anyhow::Result<Bytes> {
    op.node_ok(&r.cluster_url, Expect::region(&r.name, &r.jurisdiction), method, path, body, timeout).await
}

/// The app named, or the world's default one (asked of the control plane).
pub async fn app_or_default(w: &WorldDescription, operator: &Operator, app: Option<&str>) -> anyhow::Result<String> {
    if let Some(a) = app {
        return Ok(a.to_string());
    }
    let (status, body) =
        operator.control(&w.control_url, Method::GET, "/v1/apps", Bytes::new(), Duration::from_secs(10)).await?;
    if !status.is_success() {
        anyhow::bail!("cannot list the apps: {status}: {}", String::from_utf8_lossy(&body).trim());
    }
    let list: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
    list.iter()
        .find(|a| a["default"].as_bool() == Some(true))
        .and_then(|a| a["name"].as_str())
        .map(str::to_string)
        .context("the world has no default app; name one with --app")
}

async fn op(a: &WorldArg, app: Option<&str>, region_name: Option<&str>, op: Op) -> anyhow::Result<OpResult> {
    let (w, operator) = a.connect()?;
    let r = region(&w, region_name)?;
    let app = app_or_default(&w, &operator, app).await?;
    let body = region_call(
        &operator,
        r,
        Method::POST,
        &format!("/_meridian/apps/{app}/kv/op"),
        Bytes::from(serde_json::to_vec(&op)?),
        Duration::from_secs(15),
    )
    .await?;
    let r: OpResult = serde_json::from_slice(&body)?;
    if let Some(e) = r.error {
        anyhow::bail!("{e}");
    }
    Ok(r)
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let w = &a.world;
    let app = a.app.as_deref();
    match a.op {
        KvCommand::Get { t, key } => {
            let r = op(w, app, t.region.as_deref(), Op::Get { ns: t.ns, key }).await?;
            match r.value_hex {
                Some(h) => {
                    let v = hex::decode(h)?;
                    out!("{}", String::from_utf8_lossy(&v));
                }
                None => anyhow::bail!("not found (asked {})", r.region),
            }
        }
        KvCommand::Put { t, key, value } => {
            let value = if value == "-" {
                let mut v = Vec::new();
                std::io::stdin().read_to_end(&mut v)?;
                v
            } else {
                value.into_bytes()
            };
            let r = op(w, app, t.region.as_deref(), Op::Set { ns: t.ns, key, value_hex: hex::encode(value) }).await?;
            out!("stored in {} (token {})", r.region, r.token.unwrap_or_default());
        }
        KvCommand::Delete { t, key } => {
            let r = op(w, app, t.region.as_deref(), Op::Delete { ns: t.ns, key }).await?;
            out!("deleted in {}", r.region);
        }
        KvCommand::Incr { t, key, delta } => {
            let r = op(w, app, t.region.as_deref(), Op::Increment { ns: t.ns, key, delta }).await?;
            out!("{}", r.total.unwrap_or_default());
        }
        KvCommand::List { t } => {
            let mut cursor = None;
            loop {
                let r =
                    op(w, app, t.region.as_deref(), Op::List { ns: t.ns.clone(), cursor, limit: Some(1000) }).await?;
                for k in r.keys {
                    out!("{k}");
                }
                match r.cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
        }
        KvCommand::Conflicts { t } => {
            let (world, operator) = w.connect()?;
            let r = region(&world, t.region.as_deref())?;
            let app = app_or_default(&world, &operator, app).await?;
            let path = format!("/_meridian/apps/{app}/kv/conflicts/{}", t.ns);
            let body = region_call(&operator, r, Method::GET, &path, Bytes::new(), Duration::from_secs(10)).await?;
            let list: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
            for c in &list {
                let v = c["value_hex"].as_str().and_then(|h| hex::decode(h).ok());
                out!(
                    "{}  lost value {:?} written in {} at {} ms",
                    c["key"].as_str().unwrap_or("?"),
                    v.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_else(|| "(delete)".into()),
                    c["origin"].as_str().unwrap_or("?"),
                    c["ts_ms"]
                );
            }
            out!("{} conflict(s)", list.len());
        }
        KvCommand::Status { json } => {
            let (world, operator) = w.connect()?;
            let app = app_or_default(&world, &operator, app).await?;
            let all = statuses(&world, &operator, &app).await;
            if json {
                out!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_status(&all);
            }
        }
    }
    Ok(())
}

/// Key-value status of one app in every region (a region that does not
/// answer, or holds no store for the app, is left out).
pub async fn statuses(w: &WorldDescription, operator: &Operator, app: &str) -> Vec<KvStatus> {
    let mut out = Vec::new();
    let path = format!("/_meridian/apps/{app}/kv/status");
    for r in &w.regions {
        let s = region_call(operator, r, Method::GET, &path, Bytes::new(), Duration::from_secs(5)).await;
        if let Some(s) = s.ok().and_then(|b| serde_json::from_slice::<KvStatus>(&b).ok()) {
            out.push(s);
        }
    }
    out
}

pub fn print_status(all: &[KvStatus]) {
    for s in all {
        out!(
            "  {:<16} writes logged {:>8}  log {:>7}  conflicts {:>5}  tombstones {:>5} ({} collected)  rejected msgs {}",
            s.region, s.last_seq, s.log_len, s.conflicts, s.tombstones, s.tombstones_collected, s.rejected_messages
        );
        for p in &s.peers {
            out!(
                "      -> {:<14} acked {:>8}  pending {:>6}  snapshots {}  repaired {}{}",
                p.peer,
                p.acked_seq,
                p.pending,
                p.snapshots_sent,
                p.repaired,
                p.last_error.as_deref().map(|e| format!("  last error: {e}")).unwrap_or_default()
            );
        }
        for g in &s.groups {
            out!(
                "      raft {:<10} {:<9} term {:>4}  leader {:<14} log {:>7}  applied {:>7}",
                g.ns,
                g.state,
                g.term,
                g.leader.as_deref().unwrap_or("-"),
                g.last_log_index.unwrap_or(0),
                g.last_applied.unwrap_or(0)
            );
        }
        for o in &s.origins {
            let f = |v: Option<f64>| v.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "-".into());
            out!(
                "      <- {:<14} applied {:>8}  lag p50 {:>7}  p99 {:>7}",
                o.origin,
                o.applied_seq,
                f(o.lag_ms_p50),
                f(o.lag_ms_p99)
            );
        }
    }
}
