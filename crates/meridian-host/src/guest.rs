//! Engine set-up, preparation of components and the per-request lifecycle.

use crate::kv::KvBackend;
use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every response the host produces: streamed from the guest or a
/// small error message.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// The most compiled functions kept for reuse by later compilations.
const FUNCTION_CACHE_BYTES: usize = 256 << 20;

/// How often the epoch advances. A spinning guest yields to the scheduler
/// this often and overshoots its deadline by at most this much.
const EPOCH_TICK: Duration = Duration::from_millis(2);

#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Where compiled components are cached.
    pub cache_dir: PathBuf,
    /// Instances that may run at once; each needs a pooling-allocator slot.
    pub max_instances: u32,
    /// Largest memory any component may be given, in MiB. Sizes the pool.
    pub max_memory_mb: u64,
    /// How instance slots are recycled between requests.
    pub pooling: Pooling,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: PathBuf::from("cache"),
            max_instances: 1000,
            max_memory_mb: 1024,
            pooling: Pooling::default(),
        }
    }
}

/// How a slot of the pooling allocator is made ready for the next request
/// once an instance is done with it.
///
/// Every request gets a fresh instance, so a slot's memory is reset after
/// each one. Resetting with `madvise` (wasmtime's default) unmaps pages, and
/// in a multi-threaded process every unmapping interrupts every other core
/// to flush its TLB; the next request then faults the pages back in, and
/// each first write to a page of a copy-on-write image flushes TLBs again.
/// Resetting in place instead — zeroing only the pages the request wrote
/// (or, with copy-on-write images, copying their original bytes back),
/// found with Linux's `PAGEMAP_SCAN` — keeps the pages mapped: no system
/// call, no fault, no interrupt. Chosen by measurement
/// (`python3 bench/bench.py pooling`, BENCHMARKS.md).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pooling {
    /// The most bytes of each linear memory and table reset in place; pages
    /// dirtied beyond it are released with `madvise`. Also bounds what an
    /// idle slot keeps resident (per memory, up to `warm_slots` slots).
    pub keep_resident_kib: usize,
    /// Find the dirtied pages with `PAGEMAP_SCAN` (Linux 6.7+; ignored
    /// where unsupported). Without it the lowest `keep_resident_kib` are
    /// reset whether touched or not.
    pub pagemap_scan: bool,
    /// Map a component's initial memory copy-on-write from its image
    /// instead of copying its data segments in at each instantiation.
    pub memory_init_cow: bool,
    /// Slots kept warm for the components that last used them; a component
    /// reuses its own warm slots first (slot affinity).
    pub warm_slots: u32,
    /// Releases queued before one batch of `madvise` calls.
    pub decommit_batch: usize,
}

impl Default for Pooling {
    fn default() -> Self {
        Pooling {
            keep_resident_kib: 64 << 10,
            pagemap_scan: true,
            memory_init_cow: false,
            warm_slots: 64,
            decommit_batch: 1,
        }
    }
}

/// Without `PAGEMAP_SCAN` the lowest `keep_resident` bytes of a memory are
/// reset whether the request touched them or not: more than this costs
/// more than the `madvise` it saves.
const KEEP_RESIDENT_WITHOUT_SCAN: usize = 1 << 20;

impl Pooling {
    /// The bytes per memory and table actually reset in place on this
    /// machine.
    fn effective_keep_resident(&self) -> usize {
        let keep = self.keep_resident_kib.saturating_mul(1024);
        if self.pagemap_scan && pagemap_scan_supported() {
            keep
        } else {
            keep.min(KEEP_RESIDENT_WITHOUT_SCAN)
        }
    }
}

/// Whether this kernel has the `PAGEMAP_SCAN` ioctl (Linux 6.7).
fn pagemap_scan_supported() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 7)
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot configure wasmtime: {0:#}")]
    Engine(wasmtime::Error),
    #[error("not a valid component: {0:#}")]
    Compile(wasmtime::Error),
    #[error("the component cannot run here: {0:#}")]
    Link(wasmtime::Error),
    #[error("memory_mb = {asked} exceeds this region's maximum of {max} MiB")]
    MemoryTooLarge { asked: u64, max: u64 },
}

/// Why a guest did not produce a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Deadline,
    Memory,
    Trap,
    NoResponse,
}

const FAULT_NONE: u8 = 0;
const FAULT_DEADLINE: u8 = 1;
const FAULT_MEMORY: u8 = 2;

pub struct Host {
    engine: Engine,
    linker: Arc<Linker<GuestState>>,
    config: HostConfig,
    stop_ticker: Arc<AtomicBool>,
    /// This node's own listening addresses: no guest may reach them.
    own_addrs: Arc<std::sync::RwLock<Vec<std::net::SocketAddr>>>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// Why compiled code from elsewhere was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("not a SHA-256 in hex")]
    BadDigest,
    #[error("compiled for engine {theirs}, this one is {ours}: the region compiles it itself")]
    OtherEngine { theirs: String, ours: String },
    #[error("cannot store it: {0}")]
    Io(std::io::Error),
}

fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Host {
    pub fn new(config: HostConfig) -> Result<Host, HostError> {
        let mut pool = PoolingAllocationConfig::new();
        let n = config.max_instances.max(1);
        // A component made by wasm-tools from a core module and an adapter
        // has a handful of core instances and two memories.
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_core_instances_per_component(32)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_memory_size((config.max_memory_mb as usize) << 20);
        let p = &config.pooling;
        let keep = p.effective_keep_resident();
        tracing::debug!(keep_resident = keep, cow = p.memory_init_cow, "instance pool");
        pool.max_unused_warm_slots(p.warm_slots.min(n))
            .linear_memory_keep_resident(keep)
            .table_keep_resident(keep)
            .decommit_batch_size(p.decommit_batch.max(1))
            .pagemap_scan(if p.pagemap_scan { wasmtime::Enabled::Auto } else { wasmtime::Enabled::No });
        let mut wc = Config::new();
        wc.epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(p.memory_init_cow);
        // Functions compiled for one component are reused for the next that
        // has them (the machine code is the same either way).
        let functions = Arc::new(crate::cache::FunctionCache::new(FUNCTION_CACHE_BYTES));
        wc.enable_incremental_compilation(functions).map_err(HostError::Engine)?;
        let engine = Engine::new(&wc).map_err(HostError::Engine)?;

        let mut linker = Linker::<GuestState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(HostError::Engine)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(HostError::Engine)?;
        crate::kv::add_to_linker(&mut linker, |s: &mut GuestState| crate::kv::KvView {
            table: &mut s.table,
            backend: s.kv.as_ref(),
        })
        .map_err(HostError::Engine)?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (e, stop) = (engine.weak(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match e.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| HostError::Engine(wasmtime::Error::msg(e.to_string())))?;
        Ok(Host { engine, linker: Arc::new(linker), config, stop_ticker, own_addrs: Default::default() })
    }

    /// What compiled code must have been made for to run here: the
    /// engine's compatibility hash (wasmtime version, target, tunables).
    pub fn engine_key(&self) -> String {
        crate::cache::engine_key(&self.engine)
    }

    /// The compiled form of a component for this engine, from the cache
    /// or compiled now (and cached): what a control plane ships to regions
    /// so that a version is compiled once, not once per region.
    pub fn compile(&self, wasm: &[u8]) -> Result<Vec<u8>, HostError> {
        let path = crate::cache::path_for(&self.config.cache_dir, &self.engine, wasm);
        if let Ok(bytes) = std::fs::read(&path) {
            return Ok(bytes);
        }
        let bytes = self.engine.precompile_component(wasm).map_err(HostError::Compile)?;
        std::fs::create_dir_all(&self.config.cache_dir).map_err(|e| HostError::Engine(e.into()))?;
        meridian_core::fs::write_atomic(&path, &bytes).map_err(|e| HostError::Engine(e.into()))?;
        Ok(bytes)
    }

    /// Whether the cache holds compiled code for the component with this
    /// SHA-256, for this engine.
    pub fn has_artifact(&self, digest_hex: &str) -> bool {
        is_digest(digest_hex)
            && crate::cache::path_for_digest(&self.config.cache_dir, digest_hex, &self.engine_key()).is_file()
    }

    /// Takes compiled code made elsewhere into the cache, where the next
    /// install of that component finds it.
    ///
    /// The caller vouches for the artifact's producer: loading it later
    /// runs its machine code (see the SAFETY note in `cache.rs`). A region
    /// takes artifacts only signed by its control plane's certificate.
    pub fn accept_artifact(&self, digest_hex: &str, engine_key: &str, artifact: &[u8]) -> Result<(), ArtifactError> {
        if !is_digest(digest_hex) {
            return Err(ArtifactError::BadDigest);
        }
        let ours = self.engine_key();
        if engine_key != ours {
            return Err(ArtifactError::OtherEngine { theirs: engine_key.to_string(), ours });
        }
        let path = crate::cache::path_for_digest(&self.config.cache_dir, digest_hex, &ours);
        std::fs::create_dir_all(&self.config.cache_dir).map_err(ArtifactError::Io)?;
        meridian_core::fs::write_atomic(&path, artifact).map_err(ArtifactError::Io)
    }

    /// The node's own listeners, which guests may never reach whatever
    /// their manifest lists (applies to components prepared before, too).
    pub fn forbid_addrs(&self, addrs: Vec<std::net::SocketAddr>) {
        *self.own_addrs.write().unwrap() = addrs;
    }

    /// Compiles (or loads from the cache) and pre-instantiates a component.
    /// Slow on a cache miss; call it at install time, never per request.
    pub fn prepare(
        &self,
        wasm: &[u8],
        deadline: Duration,
        memory_mb: u64,
        env: Vec<(String, String)>,
    ) -> Result<Prepared, HostError> {
        self.prepare_with_egress(wasm, deadline, memory_mb, env, Vec::new())
    }

    /// [`Host::prepare`] for a component that may send HTTP requests to
    /// `allowed` hosts ([`crate::egress`]).
    pub fn prepare_with_egress(
        &self,
        wasm: &[u8],
        deadline: Duration,
        memory_mb: u64,
        env: Vec<(String, String)>,
        allowed: Vec<crate::egress::AllowedHost>,
    ) -> Result<Prepared, HostError> {
        if memory_mb > self.config.max_memory_mb {
            return Err(HostError::MemoryTooLarge { asked: memory_mb, max: self.config.max_memory_mb });
        }
        let (component, cached) =
            crate::cache::load_or_compile(&self.config.cache_dir, &self.engine, wasm).map_err(HostError::Compile)?;
        tracing::debug!(cached, bytes = wasm.len(), "component ready");
        let pre = self.linker.instantiate_pre(&component).map_err(HostError::Link)?;
        let pre = ProxyPre::new(pre).map_err(|e| {
            HostError::Link(e.context("it must export wasi:http/incoming-handler (the wasi:http/proxy world)"))
        })?;
        Ok(Prepared {
            inner: Arc::new(PreparedInner {
                pre,
                deadline,
                memory_bytes: (memory_mb as usize) << 20,
                env,
                egress: Arc::new(crate::egress::EgressPolicy {
                    allowed,
                    forbidden: self.own_addrs.clone(),
                    ..Default::default()
                }),
            }),
            was_cached: cached,
        })
    }
}

struct GuestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    kv: Option<Arc<dyn KvBackend>>,
    hooks: EgressHooks,
}

/// Sends a guest's outgoing requests under its component's egress policy.
struct EgressHooks(Arc<crate::egress::EgressPolicy>);

impl wasmtime_wasi_http::WasiHttpHooks for EgressHooks {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        drop(fut);
        let policy = self.0.clone();
        Box::new(async move {
            let resp = policy.send(request, options).await?;
            Ok((resp, Box::new(async { Ok(()) }) as Box<dyn std::future::Future<Output = _> + Send>))
        })
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}

struct MemoryLimiter {
    max_bytes: usize,
    fault: Arc<AtomicU8>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.fault.store(FAULT_MEMORY, Ordering::Relaxed);
            // An error (rather than `Ok(false)`) traps the guest at once:
            // a guest that ignores a failed allocation must not keep running.
            wasmtime::bail!("memory limit of {} MiB exceeded", self.max_bytes >> 20);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

struct PreparedInner {
    pre: ProxyPre<GuestState>,
    deadline: Duration,
    memory_bytes: usize,
    env: Vec<(String, String)>,
    egress: Arc<crate::egress::EgressPolicy>,
}

/// A compiled, linked component, ready to serve requests. Cheap to clone.
#[derive(Clone)]
pub struct Prepared {
    inner: Arc<PreparedInner>,
    /// Whether the compiled code came from the on-disk cache.
    pub was_cached: bool,
}

impl Prepared {
    pub fn deadline(&self) -> Duration {
        self.inner.deadline
    }

    /// Runs one request in a fresh instance. Never fails: guest faults
    /// become error responses, tagged with the [`Fault`] in the extensions.
    /// `kv` is what the guest's `wasi:keyvalue` calls reach (none: every
    /// bucket is unknown).
    pub async fn handle<B>(
        &self,
        req: hyper::Request<B>,
        kv: Option<Arc<dyn KvBackend>>,
    ) -> hyper::Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let start = Instant::now();
        let deadline = start + self.inner.deadline;
        let fault = Arc::new(AtomicU8::new(FAULT_NONE));
        let mut wasi = WasiCtx::builder();
        wasi.envs(&self.inner.env);
        let mut store = Store::new(
            self.inner.pre.engine(),
            GuestState {
                wasi: wasi.build(),
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                limiter: MemoryLimiter { max_bytes: self.inner.memory_bytes, fault: fault.clone() },
                kv,
                hooks: EgressHooks(self.inner.egress.clone()),
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        let f = fault.clone();
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                f.store(FAULT_DEADLINE, Ordering::Relaxed);
                Ok(UpdateDeadline::Interrupt)
            } else {
                // Let other requests run, then continue. `yield_now` puts
                // the task at the back of the run queue; wasmtime's own
                // `Yield` wakes it at once, and tokio's LIFO slot would run
                // the spinning guest again before anything else.
                Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
            }
        });

        let (tx, rx) = tokio::sync::oneshot::channel();
        let setup = (|| -> wasmtime::Result<_> {
            let req = store.data_mut().http().new_incoming_request(Scheme::Http, req)?;
            let out = store.data_mut().http().new_response_outparam(tx)?;
            Ok((req, out))
        })();
        let (req, out) = match setup {
            Ok(x) => x,
            Err(e) => {
                return error_response(500, Fault::Trap, format!("cannot pass the request to the function: {e:#}"))
            }
        };
        let pre = self.inner.pre.clone();
        let f = fault.clone();
        // The guest runs in its own task so it can keep streaming the body
        // after the response head is returned. The deadline covers that too:
        // at the deadline the task is dropped, whatever it is waiting on.
        let task = tokio::spawn(async move {
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy.wasi_http_incoming_handler().call_handle(&mut store, req, out).await
            };
            match tokio::time::timeout_at(deadline.into(), run).await {
                Ok(r) => r,
                Err(_) => {
                    f.store(FAULT_DEADLINE, Ordering::Relaxed);
                    Err(wasmtime::Error::msg("deadline exceeded"))
                }
            }
        });

        let limit_ms = self.inner.deadline.as_millis();
        match rx.await {
            Ok(Ok(resp)) => resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
            Ok(Err(code)) => error_response(500, Fault::Trap, format!("the function failed: {code:?}")),
            Err(_) => {
                // The guest dropped the response outparam: it trapped, hit a
                // limit, or returned without answering. The task says which.
                let err = match task.await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(e) => Some(e.to_string()),
                };
                match (fault.load(Ordering::Relaxed), err) {
                    (FAULT_DEADLINE, _) => error_response(
                        504,
                        Fault::Deadline,
                        format!("the function exceeded its deadline of {limit_ms} ms"),
                    ),
                    (FAULT_MEMORY, _) => error_response(
                        500,
                        Fault::Memory,
                        format!("the function exceeded its memory limit of {} MiB", self.inner.memory_bytes >> 20),
                    ),
                    (_, Some(e)) => error_response(500, Fault::Trap, format!("the function trapped: {e}")),
                    (_, None) => {
                        error_response(500, Fault::NoResponse, "the function returned without a response".into())
                    }
                }
            }
        }
    }
}

fn error_response(status: u16, fault: Fault, message: String) -> hyper::Response<ResponseBody> {
    tracing::info!(?fault, %message, "guest fault");
    let mut resp =
        hyper::Response::new(Full::new(Bytes::from(message + "\n")).map_err(|never| match never {}).boxed_unsync());
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp.extensions_mut().insert(fault);
    resp
}
