//! `meridian tokens`: operator tokens scoped to one app (deploy, read,
//! data-admin). Creating and revoking needs the world's administrator token.

use crate::commands::deploy::ControlArgs;
use bytes::Bytes;
use http::Method;
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
    /// Make a token for one app; it is printed once and stored only hashed.
    Create {
        #[arg(long)]
        app: String,
        /// deploy, read or data-admin (repeat for several).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// Every token (ids, apps, scopes; never the secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let (url, op) = a.control.connect()?;
    let t = Duration::from_secs(10);
    let (status, body) = match a.cmd {
        Cmd::Create { app, scopes } => {
            let body = serde_json::json!({"app": app, "scopes": scopes});
            op.control(&url, Method::POST, "/v1/tokens", Bytes::from(body.to_string()), t).await?
        }
        Cmd::List => op.control(&url, Method::GET, "/v1/tokens", Bytes::new(), t).await?,
        Cmd::Revoke { id } => op.control(&url, Method::DELETE, &format!("/v1/tokens/{id}"), Bytes::new(), t).await?,
    };
    if !status.is_success() {
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    if let Some(secret) = v["token"].as_str() {
        out!("{secret}");
        eprintln!("(shown once; store it now: the control plane keeps only its hash)");
    } else {
        out!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
