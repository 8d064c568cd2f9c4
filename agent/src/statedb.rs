//! The agent's state database (`state_dir/state`): one sled database for everything that is
//! not the outbox: stages' kv namespaces, the deployer's state, the dataset store, federated
//! learning's rounds and marks. The outbox keeps its own database and write-ahead log; what is
//! large and written whole lives in files beside it (`state_dir/artifacts`, `state_dir/fl`),
//! because sled 0.34 keeps every page it writes in memory whatever its cache size.
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

/// Reopens a sled database in the same process, as the tests that check what survives a reopen
/// do. sled's background flusher thread keeps the file, and its lock, for a moment after the
/// last handle drops; under qemu-user on a loaded machine that moment reached the reopen, which
/// then failed with "could not acquire lock". So retry while the lock is held, up to 30 s.
#[cfg(test)]
pub(crate) fn reopen_for_test(config: &sled::Config) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match config.open() {
            Ok(db) => return db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("reopen: {e:?}"),
        }
    }
}
