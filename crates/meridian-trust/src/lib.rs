//! The cluster's trust boundary.
//!
//! A world has one certificate authority (`meridian certs init`). Every node
//! holds a certificate from it (`meridian certs issue`) that says who the node
//! is: its **name**, its **role** (region, edge, control, operator) and, for a
//! region, its **jurisdiction**. Nodes talk to each other only over mutual TLS
//! with these certificates, and everything a node decides about a peer —
//! may it call replication, may it receive an EU namespace — comes from the
//! peer's verified certificate, never from a header or a message field. A
//! node cannot claim a jurisdiction it was not issued.
//!
//! The identity travels in the certificate as a SPIFFE-style URI subject
//! alternative name, `spiffe://meridian/<role>/<name>[/jurisdiction/<j>]`,
//! plus a DNS name `<name>.<role>.meridian` that clients verify as the server
//! name, so the standard WebPKI hostname check already pins name and role.
//!
//! [`Tls`] holds a node's live rustls configurations and reloads them when
//! the certificate, key or CA files change on disk, without a restart.

mod certs;
mod identity;
mod tls;

pub use certs::{ensure_ca, ensure_public_ca, init_ca, issue, issue_site, CaFiles, Issued};
pub use identity::{Identity, Role};
pub use tls::{ClientAuth, Expect, Tls, TlsFiles};

/// Everything that can go wrong with certificates and keys. None of these is
/// worth retrying without someone changing a file.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read {path}: {source}")]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: std::path::PathBuf, source: std::io::Error },
    #[error("{path} already exists; refusing to overwrite a cluster CA (delete it first if you mean to start over)")]
    Exists { path: std::path::PathBuf },
    #[error("{path}: {what}")]
    Pem { path: std::path::PathBuf, what: String },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid CA for client verification: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the certificate carries no Meridian identity: {0}")]
    NoIdentity(String),
    #[error("invalid node name {0:?}: lowercase letters, digits and '-', at most 32 characters")]
    BadName(String),
    #[error("a region certificate needs a jurisdiction (--jurisdiction eu)")]
    MissingJurisdiction,
    #[error("only region certificates carry a jurisdiction")]
    UnexpectedJurisdiction,
    #[error("this node's key cannot sign with ECDSA P-256")]
    CannotSign,
    #[error("the signer's certificate is not from this cluster's CA: {0}")]
    UntrustedSigner(String),
    #[error("the signature does not verify")]
    BadSignature,
}
