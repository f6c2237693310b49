//! The cache's disk tier: every object the memory tier stores is also
//! written here (a file per URL, all its variants), bounded by bytes with
//! the least recently used files removed first, so the edge keeps far more
//! than its memory holds and refills memory from local disk instead of the
//! WAN.
//!
//! Like Varnish's file storage it does not survive a restart: the directory
//! is emptied when the edge starts (objects' freshness and purges while the
//! edge was down are unknown). The same rules decide what reaches it as the
//! memory tier: nothing is written here that memory would not store.
//!
//! File format, per variant: `u32` length of a JSON head (policy, status,
//! headers, tags, freshness, the gzipped body's length if kept), the head,
//! `u32` body length, the body, then the gzipped body if kept.

use crate::cache::Object;
use bytes::Bytes;
use http_cache_semantics::CachePolicy;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What the index knows of a file without reading it.
#[derive(Clone)]
pub struct Entry {
    pub bytes: u32,
    pub tags: Arc<[Box<str>]>,
}

pub struct Disk {
    dir: PathBuf,
    index: moka::sync::Cache<Box<str>, Entry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Head {
    policy: CachePolicy,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    tags: Vec<String>,
    vary_key: String,
    req_host: Option<Vec<u8>>,
    fresh_until_ms: u64,
    stale_while_revalidate_s: u64,
    stale_if_error_s: u64,
    /// Length of the gzipped body that follows the body, if kept.
    #[serde(default)]
    gzip_len: Option<u32>,
}

impl Disk {
    /// An empty tier of at most `max_bytes` in `dir` (emptied first).
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Disk> {
        if dir.exists() {
            for e in std::fs::read_dir(dir)? {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "obj" || x == "tmp") {
                    std::fs::remove_file(p)?;
                }
            }
        }
        std::fs::create_dir_all(dir)?;
        let files = dir.to_path_buf();
        let index = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k, e: &Entry| e.bytes)
            .eviction_listener(move |k: Arc<Box<str>>, _e, cause| {
                // A rewrite replaces the entry, and its file is already the
                // new one: only an entry that goes takes its file along.
                if cause != moka::notification::RemovalCause::Replaced {
                    let _ = std::fs::remove_file(files.join(file_name(&k)));
                }
            })
            .build();
        Ok(Disk { dir: dir.to_path_buf(), index })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }

    /// Writes every variant of `key` (replacing what was there).
    pub fn write(&self, key: &str, variants: &[Arc<Object>]) {
        self.write_if(key, variants, || Some(()));
    }

    /// Writes every variant of `key`, if `still` (asked once the file is
    /// written, before it is put in place) gives a guard; the file is put
    /// in place and indexed while the guard is held.
    pub fn write_if<G>(&self, key: &str, variants: &[Arc<Object>], still: impl FnOnce() -> Option<G>) {
        let mut out = Vec::new();
        let mut tags: Vec<Box<str>> = Vec::new();
        for o in variants {
            let head = Head {
                policy: o.policy.clone(),
                status: o.status.as_u16(),
                headers: o.headers.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect(),
                tags: o.tags.iter().map(|t| t.to_string()).collect(),
                vary_key: o.vary_key.to_string(),
                req_host: o.req_host.as_ref().map(|h| h.as_bytes().to_vec()),
                fresh_until_ms: millis(o.fresh_until),
                stale_while_revalidate_s: o.stale_while_revalidate.as_secs(),
                stale_if_error_s: o.stale_if_error.as_secs(),
                gzip_len: o.gzip.as_ref().map(|g| g.len() as u32),
            };
            let Ok(head) = serde_json::to_vec(&head) else { return };
            out.extend_from_slice(&(head.len() as u32).to_le_bytes());
            out.extend_from_slice(&head);
            out.extend_from_slice(&(o.body.len() as u32).to_le_bytes());
            out.extend_from_slice(&o.body);
            if let Some(g) = &o.gzip {
                out.extend_from_slice(g);
            }
            tags.extend(o.tags.iter().cloned());
        }
        let path = self.path(key);
        // Each writer its own temporary file: two writes of one URL at once
        // must not interleave in it.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{n}.tmp"));
        if let Err(e) = std::fs::write(&tmp, &out) {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(error = %e, path = %path.display(), "cache object not written to disk");
            return;
        }
        let Some(_guard) = still() else {
            let _ = std::fs::remove_file(&tmp);
            return;
        };
        match std::fs::rename(&tmp, &path) {
            Ok(()) => self
                .index
                .insert(key.into(), Entry { bytes: out.len().min(u32::MAX as usize) as u32, tags: tags.into() }),
            Err(e) => tracing::warn!(error = %e, path = %path.display(), "cache object not written to disk"),
        }
    }

    /// The variants of `key`, if the tier has them.
    pub fn read(&self, key: &str) -> Option<Vec<Arc<Object>>> {
        self.index.get(key)?;
        let data = std::fs::read(self.path(key)).ok()?;
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = data.get(at..at + n)?;
            at += n;
            Some(s)
        };
        let mut out = Vec::new();
        while let Some(len) = take(4) {
            let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
            let head: Head = serde_json::from_slice(take(len)?).ok()?;
            let blen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            let body = Bytes::copy_from_slice(take(blen)?);
            let gzip = match head.gzip_len {
                Some(n) => Some(Bytes::copy_from_slice(take(n as usize)?)),
                None => None,
            };
            let mut headers = http::HeaderMap::new();
            for (k, v) in head.headers {
                headers
                    .append(http::HeaderName::from_bytes(k.as_bytes()).ok()?, http::HeaderValue::from_bytes(&v).ok()?);
            }
            out.push(Arc::new(Object {
                policy: head.policy,
                status: http::StatusCode::from_u16(head.status).ok()?,
                headers,
                body,
                gzip,
                tags: head.tags.into_iter().map(Into::into).collect(),
                vary_key: head.vary_key.into(),
                req_host: match head.req_host {
                    Some(h) => Some(http::HeaderValue::from_bytes(&h).ok()?),
                    None => None,
                },
                fresh_until: SystemTime::UNIX_EPOCH + Duration::from_millis(head.fresh_until_ms),
                stale_while_revalidate: Duration::from_secs(head.stale_while_revalidate_s),
                stale_if_error: Duration::from_secs(head.stale_if_error_s),
            }));
        }
        Some(out)
    }

    pub fn remove(&self, key: &str) {
        self.index.invalidate(key);
        let _ = std::fs::remove_file(self.path(key));
    }

    /// Every key with its index entry.
    pub fn keys(&self) -> Vec<(Arc<Box<str>>, Entry)> {
        self.index.iter().collect()
    }

    pub fn usage(&self) -> (u64, u64) {
        self.index.run_pending_tasks();
        (self.index.entry_count(), self.index.weighted_size())
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Keys hold hosts and paths: files are named by their hash.
fn file_name(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.obj")
}
