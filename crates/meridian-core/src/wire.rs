//! JSON bodies exchanged between roles, defined once so the producer and
//! every consumer agree.

use crate::VersionId;

/// `GET /_meridian/status` of a region node: every app it holds.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RegionStatus {
    pub region: String,
    pub apps: Vec<AppStatus>,
}

impl RegionStatus {
    pub fn app(&self, name: &str) -> Option<&AppStatus> {
        self.apps.iter().find(|a| a.app == name)
    }
}

/// One app in one region.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppStatus {
    pub app: String,
    pub active: Option<VersionId>,
    /// Versions loaded in memory, ready to activate at once.
    pub installed: Vec<VersionId>,
    /// A rollout in progress here: a share of the app's traffic on a new
    /// version.
    #[serde(default)]
    pub split: Option<Split>,
}

/// `PUT /_meridian/apps/<app>/split`: `percent` of the app's new clients
/// in this region go to `version` (installed, not the active one); each
/// client keeps the version it got (a cookie). 0 % is reachable only with
/// the version-override header (smoke tests).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Split {
    pub version: VersionId,
    pub percent: u8,
}

/// An app as the control plane defines it and every region learns it
/// (`PUT /_meridian/apps/<name>`): its name and the hostnames it answers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRecord {
    pub name: String,
    /// Hostnames (lowercase, no port) whose requests go to this app.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The app that answers requests to a bare address (an IP literal,
    /// `localhost`, or no `Host` at all). At most one app is the default.
    #[serde(default)]
    pub default: bool,
}

/// An app's rate limit as a region reports it in its health answer, so
/// edges refuse an app's excess traffic before it crosses the WAN.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppLimit {
    pub app: String,
    pub hosts: Vec<String>,
    #[serde(default)]
    pub default: bool,
    /// The app's `[limits] requests_per_second` (per region).
    pub requests_per_second: u32,
}

/// What deleting an app removed from one region's disk.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppRemoved {
    pub region: String,
    pub app: String,
    pub files: u64,
    pub bytes: u64,
}

/// Whether `s` can name an app: 1-32 characters of a-z, 0-9 and '-'. App
/// names appear in paths, file names and metric labels.
pub fn is_valid_app_name(s: &str) -> bool {
    crate::topology::is_valid_name(s)
}

/// Whether `s` is a hostname an app may claim: lowercase DNS labels of
/// a-z, 0-9 and '-', separated by dots, at most 253 characters, no port.
pub fn is_valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// The hostname of a `Host` header value (or URI authority): lowercased,
/// port removed, IPv6 brackets kept. `None` if it is not plausibly a host.
pub fn host_of(value: &str) -> Option<String> {
    let v = value.trim();
    if v.is_empty() || v.len() > 260 {
        return None;
    }
    let host = if v.starts_with('[') {
        &v[..=v.find(']')?]
    } else {
        match v.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => v,
        }
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Whether a host is a bare address (served by the default app): an IP
/// literal or `localhost`.
pub fn is_bare_address(host: &str) -> bool {
    host == "localhost" || host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok()
}

/// A region another region replicates with, reached through `url` (in a dev
/// world, the emulated link between the two).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    pub name: String,
    pub url: String,
    pub jurisdiction: String,
    /// Expected round trip, used to pick the nearest peer to forward to.
    #[serde(default)]
    pub rtt_ms: f64,
}

/// Replication towards one peer, as the sending region sees it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeerReplication {
    pub peer: String,
    /// Last sequence of our log the peer acknowledged.
    pub acked_seq: u64,
    /// Our log entries the peer has not acknowledged yet.
    pub pending: u64,
    pub pushes: u64,
    pub push_errors: u64,
    pub snapshots_sent: u64,
    /// Records sent in snapshots: only what the peer lacked, so a
    /// snapshot broken off and sent again adds only the rest.
    #[serde(default)]
    pub snapshot_records_sent: u64,
    /// Records repaired here by anti-entropy against this peer.
    pub repaired: u64,
    /// Anti-entropy rounds with this peer (one per namespace compared),
    /// and the tree nodes they compared: on equal data, one per round.
    #[serde(default)]
    pub anti_entropy_rounds: u64,
    #[serde(default)]
    pub tree_nodes_compared: u64,
    pub last_error: Option<String>,
}

/// What this region has applied of another region's writes.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OriginReplication {
    pub origin: String,
    pub incarnation: u64,
    pub applied_seq: u64,
    pub applied_records: u64,
    /// Replication lag (applied here minus written there) of recent records.
    pub lag_ms_p50: Option<f64>,
    pub lag_ms_p99: Option<f64>,
    pub lag_samples: u64,
}

/// `GET /_meridian/kv/status` of a region node.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KvStatus {
    pub region: String,
    pub incarnation: u64,
    pub last_seq: u64,
    pub log_len: u64,
    pub conflicts: u64,
    pub commits: u64,
    pub peers: Vec<PeerReplication>,
    pub origins: Vec<OriginReplication>,
    /// Replication messages refused (corrupt, wrong version, residency).
    pub rejected_messages: u64,
    /// Tombstones stored here, and collected since start.
    pub tombstones: u64,
    pub tombstones_collected: u64,
    /// Wall-clock ms up to which every region has applied every write
    /// (tombstones older than this are collected).
    pub stable_ms: u64,
    /// Raft groups of `strong` namespaces this region is a member of.
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
    /// Catching up after the store was opened (a restart, a wipe).
    #[serde(default)]
    pub rejoin: RejoinStatus,
    /// Anti-entropy tree changes not yet applied (background work left).
    #[serde(default)]
    pub tree_journal_pending: u64,
}

/// Whether a region's store has caught up with its peers since it was
/// opened; until then the region keeps users away.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RejoinStatus {
    /// `catching_up` (not serving), `caught_up`, or `gave_up` (the bound
    /// passed first; serving what it has).
    pub state: String,
    /// How long catching up took (or has taken so far).
    pub waited_ms: u64,
    pub bound_ms: u64,
    /// Peers it caught up with, and those it could not reach (not waited for).
    pub caught_up_with: Vec<String>,
    pub unreachable: Vec<String>,
    /// Records that changed here while catching up.
    pub records_repaired: u64,
}

/// One Raft group of a `strong` namespace, as a member sees it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupStatus {
    pub ns: String,
    pub node_id: u64,
    /// Leader, Follower, Candidate or Learner.
    pub state: String,
    pub term: u64,
    pub leader: Option<String>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    /// As leader: time since a quorum last acknowledged it (over the
    /// lease: cut off, and writes are refused).
    #[serde(default)]
    pub quorum_ack_ms: Option<u64>,
    /// As follower or candidate: time since it last heard from a leader.
    #[serde(default)]
    pub leader_silent_ms: Option<u64>,
    /// How long a member follows a silent leader before campaigning.
    #[serde(default)]
    pub lease_ms: u64,
    /// Pre-vote rounds this member started.
    #[serde(default)]
    pub campaigns: u64,
    /// Idempotency keys the group remembers.
    #[serde(default)]
    pub idempotency_keys: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_given_up_on_no_sooner_than_the_apps_functions_may_take() {
        let ms = std::time::Duration::from_millis;
        // Files only, or quick functions: the edge's own first-byte timeout.
        assert_eq!(first_byte_wait(ms(5_000), None, ms(30_000)), ms(5_000));
        assert_eq!(first_byte_wait(ms(5_000), Some(ms(3_000)), ms(30_000)), ms(5_000));
        // A function allowed 9 s (10 s with the margin) is waited for...
        assert_eq!(first_byte_wait(ms(5_000), Some(ms(10_000)), ms(30_000)), ms(10_000));
        // ...but never past the upstream timeout.
        assert_eq!(first_byte_wait(ms(5_000), Some(ms(60_000)), ms(30_000)), ms(30_000));
    }

    #[test]
    fn hosts_are_normalised_and_checked() {
        assert_eq!(host_of("Notes.LocalHost:8080").as_deref(), Some("notes.localhost"));
        assert_eq!(host_of("example.com.").as_deref(), Some("example.com"));
        assert_eq!(host_of("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(host_of(""), None);
        assert!(is_bare_address("127.0.0.1") && is_bare_address("[::1]") && is_bare_address("localhost"));
        assert!(!is_bare_address("hello.localhost"));
        assert!(is_valid_hostname("shop.example.com") && is_valid_hostname("a-b.localhost"));
        for bad in ["", "Shop.com", "a..b", "-a.com", "a_b.com", "a.com:80", &"a".repeat(64)] {
            assert!(!is_valid_hostname(bad), "{bad}");
        }
    }
}

/// What an edge purges from its cache. Everything is narrowed to `hosts`
/// (an app's hostnames), so one app cannot purge another's objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Purge {
    pub hosts: Vec<String>,
    /// Exact paths (with query, if any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// Tags of `Surrogate-Key` / `Cache-Tag` headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Everything of these hosts.
    #[serde(default)]
    pub all: bool,
    /// For the world's default app, which answers at any host no other app
    /// claims: also every host except these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any_host_but: Option<Vec<String>>,
    /// `Some(n)`, n > 0: for n ms, these hosts' answers are neither served
    /// from the cache nor stored (a rollout is under way: clients must see
    /// the version the regions give them). `Some(0)`: cache them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// A rollout from one version to another ended: everything it changed
    /// is purged, so what stays cached is the same in both, and is now
    /// labelled with the new version (`x-meridian-version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relabel: Option<Relabel>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Relabel {
    /// Short version ids, as in `x-meridian-version`.
    pub from: String,
    pub to: String,
}

impl Purge {
    pub fn is_empty(&self) -> bool {
        !self.all && self.paths.is_empty() && self.prefixes.is_empty() && self.tags.is_empty()
    }

    /// Does the purge reach objects of `host`?
    pub fn covers_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h == host)
            || self.any_host_but.as_ref().is_some_and(|but| !but.iter().any(|h| h == host))
    }

    /// Does the purge reach an object of `host` at `path` (with query),
    /// whose tags `has_tag` answers for?
    pub fn reaches(&self, host: &str, path: &str, has_tag: impl Fn(&str) -> bool) -> bool {
        self.covers_host(host)
            && (self.all
                || self.paths.iter().any(|x| x == path)
                || self.prefixes.iter().any(|x| path.starts_with(x.as_str()))
                || self.tags.iter().any(|t| has_tag(t)))
    }
}

/// How edges choose a region for an app's requests (the manifest's
/// `[routing]`). Regions tell edges each app's routing in their health
/// answers ([`AppRouting`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    #[serde(default)]
    pub policy: RoutingPolicy,
    /// `weighted`: each region's share, in percent.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub weights: std::collections::BTreeMap<String, u32>,
    /// `failover`: regions by priority; the first healthy one serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub order: Vec<String>,
    /// Keep a client on the region that first served it (a cookie), while
    /// that region is healthy.
    #[serde(default)]
    pub affinity: bool,
    /// Clients of these countries go to these regions first (`geo`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<CountryRule>,
    /// Clients of a jurisdiction served only by regions of one, and cached
    /// only at edges of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub residency: Vec<ResidencyRule>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingPolicy {
    /// Whatever the edge is configured with (`geo` unless told otherwise).
    #[default]
    Edge,
    /// The nearest region by distance from the client.
    Geo,
    /// The lowest measured round trip from the edge.
    Latency,
    /// A random region by `weights`.
    Weighted,
    /// The first healthy region of `order`.
    Failover,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CountryRule {
    /// ISO 3166-1 alpha-2 codes, upper case.
    pub countries: Vec<String>,
    pub region: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResidencyRule {
    /// Clients located in this jurisdiction ([`jurisdiction_of_country`])...
    pub clients: String,
    /// ...are served only by regions of this one.
    pub regions: String,
}

/// One app's routing as regions report it to edges.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct AppRouting {
    pub app: String,
    pub hosts: Vec<String>,
    #[serde(default)]
    pub default: bool,
    pub routing: Routing,
    /// The longest a healthy region may take to start answering one of the
    /// app's requests: its functions' longest `deadline_ms` plus
    /// [`ANSWER_MARGIN_MS`] (none for an app of static files only). An edge
    /// waits at least this long for a head before it takes the region for
    /// a dead one, so a slow function is neither run twice nor counted
    /// against its region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_within_ms: Option<u64>,
}

/// What a region may add to a function's deadline before its answer's head
/// is out: reading the request, taking an instance, writing the head.
pub const ANSWER_MARGIN_MS: u64 = 1_000;

/// How long to wait for the head of a region's answer before taking the
/// region for a dead one and trying another: the caller's own first-byte
/// timeout, or the app's `answer_within` when its functions may take
/// longer, and never past the caller's whole-request `cap`. Edges and
/// regions (forwarding) both wait by this rule, so neither gives up on a
/// slow function sooner than its deadline allows.
pub fn first_byte_wait(
    configured: std::time::Duration,
    answer_within: Option<std::time::Duration>,
    cap: std::time::Duration,
) -> std::time::Duration {
    answer_within.map_or(configured, |a| a.max(configured)).min(cap)
}

/// The member states of the European Union.
const EU: [&str; 27] = [
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT", "LT", "LU", "LV",
    "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
];

/// The jurisdiction a client of `country` (ISO alpha-2) is in: `eu` for
/// the EU's member states, else the country code in lower case (`us`,
/// `sg`, ...), the same names regions' certificates carry.
pub fn jurisdiction_of_country(country: &str) -> Option<String> {
    let c = country.trim().to_ascii_uppercase();
    if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    Some(if EU.contains(&c.as_str()) { "eu".into() } else { c.to_ascii_lowercase() })
}
