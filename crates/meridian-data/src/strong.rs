//! `strong` namespaces: linearizable key-value data replicated by Raft
//! (openraft) across the regions the manifest lists.
//!
//! One Raft group per namespace. Node ids are positions in the namespace's
//! `regions` list (+1), so every region derives the same membership from the
//! same manifest; a node's address is its region name, which each region
//! resolves to its own link to that peer. The log, the vote and the state
//! machine live in one redb database per group (`DATA_DIR/raft/NS.redb`;
//! the log is meridian-raft's, shared with the control plane), every append
//! fsynced before it is acknowledged.
//!
//! Writes go through the leader's log (a follower forwards the operation to
//! the leader's region); reads are linearizable: the leader confirms it
//! still leads with a quorum (`ensure_linearizable`) and reads its applied
//! state. A region outside the group forwards operations to the nearest
//! member, which does the same.

// The storage traits dictate openraft's (large) error type.
#![allow(clippy::result_large_err)]

use crate::kv::{KvService, OpResult};
use bytes::Bytes;
use http::{Method, StatusCode};
use meridian_core::wire::Peer;
use meridian_http::{json, text, Body};
use meridian_raft::{dec, enc, io, rpc, RedbLog, META};
use openraft::error::{ClientWriteError, Infallible, InstallSnapshotError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A command in a group's log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    Set {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    Increment {
        key: String,
        delta: i64,
    },
    /// Writes if the key's version (log index of its last write; 0 if
    /// absent) is `expected`.
    Swap {
        key: String,
        expected: u64,
        value: Vec<u8>,
    },
}

/// What a command returns.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommandResult {
    pub total: Option<i64>,
    pub swapped: Option<bool>,
    /// For a failed swap: the current value and version.
    pub current: Option<Vec<u8>>,
    pub version: u64,
    /// An increment that would have left the i64 range (nothing changed).
    #[serde(default)]
    pub overflow: bool,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = CommandResult,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;

/// A value in the state machine.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Stored {
    Bytes(Vec<u8>),
    Counter(i64),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Versioned {
    pub value: Stored,
    pub version: u64,
}

impl Versioned {
    pub fn visible(&self) -> Vec<u8> {
        match &self.value {
            Stored::Bytes(b) => b.clone(),
            Stored::Counter(n) => n.to_string().into_bytes(),
        }
    }
}

const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("sm");

type SnapshotBytes = (SnapshotMeta<NodeId, BasicNode>, Vec<u8>);

/// The durable state of one group: its log (and vote) and its state
/// machine, in one database.
#[derive(Clone)]
pub struct GroupStore {
    db: Arc<Database>,
    log: RedbLog<TypeConfig>,
    /// The latest snapshot built or installed (rebuilt from the state
    /// machine on demand after a restart).
    snapshot: Arc<Mutex<Option<SnapshotBytes>>>,
}

impl GroupStore {
    pub fn open(path: &Path) -> Result<GroupStore, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let db = Arc::new(Database::create(path).map_err(|e| e.to_string())?);
        let log = RedbLog::new(db.clone()).map_err(|e| e.to_string())?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(SM).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        Ok(GroupStore { db, log, snapshot: Default::default() })
    }

    /// A key's current value (linearizable only after `ensure_linearizable`).
    pub fn read(&self, key: &str) -> Result<Option<Versioned>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let t = txn.open_table(SM).map_err(|e| e.to_string())?;
        let v = t.get(key).map_err(|e| e.to_string())?;
        v.map(|v| serde_json::from_slice(v.value()).map_err(|e| e.to_string())).transpose()
    }

    /// Live keys after `after`, at most `limit`.
    pub fn keys(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let t = txn.open_table(SM).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let range = match after {
            Some(a) => t.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => t.range::<&str>(..),
        }
        .map_err(|e| e.to_string())?;
        for e in range.take(limit) {
            out.push(e.map_err(|e| e.to_string())?.0.value().to_string());
        }
        Ok(out)
    }

    fn sm_dump(&self) -> Result<BTreeMap<String, Versioned>, StorageError<NodeId>> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(SM).map_err(io)?;
        let mut out = BTreeMap::new();
        for e in t.iter().map_err(io)? {
            let (k, v) = e.map_err(io)?;
            out.insert(k.value().to_string(), dec(v.value())?);
        }
        Ok(out)
    }
}

fn apply_command(
    t: &mut redb::Table<&str, &[u8]>,
    cmd: &Command,
    index: u64,
) -> Result<CommandResult, StorageError<NodeId>> {
    let read = |t: &redb::Table<&str, &[u8]>, k: &str| -> Result<Option<Versioned>, StorageError<NodeId>> {
        let v = t.get(k).map_err(io)?;
        v.map(|v| dec(v.value())).transpose()
    };
    let mut r = CommandResult { version: index, ..Default::default() };
    match cmd {
        Command::Set { key, value } => {
            let v = Versioned { value: Stored::Bytes(value.clone()), version: index };
            t.insert(key.as_str(), enc(&v)?.as_slice()).map_err(io)?;
        }
        Command::Delete { key } => {
            t.remove(key.as_str()).map_err(io)?;
        }
        Command::Increment { key, delta } => {
            let total = match read(t, key)?.map(|v| v.value) {
                Some(Stored::Counter(n)) => match n.checked_add(*delta) {
                    Some(t) => t,
                    // Refused, deterministically on every member: the
                    // command applies as a no-op and says why.
                    None => {
                        r.overflow = true;
                        return Ok(r);
                    }
                },
                None => *delta,
                // A value is not a counter: the command is a no-op, reported.
                Some(Stored::Bytes(_)) => {
                    r.total = None;
                    r.swapped = Some(false);
                    return Ok(r);
                }
            };
            let v = Versioned { value: Stored::Counter(total), version: index };
            t.insert(key.as_str(), enc(&v)?.as_slice()).map_err(io)?;
            r.total = Some(total);
        }
        Command::Swap { key, expected, value } => {
            let cur = read(t, key)?;
            let cur_version = cur.as_ref().map(|v| v.version).unwrap_or(0);
            if cur_version == *expected {
                let v = Versioned { value: Stored::Bytes(value.clone()), version: index };
                t.insert(key.as_str(), enc(&v)?.as_slice()).map_err(io)?;
                r.swapped = Some(true);
            } else {
                r.swapped = Some(false);
                r.current = cur.as_ref().map(|v| v.visible());
                r.version = cur_version;
            }
        }
    }
    Ok(r)
}

impl RaftStateMachine<TypeConfig> for GroupStore {
    type SnapshotBuilder = GroupStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>> {
        let applied = self.log.meta_get::<Option<LogId<NodeId>>>("applied")?.flatten();
        let membership = self.log.meta_get("membership")?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let txn = self.db.begin_write().map_err(io)?;
        let mut out = Vec::new();
        {
            let mut sm = txn.open_table(SM).map_err(io)?;
            let mut meta = txn.open_table(META).map_err(io)?;
            let mut last = None;
            for e in entries {
                last = Some(e.log_id);
                match &e.payload {
                    EntryPayload::Blank => out.push(CommandResult::default()),
                    EntryPayload::Normal(cmd) => out.push(apply_command(&mut sm, cmd, e.log_id.index)?),
                    EntryPayload::Membership(m) => {
                        let sm_ = StoredMembership::new(Some(e.log_id), m.clone());
                        meta.insert("membership", enc(&sm_)?.as_slice()).map_err(io)?;
                        out.push(CommandResult::default());
                    }
                }
            }
            if let Some(l) = last {
                meta.insert("applied", enc(&Some(l))?.as_slice()).map_err(io)?;
            }
        }
        txn.commit().map_err(io)?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let state: BTreeMap<String, Versioned> = dec(&data)?;
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut sm = txn.open_table(SM).map_err(io)?;
            sm.retain(|_, _| false).map_err(io)?;
            for (k, v) in &state {
                sm.insert(k.as_str(), enc(v)?.as_slice()).map_err(io)?;
            }
            let mut m = txn.open_table(META).map_err(io)?;
            m.insert("applied", enc(&meta.last_log_id)?.as_slice()).map_err(io)?;
            m.insert("membership", enc(&meta.last_membership)?.as_slice()).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        *self.snapshot.lock().unwrap() = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self
            .snapshot
            .lock()
            .unwrap()
            .clone()
            .map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for GroupStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // The state machine and its applied position, read in one snapshot
        // of the database.
        let (applied, membership) = self.applied_state().await?;
        let data = enc(&self.sm_dump()?)?;
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id: format!("{}-{}", applied.map(|l| l.index).unwrap_or(0), data.len()),
        };
        *self.snapshot.lock().unwrap() = Some((meta.clone(), data.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

/// Reaches the other members of a group through this region's peers.
#[derive(Clone)]
pub struct Network {
    pub ns: String,
    pub svc: Arc<KvService>,
}

pub struct Connection {
    ns: String,
    svc: Arc<KvService>,
    target: NodeId,
    region: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        Connection { ns: self.ns.clone(), svc: self.svc.clone(), target, region: node.addr.clone() }
    }
}

impl Connection {
    async fn rpc<Req, Resp, E>(&self, what: &str, req: &Req, timeout: Duration) -> Result<Resp, rpc::Error<E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let peer = self.svc.peers.load().iter().find(|p| p.name == self.region).cloned();
        let Some(peer) = peer else {
            return Err(rpc::unreachable(format!("no link to {}", self.region)));
        };
        let body = serde_json::to_vec(req).map_err(rpc::encoding)?;
        let path = self.svc.api(&format!("raft/{}/{what}", self.ns));
        let target = self.svc.target(&peer).map_err(|e| rpc::unreachable(e.to_string()))?;
        let a = self
            .svc
            .cluster
            .call(&target, Method::POST, &path, body.into(), timeout)
            .await
            .map_err(|e| rpc::unreachable(e.to_string()))?;
        rpc::answer(self.target, &self.region, a.status.as_u16(), &a.body)
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, rpc::Error<Infallible>> {
        self.rpc("append", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, rpc::Error<InstallSnapshotError>> {
        self.rpc("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, rpc::Error<Infallible>> {
        self.rpc("vote", &rpc, option.hard_ttl()).await
    }
}

/// A running group of a strong namespace.
pub struct Group {
    pub ns: String,
    pub raft: Raft,
    pub store: GroupStore,
    pub node_id: NodeId,
    /// Member regions by node id.
    pub members: BTreeMap<NodeId, String>,
    pub preferred_leader: Option<String>,
}

/// Raft timing for regions a WAN apart. openraft 0.9 also uses the
/// heartbeat interval as the timeout of each AppendEntries, so it must
/// exceed the longest round trip between members, including a new
/// connection's handshake (2 x 213 ms in the default world); the election
/// timeout is several heartbeats.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "meridian".into(),
        heartbeat_interval: 500,
        election_timeout_min: 2000,
        election_timeout_max: 3000,
        max_payload_entries: 500,
        ..Default::default()
    }
}

impl Group {
    pub async fn start(
        svc: Arc<KvService>,
        data_dir: &Path,
        ns: &str,
        regions: &[String],
        leader: Option<String>,
    ) -> Result<Arc<Group>, String> {
        let members: BTreeMap<NodeId, String> =
            regions.iter().enumerate().map(|(i, r)| (i as NodeId + 1, r.clone())).collect();
        let node_id = *members
            .iter()
            .find(|(_, r)| **r == svc.region)
            .ok_or_else(|| format!("{} is not a member of {ns}", svc.region))?
            .0;
        let store = GroupStore::open(&data_dir.join("raft").join(format!("{ns}.redb")))?;
        let config = Arc::new(raft_config().validate().map_err(|e| e.to_string())?);
        let network = Network { ns: ns.to_string(), svc: svc.clone() };
        let raft =
            Raft::new(node_id, config, network, store.log.clone(), store.clone()).await.map_err(|e| e.to_string())?;
        let group = Arc::new(Group {
            ns: ns.to_string(),
            raft,
            store,
            node_id,
            members: members.clone(),
            preferred_leader: leader,
        });
        // Leader placement: the preferred region (or the first listed)
        // forms the group at once and so becomes its first leader. The
        // others form it only if, after a while, nobody has contacted them
        // (the preferred region is down): proposing the same membership on
        // several nodes is safe, and a node that joined already refuses.
        let first = group.preferred_leader.clone().or_else(|| members.values().next().cloned());
        let delay =
            if first.as_deref() == Some(svc.region.as_str()) { Duration::ZERO } else { Duration::from_secs(15) };
        let g = group.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if g.raft.is_initialized().await.unwrap_or(true) {
                return;
            }
            let nodes: BTreeMap<NodeId, BasicNode> =
                g.members.iter().map(|(id, r)| (*id, BasicNode { addr: r.clone() })).collect();
            if let Err(e) = g.raft.initialize(nodes).await {
                tracing::debug!(ns = %g.ns, error = %e, "raft group already initialized");
            }
        });
        Ok(group)
    }

    pub fn leader_region(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader.and_then(|id| self.members.get(&id).cloned())
    }
}

/// Runs an operation of a strong namespace: here if this region leads the
/// group, else at the leader's region (or, from a region outside the
/// group, at the nearest member).
pub async fn execute(svc: &KvService, ns: &str, op: &crate::kv::Op, hops: u8) -> Result<OpResult, String> {
    let group = svc.groups.lock().unwrap().get(ns).cloned();
    let mut r = OpResult { region: svc.region.clone(), ..Default::default() };
    let Some(group) = group else {
        // Not a member: the nearest member forwards to its leader.
        let nss = svc.namespaces.load();
        let Some(meridian_manifest::Namespace { mode: meridian_manifest::KvMode::Strong { regions, .. }, .. }) =
            nss.get(ns)
        else {
            return Err(format!("{ns:?} is not a strong namespace here"));
        };
        let mut peers: Vec<Peer> = svc.peers.load().iter().filter(|p| regions.contains(&p.name)).cloned().collect();
        peers.sort_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms));
        return forward_any(svc, &peers, ns, op, hops).await;
    };
    use crate::kv::Op;
    let cmd = match op {
        Op::Get { key, .. } | Op::ReadVersioned { key, .. } => match group.raft.ensure_linearizable().await {
            Ok(_) => {
                let v = group.store.read(key)?;
                r.value_hex = v.as_ref().map(|v| hex::encode(v.visible()));
                if matches!(op, Op::ReadVersioned { .. }) {
                    r.version_hex = Some(hex::encode(v.map(|v| v.version).unwrap_or(0).to_le_bytes()));
                }
                return Ok(r);
            }
            Err(e) => return to_leader(svc, &group, ns, op, hops, e.to_string()).await,
        },
        Op::List { cursor, limit, .. } => match group.raft.ensure_linearizable().await {
            Ok(_) => {
                let limit = limit.unwrap_or(meridian_core::kv::LIST_PAGE).clamp(1, 10_000);
                let keys = group.store.keys(cursor.as_deref(), limit + 1)?;
                let more = keys.len() > limit;
                r.keys = keys.into_iter().take(limit).collect();
                r.cursor = if more { r.keys.last().cloned() } else { None };
                return Ok(r);
            }
            Err(e) => return to_leader(svc, &group, ns, op, hops, e.to_string()).await,
        },
        Op::Set { key, value_hex, .. } => {
            Command::Set { key: key.clone(), value: hex::decode(value_hex).map_err(|e| e.to_string())? }
        }
        Op::SetMany { .. } => {
            return Err(
                "a strong namespace takes one write at a time (each is a consensus round); set keys one by one".into()
            )
        }
        Op::Delete { key, .. } => Command::Delete { key: key.clone() },
        Op::Increment { key, delta, .. } => Command::Increment { key: key.clone(), delta: *delta },
        Op::Swap { key, version_hex, value_hex, .. } => {
            let v = hex::decode(version_hex).map_err(|e| e.to_string())?;
            let expected = match v.len() {
                0 => 0,
                8 => u64::from_le_bytes(v.try_into().expect("8 bytes")),
                _ => return Err("not a version of a strong namespace".into()),
            };
            Command::Swap { key: key.clone(), expected, value: hex::decode(value_hex).map_err(|e| e.to_string())? }
        }
    };
    match group.raft.client_write(cmd).await {
        Ok(resp) => {
            let d = resp.data;
            if d.overflow {
                return Err("the counter would leave the range of a 64-bit signed integer; nothing was changed".into());
            }
            if matches!(op, Op::Increment { .. }) && d.total.is_none() {
                return Err("the key holds a value, not a counter".into());
            }
            r.total = d.total;
            r.swapped = d.swapped;
            if d.swapped == Some(false) {
                r.value_hex = d.current.map(hex::encode);
                r.version_hex = Some(hex::encode(d.version.to_le_bytes()));
            }
            Ok(r)
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) | Err(RaftError::Fatal(_)) => {
            to_leader(svc, &group, ns, op, hops, "not the leader".into()).await
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn to_leader(
    svc: &KvService,
    group: &Group,
    ns: &str,
    op: &crate::kv::Op,
    hops: u8,
    why: String,
) -> Result<OpResult, String> {
    // Wait (briefly) for an election if there is no leader yet.
    let mut leader = group.leader_region();
    for _ in 0..40 {
        if leader.as_ref().is_some_and(|l| *l != svc.region) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        leader = group.leader_region();
    }
    match leader {
        Some(l) if l != svc.region => {
            let peer = svc.peers.load().iter().find(|p| p.name == l).cloned();
            match peer {
                Some(p) => forward_any(svc, &[p], ns, op, hops).await,
                None => Err(format!("no link to the leader {l}")),
            }
        }
        _ => Err(format!("no leader for {ns} ({why})")),
    }
}

async fn forward_any(
    svc: &KvService,
    peers: &[Peer],
    ns: &str,
    op: &crate::kv::Op,
    hops: u8,
) -> Result<OpResult, String> {
    if hops >= 3 {
        return Err("too many forwards (no stable leader)".into());
    }
    let body = bytes::Bytes::from(serde_json::to_vec(op).map_err(|e| e.to_string())?);
    let mut last = String::from("no member region reachable");
    for p in peers {
        let path = svc.api(&format!("raft/{ns}/op?hops={}", hops + 1));
        let target = svc.target(p).map_err(|e| e.to_string())?;
        // Short: a leader cut off from us is replaced within seconds, and
        // the caller is better told (outcome unknown) than kept waiting.
        match svc.cluster.call(&target, Method::POST, &path, body.clone(), Duration::from_secs(4)).await {
            Ok(a) if a.status == StatusCode::OK => {
                let r: OpResult = serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
                return match r.error {
                    Some(e) => Err(e),
                    None => Ok(r),
                };
            }
            Ok(a) => return Err(format!("{}: HTTP {}: {}", p.name, a.status, a.text())),
            // Only a failure to connect proves nothing was sent; anything
            // else may have executed, and executing a write twice is wrong.
            Err(e) if e.nothing_sent() => last = format!("{}: {e}", p.name),
            Err(e) => return Err(format!("{}: {e}", p.name)),
        }
    }
    Err(last)
}

/// `/_meridian/raft/{ns}/{append|vote|snapshot|op}`.
pub async fn handle(
    svc: &Arc<KvService>,
    ns: &str,
    what: &str,
    query: Option<&str>,
    body: Bytes,
    caller: &meridian_trust::Identity,
) -> http::Response<Body> {
    if what == "op" {
        let op: crate::kv::Op = match serde_json::from_slice(&body) {
            Ok(op) => op,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("not a key-value operation: {e}")),
        };
        let hops = query.and_then(|q| q.strip_prefix("hops=")).and_then(|h| h.parse().ok()).unwrap_or(1);
        let r = match execute(svc, ns, &op, hops).await {
            Ok(r) => r,
            Err(e) => OpResult {
                region: svc.region.clone(),
                error: Some(e),
                error_kind: Some("other".into()),
                ..Default::default()
            },
        };
        return json(StatusCode::OK, &r);
    }
    let group = svc.groups.lock().unwrap().get(ns).cloned();
    let Some(group) = group else {
        return text(StatusCode::NOT_FOUND, format!("this region is not a member of strong namespace {ns:?}"));
    };
    fn answer<T: serde::Serialize>(r: T) -> http::Response<Body> {
        json(StatusCode::OK, &r)
    }
    // A Raft message speaks for the member its vote names; only that
    // member's certificate may carry it.
    let impersonation = |node: NodeId| -> Option<http::Response<Body>> {
        if group.members.get(&node) == Some(&caller.name) {
            return None;
        }
        tracing::warn!(%caller, node, ns, "refused a raft message sent on behalf of another member");
        Some(text(StatusCode::FORBIDDEN, format!("{caller} may not speak for raft node {node} of {ns}")))
    };
    match what {
        "append" => match serde_json::from_slice::<AppendEntriesRequest<TypeConfig>>(&body) {
            Ok(req) => match impersonation(req.vote.leader_id().node_id) {
                Some(refused) => refused,
                None => answer(group.raft.append_entries(req).await),
            },
            Err(e) => text(StatusCode::BAD_REQUEST, format!("bad append request: {e}")),
        },
        "vote" => match serde_json::from_slice::<VoteRequest<NodeId>>(&body) {
            Ok(req) => match impersonation(req.vote.leader_id().node_id) {
                Some(refused) => refused,
                None => answer(group.raft.vote(req).await),
            },
            Err(e) => text(StatusCode::BAD_REQUEST, format!("bad vote request: {e}")),
        },
        "snapshot" => match serde_json::from_slice::<InstallSnapshotRequest<TypeConfig>>(&body) {
            Ok(req) => match impersonation(req.vote.leader_id().node_id) {
                Some(refused) => refused,
                None => answer(group.raft.install_snapshot(req).await),
            },
            Err(e) => text(StatusCode::BAD_REQUEST, format!("bad snapshot request: {e}")),
        },
        _ => text(StatusCode::NOT_FOUND, format!("no such raft API: {what}")),
    }
}

/// Status of the groups this region is a member of.
pub fn status(svc: &KvService) -> Vec<meridian_core::wire::GroupStatus> {
    let groups: Vec<Arc<Group>> = svc.groups.lock().unwrap().values().cloned().collect();
    let mut out: Vec<_> = groups
        .iter()
        .map(|g| {
            let m = g.raft.metrics().borrow().clone();
            meridian_core::wire::GroupStatus {
                ns: g.ns.clone(),
                node_id: g.node_id,
                state: format!("{:?}", m.state),
                term: m.current_term,
                leader: g.leader_region(),
                last_log_index: m.last_log_index,
                last_applied: m.last_applied.map(|l| l.index),
            }
        })
        .collect();
    out.sort_by(|a, b| a.ns.cmp(&b.ns));
    out
}

/// Starts the groups of every strong namespace this region is a member of
/// (once per namespace).
pub async fn ensure_groups(
    svc: &Arc<KvService>,
    data_dir: &Path,
    namespaces: &BTreeMap<String, meridian_manifest::Namespace>,
) {
    for (name, n) in namespaces {
        let meridian_manifest::KvMode::Strong { regions, leader } = &n.mode else { continue };
        if !regions.contains(&svc.region) || svc.groups.lock().unwrap().contains_key(name) {
            continue;
        }
        match Group::start(svc.clone(), data_dir, name, regions, leader.clone()).await {
            Ok(g) => {
                svc.groups.lock().unwrap().insert(name.clone(), g);
                tracing::info!(ns = %name, "raft group started");
            }
            Err(e) => tracing::error!(ns = %name, error = %e, "cannot start the raft group"),
        }
    }
}
