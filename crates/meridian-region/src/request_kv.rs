//! What one request's `wasi:keyvalue` calls reach: the glue between the
//! function host's [`KvBackend`] and the data path's [`KvService`].

use meridian_core::headers;
use meridian_data::kv::{
    merge_token, other, unhex, visible, KeyValue, KvService, Namespaces, Op, OpResult, Placement, TokenEntry,
    MAX_IDEMPOTENCY_KEY, MAX_SET_MANY,
};
use meridian_host::{CasVersion, KvBackend, KvError, KvResult};
use std::sync::{Arc, Mutex};

/// What one request's `wasi:keyvalue` calls reach: the region's namespaces
/// as declared by the version serving the request. Collects the causality
/// token of the writes it makes.
pub struct RequestKv {
    pub svc: Arc<KvService>,
    pub namespaces: Namespaces,
    pub token: Mutex<Vec<TokenEntry>>,
    /// Jurisdictions of the pinned namespaces this request opened: its
    /// answer may hold their data, so edges elsewhere must not store it.
    pub touched: Mutex<std::collections::BTreeSet<String>>,
    /// An operation that needed another region (a pinned namespace's
    /// home, a strong namespace's leader) failed: a 5xx of this request is
    /// then not this region's own failure.
    pub dependency_failed: std::sync::atomic::AtomicBool,
    /// The request's idempotency key (`Idempotency-Key`), if any.
    pub idem: Option<String>,
    /// Writes made so far (numbering them under the idempotency key).
    writes: std::sync::atomic::AtomicU32,
    /// The worst failure of a write: its outcome unknown, else not applied.
    outcome: Mutex<Option<WriteOutcome>>,
}

/// How a failed write of a request ended (see [`headers::WRITE_OUTCOME`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WriteOutcome {
    NotApplied,
    Unknown,
}

impl WriteOutcome {
    pub fn header(self) -> &'static str {
        match self {
            WriteOutcome::NotApplied => "not-applied",
            WriteOutcome::Unknown => "unknown",
        }
    }
}

/// Checks an `Idempotency-Key` value: 1 to [`MAX_IDEMPOTENCY_KEY`] visible
/// ASCII characters.
pub fn idempotency_key(v: &http::HeaderValue) -> Result<String, String> {
    let s = v.to_str().unwrap_or("");
    if s.is_empty() || s.len() > MAX_IDEMPOTENCY_KEY || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{} must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters",
            headers::IDEMPOTENCY_KEY
        ));
    }
    Ok(s.to_string())
}

impl RequestKv {
    pub fn new(svc: Arc<KvService>, namespaces: Namespaces, token: Vec<TokenEntry>) -> RequestKv {
        RequestKv {
            svc,
            namespaces,
            token: Mutex::new(token),
            touched: Mutex::default(),
            dependency_failed: Default::default(),
            idem: None,
            writes: Default::default(),
            outcome: Mutex::new(None),
        }
    }

    /// How the request's failed writes ended, if any failed.
    pub fn write_outcome(&self) -> Option<WriteOutcome> {
        *self.outcome.lock().unwrap()
    }

    /// The `x-meridian-residency` value of this request's answer, if it
    /// read or wrote pinned data.
    pub fn residency(&self) -> Option<String> {
        let t = self.touched.lock().unwrap();
        (!t.is_empty()).then(|| t.iter().cloned().collect::<Vec<_>>().join(","))
    }
}

impl RequestKv {
    async fn exec(&self, op: Op) -> KvResult<OpResult> {
        let write = !op.is_read();
        let op = match &self.idem {
            Some(k) if write => {
                let n = self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Op::Once { idem: format!("{k}#{n}"), write: Box::new(op) }
            }
            _ => op,
        };
        let (r, token) = match self.svc.execute(&self.namespaces, &op).await {
            Ok(x) => x,
            Err(e) => {
                let outcome = match &e {
                    KvError::NotApplied(_) if write => Some(WriteOutcome::NotApplied),
                    KvError::OutcomeUnknown(_) if write => Some(WriteOutcome::Unknown),
                    _ => None,
                };
                if let Some(o) = outcome {
                    let mut worst = self.outcome.lock().unwrap();
                    *worst = (*worst).max(Some(o));
                }
                let remote = self.svc.placement(&self.namespaces, op.ns()).is_ok_and(|p| p != Placement::Local);
                if remote && matches!(e, KvError::Other(_) | KvError::NotApplied(_) | KvError::OutcomeUnknown(_)) {
                    self.dependency_failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                return Err(e);
            }
        };
        if let Some(t) = token {
            merge_token(&mut self.token.lock().unwrap(), t);
        }
        Ok(r)
    }
}

#[async_trait::async_trait]
impl KvBackend for RequestKv {
    fn open(&self, bucket: &str) -> KvResult<()> {
        self.svc.placement(&self.namespaces, bucket)?;
        if let Some(meridian_manifest::Namespace {
            mode: meridian_manifest::KvMode::Regional { jurisdiction: Some(j), .. },
            ..
        }) = self.namespaces.get(bucket)
        {
            self.touched.lock().unwrap().insert(j.clone());
        }
        Ok(())
    }

    async fn get(&self, bucket: &str, key: &str) -> KvResult<Option<Vec<u8>>> {
        // The hot path: a local read straight from the store.
        if self.svc.placement(&self.namespaces, bucket)? == Placement::Local {
            let rec = self.svc.store.get(bucket, key.as_bytes()).map_err(other)?;
            return Ok(rec.and_then(|r| visible(r.value)));
        }
        let r = self.exec(Op::Get { ns: bucket.into(), key: key.into() }).await?;
        r.value_hex.map(|h| unhex(&h)).transpose()
    }

    async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> KvResult<()> {
        if self.svc.placement(&self.namespaces, bucket)? == Placement::Local {
            let w = self.svc.store.put(bucket, key.as_bytes(), value).await.map_err(other)?;
            merge_token(&mut self.token.lock().unwrap(), self.svc.token_of(&w));
            return Ok(());
        }
        self.exec(Op::Set { ns: bucket.into(), key: key.into(), value_hex: hex::encode(value) }).await.map(|_| ())
    }

    async fn set_many(&self, bucket: &str, items: Vec<(String, Vec<u8>)>) -> KvResult<()> {
        if self.svc.placement(&self.namespaces, bucket)? == Placement::Local {
            let items = items.into_iter().map(|(k, v)| (k.into_bytes(), v)).collect();
            if let Some(w) = self.svc.store.put_many(bucket, items).await.map_err(other)? {
                merge_token(&mut self.token.lock().unwrap(), self.svc.token_of(&w));
            }
            return Ok(());
        }
        for chunk in items.chunks(MAX_SET_MANY) {
            let items = chunk.iter().map(|(k, v)| KeyValue { key: k.clone(), value_hex: hex::encode(v) }).collect();
            self.exec(Op::SetMany { ns: bucket.into(), items }).await?;
        }
        Ok(())
    }

    async fn delete(&self, bucket: &str, key: &str) -> KvResult<()> {
        self.exec(Op::Delete { ns: bucket.into(), key: key.into() }).await.map(|_| ())
    }

    async fn list(&self, bucket: &str, cursor: Option<String>) -> KvResult<(Vec<String>, Option<String>)> {
        let r = self.exec(Op::List { ns: bucket.into(), cursor, limit: None }).await?;
        Ok((r.keys, r.cursor))
    }

    async fn increment(&self, bucket: &str, key: &str, delta: i64) -> KvResult<i64> {
        let r = self.exec(Op::Increment { ns: bucket.into(), key: key.into(), delta }).await?;
        r.total.ok_or_else(|| KvError::Other("increment returned no total".into()))
    }

    async fn read_versioned(&self, bucket: &str, key: &str) -> KvResult<(Option<Vec<u8>>, CasVersion)> {
        let r = self.exec(Op::ReadVersioned { ns: bucket.into(), key: key.into() }).await?;
        let version = unhex(r.version_hex.as_deref().unwrap_or(""))?;
        Ok((r.value_hex.map(|h| unhex(&h)).transpose()?, version))
    }

    async fn swap(
        &self,
        bucket: &str,
        key: &str,
        version: &CasVersion,
        value: Vec<u8>,
    ) -> KvResult<Option<(Option<Vec<u8>>, CasVersion)>> {
        let op = Op::Swap {
            ns: bucket.into(),
            key: key.into(),
            version_hex: hex::encode(version),
            value_hex: hex::encode(value),
        };
        let r = self.exec(op).await?;
        if r.swapped == Some(true) {
            return Ok(None);
        }
        let version = unhex(r.version_hex.as_deref().unwrap_or(""))?;
        Ok(Some((r.value_hex.map(|h| unhex(&h)).transpose()?, version)))
    }
}
