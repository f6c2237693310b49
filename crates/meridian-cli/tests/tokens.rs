//! Operator tokens are scoped to one app and one set of powers, stored only
//! hashed, and revocable; node certificates carry no deploy power at all.

mod support;
use support::*;

fn token_file(dir: &std::path::Path, name: &str, secret: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, secret).unwrap();
    p.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_deploy_only_their_app_and_die_when_revoked() {
    let w = World::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let app = example_app_copy();
    let app_dir = app.path().to_str().unwrap().to_string();
    let create = |app: &str, scopes: &[&str]| w.token(app, scopes);
    let deploy_hello = create("hello", &["deploy"]);
    let read_hello = create("hello", &["read"]);
    let deploy_other = create("shop", &["deploy", "read"]);

    // A read token cannot deploy; another app's token can neither deploy
    // nor read this one; the deploy token deploys.
    let f = token_file(tmp.path(), "read", &read_hello);
    let (ok, out) = w.cli(&["deploy", &app_dir, "--token-file", &f]);
    assert!(!ok && out.contains("403") && out.contains("may not deploy app \"hello\""), "{out}");
    let f = token_file(tmp.path(), "other", &deploy_other);
    let (ok, out) = w.cli(&["deploy", &app_dir, "--token-file", &f]);
    assert!(!ok && out.contains("403"), "{out}");
    let (_, out) = w.cli(&["status", "--token-file", &f]);
    assert!(!out.contains("app hello"), "another app's token read hello's status: {out}");
    let f = token_file(tmp.path(), "deploy", &deploy_hello);
    let (ok, out) = w.cli(&["deploy", &app_dir, "--token-file", &f]);
    assert!(ok, "{out}");
    // Tokens cannot make tokens.
    let (ok, out) = w.cli(&["tokens", "list", "--token-file", &f]);
    assert!(!ok && out.contains("403"), "{out}");

    // Only hashes are stored (replicated to every control node), in
    // private files.
    for secret in [&deploy_hello, &read_hello, &deploy_other] {
        let found = files_containing(&w.dir.path().join("data"), &secret.as_bytes()[13..]);
        assert!(found.is_empty(), "a token's secret is on disk: {found:?}");
    }
    for i in 1..=3 {
        let db = w.dir.path().join(format!("data/control-{i}/control.redb"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600, "{}", db.display());
    }
    // Revoked: refused at once.
    let (ok, list) = w.cli(&["tokens", "list"]);
    assert!(ok, "{list}");
    let id = deploy_hello.split('_').nth(1).unwrap();
    assert!(list.contains(id));
    let (ok, out) = w.cli(&["tokens", "revoke", id]);
    assert!(ok, "{out}");
    let (ok, out) = w.cli(&["deploy", &app_dir, "--token-file", &f]);
    assert!(!ok && out.contains("401"), "{out}");

    // A region's certificate is no credential for the control plane.
    assert_eq!(w.control_call_as("eu-west", http::Method::POST, "/v1/deploy").await, 401);
    // Only another control node speaks Raft to a control node or hands it
    // versions: not a region, not an operator, token or not.
    for who in ["eu-west", "operator"] {
        assert_eq!(w.control_call_as(who, http::Method::POST, "/v1/internal/raft/vote").await, 403, "{who}");
        let bundle = format!("/v1/internal/bundles/{}", "0".repeat(64));
        assert_eq!(w.control_call_as(who, http::Method::PUT, &bundle).await, 403, "{who}");
    }
    assert_eq!(w.control_call_as("control-2", http::Method::POST, "/v1/internal/raft/nonsense").await, 404);
}
