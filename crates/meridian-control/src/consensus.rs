//! The control plane's state, replicated by Raft (openraft) across its
//! control nodes, so losing one — a region's worth of machines — loses
//! neither a change nor a rollout in progress.
//!
//! Everything the control plane knows is one small state machine
//! ([`Machine`]): the apps with their desired versions and histories, the
//! apps being deleted, the operators' tokens (hashes only), every rollout's
//! plan and progress, and the audit log. Each change is a [`Command`] in the
//! Raft log; a change is acknowledged once a majority of control nodes hold
//! it on disk (fsynced) and this node applied it. Node ids are positions in
//! the config's `members` list (+1), so every node derives the same
//! membership; a node without `members` is a group of one.
//!
//! Only the leader acts: it answers the API (followers forward requests to
//! it), runs rollouts and the reconcile loop. A rollout's progress is in the
//! machine, so a node that becomes leader picks up every unfinished rollout
//! where the log says it was. A deposed leader learns it when its next
//! proposal fails, and stops without undoing anything.
//!
//! Storage: one redb database (`DATA_DIR/control.redb`): the log and the
//! vote (every append fsynced before it is acknowledged), the machine as
//! of the last applied entry, and the audit entries by number.

// The storage traits dictate openraft's (large) error type.
#![allow(clippy::result_large_err)]

use crate::audit;
use crate::rollout::{Command as Steering, RolloutRecord};
use crate::tokens::TokenRecord;
use crate::ControlState;
use bytes::Bytes;
use http::{Method, StatusCode};
use meridian_core::VersionId;
use meridian_http::cluster::{ClusterClient, Target};
use meridian_http::{json, text, Body};
use meridian_raft::{dec, enc, io, rpc, RedbLog, META};
use meridian_trust::{Expect, Role};
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

/// A control node, as the config lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlMember {
    /// The name in its certificate (role `control`).
    pub name: String,
    /// Its API, e.g. `https://10.0.0.5:7300`.
    pub url: String,
}

impl ControlMember {
    pub fn target(&self) -> Result<Target, meridian_http::cluster::CallError> {
        Target::from_url(self.url.trim_end_matches('/'), Expect::new(&self.name, Role::Control))
    }
}

/// Everything the control plane knows.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub state: ControlState,
    pub tokens: Vec<TokenRecord>,
    /// The rollout in progress, or else the last one, of each app.
    pub rollouts: BTreeMap<String, RolloutRecord>,
    /// The number of the last audit entry.
    pub audit_seq: u64,
    /// Bumped by every change of `state`: a [`Command::SetState`] applies
    /// only over the revision it was computed from.
    pub revision: u64,
}

/// A change, as the log carries it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Confirms leadership and that everything before it is applied.
    Noop,
    /// Replaces the apps' state if it is still at `revision`.
    SetState {
        revision: u64,
        state: ControlState,
    },
    AddToken {
        record: TokenRecord,
    },
    RevokeToken {
        id: String,
    },
    /// Every token of an app (it was deleted).
    RevokeApp {
        app: String,
    },
    /// Appends an audit entry; its number is given when applied.
    Audit {
        entry: audit::Entry,
    },
    /// Starts a rollout or records its progress (an operator's steering,
    /// kept in the machine, is not overwritten by it).
    Rollout {
        record: Box<RolloutRecord>,
    },
    /// An operator's pause / resume / abort, or an approval.
    Steer {
        app: String,
        command: Option<Steering>,
        approve: bool,
        /// Set when the rollout pauses itself at a halt: an abort an
        /// operator gave meanwhile stands (a plain overwrite lost it, and
        /// the rollout then waited for a decision already made).
        #[serde(default)]
        unless_aborted: bool,
    },
    /// Ends a rollout; if it succeeded, its version becomes the desired one
    /// in the same step.
    FinishRollout {
        app: String,
        state: String,
        desired: Option<VersionId>,
    },
}

/// What applying a command did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    /// False when the command changed nothing: a lost compare-and-set, an
    /// unknown token, no rollout to steer.
    pub applied: bool,
    /// The audit entry's number; how many tokens were revoked.
    pub count: u64,
}

impl Machine {
    /// Applies one command; the audit entry it adds, if any.
    fn apply(&mut self, cmd: &Command, at_ms: u64) -> (Reply, Option<audit::Entry>) {
        let done = |applied: bool| Reply { applied, count: 0 };
        match cmd {
            Command::Noop => (done(true), None),
            Command::SetState { revision, state } => {
                if *revision != self.revision {
                    return (done(false), None);
                }
                self.state = state.clone();
                self.revision += 1;
                (done(true), None)
            }
            Command::AddToken { record } => {
                self.tokens.retain(|t| t.id != record.id);
                self.tokens.push(record.clone());
                (done(true), None)
            }
            Command::RevokeToken { id } => {
                let before = self.tokens.len();
                self.tokens.retain(|t| &t.id != id);
                (done(self.tokens.len() < before), None)
            }
            Command::RevokeApp { app } => {
                let before = self.tokens.len();
                self.tokens.retain(|t| &t.app != app);
                (Reply { applied: true, count: (before - self.tokens.len()) as u64 }, None)
            }
            Command::Audit { entry } => {
                self.audit_seq += 1;
                let mut e = entry.clone();
                e.seq = self.audit_seq;
                if e.at_ms == 0 {
                    e.at_ms = at_ms;
                }
                (Reply { applied: true, count: e.seq }, Some(e))
            }
            Command::Rollout { record } => {
                let mut next = (**record).clone();
                if let Some(cur) = self.rollouts.get(&record.app) {
                    if cur.version == record.version && !cur.finished() {
                        // Steering is the operators'; the rollout reports progress.
                        next.command = cur.command;
                        next.approvals = cur.approvals;
                    }
                }
                self.rollouts.insert(record.app.clone(), next);
                (done(true), None)
            }
            Command::Steer { app, command, approve, unless_aborted } => match self.rollouts.get_mut(app) {
                Some(r) if !r.finished() => {
                    if let Some(c) = command {
                        if !(*unless_aborted && r.command == Steering::Abort) {
                            r.command = *c;
                        }
                    }
                    if *approve {
                        r.approvals += 1;
                    }
                    (done(true), None)
                }
                _ => (done(false), None),
            },
            Command::FinishRollout { app, state, desired } => {
                let Some(r) = self.rollouts.get_mut(app) else { return (done(false), None) };
                r.state = state.clone();
                if let (Some(d), Some(a)) = (desired, self.state.apps.get_mut(app)) {
                    a.desired = Some(d.clone());
                    if a.history.last() != Some(d) {
                        a.history.push(d.clone());
                    }
                    self.revision += 1;
                }
                (done(true), None)
            }
        }
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = Reply,
);

pub use meridian_raft::NodeId;
pub type Raft = openraft::Raft<TypeConfig>;

const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("machine");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

type SnapshotBytes = (SnapshotMeta<NodeId, BasicNode>, Vec<u8>);

/// A snapshot's contents: the machine and the whole audit log.
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotData {
    machine: Machine,
    audit: Vec<audit::Entry>,
}

/// The durable machine (the log is a [`RedbLog`] in the same database),
/// and the machine in memory.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    log: RedbLog<TypeConfig>,
    machine: Arc<Mutex<Machine>>,
    /// Bumped after every apply (rollouts wait on it for steering).
    changed: Arc<tokio::sync::watch::Sender<u64>>,
    snapshot: Arc<Mutex<Option<SnapshotBytes>>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, String> {
        let db = Database::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Token hashes and the audit log: for the control plane's eyes only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let db = Arc::new(db);
        let log = RedbLog::new(db.clone()).map_err(|e| e.to_string())?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(SM).map_err(|e| e.to_string())?;
        txn.open_table(AUDIT).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        let machine = {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            let t = txn.open_table(SM).map_err(|e| e.to_string())?;
            match t.get("machine").map_err(|e| e.to_string())? {
                Some(v) => serde_json::from_slice(v.value())
                    .map_err(|e| format!("{}: the control state does not parse: {e}", path.display()))?,
                None => Machine::default(),
            }
        };
        Ok(Store {
            db,
            log,
            machine: Arc::new(Mutex::new(machine)),
            changed: Arc::new(tokio::sync::watch::Sender::new(0)),
            snapshot: Default::default(),
        })
    }

    /// Audit entries, oldest first, that `keep` accepts.
    pub fn audit(&self, keep: impl Fn(&audit::Entry) -> bool) -> Result<Vec<audit::Entry>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let t = txn.open_table(AUDIT).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for e in t.iter().map_err(|e| e.to_string())? {
            let (_, v) = e.map_err(|e| e.to_string())?;
            let entry: audit::Entry = serde_json::from_slice(v.value()).map_err(|e| e.to_string())?;
            if keep(&entry) {
                out.push(entry);
            }
        }
        Ok(out)
    }
}

impl RaftStateMachine<TypeConfig> for Store {
    type SnapshotBuilder = Store;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>> {
        let applied = self.log.meta_get::<Option<LogId<NodeId>>>("applied")?.flatten();
        let membership = self.log.meta_get("membership")?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        // Applied to a copy: memory changes only once the disk has.
        let mut next = self.machine.lock().unwrap().clone();
        let txn = self.db.begin_write().map_err(io)?;
        let mut out = Vec::new();
        {
            let mut meta = txn.open_table(META).map_err(io)?;
            let mut audit_t = txn.open_table(AUDIT).map_err(io)?;
            let mut last = None;
            for e in entries {
                last = Some(e.log_id);
                match &e.payload {
                    EntryPayload::Blank => out.push(Reply::default()),
                    EntryPayload::Normal(cmd) => {
                        let (reply, entry) = next.apply(cmd, now_ms());
                        if let Some(entry) = entry {
                            audit_t.insert(entry.seq, enc(&entry)?.as_slice()).map_err(io)?;
                        }
                        out.push(reply);
                    }
                    EntryPayload::Membership(m) => {
                        let sm = StoredMembership::new(Some(e.log_id), m.clone());
                        meta.insert("membership", enc(&sm)?.as_slice()).map_err(io)?;
                        out.push(Reply::default());
                    }
                }
            }
            if let Some(l) = last {
                meta.insert("applied", enc(&Some(l))?.as_slice()).map_err(io)?;
            }
            txn.open_table(SM).map_err(io)?.insert("machine", enc(&next)?.as_slice()).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        *self.machine.lock().unwrap() = next;
        self.changed.send_modify(|n| *n += 1);
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
        let s: SnapshotData = dec(&data)?;
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut a = txn.open_table(AUDIT).map_err(io)?;
            a.retain(|_, _| false).map_err(io)?;
            for e in &s.audit {
                a.insert(e.seq, enc(e)?.as_slice()).map_err(io)?;
            }
            txn.open_table(SM).map_err(io)?.insert("machine", enc(&s.machine)?.as_slice()).map_err(io)?;
            let mut m = txn.open_table(META).map_err(io)?;
            m.insert("applied", enc(&meta.last_log_id)?.as_slice()).map_err(io)?;
            m.insert("membership", enc(&meta.last_membership)?.as_slice()).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        *self.machine.lock().unwrap() = s.machine;
        *self.snapshot.lock().unwrap() = Some((meta.clone(), data));
        self.changed.send_modify(|n| *n += 1);
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

impl RaftSnapshotBuilder<TypeConfig> for Store {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // The machine, the audit log and the applied position from one read
        // of the database (apply writes all three in one transaction).
        let (machine, audit, applied, membership) = {
            let txn = self.db.begin_read().map_err(io)?;
            let sm = txn.open_table(SM).map_err(io)?;
            let machine: Machine = match sm.get("machine").map_err(io)? {
                Some(v) => dec(v.value())?,
                None => Machine::default(),
            };
            let mut audit = Vec::new();
            for e in txn.open_table(AUDIT).map_err(io)?.iter().map_err(io)? {
                audit.push(dec::<audit::Entry>(e.map_err(io)?.1.value())?);
            }
            let meta = txn.open_table(META).map_err(io)?;
            let get = |k: &str| -> Result<Option<Vec<u8>>, StorageError<NodeId>> {
                Ok(meta.get(k).map_err(io)?.map(|v| v.value().to_vec()))
            };
            let applied: Option<LogId<NodeId>> = get("applied")?.map(|b| dec(&b)).transpose()?.flatten();
            let membership: StoredMembership<NodeId, BasicNode> =
                get("membership")?.map(|b| dec(&b)).transpose()?.unwrap_or_default();
            (machine, audit, applied, membership)
        };
        let data = enc(&SnapshotData { machine, audit })?;
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id: format!("{}-{}", applied.map(|l| l.index).unwrap_or(0), data.len()),
        };
        *self.snapshot.lock().unwrap() = Some((meta.clone(), data.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

/// Reaches the other control nodes on their API ports, with this node's
/// certificate (they accept Raft messages only from control certificates
/// of members).
#[derive(Clone)]
pub struct Network {
    client: ClusterClient,
    members: Arc<BTreeMap<NodeId, ControlMember>>,
}

pub struct Connection {
    client: ClusterClient,
    member: Option<ControlMember>,
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection { client: self.client.clone(), member: self.members.get(&target).cloned(), target }
    }
}

impl Connection {
    async fn rpc<Req, Resp, E>(&self, what: &str, req: &Req, timeout: Duration) -> Result<Resp, rpc::Error<E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let member =
            self.member.as_ref().ok_or_else(|| rpc::unreachable(format!("no control node {}", self.target)))?;
        let target = member.target().map_err(|e| rpc::unreachable(e.to_string()))?;
        let body = serde_json::to_vec(req).map_err(rpc::encoding)?;
        let path = format!("/v1/internal/raft/{what}");
        let a = self
            .client
            .call(&target, Method::POST, &path, body.into(), timeout)
            .await
            .map_err(|e| rpc::unreachable(format!("{}: {e}", member.name)))?;
        rpc::answer(self.target, &member.name, a.status.as_u16(), &a.body)
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

/// Why a change was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// Nothing was recorded; safe to retry at the leader.
    #[error("this control node does not lead the control plane (leader: {})", .leader.as_deref().unwrap_or("none yet"))]
    NotLeader { leader: Option<String> },
    /// The change may or may not have been recorded (the node failed
    /// midway); read the state before retrying.
    #[error("the control plane could not record the change: {0}")]
    Failed(String),
}

/// This node's part of the replicated control plane.
pub struct Consensus {
    pub raft: Raft,
    pub store: Store,
    pub node_id: NodeId,
    pub members: Arc<BTreeMap<NodeId, ControlMember>>,
}

impl Consensus {
    /// Starts this node (`me` is the name in its certificate) of the group
    /// `members` (empty: a group of one, `me` at `own_url`).
    pub async fn start(
        data_dir: &Path,
        me: &str,
        own_url: &str,
        members: &[ControlMember],
        heartbeat_ms: u64,
        client: ClusterClient,
    ) -> Result<Arc<Consensus>, String> {
        let list: Vec<ControlMember> = if members.is_empty() {
            vec![ControlMember { name: me.to_string(), url: own_url.to_string() }]
        } else {
            members.to_vec()
        };
        let members: BTreeMap<NodeId, ControlMember> =
            list.into_iter().enumerate().map(|(i, m)| (i as NodeId + 1, m)).collect();
        let node_id = *members
            .iter()
            .find(|(_, m)| m.name == me)
            .ok_or_else(|| format!("this node's certificate is for {me:?}, which the members list does not name"))?
            .0;
        let store = Store::open(&data_dir.join("control.redb"))?;
        let config = openraft::Config {
            cluster_name: "meridian-control".into(),
            heartbeat_interval: heartbeat_ms,
            election_timeout_min: heartbeat_ms * 4,
            election_timeout_max: heartbeat_ms * 6,
            max_payload_entries: 300,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| e.to_string())?);
        let members = Arc::new(members);
        let network = Network { client, members: members.clone() };
        let raft =
            Raft::new(node_id, config, network, store.log.clone(), store.clone()).await.map_err(|e| e.to_string())?;
        let c = Arc::new(Consensus { raft, store, node_id, members });
        // The first member forms the group at once (so it is the first
        // leader); the others only if nobody has contacted them for a while
        // (the first is down). Proposing the same membership twice is safe.
        let delay = if node_id == 1 { Duration::ZERO } else { Duration::from_secs(10) };
        let g = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if g.raft.is_initialized().await.unwrap_or(true) {
                return;
            }
            let nodes: BTreeMap<NodeId, BasicNode> =
                g.members.iter().map(|(id, m)| (*id, BasicNode { addr: m.name.clone() })).collect();
            if let Err(e) = g.raft.initialize(nodes).await {
                tracing::debug!(error = %e, "control group already initialized");
            }
        });
        Ok(c)
    }

    /// Reads the machine as this node last applied it.
    pub fn read<T>(&self, f: impl FnOnce(&Machine) -> T) -> T {
        f(&self.store.machine.lock().unwrap())
    }

    /// Ticks after every apply.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.store.changed.subscribe()
    }

    pub fn me(&self) -> &ControlMember {
        &self.members[&self.node_id]
    }

    /// The current leader, as this node knows it.
    pub fn leader(&self) -> Option<ControlMember> {
        let id = self.raft.metrics().borrow().current_leader?;
        self.members.get(&id).cloned()
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader == Some(self.node_id) && m.state.is_leader()
    }

    /// Waits up to `wait` for some node to lead.
    pub async fn await_leader(&self, wait: Duration) -> Option<ControlMember> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Records a change through the log; returns once this node applied it.
    pub async fn propose(&self, cmd: Command) -> Result<Reply, ProposeError> {
        match self.raft.client_write(cmd).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(ProposeError::NotLeader {
                leader: f.leader_id.and_then(|id| self.members.get(&id)).map(|m| m.name.clone()),
            }),
            Err(e) => Err(ProposeError::Failed(e.to_string())),
        }
    }

    /// `POST /v1/internal/raft/{append|vote|snapshot}` from another member.
    pub async fn handle_rpc(&self, what: &str, body: Bytes) -> http::Response<Body> {
        fn answer<T: serde::Serialize>(r: T) -> http::Response<Body> {
            json(StatusCode::OK, &r)
        }
        let bad = |e: serde_json::Error| text(StatusCode::BAD_REQUEST, format!("not a Raft message: {e}"));
        match what {
            "append" => match serde_json::from_slice::<AppendEntriesRequest<TypeConfig>>(&body) {
                Ok(req) => answer(self.raft.append_entries(req).await),
                Err(e) => bad(e),
            },
            "vote" => match serde_json::from_slice::<VoteRequest<NodeId>>(&body) {
                Ok(req) => answer(self.raft.vote(req).await),
                Err(e) => bad(e),
            },
            "snapshot" => match serde_json::from_slice::<InstallSnapshotRequest<TypeConfig>>(&body) {
                Ok(req) => answer(self.raft.install_snapshot(req).await),
                Err(e) => bad(e),
            },
            other => text(StatusCode::NOT_FOUND, format!("no Raft message {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changes_apply_only_over_the_revision_they_were_computed_from() {
        let mut m = Machine::default();
        let mut s = ControlState::default();
        s.deleting.insert("old".into(), Default::default());
        let (r, _) = m.apply(&Command::SetState { revision: 0, state: s.clone() }, 1);
        assert!(r.applied);
        assert_eq!(m.revision, 1);
        // A second writer that read revision 0 loses and changes nothing.
        let (r, _) = m.apply(&Command::SetState { revision: 0, state: ControlState::default() }, 1);
        assert!(!r.applied);
        assert!(m.state.deleting.contains_key("old"));
    }

    /// Clients changing the state at once, each the way `Control::update`
    /// does (read, change, propose over the revision read; on a lost
    /// compare-and-set read again), interleaved at random — and some
    /// proposals lost (a deposed leader's, which never commit): no
    /// acknowledged change is lost, none is applied twice, audit numbers
    /// have no gap. Reproducible from the seed; 200 seeds.
    #[test]
    fn concurrent_changes_through_the_log_lose_nothing_under_any_interleaving() {
        for seed in 1..=200u64 {
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut rng = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut m = Machine::default();
            // Per client: how many of its changes are acknowledged, and a
            // read (revision, state) waiting to be proposed.
            let clients = 4;
            let mut acked = vec![0u32; clients];
            let mut pending: Vec<Option<(u64, ControlState)>> = vec![None; clients];
            let mut audits = 0;
            for _ in 0..400 {
                let c = (rng() % clients as u64) as usize;
                match pending[c].take() {
                    None => pending[c] = Some((m.revision, m.state.clone())),
                    Some((revision, mut state)) => {
                        // The change: the client's next marker.
                        let key = format!("c{c}-{}", acked[c]);
                        state.deleting.insert(key, Default::default());
                        if rng() % 5 == 0 {
                            continue; // proposed to a leader that lost its lead: never applied
                        }
                        let (r, _) = m.apply(&Command::SetState { revision, state }, 0);
                        if r.applied {
                            acked[c] += 1;
                        }
                    }
                }
                if rng() % 3 == 0 {
                    let e = audit::Entry {
                        seq: 0,
                        at_ms: 1,
                        who: "admin".into(),
                        action: "x".into(),
                        app: None,
                        detail: String::new(),
                        outcome: "ok".into(),
                    };
                    audits += 1;
                    assert_eq!(m.apply(&Command::Audit { entry: e }, 1).1.unwrap().seq, audits, "seed {seed}");
                }
            }
            for (c, n) in acked.iter().enumerate() {
                for i in 0..*n {
                    assert!(m.state.deleting.contains_key(&format!("c{c}-{i}")), "seed {seed}: c{c}'s change {i} lost");
                }
            }
            let total: u32 = acked.iter().sum();
            assert_eq!(m.state.deleting.len() as u32, total, "seed {seed}: a change applied twice or unacknowledged");
            assert_eq!(m.revision, total as u64, "seed {seed}");
        }
    }

    /// A rollout halting (rollback = "region") pauses itself after rolling
    /// the failed region back; an operator who aborted in the meantime
    /// must not see the abort replaced by that pause (the rollout then
    /// waited for a decision already given, and `meridian deploy` hung).
    #[test]
    fn a_halting_rollout_pausing_itself_keeps_an_abort_given_meanwhile() {
        let version: VersionId = "b".repeat(64).parse().unwrap();
        let record = RolloutRecord {
            app: "a".into(),
            version,
            old: None,
            state: "halted: eu 50%: errors".into(),
            command: Steering::Run,
            approvals: 0,
            steps: vec![],
            waves: vec![],
            rollout: Default::default(),
            smoke: vec![],
            installs: vec![],
            started_ms: 0,
            stopped: None,
            by: "admin".into(),
        };
        let steer = |command, unless_aborted| Command::Steer {
            app: "a".into(),
            command: Some(command),
            approve: false,
            unless_aborted,
        };
        let mut m = Machine::default();
        m.apply(&Command::Rollout { record: Box::new(record) }, 0);
        // Nobody decided yet: the halt pauses.
        assert!(m.apply(&steer(Steering::Pause, true), 0).0.applied);
        assert_eq!(m.rollouts["a"].command, Steering::Pause);
        // An operator aborts, then a (late) halt pauses again: the abort stands.
        m.apply(&steer(Steering::Abort, false), 0);
        m.apply(&steer(Steering::Pause, true), 0);
        assert_eq!(m.rollouts["a"].command, Steering::Abort);
        // An operator's own word always applies.
        m.apply(&steer(Steering::Run, false), 0);
        assert_eq!(m.rollouts["a"].command, Steering::Run);
    }

    #[test]
    fn audit_entries_are_numbered_when_applied_without_gaps() {
        let mut m = Machine::default();
        let e = audit::Entry {
            seq: 99,
            at_ms: 0,
            who: "admin".into(),
            action: "deploy".into(),
            app: None,
            detail: String::new(),
            outcome: "ok".into(),
        };
        let seqs: Vec<u64> = (0..3).map(|_| m.apply(&Command::Audit { entry: e.clone() }, 7).1.unwrap().seq).collect();
        assert_eq!(seqs, vec![1, 2, 3], "the proposer's number is ignored");
        assert_eq!(m.apply(&Command::Audit { entry: e }, 7).1.unwrap().at_ms, 7);
    }
}
