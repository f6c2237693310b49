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
    Other(String),
}

impl std::fmt::Display for KvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvError::NoSuchStore => f.write_str("no such bucket"),
            KvError::AccessDenied => f.write_str("access denied"),
            KvError::Other(s) => f.write_str(s),
        }
    }
}

pub type KvResult<T> = Result<T, KvError>;

/// An opaque version of a key, as read by a compare-and-swap.
pub type CasVersion = Vec<u8>;
