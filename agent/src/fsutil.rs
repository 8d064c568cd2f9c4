//! Small filesystem helpers for durability: fsync'd writes, directory syncs, free space.

use std::io::Write;
use std::path::Path;

/// The two the sandbox's kv store needs live with it; the agent's other stores use them too.
pub use edge_sandbox::fsutil::{sync_dir, sync_sled};

/// Writes `bytes` to `path` so that after return the content survives a power cut: write to a
/// temporary sibling (`path` with `.tmp` added), fsync it, rename over `path`, fsync the
/// directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
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

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
