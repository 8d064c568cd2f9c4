//! Secret key files, one format for every key the system keeps: the deploy key
//! (`edge-coordinator keygen`), fleet claim keys, the coordinator's online identity and each
//! device's identity ([`crate::v1::auth::Identity`]).
//!
//! A key file holds the secret as hex digits and a newline, mode 0600, created once and never
//! overwritten; loading refuses a file that group or others can read. Not a wire format: it lives
//! here because the agent and the coordinator both keep keys and share no other crate.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::RngCore;

use crate::v1::auth::Identity;

/// Errors from creating or reading a key file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("cannot write key file {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read key file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("key file {path} is readable by others (mode {mode:o}); run chmod 600 on it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} does not hold a key: expected {digits} hex digits")]
    Format { path: PathBuf, digits: usize },
}

/// Generates a signing key and writes it to `path` (created, never overwritten, mode 0600,
/// fsync'd). Returns the public key to print.
pub fn generate_key_file(path: &Path) -> Result<VerifyingKey, KeyError> {
    let mut secret = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut secret);
    write_new(path, &secret)?;
    Ok(SigningKey::from_bytes(&secret).verifying_key())
}

/// Generates an [`Identity`] and writes it to `path` like [`generate_key_file`].
pub fn generate_identity_file(path: &Path) -> Result<Identity, KeyError> {
    let id = Identity::generate();
    write_new(path, &id.to_bytes())?;
    Ok(id)
}

/// Loads an identity written by [`generate_identity_file`].
pub fn load_identity(path: &Path) -> Result<Identity, KeyError> {
    let secret = read_secret(path, 64)?;
    Identity::from_bytes(&secret).map_err(|_| KeyError::Format {
        path: path.to_owned(),
        digits: 128,
    })
}

/// Writes `secret` as hex to a new file at `path`, mode 0600, and fsyncs it and its directory.
pub fn write_new(path: &Path, secret: &[u8]) -> Result<(), KeyError> {
    let write_err = |error| KeyError::Write {
        path: path.to_owned(),
        error,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                write_err(e)
            }
        })?;
    // `mode` is filtered by the umask, which can only remove bits; set it anyway in case the
    // file system ignores creation modes.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(write_err)?;
    file.write_all(format!("{}\n", hex::encode(secret)).as_bytes())
        .map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)?;
    }
    Ok(())
}

/// Loads a key written by [`generate_key_file`]; refuses a file group or others can read.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let secret = read_secret(path, 32)?;
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&secret);
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a key file of `len` secret bytes; refuses one group or others can read.
pub fn read_secret(path: &Path, len: usize) -> Result<Vec<u8>, KeyError> {
    let read_err = |error| KeyError::Read {
        path: path.to_owned(),
        error,
    };
    let mode = std::fs::metadata(path)
        .map_err(read_err)?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let mut secret = vec![0u8; len];
    hex::decode_to_slice(text.trim(), &mut secret).map_err(|_| KeyError::Format {
        path: path.to_owned(),
        digits: 2 * len,
    })?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_0600_refuses_overwrite_and_loads_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("deploy.key");
        let public = generate_key_file(&path).expect("generates");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let before = std::fs::read(&path).expect("reads");
        assert!(matches!(
            generate_key_file(&path),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(std::fs::read(&path).expect("reads"), before);
        let key = load_signing_key(&path).expect("loads");
        assert_eq!(key.verifying_key(), public);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            load_signing_key(&path),
            Err(KeyError::Permissions { .. })
        ));
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "nope\n").expect("writes");
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            load_signing_key(&bad),
            Err(KeyError::Format { .. })
        ));
        // An identity is the same kind of file with 64 bytes; a signing key file is not one.
        let id_path = dir.path().join("device.key");
        let id = generate_identity_file(&id_path).expect("generates");
        assert_eq!(
            load_identity(&id_path).expect("loads").public(),
            id.public()
        );
        assert!(matches!(
            load_identity(&path),
            Err(KeyError::Permissions { .. } | KeyError::Format { .. })
        ));
    }
}
