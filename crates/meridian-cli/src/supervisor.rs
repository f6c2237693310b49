//! The dev-world supervisor: owns the child processes of a local world and
//! the emulated links between them, and serves the chaos API.
//!
//! It is only a supervisor: every role runs in its own OS process from its own
//! config file, exactly as it would on a separate machine.

use anyhow::Context;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use meridian_core::world::{LinkInfo, ProcessInfo, WorldDescription};
use meridian_http::{has_bearer, json, text, unauthorized, Body};
use meridian_netem::{LinkState, Netem};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The addresses a role announced once it served.
#[derive(Clone, Copy, Debug, Default)]
pub struct Listeners {
    pub public: Option<std::net::SocketAddr>,
    pub cluster: Option<std::net::SocketAddr>,
    /// An edge's HTTPS port.
    pub https: Option<std::net::SocketAddr>,
}

pub struct Proc {
    pub role: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

pub struct Supervisor {
    pub dir: PathBuf,
    pub token: String,
    exe: PathBuf,
    pub world: Mutex<WorldDescription>,
    procs: Mutex<BTreeMap<String, Proc>>,
    pub netem: Netem,
}

impl Supervisor {
    pub fn new(dir: PathBuf, token: String, world: WorldDescription) -> anyhow::Result<Supervisor> {
        let exe = std::env::current_exe().context("cannot find the meridian executable")?;
        Ok(Supervisor {
            dir,
            token,
            exe,
            world: Mutex::new(world),
            procs: Mutex::new(BTreeMap::new()),
            netem: Netem::new(),
        })
    }

    pub fn add_process(&self, name: &str, role: &str, config: PathBuf) {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        self.procs.lock().unwrap().insert(name.to_string(), Proc { role: role.into(), config, log, child: None });
    }

    /// Starts (or restarts) a child by name and records its PID.
    pub fn start(&self, name: &str) -> anyhow::Result<u32> {
        let mut procs = self.procs.lock().unwrap();
        let p = procs.get_mut(name).with_context(|| format!("no process named {name:?}"))?;
        if let Some(mut c) = p.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&p.log)?;
        let ready = self.ready_file(name);
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(&self.exe);
        cmd.arg(&p.role)
            .arg("--config")
            .arg(&p.config)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe and touches no memory
        // shared with the parent. It makes the kernel SIGKILL the child when
        // the supervisor dies, so a crashed or killed `meridian dev` never
        // leaves orphaned regions behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        let pid = child.id();
        p.child = Some(child);
        drop(procs);
        self.set_pid(name, Some(pid));
        tracing::info!(%name, pid, "started");
        Ok(pid)
    }

    fn ready_file(&self, name: &str) -> PathBuf {
        self.dir.join("run").join(format!("{name}.addr"))
    }

    /// Waits until a started child serves, and returns the addresses it
    /// bound (`public` and/or `cluster`).
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> anyhow::Result<Listeners> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(s) = std::fs::read_to_string(self.ready_file(name)) {
                let mut l = Listeners::default();
                for line in s.lines() {
                    let (kind, addr) = line.split_once(' ').with_context(|| format!("{name} wrote {line:?}"))?;
                    let addr: std::net::SocketAddr =
                        addr.trim().parse().with_context(|| format!("{name} wrote a bad address {line:?}"))?;
                    match kind {
                        "public" => l.public = Some(addr),
                        "cluster" => l.cluster = Some(addr),
                        "https" => l.https = Some(addr),
                        // More addresses of the public port (an edge's own IP).
                        "also" => {}
                        _ => anyhow::bail!("{name} announced an unknown listener {kind:?}"),
                    }
                }
                let mut w = self.world.lock().unwrap();
                if let Some(p) = w.processes.iter_mut().find(|p| p.name == name) {
                    match (l.public, l.cluster) {
                        (Some(public), cluster) => {
                            p.listen = public.to_string();
                            p.cluster_listen = cluster.map(|c| c.to_string());
                        }
                        (None, Some(only)) => p.listen = only.to_string(),
                        (None, None) => {}
                    }
                }
                return Ok(l);
            }
            let exited = {
                let mut procs = self.procs.lock().unwrap();
                let p = procs.get_mut(name).with_context(|| format!("no process named {name:?}"))?;
                match &mut p.child {
                    Some(c) => c.try_wait()?.map(|s| (s, p.log.clone())),
                    None => anyhow::bail!("{name} is not running"),
                }
            };
            if let Some((status, log)) = exited {
                anyhow::bail!("{name} exited with {status} while starting; see {}", log.display());
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("{name} did not start serving within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILLs a child, as a machine or process crash would.
    pub fn kill(&self, name: &str) -> anyhow::Result<Option<u32>> {
        let mut procs = self.procs.lock().unwrap();
        let p = procs.get_mut(name).with_context(|| format!("no process named {name:?}"))?;
        let pid = match p.child.take() {
            Some(mut c) => {
                let pid = c.id();
                c.kill()?;
                c.wait()?;
                Some(pid)
            }
            None => None,
        };
        drop(procs);
        self.set_pid(name, None);
        tracing::info!(%name, ?pid, "killed");
        Ok(pid)
    }

    fn set_pid(&self, name: &str, pid: Option<u32>) {
        let mut w = self.world.lock().unwrap();
        if let Some(p) = w.processes.iter_mut().find(|p| p.name == name) {
            p.pid = pid;
        }
        if let Err(e) = w.write(&self.dir) {
            tracing::warn!(error = %e, "cannot update the world description");
        }
    }

    /// Notices children that died on their own, every half second.
    pub async fn watch_children(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut exited = Vec::new();
            for (name, p) in self.procs.lock().unwrap().iter_mut() {
                if let Some(c) = &mut p.child {
                    if let Ok(Some(status)) = c.try_wait() {
                        tracing::warn!(%name, %status, log = %p.log.display(), "process exited on its own");
                        p.child = None;
                        exited.push(name.clone());
                    }
                }
            }
            for name in exited {
                self.set_pid(&name, None);
            }
        }
    }

    /// Stops every child: SIGTERM, then SIGKILL after a grace period.
    pub fn stop_all(&self, grace: Duration) {
        let mut procs = self.procs.lock().unwrap();
        for p in procs.values_mut() {
            if let Some(c) = &p.child {
                // SAFETY: kill(2) with a PID we spawned and have not yet
                // reaped, so it cannot name an unrelated process.
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = std::time::Instant::now() + grace;
        for p in procs.values_mut() {
            if let Some(mut c) = p.child.take() {
                loop {
                    match c.try_wait() {
                        Ok(Some(_)) => break,
                        Ok(None) if std::time::Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        _ => {
                            let _ = c.kill();
                            let _ = c.wait();
                            break;
                        }
                    }
                }
            }
        }
    }

    /// The processes chaos may kill and restart: regions, control nodes and
    /// edges.
    fn chaos_targets(&self) -> Vec<String> {
        let procs = self.procs.lock().unwrap();
        procs
            .iter()
            .filter(|(_, p)| matches!(p.role.as_str(), "region" | "control" | "edge"))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if !has_bearer(&req, &self.token) {
            return unauthorized();
        }
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            (Method::GET, ["world"]) => json(StatusCode::OK, &*self.world.lock().unwrap()),
            (Method::GET, ["links"]) => json(StatusCode::OK, &self.netem.status()),
            (Method::POST, ["regions", name, action]) => {
                let targets = self.chaos_targets();
                if !targets.iter().any(|n| n == name) {
                    return text(
                        StatusCode::NOT_FOUND,
                        format!("no region, control node or edge named {name:?}; there are: {}", targets.join(", ")),
                    );
                }
                let r = match *action {
                    "kill" => self.kill(name).map(|pid| serde_json::json!({"region": name, "killed_pid": pid})),
                    "restart" => self.start(name).map(|pid| serde_json::json!({"region": name, "pid": pid})),
                    _ => return text(StatusCode::NOT_FOUND, "actions: kill, restart"),
                };
                match r {
                    Ok(v) => json(StatusCode::OK, &v),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
                }
            }
            (Method::POST, ["links", "set"]) => {
                let body = match meridian_http::read_body(req.into_body(), 4096).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                match serde_json::from_slice::<LinkChange>(&body) {
                    Ok(change) => match self.change_links(&change) {
                        Ok(names) => json(StatusCode::OK, &serde_json::json!({"links": names})),
                        Err(e) => text(StatusCode::NOT_FOUND, e),
                    },
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("malformed link change: {e}")),
                }
            }
            _ => text(StatusCode::NOT_FOUND, format!("no such API: {path}")),
        }
    }

    /// Applies a change to every link between `a` and `b` (both directions),
    /// or to every link touching `a` when `b` is absent.
    pub fn change_links(&self, c: &LinkChange) -> Result<Vec<String>, String> {
        let links: Vec<LinkInfo> = self.world.lock().unwrap().links.clone();
        let matches = |l: &LinkInfo| match &c.b {
            Some(b) => (l.from == c.a && &l.to == b) || (&l.from == b && l.to == c.a),
            None => l.from == c.a || l.to == c.a,
        };
        let mut changed = Vec::new();
        for l in links.iter().filter(|l| matches(l)) {
            let link = self.netem.get(&l.name).map_err(|e| e.to_string())?;
            if let Some(s) = c.state {
                link.set_state(s);
            }
            if let Some(ms) = c.one_way_delay_ms {
                if !(ms.is_finite() && ms >= 0.0) {
                    return Err(format!("one_way_delay_ms must be a non-negative number, got {ms}"));
                }
                link.set_delay(Duration::from_secs_f64(ms / 1000.0));
            }
            changed.push(l.name.clone());
        }
        if changed.is_empty() {
            return Err(format!("no link between {:?} and {:?}; `meridian chaos links` lists them", c.a, c.b));
        }
        // Keep the description's delays truthful.
        if let Some(ms) = c.one_way_delay_ms {
            let mut w = self.world.lock().unwrap();
            for l in w.links.iter_mut().filter(|l| changed.contains(&l.name)) {
                l.one_way_delay_ms = ms;
            }
            let _ = w.write(&self.dir);
        }
        tracing::info!(?changed, state = ?c.state, delay = ?c.one_way_delay_ms, "links changed");
        Ok(changed)
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkChange {
    pub a: String,
    #[serde(default)]
    pub b: Option<String>,
    #[serde(default)]
    pub state: Option<LinkState>,
    #[serde(default)]
    pub one_way_delay_ms: Option<f64>,
}

pub fn process_info(
    name: &str,
    role: &str,
    listen: String,
    config: Option<PathBuf>,
    log: Option<PathBuf>,
) -> ProcessInfo {
    ProcessInfo { role: role.into(), name: name.into(), pid: None, listen, cluster_listen: None, config, log }
}
