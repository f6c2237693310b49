//! A node's live TLS configuration: built from its files, reloaded when they
//! change.

use crate::identity::{dns_name, Identity, Role};
use crate::TrustError;
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The `[tls]` section of every role's config.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA's certificate: the only issuer this node trusts.
    pub ca: PathBuf,
    /// This node's certificate (from `meridian certs issue`).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// How often the three files are checked for changes.
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_ms() -> u64 {
    5000
}

impl TlsFiles {
    /// The files `meridian certs issue` writes for `name` into `dir`, with
    /// the CA's certificate next to them.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            reload_interval_ms: default_reload_ms(),
        }
    }
}

/// Whether a listener requires a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// The cluster port: no certificate from the cluster CA, no handshake.
    Required,
    /// A port operators reach with a token; a certificate, if presented, is
    /// still verified.
    Optional,
}

/// What a client requires of the server it connects to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Expect {
    pub name: String,
    pub role: Role,
    /// For a region: the jurisdiction the caller is about to trust it with.
    /// A server whose certificate says otherwise is refused at the handshake,
    /// before a byte of data is sent.
    pub jurisdiction: Option<String>,
}

impl Expect {
    pub fn new(name: &str, role: Role) -> Expect {
        Expect { name: name.to_string(), role, jurisdiction: None }
    }

    pub fn region(name: &str, jurisdiction: &str) -> Expect {
        Expect { name: name.to_string(), role: Role::Region, jurisdiction: Some(jurisdiction.to_string()) }
    }

    /// Any node of `role` that answers to the role's service name (control
    /// nodes: the operator reaches whichever is up).
    pub fn service(role: Role) -> Expect {
        Expect { name: String::new(), role, jurisdiction: None }
    }

    /// The server name the handshake verifies (`<name>.<role>.meridian`, or
    /// `<role>.meridian` for a service).
    pub fn server_name(&self) -> Result<ServerName<'static>, String> {
        let name = if self.name.is_empty() {
            crate::identity::service_dns_name(self.role)
        } else {
            dns_name(&self.name, self.role)
        };
        ServerName::try_from(name).map_err(|e| format!("invalid peer name: {e}"))
    }

    /// Checks a verified server identity against the expectation.
    pub fn check(&self, id: &Identity) -> Result<(), String> {
        if (!self.name.is_empty() && id.name != self.name) || id.role != self.role {
            return Err(format!("expected {} {}, the certificate says {id}", self.role, self.name));
        }
        if let Some(j) = &self.jurisdiction {
            if id.jurisdiction.as_deref() != Some(j.as_str()) {
                return Err(format!(
                    "{} was expected in jurisdiction {j:?}, but its certificate was issued for {:?}",
                    self.name,
                    id.jurisdiction.as_deref().unwrap_or("none")
                ));
            }
        }
        Ok(())
    }
}

struct Loaded {
    identity: Identity,
    /// This node's certificate (DER), sent along with what it signs.
    cert_der: CertificateDer<'static>,
    /// Signs with this node's key (ECDSA P-256, SHA-256, ASN.1).
    signer: Box<dyn rustls::sign::Signer>,
    /// Checks that a certificate chains to the cluster CA.
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    server_required: Arc<ServerConfig>,
    server_optional: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// The file contents these configs were built from.
    source: Vec<u8>,
}

/// A node's TLS identity and configurations, swapped atomically on reload:
/// connections in progress keep the configuration they started with.
pub struct Tls {
    files: TlsFiles,
    loaded: ArcSwap<Loaded>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).field("identity", &self.loaded.load().identity).finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TrustError> {
    std::fs::read(path).map_err(|source| TrustError::Read { path: path.to_path_buf(), source })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TrustError::Pem { path: path.to_path_buf(), what: e.to_string() })?;
    if certs.is_empty() {
        return Err(TrustError::Pem { path: path.to_path_buf(), what: "no certificate in the file".into() });
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<Loaded, TrustError> {
    let (ca_pem, cert_pem, key_pem) = (read(&files.ca)?, read(&files.cert)?, read(&files.key)?);
    let mut roots = RootCertStore::empty();
    for c in certs(&files.ca, &ca_pem)? {
        roots.add(c).map_err(|e| TrustError::Pem { path: files.ca.clone(), what: e.to_string() })?;
    }
    let roots = Arc::new(roots);
    let chain = certs(&files.cert, &cert_pem)?;
    let identity = Identity::from_cert_der(&chain[0])?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TrustError::Pem { path: files.key.clone(), what: e.to_string() })?;

    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .ok_or(TrustError::CannotSign)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build()?;
    let server = |auth: ClientAuth| -> Result<Arc<ServerConfig>, TrustError> {
        let mut v = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
        if auth == ClientAuth::Optional {
            v = v.allow_unauthenticated();
        }
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(v.build()?)
            .with_single_cert(chain.clone(), key.clone_key())?;
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    };
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.clone(), key.clone_key())?;
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut source = ca_pem;
    source.extend_from_slice(&cert_pem);
    source.extend_from_slice(&key_pem);
    Ok(Loaded {
        identity,
        cert_der: chain[0].clone(),
        signer,
        verifier,
        server_required: server(ClientAuth::Required)?,
        server_optional: server(ClientAuth::Optional)?,
        client: Arc::new(client),
        source,
    })
}

impl Tls {
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TrustError> {
        let loaded = build(&files)?;
        Ok(Arc::new(Tls { files, loaded: ArcSwap::from_pointee(loaded) }))
    }

    /// Who this node is, by its own certificate.
    pub fn identity(&self) -> Identity {
        self.loaded.load().identity.clone()
    }

    /// Signs `msg` with this node's key; returns the signature and this
    /// node's certificate (DER), which is what a verifier needs.
    pub fn sign(&self, msg: &[u8]) -> Result<(Vec<u8>, Vec<u8>), TrustError> {
        let l = self.loaded.load();
        let sig = l.signer.sign(msg)?;
        Ok((sig, l.cert_der.to_vec()))
    }

    /// Checks that `cert_der` is a certificate of this cluster's CA and that
    /// its key signed `msg`; returns whose it is. The caller decides what
    /// that identity may vouch for.
    pub fn verify_signed(&self, cert_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<Identity, TrustError> {
        let cert = CertificateDer::from(cert_der.to_vec());
        self.loaded
            .load()
            .verifier
            .verify_client_cert(&cert, &[], rustls::pki_types::UnixTime::now())
            .map_err(|e| TrustError::UntrustedSigner(e.to_string()))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(cert_der).map_err(|e| TrustError::UntrustedSigner(e.to_string()))?;
        let point = &parsed.public_key().subject_public_key.data;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
            .verify(msg, sig)
            .map_err(|_| TrustError::BadSignature)?;
        Identity::from_cert_der(&cert)
    }

    pub fn server_config(&self, auth: ClientAuth) -> Arc<ServerConfig> {
        let l = self.loaded.load();
        match auth {
            ClientAuth::Required => l.server_required.clone(),
            ClientAuth::Optional => l.server_optional.clone(),
        }
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.loaded.load().client.clone()
    }

    /// Rebuilds the configurations if any of the files changed. A file that
    /// is broken (half-written, or a key that does not match) leaves the
    /// current configuration in place and is reported.
    pub fn reload_if_changed(&self) -> Result<bool, TrustError> {
        let mut now = read(&self.files.ca)?;
        now.extend_from_slice(&read(&self.files.cert)?);
        now.extend_from_slice(&read(&self.files.key)?);
        if now == self.loaded.load().source {
            return Ok(false);
        }
        let loaded = build(&self.files)?;
        if loaded.identity != self.loaded.load().identity {
            tracing::warn!(old = %self.loaded.load().identity, new = %loaded.identity, "this node's identity changed");
        }
        self.loaded.store(Arc::new(loaded));
        Ok(true)
    }

    /// Checks the files every `reload_interval_ms` for as long as the
    /// runtime runs.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let tls = Arc::downgrade(self);
        let every = Duration::from_millis(self.files.reload_interval_ms.max(100));
        tokio::spawn(async move {
            let mut last_error = String::new();
            loop {
                tokio::time::sleep(every).await;
                let Some(tls) = tls.upgrade() else { return };
                match tls.reload_if_changed() {
                    Ok(true) => {
                        tracing::info!(identity = %tls.identity(), "reloaded certificates");
                        last_error.clear();
                    }
                    Ok(false) => {}
                    Err(e) => {
                        let e = e.to_string();
                        if e != last_error {
                            tracing::warn!(error = %e, "cannot reload certificates; keeping the current ones");
                            last_error = e;
                        }
                    }
                }
            }
        });
    }

    /// The identity in the leaf of a chain the handshake already verified.
    pub fn peer_identity(chain: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
        Identity::from_cert_der(chain?.first()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{init_ca, issue, CaFiles};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pki {
        dir: tempfile::TempDir,
        ca: CaFiles,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let ca = init_ca(&dir.path().join("ca"), "test", 30).unwrap();
            Pki { dir, ca }
        }
        fn node(&self, name: &str, role: Role, j: Option<&str>) -> Arc<Tls> {
            let out = self.dir.path().join("nodes");
            let issued = issue(&self.ca, &Identity::new(name, role, j).unwrap(), &out, 30).unwrap();
            Tls::load(TlsFiles {
                ca: self.ca.cert.clone(),
                cert: issued.cert,
                key: issued.key,
                reload_interval_ms: 100,
            })
            .unwrap()
        }
    }

    /// Runs one handshake; returns what the server saw of the client, or the
    /// client's error.
    async fn handshake(
        server: &Tls,
        client: Option<Arc<ClientConfig>>,
        expect: &Expect,
    ) -> Result<Option<Identity>, String> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config(ClientAuth::Required));
        let srv = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            let id = Tls::peer_identity(tls.get_ref().1.peer_certificates());
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let Some(cfg) = client else {
            drop(tcp);
            return srv.await.unwrap();
        };
        let connector = tokio_rustls::TlsConnector::from(cfg);
        let mut tls = connector.connect(expect.server_name().unwrap(), tcp).await.map_err(|e| e.to_string())?;
        let id = Tls::peer_identity(tls.get_ref().1.peer_certificates()).unwrap();
        expect.check(&id)?;
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        srv.await.unwrap()
    }

    #[tokio::test]
    async fn both_ends_learn_each_others_identity_from_certificates() {
        let pki = Pki::new();
        let eu = pki.node("eu-west", Role::Region, Some("eu"));
        let us = pki.node("us-east", Role::Region, Some("us"));
        let seen = handshake(&eu, Some(us.client_config()), &Expect::region("eu-west", "eu")).await.unwrap();
        assert_eq!(seen, Some(us.identity()));
    }

    #[tokio::test]
    async fn a_server_in_another_jurisdiction_or_role_is_refused() {
        let pki = Pki::new();
        let us = pki.node("us-east", Role::Region, Some("us"));
        let eu = pki.node("eu-west", Role::Region, Some("eu"));
        // eu-west was told us-east is in the EU: the certificate disagrees.
        let e = handshake(&us, Some(eu.client_config()), &Expect::region("us-east", "eu")).await.unwrap_err();
        assert!(e.contains("issued for \"us\""), "{e}");
        // A server that is not the node the client meant fails the name check.
        let e = handshake(&us, Some(eu.client_config()), &Expect::region("ap-southeast", "sg")).await.unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        let e = handshake(&us, Some(eu.client_config()), &Expect::new("us-east", Role::Edge)).await.unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
    }

    #[tokio::test]
    async fn no_certificate_or_another_cas_certificate_fails_the_handshake() {
        let pki = Pki::new();
        let eu = pki.node("eu-west", Role::Region, Some("eu"));
        let expect = Expect::region("eu-west", "eu");
        // A client without a certificate.
        let mut roots = RootCertStore::empty();
        for c in certs(&pki.ca.cert, &std::fs::read(&pki.ca.cert).unwrap()).unwrap() {
            roots.add(c).unwrap();
        }
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        assert!(handshake(&eu, Some(Arc::new(anonymous)), &expect).await.is_err());
        // A client from another cluster, whose certificate claims the same name.
        let other = Pki::new();
        let impostor = other.node("us-east", Role::Region, Some("us"));
        assert!(handshake(&eu, Some(impostor.client_config()), &expect).await.is_err());
        // No TLS at all.
        assert!(handshake(&eu, None, &expect).await.is_err());
    }

    #[tokio::test]
    async fn a_reissued_certificate_is_picked_up_without_a_restart() {
        let pki = Pki::new();
        let eu = pki.node("eu-west", Role::Region, Some("eu"));
        let before = eu.client_config();
        assert!(!eu.reload_if_changed().unwrap());
        // A half-written key leaves the working configuration in place.
        let key = pki.dir.path().join("nodes/eu-west.key");
        let good = std::fs::read(&key).unwrap();
        std::fs::write(&key, b"-----BEGIN PRIVATE KEY-----\ngarbage").unwrap();
        assert!(eu.reload_if_changed().is_err());
        assert!(Arc::ptr_eq(&before, &eu.client_config()));
        std::fs::write(&key, good).unwrap();
        // Reissue: new key and certificate.
        issue(&pki.ca, &eu.identity(), &pki.dir.path().join("nodes"), 30).unwrap();
        assert!(eu.reload_if_changed().unwrap());
        assert!(!Arc::ptr_eq(&before, &eu.client_config()));
        let us = pki.node("us-east", Role::Region, Some("us"));
        assert_eq!(
            handshake(&us, Some(eu.client_config()), &Expect::region("us-east", "us")).await.unwrap(),
            Some(eu.identity())
        );
    }

    #[test]
    fn a_signature_names_its_signer_and_binds_the_message() {
        let pki = Pki::new();
        let control = pki.node("control", Role::Control, None);
        let region = pki.node("eu-west", Role::Region, Some("eu"));
        let (sig, cert) = control.sign(b"artifact digest").unwrap();
        let who = region.verify_signed(&cert, b"artifact digest", &sig).unwrap();
        assert_eq!((who.name.as_str(), who.role), ("control", Role::Control));
        assert!(matches!(region.verify_signed(&cert, b"another digest", &sig), Err(TrustError::BadSignature)));
        // A signer whose certificate another CA issued is nobody here.
        let other = Pki::new();
        let stranger = other.node("control", Role::Control, None);
        let (sig, cert) = stranger.sign(b"artifact digest").unwrap();
        assert!(matches!(region.verify_signed(&cert, b"artifact digest", &sig), Err(TrustError::UntrustedSigner(_))));
    }
}
