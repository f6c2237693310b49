//! `meridian context`: name a control plane and its credentials once.
//!
//! ```sh
//! meridian context add prod --control https://control:7410 --token-file token --tls-dir certs
//! meridian context use prod
//! meridian deploy ./app        # to prod, no flags
//! meridian status
//! ```

use crate::contexts::{Context, Contexts};
use anyhow::Context as _;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Add (or replace) a context; paths are stored absolute.
    Add {
        name: String,
        /// The control plane's URL, or several control nodes' (comma-separated).
        #[arg(long)]
        control: String,
        #[arg(long)]
        token_file: PathBuf,
        #[arg(long)]
        tls_dir: PathBuf,
    },
    /// Make a context the current one.
    Use { name: String },
    /// Back to the local dev world.
    Unset,
    /// Every context; `*` marks the current one.
    List,
    /// Forget a context.
    Remove { name: String },
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(&p).with_context(|| format!("{} does not exist", p.display()))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut all = Contexts::load()?;
    match a.cmd {
        Cmd::Add { name, control, token_file, tls_dir } => {
            if crate::api::control_urls(&control).next().is_none()
                || !crate::api::control_urls(&control).all(|u| u.starts_with("https://"))
            {
                anyhow::bail!("--control must be the control plane's https:// URL, or several, comma-separated");
            }
            let tls_dir = absolute(tls_dir)?;
            for f in ["ca.pem", "operator.pem", "operator.key"] {
                if !tls_dir.join(f).exists() {
                    anyhow::bail!("{} has no {f} (see `meridian certs issue --role operator`)", tls_dir.display());
                }
            }
            let c = Context { control, token_file: absolute(token_file)?, tls_dir };
            all.contexts.insert(name.clone(), c);
            if all.current.is_none() {
                all.current = Some(name.clone());
            }
            all.save()?;
            out!("added context {name}{}", if all.current.as_deref() == Some(&name) { " (current)" } else { "" });
        }
        Cmd::Use { name } => {
            if !all.contexts.contains_key(&name) {
                anyhow::bail!("no context named {name:?}");
            }
            all.current = Some(name.clone());
            all.save()?;
            out!("now using {name}");
        }
        Cmd::Unset => {
            all.current = None;
            all.save()?;
            out!("no current context: commands use the local dev world");
        }
        Cmd::List => {
            for (name, c) in &all.contexts {
                let mark = if all.current.as_deref() == Some(name) { "*" } else { " " };
                out!("{mark} {name:<16} {}", c.control);
            }
        }
        Cmd::Remove { name } => {
            if all.contexts.remove(&name).is_none() {
                anyhow::bail!("no context named {name:?}");
            }
            if all.current.as_deref() == Some(&name) {
                all.current = None;
            }
            all.save()?;
            out!("removed {name}");
        }
    }
    Ok(())
}
