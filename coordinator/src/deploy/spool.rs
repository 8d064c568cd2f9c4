//! Deployments on disk: the spool the `deploy` command writes and `serve` picks up, and each
//! rollout's directory with its package and progress file.
//!
//! ```text
//! state_dir/deploy/spool/{id}/              written whole: .tmp-{id}-{pid}/ then rename
//!     manifest.json                         the SignedManifest exactly as published
//!     {sha256}                              each distinct artifact
//! state_dir/deploy/rollouts/{id}/           the spool entry, renamed when serve takes it
//!     manifest.json, {sha256}
//!     progress.json                         ProgressFile, rewritten atomically by serve
//!     strategy.json, rollback/              a staged rollout (`--strategy canary`): its
//!                                           Strategy, and the rollback package (manifest,
//!                                           artifacts)
//! state_dir/deploy/control/{ns}-{pid}.json  `rollout pause|resume|abort` requests, taken and
//!                                           deleted by serve in name order
//! ```
//!
//! Every write goes to a temporary name, is fsync'd and then renamed, so a reader (or a
//! restarted coordinator) sees a whole file or none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protocol::v1::deploy::{SignedManifest, is_sha256_hex};
use protocol::v1::validate_message_id;

use super::engine::Control;
use super::package::{Package, PackageError};
use super::progress::ProgressFile;
use super::waves::Strategy;

const MANIFEST: &str = "manifest.json";
const PROGRESS: &str = "progress.json";
const STRATEGY: &str = "strategy.json";
const ROLLBACK: &str = "rollback";

/// Errors from the spool and rollout directories; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("deployment {id} already exists in {path}; choose another --id")]
    Exists { id: String, path: PathBuf },
    #[error("invalid deployment id {0:?}")]
    Id(String),
    #[error("{path}: {error}")]
    Manifest { path: PathBuf, error: String },
    #[error("package in {dir}: {error}")]
    Package { dir: PathBuf, error: PackageError },
    #[error("progress file {path}: {error}")]
    Progress {
        path: PathBuf,
        error: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |error| SpoolError::Io {
        path: path.to_owned(),
        error,
    }
}

pub fn spool_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("deploy").join("spool")
}

pub fn rollouts_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("deploy").join("rollouts")
}

pub fn rollout_dir(state_dir: &Path, id: &str) -> PathBuf {
    rollouts_dir(state_dir).join(id)
}

pub fn progress_path(state_dir: &Path, id: &str) -> PathBuf {
    rollout_dir(state_dir, id).join(PROGRESS)
}

/// Writes `package` into the spool as one directory that appears whole. Refuses an id that is
/// spooled or rolled out already. Returns the spooled directory.
pub fn write_spool(state_dir: &Path, package: &Package) -> Result<PathBuf, SpoolError> {
    let id = &package.manifest.deployment_id;
    validate_message_id(id).map_err(|_| SpoolError::Id(id.clone()))?;
    crate::spooldir::write(&spool_dir(state_dir), &rollouts_dir(state_dir), id, |tmp| {
        write_synced(&tmp.join(MANIFEST), &package.manifest_payload())?;
        for (sha, bytes) in package.blobs() {
            write_synced(&tmp.join(sha), bytes)?;
        }
        Ok(())
    })
}

/// Writes a staged rollout into the spool: the package, its strategy, and the rollback
/// package in `rollback/`.
pub fn write_spool_staged(
    state_dir: &Path,
    package: &Package,
    strategy: &Strategy,
    rollback: &Package,
) -> Result<PathBuf, SpoolError> {
    let id = &package.manifest.deployment_id;
    validate_message_id(id).map_err(|_| SpoolError::Id(id.clone()))?;
    crate::spooldir::write(&spool_dir(state_dir), &rollouts_dir(state_dir), id, |tmp| {
        write_synced(&tmp.join(MANIFEST), &package.manifest_payload())?;
        for (sha, bytes) in package.blobs() {
            write_synced(&tmp.join(sha), bytes)?;
        }
        let json = serde_json::to_vec_pretty(strategy).map_err(|error| SpoolError::Manifest {
            path: tmp.join(STRATEGY),
            error: error.to_string(),
        })?;
        write_synced(&tmp.join(STRATEGY), &json)?;
        let rb = tmp.join(ROLLBACK);
        std::fs::create_dir(&rb).map_err(io(&rb))?;
        write_synced(&rb.join(MANIFEST), &rollback.manifest_payload())?;
        for (sha, bytes) in rollback.blobs() {
            write_synced(&rb.join(sha), bytes)?;
        }
        crate::spooldir::sync_dir(&rb)?;
        Ok(())
    })
}

/// A rollout directory's strategy and rollback package; `None` for a whole-target rollout.
pub fn load_staged(dir: &Path) -> Result<Option<(Strategy, Package)>, SpoolError> {
    let path = dir.join(STRATEGY);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let strategy: Strategy =
        serde_json::from_slice(&bytes).map_err(|error| SpoolError::Manifest {
            path: path.clone(),
            error: error.to_string(),
        })?;
    let rollback = load_package(&dir.join(ROLLBACK))?;
    if rollback.manifest.deployment_id != strategy.rollback_id {
        return Err(SpoolError::Manifest {
            path,
            error: format!(
                "rollback_id {} does not match the rollback package's deployment {}",
                strategy.rollback_id, rollback.manifest.deployment_id
            ),
        });
    }
    Ok(Some((strategy, rollback)))
}

pub fn control_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("deploy").join("control")
}

/// An operator's request for a staged rollout, as spooled by `rollout pause|resume|abort`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub deployment_id: String,
    pub action: Control,
}

/// Spools a control request (whole, under a temporary name first).
pub fn write_control(state_dir: &Path, request: &ControlRequest) -> Result<PathBuf, SpoolError> {
    let dir = control_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!("{nanos:020}-{}.json", std::process::id());
    let tmp = dir.join(format!(".{name}"));
    let json = serde_json::to_vec(request).map_err(|error| SpoolError::Manifest {
        path: tmp.clone(),
        error: error.to_string(),
    })?;
    write_synced(&tmp, &json)?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    crate::spooldir::sync_dir(&dir)?;
    Ok(path)
}

/// Takes every spooled control request in order (each file is deleted once read); a file that
/// does not parse is reported with its path and deleted.
pub fn take_controls(state_dir: &Path) -> Vec<Result<ControlRequest, SpoolError>> {
    let dir = control_dir(state_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.') && n.ends_with(".json"))
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|path| {
            let read = std::fs::read(&path).map_err(io(&path)).and_then(|b| {
                serde_json::from_slice(&b).map_err(|error| SpoolError::Manifest {
                    path: path.clone(),
                    error: error.to_string(),
                })
            });
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete a taken rollout control request");
            }
            read
        })
        .collect()
}

/// Deployment ids waiting in the spool, oldest name first (temporary entries skipped).
pub fn pending(state_dir: &Path) -> Result<Vec<String>, SpoolError> {
    list_dirs(&spool_dir(state_dir))
}

/// Every rollout directory's id.
pub fn rollouts(state_dir: &Path) -> Result<Vec<String>, SpoolError> {
    list_dirs(&rollouts_dir(state_dir))
}

fn list_dirs(dir: &Path) -> Result<Vec<String>, SpoolError> {
    crate::spooldir::list_dirs(dir).map_err(from_spooldir)
}

/// Moves a spooled deployment to its rollout directory (same file system: atomic).
pub fn take(state_dir: &Path, id: &str) -> Result<PathBuf, SpoolError> {
    crate::spooldir::take(&spool_dir(state_dir), &rollouts_dir(state_dir), id)
        .map_err(from_spooldir)
}

/// Reads a package directory and checks every artifact against the signed manifest.
pub fn load_package(dir: &Path) -> Result<Package, SpoolError> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let manifest_err = |error: String| SpoolError::Manifest {
        path: path.clone(),
        error,
    };
    let signed = SignedManifest::from_json(&bytes).map_err(|e| manifest_err(e.to_string()))?;
    let manifest = signed
        .peek_unverified()
        .ok_or_else(|| manifest_err("manifest_json does not parse".into()))?;
    let mut blobs = BTreeMap::new();
    for a in &manifest.artifacts {
        // The digest becomes a file name: only 64 hex digits may.
        if !is_sha256_hex(&a.sha256) || blobs.contains_key(&a.sha256) {
            continue;
        }
        let blob = dir.join(&a.sha256);
        let bytes = std::fs::read(&blob).map_err(io(&blob))?;
        blobs.insert(a.sha256.clone(), bytes);
    }
    Package::from_signed(signed, blobs).map_err(|error| SpoolError::Package {
        dir: dir.to_owned(),
        error,
    })
}

/// Deletes the artifact copies of a finished rollout (its manifest and progress stay).
pub fn remove_artifacts(dir: &Path) -> Result<(), SpoolError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_sha256_hex)
        {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Rewrites a rollout's progress file atomically.
pub fn write_progress(state_dir: &Path, progress: &ProgressFile) -> Result<(), SpoolError> {
    let path = progress_path(state_dir, &progress.deployment_id);
    let json = serde_json::to_vec_pretty(progress).map_err(|error| SpoolError::Progress {
        path: path.clone(),
        error,
    })?;
    let tmp = path.with_extension("json.tmp");
    write_synced(&tmp, &json)?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// A rollout's progress file; `None` if it does not exist (yet).
pub fn read_progress(state_dir: &Path, id: &str) -> Result<Option<ProgressFile>, SpoolError> {
    let path = progress_path(state_dir, id);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|error| SpoolError::Progress { path, error })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    crate::spooldir::write_file(path, bytes, true).map_err(io(path))
}

impl From<crate::spooldir::SpoolDirError> for SpoolError {
    fn from(e: crate::spooldir::SpoolDirError) -> SpoolError {
        from_spooldir(e)
    }
}

fn from_spooldir(e: crate::spooldir::SpoolDirError) -> SpoolError {
    match e {
        crate::spooldir::SpoolDirError::Io { path, error } => SpoolError::Io { path, error },
        crate::spooldir::SpoolDirError::Exists { path } => SpoolError::Exists {
            id: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::package::{ArtifactFile, PackageSpec};
    use protocol::v1::deploy::{DeployKind, HealthCheck, SigningKey, Target};

    fn package(id: &str) -> Package {
        Package::build(
            PackageSpec {
                deployment_id: id.into(),
                target: Target::Device("d1".into()),
                version: 1,
                now_ms: 0,
                ttl_ms: 1_000,
                kind: DeployKind::Pipeline,
                pipeline_toml: Some(String::new()),
                chunk_size: 4,
                health: HealthCheck {
                    messages: 0,
                    seconds: 0,
                },
            },
            vec![ArtifactFile {
                name: "a.wasm".into(),
                version: "1".into(),
                bytes: b"hello world".to_vec(),
            }],
            &SigningKey::from_bytes(&[5; 32]),
        )
        .expect("builds")
    }

    #[test]
    fn spool_take_load_roundtrip_and_tamper_detection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path();
        let p = package("dep-1");
        write_spool(state, &p).expect("spools");
        assert!(matches!(
            write_spool(state, &p),
            Err(SpoolError::Exists { .. })
        ));
        assert_eq!(pending(state).expect("lists"), vec!["dep-1".to_owned()]);
        let taken = take(state, "dep-1").expect("takes");
        assert!(pending(state).expect("lists").is_empty());
        assert_eq!(rollouts(state).expect("lists"), vec!["dep-1".to_owned()]);
        let loaded = load_package(&taken).expect("loads");
        assert_eq!(loaded.manifest, p.manifest);
        assert_eq!(loaded.manifest_payload(), p.manifest_payload());
        // Taken ids cannot be spooled again.
        assert!(matches!(
            write_spool(state, &p),
            Err(SpoolError::Exists { .. })
        ));

        let sha = &p.manifest.artifacts[0].sha256;
        std::fs::write(taken.join(sha), b"hello wOrld").expect("tamper");
        match load_package(&taken) {
            Err(SpoolError::Package {
                error: PackageError::Artifact { reason, .. },
                ..
            }) => assert!(reason.contains("sha256"), "{reason}"),
            other => panic!("unexpected {other:?}"),
        }
        std::fs::remove_file(taken.join(sha)).expect("rm");
        assert!(matches!(load_package(&taken), Err(SpoolError::Io { .. })));
    }

    #[test]
    fn progress_roundtrips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path();
        assert_eq!(read_progress(state, "dep-1").expect("reads"), None);
        std::fs::create_dir_all(rollout_dir(state, "dep-1")).expect("mkdir");
        let progress = ProgressFile {
            deployment_id: "dep-1".into(),
            version: 1,
            target: Target::Group("lab".into()),
            expires_ms: 5,
            total_bytes: 11,
            chunk_total: 3,
            devices: BTreeMap::new(),
            resends_ignored: 2,
            finished: Some("expired".into()),
            updated_ms: 4,
            waves: None,
            serving: false,
            rollback: BTreeMap::new(),
        };
        write_progress(state, &progress).expect("writes");
        assert_eq!(
            read_progress(state, "dep-1").expect("reads"),
            Some(progress)
        );
    }
}
