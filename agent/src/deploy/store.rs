//! Content-addressed artifact store: key = lowercase hex sha256 of the value, so a module used
//! by two pipelines (or two versions of one) is stored once.
//!
//! The sled implementation does not make writes durable by itself (sled's `flush` is not
//! power-safe, see PRODUCT.md): the caller checkpoints the database (flush + fsync) before it
//! reports an artifact as stored, the same way the outbox does.

use std::collections::BTreeMap;
use std::sync::Mutex;

use protocol::v1::deploy::{is_sha256_hex, sha256_hex};

/// Errors from an artifact store; each names the artifact's digest.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid artifact digest {0:?}: expected 64 lowercase hex digits")]
    Key(String),
    #[error("artifact bytes hash to {actual}, not to the key {key}")]
    Digest { key: String, actual: String },
    #[error("artifact store failed for {key}: {error}")]
    Backend { key: String, error: String },
}

/// Where verified artifacts live, addressed by sha256. Methods take `&self`: the sled tree is
/// internally synchronised and the store is shared with the pipeline loader.
pub trait ArtifactStore {
    fn has(&self, sha256: &str) -> Result<bool, StoreError>;
    /// Stores `bytes` under `sha256`; a no-op when present. Refuses bytes of another digest.
    fn put(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError>;
    fn get(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError>;
}

fn check(sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
    if !is_sha256_hex(sha256) {
        return Err(StoreError::Key(sha256.to_owned()));
    }
    let actual = sha256_hex(bytes);
    if actual != sha256 {
        return Err(StoreError::Digest {
            key: sha256.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// The agent's store: one sled tree (`artifacts`) of the agent database.
pub struct SledStore {
    tree: sled::Tree,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("artifacts", &self.tree.len())
            .finish()
    }
}

impl SledStore {
    /// Tree name inside the agent's sled database.
    pub const TREE: &'static str = "artifacts";

    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        let tree = db.open_tree(Self::TREE).map_err(|e| StoreError::Backend {
            key: Self::TREE.to_owned(),
            error: e.to_string(),
        })?;
        Ok(SledStore { tree })
    }

    /// Digests of every stored artifact (for garbage collection against the pinned set).
    pub fn digests(&self) -> Vec<String> {
        self.tree
            .iter()
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| String::from_utf8(k.to_vec()).ok())
            .collect()
    }

    pub fn remove(&self, sha256: &str) -> Result<(), StoreError> {
        self.tree
            .remove(sha256.as_bytes())
            .map(drop)
            .map_err(|e| backend(sha256, e))
    }
}

fn backend(key: &str, e: sled::Error) -> StoreError {
    StoreError::Backend {
        key: key.to_owned(),
        error: e.to_string(),
    }
}

impl ArtifactStore for SledStore {
    fn has(&self, sha256: &str) -> Result<bool, StoreError> {
        self.tree
            .contains_key(sha256.as_bytes())
            .map_err(|e| backend(sha256, e))
    }

    fn put(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        check(sha256, bytes)?;
        if self.has(sha256)? {
            return Ok(());
        }
        self.tree
            .insert(sha256.as_bytes(), bytes)
            .map(drop)
            .map_err(|e| backend(sha256, e))
    }

    fn get(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.tree
            .get(sha256.as_bytes())
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| backend(sha256, e))
    }
}

/// In-memory store for tests and for a device without a state directory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ArtifactStore for MemoryStore {
    fn has(&self, sha256: &str) -> Result<bool, StoreError> {
        Ok(self
            .map
            .lock()
            .map(|m| m.contains_key(sha256))
            .unwrap_or(false))
    }

    fn put(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        check(sha256, bytes)?;
        let mut map = self.map.lock().map_err(|_| StoreError::Backend {
            key: sha256.to_owned(),
            error: "lock poisoned".into(),
        })?;
        map.entry(sha256.to_owned())
            .or_insert_with(|| bytes.to_vec());
        Ok(())
    }

    fn get(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.lock().ok().and_then(|m| m.get(sha256).cloned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_store_is_content_addressed_and_dedupes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .cache_capacity(1 << 20)
            .open()
            .expect("opens");
        let store = SledStore::open(&db).expect("tree");
        let module = b"\0asm module bytes".to_vec();
        let sha = sha256_hex(&module);
        assert!(!store.has(&sha).expect("has"));
        store.put(&sha, &module).expect("put");
        // The same module deployed again (another pipeline, another version) is stored once.
        store.put(&sha, &module).expect("put again");
        assert_eq!(store.digests(), vec![sha.clone()]);
        assert_eq!(store.get(&sha).expect("get"), Some(module.clone()));
        assert!(matches!(
            store.put(&sha, b"other bytes"),
            Err(StoreError::Digest { .. })
        ));
        assert!(matches!(
            store.put("not-a-digest", &module),
            Err(StoreError::Key(_))
        ));
        drop(store);
        drop(db);
        // Survives reopening.
        let db = crate::statedb::reopen_for_test(&sled::Config::new().path(dir.path().join("db")));
        let store = SledStore::open(&db).expect("tree");
        assert_eq!(store.get(&sha).expect("get"), Some(module));
        store.remove(&sha).expect("remove");
        assert!(!store.has(&sha).expect("has"));
    }

    #[test]
    fn memory_store_checks_digests() {
        let store = MemoryStore::default();
        let sha = sha256_hex(b"x");
        store.put(&sha, b"x").expect("put");
        store.put(&sha, b"x").expect("put again");
        assert_eq!(store.len(), 1);
        assert!(store.put(&sha, b"y").is_err());
    }
}
