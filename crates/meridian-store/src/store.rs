//! Records of every namespace of one region in one redb database, written
//! by one thread with group commit.
//!
//! redb: a pure-Rust, ACID, copy-on-write B-tree; a commit returns only
//! after the data is fsynced, which is the durability a write must have
//! before it is acknowledged. All writes go through one writer thread:
//! it takes every job waiting in its queue, applies them in one transaction
//! and answers them all after the one fsync (group commit). Reads run on the
//! caller's thread against a snapshot.
//!
//! Tables:
//! - `records`: `namespace \0 key` → encoded [`Record`];
//! - `log`: sequence number → encoded [`Change`], every write made here, in
//!   order: the replication stream to peers, trimmed once they all have it;
//! - `applied`: origin region → (its incarnation, last sequence applied here);
//! - `cursors`: peer region → last sequence of our log it acknowledged;
//! - `conflicts`: `namespace \0 key \0 ts origin` → the overwritten record;
//! - `tree`: per namespace, the leaves of its anti-entropy tree
//!   ([`crate::merkle`]; the levels above are kept in memory, summed from
//!   the leaves at open);
//! - `index`: `namespace \0 position key`, every record by its place in
//!   that tree (the records under a node are one range);
//! - `journal`: per commit, the tree changes it made, not yet applied to
//!   `tree` and `index` (see [`flush_journal`]);
//! - `tombstones`: every tombstone by (timestamp, records-table key);
//! - `meta`: format, next sequence, incarnation, conflict and tombstone
//!   counts, the largest timestamp stored.

use crate::hlc::{Hlc, Timestamp};
use crate::merkle::{self, Node, NodePath, FANOUT, LEAF_DEPTH};
use crate::record::{DecodeError, Record, Value};
use crate::wire::{Change, WireError, MAX_KEY};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const APPLIED: TableDefinition<&str, (u64, u64)> = TableDefinition::new("applied");
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
const CONFLICTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("conflicts");
/// Format 3's per-namespace digests (the tree's first level now): dropped
/// when a store of that format is opened.
const DIGESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("digests");
/// Per namespace, the leaves of its anti-entropy tree (`merkle::node_key` →
/// encoded [`Node`]), kept by the writer in the same transactions as the
/// records. Empty leaves are absent. The levels above (4,369 nodes at most
/// per namespace) live in memory only: persisting them cost a third of a
/// single writer's throughput (five more B-tree leaves dirtied per commit),
/// and summing them from at most 65,536 leaves per namespace at open is
/// bounded whatever the number of records.
const TREE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tree");
/// Every record by its place in the tree (`merkle::index_key`).
const INDEX: TableDefinition<&[u8], ()> = TableDefinition::new("index");
/// Per commit (numbered), the tree changes it made (`encode_tree_change`),
/// until [`flush_journal`] applies them to `tree` and `index`. A commit
/// appends one entry at the end of this table — one page, where updating
/// a leaf and the index in place would dirty two random pages per record
/// and cost a single writer a sixth of its throughput.
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
/// Journaled changes that make the writer flush after a commit, even under
/// load; also about the most one flush takes (a bounded pause: the
/// writer flushes between commits).
const JOURNAL_FLUSH_AT: u64 = 256;
/// How long the writer waits idle before flushing a smaller journal.
const JOURNAL_IDLE_FLUSH: std::time::Duration = std::time::Duration::from_millis(20);

/// One journaled change to a namespace's tree: the XOR of the record's old
/// and new hashes, and whether the key was added (1), removed (-1) or
/// replaced (0).
fn encode_tree_change(out: &mut Vec<u8>, ns: &[u8], key: &[u8], hash: &[u8; 32], delta: i8) {
    out.extend_from_slice(&(ns.len() as u32).to_le_bytes());
    out.extend_from_slice(ns);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(hash);
    out.push(delta as u8);
}

type TreeChange<'a> = (&'a [u8], &'a [u8], [u8; 32], i8);

fn bad_journal() -> StoreError {
    StoreError::Engine("a journal entry of the tree is unreadable".into())
}

/// A length-prefixed field off the front of `b`.
fn take_field<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], StoreError> {
    let n = u32::from_le_bytes(b.get(..4).ok_or_else(bad_journal)?.try_into().expect("4 bytes")) as usize;
    let v = b.get(4..4 + n).ok_or_else(bad_journal)?;
    *b = &b[4 + n..];
    Ok(v)
}

fn decode_tree_changes(mut b: &[u8]) -> Result<Vec<TreeChange<'_>>, StoreError> {
    let bad = bad_journal;
    let mut out = Vec::new();
    while !b.is_empty() {
        let ns = take_field(&mut b)?;
        let key = take_field(&mut b)?;
        let rest = b.get(..33).ok_or_else(bad)?;
        let hash: [u8; 32] = rest[..32].try_into().expect("32 bytes");
        out.push((ns, key, hash, rest[32] as i8));
        b = &b[33..];
    }
    Ok(out)
}

/// A tree leaf as stored.
fn stored_node(bytes: &[u8]) -> Result<Node, StoreError> {
    Node::decode(bytes).ok_or_else(|| StoreError::Engine(format!("a stored tree leaf is {} bytes", bytes.len())))
}

/// What flushing the journal changed in the nodes above the leaves: by
/// `merkle::node_key`, the XOR of hashes and the change in count.
type UpperDelta = BTreeMap<Vec<u8>, ([u8; 32], i64)>;

/// Applies the oldest journaled tree changes — whole commits, until at least
/// `at_least` changes or the journal's end — to the `tree` leaves and the
/// `index`, in one transaction that also removes them from the journal;
/// returns what changed above the leaves (for `Inner::upper`) and how many
/// changes were applied. The transaction is not fsynced: the next durable
/// commit makes it durable, and a crash before that leaves the journal,
/// which is applied again.
fn flush_journal(db: &Database, at_least: u64) -> Result<(UpperDelta, u64), StoreError> {
    let mut txn = db.begin_write().map_err(engine)?;
    txn.set_durability(redb::Durability::None).map_err(engine)?;
    let mut upper = UpperDelta::new();
    let mut leaves: BTreeMap<Vec<u8>, Node> = BTreeMap::new();
    let mut n = 0u64;
    {
        let mut journal = txn.open_table(JOURNAL).map_err(engine)?;
        let mut tree = txn.open_table(TREE).map_err(engine)?;
        let mut index = txn.open_table(INDEX).map_err(engine)?;
        let mut last = None;
        for entry in journal.iter().map_err(engine)? {
            if n >= at_least {
                break;
            }
            let (id, v) = entry.map_err(engine)?;
            last = Some(id.value());
            for (ns, key, hash, delta) in decode_tree_changes(v.value())? {
                n += 1;
                let pos = merkle::position(key);
                for d in 0..LEAF_DEPTH {
                    let (h, c) = upper.entry(merkle::node_key(ns, &pos[..d])).or_insert(([0; 32], 0));
                    merkle::xor_into(h, &hash);
                    *c += delta as i64;
                }
                let leaf = match leaves.entry(merkle::node_key(ns, &pos)) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        let stored = tree.get(e.key().as_slice()).map_err(engine)?;
                        let node = stored.map(|v| stored_node(v.value())).transpose()?.unwrap_or_default();
                        e.insert(node)
                    }
                };
                leaf.apply(&hash, delta as i64);
                match delta {
                    1 => drop(index.insert(merkle::index_key(ns, key).as_slice(), ()).map_err(engine)?),
                    -1 => drop(index.remove(merkle::index_key(ns, key).as_slice()).map_err(engine)?),
                    _ => {}
                }
            }
        }
        for (k, leaf) in &leaves {
            if leaf.is_empty() {
                tree.remove(k.as_slice()).map_err(engine)?;
            } else {
                tree.insert(k.as_slice(), leaf.encode().as_slice()).map_err(engine)?;
            }
        }
        if let Some(last) = last {
            journal.retain_in(..=last, |_, _| false).map_err(engine)?;
        }
    }
    txn.commit().map_err(engine)?;
    Ok((upper, n))
}

/// Every tombstone stored, keyed by its timestamp then its records-table
/// key: collection takes the ones older than a time as a range, never
/// walking the records.
const TOMBSTONES: TableDefinition<&[u8], ()> = TableDefinition::new("tombstones");

/// Bytes of the timestamp that starts a `TOMBSTONES` key.
const TOMBSTONE_TS_LEN: usize = 12;

/// A `TOMBSTONES` key: timestamp (big-endian, so keys sort by it), then the
/// records-table key.
fn tombstone_key(ts: Timestamp, k: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(TOMBSTONE_TS_LEN + k.len());
    t.extend_from_slice(&ts.wall_ms.to_be_bytes());
    t.extend_from_slice(&ts.logical.to_be_bytes());
    t.extend_from_slice(k);
    t
}

/// Per bucket of keys (the tree's first level), the XOR of the SHA-256 of
/// every (key, record): what builds before the tree compared.
pub type NamespaceDigest = [[u8; 32]; DIGEST_BUCKETS];

/// The namespace and the key of a records-table key (`ns \0 key`).
fn split_full_key(k: &[u8]) -> (&[u8], &[u8]) {
    let end = k.iter().position(|&b| b == 0).unwrap_or(k.len());
    (&k[..end], k.get(end + 1..).unwrap_or_default())
}
/// On-disk layout version (tables, keys and record encoding).
pub const DISK_FORMAT: u64 = 4;
/// Formats whose records this build reads but whose kept structures (the
/// tombstone index and count from 3, the tree, index and largest timestamp
/// from 4) it builds once, at open. A build that reads only an older
/// format refuses this one rather than let its writes leave them stale.
const DISK_FORMATS_REBUILT: [u64; 2] = [2, 3];
/// Buckets of the anti-entropy digest of a namespace (the tree's first
/// level).
pub const DIGEST_BUCKETS: usize = FANOUT;
/// Most jobs one commit takes.
const MAX_GROUP: usize = 512;

/// Conflict losers kept per key (the newest): a key written concurrently
/// forever keeps a bounded history. Detections are all counted.
pub const MAX_LOSERS_PER_KEY: usize = 16;

/// The engine's cache of pages (reads and the write buffer) per store. The
/// engine's default (1 GiB) would let every app's store on a node grow to
/// that; past this, pages come from the operating system's page cache.
const CACHE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("stored record for {key:?} is unreadable: {source}")]
    Decode { key: String, source: DecodeError },
    #[error("stored log entry {seq} is unreadable: {source}")]
    Log { seq: u64, source: WireError },
    #[error("data directory has on-disk format {0}; this build reads format {DISK_FORMAT}")]
    Format(u64),
    #[error("namespace {0:?} is not a valid name")]
    Namespace(String),
    #[error("key is {0} bytes; the largest allowed is {MAX_KEY}")]
    KeyTooLong(usize),
    #[error("the key holds a value, not a counter")]
    NotACounter,
    #[error("the counter would leave the range of a 64-bit signed integer; nothing was changed")]
    CounterOverflow,
    #[error("the store is shut down")]
    Closed,
    #[error("tree node {0:?} is a leaf or out of range: it has no children")]
    LeafHasNoChildren(String),
    #[error("the key to start after is not under tree node {node:?}")]
    NotUnderNode { node: String },
}

fn engine<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Engine(e.into().to_string())
}

/// What a write job asks for.
#[derive(Debug)]
enum Op {
    Put { ns: String, key: Vec<u8>, value: Vec<u8> },
    Delete { ns: String, key: Vec<u8> },
    Increment { ns: String, key: Vec<u8>, delta: i64 },
    Swap { ns: String, key: Vec<u8>, expected: Option<Timestamp>, value: Vec<u8> },
    Push { origin: String, incarnation: u64, prev_seq: u64, last_seq: u64, changes: Vec<Change> },
    Snapshot { origin: String, incarnation: u64, upto_seq: u64, complete: bool, changes: Vec<Change> },
    Merge { changes: Vec<Change> },
    Ack { peer: String, seq: u64 },
    Trim { upto: u64 },
    Collect { before: Timestamp },
    FlushTree,
}

/// A local write, durable when returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub record: Record,
    /// Position in this region's log (what a causality token names).
    pub seq: u64,
}

/// What applying remote changes did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Records that changed something here.
    pub changed: usize,
    /// Records already known (duplicates, or older than what is here).
    pub unchanged: usize,
    /// Writes overwritten by concurrent ones (see [`Record::conflict_loser`]).
    pub conflicts: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Applied(ApplyReport),
    /// The message starts after what we have from that origin: we hold
    /// `have` (of the sender's current incarnation; 0 if none). Nothing changed.
    Gap {
        have: u64,
    },
}

/// Result of a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Swapped {
    Done(Written),
    /// The key changed since `expected`; this is what it holds now.
    Stale(Option<Record>),
}

#[derive(Debug)]
enum Outcome {
    Written(Written),
    Counter(Written, i64),
    Swapped(Swapped),
    Pushed(PushOutcome),
    Merged(ApplyReport),
    Done,
}

struct Job {
    op: Op,
    reply: tokio::sync::oneshot::Sender<Result<Outcome, StoreError>>,
}

struct Inner {
    db: Database,
    region: String,
    incarnation: u64,
    hlc: Hlc<crate::hlc::Clock>,
    /// Last sequence number written to the log (replicators wait on it).
    last_seq: tokio::sync::watch::Sender<u64>,
    /// Every local write with a timestamp at or below this is committed
    /// (published by the writer after each commit and while idle).
    watermark: tokio::sync::watch::Sender<Timestamp>,
    tombstones_collected: AtomicU64,
    /// Tombstones stored now: kept by the writer as records change and
    /// persisted with them (`meta.tombstones`), never counted by a scan.
    tombstones: AtomicU64,
    /// The largest timestamp of any record stored (`meta.max_ts_*`), kept
    /// by the writer.
    max_ts: std::sync::Mutex<Timestamp>,
    /// Tree nodes read to answer or make comparisons (see
    /// [`Store::tree_nodes_read`]).
    tree_nodes_read: AtomicU64,
    /// The nodes above the leaves of every namespace's tree (by
    /// `merkle::node_key`; empty ones absent), changed by the writer once a
    /// transaction commits.
    upper: std::sync::RwLock<HashMap<Vec<u8>, Node>>,
    /// Tree changes journaled and not yet flushed into the tree.
    journaled: AtomicU64,
    /// Key of the next journal entry (the journal is empty after open).
    next_journal: AtomicU64,
    /// Records inserted, replaced or removed since the store was opened.
    records_written: AtomicU64,
    /// Bumped whenever remote changes are applied (causality waits).
    applied_gen: tokio::sync::watch::Sender<u64>,
    conflicts: AtomicU64,
    commits: AtomicU64,
    /// Sequence number of the next local write (used by the writer only).
    next_seq: AtomicU64,
}

/// A region's store. Cheap to clone; the writer thread stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Store {
    // Dropped first: joins the writer, which holds its own `inner`.
    handle: Arc<WriterHandle>,
    inner: Arc<Inner>,
}

struct WriterHandle {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriterHandle {
    /// Closing the queue stops the writer once it has answered every job;
    /// joining it means the database is closed when the last `Store` is.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) fn full_key(ns: &str, key: &[u8]) -> Result<Vec<u8>, StoreError> {
    if ns.is_empty() || ns.contains('\0') {
        return Err(StoreError::Namespace(ns.to_string()));
    }
    if key.len() > MAX_KEY {
        return Err(StoreError::KeyTooLong(key.len()));
    }
    let mut k = Vec::with_capacity(ns.len() + 1 + key.len());
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    Ok(k)
}

/// Builds what the writer keeps alongside the records — the index of
/// tombstones and their count (`meta.tombstones`, whose presence says the
/// rest is kept too), every namespace's tree and index, and the largest
/// timestamp stored — from one scan of the records, replacing whatever was
/// there. Returns the tombstone count.
fn rebuild_kept(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let mut tree: BTreeMap<Vec<u8>, Node> = BTreeMap::new();
    let mut n = 0u64;
    let mut max_ts = Timestamp::default();
    {
        let records = txn.open_table(RECORDS).map_err(engine)?;
        let mut tombstones = txn.open_table(TOMBSTONES).map_err(engine)?;
        let mut index = txn.open_table(INDEX).map_err(engine)?;
        tombstones.retain(|_, _| false).map_err(engine)?;
        index.retain(|_, _| false).map_err(engine)?;
        for entry in records.iter().map_err(engine)? {
            let (k, v) = entry.map_err(engine)?;
            let r = decode(k.value(), v.value())?;
            if is_tombstone(Some(&r)) {
                tombstones.insert(tombstone_key(r.ts, k.value()).as_slice(), ()).map_err(engine)?;
                n += 1;
            }
            max_ts = max_ts.max(r.ts);
            let (ns, key) = split_full_key(k.value());
            index.insert(merkle::index_key(ns, key).as_slice(), ()).map_err(engine)?;
            let h = merkle::record_hash(key, v.value());
            let pos = merkle::position(key);
            tree.entry(merkle::node_key(ns, &pos)).or_default().apply(&h, 1);
        }
    }
    let mut t = txn.open_table(TREE).map_err(engine)?;
    t.retain(|_, _| false).map_err(engine)?;
    for (k, node) in &tree {
        t.insert(k.as_slice(), node.encode().as_slice()).map_err(engine)?;
    }
    drop(t);
    txn.delete_table(DIGESTS).map_err(engine)?;
    txn.open_table(JOURNAL).map_err(engine)?.retain(|_, _| false).map_err(engine)?;
    let mut meta = txn.open_table(META).map_err(engine)?;
    meta.insert("tombstones", n).map_err(engine)?;
    put_max_ts(&mut meta, max_ts)?;
    Ok(n)
}

/// A number kept in `meta` (0 if absent).
fn meta_u64(meta: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64, StoreError> {
    Ok(meta.get(key).map_err(engine)?.map(|v| v.value()).unwrap_or(0))
}

fn put_max_ts(meta: &mut redb::Table<&str, u64>, ts: Timestamp) -> Result<(), StoreError> {
    meta.insert("max_ts_wall", ts.wall_ms).map_err(engine)?;
    meta.insert("max_ts_logical", ts.logical as u64).map_err(engine)?;
    Ok(())
}

impl Store {
    pub fn open(path: &Path, region: &str) -> Result<Store, StoreError> {
        Store::open_with_clock(path, region, crate::hlc::system_clock())
    }

    /// [`Store::open`] with the region's physical clock given (a
    /// simulation drives it).
    pub fn open_with_clock(path: &Path, region: &str, clock: crate::hlc::Clock) -> Result<Store, StoreError> {
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(engine)?;
        let txn = db.begin_write().map_err(engine)?;
        let (next_seq, incarnation, conflicts) = {
            let mut meta = txn.open_table(META).map_err(engine)?;
            let found = meta.get("format").map_err(engine)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("format", DISK_FORMAT).map_err(engine)?;
                    meta.insert("next_seq", 1).map_err(engine)?;
                    // A fresh store is a new incarnation: peers that knew a
                    // previous one (before a wipe) start over with this one.
                    meta.insert("incarnation", rand::random::<u64>() | 1).map_err(engine)?;
                }
                Some(DISK_FORMAT) => {}
                Some(f) if DISK_FORMATS_REBUILT.contains(&f) => {
                    // Whatever an older build left under this key is stale:
                    // without it, what is kept is rebuilt below.
                    meta.remove("tombstones").map_err(engine)?;
                    meta.insert("format", DISK_FORMAT).map_err(engine)?;
                }
                Some(other) => return Err(StoreError::Format(other)),
            }
            (meta_u64(&meta, "next_seq")?, meta_u64(&meta, "incarnation")?, meta_u64(&meta, "conflicts")?)
        };
        txn.open_table(TREE).map_err(engine)?;
        txn.open_table(INDEX).map_err(engine)?;
        let kept = txn.open_table(META).map_err(engine)?.get("tombstones").map_err(engine)?.map(|v| v.value());
        let tombstones = match kept {
            Some(n) => n,
            // A store from before the count, the index of tombstones, the
            // tree and the largest timestamp were kept: all made once, here.
            None => rebuild_kept(&txn)?,
        };
        let max_ts = {
            let meta = txn.open_table(META).map_err(engine)?;
            Timestamp { wall_ms: meta_u64(&meta, "max_ts_wall")?, logical: meta_u64(&meta, "max_ts_logical")? as u32 }
        };
        // The next sequence number is the log's last + 1; `meta` keeps it
        // only for when trimming empties the log (one table less to write
        // per commit).
        let next_seq = {
            let log = txn.open_table(LOG).map_err(engine)?;
            let last = log.last().map_err(engine)?.map(|(k, _)| k.value());
            next_seq.max(last.map(|l| l + 1).unwrap_or(0))
        };
        txn.open_table(RECORDS).map_err(engine)?;
        txn.open_table(LOG).map_err(engine)?;
        txn.open_table(APPLIED).map_err(engine)?;
        txn.open_table(CURSORS).map_err(engine)?;
        txn.open_table(CONFLICTS).map_err(engine)?;
        txn.open_table(JOURNAL).map_err(engine)?;
        txn.commit().map_err(engine)?;
        // What a crash left journaled goes into the tree first.
        flush_journal(&db, u64::MAX)?;
        let upper = {
            let txn = db.begin_read().map_err(engine)?;
            let t = txn.open_table(TREE).map_err(engine)?;
            let mut upper: HashMap<Vec<u8>, Node> = HashMap::new();
            for entry in t.iter().map_err(engine)? {
                let (k, v) = entry.map_err(engine)?;
                let node = stored_node(v.value())?;
                let (ns, nibbles) = merkle::split_node_key(k.value())
                    .filter(|(_, n)| n.len() == LEAF_DEPTH)
                    .ok_or_else(|| StoreError::Engine(format!("{:?} is not a tree leaf's key", k.value())))?;
                for d in 0..LEAF_DEPTH {
                    upper.entry(merkle::node_key(ns, &nibbles[..d])).or_default().add(&node);
                }
            }
            upper
        };
        let inner = Arc::new(Inner {
            db,
            region: region.to_string(),
            incarnation,
            hlc: Hlc::new(clock),
            last_seq: tokio::sync::watch::channel(next_seq.saturating_sub(1)).0,
            watermark: tokio::sync::watch::channel(Timestamp::default()).0,
            tombstones_collected: AtomicU64::new(0),
            tombstones: AtomicU64::new(tombstones),
            max_ts: std::sync::Mutex::new(max_ts),
            tree_nodes_read: AtomicU64::new(0),
            upper: std::sync::RwLock::new(upper),
            journaled: AtomicU64::new(0),
            next_journal: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            applied_gen: tokio::sync::watch::channel(0).0,
            conflicts: AtomicU64::new(conflicts),
            commits: AtomicU64::new(0),
            next_seq: AtomicU64::new(next_seq),
        });
        // Never issue a timestamp below one already stored, even if the
        // clock went back across a restart (the largest is kept in `meta`:
        // no scan).
        inner.hlc.observe(max_ts);
        let (tx, rx) = mpsc::channel();
        let w = inner.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kv-writer-{region}"))
            .spawn(move || writer(w, rx))
            .map_err(|e| StoreError::Engine(e.to_string()))?;
        Ok(Store { handle: Arc::new(WriterHandle { jobs: Some(tx), thread: Some(thread) }), inner })
    }

    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// Random identity of this store's data, new after a wipe.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// Last sequence number of the local log; changes when writes commit.
    pub fn last_seq(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.last_seq.subscribe()
    }

    /// Changes whenever remote writes are applied.
    pub fn applied_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.applied_gen.subscribe()
    }

    /// A timestamp at or below which every local write is committed: a
    /// replication message built after reading it, from the log read after,
    /// carries every local write up to it.
    pub fn watermark(&self) -> Timestamp {
        *self.inner.watermark.borrow()
    }

    /// Tombstones collected since the store was opened.
    pub fn tombstones_collected(&self) -> u64 {
        self.inner.tombstones_collected.load(Ordering::Relaxed)
    }

    /// Deletes tombstones older than `before`. Only call it with a time
    /// every region is known to have applied every write up to: then no
    /// region holds an older version the tombstone must still override, and
    /// none is still in flight.
    pub async fn collect_tombstones(&self, before: Timestamp) -> Result<u64, StoreError> {
        // Nothing due (the usual case, checked in a read): no commit.
        {
            let txn = self.inner.db.begin_read().map_err(engine)?;
            let index = txn.open_table(TOMBSTONES).map_err(engine)?;
            let due =
                index.first().map_err(engine)?.is_some_and(|(k, _)| k.value() < tombstone_key(before, b"").as_slice());
            if !due {
                return Ok(0);
            }
        }
        let n0 = self.tombstones_collected();
        self.run(Op::Collect { before }).await?;
        Ok(self.tombstones_collected() - n0)
    }

    /// Tombstones stored now (a counter: costs nothing however many
    /// records are held).
    pub fn tombstone_count(&self) -> u64 {
        self.inner.tombstones.load(Ordering::Relaxed)
    }

    /// Records inserted, replaced or removed since the store was opened
    /// (what writing, merging and collecting cost in records).
    /// Tree changes journaled and not yet applied to the tree (the
    /// writer's background work still to do).
    pub fn tree_journal_pending(&self) -> u64 {
        self.inner.journaled.load(Ordering::Relaxed)
    }

    pub fn records_written(&self) -> u64 {
        self.inner.records_written.load(Ordering::Relaxed)
    }

    /// Conflicts detected here since the store was created.
    pub fn conflict_count(&self) -> u64 {
        self.inner.conflicts.load(Ordering::Relaxed)
    }

    /// Transactions committed since the store was opened.
    pub fn commit_count(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    /// Queues a job for the writer; the receiver gets its outcome.
    fn enqueue(&self, op: Op) -> Result<tokio::sync::oneshot::Receiver<Result<Outcome, StoreError>>, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let jobs = self.handle.jobs.as_ref().ok_or(StoreError::Closed)?;
        jobs.send(Job { op, reply: tx }).map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    async fn run(&self, op: Op) -> Result<Outcome, StoreError> {
        self.enqueue(op)?.await.map_err(|_| StoreError::Closed)?
    }

    fn run_blocking(&self, op: Op) -> Result<Outcome, StoreError> {
        self.enqueue(op)?.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Writes a value; durable on disk when this returns.
    pub async fn put(&self, ns: &str, key: &[u8], value: Vec<u8>) -> Result<Written, StoreError> {
        full_key(ns, key)?;
        match self.run(Op::Put { ns: ns.into(), key: key.into(), value }).await? {
            Outcome::Written(w) => Ok(w),
            o => unreachable!("put answered {o:?}"),
        }
    }

    /// Writes many values of one namespace at once; all are durable on
    /// disk when this returns, in as few commits as the writer groups them
    /// into (not one per value). Not atomic: on an error, the values before
    /// it may be written; writing them all again is safe. Returns the last
    /// write (the highest sequence number), whose token covers them all.
    pub async fn put_many(&self, ns: &str, items: Vec<(Vec<u8>, Vec<u8>)>) -> Result<Option<Written>, StoreError> {
        for (key, _) in &items {
            full_key(ns, key)?;
        }
        let pending: Vec<_> = items
            .into_iter()
            .map(|(key, value)| self.enqueue(Op::Put { ns: ns.into(), key, value }))
            .collect::<Result<_, _>>()?;
        let mut last: Option<Written> = None;
        for rx in pending {
            match rx.await.map_err(|_| StoreError::Closed)?? {
                Outcome::Written(w) => {
                    if last.as_ref().is_none_or(|l| w.seq > l.seq) {
                        last = Some(w);
                    }
                }
                o => unreachable!("put answered {o:?}"),
            }
        }
        Ok(last)
    }

    /// Deletes by writing a tombstone; durable on disk when this returns.
    pub async fn delete(&self, ns: &str, key: &[u8]) -> Result<Written, StoreError> {
        full_key(ns, key)?;
        match self.run(Op::Delete { ns: ns.into(), key: key.into() }).await? {
            Outcome::Written(w) => Ok(w),
            o => unreachable!("delete answered {o:?}"),
        }
    }

    /// Adds `delta` to a counter (a missing or deleted key starts at 0).
    /// Returns the write and the counter's new value here.
    pub async fn increment(&self, ns: &str, key: &[u8], delta: i64) -> Result<(Written, i64), StoreError> {
        full_key(ns, key)?;
        match self.run(Op::Increment { ns: ns.into(), key: key.into(), delta }).await? {
            Outcome::Counter(w, total) => Ok((w, total)),
            o => unreachable!("increment answered {o:?}"),
        }
    }

    /// Writes `value` if the key still holds the version `expected` (its
    /// timestamp; `None`: absent or deleted). Atomic in this region.
    pub async fn swap(
        &self,
        ns: &str,
        key: &[u8],
        expected: Option<Timestamp>,
        value: Vec<u8>,
    ) -> Result<Swapped, StoreError> {
        full_key(ns, key)?;
        match self.run(Op::Swap { ns: ns.into(), key: key.into(), expected, value }).await? {
            Outcome::Swapped(s) => Ok(s),
            o => unreachable!("swap answered {o:?}"),
        }
    }

    /// Applies a peer's log entries `(prev_seq, last_seq]`, all or nothing.
    pub async fn apply_push(
        &self,
        origin: &str,
        incarnation: u64,
        prev_seq: u64,
        last_seq: u64,
        changes: Vec<Change>,
    ) -> Result<PushOutcome, StoreError> {
        self.submit_push(origin, incarnation, prev_seq, last_seq, changes)?.await
    }

    /// Queues a push at once (in call order) and returns a future of its
    /// outcome: a receiver can keep reading while earlier pushes commit, and
    /// consecutive pushes share one commit.
    pub fn submit_push(
        &self,
        origin: &str,
        incarnation: u64,
        prev_seq: u64,
        last_seq: u64,
        changes: Vec<Change>,
    ) -> Result<impl std::future::Future<Output = Result<PushOutcome, StoreError>> + Send + 'static, StoreError> {
        let rx = self.enqueue(Op::Push { origin: origin.into(), incarnation, prev_seq, last_seq, changes })?;
        Ok(async move {
            match rx.await.map_err(|_| StoreError::Closed)?? {
                Outcome::Pushed(p) => Ok(p),
                o => unreachable!("push answered {o:?}"),
            }
        })
    }

    /// Applies one part of a peer's snapshot.
    pub async fn apply_snapshot(
        &self,
        origin: &str,
        incarnation: u64,
        upto_seq: u64,
        complete: bool,
        changes: Vec<Change>,
    ) -> Result<ApplyReport, StoreError> {
        let op = Op::Snapshot { origin: origin.into(), incarnation, upto_seq, complete, changes };
        match self.run(op).await? {
            Outcome::Merged(r) => Ok(r),
            o => unreachable!("snapshot answered {o:?}"),
        }
    }

    /// Merges records found by anti-entropy.
    pub async fn merge(&self, changes: Vec<Change>) -> Result<ApplyReport, StoreError> {
        match self.run(Op::Merge { changes }).await? {
            Outcome::Merged(r) => Ok(r),
            o => unreachable!("merge answered {o:?}"),
        }
    }

    /// Records that `peer` has our log up to `seq`.
    pub async fn ack(&self, peer: &str, seq: u64) -> Result<(), StoreError> {
        self.run(Op::Ack { peer: peer.into(), seq }).await.map(|_| ())
    }

    /// Drops log entries up to `upto` (every peer has them).
    pub async fn trim_log(&self, upto: u64) -> Result<(), StoreError> {
        self.run(Op::Trim { upto }).await.map(|_| ())
    }

    /// Blocking form of [`Store::put`] for code outside a runtime.
    pub fn put_blocking(&self, ns: &str, key: &[u8], value: Vec<u8>) -> Result<Written, StoreError> {
        full_key(ns, key)?;
        match self.run_blocking(Op::Put { ns: ns.into(), key: key.into(), value })? {
            Outcome::Written(w) => Ok(w),
            o => unreachable!("put answered {o:?}"),
        }
    }

    pub fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Record>, StoreError> {
        let k = full_key(ns, key)?;
        let txn = self.inner.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RECORDS).map_err(engine)?;
        let v = table.get(k.as_slice()).map_err(engine)?;
        v.map(|v| decode(&k, v.value())).transpose()
    }

    /// Records of a namespace in key order, starting after `after`, at most
    /// `limit` of them (tombstones included).
    pub fn scan(&self, ns: &str, after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Record)>, StoreError> {
        let prefix = full_key(ns, b"")?;
        let after = after.map(|a| full_key(ns, a)).transpose()?;
        Ok(self
            .inner
            .scan_prefix(&prefix, after.as_deref(), limit)?
            .into_iter()
            .map(|(k, r)| (k[prefix.len()..].to_vec(), r))
            .collect())
    }

    /// Names of the namespaces that hold at least one record.
    pub fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RECORDS).map_err(engine)?;
        let mut out: Vec<String> = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        loop {
            let mut range = table.range(from.as_slice()..).map_err(engine)?;
            let Some(entry) = range.next() else { break };
            let (k, _) = entry.map_err(engine)?;
            let k = k.value();
            let end = k.iter().position(|&b| b == 0).unwrap_or(k.len());
            out.push(String::from_utf8_lossy(&k[..end]).into_owned());
            // Skip to the first key after this namespace.
            from = k[..end].to_vec();
            from.push(1);
        }
        Ok(out)
    }

    /// Log entries after `after`, at most `limit`.
    pub fn log_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Change)>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(engine)?;
        let table = txn.open_table(LOG).map_err(engine)?;
        let mut out = Vec::new();
        for entry in table.range(after.saturating_add(1)..).map_err(engine)?.take(limit) {
            let (seq, v) = entry.map_err(engine)?;
            let seq = seq.value();
            out.push((seq, Change::decode(v.value()).map_err(|source| StoreError::Log { seq, source })?));
        }
        Ok(out)
    }

    /// First sequence number still in the log (`last_seq + 1` if empty).
    pub fn log_start(&self) -> Result<u64, StoreError> {
        let txn = self.inner.db.begin_read().map_err(engine)?;
        let table = txn.open_table(LOG).map_err(engine)?;
        let first = table.first().map_err(engine)?.map(|(k, _)| k.value());
        Ok(first.unwrap_or(*self.inner.last_seq.borrow() + 1))
    }

    pub fn log_len(&self) -> Result<u64, StoreError> {
        let txn = self.inner.db.begin_read().map_err(engine)?;
        txn.open_table(LOG).map_err(engine)?.len().map_err(engine)
    }

    /// How far `peer` has acknowledged our log.
    pub fn cursor(&self, peer: &str) -> Result<u64, StoreError> {
        let txn = self.inner.db.begin_read().map_err(engine)?;
        let t = txn.open_table(CURSORS).map_err(engine)?;
        Ok(t.get(peer).map_err(engine)?.map(|v| v.value()).unwrap_or(0))
    }

    /// What we hold of `origin`'s log: (its incarnation, last sequence).
    pub fn applied(&self, origin: &str) -> Result<Option<(u64, u64)>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(engine)?;
        let t = txn.open_table(APPLIED).map_err(engine)?;
        Ok(t.get(origin).map_err(engine)?.map(|v| v.value()))
    }

    /// Overwritten conflicting records of a namespace (most recent last),
    /// with the key each was written to.
    pub fn conflicts(&self, ns: &str, limit: usize) -> Result<Vec<(Vec<u8>, Record)>, StoreError> {
        let prefix = full_key(ns, b"")?;
        let txn = self.inner.db.begin_read().map_err(engine)?;
        let t = txn.open_table(CONFLICTS).map_err(engine)?;
        let mut out = Vec::new();
        for entry in t.range(prefix.as_slice()..).map_err(engine)? {
            let (k, v) = entry.map_err(engine)?;
            let Some(rest) = k.value().strip_prefix(prefix.as_slice()) else { break };
            let key_end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            out.push((rest[..key_end].to_vec(), decode(k.value(), v.value())?));
        }
        out.sort_by_key(|(_, r)| r.ts);
        let skip = out.len().saturating_sub(limit);
        Ok(out.split_off(skip))
    }

    /// The root of a namespace's anti-entropy tree: equal roots mean equal
    /// content. One lookup, however many records the namespace holds.
    pub fn tree_root(&self, ns: &str) -> Result<Node, StoreError> {
        self.tree_node(ns, &NodePath::root())
    }

    /// The [`FANOUT`] children of each of `parents` (none of them a leaf),
    /// from one snapshot.
    /// One node of a namespace's tree (one node read).
    pub fn tree_node(&self, ns: &str, path: &NodePath) -> Result<Node, StoreError> {
        full_key(ns, b"")?;
        let key = merkle::node_key(ns.as_bytes(), path.nibbles());
        self.inner.tree_nodes_read.fetch_add(1, Ordering::Relaxed);
        if !path.is_leaf() {
            return Ok(self.inner.upper.read().unwrap().get(&key).copied().unwrap_or_default());
        }
        let txn = self.inner.db.begin_read().map_err(engine)?;
        let t = txn.open_table(TREE).map_err(engine)?;
        let stored = t.get(key.as_slice()).map_err(engine)?;
        stored.map(|v| stored_node(v.value())).transpose().map(Option::unwrap_or_default)
    }

    pub fn tree_children(&self, ns: &str, parents: &[NodePath]) -> Result<Vec<[Node; FANOUT]>, StoreError> {
        full_key(ns, b"")?;
        let txn = self.inner.db.begin_read().map_err(engine)?;
        let t = txn.open_table(TREE).map_err(engine)?;
        let mut out = Vec::with_capacity(parents.len());
        for p in parents {
            if p.is_leaf() {
                return Err(StoreError::LeafHasNoChildren(p.to_string()));
            }
            self.inner.tree_nodes_read.fetch_add(FANOUT as u64, Ordering::Relaxed);
            if p.depth() + 1 < LEAF_DEPTH {
                let upper = self.inner.upper.read().unwrap();
                out.push(std::array::from_fn(|i| {
                    let child = p.child(i).expect("not a leaf");
                    upper.get(&merkle::node_key(ns.as_bytes(), child.nibbles())).copied().unwrap_or_default()
                }));
                continue;
            }
            // Leaves: the children of one node are adjacent in the table.
            let first = merkle::node_key(ns.as_bytes(), p.child(0).expect("not a leaf").nibbles());
            let last = merkle::node_key(ns.as_bytes(), p.child(FANOUT - 1).expect("not a leaf").nibbles());
            let mut children = [Node::default(); FANOUT];
            for entry in t.range(first.as_slice()..=last.as_slice()).map_err(engine)? {
                let (k, v) = entry.map_err(engine)?;
                let i = *k.value().last().unwrap_or(&0) as usize % FANOUT;
                children[i] = stored_node(v.value())?;
            }
            out.push(children);
        }
        Ok(out)
    }

    /// Brings the tree up to date with every write committed before this
    /// call. The writer does so by itself whenever it is idle (and every
    /// few thousand changes under load), so the tree trails the records by
    /// at most a moment; anti-entropy never needs to call this.
    pub async fn flush_tree(&self) -> Result<(), StoreError> {
        self.run(Op::FlushTree).await.map(|_| ())
    }

    /// Tree nodes read by [`Store::tree_root`] and [`Store::tree_children`]
    /// since the store was opened (what an anti-entropy round costs).
    pub fn tree_nodes_read(&self) -> u64 {
        self.inner.tree_nodes_read.load(Ordering::Relaxed)
    }

    /// Records under one node of a namespace's tree, in tree order, starting
    /// after the key `after` (which must be under that node), at most
    /// `limit`. Tombstones included.
    pub fn subtree(
        &self,
        ns: &str,
        node: &NodePath,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        full_key(ns, b"")?;
        let (start, end) = merkle::index_range(ns.as_bytes(), node);
        let from = match after {
            Some(a) => {
                let k = merkle::index_key(ns.as_bytes(), a);
                if k < start || k >= end {
                    return Err(StoreError::NotUnderNode { node: node.to_string() });
                }
                std::ops::Bound::Excluded(k)
            }
            None => std::ops::Bound::Included(start),
        };
        let txn = self.inner.db.begin_read().map_err(engine)?;
        let index = txn.open_table(INDEX).map_err(engine)?;
        let records = txn.open_table(RECORDS).map_err(engine)?;
        let mut out = Vec::new();
        let range = index
            .range::<&[u8]>((from.as_ref().map(|k| k.as_slice()), std::ops::Bound::Excluded(end.as_slice())))
            .map_err(engine)?;
        for entry in range.take(limit) {
            let (ik, _) = entry.map_err(engine)?;
            let key = merkle::key_of_index(ns.len(), ik.value()).to_vec();
            let k = full_key(ns, &key)?;
            let Some(v) = records.get(k.as_slice()).map_err(engine)? else {
                return Err(StoreError::Engine(format!("the index names {k:?}, which is not stored")));
            };
            out.push(Change { ns: ns.to_string(), record: decode(&k, v.value())?, key });
        }
        Ok(out)
    }

    /// Anti-entropy digest of a namespace as builds before the tree
    /// compared it: the hashes of the tree's first level.
    pub fn digest(&self, ns: &str) -> Result<NamespaceDigest, StoreError> {
        let [children] = self.tree_children(ns, &[NodePath::root()])?.try_into().expect("one parent asked");
        Ok(children.map(|n| n.hash))
    }

    /// Every record of one digest bucket of a namespace (what builds
    /// before the tree pull).
    pub fn bucket(&self, ns: &str, bucket: usize) -> Result<Vec<Change>, StoreError> {
        let node = NodePath::root().child(bucket).ok_or(StoreError::LeafHasNoChildren(format!("{bucket}")))?;
        self.subtree(ns, &node, None, usize::MAX)
    }
}

impl Inner {
    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Record)>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RECORDS).map_err(engine)?;
        let mut out = Vec::new();
        let range = match after {
            Some(a) => table.range::<&[u8]>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => table.range::<&[u8]>(prefix..),
        }
        .map_err(engine)?;
        for entry in range {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(engine)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_vec(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<Record, StoreError> {
    Record::decode(bytes)
        .map_err(|source| StoreError::Decode { key: String::from_utf8_lossy(key).into_owned(), source })
}

/// The writer thread: group commit.
fn writer(inner: Arc<Inner>, rx: mpsc::Receiver<Job>) {
    let mut pending: Vec<Job> = Vec::new();
    loop {
        if pending.is_empty() {
            // Idle: everything is committed, and any later write gets a
            // later timestamp than this.
            inner.watermark.send_replace(inner.hlc.bound());
            let journaled = inner.journaled.load(Ordering::Relaxed) > 0;
            let wait = if journaled { JOURNAL_IDLE_FLUSH } else { std::time::Duration::from_millis(100) };
            match rx.recv_timeout(wait) {
                Ok(j) => pending.push(j),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // The tree catches up with the records while nothing
                    // waits.
                    if journaled {
                        flush_tree(&inner, u64::MAX);
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        while pending.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => pending.push(j),
                Err(_) => break,
            }
        }
        // Flushes asked for take no part in the transaction; they are done
        // after it, so they cover every write queued with them.
        let (flushes, jobs): (Vec<Job>, Vec<Job>) =
            std::mem::take(&mut pending).into_iter().partition(|j| matches!(j.op, Op::FlushTree));
        let journaled_before = inner.journaled.load(Ordering::Relaxed);
        let result = if jobs.is_empty() { Ok(Group::default()) } else { commit_group(&inner, &jobs) };
        match result {
            Ok(Group { outcomes, last_seq, applied_remote }) => {
                let added = inner.journaled.load(Ordering::Relaxed).saturating_sub(journaled_before);
                inner.commits.fetch_add(!jobs.is_empty() as u64, Ordering::Relaxed);
                inner.watermark.send_replace(inner.hlc.bound());
                if let Some(seq) = last_seq {
                    inner.last_seq.send_replace(seq);
                }
                if applied_remote {
                    inner.applied_gen.send_modify(|g| *g += 1);
                }
                for (job, out) in jobs.into_iter().zip(outcomes) {
                    let _ = job.reply.send(Ok(out));
                }
                // After answering: the writers need not wait for it. Small
                // steps (a local write waits behind at most one), but at
                // least what this commit added, so the journal cannot grow
                // under load (a replicated push adds a thousand at once).
                if inner.journaled.load(Ordering::Relaxed) >= JOURNAL_FLUSH_AT {
                    flush_tree(&inner, JOURNAL_FLUSH_AT.max(added));
                }
            }
            Err((failed, e)) => {
                // One job failed: it gets the error, the others are retried
                // in the next transaction (nothing of this one was kept).
                tracing_error(&inner.region, &e);
                let mut jobs = jobs;
                let bad = jobs.remove(failed);
                let _ = bad.reply.send(Err(e));
                pending = jobs;
            }
        }
        if !flushes.is_empty() {
            flush_tree(&inner, u64::MAX);
            for job in flushes {
                let _ = job.reply.send(Ok(Outcome::Done));
            }
        }
    }
}

/// Flushes the journal into the tree (writer thread only) and moves the
/// nodes above the leaves to match. On failure the journal stays, to be
/// flushed at the next try or at the next open.
fn flush_tree(inner: &Inner, at_least: u64) {
    match flush_journal(&inner.db, at_least) {
        Ok((upper, n)) => {
            let mut nodes = inner.upper.write().unwrap();
            for (k, (hash, delta)) in upper {
                let node = nodes.entry(k.clone()).or_default();
                node.apply(&hash, delta);
                if node.is_empty() {
                    nodes.remove(&k);
                }
            }
            inner.journaled.fetch_sub(n.min(inner.journaled.load(Ordering::Relaxed)), Ordering::Relaxed);
        }
        Err(e) => eprintln!("kv store of {}: flushing the tree's journal failed: {e}", inner.region),
    }
}

fn tracing_error(region: &str, e: &StoreError) {
    eprintln!("kv store of {region}: write failed: {e}");
}

#[derive(Default)]
struct Group {
    outcomes: Vec<Outcome>,
    last_seq: Option<u64>,
    applied_remote: bool,
}

/// Runs every job in one transaction. On failure, the index of the job that
/// failed (or 0 if the commit itself failed: then all fail in turn).
fn commit_group(inner: &Inner, jobs: &[Job]) -> Result<Group, (usize, StoreError)> {
    let txn = inner.db.begin_write().map_err(|e| (0, engine(e)))?;
    let mut w = Writer {
        inner,
        txn: &txn,
        wrote_log: false,
        applied_remote: false,
        new_conflicts: false,
        next_seq: inner.next_seq.load(Ordering::Relaxed),
        tombstone_delta: 0,
        collected: 0,
        tree_changes: Vec::new(),
        tree_change_count: 0,
        max_ts: *inner.max_ts.lock().unwrap(),
        records_written: 0,
    };
    let mut outcomes = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        outcomes.push(w.apply(&job.op).map_err(|e| (i, e))?);
    }
    let (wrote_log, applied_remote, next_seq, collected) = (w.wrote_log, w.applied_remote, w.next_seq, w.collected);
    let tree_change_count = w.tree_change_count;
    if tree_change_count > 0 {
        let mut t = txn.open_table(JOURNAL).map_err(|e| (0, engine(e)))?;
        let id = inner.next_journal.load(Ordering::Relaxed);
        t.insert(id, w.tree_changes.as_slice()).map_err(|e| (0, engine(e)))?;
    }
    let (max_ts, records_written) = (w.max_ts, w.records_written);
    if max_ts > *inner.max_ts.lock().unwrap() {
        let mut meta = txn.open_table(META).map_err(|e| (0, engine(e)))?;
        put_max_ts(&mut meta, max_ts).map_err(|e| (0, e))?;
    }
    if w.new_conflicts {
        let mut meta = txn.open_table(META).map_err(|e| (0, engine(e)))?;
        meta.insert("conflicts", inner.conflicts.load(Ordering::Relaxed)).map_err(|e| (0, engine(e)))?;
    }
    let tombstones = inner.tombstones.load(Ordering::Relaxed).saturating_add_signed(w.tombstone_delta);
    if w.tombstone_delta != 0 {
        let mut meta = txn.open_table(META).map_err(|e| (0, engine(e)))?;
        meta.insert("tombstones", tombstones).map_err(|e| (0, engine(e)))?;
    }
    txn.commit().map_err(|e| (0, engine(e)))?;
    // Only the writer thread changes these, and only once committed.
    inner.tombstones.store(tombstones, Ordering::Relaxed);
    *inner.max_ts.lock().unwrap() = max_ts;
    if tree_change_count > 0 {
        inner.next_journal.fetch_add(1, Ordering::Relaxed);
        inner.journaled.fetch_add(tree_change_count, Ordering::Relaxed);
    }
    inner.records_written.fetch_add(records_written, Ordering::Relaxed);
    inner.tombstones_collected.fetch_add(collected, Ordering::Relaxed);
    inner.next_seq.store(next_seq, Ordering::Relaxed);
    Ok(Group { outcomes, last_seq: wrote_log.then(|| next_seq - 1), applied_remote })
}

struct Writer<'a> {
    inner: &'a Inner,
    txn: &'a WriteTransaction,
    next_seq: u64,
    wrote_log: bool,
    applied_remote: bool,
    new_conflicts: bool,
    /// How this transaction changes the number of tombstones stored.
    tombstone_delta: i64,
    /// Tombstones this transaction collects.
    collected: u64,
    /// The tree changes this transaction makes, encoded for the journal.
    tree_changes: Vec<u8>,
    tree_change_count: u64,
    /// The largest timestamp stored, this transaction's records included.
    max_ts: Timestamp,
    /// Records this transaction inserts, replaces or removes.
    records_written: u64,
}

fn is_tombstone(r: Option<&Record>) -> bool {
    matches!(r, Some(Record { value: Value::Tombstone, .. }))
}

impl Writer<'_> {
    /// Stores a record in place of another (or none; as stored) under one
    /// key: the tombstone index and count, the namespace's tree (through
    /// the journal) and the largest timestamp follow.
    fn put_record(
        &mut self,
        ns: &str,
        key: &[u8],
        old: Option<&(Record, Vec<u8>)>,
        new: &Record,
    ) -> Result<(), StoreError> {
        let k = full_key(ns, key)?;
        let encoded = new.encode();
        let old_record = old.map(|(r, _)| r);
        self.tombstone_delta += is_tombstone(Some(new)) as i64 - is_tombstone(old_record) as i64;
        if is_tombstone(old_record) || is_tombstone(Some(new)) {
            let mut index = self.txn.open_table(TOMBSTONES).map_err(engine)?;
            if let Some(old) = old_record.filter(|o| is_tombstone(Some(o))) {
                index.remove(tombstone_key(old.ts, &k).as_slice()).map_err(engine)?;
            }
            if is_tombstone(Some(new)) {
                index.insert(tombstone_key(new.ts, &k).as_slice(), ()).map_err(engine)?;
            }
        }
        self.max_ts = self.max_ts.max(new.ts);
        let mut change = merkle::record_hash(key, &encoded);
        match old {
            Some((_, bytes)) => {
                merkle::xor_into(&mut change, &merkle::record_hash(key, bytes));
                self.tree_apply(ns, key, &change, 0);
            }
            None => self.tree_apply(ns, key, &change, 1),
        }
        self.txn.open_table(RECORDS).map_err(engine)?.insert(k.as_slice(), encoded.as_slice()).map_err(engine)?;
        self.records_written += 1;
        Ok(())
    }

    /// Journals a change to `key`'s place in its namespace's tree: `hash`
    /// XORed into every node on its path, `delta` added to their counts.
    fn tree_apply(&mut self, ns: &str, key: &[u8], hash: &[u8; 32], delta: i8) {
        encode_tree_change(&mut self.tree_changes, ns.as_bytes(), key, hash, delta);
        self.tree_change_count += 1;
    }

    /// The record stored under a records-table key, decoded and as stored.
    fn read(&self, k: &[u8]) -> Result<Option<(Record, Vec<u8>)>, StoreError> {
        let table = self.txn.open_table(RECORDS).map_err(engine)?;
        let v = table.get(k).map_err(engine)?;
        v.map(|v| Ok((decode(k, v.value())?, v.value().to_vec()))).transpose()
    }

    /// Stores a local write and appends it to the log.
    fn local(
        &mut self,
        ns: &str,
        key: &[u8],
        value: Value,
        old: Option<&(Record, Vec<u8>)>,
    ) -> Result<Written, StoreError> {
        let record = Record {
            value,
            ts: self.inner.hlc.now(),
            origin: self.inner.region.clone(),
            seen: old.map(|(r, _)| r.ts).unwrap_or_default(),
        };
        self.put_record(ns, key, old, &record)?;
        let seq = self.next_seq;
        let change = Change { ns: ns.to_string(), key: key.to_vec(), record };
        self.txn.open_table(LOG).map_err(engine)?.insert(seq, change.encode().as_slice()).map_err(engine)?;
        self.next_seq += 1;
        self.wrote_log = true;
        Ok(Written { record: change.record, seq })
    }

    /// Merges a remote record into what is stored.
    fn merge(&mut self, c: &Change, report: &mut ApplyReport) -> Result<(), StoreError> {
        let k = full_key(&c.ns, &c.key)?;
        self.inner.hlc.observe(c.record.ts);
        let old = self.read(&k)?;
        let new = match &old {
            None => c.record.clone(),
            Some((old, _)) => {
                if let Some(loser) = old.conflict_loser(&c.record) {
                    let mut ck = k.clone();
                    ck.push(0);
                    ck.extend_from_slice(&loser.ts.wall_ms.to_be_bytes());
                    ck.extend_from_slice(&loser.ts.logical.to_be_bytes());
                    ck.extend_from_slice(loser.origin.as_bytes());
                    let mut t = self.txn.open_table(CONFLICTS).map_err(engine)?;
                    if t.insert(ck.as_slice(), loser.encode().as_slice()).map_err(engine)?.is_none() {
                        self.inner.conflicts.fetch_add(1, Ordering::Relaxed);
                        report.conflicts += 1;
                        // Keep the newest losers of a key only (the
                        // entries sort by timestamp: oldest first).
                        let (mut lo, mut hi) = (k.clone(), k.clone());
                        lo.push(0);
                        hi.push(1);
                        let kept = t.range(lo.as_slice()..hi.as_slice()).map_err(engine)?.count();
                        if kept > MAX_LOSERS_PER_KEY {
                            let mut oldest = Vec::new();
                            for e in
                                t.range(lo.as_slice()..hi.as_slice()).map_err(engine)?.take(kept - MAX_LOSERS_PER_KEY)
                            {
                                oldest.push(e.map_err(engine)?.0.value().to_vec());
                            }
                            for o in oldest {
                                t.remove(o.as_slice()).map_err(engine)?;
                            }
                        }
                    }
                }
                old.merge(&c.record)
            }
        };
        if Some(&new) == old.as_ref().map(|(r, _)| r) {
            report.unchanged += 1;
        } else {
            self.put_record(&c.ns, &c.key, old.as_ref(), &new)?;
            report.changed += 1;
        }
        self.applied_remote = true;
        if report.conflicts > 0 {
            self.new_conflicts = true;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<Outcome, StoreError> {
        Ok(match op {
            Op::Put { ns, key, value } => {
                let old = self.read(&full_key(ns, key)?)?;
                Outcome::Written(self.local(ns, key, Value::Bytes(value.clone()), old.as_ref())?)
            }
            Op::Delete { ns, key } => {
                let old = self.read(&full_key(ns, key)?)?;
                Outcome::Written(self.local(ns, key, Value::Tombstone, old.as_ref())?)
            }
            Op::Increment { ns, key, delta } => {
                let old = self.read(&full_key(ns, key)?)?;
                let (mut incs, mut decs) = match old.as_ref().map(|(r, _)| &r.value) {
                    Some(Value::Counter { incs, decs }) => (incs.clone(), decs.clone()),
                    None | Some(Value::Tombstone) => (BTreeMap::new(), BTreeMap::new()),
                    Some(Value::Bytes(_)) => return Err(StoreError::NotACounter),
                };
                let side = if *delta >= 0 { &mut incs } else { &mut decs };
                let mine = side.entry(self.inner.region.clone()).or_insert(0);
                *mine = mine.checked_add(delta.unsigned_abs()).ok_or(StoreError::CounterOverflow)?;
                let value = Value::Counter { incs, decs };
                // Refused before anything is written: the total must stay
                // what a wasi:keyvalue increment can return (an s64).
                let total = value.counter_total_exact().unwrap_or(0);
                let total = i64::try_from(total).map_err(|_| StoreError::CounterOverflow)?;
                let w = self.local(ns, key, value, old.as_ref())?;
                Outcome::Counter(w, total)
            }
            Op::Swap { ns, key, expected, value } => {
                let old = self.read(&full_key(ns, key)?)?;
                let current = old.as_ref().filter(|(r, _)| !matches!(r.value, Value::Tombstone)).map(|(r, _)| r.ts);
                if current != *expected {
                    Outcome::Swapped(Swapped::Stale(old.map(|(r, _)| r)))
                } else {
                    Outcome::Swapped(Swapped::Done(self.local(ns, key, Value::Bytes(value.clone()), old.as_ref())?))
                }
            }
            Op::Push { origin, incarnation, prev_seq, last_seq, changes } => {
                let have = {
                    let t = self.txn.open_table(APPLIED).map_err(engine)?;
                    let v = t.get(origin.as_str()).map_err(engine)?.map(|v| v.value());
                    match v {
                        Some((inc, seq)) if inc == *incarnation => seq,
                        _ => 0,
                    }
                };
                if *prev_seq > have {
                    return Ok(Outcome::Pushed(PushOutcome::Gap { have }));
                }
                let mut report = ApplyReport::default();
                for c in changes {
                    self.merge(c, &mut report)?;
                }
                if *last_seq > have {
                    self.txn
                        .open_table(APPLIED)
                        .map_err(engine)?
                        .insert(origin.as_str(), (*incarnation, *last_seq))
                        .map_err(engine)?;
                }
                self.applied_remote = true;
                Outcome::Pushed(PushOutcome::Applied(report))
            }
            Op::Snapshot { origin, incarnation, upto_seq, complete, changes } => {
                let mut report = ApplyReport::default();
                for c in changes {
                    self.merge(c, &mut report)?;
                }
                if *complete {
                    self.txn
                        .open_table(APPLIED)
                        .map_err(engine)?
                        .insert(origin.as_str(), (*incarnation, *upto_seq))
                        .map_err(engine)?;
                }
                self.applied_remote = true;
                Outcome::Merged(report)
            }
            Op::Merge { changes } => {
                let mut report = ApplyReport::default();
                for c in changes {
                    self.merge(c, &mut report)?;
                }
                Outcome::Merged(report)
            }
            Op::Ack { peer, seq } => {
                self.txn.open_table(CURSORS).map_err(engine)?.insert(peer.as_str(), *seq).map_err(engine)?;
                Outcome::Done
            }
            Op::Collect { before } => {
                // The index's keys older than `before` are exactly the
                // tombstones to collect: a range, however many records
                // the store holds.
                let mut index = self.txn.open_table(TOMBSTONES).map_err(engine)?;
                let end = tombstone_key(*before, b"");
                let mut due: Vec<Vec<u8>> = Vec::new();
                for entry in index.range::<&[u8]>(..end.as_slice()).map_err(engine)? {
                    due.push(entry.map_err(engine)?.0.value().to_vec());
                }
                let mut records = self.txn.open_table(RECORDS).map_err(engine)?;
                let mut gone: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                for t in &due {
                    index.remove(t.as_slice()).map_err(engine)?;
                    let k = &t[TOMBSTONE_TS_LEN..];
                    let stored = records.get(k).map_err(engine)?.map(|v| v.value().to_vec());
                    let r = stored.as_deref().map(|v| decode(k, v)).transpose()?;
                    // The index names this very tombstone; anything else
                    // under the key (never expected) is left alone.
                    if r.is_some_and(|r| is_tombstone(Some(&r)) && tombstone_key(r.ts, k) == *t) {
                        records.remove(k).map_err(engine)?;
                        gone.push((k.to_vec(), stored.unwrap_or_default()));
                    }
                }
                drop((index, records));
                let n = gone.len() as u64;
                self.records_written += n;
                for (k, bytes) in gone {
                    let (ns, key) = split_full_key(&k);
                    let ns = String::from_utf8_lossy(ns).into_owned();
                    self.tree_apply(&ns, key, &merkle::record_hash(key, &bytes), -1);
                }
                self.tombstone_delta -= n as i64;
                self.collected += n;
                Outcome::Done
            }
            // The writer loop answers these after the transaction; none
            // reaches one.
            Op::FlushTree => Outcome::Done,
            Op::Trim { upto } => {
                // The log may end up empty: keep the next sequence number.
                self.txn.open_table(META).map_err(engine)?.insert("next_seq", self.next_seq).map_err(engine)?;
                let mut t = self.txn.open_table(LOG).map_err(engine)?;
                t.retain_in(..=*upto, |_, _| false).map_err(engine)?;
                Outcome::Done
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn acknowledged_writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        let (put, del, inc);
        {
            let s = Store::open(&path, "eu-west").unwrap();
            (put, del, inc) = rt().block_on(async {
                let put = s.put("sessions", b"a", b"1".to_vec()).await.unwrap();
                s.put("sessions", b"b", b"2".to_vec()).await.unwrap();
                let del = s.delete("sessions", b"b").await.unwrap();
                s.increment("hits", b"home", 5).await.unwrap();
                let inc = s.increment("hits", b"home", -2).await.unwrap();
                (put, del, inc)
            });
            assert_eq!(inc.1, 3);
        }
        let s = Store::open(&path, "eu-west").unwrap();
        assert_eq!(s.get("sessions", b"a").unwrap(), Some(put.record));
        assert_eq!(s.get("sessions", b"b").unwrap(), Some(del.record.clone()));
        assert_eq!(s.get("hits", b"home").unwrap().unwrap().value.counter_total(), Some(3));
        assert_eq!(s.scan("sessions", None, 100).unwrap().len(), 2);
        assert_eq!(s.scan("sessions", Some(b"a"), 100).unwrap().len(), 1);
        assert!(s.get("other", b"a").unwrap().is_none());
        assert_eq!(s.namespaces().unwrap(), vec!["hits".to_string(), "sessions".to_string()]);
        // The log holds every write in order, and sequence numbers go on.
        let log = s.log_after(0, 100).unwrap();
        assert_eq!(log.iter().map(|(q, _)| *q).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(inc.0.seq, 5);
        let next = s.put_blocking("sessions", b"c", vec![]).unwrap();
        assert_eq!(next.seq, 6);
        // Timestamps keep increasing across the restart.
        assert!(next.record.ts > del.record.ts);
    }

    #[test]
    fn a_counter_never_leaves_the_i64_range_and_a_refused_increment_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("kv"), "eu-west").unwrap();
        rt().block_on(async {
            assert_eq!(s.increment("c", b"n", i64::MAX).await.unwrap().1, i64::MAX);
            let before = s.get("c", b"n").unwrap();
            assert!(matches!(s.increment("c", b"n", 1).await, Err(StoreError::CounterOverflow)));
            assert_eq!(s.get("c", b"n").unwrap(), before, "a refused increment wrote something");
            // Down is fine, and so is the way back up to the limit.
            assert_eq!(s.increment("c", b"n", -5).await.unwrap().1, i64::MAX - 5);
            assert_eq!(s.increment("c", b"n", 5).await.unwrap().1, i64::MAX);
            assert_eq!(s.increment("d", b"n", i64::MIN).await.unwrap().1, i64::MIN);
            assert!(matches!(s.increment("d", b"n", -1).await, Err(StoreError::CounterOverflow)));
        });
        // A peer's counter that totals outside the range is refused whole.
        let mut incs = BTreeMap::new();
        incs.insert("us-east".to_string(), u64::MAX);
        let change = Change {
            ns: "c".into(),
            key: b"n".to_vec(),
            record: Record {
                value: Value::Counter { incs, decs: BTreeMap::new() },
                ts: Timestamp { wall_ms: 1, logical: 0 },
                origin: "us-east".into(),
                seen: Timestamp::default(),
            },
        };
        assert!(matches!(
            crate::wire::check_changes(&[change], 1000),
            Err(crate::wire::Unacceptable::CounterRange { .. })
        ));
    }

    #[test]
    fn concurrent_writers_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("kv"), "eu-west").unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let tasks: Vec<_> = (0..200)
                .map(|i| {
                    let s = s.clone();
                    tokio::spawn(async move { s.put("n", format!("k{i}").as_bytes(), vec![1]).await.unwrap() })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        assert_eq!(s.scan("n", None, 1000).unwrap().len(), 200);
        assert!(s.commit_count() < 200, "{} commits for 200 concurrent writes", s.commit_count());
        let seqs: std::collections::BTreeSet<u64> = s.log_after(0, 1000).unwrap().iter().map(|(q, _)| *q).collect();
        assert_eq!(seqs, (1..=200).collect());
    }

    #[test]
    fn replicas_converge_whatever_order_records_arrive_in_and_count_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let eu = Store::open(&dir.path().join("eu"), "eu-west").unwrap();
        let us = Store::open(&dir.path().join("us"), "us-east").unwrap();
        rt().block_on(async {
            // Concurrent writes to the same keys in both regions.
            eu.put("s", b"k", b"eu".to_vec()).await.unwrap();
            us.put("s", b"k", b"us".to_vec()).await.unwrap();
            eu.increment("c", b"n", 4).await.unwrap();
            us.increment("c", b"n", 3).await.unwrap();
            let from_eu: Vec<Change> = eu.log_after(0, 10).unwrap().into_iter().map(|(_, c)| c).collect();
            let mut from_us: Vec<Change> = us.log_after(0, 10).unwrap().into_iter().map(|(_, c)| c).collect();
            let r = us.apply_push("eu-west", eu.incarnation(), 0, 2, from_eu.clone()).await.unwrap();
            // The counter changed; eu's value lost to us's later, concurrent one.
            assert_eq!(r, PushOutcome::Applied(ApplyReport { changed: 1, unchanged: 1, conflicts: 1 }));
            from_us.reverse();
            eu.merge(from_us.clone()).await.unwrap();
            for ns in ["s", "c"] {
                assert_eq!(eu.scan(ns, None, 10).unwrap(), us.scan(ns, None, 10).unwrap(), "namespace {ns}");
                assert_eq!(eu.digest(ns).unwrap(), us.digest(ns).unwrap());
            }
            assert_eq!(eu.get("c", b"n").unwrap().unwrap().value.counter_total(), Some(7));
            // Both regions saw the same conflict and kept the loser.
            assert_eq!(eu.conflict_count(), 1);
            assert_eq!(us.conflict_count(), 1);
            assert_eq!(eu.conflicts("s", 10).unwrap(), us.conflicts("s", 10).unwrap());
            // Applying the same records again changes nothing.
            let again = eu.merge(from_us).await.unwrap();
            assert_eq!(again, ApplyReport { changed: 0, unchanged: 2, conflicts: 0 });
            // A push that skips entries is refused and changes nothing.
            let gap = us.apply_push("eu-west", eu.incarnation(), 5, 6, from_eu.clone()).await.unwrap();
            assert_eq!(gap, PushOutcome::Gap { have: 2 });
            // A new incarnation of the origin (wiped) starts from zero.
            let gap = us.apply_push("eu-west", 12345, 2, 3, from_eu).await.unwrap();
            assert_eq!(gap, PushOutcome::Gap { have: 0 });
        });
    }

    /// A key overwritten concurrently again and again keeps only its
    /// newest losers; every conflict is still counted.
    #[test]
    fn conflict_losers_are_kept_per_key_up_to_a_bound() {
        let rt = rt();
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), "eu-west").unwrap();
        rt.block_on(async {
            for i in 0..40u64 {
                // Alternating origins that never saw each other's writes.
                let origin = if i % 2 == 0 { "us-east" } else { "ap-southeast" };
                let record = Record {
                    value: Value::Bytes(vec![i as u8]),
                    ts: Timestamp { wall_ms: 1_700_000_000_000 + i, logical: 0 },
                    origin: origin.into(),
                    seen: Timestamp::default(),
                };
                s.merge(vec![Change { ns: "ns".into(), key: b"hot".to_vec(), record }]).await.unwrap();
                s.merge(vec![Change {
                    ns: "ns".into(),
                    key: format!("other-{i}").into_bytes(),
                    record: Record {
                        value: Value::Bytes(vec![1]),
                        ts: Timestamp { wall_ms: 1_700_000_000_000, logical: 0 },
                        origin: "us-east".into(),
                        seen: Timestamp::default(),
                    },
                }])
                .await
                .unwrap();
            }
        });
        assert_eq!(s.conflict_count(), 39);
        let kept = s.conflicts("ns", usize::MAX).unwrap();
        assert_eq!(kept.len(), MAX_LOSERS_PER_KEY);
        assert!(kept.iter().all(|(k, _)| k == b"hot"));
        // The newest: writes 23..=38 lost to their successors.
        let values: Vec<u8> = kept.iter().map(|(_, r)| if let Value::Bytes(b) = &r.value { b[0] } else { 0 }).collect();
        assert_eq!(values, (23..=38).collect::<Vec<u8>>());
    }

    #[test]
    fn compare_and_swap_sees_concurrent_changes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("kv"), "eu-west").unwrap();
        rt().block_on(async {
            let w = match s.swap("n", b"k", None, b"1".to_vec()).await.unwrap() {
                Swapped::Done(w) => w,
                other => panic!("{other:?}"),
            };
            // A second writer that also expected "absent" loses.
            assert_eq!(s.swap("n", b"k", None, b"2".to_vec()).await.unwrap(), Swapped::Stale(Some(w.record.clone())));
            assert!(matches!(s.swap("n", b"k", Some(w.record.ts), b"3".to_vec()).await.unwrap(), Swapped::Done(_)));
            // Counters and values do not mix.
            assert!(matches!(s.increment("n", b"k", 1).await, Err(StoreError::NotACounter)));
        });
    }

    #[test]
    fn trimmed_log_and_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("kv"), "eu-west").unwrap();
        rt().block_on(async {
            for i in 0..5u8 {
                s.put("n", &[i], vec![i]).await.unwrap();
            }
            s.ack("us-east", 3).await.unwrap();
            s.trim_log(3).await.unwrap();
        });
        assert_eq!(s.cursor("us-east").unwrap(), 3);
        assert_eq!(s.log_start().unwrap(), 4);
        assert_eq!(s.log_len().unwrap(), 2);
    }

    #[test]
    fn tombstones_older_than_the_stable_time_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("kv"), "eu-west").unwrap();
        rt().block_on(async {
            s.put("n", b"a", vec![1]).await.unwrap();
            let old = s.delete("n", b"a").await.unwrap();
            s.put("n", b"b", vec![1]).await.unwrap();
            let new = s.delete("n", b"b").await.unwrap();
            assert_eq!(s.tombstone_count(), 2);
            // Only the tombstone before the stable time goes.
            assert_eq!(s.collect_tombstones(new.record.ts).await.unwrap(), 1);
            assert!(s.get("n", b"a").unwrap().is_none());
            assert!(s.get("n", b"b").unwrap().is_some());
            assert!(old.record.ts < new.record.ts);
            // The watermark covers committed writes.
            assert!(s.watermark() >= new.record.ts);
        });
    }

    /// The anti-entropy tree and the index of records by their place in it
    /// (as stored), and what a scan of the records says they must be.
    type Kept = (Vec<(Vec<u8>, Vec<u8>)>, Vec<Vec<u8>>);
    fn tree_and_index(s: &Store) -> Kept {
        let txn = s.inner.db.begin_read().unwrap();
        let tree = txn.open_table(TREE).unwrap();
        let leaves = tree.iter().unwrap().map(|e| e.unwrap()).map(|(k, v)| (k.value().to_vec(), v.value().to_vec()));
        let upper = s.inner.upper.read().unwrap();
        let mut nodes: Vec<_> = leaves.chain(upper.iter().map(|(k, n)| (k.clone(), n.encode().to_vec()))).collect();
        nodes.sort();
        let index = txn.open_table(INDEX).unwrap();
        (nodes, index.iter().unwrap().map(|e| e.unwrap().0.value().to_vec()).collect())
    }
    fn tree_and_index_by_scan(s: &Store) -> Kept {
        let txn = s.inner.db.begin_read().unwrap();
        let records = txn.open_table(RECORDS).unwrap();
        let mut tree: BTreeMap<Vec<u8>, Node> = BTreeMap::new();
        let mut index = Vec::new();
        for e in records.iter().unwrap() {
            let (k, v) = e.unwrap();
            let (ns, key) = split_full_key(k.value());
            index.push(merkle::index_key(ns, key));
            let pos = merkle::position(key);
            for d in 0..=LEAF_DEPTH {
                tree.entry(merkle::node_key(ns, &pos[..d])).or_default().apply(&merkle::record_hash(key, v.value()), 1);
            }
        }
        index.sort();
        (tree.into_iter().map(|(k, n)| (k, n.encode().to_vec())).collect(), index)
    }

    /// The tombstone count, the namespaces' anti-entropy trees and the
    /// index by tree position are kept with the records: after any mix of
    /// local writes, deletes, increments, merged remote values and
    /// tombstones, and collection, they equal what a scan computes — before
    /// and after a reopen — and a store from before they were kept gets
    /// them computed once, at open.
    #[test]
    fn kept_tombstone_counts_and_trees_match_a_scan_through_writes_merges_collection_and_reopening() {
        use rand::{Rng, SeedableRng};
        // The index of tombstones, and what it must hold: every tombstone's
        // (timestamp, key), nothing else.
        fn index(s: &Store) -> Vec<Vec<u8>> {
            let txn = s.inner.db.begin_read().unwrap();
            let t = txn.open_table(TOMBSTONES).unwrap();
            t.iter().unwrap().map(|e| e.unwrap().0.value().to_vec()).collect()
        }
        fn index_by_scan(s: &Store) -> Vec<Vec<u8>> {
            let mut v: Vec<Vec<u8>> = s
                .inner
                .scan_prefix(b"", None, usize::MAX)
                .unwrap()
                .iter()
                .filter(|(_, r)| is_tombstone(Some(r)))
                .map(|(k, r)| tombstone_key(r.ts, k))
                .collect();
            v.sort();
            v
        }
        fn scanned(s: &Store) -> u64 {
            s.inner.scan_prefix(b"", None, usize::MAX).unwrap().iter().filter(|(_, r)| is_tombstone(Some(r))).count()
                as u64
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv");
        for seed in 0..4u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let s = Store::open(&path, "eu-west").unwrap();
            rt().block_on(async {
                for round in 0..30 {
                    let key = [rng.random_range(0..20u8)];
                    let ns = ["n", "m"][rng.random_range(0..2)];
                    match rng.random_range(0..6) {
                        0 => drop(s.put(ns, &key, vec![round]).await.unwrap()),
                        1 => drop(s.delete(ns, &key).await.unwrap()),
                        5 => drop(s.increment("c", &key, 1).await.unwrap()),
                        2 | 3 => {
                            // A remote write or delete, sometimes older than
                            // what is stored (then it changes nothing).
                            let wall_ms =
                                s.watermark().wall_ms.saturating_sub(rng.random_range(0..3)) + rng.random_range(0..3);
                            let value = if rng.random_bool(0.5) { Value::Tombstone } else { Value::Bytes(vec![round]) };
                            let record = Record {
                                value,
                                ts: Timestamp { wall_ms, logical: rng.random_range(0..4) },
                                origin: "us-east".into(),
                                seen: Timestamp::default(),
                            };
                            s.merge(vec![Change { ns: ns.into(), key: key.to_vec(), record }]).await.unwrap();
                        }
                        _ => drop(s.collect_tombstones(s.watermark()).await.unwrap()),
                    }
                    assert_eq!(s.tombstone_count(), scanned(&s), "seed {seed} round {round}");
                    // The tree trails the records until the journal is
                    // flushed (the last round's is left for the reopen).
                    if round == 29 {
                        continue;
                    }
                    s.flush_tree().await.unwrap();
                    assert_eq!(index(&s), index_by_scan(&s), "seed {seed} round {round}");
                    assert_eq!(tree_and_index(&s), tree_and_index_by_scan(&s), "seed {seed} round {round}");
                }
            });
            let kept = s.tombstone_count();
            // What the tree must be once the journal left by the last
            // writes is applied at open.
            let kept_tree = tree_and_index_by_scan(&s);
            drop(s);
            let s = Store::open(&path, "eu-west").unwrap();
            assert_eq!(s.tombstone_count(), kept, "seed {seed}: after reopening");
            assert_eq!(kept, scanned(&s));
            assert_eq!(tree_and_index(&s), kept_tree, "seed {seed}: after reopening");
        }
        // A store written before the counter existed: counted at open.
        let expected = {
            let s = Store::open(&path, "eu-west").unwrap();
            rt().block_on(async {
                for k in 0..3u8 {
                    s.delete("n", &[k]).await.unwrap();
                }
            });
            let n = scanned(&s);
            let txn = s.inner.db.begin_write().unwrap();
            // As a build of format 2 left it (or of 3: with stale digests,
            // no tree, no index).
            txn.open_table(META).unwrap().insert("format", 2).unwrap();
            txn.open_table(META).unwrap().remove("tombstones").unwrap();
            let mut t = txn.open_table(DIGESTS).unwrap();
            for ns in ["n", "gone"] {
                t.insert(ns, [7u8; 32 * DIGEST_BUCKETS].as_slice()).unwrap();
            }
            drop(t);
            txn.delete_table(TREE).unwrap();
            txn.delete_table(INDEX).unwrap();
            txn.open_table(TREE)
                .unwrap()
                .insert(merkle::node_key(b"gone", &[]).as_slice(), [7u8; 40].as_slice())
                .unwrap();
            let stale = tombstone_key(Timestamp { wall_ms: 1, logical: 0 }, b"n\0stale");
            txn.open_table(TOMBSTONES).unwrap().insert(stale.as_slice(), ()).unwrap();
            txn.commit().unwrap();
            n
        };
        assert!(expected > 0, "the seeds left no tombstones to count");
        let s = Store::open(&path, "eu-west").unwrap();
        assert_eq!(s.tombstone_count(), expected);
        assert_eq!(index(&s), index_by_scan(&s), "the index built at open");
        for ns in ["n", "m", "c"] {
            assert_ne!(s.digest(ns).unwrap(), [[0u8; 32]; DIGEST_BUCKETS]);
        }
        assert_eq!(tree_and_index(&s), tree_and_index_by_scan(&s), "after computing at open");
        assert_eq!(s.digest("gone").unwrap(), [[0u8; 32]; DIGEST_BUCKETS], "a stale node was kept");
        assert!(s.inner.db.begin_read().unwrap().open_table(DIGESTS).is_err(), "format 3's digests were kept");
    }

    /// Collecting tombstones touches the tombstones and nothing else:
    /// thousands of live records around them are neither read nor
    /// rewritten (counted by the writer).
    #[test]
    fn collecting_tombstones_touches_only_the_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("kv"), "eu-west").unwrap();
        rt().block_on(async {
            let live: Vec<Change> = (0..5000u32)
                .map(|i| Change {
                    ns: "n".into(),
                    key: format!("live-{i}").into_bytes(),
                    record: Record {
                        value: Value::Bytes(vec![1]),
                        ts: Timestamp { wall_ms: 1_000, logical: i },
                        origin: "us-east".into(),
                        seen: Timestamp::default(),
                    },
                })
                .collect();
            s.merge(live).await.unwrap();
            let mut last = None;
            for i in 0..7u8 {
                s.put("n", &[b'd', i], vec![i]).await.unwrap();
                last = Some(s.delete("n", &[b'd', i]).await.unwrap());
            }
            let before = s.records_written();
            let n = s.collect_tombstones(last.unwrap().record.ts).await.unwrap();
            assert_eq!(n, 6, "all but the newest tombstone are older than it");
            assert_eq!(s.records_written() - before, 6, "collection touched records other than the tombstones");
            assert_eq!(s.tombstone_count(), 1);
            s.flush_tree().await.unwrap();
            assert_eq!(s.tree_root("n").unwrap().count, 5001);
        });
        assert_eq!(tree_and_index(&s), tree_and_index_by_scan(&s));
    }

    /// The largest timestamp stored is kept (no scan at open): a record
    /// merged from a region whose clock runs ahead still bounds the clock
    /// after a restart.
    #[test]
    fn the_clock_never_goes_below_a_stored_timestamp_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv");
        let ahead = Timestamp { wall_ms: crate::hlc::system_ms() + 60_000, logical: 7 };
        {
            let s = Store::open(&path, "eu-west").unwrap();
            let record =
                Record { value: Value::Bytes(vec![]), ts: ahead, origin: "ap".into(), seen: Timestamp::default() };
            rt().block_on(s.merge(vec![Change { ns: "n".into(), key: b"k".to_vec(), record }])).unwrap();
        }
        let s = Store::open(&path, "eu-west").unwrap();
        let w = s.put_blocking("n", b"j", vec![]).unwrap();
        assert!(w.record.ts > ahead, "{:?} is not after {ahead:?}", w.record.ts);
    }

    #[test]
    fn a_database_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format", 99).unwrap();
            txn.commit().unwrap();
        }
        assert!(matches!(Store::open(&path, "x"), Err(StoreError::Format(99))));
    }
}
