//! `meridian deploy [DIR]`: package an app and roll it out.

use crate::api::{Operator, WorldArg};
use anyhow::Context;
use bytes::Bytes;
use http::{Method, StatusCode};
use meridian_control::DeployReport;
use meridian_core::world::Credentials;
use meridian_manifest::Bundle;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// App directory holding meridian.toml.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub control: ControlArgs,
    /// Print the deploy report (regions, every rollout step) as JSON,
    /// without live progress.
    #[arg(long)]
    pub json: bool,
}

/// How to reach a control plane: the running dev world's, or any one.
#[derive(clap::Args)]
pub struct ControlArgs {
    #[command(flatten)]
    pub world: WorldArg,
    /// Control plane URL, or several control nodes comma-separated (default: the world's).
    #[arg(long, global = true, requires_all = ["token_file", "tls_dir"])]
    pub control: Option<String>,
    /// File with a token for the control plane (default: the world's
    /// administrator token).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Directory with the cluster CA (`ca.pem`) and the operator's
    /// certificate (`operator.pem`, `operator.key`), as written by
    /// `meridian certs issue --role operator --name operator`.
    #[arg(long, global = true)]
    pub tls_dir: Option<PathBuf>,
    /// A context made with `meridian context add` (default: the current one).
    #[arg(long, global = true)]
    pub context: Option<String>,
}

impl ControlArgs {
    /// The context to use, unless flags or `--world` say otherwise
    /// (see `crate::contexts` for the order).
    pub fn selected_context(&self) -> anyhow::Result<Option<(String, crate::contexts::Context)>> {
        if self.control.is_some() || self.world.world.is_some() {
            return Ok(None);
        }
        crate::contexts::Contexts::load()?.select(self.context.as_deref())
    }

    /// The control plane's URL and an operator holding the token.
    pub fn connect(&self) -> anyhow::Result<(String, Operator)> {
        if let Some((_, c)) = self.selected_context()? {
            let tf = self.token_file.as_ref().unwrap_or(&c.token_file);
            let token = std::fs::read_to_string(tf)
                .with_context(|| format!("cannot read {}", tf.display()))?
                .trim()
                .to_string();
            let creds = Credentials {
                ca: c.tls_dir.join("ca.pem"),
                cert: c.tls_dir.join("operator.pem"),
                key: c.tls_dir.join("operator.key"),
            };
            return Ok((c.control, Operator::new(&creds, token)?));
        }
        match (&self.control, &self.token_file, &self.tls_dir) {
            (Some(url), Some(tf), Some(dir)) => {
                let token = std::fs::read_to_string(tf)
                    .with_context(|| format!("cannot read {}", tf.display()))?
                    .trim()
                    .to_string();
                let creds = Credentials {
                    ca: dir.join("ca.pem"),
                    cert: dir.join("operator.pem"),
                    key: dir.join("operator.key"),
                };
                Ok((url.clone(), Operator::new(&creds, token)?))
            }
            _ => {
                let (w, mut operator) = self.world.connect()?;
                if let Some(tf) = &self.token_file {
                    operator.token = std::fs::read_to_string(tf)
                        .with_context(|| format!("cannot read {}", tf.display()))?
                        .trim()
                        .to_string();
                }
                Ok((w.control_url, operator))
            }
        }
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let (url, operator) = a.control.connect()?;
    let report = deploy_dir(&operator, &url, &a.dir, !a.json).await?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    out!("deployed {} version {}", report.app, report.version.short());
    for r in &report.regions {
        if r.detail.is_empty() {
            out!("  {:<16} {}", r.region, r.outcome);
        } else {
            out!("  {:<16} {} ({})", r.region, r.outcome, r.detail);
        }
    }
    if let Some(p) = &report.purge {
        crate::commands::purge::print_report(p);
    }
    Ok(())
}

/// Packages `dir` and deploys it through the control plane at `url`; with
/// `live`, prints each rollout step as it happens.
pub async fn deploy_dir(operator: &Operator, url: &str, dir: &Path, live: bool) -> anyhow::Result<DeployReport> {
    // A manifest problem is reported here, before anything leaves the machine.
    let bundle = Bundle::from_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "packaged {} ({} files, {} KiB) as version {}",
        bundle.manifest.name,
        bundle.files.len(),
        bundle.files.values().map(|f| f.len()).sum::<usize>() / 1024,
        bundle.id.short()
    );
    // Ask first with nothing to upload: a refused token is then a clear
    // 401, not a connection the server closed halfway through a large body.
    let (status, body) = operator
        .control(url.trim_end_matches('/'), Method::GET, "/v1/whoami", Bytes::new(), Duration::from_secs(10))
        .await?;
    if !status.is_success() {
        anyhow::bail!("the control plane refused the request ({status}): {}", String::from_utf8_lossy(&body).trim());
    }
    let url = url.trim_end_matches('/');
    // The app named up front: a token that may not deploy it is refused
    // before the control plane reads the bundle.
    let path = format!("/v1/deploy?app={}", bundle.manifest.name);
    let deploy = operator.control(url, Method::POST, &path, Bytes::from(bundle.to_tar()), Duration::from_secs(3600));
    // While it runs, show each rollout step as it happens.
    let printed = std::sync::atomic::AtomicUsize::new(0);
    let bars = std::sync::Mutex::new(crate::progress::Progress::new(&bundle.manifest));
    let progress = async {
        if !live {
            return std::future::pending().await;
        }
        let path = format!("/v1/apps/{}/rollout", bundle.manifest.name);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Ok((status, body)) =
                operator.control(url, Method::GET, &path, Bytes::new(), Duration::from_secs(5)).await
            else {
                continue;
            };
            let Ok(s) = serde_json::from_slice::<meridian_control::rollout::RolloutStatus>(&body) else { continue };
            if !status.is_success() || s.version != bundle.id {
                continue;
            }
            let from = printed.load(std::sync::atomic::Ordering::Relaxed);
            for st in s.steps.iter().skip(from) {
                bars.lock().unwrap().step(st);
            }
            printed.store(s.steps.len().max(from), std::sync::atomic::Ordering::Relaxed);
        }
    };
    let answer = tokio::select! {
        r = deploy => r,
        () = progress => unreachable!("the progress loop never ends"),
    };
    let mut bars = bars.into_inner().unwrap_or_else(|e| e.into_inner());
    // The control node running the rollout went away mid-way (killed, or no
    // longer the leader): the new leader carries on from the replicated
    // record; follow it there.
    let lost = match &answer {
        Err(_) => true,
        Ok((status, _)) => *status == StatusCode::BAD_GATEWAY,
    };
    if lost {
        let why = match &answer {
            Err(e) => format!("{e:#}"),
            Ok((_, b)) => String::from_utf8_lossy(b).trim().to_string(),
        };
        eprintln!("the control node running the deploy went away ({why}); following the rollout on the new leader");
        let followed = follow(operator, url, &bundle, &printed, live.then_some(&mut bars)).await;
        bars.finish();
        return followed;
    }
    let (status, body) = answer?;
    if status.is_success() && live {
        if let Ok(r) = serde_json::from_slice::<DeployReport>(&body) {
            for st in r.steps.iter().skip(printed.load(std::sync::atomic::Ordering::Relaxed)) {
                bars.step(st);
            }
        }
    }
    bars.finish();
    if !status.is_success() {
        anyhow::bail!("deploy refused ({status}):\n{}", String::from_utf8_lossy(&body).trim());
    }
    serde_json::from_slice(&body).context("control plane sent an unreadable deploy report")
}

/// Follows a rollout of `bundle` that a new leader continues, until it
/// ends; the report is built from its steps.
async fn follow(
    operator: &Operator,
    url: &str,
    bundle: &Bundle,
    printed: &std::sync::atomic::AtomicUsize,
    mut live: Option<&mut crate::progress::Progress>,
) -> anyhow::Result<DeployReport> {
    use std::sync::atomic::Ordering::Relaxed;
    let path = format!("/v1/apps/{}/rollout", bundle.manifest.name);
    // If the node went away before the rollout was recorded, there is none.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = false;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answer = operator.control(url, Method::GET, &path, Bytes::new(), Duration::from_secs(5)).await;
        let status = match answer {
            Ok((s, body)) if s.is_success() => {
                serde_json::from_slice::<meridian_control::rollout::RolloutStatus>(&body).ok()
            }
            _ => None,
        };
        match status {
            Some(s) if s.version == bundle.id => {
                seen = true;
                if let Some(bars) = live.as_deref_mut() {
                    for st in s.steps.iter().skip(printed.load(Relaxed)) {
                        bars.step(st);
                    }
                    printed.store(s.steps.len().max(printed.load(Relaxed)), Relaxed);
                }
                if !meridian_control::rollout::is_final(&s.state) {
                    continue;
                }
                if s.state != "succeeded" {
                    let failed = s.steps.iter().find(|st| !st.ok);
                    let why = failed.map(|f| format!(" at {} {}: {}", f.region, f.step, f.detail)).unwrap_or_default();
                    anyhow::bail!("rollout of version {} {}{why}", s.version.short(), s.state);
                }
                let mut regions: Vec<meridian_control::RegionOutcome> = Vec::new();
                for st in &s.steps {
                    if st.step == "100%" && st.ok && !regions.iter().any(|r| r.region == st.region) {
                        regions.push(meridian_control::RegionOutcome {
                            region: st.region.clone(),
                            outcome: "active".into(),
                            detail: String::new(),
                        });
                    }
                }
                return Ok(DeployReport { app: s.app, version: s.version, regions, steps: s.steps, purge: None });
            }
            _ if !seen && tokio::time::Instant::now() > give_up => anyhow::bail!(
                "the control node went away before the rollout of version {} was recorded; nothing changed: \
                 deploy again",
                bundle.id.short()
            ),
            _ => {}
        }
    }
}
