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
    let create = |app: &str, scopes: &[&str]| {
        let mut args = vec!["tokens", "create", "--app", app];
        for s in scopes {
            args.extend(["--scope", s]);
        }
        let (ok, out) = w.cli(&args);
        assert!(ok, "{out}");
        out.lines().find(|l| l.starts_with("mrd_")).unwrap().to_string()
    };
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

    // Only hashes are stored, in a private file.
    let stored = std::fs::read_to_string(w.dir.path().join("data/control/tokens.json")).unwrap();
    for secret in [&deploy_hello, &read_hello, &deploy_other] {
        assert!(!stored.contains(&secret[13..]), "a token's secret is on the control plane's disk");
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
}
