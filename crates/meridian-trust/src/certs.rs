//! Making the cluster CA and issuing node certificates (`meridian certs`).

use crate::identity::Identity;
use crate::Role;
use crate::TrustError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use std::path::{Path, PathBuf};

/// Where a CA's certificate and private key are.
#[derive(Clone, Debug)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The world's shared secret (causality tokens): 32 random bytes, hex.
    /// Regions need it; nothing else does.
    pub cluster_key: PathBuf,
}

impl CaFiles {
    /// `ca.pem`, `ca.key` and `cluster.key` in `dir`.
    pub fn in_dir(dir: &Path) -> CaFiles {
        CaFiles { cert: dir.join("ca.pem"), key: dir.join("ca.key"), cluster_key: dir.join("cluster.key") }
    }
}

fn new_cluster_key(path: &Path) -> Result<(), TrustError> {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    write(path, format!("{hex}\n").as_bytes(), true)
}

/// A certificate and key written by [`issue`].
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub identity: Identity,
}

fn serial() -> SerialNumber {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that disagree a little.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days as i64);
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TrustError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| TrustError::Write { path: dir.to_path_buf(), source })?;
    }
    let r = if secret {
        meridian_core::fs::write_secret(path, bytes)
    } else {
        meridian_core::fs::write_atomic(path, bytes)
    };
    r.map_err(|source| TrustError::Write { path: path.to_path_buf(), source })
}

fn read(path: &Path) -> Result<String, TrustError> {
    std::fs::read_to_string(path).map_err(|source| TrustError::Read { path: path.to_path_buf(), source })
}

/// A new CA named `name` that signs leaves only (never another CA), its
/// key written with mode 0600.
fn self_signed_ca(name: &str, days: u32, cert_path: &Path, key_path: &Path) -> Result<(), TrustError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationName, "Meridian");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(serial());
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    write(key_path, key.serialize_pem().as_bytes(), true)?;
    write(cert_path, cert.pem().as_bytes(), false)
}

/// Creates a new cluster CA in `dir` (`ca.pem`, and `ca.key` with mode 0600).
/// Refuses to overwrite an existing one: every node certificate depends on it.
pub fn init_ca(dir: &Path, cluster: &str, days: u32) -> Result<CaFiles, TrustError> {
    let files = CaFiles::in_dir(dir);
    for p in [&files.cert, &files.key, &files.cluster_key] {
        if p.exists() {
            return Err(TrustError::Exists { path: p.clone() });
        }
    }
    self_signed_ca(&format!("Meridian cluster CA ({cluster})"), days, &files.cert, &files.key)?;
    new_cluster_key(&files.cluster_key)?;
    Ok(files)
}

/// The CA in `dir`, created if there is none yet (what `meridian dev` and
/// tests use: a world keeps its CA across restarts).
pub fn ensure_ca(dir: &Path, cluster: &str, days: u32) -> Result<CaFiles, TrustError> {
    let files = CaFiles::in_dir(dir);
    if files.cert.exists() && files.key.exists() {
        if !files.cluster_key.exists() {
            new_cluster_key(&files.cluster_key)?;
        }
        return Ok(files);
    }
    init_ca(dir, cluster, days)
}

/// Issues a certificate for `identity`, signed by the CA, into `out_dir` as
/// `<name>.pem` and `<name>.key` (mode 0600). The certificate is valid for
/// both ends of a connection (server and client authentication).
pub fn issue(ca: &CaFiles, identity: &Identity, out_dir: &Path, days: u32) -> Result<Issued, TrustError> {
    let ca_key_pem = read(&ca.key)?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).map_err(|e| TrustError::Pem { path: ca.key.clone(), what: e.to_string() })?;
    let ca_cert_pem = read(&ca.cert)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)
        .map_err(|e| TrustError::Pem { path: ca.cert.clone(), what: e.to_string() })?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, identity.name.clone());
    params.distinguished_name.push(DnType::OrganizationalUnitName, identity.role.as_str());
    params.subject_alt_names =
        vec![SanType::DnsName(identity.dns_name().try_into()?), SanType::URI(identity.uri().try_into()?)];
    // Control nodes also answer to the control plane's service name, so an
    // operator can reach whichever of them is up without knowing its name.
    if identity.role == Role::Control {
        params.subject_alt_names.push(SanType::DnsName(crate::identity::service_dns_name(Role::Control).try_into()?));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial());
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    let issued = Issued {
        cert: out_dir.join(format!("{}.pem", identity.name)),
        key: out_dir.join(format!("{}.key", identity.name)),
        identity: identity.clone(),
    };
    // Key first: a reloading node that sees the new certificate must find
    // its key already in place.
    write(&issued.key, key.serialize_pem().as_bytes(), true)?;
    write(&issued.cert, cert.pem().as_bytes(), false)?;
    Ok(issued)
}

/// A CA for the certificates users see (an edge's HTTPS), apart from the
/// cluster CA: trusting it in a browser must not let anyone mint node
/// certificates. `meridian dev` makes one per world (`public-ca.pem`,
/// `public-ca.key` in `dir`).
pub fn ensure_public_ca(dir: &Path, world: &str, days: u32) -> Result<(PathBuf, PathBuf), TrustError> {
    let (cert_path, key_path) = (dir.join("public-ca.pem"), dir.join("public-ca.key"));
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    self_signed_ca(&format!("Meridian public CA ({world})"), days, &cert_path, &key_path)?;
    Ok((cert_path, key_path))
}

/// Issues a server certificate for the DNS names `hosts`, signed by the
/// public CA (`ca_cert`, `ca_key`), as `<stem>.pem` and `<stem>.key` in
/// `out_dir`.
pub fn issue_site(
    ca_cert: &Path,
    ca_key: &Path,
    hosts: &[String],
    out_dir: &Path,
    stem: &str,
    days: u32,
) -> Result<(PathBuf, PathBuf), TrustError> {
    let ca_key_pem = read(ca_key)?;
    let ca_keypair = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| TrustError::Pem { path: ca_key.to_path_buf(), what: e.to_string() })?;
    let issuer = Issuer::from_ca_cert_pem(&read(ca_cert)?, ca_keypair)
        .map_err(|e| TrustError::Pem { path: ca_cert.to_path_buf(), what: e.to_string() })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, hosts.first().cloned().unwrap_or_default());
    for h in hosts {
        params.subject_alt_names.push(SanType::DnsName(h.clone().try_into()?));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial());
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (out_dir.join(format!("{stem}.pem")), out_dir.join(format!("{stem}.key")));
    write(&key_path, key.serialize_pem().as_bytes(), true)?;
    write(&cert_path, cert.pem().as_bytes(), false)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issued_certificates_carry_the_identity_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path(), "test", 30).unwrap();
        assert!(matches!(init_ca(dir.path(), "test", 30), Err(TrustError::Exists { .. })));
        let id = Identity::new("eu-west", Role::Region, Some("eu")).unwrap();
        let issued = issue(&ca, &id, &dir.path().join("nodes"), 30).unwrap();
        for key in [&ca.key, &ca.cluster_key, &issued.key] {
            assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600, "{}", key.display());
        }
        let pem = std::fs::read(&issued.cert).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
            .map(|c: rustls::pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);
    }
}
