//! `meridian kv`: read and write an app's key-value namespaces, and see
//! their replication.
//!
//! Everything goes through the control plane with a token (`data-admin`
//! on the app for values, `read` for status), which has one region
//! (`--region`, default the first that answers) run it: a namespace that
//! region may not hold is forwarded by it to the nearest region that may,
//! exactly as a function's calls are. Works with a dev world, a context or
//! flags alike.

use crate::api::Operator;
use crate::commands::deploy::ControlArgs;
use anyhow::Context;
use bytes::Bytes;
use http::Method;
use meridian_core::wire::KvStatus;
use meridian_region::kv::{Op, OpResult};
use std::io::{BufRead, Read};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
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
    /// Region to ask (default: the first that answers).
    #[arg(long)]
    pub region: Option<String>,
    /// Apply a write to a strong namespace at most once under this key: the
    /// same command run again with the same key (after an "outcome unknown"
    /// error) prints the first result and changes nothing.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

impl Target {
    /// `op`, under the idempotency key if one was given.
    fn write(&self, op: Op) -> Op {
        match &self.idempotency_key {
            Some(k) => Op::Once { idem: k.clone(), write: Box::new(op) },
            None => op,
        }
    }
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
    /// Write many keys from a file of JSON lines, `{"key": "k", "value": "text"}`
    /// (or `"value_hex"` for bytes), in batches of up to 10,000 ("-" reads
    /// stdin). Not atomic: an import stopped part way can be run again.
    Import {
        #[command(flatten)]
        t: Target,
        file: String,
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

/// The app named, or the world's default one (asked of the control plane).
pub async fn app_or_default(operator: &Operator, url: &str, app: Option<&str>) -> anyhow::Result<String> {
    if let Some(a) = app {
        return Ok(a.to_string());
    }
    let body = operator
        .control_ok(url, Method::GET, "/v1/apps", Bytes::new(), Duration::from_secs(10))
        .await
        .context("cannot list the apps")?;
    let list: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
    list.iter()
        .find(|a| a["default"].as_bool() == Some(true))
        .and_then(|a| a["name"].as_str())
        .map(str::to_string)
        .context("no default app among those this token may read; name one with --app")
}

/// One call to the control plane's key-value API of `app`.
async fn kv_call(
    operator: &Operator,
    url: &str,
    app: &str,
    method: Method,
    rest: &str,
    region: Option<&str>,
    body: Bytes,
) -> anyhow::Result<Bytes> {
    let mut path = format!("/v1/apps/{app}/kv/{rest}");
    if let Some(r) = region {
        path += &format!("?region={r}");
    }
    operator.control_ok(url, method, &path, body, Duration::from_secs(20)).await
}

struct Session {
    operator: Operator,
    url: String,
    app: String,
}

impl Session {
    async fn op(&self, region: Option<&str>, op: Op) -> anyhow::Result<OpResult> {
        let body = Bytes::from(serde_json::to_vec(&op)?);
        let answer = kv_call(&self.operator, &self.url, &self.app, Method::POST, "op", region, body).await?;
        let r: OpResult = serde_json::from_slice(&answer)?;
        if let Some(e) = r.error {
            anyhow::bail!("{e}");
        }
        Ok(r)
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let (url, operator) = a.control.connect()?;
    let app = app_or_default(&operator, &url, a.app.as_deref()).await?;
    let w = &Session { operator, url, app };
    match a.op {
        KvCommand::Get { t, key } => {
            let r = w.op(t.region.as_deref(), Op::Get { ns: t.ns, key }).await?;
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
            let op = t.write(Op::Set { ns: t.ns.clone(), key, value_hex: hex::encode(value) });
            let r = w.op(t.region.as_deref(), op).await?;
            out!("stored in {} (token {})", r.region, r.token.unwrap_or_default());
        }
        KvCommand::Import { t, file } => {
            let input: Box<dyn std::io::BufRead> = if file == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(std::io::BufReader::new(std::fs::File::open(&file).with_context(|| file.clone())?))
            };
            let started = std::time::Instant::now();
            let (mut batch, mut bytes, mut total) = (Vec::new(), 0usize, 0u64);
            let mut lines = input.lines().enumerate();
            loop {
                let next = lines.next();
                if let Some((i, line)) = next.as_ref().map(|(i, l)| (*i, l)) {
                    let line = line.as_ref().map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let item = import_line(line).with_context(|| format!("{file}:{}", i + 1))?;
                    bytes += item.key.len() + item.value_hex.len();
                    batch.push(item);
                }
                let full = batch.len() == meridian_region::kv::MAX_SET_MANY || bytes >= IMPORT_BATCH_BYTES;
                if !batch.is_empty() && (full || next.is_none()) {
                    let items = std::mem::take(&mut batch);
                    let n = items.len() as u64;
                    let r = w.op(t.region.as_deref(), Op::SetMany { ns: t.ns.clone(), items }).await.with_context(
                        || format!("after {total} keys imported (importing the same file again is safe)"),
                    )?;
                    total += r.written.unwrap_or(n);
                    bytes = 0;
                }
                if next.is_none() {
                    break;
                }
            }
            let s = started.elapsed().as_secs_f64();
            out!("imported {total} keys into {} in {s:.1} s ({:.0} keys/s)", t.ns, total as f64 / s.max(1e-9));
        }
        KvCommand::Delete { t, key } => {
            let r = w.op(t.region.as_deref(), t.write(Op::Delete { ns: t.ns.clone(), key })).await?;
            out!("deleted in {}", r.region);
        }
        KvCommand::Incr { t, key, delta } => {
            let r = w.op(t.region.as_deref(), t.write(Op::Increment { ns: t.ns.clone(), key, delta })).await?;
            out!("{}", r.total.unwrap_or_default());
        }
        KvCommand::List { t } => {
            let mut cursor = None;
            loop {
                let r = w.op(t.region.as_deref(), Op::List { ns: t.ns.clone(), cursor, limit: Some(1000) }).await?;
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
            let rest = format!("conflicts/{}", t.ns);
            let body =
                kv_call(&w.operator, &w.url, &w.app, Method::GET, &rest, t.region.as_deref(), Bytes::new()).await?;
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
            let all = statuses(&w.operator, &w.url, &w.app).await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_status(&all);
            }
        }
    }
    Ok(())
}

/// Bytes of keys and hex values per import request, at most (the region
/// takes 16 MiB bodies).
const IMPORT_BATCH_BYTES: usize = 4 << 20;

/// One line of an import file.
fn import_line(line: &str) -> anyhow::Result<meridian_region::kv::KeyValue> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        key: String,
        value: Option<String>,
        value_hex: Option<String>,
    }
    let l: Line = serde_json::from_str(line).context("not a JSON object with \"key\" and \"value\"")?;
    let value_hex = match (l.value, l.value_hex) {
        (Some(v), None) => hex::encode(v),
        (None, Some(h)) => {
            hex::decode(&h).context("value_hex is not hex")?;
            h
        }
        _ => anyhow::bail!("give exactly one of \"value\" and \"value_hex\""),
    };
    Ok(meridian_region::kv::KeyValue { key: l.key, value_hex })
}

/// Key-value status of one app in every region that holds a store for it
/// and answered.
pub async fn statuses(operator: &Operator, url: &str, app: &str) -> anyhow::Result<Vec<KvStatus>> {
    let body = kv_call(operator, url, app, Method::GET, "status", None, Bytes::new()).await?;
    Ok(serde_json::from_slice(&body)?)
}

pub fn print_status(all: &[KvStatus]) {
    for s in all {
        out!(
            "  {:<16} writes logged {:>8}  log {:>7}  conflicts {:>5}  tombstones {:>5} ({} collected)  rejected msgs {}",
            s.region, s.last_seq, s.log_len, s.conflicts, s.tombstones, s.tombstones_collected, s.rejected_messages
        );
        let r = &s.rejoin;
        if !r.state.is_empty() {
            let unreachable = if r.unreachable.is_empty() {
                String::new()
            } else {
                format!("; unreachable: {}", r.unreachable.join(", "))
            };
            out!(
                "      rejoin {} after {} ms (bound {} ms), with {}{}; {} records repaired",
                r.state,
                r.waited_ms,
                r.bound_ms,
                if r.caught_up_with.is_empty() { "-".to_string() } else { r.caught_up_with.join(", ") },
                unreachable,
                r.records_repaired
            );
        }
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
            // A leader no quorum has answered for a lease is cut off (it
            // refuses writes); a follower silent for a lease campaigns.
            let health = match (g.quorum_ack_ms, g.leader_silent_ms) {
                (Some(ms), _) if g.lease_ms > 0 && ms >= g.lease_ms => format!("  NO QUORUM for {ms} ms"),
                (_, Some(ms)) if g.lease_ms > 0 && ms >= g.lease_ms => format!("  leader silent for {ms} ms"),
                _ => String::new(),
            };
            out!(
                "      raft {:<10} {:<9} term {:>4}  leader {:<14} log {:>7}  applied {:>7}  campaigns {}  idempotency keys {}{health}",
                g.ns,
                g.state,
                g.term,
                g.leader.as_deref().unwrap_or("-"),
                g.last_log_index.unwrap_or(0),
                g.last_applied.unwrap_or(0),
                g.campaigns,
                g.idempotency_keys,
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
