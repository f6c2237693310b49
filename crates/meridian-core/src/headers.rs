//! Header names shared by edges and regions.

/// Which region produced the response. Set by the region node.
pub const REGION: &str = "x-meridian-region";
/// Which app version produced the response. Set by the region node.
pub const VERSION: &str = "x-meridian-version";
/// Which edge routed the request. Set by the edge.
pub const EDGE: &str = "x-meridian-edge";
/// How many regions the edge tried before this response (1 = no retry).
pub const ATTEMPTS: &str = "x-meridian-attempts";
/// `<lat>,<lon>` of the client; honoured only by edges configured to trust it.
pub const CLIENT_GEO: &str = "x-meridian-client-geo";
/// ISO 3166-1 alpha-2 country of the client; honoured only when trusted.
pub const CLIENT_COUNTRY: &str = "x-meridian-client-country";
/// Set by a region on every error response, saying whose failure it is:
/// [`FAULT_APP`] (the app's own answer, or a deadline, memory limit or trap:
/// it would repeat in every region), [`FAULT_DEPENDENCY`] (another region it
/// needed did not answer) or [`FAULT_PLATFORM`] (this region failed: no
/// version here, a component missing). Edges retry on another region, and
/// count against this one's health, only a platform fault (or no answer at
/// all); the others are passed on as they are. A guest cannot set it.
pub const FAULT: &str = "x-meridian-fault";
pub const FAULT_APP: &str = "app";
pub const FAULT_DEPENDENCY: &str = "dependency";
pub const FAULT_PLATFORM: &str = "platform";
/// On a region's answer: the jurisdictions of pinned data the function
/// touched. Only edges of those jurisdictions store such an answer; edges
/// remove the header before answering clients.
pub const RESIDENCY: &str = "x-meridian-residency";
/// On a request: its writes to strong namespaces apply at most once. The
/// n-th write the function makes is keyed `<key>#<n>`; the same request
/// sent again with the same key (to any region) gets the first results
/// back and changes nothing again. The IETF draft's header name.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// On a region's answer to a request one of whose key-value writes failed:
/// `not-applied` (nothing was written: safe to retry) or `unknown` (a
/// write may have been applied: retry only with an `idempotency-key`).
pub const WRITE_OUTCOME: &str = "x-meridian-write-outcome";
/// The cookie that keeps a client on one region (`[routing] affinity`).
pub const AFFINITY_COOKIE: &str = "meridian-region";
/// An edge's own status (health and RTT of every region, as JSON).
pub const EDGE_STATUS_PATH: &str = "/_meridian/edge";
/// An edge's purge API (POST a JSON purge: hosts and paths, prefixes, tags).
pub const EDGE_PURGE_PATH: &str = "/_meridian/edge/purge";
/// An edge's metrics (Prometheus text).
pub const EDGE_METRICS_PATH: &str = "/_meridian/edge/metrics";
/// Prefix of paths a region reserves for its own API (health, install, ...).
pub const RESERVED_PREFIX: &str = "/_meridian/";
/// Whether a request path is the platform's, never an app's: anything
/// under `/_meridian` in any letter case, or percent-encoded (`%5F`), and
/// any path that is not plain origin form (`//host/…`, no leading `/`).
/// Manifests may not name such a path (routes, smoke tests), and a
/// request that names an app or a version is refused on one, whatever
/// certificate sends it.
pub fn is_reserved_path(path: &str) -> bool {
    if !path.starts_with('/') || path.starts_with("//") {
        return true;
    }
    let lower = path.to_ascii_lowercase();
    let decoded = lower.replace("%5f", "_");
    let reserved = RESERVED_PREFIX.trim_end_matches('/');
    decoded.strip_prefix(reserved).is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#']))
}

/// Whether a request header is the platform's to set, never a client's
/// or a manifest's: which app and version serve a request, where it was
/// forwarded from, and every other `x-meridian-` name; `Host`, `Forwarded`
/// and the `X-Forwarded-` family. A smoke test may not carry one.
pub fn is_platform_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "host" || n == "forwarded" || n.starts_with("x-forwarded-") || n.starts_with("x-meridian-")
}

/// Causality token of the writes a response followed (`origin:incarnation:seq`,
/// comma-separated). Sent back by clients as this header or as the cookie
/// [`CAUSALITY_COOKIE`]; a region serves them only once it has those writes.
pub const CAUSALITY: &str = "x-meridian-causality";
pub const CAUSALITY_COOKIE: &str = "meridian-causality";
/// The app a request is for, set by a region forwarding it to another one
/// (honoured only from region and operator certificates; the public port
/// drops it and chooses the app by `Host`).
pub const APP: &str = "x-meridian-app";
/// A request naming the version (short or full id) that must serve it,
/// installed but possibly taking no traffic: how smoke tests reach a new
/// version. Honoured only from control and operator certificates.
pub const VERSION_OVERRIDE: &str = "x-meridian-version-override";
/// The cookie that keeps a client on one version while a region splits an
/// app's traffic between two.
pub const VERSION_COOKIE: &str = "meridian-version";
/// The engine (compatibility hash) a shipped compiled artifact was made for.
pub const ENGINE: &str = "x-meridian-engine";
/// A shipped compiled artifact's signature (hex, ECDSA P-256) and the
/// signer's certificate (hex DER): see [`artifact_message`].
pub const SIGNATURE: &str = "x-meridian-signature";
pub const SIGNER: &str = "x-meridian-signer";

/// What the control plane signs for a compiled artifact: the component's
/// SHA-256 (hex), the engine it was compiled for and the artifact's own
/// SHA-256, so a signature covers exactly one artifact of one component
/// for one engine.
pub fn artifact_message(component_sha256_hex: &str, engine: &str, artifact_sha256: &[u8]) -> Vec<u8> {
    let mut m = b"meridian-artifact-v1\0".to_vec();
    m.extend_from_slice(component_sha256_hex.as_bytes());
    m.push(0);
    m.extend_from_slice(engine.as_bytes());
    m.push(0);
    m.extend_from_slice(artifact_sha256);
    m
}

/// Set on a request a region forwarded to another one (never forwarded again).
pub const FORWARDED: &str = "x-meridian-forwarded";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_paths_in_every_spelling_are_the_platforms() {
        for p in [
            "/_meridian",
            "/_meridian/",
            "/_meridian/apps/notes/kv/op",
            "/_MERIDIAN/apps",
            "/%5Fmeridian/apps",
            "/%5fMeridian",
            "/_meridian?x=1",
            "//_meridian/apps",
            "//evil.example/x",
            "_meridian/apps",
            "",
            "http://x/_meridian/apps",
        ] {
            assert!(is_reserved_path(p), "{p:?}");
        }
        for p in ["/", "/hello", "/_meridianx", "/api/_meridian/x", "/kv/notes/first?x=/_meridian/"] {
            assert!(!is_reserved_path(p), "{p:?}");
        }
    }

    #[test]
    fn platform_headers_are_named_by_family() {
        for h in ["Host", "x-meridian-app", "X-Meridian-Version-Override", "x-forwarded-host", "Forwarded", "x-meridian-anything"] {
            assert!(is_platform_header(h), "{h}");
        }
        for h in ["x-user", "authorization", "cookie", "x-forwarded", "meridian-app"] {
            assert!(!is_platform_header(h), "{h}");
        }
    }
}
