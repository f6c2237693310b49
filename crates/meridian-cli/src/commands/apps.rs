//! `meridian apps`: the apps of a world. Each app has its own versions,
//! hostnames, key-value data, limits and tokens; creating and deleting
//! apps needs the world's administrator token.

use crate::api::Operator;
use crate::commands::deploy::ControlArgs;
use anyhow::Context;
use bytes::Bytes;
use http::Method;
use meridian_control::{DeleteReport, NewApp};
use meridian_core::wire::AppRecord;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Every app the token may read: hostnames, desired version.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Create an app (or change its hostnames); deploy to it with
    /// `meridian deploy` (the manifest's `[app] name` picks it).
    Create {
        name: String,
        /// A hostname whose requests go to this app (repeat for several).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Serve requests to bare addresses (IP, localhost) with this app.
        #[arg(long)]
        default: bool,
    },
    /// Delete an app: every region removes its versions and data; its
    /// tokens are revoked.
    Delete {
        name: String,
        /// Required: deleting an app cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn create(op: &Operator, url: &str, app: &NewApp) -> anyhow::Result<AppRecord> {
    let body = Bytes::from(serde_json::to_vec(app)?);
    let answer = op
        .control_ok(url, Method::POST, "/v1/apps", body, Duration::from_secs(30))
        .await
        .with_context(|| format!("cannot create app {}", app.name))?;
    Ok(serde_json::from_slice(&answer)?)
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let (url, op) = a.control.connect()?;
    match a.cmd {
        Cmd::List { json } => {
            let body = op.control_ok(&url, Method::GET, "/v1/apps", Bytes::new(), Duration::from_secs(10)).await?;
            let list: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            out!("{:<20} {:<10} {:<8} HOSTS", "APP", "VERSION", "DEFAULT");
            for app in list {
                let version = app["desired"].as_str().map(|v| v[..v.len().min(8)].to_string());
                let hosts: Vec<&str> =
                    app["hosts"].as_array().map(|h| h.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
                out!(
                    "{:<20} {:<10} {:<8} {}",
                    app["name"].as_str().unwrap_or("?"),
                    version.as_deref().unwrap_or("-"),
                    if app["default"].as_bool() == Some(true) { "yes" } else { "" },
                    hosts.join(", ")
                );
            }
        }
        Cmd::Create { name, hosts, default } => {
            let r = create(&op, &url, &NewApp { name, hosts, default }).await?;
            out!("app {} serves {}{}", r.name, r.hosts.join(", "), if r.default { " and bare addresses" } else { "" });
        }
        Cmd::Delete { name, yes } => {
            if !yes {
                anyhow::bail!("deleting app {name} removes its versions and data from every region; add --yes");
            }
            let path = format!("/v1/apps/{name}");
            let body = op.control_ok(&url, Method::DELETE, &path, Bytes::new(), Duration::from_secs(120)).await?;
            let r: DeleteReport = serde_json::from_slice(&body)?;
            out!("deleted app {}", r.app);
            for rm in &r.removed {
                out!("  {:<16} removed {} files, {} bytes", rm.region, rm.files, rm.bytes);
            }
            for p in &r.pending {
                out!("  pending: {p} (removed when it is reachable again)");
            }
            if r.tokens_revoked > 0 {
                out!("  {} token(s) revoked", r.tokens_revoked);
            }
        }
    }
    Ok(())
}
