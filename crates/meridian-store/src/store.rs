//! Records of every namespace of one region in one redb database.
//!
//! redb: a pure-Rust, ACID, copy-on-write B-tree; a commit returns only
//! after the data is fsynced, which is the durability a write must have
//! before it is acknowledged. Keys are `namespace \0 key`, values are
//! encoded [`Record`]s; the format version is kept in a meta table and
//! checked on open.

use crate::hlc::Hlc;
use crate::record::{DecodeError, Record, Value};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::Path;

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// On-disk layout version (keys and record encoding).
pub const DISK_FORMAT: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("stored record for {key:?} is unreadable: {source}")]
    Decode { key: String, source: DecodeError },
    #[error("data directory has on-disk format {0}; this build reads format {DISK_FORMAT}")]
    Format(u64),
    #[error("namespace {0:?} is not a valid name")]
    Namespace(String),
}

fn engine<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Engine(e.into().to_string())
}

/// What merging a remote record did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The key was new here.
    Inserted,
    /// The stored version changed.
    Merged,
    /// The remote record added nothing (already seen, or older).
    Unchanged,
}

pub struct Store {
    db: Database,
    region: String,
    hlc: Hlc,
}

fn full_key(ns: &str, key: &[u8]) -> Result<Vec<u8>, StoreError> {
    if ns.is_empty() || ns.contains('\0') {
        return Err(StoreError::Namespace(ns.to_string()));
    }
    let mut k = Vec::with_capacity(ns.len() + 1 + key.len());
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    Ok(k)
}

impl Store {
    pub fn open(path: &Path, region: &str) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(engine)?;
        let txn = db.begin_write().map_err(engine)?;
        {
            let mut meta = txn.open_table(META).map_err(engine)?;
            let found = meta.get("format").map_err(engine)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("format", DISK_FORMAT).map_err(engine)?;
                }
                Some(DISK_FORMAT) => {}
                Some(other) => return Err(StoreError::Format(other)),
            }
            txn.open_table(RECORDS).map_err(engine)?;
        }
        txn.commit().map_err(engine)?;
        let store = Store { db, region: region.to_string(), hlc: Hlc::system() };
        // Never issue a timestamp below one already stored, even if the
        // clock went back across a restart.
        let max = store.scan_all()?.into_iter().map(|(_, r)| r.ts).max();
        if let Some(ts) = max {
            store.hlc.observe(ts);
        }
        Ok(store)
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Record>, StoreError> {
        let k = full_key(ns, key)?;
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RECORDS).map_err(engine)?;
        let v = table.get(k.as_slice()).map_err(engine)?;
        v.map(|v| decode(&k, v.value())).transpose()
    }

    /// Reads, changes and writes one key in one durable transaction.
    fn update(
        &self,
        ns: &str,
        key: &[u8],
        f: impl FnOnce(Option<Record>) -> Option<Record>,
    ) -> Result<Option<Record>, StoreError> {
        let k = full_key(ns, key)?;
        let txn = self.db.begin_write().map_err(engine)?;
        let out = {
            let mut table = txn.open_table(RECORDS).map_err(engine)?;
            let old = table.get(k.as_slice()).map_err(engine)?.map(|v| decode(&k, v.value())).transpose()?;
            let new = f(old.clone());
            if let Some(r) = &new {
                if Some(r) != old.as_ref() {
                    table.insert(k.as_slice(), r.encode().as_slice()).map_err(engine)?;
                }
            }
            new
        };
        txn.commit().map_err(engine)?;
        Ok(out)
    }

    fn local(&self, value: Value) -> Record {
        Record { value, ts: self.hlc.now(), origin: self.region.clone() }
    }

    /// Writes a value; durable on disk when this returns.
    pub fn put(&self, ns: &str, key: &[u8], value: Vec<u8>) -> Result<Record, StoreError> {
        let rec = self.local(Value::Bytes(value));
        self.update(ns, key, |_| Some(rec.clone()))?;
        Ok(rec)
    }

    /// Deletes by writing a tombstone; durable on disk when this returns.
    pub fn delete(&self, ns: &str, key: &[u8]) -> Result<Record, StoreError> {
        let rec = self.local(Value::Tombstone);
        self.update(ns, key, |_| Some(rec.clone()))?;
        Ok(rec)
    }

    /// Adds `delta` to a counter (a key that holds no counter starts at 0).
    /// Returns the new record and the counter's value.
    pub fn increment(&self, ns: &str, key: &[u8], delta: i64) -> Result<(Record, i64), StoreError> {
        let ts = self.hlc.now();
        let region = self.region.clone();
        let rec = self
            .update(ns, key, move |old| {
                let (mut incs, mut decs) = match old.map(|r| r.value) {
                    Some(Value::Counter { incs, decs }) => (incs, decs),
                    _ => (BTreeMap::new(), BTreeMap::new()),
                };
                let side = if delta >= 0 { &mut incs } else { &mut decs };
                *side.entry(region.clone()).or_insert(0) += delta.unsigned_abs();
                Some(Record { value: Value::Counter { incs, decs }, ts, origin: region })
            })?
            .expect("increment always writes");
        let total = rec.value.counter_total().unwrap_or(0);
        Ok((rec, total))
    }

    /// Merges a record written elsewhere.
    pub fn apply_remote(&self, ns: &str, key: &[u8], remote: &Record) -> Result<Applied, StoreError> {
        self.hlc.observe(remote.ts);
        let mut applied = Applied::Unchanged;
        self.update(ns, key, |old| match old {
            None => {
                applied = Applied::Inserted;
                Some(remote.clone())
            }
            Some(old) => {
                let merged = old.merge(remote);
                if merged != old {
                    applied = Applied::Merged;
                }
                Some(merged)
            }
        })?;
        Ok(applied)
    }

    /// Every record of a namespace, in key order.
    pub fn scan(&self, ns: &str) -> Result<Vec<(Vec<u8>, Record)>, StoreError> {
        let prefix = full_key(ns, b"")?;
        Ok(self
            .scan_all()?
            .into_iter()
            .filter_map(|(k, r)| k.strip_prefix(prefix.as_slice()).map(|key| (key.to_vec(), r)))
            .collect())
    }

    fn scan_all(&self) -> Result<Vec<(Vec<u8>, Record)>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RECORDS).map_err(engine)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(engine)? {
            let (k, v) = entry.map_err(engine)?;
            out.push((k.value().to_vec(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<Record, StoreError> {
    Record::decode(bytes)
        .map_err(|source| StoreError::Decode { key: String::from_utf8_lossy(key).into_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        let (put, del);
        {
            let s = Store::open(&path, "eu-west").unwrap();
            put = s.put("sessions", b"a", b"1".to_vec()).unwrap();
            s.put("sessions", b"b", b"2".to_vec()).unwrap();
            del = s.delete("sessions", b"b").unwrap();
            s.increment("hits", b"home", 5).unwrap();
            s.increment("hits", b"home", -2).unwrap();
        }
        let s = Store::open(&path, "eu-west").unwrap();
        assert_eq!(s.get("sessions", b"a").unwrap(), Some(put));
        assert_eq!(s.get("sessions", b"b").unwrap().as_ref(), Some(&del));
        assert_eq!(s.get("hits", b"home").unwrap().unwrap().value.counter_total(), Some(3));
        assert_eq!(s.scan("sessions").unwrap().len(), 2);
        assert!(s.get("other", b"a").unwrap().is_none());
        // Timestamps keep increasing across the restart.
        assert!(s.put("sessions", b"c", vec![]).unwrap().ts > del.ts);
    }

    #[test]
    fn replicas_converge_whatever_order_records_arrive_in() {
        let dir = tempfile::tempdir().unwrap();
        let eu = Store::open(&dir.path().join("eu"), "eu-west").unwrap();
        let us = Store::open(&dir.path().join("us"), "us-east").unwrap();
        // Concurrent writes to the same keys in both regions.
        let mut from_eu = vec![eu.put("s", b"k", b"eu".to_vec()).unwrap()];
        let mut from_us = vec![us.put("s", b"k", b"us".to_vec()).unwrap()];
        from_eu.push(eu.increment("c", b"n", 4).unwrap().0);
        from_us.push(us.increment("c", b"n", 3).unwrap().0);
        // Exchange in opposite orders.
        for (r, (ns, key)) in from_us.iter().zip([("s", b"k"), ("c", b"n")]) {
            eu.apply_remote(ns, key, r).unwrap();
        }
        for (r, (ns, key)) in from_eu.iter().zip([("s", b"k"), ("c", b"n")]).rev() {
            us.apply_remote(ns, key, r).unwrap();
        }
        for ns in ["s", "c"] {
            assert_eq!(eu.scan(ns).unwrap(), us.scan(ns).unwrap(), "namespace {ns}");
        }
        assert_eq!(eu.get("c", b"n").unwrap().unwrap().value.counter_total(), Some(7));
        // Applying the same record again changes nothing.
        assert_eq!(eu.apply_remote("s", b"k", &from_us[0]).unwrap(), Applied::Unchanged);
    }

    #[test]
    fn a_database_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format", 99).unwrap();
            txn.commit().unwrap();
        }
        assert!(matches!(Store::open(&path, "x"), Err(StoreError::Format(99))));
    }
}
