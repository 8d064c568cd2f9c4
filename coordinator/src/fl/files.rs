//! Federated tasks on disk: the spool `fl start` writes and `serve` takes, each task's
//! directory with its persisted state, and stop requests.
//!
//! ```text
//! state_dir/fl/spool/{id}/            written whole by `fl start` (.tmp-{id}-{pid}/, then rename)
//!     task.json                       the validated TaskSpec
//!     model.onnx                      the initial model (evaluation patches weights into it)
//!     holdout.csv                     the held-out set, when the task has one
//! state_dir/fl/tasks/{id}/            the spool entry, renamed when serve takes it
//!     state.json                      TaskState: the commit point, and what `fl status` reads
//!     weights/v{N}.f32                global weights of version N (the last few)
//!     server-v{N}.bin                 server optimizer state after version N
//!     updates/r{R}-o{O}-{device}.bin  accepted updates of round R (trained for round O)
//! state_dir/fl/stop/{id}              `fl stop` asks serve to end the task
//! ```
//!
//! Round messages are signed with the coordinator's own identity (`state_dir/coordinator.key`,
//! see `crate::enrollment`), so a task carries no key; a `signing.key` left in the directory of
//! a task spooled by an older version is ignored.
//!
//! Why files rather than the registry's sled database: `fl status` reads the state while
//! `serve` holds sled's lock, and sled does not fsync the blob files large values (weights)
//! end up in. Every file is written to a temporary name, fsync'd and renamed. A batch of
//! writes is applied as: new weights, optimizer state and updates first, then `state.json`
//! (the commit point), then deletions, so a crash at any point leaves a state whose files
//! exist; files the state does not name are ignored and cleaned up.

use std::path::{Path, PathBuf};

use super::aggregate::ServerState;
use super::engine::Write;
use super::eval::Holdout;
use super::state::{StoredUpdate, TaskState, f32s_from_bytes, f32s_to_bytes};
use super::task::{LoadedTask, TaskSpec, valid_task_id};

const TASK: &str = "task.json";
const MODEL: &str = "model.onnx";
const HOLDOUT: &str = "holdout.csv";
const STATE: &str = "state.json";

/// Errors from the spool and task directories; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("federated task {id} already exists in {path}; choose another id")]
    Exists { id: String, path: PathBuf },
    #[error("invalid task id {0:?}")]
    Id(String),
    #[error("{path}: {error}")]
    Corrupt { path: PathBuf, error: String },
    #[error("no federated task {id} in {dir}")]
    Unknown { id: String, dir: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |error| FilesError::Io {
        path: path.to_owned(),
        error,
    }
}

pub fn fl_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("fl")
}

pub fn spool_dir(state_dir: &Path) -> PathBuf {
    fl_dir(state_dir).join("spool")
}

pub fn tasks_dir(state_dir: &Path) -> PathBuf {
    fl_dir(state_dir).join("tasks")
}

pub fn task_dir(state_dir: &Path, id: &str) -> PathBuf {
    tasks_dir(state_dir).join(id)
}

fn stop_dir(state_dir: &Path) -> PathBuf {
    fl_dir(state_dir).join("stop")
}

/// Spools a loaded task. Refuses an id that is spooled or known already.
pub fn write_spool(state_dir: &Path, task: &LoadedTask) -> Result<PathBuf, FilesError> {
    let id = &task.spec.id;
    if !valid_task_id(id) {
        return Err(FilesError::Id(id.clone()));
    }
    crate::spooldir::write(&spool_dir(state_dir), &tasks_dir(state_dir), id, |tmp| {
        let spec = serde_json::to_vec_pretty(&task.spec).map_err(|e| FilesError::Corrupt {
            path: tmp.join(TASK),
            error: e.to_string(),
        })?;
        write_synced(&tmp.join(TASK), &spec, true)?;
        write_synced(&tmp.join(MODEL), &task.model_bytes, true)?;
        if let Some(text) = &task.holdout_text {
            write_synced(&tmp.join(HOLDOUT), text.as_bytes(), true)?;
        }
        Ok(())
    })
}

/// Task ids waiting in the spool (temporary entries skipped).
pub fn pending(state_dir: &Path) -> Result<Vec<String>, FilesError> {
    list_dirs(&spool_dir(state_dir))
}

/// Every task directory's id.
pub fn tasks(state_dir: &Path) -> Result<Vec<String>, FilesError> {
    list_dirs(&tasks_dir(state_dir))
}

fn list_dirs(dir: &Path) -> Result<Vec<String>, FilesError> {
    crate::spooldir::list_dirs(dir).map_err(from_spooldir)
}

/// Moves a spooled task to its task directory (same file system: atomic).
pub fn take(state_dir: &Path, id: &str) -> Result<PathBuf, FilesError> {
    crate::spooldir::take(&spool_dir(state_dir), &tasks_dir(state_dir), id).map_err(from_spooldir)
}

/// What a task directory holds besides its state.
#[derive(Debug)]
pub struct TaskFiles {
    pub spec: TaskSpec,
    pub model: Vec<u8>,
    pub holdout: Option<Holdout>,
}

pub fn load_task_files(dir: &Path) -> Result<TaskFiles, FilesError> {
    let path = dir.join(TASK);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let spec: TaskSpec = serde_json::from_slice(&bytes).map_err(|e| FilesError::Corrupt {
        path: path.clone(),
        error: e.to_string(),
    })?;
    let model_path = dir.join(MODEL);
    let model = std::fs::read(&model_path).map_err(io(&model_path))?;
    let holdout = if spec.holdout {
        let path = dir.join(HOLDOUT);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        Some(Holdout::parse(&text).map_err(|e| FilesError::Corrupt {
            path,
            error: e.to_string(),
        })?)
    } else {
        None
    };
    Ok(TaskFiles {
        spec,
        model,
        holdout,
    })
}

/// A task's `state.json`; `None` before serve first wrote it.
pub fn read_state(state_dir: &Path, id: &str) -> Result<Option<TaskState>, FilesError> {
    let path = task_dir(state_dir, id).join(STATE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| FilesError::Corrupt {
            path,
            error: e.to_string(),
        })
}

fn weights_path(dir: &Path, version: u32) -> PathBuf {
    dir.join("weights").join(format!("v{version}.f32"))
}

fn server_path(dir: &Path, version: u32) -> PathBuf {
    dir.join(format!("server-v{version}.bin"))
}

fn updates_dir(dir: &Path) -> PathBuf {
    dir.join("updates")
}

fn update_name(round: u32, origin: u32, device: &str) -> String {
    format!("r{round}-o{origin}-{device}.bin")
}

/// Applies the engine's writes under `state_dir` in crash-safe order (see the module docs).
/// `fsync` false skips the fsyncs (the `store.fsync` setting).
pub fn apply(state_dir: &Path, writes: Vec<Write>, fsync: bool) -> Result<(), FilesError> {
    let mut states = Vec::new();
    let mut deletions = Vec::new();
    let mut synced_dirs = std::collections::BTreeSet::new();
    for w in writes {
        match w {
            Write::Weights {
                task,
                version,
                weights,
            } => {
                let path = weights_path(&task_dir(state_dir, &task), version);
                write_atomic(&path, &f32s_to_bytes(&weights), fsync, &mut synced_dirs)?;
            }
            Write::Server {
                task,
                version,
                state,
            } => {
                let path = server_path(&task_dir(state_dir, &task), version);
                write_atomic(&path, &state.to_bytes(), fsync, &mut synced_dirs)?;
            }
            Write::Update {
                task,
                round,
                update,
            } => {
                let path = updates_dir(&task_dir(state_dir, &task)).join(update_name(
                    round,
                    update.origin,
                    &update.device,
                ));
                write_atomic(&path, &update.to_bytes(), fsync, &mut synced_dirs)?;
            }
            Write::State { task, state } => states.push((task, state)),
            other => deletions.push(other),
        }
    }
    if fsync {
        for dir in &synced_dirs {
            sync_dir(dir)?;
        }
    }
    let mut synced_dirs = std::collections::BTreeSet::new();
    for (task, state) in states {
        let path = task_dir(state_dir, &task).join(STATE);
        let json = serde_json::to_vec_pretty(&state).map_err(|e| FilesError::Corrupt {
            path: path.clone(),
            error: e.to_string(),
        })?;
        write_atomic(&path, &json, fsync, &mut synced_dirs)?;
    }
    if fsync {
        for dir in &synced_dirs {
            sync_dir(dir)?;
        }
    }
    for d in deletions {
        match d {
            Write::DropWeights { task, version } => {
                let dir = task_dir(state_dir, &task);
                remove_if_exists(&weights_path(&dir, version))?;
                remove_if_exists(&server_path(&dir, version))?;
            }
            Write::ClearUpdates { task, round } => {
                let dir = updates_dir(&task_dir(state_dir, &task));
                let prefix = format!("r{round}-");
                for name in list_files(&dir)? {
                    if name.starts_with(&prefix) {
                        remove_if_exists(&dir.join(name))?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A persisted task: its state and the vectors it names.
#[derive(Debug)]
pub struct Persisted {
    pub state: TaskState,
    pub global: Vec<f32>,
    pub server: ServerState,
    pub updates: Vec<StoredUpdate>,
}

/// Loads a task's state and the files of its current version and round; stray files of
/// other rounds (a crash between the state and the clean-up) are deleted.
pub fn load_persisted(state_dir: &Path, id: &str) -> Result<Option<Persisted>, FilesError> {
    let Some(state) = read_state(state_dir, id)? else {
        return Ok(None);
    };
    let dir = task_dir(state_dir, id);
    let n = state.spec.weight_count();
    let wpath = weights_path(&dir, state.version);
    let bytes = std::fs::read(&wpath).map_err(io(&wpath))?;
    let global = f32s_from_bytes(&bytes)
        .filter(|w| w.len() == n && w.iter().all(|x| x.is_finite()))
        .ok_or_else(|| FilesError::Corrupt {
            path: wpath.clone(),
            error: format!("expected {n} finite f32 weights"),
        })?;
    let spath = server_path(&dir, state.version);
    let server = match std::fs::read(&spath) {
        Ok(b) => ServerState::from_bytes(&b).ok_or_else(|| FilesError::Corrupt {
            path: spath.clone(),
            error: "not a server optimizer state".into(),
        })?,
        // Version 0 before its first write, or a task from before the optimizer had state.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ServerState::new(n),
        Err(e) => return Err(io(&spath)(e)),
    };
    let udir = updates_dir(&dir);
    let prefix = format!("r{}-", state.round);
    let mut updates = Vec::new();
    for name in list_files(&udir)? {
        let path = udir.join(&name);
        if !name.starts_with(&prefix) {
            remove_if_exists(&path)?;
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let u = StoredUpdate::from_bytes(&bytes)
            .filter(|u| u.delta.len() == n)
            .ok_or_else(|| FilesError::Corrupt {
                path: path.clone(),
                error: "not a stored update of this model".into(),
            })?;
        updates.push(u);
    }
    Ok(Some(Persisted {
        state,
        global,
        server,
        updates,
    }))
}

/// Asks the running serve to stop task `id`.
pub fn request_stop(state_dir: &Path, id: &str) -> Result<(), FilesError> {
    if !valid_task_id(id) {
        return Err(FilesError::Id(id.to_owned()));
    }
    if !task_dir(state_dir, id).is_dir() && !spool_dir(state_dir).join(id).is_dir() {
        return Err(FilesError::Unknown {
            id: id.to_owned(),
            dir: tasks_dir(state_dir),
        });
    }
    let dir = stop_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    write_synced(&dir.join(id), b"", true)
}

/// Task ids with a stop request.
pub fn stop_requests(state_dir: &Path) -> Result<Vec<String>, FilesError> {
    Ok(list_files(&stop_dir(state_dir))?
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect())
}

pub fn clear_stop(state_dir: &Path, id: &str) -> Result<(), FilesError> {
    remove_if_exists(&stop_dir(state_dir).join(id))
}

fn list_files(dir: &Path) -> Result<Vec<String>, FilesError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        if let Ok(name) = entry.file_name().into_string()
            && entry.path().is_file()
            && !name.ends_with(".tmp")
        {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

fn remove_if_exists(path: &Path) -> Result<(), FilesError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Temporary name, (fsync), rename; the directory is remembered for one fsync per batch.
fn write_atomic(
    path: &Path,
    bytes: &[u8],
    fsync: bool,
    dirs: &mut std::collections::BTreeSet<PathBuf>,
) -> Result<(), FilesError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    crate::spooldir::replace_file(path, bytes, fsync).map_err(io(path))?;
    dirs.insert(dir.to_owned());
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8], fsync: bool) -> Result<(), FilesError> {
    crate::spooldir::write_file(path, bytes, fsync).map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), FilesError> {
    crate::spooldir::sync_dir(dir).map_err(from_spooldir)
}

impl From<crate::spooldir::SpoolDirError> for FilesError {
    fn from(e: crate::spooldir::SpoolDirError) -> FilesError {
        from_spooldir(e)
    }
}

fn from_spooldir(e: crate::spooldir::SpoolDirError) -> FilesError {
    match e {
        crate::spooldir::SpoolDirError::Io { path, error } => FilesError::Io { path, error },
        crate::spooldir::SpoolDirError::Exists { path } => FilesError::Exists {
            id: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path,
        },
    }
}
