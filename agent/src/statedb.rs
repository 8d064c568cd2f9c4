//! The agent's state database (`state_dir/state`): one sled database for everything that is
//! not the outbox: stages' kv namespaces, deployment artifacts and deployer state, the
//! dataset store. The outbox keeps its own database and write-ahead log.
//!
//! **Invariant:** anything the agent reports as stored (a deployment step, an installed
//! pipeline) went through [`StateDb::sync`] first. **Boundary:** opened once by `agent::run`
//! and handed to the parts that own trees in it.

use std::path::{Path, PathBuf};

/// Page cache of the state database: small, the working set is a few trees.
const CACHE_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("cannot open the state database {path}: {error}")]
pub struct StateDbError {
    pub path: PathBuf,
    pub error: String,
}

#[derive(Clone)]
pub struct StateDb {
    pub db: sled::Db,
    pub dir: PathBuf,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb").field("dir", &self.dir).finish()
    }
}

impl StateDb {
    pub fn open(state_dir: &Path) -> Result<StateDb, StateDbError> {
        let dir = state_dir.join("state");
        let db = sled::Config::new()
            .path(&dir)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| StateDbError {
                path: dir.clone(),
                error: e.to_string(),
            })?;
        Ok(StateDb { db, dir })
    }

    /// Flushes and fsyncs: what was written survives a power cut after this returns.
    pub fn sync(&self) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        crate::fsutil::sync_sled(&self.dir)
    }
}
