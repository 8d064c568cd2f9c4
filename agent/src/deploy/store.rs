//! Content-addressed artifact store: key = lowercase hex sha256 of the value, so a module used
//! by two pipelines (or two versions of one) is stored once.
//!
//! The agent's implementation ([`FileStore`]) makes each artifact durable as it is put.

use std::collections::BTreeMap;
use std::path::PathBuf;
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

/// The agent's store: one file per artifact, `{dir}/{sha256}` (`state_dir/artifacts`), written
/// durably by `put` (fsync'd, renamed in, the folder fsync'd). Not sled values: sled 0.34 keeps
/// every page it writes in memory whatever its cache size, so a deployed 20 MB model would stay
/// in the agent's memory, beside the runtime's own copy, until a restart.
pub struct FileStore {
    dir: PathBuf,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore").field("dir", &self.dir).finish()
    }
}

impl FileStore {
    /// The tree of the state database where earlier agents kept artifacts.
    const LEGACY_TREE: &'static str = "artifacts";

    /// Opens (creates) `dir`, moving in any artifacts an earlier agent kept in `db`.
    pub fn open(dir: PathBuf, db: &sled::Db) -> Result<Self, StoreError> {
        let io = |e: std::io::Error| backend(&dir.display().to_string(), e);
        std::fs::create_dir_all(&dir).map_err(io)?;
        // Writes a crash cut short (`{sha256}.tmp`, see `fsutil::write_durably`).
        for entry in std::fs::read_dir(&dir).map_err(io)?.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(".tmp"))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let store = FileStore { dir };
        if db
            .tree_names()
            .iter()
            .any(|n| &n[..] == Self::LEGACY_TREE.as_bytes())
        {
            store.move_in(db)?;
        }
        Ok(store)
    }

    /// Artifacts from the legacy tree into files (each checked against its digest; a damaged
    /// one is left behind, to be fetched again by the deployment that needs it), then the tree
    /// goes. A crash in between moves the rest at the next start.
    fn move_in(&self, db: &sled::Db) -> Result<(), StoreError> {
        let legacy = |e: sled::Error| backend(Self::LEGACY_TREE, e);
        let tree = db.open_tree(Self::LEGACY_TREE).map_err(legacy)?;
        let mut moved = 0;
        for kv in tree.iter() {
            let (k, v) = kv.map_err(legacy)?;
            let sha = String::from_utf8_lossy(&k).into_owned();
            match self.put(&sha, &v) {
                Ok(()) => moved += 1,
                Err(e) => {
                    tracing::warn!(artifact = %sha, error = %e, "a stored artifact was damaged; left behind")
                }
            }
        }
        db.drop_tree(Self::LEGACY_TREE).map_err(legacy)?;
        tracing::info!(artifacts = moved, dir = %self.dir.display(), "artifacts moved from the state database to files");
        Ok(())
    }

    fn path(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        if !is_sha256_hex(sha256) {
            return Err(StoreError::Key(sha256.to_owned()));
        }
        Ok(self.dir.join(sha256))
    }

    /// Digests of every stored artifact (for garbage collection against the pinned set).
    pub fn digests(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_sha256_hex(n))
            .collect()
    }

    pub fn remove(&self, sha256: &str) -> Result<(), StoreError> {
        match std::fs::remove_file(self.path(sha256)?) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(backend(sha256, e)),
            _ => Ok(()),
        }
    }
}

fn backend(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        key: key.to_owned(),
        error: e.to_string(),
    }
}

impl ArtifactStore for FileStore {
    fn has(&self, sha256: &str) -> Result<bool, StoreError> {
        Ok(self.path(sha256)?.is_file())
    }

    fn put(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        check(sha256, bytes)?;
        if self.has(sha256)? {
            return Ok(());
        }
        crate::fsutil::write_durably(&self.path(sha256)?, bytes).map_err(|e| backend(sha256, e))
    }

    fn get(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(self.path(sha256)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend(sha256, e)),
        }
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
    fn file_store_is_content_addressed_and_dedupes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path().join("db")).expect("opens");
        let store = FileStore::open(dir.path().join("artifacts"), &db).expect("store");
        let module = b"\0asm module bytes".to_vec();
        let sha = sha256_hex(&module);
        assert!(!store.has(&sha).expect("has"));
        assert_eq!(store.get(&sha).expect("get"), None);
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
        assert!(matches!(store.get("../db"), Err(StoreError::Key(_))));
        // A write a crash cut short is not an artifact.
        std::fs::write(
            dir.path().join("artifacts").join(format!("{sha}.tmp")),
            b"x",
        )
        .expect("tmp");
        assert_eq!(store.digests(), vec![sha.clone()]);
        drop(store);
        // Survives reopening; the cut-short write goes.
        let store = FileStore::open(dir.path().join("artifacts"), &db).expect("store");
        assert!(
            !dir.path()
                .join("artifacts")
                .join(format!("{sha}.tmp"))
                .exists()
        );
        assert_eq!(store.get(&sha).expect("get"), Some(module));
        store.remove(&sha).expect("remove");
        store.remove(&sha).expect("removing what is gone is fine");
        assert!(!store.has(&sha).expect("has"));
    }

    /// Artifacts an earlier agent kept in the state database move to files at open; a damaged
    /// one stays behind; the tree goes.
    #[test]
    fn artifacts_kept_in_sled_move_to_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path().join("db")).expect("opens");
        let (good, bad) = (b"module".to_vec(), b"model".to_vec());
        let tree = db.open_tree("artifacts").expect("tree");
        tree.insert(sha256_hex(&good), &good[..]).expect("insert");
        tree.insert(sha256_hex(&bad), &b"damaged"[..])
            .expect("insert");
        drop(tree);
        let store = FileStore::open(dir.path().join("artifacts"), &db).expect("store");
        assert_eq!(store.get(&sha256_hex(&good)).expect("get"), Some(good));
        assert!(!store.has(&sha256_hex(&bad)).expect("has"));
        assert!(
            !db.tree_names().iter().any(|n| &n[..] == b"artifacts"),
            "the tree is gone"
        );
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
