//! Enrollment on disk, outside sled (which `serve` holds locked): the coordinator's identity
//! and epoch, the spool through which operator commands reach a running `serve`, and the
//! snapshot of every enrollment record that `serve` rewrites for `devices pending`.
//!
//! ```text
//! state_dir/coordinator.key                 the online identity (protocol::keyfile, 0600)
//! state_dir/coordinator.key.old             the identity before `identity rotate`, while the
//!                                           rotation lasts (deleted when it finishes)
//! state_dir/coordinator.key.new             a rotation's new identity being made (renamed
//!                                           to coordinator.key, or deleted at start)
//! state_dir/epoch                           this coordinator's boot counter, raised at every start
//! state_dir/enrollment/spool/{id}/command.json     written whole by `devices approve|reject|revoke`
//! state_dir/enrollment/commands/{id}/              taken by serve
//!     command.json, result.json              the outcome, which the command waits for
//! state_dir/enrollment/devices.json         every record, rewritten by serve after each change
//! ```
//!
//! Requests go through `crate::spooldir` like deployments and federated tasks: they appear
//! whole or not at all, and serve applies each once (the take is a rename).

use std::path::{Path, PathBuf};

use protocol::keyfile::{self, KeyError};
use protocol::v1::auth::Identity;
use protocol::v1::enroll::Decision;
use serde::{Deserialize, Serialize};

use super::core::EnrollmentRecord;

const COMMAND: &str = "command.json";
const RESULT: &str = "result.json";
const SNAPSHOT: &str = "devices.json";
/// Taken commands older than this are deleted by serve (their command has long stopped waiting).
pub const KEEP_COMMANDS_MS: u64 = 24 * 3600 * 1000;

/// Errors from the enrollment files; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Corrupt { path: PathBuf, error: String },
    #[error(
        "a key rotation is in progress ({0} exists); finish it first: identity rotate --finish"
    )]
    Rotating(PathBuf),
    #[error(
        "no enrollment snapshot in {0}; it is written by `edge-coordinator serve` (has it run with this state dir?)"
    )]
    NoSnapshot(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |error| FilesError::Io {
        path: path.to_owned(),
        error,
    }
}

pub fn identity_path(state_dir: &Path) -> PathBuf {
    state_dir.join("coordinator.key")
}

pub fn old_identity_path(state_dir: &Path) -> PathBuf {
    state_dir.join("coordinator.key.old")
}

fn new_identity_path(state_dir: &Path) -> PathBuf {
    state_dir.join("coordinator.key.new")
}

/// The online identity and, while a rotation lasts, the one before it; first repairs what a
/// crash in [`rotate_identity`] left: a new key without the old one kept is deleted (the
/// rotation never happened), a new key beside the kept old one is put in place (it did).
/// `true` when the identity was created now.
pub fn load_identities(state_dir: &Path) -> Result<(Identity, Option<Identity>, bool), FilesError> {
    let (key, old, new) = (
        identity_path(state_dir),
        old_identity_path(state_dir),
        new_identity_path(state_dir),
    );
    if new.exists() {
        if old.exists() {
            std::fs::rename(&new, &key).map_err(io(&key))?;
        } else {
            std::fs::remove_file(&new).map_err(io(&new))?;
        }
        crate::spooldir::sync_dir(state_dir)?;
    }
    let (current, created) = load_or_create_identity(state_dir)?;
    if !old.exists() {
        return Ok((current, None, created));
    }
    let previous = keyfile::load_identity(&old)?;
    if previous.public() == current.public() {
        // Not reached by rotate_identity (the new key exists before the old one is kept).
        std::fs::remove_file(&old).map_err(io(&old))?;
        crate::spooldir::sync_dir(state_dir)?;
        return Ok((current, None, created));
    }
    Ok((current, Some(previous), created))
}

/// Replaces the online identity: a new one is made (`coordinator.key.new`, 0600, fsync'd),
/// the current one is kept as `coordinator.key.old` (a hard link, fsync'd), then the new one
/// renamed over `coordinator.key` (fsync'd): every crash leaves a state
/// [`load_identities`] starts from. Returns `(new, old)`. Refused while a rotation lasts.
pub fn rotate_identity(state_dir: &Path) -> Result<(Identity, Identity), FilesError> {
    let (key, old, new) = (
        identity_path(state_dir),
        old_identity_path(state_dir),
        new_identity_path(state_dir),
    );
    if old.exists() {
        return Err(FilesError::Rotating(old));
    }
    let previous = keyfile::load_identity(&key)?;
    if new.exists() {
        std::fs::remove_file(&new).map_err(io(&new))?;
    }
    let next = keyfile::generate_identity_file(&new)?;
    std::fs::hard_link(&key, &old).map_err(io(&old))?;
    crate::spooldir::sync_dir(state_dir)?;
    std::fs::rename(&new, &key).map_err(io(&key))?;
    crate::spooldir::sync_dir(state_dir)?;
    Ok((next, previous))
}

/// Ends a rotation: the old identity file is deleted (durably); nothing is accepted under it
/// after a restart either.
pub fn finish_rotation(state_dir: &Path) -> Result<(), FilesError> {
    let old = old_identity_path(state_dir);
    match std::fs::remove_file(&old) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(&old)(e)),
    }
    Ok(crate::spooldir::sync_dir(state_dir)?)
}

fn epoch_path(state_dir: &Path) -> PathBuf {
    state_dir.join("epoch")
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("enrollment")
}

pub fn spool_dir(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("spool")
}

fn commands_dir(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("commands")
}

pub fn snapshot_path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join(SNAPSHOT)
}

/// The coordinator's online identity, created (0600, fsync'd) on first use. `true` when it
/// was created now.
pub fn load_or_create_identity(state_dir: &Path) -> Result<(Identity, bool), FilesError> {
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let path = identity_path(state_dir);
    if path.exists() {
        return Ok((keyfile::load_identity(&path)?, false));
    }
    match keyfile::generate_identity_file(&path) {
        Ok(id) => Ok((id, true)),
        // Made by someone else (`identity` beside a starting serve) in between: theirs counts.
        Err(KeyError::Exists { .. }) => Ok((keyfile::load_identity(&path)?, false)),
        Err(e) => Err(e.into()),
    }
}

/// Raises the persisted epoch by one (write, fsync, rename, fsync of the directory) and
/// returns the new value. A file that does not hold a number stops the start: starting over
/// at 1 would make devices refuse our messages as replays of an older boot.
pub fn raise_epoch(state_dir: &Path) -> Result<u64, FilesError> {
    let path = epoch_path(state_dir);
    let previous = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|e| FilesError::Corrupt {
                path: path.clone(),
                error: format!(
                    "not an epoch number ({e}); restore it or write a number above any used before"
                ),
            })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io(&path)(e)),
    };
    let epoch = previous + 1;
    write_atomic(&path, format!("{epoch}\n").as_bytes(), true)?;
    Ok(epoch)
}

/// An operator's decision for the running serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase", deny_unknown_fields)]
pub enum Command {
    Approve {
        device: String,
        #[serde(default)]
        groups: Vec<String>,
    },
    Reject {
        device: String,
        #[serde(default)]
        reason: String,
    },
    Revoke {
        device: String,
    },
    /// `identity rotate`: a new online key, announced to every enrolled device.
    Rotate {},
    /// `identity rotate --finish`: the old key is deleted and refused.
    FinishRotation {},
}

impl Command {
    /// The device a decision is about; `None` for the coordinator's own key commands.
    pub fn device(&self) -> Option<&str> {
        match self {
            Command::Approve { device, .. }
            | Command::Reject { device, .. }
            | Command::Revoke { device } => Some(device),
            Command::Rotate {} | Command::FinishRotation {} => None,
        }
    }
}

/// What serve did with a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub ok: bool,
    /// The device's enrollment state afterwards.
    #[serde(default)]
    pub state: Option<Decision>,
    /// What happened, or why not.
    pub message: String,
}

/// Spools a command for serve; returns its id (the name `read_result` waits on).
pub fn write_command(state_dir: &Path, command: &Command) -> Result<String, FilesError> {
    let id = format!(
        "{}-{}-{}",
        protocol::v1::now_ms(),
        std::process::id(),
        command.device().unwrap_or("coordinator")
    );
    let json = serde_json::to_vec_pretty(command).map_err(|e| FilesError::Corrupt {
        path: spool_dir(state_dir).join(&id),
        error: e.to_string(),
    })?;
    crate::spooldir::write(
        &spool_dir(state_dir),
        &commands_dir(state_dir),
        &id,
        |tmp| write_synced(&tmp.join(COMMAND), &json, true),
    )?;
    Ok(id)
}

/// Spooled command ids, oldest first (ids start with the time).
pub fn pending_commands(state_dir: &Path) -> Result<Vec<String>, FilesError> {
    Ok(crate::spooldir::list_dirs(&spool_dir(state_dir))?)
}

/// Takes a spooled command (one rename: it is applied at most once).
pub fn take_command(state_dir: &Path, id: &str) -> Result<Command, FilesError> {
    let dir = crate::spooldir::take(&spool_dir(state_dir), &commands_dir(state_dir), id)?;
    let path = dir.join(COMMAND);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| FilesError::Corrupt {
        path,
        error: e.to_string(),
    })
}

/// Records what serve did with command `id`.
pub fn write_result(state_dir: &Path, id: &str, result: &CommandResult) -> Result<(), FilesError> {
    let path = commands_dir(state_dir).join(id).join(RESULT);
    let json = serde_json::to_vec_pretty(result).map_err(|e| FilesError::Corrupt {
        path: path.clone(),
        error: e.to_string(),
    })?;
    write_atomic(&path, &json, false)
}

/// The result of command `id`, once serve wrote it.
pub fn read_result(state_dir: &Path, id: &str) -> Result<Option<CommandResult>, FilesError> {
    let path = commands_dir(state_dir).join(id).join(RESULT);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| FilesError::Corrupt {
                path,
                error: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Deletes a taken command's directory (the command read its result).
pub fn remove_command(state_dir: &Path, id: &str) -> Result<(), FilesError> {
    let path = commands_dir(state_dir).join(id);
    match std::fs::remove_dir_all(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Deletes taken commands whose id says they are older than `cutoff_ms` (nobody waits for
/// them any more).
pub fn prune_commands(state_dir: &Path, cutoff_ms: u64) -> Result<usize, FilesError> {
    let mut pruned = 0;
    for id in crate::spooldir::list_dirs(&commands_dir(state_dir))? {
        let ms = id.split('-').next().and_then(|t| t.parse::<u64>().ok());
        if ms.is_some_and(|ms| ms < cutoff_ms) {
            remove_command(state_dir, &id)?;
            pruned += 1;
        }
    }
    Ok(pruned)
}

/// Rewrites the snapshot of every record (temporary name, rename: readers see a whole file).
pub fn write_snapshot<'a>(
    state_dir: &Path,
    records: impl IntoIterator<Item = &'a EnrollmentRecord>,
) -> Result<(), FilesError> {
    let records: Vec<&EnrollmentRecord> = records.into_iter().collect();
    let path = snapshot_path(state_dir);
    let json = serde_json::to_vec_pretty(&records).map_err(|e| FilesError::Corrupt {
        path: path.clone(),
        error: e.to_string(),
    })?;
    // No fsync: a view of the store, rewritten at start, shutdown and after changes (see
    // `Service::write_snapshot` for how often).
    write_atomic(&path, &json, false)
}

/// The records as the running (or last) serve wrote them.
pub fn read_snapshot(state_dir: &Path) -> Result<Vec<EnrollmentRecord>, FilesError> {
    let path = snapshot_path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FilesError::NoSnapshot(state_dir.to_owned()));
        }
        Err(e) => return Err(io(&path)(e)),
    };
    serde_json::from_slice(&bytes).map_err(|e| FilesError::Corrupt {
        path,
        error: e.to_string(),
    })
}

fn write_atomic(path: &Path, bytes: &[u8], fsync: bool) -> Result<(), FilesError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    crate::spooldir::replace_file(path, bytes, fsync).map_err(io(path))?;
    if fsync {
        crate::spooldir::sync_dir(parent)?;
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8], fsync: bool) -> Result<(), FilesError> {
    crate::spooldir::write_file(path, bytes, fsync).map_err(io(path))
}

impl From<crate::spooldir::SpoolDirError> for FilesError {
    fn from(e: crate::spooldir::SpoolDirError) -> FilesError {
        match e {
            crate::spooldir::SpoolDirError::Io { path, error } => FilesError::Io { path, error },
            crate::spooldir::SpoolDirError::Exists { path } => FilesError::Io {
                error: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists"),
                path,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_the_epoch_rises() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let (first, created) = load_or_create_identity(&state).expect("creates");
        assert!(created);
        let (again, created) = load_or_create_identity(&state).expect("loads");
        assert!(!created);
        assert_eq!(first.public(), again.public());
        assert_eq!(raise_epoch(&state).expect("first"), 1);
        assert_eq!(raise_epoch(&state).expect("second"), 2);
        std::fs::write(epoch_path(&state), "garbage").expect("writes");
        assert!(
            raise_epoch(&state)
                .expect_err("refused")
                .to_string()
                .contains("epoch")
        );
    }

    #[test]
    fn commands_travel_through_the_spool_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path();
        let command = Command::Approve {
            device: "pi-1".into(),
            groups: vec!["lab".into()],
        };
        let id = write_command(state, &command).expect("spools");
        assert_eq!(pending_commands(state).expect("lists"), vec![id.clone()]);
        assert_eq!(read_result(state, &id).expect("reads"), None);
        assert_eq!(take_command(state, &id).expect("takes"), command);
        assert!(pending_commands(state).expect("lists").is_empty());
        assert!(take_command(state, &id).is_err(), "taken once");
        let result = CommandResult {
            ok: true,
            state: Some(Decision::Accepted),
            message: "enrolled".into(),
        };
        write_result(state, &id, &result).expect("writes");
        assert_eq!(read_result(state, &id).expect("reads"), Some(result));
        assert_eq!(prune_commands(state, 0).expect("prunes"), 0);
        assert_eq!(prune_commands(state, u64::MAX).expect("prunes"), 1);
        assert_eq!(read_result(state, &id).expect("reads"), None);
        assert!(matches!(
            read_snapshot(state),
            Err(FilesError::NoSnapshot(_))
        ));
        write_snapshot(state, []).expect("writes");
        assert!(read_snapshot(state).expect("reads").is_empty());
    }

    #[test]
    fn a_rotation_keeps_the_old_key_until_it_finishes_and_survives_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path();
        let (first, old, _) = load_identities(state).expect("creates");
        assert!(old.is_none());
        let (next, previous) = rotate_identity(state).expect("rotates");
        assert_eq!(previous.public(), first.public());
        let (current, old, created) = load_identities(state).expect("loads");
        assert!(!created);
        assert_eq!(current.public(), next.public());
        assert_eq!(old.expect("kept").public(), first.public());
        assert!(matches!(
            rotate_identity(state),
            Err(FilesError::Rotating(_))
        ));
        finish_rotation(state).expect("finishes");
        assert!(load_identities(state).expect("loads").1.is_none());
        finish_rotation(state).expect("twice is fine");

        // A crash after the new key was made, before the old one was kept: no rotation.
        let before = load_identities(state).expect("loads").0.public();
        keyfile::generate_identity_file(&new_identity_path(state)).expect("made");
        let (current, old, _) = load_identities(state).expect("repairs");
        assert_eq!((current.public(), old.is_none()), (before.clone(), true));
        assert!(!new_identity_path(state).exists());
        // A crash after the old key was kept, before the new one was renamed: rolled forward.
        let made = keyfile::generate_identity_file(&new_identity_path(state)).expect("made");
        std::fs::hard_link(identity_path(state), old_identity_path(state)).expect("kept");
        let (current, old, _) = load_identities(state).expect("repairs");
        assert_eq!(current.public(), made.public());
        assert_eq!(old.expect("kept").public(), before);
    }
}
