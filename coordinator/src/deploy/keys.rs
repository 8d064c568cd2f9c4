//! Ed25519 signing keys for deployments: `edge-coordinator keygen` writes one, `deploy` loads it.
//!
//! The key file holds the 32-byte secret as 64 hex digits and a newline, mode 0600. The public
//! key (hex) is what agents list in `trusted_keys`.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::v1::deploy::{SigningKey, VerifyingKey};
use rand::RngCore;

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
    #[error("key file {path} does not hold a key: expected 64 hex digits")]
    Format { path: PathBuf },
}

/// Generates a key and writes it to `path` (created, never overwritten, mode 0600, fsync'd).
/// Returns the public key to print.
pub fn generate_key_file(path: &Path) -> Result<VerifyingKey, KeyError> {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let key = SigningKey::from_bytes(&secret);
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
    Ok(key.verifying_key())
}

/// Loads a key written by [`generate_key_file`]; refuses a file group or others can read.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
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
    let mut secret = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut secret).map_err(|_| KeyError::Format {
        path: path.to_owned(),
    })?;
    Ok(SigningKey::from_bytes(&secret))
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
    }
}
