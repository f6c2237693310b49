//! Replication of `global` (and allowed `regional`) namespaces between
//! regions.
//!
//! Push: every region streams its own log to every peer, in order, from the
//! peer's cursor (persisted as the peer acknowledges), over one long-lived
//! HTTP request per peer: messages go out as soon as writes commit, without
//! waiting for the previous acknowledgement (so the lag is the link delay,
//! not a round trip per batch), and the receiver queues them for commit as
//! they arrive (consecutive messages share an fsync). The stream survives
//! restarts of either side: it resumes from the persisted cursor. The receiver tracks, per origin and
//! origin incarnation, the last sequence it applied; a message that starts
//! beyond that is refused with what the receiver has ("gap"), and the sender
//! rewinds, or sends a full snapshot if its log no longer reaches back that
//! far (a wiped or new region is rebuilt this way).
//!
//! Anti-entropy: every few seconds each region compares the root of each
//! namespace's tree with each peer's and, where they differ, descends into
//! differing nodes only and pulls their records ([`crate::antientropy`]):
//! a round on identical data reads one node per side. Merging is idempotent
//! and commutative, so both sides converge whatever was lost. The older
//! 16-bucket digest (`kv/digest`, `repl/bucket`) is still answered, for
//! peers of builds before the tree.
//!
//! Residency: a change is put in a message to a peer only if the peer may
//! hold its namespace; a receiver refuses (and logs) a message carrying a
//! namespace it may not hold, applying nothing of it.

use crate::antientropy::{self, SyncError, TreeSource};
use crate::kv::KvService;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use meridian_core::wire::{OriginReplication, Peer, PeerReplication};
use meridian_http::cluster::Target;
use meridian_http::{json, text, Body};
use meridian_store::merkle::{Node, NodePath, FANOUT, NODE_BYTES};
use meridian_store::{hlc::system_ms, Change, Message, PushOutcome, Store, Timestamp, DIGEST_BUCKETS};
use meridian_trust::Identity;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Log entries per push message.
const BATCH: usize = 1024;
/// Records per snapshot message.
const SNAPSHOT_CHUNK: usize = 1024;
/// Lag percentiles cover the last one to two of these.
const LAG_WINDOW: Duration = Duration::from_secs(60);
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Default)]
struct PeerStats {
    pushes: u64,
    push_errors: u64,
    snapshots_sent: u64,
    /// Records sent in snapshots (complete or not).
    snapshot_records_sent: u64,
    repaired: u64,
    /// Anti-entropy rounds (per namespace) and tree nodes they compared.
    anti_entropy_rounds: u64,
    tree_nodes_compared: u64,
    last_error: Option<String>,
}

#[derive(Default)]
struct OriginStats {
    applied_records: u64,
    lag: LagHistogram,
    samples: u64,
}

/// Replication lag in ms: a histogram (1 ms to an hour, three significant
/// digits) for the current window and one for the window before, so a
/// sample costs a counter increment and a percentile a walk over the
/// buckets, however many writes arrive.
struct LagHistogram {
    current: hdrhistogram::Histogram<u64>,
    previous: hdrhistogram::Histogram<u64>,
    started: std::time::Instant,
}

impl Default for LagHistogram {
    fn default() -> LagHistogram {
        let h = || hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds");
        LagHistogram { current: h(), previous: h(), started: std::time::Instant::now() }
    }
}

impl LagHistogram {
    fn rotate(&mut self) {
        let age = self.started.elapsed();
        if age >= LAG_WINDOW {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.reset();
            if age >= 2 * LAG_WINDOW {
                // Nothing arrived for a whole window: forget that one too.
                self.previous.reset();
            }
            self.started = std::time::Instant::now();
        }
    }

    fn record(&mut self, lag_ms: u64) {
        self.rotate();
        // More than an hour counts as an hour.
        self.current.saturating_record(lag_ms);
    }

    /// The samples of both windows, if any.
    fn merged(&self) -> Option<hdrhistogram::Histogram<u64>> {
        if self.current.is_empty() && self.previous.is_empty() {
            return None;
        }
        let mut both = self.previous.clone();
        both.add(&self.current).ok()?;
        Some(both)
    }

    #[cfg(test)]
    fn percentile(&self, q: f64) -> Option<f64> {
        self.merged().map(|h| h.value_at_quantile(q) as f64)
    }
}

/// What a message brought, kept for the statistics while its changes go to
/// the store: the record count and, for lag, when the origin wrote each of
/// its own records (not the values).
struct ApplyStats {
    records: u64,
    written_ms: Vec<u64>,
}

impl ApplyStats {
    /// `live`: pushed as written (a snapshot's records are old; no lag).
    fn of(origin: &str, changes: &[Change], live: bool) -> ApplyStats {
        let written_ms = if live {
            changes.iter().filter(|c| c.record.origin == origin).map(|c| c.record.ts.wall_ms).collect()
        } else {
            Vec::new()
        };
        ApplyStats { records: changes.len() as u64, written_ms }
    }
}

#[derive(Default)]
pub struct Replication {
    tasks: Mutex<Vec<JoinHandle<()>>>,
    peers: Mutex<HashMap<String, PeerStats>>,
    origins: Mutex<BTreeMap<String, OriginStats>>,
    rejected: AtomicU64,
    pub anti_entropy_interval: Mutex<Duration>,
    /// Directory where every replication message this region sends is
    /// appended, one file per destination (`FROM-to-TO.bin`); set by
    /// `MERIDIAN_CAPTURE_REPLICATION` (for residency audits and tests).
    /// Only builds with debug assertions (the test profile) honour it: the
    /// copies hold values in the clear, so a release build never writes them.
    pub capture_dir: Option<std::path::PathBuf>,
    /// How often the log is trimmed and tombstones collected.
    pub gc_interval: Duration,
    /// Set when the region shuts down: incoming streams end.
    closing: tokio::sync::watch::Sender<bool>,
    /// Per origin: every write it made up to this time is applied here.
    frontiers: Mutex<HashMap<String, Timestamp>>,
    /// Per peer: the time up to which it has applied every region's writes
    /// (its `local_stable`, as reported in its acknowledgements).
    peer_stable: Mutex<HashMap<String, Timestamp>>,
    collected: AtomicU64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PushReply {
    /// Last sequence of the sender's log the receiver holds.
    have: u64,
}

fn capture_dir_from_env() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("MERIDIAN_CAPTURE_REPLICATION")?;
    if cfg!(debug_assertions) {
        tracing::warn!(dir = ?dir, "capturing every replication message sent (test builds only)");
        Some(dir.into())
    } else {
        tracing::warn!(
            "MERIDIAN_CAPTURE_REPLICATION is ignored: release builds never copy replication messages to disk"
        );
        None
    }
}

impl Replication {
    pub fn new(anti_entropy_interval: Duration) -> Replication {
        Replication {
            anti_entropy_interval: Mutex::new(anti_entropy_interval),
            capture_dir: capture_dir_from_env(),
            gc_interval: Duration::from_secs(2),
            ..Default::default()
        }
    }

    /// Appends a message sent to `to` to the capture file, if capturing.
    fn capture(&self, from: &str, to: &str, bytes: &[u8]) {
        let Some(dir) = &self.capture_dir else { return };
        use std::io::Write;
        let path = dir.join(format!("{from}-to-{to}.bin"));
        let r = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::OpenOptions::new().create(true).append(true).open(&path)?.write_all(bytes));
        if let Err(e) = r {
            tracing::warn!(path = %path.display(), error = %e, "cannot capture replication traffic");
        }
    }

    /// Time up to which this region has applied every write of every
    /// region it replicates with (zero until each has been heard from).
    pub fn local_stable(&self, svc: &KvService) -> Timestamp {
        let frontiers = self.frontiers.lock().unwrap();
        let mut t = svc.store.watermark();
        for p in svc.peers.load().iter() {
            t = t.min(frontiers.get(&p.name).copied().unwrap_or_default());
        }
        t
    }

    /// Time up to which every region has applied every write: tombstones
    /// older than this can go (no region holds what they override, and no
    /// older write is still on its way).
    pub fn global_stable(&self, svc: &KvService) -> Timestamp {
        let mut t = self.local_stable(svc);
        let ps = self.peer_stable.lock().unwrap();
        for p in svc.peers.load().iter() {
            t = t.min(ps.get(&p.name).copied().unwrap_or_default());
        }
        t
    }

    pub fn collected(&self) -> u64 {
        self.collected.load(Ordering::Relaxed)
    }

    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    pub fn peer_status(&self, store: &Store) -> Vec<PeerReplication> {
        let last = *store.last_seq().borrow();
        let stats = self.peers.lock().unwrap();
        let mut out: Vec<PeerReplication> = stats
            .iter()
            .map(|(name, s)| {
                let acked = store.cursor(name).unwrap_or(0);
                PeerReplication {
                    peer: name.clone(),
                    acked_seq: acked,
                    pending: last.saturating_sub(acked),
                    pushes: s.pushes,
                    push_errors: s.push_errors,
                    snapshots_sent: s.snapshots_sent,
                    snapshot_records_sent: s.snapshot_records_sent,
                    repaired: s.repaired,
                    anti_entropy_rounds: s.anti_entropy_rounds,
                    tree_nodes_compared: s.tree_nodes_compared,
                    last_error: s.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    pub fn origin_status(&self, store: &Store) -> Vec<OriginReplication> {
        let origins = self.origins.lock().unwrap();
        origins
            .iter()
            .map(|(name, s)| {
                let (incarnation, applied_seq) = store.applied(name).ok().flatten().unwrap_or((0, 0));
                let lag = s.lag.merged();
                let lag_at = |q| lag.as_ref().map(|h| h.value_at_quantile(q) as f64);
                OriginReplication {
                    origin: name.clone(),
                    incarnation,
                    applied_seq,
                    applied_records: s.applied_records,
                    lag_ms_p50: lag_at(0.5),
                    lag_ms_p99: lag_at(0.99),
                    lag_samples: s.samples,
                }
            })
            .collect()
    }

    fn note_peer(&self, peer: &str, f: impl FnOnce(&mut PeerStats)) {
        f(self.peers.lock().unwrap().entry(peer.to_string()).or_default());
    }

    /// Records replication lag of freshly applied changes from `origin`.
    fn note_applied(&self, origin: &str, stats: &ApplyStats) {
        let now = system_ms();
        let mut origins = self.origins.lock().unwrap();
        let s = origins.entry(origin.to_string()).or_default();
        s.applied_records += stats.records;
        for &written_ms in &stats.written_ms {
            s.lag.record(now.saturating_sub(written_ms));
            s.samples += 1;
        }
    }

    /// Stops every replication loop and waits until they are gone; ends
    /// the streams peers push to us.
    pub async fn stop(&self) {
        self.closing.send_replace(true);
        let tasks: Vec<JoinHandle<()>> = self.tasks.lock().unwrap().drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Stops the loops and starts them again for the current peers.
    pub fn restart(&self, svc: Arc<KvService>) {
        let mut tasks = self.tasks.lock().unwrap();
        for t in tasks.drain(..) {
            t.abort();
        }
        let peers = svc.peers.load_full();
        for p in peers.iter() {
            self.note_peer(&p.name, |_| {});
            tasks.push(tokio::spawn(stream_loop(svc.clone(), p.clone())));
            tasks.push(tokio::spawn(anti_entropy_loop(svc.clone(), p.clone())));
        }
        tasks.push(tokio::spawn(trim_loop(svc.clone())));
    }

    /// `/_meridian/repl/...` endpoints.
    pub async fn handle(
        &self,
        svc: &Arc<KvService>,
        req: Request<hyper::body::Incoming>,
        path: &[&str],
        caller: &Identity,
    ) -> Response<Body> {
        let method = req.method().clone();
        match (method, path) {
            (Method::POST, ["repl", "push"]) => {
                let body = match meridian_http::read_body(req.into_body(), MAX_MESSAGE).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                self.receive(svc, &body, caller).await
            }
            (Method::POST, ["repl", "stream"]) => self.receive_stream(svc.clone(), req, caller.clone()),
            // Only namespaces the asking peer may hold leave this region,
            // judged by the name and jurisdiction its certificate carries.
            (_, ["repl", "tree" | "records" | "bucket", ns, ..]) if !svc.replicates_to_identity(ns, caller) => {
                tracing::warn!(%caller, ns, "refused an anti-entropy read the caller may not hold");
                text(StatusCode::FORBIDDEN, format!("namespace {ns:?} is not replicated to {caller}"))
            }
            (Method::GET, ["repl", "tree", ns]) => {
                // `?flush`: the tree of every write made so far (a
                // rejoining peer's round must not miss the last moment's).
                if req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "flush")) {
                    if let Err(e) = svc.store.flush_tree().await {
                        return text(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                    }
                }
                match svc.store.tree_root(ns) {
                    Ok(node) => binary(node.encode().to_vec()),
                    Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
                }
            }
            (Method::POST, ["repl", "tree", ns]) => {
                let parents = match read_request::<Vec<String>>(req).await {
                    Ok(p) if p.len() <= antientropy::PARENTS_PER_REQUEST => p,
                    Ok(p) => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            format!("{} parents; at most {}", p.len(), antientropy::PARENTS_PER_REQUEST),
                        )
                    }
                    Err(r) => return r,
                };
                let parents = match parents.iter().map(|p| NodePath::parse(p)).collect::<Result<Vec<_>, _>>() {
                    Ok(p) => p,
                    Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
                };
                match svc.store.tree_children(ns, &parents) {
                    Ok(children) => binary(children.iter().flatten().flat_map(|n| n.encode()).collect()),
                    Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
                }
            }
            (Method::POST, ["repl", "records", ns]) => {
                let ask = match read_request::<RecordsRequest>(req).await {
                    Ok(a) => a,
                    Err(r) => return r,
                };
                let node = match NodePath::parse(&ask.node) {
                    Ok(n) => n,
                    Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
                };
                let after = match ask.after_hex.as_deref().map(hex::decode).transpose() {
                    Ok(a) => a,
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("after_hex: {e}")),
                };
                let limit = ask.limit.min(antientropy::RECORDS_PER_REQUEST);
                match svc.store.subtree(ns, &node, after.as_deref(), limit) {
                    Ok(changes) => self.records_answer(svc, caller, changes),
                    Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
                }
            }
            (Method::GET, ["repl", "bucket", ns, i]) => {
                let Ok(i) = i.parse::<usize>() else {
                    return text(StatusCode::BAD_REQUEST, "bucket must be a number");
                };
                if i >= DIGEST_BUCKETS {
                    return text(StatusCode::BAD_REQUEST, "no such bucket");
                }
                match svc.store.bucket(ns, i) {
                    Ok(changes) => self.records_answer(svc, caller, changes),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            _ => text(StatusCode::NOT_FOUND, format!("no such API: {}", path.join("/"))),
        }
    }

    /// Records sent for an anti-entropy pull: a snapshot message (not
    /// complete, so it moves no frontier), captured like any other.
    fn records_answer(&self, svc: &KvService, caller: &Identity, changes: Vec<Change>) -> Response<Body> {
        let m = Message::Snapshot {
            origin: svc.region.clone(),
            incarnation: svc.store.incarnation(),
            upto_seq: 0,
            complete: false,
            changes,
        }
        .encode();
        self.capture(&svc.region, &caller.name, &m);
        binary(m)
    }

    /// Decodes and checks a message; on refusal, the status and the reason
    /// (already logged and counted).
    fn check(&self, svc: &KvService, body: &[u8], caller: &Identity) -> Result<Message, (StatusCode, String)> {
        let msg = match Message::decode(body) {
            Ok(m) => m,
            Err(e) => return Err(self.refuse(StatusCode::BAD_REQUEST, format!("undecodable replication message: {e}"))),
        };
        let (origin, changes) = match &msg {
            Message::Push { origin, changes, .. } | Message::Snapshot { origin, changes, .. } => (origin, changes),
        };
        if let Err(e) = msg.check_content(system_ms()) {
            return Err(self.refuse(StatusCode::BAD_REQUEST, format!("replication message from {origin}: {e}")));
        }
        // Who sent it is the certificate's word, not the message's.
        if origin != &caller.name {
            return Err(self.refuse(
                StatusCode::FORBIDDEN,
                format!("a replication message claiming origin {origin:?} came from {caller}"),
            ));
        }
        if origin == &svc.region || !svc.peers.load().iter().any(|p| &p.name == origin) {
            return Err(
                self.refuse(StatusCode::FORBIDDEN, format!("replication message from unknown region {origin:?}"))
            );
        }
        for c in changes {
            if let Err(why) = svc.may_hold(&c.ns) {
                // A namespace not yet declared here (the new version is not
                // active yet) is retried by the sender; a residency breach
                // is refused outright. Either way nothing is applied.
                let status =
                    if why.starts_with("residency") { StatusCode::FORBIDDEN } else { StatusCode::SERVICE_UNAVAILABLE };
                return Err(self.refuse(status, format!("message from {origin}: {why}")));
            }
        }
        Ok(msg)
    }

    fn refuse(&self, status: StatusCode, why: String) -> (StatusCode, String) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::error!(reason = %why, "replication message rejected; nothing applied");
        (status, why)
    }

    /// `POST /_meridian/repl/stream`: a long-lived push stream. The request
    /// body carries length-prefixed messages; the response body carries one
    /// 9-byte answer per message, in order: `0` + sequence applied up to,
    /// `1` + what we have (gap; the stream ends), `2` + HTTP status (refused;
    /// the stream ends). Messages are queued for commit as soon as they are
    /// read, so consecutive ones share a commit and the stream never waits
    /// for a round trip.
    fn receive_stream(
        &self,
        svc: Arc<KvService>,
        req: Request<hyper::body::Incoming>,
        caller: Identity,
    ) -> Response<Body> {
        use http_body_util::BodyExt;
        let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
        type Pending = (u64, String, Timestamp, ApplyStats, meridian_http::BoxFuture<Result<PushOutcome, String>>);
        let (q_tx, mut q_rx) = tokio::sync::mpsc::channel::<Pending>(4096);
        let (svc2, out_tx2) = (svc.clone(), out_tx.clone());
        let mut closing = self.closing.subscribe();
        // Reader: frames -> checked messages -> queued commits.
        tokio::spawn(async move {
            let mut body = req.into_body();
            let mut buf: Vec<u8> = Vec::new();
            loop {
                while buf.len() >= 4 {
                    let n = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
                    if n > MAX_MESSAGE {
                        let (status, _) =
                            svc.repl.refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("stream frame of {n} bytes"));
                        let _ = out_tx.send(answer(2, status.as_u16() as u64)).await;
                        return;
                    }
                    if buf.len() < 4 + n {
                        break;
                    }
                    let frame: Vec<u8> = buf.drain(..4 + n).skip(4).collect();
                    let msg = match svc.repl.check(&svc, &frame, &caller) {
                        Ok(m) => m,
                        Err((status, _)) => {
                            let _ = out_tx.send(answer(2, status.as_u16() as u64)).await;
                            return;
                        }
                    };
                    let Message::Push { origin, incarnation, prev_seq, last_seq, stable, changes } = msg else {
                        let (status, _) =
                            svc.repl.refuse(StatusCode::BAD_REQUEST, "a snapshot on a push stream".into());
                        let _ = out_tx.send(answer(2, status.as_u16() as u64)).await;
                        return;
                    };
                    let stats = ApplyStats::of(&origin, &changes, true);
                    let fut = if changes.is_empty() && prev_seq == last_seq {
                        // A heartbeat: nothing to commit, only the gap check.
                        let have = match svc.store.applied(&origin) {
                            Ok(Some((inc, seq))) if inc == incarnation => seq,
                            _ => 0,
                        };
                        let out = if prev_seq > have {
                            PushOutcome::Gap { have }
                        } else {
                            PushOutcome::Applied(Default::default())
                        };
                        Box::pin(async move { Ok(out) }) as meridian_http::BoxFuture<_>
                    } else {
                        match svc.store.submit_push(&origin, incarnation, prev_seq, last_seq, changes) {
                            Ok(f) => Box::pin(async move { f.await.map_err(|e| e.to_string()) })
                                as meridian_http::BoxFuture<_>,
                            Err(e) => {
                                tracing::error!(error = %e, "cannot queue a replicated push");
                                return;
                            }
                        }
                    };
                    if q_tx.send((last_seq, origin, stable, stats, fut)).await.is_err() {
                        return;
                    }
                }
                let frame = tokio::select! {
                    f = body.frame() => f,
                    _ = closing.wait_for(|c| *c) => return,
                };
                match frame {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            buf.extend_from_slice(&d);
                        }
                    }
                    _ => return,
                }
            }
        });
        // Answerer: commit outcomes, in order.
        tokio::spawn(async move {
            while let Some((last_seq, origin, stable, stats, fut)) = q_rx.recv().await {
                let a = match fut.await {
                    Ok(PushOutcome::Applied(_)) => {
                        svc2.repl.note_applied(&origin, &stats);
                        {
                            let mut f = svc2.repl.frontiers.lock().unwrap();
                            let e = f.entry(origin.clone()).or_default();
                            *e = (*e).max(stable);
                        }
                        answer_stable(0, last_seq, svc2.repl.local_stable(&svc2))
                    }
                    Ok(PushOutcome::Gap { have }) => answer(1, have),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot apply a replicated push");
                        answer(2, 500)
                    }
                };
                let end = a[0] != 0;
                if out_tx2.send(a).await.is_err() || end {
                    return;
                }
            }
        });
        let stream = futures::stream::unfold(out_rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, meridian_http::BoxError>(hyper::body::Frame::data(b)), rx))
        });
        let mut r = Response::new(http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(stream)));
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-meridian-replication"));
        r
    }

    /// Applies a pushed message, all or nothing.
    async fn receive(&self, svc: &Arc<KvService>, body: &[u8], caller: &Identity) -> Response<Body> {
        let msg = match self.check(svc, body, caller) {
            Ok(m) => m,
            Err((status, why)) => return text(status, why),
        };
        match msg {
            Message::Push { origin, incarnation, prev_seq, last_seq, changes, .. } => {
                let n = changes.len();
                let stats = ApplyStats::of(&origin, &changes, true);
                match svc.store.apply_push(&origin, incarnation, prev_seq, last_seq, changes).await {
                    Ok(PushOutcome::Applied(report)) => {
                        self.note_applied(&origin, &stats);
                        tracing::debug!(%origin, n, changed = report.changed, conflicts = report.conflicts, "applied push");
                        json(StatusCode::OK, &PushReply { have: last_seq })
                    }
                    Ok(PushOutcome::Gap { have }) => json(StatusCode::CONFLICT, &PushReply { have }),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot apply: {e}")),
                }
            }
            Message::Snapshot { origin, incarnation, upto_seq, complete, changes } => {
                let stats = ApplyStats::of(&origin, &changes, false);
                match svc.store.apply_snapshot(&origin, incarnation, upto_seq, complete, changes).await {
                    Ok(_) => {
                        self.note_applied(&origin, &stats);
                        json(StatusCode::OK, &PushReply { have: if complete { upto_seq } else { 0 } })
                    }
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot apply: {e}")),
                }
            }
        }
    }
}

/// Size of an answer on a replication stream.
const ANSWER: usize = 21;

/// `kind` u8, `n` u64, then the receiver's stable time (u64 ms, u32 logical).
fn answer_stable(kind: u8, n: u64, stable: Timestamp) -> Bytes {
    let mut b = Vec::with_capacity(ANSWER);
    b.push(kind);
    b.extend_from_slice(&n.to_le_bytes());
    b.extend_from_slice(&stable.wall_ms.to_le_bytes());
    b.extend_from_slice(&stable.logical.to_le_bytes());
    b.into()
}

fn answer(kind: u8, n: u64) -> Bytes {
    answer_stable(kind, n, Timestamp::default())
}

async fn post(svc: &KvService, peer: &Peer, path: &str, body: Vec<u8>) -> Result<(StatusCode, Bytes), String> {
    svc.repl.capture(&svc.region, &peer.name, &body);
    let target = svc.target(peer).map_err(|e| e.to_string())?;
    let a = svc
        .cluster
        .call(&target, Method::POST, path, body.into(), Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    Ok((a.status, a.body))
}

/// Entries sent but not yet acknowledged, at most.
const WINDOW: u64 = 200_000;
/// An idle stream sends an empty message this often (it carries the
/// sender's stable time, which tombstone collection needs).
const HEARTBEAT: Duration = Duration::from_millis(500);

/// Streams our log to one peer over one long-lived request, forever.
async fn stream_loop(svc: Arc<KvService>, peer: Peer) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match stream_once(&svc, &peer).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                let first = svc.repl.peers.lock().unwrap().get(&peer.name).and_then(|s| s.last_error.clone())
                    != Some(e.clone());
                if first {
                    tracing::warn!(peer = %peer.name, error = %e, "replication stream failed; retrying");
                }
                svc.repl.note_peer(&peer.name, |s| {
                    s.push_errors += 1;
                    s.last_error = Some(e);
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One stream: catch up by snapshot if needed, then send log entries as they
/// are written while reading acknowledgements. Returns when the peer asks
/// to rewind (`Ok`) or the stream breaks (`Err`).
async fn stream_once(svc: &KvService, peer: &Peer) -> Result<(), String> {
    use http_body_util::BodyExt;
    let store = &svc.store;
    let acked0 = store.cursor(&peer.name).map_err(|e| e.to_string())?;
    let last = *store.last_seq().borrow();
    if acked0 < last && acked0 + 1 < store.log_start().map_err(|e| e.to_string())? {
        send_snapshot(svc, peer).await?;
        return Ok(());
    }
    let acked = Arc::new(AtomicU64::new(acked0));
    let progress = Arc::new(tokio::sync::Notify::new());
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, meridian_http::BoxError>(hyper::body::Frame::data(b)), rx))
    });
    let target = svc.target(peer).map_err(|e| e.to_string())?;
    let req = Request::post(svc.api("repl/stream"))
        .body(http_body_util::StreamBody::new(stream).boxed_unsync())
        .map_err(|e| e.to_string())?;

    let writer = {
        let (acked, progress) = (acked.clone(), progress.clone());
        async move {
            let mut last_rx = store.last_seq();
            let mut sent = acked0;
            let send = |msg: Vec<u8>| {
                svc.repl.capture(&svc.region, &peer.name, &msg);
                let mut frame = Vec::with_capacity(4 + msg.len());
                frame.extend_from_slice(&(msg.len() as u32).to_le_bytes());
                frame.extend_from_slice(&msg);
                let tx = tx.clone();
                async move { tx.send(frame.into()).await.map_err(|_| "the stream closed".to_string()) }
            };
            loop {
                // Read before the log: every local write at or below it is
                // committed, so it is in what we read next or already sent.
                let watermark = store.watermark();
                let last = *last_rx.borrow_and_update();
                if sent >= last {
                    let changed = tokio::time::timeout(HEARTBEAT, last_rx.changed()).await;
                    if changed.is_err() {
                        // Idle: tell the peer how far our writes are complete.
                        let msg = Message::Push {
                            origin: svc.region.clone(),
                            incarnation: store.incarnation(),
                            prev_seq: sent,
                            last_seq: sent,
                            stable: watermark,
                            changes: Vec::new(),
                        };
                        send(msg.encode()).await?;
                    }
                    continue;
                }
                while sent.saturating_sub(acked.load(Ordering::Relaxed)) > WINDOW {
                    progress.notified().await;
                }
                if sent + 1 < store.log_start().map_err(|e| e.to_string())? {
                    return Err::<(), String>("the log was trimmed below an open stream".into());
                }
                let entries = store.log_after(sent, BATCH).map_err(|e| e.to_string())?;
                let Some((upto, last_ts)) = entries.last().map(|(q, c)| (*q, c.record.ts)) else { continue };
                // A full batch may leave later writes behind: then only up
                // to its last entry is complete (the log is in time order).
                let stable = if entries.len() == BATCH { last_ts } else { watermark.max(last_ts) };
                let changes: Vec<Change> =
                    entries.into_iter().map(|(_, c)| c).filter(|c| svc.replicates_to(&c.ns, peer)).collect();
                let msg = Message::Push {
                    origin: svc.region.clone(),
                    incarnation: store.incarnation(),
                    prev_seq: sent,
                    last_seq: upto,
                    stable,
                    changes,
                };
                send(msg.encode()).await?;
                sent = upto;
            }
        }
    };

    let reader = async {
        let resp = tokio::time::timeout(Duration::from_secs(10), svc.cluster.send(&target, req))
            .await
            .map_err(|_| "no answer to the stream request".to_string())?
            .map_err(|e| format!("{e}"))?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = meridian_http::cluster::read_all(resp.into_body(), 1 << 20).await.unwrap_or_default();
            return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()));
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let (mut persisted, mut persisted_seq) = (std::time::Instant::now(), acked0);
        loop {
            while buf.len() >= ANSWER {
                let kind = buf[0];
                let n = u64::from_le_bytes(buf[1..9].try_into().expect("8 bytes"));
                let stable = Timestamp {
                    wall_ms: u64::from_le_bytes(buf[9..17].try_into().expect("8 bytes")),
                    logical: u32::from_le_bytes(buf[17..21].try_into().expect("4 bytes")),
                };
                buf.drain(..ANSWER);
                match kind {
                    0 => {
                        acked.store(n, Ordering::Relaxed);
                        svc.repl.peer_stable.lock().unwrap().insert(peer.name.clone(), stable);
                        progress.notify_waiters();
                        svc.repl.note_peer(&peer.name, |s| {
                            s.pushes += 1;
                            s.last_error = None;
                        });
                        // The cursor on disk may lag a little: resending
                        // from it after a crash is harmless (merges are
                        // idempotent).
                        // (Not for an unchanged cursor: an idle stream's
                        // heartbeats would cost a durable commit each.)
                        if n > persisted_seq && persisted.elapsed() > Duration::from_millis(100) {
                            store.ack(&peer.name, n).await.map_err(|e| e.to_string())?;
                            (persisted, persisted_seq) = (std::time::Instant::now(), n);
                        }
                    }
                    1 => {
                        tracing::info!(peer = %peer.name, have = n, "peer is behind our cursor; rewinding");
                        // (Also what is kept below when the stream ends:
                        // the rewind must not be overwritten by it.)
                        acked.store(n, Ordering::Relaxed);
                        store.ack(&peer.name, n).await.map_err(|e| e.to_string())?;
                        return Ok(());
                    }
                    _ => return Err(format!("the peer refused a message (HTTP {n}; see its log)")),
                }
            }
            match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                }
                Ok(Some(Err(e))) => return Err(format!("stream broke: {e}")),
                Ok(None) => return Err("the peer closed the stream".into()),
                // Nothing to acknowledge for a while is fine if nothing was sent.
                Err(_) => {}
            }
        }
    };
    let result = tokio::select! {
        r = writer => r,
        r = reader => r,
    };
    let a = acked.load(Ordering::Relaxed);
    if a > store.cursor(&peer.name).unwrap_or(0) {
        let _ = store.ack(&peer.name, a).await;
    }
    result
}

/// Sends everything we hold that the peer may hold, then moves its cursor
/// to where our log was when the copy started.
async fn send_snapshot(svc: &KvService, peer: &Peer) -> Result<(), String> {
    let store = &svc.store;
    let upto = *store.last_seq().borrow();
    tracing::info!(peer = %peer.name, upto, "sending a snapshot (the peer needs entries our log no longer has)");
    // The tree then covers every write up to `upto`: what the walk finds
    // equal at the peer holds them (or newer versions).
    store.flush_tree().await.map_err(|e| e.to_string())?;
    let namespaces: Vec<String> =
        store.namespaces().map_err(|e| e.to_string())?.into_iter().filter(|ns| svc.replicates_to(ns, peer)).collect();
    let send = |changes: Vec<Change>, complete: bool| Message::Snapshot {
        origin: svc.region.clone(),
        incarnation: store.incarnation(),
        upto_seq: upto,
        complete,
        changes,
    };
    let post_part = |changes: Vec<Change>, complete: bool| {
        let n = changes.len() as u64;
        let body = send(changes, complete).encode();
        async move {
            let (status, body) = post(svc, peer, &svc.api("repl/push"), body).await.map_err(SyncError::Peer)?;
            if status != StatusCode::OK {
                let why = format!("snapshot refused: HTTP {status}: {}", String::from_utf8_lossy(&body).trim());
                return Err(if status.is_server_error() { SyncError::Peer(why) } else { SyncError::Refused(why) });
            }
            svc.repl.note_peer(&peer.name, |s| s.snapshot_records_sent += n);
            Ok(())
        }
    };
    let tree = PeerTree { svc, peer, target: svc.target(peer).map_err(|e| e.to_string())?, flushed: false };
    for ns in namespaces {
        // Only what the peer lacks: a snapshot broken off resumes.
        match antientropy::push_differences(store, &tree, &ns, |changes| post_part(changes, false)).await {
            Ok(_) => {}
            Err(SyncError::Unsupported(why)) => {
                tracing::info!(peer = %peer.name, %why, "the peer compares no trees; sending all of {ns:?}");
                let mut after: Option<Vec<u8>> = None;
                loop {
                    let page = store.scan(&ns, after.as_deref(), SNAPSHOT_CHUNK).map_err(|e| e.to_string())?;
                    let Some(last) = page.last().map(|(k, _)| k.clone()) else { break };
                    let changes =
                        page.into_iter().map(|(key, record)| Change { ns: ns.clone(), key, record }).collect();
                    post_part(changes, false).await.map_err(|e| e.to_string())?;
                    after = Some(last);
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    post_part(Vec::new(), true).await.map_err(|e| e.to_string())?;
    store.ack(&peer.name, upto).await.map_err(|e| e.to_string())?;
    svc.repl.note_peer(&peer.name, |s| s.snapshots_sent += 1);
    Ok(())
}

/// Compares digests with one peer now and then and pulls what differs.
async fn anti_entropy_loop(svc: Arc<KvService>, peer: Peer) {
    loop {
        let every = *svc.repl.anti_entropy_interval.lock().unwrap();
        tokio::time::sleep(every).await;
        match anti_entropy_once(&svc, &peer, false).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(peer = %peer.name, repaired = n, "anti-entropy repaired records");
                svc.repl.note_peer(&peer.name, |s| s.repaired += n as u64);
            }
            Err(e) => tracing::debug!(peer = %peer.name, error = %e, "anti-entropy round failed"),
        }
    }
}

/// What `POST repl/records/{ns}` asks for.
#[derive(serde::Serialize, serde::Deserialize)]
struct RecordsRequest {
    /// The tree node, as hex digits ("" is the root).
    node: String,
    after_hex: Option<String>,
    limit: usize,
}

async fn read_request<T: serde::de::DeserializeOwned>(
    req: Request<hyper::body::Incoming>,
) -> Result<T, Response<Body>> {
    let body = meridian_http::read_body(req.into_body(), 1 << 20).await.map_err(|e| e.into_response())?;
    serde_json::from_slice(&body).map_err(|e| text(StatusCode::BAD_REQUEST, format!("malformed request: {e}")))
}

fn binary(body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(meridian_http::full(body));
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-meridian-replication"));
    r
}

/// A peer's tree, read over the cluster API.
struct PeerTree<'a> {
    svc: &'a KvService,
    peer: &'a Peer,
    target: Target,
    /// Ask for roots of a flushed tree (`?flush`).
    flushed: bool,
}

impl PeerTree<'_> {
    async fn call(&self, method: Method, path: String, body: Vec<u8>) -> Result<Bytes, SyncError> {
        let a = self
            .svc
            .cluster
            .call(&self.target, method, &self.svc.api(&path), Bytes::from(body), Duration::from_secs(30))
            .await
            .map_err(|e| {
                if e.nothing_sent() {
                    SyncError::Unreachable(e.to_string())
                } else {
                    SyncError::Peer(e.to_string())
                }
            })?;
        match a.status {
            StatusCode::OK => Ok(a.body),
            StatusCode::NOT_FOUND => Err(SyncError::Unsupported(format!("{path}: HTTP 404: {}", a.text()))),
            s if s.is_server_error() => Err(SyncError::Peer(format!("{path}: HTTP {s}: {}", a.text()))),
            s => Err(SyncError::Refused(format!("{path}: HTTP {s}: {}", a.text()))),
        }
    }

    fn nodes(&self, body: &[u8], n: usize) -> Result<Vec<Node>, SyncError> {
        if body.len() != n * NODE_BYTES {
            return Err(SyncError::Refused(format!("expected {n} tree nodes, got {} bytes", body.len())));
        }
        Ok(body.chunks_exact(NODE_BYTES).map(|c| Node::decode(c).expect("NODE_BYTES long")).collect())
    }
}

impl TreeSource for PeerTree<'_> {
    async fn root(&self, ns: &str) -> Result<Node, SyncError> {
        let path = if self.flushed { format!("repl/tree/{ns}?flush") } else { format!("repl/tree/{ns}") };
        let body = self.call(Method::GET, path, Vec::new()).await?;
        Ok(self.nodes(&body, 1)?[0])
    }

    async fn children(&self, ns: &str, parents: &[NodePath]) -> Result<Vec<[Node; FANOUT]>, SyncError> {
        let ask = serde_json::to_vec(&parents.iter().map(|p| p.to_string()).collect::<Vec<_>>()).expect("strings");
        let body = self.call(Method::POST, format!("repl/tree/{ns}"), ask).await?;
        let nodes = self.nodes(&body, parents.len() * FANOUT)?;
        Ok(nodes.chunks_exact(FANOUT).map(|c| c.try_into().expect("FANOUT long")).collect())
    }

    async fn records(
        &self,
        ns: &str,
        node: &NodePath,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Change>, SyncError> {
        let ask = RecordsRequest { node: node.to_string(), after_hex: after.map(hex::encode), limit };
        let body =
            self.call(Method::POST, format!("repl/records/{ns}"), serde_json::to_vec(&ask).expect("plain")).await?;
        match Message::decode(&body) {
            Ok(Message::Snapshot { changes, .. }) => Ok(changes),
            Ok(_) => Err(SyncError::Refused("unexpected message kind".into())),
            Err(e) => {
                self.svc.repl.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(peer = %self.peer.name, error = %e, "anti-entropy message rejected; nothing applied");
                Err(SyncError::Refused(e.to_string()))
            }
        }
    }
}

/// One anti-entropy round with one peer over every namespace both may
/// hold; returns the number of records that changed here.
///
/// `flushed`: read the peer's tree only after the peer has applied its
/// journal, so the round covers every write the peer had made when it
/// started (regular rounds read the tree as it is: it trails by a moment).
pub async fn anti_entropy_once(svc: &KvService, peer: &Peer, flushed: bool) -> Result<usize, SyncError> {
    let nss: Vec<String> = svc.namespaces.load().keys().filter(|ns| svc.replicates_to(ns, peer)).cloned().collect();
    let target = svc.target(peer).map_err(|e| SyncError::Peer(e.to_string()))?;
    let tree = PeerTree { svc, peer, target, flushed };
    let mut changed = 0;
    for ns in nss {
        // Only namespaces this region may hold (a regional one it is not in
        // is never pulled here).
        if svc.may_hold(&ns).is_err() {
            continue;
        }
        let check = |changes: &[Change]| {
            meridian_store::check_changes(changes, system_ms()).map_err(|e| {
                svc.repl.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(peer = %peer.name, error = %e, "anti-entropy answer refused; nothing applied");
                e.to_string()
            })
        };
        let round = antientropy::pull_differences(&svc.store, &tree, &ns, check).await?;
        svc.repl.note_peer(&peer.name, |s| {
            s.tree_nodes_compared += round.nodes_compared;
            s.anti_entropy_rounds += 1;
        });
        changed += round.changed;
    }
    Ok(changed)
}

/// Drops log entries every peer has acknowledged, and tombstones every
/// region has seen.
async fn trim_loop(svc: Arc<KvService>) {
    loop {
        tokio::time::sleep(svc.repl.gc_interval).await;
        let stable = svc.repl.global_stable(&svc);
        if stable > Timestamp::default() {
            match svc.store.collect_tombstones(stable).await {
                Ok(0) => {}
                Ok(n) => {
                    svc.repl.collected.fetch_add(n, Ordering::Relaxed);
                    tracing::debug!(n, "collected tombstones every region has seen");
                }
                Err(e) => tracing::warn!(error = %e, "cannot collect tombstones"),
            }
        }
        let peers = svc.peers.load_full();
        let last = *svc.store.last_seq().borrow();
        let min = peers.iter().map(|p| svc.store.cursor(&p.name).unwrap_or(0)).min().unwrap_or(last);
        if min > 0 && svc.store.log_start().map(|s| s <= min).unwrap_or(false) {
            if let Err(e) = svc.store.trim_log(min).await {
                tracing::warn!(error = %e, "cannot trim the replication log");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_percentiles_are_exact_to_three_digits_and_cover_the_last_window_or_two() {
        let mut h = LagHistogram::default();
        assert_eq!(h.percentile(0.5), None);
        // 1..=1000 ms, once each, plus a zero.
        h.record(0);
        for ms in 1..=1000 {
            h.record(ms);
        }
        let p50 = h.percentile(0.5).unwrap();
        let p99 = h.percentile(0.99).unwrap();
        assert!((499.0..=501.0).contains(&p50), "p50 {p50}");
        assert!((989.0..=991.0).contains(&p99), "p99 {p99}");
        // More than the bound counts as the bound, not as an error.
        h.record(u64::MAX);
        assert!(h.percentile(1.0).unwrap() >= 3_600_000.0 * 0.999);

        // A window later the old samples still count (the window before)...
        h.started -= LAG_WINDOW;
        h.record(5);
        assert!(h.percentile(0.5).unwrap() > 400.0);
        // ...two windows later they are gone.
        h.started -= LAG_WINDOW;
        h.record(5);
        h.record(5);
        assert_eq!(h.percentile(0.99), Some(5.0));
        // And after a silence longer than two windows, nothing is left but
        // what comes next.
        h.started -= 2 * LAG_WINDOW;
        h.record(7);
        assert_eq!(h.percentile(0.5), Some(7.0));
        assert_eq!(h.percentile(0.0), Some(7.0));
    }
}
