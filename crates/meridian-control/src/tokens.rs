//! Operator tokens with scopes, per app (as Fly.io's deploy tokens).
//!
//! A token is `mrd_<id>_<secret>`; only the SHA-256 of the whole token is
//! stored (`tokens.json`, mode 0600), so a copy of the control plane's disk
//! gives nobody a usable token. The world's bootstrap token (the config's
//! `token_file`) is the administrator: every scope on every app, and the
//! only credential that can create or revoke tokens.

use meridian_http::constant_time_eq;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Mutex;

/// What a token allows, on its app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Ship new versions.
    Deploy,
    /// See versions and status.
    Read,
    /// Read and change the app's key-value data.
    DataAdmin,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        match s {
            "deploy" => Ok(Scope::Deploy),
            "read" => Ok(Scope::Read),
            "data-admin" => Ok(Scope::DataAdmin),
            _ => Err(format!("unknown scope {s:?}: deploy, read or data-admin")),
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub app: String,
    pub scopes: Vec<Scope>,
    /// Hex SHA-256 of the whole token.
    pub hash: String,
    pub created_ms: u64,
}

/// Who a request's bearer token says the caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin,
    App { id: String, app: String, scopes: Vec<Scope> },
}

impl Caller {
    /// Whether the caller may do `scope` on `app`.
    pub fn may(&self, scope: Scope, app: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::App { app: a, scopes, .. } => a == app && scopes.contains(&scope),
        }
    }
}

pub struct Tokens {
    path: PathBuf,
    admin_hash: [u8; 32],
    records: Mutex<Vec<TokenRecord>>,
}

fn sha(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Tokens {
    pub fn open(path: PathBuf, admin_token: &str) -> std::io::Result<Tokens> {
        let records = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(Tokens { path, admin_hash: sha(admin_token), records: Mutex::new(records) })
    }

    fn save(&self, records: &[TokenRecord]) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(records).map_err(std::io::Error::other)?;
        meridian_core::fs::write_secret(&self.path, &bytes)
    }

    /// Who `token` belongs to, if anyone.
    pub fn caller(&self, token: &str) -> Option<Caller> {
        if token.is_empty() {
            return None;
        }
        let h = sha(token);
        if constant_time_eq(&h, &self.admin_hash) {
            return Some(Caller::Admin);
        }
        let id = token.strip_prefix("mrd_")?.split('_').next()?;
        let records = self.records.lock().unwrap();
        let r = records.iter().find(|r| r.id == id)?;
        let stored = hex::decode(&r.hash).ok()?;
        constant_time_eq(&h, &stored).then(|| Caller::App {
            id: r.id.clone(),
            app: r.app.clone(),
            scopes: r.scopes.clone(),
        })
    }

    /// Makes a token; the secret is returned once and never stored.
    pub fn create(&self, app: &str, scopes: Vec<Scope>) -> std::io::Result<(TokenRecord, String)> {
        use rand::RngCore;
        let mut b = [0u8; 24];
        rand::rng().fill_bytes(&mut b);
        let id = hex::encode(&b[..4]);
        let token = format!("mrd_{id}_{}", hex::encode(&b[4..]));
        let record = TokenRecord {
            id,
            app: app.to_string(),
            scopes,
            hash: hex::encode(sha(&token)),
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let mut records = self.records.lock().unwrap();
        let mut next = records.clone();
        next.push(record.clone());
        self.save(&next)?;
        *records = next;
        Ok((record, token))
    }

    pub fn list(&self) -> Vec<TokenRecord> {
        self.records.lock().unwrap().clone()
    }

    /// Revokes every token of an app (it was deleted: a new app of the same
    /// name must not inherit them); how many there were.
    pub fn revoke_app(&self, app: &str) -> std::io::Result<usize> {
        let mut records = self.records.lock().unwrap();
        let next: Vec<TokenRecord> = records.iter().filter(|r| r.app != app).cloned().collect();
        let n = records.len() - next.len();
        if n > 0 {
            self.save(&next)?;
            *records = next;
        }
        Ok(n)
    }

    /// Revokes a token; whether it existed.
    pub fn revoke(&self, id: &str) -> std::io::Result<bool> {
        let mut records = self.records.lock().unwrap();
        let next: Vec<TokenRecord> = records.iter().filter(|r| r.id != id).cloned().collect();
        if next.len() == records.len() {
            return Ok(false);
        }
        self.save(&next)?;
        *records = next;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_scoped_stored_hashed_and_revocable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let t = Tokens::open(path.clone(), "admin-secret").unwrap();
        assert_eq!(t.caller("admin-secret"), Some(Caller::Admin));
        let (rec, secret) = t.create("shop", vec![Scope::Deploy]).unwrap();
        let caller = t.caller(&secret).unwrap();
        assert!(caller.may(Scope::Deploy, "shop"));
        assert!(!caller.may(Scope::Read, "shop"));
        assert!(!caller.may(Scope::Deploy, "blog"));
        // Only the hash is on disk, with mode 0600; it survives a restart.
        let disk = std::fs::read_to_string(&path).unwrap();
        assert!(!disk.contains(&secret[12..]) && disk.contains(&rec.hash));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let t = Tokens::open(path, "admin-secret").unwrap();
        assert!(t.caller(&secret).is_some());
        // A token with the right id and a wrong secret, or garbage: nobody.
        assert_eq!(t.caller(&format!("mrd_{}_{}", rec.id, "0".repeat(40))), None);
        assert_eq!(t.caller("mrd_"), None);
        assert_eq!(t.caller(""), None);
        assert!(t.revoke(&rec.id).unwrap());
        assert_eq!(t.caller(&secret), None);
        assert!(!t.revoke(&rec.id).unwrap());
    }
}
