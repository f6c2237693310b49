//! `meridian audit`: every change asked of the control plane — who (which
//! token), what, on which app, when, and how it ended. A token sees the
//! entries of the apps it may read; the administrator sees all.

use crate::commands::deploy::ControlArgs;
use bytes::Bytes;
use http::Method;
use meridian_control::audit::Entry;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Only this app's entries.
    #[arg(long)]
    pub app: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let (url, op) = a.control.connect()?;
    let path = match &a.app {
        Some(app) => format!("/v1/audit?app={app}"),
        None => "/v1/audit".to_string(),
    };
    let (status, body) = op.control(&url, Method::GET, &path, Bytes::new(), Duration::from_secs(10)).await?;
    if !status.is_success() {
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    let entries: Vec<Entry> = serde_json::from_slice(&body)?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    for e in entries {
        out!(
            "{:>5} {} {:<14} {:<16} {:<10} {}  -> {}",
            e.seq,
            e.at_ms,
            e.who,
            e.action,
            e.app.as_deref().unwrap_or("-"),
            e.detail,
            e.outcome
        );
    }
    Ok(())
}
