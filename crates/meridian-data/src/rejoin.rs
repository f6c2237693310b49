//! Rejoining before serving. A region whose store was just opened — it
//! restarted, was wiped, or the app is new here — may be missing writes
//! its peers acknowledged while it was away. Until it holds what its
//! reachable peers held when it came back, it says so: its health probe
//! answers 503 (edges keep users away) and requests that reach it anyway
//! are handed to a peer. Or until a bound passes, after which it serves
//! what it has and says that too.
//!
//! "Holds what a peer held" is one anti-entropy round against that peer,
//! started after the return and read from the peer's flushed tree: a round
//! pulls everything the peer held at its start that differs here, so the
//! writes the peer had acknowledged — its own, and any it had from others —
//! are here when it ends. A peer that cannot be reached (nothing could be
//! sent) is not waited for: what only it holds arrives when it is back.

use crate::antientropy::SyncError;
use crate::kv::KvService;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a region's store is in rejoining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Still pulling what reachable peers hold: not serving.
    CatchingUp,
    /// Holds what every reachable peer held when it started catching up.
    CaughtUp,
    /// The bound passed first: serving what it has.
    GaveUp,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::CatchingUp => "catching_up",
            Phase::CaughtUp => "caught_up",
            Phase::GaveUp => "gave_up",
        }
    }
}

pub struct Rejoin {
    /// The longest a region keeps users away while catching up.
    pub bound: Duration,
    opened: Instant,
    begun: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
}

struct State {
    phase: Phase,
    took: Option<Duration>,
    caught_up_with: Vec<String>,
    unreachable: Vec<String>,
    repaired: u64,
}

impl Rejoin {
    pub fn new(bound: Duration) -> Rejoin {
        Rejoin {
            bound,
            opened: Instant::now(),
            begun: Default::default(),
            state: Mutex::new(State {
                phase: Phase::CatchingUp,
                took: None,
                caught_up_with: Vec::new(),
                unreachable: Vec::new(),
                repaired: 0,
            }),
        }
    }

    pub fn phase(&self) -> Phase {
        self.state.lock().unwrap().phase
    }

    /// Whether users should be kept away from this store's data.
    pub fn catching_up(&self) -> bool {
        self.phase() == Phase::CatchingUp
    }

    pub fn status(&self) -> meridian_core::wire::RejoinStatus {
        let s = self.state.lock().unwrap();
        meridian_core::wire::RejoinStatus {
            state: s.phase.as_str().to_string(),
            waited_ms: s.took.unwrap_or_else(|| self.opened.elapsed()).as_millis() as u64,
            bound_ms: self.bound.as_millis() as u64,
            caught_up_with: s.caught_up_with.clone(),
            unreachable: s.unreachable.clone(),
            records_repaired: s.repaired,
        }
    }

    fn finish(&self, phase: Phase) {
        let mut s = self.state.lock().unwrap();
        s.phase = phase;
        s.took = Some(self.opened.elapsed());
    }
}

/// Starts catching up, once per store: when the app's namespaces are known
/// (its version is activated), since a round covers those.
pub fn start(svc: &Arc<KvService>) {
    if !svc.rejoin.begun.swap(true, std::sync::atomic::Ordering::SeqCst) {
        tokio::spawn(run(svc.clone()));
    }
}

/// Catches `svc`'s store up with every reachable peer, then marks it
/// serving; at most `svc.rejoin.bound` (then it serves anyway, saying so).
async fn run(svc: Arc<KvService>) {
    let peers = svc.peers.load_full();
    let each = futures::future::join_all(peers.iter().map(|p| {
        let svc = svc.clone();
        async move {
            loop {
                match crate::repl::anti_entropy_once(&svc, p, true).await {
                    Ok(n) => {
                        let mut s = svc.rejoin.state.lock().unwrap();
                        s.caught_up_with.push(p.name.clone());
                        s.repaired += n as u64;
                        return;
                    }
                    Err(SyncError::Unreachable(e)) => {
                        tracing::info!(peer = %p.name, error = %e, "rejoining without an unreachable peer");
                        svc.rejoin.state.lock().unwrap().unreachable.push(p.name.clone());
                        return;
                    }
                    Err(e) if !e.retry_safe() => {
                        tracing::warn!(peer = %p.name, error = %e, "cannot catch up with this peer; not waiting for it");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(peer = %p.name, error = %e, "catch-up round failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }));
    let phase = match tokio::time::timeout(svc.rejoin.bound, each).await {
        Ok(_) => Phase::CaughtUp,
        Err(_) => Phase::GaveUp,
    };
    svc.rejoin.finish(phase);
    let st = svc.rejoin.status();
    match phase {
        Phase::GaveUp => tracing::warn!(
            app = %svc.app, waited_ms = st.waited_ms, caught_up_with = ?st.caught_up_with,
            "serving before catching up with every reachable peer (the rejoin bound passed)"
        ),
        _ => tracing::info!(
            app = %svc.app, waited_ms = st.waited_ms, caught_up_with = ?st.caught_up_with,
            unreachable = ?st.unreachable, repaired = st.records_repaired, "caught up; serving"
        ),
    }
}
