//! `meridian`: one binary for every role and for operating a world.
//!
//! The binary is thin: each verb lives in `commands/<verb>.rs` and calls into
//! the library crates.

/// `println!` for command output that ends the program quietly when stdout
/// is a closed pipe (`meridian status | head`) instead of panicking. SIGPIPE
/// stays ignored, as Rust sets it: the CLI also writes to sockets, and a
/// peer closing one must be an error, not a silent death.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// `print!` counterpart of [`out!`].
macro_rules! out_part {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if write!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

mod api;
mod commands;
mod contexts;
mod progress;
mod supervisor;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: the proxy and host paths
/// allocate small, short-lived buffers on every request, where glibc's
/// malloc showed up as ~15 % of the edge's CPU profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "meridian", version, about = "Run WebAssembly apps in many regions at once")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local multi-region world (regions, edges with caches and HTTPS, GeoDNS, a control plane of three nodes) and deploy the example apps (hello, notes) to it.
    Dev(commands::dev::Args),
    /// Ship an app directory as a new immutable version, rolled out region by region as its manifest says.
    Deploy(commands::deploy::Args),
    /// Show what a running world is doing.
    Status(commands::status::Args),
    /// Read and write key-value namespaces; see their replication.
    Kv(commands::kv::Args),
    /// Inject faults into a running dev world: kill regions, edges or control nodes, cut links, add latency.
    Chaos(commands::chaos::Args),
    /// Name a control plane and its credentials: add, use, list, remove.
    Context(commands::context::Args),
    /// Every change asked of the control plane: who, what, when, outcome.
    Audit(commands::audit::Args),
    /// Watch and steer a rollout: status, pause, resume, abort, approve.
    Rollout(commands::rollout::Args),
    /// An app's deployed versions, oldest first.
    Versions(commands::versions::VersionsArgs),
    /// Put an app back on an earlier version, in every region at once.
    Rollback(commands::versions::RollbackArgs),
    /// Make every edge forget an app's cached answers: by --path, --prefix, --tag or --all.
    Purge(commands::purge::Args),
    /// The world's apps: list, create (with hostnames), delete (with data).
    Apps(commands::apps::Args),
    /// Operator tokens scoped to one app: create, list, revoke.
    Tokens(commands::tokens::Args),
    /// The cluster's certificate authority and node certificates (name, role, jurisdiction).
    Certs(commands::certs::Args),
    /// Run a region node (functions, static assets, key-value data) from a config file.
    Region(commands::roles::Args),
    /// Run an edge (routing, cache, HTTPS) from a config file.
    Edge(commands::roles::Args),
    /// Run the GeoDNS server: answers apps' hostnames with the nearest healthy edge.
    Dns(commands::roles::Args),
    /// Run a control node (alone, or one of the control plane's [[members]]) from a config file.
    Control(commands::roles::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // MERIDIAN_WORKER_THREADS sizes the async runtime (default: one worker
    // per core).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("MERIDIAN_WORKER_THREADS").ok().and_then(|v| v.parse::<usize>().ok()) {
        builder.worker_threads(n.max(1));
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Dev(a) => commands::dev::run(a).await,
            Command::Deploy(a) => commands::deploy::run(a).await,
            Command::Status(a) => commands::status::run(a).await,
            Command::Chaos(a) => commands::chaos::run(a).await,
            Command::Kv(a) => commands::kv::run(a).await,
            Command::Certs(a) => commands::certs::run(a),
            Command::Context(a) => commands::context::run(a),
            Command::Apps(a) => commands::apps::run(a).await,
            Command::Versions(a) => commands::versions::versions(a).await,
            Command::Rollout(a) => commands::rollout::run(a).await,
            Command::Audit(a) => commands::audit::run(a).await,
            Command::Rollback(a) => commands::versions::rollback(a).await,
            Command::Tokens(a) => commands::tokens::run(a).await,
            Command::Purge(a) => commands::purge::run(a).await,
            Command::Region(a) => commands::roles::region(a).await,
            Command::Edge(a) => commands::roles::edge(a).await,
            Command::Control(a) => commands::roles::control(a).await,
            Command::Dns(a) => commands::roles::dns(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
