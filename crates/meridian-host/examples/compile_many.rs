//! Compiles components one after another as a control plane does, printing
//! each one's time: `cargo run --release -p meridian-host --example
//! compile_many -- a.wasm b.wasm ...` (a later component reuses the
//! functions an earlier one compiled).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile_dir()?;
    let host = meridian_host::Host::new(meridian_host::HostConfig {
        cache_dir: dir.clone(),
        max_instances: 1,
        max_memory_mb: 64,
        ..Default::default()
    })?;
    let all = std::time::Instant::now();
    for path in std::env::args().skip(1) {
        let wasm = std::fs::read(&path)?;
        let t = std::time::Instant::now();
        let out = host.compile(&wasm)?;
        println!("{path}: {} MiB -> {} MiB in {:.2} s", wasm.len() >> 20, out.len() >> 20, t.elapsed().as_secs_f64());
    }
    println!("all: {:.2} s", all.elapsed().as_secs_f64());
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("compile-many-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
