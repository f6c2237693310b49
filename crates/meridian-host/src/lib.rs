//! The function host: runs `wasi:http/proxy` components with wasmtime.
//!
//! * One [`Engine`](wasmtime::Engine) per process with the pooling instance
//!   allocator: instantiation reuses pre-reserved slots instead of mmapping.
//! * Components are compiled once, when a version is installed, and the
//!   machine code is cached on disk keyed by the SHA-256 of the component and
//!   the engine's compatibility hash ([`cache`]). Neither a request nor a
//!   restart pays for compilation.
//! * Every request gets a fresh instance from a pre-instantiated component,
//!   a wall-clock deadline enforced by epoch interruption (a spinning guest
//!   yields every tick so it cannot starve other requests on its thread, and
//!   traps at the deadline), and a memory limit enforced by a resource limiter.
//! * Guests reach key-value data through `wasi:keyvalue@0.2.0-draft2`
//!   ([`kv`]), backed by whatever [`KvBackend`] the caller passes per request.
//!
//! * Outgoing HTTP reaches only the hosts a component's manifest lists,
//!   checked on the resolved address ([`egress`]).
//!
//! This crate knows nothing of regions, routes or versions; it turns bytes
//! into a [`Prepared`] component and requests into responses.

mod cache;
pub mod egress;
mod guest;
pub mod kv;

pub use guest::{ArtifactError, Fault, Host, HostConfig, HostError, Pooling, Prepared, ResponseBody};
pub use kv::{CasVersion, KvBackend, KvError, KvResult};
