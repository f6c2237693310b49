//! Content-addressed version identifiers.

use std::fmt;
use std::str::FromStr;

/// The identity of an immutable app version: the SHA-256 of its canonical
/// bundle listing, hex encoded. Two bundles with the same files have the same
/// id; any change to any file gives a new one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VersionId(String);

#[derive(Debug, thiserror::Error)]
#[error("invalid version id {0:?}: expected 64 lowercase hex characters")]
pub struct InvalidVersionId(String);

impl VersionId {
    pub fn from_digest(digest: [u8; 32]) -> Self {
        VersionId(hex::encode(digest))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits: what humans and the `x-meridian-version`
    /// header see. 48 bits make an accidental collision between the versions
    /// of one app practically impossible.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }

    /// Whether `s` names this version: its full id or its short form (what
    /// headers, cookies and the CLI show).
    pub fn is_named(&self, s: &str) -> bool {
        s == self.0 || s == self.short()
    }
}

impl FromStr for VersionId {
    type Err = InvalidVersionId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(VersionId(s.to_string()))
        } else {
            Err(InvalidVersionId(s.to_string()))
        }
    }
}

impl TryFrom<String> for VersionId {
    type Error = InvalidVersionId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<VersionId> for String {
    fn from(v: VersionId) -> String {
        v.0
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VersionId({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_full_lowercase_hex() {
        let ok = "a".repeat(64);
        assert_eq!(ok.parse::<VersionId>().unwrap().short(), "aaaaaaaaaaaa");
        assert!("A".repeat(64).parse::<VersionId>().is_err());
        assert!("a".repeat(63).parse::<VersionId>().is_err());
        assert!("../etc/passwd".parse::<VersionId>().is_err());
    }
}
