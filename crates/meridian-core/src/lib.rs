//! Shared vocabulary of Meridian: regions and their coordinates, the world
//! description that `meridian dev` writes, version identifiers and the HTTP
//! header names every role agrees on.
//!
//! This crate has no I/O beyond reading small files and no async: every other
//! crate depends on it, so it stays cheap to build.

pub mod egress;
pub mod fs;
pub mod geo;
pub mod geoip;
pub mod headers;
pub mod kv;
pub mod stats;
pub mod topology;
pub mod version;
pub mod wire;
pub mod world;

pub use geo::GeoPoint;
pub use topology::{Region, Topology};
pub use version::VersionId;
