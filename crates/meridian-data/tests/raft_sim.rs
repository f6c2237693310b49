//! A seeded simulation of a `strong` namespace's Raft group: three real
//! members (openraft, `GroupStore` on redb, Meridian's own election pacing
//! and pre-vote) on a simulated network and tokio's paused clock. One seed
//! chooses message delays, slow messages, crashes and restarts (the leader
//! more often than not), members cut off from the others, single cut links,
//! and what three clients do (writes of unique values, increments under
//! idempotency keys retried until they succeed, linearizable reads), each
//! at one member as a client in that region would.
//!
//! Checked at the end of every seed: every key's history is linearizable
//! (Wing & Gong with Lowe's memoization, the checker the multi-process test
//! uses); the counter equals the increments acknowledged (each applied
//! once, however often it was retried); every member's state machine is the
//! same; and after every fault that took the leader away, a new leader
//! came within the bound (election timeout + the election's round trips).
//!
//! `SIM_SEEDS=n` runs seeds 0..n (CI: 12), `SIM_SEED=s` one seed,
//! `SIM_TRACE=1` prints its faults. Time is virtual, so a seed's faults,
//! delays and operations are fixed by the seed; openraft's own `select!`
//! is fair at random (tokio), so the order of two events due at the same
//! virtual instant can differ between runs of one seed.

#[path = "../../meridian-cli/tests/support/lincheck.rs"]
mod lincheck;

use meridian_data::election;
use meridian_data::strong::{
    self, answer_pre_vote, append_taken, heard_if, Campaigner, Command, GroupStore, NodeId, PreVoteRequest,
    PreVoteResponse, Raft, Stored, TypeConfig,
};
use meridian_raft::rpc;
use openraft::error::{ClientWriteError, InstallSnapshotError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{sleep, Instant};

const MEMBERS: [NodeId; 3] = [1, 2, 3];
/// Virtual time the clients run for.
const RUN: Duration = Duration::from_secs(12);
/// Longest one-way delay (a slow message aside).
const MAX_DELAY_MS: u64 = 60;

/// The simulated network and the members running on it.
struct Net {
    running: Mutex<BTreeMap<NodeId, Arc<Member>>>,
    rng: Mutex<rand::rngs::StdRng>,
    /// Directed links that lose everything (a black hole).
    cut: Mutex<BTreeSet<(NodeId, NodeId)>>,
}

impl Net {
    fn delay(&self) -> Duration {
        let mut rng = self.rng.lock().unwrap();
        // One message in fifty is slow (a retransmission): it may outlive
        // the heartbeat timeout.
        if rng.random_bool(0.02) {
            return Duration::from_millis(rng.random_range(200..600));
        }
        Duration::from_millis(rng.random_range(2..=MAX_DELAY_MS))
    }

    fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.cut.lock().unwrap().contains(&(from, to))
    }

    /// Delivers a request from `from` to `to` and its answer back, or
    /// fails: `to` is down (refused), or a cut link lost the message and
    /// `ttl` passed. An answer lost on the way back still did its work.
    async fn deliver<R, F, Fut>(self: &Arc<Self>, from: NodeId, to: NodeId, ttl: Duration, f: F) -> Result<R, String>
    where
        F: FnOnce(Arc<Member>) -> Fut,
        Fut: std::future::Future<Output = R>,
    {
        let (there, back) = (self.delay(), self.delay());
        let work = async {
            sleep(there).await;
            if self.is_cut(from, to) {
                std::future::pending::<()>().await;
            }
            let m = self.running.lock().unwrap().get(&to).cloned().ok_or_else(|| format!("{to} is down"))?;
            let r = f(m).await;
            sleep(back).await;
            if self.is_cut(to, from) {
                std::future::pending::<()>().await;
            }
            Ok(r)
        };
        tokio::time::timeout(ttl, work).await.map_err(|_| format!("no answer from {to} within {ttl:?}"))?
    }
}

struct Member {
    id: NodeId,
    raft: Raft,
    store: GroupStore,
    pacer: Mutex<election::Pacer>,
    timing: election::Timing,
    net: Arc<Net>,
}

impl Campaigner for Member {
    fn raft(&self) -> &Raft {
        &self.raft
    }
    fn node_id(&self) -> NodeId {
        self.id
    }
    fn others(&self) -> Vec<NodeId> {
        MEMBERS.iter().copied().filter(|m| *m != self.id).collect()
    }
    fn rank(&self) -> u32 {
        self.id as u32 - 1
    }
    fn timing(&self) -> &election::Timing {
        &self.timing
    }
    fn pacer(&self) -> &Mutex<election::Pacer> {
        &self.pacer
    }
    async fn ask_pre_vote(&self, to: NodeId, req: PreVoteRequest) -> Result<PreVoteResponse, String> {
        let ttl = Duration::from_millis(strong::raft_config().heartbeat_interval);
        self.net.deliver(self.id, to, ttl, |m| async move { answer_pre_vote(m.as_ref(), &req) }).await
    }
}

struct Conn {
    from: NodeId,
    to: NodeId,
    net: Arc<Net>,
}

struct Factory {
    from: NodeId,
    net: Arc<Net>,
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Conn;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Conn {
        Conn { from: self.from, to: target, net: self.net.clone() }
    }
}

fn remote<E: std::error::Error>(to: NodeId, e: RaftError<NodeId, E>) -> rpc::Error<E> {
    RPCError::RemoteError(RemoteError::new(to, e))
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, rpc::Error<openraft::error::Infallible>> {
        let to = self.to;
        let r = self
            .net
            .deliver(self.from, to, option.hard_ttl(), |m| async move {
                let resp = m.raft.append_entries(req).await;
                heard_if(m.as_ref(), append_taken(&resp));
                resp
            })
            .await
            .map_err(rpc::unreachable)?;
        r.map_err(|e| remote(to, e))
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, rpc::Error<InstallSnapshotError>> {
        let to = self.to;
        let r = self
            .net
            .deliver(self.from, to, option.hard_ttl(), |m| async move {
                let resp = m.raft.install_snapshot(req).await;
                heard_if(m.as_ref(), resp.is_ok());
                resp
            })
            .await
            .map_err(rpc::unreachable)?;
        r.map_err(|e| remote(to, e))
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, rpc::Error<openraft::error::Infallible>> {
        let to = self.to;
        let r = self
            .net
            .deliver(self.from, to, option.hard_ttl(), |m| async move {
                let resp = m.raft.vote(req).await;
                heard_if(m.as_ref(), matches!(&resp, Ok(v) if v.vote_granted));
                resp
            })
            .await
            .map_err(rpc::unreachable)?;
        r.map_err(|e| remote(to, e))
    }
}

fn path_of(dir: &std::path::Path, id: NodeId) -> PathBuf {
    dir.join(format!("member-{id}.redb"))
}

/// Starts (or restarts, on its files) member `id`.
async fn start(net: &Arc<Net>, dir: &std::path::Path, id: NodeId, seed: u64) {
    // A crashed member's database closes once its last user lets go.
    let store = loop {
        match GroupStore::open(&path_of(dir, id)) {
            Ok(s) => break s,
            Err(_) => sleep(Duration::from_millis(5)).await,
        }
    };
    let config = Arc::new(strong::raft_config().validate().unwrap());
    let raft = Raft::new(id, config, Factory { from: id, net: net.clone() }, store.log(), store.clone()).await.unwrap();
    let timing = strong::timing();
    let m = Arc::new(Member {
        id,
        raft,
        store,
        pacer: Mutex::new(election::Pacer::new(strong::now(), &timing)),
        timing,
        net: net.clone(),
    });
    tokio::spawn(strong::campaign(Arc::downgrade(&m), seed ^ id));
    net.running.lock().unwrap().insert(id, m);
}

async fn crash(net: &Arc<Net>, id: NodeId) {
    let m = net.running.lock().unwrap().remove(&id);
    if let Some(m) = m {
        let _ = m.raft.shutdown().await;
    }
}

/// A running leader other than `not`, and its term.
fn leader_and_term(net: &Net, not: Option<NodeId>) -> Option<(NodeId, u64)> {
    let running = net.running.lock().unwrap();
    running.values().filter(|m| Some(m.id) != not).find_map(|m| {
        let x = m.raft.metrics().borrow().clone();
        x.state.is_leader().then_some((m.id, x.current_term))
    })
}

fn leader(net: &Net) -> Option<NodeId> {
    let running = net.running.lock().unwrap();
    running.values().find(|m| m.raft.metrics().borrow().state.is_leader()).map(|m| m.id)
}

#[derive(Default)]
struct History {
    /// Per key, for the linearizability checker.
    ops: BTreeMap<String, Vec<lincheck::Op>>,
    increments_acked: u64,
    increments_unresolved: u64,
}

fn micros(t0: Instant) -> u64 {
    t0.elapsed().as_micros() as u64
}

/// One client at member `home` (another when that one is down or does not
/// lead, as a region forwards to the leader).
async fn client(net: Arc<Net>, id: u64, seed: u64, t0: Instant, h: Arc<Mutex<History>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(id));
    let mut at: NodeId = rng.random_range(1..=3);
    let mut n = 0u64;
    while t0.elapsed() < RUN {
        n += 1;
        let key = format!("k{}", rng.random_range(0..3));
        let choice = rng.random_range(0..10);
        if choice < 4 {
            // A write of a unique value: one attempt per member until one
            // leads; a timeout leaves its outcome unknown.
            let v = id * 1_000_000 + n;
            let call = micros(t0);
            let at_op = {
                let mut h = h.lock().unwrap();
                let ops = h.ops.entry(key.clone()).or_default();
                ops.push(lincheck::Op { call, ret: None, kind: lincheck::Kind::Write(v) });
                ops.len() - 1
            };
            let cmd = Command::Set { key: key.clone(), value: v.to_string().into_bytes() };
            for _ in 0..20 {
                match write(&net, &mut at, cmd.clone()).await {
                    Attempt::Done => {
                        h.lock().unwrap().ops.get_mut(&key).unwrap()[at_op].ret = Some(micros(t0));
                        break;
                    }
                    Attempt::NotApplied => continue,
                    Attempt::Unknown => break,
                }
            }
        } else if choice < 7 {
            // An increment under an idempotency key, retried until it is
            // acknowledged (or the run is long over).
            let cmd = Command::Once {
                key: format!("c{id}-{n}"),
                command: Box::new(Command::Increment { key: "counter".into(), delta: 1 }),
            };
            let mut acked = false;
            while t0.elapsed() < RUN + Duration::from_secs(30) {
                if let Attempt::Done = write(&net, &mut at, cmd.clone()).await {
                    acked = true;
                    break;
                }
                sleep(Duration::from_millis(50)).await;
            }
            let mut h = h.lock().unwrap();
            if acked {
                h.increments_acked += 1;
            } else {
                h.increments_unresolved += 1;
            }
        } else {
            let call = micros(t0);
            if let Some(v) = read(&net, &mut at, &key).await {
                let ret = micros(t0);
                let v = v.map(|b| String::from_utf8(b).unwrap().parse::<u64>().unwrap());
                h.lock().unwrap().ops.entry(key).or_default().push(lincheck::Op {
                    call,
                    ret: Some(ret),
                    kind: lincheck::Kind::Read(v),
                });
            }
        }
        sleep(Duration::from_millis(rng.random_range(5..40))).await;
    }
}

enum Attempt {
    Done,
    NotApplied,
    Unknown,
}

/// One write at member `at`; follows a named leader, else tries another.
async fn write(net: &Arc<Net>, at: &mut NodeId, cmd: Command) -> Attempt {
    let m = net.running.lock().unwrap().get(at).cloned();
    let Some(m) = m else {
        *at = *at % 3 + 1;
        sleep(Duration::from_millis(20)).await;
        return Attempt::NotApplied;
    };
    match tokio::time::timeout(Duration::from_secs(3), m.raft.client_write(cmd)).await {
        Ok(Ok(_)) => Attempt::Done,
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            match f.leader_id {
                Some(l) if l != *at => *at = l,
                _ => {
                    *at = *at % 3 + 1;
                    sleep(Duration::from_millis(50)).await;
                }
            }
            Attempt::NotApplied
        }
        // Proposed, then the member stopped, or no commit in time.
        Ok(Err(_)) | Err(_) => Attempt::Unknown,
    }
}

/// A linearizable read at member `at` (following the leader); `None` if it
/// failed (a failed read tells nothing).
async fn read(net: &Arc<Net>, at: &mut NodeId, key: &str) -> Option<Option<Vec<u8>>> {
    for _ in 0..5 {
        let m = net.running.lock().unwrap().get(at).cloned();
        let Some(m) = m else {
            *at = *at % 3 + 1;
            continue;
        };
        match tokio::time::timeout(Duration::from_secs(3), m.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => return Some(m.store.read(key).unwrap().map(|v| v.visible())),
            Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)))) => {
                match f.leader_id {
                    Some(l) if l != *at => *at = l,
                    _ => {
                        *at = *at % 3 + 1;
                        sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            _ => return None,
        }
    }
    None
}

#[derive(Debug)]
enum Fault {
    Crash(NodeId),
    Isolate(NodeId),
    CutLink(NodeId, NodeId),
}

/// The most a group may go without a leader after the leader is taken away
/// (crashed or cut off): the lease, two rank steps (the first asker may be
/// refused for a shorter log), a back-off, and a pre-vote and a vote round
/// trip on the slowest links here (two slow messages: 2 x 600 ms).
fn leaderless_bound() -> Duration {
    let t = strong::timing();
    t.lease + 2 * t.step + 2 * t.retry + Duration::from_millis(4 * MAX_DELAY_MS) + Duration::from_millis(1200)
}

async fn run_seed(seed: u64, trace: bool) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let net = Arc::new(Net {
        running: Mutex::default(),
        rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        cut: Mutex::default(),
    });
    for id in MEMBERS {
        start(&net, dir.path(), id, seed).await;
    }
    let nodes = MEMBERS.iter().map(|id| (*id, BasicNode { addr: id.to_string() })).collect::<BTreeMap<_, _>>();
    let first = net.running.lock().unwrap().get(&1).cloned().unwrap();
    first.raft.initialize(nodes).await.map_err(|e| e.to_string())?;
    drop(first);
    let t0 = Instant::now();
    while leader(&net).is_none() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err("the group never elected its first leader".into());
        }
        sleep(Duration::from_millis(10)).await;
    }

    let t0 = Instant::now();
    if trace {
        // Every change of a member's role or term, as it happens.
        let net = net.clone();
        tokio::spawn(async move {
            let mut seen = BTreeMap::new();
            while t0.elapsed() < RUN + Duration::from_secs(5) {
                let now: Vec<_> = {
                    let running = net.running.lock().unwrap();
                    running.values().map(|m| (m.id, m.raft.metrics().borrow().clone())).collect()
                };
                for (id, m) in now {
                    let v = (format!("{:?}", m.state), m.current_term, m.current_leader);
                    if seen.get(&id) != Some(&v) {
                        eprintln!("  {:?}: member {id}: {} term {} leader {:?}", t0.elapsed(), v.0, v.1, v.2);
                        seen.insert(id, v);
                    }
                }
                sleep(Duration::from_millis(5)).await;
            }
        });
    }
    let h: Arc<Mutex<History>> = Arc::default();
    let clients: Vec<_> = (1..=3).map(|c| tokio::spawn(client(net.clone(), c, seed, t0, h.clone()))).collect();

    // Faults, one at a time, from the seed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut log = Vec::new();
    let mut leaderless = Vec::new();
    while t0.elapsed() < RUN - Duration::from_secs(2) {
        sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        let current = leader(&net);
        let victim = match current {
            Some(l) if rng.random_bool(0.6) => l,
            _ => rng.random_range(1..=3),
        };
        let fault = match rng.random_range(0..3) {
            0 => Fault::Crash(victim),
            1 => Fault::Isolate(victim),
            _ => Fault::CutLink(victim, victim % 3 + 1),
        };
        let at = t0.elapsed();
        match fault {
            Fault::Crash(id) => crash(&net, id).await,
            Fault::Isolate(id) => {
                let mut cut = net.cut.lock().unwrap();
                for o in MEMBERS.iter().filter(|o| **o != id) {
                    cut.insert((id, *o));
                    cut.insert((*o, id));
                }
            }
            Fault::CutLink(a, b) => {
                let mut cut = net.cut.lock().unwrap();
                cut.insert((a, b));
                cut.insert((b, a));
            }
        }
        // Did it take the leader away? Then time the next one.
        let lost = match fault {
            Fault::Crash(id) | Fault::Isolate(id) => current == Some(id),
            Fault::CutLink(..) => false,
        };
        let lasting = Duration::from_millis(rng.random_range(800..4000));
        let began = Instant::now();
        let mut elected = None;
        if lost {
            let old = current;
            loop {
                let l = leader_and_term(&net, old);
                elected = l;
                if l.is_some() || began.elapsed() > lasting {
                    leaderless.push((format!("{fault:?} at {at:?}"), began.elapsed(), l.is_some(), lasting));
                    break;
                }
                sleep(Duration::from_millis(5)).await;
            }
        }
        sleep(lasting.saturating_sub(began.elapsed())).await;
        // One election per lost leader: the new one still leads, in the
        // same term (no second candidate deposed it).
        if let Some((l, term)) = elected {
            let now = leader_and_term(&net, current);
            if now != Some((l, term)) {
                return Err(format!(
                    "after {fault:?} at {at:?}, {l} was elected in term {term}, but before the fault healed the leader was {now:?}\n{}",
                    log.join("\n")
                ));
            }
        }
        match fault {
            Fault::Crash(id) => start(&net, dir.path(), id, seed).await,
            Fault::Isolate(_) | Fault::CutLink(..) => net.cut.lock().unwrap().clear(),
        }
        log.push(format!("{at:?}: {fault:?} for {lasting:?}"));
        if trace {
            eprintln!("seed {seed}: {}", log.last().unwrap());
        }
    }
    for c in clients {
        c.await.map_err(|e| e.to_string())?;
    }

    // Healed and all up: one more write commits everywhere.
    let t_end = Instant::now();
    let mut at = 1;
    loop {
        if let Attempt::Done = write(&net, &mut at, Command::Set { key: "final".into(), value: b"1".to_vec() }).await {
            break;
        }
        if t_end.elapsed() > Duration::from_secs(30) {
            return Err(format!("no write commits after everything healed\n{}", log.join("\n")));
        }
    }
    // The leader's log is what is committed (a member may still hold an
    // entry of a deposed leader past it, until the next write replaces it).
    let target = {
        let running = net.running.lock().unwrap();
        running.get(&at).and_then(|m| m.raft.metrics().borrow().last_log_index)
    };
    loop {
        let applied: Vec<_> = {
            let running = net.running.lock().unwrap();
            running.values().map(|m| m.raft.metrics().borrow().last_applied.map(|l| l.index)).collect()
        };
        if applied.len() == 3 && applied.iter().all(|a| *a >= target) {
            break;
        }
        if t_end.elapsed() > Duration::from_secs(60) {
            return Err(format!("members did not all apply index {target:?}: {applied:?}"));
        }
        sleep(Duration::from_millis(20)).await;
    }

    // Checkers.
    let h = std::mem::take(&mut *h.lock().unwrap());
    for (key, ops) in &h.ops {
        lincheck::check(ops, None).map_err(|e| format!("key {key} is not linearizable: {e}\n{}", log.join("\n")))?;
    }
    let members: Vec<Arc<Member>> = net.running.lock().unwrap().values().cloned().collect();
    let counter = |m: &Member| match m.store.read("counter").unwrap().map(|v| v.value) {
        Some(Stored::Counter(n)) => n as u64,
        _ => 0,
    };
    let total = counter(&members[0]);
    if total < h.increments_acked || total > h.increments_acked + h.increments_unresolved {
        return Err(format!(
            "counter {total}, {} increments acknowledged ({} unresolved): an increment was applied twice or lost\n{}",
            h.increments_acked,
            h.increments_unresolved,
            log.join("\n")
        ));
    }
    for m in &members[1..] {
        for key in ["k0", "k1", "k2", "counter", "final"] {
            let a = members[0].store.read(key).unwrap();
            let b = m.store.read(key).unwrap();
            if a != b {
                return Err(format!("members 1 and {} differ at {key}: {a:?} vs {b:?}", m.id));
            }
        }
    }
    for (what, took, elected, lasting) in &leaderless {
        if !elected && *lasting > leaderless_bound() {
            return Err(format!("no new leader within {lasting:?} after {what}\n{}", log.join("\n")));
        }
        if *elected && *took > leaderless_bound() {
            return Err(format!(
                "a new leader came {took:?} after {what} (bound {:?})\n{}",
                leaderless_bound(),
                log.join("\n")
            ));
        }
    }
    for m in members {
        let _ = m.raft.shutdown().await;
    }
    let worst = leaderless.iter().filter(|l| l.2).map(|l| l.1).max();
    Ok(format!(
        "{} ops, {} increments acked, {} faults, {} took the leader (longest without one {:?})",
        h.ops.values().map(Vec::len).sum::<usize>(),
        h.increments_acked,
        log.len(),
        leaderless.len(),
        worst
    ))
}

fn run(seed: u64, trace: bool) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    rt.block_on(run_seed(seed, trace))
}

#[test]
fn a_strong_group_stays_linearizable_and_fails_over_in_bounded_time_under_seeded_faults() {
    let trace = std::env::var("SIM_TRACE").is_ok();
    let seeds: Vec<u64> = match (std::env::var("SIM_SEED"), std::env::var("SIM_SEEDS")) {
        (Ok(s), _) => vec![s.parse().expect("SIM_SEED is a number")],
        (_, Ok(n)) => (0..n.parse().expect("SIM_SEEDS is a number")).collect(),
        _ => (0..12).collect(),
    };
    for seed in seeds {
        match run(seed, trace) {
            Ok(summary) => eprintln!("seed {seed}: {summary}"),
            Err(e) => panic!("seed {seed} failed (replay: SIM_SEED={seed} SIM_TRACE=1): {e}"),
        }
    }
}
