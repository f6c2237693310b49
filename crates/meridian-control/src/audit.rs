//! The audit log: every change asked of the control plane — who asked
//! (which token, or which control node on its own), what, on which app,
//! when, and how it ended. Entries are commands in the replicated log (see
//! [`crate::consensus`]), numbered when applied, so every control node has
//! the same entries under the same numbers, without gaps, and a change of
//! leader loses none.
//!
//! Control planes from before replication kept `DATA_DIR/audit.jsonl`;
//! [`read_legacy`] reads it once, for the import into the replicated log.

use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// 1, 2, 3, … without gaps.
    pub seq: u64,
    pub at_ms: u64,
    /// `admin`, `token <id>` or `control <node>`.
    pub who: String,
    /// `deploy`, `rollback`, `rollout.start`, `rollout.resume`,
    /// `rollout.abort`, `apps.create`, `tokens.revoke`, …
    pub action: String,
    pub app: Option<String>,
    /// What was asked (a version, a hostname list, a token id); never a
    /// secret or a stored value.
    pub detail: String,
    /// `ok`, or the status and reason it was refused or failed.
    pub outcome: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("audit log {path} line {line}: {reason}")]
    Corrupt { path: PathBuf, line: usize, reason: String },
}

/// Reads a log of one JSON entry per line, checking it: numbered from 1
/// without gaps, every line an entry. A missing file is an empty log.
pub fn read_legacy(path: &Path) -> Result<Vec<Entry>, AuditError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(AuditError::Io { path: path.to_path_buf(), source }),
    };
    let mut out: Vec<Entry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let corrupt = |reason: String| AuditError::Corrupt { path: path.to_path_buf(), line: i + 1, reason };
        let e: Entry = serde_json::from_str(line).map_err(|e| corrupt(e.to_string()))?;
        let last = out.last().map(|l| l.seq).unwrap_or(0);
        if e.seq != last + 1 {
            return Err(corrupt(format!("entry {} follows {last}: a gap", e.seq)));
        }
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_legacy_log_is_read_whole_and_a_gap_is_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        assert!(read_legacy(&path).unwrap().is_empty());
        let entry = |seq| Entry {
            seq,
            at_ms: 1,
            who: "admin".into(),
            action: "deploy".into(),
            app: Some("shop".into()),
            detail: "v1".into(),
            outcome: "ok".into(),
        };
        let line = |e: Entry| serde_json::to_string(&e).unwrap() + "\n";
        std::fs::write(&path, line(entry(1)) + &line(entry(2))).unwrap();
        assert_eq!(read_legacy(&path).unwrap().len(), 2);
        std::fs::write(&path, line(entry(1)) + &line(entry(3))).unwrap();
        let err = read_legacy(&path).unwrap_err();
        assert!(err.to_string().contains("a gap"), "{err}");
    }
}
