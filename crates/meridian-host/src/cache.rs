//! On-disk cache of compiled components.

use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Cranelift's incremental compilation cache: compiled functions by a hash
/// of their IR. Components built by the same toolchain share most of their
/// code (every componentize-py component carries the same CPython), so the
/// second component compiles mostly from here. In memory, up to a bound;
/// past it, new functions are not kept (what is kept stays useful: the
/// runtime a toolchain puts in every component is compiled first).
#[derive(Debug)]
pub(crate) struct FunctionCache {
    entries: std::sync::RwLock<std::collections::HashMap<Vec<u8>, Vec<u8>>>,
    bytes: std::sync::atomic::AtomicUsize,
    limit: usize,
    /// Functions found here instead of compiled.
    pub(crate) hits: std::sync::atomic::AtomicU64,
}

impl FunctionCache {
    pub(crate) fn new(limit: usize) -> FunctionCache {
        FunctionCache { entries: Default::default(), bytes: Default::default(), limit, hits: Default::default() }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.read().unwrap().len()
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
        let found = self.entries.read().unwrap().get(key).map(|v| std::borrow::Cow::Owned(v.clone()));
        if found.is_some() {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        found
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        use std::sync::atomic::Ordering;
        let size = key.len() + value.len();
        if self.bytes.fetch_add(size, Ordering::Relaxed) + size > self.limit {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        self.entries.write().unwrap().insert(key.to_vec(), value);
        true
    }
}

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
    use super::FunctionCache;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    /// `wasm` with a custom section appended: another component (another
    /// digest) with the same code.
    fn variant(wasm: &[u8], tag: &str) -> Vec<u8> {
        let mut section = vec![4u8];
        section.extend_from_slice(b"test");
        section.extend_from_slice(tag.as_bytes());
        let mut out = wasm.to_vec();
        out.push(0);
        out.push(section.len() as u8);
        out.extend_from_slice(&section);
        out
    }

    #[test]
    fn a_component_sharing_code_with_one_compiled_before_reuses_its_functions_and_gets_the_same_machine_code() {
        let hello = include_bytes!("../../../guests/hello.wasm");
        let engine = |cache: Option<Arc<FunctionCache>>| {
            let mut c = wasmtime::Config::new();
            c.epoch_interruption(true);
            if let Some(cache) = cache {
                c.enable_incremental_compilation(cache).unwrap();
            }
            wasmtime::Engine::new(&c).unwrap()
        };
        let cache = Arc::new(FunctionCache::new(64 << 20));
        let cached = engine(Some(cache.clone()));
        let plain = engine(None);
        // The cache changes nothing a region checks before loading code.
        assert_eq!(super::engine_key(&cached), super::engine_key(&plain));
        cached.precompile_component(&variant(hello, "a")).unwrap();
        let (kept, before) = (cache.len(), cache.hits.load(Ordering::Relaxed));
        assert!(kept > 0);
        let b = variant(hello, "b");
        let reused = cached.precompile_component(&b).unwrap();
        // Most functions of the second came from the first.
        let (anew, reused_n) = (cache.len() - kept, cache.hits.load(Ordering::Relaxed) - before);
        assert!(reused_n > 2 * anew as u64, "{reused_n} functions reused, {anew} compiled anew");
        assert_eq!(reused, plain.precompile_component(&b).unwrap(), "reused functions changed the machine code");
    }

    #[test]
    fn the_function_cache_keeps_nothing_past_its_bound() {
        use wasmtime::CacheStore;
        let c = FunctionCache::new(100);
        assert!(c.insert(b"k1", vec![0; 50]));
        assert!(!c.insert(b"k2", vec![0; 60]), "over the bound");
        assert!(c.get(b"k1").is_some() && c.get(b"k2").is_none());
    }

    #[test]
    fn the_engine_key_does_not_depend_on_the_pool_size() {
        // So a control plane with a small pool compiles for every region,
        // whatever their pools keep resident.
        let a = crate::Host::new(crate::HostConfig {
            cache_dir: "/tmp/x".into(),
            max_instances: 2,
            max_memory_mb: 64,
            ..Default::default()
        })
        .unwrap();
        let b = crate::Host::new(crate::HostConfig {
            cache_dir: "/tmp/x".into(),
            max_instances: 1000,
            max_memory_mb: 1024,
            pooling: crate::Pooling {
                keep_resident_kib: 0,
                pagemap_scan: false,
                warm_slots: 1,
                decommit_batch: 8,
                ..Default::default()
            },
        })
        .unwrap();
        assert_eq!(a.engine_key(), b.engine_key());
    }
}
