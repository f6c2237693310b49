//! The key-value vocabulary shared by the function host (which turns these
//! into `wasi:keyvalue` errors) and the data path (which produces them).

/// Largest value a guest may store, in bytes.
pub const MAX_VALUE: usize = 4 << 20;
/// Keys per `list-keys` page.
pub const LIST_PAGE: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvError {
    /// No namespace of that name is declared in the manifest.
    NoSuchStore,
    /// The namespace exists but this caller may not use it.
    AccessDenied,
    /// Nothing was done (a write was certainly not applied, a read not
    /// served): retrying is safe. For example, no leader could be found,
    /// or the region leading a strong namespace is cut off from a quorum.
    NotApplied(String),
    /// A write was sent and no answer came back: it may have been applied,
    /// or may still be. Retry only with the same idempotency key (then it
    /// applies at most once), or read before writing again.
    OutcomeUnknown(String),
    Other(String),
}

impl KvError {
    /// Whether the same operation may simply be sent again.
    pub fn retry_safe(&self) -> bool {
        matches!(self, KvError::NotApplied(_))
    }

    /// The kind as it travels between regions (`OpResult::error_kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            KvError::NoSuchStore => "no_such_store",
            KvError::AccessDenied => "access_denied",
            KvError::NotApplied(_) => "not_applied",
            KvError::OutcomeUnknown(_) => "outcome_unknown",
            KvError::Other(_) => "other",
        }
    }

    /// Rebuilds an error from its kind and message, as `kind` and
    /// `Display` sent them.
    pub fn from_kind(kind: Option<&str>, message: String) -> KvError {
        let strip = |m: String, prefix: &str| m.strip_prefix(prefix).map(str::to_string).unwrap_or(m);
        match kind {
            Some("no_such_store") => KvError::NoSuchStore,
            Some("access_denied") => KvError::AccessDenied,
            Some("not_applied") => KvError::NotApplied(strip(message, NOT_APPLIED)),
            Some("outcome_unknown") => KvError::OutcomeUnknown(strip(message, OUTCOME_UNKNOWN)),
            _ => KvError::Other(message),
        }
    }
}

/// How a [`KvError::NotApplied`] message starts (a guest sees only text).
pub const NOT_APPLIED: &str = "not applied (safe to retry): ";
/// How a [`KvError::OutcomeUnknown`] message starts.
pub const OUTCOME_UNKNOWN: &str = "outcome unknown (retry only with the same idempotency key): ";

impl std::fmt::Display for KvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvError::NoSuchStore => f.write_str("no such bucket"),
            KvError::AccessDenied => f.write_str("access denied"),
            KvError::NotApplied(s) => write!(f, "{NOT_APPLIED}{s}"),
            KvError::OutcomeUnknown(s) => write!(f, "{OUTCOME_UNKNOWN}{s}"),
            KvError::Other(s) => f.write_str(s),
        }
    }
}

pub type KvResult<T> = Result<T, KvError>;

/// An opaque version of a key, as read by a compare-and-swap.
pub type CasVersion = Vec<u8>;
