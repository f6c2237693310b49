//! Who a node is, as its certificate says.

use crate::TrustError;
use meridian_core::topology::is_valid_name;

/// What a node may do in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Hosts functions and data; replicates with other regions.
    Region,
    /// Routes user traffic to regions.
    Edge,
    /// The control plane: installs and activates versions on regions.
    Control,
    /// A person or script operating the world (the CLI).
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Region => "region",
            Role::Edge => "edge",
            Role::Control => "control",
            Role::Operator => "operator",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "region" => Ok(Role::Region),
            "edge" => Ok(Role::Edge),
            "control" => Ok(Role::Control),
            "operator" => Ok(Role::Operator),
            _ => Err(format!("unknown role {s:?}: region, edge, control or operator")),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's verified identity. Only [`Identity::from_cert_der`] (on a
/// certificate that passed chain verification) and the issuer create one
/// that is acted upon.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    /// Set for regions, and only for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<String>,
}

const SCHEME: &str = "spiffe://meridian/";
const DNS_SUFFIX: &str = "meridian";

impl Identity {
    pub fn new(name: &str, role: Role, jurisdiction: Option<&str>) -> Result<Identity, TrustError> {
        if !is_valid_name(name) {
            return Err(TrustError::BadName(name.to_string()));
        }
        match (role, jurisdiction) {
            (Role::Region, None) => return Err(TrustError::MissingJurisdiction),
            (Role::Region, Some(j)) if !is_valid_name(j) => return Err(TrustError::BadName(j.to_string())),
            (Role::Edge | Role::Control | Role::Operator, Some(_)) => return Err(TrustError::UnexpectedJurisdiction),
            _ => {}
        }
        Ok(Identity { name: name.to_string(), role, jurisdiction: jurisdiction.map(str::to_string) })
    }

    /// The URI subject alternative name that carries the identity.
    pub fn uri(&self) -> String {
        match &self.jurisdiction {
            Some(j) => format!("{SCHEME}{}/{}/jurisdiction/{j}", self.role, self.name),
            None => format!("{SCHEME}{}/{}", self.role, self.name),
        }
    }

    /// The DNS name a client verifies as the server name.
    pub fn dns_name(&self) -> String {
        dns_name(&self.name, self.role)
    }

    fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(SCHEME)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (role, name, jurisdiction) = match parts.as_slice() {
            [role, name] => (role.parse().ok()?, *name, None),
            [role, name, "jurisdiction", j] => (role.parse().ok()?, *name, Some(*j)),
            _ => return None,
        };
        Identity::new(name, role, jurisdiction).ok()
    }

    /// Reads the identity out of a DER certificate. The caller must have
    /// verified the certificate's chain: this only parses.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, TrustError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| TrustError::NoIdentity(format!("not X.509: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| TrustError::NoIdentity(e.to_string()))?
            .ok_or_else(|| TrustError::NoIdentity("no subject alternative names".into()))?;
        let mut found = None;
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                if u.starts_with(SCHEME) {
                    if found.is_some() {
                        return Err(TrustError::NoIdentity("more than one Meridian identity".into()));
                    }
                    found =
                        Some(Identity::from_uri(u).ok_or_else(|| TrustError::NoIdentity(format!("malformed {u}")))?);
                }
            }
        }
        found.ok_or_else(|| TrustError::NoIdentity("no spiffe://meridian/ URI".into()))
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.jurisdiction {
            Some(j) => write!(f, "{} {} [{j}]", self.role, self.name),
            None => write!(f, "{} {}", self.role, self.name),
        }
    }
}

/// `<name>.<role>.meridian`.
pub fn dns_name(name: &str, role: Role) -> String {
    format!("{name}.{role}.{DNS_SUFFIX}")
}

/// `<role>.meridian`: any node of a role that serves as one service (the
/// control plane's nodes).
pub fn service_dns_name(role: Role) -> String {
    format!("{role}.{DNS_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_malformed_ones_are_refused() {
        for id in [
            Identity::new("eu-west", Role::Region, Some("eu")).unwrap(),
            Identity::new("edge-fra", Role::Edge, None).unwrap(),
            Identity::new("control", Role::Control, None).unwrap(),
        ] {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        }
        for bad in [
            "spiffe://meridian/region/eu-west",            // a region without jurisdiction
            "spiffe://meridian/edge/e/jurisdiction/eu",    // an edge with one
            "spiffe://meridian/king/eu-west",              // no such role
            "spiffe://meridian/region/EU/jurisdiction/eu", // invalid name
            "spiffe://other/region/eu-west/jurisdiction/eu",
            "spiffe://meridian/region/a/b/c/d/e",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }
}
