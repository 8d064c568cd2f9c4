//! Durable state in sled: the device registry and the set of processed message ids.
//!
//! Trees:
//! - `devices`: device id -> [`DeviceRecord`] as JSON;
//! - `seen`: `device \0 id` -> first-seen time (u64 big-endian, ms);
//! - `seen_by_time`: `time (u64 big-endian) device \0 id` -> empty, the index that makes pruning by age a
//!   range scan instead of a full sweep;
//! - `enrollment`: device id -> [`EnrollmentRecord`] as JSON;
//! - `replay`: device id -> the device's replay window as `epoch | top` (u64 big-endian each),
//!   written with the batch whose messages moved it, so after a restart every counter the
//!   acknowledged messages used counts as seen.
//!
//! sled's `flush()` is not power-safe on Linux (it uses `sync_file_range`), so [`Store::commit`]
//! also fsyncs the database file. sled's own background flush is turned off: the database only
//! reaches the disk at our commits, which come after the journal lines they cover.

use std::fs::File;
use std::path::{Path, PathBuf};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::core::SeenIds;
use crate::enrollment::EnrollmentRecord;
use crate::registry::DeviceRecord;

/// Errors from the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "state database {path} is in use by another process (a running coordinator?); stop it first: {error}"
    )]
    Locked { path: PathBuf, error: sled::Error },
    #[error("cannot open state database {path}: {error}")]
    Open { path: PathBuf, error: sled::Error },
    #[error("no coordinator state in {0} (no registry database there)")]
    Missing(PathBuf),
    #[error("state database {path}: {error}")]
    Db { path: PathBuf, error: sled::Error },
    #[error("cannot fsync state database {path}: {error}")]
    Sync {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("corrupt registry record for device {device:?} in {path}: {error}")]
    Record {
        path: PathBuf,
        device: String,
        error: serde_json::Error,
    },
    #[error("corrupt enrollment record for device {device:?} in {path}: {error}")]
    Enrollment {
        path: PathBuf,
        device: String,
        error: String,
    },
}

/// The open database.
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    devices: sled::Tree,
    seen: sled::Tree,
    seen_by_time: sled::Tree,
    enrollment: sled::Tree,
    replay: sled::Tree,
    /// sled's data file, kept open to fsync it at every commit.
    data_file: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database in directory `path`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|error| open_error(path, error))?;
        let db_err = |error| StoreError::Db {
            path: path.to_owned(),
            error,
        };
        let devices = db.open_tree("devices").map_err(db_err)?;
        let seen = db.open_tree("seen").map_err(db_err)?;
        let seen_by_time = db.open_tree("seen_by_time").map_err(db_err)?;
        let enrollment = db.open_tree("enrollment").map_err(db_err)?;
        let replay = db.open_tree("replay").map_err(db_err)?;
        // sled 0.34 keeps everything in one log file named `db`.
        let data_path = path.join("db");
        let data_file = File::open(&data_path).map_err(|error| StoreError::Sync {
            path: data_path.clone(),
            error,
        })?;
        Ok(Store {
            path: path.to_owned(),
            db,
            devices,
            seen,
            seen_by_time,
            enrollment,
            replay,
            data_file,
        })
    }

    /// Opens an existing database only (for read-only tools like `devices`).
    pub fn open_existing(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        if !path.join("db").is_file() {
            return Err(StoreError::Missing(path.to_owned()));
        }
        Store::open(path, cache_bytes)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, error: sled::Error) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            error,
        }
    }

    /// Every registry record, ordered by device id.
    pub fn load_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.devices.iter() {
            let (key, value) = item.map_err(|e| self.db_err(e))?;
            let device = String::from_utf8_lossy(&key).into_owned();
            let record: DeviceRecord =
                serde_json::from_slice(&value).map_err(|error| StoreError::Record {
                    path: self.path.clone(),
                    device,
                    error,
                })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Records a processed message id and changed registry records in one transaction, so
    /// the counters and the seen set never disagree after a crash.
    pub fn record(
        &self,
        seen: Option<(&str, &str, u64)>,
        records: &[&DeviceRecord],
    ) -> Result<(), StoreError> {
        let encoded: Vec<(Vec<u8>, Vec<u8>)> = records
            .iter()
            // Serializing our own plain structs cannot fail.
            .map(|r| {
                (
                    r.device.as_bytes().to_vec(),
                    serde_json::to_vec(r).unwrap_or_default(),
                )
            })
            .collect();
        let result: Result<(), TransactionError<()>> =
            (&self.devices, &self.seen, &self.seen_by_time).transaction(
                |(devices, seen_t, by_time)| {
                    for (k, v) in &encoded {
                        devices.insert(k.as_slice(), v.as_slice())?;
                    }
                    if let Some((device, id, ts)) = seen {
                        seen_t.insert(seen_key(device, id), &ts.to_be_bytes())?;
                        by_time.insert(time_key(ts, device, id), &[])?;
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                },
            );
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(self.db_err(e)),
            // We never abort our own transaction.
            Err(TransactionError::Abort(())) => Ok(()),
        }
    }

    /// Every enrollment record, ordered by device id.
    pub fn load_enrollments(&self) -> Result<Vec<EnrollmentRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.enrollment.iter() {
            let (key, value) = item.map_err(|e| self.db_err(e))?;
            let record: EnrollmentRecord =
                serde_json::from_slice(&value).map_err(|e| StoreError::Enrollment {
                    path: self.path.clone(),
                    device: String::from_utf8_lossy(&key).into_owned(),
                    error: e.to_string(),
                })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Writes one enrollment record (durable at the next [`Store::commit`]).
    pub fn save_enrollment(&self, record: &EnrollmentRecord) -> Result<(), StoreError> {
        // Serializing our own plain structs cannot fail.
        let value = serde_json::to_vec(record).unwrap_or_default();
        self.enrollment
            .insert(record.device.as_bytes(), value)
            .map(drop)
            .map_err(|e| self.db_err(e))
    }

    /// Every persisted replay window: `(device, epoch, top)`.
    pub fn load_replay_windows(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let mut out = Vec::new();
        for item in self.replay.iter() {
            let (key, value) = item.map_err(|e| self.db_err(e))?;
            let device = String::from_utf8_lossy(&key).into_owned();
            let word = |i: usize| {
                value
                    .get(i..i + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
            };
            let (Some(epoch), Some(top)) = (word(0), word(8)) else {
                return Err(StoreError::Enrollment {
                    path: self.path.clone(),
                    device,
                    error: format!("replay window of {} bytes, expected 16", value.len()),
                });
            };
            out.push((device, epoch, top));
        }
        Ok(out)
    }

    /// Writes replay windows `(device, epoch, top)` in one batch (durable at the next
    /// [`Store::commit`], the one that covers the messages that moved them).
    pub fn save_replay_windows(&self, windows: &[(String, u64, u64)]) -> Result<(), StoreError> {
        if windows.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (device, epoch, top) in windows {
            let mut value = [0u8; 16];
            value[..8].copy_from_slice(&epoch.to_be_bytes());
            value[8..].copy_from_slice(&top.to_be_bytes());
            batch.insert(device.as_bytes(), &value[..]);
        }
        self.replay.apply_batch(batch).map_err(|e| self.db_err(e))
    }

    /// Forgets message ids first seen before `cutoff_ms`; returns how many.
    pub fn prune_seen(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        let mut pruned = 0;
        loop {
            // Bounded chunks keep memory flat however much expired at once.
            let mut chunk = Vec::with_capacity(1024);
            for item in self
                .seen_by_time
                .range(..cutoff_ms.to_be_bytes().to_vec())
                .take(1024)
            {
                let (key, _) = item.map_err(|e| self.db_err(e))?;
                chunk.push(key);
            }
            if chunk.is_empty() {
                return Ok(pruned);
            }
            // The seen entry goes first: a crash in between leaves an index entry that the
            // next sweep removes, never a seen entry that no sweep can find.
            let mut seen_batch = sled::Batch::default();
            let mut time_batch = sled::Batch::default();
            for key in &chunk {
                if let Some(seen) = seen_key_from_time_key(key) {
                    seen_batch.remove(seen);
                }
                time_batch.remove(key.clone());
            }
            self.seen
                .apply_batch(seen_batch)
                .map_err(|e| self.db_err(e))?;
            self.seen_by_time
                .apply_batch(time_batch)
                .map_err(|e| self.db_err(e))?;
            pruned += chunk.len();
        }
    }

    /// Number of remembered message ids.
    pub fn seen_len(&self) -> usize {
        self.seen.len()
    }

    /// Makes everything recorded so far durable: sled flush, then fsync of its data file.
    pub fn commit(&self, fsync: bool) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.db_err(e))?;
        if fsync {
            self.data_file
                .sync_all()
                .map_err(|error| StoreError::Sync {
                    path: self.path.join("db"),
                    error,
                })?;
        }
        Ok(())
    }
}

impl SeenIds for Store {
    type Error = StoreError;
    fn contains(&self, device: &str, id: &str) -> Result<bool, StoreError> {
        self.seen
            .contains_key(seen_key(device, id))
            .map_err(|e| self.db_err(e))
    }
}

/// sled reports a held lock as a generic I/O error; tell it apart by its message so the user
/// learns that another coordinator has the directory.
fn open_error(path: &Path, error: sled::Error) -> StoreError {
    let locked = match &error {
        sled::Error::Io(e) => {
            e.kind() == std::io::ErrorKind::WouldBlock
                || e.to_string().contains("could not acquire lock")
        }
        _ => false,
    };
    if locked {
        StoreError::Locked {
            path: path.to_owned(),
            error,
        }
    } else {
        StoreError::Open {
            path: path.to_owned(),
            error,
        }
    }
}

// Device and message ids are validated tokens ([A-Za-z0-9_.-]), so a NUL separator is
// unambiguous.
fn seen_key(device: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + id.len() + 1);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn time_key(ts: u64, device: &str, id: &str) -> Vec<u8> {
    let mut k = ts.to_be_bytes().to_vec();
    k.extend_from_slice(&seen_key(device, id));
    k
}

fn seen_key_from_time_key(key: &[u8]) -> Option<&[u8]> {
    key.get(8..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Core;
    use protocol::v1::topics;
    use protocol::v1::{Class, Data, Envelope, VERSION};

    fn data_msg(id: &str) -> Vec<u8> {
        Envelope {
            v: VERSION,
            id: id.into(),
            device: "d1".into(),
            class: Class::Results,
            seq: 1,
            prev: None,
            created_ms: 1,
            body: Data {
                stream: "s".into(),
                payload: serde_json::json!(1).into(),
            },
        }
        .to_json()
    }

    /// Feeds a message through the core and persists the outcome like the service does.
    fn feed(core: &mut Core, store: &Store, id: &str, now: u64) -> Vec<crate::event::Event> {
        let out = core
            .handle(&topics::data("d1", "s"), &data_msg(id), now, store)
            .expect("store ok");
        let records: Vec<&DeviceRecord> =
            out.changed.iter().filter_map(|d| core.device(d)).collect();
        store
            .record(
                out.seen
                    .as_ref()
                    .map(|(d, i)| (d.as_str(), i.as_str(), now)),
                &records,
            )
            .expect("recorded");
        out.events
    }

    #[test]
    fn registry_and_seen_ids_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sled");
        {
            let store = Store::open(&path, 1 << 20).expect("opens");
            let mut core = Core::new(store.load_devices().expect("loads"));
            assert!(matches!(
                &feed(&mut core, &store, "m1", 10)[..],
                [crate::event::Event::Data { .. }]
            ));
            store.commit(true).expect("commits");
        }
        let store = Store::open(&path, 1 << 20).expect("reopens");
        let records = store.load_devices().expect("loads");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].counters.data, 1);
        let mut core = Core::new(records);
        // The id processed before the restart is still a duplicate.
        assert!(matches!(
            &feed(&mut core, &store, "m1", 20)[..],
            [crate::event::Event::Duplicate { .. }]
        ));
        assert_eq!(core.device("d1").expect("known").counters.duplicates, 1);
    }

    #[test]
    fn pruning_forgets_only_old_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db.sled"), 1 << 20).expect("opens");
        for i in 0..3000u64 {
            store
                .record(Some(("d1", &format!("m{i}"), i)), &[])
                .expect("recorded");
        }
        assert_eq!(store.prune_seen(2500).expect("prunes"), 2500);
        assert_eq!(store.seen_len(), 500);
        assert!(!store.contains("d1", "m2499").expect("reads"));
        assert!(store.contains("d1", "m2500").expect("reads"));
        assert_eq!(store.prune_seen(2500).expect("prunes"), 0);
    }

    #[test]
    fn enrollments_and_replay_windows_survive_reopen() {
        use protocol::v1::auth::{ReplayWindow, Stamp};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sled");
        let record = EnrollmentRecord {
            device: "pi-1".into(),
            identity: protocol::v1::auth::Identity::generate().public(),
            state: protocol::v1::enroll::Decision::Accepted,
            groups: vec!["lab".into()],
            hardware: Default::default(),
            by: "operator".into(),
            claim: None,
            reason: String::new(),
            requested_ms: 1,
            last_request_ms: 2,
            decided_ms: 3,
            coordinator_key: String::new(),
            announced_key: String::new(),
        };
        let s = |epoch, counter| Stamp { epoch, counter };
        let mut window = ReplayWindow::default();
        for c in [1, 2, 5] {
            window.accept(s(4, c)).expect("fresh");
        }
        {
            let store = Store::open(&path, 1 << 20).expect("opens");
            store.save_enrollment(&record).expect("saves");
            store
                .save_replay_windows(&[("pi-1".into(), window.epoch(), window.top())])
                .expect("saves");
            store.commit(true).expect("commits");
        }
        let store = Store::open(&path, 1 << 20).expect("reopens");
        assert_eq!(store.load_enrollments().expect("loads"), vec![record]);
        let windows = store.load_replay_windows().expect("loads");
        assert_eq!(windows, vec![("pi-1".to_owned(), 4, 5)]);
        // Restored, every counter up to the top counts as seen (3 and 4 included: the store
        // keeps no bitmap), and the numbering goes on above it.
        let (_, epoch, top) = &windows[0];
        let mut restored = ReplayWindow::restore(*epoch, *top);
        for c in [1, 3, 5] {
            assert!(restored.accept(s(4, c)).is_err(), "{c}");
        }
        restored.accept(s(4, 6)).expect("next counter");
        restored.accept(s(5, 1)).expect("next boot");
    }

    #[test]
    fn second_open_reports_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sled");
        let _first = Store::open(&path, 1 << 20).expect("opens");
        match Store::open(&path, 1 << 20) {
            Err(StoreError::Locked { .. }) => {}
            other => panic!("expected a lock error, got {other:?}"),
        }
        assert!(matches!(
            Store::open_existing(&dir.path().join("nothing"), 1 << 20),
            Err(StoreError::Missing(_))
        ));
    }
}
