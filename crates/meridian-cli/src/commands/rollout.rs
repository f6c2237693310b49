//! `meridian rollout status|pause|resume|abort|approve`: watch and steer
//! an app's rollout while `meridian deploy` runs it.

use crate::commands::deploy::ControlArgs;
use bytes::Bytes;
use http::Method;
use meridian_control::rollout::RolloutStatus;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The app (default: the world's default app).
    #[arg(long, global = true)]
    pub app: Option<String>,
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Subcommand, Clone, Copy)]
pub enum Cmd {
    /// The rollout in progress (or the last one): state and every step.
    Status,
    /// Stop before the next step (traffic stays as it is).
    Pause,
    /// Go on after a pause.
    Resume,
    /// Stop and roll back every region the rollout touched.
    Abort,
    /// Let a rollout with `manual_approval` start its next wave.
    Approve,
}

pub fn print(s: &RolloutStatus) {
    out!(
        "rollout of {} version {} (from {}): {}",
        s.app,
        s.version.short(),
        s.old.as_ref().map(|o| o.short().to_string()).unwrap_or_else(|| "nothing".into()),
        s.state
    );
    for st in &s.steps {
        print_step(st);
    }
}

pub fn print_step(st: &meridian_control::rollout::StepOutcome) {
    out!(
        "  {:<16} {:<8} {} +{} ms{}",
        st.region,
        st.step,
        if st.ok { "ok" } else { "FAILED" },
        st.at_ms,
        if st.detail.is_empty() { String::new() } else { format!("  {}", st.detail) }
    );
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let (url, op) = a.control.connect()?;
    let app = crate::commands::kv::app_or_default(&op, &url, a.app.as_deref()).await?;
    let (method, path) = match a.cmd {
        Cmd::Status => (Method::GET, format!("/v1/apps/{app}/rollout")),
        Cmd::Pause => (Method::POST, format!("/v1/apps/{app}/rollout/pause")),
        Cmd::Resume => (Method::POST, format!("/v1/apps/{app}/rollout/resume")),
        Cmd::Abort => (Method::POST, format!("/v1/apps/{app}/rollout/abort")),
        Cmd::Approve => (Method::POST, format!("/v1/apps/{app}/rollout/approve")),
    };
    let body = op.control_ok(&url, method, &path, Bytes::new(), Duration::from_secs(10)).await?;
    let s: RolloutStatus = serde_json::from_slice(&body)?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print(&s);
    }
    Ok(())
}
