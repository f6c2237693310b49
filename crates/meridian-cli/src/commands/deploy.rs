//! `meridian deploy [DIR]`: package an app and roll it out.

use crate::api::{call, WorldArg};
use anyhow::Context;
use bytes::Bytes;
use http::Method;
use meridian_control::DeployReport;
use meridian_manifest::Bundle;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// App directory holding meridian.toml.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub world: WorldArg,
    /// Control plane URL (default: the world's).
    #[arg(long)]
    pub control: Option<String>,
    /// File with the control plane's token (default: the world's).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let (url, token) = match (&a.control, &a.token_file) {
        (Some(url), Some(tf)) => (
            url.clone(),
            std::fs::read_to_string(tf).with_context(|| format!("cannot read {}", tf.display()))?.trim().to_string(),
        ),
        _ => {
            let (w, token) = a.world.load()?;
            (a.control.clone().unwrap_or(w.control_url), token)
        }
    };
    let report = deploy_dir(&url, &token, &a.dir).await?;
    println!("deployed {} version {}", report.app, report.version.short());
    for r in &report.regions {
        if r.detail.is_empty() {
            println!("  {:<16} {}", r.region, r.outcome);
        } else {
            println!("  {:<16} {} ({})", r.region, r.outcome, r.detail);
        }
    }
    Ok(())
}

/// Packages `dir` and deploys it through the control plane at `url`.
pub async fn deploy_dir(url: &str, token: &str, dir: &Path) -> anyhow::Result<DeployReport> {
    // A manifest problem is reported here, before anything leaves the machine.
    let bundle = Bundle::from_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "packaged {} ({} files, {} KiB) as version {}",
        bundle.manifest.name,
        bundle.files.len(),
        bundle.files.values().map(|f| f.len()).sum::<usize>() / 1024,
        bundle.id.short()
    );
    let (status, body) = call(
        Method::POST,
        &format!("{}/v1/deploy", url.trim_end_matches('/')),
        token,
        Bytes::from(bundle.to_tar()),
        Duration::from_secs(600),
    )
    .await?;
    if !status.is_success() {
        anyhow::bail!("deploy refused ({status}):\n{}", String::from_utf8_lossy(&body).trim());
    }
    serde_json::from_slice(&body).context("control plane sent an unreadable deploy report")
}
