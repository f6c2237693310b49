//! A rollout: how a version that every reachable region has installed
//! reaches their users, region by region, as the manifest's `[rollout]`
//! plan says.
//!
//! Waves of regions run one after another (the default plan: the world's
//! first region alone — the canary —, then all the others at once). In a
//! region, the new version first answers the manifest's smoke tests, asked
//! with the version-override header so no user sees it; then takes each
//! traffic step (a split of new clients, each kept on its version by a
//! cookie) for `bake_ms`, after which its gate compares it with the old
//! version in the same region and the same window: the share of 5xx
//! answers and the p99. A failed smoke test or gate stops the rollout and
//! rolls back every region it touched (ends the split; a region already
//! switched goes back to the old version); regions of later waves never
//! ran the new version.

use crate::consensus::{self, Consensus};
use crate::{Control, ControlRegion, RegionCall};
use bytes::Bytes;
use http::Method;
use meridian_core::stats::StatsSnapshot;
use meridian_core::wire::Split;
use meridian_core::{headers, VersionId};
use meridian_manifest::{RollbackScope, Rollout, SmokeTest};
use std::sync::Arc;
use std::time::Duration;

/// One thing the rollout did in one region.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepOutcome {
    pub region: String,
    /// `smoke`, `10%`, …, `100%`, or `rollback`.
    pub step: String,
    pub ok: bool,
    pub detail: String,
    /// When it ended, in ms since the rollout began.
    #[serde(default)]
    pub at_ms: u64,
}

/// What an operator asked of a running rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    Run,
    Pause,
    Abort,
}

/// A rollout as the replicated control state keeps it: its plan, where it
/// is, and how operators steer it. Whichever control node leads runs it
/// from here, so a rollout outlives the node that started it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RolloutRecord {
    pub app: String,
    pub version: VersionId,
    pub old: Option<VersionId>,
    /// `running`, `paused`, `awaiting approval`, `rolling back`, then
    /// `succeeded`, `rolled back` or `aborted and rolled back`.
    pub state: String,
    /// The operators' last word (pause / resume / abort).
    pub command: Command,
    /// Approvals given (a wave after the first, under `manual_approval`,
    /// waits until there are as many as waves before it).
    pub approvals: u64,
    /// Every step done so far, in order.
    pub steps: Vec<StepOutcome>,
    /// Waves by region name (regions that installed the version).
    pub waves: Vec<Vec<String>>,
    pub rollout: Rollout,
    pub smoke: Vec<SmokeTest>,
    /// Every region at install: whether it installed the version, and what
    /// it said.
    pub installs: Vec<(String, bool, String)>,
    /// Wall-clock ms when it began.
    pub started_ms: u64,
    /// Why it stopped, once it has.
    pub stopped: Option<Stopped>,
    /// Who asked for it: `admin` or `token <id>`.
    pub by: String,
}

/// Whether a rollout in this state has ended.
pub fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "rolled back" | "aborted and rolled back")
}

impl RolloutRecord {
    pub fn finished(&self) -> bool {
        is_final(&self.state)
    }

    pub fn status(&self) -> RolloutStatus {
        RolloutStatus {
            app: self.app.clone(),
            version: self.version.clone(),
            old: self.old.clone(),
            state: self.state.clone(),
            steps: self.steps.clone(),
        }
    }

    /// Whether `region` did `step` since it was last rolled back (a
    /// region rolled back and then resumed starts over).
    fn done(&self, region: &str, step: &str) -> bool {
        let mine: Vec<&StepOutcome> = self.steps.iter().filter(|s| s.region == region).collect();
        let since = mine.iter().rposition(|s| s.step == "rollback").map(|i| i + 1).unwrap_or(0);
        mine[since..].iter().any(|s| s.step == step && s.ok)
    }

    /// Whether the last thing done in `region` was rolling it back.
    fn rolled_back(&self, region: &str) -> bool {
        self.steps.iter().rev().find(|s| s.region == region).is_some_and(|s| s.step == "rollback" && s.ok)
    }
}

/// `GET /v1/apps/<app>/rollout`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RolloutStatus {
    pub app: String,
    pub version: VersionId,
    pub old: Option<VersionId>,
    pub state: String,
    pub steps: Vec<StepOutcome>,
}

/// Why a rollout stopped.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Stopped {
    pub region: String,
    pub step: String,
    pub reason: String,
    /// The wave it stopped in: it and the waves before it are rolled back.
    pub wave: usize,
}

/// Why a rollout did not finish here.
#[derive(Debug)]
pub enum Halted {
    /// A step failed, or an operator aborted: rolled back.
    Stopped(Stopped),
    /// This node no longer leads the control plane; the leader continues
    /// the rollout from its recorded progress. Nothing was undone.
    Deposed(String),
}

/// Why a rollout cannot go on to its next step.
enum Halt {
    Aborted,
    Deposed(String),
}

/// A rollout this control node is running: reports each step to the
/// replicated record before going on, and reads operators' steering from
/// it.
pub struct RolloutCtl {
    pub app: String,
    pub version: VersionId,
    pub old: Option<VersionId>,
    consensus: Arc<Consensus>,
    record: tokio::sync::Mutex<RolloutRecord>,
}

impl RolloutCtl {
    pub fn new(consensus: Arc<Consensus>, record: RolloutRecord) -> RolloutCtl {
        RolloutCtl {
            app: record.app.clone(),
            version: record.version.clone(),
            old: record.old.clone(),
            consensus,
            record: tokio::sync::Mutex::new(record),
        }
    }

    pub async fn record(&self) -> RolloutRecord {
        self.record.lock().await.clone()
    }

    /// Changes the record and makes the change durable on a majority;
    /// `Deposed` if this node no longer leads.
    async fn change(&self, f: impl FnOnce(&mut RolloutRecord)) -> Result<(), Halt> {
        let mut r = self.record.lock().await;
        let mut next = r.clone();
        f(&mut next);
        self.consensus
            .propose(consensus::Command::Rollout { record: Box::new(next.clone()) })
            .await
            .map_err(|e| Halt::Deposed(e.to_string()))?;
        *r = next;
        Ok(())
    }

    async fn push(&self, step: StepOutcome) -> Result<(), Halt> {
        self.change(|r| r.steps.push(step)).await
    }

    async fn set_state(&self, s: &str) -> Result<(), Halt> {
        if self.record.lock().await.state == s {
            return Ok(());
        }
        self.change(|r| r.state = s.to_string()).await
    }

    async fn done(&self, region: &str, step: &str) -> bool {
        self.record.lock().await.done(region, step)
    }

    async fn rolled_back(&self, region: &str) -> bool {
        self.record.lock().await.rolled_back(region)
    }

    /// Pauses the rollout as an operator would (they resume or abort it),
    /// unless an operator already aborted it.
    async fn pause(&self) -> Result<(), Halt> {
        let steer = consensus::Command::Steer {
            app: self.app.clone(),
            command: Some(Command::Pause),
            approve: false,
            unless_aborted: true,
        };
        self.consensus.propose(steer).await.map(|_| ()).map_err(|e| Halt::Deposed(e.to_string()))
    }

    /// The operators' steering, from the replicated state.
    fn steering(&self) -> (Command, u64) {
        self.consensus
            .read(|m| m.rollouts.get(&self.app).filter(|r| r.version == self.version).map(|r| (r.command, r.approvals)))
            .unwrap_or((Command::Run, 0))
    }

    fn still_leading(&self) -> Result<(), Halt> {
        if self.consensus.is_leader() {
            Ok(())
        } else {
            Err(Halt::Deposed("this control node no longer leads".into()))
        }
    }

    /// Between steps: waits while paused; `Aborted` once aborted.
    async fn checkpoint(&self) -> Result<(), Halt> {
        let mut changes = self.consensus.changes();
        loop {
            self.still_leading()?;
            match self.steering().0 {
                Command::Run => return self.set_state("running").await,
                Command::Abort => return Err(Halt::Aborted),
                Command::Pause => {
                    // A halt says why; a plain pause is a pause.
                    if !self.record.lock().await.state.starts_with("halted") {
                        self.set_state("paused").await?;
                    }
                    // Applies tick it; the timeout notices a lost lead.
                    let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
                }
            }
        }
    }

    /// Before wave `wave` (> 0) of a plan with manual approval: waits for
    /// the `wave`-th approval (or an abort).
    async fn await_approval(&self, wave: usize) -> Result<(), Halt> {
        let mut changes = self.consensus.changes();
        loop {
            self.still_leading()?;
            let (command, approvals) = self.steering();
            if command == Command::Abort {
                return Err(Halt::Aborted);
            }
            if approvals >= wave as u64 {
                return self.checkpoint().await;
            }
            self.set_state("awaiting approval").await?;
            let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
        }
    }
}

pub(crate) struct Plan<'a> {
    pub ctl: &'a RolloutCtl,
    pub record: &'a RolloutRecord,
}

impl Plan<'_> {
    fn app(&self) -> &str {
        &self.record.app
    }
}

impl Control {
    /// The plan's waves over this world's regions: the manifest's waves in
    /// order (names this world lacks are refused before anything starts),
    /// then any region no wave names, as a last wave.
    pub(crate) fn waves(&self, rollout: &Rollout) -> Result<Vec<Vec<&ControlRegion>>, String> {
        let regions = &self.config.regions;
        if rollout.waves.is_empty() {
            let (first, rest) = regions.split_first().ok_or("the control plane has no regions")?;
            let mut waves = vec![vec![first]];
            if !rest.is_empty() {
                waves.push(rest.iter().collect());
            }
            return Ok(waves);
        }
        let mut waves = Vec::new();
        for w in &rollout.waves {
            let mut wave = Vec::new();
            for name in w {
                let r = regions
                    .iter()
                    .find(|r| &r.name == name)
                    .ok_or_else(|| format!("[rollout] waves name region {name:?}, which this world does not have"))?;
                wave.push(r);
            }
            waves.push(wave);
        }
        let rest: Vec<&ControlRegion> =
            regions.iter().filter(|r| !rollout.waves.iter().flatten().any(|n| n == &r.name)).collect();
        if !rest.is_empty() {
            waves.push(rest);
        }
        Ok(waves)
    }

    /// Runs the plan from where its record says it is (regions that could
    /// not install the version are left to the reconcile loop). On a
    /// failure, rolls back every region of this wave and the ones before,
    /// and says why.
    pub(crate) async fn run_rollout(&self, plan: &Plan<'_>) -> Result<(), Halted> {
        let region = |n: &String| self.config.regions.iter().find(|r| &r.name == n);
        let waves: Vec<Vec<&ControlRegion>> =
            plan.record.waves.iter().map(|w| w.iter().filter_map(region).collect()).collect();
        // Picked up by a new leader while rolling back: finish that.
        if let Some(stopped) = plan.record.stopped.clone() {
            return self.roll_back_all(plan, &waves, stopped).await;
        }
        let last = plan.record.rollout.steps.last().map(|p| format!("{p}%")).unwrap_or_default();
        let mut i = 0;
        while let Some(wave) = waves.get(i) {
            let mut pending = Vec::new();
            for r in wave {
                if !plan.ctl.done(&r.name, &last).await {
                    pending.push(*r);
                }
            }
            if pending.is_empty() {
                i += 1;
                continue;
            }
            let go = if i > 0 && plan.record.rollout.manual_approval {
                plan.ctl.await_approval(i).await
            } else {
                plan.ctl.checkpoint().await
            };
            let mut failure = match go {
                Ok(()) => None,
                Err(Halt::Deposed(e)) => return Err(Halted::Deposed(e)),
                Err(Halt::Aborted) => Some(Stopped {
                    region: pending[0].name.clone(),
                    step: "start".into(),
                    reason: "aborted by an operator".into(),
                    wave: i,
                }),
            };
            if failure.is_none() {
                // The regions of a wave in parallel; the wave fails if one does.
                let results = futures::future::join_all(pending.iter().map(|r| self.roll_region(plan, r, i))).await;
                for result in results {
                    match result {
                        Ok(()) => {}
                        Err(Halted::Deposed(e)) => return Err(Halted::Deposed(e)),
                        Err(Halted::Stopped(s)) => {
                            failure.get_or_insert(s);
                        }
                    }
                }
            }
            if let Some(stopped) = failure {
                let aborted = stopped.reason.starts_with("aborted");
                if plan.record.rollout.rollback == RollbackScope::Region && !aborted {
                    // Only the failed region goes back; on `resume` this
                    // wave runs again (that region from its first step).
                    self.halt(plan, &waves, stopped).await?;
                    continue;
                }
                return self.roll_back_all(plan, &waves, stopped).await;
            }
            i += 1;
        }
        Ok(())
    }

    /// `rollback = "region"`: rolls back the region that failed, halts the
    /// rollout there (the regions already switched keep the new version)
    /// and waits for an operator: `Ok` once resumed; on `abort`, every
    /// region goes back.
    async fn halt(&self, plan: &Plan<'_>, waves: &[Vec<&ControlRegion>], stopped: Stopped) -> Result<(), Halted> {
        let deposed = |h: Halt| match h {
            Halt::Deposed(e) => Halted::Deposed(e),
            Halt::Aborted => Halted::Deposed("aborted while halting".into()),
        };
        let why = format!("halted: {} {}: {}", stopped.region, stopped.step, stopped.reason);
        plan.ctl.set_state(&why).await.map_err(deposed)?;
        if let Some(r) = self.config.regions.iter().find(|r| r.name == stopped.region) {
            let (ok, detail) = match self.roll_back(plan, r).await {
                Ok(d) => (true, format!("{d}; halted: `meridian rollout resume` retries it, `abort` rolls back all")),
                Err(e) => (false, format!("{e} (the reconcile loop will finish it)")),
            };
            plan.ctl.push(step(plan, r, "rollback", ok, detail)).await.map_err(deposed)?;
        }
        plan.ctl.pause().await.map_err(deposed)?;
        match plan.ctl.checkpoint().await {
            Ok(()) => Ok(()),
            Err(Halt::Deposed(e)) => Err(Halted::Deposed(e)),
            Err(Halt::Aborted) => {
                let stopped = Stopped { reason: format!("aborted by an operator after {why}"), ..stopped };
                self.roll_back_all(plan, waves, stopped).await
            }
        }
    }

    /// Records why the rollout stopped (before touching any region), then
    /// rolls back every region of the waves up to the one it stopped in.
    async fn roll_back_all(
        &self,
        plan: &Plan<'_>,
        waves: &[Vec<&ControlRegion>],
        stopped: Stopped,
    ) -> Result<(), Halted> {
        let deposed = |h: Halt| match h {
            Halt::Deposed(e) => Halted::Deposed(e),
            Halt::Aborted => Halted::Deposed("aborted while rolling back".into()),
        };
        let s = stopped.clone();
        plan.ctl
            .change(|r| {
                r.state = "rolling back".into();
                r.stopped = Some(s);
            })
            .await
            .map_err(deposed)?;
        for r in waves.iter().take(stopped.wave + 1).flatten() {
            if plan.ctl.rolled_back(&r.name).await {
                continue;
            }
            let (ok, detail) = match self.roll_back(plan, r).await {
                Ok(d) => (true, d),
                Err(e) => (false, format!("{e} (the reconcile loop will finish it)")),
            };
            plan.ctl.push(step(plan, r, "rollback", ok, detail)).await.map_err(deposed)?;
        }
        Err(Halted::Stopped(stopped))
    }

    /// Smoke tests, then every traffic step with its gate, in one region
    /// (skipping what the record says is done).
    async fn roll_region(&self, plan: &Plan<'_>, r: &ControlRegion, wave: usize) -> Result<(), Halted> {
        let log = plan.ctl;
        let stop = |step: &str, reason: String| {
            Halted::Stopped(Stopped { region: r.name.clone(), step: step.into(), reason, wave })
        };
        let deposed = |h: Halt| match h {
            Halt::Deposed(e) => Halted::Deposed(e),
            Halt::Aborted => stop("start", "aborted by an operator".into()),
        };
        if !plan.record.smoke.is_empty() && !log.done(&r.name, "smoke").await {
            match self.smoke(plan, r).await {
                Ok(n) => log.push(step(plan, r, "smoke", true, format!("{n} passed"))).await.map_err(deposed)?,
                Err(e) => {
                    log.push(step(plan, r, "smoke", false, e.clone())).await.map_err(deposed)?;
                    return Err(stop("smoke", e));
                }
            }
        }
        let rollout = &plan.record.rollout;
        for &percent in &rollout.steps {
            let name = format!("{percent}%");
            if log.done(&r.name, &name).await {
                continue;
            }
            match log.checkpoint().await {
                Ok(()) => {}
                Err(Halt::Deposed(e)) => return Err(Halted::Deposed(e)),
                Err(Halt::Aborted) => {
                    log.push(step(plan, r, &name, false, "aborted by an operator".into())).await.map_err(deposed)?;
                    return Err(stop(&name, "aborted by an operator".into()));
                }
            }
            let mut set = self.set_traffic(plan, r, percent).await;
            if matches!(&set, RegionCall::Refused(e) if e.contains("not installed")) {
                // The region dropped it (a restart, a rollback): install it
                // again (its compiled code is still there) and retry.
                set = match self.reinstall(plan, r).await {
                    Ok(()) => self.set_traffic(plan, r, percent).await,
                    Err(e) => RegionCall::Refused(e),
                };
            }
            if let RegionCall::Refused(e) | RegionCall::Unreachable(e) = set {
                log.push(step(plan, r, &name, false, e.clone())).await.map_err(deposed)?;
                return Err(stop(&name, format!("cannot switch: {e}")));
            }
            // The last step is the switch itself: judged before it (as the
            // previous step), not after it.
            if rollout.bake_ms == 0 || percent >= 100 || plan.record.old.is_none() {
                log.push(step(plan, r, &name, true, String::new())).await.map_err(deposed)?;
                continue;
            }
            let before = self.stats(r, plan.app()).await;
            tokio::time::sleep(Duration::from_millis(rollout.bake_ms)).await;
            let after = self.stats(r, plan.app()).await;
            let (old, new) = (plan.record.old.as_ref(), &plan.record.version);
            match gate(rollout, old, new, before.as_deref(), after.as_deref()) {
                Ok(detail) => log.push(step(plan, r, &name, true, detail)).await.map_err(deposed)?,
                Err(reason) => {
                    log.push(step(plan, r, &name, false, reason.clone())).await.map_err(deposed)?;
                    return Err(stop(&name, format!("gate: {reason}")));
                }
            }
        }
        Ok(())
    }

    /// Sends `percent` of a region's new clients to the new version (at
    /// 100: makes it the active one).
    async fn set_traffic(&self, plan: &Plan<'_>, r: &ControlRegion, percent: u8) -> RegionCall {
        let new = &plan.record.version;
        if percent >= 100 {
            let path = format!("apps/{}/active", plan.app());
            self.call(r, Method::PUT, &path, Bytes::from(new.to_string()), Duration::from_secs(10)).await
        } else {
            let split = Split { version: new.clone(), percent };
            let body = Bytes::from(serde_json::to_vec(&split).unwrap_or_default());
            self.call(r, Method::PUT, &format!("apps/{}/split", plan.app()), body, Duration::from_secs(10)).await
        }
    }

    async fn reinstall(&self, plan: &Plan<'_>, r: &ControlRegion) -> Result<(), String> {
        let id = &plan.record.version;
        let tar = self.bundle(id).await?;
        let path = format!("apps/{}/versions/{id}", plan.app());
        match self.call(r, Method::PUT, &path, tar, Duration::from_secs(300)).await {
            RegionCall::Ok(_) => Ok(()),
            RegionCall::Refused(e) | RegionCall::Unreachable(e) => Err(format!("cannot install it again: {e}")),
        }
    }

    async fn stats(&self, r: &ControlRegion, app: &str) -> Option<Vec<StatsSnapshot>> {
        match self.call(r, Method::GET, &format!("apps/{app}/stats"), Bytes::new(), Duration::from_secs(5)).await {
            RegionCall::Ok(b) => serde_json::from_str(&b).ok(),
            _ => None,
        }
    }

    /// Every smoke test against the new version in one region; how many.
    async fn smoke(&self, plan: &Plan<'_>, r: &ControlRegion) -> Result<usize, String> {
        let target = r.target().map_err(|e| e.to_string())?;
        let new = plan.record.version.to_string();
        for t in &plan.record.smoke {
            let what = format!("{} {}", t.method, t.path);
            // The manifest parser refuses these; a version stored before it
            // did is held to the same rule here (and the region refuses a
            // reserved path on app traffic whatever sends it).
            if headers::is_reserved_path(&t.path) {
                return Err(format!("{what}: the path is reserved for the platform; smoke tests ask the app's routes"));
            }
            if let Some((k, _)) = t.headers.iter().find(|(k, _)| headers::is_platform_header(k)) {
                return Err(format!("{what}: header {k} is the platform's to set, not a smoke test's"));
            }
            let method = Method::from_bytes(t.method.as_bytes()).map_err(|e| e.to_string())?;
            let mut hs: Vec<(&str, &str)> = vec![(headers::APP, plan.app()), (headers::VERSION_OVERRIDE, &new)];
            hs.extend(t.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let a = self
                .client
                .call_with(&target, method, &t.path, &hs, Bytes::from(t.body.clone()), Duration::from_secs(30))
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            let body = a.text();
            if a.status.as_u16() != t.status {
                return Err(format!("{what}: expected {}, got {}: {}", t.status, a.status, snippet(&body)));
            }
            if let Some(want) = &t.body_contains {
                if !body.contains(want.as_str()) {
                    return Err(format!("{what}: the body does not contain {want:?}: {}", snippet(&body)));
                }
            }
        }
        Ok(plan.record.smoke.len())
    }

    /// Undoes what a rollout did in one region: no split, the old version
    /// active (or none, if this was the app's first version).
    async fn roll_back(&self, plan: &Plan<'_>, r: &ControlRegion) -> Result<String, String> {
        let app = plan.app();
        if let RegionCall::Refused(e) | RegionCall::Unreachable(e) =
            self.call(r, Method::DELETE, &format!("apps/{app}/split"), Bytes::new(), Duration::from_secs(10)).await
        {
            return Err(e);
        }
        let path = format!("apps/{app}/active");
        let (call, detail) = match &plan.record.old {
            Some(old) => (
                self.call(r, Method::PUT, &path, Bytes::from(old.to_string()), Duration::from_secs(10)).await,
                format!("back on {}", old.short()),
            ),
            None => (
                self.call(r, Method::DELETE, &path, Bytes::new(), Duration::from_secs(10)).await,
                "no version (it was the first)".to_string(),
            ),
        };
        match call {
            RegionCall::Ok(_) => Ok(detail),
            RegionCall::Refused(e) | RegionCall::Unreachable(e) => Err(e),
        }
    }
}

/// Judges one baked step from the region's counters before and after: the
/// new version against the old one over the same window.
fn gate(
    rollout: &Rollout,
    old: Option<&VersionId>,
    new: &VersionId,
    before: Option<&[StatsSnapshot]>,
    after: Option<&[StatsSnapshot]>,
) -> Result<String, String> {
    let after = after.ok_or("the region's counters could not be read")?;
    let window = |v: &VersionId| {
        let now = after.iter().find(|s| &s.version == v)?;
        Some(now.since(before.and_then(|b| b.iter().find(|s| &s.version == v))))
    };
    let new = window(new).ok_or("the new version reported no counters")?;
    if new.requests < rollout.min_requests {
        return Ok(format!("inconclusive: {} requests (fewer than {})", new.requests, rollout.min_requests));
    }
    let old = old.and_then(window).filter(|o| o.requests > 0);
    let old_rate = old.as_ref().map(StatsSnapshot::error_rate).unwrap_or(0.0);
    let limit = old_rate + rollout.max_error_percent as f64 / 100.0;
    if new.error_rate() > limit {
        return Err(format!(
            "5xx on {:.1}% of {} requests to the new version vs {:.1}% on the old one (allowed: +{} points)",
            new.error_rate() * 100.0,
            new.requests,
            old_rate * 100.0,
            rollout.max_error_percent
        ));
    }
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let (new_p99, old_p99) = (ms(new.quantile(0.99)), ms(old.as_ref().and_then(|o| o.quantile(0.99))));
    if let (Some(n), Some(o), Some(old)) = (new_p99, old_p99, old.as_ref()) {
        let allowed = o * rollout.max_p99_percent as f64 / 100.0 + 10.0;
        if old.requests >= rollout.min_requests && n > allowed {
            return Err(format!(
                "p99 {n:.1} ms on the new version vs {o:.1} ms on the old one (allowed {allowed:.1} ms)"
            ));
        }
    }
    Ok(format!(
        "{} requests, 5xx {:.1}% (old {:.1}%), p99 {} ms (old {} ms)",
        new.requests,
        new.error_rate() * 100.0,
        old_rate * 100.0,
        new_p99.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
        old_p99.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
    ))
}

fn ms(plan: &Plan<'_>) -> u64 {
    consensus::now_ms().saturating_sub(plan.record.started_ms)
}

fn step(plan: &Plan<'_>, r: &ControlRegion, step: &str, ok: bool, detail: String) -> StepOutcome {
    StepOutcome { region: r.name.clone(), step: step.into(), ok, detail, at_ms: ms(plan) }
}

fn snippet(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::stats::VersionStats;

    fn id(c: char) -> VersionId {
        c.to_string().repeat(64).parse().unwrap()
    }

    /// Counters of `version` after `ok` answers taking `ms` and `errors`
    /// 5xx answers.
    fn window(version: &VersionId, ok: u64, errors: u64, ms: u64) -> StatsSnapshot {
        let s = VersionStats::default();
        for i in 0..ok + errors {
            s.record(Duration::from_millis(ms), i < errors);
        }
        s.snapshot(version)
    }

    fn judge(rollout: &Rollout, old: Option<StatsSnapshot>, new: StatsSnapshot) -> Result<String, String> {
        let (old_id, new_id) = (old.as_ref().map(|o| o.version.clone()), new.version.clone());
        let after: Vec<StatsSnapshot> = old.into_iter().chain([new]).collect();
        gate(rollout, old_id.as_ref(), &new_id, Some(&[]), Some(&after))
    }

    #[test]
    fn gates_compare_the_new_version_with_the_old_one_in_the_same_window() {
        let r = Rollout { max_error_percent: 2, max_p99_percent: 200, min_requests: 20, ..Rollout::default() };
        let (old, new) = (id('a'), id('b'));
        // Healthy: same errors, same latency.
        assert!(judge(&r, Some(window(&old, 99, 1, 5)), window(&new, 99, 1, 5)).is_ok());
        // Errors beyond the old rate + 2 points trip it; within, they pass.
        let e = judge(&r, Some(window(&old, 99, 1, 5)), window(&new, 95, 5, 5)).unwrap_err();
        assert!(e.contains("5xx on 5.0% of 100") && e.contains("1.0% on the old"), "{e}");
        assert!(judge(&r, Some(window(&old, 99, 1, 5)), window(&new, 98, 2, 5)).is_ok());
        // A p99 over twice the old one + 10 ms trips it; a small one does not.
        let e = judge(&r, Some(window(&old, 100, 0, 20)), window(&new, 100, 0, 80)).unwrap_err();
        assert!(e.starts_with("p99"), "{e}");
        assert!(judge(&r, Some(window(&old, 100, 0, 1)), window(&new, 100, 0, 3)).is_ok(), "+10 ms of slack");
        // Too few requests to judge: passes, and says so.
        let ok = judge(&r, Some(window(&old, 100, 0, 5)), window(&new, 5, 5, 5)).unwrap();
        assert!(ok.starts_with("inconclusive"), "{ok}");
        // No old version (an app's first): absolute error budget, no p99 gate.
        assert!(judge(&r, None, window(&new, 100, 0, 900)).is_ok());
        assert!(judge(&r, None, window(&new, 90, 10, 5)).is_err());
    }

    #[test]
    fn a_region_rolled_back_and_resumed_starts_over_and_counts_as_rolled_back_only_until_it_moves_again() {
        let st = |region: &str, step: &str, ok: bool| StepOutcome {
            region: region.into(),
            step: step.into(),
            ok,
            detail: String::new(),
            at_ms: 0,
        };
        let mut r = RolloutRecord {
            app: "a".into(),
            version: id('b'),
            old: Some(id('a')),
            state: "running".into(),
            command: Command::Run,
            approvals: 0,
            steps: vec![st("eu", "smoke", true), st("eu", "50%", true), st("us", "50%", true), st("eu", "100%", false)],
            waves: vec![],
            rollout: Rollout::default(),
            smoke: vec![],
            installs: vec![],
            started_ms: 0,
            stopped: None,
            by: "admin".into(),
        };
        assert!(r.done("eu", "smoke") && r.done("eu", "50%") && !r.done("eu", "100%"));
        assert!(!r.rolled_back("eu"));
        r.steps.push(st("eu", "rollback", true));
        assert!(r.rolled_back("eu") && !r.rolled_back("us"));
        assert!(!r.done("eu", "smoke") && !r.done("eu", "50%"), "after a rollback the region starts over");
        assert!(r.done("us", "50%"));
        r.steps.push(st("eu", "smoke", true));
        assert!(r.done("eu", "smoke") && !r.rolled_back("eu"), "moving again: it needs rolling back again");
    }

    #[tokio::test]
    async fn default_waves_are_the_first_region_then_the_rest_and_unknown_regions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let control = crate::tests::control(dir.path(), &["us-east", "eu-west", "ap-southeast"]).await;
        let names = |w: Vec<Vec<&ControlRegion>>| -> Vec<Vec<String>> {
            w.into_iter().map(|w| w.into_iter().map(|r| r.name.clone()).collect()).collect()
        };
        assert_eq!(
            names(control.waves(&Rollout::default()).unwrap()),
            vec![vec!["us-east".to_string()], vec!["eu-west".into(), "ap-southeast".into()]]
        );
        let r = Rollout { waves: vec![vec!["eu-west".into()]], ..Rollout::default() };
        assert_eq!(
            names(control.waves(&r).unwrap()),
            vec![vec!["eu-west".to_string()], vec!["us-east".into(), "ap-southeast".into()]],
            "regions no wave names go last"
        );
        let r = Rollout { waves: vec![vec!["mars".into()]], ..Rollout::default() };
        assert!(control.waves(&r).unwrap_err().contains("\"mars\""));
    }
}
