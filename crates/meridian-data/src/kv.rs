//! Key-value namespaces in a region: placement (local or forwarded),
//! the operations functions and operators call, causality tokens, and the
//! HTTP endpoints other regions and the CLI use.
//!
//! Placement of a namespace, from the app's manifest:
//! - `global`: every region holds it; operations are local and replicate
//!   asynchronously ([`crate::repl`]);
//! - `regional`: only the allowed regions (a jurisdiction or a list) hold
//!   it. Elsewhere every operation is forwarded to the nearest allowed
//!   region; nothing of it is stored, logged or replicated here.
//!
//! Residency invariant: a value of a regional namespace is never written to
//! the store of a region outside its allowed set, never sent to one by
//! replication, and never logged. Values are not logged anywhere.

use crate::repl::Replication;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use meridian_core::kv::{CasVersion, KvError, KvResult};
use meridian_core::wire::{KvStatus, Peer};
use meridian_http::cluster::{CallError, ClusterClient, Target};
use meridian_http::{json, text, Body};
use meridian_manifest::{KvMode, Namespace};
use meridian_store::{Store, Swapped, Timestamp, Value, Written};
use meridian_trust::{Expect, Identity};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub type Namespaces = Arc<BTreeMap<String, Namespace>>;

/// Where a namespace's operations go from this region.
#[derive(Clone, Debug, PartialEq)]
pub enum Placement {
    Local,
    /// A `strong` namespace: through its Raft group.
    Strong,
    /// Allowed regions, nearest first.
    Forward(Vec<Peer>),
}

pub struct KvService {
    /// The app whose data this is: every app has its own store, its own
    /// replication streams and Raft groups, and its own cluster API
    /// (`/_meridian/apps/<app>/...`).
    pub app: String,
    pub region: String,
    pub jurisdiction: String,
    pub store: Store,
    pub peers: ArcSwap<Vec<Peer>>,
    /// Namespaces of the active version (replication follows these).
    pub namespaces: ArcSwap<BTreeMap<String, Namespace>>,
    /// Every call to another region: mutual TLS, the peer's certificate
    /// checked against its name and jurisdiction.
    pub cluster: ClusterClient,
    pub repl: Replication,
    /// Seals and opens the causality tokens clients carry.
    pub causality_key: CausalityKey,
    /// How long a request carrying a causality token waits for this region
    /// to apply the writes it names before it is forwarded to their origin.
    pub causality_wait: Duration,
    /// Raft groups of the `strong` namespaces this region is a member of.
    pub groups: Mutex<std::collections::HashMap<String, Arc<crate::strong::Group>>>,
    /// Catching up since the store was opened ([`crate::rejoin`]).
    pub rejoin: crate::rejoin::Rejoin,
}

/// Whether `region` (of `jurisdiction`) may hold namespace `ns`.
pub fn allowed_in(ns: &Namespace, region: &str, jurisdiction: &str) -> bool {
    match &ns.mode {
        KvMode::Global => true,
        KvMode::Regional { jurisdiction: Some(j), .. } => j == jurisdiction,
        KvMode::Regional { jurisdiction: None, regions } => regions.iter().any(|r| r == region),
        KvMode::Strong { regions, .. } => regions.iter().any(|r| r == region),
    }
}

/// A causality token entry: `origin`'s write number `seq` of incarnation `incarnation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenEntry {
    pub origin: String,
    pub incarnation: u64,
    pub seq: u64,
}

pub fn format_token(entries: &[TokenEntry]) -> String {
    entries.iter().map(|e| format!("{}:{:x}:{}", e.origin, e.incarnation, e.seq)).collect::<Vec<_>>().join(",")
}

/// Parses a token; malformed entries are ignored (a token is a hint about
/// freshness, never a reason to fail a request).
pub fn parse_token(s: &str) -> Vec<TokenEntry> {
    s.split(',')
        .filter_map(|e| {
            let mut p = e.trim().splitn(3, ':');
            let origin = p.next()?.to_string();
            let incarnation = u64::from_str_radix(p.next()?, 16).ok()?;
            let seq = p.next()?.parse().ok()?;
            meridian_core::topology::is_valid_name(&origin).then_some(TokenEntry { origin, incarnation, seq })
        })
        .take(16)
        .collect()
}

/// The world's key for causality tokens. A token a client carries is a
/// promise the region waits on (and forwards the request for), so only
/// tokens some region of this world issued are honoured: each is sealed with
/// an HMAC-SHA256 over its entries, and one that does not verify — forged,
/// altered, or from another world — is ignored as if absent.
#[derive(Clone)]
pub struct CausalityKey(Vec<u8>);

/// Bytes of the MAC kept in a token (128 bits).
const TAG_BYTES: usize = 16;

impl CausalityKey {
    pub fn new(key: Vec<u8>) -> CausalityKey {
        CausalityKey(key)
    }

    /// The key of one app, derived from the world's: a token one app
    /// sealed never opens in another (its writes live in another store).
    pub fn for_app(&self, app: &str) -> CausalityKey {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"meridian-app-key-v1\0");
        mac.update(app.as_bytes());
        CausalityKey(mac.finalize().into_bytes().to_vec())
    }

    /// The MAC over a token's entries, domain-separated from any other use
    /// of the key.
    fn mac(&self, entries: &str) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"meridian-causality-v1\0");
        mac.update(entries.as_bytes());
        mac
    }

    /// `<entries>.<tag>`: what goes into the header and the cookie.
    pub fn seal(&self, entries: &[TokenEntry]) -> String {
        use hmac::Mac;
        let body = format_token(entries);
        let tag = hex::encode(&self.mac(&body).finalize().into_bytes()[..TAG_BYTES]);
        format!("{body}.{tag}")
    }

    /// The entries of a sealed token, or nothing if its tag does not verify.
    pub fn open(&self, token: &str) -> Vec<TokenEntry> {
        use hmac::Mac;
        let Some((body, tag)) = token.trim().rsplit_once('.') else { return Vec::new() };
        let Ok(tag) = hex::decode(tag) else { return Vec::new() };
        if tag.len() != TAG_BYTES {
            return Vec::new();
        }
        // Constant-time comparison of the truncated tag.
        if self.mac(body).verify_truncated_left(&tag).is_err() {
            return Vec::new();
        }
        parse_token(body)
    }
}

/// Adds `e` to a token, keeping the newest entry per origin.
pub fn merge_token(entries: &mut Vec<TokenEntry>, e: TokenEntry) {
    match entries.iter_mut().find(|x| x.origin == e.origin) {
        Some(x) if x.incarnation == e.incarnation => x.seq = x.seq.max(e.seq),
        Some(x) => *x = e,
        None => entries.push(e),
    }
}

pub fn other<E: std::fmt::Display>(e: E) -> KvError {
    KvError::Other(e.to_string())
}

/// A stored record as a guest sees it: counters read as decimal text.
pub fn visible(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::Bytes(b) => Some(b),
        Value::Tombstone => None,
        Value::Counter { .. } => v.counter_total().map(|t| t.to_string().into_bytes()),
    }
}

fn encode_version(ts: Option<Timestamp>) -> CasVersion {
    match ts {
        None => Vec::new(),
        Some(t) => {
            let mut v = t.wall_ms.to_le_bytes().to_vec();
            v.extend_from_slice(&t.logical.to_le_bytes());
            v
        }
    }
}

fn decode_version(v: &[u8]) -> KvResult<Option<Timestamp>> {
    match v.len() {
        0 => Ok(None),
        12 => Ok(Some(Timestamp {
            wall_ms: u64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
            logical: u32::from_le_bytes(v[8..].try_into().expect("4 bytes")),
        })),
        _ => Err(KvError::Other("not a version this region issued".into())),
    }
}

/// One key-value operation, as forwarded between regions and sent by the CLI.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Get {
        ns: String,
        key: String,
    },
    Set {
        ns: String,
        key: String,
        value_hex: String,
    },
    /// Many keys of one namespace at once (at most [`MAX_SET_MANY`]): one
    /// group of commits instead of one per key. Not atomic; writing the
    /// same items again is safe.
    SetMany {
        ns: String,
        items: Vec<KeyValue>,
    },
    Delete {
        ns: String,
        key: String,
    },
    Increment {
        ns: String,
        key: String,
        delta: i64,
    },
    List {
        ns: String,
        cursor: Option<String>,
        limit: Option<usize>,
    },
    ReadVersioned {
        ns: String,
        key: String,
    },
    Swap {
        ns: String,
        key: String,
        version_hex: String,
        value_hex: String,
    },
    /// `write` under an idempotency key: in a strong namespace, the first
    /// write under a key is applied and its result kept; the same key sent
    /// again (a retry after an unknown outcome, to any region) returns that
    /// result without applying anything. Elsewhere the write runs as is
    /// (last-writer-wins sets and deletes are idempotent by nature).
    Once {
        idem: String,
        write: Box<Op>,
    },
}

impl Op {
    /// The namespace it is about.
    pub fn ns(&self) -> &str {
        match self {
            Op::Get { ns, .. }
            | Op::Set { ns, .. }
            | Op::SetMany { ns, .. }
            | Op::Delete { ns, .. }
            | Op::Increment { ns, .. }
            | Op::List { ns, .. }
            | Op::ReadVersioned { ns, .. }
            | Op::Swap { ns, .. } => ns,
            Op::Once { write, .. } => write.ns(),
        }
    }

    /// Whether it changes nothing.
    pub fn is_read(&self) -> bool {
        match self {
            Op::Get { .. } | Op::List { .. } | Op::ReadVersioned { .. } => true,
            Op::Once { write, .. } => write.is_read(),
            _ => false,
        }
    }
}

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;

/// Most items in one [`Op::SetMany`].
pub const MAX_SET_MANY: usize = 10_000;

/// One item of an [`Op::SetMany`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value_hex: String,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct OpResult {
    /// Region that executed the operation.
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_hex: Option<String>,
    /// For a swap: whether it was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swapped: Option<bool>,
    /// For a set-many: how many keys were written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<u64>,
    /// Causality token of a write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
}

impl OpResult {
    /// The answer of an operation that failed with `e` in `region`.
    pub fn failed(region: &str, e: &KvError) -> OpResult {
        OpResult {
            region: region.to_string(),
            error: Some(e.to_string()),
            error_kind: Some(e.kind().into()),
            ..Default::default()
        }
    }
}

pub fn unhex(s: &str) -> KvResult<Vec<u8>> {
    hex::decode(s).map_err(|_| KvError::Other("value is not hex".into()))
}

impl KvService {
    /// The path of this app's cluster API `rest` (e.g. `kv/op`) on a peer.
    pub fn api(&self, rest: &str) -> String {
        format!("/_meridian/apps/{}/{rest}", self.app)
    }

    /// Where to reach a peer, and who it must prove to be: its certificate
    /// must carry the jurisdiction this region trusts it with, so data meant
    /// for one jurisdiction can never be handed to a node issued for another.
    pub fn target(&self, peer: &Peer) -> Result<Target, CallError> {
        Target::from_url(&peer.url, Expect::region(&peer.name, &peer.jurisdiction))
    }

    pub fn placement(&self, namespaces: &BTreeMap<String, Namespace>, ns: &str) -> KvResult<Placement> {
        let n = namespaces.get(ns).ok_or(KvError::NoSuchStore)?;
        if matches!(n.mode, KvMode::Strong { .. }) {
            return Ok(Placement::Strong);
        }
        if allowed_in(n, &self.region, &self.jurisdiction) {
            return Ok(Placement::Local);
        }
        let mut ps: Vec<Peer> =
            self.peers.load().iter().filter(|p| allowed_in(n, &p.name, &p.jurisdiction)).cloned().collect();
        if ps.is_empty() {
            return Err(KvError::Other(format!("no region this one knows may hold namespace {ns:?}")));
        }
        ps.sort_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms));
        Ok(Placement::Forward(ps))
    }

    /// Whether `peer` may receive namespace `ns` by replication.
    pub fn replicates_to(&self, ns: &str, peer: &Peer) -> bool {
        self.replicates_to_node(ns, &peer.name, &peer.jurisdiction)
    }

    /// The same for a caller known only by its verified certificate.
    pub fn replicates_to_identity(&self, ns: &str, caller: &Identity) -> bool {
        caller.role == meridian_trust::Role::Region
            && self.replicates_to_node(ns, &caller.name, caller.jurisdiction.as_deref().unwrap_or(""))
    }

    fn replicates_to_node(&self, ns: &str, name: &str, jurisdiction: &str) -> bool {
        let nss = self.namespaces.load();
        match nss.get(ns) {
            Some(n) => !matches!(n.mode, KvMode::Strong { .. }) && allowed_in(n, name, jurisdiction),
            // Unknown here (an older version's namespace): not sent, so a
            // residency rule can never be bypassed by a manifest change.
            None => false,
        }
    }

    /// Whether this region may store records of `ns` it receives.
    pub fn may_hold(&self, ns: &str) -> Result<(), String> {
        let nss = self.namespaces.load();
        match nss.get(ns) {
            Some(n) if matches!(n.mode, KvMode::Strong { .. }) => {
                Err(format!("namespace {ns:?} is strong; it is not replicated this way"))
            }
            Some(n) if allowed_in(n, &self.region, &self.jurisdiction) => Ok(()),
            Some(_) => Err(format!("residency: namespace {ns:?} may not be stored in {}", self.region)),
            None => Err(format!("namespace {ns:?} is not declared by the app active here")),
        }
    }

    pub fn token_of(&self, w: &Written) -> TokenEntry {
        TokenEntry { origin: self.region.clone(), incarnation: self.store.incarnation(), seq: w.seq }
    }

    /// Runs an operation here (the namespace must be local).
    async fn run_local(&self, op: &Op) -> KvResult<(OpResult, Option<TokenEntry>)> {
        let mut r = OpResult { region: self.region.clone(), ..Default::default() };
        let mut token = None;
        match op {
            // Not deduplicated here (see `Op::Once`).
            Op::Once { write, .. } => return Box::pin(self.run_local(write)).await,
            Op::Get { ns, key } => {
                let rec = self.store.get(ns, key.as_bytes()).map_err(other)?;
                r.value_hex = rec.and_then(|r| visible(r.value)).map(hex::encode);
            }
            Op::Set { ns, key, value_hex } => {
                let w = self.store.put(ns, key.as_bytes(), unhex(value_hex)?).await.map_err(other)?;
                token = Some(self.token_of(&w));
            }
            Op::SetMany { ns, items } => {
                if items.len() > MAX_SET_MANY {
                    return Err(KvError::Other(format!("{} items; at most {MAX_SET_MANY} at once", items.len())));
                }
                let items = items
                    .iter()
                    .map(|i| Ok((i.key.as_bytes().to_vec(), unhex(&i.value_hex)?)))
                    .collect::<KvResult<Vec<_>>>()?;
                let n = items.len() as u64;
                if let Some(w) = self.store.put_many(ns, items).await.map_err(other)? {
                    token = Some(self.token_of(&w));
                }
                r.written = Some(n);
            }
            Op::Delete { ns, key } => {
                let w = self.store.delete(ns, key.as_bytes()).await.map_err(other)?;
                token = Some(self.token_of(&w));
            }
            Op::Increment { ns, key, delta } => {
                let (w, total) = self.store.increment(ns, key.as_bytes(), *delta).await.map_err(other)?;
                token = Some(self.token_of(&w));
                r.total = Some(total);
            }
            Op::List { ns, cursor, limit } => {
                let limit = limit.unwrap_or(meridian_core::kv::LIST_PAGE).clamp(1, 10_000);
                let mut after = cursor.clone().map(String::into_bytes);
                // Tombstones are skipped, so a page may need several scans.
                loop {
                    let batch = self.store.scan(ns, after.as_deref(), limit + 1).map_err(other)?;
                    let more = batch.len() > limit;
                    for (k, rec) in batch.into_iter().take(limit) {
                        after = Some(k.clone());
                        if matches!(rec.value, Value::Tombstone) {
                            continue;
                        }
                        // Keys written through wasi:keyvalue are strings.
                        if let Ok(k) = String::from_utf8(k) {
                            r.keys.push(k);
                        }
                        if r.keys.len() == limit {
                            break;
                        }
                    }
                    if !more || r.keys.len() == limit {
                        r.cursor = if more { after.and_then(|a| String::from_utf8(a).ok()) } else { None };
                        break;
                    }
                }
            }
            Op::ReadVersioned { ns, key } => {
                let rec = self.store.get(ns, key.as_bytes()).map_err(other)?;
                let live = rec.filter(|r| !matches!(r.value, Value::Tombstone));
                r.version_hex = Some(hex::encode(encode_version(live.as_ref().map(|r| r.ts))));
                r.value_hex = live.and_then(|r| visible(r.value)).map(hex::encode);
            }
            Op::Swap { ns, key, version_hex, value_hex } => {
                let expected = decode_version(&unhex(version_hex)?)?;
                match self.store.swap(ns, key.as_bytes(), expected, unhex(value_hex)?).await.map_err(other)? {
                    Swapped::Done(w) => {
                        token = Some(self.token_of(&w));
                        r.swapped = Some(true);
                    }
                    Swapped::Stale(cur) => {
                        let live = cur.filter(|r| !matches!(r.value, Value::Tombstone));
                        r.swapped = Some(false);
                        r.version_hex = Some(hex::encode(encode_version(live.as_ref().map(|r| r.ts))));
                        r.value_hex = live.and_then(|r| visible(r.value)).map(hex::encode);
                    }
                }
            }
        }
        r.token = token.as_ref().map(|t| format_token(std::slice::from_ref(t)));
        Ok((r, token))
    }

    /// Sends an operation to the nearest allowed region that answers. A
    /// write is tried on the next region only if it certainly was not sent
    /// (executing an increment twice would be wrong); a read on any failure.
    async fn forward(&self, peers: &[Peer], op: &Op) -> KvResult<(OpResult, Option<TokenEntry>)> {
        let body = bytes::Bytes::from(serde_json::to_vec(op).map_err(other)?);
        let read = op.is_read();
        let mut last = String::new();
        for p in peers {
            let target = self.target(p).map_err(other)?;
            match self
                .cluster
                .call(&target, Method::POST, &self.api("kv/op"), body.clone(), Duration::from_secs(10))
                .await
            {
                Ok(answer) => {
                    let r: OpResult = match serde_json::from_slice(&answer.body) {
                        Ok(r) => r,
                        Err(_) => {
                            last = format!("{}: HTTP {}: {}", p.name, answer.status, answer.text());
                            if read {
                                continue;
                            }
                            return Err(KvError::OutcomeUnknown(last));
                        }
                    };
                    if let Some(e) = r.error.clone() {
                        return Err(match KvError::from_kind(r.error_kind.as_deref(), e) {
                            KvError::Other(e) => KvError::Other(format!("{}: {e}", p.name)),
                            e => e,
                        });
                    }
                    let token = r.token.as_deref().map(parse_token).and_then(|t| t.into_iter().next());
                    return Ok((r, token));
                }
                Err(e) if e.nothing_sent() || read => last = e.to_string(),
                Err(e) => return Err(KvError::OutcomeUnknown(format!("{}: {e}", p.name))),
            }
        }
        Err(KvError::NotApplied(format!("no allowed region answered ({last})")))
    }

    /// Runs an operation wherever its namespace lives.
    pub async fn execute(
        &self,
        namespaces: &BTreeMap<String, Namespace>,
        op: &Op,
    ) -> KvResult<(OpResult, Option<TokenEntry>)> {
        match self.placement(namespaces, op.ns())? {
            Placement::Local => self.run_local(op).await,
            Placement::Forward(peers) => self.forward(&peers, op).await,
            Placement::Strong => crate::strong::execute(self, op.ns(), op, 0).await.map(|r| (r, None)),
        }
    }

    /// `POST /_meridian/apps/<app>/kv/op`: one operation from another region or the CLI,
    /// run wherever its namespace lives. A region forwards only to regions
    /// allowed to hold the namespace, which run it themselves, so an
    /// operation is forwarded at most once (strong ones: at most three hops).
    pub async fn handle_op(&self, body: Bytes) -> Response<Body> {
        let op: Op = match serde_json::from_slice(&body) {
            Ok(op) => op,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("not a key-value operation: {e}")),
        };
        let nss = self.namespaces.load_full();
        match self.execute(&nss, &op).await {
            Ok((r, _)) => json(StatusCode::OK, &r),
            Err(e) => json(StatusCode::OK, &OpResult::failed(&self.region, &e)),
        }
    }

    /// Whether this region has applied every write `token` names.
    pub fn has_applied(&self, token: &[TokenEntry]) -> bool {
        token.iter().all(|e| {
            if e.origin == self.region {
                return true;
            }
            match self.store.applied(&e.origin) {
                Ok(Some((inc, seq))) => inc == e.incarnation && seq >= e.seq,
                _ => false,
            }
        })
    }

    /// Waits (bounded) until the writes of `token` are applied here.
    pub async fn wait_for(&self, token: &[TokenEntry]) -> bool {
        let mut changes = self.store.applied_changes();
        let deadline = tokio::time::Instant::now() + self.causality_wait;
        loop {
            if self.has_applied(token) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.has_applied(token),
            }
        }
    }

    pub fn status(&self) -> KvStatus {
        let store = &self.store;
        KvStatus {
            region: self.region.clone(),
            incarnation: store.incarnation(),
            last_seq: *store.last_seq().borrow(),
            log_len: store.log_len().unwrap_or(0),
            conflicts: store.conflict_count(),
            commits: store.commit_count(),
            peers: self.repl.peer_status(store),
            origins: self.repl.origin_status(store),
            rejected_messages: self.repl.rejected(),
            tombstones: store.tombstone_count(),
            tombstones_collected: self.repl.collected(),
            stable_ms: self.repl.global_stable(self).wall_ms,
            groups: crate::strong::status(self),
            rejoin: self.rejoin.status(),
            tree_journal_pending: store.tree_journal_pending(),
        }
    }

    /// The key-value state in the Prometheus text format (a node with
    /// several apps merges their families, `merge_exposition` in the
    /// region). Labels are region, app and peer names only: no key or value
    /// ever appears in metrics.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let s = self.status();
        let (r, app) = (&s.region, &self.app);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{{region=\"{r}\",app=\"{app}\"{labels}}} {v}");
            }
        };
        metric(
            "meridian_kv_writes_total",
            "counter",
            "Writes accepted in this region.",
            vec![(String::new(), s.last_seq as f64)],
        );
        metric(
            "meridian_kv_log_entries",
            "gauge",
            "Replication log entries kept.",
            vec![(String::new(), s.log_len as f64)],
        );
        metric(
            "meridian_kv_conflicts_total",
            "counter",
            "Concurrent writes overwritten (kept, see kv conflicts).",
            vec![(String::new(), s.conflicts as f64)],
        );
        metric(
            "meridian_kv_commits_total",
            "counter",
            "Storage transactions committed (group commit).",
            vec![(String::new(), s.commits as f64)],
        );
        metric(
            "meridian_kv_rejected_messages_total",
            "counter",
            "Replication messages refused.",
            vec![(String::new(), s.rejected_messages as f64)],
        );
        metric("meridian_kv_tombstones", "gauge", "Tombstones stored.", vec![(String::new(), s.tombstones as f64)]);
        metric(
            "meridian_kv_tombstones_collected_total",
            "counter",
            "Tombstones collected.",
            vec![(String::new(), s.tombstones_collected as f64)],
        );
        let peer = |f: fn(&meridian_core::wire::PeerReplication) -> f64| {
            s.peers.iter().map(|p| (format!(",peer=\"{}\"", p.peer), f(p))).collect::<Vec<_>>()
        };
        metric(
            "meridian_kv_peer_acked_seq",
            "gauge",
            "Last log entry the peer acknowledged.",
            peer(|p| p.acked_seq as f64),
        );
        metric(
            "meridian_kv_peer_pending",
            "gauge",
            "Log entries the peer has not acknowledged.",
            peer(|p| p.pending as f64),
        );
        metric(
            "meridian_kv_peer_errors_total",
            "counter",
            "Failed replication attempts to the peer.",
            peer(|p| p.push_errors as f64),
        );
        metric(
            "meridian_kv_peer_snapshots_total",
            "counter",
            "Snapshots sent to the peer.",
            peer(|p| p.snapshots_sent as f64),
        );
        metric(
            "meridian_kv_peer_snapshot_records_total",
            "counter",
            "Records sent to the peer in snapshots (only what it lacked).",
            peer(|p| p.snapshot_records_sent as f64),
        );
        metric(
            "meridian_kv_peer_tree_nodes_compared_total",
            "counter",
            "Anti-entropy tree nodes compared with the peer (one per namespace per round on equal data).",
            peer(|p| p.tree_nodes_compared as f64),
        );
        metric(
            "meridian_kv_peer_repaired_total",
            "counter",
            "Records repaired here by anti-entropy with the peer.",
            peer(|p| p.repaired as f64),
        );
        let mut lag = Vec::new();
        for o in &s.origins {
            for (q, v) in [("0.5", o.lag_ms_p50), ("0.99", o.lag_ms_p99)] {
                if let Some(v) = v {
                    lag.push((format!(",origin=\"{}\",quantile=\"{q}\"", o.origin), v));
                }
            }
        }
        metric("meridian_kv_replication_lag_ms", "summary", "Applied here minus written at the origin.", lag);
        let applied = s.origins.iter().map(|o| (format!(",origin=\"{}\"", o.origin), o.applied_seq as f64)).collect();
        metric("meridian_kv_applied_seq", "gauge", "Last entry of the origin's log applied here.", applied);
        out
    }

    /// The app's data API under `/_meridian/apps/<app>/`: `kv/`, `repl/`,
    /// `raft/`, `metrics`; `caller` is
    /// the verified identity of the client (the role was already checked).
    pub async fn admin(
        self: &Arc<Self>,
        req: Request<hyper::body::Incoming>,
        path: &[&str],
        caller: &Identity,
    ) -> Response<Body> {
        let method = req.method().clone();
        match (method, path) {
            (Method::POST, ["kv", "op"]) => match meridian_http::read_body(req.into_body(), 16 << 20).await {
                Ok(b) => self.handle_op(b).await,
                Err(e) => e.into_response(),
            },
            (Method::GET, ["kv", "status"]) => json(StatusCode::OK, &self.status()),
            (Method::GET, ["metrics"]) => {
                let mut r = Response::new(meridian_http::full(self.metrics_text()));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (Method::GET, ["kv", "conflicts", ns]) => match self.store.conflicts(ns, 1000) {
                Ok(list) => {
                    let out: Vec<serde_json::Value> = list
                        .into_iter()
                        .map(|(k, r)| {
                            serde_json::json!({
                                "key": String::from_utf8_lossy(&k),
                                "origin": r.origin,
                                "ts_ms": r.ts.wall_ms,
                                "value_hex": visible(r.value).map(hex::encode),
                            })
                        })
                        .collect();
                    json(StatusCode::OK, &out)
                }
                Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
            },
            (Method::GET, ["kv", "digest", ns])
                if caller.role == meridian_trust::Role::Region && !self.replicates_to_identity(ns, caller) =>
            {
                text(StatusCode::FORBIDDEN, format!("namespace {ns:?} is not replicated to {caller}"))
            }
            // Exact: the tree catches up with every write committed before
            // this request first (it otherwise trails them by a moment).
            (Method::GET, ["kv", "digest", ns]) => {
                match self.store.flush_tree().await.and_then(|()| self.store.digest(ns)) {
                    Ok(d) => json(StatusCode::OK, &d.iter().map(hex::encode).collect::<Vec<_>>()),
                    Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
                }
            }
            (Method::PUT, ["peers"]) => match meridian_http::read_body(req.into_body(), 1 << 20).await {
                Ok(b) => match serde_json::from_slice::<Vec<Peer>>(&b) {
                    Ok(peers) => {
                        self.set_peers(peers);
                        json(StatusCode::OK, &*self.peers.load_full())
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("expected a list of peers: {e}")),
                },
                Err(e) => e.into_response(),
            },
            (_, ["repl", ..]) => self.repl.handle(self, req, path, caller).await,
            (Method::POST, ["raft", ns, what]) => {
                let query = req.uri().query().map(str::to_string);
                match meridian_http::read_body(req.into_body(), 64 << 20).await {
                    Ok(b) => crate::strong::handle(self, ns, what, query.as_deref(), b, caller).await,
                    Err(e) => e.into_response(),
                }
            }
            _ => text(StatusCode::NOT_FOUND, format!("no such API: {}", path.join("/"))),
        }
    }

    /// Replaces the set of peers and restarts replication with them.
    pub fn set_peers(self: &Arc<Self>, peers: Vec<Peer>) {
        let peers: Vec<Peer> = peers.into_iter().filter(|p| p.name != self.region).collect();
        self.peers.store(Arc::new(peers));
        self.repl.restart(self.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_ignore_garbage() {
        let t = vec![
            TokenEntry { origin: "eu-west".into(), incarnation: 0xabc, seq: 12 },
            TokenEntry { origin: "us-east".into(), incarnation: 1, seq: 3 },
        ];
        assert_eq!(parse_token(&format_token(&t)), t);
        assert_eq!(parse_token("eu-west:zz:1,, :1:2,Bad Name:1:1,us-east:1:x"), vec![]);
        let mut m = t.clone();
        merge_token(&mut m, TokenEntry { origin: "eu-west".into(), incarnation: 0xabc, seq: 5 });
        assert_eq!(m, t, "an older write does not move a token back");
    }

    #[test]
    fn only_tokens_sealed_with_the_worlds_key_are_honoured() {
        let key = CausalityKey::new(b"world key".to_vec());
        let t = vec![TokenEntry { origin: "eu-west".into(), incarnation: 7, seq: 99 }];
        let sealed = key.seal(&t);
        assert_eq!(key.open(&sealed), t);
        // Another world's key, an altered sequence number, a missing or
        // shortened tag, a bare unsigned token: all ignored.
        assert_eq!(CausalityKey::new(b"other".to_vec()).open(&sealed), vec![]);
        assert_eq!(key.open(&sealed.replace(":99.", ":999.")), vec![]);
        assert_eq!(key.open(&sealed[..sealed.len() - 2]), vec![]);
        assert_eq!(key.open("eu-west:7:99"), vec![]);
        assert_eq!(key.open(&format!("{}.zz", format_token(&t))), vec![]);
    }

    #[test]
    fn residency_placement() {
        let ns = |mode| Namespace { name: "n".into(), mode };
        let eu = ns(KvMode::Regional { jurisdiction: Some("eu".into()), regions: vec![] });
        assert!(allowed_in(&eu, "eu-west", "eu"));
        assert!(!allowed_in(&eu, "us-east", "us"));
        let listed = ns(KvMode::Regional { jurisdiction: None, regions: vec!["ap-southeast".into()] });
        assert!(allowed_in(&listed, "ap-southeast", "sg"));
        assert!(!allowed_in(&listed, "eu-west", "eu"));
        assert!(allowed_in(&ns(KvMode::Global), "anywhere", ""));
    }
}
