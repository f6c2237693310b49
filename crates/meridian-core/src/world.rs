//! The machine-readable description of a running world (`world.json`).
//!
//! `meridian dev` writes it into the world directory and rewrites it whenever
//! something changes (a region restarted under a new PID). Scripts, tests and
//! the CLI read it to find every process. The format is documented in
//! `docs/world-file.md`; `format` is bumped on incompatible changes.

use crate::geo::GeoPoint;
use std::path::{Path, PathBuf};

pub const WORLD_FILE: &str = "world.json";
pub const TOKEN_FILE: &str = "token";
pub const FORMAT: u32 = 2;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WorldDescription {
    pub format: u32,
    /// False while the world is starting, true once every role answered and
    /// the example app is deployed.
    pub ready: bool,
    pub dir: PathBuf,
    /// File holding the operators' bearer token of the control API.
    pub token_file: PathBuf,
    /// The operator's certificate, with which the CLI calls nodes' cluster
    /// ports, and the cluster CA that every node's certificate comes from.
    pub operator: Credentials,
    /// The control nodes' API URLs (`https://`, certificates from the CA),
    /// comma-separated; any of them forwards to the leader.
    pub control_url: String,
    /// URL of the supervisor's chaos API (`meridian chaos` talks to it).
    pub supervisor_url: String,
    pub processes: Vec<ProcessInfo>,
    pub edges: Vec<EdgeInfo>,
    pub regions: Vec<RegionInfo>,
    pub links: Vec<LinkInfo>,
    /// The GeoDNS server (UDP and TCP), answering for `*.localhost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
}

/// A certificate, its key, and the CA that verifies the other end.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    /// `supervisor`, `control`, `region` or `edge`.
    pub role: String,
    pub name: String,
    /// None while the process is stopped (killed by chaos, not restarted yet).
    pub pid: Option<u32>,
    /// The public port (user traffic), or the only one.
    pub listen: String,
    /// The cluster port (mutual TLS), if the role has one besides `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_listen: Option<String>,
    pub config: Option<PathBuf>,
    pub log: Option<PathBuf>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EdgeInfo {
    pub name: String,
    /// Where users send requests.
    pub url: String,
    /// The edge's cluster port (mutual TLS): its status.
    pub cluster_url: String,
    pub location: GeoPoint,
    /// Where users connect with TLS (`https://...`), if it serves HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_url: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RegionInfo {
    pub name: String,
    /// The region's public port (app traffic only), bypassing every link.
    pub url: String,
    /// The region's cluster port (mutual TLS), bypassing every link.
    pub cluster_url: String,
    pub location: GeoPoint,
    pub jurisdiction: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LinkInfo {
    /// `<from>-><to>`, e.g. `edge-eu-west->us-east`.
    pub name: String,
    pub from: String,
    pub to: String,
    pub listen: String,
    pub upstream: String,
    pub one_way_delay_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorldFileError {
    #[error("no world description at {0}: is `meridian dev` running? (pass --world DIR to point elsewhere)")]
    Missing(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a world description: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("{path} has format {found}; this meridian reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
}

/// Where `meridian dev` keeps its world unless told otherwise:
/// `$MERIDIAN_WORLD`, else `$HOME/.meridian/dev`.
pub fn default_world_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MERIDIAN_WORLD") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".meridian").join("dev")
}

impl WorldDescription {
    pub fn read(dir: &Path) -> Result<Self, WorldFileError> {
        let path = dir.join(WORLD_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(WorldFileError::Missing(path)),
            Err(source) => return Err(WorldFileError::Io { path, source }),
        };
        let w: WorldDescription =
            serde_json::from_slice(&text).map_err(|source| WorldFileError::Parse { path: path.clone(), source })?;
        if w.format != FORMAT {
            return Err(WorldFileError::Format { path, found: w.format });
        }
        Ok(w)
    }

    /// Replaces the file atomically, so a reader never sees half a file.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::fs::write_atomic(&dir.join(WORLD_FILE), &json)
    }

    pub fn token(&self) -> std::io::Result<String> {
        Ok(std::fs::read_to_string(&self.token_file)?.trim().to_string())
    }
}
