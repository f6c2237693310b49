//! `meridian certs`: the cluster CA and node certificates.
//!
//! ```sh
//! meridian certs init --dir certs                       # certs/ca.pem, certs/ca.key (0600)
//! meridian certs issue --dir certs --role region --name eu-west --jurisdiction eu
//! meridian certs issue --dir certs --role edge --name edge-fra
//! meridian certs issue --dir certs --role control --name control
//! meridian certs issue --dir certs --role operator --name operator
//! meridian certs show certs/eu-west.pem
//! ```
//!
//! Copy `ca.pem` and a node's `<name>.pem` / `<name>.key` to that node; keep
//! `ca.key` off the nodes. Reissuing a certificate in place is picked up by
//! the running node within its `reload_interval_ms`.

use anyhow::Context;
use meridian_trust::{CaFiles, Identity, Role};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Create the cluster's certificate authority.
    Init {
        /// Where ca.pem and ca.key go.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// A name for the cluster, shown in the CA's subject.
        #[arg(long, default_value = "meridian")]
        cluster: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a node certificate carrying name, role and (regions) jurisdiction.
    Issue {
        /// Directory holding ca.pem and ca.key; the certificate is written here too.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Write the certificate and key here instead of --dir.
        #[arg(long)]
        out: Option<PathBuf>,
        /// region, edge, control or operator.
        #[arg(long)]
        role: Role,
        /// The node's name, as in its config (`eu-west`, `edge-fra`, `control`).
        #[arg(long)]
        name: String,
        /// Regions only: the jurisdiction residency rules will trust it with.
        #[arg(long)]
        jurisdiction: Option<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Print the identity a certificate carries.
    Show { cert: PathBuf },
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.cmd {
        Cmd::Init { dir, cluster, days } => {
            let ca = meridian_trust::init_ca(&dir, &cluster, days)?;
            out!("created the cluster CA: {} (key {}, mode 0600)", ca.cert.display(), ca.key.display());
            out!("created the world's cluster key: {} (mode 0600): give it to every region", ca.cluster_key.display());
            out!("keep the CA key off the nodes; give every node {}", ca.cert.display());
        }
        Cmd::Issue { dir, out, role, name, jurisdiction, days } => {
            let id = Identity::new(&name, role, jurisdiction.as_deref())?;
            let issued = meridian_trust::issue(&CaFiles::in_dir(&dir), &id, out.as_deref().unwrap_or(&dir), days)?;
            out!("issued {id}: {} (key {}, mode 0600)", issued.cert.display(), issued.key.display());
        }
        Cmd::Show { cert } => {
            let pem = std::fs::read(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
            use rustls::pki_types::pem::PemObject;
            let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem)
                .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
            out!("{}", Identity::from_cert_der(&der)?);
        }
    }
    Ok(())
}
