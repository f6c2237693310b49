//! The host side of `wasi:keyvalue@0.2.0-draft2` (`store`, `atomics`,
//! `batch`), written here because `wasmtime-wasi-keyvalue` implements only
//! the older draft, in memory.
//!
//! The host knows nothing of regions or replication: each request gets a
//! [`KvBackend`] from the region, which decides what a bucket is (a
//! namespace of the app's manifest), where its data lives and how an
//! operation reaches it. Every backend error becomes a `wasi:keyvalue`
//! error the guest sees; none traps the guest.

use std::sync::Arc;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit/keyvalue",
        world: "wasi:keyvalue/imports",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
            "wasi:keyvalue/atomics.cas": super::Cas,
        },
    });
}

use bindings::wasi::keyvalue::{atomics, batch, store};

pub use meridian_core::kv::{CasVersion, KvError, KvResult, LIST_PAGE, MAX_VALUE};

/// What a function's key-value calls reach. One per request.
#[async_trait::async_trait]
pub trait KvBackend: Send + Sync {
    /// Checks that a bucket may be opened.
    fn open(&self, bucket: &str) -> KvResult<()>;
    async fn get(&self, bucket: &str, key: &str) -> KvResult<Option<Vec<u8>>>;
    async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> KvResult<()>;
    /// Several keys at once (`wasi:keyvalue/batch.set-many`); not atomic.
    /// A backend that can commit them together should.
    async fn set_many(&self, bucket: &str, items: Vec<(String, Vec<u8>)>) -> KvResult<()> {
        for (key, value) in items {
            self.set(bucket, &key, value).await?;
        }
        Ok(())
    }
    async fn delete(&self, bucket: &str, key: &str) -> KvResult<()>;
    /// One page of live keys after `cursor`, and the cursor of the next page.
    async fn list(&self, bucket: &str, cursor: Option<String>) -> KvResult<(Vec<String>, Option<String>)>;
    async fn increment(&self, bucket: &str, key: &str, delta: i64) -> KvResult<i64>;
    /// The current value and its version.
    async fn read_versioned(&self, bucket: &str, key: &str) -> KvResult<(Option<Vec<u8>>, CasVersion)>;
    /// Writes if the key is still at `version`. `Ok(None)` when written,
    /// `Ok(Some(current value, version))` when the key had changed.
    async fn swap(
        &self,
        bucket: &str,
        key: &str,
        version: &CasVersion,
        value: Vec<u8>,
    ) -> KvResult<Option<(Option<Vec<u8>>, CasVersion)>>;
}

/// An open bucket, as the guest holds it.
pub struct Bucket {
    name: String,
}

/// A compare-and-swap in progress.
pub struct Cas {
    bucket: String,
    key: String,
    current: Option<Vec<u8>>,
    version: CasVersion,
}

/// The per-request key-value state of a guest.
pub struct KvView<'a> {
    pub table: &'a mut ResourceTable,
    pub backend: Option<&'a Arc<dyn KvBackend>>,
}

pub(crate) struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    store::add_to_linker::<T, HasKv>(linker, f)?;
    atomics::add_to_linker::<T, HasKv>(linker, f)?;
    batch::add_to_linker::<T, HasKv>(linker, f)?;
    Ok(())
}

fn to_wit(e: KvError) -> store::Error {
    match e {
        KvError::NoSuchStore => store::Error::NoSuchStore,
        KvError::AccessDenied => store::Error::AccessDenied,
        // A guest sees text only; the message says which it was.
        e @ (KvError::NotApplied(_) | KvError::OutcomeUnknown(_)) => store::Error::Other(e.to_string()),
        KvError::Other(s) => store::Error::Other(s),
    }
}

type WitResult<T> = wasmtime::Result<Result<T, store::Error>>;

impl KvView<'_> {
    fn backend(&self) -> Result<Arc<dyn KvBackend>, store::Error> {
        self.backend.cloned().ok_or(store::Error::NoSuchStore)
    }

    fn bucket(&self, b: &Resource<Bucket>) -> wasmtime::Result<String> {
        Ok(self.table.get(b)?.name.clone())
    }
}

fn check_value(v: &[u8]) -> Result<(), store::Error> {
    if v.len() > MAX_VALUE {
        return Err(store::Error::Other(format!("value is {} bytes; the largest allowed is {MAX_VALUE}", v.len())));
    }
    Ok(())
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        }
    };
}

impl store::Host for KvView<'_> {
    async fn open(&mut self, identifier: String) -> WitResult<Resource<Bucket>> {
        let backend = tri!(self.backend());
        tri!(backend.open(&identifier).map_err(to_wit));
        Ok(Ok(self.table.push(Bucket { name: identifier })?))
    }
}

impl store::HostBucket for KvView<'_> {
    async fn get(&mut self, b: Resource<Bucket>, key: String) -> WitResult<Option<Vec<u8>>> {
        let (backend, name) = (tri!(self.backend()), self.bucket(&b)?);
        Ok(backend.get(&name, &key).await.map_err(to_wit))
    }

    async fn set(&mut self, b: Resource<Bucket>, key: String, value: Vec<u8>) -> WitResult<()> {
        let (backend, name) = (tri!(self.backend()), self.bucket(&b)?);
        tri!(check_value(&value));
        Ok(backend.set(&name, &key, value).await.map_err(to_wit))
    }

    async fn delete(&mut self, b: Resource<Bucket>, key: String) -> WitResult<()> {
        let (backend, name) = (tri!(self.backend()), self.bucket(&b)?);
        Ok(backend.delete(&name, &key).await.map_err(to_wit))
    }

    async fn exists(&mut self, b: Resource<Bucket>, key: String) -> WitResult<bool> {
        let (backend, name) = (tri!(self.backend()), self.bucket(&b)?);
        Ok(backend.get(&name, &key).await.map(|v| v.is_some()).map_err(to_wit))
    }

    async fn list_keys(&mut self, b: Resource<Bucket>, cursor: Option<String>) -> WitResult<store::KeyResponse> {
        let (backend, name) = (tri!(self.backend()), self.bucket(&b)?);
        let (keys, cursor) = tri!(backend.list(&name, cursor).await.map_err(to_wit));
        Ok(Ok(store::KeyResponse { keys, cursor }))
    }

    async fn drop(&mut self, b: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        Ok(())
    }
}

impl atomics::Host for KvView<'_> {
    async fn increment(&mut self, b: Resource<Bucket>, key: String, delta: i64) -> WitResult<i64> {
        let (backend, name) = (tri!(self.backend()), self.bucket(&b)?);
        Ok(backend.increment(&name, &key, delta).await.map_err(to_wit))
    }

    async fn swap(&mut self, cas: Resource<Cas>, value: Vec<u8>) -> wasmtime::Result<Result<(), atomics::CasError>> {
        let c = self.table.delete(cas)?;
        let backend = match self.backend() {
            Ok(b) => b,
            Err(e) => return Ok(Err(atomics::CasError::StoreError(e))),
        };
        if let Err(e) = check_value(&value) {
            return Ok(Err(atomics::CasError::StoreError(e)));
        }
        match backend.swap(&c.bucket, &c.key, &c.version, value).await {
            Ok(None) => Ok(Ok(())),
            Ok(Some((current, version))) => {
                let fresh = self.table.push(Cas { bucket: c.bucket, key: c.key, current, version })?;
                Ok(Err(atomics::CasError::CasFailed(fresh)))
            }
            Err(e) => Ok(Err(atomics::CasError::StoreError(to_wit(e)))),
        }
    }
}

impl atomics::HostCas for KvView<'_> {
    async fn new(&mut self, b: Resource<Bucket>, key: String) -> WitResult<Resource<Cas>> {
        let (backend, name) = (tri!(self.backend()), self.bucket(&b)?);
        let (current, version) = tri!(backend.read_versioned(&name, &key).await.map_err(to_wit));
        Ok(Ok(self.table.push(Cas { bucket: name, key, current, version })?))
    }

    async fn current(&mut self, cas: Resource<Cas>) -> WitResult<Option<Vec<u8>>> {
        Ok(Ok(self.table.get(&cas)?.current.clone()))
    }

    async fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

impl batch::Host for KvView<'_> {
    async fn get_many(&mut self, b: Resource<Bucket>, keys: Vec<String>) -> WitResult<Vec<Option<(String, Vec<u8>)>>> {
        let (backend, name) = (tri!(self.backend()), self.bucket(&b)?);
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let v = tri!(backend.get(&name, &key).await.map_err(to_wit));
            out.push(v.map(|v| (key, v)));
        }
        Ok(Ok(out))
    }

    async fn set_many(&mut self, b: Resource<Bucket>, key_values: Vec<(String, Vec<u8>)>) -> WitResult<()> {
        let (backend, name) = (tri!(self.backend()), self.bucket(&b)?);
        for (_, v) in &key_values {
            tri!(check_value(v));
        }
        tri!(backend.set_many(&name, key_values).await.map_err(to_wit));
        Ok(Ok(()))
    }

    async fn delete_many(&mut self, b: Resource<Bucket>, keys: Vec<String>) -> WitResult<()> {
        let (backend, name) = (tri!(self.backend()), self.bucket(&b)?);
        for key in keys {
            tri!(backend.delete(&name, &key).await.map_err(to_wit));
        }
        Ok(Ok(()))
    }
}
