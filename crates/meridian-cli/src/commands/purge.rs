//! `meridian purge`: make every edge forget an app's cached answers, by
//! path, prefix, tag or all at once; says how long the slowest edge took.

use crate::commands::deploy::ControlArgs;
use bytes::Bytes;
use http::Method;
use meridian_control::purge::PurgeReport;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The app (default: the world's default app).
    #[arg(long)]
    pub app: Option<String>,
    /// A path to forget, e.g. /index.html (repeatable).
    #[arg(long = "path")]
    pub paths: Vec<String>,
    /// Every path under a prefix, e.g. /img/ (repeatable).
    #[arg(long = "prefix")]
    pub prefixes: Vec<String>,
    /// Every answer carrying a tag (`Surrogate-Key` / `Cache-Tag`, or the
    /// route's `cache_tags`) (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Everything of the app.
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    if !a.all && a.paths.is_empty() && a.prefixes.is_empty() && a.tags.is_empty() {
        anyhow::bail!("nothing to purge: give --path, --prefix, --tag or --all");
    }
    let (url, op) = a.control.connect()?;
    let app = crate::commands::kv::app_or_default(&op, &url, a.app.as_deref()).await?;
    let body = serde_json::json!({ "paths": a.paths, "prefixes": a.prefixes, "tags": a.tags, "all": a.all });
    let path = format!("/v1/apps/{app}/purge");
    let answer = op
        .control_ok(&url, Method::POST, &path, Bytes::from(serde_json::to_vec(&body)?), Duration::from_secs(30))
        .await?;
    let report: PurgeReport = serde_json::from_slice(&answer)?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    let failed = report.failed();
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {} edges did not confirm the purge; it is safe to repeat",
            failed.len(),
            report.edges.len()
        );
    }
    Ok(())
}

/// One line per edge, then the total.
pub fn print_report(r: &PurgeReport) {
    for e in &r.edges {
        match (e.removed, &e.error) {
            (Some(n), _) => out!("  {:<20} {n:>6} removed  {:>7.1} ms", e.edge, e.ms),
            (None, err) => out!("  {:<20} FAILED  {}", e.edge, err.as_deref().unwrap_or("")),
        }
    }
    let removed: u64 = r.edges.iter().filter_map(|e| e.removed).sum();
    out!("purged {removed} cached answers at {} edges in {:.1} ms", r.edges.len(), r.ms);
}
