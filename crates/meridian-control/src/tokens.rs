//! Operator tokens with scopes, per app (as Fly.io's deploy tokens).
//!
//! A token is `mrd_<id>_<secret>`; only the SHA-256 of the whole token is
//! stored (in the replicated control state), so a copy of a control node's
//! disk gives nobody a usable token. The world's bootstrap token (the config's
//! `token_file`) is the administrator: every scope on every app, and the
//! only credential that can create or revoke tokens.

use meridian_http::constant_time_eq;
use sha2::{Digest, Sha256};

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
    App {
        id: String,
        app: String,
        scopes: Vec<Scope>,
    },
    /// The control plane itself (a control node resuming a rollout): in
    /// the audit log only; no token maps to it.
    System(String),
}

impl Caller {
    /// Whether the caller may do `scope` on `app`.
    pub fn may(&self, scope: Scope, app: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::App { app: a, scopes, .. } => a == app && scopes.contains(&scope),
            Caller::System(_) => false,
        }
    }

    /// As the audit log names it: `admin`, `token <id>`, `control <node>`.
    pub fn who(&self) -> String {
        match self {
            Caller::Admin => "admin".to_string(),
            Caller::App { id, .. } => format!("token {id}"),
            Caller::System(node) => format!("control {node}"),
        }
    }
}

/// Checks bearer tokens: the administrator's (from the config's token
/// file) and the app tokens of the replicated state (hashes only).
pub struct Tokens {
    admin_hash: [u8; 32],
}

fn sha(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Tokens {
    pub fn new(admin_token: &str) -> Tokens {
        Tokens { admin_hash: sha(admin_token) }
    }

    /// Who `token` belongs to, if anyone, given the app tokens `records`.
    pub fn caller(&self, token: &str, records: &[TokenRecord]) -> Option<Caller> {
        if token.is_empty() {
            return None;
        }
        let h = sha(token);
        if constant_time_eq(&h, &self.admin_hash) {
            return Some(Caller::Admin);
        }
        let id = token.strip_prefix("mrd_")?.split('_').next()?;
        let r = records.iter().find(|r| r.id == id)?;
        let stored = hex::decode(&r.hash).ok()?;
        constant_time_eq(&h, &stored).then(|| Caller::App {
            id: r.id.clone(),
            app: r.app.clone(),
            scopes: r.scopes.clone(),
        })
    }

    /// Makes a token: its record (to store) and the secret (returned once,
    /// never stored).
    pub fn make(app: &str, scopes: Vec<Scope>) -> (TokenRecord, String) {
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
        (record, token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_scoped_stored_hashed_and_revocable() {
        let t = Tokens::new("admin-secret");
        assert_eq!(t.caller("admin-secret", &[]), Some(Caller::Admin));
        let (rec, secret) = Tokens::make("shop", vec![Scope::Deploy]);
        let mut records = vec![rec.clone()];
        let caller = t.caller(&secret, &records).unwrap();
        assert!(caller.may(Scope::Deploy, "shop"));
        assert!(!caller.may(Scope::Read, "shop"));
        assert!(!caller.may(Scope::Deploy, "blog"));
        // Only the hash is kept.
        let stored = serde_json::to_string(&records).unwrap();
        assert!(!stored.contains(&secret[12..]) && stored.contains(&rec.hash));
        // A token with the right id and a wrong secret, or garbage: nobody.
        assert_eq!(t.caller(&format!("mrd_{}_{}", rec.id, "0".repeat(40)), &records), None);
        assert_eq!(t.caller("mrd_", &records), None);
        assert_eq!(t.caller("", &records), None);
        records.clear();
        assert_eq!(t.caller(&secret, &records), None, "revoked");
        assert!(!Caller::System("control-1".into()).may(Scope::Read, "shop"));
    }
}
