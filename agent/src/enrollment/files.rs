//! The device's identity files, in `{state_dir}/identity/` (mode 0700):
//!
//! ```text
//! device.key       the device identity (ed25519 + x25519 secret, hex, 0600, create-new, fsync'd;
//!                  protocol::keyfile): made at first start, never leaves the device
//! epoch            the boot epoch (decimal, 0 when the key is made): raised and fsync'd at
//!                  every start, before anything is sealed, so (epoch, counter) never repeats
//!                  under the key
//! enrollment.bin   the newest signed enrollment answer about this key (re-verified at start)
//! rotation.json    after the coordinator rotated its key: the key it rotated from and the
//!                  answer, signed by that key, that named the new one (written before
//!                  enrollment.bin; re-verified at start; the new key is trusted over any pin)
//! ```

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::keyfile::{self, KeyError};
use protocol::v1::auth::Identity;

use super::machine::Rotation;

const DIR: &str = "identity";
const KEY: &str = "device.key";
const EPOCH: &str = "epoch";
const ANSWER: &str = "enrollment.bin";
const ROTATION: &str = "rotation.json";

/// Errors from the identity files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("identity directory {path}: {error}")]
    Dir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("device identity: {0}")]
    Key(#[from] KeyError),
    #[error("{path}: {error}")]
    Corrupt { path: PathBuf, error: String },
    #[error("cannot read or write {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Where the epoch came from, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochSource {
    /// The persisted epoch plus one (1 at the first start of a new identity).
    Raised,
    /// The file was missing beside an existing key, or unreadable as a number: the epoch
    /// restarts at the wall clock's seconds, far above any boot count, so the coordinator
    /// does not refuse everything as a replay of an earlier boot.
    Recovered,
}

/// The identity directory of one state directory.
#[derive(Debug, Clone)]
pub struct Files {
    dir: PathBuf,
}

impl Files {
    /// Opens `{state_dir}/identity`, creating it with mode 0700 (and narrowing an existing
    /// one to it: the key's directory is nobody else's business).
    pub fn open(state_dir: &Path) -> Result<Files, FilesError> {
        let dir = state_dir.join(DIR);
        let err = |error| FilesError::Dir {
            path: dir.clone(),
            error,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(err)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        Ok(Files { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The device identity, made now if there is none; `true` when it was just made (with an
    /// epoch file at 0: no epoch was ever used with the new key). A key file that exists but
    /// does not load (permissions, format) is an error, never replaced: a new key would be a
    /// new device to the coordinator.
    pub fn identity(&self) -> Result<(Identity, bool), FilesError> {
        let path = self.dir.join(KEY);
        match keyfile::load_identity(&path) {
            Ok(id) => return Ok((id, false)),
            Err(KeyError::Read { error, .. }) if error.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        match keyfile::generate_identity_file(&path) {
            Ok(id) => {
                let epoch = self.dir.join(EPOCH);
                crate::fsutil::write_durably(&epoch, b"0\n")
                    .map_err(|error| FilesError::Io { path: epoch, error })?;
                Ok((id, true))
            }
            // Made meanwhile by another process (`edge-agent identity` beside the agent).
            Err(KeyError::Exists { .. }) => Ok((keyfile::load_identity(&path)?, false)),
            Err(e) => Err(e.into()),
        }
    }

    /// Raises the persisted epoch and makes it durable before returning it. `now_s`: the wall
    /// clock, for the recovery of a lost or damaged file.
    pub fn raise_epoch(&self, now_s: u64) -> Result<(u64, EpochSource), FilesError> {
        let path = self.dir.join(EPOCH);
        let io = |error| FilesError::Io {
            path: path.clone(),
            error,
        };
        let recovered = (now_s.max(1), EpochSource::Recovered);
        let (epoch, source) = match std::fs::read_to_string(&path) {
            Ok(text) => match text.trim().parse::<u64>() {
                Ok(n) => (n.saturating_add(1), EpochSource::Raised),
                Err(_) => recovered,
            },
            Err(e) if e.kind() == ErrorKind::NotFound => recovered,
            Err(e) => return Err(io(e)),
        };
        crate::fsutil::write_durably(&path, format!("{epoch}\n").as_bytes()).map_err(io)?;
        Ok((epoch, source))
    }

    /// The persisted answer, if any.
    pub fn answer(&self) -> Result<Option<Vec<u8>>, FilesError> {
        let path = self.dir.join(ANSWER);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(error) => Err(FilesError::Io { path, error }),
        }
    }

    /// The persisted rotation, if the coordinator ever rotated its key.
    pub fn rotation(&self) -> Result<Option<Rotation>, FilesError> {
        let path = self.dir.join(ROTATION);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| FilesError::Corrupt {
                    path,
                    error: e.to_string(),
                }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(error) => Err(FilesError::Io { path, error }),
        }
    }

    /// Replaces the persisted rotation durably.
    pub fn save_rotation(&self, rotation: &Rotation) -> Result<(), FilesError> {
        let path = self.dir.join(ROTATION);
        let json = serde_json::to_vec_pretty(rotation).map_err(|e| FilesError::Corrupt {
            path: path.clone(),
            error: e.to_string(),
        })?;
        crate::fsutil::write_durably(&path, &json).map_err(|error| FilesError::Io { path, error })
    }

    /// Replaces the persisted answer durably.
    pub fn save_answer(&self, bytes: &[u8]) -> Result<(), FilesError> {
        let path = self.dir.join(ANSWER);
        crate::fsutil::write_durably(&path, bytes).map_err(|error| FilesError::Io { path, error })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("exists").permissions().mode() & 0o777
    }

    #[test]
    fn the_identity_is_made_once_in_a_private_directory() {
        let state = tempfile::tempdir().expect("tempdir");
        let files = Files::open(state.path()).expect("opens");
        assert_eq!(mode(files.dir()), 0o700);
        let (id, made) = files.identity().expect("made");
        assert!(made);
        assert_eq!(mode(&files.dir().join(KEY)), 0o600);
        let (again, made) = files.identity().expect("loaded");
        assert!(!made);
        assert_eq!(again.public(), id.public());

        // A directory someone widened is narrowed again; a key others can read is refused.
        std::fs::set_permissions(files.dir(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let files = Files::open(state.path()).expect("opens");
        assert_eq!(mode(files.dir()), 0o700);
        std::fs::set_permissions(
            files.dir().join(KEY),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert!(matches!(
            files.identity(),
            Err(FilesError::Key(KeyError::Permissions { .. }))
        ));
    }

    #[test]
    fn the_epoch_rises_at_every_start_and_recovers_from_a_lost_file() {
        let state = tempfile::tempdir().expect("tempdir");
        let files = Files::open(state.path()).expect("opens");
        files.identity().expect("a new key, epoch 0");
        assert_eq!(
            files.raise_epoch(5_000).expect("1"),
            (1, EpochSource::Raised)
        );
        // A restart: a new Files over the same directory.
        let files = Files::open(state.path()).expect("reopens");
        assert_eq!(
            files.raise_epoch(5_000).expect("2"),
            (2, EpochSource::Raised)
        );
        assert_eq!(files.raise_epoch(5_000).expect("3").0, 3);
        assert_eq!(
            std::fs::read_to_string(files.dir().join(EPOCH)).expect("persisted"),
            "3\n"
        );
        std::fs::remove_file(files.dir().join(EPOCH)).expect("lost");
        assert_eq!(
            files.raise_epoch(5_000).expect("recovered"),
            (5_000, EpochSource::Recovered)
        );
        std::fs::write(files.dir().join(EPOCH), "garbage").expect("damaged");
        assert_eq!(files.raise_epoch(6_000).expect("recovered").0, 6_000);
        assert_eq!(files.raise_epoch(0).expect("raised").0, 6_001);
    }

    #[test]
    fn the_answer_is_kept_durably() {
        let state = tempfile::tempdir().expect("tempdir");
        let files = Files::open(state.path()).expect("opens");
        assert_eq!(files.answer().expect("none"), None);
        files.save_answer(b"one").expect("saved");
        files.save_answer(b"two").expect("replaced");
        assert_eq!(files.answer().expect("read"), Some(b"two".to_vec()));
    }

    #[test]
    fn the_rotation_is_kept_durably() {
        let state = tempfile::tempdir().expect("tempdir");
        let files = Files::open(state.path()).expect("opens");
        assert_eq!(files.rotation().expect("none"), None);
        let r = Rotation {
            previous: Identity::generate().public(),
            answer: vec![0, 1, 0xfe],
        };
        files.save_rotation(&r).expect("saved");
        assert_eq!(files.rotation().expect("read"), Some(r));
        std::fs::write(files.dir().join(ROTATION), "{").expect("damaged");
        assert!(matches!(files.rotation(), Err(FilesError::Corrupt { .. })));
    }
}
