//! What every Raft group in Meridian shares — the `strong` key-value
//! namespaces' groups (meridian-data) and the control plane's
//! (meridian-control): the log on redb ([`RedbLog`]), and how a member's
//! answer to a Raft message is read ([`rpc`]). Each group keeps its state
//! machine itself, in the same database, so applying entries and recording
//! how far they were applied commit together.
//!
//! Tables: `raft_log` (entries by index, JSON), `raft_meta` (the vote, the
//! committed and last purged log ids; state machines put `applied` and
//! `membership` there too). Every append is fsynced (redb commits durably)
//! before openraft is told the entries are stored.

// The storage traits dictate openraft's (large) error type.
#![allow(clippy::result_large_err)]

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, BasicNode, Entry, LogId, RaftLogReader, RaftTypeConfig, StorageError, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::sync::Arc;

pub type NodeId = u64;

pub const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

/// A storage failure, as openraft wants it.
pub fn io<E: std::fmt::Display>(e: E) -> StorageError<NodeId> {
    StorageIOError::write(AnyError::error(e.to_string())).into()
}

pub fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StorageError<NodeId>> {
    serde_json::to_vec(v).map_err(io)
}

pub fn dec<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StorageError<NodeId>> {
    serde_json::from_slice(b).map_err(io)
}

/// The log of one group.
pub struct RedbLog<C> {
    db: Arc<Database>,
    _config: PhantomData<fn() -> C>,
}

impl<C> Clone for RedbLog<C> {
    fn clone(&self) -> Self {
        RedbLog { db: self.db.clone(), _config: PhantomData }
    }
}

impl<C> RedbLog<C> {
    /// The log in `db` (its tables made if missing).
    pub fn new(db: Arc<Database>) -> Result<RedbLog<C>, redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(RedbLog { db, _config: PhantomData })
    }

    pub fn meta_get<T: serde::de::DeserializeOwned>(&self, k: &str) -> Result<Option<T>, StorageError<NodeId>> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(META).map_err(io)?;
        let v = t.get(k).map_err(io)?;
        v.map(|v| dec(v.value())).transpose()
    }

    pub fn meta_put<T: serde::Serialize>(&self, k: &str, v: &T) -> Result<(), StorageError<NodeId>> {
        let txn = self.db.begin_write().map_err(io)?;
        txn.open_table(META).map_err(io)?.insert(k, enc(v)?.as_slice()).map_err(io)?;
        txn.commit().map_err(io)
    }
}

impl<C> RaftLogReader<C> for RedbLog<C>
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode, Entry = Entry<C>>,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<C>>, StorageError<NodeId>> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(LOG).map_err(io)?;
        let mut out = Vec::new();
        for e in t.range(range).map_err(io)? {
            let (_, v) = e.map_err(io)?;
            out.push(dec(v.value())?);
        }
        Ok(out)
    }
}

impl<C> RaftLogStorage<C> for RedbLog<C>
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode, Entry = Entry<C>>,
{
    type LogReader = RedbLog<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.meta_get("last_purged")?;
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(LOG).map_err(io)?;
        let last = match t.last().map_err(io)? {
            Some((_, v)) => Some(dec::<Entry<C>>(v.value())?.log_id),
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.meta_put("vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.meta_get("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        self.meta_put("committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.meta_get::<Option<LogId<NodeId>>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<C>> + Send,
        I::IntoIter: Send,
    {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut t = txn.open_table(LOG).map_err(io)?;
            for e in entries {
                t.insert(e.log_id.index, enc(&e)?.as_slice()).map_err(io)?;
            }
        }
        // Durable (fsync) before Raft counts the entries as stored.
        txn.commit().map_err(io)?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let txn = self.db.begin_write().map_err(io)?;
        txn.open_table(LOG).map_err(io)?.retain_in(log_id.index.., |_, _| false).map_err(io)?;
        txn.commit().map_err(io)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let txn = self.db.begin_write().map_err(io)?;
        txn.open_table(META).map_err(io)?.insert("last_purged", enc(&Some(log_id))?.as_slice()).map_err(io)?;
        txn.open_table(LOG).map_err(io)?.retain_in(..=log_id.index, |_, _| false).map_err(io)?;
        txn.commit().map_err(io)
    }
}

/// Raft messages between members travel as JSON over HTTPS (mutual TLS);
/// the answer is HTTP 200 with the JSON of the receiver's
/// `Result<Response, RaftError>`.
pub mod rpc {
    use super::NodeId;
    use openraft::error::{NetworkError, RPCError, RaftError, RemoteError, Unreachable};
    use openraft::BasicNode;

    /// Why a message did not get an answer.
    #[derive(Debug)]
    pub struct Failure(pub String);

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Failure {}

    pub type Error<E> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

    /// The member could not be reached (openraft backs off before retrying).
    pub fn unreachable<E: std::error::Error>(why: impl Into<String>) -> Error<E> {
        RPCError::Unreachable(Unreachable::new(&Failure(why.into())))
    }

    /// The request could not be encoded.
    pub fn encoding<E: std::error::Error>(e: serde_json::Error) -> Error<E> {
        RPCError::Network(NetworkError::new(&e))
    }

    /// Reads `member`'s (node `target`'s) answer.
    pub fn answer<Resp, E>(target: NodeId, member: &str, status: u16, body: &[u8]) -> Result<Resp, Error<E>>
    where
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        if status != 200 {
            let text = String::from_utf8_lossy(body);
            return Err(RPCError::Network(NetworkError::new(&Failure(format!(
                "{member}: HTTP {status}: {}",
                text.trim()
            )))));
        }
        let r: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(body).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }
}
