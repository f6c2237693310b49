//! The regional key-value store: durable records stamped with hybrid logical
//! clocks, merged last-writer-wins (and counters merged without loss), in a
//! redb database.
//!
//! This is the storage half of replicated namespaces (issue 3). It knows
//! nothing of the network: replication hands it remote [`Record`]s to merge,
//! and it hands out local ones to ship. Merging is deterministic, so every
//! region that has seen the same set of writes holds the same state whatever
//! the order they arrived in.

pub mod hlc;
pub mod record;
mod store;

pub use hlc::{Hlc, Timestamp};
pub use record::{DecodeError, Record, Value};
pub use store::{Applied, Store, StoreError};
