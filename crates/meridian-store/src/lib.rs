//! The regional key-value store: durable records stamped with hybrid logical
//! clocks, merged last-writer-wins (and counters merged without loss), in a
//! redb database written with group commit, plus the replication log and
//! the replication wire format.
//!
//! It knows nothing of the network: replication (in `meridian-region`)
//! ships [`Message`]s built from the log and hands received ones to
//! [`Store::apply_push`]. Merging is deterministic, so every region that
//! has seen the same set of writes holds the same state whatever the order
//! they arrived in.

pub mod hlc;
pub mod merkle;
pub mod record;
mod store;
pub mod wire;

pub use hlc::{Hlc, Timestamp};
pub use merkle::{Node, NodePath};
pub use record::{DecodeError, Record, Value};
pub use store::{ApplyReport, PushOutcome, Store, StoreError, Swapped, Written, DIGEST_BUCKETS, DISK_FORMAT};
pub use wire::{check_changes, Change, Message, Unacceptable, WireError};
