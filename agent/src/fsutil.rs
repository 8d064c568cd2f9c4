//! Small filesystem helpers for durability: fsync'd writes, directory syncs, free space.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` so that after return the content survives a power cut: write to a
/// temporary sibling, fsync it, rename over `path`, fsync the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// fsyncs a directory so entries created or renamed in it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
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
