//! `meridian versions` and `meridian rollback`: an app's deploy history,
//! and putting it back on an earlier version everywhere at once.

use crate::commands::deploy::ControlArgs;
use bytes::Bytes;
use http::Method;
use meridian_control::DeployReport;
use std::time::Duration;

#[derive(clap::Args)]
pub struct VersionsArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The app (default: the world's default app).
    #[arg(long)]
    pub app: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The app (default: the world's default app).
    #[arg(long)]
    pub app: Option<String>,
    /// The version to go back to (full or short id; default: the one
    /// before the current one).
    #[arg(long)]
    pub to: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub async fn versions(a: VersionsArgs) -> anyhow::Result<()> {
    let (url, op) = a.control.connect()?;
    let app = crate::commands::kv::app_or_default(&op, &url, a.app.as_deref()).await?;
    let path = format!("/v1/apps/{app}/versions");
    let body = op.control_ok(&url, Method::GET, &path, Bytes::new(), Duration::from_secs(10)).await?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let desired = v["desired"].as_str().unwrap_or_default();
    out!("versions of {app}, oldest first:");
    for h in v["history"].as_array().into_iter().flatten().filter_map(|h| h.as_str()) {
        out!("  {}{}", &h[..12.min(h.len())], if h == desired { "  (desired)" } else { "" });
    }
    Ok(())
}

pub async fn rollback(a: RollbackArgs) -> anyhow::Result<()> {
    let (url, op) = a.control.connect()?;
    let app = crate::commands::kv::app_or_default(&op, &url, a.app.as_deref()).await?;
    let mut path = format!("/v1/apps/{app}/rollback");
    if let Some(to) = &a.to {
        path += &format!("?to={to}");
    }
    let (status, body) = op.control(&url, Method::POST, &path, Bytes::new(), Duration::from_secs(600)).await?;
    if !status.is_success() {
        anyhow::bail!("rollback refused ({status}): {}", String::from_utf8_lossy(&body).trim());
    }
    let r: DeployReport = serde_json::from_slice(&body)?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    out!("{} rolled back to version {}", r.app, r.version.short());
    for o in &r.regions {
        if o.detail.is_empty() {
            out!("  {:<16} {}", o.region, o.outcome);
        } else {
            out!("  {:<16} {} ({})", o.region, o.outcome, o.detail);
        }
    }
    if let Some(p) = &r.purge {
        crate::commands::purge::print_report(p);
    }
    Ok(())
}
