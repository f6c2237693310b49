//! A region's data path, on its own so that `meridian-region` is a node
//! (versions, doors, requests) and this crate is the data: it knows nothing
//! of wasmtime or of how a request reached the region.
//!
//! - [`kv`]: the key-value service — placement of a namespace (local,
//!   forwarded to an allowed region, or through Raft), the operations, the
//!   signed causality tokens, and the `/_meridian/kv|repl|raft|peers` API;
//! - [`antientropy`]: finding and pulling what differs from a peer by
//!   descending the two anti-entropy trees where they differ;
//! - [`repl`]: replication of `global` and `regional` namespaces between
//!   regions (streams, gap repair, snapshots, anti-entropy, tombstones);
//! - [`strong`]: one openraft group per `strong` namespace.
//!
//! Dependencies: `meridian-store` (the storage engine), `meridian-http`
//! (the cluster client, mTLS), `meridian-manifest` (namespace modes),
//! `meridian-trust` (callers' verified identities).

pub mod antientropy;
pub mod election;
pub mod kv;
pub mod rejoin;
pub mod repl;
pub mod strong;
