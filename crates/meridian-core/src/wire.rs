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

/// A region another region replicates with, reached through `url` (in a dev
/// world, the emulated link between the two).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    pub name: String,
    pub url: String,
    pub jurisdiction: String,
    /// Expected round trip, used to pick the nearest peer to forward to.
    #[serde(default)]
    pub rtt_ms: f64,
}

/// Replication towards one peer, as the sending region sees it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeerReplication {
    pub peer: String,
    /// Last sequence of our log the peer acknowledged.
    pub acked_seq: u64,
    /// Our log entries the peer has not acknowledged yet.
    pub pending: u64,
    pub pushes: u64,
    pub push_errors: u64,
    pub snapshots_sent: u64,
    /// Records repaired here by anti-entropy against this peer.
    pub repaired: u64,
    pub last_error: Option<String>,
}

/// What this region has applied of another region's writes.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OriginReplication {
    pub origin: String,
    pub incarnation: u64,
    pub applied_seq: u64,
    pub applied_records: u64,
    /// Replication lag (applied here minus written there) of recent records.
    pub lag_ms_p50: Option<f64>,
    pub lag_ms_p99: Option<f64>,
    pub lag_samples: u64,
}

/// `GET /_meridian/kv/status` of a region node.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KvStatus {
    pub region: String,
    pub incarnation: u64,
    pub last_seq: u64,
    pub log_len: u64,
    pub conflicts: u64,
    pub commits: u64,
    pub peers: Vec<PeerReplication>,
    pub origins: Vec<OriginReplication>,
    /// Replication messages refused (corrupt, wrong version, residency).
    pub rejected_messages: u64,
    /// Tombstones stored here, and collected since start.
    pub tombstones: u64,
    pub tombstones_collected: u64,
    /// Wall-clock ms up to which every region has applied every write
    /// (tombstones older than this are collected).
    pub stable_ms: u64,
    /// Raft groups of `strong` namespaces this region is a member of.
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
}

/// One Raft group of a `strong` namespace, as a member sees it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupStatus {
    pub ns: String,
    pub node_id: u64,
    /// Leader, Follower, Candidate or Learner.
    pub state: String,
    pub term: u64,
    pub leader: Option<String>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
}
