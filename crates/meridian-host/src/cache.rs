//! On-disk cache of compiled components.

use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::Engine;

/// The cache file for `wasm` compiled by `engine`. The key covers the
/// component bytes and everything about the engine that affects machine code
/// (wasmtime version, target, tunables), so a changed engine never loads a
/// stale artifact.
pub(crate) fn path_for(dir: &Path, engine: &Engine, wasm: &[u8]) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let digest = Sha256::digest(wasm);
    dir.join(format!("{}-{:016x}.cwasm", hex::encode(digest), h.finish()))
}

/// Loads the compiled form of `wasm` from the cache, compiling and storing it
/// on a miss. Returns whether it was a hit.
pub(crate) fn load_or_compile(dir: &Path, engine: &Engine, wasm: &[u8]) -> wasmtime::Result<(Component, bool)> {
    let path = path_for(dir, engine, wasm);
    if path.is_file() {
        // SAFETY: `deserialize_file` trusts the file to be machine code that
        // wasmtime produced. Only this module writes into the cache
        // directory, which lives in the region's private data directory, and
        // it writes only the output of `Component::serialize` under a name
        // that encodes this engine's compatibility hash. A torn write cannot
        // be observed: files appear by atomic rename after fsync.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => return Ok((c, true)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable compiled component");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let component = Component::new(engine, wasm)?;
    let bytes = component.serialize()?;
    std::fs::create_dir_all(dir)?;
    meridian_core::fs::write_atomic(&path, &bytes)?;
    Ok((component, false))
}
