//! HTTPS for users: certificates per hostname from a directory, chosen by
//! the client's SNI, reloaded when the files change.
//!
//! Every `NAME.pem` (a chain, leaf first) with its `NAME.key` in
//! `certs_dir` serves the DNS names in the leaf's subject alternative names
//! (`*.example.com` serves one label below `example.com`). A client that
//! names a host no certificate covers, or none, gets a TLS alert — never
//! some other app's certificate. A file that cannot be read or does not
//! match its key is reported and skipped; the others keep serving.

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsConfig {
    /// Where users connect with TLS (HTTP/2 and HTTP/1.1 by ALPN).
    pub listen: std::net::SocketAddr,
    /// `NAME.pem` + `NAME.key` pairs, one per certificate.
    pub certs_dir: PathBuf,
    /// How often the directory is checked for changed files.
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_ms() -> u64 {
    5000
}

#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("cannot read the certificate directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Pair { path: PathBuf, what: String },
}

/// The certificates of one load of the directory, by name.
#[derive(Default)]
struct Table {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

pub struct Sites {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    table: ArcSwap<Table>,
    /// What the files looked like at the last load (name, length, mtime).
    seen: Mutex<Vec<(PathBuf, u64, SystemTime)>>,
}

impl std::fmt::Debug for Sites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sites").field("dir", &self.dir).finish()
    }
}

impl Sites {
    /// Loads `dir`; fails only if the directory cannot be read.
    pub fn load(dir: &Path) -> Result<Arc<Sites>, HttpsError> {
        let sites = Arc::new(Sites {
            dir: dir.to_path_buf(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            table: ArcSwap::from_pointee(Table::default()),
            seen: Mutex::new(Vec::new()),
        });
        sites.reload_if_changed()?;
        Ok(sites)
    }

    /// Re-reads the directory if a file was added, removed or changed;
    /// returns the problems of files it skipped.
    pub fn reload_if_changed(&self) -> Result<Vec<HttpsError>, HttpsError> {
        let listing = self.listing()?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == listing {
            return Ok(Vec::new());
        }
        let mut table = Table::default();
        let mut problems = Vec::new();
        for (pem, _, _) in listing.iter().filter(|(p, _, _)| p.extension().is_some_and(|e| e == "pem")) {
            match self.pair(pem) {
                Ok((names, key)) => {
                    for n in names {
                        match n.strip_prefix("*.") {
                            Some(parent) => table.wildcard.insert(parent.to_string(), key.clone()),
                            None => table.exact.insert(n, key.clone()),
                        };
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "certificate skipped");
                    problems.push(e);
                }
            }
        }
        tracing::info!(dir = %self.dir.display(), names = table.exact.len() + table.wildcard.len(), "site certificates loaded");
        self.table.store(Arc::new(table));
        *seen = listing;
        Ok(problems)
    }

    fn listing(&self) -> Result<Vec<(PathBuf, u64, SystemTime)>, HttpsError> {
        let err = |source| HttpsError::Dir { path: self.dir.clone(), source };
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(err)? {
            let e = e.map_err(err)?;
            let Ok(m) = e.metadata() else { continue };
            if m.is_file() {
                out.push((e.path(), m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
            }
        }
        out.sort();
        Ok(out)
    }

    /// One `NAME.pem` and its `NAME.key`: the names it serves and the key.
    fn pair(&self, pem: &Path) -> Result<(Vec<String>, Arc<CertifiedKey>), HttpsError> {
        let bad = |what: String| HttpsError::Pair { path: pem.to_path_buf(), what };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pem)
            .map_err(|e| bad(format!("not PEM: {e}")))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("not PEM: {e}")))?;
        let leaf = chain.first().ok_or_else(|| bad("no certificate in the file".into()))?;
        let key_path = pem.with_extension("key");
        let key =
            PrivateKeyDer::from_pem_file(&key_path).map_err(|e| bad(format!("its key {}: {e}", key_path.display())))?;
        let signing = self.provider.key_provider.load_private_key(key).map_err(|e| bad(format!("its key: {e}")))?;
        let certified = CertifiedKey::new(chain.clone(), signing);
        certified.keys_match().map_err(|e| bad(format!("the key is not the certificate's: {e}")))?;
        let names = dns_names(leaf).map_err(bad)?;
        if names.is_empty() {
            return Err(bad("the certificate names no DNS host (subject alternative names)".into()));
        }
        Ok((names, Arc::new(certified)))
    }

    /// Checks the directory every `interval` for as long as the edge runs.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) {
        let sites = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
            loop {
                tick.tick().await;
                let Some(s) = sites.upgrade() else { return };
                if let Err(e) = s.reload_if_changed() {
                    tracing::warn!(error = %e, "site certificates not reloaded; the current ones stay");
                }
            }
        });
    }

    /// The TLS configuration of the HTTPS port.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut c = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }

    /// The certificate serving `host`, if any.
    pub fn for_host(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let t = self.table.load();
        if let Some(k) = t.exact.get(&host) {
            return Some(k.clone());
        }
        let (_, parent) = host.split_once('.')?;
        t.wildcard.get(parent).cloned()
    }
}

impl ResolvesServerCert for Sites {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        let found = self.for_host(name);
        if found.is_none() {
            tracing::debug!(sni = name, "no certificate for this host; handshake refused");
        }
        found
    }
}

/// The DNS names among a certificate's subject alternative names.
fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not X.509: {e}"))?;
    let san = cert.subject_alternative_name().map_err(|e| format!("bad subject alternative names: {e}"))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_gets_its_own_certificate_a_wildcard_one_label_down_and_nobody_elses() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = meridian_trust::ensure_public_ca(dir.path(), "t", 1).unwrap();
        let certs = dir.path().join("sites");
        std::fs::create_dir_all(&certs).unwrap();
        meridian_trust::issue_site(&ca, &ca_key, &["shop.example".into()], &certs, "shop", 1).unwrap();
        meridian_trust::issue_site(&ca, &ca_key, &["*.blog.example".into()], &certs, "blog", 1).unwrap();
        std::fs::write(certs.join("broken.pem"), "not a certificate").unwrap();
        let sites = Sites::load(&certs).unwrap();
        assert!(sites.for_host("shop.example").is_some());
        assert!(sites.for_host("SHOP.example.").is_some());
        assert!(sites.for_host("a.blog.example").is_some());
        assert!(sites.for_host("a.b.blog.example").is_none(), "a wildcard covers one label");
        assert!(sites.for_host("blog.example").is_none());
        assert!(sites.for_host("other.example").is_none());
        // A new certificate appears without a restart; a removed one goes.
        meridian_trust::issue_site(&ca, &ca_key, &["new.example".into()], &certs, "new", 1).unwrap();
        std::fs::remove_file(certs.join("shop.pem")).unwrap();
        let problems = sites.reload_if_changed().unwrap();
        assert_eq!(problems.len(), 1, "the broken file is reported");
        assert!(sites.for_host("new.example").is_some());
        assert!(sites.for_host("shop.example").is_none());
    }
}
