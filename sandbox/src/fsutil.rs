//! Durability helpers the sandbox's kv store needs (and the agent's stores share): directory
//! syncs and making a sled database power-safe.

use std::path::Path;

/// fsyncs a directory so entries created or renamed in it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Makes what sled wrote to the database in `dir` power-safe: sled's `flush` only reaches
/// the OS (`sync_file_range`), so fsync its data file and the blob files it writes large
/// values to. Call after `flush`.
pub fn sync_sled(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir.join("db")).and_then(|f| f.sync_data())?;
    let blobs = dir.join("blobs");
    if let Ok(entries) = std::fs::read_dir(&blobs) {
        for entry in entries.flatten() {
            std::fs::File::open(entry.path()).and_then(|f| f.sync_data())?;
        }
        sync_dir(&blobs)?;
    }
    Ok(())
}
