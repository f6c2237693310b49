//! Strict parsing of `meridian.toml`.
//!
//! The parser walks a span-preserving TOML document by hand instead of going
//! through serde: serde stops at the first problem, while a user fixing a
//! manifest wants the whole list, each with the line it is on.

use meridian_core::topology::is_valid_name;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use toml_edit::{Document, Item, TableLike, Value};

/// Resource limits applied to every invocation of a component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Wall-clock budget of one request, from instantiation to the end of the
    /// response body.
    pub deadline_ms: u64,
    /// Linear memory the instance may grow to.
    pub memory_mb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { deadline_ms: 10_000, memory_mb: 128 }
    }
}

pub const MAX_DEADLINE_MS: u64 = 300_000;
pub const MAX_MEMORY_MB: u64 = 4096;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Component {
    pub name: String,
    /// Path of the `.wasm` file, relative to the app directory, `/`-separated.
    pub source: String,
    pub limits: Limits,
    /// Hosts the component may send HTTP requests to (none by default).
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<meridian_core::egress::AllowedHost>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RouteTarget {
    /// Name of a component in [`Manifest::components`].
    Component(String),
    /// Directory of static files, relative to the app directory.
    Static(String),
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// Path prefix; the longest matching prefix wins.
    pub path: String,
    pub target: RouteTarget,
    /// `Cache-Control` of this route's answers: static files always carry
    /// it (a default when unset: see the region's `statics`); a function's
    /// answer gets it when the function set none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<String>,
    /// Purge tags (`Cache-Tag`) added to every answer of this route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_tags: Vec<String>,
    /// Static routes: paths (below the directory) whose files never change
    /// under their names, e.g. `["assets/"]` (cached for a year everywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub immutable: Vec<String>,
}

/// Where a key-value namespace's data lives and how it is kept consistent.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum KvMode {
    /// Multi-active: every region holds the data, reads and writes are
    /// local, changes replicate asynchronously; last writer wins.
    Global,
    /// Data lives only in the regions of a jurisdiction (or a list of
    /// regions); other regions forward operations to the nearest of them.
    Regional {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jurisdiction: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        regions: Vec<String>,
    },
    /// Linearizable, replicated by consensus across the listed regions.
    Strong {
        regions: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        leader: Option<String>,
    },
}

/// A key-value namespace: what a function opens as a `wasi:keyvalue` bucket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Namespace {
    pub name: String,
    #[serde(flatten)]
    pub mode: KvMode,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub name: String,
    pub limits: Limits,
    /// Per-region admission limits for the whole app.
    #[serde(default)]
    pub traffic: TrafficLimits,
    pub components: BTreeMap<String, Component>,
    pub routes: Vec<Route>,
    #[serde(default)]
    pub kv: BTreeMap<String, Namespace>,
    /// How a new version reaches the regions (`[rollout]`).
    #[serde(default)]
    pub rollout: Rollout,
    /// Requests a region's new version must answer as expected before it
    /// takes any user traffic (`[[smoke]]`).
    #[serde(default)]
    pub smoke: Vec<SmokeTest>,
    /// How edges choose a region for this app (`[routing]`).
    #[serde(default)]
    pub routing: meridian_core::wire::Routing,
}

/// A rollout plan: waves of regions, traffic steps within each region,
/// and the gates every step must pass.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    /// Ordered waves of region names; empty means the default: the world's
    /// first region alone (the canary), then all the others.
    pub waves: Vec<Vec<String>>,
    /// Percent of a region's traffic on the new version at each step; the
    /// last is 100.
    pub steps: Vec<u8>,
    /// How long each step runs before its gate is judged (0: no gate).
    pub bake_ms: u64,
    /// The new version's share of 5xx answers may exceed the old one's by
    /// at most this many percentage points.
    pub max_error_percent: u32,
    /// The new version's p99 may be at most this percent of the old one's
    /// (plus 10 ms, so that sub-millisecond noise trips nothing).
    pub max_p99_percent: u32,
    /// Requests the new version must have answered in a step for its gate
    /// to judge it; with fewer the step passes as inconclusive.
    pub min_requests: u64,
    /// Wait for `meridian rollout approve` before every wave after the
    /// first.
    #[serde(default)]
    pub manual_approval: bool,
    /// A request header (a user or account id) that keeps a client on one
    /// version in every region and across devices: the same value always
    /// lands on the same side of a split. Without it (or the header), a
    /// cookie pins the client.
    #[serde(default)]
    pub sticky_header: Option<String>,
    /// What a failed step rolls back.
    #[serde(default)]
    pub rollback: RollbackScope,
}

/// What a failed smoke test or gate rolls back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackScope {
    /// Every region the rollout touched goes back to the old version, and
    /// the rollout ends.
    #[default]
    All,
    /// Only the region that failed goes back; the rollout halts there, the
    /// regions already switched keep the new version, and an operator
    /// decides: `meridian rollout resume` retries the region, `abort` rolls
    /// back everything (as AWS CodeDeploy's per-deployment-group rollback,
    /// Nomad's `on_failure = "fail_local"`).
    Region,
}

impl Default for Rollout {
    fn default() -> Rollout {
        Rollout {
            waves: Vec::new(),
            steps: vec![100],
            bake_ms: 0,
            max_error_percent: 1,
            max_p99_percent: 200,
            min_requests: 20,
            manual_approval: false,
            sticky_header: None,
            rollback: RollbackScope::All,
        }
    }
}

/// One smoke test: a request sent to a region's new version before it
/// takes traffic (with the version-override header, so users never see
/// it), and what the answer must be.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SmokeTest {
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: String,
    /// Expected status (default 200).
    pub status: u16,
    /// Text the body must contain, if set.
    #[serde(default)]
    pub body_contains: Option<String>,
}

/// How much traffic one region admits for the app (`[limits]`); beyond it
/// requests get 429 at once, so one app cannot take a region from others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrafficLimits {
    /// Sustained requests per second per region (bursts up to one second's worth).
    pub requests_per_second: Option<u32>,
    /// Function requests running at once per region.
    pub max_concurrency: Option<u32>,
}

/// One problem in a manifest, located by line, column and dotted key.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} problem{} in the manifest:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

struct Checker<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<ManifestError>,
}

impl Checker<'_> {
    fn error(&mut self, span: Option<Range<usize>>, key: &str, message: impl Into<String>) {
        let offset = span.map(|s| s.start).unwrap_or(0).min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = offset - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        self.errors.push(ManifestError {
            file: self.file.to_string(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Reports keys of `table` not in `allowed`.
    fn only_keys(&mut self, table: &dyn TableLike, prefix: &str, allowed: &[&str]) {
        for (k, _) in table.iter() {
            if !allowed.contains(&k) {
                let span = table.get_key_value(k).and_then(|(key, _)| key.span());
                self.error(span, &join(prefix, k), format!("unknown key; expected one of: {}", allowed.join(", ")));
            }
        }
    }

    fn string(&mut self, table: &dyn TableLike, prefix: &str, key: &str) -> Option<String> {
        let item = table.get(key)?;
        match item.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                self.error(item_span(table, key), &join(prefix, key), "expected a string");
                None
            }
        }
    }

    fn integer(&mut self, table: &dyn TableLike, prefix: &str, key: &str, range: Range<u64>) -> Option<u64> {
        let item = table.get(key)?;
        match item.as_integer() {
            Some(i) if i >= range.start as i64 && i < range.end as i64 => Some(i as u64),
            Some(i) => {
                self.error(
                    item_span(table, key),
                    &join(prefix, key),
                    format!("{i} is out of range {}..={}", range.start, range.end - 1),
                );
                None
            }
            None => {
                self.error(item_span(table, key), &join(prefix, key), "expected an integer");
                None
            }
        }
    }

    fn limits(&mut self, table: &dyn TableLike, prefix: &str, base: Limits) -> Limits {
        Limits {
            deadline_ms: self.integer(table, prefix, "deadline_ms", 1..MAX_DEADLINE_MS + 1).unwrap_or(base.deadline_ms),
            memory_mb: self.integer(table, prefix, "memory_mb", 1..MAX_MEMORY_MB + 1).unwrap_or(base.memory_mb),
        }
    }
}

impl Checker<'_> {
    fn string_list(&mut self, table: &dyn TableLike, prefix: &str, key: &str) -> Option<Vec<String>> {
        let item = table.get(key)?;
        let list = item.as_array().and_then(|a| a.iter().map(|v| v.as_str().map(String::from)).collect());
        if list.is_none() {
            self.error(item_span(table, key), &join(prefix, key), "expected a list of strings");
        }
        list
    }

    fn namespaces(&mut self, t: &dyn TableLike) -> BTreeMap<String, Namespace> {
        let mut out = BTreeMap::new();
        for (name, item) in t.iter() {
            let prefix = format!("kv.{name}");
            if !is_valid_name(name) {
                self.error(
                    t.get_key_value(name).and_then(|(k, _)| k.span()),
                    &prefix,
                    "namespace names must be 1-32 characters of a-z, 0-9 and '-'",
                );
            }
            let Some(nt) = as_table(item) else {
                self.error(item_span(t, name), &prefix, "expected a table with `mode`");
                continue;
            };
            self.only_keys(nt, &prefix, &["mode", "jurisdiction", "regions", "leader"]);
            let mode = self.string(nt, &prefix, "mode");
            let jurisdiction = self.string(nt, &prefix, "jurisdiction");
            let regions = self.string_list(nt, &prefix, "regions");
            let leader = self.string(nt, &prefix, "leader");
            for r in regions.iter().flatten() {
                if !is_valid_name(r) {
                    self.error(
                        item_span(nt, "regions"),
                        &format!("{prefix}.regions"),
                        format!("{r:?} is not a region name"),
                    );
                }
            }
            let not_for = |c: &mut Self, key: &str, mode: &str| {
                if nt.contains_key(key) {
                    c.error(item_span(nt, key), &format!("{prefix}.{key}"), format!("not used by mode = \"{mode}\""));
                }
            };
            let mode = match mode.as_deref() {
                None => {
                    if nt.get("mode").is_none() {
                        self.error(
                            item_span(t, name),
                            &format!("{prefix}.mode"),
                            "missing; one of \"global\", \"regional\", \"strong\"",
                        );
                    }
                    continue;
                }
                Some("global") => {
                    for k in ["jurisdiction", "regions", "leader"] {
                        not_for(self, k, "global");
                    }
                    KvMode::Global
                }
                Some("regional") => {
                    not_for(self, "leader", "regional");
                    let regions = regions.unwrap_or_default();
                    match (&jurisdiction, regions.is_empty()) {
                        (Some(_), false) | (None, true) => self.error(
                            item_span(t, name),
                            &prefix,
                            "a regional namespace needs exactly one of `jurisdiction` or `regions`",
                        ),
                        _ => {}
                    }
                    KvMode::Regional { jurisdiction, regions }
                }
                Some("strong") => {
                    not_for(self, "jurisdiction", "strong");
                    let regions = regions.unwrap_or_default();
                    let mut unique = regions.clone();
                    unique.sort();
                    unique.dedup();
                    if unique.len() < 3 || unique.len() != regions.len() {
                        self.error(
                            item_span(nt, "regions").or_else(|| item_span(t, name)),
                            &format!("{prefix}.regions"),
                            "a strong namespace needs `regions`: three or more distinct regions (it must survive losing one)",
                        );
                    }
                    if let Some(l) = &leader {
                        if !regions.contains(l) {
                            self.error(
                                item_span(nt, "leader"),
                                &format!("{prefix}.leader"),
                                format!("{l:?} is not one of the namespace's regions"),
                            );
                        }
                    }
                    KvMode::Strong { regions, leader }
                }
                Some(other) => {
                    self.error(
                        item_span(nt, "mode"),
                        &format!("{prefix}.mode"),
                        format!("{other:?} is not a mode; expected \"global\", \"regional\" or \"strong\""),
                    );
                    continue;
                }
            };
            out.insert(name.to_string(), Namespace { name: name.to_string(), mode });
        }
        out
    }
}

impl Checker<'_> {
    fn routing(&mut self, t: &dyn TableLike) -> meridian_core::wire::Routing {
        use meridian_core::wire::{CountryRule, ResidencyRule, Routing, RoutingPolicy};
        self.only_keys(t, "routing", &["policy", "weights", "order", "affinity", "countries", "residency"]);
        let mut r = Routing::default();
        if let Some(p) = self.string(t, "routing", "policy") {
            r.policy = match p.as_str() {
                "geo" => RoutingPolicy::Geo,
                "latency" => RoutingPolicy::Latency,
                "weighted" => RoutingPolicy::Weighted,
                "failover" => RoutingPolicy::Failover,
                other => {
                    self.error(
                        item_span(t, "policy"),
                        "routing.policy",
                        format!("{other:?}: expected geo, latency, weighted or failover"),
                    );
                    RoutingPolicy::Edge
                }
            };
        }
        if let Some(item) = t.get("weights") {
            match as_table(item) {
                None => self.error(item_span(t, "weights"), "routing.weights", "expected a table of region = percent"),
                Some(w) => {
                    for (region, _) in w.iter() {
                        if !is_valid_name(region) {
                            self.error(
                                item_span(w, region),
                                "routing.weights",
                                format!("{region:?} is not a region name"),
                            );
                        }
                        if let Some(n) = self.integer(w, "routing.weights", region, 0..101) {
                            r.weights.insert(region.to_string(), n as u32);
                        }
                    }
                    if r.weights.values().sum::<u32>() == 0 {
                        self.error(item_span(t, "weights"), "routing.weights", "the weights add up to 0");
                    }
                }
            }
        }
        if let Some(order) = self.string_list(t, "routing", "order") {
            let mut seen = std::collections::BTreeSet::new();
            for region in &order {
                if !is_valid_name(region) || !seen.insert(region) {
                    self.error(
                        item_span(t, "order"),
                        "routing.order",
                        format!("{region:?}: not a region name, or twice"),
                    );
                }
            }
            r.order = order;
        }
        if let Some(item) = t.get("affinity") {
            match item.as_bool() {
                Some(b) => r.affinity = b,
                None => self.error(item_span(t, "affinity"), "routing.affinity", "expected true or false"),
            }
        }
        match (r.policy, r.weights.is_empty(), r.order.is_empty()) {
            (RoutingPolicy::Weighted, true, _) => {
                self.error(item_span(t, "policy"), "routing.weights", "policy \"weighted\" needs [routing.weights]")
            }
            (RoutingPolicy::Failover, _, true) => {
                self.error(item_span(t, "policy"), "routing.order", "policy \"failover\" needs routing.order")
            }
            _ => {}
        }
        for (key, kind) in [("countries", 0), ("residency", 1)] {
            let Some(item) = t.get(key) else { continue };
            let Some(entries) = table_array(item) else {
                self.error(item_span(t, key), &format!("routing.{key}"), "expected an array of tables");
                continue;
            };
            for (i, (e, span)) in entries.into_iter().enumerate() {
                let prefix = format!("routing.{key}[{i}]");
                if kind == 0 {
                    self.only_keys(e, &prefix, &["countries", "region"]);
                    let countries = self.string_list(e, &prefix, "countries").unwrap_or_default();
                    let region = self.string(e, &prefix, "region");
                    let bad = countries.iter().find(|c| c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()));
                    if let Some(bad) = bad {
                        self.error(
                            item_span(e, "countries"),
                            &prefix,
                            format!("{bad:?}: countries are ISO codes like \"FR\""),
                        );
                    }
                    match region {
                        Some(region) if is_valid_name(&region) && !countries.is_empty() => {
                            r.countries.push(CountryRule { countries, region })
                        }
                        _ => self.error(span, &prefix, "needs countries = [\"FR\", ...] and a region name"),
                    }
                } else {
                    self.only_keys(e, &prefix, &["clients", "regions"]);
                    let clients = self.string(e, &prefix, "clients");
                    let regions = self.string(e, &prefix, "regions");
                    match (clients, regions) {
                        (Some(clients), Some(regions)) if is_valid_name(&clients) && is_valid_name(&regions) => {
                            r.residency.push(ResidencyRule { clients, regions })
                        }
                        _ => self.error(span, &prefix, "needs clients and regions: jurisdiction names such as \"eu\""),
                    }
                }
            }
        }
        r
    }

    fn rollout(&mut self, t: &dyn TableLike) -> Rollout {
        let d = Rollout::default();
        self.only_keys(
            t,
            "rollout",
            &[
                "waves",
                "steps",
                "bake_ms",
                "max_error_percent",
                "max_p99_percent",
                "min_requests",
                "manual_approval",
                "sticky_header",
                "rollback",
            ],
        );
        let mut waves = Vec::new();
        if let Some(item) = t.get("waves") {
            let parsed: Option<Vec<Vec<String>>> = item.as_array().and_then(|a| {
                a.iter()
                    .map(|w| w.as_array().and_then(|w| w.iter().map(|r| r.as_str().map(String::from)).collect()))
                    .collect()
            });
            match parsed {
                Some(w) => {
                    let mut seen = std::collections::BTreeSet::new();
                    for r in w.iter().flatten() {
                        if !is_valid_name(r) || !seen.insert(r.clone()) {
                            self.error(
                                item_span(t, "waves"),
                                "rollout.waves",
                                format!("{r:?} is not a region name, or is in two waves"),
                            );
                        }
                    }
                    if w.iter().any(Vec::is_empty) {
                        self.error(item_span(t, "waves"), "rollout.waves", "a wave needs at least one region");
                    }
                    waves = w;
                }
                None => self.error(
                    item_span(t, "waves"),
                    "rollout.waves",
                    "expected a list of lists of region names, e.g. [[\"us-east\"], [\"eu-west\", \"ap-southeast\"]]",
                ),
            }
        }
        let mut steps = d.steps.clone();
        if let Some(item) = t.get("steps") {
            let parsed: Option<Vec<i64>> = item.as_array().and_then(|a| a.iter().map(|v| v.as_integer()).collect());
            match parsed {
                Some(p)
                    if !p.is_empty()
                        && p.iter().all(|v| (0..=100).contains(v))
                        && p.windows(2).all(|w| w[0] < w[1])
                        && p.last() == Some(&100) =>
                {
                    steps = p.into_iter().map(|v| v as u8).collect()
                }
                _ => self.error(
                    item_span(t, "steps"),
                    "rollout.steps",
                    "expected rising percentages ending with 100, e.g. [10, 50, 100]",
                ),
            }
        }
        Rollout {
            waves,
            steps,
            bake_ms: self.integer(t, "rollout", "bake_ms", 0..3_600_001).unwrap_or(d.bake_ms),
            max_error_percent: self
                .integer(t, "rollout", "max_error_percent", 0..101)
                .map(|v| v as u32)
                .unwrap_or(d.max_error_percent),
            max_p99_percent: self
                .integer(t, "rollout", "max_p99_percent", 100..100_001)
                .map(|v| v as u32)
                .unwrap_or(d.max_p99_percent),
            min_requests: self.integer(t, "rollout", "min_requests", 1..1_000_001).unwrap_or(d.min_requests),
            sticky_header: match self.string(t, "rollout", "sticky_header") {
                Some(h) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => Some(h.to_ascii_lowercase()),
                Some(h) => {
                    self.error(
                        item_span(t, "sticky_header"),
                        "rollout.sticky_header",
                        format!("{h:?} is not a header name"),
                    );
                    None
                }
                None => None,
            },
            manual_approval: match t.get("manual_approval") {
                None => false,
                Some(v) => v.as_bool().unwrap_or_else(|| {
                    self.error(item_span(t, "manual_approval"), "rollout.manual_approval", "expected true or false");
                    false
                }),
            },
            rollback: match self.string(t, "rollout", "rollback").as_deref() {
                None | Some("all") => RollbackScope::All,
                Some("region") => RollbackScope::Region,
                Some(other) => {
                    self.error(
                        item_span(t, "rollback"),
                        "rollout.rollback",
                        format!("{other:?}: expected \"all\" (every region touched) or \"region\" (the failed one)"),
                    );
                    RollbackScope::All
                }
            },
        }
    }

    fn smoke_tests(&mut self, entries: Vec<Located<'_>>) -> Vec<SmokeTest> {
        let mut out = Vec::new();
        for (i, (st, span)) in entries.into_iter().enumerate() {
            let prefix = format!("smoke[{i}]");
            self.only_keys(st, &prefix, &["method", "path", "headers", "body", "status", "body_contains"]);
            let method = self.string(st, &prefix, "method").unwrap_or_else(|| "GET".into());
            if http::Method::from_bytes(method.as_bytes()).is_err() {
                self.error(item_span(st, "method"), &format!("{prefix}.method"), format!("{method:?} is not a method"));
            }
            let Some(path) = self.string(st, &prefix, "path") else {
                if st.get("path").is_none() {
                    self.error(span, &format!("{prefix}.path"), "missing; the path to request");
                }
                continue;
            };
            if !path.starts_with('/') {
                self.error(item_span(st, "path"), &format!("{prefix}.path"), format!("{path:?} must start with '/'"));
            } else if meridian_core::headers::is_reserved_path(&path) {
                self.error(
                    item_span(st, "path"),
                    &format!("{prefix}.path"),
                    format!(
                        "{path:?} is reserved for the platform: a smoke test asks the app's own routes, as a user \
                         would"
                    ),
                );
            } else if http::uri::PathAndQuery::try_from(path.as_str()).is_err() {
                self.error(item_span(st, "path"), &format!("{prefix}.path"), format!("{path:?} is not a valid URL path"));
            }
            let mut headers = Vec::new();
            if let Some(item) = st.get("headers") {
                match as_table(item) {
                    Some(h) => {
                        for (k, v) in h.iter() {
                            match v.as_str() {
                                Some(_) if meridian_core::headers::is_platform_header(k) => self.error(
                                    item_span(h, k),
                                    &format!("{prefix}.headers.{k}"),
                                    "set by the platform, not by a smoke test (Host, Forwarded, X-Forwarded-*, \
                                     X-Meridian-*)",
                                ),
                                Some(v)
                                    if http::HeaderName::from_bytes(k.as_bytes()).is_ok()
                                        && http::HeaderValue::from_str(v).is_ok() =>
                                {
                                    headers.push((k.to_string(), v.to_string()))
                                }
                                _ => self.error(
                                    item_span(h, k),
                                    &format!("{prefix}.headers.{k}"),
                                    "expected a valid header name with a string value",
                                ),
                            }
                        }
                    }
                    None => self.error(item_span(st, "headers"), &format!("{prefix}.headers"), "expected a table"),
                }
            }
            out.push(SmokeTest {
                method,
                path,
                headers,
                body: self.string(st, &prefix, "body").unwrap_or_default(),
                status: self.integer(st, &prefix, "status", 100..600).map(|v| v as u16).unwrap_or(200),
                body_contains: self.string(st, &prefix, "body_contains"),
            });
        }
        out
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The span of a key's value, falling back to the key itself.
fn item_span(table: &dyn TableLike, key: &str) -> Option<Range<usize>> {
    let (k, item) = table.get_key_value(key)?;
    item_own_span(item).or_else(|| k.span())
}

fn item_own_span(item: &Item) -> Option<Range<usize>> {
    match item {
        Item::Value(v) => v.span(),
        other => other.span(),
    }
}

/// Accepts `[table]` and inline `{ ... }` tables alike.
fn as_table(item: &Item) -> Option<&dyn TableLike> {
    item.as_table_like()
}

/// `[[routes]]` and `routes = [{...}, ...]` alike, each with its span.
/// A table of an array, with the span of its header or braces.
type Located<'a> = (&'a dyn TableLike, Option<Range<usize>>);

fn table_array(item: &Item) -> Option<Vec<Located<'_>>> {
    if let Some(aot) = item.as_array_of_tables() {
        return Some(aot.iter().map(|t| (t as &dyn TableLike, t.span())).collect());
    }
    let arr = item.as_array()?;
    arr.iter()
        .map(|v| match v {
            Value::InlineTable(t) => Some((t as &dyn TableLike, t.span())),
            _ => None,
        })
        .collect()
}

/// A relative, `/`-separated path that stays inside the app directory.
pub(crate) fn is_safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.contains('\0')
        && p.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

impl Manifest {
    /// Parses and validates a manifest. `file` is only used in messages.
    pub fn parse(file: &str, text: &str) -> Result<Manifest, ManifestErrors> {
        let mut c = Checker { file, text, errors: Vec::new() };
        let doc = match Document::parse(text) {
            Ok(d) => d,
            Err(e) => {
                c.error(e.span(), "", format!("not valid TOML: {}", e.message()));
                return Err(ManifestErrors(c.errors));
            }
        };
        let root: &dyn TableLike = doc.as_table();
        c.only_keys(root, "", &["app", "limits", "components", "routes", "kv", "rollout", "smoke", "routing"]);

        let mut name = String::new();
        match root.get("app").map(|i| (as_table(i), i)) {
            None => c.error(Some(0..0), "app", "missing [app] table with the app's name"),
            Some((None, _)) => c.error(item_span(root, "app"), "app", "expected a table"),
            Some((Some(app), _)) => {
                c.only_keys(app, "app", &["name"]);
                match c.string(app, "app", "name") {
                    Some(n) if is_valid_name(&n) => name = n,
                    Some(n) => c.error(
                        item_span(app, "name"),
                        "app.name",
                        format!("{n:?} must be 1-32 characters of a-z, 0-9 and '-'"),
                    ),
                    None if app.get("name").is_none() => {
                        c.error(item_span(root, "app"), "app.name", "missing; every app needs a name")
                    }
                    None => {}
                }
            }
        }

        let mut limits = Limits::default();
        let mut traffic = TrafficLimits::default();
        if let Some(item) = root.get("limits") {
            match as_table(item) {
                Some(t) => {
                    c.only_keys(t, "limits", &["deadline_ms", "memory_mb", "requests_per_second", "max_concurrency"]);
                    limits = c.limits(t, "limits", limits);
                    traffic = TrafficLimits {
                        requests_per_second: c
                            .integer(t, "limits", "requests_per_second", 1..1_000_001)
                            .map(|v| v as u32),
                        max_concurrency: c.integer(t, "limits", "max_concurrency", 1..100_001).map(|v| v as u32),
                    };
                }
                None => c.error(item_span(root, "limits"), "limits", "expected a table"),
            }
        }

        let mut components = BTreeMap::new();
        if let Some(item) = root.get("components") {
            match as_table(item) {
                None => c.error(item_span(root, "components"), "components", "expected a table of components"),
                Some(t) => {
                    for (cname, citem) in t.iter() {
                        let prefix = format!("components.{cname}");
                        if !is_valid_name(cname) {
                            c.error(
                                t.get_key_value(cname).and_then(|(k, _)| k.span()),
                                &prefix,
                                "component names must be 1-32 characters of a-z, 0-9 and '-'",
                            );
                        }
                        let Some(ct) = as_table(citem) else {
                            c.error(item_span(t, cname), &prefix, "expected a table with `source`");
                            continue;
                        };
                        c.only_keys(ct, &prefix, &["source", "deadline_ms", "memory_mb", "allowed_outbound_hosts"]);
                        let mut allowed_outbound_hosts = Vec::new();
                        for h in c.string_list(ct, &prefix, "allowed_outbound_hosts").into_iter().flatten() {
                            match h.parse::<meridian_core::egress::AllowedHost>() {
                                Ok(a) => allowed_outbound_hosts.push(a),
                                Err(e) => c.error(
                                    item_span(ct, "allowed_outbound_hosts"),
                                    &format!("{prefix}.allowed_outbound_hosts"),
                                    e,
                                ),
                            }
                        }
                        let source = c.string(ct, &prefix, "source");
                        match &source {
                            None if ct.get("source").is_none() => c.error(
                                item_span(t, cname),
                                &format!("{prefix}.source"),
                                "missing; the path of the component's .wasm file",
                            ),
                            Some(s) if !is_safe_relative_path(s) => c.error(
                                item_span(ct, "source"),
                                &format!("{prefix}.source"),
                                format!("{s:?} must be a relative path inside the app directory"),
                            ),
                            _ => {}
                        }
                        let climits = c.limits(ct, &prefix, limits);
                        if let Some(source) = source {
                            components.insert(
                                cname.to_string(),
                                Component { name: cname.to_string(), source, limits: climits, allowed_outbound_hosts },
                            );
                        }
                    }
                }
            }
        }

        let mut routes = Vec::new();
        match root.get("routes") {
            None => c.error(Some(0..0), "routes", "missing; an app needs at least one [[routes]] entry"),
            Some(item) => match table_array(item) {
                None => c.error(item_span(root, "routes"), "routes", "expected an array of tables ([[routes]])"),
                Some(entries) => {
                    for (i, (rt, span)) in entries.into_iter().enumerate() {
                        let prefix = format!("routes[{i}]");
                        c.only_keys(
                            rt,
                            &prefix,
                            &["path", "component", "static", "cache_control", "cache_tags", "immutable"],
                        );
                        let path = c.string(rt, &prefix, "path");
                        let component = c.string(rt, &prefix, "component");
                        let static_dir = c.string(rt, &prefix, "static");
                        let cache_control = c.string(rt, &prefix, "cache_control");
                        if let Some(cc) = &cache_control {
                            if http::HeaderValue::from_str(cc).is_err() || cc.contains('\n') {
                                c.error(
                                    item_span(rt, "cache_control"),
                                    &format!("{prefix}.cache_control"),
                                    format!("{cc:?} is not a valid header value"),
                                );
                            }
                        }
                        let cache_tags = c.string_list(rt, &prefix, "cache_tags").unwrap_or_default();
                        let immutable = c.string_list(rt, &prefix, "immutable").unwrap_or_default();
                        if !immutable.is_empty() && rt.get("component").is_some() {
                            c.error(
                                item_span(rt, "immutable"),
                                &format!("{prefix}.immutable"),
                                "only static routes have immutable files",
                            );
                        }
                        for t in &cache_tags {
                            if t.is_empty() || t.len() > 128 || !t.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
                                c.error(
                                    item_span(rt, "cache_tags"),
                                    &format!("{prefix}.cache_tags"),
                                    format!("{t:?}: a tag is 1-128 visible ASCII characters without commas"),
                                );
                            }
                        }
                        let Some(path) = path else {
                            if rt.get("path").is_none() {
                                c.error(
                                    span.clone(),
                                    &format!("{prefix}.path"),
                                    "missing; the URL path prefix this route serves",
                                );
                            }
                            continue;
                        };
                        if !path.starts_with('/') {
                            c.error(
                                item_span(rt, "path"),
                                &format!("{prefix}.path"),
                                format!("{path:?} must start with '/'"),
                            );
                        } else if meridian_core::headers::is_reserved_path(path.as_str()) {
                            c.error(
                                item_span(rt, "path"),
                                &format!("{prefix}.path"),
                                "paths under /_meridian are reserved for the platform",
                            );
                        }
                        if routes.iter().any(|r: &Route| r.path == path) {
                            c.error(
                                item_span(rt, "path"),
                                &format!("{prefix}.path"),
                                format!("{path:?} is routed twice"),
                            );
                        }
                        let target = match (component, static_dir) {
                            (Some(comp), None) => {
                                if !components.contains_key(&comp)
                                    && !root.get("components").and_then(as_table).is_some_and(|t| t.contains_key(&comp))
                                {
                                    c.error(
                                        item_span(rt, "component"),
                                        &format!("{prefix}.component"),
                                        format!("no component named {comp:?} in [components]"),
                                    );
                                }
                                RouteTarget::Component(comp)
                            }
                            (None, Some(dir)) => {
                                if !is_safe_relative_path(&dir) {
                                    c.error(
                                        item_span(rt, "static"),
                                        &format!("{prefix}.static"),
                                        format!("{dir:?} must be a relative path inside the app directory"),
                                    );
                                }
                                RouteTarget::Static(dir)
                            }
                            (Some(_), Some(_)) => {
                                c.error(span.clone(), &prefix, "set either `component` or `static`, not both");
                                continue;
                            }
                            (None, None) => {
                                if rt.get("component").is_none() && rt.get("static").is_none() {
                                    c.error(span.clone(), &prefix, "missing `component` or `static`");
                                }
                                continue;
                            }
                        };
                        routes.push(Route { path, target, cache_control, cache_tags, immutable });
                    }
                }
            },
        }

        let kv = match root.get("kv") {
            None => BTreeMap::new(),
            Some(item) => match as_table(item) {
                None => {
                    c.error(item_span(root, "kv"), "kv", "expected a table of namespaces ([kv.NAME])");
                    BTreeMap::new()
                }
                Some(t) => c.namespaces(t),
            },
        };

        let rollout = match root.get("rollout") {
            None => Rollout::default(),
            Some(item) => match as_table(item) {
                None => {
                    c.error(item_span(root, "rollout"), "rollout", "expected a table");
                    Rollout::default()
                }
                Some(t) => c.rollout(t),
            },
        };
        let smoke = match root.get("smoke") {
            None => Vec::new(),
            Some(item) => match table_array(item) {
                None => {
                    c.error(item_span(root, "smoke"), "smoke", "expected an array of tables ([[smoke]])");
                    Vec::new()
                }
                Some(entries) => c.smoke_tests(entries),
            },
        };

        let routing = match root.get("routing") {
            None => Default::default(),
            Some(item) => match as_table(item) {
                None => {
                    c.error(item_span(root, "routing"), "routing", "expected a table");
                    Default::default()
                }
                Some(t) => c.routing(t),
            },
        };

        if c.errors.is_empty() {
            Ok(Manifest { name, limits, traffic, components, routes, kv, rollout, smoke, routing })
        } else {
            Err(ManifestErrors(c.errors))
        }
    }

    /// The route serving `path`: the longest prefix match, where a prefix
    /// ending without '/' matches only at a segment boundary (`/api` serves
    /// `/api` and `/api/x`, not `/apix`).
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        self.routes.iter().filter(|r| prefix_matches(&r.path, path)).max_by_key(|r| r.path.len())
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[app]
name = "shop"

[limits]
deadline_ms = 500
memory_mb = 32

[components.hello]
source = "hello.wasm"
memory_mb = 16

[[routes]]
path = "/api"
component = "hello"

[[routes]]
path = "/"
static = "public"
"#;

    #[test]
    fn parses_a_complete_manifest() {
        let m = Manifest::parse("meridian.toml", GOOD).unwrap();
        assert_eq!(m.name, "shop");
        assert_eq!(m.components["hello"].limits, Limits { deadline_ms: 500, memory_mb: 16 });
        assert_eq!(m.route_for("/api/x").unwrap().path, "/api");
        assert_eq!(m.route_for("/api").unwrap().path, "/api");
        assert_eq!(m.route_for("/apix").unwrap().path, "/");
        assert_eq!(m.route_for("/index.html").unwrap().target, RouteTarget::Static("public".into()));
    }

    #[test]
    fn reports_every_problem_with_its_line_and_key() {
        let text = r#"[app]
name = "Bad Name"
colour = "red"

[limits]
deadline_ms = "soon"

[components.hello]
source = "../escape.wasm"

[[routes]]
path = "nope"
component = "missing"

[[routes]]
static = "public"
"#;
        let errs = Manifest::parse("meridian.toml", text).unwrap_err().0;
        let found: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (3, "app.colour"),
                (2, "app.name"),
                (6, "limits.deadline_ms"),
                (9, "components.hello.source"),
                (12, "routes[0].path"),
                (13, "routes[0].component"),
                (15, "routes[1].path"),
            ],
            "{errs:#?}"
        );
        let shown = ManifestErrors(errs).to_string();
        assert!(shown.contains("meridian.toml:3:1: `app.colour`: unknown key"), "{shown}");
    }

    #[test]
    fn unknown_top_level_keys_are_errors() {
        let text = format!("{GOOD}\n[extras]\nx = 1\n");
        let errs = Manifest::parse("m", &text).unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].key, "extras");
    }

    #[test]
    fn invalid_toml_is_located() {
        let errs = Manifest::parse("m", "[app]\nname = \n").unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 2);
        assert!(errs[0].message.contains("not valid TOML"));
    }

    #[test]
    fn reserved_paths_and_out_of_range_limits_are_refused() {
        let text = "[app]\nname='a'\n[limits]\nmemory_mb = 999999\n[[routes]]\npath='/_meridian/x'\nstatic='s'\n";
        let keys: Vec<String> = Manifest::parse("m", text).unwrap_err().0.into_iter().map(|e| e.key).collect();
        assert_eq!(keys, vec!["limits.memory_mb", "routes[0].path"]);
    }

    #[test]
    fn key_value_namespaces() {
        let text = r#"
[app]
name = "shop"
[[routes]]
path = "/"
static = "site"
[kv.sessions]
mode = "global"
[kv.profiles]
mode = "regional"
jurisdiction = "eu"
[kv.ledger]
mode = "strong"
regions = ["us-east", "eu-west", "ap-southeast"]
leader = "us-east"
"#;
        let m = Manifest::parse("meridian.toml", text).unwrap();
        assert_eq!(m.kv["sessions"].mode, KvMode::Global);
        assert_eq!(m.kv["profiles"].mode, KvMode::Regional { jurisdiction: Some("eu".into()), regions: vec![] });
        assert!(
            matches!(&m.kv["ledger"].mode, KvMode::Strong { regions, leader: Some(l) } if regions.len() == 3 && l == "us-east")
        );

        let bad = r#"[app]
name = "shop"
[[routes]]
path = "/"
static = "site"
[kv.a]
mode = "eventual"
[kv.b]
mode = "regional"
[kv.c]
mode = "strong"
regions = ["us-east", "eu-west"]
[kv.d]
mode = "global"
jurisdiction = "eu"
[kv.e]
"#;
        let errs = Manifest::parse("meridian.toml", bad).unwrap_err().0;
        let keys: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            keys,
            vec![("kv.a.mode", 7), ("kv.b", 8), ("kv.c.regions", 12), ("kv.d.jurisdiction", 15), ("kv.e.mode", 16)],
            "{errs:#?}"
        );
    }

    #[test]
    fn rollout_plans_and_smoke_tests() {
        let base = "[app]\nname = \"a\"\n[[routes]]\npath = \"/\"\nstatic = \"s\"\n";
        let m = Manifest::parse("m", base).unwrap();
        assert_eq!(m.rollout, Rollout::default());
        assert!(m.smoke.is_empty());
        let text = format!(
            "{base}[rollout]\nwaves = [[\"us-east\"], [\"eu-west\", \"ap-southeast\"]]\nsteps = [10, 50, 100]\nbake_ms = 2000\n\
             max_error_percent = 2\nsticky_header = \"X-User\"\nrollback = \"region\"\n[[smoke]]\npath = \"/hello\"\nbody_contains = \"Hello\"\n\
             [[smoke]]\nmethod = \"POST\"\npath = \"/echo\"\nbody = \"x\"\nstatus = 201\nheaders = {{ x-a = \"b\" }}\n"
        );
        let m = Manifest::parse("m", &text).unwrap();
        assert_eq!(m.rollout.waves, vec![vec!["us-east".to_string()], vec!["eu-west".into(), "ap-southeast".into()]]);
        assert_eq!(
            (m.rollout.steps.clone(), m.rollout.bake_ms, m.rollout.max_error_percent),
            (vec![10, 50, 100], 2000, 2)
        );
        assert_eq!(m.rollout.sticky_header.as_deref(), Some("x-user"));
        assert_eq!(m.rollout.rollback, RollbackScope::Region);
        assert_eq!(m.smoke.len(), 2);
        assert_eq!((m.smoke[0].method.as_str(), m.smoke[0].status), ("GET", 200));
        assert_eq!(m.smoke[1].headers, vec![("x-a".to_string(), "b".to_string())]);
        let bad = format!(
            "{base}[rollout]\nwaves = [[\"us-east\"], [\"us-east\"]]\nsteps = [50, 10]\nspeed = 1\nrollback = \"some\"\n[[smoke]]\nstatus = 9\n"
        );
        let errs = Manifest::parse("m", &bad).unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            vec!["rollout.speed", "rollout.waves", "rollout.steps", "rollout.rollback", "smoke[0].path"],
            "{errs:#?}"
        );
    }

    /// Issue 27, reproduction 1: a smoke test is a user's request to the
    /// app's own routes, so a manifest cannot aim one at the platform's
    /// API (another app's data, its deletion) or dress it as the platform.
    #[test]
    fn smoke_tests_cannot_name_reserved_paths_or_platform_headers() {
        let base = "[app]\nname = \"evil\"\n[[routes]]\npath = \"/\"\nstatic = \"s\"\n";
        for path in [
            "/_meridian/apps/notes/kv/op",
            "/_meridian",
            "/_MERIDIAN/apps/notes",
            "/%5Fmeridian/apps/notes",
            "//_meridian/apps/notes",
        ] {
            let text = format!("{base}[[smoke]]\nmethod = \"POST\"\npath = \"{path}\"\nstatus = 599\n");
            let errs = Manifest::parse("m", &text).unwrap_err().0;
            assert_eq!(errs.len(), 1, "{path}: {errs:#?}");
            assert_eq!(errs[0].key, "smoke[0].path");
            assert!(errs[0].message.contains("reserved"), "{}", errs[0].message);
        }
        let text = format!(
            "{base}[[smoke]]\npath = \"/kv/notes/first\"\nheaders = {{ x-meridian-app = \"notes\", Host = \"notes.localhost\", \
             X-Forwarded-Host = \"notes.localhost\", x-meridian-version-override = \"abc\", x-user = \"ok\" }}\n"
        );
        let errs = Manifest::parse("m", &text).unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "smoke[0].headers.x-meridian-app",
                "smoke[0].headers.Host",
                "smoke[0].headers.X-Forwarded-Host",
                "smoke[0].headers.x-meridian-version-override"
            ],
            "{errs:#?}"
        );
    }

    #[test]
    fn safe_paths() {
        assert!(is_safe_relative_path("a/b.wasm"));
        for bad in ["", "/abs", "a/../b", "./a", "a//b", "a\\b"] {
            assert!(!is_safe_relative_path(bad), "{bad}");
        }
    }
}
