//! Where the outbox keeps its records: the storage seam under the one outbox protocol.
//!
//! [`Store::Disk`] is what the agent runs: a sled tree, the write-ahead log in front of it and
//! the group-commit thread (see the module docs of [`super`]). [`Store::Memory`] keeps the same
//! keys and encoded records in a `BTreeMap` and makes nothing durable: it is for the fleet
//! simulator, whose thousands of devices cannot each hold a database, a log file and a commit
//! thread. Admission, seqs, expiry, eviction, ordering and acks stay in [`super::Outbox`] and
//! are the same code for both.
//!
//! **Invariant:** both stores hold the same bytes under the same 9-byte keys, so iteration
//! order (priority, then seq) is the same. **Boundary:** used only by [`super::Outbox`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sled::IVec;

use super::commit::{CommitError, Committer};
use super::wal::Wal;

/// A key in the store (`[class u8][seq u64 BE]`, see [`super::Key`]).
pub(super) type RawKey = [u8; 9];

pub(super) enum Store {
    Disk(Disk),
    Memory(MemoryStore),
}

pub(super) struct Disk {
    pub tree: sled::Db,
    /// Lock order: the outbox's `inner` before `wal` wherever both are held.
    pub wal: Mutex<Wal>,
    pub committer: Committer,
}

impl Disk {
    pub fn wal_lock(&self) -> MutexGuard<'_, Wal> {
        self.wal.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An outbox's records kept in memory, for simulated devices (`Outbox::open_in_memory`).
/// Clones share the records: a simulator keeps one across a device's restart to model a
/// reboot that keeps the outbox, and starts a fresh one to model a power cut that loses it.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Memory>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("records", &self.lock().records.len())
            .finish()
    }
}

#[derive(Default)]
struct Memory {
    records: BTreeMap<RawKey, IVec>,
    /// Set by the first open; kept across reopens like the disk store's meta key.
    incarnation: Option<u64>,
    next_seq: u64,
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, Memory> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store's incarnation and next seq, creating them on first use.
    pub(super) fn open(&self) -> (u64, u64) {
        let mut m = self.lock();
        let inc = *m.incarnation.get_or_insert_with(rand::random);
        (inc, m.next_seq)
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn raw(k: &[u8]) -> Option<RawKey> {
    k.try_into().ok()
}

impl Store {
    /// Stores a record and the next seq to hand out, together.
    pub fn insert(
        &self,
        key: RawKey,
        record: &[u8],
        next_seq: u64,
        next_seq_key: &[u8],
    ) -> Result<(), sled::Error> {
        match self {
            Store::Disk(d) => {
                let mut batch = sled::Batch::default();
                batch.insert(&key, record);
                batch.insert(next_seq_key, &next_seq.to_be_bytes());
                d.tree.apply_batch(batch)
            }
            Store::Memory(m) => {
                let mut m = m.lock();
                m.records.insert(key, IVec::from(record));
                m.next_seq = m.next_seq.max(next_seq);
                Ok(())
            }
        }
    }

    pub fn remove(&self, key: &[u8]) -> Result<Option<IVec>, sled::Error> {
        match self {
            Store::Disk(d) => d.tree.remove(key),
            Store::Memory(m) => Ok(raw(key).and_then(|k| m.lock().records.remove(&k))),
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            Store::Disk(d) => d.tree.contains_key(key).unwrap_or(false),
            Store::Memory(m) => raw(key).is_some_and(|k| m.lock().records.contains_key(&k)),
        }
    }

    /// The first record with a key in `start..=end`.
    pub fn first_in(
        &self,
        start: RawKey,
        end: RawKey,
    ) -> Result<Option<(IVec, IVec)>, sled::Error> {
        match self {
            Store::Disk(d) => d.tree.range(start..=end).next().transpose(),
            Store::Memory(m) => Ok(m
                .lock()
                .records
                .range(start..=end)
                .next()
                .map(|(k, v)| (IVec::from(k.as_slice()), v.clone()))),
        }
    }

    /// The key of the last record in `start..end`.
    pub fn last_key_before(&self, start: RawKey, end: RawKey) -> Result<Option<IVec>, sled::Error> {
        match self {
            Store::Disk(d) => d
                .tree
                .range(start..end)
                .next_back()
                .transpose()
                .map(|o| o.map(|(k, _)| k)),
            Store::Memory(m) => Ok(m
                .lock()
                .records
                .range(start..end)
                .next_back()
                .map(|(k, _)| IVec::from(k.as_slice()))),
        }
    }

    /// The keys in `start..=end` (a read error ends the list early).
    pub fn keys_in(&self, start: RawKey, end: RawKey) -> Vec<IVec> {
        match self {
            Store::Disk(d) => d
                .tree
                .range(start..=end)
                .keys()
                .map_while(Result::ok)
                .collect(),
            Store::Memory(m) => m
                .lock()
                .records
                .range(start..=end)
                .map(|(k, _)| IVec::from(k.as_slice()))
                .collect(),
        }
    }

    /// Calls `f` on every record with a key in `start..end`, in key order, until it returns
    /// false. `f` must not call back into the store (the memory store holds its lock).
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        mut f: impl FnMut(&[u8], &IVec) -> bool,
    ) -> Result<(), sled::Error> {
        match self {
            Store::Disk(d) => {
                for item in d.tree.range(start..end) {
                    let (k, v) = item?;
                    if !f(&k, &v) {
                        break;
                    }
                }
            }
            Store::Memory(m) => {
                let (Some(start), Some(end)) = (raw_bound(start), raw_bound(end)) else {
                    return Ok(());
                };
                for (k, v) in m.lock().records.range(start..end) {
                    if !f(k, v) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Appends frames to the write-ahead log (nothing to do in memory).
    pub fn append_log(&self, frames: &[u8]) -> std::io::Result<()> {
        match self {
            Store::Disk(d) => d.wal_lock().append(frames),
            Store::Memory(_) => Ok(()),
        }
    }

    /// The log's length (disk), to cut a failed batch back to with [`Store::cut_log`].
    pub fn log_len(&self) -> Option<u64> {
        match self {
            Store::Disk(d) => Some(d.wal_lock().len()),
            Store::Memory(_) => None,
        }
    }

    /// Cuts the log back to `len`, dropping frames appended since.
    pub fn cut_log(&self, len: u64) -> std::io::Result<()> {
        match self {
            Store::Disk(d) => d.wal_lock().cut(len),
            Store::Memory(_) => Ok(()),
        }
    }

    /// Whether changes are logged (disk) and so worth encoding as frames.
    pub fn logs(&self) -> bool {
        matches!(self, Store::Disk(_))
    }

    /// Waits until every record inserted before this call is durable; at once in memory.
    pub async fn commit(&self) -> Result<(), CommitError> {
        match self {
            Store::Disk(d) => d.committer.commit().await,
            Store::Memory(_) => Ok(()),
        }
    }
}

/// A scan bound as a fixed-size key: a shorter prefix (such as `[0xF0]`, where the meta keys
/// start) pads with zeros, the smallest key it begins, which orders the same as the prefix.
fn raw_bound(b: &[u8]) -> Option<RawKey> {
    if b.len() > 9 {
        return None;
    }
    let mut k = [0u8; 9];
    k[..b.len()].copy_from_slice(b);
    Some(k)
}
