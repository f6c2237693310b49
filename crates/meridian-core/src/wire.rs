//! JSON bodies exchanged between roles, defined once so the producer and
//! every consumer agree.

use crate::VersionId;

/// `GET /_meridian/status` of a region node.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RegionStatus {
    pub region: String,
    pub active: Option<VersionId>,
    /// Versions loaded in memory, ready to activate at once.
    pub installed: Vec<VersionId>,
}
