//! Directory spools shared by deployments (`deploy/spool.rs`) and federated tasks
//! (`fl/files.rs`): a request is a directory written whole under a temporary `.name`, renamed
//! into the spool, and moved by `serve` into its working directory.
//!
//! **Invariant:** entries starting with `.` (being written) are never listed or taken; a take
//! is one rename on the same file system followed by an fsync of the destination's parent.

use std::path::{Path, PathBuf};

/// Why a spool operation failed; the callers turn it into their own error naming the path.
#[derive(Debug)]
pub enum SpoolDirError {
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The destination already exists (an id used twice).
    Exists { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolDirError + '_ {
    move |error| SpoolDirError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Names of the complete subdirectories of `dir`, sorted; none when `dir` does not exist.
pub fn list_dirs(dir: &Path) -> Result<Vec<String>, SpoolDirError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        out.push(name);
    }
    out.sort();
    Ok(out)
}

/// Writes a request into `spool/id` so that it appears whole: refuses an id already spooled or
/// already taken into `taken/id`, lets `fill` write the files into a fresh temporary
/// directory, fsyncs it, renames it into place and fsyncs the spool. Returns the spooled
/// directory.
pub fn write<E: From<SpoolDirError>>(
    spool: &Path,
    taken: &Path,
    id: &str,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<PathBuf, E> {
    std::fs::create_dir_all(spool).map_err(io(spool))?;
    let dest = spool.join(id);
    for existing in [&dest, &taken.join(id)] {
        if existing.exists() {
            return Err(SpoolDirError::Exists {
                path: existing.clone(),
            }
            .into());
        }
    }
    let tmp = spool.join(format!(".tmp-{id}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    fill(&tmp)?;
    sync_dir(&tmp)?;
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    sync_dir(spool)?;
    Ok(dest)
}

/// Moves `spool/id` to `into/id` (atomic on one file system) and makes the move durable.
pub fn take(spool: &Path, into: &Path, id: &str) -> Result<PathBuf, SpoolDirError> {
    std::fs::create_dir_all(into).map_err(io(into))?;
    let dest = into.join(id);
    if dest.exists() {
        return Err(SpoolDirError::Exists { path: dest });
    }
    std::fs::rename(spool.join(id), &dest).map_err(io(&dest))?;
    sync_dir(into)?;
    Ok(dest)
}

/// Creates (or truncates) `path` with `bytes`, fsync'd when `fsync`: the one way the
/// coordinator's state files are written.
pub fn write_file(path: &Path, bytes: &[u8], fsync: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    if fsync {
        f.sync_all()?;
    }
    Ok(())
}

/// Replaces `path` in one step: `PATH.tmp` written with [`write_file`], then renamed over it.
/// The directory's fsync is the caller's (some batch several replacements under one).
pub fn replace_file(path: &Path, bytes: &[u8], fsync: bool) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    write_file(&tmp, bytes, fsync)?;
    std::fs::rename(&tmp, path)
}

/// fsyncs a directory, so a rename or a new entry in it survives a power cut.
pub fn sync_dir(dir: &Path) -> Result<(), SpoolDirError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}
