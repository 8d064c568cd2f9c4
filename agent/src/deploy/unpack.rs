//! A deployed model's external data files, written out of the artifact store into
//! `STATE_DIR/models/` so that ONNX Runtime maps them from disk (the weights held once) instead
//! of being handed a copy in memory (which it copies again: about 3x the weights at the load).
//!
//! Layout: one folder per graph and data set, `models/KEY/LOCATION` (KEY: a digest of the
//! graph's artifact digest and each location with its file's digest, so the same graph with
//! other weights gets another folder), and `models/KEY.digests` listing the digests of the
//! graph's and the files' artifacts, written before the files so that garbage collection never takes a folder
//! being filled for an artifact it keeps.
//!
//! Invariant: a file in a folder is never rewritten in place. A file is checked against its
//! digest (streamed, never held whole) before it is used; a missing or damaged one is written
//! to a temporary name from the store (whose bytes are checked on the way out) and renamed
//! over, so a session that maps the old file keeps its pages. Boundary: the artifacts of a
//! deployment (`task`) and its garbage collection.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::pipeline::ArtifactError;

/// Where stored models' data files are written out; see the module docs.
#[derive(Debug, Clone)]
pub struct Unpacked {
    dir: PathBuf,
}

/// One data file of a model: its location as the graph writes it, its artifact's name and
/// digest.
pub struct DataArtifact<'a> {
    pub location: &'a str,
    pub name: &'a str,
    pub sha256: &'a str,
}

fn io_error(path: &Path, e: std::io::Error) -> ArtifactError {
    ArtifactError::Read {
        path: path.to_owned(),
        source: e,
    }
}

impl Unpacked {
    /// Files go under `dir` (created when the first model is written out).
    pub fn new(dir: PathBuf) -> Unpacked {
        Unpacked { dir }
    }

    /// The folder holding `files` for the graph whose artifact digest is `graph_sha`, written
    /// out where missing or damaged; `fetch` gives an artifact's checked bytes.
    pub fn folder(
        &self,
        graph_sha: &str,
        files: &[DataArtifact<'_>],
        fetch: impl Fn(&DataArtifact<'_>) -> Result<Vec<u8>, ArtifactError>,
    ) -> Result<PathBuf, ArtifactError> {
        let mut key = Sha256::new();
        key.update(graph_sha.as_bytes());
        for f in files {
            key.update((f.location.len() as u64).to_le_bytes());
            key.update(f.location.as_bytes());
            key.update(f.sha256.as_bytes());
        }
        let key = hex::encode(key.finalize())[..32].to_owned();
        let folder = self.dir.join(&key);
        std::fs::create_dir_all(&folder).map_err(|e| io_error(&folder, e))?;
        let list = self.dir.join(format!("{key}.digests"));
        let digests: String = std::iter::once(graph_sha)
            .chain(files.iter().map(|f| f.sha256))
            .map(|sha| format!("{sha}\n"))
            .collect();
        write_new(&list, |out| out.write_all(digests.as_bytes()))?;
        for f in files {
            // `check_location` refused absolute paths and `..` before any graph got here.
            let path = folder.join(f.location);
            if file_sha256(&path).is_ok_and(|sha| sha == f.sha256) {
                continue;
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
            }
            let bytes = fetch(f)?;
            write_new(&path, |out| out.write_all(&bytes))?;
            tracing::debug!(file = %path.display(), bytes = bytes.len(), "model data file written out of the artifact store");
        }
        Ok(folder)
    }

    /// Removes every folder made for an artifact that is not in `pinned` (and folders without
    /// their list, left by an interrupted write). A session mapping a removed file keeps it.
    pub fn collect_garbage(&self, pinned: &BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let list = path.with_extension("digests");
            let keep = std::fs::read_to_string(&list)
                .is_ok_and(|text| text.lines().all(|sha| pinned.contains(sha)));
            if keep {
                continue;
            }
            let removed =
                std::fs::remove_dir_all(&path).and_then(|()| match std::fs::remove_file(&list) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                });
            match removed {
                Ok(()) => tracing::debug!(folder = %path.display(), "unused model data removed"),
                Err(e) => {
                    tracing::warn!(folder = %path.display(), error = %e, "cannot remove unused model data")
                }
            }
        }
    }
}

/// SHA-256 of the file at `path`, streamed.
fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Writes `path` through a temporary file in its folder and a rename, so no reader (or
/// mapping) ever sees it half written.
fn write_new(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), ArtifactError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| write(&mut f))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn files_are_written_once_checked_and_rewritten_when_damaged() {
        let dir = tempfile::tempdir().expect("tmp");
        let u = Unpacked::new(dir.path().join("models"));
        let (a, b) = (b"weights a".to_vec(), b"weights b".to_vec());
        let (sa, sb) = (sha(&a), sha(&b));
        let files = [
            DataArtifact {
                location: "m.onnx.data",
                name: "a",
                sha256: &sa,
            },
            DataArtifact {
                location: "sub/w.bin",
                name: "b",
                sha256: &sb,
            },
        ];
        let fetched = std::cell::Cell::new(0);
        let fetch = |f: &DataArtifact<'_>| {
            fetched.set(fetched.get() + 1);
            Ok(if f.sha256 == sa { a.clone() } else { b.clone() })
        };
        let folder = u.folder("g", &files, fetch).expect("written");
        assert_eq!(std::fs::read(folder.join("m.onnx.data")).expect("a"), a);
        assert_eq!(std::fs::read(folder.join("sub/w.bin")).expect("b"), b);
        assert_eq!(fetched.get(), 2);
        // Present and intact: not fetched again.
        assert_eq!(u.folder("g", &files, fetch).expect("again"), folder);
        assert_eq!(fetched.get(), 2);
        // Damaged on disk: written again from the store.
        std::fs::write(folder.join("m.onnx.data"), b"garbage").expect("damage");
        u.folder("g", &files, fetch).expect("repaired");
        assert_eq!(std::fs::read(folder.join("m.onnx.data")).expect("a"), a);
        assert_eq!(fetched.get(), 3);
        // Another graph with the same files gets its own folder.
        assert_ne!(u.folder("h", &files, fetch).expect("other"), folder);
        // A store failure is the caller's error, and nothing is left half written.
        let e = u
            .folder("i", &files[..1], |f| {
                Err(ArtifactError::Missing(f.sha256.to_owned()))
            })
            .expect_err("missing");
        assert!(e.to_string().contains(&sa), "{e}");
    }

    #[test]
    fn garbage_collection_keeps_folders_whose_artifacts_are_all_pinned() {
        let dir = tempfile::tempdir().expect("tmp");
        let u = Unpacked::new(dir.path().join("models"));
        let (a, b) = (b"a".to_vec(), b"b".to_vec());
        let (sa, sb) = (sha(&a), sha(&b));
        let fetch = |f: &DataArtifact<'_>| Ok(if f.sha256 == sa { a.clone() } else { b.clone() });
        let one = |location, sha256| {
            [DataArtifact {
                location,
                name: location,
                sha256,
            }]
        };
        let kept = u.folder("g", &one("a", &sa), fetch).expect("a");
        let dropped = u.folder("g", &one("b", &sb), fetch).expect("b");
        let old_graph = u.folder("h", &one("a", &sa), fetch).expect("h");
        let orphan = dir.path().join("models/orphan");
        std::fs::create_dir_all(&orphan).expect("orphan");
        u.collect_garbage(&BTreeSet::from([sa.clone(), "g".to_owned()]));
        assert!(kept.join("a").is_file());
        assert!(!old_graph.exists(), "its graph is no longer pinned");
        assert!(!dropped.exists() && !dropped.with_extension("digests").exists());
        assert!(!orphan.exists(), "a folder without its list is removed");
    }
}
