//! Named contexts (as kubectl's and flyctl's): where a control plane is and
//! which credentials reach it, so commands against a hand-built world need
//! no flags. Stored in `$MERIDIAN_CONTEXTS`, else `~/.meridian/contexts.toml`.
//!
//! Which world a command talks to: explicit `--control/--token-file/--tls-dir`,
//! else `--world DIR`, else `--context NAME` (or `$MERIDIAN_CONTEXT`), else
//! the current context, else the dev world in `~/.meridian/dev`.

use anyhow::Context as _;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// The control plane's URL (`https://host:port`).
    pub control: String,
    /// A file holding the token (absolute path).
    pub token_file: PathBuf,
    /// The directory with `ca.pem`, `operator.pem` and `operator.key`.
    pub tls_dir: PathBuf,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contexts {
    #[serde(default)]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("MERIDIAN_CONTEXTS") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".meridian").join("contexts.toml")
}

impl Contexts {
    pub fn load() -> anyhow::Result<Contexts> {
        let p = path();
        match std::fs::read_to_string(&p) {
            Ok(t) => toml::from_str(&t).with_context(|| format!("{} is not a contexts file", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Contexts::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    pub fn save(&self) -> anyhow::Result<()> {
        let p = path();
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // It names credential files (not their contents), but keep it private anyway.
        meridian_core::fs::write_secret(&p, toml::to_string(self)?.as_bytes())
            .with_context(|| format!("cannot write {}", p.display()))
    }

    /// The context a command should use: `name`, else `$MERIDIAN_CONTEXT`,
    /// else the current one; `None` if none is selected.
    pub fn select(&self, name: Option<&str>) -> anyhow::Result<Option<(String, Context)>> {
        let env = std::env::var("MERIDIAN_CONTEXT").ok();
        let Some(name) = name.map(str::to_string).or(env).or_else(|| self.current.clone()) else {
            return Ok(None);
        };
        let c = self.contexts.get(&name).with_context(|| {
            format!("no context named {name:?} in {} (see `meridian context list`)", path().display())
        })?;
        Ok(Some((name, c.clone())))
    }
}
