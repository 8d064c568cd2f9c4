//! Durable outbox: every outbound message is stored here before it is sent, and removed only
//! when the coordinator acknowledges that it has committed it (`protocol::v1::ack`; the
//! broker's PUBACK is not enough).
//!
//! Storage is one sled tree. Message keys are `[class u8][seq u64 BE]`, so iteration order is
//! priority first, then enqueue order within a class. Meta keys start with `0xF0`.
//!
//! Durability: sled's `flush()` is not power-safe on its own (it uses `sync_file_range`; sled
//! issue #1452) and costs several synchronous writes per call. So every change is also appended
//! to a write-ahead log ([`wal`]) and an enqueue is durable once that log is `fdatasync`'d. One
//! committer thread does that for every waiting enqueue at once (group commit): while it syncs,
//! new enqueues queue up and share the next sync, so throughput grows with concurrency. sled
//! reaches the disk at checkpoints (flush + fsync of its files), after which the log is emptied;
//! at open the log is replayed into sled.
//!
//! The records live behind a storage seam ([`store`]): the agent's store is the sled tree with
//! its log; the fleet simulator keeps them in memory ([`Outbox::open_in_memory`]) and runs this
//! same outbox logic with no file, no thread and no durability.

pub mod accounting;
mod commit;
pub mod config;
mod record;
pub mod store;
pub mod wal;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use protocol::v1::{Class, OutboxStats};
use tokio::sync::Notify;

use accounting::{Accounting, Admission, Refusal, Removal};
use commit::Committer;
pub use config::{OnCorruption, OutboxConfig};
pub use record::Record;
pub use store::MemoryStore;
use store::{Disk, Store};

/// Free disk space we never eat into: sled needs room to write segments and snapshots, and
/// other processes on a small board need some too.
const DISK_RESERVE_BYTES: u64 = 4 * 1024 * 1024;

const META_INCARNATION: &[u8] = b"\xF0incarnation";
const META_NEXT_SEQ: &[u8] = b"\xF0next_seq";
/// Written beside the database at creation; if it exists but the database lost its meta keys,
/// sled recovered an empty or truncated log from a damaged file and we must not carry on.
const INCARNATION_FILE: &str = "outbox.incarnation";
/// The write-ahead log, beside the sled directory.
const WAL_FILE: &str = "outbox.wal";
/// Checkpoint sled and empty the log once it holds this much.
const CHECKPOINT_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox store {path} is corrupted: {reason}")]
    Corrupted { path: PathBuf, reason: String },
    #[error("outbox store {path}: {source}")]
    Store { path: PathBuf, source: sled::Error },
    #[error("outbox store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "disk full: {available} bytes free on the filesystem of {path} (keeping {reserve} in reserve); message refused"
    )]
    DiskFull {
        path: PathBuf,
        available: u64,
        reserve: u64,
    },
    #[error(
        "outbox full: {used} of {capacity} bytes used by messages that may not be dropped; {class} message of {size} bytes refused"
    )]
    Full {
        used: u64,
        capacity: u64,
        class: Class,
        size: u64,
    },
    #[error("message of {size} bytes is larger than the whole outbox ({capacity} bytes)")]
    TooLarge { size: u64, capacity: u64 },
    #[error(
        "outbox store {path} is locked by another process: is another edge-agent running with this state_dir?"
    )]
    Locked { path: PathBuf },
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error("outbox is shutting down")]
    Closed,
}

/// A message to enqueue. `body` is the JSON body (the uplink wraps it in the JSON envelope),
/// or a binary body made by [`NewMessage::binary`] (sent in the compact binary envelope).
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub class: Class,
    pub topic: String,
    pub body: Vec<u8>,
    /// Overrides the class's default TTL; `Some(Duration::ZERO)` means never expire.
    pub ttl: Option<Duration>,
}

/// First byte of a stored binary body: `0 | kind_len u8 | kind | bytes`. A JSON body never
/// starts with a zero byte, so records written before binary bodies existed read as before.
const BINARY_BODY: u8 = 0;

impl NewMessage {
    /// A bulk message (e.g. a federated-learning update) sent as a
    /// [`protocol::v1::binary::BinaryEnvelope`] of `kind` (at most 255 bytes).
    pub fn binary(
        class: Class,
        topic: String,
        kind: &str,
        bytes: &[u8],
        ttl: Option<Duration>,
    ) -> NewMessage {
        let kind = &kind.as_bytes()[..kind.len().min(255)];
        let mut body = Vec::with_capacity(2 + kind.len() + bytes.len());
        body.push(BINARY_BODY);
        body.push(kind.len() as u8);
        body.extend_from_slice(kind);
        body.extend_from_slice(bytes);
        NewMessage {
            class,
            topic,
            body,
            ttl,
        }
    }
}

/// Splits a stored body made by [`NewMessage::binary`] into kind and bytes; `None` for a JSON
/// body (or a binary one too short to be well formed).
pub fn binary_body(body: &[u8]) -> Option<(&str, &[u8])> {
    let (&first, rest) = body.split_first()?;
    if first != BINARY_BODY {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let len = len as usize;
    if rest.len() < len {
        return None;
    }
    let kind = std::str::from_utf8(&rest[..len]).ok()?;
    Some((kind, &rest[len..]))
}

/// A durably accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    pub seq: u64,
    pub class: Class,
}

/// Position of a message in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub class: Class,
    pub seq: u64,
}

impl Key {
    fn to_bytes(self) -> [u8; 9] {
        let mut k = [0u8; 9];
        k[0] = self.class.index() as u8;
        k[1..].copy_from_slice(&self.seq.to_be_bytes());
        k
    }

    fn from_bytes(b: &[u8]) -> Option<Key> {
        if b.len() != 9 {
            return None;
        }
        let class = Class::from_index(b[0])?;
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[1..]);
        Some(Key {
            class,
            seq: u64::from_be_bytes(s),
        })
    }
}

/// A stored message as read back for sending.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: Key,
    pub record: Record,
}

struct Inner {
    acct: Accounting,
    next_seq: u64,
}

pub struct Outbox {
    path: PathBuf,
    store: Store,
    cfg: OutboxConfig,
    incarnation: u64,
    inner: Mutex<Inner>,
    notify: Arc<Notify>,
    commits: AtomicU64,
    /// Every seq below this is durable. Only those are handed to the uplink: a message sent
    /// before its commit could be lost with its seq in a crash, and the seq (so the message
    /// id) would then be reused for a different message after the restart.
    durable_below: AtomicU64,
    /// Messages the broker took that await the coordinator's ack (the uplink's gauge).
    awaiting_ack: AtomicU64,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens (or creates) the outbox in `state_dir/outbox`, applying the corruption policy.
    pub fn open(state_dir: &Path, cfg: &OutboxConfig) -> Result<Outbox, OutboxError> {
        let path = state_dir.join("outbox");
        match Self::open_at(&path, state_dir, cfg) {
            Err(OutboxError::Corrupted { path, reason })
                if cfg.on_corruption == OnCorruption::Quarantine =>
            {
                let aside = state_dir.join(format!("outbox.corrupt-{}", protocol::v1::now_ms()));
                tracing::error!(
                    path = %path.display(), moved_to = %aside.display(), reason = %reason,
                    "outbox store corrupted; quarantined it and starting empty (its messages are not sent)"
                );
                let io = |source| OutboxError::Io {
                    path: path.clone(),
                    source,
                };
                std::fs::rename(&path, &aside).map_err(io)?;
                for f in [INCARNATION_FILE, WAL_FILE] {
                    if state_dir.join(f).exists() {
                        std::fs::rename(state_dir.join(f), aside.join(f)).map_err(io)?;
                    }
                }
                crate::fsutil::sync_dir(state_dir).map_err(io)?;
                Self::open_at(&path, state_dir, cfg)
            }
            other => other,
        }
    }

    fn open_at(path: &Path, state_dir: &Path, cfg: &OutboxConfig) -> Result<Outbox, OutboxError> {
        let io = |source| OutboxError::Io {
            path: path.to_owned(),
            source,
        };
        let corrupted = |reason: String| OutboxError::Corrupted {
            path: path.to_owned(),
            reason,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let marker = state_dir.join(INCARNATION_FILE);
        let expected_incarnation = match std::fs::read_to_string(&marker) {
            Ok(s) => Some(
                u64::from_str_radix(s.trim(), 16)
                    .map_err(|_| corrupted(format!("{} is not a hex number", marker.display())))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };

        // sled 0.34 panics on some kinds of damage instead of returning an error.
        let sled_cfg = sled::Config::new()
            .path(path)
            .cache_capacity(cfg.cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // Durability comes from the write-ahead log and our checkpoints; sled's own timer
            // would only add writes competing with the log's fdatasync.
            .flush_every_ms(None);
        let opened =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || sled_cfg.open()))
                .map_err(|_| corrupted("sled panicked while recovering the log".into()))?;
        let tree = match opened {
            Ok(t) => t,
            Err(sled::Error::Corruption { at, .. }) => {
                return Err(corrupted(format!("sled reports corruption at {at:?}")));
            }
            Err(sled::Error::Unsupported(m)) => return Err(corrupted(m)),
            Err(sled::Error::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(corrupted(e.to_string()));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(OutboxError::Locked {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(OutboxError::Store {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let store = |source| OutboxError::Store {
            path: path.to_owned(),
            source,
        };

        let stored_incarnation = tree
            .get(META_INCARNATION)
            .map_err(store)?
            .map(|v| read_u64(&v));
        let incarnation = match (expected_incarnation, stored_incarnation) {
            (Some(e), Some(Some(s))) if e == s => s,
            (Some(e), got) => {
                return Err(corrupted(format!(
                    "incarnation {e:016x} recorded in {} but the store holds {got:?}: the log was lost or truncated",
                    marker.display()
                )));
            }
            (None, Some(Some(s))) => {
                // Created by a version without the marker, or the marker write was cut short.
                crate::fsutil::write_durably(&marker, format!("{s:016x}").as_bytes())
                    .map_err(io)?;
                s
            }
            (None, Some(None)) => return Err(corrupted("incarnation key is malformed".into())),
            (None, None) => {
                if tree.iter().next().is_some() {
                    return Err(corrupted("messages present but no incarnation key".into()));
                }
                let inc: u64 = rand::random();
                tree.insert(META_INCARNATION, &inc.to_be_bytes())
                    .map_err(store)?;
                tree.insert(META_NEXT_SEQ, &0u64.to_be_bytes())
                    .map_err(store)?;
                tree.flush().map_err(store)?;
                commit::sync_store(path).map_err(io)?;
                crate::fsutil::write_durably(&marker, format!("{inc:016x}").as_bytes())
                    .map_err(io)?;
                inc
            }
        };
        let mut next_seq = match tree.get(META_NEXT_SEQ).map_err(store)? {
            Some(v) => read_u64(&v).ok_or_else(|| corrupted("next_seq key is malformed".into()))?,
            None => return Err(corrupted("next_seq key is missing".into())),
        };

        // Replay what was committed to the log since the last checkpoint.
        let (wal, ops) = wal::Wal::open(&state_dir.join(WAL_FILE))?;
        let replayed = ops.len();
        for op in ops {
            match op {
                wal::Op::Insert(key, rec) => {
                    tree.insert(key.to_bytes(), rec).map_err(store)?;
                    next_seq = next_seq.max(key.seq + 1);
                }
                wal::Op::Delete(key) => {
                    tree.remove(key.to_bytes()).map_err(store)?;
                }
            }
        }
        tree.insert(META_NEXT_SEQ, &next_seq.to_be_bytes())
            .map_err(store)?;
        let committer = Committer::start(wal.syncer().map_err(io)?).map_err(io)?;
        let records = Store::Disk(Disk {
            tree,
            wal: Mutex::new(wal),
            committer,
        });
        let acct = recount(&records, cfg, next_seq, &corrupted, &store)?;

        // Checkpoint: what sled recovered may include writes that reached the page cache but
        // were never fsync'd (a killed process, not a power cut); make it and the replayed log
        // durable before anything is sent, so a later power cut cannot take back a message
        // that already went out. Then the log starts empty.
        if let Store::Disk(d) = &records {
            d.tree.flush().map_err(store)?;
            commit::sync_store(path).map_err(io)?;
            let mut wal = d.wal_lock();
            wal.truncate().map_err(io)?;
            if replayed > 0 {
                tracing::info!(path = %wal.path().display(), operations = replayed, "outbox replayed its write-ahead log");
            }
        }
        tracing::info!(
            path = %path.display(), messages = acct.depth(), bytes = acct.used(),
            incarnation = %format!("{incarnation:016x}"), "outbox opened"
        );
        Ok(Self::assemble(
            path.to_owned(),
            records,
            cfg,
            incarnation,
            acct,
            next_seq,
        ))
    }

    /// An outbox over records kept in memory: the same admission, ordering, expiry and acks as
    /// [`Outbox::open`], nothing durable, no file and no thread. For simulated devices; `label`
    /// names it in errors and logs. Reopening over the same `records` (a clone) finds what was
    /// left in it, as a reboot finds the disk store.
    pub fn open_in_memory(
        label: &Path,
        records: MemoryStore,
        cfg: &OutboxConfig,
    ) -> Result<Outbox, OutboxError> {
        let (incarnation, next_seq) = records.open();
        let records = Store::Memory(records);
        let corrupted = |reason: String| OutboxError::Corrupted {
            path: label.to_owned(),
            reason,
        };
        let store = |source| OutboxError::Store {
            path: label.to_owned(),
            source,
        };
        let acct = recount(&records, cfg, next_seq, &corrupted, &store)?;
        Ok(Self::assemble(
            label.to_owned(),
            records,
            cfg,
            incarnation,
            acct,
            next_seq,
        ))
    }

    fn assemble(
        path: PathBuf,
        store: Store,
        cfg: &OutboxConfig,
        incarnation: u64,
        acct: Accounting,
        next_seq: u64,
    ) -> Outbox {
        Outbox {
            path,
            store,
            cfg: cfg.clone(),
            incarnation,
            inner: Mutex::new(Inner { acct, next_seq }),
            notify: Arc::new(Notify::new()),
            commits: AtomicU64::new(0),
            durable_below: AtomicU64::new(next_seq),
            awaiting_ack: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update of counters; the
        // store itself is still consistent, so carry on with the data we have.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store_err(&self, source: sled::Error) -> OutboxError {
        match source {
            sled::Error::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => OutboxError::DiskFull {
                path: self.path.clone(),
                available: crate::fsutil::available_bytes(&self.path).unwrap_or(0),
                reserve: DISK_RESERVE_BYTES,
            },
            source => OutboxError::Store {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// Stores one message durably.
    pub async fn enqueue(&self, msg: NewMessage) -> Result<Accepted, OutboxError> {
        self.enqueue_batch(vec![msg])
            .await
            .pop()
            .unwrap_or(Err(OutboxError::Closed))
    }

    /// Stores messages durably with one group commit; one result per message, in order.
    /// An `Ok` means the message survives a crash or power cut and will be delivered.
    pub async fn enqueue_batch(&self, msgs: Vec<NewMessage>) -> Vec<Result<Accepted, OutboxError>> {
        let charge = msgs
            .iter()
            .map(|m| accounting::charge(m.topic.len(), m.body.len()))
            .sum();
        self.enqueue_batch_from(msgs.into_iter(), charge).await
    }

    /// What a message of this topic and body length counts for against the outbox's room.
    pub fn charge(topic_len: usize, body_len: usize) -> u64 {
        accounting::charge(topic_len, body_len)
    }

    /// [`Outbox::enqueue_batch`] of messages made as their turn comes, so the caller need not
    /// hold the whole batch at once (an update in parts is cut from its end as it goes);
    /// `charge` is what they count for in all ([`Outbox::charge`]; an estimate over the truth
    /// is fine), for the free-space check.
    pub async fn enqueue_batch_from(
        &self,
        msgs: impl Iterator<Item = NewMessage> + Send,
        charge: u64,
    ) -> Vec<Result<Accepted, OutboxError>> {
        let (mut results, inserted) = self.insert_batch(msgs, charge);
        if inserted.is_empty() {
            return results;
        }
        if let Err(e) = self.store.commit().await {
            // Not durable: undo what we can so the caller's "refused" is the truth, and report.
            let err_text = e.to_string();
            tracing::error!(path = %self.path.display(), error = %err_text, "outbox commit failed");
            for (idx, key, _) in inserted {
                self.remove(key, Removal::Undone);
                results[idx] = Err(match &e {
                    commit::CommitError::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
                        OutboxError::DiskFull {
                            path: self.path.clone(),
                            available: crate::fsutil::available_bytes(&self.path).unwrap_or(0),
                            reserve: DISK_RESERVE_BYTES,
                        }
                    }
                    _ => OutboxError::Io {
                        path: self.path.clone(),
                        source: std::io::Error::other(err_text.clone()),
                    },
                });
            }
            return results;
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        // Seqs are allocated and inserted under one lock, so a commit that covers our highest
        // seq covers every lower one too (sled persists its log in order).
        if let Some(max) = inserted.iter().map(|(_, k, _)| k.seq).max() {
            self.durable_below.fetch_max(max + 1, Ordering::AcqRel);
        }
        // notify_one stores a permit, so a commit that lands while the uplink is busy is not missed.
        self.notify.notify_one();
        if let Store::Disk(d) = &self.store
            && d.wal_lock().len() > CHECKPOINT_BYTES
            && let Err(e) = self.checkpoint()
        {
            // The log keeps growing and stays correct; only replay at start gets longer.
            tracing::warn!(path = %self.path.display(), error = %e, "outbox checkpoint failed");
        }
        results
    }

    /// Brings sled to disk (flush + fsync) and empties the write-ahead log. Holds the outbox
    /// lock meanwhile so no insert lands in the log between the flush and the truncation; this
    /// pauses enqueues for one sled flush every few MiB of traffic.
    fn checkpoint(&self) -> Result<(), OutboxError> {
        let Store::Disk(d) = &self.store else {
            return Ok(());
        };
        let _inner = self.lock();
        let mut wal = d.wal_lock();
        d.tree.flush().map_err(|e| self.store_err(e))?;
        let io = |source| OutboxError::Io {
            path: self.path.clone(),
            source,
        };
        commit::sync_store(&self.path).map_err(io)?;
        wal.truncate().map_err(io)
    }

    /// Logs a removal so replay does not bring the message back. Not synced here: the next
    /// commit or checkpoint carries it, and a lost delete only means a resend.
    fn log_delete(&self, key: Key) {
        if !self.store.logs() {
            return;
        }
        let mut frame = Vec::with_capacity(32);
        wal::encode(&wal::Op::Delete(key), &mut frame);
        if let Err(e) = self.store.append_log(&frame) {
            tracing::warn!(class = %key.class, seq = key.seq, error = %e, "cannot log outbox removal; the message may be sent again after a restart");
        }
    }

    /// Admission and in-memory insert under the lock; returns per-message results and what was
    /// inserted (index, key, charged size) for the commit step.
    #[allow(clippy::type_complexity)]
    fn insert_batch(
        &self,
        msgs: impl Iterator<Item = NewMessage>,
        batch_bytes: u64,
    ) -> (Vec<Result<Accepted, OutboxError>>, Vec<(usize, Key, u64)>) {
        let mut results = Vec::with_capacity(msgs.size_hint().0);
        let mut inserted = Vec::new();
        let free = match self.store {
            Store::Disk(_) => Some(crate::fsutil::available_bytes(&self.path)),
            Store::Memory(_) => None,
        };
        match free {
            None => {}
            Some(Ok(avail)) if avail < DISK_RESERVE_BYTES + batch_bytes => {
                let mut inner = self.lock();
                for _ in msgs {
                    inner.acct.refused();
                    results.push(Err(OutboxError::DiskFull {
                        path: self.path.clone(),
                        available: avail,
                        reserve: DISK_RESERVE_BYTES,
                    }));
                }
                return (results, inserted);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read free disk space")
            }
        }
        let now = protocol::v1::now_ms();
        let mut inner = self.lock();
        // Each record's frame goes to the log as it is inserted, not gathered for the batch: a
        // 20 MB update in parts would otherwise be in memory twice (the frames and sled's copy)
        // at the end of the batch. An append that fails takes the whole batch back, the log's
        // part of it included.
        let log_start = self.store.log_len();
        let mut frame = Vec::new();
        let mut log_failed: Option<std::io::Error> = None;
        // Messages refused because the log failed (before or at theirs).
        let mut unlogged = Vec::new();
        for (idx, msg) in msgs.into_iter().enumerate() {
            if log_failed.is_some() {
                unlogged.push(idx);
                results.push(Ok(Accepted {
                    id: String::new(),
                    seq: 0,
                    class: msg.class,
                }));
                continue;
            }
            let ttl = msg
                .ttl
                .or_else(|| self.cfg.ttl(msg.class))
                .filter(|d| !d.is_zero());
            let rec = Record {
                created_ms: now,
                expires_ms: ttl.map(|d| now.saturating_add(d.as_millis() as u64)),
                topic: msg.topic,
                body: msg.body,
            };
            let (size, expires_ms) = (rec.charge(), rec.expires_ms);
            if let Err(e) = self.make_room(&mut inner, msg.class, size, now) {
                inner.acct.refused();
                results.push(Err(e));
                continue;
            }
            let key = Key {
                class: msg.class,
                seq: inner.next_seq,
            };
            let encoded = rec.encode();
            drop(rec);
            match self
                .store
                .insert(key.to_bytes(), &encoded, key.seq + 1, META_NEXT_SEQ)
            {
                Ok(()) => {
                    inner.next_seq += 1;
                    inner.acct.added(key.class, size, expires_ms);
                    inserted.push((idx, key, size));
                    results.push(Ok(Accepted {
                        id: protocol::v1::message_id(self.incarnation, key.seq),
                        seq: key.seq,
                        class: key.class,
                    }));
                    if self.store.logs() {
                        frame.clear();
                        wal::encode(&wal::Op::Insert(key, encoded), &mut frame);
                        if let Err(e) = self.store.append_log(&frame) {
                            log_failed = Some(e);
                        }
                    }
                }
                Err(e) => {
                    inner.acct.refused();
                    results.push(Err(self.store_err(e)));
                }
            }
        }
        if let Some(e) = log_failed {
            // Not in the log, so not durable: take the batch back and say why.
            tracing::error!(path = %self.path.display(), error = %e, "cannot append to the outbox write-ahead log");
            if let Some(start) = log_start
                && let Err(cut) = self.store.cut_log(start)
            {
                tracing::error!(path = %self.path.display(), error = %cut, "cannot cut the failed batch off the outbox write-ahead log");
            }
            let refusal = || {
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    OutboxError::DiskFull {
                        path: self.path.clone(),
                        available: crate::fsutil::available_bytes(&self.path).unwrap_or(0),
                        reserve: DISK_RESERVE_BYTES,
                    }
                } else {
                    OutboxError::Io {
                        path: self.path.clone(),
                        source: std::io::Error::new(e.kind(), e.to_string()),
                    }
                }
            };
            for (idx, key, size) in inserted.drain(..) {
                let _ = self.store.remove(&key.to_bytes());
                inner.acct.removed(key.class, size, Removal::Undone);
                inner.acct.refused();
                results[idx] = Err(refusal());
            }
            for idx in unlogged {
                inner.acct.refused();
                results[idx] = Err(refusal());
            }
        }
        (results, inserted)
    }

    /// Applies the full-outbox policy (see [`accounting`]) until `size` fits or it must refuse.
    fn make_room(
        &self,
        inner: &mut Inner,
        class: Class,
        size: u64,
        now: u64,
    ) -> Result<(), OutboxError> {
        loop {
            match inner.acct.admit(size, now) {
                Admission::Fits => return Ok(()),
                Admission::PurgeExpired => self.purge_expired(inner, now)?,
                Admission::EvictTelemetry { bytes } => self.evict_telemetry(inner, bytes)?,
                Admission::Refuse(Refusal::LargerThanCapacity) => {
                    return Err(OutboxError::TooLarge {
                        size,
                        capacity: self.cfg.max_bytes,
                    });
                }
                Admission::Refuse(Refusal::Full) => {
                    return Err(OutboxError::Full {
                        used: inner.acct.used(),
                        capacity: self.cfg.max_bytes,
                        class,
                        size,
                    });
                }
            }
        }
    }

    fn purge_expired(&self, inner: &mut Inner, now: u64) -> Result<(), OutboxError> {
        let mut earliest: Option<u64> = None;
        let mut expired = Vec::new();
        self.store
            .scan(&[], &[0xF0], |k, v| {
                if let (Some(key), Ok(rec)) = (Key::from_bytes(k), Record::decode(v)) {
                    match rec.expires_ms {
                        Some(t) if t <= now => expired.push((key, rec.charge())),
                        Some(t) => earliest = Some(earliest.map_or(t, |e| e.min(t))),
                        None => {}
                    }
                }
                true
            })
            .map_err(|e| self.store_err(e))?;
        let purged = self.remove_all(inner, expired, Removal::Expired)?;
        inner.acct.set_earliest_expiry(earliest);
        if purged > 0 {
            tracing::info!(purged, "outbox removed expired messages");
        }
        Ok(())
    }

    fn evict_telemetry(&self, inner: &mut Inner, bytes: u64) -> Result<(), OutboxError> {
        let start = Key {
            class: Class::Telemetry,
            seq: 0,
        }
        .to_bytes();
        // The oldest telemetry until `bytes` are covered.
        let mut victims = Vec::new();
        let mut covered = 0u64;
        self.store
            .scan(&start, &[0xF0], |k, v| {
                if covered >= bytes {
                    return false;
                }
                let charge = Record::decode(v)
                    .map(|r| r.charge())
                    .unwrap_or(v.len() as u64);
                if let Some(key) = Key::from_bytes(k) {
                    victims.push((key, charge));
                    covered = covered.saturating_add(charge);
                }
                true
            })
            .map_err(|e| self.store_err(e))?;
        let evicted = self.remove_all(inner, victims, Removal::Evicted)?;
        tracing::warn!(
            evicted,
            "outbox full: evicted oldest telemetry to make room"
        );
        Ok(())
    }

    /// Removes `victims` (key, charge) from the store and the accounts as `why`; returns how
    /// many were still there.
    fn remove_all(
        &self,
        inner: &mut Inner,
        victims: Vec<(Key, u64)>,
        why: Removal,
    ) -> Result<u64, OutboxError> {
        let mut removed = 0u64;
        for (key, charge) in victims {
            if self
                .store
                .remove(&key.to_bytes())
                .map_err(|e| self.store_err(e))?
                .is_some()
            {
                self.log_delete(key);
                inner.acct.removed(key.class, charge, why);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The next message of `class` after `after` (or the first), skipping and removing
    /// expired ones. Used by the uplink to fill its send window.
    pub fn next_in_class(
        &self,
        class: Class,
        after: Option<u64>,
    ) -> Result<Option<Stored>, OutboxError> {
        let mut from = match after {
            Some(seq) if seq == u64::MAX => return Ok(None),
            Some(seq) => seq + 1,
            None => 0,
        };
        let durable_below = self.durable_below.load(Ordering::Acquire);
        let end = Key {
            class,
            seq: u64::MAX,
        }
        .to_bytes();
        let now = protocol::v1::now_ms();
        // One lookup per record looked at: a skipped record is removed before the next lookup.
        loop {
            let start = Key { class, seq: from }.to_bytes();
            let Some((k, v)) = self
                .store
                .first_in(start, end)
                .map_err(|e| self.store_err(e))?
            else {
                return Ok(None);
            };
            let Some(key) = Key::from_bytes(&k) else {
                return Err(OutboxError::Corrupted {
                    path: self.path.clone(),
                    reason: format!("malformed key {k:?}"),
                });
            };
            if key.seq == u64::MAX {
                return Ok(None);
            }
            from = key.seq + 1;
            if key.seq >= durable_below {
                // Not committed yet; seqs only grow within a class, so nothing later is either.
                return Ok(None);
            }
            let record = match Record::decode(&v) {
                Ok(r) => r,
                Err(e) => {
                    // Checked at open, so this is damage since: drop the record loudly.
                    tracing::error!(class = %key.class, seq = key.seq, error = %e, "dropping undecodable outbox record");
                    self.remove(key, Removal::Evicted);
                    continue;
                }
            };
            if record.expires_ms.is_some_and(|t| t <= now) {
                self.remove(key, Removal::Expired);
                continue;
            }
            return Ok(Some(Stored { key, record }));
        }
    }

    /// Whether the message is still stored.
    pub fn holds(&self, key: Key) -> bool {
        self.store.contains(&key.to_bytes())
    }

    /// The seq the next accepted message gets.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// The seq of the stored message of `key`'s class just before it: what the device still
    /// holds (unacknowledged) ahead of `key`. `None` when nothing earlier is stored.
    /// A read error is an error, never `None`: the coordinator takes an absent `prev` as
    /// "nothing older held" and may acknowledge a range on that basis (`protocol::v1::ack`).
    pub fn prev_in_class(&self, key: Key) -> Result<Option<u64>, OutboxError> {
        let start = Key {
            class: key.class,
            seq: 0,
        }
        .to_bytes();
        match self
            .store
            .last_key_before(start, key.to_bytes())
            .map_err(|e| self.store_err(e))?
        {
            None => Ok(None),
            Some(k) => {
                Key::from_bytes(&k)
                    .map(|k| Some(k.seq))
                    .ok_or_else(|| OutboxError::Corrupted {
                        path: self.path.clone(),
                        reason: format!("malformed key {k:?}"),
                    })
            }
        }
    }

    /// Removes a message the coordinator has committed (its end-to-end ack). Not fsync'd: if
    /// the removal is lost in a crash the message is sent again and the coordinator drops the
    /// duplicate by id.
    pub fn ack(&self, key: Key) {
        self.remove(key, Removal::Delivered);
    }

    /// Removes every stored message of `class` with a seq in `from..=to` (a range of an
    /// end-to-end ack: seqs are numbered across classes, so it names only this class's).
    /// Returns the keys removed.
    pub fn ack_range(&self, class: Class, from: u64, to: u64) -> Vec<Key> {
        let (start, end) = (Key { class, seq: from }, Key { class, seq: to });
        let keys: Vec<Key> = self
            .store
            .keys_in(start.to_bytes(), end.to_bytes())
            .iter()
            .filter_map(|k| Key::from_bytes(k))
            .collect();
        for &key in &keys {
            self.ack(key);
        }
        keys
    }

    fn remove(&self, key: Key, why: Removal) {
        match self.store.remove(&key.to_bytes()) {
            Ok(Some(v)) => {
                self.log_delete(key);
                let charge = Record::decode(&v)
                    .map(|r| r.charge())
                    .unwrap_or(v.len() as u64);
                self.lock().acct.removed(key.class, charge, why);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(class = %key.class, seq = key.seq, error = %e, "outbox remove failed")
            }
        }
    }

    /// Resolves after the next successful commit (new messages to send).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    pub fn stats(&self) -> OutboxStats {
        let mut s = self.lock().acct.stats();
        s.awaiting_ack = self.awaiting_ack.load(Ordering::Relaxed);
        s
    }

    /// How many stored messages the broker took that await the coordinator's ack (set by the
    /// uplink; reported in [`Outbox::stats`]).
    pub fn set_awaiting_ack(&self, n: u64) {
        self.awaiting_ack.store(n, Ordering::Relaxed);
    }

    /// Number of group commits so far (each one fdatasync of the write-ahead log).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Makes everything (including acks) durable and checkpoints; call on shutdown.
    pub async fn close(&self) -> Result<(), OutboxError> {
        self.store.commit().await.map_err(|e| OutboxError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.checkpoint()
    }
}

/// Rebuilds the accounting from the stored records at open, checking every record decodes and
/// no seq reaches `next_seq`.
fn recount(
    records: &Store,
    cfg: &OutboxConfig,
    next_seq: u64,
    corrupted: &dyn Fn(String) -> OutboxError,
    store_err: &dyn Fn(sled::Error) -> OutboxError,
) -> Result<Accounting, OutboxError> {
    let mut acct = Accounting::new(cfg.max_bytes);
    let mut earliest: Option<u64> = None;
    let mut max_seq = None::<u64>;
    let mut bad = None;
    records
        .scan(&[], &[0xF0], |k, v| {
            let Some(key) = Key::from_bytes(k) else {
                bad = Some(format!("malformed key {k:?}"));
                return false;
            };
            let rec = match Record::decode(v) {
                Ok(r) => r,
                Err(e) => {
                    bad = Some(format!("record {}/{}: {e}", key.class, key.seq));
                    return false;
                }
            };
            acct.added(key.class, rec.charge(), rec.expires_ms);
            if let Some(t) = rec.expires_ms {
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
            }
            max_seq = Some(max_seq.map_or(key.seq, |m| m.max(key.seq)));
            true
        })
        .map_err(store_err)?;
    if let Some(reason) = bad {
        return Err(corrupted(reason));
    }
    acct.set_earliest_expiry(earliest);
    if max_seq.is_some_and(|m| m >= next_seq) {
        return Err(corrupted(format!(
            "message seq {max_seq:?} is not below next_seq {next_seq}"
        )));
    }
    Ok(acct)
}

fn read_u64(v: &[u8]) -> Option<u64> {
    let b: [u8; 8] = v.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests;
