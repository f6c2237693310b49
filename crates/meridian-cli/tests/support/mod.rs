//! Test harness: starts a real `meridian dev` world (separate OS processes on
//! loopback, emulated links) in a temporary directory and drives it from
//! outside, the way a user or script would.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meridian_core::world::WorldDescription;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct World {
    pub dir: tempfile::TempDir,
    supervisor: Child,
    pub desc: WorldDescription,
    pub token: String,
}

pub fn meridian() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
}

impl World {
    /// Starts a world with free ports and fast health checks; waits until it
    /// reports ready (every edge sees every region healthy).
    pub fn start(extra: &[&str]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("supervisor.log")).unwrap();
        let supervisor = meridian()
            .args(["dev", "--port-base", "0", "--health-interval-ms", "100", "--world"])
            .arg(dir.path())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut w = World { dir, supervisor, desc: placeholder(), token: String::new() };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(d) = WorldDescription::read(w.dir.path()) {
                if d.ready {
                    w.token = d.token().unwrap();
                    w.desc = d;
                    return w;
                }
            }
            if let Ok(Some(status)) = w.supervisor.try_wait() {
                panic!("meridian dev exited with {status}:\n{}", w.log());
            }
            assert!(Instant::now() < deadline, "world not ready after 120 s:\n{}", w.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.path().join("supervisor.log")).unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("logs")) {
            for e in entries.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                s += &format!("\n--- {} (last lines) ---\n", e.path().display());
                for l in tail.into_iter().rev() {
                    s += l;
                    s.push('\n');
                }
            }
        }
        s
    }

    pub fn edge(&self, name: &str) -> String {
        self.desc.edges.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("no edge {name}")).url.clone()
    }

    pub fn region_url(&self, name: &str) -> String {
        self.desc.regions.iter().find(|r| r.name == name).unwrap().url.clone()
    }

    pub fn region_cluster_url(&self, name: &str) -> String {
        self.desc.regions.iter().find(|r| r.name == name).unwrap().cluster_url.clone()
    }

    /// A client holding the certificate `meridian dev` issued to `name`
    /// (`operator`, `control`, a region or an edge).
    pub fn client_as(&self, name: &str) -> meridian_http::cluster::ClusterClient {
        let files = meridian_trust::TlsFiles::in_dir(&self.dir.path().join("certs"), name);
        let tls = meridian_trust::Tls::load(files).unwrap_or_else(|e| panic!("certificate of {name}: {e}"));
        meridian_http::cluster::ClusterClient::new(tls, Duration::from_secs(5))
    }

    /// Calls a region's cluster port with the certificate of `as_name`.
    pub async fn region_call_as(
        &self,
        as_name: &str,
        region: &str,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, String), meridian_http::cluster::CallError> {
        let r = self.desc.regions.iter().find(|r| r.name == region).unwrap();
        let target = meridian_http::cluster::Target::from_url(
            &r.cluster_url,
            meridian_trust::Expect::region(&r.name, &r.jurisdiction),
        )?;
        let a = self
            .client_as(as_name)
            .call(&target, method.parse().unwrap(), path, Bytes::from(body), Duration::from_secs(30))
            .await?;
        Ok((a.status.as_u16(), String::from_utf8_lossy(&a.body).into_owned()))
    }

    /// An edge's status (health of every region), from its cluster port.
    pub async fn edge_status(&self, edge: &str) -> serde_json::Value {
        let e = self.desc.edges.iter().find(|e| e.name == edge).unwrap();
        let target = meridian_http::cluster::Target::from_url(
            &e.cluster_url,
            meridian_trust::Expect::new(&e.name, meridian_trust::Role::Edge),
        )
        .unwrap();
        let a = self
            .client_as("operator")
            .call(&target, http::Method::GET, "/_meridian/edge", Bytes::new(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        serde_json::from_slice(&a.body).unwrap()
    }

    /// Calls the control plane's API with the certificate of `as_name` and
    /// no token; the status.
    pub async fn control_call_as(&self, as_name: &str, method: http::Method, path: &str) -> u16 {
        let control = meridian_http::cluster::Target::from_url(
            self.desc.control_url.split(',').next().unwrap(),
            meridian_trust::Expect::service(meridian_trust::Role::Control),
        )
        .unwrap();
        let a = self.client_as(as_name).call(&control, method, path, "x".into(), Duration::from_secs(5)).await.unwrap();
        a.status.as_u16()
    }

    /// Calls a region's cluster port as the operator.
    pub async fn region_call(&self, region: &str, method: &str, path: &str, body: Vec<u8>) -> (u16, String) {
        self.region_call_as("operator", region, method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} on {region}: {e}"))
    }

    /// Runs `meridian <args> --world <dir>` and returns (success, stdout+stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = meridian().args(args).arg("--world").arg(self.dir.path()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// Creates the app `dir` declares (as the world's default app, so bare
    /// addresses reach it, if `default`) and deploys it.
    pub fn create_and_deploy(&self, dir: &std::path::Path, default: bool) -> (bool, String) {
        let name = meridian_manifest::Bundle::from_dir(dir).unwrap().manifest.name;
        let mut args = vec!["apps", "create", name.as_str()];
        if default {
            args.push("--default");
        }
        let (ok, out) = self.cli(&args);
        if !ok {
            return (ok, out);
        }
        self.cli(&["deploy", dir.to_str().unwrap()])
    }

    /// A new operator token for `app` with `scopes` (`deploy`, `read`,
    /// `data-admin`), made with the administrator's; its secret.
    pub fn token(&self, app: &str, scopes: &[&str]) -> String {
        let mut args = vec!["tokens", "create", "--app", app];
        for s in scopes {
            args.extend(["--scope", s]);
        }
        let (ok, out) = self.cli(&args);
        assert!(ok, "{out}");
        out.lines().find(|l| l.starts_with("mrd_")).unwrap().to_string()
    }

    pub fn chaos(&self, args: &[&str]) {
        let mut a = vec!["chaos"];
        a.extend_from_slice(args);
        let (ok, out) = self.cli(&a);
        assert!(ok, "meridian chaos {args:?} failed: {out}");
    }

    /// Sends SIGINT (Ctrl-C) to the supervisor and waits for it to exit.
    pub fn interrupt(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.supervisor.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.supervisor.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid_of(&self, name: &str) -> Option<u32> {
        WorldDescription::read(self.dir.path()).unwrap().processes.iter().find(|p| p.name == name).and_then(|p| p.pid)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // SIGTERM lets the supervisor stop its children; SIGKILL if it hangs.
        // Children also die with the supervisor (PR_SET_PDEATHSIG).
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.supervisor.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.supervisor.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
    }
}

fn placeholder() -> WorldDescription {
    WorldDescription {
        format: 0,
        ready: false,
        dir: Default::default(),
        token_file: Default::default(),
        operator: Default::default(),
        control_url: String::new(),
        supervisor_url: String::new(),
        processes: vec![],
        edges: vec![],
        regions: vec![],
        links: vec![],
        dns: None,
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
    /// The body's bytes, as they came (`body` is them read as UTF-8).
    pub raw: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> String {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
    }
    pub fn region(&self) -> String {
        self.header("x-meridian-region")
    }
}

/// `host:port` of a URL.
pub fn addr_of(url: &str) -> String {
    url.split("://").nth(1).unwrap().trim_end_matches('/').to_string()
}

pub type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new())
}

pub async fn request(
    c: &Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Resp, String> {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), c.request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        raw: body,
    })
}

pub async fn get(c: &Client, url: &str, headers: &[(&str, &str)]) -> Resp {
    request(c, "GET", url, headers, "").await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// An app of one component, the committed guest `guests/<guest>`, as
/// `c/<guest>`, with `manifest` as its meridian.toml.
pub fn single_component_app(guest: &str, manifest: &str) -> tempfile::TempDir {
    let app = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(app.path().join("c")).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests").join(guest);
    std::fs::copy(src, app.path().join("c").join(guest)).unwrap();
    std::fs::write(app.path().join("meridian.toml"), manifest).unwrap();
    app
}

/// Copies the example app into a fresh directory, to modify and deploy.
pub fn example_app_copy() -> tempfile::TempDir {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello");
    let dst = tempfile::tempdir().unwrap();
    copy_dir(&src, dst.path());
    dst
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// Every file under `dir` that contains `needle`.
pub fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_containing(&p, needle));
        } else if let Ok(bytes) = std::fs::read(&p) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                out.push(p);
            }
        }
    }
    out
}
