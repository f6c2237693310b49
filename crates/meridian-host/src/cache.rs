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
    dir.join(format!("{}-{}.cwasm", hex::encode(Sha256::digest(wasm)), engine_key(engine)))
}

/// The engine's compatibility hash as a short hex string.
pub(crate) fn engine_key(engine: &Engine) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Loads the compiled form of `wasm` from the cache, compiling and storing it
/// on a miss. Returns whether it was a hit.
pub(crate) fn load_or_compile(dir: &Path, engine: &Engine, wasm: &[u8]) -> wasmtime::Result<(Component, bool)> {
    let path = path_for(dir, engine, wasm);
    if path.is_file() {
        // SAFETY: `deserialize_file` trusts the file to be machine code that
        // wasmtime produced for this engine; loading it runs that code. Two
        // writers fill the cache directory, which lives in the node's private
        // data directory: this module (the output of `Component::serialize`)
        // and `Host::accept_artifact`, which a region calls only for
        // artifacts signed by its cluster's control plane (a certificate of
        // role `control` from the cluster CA, over this component's SHA-256,
        // this engine's key and the artifact's SHA-256), received over
        // mutual TLS from that role (the control plane compiled them with
        // this same wasmtime; loading native code trusts its producer, as
        // loading this binary does). Both write under a name that encodes
        // the component's SHA-256 and this engine's compatibility hash, and
        // wasmtime checks the artifact's own engine header on load. A torn
        // write cannot be observed: files appear by atomic rename after
        // fsync.
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

/// The file an artifact for the component with SHA-256 `digest_hex` and
/// engine `key` lives in.
pub(crate) fn path_for_digest(dir: &Path, digest_hex: &str, key: &str) -> PathBuf {
    dir.join(format!("{digest_hex}-{key}.cwasm"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_engine_key_does_not_depend_on_the_pool_size() {
        // So a control plane with a small pool compiles for every region.
        let a = crate::Host::new(crate::HostConfig { cache_dir: "/tmp/x".into(), max_instances: 2, max_memory_mb: 64 })
            .unwrap();
        let b = crate::Host::new(crate::HostConfig {
            cache_dir: "/tmp/x".into(),
            max_instances: 1000,
            max_memory_mb: 1024,
        })
        .unwrap();
        assert_eq!(a.engine_key(), b.engine_key());
    }
}
