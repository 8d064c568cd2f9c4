//! Host import `kv`: a small persistent key-value namespace per stage, with quotas on key
//! length, value size and total bytes, and durable writes.
//!
//! Storage is behind the [`KvStore`] trait (one namespace per store value) so tests and
//! other hosts can inject their own; [`SledKv`] is the agent's: one sled tree per stage in
//! a database the caller opens (and sizes) once.
//!
//! Durability: every write is flushed to the OS before `set`/`delete` return, so it
//! survives a crash of the agent. sled's flush is not an fsync (sled issue #1452), so the
//! database file is fsync'd at most every `kv_sync_interval_ms` (0: after every write) and
//! when the instance is dropped; a power cut can lose at most that window.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Linker};

use super::HostState;
use crate::bindings::edge::pipeline::kv as wit;

/// Error of a [`KvStore`]; reaches the guest as `unavailable` with this message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KvStoreError(pub String);

/// One stage's key-value namespace in durable storage. Implementations need no quota or
/// validation logic: the host checks keys, sizes and totals before calling them.
pub trait KvStore: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvStoreError>;
    /// Stores `value`, returning the size of the value it replaced.
    fn insert(&self, key: &[u8], value: &[u8]) -> Result<Option<usize>, KvStoreError>;
    /// Removes `key`, returning the size of the value it had.
    fn remove(&self, key: &[u8]) -> Result<Option<usize>, KvStoreError>;
    /// Bytes stored (keys plus values); called once per instance.
    fn used_bytes(&self) -> Result<u64, KvStoreError>;
    /// Hands written data to the OS (survives a crash of this process).
    fn flush(&self) -> Result<(), KvStoreError>;
    /// Makes everything flushed so far durable on disk (survives a power cut).
    fn sync(&self) -> Result<(), KvStoreError>;
}

/// A stage's namespace as a tree `kv/<stage>` of a sled database.
pub struct SledKv {
    tree: sled::Tree,
    db_dir: PathBuf,
}

impl std::fmt::Debug for SledKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledKv")
            .field("db_dir", &self.db_dir)
            .finish_non_exhaustive()
    }
}

impl SledKv {
    /// Opens the namespace of `stage` in `db`, the database opened from `db_dir` (needed to
    /// fsync its files).
    pub fn open(db: &sled::Db, db_dir: &Path, stage: &str) -> Result<SledKv, KvStoreError> {
        let tree = db
            .open_tree(format!("kv/{stage}"))
            .map_err(|e| KvStoreError(format!("opening kv tree of stage {stage}: {e}")))?;
        Ok(SledKv {
            tree,
            db_dir: db_dir.to_owned(),
        })
    }
}

fn sled_err(e: sled::Error) -> KvStoreError {
    KvStoreError(e.to_string())
}

impl KvStore for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvStoreError> {
        Ok(self.tree.get(key).map_err(sled_err)?.map(|v| v.to_vec()))
    }

    fn insert(&self, key: &[u8], value: &[u8]) -> Result<Option<usize>, KvStoreError> {
        Ok(self
            .tree
            .insert(key, value)
            .map_err(sled_err)?
            .map(|v| v.len()))
    }

    fn remove(&self, key: &[u8]) -> Result<Option<usize>, KvStoreError> {
        Ok(self.tree.remove(key).map_err(sled_err)?.map(|v| v.len()))
    }

    fn used_bytes(&self) -> Result<u64, KvStoreError> {
        let mut total = 0u64;
        for kv in self.tree.iter() {
            let (k, v) = kv.map_err(sled_err)?;
            total += (k.len() + v.len()) as u64;
        }
        Ok(total)
    }

    fn flush(&self) -> Result<(), KvStoreError> {
        self.tree.flush().map(drop).map_err(sled_err)
    }

    fn sync(&self) -> Result<(), KvStoreError> {
        crate::fsutil::sync_sled(&self.db_dir)
            .map_err(|e| KvStoreError(format!("fsync {}: {e}", self.db_dir.display())))
    }
}

/// Quotas of one namespace.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvQuotas {
    pub max_key: usize,
    pub max_value: usize,
    pub max_total: u64,
    pub sync_interval: Duration,
}

/// The `kv` import of one instance: validation, quota accounting, durability policy.
pub(crate) struct KvUnit {
    store: Arc<dyn KvStore>,
    quotas: KvQuotas,
    /// Bytes in the namespace (keys plus values); `None` when it could not be read, in which
    /// case writes are refused as `unavailable` rather than risking the quota.
    used: Option<u64>,
    last_sync: Instant,
    unsynced: bool,
}

impl KvUnit {
    pub(crate) fn new(store: Arc<dyn KvStore>, quotas: KvQuotas) -> Self {
        let used = match store.used_bytes() {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "reading kv usage failed; kv writes refused for this instance");
                None
            }
        };
        KvUnit {
            store,
            quotas,
            used,
            last_sync: Instant::now(),
            unsynced: false,
        }
    }

    fn check_key(&self, key: &str) -> Result<(), wit::Error> {
        if key.is_empty() {
            return Err(wit::Error::InvalidKey("empty key".into()));
        }
        if key.len() > self.quotas.max_key {
            return Err(wit::Error::InvalidKey(format!(
                "key of {} bytes is longer than the limit of {} bytes",
                key.len(),
                self.quotas.max_key
            )));
        }
        Ok(())
    }

    /// Flush now; fsync when the interval has passed (or always with a zero interval).
    fn persist(&mut self, key: &str) -> Result<(), wit::Error> {
        let unavailable = |e: KvStoreError| wit::Error::Unavailable(format!("key {key}: {e}"));
        self.store.flush().map_err(unavailable)?;
        self.unsynced = true;
        if self.last_sync.elapsed() >= self.quotas.sync_interval {
            self.store.sync().map_err(unavailable)?;
            self.last_sync = Instant::now();
            self.unsynced = false;
        }
        Ok(())
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), wit::Error> {
        self.check_key(key)?;
        if value.len() > self.quotas.max_value {
            return Err(wit::Error::QuotaExceeded(format!(
                "value of {} bytes for key {key} is larger than the limit of {} bytes",
                value.len(),
                self.quotas.max_value
            )));
        }
        let Some(used) = self.used else {
            return Err(wit::Error::Unavailable(format!(
                "key {key}: kv usage of this stage could not be read"
            )));
        };
        let unavailable = |e: KvStoreError| wit::Error::Unavailable(format!("key {key}: {e}"));
        let old = self
            .store
            .get(key.as_bytes())
            .map_err(unavailable)?
            .map_or(0, |v| (key.len() + v.len()) as u64);
        let new = (key.len() + value.len()) as u64;
        let after = used - old.min(used) + new;
        if after > self.quotas.max_total {
            return Err(wit::Error::QuotaExceeded(format!(
                "storing key {key} would use {after} bytes, over the stage's limit of {} bytes",
                self.quotas.max_total
            )));
        }
        self.store
            .insert(key.as_bytes(), value)
            .map_err(unavailable)?;
        self.used = Some(after);
        self.persist(key)
    }

    fn delete(&mut self, key: &str) -> Result<(), wit::Error> {
        self.check_key(key)?;
        let unavailable = |e: KvStoreError| wit::Error::Unavailable(format!("key {key}: {e}"));
        if let Some(len) = self.store.remove(key.as_bytes()).map_err(unavailable)? {
            self.used = self
                .used
                .map(|u| u.saturating_sub((key.len() + len) as u64));
            self.persist(key)?;
        }
        Ok(())
    }
}

impl Drop for KvUnit {
    fn drop(&mut self) {
        if !self.unsynced {
            return;
        }
        if let Err(e) = self.store.sync() {
            tracing::warn!(error = %e, "fsync of kv store at instance end failed");
        }
    }
}

impl wit::Host for KvUnit {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, wit::Error> {
        self.check_key(&key)?;
        self.store
            .get(key.as_bytes())
            .map_err(|e| wit::Error::Unavailable(format!("key {key}: {e}")))
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), wit::Error> {
        KvUnit::set(self, &key, &value)
    }

    fn delete(&mut self, key: String) -> Result<(), wit::Error> {
        KvUnit::delete(self, &key)
    }
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = &'a mut KvUnit;
}

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<HostState, HasKv>(linker, |s| &mut s.kv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(dir: &Path, max_total: u64) -> (KvUnit, sled::Db) {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(1 << 20)
            .open()
            .expect("open sled");
        let store = SledKv::open(&db, dir, "s1").expect("tree");
        let quotas = KvQuotas {
            max_key: 8,
            max_value: 16,
            max_total,
            sync_interval: Duration::ZERO,
        };
        (KvUnit::new(Arc::new(store), quotas), db)
    }

    #[test]
    fn quotas_and_accounting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut kv, _db) = unit(dir.path(), 30);
        assert!(matches!(kv.set("", b"x"), Err(wit::Error::InvalidKey(_))));
        assert!(matches!(
            kv.set("123456789", b"x"),
            Err(wit::Error::InvalidKey(_))
        ));
        let e = kv.set("k", &[0; 17]).expect_err("value too big");
        assert!(
            matches!(&e, wit::Error::QuotaExceeded(m) if m.contains("16")),
            "{e:?}"
        );
        kv.set("a", &[1; 10]).expect("11 bytes");
        kv.set("b", &[2; 10]).expect("22 bytes");
        // Replacing counts only the difference.
        kv.set("b", &[3; 12]).expect("24 bytes");
        assert!(matches!(
            kv.set("c", &[0; 10]),
            Err(wit::Error::QuotaExceeded(_))
        ));
        kv.delete("a").expect("delete");
        kv.delete("unset").expect("deleting a missing key is fine");
        kv.set("c", &[0; 10]).expect("fits after delete");
        assert_eq!(
            wit::Host::get(&mut kv, "b".into()).expect("get"),
            Some(vec![3; 12])
        );
        assert_eq!(wit::Host::get(&mut kv, "a".into()).expect("get"), None);
    }

    #[test]
    fn usage_is_recounted_from_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut kv, _db) = unit(dir.path(), 30);
            kv.set("a", &[1; 14]).expect("15 bytes");
        }
        let (mut kv, _db) = unit(dir.path(), 30);
        assert_eq!(kv.used, Some(15));
        assert!(matches!(
            kv.set("b", &[0; 15]),
            Err(wit::Error::QuotaExceeded(_))
        ));
    }
}
