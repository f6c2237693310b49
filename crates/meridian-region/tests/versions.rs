//! A region installs versions ahead of time, keeps only what it needs in
//! memory, and comes back after a restart serving the same version without
//! compiling.

use bytes::Bytes;
use meridian_manifest::Bundle;
use meridian_region::{AppRecord, Region, RegionConfig};
use std::path::Path;

fn app(dir: &Path, page: &str) -> Bundle {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello");
    std::fs::create_dir_all(dir.join("components")).unwrap();
    std::fs::create_dir_all(dir.join("static")).unwrap();
    for f in ["meridian.toml", "components/hello.wasm", "components/kv.wasm", "static/style.css"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("static/index.html"), page).unwrap();
    Bundle::from_dir(dir).unwrap()
}

fn config(data: &Path) -> RegionConfig {
    let certs = data.join("certs");
    let ca = meridian_trust::ensure_ca(&certs, "test", 1).unwrap();
    let id = meridian_trust::Identity::new("test", meridian_trust::Role::Region, Some("eu")).unwrap();
    meridian_trust::issue(&ca, &id, &certs, 1).unwrap();
    RegionConfig {
        name: "test".into(),
        public_listen: "127.0.0.1:0".parse().unwrap(),
        cluster_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.join("region"),
        tls: meridian_trust::TlsFiles::in_dir(&certs, "test"),
        cluster_key_file: ca.cluster_key.clone(),
        max_instances: 20,
        max_instances_per_app: None,
        max_memory_mb: 128,
        pooling: Default::default(),
        max_bundle_mb: 64,
        peers: Vec::new(),
        anti_entropy_ms: 1000,
        causality_wait_ms: 100,
        rejoin_bound_ms: 60_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_switch_old_ones_leave_memory_and_a_restart_needs_no_compilation() {
    let tmp = tempfile::tempdir().unwrap();
    let bundles: Vec<Bundle> = (0..3).map(|i| app(&tmp.path().join(format!("app{i}")), &format!("v{i}"))).collect();
    {
        let region = Region::open(config(tmp.path())).await.unwrap();
        let record = AppRecord { name: "hello".into(), hosts: vec!["hello.test".into()], default: true };
        region.put_app(record).await.unwrap();
        let hello = region.app("hello").unwrap();
        assert!(hello.active().is_none());
        for b in &bundles {
            region.install(&hello, &b.id, Bytes::from(b.to_tar())).await.unwrap();
            region.activate(&hello, &b.id).unwrap();
            assert_eq!(hello.active().unwrap().id, b.id);
        }
        let status = region.status();
        let installed = &status.app("hello").unwrap().installed;
        assert_eq!(installed.len(), 2, "only the active and previous versions stay loaded");
        assert!(installed.contains(&bundles[1].id) && installed.contains(&bundles[2].id));
        // Activating something not installed is refused and changes nothing.
        assert!(region.activate(&hello, &bundles[0].id).is_err());
        assert_eq!(hello.active().unwrap().id, bundles[2].id);
        // A tar that does not hash to the id it was sent as is refused.
        let err = region.install(&hello, &bundles[0].id, Bytes::from(bundles[1].to_tar())).await.err().unwrap();
        assert!(err.to_string().contains("hashes to"), "{err}");
        // A bundle of another app is refused.
        region.put_app(AppRecord { name: "other".into(), hosts: vec![], default: false }).await.unwrap();
        let other = region.app("other").unwrap();
        let err = region.install(&other, &bundles[0].id, Bytes::from(bundles[0].to_tar())).await.err().unwrap();
        assert!(err.to_string().contains("is app \"hello\""), "{err}");
        // A rollout's split (a share of new clients on an installed version).
        let split = meridian_core::wire::Split { version: bundles[1].id.clone(), percent: 30 };
        hello.set_split(&split).unwrap();
        region.shutdown().await;
    }
    // Restart: the apps come back, the active version from disk, compiled
    // code from the cache.
    let region = Region::open(config(tmp.path())).await.unwrap();
    assert!(region.app("other").is_some());
    let active = region.app("hello").unwrap().active().expect("active version restored");
    assert_eq!(active.id, bundles[2].id);
    assert!(active.all_cached, "a restart recompiled the component");
    // ...and the split survived the restart.
    let status = region.status();
    let split = status.app("hello").unwrap().split.clone().expect("split restored");
    assert_eq!((split.version, split.percent), (bundles[1].id.clone(), 30));
}
