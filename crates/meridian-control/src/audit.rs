//! The audit log: every change asked of the control plane — who asked
//! (which token), what, on which app, when, and how it ended — one JSON
//! line each in `DATA_DIR/audit.jsonl`, appended and fsynced before the
//! answer goes out. Entries are numbered without gaps; a gap or a line
//! that does not parse is reported when the log is opened, never skipped
//! silently.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// 1, 2, 3, … without gaps.
    pub seq: u64,
    pub at_ms: u64,
    /// `admin` or `token <id>`.
    pub who: String,
    /// `deploy`, `rollback`, `rollout.abort`, `apps.create`, `tokens.revoke`, …
    pub action: String,
    pub app: Option<String>,
    /// What was asked (a version, a hostname list, a token id); never a
    /// secret or a stored value.
    pub detail: String,
    /// `ok`, or the status and reason it was refused or failed.
    pub outcome: String,
}

pub struct Audit {
    path: PathBuf,
    inner: Mutex<(std::fs::File, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("audit log {path} line {line}: {reason}")]
    Corrupt { path: PathBuf, line: usize, reason: String },
}

impl Audit {
    /// Opens (or creates, mode 0600) the log and checks it: numbered from
    /// 1 without gaps, every line an entry.
    pub fn open(path: PathBuf) -> Result<Audit, AuditError> {
        let io = |source| AuditError::Io { path: path.clone(), source };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let mut last = 0;
        for (i, line) in text.lines().enumerate() {
            let e: Entry = serde_json::from_str(line).map_err(|e| AuditError::Corrupt {
                path: path.clone(),
                line: i + 1,
                reason: e.to_string(),
            })?;
            if e.seq != last + 1 {
                return Err(AuditError::Corrupt {
                    path: path.clone(),
                    line: i + 1,
                    reason: format!("entry {} follows {last}: a gap", e.seq),
                });
            }
            last = e.seq;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path).map_err(io)?;
        Ok(Audit { path, inner: Mutex::new((file, last)) })
    }

    /// Appends one entry, durably; returns its number.
    pub fn record(
        &self,
        who: &str,
        action: &str,
        app: Option<&str>,
        detail: &str,
        outcome: &str,
    ) -> Result<u64, AuditError> {
        let mut g = self.inner.lock().unwrap();
        let entry = Entry {
            seq: g.1 + 1,
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            who: who.to_string(),
            action: action.to_string(),
            app: app.map(str::to_string),
            detail: detail.to_string(),
            outcome: outcome.to_string(),
        };
        let mut line = serde_json::to_vec(&entry).expect("an entry serialises");
        line.push(b'\n');
        let io = |source| AuditError::Io { path: self.path.clone(), source };
        g.0.write_all(&line).map_err(io)?;
        g.0.sync_data().map_err(io)?;
        g.1 = entry.seq;
        Ok(entry.seq)
    }

    /// Every entry, oldest first, that `keep` accepts.
    pub fn read(&self, keep: impl Fn(&Entry) -> bool) -> Result<Vec<Entry>, AuditError> {
        let _g = self.inner.lock().unwrap();
        let text =
            std::fs::read_to_string(&self.path).map_err(|source| AuditError::Io { path: self.path.clone(), source })?;
        Ok(text.lines().filter_map(|l| serde_json::from_str::<Entry>(l).ok()).filter(|e| keep(e)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_numbered_without_gaps_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(path.clone()).unwrap();
        assert_eq!(a.record("admin", "apps.create", Some("shop"), "shop.example.com", "ok").unwrap(), 1);
        assert_eq!(a.record("token ab12", "deploy", Some("shop"), "v1", "403: no").unwrap(), 2);
        drop(a);
        let a = Audit::open(path.clone()).unwrap();
        assert_eq!(a.record("admin", "deploy", Some("blog"), "v2", "ok").unwrap(), 3);
        let shop = a.read(|e| e.app.as_deref() == Some("shop")).unwrap();
        assert_eq!(shop.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A gap is found at open, not skipped.
        let text = std::fs::read_to_string(&path).unwrap();
        let without_second: Vec<&str> = text.lines().enumerate().filter(|(i, _)| *i != 1).map(|(_, l)| l).collect();
        std::fs::write(&path, without_second.join("\n") + "\n").unwrap();
        let err = Audit::open(path).err().unwrap();
        assert!(err.to_string().contains("a gap"), "{err}");
    }
}
