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

use crate::election;
use crate::kv::{unhex, KvService, OpResult};
use bytes::Bytes;
use http::{Method, StatusCode};
use meridian_core::kv::{KvError, KvResult};
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
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
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
    /// `command` under an idempotency key: applied only if no command
    /// under `key` was applied before; otherwise the first one's result is
    /// returned and nothing changes. Keys are kept up to
    /// [`MAX_IDEMPOTENCY_KEYS`] per group, oldest forgotten first.
    Once {
        key: String,
        command: Box<Command>,
    },
}

/// Idempotency keys a group remembers (the oldest are forgotten first).
/// At 100 writes/s, more than a quarter of an hour of retries.
pub const MAX_IDEMPOTENCY_KEYS: u64 = 100_000;

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
    /// The result of an earlier command under the same idempotency key:
    /// nothing was applied this time.
    #[serde(default)]
    pub replayed: bool,
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
/// Idempotency key -> (log index, result) of the command applied under it.
const IDEM: TableDefinition<&str, &[u8]> = TableDefinition::new("idem");
/// Log index -> idempotency key: the order in which keys are forgotten.
const IDEM_ORDER: TableDefinition<u64, &str> = TableDefinition::new("idem_order");

/// A state machine as a snapshot carries it.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct SnapshotData {
    sm: BTreeMap<String, Versioned>,
    /// (log index, key, result), oldest first.
    idem: Vec<(u64, String, CommandResult)>,
}

impl SnapshotData {
    /// Also reads the format before idempotency keys (the map alone).
    fn decode(b: &[u8]) -> Result<SnapshotData, StorageError<NodeId>> {
        match serde_json::from_slice::<SnapshotData>(b) {
            Ok(d) => Ok(d),
            Err(_) => Ok(SnapshotData { sm: dec(b)?, idem: Vec::new() }),
        }
    }
}

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
        txn.open_table(IDEM).map_err(|e| e.to_string())?;
        txn.open_table(IDEM_ORDER).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        Ok(GroupStore { db, log, snapshot: Default::default() })
    }

    /// The group's log storage, for `Raft::new`.
    pub fn log(&self) -> RedbLog<TypeConfig> {
        self.log.clone()
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

    /// Idempotency keys remembered.
    pub fn idempotency_keys(&self) -> Result<u64, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let t = txn.open_table(IDEM_ORDER).map_err(|e| e.to_string())?;
        t.len().map_err(|e| e.to_string())
    }

    fn sm_dump(&self) -> Result<SnapshotData, StorageError<NodeId>> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(SM).map_err(io)?;
        let mut out = SnapshotData::default();
        for e in t.iter().map_err(io)? {
            let (k, v) = e.map_err(io)?;
            out.sm.insert(k.value().to_string(), dec(v.value())?);
        }
        let idem = txn.open_table(IDEM).map_err(io)?;
        let order = txn.open_table(IDEM_ORDER).map_err(io)?;
        for e in order.iter().map_err(io)? {
            let (i, k) = e.map_err(io)?;
            if let Some(v) = idem.get(k.value()).map_err(io)? {
                let (_, r): (u64, CommandResult) = dec(v.value())?;
                out.idem.push((i.value(), k.value().to_string(), r));
            }
        }
        Ok(out)
    }
}

/// The tables a command changes.
struct Tables<'t> {
    sm: redb::Table<'t, &'static str, &'static [u8]>,
    idem: redb::Table<'t, &'static str, &'static [u8]>,
    order: redb::Table<'t, u64, &'static str>,
}

/// Applies one command of the log at `index`, honouring idempotency keys.
fn apply_entry(t: &mut Tables, cmd: &Command, index: u64) -> Result<CommandResult, StorageError<NodeId>> {
    let Command::Once { key, command } = cmd else {
        return apply_command(&mut t.sm, cmd, index);
    };
    if let Some(v) = t.idem.get(key.as_str()).map_err(io)? {
        let (_, mut r): (u64, CommandResult) = dec(v.value())?;
        r.replayed = true;
        return Ok(r);
    }
    // Nested keys are not a thing a client can send; applied as the inner
    // command under the outer key.
    let mut inner = command.as_ref();
    while let Command::Once { command, .. } = inner {
        inner = command;
    }
    let r = apply_command(&mut t.sm, inner, index)?;
    t.idem.insert(key.as_str(), enc(&(index, &r))?.as_slice()).map_err(io)?;
    t.order.insert(index, key.as_str()).map_err(io)?;
    while t.order.len().map_err(io)? > MAX_IDEMPOTENCY_KEYS {
        let Some((_, k)) = t.order.pop_first().map_err(io)? else { break };
        t.idem.remove(k.value()).map_err(io)?;
    }
    Ok(r)
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
        Command::Once { .. } => unreachable!("apply_entry unwraps idempotency keys"),
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
            let mut tables = Tables {
                sm: txn.open_table(SM).map_err(io)?,
                idem: txn.open_table(IDEM).map_err(io)?,
                order: txn.open_table(IDEM_ORDER).map_err(io)?,
            };
            let mut meta = txn.open_table(META).map_err(io)?;
            let mut last = None;
            for e in entries {
                last = Some(e.log_id);
                match &e.payload {
                    EntryPayload::Blank => out.push(CommandResult::default()),
                    EntryPayload::Normal(cmd) => out.push(apply_entry(&mut tables, cmd, e.log_id.index)?),
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
        let state = SnapshotData::decode(&data)?;
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut sm = txn.open_table(SM).map_err(io)?;
            sm.retain(|_, _| false).map_err(io)?;
            for (k, v) in &state.sm {
                sm.insert(k.as_str(), enc(v)?.as_slice()).map_err(io)?;
            }
            let mut idem = txn.open_table(IDEM).map_err(io)?;
            let mut order = txn.open_table(IDEM_ORDER).map_err(io)?;
            idem.retain(|_, _| false).map_err(io)?;
            order.retain(|_, _| false).map_err(io)?;
            for (i, k, r) in &state.idem {
                idem.insert(k.as_str(), enc(&(i, r))?.as_slice()).map_err(io)?;
                order.insert(*i, k.as_str()).map_err(io)?;
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

/// Sends `body` to the `what` API of this group on `region`'s node.
async fn call_member(
    svc: &KvService,
    ns: &str,
    region: &str,
    what: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<meridian_http::cluster::Answer, String> {
    let peer = svc.peers.load().iter().find(|p| p.name == region).cloned();
    let Some(peer) = peer else {
        return Err(format!("no link to {region}"));
    };
    let target = svc.target(&peer).map_err(|e| e.to_string())?;
    let path = svc.api(&format!("raft/{ns}/{what}"));
    svc.cluster.call(&target, Method::POST, &path, body, timeout).await.map_err(|e| e.to_string())
}

impl Connection {
    async fn rpc<Req, Resp, E>(&self, what: &str, req: &Req, timeout: Duration) -> Result<Resp, rpc::Error<E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let body = serde_json::to_vec(req).map_err(rpc::encoding)?;
        let a = call_member(&self.svc, &self.ns, &self.region, what, body.into(), timeout)
            .await
            .map_err(rpc::unreachable)?;
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

/// A pre-vote request (see `election`): would the receiver vote for
/// `candidate`, whose last log entry is `last_log`?
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    pub last_log: Option<LogId<NodeId>>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
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
    /// Campaign order: 0 for the preferred leader, then the manifest's.
    pub rank: u32,
    pub timing: election::Timing,
    pub pacer: Mutex<election::Pacer>,
    /// The app's key-value service (weak: it holds this group).
    svc: std::sync::Weak<KvService>,
}

/// Raft timing for regions a WAN apart. openraft 0.9 also uses the
/// heartbeat interval as the timeout of each AppendEntries and vote, so it
/// must exceed the longest round trip between members (213 ms in the
/// default world; a new connection's handshake outlives a timed-out call,
/// see `meridian_http::pool`). The lease (`election_timeout_max`) is how
/// long a member keeps following a silent leader: three heartbeats. openraft's
/// own election timer is off: `election` campaigns instead.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "meridian".into(),
        heartbeat_interval: HEARTBEAT.as_millis() as u64,
        election_timeout_min: 800,
        election_timeout_max: LEASE.as_millis() as u64,
        enable_elect: false,
        max_payload_entries: 500,
        ..Default::default()
    }
}

const HEARTBEAT: Duration = Duration::from_millis(400);
const LEASE: Duration = Duration::from_millis(1200);

/// The election timing every group uses (see [`raft_config`]).
pub fn timing() -> election::Timing {
    election::Timing { lease: LEASE, step: Duration::from_millis(100), retry: Duration::from_millis(200) }
}

/// Connections opened to a new leader ahead of the writes forwarded to it.
const PRECONNECT: usize = 4;

/// How long a write waits for its commit before its outcome is called
/// unknown: long enough for a healthy quorum round over the slowest link,
/// short enough that a caller can retry (with its idempotency key) while a
/// new leader is elected.
const COMMIT_WAIT: Duration = Duration::from_secs(3);

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
        let mut order: Vec<&String> = leader.iter().filter(|l| regions.contains(l)).collect();
        order.extend(regions.iter().filter(|r| Some(*r) != leader.as_ref()));
        let rank = order.iter().position(|r| **r == svc.region).unwrap_or(0) as u32;
        let timing = timing();
        let group = Arc::new(Group {
            ns: ns.to_string(),
            raft,
            store,
            node_id,
            members: members.clone(),
            preferred_leader: leader,
            rank,
            timing,
            pacer: Mutex::new(election::Pacer::new(now(), &timing)),
            svc: Arc::downgrade(&svc),
        });
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        tokio::spawn(campaign(Arc::downgrade(&group), seed ^ node_id));
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

    /// This member leads but no quorum has acknowledged it for longer than
    /// the lease: it is cut off, and the others elect a new leader.
    fn leading_without_quorum(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        m.millis_since_quorum_ack.filter(|ms| m.state.is_leader() && *ms >= self.timing.lease.as_millis() as u64)
    }

    fn svc(&self) -> Option<Arc<KvService>> {
        self.svc.upgrade()
    }
}

/// What the campaign loop needs of a member of a group: the region's
/// [`Group`] (pre-votes over HTTP) or a simulated one (tests/raft_sim.rs).
pub trait Campaigner: Send + Sync + 'static {
    fn raft(&self) -> &Raft;
    fn node_id(&self) -> NodeId;
    /// Other members' node ids.
    fn others(&self) -> Vec<NodeId>;
    fn rank(&self) -> u32;
    fn timing(&self) -> &election::Timing;
    fn pacer(&self) -> &Mutex<election::Pacer>;
    /// Asks member `to` for a pre-vote.
    fn ask_pre_vote(
        &self,
        to: NodeId,
        req: PreVoteRequest,
    ) -> impl std::future::Future<Output = Result<PreVoteResponse, String>> + Send;
    /// Another member now leads (or none): a chance to get ready for it.
    fn leader_changed(&self, _leader: Option<NodeId>) {}
}

/// Now, on tokio's clock (virtual in a simulation with paused time).
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Asks the other members for pre-votes; true once a quorum (this member
/// included) said yes.
pub async fn pre_vote_round<C: Campaigner>(c: &C) -> bool {
    let req = PreVoteRequest { candidate: c.node_id(), last_log: c.raft().data_metrics().borrow().last_log };
    let others = c.others();
    // A majority of all members, besides this one.
    let needed = others.len().div_ceil(2);
    let mut asks: futures::stream::FuturesUnordered<_> = others
        .into_iter()
        .map(|to| {
            let req = req.clone();
            async move { (to, c.ask_pre_vote(to, req).await) }
        })
        .collect();
    let mut yes = 0;
    while let Some((to, answer)) = futures::StreamExt::next(&mut asks).await {
        match answer {
            Ok(a) if a.granted => {
                yes += 1;
                if yes >= needed {
                    return true;
                }
            }
            Ok(a) => tracing::debug!(to, refused = ?a.refused, "pre-vote refused"),
            Err(e) => tracing::debug!(to, error = %e, "no pre-vote"),
        }
    }
    false
}

/// This member's answer to a pre-vote request.
pub fn answer_pre_vote<C: Campaigner>(c: &C, req: &PreVoteRequest) -> PreVoteResponse {
    let m = c.raft().metrics().borrow().clone();
    let lease_ms = c.timing().lease.as_millis() as u64;
    let leading = m.state.is_leader() && m.millis_since_quorum_ack.is_some_and(|ms| ms < lease_ms);
    let mine = c.raft().data_metrics().borrow().last_log;
    let pacer = *c.pacer().lock().unwrap();
    let verdict = election::pre_vote(now(), &pacer, leading, &req.last_log, &mine, c.timing());
    PreVoteResponse { granted: verdict.is_ok(), refused: verdict.err().map(|r| r.to_string()) }
}

/// What a member's transport does after handing a message to its Raft:
/// a leader's append taken (or a conflict to repair), a snapshot
/// installed or a vote granted all mean "someone is leading or about to":
/// the member does not campaign for another lease.
pub fn heard_if(c: &impl Campaigner, leader_alive: bool) {
    if leader_alive {
        c.pacer().lock().unwrap().heard(now());
    }
}

/// Whether an append's answer shows a live leader (see [`heard_if`]).
pub fn append_taken<E>(resp: &Result<AppendEntriesResponse<NodeId>, E>) -> bool {
    matches!(resp, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_)))
}

/// Campaigns for a member when its leader falls silent (see `election`),
/// every 25 ms, until the member is dropped.
pub async fn campaign<C: Campaigner>(member: std::sync::Weak<C>, mut jitter: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known_leader = None;
    jitter |= 1;
    loop {
        tick.tick().await;
        let Some(c) = member.upgrade() else { return };
        let now = now();
        let m = c.raft().metrics().borrow().clone();
        if m.current_leader != known_leader {
            known_leader = m.current_leader;
            c.leader_changed(known_leader.filter(|id| *id != c.node_id()));
        }
        if m.state.is_leader() {
            c.pacer().lock().unwrap().heard(now);
            continue;
        }
        // Not formed yet (see `Group::start`), or not a voter.
        if !m.membership_config.membership().voter_ids().any(|id| id == c.node_id()) {
            continue;
        }
        if !c.pacer().lock().unwrap().due(now, c.rank(), c.timing()) {
            continue;
        }
        jitter ^= jitter << 13;
        jitter ^= jitter >> 7;
        jitter ^= jitter << 17;
        let (silent, contact) = {
            let mut p = c.pacer().lock().unwrap();
            p.attempted(now, c.timing(), jitter);
            (p.silent_for(now), p.contact)
        };
        // Granted, and nothing was heard meanwhile: a vote this member gave
        // another candidate during the round (their pre-votes crossed) or a
        // leader's append means that one goes first.
        if pre_vote_round(c.as_ref()).await && c.pacer().lock().unwrap().contact == contact {
            // Campaigning counts as a leader's word: until this election
            // is decided, this member refuses others' pre-votes (one asking
            // a step later would otherwise get it, raise its term and
            // depose the leader this member is about to become).
            c.pacer().lock().unwrap().heard(self::now());
            tracing::info!(
                node = c.node_id(),
                term = m.current_term,
                silent_ms = silent.as_millis() as u64,
                "no word from a leader; a quorum would vote for this member: campaigning"
            );
            if let Err(e) = c.raft().trigger().elect().await {
                tracing::warn!(node = c.node_id(), error = %e, "cannot start an election");
            }
        }
    }
}

impl Campaigner for Group {
    fn raft(&self) -> &Raft {
        &self.raft
    }
    fn node_id(&self) -> NodeId {
        self.node_id
    }
    fn others(&self) -> Vec<NodeId> {
        self.members.keys().copied().filter(|id| *id != self.node_id).collect()
    }
    fn rank(&self) -> u32 {
        self.rank
    }
    fn timing(&self) -> &election::Timing {
        &self.timing
    }
    fn pacer(&self) -> &Mutex<election::Pacer> {
        &self.pacer
    }
    async fn ask_pre_vote(&self, to: NodeId, req: PreVoteRequest) -> Result<PreVoteResponse, String> {
        let svc = self.svc().ok_or("the app's key-value service is gone")?;
        let region = self.members.get(&to).ok_or("not a member")?;
        let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        let a = call_member(&svc, &self.ns, region, "prevote", body.into(), HEARTBEAT).await?;
        serde_json::from_slice(&a.body).map_err(|_| format!("HTTP {}: {}", a.status, a.text()))
    }
    /// A cold link would make each of the first writes forwarded to the new
    /// leader wait for a handshake (two round trips) first.
    fn leader_changed(&self, leader: Option<NodeId>) {
        let region = leader.and_then(|id| self.members.get(&id));
        if let (Some(r), Some(svc)) = (region, self.svc()) {
            preconnect(&svc, r);
        }
    }
}

/// Opens connections to `region` ahead of the writes about to go there.
fn preconnect(svc: &KvService, region: &str) {
    if let Some(p) = svc.peers.load().iter().find(|p| p.name == region) {
        if let Ok(t) = svc.target(p) {
            svc.cluster.preconnect(&t, PRECONNECT);
        }
    }
}

/// Runs an operation of a strong namespace: here if this region leads the
/// group, else at the leader's region (or, from a region outside the
/// group, at the nearest member). A failed write says whether it was
/// certainly not applied ([`KvError::NotApplied`]) or may have been
/// ([`KvError::OutcomeUnknown`]).
pub async fn execute(svc: &KvService, ns: &str, op: &crate::kv::Op, hops: u8) -> KvResult<OpResult> {
    use crate::kv::Op;
    let group = svc.groups.lock().unwrap().get(ns).cloned();
    let mut r = OpResult { region: svc.region.clone(), ..Default::default() };
    let Some(group) = group else {
        // Not a member: the nearest member forwards to its leader.
        let nss = svc.namespaces.load();
        let Some(meridian_manifest::Namespace { mode: meridian_manifest::KvMode::Strong { regions, .. }, .. }) =
            nss.get(ns)
        else {
            return Err(KvError::Other(format!("{ns:?} is not a strong namespace here")));
        };
        let mut peers: Vec<Peer> = svc.peers.load().iter().filter(|p| regions.contains(&p.name)).cloned().collect();
        peers.sort_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms));
        return forward_any(svc, &peers, ns, op, hops).await;
    };
    let (op, idem) = match op {
        Op::Once { idem, write } => (write.as_ref(), Some(idem)),
        op => (op, None),
    };
    let bad = |e: String| KvError::Other(e);
    let cmd = match op {
        Op::Get { key, .. } | Op::ReadVersioned { key, .. } => match group.raft.ensure_linearizable().await {
            Ok(_) => {
                let v = group.store.read(key).map_err(bad)?;
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
                let keys = group.store.keys(cursor.as_deref(), limit + 1).map_err(bad)?;
                let more = keys.len() > limit;
                r.keys = keys.into_iter().take(limit).collect();
                r.cursor = if more { r.keys.last().cloned() } else { None };
                return Ok(r);
            }
            Err(e) => return to_leader(svc, &group, ns, op, hops, e.to_string()).await,
        },
        Op::Set { key, value_hex, .. } => Command::Set { key: key.clone(), value: unhex(value_hex)? },
        Op::SetMany { .. } => {
            return Err(bad(
                "a strong namespace takes one write at a time (each is a consensus round); set keys one by one".into(),
            ))
        }
        Op::Once { .. } => return Err(bad("an idempotency key inside another".into())),
        Op::Delete { key, .. } => Command::Delete { key: key.clone() },
        Op::Increment { key, delta, .. } => Command::Increment { key: key.clone(), delta: *delta },
        Op::Swap { key, version_hex, value_hex, .. } => {
            let v = unhex(version_hex)?;
            let expected = match v.len() {
                0 => 0,
                8 => u64::from_le_bytes(v.try_into().expect("8 bytes")),
                _ => return Err(bad("not a version of a strong namespace".into())),
            };
            Command::Swap { key: key.clone(), expected, value: unhex(value_hex)? }
        }
    };
    let cmd = match idem {
        Some(k) => Command::Once { key: k.clone(), command: Box::new(cmd) },
        None => cmd,
    };
    // A leader cut off from every quorum cannot commit: say so before
    // proposing anything (the others are electing a new leader).
    if let Some(ms) = group.leading_without_quorum() {
        return Err(KvError::NotApplied(format!(
            "{} leads {ns} but no quorum has answered it for {ms} ms (cut off from the other members); nothing was proposed",
            svc.region
        )));
    }
    match tokio::time::timeout(COMMIT_WAIT, group.raft.client_write(cmd)).await {
        Ok(Ok(resp)) => {
            let d = resp.data;
            if d.overflow {
                return Err(bad(
                    "the counter would leave the range of a 64-bit signed integer; nothing was changed".into()
                ));
            }
            if matches!(op, Op::Increment { .. }) && d.total.is_none() {
                return Err(bad("the key holds a value, not a counter".into()));
            }
            r.total = d.total;
            r.swapped = d.swapped;
            if d.swapped == Some(false) {
                r.value_hex = d.current.map(hex::encode);
                r.version_hex = Some(hex::encode(d.version.to_le_bytes()));
            }
            Ok(r)
        }
        // Refused before it reached the log: not applied.
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
            let op = match idem {
                Some(k) => Op::Once { idem: k.clone(), write: Box::new(op.clone()) },
                None => op.clone(),
            };
            to_leader(svc, &group, ns, &op, hops, "not the leader".into()).await
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => Err(bad(e.to_string())),
        // Proposed, and then this member stopped (or its log was cut):
        // it may yet be committed by the next leader.
        Ok(Err(RaftError::Fatal(e))) => Err(KvError::OutcomeUnknown(format!(
            "{}'s raft member stopped after the write was proposed: {e}",
            svc.region
        ))),
        Err(_) => Err(KvError::OutcomeUnknown(format!(
            "proposed at {} (leader of {ns}) but not committed within {} ms",
            svc.region,
            COMMIT_WAIT.as_millis()
        ))),
    }
}

async fn to_leader(
    svc: &KvService,
    group: &Group,
    ns: &str,
    op: &crate::kv::Op,
    hops: u8,
    why: String,
) -> KvResult<OpResult> {
    // Wait (briefly: about an election) for a leader: elsewhere, or this
    // member itself once it has won (it may be the candidate of the
    // election under way).
    let leads_here = || group.raft.metrics().borrow().state.is_leader();
    let mut leader = group.leader_region();
    let deadline = tokio::time::Instant::now() + group.timing.campaign_after(group.members.len() as u32);
    while leader.as_ref().is_none_or(|l| *l == svc.region && !leads_here()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader = group.leader_region();
    }
    match leader {
        // Elected here while waiting: run it here after all (counted as a
        // hop, so a member that keeps losing its leadership gives up).
        Some(l) if l == svc.region && leads_here() && hops < 3 => Box::pin(execute(svc, ns, op, hops + 1)).await,
        Some(l) if l != svc.region => {
            let peer = svc.peers.load().iter().find(|p| p.name == l).cloned();
            match peer {
                Some(p) => forward_any(svc, &[p], ns, op, hops).await,
                None => Err(KvError::NotApplied(format!("no link to the leader {l}"))),
            }
        }
        _ => Err(KvError::NotApplied(format!("no leader for {ns} ({why})"))),
    }
}

async fn forward_any(svc: &KvService, peers: &[Peer], ns: &str, op: &crate::kv::Op, hops: u8) -> KvResult<OpResult> {
    if hops >= 3 {
        return Err(KvError::NotApplied("too many forwards (no stable leader)".into()));
    }
    let body = bytes::Bytes::from(serde_json::to_vec(op).map_err(|e| KvError::Other(e.to_string()))?);
    let mut last = String::from("no member region reachable");
    for p in peers {
        let path = svc.api(&format!("raft/{ns}/op?hops={}", hops + 1));
        let target = svc.target(p).map_err(|e| KvError::NotApplied(e.to_string()))?;
        // The leader's own commit wait, plus the way there and back.
        let wait = COMMIT_WAIT + Duration::from_secs(1);
        match svc.cluster.call(&target, Method::POST, &path, body.clone(), wait).await {
            Ok(a) if a.status == StatusCode::OK => {
                let r: OpResult = serde_json::from_slice(&a.body).map_err(|e| {
                    KvError::OutcomeUnknown(format!("{} answered something that is not a result: {e}", p.name))
                })?;
                return match r.error {
                    Some(e) => Err(KvError::from_kind(r.error_kind.as_deref(), e)),
                    None => Ok(r),
                };
            }
            // An older member answers errors as text: nothing says what happened.
            Ok(a) => return Err(KvError::OutcomeUnknown(format!("{}: HTTP {}: {}", p.name, a.status, a.text()))),
            // Only a failure to connect proves nothing was sent; anything
            // else may have executed, and executing a write twice is wrong.
            Err(e) if e.nothing_sent() => last = format!("{}: {e}", p.name),
            Err(e) if op.is_read() => return Err(KvError::NotApplied(format!("{}: {e}", p.name))),
            Err(e) => return Err(KvError::OutcomeUnknown(format!("{}: {e}", p.name))),
        }
    }
    Err(KvError::NotApplied(last))
}

/// `/_meridian/raft/{ns}/{append|vote|snapshot|prevote|op}`.
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
            Err(e) => OpResult::failed(&svc.region, &e),
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
                None => {
                    let resp = group.raft.append_entries(req).await;
                    heard_if(group.as_ref(), append_taken(&resp));
                    answer(resp)
                }
            },
            Err(e) => text(StatusCode::BAD_REQUEST, format!("bad append request: {e}")),
        },
        "vote" => match serde_json::from_slice::<VoteRequest<NodeId>>(&body) {
            Ok(req) => match impersonation(req.vote.leader_id().node_id) {
                Some(refused) => refused,
                None => {
                    let resp = group.raft.vote(req).await;
                    // A vote given: give its candidate time to win, and
                    // have connections ready for the writes this member
                    // will forward to it.
                    let granted = matches!(&resp, Ok(r) if r.vote_granted);
                    heard_if(group.as_ref(), granted);
                    if granted {
                        preconnect(svc, &caller.name);
                    }
                    answer(resp)
                }
            },
            Err(e) => text(StatusCode::BAD_REQUEST, format!("bad vote request: {e}")),
        },
        "prevote" => match serde_json::from_slice::<PreVoteRequest>(&body) {
            Ok(req) => match impersonation(req.candidate) {
                Some(refused) => refused,
                None => answer(answer_pre_vote(group.as_ref(), &req)),
            },
            Err(e) => text(StatusCode::BAD_REQUEST, format!("bad pre-vote request: {e}")),
        },
        "snapshot" => match serde_json::from_slice::<InstallSnapshotRequest<TypeConfig>>(&body) {
            Ok(req) => match impersonation(req.vote.leader_id().node_id) {
                Some(refused) => refused,
                None => {
                    let resp = group.raft.install_snapshot(req).await;
                    heard_if(group.as_ref(), resp.is_ok());
                    answer(resp)
                }
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
            let pacer = *g.pacer.lock().unwrap();
            meridian_core::wire::GroupStatus {
                ns: g.ns.clone(),
                node_id: g.node_id,
                state: format!("{:?}", m.state),
                term: m.current_term,
                leader: g.leader_region(),
                last_log_index: m.last_log_index,
                last_applied: m.last_applied.map(|l| l.index),
                quorum_ack_ms: m.millis_since_quorum_ack.filter(|_| m.state.is_leader()),
                leader_silent_ms: (!m.state.is_leader()).then(|| pacer.silent_for(now()).as_millis() as u64),
                lease_ms: g.timing.lease.as_millis() as u64,
                campaigns: pacer.attempts,
                idempotency_keys: g.store.idempotency_keys().unwrap_or(0),
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

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(cmd) }
    }

    fn once(key: &str, delta: i64) -> Command {
        Command::Once { key: key.into(), command: Box::new(Command::Increment { key: "n".into(), delta }) }
    }

    #[tokio::test]
    async fn a_command_under_an_idempotency_key_applies_once_and_its_retry_gets_the_first_result() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = GroupStore::open(&dir.path().join("g.redb")).unwrap();
        let r = g.apply(vec![entry(1, once("req-1#1", 5)), entry(2, once("req-1#1", 5))]).await.unwrap();
        assert_eq!((r[0].total, r[0].replayed), (Some(5), false));
        assert_eq!((r[1].total, r[1].replayed), (Some(5), true), "the retry changed nothing and saw the first total");
        // A later retry, after other writes, still gets the first result.
        let r = g.apply(vec![entry(3, once("req-2#1", 1)), entry(4, once("req-1#1", 5))]).await.unwrap();
        assert_eq!(r[0].total, Some(6));
        assert_eq!((r[1].total, r[1].replayed), (Some(5), true));
        assert_eq!(g.read("n").unwrap().unwrap().value, Stored::Counter(6));
        assert_eq!(g.idempotency_keys().unwrap(), 2);

        // A member that installs a snapshot remembers the keys too.
        let snap = g.build_snapshot().await.unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let mut h = GroupStore::open(&dir2.path().join("h.redb")).unwrap();
        h.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        let r = h.apply(vec![entry(5, once("req-2#1", 1))]).await.unwrap();
        assert_eq!((r[0].total, r[0].replayed), (Some(6), true));
        assert_eq!(h.read("n").unwrap().unwrap().value, Stored::Counter(6));
    }

    #[tokio::test]
    async fn a_snapshot_of_the_format_before_idempotency_keys_still_installs() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = GroupStore::open(&dir.path().join("g.redb")).unwrap();
        let old: BTreeMap<String, Versioned> =
            [("k".to_string(), Versioned { value: Stored::Counter(3), version: 7 })].into();
        let meta = SnapshotMeta { last_log_id: None, last_membership: Default::default(), snapshot_id: "old".into() };
        g.install_snapshot(&meta, Box::new(Cursor::new(serde_json::to_vec(&old).unwrap()))).await.unwrap();
        assert_eq!(g.read("k").unwrap().unwrap().value, Stored::Counter(3));
    }
}
